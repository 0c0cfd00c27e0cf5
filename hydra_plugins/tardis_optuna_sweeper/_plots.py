"""The study's figures: Optuna's optimization history, parameter importances, Pareto
front and the K-selection ranks (:func:`tardis_exp.plots.study_k_selection`), and the
figures of a best trial that skipped its own (the sweep presets set
``tracking.log_plots=false``). A figure that cannot be drawn is a warning, never a failure."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._common import OUTPUT_DIR_ATTR
from ._objectives import Objective

log = logging.getLogger(__name__)


def safe_name(s: str) -> str:
    """A metric name as part of a file name."""
    return re.sub(r"[^\w.-]", "_", s)


def study_plots(study: optuna.Study, objectives: List[Objective], out: Path) -> List[Path]:
    """Draw the study's figures into ``out``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    paths: List[Path] = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        log.info("No COMPLETE trial: skipping plots")
        return paths

    def save(name: str, fn: Callable[[], Any]) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure  # type: ignore
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            p = out / f"{name}.png"
            fig.savefig(p, dpi=100)
            plt.close(fig)
            paths.append(p)
        except Exception as e:  # noqa: BLE001 -- a view of the study: never a reason to fail it
            log.warning("Could not plot %s: %s", name, e)
            plt.close("all")

    multi = len(objectives) > 1
    for i, o in enumerate(objectives):
        suffix = f"_{safe_name(o.metric)}" if multi else ""
        target = (lambda t, i=i: t.values[i]) if multi else None
        save(f"optimization_history{suffix}",
             lambda target=target, o=o: ovm.plot_optimization_history(study, target=target, target_name=o.metric))
        if len(complete) >= 2:
            save(f"param_importances{suffix}",
                 lambda target=target, o=o: ovm.plot_param_importances(study, target=target, target_name=o.metric))
        else:
            log.info("Fewer than 2 COMPLETE trials: skipping parameter importances")
    if multi and len(objectives) in (2, 3):
        save("pareto_front", lambda: ovm.plot_pareto_front(study, target_names=[o.metric for o in objectives]))
    try:  # stability and error against n_components, the best trial marked (tardis_exp.plots)
        from tardis_exp.plots import study_k_selection

        p = study_k_selection(study, out / "k_selection_ranks.png")
        if p is not None:
            paths.append(p)
    except Exception as e:  # noqa: BLE001 -- a view of the study: never a reason to fail it
        log.warning("Could not plot k_selection_ranks: %s: %s", type(e).__name__, e)
        plt.close("all")
    return paths


def best_trial_figures(t: FrozenTrial) -> Optional[Path]:
    """Draw the figures of a trial that skipped them from its ``result.h5ad``.

    Returns their folder, or None when there is nothing to draw: the result is on another
    worker's machine or was not saved, or the trial drew them itself.
    """
    out_dir = t.user_attrs.get(OUTPUT_DIR_ATTR)
    result = Path(out_dir) / "result.h5ad" if out_dir else None
    if result is None or not result.is_file():
        return None
    plots = result.parent / "plots"
    if plots.is_dir() and any(plots.glob("*.png")):
        return None  # drawn by the trial itself (tracking.log_plots=true)
    from tardis_exp.plots import make_plots, read_result

    written = make_plots(read_result(result), plots)
    log.info("Trial %d (best): figures in %s", t.number, plots)
    return plots if written else None
