//! Decoders: message bytes → Arrow record batches. Nothing after this stage sees a wire format.
//!
//! Each decoder appends to a columnar builder ([`FlowColumns`] or [`ProbeColumns`]) and reports
//! every record it could not use with a [`RejectReason`]; a bad record never fails the batch.
//! Every JSON format also accepts newline-delimited batches: one message, many records.

pub mod detect;
mod flat_json;
pub mod fuzz;
pub mod goflow2_json;
pub mod goflow2_pb;
pub mod pmacct_json;
pub mod pmacct_sflow_counters;
pub mod probe_json;
pub mod telegraf_json;

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, FixedSizeBinaryArray, PrimitiveArray, RecordBatch, StringArray};
use datafusion::arrow::buffer::Buffer;
use datafusion::arrow::datatypes::{
    ArrowPrimitiveType, Float64Type, Int64Type, TimestampNanosecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use serde::Deserialize;

use crate::inventory::Addr;
use crate::schema::{counter_schema, flow_schema, probe_schema};
use crate::types::{EventTime, Format, Messages};

/// A protocol field: a name in any case ("TCP", "udp", "ipv6-icmp") or a number.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Proto(pub u8);

impl<'de> Deserialize<'de> for Proto {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Proto;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a protocol name or number")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Proto, E> {
                u8::try_from(v).map(Proto).map_err(|_| E::custom("protocol number above 255"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Proto, E> {
                Ok(Proto(protocol_number(v)))
            }
        }
        d.deserialize_any(V)
    }
}

/// IANA numbers of common protocol names (any case, as goflow2 and pmacct print them);
/// a number in text is taken as is; unknown names map to 0.
pub fn protocol_number(name: &str) -> u8 {
    const NAMES: [(&str, u8); 12] = [
        ("tcp", 6),
        ("udp", 17),
        ("icmp", 1),
        ("igmp", 2),
        ("gre", 47),
        ("esp", 50),
        ("ah", 51),
        ("icmpv6", 58),
        ("ipv6-icmp", 58),
        ("ospf", 89),
        ("pim", 103),
        ("sctp", 132),
    ];
    // Compared in place: a lowercase copy per record was an allocation per record.
    match NAMES.iter().find(|(known, _)| known.eq_ignore_ascii_case(name)) {
        Some(&(_, number)) => number,
        None => name.parse().unwrap_or(0),
    }
}

/// Parses an IPv4 or IPv6 address into its 128-bit form.
pub(crate) fn parse_addr(s: &str) -> Result<Addr, RejectReason> {
    if let Some(v4) = dotted_quad(s.as_bytes()) {
        return Ok(crate::inventory::addr_from_ip(v4.into()));
    }
    s.parse::<std::net::IpAddr>().map(crate::inventory::addr_from_ip).map_err(|_| RejectReason::BadAddress)
}

/// The usual IPv4 address, `a.b.c.d` with octets from 0 to 255 and no leading zeros; `None` for
/// anything else, which `std`'s parser then judges. Why: most records carry three IPv4
/// addresses, and `std`'s general parser (which tries IPv6 too) stood out in decode profiles.
fn dotted_quad(b: &[u8]) -> Option<std::net::Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut i = 0;
    for (n, octet) in octets.iter_mut().enumerate() {
        if n > 0 {
            if b.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
        let start = i;
        let mut value = 0u32;
        while let Some(&d @ b'0'..=b'9') = b.get(i) {
            if i - start == 3 {
                return None;
            }
            value = value * 10 + u32::from(d - b'0');
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || (digits > 1 && b[start] == b'0') || value > 255 {
            return None;
        }
        *octet = value as u8;
    }
    (i == b.len()).then_some(std::net::Ipv4Addr::from(octets))
}

/// An address field that may be empty: collectors print non-IP flows (EoMPLS, ARP) with `""`
/// (pmacct) or `"<nil>"` (goflow2) as addresses. Empty is [`NO_ADDR`].
pub(crate) fn parse_flow_addr(s: &str) -> Result<Addr, RejectReason> {
    if s.is_empty() || s == "<nil>" { Ok(NO_ADDR) } else { parse_addr(s) }
}

/// The address of a flow without one (a non-IP flow): `::`, never a real endpoint.
pub const NO_ADDR: Addr = 0;

/// Why a record was not used. Each becomes a `reason` label of `siteflow_records_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// Not valid JSON (or not UTF-8).
    NotJson,
    /// Not a valid protobuf message (or a broken length prefix).
    NotProtobuf,
    /// Valid JSON, but a field is missing or has the wrong type.
    WrongSchema,
    /// No usable timestamp, or one before 2000 or too far in the future.
    BadTimestamp,
    /// An address that does not parse.
    BadAddress,
    /// A negative counter.
    NegativeCounter,
    /// A counter too large to be real (see `decode.max_bytes_per_record`).
    AbsurdCounter,
    /// A probe value out of range (negative RTT, loss above 100 %).
    AbsurdValue,
    /// A message larger than `decode.max_message_bytes`.
    Oversize,
    /// A well-formed record of a kind siteflow does not use (e.g. a Telegraf `cpu` metric).
    UnsupportedMeasurement,
}

impl RejectReason {
    pub const ALL: [RejectReason; 10] = [
        RejectReason::NotJson,
        RejectReason::NotProtobuf,
        RejectReason::WrongSchema,
        RejectReason::BadTimestamp,
        RejectReason::BadAddress,
        RejectReason::NegativeCounter,
        RejectReason::AbsurdCounter,
        RejectReason::AbsurdValue,
        RejectReason::Oversize,
        RejectReason::UnsupportedMeasurement,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NotJson => "not_json",
            RejectReason::NotProtobuf => "not_protobuf",
            RejectReason::WrongSchema => "wrong_schema",
            RejectReason::BadTimestamp => "bad_timestamp",
            RejectReason::BadAddress => "bad_address",
            RejectReason::NegativeCounter => "negative_counter",
            RejectReason::AbsurdCounter => "absurd_counter",
            RejectReason::AbsurdValue => "absurd_value",
            RejectReason::Oversize => "oversize",
            RejectReason::UnsupportedMeasurement => "unsupported_measurement",
        }
    }

    /// Classifies a serde_json error: syntax errors are not JSON, data errors are the wrong schema.
    pub fn of_json_error(e: &serde_json::Error) -> Self {
        match e.classify() {
            serde_json::error::Category::Data => RejectReason::WrongSchema,
            _ => RejectReason::NotJson,
        }
    }
}

/// Limits that separate real records from garbage.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_message_bytes: usize,
    /// Largest believable byte count of one record before sampling correction.
    pub max_bytes_per_record: u64,
    /// Event times before this are rejected (nanoseconds since the epoch).
    pub min_time_ns: i64,
    /// Event times after this are rejected (nanoseconds since the epoch).
    pub max_time_ns: i64,
}

impl DecodeLimits {
    /// 2000-01-01T00:00:00Z: nothing older is a live record.
    pub const MIN_TIME_NS: i64 = 946_684_800_000_000_000;

    pub fn check_time(&self, t: i64) -> Result<i64, RejectReason> {
        if t < self.min_time_ns || t > self.max_time_ns { Err(RejectReason::BadTimestamp) } else { Ok(t) }
    }
}

/// Per-batch decode outcome: how many records were decoded and why others were rejected.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DecodeStats {
    pub records: u64,
    pub decoded: u64,
    pub rejected: Vec<(RejectReason, u64)>,
    /// Flow records that carried no sampling rate (0); they are scaled by the configured default.
    pub missing_sampling_rate: u64,
    /// Where each rejected record is, for the dead-letter topic.
    pub bad: Vec<BadRecord>,
    /// Records without traffic (no bytes and no packets: NAT/firewall events, options records):
    /// counted, neither decoded into rows nor rejected.
    pub no_traffic: u64,
    /// Flow records without the time their source's `event_time` asks for, placed by another
    /// of their times (see [`FlowTimes::resolve`]).
    pub event_time_fallback: u64,
    /// The record being decoded: message index and byte range within the message.
    at: (usize, std::ops::Range<usize>),
}

/// A rejected record: its message in the batch, its bytes within that message, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    pub message: usize,
    pub range: std::ops::Range<usize>,
    pub reason: RejectReason,
}

impl DecodeStats {
    /// Marks the record being decoded (message `index`, bytes `range` of it).
    pub fn at(&mut self, message: usize, range: std::ops::Range<usize>) {
        self.at = (message, range);
    }

    pub fn reject(&mut self, reason: RejectReason) {
        self.records += 1;
        self.bad.push(BadRecord { message: self.at.0, range: self.at.1.clone(), reason });
        match self.rejected.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.rejected.push((reason, 1)),
        }
    }

    pub fn accept(&mut self) {
        self.records += 1;
        self.decoded += 1;
    }

    /// Counts a record that carries no traffic (see [`DecodeStats::no_traffic`]).
    pub fn skip_no_traffic(&mut self) {
        self.records += 1;
        self.no_traffic += 1;
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|(_, n)| n).sum()
    }

    /// Adds the counts of the records after this one's (a later part of the same batch).
    fn absorb(&mut self, later: DecodeStats) {
        self.records += later.records;
        self.decoded += later.decoded;
        for (reason, n) in later.rejected {
            match self.rejected.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, m)) => *m += n,
                None => self.rejected.push((reason, n)),
            }
        }
        self.missing_sampling_rate += later.missing_sampling_rate;
        self.bad.extend(later.bad);
        self.no_traffic += later.no_traffic;
        self.event_time_fallback += later.event_time_fallback;
        self.at = later.at;
    }
}

/// Calls `f` on each record of each message: messages may carry newline-separated records.
/// Oversize messages are rejected whole, blank lines skipped.
pub fn for_each_record(msgs: &Messages, limits: &DecodeLimits, stats: &mut DecodeStats, f: impl FnMut(&[u8], &mut DecodeStats)) {
    for_each_record_in(msgs, 0..msgs.len(), limits, stats, f)
}

/// [`for_each_record`] over messages `range` of the batch (indices stay the batch's).
fn for_each_record_in(
    msgs: &Messages,
    range: std::ops::Range<usize>,
    limits: &DecodeLimits,
    stats: &mut DecodeStats,
    mut f: impl FnMut(&[u8], &mut DecodeStats),
) {
    for (i, msg) in range.clone().zip(msgs.iter_range(range)) {
        stats.at(i, 0..msg.len());
        if msg.len() > limits.max_message_bytes {
            stats.reject(RejectReason::Oversize);
            continue;
        }
        let mut start = 0;
        while start <= msg.len() {
            let end = memchr::memchr(b'\n', &msg[start..]).map_or(msg.len(), |n| start + n);
            let line = &msg[start..end];
            if !line.iter().all(u8::is_ascii_whitespace) {
                stats.at(i, start..end);
                f(line, stats);
            }
            start = end + 1;
        }
    }
}

/// The times a flow record carries, in nanoseconds since the epoch; 0 where absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowTimes {
    /// The flow's first packet (goflow2 `time_flow_start_ns`, pmacct `timestamp_start`).
    pub start_ns: i64,
    /// Its last packet (`time_flow_end_ns`, `timestamp_end`).
    pub end_ns: i64,
    /// When the collector received the export (`time_received_ns`, `timestamp_arrival`).
    pub arrival_ns: i64,
    /// pmacct's `stamp_updated`, else `stamp_inserted`: the last resort.
    pub stamp_ns: i64,
}

/// A flow's place in event time under one [`EventTime`] mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub event_time_ns: i64,
    /// The flow's start if it has a believable one, else its event time.
    pub flow_start_ns: i64,
    /// Whether a time the mode asks for was absent (or, for the start, unbelievable).
    pub fell_back: bool,
}

impl FlowTimes {
    /// The event time `mode` asks for; when the record lacks it, the first present of end,
    /// arrival, start, stamp (counted as a fallback). `spread` places the flow by its end and
    /// spreads it back to its start; without a believable start it is not spread. Rejects a
    /// record whose chosen time is outside `limits`.
    pub fn resolve(&self, mode: EventTime, limits: &DecodeLimits) -> Result<Resolved, RejectReason> {
        let (wanted, fallbacks) = match mode {
            EventTime::FlowEnd | EventTime::Spread => (self.end_ns, [self.arrival_ns, self.start_ns, self.stamp_ns]),
            EventTime::FlowStart => (self.start_ns, [self.end_ns, self.arrival_ns, self.stamp_ns]),
            EventTime::Arrival => (self.arrival_ns, [self.end_ns, self.start_ns, self.stamp_ns]),
        };
        let mut fell_back = wanted == 0;
        let event = if fell_back { fallbacks.into_iter().find(|&t| t != 0).ok_or(RejectReason::BadTimestamp)? } else { wanted };
        let event_time_ns = limits.check_time(event)?;
        let start_ok = self.start_ns != 0 && limits.check_time(self.start_ns).is_ok();
        fell_back |= mode == EventTime::Spread && !start_ok;
        Ok(Resolved { event_time_ns, flow_start_ns: if start_ok { self.start_ns } else { event_time_ns }, fell_back })
    }
}

/// One decoded flow record (decoders fill [`FlowRecord::times`]; [`FlowRecord::placed`] sets
/// the event time from them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowRecord {
    /// Set from [`FlowRecord::times`] by the source's [`EventTime`] when the record is pushed.
    pub event_time_ns: i64,
    /// The flow's start (its event time when it has none), set with `event_time_ns`.
    pub flow_start_ns: i64,
    /// The times as exported.
    pub times: FlowTimes,
    pub exporter: Addr,
    pub src_addr: Addr,
    pub dst_addr: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub in_if: u32,
    pub out_if: u32,
    pub bytes: u64,
    pub packets: u64,
    pub flows: u64,
    /// 0 when the exporter sent none.
    pub sampling_rate: u32,
}

impl FlowRecord {
    /// The record with its event time and start set as `mode` asks, and whether it fell back
    /// (see [`FlowTimes::resolve`]).
    pub fn placed(mut self, mode: EventTime, limits: &DecodeLimits) -> Result<(Self, bool), RejectReason> {
        let t = self.times.resolve(mode, limits)?;
        self.event_time_ns = t.event_time_ns;
        self.flow_start_ns = t.flow_start_ns;
        Ok((self, t.fell_back))
    }
}

/// Column builders for [`flow_schema`].
#[derive(Debug, Default)]
pub struct FlowColumns {
    event_time: Vec<i64>,
    exporter: Vec<u8>,
    src_addr: Vec<u8>,
    dst_addr: Vec<u8>,
    src_port: Vec<u16>,
    dst_port: Vec<u16>,
    proto: Vec<u8>,
    in_if: Vec<u32>,
    out_if: Vec<u32>,
    bytes: Vec<u64>,
    packets: Vec<u64>,
    flows: Vec<u64>,
    sampling_rate: Vec<u32>,
    flow_start: Vec<i64>,
}

fn primitive<T: ArrowPrimitiveType>(v: Vec<T::Native>) -> ArrayRef {
    Arc::new(PrimitiveArray::<T>::new(v.into(), None))
}

fn addresses(v: Vec<u8>) -> ArrayRef {
    Arc::new(FixedSizeBinaryArray::try_new(16, Buffer::from_vec(v), None).expect("16 bytes per address"))
}

impl FlowColumns {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            event_time: Vec::with_capacity(n),
            exporter: Vec::with_capacity(n * 16),
            src_addr: Vec::with_capacity(n * 16),
            dst_addr: Vec::with_capacity(n * 16),
            src_port: Vec::with_capacity(n),
            dst_port: Vec::with_capacity(n),
            proto: Vec::with_capacity(n),
            in_if: Vec::with_capacity(n),
            out_if: Vec::with_capacity(n),
            bytes: Vec::with_capacity(n),
            packets: Vec::with_capacity(n),
            flows: Vec::with_capacity(n),
            sampling_rate: Vec::with_capacity(n),
            flow_start: Vec::with_capacity(n),
        }
    }

    pub fn len(&self) -> usize {
        self.event_time.len()
    }

    pub fn is_empty(&self) -> bool {
        self.event_time.is_empty()
    }

    pub fn push(&mut self, r: &FlowRecord) {
        self.event_time.push(r.event_time_ns);
        self.exporter.extend_from_slice(&r.exporter.to_be_bytes());
        self.src_addr.extend_from_slice(&r.src_addr.to_be_bytes());
        self.dst_addr.extend_from_slice(&r.dst_addr.to_be_bytes());
        self.src_port.push(r.src_port);
        self.dst_port.push(r.dst_port);
        self.proto.push(r.proto);
        self.in_if.push(r.in_if);
        self.out_if.push(r.out_if);
        self.bytes.push(r.bytes);
        self.packets.push(r.packets);
        self.flows.push(r.flows);
        self.sampling_rate.push(r.sampling_rate);
        self.flow_start.push(r.flow_start_ns);
    }

    pub fn finish(self) -> RecordBatch {
        let columns = vec![
            primitive::<TimestampNanosecondType>(self.event_time),
            addresses(self.exporter),
            addresses(self.src_addr),
            addresses(self.dst_addr),
            primitive::<UInt16Type>(self.src_port),
            primitive::<UInt16Type>(self.dst_port),
            primitive::<UInt8Type>(self.proto),
            primitive::<UInt32Type>(self.in_if),
            primitive::<UInt32Type>(self.out_if),
            primitive::<UInt64Type>(self.bytes),
            primitive::<UInt64Type>(self.packets),
            primitive::<UInt64Type>(self.flows),
            primitive::<UInt32Type>(self.sampling_rate),
            primitive::<TimestampNanosecondType>(self.flow_start),
        ];
        RecordBatch::try_new(flow_schema(), columns).expect("columns match flow_schema")
    }
}

/// Column builders for [`probe_schema`].
#[derive(Debug, Default)]
pub struct ProbeColumns {
    event_time: Vec<i64>,
    site_id: Vec<String>,
    target: Vec<String>,
    rtt: Vec<f64>,
    jitter: Vec<f64>,
    loss: Vec<f64>,
    sent: Vec<i64>,
}

/// One decoded probe result.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeRecord<'a> {
    pub event_time_ns: i64,
    pub site_id: &'a str,
    pub target: &'a str,
    pub rtt_seconds: f64,
    pub jitter_seconds: f64,
    pub loss_ratio: f64,
    pub sent: i64,
}

impl ProbeColumns {
    pub fn len(&self) -> usize {
        self.event_time.len()
    }

    pub fn is_empty(&self) -> bool {
        self.event_time.is_empty()
    }

    pub fn push(&mut self, r: &ProbeRecord<'_>) {
        self.event_time.push(r.event_time_ns);
        self.site_id.push(r.site_id.to_string());
        self.target.push(r.target.to_string());
        self.rtt.push(r.rtt_seconds);
        self.jitter.push(r.jitter_seconds);
        self.loss.push(r.loss_ratio);
        self.sent.push(r.sent);
    }

    pub fn finish(self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            primitive::<TimestampNanosecondType>(self.event_time),
            Arc::new(StringArray::from(self.site_id)),
            Arc::new(StringArray::from(self.target)),
            primitive::<Float64Type>(self.rtt),
            primitive::<Float64Type>(self.jitter),
            primitive::<Float64Type>(self.loss),
            primitive::<Int64Type>(self.sent),
        ];
        RecordBatch::try_new(probe_schema(), columns).expect("columns match probe_schema")
    }
}

/// One decoded interface counter sample.
#[derive(Debug, Clone, PartialEq)]
pub struct CounterRecord<'a> {
    pub event_time_ns: i64,
    pub site_id: &'a str,
    /// The device that reported it (Telegraf's `agent_host` or `host` tag).
    pub device: &'a str,
    pub interface: &'a str,
    /// Octets received on the interface (RFC 2863 `ifInOctets`).
    pub in_octets: Option<u64>,
    /// Octets sent from the interface (`ifOutOctets`).
    pub out_octets: Option<u64>,
    pub counter_bits: u8,
    /// The interface's operational state (RFC 2863 `ifOperStatus`): up, down (also
    /// `lowerLayerDown`, `notPresent`), or unknown.
    pub link_up: Option<bool>,
    /// The interface's speed (`ifHighSpeed` × 10^6, else `ifSpeed`), bits per second.
    pub speed_bps: Option<u64>,
}

/// Column builders for [`counter_schema`].
#[derive(Debug, Default)]
pub struct CounterColumns {
    event_time: Vec<i64>,
    site_id: Vec<String>,
    device: Vec<String>,
    interface: Vec<String>,
    in_octets: Vec<Option<u64>>,
    out_octets: Vec<Option<u64>>,
    counter_bits: Vec<u8>,
    link_up: Vec<Option<bool>>,
    speed_bps: Vec<Option<u64>>,
}

impl CounterColumns {
    pub fn len(&self) -> usize {
        self.event_time.len()
    }

    pub fn is_empty(&self) -> bool {
        self.event_time.is_empty()
    }

    pub fn push(&mut self, r: &CounterRecord<'_>) {
        self.event_time.push(r.event_time_ns);
        self.site_id.push(r.site_id.to_string());
        self.device.push(r.device.to_string());
        self.interface.push(r.interface.to_string());
        self.in_octets.push(r.in_octets);
        self.out_octets.push(r.out_octets);
        self.counter_bits.push(r.counter_bits);
        self.link_up.push(r.link_up);
        self.speed_bps.push(r.speed_bps);
    }

    pub fn finish(self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            primitive::<TimestampNanosecondType>(self.event_time),
            Arc::new(StringArray::from(self.site_id)),
            Arc::new(StringArray::from(self.device)),
            Arc::new(StringArray::from(self.interface)),
            Arc::new(PrimitiveArray::<UInt64Type>::from(self.in_octets)),
            Arc::new(PrimitiveArray::<UInt64Type>::from(self.out_octets)),
            primitive::<UInt8Type>(self.counter_bits),
            Arc::new(datafusion::arrow::array::BooleanArray::from(self.link_up)),
            Arc::new(PrimitiveArray::<UInt64Type>::from(self.speed_bps)),
        ];
        RecordBatch::try_new(counter_schema(), columns).expect("columns match counter_schema")
    }
}

/// A decoded batch: flows, probe results, or (Telegraf) probe results and interface counters.
#[derive(Debug, Clone)]
pub enum Decoded {
    Flows(RecordBatch),
    Probes(RecordBatch),
    /// `is_counter[k]`: whether the k-th decoded metric (in message order) is a counter
    /// sample or a probe result: the two batches' rows interleaved as they came.
    Telemetry {
        probes: RecordBatch,
        counters: RecordBatch,
        is_counter: Vec<bool>,
    },
}

impl Decoded {
    /// Output rows: one per decoded record.
    pub fn num_rows(&self) -> usize {
        match self {
            Decoded::Flows(b) | Decoded::Probes(b) => b.num_rows(),
            Decoded::Telemetry { probes, counters, .. } => probes.num_rows() + counters.num_rows(),
        }
    }
}

/// How flows are decoded: the limits, and which time is the event time.
#[derive(Clone, Copy)]
struct FlowDecoding<'a> {
    limits: &'a DecodeLimits,
    event_time: EventTime,
}

/// Appends one decoded flow with its event time (or counts its rejection). A record without
/// bytes and packets is no traffic: counted apart, before its times are looked at (NAT events
/// carry none that matter).
fn push_flow(cols: &mut FlowColumns, stats: &mut DecodeStats, how: FlowDecoding, result: Result<FlowRecord, RejectReason>) {
    let r = match result {
        Ok(r) => r,
        Err(reason) => return stats.reject(reason),
    };
    if r.bytes == 0 && r.packets == 0 {
        return stats.skip_no_traffic();
    }
    let (r, fell_back) = match r.placed(how.event_time, how.limits) {
        Ok(placed) => placed,
        Err(reason) => return stats.reject(reason),
    };
    stats.event_time_fallback += u64::from(fell_back);
    if r.sampling_rate == 0 {
        stats.missing_sampling_rate += 1;
    }
    cols.push(&r);
    stats.accept();
}

/// Decodes newline-delimited JSON flow records with `decode_record` into flow columns.
fn decode_json_flows(
    msgs: &Messages,
    range: std::ops::Range<usize>,
    how: FlowDecoding,
    stats: &mut DecodeStats,
    decode_record: fn(&[u8], &DecodeLimits) -> Result<FlowRecord, RejectReason>,
) -> RecordBatch {
    let mut cols = FlowColumns::with_capacity(range.len());
    for_each_record_in(msgs, range, how.limits, stats, |rec, stats| push_flow(&mut cols, stats, how, decode_record(rec, how.limits)));
    cols.finish()
}

/// Decodes binary flow messages (no newline framing) with `decode_message`.
fn decode_binary_flows(
    msgs: &Messages,
    range: std::ops::Range<usize>,
    how: FlowDecoding,
    stats: &mut DecodeStats,
    decode_message: impl Fn(&[u8], &mut dyn FnMut(Result<FlowRecord, RejectReason>)),
) -> RecordBatch {
    let mut cols = FlowColumns::with_capacity(range.len());
    for (i, msg) in range.clone().zip(msgs.iter_range(range)) {
        stats.at(i, 0..msg.len());
        if msg.len() > how.limits.max_message_bytes {
            stats.reject(RejectReason::Oversize);
            continue;
        }
        decode_message(msg, &mut |r| push_flow(&mut cols, stats, how, r));
    }
    cols.finish()
}

/// Decodes messages `range` of a batch of flow messages.
fn decode_flows(format: Format, msgs: &Messages, range: std::ops::Range<usize>, how: FlowDecoding, stats: &mut DecodeStats) -> RecordBatch {
    let limits = how.limits;
    match format {
        Format::PmacctJson => decode_json_flows(msgs, range, how, stats, pmacct_json::decode_record),
        Format::Goflow2Protobuf => decode_binary_flows(msgs, range, how, stats, |m, emit| goflow2_pb::decode_delimited(m, limits, emit)),
        Format::Goflow2ProtobufPlain => decode_binary_flows(msgs, range, how, stats, |m, emit| emit(goflow2_pb::decode_plain(m, limits))),
        _ => decode_json_flows(msgs, range, how, stats, goflow2_json::decode_record),
    }
}

/// Fewer messages than this per thread are not worth a thread.
const MIN_MESSAGES_PER_THREAD: usize = 256;

/// As [`decode_with`], on up to `threads` threads: a batch of flow messages is cut into
/// consecutive runs of messages, decoded side by side and joined in order, so rows, counts and
/// the dead-letter positions are those of one thread. Telemetry keeps one thread (its rows are
/// matched to their messages' order afterwards).
pub fn decode_parallel(
    format: Format,
    event_time: EventTime,
    msgs: &Messages,
    limits: &DecodeLimits,
    threads: usize,
) -> (Decoded, DecodeStats) {
    let threads = threads.min(msgs.len() / MIN_MESSAGES_PER_THREAD).max(1);
    if threads == 1 || !format.is_flows() {
        return decode_with(format, event_time, msgs, limits);
    }
    let how = FlowDecoding { limits, event_time };
    let per = msgs.len().div_ceil(threads);
    let ranges: Vec<std::ops::Range<usize>> = (0..threads).map(|t| t * per..((t + 1) * per).min(msgs.len())).collect();
    // rayon's pool lives as long as the process: no thread is started per batch.
    use rayon::prelude::*;
    let parts: Vec<(RecordBatch, DecodeStats)> = ranges
        .into_par_iter()
        .map(|range| {
            let mut stats = DecodeStats::default();
            (decode_flows(format, msgs, range, how, &mut stats), stats)
        })
        .collect();
    let schema = parts[0].0.schema();
    let mut stats = DecodeStats::default();
    let mut batches = Vec::with_capacity(parts.len());
    for (batch, part) in parts {
        batches.push(batch);
        stats.absorb(part);
    }
    let rows = datafusion::arrow::compute::concat_batches(&schema, &batches).expect("parts share the flow schema");
    (Decoded::Flows(rows), stats)
}

/// Decodes a batch of messages of one format, flows placed by their end ([`EventTime::FlowEnd`]).
pub fn decode(format: Format, msgs: &Messages, limits: &DecodeLimits) -> (Decoded, DecodeStats) {
    decode_with(format, EventTime::FlowEnd, msgs, limits)
}

/// Decodes a batch of messages of one format; flows get the event time `event_time` asks for.
pub fn decode_with(format: Format, event_time: EventTime, msgs: &Messages, limits: &DecodeLimits) -> (Decoded, DecodeStats) {
    let mut stats = DecodeStats::default();
    let how = FlowDecoding { limits, event_time };
    let decoded = match format {
        Format::Goflow2Json | Format::PmacctJson | Format::Goflow2Protobuf | Format::Goflow2ProtobufPlain => {
            Decoded::Flows(decode_flows(format, msgs, 0..msgs.len(), how, &mut stats))
        }
        Format::SiteflowProbeJson => {
            let mut cols = ProbeColumns::default();
            for_each_record(msgs, limits, &mut stats, |rec, stats| match probe_json::decode_record(rec, limits, |r| cols.push(r)) {
                Ok(()) => stats.accept(),
                Err(reason) => stats.reject(reason),
            });
            Decoded::Probes(cols.finish())
        }
        Format::TelegrafJson => {
            let (mut probes, mut counters, mut order) = (ProbeColumns::default(), CounterColumns::default(), Vec::new());
            for_each_record(msgs, limits, &mut stats, |rec, stats| {
                let mut out = telegraf_json::Output { probes: &mut probes, counters: &mut counters, order: &mut order };
                for outcome in telegraf_json::decode_document(rec, limits, &mut out) {
                    match outcome {
                        Ok(()) => stats.accept(),
                        Err(reason) => stats.reject(reason),
                    }
                }
            });
            Decoded::Telemetry { probes: probes.finish(), counters: counters.finish(), is_counter: order }
        }
        Format::PmacctSflowCountersJson => {
            let mut counters = CounterColumns::default();
            let mut samples = 0;
            for_each_record(msgs, limits, &mut stats, |rec, stats| {
                match pmacct_sflow_counters::decode_record(rec, limits, &mut |r| {
                    counters.push(r);
                    samples += 1;
                }) {
                    Ok(()) => stats.accept(),
                    Err(reason) => stats.reject(reason),
                }
            });
            Decoded::Telemetry { probes: ProbeColumns::default().finish(), counters: counters.finish(), is_counter: vec![true; samples] }
        }
    };
    (decoded, stats)
}

/// Checks that a decoder's fast path gives the answer of its reference (serde_json) on every
/// record made from `base` (a good record's members, as `(key, JSON value)`): members dropped,
/// repeated, swapped, given one of `values`, one of `extra` inserted (keys the record may also
/// carry), and bytes damaged. Used by each JSON decoder's differential test.
#[cfg(test)]
pub(crate) fn check_fast_path_agrees(
    base: &[(String, String)],
    extra: &[(String, String)],
    values: &[&str],
    fast: impl Fn(&[u8]) -> Result<FlowRecord, RejectReason>,
    reference: impl Fn(&str) -> Result<FlowRecord, RejectReason>,
) {
    use proptest::prelude::*;
    const BYTES: &[u8] = b"\"\\{}[],:-+0129.eE \t\nx\x01\xc3\xa9";
    let pool: Vec<(String, String)> = base.iter().chain(extra).cloned().collect();
    // Ops: 0 drop a member, 1 insert one of the pool (a repeat or an extra), 2 swap two, else a new value.
    let field_op = (0..5u8, 0..pool.len(), 0..values.len());
    let byte_op = (0..3u8, 0..1000usize, 0..BYTES.len());
    let strategy = (proptest::collection::vec(field_op, 0..4), proptest::collection::vec(byte_op, 0..3));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 4000, ..Default::default() });
    runner
        .run(&strategy, |(field_ops, byte_ops)| {
            let mut members = base.to_vec();
            for (op, i, v) in field_ops {
                let picked = pool[i].clone();
                let i = i % members.len().max(1);
                match op {
                    0 if !members.is_empty() => drop(members.remove(i)),
                    1 => members.insert(i.min(members.len()), picked),
                    2 if !members.is_empty() => {
                        let j = v % members.len();
                        members.swap(i, j)
                    }
                    _ if !members.is_empty() => members[i].1 = values[v].to_string(),
                    _ => {}
                }
            }
            let body: Vec<String> = members.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            let mut rec = format!("{{{}}}", body.join(",")).into_bytes();
            for (op, at, b) in byte_ops {
                let at = at % (rec.len() + 1);
                match op {
                    0 if at < rec.len() => rec[at] = BYTES[b],
                    1 => rec.insert(at, BYTES[b]),
                    _ if at < rec.len() => drop(rec.remove(at)),
                    _ => {}
                }
            }
            let expected = std::str::from_utf8(&rec).map_or(Err(RejectReason::NotJson), &reference);
            prop_assert_eq!(fast(&rec), expected, "{}", String::from_utf8_lossy(&rec));
            Ok(())
        })
        .unwrap();
}

/// The members of a flat JSON object, as `(key, JSON value)` in order (for [`check_fast_path_agrees`]).
#[cfg(test)]
pub(crate) fn members_of(record: &str) -> Vec<(String, String)> {
    let mut keys = Vec::new();
    flat_json::scan(record, |k, _| {
        keys.push(k.to_string());
        Some(())
    })
    .expect("a flat JSON object");
    let values: serde_json::Map<String, serde_json::Value> = serde_json::from_str(record).expect("a JSON object");
    keys.into_iter().map(|k| (k.clone(), values[&k].to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::AsArray;
    use proptest::prelude::*;

    fn limits() -> DecodeLimits {
        DecodeLimits {
            max_message_bytes: 4096,
            max_bytes_per_record: 1 << 40,
            min_time_ns: DecodeLimits::MIN_TIME_NS,
            max_time_ns: i64::MAX,
        }
    }

    proptest! {
        /// The IPv4 fast path reads what `std` reads, and leaves to it what it does not take.
        #[test]
        fn addresses_parse_as_std_parses_them(s in "[0-9.:a-f]{0,16}", a: [u8; 4]) {
            let std_way = |s: &str| s.parse::<std::net::IpAddr>().map(crate::inventory::addr_from_ip).map_err(|_| RejectReason::BadAddress);
            prop_assert_eq!(parse_addr(&s), std_way(&s));
            let dotted = std::net::Ipv4Addr::from(a).to_string();
            prop_assert_eq!(dotted_quad(dotted.as_bytes()), Some(std::net::Ipv4Addr::from(a)));
            prop_assert_eq!(parse_addr(&dotted), std_way(&dotted));
        }
    }

    #[test]
    fn odd_ipv4_forms_are_left_to_std() {
        for s in ["01.2.3.4", "1.2.3", "1.2.3.4.5", "256.1.1.1", "1.2.3.4 ", "1..3.4", "1234.1.1.1", "", "::ffff:1.2.3.4"] {
            assert_eq!(dotted_quad(s.as_bytes()), None, "{s}");
        }
    }

    /// One flow with the given times (0: absent) in a flow format, as its collector prints it.
    fn flow_message(format: Format, start: i64, end: i64, arrival: i64) -> Vec<u8> {
        use prost::Message;
        let pmacct_stamp = |t: i64| if t == 0 { String::new() } else { format!("{}.{:06}", t / 1_000_000_000, t % 1_000_000_000 / 1000) };
        let m = goflow2_pb::FlowMessage {
            time_flow_start_ns: start as u64,
            time_flow_end_ns: end as u64,
            time_received_ns: arrival as u64,
            ..goflow2_pb::tests::sample()
        };
        match format {
            Format::Goflow2Json => format!(
                r#"{{"sampler_address":"172.16.2.21","time_flow_start_ns":{start},"time_flow_end_ns":{end},"time_received_ns":{arrival},"bytes":1,"packets":1,"src_addr":"10.2.21.5","dst_addr":"203.0.113.9"}}"#
            )
            .into_bytes(),
            Format::PmacctJson => format!(
                r#"{{"peer_ip_src":"172.16.2.21","ip_src":"10.2.21.5","ip_dst":"203.0.113.9","timestamp_start":"{}","timestamp_end":"{}","timestamp_arrival":"{}","packets":1,"bytes":1}}"#,
                pmacct_stamp(start),
                pmacct_stamp(end),
                pmacct_stamp(arrival)
            )
            .into_bytes(),
            Format::Goflow2Protobuf => m.encode_length_delimited_to_vec(),
            Format::Goflow2ProtobufPlain => m.encode_to_vec(),
            _ => unreachable!("a flow format"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
        /// Decoding on several threads gives the rows, counts and dead-letter positions of one
        /// thread, for every flow format, with bad and oversize messages anywhere in the batch.
        #[test]
        fn decoding_on_several_threads_equals_one_thread(
            kinds in proptest::collection::vec(0u8..10, 0..3000),
            threads in 1usize..5,
            format in prop_oneof![Just(Format::Goflow2Json), Just(Format::PmacctJson), Just(Format::Goflow2Protobuf)],
        ) {
            let mut msgs = Messages::with_capacity(kinds.len(), 0);
            for (i, kind) in kinds.iter().enumerate() {
                let t = 1_764_000_000_000_000_000 + i as i64 * 1_000_000;
                match kind {
                    0 => msgs.push(b"{not json"),
                    1 => msgs.push(&[b'x'; 5000]),
                    2 if format != Format::Goflow2Protobuf => {
                        let mut two = flow_message(format, t, t, t);
                        two.push(b'\n');
                        two.extend(flow_message(format, 0, t + 1, t));
                        msgs.push(&two);
                    }
                    _ => msgs.push(&flow_message(format, t - 5, t, t + 7)),
                }
            }
            let (one, one_stats) = decode_with(format, EventTime::FlowEnd, &msgs, &limits());
            let (many, many_stats) = decode_parallel(format, EventTime::FlowEnd, &msgs, &limits(), threads);
            let (Decoded::Flows(one), Decoded::Flows(many)) = (one, many) else { panic!("flows decode to flows") };
            prop_assert_eq!(one, many);
            prop_assert_eq!(one_stats, many_stats);
        }
    }

    /// Every flow decoder places a flow by the time each mode asks for, and falls back (counted)
    /// to the end, the arrival, the start when that time is absent.
    #[test]
    fn every_flow_decoder_places_flows_by_each_event_time_mode() {
        let (start, end, arrival) = (1_764_000_000_000_000_000, 1_764_000_000_400_000_000, 1_764_000_000_500_000_000);
        for format in Format::ALL.into_iter().filter(|f| f.is_flows()) {
            let place = |mode: EventTime, (s, e, a): (i64, i64, i64)| {
                let mut msgs = Messages::default();
                msgs.push(&flow_message(format, s, e, a));
                let (Decoded::Flows(b), stats) = decode_with(format, mode, &msgs, &limits()) else { unreachable!() };
                assert_eq!((b.num_rows(), stats.rejected_total()), (1, 0), "{format:?} {mode:?}");
                let ns = |c: &str| b.column_by_name(c).unwrap().as_primitive::<TimestampNanosecondType>().value(0);
                (ns("event_time"), ns("flow_start"), stats.event_time_fallback)
            };
            let all = (start, end, arrival);
            assert_eq!(place(EventTime::FlowEnd, all), (end, start, 0), "{format:?}");
            assert_eq!(place(EventTime::FlowStart, all), (start, start, 0), "{format:?}");
            assert_eq!(place(EventTime::Arrival, all), (arrival, start, 0), "{format:?}");
            assert_eq!(place(EventTime::Spread, all), (end, start, 0), "{format:?}");
            // Without the time asked for: the next in line, counted.
            assert_eq!(place(EventTime::FlowEnd, (start, 0, arrival)), (arrival, start, 1), "{format:?}");
            assert_eq!(place(EventTime::FlowEnd, (start, 0, 0)), (start, start, 1), "{format:?}");
            assert_eq!(place(EventTime::FlowStart, (0, end, arrival)), (end, end, 1), "{format:?}");
            assert_eq!(place(EventTime::Arrival, (start, end, 0)), (end, start, 1), "{format:?}");
            assert_eq!(place(EventTime::Spread, (0, end, arrival)), (end, end, 1), "{format:?}");
            // A start before 2000 is no start: not spread.
            assert_eq!(place(EventTime::Spread, (5, end, arrival)), (end, end, 1), "{format:?}");
        }
    }

    proptest! {
        /// Any bytes, in any format: no panic, and every record is either decoded or rejected
        /// with a reason.
        #[test]
        fn arbitrary_bytes_never_panic(messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..20)) {
            let mut msgs = Messages::default();
            for m in &messages {
                msgs.push(m);
            }
            for format in Format::ALL {
                let (decoded, stats) = decode(format, &msgs, &limits());
                prop_assert_eq!(decoded.num_rows() as u64, stats.decoded);
                prop_assert_eq!(stats.decoded + stats.rejected_total() + stats.no_traffic, stats.records);
                // Every rejection points at bytes of a real message (what the dead-letter topic gets).
                prop_assert_eq!(stats.bad.len() as u64, stats.rejected_total());
                for bad in &stats.bad {
                    prop_assert!(bad.message < messages.len() && bad.range.end <= messages[bad.message].len());
                }
            }
        }

        /// The fuzz targets' invariants (`fuzz/`), on arbitrary bytes split into messages.
        #[test]
        fn fuzz_invariants_hold(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            for format in Format::ALL {
                fuzz::check(format, &data);
            }
        }

        /// Valid records with bytes flipped or cut: still no panic, still accounted for.
        #[test]
        fn damaged_records_are_accounted_for(cut in 0usize..500, flip in 0usize..500, bit in 0u8..8) {
            use prost::Message;
            let json = br#"{"type":"NETFLOW_V9","time_received_ns":1764000000500000000,"sampling_rate":100,"sampler_address":"172.16.2.21","time_flow_end_ns":1764000000400000000,"bytes":1500,"packets":3,"src_addr":"10.2.21.5","dst_addr":"203.0.113.9","proto":"TCP","src_port":1,"dst_port":2}"#.to_vec();
            let mut pb = Vec::new();
            goflow2_pb::tests::sample().encode_length_delimited(&mut pb).unwrap();
            for (format, mut bytes) in [(Format::Goflow2Json, json), (Format::Goflow2Protobuf, pb)] {
                if !bytes.is_empty() {
                    let i = flip % bytes.len();
                    bytes[i] ^= 1 << bit;
                    bytes.truncate(cut.max(1).min(bytes.len()));
                }
                let mut msgs = Messages::default();
                msgs.push(&bytes);
                let (_, stats) = decode(format, &msgs, &limits());
                prop_assert_eq!(stats.decoded + stats.rejected_total() + stats.no_traffic, stats.records);
                prop_assert!(stats.records >= 1);
            }
        }
    }
}
