"""The rank of the factorization: Horn's parallel analysis (``consensus.rank_bound=parallel``)
and the statistics of the rank itself that let a sweep compare runs across ``n_components``
(:func:`rank_evidence`)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from ..keys import NMFKeys
from ..nmf import derive_seeds, fit_batch, prepare_matrix
from .statistics import _pearson_dist, cluster_consensus, consensus_from_labels

_EVIDENCE_SPOTS = 1000


def parallel_analysis(X, max_rank: int, rng, max_spots: int = 5000, fits: int = 2, tol: float = 1e-5,
                      max_iter: int = 5000) -> dict:
    """Horn's parallel analysis (1965) for the rank of a non-negative factorization.

    The sum of squares the k-th component explains, ``SS(k - 1) - SS(k)`` with ``SS(k)``
    the residual of the best of ``fits`` rank-k HALS fits run to ``tol``, is compared with
    the same quantity on a null copy of X whose genes are permuted across spots one by one
    (every gene keeps its values and sparsity; co-expression is gone). The rank is the
    last k, from 2 on, before the first whose component explains no more than the null's
    (rank 1, about the mean profile, is not judged). Ranks 1 to ``max_rank + 1`` are
    fitted, on a seeded subsample of at most ``max_spots`` spots. Returns ``rank`` (at most
    ``max_rank + 1``: the data support more than ``max_rank``) and ``ratios`` (data / null
    per rank, from 1).
    """
    X = prepare_matrix(X)
    n, m = X.shape
    rows = np.sort(rng.choice(n, size=min(max_spots, n), replace=False))
    S = X[rows]
    D = np.ascontiguousarray(S.toarray() if sp.issparse(S) else np.asarray(S), dtype=np.float32)
    D0 = np.take_along_axis(D, np.argsort(rng.random(D.shape), axis=0), axis=0)
    top = max(2, min(int(max_rank) + 1, min(D.shape) - 1))
    ranks = [k for k in range(1, top + 1) for _ in range(fits)]
    seeds = derive_seeds(int(rng.integers(2**31)), 2 * len(ranks))

    def explained(M, sd):
        res = fit_batch(M, ranks, sd, solver="hals", tol=tol, max_iter=max_iter, progress=False, warn=False,
                        desc="parallel analysis")
        ss = np.array([min(r.error for r in res if r.rank == k) for k in range(1, top + 1)], np.float64) ** 2
        return -np.diff(np.concatenate([[float(np.einsum("ij,ij->", M, M, dtype=np.float64))], ss]))

    d, d0 = explained(D, seeds[:len(ranks)]), explained(D0, seeds[len(ranks):])
    ratios = d / np.where(d0 > 0, d0, np.finfo(np.float64).tiny)
    fail = np.flatnonzero(ratios[1:] <= 1.0)
    return {"rank": int(fail[0]) + 1 if len(fail) else top, "ratios": ratios}


def rank_evidence(adata, c: dict, rng, max_spots: int = _EVIDENCE_SPOTS, nmf: NMFKeys = NMFKeys()) -> dict:
    """Statistics of the factorization rank itself, for comparing runs across ``n_components``.

    ``stability``
        cNMF's stability (Kotliar et al. 2019): silhouette of the pooled components of all
        replicates (outliers dropped) clustered into ``n_components`` clusters, in their
        Pearson distance. Lower when the replicates disagree on some component.
    ``spot_cophenetic``
        Brunet et al. (2004)'s statistic at rank ``n_components``: each replicate is a
        restart on all spots, each spot labelled by its largest usage; cophenetic
        correlation of the consensus of those labels (at most ``max_spots`` spots).
    ``rank_cophenetic``
        ``spot_cophenetic`` when the chosen K equals ``n_components``, else ``spot_cophenetic
        - 1``: the sweep objective (``sweep=k_range``). Across trials it is Brunet's curve over
        ranks, and a trial whose K is not its rank ranks below the trials it describes.
    ``cophenetic_drop``
        The cophenetic correlation at the chosen K minus that at K + 1 (Brunet's drop;
        NaN at the top of the range).
    ``k_cophenetic``
        Brunet's statistic at the trial's *answer* K: in every replicate each spot is
        labelled by the meta-program that explains most of its expression (the summed
        ``W[:, j] * H[j].sum()`` of the replicate's components in that meta-program,
        outliers left out); cophenetic correlation of the consensus of those labels cut
        into K clusters. Equal in spirit to ``spot_cophenetic`` when K = ``n_components``,
        and defined for every trial: an answer whose spot assignment changes from restart
        to restart (a merge of programs the restarts do not agree on, a split of one
        program) scores lower.
    ``reproducibility``
        The sweep objective (``sweep=k_range``): ``(silhouette + k_cophenetic) / 2``
        (:func:`reproducibility`), the two reproducibilities of the answer -- its meta-programs are tight,
        distinct clusters of the components (silhouette at K; a K forced below the truth
        merges programs into loose clusters) and the spots' assignment to them agrees
        across restarts (``k_cophenetic``; a rank below the truth that every restart
        factorizes the same way still assigns the spots between programs inconsistently).
    """
    from sklearn.metrics import silhouette_score

    out = {"stability": np.nan, "spot_cophenetic": np.nan, "rank_cophenetic": np.nan, "cophenetic_drop": np.nan,
           "k_cophenetic": np.nan, "reproducibility": np.nan}
    ks = list(np.asarray(c["k_values"]))
    i = ks.index(c["best_k"])
    if i + 1 < len(ks):
        out["cophenetic_drop"] = float(c["cophenetic"][i] - c["cophenetic"][i + 1])
    fit = adata.uns.get(nmf.uns)
    if fit is None:
        return out
    comps = np.asarray(fit["components"])
    R, r, _ = comps.shape
    if R > 1 and r > 1 and "item_labels" in c:
        items = np.flatnonzero(np.asarray(c["item_labels"]) >= 0)
        if len(items) > r:
            D = _pearson_dist(comps.reshape(R * r, -1)[items])
            Z = linkage(squareform(D, checks=False), method="average")
            labels = fcluster(Z, r, criterion="maxclust")
            if 1 < len(np.unique(labels)) < len(labels):
                out["stability"] = float(silhouette_score(D, labels, metric="precomputed"))
    W = adata.obsm.get(nmf.replicates)
    if R > 1 and r > 1 and W is not None and np.shape(W)[1] == R * r:
        n = adata.n_obs
        sub = np.sort(rng.choice(n, size=min(max_spots, n), replace=False))
        W = W[sub]
        if hasattr(W, "dask"):  # the factorize stage's Dask usages: fetched here, a block at a time
            W = W.compute(scheduler="threads")
        U = np.asarray(W, dtype=np.float64).reshape(len(sub), R, r)
        M = consensus_from_labels(U.argmax(2).T)
        out["spot_cophenetic"] = float(cluster_consensus(M, r)[1])
        # the sweep objective: Brunet's statistic describes a trial's answer only when that
        # answer is the rank (K = n_components); a trial that chose fewer meta-programs
        # than its rank scores below every trial it does describe
        answer = int(c["best_k"]) + int(c.get("n_background", 0))  # the background is one of the rank's
        out["rank_cophenetic"] = out["spot_cophenetic"] - (0.0 if answer == r else 1.0)
        if "item_labels" in c:
            out["k_cophenetic"] = _k_cophenetic(U, comps, np.asarray(c["item_labels"]), int(c["best_k"]))
            i_k = ks.index(c["best_k"])
            sil = float(np.asarray(c["silhouette"])[i_k])
            out["reproducibility"] = reproducibility(sil, out["k_cophenetic"])
    return out


def reproducibility(silhouette: float, k_cophenetic: float) -> float:
    """The sweep objective: the mean of the answer's two reproducibilities, NaN if either is.

    Both are 1 for an answer every restart reproduces exactly; the silhouette (of the
    components at K) is the spread-out one of the two, so a mean, not a minimum, lets a
    clear loss of spot agreement (``k_cophenetic``) count where the silhouette is low for
    every rank (noisy data: Monti's simulations, where a minimum reduces to the silhouette
    and ranks rank 2 first on the 6-class set).
    """
    s, c = float(silhouette), float(k_cophenetic)
    return (s + c) / 2 if np.isfinite(s) and np.isfinite(c) else float("nan")


def _k_cophenetic(U, comps, item_labels, k: int) -> float:
    """Cophenetic correlation of the replicates' spot labels mapped to the K meta-programs.

    ``U``: usages (spots x replicates x rank); ``comps``: (replicates x rank x genes);
    ``item_labels``: meta-program of every pooled component (-1 = outlier).
    """
    R, r, _ = comps.shape
    lab = item_labels.reshape(R, r)
    # expression each component explains in each spot (scale-free, unlike W alone)
    E = U * comps.sum(2)[None, :, :]
    labels = np.zeros((R, U.shape[0]), dtype=np.int64)
    for rep in range(R):
        meta = np.zeros((U.shape[0], k))
        for j in range(r):
            if lab[rep, j] >= 0:
                meta[:, lab[rep, j]] += E[:, rep, j]
        labels[rep] = meta.argmax(1)
    if k < 2 or len(np.unique(labels)) < 2:
        return float("nan")
    return float(cluster_consensus(consensus_from_labels(labels), k)[1])
