"""Deterministic synthetic spatial counts with known gene programs.

The embedded default data set: spots on a square grid, each spot a soft mixture of
``n_programs`` spatially patterned programs, counts drawn from a negative binomial
around that mixture. The ground truth is stored in the AnnData so metrics can be
computed against it:

``obs['true_domain']``
    Dominant program of each spot (categorical, ``'P0'`` ...).
``obsm['true_usage']``
    Mixture weights (spots x programs), rows sum to 1.
``obsm['spatial']``
    Grid coordinates.
``var['true_program']``
    Program a gene is a marker of, ``'none'`` for background genes.
``varm['true_programs']``
    Expression profile of every program (genes x programs).
``uns['synthetic']``
    The parameters that made it.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def _farthest_points(coords: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` spread-out grid points (greedy farthest-point sampling)."""
    chosen = [int(rng.integers(len(coords)))]
    d = np.linalg.norm(coords - coords[chosen[0]], axis=1)
    for _ in range(1, k):
        nxt = int(np.argmax(d))
        chosen.append(nxt)
        d = np.minimum(d, np.linalg.norm(coords - coords[nxt], axis=1))
    return np.asarray(chosen)


def make_synthetic(
    n_spots: int = 3600,
    n_genes: int = 3000,
    n_programs: int = 6,
    n_markers: int = 60,
    marker_fold: float = 6.0,
    mean_library_size: float = 3000.0,
    dispersion: float = 0.2,
    sharpness: float = 4.0,
    seed: int = 0,
) -> ad.AnnData:
    """Make a spatial count matrix from ``n_programs`` known programs.

    Parameters
    ----------
    n_spots, n_genes
        Shape of the count matrix; spots are laid on a ``ceil(sqrt(n_spots))`` grid.
    n_programs
        Number of true programs (= spatial domains).
    n_markers
        Marker genes per program (disjoint sets); the other genes are background.
    marker_fold
        Mean fold increase of a marker in its own program over background.
    mean_library_size
        Mean total counts per spot.
    dispersion
        Negative-binomial dispersion (0 gives Poisson).
    sharpness
        How crisp domain boundaries are (larger = less mixing).
    seed
        Everything is a function of this seed.
    """
    if n_programs < 1:
        raise ValueError(f"data.n_programs must be >= 1, got {n_programs}")
    if n_programs * n_markers > n_genes:
        raise ValueError(
            f"data.n_genes={n_genes} is too small for data.n_programs={n_programs} "
            f"x {n_markers} marker genes"
        )
    if n_spots < n_programs:
        raise ValueError(f"data.n_spots={n_spots} must be >= data.n_programs={n_programs}")
    rng = np.random.default_rng(seed)

    side = int(np.ceil(np.sqrt(n_spots)))
    ij = np.stack(np.divmod(np.arange(n_spots), side), axis=1).astype(np.float64)
    coords = ij / side

    centers = coords[_farthest_points(coords, n_programs, rng)]
    d2 = ((coords[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    # Soft Voronoi domains: scale so that the typical center spacing maps to `sharpness`.
    spacing = 1.0 / np.sqrt(n_programs)
    logits = -d2 / (spacing**2) * sharpness * 4
    logits -= logits.max(1, keepdims=True)
    usage = np.exp(logits)
    usage /= usage.sum(1, keepdims=True)

    base = rng.lognormal(mean=0.0, sigma=1.0, size=n_genes)
    base /= base.sum()
    programs = np.tile(base[:, None], (1, n_programs))
    marker_of = np.full(n_genes, -1)
    perm = rng.permutation(n_genes)
    for p in range(n_programs):
        genes = perm[p * n_markers : (p + 1) * n_markers]
        marker_of[genes] = p
        # markers sit at a moderate base level so they are neither invisible nor dominating
        programs[genes, p] = np.median(base) * marker_fold * rng.lognormal(0.0, 0.3, size=len(genes))
    programs /= programs.sum(0, keepdims=True)

    library = mean_library_size * rng.lognormal(0.0, 0.3, size=n_spots)
    mu = library[:, None] * (usage @ programs.T)
    if dispersion > 0:
        lam = rng.gamma(shape=1.0 / dispersion, scale=mu * dispersion)
    else:
        lam = mu
    counts = rng.poisson(lam).astype(np.float32)

    obs_names = [f"spot{i}" for i in range(n_spots)]
    var_names = [f"gene{g}" for g in range(n_genes)]
    labels = [f"P{p}" for p in range(n_programs)]
    adata = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(index=obs_names),
        var=pd.DataFrame(index=var_names),
    )
    adata.obs["true_domain"] = pd.Categorical.from_codes(usage.argmax(1), categories=labels)
    adata.obsm["true_usage"] = usage.astype(np.float32)
    adata.obsm["spatial"] = (ij * 100.0).astype(np.float32)
    adata.var["true_program"] = pd.Categorical(
        [labels[m] if m >= 0 else "none" for m in marker_of], categories=labels + ["none"]
    )
    adata.varm["true_programs"] = programs.astype(np.float32)
    adata.uns["synthetic"] = {
        "n_spots": n_spots,
        "n_genes": n_genes,
        "n_programs": n_programs,
        "n_markers": n_markers,
        "marker_fold": marker_fold,
        "mean_library_size": mean_library_size,
        "dispersion": dispersion,
        "sharpness": sharpness,
        "seed": seed,
    }
    return adata
