"""Horn's parallel analysis for the NMF rank, on the validation sets (a study, not a rule yet).

The default K rule reads how components recur across restarts, and fails on replicates run
to convergence (docs/validation.md, "Converged replicates and the K rule"). Parallel
analysis (Horn 1965) needs no restarts: the sum of squares the k-th component explains,
``SS(k - 1) - SS(k)`` with ``SS(k)`` the converged residual of the best rank-k fit, is
compared with the same quantity on a null copy of X whose genes are permuted across spots
one by one (each gene keeps its values and sparsity; co-expression is destroyed). A rank
is supported while the data's component explains more than the null's at the same rank::

    python scripts/parallel_analysis_study.py     # HALS at tol=1e-5, best of 2 fits per rank, 18 sets

It runs :func:`tardis_exp.consensus.parallel_analysis`, the function behind
``consensus.rank_bound=parallel``, on every spot of each set (the stage subsamples to
``consensus.parallel_max_spots``).

Uses the preprocessed matrices cached by ``scripts/k_rule_study.py`` (run it first, with
``--solvers hals``). Prints, per set, the ratio data / null for k = 2..12 and the rank
where it first falls to 1 or below.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main(argv=None):
    import anndata as ad

    from k_rule_study import heldout_sets, tuning_sets
    from tardis_exp.consensus import parallel_analysis

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--fits", type=int, default=2, help="fits per rank, the best kept (data and null)")
    ap.add_argument("--max-rank", type=int, default=12)
    ap.add_argument("--cache", type=Path, default=ROOT / "outputs" / "k_rule_study")
    a = ap.parse_args(argv)
    hits = n = 0
    for name, _, truth in tuning_sets() + heldout_sets():
        if name.startswith("Brunet"):  # the rank bounds K there (docs/validation.md)
            continue
        f = a.cache / f"{name.replace(' ', '_').replace('/', '_')}_hals.h5ad"
        if not f.exists():
            print(f"{name}: no cached matrix {f.name}; run scripts/k_rule_study.py --solvers hals first")
            continue
        t0 = time.perf_counter()
        X = ad.read_h5ad(f).X
        # the consensus stage's own function (consensus.rank_bound=parallel), on every spot
        pa = parallel_analysis(X, a.max_rank - 1, np.random.default_rng(0), max_spots=X.shape[0], fits=a.fits,
                               tol=a.tol)
        ratio, k_pa = pa["ratios"], pa["rank"]
        hits += k_pa in truth
        n += 1
        print(f"{name:42s} truth {truth} parallel-analysis rank {k_pa} {'=' if k_pa in truth else '!='} "
              f"ratios k=2..{a.max_rank}: " + " ".join(f"{x:.2f}" for x in ratio[1:])
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"tol {a.tol:g}: the planted K on {hits} of {n}")


if __name__ == "__main__":
    main()
