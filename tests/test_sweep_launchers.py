"""Sweeps through Hydra's launchers: joblib and submitit (issue 15, "Sweeps on clusters").

``tardis-exp -m`` with the project's sweeper runs its trials through
``hydra/launcher=joblib`` (loky worker processes) and ``hydra/launcher=submitit_local``
(one ``python -m submitit.core._submit`` process per trial: the local form of
docs/sweeps.md's ``submitit_slurm`` recipe, run as written), on tiny synthetic data,
against a real Optuna journal or PostgreSQL storage and a real MLflow SQLite store.
Checked, for each launcher, against a sweep of the same study with Hydra's basic
launcher in the same MLflow store:

* the batch of ``hydra.sweeper.n_jobs=2`` trials runs in processes of the launcher, and
  every trial completes (or fails, as it does with the basic launcher);
* running the command again with a larger ``n_trials`` resumes the study: the same
  study and the same MLflow study run, one trial more;
* the MLflow hierarchy is the basic launcher's: one study run, one run per trial under
  it, four stage runs under each, with the same names, params, tags, metric keys and
  (timings aside) metric values.

The search space is a grid over ``factorize.n_components`` with one rank that cannot be
fit (more components than genes): a FAIL trial, whose exception travels back from the
worker process (pickled by loky and by submitit), is part of the comparison.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CI = os.environ.get("CI") == "true"

# ~200 x 120 counts: the trials take about a second of compute; the processes' imports dominate
DATA = ["data.n_spots=200", "data.n_genes=120", "data.n_programs=3", "data.n_markers=20",
        "preprocess.n_top_genes=100", "factorize.n_replicates=3", "consensus.n_resamples=5",
        "consensus.min_clusters=2", "consensus.max_clusters=3",
        "hydra.sweeper.mlflow.log_plots=false", "hydra.sweeper.mlflow.best_trial_plots=false"]
# a grid: the same three trials whichever launcher runs them and however the study is
# split into invocations; n_components=500 > 100 genes fails in the factorize stage
RANKS = (3, 4, 500)
GRID = ["hydra.sweeper.sampler.name=grid", "hydra.sweeper.ordered_pairs=[]",
        "hydra.sweeper.params={factorize.n_components:'choice(" + ", ".join(map(str, RANKS)) + ")'}"]
# a credential on the command line (a tag holding a database URL): redacted wherever the
# trials write, whichever process runs them (Hydra's callbacks run in the launcher's workers)
SECRET = "s3cretpw"
SECRET_TAG = f"+tracking.tags.db='postgresql://u:{SECRET}@db-host/db'"
STAGES = {"preprocess", "factorize", "consensus", "score"}
# measured times and cache state depend on which process ran first, not on the launcher
TIMING = {"duration_s", "fit_seconds", "cache_seconds", "cache_hits", "cache_misses"}
VOLATILE_TAGS = {"mlflow.parentRunId", "mlflow.note.content", "cache", "cache.input", "mlflow.user"}


def _env(**extra: str) -> dict:
    env = dict(os.environ, TARDIS_EXP_PROGRESS="0", MPLBACKEND="Agg",
               # one BLAS thread in every process: the same arithmetic whichever process runs a
               # trial (and two trials at once do not oversubscribe two cores)
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def sweep(root: Path, study: str, launcher: str | None, n_trials: int, *args: str,
          head: list | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``tardis-exp -m sweep=k_range`` (or the command ``head``) on the tiny grid study."""
    if head is None:
        head = [sys.executable, "-m", "tardis_exp", "-m", "sweep=k_range",
                *([f"hydra/launcher={launcher}"] if launcher else []), "hydra.sweeper.n_jobs=2"]
    cmd = [*head, f"paths.root_dir={root}", f"hydra.sweep.dir={root}/multirun/{study}",
           f"hydra.sweeper.study_name={study}", f"hydra.sweeper.n_trials={n_trials}",
           f"cache.dir={root}/cache/{study}", *DATA, *GRID, SECRET_TAG, *args]
    p = subprocess.run(cmd, cwd=root, env=env or _env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"sweep failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    return p


def pg_url() -> str:
    """The test PostgreSQL server (scripts/start_postgres.sh); required under CI."""
    url = os.environ.get("TARDIS_TEST_POSTGRES_URL")
    if not url:
        if CI:
            pytest.fail("CI=true but TARDIS_TEST_POSTGRES_URL is not set (scripts/start_postgres.sh)")
        pytest.skip("TARDIS_TEST_POSTGRES_URL not set (see scripts/start_postgres.sh)")
    return url


def _client(root: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db")
    return client, client.get_experiment_by_name("tardis-exp").experiment_id


def _journal(root: Path) -> str:
    return str(root / "mlruns" / "optuna" / "journal.log")


def _load(storage: str, study: str) -> optuna.Study:
    if storage.endswith(".log"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.load_study(study_name=study,
                                 storage=optuna.storages.JournalStorage(JournalFileBackend(storage)))
    return optuna.load_study(study_name=study, storage=storage)


def _values(client, run) -> dict:
    return {k: v for k, v in run.data.metrics.items() if k not in TIMING}


def _tags(run, study: str) -> dict:
    return {k: v.replace(study, "<study>") for k, v in run.data.tags.items() if k not in VOLATILE_TAGS}


def hierarchy(client, exp: str, study: str) -> dict:
    """The study's MLflow runs, keyed by what they are (not by run id): the study run, and per
    rank its trial run with its stage runs, each as (status, params, tags, metrics)."""
    (parent,) = client.search_runs([exp], f"tags.`optuna.role` = 'study' and tags.`optuna.study_name` = '{study}'")
    out = {"study": (parent.info.status, parent.info.run_name.replace(study, "<study>"),
                     {k: v for k, v in parent.data.params.items() if k not in ("study.n_trials", "study.n_jobs")},
                     {k: v for k, v in _tags(parent, study).items() if not k.startswith("optuna.now.")},
                     sorted(parent.data.metrics))}
    trials = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    for t in trials:
        stages = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{t.info.run_id}'")
        names = [s.data.tags["stage"] for s in stages]
        assert len(names) == len(set(names)), names
        rank = int(t.data.params["factorize.n_components"])
        assert rank not in out, f"two trial runs for n_components={rank}"
        out[rank] = {
            "trial": (t.info.status, t.info.run_name, t.data.params, _tags(t, study), _values(client, t)),
            **{s.data.tags["stage"]: (s.info.status, s.info.run_name, s.data.params, _tags(s, study),
                                      _values(client, s)) for s in stages},
        }
    return out


def assert_same_hierarchy(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    assert got["study"] == want["study"]
    for rank in RANKS:
        assert got[rank].keys() == want[rank].keys(), rank
        for run, g in got[rank].items():
            w = want[rank][run]
            assert g[:4] == w[:4], (rank, run)  # status, name, params, tags
            assert g[4].keys() == w[4].keys(), (rank, run)
            for key, v in w[4].items():  # the same numbers, computed in another process
                assert g[4][key] == pytest.approx(v, rel=1e-9, abs=1e-12), (rank, run, key)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One MLflow store and journal for the reference sweep and the launchers' sweeps."""
    return tmp_path_factory.mktemp("launchers")


@pytest.fixture(scope="module")
def reference(root) -> dict:
    """The study run with Hydra's basic launcher (one trial at a time, in the sweep process)."""
    sweep(root, "basic", None, len(RANKS))
    client, exp = _client(root)
    return hierarchy(client, exp, "basic")


def test_reference_sweep(root, reference):
    """The reference itself: every rank once, the impossible one FAIL, the others COMPLETE."""
    assert set(reference) == {"study", *RANKS}
    for rank in RANKS:
        assert set(reference[rank]) == ({"trial", "preprocess", "factorize"} if rank == 500 else {"trial", *STAGES})
        assert reference[rank]["trial"][0] == ("FAILED" if rank == 500 else "FINISHED")
    assert "factorize.n_components=500" in reference[500]["trial"][3]["optuna.error"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_launcher_sweep_resumes_with_the_basic_launchers_mlflow_hierarchy(launcher, root, reference):
    """joblib: ``hydra/launcher=joblib`` on the default journal. submitit_local: the local form
    of docs/sweeps.md's SLURM recipe as written (storage and MLflow store from the environment
    variables it reads): on the test PostgreSQL server (required under CI), else the journal.
    Each run for 2 trials, then resumed to 3, and compared with the basic launcher's sweep."""
    from sqlalchemy.engine import make_url

    head, env, storage, pg = None, _env(), _journal(root), None
    study = launcher
    if launcher == "submitit_local":
        pg = os.environ.get("TARDIS_TEST_POSTGRES_URL")
        if not pg and CI:
            pytest.fail("CI=true but TARDIS_TEST_POSTGRES_URL is not set (scripts/start_postgres.sh)")
        storage = pg or storage
        # a study of its own on the persistent server
        study = f"submitit_local_{os.getpid()}_{int(time.time() * 1000)}"
        doc = _doc_commands()["submitit_local"]
        exe = Path(sys.executable).with_name("tardis-exp")
        head = [str(exe)] + doc[1:] if exe.exists() else [sys.executable, "-m", "tardis_exp"] + doc[1:]
        env = _env(TARDIS_OPTUNA_STORAGE=storage, MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlruns/mlflow.db")

    # first invocation: one batch of two trials, run by the launcher's worker processes
    p = sweep(root, study, launcher, 2, head=head, env=env)
    out = p.stdout + p.stderr
    if launcher == "joblib":
        assert "is launching 2 jobs" in out
    else:
        assert "Submitit 'local' sweep output dir" in out
    assert len(_load(storage, study).trials) == 2
    client, exp = _client(root)
    (parent,) = client.search_runs([exp], f"tags.`optuna.study_name` = '{study}' and tags.`optuna.role` = 'study'")
    # the same command with a larger budget resumes the study
    p2 = sweep(root, study, launcher, 3, head=head, env=env)
    out += p2.stdout + p2.stderr
    st = _load(storage, study)
    assert sorted(t.number for t in st.trials) == [0, 1, 2]
    states = {t.user_attrs["values"]["factorize.n_components"]: t.state.name for t in st.trials}
    assert states == {3: "COMPLETE", 4: "COMPLETE", 500: "FAIL"}
    res = yaml.safe_load((root / "multirun" / study / "optimization_results.yaml").read_text())
    assert (res["n_trials"], res["n_complete"], res["n_fail"], res["n_launched_by_this_worker"]) == (3, 2, 1, 1)
    assert res["mlflow_parent_run_id"] == parent.info.run_id  # the same study run, resumed
    assert res["storage"].startswith("postgresql" if pg else "journal:")

    got = hierarchy(client, exp, study)
    assert_same_hierarchy(got, reference)
    # the study run was created with n_trials=2; the resumed budget is a tag (params are immutable)
    parent = client.get_run(parent.info.run_id)
    assert parent.data.params["study.n_trials"] == "2" and parent.data.tags["optuna.now.study.n_trials"] == "3"

    # every trial wrote its own folder <sweep dir>/<trial number>, which names its MLflow run
    for t in st.trials:
        folder = root / "multirun" / study / str(t.number)
        assert t.user_attrs["output_dir"] == str(folder)
        hydra_cfg = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert hydra_cfg["job"]["num"] == t.number
        if launcher == "submitit_local":  # the submitit job that ran it
            job_id = hydra_cfg["job"]["id"]
            assert re.fullmatch(r"\d+", str(job_id)) and (root / "multirun" / study / ".submitit" / str(job_id)).is_dir()
        if t.state.name == "COMPLETE":
            m = yaml.safe_load((folder / "metrics.yaml").read_text())
            assert m["mlflow_run_id"] == t.user_attrs["mlflow_run_id"]
            assert (folder / "result.h5ad").is_file()
    from _mlflow_keys import check_metric_keys

    check_metric_keys(client, exp)

    # the credential: redacted in the trials' MLflow tags, Hydra's files, results, the Optuna
    # journal and the MLflow store; submitit's job pickles (.submitit/) hold the command line
    # as it was given (docs/sweeps.md: pass credentials through ${oc.env:...} on a cluster)
    assert got[3]["trial"][3]["db"] == "postgresql://u:***@db-host/db"
    files = [f for d in (root / "multirun" / study, root / "mlruns") for f in d.rglob("*") if f.is_file()]
    leaks = sorted(str(f.relative_to(root)) for f in files if SECRET.encode() in f.read_bytes())
    assert all(f.startswith(f"multirun/{study}/.submitit/") for f in leaks), leaks
    assert launcher != "joblib" or not leaks
    if pg:  # given through ${oc.env:...}, the storage's password is in no file at all
        u = make_url(pg)
        cred = f"{u.username}:{u.password}@"
        assert not [str(f) for f in files if cred.encode() in f.read_bytes()] and cred not in out


def test_resumed_grid_study_runs_every_point_once():
    """A grid study resumed by a new process (the launchers' resume, a second worker) runs the
    points the first process did not. Optuna's GridSampler shuffles the grid with its seed and
    stores the index into that order; the seed offset the sweeper gives other samplers on a
    resume sent trial 2 of the study above to the point of trial 0 (and never ran rank 500)."""
    from hydra_plugins.tardis_optuna_sweeper._samplers import build_sampler
    from hydra_plugins.tardis_optuna_sweeper._search_space import build_search_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = build_search_space({"factorize.n_components": "choice(3, 4, 500, 7, 9)"}, [], [])
    cfg = {"name": "grid", "seed": 42}
    storage = optuna.storages.InMemoryStorage()
    ran = []
    for n0 in (0, 2, 3):  # three processes: 2 trials, then 1, then the rest
        study = optuna.create_study(storage=storage, study_name="g", load_if_exists=True)
        study.sampler = build_sampler(cfg, space, 1, n0)  # as the sweeper's loop does
        for _ in range(2 if n0 != 2 else 1):
            trial = study.ask()
            ran.append(space.sample(trial, grid=True)[0][2])
            if len(ran) < 5:  # the tell that exhausts a grid calls study.stop()
                study.tell(trial, 0.0)
    assert sorted(ran) == [3, 4, 7, 9, 500]


# --------------------------------------------------------------------------- PostgreSQL


@pytest.mark.postgres
def test_joblib_sweep_on_postgres_resumes(tmp_path):
    """hydra/launcher=joblib against a PostgreSQL study (the toy app of tests/test_sweeper.py:
    the trials' processes never touch the storage, the sweep process does): the batch runs in
    worker processes, and the command run again with a larger budget adds to the study."""
    url = pg_url()
    study = f"joblib_pg_{os.getpid()}_{int(time.time() * 1000)}"
    log = tmp_path / "calls.jsonl"

    def run(n_trials: int) -> int:
        cmd = [sys.executable, str(ROOT / "tests" / "sweeper_app" / "app.py"), "-m", "hydra/sweeper=tardis_optuna",
               "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2", f"hydra.sweeper.n_trials={n_trials}",
               f"hydra.sweeper.study_name={study}", f"hydra.sweeper.storage={url}",
               f"hydra.sweep.dir={tmp_path}/multirun", f"paths.root_dir={tmp_path}",
               "hydra.sweeper.objectives=[{metric:loss,direction:minimize}]", "x=interval(-1,1)", f"log_file={log}"]
        p = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-6000:]
        return p.pid

    import json

    sweeper_pid = run(2)
    st = optuna.load_study(study_name=study, storage=url)
    assert [t.state.name for t in st.trials] == ["COMPLETE", "COMPLETE"]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(c["x"] for c in calls) == sorted(t.params["x"] for t in st.trials)
    assert sweeper_pid not in {c["pid"] for c in calls}  # the trials ran in joblib's workers
    run(3)
    st = optuna.load_study(study_name=study, storage=url)
    assert [t.number for t in st.trials] == [0, 1, 2] and all(t.state.name == "COMPLETE" for t in st.trials)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # one more call, with trial 2's x: trials 0 and 1 were not run again
    assert sorted(c["x"] for c in calls) == sorted(t.params["x"] for t in st.trials)


# --------------------------------------------------------------------------- the SLURM recipe


def _doc_commands() -> dict:
    """docs/sweeps.md's submitit commands, as argument lists, by launcher."""
    text = (ROOT / "docs" / "sweeps.md").read_text()
    cmds = {}
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"hydra/launcher=(submitit_\w+)", line)
            if line.strip().startswith("tardis-exp -m") and m:
                assert m.group(1) not in cmds, f"two {m.group(1)} commands in docs/sweeps.md"
                cmds[m.group(1)] = shlex.split(line)
    assert set(cmds) == {"submitit_slurm", "submitit_local"}, cmds
    return cmds


SLURM_ONLY = ("hydra.launcher.partition=", "hydra.launcher.array_parallelism=")


def test_slurm_recipe_keys_are_the_launchers_and_give_the_sbatch_script(tmp_path, monkeypatch):
    """The SLURM command of docs/sweeps.md: its local form is the same command apart from the
    launcher name and the SLURM-only keys; its keys exist in hydra-submitit-launcher's config
    (a misspelt key does not compose) and give the sbatch options the page's table names."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    cmds = _doc_commands()
    slurm, local = cmds["submitit_slurm"], cmds["submitit_local"]
    assert local == [a.replace("submitit_slurm", "submitit_local") for a in slurm if not a.startswith(SLURM_ONLY)]
    assert all(any(a.startswith(k) for a in slurm) for k in SLURM_ONLY)

    monkeypatch.setenv("TARDIS_OPTUNA_STORAGE", "postgresql+psycopg2://u:pw@db-host/optuna")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=slurm[2:], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("SlurmLauncher")
    given = {a.split("=", 1)[0][len("hydra.launcher."):]: a.split("=", 1)[1]
             for a in slurm if a.startswith("hydra.launcher.")}
    assert set(given) == {"timeout_min", "cpus_per_task", "mem_gb", "partition", "array_parallelism"}
    assert {k: str(launcher[k]) for k in given} == given
    # the storage stays an interpolation in the config (what submitit pickles), resolved on use
    assert OmegaConf.to_container(cfg.hydra.sweeper, resolve=False)["storage"] == "${oc.env:TARDIS_OPTUNA_STORAGE}"
    assert cfg.hydra.sweeper.storage == "postgresql+psycopg2://u:pw@db-host/optuna"

    # the launcher's own translation (SlurmLauncher.launch): generic keys as they are, the
    # others prefixed with the executor's name; submitit writes the sbatch script from them.
    # submitit refuses to build a SLURM executor without srun on PATH: an empty one is enough,
    # nothing is submitted.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    launcher["name"] = "tardis-exp"  # ${hydra.job.name}, set when a job runs
    params = {k if k in generic else f"slurm_{k}": v for k, v in launcher.items()
              if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "sub")
    executor.update_parameters(**params)
    executor._executor.parameters["map_count"] = 8  # a batch of n_jobs=8 trials: one job array
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("--partition=cpu", "--cpus-per-task=4", "--mem=16GB", "--time=60", "--array=0-7%8"):
        assert f"#SBATCH {line}\n" in script, (line, script)
