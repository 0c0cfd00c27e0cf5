"""Every stage parameter, declared once: default, type, allowed values, meaning.

One dataclass per config group (:class:`DataParams`, :class:`PreprocessParams`, :class:`FactorizeParams`,
:class:`ConsensusParams`, :class:`ScoreParams`, :class:`TrackingParams`,
:class:`CacheParams`). Each field is used three ways:

- as the stage function's default (``def factorize(adata, *, n_components: int =
  FactorizeParams.n_components, ...)``), so ``help(tardis_exp.factorize)`` shows the value;
- as Hydra's structured config schema, registered in the ConfigStore as
  ``<group>/schema`` (:func:`register_configs`); ``conf/<group>/default.yaml`` lists it
  in its ``defaults`` and holds no value of its own;
- for validation before any data is read (:func:`check`), with one-line messages that
  name the config key (``consensus.min_clusters must be an integer >= 2, got 1``).

Changing a default means editing one line here. ``tests/test_defaults.py`` proves the
function, the composed CLI config and the validation agree for every parameter.

The Hydra schema types every field as ``Any`` (it fixes the keys and the defaults, not
the types): OmegaConf's own conversion would turn ``tracking.log_plots=yes`` into
``True`` and ``consensus.min_clusters=abc`` into a multi-line merge error, where
:func:`check` gives a one-line message naming the key, the value and the allowed range.
This module imports nothing heavy (no scanpy, no MLflow): the CLI registers the schema
before Hydra composes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .solvers import SOLVERS as _SOLVERS
from .solvers import check_solver
from .errors import ConfigError, InputError, check_bool, check_choice, check_float, check_int, redact
from .krules import K_RULES, check_method as _check_k_rule_method
from .krules import describe as _describe_k_rules

# ---------------------------------------------------------------- field helpers

NORMALIZATIONS = ("log1p", "total", "none")
BATCH_CORRECTIONS = ("none", "scale", "scale_trimmed")  # tardis_exp.batch.METHODS
HVG_FLAVORS = ("seurat", "cell_ranger", "seurat_v3", "seurat_v3_paper", "pearson_residuals")
SOLVERS = tuple(_SOLVERS)  # the registry tardis_exp.solvers, in preference order
LOSSES = ("frobenius", "kullback-leibler")
STOP_RULES = ("change", "extrapolated")  # fit_batch(stop_rule=...); re-exported by tardis_exp.nmf
METHODS = ("components", "spots")
AGGREGATIONS = ("median", "mean")
RANK_BOUNDS = ("none", "parallel")
RANKINGS = ("specific", "loading")


def _param(default, doc: str, check: Callable[[Any, str], Any] | None, kind: str, **info):
    meta = {"doc": doc, "check": check, "kind": kind, **info}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def integer(default, doc, *, minimum=None, maximum=None, allow_none=False):
    """An integer parameter (``allow_none``: ``null`` is allowed too)."""
    return _param(default, doc, partial(check_int, minimum=minimum, maximum=maximum, allow_none=allow_none),
                  "int", minimum=minimum, maximum=maximum, allow_none=allow_none)


def number(default, doc, *, low=None, high=None, low_open=False, high_open=False, allow_none=False):
    """A finite real parameter in ``[low, high]`` (ends open as asked)."""
    return _param(default, doc, partial(check_float, low=low, high=high, low_open=low_open, high_open=high_open,
                                        allow_none=allow_none),
                  "float", low=low, high=high, allow_none=allow_none)


def choice(default, doc, choices: Sequence[str]):
    """One of ``choices``."""
    return _param(default, doc, partial(check_choice, choices=tuple(choices)), "choice", choices=tuple(choices))


def boolean(default, doc):
    """``true`` or ``false`` (``'yes'`` or ``1`` is an error, not truthy)."""
    return _param(default, doc, check_bool, "bool")


def _name(value, key, *, allow_none=False, what="a name"):
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be {what}{' or null' if allow_none else ''}, got {value!r}")
    return value


def text(default, doc, *, allow_none=False, what="a name"):
    """A non-empty string (a key of the AnnData, a name)."""
    return _param(default, doc, partial(_name, allow_none=allow_none, what=what), "str", allow_none=allow_none)


def other(default, doc, check: Callable[[Any, str], Any] | None = None):
    """A parameter whose check is its own function (``None``: any value)."""
    return _param(default, doc, check, "any")


# ---------------------------------------------------------------- the stages


def _patterns(value, key):
    if isinstance(value, str):  # one pattern given as a plain string, not a list
        value = [value]
    if value is not None and not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list of regular expressions, got {value!r}")
    for pat in value or ():
        try:
            re.compile(pat)
        except (re.error, TypeError) as e:
            raise ConfigError(f"{key}: invalid pattern {pat!r}: {e}") from None
    return value


def _existing_file(value, key):
    if value is None:
        return None
    if not isinstance(value, (str, Path)):
        raise ConfigError(f"{key} must be a file path or null, got {value!r}")
    if value and not Path(str(value)).expanduser().is_file():
        raise InputError(f"{key}: {value} does not exist or is not a file")
    return value


@dataclass
class PreprocessParams:
    """Parameters of :func:`tardis_exp.preprocess.preprocess` (config group ``preprocess``)."""

    layer: Any = text(None, "counts from X (null) or this layer", allow_none=True,
                      what="a layer name")
    use_raw: Any = boolean(False, "counts (and genes) from adata.raw")
    min_cells: Any = integer(3, "drop genes detected in fewer spots", minimum=0)
    min_counts: Any = number(1, "drop spots with fewer total counts (1 drops empty spots)", low=0)
    exclude_regex: Any = other((), "drop genes whose name matches any pattern, e.g. [^mt-, ^Gm, Rik]", _patterns)
    exclude_genes_file: Any = other(None, "drop the genes listed in this file (one per line)", _existing_file)
    normalize: Any = choice("log1p", "log1p (normalize_total + log1p) | total | none", NORMALIZATIONS)
    target_sum: Any = number(1e4, "counts per spot after normalize_total (null: the median)", low=0,
                             low_open=True, allow_none=True)
    n_top_genes: Any = integer(2000, "highly variable genes (clipped, with a warning, to the genes left; "
                               "null: every gene)", minimum=1, allow_none=True)
    hvg_flavor: Any = choice("seurat", "scanpy's highly_variable_genes flavor", HVG_FLAVORS)
    scale: Any = boolean(False, "unit variance per gene, no centering (cNMF)")
    make_unique: Any = boolean(False, "make duplicated gene and spot names unique instead of failing")
    min_spots_per_sample: Any = integer(10, "with data.sample_key: refuse a sample left with fewer spots after "
                                        "QC (its per-sample gene statistics and Moran's I would rest on too few "
                                        "spots)", minimum=1)
    batch_correction: Any = choice("none", "none | scale: divide each gene by its per-sample mean ratio after "
                                   "the normalization | scale_trimmed: the same on trimmed means (needs "
                                   "data.sample_key; tardis_exp/batch.py, docs/benchmark.md 'batch')",
                                   BATCH_CORRECTIONS)

    @staticmethod
    def cross_check(v: Mapping[str, Any]) -> None:
        flavor = v["hvg_flavor"]
        if flavor.startswith("seurat_v3") and v["n_top_genes"] is not None:
            import importlib.util

            if importlib.util.find_spec("skmisc") is None:  # scanpy imports it only mid-run
                raise ConfigError(f"preprocess.hvg_flavor={flavor} needs the scikit-misc package "
                                  "(pip install scikit-misc); or choose seurat or cell_ranger")


def _dask(value, key):
    from .chunked import check_dask_config  # numpy/scipy only; not at import time (this module stays light)

    check_dask_config(value, key)
    return value


def _sample_key(value, key):
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{key} must be an obs column name or null, got {value!r}")
    return value


@dataclass
class DataParams:
    """The keys every ``data`` preset has, whatever its source (config group ``data``; each
    source's own keys are checked by its entry in :data:`tardis_exp.sources.SOURCES`).

    The group has no Hydra schema: its presets (``conf/data/<source>.yaml``) hold their
    source's keys, and each restates these with their declared default
    (``tests/test_samples.py`` checks it).
    """

    sample_key: Any = other(None, "obs column naming each spot's sample (section, batch): null = one sample; "
                            "the HVG selection is per sample (scanpy's batch_key); data=samples sets it to "
                            "'sample' (docs/usage.md, 'Several samples as one study')", _sample_key)


@dataclass
class FactorizeParams:
    """Parameters of :func:`tardis_exp.factorize.factorize` (config group ``factorize``)."""

    n_components: Any = integer(10, "rank k of every factorization", minimum=1)
    n_replicates: Any = integer(10, "independent restarts, advanced together by the batched solver", minimum=1)
    random_state: Any = integer(42, "root seed (null: fresh entropy)", minimum=0, allow_none=True)
    max_iter: Any = integer(1000, "iterations per factorization at most (a replicate that hits it is "
                            "flagged, ConvergenceWarning)", minimum=1)
    tol: Any = number(1e-4, "stop when the loss improved by less than tol (relative) over check_every "
                      "iterations", low=0)
    solver: Any = choice("mu", " | ".join(f"{s.name}: {s.doc}" for s in _SOLVERS.values()), SOLVERS)
    beta_loss: Any = choice("frobenius", "frobenius | kullback-leibler (mu only)", LOSSES)
    check_every: Any = integer(10, "iterations between convergence checks", minimum=1)
    stop_rule: Any = choice("change", "change: stop when one check_every window improved the loss by < tol | "
                            "extrapolated: when the improvement continued as a geometric series (the ratio of the "
                            "last two windows) sums to < tol (docs/solver.md; not for solver=cd)", STOP_RULES)
    store_usages: Any = boolean(True, "keep every replicate's W in obsm['X_nmf_replicates']")
    max_memory_gb: Any = number(None, "refuse before any fit when the factorization's memory model exceeds "
                                "this (GB; null = no limit)", low=0, low_open=True, allow_none=True)
    dask: Any = other({"scheduler": None, "release_memory": True},
                      "with data.backend=dask: scheduler, the Dask scheduler of the chunked products (null = the "
                      "active one, local threads; threads | processes | synchronous; or tcp://host:port, "
                      "dask.distributed); release_memory, freed blocks go back to the system at once (glibc; "
                      "the run's process): a lower peak RSS (tardis_exp/heap.py)", _dask)

    @staticmethod
    def cross_check(v: Mapping[str, Any]) -> None:
        try:
            check_solver(v["solver"], v["beta_loss"], key="factorize.solver")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _max_clusters(value, key):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value in (float("inf"), float("-inf")) or int(value) != value:
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return int(value)


@dataclass
class ConsensusParams:
    """Parameters of :func:`tardis_exp.consensus.consensus` (config group ``consensus``)."""

    method: Any = choice("components", "components: cluster the NMF components of all replicates (the "
                         "seed's code) | spots: Brunet/Monti consensus over resampled spots", METHODS)
    min_clusters: Any = integer(4, "smallest K", minimum=2)
    max_clusters: Any = other(10, "largest K (method=components clips it to factorize.n_components, "
                              "with a warning)", _max_clusters)
    n_resamples: Any = integer(100, "resamples per K", minimum=1)
    resample_frac: Any = number(0.8, "fraction of the items (components or spots) in each resample", low=0,
                                high=1, low_open=True)
    random_state: Any = integer(42, "root seed of the resampling", minimum=0, allow_none=True)
    k_selection: Any = choice("auto", _describe_k_rules(), K_RULES)  # the registry: tardis_exp/krules.py
    k_tolerance: Any = number(1e-4, "floor of the measured tolerance between two K", low=0)
    k_z: Any = number(2.0, "two K differ when their statistics differ by more than k_z standard errors",
                      low=0)
    confident_margin: Any = number(2.27, "the run warns that the data do not separate the chosen K from the "
                                   "runner-up when its margin (in measured tolerances) is below this, and lists as "
                                   "candidates every K whose gap to it is below this; calibrated on the benchmark's "
                                   "design seeds (docs/benchmark.md, 'Calibrating the margin')", low=0)
    k_spread_splits: Any = integer(4, "random splits of the resamples into halves measuring those errors",
                                   minimum=0)
    outlier_threshold: Any = number(0.35, "components method: cNMF-style local-density outlier filter "
                                    "(2 disables)", low=0)
    outlier_adaptive: Any = boolean(False, "components method: raise outlier_threshold to the local density that "
                                    "best separates the components that recur (reciprocal nearest neighbours in at "
                                    "least half of the other replicates) from those that do not (false: the fixed "
                                    "threshold, as cNMF; a run warns when it drops most of the components that "
                                    "recur). Not the default: it over-reports K on the spatial family "
                                    "(docs/benchmark.md)")
    outlier_neighbors_frac: Any = number(0.3, "neighbours of the outlier filter, as a fraction of the "
                                         "replicates", low=0, low_open=True)
    min_cluster_replicates: Any = number(0.0, "components method: a K is admissible only if each cluster draws "
                                         "components from this fraction of replicates (0: no hard bound; the "
                                         "default recurrence rule weighs it)", low=0, high=1)
    background_ratio: Any = number(0.35, "components method: a meta-program whose usage varies across spots "
                                   "(coefficient of variation) less than this fraction of the programs' median "
                                   "is the shared background: kept in the refit (obsm['X_nmf_background']), not "
                                   "counted in K nor in nmf_program (0 disables)", low=0, high=1)
    rank_bound: Any = choice("none", "components method: none | parallel: K is at most the rank Horn's "
                             "parallel analysis gives the data (components explaining more than those of a "
                             "gene-permuted copy; a study on 18 sets, not validated as the default rule: "
                             "docs/validation.md, 'Parallel analysis')", RANK_BOUNDS)
    parallel_max_spots: Any = integer(5000, "rank_bound=parallel: spots (a seeded subsample) in the parallel "
                                      "analysis", minimum=10)
    spectra_agg: Any = choice("median", "median | mean of the members' loadings", AGGREGATIONS)
    refit_max_iter: Any = integer(200, "iterations of the usage refit on the consensus spectra", minimum=1)
    max_spots: Any = integer(2000, "spots method: spots in the n x n consensus matrix", minimum=2)
    spots_max_iter: Any = integer(500, "spots method: iterations per resample factorization", minimum=1)
    store_matrix_items: Any = integer(400, "consensus matrices kept in uns are restricted to this many "
                                      "items", minimum=0)

    @staticmethod
    def cross_check(v: Mapping[str, Any]) -> None:
        if v.get("rank_bound", "none") != "none" and v.get("method") == "spots":
            raise ConfigError(f"consensus.rank_bound={v['rank_bound']} needs consensus.method=components (it "
                              "bounds the number of meta-programs); use rank_bound=none with method=spots")
        _check_k_rule_method(v.get("k_selection"), v.get("method"))
        if v["max_clusters"] < v["min_clusters"]:
            raise ConfigError(f"consensus.max_clusters={v['max_clusters']} must be an integer >= "
                              f"consensus.min_clusters={v['min_clusters']}")


@dataclass
class ScoreParams:
    """Parameters of :func:`tardis_exp.score.score` (config group ``score``)."""

    n_cluster_genes: Any = integer(50, "top genes per program used for scoring", minimum=1)
    gene_ranking: Any = choice("specific", "specific (loading x share of the gene's loading) | loading",
                               RANKINGS)
    ctrl_size: Any = integer(50, "control genes per expression bin, as in sc.tl.score_genes", minimum=1)
    random_state: Any = integer(0, "seed of the control genes and the silhouette subsample", minimum=0,
                                allow_none=True)
    spatial_key: Any = text("spatial", "obsm key of spot coordinates (Moran's I when present)",
                            what="an obsm key")
    n_spatial_neighbors: Any = integer(6, "neighbours in the spatial kNN graph", minimum=1)
    truth_key: Any = text("true_domain", "obs column of true labels (ARI when present)", what="an obs key")
    silhouette_max_spots: Any = integer(5000, "silhouette on a seeded subsample of at most this many spots",
                                        minimum=2)
    sample_specific_share: Any = number(
        0.8, "with data.sample_key: a program is flagged sample-specific when one sample holds at least this "
        "share of its high-usage spots (fractions per sample, so section sizes do not count: score.active_share)", low=0.5, high=1.0, low_open=True)


def _store_uri(value, key):
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"{key} must be a store URI (sqlite:///..., http://..., postgresql://...) "
                          f"or null, got {redact(value)!r}")
    return value


def _tags(value, key):
    if value is not None and not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping (+tracking.tags.owner=me), got {redact(value)!r}")
    return value


@dataclass
class TrackingParams:
    """MLflow tracking (config group ``tracking``; :class:`tardis_exp.tracking.Tracker`).

    Default: an embedded SQLite store with artifacts under mlruns/ (project root). A server
    is one override away (``tracking.uri=http://127.0.0.1:5000``); PostgreSQL:
    ``tracking.uri=postgresql://user:password@host:5432/mlflow`` (the password is redacted).
    """

    enabled: Any = boolean(True, "track the run in MLflow")
    uri: Any = other("sqlite:///${paths.mlruns_dir}/mlflow.db", "tracking store URI", _store_uri)
    artifact_location: Any = other("${paths.mlruns_dir}/artifacts", "artifact root of a new experiment on a "
                                   "local store (a server uses its own)")
    experiment: Any = text("tardis-exp", "MLflow experiment", what="a non-empty name")
    run_name: Any = other(None, "name of the parent run; null: named after the run's overrides")
    run_label: Any = other(None, "set by the sweeper: the trial's name (run_name wins)")
    tags: Any = other({}, "extra tags on the parent run, e.g. +tracking.tags.owner=me", _tags)
    parent_run_id: Any = other(None, "set by the sweeper: nest this run under a study's run")
    log_plots: Any = boolean(True, "draw the figures (logged when tracking is enabled)")
    log_result: Any = boolean(True, "log result.h5ad as an artifact (written to the run folder either way)")
    register_model: Any = text(None, "register the run's programs model (artifact 'programs') in the Model "
                               "Registry under this name (null: not registered)", allow_none=True,
                               what="a model name")
    connect_timeout_s: Any = number(10, "fail fast when the store does not answer within this many seconds",
                                    low=0, low_open=True)
    http_timeout_s: Any = number(30, "per-request timeout of MLflow's HTTP client", low=0, low_open=True)
    http_max_retries: Any = integer(2, "retries of MLflow's HTTP client (MLFLOW_HTTP_REQUEST_* env vars win)",
                                    minimum=0)


@dataclass
class CacheParams:
    """The content-keyed stage cache (config group ``cache``; :mod:`tardis_exp.cache`).

    Off for single runs (a run never hits its own entries); the conf/sweep presets turn it
    on, since their trials share the preprocessing and repeat ranks.
    """

    enabled: Any = boolean(False, "reuse preprocess, factorize and consensus results")
    dir: Any = other("${paths.cache_dir}", "cache folder")
    max_size_gb: Any = number(5, "least recently used entries are removed to stay under this bound", low=0,
                              low_open=True)

    @staticmethod
    def cross_check(v: Mapping[str, Any]) -> None:
        d = v["dir"]
        if v["enabled"] and (d is None or not str(d).strip()):
            raise ConfigError("cache.dir must be set when cache.enabled=true")


PARAMS: dict[str, type] = {"data": DataParams, "preprocess": PreprocessParams, "factorize": FactorizeParams,
                           "consensus": ConsensusParams, "score": ScoreParams,
                           "tracking": TrackingParams, "cache": CacheParams}


# ---------------------------------------------------------------- use


def defaults(params: type) -> dict[str, Any]:
    """``{name: default}`` of a params dataclass."""
    out = {}
    for f in dataclasses.fields(params):
        out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


def names(params: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(params))


def check(group: str, values: Mapping[str, Any] | None = None, *, known_only: bool = False) -> dict[str, Any]:
    """Validate ``values`` of config group ``group``; return them completed with the defaults.

    Raises :class:`~tardis_exp.errors.ConfigError` naming ``<group>.<key>`` for an unknown
    key (unless ``known_only``: ignore keys that are not parameters) or a bad value.
    """
    params = PARAMS[group]
    values = dict(values or {})
    known = names(params)
    unknown = sorted(set(values) - set(known) - {"_target_"})
    if unknown and not known_only:
        raise ConfigError(f"unknown key(s) {', '.join(f'{group}.{k}' for k in unknown)}; "
                          f"{group} accepts {', '.join(sorted(known))}")
    full = {**defaults(params), **{k: v for k, v in values.items() if k in known}}
    for f in dataclasses.fields(params):
        test = f.metadata.get("check")
        if test is not None:
            out = test(full[f.name], f"{group}.{f.name}")
            if f.metadata.get("kind") in ("int",) and out is not None:
                full[f.name] = out
    cross = getattr(params, "cross_check", None)
    if cross is not None:
        cross(full)
    return full


def _allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    kind = m.get("kind")
    none = " or null" if m.get("allow_none") else ""
    if kind == "choice":
        return " \\| ".join(f"`{c}`" for c in m["choices"])
    if kind == "int":
        lo, hi = m.get("minimum"), m.get("maximum")
        rng = f" >= {lo}" if hi is None and lo is not None else f" in [{lo}, {hi}]" if hi is not None else ""
        return f"integer{rng}{none}"
    if kind == "float":
        lo, hi = m.get("low"), m.get("high")
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
        return f"number{rng}{none}"
    if kind == "bool":
        return "`true` \\| `false`"
    if kind == "str":
        return f"a name{none}"
    return ""


def describe(group: str) -> str:
    """The parameters of config group ``group`` as a Markdown table (key, default, allowed, meaning).

    The documentation's parameter reference is this table (``docs/conf.py`` writes it at
    build time), so it cannot drift from the code.
    """
    rows = [f"| key | default | allowed | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(PARAMS[group]):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        doc = str(f.metadata.get("doc", "")).replace("|", "\\|")
        rows.append(f"| `{group}.{f.name}` | `{shown}` | {_allowed(f)} | {doc} |")
    return "\n".join(rows)


def _schema(params: type) -> type:
    """The Hydra schema of ``params``: the same keys and defaults, every type ``Any`` (see the module docstring)."""
    return dataclasses.make_dataclass(
        f"{params.__name__}Schema",
        [(f.name, Any, field(default=f.default) if f.default is not dataclasses.MISSING
          else field(default_factory=f.default_factory)) for f in dataclasses.fields(params)])


SCHEMA_NAME = "schema"
# groups whose presets hold keys of their own (a data source's), so no schema fixes the keys
NO_SCHEMA = frozenset({"data"})


_REGISTERED: set[int] = set()


def register_configs() -> None:
    """Register every group's schema as ``<group>/schema`` in Hydra's ConfigStore (once per store).

    ``conf/<group>/default.yaml`` starts with ``defaults: [schema, _self_]``: the keys and
    defaults come from here, the YAML holds only what a preset changes.
    """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    if id(cs) in _REGISTERED:
        return
    _REGISTERED.add(id(cs))
    for group, params in PARAMS.items():
        if group in NO_SCHEMA:
            continue
        cs.store(group=group, name=SCHEMA_NAME, node=_schema(params), provider="tardis_exp")
