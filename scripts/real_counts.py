"""The default run on real 10x counts beside scanpy's Leiden clusters of the same cells.

The counts: ``tests/_data/10x-10k-subset.zarr`` (10,000 cells x 1,000 genes) from scanpy's
source distribution. Fetched with ``pip download scanpy==<installed> --no-binary :all:
--no-deps`` into ``--cache`` (the package registry must be reachable; offline, the script
says so and exits 0 without a table). Note: its genes are mouse Ensembl ids (ENSMUSG) in
genome order, the first 1,000 of chromosome 1 -- not a PBMC panel nor highly variable genes.

    pip install "igraph>=0.10.8"   # Leiden (scanpy 1.11's flavor="igraph"); not a dependency
    python scripts/real_counts.py [--cache /tmp/scanpy_sdist] [--resolutions 1.0 0.5]

One factorization with the tardis_exp defaults (``preprocess.make_unique=true``), its consensus
with the default (adaptive) outlier filter and with ``consensus.outlier_adaptive=false``: the
kept fraction and threshold, the K range searched, K, runner-up, margin; beside them scanpy's
standard workflow on the same cells (normalize_total, log1p, 2,000 HVG capped at the genes, pca 50,
a symmetrized 15-NN graph, Leiden at each resolution): its number of clusters and the ARI between
``nmf_program`` and the Leiden clusters.
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


def leiden_clusters(raw, obs_names, resolutions) -> dict:
    """scanpy's standard workflow on the same cells: normalize_total, log1p, 2,000 HVG (capped at
    the genes), pca 50, a 15-NN graph, Leiden (igraph) at each resolution."""
    import scanpy as sc
    from sklearn.neighbors import kneighbors_graph

    s = raw[obs_names].copy()
    sc.pp.normalize_total(s, target_sum=1e4)
    sc.pp.log1p(s)
    sc.pp.highly_variable_genes(s, n_top_genes=min(2000, s.n_vars))
    sc.pp.pca(s, n_comps=50, random_state=0)
    # the 15-nearest-neighbour graph on the PCs (sklearn, symmetrized connectivities) instead of
    # sc.pp.neighbors: with scanpy 1.11.5 and scipy 1.17.1 it fails on these 10,000 cells
    # (AttributeError: 'csr_array' object has no attribute 'getnnz', scanpy/neighbors/_common.py);
    # on pbmc68k_reduced's 700 cells it runs
    g = kneighbors_graph(s.obsm["X_pca"], 15, mode="connectivity")
    adjacency = g.maximum(g.T).tocsr()
    out = {}
    for r in resolutions:
        sc.tl.leiden(s, resolution=r, random_state=0, flavor="igraph", n_iterations=2, directed=False,
                     adjacency=adjacency, key_added="leiden")
        out[r] = s.obs["leiden"].astype(str).to_numpy()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/scanpy_sdist"))
    ap.add_argument("--resolutions", type=float, nargs="+", default=[1.0, 0.5])
    a = ap.parse_args(argv)
    try:
        import igraph  # noqa: F401 -- sc.tl.leiden(flavor="igraph") needs it
    except ImportError:
        print('skipped: Leiden needs the igraph package (scanpy 1.11 asks igraph>=0.10.8): '
              'pip install "igraph>=0.10.8"')
        return 0
    store = locate(a.cache)
    if store is None:
        return 0
    import os
    import platform
    import time

    import anndata as ad
    from sklearn.metrics import adjusted_rand_score
    from threadpoolctl import threadpool_info

    from tardis_exp.consensus import consensus
    from tardis_exp.factorize import factorize
    from tardis_exp.preprocess import preprocess
    from tardis_exp.score import score

    warnings.filterwarnings("ignore")
    raw = ad.read_zarr(store)
    raw.var_names_make_unique()  # preprocess.make_unique=true
    t0 = time.perf_counter()
    x = preprocess(raw.copy())
    factorize(x, progress=False)
    t_fact = time.perf_counter() - t0
    runs = {}
    for name, adaptive in (("default (adaptive filter)", True), ("outlier_adaptive=false (fixed 0.35)", False)):
        y = x.copy()
        t0 = time.perf_counter()
        consensus(y, outlier_adaptive=adaptive, progress=False)
        score(y)
        runs[name] = (y, time.perf_counter() - t0)
    leiden = leiden_clusters(raw, x.obs_names, a.resolutions)
    blas = sorted({(i["internal_api"], i["num_threads"]) for i in threadpool_info()})
    print(f"data: {store} ({raw.n_obs} cells x {raw.n_vars} genes; preprocessed {x.n_obs} x {x.n_vars})")
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())
    print(f"machine: {cpu}, {os.cpu_count()} CPUs; thread pools {blas}; "
          f"preprocess + factorize {t_fact:.0f} s")
    res = " | ".join(f"Leiden {r:g}: clusters, ARI" for r in a.resolutions)
    print(f"| filter | kept | threshold | K range | K | runner-up | margin | {res} | consensus + score s |")
    print("|---" * (8 + len(a.resolutions)) + "|")
    for name, (y, secs) in runs.items():
        c = y.uns["nmf_consensus"]
        ks = [int(k) for k in c["k_values"]]
        prog = y.obs["nmf_program"].astype(str).to_numpy()
        cells = " | ".join(f"{len(set(lab))}, {adjusted_rand_score(lab, prog):.2f}" for lab in leiden.values())
        print(f"| {name} | {c['n_items']}/{c['n_items'] + c['n_outliers']} ({c['kept_fraction']:.2f}) | "
              f"{c['outlier_threshold_used']:.2f} | {min(ks)}..{max(ks)} | {c['best_k']} | {c['runner_up_k']} | "
              f"{c['k_margin']:.2f} | {cells} | {secs:.0f} |")
    # the local densities (mean distance to the nearest components) the filter reads
    import numpy as np

    y = next(iter(runs.values()))[0]
    c = y.uns["nmf_consensus"]
    dens, rec = np.asarray(c["item_density"]), np.asarray(c["item_recurs"], bool)
    q = lambda v: "/".join(f"{x:.2f}" for x in np.quantile(v, [0.1, 0.5, 0.9])) if len(v) else "-"
    print(f"local density (10th/50th/90th percentile): {int(rec.sum())} recurring components {q(dens[rec])}; "
          f"{int((~rec).sum())} others {q(dens[~rec])}")
    # where each program's cells fall among the Leiden clusters at the first resolution
    first = a.resolutions[0]
    for name, (y, _) in runs.items():
        prog = y.obs["nmf_program"].astype(str).to_numpy()
        parts = []
        for p in sorted(set(prog), key=lambda v: (len(v), v)):
            cells = leiden[first][prog == p]
            top, n = max(((c, int((cells == c).sum())) for c in set(cells)), key=lambda t: t[1])
            parts.append(f"{p}: {len(cells)} cells, {n / len(cells):.0%} in Leiden {top}")
        print(f"{name}, programs vs Leiden {first:g}: " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
