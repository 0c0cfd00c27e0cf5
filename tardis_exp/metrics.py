"""Quality measures shared by the stages, the benchmarks and the tests."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment


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

    For a true program t with marker set G_t (among the genes of ``spectra``) and a
    recovered program p, precision(t, p) is the fraction of p's top n_t genes that are in
    G_t, with n_t = min(|G_t|, n_genes). True and recovered programs are matched one to one
    (Hungarian algorithm, maximizing total precision); the recovery is the mean matched
    precision over the true programs, an unmatched true program counting 0.

    Returns
    -------
    (recovery, match) with ``match[t]`` the recovered program matched to true program t
    (-1 if none).
    """
    from .score import rank_genes

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
