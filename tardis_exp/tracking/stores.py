"""Where MLflow stores runs: the ``tracking`` config, store URIs and the checks before use.

What a pipeline run or a study checks about its store before anything heavy starts, each
within seconds: the ``tracking`` config section (:func:`check_config`), the database
driver of a ``postgresql://`` URI (:func:`sqlalchemy_uri`), that a database accepts a
connection (:func:`check_database`) and that a server answers ``/health``
(:func:`check_reachable`). Also what makes opening a store safe and bounded: the lock that
serializes creating a new SQLite store among processes (:func:`sqlite_init_lock`) and
MLflow's HTTP retry and timeout settings (:func:`_http_settings`). Standard library only
at import: MLflow and SQLAlchemy load when a check needs them.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Any, Mapping

from ..errors import TrackingError, redact


def check_config(cfg: Mapping[str, Any]) -> None:
    """Validate a ``tracking`` config before anything is created (no run, no folder, no store).

    ``enabled=nope`` is an error, not truthy; ``http_max_retries=abc`` names the key.
    """
    from ..params import check

    check("tracking", cfg, known_only=True)  # tardis_exp.params.TrackingParams


_DB_SCHEMES = ("postgresql", "postgres", "mysql", "mssql")


def sqlalchemy_uri(uri: str) -> str:
    """``postgresql://`` with the driver that is installed.

    SQLAlchemy's and MLflow's default driver for a bare ``postgresql://`` may not be the
    one installed (the README installs ``psycopg2-binary``); name it explicitly so that
    a bare URL works with either psycopg 3 or psycopg2.
    """
    import importlib.util

    for bare in ("postgresql://", "postgres://"):
        if uri.startswith(bare):
            rest = uri[len(bare):]
            if importlib.util.find_spec("psycopg2") is not None:
                return "postgresql+psycopg2://" + rest
            if importlib.util.find_spec("psycopg") is not None:
                return "postgresql+psycopg://" + rest
            raise TrackingError("tracking.uri=postgresql://... needs a PostgreSQL driver: "
                                "pip install psycopg2-binary (or psycopg)")
    return uri


def check_database(uri: str, timeout: float = 10.0) -> None:
    """Fail within ``timeout`` seconds when a database store does not accept a connection.

    MLflow retries a failing database connection for about two minutes before it says
    anything; one plain connection with a connect timeout says why in seconds
    (unreachable host, wrong password, missing database, missing driver).
    """
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in _DB_SCHEMES:
        return
    try:
        import sqlalchemy
    except ImportError:  # MLflow's SQL stores need it anyway; let MLflow say so
        return
    args: dict[str, Any] = {}
    if scheme in ("postgresql", "postgres", "mysql"):
        args["connect_timeout"] = max(1, int(math.ceil(timeout)))
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
    except ModuleNotFoundError as e:
        raise TrackingError(f"tracking.uri={redact(uri)}: the database driver is not installed ({e}); "
                            "for PostgreSQL: pip install psycopg2-binary") from None
    except Exception as e:  # noqa: BLE001 -- a malformed URL
        raise TrackingError(f"tracking.uri={redact(uri)} is not a usable database URL: "
                            f"{redact(_first_line(e))}") from None
    try:
        with engine.connect():
            pass
    except Exception as e:  # noqa: BLE001 -- refused, timed out, auth failed, no such database
        raise TrackingError(f"tracking.uri={redact(uri)}: cannot connect to the database: "
                            f"{redact(_first_line(e))}") from None
    finally:
        engine.dispose()


def _first_line(e: BaseException) -> str:
    """The first informative line of an exception (SQLAlchemy appends links and SQL)."""
    orig = getattr(e, "orig", None) or e
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    return f"{type(orig).__name__}: {lines[0] if lines else ''}"[:300]


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, before compute, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    # urllib does not take user:password@ in the URL (MLflow's requests does): send it as a header
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    req = urllib.request.Request(url)
    if parts.username:
        cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        req.add_header("Authorization", "Basic " + base64.b64encode(cred.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (configured URI)
            if r.status >= 400:
                raise TrackingError(f"tracking.uri={redact(uri)} answered HTTP {r.status} on /health")
    except urllib.error.HTTPError as e:
        raise TrackingError(f"tracking.uri={redact(uri)} answered HTTP {e.code} on /health; "
                            "is it an MLflow tracking server?") from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise TrackingError(
            f"tracking.uri={redact(uri)} is unreachable ({redact(str(e))}); start the server "
            "(mlflow server --host 127.0.0.1 --port 5000) or use the default embedded store"
        ) from None


@contextmanager
def sqlite_init_lock(uri: str):
    """Serialize opening an SQLite store among processes (a no-op for other stores).

    MLflow creates and migrates the schema of a new ``mlflow.db`` on first use; two
    processes doing it at once can leave the file broken for good ("table
    _alembic_tmp_tags already exists"). An ``fcntl`` lock on ``<db>.lock`` beside it
    makes the first opener create the schema while the others wait; the OS releases
    it if the holder dies.
    """
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        yield
        return
    import fcntl

    path = uri[len("sqlite:///"):].split("?", 1)[0] + ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # read-only folder: opening the store reports what is wrong
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


def _http_settings(timeout_s: float, max_retries: int) -> None:
    # MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) turn a dead server
    # into minutes of waiting per call. Explicit environment settings still win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(max_retries)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # an int for MLflow
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(timeout_s, 1))))
    # MLflow prints "View run at <tracking URI>" for every ended run -- password included.
    # The tracker logs one redacted link for the parent instead.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
