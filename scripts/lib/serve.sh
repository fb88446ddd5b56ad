# Sourced by the scripts that need a running API (scripts/run.sh,
# scripts/seed-check.sh, scripts/fuzz.sh): build the binary, make and migrate
# a database, start `agent-sessions serve`, wait until /healthz answers, and
# clean up on exit.
#
#   serve_build [PROFILE]      cargo build of the binary (default profile: dev);
#                              sets SERVE_BIN
#   serve_database NAME [keep] create database NAME unless it exists and
#                              migrate it; without `keep` it is a temporary one,
#                              dropped on exit. Sets SERVE_DB and DATABASE_URL
#   serve_start [PORT]         start `serve` on PORT (default: a free port),
#                              wait for /healthz; sets SERVE_PORT, SERVE_URL,
#                              SERVE_PID. Its output goes to SERVE_LOG (default:
#                              a temporary file, shown if it fails to start)
#   serve_cleanup              run SERVE_ON_EXIT (a command, if set), stop
#                              `serve` (SIGTERM: it drains), drop a temporary
#                              database; run on EXIT, INT and TERM
#
# PostgreSQL is reached as SERVE_PG (default postgres://postgres@127.0.0.1:5432);
# SERVE_WAIT_SECONDS (default 120) bounds the wait for /healthz;
# SERVE_RUST_LOG (default warn) is serve's RUST_LOG, empty to leave the
# environment's (or the service's own default filter) alone. Extra
# environment for `serve` (APP__…) is simply exported before serve_start.

SERVE_PG="${SERVE_PG:-postgres://postgres@127.0.0.1:5432}"
SERVE_TAG="${SERVE_TAG:-serve}"
SERVE_PID=
SERVE_DB=
SERVE_TEMP_DB=
SERVE_OWN_LOG=

serve_say() { printf '[%s] %s\n' "$SERVE_TAG" "$*" >&2; }

serve_traps() {
  trap serve_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

serve_build() {
  local profile=${1:-dev} dir
  case "$profile" in
    dev) dir=debug ;;
    release) dir=release ;;
    *) dir=$profile ;;
  esac
  # With an example, so dev-dependencies take part in feature resolution as
  # in the tests and the other benchmarks: the binary alone resolves other
  # features and rebuilds a hundred crates.
  cargo build -q --locked --profile "$profile" --bin agent-sessions --example p3_latency
  SERVE_BIN="${CARGO_TARGET_DIR:-target}/$dir/agent-sessions"
}

serve_database() {
  local name=$1 keep=${2:-}
  SERVE_DB=$name
  if ! psql "$SERVE_PG/postgres" -tAc "select 1 from pg_database where datname = '$name'" | grep -q 1; then
    psql "$SERVE_PG/postgres" -qc "create database \"$name\""
    [ "$keep" = keep ] || SERVE_TEMP_DB=$name
  fi
  export DATABASE_URL="$SERVE_PG/$name"
  serve_traps
  RUST_LOG="${RUST_LOG:-warn}" "$SERVE_BIN" migrate
}

serve_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# 0 when /healthz answered, 1 when serve exited first, 2 on timeout.
serve_wait_healthy() {
  local deadline=$((SECONDS + ${SERVE_WAIT_SECONDS:-120}))
  while [ "$SECONDS" -lt "$deadline" ]; do
    curl -sf -o /dev/null --max-time 2 "$SERVE_URL/healthz" && return 0
    kill -0 "$SERVE_PID" 2>/dev/null || return 1
    sleep 0.1
  done
  return 2
}

serve_start() {
  local wanted=${1:-} attempt status
  if [ -z "${SERVE_LOG:-}" ]; then
    SERVE_LOG=$(mktemp -t "agent-sessions-$SERVE_TAG.XXXXXX.log")
    SERVE_OWN_LOG=$SERVE_LOG
  fi
  serve_traps
  # A free port can be taken between choosing it and binding it: try again.
  for attempt in 1 2 3; do
    SERVE_PORT=${wanted:-$(serve_free_port)}
    SERVE_URL="http://127.0.0.1:$SERVE_PORT"
    if [ -n "$wanted" ] && curl -s -o /dev/null --max-time 2 "$SERVE_URL/healthz"; then
      serve_say "port $SERVE_PORT is already in use; stop what runs there or set PORT"
      return 1
    fi
    (
      [ -z "${SERVE_RUST_LOG-warn}" ] || export RUST_LOG="${SERVE_RUST_LOG-warn}"
      PORT="$SERVE_PORT" RUST_BACKTRACE="${SERVE_BACKTRACE:-0}" exec "$SERVE_BIN" serve
    ) >>"$SERVE_LOG" 2>&1 &
    SERVE_PID=$!
    status=0
    serve_wait_healthy || status=$?
    case "$status" in
      0) return 0 ;;
      1) wait "$SERVE_PID" 2>/dev/null || true; SERVE_PID= ;;
      2) serve_say "serve did not answer /healthz within ${SERVE_WAIT_SECONDS:-120} s"; break ;;
    esac
    # Only a port taken meanwhile is worth another try.
    [ -z "$wanted" ] && [ -f "$SERVE_LOG" ] && grep -q "in use" "$SERVE_LOG" || break
  done
  [ "$SERVE_LOG" = /dev/stdout ] || [ "$SERVE_LOG" = /dev/stderr ] || tail -n 40 "$SERVE_LOG" >&2
  serve_say "serve did not start"
  return 1
}

serve_cleanup() {
  if [ -n "${SERVE_ON_EXIT:-}" ]; then
    eval "$SERVE_ON_EXIT" || true
    SERVE_ON_EXIT=
  fi
  if [ -n "$SERVE_PID" ]; then
    kill "$SERVE_PID" 2>/dev/null || true
    wait "$SERVE_PID" 2>/dev/null || true
    SERVE_PID=
  fi
  if [ -n "$SERVE_TEMP_DB" ]; then
    psql "$SERVE_PG/postgres" -qc "drop database if exists \"$SERVE_TEMP_DB\" with (force)" >/dev/null 2>&1 || true
    SERVE_TEMP_DB=
  fi
  [ -z "$SERVE_OWN_LOG" ] || rm -f "$SERVE_OWN_LOG"
}
