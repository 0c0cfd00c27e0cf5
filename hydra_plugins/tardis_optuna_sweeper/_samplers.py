"""Samplers and pruners: ``hydra.sweeper.sampler`` / ``hydra.sweeper.pruner`` -> Optuna objects.

Modelled on Hydra's own ``hydra-optuna-sweeper`` (``TPESamplerConfig`` and friends): each
sampler and pruner is a config with a ``_target_`` (the Optuna class) and its keyword
arguments. A config names it either by a short ``name`` (``{name: tpe, seed: 42}``, the
presets' form) or by the ``_target_`` itself (``{_target_: optuna.samplers.GPSampler,
seed: 42}``, any :class:`optuna.samplers.BaseSampler` subclass), which wins over a
``name``; every other key is a keyword argument of the class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import optuna
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from ._common import KEY, SweeperConfigError
from ._search_space import SearchSpace


@dataclass
class SamplerConf:
    """An Optuna sampler as a ``_target_`` config; ``seed`` is offset per worker and restart."""

    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None


@dataclass
class TPESamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.TPESampler"


@dataclass
class RandomSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.RandomSampler"


@dataclass
class GridSamplerConf(SamplerConf):
    """The grid is the search space itself (one categorical of all valid ordered pairs)."""

    _target_: str = "optuna.samplers.GridSampler"


@dataclass
class CmaEsSamplerConf(SamplerConf):
    """Single-objective only; needs ``pip install cmaes``."""

    _target_: str = "optuna.samplers.CmaEsSampler"


@dataclass
class NSGAIISamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.NSGAIISampler"


@dataclass
class NSGAIIISamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.NSGAIIISampler"


@dataclass
class QMCSamplerConf(SamplerConf):
    _target_: str = "optuna.samplers.QMCSampler"


# short names of ``sampler.name``; ``motpe`` is TPE, which handles several objectives itself
SAMPLERS: Dict[str, type] = {
    "tpe": TPESamplerConf,
    "random": RandomSamplerConf,
    "grid": GridSamplerConf,
    "cmaes": CmaEsSamplerConf,
    "nsga2": NSGAIISamplerConf,
    "nsga3": NSGAIIISamplerConf,
    "motpe": TPESamplerConf,
    "qmc": QMCSamplerConf,
}

PRUNERS: Dict[str, str] = {  # short name -> _target_
    "none": "optuna.pruners.NopPruner",
    "nop": "optuna.pruners.NopPruner",
    "median": "optuna.pruners.MedianPruner",
    "percentile": "optuna.pruners.PercentilePruner",
    "hyperband": "optuna.pruners.HyperbandPruner",
    "successive_halving": "optuna.pruners.SuccessiveHalvingPruner",
    "threshold": "optuna.pruners.ThresholdPruner",
}


def as_dict(cfg: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """A (DictConfig) mapping as a plain dict, interpolations resolved."""
    if cfg is None:
        return {}
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(c, dict)
    return c


def _target(cfg: Mapping[str, Any], what: str, names: Mapping[str, str], default: str) -> Tuple[str, str, Dict[str, Any]]:
    """-> (short name, ``_target_``, keyword arguments) of a ``{name|_target_: ..., **kwargs}`` config."""
    kw = as_dict(cfg)
    name = kw.pop("name", None)
    target = kw.pop("_target_", None)
    if target is not None:  # wins over a name (the default config names tpe)
        short = {t: n for n, t in reversed(list(names.items()))}.get(str(target))
        return short or str(target).rsplit(".", 1)[-1], str(target), kw
    name = str(name or default).lower()
    if name not in names:
        raise SweeperConfigError(
            f"{KEY}.{what}.name: unknown {what} {name!r}; expected one of {', '.join(names)} "
            f"(or {KEY}.{what}._target_=<class>)"
        )
    return name, names[name], kw


def _sampler_targets() -> Dict[str, str]:
    return {n: c._target_ for n, c in SAMPLERS.items()}


def sampler_name(cfg: Optional[Mapping[str, Any]]) -> str:
    """The sampler's short name (``tpe``), or its class name when set by ``_target_``."""
    return _target(cfg or {}, "sampler", _sampler_targets(), "tpe")[0]


def is_grid(cfg: Optional[Mapping[str, Any]]) -> bool:
    return _target(cfg or {}, "sampler", _sampler_targets(), "tpe")[1] == GridSamplerConf._target_


def _import(target: str, what: str, base: type) -> type:
    try:
        cls = get_class(target)
    except Exception as e:  # noqa: BLE001 -- ImportError, AttributeError, ValueError: one line names the key
        raise SweeperConfigError(f"{KEY}.{what}._target_: cannot import {target!r}: {e}") from None
    if not issubclass(cls, base):
        raise SweeperConfigError(f"{KEY}.{what}._target_: {target!r} is not an {base.__module__}.{base.__name__}")
    return cls


def build_sampler(
    cfg: Optional[Mapping[str, Any]],
    space: SearchSpace,
    n_objectives: int,
    seed_offset: int = 0,
) -> optuna.samplers.BaseSampler:
    """The configured sampler; ``seed + seed_offset`` so that a resumed study or a second
    worker does not replay the first one's sequence."""
    name, target, kw = _target(cfg or {}, "sampler", _sampler_targets(), "tpe")
    seed = kw.pop("seed", None)
    cls = _import(target, "sampler", optuna.samplers.BaseSampler)
    if seed is not None:
        # not for grid: GridSampler shuffles the grid with its seed and a trial's grid_id
        # indexes that order, so every process of a study (resumed, second worker) needs the
        # same seed; an offset sends grid ids to other points (duplicates, points never run)
        seed = int(seed) + (0 if issubclass(cls, optuna.samplers.GridSampler) else seed_offset)
    args: Tuple[Any, ...] = ()
    if issubclass(cls, optuna.samplers.GridSampler):
        args = (space.grid(),)
    if issubclass(cls, optuna.samplers.CmaEsSampler):
        if n_objectives > 1:
            raise SweeperConfigError(f"{KEY}.sampler.name: cmaes does not support multi-objective studies")
        try:
            import cmaes  # noqa: F401
        except ImportError as e:
            raise SweeperConfigError(
                f"{KEY}.sampler.name=cmaes requires the 'cmaes' package (pip install cmaes)"
            ) from e
    try:
        return cls(*args, seed=seed, **kw)
    except TypeError as e:
        raise SweeperConfigError(f"{KEY}.sampler: invalid arguments for sampler {name!r}: {e}") from e


def build_pruner(cfg: Optional[Mapping[str, Any]]) -> optuna.pruners.BasePruner:
    name, target, kw = _target(cfg or {}, "pruner", PRUNERS, "none")
    cls = _import(target, "pruner", optuna.pruners.BasePruner)
    try:
        return cls(**kw)
    except TypeError as e:
        raise SweeperConfigError(f"{KEY}.pruner: invalid arguments for pruner {name!r}: {e}") from e


def pruner_name(cfg: Optional[Mapping[str, Any]]) -> str:
    return _target(cfg or {}, "pruner", PRUNERS, "none")[0]
