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
SERVE_TAG=p6
# shellcheck source=scripts/lib/serve.sh
. scripts/lib/serve.sh
serve_build release
# Local benchmark: no tokens configured, so authentication is switched off.
export APP__AUTH__ENABLED=false APP__RUNNER__METRICS_LISTEN="" APP__LOG__FORMAT=json
export APP__REDIS__CHANNEL_PREFIX="p6:" CLAUDE_BIN=$PWD/bench/p6_fake_claude.py
WORK=$(mktemp -d /tmp/p6.XXXXXX)
RUNNER_PID=
# The runner, then its workers (they outlive runners by design: end them
# through their pidfiles), then the workspaces.
SERVE_ON_EXIT='stop_runner'
stop_runner() {
  [ -z "$RUNNER_PID" ] || { kill "$RUNNER_PID" 2>/dev/null; wait "$RUNNER_PID" 2>/dev/null || true; }
  for f in "$WORK"/*/runner/worker.json; do
    [ -f "$f" ] || continue
    pg=$(sed -n 's/.*"pgid": *\([0-9]*\).*/\1/p' "$f"); [ -n "$pg" ] && kill -9 -- "-$pg" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
serve_database agent_sessions_p6
serve_start "${P6_PORT:-}"
API_URL=$SERVE_URL WORKSPACE_ROOT="$WORK" RUST_LOG=warn "$SERVE_BIN" runner >"$WORK/runner.log" 2>&1 &
RUNNER_PID=$!
echo "# P6 $(date -u +%FT%TZ), $(nproc) cores, inputs=$INPUTS lines=$LINES"
python3 bench/p6_driver.py --api "$SERVE_URL" --inputs "$INPUTS" --lines "$LINES"
