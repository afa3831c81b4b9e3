//! Per-site metrics from closed windows, rendered at scrape time from one consistent snapshot.
//!
//! Every numeric column the pipeline SQL selects becomes a metric, so adding an aggregate to the
//! SQL adds a metric with no Rust change:
//! - flows: `bytes`, `packets`, `flows`, `records` accumulate into `siteflow_site_<col>_total`
//!   counters; `bytes` and `packets` of the last window also give
//!   `siteflow_site_throughput_{bytes,packets}_per_second`; any other column `c` is the gauge
//!   `siteflow_site_window_<c>` (its value in the last closed window);
//! - probes: each column `c` is the gauge `siteflow_site_probe_<c>` (last closed window);
//! - interfaces: each column `c` is the gauge `siteflow_site_interface_<c>` (last closed window),
//!   labelled also with the SQL's `interface`, `device` and `direction` keys if it has them.
//!
//! Traffic series exist for every site of the inventory (zero when a site sent nothing in the
//! window); probe series only for sites with probe results in the last window (no result is no
//! value, not zero). Labels: `site`, `district`, `level` and, for flows, `direction`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

use super::WindowSink;
use crate::enrich::Direction;
use crate::inventory::{Inventory, SiteIdx};
use crate::window::{ClosedWindow, WINDOW_START};

/// Flow columns that are additive and so exported as counters.
const COUNTER_COLUMNS: [&str; 4] = ["bytes", "packets", "flows", "records"];
/// Key columns: labels, not values.
const KEY_COLUMNS: [&str; 5] = [WINDOW_START, "site", "district", "level", "direction"];

type Key = (SiteIdx, Option<Direction>);

#[derive(Debug, Default)]
struct TableState {
    /// Numeric value columns, in output order.
    columns: Vec<String>,
    /// Values per key in the last closed window.
    last: HashMap<Key, Vec<f64>>,
    /// Running sums per key of the counter columns (flows only).
    totals: HashMap<Key, Vec<f64>>,
    last_window_end_ns: Option<i64>,
    windows: u64,
}

/// Rows of a table keyed by more than site and direction (interfaces): labels and values.
#[derive(Debug, Default)]
struct LabelledRows {
    columns: Vec<String>,
    last: Vec<(Vec<LabelPair>, Vec<f64>)>,
    last_window_end_ns: Option<i64>,
    windows: u64,
}

/// String key columns of the interfaces SQL that become labels.
const INTERFACE_LABELS: [&str; 3] = ["interface", "device", "direction"];

#[derive(Debug)]
struct State {
    flows: TableState,
    probes: TableState,
    interfaces: LabelledRows,
}

/// The per-site metrics sink; clone it to share with the HTTP server.
#[derive(Clone)]
pub struct SiteMetrics {
    inventory: Arc<Inventory>,
    window_secs: f64,
    labels: Arc<Vec<Vec<LabelPair>>>,
    state: Arc<RwLock<State>>,
}

pub(crate) fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

pub(crate) fn family(name: String, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name);
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

pub(crate) fn gauge_metric(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::from_label(labels);
    m.set_gauge(g);
    m
}

pub(crate) fn counter_metric(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value);
    let mut m = Metric::from_label(labels);
    m.set_counter(c);
    m
}

/// One row of Float64 columns (NaN where null).
fn row_values(columns: &[datafusion::arrow::array::ArrayRef], row: usize) -> Vec<f64> {
    columns
        .iter()
        .map(|a| {
            let a = a.as_primitive::<Float64Type>();
            if a.is_valid(row) { a.value(row) } else { f64::NAN }
        })
        .collect()
}

/// Reads the rows of a closed window as (key, numeric values) pairs.
fn read_rows(inventory: &Inventory, rows: &RecordBatch, columns: &[String]) -> Vec<(Key, Vec<f64>)> {
    let as_strings = |name: &str| rows.column_by_name(name).and_then(|c| cast(c, &DataType::Utf8).ok());
    let Some(sites) = as_strings("site") else { return Vec::new() };
    let sites = sites.as_string::<i32>();
    let directions = as_strings("direction");
    let directions = directions.as_ref().map(|d| d.as_string::<i32>());
    let values: Vec<_> = columns
        .iter()
        .map(|c| cast(rows.column_by_name(c).expect("column listed from schema"), &DataType::Float64).expect("numeric column"))
        .collect();
    let mut out = Vec::with_capacity(rows.num_rows());
    for row in 0..rows.num_rows() {
        let Some(site) = sites.is_valid(row).then(|| inventory.by_id(sites.value(row))).flatten() else { continue };
        let direction = match directions {
            Some(d) => match d.is_valid(row).then(|| d.value(row)) {
                Some("in") => Some(Direction::In),
                Some("out") => Some(Direction::Out),
                _ => continue,
            },
            None => None,
        };
        out.push(((site, direction), row_values(&values, row)));
    }
    out
}

fn numeric_columns(rows: &RecordBatch) -> Vec<String> {
    rows.schema()
        .fields()
        .iter()
        .filter(|f| !KEY_COLUMNS.contains(&f.name().as_str()) && (f.data_type().is_numeric()))
        .map(|f| f.name().clone())
        .collect()
}

impl SiteMetrics {
    pub fn new(inventory: Arc<Inventory>, window_secs: f64) -> Self {
        let labels = inventory
            .sites()
            .iter()
            .map(|s| vec![label("site", &s.id), label("district", &s.district), label("level", &s.level)])
            .collect();
        Self {
            inventory,
            window_secs,
            labels: Arc::new(labels),
            state: Arc::new(RwLock::new(State {
                flows: TableState::default(),
                probes: TableState::default(),
                interfaces: LabelledRows::default(),
            })),
        }
    }

    fn labels_for(&self, (site, direction): Key) -> Vec<LabelPair> {
        let mut l = self.labels[usize::from(site)].clone();
        if let Some(d) = direction {
            l.push(label("direction", d.as_str()));
        }
        l
    }

    /// Applies a closed window of the interfaces table: its rows replace the previous ones
    /// (a window older than the one shown, or a correction of it, changes no gauge unless it is
    /// the one shown).
    fn apply_interfaces(&self, w: &ClosedWindow) {
        if self.state.read().expect("metrics lock").interfaces.last_window_end_ns.is_some_and(|e| w.end_ns < e) {
            return;
        }
        let columns = numeric_columns(&w.rows);
        let as_strings = |name: &str| w.rows.column_by_name(name).and_then(|c| cast(c, &DataType::Utf8).ok());
        let sites = as_strings("site");
        let labels: Vec<_> = INTERFACE_LABELS.iter().filter_map(|n| as_strings(n).map(|a| (*n, a))).collect();
        let values: Vec<_> = columns
            .iter()
            .map(|c| cast(w.rows.column_by_name(c).expect("column listed from schema"), &DataType::Float64).expect("numeric column"))
            .collect();
        let mut last = Vec::with_capacity(w.rows.num_rows());
        if let Some(sites) = &sites {
            let sites = sites.as_string::<i32>();
            for row in 0..w.rows.num_rows() {
                let Some(site) = sites.is_valid(row).then(|| self.inventory.by_id(sites.value(row))).flatten() else { continue };
                let mut l = self.labels[usize::from(site)].clone();
                for (name, a) in &labels {
                    let a = a.as_string::<i32>();
                    l.push(label(name, if a.is_valid(row) { a.value(row) } else { "" }));
                }
                last.push((l, row_values(&values, row)));
            }
        }
        let mut state = self.state.write().expect("metrics lock");
        let t = &mut state.interfaces;
        t.columns = columns;
        t.last = last;
        t.last_window_end_ns = Some(w.end_ns);
        t.windows += u64::from(w.previous.is_none());
    }

    /// Applies one closed window. Counters add the window's rows (for a correction: the
    /// difference from the rows published before); gauges show the newest window only.
    fn apply(&self, w: &ClosedWindow) {
        if &*w.table == "interfaces" {
            return self.apply_interfaces(w);
        }
        let mut state = self.state.write().expect("metrics lock");
        let table = match &*w.table {
            "flows" => &mut state.flows,
            "probes" => &mut state.probes,
            _ => return,
        };
        table.columns = numeric_columns(&w.rows);
        let rows = read_rows(&self.inventory, &w.rows, &table.columns);
        if &*w.table == "flows" {
            let mut add = |rows: &[(Key, Vec<f64>)], sign: f64| {
                for (key, values) in rows {
                    let totals = table.totals.entry(*key).or_insert_with(|| vec![0.0; COUNTER_COLUMNS.len()]);
                    for (col, value) in table.columns.iter().zip(values) {
                        if let Some(idx) = COUNTER_COLUMNS.iter().position(|c| c == col)
                            && value.is_finite()
                        {
                            totals[idx] += sign * value;
                        }
                    }
                }
            };
            add(&rows, 1.0);
            if let Some(previous) = &w.previous {
                add(&read_rows(&self.inventory, previous, &table.columns), -1.0);
            }
        }
        if table.last_window_end_ns.is_some_and(|e| w.end_ns < e) {
            return;
        }
        table.last = rows.into_iter().collect();
        table.last_window_end_ns = Some(w.end_ns);
        table.windows += u64::from(w.previous.is_none());
    }

    /// Every site key of a table: all sites, with both directions for flows.
    fn all_keys(&self, with_direction: bool) -> Vec<Key> {
        let n = self.inventory.len() as SiteIdx;
        if with_direction {
            (0..n).flat_map(|s| Direction::ALL.into_iter().map(move |d| (s, Some(d)))).collect()
        } else {
            (0..n).map(|s| (s, None)).collect()
        }
    }

    /// Renders the snapshot as metric families.
    pub fn collect(&self) -> Vec<MetricFamily> {
        let state = self.state.read().expect("metrics lock");
        let mut out = Vec::new();

        let capacity = self
            .inventory
            .sites()
            .iter()
            .enumerate()
            .map(|(i, s)| gauge_metric(self.labels[i].clone(), s.capacity_bytes_per_sec()))
            .collect();
        out.push(family(
            "siteflow_site_link_capacity_bytes_per_second".into(),
            "Link capacity of the site, each way, from the inventory.",
            MetricType::GAUGE,
            capacity,
        ));

        let mut last_end = Vec::new();
        let ends = [
            ("flows", state.flows.last_window_end_ns),
            ("probes", state.probes.last_window_end_ns),
            ("interfaces", state.interfaces.last_window_end_ns),
        ];
        for (name, end) in ends {
            if let Some(end) = end {
                last_end.push(gauge_metric(vec![label("table", name)], end as f64 / 1e9));
            }
        }
        out.push(family(
            "siteflow_last_closed_window_end_timestamp_seconds".into(),
            "End of the newest closed window (Unix seconds).",
            MetricType::GAUGE,
            last_end,
        ));

        let flows = &state.flows;
        if flows.windows > 0 {
            let keys = self.all_keys(true);
            let value_of = |key: &Key, col: usize| flows.last.get(key).map_or(0.0, |v| v[col]);
            for (i, col) in flows.columns.iter().enumerate() {
                let rate_name = match col.as_str() {
                    "bytes" => Some((
                        "siteflow_site_throughput_bytes_per_second",
                        "Bytes per second in the last closed window, corrected for sampling.",
                    )),
                    "packets" => Some((
                        "siteflow_site_throughput_packets_per_second",
                        "Packets per second in the last closed window, corrected for sampling.",
                    )),
                    _ => None,
                };
                if let Some((name, help)) = rate_name {
                    let metrics = keys.iter().map(|k| gauge_metric(self.labels_for(*k), value_of(k, i) / self.window_secs)).collect();
                    out.push(family(name.into(), help, MetricType::GAUGE, metrics));
                }
                if let Some(idx) = COUNTER_COLUMNS.iter().position(|c| c == col) {
                    let metrics =
                        keys.iter().map(|k| counter_metric(self.labels_for(*k), flows.totals.get(k).map_or(0.0, |t| t[idx]))).collect();
                    let help = format!("Sum of column {col} of the flows pipeline SQL over all closed windows.");
                    out.push(family(format!("siteflow_site_{col}_total"), &help, MetricType::COUNTER, metrics));
                } else {
                    let metrics = keys.iter().map(|k| gauge_metric(self.labels_for(*k), value_of(k, i))).collect();
                    let help = format!("Column {col} of the flows pipeline SQL in the last closed window.");
                    out.push(family(format!("siteflow_site_window_{col}"), &help, MetricType::GAUGE, metrics));
                }
            }
        }

        let probes = &state.probes;
        if probes.windows > 0 {
            for (i, col) in probes.columns.iter().enumerate() {
                // Sites without probe results in the window have no value: absent, not zero.
                let metrics = probes.last.iter().map(|(k, v)| gauge_metric(self.labels_for(*k), v[i])).collect();
                let help = format!("Column {col} of the probes pipeline SQL in the last closed window.");
                out.push(family(format!("siteflow_site_probe_{col}"), &help, MetricType::GAUGE, metrics));
            }
        }

        let interfaces = &state.interfaces;
        if interfaces.windows > 0 {
            for (i, col) in interfaces.columns.iter().enumerate() {
                // Interfaces without counter samples in the window have no value.
                let metrics = interfaces.last.iter().map(|(l, v)| gauge_metric(l.clone(), v[i])).collect();
                let help = format!("Column {col} of the interfaces pipeline SQL in the last closed window.");
                out.push(family(format!("siteflow_site_interface_{col}"), &help, MetricType::GAUGE, metrics));
            }
        }
        // A family without series is not valid exposition text (e.g. no probe results in the window).
        out.retain(|f| !f.get_metric().is_empty());
        out
    }
}

impl WindowSink for SiteMetrics {
    fn on_window(&mut self, window: &ClosedWindow) {
        self.apply(window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Float64Array, StringArray, UInt64Array};
    use datafusion::arrow::datatypes::{Field, Schema};

    #[test]
    fn interface_rows_become_gauges_labelled_by_interface_and_direction() {
        let metrics = SiteMetrics::new(Arc::new(Inventory::embedded()), 10.0);
        let schema = Arc::new(Schema::new(vec![
            Field::new("site", DataType::Utf8, false),
            Field::new("interface", DataType::Utf8, false),
            Field::new("direction", DataType::Utf8, false),
            Field::new("bytes", DataType::UInt64, false),
            Field::new("bytes_per_second", DataType::Float64, false),
        ]));
        let rows = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["tinh.vp-ubnd", "tinh.vp-ubnd", "no-such-site"])),
                Arc::new(StringArray::from(vec!["eth1", "eth1", "eth0"])),
                Arc::new(StringArray::from(vec!["in", "out", "in"])),
                Arc::new(UInt64Array::from(vec![5_000, 1_000, 7])),
                Arc::new(Float64Array::from(vec![500.0, 100.0, 0.7])),
            ],
        )
        .unwrap();
        let window = ClosedWindow {
            table: "interfaces".into(),
            start_ns: 0,
            end_ns: 10,
            rows,
            closed_by: std::time::Instant::now(),
            previous: None,
        };
        metrics.apply(&window);
        let families = metrics.collect();
        let rate = families.iter().find(|f| f.name() == "siteflow_site_interface_bytes_per_second").expect("rate family");
        let mut seen: Vec<(String, f64)> = rate
            .get_metric()
            .iter()
            .map(|m| {
                let l = |n: &str| m.get_label().iter().find(|l| l.name() == n).map(|l| l.value().to_string()).unwrap_or_default();
                (format!("{}/{}/{}", l("site"), l("interface"), l("direction")), m.get_gauge().get_value())
            })
            .collect();
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(seen, vec![("tinh.vp-ubnd/eth1/in".into(), 500.0), ("tinh.vp-ubnd/eth1/out".into(), 100.0)]);
        assert!(families.iter().any(|f| f.name() == "siteflow_site_interface_bytes"));
    }
}
