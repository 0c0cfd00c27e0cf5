"""Distributed factor updates (issue 28): graph per iteration, per-process peaks, time per spot.

Each mode runs in its own subprocess (its own peak RSS, ``VmHWM``), on the same zarr store
(random CSR, ``--density`` non-zeros, written block by block), ``--iters`` iterations at
``tol=0`` of ``--reps`` factorizations of rank ``--rank``:

``memory``   fit_batch on the whole CSR in memory (the baseline)
``threads``  the chunked path on Dask's local threads
``cluster``  the chunked path on a ``LocalCluster(n_workers=2, threads_per_worker=1)``;
             the driver's and each worker's ``VmHWM`` read before the cluster closes

Prints one table row per mode and the graph of every iteration (tasks, bytes) at two
spot counts on the cluster. BLAS threads from threadpoolctl.

    python scripts/bench_distributed.py --spots 200000 --modes memory,threads,cluster
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def vmhwm_mb(pid="self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_store(path: Path, n, m, density, chunk_rows, seed=0):
    from tardis_exp.lazy import write_zarr_chunks
    import pandas as pd

    if path.exists():
        return
    rng = np.random.default_rng(seed)

    def blocks():
        for a in range(0, n, chunk_rows):
            r = min(chunk_rows, n - a)
            B = sp.random(r, m, density=density, format="csr", dtype=np.float32, random_state=rng)
            B.data = np.log1p(rng.gamma(1.0, 2.0, B.nnz)).astype(np.float32)
            yield B

    write_zarr_chunks(path, blocks(), pd.DataFrame(index=[str(i) for i in range(n)]),
                      pd.DataFrame(index=[f"g{j}" for j in range(m)]))


def run_mode(a):
    from threadpoolctl import threadpool_info

    from tardis_exp import chunked
    from tardis_exp.lazy import read_lazy, spill
    from tardis_exp.nmf import fit_batch

    blas = [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()
            if i["user_api"] == "blas"]
    out = {"mode": a.mode, "blas": blas}
    kw = dict(max_iter=a.iters, tol=0, solver=a.solver, warn=False)
    ranks, seeds = [a.rank] * a.reps, list(range(a.reps))
    X = read_lazy(a.store, chunk_rows=a.chunk_rows).X
    if a.mode == "memory":
        X = sp.vstack([b.compute() for b in X.to_delayed().ravel()], format="csr")
        fit_batch(X, ranks[:1], seeds[:1], **{**kw, "max_iter": 1})  # compile the kernels: not timed
        t = time.perf_counter()
        fit_batch(X, ranks, seeds, **kw)
        out["seconds"] = time.perf_counter() - t
        out["driver_mb"] = vmhwm_mb()
        return out
    client = cluster = None
    if a.mode == "cluster":
        import distributed

        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None, memory_limit=None)
        client = distributed.Client(cluster)
    C = chunked.ChunkedMatrix(spill(X))
    chunked.GRAPHS = chunked.GraphLog()
    fit_batch(C, ranks[:1], seeds[:1], **{**kw, "max_iter": 1})  # compile the kernels (on the workers too)
    chunked.GRAPHS = chunked.GraphLog()
    if a.profile:
        profile_chunk(C, a)  # once to compile, once timed
        out["profile"] = profile_chunk(C, a)
    t = time.perf_counter()
    res = fit_batch(C, ranks, seeds, gather_W=False, **kw)
    out["seconds"] = time.perf_counter() - t
    it = [g for g in chunked.GRAPHS.graphs if g[0] == "iteration"]
    out["graph"] = it[-1][1:] if it else None
    del res
    out["driver_mb"] = vmhwm_mb()
    if client is not None:
        out["workers_mb"] = sorted(client.run(lambda: vmhwm_mb()).values())
        client.close()
        cluster.close()
    return out


def profile_chunk(C, a):
    """Where one chunk's task spends its time (this process, BLAS/numba threads as set)."""
    import dask

    from tardis_exp.chunked import _bxht, _bxtw, _block
    from tardis_exp._kernels import gram, mu_update

    K = a.rank * a.reps
    t = time.perf_counter()
    b = _block(dask.compute(C._blocks[0], scheduler="sync")[0])
    read = time.perf_counter() - t
    rng = np.random.default_rng(0)
    H = rng.random((K, C.shape[1]), dtype=np.float32)
    W = rng.random((b.shape[0], K), dtype=np.float32)
    t = time.perf_counter()
    A = _bxht(b, np.ascontiguousarray(H.T))
    xht = time.perf_counter() - t
    G = np.stack([H[r * a.rank:(r + 1) * a.rank] @ H[r * a.rank:(r + 1) * a.rank].T for r in range(a.reps)])
    starts = np.arange(0, K, a.rank)
    t = time.perf_counter()
    mu_update(W, A, G, starts, np.full(a.reps, a.rank), np.finfo(np.float32).eps)
    upd = time.perf_counter() - t
    t = time.perf_counter()
    _bxtw(b, W)
    xtw = time.perf_counter() - t
    t = time.perf_counter()
    gram(W)
    g = time.perf_counter() - t
    _bxtw(b, W)  # the OpenMP threads of numba's kernel spinning, as in the chunk task before the fix
    t = time.perf_counter()
    W.T @ W
    blas_gram = time.perf_counter() - t
    return {"rows": b.shape[0], "read_s": read, "xht_s": xht, "update_s": upd, "xtw_s": xtw, "gram_s": g,
            "blas_gram_after_numba_s": blas_gram}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spots", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--chunk-rows", type=int, default=50_000)
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--solver", default="hals")
    p.add_argument("--modes", default="memory,threads,cluster")
    p.add_argument("--repeat", type=int, default=1, help="run the modes this many times, alternating")
    p.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"))
    p.add_argument("--profile", action="store_true")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        print("RESULT " + json.dumps(run_mode(a)), flush=True)
        return
    store = Path(a.workdir) / f"bench-dist-{a.spots}x{a.genes}-{a.density}-{a.chunk_rows}.zarr"
    make_store(store, a.spots, a.genes, a.density, a.chunk_rows)
    passed = []  # the options forwarded to each mode's process (not --modes / --repeat)
    skip = False
    for x in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if x in ("--modes", "--repeat"):
            skip = True
            continue
        if not x.startswith(("--modes=", "--repeat=")):
            passed.append(x)
    rows = []
    for _ in range(a.repeat):
        for mode in a.modes.split(","):
            load = os.getloadavg()[0]
            r = subprocess.run([sys.executable, __file__, "--mode", mode, "--store", str(store)] + passed,
                               capture_output=True, text=True)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                sys.exit(f"{mode} failed:\n{r.stderr[-3000:]}")
            rows.append({**json.loads(line[0][7:]), "load": load})
    print(f"{a.spots} spots x {a.genes} genes, density {a.density}, chunks of {a.chunk_rows}, "
          f"{a.reps} x rank {a.rank} ({a.solver}), {a.iters} iterations; BLAS {rows[0]['blas']}")
    print("| mode | load | seconds | s per iteration per 1,000 spots | vs memory | driver peak MB | workers peak MB "
          "| tasks / bytes per iteration |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for r in rows:
        if r["mode"] == "memory":
            base = r["seconds"]  # the ratio is to the latest in-memory run before it
        per = r["seconds"] / a.iters / a.spots * 1000
        ratio = f"{r['seconds'] / base:.2f}" if base else "-"
        wk = " + ".join(f"{w:.0f}" for w in r.get("workers_mb", [])) or "-"
        g = r.get("graph")
        print(f"| {r['mode']} | {r['load']:.1f} | {r['seconds']:.1f} | {per:.4f} | {ratio} | {r['driver_mb']:.0f} | "
              f"{wk} | {'-' if not g else f'{g[0]} / {g[1]:,}'} |")
        if "profile" in r:
            print("  profile of one chunk:", {k: round(v, 3) for k, v in r["profile"].items()})


if __name__ == "__main__":
    main()
