"""Quality measures shared by the stages, the benchmarks and the tests.

Pure NumPy/SciPy (scikit-learn imported inside :func:`spatial_graph`): nothing here imports
scanpy or a stage module, so the benchmarks and tests can score spectra without them.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

# the gene rankings of score.gene_ranking (see rank_genes)
from .params import RANKINGS  # noqa: E402 -- declared once, with the score parameters


def rank_genes(spectra: np.ndarray, ranking: str = "specific") -> np.ndarray:
    """Gene ranking score per program (programs x genes); higher is better.

    ``specific`` weighs each loading by the program's share of that gene's total loading,
    so genes loaded on every program (housekeeping, library size) do not top every list.
    """
    S = np.asarray(spectra, dtype=np.float64)
    if ranking == "loading":
        return S
    share = S / np.where(S.sum(0, keepdims=True) > 0, S.sum(0, keepdims=True), 1)
    return S * share


def spatial_graph(coords: np.ndarray, n_neighbors: int = 6) -> sp.csr_matrix:
    """Symmetric binary kNN graph of spot coordinates (for Moran's I)."""
    from sklearn.neighbors import NearestNeighbors

    n = len(coords)
    k = max(1, min(n_neighbors, n - 1))
    nn = NearestNeighbors(n_neighbors=k + 1).fit(coords)
    _, idx = nn.kneighbors(coords)
    rows = np.repeat(np.arange(n), k)
    G = sp.csr_matrix((np.ones(n * k), (rows, idx[:, 1:].ravel())), shape=(n, n))
    return ((G + G.T) > 0).astype(np.float64).tocsr()


def program_recovery(spectra, true_program, n_genes: int = 50, ranking: str = "specific"):
    """How well recovered programs match the true ones, in [0, 1].

    For a true program ``t`` with marker set ``G_t`` (among the genes of ``spectra``) and a
    recovered program ``p``, ``precision(t, p)`` is the fraction of p's top ``n_t`` genes that
    are in ``G_t``, with ``n_t = min(len(G_t), n_genes)``. True and recovered programs are
    matched one to one (Hungarian algorithm, maximizing total precision); the recovery is the
    mean matched precision over the true programs, an unmatched true program counting 0.

    Parameters
    ----------
    spectra
        Recovered programs x genes (non-negative loadings).
    true_program
        Per gene, the label of the true program it marks; ``"none"`` (or NaN) for no program.
    n_genes
        At most this many top genes per program are compared.
    ranking
        How genes are ranked within a program (:func:`rank_genes`).

    Returns
    -------
    recovery : float
        Mean matched precision over the true programs; NaN when no gene has a label.
    match : numpy.ndarray
        ``match[t]``: the recovered program matched to the t-th true label in sorted order
        (-1 if none).
    """
    true_program = np.asarray(true_program).astype(str)
    labels = sorted(set(true_program) - {"none", "nan"})
    if not labels:
        return float("nan"), np.array([], dtype=int)
    score = rank_genes(spectra, ranking)
    order = np.argsort(-score, axis=1, kind="stable")
    P = np.zeros((len(labels), score.shape[0]))
    for t, lab in enumerate(labels):
        markers = true_program == lab
        n_t = int(min(markers.sum(), n_genes))
        if n_t == 0:
            continue
        for p in range(score.shape[0]):
            P[t, p] = markers[order[p, :n_t]].mean()
    rows, cols = linear_sum_assignment(-P)
    match = np.full(len(labels), -1)
    match[rows] = cols
    return float(P[rows, cols].sum() / len(labels)), match
