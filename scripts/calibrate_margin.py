"""Calibrate ``consensus.confident_margin`` on design seeds, report it on fresh ones.

The consensus stage warns that "the data do not separate" the chosen K when its margin over
the runner-up (in units of the measured tolerance) is below ``consensus.confident_margin``,
or when no other K could be compared. This script reads the benchmark runner's JSON lines
(``python -m tardis_exp.benchmark ... --jsonl``; one file per family x setting, named
``[design_]<family>_<setting>.jsonl``), and for the default rule (``auto``):

1. sweeps the threshold ``t`` over the design rows (seed < ``DESIGN_SEEDS``) and prints, per
   setting and pooled, the precision of the unwarned runs (planted K == K among margin >= t),
   the coverage of the warned ones (planted K in {K, runner-up} among margin < t) and the
   warned share;
2. chooses ``t`` (:func:`choose_threshold`): the smallest design margin at and above which
   the unwarned precision is >= 0.95 -- for that threshold and every larger one, so that a
   lucky dip does not decide -- over the design rows of every setting pooled (one default
   serves every solver);
3. reports the three rates at that ``t`` on the fresh rows (seed >= ``DESIGN_SEEDS``) with
   95 % Wilson intervals, per setting, per family and pooled; and, where the rows carry the
   per-K gaps (``k_gaps``, written by the runner since the candidate set exists), the coverage
   of the candidate set (every K whose gap to the chosen one is below ``t``).

Runs the stage refused (no K) are counted apart: they report no K, so they are neither
warned nor unwarned.

Usage::

    python scripts/calibrate_margin.py docs/benchmark/design_{spatial,cnmf,monti}_{mu,hals}.jsonl \\
        docs/benchmark/{spatial,cnmf,monti,rare}_{mu,hals}.jsonl docs/benchmark/*_mu_tol1e-6.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from tardis_exp.benchmark import DESIGN_SEEDS, wilson

TARGET = 0.95
RULE = "auto"
_NAME = re.compile(r"^(?:design_)?(?P<family>[a-z]+)_(?P<setting>.+)$")


def load(paths) -> list[dict]:
    """The runner's rows of the default rule, one dict per draw: family, setting (from the
    file name), seed, planted, k, runner, margin, gaps (``{K: gap}`` or None)."""
    out = []
    for p in map(Path, paths):
        m = _NAME.match(p.stem)
        if m is None:
            raise SystemExit(f"{p}: the name must be [design_]<family>_<setting>.jsonl")
        for line in p.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            a = r.get("rules", {}).get(RULE, r)
            gaps = a.get("k_gaps", r.get("k_gaps") if a is r else None)
            out.append({"family": r["family"], "setting": m["setting"], "seed": int(r["seed"]),
                        "planted": int(r["planted_k"]), "k": a.get("k"), "runner": a.get("runner_up"),
                        "margin": float(a.get("margin", float("nan"))),
                        "gaps": None if gaps is None else {int(k): float(g) for k, g in gaps.items()}})
    return out


def reported(rows):
    """The rows where the stage reported a K (not refused)."""
    return [r for r in rows if r["k"] is not None]


def warned(r, t: float) -> bool:
    """What the stage does (``krules.report_k``): warn below ``t``, or when no other K was compared."""
    return r["runner"] == r["k"] or not r["margin"] >= t


def candidate_set(r, t: float):
    """The stage's candidate set (``krules.candidates``) from the row's per-K gaps (None without them)."""
    if r["gaps"] is None:
        return None
    out = {r["k"]} | {k for k, g in r["gaps"].items() if g < t}
    if not r["margin"] >= t:
        out.add(r["runner"])
    return out


def rates(rows, t: float) -> dict:
    """Counts at threshold ``t``: unwarned (n, right), warned (n, planted in {K, runner-up},
    planted in the candidate set where measured), refused."""
    rep = reported(rows)
    unw = [r for r in rep if not warned(r, t)]
    w = [r for r in rep if warned(r, t)]
    sets = [candidate_set(r, t) for r in w]
    with_set = [(r, s) for r, s in zip(w, sets) if s is not None]
    return {"n": len(rep), "refused": len(rows) - len(rep),
            "unwarned": len(unw), "right": sum(r["planted"] == r["k"] for r in unw),
            "warned": len(w), "pair": sum(r["planted"] in (r["k"], r["runner"]) for r in w),
            "set_n": len(with_set), "set": sum(r["planted"] in s for r, s in with_set),
            "set_size": [len(s) for _, s in with_set]}


def precision(rows, t: float) -> float:
    """Unwarned precision at ``t`` (NaN when nothing is unwarned)."""
    c = rates(rows, t)
    return c["right"] / c["unwarned"] if c["unwarned"] else float("nan")


def choose_threshold(rows, target: float = TARGET) -> float:
    """The smallest margin ``m`` of the rows such that, for ``t = m`` and every larger margin of
    the rows, the unwarned precision is >= ``target``; ``inf`` (warn always) when no margin
    qualifies (the largest-margin run is wrong)."""
    ms = sorted({r["margin"] for r in reported(rows) if r["runner"] != r["k"] and math.isfinite(r["margin"])})
    best = math.inf
    for m in reversed(ms):  # from the top down: stop at the first threshold that fails
        if not precision(rows, m) >= target:
            break
        best = m
    return best


def _rate(k: int, n: int) -> str:
    if n == 0:
        return "n/a (n = 0)"
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {k / n:.2f} [{lo:.2f}, {hi:.2f}]"


def sweep_table(rows, thresholds) -> list[str]:
    out = ["| setting | t | n | unwarned precision | warned {K, runner-up} coverage | warned share |",
           "|---|---|---|---|---|---|"]
    groups = defaultdict(list)
    for r in rows:
        groups[r["setting"]].append(r)
    groups["pooled"] = list(rows)
    for name, g in sorted(groups.items(), key=lambda kv: (kv[0] == "pooled", kv[0])):
        for t in thresholds:
            c = rates(g, t)
            prec = f"{c['right']}/{c['unwarned']}" + (f" = {c['right'] / c['unwarned']:.2f}" if c["unwarned"] else "")
            cov = f"{c['pair']}/{c['warned']}" + (f" = {c['pair'] / c['warned']:.2f}" if c["warned"] else "")
            out.append(f"| {name} | {t:.4g} | {c['n']} | {prec} | {cov} | {c['warned']}/{c['n']} |")
    return out


def fresh_table(rows, t: float) -> list[str]:
    out = ["| setting | family | n (refused) | unwarned: planted K right [95 % CI] | "
           "warned: planted in {K, runner-up} [95 % CI] | warned: planted in the candidate set [95 % CI] "
           "(mean size) | warned share [95 % CI] |",
           "|---|---|---|---|---|---|---|"]
    by = defaultdict(list)
    for r in rows:
        by[(r["setting"], r["family"])].append(r)
        by[(r["setting"], "pooled")].append(r)
    for (setting, fam), g in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1] == "pooled", kv[0][1])):
        c = rates(g, t)
        size = f" ({sum(c['set_size']) / len(c['set_size']):.1f})" if c["set_size"] else ""
        sets = _rate(c["set"], c["set_n"]) + size if c["set_n"] else "not measured"
        out.append(f"| {setting} | {fam} | {c['n']} ({c['refused']}) | {_rate(c['right'], c['unwarned'])} | "
                   f"{_rate(c['pair'], c['warned'])} | {sets} | {_rate(c['warned'], c['n'])} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", nargs="+", help="the runner's JSON lines ([design_]<family>_<setting>.jsonl)")
    ap.add_argument("--target", type=float, default=TARGET, help="unwarned precision to reach on design rows")
    ap.add_argument("--threshold", type=float, default=None,
                    help="report the fresh rows at this threshold instead of the one chosen")
    args = ap.parse_args(argv)
    rows = load(args.jsonl)
    design = [r for r in rows if r["seed"] < DESIGN_SEEDS]
    fresh = [r for r in rows if r["seed"] >= DESIGN_SEEDS]
    if not design:
        raise SystemExit("no design rows (seed < %d) among the files" % DESIGN_SEEDS)
    chosen = choose_threshold(design, args.target)
    per = {s: choose_threshold([r for r in design if r["setting"] == s], args.target)
           for s in sorted({r["setting"] for r in design})}
    print(f"## Design rows (seed < {DESIGN_SEEDS}): {len(design)} draws, {len(reported(design))} reported\n")
    # the design margins themselves (where the rates change) and a few round values
    margins = {r["margin"] for r in reported(design)
               if r["runner"] != r["k"] and math.isfinite(r["margin"]) and r["margin"] >= 0.5}
    grid = sorted({0.5, 1.0, 1.5, 2.0, 2.5, 3.0, *margins})
    print("\n".join(sweep_table(design, grid)))
    print(f"\nchosen t = {chosen:.4f} (smallest design margin with unwarned precision >= {args.target} at it "
          f"and above, all settings pooled); per setting alone: "
          + ", ".join(f"{s} {v:.4f}" for s, v in per.items()))
    t = chosen if args.threshold is None else args.threshold
    print(f"\n## Design rows at t = {t:.4f}\n")
    print("\n".join(fresh_table(design, t)))
    if fresh:
        print(f"\n## Fresh rows (seed >= {DESIGN_SEEDS}) at t = {t:.4f}\n")
        print("\n".join(fresh_table(fresh, t)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
