//! The dead-letter topic: every rejected record, with its original bytes and why.
//!
//! Headers: `siteflow-reason` (a `siteflow_records_rejected_total` reason), `siteflow-format`,
//! `siteflow-source-topic`, `siteflow-source-partition`, `siteflow-source-offset`. The payload is the
//! record's own bytes: the line of a newline-delimited batch, or the whole binary message.
//! Delivery is at least once: the producer is flushed before every checkpoint, so a record
//! whose offset is committed has reached the topic (a crash may send it again).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use crate::checkpoint::PartitionKey;
use crate::config::KafkaConfig;
use crate::decode::DecodeStats;
use crate::metrics::PipelineMetrics;
use crate::types::{Format, Messages};

struct Delivery {
    metrics: Arc<PipelineMetrics>,
}

impl ClientContext for Delivery {}

impl ProducerContext for Delivery {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.metrics.dead_letters.errors.inc();
            tracing::warn!("dead-letter record not delivered: {e}");
        }
    }
}

/// The dead-letter producer failed. At start it is the configuration's fault (fatal); a failed
/// flush before a checkpoint stops the run, since committing would lose the rejected records.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("kafka: cannot create the dead-letter producer: {0}")]
    Create(rdkafka::error::KafkaError),
    #[error("dead-letter flush: {0}")]
    Flush(rdkafka::error::KafkaError),
}

/// Producer of the dead-letter topic.
pub struct DeadLetters {
    topic: String,
    producer: ThreadedProducer<Delivery>,
    metrics: Arc<PipelineMetrics>,
}

impl DeadLetters {
    pub fn new(config: &KafkaConfig, topic: &str, metrics: Arc<PipelineMetrics>) -> Result<Self, DeadLetterError> {
        let mut client = crate::kafka_client::producer_config(config);
        // Bad records must not be lost to a short outage.
        client.set("message.timeout.ms", "300000").set("linger.ms", "20");
        let producer = client.create_with_context(Delivery { metrics: metrics.clone() }).map_err(DeadLetterError::Create)?;
        Ok(Self { topic: topic.to_string(), producer, metrics })
    }

    /// Produces every record `stats` rejected from `messages` (offsets parallel to the messages).
    pub fn send(&self, source: &PartitionKey, format: Format, messages: &Messages, offsets: &[i64], stats: &DecodeStats) {
        if stats.bad.is_empty() {
            return;
        }
        let all: Vec<&[u8]> = messages.iter().collect();
        let partition = source.partition.to_string();
        for bad in &stats.bad {
            let Some(message) = all.get(bad.message) else { continue };
            let payload = message.get(bad.range.clone()).unwrap_or(message);
            let offset = offsets.get(bad.message).map(i64::to_string).unwrap_or_default();
            let headers = OwnedHeaders::new()
                .insert(Header { key: "siteflow-reason", value: Some(bad.reason.as_str()) })
                .insert(Header { key: "siteflow-format", value: Some(format.as_str()) })
                .insert(Header { key: "siteflow-source-topic", value: Some(source.topic.as_str()) })
                .insert(Header { key: "siteflow-source-partition", value: Some(partition.as_str()) })
                .insert(Header { key: "siteflow-source-offset", value: Some(offset.as_str()) });
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&self.topic).payload(payload).headers(headers);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((e, back)) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) => {
                        // The local queue is full: wait for deliveries rather than drop.
                        std::thread::sleep(Duration::from_millis(10));
                        record = back;
                    }
                    Err((e, _)) => {
                        self.metrics.dead_letters.errors.inc();
                        tracing::warn!("dead-letter record not queued: {e}");
                        break;
                    }
                }
            }
            self.metrics.dead_letters.records.with_label_values(&[bad.reason.as_str()]).inc();
        }
    }

    /// Waits until everything sent so far is delivered (before a checkpoint commits offsets).
    pub fn flush(&self) -> Result<(), DeadLetterError> {
        self.producer.flush(Duration::from_secs(60)).map_err(DeadLetterError::Flush)
    }
}
