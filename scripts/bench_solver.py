#!/usr/bin/env python
"""Time to a converged loss: batched HALS, batched MU, scikit-learn CD and MU, in one run.

On one matrix (default: the default synthetic data through the default preprocessing,
3,600 spots x 2,000 HVGs, CSR), ``--replicates`` factorizations of rank ``--rank``
from the same seeds -- and for scikit-learn from the very same starting points
(``init='custom'`` with :func:`tardis_exp.nmf._random_init`) -- are run with the
stopping rule off, recording the loss after every iteration:

batched HALS / batched MU
    :func:`tardis_exp.nmf.fit_batch` (``solver='hals'`` / ``'mu'``), every replicate in
    one batch, ``tol=0``, ``check_every=1``, ``trace=True`` (the loss of every iteration
    from the products already made, with its wall time).
scikit-learn CD / MU
    ``sklearn.decomposition.NMF(solver=..., init='custom', tol=0)`` one replicate at a
    time, on dense float32 ``X`` (its faster path), on the first ``--sklearn-replicates``
    seeds, with ``max_iter`` on a ladder (x1.5 per rung): the time to target is the time
    of the first rung whose final loss reaches it (an upper bound, at most 1.5x).

Target (per seed): ``(1 + 1e-4)`` times the lowest loss any solver reached from that
seed. Time to target of a batch: when its last replicate reaches its target; per
factorization: that time divided by the number of replicates. Also reported: the
iterations, the GFLOP/s of the fat products (``2 * nnz(X) * K`` per product for the
batched solvers, ``2 * n * m * k`` for scikit-learn's dense products), and what the
stopping rule would have done at several ``tol``: the iteration it stops at and the gap
to the target loss then.

``--pipeline`` also runs the default pipeline (tracking off) once per batched solver and
reports best K and program recovery against the planted programs.

Usage::

    python scripts/bench_solver.py                        # default data, 8 x rank 6
    python scripts/bench_solver.py --rank 10 --replicates 10 --pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_REL = 1e-4


def _threads():
    from threadpoolctl import threadpool_info

    return [{k: d.get(k) for k in ("internal_api", "num_threads", "version")} for d in threadpool_info()]


def default_matrix():
    from tardis_exp.preprocess import preprocess
    from tardis_exp.synthetic import make_synthetic

    a = preprocess(make_synthetic())
    return a.X


def first_reach(trace, target):
    """(iteration, seconds) of the first trace entry at or below target, or None."""
    for it, t, e in trace:
        if e <= target:
            return it, t
    return None


def simulate_stop(trace, tol, check_every=10):
    """Iteration and loss where the stopping rule with ``tol`` would stop on this trace."""
    errs = {it: e for it, _, e in trace}
    last = max(errs)
    for it in range(check_every, last + 1, check_every):
        if (errs[it - check_every] - errs[it]) < tol * errs[it]:
            return it, errs[it]
    return None, errs[last]


def run_batched(X, solver, ranks, seeds, max_iter, **kw):
    from tardis_exp.nmf import fit_batch

    t0 = time.perf_counter()
    fits = fit_batch(X, ranks, seeds, solver=solver, max_iter=max_iter, tol=0, check_every=1, trace=True,
                     progress=False, **kw)
    return fits, time.perf_counter() - t0


def run_sklearn(Xd, solver, rank, seed, ladder):
    import warnings

    from sklearn.decomposition import NMF

    from tardis_exp.nmf import _random_init

    W0, H0 = _random_init(Xd, rank, seed, None, *Xd.shape)
    out = []
    for it in ladder:
        m = NMF(rank, solver=solver, init="custom", max_iter=it, tol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            m.fit_transform(Xd, W=W0.copy(), H=H0.copy())
            dt = time.perf_counter() - t
        out.append((it, dt, float(m.reconstruction_err_)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=6)
    ap.add_argument("--replicates", type=int, default=8)
    ap.add_argument("--hals-iter", type=int, default=400)
    ap.add_argument("--mu-iter", type=int, default=1500)
    ap.add_argument("--sklearn-replicates", type=int, default=2)
    ap.add_argument("--sklearn-max-iter", type=int, default=1500)
    ap.add_argument("--pipeline", action="store_true")
    ap.add_argument("--hals-alphas", type=float, nargs="*", default=[],
                    help="also run batched HALS with these inner-repetition alphas (0 = one sweep)")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_solver.json")
    a = ap.parse_args(argv)

    import numpy as np
    import scipy.sparse as sp

    from tardis_exp.nmf import derive_seeds, prepare_matrix

    X = prepare_matrix(default_matrix())
    n, m = X.shape
    nnz = X.nnz if sp.issparse(X) else n * m
    R, k = a.replicates, a.rank
    seeds = derive_seeds(0, R)
    ranks = [k] * R
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    load0 = os.getloadavg()[0]
    # warm the numba kernels outside the timings
    from tardis_exp.nmf import fit_batch

    fit_batch(X[:50], [2], [0], solver="hals", max_iter=2, tol=0, progress=False)
    fit_batch(X[:50], [2], [0], solver="mu", max_iter=2, tol=0, progress=False)

    res = {"shape": [n, m], "density": nnz / (n * m), "rank": k, "replicates": R, "load_average_start": load0,
           "cpus": os.cpu_count(), "threads": _threads(), "solvers": {}}
    traces = {}
    runs = [("hals", a.hals_iter, None), ("mu", a.mu_iter, None)]
    runs += [("hals", a.hals_iter, alpha) for alpha in a.hals_alphas]
    for solver, iters, alpha in runs:
        kw = {} if alpha is None else {"hals_alpha": alpha}
        fits, dt = run_batched(X, solver, ranks, seeds, iters, **kw)
        if alpha is not None:
            solver = f"hals alpha={alpha:g}"
        traces[f"batched {solver}"] = {i: f.trace for i, f in enumerate(fits)}
        res["solvers"][f"batched {solver}"] = {"seconds": dt, "iterations": iters,
                                              "gflops": 2 * 2.0 * nnz * k * R * iters / dt / 1e9}
        log(f"batched {solver}: {iters} iterations in {dt:.1f}s")
    Xd = X.toarray() if sp.issparse(X) else X
    ladder = []
    it = 10
    while it < a.sklearn_max_iter:
        ladder.append(int(it))
        it *= 1.5
    ladder.append(a.sklearn_max_iter)
    for solver in ("cd", "mu"):
        name = f"sklearn {solver}"
        traces[name] = {}
        for i in range(min(a.sklearn_replicates, R)):
            traces[name][i] = run_sklearn(Xd, solver, k, seeds[i], ladder)
            log(f"{name} seed {i}: ladder up to {ladder[-1]} in {sum(t for _, t, _ in traces[name][i]):.1f}s")
        last = [tr[-1] for tr in traces[name].values()]
        res["solvers"][name] = {"seconds_per_iteration": float(np.mean([t / it for it, t, _ in last])),
                                "gflops": float(np.mean([2 * 2.0 * n * m * k * it / t / 1e9 for it, t, _ in last]))}

    # per-seed targets: the best loss any solver reached from that seed
    best = {i: min(min(e for _, _, e in tr[i]) for tr in traces.values() if i in tr) for i in range(R)}
    res["best_loss"] = best
    res["best_loss_matrix"] = min(best.values())
    for name, tr in traces.items():
        reach = {i: first_reach(tr[i], best[i] * (1 + TARGET_REL)) for i in tr}
        got = [v for v in reach.values() if v is not None]
        s = res["solvers"][name]
        s["reached"] = f"{len(got)}/{len(reach)}"
        s["iterations_to_target"] = {i: (v[0] if v else None) for i, v in reach.items()}
        if name.startswith("batched"):
            s["seconds_to_target_batch"] = max(v[1] for v in got) if len(got) == len(reach) else None
            s["seconds_to_target_per_factorization"] = (s["seconds_to_target_batch"] / R
                                                        if s["seconds_to_target_batch"] else None)
            mat = [first_reach(tr[i], res["best_loss_matrix"] * (1 + TARGET_REL)) for i in tr]
            s["seconds_to_matrix_target_best_replicate"] = min((v[1] for v in mat if v), default=None)
            s["final_loss_median"] = float(np.median([tr[i][-1][2] for i in tr]))
            s["stop_rule"] = {}
            for tol in (1e-4, 1e-5, 1e-6):
                stops = [simulate_stop(tr[i], tol) for i in tr]
                gaps = [e / best[i] - 1 for i, (_, e) in zip(tr, stops)]
                s["stop_rule"][f"{tol:g}"] = {
                    "mean_iterations": float(np.mean([it if it else np.nan for it, _ in stops])),
                    "stopped": sum(it is not None for it, _ in stops),
                    "max_gap_to_best": float(max(gaps)), "median_gap_to_best": float(np.median(gaps))}
        else:
            s["seconds_to_target_per_factorization"] = (float(np.mean([v[1] for v in got]))
                                                        if len(got) == len(reach) else None)
    h, mu = res["solvers"]["batched hals"], res["solvers"]["batched mu"]
    ratios = {}
    for other in ("batched mu", "sklearn cd", "sklearn mu"):
        o = res["solvers"][other].get("seconds_to_target_per_factorization")
        if o and h["seconds_to_target_per_factorization"]:
            ratios[f"{other} / batched hals (time to target per factorization)"] = \
                o / h["seconds_to_target_per_factorization"]
    res["ratios"] = ratios
    del mu

    if a.pipeline:
        res["pipeline"] = {s: pipeline_quality(s) for s in ("hals", "mu")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1, default=float))
    print(report(res, argv if argv is not None else sys.argv[1:]))
    return 0


def pipeline_quality(solver):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tardis_exp.pipeline import run

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                f"paths.root_dir={tmp}", f"paths.run_dir={tmp}/run", "tracking.enabled=false",
                "tracking.log_plots=false", "save_result=false", f"factorize.solver={solver}"])
        cfg = OmegaConf.to_container(cfg, resolve=True)
        t = time.perf_counter()
        metrics = run(cfg, Path(tmp) / "run")
        dt = time.perf_counter() - t
    return {"seconds": dt, "best_k": int(metrics["best_k"]), "program_recovery": float(metrics["program_recovery"]),
            "ari_truth": float(metrics.get("ari_truth", float("nan")))}


def report(res, argv) -> str:
    f = lambda v, spec=".2f": "–" if v is None else format(v, spec)  # noqa: E731
    lines = [f"`python scripts/bench_solver.py {' '.join(argv)}`".replace(" `", "`"), "",
             f"Matrix {res['shape'][0]} x {res['shape'][1]} ({res['density']:.0%} non-zero), "
             f"{res['replicates']} replicates of rank {res['rank']}; target = (1 + 1e-4) x the best loss any "
             f"solver reached from the same seed; {res['cpus']} CPUs, load average {res['load_average_start']:.1f} "
             "at start.", "",
             "| solver | reached target | median iterations to target | s to target per factorization | GFLOP/s |",
             "|---|---|---|---|---|"]
    import numpy as np

    for name, s in res["solvers"].items():
        its = [v for v in s["iterations_to_target"].values() if v is not None]
        lines.append(f"| {name} | {s['reached']} | {f(float(np.median(its)) if its else None, '.0f')} | "
                     f"{f(s.get('seconds_to_target_per_factorization'), '.3f')} | {f(s['gflops'], '.1f')} |")
    lines += [""] + [f"- {k}: **{v:.1f}x**" for k, v in res["ratios"].items()]
    for name in ("batched hals", "batched mu"):
        s = res["solvers"][name]
        lines.append(f"- {name}, stopping rule (check_every=10) on the trace: " + "; ".join(
            f"tol={t}: stops {v['stopped']}/{res['replicates']} at {v['mean_iterations']:.0f} it, "
            f"gap to best max {v['max_gap_to_best']:.1e}" for t, v in s["stop_rule"].items()))
    if "pipeline" in res:
        for s, p in res["pipeline"].items():
            lines.append(f"- default pipeline, factorize.solver={s}: {p['seconds']:.1f} s, best K {p['best_k']}, "
                         f"program recovery {p['program_recovery']:.3f}, ARI {p['ari_truth']:.3f}")
    lines.append(f"- BLAS/OpenMP (threadpoolctl): {json.dumps(res['threads'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
