"""The search space: which keys a trial samples and how.

``params`` and sweep overrides on the command line (Hydra's override grammar:
``int(interval(4,30))``, ``choice(a,b)``, ``range(1,10,2)``, ``tag(log, interval(...))``)
become :class:`Dim` (one Optuna distribution each); ``ordered_pairs`` become
:class:`OrderedPair` (two integer keys sampled with ``low <= high``); anything else is a
fixed override handed to every trial. :func:`build_search_space` validates it all before
the first trial, naming the key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    OverrideType,
    RangeSweep,
)
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import Trial

from ._common import KEY, SweeperConfigError


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
                try:  # parsed once already by build_search_space: never expected to fail
                    return OverridesParser.create().parse_override(f).value()
                except OverrideParseException:
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
                # the fixes that work, the likeliest first: a narrower width where one fits (a
                # lower `low` may be no valid value of low_key at all: K >= 2)
                pair = f"{KEY}.ordered_pairs[{i}]"
                fixes = []
                if top >= p.low:
                    gets = (f"{p.low_key} = {p.high_key} = {top}" if top == p.low else f"a range {p.low}..{top}")
                    fixes.append(f"set {pair}.min_width={top - p.low} (on the command line: "
                                 f"{KEY}.ordered_pairs.{i}.min_width={top - p.low}; a trial at "
                                 f"{p.bound_key}={value(p.bound_key)} then gets {gets})")
                fixes.append(f"raise the lower end of {p.bound_key} to {p.low + p.min_width}")
                fixes.append(f"lower {pair}.low to {top - p.min_width} if {p.low_key}={top - p.min_width} is valid")
                raise SweeperConfigError(
                    f"{pair}: {p.bound_key} can be {value(p.bound_key)}, which leaves "
                    f"{p.high_key} no room above {p.low_key} >= {p.low} (width >= {p.min_width}); "
                    + ", or ".join(fixes)
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


def flatten(d: Mapping[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """``{a: {b: 1}}`` -> ``("a.b", 1)``: the leaves of a nested mapping under dotted keys."""
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, (Mapping, DictConfig)):
            yield from flatten(v, key + ".")
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

    for key, value in flatten(params or {}):
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
        except OverrideParseException as e:
            raise SweeperConfigError(f"{cfg_key}: cannot parse {value!r}: {e}") from e
        add(o, cfg_key)

    # command-line overrides take precedence over `params`
    for arg in arguments:
        try:
            o = parser.parse_override(arg)
        except OverrideParseException as e:
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


