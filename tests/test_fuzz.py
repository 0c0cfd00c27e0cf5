"""Property-based fuzzing of the stages and the seed API over odd AnnData inputs.

For every drawn input -- shape (down to 0 and 1 spot/gene), storage (dense, CSR, CSC
matrices and arrays), dtype (bool, int8..int64, uint8..uint64, float16/32/64), empty rows and columns,
sprinkled NaN / inf / negative / huge values -- the pipeline either returns a result
that is finite and non-negative where it must be, or raises a
:class:`~tardis_exp.errors.TardisError` with a message. Any other exception, a NaN in
an output, or a hang (each example is tiny) fails the test.
"""

from __future__ import annotations

import os
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tardis_exp.api import nmf_clustering, nmf_consensus  # noqa: E402
from tardis_exp.errors import TardisError  # noqa: E402
from tardis_exp.factorize import factorize  # noqa: E402
from tardis_exp.preprocess import preprocess  # noqa: E402

os.environ.setdefault("TARDIS_EXP_PROGRESS", "0")

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64"]
# AnnData itself refuses COO ("Only CSR and CSC matrices are supported"), so COO never
# reaches the stages; scipy's newer sparse *arrays* do, and are drawn instead.
FORMATS = ["dense", "csr", "csc", "csr_array", "csc_array"]
SPRINKLES = ["nan", "inf", "neg", "huge", "big", "tiny"]

# counts of every example run through the stages, by outcome (printed in the report)
OUTCOMES = {"result": 0, "tardis_error": 0}


@st.composite
def anndatas(draw):
    """A small AnnData with drawn shape, storage, dtype and defects."""
    # one example in four is degenerate in shape or content; the others are ordinary
    # matrices with smaller defects, so both outcomes (result, clear error) are exercised
    odd = draw(st.sampled_from([False, False, False, True]))
    n_obs = draw(st.sampled_from([0, 1, 2, 3] if odd else [40, 25, 12, 6]))
    n_vars = draw(st.sampled_from([0, 1, 2, 3] if odd else [30, 15, 8]))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    fmt = draw(st.sampled_from(FORMATS))
    density = draw(st.sampled_from([0.0, 0.02] if odd else [1.0, 0.5, 0.2]))
    zero_rows = draw(st.integers(0, 3))
    zero_cols = draw(st.integers(0, 3))
    sprinkle = draw(st.sampled_from(SPRINKLES)) if draw(st.sampled_from([False, False, True])) else "none"
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(1.0, 20.0, size=(n_obs, 1)) * 0.2, size=(n_obs, n_vars)).astype(np.float64)
    X *= rng.random((n_obs, n_vars)) < density
    X[: min(zero_rows, n_obs)] = 0
    X[:, : min(zero_cols, n_vars)] = 0
    if X.size and sprinkle != "none":
        i, j = rng.integers(n_obs), rng.integers(n_vars)
        # huge: beyond what float32 can square; big: large but allowed; tiny: subnormal
        X[i, j] = {"nan": np.nan, "inf": np.inf, "neg": -3.0, "huge": 1e30, "big": 1e9, "tiny": 1e-40}[sprinkle]
    if dtype.kind == "b":
        X = X > 0
    elif dtype.kind in "iu":
        # integers cannot hold NaN/inf; those examples keep their other defects
        X = np.nan_to_num(X, nan=0, posinf=0, neginf=0)
        info = np.iinfo(dtype)
        X = np.clip(X, info.min, info.max)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 1e30 -> float16 is inf on purpose
        X = X.astype(dtype)
    if fmt != "dense" and dtype != np.float16:  # scipy.sparse has no float16
        X = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "csr_array": sp.csr_array,
             "csc_array": sp.csc_array}[fmt](X)
    a = ad.AnnData(X=X)
    a.obs_names = [f"s{i}" for i in range(n_obs)]
    a.var_names = [f"g{j}" for j in range(n_vars)]
    return a


def _finite_nonneg(M, what):
    M = np.asarray(M)
    assert np.isfinite(M).all(), f"{what} has NaN/inf"
    assert (M >= 0).all(), f"{what} has negative values"


def _run_stages(a, n_components, n_top_genes, normalize, min_cells, min_counts):
    out = preprocess(a, n_top_genes=n_top_genes, normalize=normalize, min_cells=min_cells,
                     min_counts=min_counts)
    Xv = out.X.data if sp.issparse(out.X) else out.X
    assert np.isfinite(Xv).all(), "preprocessed X has NaN/inf"
    factorize(out, n_components=n_components, n_replicates=2, max_iter=30, random_state=0)
    _finite_nonneg(out.obsm["X_nmf"], "W")
    _finite_nonneg(out.uns["X_nmf_components"], "H")
    assert np.isfinite(out.uns["nmf"]["errors"]).all(), "reconstruction errors have NaN"
    assert out.obsm["X_nmf"].shape == (out.n_obs, n_components)


def _run_api(a, n_components, n_top_genes):
    out = nmf_clustering(a, n_components=n_components, max_iter=30, n_top_genes=n_top_genes)
    _finite_nonneg(out.obsm["X_nmf"], "W")
    _finite_nonneg(out.uns["X_nmf_components"], "H")
    out = nmf_consensus(out, min_clusters=2, max_clusters=3, n_resamples=5, n_cluster_genes=5)
    keys = [k for k in out.obs if k.startswith("nmf_cluster_")]
    assert keys, "no program scores written"
    for k in keys:
        assert np.isfinite(out.obs[k].to_numpy(dtype=float)).all(), f"obs[{k!r}] has NaN"
    assert out.obs["nmf_cluster"].notna().all(), "obs['nmf_cluster'] has missing labels"


@settings(max_examples=60, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(a=anndatas(), n_components=st.integers(1, 3), n_top_genes=st.sampled_from([10, 3, 2000]),
       normalize=st.sampled_from(["log1p", "total", "none"]), min_cells=st.integers(0, 2),
       min_counts=st.integers(0, 2), api=st.booleans())
def _fuzz(a, n_components, n_top_genes, normalize, min_cells, min_counts, api):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clipping warnings are expected on tiny inputs
        try:
            if api:
                _run_api(a, n_components, n_top_genes)
            else:
                _run_stages(a, n_components, n_top_genes, normalize, min_cells, min_counts)
        except TardisError as e:
            msg = str(e)
            assert len(msg) > 20, f"terse error: {msg!r}"
            OUTCOMES["tardis_error"] += 1
            return
    OUTCOMES["result"] += 1


def test_fuzz_result_or_clear_error():
    """60 drawn inputs: each gives a clean result or a TardisError, and both outcomes occur."""
    OUTCOMES.update(result=0, tardis_error=0)
    _fuzz()
    print(f"fuzz outcomes: {OUTCOMES}")
    # not vacuous: the fuzzer reached both finished runs and clear errors
    assert OUTCOMES["result"] >= 5 and OUTCOMES["tardis_error"] >= 5, OUTCOMES
