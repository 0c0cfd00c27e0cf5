"""Every run recorded in MLflow: the embedded SQLite store and a real ``mlflow server``.

The pipeline runs on small synthetic data with the real ``conf/`` (Hydra compose API);
what MLflow holds is read back through ``MlflowClient`` and the REST API and compared
with what the run wrote into its own ``result.h5ad`` and with the config it was given.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")
from hydra import compose, initialize_config_dir  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from tardis_exp.errors import InputError, TrackingError  # noqa: E402
from tardis_exp.pipeline import run  # noqa: E402

CONF = str(Path(__file__).resolve().parent.parent / "conf")
SMALL = ["data.n_spots=900", "data.n_genes=800", "data.n_programs=4", "factorize.n_components=6",
         "factorize.n_replicates=4", "consensus.n_resamples=20", "preprocess.n_top_genes=500"]
STAGES = ("preprocess", "factorize", "consensus", "score")
SCIENCE = ("data", "preprocess", "factorize", "consensus", "score")
SECRET = "s3cr3t-pw"
DB_URI = f"postgresql://alice:{SECRET}@db.example.org:5432/exp"


def make_cfg(root: Path, name: str, *overrides: str) -> tuple[dict, Path, list[str]]:
    """The real config, composed as ``tardis-exp`` would, anchored in ``root``."""
    run_dir = root / "runs" / name
    ov = [f"paths.root_dir={root}", f"paths.run_dir={run_dir}", *SMALL, *overrides]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=ov)
    return OmegaConf.to_container(cfg, resolve=True), run_dir, ov


def leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def as_param(v) -> str:
    return "null" if v is None else str(v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(uri: str, endpoint: str, params: dict | None = None, body: dict | None = None) -> dict:
    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def launch_server(tmp: Path) -> tuple[subprocess.Popen, str, str]:
    """``mlflow server`` on a free port of 127.0.0.1, SQLite backend, proxied artifacts."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend = f"sqlite:///{tmp / 'server.db'}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: faster start
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", backend, "--artifacts-destination", str(tmp / "server-artifacts"),
         "--workers", "1"],
        stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    return proc, f"http://127.0.0.1:{port}", backend


def wait_ready(proc: subprocess.Popen, uri: str, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not answer /health within {timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    # the server runs uvicorn as a child: end the process group we started
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """Two real servers started side by side: one to read back, one to lose mid-run."""
    tmp = tmp_path_factory.mktemp("mlflow_servers")
    started = {name: launch_server(tmp / name) for name in ("main", "doomed")}
    try:
        for name, (proc, uri, _) in started.items():
            wait_ready(proc, uri, tmp / name / "server.log")
        yield started
    finally:
        for proc, _, _ in started.values():
            stop_server(proc)


@pytest.fixture(scope="session")
def server(servers):
    return servers["main"][1]


@pytest.fixture(scope="module")
def sqlite_runs(tmp_path_factory):
    """Two runs into the default store (SQLite in <root>/mlruns): 6 and 5 components.

    Both carry a credential in a tag and in ``data.path`` (synthetic data ignores the
    path), which must never reach MLflow; they differ by one override of the science
    (``factorize.n_components``). The first is named by ``tracking.run_name``, the second
    after its overrides.
    """
    root = tmp_path_factory.mktemp("root")
    out = {}
    secret = [f"+tracking.tags.db={DB_URI}", f"+data.path={DB_URI}"]
    for name, extra in (("k6", [*secret, "tracking.run_name=k6"]),
                        ("k5", [*secret, "factorize.n_components=5"])):
        cfg, run_dir, ov = make_cfg(root, name, *extra)
        metrics = run(cfg, run_dir, overrides=ov)
        out[name] = {"cfg": cfg, "run_dir": run_dir, "metrics": metrics}
    out["uri"] = out["k6"]["cfg"]["tracking"]["uri"]
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def server_run(server, tmp_path_factory):
    """One run against the real server, credentials in the tracking URI."""
    root = tmp_path_factory.mktemp("root_srv")
    port = urllib.parse.urlsplit(server).port
    uri = f"http://bob:{SECRET}@127.0.0.1:{port}"
    cfg, run_dir, ov = make_cfg(root, "srv", f"tracking.uri={uri}", "tracking.experiment=srv-exp")
    metrics = run(cfg, run_dir, overrides=ov)
    return {"cfg": cfg, "run_dir": run_dir, "metrics": metrics, "uri": server}


def check_run(client: MlflowClient, parent_id: str, cfg: dict, dl: Path) -> dict:
    """Everything the issue asks of one run, read back through ``client``; returns the children."""
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    exp_id = parent.info.experiment_id
    children = {r.info.run_name: r for r in client.search_runs(
        [exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")}
    assert sorted(children) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in children.values())

    # params: every leaf of the science sections, dotted, equal to the config value; no plumbing
    p = parent.data.params
    science = {k: v for k, v in leaves(cfg) if k.split(".")[0] in SCIENCE}
    assert set(p) == set(science)
    for key, value in science.items():
        if SECRET in str(value):
            assert SECRET not in p[key] and "***" in p[key], key
        else:
            assert p[key] == as_param(value), key
    for stage in STAGES:  # each stage's own section on its child, with its prefix
        cp = children[stage].data.params
        assert cp == {f"{stage}.{k}": as_param(v) for k, v in leaves(cfg[stage])}

    # the result the run logged: ground truth for the metrics
    path = client.download_artifacts(parent_id, "result.h5ad", str(dl))
    res = ad.read_h5ad(path)
    c, nmf, m = res.uns["nmf_consensus"], res.uns["nmf"], res.uns["nmf_metrics"]
    ks = [int(k) for k in c["k_values"]]
    # the configured range, clipped at the top when a resample holds too few components
    assert ks == list(range(cfg["consensus"]["min_clusters"], max(ks) + 1))
    assert max(ks) <= cfg["consensus"]["max_clusters"]

    cons = children["consensus"].info.run_id
    best = ks.index(int(c["best_k"]))
    cm = children["consensus"].data.metrics
    for key in ("pac", "cophenetic", "delta_area", "silhouette"):
        # the per-K curve under its own key, step = K; the headline key holds the chosen K's value
        hist = sorted(client.get_metric_history(cons, f"consensus.{key}_by_k"), key=lambda x: x.step)
        finite = np.isfinite(np.asarray(c[key], float))  # NaN (silhouette of a singleton K) is not logged
        assert [h.step for h in hist] == [k for k, f in zip(ks, finite) if f]
        np.testing.assert_allclose([h.value for h in hist], np.asarray(c[key], float)[finite], rtol=1e-12)
        assert [h.step for h in client.get_metric_history(cons, f"consensus.{key}")] == [0]
        assert cm[f"consensus.{key}"] == pytest.approx(float(c[key][best]), rel=1e-12)
        assert parent.data.metrics[f"consensus.{key}"] == cm[f"consensus.{key}"]
    assert cm["best_k"] == c["best_k"]

    fac = children["factorize"].info.run_id
    hist = sorted(client.get_metric_history(fac, "reconstruction_error_by_replicate"), key=lambda x: x.step)
    assert [h.step for h in hist] == list(range(cfg["factorize"]["n_replicates"]))
    np.testing.assert_allclose([h.value for h in hist], nmf["errors"], rtol=1e-12)
    # the same key means the same on the stage and the parent: the best replicate's error
    assert children["factorize"].data.metrics["reconstruction_error"] == pytest.approx(
        float(np.min(nmf["errors"])), rel=1e-12)
    assert len(client.get_metric_history(fac, "reconstruction_error")) == 1

    sm = children["score"].data.metrics
    for key in ("silhouette", "morans_i_mean", "ari_truth", "program_recovery"):
        assert sm[key] == pytest.approx(float(m[key]), rel=1e-12)
    for stage in STAGES:
        assert children[stage].data.metrics["duration_s"] > 0

    # run times are the pipeline's, not the store thread's (which opens the store while
    # the data loads): stages nest in the parent, follow each other, and last as long
    # as the pipeline measured them
    info = {s: children[s].info for s in STAGES}
    assert parent.info.start_time <= info["preprocess"].start_time
    for a, b in zip(STAGES, STAGES[1:]):
        assert info[a].end_time <= info[b].start_time, (a, b)
    assert info["score"].end_time <= parent.info.end_time
    for stage in STAGES:
        wall = (info[stage].end_time - info[stage].start_time) / 1000
        assert wall == pytest.approx(children[stage].data.metrics["duration_s"], abs=0.05), stage

    pm = parent.data.metrics
    assert pm["best_k"] == c["best_k"]
    assert pm["reconstruction_error"] == pytest.approx(float(np.min(nmf["errors"])), rel=1e-12)
    assert pm["program_recovery"] == pytest.approx(float(m["program_recovery"]), rel=1e-12)
    assert pm["duration_s"] >= sum(children[s].data.metrics["duration_s"] for s in STAGES)

    # tags and the input dataset
    tags = parent.data.tags
    from tardis_exp import __version__
    from tardis_exp.data import digest, load_data

    expected_digest = digest(load_data(cfg["data"]))  # recomputed from the same data
    assert tags["tardis_exp.version"] == __version__
    assert tags["data.digest"] == expected_digest
    assert len(tags["git_commit"]) in (40, 7) or tags["git_commit"] == "unknown"
    ds = parent.inputs.dataset_inputs
    assert len(ds) == 1 and ds[0].dataset.digest == expected_digest and ds[0].dataset.name == "synthetic"
    assert json.loads(ds[0].dataset.profile) == {"n_obs": cfg["data"]["n_spots"], "n_vars": cfg["data"]["n_genes"]}

    # artifacts: tables, config, every plot decodes
    names = {a.path for a in client.list_artifacts(parent_id)}
    assert {"config.yaml", "overrides.txt", "programs.tsv", "usages.tsv.gz", "result.h5ad", "plots"} <= names
    plots = {Path(a.path).name for a in client.list_artifacts(parent_id, "plots")}
    assert plots == {"consensus_matrices.png", "consensus_cdf.png", "k_selection.png",
                     "reconstruction_error.png", "program_scores.png", "top_genes_dotplot.png"}
    import matplotlib.image as mpimg
    import pandas as pd

    for name in plots:
        img = mpimg.imread(client.download_artifacts(parent_id, f"plots/{name}", str(dl)))
        assert img.ndim == 3 and img.shape[0] > 150 and img.shape[1] > 150 and img.std() > 0.01, name
    usages = pd.read_csv(client.download_artifacts(parent_id, "usages.tsv.gz", str(dl)), sep="\t", index_col=0)
    np.testing.assert_allclose(usages.to_numpy(), res.obsm["X_nmf_consensus"], rtol=1e-6)
    programs = pd.read_csv(client.download_artifacts(parent_id, "programs.tsv", str(dl)), sep="\t")
    assert sorted(programs["program"].unique()) == list(range(c["best_k"]))
    return children


def test_default_sqlite_store(sqlite_runs, tmp_path):
    r = sqlite_runs["k6"]
    uri = sqlite_runs["uri"]
    # the default store is anchored at the project root, not at the run directory
    assert uri == f"sqlite:///{sqlite_runs['root']}/mlruns/mlflow.db"
    assert (sqlite_runs["root"] / "mlruns" / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=uri)
    parent_id = r["metrics"]["mlflow_run_id"]
    check_run(client, parent_id, r["cfg"], tmp_path)
    assert client.get_run(parent_id).info.run_name == "k6"
    art = client.get_run(parent_id).info.artifact_uri
    assert art.startswith((sqlite_runs["root"] / "mlruns" / "artifacts").as_uri())


def test_run_names_and_descriptions(sqlite_runs):
    """tracking.run_name wins; else the run is named after its science overrides, in order."""
    client = MlflowClient(tracking_uri=sqlite_runs["uri"])
    k6 = client.get_run(sqlite_runs["k6"]["metrics"]["mlflow_run_id"])
    k5 = client.get_run(sqlite_runs["k5"]["metrics"]["mlflow_run_id"])
    assert k6.info.run_name == "k6"
    # paths.* and tracking.* overrides are plumbing; a path value shows its file name (no
    # credential); a key overridden twice counts once, at its last value; the method's
    # sections come before the data's, so what differs shows first in a cut column
    assert k5.info.run_name == ("n_replicates=4 n_components=5 n_resamples=20 n_top_genes=500 "
                                "n_spots=900 n_genes=800 n_programs=4 path=exp · k5")  # · run folder id
    note = k5.data.tags["mlflow.note.content"]
    m = sqlite_runs["k5"]["metrics"]
    assert "`tardis-exp data.n_spots=900 " in note and "factorize.n_components=5`" in note
    assert "factorize.n_components=6" not in note and "paths.root_dir" not in note
    assert f"best K = {int(m['best_k'])}" in note
    assert f"consensus.silhouette = {m['consensus.silhouette']:.4g}" in note
    exp = client.get_experiment(k5.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # model-training view, not GenAI
    assert "consensus.*_by_k" in exp.tags["mlflow.note.content"]
    # the saved view of the runs table, in MLflow's envelope: its state names the headline columns
    view = json.loads(exp.tags["mlflow.sharedViewState.headline"])
    assert view["name"] == "headline metrics" and isinstance(view["createdAt"], int)
    assert "metrics.`best_k`" in json.loads(view["state"])["selectedColumns"]


def test_compare_two_runs_shows_the_one_changed_param(sqlite_runs):
    """What the compare view diffs: the parents' params differ in exactly the one override."""
    client = MlflowClient(tracking_uri=sqlite_runs["uri"])
    a, b = (client.get_run(sqlite_runs[n]["metrics"]["mlflow_run_id"]).data.params for n in ("k6", "k5"))
    assert set(a) == set(b)
    assert {k for k in a if a[k] != b[k]} == {"factorize.n_components"}
    assert (a["factorize.n_components"], b["factorize.n_components"]) == ("6", "5")
    # and the stage runs: only the factorize stage's section differs, with its prefix
    for stage in STAGES:
        sa, sb = (client.search_runs([client.get_run(sqlite_runs[n]["metrics"]["mlflow_run_id"]).info.experiment_id],
                                     f"tags.`mlflow.parentRunId` = '{sqlite_runs[n]['metrics']['mlflow_run_id']}' "
                                     f"and tags.stage = '{stage}'")[0].data.params for n in ("k6", "k5"))
        assert all(k.startswith(f"{stage}.") for k in sa)
        assert {k for k in sa if sa[k] != sb[k]} == ({"factorize.n_components"} if stage == "factorize" else set())


def test_one_meaning_per_metric_key(sqlite_runs):
    from _mlflow_keys import check_metric_keys

    client = MlflowClient(tracking_uri=sqlite_runs["uri"])
    exp = client.get_experiment_by_name("tardis-exp")
    seen = check_metric_keys(client, exp.experiment_id)
    # the keys that used to mean two things now hold one value per run, the series their own key
    assert seen["consensus.pac"] == {"pipeline", "consensus"} and seen["consensus.pac_by_k"] == {"consensus"}
    assert seen["reconstruction_error"] == {"pipeline", "factorize"}
    assert seen["reconstruction_error_by_replicate"] == {"factorize"}


def test_real_server_client_and_rest(server_run, tmp_path):
    uri = server_run["uri"]
    parent_id = server_run["metrics"]["mlflow_run_id"]
    client = MlflowClient(tracking_uri=uri)
    children = check_run(client, parent_id, server_run["cfg"], tmp_path)

    # the same through the REST API
    exp = rest(uri, "experiments/get-by-name", {"experiment_name": "srv-exp"})["experiment"]
    found = rest(uri, "runs/search", body={"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    by_id = {r["info"]["run_id"]: r for r in found}
    assert parent_id in by_id
    kids = [r for r in found if {"key": "mlflow.parentRunId", "value": parent_id} in r["data"].get("tags", [])]
    assert sorted(r["info"]["run_name"] for r in kids) == sorted(STAGES)
    params = {p["key"]: p["value"] for p in by_id[parent_id]["data"]["params"]}
    assert params["factorize.n_components"] == "6" and params["consensus.n_resamples"] == "20"
    assert not any(k.startswith(("tracking.", "paths.")) for k in params)  # plumbing: config.yaml only

    cons = children["consensus"].info.run_id
    hist = rest(uri, "metrics/get-history", {"run_id": cons, "metric_key": "consensus.pac_by_k"})["metrics"]
    (tmp_path / "rest").mkdir()
    res = ad.read_h5ad(client.download_artifacts(parent_id, "result.h5ad", str(tmp_path / "rest")))
    c = res.uns["nmf_consensus"]
    hist = sorted(hist, key=lambda h: h["step"])
    assert [h["step"] for h in hist] == [int(k) for k in c["k_values"]]
    np.testing.assert_allclose([h["value"] for h in hist], c["pac"], rtol=1e-12)
    listed = rest(uri, "artifacts/list", {"run_id": parent_id, "path": "plots"})["files"]
    assert len([f for f in listed if f["path"].endswith(".png")]) == 6
    # the credential from the tracking URI is nowhere in what the server holds
    everything = json.dumps(found) + (tmp_path / "rest").joinpath("result.h5ad").read_bytes().decode("latin-1")
    assert SECRET not in everything


def test_compare_runs_by_param_and_metric(sqlite_runs):
    uri = sqlite_runs["uri"]
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        for name, k in (("k6", "6"), ("k5", "5")):
            # stage runs carry their section too (factorize.n_components): the parents have the version tag
            df = mlflow.search_runs(experiment_names=["tardis-exp"],
                                    filter_string=f"params.`factorize.n_components` = '{k}' "
                                                  "and tags.`tardis_exp.version` != ''")
            assert list(df["run_id"]) == [sqlite_runs[name]["metrics"]["mlflow_run_id"]]
            assert df["metrics.reconstruction_error"].iloc[0] == pytest.approx(
                sqlite_runs[name]["metrics"]["reconstruction_error"], rel=1e-12)
        both = mlflow.search_runs(experiment_names=["tardis-exp"],
                                  filter_string="metrics.best_k >= 2 and tags.`tardis_exp.version` != ''",
                                  order_by=["metrics.reconstruction_error ASC"])
        # parents only carry the headline metrics: two rows, sorted by their own errors
        errs = {sqlite_runs[n]["metrics"]["mlflow_run_id"]: sqlite_runs[n]["metrics"]["reconstruction_error"]
                for n in ("k6", "k5")}
        assert set(both["run_id"]) == set(errs)
        assert list(both["run_id"]) == sorted(errs, key=errs.get)
        assert set(both["params.factorize.n_components"]) == {"5", "6"}
    finally:
        mlflow.set_tracking_uri(old)


def test_credentials_never_logged(sqlite_runs, tmp_path):
    r = sqlite_runs["k6"]
    client = MlflowClient(tracking_uri=sqlite_runs["uri"])
    pid = r["metrics"]["mlflow_run_id"]
    parent = client.get_run(pid)
    assert parent.data.tags["db"] == "postgresql://alice:***@db.example.org:5432/exp"
    assert parent.data.params["data.path"] == "postgresql://alice:***@db.example.org:5432/exp"
    runs = client.search_runs([parent.info.experiment_id])
    blob = json.dumps([[r.data.params, r.data.tags] for r in runs])
    blob += json.dumps([d.dataset.source for d in parent.inputs.dataset_inputs])
    for name in ("config.yaml", "overrides.txt"):
        blob += Path(client.download_artifacts(pid, name, str(tmp_path))).read_text()
    blob += (r["run_dir"] / "config.yaml").read_text()
    assert "db.example.org" in blob and SECRET not in blob


def test_failing_stage_marks_runs_failed(sqlite_runs, tmp_path):
    # passes validation (0 < resample_frac <= 1) but leaves < 3 components per resample;
    # same store as the other runs (no second database to create), its own experiment
    cfg, run_dir, ov = make_cfg(sqlite_runs["root"], "fail", "consensus.resample_frac=0.1",
                                "tracking.experiment=failing")
    with pytest.raises(InputError, match="resample_frac"):
        run(cfg, run_dir, overrides=ov)
    client = MlflowClient(tracking_uri=cfg["tracking"]["uri"])
    exp = client.get_experiment_by_name("failing")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FAILED"
    pid = parent[0].info.run_id
    kids = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid}
    assert {k: r.info.status for k, r in kids.items()} == {
        "preprocess": "FINISHED", "factorize": "FINISHED", "consensus": "FAILED"}
    for rid in (pid, kids["consensus"].info.run_id):
        tb = Path(client.download_artifacts(rid, "traceback.txt", str(tmp_path / rid))).read_text()
        assert "InputError" in tb and "resample_frac" in tb
        assert "InputError" in client.get_run(rid).data.tags["error"]
    # what was logged before the failure is kept
    errs = client.get_metric_history(kids["factorize"].info.run_id, "reconstruction_error_by_replicate")
    assert len(errs) == cfg["factorize"]["n_replicates"]
    assert parent[0].data.params["consensus.resample_frac"] == "0.1"
    assert {a.path for a in client.list_artifacts(pid)} >= {"config.yaml", "overrides.txt", "traceback.txt"}
    assert "InputError" in (run_dir / "traceback.txt").read_text()


def test_unreachable_server_fails_before_compute(tmp_path):
    cfg, run_dir, ov = make_cfg(tmp_path, "down", f"tracking.uri=http://127.0.0.1:{free_port()}")
    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match=r"tracking.uri=http://127.0.0.1:\d+ is unreachable"):
        run(cfg, run_dir, overrides=ov)
    assert time.perf_counter() - t0 < 15
    assert not (run_dir / "result.h5ad").exists() and not (run_dir / "programs.tsv").exists()


def test_unusable_store_fails_before_the_factorization(tmp_path, caplog):
    """A store that fails to open on the store thread stops the run before the heavy compute."""
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not an SQLite database" * 100)
    cfg, run_dir, ov = make_cfg(tmp_path, "corrupt", f"tracking.uri=sqlite:///{db}")
    with caplog.at_level("INFO"), pytest.raises(TrackingError, match=r"cannot use tracking.uri=sqlite:///"):
        run(cfg, run_dir, overrides=ov)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "preprocess:" in logged and "factorize:" not in logged  # stopped between the two
    assert not (run_dir / "result.h5ad").exists()
    assert "open store" in (run_dir / "tracking_errors.log").read_text()


def test_store_lost_mid_run_keeps_local_result(servers, tmp_path, caplog):
    """The server dies while the run computes: the run finishes, the local result is whole."""
    proc, uri, backend = servers["doomed"]
    cfg, run_dir, ov = make_cfg(tmp_path, "lost", f"tracking.uri={uri}", "tracking.experiment=lost")
    killed = threading.Event()

    def kill_when_consensus_starts():
        deadline = time.time() + 120
        while time.time() < deadline and not killed.is_set():
            try:
                exp = rest(uri, "experiments/get-by-name", {"experiment_name": "lost"})["experiment"]
                found = rest(uri, "runs/search", body={"experiment_ids": [exp["experiment_id"]],
                                                       "filter": "attributes.run_name = 'consensus'"})
                if found.get("runs"):
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed.set()
                    return
            except OSError:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_consensus_starts, daemon=True)
    watcher.start()
    try:
        with caplog.at_level("WARNING", logger="tardis_exp.tracking"):
            metrics = run(cfg, run_dir, overrides=ov)
    finally:
        watcher.join(timeout=5)
        stop_server(proc)
    assert killed.is_set()
    res = ad.read_h5ad(run_dir / "result.h5ad")
    assert metrics["best_k"] == res.uns["nmf_consensus"]["best_k"]
    assert (run_dir / "plots" / "k_selection.png").is_file()
    log_text = (run_dir / "tracking_errors.log").read_text()
    assert "result.h5ad" in log_text  # logged after the kill: recorded as not logged
    # three failed calls in a row and the tracker stops calling the dead store
    assert "skipped (store unreachable)" in log_text
    assert any("failed 3 times in a row" in r.getMessage() for r in caplog.records)
    assert any("MLflow logging failed" in r.getMessage() for r in caplog.records)
    # what reached the store before it died is there (read the server's database directly)
    client = MlflowClient(tracking_uri=backend)
    exp = client.get_experiment_by_name("lost")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert runs["factorize"].info.status == "FINISHED"
    assert len(client.get_metric_history(runs["factorize"].info.run_id, "reconstruction_error_by_replicate")) == 4


def test_plots_survive_missing_inputs(sqlite_runs, caplog):
    from tardis_exp.plots import make_plots

    a = ad.read_h5ad(sqlite_runs["k6"]["run_dir"] / "result.h5ad")
    del a.obsm["spatial"]  # no coordinates: score heatmap instead of maps
    del a.uns["nmf"]  # reconstruction errors unavailable: that plot alone is skipped
    out = sqlite_runs["root"] / "plots_partial"
    with caplog.at_level("WARNING", logger="tardis_exp.plots"):
        written = make_plots(a, out)
    assert sorted(p.name for p in written) == ["consensus_cdf.png", "consensus_matrices.png", "k_selection.png",
                                               "program_scores.png", "top_genes_dotplot.png"]
    assert any("reconstruction_error.png skipped" in r.getMessage() for r in caplog.records)
    import matplotlib.image as mpimg

    img = mpimg.imread(out / "program_scores.png")
    assert img.shape[0] > 200 and img.std() > 0.01


def test_plots_command_draws_a_finished_run(sqlite_runs, tmp_path, capsys):
    """``python -m tardis_exp.plots result.h5ad``: what sweep trials skip, drawn afterwards."""
    from tardis_exp.plots import PLOTS, main

    out = tmp_path / "figs"
    assert main([str(sqlite_runs["k5"]["run_dir"] / "result.h5ad"), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(set(PLOTS) - {"programs_by_section.png"})  # one sample
    import matplotlib.image as mpimg

    assert mpimg.imread(out / "k_selection.png").std() > 0.01
    # not a result: a one-line error, exit 2
    plain = tmp_path / "plain.h5ad"
    ad.AnnData(np.ones((3, 2), dtype=np.float32)).write_h5ad(plain)
    assert main([str(plain)]) == 2
    assert "holds no consensus result" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.h5ad")]) == 2


def test_failed_metric_batches_count_towards_giving_up(tmp_path):
    """Each failed batch counts once: after three in a row the tracker stops calling the store."""
    import sqlite3

    from tardis_exp.tracking import Tracker

    db = tmp_path / "mlruns" / "mlflow.db"
    tr = Tracker(uri=f"sqlite:///{db}", artifact_location=str(tmp_path / "mlruns" / "artifacts"))
    with tr.run(local_dir=tmp_path) as parent:
        tr.wait_ready()
        parent.log_metrics({"before": 1.0})
        parent.flush()
        tr.drain()
        with sqlite3.connect(db) as con:  # the store breaks under a running run
            con.execute("DROP TABLE metrics")
        for i in range(5):
            parent.log_metrics({f"after_{i}": float(i)})
            parent.flush()
    lines = (tmp_path / "tracking_errors.log").read_text().splitlines()
    failed = [ln for ln in lines if ln.startswith("log metrics") and "skipped" not in ln]
    skipped = [ln for ln in lines if ln.startswith("log metrics") and "skipped (store unreachable)" in ln]
    assert len(failed) == 3 and len(skipped) >= 2, lines
    assert MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(parent.run_id).info.status == "FINISHED"
