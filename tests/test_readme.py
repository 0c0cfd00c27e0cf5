"""Every command README.md shows runs as written, from an empty folder.

The README's fenced ``bash`` blocks are parsed (one command per line, ``\\`` continuations
joined, comments skipped) and run one by one with ``bash -c`` in a fresh temporary
folder, with this virtual environment's ``bin`` on ``PATH`` and nothing else set but the
two documented size variables of the default synthetic data. No command gets an
extra override, and nothing points the outputs anywhere: they land in the empty folder
the way they would for a new user. The ``python`` blocks run the same way after them.

Command 1 (``python3 -m venv .venv && ... && tardis-exp``) runs in a copy of the
repository's files. Its virtual environment sees the packages already installed in this
one through a ``.pth`` file, so ``pip install -c constraints.txt -e .`` installs the copy without
downloading its dependencies (``scripts/test.sh`` in CI installs them from scratch).
Command 2 (``bash scripts/test.sh``) is this test suite; running it from a test would
run the suite inside itself, so the test checks only that the script is there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BIN = Path(sys.executable).parent
# the documented knob that makes the default synthetic data smaller (README, "A worked example")
SMALL = {"TARDIS_EXP_SYNTHETIC_SPOTS": "900", "TARDIS_EXP_SYNTHETIC_GENES": "800"}
COMMAND_1 = "python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e . && tardis-exp"
COMMAND_2 = "bash scripts/test.sh"


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def commands(body: str) -> list[str]:
    """The command lines of a bash block: continuations joined, comments and blanks dropped."""
    out, cur = [], ""
    for line in body.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append((cur + line).strip())
        cur = ""
    assert not cur, f"dangling continuation: {cur!r}"
    return out


def readme_blocks() -> list[tuple[str, str]]:
    return fenced_blocks(README.read_text())


def clean_env(**extra: str) -> dict[str, str]:
    """The user's environment: this venv's bin on PATH, no project variables set."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TARDIS_EXP_", "MLFLOW_", "HYDRA_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(SMALL, **extra)
    return env


def sh(cmd: str, cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"`{cmd}` exited {p.returncode} in {cwd}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def test_readme_parses_and_starts_with_the_two_commands():
    blocks = readme_blocks()
    lang, body = blocks[0]
    assert lang == "bash" and commands(body) == [COMMAND_1, COMMAND_2]
    assert README.read_text().startswith("# tardis_exp\n\n```bash\n# 1.")
    assert (REPO / "scripts" / "test.sh").is_file()
    # every documentation page the README links to exists
    for link in re.findall(r"\]\((docs/[^)#]+)\)", README.read_text()):
        assert (REPO / link).is_file(), link
    assert len(README.read_text().splitlines()) <= 120  # a front page; the rest is in docs/


def test_commands_parser():
    body = "# c\n\nfoo a \\\n    b   # tail\nbar\n"
    assert [c.split() for c in commands(body)] == [["foo", "a", "b", "#", "tail"], ["bar"]]
    assert [lang for lang, _ in fenced_blocks("```bash\nx\n```\ntext\n```python\ny\n```\n")] == ["bash", "python"]


def _run_folders(root: Path) -> set[Path]:
    """The single runs' folders: outputs/runs/<time>_<id>/, or where hydra.run.dir put one."""
    return {p.parent for p in (root / "outputs").glob("**/config.yaml")
            if "multiruns" not in p.parts and ".hydra" not in p.parts}


def _n_pipelines(work: Path) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("tardis-exp")
    return len(client.search_runs([exp.experiment_id], "tags.mlflow.source.name = 'tardis-exp'"))


def test_readme_commands_run_as_written(tmp_path: Path):
    """Every command after the first block, in order, in one empty folder (as a new user would)."""
    blocks = readme_blocks()[1:]
    runnable = [(lang, body) for lang, body in blocks if lang in ("bash", "python")]
    assert runnable, "the README shows no commands besides the two"
    work = tmp_path / "empty"
    work.mkdir()
    env = clean_env()
    # the README makes its own x.h5ad (the generator, one line): the folder starts empty

    ran: list[tuple[str, set[Path], str]] = []
    for lang, body in runnable:
        if lang == "python":
            p = subprocess.run([str(BIN / "python"), "-c", body], cwd=work, env=env, capture_output=True,
                               text=True, timeout=300)
            assert p.returncode == 0, f"README python block failed:\n{body}\n{p.stderr[-3000:]}"
            ran.append((body, set(), (p.stdout, _n_pipelines(work))))  # the runs made before it
            continue
        for cmd in commands(body):
            before, t0 = _run_folders(work), time.perf_counter()
            p = sh(cmd, work, env)
            print(f"{time.perf_counter() - t0:6.1f} s  {cmd}")
            ran.append((cmd, _run_folders(work) - before, p.stdout))

    # what the commands computed, against what the data was made with
    single = [(cmd, new) for cmd, new, _ in ran if cmd.startswith("tardis-exp") and " -m " not in f" {cmd} "
              and "--cfg" not in cmd and "--help" not in cmd]
    assert single, "no single run in the README"
    for cmd, new in single:
        assert len(new) == 1, f"`{cmd}` made {len(new)} run folders"
        folder = next(iter(new))
        metrics = yaml.safe_load((folder / "metrics.yaml").read_text())
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        assert (folder / "result.h5ad").is_file() and (folder / "programs.tsv").is_file()
        if cfg["data"]["source"] == "synthetic":
            # the planted programs (the default 6, or data.n_programs=...) are found, all of them
            assert metrics["best_k"] == cfg["data"]["n_programs"], cmd
            assert metrics["program_recovery"] == pytest.approx(1.0), cmd
            assert cfg["data"]["n_spots"] == int(SMALL["TARDIS_EXP_SYNTHETIC_SPOTS"])
        elif cfg["data"]["source"] == "samples":  # sections of one benchmark draw (--write)
            _check_study(work, folder, cfg, metrics)
        else:  # x.h5ad holds 4 planted programs the run was not told about
            assert metrics["best_k"] == 4, cmd
            assert (work / "x.h5ad").is_file()
    # the run folders and the MLflow store are in the empty folder, one folder per run
    assert len(_run_folders(work)) == len(single)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("tardis-exp")
    pipelines = client.search_runs([exp.experiment_id], "tags.mlflow.source.name = 'tardis-exp'")
    assert all(r.info.status == "FINISHED" for r in pipelines)
    assert len([r for r in pipelines if "optuna_trial" not in r.data.tags]) == len(single)
    # the sweep (with no path override) wrote its study next to them
    sweeps = [cmd for cmd, _, _ in ran if cmd.startswith("tardis-exp -m")]
    for cmd in sweeps:
        n = int(re.search(r"n_trials=(\d+)", cmd).group(1))
        results = list((work / "outputs" / "multiruns").glob("*/optimization_results.yaml"))
        assert len(results) == len(sweeps)
        res = yaml.safe_load(results[0].read_text())
        assert "best_params" in res and "factorize.n_components" in res["best_params"]
        import optuna

        study = optuna.load_study(study_name="k_range", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(work / "mlruns" / "optuna" / "journal.log"))))
        assert len(study.trials) == n and all(t.state.name == "COMPLETE" for t in study.trials)
    # the python block printed the runs it found
    printed = [out for cmd, _, out in ran if cmd.lstrip().startswith("import mlflow")]
    for out, n_before in printed:
        # one line per pipeline run made before it (single runs and sweep trials) under the header
        assert "program_recovery" in out and len(out.strip().splitlines()) == 1 + n_before
    assert set(os.listdir(work)) <= {"x.h5ad", "x.zarr", "outputs", "mlruns", ".cache", "study", "S2_scored.h5ad"}


def _best_r(usage, truth) -> np.ndarray:
    """For each planted program, the best Pearson r of a found program's usage with it."""
    C = np.corrcoef(np.asarray(usage, dtype=np.float64).T, np.asarray(truth, dtype=np.float64).T)
    return np.nan_to_num(C[:usage.shape[1], usage.shape[1]:], nan=-1.0).max(0)


def _check_study(work: Path, folder: Path, cfg, metrics) -> None:
    """The README's study of two sections: against the draw's truth in the section files."""
    import anndata as ad

    paths = [work / p for p in cfg["data"]["paths"]]
    info = ad.read_h5ad(paths[0]).uns["benchmark"]
    spec = info["section_specific"]
    in_study = [p.stem.rsplit("_", 1)[1] for p in paths]
    # the shared programs, plus the section-only one when its section is in the study
    assert metrics["best_k"] == info["planted_k"] - (spec["section"] not in in_study)
    result = ad.read_h5ad(folder / "result.h5ad")
    t = result.uns["nmf_samples"]
    U, T = result.obsm["X_nmf_consensus"], result.obsm["true_usage"]
    assert (_best_r(U, T) > 0.8).all()
    # the flagged program is the planted section-only one, flagged for its own section
    flagged = np.flatnonzero(np.asarray(t["sample_specific"], dtype=bool))
    assert metrics["n_sample_specific"] == len(flagged) == 1
    assert str(t["specific_to"][flagged[0]]).endswith(spec["section"])
    assert _best_r(U[:, flagged], T[:, [spec["program"]]])[0] > 0.8
    assert (folder / "programs_by_sample.tsv").is_file() and (folder / "plots" / "programs_by_section.png").is_file()
    # the third section, scored against the study's programs: the shared programs are found
    proj = ad.read_h5ad(work / "S2_scored.h5ad")
    shared = [k for k in range(T.shape[1]) if k != spec["program"]]
    assert (_best_r(proj.obsm["X_nmf_projected"], proj.obsm["true_usage"][:, shared]) > 0.8).all()


def _clone_like_copy(dst: Path) -> None:
    """The repository's tracked files (what a clone holds), without the git history."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def _importable_from(python: Path, module: str, cwd: Path) -> Path:
    out = subprocess.run([str(python), "-c", f"import {module}; print({module}.__file__)"], cwd=cwd,
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out).resolve()


@pytest.mark.slow
def test_command_1_in_a_copy_of_the_repository(tmp_path: Path):
    repo = tmp_path / "clone"
    _clone_like_copy(repo)
    assert not (repo / ".venv").exists() and not (repo / "outputs").exists()
    # Pre-seed .venv (with its own pip) so that pip finds the dependencies this environment
    # already has through a .pth file; command 1's own `python3 -m venv .venv` keeps it, and
    # `pip install -e .` installs the copy into it. pip leaves packages outside the
    # environment alone, and this venv's bin is not on PATH, so this one stays untouched.
    subprocess.run(["python3", "-m", "venv", str(repo / ".venv")], check=True,
                   env={**os.environ, "PATH": _path_without(BIN)})
    venv_python = repo / ".venv" / "bin" / "python"
    purelib = subprocess.run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_tardis_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1")
    env["PATH"] = _path_without(BIN)
    try:
        p = sh(COMMAND_1, repo, env, timeout=900)
        # the copy was installed into its own .venv and ran there
        assert _importable_from(venv_python, "tardis_exp", tmp_path).is_relative_to(repo.resolve())
        (folder,) = _run_folders(repo)
        metrics = yaml.safe_load((folder / "metrics.yaml").read_text())
        assert metrics["best_k"] == 6 and metrics["program_recovery"] == pytest.approx(1.0)
        assert (repo / "mlruns" / "mlflow.db").is_file()
        assert "tardis_exp" in p.stdout + p.stderr
    finally:
        # this environment still runs this checkout
        assert _importable_from(Path(sys.executable), "tardis_exp", tmp_path).is_relative_to(REPO)


def _path_without(d: Path) -> str:
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != d.resolve())
