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

# The files with tests that share a module- or session-scoped fixture of their module (an MLflow
# server, pipeline runs, a browser). Such a fixture is built once per worker: spread over two
# workers, it would be built twice. Under ``--dist loadgroup`` each of these files runs whole on
# one worker (largest first); every other test runs on whichever worker is free.
# pytest_collection_modifyitems below fails the run when a file is missing here.
SHARED_FIXTURE_FILES = frozenset({
    "test_cache.py", "test_defaults.py", "test_keys.py", "test_outputs.py", "test_project.py", "test_secrets.py", "test_stages.py",
    "test_sweep_launchers.py", "test_sweep_pipeline.py", "test_tracking.py", "test_ui.py", "test_validation.py",
})


def _uses_a_fixture_of_its_module(item) -> bool:
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    module = item.nodeid.split("::", 1)[0]
    return any(d[-1].scope in ("module", "session") and d[-1].baseid == module for d in defs.values() if d)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The RUN_FIRST files move to the front (whole files: a module's fixtures stay in one
    piece), and SHARED_FIXTURE_FILES must name every file whose tests share its fixtures."""
    first = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda it: first.get(it.path.name, len(first)))  # stable: file order kept otherwise
    missing = sorted({it.path.name for it in items if _uses_a_fixture_of_its_module(it)} - SHARED_FIXTURE_FILES)
    if missing:
        raise pytest.UsageError(f"tests/conftest.py: add {', '.join(missing)} to SHARED_FIXTURE_FILES "
                                "(tests there share a module- or session-scoped fixture)")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` with SHARED_FIXTURE_FILES as the groups (one file, one worker).

    xdist's own loadgroup reads ``xdist_group`` marks through a suffix it writes into the node
    id, which pytest >= 9 no longer takes (pytest-xdist issue 1386): the marks would be ignored.
    The file name is in the node id the scheduler sees, so the groups here need no mark.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class FileGroups(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path.rsplit("/", 1)[-1] in SHARED_FIXTURE_FILES else super()._split_scope(nodeid)

    return FileGroups(config, log)


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
