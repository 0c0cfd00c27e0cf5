"""MLflow study tracking: one parent run per study, annotating the trials' own runs.

The store and the experiment are opened by :class:`tardis_exp.tracking.Tracker` (the same
checks, schema lock, experiment tags and ``artifact_location`` handling as a pipeline run:
a local store only, a server decides its own). Each trial is a pipeline run nested under
the study run (``++tracking.parent_run_id``); this module tags those runs with the trial's
state and objective values, and logs the study's tables, plots and best trial at the end.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState
from omegaconf import DictConfig, OmegaConf
from tardis_exp.tracking import (
    Tracker,
    metric_key,
    safe_params,
    science_overrides,
    science_params,
    source_tags,
)

from ._common import METRICS_ATTR, RUN_ID_ATTR, RUN_NAME_ATTR, VALUES_ATTR
from ._objectives import Objective
from ._plots import best_trial_figures, study_plots
from ._samplers import as_dict, pruner_name, sampler_name
from ._search_space import SearchSpace

log = logging.getLogger(__name__)

# best trials whose figures the study draws at its end (trials skip them in the presets)
MAX_BEST_TRIAL_PLOTS = 3


def write_tsv(path: Path, rows: List[Dict[str, Any]]) -> None:
    """Rows of dicts as a table; the columns are every key, in order of first appearance."""
    cols: List[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with open(path, "w") as f:
        f.write("\t".join(cols) + "\n")
        for r in rows:
            f.write("\t".join("" if r.get(k) is None else str(r.get(k)) for k in cols) + "\n")


def _described_space(space: SearchSpace) -> Dict[str, str]:
    """The search space in words; of the fixed overrides only those that change the science
    (``paths.*`` and the like are plumbing)."""
    described = space.describe()
    described.pop("search.fixed", None)
    fixed = " ".join(science_overrides(space.fixed))
    if fixed:
        described["search.fixed"] = fixed
    return described


def study_params(space: SearchSpace, objectives: List[Objective], sampler: Optional[Mapping[str, Any]],
                 pruner: Optional[Mapping[str, Any]], n_trials: int, n_jobs: int,
                 task_config: DictConfig) -> Dict[str, str]:
    """The study run's params: search space, sampler, objectives, n_trials and the science
    every trial shares (swept keys excluded: their base value is not used), credentials hidden."""
    params: Dict[str, Any] = {"study.sampler": sampler_name(sampler)}
    for k, v in as_dict(sampler).items():
        if k != "name":
            params[f"study.sampler.{k}"] = v
    params["study.objectives"] = ", ".join(f"{o.direction} {o.metric}" for o in objectives)
    params["study.n_trials"] = n_trials
    params["study.n_jobs"] = n_jobs
    if pruner_name(pruner) not in ("none", "nop", "NopPruner"):
        params["study.pruner"] = pruner_name(pruner)
    swept = {d.key for d in space.dims} | {k for p in space.pairs for k in (p.low_key, p.high_key)}
    task = OmegaConf.to_container(task_config, resolve=False)
    assert isinstance(task, dict)
    task.pop("hydra", None)
    for k, v in science_params(task).items():
        if k not in swept and not (isinstance(v, str) and "${" in v):
            params[k] = v
    params.update(_described_space(space))
    return dict(safe_params(params))


def study_text(study_name: str, space: SearchSpace, objectives: List[Objective], sampler: str,
               n_trials: int, storage: str) -> str:
    """The study run's description (markdown)."""
    described = "; ".join(f"`{k[len('search.'):]}`: {v}" for k, v in _described_space(space).items())
    return (f"Optuna study **{study_name}**: {n_trials} trials, sampler {sampler}, "
            + " and ".join(f"{o.direction} `{o.metric}`" for o in objectives)
            + f". Search space: {described}. Child runs are the trials (`trial N · ...`); "
            f"storage {storage}.")


class MlflowTracker:
    """One parent run per study; annotates the per-trial child runs created by the task."""

    def __init__(self, uri: str, experiment: str, study_name: str,
                 artifact_location: Optional[str] = None) -> None:
        self.store = Tracker(uri, experiment, artifact_location=artifact_location)
        self.uri = uri
        self.experiment = experiment
        self.study_name = study_name
        self.client: Any = None
        self.experiment_id = ""
        self.parent_run_id = ""
        self.text = ""

    def setup(self) -> None:
        """Open the store and experiment, find or create the study run. Call under the study lock."""
        self.store.connect()  # TrackingError (one line) when the store cannot be used
        c = self.client = self.store.client
        self.experiment_id = self.store.experiment_id
        name = self.study_name.replace("'", "\\'")
        runs = c.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`optuna.study_name` = '{name}' and tags.`optuna.role` = 'study'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if runs:
            self.parent_run_id = runs[0].info.run_id
            if runs[0].info.status != "RUNNING":
                c.update_run(self.parent_run_id, status="RUNNING")
            log.info("Resuming MLflow parent run %s of study '%s'", self.parent_run_id, self.study_name)
        else:
            tags = {"optuna.study_name": self.study_name, "optuna.role": "study",
                    **source_tags("tardis-exp (Optuna sweep)")}
            run = c.create_run(self.experiment_id, run_name=self.study_name, tags=tags)
            self.parent_run_id = run.info.run_id
            log.info("Created MLflow parent run %s for study '%s'", self.parent_run_id, self.study_name)

    def describe(self, params: Mapping[str, Any], text: str) -> None:
        """Params (search space, sampler, objectives, n_trials, shared config) and description.

        MLflow params cannot change: a resumed study logs the params it did not have yet;
        a changed value (n_trials raised) is kept in the description and as a tag.
        """
        from mlflow.entities import Param

        c = self.client
        have = c.get_run(self.parent_run_id).data.params
        new = {}
        for k, v in params.items():
            v = "null" if v is None else str(v)[:6000]
            if k not in have:
                new[k] = v
            elif have[k] != v:
                c.set_tag(self.parent_run_id, f"optuna.now.{k}", v)
        items = list(new.items())
        for i in range(0, len(items), 100):
            c.log_batch(self.parent_run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        self.text = text
        c.set_tag(self.parent_run_id, "mlflow.note.content", text)

    def _find_child(self, number: int) -> Optional[str]:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and "
                f"tags.`optuna_trial` = '{number}'"
            ),
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def record_trial(
        self,
        trial: FrozenTrial,
        run_id: Optional[str],
        objectives: List[Objective],
        values: Optional[List[float]],
        error: str,
    ) -> None:
        """Tag the trial's run with its state, error and objective values; a trial that
        never got a run (it failed before the pipeline started one) gets one here."""
        c = self.client
        if not run_id:
            run_id = self._find_child(trial.number)
        created = False
        if not run_id:
            run = c.create_run(
                self.experiment_id,
                run_name=trial.user_attrs.get(RUN_NAME_ATTR) or f"trial {trial.number}",
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    "optuna_trial": str(trial.number),
                },
            )
            run_id = run.info.run_id
            created = True
            for k, v in (trial.user_attrs.get(VALUES_ATTR) or {}).items():
                c.log_param(run_id, k, v)
        c.set_tag(run_id, "optuna.study_name", self.study_name)
        c.set_tag(run_id, "optuna.trial_number", str(trial.number))
        c.set_tag(run_id, "optuna.state", trial.state.name)
        if error:
            c.set_tag(run_id, "optuna.error", error[:4900])
        if values is not None:
            for o, v in zip(objectives, values):
                c.log_metric(run_id, f"objective.{o.metric}", v)
        if created:
            c.set_terminated(run_id, "FAILED" if trial.state == TrialState.FAIL else "KILLED"
                             if trial.state == TrialState.PRUNED else "FINISHED")

    def finish(self, study: optuna.Study, objectives: List[Objective], best_rows: List[Dict[str, Any]],
               all_rows: List[Dict[str, Any]], log_plots: bool,
               best_trials: Optional[List[FrozenTrial]] = None,
               best: Optional[List[FrozenTrial]] = None, status: str = "FINISHED") -> None:
        """``best_trials``: those whose figures to draw; ``best``: the best (Pareto) trials;
        ``status``: the study run's end state (``FAILED`` when max_failure_rate stopped it)."""
        c = self.client
        rid = self.parent_run_id
        for t in (best_trials or [])[:MAX_BEST_TRIAL_PLOTS]:
            self._best_trial_figures(t)
        with tempfile.TemporaryDirectory() as tmp:
            best_name = "best_trials.tsv" if len(objectives) == 1 else "pareto_front.tsv"
            write_tsv(Path(tmp) / best_name, best_rows)
            write_tsv(Path(tmp) / "trials.tsv", all_rows)
            c.log_artifact(rid, str(Path(tmp) / best_name))
            if len(objectives) > 1:  # keep the documented name available for both cases
                write_tsv(Path(tmp) / "best_trials.tsv", best_rows)
                c.log_artifact(rid, str(Path(tmp) / "best_trials.tsv"))
            c.log_artifact(rid, str(Path(tmp) / "trials.tsv"))
            if log_plots:
                for path in study_plots(study, objectives, Path(tmp)):
                    c.log_artifact(rid, str(path), artifact_path="plots")
        states = [t.state for t in study.get_trials(deepcopy=False)]
        c.log_metric(rid, "n_trials_complete", sum(s == TrialState.COMPLETE for s in states))
        c.log_metric(rid, "n_trials_fail", sum(s == TrialState.FAIL for s in states))
        c.log_metric(rid, "n_trials_pruned", sum(s == TrialState.PRUNED for s in states))
        if best:
            self._log_best(best, objectives)
        c.set_terminated(rid, status)

    def _log_best(self, best: List[FrozenTrial], objectives: List[Objective]) -> None:
        """The best trial's headline metrics under the trials' own keys, its dataset, a description.

        One table then lists the study beside its trials. Multi-objective: the Pareto trial
        best in the first objective stands for the study (``optuna.best_trial`` says which).
        """
        from mlflow.entities import Metric

        c, rid = self.client, self.parent_run_id
        o0 = objectives[0]
        t = sorted(best, key=lambda t: t.values[0], reverse=o0.direction == "maximize")[0]
        metrics = dict(t.user_attrs.get(METRICS_ATTR) or {})
        metrics.update({o.metric: v for o, v in zip(objectives, t.values)})
        keep = {k for k in metrics if (metric_key(k) and "study" in metric_key(k).runs)}
        keep |= {o.metric for o in objectives}
        ts = int(time.time() * 1000)
        c.log_batch(rid, metrics=[Metric(k, float(metrics[k]), ts, 0) for k in sorted(keep)])
        c.set_tag(rid, "optuna.best_trial", str(t.number))
        name = t.user_attrs.get(RUN_NAME_ATTR) or f"trial {t.number}"
        c.set_tag(rid, "optuna.best_trial_run", name)
        run_id = t.user_attrs.get(RUN_ID_ATTR) or self._find_child(t.number)
        if run_id:
            try:  # the dataset the trials read: the study run lists it too
                inputs = c.get_run(run_id).inputs
                if inputs and inputs.dataset_inputs:
                    c.log_inputs(rid, datasets=list(inputs.dataset_inputs))
            except Exception as e:  # noqa: BLE001 -- a cross-reference, never a reason to fail the study
                log.warning("MLflow: could not copy the dataset input of trial %d: %s", t.number, e)
        link = f"[{name}](#/experiments/{self.experiment_id}/runs/{run_id})" if run_id else name
        result = ", ".join(f"{k} = {metrics[k]:.4g}" for k in sorted(keep))
        c.set_tag(rid, "mlflow.note.content",
                  f"{self.text}\n\nBest trial: {link}: {result}. The study's metrics are this trial's values.")

    def _best_trial_figures(self, t: FrozenTrial) -> None:
        """Draw a best trial's figures if it skipped them, and log them to its run."""
        try:
            plots = best_trial_figures(t)
            run_id = self._find_child(t.number) if plots is not None else None
            if run_id:
                self.client.log_artifacts(run_id, str(plots), artifact_path="plots")
        except Exception as e:  # noqa: BLE001 -- figures are a view: never a reason to fail the study
            log.warning("Trial %d: could not draw its figures: %s: %s", t.number, type(e).__name__, e)
