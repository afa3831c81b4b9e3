//! Records of every kind and sites by exporter alone, through the real pipeline: non-IP flows
//! (EoMPLS, `"ip_src": ""`) and NAT event records (no counters) are counted as documented and
//! never rejected; routers as sites without prefixes get every flow of their router; `spread`
//! apportions long flows over their windows. Expected figures are summed from the generated
//! records in the test, by the documented rules, never read back from siteflow.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use siteflow::config::Config;
use siteflow::driver::run_source as run;
use siteflow::metrics::PipelineMetrics;
use siteflow::pipeline::{Pipeline, Resources};
use siteflow::sink::CollectSink;
use siteflow::source::Source;
use siteflow::types::{EventTime, Format, Messages, SourceBatch};
use siteflow::window::ClosedWindow;

use crate::support::{repo, run_siteflow, write};

/// (site, direction, window start) → (bytes, packets, flows).
type Totals = BTreeMap<(String, String, i64), (u64, u64, u64)>;

const T0: i64 = 1_764_000_000 * 1_000_000_000;
const NS: i64 = 1_000_000_000;

/// Hands out fixed batches, then ends (the pipeline then flushes every window).
struct Batches(std::vec::IntoIter<SourceBatch>);

impl Source for Batches {
    fn next_batch(&mut self) -> impl std::future::Future<Output = Option<SourceBatch>> + Send {
        // Lazy: `run` may drop this future unpolled (a tick won the select), losing nothing.
        async { self.0.next() }
    }
}

fn batch(format: Format, event_time: EventTime, records: &[String]) -> SourceBatch {
    let mut messages = Messages::default();
    for r in records {
        messages.push(r.as_bytes());
    }
    SourceBatch { partition: 0, format, event_time, messages, received: Instant::now(), offsets: Vec::new() }
}

async fn run_batches(config: &Config, batches: Vec<SourceBatch>) -> (Vec<ClosedWindow>, Arc<PipelineMetrics>) {
    let res = Resources::load(config).unwrap();
    let metrics = Arc::new(PipelineMetrics::new(&Pipeline::FORMATS, &siteflow::table::TABLES));
    let collect = CollectSink::default();
    let pipeline = Pipeline::build(config, &res, metrics.clone(), vec![Box::new(collect.clone())]).await.unwrap();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    run(Batches(batches.into_iter()), pipeline, stop_rx).await.unwrap();
    let windows = std::mem::take(&mut *collect.windows.lock().unwrap());
    (windows, metrics)
}

fn flow_totals(windows: &[ClosedWindow]) -> Totals {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::compute::cast;
    use datafusion::arrow::datatypes::{DataType, Int64Type};
    // A correction replaces the rows published before for its window.
    let latest: BTreeMap<i64, &datafusion::arrow::array::RecordBatch> =
        windows.iter().filter(|w| &*w.table == "flows").map(|w| (w.start_ns, &w.rows)).collect();
    let mut out = Totals::new();
    for (start, r) in latest {
        let s = |n: &str| -> Vec<String> {
            let c = cast(r.column_by_name(n).unwrap(), &DataType::Utf8).unwrap();
            c.as_string::<i32>().iter().map(|v| v.unwrap().to_string()).collect()
        };
        let i = |n: &str| -> Vec<i64> {
            cast(r.column_by_name(n).unwrap(), &DataType::Int64).unwrap().as_primitive::<Int64Type>().values().to_vec()
        };
        let (sites, dirs, bytes, packets, flows) = (s("site"), s("direction"), i("bytes"), i("packets"), i("flows"));
        for k in 0..r.num_rows() {
            let prev = out.insert((sites[k].clone(), dirs[k].clone(), start), (bytes[k] as u64, packets[k] as u64, flows[k] as u64));
            assert!(prev.is_none(), "one row per site, direction and window");
        }
    }
    out
}

fn add(truth: &mut Totals, site: &str, dir: &str, t: i64, bytes: u64, packets: u64, flows: u64) {
    let e = truth.entry((site.to_string(), dir.to_string(), t.div_euclid(10 * NS) * 10 * NS)).or_default();
    e.0 += bytes;
    e.1 += packets;
    e.2 += flows;
}

fn secs(t: i64) -> String {
    format!("{}.{:06}", t / NS, (t % NS) / 1000)
}

fn rejected_total(m: &PipelineMetrics) -> u64 {
    Format::ALL
        .iter()
        .flat_map(|f| siteflow::decode::RejectReason::ALL.map(|r| m.records_rejected.with_label_values(&[f.as_str(), r.as_str()]).get()))
        .sum()
}

/// A small deterministic generator (no dependency on the crate's).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eompls_and_nat_event_records_are_counted_as_documented_and_none_rejected() {
    // Tả Lủng's own router (prefix 10.2.21.0/24, no uplink_ifindex in the Hà Giang inventory).
    let (router, site) = ("172.16.2.21", "dong-van.ta-lung");
    let unknown = "192.0.2.77";
    let mut rng = Lcg(7);
    let (mut pmacct, mut goflow2) = (Vec::new(), Vec::new());
    let mut truth = Totals::new();
    let (mut nat, mut not_ip, mut not_ip_bytes, mut defaulted) = (0u64, 0u64, 0u64, 0u64);
    for i in 0..3_000i64 {
        let t = T0 + i * 20_000_000; // 60 s of records
        let (bytes, packets) = (64 + rng.next(100_000), 1 + rng.next(80));
        let stamps =
            format!(r#""timestamp_start":"{}","timestamp_end":"{}","timestamp_arrival":"{}""#, secs(t - NS), secs(t), secs(t + NS));
        match rng.next(6) {
            // An IP flow into the site: by its prefix.
            0 => {
                pmacct.push(format!(
                    r#"{{"event_type":"purge","peer_ip_src":"{router}","iface_in":2,"iface_out":1,"ip_src":"203.0.113.9","ip_dst":"10.2.21.5","ip_proto":"tcp",{stamps},"packets":{packets},"bytes":{bytes},"flows":1}}"#
                ));
                add(&mut truth, site, "in", t, bytes, packets, 1);
            }
            // EoMPLS through the site's router: the site, direction by default (in).
            1 => {
                pmacct.push(format!(
                    r#"{{"event_type":"purge","peer_ip_src":"{router}","iface_in":5,"iface_out":6,"ip_src":"","ip_dst":"","ip_proto":"0",{stamps},"packets":{packets},"bytes":{bytes},"flows":1}}"#
                ));
                add(&mut truth, site, "in", t, bytes, packets, 1);
                defaulted += 1;
            }
            // EoMPLS from an exporter of no site: not_ip, bytes reported.
            2 => {
                pmacct.push(format!(
                    r#"{{"event_type":"purge","peer_ip_src":"{unknown}","ip_src":"","ip_dst":"","ip_proto":"0",{stamps},"packets":{packets},"bytes":{bytes},"flows":1}}"#
                ));
                not_ip += 1;
                not_ip_bytes += bytes;
            }
            // A NAT event (NEL): no counters, no traffic.
            3 => {
                pmacct.push(format!(
                    r#"{{"event_type":"purge","peer_ip_src":"{router}","ip_src":"10.2.21.7","ip_dst":"198.51.100.4","post_nat_ip_src":"203.0.113.1","nat_event":1,"ip_proto":"udp","timestamp_start":"{}"}}"#,
                    secs(t)
                ));
                nat += 1;
            }
            // goflow2: a non-IP sFlow sample of the site's router ("<nil>" addresses), sampled 1:100.
            4 => {
                goflow2.push(format!(
                    r#"{{"type":"SFLOW_5","time_received_ns":{},"sampling_rate":100,"sampler_address":"{router}","time_flow_start_ns":{},"time_flow_end_ns":{t},"bytes":{bytes},"packets":{packets},"src_addr":"<nil>","dst_addr":"<nil>","etype":"0x8847","proto":0,"in_if":3,"out_if":4}}"#,
                    t + NS / 2,
                    t - NS
                ));
                add(&mut truth, site, "in", t, bytes * 100, packets * 100, 1);
                defaulted += 1;
            }
            // goflow2: an IP flow out of the site.
            _ => {
                goflow2.push(format!(
                    r#"{{"type":"IPFIX","time_received_ns":{},"sampling_rate":1,"sampler_address":"{router}","time_flow_end_ns":{t},"bytes":{bytes},"packets":{packets},"src_addr":"10.2.21.9","dst_addr":"203.0.113.10","proto":"UDP","in_if":1,"out_if":2}}"#,
                    t + NS / 2
                ));
                add(&mut truth, site, "out", t, bytes, packets, 1);
            }
        }
    }
    assert!(nat > 300 && not_ip > 300 && defaulted > 600, "every kind is exercised");
    // One format after the other: the lateness covers the 60 s of records.
    let pmacct_batches = pmacct.chunks(100).map(|c| batch(Format::PmacctJson, EventTime::FlowEnd, c));
    let batches: Vec<SourceBatch> =
        pmacct_batches.chain(goflow2.chunks(100).map(|c| batch(Format::Goflow2Json, EventTime::FlowEnd, c))).collect();
    let config =
        Config { window: siteflow::config::WindowConfig { allowed_lateness_ms: 120_000, ..Default::default() }, ..Config::default() };
    let (windows, m) = run_batches(&config, batches).await;

    assert_eq!(flow_totals(&windows), truth, "per-site totals equal the records' sums");
    assert_eq!(rejected_total(&m), 0, "nothing rejected");
    let skipped = |f: &str, r: &str| m.records_skipped.with_label_values(&[f, r]).get();
    assert_eq!(skipped("pmacct_json", "no_traffic"), nat);
    assert_eq!(skipped("pmacct_json", "not_ip") + skipped("goflow2_json", "not_ip"), not_ip);
    assert_eq!(m.records_skipped_bytes.with_label_values(&["pmacct_json", "not_ip"]).get(), not_ip_bytes);
    assert_eq!(m.flows_direction_defaulted.get(), defaulted);
    assert_eq!(m.records_unmatched.with_label_values(&["flows"]).get(), 0);
    assert_eq!(m.records_late.with_label_values(&["flows"]).get(), 0);
    let received: u64 = ["pmacct_json", "goflow2_json"].iter().map(|f| m.records_received.with_label_values(&[f]).get()).sum();
    assert_eq!(received, 3_000);
}

const ROUTERS_CSV: &str = "pipelines/examples/routers-as-sites/sites.csv";

/// Site id, exporter and uplink interface of the example inventory, read from the file the
/// way an operator reads it (not through siteflow's parser).
fn example_routers() -> Vec<(String, String, Option<u32>)> {
    let text = std::fs::read_to_string(repo().join(ROUTERS_CSV)).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (id, exporter, prefix, uplink) = (col("site_id"), col("exporter"), col("prefix"), col("uplink_ifindex"));
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert!(f[prefix].is_empty(), "the example has no prefixes");
            (f[id].to_string(), f[exporter].to_string(), f[uplink].parse().ok())
        })
        .collect()
}

#[test]
fn check_accepts_the_routers_as_sites_example() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "c.yaml", &format!("inventory:\n  sites_csv: {}\n", repo().join(ROUTERS_CSV).display()));
    let out = run_siteflow(&["check", "--config", f.to_str().unwrap()], &[]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let n = example_routers().len();
    assert!(stdout.contains(&format!("inventory: {n} sites")), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_as_sites_without_prefixes_get_every_flow_of_their_router() {
    let routers = example_routers();
    assert!(routers.iter().any(|r| r.2.is_some()) && routers.iter().any(|r| r.2.is_none()));
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "c.yaml",
        &format!("inventory:\n  sites_csv: {}\nwindow:\n  allowed_lateness_ms: 30000\n", repo().join(ROUTERS_CSV).display()),
    );
    let config = Config::load(Some(&f)).unwrap();

    let mut rng = Lcg(11);
    let mut truth = Totals::new();
    let (mut records, mut defaulted) = (Vec::new(), 0u64);
    for i in 0..4_000i64 {
        let t = T0 + i * 10_000_000;
        let (site, exporter, uplink) = &routers[rng.next(routers.len() as u64) as usize];
        let (in_if, out_if) = (1 + rng.next(3) as u32, 1 + rng.next(3) as u32);
        let (bytes, packets) = (40 + rng.next(50_000), 1 + rng.next(40));
        // Addresses anywhere (these sites have no prefix), or none (non-IP).
        let (src, dst) = if rng.next(5) == 0 {
            (String::new(), String::new())
        } else {
            (format!("10.{}.{}.{}", rng.next(256), rng.next(256), 1 + rng.next(254)), format!("198.51.100.{}", 1 + rng.next(254)))
        };
        // The documented rule: in through the uplink → in; out through it → out; else in.
        let dir = match uplink {
            Some(u) if in_if == *u => "in",
            Some(u) if out_if == *u => "out",
            _ => {
                defaulted += 1;
                "in"
            }
        };
        add(&mut truth, site, dir, t, bytes, packets, 1);
        records.push(format!(
            r#"{{"event_type":"purge","peer_ip_src":"{exporter}","iface_in":{in_if},"iface_out":{out_if},"ip_src":"{src}","ip_dst":"{dst}","ip_proto":"tcp","timestamp_end":"{}","packets":{packets},"bytes":{bytes}}}"#,
            secs(t)
        ));
    }
    let batches = records.chunks(250).map(|c| batch(Format::PmacctJson, EventTime::FlowEnd, c)).collect();
    let (windows, m) = run_batches(&config, batches).await;
    assert_eq!(flow_totals(&windows), truth);
    assert_eq!(m.records_unmatched.with_label_values(&["flows"]).get(), 0);
    assert_eq!(m.flows_direction_defaulted.get(), defaulted);
    assert_eq!(rejected_total(&m), 0);
}

/// Long flows in `spread` mode: each window gets the bytes of the part of each flow inside it
/// (computed here from the flows' times in floating point), within a byte of rounding per flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_apportions_long_flows_over_their_windows() {
    let mut rng = Lcg(3);
    let mut flows = Vec::new();
    for i in 0..500i64 {
        let end = T0 + 120 * NS + i * 100_000_000;
        let duration = rng.next(95 * NS as u64) as i64; // up to 95 s: up to 11 windows
        flows.push((end - duration, end, 1 + rng.next(10_000_000), 1 + rng.next(10_000)));
    }
    let mut expected: BTreeMap<i64, f64> = BTreeMap::new();
    let mut total = 0u64;
    for &(start, end, bytes, _) in &flows {
        total += bytes;
        let mut w = start.div_euclid(10 * NS) * 10 * NS;
        while w <= end {
            let overlap = (end.min(w + 10 * NS) - start.max(w)).max(0) as f64;
            let share = if end == start { bytes as f64 } else { bytes as f64 * overlap / (end - start) as f64 };
            *expected.entry(w).or_default() += share;
            w += 10 * NS;
        }
    }
    let records: Vec<String> = flows
        .iter()
        .map(|&(start, end, bytes, packets)| {
            format!(
                r#"{{"type":"IPFIX","time_received_ns":{},"sampling_rate":1,"sampler_address":"172.16.2.21","time_flow_start_ns":{start},"time_flow_end_ns":{end},"bytes":{bytes},"packets":{packets},"src_addr":"203.0.113.9","dst_addr":"10.2.21.5","proto":"TCP"}}"#,
                end + NS
            )
        })
        .collect();
    // Lateness covers the longest flow, or its first pieces would be late (docs/operations.md).
    let config =
        Config { window: siteflow::config::WindowConfig { allowed_lateness_ms: 100_000, ..Default::default() }, ..Config::default() };
    let batches = records.chunks(50).map(|c| batch(Format::Goflow2Json, EventTime::Spread, c)).collect();
    let (windows, m) = run_batches(&config, batches).await;
    let got = flow_totals(&windows);
    let per_window: BTreeMap<i64, u64> = got.iter().fold(BTreeMap::new(), |mut acc, ((_, _, w), v)| {
        *acc.entry(*w).or_default() += v.0;
        acc
    });
    assert_eq!(per_window.values().sum::<u64>(), total, "spreading keeps every byte");
    assert!(per_window.keys().all(|w| expected.contains_key(w)), "no bytes outside the flows' windows");
    for (w, want) in &expected {
        let have = per_window.get(w).copied().unwrap_or(0) as f64;
        assert!((have - want).abs() <= flows.len() as f64, "window {w}: {have} vs {want}");
    }
    // Flows are counted once each; records count one row per window a flow covers.
    assert_eq!(got.values().map(|v| v.2).sum::<u64>(), flows.len() as u64);
    assert!(m.flows_spread_rows.get() > 1000, "{}", m.flows_spread_rows.get());
    assert_eq!(m.flows_spread_clamped.get(), 0);
    assert_eq!(m.records_late.with_label_values(&["flows"]).get(), 0);
}

/// The simulator on the routers-as-sites example (`siteflow demo`-like): its hosts are outside
/// any prefix, so every figure comes from the exporter rule; per site, direction and window the
/// totals equal the simulator's tally, with both directions of a router without
/// `uplink_ifindex` counted `in`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_on_routers_as_sites_matches_its_ground_truth() {
    use siteflow::enrich::Direction;
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "c.yaml",
        &format!(
            "inventory:\n  sites_csv: {}\nsimulator:\n  pace: fast\n  start_unix_secs: 1764000000\n  duration_secs: 120\n  records_per_sec: 300\n",
            repo().join(ROUTERS_CSV).display()
        ),
    );
    let config = Config::load(Some(&f)).unwrap();
    let run = crate::support::simulate(&config, siteflow::source::simulator::Scenario::default()).await;
    let inventory = Resources::load(&config).unwrap().inventory;
    let mut expected = Totals::new();
    for ((site, dir, start), t) in &run.truth.flows {
        let s = inventory.site(*site);
        let dir = match dir {
            Direction::Out if s.uplink_ifindex.is_some() => "out",
            _ => "in",
        };
        let e = expected.entry((s.id.clone(), dir.to_string(), *start)).or_default();
        e.0 += t.bytes;
        e.1 += t.packets;
        e.2 += t.records;
    }
    assert!(expected.len() >= 7 * 12, "every site has traffic in every window: {}", expected.len());
    let got = flow_totals(&run.windows);
    let differ: Vec<_> =
        expected.keys().chain(got.keys()).filter(|k| got.get(*k) != expected.get(*k)).map(|k| (k, got.get(k), expected.get(k))).collect();
    assert!(differ.is_empty(), "(key, siteflow, simulator): {differ:?}");
    assert_eq!(run.metrics.records_unmatched.with_label_values(&["flows"]).get(), run.truth.unmatched_flows);
}
