"""factorize.dask.release_memory: freed blocks go back to the system at once (glibc).

Each probe runs in a fresh process (malloc's thresholds are process-wide): a freed 16 MB block
raises glibc's dynamic mmap threshold, 200 blocks of 1 MB are then allocated and every other
one freed; the probe prints how much resident memory that free gave back.
"""

import os
import subprocess
import sys
import textwrap

import pytest

glibc = sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver())
pytestmark = pytest.mark.skipif(not glibc, reason="the thresholds are glibc's")

PROBE = textwrap.dedent("""
    import numpy as np

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    big = np.ones(16 << 20, np.uint8)
    del big  # glibc now serves blocks below 16 MB from its heap and keeps them when freed
    blocks = [np.ones(1 << 20, np.uint8) for _ in range(200)]
    before = rss_mb()
    del blocks[::2]  # 100 MB freed, in holes between blocks still in use
    print("GIVEN_BACK", before - rss_mb())
""")


def _given_back(prelude: str, tmp_path) -> float:
    # glibc's defaults: a MALLOC_* setting inherited from the test process (e.g. the
    # MALLOC_TRIM_THRESHOLD_ that dask.distributed's nanny sets for its workers) fixes the
    # thresholds too, and the probe would measure that instead
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    p = subprocess.run([sys.executable, "-c", prelude + PROBE], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return float(p.stdout.split("GIVEN_BACK")[-1])


def test_release_freed_memory_gives_freed_blocks_back(tmp_path):
    kept = _given_back("", tmp_path)
    given = _given_back("from tardis_exp.heap import release_freed_memory\nassert release_freed_memory()\n",
                        tmp_path)
    # the 100 MB of 1 MB blocks: mapped one by one, so all of it returns at free (page tables
    # and the interpreter's own small allocations move RSS by a few MB); glibc's default keeps it
    assert given >= 90, given
    assert kept <= 20, kept


RUN = textwrap.dedent("""
    import anndata as ad, scipy.sparse as sp
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from tardis_exp import pipeline
    from tardis_exp.synthetic import make_synthetic

    a = make_synthetic(n_spots=400, n_genes=300, n_programs=3, n_markers=20)
    a.X = sp.csr_matrix(a.X)
    a.write_h5ad("s.h5ad")
    with initialize_config_dir(config_dir={conf!r}, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "paths.root_dir=.", "paths.run_dir=run", "data=h5ad", "data.path=s.h5ad", "data.backend=dask",
            "data.chunk_rows=128", "tracking.enabled=false", "tracking.log_plots=false", "factorize.n_replicates=2",
            "consensus.n_resamples=5", {extra!r}])
    pipeline.run(OmegaConf.to_container(cfg, resolve=True), "run")
""")


def test_dask_run_releases_freed_memory(tmp_path):
    """A data.backend=dask run sets the thresholds in its process (factorize.dask.release_memory,
    on by default)."""
    from pathlib import Path

    conf = str(Path(__file__).resolve().parent.parent / "conf")
    assert _given_back(RUN.format(conf=conf, extra="factorize.dask.release_memory=true"), tmp_path) >= 90
