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
stage calls, and a hash of the stage's source files (an edited solver never serves stale
results in a development checkout). ``score`` (cheap, and it reads the ground truth) is
not cached.

The input itself is not copied. What the cache remembers about it is its digests and
shape, under a key of its *source*: the data config plus, for files, the path, size and
modification time of every file read (for generated data, the generator's code and the
library versions). When that memo and the preprocess entry are both present, the raw data is not
read at all -- a sweep reads its input once, not once per trial. A file rewritten in place
with the same size and modification time (to the nanosecond) would defeat the memo; any
ordinary write changes the time.

Layout under ``cache.dir``::

    preprocess/<key>/data.h5ad   the preprocessed AnnData (anndata's own format)
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
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import __version__

log = logging.getLogger(__name__)

STAGES = ("preprocess", "factorize", "consensus")
# what each stage's result depends on, upstream first
UPSTREAM = {"preprocess": ("preprocess",), "factorize": ("preprocess", "factorize"),
            "consensus": ("preprocess", "factorize", "consensus")}
# source files whose code decides each stage's result
_FACTORIZE_CODE = ("preprocess.py", "factorize.py", "nmf.py", "_kernels.py")
_CODE = {"preprocess": ("preprocess.py",), "factorize": _FACTORIZE_CODE,
         "consensus": (*_FACTORIZE_CODE, "consensus.py", "progress.py")}
_LIBS = {"preprocess": ("anndata", "scanpy", "numpy"), "factorize": ("anndata", "scanpy", "numpy", "scipy", "sklearn"),
         "consensus": ("anndata", "scanpy", "numpy", "scipy", "sklearn")}
# what factorize and consensus write; what a hit restores
_FACTORIZE_OBSM = ("X_nmf", "X_nmf_replicates")
_FACTORIZE_UNS = ("X_nmf_components", "nmf")
_CONSENSUS_OBSM = ("X_nmf_consensus",)
_CONSENSUS_UNS = ("nmf_consensus",)
_CONSENSUS_OBS = ("nmf_spot_consensus",)  # categorical labels (method=spots)
_DATA_FILE = {"preprocess": "data.h5ad", "factorize": "data.npz", "consensus": "data.npz"}
_SEP = "/"


class CacheCorrupt(Exception):
    """An entry that exists but cannot be trusted (checksum, format, shape)."""


class CacheUnreadable(Exception):
    """An entry this user may not read (another user's, in a shared cache): skipped, kept."""


def check_config(cfg: Mapping[str, Any] | None) -> None:
    """Validate a ``cache`` config before anything is created (no run, no folder)."""
    from .params import check

    check("cache", cfg, known_only=True)  # tardis_exp.params.CacheParams


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike, compression: str | None = None) -> None:
    """``adata.write_h5ad(path)``, with HDF5 never writing to the disk itself.

    The file is built in memory (h5py on a :class:`io.BytesIO`, anndata's own
    ``write_elem``) and then written with one plain ``write``: a full disk is an
    ``OSError`` (``ENOSPC``) like any other, not an HDF5 error stack of hundreds of lines
    followed by a segmentation fault when h5py's half-written objects are freed at exit.
    Costs one compressed copy of the file in memory while writing.
    """
    import io

    import h5py

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem

    # what AnnData.write_h5ad does first (the same file, the same dtypes on reading)
    adata.strings_to_categoricals()
    if adata.raw is not None:
        adata.strings_to_categoricals(adata.raw.var)
    buf = io.BytesIO()
    kwargs = {"compression": compression} if compression else {}
    with h5py.File(buf, "w") as f:
        write_elem(f, "/", adata, dataset_kwargs=kwargs)
    with open(path, "wb") as fh:
        fh.write(buf.getbuffer())
        fh.flush()
        os.fsync(fh.fileno())


def _glob(folder: Path, pattern: str) -> list[Path]:
    """``folder.glob(pattern)``; nothing for a folder this user may not list (shared caches)."""
    try:
        return list(folder.glob(pattern))
    except OSError:
        return []


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would race with other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _shareable(path: Path) -> None:
    """Give a folder made by :func:`tempfile.mkdtemp` (always 0700) the mode the umask allows.

    A shared cache (``cache.dir=/shared/...`` used by a group) then gets group-readable and,
    under ``umask 002``, group-writable entries like every other file of the cache.
    """
    try:
        os.chmod(path, 0o777 & ~_umask())
    except OSError:
        pass


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
    # once per process: the code that runs is the code imported at start, not what an
    # editor saved since
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in _CODE[stage]:
        p = here / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


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


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def key_inputs(stage: str, input_dig: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-able description of everything ``stage``'s result depends on."""
    if stage not in STAGES:
        raise ValueError(f"no cache for stage {stage!r}; cached stages are {STAGES}")
    configs = {s: dict(cfg[s]) for s in UPSTREAM[stage]}
    extra = {}
    gene_file = configs["preprocess"].get("exclude_genes_file")
    if gene_file and Path(str(gene_file)).is_file():
        # the list's content decides the genes, not its path
        extra["exclude_genes_file.sha256"] = _file_digest(Path(str(gene_file)))
    return {"stage": stage, "input": input_dig, "configs": configs, "extra": extra,
            "tardis_exp": __version__, "code": _code_digest(stage), "libs": _lib_versions(stage),
            "python": f"{sys.version_info.major}.{sys.version_info.minor}"}


def make_key(inputs: Mapping[str, Any]) -> str:
    blob = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------ npz (de)serialization


def _flatten_out(prefix: str, value: Any, out: dict[str, np.ndarray]) -> None:
    if isinstance(value, Mapping):
        if not value:
            out[prefix + _SEP + "__empty__"] = np.array(0)
        for k, v in value.items():
            if _SEP in str(k):
                raise TypeError(f"key {k!r} contains {_SEP!r}")
            _flatten_out(f"{prefix}{_SEP}{k}", v, out)
        return
    if sp.issparse(value):
        raise TypeError(f"{prefix}: sparse matrices are not cached")
    arr = np.asarray(value)
    if arr.dtype.kind == "O":
        raise TypeError(f"{prefix}: object arrays would need pickle; not cached")
    out[prefix] = arr


def _unflatten(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for name, arr in arrays.items():
        parts = name.split(_SEP)
        node = root
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if parts[-1] == "__empty__":
            continue
        # 0-d arrays were python scalars (ints, floats, strings, bools)
        node[parts[-1]] = arr.item() if arr.ndim == 0 else arr
    return root


def _outputs(adata: ad.AnnData, obsm_keys, uns_keys) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for group, keys, mapping in (("obsm", obsm_keys, adata.obsm), ("uns", uns_keys, adata.uns)):
        for k in keys:
            if k in mapping:
                _flatten_out(f"{group}{_SEP}{k}", mapping[k], out)
    return out


def factorize_outputs(adata: ad.AnnData) -> dict[str, np.ndarray]:
    """What the factorize stage wrote into ``adata``, as flat npz-able arrays."""
    return _outputs(adata, _FACTORIZE_OBSM, _FACTORIZE_UNS)


def consensus_outputs(adata: ad.AnnData) -> dict[str, np.ndarray]:
    """What the consensus stage wrote into ``adata``, as flat npz-able arrays."""
    out = _outputs(adata, _CONSENSUS_OBSM, _CONSENSUS_UNS)
    for k in _CONSENSUS_OBS:
        if k in adata.obs:
            col = adata.obs[k]
            out[f"obs{_SEP}{k}"] = np.asarray(col.astype(str), dtype=str)
            out[f"obscat{_SEP}{k}"] = np.asarray(col.cat.categories.astype(str), dtype=str)
    return out


def restore_consensus(adata: ad.AnnData, arrays: Mapping[str, np.ndarray]) -> None:
    """Write cached consensus outputs into ``adata`` (the inverse of :func:`consensus_outputs`)."""
    tree = _unflatten(arrays)
    obsm, uns, obs, cats = (tree.get(k, {}) for k in ("obsm", "uns", "obs", "obscat"))
    if "X_nmf_consensus" not in obsm or "nmf_consensus" not in uns:
        raise CacheCorrupt("consensus entry lacks obsm/X_nmf_consensus or uns/nmf_consensus")
    W = obsm["X_nmf_consensus"]
    spectra = np.asarray(uns["nmf_consensus"].get("spectra"))
    if np.ndim(W) != 2 or W.shape[0] != adata.n_obs or spectra.ndim != 2 or spectra.shape[1] != adata.n_vars:
        raise CacheCorrupt(f"consensus entry: usages {np.shape(W)} / spectra {spectra.shape} do not fit "
                           f"{adata.n_obs} spots x {adata.n_vars} genes")
    for k, v in obs.items():
        if len(v) != adata.n_obs:
            raise CacheCorrupt(f"consensus entry: obs/{k} has {len(v)} values for {adata.n_obs} spots")
        adata.obs[k] = pd.Categorical(np.asarray(v, dtype=str), categories=list(cats.get(k, np.unique(v))))
    adata.obsm["X_nmf_consensus"] = W
    for k, v in uns.items():
        adata.uns[k] = v


def restore_factorize(adata: ad.AnnData, arrays: Mapping[str, np.ndarray]) -> None:
    """Write cached factorize outputs into ``adata`` (the inverse of :func:`factorize_outputs`)."""
    tree = _unflatten(arrays)
    obsm, uns = tree.get("obsm", {}), tree.get("uns", {})
    if "X_nmf" not in obsm or "nmf" not in uns:
        raise CacheCorrupt("factorize entry lacks obsm/X_nmf or uns/nmf")
    for k, v in obsm.items():
        if np.ndim(v) != 2 or v.shape[0] != adata.n_obs:
            raise CacheCorrupt(f"factorize entry: obsm/{k} has shape {np.shape(v)}, data has {adata.n_obs} spots")
    comps = np.asarray(uns["nmf"].get("components"))
    if comps.ndim != 3 or comps.shape[2] != adata.n_vars:
        raise CacheCorrupt(f"factorize entry: components of shape {comps.shape}, data has {adata.n_vars} genes")
    for k, v in obsm.items():
        adata.obsm[k] = v
    for k, v in uns.items():
        adata.uns[k] = v


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
    """

    def __init__(self, digest: str, shape: tuple[int, int], adata: ad.AnnData | None = None,
                 load: Callable[[], ad.AnnData] | None = None, input_digest: str | None = None):
        self.digest = digest
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
    if cfg.get("source") not in ("synthetic", "pbmc68k"):
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
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in ("data.py", "synthetic.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()


class StageCache:
    """Content-keyed, size-bounded store of stage results under one folder.

    Parameters
    ----------
    directory
        Root folder (``cache.dir``); created on the first write.
    max_size_gb
        Bound on the total size of all entries; least recently used entries go first.
    enabled
        ``False`` makes every call compute and store nothing.
    """

    def __init__(self, directory: str | os.PathLike | None, max_size_gb: float = 5.0, enabled: bool = True):
        check_config({"enabled": enabled, "dir": directory, "max_size_gb": max_size_gb})
        self.enabled = enabled
        self.dir = Path(str(directory)).expanduser() if directory else None
        self.max_bytes = int(float(max_size_gb) * 1024**3)
        self.hits = 0
        self.misses = 0
        self.events: list[dict[str, Any]] = []
        self.unreadable: list[str] = []  # entries of other users this process may not read
        self._input: str | None = None  # input digest of the current run, set by preprocess()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "StageCache":
        cfg = cfg or {}
        return cls(cfg.get("dir"), cfg.get("max_size_gb", 5.0), cfg.get("enabled", False))

    # -- paths and bookkeeping ----------------------------------------------------------
    def entry_dir(self, stage: str, key: str) -> Path:
        return self.dir / stage / key

    def entries(self) -> list[Path]:
        """Every complete entry folder (those with a ``meta.json``)."""
        if self.dir is None or not self.dir.is_dir():
            return []
        return [p.parent for s in STAGES for p in _glob(self.dir / s, "*/meta.json")]

    @staticmethod
    def _size(entry: Path) -> int:
        """Bytes of an entry folder (its files) or of a memo file; 0 once removed."""
        total = 0
        try:
            files = list(entry.iterdir()) if entry.is_dir() else [entry]
        except OSError:  # removed meanwhile, or another user's folder we may not list
            return 0
        for f in files:
            try:
                total += f.stat().st_size
            except OSError:
                pass
        return total

    def _memos(self) -> list[Path]:
        return _glob(self.dir / "inputs", "*.json") if self.dir is not None else []

    def size_bytes(self) -> int:
        return sum(self._size(e) for e in self.entries() + self._memos())

    def _remove(self, entry: Path) -> None:
        # rename first: a reader never sees an entry whose meta.json outlived its data
        trash = entry.parent / f".trash-{entry.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("stage cache: cannot remove %s: %s", entry, e)
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _record(self, stage: str, key: str, status: str, seconds: float) -> None:
        if status == "hit":
            self.hits += 1
        else:
            self.misses += 1
        self.events.append({"stage": stage, "key": key, "status": status, "seconds": seconds})

    # -- read ----------------------------------------------------------------------------
    def _load(self, stage: str, key: str):
        """The entry's payload, or ``None`` when absent; :class:`CacheCorrupt` if untrustworthy."""
        entry = self.entry_dir(stage, key)
        meta_path = entry / "meta.json"
        try:
            os.stat(meta_path)
        except PermissionError:
            raise CacheUnreadable("permission denied") from None
        except OSError:
            return None
        try:
            meta = json.loads(meta_path.read_text())
            data = entry / meta["file"]
            if meta.get("key") != key or meta.get("stage") != stage:
                raise CacheCorrupt("meta.json names another entry")
            if data.stat().st_size != meta["size"] or _file_digest(data) != meta["sha256"]:
                raise CacheCorrupt(f"{data.name} does not match the sha256 in meta.json")
            if stage == "preprocess":
                payload = ad.read_h5ad(data)
            else:
                with np.load(data, allow_pickle=False) as z:
                    payload = {k: z[k] for k in z.files}
        except FileNotFoundError:
            if not entry.exists():  # evicted by another process between the checks
                return None
            raise CacheCorrupt("a file of the entry is missing") from None
        except PermissionError:
            raise CacheUnreadable("permission denied") from None
        except CacheCorrupt:
            raise
        except Exception as e:  # unreadable JSON, HDF5, zip: all mean the entry is damaged
            raise CacheCorrupt(f"{type(e).__name__}: {e}") from e
        try:
            os.utime(meta_path)  # last access, for LRU eviction
        except OSError:
            pass
        return payload

    def get(self, stage: str, key: str):
        """Load an entry; ``None`` on a miss. A damaged entry is deleted, with a warning."""
        if not self.enabled:
            return None
        try:
            return self._load(stage, key)
        except CacheUnreadable as e:
            # another user's entry in a shared cache: not ours to delete; compute ours
            where = self.entry_dir(stage, key)
            self.unreadable.append(str(where))
            msg = (f"stage cache: skipping unreadable {stage} entry {where} ({e}; created by another user "
                   "without group read permission, see docs/troubleshooting-faults.md); recomputing")
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return None
        except CacheCorrupt as e:
            msg = f"stage cache: ignoring damaged {stage} entry {self.entry_dir(stage, key)} ({e}); recomputing"
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            self._remove(self.entry_dir(stage, key))
            return None

    # -- write ---------------------------------------------------------------------------
    def put(self, stage: str, key: str, payload, inputs: Mapping[str, Any] | None = None) -> bool:
        """Store ``payload`` (AnnData for preprocess, dict of arrays for factorize) atomically."""
        if not self.enabled:
            return False
        final = self.entry_dir(stage, key)
        try:
            if (final / "meta.json").is_file():
                return True
        except OSError:  # a folder of another user's that we may not look into: try, and warn below
            pass
        tmp = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=final.parent))
            _shareable(tmp)
            data = tmp / _DATA_FILE[stage]
            if stage == "preprocess":
                write_h5ad(payload, data)
            else:
                with open(data, "wb") as f:
                    np.savez(f, **payload)
                    f.flush()
                    os.fsync(f.fileno())
            size = data.stat().st_size
            if size > self.max_bytes:
                log.warning("stage cache: the %s result (%.2f GB) is larger than cache.max_size_gb; not cached",
                            stage, size / 1024**3)
                return False
            meta = {"key": key, "stage": stage, "file": data.name, "size": size, "sha256": _file_digest(data),
                    "created": time.time(), "inputs": inputs or {}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
            try:
                os.rename(tmp, final)
            except OSError:
                # another process stored the same key first: its entry is as good as ours
                if not final.exists():
                    raise
        except Exception as e:  # a full disk must not fail the run: the result is in memory
            reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
            log.warning("stage cache: could not store the %s result under %s (%s); the run goes on "
                        "without caching it", stage, final, " ".join(str(reason).split())[:300])
            return False
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self.evict(keep=final)
        return True

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used entries until the total fits ``max_size_gb``; return how many."""
        if self.dir is None or not self.dir.is_dir():
            return 0
        now = time.time()
        for s in STAGES:  # leftovers of killed writers and removers (older than an hour)
            for junk in _glob(self.dir / s, ".tmp-*") + _glob(self.dir / s, ".trash-*"):
                try:
                    if now - junk.stat().st_mtime > 3600:
                        shutil.rmtree(junk, ignore_errors=True)
                except OSError:
                    pass
        found = []
        for e in self.entries():
            try:
                found.append((os.stat(e / "meta.json").st_mtime, self._size(e), e))
            except OSError:  # removed meanwhile, or unreadable (another user's)
                continue
        # input memos are tiny, but a cache that sees many inputs must not grow without bound
        for memo in self._memos():
            try:
                found.append((memo.stat().st_mtime, self._size(memo), memo))
            except OSError:
                continue
        total = sum(s for _, s, _ in found)
        removed = 0
        for _, size, e in sorted(found, key=lambda t: t[0]):
            if total <= self.max_bytes:
                break
            if keep is not None and e == keep:
                continue
            if e.is_file():
                try:
                    e.unlink(missing_ok=True)
                except OSError as err:
                    log.warning("stage cache: cannot remove %s: %s", e, err)
            else:
                self._remove(e)
            total -= size
            removed += 1
        if removed:
            log.info("stage cache: evicted %d entries to stay under %.2f GB", removed, self.max_bytes / 1024**3)
        return removed

    # -- the input ------------------------------------------------------------------------
    def load_input(self, cfg: Mapping[str, Any], load: Callable[[], ad.AnnData]) -> Input:
        """The run's input: read and digested, or -- when its source is known -- not read yet.

        ``load()`` reads the data (``tardis_exp.data.load_data``); with the cache disabled
        or a source seen for the first time it runs now and the digests are remembered.
        """
        from .data import digest

        memo_path, m = self._read_memo(cfg)
        if m is not None:
            try:
                os.utime(memo_path)  # recently used, for eviction
            except OSError:
                pass  # a read-only cache still serves its memos
            return Input(m["digest"], m["shape"], load=load, input_digest=m["input_digest"])
        a = load()
        inp = Input(digest(a), a.shape, adata=a)
        if memo_path is not None:
            inp.input_digest = input_digest(a, inp.digest, cfg["preprocess"])
            try:
                memo_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = memo_path.with_name(f".{memo_path.name}.{uuid.uuid4().hex[:8]}.tmp")
                tmp.write_text(json.dumps({"digest": inp.digest, "input_digest": inp.input_digest,
                                           "shape": list(inp.shape)}))
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
            return path, {"digest": str(m["digest"]), "input_digest": str(m["input_digest"]),
                          "shape": tuple(int(x) for x in m["shape"])}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("stage cache: ignoring damaged input memo %s (%s)", path, e)
            return path, None

    # -- the cached stages ------------------------------------------------------------------
    def _tag(self, stage_run, stage: str, key: str, status: str, seconds: float) -> None:
        self._record(stage, key, status, seconds)
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
        self._array_stage("factorize", adata, cfg, compute, stage_run, factorize_outputs, restore_factorize)

    def consensus(self, adata: ad.AnnData, cfg: Mapping[str, Any], compute: Callable[[ad.AnnData], Any],
                  stage_run=None) -> None:
        """``compute(adata)`` (the consensus stage, in place), or restore its stored outputs.

        The key covers the preprocess, factorize and consensus configs: a sweep that
        repeats a configuration (a re-run study, another objective over the same trials)
        reuses the whole consensus, usages refit included.
        """
        self._array_stage("consensus", adata, cfg, compute, stage_run, consensus_outputs, restore_consensus)

    def _array_stage(self, stage, adata, cfg, compute, stage_run, outputs, restore) -> None:
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
                restore(adata, arrays)
            except CacheCorrupt as e:
                log.warning("stage cache: ignoring damaged %s entry %s (%s); recomputing",
                            stage, self.entry_dir(stage, key), e)
                self._remove(self.entry_dir(stage, key))
            else:
                self._tag(stage_run, stage, key, "hit", time.perf_counter() - t0)
                return
        compute(adata)
        try:
            arrays = outputs(adata)
        except TypeError as e:
            log.warning("stage cache: %s outputs not cacheable (%s)", stage, e)
        else:
            self.put(stage, key, arrays, inputs)
        self._tag(stage_run, stage, key, "miss", time.perf_counter() - t0)
