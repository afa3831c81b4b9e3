//! Window totals are exact: every (site, direction, window) sum equals the simulator's own tally,
//! with sampling correction, out-of-order records within the lateness, and too-late records
//! counted but not summed.

use std::collections::BTreeMap;

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type, TimestampNanosecondType};
use siteflow::enrich::Direction;
use siteflow::source::simulator::Scenario;

use crate::support::{fast_config, simulate};

type Key = (String, String, i64);

fn column_i64(rows: &RecordBatch, name: &str) -> Vec<i64> {
    let c = cast(rows.column_by_name(name).unwrap(), &DataType::Int64).unwrap();
    c.as_primitive::<Int64Type>().values().to_vec()
}

fn column_str(rows: &RecordBatch, name: &str) -> Vec<String> {
    let c = cast(rows.column_by_name(name).unwrap(), &DataType::Utf8).unwrap();
    c.as_string::<i32>().iter().map(|s| s.unwrap().to_string()).collect()
}

/// Each window's rows as last published: a correction replaces the rows published before.
fn latest_rows(run: &crate::support::SimRun, table: &str) -> BTreeMap<i64, RecordBatch> {
    let mut latest = BTreeMap::new();
    for w in run.windows.iter().filter(|w| &*w.table == table) {
        let before = latest.insert(w.start_ns, w.rows.clone());
        assert_eq!(before.is_some(), w.previous.is_some(), "only a published window is corrected, and it says what it replaces");
    }
    latest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_totals_equal_the_simulators_ground_truth() {
    // 15 minutes of event time: 90 windows of 10 s, ~270k flow records, with many more
    // out-of-order, too-late and unmatched records than the demo defaults.
    let mut config = fast_config(900, 300);
    config.simulator.batch_records = 777;
    config.simulator.out_of_order_ratio = 0.10;
    config.simulator.too_late_ratio = 0.01;
    config.simulator.unmatched_ratio = 0.02;
    let run = simulate(&config, Scenario::default()).await;

    let mut got: BTreeMap<Key, (i64, i64, i64)> = BTreeMap::new();
    let flow_windows = run.windows.iter().filter(|w| &*w.table == "flows" && w.previous.is_none()).count();
    for (&start, r) in &latest_rows(&run, "flows") {
        let w_start = start;
        let starts = r.column_by_name("window_start").unwrap().as_primitive::<TimestampNanosecondType>().values().to_vec();
        let (sites, dirs) = (column_str(r, "site"), column_str(r, "direction"));
        let (bytes, packets, records) = (column_i64(r, "bytes"), column_i64(r, "packets"), column_i64(r, "records"));
        for i in 0..r.num_rows() {
            assert_eq!(starts[i], w_start, "rows of a window carry its start");
            let prev = got.insert((sites[i].clone(), dirs[i].clone(), starts[i]), (bytes[i], packets[i], records[i]));
            assert!(prev.is_none(), "one row per (site, direction, window)");
        }
    }
    let inventory = siteflow::inventory::Inventory::embedded();
    let expected: BTreeMap<Key, (i64, i64, i64)> = run
        .truth
        .flows
        .iter()
        .map(|((site, dir, start), t)| {
            let dir = match dir {
                Direction::In => "in",
                Direction::Out => "out",
            };
            ((inventory.site(*site).id.clone(), dir.to_string(), *start), (t.bytes as i64, t.packets as i64, t.records as i64))
        })
        .collect();

    assert!(flow_windows >= 90, "{flow_windows} windows");
    assert_eq!(got.len(), expected.len(), "same (site, direction, window) groups");
    for (key, want) in &expected {
        assert_eq!(got.get(key), Some(want), "totals of {key:?}");
    }
    // Every site and both directions appear, sampled at 1, 100 and 1000.
    let sites: std::collections::BTreeSet<_> = got.keys().map(|(s, d, _)| (s.clone(), d.clone())).collect();
    assert_eq!(sites.len(), 242 * 2);

    // Late and unmatched records are counted, exactly.
    let m = &run.metrics;
    assert!(run.truth.late_flows > 1000, "the test exercises lateness: {}", run.truth.late_flows);
    assert_eq!(m.records_late.with_label_values(&["flows"]).get(), run.truth.late_flows);
    assert_eq!(m.records_unmatched.with_label_values(&["flows"]).get(), run.truth.unmatched_flows);
    assert_eq!(m.records_decoded.with_label_values(&["goflow2_json"]).get(), run.truth.flow_records);
    assert_eq!(run.summary.records, run.truth.flow_records + run.truth.probe_records + run.truth.counter_records);
    assert!(run.summary.windows_flushed_at_end > 0, "the windows still open at the end are flushed, not lost");

    // Probe results: one count per (site, window), as emitted.
    let mut probe_counts: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for (&start, rows) in &latest_rows(&run, "probes") {
        for (site, n) in column_str(rows, "site").into_iter().zip(column_i64(rows, "results")) {
            probe_counts.insert((site, start), n);
        }
    }
    let probe_truth: BTreeMap<(String, i64), i64> =
        run.truth.probes.iter().map(|((s, start), n)| ((inventory.site(*s).id.clone(), *start), *n as i64)).collect();
    assert_eq!(probe_counts, probe_truth);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_counters_sum_the_closed_windows() {
    let run = simulate(&fast_config(120, 500), Scenario::default()).await;
    let text = {
        let families = run.sites.collect();
        let mut out = String::new();
        prometheus::TextEncoder::new().encode_utf8(&families, &mut out).unwrap();
        out
    };
    let total_bytes: u64 = run.truth.flows.values().map(|t| t.bytes).sum();
    let exported: f64 = text
        .lines()
        .filter(|l| l.starts_with("siteflow_site_bytes_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(exported as u64, total_bytes);
    assert_eq!(text.lines().filter(|l| l.starts_with("siteflow_site_throughput_bytes_per_second{")).count(), 484);
}

/// `sql.top_talkers: 0` turns the conversations aggregation off: its windows stay empty while
/// the per-site totals are unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_top_talkers_the_conversations_table_stays_empty_and_totals_hold() {
    let mut config = fast_config(60, 30);
    let with = simulate(&config, Scenario::default()).await;
    config.sql.top_talkers = 0;
    let without = simulate(&config, Scenario::default()).await;
    let rows = |run: &crate::support::SimRun, table: &str| -> usize {
        run.windows.iter().filter(|w| &*w.table == table).map(|w| w.rows.num_rows()).sum()
    };
    assert!(rows(&with, "conversations") > 0, "the default aggregates conversations");
    assert_eq!(rows(&without, "conversations"), 0);
    let totals = |run: &crate::support::SimRun| -> BTreeMap<Key, i64> {
        let mut out = BTreeMap::new();
        for (start, rows) in latest_rows(run, "flows") {
            let (sites, dirs, bytes) = (column_str(&rows, "site"), column_str(&rows, "direction"), column_i64(&rows, "bytes"));
            for i in 0..rows.num_rows() {
                out.insert((sites[i].clone(), dirs[i].clone(), start), bytes[i]);
            }
        }
        out
    };
    assert!(!totals(&without).is_empty());
    assert_eq!(totals(&with), totals(&without));
}

/// `decode.ahead` decodes and enriches the next batches on other threads and computes the flow
/// tables' partial aggregates there (used when no record of the batch is late), and
/// `window.parallel_tables` aggregates and closes each table on its own: every table's windows
/// (as last published), the run's counts and every site's verdict equal one thread doing it
/// all, on a run with faults, out-of-order and too-late records, probes and interface counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn using_a_second_core_gives_what_one_thread_gives() {
    use siteflow::config::SecondCore;
    let inventory = siteflow::inventory::Inventory::embedded();
    let scenario =
        || Scenario::load(&crate::support::repo().join("pipelines/hagiang/scenarios/district-congestion.yaml"), &inventory).unwrap();
    let mut config = fast_config(300, 500);
    config.simulator.batch_records = 333;
    config.simulator.out_of_order_ratio = 0.10;
    config.simulator.too_late_ratio = 0.01;
    let mut runs = Vec::new();
    for (ahead, tables) in [(SecondCore::Off, SecondCore::Off), (SecondCore::On, SecondCore::Off), (SecondCore::On, SecondCore::On)] {
        config.decode.ahead = ahead;
        config.window.parallel_tables = tables;
        runs.push(simulate(&config, scenario()).await);
    }
    let one = &runs[0];
    // Each window's rows, sorted (the order of rows within a window is not part of the result).
    let tables = |run: &crate::support::SimRun| -> BTreeMap<(String, i64), Vec<String>> {
        let mut out = BTreeMap::new();
        for table in siteflow::table::TABLES.iter().map(|t| t.name) {
            for (start, rows) in latest_rows(run, table) {
                let text = datafusion::arrow::util::pretty::pretty_format_batches(&[rows]).unwrap().to_string();
                let mut lines: Vec<String> = text.lines().map(String::from).collect();
                lines.sort();
                out.insert((table.to_string(), start), lines);
            }
        }
        out
    };
    let verdicts = |run: &crate::support::SimRun| format!("{:?}", run.readiness.engine.read().unwrap().latest());
    let a = tables(one);
    assert!(a.len() > 100, "{} windows", a.len());
    assert_eq!((one.summary.states_ahead_used, one.summary.states_ahead_redone), (0, 0), "in line");
    for run in &runs[1..] {
        // Both ways are taken: batches without late records use the states computed ahead.
        let (used, redone) = (run.summary.states_ahead_used, run.summary.states_ahead_redone);
        assert!(used > 0 && redone > 0, "states computed ahead used {used} times, redone {redone} times");
    }
    for (name, other) in ["decoding ahead", "decoding ahead, tables side by side"].iter().zip(&runs[1..]) {
        assert_eq!((one.summary.records, one.summary.batches), (other.summary.records, other.summary.batches), "{name}");
        let b = tables(other);
        let differ: Vec<_> = a.keys().filter(|k| a.get(*k) != b.get(*k)).take(3).collect();
        assert!(differ.is_empty() && a.len() == b.len(), "{name}: windows differ: {differ:?}");
        assert_eq!(verdicts(one), verdicts(other), "{name}");
    }
}
