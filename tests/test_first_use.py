"""What a new user met on a first run (issue 27): an unwritable working folder, a program
that labels no spot in the figures, a late failure that lost finished work, where the run
folder is, an interrupted and resumed sweep, a misleading search-space refusal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
CAPSH = shutil.which("capsh")


def _env():
    env = {**os.environ, "TARDIS_EXP_PROGRESS": "0", "MPLBACKEND": "Agg"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("tardis-exp: error: "), lines[0]
    assert "Traceback" not in p.stderr + p.stdout
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- 1: unwritable folders


def _as_unprivileged_root(cwd: Path, *args: str):
    """``tardis-exp args`` in ``cwd`` as root without the capabilities that bypass file
    permissions, as an ordinary user meets a read-only folder."""
    cmd = " ".join([sys.executable, "-m", "tardis_exp", *args])
    return subprocess.run([CAPSH, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", cmd], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=300)


needs_capsh = pytest.mark.skipif(not (IS_ROOT and CAPSH), reason="needs root and capsh to drop the permission bypass")


@needs_capsh
def test_read_only_working_folder_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    p = _as_unprivileged_root(ro, "data.n_spots=400")
    # before: a 43-line traceback ending in PermissionError, exit status 1
    line = _one_line_error(p, "run folder", str(ro / "outputs"), "permission denied", "writable folder",
                           "TARDIS_EXP_ROOT", "paths.output_dir")
    assert "Errno" not in line
    assert not (ro / "outputs").exists()


@needs_capsh
def test_unwritable_job_log_and_hydra_folder_are_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)  # the run folder exists, Hydra cannot create its job log there
    p = _as_unprivileged_root(tmp_path, "data.n_spots=400", f"hydra.run.dir={run}")
    _one_line_error(p, "job log", str(run / "cli.log"), "permission denied", "paths.output_dir")
    run.chmod(0o755)
    (run / "cli.log").touch()  # the log can be appended to, .hydra/ cannot be created
    run.chmod(0o555)
    p = _as_unprivileged_root(tmp_path, "data.n_spots=400", f"hydra.run.dir={run}")
    _one_line_error(p, ".hydra", str(run / ".hydra"), "permission denied")


# ----------------------------------------------------------------------------- 2: a program that labels no spot


@pytest.fixture
def empty_program():
    """Real stage outputs where the last consensus program is no spot's argmax: its usages
    scaled by 1e-6 (a weak program, as a sweep's larger K gives) before the score stage."""
    import warnings

    from tardis_exp.consensus import consensus
    from tardis_exp.factorize import factorize
    from tardis_exp.preprocess import preprocess
    from tardis_exp.score import score
    from tardis_exp.synthetic import make_synthetic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = preprocess(make_synthetic(n_spots=150, n_genes=200, n_programs=3, n_markers=20, seed=3), n_top_genes=120)
        factorize(a, n_components=4, n_replicates=3, max_iter=60, progress=False)
        consensus(a, min_clusters=3, max_clusters=3, n_resamples=6, progress=False)
        a.obsm["X_nmf_consensus"][:, -1] *= 1e-6
        score(a, n_cluster_genes=10)
    return a


def test_every_program_is_drawn_even_one_that_labels_no_spot(empty_program, tmp_path, caplog):
    import logging

    import numpy as np

    from tardis_exp.plots import PLOTS, make_plots

    a = empty_program
    U = np.asarray(a.obsm["X_nmf_consensus"])
    K = U.shape[1]
    argmax = U.argmax(1)
    assert K == 3 and (argmax == K - 1).sum() == 0 and len(np.unique(argmax)) == K - 1
    with caplog.at_level(logging.INFO, logger="tardis_exp.plots"):
        written = make_plots(a, tmp_path)
    # before: "plot top_genes_dotplot.png skipped: KeyError: "['2'] not in index""
    assert "skipped" not in caplog.text and "not drawn" not in caplog.text, caplog.text
    assert {p.name for p in written} == set(PLOTS) - {"programs_by_section.png"}  # one sample

    from tardis_exp.plots import dotplot_figure

    dp = dotplot_figure(a)
    rows = [f"{p} ({int((argmax == p).sum())} spots)" for p in range(K)]
    assert list(dp.dot_size_df.index) == rows and rows[-1] == f"{K - 1} (0 spots)"
    shown = [t.get_text() for t in dp.ax_dict["mainplot_ax"].get_yticklabels()]
    assert sorted(shown) == sorted(rows)
    assert list(dp.var_groups.labels) == [str(p) for p in range(K)]  # every program's genes, the empty one's too
    # the dots against the data: the share of each group's spots expressing each gene, none for the empty row
    X = a[:, list(dp.dot_size_df.columns)].X
    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X)
    for p in range(K - 1):
        np.testing.assert_allclose(dp.dot_size_df.iloc[p].to_numpy(), (X[argmax == p] > 0).mean(0), rtol=0, atol=1e-12)
    assert (dp.dot_size_df.iloc[K - 1] == 0).all()


# ----------------------------------------------------------------------------- 3: late failures


def _cli(root: Path, *args: str, timeout: int = 300):
    cmd = [sys.executable, "-m", "tardis_exp", f"paths.root_dir={root}", *args]
    return subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_too_few_genes_for_the_score_is_refused_before_the_factorization(tmp_path):
    # the command: it used to fit and cluster, then stop in the score stage with
    # "score: no control genes for program 0 (score.ctrl_size=50)" and keep nothing
    p = _cli(tmp_path, "data.n_spots=400", "factorize.n_replicates=2", "preprocess.n_top_genes=5",
             "factorize.n_components=4")
    _one_line_error(p, "preprocess.n_top_genes=5", "score.n_cluster_genes=50", "preprocess.n_top_genes well above 50",
                    "score.n_cluster_genes to at most 2")
    assert "factorize" not in p.stdout + p.stderr  # refused at validation: no stage ran
    assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").iterdir())
    # the value it proposes works
    p = _cli(tmp_path, "data.n_spots=400", "factorize.n_replicates=2", "preprocess.n_top_genes=5",
             "factorize.n_components=4", "score.n_cluster_genes=2", "tracking.log_plots=false")
    assert p.returncode == 0, p.stderr[-3000:]


def test_data_with_too_few_genes_is_refused_after_preprocessing(compose, tmp_path):
    from tardis_exp.errors import ConfigError
    from tardis_exp.pipeline import run

    # 40 genes and no HVG selection: only the preprocessed shape shows the score cannot run
    cfg = compose("data.n_spots=200", "data.n_genes=40", "data.n_programs=3", "data.n_markers=10",
                  "preprocess.n_top_genes=null", "factorize.n_components=4", "factorize.n_replicates=2",
                  "tracking.enabled=false")
    with pytest.raises(ConfigError) as e:
        run(cfg, tmp_path / "run")
    msg = str(e.value)
    assert "the preprocessed data has 40 genes" in msg and "score.n_cluster_genes=50" in msg, msg
    assert "preprocess.n_top_genes" in msg
    assert not (tmp_path / "run" / "partial_result.h5ad").exists()  # nothing was fit: nothing to keep


def test_a_late_failure_keeps_the_finished_stages(tmp_path):
    import anndata as ad
    import numpy as np

    common = ["data.n_spots=400", "factorize.n_replicates=3", "factorize.n_components=4", "consensus.max_clusters=4",
              "tracking.enabled=false"]
    # a real failure in the consensus stage, after the factorization: the outlier filter keeps no component
    # (at a fixed threshold: the adaptive one keeps the components that recur)
    p = _cli(tmp_path, *common, "consensus.outlier_threshold=0.0001", "consensus.outlier_adaptive=false")
    line = _one_line_error(p, "consensus.outlier_threshold=0.0001", "the finished stages (preprocess, factorize) "
                                                                     "are kept in ")
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    partial = run_dir / "partial_result.h5ad"
    assert line.endswith(str(partial))  # before: nothing kept, nothing said
    a = ad.read_h5ad(partial)
    assert a.uns["tardis_exp_partial"]["failed"] == "consensus"
    assert list(a.uns["tardis_exp_partial"]["finished"]) == ["preprocess", "factorize"]
    assert "nmf_consensus" not in a.uns and "X_nmf_consensus" not in a.obsm
    # what was kept is what the factorization computes: the same run with a consensus that
    # succeeds (same seeds) gives the same fit in its result.h5ad
    p = _cli(tmp_path, *common)
    assert p.returncode == 0, p.stderr[-3000:]
    (full_dir,) = [d for d in (tmp_path / "outputs" / "runs").iterdir() if d != run_dir]
    full = ad.read_h5ad(full_dir / "result.h5ad")
    assert list(a.obs_names) == list(full.obs_names) and list(a.var_names) == list(full.var_names)
    np.testing.assert_array_equal(a.obsm["X_nmf"], full.obsm["X_nmf"])
    np.testing.assert_array_equal(np.asarray(a.uns["nmf"]["errors"]), np.asarray(full.uns["nmf"]["errors"]))
    assert (a.X != full.X).nnz == 0 if hasattr(a.X, "nnz") else np.array_equal(a.X, full.X)


# ----------------------------------------------------------------------------- 4: where the results are


def test_a_run_prints_its_folder_last(tmp_path):
    p = _cli(tmp_path, "data.n_spots=400", "factorize.n_replicates=2", "tracking.log_plots=false")
    assert p.returncode == 0, p.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert (run_dir / "result.h5ad").is_file()
    lines = p.stdout.strip().splitlines()
    assert lines[-1] == f"tardis-exp: run folder {run_dir}", lines[-3:]
    assert "MLflow run" in lines[-2]  # beside the MLflow line


def _toy_sweep(tmp: Path, *args: str, timeout: float = 180, popen: bool = False):
    """The sweeper's toy app (tests/sweeper_app) as a subprocess: a sweep in seconds."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, str(root / "tests" / "sweeper_app" / "app.py"), "-m", "hydra/sweeper=tardis_optuna",
           "hydra.sweeper.study_name=toy", f"paths.root_dir={tmp}",
           "hydra.sweeper.objectives=[{metric:loss,direction:minimize}]", "x=interval(-1,1)", *args]
    if popen:
        import signal

        # SIGINT at its default, as at a terminal (a suite started in the background inherits it ignored)
        return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_sweep_prints_its_folder_last(tmp_path):
    p = _toy_sweep(tmp_path, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}/sweep")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "sweep" / "optimization_results.yaml").is_file()
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith(f"tardis-exp: sweep folder {tmp_path / 'sweep'} "), last


# ----------------------------------------------------------------------------- 6: the search-space refusal


def test_a_rank_too_low_for_two_k_advises_min_width():
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # plain checkout: hydra_plugins importable
        sys.path.insert(0, root)
    from hydra_plugins.tardis_optuna_sweeper._common import SweeperConfigError
    from hydra_plugins.tardis_optuna_sweeper._search_space import build_search_space

    # sweep=k_range's pair, with the factorize.n_components=int(interval(2,8))
    pair = {"low_key": "consensus.min_clusters", "high_key": "consensus.max_clusters", "low": 2, "high": 12,
            "min_width": 1, "bound_key": "factorize.n_components", "bound_when": {"consensus.method": "components"}}
    base = {"consensus.method": "components"}.get
    space = build_search_space({"factorize.n_components": "int(interval(2, 8))"}, [pair], [])
    with pytest.raises(SweeperConfigError) as e:
        space.check_pairs(base)
    msg = str(e.value)
    # before: only "raise the lower end of factorize.n_components or lower ...ordered_pairs[0].low",
    # and a low below 2 is no K at all
    assert "hydra.sweeper.ordered_pairs[0].min_width=0" in msg, msg
    assert "hydra.sweeper.ordered_pairs.0.min_width=0" in msg, msg  # the override as typed
    assert msg.index("min_width=0") < msg.index("raise the lower end of factorize.n_components to 3"), msg
    # each advised fix is accepted
    narrow = {**pair, "min_width": 0}
    build_search_space({"factorize.n_components": "int(interval(2, 8))"}, [narrow], []).check_pairs(base)
    build_search_space({"factorize.n_components": "int(interval(3, 8))"}, [pair], []).check_pairs(base)


# ----------------------------------------------------------------------------- 5: an interrupted, resumed sweep


def test_an_interrupted_sweep_resumed_ends_with_one_summary_of_the_whole_study(tmp_path):
    import signal
    import time

    import optuna
    import yaml
    from optuna.storages.journal import JournalFileBackend

    cmd = [sys.executable, "-m", "tardis_exp", "-m", "sweep=k_range", "hydra.sweeper.n_trials=3", "data.n_spots=400",
           "factorize.n_replicates=8", f"paths.root_dir={tmp_path}"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as at a terminal
    multiruns = tmp_path / "outputs" / "multiruns"
    try:
        deadline = time.time() + 300
        # Ctrl-C once trial 0's run has begun (its config.yaml written): the first trial, so no
        # stage comes from the cache and its factorization takes seconds more (a later trial
        # could be a cache hit and finish before the signal)
        while not list(multiruns.glob("*/0/config.yaml")):
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.time() < deadline, "trial 0 never started"
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-3000:]
    (first,) = multiruns.iterdir()
    # before: no optimization_results.yaml in the interrupted sweep's folder
    assert f"sweep interrupted; the study so far is in {first / 'optimization_results.yaml'}" in err, err[-3000:]
    early = yaml.safe_load((first / "optimization_results.yaml").read_text())
    journal = JournalFileBackend(str(tmp_path / "mlruns" / "optuna" / "journal.log"))
    study = optuna.load_study(study_name="k_range", storage=optuna.storages.JournalStorage(journal))
    assert early["interrupted"] is True and early["n_trials"] == len(study.trials) >= 1
    # trial 0 FAIL; or, when the signal landed in a garbage-collection callback (which
    # Python cannot interrupt), trial 0 finished and the sweep stopped before trial 1
    assert early["trials"] == [{"number": t.number, "state": t.state.name, "folder": str(first / str(t.number))}
                               for t in study.trials]
    assert len(study.trials) == 1 and study.trials[0].state.name in ("FAIL", "COMPLETE")

    time.sleep(1.1)  # the same command, a second later: Hydra's timestamped folder differs
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (second,) = [d for d in multiruns.iterdir() if d != first]
    assert r.stdout.strip().splitlines()[-1].startswith(f"tardis-exp: sweep folder {second} ")
    final = yaml.safe_load((second / "optimization_results.yaml").read_text())
    study = optuna.load_study(study_name="k_range", storage=optuna.storages.JournalStorage(journal))
    assert "interrupted" not in final
    # the whole study, as its storage has it: every trial, its state, the folder it ran in
    assert final["n_trials"] == len(study.trials) == 3
    assert [(t["number"], t["state"]) for t in final["trials"]] == [(t.number, t.state.name) for t in study.trials]
    assert final["sweep_folders"] == sorted([str(first), str(second)])
    for t in final["trials"]:
        assert Path(t["folder"]).parent in (first, second) and Path(t["folder"]).name == str(t["number"])
        if t["state"] == "COMPLETE":
            assert (Path(t["folder"]) / "metrics.yaml").is_file()
    assert [Path(t["folder"]).parent for t in final["trials"]] == [first, second, second]
    assert final["best_trial"] == study.best_trial.number


def test_a_ctrl_c_python_swallowed_in_a_gc_callback_still_stops_the_sweep():
    """The interrupted-sweep test's rare failure: SIGINT landing in a weakref callback
    (SQLAlchemy's InstanceState._cleanup) is "Exception ignored" by Python and the sweep went
    on. A real SIGINT inside a real weakref callback, in a fresh interpreter."""
    root = str(Path(__file__).resolve().parents[1])
    script = f"""
import os, signal, sys, weakref
sys.path.insert(0, {root!r})
from hydra_plugins.tardis_optuna_sweeper._sweep_loop import _CatchInterrupt

class Obj: pass
caught = _CatchInterrupt()
o = Obj()
r = weakref.ref(o, lambda ref: os.kill(os.getpid(), signal.SIGINT))
del o  # the callback runs, the handler raises, Python ignores the KeyboardInterrupt
print("went on", flush=True)
try:
    caught.reraise()
except KeyboardInterrupt:
    print("reraised", flush=True)
caught.restore()
print("restored", signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)
"""
    import signal

    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "KeyboardInterrupt" in p.stderr and "Exception ignored" in p.stderr, p.stderr  # Python's own behaviour
    assert p.stdout.split() == ["went", "on", "reraised", "restored", "True"], (p.stdout, p.stderr)
