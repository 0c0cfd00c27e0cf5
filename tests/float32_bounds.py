"""Tolerances of the numerical tests, derived from float32 arithmetic (not tuned on a machine).

Any BLAS kernel (OpenBLAS SkylakeX, Haswell, Zen, ... ; MKL) may sum a dot product in
another order and with other blocking, so tests never compare float32 results bit for
bit across code paths; they compare within these bounds (Higham, *Accuracy and Stability
of Numerical Algorithms*, 2nd ed., section 3.1):

* A dot product of length L summed in float32 in any order has
  ``|fl(x.y) - x.y| <= gamma(L) |x|.|y|``, ``gamma(L) = L u / (1 - L u)``, ``u = 2**-24``.
  For non-negative data (all of ours) ``|x|.|y| = x.y``: a relative bound per entry.
* One multiplicative-update step makes products of inner length ``n`` (spots), ``m``
  (genes) and ``k`` (rank) and a handful of elementwise operations, so two code paths
  that do the same step in different orders differ by at most
  ``step_gamma = gamma(2 max(n, m) + k + 4)`` relative, per entry. Over ``T``
  iterations the differences are rounding errors of both signs; they add up like a
  random walk, ``sqrt(T) * step_gamma`` (the multiplicative updates contract towards the
  fixed point rather than amplify). This is the bound the solver tests use for factors
  and for the Frobenius error recomputed in float64.
* One HALS step (a sweep per half-step, ``hals_alpha=0``) makes the same fat products and
  Gram matrices, then updates a column of ``V`` (``W`` or ``H^T``) as
  ``v_j <- max(0, (a_j - sum_{l != j} V_l g_lj) / g_jj)`` (``a = X H^T`` or ``X^T W``,
  ``g`` the Gram matrix of the other factor). The subtraction cancels: with every term
  within ``step_gamma`` of exact, the new entry's absolute error is at most
  ``step_gamma (a_ij + (V g)_ij) / g_jj``, i.e. ``step_gamma * kappa`` relative to the
  largest entry of ``V``, with ``kappa = max_ij (a_ij + (V g)_ij) / (g_jj max V)`` (>= 1:
  at the fixed point ``a_ij - sum_{l != j} ... = v_ij g_jj``). A sweep is one Gauss-Seidel
  pass on a positive-definite k x k system, a contraction in the ``g``-norm, so earlier
  errors are damped, and they add up like the multiplicative updates':
  ``sqrt(T) * step_gamma * kappa`` (:func:`hals_trajectory_rtol`, ``kappa`` from the
  factors, as the end of the trajectory has them). With inner repetitions
  (``hals_alpha > 0``) the number of sweeps is a threshold test a rounding error can flip:
  tests that compare code paths run one sweep.
* The solver reports ``||X - WH||`` from ``||X||^2 - 2<W^T X, H> + <W^T W, H H^T>``,
  made of float32 products; the subtraction cancels, so its error is relative to
  ``||X||^2``, not to the (much smaller) squared error: see :func:`reported_error_bound`.
"""

from __future__ import annotations

import numpy as np

U = 2.0 ** -24  # unit roundoff of float32


def gamma(length: int) -> float:
    """Relative error bound of a float32 dot product of non-negative terms of this length."""
    lu = max(int(length), 1) * U
    return lu / (1 - lu)


def step_gamma(n: int, m: int, k: int) -> float:
    """Per-entry relative bound of one multiplicative-update step (products n, m and k long)."""
    return gamma(2 * max(n, m) + k + 4)


def trajectory_rtol(n_iter: int, n: int, m: int, k: int) -> float:
    """Relative difference of two float32 runs of the same ``n_iter`` updates."""
    return float(np.sqrt(max(n_iter, 1)) * step_gamma(n, m, k))


def hals_trajectory_rtol(X, W, H, n_iter: int, rows=None) -> float:
    """Relative difference (to the largest entry) of two float32 runs of the same ``n_iter``
    one-sweep HALS iterations, ``sqrt(T) * step_gamma * kappa`` (module docstring)."""
    Xd, Wd, Hd = dense(X), np.asarray(W, np.float64), np.asarray(H, np.float64)
    if rows is not None:
        Xd, Wd = Xd[rows], Wd[rows]
    kappa = 1.0
    # W's columns from X H^T and H H^T; H^T's columns from X^T W and W^T W
    for V, A, G in ((Wd, Xd @ Hd.T, Hd @ Hd.T), (Hd.T, Xd.T @ Wd, Wd.T @ Wd)):
        d = np.diag(G)
        live = d > 0
        top = float(V.max())
        if top > 0 and live.any():
            kappa = max(kappa, float(((A + V @ G)[:, live] / d[live]).max()) / top)
    n, m = X.shape
    return float(np.sqrt(max(n_iter, 1)) * step_gamma(n, m, W.shape[1]) * kappa)


def dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)


def error64(X, W, H, rows=None) -> float:
    """||X - W H||_F of the returned factors, computed in float64."""
    Xd, Wd = dense(X), np.asarray(W, np.float64)
    if rows is not None:
        Xd, Wd = Xd[rows], Wd[rows]
    return float(np.linalg.norm(Xd - Wd @ np.asarray(H, np.float64)))


def reported_error_bound(X, W, H, rows=None) -> float:
    """Absolute bound on |reported error - error64| for the solver's expansion formula.

    ``W^T X`` (length n) and ``W^T W`` (length n) and ``H H^T`` (length m) are float32
    products; the inner products over them and ``||X||^2`` are float64. With
    ``c = <W^T X, H>`` and ``q = <W^T W, H H^T>``:
    ``|e_rep^2 - e^2| <= 2 gamma(n) c + (gamma(n) + gamma(m) + gamma(n) gamma(m)) q``,
    and ``|e_rep - e| = |e_rep^2 - e^2| / (e_rep + e) <= that / e``.
    """
    Xd, Wd, Hd = dense(X), np.asarray(W, np.float64), np.asarray(H, np.float64)
    if rows is not None:
        Xd, Wd = Xd[rows], Wd[rows]
    n, m = X.shape
    c = float(np.vdot(Wd.T @ Xd, Hd))
    q = float(np.vdot(Wd.T @ Wd, Hd @ Hd.T))
    gn, gm = gamma(n), gamma(m)
    d2 = 2 * gn * c + (gn + gm + gn * gm) * q
    e = error64(X, W, H, rows)
    return d2 / max(e, np.sqrt(d2))


def close(a, b, rtol: float) -> None:
    """max |a - b| within rtol of the largest entry (entries near 0 carry no relative meaning)."""
    d = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
    top = float(np.abs(np.asarray(b, np.float64)).max())
    assert d <= rtol * top, f"max diff {d:.3g} > {rtol:.3g} x {top:.3g}"


def assert_same_fit(a, b, X, rows, n_iter: int) -> None:
    """Two runs of the same updates: factors and float64 error within the float32 bound, and
    each reported error equal to the error of its factors within its own precision."""
    import pytest

    rtol = trajectory_rtol(n_iter, *X.shape, a.rank)
    close(a.H, b.H, rtol)
    close(a.W, b.W, rtol)
    assert error64(X, a.W, a.H, rows) == pytest.approx(error64(X, b.W, b.H, rows), rel=rtol)
    for r in (a, b):
        assert abs(r.error - error64(X, r.W, r.H, rows)) <= reported_error_bound(X, r.W, r.H, rows)
