#!/usr/bin/env python
"""Two installs of tardis_exp side by side: the default run, alternated, in one invocation.

For a refactoring that must not change speed or results (issue 14): each round runs
``tardis-exp tracking.enabled=false`` once with each install (its own virtual environment,
e.g. one made from the previous commit), in alternating order, in a fresh empty folder,
with the same BLAS threads; reports the median wall time of each and their ratio, and the
best K and program recovery each computed.

Usage::

    git worktree add /tmp/base <previous commit>
    python3 -m venv /tmp/base/.venv && /tmp/base/.venv/bin/pip install -e /tmp/base
    python scripts/bench_commits.py --base /tmp/base/.venv/bin/tardis-exp \\
        --new .venv/bin/tardis-exp --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def run_once(binary: Path, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TARDIS_EXP_", "MLFLOW_"))}
    env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               NUMBA_NUM_THREADS=str(threads))
    env["PATH"] = f"{binary.parent}{os.pathsep}{env.get('PATH', '')}"
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        p = subprocess.run([str(binary), "tracking.enabled=false"], cwd=d, env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if p.returncode:
            sys.exit(f"{binary} failed:\n{p.stderr[-3000:]}")
        (metrics,) = Path(d).glob("outputs/runs/*/metrics.yaml")
        m = yaml.safe_load(metrics.read_text())
    m.pop("mlflow_run_id", None)
    return {"seconds": dt, "best_k": m["best_k"], "program_recovery": m["program_recovery"], "metrics": m}


def blas(binary: Path, threads: int) -> list:
    py = binary.parent / "python"
    code = ("import json, numpy; from threadpoolctl import threadpool_info; "
            "print(json.dumps([{k: d.get(k) for k in ('internal_api', 'num_threads')} for d in threadpool_info()]))")
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    return json.loads(subprocess.run([str(py), "-c", code], env=env, capture_output=True, text=True).stdout)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="tardis-exp of the baseline install")
    ap.add_argument("--new", type=Path, required=True, help="tardis-exp of the install under test")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="BLAS/numba threads of every run")
    a = ap.parse_args(argv)
    a.base, a.new = a.base.resolve(), a.new.resolve()  # the runs start in temporary folders
    res: dict[str, list] = {"base": [], "new": []}
    for r in range(a.rounds):
        order = ("base", "new") if r % 2 == 0 else ("new", "base")
        for name in order:
            res[name].append(run_once(getattr(a, name), a.threads))
            print(f"round {r} {name}: {res[name][-1]}", flush=True)
    med = {n: statistics.median(x["seconds"] for x in v) for n, v in res.items()}
    print(f"\nBLAS ({a.threads} threads asked): {blas(a.new, a.threads)}")
    print("| install | median s | runs (s) | best K | program recovery |\n|---|---|---|---|---|")
    for n, v in res.items():
        print(f"| {n} | {med[n]:.1f} | {', '.join('%.1f' % x['seconds'] for x in v)} | "
              f"{sorted({x['best_k'] for x in v})} | {sorted({round(x['program_recovery'], 4) for x in v})} |")
    print(f"\nnew / base median wall time: {med['new'] / med['base']:.3f}")
    # every metric of metrics.yaml (not only K and recovery), compared exactly
    base_m, new_m = res["base"][0]["metrics"], res["new"][0]["metrics"]
    same_runs = all(x["metrics"] == v[0]["metrics"] for v in res.values() for x in v)
    diff = sorted(k for k in set(base_m) | set(new_m) if base_m.get(k) != new_m.get(k))
    print(f"metrics.yaml: {len(base_m)} keys; identical between installs: {not diff}"
          f"{'' if not diff else ' (differ: ' + ', '.join(diff) + ')'}; identical across rounds: {same_runs}")


if __name__ == "__main__":
    main()
