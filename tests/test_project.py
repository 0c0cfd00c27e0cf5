"""A finished run's programs applied to new data: ``tardis_exp.project`` and the run's
MLflow model (``runs:/<id>/programs``).

Real runs of the pipeline (Hydra's compose API, the ``tardis-exp`` command), real h5ad
files and a real ``mlflow server`` on 127.0.0.1; the model is loaded in a fresh Python
process. Ground truths: a joint fit that saw the held-out spots, the run's own labels,
and the projection itself for the model (the same usages within the float32 bound of
the refit).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

from _ports import mlflow_server
from conftest import compose_config
from float32_bounds import close, gamma, hals_trajectory_rtol

import tardis_exp
from tardis_exp.errors import InputError
from tardis_exp.pipeline import run
from tardis_exp.project import load_programs

REPO = Path(__file__).resolve().parent.parent
FAST = ["factorize.n_replicates=4", "factorize.max_iter=300", "consensus.n_resamples=10", "tracking.log_plots=false",
        "tracking.enabled=false"]


def _run(root: Path, *overrides: str) -> Path:
    cfg = compose_config(root, [*FAST, *overrides])
    run(cfg, root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory):
    """One simulated study (4 programs), fit twice: on two thirds of its spots (the
    reference whose programs are projected) and on all of them (the joint fit)."""
    root = tmp_path_factory.mktemp("project_synth")
    data = tardis_exp.make_synthetic(n_spots=1600, n_genes=800, n_programs=4, n_markers=40, seed=3)
    rng = np.random.default_rng(0)
    held = np.zeros(data.n_obs, bool)
    held[rng.choice(data.n_obs, data.n_obs // 3, replace=False)] = True
    data[~held].copy().write_h5ad(root / "ref.h5ad")
    data.write_h5ad(root / "all.h5ad")
    # 500 of 800 genes: the run's genes are a true subset of the new data's
    common = ["preprocess.n_top_genes=500", "factorize.n_components=6", "consensus.min_clusters=2",
              "consensus.max_clusters=6"]
    ref = _run(root / "ref", "data=h5ad", f"data.path={root / 'ref.h5ad'}", *common)
    joint = _run(root / "joint", "data=h5ad", f"data.path={root / 'all.h5ad'}", *common)
    return {"data": data, "held": held, "ref": ref, "joint": joint}


def test_projection_recovers_the_joint_fit_on_held_out_spots(synthetic_runs):
    """The reference run never saw the held-out third of the spots; the joint fit did, so
    its usages of those spots are what analysing everything together gives: the fair
    target of a projection. Programs of the two fits are paired by their spectra
    (Hungarian assignment on the correlation over the shared genes), never by the
    usages being compared."""
    s = synthetic_runs
    new = s["data"][s["held"]].copy()
    out = tardis_exp.project(new, s["ref"], copy=True)
    assert out is not None and "X_nmf_projected" not in new.obsm  # copy=True leaves the input alone
    U = out.obsm["X_nmf_projected"]
    joint = ad.read_h5ad(s["joint"] / "result.h5ad")
    ref = ad.read_h5ad(s["ref"] / "result.h5ad")
    K = ref.uns["nmf_consensus"]["spectra"].shape[0]
    assert K == 4 and joint.uns["nmf_consensus"]["spectra"].shape[0] == 4 and U.shape == (new.n_obs, 4)
    genes = ref.var_names.intersection(joint.var_names)
    A = pd.DataFrame(ref.uns["nmf_consensus"]["spectra"], columns=ref.var_names)[genes].to_numpy()
    B = pd.DataFrame(joint.uns["nmf_consensus"]["spectra"], columns=joint.var_names)[genes].to_numpy()
    C = np.corrcoef(A, B)[:K, K:]
    rows, cols = linear_sum_assignment(-C)
    Uj = pd.DataFrame(joint.obsm["X_nmf_consensus"], index=joint.obs_names).loc[new.obs_names].to_numpy()
    r = [np.corrcoef(U[:, i], Uj[:, j])[0, 1] for i, j in zip(rows, cols)]
    assert min(r) >= 0.95, r
    # every program of the run is on the new data's genes: nothing missing
    assert np.array_equal(out.uns["nmf_projected"]["missing_weight"], np.zeros(K))
    # the score stage's keys under the prefix: labels are the argmax of the usages
    assert np.array_equal(out.obs["nmf_projected_program"].cat.codes.to_numpy(), U.argmax(1))
    z = out.obs[[f"nmf_projected_cluster_{p}" for p in range(K)]].to_numpy()
    assert np.allclose(z.mean(0), 0, atol=1e-9) and np.allclose(z.std(0), 1)
    # it agrees with the truth as well as the joint fit does
    truth = new.obs["true_domain"].astype(str).to_numpy()
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, U.argmax(1)) >= adjusted_rand_score(truth, Uj.argmax(1)) - 0.05


def test_pbmc68k_scored_against_its_own_programs_gives_its_labels_back(tmp_path):
    """pbmc68k_reduced (real data) scored against the programs of its own run: every cell's
    program is the one the run assigned (ARI >= 0.95), although the projection normalizes
    over the run's 400 genes where the run normalized over every gene it kept."""
    from sklearn.metrics import adjusted_rand_score

    from tardis_exp.data import load_data

    cfg_args = ["data=pbmc68k", "preprocess.n_top_genes=400", "factorize.n_components=5",
                "consensus.min_clusters=3", "consensus.max_clusters=5"]
    run_dir = _run(tmp_path, *cfg_args)
    result = ad.read_h5ad(run_dir / "result.h5ad")
    new = load_data(compose_config(tmp_path, [*FAST, *cfg_args])["data"])
    tardis_exp.project(new, run_dir)
    projected = new.obs["nmf_projected_program"].astype(str).loc[result.obs_names]
    ari = adjusted_rand_score(result.obs["nmf_program"].astype(str), projected)
    assert ari >= 0.95, ari


def test_scaled_run_projects_with_its_own_gene_scale(tmp_path):
    """preprocess.scale=true: new data is divided by the run's per-gene standard deviation
    (var['scale_sd']), not by its own. The run's own spots, projected, give back the run's
    usages; normalize_total over the run's 200 genes instead of the 300 it kept is the only
    difference, hence r close to, not equal to, 1."""
    from tardis_exp.data import load_data

    args = ["data.n_spots=400", "data.n_genes=300", "data.n_programs=3", "data.n_markers=20",
            "factorize.n_components=6", "consensus.min_clusters=2", "consensus.max_clusters=4",
            "preprocess.scale=true", "preprocess.n_top_genes=200"]
    run_dir = _run(tmp_path, *args)
    result = ad.read_h5ad(run_dir / "result.h5ad")
    sd = result.var["scale_sd"].to_numpy(np.float64)
    X = result.X.toarray() if sp.issparse(result.X) else np.asarray(result.X)
    # X is the log-normalized data divided by the recorded scale, which is that data's spread;
    # preprocess takes the variance as E[x^2] - E[x]^2 of float32 sums: error gamma(n) E[x^2] / var
    pre = X * sd
    bound = (gamma(result.n_obs) * (pre**2).mean(0) / pre.var(0) + 4 * 2.0**-24) * sd
    assert sd.min() > 0 and (np.abs(pre.std(0) - sd) <= bound).all()
    new = load_data(compose_config(tmp_path, [*FAST, *args])["data"])
    tardis_exp.project(new, run_dir)
    U0 = result.obsm["X_nmf_consensus"]
    U1 = pd.DataFrame(new.obsm["X_nmf_projected"], index=new.obs_names).loc[result.obs_names].to_numpy()
    r = [np.corrcoef(U0[:, p], U1[:, p])[0, 1] for p in range(U0.shape[1])]
    assert min(r) >= 0.99, r


# ----------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A CLI run logged to a real MLflow server, its model registered as ``tardis-programs``."""
    tmp = tmp_path_factory.mktemp("project_mlflow")
    with mlflow_server(tmp) as (uri, _):
        run_dir = tmp / "run"
        env = {**os.environ, "TARDIS_EXP_PROGRESS": "0", "MPLBACKEND": "Agg"}
        cmd = [sys.executable, "-m", "tardis_exp", "data.n_spots=400", "data.n_genes=300", "data.n_programs=3",
               "data.n_markers=20", "factorize.n_components=6", "factorize.n_replicates=3",
               "factorize.max_iter=200", "consensus.min_clusters=2", "consensus.max_clusters=4",
               "consensus.n_resamples=10", "tracking.log_plots=false", f"tracking.uri={uri}",
               "tracking.register_model=tardis-programs", f"paths.root_dir={tmp}", f"hydra.run.dir={run_dir}"]
        p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        import yaml

        rid = yaml.safe_load((run_dir / "metrics.yaml").read_text())["mlflow_run_id"]
        # new data: the run's programs (the generator's seed) on another grid: other spots, other counts
        new = tardis_exp.make_synthetic(n_spots=625, n_genes=300, n_programs=3, n_markers=20, seed=0)
        new.write_h5ad(tmp / "new.h5ad")
        yield {"uri": uri, "run_id": rid, "run_dir": run_dir, "tmp": tmp, "new": tmp / "new.h5ad"}


def test_logged_model_predicts_in_a_fresh_process_what_project_gives(tracked_run):
    t = tracked_run
    script = textwrap.dedent("""
        import sys, anndata as ad, mlflow, numpy as np, pandas as pd, scipy.sparse as sp
        a = ad.read_h5ad(sys.argv[1])
        X = a.X.toarray() if sp.issparse(a.X) else a.X
        df = pd.DataFrame(np.asarray(X, dtype=np.float64), index=a.obs_names, columns=a.var_names)
        out = mlflow.pyfunc.load_model(sys.argv[2]).predict(df)
        assert isinstance(out, pd.DataFrame) and list(out.index) == list(a.obs_names)
        out.to_csv(sys.argv[3])
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": t["uri"]}
    for name, model_uri in (("run", f"runs:/{t['run_id']}/programs"), ("registry", "models:/tardis-programs/1")):
        dst = t["tmp"] / f"pred_{name}.csv"
        p = subprocess.run([sys.executable, "-c", script, str(t["new"]), model_uri, str(dst)], env=env,
                           capture_output=True, text=True, timeout=300, cwd=t["tmp"])
        assert p.returncode == 0, p.stderr[-3000:]
        pred = pd.read_csv(dst, index_col=0)

        new = ad.read_h5ad(t["new"])
        programs = load_programs(t["run_dir"])
        tardis_exp.project(new, t["run_dir"])
        U = new.obsm["X_nmf_projected"]
        assert list(pred.columns) == [f"program_{i}" for i in range(U.shape[1])] and U.shape[1] == 3
        # same code on counts passed as float64 (the model) and float32 (the h5ad): the same
        # refit up to float32 rounding along the HALS trajectory
        _, present, _, Xn = programs.usages(new.X, new.var_names)
        close(pred.to_numpy(), U, hals_trajectory_rtol(Xn, U, programs.spectra[:, present],
                                                       programs.refit_max_iter))
        from sklearn.metrics import adjusted_rand_score

        assert adjusted_rand_score(new.obs["true_domain"], U.argmax(1)) >= 0.9


def test_register_model_and_the_projection_run(tracked_run):
    from mlflow import MlflowClient

    t = tracked_run
    client = MlflowClient(tracking_uri=t["uri"])
    model = client.get_registered_model("tardis-programs")
    (version,) = model.latest_versions
    assert version.run_id == t["run_id"] and version.source.endswith("/programs")
    assert "programs" in {a.path for a in client.list_artifacts(t["run_id"])}
    assert {Path(a.path).name for a in client.list_artifacts(t["run_id"], "programs")} >= {"MLmodel",
                                                                                           "input_example.json"}

    # the command, with the MLflow URI as source: its own run, tagged with the source run
    out = t["tmp"] / "projected.h5ad"
    p = subprocess.run([sys.executable, "-m", "tardis_exp.project", f"runs:/{t['run_id']}", str(t["new"]), str(out),
                        "--tracking-uri", t["uri"]], capture_output=True, text=True, timeout=300, cwd=t["tmp"])
    assert p.returncode == 0, p.stderr[-3000:]
    rid = p.stdout.split("projection run: ")[1].split()[0]
    proj = client.get_run(rid)
    assert proj.data.tags["tardis_exp.source_run"] == t["run_id"] and proj.info.status == "FINISHED"
    assert proj.data.metrics["n_spots"] == 625
    got = ad.read_h5ad(out)
    want = ad.read_h5ad(t["new"])
    tardis_exp.project(want, t["run_dir"])
    # the MLflow source reads the model's programs; the folder the run's result: the same spectra
    assert np.array_equal(got.uns["nmf_projected"]["spectra"], want.uns["nmf_projected"]["spectra"])
    assert np.array_equal(got.obs["nmf_projected_program"].to_numpy(), want.obs["nmf_projected_program"].to_numpy())


# ----------------------------------------------------------------------------- bad input


def test_bad_sources_and_data_give_one_clear_line(synthetic_runs, tmp_path):
    s = synthetic_runs
    new = s["data"][s["held"]].copy()
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(InputError, match=r"has no programs: no result.h5ad"):
        tardis_exp.project(new, empty)
    # a result without the consensus stage's spectra
    pre = tmp_path / "pre_run"
    pre.mkdir()
    ad.AnnData(X=np.ones((3, 2), np.float32)).write_h5ad(pre / "result.h5ad")
    with pytest.raises(InputError, match=r"has no programs: its result has no uns\['nmf_consensus'\]"):
        tardis_exp.project(new, pre)
    with pytest.raises(InputError, match=r"neither a run folder nor an MLflow run URI"):
        tardis_exp.project(new, tmp_path / "nowhere")
    db = f"sqlite:///{tmp_path / 'm.db'}"
    with pytest.raises(InputError, match=r"runs:/0123abc does not resolve in sqlite:///"):
        tardis_exp.project(new, "runs:/0123abc", tracking_uri=db)
    other = ad.AnnData(X=sp.csr_matrix(np.ones((5, 3), np.float32)), var=pd.DataFrame(index=["a", "b", "c"]))
    with pytest.raises(InputError, match=r"shares no gene with the 500 genes"):
        tardis_exp.project(other, s["ref"])

    # program 0's heaviest genes removed until it loses more than half its weight
    programs = load_programs(s["ref"])
    w = programs.spectra[0] / programs.spectra[0].sum()
    order = np.argsort(-w)
    n_drop = int(np.searchsorted(np.cumsum(w[order]), 0.6)) + 1
    keep = new.var_names.difference(programs.genes[order[:n_drop]])
    lacking = new[:, keep].copy()
    with pytest.raises(InputError, match=rf"program 0 of .* of its weight on genes the new data lacks "
                                         rf"\({n_drop} of the run's 500 genes are missing\)") as e:
        tardis_exp.project(lacking, s["ref"])
    assert "\n" not in str(e.value)
    # under the threshold it runs, and reports the share lost per program
    few = new[:, new.var_names.difference(programs.genes[order[:1]])].copy()
    tardis_exp.project(few, s["ref"])
    mw = few.uns["nmf_projected"]["missing_weight"]
    assert mw[0] == pytest.approx(w[order[0]], rel=1e-5) and few.uns["nmf_projected"]["n_missing_genes"] == 1

    # the command: one line on stderr, exit status 2, nothing written
    out = tmp_path / "out.h5ad"
    new.write_h5ad(tmp_path / "new.h5ad")
    p = subprocess.run([sys.executable, "-m", "tardis_exp.project", str(empty), str(tmp_path / "new.h5ad"), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and not out.exists()
    assert p.stderr.strip().splitlines() == [f"tardis_exp.project: error: {empty} has no programs: no result.h5ad "
                                             "there (save_result=none, or not a run folder)"]


# ----------------------------------------------------------------------------- batch correction


def _paired(U, spectra, genes, truth: ad.AnnData, programs) -> tuple[list[float], float]:
    """Per planted program of ``programs``, the correlation of its planted usages with the
    usages of the fitted program paired to it by the spectra (Hungarian assignment on the
    correlation with the planted profiles over the run's genes, never on the usages); and
    the share of spots whose largest usage share is on the planted largest."""
    P = pd.DataFrame(truth.varm["true_programs"].T, columns=truth.var_names)[list(genes)].to_numpy()[programs]
    C = np.corrcoef(np.asarray(spectra, np.float64), P)[:len(spectra), len(spectra):]
    rows, cols = linear_sum_assignment(-C)
    T = truth.obsm["true_usage"][:, programs]
    r = [float(np.corrcoef(U[:, i], T[:, j])[0, 1]) for i, j in zip(rows, cols)]
    return r, float((U[:, rows].argmax(1) == T[:, cols].argmax(1)).mean())


def test_projection_repeats_the_runs_batch_correction(tmp_path):
    """A run on two sections (S1, S2) of a ``batch`` draw with preprocess.batch_correction=scale;
    a third (S3) is projected onto its programs after a strong technical factor of its own:
    every gene thinned to 10 % (binomial thinning of the counts) but P1's markers, i.e. P1's
    markers 10x up against every other gene, in every spot. Repeating the run's correction
    brings each gene of S3 to the run's mean; without it, P1's inflated markers are read as P1
    in every spot. Truth: the planted usages. Reference: a joint fit of the three sections,
    corrected together (what analysing everything at once gives). Margin: three standard
    errors of a correlation over n spots, 3 (1 - r^2) / sqrt(n - 1), and of a share over n
    spots, 3 sqrt(1/4 / n)."""
    import mlflow.pyfunc

    from tardis_exp.benchmark.families import draw, write_draw
    from tardis_exp.model import save_programs_model

    study = draw("batch", 3, max_spots=900, max_genes=500)  # 5 sections of 180 spots; P4 only in S0
    assert study.uns["benchmark"]["section_specific"] == {"program": 4, "section": "S0"}
    paths = {p.stem.rsplit("_", 1)[1]: p for p in write_draw(study, tmp_path / "draw")}
    new = ad.read_h5ad(paths["S3"])
    rng = np.random.default_rng(0)
    keep = np.where(new.var["true_program"] == "P1", 1.0, 0.1)
    C = new.X.tocsr().astype(np.int64)
    C.data = rng.binomial(C.data, keep[C.indices])
    new.X = sp.csr_matrix(C, dtype=np.float32)
    new.write_h5ad(tmp_path / "S3_thinned.h5ad")

    common = ["preprocess.batch_correction=scale", "preprocess.n_top_genes=null", "factorize.n_components=4",
              "consensus.min_clusters=4", "consensus.max_clusters=4"]
    ref = _run(tmp_path / "ref", "data=samples", f"data.paths=[{paths['S1']},{paths['S2']}]", *common)
    joint = _run(tmp_path / "joint", "data=samples",
                 f"data.paths=[{paths['S1']},{paths['S2']},{tmp_path / 'S3_thinned.h5ad'}]", *common)
    res = ad.read_h5ad(ref / "result.h5ad")
    # the recorded reference: the mean over S1, S2 of each gene's mean there, on the linear scale of
    # the normalized counts (normalize_total to 1e4 over the genes QC kept, here all of them)
    assert res.n_vars == study.n_vars
    own, xs = [], []
    for name in ("S1", "S2"):
        M = ad.read_h5ad(paths[name]).X.toarray().astype(np.float64)
        N = M / M.sum(1, keepdims=True) * 1e4
        own.append(N.mean(0))
        xs.append(N[N > 0])
    truth_mean = np.mean(own, axis=0)
    # float32: the row sum (gamma(genes)), log1p then expm1 (one rounding each, an absolute
    # error u log1p(x) in the log that expm1 turns into a relative one times (1 + x) / x);
    # a mean of non-negative values keeps the largest relative error of its terms
    u, lo, hi = 2.0**-24, min(x.min() for x in xs), max(x.max() for x in xs)
    rtol = gamma(study.n_vars) + u * (2 * (1 + np.log1p(hi)) * (1 + 1 / lo) + 4)
    np.testing.assert_allclose(res.var["batch_mean"].to_numpy(), truth_mean, rtol=rtol)

    shared = [0, 1, 2, 3]  # P4 is S0's alone
    spectra = res.uns["nmf_consensus"]["spectra"]
    with_c = tardis_exp.project(new, ref, copy=True)
    without = tardis_exp.project(new, ref, copy=True, repeat_batch_correction=False)
    r_with, acc_with = _paired(with_c.obsm["X_nmf_projected"], spectra, res.var_names, new, shared)
    r_without, acc_without = _paired(without.obsm["X_nmf_projected"], spectra, res.var_names, new, shared)
    jr = ad.read_h5ad(joint / "result.h5ad")
    on_new = (jr.obs["sample"] == "S3_thinned").to_numpy()
    r_joint, _ = _paired(jr.obsm["X_nmf_consensus"][on_new], jr.uns["nmf_consensus"]["spectra"], jr.var_names,
                         new, shared)
    n = new.n_obs
    se = lambda r: 3 * (1 - r**2) / np.sqrt(n - 1)  # noqa: E731
    worst_with, worst_without, worst_joint = min(r_with), min(r_without), min(r_joint)
    msg = f"with {np.round(r_with, 3)} ({acc_with:.3f}), without {np.round(r_without, 3)} ({acc_without:.3f}), " \
          f"joint {np.round(r_joint, 3)}"
    assert worst_with >= worst_joint - se(worst_joint), msg
    assert worst_with >= worst_without + se(worst_without), msg
    assert acc_with >= acc_without + 2 * 3 * np.sqrt(0.25 / n), msg

    # several new sections at once (sample_key=): each is corrected on its own, so S3's usages are
    # those of S3 projected alone, up to the refit's float32 trajectory on a larger matrix
    other = ad.read_h5ad(paths["S4"])
    both = ad.concat({"S3": new, "S4": other}, label="sample", index_unique="-")
    tardis_exp.project(both, ref, sample_key="sample")
    programs = load_programs(ref)
    _, present, _, Xn = programs.usages(new.X, new.var_names)
    U = with_c.obsm["X_nmf_projected"]
    bound = hals_trajectory_rtol(Xn, U, programs.spectra[:, present], programs.refit_max_iter)
    close(both.obsm["X_nmf_projected"][:new.n_obs], U, bound)
    # a run that does not record its means: one line, unless the repetition is declined
    old = load_programs(ref)
    old.batch_mean = None
    with pytest.raises(InputError, match=r"ran preprocess.batch_correction=scale but does not record its genes' "
                                         r"means over its samples \(var\['batch_mean'\]"):
        tardis_exp.project(new, old, copy=True)
    close(tardis_exp.project(new, old, copy=True, repeat_batch_correction=False).obsm["X_nmf_projected"],
          without.obsm["X_nmf_projected"], 0.0)

    # the run's pyfunc model applies the same correction (the whole input one section)
    model = save_programs_model(load_programs(ref), tmp_path / "model",
                                pd.DataFrame(np.ones((2, res.n_vars)), columns=list(res.var_names)))
    df = pd.DataFrame(new.X.toarray().astype(np.float64), index=new.obs_names, columns=new.var_names)
    pred = mlflow.pyfunc.load_model(str(model)).predict(df).to_numpy()
    close(pred, U, bound)
