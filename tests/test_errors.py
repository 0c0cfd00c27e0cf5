"""Bad input gets a clear, early error (issue 6).

Every case asserts the exact error class, that the message names the problem and the
config key or file, and is built so that it would fail if the check were removed (the
unchecked path either succeeds silently or fails with another exception/message).
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import yaml

from tardis_exp.data import load_data
from tardis_exp.errors import ConfigError, InputError, TrackingError
from tardis_exp.factorize import check_params as check_factorize
from tardis_exp.factorize import factorize
from tardis_exp.pipeline import run, validate
from tardis_exp.preprocess import MAX_VALUE, preprocess
from tardis_exp.tracking import redact, redact_tree, safe_params

REPO = Path(__file__).resolve().parent.parent


def _counts(n_obs=60, n_vars=40, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(2.0, 2.0, size=(n_obs, n_vars))).astype(dtype)
    a = ad.AnnData(X=X)
    a.obs_names = [f"spot{i}" for i in range(n_obs)]
    a.var_names = [f"gene{j}" for j in range(n_vars)]
    return a


def _raises(exc_type, fn, *needles):
    """Call ``fn``; require exactly ``exc_type`` and every needle in the message."""
    with pytest.raises(exc_type) as ei:
        fn()
    assert type(ei.value) is exc_type, f"{type(ei.value).__name__}: {ei.value}"
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# ----------------------------------------------------------------------------- input values


@pytest.mark.parametrize("bad,needle", [(-1.0, "negative values"), (np.nan, "NaN or infinite"),
                                        (np.inf, "NaN or infinite"), (-np.inf, "NaN or infinite")])
@pytest.mark.parametrize("sparse", [False, True])
def test_bad_values_in_X(bad, needle, sparse):
    a = _counts()
    a.X[3, 5] = bad
    if sparse:
        a.X = sp.csr_matrix(a.X)
    _raises(InputError, lambda: preprocess(a), needle, "adata.X")


def test_bad_values_in_a_named_layer_name_the_layer():
    a = _counts()
    a.layers["counts"] = a.X.copy()
    a.layers["counts"][0, 0] = -2
    msg = _raises(InputError, lambda: preprocess(a, layer="counts"), "adata.layers['counts']", "negative")
    assert "preprocess.layer" in msg


def test_missing_layer():
    a = _counts()
    a.layers["spliced"] = a.X.copy()
    _raises(InputError, lambda: preprocess(a, layer="counts"), "preprocess.layer='counts' does not exist",
            "spliced")


def test_use_raw_without_raw():
    _raises(InputError, lambda: preprocess(_counts(), use_raw=True), "preprocess.use_raw", ".raw")


def test_all_zero_matrix():
    a = _counts()
    a.X = np.zeros_like(a.X)
    # without the check this would end in "no genes left after QC", not naming the cause
    _raises(InputError, lambda: preprocess(a), "all zeros", "adata.X")


def test_all_zero_after_exclusion_names_the_exclusion_keys():
    a = _counts()
    a.X[:, 20:] = 0
    a.var_names = [f"mt-{j}" if j < 20 else f"gene{j}" for j in range(a.n_vars)]
    _raises(InputError, lambda: preprocess(a, exclude_regex=["^mt-"], min_cells=0, min_counts=0),
            "all zeros", "preprocess.exclude_regex")


def test_no_spots_left_after_qc():
    a = _counts()
    total = float(a.X.sum(1).max())
    _raises(InputError, lambda: preprocess(a, min_counts=total + 1), "no spots left after QC",
            "preprocess.min_counts")


def test_no_genes_left_after_qc():
    a = _counts()
    _raises(InputError, lambda: preprocess(a, min_cells=a.n_obs + 1), "no genes left after QC",
            "preprocess.min_cells")


def test_duplicated_gene_names_and_make_unique():
    a = _counts()
    names = list(a.var_names)
    names[7] = names[3]
    a.var_names = names
    _raises(InputError, lambda: preprocess(a), "duplicated gene names", "preprocess.make_unique", "gene3")
    out = preprocess(a, make_unique=True, n_top_genes=None, min_cells=0, min_counts=0)
    assert out.var_names.is_unique and out.n_vars == a.n_vars


def test_every_gene_excluded_by_name():
    a = _counts()
    _raises(InputError, lambda: preprocess(a, exclude_regex=["^gene"]), "no genes left after excluding 40",
            "preprocess.exclude_regex")


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
def test_empty_matrix(shape):
    a = ad.AnnData(X=np.zeros(shape))
    _raises(InputError, lambda: preprocess(a), "no spots or no genes")


def test_values_too_large_for_float32():
    a = _counts()
    a.X[1, 1] = MAX_VALUE * 10
    _raises(InputError, lambda: preprocess(a), "overflow", "adata.X")


def test_fewer_genes_than_n_top_genes_clips_with_a_warning_and_runs():
    a = _counts(n_obs=60, n_vars=40)
    with pytest.warns(UserWarning, match=r"preprocess\.n_top_genes=2000 but only 40 genes are left"):
        out = preprocess(a, n_top_genes=2000, min_cells=1)
    assert out.n_vars == 40 and out.var["highly_variable"].all()
    factorize(out, n_components=3, n_replicates=2, max_iter=50)
    assert out.obsm["X_nmf"].shape == (60, 3) and np.isfinite(out.obsm["X_nmf"]).all()


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32])
@pytest.mark.parametrize("sparse", [False, True])
def test_small_integer_dtypes_give_the_float64_result(dtype, sparse):
    """Counts near the dtype's maximum: row sums and squares overflow if computed in it."""
    rng = np.random.default_rng(3)
    hi = min(np.iinfo(dtype).max, 30000)
    X = rng.integers(0, hi + 1, size=(50, 300)).astype(np.float64)
    X[rng.random(X.shape) < 0.5] = 0
    ref = ad.AnnData(X=X.copy())
    a = ad.AnnData(X=X.astype(dtype))
    if sparse:
        ref.X, a.X = sp.csr_matrix(ref.X), sp.csr_matrix(a.X)
    for kw in ({"normalize": "log1p"}, {"normalize": "none", "scale": True}, {"normalize": "total"},
               {"normalize": "none", "hvg_flavor": "cell_ranger", "n_top_genes": 50}):
        kw = {"n_top_genes": None, **kw}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            r = preprocess(ref, **kw)
            o = preprocess(a, **kw)
        assert list(o.var_names) == list(r.var_names)
        R = r.X.toarray() if sp.issparse(r.X) else r.X
        O = o.X.toarray() if sp.issparse(o.X) else o.X
        # ground truth computed here in float64, independently of preprocess
        if kw.get("scale"):
            truth = X / np.where(X.std(0) > 0, X.std(0), 1)
            np.testing.assert_allclose(O, truth, rtol=1e-4)
        np.testing.assert_allclose(O, R, rtol=1e-5, atol=1e-6)
        C = o.layers["counts"].toarray() if sp.issparse(o.layers["counts"]) else o.layers["counts"]
        np.testing.assert_array_equal(C, X[:, o.var_names.astype(int)])  # exact counts, no wrap-around


def test_seurat_flavor_on_data_that_is_not_log_scale_ranks_on_log1p():
    """Seurat's dispersion takes expm1(X): on normalize=total data scanpy alone overflows."""
    a = _counts(80, 60, seed=4)
    a.X[:, :5] *= 50  # a few strongly varying genes
    with pytest.warns(UserWarning, match=r"preprocess.hvg_flavor=seurat expects log-scale data.*normalize=total"):
        out = preprocess(a, normalize="total", n_top_genes=20)
    assert out.n_vars == 20 and np.isfinite(out.X).all()
    # same genes as Seurat's ranking on the log1p of the same normalized data
    ref = preprocess(a, normalize="log1p", n_top_genes=20)
    assert set(out.var_names) == set(ref.var_names)


def test_hvg_selection_without_any_defined_dispersion_is_a_clear_error():
    """Every gene detected in a single spot: scanpy's seurat flavor fails with an IndexError."""
    a = ad.AnnData(X=np.zeros((12, 6)))
    for j, i in enumerate([0, 2, 4, 6, 8, 10]):
        a.X[i, j] = 3 + j
    _raises(InputError, lambda: preprocess(a, n_top_genes=1, min_cells=0, min_counts=0),
            "highly variable gene selection", "preprocess.n_top_genes=1", "preprocess.n_top_genes=null")
    out = preprocess(a, n_top_genes=None, min_cells=0, min_counts=0)  # the suggested fix works
    assert out.n_vars == 6


def test_seurat_v3_without_scikit_misc_fails_early():
    import importlib.util

    if importlib.util.find_spec("skmisc") is not None:
        pytest.skip("scikit-misc is installed: the flavor works")
    from tardis_exp.preprocess import check_params

    _raises(ConfigError, lambda: check_params(hvg_flavor="seurat_v3"), "scikit-misc", "preprocess.hvg_flavor")


# ----------------------------------------------------------------------------- n_components


def test_n_components_not_below_min_shape_is_rejected_before_factorizing():
    a = _counts(n_obs=8, n_vars=30)
    out = preprocess(a, n_top_genes=None, min_cells=0, min_counts=0)
    _raises(ConfigError, lambda: factorize(out, n_components=8), "factorize.n_components=8",
            "min(spots, genes)=8")
    assert "X_nmf" not in out.obsm and "nmf" not in out.uns  # nothing was computed
    factorize(out, n_components=7, n_replicates=1, max_iter=20)  # the largest allowed rank works
    assert out.obsm["X_nmf"].shape == (8, 7)


@pytest.mark.parametrize("value", [0, -1, 2.5, "abc", None, True])
def test_n_components_out_of_range_or_wrong_type(value):
    _raises(ConfigError, lambda: check_factorize(n_components=value), "factorize.n_components")


def test_pipeline_checks_n_components_right_after_preprocess(compose, tmp_path):
    """The data's shape is known only after preprocess; the check must still precede factorize."""
    db = tmp_path / "mlruns" / "mlflow.db"
    cfg = compose("data.n_spots=100", "data.n_genes=12", "data.n_programs=2", "data.n_markers=4",
                  "factorize.n_components=12", "factorize.n_replicates=2", "tracking.log_plots=false",
                  f"tracking.uri=sqlite:///{db}")
    _raises(ConfigError, lambda: run(cfg, tmp_path / "run"), "factorize.n_components=12",
            "of the preprocessed data (100 spots x 12 genes)")
    assert not (tmp_path / "run" / "result.h5ad").exists()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("tardis-exp")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert runs["preprocess"].info.status == "FINISHED"
    fac = runs["factorize"]
    assert fac.info.status == "FAILED"
    # the stage failed before its first iteration: no fit metrics were ever logged
    assert "reconstruction_error" not in fac.data.metrics
    assert "consensus" not in runs


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize("override,needles", [
    ("consensus.min_clusters=1", ["consensus.min_clusters", ">= 2"]),
    ("consensus.min_clusters=abc", ["consensus.min_clusters", "'abc'"]),
    ("consensus.max_clusters=3", ["consensus.max_clusters=3", "consensus.min_clusters=4"]),
    ("consensus.resample_frac=0", ["consensus.resample_frac", "(0, 1]"]),
    ("consensus.resample_frac=1.5", ["consensus.resample_frac", "(0, 1]"]),
    ("consensus.resample_frac=-0.2", ["consensus.resample_frac"]),
    ("consensus.resample_frac=nan", ["consensus.resample_frac"]),
    ("consensus.n_resamples=0", ["consensus.n_resamples", ">= 1"]),
    ("consensus.method=kmeans", ["consensus.method='kmeans' is unknown", "components"]),
    ("consensus.k_selection=best", ["consensus.k_selection='best' is unknown"]),
    ("factorize.solver=als", ["factorize.solver='als' is unknown", "mu"]),
    ("factorize.beta_loss=itakura", ["factorize.beta_loss='itakura' is unknown"]),
    ("factorize.solver=cd factorize.beta_loss=kullback-leibler", ["factorize.solver=cd", "frobenius"]),
    ("factorize.n_replicates=0", ["factorize.n_replicates"]),
    ("factorize.max_iter=0", ["factorize.max_iter"]),
    ("factorize.tol=-1", ["factorize.tol"]),
    ("preprocess.normalize=zscore", ["preprocess.normalize='zscore' is unknown"]),
    ("preprocess.hvg_flavor=magic", ["preprocess.hvg_flavor='magic' is unknown"]),
    ("preprocess.n_top_genes=0", ["preprocess.n_top_genes"]),
    ("preprocess.min_cells=-1", ["preprocess.min_cells"]),
    ("preprocess.target_sum=0", ["preprocess.target_sum"]),
    ("preprocess.exclude_regex=['(unclosed']", ["preprocess.exclude_regex", "(unclosed"]),
    ("score.n_cluster_genes=0", ["score.n_cluster_genes"]),
    ("score.gene_ranking=random", ["score.gene_ranking='random' is unknown"]),
    ("+consensus.foo=1", ["unknown key(s) consensus.foo"]),
    ("+factorize.progress=true", ["unknown key(s) factorize.progress"]),
    ("data=h5ad", ["data.path is required"]),
    ("data=tenx_mtx data.path=/tmp data.var_names=symbols", ["data.var_names='symbols' is unknown"]),
    ("data.n_spots=0", ["data.n_spots"]),
    ("save_result=some", ["save_result='some'", "results"]),
    ("save_result=1", ["save_result=1"]),
    # issue 12: tracking and cache values are checked with the rest, before any run exists
    ("tracking.http_max_retries=abc", ["tracking.http_max_retries must be an integer >= 0", "'abc'"]),
    ("tracking.http_max_retries=-1", ["tracking.http_max_retries"]),
    ("tracking.http_timeout_s=abc", ["tracking.http_timeout_s must be a finite number > 0", "'abc'"]),
    ("tracking.connect_timeout_s=0", ["tracking.connect_timeout_s"]),
    ("tracking.enabled=nope", ["tracking.enabled must be true or false, got 'nope'"]),
    ("tracking.log_plots=yes", ["tracking.log_plots must be true or false"]),
    ("tracking.experiment=''", ["tracking.experiment must be a non-empty name"]),
    ("cache.max_size_gb=-1", ["cache.max_size_gb must be > 0, got -1"]),
    ("cache.max_size_gb=abc", ["cache.max_size_gb", "'abc'"]),
    ("cache.enabled=maybe", ["cache.enabled must be true or false"]),
    ("consensus=spots consensus.max_spots=1", ["consensus.max_spots"]),
])
def test_bad_config_values(compose, override, needles):
    cfg = compose(*override.split())
    _raises(ConfigError, lambda: validate(cfg), *needles)


def test_valid_edges_are_accepted(compose):
    validate(compose("consensus.resample_frac=1.0", "consensus.min_clusters=2", "consensus.max_clusters=2",
                     "consensus.n_resamples=1", "preprocess.n_top_genes=null"))


def test_missing_gene_list_file(compose, tmp_path):
    cfg = compose(f"preprocess.exclude_genes_file={tmp_path}/nope.txt")
    _raises(InputError, lambda: validate(cfg), "preprocess.exclude_genes_file", "nope.txt")


def test_validation_runs_before_the_data_is_read(compose, tmp_path):
    """A corrupt input file and a bad consensus key: the config error wins, so nothing was read."""
    bad = tmp_path / "corrupt.h5ad"
    bad.write_bytes(b"\x89HDF\r\n" + os.urandom(2000))
    db = tmp_path / "mlruns" / "mlflow.db"
    cfg = compose("data=h5ad", f"data.path={bad}", "consensus.min_clusters=1", f"tracking.uri=sqlite:///{db}")
    _raises(ConfigError, lambda: run(cfg, tmp_path / "run"), "consensus.min_clusters")
    # nothing happened: no run directory, no tracking store, no MLflow run
    assert not (tmp_path / "run").exists()
    assert not db.exists()
    # the same config with the key fixed fails on the file, naming it
    cfg["consensus"]["min_clusters"] = 2
    cfg["tracking"]["enabled"] = False
    _raises(InputError, lambda: run(cfg, tmp_path / "run"), "data.path", str(bad), "cannot read")


def test_unreachable_tracking_server_fails_fast_before_reading_data(compose, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bad = tmp_path / "corrupt.h5ad"
    bad.write_bytes(b"not hdf5")
    cfg = compose("data=h5ad", f"data.path={bad}", f"tracking.uri=http://alice:s3cr3t@127.0.0.1:{port}",
                  "tracking.connect_timeout_s=2")
    msg = _raises(TrackingError, lambda: run(cfg, tmp_path / "run"), "tracking.uri", "unreachable")
    assert "s3cr3t" not in msg and "alice:***@127.0.0.1" in msg


# ----------------------------------------------------------------------------- files


def _write_good_h5ad(path):
    a = _counts(30, 20)
    a.write_h5ad(path)
    return a


def test_missing_file():
    _raises(InputError, lambda: load_data({"source": "h5ad", "path": "/nonexistent/x.h5ad"}),
            "data.path", "/nonexistent/x.h5ad", "does not exist")


def test_folder_given_for_a_file(tmp_path):
    _raises(InputError, lambda: load_data({"source": "h5ad", "path": str(tmp_path)}), "is a folder", "data=h5ad")


def test_file_given_for_a_folder(tmp_path):
    f = tmp_path / "x.mtx"
    f.write_text("x")
    _raises(InputError, lambda: load_data({"source": "tenx_mtx", "path": str(f)}), "must be a folder")


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "hdf5_not_anndata"])
def test_corrupt_h5ad(tmp_path, kind):
    good = tmp_path / "good.h5ad"
    _write_good_h5ad(good)
    bad = tmp_path / f"{kind}.h5ad"
    data = good.read_bytes()
    if kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        bad.write_bytes(b"")
    else:
        import h5py

        with h5py.File(bad, "w") as f:
            f.create_dataset("something", data=np.arange(3))
    _raises(InputError, lambda: load_data({"source": "h5ad", "path": str(bad)}), "data.path", str(bad),
            "cannot read", "data=h5ad")
    assert load_data({"source": "h5ad", "path": str(good)}).shape == (30, 20)  # the reader itself works


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    f = tmp_path / "locked.h5ad"
    _write_good_h5ad(f)
    f.chmod(0)
    _raises(InputError, lambda: load_data({"source": "h5ad", "path": str(f)}), "not readable", str(f))


def test_h5ad_without_matrix(tmp_path):
    a = ad.AnnData(obs={"x": np.arange(5).astype(str)})
    a.obs_names = [f"s{i}" for i in range(5)]
    p = tmp_path / "noX.h5ad"
    a.write_h5ad(p)
    _raises(InputError, lambda: load_data({"source": "h5ad", "path": str(p)}), "0 genes", str(p))


def test_corrupt_10x_h5(tmp_path):
    bad = tmp_path / "filtered_feature_bc_matrix.h5"
    bad.write_bytes(b"garbage")
    _raises(InputError, lambda: load_data({"source": "tenx_h5", "path": str(bad)}), "cannot read", "data=tenx_h5")


def test_credentials_in_data_path_are_not_echoed():
    msg = _raises(InputError, lambda: load_data({"source": "h5ad", "path": "https://bob:hunter2@example.org/x.h5ad"}),
                  "does not exist")
    assert "hunter2" not in msg


# ----------------------------------------------------------------------------- security


@pytest.mark.parametrize("raw,secret", [
    ("postgresql+psycopg2://tardis:pw@127.0.0.1:5433/db", "pw@"),
    ("postgresql://u:p%40ss%2Fw@h/db", "p%40ss"),
    ("postgresql://u:pa@ss@h/db", "pa@ss"),
    ("mysql://u:a:b:c@h/db", "a:b:c"),
    ("http://u:tok@host/a and https://v:tok2@k/b", "tok"),
    ("sqlite:///x.db?password=hunter2&mode=ro", "hunter2"),
    ("HTTPS://U:SeCrEt@H", "SeCrEt"),
])
def test_redact_hides_passwords(raw, secret):
    out = redact(raw)
    assert secret not in out, out
    assert "***" in out


def test_redact_hides_password_with_empty_user():
    # Optuna's redis storage and many Redis clients take redis://:password@host
    assert "onlypassword" not in redact("redis://:onlypassword@h:6379/0")


def test_redact_leaves_plain_values_alone():
    for v in ("sqlite:////tmp/mlflow.db", "/data/x.h5ad", "http://127.0.0.1:5000", "file:///tmp/a", 3, None, 1.5):
        assert redact(v) == v


def test_safe_params_and_redact_tree():
    p = safe_params({"tracking.uri": "http://a:b@h", "sweep.storage": "postgresql://u:secret@h/db",
                     "db_password": "plain", "api_token": "abc", "empty_token": None,
                     "list": ["http://u:pw1@h"], "long": "x" * 7000})
    assert p["tracking.uri"] == "http://a:***@h"
    assert "secret" not in p["sweep.storage"]
    assert p["db_password"] == "***" and p["api_token"] == "***" and p["empty_token"] == "null"
    assert "pw1" not in p["list"]
    assert len(p["long"]) == 6000
    tree = redact_tree({"sweep": {"storage": "postgresql://u:secret@h/db", "password": "x"},
                        "tracking": {"tags": {"note": "see http://u:t0k@h"}}})
    text = yaml.safe_dump(tree)
    assert "secret" not in text and "t0k" not in text and tree["sweep"]["password"] == "***"


def test_run_dir_config_and_overrides_hold_no_credentials(compose, tmp_path):
    """The run directory's config.yaml/overrides.txt are written before compute: check them."""
    secret = "Sup3rS3cret"
    overrides = [f"tracking.tags.store=postgresql://u:{secret}@127.0.0.1:5433/db",
                 "data.n_spots=50", "data.n_genes=10", "data.n_programs=2", "data.n_markers=3",
                 "factorize.n_components=10", "tracking.enabled=false"]
    cfg = compose(*[o if not o.startswith("tracking.tags") else "+" + o for o in overrides])
    with pytest.raises(ConfigError):  # n_components too large: stops after the files are written
        run(cfg, tmp_path / "run", overrides=overrides)
    cfg_text = (tmp_path / "run" / "config.yaml").read_text()
    ovr_text = (tmp_path / "run" / "overrides.txt").read_text()
    assert "u:***@127.0.0.1" in cfg_text and "u:***@127.0.0.1" in ovr_text
    assert secret not in cfg_text and secret not in ovr_text


def test_postgres_script_binds_localhost_only():
    text = (REPO / "scripts" / "start_postgres.sh").read_text()
    assert "listen_addresses=127.0.0.1" in text
    assert "0.0.0.0" not in text and "listen_addresses='*'" not in text and "listen_addresses=*" not in text
    # the URL it prints points at loopback too
    assert "@127.0.0.1:" in text
