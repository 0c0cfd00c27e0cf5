#!/usr/bin/env python
"""Time to a converged loss: batched HALS, batched MU, scikit-learn CD and MU, in one run.

Matrices (``--data``): ``default`` -- the default synthetic data through the default
preprocessing (3,600 spots x 2,000 HVGs, CSR), ``--replicates`` factorizations of rank
``--rank``; ``grid`` -- the same matrix with the cNMF grid, ``--grid-replicates``
replicates of every k in ``--grid-ks`` (cNMF's tutorial: 20 x k = 4..10, 140 fits).
Every factorization starts from :func:`tardis_exp.nmf._random_init` of its seed, the
same point for every solver (scikit-learn: ``init='custom'``).

Solvers, each run in its own subprocess with BLAS (threadpoolctl) and numba pinned to
``--threads`` threads, the pool's settings recorded inside that subprocess:

batched HALS / batched MU
    :func:`tardis_exp.nmf.fit_batch` (``solver='hals'`` / ``'mu'``), every factorization
    of the matrix in one batch, stopping rule off, the loss at every iteration
    (``check_every=1, trace=True``), each factorization stopped once it reaches its target
    (``stop_at``).
scikit-learn CD / MU
    ``sklearn.decomposition.NMF(solver=..., init='custom', tol=0)`` on dense float32 ``X``
    (its faster path), one factorization at a time (``--sklearn-fits`` of them, spread
    over the ranks), run in chunks of ``--sklearn-chunk`` iterations, each chunk starting
    from the previous one's factors: both solvers keep no state but ``(W, H)`` between
    iterations (no shuffling, no momentum), so the chained run is the same iteration
    sequence as one long run, with its loss after every chunk; the per-call overhead is
    counted against scikit-learn.

Target (per factorization): ``(1 + 1e-4)`` times the lowest loss any solver reached from
that starting point. A reference batched-HALS run to ``--hals-iter`` iterations comes first
and sets a provisional target at which the timed runs stop; the final targets are taken
from all runs afterwards, and a run that stopped above its final target counts as not
reaching it. The timed runs are repeated ``--repeats`` times, the order of the solvers
rotating each round so that load from other jobs on the machine hits them alike; the
reported figures are medians over the rounds, the ratios medians of the ratios within a
round. Time to target of a batch: when its last factorization reaches its target; per
factorization: that time divided by the number of factorizations. GFLOP/s counts the fat
products only (``2 * nnz(X) * K`` per product for the batched solvers on CSR X,
``2 * n * m * k`` for scikit-learn's dense products).

``--solvers`` restricts the timed rounds to some of the four (batched HALS always runs, the
reference of the ratios). The stopping rule of :func:`tardis_exp.nmf.fit_batch` is replayed
on full traces (no ``stop_at``) of batched HALS (the reference run) and, with
``--replay-mu N``, of a batched-MU run of ``N`` iterations: for ``tol`` in 1e-4, 1e-5,
1e-6, the iteration where each factorization would stop and its loss's gap to the best
loss any solver reached from its start.

``--pipeline`` also runs the default pipeline (tracking off) once per batched solver and
reports best K and program recovery against the planted programs.

Usage::

    python scripts/bench_solver.py                                  # default data, 8 x rank 6
    python scripts/bench_solver.py --data grid --grid-replicates 4  # a smaller cNMF grid
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_REL = 1e-4
SOLVERS = ("batched hals", "batched mu", "sklearn cd", "sklearn mu")


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


def simulate_stop(trace, tol, check_every=10, rule="change"):
    """Iteration and loss where a stopping rule with ``tol`` would stop on this trace.

    ``'change'``: :func:`tardis_exp.nmf.fit_batch`'s rule, the loss improved by less than
    ``tol`` (relative) over the last ``check_every`` iterations. ``'extrapolated'``: the
    last window's improvement ``d2`` extrapolated as a geometric series with the ratio
    ``q = d2 / d1`` of the last two windows -- the estimated distance to the limit
    ``d2 / (1 - q)`` -- below ``tol`` (never earlier than ``'change'``)."""
    errs = {it: e for it, _, e in trace}
    last = max(errs)
    c = check_every
    for it in range(c, last + 1, c):
        if it - c not in errs or it not in errs:
            continue
        d2 = errs[it - c] - errs[it]
        if rule == "change":
            gap = d2
        else:
            if it - 2 * c not in errs:
                continue
            d1 = errs[it - 2 * c] - errs[it - c]
            q = d2 / d1 if d1 > 0 else 0.0
            gap = d2 / (1 - q) if q < 1 else float("inf")
        if gap < tol * errs[it]:
            return it, errs[it]
    return None, errs[last]


# ---------------------------------------------------------------- worker (one subprocess per solver run)


def worker(spec: dict) -> dict:
    import warnings

    import numba
    import numpy as np
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    from tardis_exp.nmf import _random_init, fit_batch, prepare_matrix

    nt = spec["threads"]
    numba.set_num_threads(min(nt, numba.config.NUMBA_NUM_THREADS))
    with threadpool_limits(limits=nt):
        X = prepare_matrix(sp.load_npz(spec["matrix"]))
        ranks, seeds, stop = spec["ranks"], spec["seeds"], spec.get("stop_at")
        solver = spec["solver"]
        out = {"threads": _threads(), "numba_threads": numba.get_num_threads(), "traces": {}}
        if solver.startswith("batched"):
            name = solver.split()[1]
            fit_batch(X[:50], [2], [0], solver=name, max_iter=2, tol=0, progress=False)  # compile outside timing
            t0 = time.perf_counter()
            fits = fit_batch(X, ranks, seeds, solver=name, max_iter=spec["max_iter"], tol=0, check_every=1,
                             trace=True, progress=False, warn=False, stop_at=stop)
            out["seconds"] = time.perf_counter() - t0
            out["traces"] = {str(i): f.trace for i, f in enumerate(fits)}
            out["iterations"] = [f.n_iter for f in fits]
        else:
            from sklearn.decomposition import NMF

            Xd = X.toarray() if sp.issparse(X) else X
            chunk = spec["chunk"]
            total = 0.0
            for i in spec["fits"]:
                W, H = _random_init(Xd, ranks[i], seeds[i], None, *Xd.shape)
                tr, t, it = [], 0.0, 0
                while it < spec["max_iter"]:
                    m = NMF(ranks[i], solver=solver.split()[1], init="custom", max_iter=chunk, tol=0)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t1 = time.perf_counter()
                        W = m.fit_transform(Xd, W=W, H=H)
                        t += time.perf_counter() - t1
                    H = m.components_
                    it += chunk
                    tr.append((it, t, float(m.reconstruction_err_)))
                    if stop is not None and tr[-1][2] <= stop[i]:
                        break
                out["traces"][str(i)] = tr
                total += t
            out["seconds"] = total
            out["iterations"] = [out["traces"][str(i)][-1][0] for i in spec["fits"]]
    return out


def run_job(spec: dict, workdir: Path, tag: str, reuse: bool = False) -> dict:
    sp_in, sp_out = workdir / f"{tag}.spec.json", workdir / f"{tag}.out.json"
    if reuse:  # --aggregate-only: the kept output of the same job
        if json.loads(sp_in.read_text()) != spec:
            raise SystemExit(f"{sp_in} was made with other settings; run without --aggregate-only")
        return json.loads(sp_out.read_text())
    sp_in.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), NUMBA_NUM_THREADS=str(spec["threads"]))
    subprocess.run([sys.executable, __file__, "--worker", str(sp_in), "--out", str(sp_out)], check=True, env=env)
    return json.loads(sp_out.read_text())


# ---------------------------------------------------------------- driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=("default", "grid"), default="default")
    ap.add_argument("--rank", type=int, default=6)
    ap.add_argument("--replicates", type=int, default=8)
    ap.add_argument("--grid-ks", type=int, nargs="+", default=list(range(4, 11)))
    ap.add_argument("--grid-replicates", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="BLAS and numba threads of every solver")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hals-iter", type=int, default=300)
    ap.add_argument("--mu-iter", type=int, default=2000)
    ap.add_argument("--sklearn-fits", type=int, default=2)
    ap.add_argument("--sklearn-max-iter", type=int, default=2000)
    ap.add_argument("--sklearn-chunk", type=int, default=10)
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS), metavar="SOLVER",
                    help=f"timed solvers, of {SOLVERS} (quote each; batched hals always runs)")
    ap.add_argument("--replay-mu", type=int, default=0, metavar="N",
                    help="also run batched MU for N iterations without a target and replay the stopping rule on it")
    ap.add_argument("--pipeline", action="store_true")
    ap.add_argument("--aggregate-only", action="store_true",
                    help="do not run: aggregate the outputs a run with the same settings kept in --workdir")
    ap.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_solver")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    bad = [s for s in a.solvers if s not in SOLVERS]
    if bad:
        ap.error(f"--solvers: unknown {bad}; choose from {SOLVERS}")
    timed = tuple(s for s in SOLVERS if s in a.solvers or s == "batched hals")
    if a.worker:
        a.out.write_text(json.dumps(worker(json.loads(a.worker.read_text()))))
        return 0

    import numpy as np
    import scipy.sparse as sp

    from tardis_exp.nmf import derive_seeds, prepare_matrix

    wd = a.workdir.resolve()
    wd.mkdir(parents=True, exist_ok=True)
    X = prepare_matrix(default_matrix())
    X = X if sp.issparse(X) else sp.csr_matrix(X)
    mpath = wd / "matrix.npz"
    sp.save_npz(mpath, X)
    n, m = X.shape
    if a.data == "default":
        ranks = [a.rank] * a.replicates
    else:
        ranks = [k for k in a.grid_ks for _ in range(a.grid_replicates)]
    F = len(ranks)
    seeds = derive_seeds(0, F)
    # scikit-learn's fits: spread over the factorizations (over the ranks on the grid)
    sk_fits = sorted({int(round(x)) for x in np.linspace(0, F - 1, a.sklearn_fits)})
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    base = {"matrix": str(mpath), "ranks": ranks, "seeds": seeds, "threads": a.threads}
    iters = {"batched hals": a.hals_iter, "batched mu": a.mu_iter, "sklearn cd": a.sklearn_max_iter,
             "sklearn mu": a.sklearn_max_iter}
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    reuse = a.aggregate_only
    ref = run_job({**base, "solver": "batched hals", "max_iter": a.hals_iter}, wd, "reference", reuse)
    log(f"reference batched hals: {a.hals_iter} iterations in {ref['seconds']:.1f}s")
    best = {i: min(e for _, _, e in ref["traces"][str(i)]) for i in range(F)}
    stop = [best[i] * (1 + TARGET_REL) for i in range(F)]
    mu_ref = None
    if a.replay_mu:
        mu_ref = run_job({**base, "solver": "batched mu", "max_iter": a.replay_mu}, wd, "reference_mu", reuse)
        log(f"reference batched mu: {a.replay_mu} iterations in {mu_ref['seconds']:.1f}s")
    rounds = []
    for r in range(a.repeats):
        nt = len(timed)
        order = timed[r % nt:] + timed[:r % nt]
        rnd = {}
        for s in order:
            spec = {**base, "solver": s, "max_iter": iters[s], "stop_at": stop, "fits": sk_fits,
                    "chunk": a.sklearn_chunk}
            rnd[s] = run_job(spec, wd, f"r{r}_{s.replace(' ', '_')}", reuse)
            log(f"round {r} {s}: {rnd[s]['seconds']:.1f}s, iterations {rnd[s]['iterations']}")
        rounds.append(rnd)
    wall = None if reuse else time.perf_counter() - t
    # final targets: the lowest loss any run reached from each starting point
    for rnd in rounds + [{"reference": ref, "reference_mu": mu_ref or {"traces": {}}}]:
        for out in rnd.values():
            for i, tr in out["traces"].items():
                best[int(i)] = min(best[int(i)], min(e for _, _, e in tr))
    target = {i: best[i] * (1 + TARGET_REL) for i in range(F)}
    nnz = X.nnz
    res = {"data": a.data, "shape": [n, m], "density": nnz / (n * m), "ranks": sorted(set(ranks)),
           "n_factorizations": F, "sklearn_fits": sk_fits, "threads_pinned": a.threads, "repeats": a.repeats,
           "load_average_start": load0, "load_average_end": os.getloadavg()[0], "cpus": os.cpu_count(),
           "wall_seconds": wall, "best_loss_median": float(np.median(list(best.values()))), "rounds": [], "solvers": {}}
    for rnd in rounds:
        row = {}
        for s, out in rnd.items():
            reach = {int(i): first_reach(tr, target[int(i)]) for i, tr in out["traces"].items()}
            ok = all(v is not None for v in reach.values())
            fits = list(reach)
            if s.startswith("batched"):
                t_fact = max(v[1] for v in reach.values()) / F if ok else None
                K_it = sum(ranks[i] * (reach[i][0] if reach[i] else iters[s]) for i in fits)
                flops = 2 * 2.0 * nnz * K_it
            else:
                t_fact = float(np.mean([v[1] for v in reach.values()])) if ok else None
                flops = sum(2 * 2.0 * n * m * ranks[i] * (reach[i][0] if reach[i] else iters[s]) for i in fits)
            t_all = (max(v[1] for v in reach.values()) if s.startswith("batched") else
                     sum(v[1] for v in reach.values())) if ok else None
            # not every factorization reached its target within max_iter: the run's time
            # (all of it spent before the last one got there) is a lower bound
            low = None if ok else (out["seconds"] / F if s.startswith("batched") else out["seconds"] / len(fits))
            row[s] = {"reached": f"{sum(v is not None for v in reach.values())}/{len(reach)}",
                      "seconds_to_target_per_factorization": t_fact,
                      "seconds_to_target_per_factorization_lower_bound": low,
                      "iterations_to_target_median": float(np.median([v[0] for v in reach.values() if v] or [np.nan])),
                      "gflops": flops / t_all / 1e9 if t_all else None,
                      "threads": out["threads"], "numba_threads": out["numba_threads"]}
        h = row["batched hals"]["seconds_to_target_per_factorization"]
        row["ratios"], row["ratio_lower_bounds"] = {}, {}
        for s in timed[1:]:
            o = row[s]["seconds_to_target_per_factorization"]
            lo = row[s]["seconds_to_target_per_factorization_lower_bound"]
            row["ratios"][f"{s} / batched hals"] = o / h if h and o else None
            row["ratio_lower_bounds"][f"{s} / batched hals"] = lo / h if h and lo else None
        res["rounds"].append(row)
    med = lambda v: float(np.median(v)) if v and all(x is not None for x in v) else None  # noqa: E731
    for s in timed:
        rs = [rw[s] for rw in res["rounds"]]
        res["solvers"][s] = {"reached": [x["reached"] for x in rs],
                             "seconds_to_target_per_factorization": med([x["seconds_to_target_per_factorization"]
                                                                         for x in rs]),
                             "iterations_to_target_median": med([x["iterations_to_target_median"] for x in rs]),
                             "gflops": med([x["gflops"] for x in rs]), "threads": rs[0]["threads"],
                             "numba_threads": rs[0]["numba_threads"]}
    res["ratios"] = {k: med([rw["ratios"][k] for rw in res["rounds"]]) for k in res["rounds"][0]["ratios"]}
    res["ratios_per_round"] = [rw["ratios"] for rw in res["rounds"]]
    res["ratio_lower_bounds_per_round"] = [rw["ratio_lower_bounds"] for rw in res["rounds"]]
    # the stopping rule replayed on the reference HALS run's full traces
    res["stop_rule"] = {}
    for name, run in (("batched hals", ref), ("batched mu", mu_ref)):
        if run is None:
            continue
        res["stop_rule"][name] = {"iterations_run": max(it for it, _, _ in run["traces"]["0"])}
        for rule, tol in [(r, t) for r in ("change", "extrapolated") for t in (1e-4, 1e-5, 1e-6)]:
            stops = [simulate_stop(run["traces"][str(i)], tol, rule=rule) for i in range(F)]
            gaps = [e / best[i] - 1 for i, (_, e) in enumerate(stops)]
            res["stop_rule"][name][f"{rule} {tol:g}"] = {
                "stopped": sum(it is not None for it, _ in stops),
                "mean_iterations": float(np.mean([it for it, _ in stops if it] or [np.nan])),
                "median_gap_to_best": float(np.median(gaps)), "max_gap_to_best": float(max(gaps))}
    if a.pipeline:
        res["pipeline"] = {s: pipeline_quality(s) for s in ("hals", "mu")}
    out = wd / f"result_{a.data}.json"
    out.write_text(json.dumps(res, indent=1, default=float))
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
             f"Matrix {res['shape'][0]} x {res['shape'][1]} ({res['density']:.0%} non-zero), {res['data']}: "
             f"{res['n_factorizations']} factorizations of rank {res['ranks']}; target = (1 + 1e-4) x the best loss "
             f"any solver reached from the same start; {res['repeats']} rounds, solvers rotating; BLAS and numba "
             f"pinned to {res['threads_pinned']} thread(s) in every solver's subprocess; {res['cpus']} CPUs, load "
             f"average {res['load_average_start']:.1f} at start, {res['load_average_end']:.1f} at end; "
             f"{f(res['wall_seconds'], '.0f')} s in all.", "",
             "| solver | reached target (per round) | median iterations to target | s to target per factorization "
             "| GFLOP/s (fat products) |", "|---|---|---|---|---|"]
    for name, s in res["solvers"].items():
        lines.append(f"| {name} | {', '.join(s['reached'])} | {f(s['iterations_to_target_median'], '.0f')} | "
                     f"{f(s['seconds_to_target_per_factorization'], '.3f')} | {f(s['gflops'], '.1f')} |")
    lines += [""] + [f"- {k} (time to target per factorization, median of rounds): **{f(v, '.1f')}x** "
                     f"(rounds: {', '.join(f(r[k], '.1f') for r in res['ratios_per_round'])})"
                     for k, v in res["ratios"].items()]
    for k in res["ratios"]:
        lows = [r[k] for r in res["ratio_lower_bounds_per_round"] if r[k]]
        if lows:
            lines.append(f"- {k}: not every factorization reached its target within max_iter in "
                         f"{len(lows)} round(s); the ratio is at least {', '.join(f(x, '.1f') for x in lows)}x there")
    for name, rule in res["stop_rule"].items():
        lines.append(f"- {name}, stopping rule (check_every=10) replayed on a run of {rule['iterations_run']} "
                     "iterations without target: " + "; ".join(
                         f"{t}: {v['stopped']}/{res['n_factorizations']} stopped, mean {v['mean_iterations']:.0f} "
                         f"it, gap to best median {v['median_gap_to_best']:.1e}, max {v['max_gap_to_best']:.1e}"
                         for t, v in rule.items() if t != "iterations_run"))
    if "pipeline" in res:
        for s, p in res["pipeline"].items():
            lines.append(f"- default pipeline, factorize.solver={s}: {p['seconds']:.1f} s, best K {p['best_k']}, "
                         f"program recovery {p['program_recovery']:.3f}, ARI {p['ari_truth']:.3f}")
    for name, s in res["solvers"].items():
        lines.append(f"- threadpoolctl in the {name} subprocess: {json.dumps(s['threads'])}, "
                     f"numba {s['numba_threads']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
