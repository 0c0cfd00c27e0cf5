"""The K-selection rules of the consensus stage: one registry, :data:`RULES`.

Each rule is a :class:`KRule`: the per-K statistic it reads, whether higher or lower is
better, a label and a one-line summary, the consensus methods that measure its statistic,
and its ``pick`` function. Everything else reads the registry: the allowed values of
``consensus.k_selection`` and its cross-check (:mod:`tardis_exp.params`), :func:`select_k`,
the panels of ``k_selection.png`` (:mod:`tardis_exp.plots`). ``auto`` is :data:`AUTO`.

Adding a rule is one entry of :data:`RULES` (and its pick function, here). The module sits
beside ``params.py``, not in the ``tardis_exp.consensus`` package, and imports only the
standard library at import (NumPy inside its functions): ``params.py`` reads it on
``import tardis_exp``, and the package's ``__init__`` is the stage, with its heavy imports.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

from .errors import ConfigError

log = logging.getLogger("tardis_exp.consensus")


@dataclass
class Curve:
    """What a rule sees of one K range: the statistic oriented so that higher is better.

    ``v`` the oriented values per K (NaN -> -inf), ``se`` their measured standard errors,
    ``idx`` the positions of the admissible K, ``silhouette`` per K (NaN where not
    measured), ``evidence`` per K (the rule fills it: the change that decided each K, in
    units of the tolerance).
    """

    ks: Any
    v: Any
    se: Any
    idx: Any
    silhouette: Any
    tolerance: float
    z: float
    largest_stable: bool
    evidence: Any

    def tol2(self, i, j) -> float:
        """Tolerance of the difference of the estimates at positions ``i`` and ``j``."""
        import numpy as np

        return max(self.tolerance, self.z * float(np.hypot(self.se[i], self.se[j])), 1e-12)

    def by_value(self, tie_break: bool = True):
        """The best value; K the statistic cannot tell apart (within the tolerance) are told
        apart by how distinct their clusters are (silhouette, with ``tie_break``): with
        method=components a K below the truth merges programs into clusters that are just as
        stable (PAC 0, cophenetic 1) but less distinct. Without a silhouette: the best value.
        Returns ``(best, runner, margin)`` (positions, margin in units of the tolerance)."""
        import numpy as np

        v, idx, sil = self.v, self.idx, self.silhouette
        top = idx[np.argmax(v[idx])]
        tied = [i for i in idx if v[i] >= v[top] - self.tol2(i, top)]
        if tie_break and len(tied) > 1 and np.isfinite(sil[tied]).any():
            best = tied[int(np.nanargmax(np.where(np.isfinite(sil[tied]), sil[tied], -np.inf)))]
        else:
            best = top
        others = [i for i in idx if i != best]
        runner = max(others, key=lambda i: v[i]) if others else best
        margin = float((v[best] - v[runner]) / self.tol2(best, runner)) if others else float("inf")
        return best, runner, margin

    def gaps(self, best):
        """How far each K's value stands below the chosen K's, in units of the tolerance of
        their difference (0 at ``best``, negative where a K's value is higher, inf for a K
        that is not admissible): the candidate set is the K whose gap is below
        ``consensus.confident_margin`` (:func:`candidates`)."""
        import numpy as np

        out = np.full(len(self.ks), np.inf)
        for i in self.idx:
            out[i] = 0.0 if i == best else float((self.v[best] - self.v[i]) / self.tol2(best, i))
        return out


@dataclass(frozen=True)
class KRule:
    """One K-selection rule.

    ``statistic``: the per-K entry of ``uns['nmf_consensus']`` it reads (and of the
    ``spread`` of standard errors); ``pick``: ``Curve -> (best, runner, margin)``, positions
    in the K range; ``methods``: the consensus methods that measure the statistic, with
    ``requires`` saying why where that is not every method.
    """

    name: str
    statistic: str
    higher_is_better: bool
    label: str
    summary: str
    pick: Callable[[Curve], tuple]
    methods: tuple[str, ...] = ("components", "spots")
    requires: str = ""
    alias: str = ""  # the rule this one is under another name (for the help)
    #: ``"data"``: the statistic is measured on the matrix itself (tardis_exp.consensus.heldout),
    #: not on the replicates -- the K does not depend on factorize.solver or its tolerance, and
    #: the replicates' admissibility (consensus.min_cluster_replicates) does not restrict it
    source: str = "replicates"

    @property
    def panel(self) -> str:
        """Title of the statistic's panel in ``k_selection.png``."""
        return self.label if self.higher_is_better else f"{self.label} (lower is better)"

    def oriented(self, stats: dict):
        """The statistic, oriented so that higher is better (NaN: worst)."""
        import numpy as np

        sign = 1.0 if self.higher_is_better else -1.0
        v = np.asarray(stats[self.statistic], dtype=np.float64)
        return sign * np.nan_to_num(v, nan=-np.inf if sign > 0 else np.inf)


# ---------------------------------------------------------------- the pick functions


def _best_value(c: Curve):
    return c.by_value(tie_break=True)


def _best_silhouette(c: Curve):
    return c.by_value(tie_break=False)  # the silhouette is the statistic: no tie-break by itself


def _last_gain(c: Curve):
    """The last K whose gain over K - 1 is significantly above 0 (Monti's delta area)."""
    ks, v, se, idx, ev = c.ks, c.v, c.se, c.idx, c.evidence
    # K_i gains consensus over K_i - 1 when delta(K_i) exceeds the tolerance; the first
    # K of the range has no K - 1 to gain over: it starts the run
    for i in range(1, len(ks)):
        ev[i] = v[i] / max(c.tolerance, c.z * se[i], 1e-12)
    best = idx[0]
    for i in idx[1:]:
        if ev[i] > 1:
            best = i
        else:
            break
    # the competitor is the next K: how far the gain at K stands above the gain after it
    runner = best + 1 if best + 1 < len(ks) else max(best - 1, 0)
    margin = float(ev[best] - max(ev[runner], 0.0)) if best != idx[0] else float(1.0 - ev[runner])
    return best, runner, margin


def _last_before_drop(c: Curve):
    """The last K before the first significant drop (Brunet; PAC's first rise); with
    ``largest_stable`` the largest admissible K within the tolerance of the best value."""
    import numpy as np

    ks, v, idx, ev = c.ks, c.v, c.idx, c.evidence
    if c.largest_stable:
        top = idx[np.argmax(v[idx])]
        best = max(i for i in idx if v[i] >= v[top] - c.tol2(i, top))
        nxt = [i for i in range(best + 1, len(ks))]
        runner = nxt[0] if nxt else max((i for i in idx if i != best), key=lambda i: v[i], default=best)
        margin = float((v[best] - v[runner]) / c.tol2(best, runner)) if runner != best else float("inf")
        return best, runner, margin
    # drop after K_i: v[i] - v[i + 1] (the next K of the range, admissible or not: a K
    # whose successor splits into splinters still ends a stable run)
    for i in range(len(ks) - 1):
        ev[i] = (v[i] - v[i + 1]) / c.tol2(i, i + 1)
    drops = [i for i in idx if i + 1 < len(ks) and ev[i] > 1]
    if not drops:
        return c.by_value()
    best = drops[0]
    # the runner-up: another K with a significant drop after it and a value as good within
    # the noise (two supported K: the margin compares their drops); else the best other
    # value (a margin below 1 when it is as good as the chosen K's)
    others = [i for i in idx if i != best]
    rivals = [i for i in others if ev[i] > 1 and v[i] >= v[best] - c.tol2(i, best)]
    if rivals:
        runner = max(rivals, key=lambda i: ev[i])
        return best, runner, float(ev[best] - ev[runner])
    if others:
        runner = max(others, key=lambda i: v[i])
        return best, runner, float((v[best] - v[runner]) / c.tol2(best, runner))
    return best, best, float("inf")


def _one_se(c: Curve):
    """The smallest K whose held-out error is within one standard error of the smallest
    (Breiman's one-SE rule; ``se`` is that of each K's difference to the best K over the
    folds, which share their splits). The runner-up is the K next to it, below where
    there is one; the margin is their difference in units of its tolerance."""
    import numpy as np

    v, se, idx = c.v, c.se, c.idx
    top = idx[np.argmax(v[idx])]
    best = next(i for i in idx if v[i] >= v[top] - max(se[i], c.tolerance))
    near = [i for i in idx if i != best]
    if not near:
        return best, best, float("inf")
    runner = min(near, key=lambda i: (abs(i - best), i > best))
    return best, runner, float(abs(v[best] - v[runner]) / c.tol2(best, runner))


def _last_above_null(c: Curve):
    """Horn: the largest K whose statistic (the smallest log data / null ratio of the
    eigenvalues it needs) is above 0; the runner-up is the next K, the margin how far the
    closer of the two stands from 0 in units of the tolerance."""
    v, idx = c.v, c.idx
    above = [i for i in idx if v[i] > 0]
    best = above[-1] if above else idx[0]
    rest = [i for i in idx if i > best] or [i for i in idx if i < best]
    if not rest:
        return best, best, float("inf")
    runner = min(rest, key=lambda i: abs(i - best))
    gap = min(abs(v[best]), abs(v[runner]))
    return best, runner, float(gap / c.tol2(best, runner))


# ---------------------------------------------------------------- the registry

_COMPONENTS_ONLY = "it counts the components of each replicate in a meta-program"

_COPHENETIC = KRule("cophenetic", "cophenetic", True, "cophenetic correlation",
                   "the last K before the cophenetic correlation first falls (Brunet et al. 2004)", _last_before_drop)
#: The K rules by name: ``consensus.k_selection``'s choices, the dispatch of :func:`select_k`
#: and the panels of ``k_selection.png``.
RULES: dict[str, KRule] = {r.name: r for r in (
    KRule("recurrence", "recurrence", True, "replicate recurrence",
          "the K whose clusters come closest to one component of every replicate each", _best_value,
          methods=("components",), requires=_COMPONENTS_ONLY),
    KRule("pac", "pac", False, "PAC", "the last K before PAC first rises (Senbabaoglu et al. 2014)",
          _last_before_drop),
    _COPHENETIC,
    replace(_COPHENETIC, name="brunet", alias="cophenetic"),
    KRule("delta_area", "delta_area", True, "delta area",
          "the last K whose CDF area gains over K - 1 (Monti et al. 2003)", _last_gain),
    KRule("silhouette", "silhouette", True, "silhouette", "the K with the best silhouette of the items",
          _best_silhouette),
    # the two below read the matrix, not the replicates (docs/benchmark.md, "Candidate rules")
    KRule("bicv", "bicv", False, "held-out error (bi-cross-validation)",
          "the smallest K within one SE of the least held-out NMF error (Owen & Perry 2009)", _one_se,
          methods=("components",), requires="it is computed by the components method's stage", source="data"),
    KRule("parallel", "parallel", True, "log eigenvalue / permuted null",
          "Horn's parallel analysis: 1 + the leading centred eigenvalues above gene-permuted copies' 95th "
          "percentile", _last_above_null, methods=("components",),
          requires="it is computed by the components method's stage", source="data"),
    KRule("parallel_counts", "parallel_counts", True, "log eigenvalue / Poisson null",
          "parallel analysis on the counts made linear (normalize_total, unit-variance genes, no log) "
          "against Poisson copies of their rank-1 mean: 1 + the leading centred eigenvalues above the null's "
          "95th percentile", _last_above_null, methods=("components",),
          requires="it is computed by the components method's stage from layers['counts']", source="data"),
    KRule("parallel_nb", "parallel_nb", True, "log eigenvalue / negative-binomial null",
          "sequential parallel analysis on the counts made linear: the first k whose k-th centred eigenvalue is "
          "not above the 95th percentile of negative-binomial copies of the rank-k mean (per-gene dispersion "
          "estimated around it) is K", _last_above_null, methods=("components",),
          requires="it is computed by the components method's stage from layers['counts']", source="data"),
)}
#: ``auto``, per method: the validated default (docs/validation.md, "K selection").
AUTO = {"components": "recurrence", "spots": "pac"}
K_RULES = ("auto", *RULES)


def describe() -> str:
    """The rules in one line, for the help of ``consensus.k_selection``."""
    auto = ", ".join(f"{rule} with method={m}" for m, rule in AUTO.items())
    names = " | ".join(f"{r.name} (= {r.alias})" if r.alias else r.name for r in RULES.values())
    return f"rule choosing K: auto ({auto}) | {names} (docs/validation.md, 'K selection')"


def check_method(k_selection, method) -> None:
    """Refuse a rule whose statistic ``method`` does not measure (one line naming the keys)."""
    rule = RULES.get(k_selection)
    if rule is not None and method in AUTO and method not in rule.methods:
        why = f" ({rule.requires})" if rule.requires else ""
        raise ConfigError(f"consensus.k_selection={k_selection} needs consensus.method={'/'.join(rule.methods)}"
                          f"{why}; use auto or {AUTO[method]} with method={method}")


def resolve_k_rule(k_selection: str, method: str | None = None, stats: dict | None = None) -> str:
    """The rule ``auto`` stands for (:data:`AUTO`): by ``method``, or without one, the
    components' rule where ``stats`` hold its statistic, else the spots' rule."""
    if k_selection != "auto":
        return k_selection
    if method is None:
        method = "components" if RULES[AUTO["components"]].statistic in (stats or {}) else "spots"
    return AUTO[method]


def panels(stats) -> list[tuple[str, str]]:
    """``(statistic, title)`` of every statistic a rule reads that ``stats`` hold, in registry order."""
    out = {}
    for r in RULES.values():
        if r.statistic in stats and r.statistic not in out:
            out[r.statistic] = r.panel
    return list(out.items())


def select_k(ks, stats: dict, rule: str = "pac", tolerance: float = 0.0, admissible=None,
             spread: dict | None = None, z: float = 2.0, return_info: bool = False,
             largest_stable: bool = False):
    """Choose K from per-K statistics, with a tolerance measured on the data.

    The tolerance of a comparison between two K is ``max(tolerance, z * se)``, where
    ``se`` combines the standard errors of the two values measured from the spread of
    the statistic across random halves of the resamples (``spread[key]``, see
    :func:`~tardis_exp.consensus.half_spread`); ``tolerance`` is only a floor. A difference
    smaller than that is noise: the run reports the K it could not separate
    (``runner_up_k``, ``margin``). The rules (:data:`RULES`):

    ``brunet`` / ``cophenetic``
        Brunet et al. (2004): the K at which the cophenetic correlation *begins to fall*,
        i.e. the first K whose correlation exceeds that of K + 1 by more than the
        tolerance (the last K before the first significant drop).
    ``pac``
        The mirror image for PAC (Senbabaoglu et al. 2014): the last K before PAC first
        rises significantly. Below the true K clusters merge stably (PAC ~ 0), above it
        they split at random.
    ``delta_area``
        Monti et al. (2003): the last K whose relative CDF-area increase over K - 1 is
        significantly above 0 (the next K adds no consensus).
    ``silhouette``
        The K with the best silhouette of the items in their own distance.
    ``recurrence`` (``auto`` with ``method=components``, the default)
        The K whose clusters of components come closest to one component of every
        replicate each (:func:`~tardis_exp.consensus.replicate_recurrence`): a program the
        data hold is found once by every restart. Below the true K programs merge (two
        components per replicate in a cluster), above it clusters are splinters or noise
        (no component from most replicates): the statistic falls on both sides, so the rule
        takes its best value -- it neither stops at the first stable merge nor drifts to the
        largest stable K. Its tolerance is measured over random halves of the replicates
        (:func:`~tardis_exp.consensus.recurrence_spread`); K within it are told apart by the
        silhouette.
    ``auto``
        :data:`AUTO`: ``recurrence`` where ``stats`` has it (``method=components``), else ``pac``.

    For the three "last K before a change" rules a curve that never changes significantly
    gives the K with the best value; K within the tolerance of it are told apart by the
    silhouette in ``stats`` (how distinct the clusters are), else the smaller K is taken --
    never the largest K by default. The margin is below 1 when the chosen value is within
    the noise of the runner-up.

    ``largest_stable`` (``method=components``; honoured by ``pac`` and ``brunet``/``cophenetic``):
    the largest admissible K whose value is within the tolerance of the best one. Clusters
    of components below the true K merge programs into clusters that are just as stable,
    so the first K before a change can be a merge; the K range there is bounded above by
    ``n_components`` and by the admissibility rule (clusters must recur across replicates),
    so the largest stable K is the answer and cannot drift past them. Only K marked
    ``admissible`` are chosen from (all, if none is).

    Returns the chosen K, or with ``return_info`` ``(K, info)`` where ``info`` holds
    ``runner_up_k`` (the best other K by the rule's own evidence), ``margin`` (the
    evidence for the chosen K over the runner-up, in units of the tolerance; < 1 means
    the data do not separate them) and ``tolerance`` (the measured tolerance per K).
    """
    import numpy as np

    ks = np.asarray(ks)
    if rule not in K_RULES:
        raise ConfigError(f"consensus.k_selection={rule!r} is unknown; choose one of {K_RULES}")
    k_rule = RULES[resolve_k_rule(rule, stats=stats)]
    adm = np.ones(len(ks), bool) if admissible is None else np.asarray(admissible, bool).copy()
    if k_rule.source == "data":  # the matrix decides K; the replicates' recurrence does not restrict it
        adm[:] = True
    if not adm.any():
        warnings.warn("no K in the range gives clusters that recur in enough replicates "
                      "(consensus.min_cluster_replicates); choosing among all K", UserWarning, stacklevel=3)
        adm[:] = True
    key, v = k_rule.statistic, k_rule.oriented(stats)
    se = np.zeros(len(ks)) if spread is None or key not in spread else np.nan_to_num(
        np.asarray(spread[key], dtype=np.float64), nan=0.0)
    curve = Curve(ks=ks, v=v, se=se, idx=np.flatnonzero(adm),
                  silhouette=np.asarray(stats.get("silhouette", np.full(len(ks), np.nan)), dtype=np.float64),
                  tolerance=tolerance, z=z, largest_stable=largest_stable, evidence=np.zeros(len(ks)))
    best, runner, margin = k_rule.pick(curve)
    info = {"runner_up_k": int(ks[runner]), "margin": margin, "tolerance": np.maximum(tolerance, z * se),
            "evidence": curve.evidence, "gaps": curve.gaps(best)}
    return (int(ks[best]), info) if return_info else int(ks[best])


def confident_margin_default() -> float:
    """``consensus.confident_margin``'s default (declared in :mod:`tardis_exp.params`)."""
    from .params import ConsensusParams

    return float(ConsensusParams.confident_margin)


def candidates(ks, best, info, confident_margin: float | None = None) -> list[int]:
    """The K the data do not separate from the chosen one: ``best``, every K whose gap
    (``info['gaps']``, :meth:`Curve.gaps`) is below ``confident_margin``, and the runner-up
    when the margin is (or is not measured: NaN). Sorted."""
    import numpy as np

    t = confident_margin_default() if confident_margin is None else float(confident_margin)
    out = {int(best)}
    gaps = info.get("gaps")
    if gaps is not None:
        out |= {int(k) for k, g in zip(ks, np.asarray(gaps, dtype=np.float64)) if g < t}
    margin = float(info["margin"])
    if not margin >= t:  # below the threshold, or NaN (no margin measured against it)
        out.add(int(info["runner_up_k"]))
    return sorted(out)


def report_k(best, info, rule, ks, rank_bound=False, confident_margin: float | None = None):
    """Say so when the evidence does not separate the chosen K from the runner-up (its margin
    is below ``consensus.confident_margin``; :func:`candidates` lists every K it does not
    separate), when no other K could be compared (a one-K range), and when the rank rather
    than the data bounds it (``rank_bound``: K = n_components, every component recurs).

    Returns whether it warned that the data do not separate K."""
    t = confident_margin_default() if confident_margin is None else float(confident_margin)
    cands = info.get("candidates") or candidates(ks, best, info, t)
    warned = False
    if info["runner_up_k"] == best:  # margin inf: nothing was compared, which is no evidence for K
        log.warning("consensus: the data do not separate K=%d from any other K: it is the only K the rule could "
                    "compare (rule %s) -- widen the K range or raise factorize.n_replicates", best, rule)
        warned = True
    elif info["margin"] < t:
        log.warning("consensus: the data do not separate K=%d from K=%d (rule %s, margin %.2f of the measured "
                    "tolerance, below consensus.confident_margin=%g); candidates K = %s -- look at "
                    "k_selection.png", best, info["runner_up_k"], rule, info["margin"], t,
                    ", ".join(str(k) for k in cands))
        warned = True
    if rank_bound:
        log.warning("consensus: K=%d = factorize.n_components and every component recurs in the replicates; the "
                    "data may hold more programs than the rank -- raise factorize.n_components or sweep it "
                    "(sweep=k_range)", best)
    return warned
