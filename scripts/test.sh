#!/usr/bin/env bash
# Set up (venv, package, test extras, services) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "[test.sh] $*" >&2; }
starts_pg=0
if [ -x scripts/start_postgres.sh ] && [ -z "${TARDIS_TEST_POSTGRES_URL:-}" ]; then starts_pg=1; fi
say "installs: the package and its test extras into .venv (pip, versions from constraints.txt)"
say "installs, as root with apt-get and only if missing: chromium and fonts-dejavu-core (scripts/install_browser.sh)$(
  [ "$starts_pg" = 1 ] && echo ", postgresql (scripts/start_postgres.sh)")"
if [ "$starts_pg" = 1 ]; then
  say "starts: a PostgreSQL server on 127.0.0.1:${TARDIS_PG_PORT:-5433} (data ${TARDIS_PG_DATA:-/var/lib/postgresql/tardis-test}), left running after the tests"
  # said at the end whatever pytest returns
  trap '[ -z "${TARDIS_TEST_POSTGRES_URL:-}" ] || say "the PostgreSQL server on 127.0.0.1:${TARDIS_PG_PORT:-5433} is still running; stop it with: bash scripts/stop_postgres.sh (runuser -u postgres -- $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)/pg_ctl -D ${TARDIS_PG_DATA:-/var/lib/postgresql/tardis-test} stop)"' EXIT
fi
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -c constraints.txt -e ".[test]"
# chromium (Debian) + Playwright for the MLflow UI test (tests/test_ui.py)
bash scripts/install_browser.sh
if [ "$starts_pg" = 1 ]; then
  TARDIS_TEST_POSTGRES_URL="$(bash scripts/start_postgres.sh)" || TARDIS_TEST_POSTGRES_URL=""
  export TARDIS_TEST_POSTGRES_URL
fi
# pytest-xdist: one worker per core (at most 8; each runs whole pipelines), tests that share a
# module's expensive fixture kept on one worker (tests/conftest.py, docs/testing.md)
workers="$(python -c 'import os; print(max(1, min(8, len(os.sched_getaffinity(0)))))')"
python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadgroup "$@"
