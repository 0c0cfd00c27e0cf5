"""The K rules that read the matrix, not the replicates (``bicv``, ``parallel``;
tardis_exp/consensus/heldout.py): exact on a matrix of known rank, the planted K on draws
of the benchmark generator, and the same K whatever the solver and its tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from tardis_exp.benchmark import draw, run_matrix_rules
from tardis_exp.consensus import consensus
from tardis_exp.consensus.heldout import data_rule_stats
from tardis_exp.factorize import factorize
from tardis_exp.krules import select_k
from tardis_exp.preprocess import preprocess


def _rank_r(r, n=240, m=160, seed=0):
    """A non-negative rank-r mixture (usages sum to one) plus noise 1e-3 of its mean."""
    rng = np.random.default_rng(seed)
    W = rng.dirichlet(np.full(r, 0.5), size=n)
    H = rng.gamma(1.0, 1.0, size=(r, m))
    X = W @ H
    return (X + np.abs(rng.normal(0.0, 1e-3 * X.mean(), size=X.shape))).astype(np.float32)


@pytest.mark.parametrize("rule", ["bicv", "parallel"])
@pytest.mark.parametrize("r", [3, 6])
def test_rule_finds_the_rank_of_a_noiseless_product(rule, r):
    ks = list(range(2, 11))
    stats, spread = data_rule_stats(rule, _rank_r(r), 7)(ks)
    assert select_k(ks, stats, rule, tolerance=1e-4, spread=spread) == r


def test_parallel_counts_centred_eigenvalues_plus_one():
    # a mixture of r programs whose usages sum to one has r - 1 centred dimensions
    from tardis_exp.consensus.heldout import parallel_eigen

    pa = parallel_eigen(_rank_r(5), 3)
    assert pa["above"] == 4 and pa["k"] == 5


# monti design seeds (< 1000) and their planted K, drawn here at 300 x 400 (seed 0, planted 9, is
# right at 600 x 800 only)
MONTI = {1: 6, 2: 2, 7: 4}


@pytest.mark.parametrize("seed", sorted(MONTI))
def test_parallel_reports_the_planted_k_on_monti_draws(seed):
    a = draw("monti", seed, max_spots=300, max_genes=400)
    assert a.uns["benchmark"]["planted_k"] == MONTI[seed]
    assert run_matrix_rules(a, rules=("parallel",))["rules"]["parallel"]["k"] == MONTI[seed]


def test_the_stage_gives_the_same_k_whatever_the_solver():
    a = draw("monti", 7, max_spots=300, max_genes=400)
    preprocess(a)
    got = {}
    for name, kw in {"mu": {}, "mu converged": {"tol": 1e-6}, "hals": {"solver": "hals"}}.items():
        b = a.copy()
        factorize(b, n_components=8, n_replicates=4, progress=False, **kw)
        consensus(b, min_clusters=2, max_clusters=8, n_resamples=20, k_selection="parallel",
                  outlier_threshold=2.0, progress=False)
        got[name] = int(b.uns["nmf_consensus"]["best_k"])
    assert got == {"mu": 4, "mu converged": 4, "hals": 4}
