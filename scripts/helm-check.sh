#!/usr/bin/env bash
# Lint, render and validate the Helm chart (scripts/helm_check.py) with pinned
# tools in a virtualenv of its own, .venv-helm/ at the repository root, made
# (or refreshed when the pins change) on first use. Needs only Python 3.11 and
# PyPI; no helm binary, no cluster. Arguments go to helm_check.py (--out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-helm
requirements=scripts/helm-check-requirements.txt
stamp="$venv/.requirements.sha256"

log() { printf '[helm-check] %s\n' "$*" >&2; }

find_python() {
  local candidate
  for candidate in "${HELM_CHECK_PYTHON:-}" python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  log "needs Python >= 3.11 (python3.11 or python3); set HELM_CHECK_PYTHON to choose one"
  exit 1
}

want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
  python=$(find_python)
  log "creating $venv with $($python --version)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing pinned packages from $requirements"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements"
  echo "$want" >"$stamp"
fi

exec "$venv/bin/python" scripts/helm_check.py "$@"
