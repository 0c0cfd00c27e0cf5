"""``consensus.method=components`` (the default; what the seed's code does).

The items are the NMF components of every replicate, pooled, compared by the Pearson
correlation of their gene loadings. Outlier components (far from their neighbours, as in
cNMF) are dropped first. For every K the pooled components are resampled ``n_resamples``
times and each resample is clustered (average linkage); a cluster of components is a
meta-program, whose spectrum is the median (or mean) of its members' L2-normalized loadings.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from ..errors import InputError
from ..keys import NMFKeys
from ..krules import candidates, report_k, select_k
from ..progress import progress_bar
from .statistics import (Resampling, _aggregate, _clip_range, _l2rows, _pearson_dist, _per_k_result,
                         _per_k_stats, half_spread, recurrence_spread, replicate_recurrence)

log = logging.getLogger(__package__)


@dataclass(frozen=True, kw_only=True)
class ComponentsSettings(Resampling):
    """:class:`Resampling` and the components method's own settings (``consensus.outlier_threshold``,
    ``outlier_adaptive``, ``outlier_neighbors_frac``, ``min_cluster_replicates``)."""

    outlier_threshold: float
    outlier_adaptive: bool = False
    outlier_neighbors_frac: float
    min_replicates: float
    nmf: NMFKeys = NMFKeys()  # where the factorization is (factorize's key_added)


def local_density_outliers(spectra: np.ndarray, n_neighbors: int, threshold: float) -> np.ndarray:
    """cNMF's filter: mean distance of each L2-normalized spectrum to its nearest neighbours.

    Returns a boolean mask of the components kept (distance <= ``threshold``) and the distances.
    """
    dens = _local_density(_unit_distances(spectra), n_neighbors)
    return dens <= threshold, dens


def _unit_distances(spectra: np.ndarray) -> np.ndarray:
    """Euclidean distances between the L2-normalized spectra (diagonal: inf)."""
    L = _l2rows(spectra.astype(np.float64))
    D = np.sqrt(np.clip(2 - 2 * (L @ L.T), 0, None))
    np.fill_diagonal(D, np.inf)
    return D


def _local_density(D: np.ndarray, n_neighbors: int) -> np.ndarray:
    nn = max(1, min(n_neighbors, len(D) - 1))
    return np.sort(D, axis=1)[:, :nn].mean(1)


def recurring_components(D: np.ndarray, replicate: np.ndarray) -> np.ndarray:
    """Which components recur: each one's number of other replicates in which it and its nearest
    component there are each other's nearest (reciprocal best match), at least half of them.

    Scale-free: a program found again in another restart is that restart's closest component to
    it and the other way round however noisy both are, while a component only one restart has
    is at most one-sided nearest to the program it is split from. ``D``: distances between the
    components (diagonal inf), ``replicate``: each one's replicate.
    """
    reps = np.unique(replicate)
    nearest = np.full((len(D), len(reps)), -1)
    for j, r in enumerate(reps):
        idx = np.flatnonzero(replicate == r)
        nearest[:, j] = idx[np.argmin(D[:, idx], axis=1)]
    col = np.searchsorted(reps, replicate)  # each component's own replicate's column
    back = nearest[nearest, col[:, None]]  # the nearest's nearest in the component's replicate
    mutual = (back == np.arange(len(D))[:, None]) & (reps[None, :] != replicate[:, None])
    return mutual.sum(1) >= (len(reps) - 1) / 2


def separating_threshold(density: np.ndarray, recurs: np.ndarray) -> float | None:
    """The local density that best separates the recurring components from the others
    (Youden's J: fraction of recurring kept minus fraction of the others kept, the smallest
    density reaching its maximum). cNMF users are told to read it off the density histogram;
    this reads it off the components that recur. ``None`` when no component recurs; the
    largest recurring density when every component recurs."""
    if not recurs.any():
        return None
    if recurs.all():
        return float(density.max())
    t = np.unique(density)
    tpr = (density[recurs][None, :] <= t[:, None]).mean(1)
    fpr = (density[~recurs][None, :] <= t[:, None]).mean(1)
    return float(t[int(np.argmax(tpr - fpr))])


def outlier_filter(spectra: np.ndarray, replicate: np.ndarray, n_neighbors: int, threshold: float,
                   adaptive: bool = True, exclude: np.ndarray | None = None) -> dict:
    """The outlier filter of the pooled components: cNMF's local density (mean distance to the
    ``n_neighbors`` nearest), kept at most ``threshold`` -- raised, with ``adaptive``, to the
    density that separates the components that recur in the other replicates from those that do
    not (:func:`recurring_components`, :func:`separating_threshold`).

    A fixed threshold is a statement about the data's noise: 0.35 fits simulated counts, where a
    program's components from different restarts lie 0.1-0.3 apart, but on real 10x counts the
    same program's components lie 0.3-0.7 apart and the fixed threshold dropped 91 of 100
    components, programs that recur included (docs/validation.md, "Real counts").

    ``exclude``: components left out (the background's, a mask over ``spectra``; the second
    pass of :func:`~tardis_exp.consensus.consensus`). What the adaptive filter lets in is
    decided on every component the replicates produced, the excluded included: recurrence is
    relative to the pool (a component's reciprocal nearest in another replicate) and so is the
    density separating the recurring ones, and with the background's components taken out
    both moved -- broad mixtures that sat beside the background became each other's reciprocal
    nearest or fell under a threshold read off the rest, and were let in as a program (K = 5
    for 4 planted, ``test_hals_background_is_kept_out_of_k_and_of_the_program_labels``). The
    fixed threshold applies to the density without them, as it always did.

    Returns, over the components not excluded, ``keep`` (mask), ``density``, ``recurs`` (mask),
    ``threshold`` (the one applied).
    """
    D = _unit_distances(spectra)
    rest = np.ones(len(D), bool) if exclude is None else ~np.asarray(exclude, bool)
    density_all = _local_density(D, n_neighbors)
    recurs = recurring_components(D, replicate)
    density = density_all if exclude is None else _local_density(D[np.ix_(rest, rest)], n_neighbors)
    used = float(threshold)
    keep = density <= used
    if adaptive:
        data = separating_threshold(density_all, recurs)
        if data is not None and data > used:
            # raised only for the components that recur: a threshold read off overlapping
            # densities would otherwise let the others in with them
            used = data
            keep |= (recurs & (density_all <= used))[rest]
    recurs = recurs[rest]
    return {"keep": keep, "density": density, "recurs": recurs, "threshold": used}



def dropped_recurring(recurs, keep, threshold: float) -> str | None:
    """What to say when the filter drops most of the components that recur across replicates
    (``None`` otherwise): the fixed threshold assumes the copies of a program lie close, which
    real counts need not grant (docs/validation.md, 'Real counts': 9 of 100 kept where 64 recur)."""
    n_recur, dropped = int(np.sum(recurs)), int(np.sum(np.asarray(recurs) & ~np.asarray(keep)))
    if n_recur == 0 or dropped <= n_recur / 2:
        return None
    return (f"the outlier filter drops {dropped} of the {n_recur} components that recur across replicates "
            f"(consensus.outlier_threshold={threshold:g}); consensus.outlier_adaptive=true keeps those that "
            "recur (docs/validation.md, 'Real counts')")


def _pooled_components(adata, nmf: NMFKeys = NMFKeys()) -> np.ndarray:
    """Every replicate's components (replicates x k x genes), or the single H of a result
    without its replicates (the seed's ``uns['X_nmf_components']``)."""
    if nmf.uns not in adata.uns and nmf.components not in adata.uns:
        raise InputError(f"consensus.method=components needs a factorization: run the factorize stage first "
                         f"(uns['{nmf.uns}'] or uns['{nmf.components}'] is missing)")
    return np.asarray(adata.uns[nmf.uns]["components"] if nmf.uns in adata.uns else adata.uns[nmf.components][None])


# the replicates the recurrence rule was validated on (docs/validation.md), not a default
_VALIDATED_ON = {"solver": "mu", "tol": 1e-4, "stop_rule": "change"}


def _warn_converged_replicates(adata, rule: str, nmf: NMFKeys = NMFKeys()) -> None:
    """The recurrence rule was validated on MU replicates stopped at ``tol=1e-4``; replicates run
    to convergence (HALS, a smaller ``tol``, ``stop_rule=extrapolated``) keep surplus components
    that recur, and it then chose K above the planted one on Monti's sets (docs/validation.md,
    "Converged replicates and the K rule")."""
    p = adata.uns[nmf.uns].get("params") if isinstance(adata.uns.get(nmf.uns), dict) else None
    if rule != "recurrence" or not p:
        return
    from ..params import FactorizeParams, defaults

    p = {**defaults(FactorizeParams), **p}  # an older result may lack a key: its declared default
    solver, tol, stop = str(p["solver"]), float(p["tol"]), str(p["stop_rule"])
    ok = _VALIDATED_ON
    if solver == ok["solver"] and tol >= ok["tol"] and stop == ok["stop_rule"]:
        return
    what = ", ".join(x for x, bad in ((f"factorize.solver={solver}", solver != ok["solver"]),
                                      (f"factorize.tol={tol:g}", tol < ok["tol"]),
                                      (f"factorize.stop_rule={stop}", stop != ok["stop_rule"])) if bad)
    msg = (f"consensus: the replicates are run closer to convergence than the K rule was validated on ({what}); "
           "on Monti's sample-class sets such replicates made k_selection=auto choose K above the planted one "
           "(docs/validation.md, 'Converged replicates and the K rule'): check runner_up_k and k_selection.png, "
           "sweep factorize.n_components, or cap K with consensus.rank_bound=parallel")
    log.warning(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


def _components(adata, *, rng, settings: ComponentsSettings, exclude=None, report: bool = True,
                k_cap: int | None = None, data_stats=None) -> dict:
    """Consensus over the pooled components of every replicate at each K of the range.

    ``exclude``: components left out (the background's, second pass); ``report``: log the
    choice of K (the first pass does not, when a second follows); ``k_cap``: the largest K
    (parallel analysis); ``data_stats``: ``ks -> (stats, spread)`` of a rule that reads the matrix
    (:mod:`~tardis_exp.consensus.heldout`). Returns the entries of ``uns['nmf_consensus']`` with ``spectra``.
    """
    s = settings
    min_k, max_k, n_resamples, frac, rule, tol = s.min_k, s.max_k, s.n_resamples, s.frac, s.rule, s.tol
    out_thr, out_frac, min_reps, agg, store_items = (s.outlier_threshold, s.outlier_neighbors_frac,
                                                     s.min_replicates, s.agg, s.store_items)
    progress, k_z, spread_splits = s.progress, s.z, s.spread_splits
    comps = _pooled_components(adata, s.nmf)
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
    recurs = np.zeros(len(spectra_all), bool)
    thr_used = float(out_thr)
    if R > 1 and out_thr < 2:
        pool = spectra_all.sum(1) > 0  # every component the replicates produced, the excluded included
        f = outlier_filter(spectra_all[pool], replicate[pool], max(1, int(round(out_frac * R))), out_thr,
                           adaptive=s.outlier_adaptive, exclude=None if exclude is None else exclude[pool])
        keep[np.flatnonzero(alive)[~f["keep"]]] = False
        density[alive], recurs[alive], thr_used = f["density"], f["recurs"], f["threshold"]
    items = np.flatnonzero(keep)
    N = len(items)
    n_alive = int(alive.sum())
    kept_fraction = N / max(n_alive, 1)
    log.info("consensus: the outlier filter keeps %d of %d components (%.0f %%; density threshold %.2f%s; "
             "%d recur in at least half of the other replicates)", N, n_alive, 100 * kept_fraction, thr_used,
             "" if thr_used == out_thr else f", raised from consensus.outlier_threshold={out_thr:g} to the "
             "density separating the components that recur", int(recurs.sum()))
    msg = dropped_recurring(recurs, keep, out_thr) if not s.outlier_adaptive else None
    if msg:
        log.warning("consensus: %s", msg)
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
    if data_stats is not None:
        extra, extra_spread = data_stats(ks)
        stats.update(extra)
        spread.update(extra_spread)
    # the rules that stop at a change take the largest stable K here (select_k, KRule.pick)
    best, info = select_k(ks, stats, rule, tol, admissible, spread=spread, z=k_z, return_info=True,
                          largest_stable=True)
    rule_k = best
    if k_cap is not None and best > k_cap:
        # the rule's choice is the runner-up; no margin is measured between the two
        best = max(int(k_cap), ks[0])
        info = {**info, "runner_up_k": int(rule_k), "margin": float("nan")}
        if report:
            log.info("consensus: K=%d (k_selection=%s chose %d, above the parallel-analysis rank %d)", best, rule,
                     rule_k, k_cap)
    info["candidates"] = candidates(ks, best, info, s.confident_margin)
    # every component of the factorization recurs: the rank, not the data, bounds K
    rank_bound = bool(best == k_eff and R > 1 and stats["recurrence"][ks.index(best)] >= 0.9)
    if report:
        report_k(best, info, rule, ks, rank_bound, confident_margin=s.confident_margin)

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
        "item_recurs": recurs,
        "n_items": N,
        "n_outliers": int(alive.sum() - N),
        "kept_fraction": float(kept_fraction),
        "outlier_threshold_used": thr_used,
    }
