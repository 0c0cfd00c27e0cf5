"""Hydra sweeper plugin driving Optuna (>= 4) through its ask/tell API.

Select it with ``hydra/sweeper=tardis_optuna``. Hydra finds this package by scanning
the ``hydra_plugins`` namespace package; there must be no ``hydra_plugins/__init__.py``.
"""

__version__ = "0.1.0"
