#!/usr/bin/env python
"""Warm starts across ranks: rank k+1 from rank k's factors, against cold starts, in one run.

On the default data (3,600 spots x 2,000 HVGs, CSR), ``--replicates`` factorizations of
every rank in ``--ks`` (cNMF's grid) by :func:`tardis_exp.nmf.fit_rank_ladder`:
``cold`` -- every (rank, replicate) from its own random start, all in one batch;
``warm`` -- rank by rank, replicate r of rank k+1 starting from replicate r of rank k plus
a new random component. Both with the pipeline's stopping rule (``--tol``, check every 10
iterations), in subprocesses with BLAS and numba pinned to ``--threads``, alternating
``--repeats`` times (cold, warm, warm, cold, ...) so that load from other jobs hits both.

Reported: seconds (median over repeats), iterations per rank, best loss per rank, and the
effect on the consensus: the components consensus (default settings) run on the
replicates of the largest rank from each mode, its best K and program recovery.

Usage::

    python scripts/bench_warm_start.py                       # k = 4..10, 4 replicates, HALS
    python scripts/bench_warm_start.py --solver mu --replicates 10
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def worker(spec):
    import numba
    from threadpoolctl import threadpool_info, threadpool_limits

    from tardis_exp.nmf import fit_batch, fit_rank_ladder

    import anndata as ad

    numba.set_num_threads(min(spec["threads"], numba.config.NUMBA_NUM_THREADS))
    with threadpool_limits(limits=spec["threads"]):
        a = ad.read_h5ad(spec["data"])
        fit_batch(a.X[:50], [2], [0], solver=spec["solver"], max_iter=2, tol=0, progress=False)  # compile
        t = time.perf_counter()
        fits = fit_rank_ladder(a.X, spec["ks"], spec["replicates"], 0, warm_start=spec["warm"],
                               solver=spec["solver"], tol=spec["tol"], max_iter=spec["max_iter"], progress=False,
                               warn=False)
        dt = time.perf_counter() - t
        threads = [{k: d.get(k) for k in ("internal_api", "num_threads", "version")} for d in threadpool_info()]
    return {"seconds": dt, "threads": threads,
            "iterations": {k: [f.n_iter for f in v] for k, v in fits.items()},
            "errors": {k: [f.error for f in v] for k, v in fits.items()},
            "components": {max(fits): [f.H for f in fits[max(fits)]]}}


def consensus_quality(data, comps):
    import warnings

    import anndata as ad
    import numpy as np

    from tardis_exp.consensus import consensus
    from tardis_exp.metrics import program_recovery

    a = ad.read_h5ad(data)
    a.uns["nmf"] = {"components": np.stack(comps)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        consensus(a, progress=False)
    c = a.uns["nmf_consensus"]
    rec, _ = program_recovery(c["spectra"], a.var["true_program"].astype(str).to_numpy())
    return {"best_k": int(c["best_k"]), "program_recovery": float(rec), "n_outliers": int(c["n_outliers"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", type=int, nargs="+", default=list(range(4, 11)))
    ap.add_argument("--replicates", type=int, default=4)
    ap.add_argument("--solver", default="hals")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_warm_start")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.out.write_bytes(pickle.dumps(worker(json.loads(a.worker.read_text()))))
        return 0
    import numpy as np

    from tardis_exp.preprocess import preprocess
    from tardis_exp.synthetic import make_synthetic

    wd = a.workdir.resolve()
    wd.mkdir(parents=True, exist_ok=True)
    data = wd / "default.h5ad"
    preprocess(make_synthetic()).write_h5ad(data)
    load0 = os.getloadavg()[0]
    runs = {"cold": [], "warm": []}
    order = []
    for r in range(a.repeats):
        order += ["cold", "warm"] if r % 2 == 0 else ["warm", "cold"]
    for i, mode in enumerate(order):
        spec = {"data": str(data), "ks": a.ks, "replicates": a.replicates, "solver": a.solver, "tol": a.tol,
                "max_iter": a.max_iter, "threads": a.threads, "warm": mode == "warm"}
        (wd / f"{i}.json").write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), NUMBA_NUM_THREADS=str(a.threads))
        subprocess.run([sys.executable, __file__, "--worker", str(wd / f"{i}.json"), "--out", str(wd / f"{i}.pkl")],
                       check=True, env=env)
        runs[mode].append(pickle.loads((wd / f"{i}.pkl").read_bytes()))
        print(f"{mode}: {runs[mode][-1]['seconds']:.1f}s", file=sys.stderr, flush=True)
    kmax = max(a.ks)
    lines = [f"`python scripts/bench_warm_start.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
             .replace(" `", "`"), "",
             f"Default data, {a.replicates} replicates x k = {a.ks[0]}..{kmax}, solver {a.solver}, tol {a.tol:g}; "
             f"BLAS and numba pinned to {a.threads} thread(s) in each subprocess; {a.repeats} repeats, alternating; "
             f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end.", "",
             "| mode | seconds (median) | iterations per rank (sum over replicates) | best loss per rank "
             f"| consensus on the k = {kmax} replicates: best K, program recovery |", "|---|---|---|---|---|"]
    res = {}
    for mode, rs in runs.items():
        r0 = rs[0]
        q = consensus_quality(data, r0["components"][kmax])
        res[mode] = {"seconds": [r["seconds"] for r in rs], "iterations": r0["iterations"],
                     "errors": r0["errors"], "consensus": q, "threads": r0["threads"]}
        lines.append(f"| {mode} | {np.median(res[mode]['seconds']):.1f} | "
                     + ", ".join(f"{k}: {sum(v)}" for k, v in r0["iterations"].items()) + " | "
                     + ", ".join(f"{k}: {min(v):.2f}" for k, v in r0["errors"].items())
                     + f" | {q['best_k']}, {q['program_recovery']:.3f} |")
    ratios = [c["seconds"] / w["seconds"] for c, w in zip(runs["cold"], runs["warm"])]
    lines += ["", f"- cold / warm seconds: {np.median(ratios):.2f}x (per repeat: "
              + ", ".join(f"{x:.2f}" for x in ratios) + ")",
              f"- threadpoolctl in the workers: {json.dumps(res['warm']['threads'])}"]
    (wd / "result.json").write_text(json.dumps(res, indent=1, default=float))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
