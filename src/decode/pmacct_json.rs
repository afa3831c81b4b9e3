//! pmacct JSON (nfacctd/sfacctd Kafka plugin, `kafka_output: json`). Schema:
//! `schemas/pmacct-flow.schema.json`.
//!
//! Which keys appear depends on the plugin's `aggregate:` list. Timestamps are strings like
//! `"1677577599.000000"` with `timestamps_since_epoch: true`, integers with `timestamps_secs`,
//! or `"2023-02-28 09:46:39"` (UTC assumed: set `timestamps_utc: true`) otherwise. With
//! `kafka_multi_values: N` one message carries N newline-separated records.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::flat_json::{self, Scalar};
use super::{DecodeLimits, FlowRecord, FlowTimes, Proto, RejectReason, parse_addr, parse_flow_addr, protocol_number};

#[derive(Deserialize)]
struct PmacctFlow<'a> {
    #[serde(borrow, alias = "peer_src_ip")]
    peer_ip_src: Option<Cow<'a, str>>,
    #[serde(default)]
    iface_in: u32,
    #[serde(default)]
    iface_out: u32,
    #[serde(borrow, alias = "src_host")]
    ip_src: Cow<'a, str>,
    #[serde(borrow, alias = "dst_host")]
    ip_dst: Cow<'a, str>,
    #[serde(default)]
    port_src: u16,
    #[serde(default)]
    port_dst: u16,
    #[serde(default)]
    ip_proto: Proto,
    #[serde(default)]
    timestamp_start: Stamp,
    #[serde(default)]
    timestamp_end: Stamp,
    #[serde(default)]
    timestamp_arrival: Stamp,
    #[serde(default)]
    stamp_updated: Stamp,
    #[serde(default)]
    stamp_inserted: Stamp,
    // NAT and firewall events (NEL/NSEL) carry no counters.
    #[serde(default)]
    packets: i64,
    #[serde(default)]
    bytes: i64,
    #[serde(default = "one")]
    flows: i64,
    #[serde(default)]
    sampling_rate: i64,
}

fn one() -> i64 {
    1
}

/// A pmacct timestamp, in nanoseconds since the epoch (0 when absent or empty).
#[derive(Default, Clone, Copy)]
struct Stamp(i64);

fn parse_stamp(s: &str) -> Option<i64> {
    let s = s.trim();
    if s.is_empty() {
        return Some(0);
    }
    if let Some((secs, frac)) = s.split_once('.')
        && secs.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
    {
        let secs: i64 = secs.parse().ok()?;
        // Nanoseconds from the first nine digits of the fraction, without a padded copy.
        let digits = frac.len().min(9);
        let nanos = frac.bytes().take(9).fold(0i64, |n, d| n * 10 + i64::from(d - b'0')) * 10i64.pow(9 - digits as u32);
        return secs.checked_mul(1_000_000_000)?.checked_add(nanos);
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<i64>().ok()?.checked_mul(1_000_000_000);
    }
    let naive = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").ok()?;
    naive.and_utc().timestamp_nanos_opt()
}

impl<'de> Deserialize<'de> for Stamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Stamp;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a pmacct timestamp")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Stamp, E> {
                parse_stamp(v).map(Stamp).ok_or_else(|| E::custom(format!("bad timestamp {v:?}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Stamp, E> {
                i64::try_from(v)
                    .ok()
                    .and_then(|s| s.checked_mul(1_000_000_000))
                    .map(Stamp)
                    .ok_or_else(|| E::custom("timestamp out of range"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Stamp, E> {
                v.checked_mul(1_000_000_000).map(Stamp).ok_or_else(|| E::custom("timestamp out of range"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Stamp, E> {
                if v.is_finite() && (0.0..9.2e9).contains(&v) {
                    Ok(Stamp((v * 1e9) as i64))
                } else {
                    Err(E::custom("timestamp out of range"))
                }
            }
        }
        d.deserialize_any(V)
    }
}

fn counter(v: i64, max: u64) -> Result<u64, RejectReason> {
    if v < 0 {
        Err(RejectReason::NegativeCounter)
    } else if v as u64 > max {
        Err(RejectReason::AbsurdCounter)
    } else {
        Ok(v as u64)
    }
}

/// pmacct's keys in the order its Kafka plugin prints them (aliases next to their key), with the
/// slot of each one siteflow reads (the bit [`scan_flow`] marks it with; an alias shares it).
const KEYS: &flat_json::Keys = &[
    ("event_type", None),
    ("peer_ip_src", Some(0)),
    ("peer_src_ip", Some(0)),
    ("iface_in", Some(1)),
    ("iface_out", Some(2)),
    ("ip_src", Some(3)),
    ("src_host", Some(3)),
    ("ip_dst", Some(4)),
    ("dst_host", Some(4)),
    ("port_src", Some(5)),
    ("port_dst", Some(6)),
    ("ip_proto", Some(7)),
    ("timestamp_start", Some(8)),
    ("timestamp_end", Some(9)),
    ("timestamp_arrival", Some(10)),
    ("stamp_inserted", Some(11)),
    ("stamp_updated", Some(12)),
    ("packets", Some(13)),
    ("bytes", Some(14)),
    ("flows", Some(15)),
    ("sampling_rate", Some(16)),
    ("writer_id", None),
];

/// The fields of a flat record, or `None` where serde_json must judge: a field of another type
/// (floats, `null`), a field or its alias twice, a timestamp that does not parse, a required
/// field missing, or anything [`flat_json::scan_keyed`] does not take.
fn scan_flow(text: &str) -> Option<PmacctFlow<'_>> {
    const REQUIRED: u32 = 1 << 3 | 1 << 4;
    let mut f = PmacctFlow {
        peer_ip_src: None,
        iface_in: 0,
        iface_out: 0,
        ip_src: Cow::Borrowed(""),
        ip_dst: Cow::Borrowed(""),
        port_src: 0,
        port_dst: 0,
        ip_proto: Proto::default(),
        timestamp_start: Stamp::default(),
        timestamp_end: Stamp::default(),
        timestamp_arrival: Stamp::default(),
        stamp_updated: Stamp::default(),
        stamp_inserted: Stamp::default(),
        packets: 0,
        bytes: 0,
        flows: one(),
        sampling_rate: 0,
    };
    let mut seen = 0u32;
    let stamp = |value| match value {
        Scalar::Str(s) => parse_stamp(s).map(Stamp),
        Scalar::Int(v) => i64::try_from(v).ok()?.checked_mul(1_000_000_000).map(Stamp),
        Scalar::Literal => None,
    };
    flat_json::scan_keyed(text, KEYS, |slot, value| {
        if seen & (1 << slot) != 0 {
            return None;
        }
        seen |= 1 << slot;
        match (slot, value) {
            (0, Scalar::Str(s)) => f.peer_ip_src = Some(Cow::Borrowed(s)),
            (1, Scalar::Int(v)) => f.iface_in = u32::try_from(v).ok()?,
            (2, Scalar::Int(v)) => f.iface_out = u32::try_from(v).ok()?,
            (3, Scalar::Str(s)) => f.ip_src = Cow::Borrowed(s),
            (4, Scalar::Str(s)) => f.ip_dst = Cow::Borrowed(s),
            (5, Scalar::Int(v)) => f.port_src = u16::try_from(v).ok()?,
            (6, Scalar::Int(v)) => f.port_dst = u16::try_from(v).ok()?,
            (7, Scalar::Str(s)) => f.ip_proto = Proto(protocol_number(s)),
            (7, Scalar::Int(v)) => f.ip_proto = Proto(u8::try_from(v).ok()?),
            (8, v) => f.timestamp_start = stamp(v)?,
            (9, v) => f.timestamp_end = stamp(v)?,
            (10, v) => f.timestamp_arrival = stamp(v)?,
            (11, v) => f.stamp_inserted = stamp(v)?,
            (12, v) => f.stamp_updated = stamp(v)?,
            (13, Scalar::Int(v)) => f.packets = i64::try_from(v).ok()?,
            (14, Scalar::Int(v)) => f.bytes = i64::try_from(v).ok()?,
            (15, Scalar::Int(v)) => f.flows = i64::try_from(v).ok()?,
            (16, Scalar::Int(v)) => f.sampling_rate = i64::try_from(v).ok()?,
            _ => return None,
        }
        Some(())
    })?;
    (seen & REQUIRED == REQUIRED).then_some(f)
}

/// Decodes one pmacct JSON record.
pub fn decode_record(rec: &[u8], limits: &DecodeLimits) -> Result<FlowRecord, RejectReason> {
    // Checking UTF-8 once here spares serde_json a check per string.
    let text = std::str::from_utf8(rec).map_err(|_| RejectReason::NotJson)?;
    match scan_flow(text) {
        Some(f) => flow_record(f, limits),
        None => decode_with_serde(text, limits),
    }
}

/// The reference decoder: serde_json alone (what the fast path must agree with).
fn decode_with_serde(text: &str, limits: &DecodeLimits) -> Result<FlowRecord, RejectReason> {
    let f: PmacctFlow = serde_json::from_str(text).map_err(|e| {
        // A timestamp string that does not parse is a bad timestamp, not a schema problem.
        if e.to_string().contains("bad timestamp") { RejectReason::BadTimestamp } else { RejectReason::of_json_error(&e) }
    })?;
    flow_record(f, limits)
}

fn flow_record(f: PmacctFlow<'_>, limits: &DecodeLimits) -> Result<FlowRecord, RejectReason> {
    let times = FlowTimes {
        start_ns: f.timestamp_start.0,
        end_ns: f.timestamp_end.0,
        arrival_ns: f.timestamp_arrival.0,
        stamp_ns: if f.stamp_updated.0 != 0 { f.stamp_updated.0 } else { f.stamp_inserted.0 },
    };
    let exporter = match f.peer_ip_src.as_deref() {
        Some(s) if !s.is_empty() => parse_addr(s)?,
        // Without peer_src_ip in `aggregate:`, the site comes from the addresses alone.
        _ => 0,
    };
    Ok(FlowRecord {
        times,
        exporter,
        // Non-IP flows (EoMPLS, `aggregate` with etype) have empty addresses.
        src_addr: parse_flow_addr(&f.ip_src)?,
        dst_addr: parse_flow_addr(&f.ip_dst)?,
        src_port: f.port_src,
        dst_port: f.port_dst,
        proto: f.ip_proto.0,
        in_if: f.iface_in,
        out_if: f.iface_out,
        bytes: counter(f.bytes, limits.max_bytes_per_record)?,
        packets: counter(f.packets, limits.max_bytes_per_record)?,
        flows: counter(f.flows, limits.max_bytes_per_record)?,
        sampling_rate: counter(f.sampling_rate, u64::from(u32::MAX))? as u32,
        ..FlowRecord::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::goflow2_json::tests::limits;
    use crate::inventory::addr_from_ip;

    const GOOD: &str = r#"{"event_type":"purge","peer_ip_src":"172.16.2.21","iface_in":2,"iface_out":1,"ip_src":"203.0.113.9","ip_dst":"10.2.21.5","port_src":443,"port_dst":51000,"ip_proto":"tcp","timestamp_start":"1764000000.000000","timestamp_end":"1764000000.400000","timestamp_arrival":"1764000001.000000","packets":3,"bytes":1500,"flows":1,"writer_id":"default_kafka/1234"}"#;

    #[test]
    fn decodes_a_pmacct_record() {
        let r = decode_record(GOOD.as_bytes(), &limits()).unwrap();
        let times = FlowTimes {
            start_ns: 1_764_000_000_000_000_000,
            end_ns: 1_764_000_000_400_000_000,
            arrival_ns: 1_764_000_001_000_000_000,
            stamp_ns: 0,
        };
        assert_eq!(r.times, times);
        assert_eq!((r.bytes, r.packets, r.flows, r.proto, r.src_port, r.sampling_rate), (1500, 3, 1, 6, 443, 0));
        assert_eq!(r.exporter, addr_from_ip("172.16.2.21".parse().unwrap()));
    }

    #[test]
    fn timestamp_forms() {
        assert_eq!(parse_stamp("1764000000.5"), Some(1_764_000_000_500_000_000));
        assert_eq!(parse_stamp("1764000000.123456789987"), Some(1_764_000_000_123_456_789));
        assert_eq!(parse_stamp("1764000000."), Some(1_764_000_000_000_000_000));
        assert_eq!(parse_stamp(".5"), None);
        assert_eq!(parse_stamp("1764000000"), Some(1_764_000_000_000_000_000));
        assert_eq!(parse_stamp("2025-11-24 16:00:00"), Some(1_764_000_000_000_000_000));
        assert_eq!(parse_stamp("2025-11-24 16:00:00.250"), Some(1_764_000_000_250_000_000));
        assert_eq!(parse_stamp("yesterday"), None);
        let ints = GOOD.replace("\"1764000000.400000\"", "1764000000");
        assert_eq!(decode_record(ints.as_bytes(), &limits()).unwrap().times.end_ns, 1_764_000_000_000_000_000);
    }

    #[test]
    fn bad_records_have_reasons() {
        let l = limits();
        let bad = |s: String| decode_record(s.as_bytes(), &l).unwrap_err();
        assert_eq!(bad(GOOD.replace("\"1764000000.400000\"", "\"soon\"")), RejectReason::BadTimestamp);
        assert_eq!(bad(GOOD.replace("\"bytes\":1500", "\"bytes\":-5")), RejectReason::NegativeCounter);
        assert_eq!(bad(GOOD.replace("203.0.113.9", "203.0.113")), RejectReason::BadAddress);
        assert_eq!(bad(GOOD.replace("\"ip_dst\":\"10.2.21.5\",", "")), RejectReason::WrongSchema);
        assert_eq!(bad(GOOD[..40].to_string()), RejectReason::NotJson);
        let no_time =
            GOOD.replace("\"1764000000.000000\"", "\"\"").replace("\"1764000000.400000\"", "\"\"").replace("\"1764000001.000000\"", "\"\"");
        let r = decode_record(no_time.as_bytes(), &l).unwrap();
        assert_eq!(r.placed(crate::types::EventTime::FlowEnd, &l), Err(RejectReason::BadTimestamp));
    }

    #[test]
    fn the_fast_path_takes_the_usual_record() {
        let f = scan_flow(GOOD).expect("the usual record");
        assert_eq!((f.bytes, f.packets, f.flows, f.port_src, f.ip_proto.0), (1500, 3, 1, 443, 6));
        assert_eq!(f.timestamp_end.0, 1_764_000_000_400_000_000);
        let aliases = GOOD.replace("\"peer_ip_src\"", "\"peer_src_ip\"").replace("\"ip_src\"", "\"src_host\"").replace(",\"flows\":1", "");
        let f = scan_flow(&aliases).expect("aliases, no flows");
        assert_eq!((f.peer_ip_src.as_deref(), f.ip_src.as_ref(), f.flows), (Some("172.16.2.21"), "203.0.113.9", 1));
    }

    /// The fast path and serde_json give the same answer on every record: mutations of a pmacct
    /// record at the level of fields (missing, twice, swapped, another type or value) and bytes.
    #[test]
    fn the_fast_path_agrees_with_serde_json() {
        const VALUES: [&str; 24] = [
            "0",
            "-1",
            "65536",
            "4294967296",
            "9223372036854775808",
            "18446744073709551615",
            "1.5",
            "null",
            "true",
            "\"\"",
            "\"tcp\"",
            "\"ICMP\"",
            "\"17\"",
            "\"300\"",
            "\"10.2.21.5\"",
            "\"2001:db8::1\"",
            "\"1764000000.5\"",
            "\"1764000000\"",
            "\"2025-11-24 16:00:00\"",
            "\"soon\"",
            "1764000000",
            "-1764000000",
            "[]",
            "\"a\\u0041\"",
        ];
        let extra: Vec<(String, String)> =
            [("peer_src_ip", "\"172.16.2.22\""), ("src_host", "\"10.0.0.1\""), ("stamp_updated", "\"1764000002.0\""), ("tag", "7")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into();
        let fast = |rec: &[u8]| decode_record(rec, &limits());
        crate::decode::check_fast_path_agrees(&crate::decode::members_of(GOOD), &extra, &VALUES, fast, |text| {
            decode_with_serde(text, &limits())
        });
    }

    /// EoMPLS records print empty addresses; NAT events (NEL) carry no counters.
    #[test]
    fn non_ip_flows_and_nat_events_decode() {
        let l = limits();
        let eompls = GOOD.replace("\"203.0.113.9\"", "\"\"").replace("\"10.2.21.5\"", "\"\"");
        let r = decode_record(eompls.as_bytes(), &l).unwrap();
        assert_eq!((r.src_addr, r.dst_addr, r.bytes), (crate::decode::NO_ADDR, crate::decode::NO_ADDR, 1500));
        let nat = r#"{"event_type":"purge","peer_ip_src":"172.16.2.21","ip_src":"10.2.21.5","ip_dst":"203.0.113.9","post_nat_ip_src":"203.0.113.1","nat_event":1,"timestamp_start":"1764000000.000000"}"#;
        let r = decode_record(nat.as_bytes(), &l).unwrap();
        assert_eq!((r.bytes, r.packets), (0, 0));
    }
}
