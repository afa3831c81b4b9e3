//! The aggregation lives in the pipeline SQL: a new aggregate column appears in the closed
//! windows and on /metrics without any change to Rust code.

use datafusion::arrow::array::AsArray;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use figment::value::magic::RelativePathBuf;
use siteflow::source::simulator::Scenario;

use crate::support::{fast_config, repo, simulate, write};

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
