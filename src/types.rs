//! The types every stage shares: raw messages as a source delivers them, the partition they
//! came from, their wire format and which time of a flow is its event time. Nothing here
//! depends on any other module of siteflow, so every stage can use it without a cycle.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The wire formats siteflow reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// goflow2 `-format=json`: one flow per line.
    Goflow2Json,
    /// goflow2 `-format=bin`: varint-length-delimited `FlowMessage`s (goflow2's Kafka default).
    Goflow2Protobuf,
    /// goflow2 `-format=bin` without the length prefix: one `FlowMessage` per message.
    Goflow2ProtobufPlain,
    /// pmacct nfacctd/sfacctd Kafka plugin, `kafka_output: json` (also `kafka_multi_values`).
    PmacctJson,
    /// siteflow's own probe record (see `schemas/siteflow-probe.schema.json`).
    SiteflowProbeJson,
    /// Telegraf `data_format = "json"` (single or `{"metrics":[…]}`): `ping` → probe results,
    /// interface octet counters (`net`, `snmp`, …) → interface byte rates.
    TelegrafJson,
    /// pmacct sfacctd's sFlow counter stream (`sfacctd_counter_kafka_topic`): generic interface
    /// records → interface byte rates, link state and speed.
    PmacctSflowCountersJson,
}

impl Format {
    /// Every format siteflow decodes.
    pub const ALL: [Format; 7] = [
        Format::Goflow2Json,
        Format::Goflow2Protobuf,
        Format::Goflow2ProtobufPlain,
        Format::PmacctJson,
        Format::SiteflowProbeJson,
        Format::TelegrafJson,
        Format::PmacctSflowCountersJson,
    ];

    /// Whether the format carries flow records.
    pub fn is_flows(self) -> bool {
        matches!(self, Format::Goflow2Json | Format::Goflow2Protobuf | Format::Goflow2ProtobufPlain | Format::PmacctJson)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Goflow2Json => "goflow2_json",
            Format::Goflow2Protobuf => "goflow2_protobuf",
            Format::Goflow2ProtobufPlain => "goflow2_protobuf_plain",
            Format::PmacctJson => "pmacct_json",
            Format::SiteflowProbeJson => "siteflow_probe_json",
            Format::TelegrafJson => "telegraf_json",
            Format::PmacctSflowCountersJson => "pmacct_sflow_counters_json",
        }
    }
}

/// Which time of a flow record is its event time (per source: `kafka.topics[].event_time`,
/// `simulator.event_time`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventTime {
    /// When the flow's last packet was seen (goflow2 `time_flow_end_ns`, pmacct `timestamp_end`).
    #[default]
    FlowEnd,
    /// When its first packet was seen (`time_flow_start_ns`, `timestamp_start`).
    FlowStart,
    /// When the collector received the export (`time_received_ns`, `timestamp_arrival`).
    Arrival,
    /// Bytes and packets apportioned over the windows from the flow's start to its end.
    Spread,
}

impl EventTime {
    pub const ALL: [EventTime; 4] = [EventTime::FlowEnd, EventTime::FlowStart, EventTime::Arrival, EventTime::Spread];

    pub fn as_str(self) -> &'static str {
        match self {
            EventTime::FlowEnd => "flow_end",
            EventTime::FlowStart => "flow_start",
            EventTime::Arrival => "arrival",
            EventTime::Spread => "spread",
        }
    }
}

/// Messages stored back to back in one buffer: no allocation per message.
#[derive(Debug, Default, Clone)]
pub struct Messages {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl Messages {
    pub fn with_capacity(messages: usize, bytes: usize) -> Self {
        Self { data: Vec::with_capacity(bytes), ends: Vec::with_capacity(messages) }
    }

    /// Appends one message.
    pub fn push(&mut self, msg: &[u8]) {
        self.data.extend_from_slice(msg);
        self.end_message();
    }

    /// The buffer the current message is written into; call [`Messages::end_message`] after.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }

    /// Ends the message written into [`Messages::buffer`].
    pub fn end_message(&mut self) {
        self.ends.push(self.data.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn total_bytes(&self) -> usize {
        self.data.len()
    }

    /// The `i`-th message.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.data[start..end])
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.iter_range(0..self.ends.len())
    }

    /// Messages `range` (indices into the batch), in order.
    pub fn iter_range(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = &[u8]> {
        let start = if range.start == 0 { 0 } else { self.ends[range.start - 1] };
        let starts = std::iter::once(start).chain(self.ends[range.clone()].iter().copied());
        starts.zip(self.ends[range].iter().copied()).map(|(s, e)| &self.data[s..e])
    }
}

/// Identifies a stream whose event times advance together (a Kafka partition, the simulator).
pub type PartitionId = u32;

/// A batch of raw messages of one format from one partition.
#[derive(Debug, Clone)]
pub struct SourceBatch {
    pub partition: PartitionId,
    pub format: Format,
    /// Which time of a flow is its event time (the topic's `event_time`).
    pub event_time: EventTime,
    pub messages: Messages,
    /// When the batch left the source: the start of its processing latency.
    pub received: Instant,
    /// Kafka offset of each message (empty for sources without offsets).
    pub offsets: Vec<i64>,
}

/// Now, in nanoseconds since the Unix epoch.
pub fn unix_now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let mut m = Messages::default();
        m.push(b"one");
        m.push(b"");
        m.buffer().extend_from_slice(b"three");
        m.end_message();
        let all: Vec<&[u8]> = m.iter().collect();
        assert_eq!(all, vec![&b"one"[..], &b""[..], &b"three"[..]]);
        assert_eq!(m.total_bytes(), 8);
    }
}
