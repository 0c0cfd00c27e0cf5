"""The seed's documented two-line usage, unchanged, through tardis_exp.api."""

import warnings

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

import float32_bounds as f32
from tardis_exp.api import nmf_clustering, nmf_consensus


def _check_seed_outputs(adata, k):
    W, H = adata.obsm["X_nmf"], adata.uns["X_nmf_components"]
    assert W.shape == (adata.n_obs, k) and H.shape == (k, adata.n_vars)
    assert W.min() >= 0 and H.min() >= 0
    X = adata.X.toarray() if sp.issparse(adata.X) else adata.X
    # better than the rank-0 baseline (W H = 0), and equal to what W, H reconstruct
    err = np.linalg.norm(X - W @ H)
    assert err < np.linalg.norm(X)
    # the reported error (float32 products, expanded) against the float64 error of W, H
    assert abs(adata.uns["nmf"]["errors"][0] - f32.error64(X, W, H)) <= f32.reported_error_bound(X, W, H)
    best = adata.uns["nmf_consensus"]["best_k"]
    cols = [f"nmf_cluster_{i}" for i in range(best)]
    Z = adata.obs[cols].to_numpy()
    np.testing.assert_allclose(Z.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(Z.std(0), 1, atol=1e-6)
    np.testing.assert_array_equal(adata.obs["nmf_cluster"].cat.codes.to_numpy(), Z.argmax(1))
    return best


def test_seed_default_call_on_synthetic():
    from tardis_exp.synthetic import make_synthetic

    adata = make_synthetic(n_spots=1600, n_genes=1500, n_programs=6, seed=3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        adata = nmf_clustering(adata)
        adata = nmf_consensus(adata)
    # the seed crashes here (10 components, 80% resampled = 8 < max_clusters); we clip and say so
    assert any("consensus.max_clusters" in str(x.message) for x in w)
    best = _check_seed_outputs(adata, 10)
    assert 4 <= best <= 7


def test_seed_tutorial_call_on_pbmc68k():
    a = sc.datasets.pbmc68k_reduced()
    adata = sc.AnnData(a.raw.X.copy(), obs=a.obs.copy(), var=a.raw.var.copy())
    adata = nmf_clustering(adata, n_components=12, n_top_genes=500)
    adata = nmf_consensus(adata, n_resamples=50)
    assert adata.n_vars == 500
    best = _check_seed_outputs(adata, 12)
    # the programs separate the annotated cell types better than chance
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(adata.obs["bulk_labels"], adata.obs["nmf_cluster"]) > 0.1
    assert best >= 4
