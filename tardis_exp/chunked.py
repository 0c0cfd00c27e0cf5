"""Out-of-core factorization: the batched solver's two fat products over row chunks on Dask.

Each iteration of :func:`tardis_exp.nmf.fit_batch` needs ``X @ H_all.T`` (rows of ``X``
independent) and ``X.T @ W_all`` (a sum over row blocks) and nothing else of ``X``. A
:class:`ChunkedMatrix` wraps a row-chunked Dask array (dense NumPy chunks or SciPy CSR
chunks, e.g. from :func:`anndata.experimental.read_elem_lazy` over a zarr or h5ad store)
and makes both products as one pass over the chunks on whatever Dask scheduler is active
(the local threads by default, a ``dask.distributed`` cluster when a client is set). Only
one chunk of ``X`` per worker thread is in memory at a time; ``W_all`` (spots x K, float32)
and ``H_all`` stay with the solver, and what travels per chunk is its rows of ``W_all`` and
the small ``H_all`` (genes x K).

``fit_batch`` accepts a :class:`ChunkedMatrix` (or any Dask array, wrapped by
:func:`tardis_exp.nmf.prepare_matrix`) in place of ``X`` and runs unchanged: the statistics
it reads once (per-row squared norms, the mean, the number of stored entries) come from one
pass made when the matrix is wrapped, and a row subset (``X[rows]``, e.g. the consensus
stage's bounded spot subsample) is read into memory as an ordinary CSR or dense matrix.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp

from .errors import ConfigError, InputError

__all__ = ["ChunkedMatrix", "is_dask", "dask_scheduler", "estimate_factorize_gb", "check_memory"]


def is_dask(X) -> bool:
    """True for a Dask array (checked without importing Dask when it is not loaded)."""
    import sys

    if "dask.array" not in sys.modules:
        return False
    import dask.array as da

    return isinstance(X, da.Array)


def _block(b):
    """One chunk as float32 CSR (sparse chunks) or C-contiguous float32 (dense chunks)."""
    if sp.issparse(b):
        b = sp.csr_matrix(b, dtype=np.float32)
        b.sum_duplicates()
        return b
    return np.ascontiguousarray(b, dtype=np.float32)


def _stats(b):
    """Per-row squared norms and sums (float64), stored entries, min, finiteness of one chunk."""
    b = _block(b)
    if sp.issparse(b):
        v = b.data
        rows = np.repeat(np.arange(b.shape[0]), np.diff(b.indptr))
        v64 = v.astype(np.float64)
        row_sq = np.bincount(rows, weights=v64 * v64, minlength=b.shape[0])  # float64 sums, no float32 copy
        row_sum = np.bincount(rows, weights=v64, minlength=b.shape[0])
        nnz = b.nnz
    else:
        v = b.ravel()
        row_sq = np.einsum("ij,ij->i", b, b, dtype=np.float64)  # as the in-memory dense path
        row_sum = b.sum(1, dtype=np.float64)
        nnz = b.size
    vmin = float(v.min()) if v.size else 0.0
    return row_sq, row_sum, int(nnz), vmin, bool(np.isfinite(v).all()), sp.issparse(b)


def _xht(b, Ht):
    return np.asarray(_block(b) @ Ht, dtype=np.float32)


def _xtw(b, W):
    b = _block(b)
    return np.asarray(b.T @ W, dtype=np.float32)


def _col_sums(b):
    b = _block(b)
    return np.asarray(b.sum(0, dtype=np.float64)).ravel()


def _matmul64(b, M):
    b = _block(b)
    return np.asarray((b.astype(np.float64) if sp.issparse(b) else b.astype(np.float64)) @ M)


def _take_rows(b, rows):
    return _block(b)[rows]


class ChunkedMatrix:
    """A row-chunked, non-negative (spots x genes) matrix on Dask, for :func:`fit_batch`.

    Parameters
    ----------
    X
        A 2-D Dask array; its chunks are NumPy arrays or SciPy sparse matrices. Chunks
        along the genes are merged (the products need whole rows).
    chunk_rows
        Rechunk to this many rows per chunk (``None``: keep the array's chunks).

    Attributes
    ----------
    shape, nnz
        Shape and stored entries (``n * m`` for dense chunks).
    sparse
        Whether the chunks are sparse.
    row_sq_
        Squared norm of every row (float64), from the pass made on construction.
    """

    is_chunked = True

    def __init__(self, X, chunk_rows: int | None = None):
        import dask
        import dask.array as da

        if not isinstance(X, da.Array):
            raise TypeError(f"ChunkedMatrix needs a dask array, got {type(X).__name__}")
        if X.ndim != 2:
            raise InputError(f"the chunked matrix must be 2-D (spots x genes), got shape {X.shape}")
        if any(math.isnan(s) for s in X.shape):
            raise InputError("the chunked matrix has unknown chunk sizes; call compute_chunk_sizes() first")
        if len(X.chunks[1]) > 1 or chunk_rows is not None:
            X = X.rechunk({0: chunk_rows or X.chunks[0], 1: -1})
        self.X = X
        self.shape = tuple(int(s) for s in X.shape)
        self.bounds = np.concatenate([[0], np.cumsum(X.chunks[0])]).astype(np.int64)
        self._blocks = list(X.to_delayed().ravel())
        parts = dask.compute(*[dask.delayed(_stats)(b) for b in self._blocks])
        self.row_sq_ = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0)
        self._row_sum = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0)
        self.nnz = int(sum(p[2] for p in parts))
        self.min_ = min((p[3] for p in parts), default=0.0)
        self.finite_ = all(p[4] for p in parts)
        self.sparse = any(p[5] for p in parts)

    @property
    def n_chunks(self) -> int:
        return len(self._blocks)

    def mean(self, mask=None) -> float:
        """Mean of all entries, or of the rows in the boolean ``mask``."""
        n, m = self.shape
        if mask is None:
            return float(self._row_sum.sum() / max(n * m, 1))
        mask = np.asarray(mask, dtype=bool)
        return float(self._row_sum[mask].sum() / max(int(mask.sum()) * m, 1))

    def row_sq(self) -> np.ndarray:
        return self.row_sq_

    def col_sums(self) -> np.ndarray:
        """Per-gene sums (float64), one pass over the chunks."""
        import dask

        parts = dask.compute(*[dask.delayed(_col_sums)(b) for b in self._blocks])
        return np.sum(parts, axis=0) if parts else np.zeros(self.shape[1])

    def matmul64(self, M) -> np.ndarray:
        """``X @ M`` in float64 (each chunk converted to float64), one pass over the chunks."""
        import dask

        M = np.asarray(M, dtype=np.float64)
        Md = dask.delayed(M, pure=False)
        out = np.empty((self.shape[0], M.shape[1]))
        for a in range(0, self.n_chunks, 8):
            parts = dask.compute(*[dask.delayed(_matmul64)(self._blocks[c], Md)
                                   for c in range(a, min(a + 8, self.n_chunks))])
            for c, p in zip(range(a, a + len(parts)), parts):
                out[self.bounds[c]:self.bounds[c + 1]] = p
        return out

    def products(self) -> "DaskProducts":
        return DaskProducts(self)

    def __getitem__(self, rows):
        """Rows ``rows`` (integer indices or a boolean mask over spots) read into memory."""
        import dask

        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        which = np.searchsorted(self.bounds, srt, side="right") - 1
        tasks, used = [], []
        for c in np.unique(which):
            sel = srt[which == c] - self.bounds[c]
            tasks.append(dask.delayed(_take_rows)(self._blocks[c], sel))
            used.append(c)
        parts = dask.compute(*tasks)
        if not parts:
            out = sp.csr_matrix((0, self.shape[1]), dtype=np.float32) if self.sparse \
                else np.zeros((0, self.shape[1]), np.float32)
        elif sp.issparse(parts[0]):
            out = sp.vstack(parts, format="csr")
        else:
            out = np.concatenate(parts)
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        return out[inv]

    def __repr__(self):
        kind = "CSR" if self.sparse else "dense"
        return f"ChunkedMatrix({self.shape[0]} x {self.shape[1]}, {self.n_chunks} {kind} row chunks)"


class DaskProducts:
    """``X @ H.T`` and ``X.T @ W`` of a :class:`ChunkedMatrix`, one pass over its chunks each.

    Chunks are computed in waves of a few per worker thread so that at most a wave of
    partial results is held at once besides the output.
    """

    def __init__(self, C: ChunkedMatrix, wave: int | None = None):
        self.C = C
        self.wave = wave or max(4, 2 * _n_workers())

    def _waves(self):
        idx = range(self.C.n_chunks)
        for a in range(0, len(idx), self.wave):
            yield idx[a:a + self.wave]

    def xht(self, H):
        """X @ H.T, shape (n, K)."""
        import dask

        H = np.asarray(H, dtype=np.float32)
        Ht = dask.delayed(np.ascontiguousarray(H.T), pure=False)  # one node, shared by every chunk's task
        out = np.empty((self.C.shape[0], H.shape[0]), dtype=np.float32)
        b = self.C.bounds
        for wave in self._waves():
            parts = dask.compute(*[dask.delayed(_xht, pure=False)(self.C._blocks[c], Ht) for c in wave])
            for c, p in zip(wave, parts):
                out[b[c]:b[c + 1]] = p
        return out

    def xtw(self, W):
        """X.T @ W, shape (m, K): the chunks' partial products summed (float32, as sgemm does)."""
        import dask

        W = np.asarray(W, dtype=np.float32)
        out = np.zeros((self.C.shape[1], W.shape[1]), dtype=np.float32)
        b = self.C.bounds
        for wave in self._waves():
            parts = dask.compute(*[dask.delayed(_xtw, pure=False)(self.C._blocks[c], W[b[c]:b[c + 1]])
                                   for c in wave])
            for p in parts:
                out += p
        return out


def _n_workers() -> int:
    """Threads of the active Dask scheduler (a distributed client's, else the local pool's)."""
    try:
        from distributed import get_client

        client = get_client()
        return max(1, sum(client.nthreads().values()))
    except (ImportError, ValueError):
        import os

        return os.cpu_count() or 1


@contextmanager
def dask_scheduler(scheduler: str | None = None):
    """Run the block with ``scheduler`` active.

    ``None``
        whatever is active (a ``distributed.Client`` already made, else Dask's default:
        the local thread pool).
    ``'threads'``, ``'processes'``, ``'synchronous'``
        Dask's local schedulers.
    ``'tcp://host:port'`` (or ``tls://``, ``inproc://``)
        connect a ``distributed.Client`` to that scheduler for the block; e.g. one started by
        dask-jobqueue on SLURM.
    """
    if scheduler in (None, "", "null"):  # nothing to set: no Dask needed (a plain install has none)
        yield
        return
    try:
        import dask
    except ImportError:
        raise ConfigError(f"factorize.dask.scheduler={scheduler} needs Dask; pip install 'dask[array]' distributed") \
            from None
    s = str(scheduler)
    check_dask_config({"scheduler": s})
    if "://" in s:
        try:
            from distributed import get_client

            if get_client().scheduler.address == s:  # already connected (the pipeline's run)
                yield
                return
        except (ImportError, ValueError):
            pass
        try:
            from distributed import Client
        except ImportError:
            raise ConfigError("factorize.dask.scheduler is an address but dask.distributed is not installed; "
                              "pip install 'dask[array]' distributed") from None
        try:
            client = Client(s, timeout="20s", set_as_default=False)
        except OSError as e:
            raise ConfigError(f"factorize.dask.scheduler={s}: cannot connect to a Dask scheduler there: {e}") \
                from None
        try:
            with client.as_current(), dask.config.set(scheduler=client):
                yield
        finally:
            client.close()
        return
    with dask.config.set(scheduler=s):
        yield


SCHEDULERS = ("threads", "processes", "synchronous", "sync", "single-threaded")


def check_dask_config(cfg, key="factorize.dask") -> None:
    """Validate ``factorize.dask`` (``None`` or ``{'scheduler': None | name | address}``)."""
    if cfg is None:
        return
    if not hasattr(cfg, "get") or not hasattr(cfg, "keys"):
        raise ConfigError(f"{key} must be a mapping like {{scheduler: tcp://host:8786}}, got {cfg!r}")
    unknown = sorted(set(cfg) - {"scheduler"})
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{key}.{k}' for k in unknown)}; {key} accepts scheduler")
    s = cfg.get("scheduler")
    if s is None or s == "":
        return
    if not isinstance(s, str) or ("://" not in s and s not in SCHEDULERS):
        raise ConfigError(f"{key}.scheduler={s!r}: use null, threads, processes, synchronous "
                          "or a distributed scheduler's address (tcp://host:port)")


def estimate_factorize_gb(n_spots: int, n_genes: int, n_columns: int, solver: str, chunked: bool,
                          nnz: int | None = None) -> float:
    """Resident memory (GB) a factorization needs: a model, not a measurement.

    ``n_columns`` is the total rank of the batch (rank x replicates). The solver keeps
    ``W_all`` (spots x K) and one spots x K product; multiplicative updates make one more
    spots x K temporary (the denominator, which then takes the ratio in place), HALS none.
    After the fit, the replicates' ``W`` and ``obsm['X_nmf_replicates']`` are two copies,
    no more than the fit held. In memory, ``X`` itself
    (CSR: 8 bytes per stored entry, dense: 4 per entry) adds to that; chunked, only a few
    chunks are resident and are not counted here.
    """
    per = 4 * n_spots * n_columns
    from .solvers import SOLVERS

    model = per * SOLVERS[solver].spots_copies + 4 * n_genes * n_columns * 4
    if not chunked:
        model += 8 * nnz if nnz is not None else 4 * n_spots * n_genes
    return model / 1e9


def check_memory(max_memory_gb, *, n_spots, n_genes, n_columns, solver, chunked, nnz=None,
                 key="factorize.max_memory_gb", where=None) -> float:
    """Refuse, before any fit, a factorization whose memory model exceeds ``max_memory_gb``.

    ``where``: what the shape was read from, named in the message (e.g. the input file, for
    the check made before loading)."""
    need = estimate_factorize_gb(n_spots, n_genes, n_columns, solver, chunked, nnz)
    if max_memory_gb is not None and need > float(max_memory_gb):
        hint = "" if chunked else "; data.backend=dask keeps X out of memory"
        from .solvers import SOLVERS

        leaner = [s.name for s in SOLVERS.values() if s.batched and s.spots_copies < SOLVERS[solver].spots_copies]
        hint += f"; factorize.solver={leaner[0]} needs less memory than {solver}" if leaner else ""
        src = f" (from {where})" if where else ""
        raise ConfigError(
            f"{key}={max_memory_gb:g}: factorizing {n_spots} spots x {n_genes} genes{src} with {n_columns} factor "
            f"columns ({solver}{', chunked' if chunked else ', in memory'}) needs about {need:.3g} GB; "
            f"raise {key}, lower factorize.n_replicates or factorize.n_components{hint}"
        )
    return need
