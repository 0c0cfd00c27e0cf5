"""The batched solver against scikit-learn's reference and against itself run one at a time."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.decomposition import NMF

from tardis_exp.nmf import BatchedNMF, _random_init, fit_batch, prepare_matrix


def _data(sparse, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.gamma(1.0, 1.0, (300, 4))
    H = rng.gamma(1.0, 1.0, (4, 120))
    X = (W @ H + rng.gamma(0.3, 0.1, (300, 120))).astype(np.float32)
    if sparse:
        X[X < np.quantile(X, 0.5)] = 0
        return sp.csr_matrix(X)
    return X


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("loss", ["frobenius", "kullback-leibler"])
def test_matches_sklearn_mu_from_same_start(sparse, loss):
    X = prepare_matrix(_data(sparse))
    W0, H0 = _random_init(X, 5, 7, None, *X.shape)
    ref = NMF(5, solver="mu", beta_loss=loss, init="custom", max_iter=60, tol=0)
    Wr = ref.fit_transform(X, W=W0.copy(), H=H0.copy())
    (res,) = fit_batch(X, [5], init=[(W0, H0)], beta_loss=loss, max_iter=60, tol=0)
    np.testing.assert_allclose(res.W, Wr, rtol=2e-3, atol=1e-4 * Wr.max())
    np.testing.assert_allclose(res.H, ref.components_, rtol=2e-3, atol=1e-4 * ref.components_.max())
    assert res.error == pytest.approx(ref.reconstruction_err_, rel=1e-3)


@pytest.mark.parametrize("sparse", [False, True])
def test_batch_equals_one_at_a_time(sparse):
    X = _data(sparse, seed=3)
    ranks, seeds = [3, 5, 5, 8], [1, 2, 3, 4]
    rng = np.random.default_rng(0)
    masks = [None, rng.random(300) < 0.8, None, rng.random(300) < 0.7]
    batch = fit_batch(X, ranks, seeds, row_masks=masks, max_iter=300, tol=1e-4)
    for i in range(4):
        (single,) = fit_batch(X, [ranks[i]], [seeds[i]], row_masks=[masks[i]], max_iter=300, tol=1e-4)
        assert single.n_iter == batch[i].n_iter
        np.testing.assert_allclose(single.H, batch[i].H, rtol=1e-3, atol=1e-5)
        assert single.error == pytest.approx(batch[i].error, rel=1e-4)


def test_row_mask_fits_only_masked_rows():
    X = _data(False, seed=5)
    mask = np.zeros(300, bool)
    mask[:200] = True
    (res,) = fit_batch(X, [4], [0], row_masks=[mask], max_iter=400)
    assert np.all(res.W[~mask] == 0)
    direct = np.linalg.norm(X[mask] - res.W[mask] @ res.H)
    assert res.error == pytest.approx(direct, rel=1e-3)
    # the same fit on the sliced matrix gives the same factors
    (sub,) = fit_batch(X[mask], [4], [0], max_iter=400)
    assert sub.error == pytest.approx(res.error, rel=1e-3)


def test_per_factorization_convergence_and_recovery():
    X = _data(False, seed=9)
    res = fit_batch(X, [4, 4, 12], [1, 2, 3], max_iter=2000, tol=1e-5)
    assert all(r.converged for r in res)
    # the rank of the generating process explains most of X; errors are below the rank-0 baseline
    base = np.linalg.norm(X)
    assert all(r.error < 0.2 * base for r in res)
    assert res[2].error < res[0].error  # more components fit at least as well
    assert all(r.n_iter < 2000 for r in res)  # each stopped on its own rule, not at max_iter
    assert all(r.W.min() >= 0 and r.H.min() >= 0 for r in res)


def test_estimator_api_and_seeds():
    X = _data(True, seed=2)
    m = BatchedNMF(n_components=4, n_replicates=3, random_state=0, max_iter=500).fit(X)
    assert m.components_.shape == (4, 120)
    assert len(m.results_) == 3 and len({r.seed for r in m.results_}) == 3
    assert m.reconstruction_err_ == min(r.error for r in m.results_)
    W = m.transform(X)
    assert W.shape == (300, 4) and W.min() >= 0
    again = BatchedNMF(n_components=4, n_replicates=3, random_state=0, max_iter=500).fit(X)
    np.testing.assert_array_equal(again.components_, m.components_)
    with pytest.raises(ValueError, match="non-negative"):
        BatchedNMF(2).fit(-np.ones((5, 4)))
