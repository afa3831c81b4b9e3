//! siteflow against a real Kafka-protocol broker (Tansu): exact window totals through
//! crashes, scale-out, malformed input and a broker outage.

/// The softflowd → nfacctd → broker → siteflow chain (a `kafka::` test: run one at a time).
#[path = "kafka_chain.rs"]
mod chain;
/// `check --connect` and the run-time log about the Kafka input (`kafka::` tests too).
#[path = "kafka_notices.rs"]
mod notices;
/// Sites whose producers stop: their throughput goes to zero or away (a `kafka::` test).
#[path = "kafka_stale.rs"]
mod stale;

/// Back-pressure across rebalances (the stall after a takeover).
#[path = "kafka_backpressure.rs"]
mod backpressure;
/// Meetings shared through a compacted topic.
#[path = "kafka_meetings.rs"]
mod meetings;
#[path = "kafka_ready.rs"]
mod ready;
/// The ingest stage of a scale-out.
#[path = "kafka_scale_out.rs"]
mod scale_out;

use std::time::Duration;

use crate::kafka_support::*;

const HOUR_NS: i64 = 3_600_000_000_000;
const S: i64 = 1_000_000_000;

/// Event time of the first record: two hours ago, on a window boundary.
/// How long the results logs may go without a new window before a test calls it a stall.
const STALL: Duration = Duration::from_secs(120);

fn start_ns() -> i64 {
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    (now - 2 * HOUR_NS).div_euclid(10 * S) * 10 * S
}

/// Produces `messages` messages of `per_message` goflow2 JSON flows to each of `partitions`
/// partitions; event times advance by `step_ns` per record within each partition, with a little
/// disorder (within the lateness). Returns the end of the data (exclusive, in seconds).
fn produce_flows(
    broker: &Broker,
    topic: &str,
    traffic: &mut Traffic,
    partitions: i32,
    messages: usize,
    per_message: usize,
    step_ns: i64,
) -> i64 {
    let producer = broker.producer();
    let mut end_ns = traffic.start_ns;
    for p in 0..partitions {
        let mut t = traffic.start_ns;
        for _ in 0..messages {
            let mut payload = String::with_capacity(per_message * 420);
            for _ in 0..per_message {
                t += step_ns;
                let jitter = traffic.rng().i64(0..2 * S);
                let f = traffic.flow(t - jitter);
                payload.push_str(&traffic.goflow2_json(&f));
                payload.push('\n');
            }
            send(&producer, topic, p, payload.as_bytes());
        }
        end_ns = end_ns.max(t);
    }
    flush(&producer);
    end_ns.div_euclid(10 * S) * 10 + 10
}

/// One flow per partition an hour after the data: moves every partition's watermark past the
/// data's windows so they all close. Not counted (its window never closes in the test).
fn send_sentinels(broker: &Broker, topic: &str, traffic: &mut Traffic, partitions: i32, end_s: i64) {
    let producer = broker.producer();
    for p in 0..partitions {
        let f = Flow { site: 0, inbound: true, t_ns: (end_s + 3600) * S, bytes: 1, packets: 1, sampling: 1 };
        send(&producer, topic, p, traffic.goflow2_json(&f).as_bytes());
    }
    flush(&producer);
}

fn assert_exact(checkpoints: &std::path::Path, truth: &Totals, end_s: i64, stall: Duration, logs: &[&Instance]) {
    // Ends on progress: as long as windows reach the results logs or records are read, it
    // waits (a partition behind on reading holds publication back until it catches up).
    let progress = || {
        let written = read_flow_results(checkpoints).values().map(|v| v.2).sum::<u64>();
        let read: Vec<Option<f64>> = logs.iter().map(|i| i.metric("siteflow_records_received_total", "")).collect();
        (written, read)
    };
    let done = wait_while_progressing(stall, || before(&read_flow_results(checkpoints), end_s) == *truth, progress);
    let got = before(&read_flow_results(checkpoints), end_s);
    if !done {
        for i in logs {
            eprintln!("{}", i.log_summary());
        }
    }
    assert!(done, "window totals differ from the produced records ({} s without progress): {}", stall.as_secs(), diff(truth, &got));
}

/// The test's directory (broker data, checkpoints, logs); kept with `KAFKA_TEST_KEEP=1`.
pub(crate) fn test_dir() -> tempfile::TempDir {
    let mut dir = tempfile::tempdir().unwrap();
    if std::env::var_os("KAFKA_TEST_KEEP").is_some() {
        eprintln!("keeping {}", dir.path().display());
        dir.disable_cleanup(true);
    }
    dir
}

#[test]
fn crashes_lose_nothing_and_count_nothing_twice() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    broker.create_topic("flows", 4);
    let mut traffic = Traffic::new(7, start_ns());
    // 4 partitions × 2,500 messages × 100 records = 1,000,000 records over ~1.4 h of event time.
    let messages: usize = std::env::var("KAFKA_TEST_MESSAGES").map(|v| v.parse().unwrap()).unwrap_or(2_500);
    let end_s = produce_flows(&broker, "flows", &mut traffic, 4, messages, 100, 20_000_000);
    send_sentinels(&broker, "flows", &mut traffic, 4, end_s);
    let total_records: u64 = traffic.truth.values().map(|v| v.2).sum();
    assert_eq!(total_records, 400 * messages as u64);

    let checkpoints = dir.path().join("ckpt");
    // Decoding ahead, whatever the machine's cores: batches taken ahead when it is killed, and
    // batches decoded before part of them turned out counted already, must count once.
    let mut a = Instance::start_with_env(
        dir.path(),
        "a",
        &broker,
        &[("flows", "goflow2_json")],
        &checkpoints,
        "",
        &[("SITEFLOW_DECODE__AHEAD", "on")],
    );
    let mut rng = fastrand::Rng::with_seed(11);
    let mut kills = 0;
    while kills < 5 {
        // Kill at a random moment while it consumes: once it owns partitions again (the killed
        // member's session has to expire first), after a random 0.5-4 s of work.
        let owned = wait_until(Duration::from_secs(60), || assignments(&a).len() > kills && a.is_running());
        assert!(owned, "no partitions after restart {kills}:\n{}", a.log_summary());
        std::thread::sleep(Duration::from_millis(rng.u64(500..4000)));
        let got: u64 = read_flow_results(&checkpoints).values().map(|v| v.2).sum();
        assert!(got < total_records, "finished before the 5th kill ({kills} so far): make the input bigger");
        assert!(a.is_running(), "siteflow exited by itself:\n{}", a.log_summary());
        a.kill();
        kills += 1;
        eprintln!("kill {kills}: {got} records in the results logs");
        a.restart();
    }
    assert_exact(&checkpoints, &traffic.truth, end_s, STALL, &[&a]);
}

/// Three routers export to two partitions; the clock of one of them runs 5 minutes behind,
/// and every export holds flows that ended up to 60 s apart (a collector publishing its cache
/// in hash order). Nothing is late: each record is judged by its own exporter's clock. The
/// lagging router does not hold the others' windows back: they are published on time and
/// corrected when its records arrive. At the end the results logs, SQL `site_windows` and the
/// `/metrics` counters all equal the produced records, window by window.
#[test]
fn skewed_exporters_and_disordered_exports_reach_every_output_exactly() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    broker.create_topic("flows", 2);
    let start = start_ns();
    let mut traffic = Traffic::new(21, start);
    let producer = broker.producer();
    // (partition, exporter, clock offset): two routers share partition 0.
    let exporters = [(0, "192.0.2.11", 0), (0, "192.0.2.12", -300 * S), (1, "192.0.2.13", 0)];
    // One export per router every 2 s for 10 minutes, after the lagging clock's start.
    let produce_steps = |steps: std::ops::Range<i64>, traffic: &mut Traffic| {
        for step in steps {
            let now = start + 400 * S + step * 2 * S;
            for (partition, exporter, offset) in exporters {
                let mut payload = String::new();
                for _ in 0..20 {
                    let t = now + offset - traffic.rng().i64(0..60 * S);
                    let f = traffic.flow(t);
                    payload.push_str(&traffic.goflow2_json_from(&f, exporter));
                    payload.push('\n');
                }
                send(&producer, "flows", partition, payload.as_bytes());
            }
        }
        flush(&producer);
    };
    // The first five minutes, then the instance, which publishes the on-time routers' windows
    // before the lagging router's records for them exist: those become corrections, whatever
    // batches the consumer happens to read (a backlog read in one batch would hide them).
    produce_steps(0..150, &mut traffic);
    let checkpoints = dir.path().join("ckpt");
    // The lagging router falls silent at the end: after 5 s it stops holding its windows open.
    let a = Instance::start_with_env(
        dir.path(),
        "a",
        &broker,
        &[("flows", "goflow2_json")],
        &checkpoints,
        "",
        &[("SITEFLOW_WINDOW__ALLOWED_LATENESS_MS", "120000"), ("SITEFLOW_WINDOW__IDLE_PARTITION_TIMEOUT_SECS", "5")],
    );
    // The lagging router's second half (event time start+340 s..start+700 s) lands on these.
    let published = (start / S + 500) as f64;
    let closed = || a.metric("siteflow_last_closed_window_end_timestamp_seconds", "table=\"flows\"").unwrap_or(0.0);
    let first_half_published = wait_while_progressing(
        STALL,
        || closed() >= published,
        || (a.metric("siteflow_records_decoded_total", "format=\"goflow2_json\""), closed() as i64),
    );
    assert!(first_half_published, "the first half's windows up to {published} were not published:\n{}", a.log_summary());
    produce_steps(150..300, &mut traffic);
    let last_ns = start + 400 * S + 299 * 2 * S;
    // The on-time routers move an hour on (one flow each): every data window gets published.
    let end_s = last_ns.div_euclid(10 * S) * 10 + 10;
    for (partition, exporter, _) in [exporters[0], exporters[2]] {
        let f = Flow { site: 0, inbound: true, t_ns: (end_s + 3600) * S, bytes: 1, packets: 1, sampling: 1 };
        send(&producer, "flows", partition, traffic.goflow2_json_from(&f, exporter).as_bytes());
    }
    flush(&producer);
    assert_exact(&checkpoints, &traffic.truth, end_s, STALL, &[&a]);

    // /metrics: nothing late, windows corrected, and the counters per site and direction equal
    // the produced bytes (the window of the two one-byte flows that moved the clocks on never
    // closes).
    assert_eq!(a.metric("siteflow_records_late_total", "table=\"flows\""), Some(0.0), "{}", a.log_summary());
    assert!(a.metric("siteflow_windows_corrected_total", "table=\"flows\"").unwrap() > 0.0, "{}", a.log_summary());
    let mut per_site: std::collections::BTreeMap<(String, String), u64> = Default::default();
    for ((site, direction, _), v) in &traffic.truth {
        *per_site.entry((site.clone(), direction.clone())).or_default() += v.0;
    }
    let body = crate::support::http_get(a.http, "/metrics").unwrap().1;
    for ((site, direction), bytes) in &per_site {
        let labels = format!("site=\"{site}\"");
        let line = body
            .lines()
            .find(|l| {
                l.starts_with("siteflow_site_bytes_total{") && l.contains(&labels) && l.contains(&format!("direction=\"{direction}\""))
            })
            .unwrap_or_else(|| panic!("no bytes counter for {site} {direction}"));
        assert_eq!(line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64, *bytes, "{line}");
    }

    // SQL: one row per site, direction and window, with the corrected totals.
    let sql = sql_window_totals(&a, end_s).expect("SQL answers");
    assert_eq!(sql, traffic.truth, "SQL differs: {}", diff(&traffic.truth, &sql));
}

/// The `partitions assigned` lists an instance logged, in order.
fn assignments(i: &Instance) -> Vec<String> {
    i.log_text().lines().filter(|l| l.contains("partitions assigned") && l.contains("flows/")).map(|l| l.to_string()).collect()
}

#[test]
fn two_instances_split_the_partitions_and_one_takes_over_from_checkpoints() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    broker.create_topic("flows", 4);
    let checkpoints = dir.path().join("ckpt");
    // One decodes ahead on a second thread, the other in line: both count exactly.
    let (flows, dir_path) = (&[("flows", "goflow2_json")], dir.path());
    let mut a = Instance::start_with_env(dir_path, "a", &broker, flows, &checkpoints, "", &[("SITEFLOW_DECODE__AHEAD", "on")]);
    let b = Instance::start_with_env(dir_path, "b", &broker, flows, &checkpoints, "", &[("SITEFLOW_DECODE__AHEAD", "off")]);

    // Both members get some of the partitions.
    let split = wait_until(Duration::from_secs(60), || {
        let (la, lb) = (assignments(&a), assignments(&b));
        let owns = |l: &Vec<String>| l.last().map(|s| s.matches("flows/").count()).unwrap_or(0);
        owns(&la) > 0 && owns(&lb) > 0 && owns(&la) + owns(&lb) == 4
    });
    assert!(split, "the two instances did not split the 4 partitions:\na: {:?}\nb: {:?}", assignments(&a), assignments(&b));

    // A stream of records while both run; then one instance dies and the other takes over.
    let mut traffic = Traffic::new(21, start_ns());
    let end_first = produce_flows(&broker, "flows", &mut traffic, 4, 300, 100, 20_000_000);
    assert!(wait_until(Duration::from_secs(120), || read_flow_results(&checkpoints).values().map(|v| v.2).sum::<u64>() > 10_000));
    // One instance goes away mid-stream (as in a scale-in or a rolling update: SIGTERM, so it
    // checkpoints and leaves the group); the other takes its partitions over from those
    // checkpoints. (Abrupt deaths are the crash test's subject. With a SIGKILL here, Tansu 0.6.0's
    // coordinator evicts the dead member but hands the survivor only its old partitions, which
    // Apache Kafka does not do; checked by hand.)
    a.terminate();
    let mut later = Traffic::new(22, end_first * S);
    let end_s = produce_flows(&broker, "flows", &mut later, 4, 200, 100, 20_000_000);
    traffic.absorb(later);
    send_sentinels(&broker, "flows", &mut traffic, 4, end_s);
    let took_over = wait_until(Duration::from_secs(120), || assignments(&b).last().is_some_and(|l| l.matches("flows/").count() == 4));
    assert!(took_over, "b did not take over a's partitions: {:?}", assignments(&b));
    // The restores are logged just after the assignment, once the pipeline has read them.
    let resumed = wait_until(Duration::from_secs(30), || {
        b.log_text().lines().filter(|l| l.contains("restored from its checkpoint") && !l.contains("next_offset=0")).count() >= 2
    });
    assert!(resumed, "b resumed no partition from a checkpoint:\n{}", b.log_summary());
    assert_exact(&checkpoints, &traffic.truth, end_s, STALL, &[&a, &b]);
}

#[test]
fn malformed_records_are_counted_dead_lettered_and_skipped() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    broker.create_topic("flows", 2);
    broker.create_topic("flows.dead", 1);
    let producer = broker.producer();
    let mut traffic = Traffic::new(5, start_ns());
    let kinds = ["not_json", "wrong_schema", "bad_timestamp", "bad_address", "negative_counter", "absurd_counter", "oversize"];
    let mut bad: Vec<(String, String)> = Vec::new(); // (payload, reason)
    let mut t = traffic.start_ns;
    for i in 0..20_000 {
        t += 5_000_000;
        let p = (i % 2) as i32;
        if i % 100 == 50 {
            // 1 %: a bad record of each kind in turn, alone or inside a batch of good ones.
            let kind = kinds[(i / 100) % kinds.len()];
            let good = traffic.flow(t);
            let good_json = traffic.goflow2_json(&good);
            let record = match kind {
                "not_json" => "{\"type\":\"NETFLOW_V9\",\"bytes\":".to_string(),
                "wrong_schema" => "{\"type\":\"NETFLOW_V9\",\"bytes\":\"many\"}".to_string(),
                "bad_timestamp" => good_json.replace(&format!("\"time_flow_end_ns\":{}", good.t_ns), "\"time_flow_end_ns\":12345"),
                "bad_address" => good_json.replace("\"203.0.113.", "\"203.0.313."),
                "negative_counter" => good_json.replace(&format!("\"bytes\":{}", good.bytes), "\"bytes\":-5"),
                "absurd_counter" => good_json.replace(&format!("\"bytes\":{}", good.bytes), "\"bytes\":900000000000000000"),
                _ => format!("{}\n", good_json).repeat(400), // a message above decode.max_message_bytes
            };
            // The good record was counted by flow(); its copy here is not sent as good.
            traffic.uncount(&good);
            if kind == "bad_timestamp" {
                // A record in 1970 also carries the receive time: zero it so the record has no usable time.
                let record = record.replace(&format!("\"time_received_ns\":{}", good.t_ns + 5_000_000), "\"time_received_ns\":0");
                bad.push((record.clone(), kind.into()));
                send(&producer, "flows", p, record.as_bytes());
            } else if kind != "oversize" && i % 200 == 50 {
                // Inside a newline batch with two good records.
                let (g1, g2) = (traffic.flow(t), traffic.flow(t));
                let batch = format!("{}\n{}\n{}\n", traffic.goflow2_json(&g1), record, traffic.goflow2_json(&g2));
                bad.push((record, kind.into()));
                send(&producer, "flows", p, batch.as_bytes());
            } else {
                bad.push((record.clone(), kind.into()));
                send(&producer, "flows", p, record.as_bytes());
            }
            continue;
        }
        let f = traffic.flow(t);
        send(&producer, "flows", p, traffic.goflow2_json(&f).as_bytes());
    }
    flush(&producer);
    let end_s = (t / S).div_euclid(10) * 10 + 10;
    send_sentinels(&broker, "flows", &mut traffic, 2, end_s);

    let checkpoints = dir.path().join("ckpt");
    let a = Instance::start_with_env(
        dir.path(),
        "a",
        &broker,
        &[("flows", "goflow2_json")],
        &checkpoints,
        "decode: { max_message_bytes: 65536, max_future_secs: 86400 }\n",
        &[("SITEFLOW_KAFKA__DEAD_LETTER_TOPIC", "flows.dead")],
    );
    assert_exact(&checkpoints, &traffic.truth, end_s, STALL, &[&a]);
    for kind in kinds {
        let expected = bad.iter().filter(|(_, r)| r == kind).count() as f64;
        let got = a.metric("siteflow_records_rejected_total", &format!("reason=\"{kind}\"")).unwrap_or(-1.0);
        assert_eq!(got, expected, "siteflow_records_rejected_total{{reason=\"{kind}\"}}");
    }
    let dead = broker.read_all("flows.dead", bad.len(), Duration::from_secs(60));
    let mut got: Vec<(String, String)> = dead
        .iter()
        .map(|(payload, h)| (String::from_utf8_lossy(payload).to_string(), h.get("siteflow-reason").cloned().unwrap_or_default()))
        .collect();
    let mut expected = bad.clone();
    got.sort();
    expected.sort();
    assert_eq!(got.len(), expected.len(), "dead-letter topic holds {} records, {} were bad", got.len(), expected.len());
    assert!(got == expected, "dead-letter records differ from the bad records produced");
    assert!(
        dead.iter()
            .all(|(_, h)| h.get("siteflow-source-topic").map(String::as_str) == Some("flows") && h.contains_key("siteflow-source-offset"))
    );
}

#[test]
fn a_broker_outage_is_survived_with_exact_totals() {
    let dir = test_dir();
    let mut broker = Broker::start(dir.path());
    broker.create_topic("flows", 2);
    let checkpoints = dir.path().join("ckpt");
    let mut traffic = Traffic::new(9, start_ns());
    let mid = produce_flows(&broker, "flows", &mut traffic, 2, 300, 100, 20_000_000);
    let a = Instance::start(dir.path(), "a", &broker, &[("flows", "goflow2_json")], &checkpoints, "");
    assert!(wait_until(Duration::from_secs(120), || read_flow_results(&checkpoints).values().map(|v| v.2).sum::<u64>() > 1_000));
    broker.stop();
    std::thread::sleep(Duration::from_secs(30));
    broker.restart();
    let mut later = Traffic::new(10, mid * S);
    let end_s = produce_flows(&broker, "flows", &mut later, 2, 200, 100, 20_000_000);
    traffic.absorb(later);
    send_sentinels(&broker, "flows", &mut traffic, 2, end_s);
    assert_exact(&checkpoints, &traffic.truth, end_s, STALL, &[&a]);
}

/// Per (site, window start in seconds): probe results.
type ProbeCounts = std::collections::BTreeMap<(String, i64), u64>;

/// Calls `f` with each row of table `table`'s results logs whose window starts before `end_s`,
/// and that window start in seconds.
fn for_each_result_row(checkpoint_dir: &std::path::Path, table: &str, end_s: i64, mut f: impl FnMut(&serde_json::Value, i64)) {
    for entry in std::fs::read_dir(checkpoint_dir.join("results").join(table)).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(entry.path()).into_iter().flatten().flatten() {
            for line in std::fs::read_to_string(file.path()).unwrap_or_default().lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
                let ws = v["window_start"].as_str().unwrap();
                let t = chrono::NaiveDateTime::parse_from_str(ws, "%Y-%m-%dT%H:%M:%S%.f").unwrap().and_utc().timestamp();
                if t < end_s {
                    f(&v, t);
                }
            }
        }
    }
}

fn read_probe_results(checkpoint_dir: &std::path::Path, end_s: i64) -> ProbeCounts {
    let mut counts = ProbeCounts::new();
    for_each_result_row(checkpoint_dir, "probes", end_s, |v, t| {
        *counts.entry((v["site"].as_str().unwrap().to_string(), t)).or_default() += v["results"].as_u64().unwrap();
    });
    counts
}

/// Per (site, interface, direction, window start in seconds): interface bytes.
type InterfaceBytes = std::collections::BTreeMap<(String, String, String, i64), u64>;

fn read_interface_results(checkpoint_dir: &std::path::Path, end_s: i64) -> InterfaceBytes {
    let mut bytes = InterfaceBytes::new();
    for_each_result_row(checkpoint_dir, "interfaces", end_s, |v, t| {
        let key = (v["site"].as_str().unwrap().into(), v["interface"].as_str().unwrap().into(), v["direction"].as_str().unwrap().into(), t);
        *bytes.entry(key).or_default() += v["bytes"].as_u64().unwrap();
    });
    bytes
}

/// An interface whose octet counters the test reports like Telegraf, knowing the true traffic.
struct Interface {
    site: String,
    name: String,
    /// The counters as the device would report them.
    counters: [u64; 2],
    bits: u32,
    /// Which of (in, out) the device reports.
    reported: [bool; 2],
    samples: u64,
}

impl Interface {
    /// Moves `traffic` bytes (in, out) through the interface (wrapping at its width, or restarting
    /// from zero if `reboot`), records the truth, and returns the counters to report.
    fn advance(&mut self, traffic: [u64; 2], reboot: bool, t_ns: i64, truth: &mut InterfaceBytes) -> [u64; 2] {
        for (d, (counter, bytes)) in self.counters.iter_mut().zip(traffic).enumerate() {
            let modulus = 1u128 << self.bits;
            *counter = if reboot { bytes } else { ((u128::from(*counter) + u128::from(bytes)) % modulus) as u64 };
            // The first sample is only a baseline: no traffic is known before it.
            if self.samples > 0 && self.reported[d] {
                let key = (self.site.clone(), self.name.clone(), ["in", "out"][d].to_string(), t_ns.div_euclid(10 * S) * 10);
                *truth.entry(key).or_default() += bytes;
            }
        }
        self.samples += 1;
        self.counters
    }
}

fn ipv4(a: &str) -> Vec<u8> {
    a.parse::<std::net::Ipv4Addr>().unwrap().octets().to_vec()
}

#[test]
fn every_format_read_from_the_broker_gives_the_right_windows() {
    use prost::Message;
    use siteflow::decode::goflow2_pb::FlowMessage;

    let dir = test_dir();
    let broker = Broker::start(dir.path());
    let topics = [
        ("g2.json", "goflow2_json"),
        ("g2.pb", "goflow2_protobuf"),
        ("g2.pb.plain", "goflow2_protobuf_plain"),
        ("pmacct", "pmacct_json"),
        ("probes", "siteflow_probe_json"),
        ("telegraf", "telegraf_json"),
    ];
    for (t, _) in topics {
        broker.create_topic(t, 1);
    }
    let producer = broker.producer();
    let mut traffic = Traffic::new(3, start_ns());
    let mut probes = ProbeCounts::new();
    let n = 6_000;
    let mut t = traffic.start_ns;
    let mut pb_batch = Vec::new();
    let mut pmacct_batch = String::new();
    let mut telegraf_batch = Vec::new();
    // Interface counters, in Telegraf's batches beside the pings: a 64-bit `net` counter that
    // restarts from zero halfway (a reboot), and a 32-bit SNMP counter that wraps several times.
    let mut interface_bytes = InterfaceBytes::new();
    let gateway = format!("{}.{}.{}.1", traffic.sites[1].net[0], traffic.sites[1].net[1], traffic.sites[1].net[2]);
    let mut eth1 = Interface {
        site: traffic.sites[0].id.clone(),
        name: "eth1".into(),
        counters: [5_000_000_000, 7],
        bits: 64,
        reported: [true, true],
        samples: 0,
    };
    let mut wan = Interface {
        site: traffic.sites[1].id.clone(),
        name: "3".into(),
        counters: [u64::from(u32::MAX) - 3_000_000, 0],
        bits: 32,
        reported: [true, false],
        samples: 0,
    };
    for i in 0..n {
        t += 50 * 1_000_000; // 50 ms, on whole milliseconds (pmacct prints microseconds)
        let f = traffic.flow(t);
        let (site_net, inbound) = (traffic.sites[f.site].net, f.inbound);
        let inside = format!("{}.{}.{}.{}", site_net[0], site_net[1], site_net[2], 10 + i % 200);
        let outside = format!("203.0.113.{}", 1 + i % 250);
        let (src, dst) = if inbound { (outside, inside) } else { (inside, outside) };
        match i % 4 {
            0 => send(&producer, "g2.json", 0, traffic.goflow2_json(&f).as_bytes()),
            1 | 2 => {
                let m = FlowMessage {
                    r#type: 3,
                    time_received_ns: (f.t_ns + 5_000_000) as u64,
                    sampling_rate: f.sampling,
                    sampler_address: ipv4("192.0.2.1"),
                    time_flow_start_ns: (f.t_ns - S) as u64,
                    time_flow_end_ns: f.t_ns as u64,
                    bytes: f.bytes,
                    packets: f.packets,
                    src_addr: ipv4(&src),
                    dst_addr: ipv4(&dst),
                    proto: 17,
                    src_port: 10000,
                    dst_port: 3478,
                    etype: 0x800,
                    ..Default::default()
                };
                if i % 4 == 1 {
                    // goflow2's default: several length-delimited messages per Kafka message.
                    m.encode_length_delimited(&mut pb_batch).unwrap();
                    if i % 40 == 1 {
                        send(&producer, "g2.pb", 0, &pb_batch);
                        pb_batch.clear();
                    }
                } else {
                    send(&producer, "g2.pb.plain", 0, &m.encode_to_vec());
                }
            }
            _ => {
                // pmacct with kafka_multi_values: newline-separated records in one message.
                let secs = |ns: i64| format!("{}.{:06}", ns.div_euclid(S), ns.rem_euclid(S) / 1000);
                pmacct_batch.push_str(&format!(
                    r#"{{"event_type":"purge","peer_ip_src":"192.0.2.1","ip_src":"{src}","ip_dst":"{dst}","port_src":443,"port_dst":51000,"ip_proto":"tcp","timestamp_start":"{}","timestamp_end":"{}","packets":{},"bytes":{},"flows":1,"sampling_rate":{}}}"#,
                    secs(f.t_ns - S),
                    secs(f.t_ns),
                    f.packets,
                    f.bytes,
                    f.sampling
                ));
                pmacct_batch.push('\n');
                if i % 20 == 3 {
                    send(&producer, "pmacct", 0, pmacct_batch.as_bytes());
                    pmacct_batch.clear();
                }
            }
        }
        if i % 20 == 5 {
            let load = 100_000 + (i as u64 * 7_919) % 900_000;
            let [rx, tx] = eth1.advance([load, load / 3], i == n / 2 + 5, t, &mut interface_bytes);
            telegraf_batch.push(format!(
                r#"{{"fields":{{"bytes_recv":{rx},"bytes_sent":{tx},"packets_recv":1}},"name":"net","tags":{{"host":"gw-a","interface":"eth1","site":"{}"}},"timestamp":{}}}"#,
                eth1.site,
                t / 1_000_000
            ));
            let [octets_in, _] = wan.advance([load * 100, 0], false, t, &mut interface_bytes);
            telegraf_batch.push(format!(
                r#"{{"fields":{{"ifInOctets":{octets_in}}},"name":"ifTable","tags":{{"agent_host":"{gateway}","ifIndex":"3"}},"timestamp":{}}}"#,
                t / 1_000_000
            ));
        }
        if i % 10 == 0 {
            // A probe result of a site, alternately in siteflow's JSON and in Telegraf's batch form.
            let site = traffic.sites[(i / 10) % traffic.sites.len()].id.clone();
            *probes.entry((site.clone(), t.div_euclid(10 * S) * 10)).or_default() += 1;
            if (i / 10) % 2 == 0 {
                let rec = format!(
                    r#"{{"site":"{site}","time_ms":{},"target":"mcu.hagiang","rtt_ms":35.5,"jitter_ms":2.5,"loss_pct":0.5,"sent":10}}"#,
                    t / 1_000_000
                );
                send(&producer, "probes", 0, rec.as_bytes());
            } else {
                telegraf_batch.push(format!(
                    r#"{{"fields":{{"average_response_ms":35.2,"packets_received":10,"packets_transmitted":10,"percent_packet_loss":0,"result_code":0,"standard_deviation_ms":2.5}},"name":"ping","tags":{{"host":"probe-1","site":"{site}","url":"10.100.1.1"}},"timestamp":{}}}"#,
                    t / 1_000_000
                ));
                // Batches spanning ~10 s of pings and counters: longer than the allowed lateness,
                // so neither kind may make the other late.
                if telegraf_batch.len() >= 40 {
                    send(&producer, "telegraf", 0, format!(r#"{{"metrics":[{}]}}"#, telegraf_batch.join(",")).as_bytes());
                    telegraf_batch.clear();
                }
            }
        }
    }
    send(&producer, "g2.pb", 0, &pb_batch);
    send(&producer, "pmacct", 0, pmacct_batch.as_bytes());
    if !telegraf_batch.is_empty() {
        send(&producer, "telegraf", 0, format!(r#"{{"metrics":[{}]}}"#, telegraf_batch.join(",")).as_bytes());
    }
    flush(&producer);
    let end_s = (t / S).div_euclid(10) * 10 + 10;
    // Sentinels an hour later on every topic, so every data window closes.
    let late = (end_s + 3600) * S;
    let sentinel = Flow { site: 0, inbound: true, t_ns: late, bytes: 1, packets: 1, sampling: 1 };
    send(&producer, "g2.json", 0, traffic.goflow2_json(&sentinel).as_bytes());
    let mut m = FlowMessage { time_flow_end_ns: late as u64, bytes: 1, packets: 1, ..Default::default() };
    m.sampler_address = ipv4("192.0.2.1");
    m.src_addr = ipv4("203.0.113.1");
    m.dst_addr = ipv4(&format!("{}.{}.{}.9", traffic.sites[0].net[0], traffic.sites[0].net[1], traffic.sites[0].net[2]));
    send(&producer, "g2.pb", 0, &m.encode_length_delimited_to_vec());
    send(&producer, "g2.pb.plain", 0, &m.encode_to_vec());
    let site0 = traffic.sites[0].id.clone();
    let dst0 = format!("{}.{}.{}.9", traffic.sites[0].net[0], traffic.sites[0].net[1], traffic.sites[0].net[2]);
    send(
        &producer,
        "pmacct",
        0,
        format!(
            r#"{{"peer_ip_src":"192.0.2.1","ip_src":"203.0.113.1","ip_dst":"{dst0}","timestamp_end":{},"packets":1,"bytes":1}}"#,
            late / S
        )
        .as_bytes(),
    );
    send(&producer, "probes", 0, format!(r#"{{"site":"{site0}","time_ms":{},"rtt_ms":1.0}}"#, late / 1_000_000).as_bytes());
    send(&producer, "telegraf", 0, format!(r#"{{"fields":{{"average_response_ms":1.0,"percent_packet_loss":0}},"name":"ping","tags":{{"site":"{site0}"}},"timestamp":{}}}"#, late / S).as_bytes());
    flush(&producer);

    assert_eq!((traffic.truth.values().map(|v| v.2).sum::<u64>(), probes.values().sum::<u64>()), (n as u64, n as u64 / 10));
    let checkpoints = dir.path().join("ckpt");
    let a = Instance::start(dir.path(), "a", &broker, &topics, &checkpoints, "");
    assert_exact(&checkpoints, &traffic.truth, end_s, STALL, &[&a]);
    let ok = wait_until(Duration::from_secs(60), || read_probe_results(&checkpoints, end_s) == probes);
    assert!(
        ok,
        "probe results per site and window differ: expected {} results, got {}",
        probes.values().sum::<u64>(),
        read_probe_results(&checkpoints, end_s).values().sum::<u64>()
    );
    // Interface bytes per site, interface, direction and window: the counter deltas, across
    // the wraps and the reset, equal the traffic the test moved through the interfaces.
    interface_bytes.retain(|k, _| k.3 < end_s);
    let ok = wait_until(Duration::from_secs(60), || read_interface_results(&checkpoints, end_s) == interface_bytes);
    let got = read_interface_results(&checkpoints, end_s);
    let differing: Vec<_> = interface_bytes
        .keys()
        .chain(got.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| interface_bytes.get(*k) != got.get(*k))
        .map(|k| (k, interface_bytes.get(k), got.get(k)))
        .collect();
    assert!(ok, "interface bytes differ (key, expected, got): {differing:?}\n{}", a.log_summary());
    assert!(a.metric("siteflow_interface_counter_samples_total", "outcome=\"wrap\"").unwrap_or(0.0) >= 3.0, "{}", a.log_summary());
    assert_eq!(a.metric("siteflow_interface_counter_samples_total", "outcome=\"reset\"").unwrap_or(0.0), 2.0, "{}", a.log_summary());
    assert_eq!(a.metric("siteflow_records_rejected_total", "reason=").unwrap_or(0.0), 0.0, "{}", a.log_summary());
}
