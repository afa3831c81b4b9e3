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

# Prometheus server and promtool (Debian package): the rules' unit tests and the end-to-end
# test that scrapes siteflow use the real ones.
need_apt=()
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v python3 >/dev/null || need_apt+=(python3)
if ((${#need_apt[@]})); then
  echo "== installing ${need_apt[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

echo "== Prometheus configuration, rules and rule unit tests (promtool)"
bash deploy/prometheus/check.sh

echo "== Grafana dashboards"
python3 deploy/grafana/check_dashboards.py

echo "== building (debug) and running all tests"
cargo test --locked --all-targets 2>&1

echo "== benchmarks compile"
cargo bench --locked --no-run 2>&1
