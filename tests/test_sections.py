"""Several samples as one study, the output side: Moran's I per section, the programs x
samples table, the sample-specific flag, the per-section figure, the run folder and MLflow.

The sections are planted: two sections on the SAME grid (their coordinates overlap, as
two Visium slides' do), known usages of known programs, X = usages x spectra. The truth
the tests compare with is computed here from what was planted (shares) or on each section
alone (Moran's I with scanpy on the section's own graph).
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from float32_bounds import gamma
from tardis_exp.errors import InputError
from tardis_exp.metrics import spatial_graph
from tardis_exp.score import sample_table, score

N_MARKERS, N_BACKGROUND = 30, 80
SCORE_KW = dict(n_cluster_genes=20, ctrl_size=20)


def _grid(n: int) -> np.ndarray:
    return np.array([(i, j) for i in range(n) for j in range(n)], dtype=np.float64)


def _usages(xy: np.ndarray, n_grid: int, section: str, rng) -> np.ndarray:
    """Planted usages of 4 programs on one section (spots x 4).

    0: shared, a gradient along x that runs left-to-right in A and right-to-left in B;
    1: shared, a gradient along y, the same in both;
    2: in section B only;
    3: weak (no spot's argmax): at 0.02 on exactly 10 % of A's spots and 30 % of B's, noise
       below 0.002 elsewhere: 0.75 of its high-usage spots (per spot of each section) in B.
    """
    x, y = xy[:, 0] / (n_grid - 1), xy[:, 1] / (n_grid - 1)
    n = len(xy)
    u = np.zeros((n, 4))
    u[:, 0] = (x if section == "A" else 1 - x) + 0.05
    u[:, 1] = y + 0.05
    if section == "B":
        u[:, 2] = np.exp(-((x - 0.5) ** 2 + (y - 0.5) ** 2) / 0.05)
    u[:, 3] = rng.uniform(0, 0.002, n)
    u[rng.permutation(n)[:round((0.3 if section == "B" else 0.1) * n)], 3] += 0.02
    return u


def study(n_a: int = 20, n_b: int = 20, seed: int = 0) -> ad.AnnData:
    """Sections A (n_a x n_a grid) and B (n_b x n_b, the same grid's corner): overlapping
    coordinates, obs['sample'] categorical, the consensus result planted."""
    rng = np.random.default_rng(seed)
    G = 4 * N_MARKERS + N_BACKGROUND
    H = np.full((4, G), 0.02)
    for p in range(4):
        H[p, p * N_MARKERS:(p + 1) * N_MARKERS] = 1.0
    parts = []
    for name, n in (("A", n_a), ("B", n_b)):
        xy = _grid(n)
        U = _usages(xy, n, name, rng)
        X = U @ H + rng.uniform(0, 1e-3, (len(xy), G))
        a = ad.AnnData(X=X.astype(np.float32), obsm={"spatial": xy, "X_nmf_consensus": U},
                       obs=pd.DataFrame({"sample": name}, index=[f"{name}_{i}" for i in range(len(xy))]))
        parts.append(a)
    adata = ad.concat(parts, merge="same")
    adata.var_names = [f"g{i}" for i in range(G)]
    adata.obs["sample"] = pd.Categorical(adata.obs["sample"], categories=["A", "B"])
    adata.uns["nmf_consensus"] = {"spectra": H}
    return adata


def _truth_share(adata) -> np.ndarray:
    """Share of each planted program's usage per section, from per-spot means."""
    U = np.asarray(adata.obsm["X_nmf_consensus"])
    m = np.stack([U[adata.obs["sample"].to_numpy() == s].mean(0) for s in ("A", "B")], axis=1)
    return m / m.sum(1, keepdims=True)


def _section_morans_i(adata, section: str, n_nb: int = 6) -> np.ndarray:
    """Moran's I of every program score in ``section`` alone: its own graph, scanpy's formula."""
    sub = adata[adata.obs["sample"] == section]
    z = np.stack([sub.obs[f"nmf_cluster_{p}"].to_numpy(dtype=np.float64) for p in range(4)])
    return np.asarray(sc.metrics.morans_i(spatial_graph(np.asarray(sub.obsm["spatial"]), n_nb), z))


def test_morans_i_per_section_is_each_sections_own_value():
    adata = study()
    assert (adata.obsm["spatial"][:400] == adata.obsm["spatial"][400:]).all()  # the coordinates overlap
    score(adata, sample_key="sample", **SCORE_KW)
    t = adata.uns["nmf_samples"]
    assert list(t["samples"]) == ["A", "B"] and list(t["n_spots"]) == [400, 400]
    mi = np.asarray(t["morans_i"])
    assert mi.shape == (4, 2)
    # scanpy on each section alone: the same values (float64 sums over at most 12 edges per spot)
    tol = gamma(400 * 12)
    for s, name in enumerate(("A", "B")):
        own = _section_morans_i(adata, name)
        live = np.isfinite(own)
        np.testing.assert_allclose(mi[live, s], own[live], rtol=tol, atol=tol)
        assert np.isnan(mi[~live, s]).all()
    # program 0 runs one way in A, the other way in B: strongly autocorrelated in each section
    assert mi[0, 0] > 0.8 and mi[0, 1] > 0.8
    # ... but on one graph over both sections, co-located spots of A and B disagree
    z = np.stack([adata.obs[f"nmf_cluster_{p}"].to_numpy(dtype=np.float64) for p in range(4)])
    pooled = np.asarray(sc.metrics.morans_i(spatial_graph(np.asarray(adata.obsm["spatial"]), 6), z))
    assert pooled[0] < mi[0].min() - 0.3
    # the run's value per program: the spot-weighted mean of the sections where it varies
    run_mi = np.asarray(adata.uns["nmf_metrics"]["morans_i"])
    w = np.where(np.isfinite(mi), 400.0, 0.0)
    np.testing.assert_allclose(run_mi, np.nansum(mi * w, 1) / w.sum(1), rtol=tol, atol=tol)
    assert abs(run_mi[0] - pooled[0]) > 0.3
    assert adata.uns["nmf_metrics"]["morans_i_mean"] == pytest.approx(float(np.nanmean(run_mi)))


@pytest.mark.parametrize("n_b", [20, 10])  # equal sections; A with 9 times B's spots
def test_share_table_and_sample_specific_flag(n_b, caplog):
    adata = study(n_a=30, n_b=n_b)
    with caplog.at_level(logging.WARNING, logger="tardis_exp.score"):
        score(adata, sample_key="sample", **SCORE_KW)
    t = adata.uns["nmf_samples"]
    share = np.asarray(t["share"])
    assert share.shape == (4, 2)
    # per-spot means of the planted usages, computed here (sums of <= 900 float64 terms)
    np.testing.assert_allclose(share, _truth_share(adata), rtol=gamma(900), atol=gamma(900))
    # shared programs sit at one half whatever the sections' sizes (by summed usage, the
    # unbalanced study would give A 0.9 of programs 0 and 1); program 2 is B's alone
    np.testing.assert_allclose(share[:2], 0.5, atol=0.02)
    assert share[2, 1] == 1.0
    # the flag reads the share of high-usage spots: by construction 0.75 for program 3 (10 %
    # of A's spots, 30 % of B's), below the default 0.8; about one half for the gradients
    # (the spots at half their top usage or more: 16 of 30 columns in A, 10 of 20 in B)
    active = np.asarray(t["active_share"])
    assert active[2, 1] == 1.0 and active[3, 1] == pytest.approx(0.75, abs=1e-12)
    np.testing.assert_allclose(active[:2], 0.5, atol=0.03)
    assert list(np.asarray(t["sample_specific"], dtype=bool)) == [False, False, True, False]
    assert list(t["specific_to"]) == ["", "", "B", ""]
    assert t["sample_specific_share"] == 0.8 and t["sample_key"] == "sample"
    flagged = [r.getMessage() for r in caplog.records if "sample-specific" in r.getMessage()]
    assert len(flagged) == 1 and "program 2" in flagged[0] and "'B'" in flagged[0]
    # the threshold is the parameter's: at 0.7, program 3 is flagged too
    score(adata, sample_key="sample", sample_specific_share=0.7, **SCORE_KW)
    assert list(np.asarray(adata.uns["nmf_samples"]["sample_specific"], dtype=bool)) == [False, False, True, True]
    # the run folder's table: one row per program and sample, from the same numbers
    table = sample_table(adata)
    assert list(table.columns) == ["program", "sample", "n_spots", "share", "active_share", "morans_i",
                                   "sample_specific"]
    assert len(table) == 8
    np.testing.assert_allclose(table.pivot(index="program", columns="sample", values="share").to_numpy(), share)
    assert table.loc[table.sample_specific, ["program", "sample"]].values.tolist() == [[2, "B"], [3, "B"]]


def test_bad_sample_key_is_one_line_before_any_compute():
    adata = study(n_a=6, n_b=6)
    with pytest.raises(InputError, match=r"data\.sample_key.*'batch' is not an obs column; obs has sample"):
        score(adata, sample_key="batch", **SCORE_KW)
    adata.obs["sample"] = adata.obs["sample"].cat.add_categories("C")
    adata.obs.loc[adata.obs_names[:3], "sample"] = np.nan
    with pytest.raises(InputError, match=r"obs\['sample'\] \(data\.sample_key\) has no sample for 3 spots"):
        score(adata, sample_key="sample", **SCORE_KW)
    assert "nmf_cluster_0" not in adata.obs  # nothing scored


def test_figure_has_one_panel_per_program_and_section(tmp_path):
    from PIL import Image

    from tardis_exp.plots import make_plots, programs_by_section_figure

    adata = study()
    score(adata, sample_key="sample", **SCORE_KW)
    assert "3" not in set(adata.obs["nmf_program"].astype(str))  # program 3 is no spot's argmax
    fig = programs_by_section_figure(adata)
    panels = [ax.get_label() for ax in fig.axes if ax.get_label().startswith("program ")]
    assert panels == [f"program {p} | {s}" for p in range(4) for s in ("A", "B")]
    assert sum(ax.get_label() == "<colorbar>" for ax in fig.axes) == 4  # one scale per program
    # each panel holds its own section's spots only, coloured by the program's usage
    U = np.asarray(adata.obsm["X_nmf_consensus"])
    for ax in fig.axes:
        if ax.get_label().startswith("program "):
            p, s = ax.get_label().split(" ")[1], ax.get_label().split(" | ")[1]
            col = ax.collections[0]
            np.testing.assert_array_equal(col.get_array(), U[(adata.obs["sample"] == s).to_numpy(), int(p)])
            assert col.norm.vmax == pytest.approx(np.percentile(U[:, int(p)], 99.5))
    # program_scores.png lays the sections side by side: no spot of B on one of A
    from tardis_exp.plots import _side_by_side

    xy = _side_by_side(adata, "spatial")
    a, b = (adata.obs["sample"] == "A").to_numpy(), (adata.obs["sample"] == "B").to_numpy()
    assert xy[b, 0].min() > xy[a, 0].max()
    np.testing.assert_array_equal(xy[:, 1], adata.obsm["spatial"][:, 1])
    written = make_plots(adata, tmp_path)
    png = tmp_path / "programs_by_section.png"
    assert png in written
    w, h = Image.open(png).size
    # 2 columns of sections, 4 rows of programs: taller than wide
    assert h > 1.4 * w
    # one sample: the figure is not drawn, the table is not written
    one = study(n_a=8, n_b=8)
    score(one, **SCORE_KW)
    assert "nmf_samples" not in one.uns
    assert not (tmp_path / "none" / "programs_by_section.png").exists() and \
        all(p.name != "programs_by_section.png" for p in make_plots(one, tmp_path / "none"))


def test_run_writes_the_table_and_logs_it_to_mlflow(tmp_path):
    """A real run (data=h5ad of two synthetic sections on one grid, data.sample_key) into the
    default SQLite store: programs_by_sample.tsv, the figure and the metrics in MLflow."""
    from hydra import compose, initialize_config_dir
    from mlflow import MlflowClient
    from omegaconf import OmegaConf

    from _mlflow_keys import check_metric_keys
    from tardis_exp.pipeline import run
    from tardis_exp.synthetic import make_synthetic

    parts = []
    for i, name in enumerate(("A", "B")):
        a = make_synthetic(n_spots=400, n_genes=600, n_programs=4, n_markers=40, seed=i + 1)
        a.obs_names = [f"{name}_{o}" for o in a.obs_names]
        a.obs["sample"] = name
        parts.append(a)
    data = ad.concat(parts, merge="same")
    data.obs["sample"] = data.obs["sample"].astype("category")
    assert (np.asarray(parts[0].obsm["spatial"]) == np.asarray(parts[1].obsm["spatial"])).all()
    path = tmp_path / "two_sections.h5ad"
    data.write_h5ad(path)

    run_dir = tmp_path / "run"
    ov = [f"paths.root_dir={tmp_path}", f"paths.run_dir={run_dir}", "data=h5ad", f"data.path={path}",
          "data.sample_key=sample", "factorize.n_components=5", "factorize.n_replicates=3",
          "consensus.n_resamples=10", "preprocess.n_top_genes=400", "score.n_cluster_genes=20"]
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="config", overrides=ov), resolve=True)
    metrics = run(cfg, run_dir, overrides=ov)

    result = ad.read_h5ad(run_dir / "result.h5ad")
    t = result.uns["nmf_samples"]
    K = result.obsm["X_nmf_consensus"].shape[1]
    assert list(t["samples"]) == ["A", "B"] and np.asarray(t["share"]).shape == (K, 2)
    table = pd.read_csv(run_dir / "programs_by_sample.tsv", sep="\t")
    pd.testing.assert_frame_equal(table, sample_table(result), check_dtype=False)
    # the shares, from the result's usages: per-spot means per section
    U = np.asarray(result.obsm["X_nmf_consensus"], dtype=np.float64)
    m = np.stack([U[result.obs["sample"].to_numpy() == s].mean(0) for s in ("A", "B")], axis=1)
    np.testing.assert_allclose(table["share"].to_numpy().reshape(K, 2), m / m.sum(1, keepdims=True),
                               rtol=gamma(400), atol=gamma(400))
    # Moran's I per section: each section's own value (scanpy on that section alone)
    for s, name in enumerate(("A", "B")):
        sub = result[result.obs["sample"] == name]
        z = np.stack([sub.obs[f"nmf_cluster_{p}"].to_numpy(dtype=np.float64) for p in range(K)])
        own = np.asarray(sc.metrics.morans_i(spatial_graph(np.asarray(sub.obsm["spatial"]), 6), z))
        np.testing.assert_allclose(np.asarray(t["morans_i"])[:, s], own, rtol=gamma(400 * 12),
                                   atol=gamma(400 * 12))
    assert (run_dir / "plots" / "programs_by_section.png").is_file()

    client = MlflowClient(cfg["tracking"]["uri"])
    parent = client.get_run(metrics["mlflow_run_id"])
    assert parent.data.metrics["n_sample_specific"] == float(np.sum(t["sample_specific"]))
    assert metrics["n_sample_specific"] == parent.data.metrics["n_sample_specific"]
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "programs_by_sample.tsv" in names
    assert "plots/programs_by_section.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    stage = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = 'score'")
    assert len(stage) == 1
    hist = sorted(client.get_metric_history(stage[0].info.run_id, "morans_i_mean_by_sample"), key=lambda h: h.step)
    assert [h.step for h in hist] == [0, 1]
    np.testing.assert_allclose([h.value for h in hist], np.nanmean(np.asarray(t["morans_i"]), axis=0), rtol=1e-12)
    share_hist = sorted(client.get_metric_history(stage[0].info.run_id, "max_sample_share_by_program"),
                        key=lambda h: h.step)
    np.testing.assert_allclose([h.value for h in share_hist], np.asarray(t["active_share"]).max(1), rtol=1e-12)
    check_metric_keys(client, parent.info.experiment_id)  # every key registered, with its steps

    # the projection onto the same two sections, per section too
    from tardis_exp.project import project

    proj = project(data.copy(), run_dir, sample_key="sample", n_cluster_genes=20, copy=True)
    pt = proj.uns["nmf_projected_samples"]
    Up = np.asarray(proj.obsm["X_nmf_projected"], dtype=np.float64)
    m = np.stack([Up[proj.obs["sample"].to_numpy() == s].mean(0) for s in ("A", "B")], axis=1)
    np.testing.assert_allclose(np.asarray(pt["share"]), m / m.sum(1, keepdims=True), rtol=gamma(400), atol=gamma(400))
    assert np.asarray(pt["morans_i"]).shape == (K, 2)
    with pytest.raises(InputError, match="'batch' is not an obs column"):
        project(data.copy(), run_dir, sample_key="batch")


def test_knn_morans_i_equals_scanpy_on_the_symmetric_graph():
    """The score stage's Moran's I (from the neighbour index, no graph built) is scanpy's on
    spatial_graph's matrix: scattered spots, duplicated coordinates (a spot among its own
    neighbours), one-way and mutual neighbours, a constant column (NaN in both)."""
    from tardis_exp.metrics import knn_index, knn_morans_i

    rng = np.random.default_rng(3)
    xy = rng.random((700, 2)) * 20
    xy[10:14] = xy[9]  # five spots at one place
    vals = rng.random((700, 4))
    vals[:, 1] += np.sin(xy[:, 0] / 3)  # spatially patterned
    vals[:, 3] = 2.0
    ref = np.asarray(sc.metrics.morans_i(spatial_graph(xy, 6), vals.T))
    got = knn_morans_i(knn_index(xy, 6, chunk=97), vals, chunk=61)  # chunks that split rows unevenly
    assert np.isnan(got[3]) and np.isnan(ref[3])
    assert got[1] > 0.5  # the pattern is found, so the comparison is not of noise alone
    # the same products summed in another order: float64 rounding of sums of 2 x 700 x 6 signed
    # terms, bounded by gamma_N times the sum of their absolute values (relative to the denominator)
    G = spatial_graph(xy, 6)
    Z = np.abs(vals[:, :3] - vals[:, :3].mean(0))
    u64 = np.finfo(np.float64).eps / 2
    n_terms = 2 * G.nnz + 700
    bound = n_terms * u64 / (1 - n_terms * u64) * 700 / G.nnz * np.einsum("ij,ij->j", Z, G @ Z) / (Z ** 2).sum(0)
    # each side within the bound of the exact value, plus the rounding of its two divisions
    assert np.all(np.abs(got[:3] - ref[:3]) <= 2 * bound + 8 * u64 * np.abs(ref[:3])), (got, ref, bound)
