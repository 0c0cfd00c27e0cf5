"""Scoring a finished run against a draw's truth: Wilson intervals, usage recovery, and the
``batch`` family's matching of found to planted programs (:func:`evaluate_batch`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

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
