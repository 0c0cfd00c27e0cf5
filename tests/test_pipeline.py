"""The four stages end to end: the issue's acceptance values on data with known truth."""

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from tardis_exp.pipeline import run


def _run_cli(args, cwd, timeout=600):
    env = {**os.environ, "TARDIS_EXP_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "tardis_exp", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_default_cli_run_finds_six_programs(tmp_path):
    """`tardis-exp` with no arguments: default synthetic data, best K = 6, recovery >= 0.9."""
    p = _run_cli([], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = list((tmp_path / "outputs" / "runs").iterdir())
    metrics = yaml.safe_load((run_dir / "metrics.yaml").read_text())
    assert metrics["best_k"] == 6
    assert metrics["program_recovery"] >= 0.9
    a = ad.read_h5ad(run_dir / "result.h5ad")
    assert a.uns["nmf_consensus"]["best_k"] == 6
    assert [f"nmf_cluster_{i}" for i in range(6)] == [c for c in a.obs if c.startswith("nmf_cluster_")]
    # ground truth vs labels, computed here from the stored result
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(a.obs["true_domain"], a.obs["nmf_cluster"]) > 0.8
    assert (tmp_path / "mlruns" / "mlflow.db").exists()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["factorize"]["n_components"] == 10 and cfg["data"]["n_programs"] == 6
    # the run folder's files at gzip level 1 (GZIP_LEVEL), read back by the usual readers
    import gzip

    import h5py

    with h5py.File(run_dir / "result.h5ad", "r") as f:
        assert (f["X/data"].compression, f["X/data"].compression_opts) == ("gzip", 1)
        assert (f["obsm/X_nmf_consensus"].compression, f["obsm/X_nmf_consensus"].compression_opts) == ("gzip", 1)
    head = (run_dir / "usages.tsv.gz").read_bytes()[:10]
    assert head[:2] == b"\x1f\x8b" and head[8] == 4  # gzip; XFL 4: compressed at the fastest level
    with gzip.open(run_dir / "usages.tsv.gz", "rt") as fh:
        usages = pd.read_csv(fh, sep="\t", index_col=0)
    np.testing.assert_allclose(usages.to_numpy(), a.obsm["X_nmf_consensus"], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("n_programs,n_components", [(4, 8), (9, 12)])
def test_other_program_counts(compose, tmp_path, n_programs, n_components):
    cfg = compose(f"data.n_programs={n_programs}", f"factorize.n_components={n_components}",
                  "tracking.enabled=false", "save_result=false")
    m = run(cfg, tmp_path / "run")
    assert m["best_k"] == n_programs
    assert m["program_recovery"] >= 0.9


def test_cli_overrides_reach_every_stage(tmp_path, synthetic_small):
    path = tmp_path / "x.h5ad"
    synthetic_small.write_h5ad(path)
    p = _run_cli(["data=h5ad", f"data.path={path}", "factorize.n_components=5", "factorize.n_replicates=3",
                  "consensus.max_clusters=6", "consensus.min_clusters=3", "consensus.n_resamples=10",
                  "preprocess.n_top_genes=300", "score.n_cluster_genes=20", "tracking.enabled=false"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = list((tmp_path / "outputs" / "runs").iterdir())
    a = ad.read_h5ad(run_dir / "result.h5ad")
    assert a.n_vars == 300
    assert a.uns["nmf"]["components"].shape == (3, 5, 300)
    # consensus.max_clusters=6 is clipped to factorize.n_components=5 (method=components:
    # more meta-programs than components per replicate cannot recur across replicates)
    assert list(a.uns["nmf_consensus"]["k_values"]) == [3, 4, 5]
    assert (a.uns["nmf_programs"].groupby("program").size() == 20).all()


def test_save_result_results_leaves_out_the_input_matrices(compose, tmp_path):
    """save_result=results (sweep presets): the stages' outputs, identical, without X and layers."""
    ov = ("data.n_spots=600", "data.n_genes=500", "data.n_programs=3", "preprocess.n_top_genes=300",
          "factorize.n_components=4", "factorize.n_replicates=3", "factorize.max_iter=150",
          "consensus.n_resamples=10", "consensus.min_clusters=2", "consensus.max_clusters=5",
          "tracking.enabled=false")
    run(compose(*ov, "save_result=full"), tmp_path / "full")
    cfg = compose(*ov, "save_result=results", "cache.enabled=true", "tracking.log_plots=true")
    run(cfg, tmp_path / "results")
    # figures drawn in the run itself use the X in memory, whatever the file leaves out
    assert (tmp_path / "results" / "plots" / "top_genes_dotplot.png").is_file()
    full = ad.read_h5ad(tmp_path / "full" / "result.h5ad")
    lite = ad.read_h5ad(tmp_path / "results" / "result.h5ad")
    assert full.X is not None and "counts" in full.layers
    assert lite.X is None and len(lite.layers) == 0
    assert lite.shape == full.shape and list(lite.var_names) == list(full.var_names)
    assert set(lite.obsm) == set(full.obsm)
    for k in full.obsm:
        np.testing.assert_array_equal(lite.obsm[k], full.obsm[k])
    assert lite.obs.equals(full.obs)
    assert lite.uns["nmf_programs"].equals(full.uns["nmf_programs"])
    assert lite.uns["nmf_consensus"]["best_k"] == full.uns["nmf_consensus"]["best_k"]
    assert (tmp_path / "results" / "result.h5ad").stat().st_size < 0.6 * (tmp_path / "full" / "result.h5ad").stat().st_size

    from tardis_exp.plots import PLOTS, make_plots, read_result

    # figures of such a result: X comes back from the stage cache, without the raw data
    back = read_result(tmp_path / "results" / "result.h5ad")
    assert (back.X != full.X).nnz == 0
    assert {p.name for p in make_plots(back, tmp_path / "plots1")} == set(PLOTS) - {"programs_by_section.png"}
    # ... and without a cache the dot plot (the one figure that reads X) is not drawn
    import shutil

    shutil.rmtree(cfg["cache"]["dir"])
    back = read_result(tmp_path / "results" / "result.h5ad")
    assert back.X is None
    names = {p.name for p in make_plots(back, tmp_path / "plots2")}
    assert names == set(PLOTS) - {"top_genes_dotplot.png", "programs_by_section.png"}


def test_hals_run_writes_the_background_beside_the_programs(compose, tmp_path):
    """With a background program (HALS on the simulator), the run folder says what it is:
    its usages after the programs' in usages.tsv.gz, its top genes in background.tsv --
    the simulator's shared genes, not a program's markers."""
    cfg = compose("data.n_spots=1600", "data.n_genes=1200", "data.n_programs=4", "data.seed=21",
                  "preprocess.n_top_genes=1000", "factorize.solver=hals", "factorize.n_components=8",
                  "factorize.n_replicates=8", "consensus.min_clusters=2", "consensus.max_clusters=8",
                  "tracking.enabled=false", "save_result=results")
    m = run(cfg, tmp_path / "run")
    assert m["best_k"] == 4 and m["consensus.n_background"] >= 1
    u = pd.read_csv(tmp_path / "run" / "usages.tsv.gz", sep="\t", index_col=0)
    n_bg = int(m["consensus.n_background"])
    assert list(u.columns) == [f"program_{i}" for i in range(4)] + [f"background_{i}" for i in range(n_bg)]
    genes = pd.read_csv(tmp_path / "run" / "background.tsv", sep="\t")
    assert list(genes.columns) == ["background", "rank", "gene", "loading"] and len(genes) == 50 * n_bg
    var = ad.read_h5ad(tmp_path / "run" / "result.h5ad").var
    genes["truth"] = var.loc[genes["gene"], "true_program"].astype(str).to_numpy()
    for _, top in genes.groupby("background"):  # no program's markers: mostly shared genes, any
        counts = top["truth"].value_counts()   # program's markers a small minority of its 50
        assert counts.get("none", 0) > 25 and counts.drop("none", errors="ignore").max() <= 10
    # while each program's top genes are its own markers
    prog = pd.read_csv(tmp_path / "run" / "programs.tsv", sep="\t")
    prog["truth"] = var.loc[prog["gene"], "true_program"].astype(str).to_numpy()
    assert (prog.groupby("program")["truth"].agg(lambda t: t.value_counts().iloc[0] / len(t)) >= 0.9).all()
