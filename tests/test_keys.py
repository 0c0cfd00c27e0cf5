"""scanpy's ``key_added``: two results side by side in one AnnData, each read by name.

The reference for each keyed result is the same call on its own copy with the default keys:
writing a second result must leave the first untouched, and reading by key must give what
the stage computes on that result alone.
"""

from __future__ import annotations

import numpy as np
import pytest

import tardis_exp
from tardis_exp.errors import ConfigError, InputError
from tardis_exp.plots import dotplot_figure, make_plots

SMALL = dict(min_clusters=2, max_clusters=5, n_resamples=20)


@pytest.fixture(scope="module")
def factorized(synthetic_small):
    a = synthetic_small.copy()
    tardis_exp.preprocess(a, n_top_genes=400)
    tardis_exp.factorize(a, n_components=6, n_replicates=4, max_iter=300)
    return a


def _alone(factorized, **consensus):
    a = factorized.copy()
    tardis_exp.consensus(a, **SMALL, **consensus)
    tardis_exp.score(a)
    return a


def test_two_consensus_results_in_one_anndata_each_scored(factorized, tmp_path):
    ref_a = _alone(factorized, min_cluster_replicates=0.0)
    ref_b = _alone(factorized, method="spots", max_spots=300, spots_max_iter=100)
    both = factorized.copy()
    tardis_exp.consensus(both, **SMALL, min_cluster_replicates=0.0, key_added="cons_a")
    tardis_exp.consensus(both, **SMALL, method="spots", max_spots=300, spots_max_iter=100, key_added="cons_b")
    tardis_exp.score(both, consensus_key="cons_a", key_added="a")
    tardis_exp.score(both, consensus_key="cons_b", key_added="b")
    assert "nmf_consensus" not in both.uns and "nmf_cluster" not in both.obs
    for key, prefix, ref in (("cons_a", "a", ref_a), ("cons_b", "b", ref_b)):
        np.testing.assert_array_equal(both.obsm[f"X_{key}"], ref.obsm["X_nmf_consensus"])
        assert both.uns[key]["best_k"] == ref.uns["nmf_consensus"]["best_k"]
        K = both.obsm[f"X_{key}"].shape[1]
        for i in range(K):
            np.testing.assert_array_equal(both.obs[f"{prefix}_cluster_{i}"], ref.obs[f"nmf_cluster_{i}"])
        assert f"{prefix}_cluster_{K}" not in both.obs
        assert both.obs[f"{prefix}_program"].equals(ref.obs["nmf_program"])
        assert both.uns[f"{prefix}_programs"].equals(ref.uns["nmf_programs"])
        assert both.uns[f"{prefix}_metrics"]["program_recovery"] == ref.uns["nmf_metrics"]["program_recovery"]
    # the figures of each result, by its keys
    for key, prefix in (("cons_a", "a"), ("cons_b", "b")):
        written = make_plots(both, tmp_path / prefix, consensus_key=key, score_key=prefix)
        assert len(written) == 6, written
        rows = dotplot_figure(both, keys=tardis_exp.keys.result_keys(consensus_key=key, score_key=prefix))
        assert len(rows.categories) == both.obsm[f"X_{key}"].shape[1]


def test_a_second_factorization_beside_the_first(factorized):
    a = factorized.copy()
    tardis_exp.factorize(a, n_components=3, n_replicates=2, max_iter=100, key_added="nmf3")
    assert a.obsm["X_nmf"].shape[1] == 6 and a.obsm["X_nmf3"].shape[1] == 3
    assert a.uns["X_nmf3_components"].shape[0] == 3 and a.obsm["X_nmf3_replicates"].shape[1] == 6
    tardis_exp.consensus(a, min_clusters=2, max_clusters=3, n_resamples=10, nmf_key="nmf3", key_added="c3")
    assert a.obsm["X_c3"].shape[1] <= 3 and np.asarray(a.uns["c3"]["spectra"]).shape[0] <= 3
    with pytest.raises(InputError, match=r"uns\['nope'\]"):
        tardis_exp.consensus(a, min_clusters=2, max_clusters=3, nmf_key="nope")
    with pytest.raises(InputError, match=r"score needs uns\['c4'\]"):
        tardis_exp.score(a, consensus_key="c4")
    with pytest.raises(ConfigError, match="key_added must be a non-empty key name"):
        tardis_exp.score(a, consensus_key="c3", key_added="")
