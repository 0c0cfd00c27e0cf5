"""``tardis-exp``: the Hydra application over ``conf/``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .errors import TardisError

log = logging.getLogger("tardis_exp")

# conf/ sits at the project root, beside the package (editable install or checkout)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> dict:
    """Run the pipeline; return its headline metrics (the sweeper's objectives)."""
    from .pipeline import run

    hc = HydraConfig.get()
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        return run(container, hc.runtime.output_dir, overrides=list(hc.overrides.task))
    except TardisError as e:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweeper records the trial as failed and goes on
        # a user mistake: one line that says what is wrong, no traceback
        print(f"tardis-exp: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
