//! What the pipeline tells the operator in its log, beyond the metrics: once when something
//! goes wrong and persists, then at most every few minutes, never per batch.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use crate::decode::{DecodeStats, RejectReason};

use crate::types::Format;

/// A warning about a source whose records are mostly rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectionWarning {
    pub source: String,
    pub format: Format,
    pub rejected: u64,
    pub records: u64,
    pub top_reason: RejectReason,
    pub period: Duration,
}

impl std::fmt::Display for RejectionWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} of {} records in the last {} s were rejected as {} (mostly {}); is {} the right format? `siteflow check --config FILE --connect` says which format they are in",
            self.source,
            self.rejected,
            self.records,
            self.period.as_secs(),
            self.format.as_str(),
            self.top_reason.as_str(),
            self.format.as_str()
        )
    }
}

/// One source's counts over the current period.
struct Tally {
    format: Format,
    since: Instant,
    records: u64,
    rejected: BTreeMap<RejectReason, u64>,
    warned_at: Option<Instant>,
}

/// Watches each source (a Kafka topic, or a format for other sources) for records that are
/// mostly rejected over a whole period: a wrong format or a broken collector, which the
/// counters show but nobody reads until the dashboards stay empty.
pub struct RejectionWatch {
    period: Duration,
    repeat: Duration,
    sources: BTreeMap<String, Tally>,
}

impl RejectionWatch {
    /// Judges periods of `period`; warns again about the same source after `repeat` at the soonest.
    pub fn new(period: Duration, repeat: Duration) -> Self {
        Self { period, repeat, sources: BTreeMap::new() }
    }

    /// Counts one decoded batch of `source`.
    pub fn observe(&mut self, source: &str, format: Format, stats: &DecodeStats, now: Instant) {
        if !self.sources.contains_key(source) {
            let tally = Tally { format, since: now, records: 0, rejected: BTreeMap::new(), warned_at: None };
            self.sources.insert(source.to_string(), tally);
        }
        let t = self.sources.get_mut(source).expect("inserted above");
        t.format = format;
        t.records += stats.records;
        for (reason, n) in &stats.rejected {
            *t.rejected.entry(*reason).or_default() += n;
        }
    }

    /// Closes every period that has lasted long enough; returns the warnings due.
    pub fn evaluate(&mut self, now: Instant) -> Vec<RejectionWarning> {
        let mut due = Vec::new();
        for (source, t) in &mut self.sources {
            let elapsed = now.saturating_duration_since(t.since);
            if elapsed < self.period {
                continue;
            }
            let rejected: u64 = t.rejected.values().sum();
            let repeat_ok = t.warned_at.is_none_or(|w| now.saturating_duration_since(w) >= self.repeat);
            if t.records > 0 && rejected * 2 > t.records && repeat_ok {
                let top_reason = t.rejected.iter().max_by_key(|(_, n)| **n).map(|(r, _)| *r).expect("some rejected");
                due.push(RejectionWarning {
                    source: source.clone(),
                    format: t.format,
                    rejected,
                    records: t.records,
                    top_reason,
                    period: elapsed,
                });
                t.warned_at = Some(now);
            }
            (t.since, t.records) = (now, 0);
            t.rejected.clear();
        }
        due
    }
}

/// The figures of one periodic status line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Status {
    pub records_per_sec: f64,
    pub sites_seen: usize,
    pub windows_closed: u64,
    pub rejected: u64,
}

/// Collects what the periodic one-line status reports: records per second, sites seen and
/// windows closed since the previous line.
pub struct StatusLog {
    every: Duration,
    last: Instant,
    records_at_last: u64,
    windows_at_last: u64,
    rejected_at_last: u64,
    sites: HashSet<String>,
}

impl StatusLog {
    pub fn new(every: Duration, now: Instant) -> Self {
        Self { every, last: now, records_at_last: 0, windows_at_last: 0, rejected_at_last: 0, sites: HashSet::new() }
    }

    /// Notes the sites of a published window.
    pub fn saw_sites<'a>(&mut self, sites: impl Iterator<Item = &'a str>) {
        for s in sites {
            if !self.sites.contains(s) {
                self.sites.insert(s.to_string());
            }
        }
    }

    /// The status since the previous line when one is due, given the running totals.
    pub fn due(&mut self, now: Instant, records: u64, windows_closed: u64, rejected: u64) -> Option<Status> {
        let elapsed = now.saturating_duration_since(self.last);
        if elapsed < self.every {
            return None;
        }
        let status = Status {
            records_per_sec: records.saturating_sub(self.records_at_last) as f64 / elapsed.as_secs_f64(),
            sites_seen: self.sites.len(),
            windows_closed: windows_closed.saturating_sub(self.windows_at_last),
            rejected: rejected.saturating_sub(self.rejected_at_last),
        };
        (self.last, self.records_at_last, self.windows_at_last, self.rejected_at_last) = (now, records, windows_closed, rejected);
        self.sites.clear();
        Some(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(records: u64, rejected: &[(RejectReason, u64)]) -> DecodeStats {
        let mut stats = DecodeStats::default();
        for (reason, n) in rejected {
            (0..*n).for_each(|_| stats.reject(*reason));
        }
        while stats.records < records {
            stats.accept();
        }
        stats
    }

    #[test]
    fn a_mostly_rejected_source_is_warned_about_once_per_repeat_interval() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut w = RejectionWatch::new(60 * s, 300 * s);
        w.observe("flows", Format::Goflow2Protobuf, &stats(100, &[(RejectReason::NotProtobuf, 90), (RejectReason::Oversize, 2)]), t0);
        w.observe("good", Format::Goflow2Json, &stats(100, &[(RejectReason::NotJson, 10)]), t0);
        assert!(w.evaluate(t0 + 59 * s).is_empty(), "not before a whole period");
        let due = w.evaluate(t0 + 60 * s);
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(
            (due[0].source.as_str(), due[0].top_reason, due[0].rejected, due[0].records),
            ("flows", RejectReason::NotProtobuf, 92, 100)
        );
        let line = due[0].to_string();
        assert!(line.contains("flows") && line.contains("goflow2_protobuf") && line.contains("not_protobuf"), "{line}");
        // Still rejected in the next periods: quiet until the repeat interval has passed.
        for minute in 2..=5 {
            w.observe("flows", Format::Goflow2Protobuf, &stats(10, &[(RejectReason::NotProtobuf, 10)]), t0 + (minute * 60 - 30) * s);
            assert!(w.evaluate(t0 + minute * 60 * s).is_empty(), "minute {minute}");
        }
        w.observe("flows", Format::Goflow2Protobuf, &stats(10, &[(RejectReason::NotProtobuf, 10)]), t0 + 330 * s);
        assert_eq!(w.evaluate(t0 + 360 * s).len(), 1, "again after 5 minutes");
        // A period without records is no reason to warn.
        assert!(w.evaluate(t0 + 720 * s).is_empty());
    }

    #[test]
    fn status_reports_rates_and_sites_since_the_previous_line() {
        let t0 = Instant::now();
        let mut s = StatusLog::new(Duration::from_secs(10), t0);
        s.saw_sites(["a", "b", "a"].into_iter());
        assert_eq!(s.due(t0 + Duration::from_secs(9), 500, 1, 0), None);
        let st = s.due(t0 + Duration::from_secs(10), 1_000, 3, 7).unwrap();
        assert_eq!(st, Status { records_per_sec: 100.0, sites_seen: 2, windows_closed: 3, rejected: 7 });
        s.saw_sites(["c"].into_iter());
        let st = s.due(t0 + Duration::from_secs(30), 3_000, 3, 7).unwrap();
        assert_eq!(st, Status { records_per_sec: 100.0, sites_seen: 1, windows_closed: 0, rejected: 0 });
    }
}
