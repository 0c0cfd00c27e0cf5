"""Batched non-negative matrix factorization.

Many factorizations of one matrix ``X`` (spots x genes) -- replicates with different
seeds, different ranks, resampled spot subsets given as row masks -- advance together:
each iteration makes **one** product ``X @ H_all.T`` and **one** product ``X.T @ W_all``
over the stacked factors of every factorization still running, instead of two skinny
products per factorization. The skinny products are bound by memory traffic; the fat
ones let BLAS reach its compute peak. After each fat product, every factorization does
its own cheap k x k work.

Two solvers share this design (``solver``):

``'hals'``
    Hierarchical alternating least squares (Cichocki & Phan 2009), accelerated as
    Gillis & Glineur (2012): after each fat product the columns of ``W`` (then of ``H``)
    are updated one at a time, exactly minimizing the loss in each column, and the sweep
    is repeated on the same product while it still moves the factor (at most
    ``1 + alpha * rho`` sweeps, ``rho`` the cost of the product over the cost of a sweep;
    stop when a sweep's change falls below ``delta`` times the first one's). One sweep
    from scikit-learn's starting point is scikit-learn's coordinate descent
    (``solver='cd'``) step. Frobenius loss only.
``'mu'``
    Lee & Seung's multiplicative rules -- the seed's formula -- in the order and with the
    zero guard scikit-learn uses (``W`` first, then ``H``; a zero denominator is replaced
    by float32 eps), so a single factorization reproduces ``sklearn.decomposition.NMF(
    solver='mu', init='custom')`` from the same starting point. Frobenius or KL loss.

Stopping rule (every solver, each factorization on its own): every ``check_every``
iterations, stop when the loss improved by less than ``tol`` relative to the current
loss over those iterations, ``(loss[t - check_every] - loss[t]) / loss[t] < tol``
(``stop_rule='change'``), or when that improvement continued as a geometric series --
an estimate of the distance to the converged loss -- is below ``tol``
(``stop_rule='extrapolated'``: for ``mu``, whose loss creeps, see docs/solver.md).
Unlike scikit-learn's rule, which divides by the loss at the random start (several
times the final loss), this one does not stop a slow solver early because its start
was bad. A factorization that reaches ``max_iter`` first is reported with
``converged=False`` and a :class:`sklearn.exceptions.ConvergenceWarning`.

A row mask restricts a factorization to a subset of spots without copying ``X``: its
``W`` is zero outside the mask (multiplicative updates keep those zeros, HALS skips
those rows), so the shared products only ever see the masked rows.
"""

# Over 500 lines on purpose: the batched solvers share one loop, its convergence bookkeeping
# and the estimator around it; they change together (docs/layout.md).

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted

from .params import STOP_RULES  # declared once, with the config key
from .params import FactorizeParams as _F
from .solvers import check_solver, refit_solver
from .progress import progress_bar

EPS = np.finfo(np.float32).eps
# Gillis & Glineur (2012)'s recommended inner-repetition parameters for HALS
HALS_ALPHA = 0.5
HALS_DELTA = 0.1
# Their rho counts flops; a HALS sweep (k-long dependent coordinate steps) runs far fewer
# flops per second than the sgemm-class fat product. Measured on the default data
# (scripts/bench_solver.py, docs/solver.md): ~25x, and alpha = 0.5 / 25 gave the fastest
# time to the converged loss (3x faster than alpha = 0.5 unscaled, 2.8x than one sweep).
HALS_SWEEP_COST = 25.0

__all__ = ["NMFResult", "STOP_RULES", "fit_batch", "fit_rank_ladder", "warm_start_init", "refit_usage", "BatchedNMF",
           "prepare_matrix"]


@dataclass
class NMFResult:
    """One factorization of a batch."""

    W: np.ndarray  # n_spots x rank, zero outside ``rows``
    H: np.ndarray  # rank x n_genes
    error: float  # Frobenius norm ||X_S - W H|| (or generalized KL divergence)
    n_iter: int
    converged: bool
    rank: int
    seed: int | None = None
    rows: np.ndarray | None = field(default=None, repr=False)
    # (iteration, seconds since the fit started, error) at every check, when ``trace=True``
    trace: list | None = field(default=None, repr=False)


def prepare_matrix(X, dtype=np.float32):
    """Float32 CSR or C-contiguous dense, never densifying a sparse input; a Dask array
    becomes a :class:`tardis_exp.chunked.ChunkedMatrix` (read chunk by chunk, never whole)."""
    if getattr(X, "is_chunked", False):
        return X
    from .chunked import is_dask

    if is_dask(X):
        from .chunked import ChunkedMatrix

        return ChunkedMatrix(X)
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=dtype)
        X.sum_duplicates()
        return X
    return np.ascontiguousarray(X, dtype=dtype)


class _Products:
    """The two fat products of one fit, ``X @ H.T`` and ``X.T @ W``.

    Dense ``X`` goes to BLAS sgemm directly; CSR ``X`` to
    :class:`tardis_exp._kernels.SparseProducts` (parallel CSR kernel or sgemm on densified
    row chunks; scipy's sparse @ dense is single-threaded).
    """

    def __new__(cls, X, sparse_method: str = "auto"):
        if getattr(X, "is_chunked", False):  # out of core: one pass over X's chunks per product
            return X.products()
        return super().__new__(cls)

    def __init__(self, X, sparse_method: str = "auto"):
        self.X = X
        self.sparse = sp.issparse(X)
        if self.sparse:
            from ._kernels import SparseProducts

            self._sp = SparseProducts(X, sparse_method)

    def xht(self, H):
        """X @ H.T, shape (n, K)."""
        return self._sp.xht(H) if self.sparse else self.X @ H.T

    def xtw(self, W):
        """X.T @ W, shape (m, K)."""
        return self._sp.xtw(W) if self.sparse else self.X.T @ W


class _Group:
    """Factorizations sharing one rank: their columns are contiguous in the stack."""

    def __init__(self, idx: list[int], rank: int, start: int):
        self.idx = idx
        self.rank = rank
        self.start = start
        self.stop = start + rank * len(idx)

    @property
    def cols(self):
        return slice(self.start, self.stop)


def _stack(items: list[int], ranks, Ws, Hs):
    """Stack the factors of ``items`` grouped by rank; return (W_all, H_all, groups)."""
    by_rank: dict[int, list[int]] = {}
    for i in items:
        by_rank.setdefault(ranks[i], []).append(i)
    groups, start = [], 0
    for r in sorted(by_rank):
        g = _Group(by_rank[r], r, start)
        groups.append(g)
        start = g.stop
    W_all = np.empty((Ws[items[0]].shape[0], start), dtype=np.float32)
    H_all = np.empty((start, Hs[items[0]].shape[1]), dtype=np.float32)
    for g in groups:
        for j, i in enumerate(g.idx):
            sl = slice(g.start + j * g.rank, g.start + (j + 1) * g.rank)
            W_all[:, sl] = Ws[i]
            H_all[sl] = Hs[i]
    return W_all, H_all, groups


def _unstack(W_all, H_all, groups, Ws, Hs):
    for g in groups:
        for j, i in enumerate(g.idx):
            sl = slice(g.start + j * g.rank, g.start + (j + 1) * g.rank)
            Ws[i] = W_all[:, sl].copy()
            Hs[i] = H_all[sl].copy()


def _views(W_all, H_all, g: _Group):
    """(R, n, k) view of W and (R, k, m) view of H for one rank group."""
    R, k = len(g.idx), g.rank
    W3 = W_all[:, g.cols].reshape(W_all.shape[0], R, k).transpose(1, 0, 2)
    H3 = H_all[g.cols].reshape(R, k, H_all.shape[1])
    return W3, H3


def _layout(groups):
    """First column and rank of every factorization in the stack, in stack order."""
    starts = np.array([g.start + j * g.rank for g in groups for j in range(len(g.idx))], np.int64)
    ranks = np.array([g.rank for g in groups for _ in g.idx], np.int64)
    return starts, ranks


def _padded_grams(groups, F3s, kmax: int, transpose_first: bool) -> np.ndarray:
    """Gram matrix of every factorization's factor, padded to (F, kmax, kmax): ``F.T F`` of
    each (R, rows, k) view in ``F3s`` (``transpose_first``), else ``F F.T`` of (R, k, cols)."""
    G = np.zeros((sum(len(g.idx) for g in groups), kmax, kmax), dtype=np.float32)
    f = 0
    for g, F3 in zip(groups, F3s):
        R, k = len(g.idx), g.rank
        G[f:f + R, :k, :k] = F3.transpose(0, 2, 1) @ F3 if transpose_first else F3 @ F3.transpose(0, 2, 1)
        f += R
    return G


def _mu_step_frobenius(P, W_all, H_all, groups, update_H=True, want_error=False, sqnorms=None, layout=None):
    from ._kernels import mu_update

    starts, ranks = layout if layout is not None else _layout(groups)
    XHt = P.xht(H_all)  # one fat pass over X for every factorization
    # W's update fused in one pass over the rows (numba): numpy's batched small matmul, zero
    # guard and elementwise passes over strided views took as long as the fat product
    # itself at 200,000 spots (docs/solver.md, "200,000 spots")
    G = _padded_grams(groups, [_views(W_all, H_all, g)[1] for g in groups], int(ranks.max()), False)
    mu_update(W_all, XHt, G, starts, ranks, EPS)
    del XHt
    if not update_H and not want_error:
        return None
    XtW = P.xtw(W_all)  # the second fat pass
    errors = {}
    for g in groups:
        W3, H3 = _views(W_all, H_all, g)
        WtW = W3.transpose(0, 2, 1) @ W3
        WtX = XtW[:, g.cols].T.reshape(len(g.idx), g.rank, -1)
        if update_H:
            den = WtW @ H3
            den[den == 0] = EPS
            H3 *= WtX / den
        if want_error:
            # ||X - WH||^2 = ||X||^2 - 2<W^T X, H> + <W^T W, H H^T>, from products already made
            HHt = H3 @ H3.transpose(0, 2, 1)
            cross = np.einsum("rkm,rkm->r", WtX.astype(np.float64), H3.astype(np.float64))
            quad = np.einsum("rkl,rkl->r", WtW.astype(np.float64), HHt.astype(np.float64))
            for j, i in enumerate(g.idx):
                errors[i] = np.sqrt(max(sqnorms[i] - 2 * cross[j] + quad[j], 0.0))
    return errors


def _hals_max_inner(ranks, nnz, shape, alpha):
    """Most sweeps per fat product for W and for H, per factorization: ``1 + alpha * rho``."""
    n, m = shape
    k = np.asarray(ranks).astype(np.float64)
    # Gillis & Glineur's rho: (cost of this half-step's products) / (cost of one sweep), per
    # factorization, from shapes only (reproducible), a sweep's flop weighted by HALS_SWEEP_COST
    rho_w = 1 + (nnz * k + m * k**2) / (HALS_SWEEP_COST * n * k**2)
    rho_h = 1 + (nnz * k + n * k**2) / (HALS_SWEEP_COST * m * k**2)
    return np.floor(1 + alpha * rho_w).astype(np.int64), np.floor(1 + alpha * rho_h).astype(np.int64)


def _hals_solve(sweep, V, A, G, starts, ranks, max_inner, mask, delta2):
    """Gillis-Glineur inner repetitions, each factorization on its own criterion."""
    active = np.ones(len(starts), dtype=bool)
    eps0 = sweep(V, A, G, starts, ranks, active, mask)
    eps, done = eps0.copy(), np.ones(len(starts), dtype=np.int64)
    while True:
        active = (done < max_inner) & (eps0 > 0) & (eps >= delta2 * eps0)
        if not active.any():
            return
        e = sweep(V, A, G, starts, ranks, active, mask)
        eps[active] = e[active]
        done += active


class _HALSState:
    """Stacked factors of the running factorizations for HALS: ``W_all`` (n x K) and
    ``Ht_all`` (m x K), both row-major so a row's k entries per factorization are
    contiguous for the sweep kernel and the fat products need no transposed copy."""

    def __init__(self, items, ranks, Ws, Hs, masks, nnz, shape, alpha, delta):
        from ._kernels import hals_sweep

        self._sweep = hals_sweep
        self.items = items
        W_all, H_all, self.groups = _stack(items, ranks, Ws, Hs)
        self.W_all, self.Ht_all = W_all, np.ascontiguousarray(H_all.T)
        order = [i for g in self.groups for i in g.idx]  # position of each factorization in the stack
        self.order = order
        self.starts, self.ranks = _layout(self.groups)
        self.kmax = int(self.ranks.max())
        self.mask = None
        if any(masks[i] is not None for i in order):
            self.mask = np.ones((shape[0], len(order)), dtype=bool)
            for f, i in enumerate(order):
                if masks[i] is not None:
                    self.mask[:, f] = masks[i]
        self.max_inner_w, self.max_inner_h = _hals_max_inner(self.ranks, nnz, shape, alpha)
        self.delta2 = delta**2

    def _grams(self, F3s):
        """Per-factorization Gram matrices ``F_f.T F_f``, padded to (F, kmax, kmax)."""
        return _padded_grams(self.groups, F3s, self.kmax, True)

    def _f3(self, M):
        """(R, rows, k) views of the stacked factor ``M`` (rows x K), one per group."""
        return [M[:, g.cols].reshape(M.shape[0], len(g.idx), g.rank).transpose(1, 0, 2) for g in self.groups]

    def _solve(self, V, A, G, max_inner, mask):
        _hals_solve(self._sweep, V, A, G, self.starts, self.ranks, max_inner, mask, self.delta2)

    def step(self, P, update_H, want_error, sqnorms):
        A = P.xht(self.Ht_all.T)  # X @ H.T: one fat pass over X for every factorization
        self._solve(self.W_all, A, self._grams(self._f3(self.Ht_all)), self.max_inner_w, self.mask)
        if not update_H and not want_error:
            return None
        B = P.xtw(self.W_all)  # X.T @ W: the second fat pass
        W3s = self._f3(self.W_all)
        if update_H:
            self._solve(self.Ht_all, B, self._grams(W3s), self.max_inner_h, None)
        if not want_error:
            return None
        # ||X - WH||^2 = ||X||^2 - 2<X.T W, H.T> + <W.T W, H H.T>, from products already made
        errors = {}
        for g, W3, H3t in zip(self.groups, W3s, self._f3(self.Ht_all)):
            B3 = B[:, g.cols].reshape(B.shape[0], len(g.idx), g.rank).transpose(1, 0, 2)
            cross = np.einsum("rmk,rmk->r", B3.astype(np.float64), H3t.astype(np.float64))
            WtW = (W3.transpose(0, 2, 1) @ W3).astype(np.float64)
            HHt = (H3t.transpose(0, 2, 1) @ H3t).astype(np.float64)
            quad = np.einsum("rkl,rkl->r", WtW, HHt)
            for j, i in enumerate(g.idx):
                errors[i] = np.sqrt(max(sqnorms[i] - 2 * cross[j] + quad[j], 0.0))
        return errors

    def unstack(self, Ws, Hs):
        for g in self.groups:
            for j, i in enumerate(g.idx):
                sl = slice(g.start + j * g.rank, g.start + (j + 1) * g.rank)
                Ws[i] = self.W_all[:, sl].copy()
                Hs[i] = np.ascontiguousarray(self.Ht_all[:, sl].T)


class _MUState:
    """Stacked factors for the batched multiplicative updates (Frobenius)."""

    def __init__(self, items, ranks, Ws, Hs):
        self.W_all, self.H_all, self.groups = _stack(items, ranks, Ws, Hs)
        self.layout = _layout(self.groups)  # fixed while the stack lives

    def step(self, P, update_H, want_error, sqnorms):
        return _mu_step_frobenius(P, self.W_all, self.H_all, self.groups, update_H, want_error, sqnorms,
                                  self.layout)

    def unstack(self, Ws, Hs):
        _unstack(self.W_all, self.H_all, self.groups, Ws, Hs)


def _wh_at_nonzeros(X, W, H):
    """(W H) at the stored entries of CSR X, or the full product for dense X."""
    if sp.issparse(X):
        rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        out = np.empty(X.nnz, dtype=np.float32)
        step = max(1, 2_000_000 // max(W.shape[1], 1))
        for a in range(0, X.nnz, step):
            b = min(a + step, X.nnz)
            out[a:b] = np.einsum("ik,ki->i", W[rows[a:b]], H[:, X.indices[a:b]])
        return out
    return W @ H


def _kl_ratio(X, W, H):
    """X / (W H) with the sparsity of X."""
    wh = _wh_at_nonzeros(X, W, H)
    if sp.issparse(X):
        R = X.copy()
        wh[wh == 0] = EPS
        R.data = X.data / wh
        return R, wh
    wh[wh == 0] = EPS
    return X / wh, wh


def _kl_error(X, W, H, wh, rows=None):
    # generalized KL: sum x log(x / wh) - x + wh, over the factorization's rows
    if sp.issparse(X):
        x = X.data
        if rows is not None:
            keep = np.repeat(rows, np.diff(X.indptr))
            x, wh = x[keep], wh[keep]
    else:
        x, wh = (X, wh) if rows is None else (X[rows], wh[rows])
        x, wh = x.ravel(), wh.ravel()
    pos = x > 0
    div = np.sum(x[pos] * np.log(x[pos] / wh[pos]), dtype=np.float64) - np.sum(x, dtype=np.float64)
    div += float(W.sum(0, dtype=np.float64) @ H.sum(1, dtype=np.float64))
    return float(np.sqrt(2 * max(div, 0.0)))


def _mu_step_kl(X, Ws, Hs, items, update_H=True, want_error=False, rows=None):
    # KL needs X / (W H) per factorization: no shared product, so one at a time.
    errors = {}
    for i in items:
        W, H = Ws[i], Hs[i]
        Rm, _ = _kl_ratio(X, W, H)
        num = np.asarray(Rm @ H.T)
        den = np.broadcast_to(H.sum(1), W.shape).copy()
        den[den == 0] = EPS
        W *= num / den
        if update_H:
            Rm, _ = _kl_ratio(X, W, H)
            num = np.asarray(Rm.T @ W).T if sp.issparse(Rm) else W.T @ Rm
            den = np.broadcast_to(W.sum(0)[:, None], H.shape).copy()
            den[den == 0] = EPS
            H *= num / den
        if want_error:
            _, wh = _kl_ratio(X, W, H)
            errors[i] = _kl_error(X, W, H, wh, None if rows is None else rows[i])
    return errors


def _random_init(X, rank, seed, mask, n, m):
    rng = np.random.default_rng(seed)
    if getattr(X, "is_chunked", False):
        mean = X.mean(mask)
    elif sp.issparse(X) and mask is None:
        # not X.mean(): scipy's copies X's data and indices (+300 MB transient at 200,000 spots)
        mean = float(X.data.sum(dtype=np.float64)) / max(n * m, 1)
    else:
        Xs = X[mask] if mask is not None else X
        mean = float(Xs.mean()) if Xs.shape[0] else 0.0
    avg = np.sqrt(max(mean, 0.0) / rank)
    # scikit-learn's 'random' init: |N(0,1)| scaled by sqrt(mean(X) / rank)
    H = (avg * np.abs(rng.standard_normal((rank, m)))).astype(np.float32)
    W = (avg * np.abs(rng.standard_normal((n, rank)))).astype(np.float32)
    if mask is not None:
        W[~mask] = 0
    return W, H




def _converged(e_2, e_1, e, tol, rule):
    """The stopping rule on the losses at the last three checks (``e_2`` None at the first)."""
    d2 = e_1 - e  # improvement over the last check_every iterations
    if rule == "extrapolated":
        if e_2 is None:
            return False  # needs two windows
        d1 = e_2 - e_1
        q = d2 / d1 if d1 > 0 else 0.0
        if q >= 1:
            return False  # not slowing down: no estimate of the limit yet
        d2 = d2 / (1 - q)  # d2 + d2 q + d2 q^2 + ...: estimated distance to the converged loss
    return d2 < tol * max(e, np.finfo(np.float64).tiny)


def fit_batch(
    X,
    ranks: Sequence[int],
    seeds: Sequence[int] | None = None,
    row_masks: Sequence[np.ndarray | None] | None = None,
    *,
    solver: str = _F.solver,
    beta_loss: str = _F.beta_loss,
    max_iter: int = _F.max_iter,
    tol: float = _F.tol,
    check_every: int = _F.check_every,
    init: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    update_H: bool = True,
    progress: bool | None = None,
    desc: str = "NMF",
    sparse_method: str = "auto",
    hals_alpha: float = HALS_ALPHA,
    hals_delta: float = HALS_DELTA,
    trace: bool = False,
    warn: bool = True,
    stop_at: Sequence[float] | None = None,
    stop_rule: str = "change",
    gather_W: bool = True,
) -> list[NMFResult]:
    """Fit many NMFs of one matrix together.

    Parameters
    ----------
    X
        Non-negative (n_spots, n_genes) matrix, dense or sparse (kept sparse).
    ranks
        Rank of every factorization.
    seeds
        Seed of every factorization's random initialization.
    row_masks
        Optional boolean mask over spots per factorization (``None`` = all spots).
    solver
        ``'hals'`` (accelerated HALS, Frobenius loss) or ``'mu'`` (multiplicative
        updates, the seed's formula); see the module docstring.
    beta_loss
        ``'frobenius'`` (batched) or ``'kullback-leibler'`` (``mu`` only).
    max_iter, tol, check_every
        Stopping rule, applied to each factorization on its own: stop when the loss
        improved by less than ``tol`` (relative to the current loss) over the last
        ``check_every`` iterations. ``tol=0`` runs ``max_iter`` iterations.
    stop_rule
        ``'change'`` (the rule above) or ``'extrapolated'``: the last window's
        improvement ``d2`` continued as a geometric series with the ratio ``q = d2 / d1``
        of the last two windows, ``d2 / (1 - q)`` -- an estimate of the distance to the
        converged loss -- must be below ``tol`` (relative). Never stops earlier than
        ``'change'``; a slowly converging solver (``mu``: ``q`` near 1) runs on until it
        is near its limit instead of stopping where one window's change first looks small
        (docs/solver.md, "Stopping rule").
    init
        Optional ``(W, H)`` starting points instead of random ones.
    update_H
        ``False`` keeps ``H`` fixed and fits ``W`` only (usage refit).
    sparse_method
        How the fat products run for sparse ``X``: ``'auto'``, ``'csr'`` (parallel numba
        kernel), ``'dense-chunks'`` (sgemm on densified row chunks) or ``'scipy'``; see
        ``tardis_exp._kernels``. Results agree to float32 rounding.
    hals_alpha, hals_delta
        Gillis & Glineur's inner repetitions for ``hals``: at most ``1 + alpha * rho``
        sweeps per fat product (``rho``: flops of the product over ``HALS_SWEEP_COST``
        times the flops of a sweep); stop once a sweep changes the factor by less than
        ``delta`` times the first sweep did. ``alpha=0`` is plain HALS (one sweep).
    trace
        Record ``(iteration, seconds, error)`` at every check in ``NMFResult.trace``.
    warn
        Emit a :class:`~sklearn.exceptions.ConvergenceWarning` when a factorization
        stops at ``max_iter`` (``tol > 0`` only).
    stop_at
        Optional loss per factorization: stop it at the first check where its loss is at
        or below this value (benchmarks measuring the time to a target loss; counted as
        ``converged``).
    gather_W
        For a chunked (Dask) ``X`` the rows of ``W`` live with ``X``'s chunks through the
        fit (:class:`tardis_exp.chunked.DistributedState`); ``True`` brings each result's
        ``W`` here as a NumPy array at the end, ``False`` leaves it as a
        :class:`tardis_exp.chunked.BlockW` (row blocks on the workers).

    Returns
    -------
    One :class:`NMFResult` per factorization, in input order.
    """
    X = prepare_matrix(X)
    n, m = X.shape
    F = len(ranks)
    if F == 0:
        return []
    if beta_loss not in ("frobenius", "kullback-leibler"):
        raise ValueError(f"unknown beta_loss {beta_loss!r}; use 'frobenius' or 'kullback-leibler'")
    check_solver(solver, beta_loss, batched=True)
    if stop_rule not in STOP_RULES:
        raise ValueError(f"unknown stop_rule {stop_rule!r}; use one of {STOP_RULES}")
    seeds = list(seeds) if seeds is not None else [None] * F
    masks = list(row_masks) if row_masks is not None else [None] * F
    masks = [None if mk is None else np.asarray(mk, dtype=bool) for mk in masks]
    ranks = [int(r) for r in ranks]

    Ws, Hs = [None] * F, [None] * F
    chunked = getattr(X, "is_chunked", False)
    for i in range(F):
        if chunked:  # W made one row block at a time and kept with X's chunks, never whole here
            from .chunked import BlockW, RandomW, random_init_blocks

            if init is None:
                Ws[i], Hs[i] = random_init_blocks(X, ranks[i], seeds[i], masks[i])
                continue
            W0, H0 = init[i]
            Hs[i] = np.array(H0, dtype=np.float32, copy=True)
            if isinstance(W0, RandomW):
                W0.mask = masks[i]
                Ws[i] = BlockW.from_blocks(W0.blocks(X.bounds), X.bounds, W0.rank)
            elif isinstance(W0, BlockW) and masks[i] is None:
                Ws[i] = W0
            else:
                W0 = np.array(W0, dtype=np.float32, copy=True)
                if masks[i] is not None:
                    W0[~masks[i]] = 0
                Ws[i] = BlockW.from_array(W0, X.bounds)
            continue
        if init is not None:
            W0, H0 = init[i]
            Ws[i] = np.array(W0, dtype=np.float32, copy=True)
            Hs[i] = np.array(H0, dtype=np.float32, copy=True)
            if masks[i] is not None:
                Ws[i][~masks[i]] = 0
        else:
            Ws[i], Hs[i] = _random_init(X, ranks[i], seeds[i], masks[i], n, m)

    if getattr(X, "is_chunked", False):
        row_sq = X.row_sq()
        if beta_loss != "frobenius":
            raise ValueError("a chunked (Dask) X supports only beta_loss='frobenius'")
    elif sp.issparse(X):
        row_sq = np.asarray(X.multiply(X).sum(1), dtype=np.float64).ravel()
    else:
        row_sq = np.einsum("ij,ij->i", X, X, dtype=np.float64)
    sqnorms = [row_sq.sum() if mk is None else row_sq[mk].sum() for mk in masks]

    kl = beta_loss == "kullback-leibler"
    P = None if kl else _Products(X, sparse_method)
    active = list(range(F))
    err0: dict[int, float] = {}
    prev: dict[int, float] = {}
    final_err = [np.nan] * F
    n_iter = [max_iter] * F
    converged = [False] * F
    traces = [[] if trace else None for _ in range(F)]
    nnz = X.nnz if sp.issparse(X) or getattr(X, "is_chunked", False) else n * m

    def stack():
        if kl:
            return None
        if chunked:
            from .chunked import DistributedState

            return DistributedState(X, active, ranks, Ws, Hs, masks, solver, nnz, hals_alpha, hals_delta)
        if solver == "hals":
            return _HALSState(active, ranks, Ws, Hs, masks, nnz, (n, m), hals_alpha, hals_delta)
        return _MUState(active, ranks, Ws, Hs)

    def release(state):
        # the stack holds the running factorizations' factors; their separate copies are
        # rebuilt by unstack() before they are read again (spots x K float32 less at peak)
        if state is not None:
            for i in state_items(state):
                Ws[i] = None

    def state_items(state):
        return [i for g in state.groups for i in g.idx]

    state = stack()
    release(state)
    t0 = time.perf_counter()
    # error at the starting point
    if kl:
        for i in active:
            _, wh = _kl_ratio(X, Ws[i], Hs[i])
            err0[i] = _kl_error(X, Ws[i], Hs[i], wh, masks[i])
    elif chunked:
        err0.update(state.errors0(sqnorms))
    else:
        W_all = state.W_all
        H_all = state.H_all if solver == "mu" else state.Ht_all.T
        XtW = P.xtw(W_all)
        for g in state.groups:
            W3, H3 = _views(W_all, H_all, g)
            WtW = W3.transpose(0, 2, 1) @ W3
            WtX = XtW[:, g.cols].T.reshape(len(g.idx), g.rank, -1)
            HHt = H3 @ H3.transpose(0, 2, 1)
            for j, i in enumerate(g.idx):
                e2 = sqnorms[i] - 2 * float(np.vdot(WtX[j].astype(np.float64), H3[j]))
                e2 += float(np.vdot(WtW[j].astype(np.float64), HHt[j]))
                err0[i] = np.sqrt(max(e2, 0.0))
    prev = dict(err0)
    prev2: dict[int, float] = {}  # the loss one check before prev ('extrapolated')
    if trace:
        for i in active:
            traces[i].append((0, 0.0, float(err0[i])))

    bar = progress_bar(total=max_iter, desc=f"{desc} ({F} fits)", enabled=progress)
    it = 0
    for it in range(1, max_iter + 1):
        check = it % check_every == 0 or it == max_iter
        if kl:
            errs = _mu_step_kl(X, Ws, Hs, active, update_H, check, masks)
        else:
            errs = state.step(P, update_H, check, sqnorms)
        bar.update(1)
        if not check:
            continue
        now = time.perf_counter() - t0
        done = []
        for i in active:
            e = errs[i]
            final_err[i] = e
            if trace:
                traces[i].append((it, now, float(e)))
            if (tol > 0 and _converged(prev2.get(i), prev[i], e, tol, stop_rule)) or \
                    (stop_at is not None and e <= stop_at[i]):
                done.append(i)
                converged[i] = True
                n_iter[i] = it
            prev2[i], prev[i] = prev[i], e
        if done:
            if not kl:
                state.unstack(Ws, Hs)
                state = None  # the old stack goes before the new one is made
            active = [i for i in active if i not in set(done)]
            if not active:
                break
            state = stack()
            release(state)
        bar.set_postfix(active=len(active))
    bar.close()
    if not kl and active:
        state.unstack(Ws, Hs)
    for i in active:
        n_iter[i] = it
    if chunked and gather_W:
        Ws = [w.gather() for w in Ws]
    if warn and tol > 0 and active:
        warnings.warn(
            f"{desc}: {len(active)} of {F} factorizations reached max_iter={max_iter} before the loss "
            f"stopped improving by tol={tol:g} per {check_every} iterations; raise max_iter",
            ConvergenceWarning, stacklevel=2,
        )

    return [
        NMFResult(
            W=Ws[i], H=Hs[i], error=float(final_err[i]), n_iter=n_iter[i], converged=converged[i],
            rank=ranks[i], seed=seeds[i], rows=masks[i], trace=traces[i],
        )
        for i in range(F)
    ]


def refit_usage(X, H, *, max_iter: int = 200, tol: float = 1e-4, beta_loss="frobenius", seed=0, progress=None,
                solver: str | None = None, gather_W: bool = True):
    """Non-negative usages W for fixed programs H (NNLS by ``solver``'s W updates).

    ``solver=None``: HALS for the Frobenius loss (exact coordinate minimization: on the
    default data it reaches a lower error than MU in a third of the time), MU for KL.
    """
    solver = solver or refit_solver(beta_loss)
    X = prepare_matrix(X)
    H = np.asarray(H, dtype=np.float32)
    n, k = X.shape[0], H.shape[0]
    rng = np.random.default_rng(seed)
    avg = np.sqrt(max(float(X.mean()), 0.0) / k)
    if getattr(X, "is_chunked", False):  # drawn block by block where the chunks are
        from .chunked import RandomW

        W0 = RandomW(rng, k, avg)
    else:
        W0 = (avg * np.abs(rng.standard_normal((n, k)))).astype(np.float32)
    (res,) = fit_batch(
        X, [k], init=[(W0, H)], update_H=False, max_iter=max_iter, tol=tol,
        beta_loss=beta_loss, progress=progress, desc="usage refit", solver=solver, gather_W=gather_W,
    )
    return res.W, res.error


class BatchedNMF(TransformerMixin, BaseEstimator):
    """Scikit-learn estimator over :func:`fit_batch`: ``n_replicates`` restarts at once.

    Parameters
    ----------
    n_components
        Rank of each factorization (an int, or a list of ranks to fit together).
    n_replicates
        Independent restarts per rank; seeds are derived from ``random_state``.
    solver
        A batched solver of :data:`tardis_exp.solvers.SOLVERS`: ``'mu'`` (multiplicative
        updates, the factorize stage's default) or ``'hals'`` (accelerated HALS, Frobenius only).
    beta_loss, max_iter, tol, check_every, stop_rule
        See :func:`fit_batch`; the defaults are the factorize stage's.
    random_state
        Seed of the seed sequence that gives every replicate its own seed.

    Attributes
    ----------
    components_ : ndarray (n_components, n_features)
        ``H`` of the best (lowest error) replicate of the first rank.
    reconstruction_err_ : float
        Its error.
    n_iter_ : int
        Its iterations.
    results_ : list of NMFResult
        Every factorization, replicates of the first rank first.
    """

    def __init__(self, n_components=_F.n_components, *, n_replicates=1, solver=_F.solver, beta_loss=_F.beta_loss,
                 max_iter=_F.max_iter, tol=_F.tol, check_every=_F.check_every, stop_rule=_F.stop_rule,
                 random_state=None, verbose=0):
        self.n_components = n_components
        self.n_replicates = n_replicates
        self.solver = solver
        self.beta_loss = beta_loss
        self.max_iter = max_iter
        self.tol = tol
        self.check_every = check_every
        self.stop_rule = stop_rule
        self.random_state = random_state
        self.verbose = verbose

    def _ranks(self):
        ranks = [self.n_components] if np.isscalar(self.n_components) else list(self.n_components)
        for r in ranks:
            if int(r) != r or r < 1:
                raise ValueError(f"n_components must be positive integers, got {self.n_components!r}")
        if int(self.n_replicates) < 1:
            raise ValueError(f"n_replicates must be >= 1, got {self.n_replicates}")
        return [int(r) for r in ranks]

    def fit_transform(self, X, y=None):
        """Fit every factorization to ``X`` (spots x genes, dense or CSR, non-negative).

        Returns ``W`` (spots x ``n_components``) of the best replicate of the first rank;
        ``y`` is ignored.
        """
        ranks = self._ranks()
        check_solver(self.solver, self.beta_loss, batched=True)
        X = prepare_matrix(X)
        if (X.data if sp.issparse(X) else X).min(initial=0) < 0:
            raise ValueError("NMF needs non-negative input; X has negative entries")
        specs = [r for r in ranks for _ in range(self.n_replicates)]
        seeds = derive_seeds(self.random_state, len(specs))
        self.results_ = fit_batch(
            X, specs, seeds, solver=self.solver, beta_loss=self.beta_loss, max_iter=self.max_iter, tol=self.tol,
            check_every=self.check_every, stop_rule=self.stop_rule, progress=bool(self.verbose) or None,
        )
        first = self.results_[: self.n_replicates]
        best = min(first, key=lambda r: r.error)
        self.components_ = best.H
        self.reconstruction_err_ = best.error
        self.n_iter_ = best.n_iter
        self.n_components_ = best.rank
        self.n_features_in_ = X.shape[1]
        return best.W

    def fit(self, X, y=None):
        """Fit as :meth:`fit_transform` does and return the estimator."""
        self.fit_transform(X)
        return self

    def transform(self, X):
        """Usages ``W`` of the spots of ``X`` with ``components_`` held fixed (:func:`refit_usage`)."""
        check_is_fitted(self, "components_")
        W, _ = refit_usage(X, self.components_, beta_loss=self.beta_loss, max_iter=self.max_iter, tol=self.tol,
                           solver=self.solver)
        return W

    def inverse_transform(self, W):
        """Reconstruction ``W @ components_`` (spots x genes)."""
        check_is_fitted(self, "components_")
        return W @ self.components_


def derive_seeds(random_state, n: int) -> list[int]:
    """``n`` independent 32-bit seeds from one ``random_state``."""
    ss = np.random.SeedSequence(None if random_state is None else int(random_state))
    return [int(s.generate_state(1)[0]) for s in ss.spawn(n)]


def warm_start_init(X, W, H, rank: int, seed=None, rows=None):
    """Starting point of rank ``rank`` from a fitted rank-k factorization ``(W, H)``.

    The fitted components are kept as they are; each of the ``rank - k`` new ones starts
    like :func:`_random_init` (``|N(0, 1)|`` scaled by ``sqrt(mean(X) / rank)``, seeded),
    its usage column zero outside ``rows``: the fit of rank ``rank`` starts from where
    rank k ended instead of from scratch.
    """
    W = np.asarray(W, dtype=np.float32)
    H = np.asarray(H, dtype=np.float32)
    k = W.shape[1]
    if rank < k:
        raise ValueError(f"warm start needs rank >= the fitted rank {k}, got {rank}")
    Wn, Hn = _random_init(X, rank, seed, rows, X.shape[0], X.shape[1])
    Wn[:, :k] = W
    Hn[:k] = H
    return Wn, Hn


def fit_rank_ladder(X, ranks: Sequence[int], n_replicates: int, random_state=None, *, warm_start: bool = True,
                    **kw) -> dict[int, list[NMFResult]]:
    """``n_replicates`` factorizations of every rank in ``ranks`` (cNMF's grid of K x replicates).

    ``warm_start=False``: every (rank, replicate) from its own random start, all in one
    :func:`fit_batch`. ``warm_start=True``: the ranks in increasing order, replicate ``r``
    of each rank starting from replicate ``r`` of the rank before it plus new components
    (:func:`warm_start_init`), one batch per rank -- fewer iterations per rank, but the
    ranks no longer share one batch, and the replicates of a rank inherit the local
    minima of the rank before (docs/solver.md, "Warm starts"). Seeds are derived from
    ``random_state`` as :class:`BatchedNMF` does, one per (rank, replicate) in both modes.
    Other keyword arguments go to :func:`fit_batch`.

    Returns ``{rank: [NMFResult, ...]}``.
    """
    ranks = sorted({int(r) for r in ranks})
    R = int(n_replicates)
    seeds = derive_seeds(random_state, len(ranks) * R)
    seed = {(k, r): seeds[i * R + r] for i, k in enumerate(ranks) for r in range(R)}
    if not warm_start:
        fits = fit_batch(X, [k for k in ranks for _ in range(R)], [seed[k, r] for k in ranks for r in range(R)], **kw)
        return {k: fits[i * R:(i + 1) * R] for i, k in enumerate(ranks)}
    X = prepare_matrix(X)
    out: dict[int, list[NMFResult]] = {}
    prev = None
    for k in ranks:
        init = None if prev is None else [warm_start_init(X, p.W, p.H, k, seed[k, r]) for r, p in enumerate(prev)]
        prev = out[k] = fit_batch(X, [k] * R, [seed[k, r] for r in range(R)], init=init, **kw)
    return out
