# syntax=docker/dockerfile:1
#
# Images of agent-sessions, built from the repository root:
#
#   docker build -t agent-sessions:0.1.0 .                           # serve | runner | migrate | openapi | replay
#   docker build -t agent-sessions-worker:0.1.0 --target worker .    # the Claude Code CLI (and the shim), for worker pods
#
# The default (last) stage is the service image; `worker` is a separate target.

# ---- builder: compile `agent-sessions` in release mode -----------------------
# Images keep the fully optimised `release` profile (as the benchmarks do);
# scripts/run.sh builds the quicker `dev` profile for local use.
FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependencies first, against stub sources, so this layer is reused until
# Cargo.toml or Cargo.lock change (a clean release build takes minutes).
COPY Cargo.toml Cargo.lock ./
COPY service/Cargo.toml service/Cargo.toml
COPY migrations/Cargo.toml migrations/Cargo.toml
RUN mkdir -p service/src migrations/src \
 && echo 'fn main() {}' > service/src/main.rs \
 && touch service/src/lib.rs migrations/src/lib.rs \
 && cargo build --release --locked --bin agent-sessions \
 && rm -rf service/src migrations/src

# Then the real sources. Touch the crate roots: the copied files can be older
# than the stubs' build, and cargo decides what to rebuild by modification time.
COPY service/src service/src
COPY migrations/src migrations/src
RUN touch service/src/main.rs service/src/lib.rs migrations/src/lib.rs \
 && cargo build --release --locked --bin agent-sessions \
 && install -D -m 0755 target/release/agent-sessions /out/agent-sessions

# ---- worker: the Claude Code CLI, started by the runner in worker pods -------
# The CLI's package requires Node >= 22 (its `engines`), so this is node 22,
# not 20. Its `claude` command is a native binary from a platform package
# (the package's postinstall only moves it into place, offline).
FROM node:22-bookworm-slim AS worker
ARG CLAUDE_CODE_VERSION=2.1.329
# Debian's packages follow the bookworm point releases (security fixes), so
# they are not pinned; the CLI, which changes behaviour between versions, is.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git \
 && rm -rf /var/lib/apt/lists/* \
 && npm install --global --no-audit --no-fund "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" \
 && npm cache clean --force \
 && claude --version
RUN groupadd --gid 10001 claude \
 && useradd --uid 10001 --gid 10001 --home-dir /home/claude --create-home --shell /usr/sbin/nologin claude \
 && mkdir -p /workspace \
 && chown 10001:10001 /workspace
# Worker pods run the CLI behind `agent-sessions worker-shim`, which restores
# and reports the session's transcript over the pod's stdin and log.
COPY --from=builder /out/agent-sessions /usr/local/bin/agent-sessions
# The version is pinned above; the CLI must not replace itself at run time.
ENV DISABLE_AUTOUPDATER=1 \
    HOME=/home/claude
USER 10001:10001
WORKDIR /workspace
ENTRYPOINT ["claude"]

# ---- runtime: the one image of every subcommand (default target) -------------
FROM debian:bookworm-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin app
COPY --from=builder /out/agent-sessions /usr/local/bin/agent-sessions
# In a container the API must listen on every interface; logs go to collectors.
ENV APP__SERVER__HOST=0.0.0.0 \
    APP__LOG__FORMAT=json
USER 10001:10001
EXPOSE 8011
ENTRYPOINT ["agent-sessions"]
CMD ["serve"]
