#!/usr/bin/env bash
# Bring agent-sessions up on a fresh machine: PostgreSQL and Redis (and the
# Claude Code CLI), the database, migrations, then the runner in the
# background (log in var/runner.log) and the API on :8011 (PORT to change it).
# Workers need ANTHROPIC_API_KEY in this environment; the runner passes it on.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/agent_sessions}"
db="${DATABASE_URL##*/}"; db="${db%%\?*}"
admin="${DATABASE_URL%/*}/postgres"
if ! psql "$admin" -tAc "select 1 from pg_database where datname = '$db'" | grep -q 1; then
  psql "$admin" -qc "create database \"$db\""
fi
cargo build --release --bin agent-sessions
./target/release/agent-sessions migrate
# Local development: authentication off (the service logs a warning). Set
# APP__AUTH__ENABLED=true with tokens or JWT keys for anything shared.
export APP__AUTH__ENABLED="${APP__AUTH__ENABLED:-false}"

mkdir -p var/workspaces
export WORKSPACE_ROOT="${WORKSPACE_ROOT:-$PWD/var/workspaces}"
export CLAUDE_BIN="${CLAUDE_BIN:-$PWD/tools/claude/node_modules/.bin/claude}"
export API_URL="${API_URL:-http://127.0.0.1:${PORT:-8011}}"
./target/release/agent-sessions runner >var/runner.log 2>&1 &
runner=$!
trap 'kill "$runner" 2>/dev/null; wait "$runner" 2>/dev/null' EXIT
./target/release/agent-sessions serve
