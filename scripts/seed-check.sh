#!/usr/bin/env bash
# Run every curl example of the seed that defined this service's contract
# (seed 003, `003_*.txt`) verbatim against a fresh service: a temporary
# database and a free port (scripts/lib/serve.sh), both gone afterwards.
#
# The seed is not part of this repository. It is looked for in
# ../shared/seeds/ beside the repository (or in SEED_DIR); when it is not
# there the check is skipped, with a message, and exits 0: the project's own
# API tests (service/tests/api/) send the same requests.
set -euo pipefail
cd "$(dirname "$0")/.."

seed_dir="${SEED_DIR:-../shared/seeds}"
seed=$(ls "$seed_dir"/003_*.txt 2>/dev/null | head -n1 || true)
if [ -z "$seed" ]; then
  echo "[seed-check] SKIPPED: seed 003 not found ($seed_dir/003_*.txt is not beside this repository); the API tests cover the same requests"
  exit 0
fi

SERVE_TAG=seed-check
source scripts/lib/serve.sh
serve_build
serve_database "seedcheck_$$"
export APP__AUTH__ENABLED=false APP__REDIS__CHANNEL_PREFIX="seedcheck:$$:"
serve_start
echo "[seed-check] $seed against $SERVE_URL"
python3 scripts/seed_examples.py "$seed" "$SERVE_URL"
