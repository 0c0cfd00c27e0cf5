"""What a stage writes and reports, declared once in the stage's module.

Every stage module holds a :class:`StageSpec` named ``SPEC``: the AnnData keys it writes
(:class:`Output`: slot, key, meaning, when) and the metrics it reports (:class:`Metric`:
key, meaning, how it is read from the AnnData, step axis, whether it is a headline value
of the parent run). The stage cache stores and restores exactly the declared outputs
(:func:`pack`, :func:`unpack`), the pipeline logs exactly the declared metrics
(:meth:`StageSpec.report`), and ``tardis_exp.tracking.METRIC_KEYS`` lists them. Adding an
output or a metric means editing the stage's own module.

:func:`pack` turns the declared outputs into flat arrays for ``np.savez`` (never pickle:
an object array is a :class:`TypeError`); :func:`unpack` writes them back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

SLOTS = ("X", "layers", "obs", "obsm", "var", "varm", "uns")
_SEP = "/"


@dataclass(frozen=True)
class Output:
    """One key a stage writes: ``adata.<slot>[key]``.

    ``key`` may hold ``{i}`` (one key per program: ``nmf_cluster_{i}``) or be ``*`` (any
    key: scanpy's HVG table, whose columns depend on the flavor). ``when`` says when it
    is written ('' = always).
    """

    slot: str
    key: str
    doc: str
    when: str = ""

    def __post_init__(self):
        if self.slot not in SLOTS:
            raise ValueError(f"unknown AnnData slot {self.slot!r}")

    @property
    def pattern(self) -> re.Pattern:
        if self.key == "*":
            return re.compile(r".+")
        return re.compile(re.escape(self.key).replace(r"\{i\}", r"\d+") + r"\Z")

    def matches(self, key: str) -> bool:
        return bool(self.pattern.match(str(key)))


@dataclass(frozen=True)
class Metric:
    """One metric a stage reports on its MLflow run.

    ``value(adata)`` reads it (``None``: not reported on this run, e.g. ARI without
    ground truth). A series (``step`` not ``'none'``) returns the values; ``steps(adata)``
    their step numbers (default 0, 1, ...). ``headline``: also on the parent run (the
    runs table's columns, the sweep's objectives).
    """

    key: str
    meaning: str
    value: Callable[[Any], Any]
    step: str = "none"  # none | K | replicate | program | sample
    headline: bool = False
    steps: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class StageSpec:
    """A stage's declared outputs and metrics."""

    name: str
    writes: tuple[Output, ...]
    metrics: tuple[Metric, ...] = ()
    new_object: bool = False  # the stage returns a new AnnData (preprocess), not written in place
    # fits(adata, outputs) -> None, or what makes stored outputs unfit for this AnnData
    fits: Callable[[Any, Mapping[str, Any]], str | None] | None = None

    def declares(self, slot: str, key: str) -> bool:
        return any(o.slot == slot and o.matches(key) for o in self.writes)

    def written(self, adata) -> list[tuple[str, str]]:
        """The declared ``(slot, key)`` pairs present in ``adata``."""
        out = []
        for slot, keys in _slot_keys(adata).items():
            out += [(slot, k) for k in keys if self.declares(slot, k)]
        return out

    def report(self, adata) -> tuple[dict[str, float], list[tuple[str, np.ndarray, list[int] | None]]]:
        """``(scalars, series)`` of the declared metrics that this run has."""
        scalars, series = {}, []
        for m in self.metrics:
            v = m.value(adata)
            if v is None:
                continue
            if m.step == "none":
                scalars[m.key] = float(v)
            else:
                steps = None if m.steps is None else [int(s) for s in m.steps(adata)]
                series.append((m.key, np.asarray(v, dtype=np.float64), steps))
        return scalars, series

    def headline(self, adata) -> dict[str, float]:
        keys = {m.key for m in self.metrics if m.headline and m.step == "none"}
        return {k: v for k, v in self.report(adata)[0].items() if k in keys}


def _slot_keys(adata) -> dict[str, list[str]]:
    return {"X": ["X"] if adata.X is not None else [], "layers": list(adata.layers.keys()),
            "obs": list(map(str, adata.obs.columns)), "obsm": list(adata.obsm.keys()),
            "var": list(map(str, adata.var.columns)), "varm": list(adata.varm.keys()),
            "uns": list(adata.uns.keys())}


def new_keys(before: Mapping[str, Iterable[str]], adata) -> list[tuple[str, str]]:
    """``(slot, key)`` pairs in ``adata`` that were not in ``before`` (a :func:`snapshot`)."""
    after = _slot_keys(adata)
    return [(s, k) for s, keys in after.items() for k in keys if k not in set(before.get(s, ()))]


def snapshot(adata) -> dict[str, list[str]]:
    """The keys of every slot of ``adata`` (to compare with :func:`new_keys` after a stage)."""
    return _slot_keys(adata)


# ---------------------------------------------------------------- npz (de)serialization


def _flatten(prefix: str, value: Any, out: dict[str, np.ndarray]) -> None:
    if isinstance(value, Mapping):
        if not value:
            out[prefix + _SEP + "__empty__"] = np.array(0)
        for k, v in value.items():
            if _SEP in str(k):
                raise TypeError(f"key {k!r} contains {_SEP!r}")
            _flatten(f"{prefix}{_SEP}{k}", v, out)
        return
    if isinstance(value, pd.DataFrame):
        out[f"{prefix}{_SEP}__frame__"] = np.asarray([str(c) for c in value.columns], dtype=str)
        if not value.index.equals(pd.RangeIndex(len(value))):  # a default index is rebuilt as one
            out[f"{prefix}{_SEP}__index__"] = np.asarray(value.index.astype(str), dtype=str)
        for i, c in enumerate(value.columns):
            _column(f"{prefix}{_SEP}{i}", value[c], out)
        return
    if sp.issparse(value):
        raise TypeError(f"{prefix}: sparse matrices are not cached")
    arr = np.asarray(value)
    if arr.dtype.kind == "O":
        raise TypeError(f"{prefix}: object arrays would need pickle; not cached")
    out[prefix] = arr


def _column(prefix: str, col: pd.Series, out: dict[str, np.ndarray]) -> None:
    if isinstance(col.dtype, pd.CategoricalDtype):
        out[f"{prefix}{_SEP}__codes__"] = col.cat.codes.to_numpy()
        out[f"{prefix}{_SEP}__categories__"] = np.asarray(col.cat.categories.astype(str), dtype=str)
    elif col.dtype.kind == "O" or str(col.dtype) == "string":
        out[prefix] = np.asarray(col.astype(str), dtype=str)
    else:
        _flatten(prefix, col.to_numpy(), out)


def _unflatten(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for name, arr in arrays.items():
        parts = name.split(_SEP)
        node = root
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if parts[-1] == "__empty__":
            continue
        # 0-d arrays were python scalars (ints, floats, strings, bools)
        node[parts[-1]] = arr.item() if arr.ndim == 0 and parts[-1] not in ("__codes__",) else arr
    return _rebuild(root)


def _series(node) -> Any:
    if isinstance(node, Mapping) and "__codes__" in node:
        cats = list(np.asarray(node["__categories__"], dtype=str))
        return pd.Categorical.from_codes(np.asarray(node["__codes__"]), categories=cats)
    return node


def _rebuild(node):
    if not isinstance(node, dict):
        return node
    if "__frame__" in node:
        cols = list(np.asarray(node["__frame__"], dtype=str))
        data = {c: _series(node[str(i)]) for i, c in enumerate(cols)}
        df = pd.DataFrame(data, columns=cols)
        if "__index__" in node:
            df.index = pd.Index(np.atleast_1d(np.asarray(node["__index__"], dtype=str)))
        return df
    if "__codes__" in node:
        return _series(node)
    return {k: _rebuild(v) for k, v in node.items()}


class Unfit(ValueError):
    """Stored outputs that do not fit the AnnData they are restored into."""


def pack(spec: StageSpec, adata) -> dict[str, np.ndarray]:
    """What ``spec``'s stage wrote into ``adata`` (its declared outputs), as flat npz-able arrays."""
    out: dict[str, np.ndarray] = {}
    for slot, key in spec.written(adata):
        name = f"{slot}{_SEP}{key}"
        if slot in ("obs", "var"):
            _column(name, getattr(adata, slot)[key], out)
        elif slot == "X":
            _flatten(name, adata.X, out)
        else:
            _flatten(name, getattr(adata, slot)[key], out)
    return out


def unpack(spec: StageSpec, adata, arrays: Mapping[str, np.ndarray]) -> None:
    """Write outputs stored by :func:`pack` into ``adata``; :class:`Unfit` when they do not fit it.

    Every declared output written unconditionally must be there; row counts must match
    the spots (``obs``, ``obsm``) and genes (``var``, ``varm``) of ``adata``.
    """
    tree = _unflatten(arrays)
    for o in spec.writes:
        if not o.when and "{i}" not in o.key and o.key != "*" and o.key not in tree.get(o.slot, {}):
            raise Unfit(f"{spec.name} entry lacks {o.slot}/{o.key}")
    for slot, items in tree.items():
        for key, value in items.items():
            if not spec.declares(slot, key):
                raise Unfit(f"{spec.name} entry holds {slot}/{key}, which the stage does not declare")
            n = adata.n_obs if slot in ("obs", "obsm") else adata.n_vars if slot in ("var", "varm") else None
            if n is not None and len(value) != n:
                raise Unfit(f"{spec.name} entry: {slot}/{key} has {len(value)} rows, the data has {n}")
    problem = spec.fits(adata, tree) if spec.fits is not None else None
    if problem:
        raise Unfit(f"{spec.name} entry: {problem}")
    for slot, items in tree.items():
        for key, value in items.items():
            if slot in ("obs", "var"):
                getattr(adata, slot)[key] = value
            elif slot == "X":
                adata.X = value
            else:
                getattr(adata, slot)[key] = value
