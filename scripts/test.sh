#!/usr/bin/env bash
# Fresh machine -> the whole test suite (unit, integration with real Redis/SQL/Celery, browser).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh" test
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # the browser tests drive Debian's headless Chromium (Playwright's own download is not used)
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
