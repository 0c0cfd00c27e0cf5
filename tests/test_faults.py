"""Faults and runaways end in one clear line, early, and lose nothing finished (issue 12).

Each case injects a real fault -- a full file system (a 20 MB tmpfs, mounted when the
tests run as root), SIGTERM and SIGINT during the factorization, another user's cache
entries (a child process running as ``nobody``), an unreachable database -- or a bad
input, and checks the message, what was kept and what was not left behind. The table
of inputs and messages is docs/troubleshooting-faults.md.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from tardis_exp.cache import StageCache
from tardis_exp.consensus import check_resources
from tardis_exp.errors import ConfigError, InputError, TrackingError
from tardis_exp.pipeline import _atomic_write, run
from tardis_exp.tracking import Tracker, sqlalchemy_uri

SMALL = ["data.n_spots=150", "data.n_genes=200", "data.n_programs=3", "data.n_markers=15", "factorize.n_components=4",
         "factorize.n_replicates=3", "factorize.max_iter=60", "consensus.n_resamples=5", "tracking.log_plots=false"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _cli(root: Path, *args: str, timeout: int = 600, **kw):
    env = {**os.environ, "TARDIS_EXP_PROGRESS": "0"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "tardis_exp", *[a for a in args if a == "-m"], f"paths.root_dir={root}",
           *[a for a in args if a != "-m"]]
    if kw.pop("popen", False):
        # SIGINT as at a terminal: a suite started in the background (`bash scripts/test.sh &`)
        # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt in the run
        return subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, env=env)


def _runs(db: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("tardis-exp")
    # stage runs by name; the parent (named after its overrides) under "pipeline"
    return {("pipeline" if "mlflow.parentRunId" not in r.data.tags else r.info.run_name): r
            for r in client.search_runs([exp.experiment_id])} if exp else {}


@pytest.fixture
def tmpfs():
    """A 20 MB tmpfs (root only: mount(2) needs it); skipped elsewhere."""
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    d = Path(tempfile.mkdtemp(prefix="tardis_tmpfs_"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
        d.rmdir()


def _fill(folder: Path, leave_kb: int) -> None:
    """Fill the file system of ``folder`` up to ``leave_kb`` KiB free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_kb * 1024))


# ----------------------------------------------------------------------------- full disk


def test_full_output_disk_is_one_line_and_keeps_finished_outputs(tmpfs, tmp_path):
    out_dir = tmpfs / "out"
    out_dir.mkdir()
    _fill(tmpfs, leave_kb=150)  # the config and tables fit (~50 KB), result.h5ad (~370 KB) does not
    r = _cli(tmp_path, f"paths.output_dir={out_dir}", *SMALL)
    # before: HDF5 error stacks and a segmentation fault (exit 139)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("tardis-exp: error: cannot write result.h5ad in ") and "no space left" in err[-1]
    assert "Traceback" not in r.stderr and "HDF5" not in r.stderr
    (run_dir,) = (out_dir / "runs").iterdir()
    assert str(run_dir) in err[-1]
    # finished outputs intact, no partial result, no temporary file
    import pandas as pd

    assert len(pd.read_csv(run_dir / "programs.tsv", sep="\t")) > 0
    assert pd.read_csv(run_dir / "usages.tsv.gz", sep="\t", index_col=0).shape[0] == 150
    assert not (run_dir / "result.h5ad").exists()
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    assert _runs(tmp_path / "mlruns" / "mlflow.db")["pipeline"].info.status == "FAILED"


def test_full_cache_disk_warns_and_the_run_finishes(tmpfs, tmp_path, compose, caplog):
    _fill(tmpfs, leave_kb=64)
    cfg = compose(*SMALL, "cache.enabled=true", f"cache.dir={tmpfs / 'cache'}", "tracking.enabled=false")
    metrics = run(cfg, tmp_path / "run")
    assert metrics["best_k"] >= 2 and (tmp_path / "run" / "result.h5ad").is_file()
    assert "could not store the preprocess result" in caplog.text and "No space left" in caplog.text
    assert not list((tmpfs / "cache").rglob(".tmp-*"))  # temporary entries removed


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_marks_the_run_killed_and_leaves_no_partial_file(tmp_path, sig, code):
    p = _cli(tmp_path, "data.n_spots=1500", "data.n_genes=1500", "factorize.n_replicates=200",
             "factorize.max_iter=400", "factorize.tol=0", "tracking.log_plots=false", popen=True)
    try:
        deadline = time.time() + 400
        db = tmp_path / "mlruns" / "mlflow.db"
        while time.time() < deadline:  # wait for the factorize stage's MLflow run
            if _stage_started(db, "factorize"):
                break
            assert p.poll() is None, p.communicate()[1][-2000:]
            time.sleep(0.5)
        time.sleep(1)
        p.send_signal(sig)
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # say where the run was, not only that it did not stop
            p.kill()
            pytest.fail(f"the run did not stop within 120 s of {sig.name}; its stderr:\n{p.communicate()[1][-3000:]}")
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("tardis-exp: ") and "KILLED" in err
    runs = _runs(tmp_path / "mlruns" / "mlflow.db")
    assert runs["pipeline"].info.status == "KILLED"
    assert runs["factorize"].info.status == "KILLED"
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert not (run_dir / "result.h5ad").exists() and not (run_dir / "programs.tsv").exists()
    assert not [q for q in run_dir.rglob("*") if q.name.endswith(".tmp")]


def _stage_started(db: Path, name: str) -> bool:
    import sqlite3

    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT count(*) FROM runs WHERE name = ?", (name,)).fetchone()[0] > 0
    except sqlite3.Error:  # the schema is being created
        return False


def test_atomic_write_leaves_nothing_on_interrupt(tmp_path):
    target = tmp_path / "programs.tsv"
    target.write_text("finished\n")

    def half(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _atomic_write(target, half)
    assert target.read_text() == "finished\n"  # the earlier file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["programs.tsv"]


# ----------------------------------------------------------------------------- resource bounds


def test_spots_consensus_k_range_is_checked_against_the_data(compose, tmp_path):
    db = tmp_path / "mlruns" / "mlflow.db"
    cfg = compose("data.n_spots=900", "data.n_genes=800", "data.n_programs=3", "data.n_markers=20",
                  "consensus=spots", "consensus.max_clusters=5000", "factorize.n_replicates=1",
                  "tracking.log_plots=false", f"tracking.uri=sqlite:///{db}")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as ei:
        run(cfg, tmp_path / "run")
    msg = str(ei.value)
    assert "consensus.max_clusters=5000" in msg and "719 clusters" in msg and "900 spots" in msg
    assert " GB" in msg and "K 4..719" in msg
    assert time.perf_counter() - t0 < 120  # not a run that grows to 7 GB
    fac = _runs(db)["factorize"]
    assert fac.info.status == "FAILED" and "reconstruction_error_min" not in fac.data.metrics


def test_spots_consensus_memory_beyond_the_machine_is_refused():
    with pytest.raises(ConfigError) as ei:
        check_resources((2000, 3000), method="spots", min_clusters=4, max_clusters=200, n_resamples=100000,
                        resample_frac=0.8, max_spots=2000)
    assert "needs about" in str(ei.value) and "GB is available" in str(ei.value)
    # an ordinary range passes
    check_resources((2000, 3000), method="spots", min_clusters=4, max_clusters=10, n_resamples=20)


def test_three_spots_fail_before_the_factorization(tmp_path, compose):
    rng = np.random.default_rng(0)
    a = ad.AnnData(X=rng.poisson(5, size=(3, 500)).astype(np.float32))
    a.obs_names = ["s0", "s1", "s2"]
    a.var_names = [f"g{i}" for i in range(500)]
    a.write_h5ad(tmp_path / "three.h5ad")
    cfg = compose("data=h5ad", f"data.path={tmp_path / 'three.h5ad'}", "factorize.n_components=2",
                  "tracking.enabled=false")
    # before: sklearn's silhouette ValueError in the score stage, after all the compute
    with pytest.raises(ConfigError, match=r"has 3 spots, too few for consensus.min_clusters=4"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "programs.tsv").exists()


def test_duplicate_spot_names(tmp_path):
    from tardis_exp.preprocess import preprocess

    rng = np.random.default_rng(0)
    a = ad.AnnData(X=rng.poisson(5, size=(20, 30)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own "not unique" warning
        a.obs_names = ["s0", "s1"] * 10
    a.var_names = [f"g{i}" for i in range(30)]
    with pytest.raises(InputError, match=r"18 duplicated spot names in obs_names .*preprocess.make_unique=true"):
        preprocess(a)
    with pytest.warns(UserWarning, match="18 duplicated spot names made unique"):
        out = preprocess(a, make_unique=True, n_top_genes=None, min_cells=0, min_counts=0)
    assert out.obs_names.is_unique and out.n_obs == 20


# ----------------------------------------------------------------------------- stores


def test_unreachable_postgres_tracking_store_fails_in_seconds():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(TrackingError) as ei:
        Tracker(uri=f"postgresql://u:pw@127.0.0.1:{port}/mlflow", connect_timeout_s=3).precheck()
    assert time.perf_counter() - t0 < 10  # MLflow alone retried for ~110 s
    assert "cannot connect to the database" in str(ei.value) and "u:***@" in str(ei.value)


def test_bare_postgresql_url_uses_the_installed_driver():
    import importlib.util

    if importlib.util.find_spec("psycopg2") is not None:
        assert sqlalchemy_uri("postgresql://u:p@h/db") == "postgresql+psycopg2://u:p@h/db"
    assert sqlalchemy_uri("postgresql+psycopg://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert sqlalchemy_uri("sqlite:///x.db") == "sqlite:///x.db"
    url = os.environ.get("TARDIS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("TARDIS_TEST_POSTGRES_URL not set (scripts/start_postgres.sh)")
    # a real connection through the bare URL (no MLflow tables: MLflow's and Optuna's
    # alembic_version would collide in the test database the sweeper tests use)
    bare = "postgresql://" + url.split("://", 1)[1]
    t = Tracker(uri=bare, experiment="bare-url")
    assert t.uri.startswith("postgresql+psycopg")
    t.precheck()  # before: "No module named 'psycopg'" from SQLAlchemy 2.1's default driver


# ----------------------------------------------------------------------------- config errors


def test_config_error_leaves_no_run_folder_and_no_mlflow_run(tmp_path):
    r = _cli(tmp_path, "cache.max_size_gb=-1", *SMALL)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "tardis-exp: error: cache.max_size_gb must be > 0, got -1"
    assert not list((tmp_path / "outputs" / "runs").glob("*")) if (tmp_path / "outputs").exists() else True
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


# ----------------------------------------------------------------------------- shared cache


def _entry_modes(root: Path):
    return {p.relative_to(root): p.stat().st_mode & 0o777 for p in root.rglob("*")}


def test_shared_cache_entries_follow_the_umask(tmp_path):
    from tardis_exp.synthetic import make_synthetic

    a = make_synthetic(n_spots=40, n_genes=30, n_programs=2, n_markers=5, seed=0)
    old = os.umask(0o002)  # a group that shares a cache: umask 002
    try:
        c = StageCache(tmp_path / "cache")
        assert c.put("preprocess", "k" * 64, a)
        assert c.put("factorize", "f" * 64, {"obsm/X_nmf": np.ones((3, 2))})
    finally:
        os.umask(old)
    modes = _entry_modes(tmp_path / "cache")
    # before: entry folders 0700 (tempfile.mkdtemp), unreadable to the group
    assert modes[Path("preprocess") / ("k" * 64)] == 0o775
    assert modes[Path("factorize") / ("f" * 64) / "data.npz"] == 0o664
    assert all(m & 0o060 == 0o060 for m in modes.values()), modes


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run a child process as another user")
def test_another_users_unreadable_entries_are_skipped_and_reported(tmp_path):
    from tardis_exp.synthetic import make_synthetic

    shared = Path(tempfile.mkdtemp(prefix="tardis_shared_", dir="/tmp"))
    try:
        os.chmod(shared, 0o777)
        a = make_synthetic(n_spots=40, n_genes=30, n_programs=2, n_markers=5, seed=0)
        old = os.umask(0o077)  # a user with a private umask wrote these entries
        try:
            c = StageCache(shared / "cache")
            assert c.put("preprocess", "k" * 64, a)
        finally:
            os.umask(old)
        # the interpreter lives under /root here: import first, then become "nobody"
        script = textwrap.dedent(f"""
            import os, warnings, json, numpy, h5py, anndata, tardis_exp.data
            from tardis_exp.cache import StageCache
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
            c = StageCache({str(shared / 'cache')!r})
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                got = c.get("preprocess", "k" * 64)
                stored = c.put("factorize", "f" * 64, {{"obsm/X_nmf": __import__("numpy").ones((3, 2))}})
                c.evict()
            print("got", got is None, "stored", stored, "unreadable", len(c.unreadable))
            print("warned", any("skipping unreadable preprocess entry" in str(x.message) for x in w))
        """)
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/tmp",
                           env={**os.environ, "HOME": "/tmp"}, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]  # before: PermissionError
        assert "got True stored False unreadable 1" in r.stdout and "warned True" in r.stdout, r.stdout
        assert (shared / "cache" / "preprocess" / ("k" * 64) / "meta.json").is_file()  # not deleted
    finally:
        subprocess.run(["rm", "-rf", str(shared)])
