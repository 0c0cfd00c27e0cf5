"""``consensus.method=spots`` (what the seed's documentation describes; Brunet et al. 2004).

For every K, ``n_resamples`` factorizations of rank K on resampled spots -- all of them
advanced together by the batched solver -- each spot labelled by its largest usage;
co-clustering is counted over spots. Only ``max_spots`` spots (a seeded random subset) enter
the n x n consensus matrix used to choose K; every spot is labelled afterwards from the
usages refit on the consensus spectra.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from ..krules import candidates, report_k, select_k
from ..nmf import derive_seeds, fit_batch, prepare_matrix
from .statistics import Resampling, _aggregate, _clip_range, _per_k_result, _per_k_stats, half_spread


@dataclass(frozen=True, kw_only=True)
class SpotsSettings(Resampling):
    """:class:`Resampling` and the spots method's own settings (``consensus.random_state``: the
    factorizations' root seed, ``max_spots``, ``spots_max_iter``)."""

    random_state: int | None
    max_spots: int
    max_iter: int


def _spots(adata, *, rng, settings: SpotsSettings) -> dict:
    """Consensus over resampled spots at each K of the range; writes ``obs['nmf_spot_consensus']``.
    Returns the entries of ``uns['nmf_consensus']`` with ``spectra``."""
    s = settings
    min_k, max_k, n_resamples, frac, rule, tol = s.min_k, s.max_k, s.n_resamples, s.frac, s.rule, s.tol
    random_state, agg, max_spots, max_iter, store_items = (s.random_state, s.agg, s.max_spots, s.max_iter,
                                                           s.store_items)
    progress, k_z, spread_splits = s.progress, s.z, s.spread_splits
    X = prepare_matrix(adata.X)
    n = X.shape[0]
    cap = np.sort(rng.choice(n, size=min(max_spots, n), replace=False))
    Xc = X[cap]
    N = len(cap)
    n_sampled = max(1, int(np.floor(N * frac)))
    min_k, max_k = _clip_range(min_k, max_k, N, n_sampled, "spots")
    min_k, max_k = min_k, min(max_k, Xc.shape[1] - 1)
    ks = list(range(min_k, max_k + 1))

    ranks, masks = [], []
    for kk in ks:
        for _ in range(n_resamples):
            mask = np.zeros(N, dtype=bool)
            mask[rng.choice(N, size=n_sampled, replace=False)] = True
            ranks.append(kk)
            masks.append(mask)
    seeds = derive_seeds(random_state, len(ranks))
    # every (K, resample) factorization in one batch: one pass over X per iteration
    fits = fit_batch(Xc, ranks, seeds, row_masks=masks, max_iter=max_iter, progress=progress,
                     desc="spots consensus")
    label_sets, by_k = {}, {}
    for kk in ks:
        L = np.full((n_resamples, N), -1, dtype=np.int64)
        sel = [f for f in fits if f.rank == kk]
        for r, f in enumerate(sel):
            L[r, f.rows] = np.argmax(f.W[f.rows], axis=1)
        label_sets[kk] = L
        by_k[kk] = sel
    store_idx = None if N <= store_items else np.sort(rng.choice(N, store_items, replace=False))
    stats, cdfs, final_labels, mats = _per_k_stats(ks, label_sets, store_idx=store_idx)
    spread = half_spread(ks, label_sets, n_splits=spread_splits, rng=rng)
    best, info = select_k(ks, stats, rule, tol, spread=spread, z=k_z, return_info=True)
    info["candidates"] = candidates(ks, best, info, s.confident_margin)
    report_k(best, info, rule, ks, confident_margin=s.confident_margin)

    # Spectra at the best K: align every resample's components to the reference (the
    # lowest-error resample) by Hungarian matching on correlation, then aggregate.
    sel = by_k[best]
    ref = min(sel, key=lambda f: f.error).H.astype(np.float64)
    aligned = []
    for f in sel:
        C = np.corrcoef(np.vstack([ref, f.H]))[:best, best:]
        _, col = linear_sum_assignment(-np.nan_to_num(C))
        aligned.append(f.H[col])
    aligned = np.stack(aligned)  # resamples x K x genes
    spectra = np.stack([_aggregate(aligned[:, c], agg) for c in range(best)])

    spot_labels = np.full(n, -1)
    spot_labels[cap] = final_labels[best]
    cats = [str(c) for c in range(best)]
    adata.obs["nmf_spot_consensus"] = pd.Categorical(
        [cats[c] if c >= 0 else None for c in spot_labels], categories=cats
    )
    return {
        **_per_k_result(ks, best, spectra, stats, cdfs, mats, spread, info),
        "matrix_items": cap if store_idx is None else cap[store_idx],
        "n_items": N,
        "resample_errors": np.array([f.error for f in fits]),
    }
