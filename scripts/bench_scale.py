#!/usr/bin/env python
"""Scale benchmark: a large CSR data set through the whole default pipeline.

Default: 200,000 spots x 2,000 genes, about 10% non-zeros, 6 planted programs on a
spatial grid, written once as an h5ad of integer counts (CSR) and run through
``tardis_exp.pipeline.run`` with the default config (``data=h5ad``, tracking off,
10 replicates of k = 10) in a subprocess; reports wall time and peak RSS (of that
subprocess, ``ru_maxrss``), the time and RSS high-water mark after every stage, and the
quality against the planted truth. Targets (issue 5): <= 10 minutes, <= 8 GB.

Usage::

    python scripts/bench_scale.py                       # 200,000 spots
    python scripts/bench_scale.py --n-spots 50000       # smaller
    python scripts/bench_scale.py --solvers mu hals     # one pipeline per factorize.solver, side by side

With ``--solvers`` the pipeline runs once per solver (each in its own subprocess, in the
order given, BLAS threads as the environment sets them) and the report adds one row per
solver and the time and peak-RSS ratios against the first.

Out of core (issue 15; docs/large-data.md): ``--backend dask`` writes the data as a zarr
store block by block (never whole in memory) and runs the pipeline with
``data=zarr data.backend=dask``; with ``--baseline-spots N`` the same run first makes the
in-memory baseline (``data.backend=memory``) on N spots of the same generator and reports
wall time per spot and peak RSS of both, side by side. ``--cluster`` runs the dask side on
a 2-worker ``distributed.LocalCluster`` (``factorize.dask.scheduler=tcp://...``)::

    python scripts/bench_scale.py --backend dask --spots 2000000 --baseline-spots 200000
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_scale_data(path: Path, n_spots: int, n_genes: int, n_programs: int = 6, n_markers: int = 60,
                    library: float = 220.0, seed: int = 0, chunk: int = 20_000) -> None:
    """Poisson counts from spatial program mixtures, built chunk by chunk straight into CSR.

    The mean library size sets the density: 220 counts over 2,000 genes leaves ~10% of
    the entries non-zero, like sparse spatial data after HVG selection.
    """
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    blocks, domains = [], []
    meta = {}
    for X, d in _scale_blocks(n_spots, n_genes, n_programs, n_markers, library, seed, chunk, meta):
        blocks.append(X)
        domains.append(d)
    X = sp.vstack(blocks, format="csr")
    adata = ad.AnnData(X, obs=_scale_obs(n_spots, np.concatenate(domains), meta["labels"]), var=meta["var"])
    adata.obsm["spatial"] = meta["spatial"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp)
    os.replace(tmp, path)


def _scale_obs(n_spots, domains, labels):
    import pandas as pd

    obs = pd.DataFrame(index=[f"spot{i}" for i in range(n_spots)])
    obs["true_domain"] = pd.Categorical.from_codes(domains, categories=labels)
    return obs


def make_scale_zarr(path: Path, n_spots: int, n_genes: int, n_programs: int = 6, n_markers: int = 60,
                    library: float = 220.0, seed: int = 0, chunk: int = 20_000) -> None:
    """The same data as :func:`make_scale_data`, written as a zarr AnnData store one block at a time."""
    import shutil

    import numpy as np

    from tardis_exp.lazy import write_zarr_chunks

    meta, domains = {}, []

    def blocks():
        for X, d in _scale_blocks(n_spots, n_genes, n_programs, n_markers, library, seed, chunk, meta):
            domains.append(d.astype(np.int8))
            yield X

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # obs (the domains) is known once every block is made: passed as callables
    write_zarr_chunks(tmp, blocks(), obs=lambda: _scale_obs(n_spots, np.concatenate(domains), meta["labels"]),
                      var=lambda: meta["var"], obsm=lambda: {"spatial": meta["spatial"]})
    os.replace(tmp, path)


def _scale_blocks(n_spots, n_genes, n_programs, n_markers, library, seed, chunk, meta):
    """Row blocks (CSR counts, argmax domain) of the planted data; ``meta`` gets var, labels, spatial."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_spots)))
    ij = np.stack(np.divmod(np.arange(n_spots), side), axis=1).astype(np.float32)
    coords = ij / side
    centers = rng.random((n_programs, 2))
    base = rng.lognormal(0.0, 1.0, n_genes)
    base /= base.sum()
    programs = np.tile(base[:, None], (1, n_programs))
    perm = rng.permutation(n_genes)
    marker_of = np.full(n_genes, -1)
    for p in range(n_programs):
        g = perm[p * n_markers:(p + 1) * n_markers]
        marker_of[g] = p
        programs[g, p] = np.median(base) * 8 * rng.lognormal(0.0, 0.3, len(g))
    programs /= programs.sum(0, keepdims=True)
    labels = [f"P{p}" for p in range(n_programs)]
    var = pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)])
    var["true_program"] = pd.Categorical([labels[m] if m >= 0 else "none" for m in marker_of],
                                         categories=labels + ["none"])
    meta.update(labels=labels, var=var, spatial=(ij * 100).astype(np.float32))
    for a in range(0, n_spots, chunk):
        c = coords[a:a + chunk]
        d2 = ((c[:, None, :] - centers[None]) ** 2).sum(-1)
        logits = -d2 * n_programs * 16
        u = np.exp(logits - logits.max(1, keepdims=True))
        u /= u.sum(1, keepdims=True)
        lib = library * rng.lognormal(0.0, 0.3, len(c))
        counts = rng.poisson(lib[:, None] * (u @ programs.T)).astype(np.float32)
        yield sp.csr_matrix(counts), u.argmax(1)


def _rss_mb():
    """This process's peak RSS (MB): VmHWM, which starts afresh at exec. ru_maxrss does not on
    Linux: a worker started by a parent that had generated the data would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hwm_mb(pid: int) -> float:
    """Peak RSS (VmHWM, MB) of a live process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _descendants_hwm_mb() -> dict[int, float]:
    """Peak RSS of every live descendant process (Dask workers of a LocalCluster and their
    helpers), read before they end: a LocalCluster's workers are separate processes whose
    memory the driver's VmHWM does not include."""
    import psutil

    out = {}
    for c in psutil.Process().children(recursive=True):
        try:
            out[c.pid] = _hwm_mb(c.pid)
        except OSError:
            pass
    return out


def worker(data: Path, out: Path, replicates: int, extra: list[str], cluster: bool = False) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tardis_exp import pipeline

    stages = []

    def timer(fn, name):
        @functools.wraps(fn)  # keeps the signature the pipeline validates config keys against
        def timed(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            stages.append({"stage": name, "seconds": time.perf_counter() - t, "peak_rss_mb": _rss_mb()})
            return r

        return timed

    for name in ("load_data", "preprocess", "factorize", "consensus", "score", "_write_outputs"):
        if hasattr(pipeline, name):  # per-stage timing, benchmark instrumentation only
            setattr(pipeline, name, timer(getattr(pipeline, name), name))
    root = out.parent / f"pipeline_{out.stem}"
    source = "zarr" if data.suffix == ".zarr" else "h5ad"
    lc = None
    if cluster:  # a 2-worker LocalCluster in child processes; the pipeline connects to its address
        from distributed import LocalCluster

        lc = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        extra = [*extra, f"factorize.dask.scheduler={lc.scheduler_address}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"paths.root_dir={root}", f"paths.run_dir={root}/run", f"data={source}", f"data.path={data}",
            "tracking.enabled=false", "tracking.log_plots=false", f"factorize.n_replicates={replicates}", *extra])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    t0 = time.perf_counter()
    metrics = pipeline.run(cfg, root / "run")
    dt = time.perf_counter() - t0
    from threadpoolctl import threadpool_info

    threads = [{k: d.get(k) for k in ("internal_api", "num_threads", "version")} for d in threadpool_info()]
    # every live child's own high-water mark (a LocalCluster's worker processes), read before
    # the cluster closes; the reported total is the sum of the driver's and theirs: an upper
    # bound of the peak of the process tree (the peaks need not coincide)
    children = _descendants_hwm_mb()
    if lc is not None:
        lc.close()
    driver = _rss_mb()
    out.write_text(json.dumps({"seconds": dt, "peak_rss_mb": driver + sum(children.values()),
                               "driver_peak_rss_mb": driver, "stages": stages, "threads": threads,
                               "children_peak_rss_mb": sorted(children.values(), reverse=True),
                               "metrics": {k: v for k, v in metrics.items() if k != "mlflow_run_id"}},
                              indent=1, default=float))


def _run_worker(data: Path, res_file: Path, replicates: int, overrides, cluster=False) -> dict | None:
    env = dict(os.environ, TARDIS_EXP_PROGRESS="0", MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, __file__, "--worker", str(res_file), "--data", str(data),
                        "--replicates", str(replicates), *(["--cluster"] if cluster else []), *overrides], env=env)
    if r.returncode != 0:
        print(f"pipeline failed (exit {r.returncode}) on {data}", file=sys.stderr)
        return None
    return json.loads(res_file.read_text())


def _blas() -> str:
    import numpy  # noqa: F401  (loads the BLAS that threadpoolctl reports)
    import scipy.linalg  # noqa: F401
    from threadpoolctl import threadpool_info

    return "BLAS: " + json.dumps([{k: d.get(k) for k in ("internal_api", "num_threads", "architecture")}
                                  for d in threadpool_info()])


def main_dask(a) -> int:
    """Dask backend at --spots, side by side with the in-memory baseline at --baseline-spots."""
    wd = a.workdir.resolve()
    wd.mkdir(parents=True, exist_ok=True)
    rows = []
    plan = []
    if a.baseline_spots:
        plan.append(("memory", a.baseline_spots, ["data.backend=memory"], False))
    name = "dask" + (" (LocalCluster 2 workers)" if a.cluster else "")
    dask_ov = ["data.backend=dask", f"data.chunk_rows={a.chunk_rows}"]
    if a.release_memory == "both":  # the same run without and with the malloc thresholds, side by side
        plan.append((f"{name}, release_memory=false", a.n_spots,
                     [*dask_ov, "factorize.dask.release_memory=false"], a.cluster))
        plan.append((f"{name}, release_memory=true", a.n_spots, dask_ov, a.cluster))
    else:
        plan.append((name, a.n_spots, [*dask_ov, f"factorize.dask.release_memory={a.release_memory == 'on'}"],
                     a.cluster))
    load0 = os.getloadavg()[0]
    for name, n, ov, cluster in plan:
        data = wd / f"scale_{n}x{a.n_genes}.zarr"
        if not data.exists():
            t = time.perf_counter()
            make_scale_zarr(data, n, a.n_genes)
            print(f"made {data} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        tag = f"{name.split()[0].rstrip(',')}{'_cluster' if cluster else ''}_{n}{'_keep' if 'false' in name else ''}"
        load = os.getloadavg()[0]  # other jobs share the machine: the load beside each row
        res = _run_worker(data, wd / f"result_{tag}.json", a.replicates, [*ov, *a.overrides], cluster)
        if res is None:
            return 1
        res["load"] = load
        rows.append((name, n, res))
    lines = [f"Scale run, data.backend=dask: {a.n_genes:,} genes, ~10% non-zero CSR in zarr, {a.replicates} "
             f"replicates, overrides {a.overrides or '[]'}, load average {load0:.2f} at start", "",
             "| backend | spots | load | seconds | s per 1,000 spots | peak RSS (MB) | best K | program recovery |",
             "|---|---|---|---|---|---|---|---|"]
    for name, n, res in rows:
        m = res["metrics"]
        rss = res["peak_rss_mb"]
        kids = [c for c in res.get("children_peak_rss_mb") or [] if c > 1]
        if kids:
            rss_txt = (f"{rss:.0f} (sum of peaks: driver {res['driver_peak_rss_mb']:.0f} + "
                       f"{len(kids)} child processes {' + '.join(f'{c:.0f}' for c in kids)})")
        else:
            rss_txt = f"{rss:.0f}"
        lines.append(f"| {name} | {n:,} | {res['load']:.1f} | {res['seconds']:.1f} | {1000 * res['seconds'] / n:.3f} | {rss_txt} | "
                     f"{m.get('best_k', float('nan')):.0f} | {m.get('program_recovery', float('nan')):.3f} |")
    lines.append("")
    if a.baseline_spots:
        _, n0, r0 = rows[0]
        for name, n1, r1 in rows[1:]:
            lines.append(f"{name}: time per spot, dask / in-memory: {(r1['seconds'] / n1) / (r0['seconds'] / n0):.2f}; "
                         f"peak RSS, dask / in-memory: {r1['peak_rss_mb'] / r0['peak_rss_mb']:.2f} "
                         f"(at {n1 / n0:.1f}x the spots)")
            if n0 == n1:  # same data, same seeds: the chunked path must give the in-memory answer
                same = all(r0["metrics"].get(k) == r1["metrics"].get(k) for k in ("best_k", "program_recovery"))
                lines.append(f"best K and program recovery equal on both paths: {'yes' if same else 'NO'} "
                             f"({ {k: (r0['metrics'].get(k), r1['metrics'].get(k)) for k in ('best_k', 'program_recovery')} })")
    if a.release_memory == "both":
        (_, _, r0), (_, _, r1) = rows[-2:]
        lines.append(f"release_memory true / false: time {r1['seconds'] / r0['seconds']:.2f}, peak RSS "
                     f"{r1['peak_rss_mb'] / r0['peak_rss_mb']:.2f} (driver {r1['driver_peak_rss_mb'] / r0['driver_peak_rss_mb']:.2f}); "
                     f"same best K and recovery: {all(r0['metrics'].get(k) == r1['metrics'].get(k) for k in ('best_k', 'program_recovery'))}")
    for name, n, res in rows:
        lines.append(f"stages ({name}, {n:,}): " + ", ".join(f"{s['stage']} {s['seconds']:.1f}s/{s['peak_rss_mb']:.0f}MB"
                                                           for s in res["stages"]))
    lines.append(_blas())
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-spots", "--spots", type=int, default=200_000)
    ap.add_argument("--n-genes", type=int, default=2_000)
    ap.add_argument("--replicates", type=int, default=10)
    ap.add_argument("--backend", choices=("memory", "dask"), default="memory")
    ap.add_argument("--baseline-spots", type=int, default=0,
                    help="with --backend dask: first run the in-memory path on this many spots")
    ap.add_argument("--chunk-rows", type=int, default=20_000, help="data.chunk_rows for --backend dask")
    ap.add_argument("--cluster", action="store_true", help="dask side on a 2-worker LocalCluster")
    ap.add_argument("--release-memory", choices=("on", "off", "both"), default="on",
                    help="factorize.dask.release_memory of the dask side; both: off then on, side by side")
    ap.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_scale")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--solvers", nargs="+", default=None,
                    help="run the pipeline once per factorize.solver, side by side (ratios against the first)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the pipeline")
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.data, a.worker, a.replicates, a.overrides, a.cluster)
        return 0
    if a.backend == "dask":
        return main_dask(a)
    from threadpoolctl import threadpool_info

    wd = a.workdir.resolve()
    data = wd / f"scale_{a.n_spots}x{a.n_genes}.h5ad"
    if not data.exists():
        t = time.perf_counter()
        make_scale_data(data, a.n_spots, a.n_genes)
        print(f"made {data} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    import anndata as ad

    X = ad.read_h5ad(data, backed="r").X
    nnz = X.nnz if hasattr(X, "nnz") else X._data.shape[0] if hasattr(X, "_data") else None
    load0 = os.getloadavg()[0]
    env = dict(os.environ, TARDIS_EXP_PROGRESS="0", MPLBACKEND="Agg")
    runs = [(None, [])] if not a.solvers else [(s, [f"factorize.solver={s}"]) for s in a.solvers]
    results = {}
    for solver, extra in runs:
        res_file = wd / (f"result_{a.n_spots}.json" if solver is None else f"result_{a.n_spots}_{solver}.json")
        r = subprocess.run([sys.executable, __file__, "--worker", str(res_file), "--data", str(data),
                            "--replicates", str(a.replicates), *a.overrides, *extra], env=env)
        if r.returncode != 0:
            print(f"pipeline failed (exit {r.returncode})", file=sys.stderr)
            return r.returncode
        results[solver] = json.loads(res_file.read_text())
    dens = f"{nnz / (a.n_spots * a.n_genes):.1%}" if nnz else "?"
    lines = [f"Scale run: {a.n_spots:,} spots x {a.n_genes:,} genes CSR ({dens} non-zero), "
             f"{a.replicates} replicates, default pipeline (tracking off), load average {load0:.2f} at start"]
    for solver, res in results.items():
        head = "" if solver is None else f"factorize.solver={solver}: "
        lines += ["", f"{head}| stage | seconds | peak RSS so far (MB) |", "|---|---|---|"]
        lines += [f"| {s['stage']} | {s['seconds']:.1f} | {s['peak_rss_mb']:.0f} |" for s in res["stages"]]
        lines += [f"| **total** | **{res['seconds']:.1f}** | **{res['peak_rss_mb']:.0f}** |", "",
                  "quality: " + ", ".join(f"{k}={v:.3g}" for k, v in res["metrics"].items()),
                  f"targets: <= 600 s ({res['seconds'] / 600:.0%} of it), <= 8192 MB "
                  f"({res['peak_rss_mb'] / 8192:.0%} of it)",
                  "BLAS/OpenMP in the pipeline process (threadpoolctl): " + json.dumps(res["threads"])]
    if len(results) > 1:
        (s0, r0), *rest = results.items()
        for s1, r1 in rest:
            lines.append(f"- {s1} vs {s0}: total {r1['seconds'] / r0['seconds']:.2f}x the time, "
                         f"peak RSS {r1['peak_rss_mb'] / r0['peak_rss_mb']:.2f}x")
    keys = ("internal_api", "num_threads", "architecture")
    lines.append("BLAS of the benchmark process: " + json.dumps([{k: d.get(k) for k in keys} for d in threadpool_info()]))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
