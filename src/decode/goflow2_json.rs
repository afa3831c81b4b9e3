//! goflow2 JSON (`goflow2 -format=json`), one flow per record. Schema: `schemas/goflow2-flow.schema.json`.
//!
//! Deserialised into a struct that borrows its strings from the message, so a record costs no
//! allocation; fields siteflow does not use are skipped by the parser.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::{DecodeLimits, FlowRecord, Proto, RejectReason, parse_addr};

#[derive(Deserialize)]
struct Goflow2Flow<'a> {
    #[serde(default)]
    time_received_ns: Counter,
    #[serde(default)]
    time_flow_end_ns: Counter,
    #[serde(default)]
    sampling_rate: Counter,
    #[serde(borrow)]
    sampler_address: Cow<'a, str>,
    bytes: Counter,
    packets: Counter,
    #[serde(borrow)]
    src_addr: Cow<'a, str>,
    #[serde(borrow)]
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
    let f: Goflow2Flow = serde_json::from_slice(rec).map_err(|e| RejectReason::of_json_error(&e))?;
    // Event time: when the flow ended at the router; the collector's receive time if absent.
    let end = if f.time_flow_end_ns.0 != 0 { f.time_flow_end_ns } else { f.time_received_ns };
    let event_time_ns = i64::try_from(end.0).map_err(|_| RejectReason::BadTimestamp)?;
    let sampling_rate = counter(f.sampling_rate, u64::from(u32::MAX))? as u32;
    Ok(FlowRecord {
        event_time_ns: limits.check_time(event_time_ns)?,
        exporter: parse_addr(&f.sampler_address)?,
        src_addr: parse_addr(&f.src_addr)?,
        dst_addr: parse_addr(&f.dst_addr)?,
        src_port: f.src_port,
        dst_port: f.dst_port,
        proto: f.proto.0,
        in_if: f.in_if,
        out_if: f.out_if,
        bytes: counter(f.bytes, limits.max_bytes_per_record)?,
        packets: counter(f.packets, limits.max_bytes_per_record)?,
        flows: 1,
        sampling_rate,
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
        assert_eq!(r.event_time_ns, 1_764_000_000_400_000_000);
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
        assert_eq!(bad(&GOOD.replace("\"src_addr\":\"10.2.21.5\",", "")), RejectReason::WrongSchema);
        assert_eq!(bad(&GOOD.replace("10.2.21.5", "10.2.21.500")), RejectReason::BadAddress);
        assert_eq!(bad(&GOOD.replace("\"bytes\":1500", "\"bytes\":-1500")), RejectReason::NegativeCounter);
        assert_eq!(bad(&GOOD.replace("\"bytes\":1500", "\"bytes\":99999999999999999")), RejectReason::AbsurdCounter);
        let no_time = GOOD.replace("1764000000400000000", "0").replace("1764000000500000000", "0");
        assert_eq!(bad(&no_time), RejectReason::BadTimestamp);
    }

    #[test]
    fn numeric_protocol_and_receive_time_fallback() {
        let s =
            GOOD.replace("\"proto\":\"TCP\"", "\"proto\":47").replace("\"time_flow_end_ns\":1764000000400000000", "\"time_flow_end_ns\":0");
        let r = decode_record(s.as_bytes(), &limits()).unwrap();
        assert_eq!(r.proto, 47);
        assert_eq!(r.event_time_ns, 1_764_000_000_500_000_000);
    }
}
