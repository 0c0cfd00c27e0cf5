"""The content-keyed stage cache (tardis_exp/cache.py) on real stages, real files and real MLflow.

Ground truth for every hit is the same stage computed without the cache.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from tardis_exp.cache import StageCache, stage_outputs
from tardis_exp.data import digest
from tardis_exp.factorize import factorize
from tardis_exp.pipeline import stage_kwargs
from tardis_exp.preprocess import preprocess

SMALL = ("preprocess.n_top_genes=400", "factorize.n_components=4", "factorize.n_replicates=3",
         "factorize.max_iter=150")


def _dense(M):
    return M.toarray() if sp.issparse(M) else np.asarray(M)


def _stages(cache: StageCache, adata, cfg):
    """preprocess + factorize through ``cache`` (as pipeline.run wires them)."""
    out = cache.preprocess(adata, cfg, digest(adata),
                           compute=lambda a: preprocess(a, **stage_kwargs(cfg["preprocess"])))
    cache.factorize(out, cfg, compute=lambda a: factorize(a, progress=False, **stage_kwargs(cfg["factorize"])))
    return out


def _direct(adata, cfg):
    out = preprocess(adata, **stage_kwargs(cfg["preprocess"]))
    factorize(out, progress=False, **stage_kwargs(cfg["factorize"]))
    return out


@pytest.fixture(scope="module")
def reference(synthetic_small, tmp_path_factory):
    """Config and uncached result, shared by the tests (one factorization)."""
    from conftest import compose_config

    root = tmp_path_factory.mktemp("ref")
    cfg = compose_config(root, SMALL)
    return cfg, _direct(synthetic_small, cfg)


def _assert_same_result(a, b):
    np.testing.assert_array_equal(_dense(a.X), _dense(b.X))
    assert list(a.var_names) == list(b.var_names) and list(a.obs_names) == list(b.obs_names)
    np.testing.assert_array_equal(a.obsm["X_nmf"], b.obsm["X_nmf"])
    np.testing.assert_array_equal(a.obsm["X_nmf_replicates"], b.obsm["X_nmf_replicates"])
    np.testing.assert_array_equal(a.uns["X_nmf_components"], b.uns["X_nmf_components"])
    for k in ("components", "errors", "n_iter", "converged", "seeds"):
        np.testing.assert_array_equal(a.uns["nmf"][k], b.uns["nmf"][k])
    assert a.uns["nmf"]["params"] == b.uns["nmf"]["params"]
    assert a.uns["nmf"]["best_replicate"] == b.uns["nmf"]["best_replicate"]


def test_hit_returns_the_computed_arrays(synthetic_small, reference, tmp_path):
    cfg, ref = reference
    first = StageCache(tmp_path / "c", max_size_gb=1)
    miss = _stages(first, synthetic_small, cfg)
    assert (first.hits, first.misses) == (0, 2)
    _assert_same_result(miss, ref)

    second = StageCache(tmp_path / "c", max_size_gb=1)  # a new run: nothing in memory
    hit = _stages(second, synthetic_small, cfg)
    assert (second.hits, second.misses) == (2, 0)
    assert [e["status"] for e in second.events] == ["hit", "hit"]
    _assert_same_result(hit, ref)
    # what a hit restores has the types the stage wrote
    assert isinstance(hit.uns["nmf"]["best_replicate"], int) and isinstance(hit.uns["nmf"]["params"]["solver"], str)
    assert hit.uns["preprocess"] == ref.uns["preprocess"]
    assert (hit.var["highly_variable"] == ref.var["highly_variable"]).all()


def test_changed_upstream_or_input_misses(synthetic_small, reference, tmp_path, compose):
    cfg, _ = reference
    cache = StageCache(tmp_path / "c", max_size_gb=1)
    _stages(cache, synthetic_small, cfg)

    # an upstream (preprocess) change invalidates both stages
    cfg2 = compose(*SMALL, "preprocess.n_top_genes=300")
    c2 = StageCache(tmp_path / "c", max_size_gb=1)
    out2 = _stages(c2, synthetic_small, cfg2)
    assert (c2.hits, c2.misses) == (0, 2)
    assert out2.n_vars == 300 and out2.uns["nmf"]["components"].shape == (3, 4, 300)
    np.testing.assert_array_equal(out2.obsm["X_nmf"], _direct(synthetic_small, cfg2).obsm["X_nmf"])

    # a factorize-only change reuses the preprocessing
    cfg3 = compose(*SMALL, "factorize.n_components=3")
    c3 = StageCache(tmp_path / "c", max_size_gb=1)
    out3 = _stages(c3, synthetic_small, cfg3)
    assert [e["status"] for e in c3.events] == ["hit", "miss"]
    assert out3.obsm["X_nmf"].shape[1] == 3

    # one changed count in the input: a different data digest, no hit
    changed = synthetic_small.copy()
    changed.X = changed.X.tocsr(copy=True)
    changed.X.data[0] += 1
    c4 = StageCache(tmp_path / "c", max_size_gb=1)
    _stages(c4, changed, cfg)
    assert (c4.hits, c4.misses) == (0, 2)
    # every distinct input/config pair has its own entry; none was overwritten
    assert len(list((tmp_path / "c" / "preprocess").glob("*/meta.json"))) == 3
    assert len(list((tmp_path / "c" / "factorize").glob("*/meta.json"))) == 4


@pytest.mark.parametrize("stage,damage", [("factorize", "flip"), ("factorize", "truncate"),
                                          ("preprocess", "truncate"), ("preprocess", "meta")])
def test_damaged_entry_is_recomputed(synthetic_small, reference, tmp_path, stage, damage):
    cfg, ref = reference
    _stages(StageCache(tmp_path / "c", max_size_gb=1), synthetic_small, cfg)
    (entry,) = (tmp_path / "c" / stage).iterdir()
    data = next(p for p in entry.iterdir() if p.name.startswith("data."))
    raw = bytearray(data.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(bytes(raw[: len(raw) // 3]))
    else:
        (entry / "meta.json").write_text("{not json")
    # a killed writer leaves only a .tmp-* folder; it must be ignored
    (tmp_path / "c" / stage / ".tmp-killed-writer").mkdir()
    (tmp_path / "c" / stage / ".tmp-killed-writer" / "data.npz").write_bytes(b"partial")

    cache = StageCache(tmp_path / "c", max_size_gb=1)
    with pytest.warns(RuntimeWarning, match=f"damaged {stage} entry"):
        out = _stages(cache, synthetic_small, cfg)
    _assert_same_result(out, ref)
    # the factorize key chains on the input and the configs, not on the preprocess entry
    assert [e["status"] for e in cache.events] == (["miss", "hit"] if stage == "preprocess" else ["hit", "miss"])
    # the entry was rewritten and is sound again
    again = StageCache(tmp_path / "c", max_size_gb=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _assert_same_result(_stages(again, synthetic_small, cfg), ref)
    assert again.hits == 2


def test_eviction_keeps_the_bound_and_the_recently_used(tmp_path):
    rng = np.random.default_rng(0)
    payload = lambda: {"obsm/X_nmf": rng.random((250, 1000), dtype=np.float32)}  # ~1 MB each  # noqa: E731
    one = 250 * 1000 * 4
    cache = StageCache(tmp_path / "c", max_size_gb=3.5 * one / 1024**3)
    keys = [f"{i:064x}" for i in range(5)]
    for i, k in enumerate(keys[:3]):
        assert cache.put("factorize", k, payload())
        os.utime(cache.entry_dir("factorize", k) / "meta.json", (1000 + i, 1000 + i))
    assert cache.get("factorize", keys[0]) is not None  # keys[0] becomes the most recently used
    for k in keys[3:]:
        cache.put("factorize", k, payload())
        assert cache.size_bytes() <= cache.max_bytes
    left = {p.name for p in (tmp_path / "c" / "factorize").iterdir() if not p.name.startswith(".")}
    assert left == {keys[0], keys[3], keys[4]}
    # an entry larger than the bound is not stored at all
    assert not cache.put("factorize", "f" * 64, {"obsm/X_nmf": rng.random((1000, 1000), dtype=np.float32)})
    assert cache.size_bytes() <= cache.max_bytes


def test_entries_are_h5ad_and_npz_without_pickle(synthetic_small, reference, tmp_path):
    cfg, _ = reference
    cache = StageCache(tmp_path / "c", max_size_gb=1)
    _stages(cache, synthetic_small, cfg)
    files = sorted(p.relative_to(tmp_path / "c").as_posix().split("/", 2)[::2] for p in (tmp_path / "c").rglob("*")
                   if p.is_file())
    assert files == [["factorize", "data.npz"], ["factorize", "meta.json"],
                     ["preprocess", "data.h5ad"], ["preprocess", "meta.json"]]
    (npz,) = (tmp_path / "c" / "factorize").glob("*/data.npz")
    with np.load(npz, allow_pickle=False) as z:  # raises on any object (pickled) array
        arrays = {k: z[k] for k in z.files}
    assert all(a.dtype.kind != "O" for a in arrays.values())
    assert "obsm/X_nmf" in arrays and "uns/nmf/components" in arrays
    meta = json.loads(next((tmp_path / "c" / "factorize").glob("*/meta.json")).read_text())
    assert meta["inputs"]["configs"]["factorize"]["n_components"] == 4 and meta["size"] == npz.stat().st_size
    # outputs that would need pickle are refused instead of written
    bad = synthetic_small[:5].copy()
    bad.obsm["X_nmf"] = np.zeros((5, 2))
    bad.uns["nmf"] = {"params": {"x": None}}
    with pytest.raises(TypeError, match="pickle"):
        stage_outputs("factorize", bad)
    src = (Path(__file__).resolve().parents[1] / "tardis_exp" / "cache.py").read_text()
    assert "import pickle" not in src and "allow_pickle=True" not in src


def test_pipeline_tags_hits_in_mlflow(tmp_path, compose):
    from mlflow import MlflowClient

    from tardis_exp.pipeline import run

    ov = ("data.n_spots=900", "data.n_genes=800", "data.n_programs=4", *SMALL, "consensus.n_resamples=10",
          "consensus.min_clusters=2", "consensus.max_clusters=6", "cache.enabled=true", "save_result=false",
          "tracking.log_plots=false")
    cfg = compose(*ov)
    assert cfg["cache"]["dir"] == str(tmp_path / ".cache" / "tardis_exp")
    m1 = run(cfg, tmp_path / "r1")
    m2 = run(cfg, tmp_path / "r2")
    assert (m1["cache_hits"], m1["cache_misses"]) == (0, 3) and (m2["cache_hits"], m2["cache_misses"]) == (3, 0)
    for k in ("best_k", "reconstruction_error", "consensus.silhouette", "refit_error", "program_recovery"):
        assert m1[k] == m2[k], k

    client = MlflowClient(tracking_uri=cfg["tracking"]["uri"])
    exp = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    keys = {}
    for rid, status in ((m1["mlflow_run_id"], "miss"), (m2["mlflow_run_id"], "hit")):
        assert client.get_run(rid).data.metrics["cache_hits"] == (0 if status == "miss" else 3)
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{rid}'")
        tags = {c.data.tags["stage"]: c.data.tags for c in children}
        assert set(tags) == {"preprocess", "factorize", "consensus", "score"}
        for stage in ("preprocess", "factorize", "consensus"):
            assert tags[stage]["cache"] == status
            keys.setdefault(stage, set()).add(tags[stage]["cache.key"])
            assert (tmp_path / ".cache" / "tardis_exp" / stage / tags[stage]["cache.key"] / "meta.json").is_file()
        assert "cache" not in tags["score"]
    assert all(len(v) == 1 for v in keys.values())  # the hit used the key the miss stored


# ----------------------------------------------------------------------------- the input memo


def _reads(cfg):
    """A real loader that counts how often it actually read the data."""
    from tardis_exp.data import load_data

    calls = []

    def load():
        calls.append(1)
        return load_data(cfg["data"])
    return load, calls


def test_input_memo_skips_reading_when_preprocess_is_cached(compose, tmp_path):
    cfg = compose("data.n_spots=400", "data.n_genes=300", "data.n_programs=3", *SMALL)
    load, calls = _reads(cfg)
    first = StageCache(tmp_path / "c", max_size_gb=1)
    inp = first.load_input(cfg, load)
    assert not inp.from_memo and len(calls) == 1
    ref = first.preprocess(inp, cfg, compute=lambda a: preprocess(a, **stage_kwargs(cfg["preprocess"])))
    assert inp.digest == digest(load())  # ground truth: the digest of the data as read
    calls.clear()

    second = StageCache(tmp_path / "c", max_size_gb=1)
    inp2 = second.load_input(cfg, load)
    assert inp2.from_memo and (inp2.digest, inp2.shape) == (inp.digest, (400, 300))
    out = second.preprocess(inp2, cfg, compute=lambda a: preprocess(a, **stage_kwargs(cfg["preprocess"])))
    assert calls == [] and second.hits == 1  # never read: the preprocessed data came from the cache
    np.testing.assert_array_equal(_dense(out.X), _dense(ref.X))

    # another preprocessing of the same source: now the data must be read (once)
    cfg2 = compose("data.n_spots=400", "data.n_genes=300", "data.n_programs=3", *SMALL, "preprocess.n_top_genes=100")
    third = StageCache(tmp_path / "c", max_size_gb=1)
    out3 = third.preprocess(third.load_input(cfg2, load), cfg2,
                            compute=lambda a: preprocess(a, **stage_kwargs(cfg2["preprocess"])))
    assert len(calls) == 1 and out3.n_vars == 100

    # a different generated data set is a different source
    cfg4 = compose("data.n_spots=400", "data.n_genes=300", "data.n_programs=3", "data.seed=5", *SMALL)
    load4, calls4 = _reads(cfg4)
    inp4 = StageCache(tmp_path / "c", max_size_gb=1).load_input(cfg4, load4)
    assert not inp4.from_memo and inp4.digest != inp.digest and calls4 == [1]


def test_input_memo_follows_the_file(compose, tmp_path, synthetic_small):
    path = tmp_path / "in.h5ad"
    a = synthetic_small.copy()
    a.X = a.X.toarray()  # dense: one changed value keeps the file size
    a.write_h5ad(path)
    cfg = compose("data=h5ad", f"data.path={path}", *SMALL)
    load, calls = _reads(cfg)
    inp = StageCache(tmp_path / "c", max_size_gb=1).load_input(cfg, load)
    again = StageCache(tmp_path / "c", max_size_gb=1).load_input(cfg, load)
    assert again.from_memo and again.digest == inp.digest and len(calls) == 1

    # rewritten: new modification time, so the memo is not used
    b = a.copy()
    b.X[0, 0] += 1
    b.write_h5ad(path)
    changed = StageCache(tmp_path / "c", max_size_gb=1).load_input(cfg, load)
    assert not changed.from_memo and changed.digest == digest(b) != inp.digest

    # rewritten again with the old size and time forced back: the memo says one thing,
    # the file another; reading it (a preprocess miss) stops with a clear error
    st = path.stat()
    b.X[0, 0] += 1
    b.write_h5ad(path)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    stale = StageCache(tmp_path / "c", max_size_gb=1).load_input(cfg, load)
    assert stale.from_memo
    from tardis_exp.errors import InputError

    cfg2 = compose("data=h5ad", f"data.path={path}", *SMALL, "preprocess.n_top_genes=100")
    with pytest.raises(InputError, match="input changed while its size and modification time did not"):
        StageCache(tmp_path / "c", max_size_gb=1).preprocess(
            stale, cfg2, compute=lambda x: preprocess(x, **stage_kwargs(cfg2["preprocess"])))


# ----------------------------------------------------------------------------- consensus


def _assert_tree_equal(a, b, path="uns"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(map(str, a)) == set(map(str, b)), path
        for k in a:
            if k != "seconds":  # the stage's own timing: the hit keeps the time of the run that computed it
                _assert_tree_equal(a[k], b[str(k)] if str(k) in b else b[k], f"{path}/{k}")
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


@pytest.mark.parametrize("method", ["components", "spots"])
def test_consensus_hit_restores_what_the_stage_computed(synthetic_small, tmp_path, compose, method):
    from tardis_exp.consensus import consensus

    cfg = compose(*SMALL, f"consensus.method={method}", "consensus.n_resamples=6", "consensus.min_clusters=2",
                  "consensus.max_clusters=5", "consensus.spots_max_iter=100")

    def run_stages(cache):
        out = _stages(cache, synthetic_small, cfg)
        cache.consensus(out, cfg, compute=lambda a: consensus(a, progress=False, **stage_kwargs(cfg["consensus"])))
        return out

    miss = run_stages(StageCache(tmp_path / "c", max_size_gb=1))
    again = StageCache(tmp_path / "c", max_size_gb=1)
    hit = run_stages(again)
    assert [e["status"] for e in again.events] == ["hit", "hit", "hit"]
    # ground truth: the stage computed without any cache
    direct = _direct(synthetic_small, cfg)
    consensus(direct, progress=False, **stage_kwargs(cfg["consensus"]))
    for got in (miss, hit):
        _assert_tree_equal(direct.uns["nmf_consensus"], got.uns["nmf_consensus"])
        np.testing.assert_array_equal(direct.obsm["X_nmf_consensus"], got.obsm["X_nmf_consensus"])
    assert isinstance(hit.uns["nmf_consensus"]["best_k"], int)
    assert isinstance(hit.uns["nmf_consensus"]["method"], str)
    if method == "spots":
        assert hit.obs["nmf_spot_consensus"].dtype == "category"
        assert list(hit.obs["nmf_spot_consensus"]) == list(direct.obs["nmf_spot_consensus"])
        assert list(hit.obs["nmf_spot_consensus"].cat.categories) == list(
            direct.obs["nmf_spot_consensus"].cat.categories)
    hit.write_h5ad(tmp_path / "hit.h5ad")  # what a hit restores can be written as the result

    # another consensus setting misses; the factorization still hits
    cfg2 = compose(*SMALL, f"consensus.method={method}", "consensus.n_resamples=7", "consensus.min_clusters=2",
                   "consensus.max_clusters=5", "consensus.spots_max_iter=100")
    c3 = StageCache(tmp_path / "c", max_size_gb=1)
    out = _stages(c3, synthetic_small, cfg2)
    c3.consensus(out, cfg2, compute=lambda a: consensus(a, progress=False, **stage_kwargs(cfg2["consensus"])))
    assert [e["status"] for e in c3.events] == ["hit", "hit", "miss"]


def test_input_memos_count_towards_the_bound_and_are_evicted_oldest_first(tmp_path, compose):
    """Memos of many inputs cannot grow the cache without bound; the one just used survives."""
    from tardis_exp.synthetic import make_synthetic

    cache = StageCache(tmp_path / "c", max_size_gb=1)
    cfgs = [compose(f"data.seed={i}", "data.n_spots=100", "data.n_genes=60", "data.n_programs=2", "data.n_markers=10")
            for i in range(4)]
    for c in cfgs:
        cache.load_input(c, load=lambda c=c: make_synthetic(n_spots=100, n_genes=60, n_programs=2, n_markers=10,
                                                            seed=c["data"]["seed"]))
    memos = [_memo_of(cache, c) for c in cfgs]
    assert len(set(memos)) == 4 and all(m.is_file() for m in memos)
    for i, m in enumerate(memos):
        os.utime(m, (1000 + i, 1000 + i))  # cfgs[0]'s memo is the oldest
    inp = cache.load_input(cfgs[0], load=lambda: 1 / 0)  # read back from the memo, never loaded
    assert inp.from_memo
    assert cache.size_bytes() == sum(m.stat().st_size for m in memos)
    cache.max_bytes = int(2.5 * memos[0].stat().st_size)
    assert cache.evict() == 2
    assert [m.is_file() for m in memos] == [True, False, False, True]
    assert cache.size_bytes() <= cache.max_bytes


def _memo_of(cache, cfg):
    from tardis_exp.cache import source_key

    return cache.dir / "inputs" / f"{source_key(cfg['data'], cfg['preprocess'])}.json"


def test_a_damaged_input_memo_is_ignored_by_both_readers(compose, tmp_path, caplog):
    cfg = compose("data.n_spots=400", "data.n_genes=300", "data.n_programs=3", *SMALL)
    load, calls = _reads(cfg)
    cache = StageCache(tmp_path / "c", max_size_gb=1)
    cache.preprocess(cache.load_input(cfg, load), cfg,
                     compute=lambda a: preprocess(a, **stage_kwargs(cfg["preprocess"])))
    assert cache.cached_preprocessed(cfg) is not None and len(calls) == 1
    _memo_of(cache, cfg).write_text('{"digest": "abc", "shape": "not a shape"}')
    with caplog.at_level("WARNING"):
        assert cache.cached_preprocessed(cfg) is None
        inp = cache.load_input(cfg, load)
    assert not inp.from_memo and len(calls) == 2  # read again, and the memo rewritten
    assert sum("damaged input memo" in r.getMessage() for r in caplog.records) == 2
    assert cache.cached_preprocessed(cfg) is not None
