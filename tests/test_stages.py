"""Each stage on small synthetic data with known programs."""

import numpy as np
import pytest
import scipy.sparse as sp

import float32_bounds as f32
from tardis_exp import consensus, factorize, preprocess, score
from tardis_exp.consensus import cdf_stats, consensus_from_labels


def test_preprocess_keeps_sparse_and_counts(synthetic_small):
    out = preprocess(synthetic_small, n_top_genes=300)
    assert out.n_vars == 300 and sp.issparse(out.X) and out.X.dtype == np.float32
    assert "counts" in out.layers and "spatial" in out.obsm
    # counts layer is the raw input restricted to the kept genes
    raw = synthetic_small[:, out.var_names].X
    assert (abs(out.layers["counts"] - raw)).max() == 0
    # markers are highly variable
    assert (out.var["true_program"] != "none").mean() > 0.4


def test_preprocess_exclusion(synthetic_small, tmp_path):
    f = tmp_path / "hk.txt"
    f.write_text("gene1\ngene2\n")
    out = preprocess(synthetic_small, n_top_genes=None, exclude_regex=["^gene1[0-9]$"], exclude_genes_file=str(f))
    names = set(out.var_names)
    assert not names & {"gene1", "gene2", "gene10", "gene19"}
    assert "gene3" in names or "gene100" in names


def test_consensus_matrix_and_pac():
    labels = np.array([[0, 0, 1, 1, -1], [1, 1, 0, -1, 0], [0, 0, 1, 1, 0]])
    M = consensus_from_labels(labels)
    assert M[0, 1] == 1.0  # always together
    assert M[0, 2] == 0.0  # never together
    assert M[2, 4] == pytest.approx(0.5)  # together in 1 of 2 resamples where both sampled
    upper = M[np.triu_indices(5, 1)]
    assert cdf_stats(M)["pac"] == pytest.approx(np.mean((upper > 0.1) & (upper < 0.9)))
    assert 0 < cdf_stats(M)["pac"] < 1


@pytest.fixture(scope="module")
def fitted(synthetic_small):
    a = preprocess(synthetic_small, n_top_genes=600)
    factorize(a, n_components=6, n_replicates=8, random_state=0)
    return a


def test_factorize_outputs(fitted):
    a = fitted
    assert a.obsm["X_nmf"].shape == (a.n_obs, 6) and a.uns["X_nmf_components"].shape == (6, a.n_vars)
    assert a.obsm["X_nmf"].min() >= 0 and a.uns["X_nmf_components"].min() >= 0
    errs = a.uns["nmf"]["errors"]
    assert len(errs) == 8 and a.uns["nmf"]["components"].shape == (8, 6, a.n_vars)
    X = a.X.toarray()
    assert errs.min() < np.linalg.norm(X)  # better than the rank-0 (all zero) fit
    W, H = a.obsm["X_nmf"], a.uns["X_nmf_components"]
    # the reported error (float32 products, expanded) against the float64 error of W, H
    assert abs(errs.min() - f32.error64(X, W, H)) <= f32.reported_error_bound(X, W, H)


def test_components_consensus_finds_true_k(fitted):
    a = fitted.copy()
    consensus(a, min_clusters=2, max_clusters=7, n_resamples=50)
    c = a.uns["nmf_consensus"]
    assert c["best_k"] == 4
    score(a, n_cluster_genes=30)
    m = a.uns["nmf_metrics"]
    assert m["program_recovery"] >= 0.9
    assert m["ari_truth"] >= 0.8
    z = a.obs[[f"nmf_cluster_{i}" for i in range(4)]].to_numpy()
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-6)
    np.testing.assert_array_equal(a.obs["nmf_cluster"].cat.codes.to_numpy(), z.argmax(1))


def test_spots_consensus_recovers_groups():
    from sklearn.metrics import adjusted_rand_score

    from tardis_exp.synthetic import make_synthetic

    d = make_synthetic(n_spots=400, n_genes=500, n_programs=3, n_markers=40, sharpness=30, seed=4)
    a = preprocess(d, n_top_genes=300)
    consensus(a, method="spots", min_clusters=2, max_clusters=5, n_resamples=12, max_spots=300,
              spots_max_iter=500, random_state=0)
    c = a.uns["nmf_consensus"]
    ks = list(c["k_values"])
    assert c["best_k"] == 3
    assert c["cophenetic"][ks.index(3)] > c["cophenetic"][ks.index(4)]
    score(a, n_cluster_genes=30)
    assert adjusted_rand_score(a.obs["true_domain"], a.obs["nmf_cluster"]) >= 0.8
    lab = a.obs["nmf_spot_consensus"]
    used = lab.notna().to_numpy()
    assert used.sum() == 300
    assert adjusted_rand_score(a.obs["true_domain"][used], lab[used]) >= 0.8


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("ctrl_size", [50, 7])
def test_score_gene_sets_equals_scanpy(synthetic_small, dense, ctrl_size):
    """All programs in one pass give exactly scanpy's score_genes, set by set."""
    import scanpy as sc

    from tardis_exp.score import score_gene_sets

    a = preprocess(synthetic_small, n_top_genes=500)
    if dense:
        a.X = a.X.toarray()
    rng = np.random.default_rng(3)
    sets = [list(a.var_names[rng.choice(a.n_vars, size=n, replace=False)]) for n in (5, 30, 50, 1)]
    sets.append(list(a.var_names[:20]) + ["not_a_gene"])  # absent genes are ignored, as in scanpy
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    ours = score_gene_sets(a, sets, ctrl_size=ctrl_size, random_state=0)
    assert np.array_equal(np.random.get_state()[1], before)  # global RNG left as it was
    np.testing.assert_allclose(score_gene_sets(a, sets, ctrl_size=ctrl_size, random_state=0, chunk_spots=128),
                               ours, rtol=0, atol=1e-12)  # row chunks change nothing (BLAS rounding only)
    assert ours.shape == (a.n_obs, len(sets))
    for p, genes in enumerate(sets):
        ref = sc.tl.score_genes(a, genes, ctrl_size=ctrl_size, random_state=0, use_raw=False,
                                copy=True).obs["score"].to_numpy()
        # scanpy sums float32 X in float32 (scipy's sum), ours in float64: equal to float32
        # precision; one control gene drawn differently would move every spot by ~1e-2
        np.testing.assert_allclose(ours[:, p], ref, rtol=0, atol=2e-6)
    assert np.abs(ours).max() > 0.1  # not trivially zero


def test_score_gene_sets_falls_back_to_scanpy_on_nan(synthetic_small):
    import scanpy as sc

    from tardis_exp.score import score_gene_sets

    a = preprocess(synthetic_small, n_top_genes=300)
    a.X = a.X.toarray()
    a.X[0, 5] = np.nan
    genes = list(a.var_names[10:40])
    ours = score_gene_sets(a, [genes], ctrl_size=20, random_state=1)
    ref = sc.tl.score_genes(a, genes, ctrl_size=20, random_state=1, use_raw=False, copy=True).obs["score"]
    np.testing.assert_allclose(ours[:, 0], ref.to_numpy(), rtol=0, atol=2e-6)
    assert np.isfinite(ours).all()  # NaN-aware means (one product over X would give NaN for spot 0)
    assert list(a.obs.columns) == list(synthetic_small.obs.columns)  # no leftover score column


def test_score_gene_sets_random_state_none_advances_the_global_generator(synthetic_small):
    from tardis_exp.score import score_gene_sets

    a = preprocess(synthetic_small, n_top_genes=300)
    sets = [list(a.var_names[:30])]
    np.random.seed(5)
    first = score_gene_sets(a, sets, ctrl_size=5, random_state=None)
    second = score_gene_sets(a, sets, ctrl_size=5, random_state=None)
    assert not np.allclose(first, second)  # new control genes each call, as with scanpy


def test_adjusted_rand_codes_equals_sklearn():
    """The score stage's ARI (a dense contingency table of codes) is sklearn's value, bit for bit
    (the same integer pair counts and formula): random labelings, one side a refinement of the
    other, identical, all in one label, unequal label counts and unused codes."""
    from sklearn.metrics import adjusted_rand_score

    from tardis_exp.metrics import adjusted_rand_codes

    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 3000)
    cases = [(a, rng.integers(0, 7, 3000)), (a, a), (a, a * 3 + rng.integers(0, 3, 3000)),
             (a, np.zeros(3000, int)), (np.zeros(10, int), np.zeros(10, int)), (a, (a + 1) % 5),
             (a * 2, rng.integers(0, 2, 3000) * 9), (np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1]))]
    for x, y in cases:
        assert adjusted_rand_codes(x, y) == adjusted_rand_score(x, y), (x[:5], y[:5])
    assert adjusted_rand_codes(a, (a + 1) % 5) == 1.0  # relabelled: the same partition
