"""Benchmark generator: datasets drawn with their truth, and a runner that scores the K rule on them.

Every draw is a function of ``(family, seed)`` (and of the size caps): the family's
parameters -- planted K, spots, genes, depth, marker strength, overlap, dispersion -- are
drawn from ranges by a generator seeded with the family and the seed alone, the counts by a
second one, so capping the size changes the data but not the design. The truth is stored as
:func:`tardis_exp.synthetic.make_synthetic` stores it:

``obs['true_domain']``
    The spot's dominant planted program (``'P0'`` ...).
``obsm['true_usage']``
    Planted usages (spots x K), rows sum to 1.
``var['true_program']``
    The planted program a gene marks, ``'none'`` for the others.
``varm['true_programs']``
    The planted programs' gene profiles (genes x K).
``uns['benchmark']``
    ``{family, seed, planted_k, params}``.

Families (:data:`FAMILIES`): ``spatial`` (smooth domains over a shared background),
``cnmf`` (identity + activity programs, Kotliar et al. 2019), ``monti`` (Gaussian sample
classes, Monti et al. 2003) and ``rare`` (programs held by 1-5 % of the spots).

Seeds below :data:`DESIGN_SEEDS` are for designing rules; figures are reported on seeds at or
above it (fresh draws nobody tuned on). The runner::

    python -m tardis_exp.benchmark --family spatial --draws 20 --max-spots 1500

runs preprocess -> factorize -> consensus -> score with the stages' defaults on each draw
(the K search range widened to the families' 2..15, see :data:`SEARCH_RANGE`) and prints one
line per draw and the exact-K and within-one rates with 95 % Wilson intervals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

DESIGN_SEEDS = 1000  # seeds < DESIGN_SEEDS: for designing rules; >= DESIGN_SEEDS: fresh, for reporting
K_RANGE = (2, 15)  # planted K of every family lies here
SPOTS_RANGE = (500, 20_000)
# The default K search (consensus 4..10 on rank-10 replicates) cannot report K outside 4..10; the runner
# searches the families' whole K range instead, the same for every draw (never the planted K).
SEARCH_RANGE = ("consensus.min_clusters=2", "consensus.max_clusters=15", "factorize.n_components=15")


# ---------------------------------------------------------------- drawing


def _rngs(family: str, seed: int):
    """The parameter stream and the data stream of one draw (independent of each other)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"benchmark seed must be an integer >= 0, got {seed!r}")
    fam = zlib.crc32(family.encode())
    return np.random.default_rng([fam, int(seed), 0]), np.random.default_rng([fam, int(seed), 1])


def _loguniform(rng, low, high):
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _size(rng, caps):
    """Spots and genes: drawn (so the design does not depend on the caps), then capped."""
    n_spots = int(round(_loguniform(rng, *SPOTS_RANGE)))
    n_genes = int(round(_loguniform(rng, 1000, 6000)))
    if caps.get("max_spots") is not None:
        n_spots = min(n_spots, int(caps["max_spots"]))
    if caps.get("max_genes") is not None:
        n_genes = min(n_genes, int(caps["max_genes"]))
    return n_spots, n_genes


def _check_caps(caps):
    unknown = set(caps) - {"max_spots", "max_genes"}
    if unknown:
        raise TypeError(f"unknown size cap(s) {sorted(unknown)}; use max_spots / max_genes")
    for key in ("max_spots", "max_genes"):
        v = caps.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 100):
            raise ValueError(f"benchmark {key} must be an integer >= 100 or None, got {v!r}")


def _anndata(counts, usage, profiles, marker_of, family, seed, params, obs_extra=None, obsm_extra=None):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    n_spots, n_genes = counts.shape
    k = usage.shape[1]
    labels = [f"P{p}" for p in range(k)]
    a = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)),
                   obs=pd.DataFrame(index=[f"spot{i}" for i in range(n_spots)]),
                   var=pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)]))
    usage = usage.astype(np.float32)  # the domain is the argmax of the usage as stored (ties in float32)
    a.obs["true_domain"] = pd.Categorical.from_codes(usage.argmax(1), categories=labels)
    for key, v in (obs_extra or {}).items():
        a.obs[key] = v
    a.obsm["true_usage"] = usage
    for key, v in (obsm_extra or {}).items():
        a.obsm[key] = v
    a.var["true_program"] = pd.Categorical([labels[m] if m >= 0 else "none" for m in marker_of],
                                           categories=labels + ["none"])
    a.varm["true_programs"] = profiles.astype(np.float32)
    a.uns["benchmark"] = {"family": family, "seed": int(seed), "planted_k": int(k),
                          "params": {key: (v.item() if isinstance(v, np.generic) else v) for key, v in params.items()}}
    return a


def _strict_markers(profiles, marker_of):
    """The truth marks a gene only where its own program's profile exceeds every other's
    (a marker drawn below its gene's base level, or a small fold lost to the normalization,
    does not mark the program)."""
    marker_of = marker_of.copy()
    rows = np.flatnonzero(marker_of >= 0)
    own = profiles[rows, marker_of[rows]]
    others = np.where(np.arange(profiles.shape[1])[None, :] == marker_of[rows, None], -np.inf, profiles[rows])
    marker_of[rows[own <= others.max(1)]] = -1
    return marker_of


def _counts(rng, mu, dispersion):
    """Negative-binomial counts around ``mu`` (gamma-Poisson; dispersion 0 is Poisson)."""
    lam = rng.gamma(shape=1.0 / dispersion, scale=mu * dispersion) if dispersion > 0 else mu
    return rng.poisson(lam)


def draw_spatial(seed: int, **caps):
    """Spatial mixture of smooth domains over a shared background profile.

    Spots on a square grid; K domains are soft Voronoi cells around spread-out centres, their
    overlap set by ``sharpness`` (small = broad mixing zones). Each program is a base profile
    with its own marker genes raised ``marker_fold`` times; every spot also draws a fraction
    ``background`` (varying +-25 % from spot to spot) of its counts from a second profile that
    all spots share. Depth ``library`` and negative-binomial ``dispersion`` are drawn too.
    """
    from .synthetic import _farthest_points

    pr, dr = _rngs("spatial", seed)
    k = int(pr.integers(K_RANGE[0], K_RANGE[1] + 1))
    n_spots, n_genes = _size(pr, caps)
    p = dict(k=k, n_spots=n_spots, n_genes=n_genes,
             n_markers=int(pr.integers(20, 81)), marker_fold=_loguniform(pr, 3.0, 10.0),
             library=_loguniform(pr, 500.0, 5000.0), dispersion=float(pr.uniform(0.05, 0.5)),
             sharpness=_loguniform(pr, 1.5, 6.0), background=float(pr.uniform(0.0, 0.5)))
    p["n_markers"] = int(min(p["n_markers"], n_genes // (2 * k)))  # markers are at most half the genes

    side = int(np.ceil(np.sqrt(n_spots)))
    ij = np.stack(np.divmod(np.arange(n_spots), side), axis=1).astype(np.float64)
    coords = ij / side
    centers = coords[_farthest_points(coords, k, dr)]
    d2 = ((coords[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    logits = -d2 * k * p["sharpness"] * 4  # spacing 1/sqrt(k), as in make_synthetic
    logits -= logits.max(1, keepdims=True)
    usage = np.exp(logits)
    usage /= usage.sum(1, keepdims=True)

    base = dr.lognormal(0.0, 1.0, size=n_genes)
    base /= base.sum()
    programs = np.tile(base[:, None], (1, k))
    marker_of = np.full(n_genes, -1)
    perm = dr.permutation(n_genes)
    m = p["n_markers"]
    for q in range(k):
        genes = perm[q * m:(q + 1) * m]
        marker_of[genes] = q
        programs[genes, q] = np.median(base) * p["marker_fold"] * dr.lognormal(0.0, 0.3, size=m)
    programs /= programs.sum(0, keepdims=True)
    marker_of = _strict_markers(programs, marker_of)
    background = dr.lognormal(0.0, 1.0, size=n_genes)
    background /= background.sum()
    b = np.clip(p["background"] * dr.lognormal(0.0, 0.25, size=n_spots), 0.0, 0.95)[:, None]

    library = p["library"] * dr.lognormal(0.0, 0.3, size=n_spots)
    mu = library[:, None] * ((1 - b) * (usage @ programs.T) + b * background[None, :])
    counts = _counts(dr, mu, p["dispersion"])
    return _anndata(counts, usage, programs, marker_of, "spatial", seed, p,
                    obsm_extra={"spatial": (ij * 100.0).astype(np.float32)})


def _identity_design(pr, dr, k_id, k_act, group_p, n_genes, p):
    """Gene profiles of identity and activity programs (Splatter-like, as cNMF's simulation).

    Base gene means are log-normal; each program raises its own differentially expressed
    genes (``n_de`` of them, ``activity_n_de`` for an activity program: counts, not probabilities,
    so that capping the genes keeps the signal) by a log-normal fold (location ``de_loc``,
    scale 0.5). A gene raised by two programs marks neither.
    """
    base = dr.lognormal(0.0, 1.2, size=n_genes)
    k = k_id + k_act
    up = np.zeros((n_genes, k), dtype=bool)
    fold = np.ones((n_genes, k))
    for q in range(k):
        n_de = p["n_de"] if q < k_id else p["activity_n_de"]
        up[dr.choice(n_genes, size=n_de, replace=False), q] = True
        fold[up[:, q], q] = dr.lognormal(p["de_loc"], 0.5, size=n_de)
    profiles = base[:, None] * fold
    profiles /= profiles.sum(0, keepdims=True)
    return profiles, _strict_markers(profiles, np.where(up.sum(1) == 1, up.argmax(1), -1))


def _single_cell(family, seed, pr, dr, k_id, k_act, group_p, n_spots, n_genes, p):
    profiles, marker_of = _identity_design(pr, dr, k_id, k_act, group_p, n_genes, p)
    k = k_id + k_act
    identity = dr.choice(k_id, size=n_spots, p=group_p)
    usage = np.zeros((n_spots, k))
    usage[np.arange(n_spots), identity] = 1.0
    for a in range(k_act):
        # Kotliar et al.: a fraction of the cells run the activity program at a usage in [0.1, 0.7]
        on = dr.random(n_spots) < p["activity_frac"]
        u = dr.uniform(0.1, 0.7, size=int(on.sum()))
        usage[on] *= (1 - u)[:, None]
        usage[on, k_id + a] += u
    usage /= usage.sum(1, keepdims=True)
    library = p["library"] * dr.lognormal(0.0, 0.4, size=n_spots)
    counts = _counts(dr, library[:, None] * (usage @ profiles.T), p["dispersion"])
    import pandas as pd

    ident = pd.Categorical.from_codes(identity, categories=[f"P{q}" for q in range(k)])
    return _anndata(counts, usage, profiles, marker_of, family, seed, p, obs_extra={"true_identity": ident})


def draw_cnmf(seed: int, **caps):
    """Single cells: one identity program each, plus activity programs in a fraction of them.

    The design of Kotliar et al. 2019 (cNMF): identity programs of unequal group sizes
    (Dirichlet, alpha 3); 0-2 activity programs, each used by ``activity_frac`` of the cells
    at a usage uniform in [0.1, 0.7] (the identity taking the rest). Depth ``library``,
    biological coefficient of variation (dispersion = bcv^2), DE genes per program and fold drawn.
    """
    pr, dr = _rngs("cnmf", seed)
    k_act = int(pr.choice([0, 1, 2], p=[0.2, 0.5, 0.3]))
    k_id = int(pr.integers(max(2, K_RANGE[0] - k_act), K_RANGE[1] - k_act + 1))
    n_spots, n_genes = _size(pr, caps)
    p = dict(k=k_id + k_act, n_identity=k_id, n_activity=k_act, n_spots=n_spots, n_genes=n_genes,
             library=_loguniform(pr, 1000.0, 10000.0), dispersion=float(pr.uniform(0.1, 0.4) ** 2),
             n_de=int(pr.integers(20, 101)), activity_n_de=int(pr.integers(20, 61)),
             de_loc=float(pr.uniform(0.7, 1.2)), activity_frac=float(pr.uniform(0.2, 0.5)))
    p["n_de"] = int(min(p["n_de"], n_genes // (2 * p["k"])))
    p["activity_n_de"] = int(min(p["activity_n_de"], n_genes // (2 * p["k"])))
    group_p = pr.dirichlet(np.full(k_id, 3.0))
    p["group_p"] = np.round(group_p, 4).tolist()
    return _single_cell("cnmf", seed, pr, dr, k_id, k_act, group_p, n_spots, n_genes, p)


def draw_rare(seed: int, **caps):
    """Single cells of K identity programs, 1-3 of them rare (each 1-5 % of the cells).

    As :func:`draw_cnmf` without activity programs; the common groups share the rest
    (Dirichlet, alpha 5).
    """
    pr, dr = _rngs("rare", seed)
    k = int(pr.integers(max(3, K_RANGE[0]), K_RANGE[1] + 1))
    n_rare = int(pr.integers(1, min(3, k - 2) + 1))
    n_spots, n_genes = _size(pr, caps)
    rare = pr.uniform(0.01, 0.05, size=n_rare)
    common = pr.dirichlet(np.full(k - n_rare, 5.0)) * (1 - rare.sum())
    group_p = np.concatenate([common, rare])
    p = dict(k=k, n_rare=n_rare, n_spots=n_spots, n_genes=n_genes, library=_loguniform(pr, 1000.0, 10000.0),
             dispersion=float(pr.uniform(0.1, 0.4) ** 2), n_de=int(pr.integers(20, 101)), activity_n_de=0,
             de_loc=float(pr.uniform(0.7, 1.2)), activity_frac=0.0, group_p=np.round(group_p, 4).tolist())
    p["n_de"] = int(min(p["n_de"], n_genes // (2 * k)))
    return _single_cell("rare", seed, pr, dr, k, 0, group_p, n_spots, n_genes, p)


def draw_monti(seed: int, **caps):
    """Monti et al. 2003-style sample classes: Gaussian class means in gene space, non-negative.

    Every gene has a baseline level (normal, mean 5, sd 1); each class raises its own block of
    ``n_markers`` genes by ``separation`` noise standard deviations, and shifts every gene by a
    small class-specific Gaussian offset (sd 0.2). Samples are their class mean plus unit
    Gaussian noise, clipped at 0 (not counts; class sizes Dirichlet, alpha 5).
    """
    pr, dr = _rngs("monti", seed)
    k = int(pr.integers(K_RANGE[0], K_RANGE[1] + 1))
    n_spots, n_genes = _size(pr, caps)
    p = dict(k=k, n_spots=n_spots, n_genes=n_genes, n_markers=int(pr.integers(10, 51)),
             separation=float(pr.uniform(1.0, 3.0)))
    p["n_markers"] = int(min(p["n_markers"], n_genes // (2 * k)))
    group_p = pr.dirichlet(np.full(k, 5.0))
    p["group_p"] = np.round(group_p, 4).tolist()

    base = np.clip(dr.normal(5.0, 1.0, size=n_genes), 1.0, None)
    means = base[:, None] + dr.normal(0.0, 0.2, size=(n_genes, k))
    marker_of = np.full(n_genes, -1)
    perm = dr.permutation(n_genes)
    m = p["n_markers"]
    for q in range(k):
        genes = perm[q * m:(q + 1) * m]
        marker_of[genes] = q
        means[genes, q] += p["separation"]
    means = np.clip(means, 0.0, None)
    marker_of = _strict_markers(means, marker_of)
    cls = dr.choice(k, size=n_spots, p=group_p)
    usage = np.zeros((n_spots, k))
    usage[np.arange(n_spots), cls] = 1.0
    X = np.clip(means[:, cls].T + dr.normal(0.0, 1.0, size=(n_spots, n_genes)), 0.0, None)
    return _anndata(X, usage, means, marker_of, "monti", seed, p)


@dataclass(frozen=True)
class Family:
    """One benchmark family: its draw function ``draw(seed, max_spots=None, max_genes=None)``."""

    name: str
    draw: Callable[..., Any]
    doc: str


FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        Family("spatial", draw_spatial, "smooth spatial domains over a shared background profile"),
        Family("cnmf", draw_cnmf, "single-cell identity + activity programs (Kotliar et al. 2019)"),
        Family("monti", draw_monti, "Gaussian sample classes, non-negative (Monti et al. 2003)"),
        Family("rare", draw_rare, "single-cell identities, 1-3 of them held by 1-5 % of the cells"),
    )
}


def draw(family: str, seed: int, **caps):
    """One benchmark data set with its truth, a function of ``(family, seed)`` and the caps.

    Parameters
    ----------
    family
        A key of :data:`FAMILIES`.
    seed
        Integer >= 0; seeds below :data:`DESIGN_SEEDS` are for design, the others fresh.
    **caps
        ``max_spots``, ``max_genes``: upper bounds on the drawn size (the design -- K, depth,
        markers -- does not change with them).

    Returns
    -------
    anndata.AnnData
        Counts in ``X`` and the truth (module docstring).
    """
    if family not in FAMILIES:
        raise ValueError(f"benchmark family {family!r} is unknown; choose one of {tuple(FAMILIES)}")
    _check_caps(caps)
    return FAMILIES[family].draw(seed, **caps)


# ---------------------------------------------------------------- scoring a run


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial rate (``(nan, nan)`` for ``n = 0``)."""
    if n == 0:
        return float("nan"), float("nan")
    ph = successes / n
    den = 1 + z * z / n
    c = (ph + z * z / (2 * n)) / den
    h = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / den
    return max(0.0, c - h), min(1.0, c + h)


def usage_recovery(true_usage, usage) -> float:
    """Mean over planted programs of the Pearson r of its usage with the matched reported one.

    Planted and reported programs are matched one to one (Hungarian, maximizing the summed
    correlation); a planted program left without a partner counts 0.
    """
    from scipy.optimize import linear_sum_assignment

    T = np.asarray(true_usage, np.float64)
    U = np.asarray(usage, np.float64)
    T = T - T.mean(0)
    U = U - U.mean(0)
    den = np.outer(np.linalg.norm(T, axis=0), np.linalg.norm(U, axis=0))
    R = np.divide(T.T @ U, den, out=np.zeros((T.shape[1], U.shape[1])), where=den > 0)
    rows, cols = linear_sum_assignment(-R)
    return float(R[rows, cols].sum() / T.shape[1])


def parse_overrides(items) -> dict[str, dict[str, Any]]:
    """``['factorize.tol=1e-6', ...]`` -> ``{'factorize': {'tol': 1e-6}}`` (values parsed as YAML).

    Keys are checked against the stages' parameters (tardis_exp.params); a wrong one is a
    one-line error naming it.
    """
    import yaml

    from .errors import ConfigError
    from .params import ConsensusParams, FactorizeParams, PreprocessParams, ScoreParams

    known = {"preprocess": PreprocessParams, "factorize": FactorizeParams, "consensus": ConsensusParams,
             "score": ScoreParams}
    out: dict[str, dict[str, Any]] = {s: {} for s in known}
    for item in items:
        key, sep, value = item.partition("=")
        stage, _, name = key.partition(".")
        if not sep or stage not in known or name not in {f.name for f in dataclasses.fields(known[stage])}:
            raise ConfigError(f"--override {item!r}: expected <stage>.<key>=<value> with a key of "
                              f"{'/'.join(known)} (tardis_exp/params.py)")
        v = yaml.safe_load(value)
        if isinstance(v, str):  # YAML 1.1 reads 1e-6 (no dot) as a string; Hydra reads it as a number
            try:
                v = float(v)
            except ValueError:
                pass
        out[stage][name] = v
    return out


class _WarningFlag(logging.Handler):
    """Records whether the consensus stage said the data do not separate K from the runner-up."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.fired = False

    def emit(self, record):
        if "do not separate" in record.getMessage():
            self.fired = True


def run_draw(adata, overrides=(), rules=("auto",)) -> dict[str, Any]:
    """Run the four stages with their defaults (plus ``overrides``) on one draw; one result row.

    The factorization is shared by the ``rules`` (``consensus.k_selection`` values): the first
    rule's run is scored (score stage) and reported, every rule's K, runner-up and margin kept
    under ``rules``. Returns planted K, reported K, runner-up, margin, whether the "do not
    separate" warning fired, program recovery (marker precision, tardis_exp.metrics) and
    usage recovery (:func:`usage_recovery`).
    """
    from .consensus import consensus
    from .errors import InputError
    from .factorize import factorize
    from .metrics import program_recovery
    from .preprocess import preprocess
    from .score import score

    cfg = parse_overrides([*SEARCH_RANGE, *overrides])
    truth = adata.uns["benchmark"]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = preprocess(adata, **cfg["preprocess"])
        factorize(a, progress=False, **cfg["factorize"])
        per_rule = {}
        row: dict[str, Any] = {}
        for i, rule in enumerate(rules):
            b = a.copy() if len(rules) > 1 else a
            flag = _WarningFlag()
            clog = logging.getLogger("tardis_exp.consensus")
            level, propagate = clog.level, clog.propagate
            clog.addHandler(flag)
            clog.setLevel(logging.WARNING)  # records reach the flag whatever the root level is
            clog.propagate = False  # and not stderr: the table is the output
            try:
                consensus(b, progress=False, **{**cfg["consensus"], "k_selection": rule})
            except InputError as e:  # the stage refuses (e.g. the outlier filter left nothing): a miss
                per_rule[rule] = {"k": None, "runner_up": None, "margin": float("nan"), "warned": False,
                                  "error": str(e)}
                if i == 0:
                    row = {**per_rule[rule], "recovery": 0.0, "usage_r": 0.0, "n_background": 0}
                continue
            finally:
                clog.removeHandler(flag)
                clog.setLevel(level)
                clog.propagate = propagate
            c = b.uns["nmf_consensus"]
            r = {"k": int(c["best_k"]), "runner_up": int(c["runner_up_k"]), "margin": float(c["k_margin"]),
                 "warned": bool(flag.fired)}
            per_rule[rule] = r
            if i == 0:
                score(b, **cfg["score"])
                rec = program_recovery(c["spectra"], b.var["true_program"].astype(str).to_numpy())[0]
                row = {**r, "recovery": float(rec),
                       "usage_r": usage_recovery(b.obsm["true_usage"], b.obsm["X_nmf_consensus"]),
                       "n_background": int(c.get("n_background", 0))}
    return {"family": truth["family"], "seed": truth["seed"], "planted_k": truth["planted_k"],
            "n_spots": int(adata.n_obs), "n_genes": int(adata.n_vars), **row, "rules": per_rule,
            "seconds": time.perf_counter() - t0}


def run_matrix_rules(adata, overrides=(), rules=("bicv", "parallel")) -> dict[str, Any]:
    """The K of rules that read the matrix (``KRule.source == "data"``) without the factorization.

    Such a rule's K is a function of the preprocessed matrix, ``consensus.random_state`` and
    the K range (``consensus.min_clusters..max_clusters`` clipped to ``factorize.n_components``)
    only -- what the consensus stage computes (its background pass aside) whatever the solver.
    One result row as :func:`run_draw`'s, K only.
    """
    from .consensus.heldout import data_rule_stats
    from .krules import RULES, select_k
    from .params import ConsensusParams, FactorizeParams
    from .preprocess import preprocess

    cfg = parse_overrides([*SEARCH_RANGE, *overrides])
    c = {**{f.name: f.default for f in dataclasses.fields(ConsensusParams)}, **cfg["consensus"]}
    rank = cfg["factorize"].get("n_components", FactorizeParams.n_components)
    ks = list(range(int(c["min_clusters"]), min(int(c["max_clusters"]), int(rank)) + 1))
    truth = adata.uns["benchmark"]
    t0 = time.perf_counter()
    per_rule = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = preprocess(adata, **cfg["preprocess"])  # a new AnnData: the matrix the stage sees
        for rule in rules:
            if RULES[rule].source != "data":
                raise ValueError(f"--matrix-only: rule {rule!r} reads the replicates; run it without --matrix-only")
            st, spread = data_rule_stats(RULES[rule].statistic, a.X, c["random_state"],
                                         counts=a.layers.get("counts"))(ks)
            k, info = select_k(ks, st, rule, c["k_tolerance"], spread=spread, z=c["k_z"], return_info=True)
            per_rule[rule] = {"k": int(k), "runner_up": int(info["runner_up_k"]), "margin": float(info["margin"]),
                              "warned": bool(info["runner_up_k"] != k and info["margin"] < 1)}
    first = per_rule[rules[0]]
    return {"family": truth["family"], "seed": truth["seed"], "planted_k": truth["planted_k"],
            "n_spots": int(adata.n_obs), "n_genes": int(adata.n_vars), **first, "recovery": float("nan"),
            "usage_r": float("nan"), "n_background": 0, "rules": per_rule, "matrix_only": True,
            "seconds": time.perf_counter() - t0}


def summarize(rows, rule: str | None = None) -> dict[str, Any]:
    """Exact-K and within-one rates with 95 % Wilson intervals (``rule``: that rule's K)."""
    ks = [(r["rules"][rule]["k"] if rule else r["k"], r["planted_k"]) for r in rows]
    n = len(ks)
    exact = sum(k == t for k, t in ks)  # a run the stage refused (K None) is a miss
    near = sum(k is not None and abs(k - t) <= 1 for k, t in ks)
    return {"n": n, "exact": exact, "exact_rate": exact / n if n else float("nan"), "exact_ci": wilson(exact, n),
            "within_one": near, "within_one_rate": near / n if n else float("nan"), "within_one_ci": wilson(near, n),
            "over": sum(k is not None and k > t for k, t in ks), "under": sum(k is not None and k < t for k, t in ks),
            "failed": sum(k is None for k, _ in ks)}


def _fmt_rate(s, key):
    lo, hi = s[f"{key}_ci"]
    return f"{s[key]}/{s['n']} = {s[f'{key}_rate']:.2f} [{lo:.2f}, {hi:.2f}]"


def main(argv=None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(prog="python -m tardis_exp.benchmark",
                                 description="Draw benchmark data sets and report how often the pipeline's "
                                             "default K rule reports the planted K.")
    ap.add_argument("--family", required=True, choices=tuple(FAMILIES))
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--seed-start", type=int, default=DESIGN_SEEDS,
                    help=f"first seed (>= {DESIGN_SEEDS}: fresh draws; below: design draws)")
    ap.add_argument("--solver", default=None, help="factorize.solver (default: the stage's default)")
    ap.add_argument("--override", nargs="*", default=[], metavar="STAGE.KEY=VALUE",
                    help="stage parameters, e.g. factorize.tol=1e-6 consensus.k_selection=pac")
    ap.add_argument("--rules", nargs="*", default=None,
                    help="consensus.k_selection values measured on the same factorizations (first reported)")
    ap.add_argument("--matrix-only", action="store_true",
                    help="rules that read the matrix (bicv, parallel) only, without the factorization "
                         "(their K does not depend on it)")
    ap.add_argument("--max-spots", type=int, default=None)
    ap.add_argument("--max-genes", type=int, default=None)
    ap.add_argument("--jsonl", type=Path, default=None,
                    help="append one JSON line per draw; draws already there are read back, not rerun")
    a = ap.parse_args(argv)
    if a.draws < 1:
        ap.error("--draws must be >= 1")
    if a.seed_start < 0:
        ap.error("--seed-start must be >= 0")
    overrides = [*a.override, *([f"factorize.solver={a.solver}"] if a.solver else [])]
    cfg = parse_overrides(overrides)  # a wrong key fails here, before any draw
    rules = a.rules or [cfg["consensus"].get("k_selection", "auto")]
    for r in rules:
        from .params import K_RULES

        if r not in K_RULES:
            ap.error(f"--rules: {r!r} is not a consensus.k_selection ({', '.join(K_RULES)})")
    logging.basicConfig(level=logging.ERROR)
    done = {}
    if a.jsonl and a.jsonl.exists():
        for line in a.jsonl.read_text().splitlines():
            r = json.loads(line)
            done[r["seed"]] = r
    caps = {"max_spots": a.max_spots, "max_genes": a.max_genes}
    fresh = "fresh" if a.seed_start >= DESIGN_SEEDS else "DESIGN"
    print(f"# family {a.family}, seeds {a.seed_start}..{a.seed_start + a.draws - 1} ({fresh}), "
          f"overrides {' '.join([*SEARCH_RANGE, *overrides]) or '-'}, rules {' '.join(rules)}", flush=True)
    print(f"{'seed':>6} {'spots':>6} {'genes':>6} {'K':>3} {'rep':>4} {'2nd':>4} {'margin':>7} {'warn':>5} "
          f"{'rec':>5} {'use_r':>6} {'s':>5}  other rules", flush=True)
    rows = []
    for i, seed in enumerate(range(a.seed_start, a.seed_start + a.draws)):
        if seed in done:
            r = done[seed]
        else:
            print(f"  [{i + 1}/{a.draws}] seed {seed} ...", file=sys.stderr, flush=True)
            d = draw(a.family, seed, **caps)
            r = run_matrix_rules(d, overrides, rules) if a.matrix_only else run_draw(d, overrides, rules)
            r["overrides"] = overrides
            if a.jsonl:
                with a.jsonl.open("a") as fh:
                    fh.write(json.dumps(r) + "\n")
        rows.append(r)
        other = " ".join(f"{k}={v['k']}" for k, v in r["rules"].items() if k != rules[0])
        if r["k"] is None:
            print(f"{seed:>6} {r['n_spots']:>6} {r['n_genes']:>6} {r['planted_k']:>3}  refused: {r['error']}",
                  flush=True)
            continue
        print(f"{seed:>6} {r['n_spots']:>6} {r['n_genes']:>6} {r['planted_k']:>3} {r['k']:>4} {r['runner_up']:>4} "
              f"{r['margin']:>7.2f} {'yes' if r['warned'] else 'no':>5} {r['recovery']:>5.2f} {r['usage_r']:>6.2f} "
              f"{r['seconds']:>5.0f}  {other}", flush=True)
    for rule in rules:
        s = summarize(rows, rule)
        print(f"{a.family} rule {rule}: exact K {_fmt_rate(s, 'exact')}; within one "
              f"{_fmt_rate(s, 'within_one')}; over {s['over']}, under {s['under']}, refused {s['failed']} "
              f"(95 % Wilson intervals, "
              f"n = {s['n']})", flush=True)
    return rows


if __name__ == "__main__":
    main()
