//! Sources: where message bytes come from. Each yields [`SourceBatch`]es of raw messages in one
//! format, tagged with the partition they came from (for per-partition watermarks).

pub mod file;
pub mod kafka;
pub mod kafka_probe;
pub mod simulator;

use crate::types::{PartitionId, SourceBatch};

/// A source of message batches. `None` means the source is exhausted.
pub trait Source: Send {
    fn next_batch(&mut self) -> impl std::future::Future<Output = Option<SourceBatch>> + Send;

    /// The partitions the source will deliver, when known before the first batch.
    fn partitions(&self) -> Vec<PartitionId> {
        Vec::new()
    }
}
