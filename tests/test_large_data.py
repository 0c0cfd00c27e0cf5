"""data.backend=dask end to end: zarr conversion, lazy reading, chunked preprocessing, the CLI."""

import os
import subprocess
import sys
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import yaml

import float32_bounds as f32

pytest.importorskip("dask.array")

from tardis_exp.chunked import is_dask  # noqa: E402
from tardis_exp.lazy import read_lazy  # noqa: E402
from tardis_exp.preprocess import preprocess  # noqa: E402
from tardis_exp.synthetic import make_synthetic  # noqa: E402

SMALL = dict(n_spots=400, n_genes=300, n_programs=3, n_markers=20)


def _h5ad(tmp_path, sparse=True, name="s.h5ad"):
    a = make_synthetic(**SMALL)
    a.X = sp.csr_matrix(a.X) if sparse else np.asarray(a.X.toarray() if sp.issparse(a.X) else a.X)
    p = tmp_path / name
    a.write_h5ad(p)
    return p, a


def _convert(src, dst, *extra):
    return subprocess.run([sys.executable, "-m", "tardis_exp.convert", str(src), str(dst), *extra],
                          capture_output=True, text=True, timeout=300)


def test_convert_and_read_lazy(tmp_path):
    src, a = _h5ad(tmp_path)
    p = _convert(src, tmp_path / "s.zarr", "--chunk-rows", "64")
    assert p.returncode == 0, p.stderr
    for path in (src, tmp_path / "s.zarr"):
        L = read_lazy(path, chunk_rows=64)
        assert is_dask(L.X) and L.X.chunks[0][:2] == (64, 64) and sp.issparse(L.X._meta)
        assert (sp.csr_matrix(L.X.compute()) != a.X).nnz == 0
        assert list(L.obs_names) == list(a.obs_names) and list(L.var_names) == list(a.var_names)
        np.testing.assert_array_equal(L.obsm["spatial"], a.obsm["spatial"])
        assert (L.obs["true_domain"] == a.obs["true_domain"]).all()
    # the store is never overwritten: one line naming it
    p = _convert(src, tmp_path / "s.zarr")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "s.zarr exists" in p.stderr


@pytest.mark.parametrize("sparse", [True, False])
def test_chunked_preprocess_equals_in_memory(tmp_path, sparse):
    src, _ = _h5ad(tmp_path, sparse)
    kw = dict(n_top_genes=120, min_cells=3, min_counts=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = preprocess(ad.read_h5ad(src), **kw)
        got = preprocess(read_lazy(src, chunk_rows=70), **kw)
    assert is_dask(got.X)
    assert list(got.var_names) == list(ref.var_names) and list(got.obs_names) == list(ref.obs_names)
    Xg, Xr = got.X.compute(), ref.X
    assert sp.issparse(Xg) == sp.issparse(Xr) == sparse
    # normalize_total (a row sum of length n_genes) and log1p, in float32, in either order
    f32.close(f32.dense(Xg), f32.dense(Xr), f32.gamma(ad.read_h5ad(src).n_vars + 4))
    np.testing.assert_array_equal(f32.dense(got.layers["counts"].compute()), f32.dense(ref.layers["counts"]))
    assert got.uns["preprocess"] == ref.uns["preprocess"]


def test_chunked_validation_names_the_problem(tmp_path):
    a = make_synthetic(**SMALL)
    X = sp.csr_matrix(a.X, dtype=np.float32)
    X.data[5] = -1.0
    a.X = X
    a.write_h5ad(tmp_path / "neg.h5ad")
    from tardis_exp.errors import InputError

    with pytest.raises(InputError, match="negative values"):
        preprocess(read_lazy(tmp_path / "neg.h5ad", chunk_rows=50))


def _cli(tmp_path, *args):
    env = {**os.environ, "TARDIS_EXP_PROGRESS": "0", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "tardis_exp", *args, f"paths.root_dir={tmp_path}",
                           "tracking.enabled=false", "tracking.log_plots=false", "save_result=results",
                           "factorize.n_components=5", "factorize.n_replicates=3", "factorize.max_iter=150",
                           "consensus.min_clusters=2", "consensus.max_clusters=4", "consensus.n_resamples=10"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _metrics(tmp_path):
    (m,) = list(tmp_path.glob("outputs/runs/*/metrics.yaml"))
    return yaml.safe_load(m.read_text()), m.parent


def test_cli_dask_backend_same_result_as_in_memory(tmp_path):
    src, _ = _h5ad(tmp_path)
    assert _convert(src, tmp_path / "s.zarr", "--chunk-rows", "128").returncode == 0
    runs = {}
    for backend in ("memory", "dask"):
        d = tmp_path / backend
        d.mkdir()
        p = _cli(d, "data=zarr", f"data.path={tmp_path / 's.zarr'}", f"data.backend={backend}",
                 "data.chunk_rows=128", "preprocess.n_top_genes=200")
        assert p.returncode == 0, p.stderr[-3000:]
        runs[backend] = _metrics(d)
    (mm, dm), (md, dd) = runs["memory"], runs["dask"]
    assert md["best_k"] == mm["best_k"] == 3  # the planted K
    assert md["program_recovery"] == pytest.approx(mm["program_recovery"], abs=1e-6)
    assert md["program_recovery"] > 0.9
    um = np.loadtxt(dm / "usages.tsv.gz", skiprows=1, usecols=range(1, 4))
    ud = np.loadtxt(dd / "usages.tsv.gz", skiprows=1, usecols=range(1, 4))
    # same factorizations to float32 rounding -> the same consensus; usages refit from it
    f32.close(ud, um, 1e-3)


def test_cli_refuses_bad_dask_settings_early(tmp_path):
    src, _ = _h5ad(tmp_path)
    p = _cli(tmp_path, "+data.backend=dask")  # the default synthetic source cannot be read lazily
    assert p.returncode == 2 and "data.backend=dask reads h5ad, zarr and tenx_h5 files only" in p.stderr
    p = _cli(tmp_path, "data=h5ad", f"data.path={src}", "data.backend=dask", "factorize.max_memory_gb=0.0001")
    assert p.returncode == 2 and "factorize.max_memory_gb=0.0001" in p.stderr and "needs about" in p.stderr
    assert not list(tmp_path.glob("outputs/runs/*/metrics.yaml"))
    p = _cli(tmp_path, "data=h5ad", f"data.path={src}", "data.backend=dask", "factorize.dask.scheduler=warp")
    assert p.returncode == 2 and "factorize.dask.scheduler='warp'" in p.stderr


def test_max_memory_checked_before_loading(tmp_path):
    """factorize.max_memory_gb is checked against the shape in the file's metadata, before the data
    are read: on a store whose X cannot be read, the limit is what the run reports."""
    src, a = _h5ad(tmp_path)
    dst = tmp_path / "s.zarr"
    assert _convert(src, dst).returncode == 0
    # the values of X are unreadable (every chunk file garbage); its metadata (shape, number of
    # stored entries) stays
    chunks = [f for f in (dst / "X" / "data").rglob("*") if f.is_file() and f.name not in ("zarr.json", ".zarray")]
    assert chunks
    for f in chunks:
        f.write_bytes(b"not a chunk")
    nnz = a.X.nnz
    for backend in ("memory", "dask"):
        p = _cli(tmp_path, "data=zarr", f"data.path={dst}", f"data.backend={backend}", "factorize.max_memory_gb=0.0001")
        assert p.returncode == 2, p.stderr
        msg = p.stderr.strip().splitlines()[-1]
        assert "factorize.max_memory_gb=0.0001" in msg and "before loading" in msg
        # the shape read from the metadata: every spot, min(n_top_genes=2000, genes) genes
        assert f"{SMALL['n_spots']} spots x {SMALL['n_genes']} genes" in msg
        # the model's figure: in memory it counts the stored entries read from the metadata (8 bytes each)
        from tardis_exp.chunked import estimate_factorize_gb

        need = estimate_factorize_gb(SMALL["n_spots"], SMALL["n_genes"], 15, "mu", backend == "dask",
                                     nnz if backend == "memory" else None)
        assert f"needs about {need:.3g} GB" in msg
    # without the limit the same run gets as far as reading X, and fails there
    p = _cli(tmp_path, "data=zarr", f"data.path={dst}")
    assert p.returncode != 0 and "max_memory_gb" not in p.stderr and "data.path" in p.stderr


def test_cli_on_a_local_cluster(tmp_path):
    """factorize.dask.scheduler=tcp://...: the run's passes go to the cluster's workers."""
    distributed = pytest.importorskip("distributed")
    src, _ = _h5ad(tmp_path)
    # workers as threads of this process, reached over TCP by the CLI's process
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        p = _cli(tmp_path, "data=h5ad", f"data.path={src}", "data.backend=dask", "data.chunk_rows=128",
                 "preprocess.n_top_genes=200", f"factorize.dask.scheduler={cluster.scheduler_address}")
        assert p.returncode == 0, p.stderr[-3000:]
        # the preprocessed chunks were persisted on the workers and the factor updates ran there:
        # the replicates' MU updates and the usage refit's HALS sweeps, one task per chunk each
        tasks = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
    assert {"blk_mu", "blk_hals"} <= set(tasks), tasks  # task prefixes: dask drops the leading "_"
    m, _ = _metrics(tmp_path)
    assert m["best_k"] == 3 and m["program_recovery"] > 0.9


def test_result_with_dask_x_written_straight_to_disk(tmp_path, monkeypatch):
    """write_h5ad's path straight to the file (taken for a Dask X, written one chunk at a time,
    and for arrays past DIRECT_WRITE_BYTES) writes files that read back equal."""
    from tardis_exp import store

    src, a = _h5ad(tmp_path)
    L = read_lazy(src, chunk_rows=64)
    L.obsm["W"] = np.arange(L.n_obs * 3, dtype=np.float32).reshape(-1, 3)
    store.write_h5ad(L, tmp_path / "lazy.h5ad", compression="gzip")
    b = ad.read_h5ad(tmp_path / "lazy.h5ad")
    assert sp.issparse(b.X) and (sp.csr_matrix(b.X) != a.X).nnz == 0
    np.testing.assert_array_equal(b.obsm["W"], L.obsm["W"])
    monkeypatch.setattr(store, "DIRECT_WRITE_BYTES", 16)
    assert store._nbytes(a) > 16 and not store._has_dask(a)
    store.write_h5ad(a, tmp_path / "big.h5ad")
    c = ad.read_h5ad(tmp_path / "big.h5ad")
    assert (sp.csr_matrix(c.X) != a.X).nnz == 0 and list(c.obs_names) == list(a.obs_names)
