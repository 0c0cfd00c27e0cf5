"""Batched accelerated HALS against a straightforward one-at-a-time numpy reference."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning

import float32_bounds as f32
from tardis_exp.nmf import (HALS_ALPHA, HALS_DELTA, HALS_SWEEP_COST, BatchedNMF, _random_init, fit_batch,
                            fit_rank_ladder, prepare_matrix, warm_start_init)

EPS32 = np.finfo(np.float32).eps


def _data(n=240, m=90, k=4, seed=0, sparse=False):
    rng = np.random.default_rng(seed)
    W = rng.gamma(1.0, 1.0, (n, k))
    H = rng.gamma(1.0, 1.0, (k, m))
    X = (W @ H + rng.gamma(0.5, 1.0, (n, m))).astype(np.float32)
    if sparse:
        X[X < np.quantile(X, 0.5)] = 0
        return sp.csr_matrix(X)
    return X


def _sweeps(V, A, G, max_inner, delta, rows):
    """Gillis-Glineur inner loop, one column at a time, the textbook way."""
    eps0 = eps = None
    for t in range(max_inner):
        change = 0.0
        for j in range(V.shape[1]):
            if G[j, j] <= 0:
                continue
            old = V[rows, j].copy()
            V[rows, j] = np.maximum(old + (A[rows, j] - V[rows] @ G[:, j]) / G[j, j], 0)
            change += float(np.sum((V[rows, j].astype(np.float64) - old) ** 2))
        if t == 0:
            eps0 = change
        eps = change
        if eps0 == 0 or eps < delta**2 * eps0:
            break


def reference_hals(X, W, H, n_iter, mask=None, alpha=HALS_ALPHA, delta=HALS_DELTA):
    """Accelerated HALS (Gillis & Glineur 2012) for one factorization, float32, dense."""
    X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)
    W, Ht = W.copy(), np.ascontiguousarray(H.T)
    n, m = X.shape
    k = W.shape[1]
    nnz = X.size  # dense X: the product runs over every entry, masked rows too
    c = HALS_SWEEP_COST
    inner_w = int(np.floor(1 + alpha * (1 + (nnz * k + m * k * k) / (c * n * k * k))))
    inner_h = int(np.floor(1 + alpha * (1 + (nnz * k + n * k * k) / (c * m * k * k))))
    rows = slice(None) if mask is None else mask
    for _ in range(n_iter):
        _sweeps(W, X @ Ht, Ht.T @ Ht, inner_w, delta, rows)
        _sweeps(Ht, X.T @ W, W.T @ W, inner_h, delta, slice(None))
    return W, Ht.T


def _tol(X, n_iter):
    # float32 rounding in every product, accumulated over the iterations (HALS contracts)
    return 50 * EPS32 * np.sqrt(X.shape[1]) * n_iter


@pytest.mark.numerics
@pytest.mark.parametrize("alpha", [0.0, HALS_ALPHA])
def test_equals_one_at_a_time_reference(alpha):
    X = prepare_matrix(_data(seed=1))
    W0, H0 = _random_init(X, 5, 7, None, *X.shape)
    n_iter = 15
    Wr, Hr = reference_hals(X, W0, H0, n_iter, alpha=alpha)
    (res,) = fit_batch(X, [5], init=[(W0, H0)], solver="hals", max_iter=n_iter, tol=0, hals_alpha=alpha)
    rtol = _tol(X, n_iter)
    np.testing.assert_allclose(res.W, Wr, rtol=rtol, atol=rtol * Wr.max())
    np.testing.assert_allclose(res.H, Hr, rtol=rtol, atol=rtol * Hr.max())
    direct = np.linalg.norm(X.astype(np.float64) - Wr.astype(np.float64) @ Hr)
    # the reported error is computed from the fat products; it matches the direct one
    assert res.error == pytest.approx(direct, rel=1e-4)


@pytest.mark.numerics
def test_one_sweep_is_sklearn_coordinate_descent():
    # alpha=0: one sweep of W then of H per iteration = scikit-learn's solver='cd'
    X = prepare_matrix(_data(seed=2))
    W0, H0 = _random_init(X, 4, 3, None, *X.shape)
    ref = NMF(4, solver="cd", init="custom", max_iter=20, tol=0)
    Wr = ref.fit_transform(X, W=W0.copy(), H=H0.copy())
    (res,) = fit_batch(X, [4], init=[(W0, H0)], solver="hals", max_iter=20, tol=0, hals_alpha=0)
    rtol = _tol(X, 20)
    np.testing.assert_allclose(res.W, Wr, rtol=rtol, atol=rtol * Wr.max())
    np.testing.assert_allclose(res.H, ref.components_, rtol=rtol, atol=rtol * ref.components_.max())


@pytest.mark.numerics
def test_masked_reference():
    X = prepare_matrix(_data(seed=3))
    mask = np.random.default_rng(0).random(X.shape[0]) < 0.7
    W0, H0 = _random_init(X, 3, 5, mask, *X.shape)
    Wr, Hr = reference_hals(X, W0, H0, 10, mask=mask)
    (res,) = fit_batch(X, [3], init=[(W0, H0)], row_masks=[mask], solver="hals", max_iter=10, tol=0)
    assert np.all(res.W[~mask] == 0)
    rtol = _tol(X, 10)
    np.testing.assert_allclose(res.H, Hr, rtol=rtol, atol=rtol * Hr.max())
    np.testing.assert_allclose(res.W, Wr, rtol=rtol, atol=rtol * Wr.max())
    assert res.error == pytest.approx(np.linalg.norm(X[mask] - res.W[mask] @ res.H), rel=1e-4)


@pytest.mark.numerics
@pytest.mark.parametrize("sparse", [False, True])
def test_batch_equals_one_at_a_time(sparse):
    X = _data(seed=4, sparse=sparse)
    ranks, seeds = [3, 5, 5, 8], [1, 2, 3, 4]
    rng = np.random.default_rng(0)
    masks = [None, rng.random(240) < 0.8, None, rng.random(240) < 0.7]
    batch = fit_batch(X, ranks, seeds, row_masks=masks, solver="hals", max_iter=40, tol=0)
    for i in range(4):
        (one,) = fit_batch(X, [ranks[i]], [seeds[i]], row_masks=[masks[i]], solver="hals", max_iter=40, tol=0)
        rtol = _tol(X, 40)
        np.testing.assert_allclose(one.H, batch[i].H, rtol=rtol, atol=rtol * one.H.max())
        np.testing.assert_allclose(one.W, batch[i].W, rtol=rtol, atol=rtol * one.W.max())
        assert one.error == pytest.approx(batch[i].error, rel=1e-5)


@pytest.mark.numerics
def test_per_factorization_stopping_in_a_batch():
    X = _data(seed=5)
    batch = fit_batch(X, [2, 4, 9], [1, 2, 3], solver="hals", max_iter=3000, tol=1e-4)
    assert all(r.converged and r.n_iter < 3000 for r in batch)
    assert len({r.n_iter for r in batch}) > 1  # each left the batch on its own
    for r in batch:
        (one,) = fit_batch(X, [r.rank], [r.seed], solver="hals", max_iter=3000, tol=1e-4)
        # float32 rounding (the batch's products are wider) can move a borderline stop by one check
        assert abs(one.n_iter - r.n_iter) <= 10
        assert one.error == pytest.approx(r.error, rel=1e-4)


@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_loss_decreases_monotonically(solver):
    X = _data(seed=6)
    (res,) = fit_batch(X, [6], [0], solver=solver, max_iter=150, tol=0, check_every=1, trace=True)
    err = np.array([e for _, _, e in res.trace])
    assert len(err) == 151
    # the trace's losses come from the fat products; their float32 noise is eps * ||X||^2 / loss^2
    noise = 20 * EPS32 * float(np.linalg.norm(X)) ** 2 / err[-1] ** 2
    assert np.all(np.diff(err) <= noise * err[1:])
    assert err[-1] < 0.5 * err[0]
    # and the true loss of the returned factors, in float64, along fits of growing length
    direct = []
    for n_iter in (1, 3, 10, 30):
        (r,) = fit_batch(X, [6], [0], solver=solver, max_iter=n_iter, tol=0)
        direct.append(np.linalg.norm(X.astype(np.float64) - r.W.astype(np.float64) @ r.H))
    assert np.all(np.diff(direct) < 0)


def _thread_data():
    X = _data(n=400, m=150, seed=7, sparse=True)
    return X, [None, np.random.default_rng(1).random(400) < 0.8]


@pytest.mark.numerics
def test_our_kernels_ignore_the_numba_thread_count(monkeypatch):
    """Our sweeps never sum across rows: the same bits on 1 and 2 numba threads, CSR and
    dense. BLAS pinned to one thread, so only our kernels' thread count varies (the BLAS's
    is not bitwise: test_dense_path_across_blas_thread_counts_within_the_float32_bound)."""
    import numba
    from threadpoolctl import threadpool_limits

    from tardis_exp import _kernels

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here (NUMBA_NUM_THREADS=1): nothing to compare")
    monkeypatch.setattr(_kernels, "HALS_PARALLEL_MIN_WORK", 0)  # the parallel sweep even on small data
    X, masks = _thread_data()

    def run(Y, **kw):
        return fit_batch(Y, [4, 6], [1, 2], row_masks=masks, solver="hals", max_iter=30, tol=0, **kw)

    nt = numba.get_num_threads()
    out = []
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            for threads in (1, 2):
                numba.set_num_threads(threads)
                out.append(run(X, sparse_method="csr") + run(X.toarray()))
            monkeypatch.setattr(_kernels, "HALS_PARALLEL_MIN_WORK", 10**18)
            serial = run(X, sparse_method="csr") + run(X.toarray())
    finally:
        numba.set_num_threads(nt)
    # and the serial sweep (small problems) gives the same bits as the parallel one
    for a, b, c in zip(out[0], out[1], serial):
        for other in (b, c):
            np.testing.assert_array_equal(a.W, other.W)
            np.testing.assert_array_equal(a.H, other.H)
            assert a.error == other.error


@pytest.mark.numerics
@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_dense_path_across_blas_thread_counts_within_the_float32_bound(solver):
    """A BLAS splits a product over its threads and may sum it in another order (OpenBLAS's
    Haswell kernels do at 2 threads; 78.6% of W's entries moved, up to 2.5e-5): the dense
    path is not bitwise across BLAS thread counts, but within the float32 bound."""
    import numba
    from threadpoolctl import threadpool_info, threadpool_limits

    X, masks = _thread_data()
    X = X.toarray()
    # one sweep per product (hals_alpha=0): no inner-loop threshold a rounding error could flip
    kw = dict(solver=solver, max_iter=30, tol=0, **({"hals_alpha": 0} if solver == "hals" else {}))
    nt = numba.get_num_threads()
    out = []
    try:
        numba.set_num_threads(1)
        for threads in (1, 2):
            with threadpool_limits(limits=threads, user_api="blas"):
                assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == {threads}
                out.append(fit_batch(X, [4, 6], [1, 2], row_masks=masks, **kw))
    finally:
        numba.set_num_threads(nt)
    for a, b, mk in zip(*out, masks):
        assert a.n_iter == b.n_iter == 30
        if solver == "mu":
            f32.assert_same_fit(a, b, X, mk, 30)
            continue
        rtol = f32.hals_trajectory_rtol(X, b.W, b.H, 30, mk)
        f32.close(a.W, b.W, rtol)
        f32.close(a.H, b.H, rtol)
        assert f32.error64(X, a.W, a.H, mk) == pytest.approx(f32.error64(X, b.W, b.H, mk), rel=rtol)
        for r in (a, b):
            assert abs(r.error - f32.error64(X, r.W, r.H, mk)) <= f32.reported_error_bound(X, r.W, r.H, mk)


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["csr", "dense-chunks", "dense"])
def test_dense_and_csr_agree(method):
    Xs = _data(seed=8, sparse=True)
    Xd = Xs.toarray()
    masks = [None, np.random.default_rng(2).random(240) < 0.6]
    # one sweep per product: no data-dependent inner-loop decision a rounding difference could flip
    kw = dict(solver="hals", max_iter=30, tol=0, hals_alpha=0)
    dense = fit_batch(Xd, [3, 5], [4, 5], row_masks=masks, **kw)
    csr = fit_batch(Xs, [3, 5], [4, 5], row_masks=masks, sparse_method=method, **kw)
    rtol = _tol(Xd, 30)
    for d, s in zip(dense, csr):
        np.testing.assert_allclose(s.H, d.H, rtol=rtol, atol=rtol * d.H.max())
        np.testing.assert_allclose(s.W, d.W, rtol=rtol, atol=rtol * d.W.max())
        assert s.error == pytest.approx(d.error, rel=1e-5)
    # with the inner repetitions, run to convergence: the same losses
    dense = fit_batch(Xd, [3, 5], [4, 5], row_masks=masks, solver="hals", tol=1e-5)
    csr = fit_batch(Xs, [3, 5], [4, 5], row_masks=masks, solver="hals", tol=1e-5, sparse_method=method)
    for d, s in zip(dense, csr):
        assert d.converged and s.converged
        assert s.error == pytest.approx(d.error, rel=1e-4)


def test_convergence_warning_at_max_iter():
    X = _data(seed=9)
    with pytest.warns(ConvergenceWarning, match="max_iter=5"):
        (r,) = fit_batch(X, [4], [0], solver="hals", max_iter=5, tol=1e-6)
    assert not r.converged and r.n_iter == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        (r,) = fit_batch(X, [4], [0], solver="hals", max_iter=2000, tol=1e-4)
    assert r.converged and r.n_iter < 2000


def test_hals_reaches_a_lower_loss_than_mu_in_the_same_iterations():
    X = _data(seed=10)
    (h,) = fit_batch(X, [4], [3], solver="hals", max_iter=50, tol=0)
    (mu,) = fit_batch(X, [4], [3], solver="mu", max_iter=50, tol=0)
    (best,) = fit_batch(X, [4], [3], solver="hals", max_iter=3000, tol=1e-7)
    assert h.error < mu.error
    assert h.error - best.error < 0.1 * (mu.error - best.error)


def test_estimator_with_hals():
    X = _data(seed=11, sparse=True)
    m = BatchedNMF(n_components=4, n_replicates=3, solver="hals", random_state=0).fit(X)
    assert m.components_.shape == (4, 90) and len(m.results_) == 3
    assert m.reconstruction_err_ == min(r.error for r in m.results_)
    assert m.n_iter_ < m.max_iter
    again = BatchedNMF(n_components=4, n_replicates=3, solver="hals", random_state=0).fit(X)
    np.testing.assert_array_equal(again.components_, m.components_)
    W = m.transform(X)
    assert W.shape == (240, 4) and W.min() >= 0
    with pytest.raises(ValueError, match="supports only beta_loss=frobenius"):
        BatchedNMF(2, solver="hals", beta_loss="kullback-leibler").fit(X)
    with pytest.raises(ValueError, match="unknown solver"):
        BatchedNMF(2, solver="als").fit(X)


def test_factorize_stage_with_hals(synthetic_small):
    from tardis_exp import factorize, preprocess
    from tardis_exp.errors import ConfigError
    from tardis_exp.factorize import check_params

    a = preprocess(synthetic_small, n_top_genes=300)
    factorize(a, n_components=4, n_replicates=3, random_state=0, solver="hals")
    nmf = a.uns["nmf"]
    assert nmf["params"]["solver"] == "hals" and nmf["converged"].all()
    assert len(nmf["errors"]) == 3 and (nmf["n_iter"] < 1000).all()
    W, H = a.obsm["X_nmf"], a.uns["X_nmf_components"]
    assert np.linalg.norm(a.X.toarray() - W @ H) == pytest.approx(nmf["errors"].min(), rel=1e-4)
    with pytest.raises(ConfigError, match="factorize.solver=hals supports only"):
        check_params(n_components=3, solver="hals", beta_loss="kullback-leibler")
    # factorize.stop_rule reaches fit_batch: the extrapolated rule runs the same replicates further
    b = preprocess(synthetic_small, n_top_genes=300)
    factorize(b, n_components=4, n_replicates=3, random_state=0, solver="hals", stop_rule="extrapolated")
    assert b.uns["nmf"]["params"]["stop_rule"] == "extrapolated"
    assert (b.uns["nmf"]["n_iter"] >= nmf["n_iter"]).all()
    assert (b.uns["nmf"]["errors"] <= nmf["errors"] * (1 + 1e-6)).all()
    with pytest.raises(ConfigError, match="factorize.stop_rule"):
        check_params(n_components=3, stop_rule="window")


@pytest.mark.numerics
def test_stop_at_target_loss():
    # stop_at (benchmarks: time to a target loss) stops each factorization at the first
    # check at or below its own target, and only then
    X = _data(seed=8)
    full = fit_batch(X, [4, 4], [1, 2], solver="hals", max_iter=60, tol=0, check_every=1, trace=True)
    # midway between two iterations' losses: float32 rounding (the batch narrows once the
    # first one stops) cannot move the crossing
    targets = [(f.trace[t - 1][2] + f.trace[t][2]) / 2 for f, t in zip(full, (6, 12))]
    stopped = fit_batch(X, [4, 4], [1, 2], solver="hals", max_iter=60, tol=0, check_every=1, stop_at=targets)
    for f, s, t in zip(full, stopped, targets):
        first = next(it for it, _, e in f.trace if e <= t)
        assert s.converged and s.n_iter == first < 60
        assert s.error <= t


def test_warm_start_init_keeps_the_fit_and_adds_components():
    X = _data(seed=9)
    (r,) = fit_batch(X, [3], [0], solver="hals", max_iter=50, tol=0)
    W, H = warm_start_init(X, r.W, r.H, 5, seed=1)
    assert W.shape == (X.shape[0], 5) and H.shape == (5, X.shape[1])
    np.testing.assert_array_equal(W[:, :3], r.W)
    np.testing.assert_array_equal(H[:3], r.H)
    assert (W[:, 3:] > 0).all() and (H[3:] > 0).all()
    with pytest.raises(ValueError, match="rank >= the fitted rank 3"):
        warm_start_init(X, r.W, r.H, 2)


def test_rank_ladder_warm_start_fewer_iterations_same_loss():
    # planted rank 4: above it, the new components start from a converged rank-k fit and
    # need far fewer iterations than a random start (measured: ~2x fewer in total)
    X = _data(seed=0, k=4)
    kw = dict(solver="hals", tol=1e-5, max_iter=3000)
    warm = fit_rank_ladder(X, [3, 4, 5, 6], 3, 0, warm_start=True, **kw)
    cold = fit_rank_ladder(X, [3, 4, 5, 6], 3, 0, warm_start=False, **kw)
    assert sorted(warm) == sorted(cold) == [3, 4, 5, 6]
    for k in warm:
        assert [f.rank for f in warm[k]] == [k] * 3 and all(f.converged for f in warm[k])
        # the same seeds per (rank, replicate) in both modes
        assert [f.seed for f in warm[k]] == [f.seed for f in cold[k]]
        assert min(f.error for f in warm[k]) <= min(f.error for f in cold[k]) * (1 + 1e-3)
    # the lowest rank starts from the same random points: the same fits
    for w, c in zip(warm[3], cold[3]):
        assert w.error == pytest.approx(c.error, rel=1e-4)
    its = lambda fits: sum(f.n_iter for k in (5, 6) for f in fits[k])  # noqa: E731
    assert its(warm) < 0.8 * its(cold)


def test_extrapolated_stop_rule_on_a_geometric_loss():
    # a loss converging geometrically to 100 (rate 0.99 per iteration): one window's change
    # looks small long before the loss is near its limit; the extrapolated rule knows the rest
    from tardis_exp.nmf import _converged

    loss = lambda t: 100.0 * (1 + 0.01 * 0.99**t)  # noqa: E731
    c, tol = 10, 1e-4

    def stop(rule):
        for t in range(2 * c, 5000, c):
            if _converged(loss(t - 2 * c), loss(t - c), loss(t), tol, rule):
                return t, loss(t) / 100 - 1

    (t_change, gap_change), (t_extra, gap_extra) = stop("change"), stop("extrapolated")
    assert gap_change > 5 * tol  # the change rule stops far from the limit
    assert gap_extra < tol and t_extra > t_change
    assert not _converged(None, 101.0, 100.9999, tol, "extrapolated")  # needs two windows


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_extrapolated_stop_rule_stops_nearer_the_converged_loss(solver):
    X = prepare_matrix(_data(seed=6))
    seeds = [11, 12, 13]
    kw = dict(solver=solver, check_every=10, max_iter=5000, warn=False)
    long = fit_batch(X, [4] * 3, seeds, tol=1e-9, **kw)  # converged reference
    change = fit_batch(X, [4] * 3, seeds, tol=1e-4, **kw)
    extra = fit_batch(X, [4] * 3, seeds, tol=1e-4, stop_rule="extrapolated", **kw)
    for lo, c, e in zip(long, change, extra):
        # the same iterates: the extrapolated rule only stops later, never earlier
        assert e.n_iter >= c.n_iter and e.error <= c.error * (1 + 1e-6)
        gap_c, gap_e = c.error / lo.error - 1, e.error / lo.error - 1
        if solver == "mu":  # creeps: 'change' stops 8-36x tol above the limit here
            assert gap_c > 3e-4 and gap_e < 0.5 * gap_c
        else:  # within tol of the converged loss
            assert gap_e < 1e-4


def test_stop_rule_is_checked():
    with pytest.raises(ValueError, match="stop_rule"):
        fit_batch(_data(), [3], [0], stop_rule="window")


def test_random_init_sparse_equals_dense():
    # the CSR path takes mean(X) from X.data without scipy's copying X.mean()
    X = prepare_matrix(_data(seed=7, sparse=True))
    Ws, Hs = _random_init(X, 4, 9, None, *X.shape)
    Wd, Hd = _random_init(prepare_matrix(X.toarray()), 4, 9, None, *X.shape)
    np.testing.assert_allclose(Ws, Wd, rtol=1e-6)
    np.testing.assert_allclose(Hs, Hd, rtol=1e-6)


def test_estimator_passes_the_stop_rule():
    X = _data(seed=8)
    kw = dict(n_replicates=2, solver="mu", tol=1e-4, random_state=0, max_iter=3000)
    change = BatchedNMF(3, **kw).fit(X)
    extra = BatchedNMF(3, stop_rule="extrapolated", **kw).fit(X)
    it_c, it_e = [r.n_iter for r in change.results_], [r.n_iter for r in extra.results_]
    assert all(e >= c for c, e in zip(it_c, it_e)) and sum(it_e) > sum(it_c)
    with pytest.raises(ValueError, match="stop_rule"):
        BatchedNMF(3, stop_rule="window").fit(X)
