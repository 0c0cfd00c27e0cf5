import os

import pytest

os.environ.setdefault("TARDIS_EXP_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

# Under pytest-xdist (scripts/test.sh: -n 2) the workers share the machine's cores: one BLAS/OpenMP
# thread per worker, so two workers do not each start a thread per core and oversubscribe them.
# Set before NumPy loads (this file is imported before the test modules) and inherited by every
# subprocess a test starts. Tests about thread counts set them explicitly (threadpoolctl, numba).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                 "NUMEXPR_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)


# The files whose tests take longest (tens of seconds each: the README's commands, sweeps,
# Dask clusters, CLI runs; measured with tests/_cputime.py, docs/testing.md) start first, so
# that under xdist the short tests fill the end of the run instead of one long test alone.
RUN_FIRST = ("test_readme.py", "test_sweeper.py", "test_large_data.py", "test_pipeline.py", "test_cli.py",
             "test_faults.py", "test_concurrent_runs.py", "test_secrets.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Order and group the tests for pytest-xdist (scripts/test.sh: ``-n 2 --dist loadgroup``).

    The RUN_FIRST files move to the front (whole files: a module's fixtures stay in one piece).
    A module- or session-scoped fixture is set up once per worker: spread over two workers, a
    module's MLflow server, pipeline runs or browser would be built twice. The tests that use
    such a fixture of their module get the group of that module (xdist sends a group to one
    worker, largest groups first); the others run wherever a worker is free. Runs before
    xdist's own hook, which reads the group marks.
    """
    first = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda it: first.get(it.path.name, len(first)))  # stable: file order kept otherwise
    for item in items:
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        shared = [d[-1] for d in defs.values()
                  if d and d[-1].scope in ("module", "session") and d[-1].baseid != ""
                  and not d[-1].baseid.endswith("conftest.py") and d[-1].baseid != "tests"]
        if shared:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


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
