//! Which format a sample of messages is in: each known format decodes the sample and the one
//! that accepts the largest share of its records wins.
//!
//! Used where the format is not given (`siteflow replay` without `--format`) and to explain a
//! topic whose records are rejected (`siteflow check --connect`: "they decode as goflow2_json").

use super::{DecodeLimits, DecodeStats, decode};
use crate::types::{Format, Messages};

/// How one format fared on the sample.
#[derive(Debug, Clone)]
pub struct Trial {
    pub format: Format,
    pub stats: DecodeStats,
}

impl Trial {
    /// Share of the sample's records this format decoded (0 when it found no record at all).
    pub fn share(&self) -> f64 {
        if self.stats.records == 0 { 0.0 } else { (self.stats.decoded + self.stats.no_traffic) as f64 / self.stats.records as f64 }
    }
}

/// Every format tried on `sample`, best first (highest share, then [`Format::ALL`] order).
pub fn trials(sample: &Messages, limits: &DecodeLimits) -> Vec<Trial> {
    let mut trials: Vec<Trial> = Format::ALL
        .into_iter()
        .map(|format| {
            let (_, stats) = decode(format, sample, limits);
            Trial { format, stats }
        })
        .collect();
    // A stable sort keeps `Format::ALL` order among equals (length-delimited protobuf first).
    trials.sort_by(|a, b| b.share().total_cmp(&a.share()));
    trials
}

/// The format that decodes at least half of `sample`'s records, if any does.
pub fn detect(sample: &Messages, limits: &DecodeLimits) -> Option<Format> {
    trials(sample, limits).into_iter().next().filter(|t| t.share() >= 0.5).map(|t| t.format)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DecodeLimits {
        DecodeLimits {
            max_message_bytes: 1 << 20,
            max_bytes_per_record: 1 << 40,
            min_time_ns: DecodeLimits::MIN_TIME_NS,
            max_time_ns: i64::MAX,
        }
    }

    fn sample(lines: &[&str]) -> Messages {
        let mut m = Messages::default();
        for l in lines {
            m.push(l.as_bytes());
        }
        m
    }

    #[test]
    fn each_json_format_is_recognised_and_garbage_is_not() {
        let goflow2 = r#"{"type":"NETFLOW_V9","time_received_ns":1764000000500000000,"sampling_rate":100,"sampler_address":"172.16.2.21","time_flow_start_ns":1764000000000000000,"time_flow_end_ns":1764000000400000000,"bytes":1500,"packets":3,"src_addr":"10.2.21.5","dst_addr":"203.0.113.9","etype":"IPv4","proto":"TCP","src_port":51000,"dst_port":443,"in_if":1,"out_if":2}"#;
        let pmacct = r#"{"event_type":"purge","peer_ip_src":"172.16.2.21","ip_src":"203.0.113.9","ip_dst":"10.2.21.5","port_src":443,"port_dst":51000,"ip_proto":"tcp","timestamp_start":"1764000000.000000","timestamp_end":"1764000000.400000","packets":3,"bytes":1500}"#;
        let probe =
            r#"{"site":"dong-van.ta-lung","time_ms":1764000000000,"target":"mcu","rtt_ms":35.5,"jitter_ms":2.5,"loss_pct":1.0,"sent":10}"#;
        assert_eq!(detect(&sample(&[goflow2, goflow2]), &limits()), Some(Format::Goflow2Json));
        assert_eq!(detect(&sample(&[pmacct]), &limits()), Some(Format::PmacctJson));
        assert_eq!(detect(&sample(&[probe]), &limits()), Some(Format::SiteflowProbeJson));
        assert_eq!(detect(&sample(&["hello", "world"]), &limits()), None);
        let best = &trials(&sample(&[goflow2, "not json"]), &limits())[0];
        assert_eq!((best.format, best.share()), (Format::Goflow2Json, 0.5));
    }

    #[test]
    fn length_delimited_protobuf_is_recognised() {
        use prost::Message as _;
        let flow = super::super::goflow2_pb::FlowMessage {
            time_received_ns: 1_764_000_000_000_000_000,
            time_flow_end_ns: 1_764_000_000_000_000_000,
            bytes: 1500,
            packets: 1,
            src_addr: vec![10, 1, 0, 5],
            dst_addr: vec![8, 8, 8, 8],
            sampler_address: vec![10, 0, 0, 1],
            ..Default::default()
        };
        let mut m = Messages::default();
        m.push(&flow.encode_length_delimited_to_vec());
        assert_eq!(detect(&m, &limits()), Some(Format::Goflow2Protobuf));
        let mut plain = Messages::default();
        plain.push(&flow.encode_to_vec());
        assert_eq!(detect(&plain, &limits()), Some(Format::Goflow2ProtobufPlain));
    }
}
