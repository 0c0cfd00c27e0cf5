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
classes, Monti et al. 2003), ``rare`` (programs held by 1-5 % of the spots) and ``batch``
(2-6 sections sharing spatial programs, gene-wise technical factors per section, one program
in one section only; scored by :func:`evaluate_batch`).

Seeds below :data:`DESIGN_SEEDS` are for designing rules; figures are reported on seeds at or
above it (fresh draws nobody tuned on). The runner::

    python -m tardis_exp.benchmark --family spatial --draws 20 --max-spots 1500

runs preprocess -> factorize -> consensus -> score with the stages' defaults on each draw
(the K search range widened to the families' 2..15, see :data:`SEARCH_RANGE`) and prints one
line per draw and the exact-K and within-one rates with 95 % Wilson intervals (``batch``: also
each shared program found once, the section-only program found and flagged). ``--write DIR``
writes the draws as h5ad instead and runs nothing (``batch``: one file per section).
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


def _domains(coords, n_centers, sharpness, dr):
    """Soft Voronoi usages (spots x n_centers) around spread-out centres, as :func:`draw_spatial`."""
    from .synthetic import _farthest_points

    centers = coords[_farthest_points(coords, n_centers, dr)]
    d2 = ((coords[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    logits = -d2 * n_centers * sharpness * 4
    logits -= logits.max(1, keepdims=True)
    u = np.exp(logits)
    return u / u.sum(1, keepdims=True)


def draw_batch(seed: int, **caps):
    """Sections of one study: shared spatial programs, gene-wise batch factors, one section-only program.

    ``n_sections`` (2-6) square grids whose coordinates overlap (each starts at 0). The
    ``n_shared`` programs are built as in :func:`draw_spatial` (base profile + markers) and
    every section holds a domain of each, around centres of its own; the last program
    (``P{n_shared}``) is planted in section ``specific_section`` only, as one more domain there
    (usage exactly 0 elsewhere). Each section multiplies every gene's mean by a technical
    factor, log-normal with sd ``batch_sd`` (``varm['true_batch_factor']``, genes x sections),
    and has its own depth (``section_depth``, a multiple of ``library``). Extra truth:
    ``obs['sample']`` (``'S0'`` ...), ``obs['true_library']``, ``obs['true_background']`` (the
    spot's background fraction), ``var['true_background']`` (the background profile) and
    ``uns['benchmark']['section_specific'] = {'program': index, 'section': label}``; the
    expected count is ``true_library * factor * ((1 - b) * usage @ programs.T + b * background)``.
    The size caps bound the spots of all sections together.
    """
    import pandas as pd

    pr, dr = _rngs("batch", seed)
    n_sections = int(pr.integers(2, 7))
    n_shared = int(pr.integers(3, 8))
    k = n_shared + 1
    n_spots, n_genes = _size(pr, caps)
    p = dict(k=k, n_shared=n_shared, n_sections=n_sections, n_spots=n_spots, n_genes=n_genes,
             n_markers=int(pr.integers(20, 81)), marker_fold=_loguniform(pr, 3.0, 10.0),
             library=_loguniform(pr, 500.0, 5000.0), dispersion=float(pr.uniform(0.05, 0.5)),
             sharpness=_loguniform(pr, 1.5, 6.0), background=float(pr.uniform(0.0, 0.5)),
             batch_sd=float(pr.uniform(0.1, 0.5)), specific_section=int(pr.integers(n_sections)),
             section_depth=np.round(pr.lognormal(0.0, 0.2, size=n_sections), 4).tolist())
    p["n_markers"] = int(min(p["n_markers"], n_genes // (2 * k)))
    n_spots = max(n_spots, n_sections)  # one spot per section at least

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
    factors = dr.lognormal(0.0, p["batch_sd"], size=(n_genes, n_sections))

    sizes = np.full(n_sections, n_spots // n_sections)
    sizes[: n_spots % n_sections] += 1
    usage = np.zeros((n_spots, k))
    section = np.repeat(np.arange(n_sections), sizes)
    spatial = np.zeros((n_spots, 2))
    for s in range(n_sections):
        rows = np.flatnonzero(section == s)
        side = int(np.ceil(np.sqrt(len(rows))))
        ij = np.stack(np.divmod(np.arange(len(rows)), side), axis=1).astype(np.float64)
        spatial[rows] = ij
        n_here = k if s == p["specific_section"] else n_shared  # the section-only program is the last
        usage[np.ix_(rows, np.arange(n_here))] = _domains(ij / side, n_here, p["sharpness"], dr)
    b = np.clip(p["background"] * dr.lognormal(0.0, 0.25, size=n_spots), 0.0, 0.95)
    library = p["library"] * np.asarray(p["section_depth"])[section] * dr.lognormal(0.0, 0.3, size=n_spots)
    # the usages as stored (float32), so that the truth reproduces the expected counts within float32 rounding
    usage = usage.astype(np.float32).astype(np.float64)
    usage /= usage.sum(1, keepdims=True)
    mu = library[:, None] * factors.T[section] * (
        (1 - b)[:, None] * (usage @ programs.T) + b[:, None] * background[None, :])
    counts = _counts(dr, mu, p["dispersion"])
    labels = [f"S{s}" for s in range(n_sections)]
    a = _anndata(counts, usage, programs, marker_of, "batch", seed, p,
                 obs_extra={"sample": pd.Categorical.from_codes(section, categories=labels),
                            "true_library": library, "true_background": b},
                 obsm_extra={"spatial": (spatial * 100.0).astype(np.float32)})
    a.obs_names = [f"{labels[s]}_spot{i}" for i, s in enumerate(section)]
    a.var["true_background"] = background
    a.varm["true_batch_factor"] = factors
    a.uns["benchmark"]["section_specific"] = {"program": k - 1, "section": labels[p["specific_section"]]}
    return a


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
        Family("batch", draw_batch, "2-6 sections: shared spatial programs, gene-wise batch factors per "
                                    "section, one program in one section only"),
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


MATCH_R = 0.6  # a found program matches a planted one at usage r >= this (within its sections)
MIN_SECTION_SHARE = 0.1  # the sections a found program lives in: those holding >= this share of its usage


def section_shares(usage, codes, n_sections=None) -> np.ndarray:
    """Share of each program's usage per section (programs x sections), each section's usage
    divided by its spot count first (as ``uns['nmf_samples']['share']``), rows summing to 1."""
    U = np.asarray(usage, np.float64)
    n = int(codes.max()) + 1 if n_sections is None else n_sections
    per = np.stack([U[codes == s].mean(0) if (codes == s).any() else np.zeros(U.shape[1]) for s in range(n)], 1)
    tot = per.sum(1, keepdims=True)
    return np.divide(per, tot, out=np.zeros_like(per), where=tot > 0)


def match_programs(true_usage, usage, codes, r_min: float = MATCH_R,
                   min_share: float = MIN_SECTION_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """Match every found program to at most one planted program, by usage correlation.

    Each found program ``j`` is compared with the planted usages over the spots of the
    sections it lives in (those holding at least ``min_share`` of its per-spot usage share):
    a program that a batch effect split into one copy per section correlates with the
    planted one inside its own sections, so both copies match it and it counts as found twice
    (over all spots each copy would correlate weakly). ``j`` matches the planted program with
    the highest Pearson r there if that r is at least ``r_min``.

    Returns
    -------
    match
        Planted index per found program, -1 for none.
    r
        Found x planted correlations (over each found program's sections).
    """
    T = np.asarray(true_usage, np.float64)
    U = np.asarray(usage, np.float64)
    share = section_shares(U, codes)
    R = np.zeros((U.shape[1], T.shape[1]))
    for j in range(U.shape[1]):
        rows = np.isin(codes, np.flatnonzero(share[j] >= min_share))
        u = U[rows, j] - U[rows, j].mean()
        t = T[rows] - T[rows].mean(0)
        den = np.linalg.norm(u) * np.linalg.norm(t, axis=0)
        R[j] = np.divide(t.T @ u, den, out=np.zeros(T.shape[1]), where=den > 0)
    match = np.where(R.max(1) >= r_min, R.argmax(1), -1) if R.size else np.full(U.shape[1], -1)
    return match, R


def _top_share(U, hits, codes, section: int, top: float = 0.1):
    """Largest share, over the found programs ``hits``, of their top ``top`` spots (by usage)
    lying in ``section``; ``None`` without a hit."""
    if not len(hits):
        return None
    U = np.asarray(U, np.float64)
    n_top = max(1, int(round(top * U.shape[0])))
    return float(max(np.mean(codes[np.argsort(-U[:, j], kind="stable")[:n_top]] == section) for j in hits))


def evaluate_batch(adata, truth: dict | None = None) -> dict[str, Any]:
    """Score a finished run on a ``batch`` draw: shared programs found once, the section-only one flagged.

    Reads the truth (``obsm['true_usage']``, ``obs['sample']``, ``uns['benchmark']``), the
    run's usages ``obsm['X_nmf_consensus']`` and, when the score stage wrote it,
    ``uns['nmf_samples']['sample_specific']``. Programs are matched by :func:`match_programs`.
    ``truth``: the draw's ``uns['benchmark']`` where the run's AnnData no longer holds it.

    Returns
    -------
    dict
        ``found_per_planted`` (found programs matched to each planted one),
        ``shared_found_once`` (every shared planted program matched by exactly one found
        program), ``specific_found`` (the section-only program matched at least once),
        ``specific_share`` (the largest share of a matching found program's usage in the planted
        section; ``None`` if not found), ``specific_top_share`` (the same for the share of its
        top decile of spots by usage: a diagnostic, insensitive to the low usage the refit gives
        a program in every spot), ``specific_flagged`` (found, and every found program
        matching it is flagged ``sample_specific``; ``None`` when the run has no
        ``uns['nmf_samples']``) and ``flags_missing``.
    """
    info = truth if truth is not None else adata.uns["benchmark"]
    spec = int(info["section_specific"]["program"])
    labels = adata.obs["sample"]
    cats = [str(c) for c in labels.cat.categories]
    codes = labels.cat.codes.to_numpy().astype(np.intp)
    U = adata.obsm["X_nmf_consensus"]
    match, R = match_programs(adata.obsm["true_usage"], U, codes)
    k = int(info["planted_k"])
    found = [int((match == p).sum()) for p in range(k)]
    hits = np.flatnonzero(match == spec)
    share = section_shares(U, codes, len(cats))
    s_idx = cats.index(str(info["section_specific"]["section"]))
    row: dict[str, Any] = {
        "n_found": int(U.shape[1]), "match": match.tolist(), "match_r": np.round(R.max(1), 3).tolist(),
        "found_per_planted": found,
        "shared_found_once": all(found[p] == 1 for p in range(k) if p != spec),
        "specific_found": bool(len(hits)),
        "specific_share": float(share[hits, s_idx].max()) if len(hits) else None,
        "max_share": np.round(share.max(1), 3).tolist(),
        "specific_top_share": _top_share(U, hits, codes, s_idx),
    }
    ns = adata.uns.get("nmf_samples")
    if ns is None or "sample_specific" not in ns:
        row.update(specific_flagged=None, flags_missing=True)
    else:
        flags = np.asarray(ns["sample_specific"], bool)
        row.update(specific_flagged=bool(len(hits)) and bool(flags[hits].all()), flags_missing=False)
    return row


def write_draw(adata, directory) -> list[Path]:
    """Write a draw as h5ad: one file per section for ``batch`` (``batch_<seed>_S0.h5ad`` ...),
    one file (``<family>_<seed>.h5ad``) otherwise; each readable by ``data=h5ad data.path=...``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = adata.uns["benchmark"]
    stem = f"{info['family']}_{info['seed']}"
    if "sample" not in adata.obs:
        path = directory / f"{stem}.h5ad"
        adata.write_h5ad(path)
        return [path]
    paths = []
    for label in adata.obs["sample"].cat.categories:
        part = adata[(adata.obs["sample"] == label).to_numpy()].copy()
        # the file is the sample: data=samples names it by the file and refuses a second label
        part.obs = part.obs.drop(columns="sample")
        path = directory / f"{stem}_{label}.h5ad"
        part.write_h5ad(path)
        paths.append(path)
    return paths


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


def _candidate_fields(c) -> dict[str, Any]:
    """The stage's candidate set and each K's gap to the chosen K (``scripts/calibrate_margin.py``
    recomputes the set at any threshold from the gaps)."""
    if "k_candidates" not in c:
        return {}
    return {"k_candidates": [int(k) for k in c["k_candidates"]],
            "k_gaps": {str(int(k)): float(g) for k, g in zip(c["k_values"], c["k_gap"])}}


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
    multi = "sample" in adata.obs  # a study of sections (the batch family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a study of sections: HVGs per section (scanpy's batch_key) and the per-section table
        a = preprocess(adata, **cfg["preprocess"], **({"sample_key": "sample"} if multi else {}))
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
                 "warned": bool(flag.fired), **_candidate_fields(c)}
            per_rule[rule] = r
            if i == 0:
                score(b, **cfg["score"], **({"sample_key": "sample"} if multi else {}))
                rec = program_recovery(c["spectra"], b.var["true_program"].astype(str).to_numpy())[0]
                row = {**r, "recovery": float(rec),
                       "usage_r": usage_recovery(b.obsm["true_usage"], b.obsm["X_nmf_consensus"]),
                       "n_background": int(c.get("n_background", 0))}
                if multi:
                    row["batch"] = evaluate_batch(b, truth)
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
                              "warned": bool(info["runner_up_k"] == k
                                             or not info["margin"] >= c["confident_margin"])}  # as report_k
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
    ap.add_argument("--write", type=Path, default=None, metavar="DIR",
                    help="write the draws as h5ad to DIR (batch: one file per section, e.g. DIR/batch_3_S0.h5ad, "
                         "each readable by data=h5ad data.path=...) and run nothing")
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
    if a.write is not None:
        for seed in range(a.seed_start, a.seed_start + a.draws):
            for path in write_draw(draw(a.family, seed, **caps), a.write):
                print(path, flush=True)
        return []
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
        bt = r.get("batch")
        extra = (f"  found/planted {bt['found_per_planted']} once {'yes' if bt['shared_found_once'] else 'no'} "
                 f"section-only {'found' if bt['specific_found'] else 'missed'}" if bt else "")
        print(f"{seed:>6} {r['n_spots']:>6} {r['n_genes']:>6} {r['planted_k']:>3} {r['k']:>4} {r['runner_up']:>4} "
              f"{r['margin']:>7.2f} {'yes' if r['warned'] else 'no':>5} {r['recovery']:>5.2f} {r['usage_r']:>6.2f} "
              f"{r['seconds']:>5.0f}  {other}{extra}", flush=True)
    if a.family == "batch":  # a run the consensus refused is a miss on every count
        for key, what in (("shared_found_once", "each shared program found once"),
                          ("specific_found", "section-only program found"),
                          ("specific_flagged", "section-only program flagged sample_specific")):
            vals = [r["batch"][key] if "batch" in r else False for r in rows]
            if any(v is None for v in vals):
                print(f"{a.family}: {what}: not measured (the runs have no uns['nmf_samples'])", flush=True)
                continue
            hit, n = sum(map(bool, vals)), len(vals)
            lo, hi = wilson(hit, n)
            print(f"{a.family}: {what} {hit}/{n} = {hit / n:.2f} [{lo:.2f}, {hi:.2f}] (95 % Wilson)", flush=True)
    for rule in rules:
        s = summarize(rows, rule)
        print(f"{a.family} rule {rule}: exact K {_fmt_rate(s, 'exact')}; within one "
              f"{_fmt_rate(s, 'within_one')}; over {s['over']}, under {s['under']}, refused {s['failed']} "
              f"(95 % Wilson intervals, "
              f"n = {s['n']})", flush=True)
    return rows


if __name__ == "__main__":
    main()
