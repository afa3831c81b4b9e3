//! Event-time bookkeeping: window assignment, per-exporter clocks, lateness and the two
//! watermarks derived from them.
//!
//! Real exporters disagree: one router's clock runs minutes behind another's on the same
//! partition, and one export can hold flows that ended a minute apart. So event time is kept
//! per *clock*: one per (partition, exporter) for flows, one per partition for telemetry
//! (`exporter` 0). The invariants:
//!
//! - **Lateness is judged by the record's own clock.** A record is late when its window ends at
//!   or before its clock's largest event time minus the allowed lateness — or when it is older
//!   than its partition's newest clock by more than the correction horizon. Both depend only on
//!   the partition's own stream, record by record, so a partition replayed from a checkpoint (or
//!   taken over by another instance) judges its records exactly as before, however they were
//!   cut into batches.
//! - **The publish watermark** decides when a window is first published: the minimum, over
//!   active clocks that are not lagging, of the clock's largest event time minus the publish
//!   delay. Idle clocks (nothing for the idle timeout) and lagging ones (further behind the
//!   newest clock *of their partition* than the allowed skew) do not hold it back: a router
//!   whose clock is behind its partition's others delays only its own figures, which arrive as
//!   corrections. A whole partition behind the others does hold it back (it is behind on
//!   reading, as when a backlog is consumed). It never moves back.
//! - **A partition's close watermark** (minimum over its active clocks of largest event time
//!   minus the allowed lateness) says when no more on-time records of that partition can reach
//!   a window: its contribution to an already published window is then final.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::types::PartitionId;

/// Start of the tumbling window of `size_ns` that contains `t_ns`.
#[inline]
pub fn window_start(t_ns: i64, size_ns: i64) -> i64 {
    t_ns.div_euclid(size_ns) * size_ns
}

/// An exporter's address as a number (0 for records without an exporter).
pub type ExporterKey = u128;

#[derive(Debug, Clone, Copy)]
struct Clock {
    max_event_ns: i64,
    last_active: Instant,
}

#[derive(Debug, Clone)]
struct PartitionClocks {
    clocks: HashMap<ExporterKey, Clock>,
    /// Largest event time of any of the partition's clocks (`i64::MIN`: none yet).
    lead_ns: i64,
    /// When the partition was registered (assigned, restored or first seen).
    since: Instant,
    /// Whether it has delivered anything since (records, or messages that were all rejected).
    heard: bool,
}

impl PartitionClocks {
    fn new(lead_ns: i64, now: Instant) -> Self {
        Self { clocks: HashMap::new(), lead_ns, since: now, heard: lead_ns != i64::MIN }
    }
}

/// How far behind a clock may fall, and how long states wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub size_ns: i64,
    /// Allowed lateness behind the record's own clock.
    pub lateness_ns: i64,
    /// How long after a window's end (by event time) it is first published.
    pub publish_delay_ns: i64,
    /// A clock further behind the newest clock of its partition than this does not hold publication back.
    pub max_skew_ns: i64,
    /// Records older than their partition's newest event time by more than this are late
    /// (published windows are kept this long for corrections).
    pub horizon_ns: i64,
    pub idle_timeout: Duration,
}

/// Per-clock event-time progress and the watermarks derived from it.
#[derive(Debug, Clone)]
pub struct Watermarks {
    timing: Timing,
    partitions: HashMap<PartitionId, PartitionClocks>,
    /// Monotonic: windows ending at or before it are published.
    watermark: Option<i64>,
    /// Whether a registered partition not heard from yet holds publication back until it goes
    /// idle (see [`Watermarks::wait_for_unheard`]).
    wait_for_unheard: bool,
}

/// Where each record of a batch goes: its window start, or late.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    pub window_starts: Vec<i64>,
    /// `late[i]`: record `i` arrived after its window closed for its clock.
    pub late: Vec<bool>,
    pub late_count: usize,
}

impl Watermarks {
    pub fn new(timing: Timing) -> Self {
        assert!(timing.size_ns > 0 && timing.lateness_ns >= 0 && timing.publish_delay_ns >= 0);
        Self { timing, partitions: HashMap::new(), watermark: None, wait_for_unheard: false }
    }

    /// Registered partitions not heard from yet hold publication back until they go idle.
    /// Consumers of Kafka need it: a backlog over several topics is read unevenly at first (a
    /// topic of small probe messages reaches minutes of event time before the first flow
    /// arrives), and the site stage of a scale-out hears from each source one span (many
    /// windows) at a time. Without it those windows would be published without the silent
    /// partitions' records and corrected later.
    pub fn wait_for_unheard(&mut self) {
        self.wait_for_unheard = true;
    }

    pub fn size_ns(&self) -> i64 {
        self.timing.size_ns
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The publish watermark (nanoseconds since the epoch), once any record has arrived.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Assigns each event time of a batch from `partition` to its window, advancing its clocks.
    /// `exporters[i]` names record `i`'s clock (none: one clock for the partition).
    pub fn assign(&mut self, partition: PartitionId, times_ns: &[i64], exporters: Option<&[ExporterKey]>, now: Instant) -> Assignment {
        let t = self.timing;
        let p = self.partitions.entry(partition).or_insert_with(|| PartitionClocks::new(i64::MIN, now));
        p.heard = true;
        let mut out =
            Assignment { window_starts: Vec::with_capacity(times_ns.len()), late: Vec::with_capacity(times_ns.len()), late_count: 0 };
        let fresh = Clock { max_event_ns: i64::MIN, last_active: now };
        let mut current: Option<(ExporterKey, Clock)> = None;
        for (i, &time) in times_ns.iter().enumerate() {
            let key = exporters.map_or(0, |e| e[i]);
            // Records of one exporter come in runs: keep its clock at hand between them.
            let clock = match &mut current {
                Some((k, c)) if *k == key => c,
                _ => {
                    if let Some((k, c)) = current.take() {
                        p.clocks.insert(k, c);
                    }
                    let c = p.clocks.get(&key).copied().unwrap_or(fresh);
                    &mut current.insert((key, Clock { last_active: now, ..c })).1
                }
            };
            let start = window_start(time, t.size_ns);
            let end = start + t.size_ns;
            let behind_own = clock.max_event_ns != i64::MIN && end <= clock.max_event_ns.saturating_sub(t.lateness_ns);
            let beyond_horizon = p.lead_ns != i64::MIN && end <= p.lead_ns.saturating_sub(t.horizon_ns);
            let late = behind_own || beyond_horizon;
            out.window_starts.push(start);
            out.late.push(late);
            out.late_count += usize::from(late);
            if time > clock.max_event_ns {
                clock.max_event_ns = time;
                p.lead_ns = p.lead_ns.max(time);
            }
        }
        if let Some((k, c)) = current {
            p.clocks.insert(k, c);
        }
        self.advance(now);
        out
    }

    /// Re-evaluates the publish watermark: the slowest partition holds it, where a partition
    /// is as far as its slowest active clock that is within the allowed skew of the partition's
    /// newest one. Idle clocks, and a router whose clock lags the others of its partition, do not
    /// hold it back; a partition that is behind because it has not been read yet (a backlog
    /// consumed unevenly, a replay) does: otherwise every window would be published early and
    /// corrected again as each partition caught up. Never moves it back.
    pub fn advance(&mut self, now: Instant) {
        let idle = self.timing.idle_timeout;
        let is_active = |c: &&Clock| c.max_event_ns != i64::MIN && now.duration_since(c.last_active) < idle;
        let slowest = self
            .partitions
            .values()
            .filter_map(|pc| {
                let unheard = !pc.heard && now.duration_since(pc.since) < idle;
                if self.wait_for_unheard && unheard {
                    return Some(i64::MIN);
                }
                let lead = pc.clocks.values().filter(is_active).map(|c| c.max_event_ns).max()?;
                let cutoff = lead.saturating_sub(self.timing.max_skew_ns);
                pc.clocks.values().filter(is_active).map(|c| c.max_event_ns).filter(|&t| t >= cutoff).min()
            })
            .min();
        let Some(slowest) = slowest.filter(|&t| t != i64::MIN) else { return };
        let w = slowest.saturating_sub(self.timing.publish_delay_ns);
        self.watermark = Some(self.watermark.map_or(w, |old| old.max(w)));
    }

    /// The partition's close watermark: the minimum over its active clocks of the largest event
    /// time minus the lateness (`None` when none is active: nothing more is expected from it).
    pub fn close_watermark(&self, partition: PartitionId, now: Instant) -> Option<i64> {
        let pc = self.partitions.get(&partition)?;
        pc.clocks
            .values()
            .filter(|c| c.max_event_ns != i64::MIN && now.duration_since(c.last_active) < self.timing.idle_timeout)
            .map(|c| c.max_event_ns.saturating_sub(self.timing.lateness_ns))
            .min()
    }

    /// Windows ending at or before this can receive no on-time record from any active partition
    /// (the minimum over active partitions of the newest event time minus the correction
    /// horizon; `None`: none active). A partition registered but without records yet holds it
    /// back entirely until it goes idle. An idle partition does not hold it: if it comes back with
    /// old records, their windows may be gone (counted as late contributions).
    pub fn horizon(&self, now: Instant) -> Option<i64> {
        let idle = self.timing.idle_timeout;
        self.partitions
            .values()
            .filter(|pc| now.duration_since(pc.since) < idle || pc.clocks.values().any(|c| now.duration_since(c.last_active) < idle))
            .map(|pc| if pc.lead_ns == i64::MIN { i64::MIN } else { pc.lead_ns.saturating_sub(self.timing.horizon_ns) })
            .min()
    }

    /// Registers a partition before its first record (an assignment): until it delivers or goes
    /// idle, it keeps the published windows correctable.
    pub fn register(&mut self, partition: PartitionId, now: Instant) {
        self.partitions.entry(partition).or_insert_with(|| PartitionClocks::new(i64::MIN, now));
    }

    /// The largest event time a partition has delivered (for checkpoints).
    pub fn partition_max_event(&self, partition: PartitionId) -> Option<i64> {
        self.partitions.get(&partition).map(|c| c.lead_ns).filter(|&t| t != i64::MIN)
    }

    /// A partition's clocks: `(exporter, largest event time)` (for checkpoints).
    pub fn partition_clocks(&self, partition: PartitionId) -> Vec<(ExporterKey, i64)> {
        let mut clocks: Vec<_> = self
            .partitions
            .get(&partition)
            .map(|pc| pc.clocks.iter().filter(|(_, c)| c.max_event_ns != i64::MIN).map(|(k, c)| (*k, c.max_event_ns)).collect())
            .unwrap_or_default();
        clocks.sort_unstable();
        clocks
    }

    /// Resumes a partition from a checkpoint: its clocks continue where they were. Checkpoints
    /// without clocks (older versions) give one clock for the partition at `max_event_ns`.
    pub fn restore(&mut self, partition: PartitionId, max_event_ns: Option<i64>, clocks: &[(ExporterKey, i64)], now: Instant) {
        let mut pc = PartitionClocks::new(max_event_ns.unwrap_or(i64::MIN), now);
        for &(k, t) in clocks {
            pc.clocks.insert(k, Clock { max_event_ns: t, last_active: now });
            pc.lead_ns = pc.lead_ns.max(t);
        }
        if clocks.is_empty()
            && let Some(t) = max_event_ns
        {
            pc.clocks.insert(0, Clock { max_event_ns: t, last_active: now });
        }
        self.partitions.insert(partition, pc);
    }

    /// Advances a partition's clocks to those another stage reports (the site stage of a
    /// scale-out deployment is fed partial aggregates and the clocks of the partition that made
    /// them, not records). Each clock only moves forward; a clock counts as active when it
    /// moves, so one that stops moving turns idle after the idle timeout, as its records would.
    pub fn advance_to(&mut self, partition: PartitionId, clocks: &[(ExporterKey, i64)], now: Instant) {
        let pc = self.partitions.entry(partition).or_insert_with(|| PartitionClocks::new(i64::MIN, now));
        pc.heard = true;
        for &(k, t) in clocks {
            let clock = pc.clocks.entry(k).or_insert(Clock { max_event_ns: i64::MIN, last_active: now });
            if t > clock.max_event_ns {
                *clock = Clock { max_event_ns: t, last_active: now };
            }
            pc.lead_ns = pc.lead_ns.max(t);
        }
    }

    /// A partition delivered messages that gave no record (all rejected): it has been read,
    /// so it no longer holds publication back as unheard.
    pub fn heard_from(&mut self, partition: PartitionId, now: Instant) {
        self.partitions.entry(partition).or_insert_with(|| PartitionClocks::new(i64::MIN, now)).heard = true;
    }

    /// Forgets a partition this instance no longer owns.
    pub fn forget(&mut self, partition: PartitionId) {
        self.partitions.remove(&partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: i64 = 1_000_000_000;

    fn timing(size: i64, lateness: i64) -> Timing {
        Timing {
            size_ns: size,
            lateness_ns: lateness,
            publish_delay_ns: lateness,
            max_skew_ns: i64::MAX,
            horizon_ns: i64::MAX,
            idle_timeout: Duration::from_secs(3600),
        }
    }

    #[test]
    fn window_start_is_aligned_and_contains_t() {
        assert_eq!(window_start(25 * S, 10 * S), 20 * S);
        assert_eq!(window_start(20 * S, 10 * S), 20 * S);
        assert_eq!(window_start(-1, 10 * S), -10 * S);
    }

    #[test]
    fn records_after_their_window_closed_are_late() {
        let now = Instant::now();
        let mut w = Watermarks::new(Timing { idle_timeout: Duration::from_secs(60), ..timing(10 * S, 5 * S) });
        // max 31 s → watermark 26 s: window [10, 20) is closed, [20, 30) is open.
        let a = w.assign(0, &[31 * S, 19 * S, 21 * S, 9 * S], None, now);
        assert_eq!(a.late, vec![false, true, false, true]);
        assert_eq!(a.window_starts, vec![30 * S, 10 * S, 20 * S, 0]);
        assert_eq!(w.watermark(), Some(26 * S));
    }

    #[test]
    fn each_exporter_is_judged_by_its_own_clock() {
        let now = Instant::now();
        let mut w = Watermarks::new(timing(10 * S, 5 * S));
        // Exporter 2's clock is 300 s behind exporter 1's on the same partition.
        let a = w.assign(0, &[400 * S, 100 * S, 101 * S, 390 * S, 80 * S], Some(&[1, 2, 2, 1, 2]), now);
        assert_eq!(a.late, vec![false, false, false, false, true], "only 80 s is beyond exporter 2's own lateness");
        assert_eq!(w.partition_clocks(0), vec![(1, 400 * S), (2, 101 * S)]);
        assert_eq!(w.close_watermark(0, now), Some(96 * S), "the slow exporter holds its partition's contributions open");
    }

    #[test]
    fn a_lagging_clock_does_not_hold_publication_back() {
        let now = Instant::now();
        let lagging = |max_skew_ns| {
            let mut w = Watermarks::new(Timing { max_skew_ns, ..timing(10 * S, 5 * S) });
            w.assign(0, &[100 * S], Some(&[2]), now);
            w.assign(0, &[400 * S], Some(&[1]), now);
            w
        };
        assert_eq!(lagging(60 * S).watermark(), Some(395 * S), "exporter 2 is 300 s behind exporter 1 of its partition: beyond the skew");
        let mut w = lagging(600 * S);
        assert_eq!(w.watermark(), Some(95 * S), "within the skew exporter 2 holds it");
        w.assign(0, &[200 * S], Some(&[2]), now);
        assert_eq!(w.watermark(), Some(195 * S));
    }

    #[test]
    fn a_partition_not_yet_read_holds_publication_back() {
        // A backlog read unevenly: partition 1 is 300 s behind partition 0 because it has not
        // been read that far yet, not because its router's clock is wrong.
        let now = Instant::now();
        let mut w = Watermarks::new(Timing { max_skew_ns: 15 * S, ..timing(10 * S, 5 * S) });
        w.assign(1, &[100 * S], Some(&[2]), now);
        w.assign(0, &[400 * S], Some(&[1]), now);
        assert_eq!(w.watermark(), Some(95 * S));
        w.assign(1, &[450 * S], Some(&[2]), now);
        assert_eq!(w.watermark(), Some(395 * S), "now partition 0 is the slowest");
    }

    #[test]
    fn the_site_stage_waits_for_partitions_not_heard_from_until_they_go_idle() {
        let t0 = Instant::now();
        let timing = Timing { idle_timeout: Duration::from_secs(10), ..timing(10 * S, 0) };
        let (mut strict, mut lax) = (Watermarks::new(timing), Watermarks::new(timing));
        strict.wait_for_unheard();
        for w in [&mut strict, &mut lax] {
            w.register(0, t0);
            w.register(1, t0);
            w.advance_to(0, &[(7, 300 * S)], t0);
            w.advance(t0);
        }
        assert_eq!(lax.watermark(), Some(300 * S), "one reading records publishes as soon as it hears from one");
        assert_eq!(strict.watermark(), None, "partition 1 has not sent its first span yet");
        strict.advance_to(1, &[(8, 200 * S)], t0);
        strict.advance(t0);
        assert_eq!(strict.watermark(), Some(200 * S));
        let mut silent = Watermarks::new(timing);
        silent.wait_for_unheard();
        silent.register(1, t0);
        silent.advance_to(0, &[(7, 300 * S)], t0 + Duration::from_secs(11));
        silent.advance(t0 + Duration::from_secs(11));
        assert_eq!(silent.watermark(), Some(300 * S), "a partition silent since its registration went idle");
        let mut garbage = Watermarks::new(timing);
        garbage.wait_for_unheard();
        garbage.register(1, t0);
        garbage.advance_to(0, &[(7, 300 * S)], t0);
        garbage.heard_from(1, t0);
        garbage.advance(t0);
        assert_eq!(garbage.watermark(), Some(300 * S), "a partition read, its records all rejected, holds nothing");
    }

    #[test]
    fn idle_clocks_stop_holding_the_watermark() {
        let t0 = Instant::now();
        let mut w = Watermarks::new(Timing { idle_timeout: Duration::from_secs(10), ..timing(10 * S, 0) });
        w.assign(0, &[100 * S], None, t0);
        w.assign(1, &[50 * S], None, t0);
        w.assign(0, &[200 * S], None, t0);
        assert_eq!(w.watermark(), Some(100 * S), "partition 1 at 50 s holds it; never moves back");
        w.assign(0, &[300 * S], None, t0 + Duration::from_secs(11));
        assert_eq!(w.watermark(), Some(300 * S), "partition 1 went idle");
        assert_eq!(w.close_watermark(1, t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn records_beyond_the_horizon_are_late_and_restore_keeps_the_clocks() {
        let t0 = Instant::now();
        let mut w = Watermarks::new(Timing { horizon_ns: 100 * S, ..timing(10 * S, 5 * S) });
        let a = w.assign(0, &[300 * S, 195 * S, 205 * S], Some(&[1, 2, 2]), t0);
        assert_eq!(a.late, vec![false, true, false], "exporter 2's first record is 105 s behind the partition's newest");
        assert_eq!(w.horizon(t0), Some(200 * S));
        let clocks = w.partition_clocks(0);
        let mut back = Watermarks::new(w.timing());
        back.restore(0, w.partition_max_event(0), &clocks, t0);
        let again = [290 * S, 198 * S, 203 * S];
        assert_eq!(back.assign(0, &again, Some(&[1, 2, 2]), t0), w.assign(0, &again, Some(&[1, 2, 2]), t0));
    }

    proptest! {
        /// Any record whose delay behind the largest time of its exporter is under the lateness
        /// is on time; any whose delay is at least lateness + window size is late.
        #[test]
        fn lateness_bounds(records in proptest::collection::vec((0i64..1_000_000, 0u128..3), 1..300), size in 1i64..100, lateness in 0i64..300) {
            let mut w = Watermarks::new(timing(size, lateness));
            let (times, exporters): (Vec<i64>, Vec<u128>) = records.iter().copied().unzip();
            let a = w.assign(0, &times, Some(&exporters), Instant::now());
            let mut max: HashMap<u128, i64> = HashMap::new();
            for (i, &(t, e)) in records.iter().enumerate() {
                if let Some(&m) = max.get(&e) {
                    let delay = m - t;
                    if delay < lateness { prop_assert!(!a.late[i], "delay {delay} < lateness {lateness} but late"); }
                    if delay >= lateness + size { prop_assert!(a.late[i], "delay {delay} ≥ lateness+size but on time"); }
                } else {
                    prop_assert!(!a.late[i]);
                }
                let s = a.window_starts[i];
                prop_assert!(s <= t && t < s + size && s.rem_euclid(size) == 0);
                let m = max.entry(e).or_insert(t);
                *m = (*m).max(t);
            }
        }

        /// Cutting a stream into batches changes no verdict, and the watermark never moves back.
        /// (When a window is first published may differ: corrections make the outputs the same.)
        #[test]
        fn batching_does_not_matter(records in proptest::collection::vec((0i64..100_000, 0u128..3), 1..300), cuts in proptest::collection::vec(0usize..300, 0..10)) {
            let now = Instant::now();
            let (times, exporters): (Vec<i64>, Vec<u128>) = records.iter().copied().unzip();
            let t = Timing { horizon_ns: 5_000, ..timing(100, 250) };
            let mut whole = Watermarks::new(t);
            let expected = whole.assign(0, &times, Some(&exporters), now);
            let mut pieces = Watermarks::new(t);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(times.len())).collect();
            cuts.push(0);
            cuts.push(times.len());
            cuts.sort_unstable();
            let mut got = Assignment::default();
            let mut last_wm = None;
            for pair in cuts.windows(2) {
                let a = pieces.assign(0, &times[pair[0]..pair[1]], Some(&exporters[pair[0]..pair[1]]), now);
                got.window_starts.extend(a.window_starts);
                got.late.extend(a.late);
                got.late_count += a.late_count;
                prop_assert!(pieces.watermark() >= last_wm);
                last_wm = pieces.watermark();
            }
            prop_assert_eq!(got, expected);
        }
    }
}
