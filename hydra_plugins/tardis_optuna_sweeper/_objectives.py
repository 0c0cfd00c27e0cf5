"""Objectives: ``hydra.sweeper.objectives`` and the values a trial reports.

A task returns a dict of metrics; each objective names one (a flat dotted key or a nested
path) and a direction. A missing or non-finite value fails the trial with a message that
lists the metrics the task did return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from ._common import KEY, SweeperConfigError
from ._search_space import flatten

DIRECTIONS = ("minimize", "maximize")


@dataclass
class Objective:
    """One objective: a metric the task returns and whether to minimize or maximize it."""

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
    return sorted(k for k, _ in flatten(ret))


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




def numbers(ret: Any) -> Dict[str, float]:
    """The finite numbers of a task's flat return value (its headline metrics)."""
    out: Dict[str, float] = {}
    for k, v in (ret.items() if isinstance(ret, (Mapping, DictConfig)) else []):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[str(k)] = float(v)
    return out
