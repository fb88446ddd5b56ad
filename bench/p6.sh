#!/usr/bin/env bash
# P6 (docs/design.md, performance targets): a worker's stdout line -> SSE
# client of /sessions/{id}/messages/stream (p50/p99), input -> worker stdin,
# and the API's message ingest rate. Release build, API and runner on
# loopback, a fake `claude` that speaks stream-json (bench/p6_fake_claude.py).
#   bash bench/p6.sh [inputs] [lines per input]      (defaults 20 and 50)
set -euo pipefail
cd "$(dirname "$0")/.."
INPUTS=${1:-20}
LINES=${2:-50}
bash scripts/deps.sh >/dev/null
cargo build --release --bin agent-sessions
BIN=$PWD/target/release/agent-sessions
DB=agent_sessions_p6
ADMIN=postgres://postgres@127.0.0.1:5432/postgres
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export PORT=${P6_PORT:-8416}
export API_URL=http://127.0.0.1:$PORT
export CLAUDE_BIN=$PWD/bench/p6_fake_claude.py
export APP__LOG__FORMAT=json RUST_LOG=warn
# Local benchmark: no tokens configured, so authentication is switched off.
export APP__AUTH__ENABLED=false APP__RUNNER__METRICS_LISTEN=""
export APP__REDIS__CHANNEL_PREFIX="p6:"
WORK=$(mktemp -d /tmp/p6.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "$WORK"/*/runner/worker.json; do
    [ -f "$f" ] || continue
    pg=$(sed -n 's/.*"pgid": *\([0-9]*\).*/\1/p' "$f"); [ -n "$pg" ] && kill -9 -- "-$pg" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  psql "$ADMIN" -qc "drop database if exists $DB with (force)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
psql "$ADMIN" -qc "drop database if exists $DB with (force)" >/dev/null 2>&1
psql "$ADMIN" -qc "create database $DB" >/dev/null
"$BIN" migrate
"$BIN" serve >"$WORK/api.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -fs "$API_URL/healthz" >/dev/null && break; sleep 0.1; done
WORKSPACE_ROOT="$WORK" "$BIN" runner >"$WORK/runner.log" 2>&1 &
pids+=($!)
echo "# P6 $(date -u +%FT%TZ), $(nproc) cores, inputs=$INPUTS lines=$LINES"
python3 bench/p6_driver.py --api "$API_URL" --inputs "$INPUTS" --lines "$LINES"
