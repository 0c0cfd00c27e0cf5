"""What the MLflow UI shows: metric keys, params, run names and descriptions, experiment tags.

The one place that says how a run looks to a person browsing MLflow: the registered
metric keys and their meanings (:data:`METRIC_KEYS`, :func:`metric_key`), the params of a
run (science sections only, flattened and redacted: :func:`science_params`,
:func:`safe_params`, :func:`redact_tree`), the overrides that name a run
(:func:`science_overrides`, :func:`default_run_name`), its markdown description
(:func:`run_description`), its source tags (:func:`source_tags`) and the experiment's
first view (:func:`init_experiment`: kind, description, a saved runs-table view).
docs/tracking-ui.md documents the scheme; tests/test_tracking.py checks every key a run
logs. Pure functions of configs and overrides: no MLflow import, no store access
(:func:`init_experiment` takes the client it is given).
"""

from __future__ import annotations

import functools
import getpass
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import redact
from ..stages import CACHED, ORDER

_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_key|apikey|access_key)", re.I)


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
    from ..stages import SPECS

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


def source_tags(name: str = "tardis-exp") -> dict[str, str]:
    """The ``mlflow.source.*`` and ``mlflow.user`` tags of a run this package starts
    (pipeline runs and the sweeper's study runs)."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": name}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (OSError, KeyError):  # no user name in some containers: the tag is left out
        return tags
    return tags
