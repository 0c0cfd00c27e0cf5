"""Data-only K rules on a linear matrix (issue 24): variants side by side on benchmark draws.

    python scripts/linear_krule_study.py --family spatial --seeds 0 8 --out /tmp/x.jsonl [--bicv]

Each draw is preprocessed with the defaults (the run's HVGs, ``layers['counts']``); every
variant's K is printed and appended as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tardis_exp import benchmark as bm  # noqa: E402
from tardis_exp.consensus import heldout as ho  # noqa: E402
from tardis_exp.preprocess import preprocess  # noqa: E402


KS = list(range(2, 16))


def _clip(k):
    return int(min(max(k, KS[0]), KS[-1]))


def _one_se(folds):
    """The smallest K within one SE (of its paired difference to the best K) of the least error."""
    err = folds.mean(0)
    b = int(np.argmin(err))
    d = folds - folds[:, [b]]
    se = d.std(0, ddof=1) / np.sqrt(len(folds))
    return KS[int(np.flatnonzero(err <= err[b] + se)[0])]


def _pa(null):
    def f(p, seed):
        r = ho.parallel_linear(p.layers["counts"], seed, null=null)
        return {"k": _clip(r["k"]), "above": int(r["above"])}
    return f


def _pa_log(p, seed):
    r = ho.parallel_eigen(p.X, seed)
    return {"k": _clip(r["k"]), "above": int(r["above"])}


def _bicv_lin(p, seed):
    rng = np.random.default_rng(seed)
    D, _ = ho.linear_matrix(p.layers["counts"], 1000, rng)
    r = ho.bicv_curve(D, [1, *KS], [seed[0], seed[1], 7])
    return {"k": _one_se(r["bicv_folds"][:, 1:]), "curve": np.round(r["bicv"], 4).tolist()}


def _bicv_kl(p, seed):
    r = ho.bicv_kl_curve(p.layers["counts"], KS, seed)
    return {"k": _one_se(r["bicv_folds"]), "curve": np.round(r["bicv"], 4).tolist()}


STUDY_VARIANTS = {"pa_log": _pa_log, "pa_lin": _pa("permute"), "pa_pois": _pa("poisson"),
                  "pa_defl": _pa("deflated"), "bicv_lin": _bicv_lin, "bicv_kl": _bicv_kl}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", required=True)
    ap.add_argument("--seeds", type=int, nargs=2, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bicv", action="store_true")
    ap.add_argument("--variants", nargs="*", default=None)
    a = ap.parse_args()
    for seed in range(*a.seeds):
        d = bm.draw(a.family, seed, max_spots=600, max_genes=800)
        t = d.uns["benchmark"]["planted_k"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = preprocess(d)
        row = {"family": a.family, "seed": seed, "planted_k": t}
        seedv = [42, 3]
        times = {}
        for name, fn in STUDY_VARIANTS.items():
            if a.variants and name not in a.variants:
                continue
            if name.startswith("bicv") and not a.bicv:
                continue
            t0 = time.perf_counter()
            row[name] = fn(p, seedv)
            times[name] = round(time.perf_counter() - t0, 1)
        row["seconds"] = times
        print(json.dumps(row), flush=True)
        with a.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
