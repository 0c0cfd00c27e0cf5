#!/usr/bin/env python
"""What MLflow tracking adds to a default ``tardis-exp`` run's wall time.

Runs the real CLI (imports, Hydra, the four stages, outputs) as a fresh process per run,
alternating ``tracking.enabled=true`` and ``tracking.enabled=false`` in ABBA order so
load drift on a shared machine hits both sides alike, and reports the per-pair and
median ratios. Every run uses the same project root (``TARDIS_EXP_ROOT``), so the
enabled runs log into one store like a user's successive runs; the store is created
before timing (creating an SQLite store runs MLflow's schema migrations once).

Both sides write the same local outputs (result.h5ad, tables, plots: ``tracking.log_plots``
draws them either way); the difference is the MLflow import, connection, logging calls
and artifact copies. ``--bare`` adds a third side without plots (``tracking.log_plots=false``)
to show what the figures cost.

Usage::

    python scripts/bench_tracking.py                 # default data, 3 repeats per side
    python scripts/bench_tracking.py --repeats 2 --bare -- data.n_spots=900 data.n_genes=800
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def blas_info() -> list[dict]:
    import numpy  # noqa: F401 -- load the BLAS the pipeline uses
    from threadpoolctl import threadpool_info

    return [{k: d.get(k) for k in ("user_api", "internal_api", "num_threads", "version")} for d in threadpool_info()]


def one_run(exe: list[str], root: Path, overrides: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([*exe, *overrides], cwd=root, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"run failed ({' '.join(overrides)}):\n{out.stderr[-3000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="runs per side (default 3)")
    ap.add_argument("--bare", action="store_true", help="also time tracking off and plots off")
    ap.add_argument("--root", help="project root for the runs (default: a temporary folder, removed)")
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("overrides", nargs="*", help="extra overrides for every run (after --)")
    args = ap.parse_args()

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench_tracking_"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TARDIS_EXP_ROOT": str(root), "TARDIS_EXP_PROGRESS": "0"}
    exe = [sys.executable, "-m", "tardis_exp"]
    sides = {"tracking on": ["tracking.enabled=true"], "tracking off": ["tracking.enabled=false"]}
    if args.bare:
        sides["off, no plots"] = ["tracking.enabled=false", "tracking.log_plots=false"]

    # create the store untimed: schema migrations happen once per store, not per run
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tardis_exp.tracking import Tracker

    Tracker(uri=f"sqlite:///{root}/mlruns/mlflow.db", artifact_location=str(root / "mlruns" / "artifacts")).connect()

    load0 = os.getloadavg()
    times: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]  # ABBA: drift hits both sides alike
        for name in order:
            dt = one_run(exe, root, [*sides[name], *args.overrides], env)
            times[name].append(dt)
            print(f"repeat {r + 1}  {name:14s} {dt:8.2f} s   (load {os.getloadavg()[0]:.2f})", flush=True)
    load1 = os.getloadavg()

    med = {k: statistics.median(v) for k, v in times.items()}
    pairs = [on / off for on, off in zip(times["tracking on"], times["tracking off"])]
    ratio = med["tracking on"] / med["tracking off"]
    print()
    for k, v in times.items():
        print(f"{k:14s} median {med[k]:8.2f} s   runs {', '.join(f'{x:.2f}' for x in v)}")
    print(f"tracking on / off: median ratio {ratio:.3f} (+{100 * (ratio - 1):.1f}%), "
          f"per pair {', '.join(f'{p:.3f}' for p in pairs)}")
    if args.bare:
        pr = med["tracking off"] / med["off, no plots"]
        print(f"plots (off / off-no-plots): {pr:.3f} (+{100 * (pr - 1):.1f}%)")
    info = blas_info()
    print(f"BLAS threads: {info}")
    print(f"CPUs: {os.cpu_count()}  load average before {load0[0]:.2f}, after {load1[0]:.2f}  "
          f"python {platform.python_version()}  overrides: {args.overrides or 'none (default run)'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "times_s": times, "median_s": med, "ratio_on_off": ratio, "pair_ratios": pairs, "blas": info,
            "cpus": os.cpu_count(), "load_before": load0, "load_after": load1, "overrides": args.overrides,
        }, indent=2))
    if not args.root:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
