"""Background programs: meta-programs used nearly uniformly by every spot (method=components).

A converged solver such as HALS gives the shared background its own component in every
restart, and the recurrence rule would count it: its components leave the clustering, K is
chosen again over the others, and the background spectrum stays in the usage refit.
"""

from __future__ import annotations

import logging

import numpy as np

from ..nmf import prepare_matrix, refit_usage
from ..params import ConsensusParams as _P

log = logging.getLogger(__package__)

_BACKGROUND_SPOTS = 10_000


def background_programs(usages, ratio: float = _P.background_ratio):
    """Programs used nearly uniformly across spots: the shared background profile.

    A program that tells spots apart is used strongly by some spots and little by others;
    the background (expression every spot shares, which a converged solver such as HALS
    puts into a component of its own) is used by every spot at a similar level. A program
    is background when the coefficient of variation of its usage across spots is below
    ``ratio`` times the median over the programs. Measured on 20 validation sets
    (docs/validation.md, "The shared background"): the HALS background programs sit at 0.09-0.22
    of the median, every other program of either solver at 0.49 or above. Needs 3
    programs or more, and at least 2 that are not background; returns
    ``(mask, cv / median)``.
    """
    U = np.asarray(usages, dtype=np.float64)
    k = U.shape[1]
    m = U.mean(0)
    cv = np.where(m > 0, U.std(0) / np.where(m > 0, m, 1), np.inf)
    med = float(np.median(cv))
    rel = cv / med if np.isfinite(med) and med > 0 else np.full(k, np.inf)
    bg = rel < ratio
    if k < 3 or ratio <= 0 or (~bg).sum() < 2:
        bg[:] = False
    return bg, rel


def _find_background(adata, res, ratio, rng, max_iter, max_spots: int = _BACKGROUND_SPOTS):
    """Background meta-programs at the chosen K, from usages refit on a spot subsample.

    ``None`` when switched off or fewer than 3 programs; else ``items`` (the background's
    pooled components, a mask: empty when none is background), ``spectra``, ``cv_ratio``.
    """
    spectra = res["spectra"]
    if ratio <= 0 or len(spectra) < 3:
        return None
    X = prepare_matrix(adata.X)
    n = X.shape[0]
    rows = np.sort(rng.choice(n, size=min(max_spots, n), replace=False))
    U, _ = refit_usage(X[rows], spectra, max_iter=max_iter, progress=False)
    bg, rel = background_programs(U, ratio)
    which = np.flatnonzero(bg)
    if bg.any():
        log.info("consensus: program(s) %s of K=%d are the shared background (usage CV %s of the median); K is "
                 "chosen again without them", which.tolist(), len(spectra), np.round(rel[which], 2).tolist())
    return {"items": np.isin(res["item_labels"], which), "spectra": spectra[which], "cv_ratio": rel}
