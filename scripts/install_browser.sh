#!/usr/bin/env bash
# Headless browser for tests/test_ui.py: Debian's chromium (apt) and Playwright's Python API
# (pip, in the active environment). Playwright drives /usr/bin/chromium: no browser download
# (`playwright install` is never run). Idempotent; a machine without apt keeps going and the
# browser test skips, saying chromium is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  else
    echo "install_browser.sh: no chromium and no root apt-get; tests/test_ui.py will skip" >&2
  fi
fi
python -c "import playwright" 2>/dev/null || pip install -q "playwright>=1.40"
