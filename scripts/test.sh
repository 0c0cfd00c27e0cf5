#!/usr/bin/env bash
# Set up (venv, package, test extras, services) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -e ".[test]"
# chromium (Debian) + Playwright for the MLflow UI test (tests/test_ui.py)
bash scripts/install_browser.sh
if [ -x scripts/start_postgres.sh ] && [ -z "${TARDIS_TEST_POSTGRES_URL:-}" ]; then
  TARDIS_TEST_POSTGRES_URL="$(bash scripts/start_postgres.sh)" || TARDIS_TEST_POSTGRES_URL=""
  export TARDIS_TEST_POSTGRES_URL
fi
# pytest-xdist: one worker per core (at most 8; each runs whole pipelines), tests that share a
# module's expensive fixture kept on one worker (tests/conftest.py, docs/testing.md)
workers="$(python -c 'import os; print(max(1, min(8, len(os.sched_getaffinity(0)))))')"
python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadgroup "$@"
