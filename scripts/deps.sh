#!/usr/bin/env bash
# Make sure PostgreSQL and Redis are running on 127.0.0.1: start them if they
# are installed but stopped, install them from Debian's packages if absent
# (as root); install the pinned Claude Code CLI into tools/claude (npm ci).
# Idempotent; sourced or run by scripts/run.sh and scripts/test.sh.
set -euo pipefail

log() { printf '[deps] %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "need root to $1; run as root or install it yourself"
    exit 1
  fi
}

apt_install() {
  need_root "install $*"
  if [ -z "${APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    export APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

ensure_postgres() {
  if command -v pg_isready >/dev/null && pg_up; then return; fi
  if ! command -v pg_ctlcluster >/dev/null; then
    log "installing PostgreSQL"
    apt_install postgresql postgresql-contrib
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  if [ ! -d "/etc/postgresql/$version/main" ]; then
    need_root "create a PostgreSQL cluster"
    pg_createcluster "$version" main >/dev/null
  fi
  log "starting PostgreSQL $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 60); do pg_up && break; sleep 0.5; done
  pg_up || { log "PostgreSQL did not come up"; exit 1; }
  # Local development trusts loopback; the role `postgres` is used by default.
  if ! psql -h 127.0.0.1 -U postgres -tAc 'select 1' >/dev/null 2>&1; then
    need_root "configure PostgreSQL authentication"
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    sed -i -E 's/^(host\s+all\s+all\s+127\.0\.0\.1\/32\s+)\S+/\1trust/; s/^(local\s+all\s+postgres\s+)\S+/\1trust/' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  fi
}

ensure_redis() {
  if command -v redis-cli >/dev/null && redis_up; then return; fi
  if ! command -v redis-server >/dev/null; then
    log "installing Redis"
    apt_install redis-server
  fi
  log "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir "${TMPDIR:-/tmp}" --logfile "${TMPDIR:-/tmp}/agent-sessions-redis.log"
  for _ in $(seq 1 40); do redis_up && break; sleep 0.25; done
  redis_up || { log "Redis did not come up"; exit 1; }
}

# The Claude Code CLI the runner's tests drive, pinned in tools/claude.
ensure_claude_cli() {
  local dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tools/claude"
  local bin="$dir/node_modules/.bin/claude"
  local want
  want=$(sed -n 's/.*"@anthropic-ai\/claude-code": *"\([^"]*\)".*/\1/p' "$dir/package.json")
  if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "^$want "; then return; fi
  if ! command -v npm >/dev/null; then
    log "installing Node.js and npm"
    apt_install nodejs npm
  fi
  log "installing the Claude Code CLI $want into tools/claude"
  npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error >&2
  # The package's postinstall puts the native binary in place; where install
  # scripts are disabled, do what it does.
  if ! "$bin" --version >/dev/null 2>&1; then
    local native
    native=$(ls "$dir"/node_modules/@anthropic-ai/claude-code-linux-*/claude 2>/dev/null | head -n1)
    [ -n "$native" ] && cp "$native" "$dir/node_modules/@anthropic-ai/claude-code/bin/claude.exe"
  fi
  "$bin" --version >/dev/null || { log "the Claude Code CLI does not run"; exit 1; }
}

ensure_postgres
ensure_redis
log "PostgreSQL and Redis are up"
ensure_claude_cli
log "Claude Code CLI $("$(dirname "${BASH_SOURCE[0]}")/../tools/claude/node_modules/.bin/claude" --version)"
