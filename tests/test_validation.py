"""K selection, spot labels, constraints and benchmark data (issue 11).

The K rules are checked on curves whose answer is known by construction, and on Brunet et
al. (2004)'s leukemia set against its published answer (a reduced run: 20 restarts).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from tardis_exp.consensus import consensus, half_spread, select_k
from tardis_exp.errors import ConfigError

KS = [2, 3, 4, 5]


# ------------------------------------------------------------------ K rules on known curves


def test_brunet_rule_takes_the_last_k_before_the_significant_drop():
    # Brunet's leukemia shape (issue 11): high through K = 3, drop at K = 4
    coph = {"cophenetic": [0.9972, 0.9967, 0.9857, 0.9917]}
    se = {"cophenetic": [0.0016, 0.0021, 0.0022, 0.0008]}
    k, info = select_k(KS, coph, "brunet", spread=se, return_info=True)
    assert k == 3
    # the same rule with a fixed tolerance wider than the whole curve (the old 0.02) finds no
    # drop; it must not drift to the largest K but take the best value
    assert select_k(KS, coph, "brunet", tolerance=0.02) == 2
    # "cophenetic" is Brunet's rule too
    assert select_k(KS, coph, "cophenetic", spread=se) == 3


def test_a_drop_within_the_measured_noise_is_not_a_drop():
    coph = {"cophenetic": [0.990, 0.995, 0.985, 0.980]}
    small = {"cophenetic": [0.001] * 4}
    noisy = {"cophenetic": [0.01] * 4}
    assert select_k(KS, coph, "brunet", spread=small) == 3  # 0.995 -> 0.985 is 3.5 se
    k, info = select_k(KS, coph, "brunet", spread=noisy, return_info=True)
    assert k == 3 and info["margin"] < 1  # best value, but the data do not separate it


def test_flat_curve_gives_the_smallest_k_and_says_it_cannot_separate():
    flat = {"cophenetic": [1.0, 1.0, 1.0, 1.0], "pac": [0.0, 0.0, 0.0, 0.0]}
    for rule in ("brunet", "pac"):
        k, info = select_k(KS, flat, rule, return_info=True)
        assert k == 2
        assert info["runner_up_k"] != 2 and info["margin"] <= 0


def test_k_the_statistic_cannot_separate_are_told_apart_by_silhouette():
    # method=components at rank 3 on the leukemia set: clusters into 2 (merged programs) and
    # into 3 are both perfectly stable (PAC 0), only the 3 clusters are distinct
    stats = {"pac": [0.0, 0.0], "silhouette": [0.68, 0.9975]}
    k, info = select_k([2, 3], stats, "pac", return_info=True)
    assert k == 3 and info["runner_up_k"] == 2 and info["margin"] < 1
    # a significant change still decides before the silhouette does
    stats = {"pac": [0.0, 0.2, 0.0], "silhouette": [0.1, 0.2, 0.9]}
    assert select_k([2, 3, 4], stats, "pac", spread={"pac": [0.01] * 3}) == 2


def test_components_take_the_largest_stable_admissible_k():
    # method=components: PAC 0 at K = 2 (two merged programs, stable) and at the true K = 6;
    # the first-change rule would stop at 2, the largest stable admissible K is 6
    ks = [2, 3, 4, 5, 6, 7, 8]
    pac = {"pac": [0.0, 0.12, 0.2, 0.07, 0.0, 0.005, 0.016]}
    se = {"pac": [0.0, 0.01, 0.02, 0.007, 0.0, 0.0008, 0.0009]}
    assert select_k(ks, pac, "pac", spread=se) == 2
    adm = [True] * 5 + [False, False]  # K = 7, 8 need clusters that do not recur across replicates
    k, info = select_k(ks, pac, "pac", spread=se, admissible=adm, largest_stable=True, return_info=True)
    assert k == 6 and info["runner_up_k"] == 7 and info["margin"] > 1
    # without the admissibility bound a PAC that stays within its noise may go further, never past it
    assert select_k(ks, pac, "pac", spread=se, largest_stable=True) == 6


def _replicate_items(programs_per_replicate, noise_per_replicate, R):
    """Item -> (replicate, true program or -1 for a noise component), as a factorization makes them."""
    rep, prog = [], []
    for r in range(R):
        for p in range(programs_per_replicate):
            rep.append(r)
            prog.append(p)
        for _ in range(noise_per_replicate):
            rep.append(r)
            prog.append(-1)
    return np.array(rep), np.array(prog)


def test_replicate_recurrence_peaks_where_clusters_are_one_component_per_replicate():
    from tardis_exp.consensus import replicate_recurrence

    R, P = 10, 6
    rep, prog = _replicate_items(P, 0, R)
    # the true K: every cluster one component of every replicate
    assert replicate_recurrence(prog, rep, R, P) == 1.0
    # below it two programs merge: their cluster holds two components per replicate
    merged = np.where(prog == 5, 4, prog)
    assert replicate_recurrence(merged, rep, R, P - 1) == pytest.approx(4 / 5)
    # above it one program splits between two clusters by replicate: each misses half of them
    split = np.where((prog == 5) & (rep < 5), 6, prog)
    assert replicate_recurrence(split, rep, R, P + 1) == pytest.approx((5 + 0.5 + 0.5) / 7)
    # a cluster of noise components from three replicates
    rep_n, prog_n = _replicate_items(P, 1, R)
    noise = np.where(prog_n == -1, -1, prog_n)
    noise[np.flatnonzero(prog_n == -1)[:3]] = P
    assert replicate_recurrence(noise, rep_n, R, P + 1) == pytest.approx((6 + 0.3) / 7)
    # outliers (-1) count as absent
    assert replicate_recurrence(np.full(len(prog), -1), rep, R, P) == 0.0


def test_recurrence_rule_takes_the_k_whose_clusters_recur_not_the_largest_stable_one():
    """The case the old components rule (largest K whose PAC is within its noise of the best)
    gets wrong: PAC 0 from K = 6 to 8 (the planted 6, and two more clusters the resampling
    always reproduces: splinters of programs), the largest such K = 8 admissible."""
    from tardis_exp.consensus import recurrence_spread, replicate_recurrence

    R, P = 10, 6
    rep, prog = _replicate_items(P, 0, R)
    labels = {6: prog.copy()}
    # K = 7, 8: programs 4, 5 split by replicate halves (stable splinters, every cluster
    # still drawing from half the replicates, so admissible)
    labels[7] = np.where((prog == 5) & (rep < 5), 6, prog)
    labels[8] = np.where((prog == 4) & (rep < 5), 7, labels[7])
    labels[5] = np.where(prog == 5, 4, prog)
    labels[4] = np.unique(np.where(prog == 3, 2, labels[5]), return_inverse=True)[1]
    ks = [4, 5, 6, 7, 8]
    stats = {"pac": [0.1, 0.05, 0.0, 0.0, 0.0],
             "recurrence": [replicate_recurrence(labels[k], rep, R, k) for k in ks]}
    spread = {"pac": [0.01] * 5, "recurrence": recurrence_spread(ks, labels, rep, R, rng=0)}
    assert select_k(ks, stats, "pac", spread=spread, largest_stable=True) == 8  # the old default
    k, info = select_k(ks, stats, "recurrence", spread=spread, return_info=True)
    assert k == 6 and info["runner_up_k"] in (5, 7) and info["margin"] > 1
    # "auto" reads recurrence where the stage measured it (method=components), else PAC
    assert select_k(ks, stats, "auto", spread=spread) == 6
    assert select_k(ks, {"pac": stats["pac"]}, "auto", spread=spread) == 6  # PAC's first rise: none -> best


def test_recurrence_spread_measures_how_much_the_replicates_disagree():
    from tardis_exp.consensus import recurrence_spread

    R, P = 10, 4
    rep, prog = _replicate_items(P, 0, R)
    assert recurrence_spread([4], {4: prog}, rep, R, rng=0)[0] == 0  # every replicate alike
    noisy = prog.copy()
    noisy[(rep < 3) & (prog == 3)] = 2  # three replicates merge two programs
    assert recurrence_spread([4], {4: noisy}, rep, R, rng=0)[0] > 0
    assert recurrence_spread([4], {4: noisy}, rep[:30], 3)[0] == 0  # under 4 replicates: nothing to split


def test_recurrence_needs_the_components_method():
    from tardis_exp.params import check

    with pytest.raises(ConfigError, match="k_selection=recurrence needs consensus.method=components"):
        check("consensus", {"method": "spots", "k_selection": "recurrence"}, known_only=True)
    assert check("consensus", {"method": "spots"}, known_only=True)["k_selection"] == "auto"


def test_pac_rule_last_k_before_pac_rises():
    ks = [4, 5, 6, 7, 8, 9, 10]
    pac = {"pac": [0.198, 0.073, 0.0, 0.0053, 0.0064, 0.0088, 0.0193]}
    se = {"pac": [0.023, 0.0067, 0.0, 0.0008, 0.0009, 0.0004, 0.0006]}
    k, info = select_k(ks, pac, "pac", spread=se, return_info=True)
    assert k == 6 and info["margin"] > 1
    # admissibility (clusters that recur across replicates) bounds the choice
    assert select_k(ks, pac, "pac", spread=se, admissible=[True, True, False, False, False, False, False]) == 5


def test_delta_area_and_silhouette_rules():
    ks = [2, 3, 4, 5, 6]
    delta = {"delta_area": [0.7, 0.3, 0.2, 0.004, 0.003]}
    se = {"delta_area": [0.01, 0.01, 0.01, 0.002, 0.002]}
    assert select_k(ks, delta, "delta_area", spread=se) == 4
    sil = {"silhouette": [0.5, 0.9, 0.7, np.nan, 0.6]}
    assert select_k(ks, sil, "silhouette") == 3
    with pytest.raises(ConfigError, match="consensus.k_selection"):
        select_k(ks, sil, "best")


def test_half_spread_is_zero_for_stable_labels_and_positive_for_noisy_ones():
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1, 2], 20)
    stable = {3: np.tile(truth, (20, 1))}
    noisy_l = np.tile(truth, (20, 1))
    flip = rng.random(noisy_l.shape) < 0.2
    noisy_l[flip] = rng.integers(0, 3, flip.sum())
    noisy = {3: noisy_l}
    s0 = half_spread([3], stable, rng=1)
    s1 = half_spread([3], noisy, rng=1)
    assert s0["pac"][0] == 0 and s0["cophenetic"][0] == 0
    assert s1["pac"][0] > 0 and s1["cophenetic"][0] > 0
    # fewer than 4 resamples: nothing to split
    assert half_spread([3], {3: stable[3][:3]})["pac"][0] == 0


def _usages_of(classes, R, r, flip=0.0, seed=0):
    """Usages (spots x R x r) whose largest entry is the spot's class, some spots flipped."""
    rng = np.random.default_rng(seed)
    n = len(classes)
    U = rng.uniform(0, 0.1, size=(n, R, r))
    for rep in range(R):
        lab = classes.copy()
        f = rng.random(n) < flip
        lab[f] = rng.integers(0, r, f.sum())
        U[np.arange(n), rep, lab] += 1.0
    return U


def test_k_cophenetic_maps_components_to_meta_programs():
    from tardis_exp.consensus import _k_cophenetic

    classes = np.repeat([0, 1, 2, 3], 15)
    R, r, m = 6, 4, 30
    comps = np.ones((R, r, m))
    # each replicate finds the 4 programs in its own order: the meta-program labels undo it
    perms = [np.random.default_rng(i).permutation(r) for i in range(R)]
    U = _usages_of(classes, R, r)
    U = np.stack([U[:, rep, perms[rep]] for rep in range(R)], axis=1)  # component j = program perms[rep][j]
    items = np.concatenate(perms)
    assert _k_cophenetic(U, comps, items, 4) == pytest.approx(1.0, abs=1e-6)
    # two meta-programs, each the merge of two programs, the same merge in every replicate: stable
    assert _k_cophenetic(U, comps, items // 2, 2) == pytest.approx(1.0, abs=1e-6)
    # spots whose program changes from restart to restart: lower
    noisy = _usages_of(classes, R, r, flip=0.3, seed=1)
    assert _k_cophenetic(noisy, comps, np.tile(np.arange(r), R), 4) < 0.95
    # the expression a component explains (W * H.sum()) decides, not W alone: scale one
    # replicate's component 0 up in H and down in W, the labels stay the same
    scaled_U, scaled_c = U.copy(), comps.copy()
    scaled_U[:, 0, 0] /= 10
    scaled_c[0, 0] *= 10
    assert _k_cophenetic(scaled_U, scaled_c, items, 4) == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------ stages


@pytest.fixture(scope="module")
def fitted(synthetic_small):
    from tardis_exp.factorize import factorize
    from tardis_exp.preprocess import preprocess

    a = preprocess(synthetic_small, n_top_genes=600)
    factorize(a, n_components=6, n_replicates=6, max_iter=300)
    return a


def test_components_range_is_clipped_to_n_components(fitted, caplog):
    a = fitted.copy()
    with pytest.warns(UserWarning, match=r"max_clusters=9 exceeds factorize.n_components=6"):
        consensus(a, min_clusters=2, max_clusters=9, n_resamples=20, outlier_threshold=0.35)
    c = a.uns["nmf_consensus"]
    assert list(c["k_values"]) == [2, 3, 4, 5, 6]
    # both ends above n_components: one K left
    b = fitted.copy()
    with pytest.warns(UserWarning, match="clipping the K range to \\[6, 6\\]"):
        consensus(b, min_clusters=7, max_clusters=9, n_resamples=10, outlier_threshold=0.35)
    assert list(b.uns["nmf_consensus"]["k_values"]) == [6]


def test_consensus_reports_runner_up_and_evidence_metrics(fitted):
    from tardis_exp.consensus import SPEC

    a = fitted.copy()
    consensus(a, min_clusters=2, max_clusters=6, n_resamples=30, outlier_threshold=0.35)
    c = a.uns["nmf_consensus"]
    assert c["best_k"] == 4  # the planted K
    assert c["n_background"] == 0 and "X_nmf_background" not in a.obsm  # MU spreads the background
    assert c["runner_up_k"] in c["k_values"] and c["runner_up_k"] != c["best_k"]
    assert np.isfinite(c["k_margin"])
    assert c["pac_se"].shape == c["pac"].shape and (c["pac_se"] >= 0).all()
    m = {x.key: x.value(a) for x in SPEC.metrics if x.step == "none"}  # what the stage logs to MLflow
    assert set(m) >= {"runner_up_k", "consensus.k_margin", "consensus.stability", "consensus.spot_cophenetic",
                      "consensus.recurrence"}
    assert m["consensus.recurrence"] == c["recurrence"][list(c["k_values"]).index(c["best_k"])] > 0.5
    assert 0 < m["consensus.stability"] <= 1 and 0 < m["consensus.spot_cophenetic"] <= 1
    # the sweep objective: the mean of the silhouette and the spot cophenetic at the chosen K
    i = list(c["k_values"]).index(c["best_k"])
    assert 0.9 < m["consensus.k_cophenetic"] <= 1
    assert m["consensus.reproducibility"] == pytest.approx((c["silhouette"][i] + m["consensus.k_cophenetic"]) / 2)


def test_background_programs_are_the_ones_every_spot_uses_alike():
    from tardis_exp.consensus import background_programs

    rng = np.random.default_rng(0)
    n = 3000
    domain = rng.integers(0, 4, n)
    specific = np.eye(4)[domain] * rng.gamma(5, 1, (n, 1)) + 0.02 * rng.random((n, 4))
    shared = rng.gamma(50, 0.02, (n, 1))  # every spot, about the same level: CV ~ 0.14
    bg, rel = background_programs(np.hstack([specific, shared]), 0.35)
    assert bg.tolist() == [False] * 4 + [True]
    assert rel[4] < 0.35 < rel[:4].min()
    # programs that all tell spots apart: none is background, whatever their spread
    assert not background_programs(specific, 0.35)[0].any()
    # 0 disables; fewer than 3 programs, or fewer than 2 left: nothing to tell apart
    assert not background_programs(np.hstack([specific, shared]), 0.0)[0].any()
    assert not background_programs(np.hstack([specific[:, :1], shared]), 0.35)[0].any()


def test_hals_background_is_kept_out_of_k_and_of_the_program_labels():
    """HALS converges to a factorization that gives the expression every spot shares a
    component of its own (here two), which every restart finds: counted as programs they
    made K too large and took the argmax of most spots. The planted K and domains are the
    truth."""
    from tardis_exp.factorize import factorize
    from tardis_exp.preprocess import preprocess
    from tardis_exp.score import score
    from tardis_exp.synthetic import make_synthetic

    a = preprocess(make_synthetic(n_spots=1600, n_genes=1200, n_programs=4, seed=21), n_top_genes=1000)
    factorize(a, solver="hals", n_components=8, n_replicates=8, progress=False)
    off = a.copy()
    consensus(a, min_clusters=2, max_clusters=8, progress=False)
    c = a.uns["nmf_consensus"]
    assert c["n_background"] >= 1 and c["best_k"] == 4
    assert c["k_with_background"] == 4 + c["n_background"]
    assert a.obsm["X_nmf_consensus"].shape == (a.n_obs, 4)
    assert a.obsm["X_nmf_background"].shape == (a.n_obs, c["n_background"])
    assert (np.asarray(c["item_labels"])[c["background_items"]] == -2).all()
    # the background spectrum loads the shared genes, not one program's markers
    truth = a.var["true_program"].astype(str).to_numpy()
    bg = np.asarray(c["background_spectra"]).sum(0)
    assert bg[truth == "none"].mean() > bg[truth != "none"].mean()
    score(a, n_cluster_genes=30)
    assert adjusted_rand_score(a.obs["true_domain"], a.obs["nmf_program"]) >= 0.9
    # switched off, the shared components are counted as programs
    consensus(off, min_clusters=2, max_clusters=8, progress=False, background_ratio=0)
    assert off.uns["nmf_consensus"]["n_background"] == 0 and "X_nmf_background" not in off.obsm
    assert off.uns["nmf_consensus"]["best_k"] > 4


@pytest.mark.slow
def test_default_k_rule_finds_montis_six_classes():
    """Monti et al. (2003)'s 6-class simulation (unequal classes, noisy): the default K rule on
    the default factorization (10 replicates of rank 10) finds the 6 planted classes. The old
    default (largest K whose PAC is within its noise of the best, clusters bounded to half the
    replicates) chose 5 here: the outlier filter leaves one class with components of only 4
    replicates, and the hard bound ruled K = 6 out."""
    from tardis_exp.datasets import monti_simulated
    from tardis_exp.factorize import factorize
    from tardis_exp.preprocess import preprocess

    a = preprocess(monti_simulated("simulated6", seed=0), normalize="none", n_top_genes=None, min_cells=0)
    factorize(a, progress=False)
    consensus(a, min_clusters=2, max_clusters=9, progress=False)
    c = a.uns["nmf_consensus"]
    assert c["k_selection"] == "recurrence" and c["best_k"] == 6
    prog = a.obsm["X_nmf_consensus"].argmax(1)
    assert adjusted_rand_score(a.obs["class"], prog) >= 0.9


def test_nmf_program_is_the_argmax_of_the_consensus_usages(fitted):
    from tardis_exp.score import program_labels, score

    a = fitted.copy()
    consensus(a, min_clusters=2, max_clusters=6, n_resamples=20, outlier_threshold=0.35)
    score(a, n_cluster_genes=30)
    lab = a.obs["nmf_program"]
    assert isinstance(lab.dtype, pd.CategoricalDtype)
    U = a.obsm["X_nmf_consensus"]
    np.testing.assert_array_equal(lab.cat.codes.to_numpy(), U.argmax(1))
    m = a.uns["nmf_metrics"]
    # the metric is computed on the program label, the seed's label is reported beside it
    assert m["ari_truth"] == pytest.approx(adjusted_rand_score(a.obs["true_domain"], lab))
    assert m["ari_truth_nmf_cluster"] == pytest.approx(adjusted_rand_score(a.obs["true_domain"], a.obs["nmf_cluster"]))
    assert m["ari_truth"] >= 0.8
    # a spot without any usage gets no program, not program 0
    cat = program_labels(np.array([[0.0, 0.0], [0.1, 0.5], [2.0, 1.0]]))
    assert list(cat.codes) == [-1, 1, 0]


# ------------------------------------------------------------------ data with published answers


def test_shipped_brunet_sets_and_monti_generators():
    from tardis_exp.datasets import brunet_leukemia, brunet_medulloblastoma, monti_simulated

    a = brunet_leukemia()
    assert a.shape == (38, 5000)
    assert a.obs["subtype"].value_counts().to_dict() == {"B-ALL": 19, "AML": 11, "T-ALL": 8}
    assert (a.X >= 20).all()  # the published preprocessing floors at 20
    b = brunet_medulloblastoma()
    assert b.shape == (34, 5893) and b.obs["class"].value_counts().to_dict() == {"C": 25, "D": 9}
    g = monti_simulated("simulated6", seed=1)
    assert g.shape == (60, 600) and (g.X >= 0).all() and g.obs["class"].nunique() == 6
    assert np.array_equal(g.X, monti_simulated("simulated6", seed=1).X)


def test_dataset_source_is_validated_before_loading():
    from tardis_exp.data import check_data, load_data

    with pytest.raises(ConfigError, match="data.dataset"):
        check_data({"source": "dataset", "dataset": "golub"})
    a = load_data({"source": "dataset", "dataset": "gaussian3"})
    assert a.shape == (60, 600)


@pytest.mark.slow
def test_brunet_leukemia_reproduces_the_published_cophenetic_shape_and_labels():
    """Brunet et al. 2004 on their leukemia set: cophenetic correlation high at K = 2, 3 and
    lower at K = 4; the chosen K's labels match ALL/AML (K = 2) or B/T/AML (K = 3).
    A reduced run (20 restarts of 200 iterations instead of 50 x 500)."""
    from tardis_exp.datasets import brunet_leukemia

    a = brunet_leukemia()
    consensus(a, method="spots", min_clusters=2, max_clusters=4, n_resamples=20, resample_frac=1.0,
              k_selection="brunet", spots_max_iter=200)
    c = a.uns["nmf_consensus"]
    coph = dict(zip(c["k_values"], c["cophenetic"]))
    assert min(coph[2], coph[3]) > coph[4]
    assert c["best_k"] in (2, 3)
    labels = {2: "class", 3: "subtype"}[c["best_k"]]
    prog = a.obsm["X_nmf_consensus"].argmax(1)
    assert adjusted_rand_score(a.obs[labels], prog) >= 0.85


def test_unseparated_k_is_logged(caplog):
    from tardis_exp.consensus import _report_k

    with caplog.at_level(logging.WARNING, logger="tardis_exp.consensus"):
        _report_k(3, {"runner_up_k": 2, "margin": 0.4}, "brunet", KS)
    assert "do not separate K=3 from K=2" in caplog.text


def test_k_selection_ranks_figure(tmp_path):
    import matplotlib.image as mpimg

    from tardis_exp.plots import k_selection_ranks

    trials = [{"n_components": r, "consensus.stability": s, "reconstruction_error": e, "best_k": min(r, 3)}
              for r, s, e in ((2, 0.99, 10.0), (3, 0.98, 8.0), (3, 0.97, 8.1), (4, 0.7, 7.5), (5, 0.6, 7.2))]
    p = k_selection_ranks(trials, tmp_path / "k.png", chosen=1, objective="consensus.silhouette")
    assert p.is_file() and mpimg.imread(p).std() > 0.01


def test_study_k_selection_reads_the_trials_of_a_study(tmp_path):
    import optuna
    import yaml

    from tardis_exp.plots import study_k_selection

    study = optuna.create_study(direction="maximize", storage=optuna.storages.InMemoryStorage())
    for r, value in ((2, 0.99), (3, 0.995), (4, 0.97)):
        t = study.ask()
        out = tmp_path / str(r)
        out.mkdir()
        (out / "metrics.yaml").write_text(yaml.safe_dump(
            {"best_k": float(r), "consensus.stability": value, "reconstruction_error": 10.0 - r}))
        t.set_user_attr("output_dir", str(out))
        t.set_user_attr("values", {"factorize.n_components": r})
        study.tell(t, value)
    t = study.ask()  # a trial without outputs (another machine's) is left out
    study.tell(t, 0.1)
    p = study_k_selection(study, tmp_path / "k_selection_ranks.png")
    assert p is not None and p.is_file()
    empty = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    assert study_k_selection(empty, tmp_path / "none.png") is None


def test_validate_merge_orders_rows_and_counts_the_objectives(tmp_path):
    """scripts/validate.py: rows saved by split runs (--rows) merge into one table (--merge)."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("validate", Path(__file__).resolve().parents[1] / "scripts" /
                                                  "validate.py")
    V = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(V)

    def row(name, k, chosen):
        return {"set": name, "k": [k], "ref": "r", "default_k": np.int64(chosen), "default_runner": (k, 1.5),
                "default_ari": np.float32(0.5), "seconds": 1.0,
                "objective_k": {"reproducibility": (chosen, chosen), "silhouette": (k, k)}}

    (tmp_path / "a.json").write_text(json.dumps([row("Monti simulated6", 6, 2)], default=V._jsonable))
    (tmp_path / "b.json").write_text(json.dumps([row("Brunet leukemia", 2, 2)], default=V._jsonable))
    out = tmp_path / "v.md"
    rows = V.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)])
    assert [r["set"] for r in rows] == ["Brunet leukemia", "Monti simulated6"]  # the script's order
    text = out.read_text()
    # silhouette right on both, reproducibility on leukemia only
    right = next(line for line in text.splitlines() if line.startswith("| sets right"))
    counts = dict(zip(V.winner(rows, ""), right.split("|")[2:-1]))
    assert counts["silhouette"].strip() == "2" and counts["reproducibility"].strip() == "1"
    assert "2 processes" in text and "<!-- validate.py:end -->" in text


def test_converged_replicates_are_warned_about_and_overcount_montis_classes():
    """The recurrence rule was validated on MU replicates stopped at tol=1e-4. Run to
    convergence, the surplus components of Monti's 3-class set recur as well, and the rule
    counts more programs than classes: the stage says so (the finding of docs/validation.md,
    "Converged replicates and the K rule"), and says nothing at the defaults."""
    import warnings

    from tardis_exp.datasets import monti_simulated
    from tardis_exp.factorize import factorize
    from tardis_exp.preprocess import preprocess

    a = preprocess(monti_simulated("gaussian3", seed=0), normalize="none", n_top_genes=None, min_cells=0)
    conv = a.copy()
    factorize(a, progress=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        consensus(a, min_clusters=2, max_clusters=9, progress=False)
    assert not [x for x in w if "closer to convergence" in str(x.message)]
    assert a.uns["nmf_consensus"]["best_k"] == 3
    factorize(conv, progress=False, tol=1e-6, max_iter=5000)
    assert conv.uns["nmf"]["n_iter"].min() > 3 * a.uns["nmf"]["n_iter"].max()  # run much further
    with pytest.warns(UserWarning, match=r"closer to convergence.*factorize\.tol=1e-06"):
        consensus(conv, min_clusters=2, max_clusters=9, progress=False)
    assert conv.uns["nmf_consensus"]["best_k"] > 3


def test_parallel_analysis_finds_a_planted_rank():
    """Poisson counts of a rank-4 non-negative product: the data's components 1-4 explain
    more than a gene-permuted copy's, the 5th does not (measured margins: >= 2.06 against
    <= 0.18 of the null over 4 seeds, so no float32 rounding moves the answer)."""
    import scipy.sparse as sp

    from tardis_exp.consensus import parallel_analysis

    rng = np.random.default_rng(0)
    W, H = rng.gamma(0.3, 1, (600, 4)), rng.gamma(0.3, 1, (4, 200))
    X = rng.poisson(3 * W @ H).astype(np.float32)
    pa = parallel_analysis(sp.csr_matrix(X), 8, np.random.default_rng(1))
    assert pa["rank"] == 4
    assert pa["ratios"].shape == (9,) and (pa["ratios"][1:4] > 1.5).all() and (pa["ratios"][4:] < 0.5).all()


def test_rank_bound_parallel_caps_converged_replicates_at_montis_classes():
    """HALS replicates (converged) of Monti's 3-class set: the recurrence rule counts more
    programs than classes; consensus.rank_bound=parallel caps K at the rank the data hold
    against a gene-permuted copy, 3 (docs/validation.md, "Parallel analysis")."""
    import warnings

    from tardis_exp.datasets import monti_simulated
    from tardis_exp.factorize import factorize
    from tardis_exp.preprocess import preprocess
    from tardis_exp.score import program_labels

    a = preprocess(monti_simulated("gaussian3", seed=0), normalize="none", n_top_genes=None, min_cells=0)
    factorize(a, progress=False, solver="hals")
    free, capped = a.copy(), a
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        consensus(free, min_clusters=2, max_clusters=9, progress=False)
    assert free.uns["nmf_consensus"]["best_k"] > 3
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        consensus(capped, min_clusters=2, max_clusters=9, progress=False, rank_bound="parallel")
    assert not [x for x in w if "closer to convergence" in str(x.message)]  # the bound is the answer to it
    c = capped.uns["nmf_consensus"]
    assert c["parallel_rank"] == 3 and c["best_k"] == 3
    assert c["k_rule_choice"] == free.uns["nmf_consensus"]["best_k"] == c["runner_up_k"]
    assert capped.obsm["X_nmf_consensus"].shape[1] == 3
    assert adjusted_rand_score(capped.obs["class"].astype(str), program_labels(capped.obsm["X_nmf_consensus"])) > 0.9
    with pytest.raises(ConfigError, match=r"consensus\.rank_bound=parallel needs consensus\.method=components"):
        consensus(a.copy(), method="spots", rank_bound="parallel", progress=False)
