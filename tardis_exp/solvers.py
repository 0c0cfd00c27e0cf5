"""The NMF solvers ``factorize.solver=<name>`` can run: one registry entry per solver.

Each :class:`Solver` says which losses it minimizes, whether it runs in the batched loop
(:func:`tardis_exp.nmf.fit_batch`, all replicates advanced together) and over Dask chunks,
and how many spots x K copies of the factors it holds (the memory model). The allowed
``factorize.solver`` values, the solver/loss check (one rule, said once), the memory model
and the usage refit's choice are derived from :data:`SOLVERS`. Light to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Solver:
    """One NMF solver.

    Parameters
    ----------
    name
        The value of ``factorize.solver``.
    doc
        One line for the documentation and ``factorize.solver``'s help.
    losses
        The ``beta_loss`` values it minimizes.
    batched
        Runs in :func:`tardis_exp.nmf.fit_batch` (every replicate in one pass over X),
        which is also what reads a chunked (Dask) X; otherwise one replicate at a time
        with X in memory.
    spots_copies
        Spots x K float32 arrays held during the fit (the memory model,
        :func:`tardis_exp.chunked.estimate_factorize_gb`).
    fit
        A solver outside the batched loop: ``fit(X, k, seeds, max_iter, tol) -> [NMFResult]``,
        one result per seed (the batched solvers' kernels live in :mod:`tardis_exp.nmf`).
    """

    name: str
    doc: str
    losses: tuple[str, ...]
    batched: bool = True
    spots_copies: int = 2
    fit: Callable[..., list] | None = None


SOLVERS: dict[str, Solver] = {}


def register(solver: Solver) -> Solver:
    """Add ``solver`` to :data:`SOLVERS` (its name must be new; one outside the batched loop
    brings its ``fit``)."""
    if solver.batched == (solver.fit is not None):
        raise ValueError(f"solver {solver.name!r}: a batched solver runs in fit_batch, any other needs fit=")
    if solver.name in SOLVERS:
        raise ValueError(f"solver {solver.name!r} is registered twice")
    SOLVERS[solver.name] = solver
    return solver


def check_solver(name: str, beta_loss: str, *, batched: bool = False, key: str = "solver") -> Solver:
    """The registered solver ``name``, refusing a loss it does not minimize (``ValueError``,
    naming ``key``). ``batched=True``: only solvers of the batched loop."""
    allowed = [s for s in SOLVERS.values() if s.batched or not batched]
    if name not in {s.name for s in allowed}:
        raise ValueError(f"unknown {key} {name!r}; use one of {tuple(s.name for s in allowed)}")
    s = SOLVERS[name]
    if beta_loss not in s.losses:
        able = [t.name for t in allowed if beta_loss in t.losses]
        loss = f"{key.rpartition('.')[0]}.beta_loss".lstrip(".")  # factorize.solver -> factorize.beta_loss
        raise ValueError(f"{key}={name} supports only {loss}={' or '.join(s.losses)}; "
                         f"for {loss}={beta_loss} use {key}={' or '.join(able)}")
    return s


def refit_solver(beta_loss: str) -> str:
    """The solver of the usage refit on fixed spectra: the first batched solver registered for
    the loss (HALS for the Frobenius loss: exact coordinate minimization)."""
    for s in SOLVERS.values():
        if s.batched and beta_loss in s.losses:
            return s.name
    raise ValueError(f"no batched solver minimizes beta_loss={beta_loss!r}")


# registration order is preference order (refit_solver)
register(Solver("hals", "batched accelerated HALS (Gillis & Glineur 2012; frobenius only)", ("frobenius",),
                spots_copies=2))
register(Solver("mu", "batched multiplicative updates (Lee & Seung; the seed's solver)",
                ("frobenius", "kullback-leibler"), spots_copies=3))
def _fit_cd(X, k, seeds, max_iter, tol):
    # resolved by name, not by an import statement: params.py imports this registry, and the
    # stage cache keys each stage on the modules its code imports (tardis_exp.store.module_closure);
    # an import of factorize here would key preprocessing on the factorize stage's code
    import importlib

    return importlib.import_module(f"{__package__}.factorize")._fit_cd(X, k, seeds, max_iter, tol)


register(Solver("cd", "scikit-learn's coordinate descent, one replicate at a time, X in memory", ("frobenius",),
                batched=False, spots_copies=2, fit=_fit_cd))
