"""``tardis-exp``: the Hydra application over ``conf/``.

A user mistake -- a bad value (:class:`~tardis_exp.errors.TardisError`), an unknown key
or a malformed override (Hydra's and OmegaConf's own errors) -- ends the command with
one line on stderr, ``tardis-exp: error: ...``, and exit status 2, no traceback. In
multirun mode a trial's error propagates to the sweeper, which records the trial as
failed and goes on. Set ``HYDRA_FULL_ERROR=1`` for the full traceback of anything.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import TardisError

log = logging.getLogger("tardis_exp")

# conf/ ships inside the package as tardis_exp.conf (pyproject maps the root conf/ there)
CONF_DIR = "pkg://tardis_exp.conf"
EXIT_USAGE = 2  # argparse's status for a usage error


def _run_suffix() -> str:
    """A short random suffix for run folders (``${tardis_uid:}`` in ``conf/config.yaml``).

    Two runs started in the same second share ``${now:...}``; the suffix keeps their
    folders apart (16.7 million values). Cached per composed config like ``now``, so
    every interpolation of one run -- and Hydra's copies for its jobs -- see one value.
    """
    return secrets.token_hex(3)


OmegaConf.register_new_resolver("tardis_uid", _run_suffix, use_cache=True, replace=True)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if isinstance(e, OverrideParseException):
        msg = f"cannot parse the override {e.override!r}: {msg}"
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException):
        # OmegaConf's first line says what is wrong ("Key 'foo' is not in struct")
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        if first and first not in msg:
            msg = f"{msg} ({first})"
    return msg or type(e).__name__


def _fail(e: BaseException) -> None:
    from .tracking import redact

    print(f"tardis-exp: error: {redact(_one_line(e))}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _discard_if_empty(run_dir: str) -> None:
    """Remove a run folder that holds only what Hydra wrote before the task failed
    (``.hydra/``, the job log): a config error leaves no empty run behind."""
    import shutil

    p = Path(run_dir)
    try:
        names = {q.name for q in p.iterdir()}
    except OSError:
        return
    if all(n == ".hydra" or n.endswith(".log") for n in names):
        shutil.rmtree(p, ignore_errors=True)


def _hydra_file_error(e: BaseException) -> str | None:
    """One line for an :class:`OSError` Hydra met writing its own files before the task
    started (the run folder, ``.hydra/``, the job log); None for anything else.

    Hydra creates them in ``run_job`` before calling :func:`app`, so our own checks
    (:func:`~tardis_exp.errors.disk_error`) never see them. The job log's error arrives
    as logging's ValueError caused by the OSError.
    """
    import errno
    import traceback

    os_error = next((x for x in (e, e.__cause__, e.__context__) if isinstance(x, OSError)), None)
    if os_error is None or os_error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                                                  errno.EDQUOT):
        return None
    frames = traceback.extract_tb(e.__traceback__) + traceback.extract_tb(os_error.__traceback__)
    hydra_utils = os.path.join("hydra", "core", "utils.py")
    if not any(f.name == "run_job" and f.filename.endswith(hydra_utils) for f in frames):
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    if any(os.path.abspath(f.filename).startswith(here + os.sep) and f.name == "app" for f in frames):
        return None  # raised by the task itself: not Hydra's own files
    names = {f.name for f in frames if f.filename.endswith(hydra_utils)}
    what = ("the job log" if "configure_log" in names else
            "Hydra's config copy (.hydra/)" if "_save_config" in names else "the run folder")
    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system"}.get(os_error.errno, "permission denied")
    verb = "create" if what == "the run folder" else "write"
    return (f"cannot {verb} {what} at {os_error.filename}: {reason}; run tardis-exp from a writable "
            "folder, or set TARDIS_EXP_ROOT or paths.output_dir (or hydra.run.dir) to a writable folder")


def _crash(e: BaseException) -> None:
    """An unexpected exception: its traceback, credentials redacted (Python's own
    report would print the raw message), exit status 1."""
    import traceback

    from .tracking import redact

    sys.stderr.write(redact("".join(traceback.format_exception(type(e), e, e.__traceback__))))
    sys.exit(1)


def _interrupted(e: BaseException) -> None:
    from .errors import Interrupted

    sigterm = isinstance(e, Interrupted)
    print(f"tardis-exp: {'terminated (SIGTERM)' if sigterm else 'interrupted (SIGINT)'}; "
          "the MLflow run is marked KILLED, no partial result file was kept", file=sys.stderr)
    sys.exit(143 if sigterm else 130)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> dict:
    """Run the pipeline; return its headline metrics (the sweeper's objectives)."""
    from .config import validate

    hc = HydraConfig.get()
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        # the config and the input paths checked before the scientific stack loads (several
        # seconds): a bad key or a missing file is answered at once
        validate(container)
        from .pipeline import run

        metrics = run(container, hc.runtime.output_dir, overrides=list(hc.overrides.task))
    except (TardisError, OmegaConfBaseException) as e:
        _discard_if_empty(hc.runtime.output_dir)
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweeper records the trial as failed and goes on
        _fail(e)  # a user mistake: one line that says what is wrong, no traceback
    if hc.mode == RunMode.MULTIRUN:
        log.info("run folder %s", hc.runtime.output_dir)  # a sweep prints its own folder at the end
    else:  # last, after the MLflow line: where the result files are
        print(f"tardis-exp: run folder {hc.runtime.output_dir}", flush=True)
    return metrics


HELP = """tardis-exp: gene-program discovery (NMF + consensus clustering), tracked in MLflow.

Usage: tardis-exp [group=option ...] [key=value ...]      one run
       tardis-exp -m sweep=k_range [key=value ...]         an Optuna sweep
       tardis-exp --cfg job [overrides]                    the composed config, resolved keys as typed

== Configuration groups ==
Compose your configuration from those groups (group=option)

{groups}
== Config ==
Override anything in the config (foo.bar=value); every key is in docs/usage.md

{config}
Use --hydra-help to view Hydra's own options.
"""


def _help(overrides: list[str]) -> str:
    """``--help``, composed here: Hydra's own help lists every group by composing the config
    once per group and option (about 100 compositions, 1-2 s); the groups are the folders
    of ``conf/`` and their YAML files."""
    from importlib.resources import files

    from hydra import compose, initialize_config_module

    conf = files("tardis_exp.conf")
    groups = "".join(
        f"{d.name}: {', '.join(sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith('.yaml')))}\n"
        for d in sorted(conf.iterdir(), key=lambda d: d.name) if d.is_dir() and not d.name.startswith("_"))
    with initialize_config_module(config_module="tardis_exp.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return HELP.format(groups=groups, config=OmegaConf.to_yaml(cfg))


def main() -> None:
    """Console entry point: Hydra's app with one-line errors for user mistakes."""
    args = sys.argv[1:]
    if ("--help" in args or "-h" in args) and "--hydra-help" not in args:
        try:
            print(_help([a for a in args if a not in ("--help", "-h") and not a.startswith("-")]))
        except (HydraException, OmegaConfBaseException) as e:
            _fail(e)
        except BrokenPipeError:  # tardis-exp --help | head
            sys.stderr.close()
        return
    if os.environ.get("HYDRA_FULL_ERROR", "") in ("1", "true", "True"):
        try:
            app()  # the user asked for full tracebacks: Hydra's own reporting
        except KeyboardInterrupt as e:
            _interrupted(e)
        except Exception as e:  # noqa: BLE001 -- the full traceback, credentials hidden
            _crash(e)
        return
    # With HYDRA_FULL_ERROR set Hydra re-raises instead of printing a trimmed traceback
    # and exiting 1, so its config errors reach us and become one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        app()
    except (HydraException, OmegaConfBaseException, TardisError) as e:
        _fail(e)
    except KeyboardInterrupt as e:
        _interrupted(e)
    except Exception as e:  # noqa: BLE001 -- a crash: the traceback, credentials hidden
        line = _hydra_file_error(e)
        if line is not None:  # an unwritable folder is the user's to fix: one line
            from .tracking import redact

            print(f"tardis-exp: error: {redact(line)}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        _crash(e)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    main()
