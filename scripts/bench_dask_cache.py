"""What the stage cache costs and saves for a Dask input (issue 28), side by side on one zarr store.

Makes (once) a zarr AnnData store of planted programs (``scripts/bench_scale.py``'s data:
5 programs, ~10 % non-zero CSR; default 300,000 x 2,000) and times, each in a fresh
process (its own peak RSS, VmHWM):

``digest``
    the content digest the cache keys on (:func:`tardis_exp.data.digest`: every stored
    chunk of X read and hashed, one chunk in memory at a time) -- paid once per store;
``files``
    the sha256 of the store's files as stored (compressed), for comparison;
``memo``
    what a later trial pays instead: the input memo's key (path, size and mtime of every
    file of the store, :func:`tardis_exp.cache.source_key`);
``factorize``
    one factorization of the preprocessed store (``factorize.max_iter`` 1 and 2, 4
    replicates of rank 10): the difference is one iteration, i.e. one pass of the
    factorization over the chunks;
``cache``
    the preprocess stage through the cache: the miss (compute, then write the entry as
    zarr) and the hit (check the entry's files, copy X to the scratch folder).

Usage::

    OPENBLAS_NUM_THREADS=1 python scripts/bench_dask_cache.py --workdir /tmp/bench_dask_cache
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "scripts" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(what: str, store: Path, chunk_rows: int, work: Path) -> dict:
    """One measurement, in this (fresh) process."""
    import warnings

    warnings.simplefilter("ignore")
    import dask.array  # noqa: F401 -- imports outside the timings

    from tardis_exp.cache import StageCache, source_key
    from tardis_exp.data import digest
    from tardis_exp.factorize import factorize
    from tardis_exp.lazy import read_lazy
    from tardis_exp.params import check
    from tardis_exp.preprocess import preprocess
    from tardis_exp.store import _tree_digest

    out: dict = {}
    t0 = time.perf_counter()
    if what == "digest":
        out["digest"] = digest(read_lazy(store, chunk_rows=chunk_rows))
    elif what == "files":
        out["bytes"], _ = _tree_digest(store)
    elif what == "memo":
        cfg = {"source": "zarr", "path": str(store), "backend": "dask", "chunk_rows": chunk_rows}
        source_key(cfg, {"use_raw": False, "layer": None})  # the first also digests the readers' code
        out["first_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        source_key(cfg, {"use_raw": False, "layer": None})
    elif what == "factorize":
        a = preprocess(read_lazy(store, chunk_rows=chunk_rows), n_top_genes=None)
        out["preprocess_s"] = time.perf_counter() - t0
        # the first call pays one-off costs (kernel compilation, page cache): not timed
        for name, it in (("warm", 1), ("max_iter_1", 1), ("max_iter_3", 3)):
            t = time.perf_counter()
            factorize(a, n_components=10, n_replicates=4, max_iter=it, tol=0.0, random_state=0)
            out[f"{name}_s"] = time.perf_counter() - t
        out["one_iteration_s"] = (out["max_iter_3_s"] - out["max_iter_1_s"]) / 2
    elif what == "cache":

        pre = check("preprocess", {"n_top_genes": None})
        cfg = {"data": {"source": "zarr", "path": str(store), "backend": "dask", "chunk_rows": chunk_rows},
               "preprocess": pre}
        cache = StageCache(work / "cache", max_size_gb=50)
        t0 = time.perf_counter()
        for status in ("miss", "hit"):
            t = time.perf_counter()
            inp = cache.load_input(cfg, load=lambda: read_lazy(store, chunk_rows=chunk_rows))
            t_in = time.perf_counter() - t
            cache.preprocess(inp, cfg, compute=lambda a: preprocess(a, **pre))
            out[status] = {"input_s": t_in, "preprocess_s": time.perf_counter() - t - t_in,
                           "recorded": cache.events[-1]["status"]}
        out["entry_mb"] = cache.size_bytes() / 2**20
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = _hwm_mb()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spots", type=int, default=300_000)
    ap.add_argument("--genes", type=int, default=2_000)
    ap.add_argument("--chunk-rows", type=int, default=50_000)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench_dask_cache")
    ap.add_argument("--only", help="one measurement, in this process (internal)")
    a = ap.parse_args(argv)
    store = a.workdir / f"planted_{a.spots}x{a.genes}.zarr"
    if a.only:
        print(json.dumps(measure(a.only, store, a.chunk_rows, a.workdir)))
        return 0
    a.workdir.mkdir(parents=True, exist_ok=True)
    if not store.exists():
        t = time.perf_counter()
        _bench_scale().make_scale_zarr(store, a.spots, a.genes, n_programs=5)
        print(f"made {store} in {time.perf_counter() - t:.1f} s", flush=True)
    import shutil

    shutil.rmtree(a.workdir / "cache", ignore_errors=True)
    res = {}
    for what in ("digest", "files", "memo", "factorize", "cache"):
        p = subprocess.run([sys.executable, __file__, "--only", what, "--spots", str(a.spots), "--genes", str(a.genes),
                            "--chunk-rows", str(a.chunk_rows), "--workdir", str(a.workdir)],
                           capture_output=True, text=True, env={**os.environ, "TARDIS_EXP_PROGRESS": "0"})
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        res[what] = json.loads(p.stdout.strip().splitlines()[-1])
        print(what, json.dumps(res[what]), flush=True)
    sys.path.insert(0, str(REPO / "scripts"))
    print(_bench_scale()._blas())
    f = res["factorize"]
    print(f"\n{a.spots:,} x {a.genes:,} zarr store, chunk_rows {a.chunk_rows:,}:")
    print(f"  content digest (once per store): {res['digest']['seconds']:.1f} s, peak {res['digest']['peak_rss_mb']:.0f} MB"
          f" = {res['digest']['seconds'] / f['one_iteration_s']:.2f} factorization iterations")
    print(f"  sha256 of the store's files:     {res['files']['seconds']:.1f} s ({res['files']['bytes'] / 2**20:.0f} MB)")
    print(f"  memo key (every later trial):    {res['memo']['seconds'] * 1e3:.0f} ms "
          f"({res['memo']['first_s'] * 1e3:.0f} ms the first time in a process)")
    print(f"  one factorization iteration:     {f['one_iteration_s']:.1f} s (max_iter 1: {f['max_iter_1_s']:.1f} s, "
          f"3: {f['max_iter_3_s']:.1f} s; preprocess {f['preprocess_s']:.1f} s)")
    c = res["cache"]
    print(f"  preprocess through the cache:    miss {c['miss']['input_s'] + c['miss']['preprocess_s']:.1f} s, "
          f"hit {c['hit']['input_s'] + c['hit']['preprocess_s']:.1f} s, entry {c['entry_mb']:.0f} MB, "
          f"peak {c['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
