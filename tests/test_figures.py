"""What the figures show, read off the returned matplotlib Figures: k_selection.png draws the
chosen rule's curve with its measured errors, the chosen K and the runner-up with the margin;
program_scores.png draws every program, one that is no spot's argmax included."""

import warnings

import numpy as np
import pytest


def _run(n_programs=3, min_k=2, max_k=4, weak_last=False, seed=3):
    from tardis_exp.consensus import consensus
    from tardis_exp.factorize import factorize
    from tardis_exp.preprocess import preprocess
    from tardis_exp.score import score
    from tardis_exp.synthetic import make_synthetic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = preprocess(make_synthetic(n_spots=150, n_genes=200, n_programs=n_programs, n_markers=20, seed=seed),
                       n_top_genes=120)
        factorize(a, n_components=4, n_replicates=4, max_iter=60, progress=False)
        consensus(a, min_clusters=min_k, max_clusters=max_k, n_resamples=8, progress=False)
        if weak_last:  # the last program labels no spot (a weak program, as a sweep's larger K gives)
            a.obsm["X_nmf_consensus"][:, -1] *= 1e-6
        score(a, n_cluster_genes=10)
    return a


def test_k_selection_shows_the_chosen_rules_errors_the_chosen_k_and_the_runner_up():
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from tardis_exp.krules import RULES
    from tardis_exp.plots import k_selection_figure

    a = _run()
    c = a.uns["nmf_consensus"]
    ks = np.asarray(c["k_values"])
    best, runner, margin = int(c["best_k"]), int(c["runner_up_k"]), float(c["k_margin"])
    assert runner != best and len(ks) == 3
    stat = RULES[c["k_selection"]].statistic  # recurrence, the default with method=components
    fig = k_selection_figure(a)
    ax = fig.axes[0]  # the chosen rule's panel comes first
    assert RULES[c["k_selection"]].panel in ax.get_title() and "chosen" in ax.get_title()
    (bars,) = [x for x in ax.containers if isinstance(x, ErrorbarContainer)]
    line, _, (segments,) = bars.lines
    np.testing.assert_array_equal(line.get_xdata(), ks)
    np.testing.assert_allclose(line.get_ydata(), c[stat])
    # each bar spans the value +- 2 measured standard errors of that K
    lo_hi = np.array([[seg[0][1], seg[1][1]] for seg in segments.get_segments()])
    se = np.asarray(c[f"{stat}_se"])
    assert (se > 0).any()  # the errors are measured, not zero
    np.testing.assert_allclose(lo_hi, np.c_[c[stat] - 2 * se, c[stat] + 2 * se], rtol=1e-12, atol=1e-12)
    # the chosen K and the runner-up: vertical lines there, and the margin in the legend
    vlines = {float(ln.get_xdata()[0]) for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1
              and len(ln.get_xdata()) == 2}
    assert vlines == {best, runner}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"chosen K = {best}" in legend
    assert f"runner-up K = {runner} (margin {margin:.2f})" in legend
    assert f"runner-up {runner}, margin {margin:.2f}" in fig._suptitle.get_text()
    # every other statistic a rule reads has its panel too, with its errors
    titles = [x.get_title() for x in fig.axes]
    from tardis_exp.krules import panels

    assert len(titles) == len(panels(c))
    plt.close(fig)


@pytest.mark.parametrize("basis", ["spatial", "none"])
def test_program_scores_draw_a_program_that_labels_no_spot(basis):
    import matplotlib.pyplot as plt

    from tardis_exp.plots import program_scores_figure

    a = _run(min_k=3, max_k=3, weak_last=True)
    U = np.asarray(a.obsm["X_nmf_consensus"])
    K = U.shape[1]
    assert K == 3 and not (U.argmax(1) == K - 1).any()
    fig = program_scores_figure(a, basis)
    if basis == "spatial":  # one panel per program score, then the label
        titles = [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]
        assert titles == [f"nmf_cluster_{p}" for p in range(K)] + ["nmf_program"]
        # the panel of the program no spot has: its scores, the spots' own values
        (ax,) = [x for x in fig.axes if x.get_title() == f"nmf_cluster_{K - 1}"]
        points = ax.collections[0]
        np.testing.assert_allclose(np.sort(points.get_array()), np.sort(a.obs[f"nmf_cluster_{K - 1}"]), rtol=1e-6)
    else:  # no coordinates: a heatmap column per program
        (ax,) = [x for x in fig.axes if x.get_label() != "<colorbar>"]
        assert [t.get_text() for t in ax.get_xticklabels()] == [f"program {p}" for p in range(K)]
        assert ax.get_images()[0].get_array().shape == (a.n_obs, K)
    plt.close(fig)


def test_outlier_filter_keeps_the_components_that_recur_however_noisy():
    """Real counts: one program's components from different restarts lie 0.3-0.7 apart, and
    cNMF's fixed threshold (0.35) dropped 91 of 100 components of the 10x PBMC subset, the
    recurring ones with the rest. Here 10 replicates hold noisy copies of 6 programs (distance
    ~0.5 between copies) and 2 components of their own each: the filter keeps every copy and
    drops the replicate-only components, which the fixed threshold cannot tell apart."""
    from tardis_exp.consensus.components import dropped_recurring, local_density_outliers, outlier_filter

    rng = np.random.default_rng(0)
    R, P, own, m = 10, 6, 2, 400
    programs = rng.gamma(0.3, 1.0, (P, m))
    comps, truth = [], []
    for _ in range(R):
        copies = programs * rng.lognormal(0.0, 0.45, (P, m))  # multiplicative noise on every loading
        comps += [copies, rng.gamma(0.3, 1.0, (own, m))]
        truth += [True] * P + [False] * own
    S, truth = np.vstack(comps), np.array(truth)
    replicate = np.repeat(np.arange(R), P + own)
    fixed, dens = local_density_outliers(S, 3, 0.35)
    assert fixed.sum() < truth.sum() / 2  # the fixed threshold drops most copies
    assert np.median(dens[truth]) > 0.35
    f = outlier_filter(S, replicate, 3, 0.35)
    np.testing.assert_array_equal(f["recurs"], truth)
    np.testing.assert_array_equal(f["keep"], truth)
    assert f["threshold"] > 0.35
    # switched off: the fixed threshold, as before, and a run that says it drops the copies
    off = outlier_filter(S, replicate, 3, 0.35, adaptive=False)
    np.testing.assert_array_equal(off["keep"], fixed)
    msg = dropped_recurring(off["recurs"], off["keep"], 0.35)
    assert msg and f"drops {int((truth & ~fixed).sum())} of the {int(truth.sum())} components that recur" in msg
    assert "consensus.outlier_adaptive=true" in msg
    assert dropped_recurring(f["recurs"], f["keep"], 0.35) is None


def test_outlier_filter_judges_recurrence_with_the_background_still_in_the_pool():
    """The second pass leaves the background's components out. Each of 8 replicates holds 3
    programs, the background and a leftover (the background plus loadings of its own): every
    leftover's nearest in another replicate is that replicate's background, so none recurs.
    Refiltered without the background, the leftovers are each other's reciprocal nearest, recur,
    raise the threshold and are kept -- a program more (K = 5 for 4 planted in
    test_validation's HALS background test). Judged on the whole pool they stay out."""
    from tardis_exp.consensus.components import outlier_filter

    rng = np.random.default_rng(0)
    R, P, m = 8, 3, 400
    programs = rng.gamma(0.3, 1.0, (P + 1, m))  # the last one: the background
    comps, kind = [], []
    for _ in range(R):
        leftover = programs[P] + 0.5 * rng.gamma(0.3, 1.0, m) * programs[P].mean() / 0.3
        comps += [programs * rng.lognormal(0.0, 0.15, (P + 1, m)), leftover[None]]
        kind += ["program"] * P + ["background", "leftover"]
    S, kind = np.vstack(comps), np.array(kind)
    replicate = np.repeat(np.arange(R), P + 2)
    bg = kind == "background"
    full = outlier_filter(S, replicate, 2, 0.35)
    assert full["recurs"].tolist() == (kind != "leftover").tolist() and full["keep"].tolist() == full["recurs"].tolist()
    rest = kind[~bg]
    # the mechanism: without the background in the pool, the leftovers recur and are let in
    depleted = outlier_filter(S[~bg], replicate[~bg], 2, 0.35)
    assert depleted["recurs"].all() and depleted["keep"].all() and depleted["threshold"] > 0.35
    f = outlier_filter(S, replicate, 2, 0.35, exclude=bg)
    assert len(f["keep"]) == len(rest)
    assert f["keep"].tolist() == (rest == "program").tolist() and f["threshold"] == 0.35
