"""The solver's two fat products, every method side by side: X @ H.T and X.T @ W.

For each matrix and product width K, in one process on the same arrays: scipy's sparse @
dense (the reference), the numba CSR kernels, dense chunks + sgemm, and one dense copy +
sgemm (``tardis_exp._kernels.SparseProducts`` methods), median of ``--repeats`` calls after
a warm-up call, alternating the order. Reports seconds, GFLOP/s counting the multiply-adds
on stored entries (2·nnz·K, "useful") and, for the dense methods, all of them (2·n·m·K,
"executed"), the method ``auto`` picks, and the measured sgemm peak (4096³ float32) in the
same process. The 3,600-spot matrix is the default pipeline's log-normalized HVG matrix;
the others are random CSR of the given density (the kernels see only shape and density).
Usage::

    python scripts/bench_kernels.py
    python scripts/bench_kernels.py --json docs/bench_kernels.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import scipy.sparse as sp

CASES = [  # (name, n, m, density or None for the default data, K values)
    ("default data", 3600, 2000, None, (100, 1000)),
    ("20,000 spots", 20_000, 2000, 0.14, (100, 1000)),
    ("200,000 spots", 200_000, 2000, 0.10, (100,)),
]
METHODS = ("scipy", "csr", "dense-chunks", "dense")


def sgemm_peak(size: int = 4096, repeats: int = 3) -> float:
    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matrix(n, m, density):
    if density is None:
        from tardis_exp.nmf import prepare_matrix
        from tardis_exp.preprocess import preprocess
        from tardis_exp.synthetic import make_synthetic

        return prepare_matrix(preprocess(make_synthetic(seed=0)).X)
    X = sp.random(n, m, density=density, format="csr", dtype=np.float32, random_state=np.random.default_rng(1))
    X.sort_indices()
    return X


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from threadpoolctl import threadpool_info

    from tardis_exp._kernels import DENSE_COPY_MAX_BYTES, SparseProducts

    peak = sgemm_peak()
    rows = []
    for name, n, m, density, ks in CASES:
        X = matrix(n, m, density)
        n, m = X.shape
        nnz_frac = X.nnz / (n * m)
        auto = SparseProducts(X)
        prods = {meth: SparseProducts(X, meth) for meth in METHODS
                 if not (meth == "dense" and 4 * n * m > DENSE_COPY_MAX_BYTES)}
        rng = np.random.default_rng(2)
        for K in ks:
            H = rng.random((K, m), dtype=np.float32)
            W = rng.random((n, K), dtype=np.float32)
            for prod, arg in (("X@H.T", H), ("X.T@W", W)):
                times = {meth: [] for meth in prods}
                ref = None
                for meth, p in prods.items():  # warm-up (numba compile, buffers) + check
                    out = p.xht(arg) if prod == "X@H.T" else p.xtw(arg)
                    ref = out if ref is None else ref
                    np.testing.assert_allclose(out, ref, rtol=2e-3, atol=1e-2 * float(np.abs(ref).max()))
                for r in range(a.repeats):
                    order = list(prods) if r % 2 == 0 else list(prods)[::-1]
                    for meth in order:
                        p = prods[meth]
                        times[meth].append(_timed(lambda: p.xht(arg) if prod == "X@H.T" else p.xtw(arg)))
                for meth, ts in times.items():
                    t = float(np.median(ts))
                    dense = meth in ("dense-chunks", "dense")
                    rows.append({"matrix": name, "shape": f"{n}x{m}", "nnz_fraction": round(nnz_frac, 3), "K": K,
                                 "product": prod, "method": meth, "seconds": round(t, 4),
                                 "useful_gflops": round(2 * X.nnz * K / t / 1e9, 1),
                                 "executed_gflops": round((2 * n * m * K if dense else 2 * X.nnz * K) / t / 1e9, 1),
                                 "auto_picks": auto.method_for(K) == meth})
                print(json.dumps(rows[-len(times):]), flush=True)
    report = {"sgemm_peak_gflops": round(peak, 1), "rows": rows,
              "blas": [{k: d.get(k) for k in ("internal_api", "num_threads", "architecture")} for d in threadpool_info()]}
    print("\n| matrix | nnz | K | product | " + " | ".join(METHODS) + " | auto picks |")
    print("|---|---|---|---|" + "---|" * len(METHODS) + "---|")
    keyed = {}
    for r in rows:
        keyed.setdefault((r["matrix"], r["nnz_fraction"], r["K"], r["product"]), {})[r["method"]] = r
    for (mat, nz, K, prod), by in keyed.items():
        cells = []
        for meth in METHODS:
            r = by.get(meth)
            cells.append("–" if r is None else f"{r['seconds']:.3f} s ({r['useful_gflops']:.0f})")
        pick = next((meth for meth, r in by.items() if r["auto_picks"]), "?")
        print(f"| {mat} | {nz:.0%} | {K} | `{prod}` | " + " | ".join(cells) + f" | {pick} |")
    print(f"\nsgemm peak {peak:.1f} GFLOP/s; cells: median seconds (useful GFLOP/s = 2·nnz·K / s); "
          f"BLAS {report['blas']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
