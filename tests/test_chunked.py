"""Out-of-core factorization on Dask: the chunked products against the in-memory solver."""

import numpy as np
import pytest
import scipy.sparse as sp

import float32_bounds as f32

da = pytest.importorskip("dask.array")

from tardis_exp.chunked import ChunkedMatrix, check_memory, dask_scheduler  # noqa: E402
from tardis_exp.errors import ConfigError  # noqa: E402
from tardis_exp.nmf import fit_batch, refit_usage  # noqa: E402


def _data(sparse, seed=0, n=300, m=120):
    rng = np.random.default_rng(seed)
    W = rng.gamma(1.0, 1.0, (n, 4))
    H = rng.gamma(1.0, 1.0, (4, m))
    X = (W @ H + rng.gamma(0.3, 0.1, (n, m))).astype(np.float32)
    if sparse:
        X[X < np.quantile(X, 0.5)] = 0
        return sp.csr_matrix(X)
    return X


def _chunked(X, rows=70):
    """A Dask array over X with uneven row chunks of CSR or NumPy blocks (as anndata's lazy reader gives)."""
    if sp.issparse(X):
        bounds = list(range(0, X.shape[0], rows)) + [X.shape[0]]
        blocks = [da.from_array(X[a:b], chunks=(b - a, X.shape[1]), asarray=False, meta=sp.csr_matrix((0, 0)))
                  for a, b in zip(bounds[:-1], bounds[1:])]
        return da.concatenate(blocks, axis=0)
    return da.from_array(X, chunks=(rows, X.shape[1]))


@pytest.mark.numerics
@pytest.mark.parametrize("sparse", [False, True])
def test_products_equal_in_memory(sparse):
    X = _data(sparse)
    C = ChunkedMatrix(_chunked(X))
    assert C.sparse == sparse and C.n_chunks == 5 and C.shape == X.shape
    rng = np.random.default_rng(1)
    H = rng.random((7, X.shape[1]), dtype=np.float32)
    W = rng.random((X.shape[0], 7), dtype=np.float32)
    Xd = f32.dense(X)
    P = C.products()
    f32.close(P.xht(H), Xd @ H.T, f32.gamma(X.shape[1]))
    f32.close(P.xtw(W), Xd.T @ W, f32.gamma(X.shape[0]))
    # float64 sums (the in-memory CSR path sums in float32: within its own rounding)
    np.testing.assert_allclose(C.row_sq(), (Xd ** 2).sum(1), rtol=f32.gamma(X.shape[1] + 1))
    assert C.mean() == pytest.approx(Xd.mean(), rel=1e-12)
    assert C.nnz == (X.nnz if sparse else X.size)
    rows = np.array([250, 3, 71, 69, 140])  # unsorted, across chunk borders
    np.testing.assert_array_equal(f32.dense(C[rows]), Xd[rows])


@pytest.mark.numerics
@pytest.mark.parametrize("solver", ["mu", "hals"])
@pytest.mark.parametrize("sparse", [False, True])
def test_fit_batch_chunked_equals_in_memory(sparse, solver):
    X = _data(sparse, seed=3)
    ranks, seeds = [3, 5, 5], [1, 2, 3]
    masks = [None, np.random.default_rng(0).random(300) < 0.8, None]
    ref = fit_batch(X, ranks, seeds, row_masks=masks, max_iter=100, tol=0, solver=solver)
    got = fit_batch(_chunked(X), ranks, seeds, row_masks=masks, max_iter=100, tol=0, solver=solver)
    for a, b, mk in zip(got, ref, masks):
        assert a.n_iter == b.n_iter == 100
        f32.assert_same_fit(a, b, X, mk, 100)


@pytest.mark.numerics
def test_refit_usage_chunked_equals_in_memory():
    X = _data(True, seed=5)
    (fit,) = fit_batch(X, [4], [0], max_iter=200, tol=0)
    W_ref, e_ref = refit_usage(X, fit.H, max_iter=50, tol=0)
    W, e = refit_usage(_chunked(X, rows=64), fit.H, max_iter=50, tol=0)
    f32.close(W, W_ref, f32.trajectory_rtol(50, *X.shape, 4))
    assert e == pytest.approx(e_ref, rel=f32.trajectory_rtol(50, *X.shape, 4))


def test_local_cluster_equals_in_memory():
    distributed = pytest.importorskip("distributed")
    X = _data(True, seed=7)
    ref = fit_batch(X, [4, 4], [5, 6], max_iter=20, tol=0, solver="hals")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        with dask_scheduler(cluster.scheduler_address):
            with distributed.get_task_stream() as ts:
                got = fit_batch(_chunked(X), [4, 4], [5, 6], max_iter=20, tol=0, solver="hals")
    # the updates ran on the cluster: one task per chunk per iteration (20 x 5), on both workers
    upd = [t for t in ts.data if str(t["key"]).startswith("_blk_hals")]
    assert len(upd) == 20 * 5
    assert len({t["worker"] for t in ts.data}) == 2
    for a, b in zip(got, ref):
        f32.assert_same_fit(a, b, X, None, 20)


def test_bad_scheduler_and_memory_limit_refuse_early():
    with pytest.raises(ConfigError, match="factorize.dask.scheduler"):
        with dask_scheduler("warp-drive"):
            pass
    with pytest.raises(ConfigError, match=r"factorize.max_memory_gb=1: .*2000000 spots x 2000 genes"):
        check_memory(1, n_spots=2_000_000, n_genes=2000, n_columns=100, solver="mu", chunked=True)
    # HALS, chunked, 10 x k=6: fits in 4 GB
    assert check_memory(4, n_spots=2_000_000, n_genes=2000, n_columns=60, solver="hals", chunked=True) < 4


def test_consensus_background_on_chunks_equals_in_memory():
    """The background check refits on a spot subsample read from the chunks (``X[rows]``):
    the same programs are marked, the same K kept, as with ``X`` in memory."""
    import anndata as ad

    from tardis_exp.consensus import consensus
    from tardis_exp.factorize import factorize
    from tardis_exp.preprocess import preprocess
    from tardis_exp.synthetic import make_synthetic

    a = preprocess(make_synthetic(n_spots=1600, n_genes=1200, n_programs=4, seed=21), n_top_genes=1000)
    factorize(a, solver="hals", n_components=8, n_replicates=8, progress=False)
    lazy = ad.AnnData(_chunked(sp.csr_matrix(a.X), rows=300), obs=a.obs.copy(), var=a.var.copy(),
                      uns={"nmf": a.uns["nmf"]}, obsm={"X_nmf_replicates": a.obsm["X_nmf_replicates"]})
    for b in (a, lazy):
        consensus(b, min_clusters=2, max_clusters=8, progress=False)
    c, d = a.uns["nmf_consensus"], lazy.uns["nmf_consensus"]
    assert c["n_background"] >= 1 and d["n_background"] == c["n_background"] and d["best_k"] == c["best_k"]
    np.testing.assert_array_equal(d["background_items"], c["background_items"])
    np.testing.assert_array_equal(d["spectra"], c["spectra"])
    assert lazy.obsm["X_nmf_background"].shape == a.obsm["X_nmf_background"].shape
    agree = (lazy.obsm["X_nmf_consensus"].argmax(1) == a.obsm["X_nmf_consensus"].argmax(1)).mean()
    assert agree >= 0.99
