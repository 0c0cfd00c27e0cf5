"""Quality measures shared by the stages, the benchmarks and the tests.

Pure NumPy/SciPy (scikit-learn imported inside :func:`knn_index` and :func:`spatial_graph`): nothing here imports
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


def knn_index(coords: np.ndarray, n_neighbors: int = 6, chunk: int = 100_000) -> np.ndarray:
    """Each spot's ``n_neighbors`` nearest other spots (spots x k, int32), queried in row chunks
    (no distances kept: 2,000,000 spots x 6 is 48 MB)."""
    from sklearn.neighbors import NearestNeighbors

    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    k = max(1, min(n_neighbors, n - 1))
    nn = NearestNeighbors(n_neighbors=k + 1).fit(coords)
    idx = np.empty((n, k), dtype=np.int32 if n < 2**31 else np.int64)
    for a in range(0, n, chunk):
        idx[a:a + chunk] = nn.kneighbors(coords[a:a + chunk], return_distance=False)[:, 1:]
    return idx


def knn_morans_i(idx: np.ndarray, values: np.ndarray, chunk: int = 25_000) -> np.ndarray:
    """Moran's I of every column of ``values`` (spots x p, or spots) on the symmetric binary kNN graph of
    :func:`spatial_graph`, from its neighbour index (:func:`knn_index`) without building it.

    The graph ``S`` is ``A`` or ``A``ᵀ, ``A`` the directed kNN edges; an edge in both (mutual
    neighbours) is one edge of ``S``. Hence ``sum_S z_i z_j = 2 sum_A z_i z_j - sum_mutual z_i z_j``
    and ``|S| = 2|A| - |mutual|``; ``I = n / |S| * sum_S z_i z_j / sum z_i^2`` (``z`` centred), as
    ``scanpy.metrics.morans_i`` on ``spatial_graph``'s matrix gives, in a few spots-sized
    vectors instead of the matrix and its transpose (0.86 GB at 2,000,000 spots). NaN for a
    constant column.
    """
    idx = np.asarray(idx)
    V = np.asarray(values, dtype=np.float64)
    V = V.reshape(len(V), -1)  # one column: a view
    mean = V.mean(0)
    n, k = idx.shape
    num, den = np.zeros(V.shape[1]), np.zeros(V.shape[1])
    n_mutual = 0
    for a in range(0, n, chunk):  # centred a chunk at a time: no spots-sized copy of values
        nb = idx[a:a + chunk]
        rows = np.arange(a, a + len(nb))
        Z = V[a:a + len(nb)] - mean
        prod = Z[:, None, :] * (V[nb] - mean)  # chunk x k x p
        mutual = (idx[nb] == rows[:, None, None]).any(-1)  # is the spot among its neighbour's neighbours
        num += 2 * prod.sum((0, 1)) - prod[mutual].sum(0)
        den += np.einsum("ij,ij->j", Z, Z)
        n_mutual += int(mutual.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return n / (2 * n * k - n_mutual) * num / den


def adjusted_rand_codes(a, b) -> float:
    """``sklearn.metrics.adjusted_rand_score`` of two labelings given as integer codes (>= 0).

    The same pair counts and the same formula, from a dense contingency table counted with
    ``np.bincount`` instead of sklearn's spots-sized sparse one (its construction was the
    score stage's peak at 2,000,000 spots); many labels (a table past 10^7 cells) go to sklearn.
    """
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    na, nb = int(a.max(initial=-1)) + 1, int(b.max(initial=-1)) + 1
    if len(a) == 0 or na * nb > 10**7:
        from sklearn.metrics import adjusted_rand_score

        return float(adjusted_rand_score(a, b))
    C = np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb)
    n = np.int64(len(a))
    n_c, n_k = C.sum(1), C.sum(0)
    sum_squares = int((C.astype(object) ** 2).sum()) if n > 3 * 10**9 else int((C ** 2).sum())
    tp = sum_squares - int(n)
    fp = int((C @ n_k).sum()) - sum_squares
    fn = int((C.T @ n_c).sum()) - sum_squares
    tn = int(n) ** 2 - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def spatial_graph(coords: np.ndarray, n_neighbors: int = 6) -> sp.csr_matrix:
    """Symmetric binary kNN graph of spot coordinates (the graph of :func:`knn_morans_i`)."""
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
