"""Stage 2, factorize: X (spots x HVGs) ~ W H, many restarts in one batched pass.

Writes

``obsm['X_nmf']``
    W of the best replicate (lowest error), spots x ``n_components`` (the seed's key).
``uns['X_nmf_components']``
    H of that replicate, ``n_components`` x genes (the seed's key).
``uns['nmf']``
    every replicate: ``components`` (replicates x k x genes), ``errors``, ``n_iter``,
    ``converged``, ``seeds`` and the parameters.
``obsm['X_nmf_replicates']``
    every replicate's W side by side (spots x replicates*k), when ``store_usages``.
"""

from __future__ import annotations

import logging
import time

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .errors import ConfigError, InputError
from .outputs import Metric, Output, StageSpec
from .params import LOSSES, SOLVERS  # noqa: F401 -- re-exported
from .solvers import SOLVERS as SOLVER_SPECS
from . import keys
from .params import FactorizeParams as _P
from .params import check, defaults
from .nmf import NMFResult, derive_seeds, fit_batch, prepare_matrix

log = logging.getLogger(__name__)

_DEFAULTS = defaults(_P)  # for fields whose default is a mapping (no class attribute)


def _components_fit(adata, out) -> str | None:
    comps = np.asarray(out.get("uns", {}).get("nmf", {}).get("components"))
    if comps.ndim != 3 or comps.shape[2] != adata.n_vars:
        return f"components of shape {comps.shape}, the data has {adata.n_vars} genes"
    return None


SPEC = StageSpec(
    "factorize",
    writes=(
        Output("obsm", "X_nmf", "W of the best replicate (lowest error), spots x n_components"),
        Output("uns", "X_nmf_components", "H of the best replicate, n_components x genes"),
        Output("uns", "nmf", "every replicate: components, errors, n_iter, converged, seeds, params"),
        Output("obsm", "X_nmf_replicates", "every replicate's W side by side", when="store_usages=true"),
    ),
    metrics=(
        Metric("reconstruction_error", "reconstruction error of the best NMF replicate",
               lambda a: float(np.min(a.uns["nmf"]["errors"])), headline=True),
        Metric("fit_seconds", "seconds of the NMF fit (all replicates)", lambda a: a.uns["nmf"]["fit_seconds"]),
        Metric("reconstruction_error_by_replicate", "reconstruction error of each NMF replicate",
               lambda a: a.uns["nmf"]["errors"], step="replicate"),
        Metric("n_iter_by_replicate", "iterations of each NMF replicate", lambda a: a.uns["nmf"]["n_iter"],
               step="replicate"),
    ),
    fits=_components_fit,
)


def check_params(*, shape=None, **params) -> dict:
    """Validate factorize parameters (:class:`~tardis_exp.params.FactorizeParams`; missing
    ones take their defaults, except ``n_components``); ``shape`` (spots, genes) when the
    data is known."""
    if "n_components" not in params:
        raise ConfigError("factorize.n_components is missing")
    v = check("factorize", params, known_only=True)
    n_components = v["n_components"]
    if shape is not None and n_components >= min(shape):
        raise ConfigError(
            f"factorize.n_components={n_components} must be smaller than min(spots, genes)={min(shape)} "
            f"of the preprocessed data ({shape[0]} spots x {shape[1]} genes)"
        )
    return v


def _fit_cd(X, k, seeds, max_iter, tol):
    from sklearn.decomposition import NMF

    out = []
    for s in seeds:
        m = NMF(n_components=k, solver="cd", init="random", random_state=s, max_iter=max_iter, tol=tol)
        W = m.fit_transform(X).astype(np.float32)
        out.append(NMFResult(W=W, H=m.components_.astype(np.float32), error=float(m.reconstruction_err_),
                             n_iter=int(m.n_iter_), converged=m.n_iter_ < max_iter, rank=k, seed=s))
    return out


def factorize(
    adata: ad.AnnData,
    *,
    n_components: int = _P.n_components,
    n_replicates: int = _P.n_replicates,
    random_state: int | None = _P.random_state,
    max_iter: int = _P.max_iter,
    tol: float = _P.tol,
    solver: str = _P.solver,
    beta_loss: str = _P.beta_loss,
    check_every: int = _P.check_every,
    stop_rule: str = _P.stop_rule,
    store_usages: bool = _P.store_usages,
    max_memory_gb: float | None = _P.max_memory_gb,
    dask: dict | None = _DEFAULTS["dask"],  # read, never modified
    key_added: str = keys.NMF,
    progress: bool | None = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Factorize ``adata.X`` with ``n_replicates`` independent NMF restarts.

    Parameters
    ----------
    adata
        Preprocessed spots x genes (non-negative ``X``, dense or sparse).
    n_components
        Rank k of every factorization.
    n_replicates
        Independent restarts; replicate ``i`` gets the ``i``-th seed derived from ``random_state``.
    random_state
        Root seed (``None``: fresh entropy, not reproducible).
    max_iter, tol, check_every
        Stopping rule of each factorization: stop when the loss improved by less than
        ``tol`` relative to the current loss over the last ``check_every`` iterations
        (see :mod:`tardis_exp.nmf`); a replicate that hits ``max_iter`` is recorded with
        ``converged=False`` and raises a ``ConvergenceWarning``. ``cd`` keeps
        scikit-learn's own rule.
    stop_rule
        ``'change'`` (the rule above) or ``'extrapolated'`` (the last window's
        improvement extrapolated to the converged loss must be below ``tol``; never
        earlier than ``'change'``): see :func:`tardis_exp.nmf.fit_batch` and docs/solver.md.
    solver
        ``'mu'``: batched Lee-Seung multiplicative updates (the seed's formula; the
        default, chosen by measurement, see docs/solver.md); ``'hals'``: batched
        accelerated HALS (Gillis & Glineur; all replicates in one pass; converges in
        fewer passes, Frobenius only); ``'cd'``: scikit-learn's coordinate descent, one
        replicate at a time.
    beta_loss
        ``'frobenius'`` or ``'kullback-leibler'`` (``mu`` only).
    store_usages
        Keep every replicate's W in ``obsm['X_nmf_replicates']``.
    max_memory_gb
        Refuse, before any fit, when the memory model of the factorization
        (:func:`tardis_exp.chunked.estimate_factorize_gb`) exceeds this (``None``: no limit).
    dask
        ``{'scheduler': ...}``: the Dask scheduler the chunked products run on when
        ``adata.X`` is a Dask array (``data.backend=dask``): ``None`` (the active one),
        ``'threads'``, ``'processes'``, ``'synchronous'`` or a ``dask.distributed``
        scheduler address ``'tcp://host:port'``; see :func:`tardis_exp.chunked.dask_scheduler`.
    key_added
        Where the result goes: ``uns[key_added]``, ``obsm['X_<key_added>']``,
        ``uns['X_<key_added>_components']``, ``obsm['X_<key_added>_replicates']``
        (:mod:`tardis_exp.keys`; the default gives the seed's ``X_nmf``).
    copy
        Return a modified copy instead of writing into ``adata``.
    """
    check_params(n_components=n_components, n_replicates=n_replicates, random_state=random_state, max_iter=max_iter,
                 tol=tol, solver=solver, beta_loss=beta_loss, check_every=check_every, stop_rule=stop_rule,
                 store_usages=store_usages, max_memory_gb=max_memory_gb, dask=dask, shape=adata.shape)
    from .chunked import check_memory, dask_scheduler, is_dask

    k, R = int(n_components), int(n_replicates)
    chunked = is_dask(adata.X)
    if chunked and not SOLVER_SPECS[solver].batched:
        able = " or ".join(s.name for s in SOLVER_SPECS.values() if s.batched)
        raise ConfigError(f"factorize.solver={solver} needs X in memory; use solver={able} with data.backend=dask")
    check_memory(max_memory_gb, n_spots=adata.n_obs, n_genes=adata.n_vars, n_columns=k * R, solver=solver,
                 chunked=chunked, nnz=adata.X.nnz if sp.issparse(adata.X) else None)
    out = keys.nmf_keys(key_added)
    adata = adata.copy() if copy else adata
    with dask_scheduler((dask or {}).get("scheduler")):
        X = prepare_matrix(adata.X)
        if getattr(X, "is_chunked", False):  # from the pass over the chunks made by prepare_matrix
            bad = X.nnz and (not X.finite_ or X.min_ < 0)
        else:
            v = X.data if sp.issparse(X) else X
            bad = v.size and (not np.isfinite(v).all() or v.min() < 0)
        if bad:
            raise InputError("factorize needs finite, non-negative adata.X; run the preprocess stage first")

        seeds = derive_seeds(random_state, R)
        t0 = time.perf_counter()
        if SOLVER_SPECS[solver].batched:
            # on Dask the replicates' W stay where X's chunks are (BlockW): obsm gets Dask arrays
            # over those blocks, computed one chunk at a time by whatever reads them
            results = fit_batch(X, [k] * R, seeds, solver=solver, beta_loss=beta_loss, max_iter=max_iter, tol=tol,
                                check_every=check_every, stop_rule=stop_rule, progress=progress, desc="factorize",
                                gather_W=not chunked)
        else:
            results = SOLVER_SPECS[solver].fit(X, k, seeds, max_iter, tol)
        elapsed = time.perf_counter() - t0

    errors = np.array([r.error for r in results])
    best = int(np.argmin(errors))
    Ws = [r.W.to_dask() if hasattr(r.W, "to_dask") else r.W for r in results]
    adata.obsm[out.usage] = Ws[best]
    adata.uns[out.components] = results[best].H
    if store_usages:
        if chunked:
            import dask.array as da

            adata.obsm[out.replicates] = da.concatenate(Ws, axis=1)  # lazily: no copy of the blocks
        else:
            adata.obsm[out.replicates] = np.concatenate(Ws, axis=1)
    adata.uns[out.uns] = {
        "components": np.stack([r.H for r in results]),
        "errors": errors,
        "n_iter": np.array([r.n_iter for r in results]),
        "converged": np.array([r.converged for r in results]),
        "seeds": np.array(seeds, dtype=np.int64),
        "best_replicate": best,
        "params": {"n_components": k, "n_replicates": R, "solver": solver, "beta_loss": beta_loss,
                   "max_iter": max_iter, "tol": tol, "check_every": check_every,
                   "stop_rule": stop_rule,
                   "random_state": -1 if random_state is None else int(random_state)},
        "fit_seconds": elapsed,
    }
    log.info("factorize: %d x rank %d in %.1fs, errors %.4g..%.4g", R, k, elapsed, errors.min(), errors.max())
    return adata if copy else None
