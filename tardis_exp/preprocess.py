"""Stage 1, preprocess: counts -> QC -> gene exclusion -> normalization -> HVG subset.

Reads ``adata.X`` (or ``adata.layers[layer]``), writes a new AnnData restricted to the
highly variable genes with

``X``
    normalized expression (float32, sparse if the input was sparse),
``layers['counts']``
    the raw counts of the kept genes,
``var['highly_variable']``, ``var['means']``, ...
    scanpy's HVG table,
``uns['preprocess']``
    the parameters and what QC removed.

``obsm`` (``spatial`` included) and ``obs`` are carried over.

Several samples (``sample_key``, from ``data.sample_key``): the highly variable genes are
chosen per sample (scanpy's ``batch_key``: genes variable within the samples, not genes that
differ between them), and a sample left with fewer than ``min_spots_per_sample`` spots after
QC is refused. The rest needs nothing per sample: the QC thresholds (``min_cells``,
``min_counts``) are fixed numbers, not derived from the data, and the normalization is per
spot (each spot divided by its own total, times one ``target_sum`` for every spot; with
``target_sum=null`` the median over the whole study, so that samples are not rescaled
against each other).
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

from .errors import ConfigError, InputError
from .outputs import Metric, Output, StageSpec
from .params import HVG_FLAVORS, NORMALIZATIONS  # noqa: F401 -- re-exported
from .params import PreprocessParams as _P
from .params import check

log = logging.getLogger(__name__)

# a new AnnData: obs, obsm and varm['true_programs'] are carried over from the input
SPEC = StageSpec(
    "preprocess",
    writes=(
        Output("X", "X", "normalized expression of the kept genes (float32, sparse if the input was)"),
        Output("layers", "counts", "the raw counts of the kept genes"),
        Output("var", "*", "scanpy's highly variable gene table (highly_variable, means, ...; by hvg_flavor)"),
        Output("uns", "preprocess", "the parameters and what QC removed"),
        Output("uns", "log1p", "scanpy's record of sc.pp.log1p", when="normalize=log1p"),
        Output("uns", "hvg", "scanpy's record of the HVG flavor", when="n_top_genes below the genes left"),
    ),
    metrics=(
        Metric("n_spots", "spots after preprocessing", lambda a: a.n_obs),
        Metric("n_genes", "genes after preprocessing", lambda a: a.n_vars),
    ),
    new_object=True,
)


def _values(M):
    if _is_dask(M):  # data.backend=dask: a summary of the chunks, X never whole in memory
        from .lazy import value_summary

        return value_summary(M)
    return M.data if sp.issparse(M) else np.asarray(M)


def _is_dask(M) -> bool:
    from .chunked import is_dask

    return is_dask(M)


# Counts beyond this are not counts: float32 arithmetic downstream (normalization, the NMF
# loss, which squares values) would overflow to inf and leave NaN results.
MAX_VALUE = 1e12
# log1p of a float32 count never exceeds ~28; above this X cannot be log-scale, and
# expm1 (Seurat's dispersion) would overflow float32 at ~88.
_LOG_SCALE_MAX = 50.0


def validate_counts(M, where: str = "adata.X") -> None:
    """Raise :class:`~tardis_exp.errors.InputError` unless ``M`` is a usable count matrix.

    Usable: 2-D, at least one spot and one gene, a numeric or bool dtype, finite,
    non-negative, not all zero, and no value above ``MAX_VALUE``.
    """
    if M is None:
        raise InputError(f"{where} is empty (None); the file holds no matrix there")
    if not (sp.issparse(M) or isinstance(M, np.ndarray) or _is_dask(M)):
        try:
            M = np.asarray(M)
        except Exception as e:  # e.g. a backed or awkward array
            raise InputError(f"{where} of type {type(M).__name__} cannot be read as a matrix: {e}") from None
    if M.ndim != 2:
        raise InputError(f"{where} must be 2-D (spots x genes), got shape {M.shape}")
    if M.shape[0] == 0 or M.shape[1] == 0:
        raise InputError(f"{where} has shape {M.shape}: no spots or no genes")
    v = _values(M)
    if v.dtype.kind not in "biuf":
        raise InputError(f"{where} has dtype {v.dtype}; expected integer, float or bool counts")
    if v.dtype.kind == "f" and not np.isfinite(v).all():
        bad = int((~np.isfinite(v)).sum())
        raise InputError(f"{where} has {bad} NaN or infinite values; counts must be finite")
    if v.size and v.min() < 0:
        raise InputError(
            f"{where} has negative values (min {v.min()}); NMF needs non-negative counts. "
            "Point preprocess.layer at the raw counts (e.g. preprocess.layer=counts)"
        )
    vmax = float(v.max()) if v.size else 0.0
    if vmax == 0:
        raise InputError(f"{where} is all zeros: nothing to factorize")
    if vmax > MAX_VALUE:
        raise InputError(
            f"{where} has values up to {vmax:.3g}; counts above {MAX_VALUE:.0e} overflow the float32 "
            "computations. Give raw counts or normalized expression"
        )


def _to_float32(M):
    # Integer counts are cast once here: sums over uint8/int16 inputs would overflow.
    if _is_dask(M):  # lazily, chunk by chunk
        from .chunked import _block

        meta = sp.csr_matrix((0, 0), dtype=np.float32) if sp.issparse(M._meta) else np.empty((0, 0), np.float32)
        return M.map_blocks(_block, dtype=np.float32, meta=meta)
    if sp.issparse(M):
        M = sp.csr_matrix(M, dtype=np.float32)
        M.sum_duplicates()  # COO input may hold repeated (i, j) entries
        return M
    return np.asarray(M, dtype=np.float32)


def _excluded(var_names, patterns: Sequence[str], gene_file: str | None) -> np.ndarray:
    drop = np.zeros(len(var_names), dtype=bool)
    if isinstance(patterns, str):  # one pattern given as a plain string, not a list
        patterns = [patterns]
    for pat in patterns or ():
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise ConfigError(f"preprocess.exclude_regex: invalid pattern {pat!r}: {e}") from None
        drop |= np.fromiter((bool(rx.search(str(g))) for g in var_names), bool, len(var_names))
    if gene_file:
        path = Path(str(gene_file)).expanduser()
        if not path.is_file():
            raise InputError(f"preprocess.exclude_genes_file: {path} does not exist")
        genes = {ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
        drop |= np.isin(np.asarray(var_names), list(genes))
    return drop


def normalize_counts(adata: ad.AnnData, normalize: str, target_sum: float | None) -> None:
    """``preprocess.normalize`` in place: ``log1p`` (``normalize_total`` then ``log1p``),
    ``total`` or ``none``; a projection onto a run's programs repeats it (:mod:`tardis_exp.project`)."""
    if normalize in ("log1p", "total"):
        sc.pp.normalize_total(adata, target_sum=target_sum)
    if normalize == "log1p":
        sc.pp.log1p(adata)


def scale_genes(X, sd: np.ndarray):
    """``X`` with every gene divided by its ``sd`` (``preprocess.scale``; sparse stays sparse)."""
    return sp.csr_matrix(X.multiply(1 / sd[None, :])) if sp.issparse(X) else X / sd


def check_params(**params) -> dict:
    """Validate preprocess parameters (cheap; runs before any data is touched); missing
    ones take their defaults (:class:`~tardis_exp.params.PreprocessParams`). Keys that are
    not parameters are ignored here (the pipeline refuses them)."""
    return check("preprocess", params, known_only=True)


def preprocess(
    adata: ad.AnnData,
    *,
    layer: str | None = _P.layer,
    use_raw: bool = _P.use_raw,
    min_cells: int = _P.min_cells,
    min_counts: int = _P.min_counts,
    exclude_regex: Sequence[str] = _P.exclude_regex,
    exclude_genes_file: str | None = _P.exclude_genes_file,
    normalize: str = _P.normalize,
    target_sum: float | None = _P.target_sum,
    n_top_genes: int | None = _P.n_top_genes,
    hvg_flavor: str = _P.hvg_flavor,
    scale: bool = _P.scale,
    make_unique: bool = _P.make_unique,
    min_spots_per_sample: int = _P.min_spots_per_sample,
    batch_correction: str = _P.batch_correction,
    sample_key: str | None = None,
) -> ad.AnnData:
    """Select and normalize the genes the factorization will see.

    Parameters
    ----------
    adata
        Spots x genes; not modified.
    layer
        Take counts from ``adata.layers[layer]`` instead of ``X``.
    use_raw
        Take counts (and genes) from ``adata.raw``.
    min_cells
        Drop genes detected in fewer spots.
    min_counts
        Drop spots with fewer total counts (1 drops empty spots).
    exclude_regex
        Drop genes whose name matches any of these patterns (e.g. ``['^mt-', '^Gm', 'Rik']``).
    exclude_genes_file
        Drop the genes listed (one per line) in this file, e.g. a housekeeping list.
    normalize
        ``'log1p'`` (``normalize_total`` + ``log1p``), ``'total'`` or ``'none'``.
    target_sum
        Counts per spot after ``normalize_total`` (``None``: the median).
    n_top_genes
        Number of highly variable genes (clipped to the genes left; ``None``: keep all).
    hvg_flavor
        scanpy's ``flavor``; ``seurat_v3*`` and ``pearson_residuals`` read the counts.
    scale
        Scale every gene to unit variance, without centering (cNMF does this).
    make_unique
        Make duplicated gene and spot names unique (``var_names_make_unique``,
        ``obs_names_make_unique``) instead of failing. Duplicated spot names would give
        duplicated rows in ``usages.tsv.gz`` that no one can tell apart.
    min_spots_per_sample
        With ``sample_key``: refuse a sample left with fewer spots after QC.
    batch_correction
        ``'none'``, ``'scale'`` or ``'scale_trimmed'`` (:func:`tardis_exp.batch.correct`, after
        the normalization; needs ``sample_key``).
    sample_key
        ``obs`` column naming each spot's sample (``data.sample_key``): the HVG selection is
        per sample (scanpy's ``batch_key``), and ``batch_correction`` corrects per sample.
        ``None``: one sample.

    Returns
    -------
    A new AnnData over the selected genes (see the module docstring for keys).
    """
    check_params(layer=layer, use_raw=use_raw, min_cells=min_cells, min_counts=min_counts,
                 exclude_regex=exclude_regex, exclude_genes_file=exclude_genes_file, normalize=normalize,
                 target_sum=target_sum, n_top_genes=n_top_genes, hvg_flavor=hvg_flavor, scale=scale,
                 make_unique=make_unique, min_spots_per_sample=min_spots_per_sample,
                 batch_correction=batch_correction)
    if batch_correction != "none":  # a missing sample key fails before any compute
        from .batch import sample_codes

        sample_codes(adata, sample_key, batch_correction)
    samples_in = None
    if sample_key is not None:
        if sample_key not in adata.obs.columns:
            raise InputError(f"data.sample_key={sample_key!r} is not an obs column; the AnnData has "
                             f"{list(map(str, adata.obs.columns))}")
        samples_in = adata.obs[sample_key].astype("category").cat.categories
    if use_raw:
        if adata.raw is None:
            lacking = adata.uns.get("samples_without_raw")
            if lacking is not None:  # data=samples: some inputs had .raw, these did not
                raise InputError(f"preprocess.use_raw=true but {len(lacking)} of the data.paths have no .raw: "
                                 f"{', '.join(map(str, lacking))}")
            raise InputError("preprocess.use_raw=true but the AnnData has no .raw")
        counts, var = adata.raw.X, adata.raw.var.copy()
        src = "adata.raw.X"
    elif layer is not None:
        if layer not in adata.layers:
            raise InputError(
                f"preprocess.layer={layer!r} does not exist; the AnnData has layers {list(adata.layers)}"
            )
        counts, var = adata.layers[layer], adata.var.copy()
        src = f"adata.layers[{layer!r}]"
    else:
        counts, var = adata.X, adata.var.copy()
        src = "adata.X"
    validate_counts(counts, src)

    if not var.index.is_unique:
        dup = var.index[var.index.duplicated()].unique()[:5].tolist()
        if not make_unique:
            raise InputError(
                f"{len(var.index[var.index.duplicated()])} duplicated gene names in var_names "
                f"(e.g. {dup}); set preprocess.make_unique=true or call adata.var_names_make_unique()"
            )
    if not adata.obs_names.is_unique and not make_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()]
        raise InputError(
            f"{len(dup)} duplicated spot names in obs_names (e.g. {dup.unique()[:5].tolist()}); "
            "set preprocess.make_unique=true or call adata.obs_names_make_unique()"
        )
    obs = adata.obs.copy()
    out = ad.AnnData(X=_to_float32(counts), obs=obs, var=var, obsm=dict(adata.obsm), uns={})
    if make_unique:
        out.var_names_make_unique()
        if not out.obs_names.is_unique:
            n_dup = int(out.obs_names.duplicated().sum())
            out.obs_names_make_unique()
            warnings.warn(f"preprocess.make_unique: {n_dup} duplicated spot names made unique "
                          "(suffixes -1, -2, ...)", UserWarning, stacklevel=2)
    for k in ("true_programs",):
        if k in adata.varm and adata.varm[k].shape[0] == out.n_vars:
            out.varm[k] = adata.varm[k]

    n0_spots, n0_genes = out.shape
    drop = _excluded(out.var_names, exclude_regex, exclude_genes_file)
    if drop.any():
        out = out[:, ~drop].copy()
    if out.n_vars == 0:
        raise InputError(f"no genes left after excluding {int(drop.sum())} by name "
                         "(preprocess.exclude_regex, preprocess.exclude_genes_file)")
    # checked after each filter, so the message names the setting that emptied the matrix
    # filter with inplace=False and subset only when something goes: scanpy's in-place
    # filters copy the whole matrix even when they keep every row and column
    if min_cells > 0:
        keep_genes, _ = sc.pp.filter_genes(out, min_cells=min_cells, inplace=False)
        if not keep_genes.all():
            out._inplace_subset_var(keep_genes)
        if out.n_vars == 0:
            raise InputError(
                f"no genes left after QC: none is detected in preprocess.min_cells={min_cells} of "
                f"{out.n_obs} spots ({int(drop.sum())} genes excluded by name); lower preprocess.min_cells"
            )
    if min_counts > 0:
        keep_spots, _ = sc.pp.filter_cells(out, min_counts=min_counts, inplace=False)
        if not keep_spots.all():
            out._inplace_subset_obs(keep_spots)
        if out.n_obs == 0:
            raise InputError(
                f"no spots left after QC: none has preprocess.min_counts={min_counts} counts in the "
                f"{out.n_vars} genes kept (preprocess.min_cells={min_cells}); lower preprocess.min_counts"
            )
    if samples_in is not None:  # before the per-sample HVG statistics, which need spots to rest on
        left = out.obs[sample_key].astype(str).value_counts().reindex(samples_in.astype(str), fill_value=0)
        small = left[left < min_spots_per_sample]
        if len(small):
            name, n = small.index[0], int(small.iloc[0])
            raise InputError(
                f"sample {name!r} (obs[{sample_key!r}]) has {n} spots left after QC (preprocess.min_counts="
                f"{min_counts}, of {int((adata.obs[sample_key].astype(str) == name).sum())}), fewer than "
                f"preprocess.min_spots_per_sample={min_spots_per_sample}"
                f"{f' ({len(small)} samples are)' if len(small) > 1 else ''}; leave it out of the study "
                "or lower preprocess.min_spots_per_sample")
    if _values(out.X).max(initial=0) == 0:
        raise InputError(
            f"{src} is all zeros in the genes left after excluding {int(drop.sum())} by name "
            "(preprocess.exclude_regex, preprocess.exclude_genes_file): nothing to factorize"
        )

    out.layers["counts"] = out.X.copy()
    normalize_counts(out, normalize, target_sum)
    if batch_correction != "none":
        from .batch import correct

        # what a projection brings each new section's genes to (tardis_exp.project)
        out.var["batch_mean"] = correct(out, sample_key, batch_correction, normalize)

    n_hvg = out.n_vars if n_top_genes is None else int(n_top_genes)
    if n_hvg > out.n_vars:
        warnings.warn(
            f"preprocess.n_top_genes={n_top_genes} but only {out.n_vars} genes are left; using all of them",
            UserWarning, stacklevel=2,
        )
        n_hvg = out.n_vars
    if n_hvg >= out.n_vars:
        out.var["highly_variable"] = True
    else:
        hvg_layer = "counts" if hvg_flavor.startswith("seurat_v3") else None
        hvg_in = out
        if hvg_flavor == "seurat" and _values(out.X).max(initial=0) > _LOG_SCALE_MAX:
            # Seurat's dispersion takes expm1 of X, which overflows to inf on data that is
            # not log-scale (normalize=total, or normalize=none on counts): rank on log1p(X).
            warnings.warn(
                f"preprocess.hvg_flavor=seurat expects log-scale data but X reaches "
                f"{float(_values(out.X).max()):.3g} (preprocess.normalize={normalize}); "
                "ranking genes on log1p(X)", UserWarning, stacklevel=2,
            )
            hvg_in = ad.AnnData(X=out.X.copy(), obs=out.obs[[sample_key] if sample_key else []], var=out.var[[]])
            sc.pp.log1p(hvg_in)
        try:
            if hvg_flavor == "pearson_residuals":
                sc.experimental.pp.highly_variable_genes(hvg_in, flavor="pearson_residuals",
                                                         n_top_genes=n_hvg, layer="counts", batch_key=sample_key)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    sc.pp.highly_variable_genes(hvg_in, n_top_genes=n_hvg, flavor=hvg_flavor, layer=hvg_layer,
                                                batch_key=sample_key)
        except (IndexError, ValueError, ZeroDivisionError) as e:
            # scanpy fails when no gene has a defined normalized dispersion (e.g. every gene
            # detected in one spot): too little variation to rank on
            raise InputError(
                f"highly variable gene selection (preprocess.hvg_flavor={hvg_flavor}, "
                f"preprocess.n_top_genes={n_top_genes}) failed on {out.n_obs} spots x {out.n_vars} genes: "
                f"{type(e).__name__}: {e}. Too few genes vary across spots; raise preprocess.min_cells, "
                "or keep every gene with preprocess.n_top_genes=null"
            ) from e
        if hvg_in is not out:
            out.var["highly_variable"] = hvg_in.var["highly_variable"].to_numpy()
    hvg = out.var["highly_variable"].to_numpy()
    if not hvg.all():
        out = out[:, hvg].copy()

    if scale:
        X = out.X
        if sp.issparse(X):
            mean = np.asarray(X.mean(0)).ravel()
            var_ = np.asarray(X.multiply(X).mean(0)).ravel() - mean**2
        else:
            var_ = X.var(0)
        sd = np.sqrt(np.maximum(var_, 0)).astype(np.float32)
        sd[sd == 0] = 1
        out.var["scale_sd"] = sd  # what a projection onto these programs divides new data by
        out.X = scale_genes(X, sd)
    out.X = _to_float32(out.X)
    if _is_dask(out.X):  # read, normalize and select once, not on every pass of the factorization
        from .lazy import spill

        out.X = spill(out.X)

    out.uns["preprocess"] = {
        "source": src,
        "n_spots_in": n0_spots,
        "n_genes_in": n0_genes,
        "n_genes_excluded_by_name": int(drop.sum()),
        "n_spots": out.n_obs,
        "n_genes": out.n_vars,
        "normalize": normalize,
        "hvg_flavor": hvg_flavor,
        "scale": bool(scale),
        "batch_correction": batch_correction,
    }
    if sample_key is not None:  # the HVG selection was per sample (scanpy's batch_key)
        out.uns["preprocess"].update(sample_key=sample_key, n_samples=len(samples_in))
    log.info("preprocess: %d x %d -> %d spots x %d genes", n0_spots, n0_genes, *out.shape)
    return out
