"""The default run on real 10x counts beside scanpy's Leiden clusters of the same cells.

The counts: ``tests/_data/10x-10k-subset.zarr`` (10,000 cells x 1,000 genes) from scanpy's
source distribution. Fetched with ``pip download scanpy==<installed> --no-binary :all:
--no-deps`` into ``--cache`` (the package registry must be reachable; offline, the script
says so and exits 0 without a table). Note: its genes are mouse Ensembl ids (ENSMUSG) in
genome order, the first 1,000 of chromosome 1 -- not a PBMC panel nor highly variable genes.

    python scripts/real_counts.py [--cache /tmp/scanpy_sdist] [--resolution 1.0] [--fixed-filter]

Prints, for the tardis_exp defaults (``preprocess.make_unique=true``): the outlier filter's kept
fraction and threshold, K, runner-up, margin, the K range searched; scanpy's standard workflow
(normalize_total, log1p, 2,000 HVG capped at the genes, pca 50, a symmetrized 15-NN graph, leiden at
``--resolution``) and the ARI between ``nmf_program`` and the Leiden clusters.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

SUBSET = "tests/_data/10x-10k-subset.zarr"


def locate(cache: Path) -> Path | None:
    version = importlib.metadata.version("scanpy")
    root = cache / f"scanpy-{version}"
    store = root / SUBSET
    if store.is_dir():
        return store
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"scanpy-{version}.tar.gz"
    if not sdist.is_file():
        p = subprocess.run([sys.executable, "-m", "pip", "download", f"scanpy=={version}", "--no-binary", ":all:",
                            "--no-deps", "-d", str(cache)], capture_output=True, text=True)
        if p.returncode != 0 or not sdist.is_file():
            print(f"skipped: could not download scanpy {version}'s sdist (offline?): "
                  f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
            return None
    with tarfile.open(sdist) as t:
        t.extractall(cache, members=[m for m in t.getmembers() if f"/{SUBSET}" in m.name], filter="data")
    return store if store.is_dir() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/scanpy_sdist"))
    ap.add_argument("--resolution", type=float, default=1.0)
    ap.add_argument("--fixed-filter", action="store_true", help="consensus.outlier_adaptive=false (the old filter)")
    a = ap.parse_args(argv)
    store = locate(a.cache)
    if store is None:
        return 0
    import anndata as ad
    import numpy as np
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    from tardis_exp.consensus import consensus
    from tardis_exp.factorize import factorize
    from tardis_exp.preprocess import preprocess
    from tardis_exp.score import score

    warnings.filterwarnings("ignore")
    raw = ad.read_zarr(store)
    raw.var_names_make_unique()  # preprocess.make_unique=true
    x = preprocess(raw.copy())
    factorize(x, progress=False)
    consensus(x, outlier_adaptive=not a.fixed_filter, progress=False)
    score(x)
    c = x.uns["nmf_consensus"]
    # scanpy's standard workflow on the same cells
    s = raw[x.obs_names].copy()
    sc.pp.normalize_total(s, target_sum=1e4)
    sc.pp.log1p(s)
    sc.pp.highly_variable_genes(s, n_top_genes=min(2000, s.n_vars))
    sc.pp.pca(s, n_comps=50, random_state=0)
    # the 15-nearest-neighbour graph on the PCs (sklearn, symmetrized): sc.pp.neighbors of scanpy
    # 1.11.5 fails on scipy 1.17's csr_array (no getnnz)
    from sklearn.neighbors import kneighbors_graph

    g = kneighbors_graph(s.obsm["X_pca"], 15, mode="connectivity")
    sc.tl.leiden(s, resolution=a.resolution, random_state=0, flavor="igraph", n_iterations=2, directed=False,
                 adjacency=g.maximum(g.T).tocsr())
    ari = adjusted_rand_score(s.obs["leiden"], x.obs["nmf_program"].astype(str))
    ks = np.asarray(c["k_values"])
    print(f"data: {store} ({raw.n_obs} cells x {raw.n_vars} genes; preprocessed {x.n_obs} x {x.n_vars})")
    print("| filter | kept | threshold | K range | K | runner-up | margin | Leiden clusters (res) | ARI nmf_program vs Leiden |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {'fixed' if a.fixed_filter else 'adaptive'} | {c['n_items']}/{c['n_items'] + c['n_outliers']} "
          f"({c['kept_fraction']:.2f}) | {c['outlier_threshold_used']:.2f} | {ks.min()}..{ks.max()} | {c['best_k']} | "
          f"{c['runner_up_k']} | {c['k_margin']:.2f} | {s.obs['leiden'].nunique()} ({a.resolution:g}) | {ari:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
