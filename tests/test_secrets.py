"""A planted password never reaches a file, a log line or the terminal (issue 12).

Real runs of the command line: a run tracked on a real ``mlflow server`` whose URI holds
the password, a sweep with the same tracking URI, and failed runs (a data.path URL with
credentials, an unreachable tracking server, an unreachable PostgreSQL sweep storage).
Afterwards every byte written under the run's root (run and sweep folders, ``.hydra/``,
Hydra's job logs, the MLflow stores of client and server, the stage cache) and the
captured stdout/stderr are searched for the password: zero hits. Each case also checks
that the redacted form was written (the value did go through the file, redacted).
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from _ports import mlflow_server

PW = "PlAnTeD9pw"  # found nowhere else
SMALL = ["data.n_spots=150", "data.n_genes=200", "data.n_programs=3", "data.n_markers=15",
         "factorize.n_components=4", "factorize.n_replicates=3", "factorize.max_iter=60", "consensus.n_resamples=5",
         "tracking.log_plots=false",
         "save_result=results"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (it ignores the basic-auth credentials)."""
    tmp = tmp_path_factory.mktemp("secret_server")
    with mlflow_server(tmp) as (_, port):
        yield port, tmp


def _cli(root: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TARDIS_EXP_PROGRESS": "0"}
    env.pop("HYDRA_FULL_ERROR", None)
    # "-m" (multirun) goes first, before any override
    cmd = [sys.executable, "-m", "tardis_exp", *[a for a in args if a == "-m"], f"paths.root_dir={root}",
           *[a for a in args if a != "-m"]]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, env=env)


def _hits(folder: Path, needle: str) -> list[str]:
    found = []
    for p in folder.rglob("*"):
        if p.is_file() and needle.encode() in p.read_bytes():
            found.append(str(p.relative_to(folder)))
    return found


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_run_and_sweep_on_a_server_with_a_password_write_it_nowhere(server, tmp_path):
    port, server_dir = server
    uri = f"http://alice:{PW}@127.0.0.1:{port}"
    tag = f"+tracking.tags.store=postgresql://bob:{PW}@127.0.0.1:5432/db"
    run = _cli(tmp_path, f"tracking.uri={uri}", tag, *SMALL)
    assert run.returncode == 0, run.stderr[-3000:]
    sweep = _cli(tmp_path, "-m", "sweep=k_range", "hydra.sweeper.n_trials=1", f"tracking.uri={uri}", tag, *SMALL)
    assert sweep.returncode == 0, sweep.stderr[-3000:]

    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "result.h5ad").is_file()
    hydra_files = [p for p in _files(tmp_path / "outputs") if p.parent.name == ".hydra"]
    # a run's three files and, for the sweep, the trial's three
    assert len(hydra_files) >= 6, hydra_files
    # the values went through Hydra's files, redacted
    for name in ("overrides.yaml", "hydra.yaml"):
        text = (runs[0] / ".hydra" / name).read_text()
        assert f"alice:***@127.0.0.1:{port}" in text and "bob:***@127.0.0.1" in text, text
    assert "alice:***@" in (runs[0] / ".hydra" / "config.yaml").read_text()
    assert (tmp_path / "outputs" / "multiruns").is_dir()

    # the server got the runs (params, tags, the dataset), the password not
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    exp = client.get_experiment_by_name("tardis-exp")
    logged = client.search_runs([exp.experiment_id])
    # run plumbing (tracking.*) is not a param; the planted tag arrived, redacted
    assert any(r.data.tags.get("store", "").startswith("postgresql://bob:***@") for r in logged)
    assert any("mlflow.parentRunId" not in r.data.tags and r.info.status == "FINISHED" for r in logged)

    assert _hits(tmp_path, PW) == []
    assert _hits(server_dir, PW) == []
    for out in (run, sweep):
        assert PW not in out.stdout and PW not in out.stderr


def test_failed_runs_write_the_password_nowhere(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    outs = [
        # a data.path URL with credentials: refused before anything is written
        _cli(tmp_path, "data=h5ad", f"data.path=https://carol:{PW}@example.org/x.h5ad"),
        # an unreachable tracking server with credentials: fails before the data is read
        _cli(tmp_path, f"tracking.uri=http://alice:{PW}@127.0.0.1:{dead}", "tracking.connect_timeout_s=2", *SMALL),
        # an unreachable PostgreSQL sweep storage with credentials
        _cli(tmp_path, "-m", "sweep=k_range", "hydra.sweeper.n_trials=1",
             f"hydra.sweeper.storage=postgresql://dave:{PW}@127.0.0.1:{dead}/optuna", *SMALL),
    ]
    for out in outs:
        assert out.returncode == 2, out.stderr[-3000:]
        # one line that names the problem, credentials masked
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("tardis-exp: error:") and "***@" in last, out.stderr[-2000:]
        assert PW not in out.stdout and PW not in out.stderr
    assert "data.path" in outs[0].stderr and "tracking.uri" in outs[1].stderr
    assert "hydra.sweeper.storage" in outs[2].stderr and "Traceback" not in outs[2].stderr
    # the tracking failure kept its run folder (config written, redacted); the refused
    # data.path left no run folder at all
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs
    assert "alice:***@" in (runs[0] / "config.yaml").read_text()
    assert "alice:***@" in (runs[0] / ".hydra" / "overrides.yaml").read_text()
    assert _files(tmp_path / "outputs")
    assert _hits(tmp_path, PW) == []


def test_hydra_failure_line_is_redacted():
    """Hydra prints ``Error executing job with overrides: [...]`` from the job's overrides
    when a task crashes; the callback redacts them before Hydra reads them."""
    from hydra.core.utils import JobReturn, JobStatus

    from tardis_exp.redact_hydra import RedactSecrets

    ret = JobReturn(overrides=[f"tracking.uri=http://alice:{PW}@h:5000", "data.n_spots=10"],
                    status=JobStatus.FAILED)
    ret.return_value = RuntimeError("boom")
    RedactSecrets().on_job_end(config=None, job_return=ret)
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(RuntimeError, match="boom"):
        ret.return_value  # noqa: B018 -- Hydra writes the line here
    assert "Error executing job with overrides" in err.getvalue()
    assert PW not in err.getvalue() and "alice:***@h:5000" in err.getvalue()


def test_log_lines_are_redacted(caplog):
    import logging

    from tardis_exp.redact_hydra import install_log_redaction

    install_log_redaction()
    log = logging.getLogger("tardis_exp.test_secrets")
    with caplog.at_level(logging.INFO):
        log.info("connecting to %s", f"postgresql://u:{PW}@h/db")
        try:
            raise ValueError(f"cannot open http://u:{PW}@h")
        except ValueError:
            log.exception("failed")
    text = "\n".join(caplog.messages) + "\n".join(r.exc_text or "" for r in caplog.records)
    assert "u:***@h/db" in text and "u:***@h" in text
    assert PW not in caplog.text


def test_dataset_name_and_source_are_redacted(tmp_path):
    """``data.name`` defaults to the raw ``data.path``: MLflow's dataset gets it redacted."""
    import mlflow

    from tardis_exp.tracking import Tracker

    db = tmp_path / "m.db"
    t = Tracker(uri=f"sqlite:///{db}", experiment="e")
    with t.run(local_dir=tmp_path) as parent:
        t.log_input((3, 4), name=f"s3://eve:{PW}@bucket/x.h5ad", digest="0" * 16,
                    source=f"s3://eve:{PW}@bucket/x.h5ad")
    run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(parent.run_id)
    ds = run.inputs.dataset_inputs[0].dataset
    assert ds.name == "s3://eve:***@bucket/x.h5ad"
    assert PW not in ds.source and PW not in ds.name
    assert PW.encode() not in db.read_bytes()
