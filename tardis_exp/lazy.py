"""Lazy input and chunked preprocessing for data that does not fit in memory (``data.backend=dask``).

``read_lazy``
    An h5ad or zarr AnnData store with ``X`` as a row-chunked Dask array (CSR or dense
    chunks, read by anndata's :func:`~anndata.experimental.read_elem_lazy`); ``obs``,
    ``var``, ``obsm`` and ``uns`` are read into memory (one row per spot: small next to X).
``convert``
    h5ad -> zarr, ``X`` copied one row block at a time (``python -m tardis_exp.convert``).
``write_zarr_chunks``
    Write an AnnData zarr store whose CSR ``X`` arrives as a stream of row blocks.
``preprocess_chunked``
    QC, ``normalize_total``, ``log1p`` and HVG selection as passes over the chunks: per-gene
    and per-spot sums are accumulated chunk by chunk; the normalized matrix stays a lazy
    Dask graph (recomputed per chunk when read) or is written to a zarr store.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ConfigError, InputError

DEFAULT_CHUNK_ROWS = 20_000


def _need_dask():
    try:
        import dask.array  # noqa: F401
    except ImportError:
        raise ConfigError("data.backend=dask needs dask: pip install 'dask[array]' distributed") from None


def _open_store(path: Path):
    """The root group of an h5ad (h5py) or zarr store, opened read-only."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".zarr":
        import zarr

        try:
            return zarr.open_group(str(path), mode="r")
        except Exception as e:
            raise InputError(f"data.path: {path} is not a zarr AnnData store: {type(e).__name__}: {e}") from e
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"data.path: cannot open {path} as h5ad: {e}") from e


def read_lazy(path, chunk_rows: int | None = DEFAULT_CHUNK_ROWS) -> ad.AnnData:
    """Read an h5ad or zarr AnnData with ``X`` left on disk as a row-chunked Dask array.

    Parameters
    ----------
    path
        ``.h5ad`` file or ``.zarr`` folder.
    chunk_rows
        Spots per chunk (whole rows: the products need every gene of a spot).
    """
    _need_dask()
    from anndata.experimental import read_elem_lazy
    from anndata.io import read_elem

    root = _open_store(path)
    if "X" not in root:
        raise InputError(f"data.path: {path} has no X")
    shape = _shape(root["X"])
    chunks = (min(int(chunk_rows or shape[0]), shape[0]), shape[1])
    X = read_elem_lazy(root["X"], chunks=chunks)
    parts = {k: read_elem(root[k]) for k in ("obs", "var", "obsm", "uns") if k in root}
    obsm = {k: v for k, v in parts.get("obsm", {}).items()}
    return ad.AnnData(X=X, obs=parts.get("obs"), var=parts.get("var"), obsm=obsm, uns=parts.get("uns", {}))


def _shape(elem) -> tuple[int, int]:
    attrs = dict(elem.attrs)
    if "shape" in attrs:
        return tuple(int(s) for s in attrs["shape"])
    return tuple(int(s) for s in elem.shape)


def write_zarr_chunks(path, blocks: Iterable, obs: pd.DataFrame, var: pd.DataFrame, obsm=None, uns=None) -> None:
    """Write an AnnData zarr store whose ``X`` (CSR) arrives as row blocks, never whole in memory.

    The first block is written as a CSR element and the rest appended with
    :func:`anndata.experimental.sparse_dataset` (the store grows along the rows). ``obs``,
    ``var``, ``obsm`` and ``uns`` may be callables, called after the last block.
    """
    import zarr
    from anndata.experimental import sparse_dataset
    from anndata.io import write_elem

    path = Path(path)
    g = zarr.open_group(str(path), mode="w")
    it = iter(blocks)
    first = sp.csr_matrix(next(it), dtype=np.float32)
    write_elem(g, "X", first)
    X = sparse_dataset(g["X"])
    n = first.shape[0]
    for b in it:
        b = sp.csr_matrix(b, dtype=np.float32)
        X.append(b)
        n += b.shape[0]
    # obs, var, obsm, uns may be callables, made once the blocks are written (a generator
    # that learns them as it goes)
    obs, var, obsm, uns = (v() if callable(v) else v for v in (obs, var, obsm, uns))
    if n != len(obs):
        raise ValueError(f"blocks gave {n} rows but obs has {len(obs)}")
    write_elem(g, "obs", obs)
    write_elem(g, "var", var)
    write_elem(g, "obsm", dict(obsm or {}))
    write_elem(g, "uns", dict(uns or {}))
    for k in ("layers", "varm", "obsp", "varp"):
        write_elem(g, k, {})
    g.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})


def convert(src, dst, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Path:
    """h5ad -> zarr (the recommended on-disk format for ``data.backend=dask``), X block by block.

    ``obs``, ``var``, ``obsm`` and ``uns`` are copied; layers are not (give the counts in X).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputError(f"{src} does not exist or is not a file")
    if dst.exists():
        raise InputError(f"{dst} exists; remove it or choose another output path")
    a = read_lazy(src, chunk_rows=chunk_rows)
    X = a.X

    def blocks():
        for b in X.to_delayed().ravel():
            blk = b.compute()
            yield blk if sp.issparse(blk) else sp.csr_matrix(blk)

    tmp = dst.with_name(dst.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    write_zarr_chunks(tmp, blocks(), a.obs, a.var, dict(a.obsm), dict(a.uns))
    tmp.rename(dst)
    return dst


_MAX_NONFINITE_PER_CHUNK = 10_000


def _chunk_summary(b):
    v = b.data if sp.issparse(b) else np.asarray(b).ravel()
    fin = np.isfinite(v) if v.dtype.kind == "f" else np.ones(v.shape, bool)
    out = [v[fin].min(), v[fin].max()] if fin.any() else []
    # a zero not stored in a CSR chunk still counts (min over the matrix)
    if sp.issparse(b) and b.nnz < b.shape[0] * b.shape[1]:
        out.append(0)
    bad = v[~fin][:_MAX_NONFINITE_PER_CHUNK]
    return np.concatenate([np.asarray(out, dtype=v.dtype), bad]) if len(out) or bad.size \
        else np.zeros(0, v.dtype)


def value_summary(X) -> np.ndarray:
    """Every chunk's min and max (finite values) and its non-finite values (up to 10,000 a chunk),
    in X's dtype: min, max, finiteness and dtype of this small array are those of X.
    One pass over the chunks."""
    import dask

    parts = dask.compute(*[dask.delayed(_chunk_summary)(b) for b in X.to_delayed().ravel()])
    return np.concatenate(parts) if parts else np.zeros(0, X.dtype)


def _workers_here(client) -> bool:
    """Whether every worker of ``client`` runs on this machine (same host name)."""
    import socket

    hosts = client.run(socket.gethostname)
    return bool(hosts) and set(hosts.values()) == {socket.gethostname()}


class _Spill:
    """A scratch folder of one matrix's chunks as raw ``.npy`` files, removed when the last
    Dask graph reading it is garbage-collected (or at exit)."""

    def __init__(self, dir=None):
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="tardis-exp-chunks-", dir=dir)
        self.path = self._tmp.name

    def __reduce__(self):  # a process-pool worker gets the path, not the folder's ownership
        return (_SpillPath, (self.path,))


class _SpillPath:
    def __init__(self, path):
        self.path = path


def _save_chunk(b, spill, i):
    import os

    from .chunked import _block

    b = _block(b)
    base = os.path.join(spill.path, f"{i:06d}")
    if sp.issparse(b):
        for name in ("data", "indices", "indptr"):
            np.save(f"{base}.{name}.npy", getattr(b, name))
    else:
        np.save(f"{base}.npy", b)
    return b.shape[0]


def _load_chunk(spill, i, shape, sparse):
    import os

    base = os.path.join(spill.path, f"{i:06d}")
    if sparse:
        parts = [np.load(f"{base}.{name}.npy") for name in ("data", "indices", "indptr")]
        return sp.csr_matrix(tuple(parts), shape=shape)
    return np.load(f"{base}.npy")


def spill(X, dir=None):
    """Compute a lazy (e.g. preprocessed) Dask matrix once and return one that reads its chunks back.

    The factorization makes two passes over ``X`` per iteration; without this every pass
    would redo the reading, normalization and gene selection of each chunk. Each chunk is
    written once, uncompressed, to a scratch folder under ``dir`` (default: the system's
    temporary folder, ``TMPDIR``), removed when the returned array is no longer referenced.
    With a ``dask.distributed`` client whose workers run on other machines the chunks are
    persisted in the workers' memory instead (the cluster's memory is what it is for; a
    scratch folder here is not theirs); workers on this machine (a ``LocalCluster``) share
    its memory with the run, so they use the scratch folder too.
    """
    import dask
    import dask.array as da

    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        client = None
    if client is not None and not _workers_here(client):
        X = X.persist()
        from distributed import wait

        wait(X)
        return X
    sparse = sp.issparse(X._meta)
    store = _Spill(dir)
    blocks = X.to_delayed().ravel()
    wave = 8
    for a in range(0, len(blocks), wave):
        dask.compute(*[dask.delayed(_save_chunk)(blocks[i], store, i) for i in range(a, min(a + wave, len(blocks)))])
    meta = sp.csr_matrix((0, 0), dtype=np.float32) if sparse else np.empty((0, 0), np.float32)
    m = X.shape[1]
    parts = [da.from_delayed(dask.delayed(_load_chunk, pure=True)(store, i, (r, m), sparse), shape=(r, m),
                             dtype=np.float32, meta=meta) for i, r in enumerate(X.chunks[0])]
    return da.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
