//! Telegraf JSON (`data_format = "json"`): one metric `{"fields":{…},"name":…,"tags":{…},
//! "timestamp":…}` or the batch form `{"metrics":[…]}`. Schema: `schemas/telegraf-metric.schema.json`.
//!
//! `ping` metrics become probe results: RTT = `average_response_ms`, jitter =
//! `standard_deviation_ms` (Telegraf's ping has no jitter field; the spread of the round's RTTs
//! is the usual stand-in), loss = `percent_packet_loss`. A round with no reply has loss 100 %
//! and RTT 0. The site is the `site` tag if present, else the one whose prefix holds the `url`
//! tag's address (matched at enrichment). The timestamp's unit (s, ms, µs or ns, Telegraf's
//! `json_timestamp_units`) is inferred from its size. Other measurements are counted as
//! `unsupported_measurement` and skipped.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;

use super::{DecodeLimits, ProbeRecord, RejectReason};

#[derive(Deserialize)]
struct Metric<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    tags: HashMap<Cow<'a, str>, Cow<'a, str>>,
    #[serde(default)]
    fields: HashMap<Cow<'a, str>, serde_json::Value>,
    timestamp: serde_json::Number,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Document<'a> {
    Batch {
        #[serde(borrow)]
        metrics: Vec<Metric<'a>>,
    },
    #[serde(borrow)]
    Single(Metric<'a>),
}

/// Nanoseconds from a timestamp in s, ms, µs or ns (inferred from its magnitude). Integers are
/// scaled exactly; fractional seconds through f64.
fn timestamp_ns(n: &serde_json::Number) -> Option<i64> {
    let scale = |v: f64| -> i64 {
        if v < 1e11 {
            1_000_000_000
        } else if v < 1e14 {
            1_000_000
        } else if v < 1e17 {
            1_000
        } else {
            1
        }
    };
    if let Some(i) = n.as_i64() {
        return if i > 0 { i.checked_mul(scale(i as f64)) } else { None };
    }
    let v = n.as_f64()?;
    if !v.is_finite() || v <= 0.0 {
        return None;
    }
    let ns = v * scale(v) as f64;
    (ns < i64::MAX as f64).then_some(ns as i64)
}

fn field(m: &Metric<'_>, name: &str) -> Option<f64> {
    m.fields.get(name).and_then(serde_json::Value::as_f64)
}

/// Decodes one Telegraf JSON document (single or batch) and hands each ping result to `push`;
/// returns one outcome per metric.
pub fn decode_document(rec: &[u8], limits: &DecodeLimits, mut push: impl FnMut(&ProbeRecord<'_>)) -> Vec<Result<(), RejectReason>> {
    let doc: Document = match serde_json::from_slice(rec) {
        Ok(d) => d,
        Err(e) => return vec![Err(RejectReason::of_json_error(&e))],
    };
    let metrics = match doc {
        Document::Batch { metrics } => metrics,
        Document::Single(m) => vec![m],
    };
    metrics.iter().map(|m| ping(m, limits, &mut push)).collect()
}

fn ping(m: &Metric<'_>, limits: &DecodeLimits, push: &mut impl FnMut(&ProbeRecord<'_>)) -> Result<(), RejectReason> {
    if m.name != "ping" {
        return Err(RejectReason::UnsupportedMeasurement);
    }
    let t = timestamp_ns(&m.timestamp).ok_or(RejectReason::BadTimestamp)?;
    let loss_pct = field(m, "percent_packet_loss").ok_or(RejectReason::WrongSchema)?;
    let received = field(m, "packets_received").unwrap_or(1.0);
    let (rtt_ms, jitter_ms) = if received > 0.0 {
        (field(m, "average_response_ms").ok_or(RejectReason::WrongSchema)?, field(m, "standard_deviation_ms").unwrap_or(0.0))
    } else {
        (0.0, 0.0)
    };
    let in_range = |v: f64, max: f64| v.is_finite() && (0.0..=max).contains(&v);
    if !in_range(rtt_ms, 60_000.0) || !in_range(jitter_ms, 60_000.0) || !in_range(loss_pct, 100.0) {
        return Err(RejectReason::AbsurdValue);
    }
    let url = m.tags.get("url").map(|u| u.as_ref()).unwrap_or("");
    let site = m.tags.get("site").map(|s| s.as_ref()).unwrap_or("");
    if site.is_empty() && url.is_empty() {
        return Err(RejectReason::WrongSchema);
    }
    push(&ProbeRecord {
        event_time_ns: limits.check_time(t)?,
        site_id: site,
        target: url,
        rtt_seconds: rtt_ms / 1e3,
        jitter_seconds: jitter_ms / 1e3,
        loss_ratio: loss_pct / 100.0,
        sent: field(m, "packets_transmitted").unwrap_or(0.0) as i64,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::goflow2_json::tests::limits;

    const PING: &str = r#"{"fields":{"average_response_ms":35.2,"maximum_response_ms":40.1,"minimum_response_ms":30.0,"packets_received":10,"packets_transmitted":10,"percent_packet_loss":0,"result_code":0,"standard_deviation_ms":2.5,"ttl":63},"name":"ping","tags":{"host":"probe-1","url":"10.2.21.1"},"timestamp":1764000000}"#;

    /// (site id, target, rtt, jitter, loss, event time) of each decoded ping.
    type Ping = (String, String, f64, f64, f64, i64);

    fn decode(doc: &str) -> (Vec<Ping>, Vec<Result<(), RejectReason>>) {
        let mut got = Vec::new();
        let outcomes = decode_document(doc.as_bytes(), &limits(), |r| {
            got.push((r.site_id.to_string(), r.target.to_string(), r.rtt_seconds, r.jitter_seconds, r.loss_ratio, r.event_time_ns))
        });
        (got, outcomes)
    }

    #[test]
    fn single_and_batch_pings() {
        let (got, outcomes) = decode(PING);
        assert_eq!(outcomes, vec![Ok(())]);
        assert_eq!(got, vec![(String::new(), "10.2.21.1".into(), 0.0352, 0.0025, 0.0, 1_764_000_000_000_000_000)]);
        let lost = PING
            .replace("\"packets_received\":10", "\"packets_received\":0")
            .replace("\"percent_packet_loss\":0", "\"percent_packet_loss\":100");
        let ms = PING.replace("1764000000}", "1764000000123}").replace("\"url\"", "\"site\":\"tinh.vp-ubnd\",\"url\"");
        let cpu = r#"{"fields":{"usage_idle":99},"name":"cpu","tags":{},"timestamp":1764000000}"#;
        let (got, outcomes) = decode(&format!(r#"{{"metrics":[{lost},{ms},{cpu}]}}"#));
        assert_eq!(outcomes, vec![Ok(()), Ok(()), Err(RejectReason::UnsupportedMeasurement)]);
        assert_eq!((got[0].2, got[0].4), (0.0, 1.0), "no reply: RTT 0, loss 100 %");
        assert_eq!((got[1].0.as_str(), got[1].5), ("tinh.vp-ubnd", 1_764_000_000_123_000_000), "site tag; ms timestamps");
    }

    #[test]
    fn bad_pings_have_reasons() {
        let bad = |s: String| decode(&s).1;
        assert_eq!(bad(PING.replace("1764000000}", "-5}")), vec![Err(RejectReason::BadTimestamp)]);
        assert_eq!(bad(PING.replace("\"percent_packet_loss\":0", "\"percent_packet_loss\":250")), vec![Err(RejectReason::AbsurdValue)]);
        assert_eq!(bad(PING.replace("\"percent_packet_loss\":0,", "")), vec![Err(RejectReason::WrongSchema)]);
        assert_eq!(bad(PING.replace("\"url\":\"10.2.21.1\"", "\"x\":\"y\"")), vec![Err(RejectReason::WrongSchema)]);
        assert_eq!(bad(PING[..30].to_string()), vec![Err(RejectReason::NotJson)]);
    }
}
