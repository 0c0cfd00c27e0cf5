"""The sweep loop: validate the config, then ask a batch of trials, launch them through
Hydra's launcher, tell Optuna their results, until the study has ``n_trials``.

Everything else lives beside it, one concern a module: ``_search_space`` (what a trial
samples), ``_samplers`` (samplers and pruners), ``_objectives`` (the values a trial reports),
``_storage`` (where the study lives, the workers' lock), ``_heartbeat`` (stale trials of dead
workers), ``_mlflow_study`` (the MLflow study run), ``_plots`` and ``_results``. Their names
start with ``_`` because Hydra's plugin scan imports every other module of the package at
every start of every command (these import Optuna and MLflow).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from optuna.trial import FrozenTrial, Trial, TrialState

from ._common import (
    FAIL_REASON_ATTR,
    JOB_DIR_ATTR,
    KEY,
    METRICS_ATTR,
    OUTPUT_DIR_ATTR,
    OVERRIDES_ATTR,
    RUN_ID_ATTR,
    RUN_NAME_ATTR,
    VALUES_ATTR,
    SweeperConfigError,
    SweeperFailureRateError,
    mask_url,
)
from ._heartbeat import Heartbeat, stale_callback, trial_id
from ._mlflow_study import MlflowTracker, study_params, study_text
from ._objectives import extract_values, numbers, parse_objectives
from ._results import best_trials, study_results, trial_row, write_results
from ._samplers import build_pruner, build_sampler, is_grid, sampler_name
from ._search_space import build_search_space, format_value
from ._storage import StudyLock, open_storage, parse_storage, with_driver

log = logging.getLogger(__name__)


def _get(cfg: Any, dotted: str) -> Any:
    """``cfg``'s value at ``dotted``; None when absent or when it does not resolve."""
    try:
        return OmegaConf.select(cfg, dotted, default=None)
    except OmegaConfBaseException:
        return None


def job_outcome(ret: JobReturn) -> Tuple[Any, Optional[BaseException]]:
    """``(return value, None)`` of a completed job, ``(None, exception)`` of a failed one.

    Through :attr:`JobReturn.return_value`, which re-raises a failed job's exception after
    writing its overrides, unmasked, to stderr: that line is dropped (the sweeper logs the
    failure itself, credentials masked).
    """
    if ret.status == JobStatus.COMPLETED:
        return ret.return_value, None
    if ret.status == JobStatus.UNKNOWN:
        return None, RuntimeError("the launcher returned the job without a status")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            value = ret.return_value
    except Exception as e:  # noqa: BLE001 -- the job's own exception, whatever its type
        return None, e
    return value, None


class _CatchInterrupt:
    """SIGINT raises KeyboardInterrupt as Python's own handler does, and is remembered.

    Python drops an exception raised while it runs a weakref callback or ``__del__``
    ("Exception ignored in: ... KeyboardInterrupt"): a Ctrl-C that lands in SQLAlchemy's or
    MLflow's garbage-collection callbacks during a trial was lost and the sweep went on.
    :meth:`reraise`, called between trials, raises it again. Nothing is changed where
    SIGINT is not Python's default (ignored, or another handler), nor off the main thread.
    """

    def __init__(self) -> None:
        import signal
        import threading

        self.seen = False
        self._old = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def reraise(self) -> None:
        if self.seen:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self._old is not None:
            import signal

            signal.signal(signal.SIGINT, self._old)
            self._old = None


class TardisOptunaSweeperImpl:
    def __init__(
        self,
        params: Optional[Mapping[str, Any]],
        ordered_pairs: Optional[Sequence[Any]],
        sampler: Optional[Mapping[str, Any]],
        pruner: Optional[Mapping[str, Any]],
        objectives: Optional[Sequence[Any]],
        study_name: Optional[str],
        storage: Optional[str],
        journal_path: Optional[str],
        n_trials: int,
        n_jobs: int,
        heartbeat_interval: Optional[int],
        grace_period: Optional[int],
        mlflow: Optional[Mapping[str, Any]],
        max_failure_rate: float = 1.0,
    ) -> None:
        self.params = params
        self.ordered_pairs = ordered_pairs
        self.sampler_cfg = sampler
        self.pruner_cfg = pruner
        self.objectives_cfg = objectives
        self.study_name = study_name
        self.storage_cfg = storage
        self.journal_path = journal_path
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.mlflow_cfg = mlflow or {}
        self.max_failure_rate = max_failure_rate
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.launcher: Any = None
        self.job_idx = 0
        self.storage: Optional[optuna.storages.BaseStorage] = None
        # this worker's trials: how many were told, how many of them failed, the last error
        self.n_told = 0
        self.n_failed = 0
        self.last_error = ""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        # Hydra sets its runtime config only when a job starts, but hydra.sweep.dir may go
        # through ${hydra:...} (the default: paths.root_dir -> ${hydra:runtime.cwd}).
        HydraConfig.instance().set_config(config)
        self.sweep_dir = config.hydra.sweep.dir

    # -- validation -------------------------------------------------------------------------

    def _validate(self, arguments: List[str]) -> None:
        self.objectives = parse_objectives(self.objectives_cfg)
        for name, v, lo in (("n_trials", self.n_trials, 1), ("n_jobs", self.n_jobs, 1)):
            if not isinstance(v, int) or v < lo:
                raise SweeperConfigError(f"{KEY}.{name}: must be an integer >= {lo}, got {v!r}")
        if self.heartbeat_interval is not None and int(self.heartbeat_interval) < 1:
            raise SweeperConfigError(f"{KEY}.heartbeat_interval: must be >= 1 or null")
        if self.grace_period is not None and self.heartbeat_interval and \
                int(self.grace_period) <= int(self.heartbeat_interval):
            raise SweeperConfigError(f"{KEY}.grace_period: must be larger than {KEY}.heartbeat_interval")
        rate = self.max_failure_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise SweeperConfigError(f"{KEY}.max_failure_rate: must be a number in [0, 1], got {rate!r}")
        self.space = build_search_space(self.params, self.ordered_pairs, arguments)
        self.space.check_pairs(self._base_value)
        self.sampler_name = sampler_name(self.sampler_cfg)
        self.grid = is_grid(self.sampler_cfg)
        # build once to surface configuration errors early
        build_sampler(self.sampler_cfg, self.space, len(self.objectives))
        self.pruner = build_pruner(self.pruner_cfg)
        if self.grid:
            size = 1
            for v in self.space.grid().values():
                size *= len(v)
            if self.n_trials > size:
                log.info("Grid has %d points: capping n_trials %d -> %d", size, self.n_trials, size)
                self.n_trials = size
        assert self.config is not None
        base = _get(self.config, "hydra.runtime.cwd") or os.getcwd()
        journal_path = self.journal_path
        if not journal_path:
            mlruns = _get(self.config, "paths.mlruns_dir") or os.path.join(base, "mlruns")
            journal_path = os.path.join(str(mlruns), "optuna", "journal.log")
        self.storage_spec = parse_storage(self.storage_cfg, journal_path, base)
        self.study_name = str(self.study_name or _get(self.config, "hydra.job.name") or "study")
        # validate that one point of the space composes with the task config
        self.validate_batch_is_legal([self.space.first_point()])

    def _base_value(self, key: str) -> Any:
        """The task config's value of ``key`` (an ordered pair's bound), None if absent."""
        return _get(self.config, key)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        assert self.hydra_context is not None and self.config is not None
        for overrides in batch:
            self.hydra_context.config_loader.load_sweep_config(
                master_config=self.config, sweep_overrides=list(overrides)
            )

    def _mlflow_tracker(self) -> Optional[MlflowTracker]:
        if not self.mlflow_cfg.get("enabled", True):
            return None
        if _get(self.config, "tracking.enabled") is False:
            log.info("MLflow disabled: tracking.enabled=false")
            return None
        uri = _get(self.config, "tracking.uri")
        exp = _get(self.config, "tracking.experiment")
        if not uri or not exp:
            log.info("MLflow disabled: task config has no tracking.uri / tracking.experiment")
            return None
        artifact_location = _get(self.config, "tracking.artifact_location")
        return MlflowTracker(str(uri), str(exp), self.study_name,
                             str(artifact_location) if artifact_location else None)

    # -- main loop ----------------------------------------------------------------------------

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        # Hydra does not set HydraConfig before running the sweeper; the task config may
        # use ${hydra:...} interpolations (e.g. paths.root_dir: ${hydra:runtime.cwd}).
        HydraConfig.instance().set_config(self.config)
        self._validate(arguments)
        directions = [o.direction for o in self.objectives]
        self.storage_spec = with_driver(self.storage_spec)
        self.storage = open_storage(self.storage_spec, self.heartbeat_interval, self.grace_period, stale_callback)
        lock = StudyLock(self.storage_spec, self.study_name)
        log.info(
            "Study '%s' on %s: sampler=%s, objectives=%s, n_trials=%d, n_jobs=%d",
            self.study_name, self.storage_spec.describe(), self.sampler_name,
            [(o.metric, o.direction) for o in self.objectives], self.n_trials, self.n_jobs,
        )
        study: Optional[optuna.Study] = None
        tracker: Optional[MlflowTracker] = None
        heartbeat: Optional[Heartbeat] = None
        launched = 0
        too_many_failures = False
        caught = _CatchInterrupt()
        try:
            while True:
                caught.reraise()  # a Ctrl-C that a library swallowed during the last trial
                with lock:
                    if study is None:
                        study, heartbeat, tracker = self._open_study(directions)
                    assert heartbeat is not None
                    heartbeat.fail_stale()
                    counted = [
                        t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING
                    ]
                    remaining = self.n_trials - len(counted)
                    if remaining <= 0:
                        break
                    batch = self._ask(study, heartbeat, min(self.n_jobs, remaining))
                launched += len(batch)
                self._run_batch(study, heartbeat, tracker, batch)
                if self.n_told and self.n_failed / self.n_told > self.max_failure_rate:
                    too_many_failures = True
                    break
        except KeyboardInterrupt:
            # Ctrl-C / SIGTERM: the study so far (this folder's trials and any earlier ones),
            # so that no sweep folder is left without a summary; a rerun resumes the study
            if study is not None:
                self._write_interrupted(study, tracker, launched)
            raise
        finally:
            caught.restore()
            if heartbeat is not None:
                heartbeat.stop()
        assert study is not None
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running:
            log.info("%d trial(s) still running in other workers: %s", len(running),
                     [t.number for t in running])
        results = self._finish(study, tracker, launched, "FAILED" if too_many_failures else "FINISHED")
        # last, after the study's summary: where its trial folders and results are
        print(f"tardis-exp: sweep folder {os.path.abspath(self.sweep_dir)} (optimization_results.yaml, one "
              "folder per trial)", flush=True)
        if too_many_failures:  # after the results are written: a stopped sweep keeps what it found
            raise SweeperFailureRateError(
                f"{KEY}.max_failure_rate={self.max_failure_rate}: {self.n_failed} of the {self.n_told} "
                f"trials of this worker failed (last: {self.last_error}); sweep stopped, results so far in "
                f"{os.path.join(self.sweep_dir, 'optimization_results.yaml')}"
            )
        return results

    def _write_interrupted(self, study: optuna.Study, tracker: Optional[MlflowTracker], launched: int) -> None:
        """``optimization_results.yaml`` of an interrupted sweep (``interrupted: true``); never
        masks the interruption."""
        try:
            head = {"name": "tardis_optuna", "study_name": self.study_name,
                    "storage": self.storage_spec.describe(), "sampler": self.sampler_name}
            counts: Dict[str, Any] = {
                "n_launched_by_this_worker": launched, "interrupted": True,
                "note": "interrupted; running the same command again resumes the study in a new folder, whose "
                        "optimization_results.yaml then covers every trial (this folder's too)"}
            if tracker is not None:
                counts["mlflow_parent_run_id"] = tracker.parent_run_id
            out = write_results(study_results(study, self.objectives, head, counts), self.sweep_dir)
            print(f"tardis-exp: sweep interrupted; the study so far is in {out}; run the same command again "
                  "to resume it", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 -- the interruption is what the user must see
            log.warning("could not write the interrupted sweep's results: %s", e)

    def _open_study(self, directions: List[str]) -> Tuple[optuna.Study, Heartbeat, Optional[MlflowTracker]]:
        """Create or load the study, start the heartbeat, open the MLflow study run. Under the lock."""
        study = optuna.create_study(
            storage=self.storage, study_name=self.study_name, directions=directions,
            pruner=self.pruner, load_if_exists=True,
        )
        existing = [d.name.lower() for d in study.directions]
        if existing != directions:
            raise SweeperConfigError(
                f"{KEY}.objectives: study '{self.study_name}' exists with directions "
                f"{existing}, configured {directions}; use another {KEY}.study_name"
            )
        try:  # optuna-dashboard: "consensus.silhouette", not "Objective 0"
            study.set_metric_names([o.metric for o in self.objectives])
        except Exception as e:  # noqa: BLE001 -- a label, never a reason to stop
            log.warning("Optuna: could not name the objectives: %s", e)
        n0 = len(study.get_trials(deepcopy=False))
        # offset the seed by the number of existing trials so that a resumed
        # run or a second worker does not replay the same random sequence
        study.sampler = build_sampler(self.sampler_cfg, self.space, len(directions), n0)
        assert self.storage is not None
        heartbeat = Heartbeat(study, self.storage, self.heartbeat_interval, self.grace_period)
        heartbeat.start()
        tracker = self._mlflow_tracker()
        if tracker is not None:
            tracker.setup()
            try:
                assert self.config is not None
                tracker.describe(
                    study_params(self.space, self.objectives, self.sampler_cfg, self.pruner_cfg,
                                 self.n_trials, self.n_jobs, self.config),
                    study_text(self.study_name, self.space, self.objectives, self.sampler_name,
                               self.n_trials, self.storage_spec.describe()))
            except Exception as e:  # noqa: BLE001 -- a description, never a reason to stop
                log.warning("MLflow: could not describe the study run: %s", e)
        if n0:
            log.info("Loaded study '%s' with %d existing trials", self.study_name, n0)
        return study, heartbeat, tracker

    def _ask(self, study: optuna.Study, heartbeat: Heartbeat, n: int) -> List[Tuple[Trial, List[str]]]:
        batch = []
        for _ in range(n):
            trial = study.ask()
            heartbeat.add(trial.number)
            try:
                sampled = self.space.sample(trial, self.grid, self._base_value)
            except Exception as e:  # noqa: BLE001 -- never expected; keep the sweep alive
                log.warning("Trial %d: sampling failed: %s", trial.number, e)
                study.tell(trial, state=TrialState.FAIL)
                heartbeat.remove(trial.number)
                continue
            values = {k: v for _, k, v in sampled}
            overrides = list(self.space.fixed) + [f"{p}{k}={format_value(v)}" for p, k, v in sampled]
            trial.set_user_attr(VALUES_ATTR, values)
            # stored in the study for reference only (never re-launched): credentials masked
            trial.set_user_attr(OVERRIDES_ATTR, [mask_url(o) for o in overrides])
            # the trial's MLflow run name: what differs from the other trials
            trial.set_user_attr(RUN_NAME_ATTR, " · ".join([f"trial {trial.number}", *self.space.labels(sampled)]))
            batch.append((trial, overrides))
        return batch

    def _run_batch(
        self,
        study: optuna.Study,
        heartbeat: Heartbeat,
        tracker: Optional[MlflowTracker],
        batch: List[Tuple[Trial, List[str]]],
    ) -> None:
        if not batch:
            return
        job_overrides = []
        for trial, overrides in batch:
            ov = list(overrides)
            if tracker is not None:
                ov += [
                    f"++tracking.parent_run_id={tracker.parent_run_id}",
                    f"++tracking.tags.optuna_trial={trial.number}",
                    f"++tracking.tags.optuna_study={format_value(self.study_name)}",
                    f"++tracking.run_label={format_value(trial.user_attrs.get(RUN_NAME_ATTR))}",
                ]
            job_overrides.append(ov)
        # Hydra job numbers follow trial numbers (asked under the lock, so consecutive).
        self.job_idx = batch[0][0].number
        told = set()
        try:
            returns = self.launcher.launch(job_overrides, initial_job_idx=self.job_idx)
            for (trial, _), ret in zip(batch, returns):
                self._tell(study, tracker, trial, ret)
                told.add(trial.number)
        finally:
            for trial, _ in batch:
                heartbeat.remove(trial.number)
                if trial.number not in told:
                    # Hydra's job folder (hydra.sweep.subdir is the job number, which follows the trial's)
                    job_dir = os.path.join(str(self.sweep_dir), str(trial.number))
                    try:
                        if os.path.isdir(job_dir):
                            trial.set_user_attr(OUTPUT_DIR_ATTR, os.path.abspath(job_dir))
                    except Exception:  # noqa: BLE001 -- a pointer only; the tell below matters
                        pass
                    try:
                        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                        log.warning("Trial %d marked FAIL: sweep interrupted", trial.number)
                    except Exception as e:  # noqa: BLE001 -- the interruption's own error is the one raised
                        log.warning("Trial %d: could not mark it FAIL (%s); the heartbeat's grace "
                                    "period will", trial.number, e)

    def _tell(self, study: optuna.Study, tracker: Optional[MlflowTracker], trial: Trial, ret: JobReturn) -> None:
        values: Optional[List[float]] = None
        error = ""
        run_id: Optional[str] = None
        headline: Dict[str, float] = {}
        state = TrialState.FAIL
        rv, exc = job_outcome(ret)
        if exc is None:
            if isinstance(rv, (Mapping, DictConfig)):
                rid = rv.get("mlflow_run_id")
                run_id = str(rid) if rid else None
                headline = numbers(rv)
            values, error = extract_values(rv, self.objectives)
            state = TrialState.COMPLETE if values is not None else TrialState.FAIL
            if error:
                log.warning("Trial %d FAILED: %s", trial.number, error)
        elif isinstance(exc, optuna.TrialPruned):
            state = TrialState.PRUNED
            error = f"pruned: {exc}"
            log.info("Trial %d pruned: %s", trial.number, exc)
        else:
            error = f"{type(exc).__name__}: {exc}"
            tb = exc.__traceback__
            log.warning(
                "Trial %d FAILED (task raised %s); continuing the sweep",
                trial.number, mask_url(error), exc_info=(type(exc), exc, tb) if tb else None,
            )
        self._annotate(trial, ret, run_id, headline, error)
        try:
            if state == TrialState.COMPLETE:
                frozen = study.tell(trial, values, skip_if_finished=True)
            else:
                frozen = study.tell(trial, state=state, skip_if_finished=True)
        except Exception as e:  # noqa: BLE001 -- see below; anything else is logged
            # GridSampler.after_trial calls study.stop() once the grid is exhausted, which
            # raises outside study.optimize(); Optuna stored the trial's state first
            frozen = self._stored(study, trial.number)
            if frozen is None or not frozen.state.is_finished():
                log.warning("Trial %d: tell failed: %s", trial.number, e)
                return
        if frozen.state != state:
            log.warning(
                "Trial %d was already %s (e.g. failed as stale by another worker); result dropped",
                trial.number, frozen.state.name,
            )
            state, values = frozen.state, None
        self.n_told += 1
        if state == TrialState.FAIL:
            self.n_failed += 1
            self.last_error = f"trial {trial.number}: {mask_url(error or 'failed')}"[:500]
        if state == TrialState.COMPLETE:
            log.info("Trial %d finished: %s | %s", trial.number,
                     dict(zip([o.metric for o in self.objectives], values or [])), trial.user_attrs.get(VALUES_ATTR))
        if tracker is not None:
            try:
                tracker.record_trial(frozen, run_id, self.objectives, values, error)
            except Exception as e:  # noqa: BLE001 -- an annotation, never a reason to stop
                log.warning("Trial %d: MLflow annotation failed: %s", trial.number, e)

    def _annotate(self, trial: Trial, ret: JobReturn, run_id: Optional[str], headline: Dict[str, float],
                  error: str) -> None:
        """Where the trial ran, why it failed, its MLflow run and headline metrics, as user
        attributes (optuna-dashboard shows them beside the params)."""
        attrs: Dict[str, Any] = {}
        if ret.working_dir:
            attrs[JOB_DIR_ATTR] = str(ret.working_dir)
        out_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
        if out_dir:  # where the trial wrote its outputs (job_dir is the cwd unless chdir)
            attrs[OUTPUT_DIR_ATTR] = str(out_dir)
        if error:
            attrs[FAIL_REASON_ATTR] = mask_url(error)[:2000]
        if run_id:
            attrs[RUN_ID_ATTR] = run_id
        if headline:
            attrs[METRICS_ATTR] = headline
        for k, v in attrs.items():
            try:
                trial.set_user_attr(k, v)
            except Exception as e:  # noqa: BLE001 -- e.g. failed as stale meanwhile; the tell says so
                log.warning("Trial %d: could not store %s: %s", trial.number, k, e)
                return

    def _stored(self, study: optuna.Study, number: int) -> Optional[FrozenTrial]:
        """Trial ``number`` as the storage has it now; None if it cannot be read."""
        assert self.storage is not None
        try:
            return self.storage.get_trial(trial_id(self.storage, study, number))
        except Exception as e:  # noqa: BLE001 -- the caller reports the original error
            log.debug("could not read trial %d back: %s", number, e)
            return None

    # -- results ------------------------------------------------------------------------------

    def _finish(self, study: optuna.Study, tracker: Optional[MlflowTracker], launched: int,
                status: str = "FINISHED") -> Dict[str, Any]:
        head = {"name": "tardis_optuna", "study_name": self.study_name,
                "storage": self.storage_spec.describe(), "sampler": self.sampler_name}
        counts: Dict[str, Any] = {"n_launched_by_this_worker": launched}
        if tracker is not None:
            counts["mlflow_parent_run_id"] = tracker.parent_run_id
        results = study_results(study, self.objectives, head, counts)
        write_results(results, self.sweep_dir)
        if tracker is not None:
            best = best_trials(study)
            try:
                rows = sorted((trial_row(t, self.objectives) for t in study.get_trials(deepcopy=False)),
                              key=lambda r: r["number"])
                tracker.finish(study, self.objectives, [trial_row(t, self.objectives) for t in best], rows,
                               bool(self.mlflow_cfg.get("log_plots", True)),
                               best if self.mlflow_cfg.get("best_trial_plots", True) else None,
                               best=best, status=status)
            except Exception as e:  # noqa: BLE001 -- the results are written; MLflow is a view of them
                log.warning("MLflow: could not log study results: %s", e)
        return results
