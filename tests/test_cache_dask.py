"""The stage cache for ``data.backend=dask`` inputs (issue 28): a sweep over a zarr store.

A two-trial Optuna sweep (``sweep=k_range``, both trials the same configuration) over a
zarr store written here, with the stage cache on: trial 0 computes and stores the
preprocessed chunks and the factorization, trial 1 reads both back (the stage runs'
``cache`` tags, the trials' ``cache_hits`` / ``cache_misses`` and the cache's log lines
say so) and its results equal trial 0's bit for bit. One value changed in the store makes
the next run miss: the key is the store's content, not its path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import yaml

pytest.importorskip("dask.array")

from tardis_exp.lazy import write_zarr_chunks  # noqa: E402
from tardis_exp.synthetic import make_synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_spots=400, n_genes=300, n_programs=3, n_markers=20)
FAST = ["factorize.n_replicates=3", "factorize.max_iter=150", "consensus.min_clusters=2", "consensus.max_clusters=4",
        "consensus.n_resamples=10", "preprocess.n_top_genes=200", "tracking.log_plots=false"]


def _store(path: Path) -> ad.AnnData:
    a = make_synthetic(**SMALL)
    X = sp.csr_matrix(a.X, dtype=np.float32)
    write_zarr_chunks(path, (X[i:i + 128] for i in range(0, X.shape[0], 128)), a.obs, a.var, dict(a.obsm))
    return a


def _tardis(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TARDIS_EXP_PROGRESS="0", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run([sys.executable, "-m", "tardis_exp", *args, f"paths.root_dir={root}", *FAST],
                       cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"tardis-exp failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def _stage_tags(root: Path, run_id: str) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("tardis-exp").experiment_id
    stages = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{run_id}'")
    return {s.data.tags["stage"]: s.data.tags.get("cache") for s in stages}


def test_sweep_over_a_zarr_store_reuses_preprocessing_and_factorization(tmp_path):
    store = tmp_path / "s.zarr"
    _store(store)
    data = ["data=zarr", f"data.path={store}", "data.backend=dask", "data.chunk_rows=128"]
    _tardis(tmp_path, "-m", "sweep=k_range", *data, f"hydra.sweep.dir={tmp_path}/multirun",
                "hydra.sweeper.n_trials=2", "hydra.sweeper.params={factorize.n_components:'choice(4)'}",
                "hydra.sweeper.ordered_pairs=[]", "hydra.sweeper.mlflow.log_plots=false")
    trials = [tmp_path / "multirun" / str(n) for n in (0, 1)]
    m = [yaml.safe_load((t / "metrics.yaml").read_text()) for t in trials]
    # trial 0 computes preprocess, factorize and consensus; trial 1 (the same configuration) reads all three
    assert (m[0]["cache_misses"], m[0]["cache_hits"]) == (3, 0)
    assert (m[1]["cache_misses"], m[1]["cache_hits"]) == (0, 3)
    assert _stage_tags(tmp_path, m[0]["mlflow_run_id"]) == {"preprocess": "miss", "factorize": "miss",
                                                            "consensus": "miss", "score": None}
    assert _stage_tags(tmp_path, m[1]["mlflow_run_id"]) == {"preprocess": "hit", "factorize": "hit",
                                                            "consensus": "hit", "score": None}
    logs = ["".join(f.read_text() for f in t.glob("*.log")) for t in trials]  # each trial's job log
    for stage in ("preprocess", "factorize"):
        assert f"stage cache: {stage} miss" in logs[0] and f"stage cache: {stage} hit" not in logs[0]
        assert f"stage cache: {stage} hit" in logs[1] and f"stage cache: {stage} miss" not in logs[1]
    # what the cache holds for a Dask input: the preprocessed chunks as a zarr store, no h5ad
    cache = tmp_path / ".cache" / "tardis_exp"
    (entry,) = (cache / "preprocess").glob("*/meta.json")
    assert (entry.parent / "data.zarr").is_dir() and not list(cache.rglob("*.h5ad"))
    # a hit gives what the miss computed, bit for bit
    r = [ad.read_h5ad(t / "result.h5ad") for t in trials]
    assert list(r[1].var_names) == list(r[0].var_names) and list(r[1].obs_names) == list(r[0].obs_names)
    np.testing.assert_array_equal(r[1].uns["nmf"]["components"], r[0].uns["nmf"]["components"])
    np.testing.assert_array_equal(r[1].obsm["X_nmf"], r[0].obsm["X_nmf"])
    assert m[1]["best_k"] == m[0]["best_k"] and m[1]["program_recovery"] == m[0]["program_recovery"]
    import gzip

    assert gzip.decompress((trials[1] / "usages.tsv.gz").read_bytes()) == \
        gzip.decompress((trials[0] / "usages.tsv.gz").read_bytes())
    # the cached preprocessed matrix is the one a run without the cache computes
    from tardis_exp.lazy import read_lazy
    from tardis_exp.params import check
    from tardis_exp.preprocess import preprocess

    ref = preprocess(read_lazy(store, chunk_rows=128), **check("preprocess", {"n_top_genes": 200}))
    cached = ad.read_zarr(entry.parent / "data.zarr")
    assert list(cached.var_names) == list(ref.var_names)
    np.testing.assert_array_equal(sp.csr_matrix(cached.X).toarray(), sp.csr_matrix(ref.X.compute()).toarray())

    # one value changed in the store: a new content digest, so every stage misses
    import zarr

    d = zarr.open_group(str(store), mode="r+")["X"]["data"]
    d[0] = d[0] + 1
    _tardis(tmp_path, *data, "cache.enabled=true", "save_result=results", "factorize.n_components=4")
    (mc,) = [yaml.safe_load(f.read_text()) for f in tmp_path.glob("outputs/runs/*/metrics.yaml")]
    assert (mc["cache_misses"], mc["cache_hits"]) == (3, 0)
    assert len(list((cache / "preprocess").glob("*/meta.json"))) == 2
