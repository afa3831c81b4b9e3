//! The ingest stage of a scale-out (docs/scale-out.md) against the real broker: it hands every
//! span of partial aggregates to the internal topic through the outbox of its checkpoints, so
//! that after SIGKILLs the partials, merged with the site stage's ledger, give exactly the
//! produced records' per-site window totals.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, UInt64Type};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use siteflow::checkpoint::PartitionKey;
use siteflow::config::Config;
use siteflow::pipeline::{Resources, plan_windows};
use siteflow::shuffle::{Admission, Ledger, Partial};

use super::{S, STALL, produce_flows, send_sentinels, start_ns, test_dir};
use crate::kafka_support::*;

const INTERNAL_PARTITIONS: i32 = 3;

/// Every message of each partition of `topic`, in order.
fn read_partitions(broker: &Broker, topic: &str) -> Vec<Vec<Vec<u8>>> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", broker.brokers()).set("group.id", "scale-out-test").create().unwrap();
    let mut out = Vec::new();
    for p in 0..INTERNAL_PARTITIONS {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        let mut messages = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while (messages.len() as i64) < high && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                messages.push(m.payload().unwrap_or_default().to_vec());
            }
        }
        out.push(messages);
    }
    out
}

/// What a site stage owning every internal partition publishes: each partition's partials
/// admitted by its own ledger, merged, and every window flushed. Returns the flows totals and
/// how many partials were duplicates.
fn merge(config: &Config, partitions: &[Vec<Vec<u8>>]) -> (Totals, usize) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let res = Resources::load(config).unwrap();
    let mut windows = rt.block_on(plan_windows(config.window_spec(), &res)).unwrap();
    let schemas: Vec<_> = (0..windows.table_count()).map(|t| windows.state_schema(t)).collect();
    let mut ids: BTreeMap<(usize, PartitionKey), u32> = BTreeMap::new();
    let mut duplicates = 0;
    let now = Instant::now();
    for (q, messages) in partitions.iter().enumerate() {
        let mut ledger = Ledger::default();
        for bytes in messages {
            let partial = Partial::decode(bytes, &schemas).unwrap();
            match ledger.admit(&partial) {
                Admission::Merge => {
                    let next = ids.len() as u32;
                    let id = *ids.entry((q, partial.source.clone())).or_insert(next);
                    rt.block_on(windows.merge_partition_states(id, &partial.clocks, partial.states, now)).unwrap();
                }
                Admission::Duplicate => duplicates += 1,
                Admission::Overlap | Admission::MergeAfterLoss => panic!(
                    "partition {q}: a partial overlaps a merged span or follows a span with parts missing: {:?} {}..{}",
                    partial.source, partial.from_offset, partial.to_offset
                ),
            }
        }
    }
    let closed = rt.block_on(windows.flush(now)).unwrap();
    let mut totals = Totals::new();
    for w in closed.windows.iter().filter(|w| &*w.table == "flows") {
        add(&mut totals, w.start_ns / S, &w.rows);
    }
    (totals, duplicates)
}

fn add(totals: &mut Totals, window_s: i64, rows: &RecordBatch) {
    let text = |name: &str| cast(rows.column_by_name(name).unwrap(), &DataType::Utf8).unwrap();
    let number = |name: &str| cast(rows.column_by_name(name).unwrap(), &DataType::UInt64).unwrap();
    let (site, direction) = (text("site"), text("direction"));
    let (bytes, packets, records) = (number("bytes"), number("packets"), number("records"));
    let (site, direction) = (site.as_string::<i32>(), direction.as_string::<i32>());
    let [bytes, packets, records] = [&bytes, &packets, &records].map(|c| c.as_primitive::<UInt64Type>().clone());
    for i in 0..rows.num_rows() {
        let e = totals.entry((site.value(i).to_string(), direction.value(i).to_string(), window_s)).or_default();
        e.0 += bytes.value(i);
        e.1 += packets.value(i);
        e.2 += records.value(i);
        assert!(!site.is_null(i));
    }
}

#[test]
fn the_ingest_stage_hands_every_span_on_exactly_once_through_sigkills() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    broker.create_topic("flows", 4);
    broker.create_topic("siteflow.partials", INTERNAL_PARTITIONS as u32);
    let mut traffic = Traffic::new(41, start_ns());
    let end_s = produce_flows(&broker, "flows", &mut traffic, 4, 1_000, 100, 20_000_000);
    send_sentinels(&broker, "flows", &mut traffic, 4, end_s);
    let total: u64 = traffic.truth.values().map(|v| v.2).sum();

    let checkpoints = dir.path().join("ckpt");
    let env = [("SITEFLOW_SCALE_OUT__STAGE", "ingest")];
    let mut a = Instance::start_with_env(dir.path(), "a", &broker, &[("flows", "goflow2_json")], &checkpoints, "", &env);
    let config = Config::load(Some(&a.config)).unwrap();
    let received = |i: &Instance| i.metric("siteflow_records_received_total", "").unwrap_or(0.0) as u64;
    // Two SIGKILLs while it reads: what was produced since its last checkpoint is read again.
    let mut rng = fastrand::Rng::with_seed(5);
    for kill in 1..=2 {
        let reading = wait_until(Duration::from_secs(120), || received(&a) > 0);
        assert!(reading, "the ingest stage reads nothing:\n{}", a.log_summary());
        std::thread::sleep(Duration::from_millis(rng.u64(1_500..4_000)));
        assert!(received(&a) < total, "finished before kill {kill}: make the input bigger");
        a.kill();
        a.restart();
    }
    // The partials, merged, give the produced totals; waits as long as partials keep coming.
    let mut merged = (Totals::new(), 0);
    let progress = || read_partitions(&broker, "siteflow.partials").iter().map(Vec::len).sum::<usize>();
    let done = wait_while_progressing(
        STALL,
        || {
            merged = merge(&config, &read_partitions(&broker, "siteflow.partials"));
            before(&merged.0, end_s) == traffic.truth
        },
        progress,
    );
    assert!(
        done,
        "the merged partials differ from the produced records: {}\n{}",
        diff(&traffic.truth, &before(&merged.0, end_s)),
        a.log_summary()
    );
    // The ingest stage publishes nothing itself: no results logs, no window closed.
    assert!(read_flow_results(&checkpoints).is_empty(), "the ingest stage wrote results logs");
    assert_eq!(a.metric("siteflow_windows_closed_total", "").unwrap_or(0.0), 0.0, "the ingest stage closed windows");
    eprintln!("{} duplicate partials dropped by the ledger", merged.1);
}

/// The district-congestion scenario (6 minutes of event time ending about two hours ago) as
/// messages for `flows` (4 partitions), `probes` (2 partitions) and `interfaces` (the uplinks'
/// SNMP samples, 2 partitions), up to 100 records per message, spread round-robin, in event-time order; then one far-future flow and probe per
/// partition, which closes every window of the data. Also returns the simulator's ground truth
/// (per site, direction and window) and the end of the data (seconds).
fn scenario_messages() -> (Totals, i64, Vec<Produced>) {
    use siteflow::inventory::Inventory;
    use siteflow::source::simulator::{Scenario, Simulator};
    let inventory = std::sync::Arc::new(Inventory::embedded());
    let scenario =
        Scenario::load(&crate::support::repo().join("pipelines/hagiang/scenarios/district-congestion.yaml"), &inventory).unwrap();
    let start_s = start_ns() / S;
    let mut config = crate::support::fast_config(360, 600);
    config.simulator.start_unix_secs = Some(start_s as u64);
    config.simulator.too_late_ratio = 0.0;
    config.window.size_secs = 10;
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let mut out: Vec<Produced> = Vec::new();
    let mut produce = |sim: &mut Simulator, sent: &mut [usize; 3]| {
        while let Some(batch) = rt.block_on(sim.next()) {
            let (topic, partitions, slot) = topic_of(batch.format);
            let lines: Vec<&[u8]> = batch.messages.iter().collect();
            for chunk in lines.chunks(100) {
                out.push((topic, (sent[slot] % partitions) as i32, chunk.join(&b'\n')));
                sent[slot] += 1;
            }
        }
    };
    let mut sim = Simulator::new(config.simulator.clone(), config.window_spec(), inventory.clone(), scenario);
    let truth = sim.track_truth();
    let mut sent = [0usize; 3];
    produce(&mut sim, &mut sent);
    // One message per partition an hour later: every window of the data closes.
    let end_s = start_s + 360;
    let mut later = config.simulator.clone();
    (later.start_unix_secs, later.duration_secs, later.records_per_sec) = (Some(end_s as u64 + 3600), Some(5), 10);
    let mut sim = Simulator::new(later, config.window_spec(), inventory.clone(), Scenario::default());
    let mut sentinels = [0usize; 3];
    while sentinels != [4, 2, 2] {
        let Some(batch) = rt.block_on(sim.next()) else { break };
        let (topic, partitions, slot) = topic_of(batch.format);
        for message in batch.messages.iter() {
            if sentinels[slot] < partitions {
                out.push((topic, sentinels[slot] as i32, message.to_vec()));
                sentinels[slot] += 1;
            }
        }
    }
    assert_eq!(sentinels, [4, 2, 2], "the sentinel simulation is too short");
    let truth = truth.lock().unwrap();
    let mut totals = Totals::new();
    for ((site, direction, window), tally) in &truth.flows {
        let key = (inventory.site(*site).id.clone(), direction.as_str().to_string(), window / S);
        totals.insert(key, (tally.bytes, tally.packets, tally.records));
    }
    (totals, end_s, out)
}

/// The topic of the simulator's messages of `format`: its name, partitions and slot.
fn topic_of(format: siteflow::types::Format) -> (&'static str, usize, usize) {
    match format {
        siteflow::types::Format::Goflow2Json => ("flows", 4, 0),
        siteflow::types::Format::TelegrafJson => ("interfaces", 2, 2),
        _ => ("probes", 2, 1),
    }
}

/// A message to produce: topic, partition, payload.
type Produced = (&'static str, i32, Vec<u8>);

fn send_all(broker: &Broker, messages: &[Produced]) {
    let producer = broker.producer();
    for (topic, partition, payload) in messages {
        send(&producer, topic, *partition, payload);
    }
    flush(&producer);
}

/// `(window_end, site, judgement)` of every evaluation an instance recorded, before `end_s`;
/// the judgement is the verdict, the connection status, the source of the utilisation and the
/// flows/counters ratio in (from the uplinks' counters, so the interface samples count).
fn verdicts(i: &Instance, end_s: i64) -> Vec<(String, String, String)> {
    let query = "SELECT CAST(window_end AS VARCHAR) AS e, site, \
                 concat_ws(' ', verdict, connection, utilisation_source, CAST(round(flow_counter_ratio_in, 4) AS VARCHAR)) AS j, \
                 CAST(window_end AS BIGINT) AS t FROM readiness ORDER BY e, site";
    let body = serde_json::json!({ "query": query, "format": "csv" }).to_string();
    let Ok((200, text)) = crate::support::http_request(i.http, "POST", "/api/sql", Some(&body)) else { return Vec::new() };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let t: i64 = f.get(3)?.parse().ok()?;
            (t / S < end_s).then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
        })
        .collect()
}

/// Each site's verdict as an instance's `/api/readiness` shows it.
fn api_verdicts(i: &Instance) -> BTreeMap<String, String> {
    let Ok((200, body)) = crate::support::http_get(i.http, "/api/readiness") else { return BTreeMap::new() };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let sites = v["sites"].as_array().cloned().unwrap_or_default();
    sites
        .iter()
        .map(|s| (s["site"].as_str().unwrap_or_default().to_string(), s["verdict"].as_str().unwrap_or_default().to_string()))
        .collect()
}

/// The sites an instance exports readiness for on /metrics.
fn exported_sites(i: &Instance) -> Vec<String> {
    let (_, body) = crate::support::http_get(i.http, "/metrics").unwrap_or_default();
    let mut sites: Vec<String> = body
        .lines()
        .filter(|l| l.starts_with("siteflow_site_readiness{") && l.contains("state=\"ready\""))
        .filter_map(|l| l.split("site=\"").nth(1)?.split('"').next().map(str::to_string))
        .collect();
    sites.sort();
    sites
}

/// The district-congestion scenario on `flows` and `probes`, one instance reading them as the
/// reference, and the two stages: `site_instances` site-stage instances (the internal
/// partitions settled over them before any data) and one ingest instance.
struct TwoStages {
    dir: tempfile::TempDir,
    _broker: Broker,
    sites: Vec<Instance>,
    reference: Instance,
    ingest: Instance,
    truth: Totals,
    end_s: i64,
    /// The scenario's messages not produced yet.
    rest: Vec<Produced>,
}

impl TwoStages {
    /// With `hold_back`, only the first half of the scenario is produced ([`TwoStages::produce_rest`]).
    fn start(site_instances: usize, hold_back: bool) -> Self {
        let dir = test_dir();
        let broker = Broker::start(dir.path());
        broker.create_topic("flows", 4);
        broker.create_topic("probes", 2);
        broker.create_topic("interfaces", 2);
        broker.create_topic("siteflow.partials", INTERNAL_PARTITIONS as u32);
        broker.create_topic_with("siteflow.readiness", 2, &["cleanup.policy=compact"]);
        broker.create_topic("siteflow.windows", 2);
        let topics = [("flows", "goflow2_json"), ("probes", "siteflow_probe_json"), ("interfaces", "telegraf_json")];
        let scaled = dir.path().join("scaled");
        let site_env = [("SITEFLOW_SCALE_OUT__STAGE", "site")];
        let sites: Vec<Instance> = (1..=site_instances)
            .map(|n| Instance::start_with_env(dir.path(), &format!("s{n}"), &broker, &topics, &scaled, "", &site_env))
            .collect();
        let settled = wait_until(Duration::from_secs(120), || {
            let owned: Vec<f64> = sites.iter().map(owned).collect();
            owned.iter().all(|&n| n >= 1.0) && owned.iter().sum::<f64>() == f64::from(INTERNAL_PARTITIONS)
        });
        assert!(settled, "the site stage did not settle its internal partitions over the instances:\n{}", sites[0].log_summary());
        let (truth, end_s, mut messages) = scenario_messages();
        let rest = if hold_back { messages.split_off(messages.len() / 2) } else { Vec::new() };
        send_all(&broker, &messages);
        let reference = Instance::start_with_env(
            dir.path(),
            "reference",
            &broker,
            &topics,
            &dir.path().join("reference"),
            "",
            &[("SITEFLOW_KAFKA__GROUP_ID", "reference")],
        );
        let ingest =
            Instance::start_with_env(dir.path(), "ingest", &broker, &topics, &scaled, "", &[("SITEFLOW_SCALE_OUT__STAGE", "ingest")]);
        Self { dir, _broker: broker, sites, reference, ingest, truth, end_s, rest }
    }

    fn produce_rest(&mut self) {
        send_all(&self._broker, &std::mem::take(&mut self.rest));
    }

    /// Waits (while results keep coming) until the per-site window totals of the reference and
    /// of the site stages each equal the ground truth.
    fn assert_exact_totals(&self) {
        let (reference, scaled) = (self.dir.path().join("reference"), self.dir.path().join("scaled"));
        let site_logs: Vec<&Instance> = self.sites.iter().collect();
        for (name, ckpt, log) in [("reference", reference, &self.reference), ("site stage", scaled, site_logs[0])] {
            let progress = || read_flow_results(&ckpt).values().map(|v| v.2).sum::<u64>();
            let done = wait_while_progressing(STALL, || before(&read_flow_results(&ckpt), self.end_s) == self.truth, progress);
            let got = before(&read_flow_results(&ckpt), self.end_s);
            assert!(
                done,
                "{name}: per-site window totals differ from the ground truth: {}\n{}\n{}",
                diff(&self.truth, &got),
                log.log_summary(),
                self.ingest.log_summary()
            );
        }
    }
}

fn owned(i: &Instance) -> f64 {
    i.metric("siteflow_scale_out_owned_partitions", "").unwrap_or(-1.0)
}

#[test]
fn three_site_stage_instances_publish_and_judge_what_one_instance_does() {
    let run = TwoStages::start(3, false);
    let (sites, end_s) = (&run.sites, run.end_s);
    run.assert_exact_totals();

    // SQL on any site-stage instance covers every site (the others' windows and verdicts come
    // through the windows topic): per-site window totals = the ground truth, and every
    // evaluation of every site = the reference's.
    let want = verdicts(&run.reference, end_s);
    let evaluations: std::collections::BTreeSet<&String> = want.iter().map(|(e, _, _)| e).collect();
    assert!(evaluations.len() >= 20, "the reference judged only {} windows", evaluations.len());
    let count = |v: &str| want.iter().filter(|(_, _, x)| x.split(' ').next() == Some(v)).count();
    assert!(
        count("ready") > 0 && count("not_ready") > 0,
        "the scenario's verdicts: {} ready, {} not ready",
        count("ready"),
        count("not_ready")
    );
    let from_counters = want.iter().filter(|(_, _, x)| x.contains(" up counters ")).count();
    assert!(from_counters * 2 > want.len(), "the uplinks' counters judge most evaluations: {from_counters} of {}", want.len());
    for i in sites {
        let mut totals = None;
        let same = wait_while_progressing(
            STALL,
            || {
                totals = sql_window_totals(i, end_s);
                totals.as_ref() == Some(&run.truth)
            },
            || i.metric("siteflow_scale_out_windows_read_total", "outcome=\"applied\""),
        );
        assert!(
            same,
            "{}: SQL site_windows differs from the ground truth: {}",
            i.log.display(),
            diff(&run.truth, &totals.unwrap_or_default())
        );
        let mut got = Vec::new();
        let same = wait_while_progressing(
            STALL,
            || {
                got = verdicts(i, end_s);
                got == want
            },
            || i.metric("siteflow_scale_out_windows_read_total", "outcome=\"applied\""),
        );
        if !same {
            let extra: Vec<_> = got.iter().filter(|r| !want.contains(r)).take(5).collect();
            let missing: Vec<_> = want.iter().filter(|r| !got.contains(r)).take(5).collect();
            panic!(
                "{}: {} verdicts in SQL, {} in the reference's; first extra {extra:?}, first missing {missing:?}",
                i.log.display(),
                got.len(),
                want.len()
            );
        }
        assert_eq!(i.metric("siteflow_scale_out_windows_read_total", "outcome=\"rejected\""), Some(0.0), "{}", i.log_summary());
    }

    // /metrics: each site is exported by exactly one instance, all 242 by the three.
    let mut exported: Vec<String> = sites.iter().flat_map(exported_sites).collect();
    let per_instance: Vec<usize> = sites.iter().map(exported_sites).map(|s| s.len()).collect();
    exported.sort();
    let total = exported.len();
    exported.dedup();
    assert_eq!((total, exported.len()), (242, 242), "sites exported per instance: {per_instance:?}");
    assert!(per_instance.iter().all(|&n| n > 0 && n < 242), "{per_instance:?}");
    assert_eq!(exported, exported_sites(&run.reference));
    // The byte counters of the three together = the ground truth, per site and direction (the
    // far-future sentinels' windows never close).
    let mut want_bytes: BTreeMap<(String, String), u64> = BTreeMap::new();
    for ((site, direction, _), v) in &run.truth {
        *want_bytes.entry((site.clone(), direction.clone())).or_default() += v.0;
    }
    let label = |line: &str, name: &str| line.split(&format!("{name}=\"")).nth(1).and_then(|r| r.split('"').next()).map(str::to_string);
    let mut got_bytes: BTreeMap<(String, String), u64> = BTreeMap::new();
    for i in sites {
        let body = crate::support::http_get(i.http, "/metrics").unwrap().1;
        for line in body.lines().filter(|l| l.starts_with("siteflow_site_bytes_total{")) {
            let (Some(site), Some(direction)) = (label(line, "site"), label(line, "direction")) else { continue };
            let v = line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64;
            *got_bytes.entry((site, direction)).or_default() += v;
        }
    }
    got_bytes.retain(|_, v| *v > 0);
    assert_eq!(got_bytes, want_bytes, "siteflow_site_bytes_total over the three instances");

    // /api/readiness: any site-stage instance answers for all 242 sites, as the reference does
    // (the others' verdicts through the readiness topic).
    // Both turn every verdict `unknown` once no window has closed for the freshness limit:
    // compared as they are at the same moment.
    for i in sites {
        let (mut want, mut got) = (BTreeMap::new(), BTreeMap::new());
        let same = wait_while_progressing(
            STALL,
            || {
                want = api_verdicts(&run.reference);
                got = api_verdicts(i);
                want.len() == 242 && got == want
            },
            || (api_verdicts(&run.reference), api_verdicts(i)),
        );
        let differ: Vec<_> = want.iter().filter(|(k, v)| got.get(*k) != Some(v)).take(5).collect();
        assert!(same, "{}: /api/readiness differs from the reference's for {differ:?}", i.log.display());
    }
}

/// SIGKILL of the site stage mid-run (half the scenario read), then its restart (as an
/// orchestrator restarts a pod) and the other half.
/// One site-stage instance: Tansu 0.6.0's group coordinator never expires a killed member, so
/// with several the killed one's partition stays assigned to it (docs/scale-out.md, "Known
/// limits"); with one, the restarted instance gets every partition back.
#[test]
fn a_site_stage_instance_killed_mid_run_loses_nothing_and_its_sites_are_judged_again() {
    // Half the scenario first: the kill comes while the rest is still to be read.
    let mut run = TwoStages::start(1, true);
    let judged = wait_while_progressing(
        STALL,
        || !verdicts(&run.sites[0], run.end_s).is_empty(),
        || read_flow_results(&run.dir.path().join("scaled")).len(),
    );
    assert!(judged, "the site stage judged nothing:\n{}", run.sites[0].log_summary());
    run.sites[0].kill();
    run.sites[0].restart();
    let taken_over = wait_until(Duration::from_secs(120), || owned(&run.sites[0]) == f64::from(INTERNAL_PARTITIONS));
    assert!(taken_over, "the restarted site stage did not get its partitions back:\n{}", run.sites[0].log_summary());
    run.produce_rest();
    let survivors = [&run.sites[0]];
    run.assert_exact_totals();
    // SQL after the restart: each window once, though the restarted instance read its own
    // windows back from the windows topic and also published again those after its checkpoint.
    let mut totals = None;
    let same = wait_while_progressing(
        STALL,
        || {
            totals = sql_window_totals(&run.sites[0], run.end_s);
            totals.as_ref() == Some(&run.truth)
        },
        || run.sites[0].metric("siteflow_scale_out_windows_read_total", "outcome=\"applied\""),
    );
    assert!(same, "SQL site_windows after the restart differs from the ground truth: {}", diff(&run.truth, &totals.unwrap_or_default()));
    let rows = verdicts(&run.sites[0], run.end_s);
    let mut keys: Vec<(&String, &String)> = rows.iter().map(|(e, site, _)| (e, site)).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), rows.len(), "SQL readiness: one verdict per site and evaluation after the restart");

    assert_survivors_judge_every_site(&run, &survivors);
}

/// After a kill: each survivor's SQL holds the reference's last evaluation (all 242 sites, its
/// own and, through the windows topic, the others'), and the survivors export every site once.
/// Compared: connection status and utilisation source. Not the verdict nor the flows/counters
/// ratio: readiness keeps its period's figures and its hysteresis in memory, so a restarted
/// instance judges from the windows since its checkpoint until a full period has passed, and a
/// row that was held at not ready may first come back as degraded (docs/scale-out.md, "Known
/// limits"). Which windows those are depends on when the checkpoint fell, so on the machine's speed.
fn assert_survivors_judge_every_site(run: &TwoStages, survivors: &[&Instance]) {
    let last = |rows: Vec<(String, String, String)>| -> Vec<(String, String, String)> {
        let end = rows.iter().map(|r| r.0.clone()).max().unwrap_or_default();
        // `verdict connection utilisation_source ratio`: the connection and the source.
        let judged = |j: &str| j.split(' ').skip(1).take(2).collect::<Vec<_>>().join(" ");
        rows.into_iter().filter(|r| r.0 == end).map(|(e, site, j)| (e, site, judged(&j))).collect()
    };
    let want = last(verdicts(&run.reference, run.end_s));
    assert_eq!(want.len(), 242, "the reference's last evaluation");
    for i in survivors {
        let mut got = Vec::new();
        let same = wait_while_progressing(
            STALL,
            || {
                got = last(verdicts(i, run.end_s));
                got == want
            },
            || verdicts(i, run.end_s).len(),
        );
        let differ: Vec<_> = want.iter().zip(&got).filter(|(a, b)| a != b).take(5).collect();
        assert!(
            same,
            "{}: {} sites judged in its last evaluation, {} in the reference's; first differences {differ:?}",
            i.log.display(),
            got.len(),
            want.len()
        );
    }
    let mut exported: Vec<String> = survivors.iter().flat_map(|i| exported_sites(i)).collect();
    exported.sort();
    assert_eq!(exported, exported_sites(&run.reference), "every site exported once");
}

/// Produces the district-congestion scenario to `flows` and `probes` in real time (event time
/// = now) until `stop`, as [`produce_scenario`] spreads it.
fn produce_live(broker: &Broker, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<()> {
    use siteflow::inventory::Inventory;
    use siteflow::source::simulator::{Scenario, Simulator};
    let producer = broker.producer();
    std::thread::spawn(move || {
        let inventory = std::sync::Arc::new(Inventory::embedded());
        let scenario =
            Scenario::load(&crate::support::repo().join("pipelines/hagiang/scenarios/district-congestion.yaml"), &inventory).unwrap();
        let mut config = Config::default();
        config.simulator.records_per_sec = 600;
        config.simulator.too_late_ratio = 0.0;
        let mut sim = Simulator::new(config.simulator.clone(), config.window_spec(), inventory, scenario);
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let mut sent = [0usize; 2];
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            let Some(batch) = rt.block_on(sim.next()) else { break };
            if batch.format == siteflow::types::Format::TelegrafJson {
                continue;
            }
            let (topic, partitions, slot) =
                if batch.format == siteflow::types::Format::Goflow2Json { ("flows", 4, 0) } else { ("probes", 2, 1) };
            let lines: Vec<&[u8]> = batch.messages.iter().collect();
            for chunk in lines.chunks(100) {
                send(&producer, topic, (sent[slot] % partitions) as i32, &chunk.join(&b'\n'));
                sent[slot] += 1;
            }
        }
    })
}

/// A real Prometheus with the shipped rules scrapes the ingest instance and three site-stage
/// instances reading live data: the verdicts and alerts name exactly the scenario's faulty
/// sites, each site once, and no site is `unknown` because another instance owns it.
#[test]
fn prometheus_over_three_site_stage_instances_alerts_for_exactly_the_faulty_sites() {
    use std::collections::BTreeSet;

    use crate::prometheus_e2e::{alerts, label_set, query};
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    broker.create_topic("flows", 4);
    broker.create_topic("probes", 2);
    broker.create_topic("siteflow.partials", INTERNAL_PARTITIONS as u32);
    broker.create_topic_with("siteflow.readiness", 1, &["cleanup.policy=compact"]);
    broker.create_topic("siteflow.windows", 1);
    broker.create_topic_with("siteflow.meetings", 1, &["cleanup.policy=compact"]);
    let topics = [("flows", "goflow2_json"), ("probes", "siteflow_probe_json")];
    let scaled = dir.path().join("scaled");
    let env = |stage: &'static str| [("SITEFLOW_SCALE_OUT__STAGE", stage), ("SITEFLOW_KAFKA__MEETINGS_TOPIC", "siteflow.meetings")];
    let sites: Vec<Instance> =
        ["s1", "s2", "s3"].iter().map(|n| Instance::start_with_env(dir.path(), n, &broker, &topics, &scaled, "", &env("site"))).collect();
    let settled = wait_until(Duration::from_secs(120), || sites.iter().all(|i| owned(i) == 1.0));
    assert!(settled, "the site stage did not settle one internal partition per instance:\n{}", sites[0].log_summary());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producing = produce_live(&broker, stop.clone());
    let ingest = Instance::start_with_env(dir.path(), "ingest", &broker, &topics, &scaled, "", &env("ingest"));

    // A meeting in 10 minutes with all of Mèo Vạc and the province office, posted to s1.
    let start = chrono::Utc::now() + chrono::Duration::minutes(10);
    let meeting = serde_json::json!({
        "id": "giao-ban-e2e", "title": "Giao ban 4 cấp", "start": start.to_rfc3339(), "duration_mins": 60,
        "participants": [{"sites": ["tinh.vp-ubnd"]}, {"district": "Mèo Vạc"}]
    });
    let posted = crate::support::http_request(sites[0].http, "POST", "/api/meetings", Some(&meeting.to_string())).unwrap();
    assert_eq!(posted.0, 201, "{}", posted.1);

    let prom = crate::support::free_addr();
    let targets: Vec<String> = sites.iter().chain([&ingest]).map(|i| format!("'{}'", i.http)).collect();
    let config = format!(
        "global:\n  scrape_interval: 2s\n  evaluation_interval: 2s\nrule_files:\n  - {}/*.yml\nscrape_configs:\n  - job_name: siteflow\n    static_configs:\n      - targets: [{}]\n",
        crate::support::repo().join("deploy/prometheus/rules").display(),
        targets.join(", ")
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let _prometheus = crate::support::KillOnDrop(
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("prom").display()))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("the prometheus server (scripts/test.sh installs it)"),
    );

    let up = wait_until(Duration::from_secs(60), || crate::support::http_get(prom, "/-/ready").is_ok_and(|(s, _)| s == 200));
    assert!(up, "Prometheus did not start: {}", std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default());
    let inventory = siteflow::inventory::Inventory::embedded();
    let meo_vac: BTreeSet<String> =
        inventory.sites().iter().filter(|s| s.district == "Mèo Vạc" && s.level == "commune").map(|s| s.id.clone()).collect();
    let mut not_ready = meo_vac.clone();
    not_ready.extend(["yen-minh.thang-mo", "yen-minh.sung-thai", "yen-minh.huu-vinh"].map(String::from));
    let unknown: BTreeSet<String> = ["dong-van.ta-lung".to_string()].into();
    let expected_ready = 242 - not_ready.len() - unknown.len();

    // Verdicts as Prometheus stores them: every site once, over the three instances.
    let verdicts_right = wait_until(Duration::from_secs(240), || {
        let ready = query(prom, "siteflow_site_readiness{state=\"ready\"} == 1");
        let nr = label_set(&query(prom, "siteflow_site_readiness{state=\"not_ready\"} == 1"), "site");
        let unk = label_set(&query(prom, "siteflow_site_readiness{state=\"unknown\"} == 1"), "site");
        ready.len() == expected_ready && nr == not_ready && unk == unknown
    });
    let counts = query(prom, "count by (state) (siteflow_site_readiness == 1)");
    assert!(verdicts_right, "the verdicts in Prometheus: {counts:?}\n{}", sites[0].log_summary());
    let series = query(prom, "count(siteflow_site_readiness{state=\"ready\"})");
    assert_eq!(series[0]["value"][1].as_str(), Some("242"), "one series per site and state over the instances");

    // SiteNotReady and MeetingParticipantAtRisk (for: 1m) fire for exactly the faulty sites;
    // SiteReadinessUnknown names no site but the silent one.
    let mut firing = Vec::new();
    let fired = wait_until(Duration::from_secs(240), || {
        firing = alerts(prom);
        let of = |name: &str| {
            firing.iter().filter(|(n, s, _)| n == name && s == "firing").map(|(_, _, site)| site.clone()).collect::<BTreeSet<_>>()
        };
        of("SiteNotReady") == not_ready && of("MeetingParticipantAtRisk") == meo_vac
    });
    assert!(fired, "alerts: {firing:?}");
    let unknown_alerts: BTreeSet<String> =
        firing.iter().filter(|(n, _, _)| n == "SiteReadinessUnknown").map(|(_, _, s)| s.clone()).collect();
    assert!(unknown_alerts.is_subset(&unknown), "SiteReadinessUnknown for {unknown_alerts:?}");
    let affected: BTreeSet<String> = not_ready.union(&unknown).cloned().collect();
    for (name, state, site) in &firing {
        assert!(site.is_empty() || affected.contains(site), "{name} ({state}) names healthy site {site}");
    }

    // Any instance reports the meeting over every participant (the owners' verdicts).
    for i in &sites {
        let (status, body) = crate::support::http_get(i.http, "/api/meetings/giao-ban-e2e/readiness").unwrap();
        assert_eq!(status, 200, "{body}");
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        let at_risk: BTreeSet<String> = report["participants"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["at_risk"] == true)
            .map(|p| p["site"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(at_risk, meo_vac, "{}: the meeting's participants at risk", i.log.display());
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    producing.join().unwrap();
}

/// A site-stage instance needs three topics besides the input: it refuses to start, naming the
/// first one missing, and starts once they all exist.
#[test]
fn a_site_stage_instance_names_each_missing_topic_and_starts_once_all_exist() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    broker.create_topic("flows", 1);
    let env = [("SITEFLOW_SCALE_OUT__STAGE", "site")];
    let checkpoints = dir.path().join("ckpt");
    let create: [(&str, &str, &dyn Fn()); 3] = [
        ("scale_out.topic \"siteflow.partials\": does not exist", "siteflow.partials", &|| broker.create_topic("siteflow.partials", 2)),
        ("scale_out.readiness_topic \"siteflow.readiness\": does not exist", "siteflow.readiness", &|| {
            broker.create_topic_with("siteflow.readiness", 1, &["cleanup.policy=compact"])
        }),
        ("scale_out.windows_topic \"siteflow.windows\": does not exist", "siteflow.windows", &|| {
            broker.create_topic("siteflow.windows", 1)
        }),
    ];
    for (n, (message, topic, make)) in create.iter().enumerate() {
        let mut i = Instance::start_with_env(dir.path(), &format!("s{n}"), &broker, &[("flows", "goflow2_json")], &checkpoints, "", &env);
        let exited = wait_until(Duration::from_secs(60), || !i.is_running());
        assert!(exited, "started without {topic}:\n{}", i.log_summary());
        assert!(i.log_text().contains(message), "the error names {topic}:\n{}", i.log_text());
        make();
    }
    let i = Instance::start_with_env(dir.path(), "all", &broker, &[("flows", "goflow2_json")], &checkpoints, "", &env);
    let owns = wait_until(Duration::from_secs(60), || owned(&i) == 2.0);
    assert!(owns, "with every topic, the site stage did not take its partitions:\n{}", i.log_summary());
}
