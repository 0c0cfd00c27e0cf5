"""The k_range sweep preset on the real tardis-exp pipeline (issue 4's "done when", small).

``tardis-exp -m sweep=k_range`` runs as a subprocess on synthetic data with 4 known
programs, against a real Optuna journal and a real MLflow SQLite store, with the stage
cache on (the preset's default). Checked: the best trial's best_k is the true number of
programs, the objective ranks every trial at the true K above every other trial, MLflow
holds study -> trial -> stage runs, and an impossible configuration is a FAIL trial that
does not stop the sweep.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
N_PROGRAMS = 4
DATA = ["data.n_spots=1600", "data.n_genes=1500", f"data.n_programs={N_PROGRAMS}", "factorize.n_replicates=4",
        "consensus.n_resamples=20", "tracking.log_plots=false", "hydra.sweeper.mlflow.log_plots=false"]
STAGES = {"preprocess", "factorize", "consensus", "score"}

slow = pytest.mark.slow


# the preset's objective (conf/sweep/k_range.yaml; docs/validation.md says why)
OBJ = "consensus.reproducibility"

def sweep(root: Path, study: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TARDIS_EXP_PROGRESS="0", MPLBACKEND="Agg")
    # a plain checkout: make hydra_plugins/tardis_optuna_sweeper importable
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "tardis_exp", "-m", "sweep=k_range", f"paths.root_dir={root}",
           f"hydra.sweep.dir={root}/multirun/{study}", f"hydra.sweeper.study_name={study}", *DATA, *args]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"sweep failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    return p


def trial_metrics(root: Path, study: str, number: int) -> dict | None:
    f = root / "multirun" / study / str(number) / "metrics.yaml"
    return yaml.safe_load(f.read_text()) if f.exists() else None


@pytest.fixture(scope="module")
def k_range(tmp_path_factory):
    """One 6-trial TPE sweep of n_components in [3, 8] and the cluster range in [2, 6]."""
    root = tmp_path_factory.mktemp("sweep")
    sweep(root, "k_range", "hydra.sweeper.n_trials=6",
          "hydra.sweeper.params={factorize.n_components:'int(interval(3, 8))'}",
          "hydra.sweeper.ordered_pairs=[{low_key:consensus.min_clusters,high_key:consensus.max_clusters,"
          "low:2,high:6,min_width:1,bound_key:factorize.n_components,bound_when:{consensus.method:components},"
          "label:K}]")
    return root


def _client(root: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db")
    return client, client.get_experiment_by_name("tardis-exp").experiment_id


def _study_runs(root: Path, study: str):
    """The study's parent run and its per-trial runs keyed by trial number."""
    client, exp = _client(root)
    (parent,) = client.search_runs([exp], f"tags.`optuna.role` = 'study' and tags.`optuna.study_name` = '{study}'")
    trials = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, exp, parent, {int(r.data.tags["optuna_trial"]): r for r in trials}


@slow
def test_best_trial_finds_the_true_number_of_programs(k_range):
    res = yaml.safe_load((k_range / "multirun" / "k_range" / "optimization_results.yaml").read_text())
    assert res["n_trials"] == 6 and res["objectives"] == [{"metric": OBJ, "direction": "maximize"}]
    best = trial_metrics(k_range, "k_range", res["best_trial"])
    assert best["best_k"] == N_PROGRAMS
    assert best[OBJ] == pytest.approx(res["best_value"])
    # not one lucky trial: the objective ranks every trial at the true K above all others
    done = [m for m in (trial_metrics(k_range, "k_range", n) for n in range(6)) if m]
    at_truth = [m[OBJ] for m in done if m["best_k"] == N_PROGRAMS]
    elsewhere = [m[OBJ] for m in done if m["best_k"] != N_PROGRAMS]
    assert at_truth and elsewhere, "the sweep should visit K at and away from the truth"
    assert min(at_truth) > max(elsewhere)
    # the journal agrees with what the trials wrote
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(k_range / "mlruns" / "optuna" / "journal.log")))
    study = optuna.load_study(study_name="k_range", storage=storage)
    assert len(study.trials) == 6 and study.best_trial.number == res["best_trial"]


@slow
def test_mlflow_study_trial_stage_nesting_and_cache(k_range):
    client, exp, parent, trials = _study_runs(k_range, "k_range")
    assert sorted(trials) == list(range(6))
    for number, run in trials.items():
        assert run.data.tags["optuna.trial_number"] == str(number)
        assert run.data.tags["optuna.state"] in ("COMPLETE", "FAIL")
        stages = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        names = [s.data.tags["stage"] for s in stages]
        assert len(names) == len(set(names)) and {"preprocess", "factorize"} <= set(names) <= STAGES
        if run.data.tags["optuna.state"] == "COMPLETE":
            assert set(names) == STAGES
            m = trial_metrics(k_range, "k_range", number)
            assert run.info.status == "FINISHED" and m["mlflow_run_id"] == run.info.run_id
            assert run.data.metrics[f"objective.{OBJ}"] == pytest.approx(m[OBJ])
            assert all(s.info.status == "FINISHED" for s in stages)
        by_stage = {s.data.tags["stage"]: s for s in stages}
        # trial 0 stores the preprocessed data; every later trial reuses it
        assert by_stage["preprocess"].data.tags["cache"] == ("miss" if number == 0 else "hit")
        assert by_stage["factorize"].data.tags["cache"] in ("hit", "miss")
    assert parent.data.tags["optuna.study_name"] == "k_range"


@slow
def test_study_run_explains_itself(k_range):
    """Params, description, dataset and headline metrics of the study run; trial names and attrs."""
    import re

    from _mlflow_keys import check_metric_keys

    client, exp, parent, trials = _study_runs(k_range, "k_range")
    p = parent.data.params
    assert p["search.factorize.n_components"] == "int [3, 8]"
    assert p["search.consensus.min_clusters..consensus.max_clusters"] == (
        "consensus.min_clusters <= consensus.max_clusters in int [2, 6], consensus.max_clusters - "
        "consensus.min_clusters >= 1, consensus.max_clusters <= factorize.n_components when consensus.method=components")
    assert (p["study.sampler"], p["study.sampler.seed"], p["study.n_trials"]) == ("tpe", "42", "6")
    assert p["study.objectives"] == f"maximize {OBJ}"
    # the science every trial shares, under the trials' own param keys (the swept keys excluded)
    assert p["data.name"] == "synthetic" and p["factorize.n_replicates"] == "4"
    assert "factorize.n_components" not in p and not any(k.startswith(("paths.", "tracking.")) for k in p)
    assert "sampler tpe" in parent.data.tags["mlflow.note.content"]

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(k_range / "mlruns" / "optuna" / "journal.log")))
    study = optuna.load_study(study_name="k_range", storage=storage)
    assert study.metric_names == [OBJ]  # optuna-dashboard's axis, not "Objective 0"
    best = study.best_trial
    # one table: the study row carries the best trial's values under the trials' keys
    best_run = trials[best.number]
    assert parent.data.tags["optuna.best_trial"] == str(best.number)
    assert parent.data.metrics[OBJ] == pytest.approx(best.value, rel=1e-12)
    for key in ("best_k", "consensus.pac", "reconstruction_error"):
        assert parent.data.metrics[key] == best_run.data.metrics[key], key
    assert best_run.info.run_name in parent.data.tags["mlflow.note.content"]
    assert [d.dataset.digest for d in parent.inputs.dataset_inputs] == \
        [d.dataset.digest for d in best_run.inputs.dataset_inputs]

    names = set()
    for t in study.trials:
        run = trials[t.number]
        v = t.user_attrs["values"]
        assert run.info.run_name == (f"trial {t.number} · n_components={v['factorize.n_components']} · "
                                     f"K {v['consensus.min_clusters']}..{v['consensus.max_clusters']}")
        names.add(run.info.run_name)
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert t.user_attrs["metrics"]["best_k"] == run.data.metrics["best_k"]
            # the trial links its study run
            assert re.search(rf"\(#/experiments/{exp}/runs/{parent.info.run_id}\)", run.data.tags["mlflow.note.content"])
        # the sweeper's plumbing is not a param of the trial
        assert not any(k.startswith(("tracking.", "paths.")) for k in run.data.params)
    assert len(names) == len(study.trials)
    check_metric_keys(client, exp)


@slow
def test_impossible_configuration_fails_the_trial_not_the_sweep(k_range):
    # n_components=1600 cannot be fit to ~1500 genes; the grid visits both values
    sweep(k_range, "bad_rank", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.name=grid",
          "hydra.sweeper.params={factorize.n_components:'choice(4, 1600)'}", "hydra.sweeper.ordered_pairs=[]",
          "consensus.min_clusters=2", "consensus.max_clusters=6")
    res = yaml.safe_load((k_range / "multirun" / "bad_rank" / "optimization_results.yaml").read_text())
    assert (res["n_complete"], res["n_fail"]) == (1, 1)
    assert res["best_params"]["factorize.n_components"] == 4
    client, exp, _, trials = _study_runs(k_range, "bad_rank")
    assert sorted(trials) == [0, 1]
    by_rank = {int(r.data.params["factorize.n_components"]): r for r in trials.values()}
    assert by_rank[4].info.status == "FINISHED"
    failed = by_rank[1600]
    assert failed.info.status == "FAILED" and failed.data.tags["optuna.state"] == "FAIL"
    assert "factorize.n_components=1600" in failed.data.tags["optuna.error"]
    stages = {s.data.tags["stage"]: s for s in
              client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{failed.info.run_id}'")}
    assert stages["preprocess"].info.status == "FINISHED" and stages["factorize"].info.status == "FAILED"
    assert "consensus" not in stages


@slow
def test_best_trial_gets_its_figures_at_the_end(k_range):
    """Trials skip their figures (tracking.log_plots=false); the study draws the best one's."""
    res = yaml.safe_load((k_range / "multirun" / "k_range" / "optimization_results.yaml").read_text())
    best = res["best_trial"]
    from tardis_exp.plots import PLOTS

    # the presets save results without X (save_result=results); the dot plot, which needs
    # X, gets it from the stage cache
    for n in range(res["n_trials"]):
        plots = k_range / "multirun" / "k_range" / str(n) / "plots"
        if n == best:
            assert sorted(p.name for p in plots.iterdir()) == sorted(set(PLOTS) - {"programs_by_section.png"})
        else:
            assert not plots.exists(), n
    client, exp, parent, trials = _study_runs(k_range, "k_range")
    logged = {a.path for a in client.list_artifacts(trials[best].info.run_id, "plots")}
    assert logged == {f"plots/{p}" for p in PLOTS if p != "programs_by_section.png"}
    other = next(n for n in trials if n != best)
    assert not client.list_artifacts(trials[other].info.run_id, "plots")


# --------------------------------------------------------------------------- the search space


def _preset(name: str):
    """A preset's sweeper section, composed from conf/ as ``tardis-exp -m sweep=<name>`` would."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"sweep={name}"], return_hydra_config=True)
    return cfg


@pytest.mark.parametrize("preset", ["k_range", "k_range_mo"])
@pytest.mark.parametrize("method", ["components", "spots"])
def test_preset_search_space_has_no_degenerate_cluster_range(preset, method):
    """200 trials of each preset's space: at least two K, never above the rank (components)."""
    from hydra_plugins.tardis_optuna_sweeper._samplers import build_sampler
    from hydra_plugins.tardis_optuna_sweeper._search_space import build_search_space
    from omegaconf import OmegaConf

    cfg = _preset(preset)
    sw = cfg.hydra.sweeper
    space = build_search_space(sw.params, sw.ordered_pairs, [f"consensus.method={method}"] if method != "components"
                               else [])
    base = lambda key: OmegaConf.select(cfg, key)  # noqa: E731 -- the task config's values
    space.check_pairs(base)
    (pair,) = space.pairs
    assert (pair.low_key, pair.high_key, pair.min_width) == ("consensus.min_clusters", "consensus.max_clusters", 1)
    study = optuna.create_study(sampler=build_sampler(sw.sampler, space, len(sw.objectives)),
                                directions=[o.direction for o in sw.objectives])
    seen, above_rank = set(), 0
    for i in range(200):
        trial = study.ask()
        v = {k: x for _, k, x in space.sample(trial, grid=False, base=base)}
        lo, hi, n = v["consensus.min_clusters"], v["consensus.max_clusters"], v["factorize.n_components"]
        assert 2 <= lo < hi <= 12, v  # at least two K values
        if method == "components":
            assert hi <= n, v  # no more meta-programs than components per replicate
        seen.add((lo, hi))
        above_rank += hi > n
        # a made-up objective, so that TPE and NSGA-II leave their start-up phase
        study.tell(trial, [float(hi - lo + n) / 10 + 0.01 * i] * len(sw.objectives))
    assert len(seen) > 20  # the space is explored, not collapsed onto one range
    if method == "spots":  # the rank does not bound the spots method's K
        assert above_rank > 0


def test_grid_sampler_slides_the_range_under_the_rank():
    from hydra_plugins.tardis_optuna_sweeper._common import SweeperConfigError
    from hydra_plugins.tardis_optuna_sweeper._search_space import build_search_space

    pairs = [{"low_key": "consensus.min_clusters", "high_key": "consensus.max_clusters", "low": 2, "high": 8,
              "min_width": 1, "bound_key": "factorize.n_components", "bound_when": {"consensus.method": "components"}}]
    space = build_search_space({"factorize.n_components": "choice(3, 5)"}, pairs, [])
    base = {"consensus.method": "components"}.get
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(space.grid(), seed=0))
    n_points = len(space.grid()["consensus.min_clusters,consensus.max_clusters"]) * 2
    for i in range(n_points):
        trial = study.ask()
        v = {k: x for _, k, x in space.sample(trial, grid=True, base=base)}
        assert 2 <= v["consensus.min_clusters"] < v["consensus.max_clusters"] <= v["factorize.n_components"], v
        if i < n_points - 1:  # the last tell of a grid calls study.stop()
            study.tell(trial, 0.0)
    # a rank that leaves no room for two K is refused before any trial, naming the keys
    bad = build_search_space({"factorize.n_components": "int(interval(2, 6))"}, pairs, [])
    with pytest.raises(SweeperConfigError, match=r"ordered_pairs\[0\].*factorize.n_components can be 2"):
        bad.check_pairs(base)
