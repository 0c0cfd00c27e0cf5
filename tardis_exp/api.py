"""The seed's API (``tardis_spac.utils``), built on tardis_exp's stages.

Same signatures, defaults and output keys as the documented
``nmf_clustering`` / ``nmf_consensus``, so the seed's two-line usage runs unchanged::

    adata = nmf_clustering(adata)
    adata = nmf_consensus(adata)

Deliberate differences are listed in docs/seed_api.md ("Differences from the seed").
"""

from __future__ import annotations

import functools
import logging
import re
import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .consensus import consensus
from .errors import TardisError
from .factorize import factorize
from .preprocess import preprocess
from .score import score
from .stages import ORDER

# The stages name their config keys (``consensus.max_clusters``); these two functions'
# signatures have none of them. Each key an API function sets, mapped to the function and
# argument that set it; messages raised or warned inside nmf_clustering / nmf_consensus are
# rewritten with it (:func:`_api_names`), so a user reads the argument they can change.
API_ARGUMENTS = {
    "preprocess.n_top_genes": ("nmf_clustering", "n_top_genes"),
    "factorize.n_components": ("nmf_clustering", "n_components"),
    "factorize.random_state": ("nmf_clustering", "random_state"),
    "factorize.max_iter": ("nmf_clustering", "max_iter"),
    "consensus.min_clusters": ("nmf_consensus", "min_clusters"),
    "consensus.max_clusters": ("nmf_consensus", "max_clusters"),
    "consensus.n_resamples": ("nmf_consensus", "n_resamples"),
    "consensus.resample_frac": ("nmf_consensus", "resample_frac"),
    "consensus.random_state": ("nmf_consensus", "random_state"),
    "score.n_cluster_genes": ("nmf_consensus", "n_cluster_genes"),
}
# advice that names a key the API fixes (no argument to change), in the API's terms
_API_ADVICE = {
    "Point preprocess.layer at the raw counts (e.g. preprocess.layer=counts)":
        "Pass the raw counts as adata.X (e.g. adata.X = adata.layers['counts'])",
    "consensus.method=components needs a factorization: run the factorize stage first":
        "nmf_consensus needs a factorization: run nmf_clustering first",
    "factorize.n_components/n_replicates": "n_components of nmf_clustering",
}
_KEY = re.compile(r"(?<![\w.])(" + "|".join(re.escape(k) for k in API_ARGUMENTS) + r")(=[^\s,;:)]+)?(?![\w.])")


def api_message(text: str, function: str) -> str:
    """``text`` with the config keys of :data:`API_ARGUMENTS` as ``function``'s arguments;
    an argument of the other function reads ``nmf_clustering(n_components=5)``."""
    for cli, api in _API_ADVICE.items():
        text = text.replace(cli, api)

    def arg(m):
        owner, name = API_ARGUMENTS[m[1]]
        value = m[2] or ""
        return f"{name}{value}" if owner == function else f"{owner}({name}{value})"

    return _KEY.sub(arg, text)


class _Rename(logging.Filter):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def filter(self, record):
        record.msg, record.args = api_message(record.getMessage(), self.function), ()
        return True


_STAGE_LOGGERS = [logging.getLogger(f"{__package__}.{m}") for m in ORDER]


def _api_names(func):
    """Run ``func`` with its errors, warnings and log lines in its own argument names."""
    name = func.__name__

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        rename = _Rename(name)
        for lg in _STAGE_LOGGERS:
            lg.addFilter(rename)
        try:
            # the caller's filters still apply inside: ignored warnings stay ignored, an
            # "error" filter raises there (a Warning, renamed below like our errors)
            with warnings.catch_warnings(record=True) as caught:
                try:
                    return func(*args, **kwargs)
                except (TardisError, Warning) as e:
                    # the same exception, traceback kept; only its text is the API's
                    e.args = (api_message(str(e), name), *e.args[1:])
                    raise
        finally:
            for lg in _STAGE_LOGGERS:
                lg.removeFilter(rename)
            for w in caught:
                text = api_message(str(w.message), name)
                if text != str(w.message):  # ours: at the caller's line, as the stage meant it
                    warnings.warn(text, w.category, stacklevel=2)
                else:  # anyone else's: shown as it was, it passed the filters already
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)

    return wrapper


def _looks_like_counts(X) -> bool:
    v = X.data if sp.issparse(X) else np.asarray(X)
    v = v[: 1_000_000]
    return bool(np.all(np.mod(v, 1) == 0))


@_api_names
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


@_api_names
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
