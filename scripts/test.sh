#!/usr/bin/env bash
# The project's test command (README): set-up if needed, build, unit tests, then the multi-process
# integration tests one at a time (each process uses one torch thread).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
bash scripts/setup.sh
source scripts/env.sh
export OMP_NUM_THREADS=1
cargo test --workspace --exclude hcmoco-tests
cargo test -p hcmoco-tests -- --test-threads=1
