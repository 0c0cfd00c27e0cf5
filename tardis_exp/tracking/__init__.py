"""MLflow tracking: one parent run per pipeline run, a nested child run per stage.

Everything goes through an explicit :class:`mlflow.MlflowClient` bound to the configured
tracking URI -- no global fluent state -- so several pipelines (sweep trials) can run in
one process and never log into each other's runs.

Store calls run on one background thread, in the order they were made: importing MLflow
and opening the store (about 2 s of CPU for an SQLite store) overlap with loading and
preprocessing the data, and logging never waits on the store. Runs keep the times at
which the pipeline started and ended them, not the times the thread got to them.

Failure policy
--------------
* A tracking server that does not answer ``/health`` raises
  :class:`~tardis_exp.errors.TrackingError` before the data is read (within about
  ``tracking.connect_timeout_s``); any other store that cannot be used (a corrupt
  database, a deleted experiment) raises it at :meth:`Tracker.wait_ready`, which the
  pipeline calls before the factorization: never after heavy compute.
* Once the parent run exists, a logging call that fails (the server went away, the
  disk is full) never stops the computation: it is logged as a warning, counted, written
  to ``tracking_errors.log`` in the run directory and, when the store still answers,
  tagged on the parent (``tardis_exp.tracking_failures``). After a few consecutive
  failures the tracker stops calling the store so a dead server costs seconds, not
  minutes of retries. The local results (``result.h5ad`` etc.) are written regardless.
* A stage that raises marks its run and the parent ``FAILED`` with ``traceback.txt``;
  everything logged before stays.

Modules
-------
* ``stores.py``: the ``tracking`` config check, store URIs and the checks before use
  (database connection, server ``/health``), the SQLite creation lock, MLflow's HTTP settings.
* ``naming.py``: what the MLflow UI shows: metric keys and their meanings, params, run
  names and descriptions, source tags, the experiment's description and saved view.
* ``runs.py``: :class:`StageRun`, the handle on one run that the pipeline logs to.
* ``tracker.py``: :class:`Tracker`, the store thread, the runs' lifecycle and the failure policy.

Every public name is importable from ``tardis_exp.tracking`` itself, as before the split;
none of these modules loads MLflow or the scientific stack at import (tests/test_imports.py).
"""

from __future__ import annotations

from ..errors import TrackingError, redact  # noqa: F401 -- redact: re-exported (cli, sweeper)
from .naming import (  # noqa: F401 -- the package's interface
    EXPERIMENT_DESCRIPTION,
    EXPERIMENT_KIND,
    RUN_NAME_MAX,
    SCIENCE_SECTIONS,
    VIEW_COLUMNS,
    VIEW_ID,
    MetricKey,
    default_run_name,
    flatten,
    init_experiment,
    metric_key,
    redact_tree,
    run_description,
    safe_params,
    science_overrides,
    science_params,
    short_override,
    source_tags,
)
from .runs import StageRun  # noqa: F401
from .stores import (  # noqa: F401
    check_config,
    check_database,
    check_reachable,
    sqlalchemy_uri,
    sqlite_init_lock,
)
from .tracker import MAX_CONSECUTIVE_FAILURES, Tracker  # noqa: F401


def __getattr__(name: str):
    if name == "METRIC_KEYS":  # every metric key and its one meaning (built on first use, naming.py)
        from .naming import _metric_keys

        return _metric_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
