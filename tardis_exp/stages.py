"""The four stages in pipeline order, each with its declared outputs and metrics (``SPEC``).

:data:`ORDER` is the one stage list: the pipeline, the config checks, the stage cache and the
tracking iterate it. It is light to import; :data:`SPECS` and :data:`MODULES` import the
stage modules (scanpy, scikit-learn, numba) when first read.
"""

from __future__ import annotations

import functools
import importlib

ORDER = ("preprocess", "factorize", "consensus", "score")
# the stages whose results the stage cache keeps (score is cheaper to recompute than to store)
CACHED = ORDER[:3]


@functools.cache
def _modules() -> dict:
    # the package re-exports each stage function under its module's name, so the modules are
    # looked up by their full name
    return {name: importlib.import_module(f"{__package__}.{name}") for name in ORDER}


def __getattr__(name: str):
    if name == "MODULES":  # name -> the stage's module
        return _modules()
    if name == "SPECS":  # name -> the stage's declaration (tardis_exp.outputs.StageSpec), upstream first
        return {n: m.SPEC for n, m in _modules().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
