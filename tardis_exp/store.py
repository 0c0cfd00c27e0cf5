"""A content-addressed store on disk: keys, atomic writes, integrity checks, an LRU bound.

Knows nothing of stages or AnnData semantics: it stores a payload -- an AnnData (written
as h5ad), an AnnData whose ``X`` or a layer is a Dask array (``data.backend=dask``: written
one chunk at a time as a zarr store and read back lazily, so neither writing nor reading
needs memory in proportion to the matrix) or a mapping of NumPy arrays (npz, read with
``allow_pickle=False``) -- under ``<dir>/<namespace>/<key>/`` with a ``meta.json`` holding
its sha256 (for a zarr store: of the list of its files' paths, sizes and sha256s) and size,
and gives it back only if the checksum still matches. :mod:`tardis_exp.cache` builds the stage
cache on top of it (what a key is made of, what a stage's result is).

Keys: :func:`make_key` (sha256 of a JSON description) and :func:`code_digest` (the
source of a module and of every module of its package it imports, found by following
its imports, so that a moved or renamed helper changes the key instead of being
skipped).

Safety: only h5ad and npz are written, never pickle. An entry is written in a temporary
folder and renamed into place in one ``os.rename``, so a killed process leaves no
half-written entry, only a ``.tmp-*`` folder that the next eviction removes. An entry that
fails the check or does not load is logged as a warning, deleted and recomputed. After
each write the least recently used entries (last hit or write, recorded in the mtime of
``meta.json``, since file access times are often not kept) are removed until the total
fits ``max_size_gb``; loose files a subclass names (:meth:`Store.loose_files`) count and
are evicted the same way.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.machinery
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
from typing import Any, Mapping

import anndata as ad
import numpy as np
import scipy.sparse as sp

log = logging.getLogger("tardis_exp.cache")


class CacheCorrupt(Exception):
    """An entry that exists but cannot be trusted (checksum, format, shape)."""


class CacheUnreadable(Exception):
    """An entry this user may not read (another user's, in a shared cache): skipped, kept."""


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike, compression: str | int | None = None) -> None:
    """``adata.write_h5ad(path)``, with HDF5 never writing to the disk itself.

    The file is built in memory (h5py on a :class:`io.BytesIO`, anndata's own
    ``write_elem``) and then written with one plain ``write``: a full disk is an
    ``OSError`` (``ENOSPC``) like any other, not an HDF5 error stack of hundreds of lines
    followed by a segmentation fault when h5py's half-written objects are freed at exit.
    Costs one compressed copy of the file in memory while writing. An AnnData whose ``X``
    or a layer is a Dask array (``data.backend=dask``), or whose arrays hold more than
    ``DIRECT_WRITE_BYTES``, is written straight to ``path`` instead (Dask arrays one chunk
    at a time): its file can be larger than the memory the run may use. A full disk is
    then HDF5's error; the caller writes to a temporary name, so no half file is kept.
    ``compression`` is h5py's: ``'gzip'`` (level 4), ``'lzf'``, or an int 0-9 (gzip at
    that level).
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
    kwargs = {"compression": compression} if compression is not None else {}
    if _has_dask(adata) or _nbytes(adata) > DIRECT_WRITE_BYTES:
        with h5py.File(path, "w") as f:
            write_elem(f, "/", adata, dataset_kwargs=kwargs)
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        return
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        write_elem(f, "/", adata, dataset_kwargs=kwargs)
    with open(path, "wb") as fh:
        fh.write(buf.getbuffer())
        fh.flush()
        os.fsync(fh.fileno())


# above this many bytes of arrays, write_h5ad does not build the file in memory first
DIRECT_WRITE_BYTES = 512 * 2**20


def _nbytes(adata) -> int:
    """Bytes of X, the layers, obsm and varm (what dominates an h5ad file)."""
    n = 0
    for M in [adata.X, *adata.layers.values(), *adata.obsm.values(), *adata.varm.values()]:
        if M is None:
            continue
        if sp.issparse(M):
            n += M.data.nbytes + M.indices.nbytes + M.indptr.nbytes
        else:
            n += int(getattr(M, "nbytes", 0) or 0)
    return n


def _has_dask(adata) -> bool:
    from .chunked import is_dask

    return is_dask(adata.X) or any(is_dask(v) for v in adata.layers.values())


def write_zarr(adata: ad.AnnData, path: str | os.PathLike) -> int:
    """Write an AnnData whose ``X`` or layers are row-chunked Dask arrays as a zarr store,
    one chunk at a time (anndata's ``write_elem``); return the spots per chunk to read it
    back with (the largest row chunk of ``X``)."""
    import zarr

    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem
    from .chunked import is_dask

    adata.strings_to_categoricals()
    with warnings.catch_warnings():  # zarr 3's notice about its future sharding default
        warnings.simplefilter("ignore", UserWarning)
        write_elem(zarr.open_group(str(path), mode="w"), "/", adata)
    return int(max(adata.X.chunks[0])) if is_dask(adata.X) else int(adata.n_obs)


def read_zarr_lazy(path: str | os.PathLike, chunk_rows: int) -> ad.AnnData:
    """The AnnData of :func:`write_zarr`: ``X`` and the layers row-chunked Dask arrays on
    the store (read when computed), the rest in memory (gene-, spot- or spot x K-sized)."""
    import zarr
    from anndata.experimental import read_elem_lazy

    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem

    g = zarr.open_group(str(path), mode="r")

    def lazy(elem):
        n, m = (int(x) for x in (elem.attrs["shape"] if "shape" in elem.attrs else elem.shape))
        return read_elem_lazy(elem, chunks=(min(chunk_rows, n) or 1, m))

    layers = {k: lazy(g["layers"][k]) for k in g["layers"].keys()} if "layers" in g else {}
    parts = {k: read_elem(g[k]) for k in ("obs", "var", "obsm", "varm", "uns") if k in g}
    return ad.AnnData(X=lazy(g["X"]) if "X" in g else None, layers=layers, **parts)


def _tree_digest(folder: Path) -> tuple[int, str]:
    """Total size and sha256 of a folder tree: of every file's relative path, size and sha256."""
    h = hashlib.sha256()
    total = 0
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(folder)
    for f in files:
        size = f.stat().st_size
        total += size
        h.update(f"{f.relative_to(folder).as_posix()}\0{size}\0{_file_digest(f)}\n".encode())
    return total, h.hexdigest()


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


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


file_digest = _file_digest


def make_key(inputs: Mapping[str, Any]) -> str:
    """sha256 of a JSON-able description (keys sorted)."""
    blob = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of the modules ``module``'s source imports (relative imports resolved;
    ``from .x import y`` also names ``.x.y``, in case ``y`` is a module)."""
    package = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _module_file(name: str, package: str, package_dir: Path) -> Path | None:
    """The source file of module ``name`` inside ``package`` (at ``package_dir``), found by
    importlib's path finder without importing anything; ``None`` if it is not a module there."""
    if name == package:
        return package_dir / "__init__.py"
    parts = name[len(package) + 1:].split(".")
    path = [str(package_dir)]
    spec = None
    for i, part in enumerate(parts):
        spec = importlib.machinery.PathFinder.find_spec(part, path)
        if spec is None:
            return None
        if i < len(parts) - 1:
            if not spec.submodule_search_locations:
                return None
            path = list(spec.submodule_search_locations)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def module_closure(module: str, package: str, package_dir: str | os.PathLike) -> dict[str, str]:
    """``{module name: sha256 of its source}`` for ``module`` and every module of ``package``
    it imports, directly or through another (the package's ``__init__`` excluded: it
    imports everything and holds only the version, which keys carry on their own).

    Follows the import statements in the source, so a helper moved to a new module, or a
    module renamed, is found under its new name: there is no list of file names to keep.
    """
    package_dir = Path(package_dir)
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or not (name == package or name.startswith(package + ".")):
            continue
        path = _module_file(name, package, package_dir)
        if path is None:  # an attribute (``from .x import function``), not a module
            continue
        src = path.read_bytes()
        seen[name] = hashlib.sha256(src).hexdigest()
        deps = _imported(ast.parse(src), name, path.name == "__init__.py")
        todo.extend(d for d in deps if d != package)
    return seen


def closure_digest(closure: Mapping[str, str]) -> str:
    """One sha256 over a :func:`module_closure` (module names and their sources' hashes)."""
    h = hashlib.sha256()
    for name in sorted(closure):
        h.update(f"{name}:{closure[name]}\n".encode())
    return h.hexdigest()


def code_digest(*modules: str) -> str:
    """sha256 of the source of the imported ``modules`` and of every module of their package
    they import (:func:`module_closure`): the code identity of a computation. The files
    are those the modules were imported from (``importlib``; ``module.__file__``)."""
    closure: dict[str, str] = {}
    for name in modules:
        importlib.import_module(name)
        package = name.partition(".")[0]
        closure.update(module_closure(name, package, Path(sys.modules[package].__file__).parent))
    return closure_digest(closure)


class Store:
    """A content-addressed, size-bounded store of payloads under one folder.

    Parameters
    ----------
    directory
        Root folder; created on the first write.
    max_size_gb
        Bound on the total size of all entries; least recently used entries go first.
    enabled
        ``False`` makes every :meth:`get` miss and every :meth:`put` store nothing.
    """

    namespaces: tuple[str, ...] = ()  # the sub-folders holding entries (a subclass names them)

    def __init__(self, directory: str | os.PathLike | None, max_size_gb: float = 5.0, enabled: bool = True):
        self.enabled = enabled
        self.dir = Path(str(directory)).expanduser() if directory else None
        self.max_bytes = int(float(max_size_gb) * 1024**3)
        self.unreadable: list[str] = []  # entries of other users this process may not read

    # -- paths and bookkeeping ----------------------------------------------------------
    def entry_dir(self, stage: str, key: str) -> Path:
        return self.dir / stage / key

    def entries(self) -> list[Path]:
        """Every complete entry folder (those with a ``meta.json``)."""
        if self.dir is None or not self.dir.is_dir():
            return []
        return [p.parent for s in self.namespaces for p in _glob(self.dir / s, "*/meta.json")]

    @staticmethod
    def _size(entry: Path) -> int:
        """Bytes of an entry folder (its files) or of a loose file; 0 once removed."""
        if not entry.is_dir():
            try:
                return entry.stat().st_size
            except OSError:  # removed meanwhile
                return 0
        total = 0
        # a zarr payload is a folder tree; a folder we may not list (another user's) counts 0
        for root, _, files in os.walk(entry):
            for f in files:
                try:
                    total += os.stat(os.path.join(root, f)).st_size
                except OSError:
                    pass
        return total

    def loose_files(self) -> list[Path]:
        """Single files under the folder that count towards the bound (none here)."""
        return []

    def size_bytes(self) -> int:
        return sum(self._size(e) for e in self.entries() + self.loose_files())

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

    # -- read and write ------------------------------------------------------------------
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
            size, sha = _tree_digest(data) if data.suffix == ".zarr" else (data.stat().st_size, None)
            if size != meta["size"] or (sha or _file_digest(data)) != meta["sha256"]:
                raise CacheCorrupt(f"{data.name} does not match the sha256 in meta.json")
            if data.suffix == ".zarr":
                payload = read_zarr_lazy(data, int(meta["chunk_rows"]))
            elif data.suffix == ".h5ad":
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
        """Store ``payload`` (an AnnData, or a mapping of arrays) atomically; ``False`` if it was not stored."""
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
            chunked = isinstance(payload, ad.AnnData) and _has_dask(payload)
            data = tmp / ("data.zarr" if chunked else "data.h5ad" if isinstance(payload, ad.AnnData) else "data.npz")
            extra = {}
            if chunked:  # one chunk at a time: an entry never needs the matrix whole in memory
                extra["chunk_rows"] = write_zarr(payload, data)
            elif isinstance(payload, ad.AnnData):
                write_h5ad(payload, data)
            else:
                with open(data, "wb") as f:
                    np.savez(f, **payload)
                    f.flush()
                    os.fsync(f.fileno())
            size, sha = _tree_digest(data) if chunked else (data.stat().st_size, None)
            if size > self.max_bytes:
                log.warning("stage cache: the %s result (%.2f GB) is larger than cache.max_size_gb; not cached",
                            stage, size / 1024**3)
                return False
            meta = {"key": key, "stage": stage, "file": data.name, "size": size, "sha256": sha or _file_digest(data),
                    "created": time.time(), "inputs": inputs or {}, **extra}
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
        for s in self.namespaces:  # leftovers of killed writers and removers (older than an hour)
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
        # loose files (input memos) are tiny, but a cache that sees many inputs must not grow without bound
        for memo in self.loose_files():
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
