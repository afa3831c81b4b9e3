//! goflow2 JSON (`goflow2 -format=json`), one flow per record. Schema: `schemas/goflow2-flow.schema.json`.
//!
//! Read into a struct that borrows its strings from the message, so a record costs no
//! allocation. The usual record goes through the flat-object scanner ([`super::flat_json`]);
//! any other goes through serde_json, which has the last word on what is valid.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::flat_json::{self, Scalar};
use super::{DecodeLimits, FlowRecord, FlowTimes, Proto, RejectReason, parse_addr, parse_flow_addr, protocol_number};

#[derive(Deserialize, Default)]
struct Goflow2Flow<'a> {
    #[serde(default)]
    time_received_ns: Counter,
    #[serde(default)]
    time_flow_start_ns: Counter,
    #[serde(default)]
    time_flow_end_ns: Counter,
    #[serde(default)]
    sampling_rate: Counter,
    #[serde(borrow)]
    sampler_address: Cow<'a, str>,
    // Options and event records carry no counters; non-IP flows no addresses.
    #[serde(default)]
    bytes: Counter,
    #[serde(default)]
    packets: Counter,
    #[serde(borrow, default)]
    src_addr: Cow<'a, str>,
    #[serde(borrow, default)]
    dst_addr: Cow<'a, str>,
    #[serde(default)]
    proto: Proto,
    #[serde(default)]
    src_port: u16,
    #[serde(default)]
    dst_port: u16,
    #[serde(default)]
    in_if: u32,
    #[serde(default)]
    out_if: u32,
}

/// A JSON integer that may be negative: negative counters are a reason of their own.
#[derive(Default, Clone, Copy)]
struct Counter(i128);

impl<'de> Deserialize<'de> for Counter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Counter;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Counter, E> {
                Ok(Counter(i128::from(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Counter, E> {
                Ok(Counter(i128::from(v)))
            }
        }
        d.deserialize_i64(V)
    }
}

fn counter(c: Counter, max: u64) -> Result<u64, RejectReason> {
    if c.0 < 0 {
        Err(RejectReason::NegativeCounter)
    } else if c.0 > i128::from(max) {
        Err(RejectReason::AbsurdCounter)
    } else {
        Ok(c.0 as u64)
    }
}

/// Decodes one goflow2 JSON record.
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
    let f: Goflow2Flow = serde_json::from_str(text).map_err(|e| RejectReason::of_json_error(&e))?;
    flow_record(f, limits)
}

/// goflow2's keys in the order it prints them (the simulator prints this order too; a record in
/// another order still decodes, a little slower), with the slot of each one siteflow reads (the
/// bit [`scan_flow`] marks it with); the others are stepped over unread.
const KEYS: &flat_json::Keys = &[
    ("type", None),
    ("time_received_ns", Some(0)),
    ("sequence_num", None),
    ("sampling_rate", Some(2)),
    ("sampler_address", Some(3)),
    ("time_flow_start_ns", Some(13)),
    ("time_flow_end_ns", Some(1)),
    ("bytes", Some(4)),
    ("packets", Some(5)),
    ("src_addr", Some(6)),
    ("dst_addr", Some(7)),
    ("etype", None),
    ("proto", Some(8)),
    ("src_port", Some(9)),
    ("dst_port", Some(10)),
    ("in_if", Some(11)),
    ("out_if", Some(12)),
    ("src_mac", None),
    ("dst_mac", None),
    ("src_vlan", None),
    ("dst_vlan", None),
    ("vlan_id", None),
    ("ip_tos", None),
    ("forwarding_status", None),
    ("ip_ttl", None),
    ("ip_flags", None),
    ("tcp_flags", None),
    ("icmp_type", None),
    ("icmp_code", None),
    ("ipv6_flow_label", None),
    ("fragment_id", None),
    ("fragment_offset", None),
    ("src_as", None),
    ("dst_as", None),
    ("next_hop", None),
    ("next_hop_as", None),
    ("src_net", None),
    ("dst_net", None),
    ("bgp_next_hop", None),
    ("bgp_communities", None),
    ("as_path", None),
];

/// The fields of a flat record, or `None` where serde_json must judge: a field of the wrong type,
/// a field twice, a required field missing, or anything [`flat_json::scan_keyed`] does not take.
fn scan_flow(text: &str) -> Option<Goflow2Flow<'_>> {
    const REQUIRED: u32 = 1 << 3;
    let mut f = Goflow2Flow::default();
    let mut seen = 0u32;
    flat_json::scan_keyed(text, KEYS, |slot, value| {
        if seen & (1 << slot) != 0 {
            return None;
        }
        seen |= 1 << slot;
        match (slot, value) {
            (0, Scalar::Int(v)) => f.time_received_ns = Counter(v),
            (1, Scalar::Int(v)) => f.time_flow_end_ns = Counter(v),
            (2, Scalar::Int(v)) => f.sampling_rate = Counter(v),
            (3, Scalar::Str(s)) => f.sampler_address = Cow::Borrowed(s),
            (4, Scalar::Int(v)) => f.bytes = Counter(v),
            (5, Scalar::Int(v)) => f.packets = Counter(v),
            (6, Scalar::Str(s)) => f.src_addr = Cow::Borrowed(s),
            (7, Scalar::Str(s)) => f.dst_addr = Cow::Borrowed(s),
            (8, Scalar::Str(s)) => f.proto = Proto(protocol_number(s)),
            (8, Scalar::Int(v)) => f.proto = Proto(u8::try_from(v).ok()?),
            (9, Scalar::Int(v)) => f.src_port = u16::try_from(v).ok()?,
            (10, Scalar::Int(v)) => f.dst_port = u16::try_from(v).ok()?,
            (11, Scalar::Int(v)) => f.in_if = u32::try_from(v).ok()?,
            (12, Scalar::Int(v)) => f.out_if = u32::try_from(v).ok()?,
            (13, Scalar::Int(v)) => f.time_flow_start_ns = Counter(v),
            _ => return None,
        }
        Some(())
    })?;
    (seen & REQUIRED == REQUIRED).then_some(f)
}

/// A time field: beyond `i64` it cannot be a time (negative ones are rejected if used).
fn time(c: Counter) -> Result<i64, RejectReason> {
    i64::try_from(c.0).map_err(|_| RejectReason::BadTimestamp)
}

fn flow_record(f: Goflow2Flow<'_>, limits: &DecodeLimits) -> Result<FlowRecord, RejectReason> {
    let times = FlowTimes {
        start_ns: time(f.time_flow_start_ns)?,
        end_ns: time(f.time_flow_end_ns)?,
        arrival_ns: time(f.time_received_ns)?,
        stamp_ns: 0,
    };
    let sampling_rate = counter(f.sampling_rate, u64::from(u32::MAX))? as u32;
    Ok(FlowRecord {
        times,
        exporter: parse_addr(&f.sampler_address)?,
        src_addr: parse_flow_addr(&f.src_addr)?,
        dst_addr: parse_flow_addr(&f.dst_addr)?,
        src_port: f.src_port,
        dst_port: f.dst_port,
        proto: f.proto.0,
        in_if: f.in_if,
        out_if: f.out_if,
        bytes: counter(f.bytes, limits.max_bytes_per_record)?,
        packets: counter(f.packets, limits.max_bytes_per_record)?,
        flows: 1,
        sampling_rate,
        ..FlowRecord::default()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::inventory::addr_from_ip;

    pub(crate) fn limits() -> DecodeLimits {
        DecodeLimits {
            max_message_bytes: 1 << 20,
            max_bytes_per_record: 1 << 40,
            min_time_ns: DecodeLimits::MIN_TIME_NS,
            max_time_ns: 4_102_444_800_000_000_000,
        }
    }

    const GOOD: &str = r#"{"type":"NETFLOW_V9","time_received_ns":1764000000500000000,"sequence_num":7,"sampling_rate":100,"sampler_address":"172.16.2.21","time_flow_start_ns":1764000000000000000,"time_flow_end_ns":1764000000400000000,"bytes":1500,"packets":3,"src_addr":"10.2.21.5","dst_addr":"203.0.113.9","etype":"IPv4","proto":"TCP","src_port":51000,"dst_port":443,"in_if":1,"out_if":2,"src_as":0,"dst_as":0}"#;

    #[test]
    fn decodes_a_goflow2_record() {
        let r = decode_record(GOOD.as_bytes(), &limits()).unwrap();
        let times = FlowTimes {
            start_ns: 1_764_000_000_000_000_000,
            end_ns: 1_764_000_000_400_000_000,
            arrival_ns: 1_764_000_000_500_000_000,
            stamp_ns: 0,
        };
        assert_eq!(r.times, times);
        assert_eq!(r.exporter, addr_from_ip("172.16.2.21".parse().unwrap()));
        assert_eq!((r.bytes, r.packets, r.sampling_rate, r.proto, r.dst_port), (1500, 3, 100, 6, 443));
    }

    #[test]
    fn each_kind_of_bad_record_has_its_reason() {
        let l = limits();
        let bad = |s: &str| decode_record(s.as_bytes(), &l).unwrap_err();
        assert_eq!(bad("{\"bytes\": 1"), RejectReason::NotJson);
        assert_eq!(bad("hello"), RejectReason::NotJson);
        assert_eq!(bad(&GOOD.replace("\"bytes\":1500", "\"bytes\":\"x\"")), RejectReason::WrongSchema);
        assert_eq!(bad(&GOOD.replace("\"sampler_address\":\"172.16.2.21\",", "")), RejectReason::WrongSchema);
        assert_eq!(bad(&GOOD.replace("10.2.21.5", "10.2.21.500")), RejectReason::BadAddress);
        assert_eq!(bad(&GOOD.replace("\"bytes\":1500", "\"bytes\":-1500")), RejectReason::NegativeCounter);
        assert_eq!(bad(&GOOD.replace("\"bytes\":1500", "\"bytes\":99999999999999999")), RejectReason::AbsurdCounter);
        assert_eq!(bad(&GOOD.replace("1764000000400000000", "18446744073709551615")), RejectReason::BadTimestamp);
        // Without any time the record cannot be placed (when it is pushed).
        let no_time = GOOD.replace("1764000000400000000", "0").replace("1764000000500000000", "0").replace("1764000000000000000", "0");
        let r = decode_record(no_time.as_bytes(), &l).unwrap();
        assert_eq!(r.placed(crate::types::EventTime::FlowEnd, &l), Err(RejectReason::BadTimestamp));
    }

    #[test]
    fn non_ip_and_counterless_records_decode() {
        let l = limits();
        for empty in ["\"\"", "\"<nil>\""] {
            let s = GOOD.replace("\"10.2.21.5\"", empty).replace("\"203.0.113.9\"", empty);
            let r = decode_record(s.as_bytes(), &l).unwrap();
            assert_eq!((r.src_addr, r.dst_addr, r.bytes), (super::super::NO_ADDR, super::super::NO_ADDR, 1500));
        }
        let s = GOOD.replace("\"src_addr\":\"10.2.21.5\",", "").replace("\"dst_addr\":\"203.0.113.9\",", "");
        assert_eq!(decode_record(s.as_bytes(), &l).unwrap().src_addr, super::super::NO_ADDR);
        let s = GOOD.replace("\"bytes\":1500,", "").replace("\"packets\":3,", "");
        assert_eq!(decode_record(s.as_bytes(), &l).map(|r| (r.bytes, r.packets)), Ok((0, 0)));
        assert!(scan_flow(&s).is_some(), "the fast path takes them");
    }

    /// The fast path and serde_json give the same answer on every record: the simulator's, and
    /// mutations of it at the level of fields (missing, twice, another type or value) and bytes.
    #[test]
    fn the_fast_path_agrees_with_serde_json() {
        const VALUES: [&str; 28] = [
            "0",
            "-0",
            "1",
            "-1",
            "255",
            "256",
            "65536",
            "4294967296",
            "1.5",
            "1e3",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "null",
            "true",
            "\"TCP\"",
            "\"17\"",
            "\"10.2.21.5\"",
            "\"::ffff:10.2.21.5\"",
            "\"a\\u0041\"",
            "[1]",
            "[]",
            "[ \"65000:1\" , \"65000:2\" ]",
            "[[1]]",
            "[1,]",
            "[1.5]",
            "{}",
        ];
        let extra: Vec<(String, String)> =
            // Keys goflow2 prints that GOOD lacks, and one nobody prints.
            [("as_path", "[65001,65002]"), ("bgp_communities", "[]"), ("a_future_field", "\"x\"")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into();
        let fast = |rec: &[u8]| decode_record(rec, &limits());
        crate::decode::check_fast_path_agrees(&crate::decode::members_of(GOOD), &extra, &VALUES, fast, |text| {
            decode_with_serde(text, &limits())
        });
    }

    #[test]
    fn the_fast_path_takes_the_usual_record() {
        assert!(scan_flow(GOOD).is_some());
        // goflow2 also prints arrays (AS path, communities), and fields in another order.
        let with_arrays = GOOD.replace("\"src_as\":0", "\"bgp_communities\":[],\"as_path\":[65001, 65002],\"src_as\":0");
        let reordered =
            GOOD.replace("\"bytes\":1500,\"packets\":3,", "").replace("\"in_if\":1", "\"packets\":3,\"in_if\":1,\"bytes\":1500");
        for s in [with_arrays, reordered] {
            let f = scan_flow(&s).unwrap_or_else(|| panic!("{s}"));
            assert_eq!((f.bytes.0, f.packets.0, f.src_port, f.in_if), (1500, 3, 51000, 1));
        }
        assert!(scan_flow(&GOOD.replace("\"bytes\":1500", "\"bytes\":1.5e3")).is_none());
    }

    #[test]
    fn numeric_protocol_and_receive_time_fallback() {
        let s =
            GOOD.replace("\"proto\":\"TCP\"", "\"proto\":47").replace("\"time_flow_end_ns\":1764000000400000000", "\"time_flow_end_ns\":0");
        let (r, fell_back) = decode_record(s.as_bytes(), &limits()).unwrap().placed(Default::default(), &limits()).unwrap();
        assert_eq!(r.proto, 47);
        assert_eq!((r.event_time_ns, fell_back), (1_764_000_000_500_000_000, true));
    }
}
