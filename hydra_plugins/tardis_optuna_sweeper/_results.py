"""The study's results: ``<sweep dir>/optimization_results.yaml`` and the rows of its tables
(``trials.tsv``, ``best_trials.tsv`` / ``pareto_front.tsv`` on the MLflow study run)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List

import optuna
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from ._common import OUTPUT_DIR_ATTR, VALUES_ATTR
from ._objectives import Objective

log = logging.getLogger(__name__)


def trial_row(t: FrozenTrial, objectives: List[Objective]) -> Dict[str, Any]:
    """One row of a trials table: number, state, ``value.<metric>``, ``param.<key>``."""
    row: Dict[str, Any] = {"number": t.number, "state": t.state.name}
    for i, o in enumerate(objectives):
        row[f"value.{o.metric}"] = t.values[i] if t.values is not None else None
    for k, v in (t.user_attrs.get(VALUES_ATTR) or t.params).items():
        row[f"param.{k}"] = v
    return row


def best_trials(study: optuna.Study) -> List[FrozenTrial]:
    """The best trial (one objective) or the Pareto front; empty without a COMPLETE trial."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trials if complete else []


def study_results(study: optuna.Study, objectives: List[Objective], head: Dict[str, Any],
                  counts: Dict[str, Any]) -> Dict[str, Any]:
    """``head`` (name, study_name, storage, sampler), the objectives, the counts of trials by
    state and the worker's ``counts``, every trial of the study with its state and output
    folder (``trials``; ``sweep_folders``: the folders that hold them, more than one for a
    resumed or distributed study), and the best trial (``best_trial``, ``best_params``,
    ``best_value``) or the ``pareto_front``."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    metrics = [o.metric for o in objectives]
    best = best_trials(study)

    def describe(t: FrozenTrial) -> Dict[str, Any]:
        return {
            "number": t.number,
            "params": dict(t.user_attrs.get(VALUES_ATTR) or t.params),
            "values": dict(zip(metrics, [float(v) for v in t.values])),
        }

    results: Dict[str, Any] = dict(head)
    results["objectives"] = [{"metric": o.metric, "direction": o.direction} for o in objectives]
    results.update({
        "n_trials": len(trials),
        "n_complete": states.count(TrialState.COMPLETE),
        "n_fail": states.count(TrialState.FAIL),
        "n_pruned": states.count(TrialState.PRUNED),
        "n_running": states.count(TrialState.RUNNING),
        **counts,
    })
    # every trial of the study, wherever it ran: an interrupted sweep resumed by the same
    # command runs its remaining trials in a new folder (Hydra's sweep dir is timestamped)
    folders = {t.number: t.user_attrs.get(OUTPUT_DIR_ATTR) for t in trials}
    results["sweep_folders"] = sorted({os.path.dirname(str(f)) for f in folders.values() if f})
    results["trials"] = [{"number": t.number, "state": t.state.name, "folder": folders[t.number]}
                         for t in sorted(trials, key=lambda t: t.number)]
    if len(objectives) > 1:
        results["pareto_front"] = [describe(t) for t in best]
        log.info("Pareto front (%d trials):", len(best))
        for t in best:
            log.info("  trial %d: %s %s", t.number, describe(t)["values"], describe(t)["params"])
    elif best:
        b = describe(best[0])
        results["best_trial"] = b["number"]
        results["best_params"] = b["params"]
        results["best_value"] = b["values"][metrics[0]]
        log.info("Best trial %d: %s=%s params=%s", b["number"], metrics[0], results["best_value"], b["params"])
    else:
        log.warning("No COMPLETE trial in study '%s'", study.study_name)
    return results


def write_results(results: Dict[str, Any], sweep_dir: str) -> Path:
    """``<sweep_dir>/optimization_results.yaml``."""
    os.makedirs(sweep_dir, exist_ok=True)
    out = Path(sweep_dir) / "optimization_results.yaml"
    OmegaConf.save(OmegaConf.create(results), out)
    log.info("Wrote %s", out)
    return out
