#!/usr/bin/env bash
# Check the OpenAPI document the way a newcomer meets it: it validates with
# openapi-spec-validator; openapi-python-client generates a client from it
# without a warning (a skipped operation is a warning); and that client,
# against the debug binary on a free port and a fresh database (dropped
# afterwards), calls every operation and gets the documented answers.
# Pinned tools live in a virtualenv of their own, .venv-openapi/ at the
# repository root, made (or refreshed when the pins change) on first use.
#
#   OPENAPI_CHECK_PYTHON  interpreter for the virtualenv (>= 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-openapi
requirements=scripts/openapi-check-requirements.txt
document=openapi/openapi.json
work="$(mktemp -d -t agent-sessions-openapi.XXXXXX)"

say() { printf '[openapi-check] %s\n' "$*" >&2; }

source scripts/lib/venv.sh
ensure_venv "$venv" "$requirements" openapi-check "${OPENAPI_CHECK_PYTHON:-}"
# The generator formats its output with ruff, installed beside it.
export PATH="$PWD/$venv/bin:$PATH"

say "openapi-spec-validator $document"
openapi-spec-validator "$document"

say "generating a Python client with openapi-python-client"
openapi-python-client generate --path "$document" --meta none --fail-on-warning \
  --output-path "$work/agent_sessions_client"

bash scripts/deps.sh
SERVE_TAG=openapi-check
source scripts/lib/serve.sh
SERVE_ON_EXIT="rm -rf '$work'"
serve_build
serve_database "openapi_check_$$"
export APP__AUTH__ENABLED=false APP__REDIS__CHANNEL_PREFIX="openapi-check:$$:" RUST_BACKTRACE=0
serve_start

say "calling every operation through the generated client against $SERVE_URL"
status=0
PYTHONPATH="$work" python scripts/openapi_client_check.py "$SERVE_URL" "$document" || status=$?
if [ "$status" != 0 ]; then
  say "the generated client's check failed ($status); the service's warnings and errors:"
  tail -n 40 "$SERVE_LOG" >&2
fi
exit "$status"
