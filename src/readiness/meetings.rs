//! Meetings: who joins, when, with what bandwidth need; and how ready each participant is.
//!
//! ```yaml
//! meetings:
//!   - id: giao-ban-thang-12
//!     title: Giao ban trực tuyến 4 cấp tháng 12
//!     start: 2026-12-01T14:00:00+07:00
//!     duration_mins: 120
//!     profile: hd720               # a profile of the policy
//!     participants:
//!       - sites: [tinh.vp-ubnd]
//!       - level: district          # every district office
//!       - district: Mèo Vạc        # all communes of Mèo Vạc
//!         level: commune
//!       - under: meo-vac.ubnd      # every site below this one in the inventory's hierarchy
//! ```

use std::collections::BTreeSet;
use std::path::Path;

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};

use super::hysteresis::{Level, target_level};
use super::policy::{Metric, Policy};
use super::{Cause, Reason, SiteReadiness, Verdict};
use crate::inventory::{Inventory, SiteIdx};

/// Longest meeting accepted: a week.
const MAX_DURATION_MINS: u64 = 7 * 24 * 60;

/// Which sites join: explicit ids, and/or every site of a district, a level and/or below a
/// site of the hierarchy (`under`, any depth); the criteria given must all match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub district: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub under: Option<String>,
}

/// A meeting as written in the schedule or posted to `/api/meetings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeetingSpec {
    pub id: String,
    pub title: String,
    /// RFC 3339 with offset, e.g. `2026-12-01T14:00:00+07:00`.
    #[serde(with = "rfc3339")]
    pub start: DateTime<FixedOffset>,
    pub duration_mins: u64,
    /// Bandwidth profile (a key of the policy's `profiles`); default: the policy's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    pub participants: Vec<Selector>,
}

/// RFC 3339 timestamps with their offset, as written.
mod rfc3339 {
    use chrono::{DateTime, FixedOffset};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<FixedOffset>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<FixedOffset>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text).map_err(|e| {
            serde::de::Error::custom(format!("start {text:?} is not an RFC 3339 time such as 2026-12-01T14:00:00+07:00 ({e})"))
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleFile {
    #[serde(default)]
    meetings: Vec<MeetingSpec>,
}

/// A meeting resolved against the inventory and policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Meeting {
    #[serde(flatten)]
    pub spec: MeetingSpec,
    pub need_bytes_per_second: f64,
    #[serde(skip)]
    pub participants: Vec<SiteIdx>,
    /// From the schedule file (`readiness.meetings`): the file, not the API, changes it.
    #[serde(skip)]
    pub scheduled: bool,
}

/// Where a meeting stands at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Upcoming,
    /// Within the lead time before the start: participants are watched.
    Lead,
    InProgress,
    Ended,
}

impl Meeting {
    /// Resolves participants and need; errors name the meeting and the problem.
    pub fn resolve(spec: MeetingSpec, inventory: &Inventory, policy: &Policy) -> Result<Self, String> {
        let at = |m: String| format!("meeting {:?}: {m}", spec.id);
        if spec.id.is_empty() || !spec.id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(at("id must be non-empty letters, digits, '-', '_' or '.'".into()));
        }
        if !(1..=MAX_DURATION_MINS).contains(&spec.duration_mins) {
            return Err(at(format!("duration_mins must be between 1 and {MAX_DURATION_MINS} (a week)")));
        }
        let year = chrono::Datelike::year(&spec.start);
        if !(2000..=2100).contains(&year) {
            return Err(at(format!("start {} is not between the years 2000 and 2100", spec.start.to_rfc3339())));
        }
        let profile = spec.profile.clone().unwrap_or_else(|| policy.default_profile.clone());
        let need = policy.need_of(&profile).ok_or_else(|| {
            at(format!("unknown profile {profile:?} (profiles: {})", policy.profiles.keys().cloned().collect::<Vec<_>>().join(", ")))
        })?;
        let participants = resolve_selectors(&spec.participants, "participants", inventory).map_err(at)?;
        if participants.is_empty() {
            return Err(at("no participants".into()));
        }
        Ok(Meeting { spec, need_bytes_per_second: need, participants, scheduled: false })
    }

    pub fn start_ns(&self) -> i64 {
        self.spec.start.timestamp_nanos_opt().unwrap_or(i64::MAX)
    }

    pub fn end_ns(&self) -> i64 {
        self.start_ns().saturating_add((self.spec.duration_mins as i64).saturating_mul(60_000_000_000))
    }

    pub fn phase(&self, now_ns: i64, lead_secs: u64) -> Phase {
        if now_ns >= self.end_ns() {
            Phase::Ended
        } else if now_ns >= self.start_ns() {
            Phase::InProgress
        } else if now_ns >= self.start_ns().saturating_sub((lead_secs as i64).saturating_mul(1_000_000_000)) {
            Phase::Lead
        } else {
            Phase::Upcoming
        }
    }
}

/// The sites a selector's `district`, `level` and `under` pick; an error if none, or if the
/// level or the `under` site is not in the inventory.
pub fn select(inventory: &Inventory, district: Option<&str>, level: Option<&str>, under: Option<&str>) -> Result<Vec<SiteIdx>, String> {
    if let Some(l) = level.filter(|l| inventory.level_depth(l).is_none()) {
        return Err(format!("level {l:?} is not a level of the inventory ({})", inventory.levels().join(", ")));
    }
    let under = match under {
        Some(id) => Some(inventory.by_id(id).ok_or_else(|| format!("under: unknown site {id:?}"))?),
        None => None,
    };
    let matched = inventory.select(district, level, under);
    if matched.is_empty() {
        let criteria = [
            district.map(|d| format!("district {d:?}")),
            level.map(|l| format!("level {l:?}")),
            under.map(|u| format!("under {:?}", inventory.site(u).id)),
        ];
        return Err(format!("no site matches {}", criteria.into_iter().flatten().collect::<Vec<_>>().join(" and ")));
    }
    Ok(matched)
}

/// The sites a list of selectors picks, in inventory order without duplicates; an error names
/// the selector as `{field}[i]`.
pub fn resolve_selectors(selectors: &[Selector], field: &str, inventory: &Inventory) -> Result<Vec<SiteIdx>, String> {
    let mut set = BTreeSet::new();
    for (i, sel) in selectors.iter().enumerate() {
        for id in &sel.sites {
            set.insert(inventory.by_id(id).ok_or_else(|| format!("{field}[{i}]: unknown site {id:?}"))?);
        }
        if sel.district.is_some() || sel.level.is_some() || sel.under.is_some() {
            let matched = select(inventory, sel.district.as_deref(), sel.level.as_deref(), sel.under.as_deref())
                .map_err(|e| format!("{field}[{i}]: {e}"))?;
            set.extend(matched);
        } else if sel.sites.is_empty() {
            return Err(format!("{field}[{i}]: select sites with `sites`, `district`, `level` or `under`"));
        }
    }
    Ok(set.into_iter().collect())
}

/// Loads a schedule file of meetings.
pub fn load_schedule(path: &Path, inventory: &Inventory, policy: &Policy) -> Result<Vec<Meeting>, String> {
    let file = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read: {e}"))?;
    let raw: ScheduleFile = serde_yaml::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
    let mut out: Vec<Meeting> = Vec::new();
    for spec in raw.meetings {
        if out.iter().any(|m| m.spec.id == spec.id) {
            return Err(format!("{file}: meeting {:?}: duplicate id", spec.id));
        }
        let meeting = Meeting::resolve(spec, inventory, policy).map_err(|e| format!("{file}: {e}"))?;
        out.push(Meeting { scheduled: true, ..meeting });
    }
    Ok(out)
}

/// One participant's readiness for a meeting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParticipantReadiness {
    pub site: String,
    pub name: String,
    pub district: String,
    pub level: String,
    /// Readiness against this meeting's need (site verdict with the meeting's spare capacity row).
    pub status: Verdict,
    pub at_risk: bool,
    /// The site's connection status: a `down` participant is `not_ready` whatever its rows.
    pub connection: super::connection::Status,
    pub spare_min_bytes_per_second: Option<[f64; 2]>,
    pub reasons: Vec<Reason>,
}

/// A meeting's readiness report (`GET /api/meetings/{id}/readiness`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeetingReport {
    pub meeting: Meeting,
    pub phase: Phase,
    pub evaluated_at: Option<String>,
    pub counts: std::collections::BTreeMap<&'static str, usize>,
    pub at_risk: usize,
    pub participants: Vec<ParticipantReadiness>,
}

/// A participant's status: the site's rows, with spare capacity judged against `need`.
pub fn participant(site: &SiteReadiness, need: f64, policy: &Policy) -> ParticipantReadiness {
    let mut reasons: Vec<Reason> = site.reasons.iter().filter(|r| r.metric != Metric::SpareCapacity).cloned().collect();
    let spare = site.traffic.as_ref().map(|t| t.spare_min_bytes_per_second);
    let status = if site.connection.state == super::connection::State::Down {
        Verdict::NotReady
    } else if site.verdict == Verdict::Unknown {
        Verdict::Unknown
    } else {
        let mut worst = site.rows_without_spare.iter().map(|(_, l)| *l).max().unwrap_or(Level::Ready);
        if let Some([sin, sout]) = spare {
            let t = policy.thresholds_for(&site.site, &site.level).spare_capacity_need_ratio;
            let ratio = sin.min(sout) / need;
            let level = target_level(Metric::SpareCapacity, ratio, &t, policy.hysteresis_ratio, None);
            if level > Level::Ready {
                reasons.push(Reason {
                    metric: Metric::SpareCapacity,
                    level,
                    value: ratio,
                    threshold: t.of(level),
                    cause: Cause::OverThreshold,
                    clear: Some(t.clear_of(Metric::SpareCapacity, policy.hysteresis_ratio, level)),
                    detail: String::new(),
                });
            }
            worst = worst.max(level);
        }
        match worst {
            Level::Ready => Verdict::Ready,
            Level::Degraded => Verdict::Degraded,
            Level::NotReady => Verdict::NotReady,
        }
    };
    ParticipantReadiness {
        site: site.site.clone(),
        name: site.name.clone(),
        district: site.district.clone(),
        level: site.level.clone(),
        status,
        at_risk: matches!(status, Verdict::NotReady | Verdict::Unknown),
        connection: site.connection.clone(),
        spare_min_bytes_per_second: spare,
        reasons,
    }
}

/// Builds the report of one meeting from the latest site verdicts.
pub fn report(meeting: &Meeting, sites: &[SiteReadiness], policy: &Policy, evaluated_at_ns: Option<i64>) -> MeetingReport {
    let participants: Vec<ParticipantReadiness> =
        meeting.participants.iter().map(|&s| participant(&sites[usize::from(s)], meeting.need_bytes_per_second, policy)).collect();
    let counts = Verdict::ALL.iter().map(|v| (v.as_str(), participants.iter().filter(|p| p.status == *v).count())).collect();
    let now = evaluated_at_ns.unwrap_or(i64::MIN);
    MeetingReport {
        phase: meeting.phase(now, policy.meeting_lead_secs),
        evaluated_at: evaluated_at_ns.map(|n| DateTime::from_timestamp_nanos(n).to_rfc3339()),
        at_risk: participants.iter().filter(|p| p.at_risk).count(),
        counts,
        participants,
        meeting: meeting.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(participants: Vec<Selector>) -> MeetingSpec {
        MeetingSpec {
            id: "m1".into(),
            title: "Giao ban".into(),
            start: DateTime::parse_from_rfc3339("2026-12-01T14:00:00+07:00").unwrap(),
            duration_mins: 60,
            profile: None,
            participants,
        }
    }

    fn sel(sites: &[&str], district: Option<&str>, level: Option<&str>) -> Selector {
        Selector {
            sites: sites.iter().map(|s| s.to_string()).collect(),
            district: district.map(Into::into),
            level: level.map(Into::into),
            under: None,
        }
    }

    /// `under` follows the hierarchy: the district office's communes, at any depth.
    #[test]
    fn participants_under_a_site() {
        let inv = Inventory::embedded();
        let policy = Policy::default();
        let under = Selector { under: Some("meo-vac.ubnd".into()), ..sel(&[], None, None) };
        let m = Meeting::resolve(spec(vec![under.clone()]), &inv, &policy).unwrap();
        assert_eq!(m.participants, inv.select(Some("Mèo Vạc"), Some("commune"), None));
        let e = Meeting::resolve(spec(vec![Selector { under: Some("nowhere".into()), ..under }]), &inv, &policy).unwrap_err();
        assert!(e.contains("participants[0]: under: unknown site \"nowhere\""), "{e}");
        let e = Meeting::resolve(spec(vec![sel(&[], None, Some("hamlet"))]), &inv, &policy).unwrap_err();
        assert!(e.contains("level \"hamlet\" is not a level of the inventory (province, district, commune)"), "{e}");
    }

    #[test]
    fn participants_by_site_district_and_level() {
        let inv = Inventory::embedded();
        let policy = Policy::default();
        let m = Meeting::resolve(spec(vec![sel(&["tinh.vp-ubnd"], None, None), sel(&[], Some("Mèo Vạc"), Some("commune"))]), &inv, &policy)
            .unwrap();
        let communes = inv.sites().iter().filter(|s| s.district == "Mèo Vạc" && s.level == "commune").count();
        assert_eq!(m.participants.len(), 1 + communes);
        assert!(m.participants.iter().all(|&s| inv.site(s).id == "tinh.vp-ubnd" || inv.site(s).district == "Mèo Vạc"));
        assert_eq!(m.need_bytes_per_second, 300_000.0);
        let all_districts = Meeting::resolve(spec(vec![sel(&[], None, Some("district"))]), &inv, &policy).unwrap();
        assert_eq!(all_districts.participants.len(), 22, "11 Party committees + 11 People's Committees");
        // Overlapping selectors count a site once.
        let twice =
            Meeting::resolve(spec(vec![sel(&["meo-vac.xin-cai"], None, None), sel(&[], Some("Mèo Vạc"), None)]), &inv, &policy).unwrap();
        assert_eq!(twice.participants.len(), inv.sites().iter().filter(|s| s.district == "Mèo Vạc").count());
    }

    #[test]
    fn bad_meetings_are_explained() {
        let inv = Inventory::embedded();
        let policy = Policy::default();
        let e = Meeting::resolve(spec(vec![sel(&["nowhere"], None, None)]), &inv, &policy).unwrap_err();
        assert!(e.contains("unknown site \"nowhere\""), "{e}");
        let e = Meeting::resolve(spec(vec![sel(&[], Some("Atlantis"), None)]), &inv, &policy).unwrap_err();
        assert!(e.contains("no site matches district"), "{e}");
        // A misspelt district next to explicit sites is still an error.
        let e = Meeting::resolve(spec(vec![sel(&["tinh.vp-ubnd"], Some("Meo Vac"), None)]), &inv, &policy).unwrap_err();
        assert!(e.contains("no site matches district"), "{e}");
        // A selector that only repeats sites already selected is fine.
        Meeting::resolve(spec(vec![sel(&[], None, Some("district")), sel(&[], Some("Mèo Vạc"), Some("district"))]), &inv, &policy).unwrap();
        let mut long = spec(vec![sel(&["tinh.vp-ubnd"], None, None)]);
        long.duration_mins = u64::MAX;
        assert!(Meeting::resolve(long, &inv, &policy).unwrap_err().contains("duration_mins"));
        let mut ancient = spec(vec![sel(&["tinh.vp-ubnd"], None, None)]);
        ancient.start = DateTime::parse_from_rfc3339("1700-01-01T00:00:00Z").unwrap();
        assert!(Meeting::resolve(ancient, &inv, &policy).unwrap_err().contains("between the years"));
        let mut s = spec(vec![sel(&["tinh.vp-ubnd"], None, None)]);
        s.profile = Some("8k".into());
        assert!(Meeting::resolve(s, &inv, &policy).unwrap_err().contains("unknown profile"));
    }

    #[test]
    fn phases_follow_the_clock() {
        let inv = Inventory::embedded();
        let m = Meeting::resolve(spec(vec![sel(&["tinh.vp-ubnd"], None, None)]), &inv, &Policy::default()).unwrap();
        let start = m.start_ns();
        let min = 60_000_000_000;
        assert_eq!(m.phase(start - 31 * min, 1800), Phase::Upcoming);
        assert_eq!(m.phase(start - 29 * min, 1800), Phase::Lead);
        assert_eq!(m.phase(start + min, 1800), Phase::InProgress);
        assert_eq!(m.phase(start + 60 * min, 1800), Phase::Ended);
    }
}
