#!/usr/bin/env python
"""Side-by-side benchmark: tardis_exp against scikit-learn, the seed (tardis-spac) and cNMF.

One run, one data set (the default synthetic set: 3,600 spots x 3,000 genes, 6 programs;
the same 2,000 HVGs for every tool), every tool in its own subprocess so each one's peak
RSS is its own. The table (markdown) goes to stdout and to ``docs/bench_results.md``.

Rows
----
tardis_exp pipeline
    ``tardis_exp.pipeline.run`` with the default config (tracking off).
tardis_exp grid
    The cNMF grid -- 20 replicates x k = 4..10, 140 factorizations -- in ONE
    :func:`tardis_exp.nmf.fit_batch`, then cNMF's K rule (below), on the pipeline's
    default input (log-normalized HVGs).
tardis_exp grid, cNMF's input
    The same on the matrix cNMF factorizes: the counts of the same HVGs, each gene
    scaled to unit variance without centering (``preprocess(normalize='none',
    scale=True)``; ``experiment=cnmf_input`` in the pipeline). Same input, same grid:
    the like-for-like solver comparison.
sklearn MU / CD
    ``sklearn.decomposition.NMF`` (float32, dense X, init='random', same tol/max_iter),
    one replicate per k = 4..10 (7 fits), time extrapolated x20 to the grid.
seed
    ``tardis_spac.utils.nmf_consensus(nmf_clustering(adata, n_components=50))`` as its
    tutorial does, in its own venv, with the one-line ``Path`` import patch.
cNMF 1.7.1
    prepare (same counts, ``genes_file`` = the same HVGs) / factorize / combine /
    k_selection_plot / consensus, in its own venv. Slow (~15 min): its result is kept
    in the work dir and reused unless ``--rerun-cnmf``; the table says when it was made.

Quality, computed here for every tool from its spectra and usages: best K, program
recovery (:func:`tardis_exp.metrics.program_recovery` of the consensus spectra at the
chosen K against the planted marker sets) and ARI of the argmax usage against the true
domains. K rule for the grid (tardis_exp and cNMF alike): cNMF's stability, the
silhouette of the L2-normalized spectra clustered by KMeans into k groups; best K = the
largest k within 0.02 of the best stability (and k=6 is reported too).

GFLOP/s: each fat product ``X @ H.T`` / ``X.T @ W`` with K stacked columns counts
``2 * nnz(X) * K`` useful flops (the multiply-adds on stored entries; for the dense-chunk
path the executed flops are ``2 * n * m * K``, shown too). Peak: the best of 3 square
float32 matmuls (4096^3, ``2 * 4096^3`` flops) in the same process, same BLAS threads.

Usage::

    python scripts/bench.py                       # everything (cNMF reused if kept)
    python scripts/bench.py --only tardis_grid sklearn_mu
    python scripts/bench.py --rerun-cnmf          # cNMF again (~15 min)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GRID_KS = list(range(4, 11))
GRID_REPS = 20
TOOLS = ("tardis_pipeline", "tardis_grid", "tardis_grid_cnmf", "sklearn_mu", "sklearn_cd", "seed", "cnmf")
# the seed imports consensusclustering inside nmf_consensus without declaring it
ENV_PINS = {"cnmf": ["cnmf==1.7.1"], "seed": ["tardis-spac", "consensusclustering"]}


def _peak_rss_mb() -> float:
    # This process's own high-water mark (VmHWM): ru_maxrss of RUSAGE_SELF keeps, across the
    # fork and exec that started the worker, the RSS the *parent* had (Linux saves the old
    # image's high-water mark in exec), so a parent that had loaded the data set floored every
    # worker's figure at its own (all rows read 744 MB). Children count too (cNMF may fork).
    hwm = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])  # KiB
    except OSError:
        pass
    s = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(s, c) / 1024


def _threads() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info

        return [{k: d.get(k) for k in ("internal_api", "num_threads", "architecture", "version")}
                for d in threadpool_info()]
    except ImportError:
        return []


def _save(workdir: Path, name: str, out: dict, **arrays) -> None:
    import numpy as np

    if arrays:
        np.savez(workdir / f"{name}.npz", **arrays)
    out.update(peak_rss_mb=_peak_rss_mb(), threads=_threads())
    (workdir / f"{name}.json").write_text(json.dumps(out, indent=1, default=float))


# ------------------------------------------------------------------ data (main venv)


def prepare_data(workdir: Path) -> None:
    """Counts, log-normalized matrix, the 2,000 HVGs and the truth, once per work dir."""
    import anndata as ad
    import numpy as np

    from tardis_exp.preprocess import preprocess
    from tardis_exp.synthetic import make_synthetic

    if (workdir / "hvg.h5ad").exists() and (workdir / "hvg_cnmf.h5ad").exists():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    raw = make_synthetic()
    counts = ad.AnnData(raw.X.copy(), obs=raw.obs[[]].copy(), var=raw.var[[]].copy())
    counts.write_h5ad(workdir / "counts.h5ad")
    lognorm = preprocess(raw, n_top_genes=None)  # same normalization, every gene
    ad.AnnData(lognorm.X, obs=lognorm.obs[[]], var=lognorm.var[[]]).write_h5ad(workdir / "lognorm.h5ad")
    hvg = preprocess(raw)
    ad.AnnData(hvg.X, obs=hvg.obs[[]], var=hvg.var[[]]).write_h5ad(workdir / "hvg.h5ad")
    # cNMF's input: counts of the same genes, unit variance per gene, no centering
    vs = preprocess(counts[:, hvg.var_names].copy(), normalize="none", scale=True, n_top_genes=None,
                    min_cells=0, min_counts=0)
    ad.AnnData(vs.X, obs=vs.obs[[]], var=vs.var[[]]).write_h5ad(workdir / "hvg_cnmf.h5ad")
    (workdir / "genes.txt").write_text("\n".join(hvg.var_names) + "\n")
    np.savez(workdir / "truth.npz", genes=np.asarray(raw.var_names, dtype=str),
             true_program=np.asarray(raw.var["true_program"], dtype=str),
             true_domain=np.asarray(raw.obs["true_domain"], dtype=str))


# ------------------------------------------------------------------ workers (main venv)


def _grid_stability(spectra_by_k: dict, seed=0):
    """cNMF's K statistic: silhouette of L2-normalized spectra in KMeans(k) clusters."""
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    stab, labels = {}, {}
    for k, S in spectra_by_k.items():
        L = S / np.maximum(np.linalg.norm(S, axis=1, keepdims=True), 1e-12)
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(L)
        stab[k] = float(silhouette_score(L, km.labels_, metric="euclidean"))
        labels[k] = km.labels_
    return stab, labels


def _pick_k(stab: dict, tol=0.02) -> int:
    best = max(stab.values())
    return max(k for k, v in stab.items() if v >= best - tol)


def worker_tardis_grid(workdir: Path, name: str = "tardis_grid", matrix: str = "hvg.h5ad") -> None:
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from tardis_exp import nmf

    a = ad.read_h5ad(workdir / matrix)
    X = nmf.prepare_matrix(a.X)
    n, m = X.shape
    nnz = X.nnz if sp.issparse(X) else int(np.count_nonzero(X))
    log = []

    class Counting(nmf._Products):
        # times every fat product and records its K (benchmark instrumentation only)
        def xht(self, H):
            t = time.perf_counter()
            r = super().xht(H)
            log.append((H.shape[0], time.perf_counter() - t, self._method(H.shape[0])))
            return r

        def xtw(self, W):
            t = time.perf_counter()
            r = super().xtw(W)
            log.append((W.shape[1], time.perf_counter() - t, self._method(W.shape[1])))
            return r

        def _method(self, K):
            return self._sp.method_for(K) if self.sparse else "dense"

    nmf._Products = Counting
    ranks = [k for k in GRID_KS for _ in range(GRID_REPS)]
    seeds = nmf.derive_seeds(0, len(ranks))
    t0 = time.perf_counter()
    fits = nmf.fit_batch(X, ranks, seeds, max_iter=1000, tol=1e-4, progress=False)
    t_fit = time.perf_counter() - t0
    spectra = {k: np.concatenate([f.H for f in fits if f.rank == k]) for k in GRID_KS}
    stab, labels = _grid_stability(spectra)
    best = _pick_k(stab)
    cons = {}
    for k in sorted({best, 6}):
        L = spectra[k] / np.maximum(np.linalg.norm(spectra[k], axis=1, keepdims=True), 1e-12)
        cons[k] = np.stack([np.median(L[labels[k] == c], axis=0) for c in range(k)])
    W, _ = nmf.refit_usage(X, cons[best], progress=False)
    t_all = time.perf_counter() - t0

    # sgemm peak, same process, same threads
    A = np.random.default_rng(0).random((4096, 4096), dtype=np.float32)
    A @ A
    peak = max(2 * 4096**3 / _timed(lambda: A @ A) for _ in range(3)) / 1e9
    useful = sum(2.0 * nnz * K for K, _, _ in log)
    executed = sum(2.0 * (n * m if meth in ("dense-chunks", "dense") else nnz) * K for K, _, meth in log)
    t_prod = sum(s for _, s, _ in log)
    methods = sorted({meth for _, _, meth in log})
    _save(workdir, name, {
        "seconds": t_all, "factorize_seconds": t_fit, "best_k": best, "stability": stab,
        "n_fits": len(fits), "iters": [f.n_iter for f in fits], "density": nnz / (n * m),
        "sgemm_peak_gflops": peak, "products_seconds": t_prod, "products_useful_gflops": useful / t_prod / 1e9,
        "products_executed_gflops": executed / t_prod / 1e9, "solver_useful_gflops": useful / t_fit / 1e9,
        "solver_executed_gflops": executed / t_fit / 1e9,
        "n_products": len(log), "product_methods": methods,
    }, spectra=cons[best], spectra6=cons[6], labels=W.argmax(1), genes=np.asarray(a.var_names, dtype=str))


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def worker_tardis_pipeline(workdir: Path) -> None:
    import numpy as np
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tardis_exp.pipeline import run

    root = workdir / "pipeline"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"paths.root_dir={root}", f"paths.run_dir={root}/run", "tracking.enabled=false",
            "tracking.log_plots=false", "save_result=false"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    t0 = time.perf_counter()
    metrics = run(cfg, root / "run")
    dt = time.perf_counter() - t0
    _save(workdir, "tardis_pipeline", {"seconds": dt, "best_k": int(metrics["best_k"]),
                                       "program_recovery": metrics.get("program_recovery", np.nan),
                                       "ari": metrics.get("ari_truth", np.nan)})


def _worker_sklearn(workdir: Path, solver: str) -> None:
    import anndata as ad
    import numpy as np
    from sklearn.decomposition import NMF

    a = ad.read_h5ad(workdir / "hvg.h5ad")
    X = np.asarray(a.X.toarray(), dtype=np.float32)  # dense: sklearn's faster path, as the seed does
    times, H6, W6 = {}, None, None
    for k in GRID_KS:
        m = NMF(n_components=k, solver=solver, init="random", random_state=0, max_iter=1000, tol=1e-4)
        t = time.perf_counter()
        W = m.fit_transform(X)
        times[k] = time.perf_counter() - t
        if k == 6:
            H6, W6 = m.components_, W
    per_rep = sum(times.values())
    _save(workdir, f"sklearn_{solver}", {
        "seconds_measured": per_rep, "seconds": per_rep * GRID_REPS, "per_k": times,
        "note": f"1 replicate per k measured ({len(GRID_KS)} fits), x{GRID_REPS} extrapolated",
    }, spectra6=H6, labels6=W6.argmax(1), genes=np.asarray(a.var_names, dtype=str))


# ------------------------------------------------------------------ workers (their own venvs)


def worker_seed(workdir: Path) -> None:
    import numpy as np
    import anndata as ad
    from tardis_spac.utils.preprocess import nmf_clustering, nmf_consensus

    adata = ad.read_h5ad(workdir / "lognorm.h5ad")
    t0 = time.perf_counter()
    a = nmf_clustering(adata, n_components=50)
    t1 = time.perf_counter()
    a = nmf_consensus(a)
    t2 = time.perf_counter()
    cols = sorted((c for c in a.obs.columns if c.startswith("nmf_cluster_")), key=lambda c: int(c.rsplit("_", 1)[1]))
    k = len(cols)
    # the seed keeps no cluster labels of its components: redo its own (deterministic) last clustering
    from sklearn.cluster import AgglomerativeClustering

    U = a.obsm["X_nmf"]
    C = np.corrcoef(U.T)
    lab = AgglomerativeClustering(n_clusters=k).fit(C).labels_
    H = np.asarray(a.uns["X_nmf_components"])
    spectra = np.stack([H[lab == c].mean(0) for c in range(k)])
    labels = np.asarray(a.obs[cols]).argmax(1)
    _save(workdir, "seed", {"seconds": t2 - t0, "factorize_seconds": t1 - t0, "best_k": k,
                            "note": "spectra = mean of each cluster's components"},
          spectra=spectra, labels=labels, genes=np.asarray(a.var_names, dtype=str))


def worker_cnmf(workdir: Path) -> None:
    import numpy as np
    from cnmf import cNMF
    from cnmf.cnmf import load_df_from_npz

    out = workdir / "cnmf_out"
    obj = cNMF(output_dir=str(out), name="grid")
    t0 = time.perf_counter()
    obj.prepare(counts_fn=str(workdir / "counts.h5ad"), components=np.array(GRID_KS), n_iter=GRID_REPS,
                seed=14, genes_file=str(workdir / "genes.txt"), init="random", max_NMF_iter=1000)
    t1 = time.perf_counter()
    obj.factorize(worker_i=0, total_workers=1)
    t2 = time.perf_counter()
    obj.combine()
    obj.k_selection_plot(close_fig=True)
    t3 = time.perf_counter()
    stats = load_df_from_npz(obj.paths["k_selection_stats"])
    stab = {int(k): float(s) for k, s in zip(stats["k"], stats["silhouette"])}
    best = _pick_k(stab)
    arrays = {}
    for k in sorted({best, 6}):
        obj.consensus(k, density_threshold=0.1, show_clustering=False, close_clustergram_fig=True)
        spec = load_df_from_npz(obj.paths["consensus_spectra"] % (k, "0_1"))
        use = load_df_from_npz(obj.paths["consensus_usages"] % (k, "0_1"))
        arrays["spectra" if k == best else "spectra6"] = spec.values
        arrays["genes" if k == best else "genes6"] = np.asarray(spec.columns, dtype=str)
        arrays["labels" if k == best else "labels6"] = use.values.argmax(1)
        if k == best == 6:
            arrays.update(spectra6=spec.values, genes6=arrays["genes"], labels6=arrays["labels"])
    t4 = time.perf_counter()
    _save(workdir, "cnmf", {"seconds": t4 - t0, "factorize_seconds": t2 - t1, "best_k": best, "stability": stab,
                            "made": _dt.datetime.now().isoformat(timespec="seconds"),
                            "timings": {"prepare": t1 - t0, "factorize": t2 - t1, "combine+k_selection": t3 - t2,
                                        "consensus": t4 - t3}}, **arrays)


WORKERS = {"tardis_pipeline": worker_tardis_pipeline, "tardis_grid": worker_tardis_grid,
           "tardis_grid_cnmf": lambda w: worker_tardis_grid(w, "tardis_grid_cnmf", "hvg_cnmf.h5ad"),
           "sklearn_mu": lambda w: _worker_sklearn(w, "mu"), "sklearn_cd": lambda w: _worker_sklearn(w, "cd"),
           "seed": worker_seed, "cnmf": worker_cnmf}


# ------------------------------------------------------------------ environments


def ensure_env(envs: Path, name: str) -> Path:
    """A venv under ``envs`` with the tool installed (and the seed's import patched)."""
    py = envs / name / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(envs / name)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *ENV_PINS[name], "threadpoolctl"], check=True)
    if name == "seed":
        # tardis-spac 0.8.0: utils/preprocess.py uses Path in a type hint without importing it
        loc = subprocess.run([str(py), "-c", "import importlib.util as u; "
                              "print(u.find_spec('tardis_spac').submodule_search_locations[0])"],
                             capture_output=True, text=True, check=True).stdout.strip()
        f = Path(loc) / "utils" / "preprocess.py"
        src = f.read_text()
        if "from pathlib import Path" not in src:
            f.write_text("from pathlib import Path\n" + src)
    return py


def run_worker(name: str, workdir: Path, envs: Path, log) -> dict:
    py = Path(sys.executable) if name not in ENV_PINS else ensure_env(envs, name)
    env = dict(os.environ, MPLBACKEND="Agg", TARDIS_EXP_PROGRESS="0", PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    with open(workdir / f"{name}.log", "w") as fh:
        r = subprocess.run([str(py), __file__, "--worker", name, "--workdir", str(workdir)], env=env,
                           stdout=fh, stderr=subprocess.STDOUT, cwd=str(workdir))
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {r.returncode}); see {workdir / (name + '.log')}")
    log(f"{name}: {time.perf_counter() - t:.1f}s")
    return json.loads((workdir / f"{name}.json").read_text())


# ------------------------------------------------------------------ quality and table


def quality(workdir: Path, name: str, truth) -> dict:
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    from tardis_exp.metrics import program_recovery

    f = workdir / f"{name}.npz"
    if not f.exists():
        return {}
    z = np.load(f)
    gene_index = {g: i for i, g in enumerate(truth["genes"])}
    out = {}
    for key, skey, lkey, gkey in (("", "spectra", "labels", "genes"), ("6", "spectra6", "labels6", "genes6")):
        if skey not in z:
            continue
        genes = z[gkey] if gkey in z else z["genes"]
        tp = truth["true_program"][[gene_index[g] for g in genes]]
        out[f"recovery{key}"], _ = program_recovery(z[skey], tp)
        if lkey in z:
            out[f"ari{key}"] = float(adjusted_rand_score(truth["true_domain"], z[lkey]))
    return out


def _fmt(v, spec=".3f"):
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return format(v, spec) if isinstance(v, float) else str(v)


def make_table(workdir: Path, res: dict) -> str:
    import numpy as np

    truth = np.load(workdir / "truth.npz")
    q = {name: quality(workdir, name, truth) for name in res}
    # each tool against the tardis_exp row that ran on the same input
    ref = {"sklearn_mu": "tardis_grid", "sklearn_cd": "tardis_grid", "cnmf": "tardis_grid_cnmf",
           "seed": "tardis_pipeline"}
    rows = []
    labels = {"tardis_pipeline": "tardis_exp, full default pipeline (10 replicates of k=10, consensus, score)",
              "tardis_grid": "tardis_exp, cNMF grid (140 fits in one batch) + K selection + consensus; "
                             "log-normalized HVGs",
              "tardis_grid_cnmf": "tardis_exp, the same on cNMF's input (unit-variance counts of the same HVGs)",
              "sklearn_mu": "scikit-learn NMF MU float32, cNMF grid (extrapolated); log-normalized HVGs",
              "sklearn_cd": "scikit-learn NMF CD float32, cNMF grid (extrapolated); log-normalized HVGs",
              "seed": "seed tardis-spac: nmf_consensus(nmf_clustering(n_components=50))",
              "cnmf": "cNMF 1.7.1, cNMF grid (prepare+factorize+combine+k_selection+consensus)"}
    for name in TOOLS:
        if name not in res:
            continue
        r, qq = res[name], q[name]
        rec = r.get("program_recovery", qq.get("recovery"))
        ari = r.get("ari", qq.get("ari", qq.get("ari6")))  # sklearn rows: at k=6
        base = res.get(ref.get(name, ""), {}).get("seconds")
        ratio = r["seconds"] / base if base else None
        rows.append(
            f"| {labels[name]} | {r['seconds']:.1f} | {_fmt(r.get('factorize_seconds'), '.1f')} | "
            f"{_fmt(r.get('peak_rss_mb'), '.0f')} | {_fmt(r.get('best_k'))} | {_fmt(rec)} | {_fmt(qq.get('recovery6'))} | "
            f"{_fmt(ari)} | {_fmt(ratio, '.1f')}{'x' if ratio else ''} |")
    head = ("| tool | wall s | factorize s | peak RSS MB | best K | recovery (best K) | recovery (k=6) | ARI | "
            "time / tardis_exp on the same input |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head, *rows, "", "Same input: scikit-learn rows against the log-normalized grid row, cNMF against "
             "the cNMF-input grid row, the seed against the default pipeline."]
    grid = {}
    for gname in ("tardis_grid", "tardis_grid_cnmf"):
        grid = res.get(gname)
        if not grid:
            continue
        peak = grid["sgemm_peak_gflops"]
        lines += [
            "",
            f"Solver, {gname} ({grid['n_fits']} fits, X {grid['density']:.1%} non-zero CSR, products: "
            f"{', '.join(grid['product_methods'])}): measured sgemm peak {peak:.1f} GFLOP/s (4096³ float32, "
            f"same process). Whole solver (factorize wall time): "
            f"{grid.get('solver_executed_gflops', float('nan')):.1f} GFLOP/s executed = "
            f"{grid.get('solver_executed_gflops', float('nan')) / peak:.0%} of peak, "
            f"{grid['solver_useful_gflops']:.1f} GFLOP/s counting stored entries only (2·nnz·K) = "
            f"{grid['solver_useful_gflops'] / peak:.0%}. Fat products alone: "
            f"{grid['products_executed_gflops']:.1f} executed ({grid['products_executed_gflops'] / peak:.0%}), "
            f"{grid['products_useful_gflops']:.1f} useful ({grid['products_useful_gflops'] / peak:.0%}); "
            f"products {grid['products_seconds']:.1f} s of {grid['factorize_seconds']:.1f} s factorize; "
            f"mean iterations {sum(grid['iters']) / len(grid['iters']):.0f}.",
            "",
            f"Stability (silhouette) per k, {gname}: " + ", ".join(
                f"{k}: {v:.3f}" for k, v in grid["stability"].items()),
        ]
    if "cnmf" in res:
        c = res["cnmf"]
        lines += ["", "Stability per k: cNMF " + ", ".join(f"{k}: {v:.3f}" for k, v in c["stability"].items()),
                  "", f"cNMF row made {c.get('made')} (timings {json.dumps({k: round(v, 1) for k, v in c['timings'].items()})})."]
    for name in ("sklearn_mu", "sklearn_cd"):
        if name in res:
            lines += ["", f"{name}: {res[name]['note']}; measured {res[name]['seconds_measured']:.1f} s; recovery at k=6."]
    # every tool's own subprocess (cNMF's and the seed's in their own venvs): a BLAS
    # running at a different thread count explains a different time
    lines += [""] + [f"BLAS (threadpoolctl, {name} worker): {json.dumps(r.get('threads'))}"
                     for name, r in res.items() if isinstance(r, dict) and "threads" in r]
    lines += [f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
              f"load average at start: {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench")
    ap.add_argument("--envs", type=Path, default=Path(os.environ.get("TARDIS_EXP_BENCH_ENVS",
                                                                     "/tmp/tardis_exp_bench_envs")))
    ap.add_argument("--only", nargs="*", choices=TOOLS, default=None)
    ap.add_argument("--rerun-cnmf", action="store_true", help="run cNMF even if its kept result exists")
    ap.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "bench_results.md")
    a = ap.parse_args(argv)
    if a.worker:
        WORKERS[a.worker](a.workdir.resolve())
        return 0

    workdir = a.workdir.resolve()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    load0 = os.getloadavg()[0]
    prepare_data(workdir)
    res = {}
    for name in a.only or TOOLS:
        if name == "cnmf" and (workdir / "cnmf.json").exists() and not a.rerun_cnmf:
            res[name] = json.loads((workdir / "cnmf.json").read_text())
            log(f"cnmf: kept result from {res[name].get('made')}")
            continue
        res[name] = run_worker(name, workdir, a.envs, log)
    table = make_table(workdir, res)
    cmd = "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = (f"# Benchmark results\n\nMade by `{cmd.strip()}` on {_dt.date.today()} "
           f"({os.cpu_count()} CPUs, load average {load0:.2f} at start).\n\n{table}\n")
    print(table)
    if a.only is None:
        a.out.write_text(doc)
        log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
