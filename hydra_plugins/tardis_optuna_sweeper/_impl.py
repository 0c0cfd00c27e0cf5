"""Implementation of the ``tardis_optuna`` Hydra sweeper (Optuna ask/tell API)."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import re
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    OverrideType,
    RangeSweep,
)
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, Trial, TrialState
from hydra.errors import HydraException

log = logging.getLogger(__name__)


class SweeperConfigError(HydraException, ValueError):
    """A sweeper setting is invalid; raised before any trial runs (the CLI prints one line)."""


KEY = "hydra.sweeper"
HEARTBEAT_ATTR = "tardis.heartbeat"
FAIL_REASON_ATTR = "fail_reason"
VALUES_ATTR = "values"
OVERRIDES_ATTR = "overrides"
RUN_NAME_ATTR = "mlflow_run_name"
RUN_ID_ATTR = "mlflow_run_id"
METRICS_ATTR = "metrics"  # the trial's numeric results (headline metrics), as the task returned them
# best trials whose figures the study draws at its end (trials skip them in the presets)
MAX_BEST_TRIAL_PLOTS = 3

SAMPLERS = ("tpe", "random", "grid", "cmaes", "nsga2", "nsga3", "motpe", "qmc")
PRUNERS = ("none", "nop", "median", "percentile", "hyperband", "successive_halving", "threshold")
DIRECTIONS = ("minimize", "maximize")


# --------------------------------------------------------------------------- search space


@dataclass
class Dim:
    """One sampled hyper-parameter."""

    key: str  # config key (also the Optuna param name)
    prefix: str  # "", "+" or "++"
    dist: BaseDistribution

    def suggest(self, trial: Trial) -> Any:
        d = self.dist
        if isinstance(d, CategoricalDistribution):
            return trial.suggest_categorical(self.key, list(d.choices))
        if isinstance(d, IntDistribution):
            return trial.suggest_int(self.key, d.low, d.high, step=d.step, log=d.log)
        assert isinstance(d, FloatDistribution)
        return trial.suggest_float(self.key, d.low, d.high, step=d.step, log=d.log)

    def grid_values(self) -> List[Any]:
        d = self.dist
        if isinstance(d, CategoricalDistribution):
            return list(d.choices)
        if isinstance(d, IntDistribution) and not d.log:
            return list(range(d.low, d.high + 1, d.step))
        if isinstance(d, FloatDistribution) and d.step is not None and not d.log:
            n = int(round((d.high - d.low) / d.step))
            return [d.low + i * d.step for i in range(n + 1)]
        raise SweeperConfigError(
            f"{KEY}.params.{self.key}: the grid sampler ({KEY}.sampler.name=grid) needs a "
            f"discrete search space (choice(...), range(...), or a fixed value), got a "
            f"continuous interval {self.dist}."
        )


@dataclass
class OrderedPair:
    """Two integer keys sampled so that ``low <= low_key``, ``low_key + min_width <= high_key <= high``.

    ``min_width >= 1`` (or a bound) samples the low end and the width (Optuna params
    ``low_key`` and ``"<high_key>-<low_key>"``) instead of the two ends, so no trial gets
    an empty or single-value range. ``bound_key``: ``high_key`` also stays at or below that
    key's value in the trial (a sampled param, a fixed override or the task config), when
    every key of ``bound_when`` has the given value (e.g. the cluster range of
    ``consensus.method=components`` cannot exceed ``factorize.n_components``).
    """

    low_key: str
    high_key: str
    low: int
    high: int
    low_prefix: str = ""
    high_prefix: str = ""
    min_width: int = 0
    bound_key: Optional[str] = None
    bound_when: Dict[str, Any] = field(default_factory=dict)
    label: Optional[str] = None  # trial names: "K 4..10"

    @property
    def name(self) -> str:
        return f"{self.low_key},{self.high_key}"

    @property
    def width_name(self) -> str:
        return f"{self.high_key}-{self.low_key}"

    @property
    def by_width(self) -> bool:
        return self.min_width > 0 or self.bound_key is not None

    def describe(self) -> str:
        """The pair as a study param: ``int [2, 12], max - min >= 1, max <= factorize.n_components ...``."""
        out = f"{self.low_key} <= {self.high_key} in int [{self.low}, {self.high}]"
        if self.min_width:
            out += f", {self.high_key} - {self.low_key} >= {self.min_width}"
        if self.bound_key:
            out += f", {self.high_key} <= {self.bound_key}"
            if self.bound_when:
                out += " when " + " and ".join(f"{k}={v}" for k, v in self.bound_when.items())
        return out

    def grid_values(self) -> List[str]:
        return [
            f"{a},{b}" for a in range(self.low, self.high + 1)
            for b in range(a + self.min_width, self.high + 1)
        ]

    def top(self, value: Callable[[str], Any]) -> int:
        """The largest high_key value allowed in a trial whose other keys read ``value(key)``."""
        if self.bound_key is None:
            return self.high
        if any(str(value(k)) != str(v) for k, v in self.bound_when.items()):
            return self.high
        bound = value(self.bound_key)
        return self.high if bound is None else min(self.high, int(bound))

    def suggest(self, trial: Trial, grid: bool, value: Callable[[str], Any] = lambda k: None) -> Tuple[int, int]:
        top = self.top(value)
        if top - self.low < self.min_width:  # validated before the first trial; never expected
            raise SweeperConfigError(f"{self.describe()}: no room for the range (upper bound {top})")
        if grid:
            a, b = (int(x) for x in trial.suggest_categorical(self.name, self.grid_values()).split(","))
            if b > top:  # keep the grid point's width, slide it under the bound
                a, b = max(self.low, top - (b - a)), top
            return a, b
        if not self.by_width:
            a = trial.suggest_int(self.low_key, self.low, self.high)
            b = trial.suggest_int(self.high_key, a, self.high)
            return a, b
        a = trial.suggest_int(self.low_key, self.low, top - self.min_width)
        w = trial.suggest_int(self.width_name, self.min_width, top - a)
        return a, a + w


@dataclass
class SearchSpace:
    dims: List[Dim] = field(default_factory=list)
    pairs: List[OrderedPair] = field(default_factory=list)
    fixed: List[str] = field(default_factory=list)  # verbatim overrides

    def grid(self) -> Dict[str, List[Any]]:
        space: Dict[str, List[Any]] = {d.key: d.grid_values() for d in self.dims}
        for p in self.pairs:
            space[p.name] = p.grid_values()
        return space

    def fixed_value(self, key: str) -> Any:
        """The value a fixed override gives ``key`` (parsed), else None."""
        for f in reversed(self.fixed):
            k, sep, v = f.partition("=")
            if sep and k.lstrip("+~") == key:
                try:
                    return OverridesParser.create().parse_override(f).value()
                except Exception:
                    return v
        return None

    def sample(self, trial: Trial, grid: bool,
               base: Callable[[str], Any] = lambda k: None) -> List[Tuple[str, str, Any]]:
        """Returns [(prefix, key, value)] for every sampled key.

        ``base(key)``: the task config's value of a key that is neither sampled nor fixed
        (an ordered pair's bound).
        """
        out: List[Tuple[str, str, Any]] = []
        for d in self.dims:
            out.append((d.prefix, d.key, d.suggest(trial)))
        sampled = {k: v for _, k, v in out}

        def value(key: str) -> Any:
            if key in sampled:
                return sampled[key]
            v = self.fixed_value(key)
            return base(key) if v is None else v

        for p in self.pairs:
            a, b = p.suggest(trial, grid, value)
            out.append((p.low_prefix, p.low_key, a))
            out.append((p.high_prefix, p.high_key, b))
        return out

    def check_pairs(self, base: Callable[[str], Any] = lambda k: None) -> None:
        """Every trial of the space must get a range of at least ``min_width + 1`` values."""
        for i, p in enumerate(self.pairs):
            if p.bound_key is None:
                continue
            lows: Dict[str, Any] = {}
            for d in self.dims:
                if d.key == p.bound_key:
                    dist = d.dist
                    lows[d.key] = (min(dist.choices) if isinstance(dist, CategoricalDistribution)
                                   else dist.low)

            def value(key: str) -> Any:
                if key in lows:
                    return lows[key]
                v = self.fixed_value(key)
                return base(key) if v is None else v

            top = p.top(value)
            if top - p.low < p.min_width:
                raise SweeperConfigError(
                    f"{KEY}.ordered_pairs[{i}]: {p.bound_key} can be {value(p.bound_key)}, which leaves "
                    f"{p.high_key} no room above {p.low_key} >= {p.low} (width >= {p.min_width}); raise "
                    f"the lower end of {p.bound_key} or lower {KEY}.ordered_pairs[{i}].low"
                )

    def labels(self, sampled: Sequence[Tuple[str, str, Any]]) -> List[str]:
        """Short words for a trial's name: ``n_components=8``, ``K 4..10``."""
        values = {k: v for _, k, v in sampled}
        paired = {k for p in self.pairs for k in (p.low_key, p.high_key)}
        out = [f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in values.items() if k not in paired]
        for p in self.pairs:
            label = p.label or f"{p.low_key.rsplit('.', 1)[-1]}..{p.high_key.rsplit('.', 1)[-1]}"
            out.append(f"{label} {values[p.low_key]}..{values[p.high_key]}")
        return out

    def describe(self) -> Dict[str, str]:
        """The search space as study params: ``search.<key>`` -> its distribution, in words."""
        out: Dict[str, str] = {}
        for d in self.dims:
            dist = d.dist
            if isinstance(dist, CategoricalDistribution):
                out[f"search.{d.key}"] = f"choice {list(dist.choices)}"
            else:
                kind = "int" if isinstance(dist, IntDistribution) else "float"
                step = f" step {dist.step}" if dist.step not in (None, 1) else ""
                out[f"search.{d.key}"] = f"{kind} [{dist.low}, {dist.high}]{step}{' log' if dist.log else ''}"
        for p in self.pairs:
            out[f"search.{p.low_key}..{p.high_key}"] = p.describe()
        if self.fixed:
            out["search.fixed"] = " ".join(self.fixed)
        return out

    def first_point(self) -> List[str]:
        """Overrides of one valid point, used to validate the space before any trial."""
        res = list(self.fixed)
        for d in self.dims:
            dist = d.dist
            if isinstance(dist, CategoricalDistribution):
                v: Any = dist.choices[0]
            else:
                v = dist.low
            res.append(f"{d.prefix}{d.key}={format_value(v)}")
        for p in self.pairs:
            res.append(f"{p.low_prefix}{p.low_key}={p.low}")
            res.append(f"{p.high_prefix}{p.high_key}={p.low + p.min_width if p.bound_key else p.high}")
        return res


_SIMPLE_STR = re.compile(r"^[A-Za-z_/\-\.][\w/\-\.:@]*$")


def format_value(v: Any) -> str:
    """Format a python value so that Hydra's override parser reads it back unchanged."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    s = str(v)
    if _SIMPLE_STR.match(s) and s.lower() not in ("null", "true", "false", "nan", "inf"):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _prefix(o: Override) -> str:
    if o.type == OverrideType.ADD:
        return "+"
    if o.type == OverrideType.FORCE_ADD:
        return "++"
    return ""


def _is_primitive(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def override_to_dim(o: Override, cfg_key: str) -> Optional[Dim]:
    """Sweep override -> Dim; None for a non-sweep (fixed) override."""
    key = o.get_key_element()
    prefix = _prefix(o)
    if not o.is_sweep_override():
        return None
    value = o.value()
    if o.is_choice_sweep():
        assert isinstance(value, ChoiceSweep)
        choices = []
        for c in value.list:
            if not _is_primitive(c):
                raise SweeperConfigError(
                    f"{cfg_key}: choice values must be scalars (str/int/float/bool/null), got {c!r}"
                )
            choices.append(c)
        if not choices:
            raise SweeperConfigError(f"{cfg_key}: empty choice()")
        return Dim(key, prefix, CategoricalDistribution(choices))
    if o.is_range_sweep():
        assert isinstance(value, RangeSweep)
        vals = list(value.range())
        if not vals:
            raise SweeperConfigError(f"{cfg_key}: empty range()")
        step = value.step
        if all(isinstance(x, int) for x in (value.start, value.stop, step)):
            return Dim(key, prefix, IntDistribution(vals[0], vals[-1], step=int(step)))
        if len(vals) == 1:
            return Dim(key, prefix, CategoricalDistribution(vals))
        return Dim(key, prefix, FloatDistribution(float(vals[0]), float(vals[-1]), step=float(step)))
    if o.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        log_scale = "log" in value.tags
        if value.start is None or value.end is None:
            raise SweeperConfigError(f"{cfg_key}: interval() needs a start and an end")
        if value.start > value.end:
            raise SweeperConfigError(f"{cfg_key}: interval start {value.start} > end {value.end}")
        if isinstance(value.start, int) and isinstance(value.end, int):
            return Dim(key, prefix, IntDistribution(value.start, value.end, log=log_scale))
        return Dim(key, prefix, FloatDistribution(float(value.start), float(value.end), log=log_scale))
    raise SweeperConfigError(f"{cfg_key}: unsupported sweep {o.input_line!r} (use choice/range/interval)")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, (Mapping, DictConfig)):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def build_search_space(
    params: Optional[Mapping[str, Any]],
    ordered_pairs: Optional[Sequence[Any]],
    arguments: Sequence[str],
) -> SearchSpace:
    parser = OverridesParser.create()
    by_key: Dict[str, Tuple[Override, str]] = {}
    order: List[str] = []

    def add(o: Override, cfg_key: str) -> None:
        k = o.key_or_group
        if k not in by_key:
            order.append(k)
        by_key[k] = (o, cfg_key)

    for key, value in _flatten(params or {}):
        cfg_key = f"{KEY}.params.{key}"
        if isinstance(value, (list, ListConfig)):
            items = list(value)
            if not all(_is_primitive(x) for x in items):
                raise SweeperConfigError(f"{cfg_key}: list values must be scalars")
            line = f"{key}=choice({','.join(format_value(x) for x in items)})"
        elif isinstance(value, str):
            line = f"{key}={value}"
        else:
            line = f"{key}={format_value(value)}"
        try:
            o = parser.parse_override(line)
        except Exception as e:  # hydra OverrideParseException
            raise SweeperConfigError(f"{cfg_key}: cannot parse {value!r}: {e}") from e
        add(o, cfg_key)

    # command-line overrides take precedence over `params`
    for arg in arguments:
        try:
            o = parser.parse_override(arg)
        except Exception as e:
            raise SweeperConfigError(f"command-line override {arg!r}: {e}") from e
        add(o, f"command-line override '{arg}'")

    space = SearchSpace()
    for k in order:
        o, cfg_key = by_key[k]
        dim = override_to_dim(o, cfg_key)
        if dim is None:
            assert o.input_line is not None
            space.fixed.append(o.input_line)
        else:
            space.dims.append(dim)

    dim_keys = {d.key for d in space.dims}
    for i, pair in enumerate(ordered_pairs or []):
        cfg_key = f"{KEY}.ordered_pairs[{i}]"
        if not isinstance(pair, (Mapping, DictConfig)):
            raise SweeperConfigError(f"{cfg_key}: expected a mapping with low_key, high_key, low, high")
        missing = [f for f in ("low_key", "high_key", "low", "high") if pair.get(f) is None]
        if missing:
            raise SweeperConfigError(f"{cfg_key}: missing field(s) {missing}")
        low, high = pair["low"], pair["high"]
        if not (isinstance(low, int) and isinstance(high, int)) or isinstance(low, bool):
            raise SweeperConfigError(f"{cfg_key}: low/high must be integers, got {low!r}, {high!r}")
        if low > high:
            raise SweeperConfigError(f"{cfg_key}: low ({low}) > high ({high})")

        def split(k: str) -> Tuple[str, str]:
            m = re.match(r"^(\+{0,2})(.*)$", str(k))
            assert m
            return m.group(1), m.group(2)

        lp, lk = split(pair["low_key"])
        hp, hk = split(pair["high_key"])
        if lk == hk:
            raise SweeperConfigError(f"{cfg_key}: low_key and high_key must differ")
        for k in (lk, hk):
            if k in dim_keys:
                raise SweeperConfigError(f"{cfg_key}: key {k!r} is also swept in {KEY}.params")
            space.fixed = [f for f in space.fixed if not re.match(rf"^\+{{0,2}}{re.escape(k)}=", f)]
        min_width = pair.get("min_width", 0) or 0
        if isinstance(min_width, bool) or not isinstance(min_width, int) or min_width < 0:
            raise SweeperConfigError(f"{cfg_key}.min_width: must be an integer >= 0, got {min_width!r}")
        if high - low < min_width:
            raise SweeperConfigError(f"{cfg_key}: high ({high}) - low ({low}) < min_width ({min_width})")
        bound_key = pair.get("bound_key")
        when = pair.get("bound_when") or {}
        if not isinstance(when, (Mapping, DictConfig)):
            raise SweeperConfigError(f"{cfg_key}.bound_when: expected a mapping key: value")
        when = {str(k): (OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v)
                for k, v in dict(when).items()}
        label = pair.get("label")
        space.pairs.append(OrderedPair(lk, hk, low, high, lp, hp, int(min_width),
                                       str(bound_key) if bound_key else None, when,
                                       str(label) if label else None))
    return space


# --------------------------------------------------------------------------- samplers / pruners


def _kwargs(cfg: Mapping[str, Any], skip: Sequence[str]) -> Dict[str, Any]:
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(c, dict)
    return {k: v for k, v in c.items() if k not in skip}


def sampler_name(cfg: Optional[Mapping[str, Any]]) -> str:
    name = str((cfg or {}).get("name", "tpe") or "tpe").lower()
    if name not in SAMPLERS:
        raise SweeperConfigError(
            f"{KEY}.sampler.name: unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}"
        )
    return name


def build_sampler(
    cfg: Optional[Mapping[str, Any]],
    space: SearchSpace,
    n_objectives: int,
    seed_offset: int = 0,
) -> optuna.samplers.BaseSampler:
    cfg = cfg or {}
    name = sampler_name(cfg)
    seed = cfg.get("seed", None)
    if seed is not None:
        # not for grid: GridSampler shuffles the grid with its seed and a trial's grid_id
        # indexes that order, so every process of a study (resumed, second worker) needs the
        # same seed; an offset sends grid ids to other points (duplicates, points never run)
        seed = int(seed) + (0 if name == "grid" else seed_offset)
    kw = _kwargs(cfg, ("name", "seed"))
    try:
        if name in ("tpe", "motpe"):
            return optuna.samplers.TPESampler(seed=seed, **kw)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed, **kw)
        if name == "grid":
            return optuna.samplers.GridSampler(space.grid(), seed=seed, **kw)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, **kw)
        if name == "nsga3":
            return optuna.samplers.NSGAIIISampler(seed=seed, **kw)
        if name == "qmc":
            return optuna.samplers.QMCSampler(seed=seed, **kw)
        if name == "cmaes":
            if n_objectives > 1:
                raise SweeperConfigError(
                    f"{KEY}.sampler.name: cmaes does not support multi-objective studies"
                )
            try:
                import cmaes  # noqa: F401
            except ImportError as e:
                raise SweeperConfigError(
                    f"{KEY}.sampler.name=cmaes requires the 'cmaes' package (pip install cmaes)"
                ) from e
            return optuna.samplers.CmaEsSampler(seed=seed, **kw)
    except TypeError as e:
        raise SweeperConfigError(f"{KEY}.sampler: invalid arguments for sampler {name!r}: {e}") from e
    raise AssertionError(name)


def build_pruner(cfg: Optional[Mapping[str, Any]]) -> optuna.pruners.BasePruner:
    cfg = cfg or {}
    name = str(cfg.get("name", "none") or "none").lower()
    kw = _kwargs(cfg, ("name",))
    factories: Dict[str, Callable[..., optuna.pruners.BasePruner]] = {
        "none": optuna.pruners.NopPruner,
        "nop": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "threshold": optuna.pruners.ThresholdPruner,
    }
    if name not in factories:
        raise SweeperConfigError(
            f"{KEY}.pruner.name: unknown pruner {name!r}; expected one of {', '.join(PRUNERS)}"
        )
    try:
        return factories[name](**kw)
    except TypeError as e:
        raise SweeperConfigError(f"{KEY}.pruner: invalid arguments for pruner {name!r}: {e}") from e


@dataclass
class Objective:
    metric: str
    direction: str


def parse_objectives(objectives: Optional[Sequence[Any]]) -> List[Objective]:
    if not objectives:
        raise SweeperConfigError(
            f"{KEY}.objectives: no objective configured; set e.g. "
            f"{KEY}.objectives=[{{metric:loss,direction:minimize}}]"
        )
    out = []
    for i, o in enumerate(objectives):
        k = f"{KEY}.objectives[{i}]"
        if not isinstance(o, (Mapping, DictConfig)) or not o.get("metric"):
            raise SweeperConfigError(f"{k}: expected {{metric: <name>, direction: minimize|maximize}}")
        direction = str(o.get("direction", "minimize")).lower()
        if direction not in DIRECTIONS:
            raise SweeperConfigError(
                f"{k}.direction: must be 'minimize' or 'maximize', got {o.get('direction')!r}"
            )
        out.append(Objective(str(o["metric"]), direction))
    names = [o.metric for o in out]
    if len(set(names)) != len(names):
        raise SweeperConfigError(f"{KEY}.objectives: duplicated metric in {names}")
    return out


def lookup_metric(ret: Any, metric: str) -> Any:
    """Find `metric` in the task's return value: flat dotted key or nested path."""
    if isinstance(ret, DictConfig):
        ret = OmegaConf.to_container(ret, resolve=True)
    if isinstance(ret, Mapping):
        if metric in ret:
            return ret[metric]
        node: Any = ret
        for part in metric.split("."):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            else:
                raise KeyError(metric)
        return node
    raise KeyError(metric)


def available_metrics(ret: Any) -> List[str]:
    if isinstance(ret, DictConfig):
        ret = OmegaConf.to_container(ret, resolve=True)
    if not isinstance(ret, Mapping):
        return []
    return sorted(k for k, _ in _flatten(ret))


def extract_values(ret: Any, objectives: List[Objective]) -> Tuple[Optional[List[float]], str]:
    """-> (values, error message). values is None on error."""
    if not isinstance(ret, (Mapping, DictConfig)):
        if len(objectives) == 1 and isinstance(ret, (int, float)) and not isinstance(ret, bool):
            v = float(ret)
            if math.isfinite(v):
                return [v], ""
            return None, f"objective '{objectives[0].metric}' is not finite: {v}"
        return None, (
            f"task returned {type(ret).__name__}, expected a dict of metrics containing "
            f"{[o.metric for o in objectives]}"
        )
    values = []
    for o in objectives:
        try:
            raw = lookup_metric(ret, o.metric)
        except KeyError:
            return None, (
                f"objective metric '{o.metric}' missing from the task's return value; "
                f"available metrics: {available_metrics(ret)}"
            )
        try:
            v = float(raw)
        except (TypeError, ValueError):
            return None, f"objective metric '{o.metric}' is not a number: {raw!r}"
        if not math.isfinite(v):
            return None, f"objective metric '{o.metric}' is not finite: {v}"
        values.append(v)
    return values, ""


# --------------------------------------------------------------------------- storage, locks


@dataclass
class StorageSpec:
    kind: str  # "journal" | "rdb"
    location: str  # file path or URL

    def describe(self) -> str:
        return f"journal:{self.location}" if self.kind == "journal" else _mask_url(self.location)


def _mask_url(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def parse_storage(storage: Optional[str], journal_path: Optional[str], base_dir: str) -> StorageSpec:
    def absolute(p: str) -> str:
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))

    if storage is None or str(storage).strip() == "":
        if not journal_path:
            raise SweeperConfigError(f"{KEY}.journal_path: must be set when {KEY}.storage is null")
        return StorageSpec("journal", absolute(str(journal_path)))
    s = str(storage).strip()
    if s.startswith("journal:"):
        p = s[len("journal:"):]
        if p.startswith("//"):
            p = p[2:]
        if not p:
            raise SweeperConfigError(f"{KEY}.storage: empty journal path in {s!r}")
        return StorageSpec("journal", absolute(p))
    if s.endswith((".log", ".jsonl")) and "://" not in s:
        return StorageSpec("journal", absolute(s))
    if "://" not in s:
        raise SweeperConfigError(
            f"{KEY}.storage: {s!r} is neither a journal file (*.log, *.jsonl, journal:<path>) "
            f"nor an SQLAlchemy URL (sqlite:///..., postgresql+psycopg2://...)"
        )
    if s.startswith("sqlite:///") and not s.startswith("sqlite:///:memory:"):
        path = s[len("sqlite:///"):]
        if not os.path.isabs(path):
            path = absolute(path)
            s = "sqlite:///" + path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return StorageSpec("rdb", s)


def make_storage(
    spec: StorageSpec,
    heartbeat_interval: Optional[int],
    grace_period: Optional[int],
    stale_callback: Callable[[optuna.Study, FrozenTrial], None],
) -> optuna.storages.BaseStorage:
    if spec.kind == "journal":
        os.makedirs(os.path.dirname(spec.location), exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        backend = JournalFileBackend(spec.location)
        return optuna.storages.JournalStorage(backend)
    engine_kwargs: Dict[str, Any] = {}
    if spec.location.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 120}}
    elif spec.location.startswith(("postgresql", "mysql")):
        engine_kwargs = {"pool_pre_ping": True}
    import sqlalchemy.exc

    # RDBStorage creates Optuna's tables on first use; two workers doing it at once on a
    # fresh PostgreSQL database collide (UniqueViolation on pg_type_typname_nsp_index).
    # Workers of this sweeper create them one at a time under a database-wide lock; a
    # collision with some other process (optuna-dashboard, a plain Optuna script) is
    # retried, by when the tables exist.
    attempts = 3
    with StudyLock(spec, SCHEMA_LOCK_NAME):
        for attempt in range(1, attempts + 1):
            try:
                return optuna.storages.RDBStorage(
                    spec.location,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=stale_callback if heartbeat_interval else None,
                )
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                    sqlalchemy.exc.OperationalError) as e:
                if attempt == attempts or "already exists" not in str(e) and "duplicate key" not in str(e):
                    raise
                log.info("Optuna's tables were being created by another process; retrying (%s)",
                         type(e).__name__)
                time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


# the database-wide lock under which Optuna's tables are created (not a study name)
SCHEMA_LOCK_NAME = "<schema>"


def with_driver(spec: StorageSpec) -> StorageSpec:
    """``postgresql://`` without a driver gets the installed one (SQLAlchemy 2.1's default is
    psycopg 3; the README installs psycopg2-binary), and a ``connect_timeout`` of 10 s
    unless the URL sets one (libpq waits without limit for a host that does not answer)."""
    import importlib.util

    loc = spec.location
    if spec.kind == "rdb" and loc.startswith(("postgresql://", "postgres://")):
        for driver in ("psycopg2", "psycopg"):
            if importlib.util.find_spec(driver) is not None:
                loc = f"postgresql+{driver}://" + loc.split("://", 1)[1]
                break
    if spec.kind == "rdb" and loc.startswith("postgresql") and "connect_timeout" not in loc:
        loc += ("&" if "?" in loc else "?") + "connect_timeout=10"
    return StorageSpec(spec.kind, loc)


def open_storage(spec: StorageSpec, *args: Any) -> optuna.storages.BaseStorage:
    """:func:`make_storage`, with a storage that cannot be used as one line naming the key
    (credentials masked), not a page of SQLAlchemy traceback."""
    try:
        return make_storage(spec, *args)
    except SweeperConfigError:
        raise
    except Exception as e:  # noqa: BLE001 -- refused, auth, missing driver, unwritable journal
        orig = getattr(e, "orig", None) or e.__cause__ or e
        lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
        why = f"{type(orig).__name__}: {lines[0] if lines else ''}"[:300]
        if isinstance(orig, ModuleNotFoundError) or "DB access module" in str(e):
            why += " (install the database driver, e.g. pip install psycopg2-binary)"
        raise SweeperConfigError(f"{KEY}.storage={spec.describe()} cannot be used: "
                                 f"{_mask_url(why)}") from None


class StudyLock:
    """Inter-process lock serialising 'count trials + ask' among workers of one study.

    journal / sqlite: fcntl lock on a side file (released by the OS if the holder dies);
    postgresql: session advisory lock; mysql: GET_LOCK; other databases: no lock.
    """

    def __init__(self, spec: StorageSpec, study_name: str) -> None:
        self.spec = spec
        self.key = f"tardis_optuna:{study_name}"
        self._fd: Optional[int] = None
        self._conn: Any = None
        self._engine: Any = None
        self.path: Optional[str] = None
        self.dialect = "none"
        if spec.kind == "journal":
            self.dialect = "file"
            self.path = spec.location + ".ask.lock"
        elif spec.location.startswith("sqlite:///") and ":memory:" not in spec.location:
            self.dialect = "file"
            self.path = spec.location[len("sqlite:///"):] + ".ask.lock"
        elif spec.location.startswith("postgresql"):
            self.dialect = "postgresql"
        elif spec.location.startswith("mysql"):
            self.dialect = "mysql"
        else:
            log.warning(
                "No inter-process lock available for %s; concurrent workers may overshoot n_trials",
                spec.describe(),
            )

    def _int_key(self) -> int:
        return int.from_bytes(hashlib.sha256(self.key.encode()).digest()[:8], "big", signed=True)

    def __enter__(self) -> "StudyLock":
        if self.dialect == "file":
            assert self.path is not None
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        elif self.dialect in ("postgresql", "mysql"):
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            if self._engine is None:
                self._engine = sqlalchemy.create_engine(self.spec.location, poolclass=NullPool)
            self._conn = self._engine.connect()
            if self.dialect == "postgresql":
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._int_key()})
            else:
                self._conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, -1)"), {"k": self.key[:64]})
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
        if self._conn is not None:
            import sqlalchemy

            try:
                if self.dialect == "postgresql":
                    self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._int_key()})
                else:
                    self._conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": self.key[:64]})
            finally:
                self._conn.close()
                self._conn = None


# --------------------------------------------------------------------------- heartbeat


class Heartbeat:
    """Keeps this worker's RUNNING trials alive and fails the stale trials of dead workers.

    RDBStorage implements Optuna's heartbeat (record_heartbeat / fail_stale_trials).
    JournalStorage does not (optuna 5.0), so for it the heartbeat is a trial system
    attribute holding a unix timestamp, and a RUNNING trial whose last heartbeat is older
    than `grace_period` is failed. Only stale trials are failed, never all RUNNING ones.
    """

    def __init__(self, study: optuna.Study, interval: Optional[int], grace: Optional[int]) -> None:
        from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

        self.study = study
        self.interval = interval
        self.grace = grace if grace is not None else (2 * interval if interval else None)
        self.storage = study._storage
        self.native = isinstance(self.storage, BaseHeartbeat) and is_heartbeat_enabled(self.storage)
        self._owned: Dict[int, int] = {}  # trial_id -> number
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def enabled(self) -> bool:
        return bool(self.interval)

    def _beat(self, trial_id: int) -> None:
        try:
            if self.native:
                self.storage.record_heartbeat(trial_id)
            else:
                self.storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        except Exception as e:  # never kill the sweep because of a heartbeat
            log.debug("heartbeat for trial id %s failed: %s", trial_id, e)

    def add(self, trial: Trial) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._owned[trial._trial_id] = trial.number
        self._beat(trial._trial_id)

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self._owned.pop(trial_id, None)

    def _run(self) -> None:
        assert self.interval
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self._owned)
            for tid in ids:
                self._beat(tid)

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def fail_stale(self) -> List[int]:
        """Fail RUNNING trials of dead workers. Returns their numbers."""
        if not self.enabled:
            return []
        if self.native:
            before = {
                t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            }
            optuna.storages.fail_stale_trials(self.study)
            after = {
                t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            }
            return sorted(before - after - set(self._owned.values()))
        assert self.grace is not None
        now = time.time()
        failed = []
        with self._lock:
            mine = set(self._owned)
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t._trial_id in mine:
                continue
            last = t.system_attrs.get(HEARTBEAT_ATTR)
            if last is None:
                last = t.datetime_start.timestamp() if t.datetime_start else now
            if now - float(last) <= self.grace:
                continue
            msg = (
                f"stale trial: no heartbeat for {now - float(last):.0f}s "
                f"(grace period {self.grace}s); its worker probably died"
            )
            try:
                self.storage.set_trial_system_attr(t._trial_id, FAIL_REASON_ATTR, msg)
                if self.storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    failed.append(t.number)
                    log.warning("Trial %d marked FAIL: %s", t.number, msg)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
        return failed


def _stale_callback(study: optuna.Study, trial: FrozenTrial) -> None:
    log.warning(
        "Trial %d marked FAIL: stale heartbeat (its worker probably died)", trial.number
    )


# --------------------------------------------------------------------------- MLflow


class MlflowTracker:
    """One parent run per study; annotates the per-trial child runs created by the task."""

    def __init__(self, uri: str, experiment: str, study_name: str,
                 artifact_location: Optional[str] = None) -> None:
        from mlflow import MlflowClient

        self.artifact_location = artifact_location
        self.uri = uri
        self.experiment = experiment
        self.study_name = study_name
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = ""
        self.parent_run_id = ""

    def setup(self) -> None:
        """Find or create experiment and parent run. Call under the study lock."""
        from tardis_exp.tracking import sqlite_init_lock

        c = self.client
        # the first call creates a new SQLite store's schema: under the same file lock as
        # the pipeline's runs, so a sweep and a run started together on a new store share it
        with sqlite_init_lock(self.uri):
            exp = c.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                self.experiment_id = c.create_experiment(
                    self.experiment, artifact_location=self.artifact_location
                )
            except Exception:
                exp = c.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id
        try:  # description and the model-training view (tardis_exp.tracking.init_experiment)
            from tardis_exp.tracking import init_experiment

            init_experiment(c, self.experiment_id)
        except ImportError:
            pass
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
            import getpass

            tags = {"optuna.study_name": self.study_name, "optuna.role": "study",
                    "mlflow.source.type": "LOCAL", "mlflow.source.name": "tardis-exp (Optuna sweep)"}
            try:
                tags["mlflow.user"] = getpass.getuser()
            except Exception:  # noqa: BLE001 -- no user name in some containers
                pass
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
               best: Optional[List[FrozenTrial]] = None) -> None:
        """``best_trials``: those whose figures to draw; ``best``: the best (Pareto) trials."""
        c = self.client
        rid = self.parent_run_id
        for t in (best_trials or [])[:MAX_BEST_TRIAL_PLOTS]:
            try:
                self._best_trial_figures(t)
            except Exception as e:  # figures are a view: never a reason to fail the study
                log.warning("Trial %d: could not draw its figures: %s: %s", t.number, type(e).__name__, e)
        with tempfile.TemporaryDirectory() as tmp:
            best_name = "best_trials.tsv" if len(objectives) == 1 else "pareto_front.tsv"
            _write_tsv(Path(tmp) / best_name, best_rows)
            _write_tsv(Path(tmp) / "trials.tsv", all_rows)
            c.log_artifact(rid, str(Path(tmp) / best_name))
            if len(objectives) > 1:  # keep the documented name available for both cases
                _write_tsv(Path(tmp) / "best_trials.tsv", best_rows)
                c.log_artifact(rid, str(Path(tmp) / "best_trials.tsv"))
            c.log_artifact(rid, str(Path(tmp) / "trials.tsv"))
            if log_plots:
                for path in _make_plots(study, objectives, Path(tmp)):
                    c.log_artifact(rid, str(path), artifact_path="plots")
        states = [t.state for t in study.get_trials(deepcopy=False)]
        c.log_metric(rid, "n_trials_complete", sum(s == TrialState.COMPLETE for s in states))
        c.log_metric(rid, "n_trials_fail", sum(s == TrialState.FAIL for s in states))
        c.log_metric(rid, "n_trials_pruned", sum(s == TrialState.PRUNED for s in states))
        if best:
            self._log_best(best, objectives)
        c.set_terminated(rid, "FINISHED")

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
        try:
            from tardis_exp.tracking import metric_key

            keep = {k for k in metrics if (metric_key(k) and "study" in metric_key(k).runs)}
        except ImportError:
            keep = set()
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
            except Exception as e:  # noqa: BLE001
                log.debug("could not copy the dataset input: %s", e)
        link = f"[{name}](#/experiments/{self.experiment_id}/runs/{run_id})" if run_id else name
        result = ", ".join(f"{k} = {metrics[k]:.4g}" for k in sorted(keep))
        text = getattr(self, "text", "")
        c.set_tag(rid, "mlflow.note.content",
                  f"{text}\n\nBest trial: {link}: {result}. The study's metrics are this trial's values.")

    def _best_trial_figures(self, t: FrozenTrial) -> None:
        """The figures of a best trial that skipped them (sweep presets do), from its result.h5ad."""
        out_dir = t.user_attrs.get("output_dir")
        result = Path(out_dir) / "result.h5ad" if out_dir else None
        if result is None or not result.is_file():
            return  # another worker's machine, or save_result=false
        plots = result.parent / "plots"
        if plots.is_dir() and any(plots.glob("*.png")):
            return  # drawn by the trial itself (tracking.log_plots=true)
        from tardis_exp.plots import make_plots, read_result

        written = make_plots(read_result(result), plots)
        run_id = self._find_child(t.number)
        if run_id and written:
            self.client.log_artifacts(run_id, str(plots), artifact_path="plots")
        log.info("Trial %d (best): figures in %s", t.number, plots)


def _numbers(ret: Any) -> Dict[str, float]:
    """The finite numbers of a task's flat return value (its headline metrics)."""
    out: Dict[str, float] = {}
    for k, v in (ret.items() if isinstance(ret, (Mapping, DictConfig)) else []):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[str(k)] = float(v)
    return out


def _write_tsv(path: Path, rows: List[Dict[str, Any]]) -> None:
    cols: List[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with open(path, "w") as f:
        f.write("\t".join(cols) + "\n")
        for r in rows:
            f.write("\t".join("" if r.get(k) is None else str(r.get(k)) for k in cols) + "\n")


def _make_plots(study: optuna.Study, objectives: List[Objective], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    paths: List[Path] = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        log.info("No COMPLETE trial: skipping plots")
        return paths

    def save(name: str, fn: Callable[[], Any]) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure  # type: ignore
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            p = out / f"{name}.png"
            fig.savefig(p, dpi=100)
            plt.close(fig)
            paths.append(p)
        except Exception as e:
            log.warning("Could not plot %s: %s", name, e)
            plt.close("all")

    multi = len(objectives) > 1
    for i, o in enumerate(objectives):
        suffix = f"_{_safe(o.metric)}" if multi else ""
        target = (lambda t, i=i: t.values[i]) if multi else None
        save(f"optimization_history{suffix}",
             lambda target=target, o=o: ovm.plot_optimization_history(study, target=target, target_name=o.metric))
        if len(complete) >= 2:
            save(f"param_importances{suffix}",
                 lambda target=target, o=o: ovm.plot_param_importances(study, target=target, target_name=o.metric))
        else:
            log.info("Fewer than 2 COMPLETE trials: skipping parameter importances")
    if multi and len(objectives) in (2, 3):
        save("pareto_front", lambda: ovm.plot_pareto_front(study, target_names=[o.metric for o in objectives]))
    try:  # stability and error against n_components, the best trial marked (tardis_exp.plots)
        from tardis_exp.plots import study_k_selection

        p = study_k_selection(study, out / "k_selection_ranks.png")
        if p is not None:
            paths.append(p)
    except Exception as e:  # a view of the study: never a reason to fail it
        log.warning("Could not plot k_selection_ranks: %s: %s", type(e).__name__, e)
        plt.close("all")
    return paths


def _safe(s: str) -> str:
    return re.sub(r"[^\w.-]", "_", s)


# --------------------------------------------------------------------------- the sweeper


def _get(cfg: Any, dotted: str) -> Any:
    try:
        return OmegaConf.select(cfg, dotted, default=None)
    except Exception:
        return None


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
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.launcher: Any = None
        self.job_idx = 0

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
        self.space = build_search_space(self.params, self.ordered_pairs, arguments)
        self.space.check_pairs(self._base_value)
        self.sampler_name = sampler_name(self.sampler_cfg)
        self.grid = self.sampler_name == "grid"
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
        storage = open_storage(self.storage_spec, self.heartbeat_interval, self.grace_period, _stale_callback)
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
        try:
            while True:
                with lock:
                    if study is None:
                        study = optuna.create_study(
                            storage=storage, study_name=self.study_name, directions=directions,
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
                            log.debug("set_metric_names failed: %s", e)
                        n0 = len(study.get_trials(deepcopy=False))
                        # offset the seed by the number of existing trials so that a resumed
                        # run or a second worker does not replay the same random sequence
                        study.sampler = build_sampler(self.sampler_cfg, self.space, len(directions), n0)
                        heartbeat = Heartbeat(study, self.heartbeat_interval, self.grace_period)
                        heartbeat.start()
                        tracker = self._mlflow_tracker()
                        if tracker is not None:
                            tracker.setup()
                            try:
                                tracker.describe(self._study_params(), self._study_text())
                            except Exception as e:  # noqa: BLE001 -- a description, never a reason to stop
                                log.warning("MLflow: could not describe the study run: %s", e)
                        if n0:
                            log.info("Loaded study '%s' with %d existing trials", self.study_name, n0)
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
        finally:
            if heartbeat is not None:
                heartbeat.stop()
        assert study is not None
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running:
            log.info("%d trial(s) still running in other workers: %s", len(running),
                     [t.number for t in running])
        return self._finish(study, tracker, launched)

    def _ask(self, study: optuna.Study, heartbeat: Heartbeat, n: int) -> List[Tuple[Trial, List[str]]]:
        batch = []
        for _ in range(n):
            trial = study.ask()
            heartbeat.add(trial)
            try:
                sampled = self.space.sample(trial, self.grid, self._base_value)
            except Exception as e:  # never expected; keep the sweep alive
                log.warning("Trial %d: sampling failed: %s", trial.number, e)
                study.tell(trial, state=TrialState.FAIL)
                heartbeat.remove(trial._trial_id)
                continue
            values = {k: v for _, k, v in sampled}
            overrides = list(self.space.fixed) + [f"{p}{k}={format_value(v)}" for p, k, v in sampled]
            trial.set_user_attr(VALUES_ATTR, values)
            # stored in the study for reference only (never re-launched): credentials masked
            trial.set_user_attr(OVERRIDES_ATTR, [_mask_url(o) for o in overrides])
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
                heartbeat.remove(trial._trial_id)
                if trial.number not in told:
                    try:
                        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                        log.warning("Trial %d marked FAIL: sweep interrupted", trial.number)
                    except Exception:
                        pass

    def _tell(self, study: optuna.Study, tracker: Optional[MlflowTracker], trial: Trial, ret: JobReturn) -> None:
        values: Optional[List[float]] = None
        error = ""
        run_id: Optional[str] = None
        headline: Dict[str, float] = {}
        state = TrialState.FAIL
        if ret.status == JobStatus.COMPLETED:
            rv = ret._return_value
            if isinstance(rv, (Mapping, DictConfig)):
                rid = rv.get("mlflow_run_id")
                run_id = str(rid) if rid else None
                headline = _numbers(rv)
            values, error = extract_values(rv, self.objectives)
            state = TrialState.COMPLETE if values is not None else TrialState.FAIL
            if error:
                log.warning("Trial %d FAILED: %s", trial.number, error)
        else:
            exc = ret._return_value
            if isinstance(exc, optuna.TrialPruned):
                state = TrialState.PRUNED
                error = f"pruned: {exc}"
                log.info("Trial %d pruned: %s", trial.number, exc)
            else:
                error = f"{type(exc).__name__}: {exc}"
                tb = getattr(exc, "__traceback__", None)
                log.warning(
                    "Trial %d FAILED (task raised %s); continuing the sweep",
                    trial.number, error, exc_info=(type(exc), exc, tb) if tb else None,
                )
        try:
            if ret.working_dir:
                trial.set_user_attr("job_dir", str(ret.working_dir))
            out_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
            if out_dir:  # where the trial wrote its outputs (job_dir is the cwd unless chdir)
                trial.set_user_attr("output_dir", str(out_dir))
            if error:
                trial.set_user_attr(FAIL_REASON_ATTR, _mask_url(error)[:2000])
            # optuna-dashboard shows these beside the params: the MLflow run and its result
            if run_id:
                trial.set_user_attr(RUN_ID_ATTR, run_id)
            if headline:
                trial.set_user_attr(METRICS_ATTR, headline)
        except Exception:
            pass
        try:
            if state == TrialState.COMPLETE:
                frozen = study.tell(trial, values, skip_if_finished=True)
            else:
                frozen = study.tell(trial, state=state, skip_if_finished=True)
        except Exception as e:
            # GridSampler.after_trial calls study.stop() once the grid is exhausted, which
            # raises outside study.optimize(); Optuna stored the trial's state first
            try:
                frozen = study._storage.get_trial(trial._trial_id)
            except Exception:
                frozen = None
            if frozen is None or not frozen.state.is_finished():
                log.warning("Trial %d: tell failed: %s", trial.number, e)
                return
        if frozen.state != state:
            log.warning(
                "Trial %d was already %s (e.g. failed as stale by another worker); result dropped",
                trial.number, frozen.state.name,
            )
            state, values = frozen.state, None
        if state == TrialState.COMPLETE:
            log.info("Trial %d finished: %s | %s", trial.number,
                     dict(zip([o.metric for o in self.objectives], values or [])), trial.user_attrs.get(VALUES_ATTR))
        if tracker is not None:
            try:
                tracker.record_trial(frozen, run_id, self.objectives, values, error)
            except Exception as e:
                log.warning("Trial %d: MLflow annotation failed: %s", trial.number, e)

    # -- what the study run says about itself ------------------------------------------------

    def _study_params(self) -> Dict[str, Any]:
        """Search space, sampler, objectives, n_trials and the fixed science config, as params."""
        params: Dict[str, Any] = {}
        sampler = dict(_kwargs(self.sampler_cfg or {}, ()))
        params["study.sampler"] = self.sampler_name
        for k, v in sampler.items():
            if k != "name":
                params[f"study.sampler.{k}"] = v
        params["study.objectives"] = ", ".join(f"{o.direction} {o.metric}" for o in self.objectives)
        params["study.n_trials"] = self.n_trials
        params["study.n_jobs"] = self.n_jobs
        pruner = str((self.pruner_cfg or {}).get("name", "none") or "none")
        if pruner not in ("none", "nop"):
            params["study.pruner"] = pruner
        params.update(self.space.describe())
        # the science every trial shares (swept keys excluded: their base value is not used)
        swept = {d.key for d in self.space.dims} | {k for p in self.space.pairs for k in (p.low_key, p.high_key)}
        try:
            from tardis_exp.tracking import science_params

            task = OmegaConf.to_container(self.config, resolve=False)
            task.pop("hydra", None)
            for k, v in science_params(task).items():
                if k not in swept and not (isinstance(v, str) and "${" in v):
                    params[k] = v
        except Exception as e:  # noqa: BLE001 -- another task app: the study's own params suffice
            log.debug("no science params for the study run: %s", e)
        try:  # credentials in a data path or a fixed override never reach MLflow
            from tardis_exp.tracking import safe_params, science_overrides

            fixed = " ".join(science_overrides(self.space.fixed))  # paths.* etc. are plumbing
            params.pop("search.fixed", None)
            if fixed:
                params["search.fixed"] = fixed

            return dict(safe_params(params))
        except ImportError:
            return {k: _mask_url(str(v)) for k, v in params.items()}

    def _study_text(self) -> str:
        described = self.space.describe()
        try:  # the fixed overrides that change the science (paths.* and the like are plumbing)
            from tardis_exp.tracking import science_overrides

            fixed = " ".join(science_overrides(self.space.fixed))
            described.pop("search.fixed", None)
            if fixed:
                described["search.fixed"] = fixed
        except ImportError:
            pass
        space = "; ".join(f"`{k[len('search.'):]}`: {v}" for k, v in described.items())
        return (f"Optuna study **{self.study_name}**: {self.n_trials} trials, sampler {self.sampler_name}, "
                + " and ".join(f"{o.direction} `{o.metric}`" for o in self.objectives)
                + f". Search space: {space}. Child runs are the trials (`trial N · ...`); "
                f"storage {self.storage_spec.describe()}.")

    # -- results ------------------------------------------------------------------------------

    def _row(self, t: FrozenTrial) -> Dict[str, Any]:
        row: Dict[str, Any] = {"number": t.number, "state": t.state.name}
        for i, o in enumerate(self.objectives):
            row[f"value.{o.metric}"] = t.values[i] if t.values is not None else None
        for k, v in (t.user_attrs.get(VALUES_ATTR) or t.params).items():
            row[f"param.{k}"] = v
        return row

    def _finish(self, study: optuna.Study, tracker: Optional[MlflowTracker], launched: int) -> Dict[str, Any]:
        trials = study.get_trials(deepcopy=False)
        states = [t.state for t in trials]
        metrics = [o.metric for o in self.objectives]
        multi = len(self.objectives) > 1
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = study.best_trials if complete else []

        def describe(t: FrozenTrial) -> Dict[str, Any]:
            return {
                "number": t.number,
                "params": dict(t.user_attrs.get(VALUES_ATTR) or t.params),
                "values": dict(zip(metrics, [float(v) for v in t.values])),
            }

        results: Dict[str, Any] = {
            "name": "tardis_optuna",
            "study_name": self.study_name,
            "storage": self.storage_spec.describe(),
            "sampler": self.sampler_name,
            "objectives": [{"metric": o.metric, "direction": o.direction} for o in self.objectives],
            "n_trials": len(trials),
            "n_complete": states.count(TrialState.COMPLETE),
            "n_fail": states.count(TrialState.FAIL),
            "n_pruned": states.count(TrialState.PRUNED),
            "n_running": states.count(TrialState.RUNNING),
            "n_launched_by_this_worker": launched,
        }
        if tracker is not None:
            results["mlflow_parent_run_id"] = tracker.parent_run_id
        if multi:
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
            log.warning("No COMPLETE trial in study '%s'", self.study_name)
        os.makedirs(self.sweep_dir, exist_ok=True)
        out = Path(self.sweep_dir) / "optimization_results.yaml"
        OmegaConf.save(OmegaConf.create(results), out)
        log.info("Wrote %s", out)
        if tracker is not None:
            try:
                rows = sorted(
                    (self._row(t) for t in trials),
                    key=lambda r: r["number"],
                )
                tracker.finish(study, self.objectives, [self._row(t) for t in best], rows,
                               bool(self.mlflow_cfg.get("log_plots", True)),
                               best if self.mlflow_cfg.get("best_trial_plots", True) else None,
                               best=best)
            except Exception as e:
                log.warning("MLflow: could not log study results: %s", e)
        return results
