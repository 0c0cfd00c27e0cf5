"""Markdown tables of the benchmark runner's JSON lines (``python -m tardis_exp.benchmark --jsonl``).

    python scripts/benchmark_table.py docs/benchmark/*.jsonl

One row per file (family x solver setting) and rule: exact-K and within-one rates with 95 %
Wilson intervals and n; then how the misses look (over/under by how much, refused, warned).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tardis_exp.benchmark import summarize  # noqa: E402


def main(paths):
    print("| family | setting | rule | n | exact K [95 % CI] | within one [95 % CI] | over | under | refused |")
    print("|---|---|---|---|---|---|---|---|---|")
    misses = []
    for p in paths:
        rows = [json.loads(x) for x in Path(p).read_text().splitlines()]
        fam, setting = Path(p).stem.split("_", 1)
        rules = list(rows[0]["rules"])
        for rule in rules:
            rr = [r for r in rows if rule in r["rules"]]
            s = summarize(rr, rule)
            print(f"| {fam} | {setting} | {rule} | {s['n']} | {s['exact_rate']:.2f} [{s['exact_ci'][0]:.2f}, "
                  f"{s['exact_ci'][1]:.2f}] | {s['within_one_rate']:.2f} [{s['within_one_ci'][0]:.2f}, "
                  f"{s['within_one_ci'][1]:.2f}] | {s['over']} | {s['under']} | {s['failed']} |")
        first = rules[0]
        d = Counter()
        warn = Counter()
        for r in rows:
            k, t = r["rules"][first]["k"], r["planted_k"]
            key = "refused" if k is None else ("exact" if k == t else f"{k - t:+d}")
            d[key] += 1
            warn[(key == "exact", bool(r["rules"][first].get("warned")))] += 1
        misses.append((fam, setting, first, d, warn))
    print()
    print("| family | setting | rule | reported - planted (count) | right & no warning | right & warned | "
          "wrong & no warning | wrong & warned |")
    print("|---|---|---|---|---|---|---|---|")
    for fam, setting, rule, d, w in misses:
        dist = ", ".join(f"{k}: {v}" for k, v in sorted(d.items()))
        print(f"| {fam} | {setting} | {rule} | {dist} | {w[(True, False)]} | {w[(True, True)]} | "
              f"{w[(False, False)]} | {w[(False, True)]} |")




def agreement(paths):
    """Per family: on seeds every setting ran, how often all settings report the same K."""
    by = {}
    for p in paths:
        fam, setting = Path(p).stem.split("_", 1)
        by.setdefault(fam, {})[setting] = {json.loads(x)["seed"]: json.loads(x)["rules"] for x in
                                           Path(p).read_text().splitlines()}
    print()
    print("| family | settings | seeds in common | same K in all |")
    print("|---|---|---|---|")
    for fam, sets in by.items():
        if len(sets) < 2:
            continue
        common = set.intersection(*(set(v) for v in sets.values()))
        same = sum(len({next(iter(v[s].values()))["k"] for v in sets.values()}) == 1 for s in common)
        print(f"| {fam} | {', '.join(sets)} | {len(common)} | {same} |")


def batch_table(paths):
    """The batch family (rows with ``batch``): shared programs found once, the section-only one
    found / flagged, with 95 % Wilson intervals; a run the consensus refused is a miss."""
    from tardis_exp.benchmark import wilson

    out = []
    for p in paths:
        rows = [json.loads(x) for x in Path(p).read_text().splitlines()]
        if not rows or rows[0]["family"] != "batch":
            continue
        cells = []
        for key in ("shared_found_once", "specific_found", "specific_flagged"):
            vals = [r["batch"][key] if "batch" in r else False for r in rows]
            if any(v is None for v in vals):
                cells.append("not measured (no uns['nmf_samples'])")
                continue
            hit, n = sum(map(bool, vals)), len(vals)
            lo, hi = wilson(hit, n)
            cells.append(f"{hit}/{n} = {hit / n:.2f} [{lo:.2f}, {hi:.2f}]")
        top = sorted(r["batch"]["specific_top_share"] for r in rows
                     if "batch" in r and r["batch"].get("specific_top_share") is not None)
        k = Counter("refused" if r["k"] is None else
                    ("exact" if r["k"] == r["planted_k"] else f"{r['k'] - r['planted_k']:+d}") for r in rows)
        dist = ", ".join(f"{a}: {b}" for a, b in sorted(k.items()))
        out.append(f"| {Path(p).stem.split('_', 1)[1]} | {len(rows)} | {' | '.join(cells)} | "
                   f"{', '.join(f'{v:.2f}' for v in top) or '-'} | {dist} |")
    if out:
        print()
        print("| batch setting | n | each shared program found once [95 % CI] | section-only program found [95 % CI] | "
              "section-only program flagged [95 % CI] | top-decile share of the found section-only program | "
              "reported - planted K |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
    agreement(sys.argv[1:])
    batch_table(sys.argv[1:])
