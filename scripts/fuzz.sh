#!/usr/bin/env bash
# Fuzz the API from its own OpenAPI document with schemathesis (guarantee
# G7 of docs/design.md): no 5xx, every status code, content type and body as
# documented. Starts the debug binary on a free port against a fresh database
# (scripts/lib/serve.sh; dropped afterwards), with a pinned schemathesis in a
# virtualenv of its own, .venv-fuzz/ at the repository root, made (or
# refreshed when the pins change) on first use.
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

say() { printf '[fuzz] %s\n' "$*" >&2; }

source scripts/lib/venv.sh
ensure_venv "$venv" "$requirements" fuzz "${FUZZ_PYTHON:-}"

bash scripts/deps.sh
SERVE_TAG=fuzz
source scripts/lib/serve.sh
serve_build
serve_database "fuzz_$$"
# Long-polls of GET /events end after a second, not the minute a fuzzed
# `wait` may ask for.
export APP__AUTH__ENABLED="${APP__AUTH__ENABLED:-false}" APP__REDIS__CHANNEL_PREFIX="fuzz:$$:" RUST_BACKTRACE=0
export APP__API__MAX_WAIT_SECS=1
serve_start
pid=$SERVE_PID
log=$SERVE_LOG

args=(
  run "$SERVE_URL/openapi.json"
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
  --max-examples "${FUZZ_MAX_EXAMPLES:-150}"
  # Endless Server-Sent Events streams: nothing to fuzz with one request.
  --exclude-path /events/stream
  --exclude-path '/sessions/{id}/messages/stream'
  # One worker: CPython 3.11 (Debian's) can fail parsing in threads (gh-106905).
  --workers 1
  --request-timeout 10
  --no-color
)
[ -n "${FUZZ_SEED:-}" ] && args+=(--seed "$FUZZ_SEED")
[ -n "${FUZZ_TOKEN:-}" ] && args+=(-H "Authorization: Bearer $FUZZ_TOKEN")
say "schemathesis $("$venv/bin/schemathesis" --version | awk '{print $NF}') against $SERVE_URL"
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
