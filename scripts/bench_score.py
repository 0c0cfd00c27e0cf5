"""Score stage: all programs in one pass (score_gene_sets) vs sc.tl.score_genes once per program.

Same process, same preprocessed data, same gene sets (the top genes of the true programs'
spectra), alternating order, median of ``--repeats``; checks the two agree. Usage::

    python scripts/bench_score.py                    # default data (3,600 x 2,000 HVGs)
    python scripts/bench_score.py --spots 100000     # larger synthetic set
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spots", type=int, default=3600)
    ap.add_argument("--genes", type=int, default=3000)
    ap.add_argument("--programs", type=int, default=6)
    ap.add_argument("--n-genes", type=int, default=50, help="genes per program (score.n_cluster_genes)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()

    import scanpy as sc
    from threadpoolctl import threadpool_info

    from tardis_exp.preprocess import preprocess
    from tardis_exp.score import score_gene_sets, top_genes_table
    from tardis_exp.synthetic import make_synthetic

    adata = preprocess(make_synthetic(n_spots=a.spots, n_genes=a.genes, n_programs=a.programs, seed=0))
    spectra = np.asarray(adata.varm["true_programs"]).T
    table = top_genes_table(spectra, adata.var_names, a.n_genes)
    sets = [table.loc[table.program == p, "gene"].tolist() for p in range(spectra.shape[0])]

    def scanpy_loop():
        out = np.empty((adata.n_obs, len(sets)))
        for p, genes in enumerate(sets):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sc.tl.score_genes(adata, genes, ctrl_size=50, random_state=0, use_raw=False, score_name="_s")
            out[:, p] = adata.obs.pop("_s").to_numpy()
        return out

    def ours():
        return score_gene_sets(adata, sets, ctrl_size=50, random_state=0)

    times = {"scanpy_per_program": [], "score_gene_sets": []}
    results = {}
    for r in range(a.repeats):
        order = list(times) if r % 2 == 0 else list(times)[::-1]
        for name in order:
            t0 = time.perf_counter()
            results[name] = (scanpy_loop if name == "scanpy_per_program" else ours)()
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    report = {
        "shape": list(adata.shape), "nnz_fraction": round(adata.X.nnz / np.prod(adata.shape), 3),
        "programs": len(sets), "median_s": {k: round(v, 4) for k, v in med.items()},
        "speedup": round(med["scanpy_per_program"] / med["score_gene_sets"], 2),
        "max_abs_diff": float(np.abs(results["scanpy_per_program"] - results["score_gene_sets"]).max()),
        "blas": [{k: d.get(k) for k in ("internal_api", "num_threads")} for d in threadpool_info()],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
