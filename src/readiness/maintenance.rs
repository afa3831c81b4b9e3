//! Planned maintenance: windows of time in which some sites may go down on purpose. Their time
//! counts for neither up nor down in availability, their outages are marked `planned`, and
//! `SiteDown` and `SiteNotReady` do not page for them (`siteflow_site_maintenance`). Connection
//! status and verdicts are unchanged: a site down for works is down.
//!
//! ```yaml
//! maintenance:
//!   - reason: carrier works on the Mèo Vạc ring
//!     start: 2026-12-05T22:00:00+07:00
//!     end: 2026-12-06T02:00:00+07:00
//!     sites:
//!       - under: meo-vac.ubnd      # selectors as for meeting participants
//!       - sites: [meo-vac.ubnd]
//! ```

use std::path::Path;

use chrono::{DateTime, FixedOffset};
use serde::Deserialize;

use super::meetings::{Selector, resolve_selectors};
use crate::inventory::{Inventory, SiteIdx};

/// Longest maintenance window accepted: 31 days.
const MAX_SECS: i64 = 31 * 86_400;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    maintenance: Vec<Spec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    reason: String,
    start: String,
    end: String,
    sites: Vec<Selector>,
}

/// One maintenance window, resolved against the inventory.
#[derive(Debug, Clone, PartialEq)]
pub struct Maintenance {
    pub reason: String,
    pub start_ns: i64,
    pub end_ns: i64,
    /// In inventory order (sorted).
    pub sites: Vec<SiteIdx>,
}

impl Maintenance {
    /// Whether it covers `site` at any time in `[start_ns, end_ns)`.
    pub fn covers(&self, site: SiteIdx, start_ns: i64, end_ns: i64) -> bool {
        self.start_ns < end_ns && start_ns < self.end_ns && self.sites.binary_search(&site).is_ok()
    }
}

fn time(text: &str, what: &str) -> Result<DateTime<FixedOffset>, String> {
    DateTime::parse_from_rfc3339(text)
        .map_err(|e| format!("{what} {text:?} is not an RFC 3339 time such as 2026-12-05T22:00:00+07:00 ({e})"))
}

/// Parses a maintenance file; errors name the file, the entry and the problem.
pub fn parse(text: &str, file: &str, inventory: &Inventory) -> Result<Vec<Maintenance>, String> {
    let raw: File = serde_yaml::from_str(text).map_err(|e| format!("{file}: {e}"))?;
    raw.maintenance
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            let at = |m: String| format!("{file}: maintenance[{i}]: {m}");
            let (start, end) = (time(&spec.start, "start").map_err(at)?, time(&spec.end, "end").map_err(at)?);
            let (start_ns, end_ns) = (start.timestamp_nanos_opt(), end.timestamp_nanos_opt());
            let (Some(start_ns), Some(end_ns)) = (start_ns, end_ns) else {
                return Err(at("start and end must be between the years 1678 and 2262".into()));
            };
            if end_ns <= start_ns {
                return Err(at(format!("end {} is not after start {}", spec.end, spec.start)));
            }
            if end_ns - start_ns > MAX_SECS * 1_000_000_000 {
                return Err(at("longer than 31 days: declare a long works period as several windows, or fix the site's entry".into()));
            }
            let sites = resolve_selectors(&spec.sites, "sites", inventory).map_err(at)?;
            if sites.is_empty() {
                return Err(at("`sites` is empty: list selectors such as `- sites: [id]`, `- district: …`, `- under: id`".into()));
            }
            Ok(Maintenance { reason: spec.reason, start_ns, end_ns, sites })
        })
        .collect()
}

/// Loads a maintenance file.
pub fn load(path: &Path, inventory: &Inventory) -> Result<Vec<Maintenance>, String> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read: {e}"))?;
    parse(&text, &file, inventory)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "maintenance:\n  - reason: ring works\n    start: 2026-12-05T22:00:00+07:00\n    end: 2026-12-06T02:00:00+07:00\n    sites:\n      - under: meo-vac.ubnd\n      - sites: [meo-vac.ubnd]\n";

    #[test]
    fn windows_cover_their_sites_for_their_time() {
        let inv = Inventory::embedded();
        let m = parse(FILE, "m.yaml", &inv).unwrap();
        let office = inv.by_id("meo-vac.ubnd").unwrap();
        let commune = inv.by_id("meo-vac.pai-lung").unwrap();
        let other = inv.by_id("dong-van.lung-cu").unwrap();
        let start = 1_796_482_800_000_000_000; // 2026-12-05T15:00:00Z
        assert_eq!(m[0].start_ns, start);
        assert_eq!(m[0].end_ns - m[0].start_ns, 4 * 3600 * 1_000_000_000);
        assert!(m[0].covers(office, start, start + 1) && m[0].covers(commune, start - 5, start + 5));
        assert!(!m[0].covers(other, start, start + 1), "another district");
        assert!(!m[0].covers(office, start - 10, start), "ends before the start");
        assert!(!m[0].covers(office, m[0].end_ns, m[0].end_ns + 10), "the end is excluded");
    }

    #[test]
    fn bad_windows_are_named() {
        let inv = Inventory::embedded();
        let e = |text: String| parse(&text, "m.yaml", &inv).unwrap_err();
        assert!(e(FILE.replace("2026-12-06T02:00:00", "2026-12-05T21:00:00")).contains("m.yaml: maintenance[0]: end "), "end before start");
        assert!(e(FILE.replace("2026-12-06T02:00:00+07:00", "tomorrow")).contains("end \"tomorrow\" is not an RFC 3339 time"));
        assert!(e(FILE.replace("[meo-vac.ubnd]", "[nowhere]")).contains("maintenance[0]: sites[1]: unknown site \"nowhere\""));
        assert!(e(FILE.replace("2026-12-06", "2027-02-06")).contains("longer than 31 days"));
        assert!(e(FILE.replace("reason: ring works", "why: ring works")).contains("unknown field `why`"));
    }
}
