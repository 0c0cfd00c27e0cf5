"""tardis_exp: experiment-tracked gene-program discovery with NMF and consensus clustering.

The public functions are imported on first use, not with the package, so that
``import tardis_exp.metrics`` (or ``.errors``, ``.tracking``) does not load scanpy and
scikit-learn. Four stage functions share their module's name (``tardis_exp.score`` is the
function ``score``, its module is ``sys.modules["tardis_exp.score"]``), as they did when the
package imported them eagerly; :class:`_Package` keeps it that way whichever is imported first.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> module that defines it; one line per name
_EXPORTS = {
    "preprocess": "preprocess",
    "factorize": "factorize",
    "consensus": "consensus",
    "score": "score",
    "BatchedNMF": "nmf",
    "fit_batch": "nmf",
    "make_synthetic": "synthetic",
    "project": "project",
    # the seed's API (docs/seed_api.md): from tardis_exp import nmf_clustering, nmf_consensus
    "nmf_clustering": "api",
    "nmf_consensus": "api",
}

__all__ = [*_EXPORTS, "__version__"]


class _Package(types.ModuleType):
    """The package module: the four stage names stay bound to the functions.

    Importing a submodule binds it on its package (``setattr(tardis_exp, "score", module)``);
    for a name that is also a function of that module, the function is bound instead.
    """

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name \
                and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


def __getattr__(name):
    if name in _EXPORTS:
        obj = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = obj
        return obj
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


sys.modules[__name__].__class__ = _Package

# the config groups' schemas (tardis_exp/params.py, light: no scanpy) in Hydra's ConfigStore
# before any compose: conf/<group>/default.yaml lists them in its defaults
from .params import register_configs as _register_configs  # noqa: E402

_register_configs()
