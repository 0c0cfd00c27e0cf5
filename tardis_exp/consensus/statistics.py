"""Monti et al. (2003) consensus statistics, shared by both consensus methods.

Consensus matrices from resample labels, their CDF, area and PAC, the cophenetic
correlation and mean cluster consensus of their cut, the silhouette, the replicate
recurrence, and the standard errors of each measured from random halves of the resamples
(:func:`half_spread`) or of the replicates (:func:`recurrence_spread`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.cluster.hierarchy import cophenet, fcluster, linkage
from scipy.spatial.distance import squareform

from ..errors import InputError


@dataclass(frozen=True, kw_only=True)
class Resampling:
    """The settings both methods share: the K range, the resampling, the K rule.

    ``rule`` is resolved (not ``auto``); ``tol``, ``z`` and ``spread_splits`` are
    ``k_tolerance``, ``k_z`` and ``k_spread_splits``; ``agg`` the spectra's aggregation;
    ``store_items`` the items kept of each consensus matrix; ``confident_margin`` the margin
    below which the K is reported with its candidates (``consensus.confident_margin``).
    """

    min_k: int
    max_k: int
    n_resamples: int
    frac: float
    rule: str
    tol: float
    z: float
    spread_splits: int
    agg: str
    store_items: int
    progress: bool | None
    confident_margin: float


CDF_GRID = np.linspace(0, 1, 101)


def consensus_from_labels(labels: np.ndarray) -> np.ndarray:
    """Consensus matrix from resample labels (resamples x items, -1 = not sampled).

    ``M[i, j]`` = times i and j share a cluster / times both were sampled. Built as two
    sparse products (one-hot @ one-hot.T), never a Python loop over pairs.
    """
    R, N = labels.shape
    sampled = labels >= 0
    offs = np.cumsum([0] + [int(labels[r].max()) + 1 for r in range(R - 1)])
    rr, ii = np.nonzero(sampled)
    cols = labels[rr, ii] + offs[rr]
    B = sp.csr_matrix((np.ones(len(ii), np.float32), (ii, cols)), shape=(N, int(cols.max()) + 1))
    co = (B @ B.T).toarray()
    S = sp.csr_matrix(sampled.T.astype(np.float32))
    both = (S @ S.T).toarray()
    with np.errstate(invalid="ignore", divide="ignore"):
        M = np.where(both > 0, co / np.maximum(both, 1), 0.0)
    np.fill_diagonal(M, 1.0)
    return M.astype(np.float32)


def _upper(M):
    return M[np.triu_indices_from(M, k=1)]


def cdf_stats(M: np.ndarray, pac_window=(0.1, 0.9)) -> dict:
    """Empirical CDF of the off-diagonal consensus values, its area and PAC."""
    v = np.sort(_upper(M).astype(np.float64))
    cdf = np.searchsorted(v, CDF_GRID, side="right") / max(len(v), 1)
    # Monti's area: sum over the sorted consensus values of (x_i - x_{i-1}) * CDF(x_i)
    area = float(np.sum(np.diff(CDF_GRID) * cdf[1:]))
    lo, hi = pac_window
    pac = float(np.mean((v > lo) & (v < hi))) if len(v) else 0.0
    return {"cdf": cdf, "area": area, "pac": pac}


def cluster_consensus(M: np.ndarray, k: int, method: str = "average"):
    """Cut the consensus matrix into k clusters; return labels, cophenetic corr., mean cluster consensus."""
    D = 1.0 - M.astype(np.float64)
    np.fill_diagonal(D, 0)
    d = squareform(np.clip(D, 0, None), checks=False)
    Z = linkage(d, method=method)
    labels = fcluster(Z, k, criterion="maxclust") - 1
    coph = float(cophenet(Z, d)[0]) if d.std() > 0 else 1.0
    mcc = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) > 1:
            sub = M[np.ix_(idx, idx)]
            mcc.append(_upper(sub).mean())
        else:
            mcc.append(1.0)
    return labels, (coph if np.isfinite(coph) else 0.0), float(np.mean(mcc)), Z


def half_spread(ks, label_sets, n_splits: int = 4, rng=None, max_items: int = 300, item_dist=None) -> dict:
    """Standard error of each per-K statistic, measured from random halves of the resamples.

    The resamples of every K are split at random into two halves ``n_splits`` times; each
    half's consensus matrix gives the statistics again. With ``s`` the standard deviation
    of the half estimates, the standard error of the full estimate (twice the resamples)
    is ``s / sqrt(2)``. The halves are computed on a fixed random subset of at most
    ``max_items`` items (the hierarchical clustering is quadratic in the items); the same
    split is used for every K so that delta-area is measured too. Returns zeros where a K
    has fewer than 4 resamples (nothing to split).
    """
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(rng)
    R, N = label_sets[ks[0]].shape
    keys = ("pac", "area", "cophenetic", "silhouette")
    zeros = {k: np.zeros(len(ks)) for k in (*keys, "delta_area")}
    if R < 4 or n_splits < 1:
        return zeros
    sub = np.sort(rng.choice(N, size=min(N, max_items), replace=False))
    est = {k: np.zeros((n_splits * 2, len(ks))) for k in keys}
    for s in range(n_splits):
        perm = rng.permutation(R)
        for h, half in enumerate((perm[: R // 2], perm[R // 2:])):
            for ki, kk in enumerate(ks):
                L = label_sets[kk][np.ix_(half, sub)]
                # items never sampled together in this half: leave the pair out (consensus 0)
                M = consensus_from_labels(L)
                st = cdf_stats(M)
                labels, coph, _, _ = cluster_consensus(M, kk)
                D = item_dist[np.ix_(sub, sub)].copy() if item_dist is not None else np.clip(1 - M, 0, None)
                np.fill_diagonal(D, 0)
                n_lab = len(np.unique(labels))
                est["pac"][2 * s + h, ki] = st["pac"]
                est["area"][2 * s + h, ki] = st["area"]
                est["cophenetic"][2 * s + h, ki] = coph
                est["silhouette"][2 * s + h, ki] = (silhouette_score(D, labels, metric="precomputed")
                                                    if 1 < n_lab < len(labels) else np.nan)
    area = est["area"]
    delta = np.empty_like(area)
    delta[:, 0] = area[:, 0]
    delta[:, 1:] = (area[:, 1:] - area[:, :-1]) / np.where(area[:, :-1] > 0, area[:, :-1], 1)
    est["delta_area"] = delta
    return {k: np.nan_to_num(np.nanstd(v, axis=0, ddof=1) / np.sqrt(2), nan=0.0) for k, v in est.items()}


def _per_k_stats(ks, label_sets, item_dist=None, store_idx=None):
    """Consensus matrix and statistics for every K."""
    from sklearn.metrics import silhouette_score

    out = {k: [] for k in ("pac", "area", "cophenetic", "mean_cluster_consensus", "silhouette")}
    cdfs, final_labels, mats = {}, {}, {}
    for k in ks:
        M = consensus_from_labels(label_sets[k])
        st = cdf_stats(M)
        labels, coph, mcc, _ = cluster_consensus(M, k)
        out["pac"].append(st["pac"])
        out["area"].append(st["area"])
        out["cophenetic"].append(coph)
        out["mean_cluster_consensus"].append(mcc)
        D = item_dist if item_dist is not None else np.clip(1 - M, 0, None)
        np.fill_diagonal(D, 0)
        n_lab = len(np.unique(labels))
        out["silhouette"].append(
            float(silhouette_score(D, labels, metric="precomputed")) if 1 < n_lab < len(labels) else np.nan
        )
        cdfs[k] = st["cdf"]
        final_labels[k] = labels
        mats[k] = M if store_idx is None else M[np.ix_(store_idx, store_idx)]
    area = np.asarray(out["area"])
    delta = np.empty_like(area)
    delta[0] = area[0]
    delta[1:] = (area[1:] - area[:-1]) / np.where(area[:-1] > 0, area[:-1], 1)
    out["delta_area"] = list(delta)
    return out, cdfs, final_labels, mats


def replicate_recurrence(labels, item_replicate, n_replicates: int, k: int) -> float:
    """Fraction of (meta-program, replicate) pairs in which the replicate has exactly one component.

    A program the data hold is found once by every restart: its cluster of components
    draws one member from each replicate. Below the true K two programs merge into one
    cluster (two members per replicate), above it a cluster is noise or a splinter of a
    program (no member from most replicates): both lower the fraction. ``labels``: cluster
    of each item (-1 = not sampled / outlier).
    """
    return float(np.mean(_members_per_replicate(labels, item_replicate, n_replicates, k) == 1))


def _members_per_replicate(labels, item_replicate, n_replicates, k):
    labels = np.asarray(labels)
    ok = labels >= 0
    n = np.zeros((k, n_replicates))
    np.add.at(n, (labels[ok], np.asarray(item_replicate)[ok]), 1)
    return n


def recurrence_spread(ks, final_labels, item_replicate, n_replicates: int, n_splits: int = 4, rng=None):
    """Standard error of :func:`replicate_recurrence` per K, from random halves of the replicates.

    The uncertainty that matters is which restarts were run: the replicates are split at
    random into halves ``n_splits`` times and the recurrence of each half (over its own
    replicates, the clusters fixed) is measured; the standard error of the full estimate
    is the standard deviation of the halves over sqrt(2). Zeros with fewer than 4 replicates.
    """
    rng = np.random.default_rng(rng)
    if n_replicates < 4 or n_splits < 1:
        return np.zeros(len(ks))
    ones = [_members_per_replicate(final_labels[kk], item_replicate, n_replicates, kk) == 1 for kk in ks]
    est = np.zeros((2 * n_splits, len(ks)))
    for s in range(n_splits):
        perm = rng.permutation(n_replicates)
        for h, half in enumerate((perm[: n_replicates // 2], perm[n_replicates // 2:])):
            est[2 * s + h] = [o[:, half].mean() for o in ones]
    return est.std(0, ddof=1) / np.sqrt(2)


def _clip_range(min_k, max_k, n_items, n_sampled, what):
    top = min(n_sampled - 1, n_items - 1)
    if top < 2:
        raise InputError(
            f"consensus needs at least 3 {what} in each resample, got {n_sampled} "
            f"(raise consensus.resample_frac or factorize.n_components/n_replicates)"
        )
    if max_k > top:
        warnings.warn(
            f"consensus.max_clusters={max_k} cannot be fit: a resample holds only {n_sampled} {what} "
            f"(consensus.resample_frac); clipping the K range to [{min(min_k, top)}, {top}]",
            UserWarning, stacklevel=3,
        )
        max_k = top
        min_k = min(min_k, top)
    return int(min_k), int(max_k)


def _per_k_result(ks, best, spectra, stats, cdfs, mats, spread, info) -> dict:
    """The entries of ``uns['nmf_consensus']`` both methods share."""
    return {
        "k_values": np.array(ks),
        "best_k": int(best),
        "runner_up_k": int(info["runner_up_k"]),
        "k_margin": float(info["margin"]),
        # the K the data do not separate from best_k (consensus.confident_margin), and each K's gap
        "k_candidates": np.asarray(info["candidates"], dtype=np.int64),
        "k_gap": np.asarray(info["gaps"], dtype=np.float64),
        "k_tolerance_measured": np.asarray(info["tolerance"], dtype=np.float64),
        **{f"{key}_se": np.asarray(val, dtype=np.float64) for key, val in spread.items()},
        "spectra": spectra,
        **{key: np.asarray(val, dtype=np.float64) for key, val in stats.items()},
        "cdf": np.stack([cdfs[kk] for kk in ks]),
        "cdf_grid": CDF_GRID,
        "matrices": {str(kk): mats[kk] for kk in ks},
    }


def _aggregate(members: np.ndarray, how: str) -> np.ndarray:
    L = _l2rows(members.astype(np.float64))
    return np.median(L, axis=0) if how == "median" else L.mean(0)


def _l2rows(A):
    n = np.linalg.norm(A, axis=1, keepdims=True)
    n[n == 0] = 1
    return A / n


def _pearson_dist(A, center_genes=True):
    A = _l2rows(A.astype(np.float64))
    if center_genes:
        # loadings shared by every component (background, library size) would otherwise
        # dominate the correlation; compare what distinguishes the components
        A = A - A.mean(0, keepdims=True)
    C = np.corrcoef(A)
    C = np.nan_to_num(C, nan=0.0)
    D = 1 - C
    np.fill_diagonal(D, 0)
    return np.clip(D, 0, 2)
