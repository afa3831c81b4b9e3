//! SQL over the Parquet history: 24 hours of 10-second windows for the 242 sites (4.2 M rows of
//! `site_windows`), the questions engineers ask of a day. Run: `cargo bench --bench sql`.
//! Under `cargo test --benches` (no `--bench` flag) one hour is generated, to keep it quick.
//! Figures and method: BENCHMARKS.md.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampNanosecondArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use siteflow::history::{History, HistoryOptions};
use siteflow::inventory::Inventory;
use siteflow::sql::{SqlEngine, SqlLimits};

const WINDOW_NS: i64 = 10_000_000_000;

/// One hour of site windows (both directions), with plausible, varying byte counts.
fn hour(inv: &Inventory, hour_start_ns: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("window_start", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
        Field::new("site", DataType::Utf8, false),
        Field::new("district", DataType::Utf8, false),
        Field::new("level", DataType::Utf8, false),
        Field::new("direction", DataType::Utf8, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("packets", DataType::UInt64, false),
        Field::new("flows", DataType::UInt64, false),
        Field::new("records", DataType::UInt64, false),
    ]));
    let (mut t, mut site, mut district, mut level, mut dir, mut bytes) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut rng = fastrand::Rng::with_seed(hour_start_ns as u64);
    for w in 0..360 {
        for s in inv.sites() {
            for d in ["in", "out"] {
                t.push(hour_start_ns + w * WINDOW_NS);
                site.push(s.id.as_str());
                district.push(s.district.as_str());
                level.push(s.level.as_str());
                dir.push(d);
                bytes.push((s.capacity_bytes_per_sec() * 10.0 * rng.f64() * 0.6) as u64);
            }
        }
    }
    let packets: Vec<u64> = bytes.iter().map(|b| b / 900 + 1).collect();
    let flows: Vec<u64> = bytes.iter().map(|b| b / 50_000 + 1).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(TimestampNanosecondArray::from(t)),
        Arc::new(StringArray::from(site)),
        Arc::new(StringArray::from(district)),
        Arc::new(StringArray::from(level)),
        Arc::new(StringArray::from(dir)),
        Arc::new(UInt64Array::from(bytes)),
        Arc::new(UInt64Array::from(packets)),
        Arc::new(UInt64Array::from(flows.clone())),
        Arc::new(UInt64Array::from(flows)),
    ];
    RecordBatch::try_new(schema, columns).unwrap()
}

fn sql(c: &mut Criterion) {
    let hours = if std::env::args().any(|a| a == "--bench") { 24 } else { 1 };
    let dir = tempfile::tempdir().unwrap();
    let options =
        HistoryOptions { dir: Some(dir.path().to_path_buf()), retention_days: 3650, compact_min_files: usize::MAX, max_memory_rows: 0 };
    let history = History::open(options).unwrap();
    let inv = Arc::new(Inventory::embedded());
    // An hour per flush, as siteflow writes them (history.flush_interval_secs is shorter; fewer
    // files is what compaction leaves of a past day).
    let day_start = 1_764_000_000_000_000_000 / (86_400 * 1_000_000_000) * (86_400 * 1_000_000_000);
    for h in 0..hours {
        history.append("site_windows", &hour(&inv, day_start + h * 3_600_000_000_000));
        history.flush().unwrap();
    }
    // A queue wait long enough that 200 queries at once are all admitted in turn (the default
    // 2 s would refuse some on a slow machine): the bench measures the time to answer them all.
    let limits = SqlLimits {
        max_rows: 1_000_000,
        timeout: Duration::from_secs(60),
        memory_bytes: 512 << 20,
        queue_timeout: Duration::from_secs(120),
        ..SqlLimits::default()
    };
    let engine = SqlEngine::new(inv, history, None, limits, 10.0);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let rows: usize = rt.block_on(engine.query("SELECT count(*) AS n FROM site_windows")).unwrap().1[0].num_rows();
    assert_eq!(rows, 1);

    let mut g = c.benchmark_group(format!("sql_{hours}h_242_sites"));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    let questions = [
        (
            "peak_utilisation_per_site",
            "SELECT w.site, max(window_bits_per_second(w.bytes) / 8 / s.link_bytes_per_second) AS peak \
             FROM site_windows w JOIN sites s ON s.site = w.site GROUP BY w.site ORDER BY peak DESC LIMIT 10",
        ),
        (
            "hourly_bytes_per_district",
            "SELECT date_trunc('hour', window_start) AS hour, district, direction, sum(bytes) AS bytes \
             FROM site_windows GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        ),
        (
            "one_site_day_series",
            "SELECT window_start, bytes FROM site_windows WHERE site = 'meo-vac.pai-lung' AND direction = 'in' ORDER BY window_start",
        ),
    ];
    for (name, q) in questions {
        g.bench_function(name, |b| b.iter(|| rt.block_on(engine.query(q)).unwrap()));
    }
    // A trivial query alone (the per-query cost: session, parse, plan), and 200 at once through
    // admission (sql.max_concurrent at its default): the time until every one is answered.
    g.bench_function("select_1", |b| b.iter(|| rt.block_on(engine.query("SELECT 1 AS one")).unwrap()));
    g.bench_function("select_1_x200_concurrent", |b| {
        b.iter(|| {
            rt.block_on(async {
                let queries = (0..200).map(|_| {
                    let engine = engine.clone();
                    tokio::spawn(async move { engine.query("SELECT 1 AS one").await })
                });
                for q in futures::future::join_all(queries).await {
                    q.unwrap().unwrap();
                }
            })
        })
    });
    g.finish();
}

criterion_group!(benches, sql);
criterion_main!(benches);
