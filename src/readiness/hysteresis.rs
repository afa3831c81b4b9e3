//! One policy row's state over time: hysteresis on the way back, hold time both ways.
//!
//! A row's target level comes from its value: worsening uses the thresholds, improving must
//! pass the clear thresholds. The shown level follows the target only after the target has held
//! for the hold time, so a signal oscillating around a threshold does not flap.

use serde::{Deserialize, Serialize};

use super::policy::{Metric, Threshold};

/// Severity of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Ready,
    Degraded,
    NotReady,
}

fn worse(metric: Metric, value: f64, threshold: f64) -> bool {
    if metric.higher_is_worse() { value > threshold } else { value < threshold }
}

/// The level `value` reaches with the entry thresholds.
pub fn level_of(metric: Metric, value: f64, t: &Threshold) -> Level {
    if worse(metric, value, t.not_ready) {
        Level::NotReady
    } else if worse(metric, value, t.degraded) {
        Level::Degraded
    } else {
        Level::Ready
    }
}

/// The level `value` reaches with the clear thresholds (the way back to healthy).
pub fn clear_level_of(metric: Metric, value: f64, t: &Threshold, hysteresis_ratio: f64) -> Level {
    let (degraded, not_ready) = t.clear_levels(metric, hysteresis_ratio);
    level_of(metric, value, &Threshold { degraded, not_ready, clear_degraded: None, clear_not_ready: None })
}

/// The level a row should move to from `current`, given a new value.
pub fn target_level(metric: Metric, value: f64, t: &Threshold, hysteresis_ratio: f64, current: Option<Level>) -> Level {
    let entry = level_of(metric, value, t);
    match current {
        Some(c) if entry < c => c.min(clear_level_of(metric, value, t, hysteresis_ratio)),
        _ => entry,
    }
}

/// The shown level of one row plus the change waiting for its hold time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeldLevel {
    current: Option<Level>,
    pending: Option<(Level, i64)>,
}

impl HeldLevel {
    pub fn current(&self) -> Option<Level> {
        self.current
    }

    /// The level waiting for its hold time, and since when (event time, ns).
    pub fn pending(&self) -> Option<(Level, i64)> {
        self.pending
    }

    /// Moves toward `target` at event time `now_ns`; a missing value (no data) clears at once.
    pub fn update(&mut self, target: Option<Level>, now_ns: i64, hold_ns: i64) -> Option<Level> {
        match (self.current, target) {
            (_, None) => *self = Self::default(),
            (None, Some(t)) => *self = Self { current: Some(t), pending: None },
            (Some(c), Some(t)) if c == t => self.pending = None,
            (Some(c), Some(t)) => match self.pending {
                // Still on the same side of the current level (worse, or better): the clock
                // keeps running, aimed at the target closest to the current level, so a signal
                // alternating between degraded and not ready still leaves `ready` after the hold.
                Some((p, since)) if (p > c) == (t > c) => {
                    let aim = if t > c { p.min(t) } else { p.max(t) };
                    if now_ns - since >= hold_ns {
                        *self = Self { current: Some(aim), pending: None };
                    } else {
                        self.pending = Some((aim, since));
                    }
                }
                _ => self.pending = Some((t, now_ns)),
            },
        }
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    fn rtt() -> Threshold {
        Threshold { degraded: 0.1, not_ready: 0.3, clear_degraded: None, clear_not_ready: None }
    }

    fn step(h: &mut HeldLevel, v: f64, t: i64) -> Option<Level> {
        let target = target_level(Metric::Rtt, v, &rtt(), 0.1, h.current());
        h.update(Some(target), t * S, 30 * S)
    }

    #[test]
    fn no_flapping_on_a_signal_oscillating_around_a_threshold() {
        let mut h = HeldLevel::default();
        assert_eq!(step(&mut h, 0.05, 0), Some(Level::Ready));
        // 0.095 / 0.105 around the 0.1 threshold, every 10 s for 10 minutes.
        let mut changes = 0;
        let mut last = h.current();
        for i in 1..60 {
            let v = if i % 2 == 0 { 0.095 } else { 0.105 };
            let now = step(&mut h, v, i * 10);
            changes += usize::from(now != last);
            last = now;
        }
        assert_eq!(changes, 0, "the target never holds 30 s, so the state never changes");
        assert_eq!(h.current(), Some(Level::Ready));
    }

    #[test]
    fn changes_after_hold_and_clears_only_past_the_hysteresis() {
        let mut h = HeldLevel::default();
        step(&mut h, 0.05, 0);
        assert_eq!(step(&mut h, 0.35, 10), Some(Level::Ready), "held for 0 s");
        assert_eq!(step(&mut h, 0.35, 20), Some(Level::Ready), "held for 10 s");
        assert_eq!(step(&mut h, 0.35, 40), Some(Level::NotReady), "held for 30 s");
        // 0.29 is below the 0.3 threshold but above its clear value 0.27: stays not ready.
        for t in [50, 60, 70, 80, 90] {
            assert_eq!(step(&mut h, 0.29, t), Some(Level::NotReady));
        }
        // 0.26 clears not-ready, but is above 0.09 (the degraded clear value): degraded after hold.
        step(&mut h, 0.26, 100);
        assert_eq!(step(&mut h, 0.26, 130), Some(Level::Degraded));
    }

    #[test]
    fn a_target_alternating_between_bad_levels_still_leaves_ready() {
        let mut h = HeldLevel::default();
        step(&mut h, 0.05, 0);
        // 0.2 (degraded) and 0.4 (not ready) in turn, every 10 s.
        for (i, t) in (10..=40).step_by(10).enumerate() {
            step(&mut h, if i % 2 == 0 { 0.2 } else { 0.4 }, t);
        }
        assert_eq!(h.current(), Some(Level::Degraded), "bad for 30 s: at least degraded");
    }

    #[test]
    fn lower_is_worse_rows_clear_upwards() {
        let mos = Threshold { degraded: 4.0, not_ready: 3.6, clear_degraded: None, clear_not_ready: None };
        assert_eq!(level_of(Metric::Mos, 3.5, &mos), Level::NotReady);
        assert_eq!(level_of(Metric::Mos, 3.8, &mos), Level::Degraded);
        // From not ready, 3.7 is above 3.6 but below its clear value 3.96: still not ready.
        assert_eq!(target_level(Metric::Mos, 3.7, &mos, 0.1, Some(Level::NotReady)), Level::NotReady);
        assert_eq!(target_level(Metric::Mos, 4.5, &mos, 0.1, Some(Level::NotReady)), Level::Ready);
    }

    #[test]
    fn utilisation_clears_below_87_percent() {
        let u = Threshold { degraded: 0.7, not_ready: 0.9, clear_degraded: None, clear_not_ready: Some(0.87) };
        assert_eq!(target_level(Metric::Utilisation, 0.88, &u, 0.1, Some(Level::NotReady)), Level::NotReady);
        assert_eq!(target_level(Metric::Utilisation, 0.86, &u, 0.1, Some(Level::NotReady)), Level::Degraded);
    }
}
