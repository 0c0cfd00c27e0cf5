#!/usr/bin/env bash
# Stop the throw-away PostgreSQL that scripts/start_postgres.sh started (scripts/test.sh leaves
# it running for the next run). Same variables as start_postgres.sh; the data folder stays.
set -euo pipefail
DATA_DIR="${TARDIS_PG_DATA:-/var/lib/postgresql/tardis-test}"
BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
[ -n "$BIN" ] || { echo "stop_postgres: no PostgreSQL installed" >&2; exit 0; }
as_pg() { if [ "$(id -un)" = postgres ]; then "$@"; else runuser -u postgres -- "$@"; fi; }
if as_pg "$BIN/pg_ctl" -D "$DATA_DIR" status >/dev/null 2>&1; then
  as_pg "$BIN/pg_ctl" -D "$DATA_DIR" -m fast stop
else
  echo "stop_postgres: no server running on $DATA_DIR" >&2
fi
