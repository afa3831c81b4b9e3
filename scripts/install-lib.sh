# Installers shared by scripts/test.sh and scripts/bench-e2e.sh (sourced, not run). Each is
# idempotent: what is already on the machine is reused.

# apt_install PACKAGE...: installs the Debian packages given (none: nothing to do).
apt_install() {
  (($#)) || return 0
  echo "== installing $*"
  local sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "$@"
}

# install_tansu: Tansu, a Kafka-protocol broker (Apache Kafka cannot be installed here), built
# once per machine into cargo's bin directory.
install_tansu() {
  export PATH="$HOME/.cargo/bin:$PATH"
  command -v tansu >/dev/null && return 0
  echo "== installing the Tansu broker (cargo install, about 10-20 minutes once per machine)"
  CARGO_TARGET_DIR="$HOME/.cache/siteflow/tansu-build" \
    cargo install tansu --locked --version 0.6.0 --features dynostore,libsql
}

# fetch_librdkafka DIR: a current librdkafka.so.1 in DIR, from the confluent-kafka wheel (PyPI).
# Debian's librdkafka (2.0) cannot talk to Tansu; kcat and pmacct run with this one.
fetch_librdkafka() {
  local dir="$1" wheels="$HOME/.cache/siteflow/wheels"
  [ -e "$dir/librdkafka.so.1" ] && return 0
  echo "== fetching a current librdkafka.so.1 (confluent-kafka wheel, PyPI)"
  mkdir -p "$wheels" "$dir"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" "confluent-kafka==2.16.1"
  python3 - "$wheels" "$dir" <<'PY'
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
}

# pinned_venv DIR REQUIREMENT...: a venv in DIR with exactly these pinned requirements, reused
# while they match (a marker file records them).
pinned_venv() {
  local dir="$1"
  shift
  [ "$(cat "$dir/.siteflow-requirements" 2>/dev/null)" = "$*" ] && return 0
  echo "== installing $* into $dir"
  python3 -m venv "$dir"
  "$dir/bin/pip" install --quiet --disable-pip-version-check "$@"
  echo "$*" > "$dir/.siteflow-requirements"
}
