"""Batch correction between the samples of one study (``preprocess.batch_correction``).

``scale``: per-sample gene scaling. A technical batch effect that multiplies a gene's
expression in one sample (capture efficiency, probe bias) is a per-gene, per-sample factor on
the linear scale. After the normalization, every gene's values in sample ``s`` are divided by
``r_sg = m_sg / mean_s(m_sg)``, the ratio of the gene's mean in that sample (``m_sg``) to its
mean over the samples (each sample weighted equally), on the linear scale (``expm1`` of
``log1p`` data, undone afterwards). Zeros stay zeros (sparse stays sparse), so the input of the
factorization stays non-negative. A gene absent from a sample keeps its values (``r`` is 1).

The ratio also removes real differences in a gene's mean between samples (a program more
abundant in one section): what is left is each gene's variation within the samples.
docs/benchmark.md measures it against ``none`` on the ``batch`` family.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .errors import ConfigError, InputError

METHODS = ("none", "scale", "scale_trimmed")


def sample_codes(adata, sample_key: str | None, method: str) -> np.ndarray:
    """Integer sample code of every spot; one clear error if the key is missing or not in ``obs``."""
    if sample_key is None:
        raise ConfigError(f"preprocess.batch_correction={method} needs the samples: set data.sample_key "
                          "to the obs column holding each spot's sample")
    if sample_key not in adata.obs:
        raise InputError(f"data.sample_key={sample_key!r} is not a column of obs (columns: "
                         f"{list(adata.obs.columns)[:10]})")
    import pandas as pd

    return pd.Categorical(adata.obs[sample_key].astype(str)).codes.astype(np.intp)


TRIM = 0.25  # scale_trimmed: the top quarter of each gene's values in a sample left out of its mean
_BLOCK_GENES = 512  # genes densified at a time (trimmed means sort a sample's column)


def _trimmed_means(L, codes: np.ndarray, n: int, trim: float) -> np.ndarray:
    """Mean of the lowest ``1 - trim`` of each gene's values per sample (samples x genes).

    Multiplying a gene in a sample by a factor multiplies this by the factor too, as the mean;
    a program held by fewer than ``trim`` of a sample's spots moves it little."""
    out = np.zeros((n, L.shape[1]))
    for s in range(n):
        rows = np.flatnonzero(codes == s)
        keep = max(1, int(np.ceil((1 - trim) * len(rows))))
        for g0 in range(0, L.shape[1], _BLOCK_GENES):
            block = L[rows, g0:g0 + _BLOCK_GENES]
            block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
            if keep < len(rows):
                block = np.partition(block, keep - 1, axis=0)[:keep]
            out[s, g0:g0 + block.shape[1]] = block.mean(0)
    return out


def sample_means(L, codes: np.ndarray, trim: float = 0.0) -> np.ndarray:
    """Each gene's mean in each sample (samples x genes, float64; ``trim`` > 0: trimmed
    means, :func:`_trimmed_means`)."""
    n = int(codes.max()) + 1
    if trim > 0:
        return _trimmed_means(L, codes, n, trim)
    ind = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n, len(codes)))
    counts = np.asarray(ind.sum(1)).ravel()
    sums = ind @ L
    sums = sums.toarray() if sp.issparse(sums) else sums
    return np.asarray(sums, dtype=np.float64) / counts[:, None]


def _ratios(means: np.ndarray, overall: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = means / overall[None, :]
    r[~np.isfinite(r) | (r <= 0)] = 1.0  # a gene absent from a sample (or from all): left as it is
    return r


def sample_ratios(L, codes: np.ndarray, trim: float = 0.0) -> np.ndarray:
    """``r`` (samples x genes): each gene's mean in a sample over its mean across the samples
    (``trim`` > 0: trimmed means, :func:`_trimmed_means`)."""
    means = sample_means(L, codes, trim)
    return _ratios(means, means.mean(0))


def correct(adata, sample_key: str | None, method: str, normalize: str = "log1p",
            reference: np.ndarray | None = None) -> np.ndarray | None:
    """Apply ``method`` to ``adata.X`` in place (normalized data, before the HVG selection).

    Parameters
    ----------
    adata
        Normalized spots x genes (``preprocess.normalize`` already applied).
    sample_key
        ``obs`` column with the sample labels (``data.sample_key``).
    method
        ``'none'`` (nothing) or ``'scale'`` (module docstring).
    normalize
        The normalization applied: ``'log1p'`` data are corrected on the linear scale.
    reference
        A projection (:mod:`tardis_exp.project`): the source run's per-gene means over its
        samples, which each sample of ``adata`` is brought to instead of the mean over its
        own samples (``sample_key=None``: all of ``adata`` is one sample).

    Returns
    -------
    The per-gene means over the samples (the mean of the per-sample means, linear scale)
    that the samples were brought to: what a projection's ``reference`` is; None for ``'none'``.
    """
    if method == "none":
        return None
    if method not in METHODS:
        raise ConfigError(f"preprocess.batch_correction={method!r}; choose one of {METHODS}")
    if reference is not None and sample_key is None:
        codes = np.zeros(adata.n_obs, np.intp)
    else:
        codes = sample_codes(adata, sample_key, method)
    trim = TRIM if method == "scale_trimmed" else 0.0

    def ratios(L):  # each sample's means over those it is brought to
        means = sample_means(L, codes, trim)
        overall = means.mean(0) if reference is None else np.asarray(reference, np.float64)
        return _ratios(means, overall), overall

    X = adata.X
    log = normalize == "log1p"
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32, copy=True)
        L = X.copy()
        if log:
            L.data = np.expm1(L.data)
        r, overall = ratios(L)
        rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        L.data = (L.data / r[codes[rows], X.indices]).astype(np.float32)
        if log:
            L.data = np.log1p(L.data)
        adata.X = L
    else:
        X = np.asarray(X, dtype=np.float32)
        L = np.expm1(X) if log else X
        r, overall = ratios(L)
        L = (L / r[codes]).astype(np.float32)
        adata.X = np.log1p(L) if log else L
    return overall
