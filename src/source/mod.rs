//! Sources: where message bytes come from. Each yields [`SourceBatch`]es of raw messages in one
//! format, tagged with the partition they came from (for per-partition watermarks).

pub mod file;
pub mod kafka;
pub mod kafka_probe;
pub mod simulator;

use std::time::Instant;

use crate::decode::Format;
use crate::event_time::EventTime;

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
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(self.ends.iter().copied()).map(|(s, e)| &self.data[s..e])
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

/// A source of message batches. `None` means the source is exhausted.
pub trait Source: Send {
    fn next_batch(&mut self) -> impl std::future::Future<Output = Option<SourceBatch>> + Send;

    /// The partitions the source will deliver, when known before the first batch.
    fn partitions(&self) -> Vec<PartitionId> {
        Vec::new()
    }
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
