"""The data loaders (``data=`` config group) on real files written here in each format's layout.

Every fixture is a real file: a 10x Genomics v3 HDF5 matrix written with h5py in Cell
Ranger's layout, a 10x matrix folder (MatrixMarket + gzipped TSVs), a Space Ranger folder
(HDF5 + ``spatial/``), an ``.h5ad``, and scanpy's bundled pbmc68k. Each is read through
:func:`tardis_exp.data.load_data` and compared with the values written.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from tardis_exp.data import check_data, digest, load_data
from tardis_exp.errors import ConfigError, InputError

N_CELLS, N_GENES = 40, 25


def _truth(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(1.5, size=(N_CELLS, N_GENES)).astype(np.int64)
    X[rng.random(X.shape) < 0.4] = 0
    barcodes = [f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(N_CELLS)]
    ids = [f"ENSG{j:011d}" for j in range(N_GENES)]
    names = [f"GENE{j}" for j in range(N_GENES)]
    return X, barcodes, ids, names


def write_10x_h5(path: Path, X, barcodes, ids, names, feature_types=None, genome="GRCh38",
                 library_id="lib_A") -> None:
    """Cell Ranger v3 ``filtered_feature_bc_matrix.h5``: features x barcodes, CSC."""
    m = sp.csc_matrix(np.asarray(X).T)  # genes x cells, columns (cells) compressed
    ft = feature_types or ["Gene Expression"] * len(ids)
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["library_ids"] = np.array([library_id.encode()])
        f.attrs["chemistry_description"] = "Spatial 3' v1"
        f.attrs["software_version"] = "spaceranger-2.0.0"
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array([b.encode() for b in barcodes]))
        g.create_dataset("data", data=m.data.astype(np.int32))
        g.create_dataset("indices", data=m.indices.astype(np.int64))
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array(m.shape, dtype=np.int32))
        feat = g.create_group("features")
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        feat.create_dataset("id", data=np.array([i.encode() for i in ids]))
        feat.create_dataset("name", data=np.array([n.encode() for n in names]))
        feat.create_dataset("feature_type", data=np.array([t.encode() for t in ft]))
        feat.create_dataset("genome", data=np.array([genome.encode()] * len(ids)))


def test_tenx_h5(tmp_path):
    X, bc, ids, names = _truth()
    # one antibody-capture feature: read_10x_h5 keeps gene expression only
    ft = ["Gene Expression"] * (N_GENES - 1) + ["Antibody Capture"]
    p = tmp_path / "filtered_feature_bc_matrix.h5"
    write_10x_h5(p, X, bc, ids, names, feature_types=ft)
    a = load_data({"source": "tenx_h5", "path": str(p), "genome": None})
    assert a.shape == (N_CELLS, N_GENES - 1)
    assert list(a.obs_names) == bc
    assert list(a.var_names) == names[:-1]
    assert list(a.var["gene_ids"]) == ids[:-1]
    np.testing.assert_array_equal(a.X.toarray(), X[:, :-1])
    assert set(a.var["genome"]) == {"GRCh38"}


def test_tenx_h5_genome_filter(tmp_path):
    X, bc, ids, names = _truth()
    p = tmp_path / "m.h5"
    write_10x_h5(p, X, bc, ids, names, genome="mm10")
    assert load_data({"source": "tenx_h5", "path": str(p), "genome": "mm10"}).n_vars == N_GENES
    with pytest.raises(InputError, match=r"cannot read .*data=tenx_h5.*GRCh38"):
        load_data({"source": "tenx_h5", "path": str(p), "genome": "GRCh38"})


@pytest.mark.parametrize("genome", [None, "mm10"])
def test_tenx_h5_dask_equals_in_memory(tmp_path, genome):
    """data.backend=dask reads a 10x HDF5 file in row chunks straight from the file: the same
    AnnData as scanpy's reader (names, var columns, dtype, every value), never built whole."""
    pytest.importorskip("dask.array")
    from tardis_exp.chunked import is_dask

    X, bc, ids, names = _truth()
    ft = ["Gene Expression"] * (N_GENES - 2) + ["Antibody Capture"] * 2
    p = tmp_path / "filtered_feature_bc_matrix.h5"
    write_10x_h5(p, X, bc, ids, names, feature_types=ft, genome="mm10")
    cfg = {"source": "tenx_h5", "path": str(p), "genome": genome}
    ref = load_data(cfg)
    got = load_data({**cfg, "backend": "dask", "chunk_rows": 7})  # 40 spots: 5 chunks of 7 and one of 5
    assert is_dask(got.X) and got.X.chunks[0] == (7, 7, 7, 7, 7, 5) and sp.issparse(got.X._meta)
    Xg = got.X.compute()
    assert Xg.dtype == ref.X.dtype == np.float32 and Xg.shape == (N_CELLS, N_GENES - 2)
    np.testing.assert_array_equal(Xg.toarray(), X[:, :-2])  # the counts written, ground truth
    np.testing.assert_array_equal(Xg.toarray(), ref.X.toarray())
    pd.testing.assert_frame_equal(got.obs, ref.obs)
    pd.testing.assert_frame_equal(got.var, ref.var)
    with pytest.raises(InputError, match=r"data.genome='GRCh38' is not in .*\['mm10'\]"):
        load_data({**cfg, "genome": "GRCh38", "backend": "dask"})


def test_tenx_h5_dask_refuses_the_legacy_layout(tmp_path):
    pytest.importorskip("dask.array")
    p = tmp_path / "v2.h5"
    with h5py.File(p, "w") as f:
        f.create_group("GRCh38").create_dataset("data", data=np.ones(3, np.int32))
    with pytest.raises(InputError, match="legacy .* layout, which data.backend=dask does not read"):
        load_data({"source": "tenx_h5", "path": str(p), "backend": "dask", "chunk_rows": 10})


def _gz(src: Path, dst: Path) -> None:
    with open(src, "rb") as fi, gzip.open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo)
    src.unlink()


def write_10x_mtx(folder: Path, X, barcodes, ids, names) -> None:
    """Cell Ranger v3 matrix folder: matrix.mtx.gz (genes x cells), features/barcodes .tsv.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.mmwrite(str(folder / "matrix.mtx"), sp.coo_matrix(np.asarray(X).T), field="integer")
    _gz(folder / "matrix.mtx", folder / "matrix.mtx.gz")
    with gzip.open(folder / "features.tsv.gz", "wt") as f:
        for i, n in zip(ids, names):
            f.write(f"{i}\t{n}\tGene Expression\n")
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as f:
        f.write("\n".join(barcodes) + "\n")


@pytest.mark.parametrize("var_names", ["gene_symbols", "gene_ids"])
def test_tenx_mtx(tmp_path, var_names):
    X, bc, ids, names = _truth(1)
    write_10x_mtx(tmp_path / "filtered_feature_bc_matrix", X, bc, ids, names)
    a = load_data({"source": "tenx_mtx", "path": str(tmp_path / "filtered_feature_bc_matrix"),
                   "var_names": var_names})
    assert a.shape == (N_CELLS, N_GENES)
    assert list(a.obs_names) == bc
    assert list(a.var_names) == (names if var_names == "gene_symbols" else ids)
    Xa = a.X.toarray() if sp.issparse(a.X) else a.X
    np.testing.assert_array_equal(Xa, X)


def test_tenx_mtx_missing_file(tmp_path):
    X, bc, ids, names = _truth(1)
    d = tmp_path / "mtx"
    write_10x_mtx(d, X, bc, ids, names)
    (d / "barcodes.tsv.gz").unlink()
    with pytest.raises(InputError, match=r"cannot read .*data=tenx_mtx.*barcodes"):
        load_data({"source": "tenx_mtx", "path": str(d)})


def write_visium(folder: Path, X, barcodes, ids, names, legacy=False, images=True, seed=0):
    """A Space Ranger output folder; returns the positions table written (barcode index)."""
    rng = np.random.default_rng(seed)
    (folder / "spatial").mkdir(parents=True)
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", X, barcodes, ids, names)
    # every matrix barcode in tissue, plus out-of-tissue spots, in shuffled order
    extra = [f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(7)]
    allbc = list(barcodes) + extra
    pos = pd.DataFrame({
        "barcode": allbc,
        "in_tissue": [1] * len(barcodes) + [0] * len(extra),
        "array_row": rng.integers(0, 78, len(allbc)),
        "array_col": rng.integers(0, 128, len(allbc)),
        "pxl_row_in_fullres": rng.integers(1000, 9000, len(allbc)),
        "pxl_col_in_fullres": rng.integers(1000, 9000, len(allbc)),
    }).sample(frac=1, random_state=seed)
    if legacy:
        pos.to_csv(folder / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    else:
        pos.to_csv(folder / "spatial" / "tissue_positions.csv", index=False)
    sf = {"tissue_hires_scalef": 0.15, "tissue_lowres_scalef": 0.045, "fiducial_diameter_fullres": 144.5,
          "spot_diameter_fullres": 89.4}
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    if images:
        from matplotlib.image import imsave

        imsave(folder / "spatial" / "tissue_lowres_image.png", rng.random((6, 8, 3)))
    return pos.set_index("barcode"), sf


@pytest.mark.parametrize("legacy", [False, True])
def test_visium_folder(tmp_path, legacy):
    X, bc, ids, names = _truth(2)
    pos, sf = write_visium(tmp_path / "sample", X, bc, ids, names, legacy=legacy)
    a = load_data({"source": "visium", "path": str(tmp_path / "sample"),
                   "count_file": "filtered_feature_bc_matrix.h5"})
    assert a.shape == (N_CELLS, N_GENES) and list(a.obs_names) == bc
    np.testing.assert_array_equal(a.X.toarray(), X)
    # spot coordinates in full-resolution pixels, x (column) then y (row), per barcode
    expect = pos.loc[bc, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    np.testing.assert_array_equal(a.obsm["spatial"], expect)
    np.testing.assert_array_equal(a.obs["array_row"].to_numpy(), pos.loc[bc, "array_row"].to_numpy())
    assert (a.obs["in_tissue"] == 1).all()
    lib = a.uns["spatial"]["lib_A"]
    assert lib["scalefactors"] == sf
    assert lib["images"]["lowres"].shape[:2] == (6, 8) and "hires" not in lib["images"]
    assert lib["metadata"]["software_version"] == "spaceranger-2.0.0"


def test_visium_without_images_or_library_id(tmp_path):
    X, bc, ids, names = _truth(3)
    write_visium(tmp_path / "s2", X, bc, ids, names, images=False)
    with h5py.File(tmp_path / "s2" / "filtered_feature_bc_matrix.h5", "a") as f:
        del f.attrs["library_ids"]
    a = load_data({"source": "visium", "path": str(tmp_path / "s2")})
    assert a.uns["spatial"]["s2"]["images"] == {} and a.obsm["spatial"].shape == (N_CELLS, 2)


def test_visium_errors_name_the_file(tmp_path):
    X, bc, ids, names = _truth(4)
    pos, _ = write_visium(tmp_path / "s", X, bc, ids, names)
    posf = tmp_path / "s" / "spatial" / "tissue_positions.csv"
    pos.drop(index=bc[5]).reset_index().to_csv(posf, index=False)
    with pytest.raises(InputError, match=rf"tissue_positions.csv: no position for 1 barcodes.*{bc[5]}"):
        load_data({"source": "visium", "path": str(tmp_path / "s")})
    posf.unlink()
    with pytest.raises(InputError, match="no spatial/tissue_positions.csv"):
        load_data({"source": "visium", "path": str(tmp_path / "s")})
    with pytest.raises(InputError, match=r"has no raw_feature_bc_matrix.h5 \(data.count_file\)"):
        load_data({"source": "visium", "path": str(tmp_path / "s"), "count_file": "raw_feature_bc_matrix.h5"})


def test_h5ad_roundtrip(tmp_path):
    X, bc, ids, names = _truth(5)
    a = ad.AnnData(X=sp.csr_matrix(X.astype(np.float32)), obs=pd.DataFrame(index=bc), var=pd.DataFrame(index=names))
    a.layers["counts"] = a.X.copy()
    a.obsm["spatial"] = np.arange(2 * N_CELLS, dtype=float).reshape(-1, 2)
    p = tmp_path / "x.h5ad"
    a.write_h5ad(p)
    b = load_data({"source": "h5ad", "path": str(p)})
    np.testing.assert_array_equal(b.X.toarray(), X)
    np.testing.assert_array_equal(b.obsm["spatial"], a.obsm["spatial"])
    assert list(b.var_names) == names and "counts" in b.layers
    assert digest(b) == digest(a)


def test_pbmc68k_is_bundled_and_non_negative():
    import scanpy as sc

    a = load_data({"source": "pbmc68k"})
    ref = sc.datasets.pbmc68k_reduced()
    assert a.shape == (ref.n_obs, ref.raw.n_vars) == (700, 765)
    assert sp.issparse(a.X) and a.X.min() >= 0
    np.testing.assert_allclose(a.X.toarray(), np.asarray(ref.raw.X.todense() if sp.issparse(ref.raw.X)
                                                         else ref.raw.X), rtol=1e-6)
    assert (ref.X < 0).any()  # why .raw: X itself is scaled, negative, unusable for NMF
    assert list(a.obs["louvain"]) == list(ref.obs["louvain"])


def test_check_data_config():
    with pytest.raises(ConfigError, match=r"data.source='loom' is unknown"):
        check_data({"source": "loom"})
    with pytest.raises(ConfigError, match="data.path is required for data=visium"):
        check_data({"source": "visium", "path": "???"})
    with pytest.raises(ConfigError, match="data.n_programs"):
        check_data({"source": "synthetic", "n_programs": 0})
    check_data({"source": "pbmc68k"})


def test_visium_through_the_pipeline(compose, tmp_path):
    """data=visium end to end: spatial coordinates reach the score stage (Moran's I)."""
    from tardis_exp.pipeline import run
    from tardis_exp.synthetic import make_synthetic

    s = make_synthetic(n_spots=400, n_genes=200, n_programs=3, n_markers=20, seed=2)
    X = np.asarray(s.X.toarray() if sp.issparse(s.X) else s.X).round().astype(np.int64)
    bc = [f"BC{i:05d}-1" for i in range(s.n_obs)]
    names = list(s.var_names)
    folder = tmp_path / "visium"
    (folder / "spatial").mkdir(parents=True)
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", X, bc, [f"ID{j}" for j in range(s.n_vars)], names)
    xy = s.obsm["spatial"]
    pd.DataFrame({"barcode": bc, "in_tissue": 1, "array_row": 0, "array_col": 0,
                  "pxl_row_in_fullres": xy[:, 1], "pxl_col_in_fullres": xy[:, 0]}).to_csv(
        folder / "spatial" / "tissue_positions.csv", index=False)
    cfg = compose("data=visium", f"data.path={folder}", "factorize.n_components=6", "factorize.n_replicates=3",
                  "factorize.max_iter=200", "consensus.min_clusters=2", "consensus.max_clusters=4",
                  "consensus.n_resamples=10", "tracking.enabled=false", "tracking.log_plots=false")
    m = run(cfg, tmp_path / "run")
    out = ad.read_h5ad(tmp_path / "run" / "result.h5ad")
    np.testing.assert_array_equal(out.obsm["spatial"], xy[np.searchsorted(bc, out.obs_names)])
    assert "morans_i_mean" in m and m["morans_i_mean"] > 0.3  # spatially patterned programs


def test_a_source_is_one_registry_entry(tmp_path):
    """A new format registered once is checked, read and keyed by the cache like the shipped ones."""
    import scipy.sparse as sp_

    from tardis_exp import sources
    from tardis_exp.cache import source_key

    def read_npz(cfg, path):
        return ad.AnnData(X=sp_.load_npz(path).tocsr())

    f = tmp_path / "x.npz"
    X = sp.random(30, 20, density=0.3, format="csr", random_state=0, dtype=np.float32)
    sp.save_npz(f, X)
    sources.register(sources.Source("npz", "a SciPy sparse matrix", read_npz))
    try:
        with pytest.raises(ConfigError, match="data.path is required for data=npz"):
            check_data({"source": "npz"})
        with pytest.raises(InputError, match="is a folder; data=npz needs a file"):
            check_data({"source": "npz", "path": str(tmp_path)})
        with pytest.raises(ConfigError, match="data.backend=dask reads h5ad, zarr and tenx_h5 files only, not data=npz"):
            check_data({"source": "npz", "path": str(f), "backend": "dask"})
        a = load_data({"source": "npz", "path": str(f)})
        np.testing.assert_array_equal(a.X.toarray(), X.toarray())
        assert source_key({"source": "npz", "path": str(f)}, {}) is not None
        with pytest.raises(ValueError, match="registered twice"):
            sources.register(sources.Source("npz", "again", read_npz))
    finally:
        sources.SOURCES.pop("npz")
    with pytest.raises(ConfigError, match="data.source"):
        check_data({"source": "npz", "path": str(f)})


def test_every_preset_names_a_registered_source_and_shipped_sets_are_cache_keyed():
    import yaml

    from tardis_exp.cache import source_key
    from tardis_exp.sources import SOURCES

    conf = Path(__file__).resolve().parent.parent / "conf" / "data"
    named = {yaml.safe_load(p.read_text())["source"] for p in conf.glob("*.yaml")}
    assert named == set(SOURCES)
    # sources without a path (made or shipped) are keyed by their config: the Brunet sets too
    keys = {d: source_key({"source": "dataset", "dataset": d}, {}) for d in ("brunet_leukemia", "brunet_medulloblastoma")}
    assert None not in keys.values() and len(set(keys.values())) == 2
