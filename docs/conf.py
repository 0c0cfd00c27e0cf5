"""Sphinx configuration of the tardis_exp documentation (MyST markdown pages + API reference).

Build (warnings are errors, as in CI): ``bash scripts/build_docs.sh``, or with the ``docs``
extra installed, ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# the checkout's package, whether or not it is installed (autodoc imports it)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tardis_exp import __version__  # noqa: E402
from tardis_exp.params import PARAMS, describe  # noqa: E402
from tardis_exp.sources import describe as describe_sources  # noqa: E402


def _write_parameter_reference() -> None:
    """docs/generated/parameters.md: one table per config group, from params.py (included
    by usage.md; never written by hand, so it cannot drift from the code)."""
    out = Path(__file__).resolve().parent / "generated" / "parameters.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(f"#### `{group}`\n\n{describe(group)}\n\n" for group in PARAMS))
    # the data sources, from their registry (tardis_exp.sources)
    (out.parent / "sources.md").write_text(describe_sources() + "\n")


_write_parameter_reference()

project = "tardis_exp"
author = "the tardis_exp authors"
copyright = "the tardis_exp authors"
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
]

# every *.md under docs/ is a page: index.md's toctree lists the guide pages in reading order
# and ends with the glob "*", which picks up every other page (the benchmark tables the
# scripts write, a new page not yet placed); placing a page is one line in that list.
# .rst only for the API pages autosummary writes into generated/ (git-ignored)
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
master_doc = root_doc = "index"
# generated/parameters.md is included by usage.md, not a page of its own
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "generated/parameters.md", "generated/sources.md"]

# MyST: ``[text](usage.md#config-groups-conf)`` links resolve to headings down to ###
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

# API reference: numpy-style docstrings, one page per object, written by autosummary
autosummary_generate = True
# classes: their own documented methods (not every inherited scikit-learn method)
templates_path = ["_templates"]
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    # scikit-learn's metadata-routing setter (generated on every estimator, documented there)
    "exclude-members": "set_inverse_transform_request, set_fit_request, set_transform_request",
}
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

html_theme = "sphinx_book_theme"
html_title = "tardis_exp"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
