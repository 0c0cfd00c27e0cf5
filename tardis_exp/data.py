"""Loading the input AnnData named by the ``data`` config group.

Sources (``data.source``, chosen with ``data=<name>`` on the command line) are the entries of
:data:`tardis_exp.sources.SOURCES`: each with its reader, path kind, checks and shape peek.
:func:`read_visium_folder` reads a Space Ranger folder: counts through ``scanpy.read_10x_h5``
and ``spatial/`` through pandas and json (``scanpy.read_visium`` is deprecated since scanpy
1.11 and fails without the tissue images, which the pipeline does not need).

``data.backend=dask`` (the AnnData stores and 10x HDF5 files) leaves ``X`` on disk as a
row-chunked Dask array of ``data.chunk_rows`` spots (:func:`tardis_exp.lazy.read_lazy`,
:func:`read_10x_h5_lazy`, docs/large-data.md).

Every failure to read is an :class:`~tardis_exp.errors.InputError` naming ``data.path``
and the file.

Several samples as one study: ``data=samples`` reads every entry of ``data.paths`` with the
source its name or folder says (:func:`read_samples`) and concatenates them; any source
with ``data.sample_key=<obs column>`` names the samples of one AnnData. Either way, once
loaded, ``cfg['data']['sample_key']`` is ``None`` (one sample) or the name of a categorical
column of ``obs`` with at least one sample (:func:`check_sample_key`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import logging
from collections.abc import Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError, TardisError, redact
from .sources import BACKENDS, SOURCES, check_data, need_path, peek_shape  # noqa: F401 -- re-exported
from .sources import sample_inputs

log = logging.getLogger(__name__)

# Space Ranger's tissue positions (10x documentation order)
_POSITION_COLUMNS = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def read_visium_folder(path: str | Path, count_file: str = "filtered_feature_bc_matrix.h5",
                       library_id: str | None = None, load_images: bool = True) -> ad.AnnData:
    """Read a Space Ranger output folder into AnnData.

    Parameters
    ----------
    path
        The folder holding ``count_file`` and ``spatial/``.
    count_file
        The 10x HDF5 matrix inside ``path``.
    library_id
        Key under ``uns['spatial']`` (default: the file's ``library_ids`` attribute,
        else the folder name).
    load_images
        Load ``spatial/tissue_{hires,lowres}_image.png`` when present (never required).

    Returns
    -------
    AnnData with the counts, ``obs[['in_tissue', 'array_row', 'array_col']]``,
    ``obsm['spatial']`` (full-resolution pixel x, y: ``pxl_col_in_fullres``,
    ``pxl_row_in_fullres``, the order ``scanpy.read_visium`` and squidpy use) and
    ``uns['spatial'][library_id]`` (``scalefactors``, ``images``, ``metadata``).
    """
    import h5py
    import scanpy as sc

    path = Path(path)
    h5 = path / count_file
    if not h5.is_file():
        raise InputError(f"data.path: {path} has no {count_file} (data.count_file); is it a Space Ranger folder?")
    adata = sc.read_10x_h5(h5)
    with h5py.File(h5, "r") as f:
        attrs = dict(f.attrs)
    if library_id is None:
        ids = attrs.get("library_ids")
        library_id = (ids[0].decode() if isinstance(ids[0], bytes) else str(ids[0])) if ids is not None and len(ids) \
            else path.name

    spatial = path / "spatial"
    pos_file = spatial / "tissue_positions.csv"  # Space Ranger >= 2.0: with a header line
    if not pos_file.is_file():
        pos_file = spatial / "tissue_positions_list.csv"  # Space Ranger 1.x: no header
    if not pos_file.is_file():
        raise InputError(f"data.path: {path} has no spatial/tissue_positions.csv "
                         "(or tissue_positions_list.csv); is it a Space Ranger folder?")
    pos = pd.read_csv(pos_file, header=0 if pos_file.name == "tissue_positions.csv" else None, index_col=0)
    if pos.shape[1] != len(_POSITION_COLUMNS):
        raise InputError(f"{pos_file}: expected barcode + {len(_POSITION_COLUMNS)} columns "
                         f"({', '.join(_POSITION_COLUMNS)}), found {pos.shape[1] + 1}")
    pos.columns = _POSITION_COLUMNS
    pos.index = pos.index.astype(str)
    missing = ~adata.obs_names.isin(pos.index)
    if missing.any():
        raise InputError(f"{pos_file}: no position for {int(missing.sum())} barcodes of {count_file} "
                         f"(e.g. {list(adata.obs_names[missing][:3])})")
    pos = pos.loc[adata.obs_names]
    for c in ("in_tissue", "array_row", "array_col"):
        adata.obs[c] = pos[c].to_numpy()
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)

    lib: dict[str, Any] = {"images": {}, "scalefactors": {}, "metadata": {}}
    sf = spatial / "scalefactors_json.json"
    if sf.is_file():
        lib["scalefactors"] = json.loads(sf.read_text())
    if load_images:
        from matplotlib.image import imread

        for res in ("hires", "lowres"):
            img = spatial / f"tissue_{res}_image.png"
            if img.is_file():
                lib["images"][res] = imread(str(img))
    for k in ("chemistry_description", "software_version"):
        if k in attrs:
            v = attrs[k]
            lib["metadata"][k] = v.decode() if isinstance(v, bytes) else str(v)
    adata.uns["spatial"] = {library_id: lib}
    return adata


def _tenx_rows(path: str, start: int, stop: int, lo: int, hi: int, indptr: np.ndarray, n_features: int,
               keep: np.ndarray | None) -> sp.csr_matrix:
    """Spots ``start:stop`` of a 10x matrix: its entries ``lo:hi`` of ``matrix/data`` and
    ``matrix/indices`` (a spot's entries are contiguous: the file's CSC of genes x spots is
    the CSR of spots x genes), as ``scanpy.read_10x_h5`` builds them (int32 counts as float32)."""
    import h5py

    with h5py.File(path, "r") as f:  # opened per chunk: an h5py handle does not cross processes
        data = f["matrix/data"][lo:hi]
        indices = f["matrix/indices"][lo:hi]
    if data.dtype == np.int32:
        data = data.astype(np.float32)
    M = sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, n_features))
    return M[:, keep] if keep is not None else M


def read_10x_h5_lazy(path: str | Path, genome: str | None = None, chunk_rows: int = 20_000) -> ad.AnnData:
    """A 10x ``filtered_feature_bc_matrix.h5`` (v3 layout, ``/matrix``) with ``X`` left in the
    file as a Dask array of ``chunk_rows`` spots, read chunk by chunk with h5py.

    What ``scanpy.read_10x_h5(path, genome)`` returns, with the same names, ``var`` columns,
    dtype and values: Gene Expression features only, of ``genome`` if given. In memory:
    ``indptr`` (8 bytes a spot), the barcodes and the features; one chunk when computed.
    """
    import dask
    import dask.array as da
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as f:
        if "matrix" not in f:
            raise InputError(f"data.path: {path} is a 10x HDF5 file of the legacy (v2, Cell Ranger < 3) layout, "
                             "which data.backend=dask does not read; use data.backend=memory")
        g = f["matrix"]
        n_features, n_spots = (int(x) for x in g["shape"][()])  # genes x spots (CSC by spot)
        indptr = g["indptr"][()].astype(np.int64)
        barcodes = g["barcodes"][()].astype(str)
        feats = g["features"]
        var = pd.DataFrame(index=pd.Index(feats["name"][()].astype(str)))
        if "gene_id" in feats:  # a probe-barcode matrix (scanpy's columns)
            var["gene_ids"] = feats["gene_id"][()].astype(str)
            var["probe_ids"] = feats["id"][()].astype(str)
        else:
            var["gene_ids"] = feats["id"][()].astype(str)
        var["feature_types"] = feats["feature_type"][()].astype(str)
        for k, v in feats.items():
            if isinstance(v, h5py.Dataset) and k not in ("name", "feature_type", "id", "gene_id", "_all_tag_keys"):
                var[k] = v[()].astype(bool if v.dtype.kind == "b" else str)
        obs = pd.DataFrame(index=pd.Index(barcodes))
        if "filtered_barcodes" in g:
            obs["filtered_barcodes"] = g["filtered_barcodes"][()].astype(bool)
        dtype = np.dtype(np.float32) if g["data"].dtype == np.int32 else g["data"].dtype
    keep = np.ones(n_features, bool)
    if genome:
        if genome not in var["genome"].to_numpy():
            raise InputError(f"data.genome={genome!r} is not in {path}; it holds {sorted(var['genome'].unique())}")
        keep &= (var["genome"] == genome).to_numpy()
    keep &= (var["feature_types"] == "Gene Expression").to_numpy()  # scanpy's gex_only
    var = var[keep]
    n_keep = int(keep.sum())
    cols = None if keep.all() else keep
    step = max(1, min(int(chunk_rows), n_spots))
    meta = sp.csr_matrix((0, 0), dtype=dtype)
    parts = []
    for a in range(0, n_spots, step):
        b = min(a + step, n_spots)
        blk = dask.delayed(_tenx_rows, pure=True)(str(path), a, b, int(indptr[a]), int(indptr[b]), indptr[a:b + 1],
                                                  n_features, cols)
        parts.append(da.from_delayed(blk, shape=(b - a, n_keep), dtype=dtype, meta=meta))
    X = da.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    return ad.AnnData(X=X, obs=obs, var=var)


def load_data(cfg) -> ad.AnnData:
    """Read the data set described by a ``data`` config (a mapping with ``source``).

    Raises
    ------
    ConfigError
        Unknown ``data.source``, missing ``data.path`` or a bad option.
    InputError
        The path does not exist, is of the wrong kind, or cannot be read as ``source``.
    """
    check_data(cfg, check_path=False)
    source = SOURCES[cfg["source"]]
    if source.path is None:  # made or shipped: an error there is ours, not the user's file
        adata = source.read(cfg, None)
    elif source.path == "list":  # data=samples: each input read (and blamed) by _read_one
        adata = source.read(cfg, None)
    else:
        adata = _read_one(cfg, "data.path")
    check_sample_key(adata, cfg)
    return adata


def _read_one(cfg, key: str) -> ad.AnnData:
    """The input ``cfg['path']`` read by its source; every failure names ``key`` and the file."""
    source = SOURCES[cfg["source"]]
    p = need_path(cfg, key)
    try:
        adata = source.read(cfg, p)
    except TardisError as e:
        if key != "data.path" and str(e).startswith("data.path: "):  # a reader's message, about this input
            raise type(e)(f"{key}: {str(e)[len('data.path: '):]}") from e
        raise
    except Exception as e:  # whatever the reader hit, the cause is the file: say which
        msg = " ".join(str(e).split())[:500]
        raise InputError(f"{key}: cannot read {p} as data={source.name}: {type(e).__name__}: {msg}") from e
    if not isinstance(adata, ad.AnnData):
        raise InputError(f"{key}: {p} holds a {type(adata).__name__}, not an AnnData")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"{key}: {p} holds {adata.n_obs} spots x {adata.n_vars} genes: nothing to analyse")
    return adata


def check_sample_key(adata: ad.AnnData, cfg) -> None:
    """``obs[data.sample_key]`` made categorical (in place), or an :class:`InputError` naming
    the key and the columns there are. Nothing to do without a sample key."""
    key = cfg.get("sample_key")
    if key is None:
        return
    where = f"data.path={redact(str(cfg['path']))}" if cfg.get("path") not in (None, "", "???") \
        else f"data={cfg['source']}"
    if key not in adata.obs.columns:
        raise InputError(f"data.sample_key={key!r} is not an obs column of {where}; its obs columns: "
                         f"{list(map(str, adata.obs.columns))}")
    col = adata.obs[key]
    if col.isna().any():
        raise InputError(f"data.sample_key={key!r}: {int(col.isna().sum())} spots of {where} have no sample "
                         f"(missing values in obs[{key!r}])")
    if not isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype(str).astype("category")  # sample labels are names: 1 and '1' are one sample
    adata.obs[key] = col.cat.remove_unused_categories()


def read_samples(cfg) -> ad.AnnData:
    """The inputs of ``data=samples`` as one AnnData (``anndata.concat``).

    Each entry of ``data.paths`` is read by the source its suffix or folder names
    (:func:`tardis_exp.sources.infer_source`). Genes are intersected; each spot's sample is
    ``obs[data.sample_key]`` (categorical, in the order of ``data.paths``) and its name gets
    ``-<sample>`` appended (spot barcodes repeat across sections). ``obsm['spatial']`` keeps
    each section's own coordinates (sections may overlap: per-section statistics read the
    sample column); a Space Ranger folder's ``uns['spatial']`` entry is kept under the
    sample's name, as squidpy reads ``uns['spatial'][library_id]`` with
    ``library_key=data.sample_key``. ``var`` columns equal in every input are kept; the rest of
    the inputs' ``uns`` is not (a merge would mix one section's records with another's).
    """
    key = cfg["sample_key"]
    parts: dict[str, ad.AnnData] = {}
    files: dict[str, str] = {}
    for name, sub, where in sample_inputs(cfg):
        a = _read_one(sub, where)
        if key in a.obs.columns:
            raise InputError(f"{where}: {redact(sub['path'])} already has an obs column {key!r}; choose another "
                             "data.sample_key for the samples' names")
        if not a.var_names.is_unique:  # the intersection below needs unique names
            a.var_names_make_unique()
        parts[name], files[name] = a, redact(sub["path"])
    common = set.intersection(*(set(a.var_names) for a in parts.values()))
    if not common:
        sizes = ", ".join(f"{files[n]} ({a.n_vars} genes, e.g. {list(a.var_names[:2])})" for n, a in parts.items())
        raise InputError(f"data.paths: the samples share no gene name: {sizes}; are they the same organism and "
                         "the same gene naming (symbols or ids: data.var_names)?")
    for n, a in parts.items():
        if a.n_vars > len(common):
            log.info("data.paths: %s keeps %d of its %d genes (those every sample has)", files[n], len(common), a.n_vars)
    with_xy = [n for n, a in parts.items() if "spatial" in a.obsm]
    if with_xy and len(with_xy) < len(parts):
        log.warning("data.paths: only %s have spatial coordinates (obsm['spatial']); the study has none",
                    ", ".join(files[n] for n in with_xy))
    libraries: dict[str, Any] = {}
    for n, a in parts.items():
        lib = a.uns.get("spatial")
        if isinstance(lib, Mapping) and len(lib) == 1:  # one section: its library under the sample's name
            libraries[n] = next(iter(lib.values()))
        elif isinstance(lib, Mapping):
            libraries.update({f"{n}_{k}": v for k, v in lib.items()})
    import warnings

    with warnings.catch_warnings():  # "observation names are not unique": index_unique makes them so
        warnings.simplefilter("ignore", UserWarning)
        out = ad.concat(parts, join="inner", label=key, index_unique="-", merge="same")
    out.obs[key] = pd.Categorical(out.obs[key].astype(str), categories=list(parts))
    if libraries:
        out.uns["spatial"] = libraries
    else:
        out.uns.pop("spatial", None)
    _join_raw(out, parts, files, key)
    return out


def _join_raw(out: ad.AnnData, parts: dict[str, ad.AnnData], files: dict[str, str], key: str) -> None:
    """``out.raw``: the inputs' ``.raw`` joined as their ``X`` is (``anndata.concat`` drops
    ``.raw``), over the raw genes every input has, in ``out``'s spot order.

    Some inputs with ``.raw`` and some without: no ``.raw``, and ``uns['samples_without_raw']``
    names the files lacking it, for ``preprocess.use_raw``'s error."""
    has = {n: a.raw is not None for n, a in parts.items()}
    if not any(has.values()):
        return
    if not all(has.values()):
        out.uns["samples_without_raw"] = [files[n] for n, h in has.items() if not h]
        return
    import warnings

    raws = {}
    for n, a in parts.items():
        r = ad.AnnData(X=a.raw.X, obs=pd.DataFrame(index=a.obs_names), var=a.raw.var.copy())
        if not r.var_names.is_unique:
            r.var_names_make_unique()
        raws[n] = r
    common = set.intersection(*(set(r.var_names) for r in raws.values()))
    if not common:
        raise InputError("data.paths: the samples' .raw share no gene name (preprocess.use_raw reads .raw)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        raw = ad.concat(raws, join="inner", label=key, index_unique="-", merge="same")
    assert raw.obs_names.equals(out.obs_names)  # both built by the same concat of the same parts
    out.raw = raw


def _canonical(X):
    """CSR with sorted column indices: the same matrix hashes the same however it was built
    (a row subset or ``anndata.concat``'s gene join leaves them unsorted)."""
    X = sp.csr_matrix(X)
    return X if X.has_sorted_indices else X.sorted_indices()


def digest(adata: ad.AnnData) -> str:
    """Content digest of X, the spot and the gene names (16 hex digits)."""
    h = hashlib.sha256()
    h.update(repr(adata.shape).encode())
    X = adata.X
    from .chunked import is_dask

    if X is None:
        pass
    elif is_dask(X):  # chunk by chunk; the same bytes as the in-memory CSR / dense path
        import dask

        for b in X.to_delayed().ravel():
            blk = dask.compute(b)[0]
            if sp.issparse(blk):
                blk = _canonical(blk)
                for arr in (blk.indptr - blk.indptr[0], blk.indices, blk.data):
                    h.update(np.ascontiguousarray(arr).tobytes())
            else:
                h.update(np.ascontiguousarray(blk).tobytes())
    elif sp.issparse(X):
        X = _canonical(X)
        for arr in (X.indptr, X.indices, X.data):
            h.update(np.ascontiguousarray(arr).tobytes())
    else:
        h.update(np.ascontiguousarray(X).tobytes())
    h.update("\n".join(map(str, adata.obs_names)).encode())
    h.update("\n".join(map(str, adata.var_names)).encode())
    return h.hexdigest()[:16]


def sample_digests(adata: ad.AnnData, cfg) -> list[dict[str, Any]]:
    """One record per sample of a study (empty without ``data.sample_key``): ``name``,
    ``digest`` (:func:`digest` of the sample's spots, as the run reads them), ``n_obs``,
    ``n_vars`` and ``source`` (its file, or the study's)."""
    key = cfg.get("sample_key")
    if key is None:
        return []
    files = {n: str(Path(sub["path"]).expanduser().resolve()) for n, sub, _ in sample_inputs(cfg)} \
        if SOURCES[cfg["source"]].path == "list" else {}
    study = str(cfg.get("path") or cfg["source"])
    labels = adata.obs[key].to_numpy()
    out = []
    for name in adata.obs[key].cat.categories:
        part = adata[labels == name]
        out.append({"name": str(name), "digest": digest(part), "n_obs": int(part.n_obs), "n_vars": int(part.n_vars),
                    "source": str(files.get(str(name), study))})
    return out
