"""Horn's parallel analysis for the NMF rank, on the validation sets (a study, not a rule yet).

The default K rule reads how components recur across restarts, and fails on replicates run
to convergence (docs/validation.md, "Converged replicates and the K rule"). Parallel
analysis (Horn 1965) needs no restarts: the sum of squares the k-th component explains,
``SS(k - 1) - SS(k)`` with ``SS(k)`` the converged residual of the best rank-k fit, is
compared with the same quantity on a null copy of X whose genes are permuted across spots
one by one (each gene keeps its values and sparsity; co-expression is destroyed). A rank
is supported while the data's component explains more than the null's at the same rank::

    python scripts/parallel_analysis_study.py                 # HALS, 2 fits per rank, 18 sets
    python scripts/parallel_analysis_study.py --solver mu --tol 1e-6

Uses the preprocessed matrices cached by ``scripts/k_rule_study.py`` (run it first, with
``--solvers hals``). Prints, per set, the ratio data / null for k = 2..12 and the rank
where it first falls to 1 or below.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def explained(X, ranks, solver, tol, fits, seed):
    """SS explained by the k-th component, k = 1..max(ranks), from the best of ``fits`` fits."""
    from tardis_exp.nmf import derive_seeds, fit_batch

    all_ranks = [k for k in ranks for _ in range(fits)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit_batch(X, all_ranks, derive_seeds(seed, len(all_ranks)), solver=solver, tol=tol,
                        max_iter=5000, progress=False)
    ss = np.array([min(r.error for r in res if r.rank == k) for k in ranks], dtype=np.float64) ** 2
    total = float(np.einsum("ij,ij->", X, X, dtype=np.float64))
    return -np.diff(np.concatenate([[total], ss]))


def gene_permuted(X, rng):
    X0 = np.empty_like(X)
    for j in range(X.shape[1]):
        X0[:, j] = X[rng.permutation(X.shape[0]), j]
    return X0


def main(argv=None):
    import anndata as ad

    from k_rule_study import heldout_sets, tuning_sets

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--solver", default="hals")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--fits", type=int, default=2, help="fits per rank, the best kept (data and null)")
    ap.add_argument("--max-rank", type=int, default=12)
    ap.add_argument("--cache", type=Path, default=ROOT / "outputs" / "k_rule_study")
    a = ap.parse_args(argv)
    ranks = list(range(1, a.max_rank + 1))
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
        X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)
        d = explained(X, ranks, a.solver, a.tol, a.fits, 1)
        d0 = explained(gene_permuted(X, np.random.default_rng(0)), ranks, a.solver, a.tol, a.fits, 2)
        ratio = d / d0
        # rank 1 (the mean profile) explains the same in both by construction; from k = 2 on
        fail = np.flatnonzero(ratio[1:] <= 1.0)
        k_pa = int(fail[0]) + 1 if len(fail) else a.max_rank
        hits += k_pa in truth
        n += 1
        print(f"{name:42s} truth {truth} parallel-analysis rank {k_pa} {'=' if k_pa in truth else '!='} "
              f"ratios k=2..{a.max_rank}: " + " ".join(f"{x:.2f}" for x in ratio[1:])
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"{a.solver} tol {a.tol:g}: the planted K on {hits} of {n}")


if __name__ == "__main__":
    main()
