#!/usr/bin/env bash
# P4 (docs/design.md, performance targets): event -> local worker spawned,
# p50/p99, and the runner's memory while it holds 500 workers. Release build, API and runner on
# loopback, a fake `claude` that sleeps (bench/p4_fake_claude.sh).
#   bash bench/p4.sh [sessions] [hold]      (defaults 200 and 500)
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS=${1:-200}
HOLD=${2:-500}
bash scripts/deps.sh >/dev/null
cargo build --release --bin agent-sessions --example p3_latency   # the set p1p2.sh and p3.sh build: no rebuild between them
BIN=$PWD/target/release/agent-sessions
DB=agent_sessions_p4
ADMIN=postgres://postgres@127.0.0.1:5432/postgres
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export PORT=${P4_PORT:-8411}
export API_URL=http://127.0.0.1:$PORT
export CLAUDE_BIN=$PWD/bench/p4_fake_claude.sh
export APP__LOG__FORMAT=json RUST_LOG=warn
# Local benchmark: no tokens configured, so authentication is switched off.
export APP__AUTH__ENABLED=false APP__RUNNER__METRICS_LISTEN=""
WORK=$(mktemp -d /tmp/p4.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # Workers outlive runners by design: end them through their pidfiles.
  for f in "$WORK"/*/*/runner/worker.json; do
    [ -f "$f" ] || continue
    pg=$(sed -n 's/.*"pgid": *\([0-9]*\).*/\1/p' "$f"); [ -n "$pg" ] && kill -9 -- "-$pg" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  psql "$ADMIN" -qc "drop database if exists $DB with (force)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

run() { # mode feed_wait_secs sessions hold; each run on a fresh database and API
  local mode=$1 poll=$2 n=$3 hold=$4 root="$WORK/$1-$2"
  mkdir -p "$root"
  psql "$ADMIN" -qc "drop database if exists $DB with (force)" >/dev/null 2>&1
  psql "$ADMIN" -qc "create database $DB" >/dev/null
  "$BIN" migrate
  "$BIN" serve >"$root.api.log" 2>&1 &
  local ap=$!; pids+=($ap)
  for _ in $(seq 1 100); do curl -fs "$API_URL/healthz" >/dev/null && break; sleep 0.1; done
  APP__REDIS__CHANNEL_PREFIX="p4-$mode-$poll:" APP__RUNNER__FEED_WAIT_SECS=$poll \
  APP__RUNNER__MAX_WORKERS=1000 APP__RUNNER__RESYNC_INTERVAL_SECS=30 WORKSPACE_ROOT="$root" \
    "$BIN" runner >"$root.log" 2>&1 &
  local rp=$!; pids+=($rp)
  for _ in $(seq 1 100); do [ -f "$root/.runner/feed-position" ] && break; sleep 0.05; done
  python3 bench/p4_driver.py --api "$API_URL" --root "$root" --runner-pid "$rp" --mode "$mode" \
    --channel "p4-$mode-$poll:events:session" --sessions "$n" --hold "$hold"
  kill "$rp"; wait "$rp" 2>/dev/null || true
  for f in "$root"/*/runner/worker.json; do
    [ -f "$f" ] || continue
    pg=$(sed -n 's/.*"pgid": *\([0-9]*\).*/\1/p' "$f"); [ -n "$pg" ] && kill -9 -- "-$pg" 2>/dev/null || true
  done
  kill "$ap"; wait "$ap" 2>/dev/null || true
}

echo "# P4 $(date -u +%FT%TZ), $(nproc) cores, sessions=$SESSIONS hold=$HOLD"
run redis 25 "$SESSIONS" "$HOLD"
run feed 25 "$SESSIONS" 0
