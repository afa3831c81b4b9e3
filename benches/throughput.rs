//! The end-to-end throughput benchmark's Rust half (issue 6); `scripts/bench-e2e.sh` drives it,
//! and BENCHMARKS.md records what it printed. Subcommands:
//!
//! - `generate`: simulator records (242 sites) as goflow2 JSON lines, pmacct JSON lines and
//!   length-delimited goflow2 protobuf: the same flows in each format;
//! - `pipeline`: siteflow's whole in-process chain (decode → enrich → window → close → the
//!   Prometheus sink) over one of those files, timed from in-memory message batches;
//! - `serde-loop`: the practical limit, a plain serde_json parse into a borrowed struct and a sum per
//!   exporter and 10 s window;
//! - `produce` / `consume`: fill a Kafka topic from a file; read a topic to its end with a bare
//!   rdkafka consumer (the raw consume rate siteflow is compared with).
//!
//! Each prints one JSON object per run on stdout. Without a subcommand (as `cargo test --benches`
//! runs it) it runs a small self-check: the pipeline and the loop count the same records and bytes.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde::Deserialize;
use siteflow::config::{Config, Pace, SecondCore, SimulatorConfig};
use siteflow::decode::goflow2_pb::FlowMessage;
use siteflow::decode::{DecodeLimits, FlowRecord, goflow2_json};
use siteflow::inventory::Inventory;
use siteflow::metrics::PipelineMetrics;
use siteflow::pipeline::{Pipeline, Resources};
use siteflow::sink::prometheus::SiteMetrics;
use siteflow::source::Source;
use siteflow::source::simulator::{Scenario, Simulator};
use siteflow::types::{Format, Messages, SourceBatch};
use siteflow::window::WindowSpec;

#[derive(Parser)]
#[command(about = "siteflow's end-to-end throughput benchmark (see scripts/bench-e2e.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write simulator flows as goflow2.jsonl, pmacct.jsonl and goflow2.pbd into DIR.
    Generate {
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Flow records per second of event time (sets how many windows the records span).
        #[arg(long, default_value_t = 50_000)]
        rate: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run siteflow's in-process chain over a file written by `generate`.
    Pipeline {
        #[arg(long)]
        input: PathBuf,
        #[arg(long, value_enum)]
        format: BenchFormat,
        /// Records per Kafka message (JSON: newline-separated; protobuf: length-delimited).
        #[arg(long, default_value_t = 1)]
        per_message: usize,
        /// Messages per micro-batch (the Kafka source's kafka.batch_max_messages).
        #[arg(long, default_value_t = 10_000)]
        batch: usize,
        /// Payload bytes per micro-batch (kafka.batch_max_bytes).
        #[arg(long, default_value_t = 4 << 20)]
        batch_bytes: usize,
        /// Run the whole file this many times (fresh pipeline each time); the best run is printed too.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Turn the conversations aggregation off (`sql.top_talkers: 0`).
        #[arg(long)]
        no_top_talkers: bool,
        /// `decode.ahead`: auto (on when the process may run on 2 cores or more), on or off.
        #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
        decode_ahead: String,
        /// `window.parallel_tables`: auto (on when the process may run on 2 cores or more), on or off.
        #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
        parallel_tables: String,
    },
    /// The plain serde_json parse-and-sum loop over a goflow2 JSON file.
    SerdeLoop {
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
    /// Produce a file written by `generate` to a topic.
    Produce {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        input: PathBuf,
        #[arg(long, value_enum)]
        format: BenchFormat,
        #[arg(long, default_value_t = 1)]
        per_message: usize,
        /// Produce the file this many times (to reach a record count larger than the file).
        #[arg(long, default_value_t = 1)]
        times: usize,
        /// A librdkafka property for the producer, `key=value` (repeatable).
        #[arg(long = "property", value_name = "KEY=VALUE")]
        properties: Vec<String>,
    },
    /// Read a topic from the beginning until `messages` messages arrived, with a bare consumer.
    Consume {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        messages: u64,
        /// A librdkafka property for the consumer, `key=value` (repeatable), e.g.
        /// `fetch.wait.max.ms=10` to match what siteflow is given.
        #[arg(long = "property", value_name = "KEY=VALUE")]
        properties: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum BenchFormat {
    Goflow2Json,
    Goflow2Protobuf,
    PmacctJson,
}

impl BenchFormat {
    fn format(self) -> Format {
        match self {
            BenchFormat::Goflow2Json => Format::Goflow2Json,
            BenchFormat::Goflow2Protobuf => Format::Goflow2Protobuf,
            BenchFormat::PmacctJson => Format::PmacctJson,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench`/`cargo test --benches` run bench targets with no subcommand: self-check.
    if args.iter().skip(1).all(|a| a.starts_with("--")) {
        return self_check();
    }
    match Cli::parse().command {
        Command::Generate { records, rate, out } => generate(records, rate, &out),
        Command::Pipeline { input, format, per_message, batch, batch_bytes, repeat, no_top_talkers, decode_ahead, parallel_tables } => {
            let top_talkers = !no_top_talkers;
            let ahead = serde_yaml::from_str::<SecondCore>(&decode_ahead)?;
            let tables = serde_yaml::from_str::<SecondCore>(&parallel_tables)?;
            let records = read_records(&input, format)?;
            let batches = batches(&records, format, per_message, batch, batch_bytes);
            let bytes: usize = records.iter().map(Vec::len).sum();
            let mut best = f64::MAX;
            for run in 1..=repeat {
                let (seconds, cpu, counted) = run_pipeline(batches.clone(), top_talkers, ahead, tables)?;
                anyhow::ensure!(counted == records.len() as u64, "the pipeline counted {counted} of {} records", records.len());
                best = best.min(seconds);
                report(&[
                    ("bench", "\"pipeline\"".into()),
                    ("format", format!("\"{}\"", format.format().as_str())),
                    ("per_message", per_message.to_string()),
                    ("top_talkers", top_talkers.to_string()),
                    ("decode_ahead", ahead.enabled().to_string()),
                    ("parallel_tables", tables.enabled().to_string()),
                    ("run", run.to_string()),
                    ("records", records.len().to_string()),
                    ("seconds", format!("{seconds:.4}")),
                    ("records_per_sec", format!("{:.0}", records.len() as f64 / seconds)),
                    ("mb_per_sec", format!("{:.1}", bytes as f64 / seconds / 1e6)),
                    // Whether the cores were busy or waiting: CPU seconds of every thread of the
                    // process over the run, and that over the run's seconds.
                    ("cpu_seconds", format!("{cpu:.3}")),
                    ("cores_busy", format!("{:.2}", cpu / seconds)),
                ]);
            }
            report(&[
                ("bench", "\"pipeline_best\"".into()),
                ("format", format!("\"{}\"", format.format().as_str())),
                ("per_message", per_message.to_string()),
                ("top_talkers", top_talkers.to_string()),
                ("decode_ahead", ahead.enabled().to_string()),
                ("parallel_tables", tables.enabled().to_string()),
                ("records_per_sec", format!("{:.0}", records.len() as f64 / best)),
            ]);
            Ok(())
        }
        Command::SerdeLoop { input, repeat } => {
            let data = std::fs::read(&input)?;
            let mut best = f64::MAX;
            for _ in 0..repeat {
                let start = Instant::now();
                let (records, _) = serde_loop(&data);
                let seconds = start.elapsed().as_secs_f64();
                best = best.min(seconds);
                report(&[
                    ("bench", "\"serde_loop\"".into()),
                    ("records", records.to_string()),
                    ("seconds", format!("{seconds:.4}")),
                    ("records_per_sec", format!("{:.0}", records as f64 / seconds)),
                ]);
            }
            let (records, _) = serde_loop(&data);
            report(&[("bench", "\"serde_loop_best\"".into()), ("records_per_sec", format!("{:.0}", records as f64 / best))]);
            Ok(())
        }
        Command::Produce { brokers, topic, input, format, per_message, times, properties } => {
            produce(&brokers, &topic, &read_records(&input, format)?, format, per_message, times, &properties)
        }
        Command::Consume { brokers, topic, messages, properties } => consume(&brokers, &topic, messages, &properties),
    }
}

/// User and system CPU seconds of every thread of this process so far.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Prints one JSON object (the values are already JSON).
fn report(fields: &[(&str, String)]) {
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    println!("{{{}}}", body.join(","));
    let _ = std::io::stdout().flush();
}

fn window_spec() -> WindowSpec {
    // The window timing the figures in BENCHMARKS.md were measured with; the rest is the default.
    WindowSpec {
        size: Duration::from_secs(10),
        allowed_lateness: Duration::from_secs(5),
        idle_partition_timeout: Duration::from_secs(30),
        ..Config::default().window_spec()
    }
}

/// Simulator flows in goflow2 JSON, one record per element.
fn simulate(records: u64, rate: u64) -> Vec<Vec<u8>> {
    let cfg = SimulatorConfig {
        pace: Pace::Fast,
        start_unix_secs: Some(1_764_000_000),
        duration_secs: Some(records.div_ceil(rate) + 1),
        records_per_sec: rate,
        batch_records: 10_000,
        probe_interval_secs: 1 << 30,
        ..Default::default()
    };
    let mut sim = Simulator::new(cfg, window_spec(), Arc::new(Inventory::embedded()), Scenario::default());
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let mut out = Vec::with_capacity(records as usize);
    rt.block_on(async {
        while (out.len() as u64) < records {
            let Some(batch) = sim.next_batch().await else { break };
            if batch.format == Format::Goflow2Json {
                out.extend(batch.messages.iter().take((records - out.len() as u64) as usize).map(<[u8]>::to_vec));
            }
        }
    });
    out
}

fn ip(addr: u128) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

fn raw_ip(addr: u128) -> Vec<u8> {
    match ip(addr) {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        6 => "tcp",
        17 => "udp",
        1 => "icmp",
        _ => "unknown",
    }
}

/// The same flow as pmacct's Kafka plugin prints it (timestamps since the epoch).
fn pmacct_line(r: &FlowRecord) -> String {
    let secs = |ns: i64| format!("{}.{:06}", ns / 1_000_000_000, (ns % 1_000_000_000) / 1000);
    format!(
        r#"{{"event_type":"purge","peer_ip_src":"{}","iface_in":{},"iface_out":{},"ip_src":"{}","ip_dst":"{}","port_src":{},"port_dst":{},"ip_proto":"{}","timestamp_start":"{}","timestamp_end":"{}","timestamp_arrival":"{}","packets":{},"bytes":{},"flows":1,"sampling_rate":{},"writer_id":"default_kafka/1234"}}"#,
        ip(r.exporter),
        r.in_if,
        r.out_if,
        ip(r.src_addr),
        ip(r.dst_addr),
        r.src_port,
        r.dst_port,
        proto_name(r.proto),
        secs(r.event_time_ns - 2_000_000_000),
        secs(r.event_time_ns),
        secs(r.event_time_ns + 500_000_000),
        r.packets,
        r.bytes,
        r.sampling_rate,
    )
}

fn flow_message(r: &FlowRecord) -> FlowMessage {
    let end = r.event_time_ns as u64;
    FlowMessage {
        r#type: 3,
        time_received_ns: end + 500_000_000,
        sequence_num: 1,
        sampling_rate: u64::from(r.sampling_rate),
        sampler_address: raw_ip(r.exporter),
        time_flow_start_ns: end - 2_000_000_000,
        time_flow_end_ns: end,
        bytes: r.bytes,
        packets: r.packets,
        src_addr: raw_ip(r.src_addr),
        dst_addr: raw_ip(r.dst_addr),
        in_if: r.in_if,
        out_if: r.out_if,
        proto: u32::from(r.proto),
        src_port: u32::from(r.src_port),
        dst_port: u32::from(r.dst_port),
        etype: 0x800,
    }
}

fn limits() -> DecodeLimits {
    DecodeLimits {
        max_message_bytes: 1 << 20,
        max_bytes_per_record: 1 << 40,
        min_time_ns: DecodeLimits::MIN_TIME_NS,
        max_time_ns: i64::MAX,
    }
}

fn file_name(format: BenchFormat) -> &'static str {
    match format {
        BenchFormat::Goflow2Json => "goflow2.jsonl",
        BenchFormat::PmacctJson => "pmacct.jsonl",
        BenchFormat::Goflow2Protobuf => "goflow2.pbd",
    }
}

/// The simulator's records in each format (the same flows), one record per element.
fn records_in_every_format(records: u64, rate: u64) -> Vec<(BenchFormat, Vec<Vec<u8>>)> {
    let json = simulate(records, rate);
    let (mut pmacct, mut pb) = (Vec::with_capacity(json.len()), Vec::with_capacity(json.len()));
    for line in &json {
        // The simulator's too-late and unmatched records are valid records; every one decodes.
        let mut r = goflow2_json::decode_record(line, &limits()).expect("simulator records decode");
        r.event_time_ns = r.times.end_ns;
        pmacct.push(pmacct_line(&r).into_bytes());
        pb.push(flow_message(&r).encode_length_delimited_to_vec());
    }
    vec![(BenchFormat::Goflow2Json, json), (BenchFormat::PmacctJson, pmacct), (BenchFormat::Goflow2Protobuf, pb)]
}

fn generate(records: u64, rate: u64, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    for (format, recs) in records_in_every_format(records, rate) {
        let path = out.join(file_name(format));
        let mut w = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for r in &recs {
            w.write_all(r)?;
            if format != BenchFormat::Goflow2Protobuf {
                w.write_all(b"\n")?;
            }
        }
        w.flush()?;
        eprintln!("wrote {} records to {}", recs.len(), path.display());
    }
    Ok(())
}

/// One record per element: JSON lines, or length-delimited protobuf messages (prefix kept).
fn read_records(path: &Path, format: BenchFormat) -> anyhow::Result<Vec<Vec<u8>>> {
    let data = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if format != BenchFormat::Goflow2Protobuf {
        return Ok(data.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect());
    }
    let mut out = Vec::new();
    let mut rest = &data[..];
    while !rest.is_empty() {
        let before = rest.len();
        let len = prost::encoding::decode_varint(&mut rest)? as usize;
        let prefix = before - rest.len();
        let whole = &data[data.len() - before..data.len() - before + prefix + len];
        out.push(whole.to_vec());
        rest = &rest[len..];
    }
    Ok(out)
}

/// Kafka message payloads of `per_message` records each.
fn payloads(records: &[Vec<u8>], format: BenchFormat, per_message: usize) -> Vec<Vec<u8>> {
    records
        .chunks(per_message.max(1))
        .map(|chunk| {
            let mut msg = Vec::new();
            for (i, r) in chunk.iter().enumerate() {
                if i > 0 && format != BenchFormat::Goflow2Protobuf {
                    msg.push(b'\n');
                }
                msg.extend_from_slice(r);
            }
            msg
        })
        .collect()
}

/// Micro-batches cut as the Kafka source cuts them: at `batch` messages or `max_bytes` of payload.
fn batches(records: &[Vec<u8>], format: BenchFormat, per_message: usize, batch: usize, max_bytes: usize) -> Vec<SourceBatch> {
    let mut out = Vec::new();
    let mut messages = Messages::default();
    for payload in payloads(records, format, per_message) {
        messages.push(&payload);
        if messages.len() >= batch || messages.total_bytes() >= max_bytes {
            out.push(std::mem::take(&mut messages));
        }
    }
    if !messages.is_empty() {
        out.push(messages);
    }
    out.into_iter()
        .map(|messages| SourceBatch {
            partition: 0,
            format: format.format(),
            event_time: Default::default(),
            messages,
            received: Instant::now(),
            offsets: Vec::new(),
        })
        .collect()
}

/// Hands prepared batches to the pipeline as fast as it takes them.
struct MemorySource(std::vec::IntoIter<SourceBatch>);

impl Source for MemorySource {
    async fn next_batch(&mut self) -> Option<SourceBatch> {
        self.0.next().map(|b| SourceBatch { received: Instant::now(), ..b })
    }
}

/// Runs the pipeline as `siteflow run` builds it (Prometheus sink included) over `batches` on
/// this thread; returns the seconds it took, the CPU seconds of the process meanwhile and the
/// records it counted.
fn run_pipeline(batches: Vec<SourceBatch>, top_talkers: bool, ahead: SecondCore, tables: SecondCore) -> anyhow::Result<(f64, f64, u64)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut config = Config::default();
    config.decode.ahead = ahead;
    config.window.parallel_tables = tables;
    if !top_talkers {
        config.sql.top_talkers = 0;
    }
    let res = Resources::load(&config)?;
    let metrics = Arc::new(PipelineMetrics::new(&Pipeline::FORMATS, &siteflow::table::TABLES));
    let sites = SiteMetrics::new(res.inventory.clone(), config.window.size_secs as f64);
    let pipeline = rt.block_on(Pipeline::build(&config, &res, metrics, vec![Box::new(sites)]))?;
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let (start, cpu_before) = (Instant::now(), process_cpu_seconds());
    let summary = rt.block_on(siteflow::driver::run_source(MemorySource(batches.into_iter()), pipeline, stopped))?;
    Ok((start.elapsed().as_secs_f64(), process_cpu_seconds() - cpu_before, summary.records))
}

/// The fields a per-exporter byte sum needs, borrowed from the input.
#[derive(Deserialize)]
struct BorrowedFlow<'a> {
    time_flow_end_ns: u64,
    sampler_address: &'a str,
    bytes: u64,
    packets: u64,
    sampling_rate: u64,
}

/// Parses each line into [`BorrowedFlow`] and sums bytes and packets per exporter and 10 s window.
fn serde_loop(data: &[u8]) -> (u64, HashMap<(&str, u64), (u64, u64)>) {
    let mut sums: HashMap<(&str, u64), (u64, u64)> = HashMap::new();
    let mut records = 0;
    for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        // UTF-8 checked once per line, then parsed from `&str` (serde_json's fastest path).
        let Ok(text) = std::str::from_utf8(line) else { continue };
        let Ok(f) = serde_json::from_str::<BorrowedFlow>(text) else { continue };
        records += 1;
        let rate = f.sampling_rate.max(1);
        let e = sums.entry((f.sampler_address, f.time_flow_end_ns / 10_000_000_000)).or_default();
        e.0 += f.bytes * rate;
        e.1 += f.packets * rate;
    }
    (records, sums)
}

fn produce(
    brokers: &str,
    topic: &str,
    records: &[Vec<u8>],
    format: BenchFormat,
    per_message: usize,
    times: usize,
    properties: &[String],
) -> anyhow::Result<()> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576");
    set_properties(&mut config, properties)?;
    let producer: BaseProducer = config.create()?;
    let messages = payloads(records, format, per_message);
    let start = Instant::now();
    let mut sent = 0u64;
    for _ in 0..times {
        for m in &messages {
            let mut record = BaseRecord::<(), [u8]>::to(topic).payload(m);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((e, back)) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) => {
                        producer.poll(Duration::from_millis(10));
                        record = back;
                    }
                    Err((e, _)) => anyhow::bail!("produce to {topic}: {e}"),
                }
            }
            sent += 1;
            if sent % 100_000 == 0 {
                producer.poll(Duration::ZERO);
                eprintln!("produced {sent} messages");
            }
        }
    }
    producer.flush(Duration::from_secs(600))?;
    let seconds = start.elapsed().as_secs_f64();
    report(&[
        ("bench", "\"produce\"".into()),
        ("messages", sent.to_string()),
        ("records", (records.len() * times).to_string()),
        ("seconds", format!("{seconds:.2}")),
    ]);
    Ok(())
}

/// Applies `key=value` librdkafka properties from the command line.
fn set_properties(config: &mut ClientConfig, properties: &[String]) -> anyhow::Result<()> {
    for p in properties {
        let (k, v) = p.split_once('=').ok_or_else(|| anyhow::anyhow!("--property {p}: expected KEY=VALUE"))?;
        config.set(k, v);
    }
    Ok(())
}

/// Reads every partition of `topic` from the start until `messages` messages arrived; the
/// clock starts at the first message (the group join is not part of the rate).
fn consume(brokers: &str, topic: &str, messages: u64, properties: &[String]) -> anyhow::Result<()> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("raw-consume-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    set_properties(&mut config, properties)?;
    let consumer: BaseConsumer = config.create()?;
    consumer.subscribe(&[topic])?;
    let (mut got, mut bytes, mut first) = (0u64, 0u64, None);
    let deadline = Instant::now() + Duration::from_secs(3600);
    while got < messages {
        anyhow::ensure!(Instant::now() < deadline, "only {got} of {messages} messages within an hour");
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                got += 1;
                bytes += rdkafka::Message::payload(&m).map_or(0, <[u8]>::len) as u64;
            }
            Some(Err(e)) => eprintln!("consume: {e}"),
            None => {}
        }
    }
    let seconds = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    report(&[
        ("bench", "\"raw_consume\"".into()),
        ("messages", got.to_string()),
        ("bytes", bytes.to_string()),
        ("seconds", format!("{seconds:.3}")),
        ("messages_per_sec", format!("{:.0}", got as f64 / seconds)),
    ]);
    Ok(())
}

/// What `cargo test --benches` runs: the in-process chain and the loop agree on a small input,
/// in every format and framing.
fn self_check() -> anyhow::Result<()> {
    for (format, records) in records_in_every_format(20_000, 50_000) {
        for per_message in [1, 100] {
            // Both ways: all on one thread, and decoding ahead with the tables side by side.
            let second = if per_message == 1 { SecondCore::On } else { SecondCore::Off };
            let (_, _, counted) = run_pipeline(batches(&records, format, per_message, 1000, 1 << 20), per_message == 1, second, second)?;
            anyhow::ensure!(counted == records.len() as u64, "{}: counted {counted} of {}", format.format().as_str(), records.len());
        }
        if format == BenchFormat::Goflow2Json {
            let data: Vec<u8> = records.iter().flat_map(|r| r.iter().copied().chain([b'\n'])).collect();
            let (n, sums) = serde_loop(&data);
            anyhow::ensure!(n == records.len() as u64 && !sums.is_empty(), "serde loop parsed {n} of {}", records.len());
        }
        // The pbd framing round-trips through read_records.
        if format == BenchFormat::Goflow2Protobuf {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("x.pbd");
            std::fs::write(&path, records.concat())?;
            anyhow::ensure!(read_records(&path, format)? == records, "protobuf framing does not round-trip");
        }
    }
    println!("throughput self-check: ok");
    Ok(())
}
