"""The :class:`Tracker`: MLflow runs of one pipeline run, logged on a background store thread.

It opens the store and the experiment (after the checks of ``stores.py``), creates the
parent run and a child run per stage, queues every store call on one thread in the order
it was made, and applies the failure policy of the package docstring
(:mod:`tardis_exp.tracking`): fail before compute when the store is unusable, never stop
the computation once the parent run exists. Each store call goes through an explicit
:class:`mlflow.MlflowClient` (no fluent global state), imported on the store thread.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import TrackingError, redact
from .naming import _now_ms, default_run_name, init_experiment, safe_params, source_tags
from .runs import StageRun
from .stores import _http_settings, _is_local, check_database, check_reachable, sqlalchemy_uri, sqlite_init_lock

# the package's logger, as before the split into modules: log filters and tests name it
log = logging.getLogger("tardis_exp.tracking")

# consecutive failed store calls after which the tracker stops calling the store
MAX_CONSECUTIVE_FAILURES = 3


class Tracker:
    """Parent/child MLflow runs for one pipeline run; a no-op when disabled.

    Parameters
    ----------
    uri
        Tracking URI (``sqlite:///...``, ``http://host:port``, ``postgresql://...``).
    experiment
        Experiment name, created on first use.
    enabled
        ``False`` (or ``uri=None``) turns every call into a no-op.
    artifact_location
        Artifact root for a new experiment on a local store (a server decides its own).
    run_name, tags
        Name and extra tags of the parent run (``run_name`` wins over every default name).
    run_label
        The parent's name when ``run_name`` is not set (the sweeper's ``trial 3 · ...``);
        neither set: :func:`default_run_name` of the overrides given to :meth:`run`.
    parent_run_id
        Nest the parent under this run (a sweep's study run).
    connect_timeout_s
        Seconds to wait for a server's ``/health`` before giving up.
    http_timeout_s, http_max_retries
        Per-request timeout and retries of MLflow's HTTP client once connected.
    """

    def __init__(self, uri: str | None = None, experiment: str = "tardis-exp", *, enabled: bool = True,
                 artifact_location: str | None = None, run_name: str | None = None,
                 run_label: str | None = None, tags: Mapping | None = None, parent_run_id: str | None = None, connect_timeout_s: float = 10,
                 http_timeout_s: float = 30, http_max_retries: int = 2):
        self.enabled = bool(enabled) and uri is not None
        self.uri = sqlalchemy_uri(uri) if self.enabled else uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.run_name = run_name
        self.run_label = run_label
        self.name: str | None = None  # the parent's name, fixed when run() starts
        self.tags = dict(tags or {})
        self.parent_run_id = parent_run_id
        self.timeout = connect_timeout_s
        self.http_timeout = http_timeout_s
        self.http_max_retries = http_max_retries
        self.client = None
        self.experiment_id = None
        self.parent: StageRun | None = None
        self.local_dir: Path | None = None
        self.failures: list[str] = []
        self._consecutive = 0
        self._gave_up = False
        self._pool: ThreadPoolExecutor | None = None  # the store thread of the current run
        self._ready: Future | None = None  # connect + create the parent run

    @classmethod
    def from_config(cls, cfg) -> "Tracker":
        t = cfg
        return cls(uri=t.get("uri"), experiment=t.get("experiment", "tardis-exp"), enabled=t.get("enabled", True),
                   artifact_location=t.get("artifact_location"), run_name=t.get("run_name"),
                   run_label=t.get("run_label"),
                   tags=t.get("tags") or {}, parent_run_id=t.get("parent_run_id"),
                   connect_timeout_s=t.get("connect_timeout_s", 10), http_timeout_s=t.get("http_timeout_s", 30),
                   http_max_retries=t.get("http_max_retries", 2))

    # -- connection -------------------------------------------------------------
    def precheck(self) -> None:
        """The checks that cost milliseconds: a server answers, a local store's folder exists."""
        if not self.enabled:
            return
        check_reachable(self.uri, self.timeout)
        check_database(self.uri, self.timeout)
        _http_settings(self.http_timeout, self.http_max_retries)
        if self.uri.startswith("sqlite:///"):
            folder = Path(self.uri[len("sqlite:///"):]).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TrackingError(f"tracking.uri={redact(self.uri)}: cannot create {folder}: {e.strerror}") from None
            if not os.access(folder, os.W_OK):
                raise TrackingError(f"tracking.uri={redact(self.uri)}: {folder} is not writable")

    def connect(self) -> None:
        """Open the store and the experiment (synchronously); raise :class:`~tardis_exp.errors.TrackingError`."""
        if not self.enabled:
            return
        self.precheck()
        self._open_store()

    def _open_store(self) -> None:
        with sqlite_init_lock(self.uri):
            self._open_store_unlocked()

    def _open_store_unlocked(self) -> None:
        import mlflow

        try:
            self.client = mlflow.MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                loc = None
                if self.artifact_location and _is_local(self.uri):
                    Path(self.artifact_location).mkdir(parents=True, exist_ok=True)
                    loc = Path(self.artifact_location).resolve().as_uri()
                try:
                    self.experiment_id = self.client.create_experiment(self.experiment, artifact_location=loc)
                except Exception:  # another worker created it first
                    exp = self.client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        raise
                    self.experiment_id = exp.experiment_id
            else:
                if exp.lifecycle_stage == "deleted":
                    raise TrackingError(f"tracking.experiment={self.experiment!r} is deleted in "
                                        f"{redact(self.uri)}; restore it (mlflow experiments restore) "
                                        "or choose another name")
                self.experiment_id = exp.experiment_id
            self._safe("experiment tags", lambda: init_experiment(self.client, self.experiment_id))
        except TrackingError:
            raise
        except Exception as e:
            raise TrackingError(f"cannot use tracking.uri={redact(self.uri)}: {type(e).__name__}: {redact(str(e))}") from e

    # -- failure handling ----------------------------------------------------------
    def _safe(self, what: str, fn: Callable[[], Any], *, always: bool = False) -> Any:
        """Call the store; a failure is a warning (and a record), never an exception.

        After :data:`MAX_CONSECUTIVE_FAILURES` failures in a row further calls are
        skipped (``always=True`` calls -- run status -- are still tried once).
        """
        if self._gave_up and not always:
            self.failures.append(f"{what}: skipped (store unreachable)")
            return None
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 -- any store error: keep computing, say so
            msg = f"{what}: {type(e).__name__}: {redact(str(e)).splitlines()[0][:500] if str(e) else ''}"
            self.failures.append(msg)
            self._consecutive += 1
            log.warning("MLflow logging failed (%s); the run continues, local results are kept", msg)
            if self._consecutive >= MAX_CONSECUTIVE_FAILURES and not self._gave_up:
                self._gave_up = True
                log.warning("MLflow store at %s failed %d times in a row: no more logging to it for this run; "
                            "see tracking_errors.log in the run directory", redact(self.uri), self._consecutive)
            return None
        self._consecutive = 0
        return out

    def _record_failures(self) -> None:
        """Say what was not logged: a warning, a local file, and a tag if the store answers."""
        if not self.failures:
            return
        log.warning("%d MLflow logging call(s) failed or were skipped for run %s; the MLflow record is "
                    "incomplete, the run directory is not", len(self.failures), self.parent and self.parent._id)
        if self.local_dir is not None:
            try:
                with open(self.local_dir / "tracking_errors.log", "a") as f:
                    f.write("\n".join(self.failures) + "\n")
            except OSError as e:
                log.warning("could not write tracking_errors.log: %s", e)
        if self.parent is not None and self.parent._id is not None and not self._gave_up:
            n, rid = len(self.failures), self.parent._id
            self._safe("tag tracking failures", lambda: self.client.set_tag(
                rid, "tardis_exp.tracking_failures", str(n)))

    # -- the store thread --------------------------------------------------------
    def _submit(self, st: StageRun, what: str, fn: Callable[[str], Any], *, always: bool = False) -> None:
        """Queue ``fn(run_id)`` for the store thread, guarded by :meth:`_safe`.

        Skipped when tracking is off, and on the thread when ``st``'s run was never
        created (the store was unusable: already recorded).
        """
        if not self.enabled or self._pool is None or not st.active:
            return

        def task():
            if st._id is not None:
                self._safe(what, lambda: fn(st._id), always=always)

        self._pool.submit(task)

    def drain(self) -> None:
        """Wait until every queued store call has run."""
        if self._pool is not None:
            self._pool.submit(lambda: None).result()

    def wait_ready(self) -> None:
        """Wait for the store and the parent run; raise :class:`~tardis_exp.errors.TrackingError` if unusable.

        The pipeline calls this before heavy compute, so a bad store costs the time to
        load and preprocess the data, never a factorization.
        """
        if self._ready is not None:
            self._ready.result()  # re-raises the TrackingError from the store thread

    # -- runs -------------------------------------------------------------------
    def _create(self, name: str, parent: str | None, tags: Mapping | None = None,
                start_ms: int | None = None) -> str:
        all_tags = {k: str(redact(v))[:5000] for k, v in (tags or {}).items() if v is not None}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, start_time=start_ms, run_name=name, tags=all_tags)
        return run.info.run_id

    def _end(self, st: StageRun, status: str, end_ms: int | None = None) -> None:
        end_ms = _now_ms() if end_ms is None else end_ms
        self._submit(st, f"mark run {status}",
                     lambda rid: self.client.set_terminated(rid, status=status, end_time=end_ms), always=True)

    @contextmanager
    def run(self, tags: Mapping | None = None, local_dir: str | os.PathLike | None = None,
            overrides: Iterable[str] | None = None):
        """The parent run of a pipeline run; FAILED with the traceback on error.

        The fast checks (:meth:`precheck`) raise :class:`~tardis_exp.errors.TrackingError` here; opening the
        store and creating the parent run happen on the store thread and raise at
        :meth:`wait_ready` (or when the block ends). Everything after that is best-effort
        (see the module docstring). ``local_dir`` (the run directory) receives
        ``traceback.txt`` and ``tracking_errors.log`` when there is something to say.
        ``overrides`` (Hydra's) name the run when neither ``run_name`` nor ``run_label`` is set.
        """
        self.local_dir = Path(local_dir) if local_dir is not None else None
        self.name = self.run_name or self.run_label or default_run_name(overrides)
        if not (self.run_name or self.run_label) and self.local_dir is not None:
            # two runs with the same overrides (two default runs) still differ in the table,
            # by their run folder's id (outputs/runs/<time>_<id>)
            self.name += f" · {self.local_dir.name.rsplit('_', 1)[-1][:8]}"
        self.failures, self._consecutive, self._gave_up = [], 0, False
        self.precheck()
        self.parent = StageRun(self, self.enabled)
        if self.enabled:
            tags = self._parent_tags(tags)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tardis-mlflow")
            self._ready = self._pool.submit(self._open_and_create_parent, tags, _now_ms())
        t0 = time.perf_counter()
        try:
            try:
                yield self.parent
            except BaseException as e:
                self.parent.log_metric("duration_s", time.perf_counter() - t0)
                self.parent.flush()
                self._fail(self.parent, e)
                raise
            self.parent.log_metric("duration_s", time.perf_counter() - t0)
            self.parent.flush()
            self._end(self.parent, "FINISHED")
            self.wait_ready()  # a store that never opened fails the run rather than pass silently
        finally:
            self._close()
        if self.parent._id is not None:
            log.info("MLflow run %s in experiment %r at %s", self.parent._id, self.experiment,
                     self.run_url(self.parent._id))

    def _parent_tags(self, tags: Mapping | None) -> dict:
        tags = {**self.tags, **(tags or {})}
        if "optuna_trial" in tags:
            tags.setdefault("optuna.trial_number", tags["optuna_trial"])
        for k, v in source_tags().items():
            tags.setdefault(k, v)
        if tags.get("git_commit") not in (None, "unknown"):
            tags.setdefault("mlflow.source.git.commit", tags["git_commit"])
        return tags

    def _open_and_create_parent(self, tags: Mapping, start_ms: int) -> None:
        """On the store thread: import MLflow, open the store, create the parent run."""
        self._open_store()
        try:
            self.parent._id = self._create(self.name, self.parent_run_id, tags, start_ms)
        except Exception as e:
            raise TrackingError(f"cannot create a run in tracking.uri={redact(self.uri)} "
                                f"(experiment {self.experiment!r}): {type(e).__name__}: {redact(str(e))}") from e

    def _close(self) -> None:
        """Let the queued calls finish, then say what did not reach the store."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._ready is not None and self._ready.exception() is not None:
            self.failures.append(f"open store: {self._ready.exception()}")
        self._record_failures()

    def run_url(self, run_id: str) -> str:
        """Where to see a run: its UI page on a server, else the ``mlflow ui`` command for the store."""
        if self.uri.startswith(("http://", "https://")):
            return f"{redact(self.uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return f"{redact(self.uri)} (open with: mlflow ui --backend-store-uri '{redact(self.uri)}')"

    @contextmanager
    def stage(self, name: str, params: Mapping[str, Any] | None = None):
        """A child run of the parent for one stage; logs its params and ``duration_s``.

        A child that cannot be created (store gone) leaves the stage untracked, with a
        warning; the stage itself always runs.
        """
        # one clock for the run's start, end and duration_s: the run lasts what the stage measured,
        # however late the store thread (or a loaded machine) gets to it
        start_wall, t0 = time.time(), time.perf_counter()
        st = StageRun(self, self.enabled and self._pool is not None)
        if st.active:
            start_ms, parent = int(start_wall * 1000), self.parent

            def create():
                if parent is None or parent._id is None:
                    return  # no parent run: the store never opened (recorded there)
                st._id = self._safe(f"create stage run {name}",
                                    lambda: self._create(name, parent._id, {"stage": name}, start_ms))

            self._pool.submit(create)
        if params:
            st.log_params({name: dict(params)})  # prefixed: factorize.random_state, not random_state

        def finish():
            dur = time.perf_counter() - t0
            st.log_metric("duration_s", dur)
            st.flush()
            return int((start_wall + dur) * 1000)

        try:
            yield st
        except BaseException as e:
            self._fail(st, e, finish())
            raise
        else:
            self._end(st, "FINISHED", finish())

    def _fail(self, st: StageRun, exc: BaseException, end_ms: int | None = None) -> None:
        """Traceback as an artifact (and in the run directory), error tag, FAILED/KILLED."""
        tb = redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        if self.local_dir is not None:
            try:
                (self.local_dir / "traceback.txt").write_text(tb)
            except OSError:
                pass
        self._text(st, tb, "traceback.txt")
        self._tags(st, {"error": f"{type(exc).__name__}: {exc}"})
        self._end(st, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", end_ms)

    # -- logging primitives (queued for the store thread) --------------------------
    def _metric_batch(self, st: StageRun, items) -> None:
        """Finite values only (MLflow stores NaN, but the UI cannot compare it); 1000 per batch."""
        ts = _now_ms()  # when the pipeline logged it, not when the thread sent it
        items = [(k, float(v), int(s)) for k, v, s in items if math.isfinite(float(v))]
        # one guarded store call per chunk: a failure counts once towards giving up
        for i in range(0, len(items), 1000):
            chunk = items[i: i + 1000]

            def send(rid, chunk=chunk):
                from mlflow.entities import Metric

                self.client.log_batch(rid, metrics=[Metric(k, v, ts, s) for k, v, s in chunk])

            self._submit(st, f"log metrics {sorted({k for k, _, _ in chunk})}", send)

    def _params(self, st: StageRun, params) -> None:
        items = list(safe_params(params).items())
        for i in range(0, len(items), 100):
            chunk = items[i: i + 100]

            def send(rid, chunk=chunk):
                from mlflow.entities import Param

                self.client.log_batch(rid, params=[Param(k, v) for k, v in chunk])

            self._submit(st, f"log {len(chunk)} params", send)

    def _tags(self, st: StageRun, tags) -> None:
        items = [(k, str(redact(v))[:5000]) for k, v in tags.items() if v is not None]

        def send(rid):
            from mlflow.entities import RunTag

            self.client.log_batch(rid, tags=[RunTag(k, v) for k, v in items])

        self._submit(st, f"set tags {sorted(tags)}", send)

    def _artifact(self, st: StageRun, path, artifact_path=None) -> None:
        p = Path(path)
        if p.is_dir():
            self._submit(st, f"log artifacts {p.name}/",
                         lambda rid: self.client.log_artifacts(rid, str(p), artifact_path))
        else:
            self._submit(st, f"log artifact {p.name}", lambda rid: self.client.log_artifact(rid, str(p), artifact_path))

    def _register(self, st: StageRun, name: str, artifact_path: str) -> None:
        def send(rid):
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(name)
            except MlflowException as e:  # registered before: a new version of it
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            source = f"{self.client.get_run(rid).info.artifact_uri}/{artifact_path}"
            self.client.create_model_version(name, source, run_id=rid)

        self._submit(st, f"register model {name}", send)

    def _text(self, st: StageRun, text, name) -> None:
        self._submit(st, f"log {name}", lambda rid: self.client.log_text(rid, text, name))

    def log_input(self, shape: tuple[int, int], name: str, digest: str, source: str) -> None:
        """Record the input with ``mlflow.data`` so runs on the same data group together.

        The dataset carries name, digest, source and a profile with the shape; the
        matrix itself is not uploaded.
        """
        if self.parent is None:
            return
        profile = json.dumps({"n_obs": int(shape[0]), "n_vars": int(shape[1])})

        def _log(rid):
            from mlflow.data.code_dataset_source import CodeDatasetSource
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.entities import Dataset, DatasetInput, InputTag

            src_text = redact(str(source))
            src = None
            if "/" in src_text or "://" in src_text:
                try:
                    with warnings.catch_warnings():  # "can be interpreted in multiple ways": same class twice
                        warnings.simplefilter("ignore", UserWarning)
                        src = resolve_dataset_source(src_text)
                except Exception:  # noqa: BLE001 -- a scheme MLflow has no source class for (postgresql://...)
                    src = None
            if src is None:  # generated in process (data=synthetic) or not a file MLflow knows
                src = CodeDatasetSource({"mlflow.source.name": f"tardis_exp.data:{src_text}"})
            ent = Dataset(name=redact(str(name)), digest=digest, source_type=src._get_source_type(),
                          source=src.to_json(),
                          profile=profile)
            self.client.log_inputs(rid,
                                   datasets=[DatasetInput(ent, tags=[InputTag("mlflow.data.context", "input")])])

        self._submit(self.parent, "log input dataset", _log)
