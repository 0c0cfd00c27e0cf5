"""Tests of the tardis_optuna Hydra sweeper (hydra_plugins/tardis_optuna_sweeper).

The toy Hydra app in tests/sweeper_app is run as a subprocess against real Optuna
storages (journal file, sqlite, optionally PostgreSQL) and a real MLflow sqlite store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import optuna
import pytest
import yaml
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain checkout: make hydra_plugins/tardis_optuna_sweeper importable
    sys.path.insert(0, str(ROOT))
APP = ROOT / "tests" / "sweeper_app" / "app.py"
LOSS = "hydra.sweeper.objectives=[{metric:loss,direction:minimize}]"
PAIR = "hydra.sweeper.ordered_pairs=[{low_key:lo,high_key:hi,low:2,high:12}]"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _cmd(tmp: Path, *args: str, study: str = "toy", storage: Optional[str] = None,
         sweep_dir: str = "multirun") -> List[str]:
    cmd = [
        sys.executable, str(APP), "-m",
        "hydra/sweeper=tardis_optuna",
        f"hydra.sweep.dir={tmp}/{sweep_dir}",
        f"hydra.sweeper.study_name={study}",
        f"paths.root_dir={tmp}",
    ]
    if storage:
        cmd.append(f"hydra.sweeper.storage={storage}")
    return cmd + list(args)


def run_app(tmp: Path, *args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(
        _cmd(tmp, *args, **kw), cwd=tmp, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and p.returncode != 0:
        raise AssertionError(f"app failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def start_app(tmp: Path, *args: str, log_name: str = "worker", **kw) -> subprocess.Popen:
    out = open(tmp / f"{log_name}.out", "w")
    return subprocess.Popen(
        _cmd(tmp, *args, **kw), cwd=tmp, env=_env(), stdout=out, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )


def journal(tmp: Path) -> str:
    return str(tmp / "mlruns" / "optuna" / "journal.log")


def load(storage: str, study: str = "toy") -> optuna.Study:
    if storage.endswith(".log"):
        from optuna.storages.journal import JournalFileBackend

        st: object = optuna.storages.JournalStorage(JournalFileBackend(storage))
    else:
        st = storage
    return optuna.load_study(study_name=study, storage=st)


def results(tmp: Path) -> dict:
    return yaml.safe_load((tmp / "multirun" / "optimization_results.yaml").read_text())


def read_log(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- plugin discovery


def test_plugin_is_discovered_and_config_registered() -> None:
    code = (
        "from hydra.core.plugins import Plugins\n"
        "from hydra.plugins.sweeper import Sweeper\n"
        "from hydra.core.config_store import ConfigStore\n"
        "names=[p.__name__ for p in Plugins.instance().discover(Sweeper)]\n"
        "assert 'TardisOptunaSweeper' in names, names\n"
        "assert 'tardis_optuna.yaml' in ConfigStore.instance().list('hydra/sweeper')\n"
        "print('ok')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "ok" in p.stdout


# --------------------------------------------------------------------------- unit-level checks


def test_search_space_parsing() -> None:
    from hydra_plugins.tardis_optuna_sweeper._search_space import build_search_space, format_value
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space = build_search_space(
        {"a": "int(interval(4,30))", "b": "interval(0.1,1)", "c": "tag(log, interval(1e-3,1))",
         "d": "choice(x,y,z)", "e": "range(1,10,2)", "f": 5, "g": "foo",
         "h": {"i": "choice(1,2)"}},
        [{"low_key": "lo", "high_key": "hi", "low": 2, "high": 12}],
        ["a=int(interval(5,6))", "+new=7"],
    )
    dims = {d.key: d.dist for d in space.dims}
    assert dims["a"] == IntDistribution(5, 6)  # command line wins
    assert dims["b"] == FloatDistribution(0.1, 1.0)
    assert dims["c"] == FloatDistribution(1e-3, 1.0, log=True)
    assert dims["d"] == CategoricalDistribution(["x", "y", "z"])
    assert dims["e"] == IntDistribution(1, 9, step=2)
    assert dims["h.i"] == CategoricalDistribution([1, 2])
    assert space.fixed == ["f=5", "g=foo", "+new=7"]
    assert [(p.low_key, p.high_key) for p in space.pairs] == [("lo", "hi")]
    assert format_value("a b") == "'a b'" and format_value(None) == "null" and format_value(True) == "true"


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["hydra.sweeper.sampler.name=bogus"], "hydra.sweeper.sampler.name"),
        (["hydra.sweeper.pruner.name=bogus"], "hydra.sweeper.pruner.name"),
        (["hydra.sweeper.objectives=[{metric:loss,direction:up}]"], "hydra.sweeper.objectives[0].direction"),
        (["hydra.sweeper.objectives=[]"], "hydra.sweeper.objectives"),
        (["hydra.sweeper.sampler.name=grid", "x=interval(0,1)"], "hydra.sweeper.params.x"),
        (["hydra.sweeper.sampler.name=grid", "+hydra.sweeper.params.x='interval(0,1)'"], "hydra.sweeper.params.x"),
    ],
)
def test_config_errors_in_process(overrides: List[str], needle: str, tmp_path: Path) -> None:
    """Configuration errors raise a ValueError naming the key (checked without a subprocess)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.tardis_optuna_sweeper._objectives import parse_objectives
    from hydra_plugins.tardis_optuna_sweeper._samplers import build_pruner, build_sampler
    from hydra_plugins.tardis_optuna_sweeper._search_space import build_search_space

    with initialize_config_dir(str(APP.parent / "conf"), version_base="1.3"):
        objectives = [] if any("objectives" in o for o in overrides) else [LOSS]
        cfg = compose("config", overrides=["hydra/sweeper=tardis_optuna", *objectives]
                      + [o for o in overrides if o.lstrip("+").startswith("hydra.")], return_hydra_config=True)
    s = cfg.hydra.sweeper
    cli = [o for o in overrides if not o.lstrip("+").startswith("hydra.")]
    with pytest.raises(ValueError) as ei:
        objs = parse_objectives(s.objectives)
        space = build_search_space(s.params, s.ordered_pairs, cli)
        build_sampler(s.sampler, space, len(objs))
        build_pruner(s.pruner)
        space.grid() if s.sampler.name == "grid" else None
    assert needle in str(ei.value)
    _ = OverridesParser  # imported to make sure the module is importable


def test_config_error_fails_before_any_trial(tmp_path: Path) -> None:
    p = run_app(tmp_path, LOSS, "hydra.sweeper.sampler.name=bogus", "x=interval(0,1)", check=False)
    assert p.returncode != 0
    assert "hydra.sweeper.sampler.name" in p.stderr
    assert not Path(journal(tmp_path)).exists() or not optuna.get_all_study_names(
        optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal(tmp_path)))
    )


# --------------------------------------------------------------------------- sweeps


def test_tpe_finds_optimum_and_writes_results(tmp_path: Path) -> None:
    run_app(
        tmp_path, LOSS, "x=interval(-1,1)", "y=interval(-1,1)", "k=int(interval(2,12))",
        "hydra.sweeper.n_trials=40", "+hydra.sweeper.sampler.n_startup_trials=10",
    )
    res = results(tmp_path)
    study = load(journal(tmp_path))
    assert len(study.trials) == 40
    best = study.best_trial
    assert res["best_trial"] == best.number
    assert res["best_value"] == pytest.approx(best.value)
    assert res["best_params"] == {"x": best.params["x"], "y": best.params["y"], "k": best.params["k"]}
    # optimum at x=0.3, y=-0.2, k=7 (loss 0)
    assert best.value < 0.05
    assert abs(best.params["x"] - 0.3) < 0.25 and abs(best.params["y"] + 0.2) < 0.25


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid"])
def test_ordered_pair_low_le_high(sampler: str, tmp_path: Path) -> None:
    extra = ["kind=choice(a,b)"] if sampler == "grid" else ["x=interval(0,1)"]
    run_app(tmp_path, LOSS, PAIR, f"hydra.sweeper.sampler.name={sampler}",
            "hydra.sweeper.n_trials=25", "hydra.sweeper.n_jobs=3", *extra)
    study = load(journal(tmp_path))
    assert len(study.trials) == 25
    assert all(t.state == TrialState.COMPLETE for t in study.trials)  # app raises if lo > hi
    pairs = [(t.user_attrs["values"]["lo"], t.user_attrs["values"]["hi"]) for t in study.trials]
    assert all(2 <= lo <= hi <= 12 for lo, hi in pairs), pairs
    if sampler == "grid":
        assert len(set(pairs)) > 10  # grid explores many distinct pairs
        assert len({(p, t.user_attrs["values"]["kind"]) for p, t in zip(pairs, study.trials)}) == 25
    else:
        assert all(t.params["lo"] <= t.params["hi"] for t in study.trials)


def test_failing_and_pruned_trials_do_not_stop_the_sweep(tmp_path: Path) -> None:
    p = run_app(
        tmp_path, LOSS, "x=interval(-1,1)", "fail_if_x_above=0.5", "prune_if_x_below=-0.5",
        "hydra.sweeper.n_trials=12", "hydra.sweeper.n_jobs=2", "hydra.sweeper.sampler.name=random",
    )
    study = load(journal(tmp_path))
    assert len(study.trials) == 12
    by_state = {s: [t for t in study.trials if t.state == s] for s in TrialState}
    assert by_state[TrialState.FAIL] and by_state[TrialState.PRUNED] and by_state[TrialState.COMPLETE]
    assert all(t.params["x"] > 0.5 for t in by_state[TrialState.FAIL])
    assert all(t.params["x"] < -0.5 for t in by_state[TrialState.PRUNED])
    assert "ValueError" in by_state[TrialState.FAIL][0].user_attrs["fail_reason"]
    assert "FAILED" in p.stderr + p.stdout


def test_missing_or_nonfinite_metric_fails_trial_with_message(tmp_path: Path) -> None:
    p = run_app(tmp_path, "hydra.sweeper.objectives=[{metric:nope,direction:minimize}]",
                "x=interval(0,1)", "hydra.sweeper.n_trials=2")
    study = load(journal(tmp_path))
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    reason = study.trials[0].user_attrs["fail_reason"]
    assert "'nope'" in reason and "consensus.cophenetic" in reason and "loss" in reason
    assert "nope" in p.stderr + p.stdout
    run_app(tmp_path, "hydra.sweeper.objectives=[{metric:nan_metric,direction:minimize}]",
            "x=interval(0,1)", "hydra.sweeper.n_trials=1", study="nan")
    t = load(journal(tmp_path), "nan").trials[0]
    assert t.state == TrialState.FAIL and "not finite" in t.user_attrs["fail_reason"]
    # nested lookup
    run_app(tmp_path, "hydra.sweeper.objectives=[{metric:nested.score,direction:maximize}]",
            "x=interval(0,1)", "hydra.sweeper.n_trials=1", study="nested")
    assert load(journal(tmp_path), "nested").trials[0].state == TrialState.COMPLETE


def test_multi_objective_pareto_front(tmp_path: Path) -> None:
    run_app(
        tmp_path, "k=int(interval(2,12))", "x=interval(0,1)",
        "hydra.sweeper.objectives=[{metric:consensus.cophenetic,direction:maximize},"
        "{metric:reconstruction_error,direction:minimize}]",
        "hydra.sweeper.sampler.name=nsga2", "hydra.sweeper.n_trials=10",
    )
    res = results(tmp_path)
    front = res["pareto_front"]
    assert front and all(set(f["values"]) == {"consensus.cophenetic", "reconstruction_error"} for f in front)
    assert load(journal(tmp_path)).directions[0].name == "MAXIMIZE"


@pytest.mark.parametrize("storage_kind", ["journal", "sqlite"])
def test_resume_after_sigkill(storage_kind: str, tmp_path: Path) -> None:
    storage = journal(tmp_path) if storage_kind == "journal" else f"sqlite:///{tmp_path}/optuna.db"
    args = [LOSS, "x=interval(-1,1)", "hydra.sweeper.n_trials=5", "hydra.sweeper.heartbeat_interval=1",
            "hydra.sweeper.grace_period=2", f"log_file={tmp_path}/calls.jsonl"]
    # first run: trial 2 hangs; kill the whole process group while it runs
    p = start_app(tmp_path, *args, "sleep=60", "sleep_call=2", storage=storage,
                  log_name="first")
    deadline = time.time() + 60
    while time.time() < deadline:
        calls = read_log(tmp_path / "calls.jsonl") if (tmp_path / "calls.jsonl").exists() else []
        if len(calls) >= 3:
            break
        time.sleep(0.1)
    else:
        os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError((tmp_path / "first.out").read_text())
    time.sleep(0.3)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    study = load(storage)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 2 and states.count(TrialState.RUNNING) == 1, states
    time.sleep(2.5)  # let the heartbeat of the killed trial expire (grace period 2 s)
    run_app(tmp_path, *args, storage=storage)
    study = load(storage)
    states = {t.number: t.state for t in study.trials}
    assert len(states) == 5, states
    assert states[2] == TrialState.FAIL
    assert [states[i] for i in (0, 1, 3, 4)] == [TrialState.COMPLETE] * 4
    assert "stale" in (study.trials[2].user_attrs.get("fail_reason", "")
                       + study.trials[2].system_attrs.get("fail_reason", "")) or storage_kind == "sqlite"
    if storage_kind == "journal":  # re-running a finished study does not add trials
        run_app(tmp_path, *args, storage=storage)
        assert len(load(storage).trials) == 5


def _two_workers(tmp_path: Path, storage: str, study: str) -> None:
    n_trials = 14
    log = tmp_path / "calls.jsonl"
    args = [LOSS, "x=interval(-1,1)", PAIR, f"hydra.sweeper.n_trials={n_trials}",
            "hydra.sweeper.n_jobs=2", "sleep=0.05", f"log_file={log}"]
    procs = [
        start_app(tmp_path, *args, sweep_dir=f"multirun_{i}",
                  storage=storage, study=study, log_name=f"w{i}")
        for i in range(2)
    ]
    for i, p in enumerate(procs):
        assert p.wait(timeout=120) == 0, (tmp_path / f"w{i}.out").read_text()
    st = load(storage, study)
    numbers = [t.number for t in st.trials]
    assert sorted(numbers) == list(range(n_trials))
    assert all(t.state == TrialState.COMPLETE for t in st.trials)
    calls = read_log(log)
    assert len(calls) == n_trials  # no trial run twice, none lost
    assert len({c["pid"] for c in calls}) == 2  # both workers did work
    # each trial's params were run exactly once
    ran = sorted((c["x"], c["lo"], c["hi"]) for c in calls)
    told = sorted((t.params["x"], t.params["lo"], t.params["hi"]) for t in st.trials)
    assert ran == told
    launched = [results_dir_count(tmp_path / f"multirun_{i}") for i in range(2)]
    assert sum(launched) == n_trials


def results_dir_count(d: Path) -> int:
    return yaml.safe_load((d / "optimization_results.yaml").read_text())["n_launched_by_this_worker"]


def test_two_workers_journal(tmp_path: Path) -> None:
    _two_workers(tmp_path, journal(tmp_path), "two")


@contextmanager
def fresh_postgres_database(url: str):
    """A new, empty database on the server of `url` (dropped afterwards): Optuna's tables
    do not exist yet, so the workers that start on it create them."""
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    name = f"tardis_fresh_{os.getpid()}_{int(time.time() * 1000)}"
    admin = dict(host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database)
    conn = psycopg2.connect(**admin)
    conn.autocommit = True
    try:
        try:
            conn.cursor().execute(f'CREATE DATABASE "{name}"')
        except psycopg2.errors.InsufficientPrivilege:
            pytest.fail(f"role {u.username} may not create databases: ALTER ROLE {u.username} CREATEDB "
                        "(scripts/start_postgres.sh grants it)")
        yield u.set(database=name).render_as_string(hide_password=False)
    finally:
        conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.mark.postgres
def test_two_workers_postgres(tmp_path: Path) -> None:
    """Two workers started at once on a fresh database: both create Optuna's tables
    (UniqueViolation on pg_type before the schema lock), then share the study."""
    url = os.environ.get("TARDIS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("TARDIS_TEST_POSTGRES_URL not set (see scripts/start_postgres.sh)")
    study = f"two_{os.getpid()}_{int(time.time() * 1000)}"
    with fresh_postgres_database(url) as fresh:
        _two_workers(tmp_path, fresh, study)
        for i in range(2):
            out = (tmp_path / f"w{i}.out").read_text()
            assert "Traceback" not in out and "Error" not in out, out
        # the schema is complete and usable after the race
        assert optuna.storages.RDBStorage(fresh).get_all_studies()[0].study_name == study


@pytest.mark.parametrize("preset", ["k_range", "k_range_mo"])
def test_conf_sweep_presets(preset: str, tmp_path: Path) -> None:
    """The presets in conf/sweep compose and run against the toy app."""
    run_app(tmp_path, f"hydra.searchpath=[file://{ROOT / 'conf'}]", f"+sweep={preset}",
            "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2", study=preset)
    study = load(journal(tmp_path), preset)
    assert len(study.trials) == 6 and all(t.state == TrialState.COMPLETE for t in study.trials)
    for t in study.trials:
        v = t.user_attrs["values"]
        assert 4 <= v["factorize.n_components"] <= 16
        assert 2 <= v["consensus.min_clusters"] <= v["consensus.max_clusters"] <= 12
    res = results(tmp_path)
    assert ("pareto_front" in res) == (preset == "k_range_mo")
    assert [o["metric"] for o in res["objectives"]][0] == (
        "consensus.reproducibility" if preset == "k_range" else "consensus.silhouette")


# --------------------------------------------------------------------------- MLflow


def test_mlflow_parent_and_child_runs(tmp_path: Path) -> None:
    from matplotlib.image import imread
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [LOSS, "x=interval(-1,1)", "fail_if_x_above=0.6", f"tracking.uri={uri}",
            "tracking.experiment=toy_exp", "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.sampler.name=random"]
    run_app(tmp_path, *args, study="mlf")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("toy_exp")
    parents = client.search_runs([exp.experiment_id], "tags.`optuna.role` = 'study'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["optuna.study_name"] == "mlf" and parent.info.run_name == "mlf"
    children = client.search_runs([exp.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    study = load(journal(tmp_path), "mlf")
    assert len(children) == len(study.trials) == 6
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    assert sorted(by_number) == list(range(6))
    for t in study.trials:
        r = by_number[t.number]
        assert r.data.tags["optuna.state"] == t.state.name
        if t.state == TrialState.COMPLETE:
            assert r.data.metrics["objective.loss"] == pytest.approx(t.value)
            assert r.data.tags["optuna_trial"] == str(t.number)  # created by the task
        else:
            assert r.info.status == "FAILED" and "ValueError" in r.data.tags["optuna.error"]
    assert any(t.state == TrialState.FAIL for t in study.trials)
    assert any(t.state == TrialState.COMPLETE for t in study.trials)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "best_trials.tsv" in arts and "trials.tsv" in arts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots
    dst = client.download_artifacts(parent.info.run_id, "plots/optimization_history.png", str(tmp_path))
    img = imread(dst)
    assert img.ndim == 3 and img.shape[0] > 100
    tsv = Path(client.download_artifacts(parent.info.run_id, "best_trials.tsv", str(tmp_path))).read_text()
    assert tsv.splitlines()[0].split("\t")[:3] == ["number", "state", "value.loss"]
    assert tsv.splitlines()[1].split("\t")[0] == str(study.best_trial.number)

    # resume with a larger budget: same parent run is reused
    run_app(tmp_path, *args[:-3], "hydra.sweeper.n_trials=8", "hydra.sweeper.sampler.name=random",
            study="mlf")
    parents = client.search_runs([exp.experiment_id], "tags.`optuna.role` = 'study'")
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    children = client.search_runs([exp.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 8


# --------------------------------------------------------------------------- samplers as _target_ configs


def test_sampler_and_pruner_by_name_or_target() -> None:
    """``{name: ...}`` (the presets' form) and ``{_target_: <class>}`` (Hydra's plugin's form)
    build the same Optuna classes; a bad target is one error naming the key."""
    from hydra_plugins.tardis_optuna_sweeper._common import SweeperConfigError
    from hydra_plugins.tardis_optuna_sweeper._samplers import (
        build_pruner, build_sampler, is_grid, sampler_name,
    )
    from hydra_plugins.tardis_optuna_sweeper._search_space import build_search_space

    space = build_search_space({"a": "choice(1,2,3)", "b": "range(0,4)"}, [], [])
    for name, cls in [("tpe", optuna.samplers.TPESampler), ("random", optuna.samplers.RandomSampler),
                      ("grid", optuna.samplers.GridSampler), ("nsga2", optuna.samplers.NSGAIISampler),
                      ("qmc", optuna.samplers.QMCSampler)]:
        by_name = build_sampler({"name": name, "seed": 1}, space, 1)
        by_target = build_sampler({"_target_": f"{cls.__module__}.{cls.__name__}", "seed": 1}, space, 1)
        assert type(by_name) is type(by_target) is cls
    # _target_ wins over the default config's name; short names are kept for the study run
    s = build_sampler({"name": "tpe", "_target_": "optuna.samplers.RandomSampler", "seed": 1}, space, 1)
    assert type(s) is optuna.samplers.RandomSampler
    assert sampler_name({"name": "tpe", "_target_": "optuna.samplers.RandomSampler"}) == "random"
    assert is_grid({"_target_": "optuna.samplers.GridSampler"}) and not is_grid({"name": "tpe"})
    # the grid sampler gets the space: 3 x 4 points, each asked once
    grid = build_sampler({"_target_": "optuna.samplers.GridSampler", "seed": 0}, space, 1)
    study = optuna.create_study(sampler=grid)
    seen = set()
    for i in range(12):
        t = study.ask()
        v = {d.key: d.suggest(t) for d in space.dims}
        seen.add((v["a"], v["b"]))
        if i < 11:  # the last tell of a grid calls study.stop()
            study.tell(t, 0.0)
    assert seen == {(a, b) for a in (1, 2, 3) for b in range(4)}
    assert isinstance(build_pruner({"name": "median", "n_startup_trials": 2}), optuna.pruners.MedianPruner)
    assert isinstance(build_pruner({"_target_": "optuna.pruners.HyperbandPruner"}), optuna.pruners.HyperbandPruner)
    assert isinstance(build_pruner(None), optuna.pruners.NopPruner)
    for cfg, key in [({"_target_": "optuna.samplers.NoSuchSampler"}, "hydra.sweeper.sampler._target_"),
                     ({"_target_": "optuna.pruners.MedianPruner"}, "hydra.sweeper.sampler._target_"),
                     ({"name": "tpe", "bogus_kwarg": 1}, "hydra.sweeper.sampler")]:
        with pytest.raises(SweeperConfigError, match=key.replace(".", r"\.")):
            build_sampler(cfg, space, 1)
    with pytest.raises(SweeperConfigError, match=r"hydra\.sweeper\.pruner\._target_"):
        build_pruner({"_target_": "optuna.samplers.TPESampler"})


# --------------------------------------------------------------------------- max_failure_rate


def test_max_failure_rate_stops_the_sweep_after_writing_results(tmp_path: Path) -> None:
    """As Hydra's Optuna sweeper: once more than ``max_failure_rate`` of the trials failed the
    sweep stops with one error line naming the key; what it found is written first."""
    args = [LOSS, "x=interval(-1,1)", "fail_if_x_above=0.0", "hydra.sweeper.sampler.name=random",
            "hydra.sweeper.n_trials=20", "hydra.sweeper.max_failure_rate=0.25"]
    p = run_app(tmp_path, *args, check=False)
    assert p.returncode != 0
    assert "hydra.sweeper.max_failure_rate=0.25" in p.stderr
    study = load(journal(tmp_path))
    states = [t.state for t in sorted(study.trials, key=lambda t: t.number)]
    # ground truth from the study itself: the first prefix whose failed fraction exceeds 0.25
    stop = next(k for k in range(1, len(states) + 1)
                if sum(s == TrialState.FAIL for s in states[:k]) / k > 0.25)
    assert len(states) == stop < 20
    assert all((t.params["x"] > 0.0) == (t.state == TrialState.FAIL) for t in study.trials)
    res = results(tmp_path)  # the results so far are written before the error
    assert res["n_trials"] == stop and res["n_fail"] == states.count(TrialState.FAIL)
    if TrialState.COMPLETE in states:
        assert res["best_value"] == pytest.approx(study.best_value)
    # (the default, 1.0, never stops: test_failing_and_pruned_trials_do_not_stop_the_sweep)
    # a rate outside [0, 1] is refused before any trial
    bad = run_app(tmp_path, LOSS, "x=interval(-1,1)", "hydra.sweeper.max_failure_rate=2", study="bad", check=False)
    assert bad.returncode != 0 and "hydra.sweeper.max_failure_rate" in bad.stderr
    assert "bad" not in optuna.get_all_study_names(
        optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal(tmp_path))))


# --------------------------------------------------------------------------- MLflow through tardis_exp.tracking


def test_study_experiment_artifact_location_local_store_only(tmp_path: Path) -> None:
    """The study opens its experiment as a pipeline run does (tardis_exp.tracking.Tracker):
    ``tracking.artifact_location`` is used on a local store and never sent to a server,
    which decides its own (the old sweeper sent the client's path to the server)."""
    from mlflow import MlflowClient
    from test_tracking import launch_server, stop_server, wait_ready

    local = tmp_path / "local_artifacts"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_app(tmp_path, LOSS, "x=interval(-1,1)", "hydra.sweeper.n_trials=1", f"tracking.uri={uri}",
            "tracking.experiment=local_exp", f"+tracking.artifact_location={local}", study="local")
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name("local_exp")
    assert exp.artifact_location == local.resolve().as_uri()

    proc, server_uri, _ = launch_server(tmp_path / "server")
    try:
        wait_ready(proc, server_uri, tmp_path / "server" / "server.log")
        client_side = tmp_path / "client_side_artifacts"
        run_app(tmp_path, LOSS, "x=interval(-1,1)", "hydra.sweeper.n_trials=1", f"tracking.uri={server_uri}",
                "tracking.experiment=server_exp", f"+tracking.artifact_location={client_side}", study="srv")
        exp = MlflowClient(tracking_uri=server_uri).get_experiment_by_name("server_exp")
        assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
        assert not client_side.exists()
        parents = MlflowClient(tracking_uri=server_uri).search_runs(
            [exp.experiment_id], "tags.`optuna.role` = 'study'")
        assert [r.data.tags["optuna.study_name"] for r in parents] == ["srv"]
    finally:
        stop_server(proc)
