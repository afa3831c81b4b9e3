#!/usr/bin/env bash
# siteflow's end-to-end throughput benchmark (issue 6; BENCHMARKS.md records what it printed).
#
# Usage: scripts/bench-e2e.sh [options]
#
# What it measures:
#   1. Builds the release siteflow binary and the throughput bench (benches/throughput.rs), and
#      generates simulator flow records once as goflow2 JSON, goflow2 protobuf and pmacct JSON
#      (cached in ~/.cache/siteflow/bench-data/<records>, reused while the count matches; delete
#      that directory after changing the generator or the simulator).
#   2. In process, on ONE core (taskset -c CORE): siteflow's whole chain (decode → enrich →
#      window → close → Prometheus sink) over each format, 1 record per message, and goflow2 JSON
#      also 100 records per message; the plain serde_json parse-and-sum loop (the practical
#      limit); DuckDB 1.4.2 with one thread running the same per-exporter, 10 s window sum.
#      Prints records/s (best of 3) and the ratios pipeline/DuckDB and pipeline/serde-loop.
#   3. Through Kafka (a Tansu 0.6.0 broker on loopback), for (a) 1 and (b) 100 goflow2 JSON
#      records per message: fills a fresh topic, then reads it to the end three ways — the
#      bench's bare rdkafka consumer (the raw consume rate), kcat, and `siteflow run` (rate from
#      its /metrics, two counters polled every 100 ms by name). Prints records/s of each, siteflow/raw (target
#      ≥ 0.8), window close latency p50/p99, siteflow's peak RSS and CPU seconds per million
#      records.
#   4. Cleans up: stops the broker and siteflow, removes its temporary files (unless --keep).
#
# How long, on the 2-core reference machine with the release build cached (a cold build adds
# 10-20 minutes, installing Tansu once 10-20 more): in-process 3-5 minutes; `--cases 100` about
# 7 minutes. The 1-record-per-message case takes over an hour for 5M records on Tansu 0.6.0
# (one message per producer batch: ~6k messages/s to produce, under 10k/s to read; see the
# storage note below and BENCHMARKS.md), so `--cases 100` is the usual run.
# Disk: ~1 GB per million cached records; the broker keeps its topic in memory (~2.6 GB per 5M).
#
# Options (or the environment variable in brackets):
#   --records N          records for the in-process step (default 1000000) [BENCH_RECORDS]
#   --kafka-records N    records produced per Kafka case (default 5000000) [BENCH_KAFKA_RECORDS]
#   --partitions P       partitions of each topic (default 2) [BENCH_PARTITIONS]
#   --skip-kafka         in-process step only [BENCH_SKIP_KAFKA=1]
#   --skip-inprocess     Kafka step only [BENCH_SKIP_INPROCESS=1]
#   --cases "1 100"      records per message of the Kafka cases to run (default both) [BENCH_CASES]
#   --top-talkers N      siteflow's sql.top_talkers in the Kafka step (default 10; 0 = off) [BENCH_TOP_TALKERS]
#   --keep DIR           work in DIR and keep it (configs, logs, results.jsonl) [BENCH_KEEP]
#   --core C             the one core of the in-process step (default 1) [BENCH_CORE]
#   --rate R             event-time records/s of the generated data (default 50000: 10 s
#                        windows of 500k records) [BENCH_RATE]
#   --storage memory|sqlite  Tansu's storage engine (default memory; SQLite serves a 5M-record
#                        topic at a few thousand records/s, see below) [BENCH_STORAGE]
#   --fetch-wait-ms MS   fetch.wait.max.ms for all three readers (default 10: Tansu holds every
#                        fetch for the whole wait, so librdkafka's 500 measures the broker's
#                        pauses, not the readers; empty = librdkafka's default) [BENCH_FETCH_WAIT_MS]
#   -h, --help           this text
#
# Everything but the in-process step runs with the affinity the script was started with
# (e.g. `taskset -c 0 scripts/bench-e2e.sh` keeps the Kafka step off core 1).
# Results: one JSON object per figure in DIR/results.jsonl; a summary table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/install-lib.sh
source scripts/install-lib.sh
repo_root="$PWD"

usage() { sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; }

records="${BENCH_RECORDS:-1000000}"
kafka_records="${BENCH_KAFKA_RECORDS:-5000000}"
partitions="${BENCH_PARTITIONS:-2}"
skip_kafka="${BENCH_SKIP_KAFKA:-0}"
skip_inprocess="${BENCH_SKIP_INPROCESS:-0}"
cases="${BENCH_CASES:-1 100}"
top_talkers="${BENCH_TOP_TALKERS:-10}"
keep="${BENCH_KEEP:-}"
core="${BENCH_CORE:-1}"
rate="${BENCH_RATE:-50000}"
storage="${BENCH_STORAGE:-memory}"
fetch_wait_ms="${BENCH_FETCH_WAIT_MS-10}"
poll_ms=100

while (($#)); do
  case "$1" in
    --records) records="$2"; shift 2 ;;
    --kafka-records) kafka_records="$2"; shift 2 ;;
    --partitions) partitions="$2"; shift 2 ;;
    --skip-kafka) skip_kafka=1; shift ;;
    --skip-inprocess) skip_inprocess=1; shift ;;
    --cases) cases="$2"; shift 2 ;;
    --top-talkers) top_talkers="$2"; shift 2 ;;
    --keep) keep="$2"; shift 2 ;;
    --core) core="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --storage) storage="$2"; shift 2 ;;
    --fetch-wait-ms) fetch_wait_ms="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench-e2e: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in records kafka_records partitions rate; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "bench-e2e: --${v//_/-} wants a positive integer, got '${!v}'" >&2; exit 2; }
done
[[ "$core" =~ ^[0-9]+$ ]] || { echo "bench-e2e: --core wants a core number, got '$core'" >&2; exit 2; }
[[ -z "$fetch_wait_ms" || "$fetch_wait_ms" =~ ^[0-9]+$ ]] || { echo "bench-e2e: --fetch-wait-ms wants an integer" >&2; exit 2; }
case "$storage" in sqlite|memory) ;; *) echo "bench-e2e: --storage is sqlite or memory" >&2; exit 2 ;; esac
[ "$skip_kafka" = 0 ] || [ "$skip_kafka" = 1 ] || { echo "bench-e2e: BENCH_SKIP_KAFKA is 0 or 1" >&2; exit 2; }

started=$SECONDS
# siteflow reads SITEFLOW_* variables as configuration (and refuses unknown ones): none here.
for v in $(compgen -e | grep '^SITEFLOW_' || true); do
  echo "bench-e2e: ignoring $v from the environment" >&2
  unset "$v"
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/siteflow/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export PATH="$HOME/.cargo/bin:$PATH"
data_root="$HOME/.cache/siteflow/bench-data"
bench_venv="$HOME/.cache/siteflow/bench-venv"
librdkafka_dir="$HOME/.cache/siteflow/librdkafka"
mkdir -p "$CARGO_TARGET_DIR" "$data_root"

if [ -n "$keep" ]; then
  mkdir -p "$keep"
  work="$(cd "$keep" && pwd)"
else
  work="$(mktemp -d "${TMPDIR:-/tmp}/siteflow-bench.XXXXXX")"
fi
results="$work/results.jsonl"
: > "$results"

# --- processes started here, stopped on any exit ------------------------------------------------
sf_pid=""
tansu_pid=""
stop_pid() { # pid signal: signal, wait up to 20 s, then SIGKILL
  local pid="$1"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill "-$2" "$pid" 2>/dev/null || true
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$sf_pid" TERM
  stop_pid "$tansu_pid" TERM
  if [ -z "$keep" ]; then
    rm -rf "$work"
  else
    echo "bench-e2e: kept $work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

headline() { printf '\n== %s\n' "$*"; }
die() { echo "bench-e2e: $*" >&2; exit 1; }

# --- Python helpers: /metrics polling and parsing, DuckDB, JSON results, the summary ------------
helper="$work/bench_helper.py"
cat > "$helper" <<'PY'
import json, math, os, re, sys, time, urllib.request

def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()

def samples(text):
    """(name, labels, value) of every sample line."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        try:
            yield name, labels.rstrip("}"), float(value)
        except ValueError:
            pass

def total(text, metric, contains=""):
    # Only the metric's own lines are parsed: a whole /metrics page is over a megabyte, and
    # parsing every line of it cost a third of a core beside siteflow on the 2-core machine.
    lines = re.findall(r"^" + re.escape(metric) + r"(?:\{[^\n]*\})? [^\n]*$", text, re.M)
    return sum(v for n, l, v in samples("\n".join(lines)) if n == metric and contains in l)

def quantiles(text, metric, qs):
    """Upper bound of the first histogram bucket whose cumulative count reaches q * count."""
    buckets = []
    for n, l, v in samples(text):
        if n == metric + "_bucket":
            le = l.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((math.inf if le == "+Inf" else float(le), v))
    buckets.sort()
    count = total(text, metric + "_count")
    out = []
    for q in qs:
        if count <= 0:
            out.append(None)
            continue
        out.append(next((le for le, c in buckets if c >= q * count), math.inf))
    return count, out

def num(s):
    if s in ("", "null", "None"):
        return None
    if s in ("true", "false"):
        return s == "true"
    for t in (int, float):
        try:
            return t(s)
        except ValueError:
            pass
    return s

def fmt_rate(x):
    return "-" if x is None else f"{x:,.0f}"

def fmt_ratio(a, b):
    return "-" if not a or not b else f"{a / b:.2f}"

def fmt_latency(x):
    if x is None:
        return "-"
    if x == math.inf or x == "inf":
        return ">5 s"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"

def diagnostics(text):
    keep = ("siteflow_kafka", "siteflow_records_", "siteflow_windows")
    return "\n".join(
        f"  {n}{{{l}}} {v:g}" if l else f"  {n} {v:g}"
        for n, l, v in samples(text) if n.startswith(keep) and v != 0 and not n.endswith("_bucket"))

def poll(url, target, interval, pid, first_timeout, stall_timeout):
    """Polls siteflow_records_received_total until it reaches target."""
    # Only the two counters it reads (`/metrics?name=`): the whole page is over a megabyte with
    # the 242 sites, and rendering it ten times a second cost siteflow a quarter of its CPU here.
    progress = url + "?name=siteflow_records_received_total&name=siteflow_kafka_offset_gaps_total"
    t0 = time.monotonic()
    first = v_first = None
    last_v, last_change, text, tick = 0.0, t0, "", t0
    while True:
        try:
            text = get(progress)
            v = total(text, "siteflow_records_received_total")
            now = time.monotonic()  # when the answer arrived
            if v > last_v:
                last_v, last_change = v, now
            if first is None and v > 0:
                first, v_first = now, v
            if v >= target:
                break
        except OSError:
            now = time.monotonic()
        if not os.path.exists(f"/proc/{pid}"):
            sys.exit(f"siteflow (pid {pid}) exited after {last_v:.0f} of {target} records")
        why = None
        if total(text, "siteflow_kafka_offset_gaps_total") > 0:
            why = "records skipped (offset gaps; Tansu's memory engine does that, see --storage)"
        elif first is None and now - t0 > first_timeout:
            why = f"no record within {first_timeout} s"
        elif first is not None and now - last_change > stall_timeout:
            why = f"stuck at {last_v:.0f} of {target} records for {stall_timeout} s"
        if why:
            try:
                text = get(url)
            except OSError:
                pass
            sys.exit(f"siteflow: {why}; its counters:\n{diagnostics(text)}")
        tick += interval
        time.sleep(max(0.0, tick - time.monotonic()))
    seconds = now - first
    print(json.dumps({"join_seconds": round(first - t0, 3), "siteflow_seconds": round(seconds, 3),
                      "siteflow_first_value": v_first,
                      "siteflow_records_per_sec": round(target / seconds) if seconds > 0 else None}))

def scrape(url):
    text = get(url)
    windows, (p50, p99) = quantiles(text, "siteflow_window_close_latency_seconds", (0.5, 0.99))
    inf = lambda x: "inf" if x == math.inf else x
    print(json.dumps({
        "windows_closed": windows, "close_p50_bucket_s": inf(p50), "close_p99_bucket_s": inf(p99),
        "received": total(text, "siteflow_records_received_total"),
        "decoded": total(text, "siteflow_records_decoded_total"),
        "rejected": total(text, "siteflow_records_rejected_total"),
        "late_flows": total(text, "siteflow_records_late_total", 'table="flows"'),
        "offset_gaps": total(text, "siteflow_kafka_offset_gaps_total"),
        "backpressure_pauses": total(text, "siteflow_kafka_backpressure_pauses_total"),
        "process_cpu_seconds_metric": total(text, "process_cpu_seconds_total"),
        "process_rss_bytes_metric": total(text, "process_resident_memory_bytes"),
    }))

def duckdb_bench(path, expected, repeat=3):
    import duckdb
    con = duckdb.connect()
    con.execute("SET threads TO 1")
    q = f"""
        SELECT sampler_address, time_flow_end_ns // 10000000000 AS w,
               sum(bytes * greatest(sampling_rate, 1)) AS bytes,
               sum(packets * greatest(sampling_rate, 1)) AS packets, count(*) AS records
        FROM read_json('{path}', format = 'newline_delimited', columns = {{time_flow_end_ns: 'BIGINT',
             sampler_address: 'VARCHAR', bytes: 'BIGINT', packets: 'BIGINT', sampling_rate: 'BIGINT',
             src_addr: 'VARCHAR', dst_addr: 'VARCHAR'}})
        GROUP BY ALL"""
    best = math.inf
    for run in range(1, repeat + 1):
        start = time.perf_counter()
        rows = con.execute(q).fetchall()
        seconds = time.perf_counter() - start
        best = min(best, seconds)
        counted = sum(r[4] for r in rows)
        if counted != expected:
            sys.exit(f"DuckDB counted {counted} records, the file has {expected}")
        print(json.dumps({"bench": "duckdb", "run": run, "records": counted, "groups": len(rows),
                          "seconds": round(seconds, 4), "records_per_sec": round(counted / seconds)}))
    print(json.dumps({"bench": "duckdb_best", "version": duckdb.__version__, "records": expected,
                      "records_per_sec": round(expected / best)}))

def emit(args):
    out = {}
    for a in args:
        if a.startswith("@"):
            with open(a[1:]) as f:
                out.update(json.loads(f.read().strip().splitlines()[-1]))
        else:
            k, _, v = a.partition("=")
            out[k] = num(v)
    print(json.dumps(out))

def load(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]

def find(rows, **kw):
    for r in reversed(rows):
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return {}

def field(path, key, *conds):
    r = find(load(path), **{k: num(v) for k, _, v in (c.partition("=") for c in conds)})
    v = r.get(key)
    print("" if v is None else v)

def kafka_lines(r):
    per = r["per_message"]
    rows = [
        ("produce", f"{r['messages']:,} messages in {r['produce_seconds']:.1f} s"),
        ("raw consume (bench)", f"{fmt_rate(r['raw_records_per_sec'])} records/s ({r['raw_seconds']:.2f} s from the first message)"),
        ("kcat", f"{fmt_rate(r['kcat_records_per_sec'])} records/s ({r['kcat_seconds']:.2f} s, whole command, {r['kcat_records']:,} records)"),
        ("siteflow", f"{fmt_rate(r['siteflow_records_per_sec'])} records/s ({r['siteflow_seconds']:.2f} s from the first record; "
                     f"first record {r['join_seconds']:.2f} s after start)"),
        ("siteflow / raw consume", f"{fmt_ratio(r['siteflow_records_per_sec'], r['raw_records_per_sec'])} (target >= 0.8)"),
        ("siteflow / kcat", fmt_ratio(r['siteflow_records_per_sec'], r['kcat_records_per_sec'])),
        ("window close latency", f"p50 <= {fmt_latency(r['close_p50_bucket_s'])}, p99 <= {fmt_latency(r['close_p99_bucket_s'])} "
                                 f"(histogram buckets, {r['windows_closed']:.0f} windows); exact: "
                                 f"p50 {fmt_latency(r.get('close_p50_exact_s'))}, p99 {fmt_latency(r.get('close_p99_exact_s'))}"),
        ("peak RSS (VmHWM)", f"{r['rss_peak_mib']:.0f} MiB"),
        ("CPU", f"{r['cpu_seconds']:.2f} s = {r['cpu_seconds_per_million']:.2f} s per million records "
                f"(process_cpu_seconds_total: {r['process_cpu_seconds_metric']:.0f}, whole seconds)"),
        ("late / rejected / offset gaps / pauses", f"{r['late_flows']:.0f} / {r['rejected']:.0f} / {r['offset_gaps']:.0f} / {r['backpressure_pauses']:.0f}"),
    ]
    return "\n".join(f"  {k:<38} {v}" for k, v in rows)

def summary(path, elapsed):
    rows = load(path)
    env = find(rows, bench="env")
    print(f"commit {env.get('commit')}, {env.get('cpu')}, {env.get('cores')} cores; total {elapsed} s")
    inproc = [r for r in rows if r.get("bench") == "pipeline_best"]
    if inproc:
        print(f"\nin process, {env.get('records'):,} records, one core (taskset -c {env.get('core')}); best of 3")
        print(f"  {'what':<40} {'records/s':>12}")
        for r in inproc:
            what = f"pipeline {r['format']}, {r['per_message']} per message" + ("" if r.get("top_talkers", True) else ", no top talkers")
            print(f"  {what:<40} {fmt_rate(r['records_per_sec']):>12}")
        serde = find(rows, bench="serde_loop_best").get("records_per_sec")
        duck = find(rows, bench="duckdb_best")
        print(f"  {'serde_json loop (goflow2 JSON)':<40} {fmt_rate(serde):>12}")
        print(f"  {'DuckDB ' + str(duck.get('version')) + ', 1 thread (goflow2 JSON)':<40} {fmt_rate(duck.get('records_per_sec')):>12}")
        for per, talkers in ((1, True), (100, True), (1, False)):
            p = find(rows, bench="pipeline_best", format="goflow2_json", per_message=per, top_talkers=talkers).get("records_per_sec")
            label = f"{per} per message" + ("" if talkers else ", no top talkers")
            print(f"  goflow2 JSON, {label}: pipeline/DuckDB {fmt_ratio(p, duck.get('records_per_sec'))}, "
                  f"pipeline/serde loop {fmt_ratio(p, serde)}")
    kafka = [r for r in rows if r.get("bench") == "kafka"]
    if kafka:
        r0 = kafka[0]
        print(f"\nKafka: Tansu {r0['tansu']} ({r0['storage']}), {r0['partitions']} partitions, {r0['records']:,} goflow2 JSON records "
              f"per case, fetch.wait.max.ms {r0['fetch_wait_ms'] or 'default (500)'} for every reader")
        cols = ["records/msg", "raw rec/s", "kcat rec/s", "siteflow rec/s", "sf/raw", "sf/kcat", "close p50", "close p99", "peak RSS", "CPU s/M rec"]
        table = [cols] + [[str(r["per_message"]), fmt_rate(r["raw_records_per_sec"]), fmt_rate(r["kcat_records_per_sec"]),
                           fmt_rate(r["siteflow_records_per_sec"]), fmt_ratio(r["siteflow_records_per_sec"], r["raw_records_per_sec"]),
                           fmt_ratio(r["siteflow_records_per_sec"], r["kcat_records_per_sec"]),
                           "<= " + fmt_latency(r["close_p50_bucket_s"]), "<= " + fmt_latency(r["close_p99_bucket_s"]),
                           f"{r['rss_peak_mib']:.0f} MiB", f"{r['cpu_seconds_per_million']:.2f}"] for r in kafka]
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        for row in table:
            print("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)))
        print("  (close latency: upper bound of the Prometheus histogram bucket where the quantile falls;"
              " exact hdrhistogram values in the per-case output)")

def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "poll":
        url, target, interval_ms, pid, first_timeout, stall = args
        poll(url, float(target), float(interval_ms) / 1000, int(pid), float(first_timeout), float(stall))
    elif cmd == "scrape":
        scrape(args[0])
    elif cmd == "duckdb":
        duckdb_bench(args[0], int(args[1]))
    elif cmd == "emit":
        emit(args)
    elif cmd == "field":
        field(args[0], args[1], *args[2:])
    elif cmd == "show":
        for line in sys.stdin:
            r = json.loads(line)
            rest = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("bench", "records_per_sec"))
            print(f"  {r['bench']:<16} {r['records_per_sec']:>12,} records/s" + (f"  ({rest})" if rest else ""), flush=True)
    elif cmd == "kafka-lines":
        print(kafka_lines(json.loads(args[0])))
    elif cmd == "summary":
        summary(args[0], args[1])
    elif cmd == "free-port":
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
    else:
        sys.exit(f"unknown helper command {cmd}")

main()
PY
h() { python3 "$helper" "$@"; }

# --- prerequisites (installed once, as scripts/test.sh does) -------------------------------------
command -v cargo >/dev/null || die "cargo not found; install Rust (rustup) first"
need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
command -v taskset >/dev/null || need_apt+=(util-linux)
python3 -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ "$skip_kafka" = 0 ]; then
  command -v kcat >/dev/null || need_apt+=(kcat)
fi
apt_install "${need_apt[@]}"
taskset -c "$core" true 2>/dev/null || die "cannot run on core $core (--core)"

# DuckDB, the SQL-engine baseline: a venv reused while its pinned version matches.
duckdb_requirements="duckdb==1.4.2"
pinned_venv "$bench_venv" $duckdb_requirements

if [ "$skip_kafka" = 0 ]; then
  install_tansu
  fetch_librdkafka "$librdkafka_dir"
fi

# --- 1. build and data ---------------------------------------------------------------------------
headline "1. release build of siteflow and the throughput bench (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
# One build for both; the bench's executable is read from cargo's JSON messages (the same file
# `cargo bench --no-run --message-format=json` names: the bench profile inherits release).
cargo build --release --locked --bin siteflow --bench throughput --message-format=json-render-diagnostics > "$work/build.json"
bench="$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line) if line.startswith("{") else {}
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "throughput" and m.get("executable"):
        print(m["executable"])' "$work/build.json" | tail -1)"
siteflow="$CARGO_TARGET_DIR/release/siteflow"
[ -x "$bench" ] || die "no throughput bench executable in cargo's output ($work/build.json)"
[ -x "$siteflow" ] || die "no $siteflow after the build"
echo "  siteflow: $siteflow ($("$siteflow" --version 2>/dev/null || echo '?'))"
echo "  bench:    $bench"

commit="$(git -C "$repo_root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
git -C "$repo_root" diff --quiet HEAD -- src benches 2>/dev/null || commit="$commit+uncommitted"
cpu_model="$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)"
h emit bench=env "commit=$commit" "cpu=$cpu_model" "cores=$(nproc --all)" "records=$records" "kafka_records=$kafka_records" \
  "core=$core" "rate=$rate" "partitions=$partitions" >> "$results"

# Generates N records (all three formats) once into the cache; prints the directory.
dataset() {
  local n="$1" dir="$data_root/$1" marker
  [ "$rate" = 50000 ] || dir="$data_root/$1-rate$rate"
  marker="records=$n rate=$rate"
  if [ "$(head -1 "$dir/.complete" 2>/dev/null)" = "$marker" ] \
    && [ -s "$dir/goflow2.jsonl" ] && [ -s "$dir/pmacct.jsonl" ] && [ -s "$dir/goflow2.pbd" ]; then
    echo "  reusing $n records in $dir" >&2
  else
    echo "  generating $n records into $dir" >&2
    local tmp="$dir.tmp.$$"
    rm -rf "$tmp" "$dir"
    "$bench" generate --records "$n" --rate "$rate" --out "$tmp" 2>&1 | sed 's/^/  /' >&2
    local lines
    lines="$(wc -l < "$tmp/goflow2.jsonl")"
    [ "$lines" -eq "$n" ] || die "generate wrote $lines records, not $n"
    printf '%s\n' "$marker" > "$tmp/.complete"
    mv "$tmp" "$dir"
  fi
  echo "$dir"
}

headline "generated data (simulator, 242 sites, $rate records/s of event time)"
data="$(dataset "$records")"
if [ "$skip_kafka" = 0 ]; then
  kafka_data="$(dataset "$kafka_records")"
fi

# --- 2. in process, one core ---------------------------------------------------------------------
# Runs a bench command on the one core; its JSON lines go to the results and, shortened, to the screen.
one_core() {
  taskset -c "$core" "$@" | tee -a "$results" | h show
}

in_process() {
headline "2. in process on core $core: siteflow's chain (decode → enrich → window → close → Prometheus sink), $records records"
# The last case turns the conversations aggregation (SQL table top_talkers) off: its cost apart.
for spec in "goflow2-json goflow2.jsonl 1" "goflow2-json goflow2.jsonl 100" "goflow2-protobuf goflow2.pbd 1" \
  "pmacct-json pmacct.jsonl 1" "goflow2-json goflow2.jsonl 1 --no-top-talkers"; do
  read -r fmt file per flags <<<"$spec"
  echo " pipeline $fmt, $per record(s) per message ${flags:-}:"
  # shellcheck disable=SC2086 # flags: zero or one word
  one_core "$bench" pipeline --input "$data/$file" --format "$fmt" --per-message "$per" ${flags:-}
done
echo " serde_json parse-and-sum loop (goflow2 JSON):"
one_core "$bench" serde-loop --input "$data/goflow2.jsonl"
echo " DuckDB $(sed 's/.*==//' "$bench_venv/.siteflow-requirements"), SET threads TO 1 (goflow2 JSON):"
one_core "$bench_venv/bin/python" "$helper" duckdb "$data/goflow2.jsonl" "$records"

pick() { h field "$results" "$@"; }
duck="$(pick records_per_sec bench=duckdb_best)"
serde="$(pick records_per_sec bench=serde_loop_best)"
for per in 1 100; do
  p="$(pick records_per_sec bench=pipeline_best format=goflow2_json "per_message=$per" top_talkers=true)"
  awk -v p="$p" -v d="$duck" -v s="$serde" -v per="$per" 'BEGIN {
    printf "  goflow2 JSON, %d per message: pipeline/DuckDB %.2f, pipeline/serde loop %.2f\n", per, p / d, p / s }'
done
}
[ "$skip_inprocess" = 1 ] || in_process

# --- 3. Kafka ------------------------------------------------------------------------------------
wait_port() { # port timeout_s
  local deadline=$((SECONDS + $2))
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || die "nothing listening on 127.0.0.1:$1 after $2 s"
    sleep 0.1
  done
}

# Tansu 0.6.0 storage: SQLite. Tried on 300k records, one core: the memory engine produces ~9x
# and serves ~2x faster (43k vs 22k messages/s at 1 record per message), but it answers a fetch
# from an offset inside a record batch with the *next* batch (see tests/it/kafka_support.rs).
# siteflow resumes mid-batch whenever back-pressure pauses a partition, and then silently loses
# the rest of that batch: with the memory engine and fetch.wait.max.ms 10 it skipped 1,874 of
# 300,000 records (siteflow_kafka_offset_gaps_total 1) and never reached the count. SQLite is
# correct on small topics, but each fetch costs time that grows with the topic: a 5M-record topic
# was read at a few thousand records/s (Tansu at 100 % CPU; the raw consumer had not finished
# after 13 minutes). So the default is the memory engine, with each message produced as a batch
# of its own (slow to produce: ~7k messages/s): every offset then starts a batch, and a resume
# after back-pressure loses nothing. (With normal producer batching siteflow paused once and lost
# 1,834 records of 5M.) The stall and offset-gap checks below would say if anything was lost.
start_tansu() { # dir
  local dir="$1"
  mkdir -p "$dir/broker"
  tansu_port="$(h free-port)"
  local engine="sqlite://tansu.db" # relative: Tansu runs in $dir/broker
  [ "$storage" = sqlite ] || engine="memory://tansu/"
  (cd "$dir/broker" && exec tansu broker --listener-url "tcp://127.0.0.1:$tansu_port" \
    --advertised-listener-url "tcp://127.0.0.1:$tansu_port" --storage-engine "$engine") > "$dir/tansu.log" 2>&1 &
  tansu_pid=$!
  wait_port "$tansu_port" 30
}

kafka_case() { # records_per_message
  local per="$1" dir="$work/kafka-$1" topic="bench-flows-$1" t0 t1
  mkdir -p "$dir"
  headline "3$([ "$per" = 1 ] && echo a || echo b). Kafka, $per record(s) per message: $kafka_records goflow2 JSON records, $partitions partitions, Tansu $storage"
  start_tansu "$dir"
  local brokers="127.0.0.1:$tansu_port"
  tansu topic create "$topic" --broker "tcp://$brokers" --partitions "$partitions" > "$dir/topic.log" 2>&1 \
    || die "tansu topic create $topic: $(cat "$dir/topic.log")"

  echo "  producing..."
  local produce_args=(--per-message "$per")
  [ "$storage" = sqlite ] || produce_args+=(--property batch.num.messages=1)
  "$bench" produce --brokers "$brokers" --topic "$topic" --input "$kafka_data/goflow2.jsonl" --format goflow2-json \
    "${produce_args[@]}" > "$dir/produce.json" 2> "$dir/produce.log"
  local messages produce_seconds
  messages="$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["messages"])' "$dir/produce.json")"
  produce_seconds="$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["seconds"])' "$dir/produce.json")"

  echo "  raw consume (the bench's bare rdkafka consumer)..."
  local consume_args=(--brokers "$brokers" --topic "$topic" --messages "$messages")
  [ -z "$fetch_wait_ms" ] || consume_args+=(--property "fetch.wait.max.ms=$fetch_wait_ms")
  "$bench" consume "${consume_args[@]}" > "$dir/consume.json" 2> "$dir/consume.log"
  local raw_seconds
  raw_seconds="$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["seconds"])' "$dir/consume.json")"

  echo "  kcat -C -e (no consumer group; timed over the whole command)..."
  local kcat_args=(-C -b "$brokers" -t "$topic" -e -q -o beginning)
  [ -z "$fetch_wait_ms" ] || kcat_args+=(-X "fetch.wait.max.ms=$fetch_wait_ms")
  t0="$(date +%s.%N)"
  local kcat_records
  kcat_records="$(LD_LIBRARY_PATH="$librdkafka_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" kcat "${kcat_args[@]}" 2> "$dir/kcat.log" | wc -l)"
  t1="$(date +%s.%N)"
  local kcat_seconds
  kcat_seconds="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')"
  # One line per record: kcat ends each message with a newline, records inside a message are
  # newline-separated.
  [ "$kcat_records" -eq "$kafka_records" ] || echo "  WARNING: kcat read $kcat_records lines, $kafka_records records were produced"

  echo "  siteflow run..."
  local http_port cfg="$dir/siteflow.yaml"
  http_port="$(h free-port)"
  {
    echo "source: {kind: kafka}"
    echo "kafka:"
    echo "  brokers: \"$brokers\""
    echo "  group_id: bench-$topic-$(date +%s)-$$"
    echo "  topics: [{name: $topic, format: goflow2_json}]"
    [ -z "$fetch_wait_ms" ] || echo "  properties: {fetch.wait.max.ms: \"$fetch_wait_ms\"}"
    echo "checkpoint: {dir: \"$dir/checkpoints\"}"
    echo "sql: {top_talkers: $top_talkers}"
    echo "http: {listen: \"127.0.0.1:$http_port\"}"
  } > "$cfg"
  "$siteflow" check --config "$cfg" > "$dir/check.log" 2>&1 || die "siteflow check --config $cfg: $(cat "$dir/check.log")"
  RUST_LOG="info,librdkafka=warn" "$siteflow" run --config "$cfg" > /dev/null 2> "$dir/siteflow.log" &
  sf_pid=$!
  # 100 ms polls; fails if the first record takes over 120 s or the count stalls for 60 s.
  if ! h poll "http://127.0.0.1:$http_port/metrics" "$kafka_records" "$poll_ms" "$sf_pid" 120 60 > "$dir/poll.json"; then
    echo "  siteflow log (last lines):" >&2
    tail -20 "$dir/siteflow.log" | sed 's/^/    /' >&2
    die "siteflow did not read all $kafka_records records"
  fi
  h scrape "http://127.0.0.1:$http_port/metrics" > "$dir/scrape.json"
  local hwm_kb cpu_ticks clk
  hwm_kb="$(awk '/^VmHWM:/ {print $2}' "/proc/$sf_pid/status")"
  cpu_ticks="$(awk '{print $14 + $15}' "/proc/$sf_pid/stat")"
  clk="$(getconf CLK_TCK)"
  stop_pid "$sf_pid" TERM
  sf_pid=""
  # At shutdown siteflow logs the exact (hdrhistogram) close latency quantiles.
  local exact p50x p99x
  exact="$(grep 'window close-to-visible latency' "$dir/siteflow.log" | tail -1 || true)"
  p50x="$(sed -n 's/.*p50_seconds=\([0-9.e+-]*\).*/\1/p' <<<"$exact")"
  p99x="$(sed -n 's/.*p99_seconds=\([0-9.e+-]*\).*/\1/p' <<<"$exact")"

  stop_pid "$tansu_pid" TERM
  tansu_pid=""
  [ -n "$keep" ] || rm -rf "$dir/broker"

  local line
  line="$(h emit bench=kafka "per_message=$per" "records=$kafka_records" "messages=$messages" "partitions=$partitions" \
    "storage=$storage" "tansu=$(tansu --version 2>/dev/null | awk '{print $2}')" "fetch_wait_ms=$fetch_wait_ms" \
    "produce_seconds=$produce_seconds" "raw_seconds=$raw_seconds" \
    "raw_records_per_sec=$(awk -v n="$kafka_records" -v s="$raw_seconds" 'BEGIN { printf "%.0f", n / s }')" \
    "kcat_records=$kcat_records" "kcat_seconds=$kcat_seconds" \
    "kcat_records_per_sec=$(awk -v n="$kcat_records" -v s="$kcat_seconds" 'BEGIN { printf "%.0f", n / s }')" \
    @"$dir/poll.json" @"$dir/scrape.json" "close_p50_exact_s=$p50x" "close_p99_exact_s=$p99x" \
    "rss_peak_mib=$(awk -v k="$hwm_kb" 'BEGIN { printf "%.1f", k / 1024 }')" \
    "cpu_seconds=$(awk -v t="$cpu_ticks" -v c="$clk" 'BEGIN { printf "%.2f", t / c }')" \
    "cpu_seconds_per_million=$(awk -v t="$cpu_ticks" -v c="$clk" -v n="$kafka_records" 'BEGIN { printf "%.3f", t / c / n * 1e6 }')")"
  echo "$line" >> "$results"
  h kafka-lines "$line"
}

if [ "$skip_kafka" = 0 ]; then
  for per in $cases; do
    [[ "$per" =~ ^[0-9]+$ ]] || die "--cases: records per message are integers, got $per"
    kafka_case "$per"
  done
fi

# --- 4. summary ----------------------------------------------------------------------------------
headline "summary"
h summary "$results" "$((SECONDS - started))"
