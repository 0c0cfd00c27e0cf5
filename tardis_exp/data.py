"""Loading the input AnnData named by the ``data`` config group."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .errors import ConfigError, InputError

SOURCES = ("synthetic", "h5ad", "tenx_h5", "tenx_mtx", "visium", "pbmc68k")


def _need_path(cfg, must_be_dir=False) -> Path:
    path = cfg.get("path")
    if path in (None, "", "???"):
        raise ConfigError(f"data.path is required for data={cfg['source']}; e.g. data.path=/path/to/input")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise InputError(f"data.path: {p} does not exist")
    if must_be_dir and not p.is_dir():
        raise InputError(f"data.path: {p} must be a folder for data={cfg['source']}")
    if not must_be_dir and p.is_dir():
        raise InputError(f"data.path: {p} is a folder; data={cfg['source']} needs a file")
    return p


def load_data(cfg) -> ad.AnnData:
    """Read the data set described by a ``data`` config (a mapping with ``source``)."""
    source = cfg.get("source")
    if source not in SOURCES:
        raise ConfigError(f"data.source={source!r} is unknown; choose one of {SOURCES}")
    if source == "synthetic":
        from .synthetic import make_synthetic

        keys = ("n_spots", "n_genes", "n_programs", "n_markers", "seed")
        return make_synthetic(**{k: cfg[k] for k in keys if cfg.get(k) is not None})

    import scanpy as sc

    if source == "pbmc68k":
        a = sc.datasets.pbmc68k_reduced()
        # its X is scaled; .raw holds non-negative log-normalized values of 765 genes
        out = ad.AnnData(X=sp.csr_matrix(a.raw.X, dtype=np.float32), obs=a.obs.copy(), var=a.raw.var.copy())
        out.obsm.update({k: v for k, v in a.obsm.items()})
        return out
    p = _need_path(cfg, must_be_dir=source in ("tenx_mtx", "visium"))
    try:
        if source == "h5ad":
            return ad.read_h5ad(p)
        if source == "tenx_h5":
            return sc.read_10x_h5(p, genome=cfg.get("genome"))
        if source == "tenx_mtx":
            return sc.read_10x_mtx(p, var_names=cfg.get("var_names", "gene_symbols"))
        return sc.read_visium(p, count_file=cfg.get("count_file", "filtered_feature_bc_matrix.h5"))
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"data.path: cannot read {p} as {source}: {type(e).__name__}: {e}") from e


def digest(adata: ad.AnnData) -> str:
    """Content digest of X, the spot and the gene names (16 hex digits)."""
    h = hashlib.sha256()
    h.update(repr(adata.shape).encode())
    X = adata.X
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        for arr in (X.indptr, X.indices, X.data):
            h.update(np.ascontiguousarray(arr).tobytes())
    else:
        h.update(np.ascontiguousarray(X).tobytes())
    h.update("\n".join(map(str, adata.obs_names)).encode())
    h.update("\n".join(map(str, adata.var_names)).encode())
    return h.hexdigest()[:16]
