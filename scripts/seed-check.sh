#!/usr/bin/env bash
# Start the service on :8011 against a fresh database and run every curl
# example of seed 003 verbatim (scripts/seed_examples.py).
set -euo pipefail
cd "$(dirname "$0")/.."
db="seedcheck_$$"
admin="postgres://postgres@127.0.0.1:5432/postgres"
psql "$admin" -qc "create database $db"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db"
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  psql "$admin" -qc "drop database if exists $db with (force)" || true
}
trap cleanup EXIT
cargo build -q --bin agent-sessions
./target/debug/agent-sessions migrate
if curl -s -o /dev/null localhost:8011/healthz; then
  echo "port 8011 is already in use; stop what runs there" >&2
  exit 1
fi
APP__AUTH__ENABLED=false RUST_LOG=warn ./target/debug/agent-sessions serve &
pid=$!
for _ in $(seq 1 100); do curl -s -o /dev/null localhost:8011/healthz && break; sleep 0.1; done
python3 scripts/seed_examples.py
