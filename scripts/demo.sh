#!/usr/bin/env bash
# Fresh machine -> running stack + one demo song. No Redis, PostgreSQL or GPU needed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/songpipe" run --demo "$@"
