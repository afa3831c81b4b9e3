//! Fault scenarios for the simulator: which sites misbehave, how, and when. Every field, the
//! spread applied to values and how overlapping faults combine: docs/scenarios.md.
//!
//! ```yaml
//! description: Congestion in Mèo Vạc, one commune down
//! faults:
//!   - kind: congestion        # links run at `utilisation` of capacity (default 0.97)
//!     district: Mèo Vạc       # select by district, level, `under` (a site) and/or site ids
//!     level: commune
//!     direction: in           # in, out or both (default)
//!     start_secs: 60          # seconds after the simulation starts (default 0)
//!     duration_secs: 600      # default: until the end
//!   - kind: outage            # silence: no flows, no probe results
//!     sites: [dong-van.ta-lung]
//!   - kind: probe_outage      # probe results stop, flows continue
//!     sites: [dong-van.lung-cu]
//!   - kind: link_down         # the site's uplink fails: it and every site below it send no
//!     sites: [meo-vac.ubnd]   # flows and their probe rounds are all lost (100 % loss)
//!     start_secs: 120
//!     duration_secs: 300
//!   - {kind: high_rtt, sites: [yen-minh.lao-va-chai], rtt_ms: 450}
//!   - {kind: jitter, sites: [yen-minh.sung-thai], jitter_ms: 80}
//!   - {kind: loss, sites: [yen-minh.huu-vinh], loss_pct: 8}
//!   - {kind: top_talker, sites: [meo-vac.pai-lung], peer: 203.0.113.250, share: 0.5}
//!   - {kind: sampling_missing, sites: [bac-me.yen-cuong]}   # flows without their sampling rate
//!   - {kind: link_speed, sites: [quan-ba.tam-son], mbps: 10} # uplinks report 10 Mbit/s
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::enrich::Direction;
use crate::inventory::{Inventory, SiteIdx};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    Congestion,
    Outage,
    /// Probe results stop while flows continue (a probe agent or its path down).
    ProbeOutage,
    /// The uplink fails: no flows from the site or any site below it, and the probe rounds to
    /// all of them are lost.
    LinkDown,
    HighRtt,
    Jitter,
    Loss,
    /// One conversation (an outside host and one local host) takes `share` of the site's flow
    /// records: a top talker to find.
    TopTalker,
    /// The site's exporter stops sending its sampling rate (`sampling_rate: 0`): its flows
    /// count the sampled bytes only, its uplink counters all of them.
    SamplingMissing,
    /// The site's uplinks report a speed of `mbps` (ifHighSpeed) instead of the inventory's.
    LinkSpeed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSpec {
    kind: FaultKind,
    #[serde(default)]
    sites: Vec<String>,
    district: Option<String>,
    level: Option<String>,
    /// Every site below this one in the inventory's hierarchy.
    under: Option<String>,
    #[serde(default)]
    start_secs: u64,
    duration_secs: Option<u64>,
    utilisation: Option<f64>,
    rtt_ms: Option<f64>,
    jitter_ms: Option<f64>,
    loss_pct: Option<f64>,
    peer: Option<std::net::Ipv4Addr>,
    share: Option<f64>,
    /// Link speed only: the speed the uplinks report, Mbit/s.
    mbps: Option<f64>,
    /// Congestion only: which direction runs at `utilisation` (default both).
    direction: Option<DirectionSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum DirectionSpec {
    In,
    Out,
    Both,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    #[serde(default)]
    description: String,
    faults: Vec<FaultSpec>,
}

/// What a fault does to a site.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Effect {
    /// Traffic at this share of capacity, in one direction (`None`: both).
    Congestion {
        utilisation: f64,
        direction: Option<Direction>,
    },
    Outage,
    ProbeOutage,
    /// Its uplink is down: no flows, probe rounds all lost, the uplink reports link down.
    LinkDown,
    /// Below a site whose uplink is down: no flows, probe rounds all lost, no interface samples
    /// (its router cannot be reached).
    CutOff,
    HighRtt {
        rtt_ms: f64,
    },
    Jitter {
        jitter_ms: f64,
    },
    Loss {
        loss_pct: f64,
    },
    /// `share` of the site's flow records are between `peer` and one local host.
    TopTalker {
        peer: std::net::Ipv4Addr,
        share: f64,
    },
    /// Flow records without their sampling rate.
    SamplingMissing,
    /// The uplinks report this speed, Mbit/s.
    LinkSpeed {
        mbps: f64,
    },
}

/// One fault, resolved against the inventory.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub effect: Effect,
    pub sites: Vec<SiteIdx>,
    /// Offsets from the start of the simulation, in nanoseconds.
    pub start_offset_ns: i64,
    pub end_offset_ns: i64,
}

/// A resolved scenario.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scenario {
    pub description: String,
    pub faults: Vec<Fault>,
}

impl Scenario {
    /// Loads and resolves a scenario file; errors name the file, the fault and the problem.
    pub fn load(path: &Path, inventory: &Inventory) -> Result<Self, String> {
        let file = path.display();
        let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read: {e}"))?;
        Self::parse(&text, &file.to_string(), inventory)
    }

    pub fn parse(text: &str, file: &str, inventory: &Inventory) -> Result<Self, String> {
        let raw: ScenarioFile = serde_yaml::from_str(text).map_err(|e| format!("{file}: {e}"))?;
        let mut faults = Vec::new();
        for (i, f) in raw.faults.into_iter().enumerate() {
            let at = |m: String| format!("{file}: faults[{i}] ({:?}): {m}", f.kind);
            let mut sites = Vec::new();
            for id in &f.sites {
                sites.push(inventory.by_id(id).ok_or_else(|| at(format!("unknown site {id:?}")))?);
            }
            if f.district.is_some() || f.level.is_some() || f.under.is_some() {
                sites.extend(
                    crate::readiness::meetings::select(inventory, f.district.as_deref(), f.level.as_deref(), f.under.as_deref())
                        .map_err(at)?,
                );
            }
            if sites.is_empty() {
                return Err(at("select sites with `sites`, `district`, `level` or `under`".into()));
            }
            // What is below a failed uplink is cut off with it (a fault of its own).
            let below: Vec<SiteIdx> = if f.kind == FaultKind::LinkDown {
                (0..inventory.len() as SiteIdx)
                    .filter(|&b| sites.iter().any(|&s| inventory.is_under(b, s)) && !sites.contains(&b))
                    .collect()
            } else {
                Vec::new()
            };
            sites.sort_unstable();
            sites.dedup();
            let need = |v: Option<f64>, name: &str, max: f64| -> Result<f64, String> {
                let v = v.ok_or_else(|| at(format!("needs `{name}`")))?;
                if !(0.0..=max).contains(&v) {
                    return Err(at(format!("`{name}` must be between 0 and {max} (got {v})")));
                }
                Ok(v)
            };
            if f.direction.is_some() && f.kind != FaultKind::Congestion {
                return Err(at("`direction` applies to congestion only".into()));
            }
            let effect = match f.kind {
                FaultKind::Congestion => Effect::Congestion {
                    utilisation: need(f.utilisation.or(Some(0.97)), "utilisation", 1.0)?,
                    direction: match f.direction {
                        Some(DirectionSpec::In) => Some(Direction::In),
                        Some(DirectionSpec::Out) => Some(Direction::Out),
                        Some(DirectionSpec::Both) | None => None,
                    },
                },
                FaultKind::Outage => Effect::Outage,
                FaultKind::ProbeOutage => Effect::ProbeOutage,
                FaultKind::LinkDown => Effect::LinkDown,
                FaultKind::HighRtt => Effect::HighRtt { rtt_ms: need(f.rtt_ms, "rtt_ms", 60_000.0)? },
                FaultKind::Jitter => Effect::Jitter { jitter_ms: need(f.jitter_ms, "jitter_ms", 60_000.0)? },
                FaultKind::Loss => Effect::Loss { loss_pct: need(f.loss_pct, "loss_pct", 100.0)? },
                FaultKind::SamplingMissing => Effect::SamplingMissing,
                FaultKind::LinkSpeed => Effect::LinkSpeed { mbps: need(f.mbps, "mbps", 1_000_000.0)? },
                FaultKind::TopTalker => Effect::TopTalker {
                    peer: f.peer.ok_or_else(|| at("needs `peer` (an IPv4 address outside the sites)".into()))?,
                    share: need(f.share.or(Some(0.5)), "share", 1.0)?,
                },
            };
            let start = f.start_secs as i64 * 1_000_000_000;
            let end = f.duration_secs.map_or(i64::MAX, |d| start + d as i64 * 1_000_000_000);
            faults.push(Fault { effect, sites, start_offset_ns: start, end_offset_ns: end });
            if !below.is_empty() {
                faults.push(Fault { effect: Effect::CutOff, sites: below, start_offset_ns: start, end_offset_ns: end });
            }
        }
        Ok(Scenario { description: raw.description, faults })
    }

    /// Faults active for `site` at `offset_ns` after the start.
    pub fn active(&self, site: SiteIdx, offset_ns: i64) -> impl Iterator<Item = &Effect> {
        self.faults
            .iter()
            .filter(move |f| offset_ns >= f.start_offset_ns && offset_ns < f.end_offset_ns && f.sites.binary_search(&site).is_ok())
            .map(|f| &f.effect)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_by_district_and_level() {
        let inv = Inventory::embedded();
        let s = Scenario::parse("faults:\n  - {kind: congestion, district: Mèo Vạc, level: commune}\n", "s.yaml", &inv).unwrap();
        let f = &s.faults[0];
        assert!(!f.sites.is_empty());
        assert!(f.sites.iter().all(|&i| inv.site(i).district == "Mèo Vạc" && inv.site(i).level == "commune"));
        assert_eq!(f.effect, Effect::Congestion { utilisation: 0.97, direction: None });
    }

    #[test]
    fn direction_and_probe_outage() {
        let inv = Inventory::embedded();
        let text = "faults:\n  - {kind: congestion, sites: [tinh.vp-ubnd], direction: out, utilisation: 0.9}\n  - {kind: probe_outage, sites: [tinh.vp-ubnd], start_secs: 10, duration_secs: 20}\n";
        let s = Scenario::parse(text, "s.yaml", &inv).unwrap();
        assert_eq!(s.faults[0].effect, Effect::Congestion { utilisation: 0.9, direction: Some(Direction::Out) });
        assert_eq!(s.faults[1].effect, Effect::ProbeOutage);
        assert_eq!((s.faults[1].start_offset_ns, s.faults[1].end_offset_ns), (10_000_000_000, 30_000_000_000));
        let e =
            Scenario::parse("faults:\n  - {kind: loss, sites: [tinh.vp-ubnd], loss_pct: 3, direction: in}\n", "s.yaml", &inv).unwrap_err();
        assert!(e.contains("faults[0] (Loss): `direction` applies to congestion only"), "{e}");
        let e = Scenario::parse("faults:\n  - {kind: congestion, sites: [tinh.vp-ubnd], direction: up}\n", "s.yaml", &inv).unwrap_err();
        assert!(e.contains("unknown variant `up`"), "{e}");
    }

    #[test]
    fn errors_name_the_fault() {
        let inv = Inventory::embedded();
        let e = Scenario::parse("faults:\n  - {kind: outage, sites: [nowhere]}\n", "s.yaml", &inv).unwrap_err();
        assert!(e.contains("s.yaml: faults[0] (Outage): unknown site \"nowhere\""), "{e}");
        let e = Scenario::parse("faults:\n  - {kind: loss, sites: [tinh.vp-ubnd]}\n", "s.yaml", &inv).unwrap_err();
        assert!(e.contains("needs `loss_pct`"), "{e}");
        let e = Scenario::parse("faults:\n  - {kind: loss, sites: [tinh.vp-ubnd], loss: 3}\n", "s.yaml", &inv).unwrap_err();
        assert!(e.contains("unknown field `loss`"), "{e}");
    }
}
