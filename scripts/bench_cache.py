"""Stage cache benchmark: the same Optuna sweep with and without the cache, side by side.

Runs ``tardis-exp -m sweep=<preset> hydra.sweeper.n_trials=<n>`` three times, one after the
other, in fresh project roots (own MLflow store, Optuna journal and cache folder):

``no_cache``
    ``cache.enabled=false``: every trial preprocesses and factorizes.
``cache_cold``
    ``cache.enabled=true`` on an empty cache: the first trial stores the preprocessed
    data; a trial whose ``n_components`` was seen before reuses that factorization.
``cache_warm``
    the same sweep again as a new study (fresh MLflow store and journal) on the cache
    left by ``cache_cold``: what a re-run of a study (another objective, tracking server,
    study name) or a second study over the same ranks pays.

The sampler is seeded and a cache hit returns the arrays that were stored, so all three
sweeps evaluate the same trials with the same objective values; the script checks that
(a cache that changed results would show here) and reports wall-time ratios, the cache
hits and the BLAS threads (threadpoolctl). Usage::

    python scripts/bench_cache.py                       # 20 trials, default synthetic data
    python scripts/bench_cache.py --trials 6 -- data.n_spots=1600 data.n_genes=1500 data.n_programs=4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def blas_info() -> list[dict]:
    import numpy  # noqa: F401  (loads the BLAS that threadpoolctl reports)
    from threadpoolctl import threadpool_info

    return [{k: d.get(k) for k in ("internal_api", "num_threads", "version", "architecture")}
            for d in threadpool_info()]


def run_sweep(root: Path, preset: str, trials: int, cache: bool, cache_dir: Path, extra: list[str]) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    sweep_dir = root / "multirun"
    cmd = [sys.executable, "-m", "tardis_exp", "-m", f"sweep={preset}", f"hydra.sweeper.n_trials={trials}",
           f"paths.root_dir={root}", f"hydra.sweep.dir={sweep_dir}", f"cache.enabled={str(cache).lower()}",
           f"cache.dir={cache_dir}", *extra]
    env = dict(os.environ, TARDIS_EXP_PROGRESS="0", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the sweep process: less sensitive than wall time to other load on the machine
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    (root / "sweep.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"sweep failed ({p.returncode}); log in {root / 'sweep.log'}:\n{p.stderr[-3000:]}")
    import yaml

    trials_out = []
    for d in sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        m = d / "metrics.yaml"
        ov = (d / "overrides.txt").read_text().split() if (d / "overrides.txt").exists() else []
        params = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in ov
                  if o.startswith(("factorize.n_components", "consensus.min_clusters", "consensus.max_clusters"))}
        metrics = yaml.safe_load(m.read_text()) if m.exists() else None
        trials_out.append({"number": int(d.name), "params": params, "metrics": metrics})
    res = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "trials": trials_out, "results": res}


def summary(name: str, r: dict) -> dict:
    done = [t for t in r["trials"] if t["metrics"]]
    best = r["results"].get("best_trial")
    best_k = next((t["metrics"]["best_k"] for t in done if t["number"] == best), None)
    return {"mode": name, "wall_s": round(r["wall_s"], 1), "cpu_s": round(r["cpu_s"], 1), "trials": len(r["trials"]), "complete": len(done),
            "cache_hits": int(sum(t["metrics"].get("cache_hits", 0) for t in done)),
            "distinct_n_components": len({t["params"].get("factorize.n_components") for t in r["trials"]}),
            "best_trial": best, "best_k": best_k}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--preset", default="k_range")
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every sweep (after --)")
    a = ap.parse_args()

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_cache_"))
    cache_dir = work / "cache"
    runs = {}
    for name, cache in (("no_cache", False), ("cache_cold", True), ("cache_warm", True)):
        print(f"[bench_cache] {name} ...", file=sys.stderr, flush=True)
        runs[name] = run_sweep(work / name, a.preset, a.trials, cache, cache_dir, a.overrides)
        print(f"[bench_cache] {name}: {runs[name]['wall_s']:.1f} s", file=sys.stderr, flush=True)

    # the three sweeps must have evaluated the same trials with the same results
    def fingerprint(r):
        return [(t["params"], None if not t["metrics"] else
                 {k: round(v, 9) for k, v in t["metrics"].items()
                  if k not in ("mlflow_run_id", "cache_hits", "cache_misses") and isinstance(v, float)})
                for t in r["trials"]]

    same = fingerprint(runs["no_cache"]) == fingerprint(runs["cache_cold"]) == fingerprint(runs["cache_warm"])
    base = runs["no_cache"]["wall_s"]
    rows = [summary(n, r) for n, r in runs.items()]
    for row in rows:
        row["speedup_vs_no_cache"] = round(base / runs[row["mode"]]["wall_s"], 2)
        row["cpu_speedup"] = round(runs["no_cache"]["cpu_s"] / runs[row["mode"]]["cpu_s"], 2)
    size = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "preset": a.preset,
              "n_trials": a.trials, "overrides": a.overrides, "identical_trials_and_metrics": same,
              "cache_size_mb": round(size / 1e6, 1), "blas": blas_info(), "cpu_count": os.cpu_count(),
              "rows": rows, "workdir": str(work)}
    cols = ["mode", "wall_s", "speedup_vs_no_cache", "cpu_s", "cpu_speedup", "trials", "complete", "cache_hits", "distinct_n_components",
            "best_trial", "best_k"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    print(f"identical trials and metrics in all three sweeps: {same}; cache size {report['cache_size_mb']} MB")
    warm = next(r for r in rows if r["mode"] == "cache_warm")
    if warm["cache_hits"] < 2 * warm["complete"]:
        # the key hashes the stages' source files: an edit during the benchmark invalidates entries
        print(f"WARNING: the warm sweep hit {warm['cache_hits']} of {2 * warm['complete']} stages; were "
              "tardis_exp/{preprocess,factorize,nmf}.py or a library changed while the benchmark ran?")
    print(f"BLAS: {report['blas']}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    if not same:
        raise SystemExit("the cached sweeps evaluated different trials or metrics than the uncached one")


if __name__ == "__main__":
    main()
