"""Credentials never leave the process through Hydra: its files, its messages, log lines.

The pipeline redacts what it writes itself (``config.yaml``, ``overrides.txt``, MLflow
params and tags) with :func:`tardis_exp.tracking.redact_tree`. Hydra writes the config
too, before the task runs: ``.hydra/config.yaml``, ``.hydra/hydra.yaml`` (with
``hydra.sweeper.storage`` and every override) and ``.hydra/overrides.yaml`` of each run
and sweep trial, and the line ``Error executing job with overrides: [...]`` on a crash.
:class:`RedactSecrets`, a Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``),
applies the same redaction there:

* ``on_job_start`` (Hydra has just written ``.hydra/``): the three files are rewritten
  redacted, atomically;
* ``on_job_end``: the job's overrides, which Hydra prints on a failure, are redacted;
* every hook: :func:`install_log_redaction` makes every log record redacted as it is
  created, whichever handler (console, the run's ``tardis-exp.log``) writes it.

The window between Hydra's write and the rewrite is the time to serialize three small
files; a process killed in it leaves Hydra's original (a risk the docs name).
"""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path
from typing import Any

import yaml

from .tracking import redact, redact_tree

try:  # Hydra >= 1.1
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover -- hydra-core is a dependency
    Callback = object  # type: ignore[assignment,misc]

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")

_installed = False


def install_log_redaction() -> None:
    """Redact every log record of this process when it is created (idempotent).

    A record factory, not a handler filter: Hydra reconfigures logging (and replaces the
    handlers) for every job, a factory stays. The message, its arguments and the text of
    an attached exception are redacted.
    """
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 -- a bad format string: let the handler report it
            return record
        clean = redact(msg)
        if clean != msg or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


def redact_yaml_file(path: Path) -> bool:
    """Rewrite a YAML file with :func:`redact_tree` applied; return whether it changed."""
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except (OSError, yaml.YAMLError):
        return False
    clean = redact_tree(data)
    if clean == data:
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(clean, sort_keys=False, default_flow_style=False, allow_unicode=True))
        os.replace(tmp, path)
    except OSError:
        # cannot rewrite it: do not leave the credential in a file we could remove
        tmp.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        logging.getLogger(__name__).warning("could not rewrite %s without credentials; removed it", path)
    return True


def redact_hydra_output(config: Any) -> None:
    """Redact ``.hydra/*.yaml`` of the job whose config is ``config``."""
    try:
        out = config.hydra.runtime.output_dir
        sub = config.hydra.output_subdir
    except Exception:  # noqa: BLE001 -- not a Hydra job config
        return
    if not out or sub is None:
        return
    folder = Path(str(out)) / str(sub)
    for name in HYDRA_FILES:
        p = folder / name
        if p.is_file():
            redact_yaml_file(p)


class RedactSecrets(Callback):
    """Hydra callback: redact Hydra's own files, failure messages and log lines."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        install_log_redaction()

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        install_log_redaction()

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        install_log_redaction()
        redact_hydra_output(config)

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        # Hydra prints "Error executing job with overrides: <these>" when the job failed
        if getattr(job_return, "overrides", None):
            job_return.overrides = [redact(str(o)) for o in job_return.overrides]
