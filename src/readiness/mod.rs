//! Video-conference readiness: per site, at every closed window, each policy row (RTT, jitter,
//! loss, MOS, utilisation, spare capacity, freshness) is evaluated over the rolling period and
//! the verdict is the worst row. Probe percentiles come from hdrhistogram over the period's
//! samples; traffic from the closed flow windows.

pub mod connection;
pub mod emodel;
pub mod hysteresis;
pub mod maintenance;
pub mod meetings;
pub mod policy;

use std::collections::VecDeque;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, TimestampNanosecondType};
use serde::{Deserialize, Serialize};

pub use hysteresis::{HeldLevel, Level};
pub use meetings::{Meeting, MeetingSpec};
pub use policy::{Metric, Policy, PolicyError};

use crate::inventory::{Inventory, SiteIdx};

/// A site's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ready,
    Degraded,
    NotReady,
    Unknown,
}

impl Verdict {
    pub const ALL: [Verdict; 4] = [Verdict::Ready, Verdict::Degraded, Verdict::NotReady, Verdict::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ready => "ready",
            Verdict::Degraded => "degraded",
            Verdict::NotReady => "not_ready",
            Verdict::Unknown => "unknown",
        }
    }

    fn of(level: Level) -> Self {
        match level {
            Level::Ready => Verdict::Ready,
            Level::Degraded => Verdict::Degraded,
            Level::NotReady => Verdict::NotReady,
        }
    }
}

/// Why a row is shown at its level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The value is past the level's threshold.
    OverThreshold,
    /// The value is back within the threshold but not yet past the clear level.
    Hysteresis,
    /// The value is past the clear level; the change waits out the hold time.
    Hold,
    /// Freshness: telemetry older than the limit.
    Stale,
    /// Freshness: a kind of telemetry is missing from the period.
    Missing,
    /// Connection: every uplink of the site reports its link down.
    LinkDown,
    /// Connection: the site's probe rounds are lost (docs/readiness.md, connection status).
    Unreachable,
    /// Connection: down with a site above it in the hierarchy.
    UpstreamDown,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::OverThreshold => "over_threshold",
            Cause::Hysteresis => "hysteresis",
            Cause::Hold => "hold",
            Cause::Stale => "stale",
            Cause::Missing => "missing",
            Cause::LinkDown => "link_down",
            Cause::Unreachable => "unreachable",
            Cause::UpstreamDown => "upstream_down",
        }
    }
}

/// Why a row is not ready: which metric, its value, the threshold of its level, whether it is
/// over that threshold or held (hysteresis, hold time), and the level it must pass to clear.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    pub metric: Metric,
    pub level: Level,
    /// The row's value; for freshness, the staler telemetry's age in seconds (null if never seen).
    #[serde(deserialize_with = "nan_if_null")]
    pub value: f64,
    pub threshold: f64,
    pub cause: Cause,
    /// The value the row must pass to improve (none for freshness).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clear: Option<f64>,
    /// In words: what is missing or stale, or how much of the hold time has run.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// JSON has no NaN: serde_json writes it as null; read null back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A row's value as a reason shows it: four decimals, or in words when there is no number to
/// show (an infinite or NaN figure reads as `inf`/`NaN`, which tells an operator nothing).
fn reason_value(metric: Metric, value: f64) -> String {
    if value.is_finite() {
        return format!("{value:.4}");
    }
    match metric {
        Metric::Rtt | Metric::Jitter | Metric::Loss | Metric::Mos => "none (no probe answered)".into(),
        Metric::Utilisation | Metric::SpareCapacity => "none (no traffic figure)".into(),
        Metric::Freshness => "none (never received)".into(),
        Metric::Connection => "down".into(),
    }
}

/// A threshold or clear level as a reason shows it (`no limit` when unbounded).
fn reason_limit(v: f64) -> String {
    if v.is_finite() { policy::num(v) } else { "none (no limit)".into() }
}

impl std::fmt::Display for Reason {
    /// `metric=value`, then why: e.g. `rtt=0.4500 over not_ready threshold 0.3, clears at 0.27`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.metric.as_str();
        let level = if self.level == Level::NotReady { "not_ready" } else { "degraded" };
        let clear = self.clear.map_or(String::new(), |c| format!(", clears at {}", reason_limit(c)));
        let threshold = reason_limit(self.threshold);
        let value = reason_value(self.metric, self.value);
        match self.cause {
            Cause::OverThreshold => write!(f, "{m}={value} over {level} threshold {threshold}{clear}"),
            Cause::Hysteresis => write!(f, "{m}={value} held by hysteresis (within {level} threshold {threshold}{clear})"),
            Cause::Hold => write!(f, "{m}={value} held by the hold time ({}{clear})", self.detail),
            Cause::Stale => write!(f, "{m}: {} (limit {threshold} s)", self.detail),
            Cause::Missing => write!(f, "{m}: missing {}", self.detail),
            Cause::LinkDown | Cause::Unreachable | Cause::UpstreamDown => write!(f, "{m}: down ({})", self.detail),
        }
    }
}

/// Probe statistics over the rolling period.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeStats {
    pub samples: usize,
    pub rtt_p50_seconds: f64,
    pub rtt_p95_seconds: f64,
    pub rtt_p99_seconds: f64,
    pub jitter_p95_seconds: f64,
    pub loss_max_ratio: f64,
    pub mos_p5: f64,
}

/// Traffic statistics over the rolling period, per direction (`[in, out]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrafficStats {
    /// Where the bytes come from: `counters` (the uplinks' octet counters, exact) or `flows`.
    #[serde(default)]
    pub source: String,
    /// The capacity utilisation is measured against, bytes per second each way: the uplinks'
    /// reported speed with counters, else the inventory's `link_mbps`.
    #[serde(default)]
    pub capacity_bytes_per_second: f64,
    pub windows: usize,
    pub utilisation_mean_ratio: [f64; 2],
    pub spare_min_bytes_per_second: [f64; 2],
}

/// The latest evaluation of one site. Serialised for `/api/readiness` and, in a scale-out, the
/// readiness topic, where the other site-stage instances read it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteReadiness {
    pub site: String,
    pub name: String,
    pub district: String,
    pub level: String,
    pub verdict: Verdict,
    pub reasons: Vec<Reason>,
    pub probes: Option<ProbeStats>,
    pub traffic: Option<TrafficStats>,
    /// Up, down or unknown, from its probe rounds and the hierarchy.
    #[serde(default)]
    pub connection: connection::Status,
    /// Flow bytes / uplink counter bytes `[in, out]` over the window just closed (none without
    /// enough counted traffic to compare).
    #[serde(default)]
    pub flow_counter_ratio: [Option<f64>; 2],
    /// The sum of the uplinks' reported speed (`ifHighSpeed`), bits per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_speed_bits_per_second: Option<f64>,
    /// The reason of the planned maintenance the site is in, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<String>,
    /// Up time / (up + down time) this calendar month (UTC), since the process started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_month: Option<f64>,
    /// Event time of the site's newest record (ns since the epoch), if any.
    #[serde(skip)]
    pub newest_event_ns: Option<i64>,
    /// Rows that do not depend on a meeting's need (everything but spare capacity).
    #[serde(skip)]
    pub rows_without_spare: Vec<(Metric, Level)>,
}

#[derive(Debug, Clone, Copy)]
struct ProbeSample {
    t_ns: i64,
    rtt_s: f64,
    jitter_s: f64,
    loss: f64,
}

/// Cumulative histogram bucket counts for Prometheus (one per bound, plus +Inf via count).
#[derive(Debug, Clone, Default)]
pub struct Buckets {
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Buckets {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.len() != bounds.len() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, b) in self.counts.iter_mut().zip(bounds) {
            if v <= *b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }
}

/// RTT histogram bounds: the shipped policy's thresholds and the quiet and congested bands around them.
pub const RTT_BUCKETS: [f64; 5] = [0.05, 0.1, 0.15, 0.3, 0.4];
/// Jitter histogram bounds.
pub const JITTER_BUCKETS: [f64; 3] = [0.015, 0.03, 0.05];

#[derive(Debug, Default)]
struct SiteState {
    samples: VecDeque<ProbeSample>,
    /// (window start, bytes in, bytes out) of closed windows in the period.
    traffic: VecDeque<(i64, f64, f64)>,
    /// Bytes of the window being closed, filled from its flow rows.
    pending_bytes: [f64; 2],
    last_flow_window_end: Option<i64>,
    /// The uplinks' counter bytes `[in, out]` per window start over the period, each sample's
    /// bytes spread over the windows its span covers.
    counter_bytes: std::collections::BTreeMap<i64, [f64; 2]>,
    /// Event time of the newest counter sample: windows ending before it are complete.
    last_counter_ns: Option<i64>,
    /// Where the counters' spans begin (the first sample): earlier windows are partly counted.
    counters_from_ns: Option<i64>,
    /// The latest reported speed of each uplink, bits per second.
    uplink_speeds: Vec<Option<u64>>,
    last_probe_ns: Option<i64>,
    rows: Vec<(Metric, HeldLevel)>,
    connection: connection::Tracker,
    rtt_buckets: Buckets,
    jitter_buckets: Buckets,
}

/// The readiness engine: feed it probe samples and closed flow windows, then evaluate.
#[derive(Debug)]
pub struct ReadinessEngine {
    inventory: Arc<Inventory>,
    policy: Policy,
    window_ns: i64,
    sites: Vec<SiteState>,
    latest: Vec<SiteReadiness>,
    evaluated_at_ns: Option<i64>,
    /// Wall-clock time of the latest evaluation, to notice a stalled pipeline.
    evaluated_wall: Option<std::time::Instant>,
    scratch: Scratch,
    /// The sites this instance judges (`None`: all). In a scale-out each site belongs to one
    /// site-stage instance; the others neither judge nor export it.
    owned: Option<Vec<bool>>,
    /// Planned maintenance windows.
    maintenance: Vec<maintenance::Maintenance>,
}

/// Histograms reused for every site's percentiles (reset, never reallocated). Two significant
/// figures: quantiles within 1 %, far finer than the policy's bands.
#[derive(Debug)]
struct Scratch {
    rtt_us: hdrhistogram::Histogram<u32>,
    jitter_us: hdrhistogram::Histogram<u32>,
    /// MOS of each sample: its 5th percentile is taken exactly, since hdrhistogram's 1 % steps
    /// (0.03 MOS) are as wide as the row's hysteresis band and round up.
    mos: Vec<f64>,
}

impl Default for Scratch {
    fn default() -> Self {
        let us = || hdrhistogram::Histogram::new_with_bounds(1, 120_000_000, 2).expect("valid bounds");
        Self { rtt_us: us(), jitter_us: us(), mos: Vec::new() }
    }
}

/// The nearest-rank quantile `q` of `values` (not empty), as hdrhistogram counts ranks.
fn nearest_rank(values: &mut [f64], q: f64) -> f64 {
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    *values.select_nth_unstable_by(rank - 1, f64::total_cmp).1
}

fn percentile(h: &hdrhistogram::Histogram<u32>, q: f64, scale: f64) -> f64 {
    h.value_at_quantile(q) as f64 / scale
}

impl ReadinessEngine {
    pub fn new(inventory: Arc<Inventory>, policy: Policy, window_ns: i64) -> Self {
        let n = inventory.len();
        let latest = inventory
            .sites()
            .iter()
            .map(|s| SiteReadiness {
                site: s.id.clone(),
                name: s.name.clone(),
                district: s.district.clone(),
                level: s.level.clone(),
                verdict: Verdict::Unknown,
                reasons: Vec::new(),
                probes: None,
                traffic: None,
                connection: connection::Status::default(),
                flow_counter_ratio: [None, None],
                link_speed_bits_per_second: None,
                maintenance: None,
                availability_month: None,
                newest_event_ns: None,
                rows_without_spare: Vec::new(),
            })
            .collect();
        Self {
            inventory,
            policy,
            window_ns,
            sites: (0..n).map(|_| SiteState::default()).collect(),
            latest,
            evaluated_at_ns: None,
            evaluated_wall: None,
            scratch: Scratch::default(),
            owned: None,
            maintenance: Vec::new(),
        }
    }

    /// Declares planned maintenance windows.
    pub fn with_maintenance(mut self, windows: Vec<maintenance::Maintenance>) -> Self {
        self.maintenance = windows;
        self
    }

    /// The reason of a maintenance window that covers `site` at some time in `[start, end)`.
    fn maintenance_of(&self, site: SiteIdx, start_ns: i64, end_ns: i64) -> Option<&str> {
        self.maintenance.iter().find(|m| m.covers(site, start_ns, end_ns)).map(|m| m.reason.as_str())
    }

    /// Resumes each listed site's month of availability (read back from the history at start,
    /// `SqlEngine::month_availability`); unknown sites are skipped. Returns how many resumed.
    pub fn resume_months(&mut self, months: &[(String, connection::Month)]) -> usize {
        let mut resumed = 0;
        for (site, month) in months {
            if let Some(i) = self.inventory.by_id(site) {
                self.sites[i as usize].connection.resume_month(*month);
                resumed += 1;
            }
        }
        resumed
    }

    /// Judges only the sites marked in `owned` (inventory order; `None`: every site).
    pub fn set_owned(&mut self, owned: Option<Vec<bool>>) {
        self.owned = owned;
    }

    /// Whether this instance judges site `i` (inventory order).
    pub fn owns(&self, i: usize) -> bool {
        self.owned.as_ref().is_none_or(|o| o.get(i).copied().unwrap_or(false))
    }

    /// The latest verdicts of the sites this instance judges (all, outside a scale-out).
    pub fn owned_latest(&self) -> Vec<&SiteReadiness> {
        self.latest.iter().enumerate().filter(|(i, _)| self.owns(*i)).map(|(_, s)| s).collect()
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn inventory(&self) -> &Arc<Inventory> {
        &self.inventory
    }

    /// The latest verdict of every site, in inventory order.
    pub fn latest(&self) -> &[SiteReadiness] {
        &self.latest
    }

    /// Event time of the latest evaluation.
    pub fn evaluated_at_ns(&self) -> Option<i64> {
        self.evaluated_at_ns
    }

    pub fn rtt_buckets(&self, site: SiteIdx) -> &Buckets {
        &self.sites[usize::from(site)].rtt_buckets
    }

    pub fn jitter_buckets(&self, site: SiteIdx) -> &Buckets {
        &self.sites[usize::from(site)].jitter_buckets
    }

    /// Takes the on-time probe results of a micro-batch (the `probes` table with `window_start`).
    pub fn observe_probes(&mut self, batch: &RecordBatch) {
        let (Some(site), Some(t), Some(rtt), Some(jitter), Some(loss)) = (
            batch.column_by_name("site"),
            batch.column_by_name("event_time"),
            batch.column_by_name("rtt_seconds"),
            batch.column_by_name("jitter_seconds"),
            batch.column_by_name("loss_ratio"),
        ) else {
            return;
        };
        let Some(keys) = site.as_dictionary_opt::<datafusion::arrow::datatypes::UInt16Type>() else { return };
        let t = t.as_primitive::<TimestampNanosecondType>();
        let (rtt, jitter, loss) =
            (rtt.as_primitive::<Float64Type>(), jitter.as_primitive::<Float64Type>(), loss.as_primitive::<Float64Type>());
        for i in 0..batch.num_rows() {
            let s = &mut self.sites[usize::from(keys.keys().value(i))];
            let sample = ProbeSample { t_ns: t.value(i), rtt_s: rtt.value(i), jitter_s: jitter.value(i), loss: loss.value(i) };
            s.rtt_buckets.observe(&RTT_BUCKETS, sample.rtt_s);
            s.jitter_buckets.observe(&JITTER_BUCKETS, sample.jitter_s);
            s.last_probe_ns = Some(s.last_probe_ns.map_or(sample.t_ns, |p| p.max(sample.t_ns)));
            s.connection.observe_round(sample.t_ns, sample.loss);
            s.samples.push_back(sample);
        }
    }

    /// Takes the on-time interface rows of a micro-batch (the `interfaces` table's input): the
    /// link state of the inventory's uplinks (`device`, `interface`, `link_up`).
    pub fn observe_links(&mut self, batch: &RecordBatch) {
        let (Some(t), Some(device), Some(interface), Some(up)) = (
            batch.column_by_name("event_time"),
            batch.column_by_name("device"),
            batch.column_by_name("interface"),
            batch.column_by_name("link_up"),
        ) else {
            return;
        };
        let (Some(device), Some(interface), Some(up)) =
            (device.as_string_opt::<i32>(), interface.as_string_opt::<i32>(), up.as_boolean_opt())
        else {
            return;
        };
        let t = t.as_primitive::<TimestampNanosecondType>();
        let bytes = batch.column_by_name("bytes").and_then(|c| c.as_primitive_opt::<datafusion::arrow::datatypes::UInt64Type>());
        let seconds = batch.column_by_name("seconds").and_then(|c| c.as_primitive_opt::<Float64Type>());
        let period_ns = self.policy.period_secs as i64 * 1_000_000_000;
        let direction = batch.column_by_name("direction").and_then(|c| cast(c, &DataType::Utf8).ok());
        let direction = direction.as_ref().and_then(|c| c.as_string_opt::<i32>());
        let speed =
            batch.column_by_name("speed_bits_per_second").and_then(|c| c.as_primitive_opt::<datafusion::arrow::datatypes::UInt64Type>());
        for i in 0..batch.num_rows() {
            let Some((site, uplink)) = self.inventory.uplink_of(device.value(i), interface.value(i)) else { continue };
            let own_router = self.inventory.site(site).exporter.is_some_and(|e| e.to_string() == device.value(i));
            let s = &mut self.sites[usize::from(site)];
            if up.is_valid(i) {
                s.connection.observe_link(t.value(i), uplink, up.value(i));
            }
            if let Some(speed) = speed.filter(|c| c.is_valid(i)) {
                if s.uplink_speeds.len() <= uplink {
                    s.uplink_speeds.resize(uplink + 1, None);
                }
                s.uplink_speeds[uplink] = Some(speed.value(i));
            }
            if let (Some(bytes), Some(seconds), Some(direction)) = (bytes, seconds, direction) {
                // `in` = received by the interface: into the site on its own router, out of it
                // on the device at the other end of the link.
                let received = direction.value(i) == "in";
                let d = usize::from(received != own_router);
                let end = t.value(i);
                let span = ((seconds.value(i) * 1e9) as i64).max(1);
                let keep_from = end - period_ns - self.window_ns;
                spread(&mut s.counter_bytes, end - span, end, keep_from, self.window_ns, bytes.value(i) as f64, d);
                s.last_counter_ns = Some(s.last_counter_ns.map_or(end, |l| l.max(end)));
                s.counters_from_ns = Some(s.counters_from_ns.map_or(end - span, |f| f.min(end - span)));
            }
        }
    }

    /// Takes a closed window of the `flows` table (needs `site`, `direction`, `bytes`).
    pub fn observe_flow_window(&mut self, rows: &RecordBatch, end_ns: i64) {
        let (Some(site), Some(dir), Some(bytes)) =
            (rows.column_by_name("site"), rows.column_by_name("direction"), rows.column_by_name("bytes"))
        else {
            return;
        };
        let (Ok(site), Ok(dir), Ok(bytes)) = (cast(site, &DataType::Utf8), cast(dir, &DataType::Utf8), cast(bytes, &DataType::Float64))
        else {
            return;
        };
        let (site, dir, bytes) = (site.as_string::<i32>(), dir.as_string::<i32>(), bytes.as_primitive::<Float64Type>());
        for i in 0..rows.num_rows() {
            if site.is_null(i) || dir.is_null(i) || bytes.is_null(i) {
                continue;
            }
            let Some(idx) = self.inventory.by_id(site.value(i)) else { continue };
            let d = if dir.value(i) == "in" { 0 } else { 1 };
            let s = &mut self.sites[usize::from(idx)];
            s.pending_bytes[d] += bytes.value(i);
            s.last_flow_window_end = Some(end_ns);
        }
    }

    /// Evaluates every site for the window `[start, end)` that just closed.
    pub fn evaluate(&mut self, start_ns: i64, end_ns: i64) {
        let period_ns = self.policy.period_secs as i64 * 1_000_000_000;
        let hold_ns = self.policy.hold_secs as i64 * 1_000_000_000;
        let stale_ns = i64::from(self.policy.freshness_windows) * self.window_ns;
        let need = self.policy.default_need();
        let window_secs = self.window_ns as f64 / 1e9;
        let first_window = self.evaluated_at_ns.is_none();
        self.evaluate_connections(start_ns, end_ns, stale_ns);
        for (i, state) in self.sites.iter_mut().enumerate() {
            if self.owned.as_ref().is_some_and(|o| !o.get(i).copied().unwrap_or(false)) {
                continue;
            }
            let site = self.inventory.site(i as SiteIdx);
            let capacity = site.capacity_bytes_per_sec();
            let pending = std::mem::take(&mut state.pending_bytes);
            // The first window of a run began before siteflow did: its traffic is partial and
            // would drag the period's mean down, so it only counts for freshness.
            if !first_window {
                state.traffic.push_back((start_ns, pending[0], pending[1]));
            }
            while state.traffic.front().is_some_and(|(s, _, _)| *s < end_ns - period_ns) {
                state.traffic.pop_front();
            }
            state.counter_bytes.retain(|s, _| *s >= end_ns - period_ns);
            // Counted windows of the period: complete (the newest sample is past their end, the
            // first one before their start) and closed; the same windows for flows and counters.
            let complete = state.last_counter_ns.unwrap_or(i64::MIN);
            let from = state.counters_from_ns.unwrap_or(i64::MAX);
            let counter_traffic: VecDeque<(i64, f64, f64)> = state
                .counter_bytes
                .range(from.min(end_ns)..end_ns)
                .filter(|(w, _)| *w + self.window_ns <= complete && **w >= from)
                .map(|(w, b)| (*w, b[0], b[1]))
                .collect();
            let speed: Option<f64> = (!state.uplink_speeds.is_empty() && state.uplink_speeds.iter().all(Option::is_some))
                .then(|| state.uplink_speeds.iter().flatten().map(|s| *s as f64).sum());
            // Flows against counters over the period's windows that have both, when the counters
            // saw enough traffic (1 % of the link) for a ratio to mean something.
            let (mut flow_sum, mut counter_sum, mut both) = ([0.0; 2], [0.0; 2], 0usize);
            for (w, fin, fout) in &state.traffic {
                if let Some(c) = state.counter_bytes.get(w).filter(|_| *w + self.window_ns <= complete && *w >= from) {
                    flow_sum = [flow_sum[0] + fin, flow_sum[1] + fout];
                    counter_sum = [counter_sum[0] + c[0], counter_sum[1] + c[1]];
                    both += 1;
                }
            }
            let floor = 0.01 * capacity * window_secs * both as f64;
            let flow_counter_ratio = [0, 1].map(|d| (both > 0 && counter_sum[d] >= floor).then(|| flow_sum[d] / counter_sum[d]));
            while state.samples.front().is_some_and(|p| p.t_ns < end_ns - period_ns) {
                state.samples.pop_front();
            }
            let newest = state.last_probe_ns.max(state.last_flow_window_end);
            let age = |t: Option<i64>| t.map_or(f64::INFINITY, |t| (end_ns - t) as f64 / 1e9);
            let (probe_age, flow_age) = (age(state.last_probe_ns), age(state.last_flow_window_end));
            let stale_secs = stale_ns as f64 / 1e9;

            // Only samples of the period that ends with this window: later ones (already
            // received for windows still open) wait for their own evaluation.
            let period: Vec<ProbeSample> = state.samples.iter().filter(|p| p.t_ns < end_ns).copied().collect();
            let probes = (!period.is_empty()).then(|| probe_stats(&period, &mut self.scratch));
            // The uplinks' counters when fresh (exact bytes, the reported speed), else the flows.
            let counter_age = age(state.last_counter_ns);
            let traffic_age = flow_age.min(counter_age);
            let traffic = if counter_age < stale_secs && !counter_traffic.is_empty() {
                let capacity = speed.map_or(capacity, |bps| bps / 8.0);
                Some(TrafficStats { source: "counters".into(), ..traffic_stats(&counter_traffic, capacity, window_secs) })
            } else {
                (flow_age < stale_secs && !state.traffic.is_empty())
                    .then(|| TrafficStats { source: "flows".into(), ..traffic_stats(&state.traffic, capacity, window_secs) })
            };
            let thresholds = self.policy.thresholds_for(&site.id, &site.level);
            let values: Vec<(Metric, Option<f64>)> = vec![
                (Metric::Rtt, probes.as_ref().map(|p| p.rtt_p95_seconds)),
                (Metric::Jitter, probes.as_ref().map(|p| p.jitter_p95_seconds)),
                (Metric::Loss, probes.as_ref().map(|p| p.loss_max_ratio)),
                (Metric::Mos, probes.as_ref().map(|p| p.mos_p5)),
                (Metric::Utilisation, traffic.as_ref().map(|t| t.utilisation_mean_ratio[0].max(t.utilisation_mean_ratio[1]))),
                (
                    Metric::SpareCapacity,
                    traffic.as_ref().map(|t| t.spare_min_bytes_per_second[0].min(t.spare_min_bytes_per_second[1]) / need),
                ),
            ];
            if state.rows.is_empty() {
                state.rows = values.iter().map(|(m, _)| (*m, HeldLevel::default())).collect();
            }
            let mut reasons = Vec::new();
            let mut worst = Level::Ready;
            let mut rows_without_spare = Vec::new();
            for ((metric, value), (_, held)) in values.iter().zip(state.rows.iter_mut()) {
                let t = thresholds.get(*metric).expect("every row but freshness has thresholds");
                let h = self.policy.hysteresis_ratio;
                let target = value.map(|v| hysteresis::target_level(*metric, v, t, h, held.current()));
                let Some(level) = held.update(target, end_ns, hold_ns) else { continue };
                let value = value.expect("a level comes from a value");
                if level > Level::Ready {
                    reasons.push(row_reason(*metric, level, value, t, h, held.pending(), end_ns, self.policy.hold_secs));
                }
                if *metric != Metric::SpareCapacity {
                    rows_without_spare.push((*metric, level));
                }
                worst = worst.max(level);
            }
            // A down site is not ready whatever else is known of it; otherwise both kinds of
            // telemetry must be fresh: quality without traffic, or traffic without quality,
            // cannot say a link is ready. The reason says which is stale or missing.
            let connection = state.connection.status().clone();
            let verdict = if connection.state == connection::State::Down {
                reasons.insert(0, connection_reason(&connection));
                Verdict::NotReady
            } else if probe_age >= stale_secs || traffic_age >= stale_secs || probes.is_none() || traffic.is_none() {
                reasons.push(freshness_reason(probe_age, traffic_age, stale_secs, probes.is_none(), traffic.is_none(), first_window));
                Verdict::Unknown
            } else {
                Verdict::of(worst)
            };
            self.latest[i] = SiteReadiness {
                site: site.id.clone(),
                name: site.name.clone(),
                district: site.district.clone(),
                level: site.level.clone(),
                verdict,
                reasons,
                probes,
                traffic,
                availability_month: state.connection.month().availability(),
                flow_counter_ratio,
                link_speed_bits_per_second: speed,
                maintenance: self.maintenance.iter().find(|m| m.covers(i as SiteIdx, start_ns, end_ns)).map(|m| m.reason.clone()),
                connection,
                newest_event_ns: newest,
                rows_without_spare,
            };
        }
        self.evaluated_at_ns = Some(end_ns);
        self.evaluated_wall = Some(std::time::Instant::now());
    }

    /// Updates every judged site's connection status over the rounds before `end_ns`, then
    /// names the upstream of the sites down with a site above them.
    fn evaluate_connections(&mut self, start_ns: i64, end_ns: i64, stale_ns: i64) {
        let policy = self.policy.connection;
        for i in 0..self.sites.len() {
            if self.owns(i) {
                let planned = self.maintenance_of(i as SiteIdx, start_ns, end_ns).is_some();
                self.sites[i].connection.evaluate(&policy, start_ns, end_ns, stale_ns, planned);
            }
        }
        let mut trackers: Vec<connection::Tracker> = self.sites.iter_mut().map(|s| std::mem::take(&mut s.connection)).collect();
        let inv = &self.inventory;
        connection::attribute_upstream(
            &mut trackers,
            |i| inv.parent(i as SiteIdx).map(usize::from),
            |i| inv.site(i as SiteIdx).id.clone(),
            self.window_ns,
        );
        for (s, t) in self.sites.iter_mut().zip(trackers) {
            s.connection = t;
        }
    }

    /// When no window has closed for longer than the freshness limit (the source stalled or
    /// went silent), every verdict becomes `unknown`: the last one can no longer be trusted.
    pub fn expire_if_stalled(&mut self, now: std::time::Instant) {
        let Some(last) = self.evaluated_wall else { return };
        let limit = std::time::Duration::from_nanos((i64::from(self.policy.freshness_windows) * self.window_ns) as u64);
        let silent = now.saturating_duration_since(last);
        if silent < limit {
            return;
        }
        for s in &mut self.latest {
            s.verdict = Verdict::Unknown;
            s.reasons.retain(|r| r.metric != Metric::Freshness);
            s.reasons.push(Reason {
                metric: Metric::Freshness,
                level: Level::NotReady,
                value: silent.as_secs_f64(),
                threshold: limit.as_secs_f64(),
                cause: Cause::Stale,
                clear: None,
                detail: format!("no window has closed for {:.0} s (the source stalled)", silent.as_secs_f64()),
            });
            s.rows_without_spare.clear();
        }
    }

    /// Sites per verdict, for a district (or all when `None`).
    pub fn counts(&self, district: Option<&str>) -> [(Verdict, usize); 4] {
        let owned = self.owned_latest();
        Verdict::ALL.map(|v| (v, owned.iter().filter(|s| s.verdict == v && district.is_none_or(|d| s.district == d)).count()))
    }

    /// For every judged site with sites below it: (site, sites below it, those of them down
    /// with it as their upstream).
    pub fn down_below(&self) -> Vec<(SiteIdx, usize, usize)> {
        let inv = &self.inventory;
        inv.parents_with_children()
            .into_iter()
            .filter(|&p| self.owns(usize::from(p)))
            .map(|p| {
                let below = inv.select(None, None, Some(p));
                let id = &inv.site(p).id;
                let down = below.iter().filter(|&&s| self.latest[usize::from(s)].connection.upstream.as_ref() == Some(id)).count();
                (p, below.len(), down)
            })
            .collect()
    }

    /// Roll-ups along the hierarchy: for every site with sites below it, those sites (any
    /// depth) per level and verdict — "7 of 20 communes under meo-vac.ubnd not ready".
    pub fn rollups(&self) -> Vec<Rollup> {
        let inv = &self.inventory;
        inv.parents_with_children()
            .into_iter()
            .map(|p| {
                let mut levels: Vec<(String, [(Verdict, usize); 4])> = Vec::new();
                for level in inv.levels() {
                    let below: Vec<SiteIdx> =
                        inv.select(None, Some(level), Some(p)).into_iter().filter(|&s| self.owns(usize::from(s))).collect();
                    if below.is_empty() {
                        continue;
                    }
                    let count = |v: Verdict| below.iter().filter(|&&s| self.latest[usize::from(s)].verdict == v).count();
                    levels.push((level.clone(), Verdict::ALL.map(|v| (v, count(v)))));
                }
                let site = inv.site(p);
                Rollup { parent: site.id.clone(), parent_level: site.level.clone(), levels }
            })
            .collect()
    }
}

/// The sites below one site, per level, in each verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rollup {
    pub parent: String,
    pub parent_level: String,
    pub levels: Vec<(String, [(Verdict, usize); 4])>,
}

/// The reason of a row shown at `level`: over its threshold, held by hysteresis (back within
/// the threshold, not past the clear level), or held by the hold time (past the clear level).
#[allow(clippy::too_many_arguments)]
fn row_reason(
    metric: Metric,
    level: Level,
    value: f64,
    t: &policy::Threshold,
    hysteresis_ratio: f64,
    pending: Option<(Level, i64)>,
    now_ns: i64,
    hold_secs: u64,
) -> Reason {
    let cause = if hysteresis::level_of(metric, value, t) >= level {
        Cause::OverThreshold
    } else if hysteresis::clear_level_of(metric, value, t, hysteresis_ratio) >= level {
        Cause::Hysteresis
    } else {
        Cause::Hold
    };
    let detail = match (cause, pending) {
        (Cause::Hold, Some((_, since))) => {
            format!("past the clear level for {} s of the {hold_secs} s hold", (now_ns - since) / 1_000_000_000)
        }
        _ => String::new(),
    };
    Reason { metric, level, value, threshold: t.of(level), cause, clear: Some(t.clear_of(metric, hysteresis_ratio, level)), detail }
}

/// The reason a down site is not ready: unreachable, or down with a site above it.
fn connection_reason(c: &connection::Status) -> Reason {
    let since = c.since_ns.map_or(String::new(), |t| format!(" since {}", chrono::DateTime::from_timestamp_nanos(t).to_rfc3339()));
    let (cause, detail) = match (&c.cause, &c.upstream) {
        (connection::Cause::UpstreamDown, Some(up)) => (Cause::UpstreamDown, format!("{up} above it is down{since}")),
        (connection::Cause::LinkDown, _) => (Cause::LinkDown, format!("its uplink reports link down{since}")),
        _ => (Cause::Unreachable, format!("its probe rounds are lost{since}")),
    };
    Reason { metric: Metric::Connection, level: Level::NotReady, value: 0.0, threshold: 1.0, cause, clear: None, detail }
}

/// The freshness reason of an `unknown` verdict: what is stale (and how old), or missing.
fn freshness_reason(probe_age: f64, flow_age: f64, stale_secs: f64, no_probes: bool, no_traffic: bool, first_window: bool) -> Reason {
    let mut stale = Vec::new();
    let mut missing = Vec::new();
    for (what, age, none) in [("probe results", probe_age, no_probes), ("flow records", flow_age, no_traffic)] {
        if age.is_finite() && age >= stale_secs {
            stale.push(format!("{what} {age:.0} s old"));
        } else if age.is_infinite() {
            missing.push(format!("{what} (none received yet)"));
        } else if none && what == "probe results" {
            missing.push("probe results in the period".to_string());
        } else if none {
            let why = if first_window { "the run's first window is partial" } else { "none closed in the period" };
            missing.push(format!("a complete traffic window ({why})"));
        }
    }
    let age = probe_age.max(flow_age);
    let cause = if stale.is_empty() { Cause::Missing } else { Cause::Stale };
    let detail = stale.into_iter().chain(missing).collect::<Vec<_>>().join(", ");
    Reason {
        metric: Metric::Freshness,
        level: Level::NotReady,
        value: if age.is_finite() { age } else { f64::NAN },
        threshold: stale_secs,
        cause,
        clear: None,
        detail,
    }
}

fn probe_stats(samples: &[ProbeSample], h: &mut Scratch) -> ProbeStats {
    h.rtt_us.reset();
    h.jitter_us.reset();
    h.mos.clear();
    let mut loss_max: f64 = 0.0;
    for s in samples {
        h.rtt_us.saturating_record((s.rtt_s * 1e6).round().max(1.0) as u64);
        h.jitter_us.saturating_record((s.jitter_s * 1e6).round().max(1.0) as u64);
        h.mos.push(emodel::mos(s.rtt_s * 1e3, s.jitter_s * 1e3, s.loss * 100.0));
        loss_max = loss_max.max(s.loss);
    }
    ProbeStats {
        samples: samples.len(),
        rtt_p50_seconds: percentile(&h.rtt_us, 0.5, 1e6),
        rtt_p95_seconds: percentile(&h.rtt_us, 0.95, 1e6),
        rtt_p99_seconds: percentile(&h.rtt_us, 0.99, 1e6),
        jitter_p95_seconds: percentile(&h.jitter_us, 0.95, 1e6),
        loss_max_ratio: loss_max,
        mos_p5: nearest_rank(&mut h.mos, 0.05),
    }
}

fn traffic_stats(windows: &VecDeque<(i64, f64, f64)>, capacity: f64, window_secs: f64) -> TrafficStats {
    let n = windows.len().max(1) as f64;
    let rate = |bytes: f64| bytes / window_secs;
    let mean = |d: usize| windows.iter().map(|w| rate(if d == 0 { w.1 } else { w.2 })).sum::<f64>() / n / capacity;
    let spare = |d: usize| windows.iter().map(|w| capacity - rate(if d == 0 { w.1 } else { w.2 })).fold(f64::INFINITY, f64::min);
    TrafficStats {
        source: String::new(),
        capacity_bytes_per_second: capacity,
        windows: windows.len(),
        utilisation_mean_ratio: [mean(0), mean(1)],
        spare_min_bytes_per_second: [spare(0), spare(1)],
    }
}

/// Adds `bytes` moved evenly over `[from, to)` to the windows of `size_ns` it covers, in
/// direction `d`; only the windows from `keep_from` on (a sample after a long gap spans more
/// windows than the period holds).
fn spread(windows: &mut std::collections::BTreeMap<i64, [f64; 2]>, from: i64, to: i64, keep_from: i64, size_ns: i64, bytes: f64, d: usize) {
    let span = (to - from).max(1) as f64;
    let mut w = from.max(keep_from).div_euclid(size_ns) * size_ns;
    while w < to {
        let overlap = (to.min(w + size_ns) - from.max(w)).max(0) as f64;
        windows.entry(w).or_default()[d] += bytes * overlap / span;
        w += size_ns;
    }
}

#[cfg(test)]
mod spread_tests {
    use super::spread;

    #[test]
    fn a_sample_is_spread_over_the_windows_it_spans_and_a_long_gap_is_bounded() {
        let mut w = std::collections::BTreeMap::new();
        // 30 bytes over [5, 35) in windows of 10: 5, 10, 10, 5.
        spread(&mut w, 5, 35, i64::MIN, 10, 30.0, 0);
        assert_eq!(w.iter().map(|(k, v)| (*k, v[0])).collect::<Vec<_>>(), vec![(0, 5.0), (10, 10.0), (20, 10.0), (30, 5.0)]);
        // A year-long span keeps only the windows from `keep_from` on, with their share.
        let mut w = std::collections::BTreeMap::new();
        let year = 365 * 86_400 * 1_000_000_000i64;
        spread(&mut w, 0, year, year - 100, 10, year as f64, 1);
        assert_eq!(w.len(), 10);
        assert!(w.values().all(|v| v[1] == 10.0));
    }
}

/// What removing a meeting did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed,
    NotFound,
    /// It comes from the schedule file: edit the file instead.
    Scheduled,
}

/// The engine and the meeting schedule, shared between the pipeline and the HTTP API.
#[derive(Debug)]
pub struct SharedReadiness {
    pub engine: std::sync::RwLock<ReadinessEngine>,
    pub meetings: std::sync::RwLock<Vec<Meeting>>,
    /// In a scale-out, the latest verdict of each site judged by another site-stage instance,
    /// as that instance's `/api/readiness` shows it (read from the readiness topic).
    peer_verdicts: std::sync::RwLock<std::collections::HashMap<String, SiteReadiness>>,
}

impl SharedReadiness {
    pub fn new(engine: ReadinessEngine, meetings: Vec<Meeting>) -> Arc<Self> {
        Arc::new(Self {
            engine: std::sync::RwLock::new(engine),
            meetings: std::sync::RwLock::new(meetings),
            peer_verdicts: Default::default(),
        })
    }

    /// Keeps (or with `None` forgets) the latest verdict of `site` from the readiness topic;
    /// `false` for a site the inventory does not have (not kept).
    pub fn put_peer_verdict(&self, site: &str, verdict: Option<SiteReadiness>) -> bool {
        if self.engine.read().expect("readiness lock").inventory().by_id(site).is_none() {
            return false;
        }
        let mut peers = self.peer_verdicts.write().expect("peer verdicts lock");
        match verdict {
            Some(v) => peers.insert(site.to_string(), v),
            None => peers.remove(site),
        };
        true
    }

    /// Every site's latest verdict, in inventory order: this instance's for the sites it
    /// judges, the owner's (from the readiness topic) for the others in a scale-out.
    pub fn verdicts(&self) -> Vec<SiteReadiness> {
        let engine = self.engine.read().expect("readiness lock");
        let peers = self.peer_verdicts.read().expect("peer verdicts lock");
        engine
            .latest()
            .iter()
            .enumerate()
            .map(|(i, s)| match peers.get(&s.site) {
                Some(peer) if !engine.owns(i) => peer.clone(),
                _ => s.clone(),
            })
            .collect()
    }

    /// Adds a meeting; its id must be new.
    pub fn add_meeting(&self, spec: MeetingSpec) -> Result<Meeting, String> {
        let meeting = self.check_new_meeting(spec)?;
        self.meetings.write().expect("meetings lock").push(meeting.clone());
        Ok(meeting)
    }

    /// Resolves a meeting to add, without adding it: its id must be new.
    pub fn check_new_meeting(&self, spec: MeetingSpec) -> Result<Meeting, String> {
        let engine = self.engine.read().expect("readiness lock");
        let meeting = Meeting::resolve(spec, engine.inventory(), engine.policy())?;
        if self.meetings.read().expect("meetings lock").iter().any(|m| m.spec.id == meeting.spec.id) {
            return Err(format!("meeting {:?}: an id already in the schedule", meeting.spec.id));
        }
        Ok(meeting)
    }

    /// Removes a meeting added through the API (one from the schedule file stays).
    pub fn remove_meeting(&self, id: &str) -> Removal {
        let mut meetings = self.meetings.write().expect("meetings lock");
        match meetings.iter().position(|m| m.spec.id == id) {
            None => Removal::NotFound,
            Some(i) if meetings[i].scheduled => Removal::Scheduled,
            Some(i) => {
                meetings.remove(i);
                Removal::Removed
            }
        }
    }

    /// Puts a meeting read from the shared meetings topic, replacing the one with its id; at
    /// most `max` meetings are kept. A schedule file's meeting is not replaced.
    pub fn put_shared_meeting(&self, spec: MeetingSpec, max: usize) -> Result<(), String> {
        let meeting = {
            let engine = self.engine.read().expect("readiness lock");
            Meeting::resolve(spec, engine.inventory(), engine.policy())?
        };
        let mut meetings = self.meetings.write().expect("meetings lock");
        match meetings.iter().position(|m| m.spec.id == meeting.spec.id) {
            Some(i) if meetings[i].scheduled => Err(format!("meeting {:?}: the id of a meeting in the schedule file", meeting.spec.id)),
            Some(i) => {
                meetings[i] = meeting;
                Ok(())
            }
            None if meetings.len() >= max => Err(format!("meeting {:?}: already {max} meetings (api.max_meetings)", meeting.spec.id)),
            None => {
                meetings.push(meeting);
                Ok(())
            }
        }
    }

    /// The readiness report of one meeting.
    /// A meeting's report over every participant's latest verdict (in a scale-out, the owners').
    pub fn meeting_report(&self, id: &str) -> Option<meetings::MeetingReport> {
        let verdicts = self.verdicts();
        let engine = self.engine.read().expect("readiness lock");
        let meetings = self.meetings.read().expect("meetings lock");
        let m = meetings.iter().find(|m| m.spec.id == id)?;
        Some(meetings::report(m, &verdicts, engine.policy(), engine.evaluated_at_ns()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{
        ArrayRef, DictionaryArray, Float64Array, StringArray, TimestampNanosecondArray, UInt16Array, UInt64Array,
    };
    use datafusion::arrow::datatypes::{Field, Schema};

    const S: i64 = 1_000_000_000;

    #[test]
    fn reasons_say_in_words_what_has_no_number() {
        let reason = |metric, value, threshold, cause| Reason {
            metric,
            level: Level::NotReady,
            value,
            threshold,
            cause,
            clear: Some(f64::INFINITY),
            detail: "past the clear level for 5 s of the 30 s hold".into(),
        };
        let cases = [
            (reason(Metric::Rtt, f64::INFINITY, 0.3, Cause::OverThreshold), "rtt=none (no probe answered) over not_ready threshold 0.3"),
            (reason(Metric::Mos, f64::NAN, 3.6, Cause::Hysteresis), "mos=none (no probe answered) held by hysteresis"),
            (reason(Metric::SpareCapacity, f64::NEG_INFINITY, f64::INFINITY, Cause::Hold), "spare_capacity=none (no traffic figure) held"),
        ];
        for (r, expected) in cases {
            let text = r.to_string();
            assert!(text.starts_with(expected), "{text}");
            assert!(!text.to_lowercase().contains("inf") && !text.contains("NaN"), "{text}");
        }
        let finite = reason(Metric::Rtt, 0.45, 0.3, Cause::OverThreshold);
        assert_eq!(Reason { clear: Some(0.27), ..finite }.to_string(), "rtt=0.4500 over not_ready threshold 0.3, clears at 0.27");
    }

    const CSV: &str = "site_id,name,level,kind,parent_id,district,admin_code,link_mbps,prefix,exporter\n\
        a,A,commune,commune,,D,1,20,10.0.1.0/24,\n\
        b,B,commune,commune,,D,2,20,10.0.2.0/24,\n";

    fn probes(site: u16, t: i64, rtt: f64) -> RecordBatch {
        let dict = |v: &[&str]| -> ArrayRef {
            Arc::new(DictionaryArray::try_new(UInt16Array::from(vec![site]), Arc::new(StringArray::from(v.to_vec()))).unwrap())
        };
        let schema = Schema::new(vec![
            Field::new("site", DataType::Dictionary(Box::new(DataType::UInt16), Box::new(DataType::Utf8)), false),
            Field::new("event_time", DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Nanosecond, None), false),
            Field::new("rtt_seconds", DataType::Float64, false),
            Field::new("jitter_seconds", DataType::Float64, false),
            Field::new("loss_ratio", DataType::Float64, false),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                dict(&["a", "b"]),
                Arc::new(TimestampNanosecondArray::from(vec![t])),
                Arc::new(Float64Array::from(vec![rtt])),
                Arc::new(Float64Array::from(vec![0.002])),
                Arc::new(Float64Array::from(vec![0.0])),
            ],
        )
        .unwrap()
    }

    fn flows(site: &str, bytes: u64) -> RecordBatch {
        let schema = Schema::new(vec![
            Field::new("site", DataType::Utf8, false),
            Field::new("direction", DataType::Utf8, false),
            Field::new("bytes", DataType::UInt64, false),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from(vec![site, site])),
                Arc::new(StringArray::from(vec!["in", "out"])),
                Arc::new(UInt64Array::from(vec![bytes, bytes])),
            ],
        )
        .unwrap()
    }

    /// Silence is `unknown`, bad quality with fresh telemetry is `not_ready`, and a site that
    /// falls silent turns `unknown` once its telemetry is older than the freshness limit.
    #[test]
    fn unknown_is_no_telemetry_not_bad_telemetry() {
        let inv = Arc::new(Inventory::from_csv_str(CSV, "t.csv").unwrap());
        let mut e = ReadinessEngine::new(inv, Policy::default(), 10 * S);
        let mut t = 1_764_000_000 * S;
        for w in 0..6 {
            e.observe_probes(&probes(0, t + 5 * S, 0.45));
            if w < 2 {
                e.observe_probes(&probes(1, t + 5 * S, 0.02));
                e.observe_flow_window(&flows("b", 1_000), t + 10 * S);
            }
            e.observe_flow_window(&flows("a", 1_000), t + 10 * S);
            e.evaluate(t, t + 10 * S);
            t += 10 * S;
            if w == 1 {
                assert_eq!(e.latest()[1].verdict, Verdict::Ready, "b is healthy while it reports");
            }
        }
        let a = &e.latest()[0];
        assert_eq!(a.verdict, Verdict::NotReady);
        assert_eq!(a.reasons[0].metric, Metric::Rtt);
        assert!((a.reasons[0].value - 0.45).abs() < 0.45e-2, "p95 within hdrhistogram's 2 significant digits: {}", a.reasons[0].value);
        assert_eq!(a.reasons[0].threshold, 0.3);
        let b = &e.latest()[1];
        assert_eq!(b.verdict, Verdict::Unknown, "{:?}", b.reasons);
        assert_eq!(b.reasons.last().unwrap().metric, Metric::Freshness);
        assert_eq!(e.counts(None), [(Verdict::Ready, 0), (Verdict::Degraded, 0), (Verdict::NotReady, 1), (Verdict::Unknown, 1)]);

        // What the readiness topic carries reads back the same (an unknown age is null, then NaN).
        let mut never = ReadinessEngine::new(e.inventory().clone(), Policy::default(), 10 * S);
        never.evaluate(t, t + 10 * S);
        for s in e.latest().iter().chain(never.latest()) {
            let json = serde_json::to_string(s).unwrap();
            let back: SiteReadiness = serde_json::from_str(&json).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
        assert!(never.latest().iter().any(|s| s.reasons.iter().any(|r| r.value.is_nan())), "a reason without a value was checked");

        // A scale-out instance judges, counts and rolls up only its own sites.
        e.set_owned(Some(vec![false, true]));
        assert_eq!(e.owned_latest().iter().map(|s| s.site.as_str()).collect::<Vec<_>>(), ["b"]);
        assert_eq!(e.counts(None).iter().map(|(_, n)| n).sum::<usize>(), 1);
    }

    /// Reasons say whether a row is over its threshold, held by hysteresis or by the hold
    /// time, with the clear level; the first window's unknown says what is missing.
    #[test]
    fn reasons_say_over_threshold_or_held() {
        let inv = Arc::new(Inventory::from_csv_str(CSV, "t.csv").unwrap());
        // One window per period, so each value below is the row's value at once.
        let policy = Policy { period_secs: 10, hold_secs: 20, ..Policy::default() };
        let mut e = ReadinessEngine::new(inv, policy, 10 * S);
        let mut t = 1_764_000_000 * S;
        let mut step = |rtt: f64| {
            e.observe_probes(&probes(0, t + 5 * S, rtt));
            e.observe_flow_window(&flows("a", 1_000), t + 10 * S);
            e.evaluate(t, t + 10 * S);
            t += 10 * S;
            e.latest()[0].clone()
        };
        let first = step(0.2);
        assert_eq!(first.verdict, Verdict::Unknown);
        let r = first.reasons.last().unwrap();
        assert_eq!((r.metric, r.cause), (Metric::Freshness, Cause::Missing));
        assert_eq!(r.to_string(), "freshness: missing a complete traffic window (the run's first window is partial)");
        for _ in 0..3 {
            step(0.2);
        }
        let over = step(0.2);
        assert_eq!(over.verdict, Verdict::Degraded);
        // Values are hdrhistogram's p95 (2 significant digits): 0.2 reads 0.2007.
        let text = over.reasons[0].to_string();
        assert!(text.starts_with("rtt=0.20") && text.ends_with(" over degraded threshold 0.1, clears at 0.09"), "{text}");
        assert!((over.reasons[0].clear.unwrap() - 0.09).abs() < 1e-12);
        // 0.095: back within the 0.1 threshold, not past the 0.09 clear level.
        let held = step(0.095);
        assert_eq!(held.verdict, Verdict::Degraded);
        assert_eq!(held.reasons[0].cause, Cause::Hysteresis);
        let text = held.reasons[0].to_string();
        assert!(
            text.starts_with("rtt=0.09") && text.ends_with(" held by hysteresis (within degraded threshold 0.1, clears at 0.09)"),
            "{text}"
        );
        // 0.05: past the clear level; the row waits out the 20 s hold.
        let hold = step(0.05);
        assert_eq!((hold.verdict, hold.reasons[0].cause), (Verdict::Degraded, Cause::Hold));
        let text = hold.reasons[0].to_string();
        assert!(text.ends_with(" held by the hold time (past the clear level for 0 s of the 20 s hold, clears at 0.09)"), "{text}");
        assert!(step(0.05).reasons[0].detail.contains("for 10 s of the 20 s hold"));
        let ready = step(0.05);
        assert_eq!(ready.verdict, Verdict::Ready, "{:?}", ready.reasons);
        assert!(ready.reasons.is_empty());
    }
}
