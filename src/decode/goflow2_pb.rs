//! goflow2 protobuf (`goflow2 -format=bin`): `FlowMessage` as in `schemas/goflow2-flow.proto`,
//! varint-length-delimited (goflow2's Kafka default; one or more messages per Kafka message)
//! or plain (exactly one message per Kafka message).

use super::{DecodeLimits, FlowRecord, FlowTimes, NO_ADDR, RejectReason};
use crate::inventory::Addr;

/// goflow2's `FlowMessage`, the fields siteflow reads (tags are goflow2's field numbers).
#[derive(Clone, PartialEq, prost::Message)]
pub struct FlowMessage {
    #[prost(int32, tag = "1")]
    pub r#type: i32,
    #[prost(uint64, tag = "110")]
    pub time_received_ns: u64,
    #[prost(uint32, tag = "4")]
    pub sequence_num: u32,
    #[prost(uint64, tag = "3")]
    pub sampling_rate: u64,
    #[prost(bytes = "vec", tag = "11")]
    pub sampler_address: Vec<u8>,
    #[prost(uint64, tag = "111")]
    pub time_flow_start_ns: u64,
    #[prost(uint64, tag = "112")]
    pub time_flow_end_ns: u64,
    #[prost(uint64, tag = "9")]
    pub bytes: u64,
    #[prost(uint64, tag = "10")]
    pub packets: u64,
    #[prost(bytes = "vec", tag = "6")]
    pub src_addr: Vec<u8>,
    #[prost(bytes = "vec", tag = "7")]
    pub dst_addr: Vec<u8>,
    #[prost(uint32, tag = "18")]
    pub in_if: u32,
    #[prost(uint32, tag = "19")]
    pub out_if: u32,
    #[prost(uint32, tag = "20")]
    pub proto: u32,
    #[prost(uint32, tag = "21")]
    pub src_port: u32,
    #[prost(uint32, tag = "22")]
    pub dst_port: u32,
    #[prost(uint32, tag = "30")]
    pub etype: u32,
}

/// A raw address: 4 bytes (IPv4, stored IPv4-mapped) or 16 (IPv6); none for a non-IP flow.
fn addr(raw: &[u8]) -> Result<Addr, RejectReason> {
    match raw.len() {
        0 => Ok(NO_ADDR),
        4 => Ok((0xffff_u128 << 32) | u128::from(u32::from_be_bytes(raw.try_into().expect("4 bytes")))),
        16 => Ok(u128::from_be_bytes(raw.try_into().expect("16 bytes"))),
        _ => Err(RejectReason::BadAddress),
    }
}

fn record(m: &FlowMessage, limits: &DecodeLimits) -> Result<FlowRecord, RejectReason> {
    let time = |t: u64| i64::try_from(t).map_err(|_| RejectReason::BadTimestamp);
    let times = FlowTimes {
        start_ns: time(m.time_flow_start_ns)?,
        end_ns: time(m.time_flow_end_ns)?,
        arrival_ns: time(m.time_received_ns)?,
        stamp_ns: 0,
    };
    let too_big = |v: u64| v > limits.max_bytes_per_record;
    if too_big(m.bytes) || too_big(m.packets) {
        return Err(RejectReason::AbsurdCounter);
    }
    Ok(FlowRecord {
        times,
        exporter: addr(&m.sampler_address)?,
        src_addr: addr(&m.src_addr)?,
        dst_addr: addr(&m.dst_addr)?,
        src_port: u16::try_from(m.src_port).map_err(|_| RejectReason::WrongSchema)?,
        dst_port: u16::try_from(m.dst_port).map_err(|_| RejectReason::WrongSchema)?,
        proto: u8::try_from(m.proto).map_err(|_| RejectReason::WrongSchema)?,
        in_if: m.in_if,
        out_if: m.out_if,
        bytes: m.bytes,
        packets: m.packets,
        flows: 1,
        sampling_rate: u32::try_from(m.sampling_rate).map_err(|_| RejectReason::AbsurdCounter)?,
        ..FlowRecord::default()
    })
}

/// Decodes one Kafka message holding varint-length-delimited `FlowMessage`s; calls `emit` for
/// each. A framing error rejects the rest of the message (its remaining bytes cannot be trusted).
pub fn decode_delimited(msg: &[u8], limits: &DecodeLimits, mut emit: impl FnMut(Result<FlowRecord, RejectReason>)) {
    let mut buf = msg;
    while !buf.is_empty() {
        match <FlowMessage as prost::Message>::decode_length_delimited(&mut buf) {
            Ok(m) => emit(record(&m, limits)),
            Err(_) => {
                emit(Err(RejectReason::NotProtobuf));
                return;
            }
        }
    }
}

/// Decodes one Kafka message holding exactly one `FlowMessage`.
pub fn decode_plain(msg: &[u8], limits: &DecodeLimits) -> Result<FlowRecord, RejectReason> {
    let m = <FlowMessage as prost::Message>::decode(msg).map_err(|_| RejectReason::NotProtobuf)?;
    record(&m, limits)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::decode::goflow2_json::tests::limits;
    use crate::inventory::addr_from_ip;
    use prost::Message;

    pub(crate) fn sample() -> FlowMessage {
        FlowMessage {
            r#type: 3,
            time_received_ns: 1_764_000_000_500_000_000,
            sequence_num: 7,
            sampling_rate: 100,
            sampler_address: vec![172, 16, 2, 21],
            time_flow_start_ns: 1_764_000_000_000_000_000,
            time_flow_end_ns: 1_764_000_000_400_000_000,
            bytes: 1500,
            packets: 3,
            src_addr: vec![10, 2, 21, 5],
            dst_addr: "2001:db8::9".parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec(),
            in_if: 1,
            out_if: 2,
            proto: 6,
            src_port: 51000,
            dst_port: 443,
            etype: 0x86dd,
        }
    }

    #[test]
    fn delimited_messages_decode_in_order() {
        let mut buf = Vec::new();
        sample().encode_length_delimited(&mut buf).unwrap();
        FlowMessage { bytes: 99, ..sample() }.encode_length_delimited(&mut buf).unwrap();
        let mut got = Vec::new();
        decode_delimited(&buf, &limits(), |r| got.push(r.unwrap()));
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].bytes, got[1].bytes), (1500, 99));
        assert_eq!(got[0].exporter, addr_from_ip("172.16.2.21".parse().unwrap()));
        assert_eq!(got[0].dst_addr, addr_from_ip("2001:db8::9".parse().unwrap()));
        assert_eq!((got[0].times.end_ns, got[0].sampling_rate, got[0].proto), (1_764_000_000_400_000_000, 100, 6));
        assert_eq!((got[0].times.start_ns, got[0].times.arrival_ns), (1_764_000_000_000_000_000, 1_764_000_000_500_000_000));
    }

    #[test]
    fn plain_and_bad_messages() {
        let plain = sample().encode_to_vec();
        assert_eq!(decode_plain(&plain, &limits()).unwrap().bytes, 1500);
        assert_eq!(decode_plain(&[0xff, 0xff, 0xff], &limits()), Err(RejectReason::NotProtobuf));
        let bad_addr = FlowMessage { src_addr: vec![1, 2, 3], ..sample() }.encode_to_vec();
        assert_eq!(decode_plain(&bad_addr, &limits()), Err(RejectReason::BadAddress));
        let no_time = FlowMessage { time_flow_end_ns: 0, time_received_ns: 0, time_flow_start_ns: 0, ..sample() }.encode_to_vec();
        assert_eq!(decode_plain(&no_time, &limits()).unwrap().placed(Default::default(), &limits()), Err(RejectReason::BadTimestamp));
        let huge = FlowMessage { time_flow_end_ns: u64::MAX, ..sample() }.encode_to_vec();
        assert_eq!(decode_plain(&huge, &limits()), Err(RejectReason::BadTimestamp));
        // A non-IP flow: no addresses.
        let non_ip = FlowMessage { src_addr: vec![], dst_addr: vec![], etype: 0x8847, ..sample() }.encode_to_vec();
        let r = decode_plain(&non_ip, &limits()).unwrap();
        assert_eq!((r.src_addr, r.dst_addr, r.bytes), (crate::decode::NO_ADDR, crate::decode::NO_ADDR, 1500));
        // A truncated frame: the first message decodes, the rest is rejected once.
        let mut buf = Vec::new();
        sample().encode_length_delimited(&mut buf).unwrap();
        sample().encode_length_delimited(&mut buf).unwrap();
        buf.truncate(buf.len() - 5);
        let mut got = Vec::new();
        decode_delimited(&buf, &limits(), |r| got.push(r.map(|r| r.bytes)));
        assert_eq!(got, vec![Ok(1500), Err(RejectReason::NotProtobuf)]);
    }
}
