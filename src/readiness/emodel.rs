//! The simplified E-model (ITU-T G.107) used by common VoIP monitors: MOS from RTT, jitter, loss.

/// The best MOS the model gives (no delay, jitter or loss: R = 92.95), rounded up: no site
/// can clear a MOS row above it.
pub const MOS_MAX: f64 = 4.405;

/// MOS (1–4.5) from round-trip time and jitter in milliseconds and loss in percent.
pub fn mos(rtt_ms: f64, jitter_ms: f64, loss_pct: f64) -> f64 {
    let effective = rtt_ms + 2.0 * jitter_ms + 10.0;
    let r = if effective < 160.0 { 93.2 - effective / 40.0 } else { 93.2 - (effective - 120.0) / 10.0 };
    let r = r - 2.5 * loss_pct;
    if r < 0.0 {
        1.0
    } else if r > 100.0 {
        4.5
    } else {
        1.0 + 0.035 * r + 7e-6 * r * (r - 60.0) * (100.0 - r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-3
    }

    /// Worked by hand from the formula above.
    #[test]
    fn worked_examples() {
        // Healthy commune: eff = 28 + 8 + 10 = 46 → R = 93.2 − 1.15 = 92.05
        // MOS = 1 + 3.22175 + 7e-6·92.05·32.05·7.95 = 4.38593
        assert!(close(mos(28.0, 4.0, 0.0), 4.38593), "{}", mos(28.0, 4.0, 0.0));
        // Congested: eff = 150 + 40 + 10 = 200 → R = 93.2 − 8 = 85.2; loss 2 % → R = 80.2
        // MOS = 1 + 2.807 + 7e-6·80.2·20.2·19.8 = 4.03152
        assert!(close(mos(150.0, 20.0, 2.0), 4.03152), "{}", mos(150.0, 20.0, 2.0));
        // Long satellite hop: eff = 600 + 20 + 10 = 630 → R = 93.2 − 51 = 42.2
        // MOS = 1 + 1.477 + 7e-6·42.2·(−17.8)·57.8 = 2.17308
        assert!(close(mos(600.0, 10.0, 0.0), 2.17308), "{}", mos(600.0, 10.0, 0.0));
        // Heavy loss drives R below 0: MOS 1.
        assert_eq!(mos(50.0, 5.0, 40.0), 1.0);
    }

    #[test]
    fn monotone_in_each_impairment() {
        let base = mos(40.0, 5.0, 0.5);
        assert!(mos(80.0, 5.0, 0.5) < base);
        assert!(mos(40.0, 15.0, 0.5) < base);
        assert!(mos(40.0, 5.0, 3.0) < base);
        assert!(mos(0.0, 0.0, 0.0) <= 4.5);
    }

    #[test]
    fn mos_max_is_the_model_best() {
        let best = mos(0.0, 0.0, 0.0);
        assert!(best <= MOS_MAX && best > MOS_MAX - 0.001, "{best}");
    }
}
