//! Readiness as a window sink, and its metrics.
//!
//! [`ReadinessSink`] takes from each table what its declaration gives readiness (closed windows
//! or on-time records) and judges every site when the pipeline says the windows up to a time
//! are complete. [`collect`] renders its metrics at scrape time.
//!
//! Readiness metrics: verdicts as state sets, reasons, utilisation and spare capacity, probe
//! quality (histograms on the policy thresholds and rolling quantiles), roll-ups per district,
//! along the inventory's hierarchy and for the province, and meeting counts. Rendered at scrape time from the engine's latest verdicts.
//! Names and labels: docs/metrics.md.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};

use super::prometheus::{family, gauge_metric, label};
use crate::enrich::Direction;
use crate::inventory::SiteIdx;
use crate::readiness::connection::State as ConnectionState;
use crate::readiness::meetings::{Phase, report};
use crate::readiness::{Buckets, JITTER_BUCKETS, RTT_BUCKETS, SharedReadiness, SiteReadiness, Verdict};
use crate::sink::WindowSink;
use crate::table::{ReadinessFeed, TableDef};
use crate::window::ClosedWindow;

/// The readiness engine fed as a window sink; the verdicts are shared with the HTTP API and
/// `/metrics` through [`SharedReadiness`].
pub struct ReadinessSink {
    shared: Arc<SharedReadiness>,
}

impl ReadinessSink {
    pub fn new(shared: Arc<SharedReadiness>) -> Self {
        Self { shared }
    }

    /// The verdicts and meetings, for the HTTP API and `/metrics`.
    pub fn shared(&self) -> &Arc<SharedReadiness> {
        &self.shared
    }

    /// Every table's windows up to `end_ns` are published: judges every site over them and
    /// hands the verdicts to `then` (the other sinks).
    pub fn windows_complete(&mut self, start_ns: i64, end_ns: i64, then: impl FnOnce(&[SiteReadiness])) {
        let mut engine = self.shared.engine.write().expect("readiness lock");
        engine.evaluate(start_ns, end_ns);
        let owned: Vec<SiteReadiness> = engine.owned_latest().into_iter().cloned().collect();
        then(&owned);
    }
}

impl WindowSink for ReadinessSink {
    fn on_window(&mut self, table: &'static TableDef, window: &ClosedWindow) {
        // Readiness takes each window once, as first published: corrections (a lagging
        // exporter's records) reach the other sinks only.
        if table.readiness == ReadinessFeed::Windows && window.previous.is_none() {
            self.shared.engine.write().expect("readiness lock").observe_flow_window(&window.rows, window.end_ns);
        }
    }

    fn on_records(&mut self, table: &'static TableDef, on_time: &datafusion::arrow::array::RecordBatch) {
        match table.readiness {
            ReadinessFeed::OnTimeRecords => self.shared.engine.write().expect("readiness lock").observe_probes(on_time),
            ReadinessFeed::LinkStates => self.shared.engine.write().expect("readiness lock").observe_links(on_time),
            ReadinessFeed::Windows | ReadinessFeed::None => {}
        }
    }

    fn on_tick(&mut self, now: std::time::Instant) {
        self.shared.engine.write().expect("readiness lock").expire_if_stalled(now);
    }
}

fn site_labels(s: &crate::readiness::SiteReadiness) -> Vec<LabelPair> {
    vec![label("site", &s.site), label("district", &s.district), label("level", &s.level)]
}

fn with(mut labels: Vec<LabelPair>, name: &str, value: &str) -> Vec<LabelPair> {
    labels.push(label(name, value));
    labels
}

fn histogram_metric(labels: Vec<LabelPair>, bounds: &[f64], b: &Buckets) -> Metric {
    let mut h = Histogram::default();
    h.set_sample_count(b.count);
    h.set_sample_sum(b.sum);
    h.set_bucket(
        bounds
            .iter()
            .enumerate()
            .map(|(i, bound)| {
                let mut bucket = Bucket::default();
                bucket.set_upper_bound(*bound);
                bucket.set_cumulative_count(b.counts.get(i).copied().unwrap_or(0));
                bucket
            })
            .collect(),
    );
    let mut m = Metric::from_label(labels);
    m.set_histogram(h);
    m
}

/// Renders the readiness metric families.
pub fn collect(shared: &Arc<SharedReadiness>) -> Vec<MetricFamily> {
    let engine = shared.engine.read().expect("readiness lock");
    let latest = engine.latest();
    let mut out = Vec::new();
    let gauge = |name: &str, help: &str, metrics: Vec<Metric>| family(name.into(), help, MetricType::GAUGE, metrics);

    let mut states = Vec::new();
    let mut reasons = Vec::new();
    let mut clear_levels = Vec::new();
    let mut utilisation = Vec::new();
    let mut spare = Vec::new();
    let mut rtt_q = Vec::new();
    let mut jitter_p95 = Vec::new();
    let mut loss_max = Vec::new();
    let mut mos_p5 = Vec::new();
    let mut age = Vec::new();
    let mut rtt_hist = Vec::new();
    let mut jitter_hist = Vec::new();
    let (mut up, mut connection, mut connection_since, mut availability) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut maintenance = Vec::new();
    let (mut ratio, mut speed, mut speed_ratio, mut source) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let now_ns = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
    // In a scale-out each site is exported by the one instance that judges it.
    for (i, s) in latest.iter().enumerate().filter(|(i, _)| engine.owns(*i)) {
        let labels = site_labels(s);
        for v in Verdict::ALL {
            states.push(gauge_metric(with(labels.clone(), "state", v.as_str()), f64::from(u8::from(s.verdict == v))));
        }
        for r in &s.reasons {
            let severity = match r.level {
                crate::readiness::Level::NotReady => 2.0,
                _ => 1.0,
            };
            let l = with(labels.clone(), "metric", r.metric.as_str());
            reasons.push(gauge_metric(with(l.clone(), "cause", r.cause.as_str()), severity));
            if let Some(clear) = r.clear {
                clear_levels.push(gauge_metric(l, clear));
            }
        }
        if let Some(t) = &s.traffic {
            for d in Direction::ALL {
                let l = with(labels.clone(), "direction", d.as_str());
                utilisation.push(gauge_metric(l.clone(), t.utilisation_mean_ratio[d as usize]));
                spare.push(gauge_metric(l, t.spare_min_bytes_per_second[d as usize]));
            }
        }
        if let Some(p) = &s.probes {
            for (q, v) in [("0.5", p.rtt_p50_seconds), ("0.95", p.rtt_p95_seconds), ("0.99", p.rtt_p99_seconds)] {
                rtt_q.push(gauge_metric(with(labels.clone(), "quantile", q), v));
            }
            jitter_p95.push(gauge_metric(labels.clone(), p.jitter_p95_seconds));
            loss_max.push(gauge_metric(labels.clone(), p.loss_max_ratio));
            mos_p5.push(gauge_metric(labels.clone(), p.mos_p5));
        }
        if let Some(newest) = s.newest_event_ns {
            age.push(gauge_metric(labels.clone(), ((now_ns - newest) as f64 / 1e9).max(0.0)));
        }
        let c = &s.connection;
        for state in ConnectionState::ALL {
            connection.push(gauge_metric(with(labels.clone(), "state", state.as_str()), f64::from(u8::from(c.state == state))));
        }
        if c.state != ConnectionState::Unknown {
            let l = with(with(labels.clone(), "cause", c.cause.as_str()), "upstream", c.upstream.as_deref().unwrap_or(""));
            up.push(gauge_metric(l, f64::from(u8::from(c.state == ConnectionState::Up))));
        }
        if let Some(since) = c.since_ns {
            connection_since.push(gauge_metric(labels.clone(), since as f64 / 1e9));
        }
        for d in Direction::ALL {
            if let Some(r) = s.flow_counter_ratio[d as usize] {
                ratio.push(gauge_metric(with(labels.clone(), "direction", d.as_str()), r));
            }
        }
        if let Some(bps) = s.link_speed_bits_per_second {
            speed.push(gauge_metric(labels.clone(), bps));
            let site = engine.inventory().site(i as SiteIdx);
            speed_ratio.push(gauge_metric(labels.clone(), bps / (f64::from(site.link_mbps) * 1e6)));
        }
        if let Some(t) = &s.traffic {
            source.push(gauge_metric(with(labels.clone(), "source", &t.source), 1.0));
        }
        if let Some(reason) = &s.maintenance {
            maintenance.push(gauge_metric(with(labels.clone(), "reason", reason), 1.0));
        }
        if let Some(a) = s.availability_month {
            availability.push(gauge_metric(labels.clone(), a));
        }
        let idx = i as SiteIdx;
        rtt_hist.push(histogram_metric(labels.clone(), &RTT_BUCKETS, engine.rtt_buckets(idx)));
        jitter_hist.push(histogram_metric(labels, &JITTER_BUCKETS, engine.jitter_buckets(idx)));
    }
    if engine.evaluated_at_ns().is_none() {
        return out;
    }
    out.push(gauge("siteflow_site_readiness", "Readiness of the site for a video conference: 1 for the current state.", states));
    out.push(gauge(
        "siteflow_site_readiness_reason",
        "Policy rows that are not ready: 1 = degraded, 2 = not ready (or stale telemetry); cause: over_threshold, hysteresis, hold, stale or missing.",
        reasons,
    ));
    out.push(gauge(
        "siteflow_site_readiness_clear_level",
        "The value each not-ready row must pass to improve (its level's clear level).",
        clear_levels,
    ));
    out.push(gauge(
        "siteflow_site_up",
        "1 when the site is up, 0 when down (absent when unknown); cause: answered, unreachable or upstream_down (then upstream names the site above whose outage it is part of).",
        up,
    ));
    out.push(gauge("siteflow_site_connection", "Connection status of the site: 1 for the current state (up, down, unknown).", connection));
    out.push(gauge(
        "siteflow_site_connection_since_timestamp_seconds",
        "Event time the site's connection state began (for a down site, the outage's start).",
        connection_since,
    ));
    out.push(gauge(
        "siteflow_site_availability_month_ratio",
        "Up time / (up + down time) of the site this calendar month (UTC), since the process started.",
        availability,
    ));
    out.push(gauge(
        "siteflow_site_flow_counter_ratio",
        "Flow bytes (sampling-corrected) / the uplinks' counter bytes over the last closed window, per direction.",
        ratio,
    ));
    let band = engine.policy().flow_counter_band;
    out.push(gauge(
        "siteflow_flow_counter_ratio_min",
        "Lower end of the flows/counters band (policy flow_counter_band).",
        vec![gauge_metric(vec![], band.min)],
    ));
    out.push(gauge(
        "siteflow_flow_counter_ratio_max",
        "Upper end of the flows/counters band (policy flow_counter_band).",
        vec![gauge_metric(vec![], band.max)],
    ));
    out.push(gauge("siteflow_site_link_speed_bits_per_second", "Sum of the site's uplinks' reported speed (ifHighSpeed).", speed));
    out.push(gauge(
        "siteflow_site_link_speed_ratio",
        "The uplinks' reported speed / the inventory's link_mbps: far from 1, link_mbps is stale.",
        speed_ratio,
    ));
    out.push(gauge(
        "siteflow_site_utilisation_source",
        "1 for where the utilisation row's bytes came from: counters (the uplinks', fresh) or flows.",
        source,
    ));
    out.push(gauge(
        "siteflow_site_maintenance",
        "1 while the site is in a planned maintenance window (readiness.maintenance); reason: the window's.",
        maintenance,
    ));
    out.push(gauge("siteflow_site_utilisation_ratio", "Mean throughput / capacity over the rolling period.", utilisation));
    out.push(gauge(
        "siteflow_site_spare_capacity_bytes_per_second",
        "Minimum of capacity minus throughput over the rolling period.",
        spare,
    ));
    out.push(gauge("siteflow_site_rtt_quantile_seconds", "Quantiles of probe RTT means over the rolling period.", rtt_q));
    out.push(gauge("siteflow_site_jitter_p95_seconds", "95th percentile of probe jitter over the rolling period.", jitter_p95));
    out.push(gauge("siteflow_site_loss_max_ratio", "Worst probe-round loss over the rolling period.", loss_max));
    out.push(gauge("siteflow_site_mos_p5", "5th percentile of the E-model MOS over the rolling period.", mos_p5));
    out.push(gauge("siteflow_site_telemetry_age_seconds", "Wall clock minus the event time of the site's newest record.", age));
    out.push(family(
        "siteflow_site_rtt_seconds".into(),
        "Probe RTT means (buckets on the policy thresholds).",
        MetricType::HISTOGRAM,
        rtt_hist,
    ));
    out.push(family(
        "siteflow_site_jitter_seconds".into(),
        "Probe jitter (buckets on the policy thresholds).",
        MetricType::HISTOGRAM,
        jitter_hist,
    ));

    let mut districts: Vec<&str> = engine.owned_latest().into_iter().map(|s| s.district.as_str()).collect();
    districts.sort_unstable();
    districts.dedup();
    let mut by_district = Vec::new();
    for d in districts {
        for (v, n) in engine.counts(Some(d)) {
            by_district.push(gauge_metric(vec![label("district", d), label("state", v.as_str())], n as f64));
        }
    }
    let down_below = engine
        .down_below()
        .into_iter()
        .map(|(site, below, down)| {
            let s = &latest[usize::from(site)];
            gauge_metric(with(site_labels(s), "below", &below.to_string()), down as f64)
        })
        .collect();
    out.push(gauge(
        "siteflow_site_down_below",
        "Sites below the site (any depth; the label below counts them) that are down because it is (cause upstream_down).",
        down_below,
    ));
    out.push(gauge("siteflow_district_sites", "Sites of the district in each readiness state.", by_district));
    let mut by_parent = Vec::new();
    for r in engine.rollups() {
        for (level, counts) in &r.levels {
            for (v, n) in counts {
                let labels = vec![
                    label("parent", &r.parent),
                    label("parent_level", &r.parent_level),
                    label("level", level),
                    label("state", v.as_str()),
                ];
                by_parent.push(gauge_metric(labels, *n as f64));
            }
        }
    }
    if !by_parent.is_empty() {
        out.push(gauge(
            "siteflow_parent_sites",
            "Sites below a site of the hierarchy (any depth), per level, in each readiness state.",
            by_parent,
        ));
    }
    let province = engine.counts(None).iter().map(|(v, n)| gauge_metric(vec![label("state", v.as_str())], *n as f64)).collect();
    out.push(gauge("siteflow_province_sites", "Sites of the province in each readiness state.", province));

    let meetings = shared.meetings.read().expect("meetings lock");
    let (mut watched, mut counts, mut at_risk, mut participant_risk) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for m in meetings.iter() {
        let mut owned = m.clone();
        owned.participants.retain(|&s| engine.owns(usize::from(s)));
        let r = report(&owned, latest, engine.policy(), engine.evaluated_at_ns());
        let id = &m.spec.id;
        let is_watched = matches!(r.phase, Phase::Lead | Phase::InProgress);
        watched.push(gauge_metric(vec![label("meeting", id)], f64::from(u8::from(is_watched))));
        for (state, n) in &r.counts {
            counts.push(gauge_metric(vec![label("meeting", id), label("state", state)], *n as f64));
        }
        at_risk.push(gauge_metric(vec![label("meeting", id)], r.at_risk as f64));
        if is_watched {
            for p in r.participants.iter().filter(|p| p.at_risk) {
                participant_risk.push(gauge_metric(
                    vec![label("meeting", id), label("site", &p.site), label("district", &p.district), label("level", &p.level)],
                    1.0,
                ));
            }
        }
    }
    if !meetings.is_empty() {
        out.push(gauge("siteflow_meeting_watched", "1 from the lead time before a meeting until its end.", watched));
        out.push(gauge("siteflow_meeting_participants", "Participants in each state against the meeting's bandwidth need.", counts));
        out.push(gauge("siteflow_meeting_participants_at_risk", "Participants not ready or without fresh telemetry.", at_risk));
        out.push(gauge(
            "siteflow_meeting_participant_at_risk",
            "1 per participant at risk while the meeting is watched.",
            participant_risk,
        ));
    }
    out
}
