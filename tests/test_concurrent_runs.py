"""Runs started at once in one folder: each keeps its own run folder, the store survives.

Two ``tardis-exp`` processes started in the same second used to share
``outputs/runs/<time>/`` (one run's results overwritten), and two first runs at once in
an empty folder could leave ``mlruns/mlflow.db`` half-migrated for good.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMALL = ["data.n_spots=300", "data.n_genes=200", "data.n_programs=3", "data.n_markers=20",
         "factorize.n_components=4", "factorize.n_replicates=3", "consensus.n_resamples=10",
         "consensus.min_clusters=2", "consensus.max_clusters=4", "tracking.log_plots=false"]


def _hydra_dirs(root: Path) -> tuple[str, str]:
    import tardis_exp.cli  # noqa: F401  (registers the run-id resolver)
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as Hydra does before a job (paths go through ${hydra:...})
    return OmegaConf.select(cfg, "hydra.run.dir"), OmegaConf.select(cfg, "hydra.sweep.dir")


def test_run_folders_of_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.setenv("TARDIS_EXP_ROOT", str(tmp_path))
    a, b = _hydra_dirs(tmp_path), _hydra_dirs(tmp_path)
    # the folders must differ even when the two composes land in the same second (under load
    # two composes can take more than a second, so compare the parts after the time stamp)
    suffix = lambda d: Path(d).name.rsplit("_", 1)[1]  # noqa: E731
    assert suffix(a[0]) != suffix(b[0]) and suffix(a[1]) != suffix(b[1])
    for d in a:  # <output_dir>/(multi)runs/<YYYY-mm-dd_HH-MM-SS>_<6 hex digits>
        name = Path(d).name
        assert Path(d).parent.parent == tmp_path / "outputs"
        assert len(name) == len("2026-01-01_00-00-00_abcdef") and int(name[-6:], 16) >= 0


def test_two_runs_started_at_once_in_an_empty_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TARDIS_EXP_", "MLFLOW_", "HYDRA_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    procs = [subprocess.Popen([str(BIN / "tardis-exp"), *SMALL, f"data.seed={i}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    runs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 2, runs
    seeds = set()
    for d in runs:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        seeds.add(cfg["data"]["seed"])
        assert (d / "result.h5ad").is_file() and "best_k" in yaml.safe_load((d / "metrics.yaml").read_text())
    assert seeds == {0, 1}  # each folder holds its own run's config, not the other's

    db = tmp_path / "mlruns" / "mlflow.db"
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert not [r for r in con.execute("SELECT name FROM sqlite_master WHERE name LIKE '_alembic_tmp%'")]
    con.close()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("tardis-exp")
    parents = client.search_runs([exp.experiment_id], "tags.mlflow.source.name = 'tardis-exp'")
    assert len(parents) == 2 and {r.info.status for r in parents} == {"FINISHED"}
    assert {r.data.params["data.seed"] for r in parents} == {"0", "1"}
    # the store works after: a later process opens it (the schema check every run makes) and writes
    code = ("from mlflow import MlflowClient; c = MlflowClient(tracking_uri='sqlite:///mlruns/mlflow.db'); "
            "e = c.get_experiment_by_name('tardis-exp'); r = c.create_run(e.experiment_id); "
            "c.log_metric(r.info.run_id, 'm', 1.5); c.set_terminated(r.info.run_id); "
            "print(c.get_run(r.info.run_id).data.metrics['m'])")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "1.5", p.stderr[-4000:]
    assert len(client.search_runs([exp.experiment_id])) == 2 * 5 + 1  # 2 parents x (1 + 4 stages) + 1
