#!/usr/bin/env bash
# Bring agent-sessions up on a fresh machine: PostgreSQL and Redis, the
# database, migrations, then the API on :8011 (PORT to change it).
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
exec ./target/release/agent-sessions serve
