//! Criterion benches of each stage on simulator records: decode (goflow2 JSON), enrich (LPM),
//! window (DataFusion partial aggregate), and the Prometheus render of 242 sites.
//! Run: `cargo bench --bench pipeline`. Figures and method: BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use siteflow::config::{Config, Pace, SimulatorConfig};
use siteflow::decode::{DecodeLimits, Decoded, decode};
use siteflow::enrich::{Enricher, Sampling};
use siteflow::http::{AppState, render};
use siteflow::metrics::PipelineMetrics;
use siteflow::pipeline::{Pipeline, Resources};
use siteflow::sink::prometheus::SiteMetrics;
use siteflow::source::simulator::{Scenario, Simulator};
use siteflow::table::{CONVERSATIONS, FLOWS};
use siteflow::types::{Format, Messages};
use siteflow::window::WindowSpec;

const BATCH: usize = 8192;

fn spec() -> WindowSpec {
    // The window timing the figures in BENCHMARKS.md were measured with; the rest is the default.
    WindowSpec {
        size: Duration::from_secs(10),
        allowed_lateness: Duration::from_secs(5),
        idle_partition_timeout: Duration::from_secs(30),
        ..Config::default().window_spec()
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

/// One batch of goflow2 JSON flow records from the simulator.
fn flow_batch(rt: &tokio::runtime::Runtime) -> Messages {
    let cfg = SimulatorConfig {
        pace: Pace::Fast,
        start_unix_secs: Some(1_764_000_000),
        duration_secs: Some(3600),
        records_per_sec: 20_000,
        batch_records: BATCH,
        probe_interval_secs: 3600,
        ..Default::default()
    };
    let mut sim = Simulator::new(cfg, spec(), Arc::new(siteflow::inventory::Inventory::embedded()), Scenario::default());
    rt.block_on(async {
        loop {
            let b = sim.next().await.unwrap();
            if b.format == Format::Goflow2Json && b.messages.len() == BATCH {
                return b.messages;
            }
        }
    })
}

fn stages(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let msgs = flow_batch(&rt);
    let enricher =
        Enricher::new(Arc::new(siteflow::inventory::Inventory::embedded()), Sampling { default_rate: 1, overrides: Default::default() });
    let Decoded::Flows(decoded) = decode(Format::Goflow2Json, &msgs, &limits()).0 else { unreachable!() };
    let (enriched, _) = enricher.enrich_flows(&decoded);

    let mut g = c.benchmark_group("stages");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("decode_goflow2_json", |b| b.iter(|| decode(Format::Goflow2Json, &msgs, &limits())));
    g.bench_function("enrich_lpm", |b| b.iter(|| enricher.enrich_flows(&decoded)));
    g.bench_function("window_partial_aggregate", |b| {
        let config = Config::default();
        let res = Resources::load(&config).unwrap();
        let mut windows = rt.block_on(siteflow::pipeline::plan_windows(spec(), &res)).unwrap();
        let flows = res.table_id(&FLOWS).unwrap();
        b.iter(|| rt.block_on(windows.process(flows, 0, &enriched, Instant::now())).unwrap())
    });
    // What the pipeline runs per flow batch: the per-site aggregate and the conversations one.
    g.bench_function("window_partial_aggregate_with_conversations", |b| {
        let config = Config::default();
        let res = Resources::load(&config).unwrap();
        let mut windows = rt.block_on(siteflow::pipeline::plan_windows(spec(), &res)).unwrap();
        let inputs = [(res.table_id(&FLOWS).unwrap(), &enriched), (res.table_id(&CONVERSATIONS).unwrap(), &enriched)];
        b.iter(|| rt.block_on(windows.process_together(0, &inputs, &[], Vec::new(), Instant::now())).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("prometheus");
    g.bench_function("render_242_sites", |b| {
        let config = Config {
            simulator: SimulatorConfig {
                pace: Pace::Fast,
                start_unix_secs: Some(1_764_000_000),
                duration_secs: Some(30),
                ..Default::default()
            },
            ..Config::default()
        };
        let res = Resources::load(&config).unwrap();
        let metrics = Arc::new(PipelineMetrics::new(&Pipeline::FORMATS, &siteflow::table::TABLES));
        let sites = SiteMetrics::new(res.inventory.clone(), 10.0);
        let pipeline = rt.block_on(Pipeline::build(&config, &res, metrics.clone(), vec![Box::new(sites.clone())])).unwrap();
        let readiness = pipeline.readiness();
        let sim = Simulator::new(config.simulator.clone(), spec(), res.inventory.clone(), Scenario::default());
        let (_tx, rx) = tokio::sync::watch::channel(false);
        rt.block_on(siteflow::driver::run_source(sim, pipeline, rx)).unwrap();
        let state = AppState {
            metrics,
            sites,
            ready: Default::default(),
            stopping: Default::default(),
            readiness,
            sql: None,
            meetings_topic: None,
        };
        b.iter(|| render(&state).unwrap().len())
    });
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
