"""Where the study lives and how workers take turns.

``hydra.sweeper.storage`` / ``journal_path`` -> :class:`StorageSpec` -> an Optuna storage
(a journal file by default, or an SQLAlchemy URL: sqlite, postgresql, mysql), with a
storage that cannot be used reported in one line naming the key. :class:`StudyLock`
serialises "count trials + ask" among the workers of one study, so that concurrent workers
never exceed ``n_trials``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import optuna
from optuna.trial import FrozenTrial

from ._common import KEY, SweeperConfigError, mask_url

log = logging.getLogger(__name__)


@dataclass
class StorageSpec:
    kind: str  # "journal" | "rdb"
    location: str  # file path or URL

    def describe(self) -> str:
        return f"journal:{self.location}" if self.kind == "journal" else mask_url(self.location)


def parse_storage(storage: Optional[str], journal_path: Optional[str], base_dir: str) -> StorageSpec:
    def absolute(p: str) -> str:
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))

    if storage is None or str(storage).strip() == "":
        if not journal_path:
            raise SweeperConfigError(f"{KEY}.journal_path: must be set when {KEY}.storage is null")
        return StorageSpec("journal", absolute(str(journal_path)))
    s = str(storage).strip()
    if s.startswith("journal:"):
        p = s[len("journal:"):]
        if p.startswith("//"):
            p = p[2:]
        if not p:
            raise SweeperConfigError(f"{KEY}.storage: empty journal path in {s!r}")
        return StorageSpec("journal", absolute(p))
    if s.endswith((".log", ".jsonl")) and "://" not in s:
        return StorageSpec("journal", absolute(s))
    if "://" not in s:
        raise SweeperConfigError(
            f"{KEY}.storage: {s!r} is neither a journal file (*.log, *.jsonl, journal:<path>) "
            f"nor an SQLAlchemy URL (sqlite:///..., postgresql+psycopg2://...)"
        )
    if s.startswith("sqlite:///") and not s.startswith("sqlite:///:memory:"):
        path = s[len("sqlite:///"):]
        if not os.path.isabs(path):
            path = absolute(path)
            s = "sqlite:///" + path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return StorageSpec("rdb", s)


def make_storage(
    spec: StorageSpec,
    heartbeat_interval: Optional[int],
    grace_period: Optional[int],
    stale_callback: Callable[[optuna.Study, FrozenTrial], None],
) -> optuna.storages.BaseStorage:
    if spec.kind == "journal":
        os.makedirs(os.path.dirname(spec.location), exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        backend = JournalFileBackend(spec.location)
        return optuna.storages.JournalStorage(backend)
    engine_kwargs: Dict[str, Any] = {}
    if spec.location.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 120}}
    elif spec.location.startswith(("postgresql", "mysql")):
        engine_kwargs = {"pool_pre_ping": True}
    import sqlalchemy.exc

    # RDBStorage creates Optuna's tables on first use; two workers doing it at once on a
    # fresh PostgreSQL database collide (UniqueViolation on pg_type_typname_nsp_index).
    # Workers of this sweeper create them one at a time under a database-wide lock; a
    # collision with some other process (optuna-dashboard, a plain Optuna script) is
    # retried, by when the tables exist.
    attempts = 3
    with StudyLock(spec, SCHEMA_LOCK_NAME):
        for attempt in range(1, attempts + 1):
            try:
                return optuna.storages.RDBStorage(
                    spec.location,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=stale_callback if heartbeat_interval else None,
                )
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                    sqlalchemy.exc.OperationalError) as e:
                if attempt == attempts or "already exists" not in str(e) and "duplicate key" not in str(e):
                    raise
                log.info("Optuna's tables were being created by another process; retrying (%s)",
                         type(e).__name__)
                time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


# the database-wide lock under which Optuna's tables are created (not a study name)
SCHEMA_LOCK_NAME = "<schema>"


def with_driver(spec: StorageSpec) -> StorageSpec:
    """``postgresql://`` without a driver gets the installed one (SQLAlchemy 2.1's default is
    psycopg 3; the README installs psycopg2-binary), and a ``connect_timeout`` of 10 s
    unless the URL sets one (libpq waits without limit for a host that does not answer)."""
    import importlib.util

    loc = spec.location
    if spec.kind == "rdb" and loc.startswith(("postgresql://", "postgres://")):
        for driver in ("psycopg2", "psycopg"):
            if importlib.util.find_spec(driver) is not None:
                loc = f"postgresql+{driver}://" + loc.split("://", 1)[1]
                break
    if spec.kind == "rdb" and loc.startswith("postgresql") and "connect_timeout" not in loc:
        loc += ("&" if "?" in loc else "?") + "connect_timeout=10"
    return StorageSpec(spec.kind, loc)


def open_storage(spec: StorageSpec, *args: Any) -> optuna.storages.BaseStorage:
    """:func:`make_storage`, with a storage that cannot be used as one line naming the key
    (credentials masked), not a page of SQLAlchemy traceback."""
    try:
        return make_storage(spec, *args)
    except SweeperConfigError:
        raise
    except Exception as e:  # noqa: BLE001 -- refused, auth, missing driver, unwritable journal
        orig = getattr(e, "orig", None) or e.__cause__ or e
        lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
        why = f"{type(orig).__name__}: {lines[0] if lines else ''}"[:300]
        if isinstance(orig, ModuleNotFoundError) or "DB access module" in str(e):
            why += " (install the database driver, e.g. pip install psycopg2-binary)"
        raise SweeperConfigError(f"{KEY}.storage={spec.describe()} cannot be used: "
                                 f"{mask_url(why)}") from None


class StudyLock:
    """Inter-process lock serialising 'count trials + ask' among workers of one study.

    journal / sqlite: fcntl lock on a side file (released by the OS if the holder dies);
    postgresql: session advisory lock; mysql: GET_LOCK; other databases: no lock.
    """

    def __init__(self, spec: StorageSpec, study_name: str) -> None:
        self.spec = spec
        self.key = f"tardis_optuna:{study_name}"
        self._fd: Optional[int] = None
        self._conn: Any = None
        self._engine: Any = None
        self.path: Optional[str] = None
        self.dialect = "none"
        if spec.kind == "journal":
            self.dialect = "file"
            self.path = spec.location + ".ask.lock"
        elif spec.location.startswith("sqlite:///") and ":memory:" not in spec.location:
            self.dialect = "file"
            self.path = spec.location[len("sqlite:///"):] + ".ask.lock"
        elif spec.location.startswith("postgresql"):
            self.dialect = "postgresql"
        elif spec.location.startswith("mysql"):
            self.dialect = "mysql"
        else:
            log.warning(
                "No inter-process lock available for %s; concurrent workers may overshoot n_trials",
                spec.describe(),
            )

    def _int_key(self) -> int:
        return int.from_bytes(hashlib.sha256(self.key.encode()).digest()[:8], "big", signed=True)

    def __enter__(self) -> "StudyLock":
        if self.dialect == "file":
            assert self.path is not None
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        elif self.dialect in ("postgresql", "mysql"):
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            if self._engine is None:
                self._engine = sqlalchemy.create_engine(self.spec.location, poolclass=NullPool)
            self._conn = self._engine.connect()
            if self.dialect == "postgresql":
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._int_key()})
            else:
                self._conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, -1)"), {"k": self.key[:64]})
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
        if self._conn is not None:
            import sqlalchemy

            try:
                if self.dialect == "postgresql":
                    self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._int_key()})
                else:
                    self._conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": self.key[:64]})
            finally:
                self._conn.close()
                self._conn = None


