"""The four stages in pipeline order, each with its declared outputs and metrics (``SPEC``)."""

from __future__ import annotations

import importlib

from .outputs import StageSpec

ORDER = ("preprocess", "factorize", "consensus", "score")
# the package re-exports each stage function under its module's name, so the modules are
# looked up by their full name
MODULES = {name: importlib.import_module(f"{__package__}.{name}") for name in ORDER}
# name -> the stage's declaration (tardis_exp.outputs.StageSpec), upstream first
SPECS: dict[str, StageSpec] = {name: m.SPEC for name, m in MODULES.items()}
