#!/usr/bin/env bash
# Bring agent-sessions up on this machine: PostgreSQL and Redis (and the
# Claude Code CLI), the database `agent_sessions` (kept between runs),
# migrations, the API on :8011 (PORT to change it) and the runner in the
# background (log in var/runner.log). Ctrl-C stops both.
#
# Builds with Cargo's `dev` profile, the one the tests use: a clean build
# takes about 8 CPU-minutes (a few minutes on two cores) where `release`
# takes about four times as long. RUN_PROFILE=release for the optimised
# build that images and benchmarks use.
# Workers need ANTHROPIC_API_KEY in this environment; the runner passes it on.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

bash scripts/deps.sh
url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/agent_sessions}"
db="${url##*/}"; db="${db%%\?*}"
SERVE_PG="${url%/*}"
SERVE_TAG=run
source scripts/lib/serve.sh
serve_say "building (profile ${RUN_PROFILE:-dev})"
serve_build "${RUN_PROFILE:-dev}"
serve_database "$db" keep
export DATABASE_URL="$url"

# Local development: authentication off (the service logs a warning). Set
# APP__AUTH__ENABLED=true with tokens or JWT keys for anything shared.
export APP__AUTH__ENABLED="${APP__AUTH__ENABLED:-false}"
SERVE_RUST_LOG=
SERVE_LOG=/dev/stderr
serve_start "${PORT:-8011}"
serve_say "API up at $SERVE_URL ($((SECONDS - started)) s after start; OpenAPI at /openapi.json, browsable at /docs)"

mkdir -p var/workspaces
export WORKSPACE_ROOT="${WORKSPACE_ROOT:-$PWD/var/workspaces}"
export CLAUDE_BIN="${CLAUDE_BIN:-$PWD/tools/claude/node_modules/.bin/claude}"
export API_URL="${API_URL:-$SERVE_URL}"
"$SERVE_BIN" runner >var/runner.log 2>&1 &
runner=$!
SERVE_ON_EXIT='kill "$runner" 2>/dev/null; wait "$runner" 2>/dev/null'
serve_say "runner started (pid $runner, log var/runner.log)"
wait "$SERVE_PID"
