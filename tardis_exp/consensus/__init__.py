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

The package, by concern: :mod:`~tardis_exp.consensus.statistics` (the Monti statistics and
their errors), :mod:`tardis_exp.krules` (the K rules' registry and :func:`select_k`; beside
``params.py``, which reads it), :mod:`~tardis_exp.consensus.components` and
:mod:`~tardis_exp.consensus.spots` (the two methods), :mod:`~tardis_exp.consensus.background`,
:mod:`~tardis_exp.consensus.rank` (parallel analysis, the rank's own statistics); this
``__init__`` is the stage: :func:`consensus`, :data:`SPEC`, the checks before compute.

Writes ``uns['nmf_consensus']`` (metrics per K, best K, spectra, item labels, consensus
matrices, ``background_spectra``), ``obsm['X_nmf_consensus']`` (refit usages, spots x best
K), ``obsm['X_nmf_background']`` (when a background was found) and, for
``method='spots'``, ``obs['nmf_spot_consensus']`` (consensus cluster of the spots used
for K selection).
"""

from __future__ import annotations

import logging
import time

import anndata as ad
import numpy as np

from .. import keys
from ..errors import ConfigError
from ..krules import AUTO, K_RULES, RULES, KRule, report_k, resolve_k_rule, select_k
from ..krules import report_k as _report_k  # noqa: F401 -- re-exported
from ..nmf import refit_usage
from ..outputs import Metric, Output, StageSpec
from ..params import METHODS  # noqa: F401 -- re-exported
from ..params import ConsensusParams as _P
from ..params import check
from .background import _find_background, background_programs
from .components import ComponentsSettings, _components, _pooled_components, _warn_converged_replicates
from .components import local_density_outliers
from .heldout import bicv_curve, data_rule_stats, parallel_eigen  # noqa: F401 -- re-exported
from .rank import _k_cophenetic, parallel_analysis, rank_evidence, reproducibility  # noqa: F401 -- re-exported
from .spots import SpotsSettings, _spots
from .statistics import (CDF_GRID, cdf_stats, cluster_consensus, consensus_from_labels, half_spread,
                         recurrence_spread, replicate_recurrence)

__all__ = [
    "consensus", "check_params", "check_resources", "SPEC", "available_memory", "estimate_spots_memory",
    "select_k", "resolve_k_rule", "RULES", "KRule", "AUTO", "K_RULES", "METHODS",
    "consensus_from_labels", "cdf_stats", "cluster_consensus", "half_spread", "replicate_recurrence",
    "recurrence_spread", "CDF_GRID", "local_density_outliers", "background_programs", "parallel_analysis",
    "rank_evidence", "reproducibility",
]

log = logging.getLogger(__name__)


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


def _len_if(adata, key):
    c = adata.uns["nmf_consensus"]
    return float(len(c[key])) if key in c else None


def _reduce_if(adata, key, f):
    c = adata.uns["nmf_consensus"]
    return float(f(c[key])) if key in c and len(c[key]) else None


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
        Metric("consensus.kept_fraction", "fraction of the replicates' components the outlier filter keeps "
               "(method=components; consensus.outlier_threshold, outlier_adaptive)", _entry("kept_fraction"),
               headline=True),
        Metric("consensus.parallel_rank", "rank Horn's parallel analysis gives the data (consensus.rank_bound="
               "parallel caps K there)", _entry("parallel_rank")),
        Metric("runner_up_k", "the second-best K under consensus.k_selection", _entry("runner_up_k"),
               headline=True),
        Metric("consensus.n_k_candidates", "number of K the data do not separate from the chosen one (margin "
               "below consensus.confident_margin; uns['nmf_consensus']['k_candidates'])",
               lambda a: _len_if(a, "k_candidates"), headline=True),
        *(Metric(f"consensus.k_candidates_{end}", f"the {word} candidate K (uns['nmf_consensus']['k_candidates'])",
                 lambda a, f=f: _reduce_if(a, "k_candidates", f))
          for end, word, f in (("min", "smallest", min), ("max", "largest", max))),
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
    confident_margin: float = _P.confident_margin,
    outlier_threshold: float = _P.outlier_threshold,
    outlier_adaptive: bool = _P.outlier_adaptive,
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
    nmf_key: str = keys.NMF,
    key_added: str = keys.CONSENSUS,
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
    confident_margin
        A margin over the runner-up below this warns that the data do not separate them and
        lists the candidates (``uns[...]['k_candidates']``: every K whose gap to the chosen
        one is below it); calibrated on the benchmark's design seeds (docs/benchmark.md).
    outlier_threshold, outlier_adaptive, outlier_neighbors_frac
        Components method: drop components whose mean distance (between L2-normalized
        loadings) to their ``outlier_neighbors_frac * n_replicates`` nearest neighbours
        exceeds the threshold (cNMF's local density filter; 2 disables it). With
        ``outlier_adaptive`` the threshold is raised to the density that best separates the
        components that recur in the other replicates from those that do not
        (:func:`~tardis_exp.consensus.components.outlier_filter`): on real counts a program's
        components lie further apart than on simulations. The kept fraction is logged
        (``consensus.kept_fraction``).
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
    nmf_key
        The factorization to read: ``uns[nmf_key]`` (factorize's ``key_added``).
    key_added
        Where the result goes: ``uns[key_added]``, ``obsm['X_<key_added>']`` and, with a
        background, ``obsm['X_<key_added>_background']`` (:mod:`tardis_exp.keys`; the
        defaults are ``nmf_consensus``, ``X_nmf_consensus`` and ``X_nmf_background``).
    copy
        Return a modified copy instead of writing into ``adata``.
    """
    check_params(method=method, min_clusters=min_clusters, max_clusters=max_clusters, n_resamples=n_resamples,
                 resample_frac=resample_frac, random_state=random_state, k_selection=k_selection,
                 k_tolerance=k_tolerance, k_z=k_z, k_spread_splits=k_spread_splits,
                 confident_margin=confident_margin, outlier_threshold=outlier_threshold, outlier_adaptive=outlier_adaptive,
                 outlier_neighbors_frac=outlier_neighbors_frac, min_cluster_replicates=min_cluster_replicates, background_ratio=background_ratio,
                 rank_bound=rank_bound, parallel_max_spots=parallel_max_spots,
                 spectra_agg=spectra_agg,
                 refit_max_iter=refit_max_iter, max_spots=max_spots, spots_max_iter=spots_max_iter,
                 store_matrix_items=store_matrix_items)
    nmf, out = keys.nmf_keys(nmf_key, "nmf_key"), keys.consensus_keys(key_added)
    adata = adata.copy() if copy else adata
    t0 = time.perf_counter()
    rng = np.random.default_rng(random_state)
    k_selection = resolve_k_rule(k_selection, method)
    shared = dict(min_k=min_clusters, max_k=max_clusters, n_resamples=n_resamples, frac=resample_frac,
                  rule=k_selection, tol=k_tolerance, z=k_z, spread_splits=k_spread_splits, agg=spectra_agg,
                  store_items=store_matrix_items, progress=progress, confident_margin=confident_margin)
    background = np.zeros((0, adata.n_vars))
    if method == "components":
        pa = None
        if rank_bound == "parallel":
            # its own stream: the resampling below draws what it draws without the bound
            pa_rng = np.random.default_rng(None if random_state is None else [random_state, 2])
            pa = parallel_analysis(adata.X, _pooled_components(adata, nmf).shape[1], pa_rng,
                                   max_spots=parallel_max_spots)
            log.info("consensus: parallel analysis gives rank %d (data / null per rank %s); K is capped there",
                     pa["rank"], np.round(pa["ratios"], 2).tolist())
        else:
            _warn_converged_replicates(adata, k_selection, nmf)
        settings = ComponentsSettings(**shared, outlier_threshold=outlier_threshold, outlier_adaptive=outlier_adaptive,
                                      outlier_neighbors_frac=outlier_neighbors_frac,
                                      min_replicates=min_cluster_replicates, nmf=nmf)
        k_cap = None if pa is None else pa["rank"]
        # a rule that reads the matrix (bicv, parallel): its own seeded stream, the same K
        # whatever factorize.solver and its tolerance; measured once, read by both passes
        data_stats = (data_rule_stats(RULES[k_selection].statistic, adata.X, random_state,
                                      counts=adata.layers.get("counts"))
                      if RULES[k_selection].source == "data" else None)
        res = _components(adata, rng=rng, settings=settings, k_cap=k_cap, report=False,  # said about the K kept
                          data_stats=data_stats)
        # its own stream: runs without a background draw exactly what they drew before
        bg_rng = np.random.default_rng(None if random_state is None else [random_state, 1])
        bg = _find_background(adata, res, background_ratio, bg_rng, refit_max_iter)
        if bg is not None and bg["items"].any():
            # K counts the programs that tell spots apart: choose it again without the background
            first_k = res["best_k"]
            res = _components(adata, rng=rng, settings=settings, k_cap=k_cap, exclude=bg["items"],
                              data_stats=data_stats)
            background = bg["spectra"]
            res.update(k_with_background=first_k, background_items=np.flatnonzero(bg["items"]))
            res["item_labels"][bg["items"]] = -2
        else:
            report_k(res["best_k"], {"runner_up_k": res["runner_up_k"], "margin": res["k_margin"],
                                     "candidates": res["k_candidates"].tolist()}, k_selection,
                     res["k_values"], res["k_bounded_by_rank"], confident_margin=confident_margin)
        if bg is not None:  # every first-pass program's ratio: how far the data are from the threshold
            res["background_cv_ratio"] = bg["cv_ratio"]
        if pa is not None:
            res.update(parallel_rank=pa["rank"], parallel_ratios=pa["ratios"])
    else:
        settings = SpotsSettings(**shared, random_state=random_state, max_spots=max_spots, max_iter=spots_max_iter)
        res = _spots(adata, rng=rng, settings=settings)

    spectra = res.pop("spectra")
    K = len(spectra)
    W, err = refit_usage(adata.X, np.vstack([spectra, background]) if len(background) else spectra,
                         max_iter=refit_max_iter, progress=progress)
    adata.obsm[out.usage] = W[:, :K] if len(background) else W
    if len(background):
        adata.obsm[out.background] = W[:, K:]
    elif out.background in adata.obsm:
        del adata.obsm[out.background]
    res.update(spectra=spectra.astype(np.float32), refit_error=float(err), method=method,
               k_selection=k_selection, n_background=len(background),
               background_spectra=np.asarray(background, dtype=np.float32))
    res.update(rank_evidence(adata, res, rng, nmf=nmf))
    res["seconds"] = time.perf_counter() - t0
    adata.uns[out.uns] = res
    log.info("consensus (%s): K in %d..%d, best K = %d (runner-up %d, margin %.2f)", method, min(res["k_values"]),
             max(res["k_values"]), res["best_k"], res["runner_up_k"], res["k_margin"])
    return adata if copy else None
