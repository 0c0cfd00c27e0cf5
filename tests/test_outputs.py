"""Every stage writes exactly what its module declares (SPEC), and the cache round-trips all of it.

Runs the four real stages on small synthetic data (both consensus methods), compares the
keys each one added with its declaration, stores every stage's declared outputs in a real
on-disk store and restores them into the stage's input: every declared key comes back equal.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from tardis_exp.cache import StageCache, restore, stage_outputs
from tardis_exp.consensus import consensus
from tardis_exp.factorize import factorize
from tardis_exp.outputs import Output, StageSpec, new_keys, pack, snapshot, unpack, Unfit
from tardis_exp.preprocess import preprocess
from tardis_exp.score import score
from tardis_exp.stages import SPECS
from tardis_exp.synthetic import make_synthetic


def _run_all(method):
    """(stage, input, output) for the four stages in order."""
    raw = make_synthetic(n_spots=150, n_genes=200, n_programs=3, n_markers=20, seed=3)
    out = []
    pre = preprocess(raw, n_top_genes=120)
    out.append(("preprocess", raw, pre.copy()))
    steps = (("factorize", lambda a: factorize(a, n_components=4, n_replicates=3, max_iter=60, progress=False)),
             ("consensus", lambda a: consensus(a, method=method, min_clusters=2, max_clusters=4, n_resamples=6,
                                                spots_max_iter=40, progress=False)),
             ("score", lambda a: score(a, n_cluster_genes=10)))
    current = pre
    for name, run in steps:
        before = current.copy()
        run(current)
        out.append((name, before, current.copy()))
    return out


@pytest.fixture(scope="module", params=["components", "spots"])
def runs(request):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return request.param, _run_all(request.param)


def _equal(a, b, where):
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_dtype=False,
                                      obj=where)
    elif isinstance(a, (pd.Series, pd.Categorical)) or isinstance(b, (pd.Series, pd.Categorical)):
        sa, sb = pd.Series(a), pd.Series(b)
        assert list(sa.astype(str)) == list(sb.astype(str)), where
        if isinstance(sa.dtype, pd.CategoricalDtype):
            assert isinstance(sb.dtype, pd.CategoricalDtype), where
            assert list(sa.cat.categories) == list(sb.cat.categories), where
    elif isinstance(a, dict):
        assert set(map(str, a)) == set(map(str, b)), where
        for k in a:
            _equal(a[k], b[str(k)] if str(k) in b else b[k], f"{where}/{k}")
    elif sp.issparse(a) or sp.issparse(b):
        np.testing.assert_array_equal(sp.csr_matrix(a).toarray(), sp.csr_matrix(b).toarray(), err_msg=where)
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
        if np.ndim(a) == 0:
            assert type(np.asarray(a).item()) is type(np.asarray(b).item()), where


def _get(adata, slot, key):
    if slot == "X":
        return adata.X
    return getattr(adata, slot)[key]


def test_each_stage_writes_only_declared_keys_and_every_unconditional_one(runs):
    method, results = runs
    for name, before, after in results:
        spec = SPECS[name]
        added = new_keys(snapshot(before), after) if not spec.new_object else [
            (s, k) for s, keys in snapshot(after).items() for k in keys
            if s in ("X", "layers", "uns", "var") and not (s == "var" and k in before.var)]
        undeclared = [f"{s}/{k}" for s, k in added if not spec.declares(s, k)]
        assert not undeclared, f"{name} writes keys its SPEC does not declare: {undeclared}"
        written = set(spec.written(after))
        for o in spec.writes:
            hits = {(s, k) for s, k in written if s == o.slot and o.matches(k)}
            if not o.when or (o.key == "nmf_spot_consensus" and method == "spots") or o.key == "nmf_program":
                assert hits, f"{name} declares {o.slot}/{o.key} but did not write it"
    # the declarations hold the keys the stages have always used (scanpy users' names)
    assert SPECS["factorize"].declares("obsm", "X_nmf") and SPECS["score"].declares("obs", "nmf_cluster_5")
    assert not SPECS["score"].declares("obs", "nmf_cluster_x")


def test_the_cache_round_trips_every_declared_output_of_every_stage(runs, tmp_path):
    method, results = runs
    store = StageCache(tmp_path / "c", max_size_gb=1)
    for name, before, after in results:
        spec = SPECS[name]
        key = f"{name}{method}".ljust(64, "0")
        # preprocess returns a new AnnData (stored whole, as h5ad); the others write in place (npz)
        payload = after if spec.new_object else stage_outputs(name, after)
        store.namespaces = tuple(SPECS)  # the score stage too (the pipeline does not cache it)
        assert store.put(name, key, payload)
        back = store.get(name, key)
        assert back is not None
        if spec.new_object:
            restored = back
        else:
            restored = before.copy()
            restore(name, restored, back)
        declared = spec.written(after)
        assert declared
        for slot, k in declared:
            _equal(_get(after, slot, k), _get(restored, slot, k), f"{name}: {slot}/{k}")
        # and nothing else came back
        assert set(spec.written(restored)) == set(declared)


def test_a_lost_or_foreign_key_makes_the_entry_unfit(runs):
    _, results = runs
    name, before, after = results[1]  # factorize
    arrays = stage_outputs(name, after)
    lost = {k: v for k, v in arrays.items() if not k.startswith("obsm/X_nmf/") and k != "obsm/X_nmf"}
    with pytest.raises(Exception, match="lacks obsm/X_nmf"):
        restore(name, before.copy(), lost)
    foreign = {**arrays, "uns/not_declared": np.zeros(3)}
    with pytest.raises(Exception, match="does not declare"):
        restore(name, before.copy(), foreign)
    short = {**arrays, "obsm/X_nmf": arrays["obsm/X_nmf"][:-1]}
    with pytest.raises(Exception, match="rows"):
        restore(name, before.copy(), short)


def test_pack_refuses_what_would_need_pickle_and_keeps_types():
    import anndata as ad

    spec = StageSpec("t", writes=(Output("uns", "u", "x"), Output("obs", "c", "x")))
    a = ad.AnnData(X=np.zeros((3, 2), np.float32))
    a.obs["c"] = pd.Categorical(["a", None, "b"], categories=["b", "a"])
    a.uns["u"] = {"i": 3, "f": 0.5, "s": "text", "b": True, "arr": np.arange(3), "t": pd.DataFrame(
        {"g": ["x", "y"], "v": [1.0, 2.0]}), "e": {}}
    b = ad.AnnData(X=np.zeros((3, 2), np.float32))
    unpack(spec, b, pack(spec, a))
    assert list(b.obs["c"].cat.categories) == ["b", "a"] and b.obs["c"].isna().tolist() == [False, True, False]
    assert [type(b.uns["u"][k]) for k in ("i", "f", "s", "b")] == [int, float, str, bool]
    pd.testing.assert_frame_equal(b.uns["u"]["t"], a.uns["u"]["t"])
    assert b.uns["u"]["e"] == {}
    a.uns["u"] = {"x": None}
    with pytest.raises(TypeError, match="pickle"):
        pack(spec, a)
    with pytest.raises(Unfit):
        unpack(StageSpec("t", writes=(Output("uns", "other", "x"),)), b, {"uns/u": np.zeros(1)})
