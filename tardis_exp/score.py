"""Stage 4, score: top genes per meta-program, per-spot program scores, quality metrics.

Reads ``uns['nmf_consensus']['spectra']`` (the aggregated loadings of each program's
member components) and writes

``obs['nmf_cluster_{i}']``
    z-scored ``sc.tl.score_genes`` score of program ``i`` (the seed's keys),
``obs['nmf_cluster']``
    categorical argmax over those scores (the seed's tutorial),
``uns['nmf_programs']``
    table of the top genes: program, rank, gene, loading, specificity,
``uns['nmf_metrics']``
    silhouette, Moran's I per program, and with ground truth ARI and program recovery.
"""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from .errors import InputError, check_choice, check_int
from .metrics import program_recovery, spatial_graph

log = logging.getLogger(__name__)

RANKINGS = ("specific", "loading")


def check_params(*, n_cluster_genes=50, gene_ranking="specific", ctrl_size=50, n_spatial_neighbors=6,
                 silhouette_max_spots=5000, **_):
    """Validate score parameters before any compute."""
    check_int(n_cluster_genes, "score.n_cluster_genes", minimum=1)
    check_choice(gene_ranking, "score.gene_ranking", RANKINGS)
    check_int(ctrl_size, "score.ctrl_size", minimum=1)
    check_int(n_spatial_neighbors, "score.n_spatial_neighbors", minimum=1)
    check_int(silhouette_max_spots, "score.silhouette_max_spots", minimum=2)


def rank_genes(spectra: np.ndarray, ranking: str = "specific") -> np.ndarray:
    """Gene ranking score per program (programs x genes); higher is better.

    ``specific`` weighs each loading by the program's share of that gene's total loading,
    so genes loaded on every program (housekeeping, library size) do not top every list.
    """
    S = np.asarray(spectra, dtype=np.float64)
    if ranking == "loading":
        return S
    share = S / np.where(S.sum(0, keepdims=True) > 0, S.sum(0, keepdims=True), 1)
    return S * share


def top_genes_table(spectra, var_names, n_genes=50, ranking="specific") -> pd.DataFrame:
    """The ``n_genes`` best genes of each program, best first."""
    score = rank_genes(spectra, ranking)
    share = score / np.where(spectra > 0, spectra, 1)
    rows = []
    n = min(n_genes, score.shape[1])
    for p in range(score.shape[0]):
        order = np.argsort(-score[p], kind="stable")[:n]
        for r, g in enumerate(order):
            rows.append((p, r, var_names[g], float(spectra[p, g]), float(share[p, g]), float(score[p, g])))
    return pd.DataFrame(rows, columns=["program", "rank", "gene", "loading", "specificity", "score"])


def score(
    adata: ad.AnnData,
    *,
    n_cluster_genes: int = 50,
    gene_ranking: str = "specific",
    ctrl_size: int = 50,
    random_state: int = 0,
    spatial_key: str = "spatial",
    n_spatial_neighbors: int = 6,
    truth_key: str = "true_domain",
    silhouette_max_spots: int = 5000,
    copy: bool = False,
) -> ad.AnnData | None:
    """Score every spot for every consensus program.

    Parameters
    ----------
    adata
        Output of the consensus stage (``uns['nmf_consensus']``).
    n_cluster_genes
        Top genes per program used for scoring.
    gene_ranking
        ``'specific'`` (loading x share of the gene's loading) or ``'loading'``.
    ctrl_size, random_state
        Passed to ``sc.tl.score_genes``.
    spatial_key
        ``obsm`` key of spot coordinates; Moran's I is computed when present.
    n_spatial_neighbors
        Neighbours in the spatial kNN graph.
    truth_key
        ``obs`` column of true labels; ARI is computed when present.
    silhouette_max_spots
        Silhouette on a seeded subsample of at most this many spots.
    copy
        Return a modified copy instead of writing into ``adata``.
    """
    check_params(n_cluster_genes=n_cluster_genes, gene_ranking=gene_ranking, ctrl_size=ctrl_size,
                 n_spatial_neighbors=n_spatial_neighbors, silhouette_max_spots=silhouette_max_spots)
    if "nmf_consensus" not in adata.uns:
        raise InputError("score needs uns['nmf_consensus']: run the consensus stage first")
    adata = adata.copy() if copy else adata
    spectra = np.asarray(adata.uns["nmf_consensus"]["spectra"])
    K = spectra.shape[0]
    table = top_genes_table(spectra, adata.var_names, n_cluster_genes, gene_ranking)

    z = np.zeros((adata.n_obs, K))
    for p in range(K):
        genes = table.loc[table.program == p, "gene"].tolist()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.tl.score_genes(adata, genes, ctrl_size=ctrl_size, random_state=random_state,
                              score_name="_nmf_score", use_raw=False)
        s = adata.obs.pop("_nmf_score").to_numpy(dtype=np.float64)
        sd = s.std()
        z[:, p] = (s - s.mean()) / (sd if sd > 0 else 1)
        adata.obs[f"nmf_cluster_{p}"] = z[:, p]
    cats = [str(p) for p in range(K)]
    adata.obs["nmf_cluster"] = pd.Categorical.from_codes(z.argmax(1), categories=cats)
    adata.uns["nmf_programs"] = table

    metrics = _metrics(adata, z, spatial_key, n_spatial_neighbors, truth_key, silhouette_max_spots,
                       random_state, spectra, n_cluster_genes, gene_ranking)
    adata.uns["nmf_metrics"] = metrics
    log.info("score: %d programs; %s", K, {k: v for k, v in metrics.items() if np.isscalar(v)})
    return adata if copy else None


def _metrics(adata, z, spatial_key, n_nb, truth_key, max_spots, seed, spectra, n_genes, ranking):
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    out: dict = {}
    labels = adata.obs["nmf_cluster"].cat.codes.to_numpy()
    U = adata.obsm.get("X_nmf_consensus")
    if U is not None and len(np.unique(labels)) > 1:
        Un = U / np.maximum(U.sum(1, keepdims=True), 1e-12)
        rng = np.random.default_rng(seed)
        idx = rng.choice(adata.n_obs, size=min(max_spots, adata.n_obs), replace=False)
        if len(np.unique(labels[idx])) > 1:
            out["silhouette"] = float(silhouette_score(Un[idx], labels[idx]))
    if spatial_key in adata.obsm:
        G = spatial_graph(np.asarray(adata.obsm[spatial_key]), n_nb)
        mi = np.atleast_1d(sc.metrics.morans_i(G, z.T))
        out["morans_i"] = np.asarray(mi, dtype=np.float64)
        out["morans_i_mean"] = float(np.nanmean(mi))
    if truth_key in adata.obs:
        truth = adata.obs[truth_key].astype(str).to_numpy()
        out["ari_truth"] = float(adjusted_rand_score(truth, labels))
    if "true_program" in adata.var:
        rec, match = program_recovery(spectra, adata.var["true_program"].astype(str).to_numpy(),
                                      n_genes=n_genes, ranking=ranking)
        out["program_recovery"] = rec
        out["program_match"] = match
    return out
