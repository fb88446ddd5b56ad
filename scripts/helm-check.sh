#!/usr/bin/env bash
# Lint, render and validate the Helm chart (scripts/helm_check.py) with pinned
# tools in a virtualenv of its own, .venv-helm/ at the repository root, made
# (or refreshed when the pins change) on first use. Needs only Python 3.11 and
# PyPI; no helm binary, no cluster. Arguments go to helm_check.py: --out DIR
# keeps the rendered manifests, --update-golden rewrites the golden render
# (helm/agent-sessions/golden/) after a meant change to the templates.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-helm
requirements=scripts/helm-check-requirements.txt


source scripts/lib/venv.sh
ensure_venv "$venv" "$requirements" helm-check "${HELM_CHECK_PYTHON:-}"

exec "$venv/bin/python" scripts/helm_check.py "$@"
