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
                Admission::Overlap => panic!(
                    "partition {q}: a partial overlaps a merged span: {:?} {}..{}",
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
