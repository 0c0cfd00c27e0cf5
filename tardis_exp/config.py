"""The run's config checked before anything heavy loads: the CLI calls :func:`validate` before
it imports the pipeline (scanpy, scikit-learn, numba), so a bad key or a missing file is
answered at once; :func:`tardis_exp.pipeline.run` calls it again for a config from Python.

Only light modules here (params, sources, tracking's checks): ``tests/test_imports.py``.
"""

from __future__ import annotations

from typing import Any, Mapping

from .errors import ConfigError
from .params import check as check_params
from .sources import check_data, peek_shape
from .stages import ORDER
from .tracking import check_config as check_tracking, redact


def validate(cfg: Mapping[str, Any]) -> None:
    """Check every stage's parameters before any data is read or computed.

    Order: stage parameters first, then the data config (whose path check touches the
    file system but reads nothing). Only ``factorize.n_components`` against the data's
    shape waits until after preprocessing (``factorize.check_params(shape=...)``).
    """
    for key in ("data", *ORDER, "tracking"):
        if not isinstance(cfg.get(key), Mapping):
            raise ConfigError(f"config section {key!r} is missing")
    # Hydra refuses unknown keys, but `+consensus.foo=1` or a plain dict gets past it:
    # params.check refuses them here rather than as a TypeError after the factorization
    if "n_components" not in cfg["factorize"]:
        raise ConfigError("factorize.n_components is missing")
    for section in ORDER:
        check_params(section, cfg[section])
    check_tracking(cfg["tracking"])
    check_params("cache", cfg.get("cache"), known_only=True)
    check_data(cfg["data"])
    result_mode(cfg)
    check_memory_early(cfg)
    top = cfg["preprocess"].get("n_top_genes")
    if top is not None:  # preprocessing keeps at most n_top_genes: the score's need is known now
        n_cluster = check_params("score", cfg["score"])["n_cluster_genes"]
        check_genes(int(top), int(n_cluster), f"preprocess.n_top_genes={top} keeps at most {top} genes")


def check_genes(n_genes: int, n_cluster_genes: int, where: str) -> None:
    """Refuse a gene count that leaves the score no control genes, before the factorization.

    Each program is scored against control genes drawn from the genes *outside* its
    ``n_cluster_genes`` top genes (``sc.tl.score_genes``); with ``n_genes <= n_cluster_genes``
    the top genes are every gene and no control is left, whatever the data. ``where`` says
    what bounds ``n_genes``, as the start of the message (``preprocess.n_top_genes=5 keeps at
    most 5 genes``, ``the preprocessed data has 5 genes``).
    """
    if n_genes > n_cluster_genes:
        return
    raise ConfigError(
        f"{where}, and score.n_cluster_genes={n_cluster_genes} takes "
        f"{'that many' if n_genes == n_cluster_genes else 'more'} top genes per program: no gene is left to draw "
        f"the score's control genes from (score.ctrl_size); set preprocess.n_top_genes well above "
        f"{n_cluster_genes} (e.g. {max(4 * n_cluster_genes, 200)}; the default is 2000) or score.n_cluster_genes "
        f"to at most {max(1, n_genes // 2)}")


def check_memory_early(cfg: Mapping[str, Any]) -> None:
    """``factorize.max_memory_gb`` against the input's shape from the file's metadata, before
    anything is loaded or preprocessed. Preprocessing only removes spots and genes, so the
    model at the input's spots and ``min(preprocess.n_top_genes, genes)`` genes bounds the
    factorization's; a setting refused here cannot fit later. (The check is made again on
    the preprocessed shape before the fit.)"""
    limit = cfg["factorize"].get("max_memory_gb")
    if limit is None:
        return
    from .chunked import check_memory  # numpy and scipy only

    shape = peek_shape(cfg["data"])
    if shape is None:
        return
    n, m, nnz = shape
    top = cfg["preprocess"].get("n_top_genes")
    genes = min(m, int(top)) if top else m
    f = check_params("factorize", cfg["factorize"])  # completed with the declared defaults
    k, r = int(f["n_components"]), int(f["n_replicates"])
    chunked = cfg["data"].get("backend") == "dask"
    if chunked and "://" in str(((cfg["factorize"].get("dask") or {}).get("scheduler")) or ""):
        return  # per worker on a cluster: checked by the factorize stage once connected (workers known)
    path = cfg["data"].get("path")
    src = f"data.path={redact(str(path))}" if path not in (None, "", "???") else f"data={cfg['data'].get('source')}"
    check_memory(limit, n_spots=n, n_genes=genes, n_columns=k * r, solver=f["solver"],
                 chunked=chunked, nnz=nnz, where=f"{src}, before loading")


def complete(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with every stage, data, tracking and cache group completed with its declared defaults
    (``params.check``): later code reads ``cfg[group][key]`` and restates no default."""
    out = dict(cfg)
    # data: the keys every source has (data.sample_key), beside the source's own
    out["data"] = {**cfg["data"], **check_params("data", cfg["data"], known_only=True)}
    for group in (*ORDER, "tracking"):
        out[group] = {**cfg[group], **check_params(group, cfg[group])}
    out["cache"] = {**(cfg.get("cache") or {}), **check_params("cache", cfg.get("cache"), known_only=True)}
    return out


SAVE_RESULT = {True: "full", False: "none", "full": "full", "results": "results", "none": "none"}


def result_mode(cfg: Mapping[str, Any]) -> str:
    """``save_result``: ``full`` (the AnnData with X and layers), ``results`` (without them:
    what the stages computed, a fraction of the size and write time; sweep trials), ``none``."""
    value = cfg.get("save_result", True)
    if not isinstance(value, (bool, str)) or value not in SAVE_RESULT:
        raise ConfigError(f"save_result={value!r} is not one of true/full, results, false/none")
    return SAVE_RESULT[value]


