"""The data sources ``data=<name>`` can read: one registry entry per source.

Each :class:`Source` says what kind of path it needs, how to check its own keys, how to
read it and, where the file's metadata tell it, its shape. Everything else is derived
from :data:`SOURCES`: the allowed ``data.source`` values, the path checks, the dispatch of
:func:`tardis_exp.data.load_data`, whether the stage cache keys an input by its files or by
its config, and the documentation's list. Adding a source is one :func:`register` call
(here or in a module of its own) plus its test.

This module is light to import (no anndata, no scanpy): the CLI checks a ``data`` config
before the scientific stack loads; the readers import what they need when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError, InputError, check_choice, check_int, redact

# data.backend: memory (read X whole) | dask (X stays on disk as a row-chunked Dask array:
# tardis_exp.lazy, docs/large-data.md); dask reads the sources marked lazy
BACKENDS = ("memory", "dask")
_UNSET = (None, "", "???")


@dataclass(frozen=True)
class Source:
    """One input format.

    Parameters
    ----------
    name
        The value of ``data.source`` (and the file name of its preset, ``conf/data/<name>.yaml``).
    doc
        One line for the documentation.
    read
        ``read(cfg, path) -> AnnData``; ``path`` is the checked ``data.path`` (``None`` for a
        source without one). Imports what it needs when called.
    path
        ``"file"``, ``"folder"``, ``"list"`` (``data.paths``: several inputs, one sample each)
        or ``None`` (the source needs no ``data.path``: the data are made or shipped, and the
        stage cache keys them by their config).
    lazy
        ``data.backend=dask`` can read it (AnnData stores, 10x HDF5).
    check
        ``check(cfg)``: the source's own keys, before anything is read.
    peek
        ``peek(cfg) -> (spots, genes, stored entries) | None`` from metadata only.
    """

    name: str
    doc: str
    read: Callable[[Mapping[str, Any], Path | None], Any]
    path: str | None = "file"
    lazy: bool = False
    check: Callable[[Mapping[str, Any]], None] | None = None
    peek: Callable[[Mapping[str, Any]], tuple[int, int, int | None] | None] | None = None


SOURCES: dict[str, Source] = {}


def register(source: Source) -> Source:
    """Add ``source`` to :data:`SOURCES` (its name must be new)."""
    if source.name in SOURCES:
        raise ValueError(f"data source {source.name!r} is registered twice")
    if source.path not in ("file", "folder", "list", None):
        raise ValueError(f"data source {source.name!r}: path must be 'file', 'folder', 'list' or None")
    SOURCES[source.name] = source
    return source


# ---------------------------------------------------------------- checks


def check_data(cfg: Mapping[str, Any], check_path: bool = True) -> None:
    """Validate a ``data`` config without reading any data (cheap; runs first)."""
    source = SOURCES[check_choice(cfg.get("source"), "data.source", tuple(SOURCES))]
    backend = check_choice(cfg.get("backend") or "memory", "data.backend", BACKENDS)
    from .params import check as check_params  # light: no scientific stack

    sample_key = check_params("data", cfg, known_only=True)["sample_key"]
    if backend == "dask" and sample_key is not None:
        # scanpy's per-batch HVG selection subsets X by sample: not on a chunked X
        raise ConfigError(f"data.sample_key={sample_key} selects genes per sample, which data.backend=dask "
                          "does not do; use data.backend=memory or data.sample_key=null")
    if backend == "dask":
        if not source.lazy:
            lazy = [n for n, s in SOURCES.items() if s.lazy]
            lazy = ", ".join(lazy[:-1]) + " and " + lazy[-1] if len(lazy) > 1 else lazy[0]
            raise ConfigError(f"data.backend=dask reads {lazy} files only, not data={source.name}; "
                              "convert the data to zarr first (python -m tardis_exp.convert)")
        check_int(cfg.get("chunk_rows") or 1, "data.chunk_rows", minimum=1)
        import importlib.util

        if importlib.util.find_spec("dask") is None:  # say so before reading anything
            raise ConfigError("data.backend=dask needs Dask, which is not installed; pip install 'dask[array]' distributed")
    if source.check is not None:
        source.check(cfg)
    if source.path == "list" and check_path:
        sample_inputs(cfg)
    elif source.path is not None and check_path:
        need_path(cfg)


def need_path(cfg: Mapping[str, Any], key: str = "data.path") -> Path:
    """``data.path`` (or the config key ``key``) checked against what its source needs (a
    file or a folder, readable)."""
    source = SOURCES[cfg["source"]]
    path = cfg.get("path")
    if path in _UNSET:
        raise ConfigError(f"{key} is required for data={source.name}; e.g. {key}=/path/to/input")
    p = Path(str(path)).expanduser()
    # messages quote the configured string, credentials hidden (Path() would mangle "://")
    shown = redact(str(path))
    if not p.exists():
        raise InputError(f"{key}: {shown} does not exist")
    folder = source.path == "folder"
    if folder and not p.is_dir():
        raise InputError(f"{key}: {shown} must be a folder for data={source.name}")
    if not folder and p.is_dir():
        raise InputError(f"{key}: {shown} is a folder; data={source.name} needs a file")
    if not folder and not _readable(p):
        raise InputError(f"{key}: {shown} is not readable (permission denied)")
    return p


# ---------------------------------------------------------------- several inputs (data=samples)

_SUFFIXES = {".h5ad": "h5ad", ".h5": "tenx_h5", ".zarr": "zarr"}
_ACCEPTED = "an .h5ad file, a 10x .h5 file, a 10x matrix folder, a Space Ranger folder or a .zarr store"


def infer_source(path: Path, key: str) -> str:
    """The source that reads ``path`` (one input of ``data=samples``), from its name or content."""
    if path.is_dir():
        if (path / "spatial").is_dir():
            return "visium"
        if path.suffix == ".zarr" or any((path / f).exists() for f in (".zgroup", "zarr.json")):
            return "zarr"
        if any((path / f).is_file() for f in ("matrix.mtx", "matrix.mtx.gz")):
            return "tenx_mtx"
    elif path.suffix in _SUFFIXES and _SUFFIXES[path.suffix] != "zarr":
        return _SUFFIXES[path.suffix]
    raise InputError(f"{key}: cannot tell how to read {redact(str(path))}; give {_ACCEPTED}")


def sample_name(path: Path) -> str:
    """A sample's default name: its file name without the format's suffix, or its folder's name."""
    return path.name[: -len(path.suffix)] if path.suffix in _SUFFIXES else path.name


def sample_inputs(cfg: Mapping[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """``(name, config, key)`` of every input of ``data=samples``, each path checked.

    ``config`` is ``cfg`` with the source and path of that input (the other keys, e.g.
    ``data.count_file``, apply to every input of their source); ``key`` names it in messages
    (``data.paths[1]``).
    """
    out = []
    for i, path in enumerate(cfg["paths"]):
        key = f"data.paths[{i}]"
        p = Path(str(path)).expanduser()
        if not p.exists():
            raise InputError(f"{key}: {redact(str(path))} does not exist")
        sub = {**cfg, "source": infer_source(p, key), "path": str(path), "backend": "memory"}
        need_path(sub, key)
        out.append((str(cfg["names"][i]) if cfg.get("names") else sample_name(p), sub, key))
    return out


def _readable(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False


def peek_shape(cfg: Mapping[str, Any]) -> tuple[int, int, int | None] | None:
    """``(spots, genes, stored entries)`` of the input from metadata only (``None`` entries
    for a dense ``X``); ``None`` where the source cannot tell without reading the data."""
    source = SOURCES.get(cfg.get("source"))
    if source is None or source.peek is None:
        return None
    if source.path not in (None, "list") and cfg.get("path") in _UNSET:
        return None
    return source.peek(cfg)


def describe() -> str:
    """The sources as a Markdown table (the documentation's list)."""
    rows = ["| `data=` | reads | `data.path` | `data.backend=dask` |", "|---|---|---|---|"]
    for s in SOURCES.values():
        path = "`data.paths`: a list" if s.path == "list" else s.path or "-"
        rows.append(f"| `{s.name}` | {s.doc} | {path} | {'yes' if s.lazy else '-'} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- the sources

_SYNTHETIC_KEYS = ("n_spots", "n_genes", "n_programs", "n_markers", "seed")


def _check_synthetic(cfg):
    for k in _SYNTHETIC_KEYS:
        if cfg.get(k) is not None:
            check_int(cfg[k], f"data.{k}", minimum=0 if k == "seed" else 1)


def _read_synthetic(cfg, path):
    from .synthetic import make_synthetic

    return make_synthetic(**{k: cfg[k] for k in _SYNTHETIC_KEYS if cfg.get(k) is not None})


def _peek_synthetic(cfg):
    import inspect

    from .synthetic import make_synthetic

    d = inspect.signature(make_synthetic).parameters
    return int(cfg.get("n_spots") or d["n_spots"].default), int(cfg.get("n_genes") or d["n_genes"].default), None


def _peek_store(cfg):
    """Shape and stored entries of an AnnData store's ``X`` (h5ad or zarr), from metadata."""
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


def _read_store(reader: str):
    def read(cfg, path):
        import anndata as ad

        if (cfg.get("backend") or "memory") == "dask":
            from .lazy import DEFAULT_CHUNK_ROWS, read_lazy

            return read_lazy(path, chunk_rows=cfg.get("chunk_rows") or DEFAULT_CHUNK_ROWS)
        return getattr(ad, reader)(path)

    return read


def _read_tenx_h5(cfg, path):
    if (cfg.get("backend") or "memory") == "dask":  # row chunks straight from the file (data.read_10x_h5_lazy)
        from .data import read_10x_h5_lazy
        from .lazy import DEFAULT_CHUNK_ROWS

        return read_10x_h5_lazy(path, genome=cfg.get("genome"), chunk_rows=cfg.get("chunk_rows") or DEFAULT_CHUNK_ROWS)
    import scanpy as sc

    return sc.read_10x_h5(path, genome=cfg.get("genome"))


def _peek_tenx_h5(cfg):
    """Spots, features and stored entries of a 10x HDF5 matrix (v3 layout), from its metadata."""
    import h5py

    try:
        with h5py.File(Path(str(cfg["path"])).expanduser(), "r") as f:
            n_features, n_spots = (int(x) for x in f["matrix/shape"][()])
            return n_spots, n_features, int(f["matrix/data"].shape[0])
    except (OSError, KeyError, ValueError, TypeError):
        return None  # the loader says what is wrong with the file


def _check_tenx_mtx(cfg):
    check_choice(cfg.get("var_names", "gene_symbols"), "data.var_names", ("gene_symbols", "gene_ids"))


def _read_tenx_mtx(cfg, path):
    import scanpy as sc

    return sc.read_10x_mtx(path, var_names=cfg.get("var_names", "gene_symbols"))


def _read_visium(cfg, path):
    from .data import read_visium_folder

    return read_visium_folder(path, count_file=cfg.get("count_file") or "filtered_feature_bc_matrix.h5")


def _read_pbmc68k(cfg, path):
    import anndata as ad
    import numpy as np
    import scanpy as sc
    import scipy.sparse as sp

    a = sc.datasets.pbmc68k_reduced()
    # its X is scaled; .raw holds non-negative log-normalized values of 765 genes
    out = ad.AnnData(X=sp.csr_matrix(a.raw.X, dtype=np.float32), obs=a.obs.copy(), var=a.raw.var.copy())
    out.obsm.update({k: v for k, v in a.obsm.items()})
    return out


def _check_dataset(cfg):
    from .datasets import MONTI, SHIPPED

    check_choice(cfg.get("dataset"), "data.dataset", SHIPPED + MONTI)


def _read_dataset(cfg, path):
    from .datasets import load

    return load(cfg["dataset"], seed=int(cfg.get("seed") or 0))


def _check_samples(cfg):
    paths, names = cfg.get("paths"), cfg.get("names")
    if isinstance(paths, str) or not isinstance(paths, (list, tuple)) or not paths:
        raise ConfigError(f"data.paths must be a list of inputs for data=samples, e.g. 'data.paths=[a.h5ad,b.h5ad]'; "
                          f"got {redact(paths)!r}")
    if cfg.get("sample_key") is None:
        raise ConfigError("data=samples needs data.sample_key: the obs column that will name each spot's sample")
    if names is not None:
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or len(names) != len(paths):
            raise ConfigError(f"data.names must be a list of {len(paths)} sample names (one per data.paths entry) "
                              f"or null, got {names!r}")
        shown = [str(n) for n in names]
        where = "data.names"
    else:  # the default names: the inputs' file or folder names
        shown = [sample_name(Path(str(p)).expanduser()) for p in paths]
        where = "data.paths (names from the file names; set data.names)"
    for n in shown:
        if not n.strip() or "/" in n:
            raise ConfigError(f"{where}: sample name {n!r} must be non-empty and without '/' (an h5ad key)")
    seen: dict[str, int] = {}
    for i, n in enumerate(shown):
        if n in seen:
            raise ConfigError(f"{where}: duplicate sample name {n!r} (data.paths[{seen[n]}] "
                              f"{redact(str(paths[seen[n]]))} and data.paths[{i}] {redact(str(paths[i]))})")
        seen[n] = i


def _read_samples(cfg, path):
    from .data import read_samples

    return read_samples(cfg)


def _peek_samples(cfg):
    """Spots summed and genes bounded by the smallest input (the genes are intersected), or None."""
    try:
        inputs = sample_inputs(cfg)
    except (InputError, ConfigError):
        return None
    shapes = [peek_shape(sub) for _, sub, _ in inputs]
    if any(s is None for s in shapes):
        return None
    nnz = None if any(s[2] is None for s in shapes) else sum(s[2] for s in shapes)
    return sum(s[0] for s in shapes), min(s[1] for s in shapes), nnz


register(Source("synthetic", "generated spatial counts with planted programs, ground truth inside (the default)",
                _read_synthetic, path=None, check=_check_synthetic, peek=_peek_synthetic))
register(Source("h5ad", "an AnnData file (`anndata.read_h5ad`)", _read_store("read_h5ad"), lazy=True,
                peek=_peek_store))
register(Source("zarr", "an AnnData zarr store, e.g. from `python -m tardis_exp.convert in.h5ad out.zarr`",
                _read_store("read_zarr"), path="folder", lazy=True, peek=_peek_store))
register(Source("tenx_h5", "a 10x `filtered_feature_bc_matrix.h5` (`scanpy.read_10x_h5`; with "
                "`data.backend=dask`, row chunks read from the file)", _read_tenx_h5, lazy=True, peek=_peek_tenx_h5))
register(Source("tenx_mtx", "a 10x matrix folder: `matrix.mtx(.gz)`, `features.tsv(.gz)`, `barcodes.tsv(.gz)` "
                "(`scanpy.read_10x_mtx`)", _read_tenx_mtx, path="folder", check=_check_tenx_mtx))
register(Source("visium", "a Space Ranger output folder: counts and `spatial/` (coordinates in "
                "`obsm['spatial']`; images optional)", _read_visium, path="folder"))
register(Source("pbmc68k", "scanpy's bundled pbmc68k_reduced (700 cells, counts from its non-negative `.raw`)",
                _read_pbmc68k, path=None))
register(Source("samples", "several inputs as one study, one sample each (`data.paths`, `data.names`): "
                "each read by its suffix or folder (h5ad, 10x h5 or matrix folder, Space Ranger folder, zarr), "
                "concatenated with `anndata.concat` (genes intersected, sample in `obs[data.sample_key]`)",
                _read_samples, path="list", check=_check_samples, peek=_peek_samples))
register(Source("dataset", "a benchmark set with a published answer (`data.dataset`: Brunet's leukemia and "
                "medulloblastoma, shipped; Monti's simulations)", _read_dataset, path=None, check=_check_dataset))
