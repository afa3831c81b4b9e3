//! Telegraf JSON (`data_format = "json"`): one metric `{"fields":{…},"name":…,"tags":{…},
//! "timestamp":…}` or the batch form `{"metrics":[…]}`. Schema: `schemas/telegraf-metric.schema.json`.
//!
//! `ping` metrics become probe results: RTT = `average_response_ms`, jitter =
//! `standard_deviation_ms` (Telegraf's ping has no jitter field; the spread of the round's RTTs
//! is the usual stand-in), loss = `percent_packet_loss`. A round with no reply has loss 100 %
//! and RTT 0. The site is the `site` tag if present, else the one whose prefix holds the `url`
//! tag's address (matched at enrichment). The timestamp's unit (s, ms, µs or ns, Telegraf's
//! `json_timestamp_units`) is inferred from its size.
//!
//! A metric with interface octet counters becomes a counter sample, whatever its name: `net`
//! (`bytes_recv`/`bytes_sent`, 64-bit), or SNMP IF-MIB tables as `inputs.snmp` names them
//! (`ifHCInOctets`/`ifHCOutOctets`, 64-bit, preferred over `ifInOctets`/`ifOutOctets`, 32-bit).
//! The interface is the first of the tags `interface`, `ifName`, `ifDescr`, `name`, `ifIndex`;
//! the device the first of `agent_host`, `source`, `host`. Turning the counters into byte rates
//! needs the previous sample, so that happens later (the `rates` stage). Other measurements are
//! counted as `unsupported_measurement` and skipped.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;

use super::{CounterColumns, CounterRecord, DecodeLimits, ProbeColumns, ProbeRecord, RejectReason};

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

/// Where decoded metrics go.
pub struct Output<'a> {
    pub probes: &'a mut ProbeColumns,
    pub counters: &'a mut CounterColumns,
    /// Per decoded metric in document order: `true` for a counter sample, `false` for a probe
    /// result (event time advances in this order, across both tables).
    pub order: &'a mut Vec<bool>,
}

/// Decodes one Telegraf JSON document (single or batch) into `out`; returns one outcome per
/// metric.
pub fn decode_document(rec: &[u8], limits: &DecodeLimits, out: &mut Output<'_>) -> Vec<Result<(), RejectReason>> {
    let doc: Document = match serde_json::from_slice(rec) {
        Ok(d) => d,
        Err(e) => return vec![Err(RejectReason::of_json_error(&e))],
    };
    let metrics = match doc {
        Document::Batch { metrics } => metrics,
        Document::Single(m) => vec![m],
    };
    metrics
        .iter()
        .map(|m| {
            if m.name == "ping" {
                ping(m, limits, &mut |r| {
                    out.probes.push(r);
                    out.order.push(false);
                })
            } else {
                counters(m, limits, &mut |r| {
                    out.counters.push(r);
                    out.order.push(true);
                })
            }
        })
        .collect()
}

/// Counter field names (in, out) by width, widest first.
const OCTET_FIELDS: [(&str, &str, u8); 3] =
    [("bytes_recv", "bytes_sent", 64), ("ifHCInOctets", "ifHCOutOctets", 64), ("ifInOctets", "ifOutOctets", 32)];

/// A counter value: a non-negative integer that fits the counter's width.
pub(super) fn counter_value(v: &serde_json::Value, bits: u8) -> Result<u64, RejectReason> {
    let n = match v {
        serde_json::Value::Number(n) => n,
        _ => return Err(RejectReason::WrongSchema),
    };
    let value = match (n.as_u64(), n.as_i64(), n.as_f64()) {
        (Some(u), _, _) => u,
        (None, Some(_), _) => return Err(RejectReason::NegativeCounter),
        (None, None, Some(f)) if f < 0.0 => return Err(RejectReason::NegativeCounter),
        // An integral float (some agents print counters as 1.2e+10) within u64.
        (None, None, Some(f)) if f.fract() == 0.0 && f < u64::MAX as f64 => f as u64,
        _ => return Err(RejectReason::WrongSchema),
    };
    if bits == 32 && value > u64::from(u32::MAX) {
        return Err(RejectReason::AbsurdCounter);
    }
    Ok(value)
}

fn first_tag<'m>(m: &'m Metric<'_>, names: &[&str]) -> &'m str {
    names.iter().find_map(|n| m.tags.get(*n).map(|v| v.as_ref()).filter(|v| !v.is_empty())).unwrap_or("")
}

/// RFC 2863 `ifOperStatus`, as a number or (translated by Telegraf) a name: up, down (also
/// `lowerLayerDown` and `notPresent`: nothing passes), or neither (testing, unknown, dormant).
fn oper_status(v: &serde_json::Value) -> Option<bool> {
    match v {
        serde_json::Value::Number(n) => match n.as_u64()? {
            1 => Some(true),
            2 | 6 | 7 => Some(false),
            _ => None,
        },
        serde_json::Value::String(s) => match s.trim_end_matches(|c: char| c == ')' || c.is_ascii_digit()).trim_end_matches('(') {
            "up" => Some(true),
            "down" | "lowerLayerDown" | "notPresent" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// The interface's speed in bits per second: `ifHighSpeed` (Mbit/s), else `ifSpeed` (bit/s;
/// its maximum means "faster than 32 bits say").
fn speed_bps(m: &Metric<'_>) -> Option<u64> {
    let int = |name: &str| m.fields.get(name).and_then(serde_json::Value::as_u64).filter(|v| *v > 0);
    int("ifHighSpeed").map(|mbps| mbps.saturating_mul(1_000_000)).or_else(|| int("ifSpeed").filter(|v| *v < u64::from(u32::MAX)))
}

fn counters(m: &Metric<'_>, limits: &DecodeLimits, push: &mut impl FnMut(&CounterRecord<'_>)) -> Result<(), RejectReason> {
    let link_up = m.fields.get("ifOperStatus").and_then(oper_status);
    let octets = OCTET_FIELDS.iter().find(|(i, o, _)| m.fields.contains_key(*i) || m.fields.contains_key(*o));
    // A sample of link state alone (ifOperStatus in a table without octets) is still one.
    let Some(&(in_name, out_name, bits)) = octets.or(m.fields.contains_key("ifOperStatus").then_some(&OCTET_FIELDS[1])) else {
        return Err(RejectReason::UnsupportedMeasurement);
    };
    let t = timestamp_ns(&m.timestamp).ok_or(RejectReason::BadTimestamp)?;
    let in_octets = m.fields.get(in_name).map(|v| counter_value(v, bits)).transpose()?;
    let out_octets = m.fields.get(out_name).map(|v| counter_value(v, bits)).transpose()?;
    let interface = first_tag(m, &["interface", "ifName", "ifDescr", "name", "ifIndex"]);
    let device = first_tag(m, &["agent_host", "source", "host"]);
    let site = first_tag(m, &["site"]);
    if interface.is_empty() || (device.is_empty() && site.is_empty()) {
        return Err(RejectReason::WrongSchema);
    }
    push(&CounterRecord {
        event_time_ns: limits.check_time(t)?,
        site_id: site,
        device,
        interface,
        in_octets,
        out_octets,
        counter_bits: bits,
        link_up,
        speed_bps: speed_bps(m),
    });
    Ok(())
}

fn ping(m: &Metric<'_>, limits: &DecodeLimits, push: &mut impl FnMut(&ProbeRecord<'_>)) -> Result<(), RejectReason> {
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
    use datafusion::arrow::array::{Array, AsArray, PrimitiveArray, RecordBatch};
    use datafusion::arrow::datatypes::{Float64Type, TimestampNanosecondType, UInt8Type, UInt64Type};

    const PING: &str = r#"{"fields":{"average_response_ms":35.2,"maximum_response_ms":40.1,"minimum_response_ms":30.0,"packets_received":10,"packets_transmitted":10,"percent_packet_loss":0,"result_code":0,"standard_deviation_ms":2.5,"ttl":63},"name":"ping","tags":{"host":"probe-1","url":"10.2.21.1"},"timestamp":1764000000}"#;

    /// (site id, target, rtt, jitter, loss, event time) of each decoded ping.
    type Ping = (String, String, f64, f64, f64, i64);

    fn decode_all(doc: &str) -> (RecordBatch, RecordBatch, Vec<Result<(), RejectReason>>) {
        let (mut probes, mut counters) = (ProbeColumns::default(), CounterColumns::default());
        let mut order = Vec::new();
        let outcomes =
            decode_document(doc.as_bytes(), &limits(), &mut Output { probes: &mut probes, counters: &mut counters, order: &mut order });
        assert_eq!(order.len(), probes.len() + counters.len());
        (probes.finish(), counters.finish(), outcomes)
    }

    fn decode(doc: &str) -> (Vec<Ping>, Vec<Result<(), RejectReason>>) {
        let (probes, _, outcomes) = decode_all(doc);
        let s = |c: &str| probes.column_by_name(c).unwrap().as_string::<i32>().clone();
        let f = |c: &str| probes.column_by_name(c).unwrap().as_primitive::<Float64Type>().clone();
        let t = probes.column_by_name("event_time").unwrap().as_primitive::<TimestampNanosecondType>().clone();
        let got = (0..probes.num_rows())
            .map(|i| {
                let (site, target) = (s("site_id").value(i).to_string(), s("target").value(i).to_string());
                (site, target, f("rtt_seconds").value(i), f("jitter_seconds").value(i), f("loss_ratio").value(i), t.value(i))
            })
            .collect();
        (got, outcomes)
    }

    /// (device, interface, in, out, bits) of each counter sample.
    fn counters_of(doc: &str) -> (Vec<(String, String, Option<u64>, Option<u64>, u8)>, Vec<Result<(), RejectReason>>) {
        let (_, c, outcomes) = decode_all(doc);
        let s = |n: &str| c.column_by_name(n).unwrap().as_string::<i32>().clone();
        let u = |n: &str| c.column_by_name(n).unwrap().as_primitive::<UInt64Type>().clone();
        let bits = c.column_by_name("counter_bits").unwrap().as_primitive::<UInt8Type>().clone();
        let got = (0..c.num_rows())
            .map(|i| {
                let opt = |a: &PrimitiveArray<UInt64Type>| a.is_valid(i).then(|| a.value(i));
                (
                    s("device").value(i).to_string(),
                    s("interface").value(i).to_string(),
                    opt(&u("in_octets")),
                    opt(&u("out_octets")),
                    bits.value(i),
                )
            })
            .collect();
        (got, outcomes)
    }

    #[test]
    fn interface_counters() {
        let net = r#"{"fields":{"bytes_recv":1000,"bytes_sent":2000,"packets_recv":10},"name":"net","tags":{"host":"r1","interface":"eth0","site":"tinh.vp-ubnd"},"timestamp":1764000000}"#;
        let snmp_hc = r#"{"fields":{"ifHCInOctets":18446744073709551000,"ifHCOutOctets":5,"ifInOctets":7},"name":"interface","tags":{"agent_host":"172.16.2.21","ifName":"Gi0/1"},"timestamp":1764000000}"#;
        let snmp_32 = r#"{"fields":{"ifInOctets":4294967295},"name":"ifTable","tags":{"agent_host":"172.16.2.21","ifIndex":"3"},"timestamp":1764000000}"#;
        let all = r#"{"fields":{"icmp_inmsgs":3},"name":"net","tags":{"host":"r1","interface":"all"},"timestamp":1764000000}"#;
        let (got, outcomes) = counters_of(&format!(r#"{{"metrics":[{net},{snmp_hc},{snmp_32},{all}]}}"#));
        assert_eq!(outcomes, vec![Ok(()), Ok(()), Ok(()), Err(RejectReason::UnsupportedMeasurement)]);
        assert_eq!(
            got,
            vec![
                ("r1".into(), "eth0".into(), Some(1000), Some(2000), 64),
                ("172.16.2.21".into(), "Gi0/1".into(), Some(18_446_744_073_709_551_000), Some(5), 64),
                ("172.16.2.21".into(), "3".into(), Some(4_294_967_295), None, 32),
            ]
        );
        let bad = |s: String| counters_of(&s).1;
        assert_eq!(bad(net.replace("1000", "-1000")), vec![Err(RejectReason::NegativeCounter)]);
        assert_eq!(bad(net.replace("1000", "\"1000\"")), vec![Err(RejectReason::WrongSchema)]);
        assert_eq!(bad(snmp_32.replace("4294967295", "4294967296")), vec![Err(RejectReason::AbsurdCounter)]);
        assert_eq!(bad(net.replace("\"interface\":\"eth0\",", "")), vec![Err(RejectReason::WrongSchema)]);
        assert_eq!(bad(net.replace("1764000000}", "0}")), vec![Err(RejectReason::BadTimestamp)]);
    }

    #[test]
    fn link_state_and_speed_from_snmp() {
        let doc = |fields: &str| {
            format!(
                r#"{{"fields":{{{fields}}},"name":"interface","tags":{{"agent_host":"172.16.3.1","ifName":"Gi0/0"}},"timestamp":1764000000}}"#
            )
        };
        let state = |fields: &str| {
            let (_, c, outcomes) = decode_all(&doc(fields));
            assert_eq!(outcomes, vec![Ok(())], "{fields}");
            let up = c.column_by_name("link_up").unwrap().as_boolean().clone();
            let speed = c.column_by_name("speed_bits_per_second").unwrap().as_primitive::<UInt64Type>().clone();
            (up.is_valid(0).then(|| up.value(0)), speed.is_valid(0).then(|| speed.value(0)))
        };
        assert_eq!(state(r#""ifHCInOctets":5,"ifOperStatus":1,"ifHighSpeed":100"#), (Some(true), Some(100_000_000)));
        assert_eq!(state(r#""ifHCInOctets":5,"ifOperStatus":2,"ifSpeed":20000000"#), (Some(false), Some(20_000_000)));
        assert_eq!(state(r#""ifHCInOctets":5,"ifOperStatus":7"#), (Some(false), None), "lowerLayerDown");
        assert_eq!(state(r#""ifHCInOctets":5,"ifOperStatus":5,"ifSpeed":4294967295"#), (None, None), "dormant; speed unknown");
        assert_eq!(state(r#""ifHCInOctets":5,"ifOperStatus":"down(2)""#), (Some(false), None), "translated by Telegraf");
        assert_eq!(state(r#""ifHCInOctets":5,"ifOperStatus":"up""#), (Some(true), None));
        // Link state without octets is a sample too, with no traffic.
        let (got, _) = counters_of(&doc(r#""ifOperStatus":2"#));
        assert_eq!(got, vec![("172.16.3.1".into(), "Gi0/0".into(), None, None, 64)]);
        assert_eq!(state(r#""ifOperStatus":2"#), (Some(false), None));
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
