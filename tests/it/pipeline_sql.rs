//! The aggregation lives in the pipeline SQL: a new aggregate column appears in the closed
//! windows and on /metrics without any change to Rust code.

use std::collections::BTreeMap;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use figment::value::magic::RelativePathBuf;
use siteflow::source::simulator::Scenario;
use siteflow::table::{CONVERSATIONS, FLOWS, Gauges, INTERFACES, Input, PROBES, ReadinessFeed, TableDef};

use crate::support::{fast_config, repo, simulate, simulate_tables_with_sql, write};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_aggregate_column_reaches_the_output_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(repo().join("pipelines/hagiang/flows.sql")).unwrap();
    let changed = shipped.replace("count(*)     AS records", "count(*)     AS records,\n    max(bytes)   AS largest_flow_bytes");
    assert_ne!(shipped, changed, "the shipped SQL still has the line this test extends");
    let sql = write(dir.path(), "flows.sql", &changed);

    let mut config = fast_config(60, 500);
    config.pipeline.flows_sql = Some(RelativePathBuf::from(sql));
    let run = simulate(&config, Scenario::default()).await;

    let flows: Vec<_> = run.windows.iter().filter(|w| &*w.table == "flows" && w.rows.num_rows() > 0).collect();
    assert!(!flows.is_empty());
    for w in flows {
        let largest = cast(w.rows.column_by_name("largest_flow_bytes").expect("new column in the output"), &DataType::Int64).unwrap();
        let bytes = cast(w.rows.column_by_name("bytes").unwrap(), &DataType::Int64).unwrap();
        for (l, b) in largest.as_primitive::<Int64Type>().values().iter().zip(bytes.as_primitive::<Int64Type>().values()) {
            assert!(*l > 0 && l <= b, "max of a group ({l}) is positive and at most its sum ({b})");
        }
    }
    let families = run.sites.collect();
    let family = families.iter().find(|f| f.name() == "siteflow_site_window_largest_flow_bytes").expect("exported as a metric");
    assert_eq!(family.get_metric().len(), 484);
}

/// A fifth table, declared here as CONTRIBUTING.md shows: nothing else in siteflow changes.
static SITE_TOTALS: TableDef = TableDef {
    name: "site_totals",
    input: Input::Flows,
    embedded_sql: include_str!("../data/site_totals.sql"),
    embedded_path: "tests/data/site_totals.sql",
    config_key: "site_totals_sql",
    sql_table: "site_totals",
    required_columns: &["site", "bytes"],
    allowed_keys: &["window_start", "site"],
    gauges: Gauges::Site { prefix: "siteflow_test_site_total_" },
    readiness: ReadinessFeed::None,
    second_view: true,
    results_log: true,
    top_talkers: false,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_by_one_declaration_reaches_windows_sql_and_metrics_with_exact_totals() {
    let tables = [&FLOWS, &CONVERSATIONS, &INTERFACES, &PROBES, &SITE_TOTALS];
    let mut config = fast_config(120, 800);
    config.simulator.out_of_order_ratio = 0.05;
    config.simulator.unmatched_ratio = 0.02;
    let (run, sql) = simulate_tables_with_sql(&config, Scenario::default(), &tables).await;

    // Ground truth: the simulator's own tally per site and window, both directions summed.
    let inventory = siteflow::inventory::Inventory::embedded();
    let mut truth: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for ((site, _direction, start), tally) in &run.truth.flows {
        *truth.entry((inventory.sites()[usize::from(*site)].id.clone(), *start)).or_default() += tally.bytes;
    }
    let truth_total: u64 = truth.values().sum();
    assert!(truth_total > 0 && truth.len() > 242, "the run carried traffic: {} site-windows", truth.len());

    // Closed windows of the new table, as last published.
    let mut got: BTreeMap<(String, i64), u64> = BTreeMap::new();
    let windows: Vec<_> = run.windows.iter().filter(|w| &*w.table == "site_totals").collect();
    assert!(!windows.is_empty(), "the new table's windows close");
    for w in windows {
        got.retain(|(_, start), _| *start != w.start_ns);
        let sites = cast(w.rows.column_by_name("site").unwrap(), &DataType::Utf8).unwrap();
        let bytes = cast(w.rows.column_by_name("bytes").unwrap(), &DataType::Int64).unwrap();
        for (site, bytes) in sites.as_string::<i32>().iter().zip(bytes.as_primitive::<Int64Type>().values()) {
            got.insert((site.unwrap().to_string(), w.start_ns), *bytes as u64);
        }
    }
    assert_eq!(got, truth, "bytes per site and window equal the simulator's tally");

    // SQL: the table is queryable under its declared name, with the same total.
    let (_, batches) = sql.query("SELECT CAST(sum(bytes) AS BIGINT) AS bytes, count(*) AS rows FROM site_totals").await.unwrap();
    let sql_bytes = batches[0].column(0).as_primitive::<Int64Type>().value(0) as u64;
    assert_eq!(sql_bytes, truth_total, "SQL sum over site_totals equals the ground truth");

    // /metrics: its columns are gauges under the declared prefix, one series per site with flows.
    let families = run.sites.collect();
    let family = families.iter().find(|f| f.name() == "siteflow_test_site_total_bytes").expect("exported under its prefix");
    assert!(family.get_metric().len() > 200 && family.get_metric().len() <= 242, "{} series", family.get_metric().len());

    // Its records are not counted twice: unmatched flows count under `flows` only.
    let unmatched = |table: &str| run.metrics.records_unmatched.with_label_values(&[table]).get();
    assert_eq!(unmatched("flows"), run.truth.unmatched_flows);
    assert!(unmatched("flows") > 0);
    assert_eq!(unmatched("site_totals"), 0, "a second view counts no unmatched records of its own");
}
