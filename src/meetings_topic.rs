//! Meetings shared by every instance through a compacted Kafka topic (`kafka.meetings_topic`).
//!
//! The topic is the store: the key is the meeting id, the value the meeting as JSON (what
//! `POST /api/meetings` takes), an empty value (a tombstone) deletes it; compaction keeps the
//! latest value per id. Every instance reads the whole topic from the beginning at start and
//! keeps reading it, so a meeting posted to one instance is reported by all of them and
//! survives restarts of all of them. A write answers once this instance has read it back from
//! the topic: the caller sees its own write, and every instance applies writes in the topic's
//! order. Meetings of the schedule file (`readiness.meetings`) stay local and cannot be
//! replaced or deleted through the topic.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::Offset;
use tokio::sync::{oneshot, watch};

use crate::config::KafkaConfig;
use crate::readiness::{MeetingSpec, SharedReadiness};

/// How long a write waits to be delivered and read back before the caller is told.
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a missing topic or an unreachable broker is retried (and logged).
const RETRY: Duration = Duration::from_secs(5);

/// A write to the meetings topic that did not complete; the caller may retry it.
#[derive(Debug, thiserror::Error)]
pub enum MeetingsTopicError {
    #[error("kafka.meetings_topic: cannot create the producer: {0}")]
    Producer(rdkafka::error::KafkaError),
    #[error("meetings topic {topic:?}: the write was not delivered: {reason}")]
    NotDelivered { topic: String, reason: String },
    #[error("meetings topic {topic:?}: the write was delivered but not read back within {secs} s; it will apply once read")]
    NotReadBack { topic: String, secs: u64 },
}

/// Per partition, the offset after the last record applied; and whether the topic was read to
/// the end it had at start.
#[derive(Debug, Clone, Default)]
struct ReadUpTo {
    next: HashMap<i32, i64>,
    loaded: bool,
}

type Ack = oneshot::Sender<Result<(i32, i64), String>>;

/// Completes each write's acknowledgement.
struct Acks;

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = Box<std::sync::Mutex<Option<Ack>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.to_string()),
        };
        if let Some(ack) = ack.lock().expect("ack lock").take() {
            let _ = ack.send(outcome);
        }
    }
}

/// The meetings topic: a producer for the API's writes and a thread reading every record.
pub struct MeetingsTopic {
    topic: String,
    producer: ThreadedProducer<Acks>,
    read: watch::Receiver<ReadUpTo>,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MeetingsTopic {
    /// Starts reading `topic` into `readiness` (at most `max_meetings` kept). A missing topic or
    /// an unreachable broker is retried and logged, and the instance is not ready until the
    /// topic has been read to its end.
    pub fn start(
        config: &KafkaConfig,
        topic: &str,
        readiness: Arc<SharedReadiness>,
        max_meetings: usize,
        rejected: prometheus::IntCounter,
    ) -> Result<Self, MeetingsTopicError> {
        let mut client = crate::kafka_client::producer_config(config);
        client.set("linger.ms", "0").set("message.timeout.ms", &WRITE_TIMEOUT.as_millis().to_string());
        let producer = client.create_with_context(Acks).map_err(MeetingsTopicError::Producer)?;
        let (report, read) = watch::channel(ReadUpTo::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let reader = Reader {
            config: config.clone(),
            topic: topic.to_string(),
            readiness,
            max_meetings,
            rejected,
            report,
            stopping: stopping.clone(),
        };
        let thread = std::thread::Builder::new().name("meetings-topic".into()).spawn(move || reader.run()).map_err(|e| {
            MeetingsTopicError::NotDelivered { topic: topic.to_string(), reason: format!("cannot start the reader thread: {e}") }
        })?;
        Ok(Self { topic: topic.to_string(), producer, read, stopping, thread: Some(thread) })
    }

    /// Whether the topic has been read to the end it had when this instance started.
    pub fn loaded(&self) -> bool {
        self.read.borrow().loaded
    }

    /// Writes a meeting (replacing any with its id) and waits until it is read back.
    pub async fn put(&self, spec: &MeetingSpec) -> Result<(), MeetingsTopicError> {
        let value = serde_json::to_vec(spec).expect("a meeting serialises");
        self.write(&spec.id, Some(&value)).await
    }

    /// Deletes a meeting (a tombstone) and waits until it is read back.
    pub async fn delete(&self, id: &str) -> Result<(), MeetingsTopicError> {
        self.write(id, None).await
    }

    async fn write(&self, id: &str, value: Option<&[u8]>) -> Result<(), MeetingsTopicError> {
        let failed = |reason: String| MeetingsTopicError::NotDelivered { topic: self.topic.clone(), reason };
        let (ack, acked) = oneshot::channel();
        let mut record: BaseRecord<'_, str, [u8], _> =
            BaseRecord::with_opaque_to(&self.topic, Box::new(std::sync::Mutex::new(Some(ack)))).key(id);
        if let Some(value) = value {
            record = record.payload(value);
        }
        self.producer.send(record).map_err(|(e, _)| failed(e.to_string()))?;
        let (partition, offset) = match tokio::time::timeout(WRITE_TIMEOUT + Duration::from_secs(1), acked).await {
            Ok(Ok(Ok(at))) => at,
            Ok(Ok(Err(reason))) => return Err(failed(reason)),
            Ok(Err(_)) | Err(_) => return Err(failed("no delivery report".into())),
        };
        let mut read = self.read.clone();
        let applied = read.wait_for(|r| r.next.get(&partition).is_some_and(|next| *next > offset));
        match tokio::time::timeout(WRITE_TIMEOUT, applied).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(MeetingsTopicError::NotReadBack { topic: self.topic.clone(), secs: WRITE_TIMEOUT.as_secs() }),
        }
    }
}

impl Drop for MeetingsTopic {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The reader thread's state.
struct Reader {
    config: KafkaConfig,
    topic: String,
    readiness: Arc<SharedReadiness>,
    max_meetings: usize,
    rejected: prometheus::IntCounter,
    report: watch::Sender<ReadUpTo>,
    stopping: Arc<AtomicBool>,
}

impl Reader {
    fn run(self) {
        let mut said = None::<Instant>;
        let mut complain = |message: String| {
            if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                tracing::error!(topic = %self.topic, "meetings topic: {message}");
                said = Some(Instant::now());
            }
        };
        while !self.stopping.load(Ordering::Acquire) {
            match self.assign() {
                Ok((consumer, ends)) => return self.read(&consumer, ends),
                Err(message) => complain(message),
            }
            std::thread::sleep(RETRY);
        }
    }

    /// A consumer assigned every partition of the topic from the beginning, and each
    /// partition's end now (what must be read before this instance is ready).
    fn assign(&self) -> Result<(BaseConsumer, HashMap<i32, i64>), String> {
        // Assigned by hand, never committed: every start reads the whole topic.
        let missing = "create it with cleanup.policy=compact (docs/operations.md)";
        let consumer = crate::kafka_client::whole_topic_reader(&self.config, &self.topic, "meetings", missing, |_| Offset::Beginning)?;
        let assigned = consumer.assignment().map_err(|e| format!("cannot read its assignment: {e}"))?;
        let mut ends = HashMap::new();
        for p in assigned.elements().iter().map(|e| e.partition()) {
            let (_, high) =
                consumer.fetch_watermarks(&self.topic, p, Duration::from_secs(10)).map_err(|e| format!("partition {p}: {e}"))?;
            ends.insert(p, high);
        }
        Ok((consumer, ends))
    }

    fn read(&self, consumer: &BaseConsumer, ends: HashMap<i32, i64>) {
        let mut up_to = ReadUpTo::default();
        let loaded = |up_to: &mut ReadUpTo| {
            if !up_to.loaded && ends.iter().all(|(p, end)| *end <= 0 || up_to.next.get(p).is_some_and(|n| n >= end)) {
                up_to.loaded = true;
                tracing::info!(topic = %self.topic, meetings = self.readiness.meetings.read().expect("meetings lock").len(), "meetings topic read");
            }
        };
        loaded(&mut up_to);
        self.report.send_replace(up_to.clone());
        while !self.stopping.load(Ordering::Acquire) {
            let Some(result) = consumer.poll(Duration::from_millis(200)) else { continue };
            let message = match result {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(topic = %self.topic, "meetings topic: {e}");
                    continue;
                }
            };
            if let Err(reason) = self.apply(message.key(), message.payload()) {
                self.rejected.inc();
                tracing::warn!(topic = %self.topic, offset = message.offset(), "meetings topic: record skipped: {reason}");
            }
            up_to.next.insert(message.partition(), message.offset() + 1);
            loaded(&mut up_to);
            self.report.send_replace(up_to.clone());
        }
    }

    /// Applies one record: a meeting, or a tombstone that deletes one.
    fn apply(&self, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<(), String> {
        let id = key.and_then(|k| std::str::from_utf8(k).ok()).ok_or("no meeting id as its key")?;
        let Some(value) = value.filter(|v| !v.is_empty()) else {
            return match self.readiness.remove_meeting(id) {
                crate::readiness::Removal::Scheduled => Err(format!("meeting {id:?} is in the schedule file, not deleted")),
                _ => Ok(()),
            };
        };
        let spec: MeetingSpec = serde_json::from_slice(value).map_err(|e| format!("meeting {id:?}: {e}"))?;
        if spec.id != id {
            return Err(format!("key {id:?} but the meeting's id is {:?}", spec.id));
        }
        self.readiness.put_shared_meeting(spec, self.max_meetings)
    }
}
