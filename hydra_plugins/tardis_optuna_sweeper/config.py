"""Structured config of the ``tardis_optuna`` sweeper, registered in Hydra's ConfigStore."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class TardisOptunaSweeperConf:
    _target_: str = (
        "hydra_plugins.tardis_optuna_sweeper.optuna_sweeper.TardisOptunaSweeper"
    )

    # key -> Hydra override grammar, e.g. "int(interval(4,30))", "choice(a,b)",
    # "tag(log, interval(1e-3,1))", "range(1,10,2)" or a plain (fixed) value.
    params: Dict[str, Any] = field(default_factory=dict)

    # [{low_key: a.min, high_key: a.max, low: 2, high: 12}]: sampled so that low <= high.
    # Optional per pair: min_width: 1 (sample the low end and the width, high - low >= 1:
    # never a single-value range), bound_key: b.n (high <= b.n in the trial: a sampled
    # param, a fixed override or the task config), bound_when: {a.method: x} (the bound
    # applies only then), label: K (trial run names "trial 3 · n=8 · K 4..10").
    ordered_pairs: List[Any] = field(default_factory=list)

    # {name: tpe|random|grid|cmaes|nsga2|nsga3|motpe|qmc, seed: 42, **sampler kwargs}, or
    # {_target_: optuna.samplers.<Class>, seed: 42, **kwargs} (_samplers.py)
    sampler: Dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": 42})

    # {name: none|median|percentile|hyperband|successive_halving|threshold, **kwargs}, or
    # {_target_: optuna.pruners.<Class>, **kwargs}
    pruner: Dict[str, Any] = field(default_factory=lambda: {"name": "none"})

    # [{metric: consensus.cophenetic, direction: maximize}, ...]
    objectives: List[Any] = field(default_factory=list)

    # Defaults to hydra.job.name when null.
    study_name: Optional[str] = None

    # null -> Optuna JournalStorage on `journal_path`; "*.log"/"*.jsonl"/"journal:<path>"
    # -> journal file; anything else -> SQLAlchemy URL for RDBStorage.
    storage: Optional[str] = None
    # null -> ${paths.mlruns_dir}/optuna/journal.log of the task config (resolved at sweep
    # time, when ${hydra:...} interpolations work), else <cwd>/mlruns/optuna/journal.log.
    # Relative paths are relative to the directory the command was started from.
    journal_path: Optional[str] = None

    # Total number of trials of the study (across restarts and workers).
    n_trials: int = 20
    # Trials asked per batch and handed to the Hydra launcher together.
    n_jobs: int = 1

    # Fraction of this worker's trials that may fail (checked after each batch); above it the
    # sweep writes its results and stops with an error. 1.0: never stop (failing trials are
    # recorded and the sweep goes on); 0.0: stop at the first failure (Hydra's Optuna sweeper
    # has the same key, checked per batch).
    max_failure_rate: float = 1.0

    # Trials of a dead worker (no heartbeat for `grace_period` seconds) are marked FAIL.
    # null disables stale-trial detection.
    heartbeat_interval: Optional[int] = 60
    grace_period: Optional[int] = None  # default: 2 * heartbeat_interval

    # {enabled: true, log_plots: true, best_trial_plots: true}; active only when the task
    # config has tracking.uri and tracking.experiment. log_plots: the study's own plots;
    # best_trial_plots: at the end, draw the figures of up to 3 best trials that skipped
    # them (from their result.h5ad) and log them to those trials' runs.
    mlflow: Dict[str, Any] = field(
        default_factory=lambda: {"enabled": True, "log_plots": True, "best_trial_plots": True}
    )


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="tardis_optuna",
    node=TardisOptunaSweeperConf,
    provider="tardis_optuna_sweeper",
)
