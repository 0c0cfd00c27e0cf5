"""K from the matrix the factorization sees, not from the replicates: the statistics of the
rules ``bicv`` and ``parallel`` (:mod:`tardis_exp.krules`).

Both read only ``adata.X`` (a seeded subsample of spots) and a seed, never the replicates, so
the K they give does not depend on ``factorize.solver`` or on when it stops.

``bicv``
    Bi-cross-validation of the rank (Owen & Perry 2009), with non-negative fits: the spots
    and genes are split into ``folds`` groups each; in fold f the block ``X[I_f, J_f]`` is
    held out, a rank-k NMF is fitted to ``X[-I, -J]`` (HALS run to a fixed tolerance, one
    seeded start per rank), ``H_J`` is solved from ``X[-I, J]`` and ``W_I`` from
    ``X[I, -J]`` by NNLS, and the held-out error is ``||X[I, J] - W_I H_J||^2 / ||X[I, J]||^2``.
    Below the true rank a program is missing from the prediction; above it the surplus
    components fit the noise of the training block and predict the held-out block worse.
``parallel``
    Horn's parallel analysis (1965) on the eigenvalues: the column-centred matrix's
    eigenvalues against the 95th percentile of those of ``permutations`` copies whose genes
    are each permuted across spots (co-expression gone, every gene's values kept). Centring
    removes one dimension of a mixture whose usages sum to (nearly) one, so K is the number of
    leading eigenvalues above the null plus one.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..nmf import derive_seeds, fit_batch, prepare_matrix, refit_usage

#: The fixed internal solver of ``bicv``: HALS to this tolerance (relative change per check).
BICV_TOL = 1e-5
BICV_MAX_ITER = 2000


def _dense_subsample(X, max_spots: int, rng) -> np.ndarray:
    X = prepare_matrix(X)
    n = X.shape[0]
    rows = np.sort(rng.choice(n, size=min(int(max_spots), n), replace=False))
    S = X[rows]
    return np.ascontiguousarray(S.toarray() if sp.issparse(S) else np.asarray(S), dtype=np.float32)


def bicv_curve(X, ks, random_state, folds: int = 3, max_spots: int = 1000, tol: float = BICV_TOL,
               max_iter: int = BICV_MAX_ITER) -> dict:
    """Held-out error of rank-k NMF per k in ``ks`` by bi-cross-validation (module docstring).

    Parameters
    ----------
    X
        Non-negative spots x genes matrix (the one the factorization sees).
    ks
        Ranks to score (each >= 1).
    random_state
        Seed of the subsample, the splits and the fits' starts.
    folds
        Groups of spots and of genes; fold f holds out the block (spot group f, gene group f).
    max_spots
        Spots in the seeded subsample the statistic is measured on.

    Returns
    -------
    dict
        ``bicv`` (mean relative held-out error per k, lower is better), ``bicv_se`` (its
        standard error over the folds), ``bicv_folds`` (folds x ks).
    """
    rng = np.random.default_rng(random_state)
    return _bicv(_dense_subsample(X, max_spots, rng), ks, rng, folds, "frobenius", tol, max_iter)


def _bicv(D, ks, rng, folds: int, loss: str, tol: float, max_iter: int) -> dict:
    """The folds of bi-cross-validation on ``D``: rank-k NMF on ``X[-I,-J]``, ``H_J`` and ``W_I``
    refit on the fixed factors, the held-out block's error relative to a reference --
    Frobenius (HALS fits, relative to the block's squared norm) or Kullback-Leibler (KL MU
    fits, relative to the block's rank-1 independence fit)."""
    ks = [int(k) for k in ks]
    kl = loss == "kullback-leibler"
    n, m = D.shape
    row_group = rng.permutation(n) % folds
    col_group = rng.permutation(m) % folds
    seeds = derive_seeds(int(rng.integers(2**31)), folds * len(ks))
    fit_kw = {"solver": "mu", "beta_loss": loss} if kl else {"solver": "hals"}
    refit_kw = {"max_iter": 300, "beta_loss": loss} if kl else {"max_iter": 500}
    err = np.full((folds, len(ks)), np.nan)
    for f in range(folds):
        I, J = row_group == f, col_group == f
        train = np.ascontiguousarray(D[~I][:, ~J])
        fits = fit_batch(train, ks, seeds[f * len(ks):(f + 1) * len(ks)], tol=tol, max_iter=max_iter,
                         progress=False, warn=False, desc="bicv-kl" if kl else "bicv", **fit_kw)
        held = D[I][:, J].astype(np.float64)
        if kl:
            ind = np.outer(held.sum(1), held.sum(0)) / max(held.sum(), 1e-12)
            base = max(_kl_dev(held, ind), 1e-12)
        else:
            base = max(float(np.einsum("ij,ij->", held, held)), np.finfo(np.float64).tiny)
        for j, res in enumerate(fits):
            # H_J from the training spots' usages, W_I from the training genes' loadings
            HJ, _ = refit_usage(D[~I][:, J].T, res.W.T, tol=1e-6, progress=False, **refit_kw)
            WI, _ = refit_usage(D[I][:, ~J], res.H, tol=1e-6, progress=False, **refit_kw)
            pred = WI.astype(np.float64) @ HJ.T.astype(np.float64)
            if kl:
                err[f, j] = _kl_dev(held, pred) / base
            else:
                r = held - pred
                err[f, j] = float(np.einsum("ij,ij->", r, r)) / base
    return {"bicv": err.mean(0), "bicv_se": err.std(0, ddof=1) / np.sqrt(folds) if folds > 1
            else np.zeros(len(ks)), "bicv_folds": err}


def parallel_eigen(X, random_state, permutations: int = 10, max_spots: int = 2000, quantile: float = 0.95,
                   max_rank: int = 50) -> dict:
    """Horn's parallel analysis on the eigenvalues of the column-centred matrix.

    Returns ``eigen`` (the data's leading eigenvalues), ``null`` (their ``quantile`` over the
    permuted copies), ``null_sd`` (their standard deviation), ``above`` (the number of leading eigenvalues above the null before the
    first that is not) and ``k`` (``above + 1``: centring removes one dimension of a mixture).
    """
    rng = np.random.default_rng(random_state)
    D = _dense_subsample(X, max_spots, rng).astype(np.float64)
    D -= D.mean(0)
    top = min(int(max_rank), min(D.shape) - 1)
    ev = np.linalg.svd(D, compute_uv=False)[:top] ** 2
    null = np.empty((permutations, top))
    for p in range(permutations):
        P = np.take_along_axis(D, np.argsort(rng.random(D.shape), axis=0), axis=0)
        null[p] = np.linalg.svd(P, compute_uv=False)[:top] ** 2
    thr = np.quantile(null, quantile, axis=0)
    fail = np.flatnonzero(ev <= thr)
    above = int(fail[0]) if len(fail) else top
    return {"eigen": ev, "null": thr, "null_sd": null.std(0, ddof=1) if permutations > 1 else np.zeros(top),
            "above": above, "k": above + 1}


def data_rule_stats(statistic: str, X, random_state, counts=None):
    """``ks -> (stats, spread)`` for the consensus stage (``_components``' ``data_stats``): the
    per-K statistic of the rule reading ``statistic`` and its standard errors, measured once
    (the first call) over every K up to the largest asked, on a stream seeded by
    ``random_state`` alone. ``counts``: the run genes' counts (``layers['counts']``), read by
    ``parallel_counts`` and ``parallel_nb`` instead of ``X``."""
    seed = None if random_state is None else [int(random_state), 3]
    cache: dict = {}

    def at(ks):
        ks = [int(k) for k in ks]
        if statistic == "bicv":
            if "all" not in cache or max(ks) > cache["top"]:
                cache["all"], cache["top"] = bicv_curve(X, range(1, max(ks) + 1), seed), max(ks)
            folds = cache["all"]["bicv_folds"][:, [k - 1 for k in ks]]
            err = folds.mean(0)
            # the one-SE rule's error: of each K's difference to the best K over the same folds
            d = folds - folds[:, [int(np.argmin(err))]]
            se = d.std(0, ddof=1) / np.sqrt(len(folds)) if len(folds) > 1 else np.zeros(len(ks))
            return {"bicv": err}, {"bicv": se}
        if statistic in ("parallel", "parallel_counts", "parallel_nb"):
            if statistic != "parallel" and counts is None:
                raise ValueError(f"consensus.k_selection={statistic} reads adata.layers['counts'] "
                                 "(written by the preprocess stage); this AnnData has none")
            if statistic == "parallel_nb":
                # sequential: measured up to the largest K asked (again, further, if asked more)
                if "pa" not in cache or (max(ks) > cache["top"] and cache["pa"]["stopped"] is False):
                    cache["pa"], cache["top"] = parallel_nb(counts, seed, max_rank=max(ks)), max(ks)
            elif "pa" not in cache:
                if statistic == "parallel":
                    cache["pa"] = parallel_eigen(X, seed)
                else:
                    cache["pa"] = parallel_linear(counts, seed, null="poisson", max_spots=2000)
            pa = cache["pa"]
            # K programs need the K - 1 leading centred eigenvalues above the null: the
            # statistic at K is the smallest of their log ratios (> 0: above; K = 1 needs none)
            ratio = np.concatenate([[np.inf], np.minimum.accumulate(np.log(pa["eigen"] / pa["null"]))])
            se = np.concatenate([[0.0], pa["null_sd"] / pa["null"]])
            top = len(ratio) - 1
            return ({statistic: np.array([ratio[min(k - 1, top)] for k in ks])},
                    {statistic: np.array([se[min(k - 1, top)] for k in ks])})
        raise ValueError(f"no matrix statistic {statistic!r}")

    return at


# ---------------------------------------------------------------- on a linear matrix (issue 24)
#
# The count families' matrix is log1p of counts: the log of a mixture is not a mixture, so its
# rank exceeds the planted K. The functions below measure the rules on the counts of the run's
# genes (``layers['counts']``) made linear: normalize_total, then each gene divided by its
# standard deviation without centring (cNMF's preprocessing) -- a mixture stays a mixture.


def linear_matrix(counts, max_spots: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A seeded subsample of ``counts`` (spots x genes), per-spot normalized to the median total
    and gene-scaled to unit variance (not centred). Returns ``(scaled, counts_subsample)``;
    genes without variance in the subsample are dropped from both."""
    C = _dense_subsample(counts, max_spots, rng).astype(np.float64)
    tot = C.sum(1, keepdims=True)
    keep_rows = tot[:, 0] > 0
    C = C[keep_rows]
    tot = tot[keep_rows]
    N = C * (np.median(tot) / tot)
    sd = N.std(0, ddof=1) if len(N) > 1 else np.zeros(N.shape[1])
    keep = sd > 0
    return N[:, keep] / sd[keep], C[:, keep]


def _centred_eig(D: np.ndarray, top: int) -> np.ndarray:
    D = D - D.mean(0)
    return np.linalg.svd(D, compute_uv=False)[:top] ** 2


def _scaled(C: np.ndarray) -> np.ndarray:
    tot = C.sum(1, keepdims=True)
    tot[tot == 0] = 1.0
    N = C * (np.median(tot) / tot)
    sd = N.std(0, ddof=1)
    sd[sd == 0] = 1.0
    return N / sd


def parallel_linear(counts, random_state, permutations: int = 10, max_spots: int = 2000, quantile: float = 0.95,
                    max_rank: int = 50, null: str = "permute") -> dict:
    """Horn's parallel analysis on :func:`linear_matrix` (as :func:`parallel_eigen`).

    ``null``: ``'permute'`` (each gene's values permuted across spots), ``'poisson'`` (Poisson
    counts around the rank-1 mean ``spot total x gene fraction``, normalized and scaled the
    same way: count noise without co-expression) or ``'deflated'`` (Dobriban & Owen 2019: the
    k-th eigenvalue against the leading eigenvalue of permuted copies of the matrix with its
    first k - 1 components removed).
    """
    rng = np.random.default_rng(random_state)
    D, C = linear_matrix(counts, max_spots, rng)
    top = min(int(max_rank), min(D.shape) - 1)
    Dc = D - D.mean(0)
    U, s, Vt = np.linalg.svd(Dc, full_matrices=False)
    ev = s[:top] ** 2
    if null == "deflated":
        thr = np.empty(top)
        above = top
        for k in range(top):
            R = Dc - (U[:, :k] * s[:k]) @ Vt[:k]
            vals = [np.linalg.svd(np.take_along_axis(R, np.argsort(rng.random(R.shape), axis=0), axis=0),
                                  compute_uv=False)[0] ** 2 for _ in range(permutations)]
            thr[k] = np.quantile(vals, quantile)
            if ev[k] <= thr[k]:
                above = k
                thr[k + 1:] = np.nan
                break
        return {"eigen": ev, "null": thr, "above": above, "k": above + 1}
    nulls = np.empty((permutations, top))
    for p in range(permutations):
        if null == "permute":
            P = np.take_along_axis(D, np.argsort(rng.random(D.shape), axis=0), axis=0)
        elif null == "poisson":
            mu = C.sum(1, keepdims=True) * (C.sum(0, keepdims=True) / C.sum())
            P = _scaled(rng.poisson(mu).astype(np.float64))
        else:
            raise ValueError(f"parallel_linear: null={null!r}; choose permute, poisson or deflated")
        nulls[p] = _centred_eig(P, top)
    thr = np.quantile(nulls, quantile, axis=0)
    fail = np.flatnonzero(ev <= thr)
    above = int(fail[0]) if len(fail) else top
    return {"eigen": ev, "null": thr, "null_sd": nulls.std(0, ddof=1) if permutations > 1 else np.zeros(top),
            "above": above, "k": above + 1}


def _nb_draw(rng, mu: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Negative-binomial counts around ``mu`` with per-gene dispersion ``phi`` (gamma-Poisson;
    a gene with dispersion 0 is Poisson)."""
    lam = mu.copy()
    over = np.broadcast_to(phi > 0, mu.shape)
    ph = np.broadcast_to(phi, mu.shape)[over]
    lam[over] = rng.gamma(1.0 / ph, mu[over] * ph)
    return rng.poisson(lam).astype(np.float64)


def _kth_centred_eig(P: np.ndarray, k: int) -> float:
    """The k-th largest eigenvalue of the column-centred ``P`` (ARPACK when k is small)."""
    P = P - P.mean(0)
    if k + 1 >= min(P.shape) - 1:
        return float(np.linalg.svd(P, compute_uv=False)[k - 1] ** 2)
    from scipy.sparse.linalg import svds

    sv = svds(P, k=k, return_singular_vectors=False, random_state=0)
    return float(np.sort(sv)[::-1][k - 1] ** 2)


def parallel_nb(counts, random_state, permutations: int = 10, max_spots: int = 2000, quantile: float = 0.95,
                max_rank: int = 15, dispersion_rank: int | None = None) -> dict:
    """A sequential parallel analysis on :func:`linear_matrix` against negative-binomial copies of
    rank-k means: the rank of the count mixture, with no offset.

    For k = 1, 2, ...: the rank-k mean is the column means plus the leading k - 1 centred
    components of the linear matrix, mapped back to counts (times each gene's standard
    deviation, over each spot's normalization factor; clipped at 0). Each gene's
    negative-binomial dispersion is its method-of-moments estimate around the rank-``kd`` mean
    (``(sum (c - mu)^2 n / (n - kd) - sum mu) / sum mu^2``, floored at 0: Poisson), ``kd =
    dispersion_rank`` (default ``max_rank + 1``; 0: ``kd = k``, around each tested mean), so
    that the programs do not inflate it. ``permutations`` copies are drawn around the rank-k
    mean with those dispersions and transformed the same way; the data's k-th centred
    eigenvalue is tested against the ``quantile`` of theirs. The first k where it is not above
    is the rank: a mixture of k programs (usages summing to one) has k - 1 centred dimensions,
    and the rank-k null holds them -- the rank is K itself. A shared background whose fraction
    varies from spot to spot is one more dimension of the mixture and is counted.

    Returns ``eigen`` (the data's tested eigenvalues, k = 1 .. the stop), ``null`` (the null's
    quantile at each), ``null_sd``, ``above`` (rank - 1), ``k`` (the rank) and ``stopped``
    (False when every k up to ``max_rank`` was above: the rank is at least ``max_rank``).
    """
    rng = np.random.default_rng(random_state)
    D, C = linear_matrix(counts, max_spots, rng)
    n, m = D.shape
    tot = C.sum(1, keepdims=True)
    factor = np.median(tot) / tot  # the per-spot normalization linear_matrix applied
    sd = (C * factor).std(0, ddof=1)
    mean = D.mean(0)
    U, s, Vt = np.linalg.svd(D - mean, full_matrices=False)
    top = min(int(max_rank), min(n, m) - 2)
    ev, thr, spread = [], [], []
    stopped = False

    def rank_mean(k):
        return np.clip((mean + (U[:, :k - 1] * s[:k - 1]) @ Vt[:k - 1]) * sd / factor, 0.0, None)

    def dispersion(mu, k):
        # residual moments scaled by n / (n - k): the rank-k fit absorbs k dimensions of the noise
        r2 = ((C - mu) ** 2).sum(0) * (n / max(n - k, 1))
        return np.maximum(0.0, (r2 - mu.sum(0)) / np.maximum((mu ** 2).sum(0), np.finfo(np.float64).tiny))

    if dispersion_rank != 0:
        # one dispersion per gene, around the richest mean tested: a program that a rank-k mean
        # lacks would inflate it (the null too high, K too low; design seeds: cnmf 16 of 20
        # exact against 13 of 20 with the dispersion around each rank-k mean)
        kd = min(top + 1 if dispersion_rank is None else int(dispersion_rank), min(n, m) - 1)
        phi_fixed = dispersion(rank_mean(kd), kd)
    for k in range(1, top + 1):
        mu = rank_mean(k)
        phi = dispersion(mu, k) if dispersion_rank == 0 else phi_fixed
        null = np.array([_kth_centred_eig(_scaled(_nb_draw(rng, mu, phi)), k) for _ in range(permutations)])
        ev.append(float(s[k - 1] ** 2))
        thr.append(float(np.quantile(null, quantile)))
        spread.append(float(null.std(ddof=1)) if permutations > 1 else 0.0)
        if ev[-1] <= thr[-1]:
            stopped = True
            break
    above = len(ev) - 1 if stopped else len(ev)
    return {"eigen": np.array(ev), "null": np.array(thr), "null_sd": np.array(spread), "above": above,
            "k": above + 1, "stopped": stopped}


def _kl_dev(X, Y) -> float:
    """Generalized KL (Poisson deviance / 2) of ``X`` from the prediction ``Y``."""
    Y = np.maximum(Y, 1e-12)
    pos = X > 0
    return float((X[pos] * np.log(X[pos] / Y[pos])).sum() - X.sum() + Y.sum())


def bicv_kl_curve(counts, ks, random_state, folds: int = 3, max_spots: int = 1000, max_iter: int = 400,
                  tol: float = 1e-5) -> dict:
    """Bi-cross-validation as :func:`bicv_curve` with the KL loss on normalize_total counts (no
    log, no gene scaling): KL NMF (MU) on the training block, ``H_J`` and ``W_I`` by KL refits,
    the held-out block's KL deviance relative to that of its rank-1 (independence) fit."""
    rng = np.random.default_rng(random_state)
    C = _dense_subsample(counts, max_spots, rng).astype(np.float64)
    tot = C.sum(1, keepdims=True)
    C = C[tot[:, 0] > 0]
    tot = tot[tot[:, 0] > 0]
    D = (C * (np.median(tot) / tot)).astype(np.float32)
    return _bicv(D, ks, rng, folds, "kullback-leibler", tol, max_iter)
