//! Event-time bookkeeping: window assignment, per-partition watermarks, lateness.
//!
//! Each partition's watermark trails the largest event time it has delivered by the allowed
//! lateness. A record is late when its window ends at or before its own partition's watermark:
//! lateness depends only on that partition's stream, so a partition that is replayed from a
//! checkpoint, or taken over by another instance, judges its records exactly as before. The
//! pipeline's watermark is the minimum over partitions that are not idle, and never moves back;
//! windows close when it passes their end. The watermark advances record by record, so the
//! outcome does not depend on how records were cut into batches.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::source::PartitionId;

/// Start of the tumbling window of `size_ns` that contains `t_ns`.
#[inline]
pub fn window_start(t_ns: i64, size_ns: i64) -> i64 {
    t_ns.div_euclid(size_ns) * size_ns
}

#[derive(Debug, Clone, Copy)]
struct PartitionClock {
    max_event_ns: i64,
    last_active: Instant,
}

/// Per-partition event-time progress and the pipeline watermark derived from it.
#[derive(Debug, Clone)]
pub struct Watermarks {
    size_ns: i64,
    lateness_ns: i64,
    idle_timeout: Duration,
    partitions: HashMap<PartitionId, PartitionClock>,
    /// Monotonic: windows ending at or before it are closed.
    watermark: Option<i64>,
}

/// Where each record of a batch goes: its window start, or late.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    pub window_starts: Vec<i64>,
    /// `late[i]`: record `i` arrived after its window closed.
    pub late: Vec<bool>,
    pub late_count: usize,
}

impl Watermarks {
    pub fn new(size_ns: i64, lateness_ns: i64, idle_timeout: Duration) -> Self {
        assert!(size_ns > 0 && lateness_ns >= 0);
        Self { size_ns, lateness_ns, idle_timeout, partitions: HashMap::new(), watermark: None }
    }

    pub fn size_ns(&self) -> i64 {
        self.size_ns
    }

    /// The pipeline watermark (nanoseconds since the epoch), once any record has arrived.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Minimum watermark of the partitions other than `partition` that are still active.
    fn others_min(&self, partition: PartitionId, now: Instant) -> Option<i64> {
        self.partitions
            .iter()
            .filter(|(p, c)| **p != partition && c.max_event_ns != i64::MIN && now.duration_since(c.last_active) < self.idle_timeout)
            .map(|(_, c)| c.max_event_ns.saturating_sub(self.lateness_ns))
            .min()
    }

    /// Assigns each event time of a batch from `partition` to its window, advancing the watermarks.
    pub fn assign(&mut self, partition: PartitionId, times_ns: &[i64], now: Instant) -> Assignment {
        let others = self.others_min(partition, now);
        let clock = self.partitions.entry(partition).or_insert(PartitionClock { max_event_ns: i64::MIN, last_active: now });
        clock.last_active = now;
        let mut out =
            Assignment { window_starts: Vec::with_capacity(times_ns.len()), late: Vec::with_capacity(times_ns.len()), late_count: 0 };
        let mut watermark = self.watermark.unwrap_or(i64::MIN);
        let mut own = clock.max_event_ns.saturating_sub(self.lateness_ns);
        for &t in times_ns {
            let start = window_start(t, self.size_ns);
            let late = clock.max_event_ns != i64::MIN && start + self.size_ns <= own;
            out.window_starts.push(start);
            out.late.push(late);
            out.late_count += usize::from(late);
            if t > clock.max_event_ns {
                clock.max_event_ns = t;
                own = t.saturating_sub(self.lateness_ns);
                watermark = watermark.max(others.map_or(own, |o| o.min(own)));
            }
        }
        if watermark != i64::MIN {
            self.watermark = Some(watermark);
        }
        out
    }

    /// A partition's own watermark: its largest event time minus the lateness.
    pub fn partition_watermark(&self, partition: PartitionId) -> Option<i64> {
        self.partitions.get(&partition).filter(|c| c.max_event_ns != i64::MIN).map(|c| c.max_event_ns.saturating_sub(self.lateness_ns))
    }

    /// The largest event time a partition has delivered (for checkpoints).
    pub fn partition_max_event(&self, partition: PartitionId) -> Option<i64> {
        self.partitions.get(&partition).map(|c| c.max_event_ns).filter(|&t| t != i64::MIN)
    }

    /// Whether a partition has delivered nothing for the idle timeout (or is unknown).
    pub fn is_idle(&self, partition: PartitionId, now: Instant) -> bool {
        self.partitions.get(&partition).is_none_or(|c| now.duration_since(c.last_active) >= self.idle_timeout)
    }

    /// Resumes a partition from a checkpoint: its own watermark continues where it was.
    pub fn restore(&mut self, partition: PartitionId, max_event_ns: Option<i64>, now: Instant) {
        self.partitions.insert(partition, PartitionClock { max_event_ns: max_event_ns.unwrap_or(i64::MIN), last_active: now });
    }

    /// Forgets a partition this instance no longer owns.
    pub fn forget(&mut self, partition: PartitionId) {
        self.partitions.remove(&partition);
    }

    /// Re-evaluates the watermark without new records: partitions that went idle stop holding it back.
    pub fn advance_idle(&mut self, now: Instant) {
        let active = self
            .partitions
            .values()
            .filter(|c| c.max_event_ns != i64::MIN && now.duration_since(c.last_active) < self.idle_timeout)
            .map(|c| c.max_event_ns.saturating_sub(self.lateness_ns))
            .min();
        if let Some(w) = active {
            self.watermark = Some(self.watermark.map_or(w, |old| old.max(w)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: i64 = 1_000_000_000;

    #[test]
    fn window_start_is_aligned_and_contains_t() {
        assert_eq!(window_start(25 * S, 10 * S), 20 * S);
        assert_eq!(window_start(20 * S, 10 * S), 20 * S);
        assert_eq!(window_start(-1, 10 * S), -10 * S);
    }

    #[test]
    fn records_after_their_window_closed_are_late() {
        let now = Instant::now();
        let mut w = Watermarks::new(10 * S, 5 * S, Duration::from_secs(60));
        // max 31 s → watermark 26 s: window [10, 20) is closed, [20, 30) is open.
        let a = w.assign(0, &[31 * S, 19 * S, 21 * S, 9 * S], now);
        assert_eq!(a.late, vec![false, true, false, true]);
        assert_eq!(a.window_starts, vec![30 * S, 10 * S, 20 * S, 0]);
        assert_eq!(w.watermark(), Some(26 * S));
    }

    #[test]
    fn slowest_active_partition_holds_the_watermark() {
        let t0 = Instant::now();
        let mut w = Watermarks::new(10 * S, 0, Duration::from_secs(10));
        w.assign(0, &[100 * S], t0);
        w.assign(1, &[50 * S], t0);
        assert_eq!(w.watermark(), Some(100 * S), "partition 1 arrived after 0 advanced it; never moves back");
        w.assign(0, &[200 * S], t0);
        assert_eq!(w.watermark(), Some(100 * S), "partition 1 at 50 s holds it");
        w.assign(1, &[150 * S], t0);
        assert_eq!(w.watermark(), Some(150 * S));
        // Partition 1 goes idle: partition 0 alone decides.
        w.advance_idle(t0 + Duration::from_secs(11));
        assert_eq!(w.watermark(), Some(150 * S), "both idle: nothing moves");
        w.assign(0, &[300 * S], t0 + Duration::from_secs(12));
        assert_eq!(w.watermark(), Some(300 * S));
    }

    #[test]
    fn lateness_is_judged_by_the_records_own_partition() {
        let t0 = Instant::now();
        let mut w = Watermarks::new(10 * S, 5 * S, Duration::from_secs(60));
        w.assign(0, &[100 * S], t0);
        w.assign(1, &[200 * S], t0);
        w.assign(0, &[300 * S], t0);
        assert_eq!(w.watermark(), Some(195 * S));
        // A partition taken over from a checkpoint at 150 s: its records behind the pipeline
        // watermark are on time, because its own stream has not passed them.
        w.restore(2, Some(150 * S), t0);
        let a = w.assign(2, &[151 * S, 140 * S, 120 * S], t0);
        assert_eq!(a.late, vec![false, false, true]);
        assert_eq!(w.partition_watermark(2), Some(146 * S));
        assert_eq!(w.watermark(), Some(195 * S), "never moves back");
        w.forget(2);
        assert!(w.is_idle(2, t0));
    }

    proptest! {
        /// Any record whose delay behind the largest time seen is under the lateness is on time;
        /// any whose delay is at least lateness + window size is late.
        #[test]
        fn lateness_bounds(times in proptest::collection::vec(0i64..1_000_000, 1..300), size in 1i64..100, lateness in 0i64..300) {
            let mut w = Watermarks::new(size, lateness, Duration::from_secs(3600));
            let a = w.assign(0, &times, Instant::now());
            let mut max = i64::MIN;
            for (i, &t) in times.iter().enumerate() {
                if max != i64::MIN {
                    let delay = max - t;
                    if delay < lateness { prop_assert!(!a.late[i], "delay {delay} < lateness {lateness} but late"); }
                    if delay >= lateness + size { prop_assert!(a.late[i], "delay {delay} ≥ lateness+size but on time"); }
                } else {
                    prop_assert!(!a.late[i]);
                }
                let s = a.window_starts[i];
                prop_assert!(s <= t && t < s + size && s.rem_euclid(size) == 0);
                max = max.max(t);
            }
        }

        /// Cutting a stream into batches changes nothing, and the watermark never moves back.
        #[test]
        fn batching_does_not_matter(times in proptest::collection::vec(0i64..100_000, 1..300), cuts in proptest::collection::vec(0usize..300, 0..10)) {
            let now = Instant::now();
            let mut whole = Watermarks::new(100, 250, Duration::from_secs(3600));
            let expected = whole.assign(0, &times, now);
            let mut pieces = Watermarks::new(100, 250, Duration::from_secs(3600));
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(times.len())).collect();
            cuts.push(0);
            cuts.push(times.len());
            cuts.sort_unstable();
            let mut got = Assignment::default();
            let mut last_wm = None;
            for pair in cuts.windows(2) {
                let a = pieces.assign(0, &times[pair[0]..pair[1]], now);
                got.window_starts.extend(a.window_starts);
                got.late.extend(a.late);
                got.late_count += a.late_count;
                prop_assert!(pieces.watermark() >= last_wm);
                last_wm = pieces.watermark();
            }
            prop_assert_eq!(got, expected);
            prop_assert_eq!(pieces.watermark(), whole.watermark());
        }
    }
}
