#!/usr/bin/env bash
# Create .venv and install songpipe. Idempotent; run by demo.sh (runtime dependencies only) and by
# test.sh (`bootstrap.sh test`: adds the test extras: pytest, Playwright, schemathesis, Triton).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${SONGPIPE_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "songpipe needs Python 3.11 or newer (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
step() { echo "[bootstrap] $*" >&2; }
if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# pip's own progress bars stay on (no --quiet): the torch wheel alone is minutes on a slow link
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar on)
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    step "installing torch (CUDA build)"
    "${PIP[@]}" 'torch>=2.11'
  else
    # CPU-only host: the 2.13 release (a local CPU wheel where one is provided, else PyPI's)
    step "installing torch (CPU build)"
    "${PIP[@]}" 'torch==2.13.*'
  fi
fi
if [ "$EXTRAS" = test ]; then
  step "installing songpipe with the test extras"
  "${PIP[@]}" -e "$ROOT[test]" | grep -v '^Requirement already satisfied' || true
else
  step "installing songpipe (runtime dependencies only)"
  "${PIP[@]}" -e "$ROOT" | grep -v '^Requirement already satisfied' || true
fi
"$VENV/bin/python" -c 'import orchestrator.cli' || { step "install failed"; exit 1; }
step "done: $VENV/bin/songpipe (add $VENV/bin to PATH, or run it by that path)"
