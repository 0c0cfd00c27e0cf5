"""MLflow tracking: one parent run per pipeline run, a nested child run per stage.

Everything goes through an explicit :class:`mlflow.MlflowClient` bound to the configured
tracking URI -- no global fluent state -- so several pipelines (sweep trials) can run in
one process and never log into each other's runs.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import TrackingError

log = logging.getLogger(__name__)

_CRED = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@\s]*)@")
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_key)", re.I)


def redact(value: Any) -> Any:
    """Hide credentials in URIs (``scheme://user:***@host``)."""
    if isinstance(value, str):
        return _CRED.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)
    return value


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``; lists stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def safe_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Stringified, redacted, length-limited params (MLflow keeps 6000 chars)."""
    out = {}
    for k, v in params.items():
        v = "***" if _SECRET_KEY.search(k) and v not in (None, "") else redact(v)
        s = "null" if v is None else str(v)
        out[k] = s[:6000]
    return out


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, before compute, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (configured URI)
            if r.status >= 400:
                raise TrackingError(f"tracking.uri={redact(uri)} answered HTTP {r.status} on /health")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise TrackingError(
            f"tracking.uri={redact(uri)} is unreachable ({e}); start the server "
            "(mlflow server --host 127.0.0.1 --port 5000) or use the default embedded store"
        ) from None


class StageRun:
    """Handle on one MLflow run (a stage or the parent)."""

    def __init__(self, tracker: "Tracker", run_id: str | None):
        self.tracker = tracker
        self.run_id = run_id
        self.metrics: dict[str, float] = {}

    def log_metric(self, key: str, value, step: int | None = None) -> None:
        if value is None:
            return
        value = float(value)
        if step is None:
            self.metrics[key] = value
        self.tracker._metric(self.run_id, key, value, step)

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        for k, v in metrics.items():
            self.log_metric(k, v)

    def log_steps(self, key: str, values: Iterable, steps: Iterable[int] | None = None) -> None:
        values = list(values)
        steps = list(steps) if steps is not None else list(range(len(values)))
        self.tracker._metric_steps(self.run_id, key, values, steps)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker._params(self.run_id, params)

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self.tracker._artifact(self.run_id, path, artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.tracker._text(self.run_id, text, name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker._tags(self.run_id, tags)


class Tracker:
    """Parent/child MLflow runs for one pipeline run; a no-op when disabled."""

    def __init__(self, uri: str | None = None, experiment: str = "tardis-exp", *, enabled: bool = True,
                 artifact_location: str | None = None, run_name: str | None = None,
                 tags: Mapping | None = None, parent_run_id: str | None = None, connect_timeout_s: float = 10):
        self.enabled = enabled and uri is not None
        self.uri = uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.parent_run_id = parent_run_id
        self.timeout = connect_timeout_s
        self.client = None
        self.experiment_id = None
        self.parent: StageRun | None = None

    @classmethod
    def from_config(cls, cfg) -> "Tracker":
        t = cfg
        return cls(uri=t.get("uri"), experiment=t.get("experiment", "tardis-exp"), enabled=t.get("enabled", True),
                   artifact_location=t.get("artifact_location"), run_name=t.get("run_name"),
                   tags=t.get("tags") or {}, parent_run_id=t.get("parent_run_id"),
                   connect_timeout_s=t.get("connect_timeout_s", 10))

    # -- connection -------------------------------------------------------------
    def connect(self) -> None:
        """Open the store and the experiment; raise :class:`TrackingError` early."""
        if not self.enabled:
            return
        check_reachable(self.uri, self.timeout)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(self.timeout, 5))))
        import mlflow

        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
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
                self.experiment_id = exp.experiment_id
        except TrackingError:
            raise
        except Exception as e:
            raise TrackingError(f"cannot use tracking.uri={redact(self.uri)}: {type(e).__name__}: {redact(str(e))}") from e

    # -- runs -------------------------------------------------------------------
    def _start(self, name: str, parent: str | None, tags: Mapping | None = None) -> str | None:
        if not self.enabled:
            return None
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def _end(self, run_id: str | None, status: str) -> None:
        if run_id is None:
            return
        try:
            self.client.set_terminated(run_id, status=status)
        except Exception as e:  # the store went away: keep the local result, say so
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, redact(str(e)))

    @contextmanager
    def run(self, tags: Mapping | None = None):
        """The parent run of a pipeline run; FAILED with the traceback on error."""
        self.connect()
        tags = {**self.tags, **(tags or {})}
        if "optuna_trial" in tags:
            tags.setdefault("optuna.trial_number", tags["optuna_trial"])
        rid = self._start(self.run_name or "pipeline", self.parent_run_id, tags)
        self.parent = StageRun(self, rid)
        try:
            yield self.parent
        except BaseException as e:
            self._fail(rid, e)
            raise
        else:
            self._end(rid, "FINISHED")

    @contextmanager
    def stage(self, name: str, params: Mapping[str, Any] | None = None):
        """A child run of the parent for one stage; logs ``duration_s``."""
        rid = self._start(name, self.parent.run_id if self.parent else None, {"stage": name})
        st = StageRun(self, rid)
        if params:
            st.log_params(params)
        t0 = time.perf_counter()
        try:
            yield st
        except BaseException as e:
            st.log_metric("duration_s", time.perf_counter() - t0)
            self._fail(rid, e)
            raise
        else:
            st.log_metric("duration_s", time.perf_counter() - t0)
            self._end(rid, "FINISHED")

    def _fail(self, run_id, exc: BaseException) -> None:
        if run_id is None:
            return
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            self._text(run_id, redact(tb), "traceback.txt")
            self._tags(run_id, {"error": redact(f"{type(exc).__name__}: {exc}")[:5000]})
        except Exception:
            pass
        self._end(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")

    # -- logging primitives --------------------------------------------------------
    def _metric(self, run_id, key, value, step=None) -> None:
        if run_id is None or not math.isfinite(value):
            return
        self.client.log_metric(run_id, key, value, step=step or 0)

    def _metric_steps(self, run_id, key, values, steps) -> None:
        if run_id is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(key, float(v), ts, int(s)) for v, s in zip(values, steps) if math.isfinite(float(v))]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(run_id, metrics=ms[i : i + 1000])

    def _params(self, run_id, params) -> None:
        if run_id is None:
            return
        from mlflow.entities import Param

        ps = [Param(k, v) for k, v in safe_params(params).items()]
        for i in range(0, len(ps), 100):
            self.client.log_batch(run_id, params=ps[i : i + 100])

    def _tags(self, run_id, tags) -> None:
        if run_id is None:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(redact(v))[:5000]) for k, v in tags.items()])

    def _artifact(self, run_id, path, artifact_path=None) -> None:
        if run_id is None:
            return
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(run_id, str(p), artifact_path)

    def _text(self, run_id, text, name) -> None:
        if run_id is None:
            return
        self.client.log_text(run_id, text, name)

    def log_input(self, adata, name: str, digest: str, source: str) -> None:
        """Record the input with ``mlflow.data`` so runs on the same data group together."""
        if not self.enabled or self.parent is None:
            return
        try:
            import mlflow.data
            import pandas as pd
            from mlflow.entities import DatasetInput, InputTag

            summary = pd.DataFrame({"n_obs": [adata.n_obs], "n_vars": [adata.n_vars], "digest": [digest]})
            ds = mlflow.data.from_pandas(summary, source=redact(source), name=name, digest=digest)
            ent = ds._to_mlflow_entity()
            self.client.log_inputs(self.parent.run_id, datasets=[DatasetInput(ent, tags=[InputTag("context", "input")])])
        except Exception as e:  # the input record is a convenience, never a reason to fail
            log.warning("could not log the input dataset: %s", e)
