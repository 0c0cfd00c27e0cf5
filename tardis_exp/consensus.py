"""Stage 3, consensus: Monti et al. (2003) consensus clustering over a range of K.

Two kinds of items can be clustered (``method``):

``'components'`` (default; what the seed's code does)
    The items are the NMF components of every replicate, pooled, compared by the
    Pearson correlation of their gene loadings. Outlier components (far from their
    neighbours, as in cNMF) are dropped first. For every K the pooled components are
    resampled ``n_resamples`` times and each resample is clustered (average linkage);
    a cluster of components is a meta-program, whose spectrum is the median (or mean)
    of its members' L2-normalized loadings. Spot usages are refit on the spectra (NNLS).

``'spots'`` (what the seed's documentation describes; Brunet et al. 2004)
    For every K, ``n_resamples`` factorizations of rank K on resampled spots -- all of
    them advanced together by the batched solver -- each spot labelled by its largest
    usage; co-clustering is counted over spots. Only ``max_spots`` spots (a seeded
    random subset) enter the n x n consensus matrix used to choose K; every spot is
    labelled afterwards from the usages refit on the consensus spectra.

Per K: the consensus matrix, its CDF, the area under the CDF and its relative increase
(delta-area, Monti), PAC (proportion of ambiguous clustering, Senbabaoglu et al. 2014),
the cophenetic correlation (Brunet) and the mean cluster consensus, each with its standard
error measured from random halves of the resamples (``pac_se``, ``cophenetic_se``, ...,
:func:`half_spread`); for ``method=components`` also the replicate recurrence (how close
the clusters come to one component of every replicate each, :func:`replicate_recurrence`,
with its error over halves of the replicates). The best K follows ``k_selection`` with that
measured tolerance (see :func:`select_k`; the default ``auto`` reads the recurrence with
``method=components``, PAC with ``method=spots``); ``runner_up_k`` and ``k_margin`` say how clearly it won (a margin
below 1 is logged as a warning: the data do not separate the two K). The statistics of
the rank itself (``stability``, ``spot_cophenetic``, ``rank_cophenetic``,
``cophenetic_drop``; :func:`rank_evidence`) let a sweep compare runs across
``n_components``.

With ``method=components`` a meta-program used nearly uniformly by every spot is the shared
background (a converged solver such as HALS gives it a component of its own in every
restart, and the recurrence rule would count it): its components leave the clustering, K is
chosen again over the others, and the background spectrum stays in the usage refit
(``background_ratio``, :func:`background_programs`).

Writes ``uns['nmf_consensus']`` (metrics per K, best K, spectra, item labels, consensus
matrices, ``background_spectra``), ``obsm['X_nmf_consensus']`` (refit usages, spots x best
K), ``obsm['X_nmf_background']`` (when a background was found) and, for
``method='spots'``, ``obs['nmf_spot_consensus']`` (consensus cluster of the spots used
for K selection).
"""

# Over 500 lines on purpose: the Monti statistics, the K-selection rules and both consensus
# methods share their per-K data; the K rules are being reworked in place (docs/layout.md).

from __future__ import annotations

import functools
import logging
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.cluster.hierarchy import cophenet, fcluster, linkage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import squareform

from .errors import ConfigError, InputError
from .outputs import Metric, Output, StageSpec
from .params import K_RULES, METHODS  # noqa: F401 -- re-exported
from .params import ConsensusParams as _P
from .params import check
from .nmf import derive_seeds, fit_batch, prepare_matrix, refit_usage
from .progress import progress_bar

log = logging.getLogger(__name__)

CDF_GRID = np.linspace(0, 1, 101)


def _at_best(key):
    """A per-K statistic of ``uns['nmf_consensus']`` at the chosen K."""
    def value(adata):
        c = adata.uns["nmf_consensus"]
        i = int(np.flatnonzero(np.asarray(c["k_values"]) == c["best_k"])[0])
        return float(c[key][i])
    return value


def _at_best_if(key):
    """:func:`_at_best` where the method measured ``key``, else None."""
    def value(adata):
        return _at_best(key)(adata) if key in adata.uns["nmf_consensus"] else None
    return value


def _entry(key):
    def value(adata):
        c = adata.uns["nmf_consensus"]
        return float(c[key]) if key in c else None
    return value


def _fits(adata, out) -> str | None:
    W = np.asarray(out.get("obsm", {}).get("X_nmf_consensus"))
    spectra = np.asarray(out.get("uns", {}).get("nmf_consensus", {}).get("spectra"))
    if W.ndim != 2 or W.shape[0] != adata.n_obs or spectra.ndim != 2 or spectra.shape[1] != adata.n_vars:
        return f"usages {W.shape} / spectra {spectra.shape} do not fit {adata.n_obs} spots x {adata.n_vars} genes"
    return None


_BY_K = ("pac", "cophenetic", "delta_area", "area", "mean_cluster_consensus", "silhouette")
SPEC = StageSpec(
    "consensus",
    writes=(
        Output("uns", "nmf_consensus", "metrics per K, best K and its evidence, spectra, item labels, "
               "consensus matrices"),
        Output("obsm", "X_nmf_consensus", "usages refit on the consensus spectra, spots x best K"),
        Output("obsm", "X_nmf_background", "usage of the shared background program(s), refit with the spectra",
               when="a background program was found (method=components)"),
        Output("obs", "nmf_spot_consensus", "consensus cluster of the spots used for K selection",
               when="method=spots"),
    ),
    metrics=(
        Metric("best_k", "number of programs K chosen by consensus.k_selection", _entry("best_k"), headline=True),
        Metric("refit_error", "reconstruction error of the consensus refit at the chosen K", _entry("refit_error"),
               headline=True),
        *(Metric(f"consensus.{k}", f"consensus {k.replace('_', ' ')} at the chosen K", _at_best(k), headline=True)
          for k in ("pac", "cophenetic", "delta_area", "mean_cluster_consensus", "silhouette")),
        Metric("consensus.recurrence", "replicate recurrence at the chosen K (method=components): fraction of "
               "(meta-program, replicate) pairs holding exactly one component", _at_best_if("recurrence"),
               headline=True),
        Metric("consensus.n_background", "background programs found (usage nearly uniform across spots; not "
               "counted in best_k)", _entry("n_background"), headline=True),
        Metric("consensus.parallel_rank", "rank Horn's parallel analysis gives the data (consensus.rank_bound="
               "parallel caps K there)", _entry("parallel_rank")),
        Metric("runner_up_k", "the second-best K under consensus.k_selection", _entry("runner_up_k"),
               headline=True),
        Metric("consensus.k_margin", "how far the chosen K beats the runner-up, in measured standard errors "
               "(below 1: the data do not separate them)", _entry("k_margin"), headline=True),
        *(Metric(f"consensus.{k}", f"consensus {k.replace('_', ' ')} of the trial's factorizations "
                 "(sweep objective candidates, docs/validation.md)", _entry(k), headline=True)
          for k in ("stability", "spot_cophenetic", "rank_cophenetic", "cophenetic_drop", "k_cophenetic",
                    "reproducibility")),
        *(Metric(f"consensus.{k}_by_k", f"consensus {k.replace('_', ' ')} for each K (step = K)",
                 lambda a, k=k: a.uns["nmf_consensus"][k], step="K",
                 steps=lambda a: a.uns["nmf_consensus"]["k_values"])
          for k in _BY_K),
    ),
    fits=_fits,
)


def check_params(**params) -> dict:
    """Validate consensus parameters before any compute (:class:`~tardis_exp.params.ConsensusParams`;
    missing ones take their defaults)."""
    return check("consensus", params, known_only=True)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), else ``None``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def estimate_spots_memory(n_spots: int, n_genes: int, ks, n_resamples: int, store_items: int) -> int:
    """Peak bytes of ``method='spots'`` for ``n_spots`` clustered spots and the K values ``ks``.

    Every (K, resample) factorization is held at once by the batched solver: W (spots x K)
    and H (K x genes) in float32, about three copies of each while it iterates; per K the
    resample labels (int64) and the stored consensus matrix (float64, at most
    ``store_items`` squared); three n x n float64 matrices (consensus, distance, linkage
    input) while one K is clustered.
    """
    ks = list(ks)
    fits = 3 * 4 * n_resamples * (n_spots + n_genes) * sum(ks)
    per_k = len(ks) * (8 * n_resamples * n_spots + 8 * min(n_spots, store_items) ** 2)
    return int(fits + per_k + 3 * 8 * n_spots**2)


def check_resources(shape, *, method="components", min_clusters=4, max_clusters=10, n_resamples=100,
                    resample_frac=0.8, max_spots=2000, store_matrix_items=400, **_) -> None:
    """Check the K range and the memory of ``method='spots'`` against the preprocessed data's
    ``shape`` (spots, genes), before the factorization; the message gives the estimate.

    A K range beyond what a resample of the spots can hold is an error, not a silent clip:
    ``max_clusters=5000`` on 900 spots would fit every K up to 719 (tens of GB). The
    ``components`` method clusters a few hundred components and keeps its clip warning.
    """
    n_obs, n_vars = int(shape[0]), int(shape[1])
    if n_obs <= int(min_clusters):
        # programs are told apart over spots (labels, silhouette, usages): K programs need
        # more than K spots, or every later step fails on degenerate input
        raise ConfigError(f"the preprocessed data has {n_obs} spots, too few for consensus.min_clusters="
                          f"{min_clusters} programs: at least {int(min_clusters) + 1} spots are needed "
                          "(lower consensus.min_clusters or use more spots)")
    if method != "spots":
        return
    n = min(int(max_spots), n_obs)
    n_sampled = max(1, int(np.floor(n * float(resample_frac))))
    top = min(n_sampled - 1, n - 1, n_vars - 1)
    gb = 1024**3
    if top < 2:
        raise ConfigError(f"consensus=spots needs at least 3 spots and genes in each resample; the preprocessed "
                          f"data has {n_obs} spots x {n_vars} genes (consensus.resample_frac={resample_frac})")
    lo = min(int(min_clusters), top)
    if int(max_clusters) > top:
        asked = estimate_spots_memory(n, n_vars, range(int(min_clusters), int(max_clusters) + 1),
                                      int(n_resamples), int(store_matrix_items))
        clipped = estimate_spots_memory(n, n_vars, range(lo, top + 1), int(n_resamples), int(store_matrix_items))
        raise ConfigError(
            f"consensus.max_clusters={max_clusters} is more than the {top} clusters a resample of {n_sampled} "
            f"of the {n_obs} spots x {n_vars} genes can hold (consensus.resample_frac={resample_frac}, "
            f"consensus.max_spots={max_spots}); K {lo}..{top} alone would need about {clipped / gb:.1f} GB "
            f"(the range asked for, {asked / gb:.1f} GB); set consensus.max_clusters <= {top}, "
            f"typically well below"
        )
    need = estimate_spots_memory(n, n_vars, range(int(min_clusters), int(max_clusters) + 1),
                                 int(n_resamples), int(store_matrix_items))
    avail = available_memory()
    if avail is not None and need > avail:
        raise ConfigError(
            f"consensus=spots with K {min_clusters}..{max_clusters}, {n_resamples} resamples of {n_sampled} "
            f"of {n} spots x {n_vars} genes needs about {need / gb:.1f} GB; {avail / gb:.1f} GB is available; "
            "lower consensus.max_clusters, consensus.n_resamples or consensus.max_spots"
        )


# ---------------------------------------------------------------- Monti statistics


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


def _oriented(rule, stats):
    """The statistic a rule reads, oriented so that higher is better."""
    key = {"pac": "pac", "cophenetic": "cophenetic", "brunet": "cophenetic", "delta_area": "delta_area",
           "silhouette": "silhouette", "recurrence": "recurrence"}[rule]
    sign = -1.0 if rule == "pac" else 1.0
    v = np.asarray(stats[key], dtype=np.float64)
    return key, sign * np.nan_to_num(v, nan=-np.inf if sign > 0 else np.inf)


def select_k(ks, stats: dict, rule: str = "pac", tolerance: float = 0.0, admissible=None,
             spread: dict | None = None, z: float = 2.0, return_info: bool = False,
             largest_stable: bool = False):
    """Choose K from per-K statistics, with a tolerance measured on the data.

    The tolerance of a comparison between two K is ``max(tolerance, z * se)``, where
    ``se`` combines the standard errors of the two values measured from the spread of
    the statistic across random halves of the resamples (``spread[key]``, see
    :func:`half_spread`); ``tolerance`` is only a floor. A difference smaller than that is
    noise: the run reports the K it could not separate (``runner_up_k``, ``margin``).

    ``brunet`` / ``cophenetic``
        Brunet et al. (2004): the K at which the cophenetic correlation *begins to fall*,
        i.e. the first K whose correlation exceeds that of K + 1 by more than the
        tolerance (the last K before the first significant drop).
    ``pac``
        The mirror image for PAC (Senbabaoglu et al. 2014): the last K before PAC first
        rises significantly. Below the true K clusters merge stably (PAC ~ 0), above it
        they split at random.
    ``delta_area``
        Monti et al. (2003): the last K whose relative CDF-area increase over K - 1 is
        significantly above 0 (the next K adds no consensus).
    ``silhouette``
        The K with the best silhouette of the items in their own distance.
    ``recurrence`` (``auto`` with ``method=components``, the default)
        The K whose clusters of components come closest to one component of every
        replicate each (:func:`replicate_recurrence`): a program the data hold is found
        once by every restart. Below the true K programs merge (two components per
        replicate in a cluster), above it clusters are splinters or noise (no component
        from most replicates): the statistic falls on both sides, so the rule takes its
        best value -- it neither stops at the first stable merge nor drifts to the largest
        stable K. Its tolerance is measured over random halves of the replicates
        (:func:`recurrence_spread`); K within it are told apart by the silhouette.
    ``auto``
        ``recurrence`` where ``stats`` has it (``method=components``), else ``pac``.

    For the three "last K before a change" rules a curve that never changes significantly
    gives the K with the best value; K within the tolerance of it are told apart by the
    silhouette in ``stats`` (how distinct the clusters are), else the smaller K is taken --
    never the largest K by default. The margin is below 1 when the chosen value is within
    the noise of the runner-up.

    ``largest_stable`` (``method=components``, for ``pac`` and ``brunet``/``cophenetic``):
    the largest admissible K whose value is within the tolerance of the best one. Clusters
    of components below the true K merge programs into clusters that are just as stable,
    so the first K before a change can be a merge; the K range there is bounded above by
    ``n_components`` and by the admissibility rule (clusters must recur across replicates),
    so the largest stable K is the answer and cannot drift past them. Only K marked ``admissible`` are chosen from (all,
    if none is).

    Returns the chosen K, or with ``return_info`` ``(K, info)`` where ``info`` holds
    ``runner_up_k`` (the best other K by the rule's own evidence), ``margin`` (the
    evidence for the chosen K over the runner-up, in units of the tolerance; < 1 means
    the data do not separate them) and ``tolerance`` (the measured tolerance per K).
    """
    ks = np.asarray(ks)
    if rule not in K_RULES:
        raise ConfigError(f"consensus.k_selection={rule!r} is unknown; choose one of {K_RULES}")
    if rule == "auto":
        rule = "recurrence" if "recurrence" in stats else "pac"
    adm = np.ones(len(ks), bool) if admissible is None else np.asarray(admissible, bool).copy()
    if not adm.any():
        warnings.warn("no K in the range gives clusters that recur in enough replicates "
                      "(consensus.min_cluster_replicates); choosing among all K", UserWarning, stacklevel=3)
        adm[:] = True
    key, v = _oriented(rule, stats)
    se = np.zeros(len(ks)) if spread is None or key not in spread else np.nan_to_num(
        np.asarray(spread[key], dtype=np.float64), nan=0.0)
    tol_k = np.maximum(tolerance, z * se)
    idx = np.flatnonzero(adm)

    def tol2(i, j):  # tolerance of the difference of two estimates
        return max(tolerance, z * float(np.hypot(se[i], se[j])), 1e-12)

    sil = np.asarray(stats.get("silhouette", np.full(len(ks), np.nan)), dtype=np.float64)

    def pick_by_value():
        # the best value; K the statistic cannot tell apart (within the tolerance) are told
        # apart by how distinct their clusters are (silhouette): with method=components a K
        # below the truth merges programs into clusters that are just as stable (PAC 0,
        # cophenetic 1) but less distinct. Without a silhouette: the smaller K.
        top = idx[np.argmax(v[idx])]
        tied = [i for i in idx if v[i] >= v[top] - tol2(i, top)]
        if rule != "silhouette" and len(tied) > 1 and np.isfinite(sil[tied]).any():
            best = tied[int(np.nanargmax(np.where(np.isfinite(sil[tied]), sil[tied], -np.inf)))]
        else:
            best = top
        others = [i for i in idx if i != best]
        runner = max(others, key=lambda i: v[i]) if others else best
        margin = float((v[best] - v[runner]) / tol2(best, runner)) if others else float("inf")
        return best, runner, margin

    # evidence per K of the change that decides it, in units of the tolerance
    ev = np.zeros(len(ks))
    if rule in ("silhouette", "recurrence"):
        best, runner, margin = pick_by_value()
    elif rule == "delta_area":
        # K_i gains consensus over K_i - 1 when delta(K_i) exceeds the tolerance; the first
        # K of the range has no K - 1 to gain over: it starts the run
        for i in range(1, len(ks)):
            ev[i] = v[i] / max(tolerance, z * se[i], 1e-12)
        best = idx[0]
        for i in idx[1:]:
            if ev[i] > 1:
                best = i
            else:
                break
        # the competitor is the next K: how far the gain at K stands above the gain after it
        runner = best + 1 if best + 1 < len(ks) else max(best - 1, 0)
        margin = float(ev[best] - max(ev[runner], 0.0)) if best != idx[0] else float(1.0 - ev[runner])
    elif largest_stable:
        top = idx[np.argmax(v[idx])]
        best = max(i for i in idx if v[i] >= v[top] - tol2(i, top))
        nxt = [i for i in range(best + 1, len(ks))]
        runner = nxt[0] if nxt else max((i for i in idx if i != best), key=lambda i: v[i], default=best)
        margin = float((v[best] - v[runner]) / tol2(best, runner)) if runner != best else float("inf")
    else:
        # drop after K_i: v[i] - v[i + 1] (the next K of the range, admissible or not: a K
        # whose successor splits into splinters still ends a stable run)
        for i in range(len(ks) - 1):
            ev[i] = (v[i] - v[i + 1]) / tol2(i, i + 1)
        drops = [i for i in idx if i + 1 < len(ks) and ev[i] > 1]
        if drops:
            best = drops[0]
            # the runner-up: another K with a significant drop after it and a value as good
            # within the noise (two supported K: the margin compares their drops); else the
            # best other value (a margin below 1 when it is as good as the chosen K's)
            others = [i for i in idx if i != best]
            rivals = [i for i in others if ev[i] > 1 and v[i] >= v[best] - tol2(i, best)]
            if rivals:
                runner = max(rivals, key=lambda i: ev[i])
                margin = float(ev[best] - ev[runner])
            elif others:
                runner = max(others, key=lambda i: v[i])
                margin = float((v[best] - v[runner]) / tol2(best, runner))
            else:
                runner, margin = best, float("inf")
        else:
            best, runner, margin = pick_by_value()
    info = {"runner_up_k": int(ks[runner]), "margin": margin, "tolerance": tol_k, "evidence": ev}
    return (int(ks[best]), info) if return_info else int(ks[best])


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


def _report_k(best, info, rule, ks, rank_bound=False):
    """Say so when the evidence does not separate the chosen K from the runner-up, and when
    the rank rather than the data bounds it (``rank_bound``: K = n_components, every
    component recurs)."""
    if info["runner_up_k"] != best and info["margin"] < 1:
        log.warning("consensus: the data do not separate K=%d from K=%d (rule %s, margin %.2f of the measured "
                    "tolerance); both are candidates -- look at k_selection.png", best, info["runner_up_k"],
                    rule, info["margin"])
    if rank_bound:
        log.warning("consensus: K=%d = factorize.n_components and every component recurs in the replicates; the "
                    "data may hold more programs than the rank -- raise factorize.n_components or sweep it "
                    "(sweep=k_range)", best)


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


def local_density_outliers(spectra: np.ndarray, n_neighbors: int, threshold: float) -> np.ndarray:
    """cNMF's filter: mean distance of each L2-normalized spectrum to its nearest neighbours.

    Returns a boolean mask of the components kept (distance <= ``threshold``).
    """
    L = _l2rows(spectra.astype(np.float64))
    G = L @ L.T
    D = np.sqrt(np.clip(2 - 2 * G, 0, None))
    np.fill_diagonal(D, np.inf)
    nn = max(1, min(n_neighbors, len(L) - 1))
    dens = np.sort(D, axis=1)[:, :nn].mean(1)
    return dens <= threshold, dens


# ---------------------------------------------------------------- the stage


def consensus(
    adata: ad.AnnData,
    *,
    method: str = _P.method,
    min_clusters: int = _P.min_clusters,
    max_clusters: int = _P.max_clusters,
    n_resamples: int = _P.n_resamples,
    resample_frac: float = _P.resample_frac,
    random_state: int | None = _P.random_state,
    k_selection: str = _P.k_selection,
    k_tolerance: float = _P.k_tolerance,
    k_z: float = _P.k_z,
    k_spread_splits: int = _P.k_spread_splits,
    outlier_threshold: float = _P.outlier_threshold,
    outlier_neighbors_frac: float = _P.outlier_neighbors_frac,
    min_cluster_replicates: float = _P.min_cluster_replicates,
    background_ratio: float = _P.background_ratio,
    rank_bound: str = _P.rank_bound,
    parallel_max_spots: int = _P.parallel_max_spots,
    spectra_agg: str = _P.spectra_agg,
    refit_max_iter: int = _P.refit_max_iter,
    max_spots: int = _P.max_spots,
    spots_max_iter: int = _P.spots_max_iter,
    store_matrix_items: int = _P.store_matrix_items,
    progress: bool | None = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Consensus clustering of NMF results for every K in ``[min_clusters, max_clusters]``.

    Parameters
    ----------
    adata
        Output of :func:`tardis_exp.factorize.factorize` (``uns['nmf']``); for
        ``method='spots'`` only ``X`` is needed.
    method
        ``'components'`` or ``'spots'`` (see the module docstring).
    min_clusters, max_clusters
        K range; clipped with a warning where a resample holds too few items.
    n_resamples, resample_frac
        Resamples per K and the fraction of items (components or spots) in each.
    random_state
        Root seed of the resampling (and of the spots method's factorizations).
    k_selection, k_tolerance, k_z, k_spread_splits
        Rule choosing the best K, see :func:`select_k` (``auto``: ``recurrence`` with
        ``method=components``, ``pac`` with ``method=spots``): two K are told apart when their
        statistics differ by more than ``k_z`` standard errors, measured from
        ``k_spread_splits`` random splits of the resamples into halves
        (:func:`half_spread`); ``k_tolerance`` is a floor on that tolerance.
    outlier_threshold, outlier_neighbors_frac
        Components method: drop components whose mean distance (between L2-normalized
        loadings) to their ``outlier_neighbors_frac * n_replicates`` nearest neighbours
        exceeds the threshold (cNMF's local density filter; 2 disables it).
    min_cluster_replicates
        Components method: a K is admissible only if each of its clusters holds components
        of at least this fraction of the replicates (0 disables the rule).
    background_ratio
        Components method: a meta-program whose usage is nearly uniform across spots --
        its coefficient of variation below ``background_ratio`` times the median over the
        programs -- is the shared background profile (a converged solver such as HALS puts
        it into a component of its own, which every restart finds). Its components leave
        the clustering, K is chosen again over the others, and the background spectrum is
        kept in the usage refit (``obsm['X_nmf_background']``) but counted neither in K
        nor in ``nmf_program`` (:func:`background_programs`; 0 disables).
    rank_bound, parallel_max_spots
        Components method: ``'parallel'`` caps the chosen K at the rank Horn's parallel
        analysis gives the data (:func:`parallel_analysis`, on a seeded subsample of at most
        ``parallel_max_spots`` spots): the replicates' recurrence cannot tell surplus
        components from programs once the replicates are converged (``factorize.solver=hals``),
        the data against a gene-permuted copy can. A study on 18 sets, not validated as the
        default (docs/validation.md, "Parallel analysis"). ``'none'``: no cap.
    spectra_agg
        ``'median'`` or ``'mean'`` of the members' loadings.
    refit_max_iter
        Iterations of the NNLS usage refit on the consensus spectra.
    max_spots, spots_max_iter
        Spots method: spots in the consensus matrix, iterations per resample factorization.
    store_matrix_items
        Consensus matrices kept in ``uns`` (for plots) are restricted to this many items.
    copy
        Return a modified copy instead of writing into ``adata``.
    """
    check_params(method=method, min_clusters=min_clusters, max_clusters=max_clusters, n_resamples=n_resamples,
                 resample_frac=resample_frac, random_state=random_state, k_selection=k_selection,
                 k_tolerance=k_tolerance, k_z=k_z, k_spread_splits=k_spread_splits,
                 outlier_threshold=outlier_threshold, outlier_neighbors_frac=outlier_neighbors_frac,
                 min_cluster_replicates=min_cluster_replicates, background_ratio=background_ratio,
                 rank_bound=rank_bound, parallel_max_spots=parallel_max_spots,
                 spectra_agg=spectra_agg,
                 refit_max_iter=refit_max_iter, max_spots=max_spots, spots_max_iter=spots_max_iter,
                 store_matrix_items=store_matrix_items)
    adata = adata.copy() if copy else adata
    t0 = time.perf_counter()
    rng = np.random.default_rng(random_state)
    k_selection = resolve_k_rule(k_selection, method)
    background = np.zeros((0, adata.n_vars))
    if method == "components":
        pa = None
        if rank_bound == "parallel":
            # its own stream: the resampling below draws what it draws without the bound
            pa_rng = np.random.default_rng(None if random_state is None else [random_state, 2])
            pa = parallel_analysis(adata.X, _pooled_components(adata).shape[1], pa_rng, max_spots=parallel_max_spots)
            log.info("consensus: parallel analysis gives rank %d (data / null per rank %s); K is capped there",
                     pa["rank"], np.round(pa["ratios"], 2).tolist())
        else:
            _warn_converged_replicates(adata, k_selection)
        # a partial, not a closure: the stage's warnings (stacklevel) still name the caller's line
        run = functools.partial(_components, adata, rng, min_clusters, max_clusters, n_resamples, resample_frac,
                                k_selection, k_tolerance, outlier_threshold, outlier_neighbors_frac, spectra_agg,
                                store_matrix_items, progress, min_cluster_replicates, k_z, k_spread_splits,
                                k_cap=None if pa is None else pa["rank"])

        res = run(report=False)  # said once, about the K that is kept
        # its own stream: runs without a background draw exactly what they drew before
        bg_rng = np.random.default_rng(None if random_state is None else [random_state, 1])
        bg = _find_background(adata, res, background_ratio, bg_rng, refit_max_iter)
        if bg is not None and bg["items"].any():
            # K counts the programs that tell spots apart: choose it again without the background
            first_k = res["best_k"]
            res = run(exclude=bg["items"])
            background = bg["spectra"]
            res.update(k_with_background=first_k, background_items=np.flatnonzero(bg["items"]))
            res["item_labels"][bg["items"]] = -2
        else:
            _report_k(res["best_k"], {"runner_up_k": res["runner_up_k"], "margin": res["k_margin"]}, k_selection,
                      res["k_values"], res["k_bounded_by_rank"])
        if bg is not None:  # every first-pass program's ratio: how far the data are from the threshold
            res["background_cv_ratio"] = bg["cv_ratio"]
        if pa is not None:
            res.update(parallel_rank=pa["rank"], parallel_ratios=pa["ratios"])
    else:
        res = _spots(adata, rng, random_state, min_clusters, max_clusters, n_resamples, resample_frac,
                     k_selection, k_tolerance, spectra_agg, max_spots, spots_max_iter, store_matrix_items,
                     progress, k_z, k_spread_splits)

    spectra = res.pop("spectra")
    K = len(spectra)
    W, err = refit_usage(adata.X, np.vstack([spectra, background]) if len(background) else spectra,
                         max_iter=refit_max_iter, progress=progress)
    adata.obsm["X_nmf_consensus"] = W[:, :K] if len(background) else W
    if len(background):
        adata.obsm["X_nmf_background"] = W[:, K:]
    elif "X_nmf_background" in adata.obsm:
        del adata.obsm["X_nmf_background"]
    res.update(spectra=spectra.astype(np.float32), refit_error=float(err), method=method,
               k_selection=k_selection, n_background=len(background),
               background_spectra=np.asarray(background, dtype=np.float32))
    res.update(rank_evidence(adata, res, rng))
    res["seconds"] = time.perf_counter() - t0
    adata.uns["nmf_consensus"] = res
    log.info("consensus (%s): K in %d..%d, best K = %d (runner-up %d, margin %.2f)", method, min(res["k_values"]),
             max(res["k_values"]), res["best_k"], res["runner_up_k"], res["k_margin"])
    return adata if copy else None


_EVIDENCE_SPOTS = 1000
_BACKGROUND_SPOTS = 10_000


def background_programs(usages, ratio: float = _P.background_ratio):
    """Programs used nearly uniformly across spots: the shared background profile.

    A program that tells spots apart is used strongly by some spots and little by others;
    the background (expression every spot shares, which a converged solver such as HALS
    puts into a component of its own) is used by every spot at a similar level. A program
    is background when the coefficient of variation of its usage across spots is below
    ``ratio`` times the median over the programs. Measured on 20 validation sets
    (docs/validation.md, "The shared background"): the HALS background programs sit at 0.09-0.22
    of the median, every other program of either solver at 0.49 or above. Needs 3
    programs or more, and at least 2 that are not background; returns
    ``(mask, cv / median)``.
    """
    U = np.asarray(usages, dtype=np.float64)
    k = U.shape[1]
    m = U.mean(0)
    cv = np.where(m > 0, U.std(0) / np.where(m > 0, m, 1), np.inf)
    med = float(np.median(cv))
    rel = cv / med if np.isfinite(med) and med > 0 else np.full(k, np.inf)
    bg = rel < ratio
    if k < 3 or ratio <= 0 or (~bg).sum() < 2:
        bg[:] = False
    return bg, rel


def _find_background(adata, res, ratio, rng, max_iter, max_spots: int = _BACKGROUND_SPOTS):
    """Background meta-programs at the chosen K, from usages refit on a spot subsample.

    ``None`` when switched off or fewer than 3 programs; else ``items`` (the background's
    pooled components, a mask: empty when none is background), ``spectra``, ``cv_ratio``.
    """
    spectra = res["spectra"]
    if ratio <= 0 or len(spectra) < 3:
        return None
    X = prepare_matrix(adata.X)
    n = X.shape[0]
    rows = np.sort(rng.choice(n, size=min(max_spots, n), replace=False))
    U, _ = refit_usage(X[rows], spectra, max_iter=max_iter, progress=False)
    bg, rel = background_programs(U, ratio)
    which = np.flatnonzero(bg)
    if bg.any():
        log.info("consensus: program(s) %s of K=%d are the shared background (usage CV %s of the median); K is "
                 "chosen again without them", which.tolist(), len(spectra), np.round(rel[which], 2).tolist())
    return {"items": np.isin(res["item_labels"], which), "spectra": spectra[which], "cv_ratio": rel}


def _warn_converged_replicates(adata, rule: str) -> None:
    """The recurrence rule was validated on MU replicates stopped at ``tol=1e-4``; replicates run
    to convergence (HALS, a smaller ``tol``, ``stop_rule=extrapolated``) keep surplus components
    that recur, and it then chose K above the planted one on Monti's sets (docs/validation.md,
    "Converged replicates and the K rule")."""
    p = adata.uns.get("nmf", {}).get("params") if isinstance(adata.uns.get("nmf"), dict) else None
    if rule != "recurrence" or not p:
        return
    solver, tol, stop = str(p.get("solver", "mu")), float(p.get("tol", 1e-4)), str(p.get("stop_rule", "change"))
    if solver == "mu" and tol >= 1e-4 and stop == "change":
        return
    what = ", ".join(x for x, bad in ((f"factorize.solver={solver}", solver != "mu"),
                                      (f"factorize.tol={tol:g}", tol < 1e-4),
                                      (f"factorize.stop_rule={stop}", stop != "change")) if bad)
    msg = (f"consensus: the replicates are run closer to convergence than the K rule was validated on ({what}); "
           "on Monti's sample-class sets such replicates made k_selection=auto choose K above the planted one "
           "(docs/validation.md, 'Converged replicates and the K rule'): check runner_up_k and k_selection.png, "
           "sweep factorize.n_components, or cap K with consensus.rank_bound=parallel")
    log.warning(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


def resolve_k_rule(k_selection: str, method: str) -> str:
    """``auto``: ``recurrence`` for ``method=components``, ``pac`` for ``method=spots``
    (``recurrence`` with ``method=spots`` is refused by ``ConsensusParams.cross_check``)."""
    if k_selection == "auto":
        return "recurrence" if method == "components" else "pac"
    return k_selection


def rank_evidence(adata, c: dict, rng, max_spots: int = _EVIDENCE_SPOTS) -> dict:
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
    nmf = adata.uns.get("nmf")
    if nmf is None:
        return out
    comps = np.asarray(nmf["components"])
    R, r, _ = comps.shape
    if R > 1 and r > 1 and "item_labels" in c:
        items = np.flatnonzero(np.asarray(c["item_labels"]) >= 0)
        if len(items) > r:
            D = _pearson_dist(comps.reshape(R * r, -1)[items])
            Z = linkage(squareform(D, checks=False), method="average")
            labels = fcluster(Z, r, criterion="maxclust")
            if 1 < len(np.unique(labels)) < len(labels):
                out["stability"] = float(silhouette_score(D, labels, metric="precomputed"))
    W = adata.obsm.get("X_nmf_replicates")
    if R > 1 and r > 1 and W is not None and np.shape(W)[1] == R * r:
        n = adata.n_obs
        sub = np.sort(rng.choice(n, size=min(max_spots, n), replace=False))
        U = np.asarray(W[sub], dtype=np.float64).reshape(len(sub), R, r)
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


def _per_k_result(ks, best, spectra, stats, cdfs, mats, spread, info) -> dict:
    """The entries of ``uns['nmf_consensus']`` both methods share."""
    return {
        "k_values": np.array(ks),
        "best_k": int(best),
        "runner_up_k": int(info["runner_up_k"]),
        "k_margin": float(info["margin"]),
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


def _pooled_components(adata) -> np.ndarray:
    """Every replicate's components (replicates x k x genes); the seed's single H as one replicate."""
    if "nmf" not in adata.uns and "X_nmf_components" not in adata.uns:
        raise InputError("consensus.method=components needs a factorization: run the factorize stage first "
                         "(uns['nmf'] or uns['X_nmf_components'] is missing)")
    return np.asarray(adata.uns["nmf"]["components"] if "nmf" in adata.uns else adata.uns["X_nmf_components"][None])


def _components(adata, rng, min_k, max_k, n_resamples, frac, rule, tol, out_thr, out_frac, agg,
                store_items, progress, min_reps, k_z=2.0, spread_splits=4, exclude=None, report=True, k_cap=None):
    comps = _pooled_components(adata)
    R, k, m = comps.shape
    if max_k > k and exclude is None:  # said by the first pass only
        # a meta-program is a cluster of components, one per replicate at most: more of
        # them than components in a factorization splits real programs or keeps noise
        new_min = min(min_k, k)
        warnings.warn(f"consensus.max_clusters={max_k} exceeds factorize.n_components={k} "
                      f"(method=components clusters the {k} components of each replicate); "
                      f"clipping the K range to [{new_min}, {k}]", UserWarning, stacklevel=3)
        log.warning("consensus: K range clipped to [%d, %d] = factorize.n_components", new_min, k)
        min_k, max_k = new_min, k
    spectra_all = comps.reshape(R * k, m).astype(np.float64)
    replicate = np.repeat(np.arange(R), k)

    alive = spectra_all.sum(1) > 0
    k_eff = k
    if exclude is not None:  # the background's components (see _find_background)
        exclude = np.asarray(exclude, bool)
        alive &= ~exclude
        k_eff = k - int(np.bincount(replicate[exclude], minlength=R).min())
        min_k, max_k = min(min_k, k_eff), min(max_k, k_eff)
    keep = alive.copy()
    density = np.zeros(len(spectra_all))
    if R > 1 and out_thr < 2:
        kept, dens = local_density_outliers(spectra_all[alive], max(1, int(round(out_frac * R))), out_thr)
        keep[np.flatnonzero(alive)[~kept]] = False
        density[alive] = dens
    items = np.flatnonzero(keep)
    N = len(items)
    if N < 3:
        raise InputError(
            f"only {N} components left after the outlier filter (consensus.outlier_threshold={out_thr}); "
            "raise the threshold or factorize.n_replicates"
        )
    n_sampled = max(1, int(np.floor(N * frac)))
    min_k, max_k = _clip_range(min_k, max_k, N, n_sampled, "components")
    ks = list(range(min_k, max_k + 1))

    D = _pearson_dist(spectra_all[items])
    label_sets = {kk: np.full((n_resamples, N), -1, dtype=np.int64) for kk in ks}
    for r in progress_bar(range(n_resamples), desc="consensus resamples", enabled=progress):
        idx = np.sort(rng.choice(N, size=n_sampled, replace=False))
        sub = D[np.ix_(idx, idx)]
        Z = linkage(squareform(sub, checks=False), method="average")  # one tree serves every K
        for kk in ks:
            label_sets[kk][r, idx] = fcluster(Z, kk, criterion="maxclust") - 1

    store_idx = None if N <= store_items else np.sort(rng.choice(N, store_items, replace=False))
    stats, cdfs, final_labels, mats = _per_k_stats(ks, label_sets, item_dist=D.copy(), store_idx=store_idx)
    # A meta-program must recur across replicates: a cluster fed by few replicates is a
    # splinter (noise, one restart's split), and a K that needs one is not a real K.
    need = int(np.ceil(min_reps * R))
    reps_per_cluster = {kk: np.array([len(np.unique(replicate[items[final_labels[kk] == c]]))
                                      for c in range(kk)]) for kk in ks}
    admissible = np.array([reps_per_cluster[kk].min() >= need for kk in ks])
    # the default rule's statistic: how close the clusters at K come to one component of
    # every replicate each (a program every restart finds once)
    stats["recurrence"] = [replicate_recurrence(final_labels[kk], replicate[items], R, kk) for kk in ks]
    spread = half_spread(ks, label_sets, n_splits=spread_splits, rng=rng, item_dist=D)
    spread["recurrence"] = recurrence_spread(ks, final_labels, replicate[items], R, spread_splits, rng)
    best, info = select_k(ks, stats, rule, tol, admissible, spread=spread, z=k_z, return_info=True,
                          largest_stable=rule in ("pac", "brunet", "cophenetic"))
    rule_k = best
    if k_cap is not None and best > k_cap:
        # the rule's choice is the runner-up; no margin is measured between the two
        best = max(int(k_cap), ks[0])
        info = {**info, "runner_up_k": int(rule_k), "margin": float("nan")}
        if report:
            log.info("consensus: K=%d (k_selection=%s chose %d, above the parallel-analysis rank %d)", best, rule,
                     rule_k, k_cap)
    # every component of the factorization recurs: the rank, not the data, bounds K
    rank_bound = bool(best == k_eff and R > 1 and stats["recurrence"][ks.index(best)] >= 0.9)
    if report:
        _report_k(best, info, rule, ks, rank_bound)

    # average linkage can return fewer than K clusters (ties); keep the clusters that exist
    present, labels = np.unique(final_labels[best], return_inverse=True)
    if len(present) < best:
        warnings.warn(f"consensus: K={best} gave only {len(present)} distinct clusters of components "
                      f"(raise factorize.n_replicates or lower consensus.max_clusters)", UserWarning, stacklevel=3)
    spectra = np.stack([_aggregate(spectra_all[items[labels == c]], agg) for c in range(len(present))])
    item_labels = np.full(R * k, -1)
    item_labels[items] = labels
    return {
        **_per_k_result(ks, best, spectra, stats, cdfs, mats, spread, info),
        "matrix_items": items if store_idx is None else items[store_idx],
        "item_labels": item_labels,  # cluster of each pooled component, -1 = outlier
        "k_bounded_by_rank": rank_bound,
        "k_rule_choice": int(rule_k),
        "admissible": admissible,
        "min_replicates_per_cluster": np.array([reps_per_cluster[kk].min() for kk in ks]),
        "item_replicate": replicate,
        "item_density": density,
        "n_items": N,
        "n_outliers": int(alive.sum() - N),
    }


def _spots(adata, rng, random_state, min_k, max_k, n_resamples, frac, rule, tol, agg, max_spots, max_iter,
           store_items, progress, k_z=2.0, spread_splits=4):
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
    _report_k(best, info, rule, ks)

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
