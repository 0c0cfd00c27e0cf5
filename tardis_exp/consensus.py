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
the cophenetic correlation (Brunet) and the mean cluster consensus. The best K follows
``k_selection`` (see :func:`select_k`).

Writes ``uns['nmf_consensus']`` (metrics per K, best K, spectra, item labels, consensus
matrices), ``obsm['X_nmf_consensus']`` (refit usages, spots x best K) and, for
``method='spots'``, ``obs['nmf_spot_consensus']`` (consensus cluster of the spots used
for K selection).
"""

from __future__ import annotations

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

from .errors import ConfigError, InputError, check_choice, check_float, check_int
from .nmf import derive_seeds, fit_batch, prepare_matrix, refit_usage
from .progress import progress_bar

log = logging.getLogger(__name__)

METHODS = ("components", "spots")
K_RULES = ("pac", "cophenetic", "delta_area", "silhouette")
CDF_GRID = np.linspace(0, 1, 101)


def check_params(*, method="components", min_clusters=4, max_clusters=10, n_resamples=100,
                 resample_frac=0.8, k_selection="pac", spectra_agg="median", max_spots=2000,
                 random_state=42, k_tolerance=0.02, min_cluster_replicates=0.5, refit_max_iter=200,
                 spots_max_iter=500, store_matrix_items=400, **_) -> None:
    """Validate consensus parameters before any compute."""
    check_choice(method, "consensus.method", METHODS)
    check_choice(k_selection, "consensus.k_selection", K_RULES)
    check_choice(spectra_agg, "consensus.spectra_agg", ("median", "mean"))
    min_clusters = check_int(min_clusters, "consensus.min_clusters", minimum=2)
    if isinstance(max_clusters, bool) or not isinstance(max_clusters, (int, float, np.integer, np.floating)) \
            or int(max_clusters) != max_clusters or max_clusters < min_clusters:
        raise ConfigError(
            f"consensus.max_clusters={max_clusters} must be an integer >= consensus.min_clusters={min_clusters}"
        )
    check_int(n_resamples, "consensus.n_resamples", minimum=1)
    check_float(resample_frac, "consensus.resample_frac", low=0, high=1, low_open=True)
    check_int(max_spots, "consensus.max_spots", minimum=2)
    check_int(random_state, "consensus.random_state", minimum=0, allow_none=True)
    check_float(k_tolerance, "consensus.k_tolerance", low=0)
    check_float(min_cluster_replicates, "consensus.min_cluster_replicates", low=0, high=1)
    check_int(refit_max_iter, "consensus.refit_max_iter", minimum=1)
    check_int(spots_max_iter, "consensus.spots_max_iter", minimum=1)
    check_int(store_matrix_items, "consensus.store_matrix_items", minimum=0)


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


def select_k(ks, stats: dict, rule: str = "pac", tolerance: float = 0.02, admissible=None) -> int:
    """Choose K from per-K statistics.

    ``pac``
        The largest K whose PAC is within ``tolerance`` of the smallest PAC: below the
        true K clusters merge stably (PAC ~ 0 too), above it they split at random.
    ``cophenetic``
        The largest K whose cophenetic correlation is within ``tolerance`` of the best.
    ``delta_area``
        The largest K whose relative CDF-area increase exceeds ``tolerance`` (Monti).
    ``silhouette``
        The K with the best silhouette of the items in their own distance.

    Only K marked ``admissible`` are chosen from (all, if none is).
    """
    ks = np.asarray(ks)
    adm = np.ones(len(ks), bool) if admissible is None else np.asarray(admissible, bool)
    if not adm.any():
        warnings.warn("no K in the range gives clusters that recur in enough replicates "
                      "(consensus.min_cluster_replicates); choosing among all K", UserWarning, stacklevel=3)
        adm[:] = True
    if rule == "pac":
        v = np.asarray(stats["pac"])
        ok = adm & (v <= v[adm].min() + tolerance)
    elif rule == "cophenetic":
        v = np.asarray(stats["cophenetic"])
        ok = adm & (v >= v[adm].max() - tolerance)
    elif rule == "delta_area":
        v = np.asarray(stats["delta_area"])
        ok = adm & (v > tolerance)
        if not ok.any():
            return int(ks[adm][0])
    elif rule == "silhouette":
        v = np.where(adm, np.nan_to_num(np.asarray(stats["silhouette"], float), nan=-1), -np.inf)
        return int(ks[int(np.argmax(v))])
    else:
        raise ConfigError(f"consensus.k_selection={rule!r} is unknown; choose one of {K_RULES}")
    return int(ks[ok].max())


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
    method: str = "components",
    min_clusters: int = 4,
    max_clusters: int = 10,
    n_resamples: int = 100,
    resample_frac: float = 0.8,
    random_state: int | None = 42,
    k_selection: str = "pac",
    k_tolerance: float = 0.02,
    outlier_threshold: float = 0.5,
    outlier_neighbors_frac: float = 0.3,
    min_cluster_replicates: float = 0.5,
    spectra_agg: str = "median",
    refit_max_iter: int = 200,
    max_spots: int = 2000,
    spots_max_iter: int = 500,
    store_matrix_items: int = 400,
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
    k_selection, k_tolerance
        Rule choosing the best K, see :func:`select_k`.
    outlier_threshold, outlier_neighbors_frac
        Components method: drop components whose mean distance (between L2-normalized
        loadings) to their ``outlier_neighbors_frac * n_replicates`` nearest neighbours
        exceeds the threshold (cNMF's local density filter; 2 disables it).
    min_cluster_replicates
        Components method: a K is admissible only if each of its clusters holds components
        of at least this fraction of the replicates (0 disables the rule).
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
                 resample_frac=resample_frac, k_selection=k_selection, spectra_agg=spectra_agg,
                 max_spots=max_spots, random_state=random_state, k_tolerance=k_tolerance,
                 min_cluster_replicates=min_cluster_replicates, refit_max_iter=refit_max_iter,
                 spots_max_iter=spots_max_iter, store_matrix_items=store_matrix_items)
    adata = adata.copy() if copy else adata
    t0 = time.perf_counter()
    rng = np.random.default_rng(random_state)
    if method == "components":
        res = _components(adata, rng, min_clusters, max_clusters, n_resamples, resample_frac, k_selection,
                          k_tolerance, outlier_threshold, outlier_neighbors_frac, spectra_agg,
                          store_matrix_items, progress, min_cluster_replicates)
    else:
        res = _spots(adata, rng, random_state, min_clusters, max_clusters, n_resamples, resample_frac,
                     k_selection, k_tolerance, spectra_agg, max_spots, spots_max_iter, store_matrix_items,
                     progress)

    spectra = res.pop("spectra")
    W, err = refit_usage(adata.X, spectra, max_iter=refit_max_iter, progress=progress)
    adata.obsm["X_nmf_consensus"] = W
    res.update(spectra=spectra.astype(np.float32), refit_error=float(err), method=method,
               k_selection=k_selection, seconds=time.perf_counter() - t0)
    adata.uns["nmf_consensus"] = res
    log.info("consensus (%s): K in %d..%d, best K = %d", method, min(res["k_values"]), max(res["k_values"]), res["best_k"])
    return adata if copy else None


def _per_k_result(ks, best, spectra, stats, cdfs, mats) -> dict:
    """The entries of ``uns['nmf_consensus']`` both methods share."""
    return {
        "k_values": np.array(ks),
        "best_k": int(best),
        "spectra": spectra,
        **{key: np.asarray(val, dtype=np.float64) for key, val in stats.items()},
        "cdf": np.stack([cdfs[kk] for kk in ks]),
        "cdf_grid": CDF_GRID,
        "matrices": {str(kk): mats[kk] for kk in ks},
    }


def _aggregate(members: np.ndarray, how: str) -> np.ndarray:
    L = _l2rows(members.astype(np.float64))
    return np.median(L, axis=0) if how == "median" else L.mean(0)


def _components(adata, rng, min_k, max_k, n_resamples, frac, rule, tol, out_thr, out_frac, agg,
                store_items, progress, min_reps):
    if "nmf" not in adata.uns and "X_nmf_components" not in adata.uns:
        raise InputError("consensus.method=components needs a factorization: run the factorize stage first "
                         "(uns['nmf'] or uns['X_nmf_components'] is missing)")
    comps = np.asarray(adata.uns["nmf"]["components"] if "nmf" in adata.uns else
                       adata.uns["X_nmf_components"][None])
    R, k, m = comps.shape
    spectra_all = comps.reshape(R * k, m).astype(np.float64)
    replicate = np.repeat(np.arange(R), k)

    alive = spectra_all.sum(1) > 0
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
    best = select_k(ks, stats, rule, tol, admissible)

    # average linkage can return fewer than K clusters (ties); keep the clusters that exist
    present, labels = np.unique(final_labels[best], return_inverse=True)
    if len(present) < best:
        warnings.warn(f"consensus: K={best} gave only {len(present)} distinct clusters of components "
                      f"(raise factorize.n_replicates or lower consensus.max_clusters)", UserWarning, stacklevel=3)
    spectra = np.stack([_aggregate(spectra_all[items[labels == c]], agg) for c in range(len(present))])
    item_labels = np.full(R * k, -1)
    item_labels[items] = labels
    return {
        **_per_k_result(ks, best, spectra, stats, cdfs, mats),
        "matrix_items": items if store_idx is None else items[store_idx],
        "item_labels": item_labels,  # cluster of each pooled component, -1 = outlier
        "admissible": admissible,
        "min_replicates_per_cluster": np.array([reps_per_cluster[kk].min() for kk in ks]),
        "item_replicate": replicate,
        "item_density": density,
        "n_items": N,
        "n_outliers": int(alive.sum() - N),
    }


def _spots(adata, rng, random_state, min_k, max_k, n_resamples, frac, rule, tol, agg, max_spots, max_iter,
           store_items, progress):
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
    best = select_k(ks, stats, rule, tol)

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
        **_per_k_result(ks, best, spectra, stats, cdfs, mats),
        "matrix_items": cap if store_idx is None else cap[store_idx],
        "n_items": N,
        "resample_errors": np.array([f.error for f in fits]),
    }
