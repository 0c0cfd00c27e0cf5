#!/usr/bin/env python
"""Why a solver's replicates recover the planted programs better or worse after the consensus.

For each ``SOLVER:TOL`` given, the default data through the default preprocessing and
``factorize`` (10 replicates of k = 10, ``random_state=42``, that solver and ``tol``),
then per run:

- iterations and median loss of the replicates;
- per-replicate program recovery (each replicate's own 10 components against the
  planted programs, :func:`tardis_exp.metrics.program_recovery`) -- what the factors hold
  before any consensus;
- the components matched to a planted program (top-50 marker precision > 0.8): their
  median fraction of non-zero loadings, and the mean pairwise L2 distance between the
  L2-normalized spectra of the same program across replicates (what the consensus's
  outlier filter, ``consensus.outlier_threshold``, compares);
- the default components consensus: best K, recovery, outliers dropped, and the same with
  ``outlier_threshold=0.5``.

Usage::

    python scripts/solver_recovery.py mu:1e-4 hals:1e-4 hals:1e-5
"""

from __future__ import annotations

import sys
import time
import warnings


def main(argv=None) -> int:
    import numpy as np

    from tardis_exp.consensus import consensus
    from tardis_exp.factorize import factorize
    from tardis_exp.metrics import program_recovery
    from tardis_exp.preprocess import preprocess
    from tardis_exp.score import rank_genes
    from tardis_exp.synthetic import make_synthetic

    warnings.simplefilter("ignore")
    a = preprocess(make_synthetic())
    tp = a.var["true_program"].astype(str).to_numpy()
    labs = sorted(set(tp) - {"none"})
    print("| solver | tol | iterations (mean) | median loss | per-replicate recovery (median) | non-zero loadings "
          "of program components | same-program distance across replicates (mean over programs) | consensus: "
          "best K, recovery, outliers | with outlier_threshold=0.5 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arg in (argv if argv is not None else sys.argv[1:]):
        solver, tol = arg.split(":")
        b = a.copy()
        t = time.perf_counter()
        factorize(b, solver=solver, tol=float(tol), max_iter=5000, progress=False)
        nm = b.uns["nmf"]
        C = nm["components"]
        S = C.reshape(-1, C.shape[2]).astype(np.float64)
        L = S / np.linalg.norm(S, axis=1, keepdims=True)
        order = np.argsort(-rank_genes(S), axis=1)
        P = np.stack([(tp == lab)[order[:, :50]].mean(1) for lab in labs], 1)
        prog = P.max(1) > 0.8
        dists = []
        for t_ in range(len(labs)):
            idx = np.flatnonzero(prog & (P.argmax(1) == t_))
            dists.append(np.mean([np.linalg.norm(L[i] - L[j]) for i in idx for j in idx if i < j]))
        cons = []
        for thr in (0.35, 0.5):
            c = b.copy()
            consensus(c, progress=False, outlier_threshold=thr)
            cc = c.uns["nmf_consensus"]
            cons.append(f"{cc['best_k']}, {program_recovery(cc['spectra'], tp)[0]:.3f}, {cc['n_outliers']}")
        rep = np.median([program_recovery(h, tp)[0] for h in C])
        print(f"| {solver} | {tol} | {nm['n_iter'].mean():.0f} | {np.median(nm['errors']):.2f} | {rep:.3f} | "
              f"{np.median((S[prog] > 0).mean(1)):.2f} | {np.mean(dists):.3f} | {cons[0]} | {cons[1]} |", flush=True)
        print(f"  ({arg}: {time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
