#!/usr/bin/env bash
# Runs every test of siteflow, installing what the tests need first (idempotent: what is
# already installed is reused). Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# One persistent build directory outside the clone: later runs rebuild only what changed.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/siteflow/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

if ! command -v cargo >/dev/null; then
  echo "scripts/test.sh: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi

echo "== building (debug) and running all tests"
cargo test --locked --all-targets 2>&1

echo "== benchmarks compile"
cargo bench --locked --no-run 2>&1
