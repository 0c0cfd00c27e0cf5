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
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError, TardisError
from .sources import BACKENDS, SOURCES, check_data, need_path, peek_shape  # noqa: F401 -- re-exported

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


def read_10x_h5_lazy(path: str | Path, genome: str | None = None, chunk_rows: int = 50_000) -> ad.AnnData:
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
        return source.read(cfg, None)
    p = need_path(cfg)
    try:
        adata = source.read(cfg, p)
    except TardisError:
        raise
    except Exception as e:  # whatever the reader hit, the cause is the file: say which
        msg = " ".join(str(e).split())[:500]
        raise InputError(f"data.path: cannot read {p} as data={source.name}: {type(e).__name__}: {msg}") from e
    if not isinstance(adata, ad.AnnData):
        raise InputError(f"data.path: {p} holds a {type(adata).__name__}, not an AnnData")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"data.path: {p} holds {adata.n_obs} spots x {adata.n_vars} genes: nothing to analyse")
    return adata


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
                blk = sp.csr_matrix(blk)
                for arr in (blk.indptr - blk.indptr[0], blk.indices, blk.data):
                    h.update(np.ascontiguousarray(arr).tobytes())
            else:
                h.update(np.ascontiguousarray(blk).tobytes())
    elif sp.issparse(X):
        X = sp.csr_matrix(X)
        for arr in (X.indptr, X.indices, X.data):
            h.update(np.ascontiguousarray(arr).tobytes())
    else:
        h.update(np.ascontiguousarray(X).tobytes())
    h.update("\n".join(map(str, adata.obs_names)).encode())
    h.update("\n".join(map(str, adata.var_names)).encode())
    return h.hexdigest()[:16]
