#!/usr/bin/env bash
# siteflow's scale-out benchmark (BENCHMARKS.md, "Scale-out", records what it printed).
#
# Usage: scripts/bench-scale-out.sh [options]
#
# What it measures, on a fresh Tansu broker (memory storage) per case:
#   1. Builds the release siteflow binary and the throughput bench (as scripts/bench-e2e.sh), and
#      reuses or generates its simulator records (goflow2 JSON, ~/.cache/siteflow/bench-data).
#   2. Fills a topic of P partitions with N records, 100 per message.
#   3. The baseline: one `siteflow run` (stage all, no internal topic) reads it to the end.
#   4. For K = 1, 2, 3: K `siteflow run --stage ingest` instances in one group read the same
#      records (a fresh broker each time); then one `siteflow run --stage site` reads the
#      internal topic the ingest stage wrote to its end: the site stage's cost.
#   Rates come from the instances' /metrics (siteflow_records_received_total summed, polled
#   every 200 ms, from the first record seen to the last); CPU seconds and peak RSS from /proc.
#   Ratios are against the baseline measured in the same run.
#
# How long, on the 2-core reference machine with the release build cached: ~5 minutes for 2M
# records. On 2 cores the ingest instances, the broker and the poller share the cores, so more
# instances cannot run faster than the cores allow: the figures say what one machine gives and
# what each instance costs, not how a cluster scales.
#
# Options (or the environment variable in brackets):
#   --records N        records produced (default 2000000) [BENCH_RECORDS]
#   --partitions P     partitions of the input topic (default 4) [BENCH_PARTITIONS]
#   --instances "1 2 3"  ingest instance counts to run (default "1 2 3") [BENCH_INSTANCES]
#   --keep DIR         work in DIR and keep it (configs, logs, results.jsonl) [BENCH_KEEP]
#   -h, --help         this text
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/install-lib.sh
source scripts/install-lib.sh

usage() { sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; }
die() { echo "bench-scale-out: $*" >&2; exit 1; }

records="${BENCH_RECORDS:-2000000}"
partitions="${BENCH_PARTITIONS:-4}"
instances="${BENCH_INSTANCES:-1 2 3}"
keep="${BENCH_KEEP:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --records) records="$2"; shift 2 ;;
    --partitions) partitions="$2"; shift 2 ;;
    --instances) instances="$2"; shift 2 ;;
    --keep) keep="$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ "$records" =~ ^[0-9]+$ ]] || die "--records: a number of records, got $records"
[[ "$partitions" =~ ^[0-9]+$ ]] || die "--partitions: a number, got $partitions"

for v in $(compgen -e | grep '^SITEFLOW_' || true); do
  echo "bench-scale-out: ignoring $v from the environment" >&2
  unset "$v"
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/siteflow/target}"
export PATH="$HOME/.cargo/bin:$PATH"
data_root="$HOME/.cache/siteflow/bench-data"
mkdir -p "$CARGO_TARGET_DIR" "$data_root"
if [ -n "$keep" ]; then
  mkdir -p "$keep"
  work="$(cd "$keep" && pwd)"
else
  work="$(mktemp -d "${TMPDIR:-/tmp}/siteflow-bench-scale-out.XXXXXX")"
fi
results="$work/results.jsonl"
: > "$results"

pids=()
tansu_pid=""
stop_all() {
  local p
  for p in "${pids[@]}" $tansu_pid; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}" $tansu_pid; do wait "$p" 2>/dev/null || true; done
  pids=()
  tansu_pid=""
}
trap 'stop_all; [ -n "$keep" ] || rm -rf "$work"' EXIT

command -v tansu > /dev/null || install_tansu
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "== release build (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --release --locked --bin siteflow --bench throughput --message-format=json-render-diagnostics > "$work/build.json"
bench="$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line) if line.startswith("{") else {}
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "throughput" and m.get("executable"):
        print(m["executable"])' "$work/build.json" | tail -1)"
siteflow="$CARGO_TARGET_DIR/release/siteflow"
[ -x "$bench" ] && [ -x "$siteflow" ] || die "the build did not leave $siteflow and the throughput bench"

data="$data_root/$records"
if [ "$(head -1 "$data/.complete" 2>/dev/null)" != "records=$records rate=50000" ]; then
  echo "== generating $records records into $data"
  rm -rf "$data.tmp" "$data"
  "$bench" generate --records "$records" --rate 50000 --out "$data.tmp" > /dev/null
  printf 'records=%s rate=50000\n' "$records" > "$data.tmp/.complete"
  mv "$data.tmp" "$data"
fi

# A fresh broker with the input topic filled and an internal topic of 3 partitions.
fresh_broker() { # dir
  local dir="$1"
  mkdir -p "$dir/broker"
  tansu_port="$(free_port)"
  (cd "$dir/broker" && exec tansu broker --listener-url "tcp://127.0.0.1:$tansu_port" \
    --advertised-listener-url "tcp://127.0.0.1:$tansu_port" --storage-engine "memory://tansu/") > "$dir/tansu.log" 2>&1 &
  tansu_pid=$!
  for _ in $(seq 300); do (echo > "/dev/tcp/127.0.0.1/$tansu_port") 2> /dev/null && break; sleep 0.1; done
  brokers="127.0.0.1:$tansu_port"
  tansu topic create flows --broker "tcp://$brokers" --partitions "$partitions" > "$dir/topic.log" 2>&1
  tansu topic create siteflow.partials --broker "tcp://$brokers" --partitions 3 >> "$dir/topic.log" 2>&1
  tansu topic create siteflow.readiness --broker "tcp://$brokers" --partitions 1 >> "$dir/topic.log" 2>&1
  tansu topic create siteflow.windows --broker "tcp://$brokers" --partitions 1 >> "$dir/topic.log" 2>&1
  # One message per producer batch: Tansu's memory engine then loses no offset (bench-e2e.sh).
  "$bench" produce --brokers "$brokers" --topic flows --input "$data/goflow2.jsonl" --format goflow2-json \
    --per-message 100 --property batch.num.messages=1 > "$dir/produce.json" 2> "$dir/produce.log"
}

# Starts `siteflow run` with a config for the broker; sets sf_pid and sf_port.
start_siteflow() { # dir name stage
  local dir="$1" name="$2" stage="$3" port
  port="$(free_port)"
  cat > "$dir/$name.yaml" << EOF
source: {kind: kafka}
kafka:
  brokers: "$brokers"
  group_id: bench
  topics: [{name: flows, format: goflow2_json}]
  # batch.num.messages=1: the ingest stage's partials also go one message per producer batch
  # (Tansu's memory engine answers a fetch from inside a batch with the next batch, so a resume
  # after back-pressure would skip messages; the checks below would say so).
  properties: {fetch.wait.max.ms: "10", batch.num.messages: "1"}
checkpoint: {dir: "$dir/checkpoints"}
scale_out: {stage: $stage}
http: {listen: "127.0.0.1:$port"}
EOF
  RUST_LOG="info,librdkafka=warn" "$siteflow" run --config "$dir/$name.yaml" > /dev/null 2> "$dir/$name.log" &
  sf_pid=$!
  sf_port="$port"
  pids+=("$sf_pid")
}

# Polls the instances' /metrics until `metric` (summed) reaches `want` and stays, or stalls for
# 60 s; prints JSON: seconds from the first count to the last change, and the count.
poll() { # metric want port...
  python3 - "$@" << 'EOF'
import json, sys, time, urllib.request
metric, want, ports = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
def total():
    n = 0.0
    for p in ports:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=2).read().decode()
        except Exception:
            continue
        for line in body.splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name == metric and (metric != "siteflow_scale_out_partials_total" or 'outcome="merged"' in line or 'outcome="duplicate"' in line):
                n += float(line.rsplit(" ", 1)[1])
    return n
first = last = None
value, changed = 0.0, time.time()
while True:
    now, v = time.time(), total()
    if v != value:
        value, changed = v, now
        last = now
        if first is None and v > 0:
            first = now
    if want > 0 and value >= want:
        break
    if want == 0 and first is not None and now - changed > 5:
        break
    if now - changed > 60:
        sys.exit(f"{metric} stalled at {value} (wanted {want})")
    time.sleep(0.2)
print(json.dumps({"seconds": round(last - first, 3), "count": value}))
EOF
}

cpu_rss() { # pid: "cpu_seconds rss_mib"
  local pid="$1"
  awk -v clk="$(getconf CLK_TCK)" '{printf "%.2f ", ($14 + $15) / clk}' "/proc/$pid/stat"
  awk '/^VmHWM:/ {printf "%.1f\n", $2 / 1024}' "/proc/$pid/status"
}

field() { python3 -c 'import json, sys; print(json.loads(sys.argv[2])[sys.argv[1]])' "$1" "$2"; }
emit() { python3 -c 'import json, sys; print(json.dumps(dict(a.split("=", 1) for a in sys.argv[1:])))' "$@" | tee -a "$results"; }

commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
emit bench=env "commit=$commit" "cores=$(nproc --all)" "cpu=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)" \
  "records=$records" "partitions=$partitions" "tansu=$(tansu --version 2>/dev/null | awk '{print $2}')"

echo "== baseline: one instance, stage all"
dir="$work/all"
mkdir -p "$dir"
fresh_broker "$dir"
start_siteflow "$dir" all all
out="$(poll siteflow_records_received_total "$records" "$sf_port")" || die "stage all: $out; log: $dir/all.log"
read -r cpu rss < <(cpu_rss "$sf_pid")
emit bench=all instances=1 "seconds=$(field seconds "$out")" "cpu_seconds=$cpu" "rss_peak_mib=$rss"
stop_all

for k in $instances; do
  echo "== ingest stage: $k instance(s), then one site-stage instance"
  dir="$work/ingest-$k"
  mkdir -p "$dir"
  fresh_broker "$dir"
  ports=()
  ingest_pids=()
  for i in $(seq "$k"); do
    start_siteflow "$dir" "ingest$i" ingest
    ingest_pids+=("$sf_pid")
    ports+=("$sf_port")
  done
  out="$(poll siteflow_records_received_total "$records" "${ports[@]}")" || die "ingest x$k: $out; logs in $dir"
  cpu_total=0
  rss_max=0
  for pid in "${ingest_pids[@]}"; do
    read -r cpu rss < <(cpu_rss "$pid")
    cpu_total="$(awk -v a="$cpu_total" -v b="$cpu" 'BEGIN { printf "%.2f", a + b }')"
    rss_max="$(awk -v a="$rss_max" -v b="$rss" 'BEGIN { print (b > a) ? b : a }')"
  done
  emit bench=ingest "instances=$k" "seconds=$(field seconds "$out")" "cpu_seconds=$cpu_total" "rss_peak_mib=$rss_max"
  # SIGTERM: the last checkpoint's partials reach the internal topic before they exit.
  for pid in "${ingest_pids[@]}"; do kill -TERM "$pid"; done
  for pid in "${ingest_pids[@]}"; do wait "$pid" 2> /dev/null || true; done
  pids=()
  start_siteflow "$dir" site site
  out="$(poll siteflow_scale_out_partials_total 0 "$sf_port")" || die "site stage after ingest x$k: $out; log: $dir/site.log"
  # Every partial merged once: none skipped by an offset gap, none dropped as an overlap.
  lost="$(curl -s "http://127.0.0.1:$sf_port/metrics" | awk '/^siteflow_kafka_offset_gaps_total / {n += $2} /^siteflow_scale_out_partials_total\{outcome="(overlap|malformed)"\}/ {n += $2} END {print n + 0}')"
  [ "$lost" = 0 ] || die "site stage after ingest x$k: $lost partials skipped or dropped (offset gaps, overlaps); log: $dir/site.log"
  read -r cpu rss < <(cpu_rss "$sf_pid")
  emit bench=site "after_ingest_instances=$k" "seconds=$(field seconds "$out")" "partials=$(field count "$out")" \
    "cpu_seconds=$cpu" "rss_peak_mib=$rss"
  stop_all
done

echo "== summary ($records records, $partitions partitions; rates from the first record seen to the last)"
python3 - "$results" "$records" << 'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
n = float(sys.argv[2])
base = next(r for r in rows if r["bench"] == "all")
base_rate = n / float(base["seconds"])
print(f"  stage all, 1 instance: {base_rate:,.0f} records/s, {float(base['cpu_seconds']) / n * 1e6:.2f} CPU s per million, peak RSS {base['rss_peak_mib']} MiB")
for r in rows:
    if r["bench"] == "ingest":
        rate = n / float(r["seconds"])
        print(f"  ingest, {r['instances']} instance(s): {rate:,.0f} records/s ({rate / base_rate:.2f}x stage all), "
              f"{float(r['cpu_seconds']) / n * 1e6:.2f} CPU s per million, peak RSS {r['rss_peak_mib']} MiB per instance")
    if r["bench"] == "site":
        print(f"  site stage after {r['after_ingest_instances']} ingest instance(s): {float(r['partials']):.0f} partials in {r['seconds']} s, "
              f"{r['cpu_seconds']} CPU s ({float(r['cpu_seconds']) / n * 1e6:.2f} per million input records), peak RSS {r['rss_peak_mib']} MiB")
EOF
