"""Exceptions a user can act on: each names the problem and the config key or file.

Also the small checks every ``check_params`` uses, so that a value of the wrong type
(``consensus.min_clusters=abc`` on the command line, ``None`` from a YAML ``null``)
is a :class:`ConfigError` naming the key, never a bare ``TypeError``/``ValueError``.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Iterable

# scheme://user:password@host -- the password runs to the last "@" before the path
_CRED = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^\s/]*)@")
# ?password=...&token=... in query strings, PASSWORD=... in key=value text
_QUERY_SECRET = re.compile(r"(?P<key>\b(?:password|passwd|pwd|secret|token|api_key|apikey|access_key)=)[^&\s;]+",
                           re.I)


def redact(value: Any) -> Any:
    """Hide credentials in URIs and query strings (``scheme://user:***@host``, ``token=***``)."""
    if isinstance(value, str):
        value = _CRED.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)
        return _QUERY_SECRET.sub(lambda m: f"{m['key']}***", value)
    return value


class TardisError(Exception):
    """Base of every error tardis_exp raises on purpose."""


class InputError(TardisError, ValueError):
    """The data cannot be used as given (bad values, shape, file)."""


class ConfigError(TardisError, ValueError):
    """A configuration value is out of range or inconsistent."""


class TrackingError(TardisError, RuntimeError):
    """The MLflow tracking store cannot be reached or used."""


class OutputError(TardisError, OSError):
    """A result cannot be written (full disk, no permission): names the folder."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM received: raised in the main thread so that runs end ``KILLED`` and
    partial files are removed, as for Ctrl-C (SIGINT's :class:`KeyboardInterrupt`)."""


def disk_error(e: OSError, folder, what: str = "write", key: str = "paths.output_dir") -> OutputError:
    """One line for an :class:`OSError` while writing under ``folder`` (ENOSPC, EDQUOT, EACCES...);
    ``key`` is the config key that chooses the folder."""
    import errno

    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}.get(
        getattr(e, "errno", None), e.strerror or type(e).__name__)
    return OutputError(f"cannot {what} in {folder}: {reason}; free space there or set {key} "
                       "to another folder")


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "a number"


def check_int(value: Any, key: str, *, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False) -> int | None:
    """Return ``value`` as an int or raise :class:`ConfigError` naming ``key``.

    Accepts Python/numpy integers and integral floats (``4.0``); rejects bools, strings,
    non-integral floats and values outside ``[minimum, maximum]``.
    """
    if value is None and allow_none:
        return None
    bounds = _range_text(minimum, maximum, False, False)
    what = f"an integer {bounds}" if (minimum is not None or maximum is not None) else "an integer"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{key} must be {what}{' or null' if allow_none else ''}, got {value!r}")
    if not math.isfinite(float(value)) or float(value) != int(value):
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    return v


def check_float(value: Any, key: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> float | None:
    """Return ``value`` as a finite float in the given range or raise :class:`ConfigError`."""
    if value is None and allow_none:
        return None
    what = _range_text(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"{key} must be a finite number {what}{' or null' if allow_none else ''}, got {value!r}")
    v = float(value)
    if low is not None and (v <= low if low_open else v < low):
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    if high is not None and (v >= high if high_open else v > high):
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    return v


def check_bool(value: Any, key: str) -> bool:
    """Return ``value`` if it is a bool; ``'nope'`` or ``1`` is a :class:`ConfigError`, not truthy."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def check_choice(value: Any, key: str, choices: Iterable[str]) -> str:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{key}={value!r} is unknown; choose one of {choices}")
    return value
