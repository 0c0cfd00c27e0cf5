"""What every module of the sweeper shares: the config key, its errors, the names of the
trial attributes it stores, and credential masking. No Optuna or MLflow import here."""

from __future__ import annotations

from hydra.errors import HydraException

# every config error names its key under this prefix
KEY = "hydra.sweeper"

# user/system attributes of a trial (optuna-dashboard shows the user attributes beside the params)
HEARTBEAT_ATTR = "tardis.heartbeat"  # journal storage: unix time of the worker's last beat
FAIL_REASON_ATTR = "fail_reason"
VALUES_ATTR = "values"  # {key: value} the trial was launched with (pairs included)
OVERRIDES_ATTR = "overrides"  # the trial's overrides, credentials masked (for reference only)
RUN_NAME_ATTR = "mlflow_run_name"
RUN_ID_ATTR = "mlflow_run_id"
METRICS_ATTR = "metrics"  # the trial's numeric results (headline metrics), as the task returned them
OUTPUT_DIR_ATTR = "output_dir"
JOB_DIR_ATTR = "job_dir"


class SweeperConfigError(HydraException, ValueError):
    """A sweeper setting is invalid; raised before any trial runs (the CLI prints one line)."""


class SweeperFailureRateError(HydraException, RuntimeError):
    """More trials failed than ``hydra.sweeper.max_failure_rate`` allows; raised after the
    study's results were written (the CLI prints one line)."""


def mask_url(text: str) -> str:
    """Credentials hidden (``scheme://user:***@host``, ``token=***``) as the pipeline hides them."""
    from tardis_exp.tracking import redact

    return redact(text)
