import os

import pytest

os.environ.setdefault("TARDIS_EXP_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def synthetic_small():
    from tardis_exp.synthetic import make_synthetic

    return make_synthetic(n_spots=900, n_genes=800, n_programs=4, n_markers=40, seed=1)
