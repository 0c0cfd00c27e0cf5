"""The names this package's ``_impl`` module had before it was split by concern, importable
from here as before; new code imports them from their modules (see ``_sweep_loop``'s docstring)."""

from ._common import KEY, SweeperConfigError, SweeperFailureRateError  # noqa: F401
from ._heartbeat import Heartbeat  # noqa: F401
from ._mlflow_study import MlflowTracker  # noqa: F401
from ._objectives import Objective, extract_values, lookup_metric, parse_objectives  # noqa: F401
from ._samplers import build_pruner, build_sampler, sampler_name  # noqa: F401
from ._search_space import Dim, OrderedPair, SearchSpace, build_search_space, format_value  # noqa: F401
from ._storage import StorageSpec, StudyLock, open_storage, parse_storage, with_driver  # noqa: F401
from ._sweep_loop import TardisOptunaSweeperImpl  # noqa: F401
