"""The batched solver against scikit-learn's reference and against itself run one at a time."""

import json
import os
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
import pytest
import scipy.sparse as sp
from sklearn.decomposition import NMF

import float32_bounds as f32
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


@pytest.mark.numerics
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("loss", ["frobenius", "kullback-leibler"])
def test_matches_sklearn_mu_from_same_start(sparse, loss):
    X = prepare_matrix(_data(sparse))
    W0, H0 = _random_init(X, 5, 7, None, *X.shape)
    ref = NMF(5, solver="mu", beta_loss=loss, init="custom", max_iter=60, tol=0)
    Wr = ref.fit_transform(X, W=W0.copy(), H=H0.copy())
    (res,) = fit_batch(X, [5], init=[(W0, H0)], beta_loss=loss, max_iter=60, tol=0)
    rtol = f32.trajectory_rtol(60, *X.shape, 5)  # same updates, another summation order
    f32.close(res.W, Wr, rtol)
    f32.close(res.H, ref.components_, rtol)
    if loss == "frobenius":
        assert f32.error64(X, res.W, res.H) == pytest.approx(f32.error64(X, Wr, ref.components_), rel=rtol)
        assert abs(res.error - f32.error64(X, res.W, res.H)) <= f32.reported_error_bound(X, res.W, res.H)
    else:
        assert res.error == pytest.approx(ref.reconstruction_err_, rel=rtol)


@pytest.mark.numerics
@pytest.mark.parametrize("sparse", [False, True])
def test_batch_equals_one_at_a_time(sparse):
    X = _data(sparse, seed=3)
    ranks, seeds = [3, 5, 5, 8], [1, 2, 3, 4]
    rng = np.random.default_rng(0)
    masks = [None, rng.random(300) < 0.8, None, rng.random(300) < 0.7]
    batch = fit_batch(X, ranks, seeds, row_masks=masks, max_iter=300, tol=0)
    for i in range(4):
        (single,) = fit_batch(X, [ranks[i]], [seeds[i]], row_masks=[masks[i]], max_iter=300, tol=0)
        assert single.n_iter == batch[i].n_iter == 300
        f32.assert_same_fit(single, batch[i], X, masks[i], 300)


@pytest.mark.numerics
@pytest.mark.parametrize("sparse", [False, True])
def test_leaving_the_batch_changes_nothing(sparse):
    """Each factorization stops on its own and leaves the batch; the ones left go on as if
    alone. Compared with single runs of exactly as many iterations (no stopping decision in
    the reference, so no threshold can flip on another kernel)."""
    X = _data(sparse, seed=3)
    ranks, seeds = [3, 5, 5, 8], [1, 2, 3, 4]
    rng = np.random.default_rng(0)
    masks = [None, rng.random(300) < 0.8, None, rng.random(300) < 0.7]
    # tol on the loss's change over check_every iterations, relative to the current loss:
    # loose enough that some fits stop well before max_iter (the others hit it, warned)
    with pytest.warns(ConvergenceWarning):
        batch = fit_batch(X, ranks, seeds, row_masks=masks, max_iter=300, tol=1e-3)
    assert len({r.n_iter for r in batch}) > 1  # they did leave at different iterations
    for i in range(4):
        (single,) = fit_batch(X, [ranks[i]], [seeds[i]], row_masks=[masks[i]], max_iter=batch[i].n_iter, tol=0)
        f32.assert_same_fit(single, batch[i], X, masks[i], batch[i].n_iter)


@pytest.mark.numerics
def test_row_mask_fits_only_masked_rows():
    X = _data(False, seed=5)
    mask = np.zeros(300, bool)
    mask[:200] = True
    (res,) = fit_batch(X, [4], [0], row_masks=[mask], max_iter=400, tol=0)
    assert np.all(res.W[~mask] == 0)
    direct = f32.error64(X, res.W, res.H, mask)
    assert abs(res.error - direct) <= f32.reported_error_bound(X, res.W, res.H, mask)
    # the same fit on the sliced matrix gives the same factors
    (sub,) = fit_batch(X[mask], [4], [0], max_iter=400, tol=0)
    rtol = f32.trajectory_rtol(400, 300, 120, 4)
    f32.close(sub.H, res.H, rtol)
    f32.close(sub.W, res.W[mask], rtol)
    assert f32.error64(X[mask], sub.W, sub.H) == pytest.approx(direct, rel=rtol)


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


# --------------------------------------------------------------------------- other BLAS kernels

# OpenBLAS picks its kernel from the CPU; OPENBLAS_CORETYPE forces another vendor's.
# scipy-openblas builds map Zen to the Haswell kernels (threadpoolctl then reports "Haswell").
CORETYPES = {"Haswell": {"Haswell"}, "Zen": {"Zen", "Haswell"}}


def _openblas_under(coretype: str) -> list[str]:
    import subprocess
    import sys

    code = ("import json, numpy, scipy.linalg, threadpoolctl; "
            "print(json.dumps(sorted({i.get('architecture', '?') for i in threadpoolctl.threadpool_info() "
            "if i.get('internal_api') == 'openblas'})))")
    env = {**os.environ, "OPENBLAS_CORETYPE": coretype}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.skipif(os.environ.get("_TARDIS_CORETYPE_CHILD") == "1", reason="already under a forced kernel")
@pytest.mark.parametrize("coretype", sorted(CORETYPES))
def test_numerical_tests_hold_under_other_openblas_kernels(coretype):
    """The numerical tests of this file and test_nmf_kernels.py, in a subprocess on another CPU
    vendor's kernels (scripts/test_numerics.sh runs every ``numerics`` test under each kernel
    and BLAS thread count)."""
    import subprocess
    import sys

    if "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip(f"this CPU cannot run OpenBLAS's {coretype} kernels (no AVX2)")
    arch = _openblas_under(coretype)
    if not arch:
        pytest.skip("numpy/scipy are not linked against OpenBLAS here (OPENBLAS_CORETYPE does not apply)")
    # the forced kernel ran: threadpoolctl reports it (not the machine's own)
    assert set(arch) <= CORETYPES[coretype], f"OPENBLAS_CORETYPE={coretype} ignored: OpenBLAS ran {arch}"
    env = {**os.environ, "OPENBLAS_CORETYPE": coretype, "_TARDIS_CORETYPE_CHILD": "1"}
    tests = [str(Path(__file__).parent / f) for f in ("test_nmf.py", "test_nmf_kernels.py")]
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-m", "numerics"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-6000:]
    assert " passed" in p.stdout and "failed" not in p.stdout


def test_solver_registry_is_the_one_place_a_solver_is_declared():
    """params' choices, the solver/loss rule, the memory model and the refit's solver come from
    tardis_exp.solvers; a solver outside the batched loop runs through its own fit."""
    from tardis_exp import params, solvers
    from tardis_exp.chunked import estimate_factorize_gb
    from tardis_exp.errors import ConfigError

    assert params.SOLVERS == tuple(solvers.SOLVERS)
    for s in solvers.SOLVERS.values():
        for loss in params.LOSSES:
            cfg = {"n_components": 3, "solver": s.name, "beta_loss": loss}
            if loss in s.losses:
                params.check("factorize", cfg)
            else:
                with pytest.raises(ConfigError, match=f"factorize.solver={s.name} supports only factorize.beta_loss"):
                    params.check("factorize", cfg)
        # the model counts the solver's declared spots x K copies (1e6 spots x 10 columns: 40 MB each)
        base = estimate_factorize_gb(10**6, 0, 10, s.name, chunked=True)
        assert base == pytest.approx(0.04 * s.spots_copies)
    assert solvers.refit_solver("frobenius") == "hals" and solvers.refit_solver("kullback-leibler") == "mu"
    with pytest.raises(ValueError, match="needs fit="):
        solvers.register(solvers.Solver("x", "x", ("frobenius",), batched=False))
    with pytest.raises(ValueError, match="unknown solver 'cd'"):
        BatchedNMF(2, solver="cd").fit(np.ones((6, 4)))  # cd runs one replicate at a time, not in the batch
