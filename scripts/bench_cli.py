#!/usr/bin/env python
"""How fast ``tardis-exp`` answers: ``--help``, a missing input file, a bad value; two installs
side by side, alternated, in one invocation (wall seconds per command, medians and ratios).

Usage::

    git worktree add /tmp/base <previous commit>
    python3 -m venv /tmp/base/.venv && /tmp/base/.venv/bin/pip install -c constraints.txt -e /tmp/base
    python scripts/bench_cli.py --base /tmp/base/.venv/bin/tardis-exp --new .venv/bin/tardis-exp --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

COMMANDS = {"--help": ["--help"], "missing file": ["data=h5ad", "data.path=nope.h5ad"],
            "bad value": ["consensus.k_selection=nope"]}


def once(binary: Path, args: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TARDIS_EXP_", "MLFLOW_", "HYDRA_"))}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        subprocess.run([str(binary), *args], cwd=d, env=env, capture_output=True)
        return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--new", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    a.base, a.new = a.base.resolve(), a.new.resolve()  # run from temporary folders
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    times = {(n, c): [] for n in ("base", "new") for c in COMMANDS}
    for r in range(a.rounds):
        for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
            for c, args in COMMANDS.items():
                times[name, c].append(once(getattr(a, name), args))
    print("| command | base median s | new median s | new / base |\n|---|---|---|---|")
    for c in COMMANDS:
        b, n = statistics.median(times["base", c]), statistics.median(times["new", c])
        print(f"| `tardis-exp {' '.join(COMMANDS[c])}` | {b:.2f} | {n:.2f} | {n / b:.2f} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
