"""Content-keyed stage cache: reuse preprocess, factorize and consensus results across runs and trials.

A sweep repeats the same preprocessing in every trial and, with integer search spaces,
often the same factorization rank. Both stages are deterministic functions of the input
data, their own config and the config of every upstream stage, so their outputs can be
stored under a key made of exactly those things and reused.

Key (sha256) of a stage = the stage name, the input's content digest
(:func:`tardis_exp.data.digest` plus the hashes of the parts of the AnnData that the
stages read besides ``X``: the counts layer or ``.raw`` named by ``preprocess.layer`` /
``preprocess.use_raw``, ``obs``, ``obsm``, ``varm``), the resolved config of the stage and
of every stage upstream (``preprocess`` for ``preprocess``; ``preprocess`` + ``factorize``
for ``factorize``; all three for ``consensus``), the content of
``preprocess.exclude_genes_file``, the package version, the versions of the libraries the
stage calls, and the code identity of the stage: the source of its module, of the
modules of the stages upstream and of every tardis_exp module they import
(:func:`tardis_exp.store.code_digest` follows the imports, so an edited, moved or renamed
helper never serves stale results). ``score`` (cheap, and it reads the ground truth) is
not cached.

What a hit restores is what the stage's module declares it writes (``SPEC.writes``,
:mod:`tardis_exp.outputs`); the storage itself -- keys, atomic writes, checksums, the LRU
bound -- is the generic :class:`tardis_exp.store.Store`.

The input itself is not copied. What the cache remembers about it is its digests and
shape, under a key of its *source*: the data config plus, for files, the path, size and
modification time of every file read (for generated data, the generator's code and the
library versions). When that memo and the preprocess entry are both present, the raw data is not
read at all -- a sweep reads its input once, not once per trial. A file rewritten in place
with the same size and modification time (to the nanosecond) would defeat the memo; any
ordinary write changes the time.

Layout under ``cache.dir``::

    preprocess/<key>/data.h5ad   the preprocessed AnnData (anndata's own format)
    preprocess/<key>/data.zarr   the same for a Dask input (data.backend=dask): a zarr store
                                 written and read one chunk at a time (store.write_zarr)
    preprocess/<key>/meta.json   sha256 and size of data.h5ad, key inputs, created time
    factorize/<key>/data.npz     the factorize outputs (np.savez; read with allow_pickle=False)
    factorize/<key>/meta.json
    consensus/<key>/data.npz     the consensus outputs (same format)
    consensus/<key>/meta.json
    inputs/<key>.json            digests and shape of an input source (a few hundred bytes)

Safety: only h5ad and npz are written, never pickle; npz entries are read with
``allow_pickle=False`` and object arrays are refused on write. An entry is written in a
temporary folder and renamed into place in one ``os.rename``, so a killed process leaves no
half-written entry, only a ``.tmp-*`` folder that the next eviction removes. Every read
checks the sha256 recorded in ``meta.json``; an entry that fails the check or does not load
is logged as a warning, deleted and recomputed. The total size stays under
``cache.max_size_gb``: after each write the least recently used entries (last hit or write,
recorded in the mtime of ``meta.json``, since file access times are often not kept) are
removed; input memos count towards the bound and are evicted the same way (by their own
mtime, refreshed when read).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import __version__
from .outputs import Unfit, pack, unpack
from .params import CacheParams as _C
from .stages import CACHED, ORDER
from .store import CacheCorrupt, Store, _glob, code_digest, make_key
from .store import CacheUnreadable, write_h5ad  # noqa: F401 -- re-exported (pipeline, tests)
from .store import file_digest as _file_digest


log = logging.getLogger(__name__)

STAGES = CACHED
# a stage's key covers its own settings and every stage's before it
UPSTREAM = {name: ORDER[: ORDER.index(name) + 1] for name in CACHED}
_LIBS = {"preprocess": ("anndata", "scanpy", "numpy"), "factorize": ("anndata", "scanpy", "numpy", "scipy", "sklearn"),
         "consensus": ("anndata", "scanpy", "numpy", "scipy", "sklearn")}


def check_config(cfg: Mapping[str, Any] | None) -> None:
    """Validate a ``cache`` config before anything is created (no run, no folder)."""
    from .params import check

    check("cache", cfg, known_only=True)  # tardis_exp.params.CacheParams



# ------------------------------------------------------------------------ keys


def _hash_matrix(h, M) -> None:
    if M is None:
        h.update(b"none")
    elif sp.issparse(M):
        M = sp.csr_matrix(M)
        h.update(repr((M.shape, str(M.dtype))).encode())
        for arr in (M.indptr, M.indices, M.data):
            h.update(np.ascontiguousarray(arr).tobytes())
    else:
        M = np.asarray(M)
        h.update(repr((M.shape, str(M.dtype))).encode())
        h.update(np.ascontiguousarray(M).tobytes())


def _hash_frame(h, df: pd.DataFrame) -> None:
    h.update(repr(list(map(str, df.columns))).encode())
    h.update(repr([str(t) for t in df.dtypes]).encode())
    if df.shape[1]:
        h.update(pd.util.hash_pandas_object(df, index=True).to_numpy().tobytes())


def input_digest(adata: ad.AnnData, data_digest: str, pre_cfg: Mapping[str, Any]) -> str:
    """Digest of everything in ``adata`` that preprocess (and so the stages after it) reads.

    :func:`tardis_exp.data.digest` covers ``X`` and the names; preprocess may take its
    counts from a layer or ``.raw`` and carries ``obs``, ``obsm`` and ``varm`` over.
    """
    h = hashlib.sha256(data_digest.encode())
    if pre_cfg.get("use_raw") and adata.raw is not None:
        h.update(b"raw")
        _hash_matrix(h, adata.raw.X)
        h.update("\n".join(map(str, adata.raw.var_names)).encode())
    layer = pre_cfg.get("layer")
    if layer is not None and layer in adata.layers:
        h.update(f"layer:{layer}".encode())
        _hash_matrix(h, adata.layers[layer])
    _hash_frame(h, adata.obs)
    _hash_frame(h, adata.var)
    for group, mapping in (("obsm", adata.obsm), ("varm", adata.varm)):
        for k in sorted(mapping.keys()):
            h.update(f"{group}:{k}".encode())
            v = mapping[k]
            if isinstance(v, pd.DataFrame):
                _hash_frame(h, v)
            else:
                _hash_matrix(h, v)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _code_digest(stage: str) -> str:
    # the modules of the stage and of every stage upstream, with every tardis_exp module
    # they import (store.code_digest follows the imports: no list of file names). Once
    # per process: the code that runs is the code imported at start, not what an editor
    # saved since.
    return code_digest(*(f"{__package__}.{s}" for s in UPSTREAM[stage]))


@functools.lru_cache(maxsize=None)
def _lib_versions(stage: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in _LIBS[stage]:
        try:
            out[name] = version("scikit-learn" if name == "sklearn" else name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out



def key_inputs(stage: str, input_dig: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-able description of everything ``stage``'s result depends on."""
    if stage not in STAGES:
        raise ValueError(f"no cache for stage {stage!r}; cached stages are {STAGES}")
    configs = {s: dict(cfg[s]) for s in UPSTREAM[stage]}
    extra = {}
    sample_key = (cfg.get("data") or {}).get("sample_key")
    if sample_key is not None:  # the HVG selection is per sample (absent: the keys of one-sample runs unchanged)
        extra["data.sample_key"] = sample_key
    gene_file = configs["preprocess"].get("exclude_genes_file")
    if gene_file and Path(str(gene_file)).is_file():
        # the list's content decides the genes, not its path
        extra["exclude_genes_file.sha256"] = _file_digest(Path(str(gene_file)))
    return {"stage": stage, "input": input_dig, "configs": configs, "extra": extra,
            "tardis_exp": __version__, "code": _code_digest(stage), "libs": _lib_versions(stage),
            "python": f"{sys.version_info.major}.{sys.version_info.minor}"}



# ------------------------------------------------------------------------ the cache


class Input:
    """The run's input data with its digests; read from its source only when a stage needs it.

    Attributes
    ----------
    digest
        :func:`tardis_exp.data.digest` of the data.
    input_digest
        :func:`input_digest` for the run's preprocess config (``None`` until computed).
    shape
        ``(n_obs, n_vars)``.
    from_memo
        ``True`` when the digests came from the cache and the data has not been read.
    samples
        With ``data.sample_key``: one record per sample (:func:`tardis_exp.data.sample_digests`).
    """

    def __init__(self, digest: str, shape: tuple[int, int], adata: ad.AnnData | None = None,
                 load: Callable[[], ad.AnnData] | None = None, input_digest: str | None = None,
                 samples: list | None = None):
        self.digest = digest
        self.samples = list(samples or [])
        self.shape = tuple(int(x) for x in shape)
        self.input_digest = input_digest
        self._adata = adata
        self._load = load
        self.from_memo = adata is None

    @property
    def adata(self) -> ad.AnnData:
        """The data (read now if it has not been)."""
        if self._adata is None:
            from .data import digest

            a = self._load()
            if digest(a) != self.digest:  # the source changed under an unchanged size and time
                raise CacheCorrupt("the input's content no longer matches its cached digest")
            self._adata = a
        return self._adata


def _stat_files(path: Path) -> list:
    if path.is_file():
        st = path.stat()
        return [[str(path), st.st_size, st.st_mtime_ns]]
    out = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        out.append([str(f.relative_to(path)), st.st_size, st.st_mtime_ns])
    return out


def source_key(data_cfg: Mapping[str, Any], pre_cfg: Mapping[str, Any]) -> str | None:
    """Key of an input *source* (not its content); ``None`` when it cannot be keyed."""
    cfg = {k: v for k, v in dict(data_cfg).items() if k != "name"}
    parts: dict[str, Any] = {"data": cfg, "tardis_exp": __version__, "code": _source_code_digest(),
                             "libs": _lib_versions("preprocess"),
                             # what input_digest reads besides X depends on these
                             "pre": {k: pre_cfg.get(k) for k in ("use_raw", "layer")}}
    from .sources import SOURCES

    source = SOURCES.get(cfg.get("source"))
    if source is None:
        return None
    if source.path == "list":  # several inputs (data=samples): every one of them
        try:
            ps = [Path(str(x)).expanduser().resolve() for x in cfg.get("paths") or ()]
            parts["files"] = [[str(p), _stat_files(p)] for p in ps]
        except OSError:
            return None
    elif source.path is not None:  # a file or folder: keyed by its path, sizes and times
        path = cfg.get("path")
        if not path:
            return None
        try:
            p = Path(str(path)).expanduser().resolve()
            parts["files"] = [str(p), _stat_files(p)]
        except OSError:
            return None
    return make_key(parts)


@functools.lru_cache(maxsize=None)
def _source_code_digest() -> str:
    return code_digest(f"{__package__}.data", f"{__package__}.sources", f"{__package__}.synthetic",
                       f"{__package__}.datasets")


class StageCache(Store):
    """Content-keyed, size-bounded store of stage results under one folder
    (:class:`~tardis_exp.store.Store`, with the stages' keys and outputs on top).

    Parameters
    ----------
    directory
        Root folder (``cache.dir``); created on the first write.
    max_size_gb
        Bound on the total size of all entries; least recently used entries go first.
    enabled
        ``False`` makes every call compute and store nothing.
    """

    namespaces = STAGES

    def __init__(self, directory: str | os.PathLike | None, max_size_gb: float = _C.max_size_gb,
                 enabled: bool = True):
        check_config({"enabled": enabled, "dir": directory, "max_size_gb": max_size_gb})
        super().__init__(directory, max_size_gb, enabled)
        self.hits = 0
        self.misses = 0
        self.events: list[dict[str, Any]] = []
        self._input: str | None = None  # input digest of the current run, set by preprocess()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "StageCache":
        from .params import check

        c = check("cache", cfg, known_only=True)  # completed with CacheParams' defaults (off)
        return cls(c["dir"], c["max_size_gb"], c["enabled"])

    def loose_files(self) -> list[Path]:
        """The input memos (``inputs/*.json``): they count towards the bound."""
        return _glob(self.dir / "inputs", "*.json") if self.dir is not None else []

    def _record(self, stage: str, key: str, status: str, seconds: float) -> None:
        if status == "hit":
            self.hits += 1
        else:
            self.misses += 1
        self.events.append({"stage": stage, "key": key, "status": status, "seconds": seconds})

    def load_input(self, cfg: Mapping[str, Any], load: Callable[[], ad.AnnData]) -> Input:
        """The run's input: read and digested, or -- when its source is known -- not read yet.

        ``load()`` reads the data (``tardis_exp.data.load_data``); with the cache disabled
        or a source seen for the first time it runs now and the digests are remembered.
        """
        from .data import digest, sample_digests

        memo_path, m = self._read_memo(cfg)
        if m is not None:
            try:
                os.utime(memo_path)  # recently used, for eviction
            except OSError:
                pass  # a read-only cache still serves its memos
            return Input(m["digest"], m["shape"], load=load, input_digest=m["input_digest"], samples=m["samples"])
        a = load()
        inp = Input(digest(a), a.shape, adata=a, samples=sample_digests(a, cfg["data"]))
        if memo_path is not None:
            inp.input_digest = input_digest(a, inp.digest, cfg["preprocess"])
            try:
                memo_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = memo_path.with_name(f".{memo_path.name}.{uuid.uuid4().hex[:8]}.tmp")
                tmp.write_text(json.dumps({"digest": inp.digest, "input_digest": inp.input_digest,
                                           "shape": list(inp.shape), "samples": inp.samples}))
                os.replace(tmp, memo_path)
            except OSError as e:
                log.warning("stage cache: could not store the input memo %s: %s", memo_path, e)
        return inp

    def cached_preprocessed(self, cfg: Mapping[str, Any]) -> ad.AnnData | None:
        """The preprocessed AnnData of a run with config ``cfg``, if the cache holds it.

        Reads neither the raw data nor anything else: ``None`` when the input memo or the
        preprocess entry is missing (or the cache is disabled). For a result saved without
        ``X`` (``save_result=results``) whose figures need it.
        """
        _, m = self._read_memo(cfg)
        if m is None:
            return None
        return self.get("preprocess", make_key(key_inputs("preprocess", m["input_digest"], cfg)))

    def _read_memo(self, cfg: Mapping[str, Any]) -> tuple[Path | None, dict | None]:
        """The input memo's path for ``cfg`` (``None``: disabled or unkeyable) and its content
        (``None``: absent or damaged, with a warning)."""
        skey = source_key(cfg["data"], cfg["preprocess"]) if self.enabled else None
        path = self.dir / "inputs" / f"{skey}.json" if skey else None
        if path is None or not path.is_file():
            return path, None
        try:
            m = json.loads(path.read_text())
            samples = m.get("samples") or []
            if cfg["data"].get("sample_key") is not None and not samples:
                return path, None  # a memo of before the samples were recorded: read the data again
            return path, {"digest": str(m["digest"]), "input_digest": str(m["input_digest"]),
                          "shape": tuple(int(x) for x in m["shape"]),
                          "samples": [{k: s[k] for k in ("name", "digest", "n_obs", "n_vars", "source")}
                                      for s in samples]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("stage cache: ignoring damaged input memo %s (%s)", path, e)
            return path, None

    # -- the cached stages ------------------------------------------------------------------
    def _tag(self, stage_run, stage: str, key: str, status: str, seconds: float) -> None:
        self._record(stage, key, status, seconds)
        log.info("stage cache: %s %s (key %s, %.2f s)", stage, status, key[:12], seconds)
        if stage_run is not None:
            stage_run.set_tags({"cache": status, "cache.key": key})
            stage_run.log_metric("cache_seconds", seconds)

    def preprocess(self, data: ad.AnnData | Input, cfg: Mapping[str, Any], data_digest: str | None = None, *,
                   compute: Callable[[ad.AnnData], ad.AnnData], stage_run=None) -> ad.AnnData:
        """``compute(adata)`` (the preprocess stage), or its stored result.

        ``data`` is the input AnnData (with its ``data_digest``) or an :class:`Input` from
        :meth:`load_input`, which a hit never reads. ``cfg`` is the whole resolved pipeline
        config; ``stage_run`` (a tracking :class:`~tardis_exp.tracking.StageRun`) gets the
        tags ``cache`` and ``cache.key``.
        """
        if not isinstance(data, Input):
            data = Input(data_digest, data.shape, adata=data)
        if not self.enabled:
            return compute(data.adata)
        t0 = time.perf_counter()
        if data.input_digest is None:
            data.input_digest = input_digest(data.adata, data.digest, cfg["preprocess"])
        self._input = data.input_digest
        inputs = key_inputs("preprocess", self._input, cfg)
        key = make_key(inputs)
        out = self.get("preprocess", key)
        if out is not None:
            out = _spilled(out)
            self._tag(stage_run, "preprocess", key, "hit", time.perf_counter() - t0)
            return out
        try:
            adata = data.adata
        except CacheCorrupt as e:
            from .errors import InputError

            raise InputError(f"data.path: the input changed while its size and modification time did not ({e}); "
                             f"delete {self.dir / 'inputs'} and run again") from None
        out = compute(adata)
        self.put("preprocess", key, out, inputs)
        self._tag(stage_run, "preprocess", key, "miss", time.perf_counter() - t0)
        return out

    def factorize(self, adata: ad.AnnData, cfg: Mapping[str, Any], compute: Callable[[ad.AnnData], Any],
                  stage_run=None) -> None:
        """``compute(adata)`` (the factorize stage, in place), or restore its stored outputs.

        Call after :meth:`preprocess` of the same run (the key chains on its input digest).
        """
        self._array_stage("factorize", adata, cfg, compute, stage_run)

    def consensus(self, adata: ad.AnnData, cfg: Mapping[str, Any], compute: Callable[[ad.AnnData], Any],
                  stage_run=None) -> None:
        """``compute(adata)`` (the consensus stage, in place), or restore its stored outputs.

        The key covers the preprocess, factorize and consensus configs: a sweep that
        repeats a configuration (a re-run study, another objective over the same trials)
        reuses the whole consensus, usages refit included.
        """
        self._array_stage("consensus", adata, cfg, compute, stage_run)

    def _array_stage(self, stage, adata, cfg, compute, stage_run) -> None:
        """A stage that writes into ``adata``: what it declares it writes (``SPEC.writes``)
        is stored after computing and restored on a hit."""
        if not self.enabled:
            compute(adata)
            return
        if self._input is None:
            raise RuntimeError(f"StageCache.{stage} needs StageCache.preprocess to run first (the key chains on it)")
        t0 = time.perf_counter()
        inputs = key_inputs(stage, self._input, cfg)
        key = make_key(inputs)
        arrays = self.get(stage, key)
        if arrays is not None:
            try:
                restore(stage, adata, arrays)
            except CacheCorrupt as e:
                log.warning("stage cache: ignoring damaged %s entry %s (%s); recomputing",
                            stage, self.entry_dir(stage, key), e)
                self._remove(self.entry_dir(stage, key))
            else:
                self._tag(stage_run, stage, key, "hit", time.perf_counter() - t0)
                return
        compute(adata)
        try:
            arrays = stage_outputs(stage, adata)
        except TypeError as e:
            log.warning("stage cache: %s outputs not cacheable (%s)", stage, e)
        else:
            self.put(stage, key, arrays, inputs)
        self._tag(stage_run, stage, key, "miss", time.perf_counter() - t0)


def _spilled(adata: ad.AnnData) -> ad.AnnData:
    """A preprocess entry read back lazily (``data.backend=dask``): its ``X`` copied once to
    the scratch folder the factorization reads (:func:`tardis_exp.lazy.spill`), as the stage
    itself leaves it -- raw chunks, not the entry's compressed ones decoded on every pass,
    and not files that another process's eviction could remove mid-run. The counts layer
    stays on the entry (read only when written out or shown)."""
    from .chunked import is_dask

    if is_dask(adata.X):
        from .lazy import spill

        adata.X = spill(adata.X)
    return adata


# ------------------------------------------------------------------------ stage outputs


def _spec(stage: str):
    from .stages import SPECS

    return SPECS[stage]


def stage_outputs(stage: str, adata: ad.AnnData) -> dict[str, np.ndarray]:
    """What ``stage`` wrote into ``adata`` -- every output its module declares -- as flat
    npz-able arrays; a :class:`TypeError` for anything that would need pickle."""
    return pack(_spec(stage), adata)


def restore(stage: str, adata: ad.AnnData, arrays: Mapping[str, np.ndarray]) -> None:
    """Write outputs stored by :func:`stage_outputs` into ``adata``; :class:`CacheCorrupt`
    when they do not fit it (missing outputs, other spots or genes)."""
    try:
        unpack(_spec(stage), adata, arrays)
    except Unfit as e:
        raise CacheCorrupt(str(e)) from None

