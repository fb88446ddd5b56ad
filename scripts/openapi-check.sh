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
admin="postgres://postgres@127.0.0.1:5432/postgres"
db="openapi_check_$$"
bin="${CARGO_TARGET_DIR:-target}/debug/agent-sessions"
work="$(mktemp -d -t agent-sessions-openapi.XXXXXX)"
log="$work/serve.log"

say() { printf '[openapi-check] %s\n' "$*" >&2; }

source scripts/lib/venv.sh
ensure_venv "$venv" "$requirements" openapi-check "${OPENAPI_CHECK_PYTHON:-}"
# The generator formats its output with ruff, installed beside it.
export PATH="$PWD/$venv/bin:$PATH"

cleanup() {
  if [ -n "${pid:-}" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  psql "$admin" -qc "drop database if exists $db with (force)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

say "openapi-spec-validator $document"
openapi-spec-validator "$document"

say "generating a Python client with openapi-python-client"
openapi-python-client generate --path "$document" --meta none --fail-on-warning \
  --output-path "$work/agent_sessions_client"

bash scripts/deps.sh
cargo build -q --bin agent-sessions

psql "$admin" -qc "create database $db"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db"
RUST_LOG=warn "$bin" migrate

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PORT="$port" APP__AUTH__ENABLED=false APP__REDIS__CHANNEL_PREFIX="openapi-check:$$:" RUST_LOG=warn RUST_BACKTRACE=0 \
  "$bin" serve 2>"$log" &
pid=$!
for _ in $(seq 1 100); do
  curl -sf -o /dev/null "http://127.0.0.1:$port/healthz" && break
  kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; say "serve exited"; exit 1; }
  sleep 0.1
done
curl -sf -o /dev/null "http://127.0.0.1:$port/healthz" || { cat "$log" >&2; say "serve did not start"; exit 1; }

say "calling every operation through the generated client against 127.0.0.1:$port"
status=0
PYTHONPATH="$work" python scripts/openapi_client_check.py "http://127.0.0.1:$port" "$document" || status=$?
if [ "$status" != 0 ]; then
  say "the generated client's check failed ($status); the service's warnings and errors:"
  tail -n 40 "$log" >&2
fi
exit "$status"
