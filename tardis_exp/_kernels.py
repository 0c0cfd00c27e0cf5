"""The two fat products of the batched NMF solver, for CSR ``X``, without densifying ``X``.

Every iteration of :func:`tardis_exp.nmf.fit_batch` needs ``X @ H.T`` (n x K) and
``X.T @ W`` (m x K) with K the summed rank of every factorization still running (hundreds
to about a thousand columns). scipy's sparse @ dense is single-threaded and not
vectorized over the K columns; two replacements, picked by density (see
:class:`SparseProducts`):

``'csr'``
    numba kernels, parallel over output rows: row ``i`` of ``X @ B`` is the sum of
    ``X[i, j] * B[j, :]`` over the stored entries of row ``i`` -- a K-long axpy that
    vectorizes without reassociating sums (``fastmath`` off). ``X.T @ W`` is a scatter:
    a fixed number of row blocks each stream their rows of ``X`` and ``W`` once into a
    private m x K buffer, summed in a fixed order at the end -- no transposed copy of
    ``X``, sequential reads of ``W`` (random reads of a large ``W`` through a CSC copy
    were 2-3x slower at 20,000 spots), and results independent of the thread count.
``'dense-chunks'``
    Rows of ``X`` densified a chunk at a time into one reused float32 buffer and handed
    to BLAS sgemm: at the densities of log-normalized spatial data over highly variable
    genes (tens of percent) sgemm's flop rate beats the sparse kernel even though it
    multiplies the zeros too. Memory: one ``chunk x m`` float32 buffer.

Both return float32 and agree with scipy's products to float32 rounding.

Two row-parallel kernels do the cheap k x k work after a fat product for every
factorization at once: :func:`hals_sweep` (HALS's coordinate steps) and
:func:`mu_update` (Lee & Seung's rule for ``W``, fused into one pass over the rows).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

try:  # numba ships with scanpy; the solver falls back to scipy without it
    import numba

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency of scanpy
    numba = None
    _HAVE_NUMBA = False

__all__ = ["SparseProducts", "csr_matmul", "csr_t_matmul", "gram", "hals_sweep", "mu_update", "DENSE_CHUNK_MIN_DENSITY",
           "DENSE_CHUNK_MIN_K"]

# sgemm on densified chunks multiplies the zeros too; it beats the CSR kernel only when X
# is dense enough and the product fat enough (K columns) for sgemm to run near its peak.
# Measured by scripts/bench_kernels.py (README, "Kernel rates").
DENSE_CHUNK_MIN_DENSITY = 0.2
DENSE_CHUNK_MIN_K = 256
# rows per densified chunk: chunk x m float32 stays a few MB, large enough for sgemm
CHUNK_BYTES = 16 * 2**20
# X at least this dense and small enough is densified once for the whole fit: plain sgemm
# then beats both the CSR kernel and re-densifying chunks every iteration at any K (1.9x
# for 10 x rank 10, 1.3x for the 140-fit grid on the 3,600 x 2,000, 44 % dense bench
# matrix). At density 0.2 the copy costs 2.5x the CSR's memory; the cap bounds it.
DENSE_COPY_MIN_DENSITY = 0.2
DENSE_COPY_MAX_BYTES = 1 * 2**30


if _HAVE_NUMBA:

    @numba.njit(parallel=True, fastmath=False, cache=True, nogil=True)
    def _csr_matmul(indptr, indices, data, B, out):  # pragma: no cover - compiled
        # four stored entries per pass over the output row: one load/store of out[i, k]
        # per four multiply-adds instead of per one (2x at K = 100..1000)
        n = indptr.shape[0] - 1
        K = B.shape[1]
        for i in numba.prange(n):
            o = out[i]
            o[:] = 0.0
            p = indptr[i]
            e = indptr[i + 1]
            while p + 4 <= e:
                v0, v1, v2, v3 = data[p], data[p + 1], data[p + 2], data[p + 3]
                b0, b1, b2, b3 = B[indices[p]], B[indices[p + 1]], B[indices[p + 2]], B[indices[p + 3]]
                for k in range(K):
                    o[k] += (v0 * b0[k] + v1 * b1[k]) + (v2 * b2[k] + v3 * b3[k])
                p += 4
            while p < e:
                v = data[p]
                b = B[indices[p]]
                for k in range(K):
                    o[k] += v * b[k]
                p += 1

    @numba.njit(parallel=True, fastmath=False, cache=True, nogil=True)
    def _csr_t_matmul(indptr, indices, data, W, bufs):  # pragma: no cover - compiled
        # X.T @ W as a scatter: block b of rows streams its rows of X and W once and adds
        # into its own buffer bufs[b] (m x K, cache-resident for the usual m and K); the
        # blocks are fixed, so the result does not depend on the thread count
        n = indptr.shape[0] - 1
        nb = bufs.shape[0]
        K = W.shape[1]
        for b in numba.prange(nb):
            acc = bufs[b]
            acc[:, :] = 0.0
            lo = (n * b) // nb
            hi = (n * (b + 1)) // nb
            for i in range(lo, hi):
                for p in range(indptr[i], indptr[i + 1]):
                    v = data[p]
                    j = indices[p]
                    for k in range(K):
                        acc[j, k] += v * W[i, k]

    @numba.njit(parallel=True, fastmath=False, cache=True, nogil=True)
    def _sum_blocks(bufs, out):  # pragma: no cover - compiled
        m = out.shape[0]
        for j in numba.prange(m):
            out[j, :] = bufs[0, j, :]
            for b in range(1, bufs.shape[0]):
                out[j, :] += bufs[b, j, :]

    @numba.njit(parallel=True, fastmath=False, cache=True, nogil=True)
    def _densify_rows(indptr, indices, data, a, b, buf):  # pragma: no cover - compiled
        for r in numba.prange(b - a):
            row = buf[r]
            row[:] = 0.0
            for p in range(indptr[a + r], indptr[a + r + 1]):
                row[indices[p]] += data[p]


if _HAVE_NUMBA:

    def _hals_sweep_py(V, A, G, starts, ranks, active, mask, use_mask, delta):  # pragma: no cover - compiled
        # One HALS sweep over the columns of every active factorization. Column j of V
        # (W, or H transposed) is updated with every other column fixed, in order
        # j = 0..k-1 (Gauss-Seidel); this is separable over rows, so each row runs its
        # k coordinate steps in cache and rows run in parallel. No sum crosses rows: the
        # result does not depend on the thread count.
        N = V.shape[0]
        F = starts.shape[0]
        for i in numba.prange(N):
            v = V[i]
            a = A[i]
            for f in range(F):
                delta[i, f] = 0.0
                if not active[f]:
                    continue
                if use_mask and not mask[i, f]:
                    continue  # row outside this factorization's spots: stays zero
                s0 = starts[f]
                k = ranks[f]
                g = G[f]
                d = 0.0
                for j in range(k):
                    gjj = g[j, j]
                    if gjj <= 0:
                        continue  # dead component (zero row of the other factor): skip, as scikit-learn
                    acc = a[s0 + j]
                    gj = g[j]  # G is symmetric: row j is column j, contiguous
                    for l in range(k):
                        acc -= v[s0 + l] * gj[l]
                    old = v[s0 + j]
                    new = old + acc / gjj
                    if new < 0:
                        new = old * 0  # 0 of V's dtype
                    v[s0 + j] = new
                    d += (new - old) * (new - old)
                delta[i, f] = d

    # Two compilations of one function: the parallel one for big sweeps; the serial one
    # for small ones, where waking the thread pool costs more than the sweep (ms on a
    # busy machine). Rows are independent, so both give the same bits.
    _hals_sweep_par = numba.njit(parallel=True, fastmath=False, cache=True, nogil=True)(_hals_sweep_py)
    _hals_sweep_ser = numba.njit(parallel=False, fastmath=False, cache=True, nogil=True)(_hals_sweep_py)

# below this many multiply-adds per sweep the serial kernel is faster
HALS_PARALLEL_MIN_WORK = 2_000_000


if _HAVE_NUMBA:

    def _mu_update_py(V, A, G, starts, ranks, eps, block):  # pragma: no cover - compiled
        # Lee-Seung's rule for the stacked factors, fused: V <- V * (A / (V G)) per
        # factorization's columns, a zero denominator replaced by eps (as scikit-learn).
        # One pass over V and A instead of numpy's batched small matmul, mask and three
        # elementwise passes over strided views. A block of rows at a time, its k columns
        # copied out transposed, so the k x k products run along the rows (long, vectorized
        # loops) instead of k-long loops per row. Every den[j, i] sums l = 0..k-1 in order,
        # rows never mix: the result does not depend on the thread count.
        N = V.shape[0]
        F = starts.shape[0]
        kmax = G.shape[1]
        nblocks = (N + block - 1) // block
        for b in numba.prange(nblocks):
            i0 = b * block
            B = min(N, i0 + block) - i0
            old = np.empty((kmax, block), dtype=V.dtype)
            den = np.empty((kmax, block), dtype=V.dtype)
            for f in range(F):
                s0 = starts[f]
                k = ranks[f]
                g = G[f]
                for i in range(B):
                    for l in range(k):
                        old[l, i] = V[i0 + i, s0 + l]
                for j in range(k):
                    dj = den[j]
                    for i in range(B):
                        dj[i] = 0.0
                    for l in range(k):
                        glj = g[l, j]
                        ol = old[l]
                        for i in range(B):
                            dj[i] += ol[i] * glj
                for i in range(B):
                    for j in range(k):
                        d = den[j, i]
                        if d == 0:
                            d = eps
                        V[i0 + i, s0 + j] = old[j, i] * (A[i0 + i, s0 + j] / d)

    _mu_update_par = numba.njit(parallel=True, fastmath=False, cache=True, nogil=True)(_mu_update_py)
    _mu_update_ser = numba.njit(parallel=False, fastmath=False, cache=True, nogil=True)(_mu_update_py)

MU_BLOCK_ROWS = 256


def mu_update(V, A, G, starts, ranks, eps):
    """Multiplicative update, in place, of the stacked factor ``V`` (N x K) of F factorizations.

    Factorization ``f`` owns columns ``starts[f] : starts[f] + ranks[f]`` of ``V`` and of
    ``A`` (its columns of ``X @ H.T`` for ``W``); ``G[f, :k, :k]`` is its symmetric Gram
    matrix (``H H.T``). ``V[:, cols] *= A[:, cols] / (V[:, cols] @ G_f)``, a zero
    denominator replaced by ``eps``. Equal to the numpy expression to float32 rounding.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ranks = np.asarray(ranks, dtype=np.int64)
    G = np.ascontiguousarray(G, dtype=V.dtype)
    A = np.ascontiguousarray(A, dtype=V.dtype)
    if not _HAVE_NUMBA:  # pragma: no cover - numba ships with scanpy
        for f in range(len(starts)):
            s0, k = int(starts[f]), int(ranks[f])
            den = V[:, s0:s0 + k] @ G[f, :k, :k]
            den[den == 0] = eps
            V[:, s0:s0 + k] *= A[:, s0:s0 + k] / den
        return V
    work = V.shape[0] * int(np.sum(ranks ** 2))
    kernel = _mu_update_par if work >= HALS_PARALLEL_MIN_WORK else _mu_update_ser
    kernel(V, A, G, starts, ranks, V.dtype.type(eps), MU_BLOCK_ROWS)
    return V


def hals_sweep(V, A, G, starts, ranks, active, mask=None):
    """One HALS sweep, in place, over the stacked factors ``V`` (N x K) of F factorizations.

    Factorization ``f`` owns columns ``starts[f] : starts[f] + ranks[f]`` of ``V`` and of
    ``A`` (the matching columns of the fat product: ``X @ H.T`` for ``W``, ``X.T @ W`` for
    ``H.T``) and its Gram matrix ``G[f, :k, :k]`` (``H H.T`` or ``W.T W``). Rows where
    ``mask[:, f]`` is false, and factorizations with ``active[f]`` false, are left as they
    are. Returns the squared change of every factorization's factor (float64, length F).
    """
    V = np.asarray(V)
    N, F = V.shape[0], len(starts)
    starts = np.asarray(starts, dtype=np.int64)
    ranks = np.asarray(ranks, dtype=np.int64)
    active = np.asarray(active, dtype=np.bool_)
    G = np.ascontiguousarray(G, dtype=np.float32)
    use_mask = mask is not None
    mask = np.ones((1, 1), dtype=np.bool_) if mask is None else np.ascontiguousarray(mask, dtype=np.bool_)
    if _HAVE_NUMBA:
        delta = np.empty((N, F), dtype=np.float64)
        work = N * int(np.sum(ranks[active] ** 2))
        kernel = _hals_sweep_par if work >= HALS_PARALLEL_MIN_WORK else _hals_sweep_ser
        kernel(V, A, G, starts, ranks, active, mask, use_mask, delta)
        # fixed-order reduction (numpy's pairwise sum), independent of the thread count
        return delta.sum(0)
    out = np.zeros(F)  # pragma: no cover - numba ships with scanpy
    for f in np.flatnonzero(active):
        s0, k = int(starts[f]), int(ranks[f])
        rows = mask[:, f] if use_mask else slice(None)
        for j in range(k):
            if G[f, j, j] <= 0:
                continue
            old = V[rows, s0 + j].copy()
            step = (A[rows, s0 + j] - V[rows, s0:s0 + k] @ G[f, :k, j]) / G[f, j, j]
            V[rows, s0 + j] = np.maximum(old + step, 0)
            out[f] += float(np.sum((V[rows, s0 + j] - old) ** 2, dtype=np.float64))
    return out


if _HAVE_NUMBA:

    @numba.njit(parallel=False, fastmath=False, cache=True, nogil=True)
    def _gram_py(W, out):  # pragma: no cover - compiled
        n, K = W.shape
        acc = np.zeros((K, K), dtype=np.float64)
        for i in range(n):
            w = W[i]
            for k in range(K):
                v = np.float64(w[k])
                if v != 0.0:
                    for j in range(k, K):
                        acc[k, j] += v * w[j]
        for k in range(K):
            for j in range(k, K):
                out[k, j] = acc[k, j]
                out[j, k] = acc[k, j]


def gram(W: np.ndarray) -> np.ndarray:
    """``W.T @ W`` (K x K, float32, accumulated in float64) on this thread, without BLAS.

    For the chunk tasks of :mod:`tardis_exp.chunked`: there the chunks already run in
    parallel, and a multi-threaded BLAS call right after a numba (OpenMP) parallel kernel
    waits for the cores the OpenMP threads still spin on (0.9 s instead of 3 ms for a
    50,000 x 40 ``W`` on 2 cores, scripts/bench_distributed.py --profile).
    """
    W = np.ascontiguousarray(W, dtype=np.float32)
    if not _HAVE_NUMBA:
        return (W.T.astype(np.float64) @ W.astype(np.float64)).astype(np.float32)
    out = np.empty((W.shape[1], W.shape[1]), dtype=np.float32)
    _gram_py(W, out)
    return out


# row blocks of the X.T @ W scatter: fixed (not the thread count) for reproducibility
SCATTER_BLOCKS = 8


def csr_t_matmul(X: sp.csr_matrix, W: np.ndarray) -> np.ndarray:
    """``X.T @ W`` for float32 CSR ``X`` (n x m) and float32 ``W`` (n x K), no transpose copy."""
    n, m = X.shape
    if W.shape[0] != n:
        raise ValueError(f"shape mismatch: X is {X.shape}, W is {W.shape}")
    W = np.ascontiguousarray(W, dtype=np.float32)
    if not _HAVE_NUMBA:
        return np.asarray(X.T @ W, dtype=np.float32)
    nb = max(1, min(SCATTER_BLOCKS, n))
    bufs = np.empty((nb, m, W.shape[1]), dtype=np.float32)
    _csr_t_matmul(X.indptr, X.indices, X.data.astype(np.float32, copy=False), W, bufs)
    out = np.empty((m, W.shape[1]), dtype=np.float32)
    _sum_blocks(bufs, out)
    return out


def csr_matmul(X: sp.csr_matrix, B: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``X @ B`` for float32 CSR ``X`` (n x m) and C-contiguous float32 ``B`` (m x K)."""
    n, m = X.shape
    if B.shape[0] != m:
        raise ValueError(f"shape mismatch: X is {X.shape}, B is {B.shape}")
    B = np.ascontiguousarray(B, dtype=np.float32)
    if out is None:
        out = np.empty((n, B.shape[1]), dtype=np.float32)
    if not _HAVE_NUMBA:
        out[:] = X @ B
        return out
    _csr_matmul(X.indptr, X.indices, X.data.astype(np.float32, copy=False), B, out)
    return out


class SparseProducts:
    """``X @ H.T`` and ``X.T @ W`` for one CSR ``X`` over a whole fit.

    Parameters
    ----------
    X
        Float32 CSR with sorted, summed indices (:func:`tardis_exp.nmf.prepare_matrix`).
    method
        ``'auto'``: one dense copy of ``X`` for the whole fit when the density is at least
        ``DENSE_COPY_MIN_DENSITY`` and the copy takes at most ``DENSE_COPY_MAX_BYTES``;
        otherwise per call dense chunks when the density is at least
        ``DENSE_CHUNK_MIN_DENSITY`` and the product has at least ``DENSE_CHUNK_MIN_K``
        columns, else the CSR kernel. The choice depends only on shapes and density, so
        a fit is reproducible. Or ``'dense'``, ``'csr'``, ``'dense-chunks'``, ``'scipy'``
        (the reference).
    """

    METHODS = ("auto", "dense", "csr", "dense-chunks", "scipy")

    def __init__(self, X: sp.csr_matrix, method: str = "auto"):
        if method not in self.METHODS:
            raise ValueError(f"unknown sparse product method {method!r}; choose one of {self.METHODS}")
        self.X = X
        n, m = X.shape
        density = X.nnz / max(n * m, 1)
        if method == "auto" and density >= DENSE_COPY_MIN_DENSITY and 4 * n * m <= DENSE_COPY_MAX_BYTES:
            method = "dense"
        if not _HAVE_NUMBA and method != "dense":
            method = "scipy"
        self.method = method
        self.density = density
        self._buf = None
        self._dense = np.ascontiguousarray(X.toarray(), dtype=np.float32) if method == "dense" else None
        self.chunk = max(1, min(n, CHUNK_BYTES // max(4 * m, 1)))

    def _chunks(self):
        X = self.X
        n, m = X.shape
        if self._buf is None:
            self._buf = np.empty((self.chunk, m), dtype=np.float32)
        for a in range(0, n, self.chunk):
            b = min(a + self.chunk, n)
            buf = self._buf[: b - a]
            _densify_rows(X.indptr, X.indices, X.data, a, b, buf)
            yield a, b, buf

    def method_for(self, K: int) -> str:
        """The method a product with ``K`` columns runs."""
        if self.method != "auto":
            return self.method
        if self.density >= DENSE_CHUNK_MIN_DENSITY and K >= DENSE_CHUNK_MIN_K:
            return "dense-chunks"
        return "csr"

    def xht(self, H: np.ndarray) -> np.ndarray:
        """``X @ H.T`` (n x K) for ``H`` (K x m)."""
        X = self.X
        method = self.method_for(H.shape[0])
        if method == "dense":
            return self._dense @ H.T
        if method == "scipy":
            return np.asarray(X @ H.T, dtype=np.float32)
        if method == "csr":
            return csr_matmul(X, np.ascontiguousarray(H.T))
        out = np.empty((X.shape[0], H.shape[0]), dtype=np.float32)
        for a, b, buf in self._chunks():
            np.matmul(buf, H.T, out=out[a:b])
        return out

    def xtw(self, W: np.ndarray) -> np.ndarray:
        """``X.T @ W`` (m x K) for ``W`` (n x K)."""
        X = self.X
        method = self.method_for(W.shape[1])
        if method == "dense":
            return self._dense.T @ W
        if method == "scipy":
            return np.asarray(X.T @ W, dtype=np.float32)
        if method == "csr":
            return csr_t_matmul(X, W)
        out = np.zeros((X.shape[1], W.shape[1]), dtype=np.float32)
        tmp = None
        for a, b, buf in self._chunks():
            if tmp is None:
                tmp = np.empty_like(out)
            np.matmul(buf.T, W[a:b], out=tmp)
            out += tmp
        return out
