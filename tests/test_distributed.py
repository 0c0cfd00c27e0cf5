"""Distributed factor updates: W's rows stay with X's chunks on the workers of a real
multi-process cluster; the driver holds K x genes state only; the graph per iteration
does not grow with the spots."""

import numpy as np
import pytest

import float32_bounds as f32

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

from test_chunked import _chunked, _data  # noqa: E402
from tardis_exp import chunked  # noqa: E402
from tardis_exp.chunked import BlockW, DistributedState, dask_scheduler  # noqa: E402
from tardis_exp.lazy import spill  # noqa: E402
from tardis_exp.nmf import fit_batch, refit_usage  # noqa: E402


def _cluster(processes):
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=processes,
                                    dashboard_address=None)


@pytest.mark.numerics
def test_two_process_cluster_equals_in_memory_w_on_workers(monkeypatch):
    n = 300
    masks = [None, np.random.default_rng(0).random(n) < 0.8]
    seen = []  # shapes of every array the driver's state holds, at every step
    step = DistributedState.step

    def spy(self, *a, **kw):
        seen.extend(v.shape for v in vars(self).values() if isinstance(v, np.ndarray))
        return step(self, *a, **kw)

    monkeypatch.setattr(DistributedState, "step", spy)
    with _cluster(True) as cluster, dask_scheduler(cluster.scheduler_address):
        client = distributed.get_client()
        for sparse in (False, True):
            X = _data(sparse, seed=3)
            for solver in ("mu", "hals"):
                ref = fit_batch(X, [3, 5], [1, 2], row_masks=masks, max_iter=20, tol=0, solver=solver)
                got = fit_batch(_chunked(X), [3, 5], [1, 2], row_masks=masks, max_iter=20, tol=0, solver=solver,
                                gather_W=False)
                for a, b, mk in zip(got, ref, masks):
                    # W stayed on the workers: futures of blocks aligned with the 5 chunks
                    assert isinstance(a.W, BlockW) and len(a.W.refs) == 5
                    assert all(isinstance(r, distributed.Future) for r in a.W.refs)
                    distributed.wait(a.W.refs)
                    assert all(client.who_has(a.W.refs).values())
                    a.W = a.W.gather()
                    f32.assert_same_fit(a, b, X, mk, 20)
                    assert (a.W[~mk] == 0).all() if mk is not None else True
        # the usage refit on the same layout
        W_ref, e_ref = refit_usage(X, ref[1].H, max_iter=20, tol=0)
        W, e = refit_usage(_chunked(X), ref[1].H, max_iter=20, tol=0)
    rtol = f32.hals_trajectory_rtol(X, W_ref, ref[1].H, 20)
    f32.close(W, W_ref, rtol)
    assert e == pytest.approx(e_ref, rel=rtol)
    # the driver's state: H (K x genes), Gram-sized and per-factorization arrays; nothing spots-long
    assert seen and all(n not in s for s in seen), seen


@pytest.mark.numerics
def test_graph_per_iteration_does_not_grow_with_spots(monkeypatch):
    logs = {}
    with _cluster(False) as cluster, dask_scheduler(cluster.scheduler_address):
        for n in (300, 600):
            X = _data(True, seed=4, n=n)
            C = spill(_chunked(X, rows=n // 5))  # chunks read from files: the graph carries no data
            for solver in ("mu", "hals"):
                monkeypatch.setattr(chunked, "GRAPHS", chunked.GraphLog())
                fit_batch(C, [4, 4], [1, 2], max_iter=6, tol=0, solver=solver, gather_W=False)
                logs[n, solver] = [g for g in chunked.GRAPHS.graphs if g[0] == "iteration"]
    for solver in ("mu", "hals"):
        small, big = logs[300, solver], logs[600, solver]
        assert len(small) == len(big) == 6
        for (_, t1, b1), (_, t2, b2) in zip(small, big):
            # one read and one update task per chunk, their outputs split, two sums: 5 chunks, both sizes
            assert t1 == t2 and t1 <= 5 * 6 + 2
            # bytes: names and small parameters only; W's rows (600 x 8 float32 = 19 kB) never travel
            assert 0 < b2 <= 1.05 * b1 and b2 < 600 * 8 * 4


@pytest.mark.numerics
def test_factorize_stage_keeps_replicates_on_workers(tmp_path):
    """The factorize stage on a cluster: obsm's usages are Dask arrays over the workers' blocks
    (the driver never holds a replicate's W), equal to the in-memory stage's, and written
    to h5ad chunk by chunk."""
    import anndata as ad

    from tardis_exp.factorize import factorize
    from tardis_exp.store import write_h5ad

    X = _data(True, seed=5)
    kw = dict(n_components=3, n_replicates=3, random_state=0, max_iter=20, tol=0, solver="mu", copy=True)
    ref = factorize(ad.AnnData(X=X), **kw)
    with _cluster(True) as cluster, dask_scheduler(cluster.scheduler_address):
        got = factorize(ad.AnnData(X=_chunked(X)), **kw)
        for key in ("X_nmf", "X_nmf_replicates"):
            U = got.obsm[key]
            assert isinstance(U, da.Array) and U.shape == ref.obsm[key].shape
            # the graph holds references to the workers' blocks, not their rows (10.8 kB here)
            assert not any(isinstance(v, np.ndarray) for v in dict(U.__dask_graph__()).values())
            # computed here on Dask's local threads (as anndata's writer does), a block at a time
            f32.close(U.compute(scheduler="threads"), ref.obsm[key], f32.trajectory_rtol(20, *X.shape, 3))
        got.X = X  # the writer computes the Dask obsm one chunk at a time
        write_h5ad(got, tmp_path / "r.h5ad")
        back = ad.read_h5ad(tmp_path / "r.h5ad")
        np.testing.assert_array_equal(back.obsm["X_nmf_replicates"], got.obsm["X_nmf_replicates"].compute(scheduler="threads"))
    assert got.uns["nmf"]["best_replicate"] == ref.uns["nmf"]["best_replicate"]


def test_max_memory_gb_applies_per_process():
    """factorize.max_memory_gb on a cluster: W's rows are split among the workers, so the limit
    is checked against one worker's share; on Dask's local schedulers one process holds all."""
    from tardis_exp.chunked import check_memory, estimate_factorize_gb
    from tardis_exp.errors import ConfigError

    kw = dict(n_spots=1_000_001, n_genes=2000, n_columns=40, solver="hals", chunked=True)
    # the model by hand: HALS keeps 2 spots x K float32 copies, plus 16 bytes per gene and column
    whole = (2 * 4 * 1_000_001 * 40 + 16 * 2000 * 40) / 1e9
    share = (2 * 4 * 500_001 * 40 + 16 * 2000 * 40) / 1e9
    assert estimate_factorize_gb(**{**kw, "n_processes": 2}) == pytest.approx(share)
    limit = (whole + share) / 2
    with pytest.raises(ConfigError, match=r"factorize.max_memory_gb=.*needs about 0.321 GB;"):
        check_memory(limit, **kw)
    with _cluster(False) as cluster, dask_scheduler(cluster.scheduler_address):
        assert check_memory(limit, **kw) == pytest.approx(share)
        with pytest.raises(ConfigError, match=r"needs about 0.161 GB per process \(2 workers\)"):
            check_memory(share / 2, **kw)


def test_chunk_gram_equals_float64():
    """The chunk tasks' W.T W (no BLAS): float32 of the float64 sum, zero rows and columns included."""
    from tardis_exp._kernels import gram

    W = np.random.default_rng(0).gamma(1.0, 1.0, (1000, 7)).astype(np.float32)
    W[::3, 2] = 0
    W[:, 5] = 0
    ref = W.T.astype(np.float64) @ W.astype(np.float64)
    G = gram(W)
    assert G.dtype == np.float32 and (G == G.T).all() and (G[5] == 0).all()
    # accumulated in float64: one float32 rounding of each entry
    f32.close(G, ref, f32.gamma(1))
