"""The seed's API (``tardis_spac.utils``), built on tardis_exp's stages.

Same signatures, defaults and output keys as the documented
``nmf_clustering`` / ``nmf_consensus``, so the seed's two-line usage runs unchanged::

    adata = nmf_clustering(adata)
    adata = nmf_consensus(adata)

Deliberate differences are listed in docs/seed_api.md ("Differences from the seed").
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .consensus import consensus
from .factorize import factorize
from .preprocess import preprocess
from .score import score


def _looks_like_counts(X) -> bool:
    v = X.data if sp.issparse(X) else np.asarray(X)
    v = v[: 1_000_000]
    return bool(np.all(np.mod(v, 1) == 0))


def nmf_clustering(adata: ad.AnnData, n_components: int = 10, random_state: int = 42, max_iter: int = 1000,
                   verbose: int = 0, n_top_genes: int = 2000) -> ad.AnnData:
    """Perform NMF-based clustering on highly variable genes.

    Parameters
    ----------
    adata
        AnnData object. The raw expression matrix (counts are log-normalized first;
        a matrix that is not integer counts is used as it is).
    n_components
        Number of NMF components/clusters.
    random_state
        Random seed for reproducibility.
    max_iter
        Maximum number of NMF iterations.
    verbose
        Verbosity level (> 0 shows a progress bar).
    n_top_genes
        Number of highly variable genes to use.

    Returns
    -------
    AnnData over the highly variable genes with NMF results in ``obsm['X_nmf']`` and
    ``uns['X_nmf_components']``.
    """
    normalize = "log1p" if _looks_like_counts(adata.X) else "none"
    out = preprocess(adata, normalize=normalize, n_top_genes=n_top_genes, min_cells=0, min_counts=0)
    factorize(out, n_components=n_components, n_replicates=1, random_state=random_state, max_iter=max_iter,
              solver="mu", progress=bool(verbose) or None)
    return out


def nmf_consensus(adata: ad.AnnData, min_clusters: int = 4, max_clusters: int = 10, n_resamples: int = 100,
                  resample_frac: float = 0.8, random_state: int = 42, n_cluster_genes: int = 50) -> ad.AnnData:
    """Perform consensus clustering using NMF results and compute cluster gene scores.

    Parameters
    ----------
    adata
        AnnData object where NMF results have already been computed.
    min_clusters, max_clusters
        Range of cluster numbers to test (clipped, with a warning, to what the
        resampled components allow).
    n_resamples
        Number of resamplings for consensus clustering.
    resample_frac
        Fraction of samples used in each resample.
    random_state
        Random seed.
    n_cluster_genes
        Number of top genes per cluster to use for scoring.

    Returns
    -------
    The AnnData with ``obs['nmf_cluster_{i}']`` (z-scored program scores),
    ``obs['nmf_cluster']`` (argmax label) and ``uns['nmf_consensus']``.
    """
    consensus(adata, method="components", min_clusters=min_clusters, max_clusters=max_clusters,
              n_resamples=n_resamples, resample_frac=resample_frac, random_state=random_state)
    score(adata, n_cluster_genes=n_cluster_genes)
    return adata
