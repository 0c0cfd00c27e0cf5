"""MLflow tracking: one parent run per pipeline run, a nested child run per stage.

Everything goes through an explicit :class:`mlflow.MlflowClient` bound to the configured
tracking URI -- no global fluent state -- so several pipelines (sweep trials) can run in
one process and never log into each other's runs.

Store calls run on one background thread, in the order they were made: importing MLflow
and opening the store (about 2 s of CPU for an SQLite store) overlap with loading and
preprocessing the data, and logging never waits on the store. Runs keep the times at
which the pipeline started and ended them, not the times the thread got to them.

Failure policy
--------------
* A tracking server that does not answer ``/health`` raises
  :class:`~tardis_exp.errors.TrackingError` before the data is read (within about
  ``tracking.connect_timeout_s``); any other store that cannot be used (a corrupt
  database, a deleted experiment) raises it at :meth:`Tracker.wait_ready`, which the
  pipeline calls before the factorization: never after heavy compute.
* Once the parent run exists, a logging call that fails (the server went away, the
  disk is full) never stops the computation: it is logged as a warning, counted, written
  to ``tracking_errors.log`` in the run directory and, when the store still answers,
  tagged on the parent (``tardis_exp.tracking_failures``). After a few consecutive
  failures the tracker stops calling the store so a dead server costs seconds, not
  minutes of retries. The local results (``result.h5ad`` etc.) are written regardless.
* A stage that raises marks its run and the parent ``FAILED`` with ``traceback.txt``;
  everything logged before stays.
"""

# Over 500 lines on purpose: the one client of MLflow (connection checks, the store thread,
# runs, metric keys, names); to be divided once the sweeper uses it for all MLflow setup
# (docs/layout.md).

from __future__ import annotations

import functools
import getpass
import json
import logging
import math
import os
import re
import time
import traceback
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .stages import CACHED, ORDER
from .errors import TrackingError, redact  # noqa: F401 -- redact: re-exported (cli, sweeper)

log = logging.getLogger(__name__)

_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_key|apikey|access_key)", re.I)

# consecutive failed store calls after which the tracker stops calling the store
MAX_CONSECUTIVE_FAILURES = 3


def redact_tree(cfg: Any) -> Any:
    """:func:`redact` every string of a nested config; values under secret-looking keys become ``***``."""
    if isinstance(cfg, Mapping):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v not in (None, "") and not isinstance(v, Mapping)
                    else redact_tree(v)) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [redact_tree(v) for v in cfg]
    return redact(cfg)


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``; lists stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def safe_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Stringified, redacted, length-limited params (MLflow keeps 6000 chars)."""
    out = {}
    for k, v in params.items():
        v = "***" if _SECRET_KEY.search(k) and v not in (None, "") else redact(v)
        s = "null" if v is None else redact(str(v))
        out[k] = s[:6000]
    return out


def check_config(cfg: Mapping[str, Any]) -> None:
    """Validate a ``tracking`` config before anything is created (no run, no folder, no store).

    ``enabled=nope`` is an error, not truthy; ``http_max_retries=abc`` names the key.
    """
    from .params import check

    check("tracking", cfg, known_only=True)  # tardis_exp.params.TrackingParams


_DB_SCHEMES = ("postgresql", "postgres", "mysql", "mssql")


def sqlalchemy_uri(uri: str) -> str:
    """``postgresql://`` with the driver that is installed.

    SQLAlchemy's and MLflow's default driver for a bare ``postgresql://`` may not be the
    one installed (the README installs ``psycopg2-binary``); name it explicitly so that
    a bare URL works with either psycopg 3 or psycopg2.
    """
    import importlib.util

    for bare in ("postgresql://", "postgres://"):
        if uri.startswith(bare):
            rest = uri[len(bare):]
            if importlib.util.find_spec("psycopg2") is not None:
                return "postgresql+psycopg2://" + rest
            if importlib.util.find_spec("psycopg") is not None:
                return "postgresql+psycopg://" + rest
            raise TrackingError("tracking.uri=postgresql://... needs a PostgreSQL driver: "
                                "pip install psycopg2-binary (or psycopg)")
    return uri


def check_database(uri: str, timeout: float = 10.0) -> None:
    """Fail within ``timeout`` seconds when a database store does not accept a connection.

    MLflow retries a failing database connection for about two minutes before it says
    anything; one plain connection with a connect timeout says why in seconds
    (unreachable host, wrong password, missing database, missing driver).
    """
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in _DB_SCHEMES:
        return
    try:
        import sqlalchemy
    except ImportError:  # MLflow's SQL stores need it anyway; let MLflow say so
        return
    args: dict[str, Any] = {}
    if scheme in ("postgresql", "postgres", "mysql"):
        args["connect_timeout"] = max(1, int(math.ceil(timeout)))
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
    except ModuleNotFoundError as e:
        raise TrackingError(f"tracking.uri={redact(uri)}: the database driver is not installed ({e}); "
                            "for PostgreSQL: pip install psycopg2-binary") from None
    except Exception as e:  # noqa: BLE001 -- a malformed URL
        raise TrackingError(f"tracking.uri={redact(uri)} is not a usable database URL: "
                            f"{redact(_first_line(e))}") from None
    try:
        with engine.connect():
            pass
    except Exception as e:  # noqa: BLE001 -- refused, timed out, auth failed, no such database
        raise TrackingError(f"tracking.uri={redact(uri)}: cannot connect to the database: "
                            f"{redact(_first_line(e))}") from None
    finally:
        engine.dispose()


def _first_line(e: BaseException) -> str:
    """The first informative line of an exception (SQLAlchemy appends links and SQL)."""
    orig = getattr(e, "orig", None) or e
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    return f"{type(orig).__name__}: {lines[0] if lines else ''}"[:300]


# -- what the MLflow UI shows: run names, descriptions, params, metric keys ------------
# (docs/tracking-ui.md documents the scheme; tests/test_tracking.py checks every key a run logs)

# the config sections whose values change a result: the parent run's params
SCIENCE_SECTIONS = ("data", *ORDER)
# override keys that change where or how a run is recorded, never what it computes
_PLUMBING = ("paths.", "tracking.", "hydra.", "cache.", "progress", "task_name", "save_result", "sweep")
RUN_NAME_MAX = 120
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3: open in the model-training view, not GenAI


@dataclass(frozen=True)
class MetricKey:
    """One metric key, one meaning: ``step`` says what the step axis counts."""

    meaning: str
    step: str = "none"  # none (one value, step 0) | K | replicate | program | sample
    runs: tuple = ("pipeline",)  # run kinds that log it: pipeline (parent or trial), <stage>, study


_HEAD = ("pipeline", "study")  # headline keys: the pipeline run and, for its best trial, the study run


def _stage_metric_keys() -> dict[str, MetricKey]:
    from .stages import SPECS

    return {m.key: MetricKey(m.meaning, "none" if m.step == "none" else m.step,
                             (*(_HEAD if m.headline else ()), name))
            for name, spec in SPECS.items() for m in spec.metrics}


@functools.cache
def _metric_keys() -> dict[str, MetricKey]:
    # built on first use, not at import: the stage modules that declare them load scanpy,
    # scikit-learn and numba, which `import tardis_exp.tracking` (the CLI's error path) must not
    return {
        # what each stage reports, as its module declares it (SPEC.metrics, tardis_exp.outputs):
        # headline values also on the pipeline run and, for its best trial, the study run
        **_stage_metric_keys(),
        "cache_hits": MetricKey("stages served from the stage cache", runs=_HEAD),
        "cache_misses": MetricKey("stages computed (not in the stage cache)", runs=_HEAD),
        "duration_s": MetricKey("wall-clock seconds of this run", runs=("pipeline", *ORDER)),
        "cache_seconds": MetricKey("seconds to look up (and on a hit, restore) the stage's cache entry",
                                   runs=CACHED),
        # study runs (the sweeper)
        "n_trials_complete": MetricKey("COMPLETE trials of the study", runs=("study",)),
        "n_trials_fail": MetricKey("FAIL trials of the study", runs=("study",)),
        "n_trials_pruned": MetricKey("PRUNED trials of the study", runs=("study",)),
    }


def __getattr__(name: str):
    if name == "METRIC_KEYS":  # every metric key and its one meaning (built on first use)
        return _metric_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def metric_key(key: str) -> MetricKey | None:
    """The registered meaning of a metric key (``objective.<metric>``: a trial's objective value)."""
    keys = _metric_keys()
    if key in keys:
        return keys[key]
    if key.startswith("objective.") and key[len("objective."):] in keys:
        return MetricKey(f"the trial's objective value ({key[len('objective.'):]})", runs=("pipeline",))
    return None


def science_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The params of a parent run: the science sections, prefixed (``factorize.n_components``).

    Run plumbing (``paths.*``, ``tracking.*``, ``progress``, cache settings) stays out:
    it is in the ``config.yaml`` artifact, and in params it would make every compare
    view list a timestamped run directory as a difference.
    """
    return flatten({k: cfg[k] for k in SCIENCE_SECTIONS if isinstance(cfg.get(k), Mapping)})


def _override_key(o: str) -> str:
    return o.split("=", 1)[0].lstrip("+~")


def science_overrides(overrides: Iterable[str] | None) -> list[str]:
    """The overrides that change what a run computes (plumbing such as ``paths.*`` dropped)."""
    out: dict[str, str] = {}
    for o in overrides or []:
        key = _override_key(o)
        if "=" in o and not key.startswith(_PLUMBING) and key not in ("progress", "task_name", "save_result"):
            out.pop(key, None)  # the last override of a key is the one that counts
            out[key] = o.lstrip("+")
    return list(out.values())


def short_override(o: str) -> str:
    """``factorize.n_components=8`` -> ``n_components=8``; ``consensus=spots`` stays."""
    key, _, value = o.partition("=")
    value = value.strip(chr(39) + chr(34))
    if "/" in value:  # a path: its file name says enough
        value = value.rstrip("/").rsplit("/", 1)[-1]
    return f"{key.rsplit('.', 1)[-1]}={redact(value)}"


def default_run_name(overrides: Iterable[str] | None) -> str:
    """A parent run's name from its non-default overrides, e.g. ``consensus=spots n_components=8``.

    No such override: ``defaults``. Long names are cut at ``RUN_NAME_MAX`` characters.
    """
    # config-group choices first (consensus=spots), then the method's sections, the data last:
    # what differs between runs of one data set shows before a cut column hides the rest
    rank = {"factorize": 1, "consensus": 2, "score": 3, "preprocess": 4, "data": 5}
    ovs = sorted(science_overrides(overrides),
                 key=lambda o: 0 if "." not in _override_key(o) else rank.get(_override_key(o).split(".")[0], 6))
    name = " ".join(short_override(o) for o in ovs) or "defaults"
    return name if len(name) <= RUN_NAME_MAX else name[: RUN_NAME_MAX - 1] + "…"


_HEADLINE_TEXT = (("best_k", "best K"), ("consensus.silhouette", "consensus.silhouette"),
                  ("consensus.pac", "consensus.pac"), ("reconstruction_error", "reconstruction_error"),
                  ("program_recovery", "program_recovery"))


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.4g}"


def run_description(overrides: Iterable[str] | None, metrics: Mapping[str, float] | None = None, *,
                    data: str | None = None, study: str | None = None, study_run: str | None = None,
                    experiment_id: str | None = None, trial: Any = None) -> str:
    """The run's ``mlflow.note.content``: command line, overrides and headline result (markdown)."""
    ovs = science_overrides(overrides)
    cmd = " ".join(["tardis-exp", *(redact(o) for o in ovs)])
    lines = []
    if study is not None:
        link = (f"[{study}](#/experiments/{experiment_id}/runs/{study_run})" if study_run and experiment_id
                else study)
        lines.append(f"Trial {trial} of the Optuna study {link}.")
    lines.append(f"Command line (reproduces this run): `{cmd}`")
    lines.append("Overrides: " + (", ".join(f"`{redact(o)}`" for o in ovs) if ovs else "none (the defaults)")
                 + (f"; data: `{data}`." if data else "."))
    if metrics:
        res = [f"{label} = {_fmt(metrics[k])}" for k, label in _HEADLINE_TEXT
               if k in metrics and metrics[k] is not None and math.isfinite(float(metrics[k]))]
        if res:
            lines.append("Result: " + ", ".join(res) + ".")
    return "\n\n".join(lines)


EXPERIMENT_DESCRIPTION = """\
Gene-program discovery runs of **tardis-exp** (NMF + consensus clustering).

* A top-level run named after its overrides (`defaults`, `n_components=8 consensus=spots`) is one
  `tardis-exp` command; its child runs `preprocess`, `factorize`, `consensus`, `score` are the stages.
* A run with the study's name (`k_range`) is an Optuna study; its children are trials named
  `trial 3 · n_components=8 · K 4..10`, each with its stage runs.
* Headline metrics (`best_k`, `consensus.silhouette`, `consensus.pac`, `reconstruction_error`) are values
  at the chosen K on every run that carries them (a study: its best trial's); per-K curves are
  `consensus.*_by_k` (step = K) on the consensus stage runs. Params are the science config only
  (data, preprocess, factorize, consensus, score); `config.yaml` holds the rest.
* Show only top-level runs or one study: filter `tags.optuna.role = 'study'` or
  `tags.optuna.study_name = 'k_range'`. Naming scheme: docs/tracking-ui.md.
"""


# A saved view of the runs table (MLflow 3's "Views" menu, an experiment tag
# mlflow.sharedViewState.<id>): the headline metrics and swept params as columns. Opened by
# #/experiments/<id>/runs?workflowType=machine_learning&viewStateShareKey=headline
VIEW_ID = "headline"
VIEW_COLUMNS = ("metrics.`best_k`", "metrics.`consensus.silhouette`", "metrics.`consensus.pac`",
                "metrics.`reconstruction_error`", "params.`factorize.n_components`",
                "params.`consensus.min_clusters`", "params.`consensus.max_clusters`", "attributes.`Dataset`")


def _view_state() -> dict:
    # the runs table's state as MLflow 3.x keeps it (browser localStorage, saved views)
    return {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
            "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
            "selectedColumns": list(VIEW_COLUMNS), "columnOrder": [], "columnWidths": {}, "runsExpanded": {},
            "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {}, "runsHiddenMode": "FIRST_10_RUNS",
            "viewMaximized": False, "runListHidden": False, "isAccordionReordered": False,
            "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None, "groupsExpanded": {},
            "autoRefreshEnabled": True,
            "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}}


def init_experiment(client, experiment_id: str) -> None:
    """Experiment tags for a first view that works: the model-training view, a description
    and a saved view of the runs table with the headline columns.

    Set once (an existing description, kind or view chosen by a person is kept).
    """
    exp = client.get_experiment(experiment_id)
    tags = exp.tags or {}
    if "mlflow.experimentKind" not in tags:
        client.set_experiment_tag(experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
    if not tags.get("mlflow.note.content"):
        client.set_experiment_tag(experiment_id, "mlflow.note.content", EXPERIMENT_DESCRIPTION)
    key = f"mlflow.sharedViewState.{VIEW_ID}"
    if key not in tags:
        now = _now_ms()
        client.set_experiment_tag(experiment_id, key, json.dumps(
            {"name": "headline metrics", "createdAt": now, "updatedAt": now, "state": json.dumps(_view_state())}))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, before compute, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    # urllib does not take user:password@ in the URL (MLflow's requests does): send it as a header
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    req = urllib.request.Request(url)
    if parts.username:
        cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        req.add_header("Authorization", "Basic " + base64.b64encode(cred.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (configured URI)
            if r.status >= 400:
                raise TrackingError(f"tracking.uri={redact(uri)} answered HTTP {r.status} on /health")
    except urllib.error.HTTPError as e:
        raise TrackingError(f"tracking.uri={redact(uri)} answered HTTP {e.code} on /health; "
                            "is it an MLflow tracking server?") from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise TrackingError(
            f"tracking.uri={redact(uri)} is unreachable ({redact(str(e))}); start the server "
            "(mlflow server --host 127.0.0.1 --port 5000) or use the default embedded store"
        ) from None


@contextmanager
def sqlite_init_lock(uri: str):
    """Serialize opening an SQLite store among processes (a no-op for other stores).

    MLflow creates and migrates the schema of a new ``mlflow.db`` on first use; two
    processes doing it at once can leave the file broken for good ("table
    _alembic_tmp_tags already exists"). An ``fcntl`` lock on ``<db>.lock`` beside it
    makes the first opener create the schema while the others wait; the OS releases
    it if the holder dies.
    """
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        yield
        return
    import fcntl

    path = uri[len("sqlite:///"):].split("?", 1)[0] + ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # read-only folder: opening the store reports what is wrong
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


def source_tags(name: str = "tardis-exp") -> dict[str, str]:
    """The ``mlflow.source.*`` and ``mlflow.user`` tags of a run this package starts
    (pipeline runs and the sweeper's study runs)."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": name}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (OSError, KeyError):  # no user name in some containers: the tag is left out
        return tags
    return tags


def _http_settings(timeout_s: float, max_retries: int) -> None:
    # MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) turn a dead server
    # into minutes of waiting per call. Explicit environment settings still win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(max_retries)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # an int for MLflow
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(timeout_s, 1))))
    # MLflow prints "View run at <tracking URI>" for every ended run -- password included.
    # The tracker logs one redacted link for the parent instead.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


class StageRun:
    """Handle on one MLflow run (a stage or the parent); every call is safe to make.

    Calls are queued for the tracker's store thread and return at once. Metrics are
    buffered and sent in one batch when the run ends (or fails, or :meth:`flush` is
    called): each store call costs milliseconds, a batch costs one. :attr:`run_id` waits
    for the store; it is ``None`` when tracking is disabled or the run could not be
    created (which was warned about).
    """

    def __init__(self, tracker: "Tracker", active: bool):
        self.tracker = tracker
        self.active = active  # False: tracking disabled, every call is a no-op
        self._id: str | None = None  # set on the store thread once the run exists
        self.metrics: dict[str, float] = {}
        self._pending: list[tuple[str, float, int]] = []

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (waits for the queued store calls)."""
        if self.active:
            self.tracker.drain()
        return self._id

    def flush(self) -> None:
        """Send the buffered metrics now."""
        pending, self._pending = self._pending, []
        if pending:
            self.tracker._metric_batch(self, pending)

    def log_metric(self, key: str, value, step: int | None = None) -> None:
        if value is None:
            return
        value = float(value)
        if step is None:
            self.metrics[key] = value
        if self.active:
            self._pending.append((key, value, int(step or 0)))

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Scalar metrics at step 0, in one call to the store."""
        vals = {}
        for k, v in metrics.items():
            try:
                vals[k] = float(v)
            except (TypeError, ValueError):  # a label, not a number: a caller's slip, not a reason to fail
                log.warning("metric %s=%r is not a number; not logged", k, v)
        self.metrics.update(vals)
        if self.active:
            self._pending.extend((k, v, 0) for k, v in vals.items())

    def log_steps(self, key: str, values: Iterable, steps: Iterable[int] | None = None) -> None:
        """One metric history: ``values[i]`` at ``steps[i]`` (default 0, 1, ...)."""
        values = [float(v) for v in values]
        steps = [int(s) for s in steps] if steps is not None else list(range(len(values)))
        if len(steps) != len(values):
            raise ValueError(f"metric {key}: {len(values)} values but {len(steps)} steps")
        if self.active:
            self._pending.extend((key, v, s) for v, s in zip(values, steps))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker._params(self, flatten(params))

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self.tracker._artifact(self, path, artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.tracker._text(self, text, name)

    def register_model(self, name: str, artifact_path: str) -> None:
        """Register the model logged at ``artifact_path`` in the Model Registry as ``name``."""
        self.tracker._register(self, name, artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker._tags(self, tags)


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
