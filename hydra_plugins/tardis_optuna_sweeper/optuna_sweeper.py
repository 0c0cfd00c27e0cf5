"""Hydra Sweeper plugin class. Heavy imports (optuna, mlflow) live in the ``_*`` modules so that
Hydra's plugin scan (which imports every public module here) stays cheap."""

from typing import Any, Dict, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

# Importing the config module registers `hydra/sweeper=tardis_optuna` in the ConfigStore.
from .config import TardisOptunaSweeperConf  # noqa: F401


class TardisOptunaSweeper(Sweeper):
    def __init__(
        self,
        params: Optional[Dict[str, Any]] = None,
        ordered_pairs: Optional[List[Any]] = None,
        sampler: Optional[Dict[str, Any]] = None,
        pruner: Optional[Dict[str, Any]] = None,
        objectives: Optional[List[Any]] = None,
        study_name: Optional[str] = None,
        storage: Optional[str] = None,
        journal_path: Optional[str] = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        heartbeat_interval: Optional[int] = 60,
        grace_period: Optional[int] = None,
        mlflow: Optional[Dict[str, Any]] = None,
        max_failure_rate: float = 1.0,
    ) -> None:
        from ._sweep_loop import TardisOptunaSweeperImpl

        self.sweeper = TardisOptunaSweeperImpl(
            params=params,
            ordered_pairs=ordered_pairs,
            sampler=sampler,
            pruner=pruner,
            objectives=objectives,
            study_name=study_name,
            storage=storage,
            journal_path=journal_path,
            n_trials=n_trials,
            n_jobs=n_jobs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            mlflow=mlflow,
            max_failure_rate=max_failure_rate,
        )

    def setup(
        self,
        *,
        hydra_context: HydraContext,
        task_function: TaskFunction,
        config: DictConfig,
    ) -> None:
        # Launchers resolve their config when instantiated in setup, and it may go through
        # ${hydra:...} (submitit_folder: ${hydra.sweep.dir}/... -> paths.root_dir ->
        # ${hydra:runtime.cwd}), before Hydra sets HydraConfig for the first job
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)
        self.sweeper.setup(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: List[str]) -> Any:
        return self.sweeper.sweep(arguments)
