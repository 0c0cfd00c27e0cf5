"""Several samples as one study (issue 25): ``data=samples`` and ``data.sample_key``.

Every input is a real file written here (h5ad from the generator with different seeds, a
Space Ranger folder, a 10x matrix folder); the concatenated study is compared with what was
written, the HVG selection with scanpy's ``batch_key`` against a gene that differs only
between the files, the MLflow dataset inputs of a real CLI run against each file's own
digest, and the stage cache's keys against a change to either input.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from tardis_exp.data import check_data, digest, load_data
from tardis_exp.errors import ConfigError, InputError
from tardis_exp.preprocess import preprocess
from tardis_exp.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
EXE = shutil.which("tardis-exp") or ""
# small and fast, as tests/test_cli.py's SMALL
FAST = ["preprocess.n_top_genes=60", "factorize.n_components=4", "factorize.n_replicates=3", "factorize.max_iter=100",
        "consensus.min_clusters=2", "consensus.max_clusters=3", "consensus.n_resamples=10",
        "score.n_cluster_genes=10", "tracking.log_plots=false"]


def _section(seed: int, n_spots: int = 100, n_genes: int = 80) -> ad.AnnData:
    return make_synthetic(n_spots=n_spots, n_genes=n_genes, n_programs=3, n_markers=10, seed=seed)


def _write_two(tmp_path: Path) -> tuple[Path, Path, ad.AnnData, ad.AnnData]:
    """a.h5ad (80 genes) and b.h5ad (genes 5.. of another draw, in reverse order, 120 spots)."""
    a = _section(1)
    b = _section(2, n_spots=120)
    b = b[:, b.var_names[5:][::-1]].copy()
    pa, pb = tmp_path / "a.h5ad", tmp_path / "b.h5ad"
    a.write_h5ad(pa)
    b.write_h5ad(pb)
    return pa, pb, a, b


def _dense(M):
    return M.toarray() if sp.issparse(M) else np.asarray(M)


def _study(paths, **extra):
    return {"source": "samples", "paths": [str(p) for p in paths], "names": None, "sample_key": "sample", **extra}


def test_samples_are_concatenated_with_their_labels_coordinates_and_common_genes(tmp_path):
    from test_data import _truth, write_visium

    pa, pb, a, b = _write_two(tmp_path)
    # a Space Ranger folder whose genes are gene3..gene42 of the same naming
    X, bc, ids, _ = _truth(5)
    vnames = [f"gene{j}" for j in range(3, 3 + X.shape[1])]
    pos, sf = write_visium(tmp_path / "sec3", X, bc, ids, vnames)
    out = load_data(_study([pa, pb, tmp_path / "sec3"], names=["A", "B", "V"]))

    common = [g for g in a.var_names if g in set(b.var_names) and g in set(vnames)]
    assert list(out.var_names) == common  # intersected, in the first input's order
    assert isinstance(out.obs["sample"].dtype, __import__("pandas").CategoricalDtype)
    assert list(out.obs["sample"].cat.categories) == ["A", "B", "V"]
    expect_names = [f"{n}-A" for n in a.obs_names] + [f"{n}-B" for n in b.obs_names] + [f"{n}-V" for n in bc]
    assert list(out.obs_names) == expect_names
    for name, src, rows in (("A", a, a.obs_names), ("B", b, b.obs_names)):
        part = out[out.obs["sample"] == name]
        assert part.n_obs == len(rows)
        np.testing.assert_array_equal(_dense(part.X), _dense(src[:, common].X))
        np.testing.assert_array_equal(part.obsm["spatial"], src.obsm["spatial"])  # each section's own
    v = out[out.obs["sample"] == "V"]
    gi = [vnames.index(g) for g in common]
    np.testing.assert_array_equal(_dense(v.X), X[:, gi])
    np.testing.assert_array_equal(v.obsm["spatial"], pos.loc[bc, ["pxl_col_in_fullres", "pxl_row_in_fullres"]]
                                  .to_numpy(float))
    # the library under the sample's name (squidpy: uns['spatial'][library_id], library_key='sample')
    assert list(out.uns["spatial"]) == ["V"] and out.uns["spatial"]["V"]["scalefactors"] == sf
    # names from the files when none are given; the reader from the suffix or the folder
    out2 = load_data(_study([pb, pa]))
    assert list(out2.obs["sample"].cat.categories) == ["b", "a"]


def test_sample_key_on_one_file_becomes_categorical(tmp_path):
    s = _section(3)
    s.obs["batch"] = np.repeat([1, 2], 50)
    s.write_h5ad(tmp_path / "s.h5ad")
    out = load_data({"source": "h5ad", "path": str(tmp_path / "s.h5ad"), "sample_key": "batch"})
    assert isinstance(out.obs["batch"].dtype, __import__("pandas").CategoricalDtype)
    assert list(out.obs["batch"].cat.categories) == ["1", "2"]
    assert (out.obs["batch"].value_counts() == 50).all()


def _nb_section(seed: int, batch_mean: float, n: int = 200, g: int = 100) -> ad.AnnData:
    """Negative-binomial counts: genes 0..g-2 with means 2..50 and their own overdispersion
    (0.02..0.3, the same in every section); the last gene nearly Poisson (overdispersion 0.05)
    around ``batch_mean``, or absent (``0``)."""
    rng = np.random.default_rng(seed)
    means = np.exp(np.linspace(np.log(2), np.log(50), g - 1))
    alpha = np.random.default_rng(99).uniform(0.02, 0.3, g - 1)
    mu = means * rng.lognormal(0, 0.1, (n, 1))  # library sizes
    X = rng.negative_binomial(1 / alpha, 1 / (1 + alpha * mu))
    last = rng.negative_binomial(20, 20 / (20 + batch_mean), n) if batch_mean else np.zeros(n, int)
    out = ad.AnnData(sp.csr_matrix(np.column_stack([X, last]).astype(np.float32)))
    out.var_names = [f"g{j}" for j in range(g)]
    out.obs_names = [f"s{i}" for i in range(n)]
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_hvg_selection_is_per_sample(tmp_path, seed):
    """The last gene is absent from one file and flat (less dispersed than any other gene of
    its mean) in the other: it varies only *between* the files. Over the pooled spots its
    dispersion (half zeros, half ~20) is the largest of its mean bin, so it is selected;
    per sample (scanpy's batch_key) it is variable in neither, so it is not."""
    _nb_section(2 * seed, 0).write_h5ad(tmp_path / "a.h5ad")
    _nb_section(2 * seed + 1, 20).write_h5ad(tmp_path / "b.h5ad")
    study = load_data(_study([tmp_path / "a.h5ad", tmp_path / "b.h5ad"]))
    pooled = preprocess(study, n_top_genes=20)
    per_sample = preprocess(study, n_top_genes=20, sample_key="sample")
    assert "g99" in pooled.var_names
    assert "g99" not in per_sample.var_names and per_sample.n_vars == 20
    assert per_sample.var["highly_variable_nbatches"].min() >= 1  # scanpy's batch_key ran
    assert per_sample.uns["preprocess"]["n_samples"] == 2


def test_every_data_preset_declares_sample_key():
    """The key every data config has (params.DataParams), with its declared default; data=samples sets it."""
    from tardis_exp import params as P

    declared = P.defaults(P.DataParams)
    for f in sorted((ROOT / "conf" / "data").glob("*.yaml")):
        cfg = yaml.safe_load(f.read_text())
        for k, v in declared.items():
            assert k in cfg, (f.name, k)
            assert cfg[k] == ("sample" if cfg["source"] == "samples" and k == "sample_key" else v), (f.name, k)
    assert "`data.sample_key`" in P.describe("data")


def test_cache_keys_on_every_input(tmp_path):
    from tardis_exp.cache import StageCache, key_inputs, source_key
    from tardis_exp.store import make_key

    pa, pb, a, b = _write_two(tmp_path)
    cfg = {"data": _study([pa, pb]), "preprocess": {"n_top_genes": 60}}
    cache = StageCache(tmp_path / "cache", enabled=True)

    def keys():
        inp = cache.load_input(cfg, load=lambda: load_data(cfg["data"]))
        if inp.input_digest is None:
            from tardis_exp.cache import input_digest

            inp.input_digest = input_digest(inp.adata, inp.digest, cfg["preprocess"])
        return (source_key(cfg["data"], cfg["preprocess"]),
                make_key(key_inputs("preprocess", inp.input_digest, cfg)), inp)

    s0, k0, i0 = keys()
    assert [s["name"] for s in i0.samples] == ["a", "b"]
    s1, k1, i1 = keys()  # the memo: not read again, the samples recorded
    assert i1.from_memo and (s1, k1) == (s0, k0) and i1.samples == i0.samples
    # either input rewritten with other counts: another source key and another content key
    for path, sec, seed in ((pb, b, 7), (pa, a, 8)):
        changed = sec.copy()
        changed.X = sp.csr_matrix(_dense(changed.X) + np.random.default_rng(seed).poisson(1, changed.shape))
        changed.write_h5ad(path)
        s2, k2, i2 = keys()
        assert s2 != s0 and k2 != k0 and not i2.from_memo
        s0, k0 = s2, k2
    # one file with data.sample_key: the per-sample selection is in every stage's key
    one = {"data": {"source": "h5ad", "path": str(pa), "sample_key": None}, "preprocess": {}, "factorize": {},
           "consensus": {}}
    keyed = {**one, "data": {**one["data"], "sample_key": "true_domain"}}
    for stage in ("preprocess", "factorize", "consensus"):
        assert make_key(key_inputs(stage, "d", one)) != make_key(key_inputs(stage, "d", keyed))
    assert source_key(one["data"], {}) != source_key(keyed["data"], {})


def _cli(tmp_path, *args, timeout=600):
    env = {**os.environ, "TARDIS_EXP_PROGRESS": "0", "MPLBACKEND": "Agg"}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [EXE] if EXE else [sys.executable, "-m", "tardis_exp"]
    return subprocess.run([*cmd, *args, f"paths.root_dir={tmp_path}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_study_logs_one_dataset_input_per_sample(tmp_path):
    from mlflow import MlflowClient

    pa, pb, a, b = _write_two(tmp_path)
    p = _cli(tmp_path, "data=samples", "data.paths=[a.h5ad,b.h5ad]", *FAST)
    assert p.returncode == 0, p.stderr[-3000:]
    (result,) = (tmp_path / "outputs").rglob("result.h5ad")
    res = ad.read_h5ad(result)
    assert list(res.obs["sample"].cat.categories) == ["a", "b"]
    assert (res.obs["sample"].value_counts().sort_index() == [a.n_obs, b.n_obs]).all()
    assert res.uns["preprocess"]["sample_key"] == "sample"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("tardis-exp").experiment_id
    (parent,) = client.search_runs([exp], "tags.`mlflow.parentRunId` IS NULL")
    ds = {d.dataset.name: d.dataset for d in parent.inputs.dataset_inputs}
    assert set(ds) == {"a", "b"}
    common = [g for g in a.var_names if g in set(b.var_names)]
    for name, sec, path in (("a", a, pa), ("b", b, pb)):
        # each file's own spots over the study's genes, named as the study names them
        own = sec[:, common].copy()
        own.obs_names = [f"{n}-{name}" for n in own.obs_names]
        assert ds[name].digest == digest(own)
        assert json.loads(ds[name].profile) == {"n_obs": sec.n_obs, "n_vars": len(common)}
        assert str(path.resolve()) in ds[name].source
    assert parent.data.tags["data.n_samples"] == "2" and parent.data.tags["data.sample_key"] == "sample"


@pytest.mark.slow
def test_sweep_over_a_study(tmp_path):
    """The Optuna sweep preset runs a two-file study unchanged; the second trial reads the
    input from the stage cache's memo (the cache is on in the preset)."""
    from mlflow import MlflowClient

    _write_two(tmp_path)
    p = _cli(tmp_path, "-m", "sweep=k_range", "data=samples", "data.paths=[a.h5ad,b.h5ad]", *FAST,
             "hydra.sweeper.n_trials=2", "hydra.sweeper.mlflow.log_plots=false",
             "hydra.sweeper.params={factorize.n_components:'int(interval(3, 4))'}",
             f"hydra.sweep.dir={tmp_path}/multirun/s", "hydra.sweeper.study_name=s")
    assert p.returncode == 0, p.stderr[-4000:]
    metrics = [yaml.safe_load((tmp_path / "multirun" / "s" / str(n) / "metrics.yaml").read_text()) for n in range(2)]
    assert all(m["best_k"] >= 2 for m in metrics)
    assert metrics[1]["cache_hits"] >= 1  # the study's preprocessing reused by the second trial
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("tardis-exp").experiment_id
    trials = client.search_runs([exp], "tags.`optuna_trial` != ''")
    assert len(trials) == 2
    for r in trials:  # each trial's inputs: the two samples, from the memo on the second
        assert sorted(d.dataset.name for d in r.inputs.dataset_inputs) == ["a", "b"]


@pytest.mark.parametrize("case", ["no_common_genes", "missing_key", "duplicate_names", "duplicate_file_names",
                                  "missing_path", "unknown_format", "key_taken", "dask"])
def test_bad_input_is_one_clear_error(tmp_path, case):
    pa, pb, a, b = _write_two(tmp_path)
    if case == "no_common_genes":
        c = a.copy()
        c.var_names = [f"G{j}" for j in range(c.n_vars)]
        c.write_h5ad(tmp_path / "c.h5ad")
        with pytest.raises(InputError, match=r"data.paths: the samples share no gene name: .*a.h5ad.*c.h5ad"):
            load_data(_study([pa, tmp_path / "c.h5ad"]))
    elif case == "missing_key":
        with pytest.raises(InputError, match=r"data.sample_key='batch' is not an obs column of data.path=.*a.h5ad; "
                                             r"its obs columns: \['true_domain'\]"):
            load_data({"source": "h5ad", "path": str(pa), "sample_key": "batch"})
    elif case == "duplicate_names":
        with pytest.raises(ConfigError, match="data.names: duplicate sample name 'x'"):
            check_data(_study([pa, pb], names=["x", "x"]))
    elif case == "duplicate_file_names":
        (tmp_path / "d").mkdir()
        shutil.copy(pa, tmp_path / "d" / "a.h5ad")
        with pytest.raises(ConfigError, match=r"duplicate sample name 'a' \(data.paths\[0\].*data.paths\[1\]"):
            check_data(_study([pa, tmp_path / "d" / "a.h5ad"]))
    elif case == "missing_path":
        with pytest.raises(InputError, match=r"data.paths\[1\]: .*nope.h5ad does not exist"):
            check_data(_study([pa, tmp_path / "nope.h5ad"]))
    elif case == "unknown_format":
        (tmp_path / "x.csv").write_text("a,b\n")
        with pytest.raises(InputError, match=r"data.paths\[1\]: cannot tell how to read .*x.csv; give an .h5ad"):
            check_data(_study([pa, tmp_path / "x.csv"]))
    elif case == "key_taken":
        with pytest.raises(InputError, match=r"data.paths\[0\]: .*a.h5ad already has an obs column 'true_domain'"):
            load_data(_study([pa, pb], sample_key="true_domain"))
    elif case == "dask":
        with pytest.raises(ConfigError, match="data.sample_key=sample selects genes per sample, which "
                                              "data.backend=dask does not do"):
            check_data(_study([pa, pb], backend="dask"))


def test_a_sample_left_with_too_few_spots_is_refused(tmp_path):
    pa, pb, a, b = _write_two(tmp_path)
    b = b.copy()
    X = _dense(b.X)
    X[5:] = 0  # QC (min_counts=1) leaves 5 of its 120 spots
    b.X = sp.csr_matrix(X)
    b.write_h5ad(pb)
    study = load_data(_study([pa, pb]))
    with pytest.raises(InputError, match=r"sample 'b' \(obs\['sample'\]\) has 5 spots left after QC "
                                         r"\(preprocess.min_counts=1, of 120\), fewer than "
                                         r"preprocess.min_spots_per_sample=10"):
        preprocess(study, n_top_genes=30, sample_key="sample")
    assert preprocess(study, n_top_genes=30, sample_key="sample", min_spots_per_sample=5).n_obs == 105


def test_bad_input_from_the_cli_is_one_line_with_status_2(tmp_path):
    pa, pb, a, b = _write_two(tmp_path)
    for args, needle in ((["data.paths=[a.h5ad,nope.h5ad]"], "data.paths[1]: nope.h5ad does not exist"),
                         (["data.paths=[a.h5ad,b.h5ad]", "data.sample_key=true_domain"],
                          "already has an obs column 'true_domain'")):
        p = _cli(tmp_path, "data=samples", *args, *FAST, "tracking.enabled=false", timeout=300)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "[INFO]" not in ln and "[WARNING]" not in ln]
        assert p.returncode == 2, p.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith("tardis-exp: error: ") and needle in lines[0], p.stderr
        assert "Traceback" not in p.stderr
    p = _cli(tmp_path, "data=h5ad", "data.path=a.h5ad", "data.sample_key=batch", *FAST, "tracking.enabled=false")
    assert p.returncode == 2 and "data.sample_key='batch' is not an obs column" in p.stderr, p.stderr[-2000:]


def _with_raw(sec: ad.AnnData, extra: str) -> ad.AnnData:
    """``sec``'s counts (plus one gene ``extra`` of its own) in ``.raw``; ``X`` log-normalized
    over the counts' genes less the last five (what a published AnnData often holds)."""
    rng = np.random.default_rng(len(extra))
    counts = np.column_stack([_dense(sec.X), rng.poisson(3, sec.n_obs)]).astype(np.float32)
    raw = ad.AnnData(sp.csr_matrix(counts), obs=sec.obs.copy(), var=pd.DataFrame(
        index=[*sec.var_names, extra]))
    out = raw[:, raw.var_names[:-6]].copy()
    lib = counts.sum(1, keepdims=True)
    out.X = sp.csr_matrix(np.log1p(_dense(out.X) / lib * 1e4).astype(np.float32))
    out.raw = raw
    return out


def test_use_raw_reads_the_joined_raw_counts_of_a_study(tmp_path):
    """preprocess.use_raw=true on data=samples: the run on the inputs' ``.raw`` (joined by
    the reader) equals the run on one file holding the raw counts joined here by hand (the
    genes every ``.raw`` has, in the first file's order; the spots named as the study names
    them): the same result matrix, spectra and usages, bit for bit."""
    from conftest import compose_config
    from tardis_exp.pipeline import run

    pa, pb, a, b = _write_two(tmp_path)
    ra, rb = _with_raw(a, "only_a"), _with_raw(b, "only_b")
    ra.write_h5ad(pa)
    rb.write_h5ad(pb)
    genes = [g for g in ra.raw.var_names if g in set(rb.raw.var_names)]
    parts = []
    for name, sec in (("a", ra), ("b", rb)):
        part = ad.AnnData(sp.csr_matrix(_dense(sec.raw[:, genes].X)), var=pd.DataFrame(index=genes))
        part.obs_names = [f"{n}-{name}" for n in sec.obs_names]
        part.obs["sample"] = name
        parts.append(part)
    joined = ad.AnnData(sp.vstack([p.X for p in parts]).tocsr(), obs=pd.concat([p.obs for p in parts]),
                        var=parts[0].var)
    joined.obs["sample"] = joined.obs["sample"].astype("category")
    joined.write_h5ad(tmp_path / "joined.h5ad")

    study = load_data(_study([pa, pb]))
    assert study.raw is not None and list(study.raw.var_names) == genes  # only_a, only_b dropped
    np.testing.assert_array_equal(_dense(study.raw.X), _dense(joined.X))

    fast = [*FAST, "tracking.enabled=false", "data.sample_key=sample"]
    results = []
    for name, data in (("study", ["data=samples", f"data.paths=[{pa},{pb}]", "preprocess.use_raw=true"]),
                       ("joined", ["data=h5ad", f"data.path={tmp_path / 'joined.h5ad'}"])):
        cfg = compose_config(tmp_path / name, [*data, *fast])
        run(cfg, tmp_path / name / "run")
        results.append(ad.read_h5ad(tmp_path / name / "run" / "result.h5ad"))
    s, j = results
    assert list(s.obs_names) == list(j.obs_names) and list(s.var_names) == list(j.var_names)
    np.testing.assert_array_equal(_dense(s.X), _dense(j.X))
    np.testing.assert_array_equal(s.uns["nmf_consensus"]["spectra"], j.uns["nmf_consensus"]["spectra"])
    np.testing.assert_array_equal(s.obsm["X_nmf_consensus"], j.obsm["X_nmf_consensus"])


def test_use_raw_names_the_inputs_without_raw(tmp_path):
    """Only some inputs have ``.raw``: one line naming those without and the key, from
    preprocess before any compute."""
    pa, pb, a, b = _write_two(tmp_path)
    _with_raw(a, "only_a").write_h5ad(pa)
    study = load_data(_study([pa, pb]))
    assert study.raw is None
    with pytest.raises(InputError, match=r"^preprocess.use_raw=true but 1 of the data.paths have no .raw: "
                                         r"\S*b.h5ad$"):
        preprocess(study, use_raw=True, sample_key="sample")
    assert preprocess(study, sample_key="sample").n_obs == a.n_obs + b.n_obs  # X is still read
