"""The ``tardis-exp`` command: one-line errors for user mistakes, failed sweep trials, SIGKILL safety.

Everything here runs the real console script in a subprocess.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

EXE = shutil.which("tardis-exp") or ""
# a small, fast configuration of the default synthetic data
SMALL = ["data.n_spots=400", "data.n_genes=300", "data.n_programs=3", "data.n_markers=20",
         "factorize.n_components=6", "factorize.n_replicates=3", "factorize.max_iter=200",
         "consensus.min_clusters=2", "consensus.max_clusters=4", "consensus.n_resamples=10",
         "tracking.log_plots=false"]


def _cmd(*args):
    return [EXE, *args] if EXE else [sys.executable, "-m", "tardis_exp", *args]


def _env():
    env = {**os.environ, "TARDIS_EXP_PROGRESS": "0", "MPLBACKEND": "Agg"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _cli(tmp_path, *args, timeout=300, env=None):
    return subprocess.run(_cmd(*args, f"paths.root_dir={tmp_path}"), cwd=tmp_path, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("tardis-exp: error: "), lines[0]
    assert "Traceback" not in p.stderr + p.stdout
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_missing_data_file_is_one_line(tmp_path):
    p = _cli(tmp_path, "data=h5ad", "data.path=/nonexistent.h5ad", "tracking.enabled=false")
    _one_line_error(p, "data.path", "/nonexistent.h5ad", "does not exist")
    assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").rglob("*.h5ad"))


def test_corrupt_data_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(b"definitely not HDF5")
    _one_line_error(_cli(tmp_path, "data=h5ad", f"data.path={bad}", "tracking.enabled=false"),
                    "cannot read", str(bad))


@pytest.mark.parametrize("args,needles", [
    (["consensus.foo=1"], ["consensus.foo", "Key 'foo' not in"]),  # Hydra's own error (the structured schema)
    (["data=nosuch"], ["data/nosuch", "h5ad"]),  # unknown config group option
    (["factorize.n_components=[1"], ["cannot parse the override", "factorize.n_components=[1"]),
    (["consensus.min_clusters=abc"], ["consensus.min_clusters", "'abc'"]),  # a wrong type
    (["+consensus.foo=1"], ["unknown key(s) consensus.foo"]),  # a new key forced in with +
    (["consensus.resample_frac=2"], ["consensus.resample_frac", "(0, 1]"]),
    (["tracking.uri=http://u:pw123@127.0.0.1:9", "tracking.connect_timeout_s=1"], ["tracking.uri", "u:***@"]),
])
def test_config_mistakes_are_one_line(tmp_path, args, needles):
    line = _one_line_error(_cli(tmp_path, *args), *needles)
    assert "pw123" not in line


def test_full_traceback_on_request(tmp_path):
    env = {**_env(), "HYDRA_FULL_ERROR": "1"}
    p = subprocess.run(_cmd("consensus.foo=1", f"paths.root_dir={tmp_path}"), cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_invalid_trial_in_a_sweep_fails_only_that_trial(tmp_path):
    """Multirun: a ConfigError propagates to the sweeper, which records FAIL and goes on."""
    optuna = pytest.importorskip("optuna")
    journal = tmp_path / "journal.log"
    # a plain checkout (not reinstalled since the plugin was added) finds it through PYTHONPATH
    root = str(Path(__file__).resolve().parent.parent)
    env = {**_env(), "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    p = _cli(tmp_path, "-m", "hydra/sweeper=tardis_optuna", "hydra.sweeper.n_trials=4",
             "hydra.sweeper.study_name=bad_cfg", f"hydra.sweeper.storage={journal}",
             "hydra.sweeper.sampler.name=grid", "consensus.min_clusters=choice(1,2)",
             "hydra.sweeper.objectives=[{metric:best_k,direction:maximize}]",
             *[a for a in SMALL if not a.startswith("consensus.min_clusters")], "tracking.enabled=false",
             "save_result=false", timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    study = optuna.load_study(study_name="bad_cfg", storage=JournalStorage(JournalFileBackend(str(journal))))
    by_value = {}
    for t in study.trials:
        by_value.setdefault(t.params["consensus.min_clusters"], set()).add(t.state)
    assert by_value[1] == {TrialState.FAIL} and by_value[2] == {TrialState.COMPLETE}, by_value
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert all("consensus.min_clusters" in t.user_attrs.get("fail_reason", "") for t in failed)


# --------------------------------------------------------------------------- SIGKILL


def _kill_trial(tmp_path: Path, i: int, mode: str, rng: random.Random, max_delay: float = 4.0) -> dict:
    run_dir = tmp_path / f"run{i}"
    proc = subprocess.Popen(_cmd(*SMALL, "tracking.enabled=false", f"paths.root_dir={tmp_path}",
                                 f"hydra.run.dir={run_dir}"),
                            cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed, during_write = False, False
    deadline = time.monotonic() + 240
    try:
        if mode == "write":
            # kill as soon as an output is being written (a temp file beside programs.tsv,
            # usages.tsv.gz or result.h5ad, or the result itself if a writer wrote in place);
            # result.h5ad is built in memory and written in one write, so its own window is short
            while proc.poll() is None and time.monotonic() < deadline:
                if run_dir.exists() and (any(run_dir.glob(".*.tmp")) or (run_dir / "result.h5ad").exists()):
                    during_write = any(run_dir.glob(".*.tmp"))
                    break
                time.sleep(0.001)
        elif mode == "delay":
            while proc.poll() is None and not run_dir.exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, max_delay))
        else:  # control: no fault, the run must finish with a complete result
            proc.wait(timeout=240)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed = True
    finally:
        proc.wait(timeout=60)
    return {"killed": killed, "during_write": during_write, "run_dir": run_dir, "rc": proc.returncode}


def test_sigkill_never_leaves_a_partial_result(tmp_path):
    """SIGKILL at random points and mid-write: any result.h5ad present is complete."""
    rng = random.Random(1234)
    # the control run first: its duration bounds the random kill delays, so they land mid-run
    t0 = time.monotonic()
    control = _kill_trial(tmp_path, 0, "none", rng)
    run_time = time.monotonic() - t0
    trials = [_kill_trial(tmp_path, i + 1, "delay", rng, max_delay=0.3 * run_time) for i in range(3)]
    # kills mid-write: the write windows are short (milliseconds on small data), so a poll can
    # miss one on a loaded machine; try until two have landed (at most 6 tries)
    for i in range(6):
        if sum(t["killed"] and t["during_write"] for t in trials) >= 2:
            break
        trials.append(_kill_trial(tmp_path, 10 + i, "write", rng))
    trials.append(control)
    n_killed = sum(t["killed"] for t in trials)
    n_mid_write = sum(t["killed"] and t["during_write"] for t in trials)
    n_results = 0
    for t in trials:
        res = t["run_dir"] / "result.h5ad"
        if res.exists():
            a = ad.read_h5ad(res)  # loads completely
            assert a.obsm["X_nmf"].shape[1] == 6 and np.isfinite(a.obsm["X_nmf"]).all()
            assert "nmf_consensus" in a.uns and a.obs["nmf_cluster"].notna().all()
            n_results += 1
        for name in ("programs.tsv", "usages.tsv.gz"):  # written atomically too: complete or absent
            if (t["run_dir"] / name).exists():
                assert len(pd.read_csv(t["run_dir"] / name, sep="\t")) > 0
    print(f"SIGKILL trials: {len(trials)}, killed: {n_killed}, mid-write: {n_mid_write}, "
          f"complete results: {n_results}, partial results: 0")
    assert n_killed >= 4, "the fault injection did not hit running processes"
    assert trials[-1]["rc"] == 0 and (trials[-1]["run_dir"] / "result.h5ad").exists()  # the control run
    assert n_mid_write >= 2, "no kill landed while the outputs were being written"


HEAVY = ("scanpy", "anndata", "sklearn", "numba", "mlflow", "optuna")


def _in_process(args: list[str], cwd: Path) -> dict:
    """Run the console entry point in a fresh interpreter; what it printed, its exit status and
    the heavy packages it loaded by the time it answered."""
    code = ("import io, json, sys, contextlib\n"
            f"sys.argv = ['tardis-exp', *{args!r}]\n"
            "from tardis_exp.cli import main\n"
            "out, err = io.StringIO(), io.StringIO()\n"
            "code = 0\n"
            "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
            "    try:\n        main()\n    except SystemExit as e:\n        code = e.code or 0\n"
            f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
            "print(json.dumps({'out': out.getvalue(), 'err': err.getvalue(), 'code': code, 'heavy': heavy}))\n")
    import json

    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_help_and_input_errors_answer_before_the_scientific_stack_loads(tmp_path):
    """--help, a bad value and a missing file are answered without importing scanpy, MLflow & co
    (the seconds they take to load): the config is checked before the pipeline is imported."""
    r = _in_process(["--help"], tmp_path)
    assert r["code"] == 0 and r["heavy"] == []
    assert "data: brunet_leukemia, brunet_medulloblastoma, h5ad" in r["out"] and "sweep: k_range" in r["out"]
    assert "n_programs: 6" in r["out"]  # the composed config
    r = _in_process(["data=h5ad", "--help"], tmp_path)
    assert "path: ???" in r["out"] and r["heavy"] == []
    r = _in_process(["data=h5ad", "data.path=nope.h5ad"], tmp_path)
    assert r["code"] == 2 and r["heavy"] == [], r
    assert r["err"].strip() == "tardis-exp: error: data.path: nope.h5ad does not exist"
    r = _in_process(["consensus.k_selection=nope"], tmp_path)
    assert r["code"] == 2 and r["heavy"] == [] and "consensus.k_selection" in r["err"]
    assert not (tmp_path / "mlruns").exists()  # nothing was created for a refused config
