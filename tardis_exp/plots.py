"""Figures a person would rather look at than read (PNG files, logged to MLflow).

Every figure reads only what the stages wrote into the AnnData:

``consensus_matrices.png``
    The consensus matrix of every K, rows and columns ordered by average-linkage
    clustering of ``1 - M`` (``uns['nmf_consensus']['matrices']``).
``consensus_cdf.png``
    The empirical CDF of the consensus values per K (``cdf`` over ``cdf_grid``).
``k_selection.png``
    The statistic of every K rule (``tardis_exp.krules``) against K with two measured standard
    errors; the chosen rule's panel first, with the chosen K, the runner-up and the margin.
``reconstruction_error.png``
    The reconstruction error of every factorization replicate (``uns['nmf']['errors']``).
``program_scores.png``
    Every program score ``obs['nmf_cluster_{i}']`` and the argmax label on the spot
    coordinates (``obsm['spatial']``, scanpy's plotting; several samples side by side,
    never drawn over each other); without coordinates, a heatmap of the scores of spots
    sorted by label.
``top_genes_dotplot.png``
    scanpy dot plot of each program's top genes by ``obs['nmf_program']``; every program
    has its row, an empty one for a program that is no spot's label.
``programs_by_section.png``
    With several samples (``data.sample_key``) and spot coordinates: each program's usage
    on each section's tissue, one row per program, one column per section, one colour
    scale per program (shared by its sections); a program flagged sample-specific has
    its label in red (``uns['nmf_samples']``).

The spot label in the figures is ``obs['nmf_program']`` (argmax of the consensus usages);
results without it (older runs) fall back to the seed's ``obs['nmf_cluster']``.
:func:`k_selection_ranks` draws a sweep's K selection across ranks (the sweeper's study
figures, ``k_selection_ranks.png``).

:func:`make_plots` draws them all; one figure that fails is a logged warning, never a
failed run. From a shell, for any finished run (sweep trials skip the figures)::

    python -m tardis_exp.plots outputs/multirun/<time>/<trial>/result.h5ad [OUT_DIR]
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (sweep workers, servers)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .keys import CONSENSUS, NMF, SCORE, ResultKeys, result_keys  # noqa: E402
from .krules import panels as k_rule_panels  # noqa: E402

log = logging.getLogger(__name__)

DPI = 100


def _save(fig, path: Path, dpi: int = DPI) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid(n: int, ncols: int, size: float = 2.6, height: float | None = None):
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, (height or size) * nrows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


def cluster_order(M: np.ndarray) -> np.ndarray:
    """Leaf order of average-linkage clustering on ``1 - M`` (blocks on the diagonal)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    n = M.shape[0]
    if n < 3:
        return np.arange(n)
    D = np.clip(1.0 - np.asarray(M, dtype=np.float64), 0, None)
    D = (D + D.T) / 2
    np.fill_diagonal(D, 0)
    return leaves_list(linkage(squareform(D, checks=False), method="average"))


def consensus_matrices(adata, path: Path, *, keys: ResultKeys = ResultKeys()) -> Path:
    """Ordered consensus-matrix heatmap for every K in the range."""
    c = adata.uns[keys.consensus.uns]
    ks = [int(k) for k in c["k_values"]]
    mats = c["matrices"]
    fig, axes = _grid(len(ks), ncols=4, size=2.7)
    im = None
    for ax, k in zip(axes, ks):
        M = np.asarray(mats[str(k)])
        o = cluster_order(M)
        im = ax.imshow(M[np.ix_(o, o)], vmin=0, vmax=1, cmap="Blues", interpolation="nearest")
        chosen = k == int(c["best_k"])
        ax.set_title(f"K = {k}" + (" (chosen)" if chosen else ""), fontsize=10,
                     color="crimson" if chosen else "black", fontweight="bold" if chosen else "normal")
        ax.set_xticks([])
        ax.set_yticks([])
    what = "components" if c.get("method", "components") == "components" else "spots"
    fig.suptitle(f"consensus matrices ({M.shape[0]} {what}, ordered by clustering)", fontsize=11)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="consensus")
    return _save(fig, path)


def consensus_cdf(adata, path: Path, *, keys: ResultKeys = ResultKeys()) -> Path:
    """Empirical CDF of the consensus values, one curve per K."""
    c = adata.uns[keys.consensus.uns]
    ks = [int(k) for k in c["k_values"]]
    grid = np.asarray(c["cdf_grid"])
    cdf = np.asarray(c["cdf"])
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(ks)))
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for k, y, col in zip(ks, cdf, colors):
        chosen = k == int(c["best_k"])
        ax.step(grid, y, where="post", color="crimson" if chosen else col, lw=2.5 if chosen else 1.2,
                label=f"K = {k}" + (" (chosen)" if chosen else ""), zorder=3 if chosen else 2)
    ax.set_xlabel("consensus value")
    ax.set_ylabel("CDF")
    ax.set_title("consensus CDF (flat middle = stable clusters)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def k_selection(adata, path: Path, *, keys: ResultKeys = ResultKeys()) -> Path:
    """:func:`k_selection_figure`, saved."""
    return _save(k_selection_figure(adata, keys=keys), path, dpi=110)


def k_selection_figure(adata, *, keys: ResultKeys = ResultKeys()):
    """The statistic of every K rule against K (the registry, ``tardis_exp.krules``), each with
    error bars of two measured standard errors (``<statistic>_se``); the chosen rule's panel
    first, titled so, with the chosen K and the runner-up marked and the margin between them
    (in measured tolerances: below 1 the data do not separate them). Returns the Figure."""
    from .krules import RULES

    c = adata.uns[keys.consensus.uns]
    ks = np.asarray(c["k_values"])
    best, runner = int(c["best_k"]), c.get("runner_up_k")
    margin = float(c.get("k_margin", np.nan))
    rule = str(c.get("k_selection", "pac"))
    chosen_stat = RULES[rule].statistic if rule in RULES else None
    panels = k_rule_panels(c)  # every statistic a K rule reads (tardis_exp/krules.py), as measured
    panels.sort(key=lambda p: p[0] != chosen_stat)  # the chosen rule's curve first
    fig, axes = plt.subplots(1, len(panels), figsize=(3.7 * len(panels), 3.4), squeeze=False)
    axes = axes.ravel()
    for ax, (key, label) in zip(axes, panels):
        chosen = key == chosen_stat
        se = c.get(f"{key}_se")
        y = np.asarray(c[key], dtype=float)
        ax.errorbar(ks, y, yerr=None if se is None else 2 * np.asarray(se, dtype=float), fmt="o-", capsize=3,
                    color="tab:blue", lw=2 if chosen else 1, label="±2 measured SE" if se is not None else None)
        ax.axvline(best, color="crimson", ls="--", label=f"chosen K = {best}")
        if chosen:
            i = int(np.flatnonzero(ks == best)[0])
            ax.plot([best], [y[i]], "*", color="crimson", ms=14, zorder=5)
            if runner is not None and int(runner) != best and int(runner) in ks:
                j = int(np.flatnonzero(ks == int(runner))[0])
                ax.axvline(int(runner), color="darkorange", ls=":",
                           label=f"runner-up K = {int(runner)} (margin {margin:.2f})")
                ax.plot([int(runner)], [y[j]], "D", color="darkorange", ms=8, zorder=5)
            ax.set_title(f"{label}\n(rule {rule}: chosen)", fontweight="bold")
            ax.legend(fontsize=7)
        else:
            ax.set_title(label)
        ax.set_xlabel("K")
        ax.set_xticks(ks)
    if chosen_stat is None:
        axes[0].legend(fontsize=7)
    what = f"K = {best}" + (f", runner-up {int(runner)}, margin {margin:.2f}" if runner is not None
                            and int(runner) != best else "")
    fig.suptitle(f"K selection (rule: {rule}; {what})", fontsize=11)
    fig.tight_layout()
    return fig


def reconstruction_error(adata, path: Path, *, keys: ResultKeys = ResultKeys()) -> Path:
    """Reconstruction error of every factorization replicate; the best one marked."""
    nmf = adata.uns[keys.nmf.uns]
    errs = np.asarray(nmf["errors"], dtype=float)
    reps = np.arange(len(errs))
    best = int(np.argmin(errs))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(errs) + 2), 3.2))
    ax.plot(reps, errs, "o", color="tab:blue")
    ax.plot(reps[best], errs[best], "o", color="crimson", ms=9, label=f"best: replicate {best}")
    ax.set_xlabel("replicate")
    loss = str(dict(nmf.get("params", {})).get("beta_loss", "frobenius"))
    ax.set_ylabel(f"reconstruction error ({loss})")
    ax.set_xticks(reps)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title(f"factorization replicates (K = {adata.obsm[keys.nmf.usage].shape[1]})"
                 if keys.nmf.usage in adata.obsm else "factorization replicates")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _label_key(adata, keys: ResultKeys = ResultKeys()) -> str | None:
    """The spot label to show: the program label, or the seed's for results without it."""
    return next((k for k in (keys.score.program, keys.score.cluster) if k in adata.obs), None)


def _score_keys(adata, keys: ResultKeys = ResultKeys()) -> list[str]:
    out, i = [], 0
    while keys.score.score(i) in adata.obs:
        out.append(keys.score.score(i))
        i += 1
    return out


def _side_by_side(adata, basis: str, keys: ResultKeys = ResultKeys()) -> np.ndarray:
    """The spots' 2-D coordinates; with several samples (``uns['nmf_samples']``) each section
    shifted right of the previous one, so that sections whose coordinates overlap are not
    drawn over each other."""
    xy = np.array(adata.obsm[basis], dtype=np.float64)[:, :2]
    t = adata.uns.get(keys.score.samples)
    if t is None or str(t.get("sample_key")) not in adata.obs:
        return xy
    labels = adata.obs[str(t["sample_key"])].astype(str).to_numpy()
    start = 0.0
    for name in (str(n) for n in np.atleast_1d(t["samples"])):
        idx = labels == name
        if idx.any():
            lo, hi = xy[idx, 0].min(), xy[idx, 0].max()
            xy[idx, 0] += start - lo
            start += (hi - lo) * 1.1 + 1.0  # a gap of a tenth of the section between sections
    return xy


def program_scores(adata, path: Path, basis: str = "spatial", *, keys: ResultKeys = ResultKeys()) -> Path:
    """Every program score on the spot coordinates (scanpy), or a heatmap without them."""
    fig = program_scores_figure(adata, basis, keys=keys)
    return _save(fig, path, dpi=80 if basis in adata.obsm else DPI)


def program_scores_figure(adata, basis: str = "spatial", *, keys: ResultKeys = ResultKeys()):
    """The Figure of :func:`program_scores`: one panel per program score (whether or not the
    program is some spot's label) and the label, or one heatmap column per program."""
    label = _label_key(adata, keys)
    prefix = keys.score.score(0)[:-1]
    cols = _score_keys(adata, keys)
    if not cols:
        raise ValueError(f"no obs['{prefix}{{i}}'] columns: run the score stage first")
    if basis in adata.obsm and np.asarray(adata.obsm[basis]).shape[1] >= 2:
        import scanpy as sc

        # a light copy: scanpy writes colours into .uns; only obs/obsm are needed
        view = adata.__class__(obs=adata.obs[cols + ([label] if label else [])],
                               obsm={basis: _side_by_side(adata, basis, keys)})
        # scanpy's scatter on the coordinates: ~4x faster than sc.pl.spatial's circle patches
        # at 3,600 spots; y inverted as sc.pl.spatial does for tissue-image coordinates
        with plt.rc_context({"figure.figsize": (3.4, 3.4)}):
            fig = sc.pl.embedding(view, basis=basis, color=list(view.obs.columns), ncols=4, cmap="viridis",
                                  size=float(np.clip(75000 / max(view.n_obs, 1), 1, 300)), frameon=False,
                                  show=False, return_fig=True, wspace=0.15)
        for ax in fig.axes:
            if ax.get_label() != "<colorbar>":
                ax.invert_yaxis()
                ax.set_aspect("equal", adjustable="box")
        return fig
    # no coordinates: scores of spots (rows, sorted by label) x programs
    z = adata.obs[cols].to_numpy(dtype=float)
    order = np.lexsort((-z.max(1), z.argmax(1)))
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(cols), 5))
    lim = float(np.nanpercentile(np.abs(z), 99)) or 1.0
    im = ax.imshow(z[order], aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([k.replace(prefix, "program ") for k in cols], rotation=90)
    ax.set_ylabel(f"{adata.n_obs} spots (sorted by program)")
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, label="z-scored program score")
    ax.set_title("program scores")
    return fig


def k_selection_ranks(trials, path: Path, chosen: int | None = None, objective: str | None = None) -> Path:
    """K selection across factorization ranks (cNMF's plot): stability and error vs n_components.

    ``trials`` is a list of mappings with ``n_components``, ``consensus.stability`` (cNMF's
    silhouette of the components at K = n_components), ``reconstruction_error`` and
    optionally ``best_k`` and ``consensus.spot_cophenetic`` (Brunet's statistic at that
    rank). Several trials at one rank (a sweep over cluster ranges too) are shown by their
    mean stability and smallest error. ``chosen`` (the best trial's index in ``trials``)
    is marked with its ``best_k``.
    """
    ranks = sorted({int(t["n_components"]) for t in trials})
    if not ranks:
        raise NotDrawn("no trial with n_components")

    def per_rank(key, how):
        out = []
        for r in ranks:
            v = [float(t[key]) for t in trials if int(t["n_components"]) == r and key in t
                 and t[key] is not None and np.isfinite(float(t[key]))]
            out.append(how(v) if v else np.nan)
        return np.asarray(out)

    stab = per_rank("consensus.stability", np.mean)
    coph = per_rank("consensus.spot_cophenetic", np.mean)
    err = per_rank("reconstruction_error", np.min)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(ranks, stab, "o-", color="tab:blue", label="stability (silhouette of components)")
    if np.isfinite(coph).any():
        ax.plot(ranks, coph, "s--", color="tab:green", label="cophenetic of spot labels (Brunet)")
    ax.set_xlabel("n_components (factorization rank)")
    ax.set_ylabel("stability", color="tab:blue")
    ax.set_xticks(ranks)
    ax2 = ax.twinx()
    ax2.plot(ranks, err, "^-", color="tab:red", label="reconstruction error (min)")
    ax2.set_ylabel("reconstruction error", color="tab:red")
    ax2.ticklabel_format(axis="y", useOffset=False, style="sci", scilimits=(-3, 4))
    if chosen is not None:
        t = trials[chosen]
        r = int(t["n_components"])
        i = ranks.index(r)
        y = stab[i] if np.isfinite(stab[i]) else np.nanmean(stab)
        ax.axvline(r, color="crimson", ls=":", lw=1)
        ax.plot([r], [y], "*", color="crimson", ms=16, zorder=5,
                label=f"best trial: n_components={r}" + (f", K={int(t['best_k'])}" if "best_k" in t else ""))
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    ax.set_title("K selection across ranks" + (f" (objective: {objective})" if objective else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def study_k_selection(study, path: Path) -> Path | None:
    """:func:`k_selection_ranks` for an Optuna study of tardis-exp trials (the sweeper's study
    figures): each COMPLETE trial's ``metrics.yaml`` in its output folder, its sampled
    ``factorize.n_components`` (or the one in its ``config.yaml``). ``None`` when no trial
    has both (another machine's trials, or the rank was not part of the run)."""
    import yaml
    from optuna.trial import TrialState

    trials, numbers = [], []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        out = t.user_attrs.get("output_dir")
        if not out or not (Path(out) / "metrics.yaml").is_file():
            continue
        m = yaml.safe_load((Path(out) / "metrics.yaml").read_text()) or {}
        r = (t.user_attrs.get("values") or {}).get("factorize.n_components")
        if r is None and (Path(out) / "config.yaml").is_file():
            r = (yaml.safe_load((Path(out) / "config.yaml").read_text()) or {}).get("factorize", {}).get("n_components")
        if r is None:
            continue
        trials.append({**m, "n_components": int(r)})
        numbers.append(t.number)
    if not trials:
        return None
    chosen, objective = None, None
    if len(study.directions) == 1:
        best = study.best_trial.number
        chosen = numbers.index(best) if best in numbers else None
        objective = study.metric_names[0] if getattr(study, "metric_names", None) else None
    return k_selection_ranks(trials, path, chosen=chosen, objective=objective)


class NotDrawn(Exception):
    """A figure whose input this result does not hold, by configuration (not an error)."""


class NotApplicable(NotDrawn):
    """A figure of another kind of run (several samples), not drawn without a word."""


def top_genes_dotplot(adata, path: Path, n_genes: int = 5, *, keys: ResultKeys = ResultKeys()) -> Path:
    """scanpy dot plot of each program's top genes, spots grouped by ``obs['nmf_program']``."""
    return _save(dotplot_figure(adata, n_genes, keys=keys).fig, path)


def dotplot_figure(adata, n_genes: int = 5, *, keys: ResultKeys = ResultKeys()):
    """The drawn :class:`scanpy.pl.DotPlot` of :func:`top_genes_dotplot`: one row per program
    (``'<program> (<n> spots)'``, empty for a program that is no spot's label), one column
    group per program's top genes."""
    import scanpy as sc

    if adata.X is None:
        raise NotDrawn("needs X: this result was saved without it (save_result=results) and X could not "
                       "be restored from the stage cache (disabled, or the entry is gone); run the "
                       "overrides in the run's overrides.txt again with save_result=full")
    table = adata.uns[keys.score.programs]
    table = table.sort_values(["program", "rank"])
    genes: dict[str, list[str]] = {}
    seen: set[str] = set()
    for p, sub in table.groupby("program", sort=True):
        top = [g for g in sub["gene"].astype(str) if g in adata.var_names and g not in seen][:n_genes]
        seen.update(top)
        if top:
            genes[str(p)] = top
    if not genes:
        raise ValueError(f"no top gene of uns['{keys.score.programs}'] is in var_names")
    import anndata as ad
    import pandas as pd

    from .chunked import is_dask

    cols = [g for gs in genes.values() for g in gs]
    X = adata[:, cols].X
    X = X.compute() if is_dask(X) else X  # data.backend=dask: read only the plotted genes' columns
    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)
    key = _label_key(adata, keys) or keys.score.cluster
    labels = adata.obs[key]
    if not isinstance(labels.dtype, pd.CategoricalDtype):
        labels = labels.astype("category")
    # every program is a row, with its spot count: a program that is no spot's argmax
    # (scanpy drops empty groups and then fails looking them up) is an empty row, not a lost figure
    counts = labels.value_counts(sort=False)
    names = {c: f"{c} ({int(counts[c])} spots)" for c in labels.cat.categories}
    rows = pd.Categorical(labels).rename_categories(names)
    frame = pd.DataFrame(X, columns=cols, index=rows)
    grouped = frame.groupby(level=0, observed=False)
    # scanpy's defaults: dot size = fraction of the group's spots with a value > 0, colour = the mean
    size = (frame > 0).groupby(level=0, observed=False).mean().fillna(0.0)
    color = grouped.mean().fillna(0.0)
    view = ad.AnnData(X=X, obs=pd.DataFrame({key: rows}, index=adata.obs_names),
                      var=pd.DataFrame(index=pd.Index(cols)))
    dp = sc.pl.dotplot(view, var_names=genes, groupby=key, use_raw=False, show=False, return_fig=True,
                       dot_size_df=size, dot_color_df=color, title="top genes per program")
    dp.make_figure()
    return dp


def programs_by_section_figure(adata, basis: str = "spatial", *, keys: ResultKeys = ResultKeys()):
    """The figure of :func:`programs_by_section`: a programs x sections grid of panels (their
    ``Axes`` labelled ``'program <p> | <sample>'``), one colour bar per program.

    Every program has its row (also one that is no spot's argmax). The colour is the
    consensus usage (``obsm['X_nmf_consensus']``; the z-scored gene-set score without it),
    on a scale shared by the program's sections (0 to its 99.5th percentile over all
    spots), so a section where the program is weak looks weak.
    """
    t = adata.uns.get(keys.score.samples)
    if t is None:
        raise NotApplicable(f"no uns['{keys.score.samples}']: the run has one sample (no data.sample_key)")
    if basis not in adata.obsm or np.asarray(adata.obsm[basis]).shape[1] < 2:
        raise NotDrawn(f"no obsm['{basis}'] coordinates: the sections cannot be drawn on the tissue")
    names = [str(n) for n in np.atleast_1d(t["samples"])]
    sample_key = str(t["sample_key"])
    labels = adata.obs[sample_key].astype(str).to_numpy()
    if keys.consensus.usage in adata.obsm:
        values, what = np.asarray(adata.obsm[keys.consensus.usage], dtype=np.float64), "usage"
    else:
        values, what = adata.obs[_score_keys(adata, keys)].to_numpy(dtype=np.float64), "z-scored score"
    xy = np.asarray(adata.obsm[basis], dtype=np.float64)[:, :2]
    specific = np.asarray(t["sample_specific"], dtype=bool)
    to = np.atleast_1d(np.asarray(t["specific_to"], dtype=str))
    K, S = values.shape[1], len(names)
    fig, axes = plt.subplots(K, S, figsize=(2.3 * S + 0.8, 2.3 * K), squeeze=False)
    for p in range(K):
        v = values[:, p]
        lo = float(np.nanmin(v)) if what != "usage" else 0.0
        hi = float(np.nanpercentile(v, 99.5))
        hi = hi if hi > lo else lo + 1.0  # a program with no usage: one colour, still drawn
        im = None
        for s, name in enumerate(names):
            ax = axes[p, s]
            ax.set_label(f"program {p} | {name}")
            idx = labels == name
            im = ax.scatter(xy[idx, 0], xy[idx, 1], c=v[idx], s=float(np.clip(15000 / max(idx.sum(), 1), 0.5, 200)),
                            cmap="viridis", vmin=lo, vmax=hi, linewidths=0, rasterized=True)
            ax.invert_yaxis()  # tissue-image coordinates, as in program_scores.png
            ax.set_aspect("equal", adjustable="datalim")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if p == 0:
                ax.set_title(name, fontsize=10)
        flag = bool(specific[p]) if p < len(specific) else False
        axes[p, 0].set_ylabel(f"program {p}" + (f"\nspecific to {to[p]}" if flag else ""), fontsize=10,
                              color="crimson" if flag else "black")
        fig.colorbar(im, ax=list(axes[p]), shrink=0.8, label=what)
    fig.suptitle(f"programs by section ({sample_key})", fontsize=11)
    return fig


def programs_by_section(adata, path: Path, basis: str = "spatial", *, keys: ResultKeys = ResultKeys()) -> Path:
    """Each program on each section's tissue (:func:`programs_by_section_figure`)."""
    return _save(programs_by_section_figure(adata, basis, keys=keys), path, dpi=80)


PLOTS = {
    "consensus_matrices.png": consensus_matrices,
    "consensus_cdf.png": consensus_cdf,
    "k_selection.png": k_selection,
    "reconstruction_error.png": reconstruction_error,
    "program_scores.png": program_scores,
    "top_genes_dotplot.png": top_genes_dotplot,
    "programs_by_section.png": programs_by_section,
}


def make_plots(adata, out_dir, *, nmf_key: str = NMF, consensus_key: str = CONSENSUS,
               score_key: str = SCORE) -> list[Path]:
    """Draw every figure into ``out_dir``; return the files written.

    ``nmf_key``, ``consensus_key``, ``score_key``: the stages' ``key_added`` of the result to
    draw (:mod:`tardis_exp.keys`), when an AnnData holds more than one.

    A figure that cannot be drawn (missing input, plotting error) is skipped with a
    warning naming it: plots are a view of the result, never a reason to lose it.
    """
    keys = result_keys(nmf_key, consensus_key, score_key)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn in PLOTS.items():
        t0 = time.perf_counter()
        try:
            written.append(fn(adata, out_dir / name, keys=keys))
        except NotApplicable as e:
            log.debug("plot %s not drawn: %s", name, e)
        except NotDrawn as e:
            log.info("plot %s not drawn: %s", name, e)
        except Exception as e:  # noqa: BLE001 -- any plotting failure is non-fatal by design
            log.warning("plot %s skipped: %s: %s", name, type(e).__name__, e)
            plt.close("all")
        else:
            log.debug("plot %s in %.2fs", name, time.perf_counter() - t0)
    return written


def read_result(path):
    """Read a run's ``result.h5ad``; a result saved without ``X`` (``save_result=results``,
    sweep trials) gets it back from the stage cache when the cache still holds the run's
    preprocessed data (``config.yaml`` beside the result says where), without reading the
    raw data. Otherwise ``X`` stays ``None`` and the figures that need it are not drawn.
    """
    import anndata as ad
    import yaml

    path = Path(path)
    adata = ad.read_h5ad(path)
    cfg_path = path.parent / "config.yaml"
    if adata.X is not None or not cfg_path.is_file():
        return adata
    try:
        from .cache import StageCache

        cfg = yaml.safe_load(cfg_path.read_text())
        pre = StageCache.from_config(cfg.get("cache")).cached_preprocessed(cfg)
    except Exception as e:  # noqa: BLE001 -- a view of the result: never fail on the cache
        log.info("%s: X not restored from the stage cache: %s: %s", path, type(e).__name__, e)
        return adata
    if pre is not None and pre.obs_names.equals(adata.obs_names) and pre.var_names.equals(adata.var_names):
        adata.X = pre.X
        log.info("%s: X restored from the stage cache", path)
    return adata


def main(argv=None) -> int:
    """``python -m tardis_exp.plots RESULT.h5ad [OUT_DIR]``: draw a finished run's figures."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m tardis_exp.plots", description=main.__doc__)
    ap.add_argument("result", type=Path, help="a run's result.h5ad")
    ap.add_argument("out_dir", type=Path, nargs="?", help="default: plots/ beside the result")
    a = ap.parse_args(argv)
    if not a.result.is_file():
        print(f"error: {a.result} is not a file (a run's result.h5ad)", file=sys.stderr)
        return 2
    try:
        adata = read_result(a.result)
    except Exception as e:  # noqa: BLE001 -- say which file and why, in one line
        print(f"error: cannot read {a.result}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if "nmf_consensus" not in adata.uns:
        print(f"error: {a.result} holds no consensus result (uns['nmf_consensus']); "
              "is it a tardis-exp result.h5ad?", file=sys.stderr)
        return 2
    written = make_plots(adata, a.out_dir or a.result.parent / "plots")
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
