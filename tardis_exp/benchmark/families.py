"""The families: each draw a function of ``(family, seed)`` and the size caps, with its truth
(:mod:`tardis_exp.benchmark`); :func:`draw` by name, :func:`write_draw` to h5ad files."""

from __future__ import annotations

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


def _spatial_profiles(dr, n_genes: int, k: int, p: dict):
    """The spatial families' gene profiles (genes x k: a shared base profile plus each
    program's own marker genes), the marker of each gene and the shared background profile."""
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
    return programs, marker_of, background


def draw_spatial(seed: int, **caps):
    """Spatial mixture of smooth domains over a shared background profile.

    Spots on a square grid; K domains are soft Voronoi cells around spread-out centres, their
    overlap set by ``sharpness`` (small = broad mixing zones). Each program is a base profile
    with its own marker genes raised ``marker_fold`` times; every spot also draws a fraction
    ``background`` (varying +-25 % from spot to spot) of its counts from a second profile that
    all spots share. Depth ``library`` and negative-binomial ``dispersion`` are drawn too.
    """
    from ..synthetic import _farthest_points

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

    programs, marker_of, background = _spatial_profiles(dr, n_genes, k, p)
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
    from ..synthetic import _farthest_points

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

    programs, marker_of, background = _spatial_profiles(dr, n_genes, k, p)
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
