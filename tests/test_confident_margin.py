"""consensus.confident_margin: the warning threshold, the candidate set, and its calibration.

The margin of the chosen K over the runner-up is in units of the measured tolerance of their
difference, ``max(k_tolerance, k_z * hypot(se_best, se_other))``; the curves below are built
with known values and standard errors, so every margin and gap is computed here by hand.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from tardis_exp.krules import report_k, select_k
from tardis_exp.params import ConsensusParams

KS = [2, 3, 4, 5, 6]
SE = 0.01
TOL2 = 2.0 * math.hypot(SE, SE)  # k_z = 2, the same se at every K


def _pick(values):
    """select_k's ``recurrence`` (best value) on a curve of known values and standard errors."""
    stats = {"recurrence": np.asarray(values, dtype=np.float64)}
    spread = {"recurrence": np.full(len(KS), SE)}
    return select_k(KS, stats, "recurrence", tolerance=0.0, spread=spread, z=2.0, return_info=True)


def _warned(caplog) -> bool:
    return any("do not separate" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("margin", [0.5, 1.5, 2.2])
def test_report_k_warns_exactly_below_the_configured_threshold(caplog, margin):
    # K = 4 best; K = 5 stands `margin` tolerances below it, the others far below
    v = [0.2, 0.3, 0.9, 0.9 - margin * TOL2, 0.1]
    k, info = _pick(v)
    assert k == 4 and info["runner_up_k"] == 5
    assert info["margin"] == pytest.approx(margin, rel=1e-9)
    for t, expect in ((margin - 1e-6, False), (margin + 1e-6, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tardis_exp.consensus"):
            assert report_k(k, info, "recurrence", KS, confident_margin=t) is expect
        assert _warned(caplog) is expect
    # the default is the declared parameter (margins 1.5 and 2.2 warned only once it was calibrated)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tardis_exp.consensus"):
        report_k(k, info, "recurrence", KS)
    assert _warned(caplog) is (margin < ConsensusParams.confident_margin)
    assert ConsensusParams.confident_margin > 2.2


def test_report_k_warns_when_no_other_k_was_compared(caplog):
    # a one-K range: the margin is infinite because nothing was compared, which is no evidence
    with caplog.at_level(logging.WARNING, logger="tardis_exp.consensus"):
        assert report_k(2, {"runner_up_k": 2, "margin": float("inf")}, "recurrence", [2], confident_margin=1.0)
    assert "do not separate K=2 from any other K" in caplog.text


def test_candidates_are_every_k_within_the_threshold(caplog):
    from tardis_exp.krules import candidates

    v = np.array([0.50, 0.88, 0.90, 0.86, 0.30])  # silhouette not measured: no tie-break, K = 4
    k, info = _pick(v)
    gaps = (v[2] - v) / TOL2  # by hand: (0.4, 0.02, 0, 0.04, 0.6) / TOL2 = 14.1, 0.71, 0, 1.41, 21.2
    assert k == 4 and info["runner_up_k"] == 3
    np.testing.assert_allclose(info["gaps"], gaps, rtol=1e-9)
    for t in (0.5, 1.0, 1.5, 2.27, 15.0):
        expect = sorted({4} | {K for K, g in zip(KS, gaps) if g < t})
        assert candidates(KS, k, info, t) == expect
    assert candidates(KS, k, info, 1.0) == [3, 4] and candidates(KS, k, info, 1.5) == [3, 4, 5]
    with caplog.at_level(logging.WARNING, logger="tardis_exp.consensus"):
        report_k(k, info, "recurrence", KS, confident_margin=1.5)
    assert "candidates K = 3, 4, 5" in caplog.text
    # a K that is not admissible is never a candidate
    stats, spread = {"recurrence": v}, {"recurrence": np.full(len(KS), SE)}
    k2, info2 = select_k(KS, stats, "recurrence", spread=spread, z=2.0, return_info=True,
                         admissible=[True, False, True, True, True])
    assert k2 == 4 and candidates(KS, k2, info2, 1.5) == [4, 5]


def test_the_stage_writes_and_logs_the_candidates(caplog):
    from tardis_exp.benchmark import draw
    from tardis_exp.consensus import SPEC, consensus
    from tardis_exp.factorize import factorize
    from tardis_exp.preprocess import preprocess

    a = preprocess(draw("spatial", 4, max_spots=300, max_genes=300), n_top_genes=300)
    factorize(a, n_components=6, n_replicates=6, progress=False)
    with caplog.at_level(logging.WARNING, logger="tardis_exp.consensus"):
        consensus(a, min_clusters=2, max_clusters=6, n_resamples=20, confident_margin=1e6, progress=False)
    c = a.uns["nmf_consensus"]
    gap = dict(zip(c["k_values"].tolist(), c["k_gap"].tolist()))
    assert gap[c["best_k"]] == 0.0
    # every K of the range is within a threshold of 1e6 (an inadmissible K has gap inf)
    assert c["k_candidates"].tolist() == sorted(k for k, g in gap.items() if g < 1e6)
    assert "candidates K = " + ", ".join(map(str, c["k_candidates"].tolist())) in caplog.text
    scalars, _ = SPEC.report(a)  # what tracking logs on the MLflow run
    assert scalars["consensus.n_k_candidates"] == len(c["k_candidates"])
    assert scalars["consensus.k_candidates_min"] == c["k_candidates"].min()
    assert scalars["consensus.k_candidates_max"] == c["k_candidates"].max()


def _script():
    spec = importlib.util.spec_from_file_location(
        "calibrate_margin", Path(__file__).resolve().parents[1] / "scripts" / "calibrate_margin.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(spec):
    """Rows as scripts/calibrate_margin.load gives them: (margin, right?)."""
    return [{"family": "f", "setting": "s", "seed": i, "planted": 5, "k": 5 if right else 6, "runner": 4,
             "margin": m, "gaps": None} for i, (m, right) in enumerate(spec)]


def test_calibration_chooses_the_smallest_threshold_that_stays_at_95_percent():
    C = _script()
    # 19 right runs at margins 4..22, a wrong one at 3.5 (precision there 19/20 = 0.95), right at
    # 3.0 and 2.5 (20/21, 21/22), wrong at 2.0 (21/23 = 0.91): the threshold is 2.5
    top = [(4.0 + i, True) for i in range(19)]
    rows = _rows(top + [(3.5, False), (3.0, True), (2.5, True), (2.0, False), (1.5, True), (0.5, True)])
    assert C.choose_threshold(rows, 0.95) == 2.5
    assert C.precision(rows, 2.5) == pytest.approx(21 / 22)
    # below 2.0 the precision climbs back over 0.95 only with many more right runs; a dip decides
    many = rows + _rows([(1.8, True)] * 40)
    assert C.precision(many, 1.8) >= 0.95 and C.choose_threshold(many, 0.95) == 2.5
    # the largest margin is a wrong run: no threshold gives a confident run
    assert C.choose_threshold(_rows([(9.0, False), (3.0, True)]), 0.95) == math.inf


def test_calibration_rates_count_the_warned_pair_and_the_set():
    C = _script()
    rows = _rows([(3.0, True), (1.0, False), (0.2, True)])
    rows[1].update(planted=4)  # K 6, runner-up 4: the pair covers it
    rows.append({"family": "f", "setting": "s", "seed": 9, "planted": 2, "k": 5, "runner": 5,
                 "margin": math.inf, "gaps": {5: 0.0, 4: 0.3, 3: 1.7, 2: 9.0}})  # one-K comparison: warned
    rows.append({"family": "f", "setting": "s", "seed": 10, "planted": 3, "k": None, "runner": None,
                 "margin": math.nan, "gaps": None})  # refused
    c = C.rates(rows, 2.0)
    assert (c["n"], c["refused"], c["unwarned"], c["right"]) == (4, 1, 1, 1)
    assert (c["warned"], c["pair"]) == (3, 2)  # 4 in {6, 4}, 5 in {5, 4}; 2 not in {5, 5}
    assert (c["set_n"], c["set"]) == (1, 0)  # {5, 4, 3}: gap 1.7 < 2.0, 9.0 not
    assert C.candidate_set(rows[3], 10.0) == {2, 3, 4, 5}
