"""tardis_exp: experiment-tracked gene-program discovery with NMF and consensus clustering."""

__version__ = "0.1.0"

from .params import register_configs as _register_configs  # noqa: E402

# the config groups' schemas (tardis_exp/params.py) in Hydra's ConfigStore, before any
# compose: conf/<group>/default.yaml lists them in its defaults
_register_configs()

from .consensus import consensus  # noqa: E402
from .factorize import factorize  # noqa: E402
from .nmf import BatchedNMF, fit_batch  # noqa: E402
from .preprocess import preprocess  # noqa: E402
from .score import score  # noqa: E402
from .synthetic import make_synthetic  # noqa: E402

__all__ = ["preprocess", "factorize", "consensus", "score", "BatchedNMF", "fit_batch", "make_synthetic",
           "__version__"]
