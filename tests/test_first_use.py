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
