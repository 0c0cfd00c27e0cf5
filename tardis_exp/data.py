"""Loading the input AnnData named by the ``data`` config group.

Sources (``data.source``, chosen with ``data=<name>`` on the command line):

``synthetic``
    :func:`tardis_exp.synthetic.make_synthetic` (the default; ground truth inside).
``h5ad``
    Any AnnData file (``anndata.read_h5ad``).
``zarr``
    An AnnData zarr store (folder), e.g. from ``python -m tardis_exp.convert in.h5ad out.zarr``.
``tenx_h5``
    A 10x Genomics ``filtered_feature_bc_matrix.h5`` (``scanpy.read_10x_h5``).
``tenx_mtx``
    A 10x matrix folder: ``matrix.mtx(.gz)``, ``features.tsv(.gz)``/``genes.tsv``,
    ``barcodes.tsv(.gz)`` (``scanpy.read_10x_mtx``).
``visium``
    A Space Ranger output folder, read by :func:`read_visium_folder`: counts through
    ``scanpy.read_10x_h5`` and ``spatial/`` through pandas and json. ``scanpy.read_visium``
    is deprecated since scanpy 1.11 (in favour of squidpy, not a dependency here) and
    fails without the tissue images, which the pipeline does not need.
``pbmc68k``
    scanpy's bundled ``pbmc68k_reduced`` (no network), counts from its non-negative ``.raw``.
``dataset``
    A benchmark set with a published answer (``data.dataset``, :mod:`tardis_exp.datasets`):
    Brunet et al.'s leukemia and medulloblastoma sets (shipped), Monti et al.'s simulations.

``data.backend=dask`` (``h5ad`` and ``zarr``) leaves ``X`` on disk as a row-chunked Dask
array of ``data.chunk_rows`` spots (:func:`tardis_exp.lazy.read_lazy`, docs/large-data.md).

Every failure to read is an :class:`~tardis_exp.errors.InputError` naming ``data.path``
and the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ConfigError, InputError, TardisError, check_choice, check_int
from .tracking import redact

SOURCES = ("synthetic", "h5ad", "tenx_h5", "tenx_mtx", "visium", "pbmc68k", "dataset", "zarr")
_FOLDER_SOURCES = ("tenx_mtx", "visium", "zarr")
# data.backend: memory (read X whole) | dask (X stays on disk as a row-chunked Dask array:
# tardis_exp.lazy, docs/large-data.md); dask reads the AnnData stores only
BACKENDS = ("memory", "dask")
_LAZY_SOURCES = ("h5ad", "zarr")
_SYNTHETIC_KEYS = ("n_spots", "n_genes", "n_programs", "n_markers", "seed")
# Space Ranger's tissue positions (10x documentation order)
_POSITION_COLUMNS = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def check_data(cfg: Mapping[str, Any], check_path: bool = True) -> None:
    """Validate a ``data`` config without reading any data (cheap; runs first)."""
    source = check_choice(cfg.get("source"), "data.source", SOURCES)
    backend = check_choice(cfg.get("backend") or "memory", "data.backend", BACKENDS)
    if backend == "dask":
        if source not in _LAZY_SOURCES:
            raise ConfigError(f"data.backend=dask reads h5ad and zarr stores only, not data={source}; "
                              "convert the data to zarr first (python -m tardis_exp.convert)")
        check_int(cfg.get("chunk_rows") or 1, "data.chunk_rows", minimum=1)
        import importlib.util

        if importlib.util.find_spec("dask") is None:  # an optional extra: say so before reading anything
            raise ConfigError("data.backend=dask needs Dask, which is not installed; pip install 'dask[array]' distributed")
    if source == "synthetic":
        for k in _SYNTHETIC_KEYS:
            if cfg.get(k) is not None:
                check_int(cfg[k], f"data.{k}", minimum=0 if k == "seed" else 1)
        return
    if source == "dataset":
        from .datasets import MONTI, SHIPPED

        check_choice(cfg.get("dataset"), "data.dataset", SHIPPED + MONTI)
        return
    if source == "tenx_mtx":
        check_choice(cfg.get("var_names", "gene_symbols"), "data.var_names", ("gene_symbols", "gene_ids"))
    if source != "pbmc68k" and check_path:
        _need_path(cfg)


def peek_shape(cfg: Mapping[str, Any]) -> tuple[int, int, int | None] | None:
    """``(spots, genes, stored entries)`` of the input, read from the file's metadata only
    (``X``'s shape and the length of its CSR ``data``; ``None`` entries for a dense ``X``),
    or from the config for ``data=synthetic``; ``None`` where it is not known without
    reading the data (10x formats, bundled sets). Nothing is loaded."""
    source = cfg.get("source")
    if source == "synthetic":
        from .synthetic import make_synthetic
        import inspect

        d = inspect.signature(make_synthetic).parameters
        n = cfg.get("n_spots") or d["n_spots"].default
        m = cfg.get("n_genes") or d["n_genes"].default
        return int(n), int(m), None
    if source not in _LAZY_SOURCES or cfg.get("path") in (None, "", "???"):
        return None
    from .lazy import _open_store, _shape

    try:
        root = _open_store(Path(str(cfg["path"])).expanduser())
    except InputError:
        return None  # the loader says what is wrong with the file
    try:
        if "X" not in root:
            return None
        X = root["X"]
        n, m = _shape(X)
        nnz = int(X["data"].shape[0]) if hasattr(X, "keys") and "data" in X else None
        return n, m, nnz
    except (KeyError, ValueError, TypeError, OSError):
        return None
    finally:
        close = getattr(root, "close", None)
        if close is not None:
            close()


def _need_path(cfg) -> Path:
    source = cfg["source"]
    path = cfg.get("path")
    if path in (None, "", "???"):
        raise ConfigError(f"data.path is required for data={source}; e.g. data.path=/path/to/input")
    p = Path(str(path)).expanduser()
    # messages quote the configured string, credentials hidden (Path() would mangle "://")
    shown = redact(str(path))
    if not p.exists():
        raise InputError(f"data.path: {shown} does not exist")
    must_be_dir = source in _FOLDER_SOURCES
    if must_be_dir and not p.is_dir():
        raise InputError(f"data.path: {shown} must be a folder for data={source}")
    if not must_be_dir and p.is_dir():
        raise InputError(f"data.path: {shown} is a folder; data={source} needs a file")
    if not must_be_dir and not _readable(p):
        raise InputError(f"data.path: {shown} is not readable (permission denied)")
    return p


def _readable(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False


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


def _pbmc68k() -> ad.AnnData:
    import scanpy as sc

    a = sc.datasets.pbmc68k_reduced()
    # its X is scaled; .raw holds non-negative log-normalized values of 765 genes
    out = ad.AnnData(X=sp.csr_matrix(a.raw.X, dtype=np.float32), obs=a.obs.copy(), var=a.raw.var.copy())
    out.obsm.update({k: v for k, v in a.obsm.items()})
    return out


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
    source = cfg["source"]
    if source == "synthetic":
        from .synthetic import make_synthetic

        return make_synthetic(**{k: cfg[k] for k in _SYNTHETIC_KEYS if cfg.get(k) is not None})
    if source == "pbmc68k":
        return _pbmc68k()
    if source == "dataset":
        from .datasets import load

        return load(cfg["dataset"], seed=int(cfg.get("seed") or 0))

    import scanpy as sc

    p = _need_path(cfg)
    try:
        if (cfg.get("backend") or "memory") == "dask":
            from .lazy import DEFAULT_CHUNK_ROWS, read_lazy

            adata = read_lazy(p, chunk_rows=cfg.get("chunk_rows") or DEFAULT_CHUNK_ROWS)
        elif source == "zarr":
            adata = ad.read_zarr(p)
        elif source == "h5ad":
            adata = ad.read_h5ad(p)
        elif source == "tenx_h5":
            adata = sc.read_10x_h5(p, genome=cfg.get("genome"))
        elif source == "tenx_mtx":
            adata = sc.read_10x_mtx(p, var_names=cfg.get("var_names", "gene_symbols"))
        else:
            adata = read_visium_folder(p, count_file=cfg.get("count_file") or "filtered_feature_bc_matrix.h5")
    except TardisError:
        raise
    except Exception as e:  # whatever the reader hit, the cause is the file: say which
        msg = " ".join(str(e).split())[:500]
        raise InputError(f"data.path: cannot read {p} as data={source}: {type(e).__name__}: {msg}") from e
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
