"""Exceptions a user can act on: each names the problem and the config key or file."""

from __future__ import annotations


class TardisError(Exception):
    """Base of every error tardis_exp raises on purpose."""


class InputError(TardisError, ValueError):
    """The data cannot be used as given (bad values, shape, file)."""


class ConfigError(TardisError, ValueError):
    """A configuration value is out of range or inconsistent."""


class TrackingError(TardisError, RuntimeError):
    """The MLflow tracking store cannot be reached or used."""
