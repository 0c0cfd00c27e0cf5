"""The batch-effect family of the benchmark, its evaluator, and preprocess.batch_correction.

The generator's truth is checked against the counts it drew (sampling error derived from the
negative-binomial model), the evaluator on usages built by hand with a known answer, the
correction on data whose batch factors are known exactly.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tardis_exp import benchmark as bm
from tardis_exp.batch import correct
from tardis_exp.errors import ConfigError, InputError
from tardis_exp.preprocess import preprocess

from float32_bounds import gamma

CAPS = {"max_spots": 600, "max_genes": 300}


@pytest.mark.parametrize("seed", [2, 3, 1001])
def test_batch_draw_truth(seed):
    a = bm.draw("batch", seed, **CAPS)
    info = a.uns["benchmark"]
    p = info["params"]
    S, k = p["n_sections"], info["planted_k"]
    assert 2 <= S <= 6 and k == p["n_shared"] + 1
    labels = [f"S{s}" for s in range(S)]
    assert list(a.obs["sample"].cat.categories) == labels
    sizes = a.obs["sample"].value_counts().reindex(labels).to_numpy()
    assert sizes.sum() == a.n_obs and sizes.max() - sizes.min() <= 1
    spec = info["section_specific"]
    assert spec == {"program": k - 1, "section": labels[p["specific_section"]]}
    U = a.obsm["true_usage"]
    inside = (a.obs["sample"] == spec["section"]).to_numpy()
    assert (U[~inside, spec["program"]] == 0).all() and U[inside, spec["program"]].max() > 0.5
    codes = a.obs["sample"].cat.codes.to_numpy()
    for s in range(S):  # every shared program holds a domain of every section; coordinates overlap
        assert (U[codes == s, : k - 1].max(0) > 0.5).all()
        assert a.obsm["spatial"][codes == s].min(0).tolist() == [0.0, 0.0]
    assert a.obs_names.is_unique

    # the batch factors are in the counts: per section and gene, the summed counts over the
    # summed expected counts without the factor estimate the factor; z-scores from the
    # negative-binomial variance (mu + dispersion mu^2) are standard normal
    P, bg = a.varm["true_programs"].astype(np.float64), a.var["true_background"].to_numpy()
    b, lib = a.obs["true_background"].to_numpy()[:, None], a.obs["true_library"].to_numpy()[:, None]
    mu0 = lib * ((1 - b) * (U.astype(np.float64) @ P.T) + b * bg[None, :])
    F = a.varm["true_batch_factor"]
    assert F.shape == (a.n_vars, S)
    X = a.X.toarray().astype(np.float64)
    z, z_without = [], []
    for s in range(S):
        rows = codes == s
        mu = mu0[rows] * F[:, s]
        var = (mu + p["dispersion"] * mu**2).sum(0)
        z.append((X[rows].sum(0) - mu.sum(0)) / np.sqrt(var))
        z_without.append((X[rows].sum(0) - mu0[rows].sum(0)) / np.sqrt(var))
    z, z_without = np.concatenate(z), np.concatenate(z_without)
    n = z.size
    # mean z^2 of n standard normals: 1 +- sqrt(2/n) (one sd); 6 sd leaves room for the skew of small sums
    assert abs(np.mean(z**2) - 1) < 6 * np.sqrt(2 / n), np.mean(z**2)
    # the same counts against no factor: far off (the factors' sd is >= 0.1 on the log scale)
    assert np.mean(z_without**2) > 1 + 20 * np.sqrt(2 / n)
    # and the factors are what the design says: log-normal with sd batch_sd
    assert abs(np.log(F).std() / p["batch_sd"] - 1) < 6 / np.sqrt(2 * F.size)


def test_batch_draw_caps_bound_all_sections():
    a = bm.draw("batch", 5, max_spots=120, max_genes=150)
    assert a.n_obs <= 120 and a.n_vars <= 150
    assert a.obs["sample"].nunique() == a.uns["benchmark"]["params"]["n_sections"]


def test_write_makes_one_readable_h5ad_per_section(tmp_path, capsys):
    from tardis_exp.data import load_data

    assert bm.main(["--family", "batch", "--draws", "1", "--seed-start", "2", "--max-spots", "300",
                    "--max-genes", "200", "--write", str(tmp_path)]) == []
    full = bm.draw("batch", 2, max_spots=300, max_genes=200)
    labels = list(full.obs["sample"].cat.categories)
    paths = sorted(tmp_path.glob("*.h5ad"))
    assert [p.name for p in paths] == [f"batch_2_{s}.h5ad" for s in labels]
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    for s, path in zip(labels, paths):
        part = load_data({"source": "h5ad", "path": str(path), "backend": "memory", "chunk_rows": 50000})
        rows = (full.obs["sample"] == s).to_numpy()
        np.testing.assert_array_equal(part.X.toarray(), full.X[rows].toarray())
        assert list(part.obs_names) == list(full.obs_names[rows])
        assert "sample" not in part.obs  # the file is the sample (data=samples labels it by the file)
        np.testing.assert_array_equal(part.obsm["true_usage"], full.obsm["true_usage"][rows])
        assert part.uns["benchmark"]["section_specific"]["section"] == full.uns["benchmark"]["section_specific"][
            "section"]
    # the sections as one study again (data=samples): the draw's counts, labelled by file
    study = load_data({"source": "samples", "paths": [str(p) for p in paths], "names": None, "sample_key": "sample",
                       "genome": None, "var_names": "gene_symbols", "count_file": "filtered_feature_bc_matrix.h5",
                       "backend": "memory", "chunk_rows": 50000})
    assert list(study.obs["sample"].cat.categories) == [p.stem for p in paths]
    for s, path in zip(labels, paths):
        rows = (full.obs["sample"] == s).to_numpy()
        np.testing.assert_array_equal(study[(study.obs["sample"] == path.stem).to_numpy()].X.toarray(),
                                      full.X[rows].toarray())


def _study(split=False, specific_spread=False):
    """Two sections, three shared programs and one in section S1 only; the 'found' usages are the
    planted ones (plus noise), program 0 split into one copy per section when ``split``."""
    rng = np.random.default_rng(0)
    n = 400
    codes = np.repeat([0, 1], n // 2)
    T = rng.dirichlet(np.ones(3) * 0.3, size=n)
    T = np.concatenate([T, np.zeros((n, 1))], 1)
    s1 = codes == 1
    T[s1, 3] = rng.uniform(0, 1, s1.sum()) ** 3
    T /= T.sum(1, keepdims=True)
    U = T + rng.uniform(0, 0.02, T.shape)
    U[:, 3] = T[:, 3]  # the section-only program found exactly: its usage share in S1 is 1
    if specific_spread:  # the found copy of the section-only program used everywhere at random
        U[:, 3] = rng.uniform(0, 1, n)
    if split:
        U = np.concatenate([U[:, :1] * (codes == 0)[:, None], U[:, :1] * s1[:, None], U[:, 1:]], 1)
    a = ad.AnnData(X=np.zeros((n, 2), np.float32),
                   obs=pd.DataFrame({"sample": pd.Categorical.from_codes(codes, ["S0", "S1"])},
                                    index=[f"c{i}" for i in range(n)]))
    a.obsm["true_usage"] = T
    a.obsm["X_nmf_consensus"] = U
    truth = {"planted_k": 4, "section_specific": {"program": 3, "section": "S1"}}
    return a, truth


def test_evaluator_counts_a_batch_split_program_twice():
    a, truth = _study()
    r = bm.evaluate_batch(a, truth)
    assert r["found_per_planted"] == [1, 1, 1, 1] and r["shared_found_once"] and r["specific_found"]
    assert r["specific_share"] == 1.0
    # the top decile of its spots by usage: 40 spots, all in S1 (the only spots with usage > 0)
    assert r["specific_top_share"] == 1.0
    # no uns['nmf_samples'] (score stage without per-sample shares): reported missing, not guessed
    assert r["specific_flagged"] is None and r["flags_missing"]

    a, truth = _study(split=True)
    r = bm.evaluate_batch(a, truth)
    assert r["match"][:2] == [0, 0] and r["found_per_planted"] == [2, 1, 1, 1]
    assert not r["shared_found_once"]

    a, truth = _study()
    a.uns["nmf_samples"] = {"samples": ["S0", "S1"], "sample_specific": np.array([False, False, False, True])}
    assert bm.evaluate_batch(a, truth)["specific_flagged"] is True
    a.uns["nmf_samples"]["sample_specific"] = np.array([False, False, True, False])
    assert bm.evaluate_batch(a, truth)["specific_flagged"] is False
    # a found program that does not follow the planted usage matches nothing: not found, not flagged
    a, truth = _study(specific_spread=True)
    a.uns["nmf_samples"] = {"samples": ["S0", "S1"], "sample_specific": np.array([False, False, False, True])}
    r = bm.evaluate_batch(a, truth)
    assert r["match"][3] == -1 and not r["specific_found"] and r["specific_flagged"] is False


def _two_sections(log: bool, sparse: bool):
    """Section S1 = section S0 times a known factor per gene (linear scale)."""
    rng = np.random.default_rng(1)
    L0 = rng.gamma(1.0, 2.0, size=(50, 30)) * (rng.random((50, 30)) < 0.7)
    f = rng.lognormal(0.0, 0.5, size=30)
    L = np.concatenate([L0, L0 * f], 0).astype(np.float32)
    X = np.log1p(L) if log else L
    obs = pd.DataFrame({"s": pd.Categorical(["a"] * 50 + ["b"] * 50)}, index=[f"c{i}" for i in range(100)])
    return ad.AnnData(X=sp.csr_matrix(X) if sparse else X, obs=obs)


@pytest.mark.parametrize("log", [True, False])
@pytest.mark.parametrize("sparse", [True, False])
def test_scale_correction_removes_known_gene_factors(log, sparse):
    a = _two_sections(log, sparse)
    correct(a, "s", "scale", "log1p" if log else "total")
    X = a.X.toarray() if sp.issparse(a.X) else a.X
    assert sp.issparse(a.X) == sparse and X.dtype == np.float32 and (X >= 0).all()
    L = np.expm1(X.astype(np.float64)) if log else X.astype(np.float64)
    # both halves become L0 (1 + f) / 2: equal within the float32 roundings of expm1/log1p and
    # of the means over 50 spots (relative gamma(50) each, a handful of them)
    np.testing.assert_allclose(L[:50], L[50:], rtol=8 * gamma(50) + 16 * np.finfo(np.float32).eps, atol=0)
    # a section without factors is left alone
    b = _two_sections(log, sparse)
    b.obs["s"] = pd.Categorical(["a"] * 100)
    before = b.X.copy()
    correct(b, "s", "scale", "log1p" if log else "total")
    np.testing.assert_allclose((b.X.toarray() if sparse else b.X), (before.toarray() if sparse else before),
                               rtol=8 * gamma(100) + 16 * np.finfo(np.float32).eps, atol=0)


def test_batch_correction_needs_a_sample_key():
    a = bm.draw("batch", 2, max_spots=200, max_genes=150)
    with pytest.raises(ConfigError, match="preprocess.batch_correction=scale needs .*data.sample_key"):
        preprocess(a, batch_correction="scale")
    with pytest.raises(InputError, match="data.sample_key='batch' is not a column of obs"):
        preprocess(a, batch_correction="scale", sample_key="batch")
    with pytest.raises(ConfigError, match="preprocess.batch_correction='harmony' is unknown"):
        preprocess(a, batch_correction="harmony")
    out = preprocess(a, batch_correction="scale", sample_key="sample", n_top_genes=None)
    assert out.uns["preprocess"]["batch_correction"] == "scale"
    ref = preprocess(a, n_top_genes=None)
    assert not np.allclose(out.X.toarray(), ref.X.toarray())


def test_runner_reports_the_batch_rates(capsys):
    rows = bm.main(["--family", "batch", "--draws", "1", "--seed-start", "2", "--max-spots", "400",
                    "--max-genes", "300"])
    out = capsys.readouterr().out
    r = rows[0]["batch"]
    assert len(r["found_per_planted"]) == rows[0]["planted_k"] == 6
    once = int(r["shared_found_once"])
    assert f"batch: each shared program found once {once}/1 = {once:.2f}" in out
    # the runner passes the sample column to the score stage: the flag is measured, not guessed
    assert r["flags_missing"] is False
    flagged = int(bool(r["specific_flagged"]))
    assert f"section-only program flagged sample_specific {flagged}/1 = {flagged:.2f}" in out
