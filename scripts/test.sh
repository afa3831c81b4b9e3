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
if ((${#need_apt[@]})); then
  echo "== installing ${need_apt[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# Tansu, a Kafka-protocol broker (Apache Kafka cannot be installed here): built once per machine.
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v tansu >/dev/null; then
  echo "== installing the Tansu broker (cargo install, about 10-20 minutes once per machine)"
  CARGO_TARGET_DIR="$HOME/.cache/siteflow/tansu-build" \
    cargo install tansu --locked --version 0.6.0 --features dynostore,libsql
fi

# Debian's librdkafka (2.0) cannot talk to Tansu; pmacct and kcat use the newer one that the
# confluent-kafka wheel carries (tests put it on LD_LIBRARY_PATH through TEST_LIBRDKAFKA_DIR;
# not a SITEFLOW_ name, which siteflow would read as configuration).
export TEST_LIBRDKAFKA_DIR="$HOME/.cache/siteflow/librdkafka"
if [ ! -e "$TEST_LIBRDKAFKA_DIR/librdkafka.so.1" ]; then
  echo "== fetching a current librdkafka.so.1 (confluent-kafka wheel, PyPI)"
  wheels="$HOME/.cache/siteflow/wheels"
  mkdir -p "$wheels" "$TEST_LIBRDKAFKA_DIR"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" "confluent-kafka==2.16.1"
  python3 - "$wheels" "$TEST_LIBRDKAFKA_DIR" <<'PY'
import glob, os, shutil, sys, zipfile
wheel = sorted(glob.glob(os.path.join(sys.argv[1], "confluent_kafka-2.16.1-*.whl")))[-1]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("confluent_kafka.libs/") and not name.endswith("/"):
            target = os.path.join(sys.argv[2], os.path.basename(name))
            with z.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if os.path.basename(name).startswith("librdkafka"):
                shutil.copy(target, os.path.join(sys.argv[2], "librdkafka.so.1"))
PY
fi

# --- deployment-file validators (tests/it/deploy.rs) ------------------------------------------
# amtool (Alertmanager's config check) and systemd-analyze from Debian; the Compose
# Specification schema (check-jsonschema ships it), the Kubernetes schemas (kubernetes-validate)
# and the Prometheus Operator CRD models (cloudcoil) from PyPI, in a persistent venv that is
# reused while its pinned versions match.
deploy_apt=()
command -v amtool >/dev/null || deploy_apt+=(prometheus-alertmanager)
command -v systemd-analyze >/dev/null || deploy_apt+=(systemd)
python3 -c 'import ensurepip' 2>/dev/null || deploy_apt+=(python3-venv)
if ((${#deploy_apt[@]})); then
  echo "== installing ${deploy_apt[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${deploy_apt[@]}"
fi
export TEST_DEPLOY_VENV="${TEST_DEPLOY_VENV:-$HOME/.cache/siteflow/venv}"
deploy_requirements="check-jsonschema==0.39.0 kubernetes-validate==1.37.0 cloudcoil==0.6.0 cloudcoil-models-prometheus-operator==0.80.1.0"
if [ "$(cat "$TEST_DEPLOY_VENV/.siteflow-requirements" 2>/dev/null)" != "$deploy_requirements" ]; then
  echo "== installing $deploy_requirements into $TEST_DEPLOY_VENV"
  python3 -m venv "$TEST_DEPLOY_VENV"
  # shellcheck disable=SC2086 # one argument per requirement
  "$TEST_DEPLOY_VENV/bin/pip" install --quiet --disable-pip-version-check $deploy_requirements
  echo "$deploy_requirements" > "$TEST_DEPLOY_VENV/.siteflow-requirements"
fi
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
