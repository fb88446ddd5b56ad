#!/usr/bin/env bash
# Run every check and test: the Helm chart's checks, formatting, lints, the
# unit and integration suites against real PostgreSQL and Redis, the OpenAPI
# fuzzer, and the seed-003 examples (skipped, with a message, when the seed is
# not beside the repository: see scripts/seed-check.sh). Needs nothing
# outside a plain clone but PostgreSQL, Redis, Node.js and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh
bash scripts/helm-check.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo nextest run --workspace --no-fail-fast
bash scripts/fuzz.sh
bash scripts/openapi-check.sh
bash scripts/seed-check.sh
