"""The sparse fat-product kernels against scipy, and CSR fits against dense fits."""

import numpy as np
import pytest
import scipy.sparse as sp

import float32_bounds as f32
from tardis_exp import _kernels
from tardis_exp._kernels import SparseProducts, csr_matmul
from tardis_exp.nmf import fit_batch, prepare_matrix


def _random_csr(n, m, density, seed, empty_rows=(), empty_cols=()):
    rng = np.random.default_rng(seed)
    X = sp.random(n, m, density=density, format="csr", random_state=rng, dtype=np.float32,
                  data_rvs=lambda k: rng.gamma(1.0, 1.0, k))
    X = X.tolil()
    for i in empty_rows:
        X[i, :] = 0
    for j in empty_cols:
        X[:, j] = 0
    return prepare_matrix(X.tocsr())


SHAPES = [
    (1, 1, 1.0, 0),  # single entry
    (50, 7, 0.3, 1),  # few columns
    (7, 60, 0.3, 2),  # few rows
    (200, 150, 0.02, 3),  # very sparse: many empty rows and columns
    (300, 120, 0.45, 4),  # the density of log-normalized HVGs
]


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["csr", "dense-chunks", "dense", "auto"])
@pytest.mark.parametrize("n,m,density,seed", SHAPES)
@pytest.mark.parametrize("K", [1, 13, 300])
def test_products_equal_scipy(method, n, m, density, seed, K):
    X = _random_csr(n, m, density, seed, empty_rows=[0] if n > 2 else [], empty_cols=[m - 1] if m > 2 else [])
    rng = np.random.default_rng(seed + 100)
    H = rng.random((K, m), dtype=np.float32)
    W = rng.random((n, K), dtype=np.float32)
    P = SparseProducts(X, method)
    a, b = P.xht(H), P.xtw(W)
    # float64 reference: the kernels are float32 with float32 accumulation, like scipy's
    ref_a = X.astype(np.float64) @ H.T.astype(np.float64)
    ref_b = X.T.astype(np.float64) @ W.astype(np.float64)
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert a.shape == (n, K) and b.shape == (m, K)
    # non-negative data: each entry within gamma(inner length) of the exact value, in any order
    np.testing.assert_allclose(a, ref_a, rtol=f32.gamma(m), atol=0)
    np.testing.assert_allclose(b, ref_b, rtol=f32.gamma(n), atol=0)
    if n > 2:
        assert np.all(a[0] == 0)  # empty row -> zero output row
    if m > 2:
        assert np.all(b[m - 1] == 0)  # empty column -> zero output row of X.T @ W
    # repeated calls reuse the chunk buffer / transposed copy without corrupting results
    np.testing.assert_array_equal(P.xht(H), a)
    np.testing.assert_array_equal(P.xtw(W), b)


@pytest.mark.numerics
def test_kernels_equal_scipy_and_ignore_thread_count():
    import numba

    from tardis_exp._kernels import csr_t_matmul

    X = _random_csr(403, 90, 0.2, 7, empty_rows=[0, 401])  # rows not a multiple of the unroll or blocks
    rng = np.random.default_rng(1)
    B, W = rng.random((90, 33), dtype=np.float32), rng.random((403, 33), dtype=np.float32)
    a, b = csr_matmul(X, B), csr_t_matmul(X, W)
    # both sides float32 (scipy's order vs ours): each within gamma(L) of the exact value
    np.testing.assert_allclose(a, np.asarray(X @ B), rtol=2.01 * f32.gamma(90), atol=0)
    np.testing.assert_allclose(b, np.asarray(X.T @ W), rtol=2.01 * f32.gamma(403), atol=0)
    # fixed summation order: the same bits on one thread as on all of them
    nt = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        np.testing.assert_array_equal(csr_matmul(X, B), a)
        np.testing.assert_array_equal(csr_t_matmul(X, W), b)
    finally:
        numba.set_num_threads(nt)


@pytest.mark.numerics
def test_dense_chunks_span_several_chunks(monkeypatch):
    monkeypatch.setattr(_kernels, "CHUNK_BYTES", 4 * 50 * 7)  # 7 rows of 50 genes per chunk
    X = _random_csr(103, 50, 0.4, 8, empty_rows=[5, 6, 100])
    P = SparseProducts(X, "dense-chunks")
    assert P.chunk == 7
    rng = np.random.default_rng(2)
    H, W = rng.random((11, 50), dtype=np.float32), rng.random((103, 11), dtype=np.float32)
    np.testing.assert_allclose(P.xht(H), X.toarray() @ H.T, rtol=2.01 * f32.gamma(50), atol=0)
    np.testing.assert_allclose(P.xtw(W), X.toarray().T @ W, rtol=2.01 * f32.gamma(103), atol=0)


def test_auto_method_depends_only_on_density_size_and_K(monkeypatch):
    dense_x = _random_csr(100, 80, 0.5, 9)
    sparse_x = _random_csr(100, 80, 0.05, 9)
    P, Q = SparseProducts(dense_x), SparseProducts(sparse_x)
    # dense enough and small: one dense copy for every product
    assert P.method == "dense" and P.method_for(1) == "dense" and P.method_for(10_000) == "dense"
    np.testing.assert_array_equal(P._dense, dense_x.toarray())
    assert Q.method_for(10_000) == "csr" and Q._dense is None
    # a dense copy over the size cap: chunks for fat products, the CSR kernel for skinny ones
    monkeypatch.setattr(_kernels, "DENSE_COPY_MAX_BYTES", 4 * 100 * 80 - 1)
    P = SparseProducts(dense_x)
    assert P._dense is None
    assert P.method_for(_kernels.DENSE_CHUNK_MIN_K) == "dense-chunks"
    assert P.method_for(_kernels.DENSE_CHUNK_MIN_K - 1) == "csr"
    with pytest.raises(ValueError, match="unknown sparse product method"):
        SparseProducts(dense_x, "gpu")


def _planted(seed=0):
    rng = np.random.default_rng(seed)
    W = rng.gamma(1.0, 1.0, (240, 4))
    H = rng.gamma(1.0, 1.0, (4, 90))
    X = (W @ H + rng.gamma(0.3, 0.1, (240, 90))).astype(np.float32)
    X[X < np.quantile(X, 0.6)] = 0  # 40% non-zero, with some empty rows below
    X[:3] = 0
    return X


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["csr", "dense-chunks", "dense", "scipy"])
def test_fit_batch_csr_equals_dense(method):
    Xd = _planted(1)
    Xs = sp.csr_matrix(Xd)
    rng = np.random.default_rng(3)
    ranks, seeds = [3, 4, 4, 6], [11, 12, 13, 14]
    masks = [None, rng.random(240) < 0.8, None, rng.random(240) < 0.6]
    # fixed iterations: a stopping threshold could flip between code paths on another kernel
    dense = fit_batch(Xd, ranks, seeds, row_masks=masks, max_iter=200, tol=0)
    csr = fit_batch(Xs, ranks, seeds, row_masks=masks, max_iter=200, tol=0, sparse_method=method)
    for d, s, mk in zip(dense, csr, masks):
        assert s.n_iter == d.n_iter == 200
        f32.assert_same_fit(s, d, Xd, mk, 200)
        if mk is not None:
            assert np.all(s.W[~mk] == 0)


@pytest.mark.numerics
def test_mu_update_equals_the_rule_in_float64_and_ignores_thread_count():
    import numba

    from tardis_exp._kernels import HALS_PARALLEL_MIN_WORK, mu_update
    from tardis_exp.nmf import EPS

    rng = np.random.default_rng(3)
    ranks = [3, 3, 5, 10]  # mixed ranks, as several rank groups stacked side by side
    starts = np.concatenate([[0], np.cumsum(ranks)[:-1]])
    n, K, kmax = 20_011, sum(ranks), max(ranks)  # rows not a multiple of the kernel's row block
    assert n * sum(r * r for r in ranks) >= HALS_PARALLEL_MIN_WORK  # the parallel kernel runs
    V = rng.random((n, K), dtype=np.float32)
    V[[0, 77]] = 0  # rows outside a mask: zero denominators, must stay zero
    A = rng.random((n, K), dtype=np.float32)
    G = np.zeros((len(ranks), kmax, kmax), dtype=np.float32)
    for f, (s, k) in enumerate(zip(starts, ranks)):
        H = rng.random((k, 50), dtype=np.float32)
        G[f, :k, :k] = H @ H.T
    # the rule in float64 from the same float32 inputs
    ref = V.astype(np.float64)
    for f, (s, k) in enumerate(zip(starts, ranks)):
        den = V[:, s:s + k].astype(np.float64) @ G[f, :k, :k].astype(np.float64)
        den[den == 0] = EPS
        ref[:, s:s + k] *= A[:, s:s + k] / den
    out = V.copy()
    mu_update(out, A, G, starts, ranks, EPS)
    # a float32 dot product of k non-negative terms, one division and one product
    np.testing.assert_allclose(out, ref, rtol=1.01 * f32.gamma(kmax + 3), atol=0)
    assert np.all(out[[0, 77]] == 0)
    nt = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        again = V.copy()
        mu_update(again, A, G, starts, ranks, EPS)
        np.testing.assert_array_equal(again, out)
    finally:
        numba.set_num_threads(nt)
