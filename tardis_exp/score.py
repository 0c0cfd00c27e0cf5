"""Stage 4, score: top genes per meta-program, per-spot program scores, quality metrics.

Reads ``uns['nmf_consensus']['spectra']`` (the aggregated loadings of each program's
member components) and writes

``obs['nmf_cluster_{i}']``
    z-scored ``sc.tl.score_genes`` score of program ``i`` (the seed's keys; all programs
    in one pass, :func:`score_gene_sets`),
``obs['nmf_program']``
    categorical argmax of the consensus usages ``obsm['X_nmf_consensus']``: the program
    that explains most of the spot's expression in the factorization itself. This is the
    spot label the metrics (ARI, silhouette) and the figures use.
``obs['nmf_cluster']``
    categorical argmax over the z-scored gene-set scores (the seed's tutorial). It reads
    only each program's top genes, z-scores every program over the spots (so a program
    present in few spots is boosted everywhere it is slightly active) and ignores the
    rest of the spectrum; it is kept for compatibility with the seed. On Brunet's leukemia
    set at K = 3 it agrees with the B/T/AML labels less well than ``nmf_program`` does
    (see docs/validation.md).
``uns['nmf_programs']``
    table of the top genes: program, rank, gene, loading, specificity,
``uns['nmf_metrics']``
    silhouette, Moran's I per program, and with ground truth ARI and program recovery.
``uns['nmf_samples']``
    with ``sample_key`` (several sections as one study): the programs x samples table,
    :func:`sample_table`.
"""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from .config import check_genes  # noqa: F401 -- re-exported
from . import keys
from .errors import InputError
from .outputs import Metric, Output, StageSpec
from .params import ScoreParams as _P
from .params import check
# rank_genes and RANKINGS live in metrics (pure NumPy) so that program_recovery does not need
# this module (scanpy); imported here, they stay part of this module's names
from .metrics import RANKINGS, adjusted_rand_codes, knn_index, knn_morans_i, program_recovery, rank_genes, spatial_graph  # noqa: F401
from .nmf import prepare_matrix

log = logging.getLogger(__name__)


def _metric(key):
    def value(adata):
        m = adata.uns["nmf_metrics"]
        return float(m[key]) if key in m else None
    return value


def _samples(read):
    """A metric of ``uns['nmf_samples']`` (None: the run has no ``data.sample_key``)."""
    def value(adata):
        t = adata.uns.get(keys.ScoreKeys().samples)
        return None if t is None else read(t)
    return value


def _mean_morans_i(t):
    if "morans_i" not in t:
        return None
    mi = np.asarray(t["morans_i"], dtype=np.float64)
    # a section where no program varies has no value; MLflow keeps finite numbers
    return np.array([np.nanmean(c) if np.isfinite(c).any() else np.nan for c in mi.T])


SPEC = StageSpec(
    "score",
    writes=(
        Output("obs", "nmf_cluster_{i}", "z-scored gene-set score of program i"),
        Output("obs", "nmf_cluster", "argmax over the z-scored gene-set scores (the seed's label)"),
        Output("obs", "nmf_program", "argmax of the consensus usages", when="obsm['X_nmf_consensus'] exists"),
        Output("uns", "nmf_programs", "top genes: program, rank, gene, loading, specificity, score"),
        Output("uns", "nmf_metrics", "silhouette, Moran's I per program; with ground truth ARI and recovery"),
        Output("uns", "nmf_samples", "programs x samples: share of usage, Moran's I per section, "
               "sample-specific flags", when="sample_key is given"),
    ),
    metrics=(
        *(Metric(k, f"score stage: {k.replace('_', ' ')} of the final programs", _metric(k), headline=True)
          for k in ("silhouette", "morans_i_mean", "ari_truth", "program_recovery")),
        Metric("ari_truth_nmf_cluster", "score stage: ARI of the seed's nmf_cluster label against the truth",
               _metric("ari_truth_nmf_cluster")),
        Metric("morans_i_by_program", "Moran's I of each program's usage (step = program)",
               lambda a: a.uns["nmf_metrics"].get("morans_i"), step="program"),
        Metric("n_sample_specific", "score stage: programs whose high-usage spots lie in one sample "
               "(active_share >= score.sample_specific_share; with data.sample_key)",
               _samples(lambda t: int(np.sum(t["sample_specific"]))), headline=True),
        Metric("max_sample_share_by_program", "largest share of each program's high-usage spots held by one "
               "sample (active_share; step = program; with data.sample_key)",
               _samples(lambda t: np.nanmax(np.asarray(t["active_share"], dtype=np.float64), axis=1,
                                            initial=0.0)),
               step="program"),
        Metric("morans_i_mean_by_sample", "mean Moran's I of the programs within each section, on the "
               "section's own graph (step = sample, the order of uns['nmf_samples']['samples'])",
               _samples(_mean_morans_i), step="sample"),
    ),
)


def check_params(**params) -> dict:
    """Validate score parameters before any compute (:class:`~tardis_exp.params.ScoreParams`;
    missing ones take their defaults)."""
    return check("score", params, known_only=True)


def top_genes_table(spectra, var_names, n_genes=50, ranking="specific") -> pd.DataFrame:
    """The ``n_genes`` best genes of each program, best first."""
    score = rank_genes(spectra, ranking)
    share = score / np.where(spectra > 0, spectra, 1)
    rows = []
    n = min(n_genes, score.shape[1])
    for p in range(score.shape[0]):
        order = np.argsort(-score[p], kind="stable")[:n]
        for r, g in enumerate(order):
            rows.append((p, r, var_names[g], float(spectra[p, g]), float(share[p, g]), float(score[p, g])))
    return pd.DataFrame(rows, columns=["program", "rank", "gene", "loading", "specificity", "score"])


_CHUNK_BYTES = 64 * 2**20


def _gene_means(X) -> np.ndarray:
    # what sc.tl.score_genes bins genes by: float64 sums for sparse X (the same scipy call),
    # X's own dtype for dense X (np.nanmean there; np.mean gives the same for finite X,
    # checked before this is called, without nanmean's full-size copy)
    if getattr(X, "is_chunked", False):
        return X.col_sums() / X.shape[0]
    if sp.issparse(X):
        return np.asarray(X.sum(axis=0, dtype="float64")).ravel() / X.shape[0]
    return np.mean(X, axis=0)


def _chunked(X):
    """A :class:`~tardis_exp.chunked.ChunkedMatrix` over a Dask ``X``, else None."""
    from .chunked import is_dask

    if getattr(X, "is_chunked", False):
        return X
    return prepare_matrix(X) if is_dask(X) else None


def score_gene_sets(adata: ad.AnnData, gene_sets, *, ctrl_size: int = 50, n_bins: int = 25,
                    random_state: int | None = 0, chunk_spots: int | None = None, columns: bool = False):
    """``sc.tl.score_genes`` for many gene sets in one pass over ``X`` (spots x sets).

    Equal (to float32 rounding for sparse ``X``, whose row sums scipy accumulates in
    float32 for scanpy) to calling :func:`scanpy.tl.score_genes` once per set (``use_raw=False``,
    ``ctrl_as_ref=True``, the same ``ctrl_size``, ``n_bins`` and ``random_state``): the same
    expression bins, the same control genes (drawn from NumPy's global generator reseeded
    per set, as scanpy does; with an integer ``random_state`` its state is restored
    afterwards, with ``None`` it advances as in scanpy), the same mean differences.
    scanpy recomputes every gene's mean and slices ``X`` twice per set; here the means are
    computed once and all sets are scored by one product of ``X`` (in row chunks, float64)
    with a genes x (2 x sets) weight matrix. The test suite checks the equality against
    scanpy itself. ``X`` with NaNs falls back to scanpy (its NaN-aware means).
    ``chunk_spots`` rows are converted to float64 at a time (default: about 64 MB of them).
    With ``columns`` the result is a list of the sets' score vectors (separate arrays: the
    score stage hands each to ``obs`` and frees it, never holding both copies whole).
    """
    X = adata.X
    chunked = _chunked(X)
    if chunked is not None:  # data.backend=dask: passes over the chunks, X never whole in memory
        X = chunked
        finite = chunked.finite_
    elif sp.issparse(X):
        finite = bool(np.isfinite(X.data).all())
    else:  # row blocks: no boolean copy of a large dense X
        step = max(1, _CHUNK_BYTES // max(X.shape[1], 1))
        finite = all(np.isfinite(X[a:a + step]).all() for a in range(0, X.shape[0], step))
    if not finite:
        out = np.zeros((adata.n_obs, len(gene_sets)))
        for p, genes in enumerate(gene_sets):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sc.tl.score_genes(adata, genes, ctrl_size=ctrl_size, n_bins=n_bins, random_state=random_state,
                                  use_raw=False, score_name="_tardis_exp_score")
            out[:, p] = adata.obs.pop("_tardis_exp_score").to_numpy(dtype=np.float64)
        return [out[:, p].copy() for p in range(out.shape[1])] if columns else out
    var_names = adata.var_names
    pool = var_names.astype("string")
    obs_avg = pd.Series(_gene_means(X), index=pool)
    obs_avg = obs_avg[np.isfinite(obs_avg)]
    n_items = int(np.round(len(obs_avg) / (n_bins - 1)))
    obs_cut = obs_avg.rank(method="min") // n_items

    # the set's mean minus its controls' mean in one product: weights +1/|set| and -1/|controls|
    # (a set's genes are never its controls), so the product is spots x sets, not twice that
    W = np.zeros((adata.n_vars, len(gene_sets)))
    state = np.random.get_state() if random_state is not None else None
    try:
        for p, genes in enumerate(gene_sets):
            if random_state is not None:
                np.random.seed(random_state)
            glist = pd.Index(genes).intersection(var_names)
            if len(glist) < len(set(genes)):
                log.warning("score: program %d: genes not in var_names are ignored: %s", p,
                            sorted(set(genes) - set(glist))[:10])
            if len(glist) == 0:
                raise InputError(f"score: program {p} has no gene in var_names")
            ctrl = pd.Index([], dtype="string")
            for cut in np.unique(obs_cut.loc[glist]):
                r_genes = obs_cut[obs_cut == cut].index
                if ctrl_size < len(r_genes):
                    r_genes = r_genes.to_series().sample(ctrl_size).index
                ctrl = ctrl.union(r_genes.difference(glist))
            if len(ctrl) == 0:
                raise InputError(f"score: no control genes for program {p} (score.ctrl_size={ctrl_size})")
            W[var_names.get_indexer(glist), p] = 1.0 / len(glist)
            W[var_names.get_indexer(ctrl), p] = -1.0 / len(ctrl)
    finally:
        if state is not None:
            np.random.set_state(state)

    if getattr(X, "is_chunked", False):
        return X.matmul64(W, columns=columns)
    if chunk_spots is None:
        per_row = 12 * (X.nnz / max(X.shape[0], 1)) if sp.issparse(X) else 8 * X.shape[1]
        chunk_spots = max(1, int(_CHUNK_BYTES // max(per_row, 1)))
    means = [np.empty(adata.n_obs) for _ in range(W.shape[1])] if columns else np.empty((adata.n_obs, W.shape[1]))
    for start in range(0, adata.n_obs, chunk_spots):
        block = X[start:start + chunk_spots]
        block = block.astype(np.float64) if sp.issparse(block) else np.asarray(block, dtype=np.float64)
        if columns:
            for j, b in enumerate((block @ W).T):
                means[j][start:start + chunk_spots] = b
        else:
            means[start:start + chunk_spots] = block @ W
    return means


def score(
    adata: ad.AnnData,
    *,
    n_cluster_genes: int = _P.n_cluster_genes,
    gene_ranking: str = _P.gene_ranking,
    ctrl_size: int = _P.ctrl_size,
    random_state: int = _P.random_state,
    spatial_key: str = _P.spatial_key,
    n_spatial_neighbors: int = _P.n_spatial_neighbors,
    truth_key: str = _P.truth_key,
    silhouette_max_spots: int = _P.silhouette_max_spots,
    sample_specific_share: float = _P.sample_specific_share,
    sample_key: str | None = None,
    consensus_key: str = keys.CONSENSUS,
    key_added: str = keys.SCORE,
    copy: bool = False,
) -> ad.AnnData | None:
    """Score every spot for every consensus program.

    Parameters
    ----------
    adata
        Output of the consensus stage (``uns['nmf_consensus']``).
    n_cluster_genes
        Top genes per program used for scoring.
    gene_ranking
        ``'specific'`` (loading x share of the gene's loading) or ``'loading'``.
    ctrl_size, random_state
        As in ``sc.tl.score_genes`` (computed for all programs at once by
        :func:`score_gene_sets`, equal to scanpy's result).
    spatial_key
        ``obsm`` key of spot coordinates; Moran's I is computed when present.
    n_spatial_neighbors
        Neighbours in the spatial kNN graph.
    truth_key
        ``obs`` column of true labels; ARI is computed when present.
    silhouette_max_spots
        Silhouette on a seeded subsample of at most this many spots.
    sample_specific_share
        With ``sample_key``: a program is flagged sample-specific when one sample holds at
        least this share of its usage (:func:`sample_table`), with a warning naming the
        program and the sample. The default 0.8 means the program's mean usage per spot is
        4 times higher in that sample than in all the others together (two samples); a
        program shared by two sections sits near 0.5, and the batch artefact this flag is
        for held 0.89 of its usage in one of two sections (issue 25), which 0.9 would miss.
        Above 0.5, at most one sample can hold it.
    sample_key
        ``obs`` column naming each spot's sample (section, batch) when several samples are
        analysed as one study (the pipeline passes ``data.sample_key``). Then Moran's I is
        computed per section on the section's own spatial graph (sections' coordinates may
        overlap: no edge joins two sections), and ``uns['<key_added>_samples']`` holds the
        programs x samples table (:func:`sample_table`). ``None``: one sample.
    consensus_key
        The consensus result to score: ``uns[consensus_key]`` and its usages
        ``obsm['X_<consensus_key>']`` (the consensus stage's ``key_added``).
    key_added
        Prefix of what is written: ``obs['<key_added>_cluster_{i}']``,
        ``obs['<key_added>_cluster']``, ``obs['<key_added>_program']``,
        ``uns['<key_added>_programs']``, ``uns['<key_added>_metrics']``, with ``sample_key``
        ``uns['<key_added>_samples']`` (:mod:`tardis_exp.keys`; the default ``nmf`` gives the
        seed's ``nmf_cluster_{i}``).
    copy
        Return a modified copy instead of writing into ``adata``.
    """
    check_params(n_cluster_genes=n_cluster_genes, gene_ranking=gene_ranking, ctrl_size=ctrl_size,
                 random_state=random_state, spatial_key=spatial_key, n_spatial_neighbors=n_spatial_neighbors,
                 truth_key=truth_key, silhouette_max_spots=silhouette_max_spots,
                 sample_specific_share=sample_specific_share)
    src, out = keys.consensus_keys(consensus_key, "consensus_key"), keys.score_keys(key_added)
    if src.uns not in adata.uns:
        raise InputError(f"score needs uns['{src.uns}']: run the consensus stage first")
    sections = None if sample_key is None else sample_codes(adata, sample_key)
    adata = adata.copy() if copy else adata
    spectra = np.asarray(adata.uns[src.uns]["spectra"])
    K = spectra.shape[0]
    table = top_genes_table(spectra, adata.var_names, n_cluster_genes, gene_ranking)

    gene_sets = [table.loc[table.program == p, "gene"].tolist() for p in range(K)]
    # the spatial neighbours before the scores: the index's transient state (the tree, a copy of
    # the coordinates) and the scores are never in memory together (at 2,000,000 spots)
    nb = knn_index(np.asarray(adata.obsm[spatial_key]), n_spatial_neighbors) \
        if sections is None and spatial_key in adata.obsm else None
    cols = score_gene_sets(adata, gene_sets, ctrl_size=ctrl_size, random_state=random_state, columns=True)
    best, arg = np.full(adata.n_obs, -np.inf), np.zeros(adata.n_obs, dtype=np.int64)
    for p in range(K):  # z-scored in place, handed to obs, freed: one program's copy at a time
        s = cols[p]
        sd = s.std()
        s -= s.mean()
        s /= sd if sd > 0 else 1
        # np.argmax over the programs: the first maximum, the first NaN where there is one
        better = (s > best) | (np.isnan(s) & ~np.isnan(best))
        arg[better], best[better] = p, s[better]
        adata.obs[out.score(p)] = s
        if sections is None:  # Moran's I per section reads them together; else the obs column serves
            cols[p] = None
    del best
    z = np.column_stack(cols) if sections is not None else None
    del cols
    cats = [str(p) for p in range(K)]
    adata.obs[out.cluster] = pd.Categorical.from_codes(arg, categories=cats)
    del arg
    if src.usage in adata.obsm:
        adata.obs[out.program] = program_labels(adata.obsm[src.usage])
    elif out.program in adata.obs:  # another result's labels must not pass for these
        del adata.obs[out.program]
    adata.uns[out.programs] = table

    metrics = _metrics(adata, z, spatial_key, n_spatial_neighbors, truth_key, silhouette_max_spots,
                       random_state, spectra, n_cluster_genes, gene_ranking, src=src, out=out, sections=sections,
                       neighbours=nb)
    del nb
    adata.uns[out.metrics] = metrics
    if sections is not None:
        adata.uns[out.samples] = _sample_uns(adata, sections, sample_key, sample_specific_share, metrics,
                                             src=src)
    elif out.samples in adata.uns:  # another run's table must not pass for this one's
        del adata.uns[out.samples]
    log.info("score: %d programs; %s", K, {k: v for k, v in metrics.items() if np.isscalar(v)})
    return adata if copy else None


def _category_codes(col: pd.Series) -> np.ndarray:
    """Codes of a categorical column whose categories are the same labels as strings (categories
    that coincide as strings, e.g. 1 and '1', merged; missing values one label, as astype(str))."""
    names = pd.Index(col.cat.categories.astype(str))
    codes = col.cat.codes.to_numpy()
    merged = pd.factorize(names)[0] if names.has_duplicates else np.arange(len(names))
    return np.where(codes >= 0, merged[np.maximum(codes, 0)], len(names))


def program_labels(usages) -> pd.Categorical:
    """``obs['nmf_program']``: argmax of the consensus usages (categories ``'0'`` ... ``'K-1'``).

    Usages are compared as fractions of each spot's total, so a spot with no usage at all
    (an all-zero row) gets the missing category rather than program 0.
    """
    U = np.asarray(usages)  # argmax and max of the stored dtype: no float64 copy of spots x K
    cats = [str(p) for p in range(U.shape[1])]
    codes = U.argmax(1)
    codes[~(U.max(1) > 0)] = -1
    return pd.Categorical.from_codes(codes, categories=cats)


def sample_codes(adata: ad.AnnData, sample_key: str) -> tuple[list[str], np.ndarray]:
    """The samples of ``obs[sample_key]`` that have spots (in category order) and each spot's
    index among them; one line naming the key when the column is missing or incomplete."""
    if not isinstance(sample_key, str) or not sample_key.strip():
        raise InputError(f"score: sample_key (data.sample_key) must be an obs column name, got {sample_key!r}")
    if sample_key not in adata.obs:
        cols = list(map(str, adata.obs.columns))
        raise InputError(f"score: sample_key (data.sample_key) {sample_key!r} is not an obs column; obs has "
                         f"{', '.join(cols[:10]) or 'no column'}{' ...' if len(cols) > 10 else ''}")
    col = adata.obs[sample_key]
    cat = (col if isinstance(col.dtype, pd.CategoricalDtype) else col.astype("category")).cat
    cat = cat.remove_unused_categories().cat
    if (cat.codes < 0).any():
        raise InputError(f"score: obs['{sample_key}'] (data.sample_key) has no sample for "
                         f"{int((cat.codes < 0).sum())} spots")
    return [str(c) for c in cat.categories], cat.codes.to_numpy().astype(np.int64)


def section_morans_i(coords, values, codes, n_samples: int, n_neighbors: int = _P.n_spatial_neighbors) -> np.ndarray:
    """Moran's I of every column of ``values`` (spots x programs) within each section.

    Each section ``s`` (the spots with ``codes == s``) gets its own spatial kNN graph
    (:func:`~tardis_exp.metrics.knn_morans_i` on its coordinates alone), so no edge joins
    two sections whose coordinates overlap, and each section is centred on its own mean.

    Parameters
    ----------
    coords
        Spot coordinates (spots x 2 or more).
    values
        Spots x programs (the score stage passes the z-scored program scores; Moran's I
        is the same for any affine rescaling within a section).
    codes
        Each spot's section, ``0 .. n_samples - 1`` (:func:`sample_codes`).
    n_samples
        Number of sections.
    n_neighbors
        Neighbours in each section's kNN graph.

    Returns
    -------
    numpy.ndarray
        Programs x sections; NaN for a section of fewer than 3 spots or a program constant
        within it.
    """
    coords, values = np.asarray(coords, dtype=np.float64), np.asarray(values, dtype=np.float64)
    out = np.full((values.shape[1], n_samples), np.nan)
    for s in range(n_samples):
        idx = np.flatnonzero(codes == s)
        if len(idx) < 3:
            continue
        out[:, s] = knn_morans_i(knn_index(coords[idx], n_neighbors), values[idx])
    return out


def usage_share(usages, codes, n_samples: int) -> np.ndarray:
    """Share of each program's usage per sample (programs x samples, rows sum to 1).

    ``share[k, s] = m[k, s] / sum_t m[k, t]`` with ``m[k, s]`` the mean usage of program
    ``k`` over the spots of sample ``s``: per-spot means, so a sample with many spots does
    not look like the home of every program (with equal section sizes it is the share of
    the summed usage). NaN for a program with no usage anywhere.

    Parameters
    ----------
    usages
        Spots x programs, non-negative (``obsm['X_nmf_consensus']``).
    codes
        Each spot's sample, ``0 .. n_samples - 1`` (:func:`sample_codes`).
    n_samples
        Number of samples.

    Returns
    -------
    numpy.ndarray
        Programs x samples, float64.
    """
    U = np.asarray(usages, dtype=np.float64)
    n = np.bincount(codes, minlength=n_samples).astype(np.float64)
    sums = np.zeros((U.shape[1], n_samples))
    for s in range(n_samples):
        sums[:, s] = U[codes == s].sum(0)
    m = sums / np.maximum(n, 1)
    total = m.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, m / np.where(total > 0, total, 1), np.nan)


# a spot is one of a program's high-usage spots at half its 99th-percentile usage or more
ACTIVE_FRACTION = 0.5


def active_share(usages, codes, n_samples: int) -> np.ndarray:
    """Share of each program's high-usage spots per sample (programs x samples, rows sum to 1).

    ``share[k, s] = f[k, s] / sum_t f[k, t]`` with ``f[k, s]`` the fraction of sample ``s``'s
    spots where program ``k``'s usage is at least :data:`ACTIVE_FRACTION` of its 99th
    percentile over all spots (of its non-zero usages where that percentile is 0). Fractions
    per sample, so section sizes do not count. Unlike :func:`usage_share` it ignores the low
    usage the refit gives a program in every spot: on the benchmark's ``batch`` family
    (docs/benchmark.md) the found copy of a program planted in one section holds 0.22-0.70
    of the mean usage there but all of its high-usage spots, and shared programs at most
    0.72 with two sections. NaN for a program with no usage anywhere.

    Parameters
    ----------
    usages
        Spots x programs, non-negative (``obsm['X_nmf_consensus']``).
    codes
        Each spot's sample, ``0 .. n_samples - 1`` (:func:`sample_codes`).
    n_samples
        Number of samples.

    Returns
    -------
    numpy.ndarray
        Programs x samples, float64.
    """
    U = np.asarray(usages, dtype=np.float64)
    n = np.maximum(np.bincount(codes, minlength=n_samples), 1).astype(np.float64)
    level = ACTIVE_FRACTION * np.quantile(U, 0.99, axis=0)
    high = (U >= level) & (U > 0)
    f = np.stack([np.bincount(codes[high[:, k]], minlength=n_samples) for k in range(U.shape[1])]) / n
    total = f.sum(1, keepdims=True)
    return np.where(total > 0, f / np.where(total > 0, total, 1), np.nan)


def _sample_uns(adata, sections, sample_key, threshold, metrics, *, src: keys.ConsensusKeys) -> dict:
    names, codes = sections
    S = len(names)
    U = adata.obsm.get(src.usage)
    K = np.asarray(adata.uns[src.uns]["spectra"]).shape[0]
    share = usage_share(U, codes, S) if U is not None else np.full((K, S), np.nan)
    active = active_share(U, codes, S) if U is not None else np.full((K, S), np.nan)
    # one sample holds everything by definition: nothing to flag
    top = np.nan_to_num(active, nan=0.0).argmax(1)
    best = np.nan_to_num(active, nan=0.0).max(1)
    specific = (best >= threshold) & (S > 1)
    for k in np.flatnonzero(specific):
        log.warning("score: program %d is sample-specific: %.0f%% of its high-usage spots (per spot of "
                    "each sample) are in sample %r (obs['%s'])", k, 100 * best[k], names[top[k]], sample_key)
    res = {"samples": np.asarray(names, dtype=str), "sample_key": sample_key,
           "n_spots": np.bincount(codes, minlength=S).astype(np.int64), "share": share,
           "active_share": active,
           "sample_specific": specific, "specific_to": np.asarray([names[t] if f else "" for t, f in
                                                                   zip(top, specific)], dtype=str),
           "sample_specific_share": float(threshold)}
    if "morans_i_by_sample" in metrics:  # computed with the run's Moran's I (spatial data only)
        res["morans_i"] = metrics.pop("morans_i_by_sample")
    return res


def sample_table(adata: ad.AnnData, key_added: str = keys.SCORE) -> pd.DataFrame:
    """``uns['<key_added>_samples']`` as one row per program and sample (the run folder's
    ``programs_by_sample.tsv``).

    Columns: ``program``, ``sample``, ``n_spots`` (the sample's spots), ``share`` (of the
    program's usage, per-spot means: :func:`usage_share`), ``active_share`` (of its
    high-usage spots: :func:`active_share`, what the flag reads), ``morans_i`` (the program's
    Moran's I within that section; spatial data only), ``sample_specific`` (true on the
    row of the sample a flagged program is specific to).

    Parameters
    ----------
    adata
        Scored with ``sample_key`` (:func:`score`).
    key_added
        The score stage's ``key_added``.

    Returns
    -------
    pandas.DataFrame
        Programs x samples rows, program-major.
    """
    t = adata.uns[keys.score_keys(key_added).samples]
    share = np.asarray(t["share"], dtype=np.float64)
    names = [str(n) for n in np.atleast_1d(t["samples"])]
    K, S = share.shape
    frame = pd.DataFrame({"program": np.repeat(np.arange(K), S), "sample": np.tile(names, K),
                          "n_spots": np.tile(np.asarray(t["n_spots"], dtype=np.int64), K),
                          "share": share.ravel(),
                          "active_share": np.asarray(t["active_share"], dtype=np.float64).ravel()})
    if "morans_i" in t:
        frame["morans_i"] = np.asarray(t["morans_i"], dtype=np.float64).ravel()
    to = np.atleast_1d(np.asarray(t["specific_to"], dtype=str))
    frame["sample_specific"] = np.asarray(t["sample_specific"], dtype=bool).repeat(S) & (
        frame["sample"].to_numpy() == np.repeat(to, S))
    return frame


def _metrics(adata, z, spatial_key, n_nb, truth_key, max_spots, seed, spectra, n_genes, ranking, *,
             src: keys.ConsensusKeys, out: keys.ScoreKeys, sections=None, neighbours=None):
    from sklearn.metrics import silhouette_score

    res: dict = {}
    # the program label (argmax of the usages) when there are usages, else the seed's label
    key = out.program if out.program in adata.obs else out.cluster
    labels = adata.obs[key].cat.codes.to_numpy()
    U = adata.obsm.get(src.usage)
    if U is not None and len(np.unique(labels)) > 1:
        rng = np.random.default_rng(seed)
        idx = rng.choice(adata.n_obs, size=min(max_spots, adata.n_obs), replace=False)
        Un = np.asarray(U[idx], dtype=np.float64)  # the subsample only, not a spots-sized copy
        Un /= np.maximum(Un.sum(1, keepdims=True), 1e-12)
        # sklearn defines the silhouette for 2 .. n_samples - 1 labels only
        if 1 < len(np.unique(labels[idx])) < len(idx):
            import sklearn

            # distances in blocks of at most 64 MB (sklearn's default working memory is 1 GB:
            # 5,000 spots' distance matrix and its temporaries were the stage's peak at 2,000,000)
            with sklearn.config_context(working_memory=64):
                res["silhouette"] = float(silhouette_score(Un, labels[idx]))
    if spatial_key in adata.obsm and sections is not None:
        # per section, each on its own graph; the run's value per program is their mean
        # weighted by the sections' spots (those where the program varies). Not Moran's I on
        # the block-diagonal graph: centred on the pooled mean, it would count a program's
        # level differing between sections (a batch effect) as spatial autocorrelation.
        names, codes = sections
        per = section_morans_i(np.asarray(adata.obsm[spatial_key]), z, codes, len(names), n_nb)
        w = np.where(np.isfinite(per), np.bincount(codes, minlength=len(names))[None, :], 0.0)
        with np.errstate(invalid="ignore"):
            mi = np.where(w.sum(1) > 0, np.nansum(per * w, 1) / np.where(w.sum(1) > 0, w.sum(1), 1), np.nan)
        res["morans_i_by_sample"] = per  # moved to uns['<key>_samples'] by score()
        res["morans_i"] = mi
        res["morans_i_mean"] = float(np.nanmean(mi))
    elif spatial_key in adata.obsm:
        nb = knn_index(np.asarray(adata.obsm[spatial_key]), n_nb) if neighbours is None else neighbours
        mi = [knn_morans_i(nb, adata.obs[out.score(p)].to_numpy(dtype=np.float64))[0] for p in range(len(spectra))]
        del nb
        res["morans_i"] = np.asarray(mi, dtype=np.float64)
        res["morans_i_mean"] = float(np.nanmean(mi))
    if truth_key in adata.obs:
        # integer codes of the labels as strings (the same partition; no 2,000,000 Python strings)
        truth = pd.factorize(adata.obs[truth_key].astype(str))[0] if not isinstance(
            adata.obs[truth_key].dtype, pd.CategoricalDtype) else _category_codes(adata.obs[truth_key])
        res["ari_truth"] = adjusted_rand_codes(truth, np.where(labels >= 0, labels, labels.max(initial=0) + 1))
        res["ari_truth_nmf_cluster"] = adjusted_rand_codes(truth, adata.obs[out.cluster].cat.codes.to_numpy())
    if "true_program" in adata.var:
        rec, match = program_recovery(spectra, adata.var["true_program"].astype(str).to_numpy(),
                                      n_genes=n_genes, ranking=ranking)
        res["program_recovery"] = rec
        res["program_match"] = match
    return res
