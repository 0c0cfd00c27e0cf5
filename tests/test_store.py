"""Code identity of a cached stage: the stage module and every tardis_exp module it imports.

Works on a copy of the package: renaming a module or moving a helper into a new one changes
the key, and so does any later edit of the moved code -- no list of file names to forget.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tardis_exp.store import closure_digest, code_digest, module_closure

PKG = Path(__file__).resolve().parents[1] / "tardis_exp"
FACTORIZE = ("tardis_exp.preprocess", "tardis_exp.factorize")  # the factorize entry's code (and upstream)


def _digest(root: Path, modules=FACTORIZE) -> tuple[str, set[str]]:
    closure = {}
    for m in modules:
        closure.update(module_closure(m, "tardis_exp", root))
    return closure_digest(closure), set(closure)


@pytest.fixture
def copy(tmp_path):
    root = tmp_path / "tardis_exp"
    shutil.copytree(PKG, root, ignore=shutil.ignore_patterns("__pycache__", "*.gz", "*.txt"))
    return root


def _edit(path: Path, old: str, new: str) -> None:
    src = path.read_text()
    assert old in src, f"{path.name} no longer holds {old!r}; update this test"
    path.write_text(src.replace(old, new, 1))


def test_the_closure_follows_imports_not_file_names(copy):
    d0, names = _digest(copy)
    # the solver and its kernels (imported inside a function) are part of factorize's code ...
    assert {"tardis_exp.factorize", "tardis_exp.nmf", "tardis_exp._kernels", "tardis_exp.preprocess",
            "tardis_exp.params", "tardis_exp.errors"} <= names
    # ... modules it never imports are not: editing them keeps the entries
    assert not names & {"tardis_exp.plots", "tardis_exp.pipeline", "tardis_exp.tracking", "tardis_exp.consensus"}
    (copy / "plots.py").write_text((copy / "plots.py").read_text() + "\n# edited\n")
    assert _digest(copy)[0] == d0
    # the copy is the installed package's code, hashed the same way
    assert d0 == code_digest(*FACTORIZE)


def test_renaming_a_helper_module_is_not_a_stale_hit(copy):
    d0, _ = _digest(copy)
    (copy / "_kernels.py").rename(copy / "_products.py")
    _edit(copy / "nmf.py", "from ._kernels import", "from ._products import")
    d1, names = _digest(copy)
    assert d1 != d0 and "tardis_exp._products" in names and "tardis_exp._kernels" not in names
    # the renamed module is still followed: an edit of its code changes the key again
    _edit(copy / "_products.py", "import numpy as np", "import numpy as np  # an edit")
    assert _digest(copy)[0] not in (d0, d1)


def test_moving_a_helper_into_a_new_module_is_followed(copy):
    src = (copy / "nmf.py").read_text()
    start = src.index("def derive_seeds(")
    nxt = re.search(r"\n(?=[^\s#])", src[start + 1:])  # the next top-level statement, if any
    end = len(src) if nxt is None else start + 1 + nxt.start()
    body = src[start:end]
    (copy / "_seeds.py").write_text("import numpy as np\n\n\n" + body)
    (copy / "nmf.py").write_text(src[:start] + "from ._seeds import derive_seeds  # noqa: E402\n\n" + src[end:])
    d1, names = _digest(copy)
    assert "tardis_exp._seeds" in names
    # a later change of the moved helper, in its new file, changes the key
    _edit(copy / "_seeds.py", "import numpy as np", "import numpy as np  # changed")
    assert _digest(copy)[0] != d1


def test_the_stage_cache_keys_on_the_code_of_its_stage_and_upstream():
    from tardis_exp.cache import _code_digest

    assert _code_digest("preprocess") == code_digest("tardis_exp.preprocess")
    assert _code_digest("factorize") == code_digest(*FACTORIZE)
    assert _code_digest("consensus") == code_digest(*FACTORIZE, "tardis_exp.consensus")
    assert len({_code_digest(s) for s in ("preprocess", "factorize", "consensus")}) == 3
