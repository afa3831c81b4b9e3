#!/usr/bin/env bash
# Runs every test of siteflow, installing what the tests need first (idempotent: what is
# already installed is reused). Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/install-lib.sh
source scripts/install-lib.sh

# One persistent build directory outside the clone: later runs rebuild only what changed.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/siteflow/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

if ! command -v cargo >/dev/null; then
  echo "scripts/test.sh: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi

# Debian packages: Prometheus and promtool (rules' unit tests, the end-to-end scrape), pmacct
# and softflowd (the real exporter → collector → broker chain), kcat (reading topics by hand and
# the consume baseline), and what the bundled librdkafka builds with.
need_apt=()
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v python3 >/dev/null || need_apt+=(python3)
command -v nfacctd >/dev/null || need_apt+=(pmacct)
command -v softflowd >/dev/null || need_apt+=(softflowd)
command -v kcat >/dev/null || need_apt+=(kcat)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
[ -e /usr/include/openssl/ssl.h ] || need_apt+=(libssl-dev)
[ -e /usr/include/zlib.h ] || need_apt+=(zlib1g-dev)
apt_install "${need_apt[@]}"

install_tansu
# pmacct and kcat run with a current librdkafka (tests put it on LD_LIBRARY_PATH through
# TEST_LIBRDKAFKA_DIR; not a SITEFLOW_ name, which siteflow would read as configuration).
export TEST_LIBRDKAFKA_DIR="$HOME/.cache/siteflow/librdkafka"
fetch_librdkafka "$TEST_LIBRDKAFKA_DIR"

# --- deployment-file validators (tests/it/deploy.rs) ------------------------------------------
# amtool (Alertmanager's config check) and systemd-analyze from Debian; the Compose
# Specification schema (check-jsonschema ships it), the Kubernetes schemas (kubernetes-validate)
# and the Prometheus Operator CRD models (cloudcoil) from PyPI, in a persistent venv that is
# reused while its pinned versions match.
deploy_apt=()
command -v amtool >/dev/null || deploy_apt+=(prometheus-alertmanager)
command -v systemd-analyze >/dev/null || deploy_apt+=(systemd)
python3 -c 'import ensurepip' 2>/dev/null || deploy_apt+=(python3-venv)
apt_install "${deploy_apt[@]}"
export TEST_DEPLOY_VENV="${TEST_DEPLOY_VENV:-$HOME/.cache/siteflow/venv}"
deploy_requirements="check-jsonschema==0.39.0 kubernetes-validate==1.37.0 cloudcoil==0.6.0 cloudcoil-models-prometheus-operator==0.80.1.0"
# shellcheck disable=SC2086 # one argument per requirement
pinned_venv "$TEST_DEPLOY_VENV" $deploy_requirements
# --- end of deployment-file validators ---------------------------------------------------------

echo "== Prometheus configuration, rules and rule unit tests (promtool)"
bash deploy/prometheus/check.sh

echo "== Grafana dashboards"
python3 deploy/grafana/check_dashboards.py

echo "== building (debug) and running all tests but the Kafka ones"
cargo test --locked --lib --bins --tests -- --skip kafka:: 2>&1
cargo test --locked --benches 2>&1

# One at a time: each starts a broker and siteflow processes, and they time their kills.
echo "== Kafka tests against a real broker (Tansu)"
cargo test --locked --test it kafka:: -- --test-threads=1 2>&1

echo "== benchmarks compile"
cargo bench --locked --no-run 2>&1
