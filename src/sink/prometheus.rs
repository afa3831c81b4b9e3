//! Per-site metrics from closed windows, rendered at scrape time from one consistent snapshot.
//!
//! Every numeric column the pipeline SQL selects becomes a metric, so adding an aggregate to the
//! SQL adds a metric with no Rust change. How a table is shown is its declaration's `gauges`
//! (`src/table.rs`); for the shipped tables:
//! - flows: `bytes`, `packets`, `flows`, `records` accumulate into `siteflow_site_<col>_total`
//!   counters; `bytes` and `packets` of the last window also give
//!   `siteflow_site_throughput_{bytes,packets}_per_second`; any other column `c` is the gauge
//!   `siteflow_site_window_<c>` (its value in the last closed window);
//! - probes: each column `c` is the gauge `siteflow_site_probe_<c>` (last closed window);
//! - interfaces: each column `c` is the gauge `siteflow_site_interface_<c>` (last closed window),
//!   labelled also with the SQL's `interface`, `device` and `direction` keys if it has them.
//!
//! Last-window flow gauges tell a quiet site from a silent one (docs/metrics.md, "Quiet, silent
//! and stale"): a site with flows in the window shows them; a site without flows shows 0 when
//! an exporter that has carried its flows reported past the window's end (the exporter is
//! alive and saw nothing of the site), and has no series otherwise (no data is not zero). Probe
//! and interface series exist only for sites with results in the last window. When a table has
//! published no window for the stale limit (the readiness policy's freshness limit, the one
//! that turns verdicts `unknown`), its last-window gauges are dropped: a stopped source draws a
//! gap, never its last figures. Counters stay. Labels: `site`, `district`, `level` and, for
//! flows, `direction`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

use super::WindowSink;
use crate::enrich::Direction;
use crate::inventory::{Inventory, SiteIdx};
use crate::table::{Gauges, TableDef};
use crate::window::{ClosedWindow, ExporterKey, WINDOW_START};

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
    /// Flows: per site, whether the last window has data for it (flows, or a quiet window: see
    /// [`SiteMetrics::apply`]); sites without are left out of the last-window gauges.
    reached: Vec<bool>,
    /// Flows: per site, the end of the newest window in which it had flows.
    last_flows_end_ns: Vec<Option<i64>>,
    /// When the shown window was published (wall clock), to drop its gauges once stale.
    shown_at: Option<Instant>,
    windows: u64,
}

/// Rows of a table keyed by more than site and direction (interfaces): labels and values.
#[derive(Debug, Default)]
struct LabelledRows {
    columns: Vec<String>,
    last: Vec<(Vec<LabelPair>, Vec<f64>)>,
    last_window_end_ns: Option<i64>,
    shown_at: Option<Instant>,
    windows: u64,
}

/// Which exporters carry each site's flows, and how far each exporter's clock has come: what
/// tells a quiet site (its exporter reported past the window and saw nothing of it: 0) from a
/// silent one (its exporters stopped or lag: no data). Learnt from the flow records, so a site
/// reached by prefix through a shared router and a site that is its own router are judged alike.
#[derive(Debug, Default)]
struct ExporterReach {
    /// Newest event time of each exporter's flows.
    newest_ns: HashMap<ExporterKey, i64>,
    /// Per site, the exporters whose flows matched it.
    by_site: Vec<Vec<ExporterKey>>,
}

impl ExporterReach {
    /// Takes the enriched flow records of a micro-batch (`site`, `exporter`, `event_time`).
    fn observe(&mut self, flows: &RecordBatch) {
        use datafusion::arrow::datatypes::{TimestampNanosecondType, UInt16Type};
        let (Some(sites), Some(exporters), Some(times)) = (
            flows.column_by_name("site").and_then(|c| c.as_dictionary_opt::<UInt16Type>()),
            flows.column_by_name("exporter").and_then(|c| c.as_fixed_size_binary_opt()),
            flows.column_by_name("event_time").and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>()),
        ) else {
            return;
        };
        // Records come in runs of one exporter (and often one site): the maps are touched
        // once per run, not per record.
        let mut run: Option<(ExporterKey, i64)> = None;
        let mut pair: Option<(u16, ExporterKey)> = None;
        for row in 0..flows.num_rows() {
            let exporter = exporters.value(row).try_into().map_or(0, ExporterKey::from_be_bytes);
            let time = times.value(row);
            match &mut run {
                Some((e, newest)) if *e == exporter => *newest = (*newest).max(time),
                _ => {
                    if let Some((e, newest)) = run.replace((exporter, time)) {
                        self.note_newest(e, newest);
                    }
                }
            }
            let site = sites.keys().value(row);
            if pair != Some((site, exporter)) {
                pair = Some((site, exporter));
                let site = usize::from(site);
                if self.by_site.len() <= site {
                    self.by_site.resize_with(site + 1, Vec::new);
                }
                if !self.by_site[site].contains(&exporter) {
                    self.by_site[site].push(exporter);
                }
            }
        }
        if let Some((e, newest)) = run {
            self.note_newest(e, newest);
        }
    }

    fn note_newest(&mut self, exporter: ExporterKey, t_ns: i64) {
        let newest = self.newest_ns.entry(exporter).or_insert(i64::MIN);
        *newest = (*newest).max(t_ns);
    }

    /// Whether an exporter that has carried the site's flows has reported at or past `end_ns`.
    fn reached(&self, site: SiteIdx, end_ns: i64) -> bool {
        self.by_site
            .get(usize::from(site))
            .is_some_and(|exporters| exporters.iter().any(|e| self.newest_ns.get(e).is_some_and(|&t| t >= end_ns)))
    }
}

/// What the sink keeps of one table.
#[derive(Debug)]
enum View {
    /// [`Gauges::SiteDirection`] and [`Gauges::Site`].
    Keyed(TableState),
    /// [`Gauges::Rows`].
    Rows(LabelledRows),
}

#[derive(Debug)]
struct State {
    /// The exported tables, in the order they are rendered.
    tables: Vec<(&'static TableDef, View)>,
    reach: ExporterReach,
}

/// What the sink keeps of `table` (created on its first window).
fn view_of<'a>(tables: &'a mut Vec<(&'static TableDef, View)>, table: &'static TableDef) -> &'a mut View {
    let i = match tables.iter().position(|(t, _)| *t == table) {
        Some(i) => i,
        None => {
            let view = match table.gauges {
                Gauges::Rows { .. } => View::Rows(LabelledRows::default()),
                _ => View::Keyed(TableState::default()),
            };
            tables.push((table, view));
            tables.len() - 1
        }
    };
    &mut tables[i].1
}

/// The per-site metrics sink; clone it to share with the HTTP server.
#[derive(Clone)]
pub struct SiteMetrics {
    inventory: Arc<Inventory>,
    window_secs: f64,
    /// A table without a new window for this long has its last-window gauges dropped.
    stale_after: Duration,
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
    /// Gauges go stale after two windows without a new one, the default readiness freshness
    /// limit; [`SiteMetrics::stale_after`] sets the policy's.
    pub fn new(inventory: Arc<Inventory>, window_secs: f64) -> Self {
        let labels = inventory
            .sites()
            .iter()
            .map(|s| vec![label("site", &s.id), label("district", &s.district), label("level", &s.level)])
            .collect();
        Self {
            inventory,
            window_secs,
            stale_after: Duration::from_secs_f64(2.0 * window_secs),
            labels: Arc::new(labels),
            state: Arc::new(RwLock::new(State { tables: Vec::new(), reach: ExporterReach::default() })),
        }
    }

    /// Drops a table's last-window gauges when it has published no window for `limit` (give it
    /// the readiness freshness limit, so a gap in the figures matches an `unknown` verdict).
    pub fn stale_after(mut self, limit: Duration) -> Self {
        self.stale_after = limit;
        self
    }

    fn fresh(&self, shown_at: Option<Instant>) -> bool {
        shown_at.is_some_and(|t| t.elapsed() < self.stale_after)
    }

    fn labels_for(&self, (site, direction): Key) -> Vec<LabelPair> {
        let mut l = self.labels[usize::from(site)].clone();
        if let Some(d) = direction {
            l.push(label("direction", d.as_str()));
        }
        l
    }

    /// Applies a closed window of a [`Gauges::Rows`] table: its rows replace the previous ones
    /// (a window older than the one shown, or a correction of it, changes no gauge unless it is
    /// the one shown).
    fn apply_rows(&self, table: &'static TableDef, label_columns: &[&'static str], w: &ClosedWindow) {
        let shown_end = match view_of(&mut self.state.write().expect("metrics lock").tables, table) {
            View::Rows(rows) => rows.last_window_end_ns,
            View::Keyed(_) => None,
        };
        if shown_end.is_some_and(|e| w.end_ns < e) {
            return;
        }
        let columns = numeric_columns(&w.rows);
        let as_strings = |name: &str| w.rows.column_by_name(name).and_then(|c| cast(c, &DataType::Utf8).ok());
        let sites = as_strings("site");
        let labels: Vec<_> = label_columns.iter().filter_map(|n| as_strings(n).map(|a| (*n, a))).collect();
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
        let View::Rows(t) = view_of(&mut state.tables, table) else { return };
        t.columns = columns;
        t.last = last;
        t.last_window_end_ns = Some(w.end_ns);
        t.shown_at = Some(Instant::now());
        t.windows += u64::from(w.previous.is_none());
    }

    /// Applies one closed window. Counters add the window's rows (for a correction: the
    /// difference from the rows published before); gauges show the newest window only: a site
    /// with flows, or a quiet one (no flows, but its exporter reported past the window and its
    /// flows are fresher than the stale limit, as readiness judges them).
    fn apply(&self, table_def: &'static TableDef, w: &ClosedWindow) {
        let per_direction = match table_def.gauges {
            Gauges::None => return,
            Gauges::Rows { labels, .. } => return self.apply_rows(table_def, labels, w),
            Gauges::Site { .. } => false,
            Gauges::SiteDirection => true,
        };
        let mut state = self.state.write().expect("metrics lock");
        let State { tables, reach } = &mut *state;
        let View::Keyed(table) = view_of(tables, table_def) else { return };
        table.columns = numeric_columns(&w.rows);
        let rows = read_rows(&self.inventory, &w.rows, &table.columns);
        if per_direction {
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
        if per_direction {
            // A site without flows in the window is quiet (0) while an exporter that carried its
            // flows reported past the window's end and its newest flows are within the stale
            // limit (readiness still judges its traffic); otherwise it has no series.
            let n = self.inventory.len();
            table.last_flows_end_ns.resize(n, None);
            let mut with_flows = vec![false; n];
            for (site, _) in table.last.keys() {
                let s = usize::from(*site);
                with_flows[s] = true;
                table.last_flows_end_ns[s] = Some(table.last_flows_end_ns[s].map_or(w.end_ns, |t| t.max(w.end_ns)));
            }
            let limit_ns = i64::try_from(self.stale_after.as_nanos()).unwrap_or(i64::MAX);
            table.reached = (0..n)
                .map(|s| {
                    let fresh = table.last_flows_end_ns[s].is_some_and(|t| w.end_ns.saturating_sub(t) < limit_ns);
                    with_flows[s] || (fresh && reach.reached(s as SiteIdx, w.end_ns))
                })
                .collect();
        }
        table.last_window_end_ns = Some(w.end_ns);
        table.shown_at = Some(Instant::now());
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

    /// The families of a [`Gauges::SiteDirection`] table: last-window gauges of the sites with
    /// data (or quiet), running totals of the additive columns for every site.
    fn collect_site_direction(&self, table_name: &str, flows: &TableState, out: &mut Vec<MetricFamily>) {
        if flows.windows == 0 {
            return;
        }
        let keys = self.all_keys(true);
        // Last-window gauges: sites with data in a window that is not stale (counters: all).
        let fresh = self.fresh(flows.shown_at);
        let shown: Vec<Key> = keys.iter().copied().filter(|(s, _)| fresh && flows.reached.get(usize::from(*s)) == Some(&true)).collect();
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
                let metrics = shown.iter().map(|k| gauge_metric(self.labels_for(*k), value_of(k, i) / self.window_secs)).collect();
                out.push(family(name.into(), help, MetricType::GAUGE, metrics));
            }
            if let Some(idx) = COUNTER_COLUMNS.iter().position(|c| c == col) {
                let metrics =
                    keys.iter().map(|k| counter_metric(self.labels_for(*k), flows.totals.get(k).map_or(0.0, |t| t[idx]))).collect();
                let help = format!("Sum of column {col} of the {table_name} pipeline SQL over all closed windows.");
                out.push(family(format!("siteflow_site_{col}_total"), &help, MetricType::COUNTER, metrics));
            } else {
                let metrics = shown.iter().map(|k| gauge_metric(self.labels_for(*k), value_of(k, i))).collect();
                let help = format!("Column {col} of the {table_name} pipeline SQL in the last closed window.");
                out.push(family(format!("siteflow_site_window_{col}"), &help, MetricType::GAUGE, metrics));
            }
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
        for (table, view) in &state.tables {
            let end = match view {
                View::Keyed(t) => t.last_window_end_ns,
                View::Rows(t) => t.last_window_end_ns,
            };
            if let Some(end) = end {
                last_end.push(gauge_metric(vec![label("table", table.name)], end as f64 / 1e9));
            }
        }
        out.push(family(
            "siteflow_last_closed_window_end_timestamp_seconds".into(),
            "End of the newest closed window (Unix seconds).",
            MetricType::GAUGE,
            last_end,
        ));

        for (table, view) in &state.tables {
            match (table.gauges, view) {
                (Gauges::SiteDirection, View::Keyed(t)) => self.collect_site_direction(table.name, t, &mut out),
                (Gauges::Site { prefix }, View::Keyed(t)) => {
                    if t.windows > 0 && self.fresh(t.shown_at) {
                        for (i, col) in t.columns.iter().enumerate() {
                            // Sites without results in the window have no value: absent, not zero.
                            let metrics = t.last.iter().map(|(k, v)| gauge_metric(self.labels_for(*k), v[i])).collect();
                            let help = format!("Column {col} of the {} pipeline SQL in the last closed window.", table.name);
                            out.push(family(format!("{prefix}{col}"), &help, MetricType::GAUGE, metrics));
                        }
                    }
                }
                (Gauges::Rows { prefix, .. }, View::Rows(t)) => {
                    if t.windows > 0 && self.fresh(t.shown_at) {
                        for (i, col) in t.columns.iter().enumerate() {
                            // Rows without samples in the window have no value.
                            let metrics = t.last.iter().map(|(l, v)| gauge_metric(l.clone(), v[i])).collect();
                            let help = format!("Column {col} of the {} pipeline SQL in the last closed window.", table.name);
                            out.push(family(format!("{prefix}{col}"), &help, MetricType::GAUGE, metrics));
                        }
                    }
                }
                _ => {}
            }
        }
        // A family without series is not valid exposition text (e.g. no probe results in the window).
        out.retain(|f| !f.get_metric().is_empty());
        out
    }
}

impl WindowSink for SiteMetrics {
    fn on_window(&mut self, table: &'static TableDef, window: &ClosedWindow) {
        self.apply(table, window);
    }

    fn on_flows(&mut self, flows: &RecordBatch) {
        self.state.write().expect("metrics lock").reach.observe(flows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{FLOWS, INTERFACES};
    use datafusion::arrow::array::{Float64Array, StringArray, UInt64Array};
    use datafusion::arrow::datatypes::{Field, Schema};

    const S: i64 = 1_000_000_000;

    /// Enriched flow records as the pipeline hands them to sinks: (site, exporter's last octet, event time).
    fn enriched_flows(inventory: &Inventory, records: &[(&str, u8, i64)]) -> RecordBatch {
        use datafusion::arrow::array::{DictionaryArray, FixedSizeBinaryArray, TimestampNanosecondArray, UInt16Array};
        let site_ids: Vec<&str> = inventory.sites().iter().map(|s| s.id.as_str()).collect();
        let keys: UInt16Array = records.iter().map(|(site, _, _)| inventory.by_id(site).expect("known site")).collect();
        let sites = DictionaryArray::try_new(keys, Arc::new(StringArray::from(site_ids))).unwrap();
        let exporters = FixedSizeBinaryArray::try_from_iter(records.iter().map(|(_, e, _)| {
            let mut a = [0u8; 16];
            a[15] = *e;
            a
        }))
        .unwrap();
        let times = TimestampNanosecondArray::from(records.iter().map(|r| r.2).collect::<Vec<_>>());
        RecordBatch::try_from_iter(vec![
            ("site", Arc::new(sites) as datafusion::arrow::array::ArrayRef),
            ("exporter", Arc::new(exporters)),
            ("event_time", Arc::new(times)),
        ])
        .unwrap()
    }

    /// A closed flows window with `bytes` per (site, direction).
    fn flows_window(start_s: i64, rows: &[(&str, &str, u64)]) -> ClosedWindow {
        let schema = Arc::new(Schema::new(vec![
            Field::new("site", DataType::Utf8, false),
            Field::new("direction", DataType::Utf8, false),
            Field::new("bytes", DataType::UInt64, false),
        ]));
        let rows = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(StringArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                Arc::new(UInt64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
            ],
        )
        .unwrap();
        ClosedWindow {
            table: "flows".into(),
            table_id: 0,
            start_ns: start_s * S,
            end_ns: (start_s + 10) * S,
            rows,
            closed_by: Instant::now(),
            previous: None,
        }
    }

    /// `site/direction` → value of a family's series.
    fn series(families: &[MetricFamily], name: &str) -> std::collections::BTreeMap<String, f64> {
        let Some(f) = families.iter().find(|f| f.name() == name) else { return Default::default() };
        f.get_metric()
            .iter()
            .map(|m| {
                let l = |n: &str| m.get_label().iter().find(|l| l.name() == n).map(|l| l.value().to_string()).unwrap_or_default();
                let v = if f.get_field_type() == MetricType::COUNTER { m.get_counter().get_value() } else { m.get_gauge().get_value() };
                (format!("{}/{}", l("site"), l("direction")), v)
            })
            .collect()
    }

    #[test]
    fn a_quiet_site_shows_zero_until_its_flows_are_stale_and_a_silent_one_no_series() {
        let inventory = Arc::new(Inventory::embedded());
        let mut metrics = SiteMetrics::new(inventory.clone(), 10.0);
        let (quiet, busy, silent) = ("tinh.vp-ubnd", "tinh.vp-tinh-uy", "tinh.ban-to-chuc");
        // Window [0, 10): exporter 1 (a shared router) carries `quiet` and `busy`, exporter 2 `silent`.
        metrics.on_flows(&enriched_flows(&inventory, &[(quiet, 1, 2 * S), (busy, 1, 3 * S), (silent, 2, 4 * S)]));
        // Both exporters report past the window's end, so it closes.
        metrics.on_flows(&enriched_flows(&inventory, &[(busy, 1, 12 * S), (silent, 2, 12 * S)]));
        metrics.on_window(&FLOWS, &flows_window(0, &[(quiet, "in", 100), (busy, "in", 200), (silent, "out", 300)]));
        let first = series(&metrics.collect(), "siteflow_site_throughput_bytes_per_second");
        assert_eq!(first[&format!("{quiet}/in")], 10.0);
        assert_eq!(first[&format!("{silent}/out")], 30.0);
        assert_eq!(first[&format!("{silent}/in")], 0.0, "a site with flows has both directions");
        assert!(!first.contains_key("tinh.ban-dan-van/in"), "a site no exporter has carried has no series: {first:?}");

        // Window [10, 20): exporter 1 goes on with `busy` only; exporter 2 stopped at 12 s.
        metrics.on_flows(&enriched_flows(&inventory, &[(busy, 1, 21 * S)]));
        metrics.on_window(&FLOWS, &flows_window(10, &[(busy, "in", 500)]));
        let families = metrics.collect();
        let second = series(&families, "siteflow_site_throughput_bytes_per_second");
        assert_eq!(second[&format!("{busy}/in")], 50.0);
        assert_eq!(second[&format!("{quiet}/in")], 0.0, "its exporter reported past the window: quiet, zero");
        assert_eq!(second[&format!("{quiet}/out")], 0.0);
        assert!(!second.contains_key(&format!("{silent}/in")) && !second.contains_key(&format!("{silent}/out")), "no data: {second:?}");
        let totals = series(&families, "siteflow_site_bytes_total");
        assert_eq!(totals[&format!("{silent}/out")], 300.0, "counters keep every site's sum");

        // A correction of the shown window with the stopped exporter's late records brings it back.
        let mut correction = flows_window(10, &[(busy, "in", 500), (silent, "in", 70)]);
        correction.previous = Some(flows_window(10, &[(busy, "in", 500)]).rows);
        metrics.on_window(&FLOWS, &correction);
        assert_eq!(series(&metrics.collect(), "siteflow_site_throughput_bytes_per_second")[&format!("{silent}/in")], 7.0);

        // Window [20, 30): the quiet site's newest flows (window [0, 10)) are two windows old,
        // the stale limit: readiness calls its traffic stale, and its series goes too.
        metrics.on_flows(&enriched_flows(&inventory, &[(busy, 1, 31 * S)]));
        metrics.on_window(&FLOWS, &flows_window(20, &[(busy, "in", 800)]));
        let third = series(&metrics.collect(), "siteflow_site_throughput_bytes_per_second");
        assert_eq!(third[&format!("{busy}/in")], 80.0);
        assert!(!third.contains_key(&format!("{quiet}/in")) && !third.contains_key(&format!("{silent}/in")), "{third:?}");
    }

    #[test]
    fn last_window_gauges_are_dropped_once_no_window_came_for_the_stale_limit() {
        let inventory = Arc::new(Inventory::embedded());
        let mut metrics = SiteMetrics::new(inventory.clone(), 10.0).stale_after(Duration::from_millis(300));
        metrics.on_flows(&enriched_flows(&inventory, &[("tinh.vp-ubnd", 1, 2 * S), ("tinh.vp-ubnd", 1, 12 * S)]));
        metrics.on_window(&FLOWS, &flows_window(0, &[("tinh.vp-ubnd", "in", 100)]));
        let rate = |m: &SiteMetrics| series(&m.collect(), "siteflow_site_throughput_bytes_per_second").get("tinh.vp-ubnd/in").copied();
        assert_eq!(rate(&metrics), Some(10.0));
        let deadline = Instant::now() + Duration::from_secs(30);
        while rate(&metrics).is_some() {
            assert!(Instant::now() < deadline, "the gauge outlived its stale limit");
            std::thread::sleep(Duration::from_millis(50));
        }
        let families = metrics.collect();
        assert_eq!(series(&families, "siteflow_site_bytes_total")["tinh.vp-ubnd/in"], 100.0, "counters stay");
        assert!(families.iter().any(|f| f.name() == "siteflow_last_closed_window_end_timestamp_seconds"), "what shows the staleness stays");
    }

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
            table_id: 2,
            start_ns: 0,
            end_ns: 10,
            rows,
            closed_by: std::time::Instant::now(),
            previous: None,
        };
        metrics.apply(&INTERFACES, &window);
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
