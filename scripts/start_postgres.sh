#!/usr/bin/env bash
# Start a throw-away local PostgreSQL for the sweeper tests (tests/test_sweeper.py -m postgres).
# Idempotent; run as root on Debian/Ubuntu. Listens on 127.0.0.1 only.
# Prints the SQLAlchemy URL on stdout, e.g.:
#   export TARDIS_TEST_POSTGRES_URL=$(scripts/start_postgres.sh)
set -euo pipefail

PORT="${TARDIS_PG_PORT:-5433}"
DB="${TARDIS_PG_DB:-tardis_test}"
USER_NAME="${TARDIS_PG_USER:-tardis}"
PASSWORD="${TARDIS_PG_PASSWORD:-tardis}"
DATA_DIR="${TARDIS_PG_DATA:-/var/lib/postgresql/tardis-test}"
LOG_FILE="${DATA_DIR}.log"

log() { echo "[start_postgres] $*" >&2; }

if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  log "installing postgresql"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"

as_pg() { if [ "$(id -un)" = postgres ]; then "$@"; else runuser -u postgres -- "$@"; fi; }

if [ ! -s "$DATA_DIR/PG_VERSION" ]; then
  log "initdb $DATA_DIR"
  mkdir -p "$DATA_DIR"
  chown postgres:postgres "$DATA_DIR"
  # peer auth on the local socket for the admin steps; passwords (scram) over TCP
  as_pg "$BIN/initdb" -D "$DATA_DIR" --auth-local=peer --auth-host=scram-sha-256 -U postgres >&2
fi

if ! as_pg "$BIN/pg_ctl" -D "$DATA_DIR" status >/dev/null 2>&1; then
  log "starting on 127.0.0.1:$PORT"
  touch "$LOG_FILE"; chown postgres:postgres "$LOG_FILE"
  as_pg "$BIN/pg_ctl" -D "$DATA_DIR" -l "$LOG_FILE" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k /tmp -c max_connections=200" start >&2
fi

psql_pg() { as_pg psql -h /tmp -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ "$(psql_pg -c "SELECT 1 FROM pg_roles WHERE rolname='$USER_NAME'")" != 1 ]; then
  psql_pg -c "CREATE ROLE $USER_NAME LOGIN PASSWORD '$PASSWORD'" >&2
fi
# the tests create a fresh database per run of the concurrent-schema-creation test
if [ "$(psql_pg -c "SELECT rolcreatedb FROM pg_roles WHERE rolname='$USER_NAME'")" != t ]; then
  psql_pg -c "ALTER ROLE $USER_NAME CREATEDB" >&2
fi
if [ "$(psql_pg -c "SELECT 1 FROM pg_database WHERE datname='$DB'")" != 1 ]; then
  psql_pg -c "CREATE DATABASE $DB OWNER $USER_NAME" >&2
fi

echo "postgresql+psycopg2://$USER_NAME:$PASSWORD@127.0.0.1:$PORT/$DB"
