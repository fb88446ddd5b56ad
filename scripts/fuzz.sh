#!/usr/bin/env bash
# Fuzz the API from its own OpenAPI document with schemathesis (G7): no 5xx,
# every status code, content type and body as documented. Starts the debug
# binary on a free port against a fresh database (dropped afterwards), with a
# pinned schemathesis in a virtualenv of its own, .venv-fuzz/ at the
# repository root, made (or refreshed when the pins change) on first use.
#
#   FUZZ_TOKEN         sent as `Authorization: Bearer …` when set
#   APP__AUTH__ENABLED authentication of the fuzzed service (default false;
#                      with true, give it the token's settings as APP__AUTH__…)
#   FUZZ_MAX_EXAMPLES  test cases per operation and phase (default 150, about
#                      a minute of schemathesis on two cores)
#   FUZZ_SEED          reproduce a run (schemathesis prints the seed it used)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-fuzz
requirements=scripts/fuzz-requirements.txt
admin="postgres://postgres@127.0.0.1:5432/postgres"
db="fuzz_$$"
bin="${CARGO_TARGET_DIR:-target}/debug/agent-sessions"
log="$(mktemp -t agent-sessions-fuzz.XXXXXX.log)"

say() { printf '[fuzz] %s\n' "$*" >&2; }

source scripts/lib/venv.sh
ensure_venv "$venv" "$requirements" fuzz "${FUZZ_PYTHON:-}"

bash scripts/deps.sh
cargo build -q --bin agent-sessions

cleanup() {
  if [ -n "${pid:-}" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  psql "$admin" -qc "drop database if exists $db with (force)" >/dev/null 2>&1 || true
  rm -f "$log"
}
trap cleanup EXIT

psql "$admin" -qc "create database $db"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db"
RUST_LOG=warn "$bin" migrate

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PORT="$port" APP__AUTH__ENABLED="${APP__AUTH__ENABLED:-false}" APP__REDIS__CHANNEL_PREFIX="fuzz:$$:" RUST_LOG=warn RUST_BACKTRACE=0 \
  "$bin" serve 2>"$log" &
pid=$!
for _ in $(seq 1 100); do
  curl -sf -o /dev/null "http://127.0.0.1:$port/healthz" && break
  kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; say "serve exited"; exit 1; }
  sleep 0.1
done
curl -sf -o /dev/null "http://127.0.0.1:$port/healthz" || { cat "$log" >&2; say "serve did not start"; exit 1; }

args=(
  run "http://127.0.0.1:$port/openapi.json"
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
  --max-examples "${FUZZ_MAX_EXAMPLES:-150}"
  # An endless Server-Sent Events stream: nothing to fuzz with one request.
  --exclude-path /events/stream
  # One worker: CPython 3.11 (Debian's) can fail parsing in threads (gh-106905).
  --workers 1
  --request-timeout 10
  --no-color
)
[ -n "${FUZZ_SEED:-}" ] && args+=(--seed "$FUZZ_SEED")
[ -n "${FUZZ_TOKEN:-}" ] && args+=(-H "Authorization: Bearer $FUZZ_TOKEN")
say "schemathesis $("$venv/bin/schemathesis" --version | awk '{print $NF}') against 127.0.0.1:$port"
status=0
# From inside the venv, where schemathesis keeps the failures it found (and
# replays them first next time) and Hypothesis its examples.
(cd "$venv" && ./bin/schemathesis "${args[@]}") || status=$?
if ! kill -0 "$pid" 2>/dev/null; then
  say "serve died during the run"
  status=1
fi
if [ "$status" != 0 ]; then
  say "schemathesis failed ($status); the service's warnings and errors:"
  tail -n 40 "$log" >&2
fi
exit "$status"
