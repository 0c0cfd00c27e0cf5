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

    def matmul64(self, M, columns: bool = False):
        """``X @ M`` in float64 (each chunk converted to float64), one pass over the chunks;
        with ``columns``, as a list of its columns (separate arrays a caller can free one by one)."""
        import dask

        M = np.asarray(M, dtype=np.float64)
        Md = dask.delayed(M, pure=False)
        out = [np.empty(self.shape[0]) for _ in range(M.shape[1])] if columns \
            else np.empty((self.shape[0], M.shape[1]))
        for a in range(0, self.n_chunks, 8):
            parts = dask.compute(*[dask.delayed(_matmul64)(self._blocks[c], Md)
                                   for c in range(a, min(a + 8, self.n_chunks))])
            for c, p in zip(range(a, a + len(parts)), parts):
                lo, hi = self.bounds[c], self.bounds[c + 1]
                if columns:
                    for j, col in enumerate(out):
                        col[lo:hi] = p[:, j]
                else:
                    out[lo:hi] = p
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
    """Validate ``factorize.dask`` (``None`` or ``{'scheduler': None | name | address,
    'release_memory': bool}``)."""
    if cfg is None:
        return
    if not hasattr(cfg, "get") or not hasattr(cfg, "keys"):
        raise ConfigError(f"{key} must be a mapping like {{scheduler: tcp://host:8786}}, got {cfg!r}")
    unknown = sorted(set(cfg) - {"scheduler", "release_memory"})
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{key}.{k}' for k in unknown)}; {key} accepts scheduler "
                          "and release_memory")
    if not isinstance(cfg.get("release_memory", True), bool):
        raise ConfigError(f"{key}.release_memory must be true or false, got {cfg.get('release_memory')!r}")
    s = cfg.get("scheduler")
    if s is None or s == "":
        return
    if not isinstance(s, str) or ("://" not in s and s not in SCHEDULERS):
        raise ConfigError(f"{key}.scheduler={s!r}: use null, threads, processes, synchronous "
                          "or a distributed scheduler's address (tcp://host:port)")


def estimate_factorize_gb(n_spots: int, n_genes: int, n_columns: int, solver: str, chunked: bool,
                          nnz: int | None = None, n_processes: int = 1) -> float:
    """Resident memory (GB) a factorization needs in its largest process: a model, not a measurement.

    ``n_columns`` is the total rank of the batch (rank x replicates). The solver keeps
    ``W_all`` (spots x K) and one spots x K product; multiplicative updates make one more
    spots x K temporary (the denominator, which then takes the ratio in place), HALS none.
    After the fit, the replicates' ``W`` and ``obsm['X_nmf_replicates']`` are two copies,
    no more than the fit held. In memory, ``X`` itself
    (CSR: 8 bytes per stored entry, dense: 4 per entry) adds to that; chunked, only a few
    chunks are resident and are not counted here.

    Chunked on a ``dask.distributed`` cluster of ``n_processes`` workers, the spots x K
    state is split among the workers (each keeps its chunks' rows of ``W``) and the driver
    keeps the genes x K state only: the figure is one worker's share (spots / workers,
    rounded up) plus the genes x K state, which every process holds.
    """
    if chunked and n_processes > 1:
        n_spots = -(-int(n_spots) // int(n_processes))
    per = 4 * n_spots * n_columns
    from .solvers import SOLVERS

    model = per * SOLVERS[solver].spots_copies + 4 * n_genes * n_columns * 4
    if not chunked:
        model += 8 * nnz if nnz is not None else 4 * n_spots * n_genes
    return model / 1e9


def n_workers() -> int:
    """Worker processes of the connected ``dask.distributed`` cluster; 1 without one (Dask's
    local schedulers run in this process)."""
    client = _client()
    if client is None:
        return 1
    return max(1, len(client.scheduler_info().get("workers", {})))


def check_memory(max_memory_gb, *, n_spots, n_genes, n_columns, solver, chunked, nnz=None,
                 key="factorize.max_memory_gb", where=None) -> float:
    """Refuse, before any fit, a factorization whose memory model exceeds ``max_memory_gb``.

    ``where``: what the shape was read from, named in the message (e.g. the input file, for
    the check made before loading). Chunked on a connected ``dask.distributed`` cluster the
    limit applies per process: to one worker's share (:func:`estimate_factorize_gb`)."""
    workers = n_workers() if chunked else 1
    need = estimate_factorize_gb(n_spots, n_genes, n_columns, solver, chunked, nnz, workers)
    if max_memory_gb is not None and need > float(max_memory_gb):
        hint = "" if chunked else "; data.backend=dask keeps X out of memory"
        from .solvers import SOLVERS

        leaner = [s.name for s in SOLVERS.values() if s.batched and s.spots_copies < SOLVERS[solver].spots_copies]
        hint += f"; factorize.solver={leaner[0]} needs less memory than {solver}" if leaner else ""
        src = f" (from {where})" if where else ""
        raise ConfigError(
            f"{key}={max_memory_gb:g}: factorizing {n_spots} spots x {n_genes} genes{src} with {n_columns} factor "
            f"columns ({solver}{', chunked' if chunked else ', in memory'}) needs about {need:.3g} GB"
            f"{f' per process ({workers} workers)' if workers > 1 else ''}; "
            f"raise {key}, lower factorize.n_replicates or factorize.n_components{hint}"
        )
    return need


# ---------------------------------------------------------------------------------------
# Distributed factor updates: W's rows stay with X's row chunks (on the workers of a
# dask.distributed cluster, in this process on threads); the driver holds the K x genes
# state (H, X.T @ W, W.T W) and each iteration submits one task per chunk plus one sum.
# ---------------------------------------------------------------------------------------


def _client():
    """The active ``dask.distributed`` client, or ``None`` (Dask's local schedulers)."""
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _products(b):
    """The chunk's two products through the in-memory kernels (parallel CSR kernel, or
    sgemm on densified row blocks: scipy's sparse @ dense is single-threaded); never a
    dense copy of a whole CSR chunk."""
    from . import _kernels as K

    if not sp.issparse(b):
        return None
    dense = b.nnz / max(b.shape[0] * b.shape[1], 1) >= K.DENSE_COPY_MIN_DENSITY
    return K.SparseProducts(b, "dense-chunks" if dense else "auto")


def _bxht(b, Ht):
    P = _products(b)
    return P.xht(Ht.T) if P is not None else b @ Ht


def _bxtw(b, W):
    P = _products(b)
    return P.xtw(W) if P is not None else b.T @ W


def _sums(b, W):
    """This chunk's share of the driver's K x genes state: ``X_c.T @ W_c`` (m x K) and ``W_c.T W_c``
    (the Gram without BLAS: see :func:`tardis_exp._kernels.gram`)."""
    from ._kernels import gram

    return np.asarray(_bxtw(b, W), dtype=np.float32), gram(W)


def _blk_sums(xb, W):
    return _sums(_block(xb), W)


def _blk_mu(xb, W, Ht, G, starts, ranks, sums):
    """One multiplicative update of a chunk's rows of W (in a copy: the input may be a kept
    result), then, when asked, its K x genes sums from the same read of the chunk."""
    from ._kernels import mu_update
    from .nmf import EPS

    b = _block(xb)
    W = W.copy()
    mu_update(W, _bxht(b, Ht), G, starts, ranks, EPS)
    return (W, *_sums(b, W)) if sums else (W, None, None)


def _blk_hals(xb, W, Ht, G, starts, ranks, mask, sums):
    """A chunk's first HALS sweep of W; with ``sums`` (a single sweep is all there can be)
    its K x genes sums too, else the product ``X_c @ H.T`` kept for the next sweeps."""
    from ._kernels import hals_sweep

    b = _block(xb)
    W, A = W.copy(), _bxht(b, Ht)
    eps = hals_sweep(W, A, G, starts, ranks, np.ones(len(starts), bool), mask)
    if sums:
        return (W, eps, *_sums(b, W))
    return W, eps, A


def _blk_sweep(W, A, G, starts, ranks, active, mask):
    from ._kernels import hals_sweep

    W = W.copy()
    return W, hals_sweep(W, A, G, starts, ranks, active, mask)


def _sum(*parts):
    """Float32 sum of the chunks' partial results, in chunk order (as sgemm over X would add)."""
    out = np.array(parts[0], dtype=parts[0].dtype, copy=True)
    for p in parts[1:]:
        out += p
    return out


def _hstack(*blocks):
    return np.ascontiguousarray(np.hstack(blocks), dtype=np.float32)


def _cols(W, a, b):
    return np.ascontiguousarray(W[:, a:b])


def _slice_rows(W, a, b):
    return np.ascontiguousarray(W[a:b], dtype=np.float32)


class _Held:
    """A future passed to a task as a plain value (a bare future would be a dependency that
    only the cluster's scheduler can resolve). Not sent anywhere: the task runs here."""

    def __init__(self, future):
        self.future = future

    def __reduce__(self):
        raise TypeError("BlockW.to_dask() arrays are computed by the driver: use .compute(scheduler='threads')")


def _fetch(held):
    return np.asarray(held.future.result(), dtype=np.float32)


class BlockW:
    """A spots x k factor kept as row blocks aligned with a :class:`ChunkedMatrix`'s chunks.

    ``refs[c]`` is chunk ``c``'s rows: a ``distributed.Future`` on a cluster (the block
    stays on the worker that made it), a NumPy array on Dask's local schedulers. The
    driver never holds more than one block of it (``gather`` aside).
    """

    def __init__(self, refs, bounds, k):
        self.refs = list(refs)
        self.bounds = bounds
        self.shape = (int(bounds[-1]), int(k))
        self.dtype = np.dtype(np.float32)

    @classmethod
    def from_blocks(cls, blocks, bounds, k):
        """Blocks made here one at a time (e.g. a random start), each sent off as it is made."""
        client = _client()
        refs = [client.scatter(b, hash=False) if client is not None else b for b in blocks]
        return cls(refs, bounds, k)

    @classmethod
    def from_array(cls, W, bounds):
        """Rows of ``W`` (NumPy, or a Dask array: its blocks computed where they are used)."""
        if is_dask(W):
            W = W.rechunk((tuple(np.diff(bounds)), -1))
            import dask

            return cls(_submit([dask.delayed(np.asarray)(d) for d in W.to_delayed().ravel()]), bounds, W.shape[1])
        W = np.asarray(W, dtype=np.float32)
        return cls.from_blocks((W[a:b] for a, b in zip(bounds[:-1], bounds[1:])), bounds, W.shape[1])

    def to_dask(self):
        """A Dask array over the kept blocks (nothing computed or moved), for the driver:
        compute it on Dask's local schedulers (``scheduler='threads'``; anndata's writer
        does), which fetch one block at a time from where it is kept."""
        import dask
        import dask.array as da

        parts = [da.from_array(r, chunks=r.shape) if isinstance(r, np.ndarray) else
                 da.from_delayed(dask.delayed(_fetch, pure=True)(_Held(r)), shape=(int(b - a), self.shape[1]),
                                 dtype=np.float32)
                 for r, a, b in zip(self.refs, self.bounds[:-1], self.bounds[1:])]
        return da.concatenate(parts, axis=0)

    def gather(self) -> np.ndarray:
        """The whole factor in this process (the one copy the caller asked for)."""
        client = _client()
        out = np.empty(self.shape, dtype=np.float32)
        for r, a, b in zip(self.refs, self.bounds[:-1], self.bounds[1:]):
            out[a:b] = r if isinstance(r, np.ndarray) else client.gather(r)
        return out

    def __array__(self, dtype=None, copy=None):
        out = self.gather()
        return out if dtype is None else out.astype(dtype)

    def __repr__(self):
        return f"BlockW({self.shape[0]} x {self.shape[1]}, {len(self.refs)} row blocks)"


class RandomW:
    """The random start ``avg * |N(0, 1)|`` of :func:`tardis_exp.nmf._random_init`, drawn
    one row block at a time from the same generator (the draws are sequential, so the
    blocks are the rows of the in-memory draw)."""

    def __init__(self, rng, rank, avg, mask=None):
        self.rng, self.rank, self.avg, self.mask = rng, int(rank), avg, mask

    def blocks(self, bounds):
        for a, b in zip(bounds[:-1], bounds[1:]):
            W = (self.avg * np.abs(self.rng.standard_normal((int(b - a), self.rank)))).astype(np.float32)
            if self.mask is not None:
                W[~self.mask[a:b]] = 0
            yield W


def random_init_blocks(C: "ChunkedMatrix", rank, seed, mask):
    """``(BlockW, H)``: :func:`tardis_exp.nmf._random_init`'s start, W made block by block."""
    rng = np.random.default_rng(seed)
    avg = np.sqrt(max(C.mean(mask), 0.0) / rank)
    H = (avg * np.abs(rng.standard_normal((rank, C.shape[1])))).astype(np.float32)
    return BlockW.from_blocks(RandomW(rng, rank, avg, mask).blocks(C.bounds), C.bounds, rank), H


class GraphLog:
    """Size of every graph the distributed fit submits: tasks and pickled bytes."""

    def __init__(self):
        self.graphs: list[tuple[str, int, int]] = []

    def record(self, what, collections):
        import pickle

        import cloudpickle
        dsk = {}
        for c in collections:
            dsk.update(c.__dask_graph__())
        tasks = {k: v for k, v in dsk.items() if _is_task(v)}
        try:
            nbytes = len(cloudpickle.dumps(tasks, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception:  # a future that cannot be pickled outside a client: count the tasks only
            nbytes = -1
        self.graphs.append((what, len(tasks), nbytes))


def _is_task(v) -> bool:
    """Whether a graph value is work (a task), not data already there (a kept block, a future)."""
    try:
        from dask._task_spec import DataNode, Task

        if isinstance(v, DataNode):
            return False
        return isinstance(v, Task) or (isinstance(v, tuple) and bool(v) and callable(v[0]))
    except ImportError:  # pragma: no cover - older Dask
        return isinstance(v, tuple) and bool(v) and callable(v[0])


GRAPHS: GraphLog | None = None  # set to a GraphLog to record the graphs (tests, benchmarks)


def _submit(delayeds, small=(), what="iteration"):
    """Run ``delayeds`` (results kept: futures on a cluster, arrays here) and ``small``
    (results brought to the driver) as one graph; return (kept refs, small values)."""
    import dask

    delayeds, small = list(delayeds), list(small)
    if GRAPHS is not None:
        GRAPHS.record(what, delayeds + small)
    client = _client()
    if client is None:
        out = dask.compute(*delayeds, *small)
        return list(out[:len(delayeds)]), list(out[len(delayeds):])
    futs = client.compute(delayeds + small)
    return futs[:len(delayeds)], client.gather(futs[len(delayeds):])


def _shared(a):
    """A small driver-side array every chunk's task reads: broadcast to the workers once
    (not copied into each task), as is on the local schedulers."""
    client = _client()
    return client.scatter(a, broadcast=True, hash=False) if client is not None else a


class DistributedState:
    """The running factorizations of :func:`tardis_exp.nmf.fit_batch` on a :class:`ChunkedMatrix`.

    ``W_all``'s rows live in :class:`BlockW` blocks aligned with the chunks; each
    iteration submits per chunk one task that reads the chunk once, updates its rows of
    ``W`` (MU, or HALS's first sweep) and returns its share of ``X.T @ W`` and ``W.T W``;
    the driver sums those (K x genes), updates ``H`` and broadcasts it. HALS's further
    inner sweeps of ``W`` (when ``1 + alpha * rho`` allows more than one) are one task per
    chunk on the product kept with the block, the stopping test on the summed changes, as
    in memory. Row masks (resampled replicates) are sent once, as per-chunk blocks.
    """

    def __init__(self, C, items, ranks, Ws, Hs, masks, solver, nnz, alpha, delta):
        from .nmf import _Group, _hals_max_inner, _layout

        self.C, self.solver = C, solver
        by_rank: dict[int, list[int]] = {}
        for i in items:
            by_rank.setdefault(ranks[i], []).append(i)
        self.groups, start = [], 0
        for r in sorted(by_rank):
            g = _Group(by_rank[r], r, start)
            self.groups.append(g)
            start = g.stop
        self.order = [i for g in self.groups for i in g.idx]
        self.starts, self.ranks = _layout(self.groups)
        self.kmax = int(self.ranks.max())
        self.K = start
        self.H_all = np.concatenate([Hs[i] for i in self.order]).astype(np.float32)  # K x m, driver
        import dask

        b = C.bounds
        parts = [Ws[i] for i in self.order]
        self.W = BlockW(_submit([dask.delayed(_hstack)(*[p.refs[c] for p in parts]) for c in range(C.n_chunks)],
                                what="stack")[0], b, self.K)
        self.mask = None
        if any(masks[i] is not None for i in self.order):
            self.mask = [np.stack([np.ones(b[c + 1] - b[c], bool) if masks[i] is None else masks[i][b[c]:b[c + 1]]
                                   for i in self.order], axis=1) for c in range(C.n_chunks)]
            client = _client()
            if client is not None:
                self.mask = client.scatter(self.mask, hash=False)
        if solver == "hals":
            self.max_inner_w, self.max_inner_h = _hals_max_inner(self.ranks, nnz, C.shape, alpha)
            self.delta2 = delta**2

    def _grams_of(self, M, transpose_first):
        from .nmf import _padded_grams

        return _padded_grams(self.groups, [self._view(M, g, transpose_first) for g in self.groups], self.kmax,
                             transpose_first)

    @staticmethod
    def _view(M, g, transpose_first):
        if transpose_first:  # M is rows x K
            return M[:, g.cols].reshape(M.shape[0], len(g.idx), g.rank).transpose(1, 0, 2)
        return M[g.cols].reshape(len(g.idx), g.rank, M.shape[1])

    def _gram_blocks(self, WtW):
        """Per-factorization ``W_f.T W_f`` (padded to (F, kmax, kmax)) from the summed K x K ``W.T W``."""
        G = np.zeros((len(self.order), self.kmax, self.kmax), dtype=np.float32)
        for f, (s, k) in enumerate(zip(self.starts, self.ranks)):
            G[f, :k, :k] = WtW[s:s + k, s:s + k]
        return G

    def _chunks(self):
        return self.C._blocks

    def sums(self):
        """``X.T @ W`` and ``W.T W`` of the current ``W``, one pass (the start's error)."""
        import dask

        parts = [dask.delayed(_blk_sums, nout=2)(x, w) for x, w in zip(self._chunks(), self.W.refs)]
        _, (xtw, wtw) = _submit([], [dask.delayed(_sum)(*[p[0] for p in parts]),
                                     dask.delayed(_sum)(*[p[1] for p in parts])], what="sums")
        return xtw, wtw

    def errors(self, XtW, WtW, sqnorms):
        errs = {}
        for f, (i, s, k) in enumerate(zip(self.order, self.starts, self.ranks)):
            H = self.H_all[s:s + k].astype(np.float64)
            cross = float(np.vdot(XtW[:, s:s + k].T.astype(np.float64), H))
            quad = float(np.vdot(WtW[s:s + k, s:s + k].astype(np.float64), H @ H.T))
            errs[i] = np.sqrt(max(sqnorms[i] - 2 * cross + quad, 0.0))
        return errs

    def errors0(self, sqnorms):
        return self.errors(*self.sums(), sqnorms)

    def step(self, P, update_H, want_error, sqnorms):
        import dask

        need = update_H or want_error
        Ht = np.ascontiguousarray(self.H_all.T)
        chunks, refs, n = self._chunks(), self.W.refs, self.C.n_chunks
        consts = dict(starts=self.starts, ranks=self.ranks)
        if self.solver == "mu":
            G = _shared(self._grams_of(self.H_all, False))
            Hs = _shared(Ht)
            parts = [dask.delayed(_blk_mu, nout=3)(x, w, Hs, G, sums=need, **consts) for x, w in zip(chunks, refs)]
            new = [p[0] for p in parts]
            sums = [p[1:] for p in parts]
        else:
            G = _shared(self._grams_of(Ht, True))
            Hs = _shared(Ht)
            masks = self.mask if self.mask is not None else [None] * n
            fused = need and int(self.max_inner_w.max()) <= 1
            nout = 4 if fused else 3
            parts = [dask.delayed(_blk_hals, nout=nout)(x, w, Hs, G, mask=mk, sums=fused, **consts)
                     for x, w, mk in zip(chunks, refs, masks)]
            new = [p[0] for p in parts]
            sums = [p[2:] for p in parts] if fused else None
        if self.solver == "hals" and not fused:
            eps_parts = [p[1] for p in parts]
            kept, (eps0,) = _submit(new + [p[2] for p in parts], [dask.delayed(_sum)(*eps_parts)])
            W, A = kept[:n], kept[n:]
            eps, done = eps0.copy(), np.ones(len(self.order), dtype=np.int64)
            while True:  # Gillis-Glineur inner sweeps, each factorization on its own summed change
                active = (done < self.max_inner_w) & (eps0 > 0) & (eps >= self.delta2 * eps0)
                if not active.any():
                    break
                sw = [dask.delayed(_blk_sweep, nout=2)(w, a, G, active=active, mask=mk, **consts)
                      for w, a, mk in zip(W, A, masks)]
                W, (e,) = _submit([s[0] for s in sw], [dask.delayed(_sum)(*[s[1] for s in sw])], what="sweep")
                eps[active] = e[active]
                done += active
            del A
            self.W = BlockW(W, self.C.bounds, self.K)
            if not need:
                return None
            XtW, WtW = self.sums()
        else:
            small = [dask.delayed(_sum)(*[s[0] for s in sums]), dask.delayed(_sum)(*[s[1] for s in sums])] \
                if need else []
            W, small = _submit(new, small)
            self.W = BlockW(W, self.C.bounds, self.K)
            if not need:
                return None
            XtW, WtW = small
        if update_H:
            if self.solver == "mu":
                for g in self.groups:
                    H3 = self._view(self.H_all, g, False)
                    WtW3 = self._gram_blocks(WtW)[[self.order.index(i) for i in g.idx], :g.rank, :g.rank]
                    WtX = XtW[:, g.cols].T.reshape(len(g.idx), g.rank, -1)
                    from .nmf import EPS

                    den = WtW3 @ H3
                    den[den == 0] = EPS
                    H3 *= WtX / den
            else:
                from ._kernels import hals_sweep
                from .nmf import _hals_solve

                Ht = np.ascontiguousarray(self.H_all.T)
                _hals_solve(hals_sweep, Ht, XtW, self._gram_blocks(WtW), self.starts, self.ranks,
                            self.max_inner_h, None, self.delta2)
                self.H_all = np.ascontiguousarray(Ht.T)
        return self.errors(XtW, WtW, sqnorms) if want_error else None

    def unstack(self, Ws, Hs):
        """Each factorization's columns as its own :class:`BlockW` (kept where the blocks are)."""
        import dask

        for i, s, k in zip(self.order, self.starts, self.ranks):
            s, k = int(s), int(k)
            refs, _ = _submit([dask.delayed(_cols)(w, s, s + k) for w in self.W.refs], what="unstack")
            Ws[i] = BlockW(refs, self.C.bounds, k)
            Hs[i] = self.H_all[s:s + k].copy()
