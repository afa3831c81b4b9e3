//! siteflow's own probe record. Schema: `schemas/siteflow-probe.schema.json`.
//!
//! `{"site":"dong-van.ta-lung","time_ms":1764000000000,"target":"mcu.hagiang","rtt_ms":35.2,
//!   "jitter_ms":2.1,"loss_pct":0.0,"sent":10}` — the probe measured from the site to the target.

use std::borrow::Cow;

use serde::Deserialize;

use super::{DecodeLimits, ProbeRecord, RejectReason};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Probe<'a> {
    #[serde(borrow)]
    site: Cow<'a, str>,
    time_ms: i64,
    #[serde(borrow, default)]
    target: Cow<'a, str>,
    rtt_ms: f64,
    #[serde(default)]
    jitter_ms: f64,
    #[serde(default)]
    loss_pct: f64,
    #[serde(default)]
    sent: i64,
}

/// Largest believable round-trip time: a minute.
const MAX_RTT_MS: f64 = 60_000.0;

/// Decodes one probe record and hands it to `push`.
pub fn decode_record(rec: &[u8], limits: &DecodeLimits, push: impl FnOnce(&ProbeRecord<'_>)) -> Result<(), RejectReason> {
    let p: Probe = serde_json::from_slice(rec).map_err(|e| RejectReason::of_json_error(&e))?;
    let event_time_ns = p.time_ms.checked_mul(1_000_000).ok_or(RejectReason::BadTimestamp)?;
    let in_range = |v: f64, max: f64| v.is_finite() && (0.0..=max).contains(&v);
    if !in_range(p.rtt_ms, MAX_RTT_MS) || !in_range(p.jitter_ms, MAX_RTT_MS) || !in_range(p.loss_pct, 100.0) || p.sent < 0 {
        return Err(RejectReason::AbsurdValue);
    }
    if p.site.is_empty() {
        return Err(RejectReason::WrongSchema);
    }
    push(&ProbeRecord {
        event_time_ns: limits.check_time(event_time_ns)?,
        site_id: &p.site,
        target: &p.target,
        rtt_seconds: p.rtt_ms / 1e3,
        jitter_seconds: p.jitter_ms / 1e3,
        loss_ratio: p.loss_pct / 100.0,
        sent: p.sent,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::goflow2_json::tests::limits;

    const GOOD: &str =
        r#"{"site":"dong-van.ta-lung","time_ms":1764000000000,"target":"mcu","rtt_ms":35.5,"jitter_ms":2.5,"loss_pct":1.0,"sent":10}"#;

    #[test]
    fn decodes_in_base_units() {
        let mut got = None;
        decode_record(GOOD.as_bytes(), &limits(), |r| got = Some((r.site_id.to_string(), r.rtt_seconds, r.jitter_seconds, r.loss_ratio)))
            .unwrap();
        assert_eq!(got, Some(("dong-van.ta-lung".to_string(), 0.0355, 0.0025, 0.01)));
    }

    #[test]
    fn rejects_with_reasons() {
        let bad = |s: String| decode_record(s.as_bytes(), &limits(), |_| {}).unwrap_err();
        assert_eq!(bad(GOOD.replace("35.5", "-1")), RejectReason::AbsurdValue);
        assert_eq!(bad(GOOD.replace("\"loss_pct\":1.0", "\"loss_pct\":150")), RejectReason::AbsurdValue);
        assert_eq!(bad(GOOD.replace("1764000000000", "12")), RejectReason::BadTimestamp);
        assert_eq!(bad(GOOD.replace("\"sent\"", "\"snet\"")), RejectReason::WrongSchema);
        assert_eq!(bad(GOOD[..20].to_string()), RejectReason::NotJson);
    }
}
