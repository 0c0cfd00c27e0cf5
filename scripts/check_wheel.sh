#!/usr/bin/env bash
# Build the wheel from this checkout, install it into a fresh virtual environment and run
# `tardis-exp` (the default job) from an empty folder: the config must ship in the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip wheel -q --no-deps -w "$work/dist" . >/dev/null
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip >/dev/null
"$work/venv/bin/pip" install -q "$work"/dist/tardis_exp-*.whl
mkdir "$work/empty"
cd "$work/empty"
"$work/venv/bin/tardis-exp" > "$work/run.log" 2>&1 || { tail -20 "$work/run.log"; exit 1; }
best_k="$(grep '^best_k:' outputs/runs/*/metrics.yaml | awk '{print $2}')"
[ "${best_k%.0}" = 6 ] || { echo "check_wheel: best_k=$best_k, expected 6" >&2; exit 1; }
test -s mlruns/mlflow.db
echo "check_wheel: wheel installed in a fresh venv, tardis-exp ran from an empty folder (best_k=6)"
