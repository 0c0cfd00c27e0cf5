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
python -m pytest -q -p no:cacheprovider "$@"
