//! The ingest stage's output (docs/scale-out.md): at each checkpoint, every owned source
//! partition's open states become one span, cut by site into one partial per partition of the
//! internal topic. The partials are written into the partition's checkpoint (the outbox) and
//! produced after it; a message not yet delivered stays in the outbox of every later
//! checkpoint, and a partition restored with an outbox sends it again (the site stage's ledger
//! drops what it already merged). So each span reaches the internal topic at least once and
//! unchanged, and is merged exactly once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use rdkafka::ClientContext;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use crate::checkpoint::PartitionKey;
use crate::config::KafkaConfig;
use crate::shuffle::{IngestError, Span, route, site_columns};
use crate::types::PartitionId;
use crate::window::ExporterKey;

/// Largest message produced: below the brokers' default `message.max.bytes` (1 MB).
const MAX_MESSAGE_BYTES: usize = 900 << 10;

struct Deliveries {
    failed: Arc<AtomicU64>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::AcqRel);
            tracing::warn!("partial not delivered to the internal topic: {e}");
        }
    }
}

/// What the ingest stage keeps to hand its spans on.
pub struct IngestOutput {
    topic: String,
    partitions: u32,
    producer: ThreadedProducer<Deliveries>,
    failed: Arc<AtomicU64>,
    schemas: Vec<SchemaRef>,
    site_columns: Vec<usize>,
    /// Per owned partition: the first offset of the span not handed on yet.
    span_from: HashMap<PartitionId, i64>,
    /// Per owned partition: partials written to a checkpoint but not known to be delivered.
    pending: HashMap<PartitionId, Vec<(i32, Vec<u8>)>>,
}

impl IngestOutput {
    /// A producer to `topic`, whose partition count (read from the brokers) splits the sites.
    pub fn new(kafka: &KafkaConfig, topic: &str, schemas: Vec<SchemaRef>) -> Result<Self, IngestError> {
        let setup = |message: String| IngestError::Setup { topic: topic.to_string(), message };
        let site_columns = site_columns(&schemas).map_err(setup)?;
        let mut client = crate::kafka_client::producer_config(kafka);
        // Partials must not be lost to a short outage, nor reordered within a partition (a
        // retry may repeat one: the site stage's ledger drops repeats).
        client.set("message.timeout.ms", "300000").set("linger.ms", "5").set("max.in.flight.requests.per.connection", "1");
        let failed = Arc::new(AtomicU64::new(0));
        let producer: ThreadedProducer<Deliveries> = client
            .create_with_context(Deliveries { failed: failed.clone() })
            .map_err(|e| setup(format!("cannot create the producer: {e}")))?;
        let metadata = producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(30))
            .map_err(|e| setup(format!("cannot read its metadata: {e}")))?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len()) as u32;
        if partitions == 0 {
            return Err(setup("does not exist; create it with as many partitions as site-stage instances you may run".into()));
        }
        tracing::info!(topic, partitions, "ingest stage: partial aggregates go to the internal topic, cut by site");
        Ok(Self {
            topic: topic.to_string(),
            partitions,
            producer,
            failed,
            schemas,
            site_columns,
            span_from: HashMap::new(),
            pending: HashMap::new(),
        })
    }

    /// A partition taken over at its checkpoint's `next_offset` (none: at its first message),
    /// with the outbox its checkpoint held.
    pub fn restored(&mut self, id: PartitionId, next_offset: Option<i64>, outbox: Vec<(i32, Vec<u8>)>) {
        match next_offset {
            Some(offset) => self.span_from.insert(id, offset),
            None => self.span_from.remove(&id),
        };
        if !outbox.is_empty() {
            tracing::info!(partials = outbox.len(), "sending a restored partition's outbox again");
            self.pending.insert(id, outbox);
        }
    }

    /// A partition without a checkpoint starts its first span at its first message.
    pub fn starts_at(&mut self, id: PartitionId, offset: i64) {
        self.span_from.entry(id).or_insert(offset);
    }

    /// A partition let go (its checkpoint holds what was not delivered).
    pub fn released(&mut self, id: PartitionId) {
        self.span_from.remove(&id);
        self.pending.remove(&id);
    }

    /// Ends the span of `id` at `to`: its states and on-time records become partials; returns
    /// the outbox to write into the checkpoint (what is still pending, this span included).
    pub fn cut(
        &mut self,
        id: PartitionId,
        source: &PartitionKey,
        to: i64,
        clocks: &[(ExporterKey, i64)],
        states: &[Vec<RecordBatch>],
        records: &[(usize, RecordBatch)],
    ) -> Result<Vec<(i32, Vec<u8>)>, IngestError> {
        let from = *self.span_from.get(&id).unwrap_or(&to);
        if to > from {
            let span = Span { source, offsets: (from, to), clocks, states, records };
            let partials = route(&span, &self.site_columns, self.partitions)?;
            let pending = self.pending.entry(id).or_default();
            for (q, partial) in partials.iter().enumerate() {
                for message in partial.encode_parts(&self.schemas, MAX_MESSAGE_BYTES)? {
                    pending.push((q as i32, message));
                }
            }
            self.span_from.insert(id, to);
        }
        Ok(self.pending.get(&id).cloned().unwrap_or_default())
    }

    /// Produces every pending partial and waits for the brokers to take them.
    pub fn deliver(&mut self) -> Result<(), IngestError> {
        if self.pending.values().all(Vec::is_empty) {
            return Ok(());
        }
        let before = self.failed.load(Ordering::Acquire);
        for (id, messages) in &self.pending {
            let key = id.to_string();
            for (partition, payload) in messages {
                let mut record: BaseRecord<'_, str, [u8]> =
                    BaseRecord::to(&self.topic).partition(*partition).key(key.as_str()).payload(payload.as_slice());
                loop {
                    match self.producer.send(record) {
                        Ok(()) => break,
                        Err((e, back)) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) => {
                            std::thread::sleep(Duration::from_millis(5));
                            record = back;
                        }
                        Err((e, _)) => {
                            tracing::warn!("partial not queued: {e}");
                            self.failed.fetch_add(1, Ordering::AcqRel);
                            break;
                        }
                    }
                }
            }
        }
        let flushed = self.producer.flush(Duration::from_secs(120));
        let failed = self.failed.load(Ordering::Acquire) - before;
        if flushed.is_err() || failed > 0 {
            return Err(IngestError::NotDelivered { topic: self.topic.clone(), failed: failed.max(1) });
        }
        self.pending.clear();
        Ok(())
    }
}
