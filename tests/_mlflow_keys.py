"""Shared check: one meaning per metric key across every run of an MLflow experiment.

Used by test_tracking (pipeline and stage runs), test_sweep_pipeline (study, trial and
stage runs) and test_ui (the store the browser looks at). Every key must be registered
in :data:`tardis_exp.tracking.METRIC_KEYS` for the kind of run that logs it, its steps
must be what its meaning says (one value at step 0, one per K, per replicate, per
program, per sample), and a key carried by several runs must hold the same number on each of them.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from tardis_exp.tracking import metric_key


def run_kind(run) -> str:
    if run.data.tags.get("optuna.role") == "study":
        return "study"
    return run.data.tags.get("stage", "pipeline")


def check_metric_keys(client, experiment_id: str) -> dict[str, set[str]]:
    """Assert one meaning per key; return {key: kinds of runs that carry it}."""
    runs = client.search_runs([experiment_id], max_results=5000)
    assert runs, "no runs to check"
    by_id = {r.info.run_id: r for r in runs}
    children = defaultdict(list)
    for r in runs:
        if "mlflow.parentRunId" in r.data.tags:
            children[r.data.tags["mlflow.parentRunId"]].append(r)
    seen: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        kind = run_kind(r)
        for key, value in r.data.metrics.items():
            spec = metric_key(key)
            assert spec is not None, f"metric {key!r} ({kind} run {r.info.run_name!r}) is not in METRIC_KEYS"
            assert kind in spec.runs, f"{key!r} logged by a {kind} run; its meaning is for {spec.runs}"
            seen[key].add(kind)
            steps = [h.step for h in client.get_metric_history(r.info.run_id, key)]
            if spec.step == "none":
                assert set(steps) == {0}, (key, kind, steps)
                continue
            assert steps == sorted(steps) or sorted(steps) == sorted(set(steps)), (key, steps)
            if spec.step == "K":
                p = r.data.params
                lo, hi = int(p["consensus.min_clusters"]), int(p["consensus.max_clusters"])
                # the K range of the run (clipped at the top when a resample holds too few items)
                # (NaN values, e.g. the silhouette of an all-singleton K, are not logged)
                assert set(steps) <= set(range(lo, hi + 1)) and len(steps) == len(set(steps)), (key, steps)
            elif spec.step == "replicate":
                assert sorted(steps) == list(range(int(r.data.params["factorize.n_replicates"]))), (key, steps)
            elif spec.step == "program":
                assert sorted(steps) == list(range(len(steps))), (key, steps)
            elif spec.step == "sample":  # indices into uns['nmf_samples']['samples'] (NaN ones not logged)
                assert len(steps) == len(set(steps)) and min(steps) >= 0, (key, steps)

    # the same key holds the same number wherever it appears
    for r in runs:
        if run_kind(r) != "pipeline":
            continue
        m = r.data.metrics
        stages = {c.data.tags["stage"]: c for c in children.get(r.info.run_id, []) if "stage" in c.data.tags}
        for st in stages.values():
            for key, v in st.data.metrics.items():
                if key in m and key != "duration_s":
                    assert m[key] == pytest.approx(v, rel=1e-12), (key, r.info.run_name, st.info.run_name)
        if "consensus" in stages and "best_k" in m:
            cons = stages["consensus"]
            for key in ("pac", "cophenetic", "silhouette"):
                hist = {h.step: h.value for h in client.get_metric_history(cons.info.run_id,
                                                                           f"consensus.{key}_by_k")}
                assert m[f"consensus.{key}"] == pytest.approx(hist[int(m["best_k"])], rel=1e-12, abs=1e-12), key
        if "factorize" in stages and "reconstruction_error" in m:
            errs = [h.value for h in client.get_metric_history(stages["factorize"].info.run_id,
                                                              "reconstruction_error_by_replicate")]
            assert m["reconstruction_error"] == pytest.approx(min(errs), rel=1e-12)
    for r in runs:  # a study's headline metrics are its best trial's
        if run_kind(r) != "study" or "optuna.best_trial" not in r.data.tags:
            continue
        trials = [c for c in children[r.info.run_id]
                  if c.data.tags.get("optuna.trial_number") == r.data.tags["optuna.best_trial"]]
        assert len(trials) == 1
        for key, v in r.data.metrics.items():
            if not key.startswith("n_trials_"):
                assert trials[0].data.metrics[key] == pytest.approx(v, rel=1e-12), key
    del by_id
    return dict(seen)
