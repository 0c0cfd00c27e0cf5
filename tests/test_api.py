"""The seed's documented two-line usage, unchanged, through tardis_exp.api."""

import inspect
import json
import re
import subprocess
import sys
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
    # the seed crashes here (10 components, 80% resampled = 8 < max_clusters); we clip and say so,
    # in the function's own argument names (no CLI key: the signature has none)
    msgs = [str(x.message) for x in w]
    assert any(m.startswith("max_clusters=10 cannot be fit") and "(resample_frac)" in m for m in msgs), msgs
    assert not any(_CLI_KEY.search(m) for m in msgs), msgs
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


# a config key of a stage section (consensus.max_clusters), as the CLI's messages name them
_CLI_KEY = re.compile(r"\b(?:data|preprocess|factorize|consensus|score)\.[a-z_]+")


def test_the_package_exports_the_seed_api_and_stays_light():
    code = ("import json, sys, tardis_exp\n"
            "light = 'tardis_exp.api' not in sys.modules and 'scanpy' not in sys.modules\n"
            "from tardis_exp import nmf_clustering, nmf_consensus\n"
            "import tardis_exp.api as api\n"
            "print(json.dumps([light, nmf_clustering is api.nmf_clustering, nmf_consensus is api.nmf_consensus,\n"
            "                  sorted(set(tardis_exp.__all__) & {'nmf_clustering', 'nmf_consensus'})]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == [True, True, True, ["nmf_clustering", "nmf_consensus"]]


@pytest.fixture
def small():  # cheap: made per test
    from tardis_exp.synthetic import make_synthetic

    return make_synthetic(n_spots=300, n_genes=200, n_programs=3, seed=1)


def _negative(a):
    a = a.copy()
    a.X = a.X.astype(np.float32)
    a.X[0, 0] = -1
    return a


# (function, its input, bad arguments, what the message must say); each error is raised by a
# stage that names its config key
BAD = {
    "negative X": ("nmf_clustering", _negative, {}, ["adata.X", "adata.layers['counts']"]),
    "rank above the data": ("nmf_clustering", lambda a: a.copy(), {"n_components": 500}, ["n_components=500"]),
    "no HVGs": ("nmf_clustering", lambda a: a.copy(), {"n_top_genes": 0}, ["n_top_genes must be"]),
    "empty K range": ("nmf_consensus", "factorized", {"min_clusters": 4, "max_clusters": 3},
                      ["max_clusters=3", "min_clusters=4"]),
    "tiny resamples": ("nmf_consensus", "factorized", {"min_clusters": 2, "max_clusters": 3, "resample_frac": 0.1},
                       ["resample_frac", "n_components of nmf_clustering"]),
    "not factorized": ("nmf_consensus", lambda a: a.copy(), {}, ["run nmf_clustering first"]),
}


@pytest.mark.parametrize("case", BAD)
def test_errors_name_the_api_arguments(case, small):
    import tardis_exp
    from tardis_exp.errors import TardisError

    fname, make, kwargs, says = BAD[case]
    func = getattr(tardis_exp, fname)
    if make == "factorized":
        adata = nmf_clustering(small.copy(), n_components=5, n_top_genes=100)
    else:
        adata = make(small)
    with pytest.raises(TardisError) as e:
        func(adata, **kwargs)
    msg = str(e.value)
    for s in says:
        assert s in msg, msg
    assert not _CLI_KEY.search(msg), msg
    # every argument it names is one the function takes
    for arg in kwargs:
        assert arg in inspect.signature(func).parameters
    assert "\n" not in msg
