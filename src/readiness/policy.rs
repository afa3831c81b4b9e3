//! The readiness policy: thresholds per metric, evaluation period, hold time, hysteresis,
//! bandwidth profiles, and per-level or per-site overrides. `pipelines/hagiang/policy.yaml`
//! spells the defaults out and says where each value comes from; docs/readiness.md explains them.

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
    /// The site's connection status (down: not ready).
    Connection,
}

impl Metric {
    pub const ALL: [Metric; 8] = [
        Metric::Rtt,
        Metric::Jitter,
        Metric::Loss,
        Metric::Mos,
        Metric::Utilisation,
        Metric::SpareCapacity,
        Metric::Freshness,
        Metric::Connection,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Rtt => "rtt",
            Metric::Jitter => "jitter",
            Metric::Loss => "loss",
            Metric::Mos => "mos",
            Metric::Utilisation => "utilisation",
            Metric::SpareCapacity => "spare_capacity",
            Metric::Freshness => "freshness",
            Metric::Connection => "connection",
        }
    }

    /// Whether a larger value is worse.
    pub fn higher_is_worse(self) -> bool {
        !matches!(self, Metric::Mos | Metric::SpareCapacity)
    }

    /// The row's key in the policy file.
    pub fn row_name(self) -> &'static str {
        match self {
            Metric::Rtt => "rtt_p95_seconds",
            Metric::Jitter => "jitter_p95_seconds",
            Metric::Loss => "loss_max_ratio",
            Metric::Mos => "mos_p5",
            Metric::Utilisation => "utilisation_mean_ratio",
            Metric::SpareCapacity => "spare_capacity_need_ratio",
            Metric::Freshness => "freshness_windows",
            Metric::Connection => "connection",
        }
    }

    /// The values the metric can take: a threshold or clear level outside them is never
    /// crossed (or never cleared). MOS tops out at the E-model's best (no delay, jitter or
    /// loss, 4.40); spare capacity over need has no fixed top (it is checked per site against
    /// its link in [`Policy::check_sites`]).
    pub fn range(self) -> (f64, f64) {
        match self {
            Metric::Rtt | Metric::Jitter => (0.0, 60.0),
            Metric::Loss | Metric::Utilisation => (0.0, 1.0),
            Metric::Mos => (1.0, super::emodel::MOS_MAX),
            Metric::SpareCapacity => (0.0, f64::INFINITY),
            Metric::Freshness => (0.0, f64::INFINITY),
            Metric::Connection => (0.0, 1.0),
        }
    }
}

impl Threshold {
    /// The threshold of a level (`Ready` has none: 0).
    pub fn of(&self, level: super::Level) -> f64 {
        match level {
            super::Level::NotReady => self.not_ready,
            _ => self.degraded,
        }
    }

    /// The clear levels `(degraded, not_ready)`: explicit, or the threshold moved by
    /// `hysteresis_ratio` towards healthy.
    pub fn clear_levels(&self, metric: Metric, hysteresis_ratio: f64) -> (f64, f64) {
        let toward_healthy = |x: f64| if metric.higher_is_worse() { x * (1.0 - hysteresis_ratio) } else { x * (1.0 + hysteresis_ratio) };
        (
            self.clear_degraded.unwrap_or_else(|| toward_healthy(self.degraded)),
            self.clear_not_ready.unwrap_or_else(|| toward_healthy(self.not_ready)),
        )
    }

    /// The clear level a row at `level` must pass to improve.
    pub fn clear_of(&self, metric: Metric, hysteresis_ratio: f64, level: super::Level) -> f64 {
        let (d, n) = self.clear_levels(metric, hysteresis_ratio);
        if level == super::Level::NotReady { n } else { d }
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
            // Explicit clear levels: 4.0 × (1 + hysteresis) = 4.4 is above what a healthy
            // commune's MOS reaches (about 4.38), so it would never clear.
            mos_p5: Threshold { clear_degraded: Some(4.1), clear_not_ready: Some(3.7), ..t(4.0, 3.6) },
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
            Metric::Freshness | Metric::Connection => None,
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
    /// Overrides per level of the inventory's hierarchy (e.g. `province`, `district`, `commune`).
    pub levels: BTreeMap<String, ThresholdOverrides>,
    /// Overrides per site id (win over levels).
    pub sites: BTreeMap<String, ThresholdOverrides>,
    /// When a site counts as down and back up (connection status).
    pub connection: super::connection::ConnectionPolicy,
    /// The band of flow bytes / uplink counter bytes outside which `FlowCounterMismatch`
    /// alerts (exported as `siteflow_flow_counter_ratio_min`/`_max`).
    pub flow_counter_band: FlowCounterBand,
}

/// Flow bytes / uplink counter bytes that count as agreeing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowCounterBand {
    pub min: f64,
    pub max: f64,
}

impl Default for FlowCounterBand {
    fn default() -> Self {
        Self { min: 0.8, max: 1.25 }
    }
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
            connection: Default::default(),
            flow_counter_band: FlowCounterBand::default(),
        }
    }
}

/// A number as a person writes it: `4.4`, not `4.4000000000000004`.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let s = format!("{v:.6}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The built-in policy file.
pub const EMBEDDED_POLICY: &str = include_str!("../../pipelines/hagiang/policy.yaml");

/// A policy that cannot be used: the user's input, named by file and row; fatal at start.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}: cannot read: {source}")]
    Read { file: String, source: std::io::Error },
    /// Not valid YAML of a policy, or a row out of range, out of order or unreachable.
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    /// An override names a site or level the inventory does not have, or a site cannot clear
    /// a row.
    #[error("readiness policy: {0}")]
    Inventory(String),
}

impl Policy {
    pub fn embedded() -> Self {
        Self::parse(EMBEDDED_POLICY, "<embedded>/pipelines/hagiang/policy.yaml").expect("the embedded policy is valid (tested)")
    }

    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read { file: file.clone(), source })?;
        Self::parse(&text, &file)
    }

    pub fn parse(text: &str, file: &str) -> Result<Self, PolicyError> {
        let invalid = |message: String| PolicyError::Invalid { file: file.to_string(), message };
        let p: Policy = serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        p.validate().map_err(invalid)?;
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
        self.connection.validate()?;
        let band = self.flow_counter_band;
        if !(band.min > 0.0 && band.min < 1.0 && band.max > 1.0 && band.max.is_finite()) {
            return Err(format!("flow_counter_band: needs 0 < min < 1 < max (got min {}, max {})", band.min, band.max));
        }
        let mut all = vec![("thresholds".to_string(), self.thresholds.clone())];
        for (scope, overrides) in [("levels", &self.levels), ("sites", &self.sites)] {
            for (k, o) in overrides {
                let mut t = self.thresholds.clone();
                t.apply(o);
                all.push((format!("{scope}.{k}"), t));
            }
        }
        for (name, t) in &all {
            self.check_rows(name, t)?;
        }
        Ok(())
    }

    /// Every row of one set of thresholds: in range, in order, and clearable by a healthy site.
    fn check_rows(&self, scope: &str, t: &Thresholds) -> Result<(), String> {
        for m in Metric::ALL {
            let Some(th) = t.get(m) else { continue };
            let row = format!("{scope}.{}", m.row_name());
            let (lo, hi) = m.range();
            let (clear_d, clear_n) = th.clear_levels(m, self.hysteresis_ratio);
            let derived = |explicit: Option<f64>| explicit.is_none().then_some(());
            for (what, v, note) in [
                ("degraded", th.degraded, None),
                ("not_ready", th.not_ready, None),
                ("clear_degraded", clear_d, derived(th.clear_degraded)),
                ("clear_not_ready", clear_n, derived(th.clear_not_ready)),
            ] {
                if !(lo..=hi).contains(&v) {
                    let note = note.map_or(String::new(), |()| {
                        format!(" (its threshold moved by hysteresis_ratio {}; set {what} explicitly)", self.hysteresis_ratio)
                    });
                    // An unbounded range reads "0 or more", not "0 to inf".
                    let range = if hi.is_finite() { format!("{lo} to {hi}") } else { format!("{lo} or more") };
                    return Err(format!("{row}: {what} {}{note} is outside the range of {} ({range})", num(v), m.as_str()));
                }
            }
            let healthy_side = |clear: f64, threshold: f64| if m.higher_is_worse() { clear <= threshold } else { clear >= threshold };
            let ordered = if m.higher_is_worse() { th.degraded <= th.not_ready } else { th.degraded >= th.not_ready };
            if !ordered {
                return Err(format!(
                    "{row}: {} thresholds out of order (degraded {}, not_ready {})",
                    m.as_str(),
                    th.degraded,
                    th.not_ready
                ));
            }
            for (what, clear, threshold) in [("clear_degraded", clear_d, th.degraded), ("clear_not_ready", clear_n, th.not_ready)] {
                if !healthy_side(clear, threshold) {
                    return Err(format!(
                        "{row}: {what} {} is on the wrong side of its threshold {threshold}: it must be as healthy or healthier",
                        num(clear)
                    ));
                }
            }
            // MOS is computed from RTT, jitter and loss: a site that one of those rows calls just
            // clear (at its clear level, the other two perfect) must be able to clear MOS too,
            // or a site healthy by every input row can stay degraded for good.
            if m == Metric::Mos {
                let (rtt, _) = t.rtt_p95_seconds.clear_levels(Metric::Rtt, self.hysteresis_ratio);
                let (jitter, _) = t.jitter_p95_seconds.clear_levels(Metric::Jitter, self.hysteresis_ratio);
                let (loss, _) = t.loss_max_ratio.clear_levels(Metric::Loss, self.hysteresis_ratio);
                let emodel = super::emodel::mos;
                let reachable = emodel(rtt * 1e3, 0.0, 0.0).min(emodel(0.0, jitter * 1e3, 0.0)).min(emodel(0.0, 0.0, loss * 100.0));
                let unreachable = [("clear_degraded", clear_d, th.clear_degraded), ("clear_not_ready", clear_n, th.clear_not_ready)]
                    .into_iter()
                    .find(|(_, c, _)| *c > reachable);
                if let Some((what, clear, explicit)) = unreachable {
                    let derived = if explicit.is_none() {
                        format!(" (its threshold moved by hysteresis_ratio {})", self.hysteresis_ratio)
                    } else {
                        String::new()
                    };
                    return Err(format!(
                        "{row}: {what} {}{derived} is unreachable by a healthy site: a site at the clear level of the rtt, \
                         jitter or loss row ({} s, {} s, {}) has MOS down to {reachable:.3}; set {what} at or below it",
                        num(clear),
                        num(rtt),
                        num(jitter),
                        num(loss)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks the policy against the inventory: per-site overrides name its sites, per-level
    /// overrides its levels, and every site can clear the spare capacity row when its link is
    /// idle (spare capacity = the link's capacity).
    pub fn check_sites(&self, inventory: &crate::inventory::Inventory) -> Result<(), PolicyError> {
        self.check_sites_text(inventory).map_err(PolicyError::Inventory)
    }

    fn check_sites_text(&self, inventory: &crate::inventory::Inventory) -> Result<(), String> {
        if let Some(id) = self.sites.keys().find(|id| inventory.by_id(id).is_none()) {
            return Err(format!("sites.{id}: not a site of the inventory"));
        }
        let levels = inventory.levels();
        if let Some(level) = self.levels.keys().find(|l| inventory.level_depth(l).is_none()) {
            return Err(format!("levels.{level}: not a level of the inventory ({})", levels.join(", ")));
        }
        let need = self.default_need();
        for site in inventory.sites() {
            let t = self.thresholds_for(&site.id, &site.level).spare_capacity_need_ratio;
            let best = site.capacity_bytes_per_sec() / need;
            let (clear, _) = t.clear_levels(Metric::SpareCapacity, self.hysteresis_ratio);
            if clear > best {
                let scope = if self.sites.contains_key(&site.id) {
                    format!("sites.{}", site.id)
                } else if self.levels.contains_key(&site.level) {
                    format!("levels.{}", site.level)
                } else {
                    "thresholds".into()
                };
                return Err(format!(
                    "{scope}.spare_capacity_need_ratio: clear_degraded {} is unreachable by site {}: its idle {} Mbit/s link \
                     gives {best:.2} × the {} profile's need",
                    num(clear),
                    site.id,
                    site.link_mbps,
                    self.default_profile
                ));
            }
        }
        Ok(())
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
        let e = Policy::parse("thresholds_typo: 1\n", "p.yaml").unwrap_err().to_string();
        assert!(e.contains("p.yaml") && e.contains("thresholds_typo"), "{e}");
        let e = Policy::parse("levels:\n  village: {}\n", "p.yaml")
            .unwrap()
            .check_sites(&crate::inventory::Inventory::embedded())
            .unwrap_err()
            .to_string();
        assert!(e.contains("levels.village: not a level of the inventory (province, district, commune)"), "{e}");
        let e = Policy::parse("levels:\n  commune:\n    mos_p5: {degraded: 3.0, not_ready: 3.5, clear_degraded: 3.1}\n", "p.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mos thresholds out of order"), "{e}");
    }

    fn refused(yaml: &str) -> String {
        Policy::parse(yaml, "p.yaml").unwrap_err().to_string()
    }

    /// The MOS row's clear level derived from the hysteresis (4.0 × 1.1 = 4.4) is above what a
    /// site clear of the RTT, jitter and loss rows reaches: refused, naming the row.
    #[test]
    fn clear_levels_a_healthy_site_cannot_reach_are_refused() {
        let e = refused("thresholds:\n  mos_p5: {degraded: 4.0, not_ready: 3.6}\n");
        assert!(e.starts_with("p.yaml: thresholds.mos_p5: clear_degraded 4.4 (its threshold moved by hysteresis_ratio 0.1)"), "{e}");
        assert!(e.contains("unreachable by a healthy site") && e.contains("has MOS down to 4.356"), "{e}");
        let e = refused("levels:\n  commune:\n    mos_p5: {degraded: 4.0, not_ready: 3.6, clear_degraded: 4.38}\n");
        assert!(e.contains("levels.commune.mos_p5: clear_degraded 4.38 is unreachable"), "{e}");
        // Relaxing RTT for a far site moves the reachable MOS down with it.
        let e = refused("sites:\n  x:\n    rtt_p95_seconds: {degraded: 0.3, not_ready: 0.5}\n");
        assert!(e.contains("sites.x.mos_p5: clear_degraded 4.1 is unreachable") && e.contains("(0.27 s, 0.027 s, 0.009)"), "{e}");
        let e = refused("thresholds:\n  mos_p5: {degraded: 4.0, not_ready: 3.6, clear_degraded: 4.5}\n");
        assert!(e.contains("thresholds.mos_p5: clear_degraded 4.5 is outside the range of mos (1 to 4.405)"), "{e}");
        let e = refused("thresholds:\n  loss_max_ratio: {degraded: 0.01, not_ready: 0.05, clear_not_ready: 1.5}\n");
        assert!(e.contains("thresholds.loss_max_ratio: clear_not_ready 1.5 is outside the range of loss (0 to 1)"), "{e}");
        let e = refused("thresholds:\n  spare_capacity_need_ratio: {degraded: -1.0, not_ready: -2.0}\n");
        assert!(e.contains("is outside the range of spare_capacity (0 or more)") && !e.contains("inf"), "{e}");
        let e = refused("sites:\n  x:\n    utilisation_mean_ratio: {degraded: 0.9, not_ready: 1.2}\n");
        assert!(e.contains("sites.x.utilisation_mean_ratio: not_ready 1.2 is outside the range"), "{e}");
        let e = refused("thresholds:\n  rtt_p95_seconds: {degraded: 0.1, not_ready: 0.3, clear_degraded: 0.2}\n");
        assert!(e.contains("thresholds.rtt_p95_seconds: clear_degraded 0.2 is on the wrong side of its threshold 0.1"), "{e}");
        // A spare-capacity clear level above what an idle 20 Mbit/s commune link gives.
        let p = Policy::parse("thresholds:\n  spare_capacity_need_ratio: {degraded: 9, not_ready: 5}\n", "p.yaml").unwrap();
        let e = p.check_sites(&crate::inventory::Inventory::embedded()).unwrap_err().to_string();
        assert!(e.contains("thresholds.spare_capacity_need_ratio: clear_degraded 9.9 is unreachable by site"), "{e}");
    }

    /// Why the shipped values recover: every clear level sits below what healthy sites of each
    /// level measure (the simulator's baselines: province 3 ms RTT, district 12 ms, commune
    /// 28 ms ± 20 %, jitter up to 1.5 × 0.8/2/4 ms, 0.5 % loss in 2 % of rounds).
    #[test]
    fn shipped_clear_levels_are_reached_by_healthy_sites_of_every_level() {
        let p = Policy::embedded();
        let t = &p.thresholds;
        for (rtt_ms, jitter_ms) in [(3.6, 1.2), (14.4, 3.0), (33.6, 6.0)] {
            let mos = super::super::emodel::mos(rtt_ms, jitter_ms, 0.5);
            let (clear, _) = t.mos_p5.clear_levels(Metric::Mos, p.hysteresis_ratio);
            assert!(mos > clear + 0.2, "worst healthy MOS {mos} against clear level {clear}");
            assert!(rtt_ms / 1e3 < t.rtt_p95_seconds.clear_levels(Metric::Rtt, p.hysteresis_ratio).0);
            assert!(jitter_ms / 1e3 < t.jitter_p95_seconds.clear_levels(Metric::Jitter, p.hysteresis_ratio).0);
        }
        assert!(0.005 < t.loss_max_ratio.clear_levels(Metric::Loss, p.hysteresis_ratio).0);
        assert_eq!(t.mos_p5.clear_levels(Metric::Mos, p.hysteresis_ratio), (4.1, 3.7));
        p.check_sites(&crate::inventory::Inventory::embedded()).unwrap();
    }
}
