//! The readiness policy: thresholds per metric, evaluation period, hold time, hysteresis,
//! bandwidth profiles, and per-level or per-site overrides. Defaults are DESIGN.md's table;
//! `pipelines/hagiang/policy.yaml` spells them out.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One policy row. For metrics where higher is worse (RTT, jitter, loss, utilisation) a value
/// above `degraded` is degraded and above `not_ready` is not ready; where lower is worse (MOS,
/// spare capacity) a value below them is. A state clears only past the `clear_*` value
/// (hysteresis); unset, it is the threshold moved by `hysteresis_ratio` towards healthy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub degraded: f64,
    pub not_ready: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_degraded: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_not_ready: Option<f64>,
}

/// The metrics a verdict is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Rtt,
    Jitter,
    Loss,
    Mos,
    Utilisation,
    SpareCapacity,
    Freshness,
}

impl Metric {
    pub const ALL: [Metric; 7] =
        [Metric::Rtt, Metric::Jitter, Metric::Loss, Metric::Mos, Metric::Utilisation, Metric::SpareCapacity, Metric::Freshness];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Rtt => "rtt",
            Metric::Jitter => "jitter",
            Metric::Loss => "loss",
            Metric::Mos => "mos",
            Metric::Utilisation => "utilisation",
            Metric::SpareCapacity => "spare_capacity",
            Metric::Freshness => "freshness",
        }
    }

    /// Whether a larger value is worse.
    pub fn higher_is_worse(self) -> bool {
        !matches!(self, Metric::Mos | Metric::SpareCapacity)
    }
}

/// Thresholds of every row; rows left out keep their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// p95 of probe RTT means over the period, seconds.
    pub rtt_p95_seconds: Threshold,
    /// p95 of probe jitter over the period, seconds.
    pub jitter_p95_seconds: Threshold,
    /// Worst probe-round loss over the period, ratio 0–1.
    pub loss_max_ratio: Threshold,
    /// 5th percentile of the E-model MOS over the period.
    pub mos_p5: Threshold,
    /// Mean utilisation (throughput / capacity, worse direction) over the period.
    pub utilisation_mean_ratio: Threshold,
    /// Minimum spare capacity over the period divided by the meeting's need (worse direction).
    pub spare_capacity_need_ratio: Threshold,
}

impl Default for Thresholds {
    fn default() -> Self {
        let t = |degraded, not_ready| Threshold { degraded, not_ready, clear_degraded: None, clear_not_ready: None };
        Self {
            rtt_p95_seconds: t(0.100, 0.300),
            jitter_p95_seconds: t(0.030, 0.050),
            loss_max_ratio: t(0.01, 0.05),
            mos_p5: t(4.0, 3.6),
            utilisation_mean_ratio: Threshold { clear_not_ready: Some(0.87), ..t(0.70, 0.90) },
            spare_capacity_need_ratio: t(1.2, 1.0),
        }
    }
}

/// Partial thresholds for a level or a site.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdOverrides {
    pub rtt_p95_seconds: Option<Threshold>,
    pub jitter_p95_seconds: Option<Threshold>,
    pub loss_max_ratio: Option<Threshold>,
    pub mos_p5: Option<Threshold>,
    pub utilisation_mean_ratio: Option<Threshold>,
    pub spare_capacity_need_ratio: Option<Threshold>,
}

impl Thresholds {
    fn apply(&mut self, o: &ThresholdOverrides) {
        let set = |slot: &mut Threshold, v: &Option<Threshold>| {
            if let Some(v) = v {
                *slot = *v;
            }
        };
        set(&mut self.rtt_p95_seconds, &o.rtt_p95_seconds);
        set(&mut self.jitter_p95_seconds, &o.jitter_p95_seconds);
        set(&mut self.loss_max_ratio, &o.loss_max_ratio);
        set(&mut self.mos_p5, &o.mos_p5);
        set(&mut self.utilisation_mean_ratio, &o.utilisation_mean_ratio);
        set(&mut self.spare_capacity_need_ratio, &o.spare_capacity_need_ratio);
    }

    pub fn get(&self, m: Metric) -> Option<&Threshold> {
        match m {
            Metric::Rtt => Some(&self.rtt_p95_seconds),
            Metric::Jitter => Some(&self.jitter_p95_seconds),
            Metric::Loss => Some(&self.loss_max_ratio),
            Metric::Mos => Some(&self.mos_p5),
            Metric::Utilisation => Some(&self.utilisation_mean_ratio),
            Metric::SpareCapacity => Some(&self.spare_capacity_need_ratio),
            Metric::Freshness => None,
        }
    }
}

/// The readiness policy file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Rolling period each verdict looks back over, seconds.
    pub period_secs: u64,
    /// A row changes state only after its new state held this long, seconds.
    pub hold_secs: u64,
    /// Default hysteresis: a state clears only this fraction past its threshold.
    pub hysteresis_ratio: f64,
    /// Telemetry older than this many windows makes the verdict `unknown`.
    pub freshness_windows: u32,
    /// How long before a meeting its participants are watched, seconds.
    pub meeting_lead_secs: u64,
    /// Bandwidth profile used for a site's own verdict (no meeting).
    pub default_profile: String,
    /// Bandwidth need of each profile, bytes per second each way, IP overhead included.
    pub profiles: BTreeMap<String, f64>,
    pub thresholds: Thresholds,
    /// Overrides per level (`province`, `district`, `commune`).
    pub levels: BTreeMap<String, ThresholdOverrides>,
    /// Overrides per site id (win over levels).
    pub sites: BTreeMap<String, ThresholdOverrides>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            period_secs: 300,
            hold_secs: 30,
            hysteresis_ratio: 0.1,
            freshness_windows: 2,
            meeting_lead_secs: 1800,
            default_profile: "hd720".into(),
            // 2 Mbit/s (720p) / 4 Mbit/s (1080p) / 1 Mbit/s (SD) each way, × 1.2 for IP overhead.
            profiles: BTreeMap::from([("hd720".into(), 300_000.0), ("hd1080".into(), 600_000.0), ("sd".into(), 150_000.0)]),
            thresholds: Thresholds::default(),
            levels: BTreeMap::new(),
            sites: BTreeMap::new(),
        }
    }
}

/// The built-in policy file.
pub const EMBEDDED_POLICY: &str = include_str!("../../pipelines/hagiang/policy.yaml");

impl Policy {
    pub fn embedded() -> Self {
        Self::parse(EMBEDDED_POLICY, "<embedded>/pipelines/hagiang/policy.yaml").expect("the embedded policy is valid (tested)")
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, file: &str) -> Result<Self, String> {
        let p: Policy = serde_yaml::from_str(text).map_err(|e| format!("{file}: {e}"))?;
        p.validate().map_err(|e| format!("{file}: {e}"))?;
        Ok(p)
    }

    fn validate(&self) -> Result<(), String> {
        const DAY: u64 = 86_400;
        if !(1..=DAY).contains(&self.period_secs) {
            return Err(format!("period_secs: must be between 1 and {DAY}"));
        }
        if self.hold_secs > DAY {
            return Err(format!("hold_secs: must be at most {DAY}"));
        }
        if self.meeting_lead_secs > 7 * DAY {
            return Err(format!("meeting_lead_secs: must be at most {}", 7 * DAY));
        }
        if !(1..=1000).contains(&self.freshness_windows) {
            return Err("freshness_windows: must be between 1 and 1000".into());
        }
        if !(0.0..1.0).contains(&self.hysteresis_ratio) {
            return Err(format!("hysteresis_ratio: must be in [0, 1) (got {})", self.hysteresis_ratio));
        }
        if !self.profiles.contains_key(&self.default_profile) {
            return Err(format!("default_profile: {:?} is not one of profiles", self.default_profile));
        }
        if let Some((name, need)) = self.profiles.iter().find(|(_, n)| n.is_nan() || **n <= 0.0) {
            return Err(format!("profiles.{name}: need must be positive (got {need})"));
        }
        for level in self.levels.keys() {
            if !crate::inventory::LEVELS.contains(&level.as_str()) {
                return Err(format!("levels.{level}: not one of {}", crate::inventory::LEVELS.join(", ")));
            }
        }
        let mut all = vec![("thresholds".to_string(), self.thresholds.clone())];
        for (k, o) in self.levels.iter().chain(self.sites.iter()) {
            let mut t = self.thresholds.clone();
            t.apply(o);
            all.push((k.clone(), t));
        }
        for (name, t) in all {
            for m in Metric::ALL {
                let Some(th) = t.get(m) else { continue };
                let ordered = if m.higher_is_worse() { th.degraded <= th.not_ready } else { th.degraded >= th.not_ready };
                if !ordered {
                    return Err(format!(
                        "{name}: {} thresholds out of order (degraded {}, not_ready {})",
                        m.as_str(),
                        th.degraded,
                        th.not_ready
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks that per-site overrides name sites of the inventory.
    pub fn check_sites(&self, inventory: &crate::inventory::Inventory) -> Result<(), String> {
        match self.sites.keys().find(|id| inventory.by_id(id).is_none()) {
            Some(id) => Err(format!("sites.{id}: not a site of the inventory")),
            None => Ok(()),
        }
    }

    /// Thresholds for a site: defaults, then its level's overrides, then its own.
    pub fn thresholds_for(&self, site_id: &str, level: &str) -> Thresholds {
        let mut t = self.thresholds.clone();
        if let Some(o) = self.levels.get(level) {
            t.apply(o);
        }
        if let Some(o) = self.sites.get(site_id) {
            t.apply(o);
        }
        t
    }

    pub fn need_of(&self, profile: &str) -> Option<f64> {
        self.profiles.get(profile).copied()
    }

    pub fn default_need(&self) -> f64 {
        self.profiles[&self.default_profile]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_policy_is_the_design_table() {
        assert_eq!(Policy::embedded().thresholds, Thresholds::default());
        assert_eq!(Policy::embedded().period_secs, 300);
    }

    #[test]
    fn overrides_apply_level_then_site() {
        let p = Policy::parse(
            "levels:\n  commune:\n    rtt_p95_seconds: {degraded: 0.15, not_ready: 0.35}\nsites:\n  x:\n    rtt_p95_seconds: {degraded: 0.2, not_ready: 0.4}\n",
            "p.yaml",
        )
        .unwrap();
        assert_eq!(p.thresholds_for("y", "commune").rtt_p95_seconds.degraded, 0.15);
        assert_eq!(p.thresholds_for("x", "commune").rtt_p95_seconds.degraded, 0.2);
        assert_eq!(p.thresholds_for("y", "district").rtt_p95_seconds.degraded, 0.1);
    }

    #[test]
    fn bad_policies_are_named() {
        let e = Policy::parse("thresholds_typo: 1\n", "p.yaml").unwrap_err();
        assert!(e.contains("p.yaml") && e.contains("thresholds_typo"), "{e}");
        let e = Policy::parse("levels:\n  village: {}\n", "p.yaml").unwrap_err();
        assert!(e.contains("levels.village"), "{e}");
        let e = Policy::parse("levels:\n  commune:\n    mos_p5: {degraded: 3.0, not_ready: 3.5}\n", "p.yaml").unwrap_err();
        assert!(e.contains("mos thresholds out of order"), "{e}");
    }
}
