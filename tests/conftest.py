import os

import pytest

os.environ.setdefault("TARDIS_EXP_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def synthetic_small():
    from tardis_exp.synthetic import make_synthetic

    return make_synthetic(n_spots=900, n_genes=800, n_programs=4, n_markers=40, seed=1)


REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def compose_config(root, overrides=()):
    """The real conf/ composed with Hydra's compose API, as plain containers."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    root = __import__("pathlib").Path(root)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.root_dir={root}", f"paths.run_dir={root}/run",
                                                       *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture
def compose(tmp_path):
    return lambda *overrides: compose_config(tmp_path, overrides)
