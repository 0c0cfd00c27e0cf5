"""The wheel a user builds: no setuptools warning about left-out packages, every config file in it.

``pip wheel`` (build isolation: the setuptools a fresh install gets) runs on a copy of the
repository's files, so nothing is written into the checkout; ``-v`` shows the build
backend's output, where setuptools prints its "Package would be ignored" warnings.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_builds_without_ignored_packages_and_carries_the_config(tmp_path: Path):
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    src = tmp_path / "src"
    for f in filter(None, files):
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path / "dist"),
                        str(src)], capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "Package would be ignored" not in out, \
        "setuptools left a package out (add it to [tool.setuptools] packages in pyproject.toml):\n" + "\n".join(
            line for line in out.splitlines() if "recognizes" in line)
    (wheel,) = (tmp_path / "dist").glob("tardis_exp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # every YAML file of conf/ ships as tardis_exp/conf/... (what Hydra composes from)
    conf = [f for f in files if f.startswith("conf/") and f.endswith(".yaml")]
    assert len(conf) > 10
    missing = [f for f in conf if "tardis_exp/" + f not in names]
    assert not missing, missing
    # every module of the checkout ships: a regular package left out of [tool.setuptools]
    # packages (tardis_exp/tracking/, say) is dropped from the wheel without any warning
    code = [f for f in files if f.startswith(("tardis_exp/", "hydra_plugins/")) and f.endswith(".py")]
    assert len(code) > 30
    missing = [f for f in code if f not in names]
    assert not missing, f"not in the wheel (add the package to [tool.setuptools] packages): {missing}"
