#!/usr/bin/env bash
# Build the documentation site (docs/*.md + the API reference from the docstrings) into
# docs/_build/html with warnings as errors, as CI does. Uses the active virtual environment,
# else ./.venv (created when missing), and installs the package with its `docs` extra there.
# Extra arguments go to sphinx-build (e.g. -j 2).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  . .venv/bin/activate
fi
pip install -q -e ".[docs]"
# autosummary's pages are written from the current docstrings; stale ones (a renamed
# function) would fail the build, so they go first; -E rereads every page, so a warning
# in a page that did not change still fails the build
rm -rf docs/generated
sphinx-build -W --keep-going -E -q -b html docs docs/_build/html "$@"
echo "build_docs: docs/_build/html/index.html"
