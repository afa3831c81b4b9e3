//! The Kafka source: one consumer of a consumer group, polled on its own thread.
//!
//! The thread polls librdkafka, cuts the messages into one [`SourceBatch`] per partition per
//! micro-batch (no task or channel hop per message) and hands them to the pipeline over a
//! bounded queue. When the queue is full it pauses its partitions (back-pressure; memory stays
//! bounded) and resumes them once the pipeline has caught up.
//!
//! Rebalances are synchronous with the pipeline: on revocation the thread waits until the
//! pipeline has checkpointed the revoked partitions and the covering offsets are committed; on
//! assignment each partition starts at its checkpoint's offset, and the pipeline restores its
//! state before the partition's first batch arrives (the queue keeps the order).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, consumer::RebalanceProtocol};
use tokio::sync::mpsc;

use crate::checkpoint::{CheckpointStore, PartitionKey};
use crate::config::KafkaConfig;
use crate::metrics::PipelineMetrics;
use crate::types::{EventTime, Format};
use crate::types::{Messages, PartitionId, SourceBatch};

/// What the consumer thread tells the pipeline, in order.
#[derive(Debug)]
pub enum KafkaEvent {
    /// Partitions now owned: restore them from their checkpoints before their first batch.
    Assigned(Vec<(PartitionId, PartitionKey)>),
    /// Micro-batches, one per partition.
    Batches(Vec<SourceBatch>),
    /// Partitions about to be released: checkpoint them, drop their state and reply with the
    /// offsets to commit. The consumer waits for the reply before it lets them go.
    Revoked { partitions: Vec<(PartitionId, PartitionKey)>, reply: std_mpsc::SyncSender<Vec<(PartitionKey, i64)>> },
}

/// Where a partition stands at the broker, from librdkafka's statistics (every 5 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionEnd {
    /// The offset after the last message a consumer may read (the last stable offset).
    pub end: i64,
    /// The group's committed offset; negative when none.
    pub committed: i64,
}

/// The partitions' ends, written by the statistics callback, read by the driver.
type PartitionEnds = Arc<Mutex<HashMap<PartitionKey, PartitionEnd>>>;

/// The partition id the window stage sees: topic index and partition number.
pub fn partition_id(topic_index: usize, partition: i32) -> PartitionId {
    ((topic_index as u32) << 16) | (partition as u32 & 0xffff)
}

/// How often an ongoing broker outage is mentioned again in the log.
const BROKER_DOWN_REMINDER: Duration = Duration::from_secs(60);

/// A failure to start the consumer, naming what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("kafka: {0}")]
pub struct KafkaError(String);

/// Whether the brokers answer, said in the log once per outage and then reminded once a
/// minute: librdkafka retries every connection every few seconds and reports each failure.
pub struct BrokerHealth {
    brokers: String,
    gauge: prometheus::IntGauge,
    reminder: Duration,
    state: std::sync::Mutex<HealthState>,
}

#[derive(Default)]
struct HealthState {
    /// None until the first connection or failure.
    up: Option<bool>,
    down_since: Option<Instant>,
    last_report: Option<Instant>,
    /// Failures since the last line about them.
    failures: u64,
    /// The latest failure of one broker's connection (the cause behind "all brokers down").
    last_failure: Option<String>,
}

impl BrokerHealth {
    pub fn new(brokers: &str, gauge: prometheus::IntGauge, reminder: Duration) -> Self {
        gauge.set(0);
        Self { brokers: brokers.to_string(), gauge, reminder, state: Default::default() }
    }

    /// One broker's connection failed: in a cluster the others may serve, and librdkafka
    /// reconnects by itself, so this is only remembered (and logged at debug) as the likely
    /// cause should every broker be down.
    pub fn failure(&self, reason: &str) {
        tracing::debug!(target: "librdkafka", "{reason}");
        let mut st = self.state.lock().expect("broker health lock");
        st.failures += 1;
        st.last_failure = Some(reason.to_string());
    }

    /// No broker can be reached: an ERROR on the first report, then a reminder at most every
    /// `reminder`. Returns the line logged, if any.
    pub fn down(&self, reason: &str, now: Instant) -> Option<String> {
        let mut st = self.state.lock().expect("broker health lock");
        st.failures += 1;
        let cause = st.last_failure.as_deref().map_or_else(String::new, |f| format!(" (latest failure: {f})"));
        let line = if st.up != Some(false) {
            st.up = Some(false);
            st.down_since = Some(now);
            format!(
                "cannot reach the Kafka brokers of kafka.brokers ({}): {reason}{cause}; retrying (a reminder every {} s while it lasts)",
                self.brokers,
                self.reminder.as_secs()
            )
        } else if st.last_report.is_none_or(|t| now.saturating_duration_since(t) >= self.reminder) {
            let down = st.down_since.map_or(0, |t| now.saturating_duration_since(t).as_secs());
            format!(
                "still cannot reach the Kafka brokers of kafka.brokers ({}) after {down} s: {reason}{cause}; {} failures since the last message",
                self.brokers, st.failures
            )
        } else {
            tracing::debug!(target: "librdkafka", "{reason}");
            return None;
        };
        st.last_report = Some(now);
        st.failures = 0;
        self.gauge.set(0);
        tracing::error!("{line}");
        Some(line)
    }

    /// A broker answered. Returns the line logged when this ends an outage.
    pub fn up(&self, now: Instant) -> Option<String> {
        let mut st = self.state.lock().expect("broker health lock");
        if st.up == Some(true) {
            return None;
        }
        let was_down = st.up == Some(false);
        let down = st.down_since.map_or(0, |t| now.saturating_duration_since(t).as_secs());
        *st = HealthState { up: Some(true), ..Default::default() };
        self.gauge.set(1);
        if !was_down {
            return None;
        }
        let line = format!("the Kafka brokers of kafka.brokers ({}) answer again after {down} s", self.brokers);
        tracing::info!("{line}");
        Some(line)
    }

    pub fn is_down(&self) -> bool {
        self.state.lock().expect("broker health lock").up == Some(false)
    }
}

/// Whether an error is about reaching brokers (as opposed to a problem of one request).
fn is_connectivity(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(code, C::BrokerTransportFailure | C::AllBrokersDown | C::Resolve | C::NetworkException | C::BrokerNotAvailable)
}

/// Routes a connectivity error: all brokers down is an outage, anything else one broker's.
fn report_connectivity(health: &BrokerHealth, code: rdkafka::types::RDKafkaErrorCode, reason: &str) {
    if code == rdkafka::types::RDKafkaErrorCode::AllBrokersDown {
        health.down(reason, Instant::now());
    } else {
        health.failure(reason);
    }
}

/// Lets through the first of a kind of librdkafka log line, then one a minute with the count
/// of those held back: a misconfiguration repeats the same line on every retry.
#[derive(Default)]
struct LogLimiter {
    last: std::sync::Mutex<HashMap<String, (Instant, u64)>>,
}

impl LogLimiter {
    const EVERY: Duration = Duration::from_secs(60);

    /// Whether to log a line of `kind` now, and how many were held back since the last one.
    fn allow(&self, kind: &str, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().expect("log limiter lock");
        match last.get_mut(kind) {
            Some((at, held)) if now.saturating_duration_since(*at) < Self::EVERY => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let n = *held;
                (*at, *held) = (now, 0);
                Some(n)
            }
            None => {
                last.insert(kind.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

struct Context {
    topics: HashMap<String, usize>,
    health: Arc<BrokerHealth>,
    limiter: LogLimiter,
    store: CheckpointStore,
    events: mpsc::Sender<KafkaEvent>,
    metrics: Arc<PipelineMetrics>,
    /// Counts revocations: messages polled before one and not yet handed over are dropped.
    revocations: AtomicU64,
    stopping: Arc<AtomicBool>,
    /// Each partition's end and committed offset, from the statistics.
    ends: PartitionEnds,
}

impl Context {
    fn keyed(&self, tpl: &TopicPartitionList) -> Vec<(PartitionId, PartitionKey)> {
        tpl.elements()
            .iter()
            .filter_map(|e| {
                let index = *self.topics.get(e.topic())?;
                Some((partition_id(index, e.partition()), PartitionKey { topic: e.topic().to_string(), partition: e.partition() }))
            })
            .collect()
    }
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        // Bootstrap entries and learned brokers alike: one connected broker is enough to go on.
        if statistics.brokers.values().any(|b| b.state == "UP") {
            self.health.up(Instant::now());
        } else if !statistics.brokers.is_empty() {
            let states: Vec<String> = statistics.brokers.values().map(|b| format!("{} {}", b.name, b.state)).collect();
            self.health.down(&format!("no broker connected ({})", states.join(", ")), Instant::now());
        }
        let mut ends = self.ends.lock().expect("partition ends lock");
        for (name, topic) in &statistics.topics {
            for (p, partition) in &topic.partitions {
                if *p >= 0 && partition.consumer_lag >= 0 {
                    self.metrics.kafka.consumer_lag.with_label_values(&[name, &p.to_string()]).set(partition.consumer_lag);
                }
                // With read_committed (librdkafka's default) a consumer reads up to the last
                // stable offset; without transactions it equals the high watermark.
                let end = if partition.ls_offset >= 0 { partition.ls_offset } else { partition.hi_offset };
                if *p >= 0 && end >= 0 {
                    let key = PartitionKey { topic: name.clone(), partition: *p };
                    ends.insert(key, PartitionEnd { end, committed: partition.committed_offset });
                }
            }
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if let Some(code) = error.rdkafka_error_code().filter(|c| is_connectivity(*c)) {
            report_connectivity(&self.health, code, reason);
        } else if let Some(held) = self.limiter.allow(&format!("error {error}"), Instant::now()) {
            tracing::error!(target: "librdkafka", held_back = held, "{error}: {reason}");
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let serious = matches!(
            level,
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning
        );
        if serious && fac == "FAIL" {
            // One broker's connection; the error callback says when all are down.
            self.health.failure(log_message);
            return;
        }
        if serious && self.health.is_down() {
            // Consequences of the outage already reported (session timeouts, failed commits).
            tracing::debug!(target: "librdkafka", fac, "{log_message}");
            return;
        }
        if serious {
            match self.limiter.allow(fac, Instant::now()) {
                None => {
                    tracing::debug!(target: "librdkafka", fac, "{log_message}");
                    return;
                }
                Some(held) if held > 0 => {
                    tracing::warn!(target: "librdkafka", fac, held_back = held, "{held} similar librdkafka messages held back in the last minute")
                }
                Some(_) => {}
            }
        }
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!(target: "librdkafka", fac, "{log_message}"),
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }
}

impl Context {
    /// A failed commit: expected while the brokers are away (said once, by the health), a
    /// warning otherwise, at most once a minute.
    fn commit_failed(&self, e: &rdkafka::error::KafkaError) {
        if self.health.is_down() || e.rdkafka_error_code().is_some_and(is_connectivity) {
            tracing::debug!("offset commit failed while the brokers are unreachable: {e}");
        } else if let Some(held) = self.limiter.allow("commit", Instant::now()) {
            tracing::warn!(held_back = held, "offset commit failed (the checkpoint still holds the offsets): {e}");
        }
    }
}

impl ConsumerContext for Context {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // An assignment comes from the group coordinator: a broker answers.
                self.health.up(Instant::now());
                let partitions = self.keyed(tpl);
                for (_, key) in &partitions {
                    match self.store.next_offset(key) {
                        Ok(Some(offset)) => {
                            if let Err(e) = tpl.set_partition_offset(&key.topic, key.partition, Offset::Offset(offset)) {
                                tracing::error!(partition = %key, "cannot start at the checkpoint's offset: {e}");
                            }
                        }
                        Ok(None) => {}
                        Err(e) => tracing::error!(partition = %key, "{e}; starting at the committed offset"),
                    }
                }
                self.metrics.kafka.rebalances.with_label_values(&["assigned"]).inc_by(partitions.len() as u64);
                tracing::info!(partitions = ?partitions.iter().map(|(_, k)| k.to_string()).collect::<Vec<_>>(), "partitions assigned");
                // The pipeline restores state before any batch of these partitions (queue order).
                if self.events.blocking_send(KafkaEvent::Assigned(partitions)).is_err() {
                    self.stopping.store(true, Ordering::Release);
                }
                let result = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                if let Err(e) = result {
                    tracing::error!("assign failed: {e}");
                }
                // librdkafka keeps a partition's pause flag while it is not assigned, and a resume
                // issued then (the poller resumes what it paused once the pipeline catches up)
                // may not reach it: a partition paused before a rebalance would never fetch
                // again once assigned (seen on a loaded CI machine). Whatever was paused before,
                // an assigned partition starts fetching; the poller pauses it again if need be.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::warn!("cannot resume the assigned partitions: {e}");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let partitions = self.keyed(tpl);
                self.revocations.fetch_add(1, Ordering::AcqRel);
                self.metrics.kafka.rebalances.with_label_values(&["revoked"]).inc_by(partitions.len() as u64);
                tracing::info!(partitions = ?partitions.iter().map(|(_, k)| k.to_string()).collect::<Vec<_>>(), "partitions revoked: checkpointing them");
                let (reply, offsets) = std_mpsc::sync_channel(1);
                if self.events.blocking_send(KafkaEvent::Revoked { partitions, reply }).is_ok() {
                    // Wait for the checkpoint (bounded: the group cannot wait forever).
                    match offsets.recv_timeout(Duration::from_secs(120)) {
                        Ok(offsets) if !offsets.is_empty() => {
                            // Asynchronous: a synchronous commit inside the rebalance callback waits
                            // on the rebalance itself. The checkpoint is what the next owner reads.
                            if let Err(e) = consumer.commit(&offset_list(&offsets), CommitMode::Async) {
                                tracing::warn!("commit on revocation failed (the checkpoint still holds the offsets): {e}");
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tracing::error!("the pipeline did not checkpoint the revoked partitions in time"),
                    }
                }
                let result = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
                if let Err(e) = result {
                    tracing::error!("unassign failed: {e}");
                }
            }
            other => tracing::error!("rebalance error: {other:?}"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            self.commit_failed(&e);
        }
    }
}

fn offset_list(offsets: &[(PartitionKey, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (key, offset) in offsets {
        // Ignoring the error: only an invalid offset fails, and checkpointed offsets are valid.
        let _ = tpl.add_partition_offset(&key.topic, key.partition, Offset::Offset(*offset));
    }
    tpl
}

/// A running consumer; dropping it stops the thread.
pub struct KafkaSource {
    consumer: Arc<BaseConsumer<Context>>,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    ends: PartitionEnds,
}

impl KafkaSource {
    /// Starts the consumer thread; events arrive on the returned receiver.
    pub fn start(
        config: &KafkaConfig,
        store: CheckpointStore,
        metrics: Arc<PipelineMetrics>,
    ) -> Result<(Self, mpsc::Receiver<KafkaEvent>), KafkaError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group_id)
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "5000")
            .set("partition.assignment.strategy", "range");
        for (k, v) in &config.properties {
            client.set(k, v);
        }
        // Offsets are committed only after the checkpoint that covers them.
        client.set("enable.auto.commit", "false").set("enable.auto.offset.store", "false");
        client.set_log_level(RDKafkaLogLevel::Info);
        let (events, receiver) = mpsc::channel(config.max_queued_batches.max(1));
        let ends = PartitionEnds::default();
        let stopping = Arc::new(AtomicBool::new(false));
        let topics: HashMap<String, usize> = config.topics.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let formats: Vec<(Format, EventTime)> = config.topics.iter().map(|t| (t.format, t.event_time)).collect();
        metrics.register_kafka_broker_up();
        let health = Arc::new(BrokerHealth::new(&config.brokers, metrics.kafka.broker_up.clone(), BROKER_DOWN_REMINDER));
        let context = Context {
            topics,
            health,
            limiter: LogLimiter::default(),
            store,
            events: events.clone(),
            metrics: metrics.clone(),
            revocations: AtomicU64::new(0),
            stopping: stopping.clone(),
            ends: ends.clone(),
        };
        let consumer: BaseConsumer<Context> =
            client.create_with_context(context).map_err(|e| KafkaError(format!("cannot create the consumer: {e}")))?;
        let names: Vec<&str> = config.topics.iter().map(|t| t.name.as_str()).collect();
        consumer.subscribe(&names).map_err(|e| KafkaError(format!("cannot subscribe to {}: {e}", names.join(", "))))?;
        let consumer = Arc::new(consumer);
        let poller = Poller {
            consumer: consumer.clone(),
            events,
            formats,
            metrics,
            max_messages: config.batch_max_messages,
            max_bytes: config.batch_max_bytes,
            linger: Duration::from_millis(config.batch_linger_ms),
            stopping: stopping.clone(),
            delivered: Default::default(),
            paused: Default::default(),
        };
        let thread = std::thread::Builder::new()
            .name("kafka-consumer".into())
            .spawn(move || poller.run())
            .map_err(|e| KafkaError(format!("cannot start the consumer thread: {e}")))?;
        Ok((Self { consumer, stopping, thread: Some(thread), ends }, receiver))
    }

    /// Where `partition` stands at the broker, once librdkafka's statistics have reported it.
    pub fn partition_end(&self, partition: &PartitionKey) -> Option<PartitionEnd> {
        self.ends.lock().expect("partition ends lock").get(partition).copied()
    }

    /// Commits offsets covered by a checkpoint (asynchronously: the checkpoint is the truth).
    pub fn commit(&self, offsets: &[(PartitionKey, i64)]) {
        if offsets.is_empty() {
            return;
        }
        if let Err(e) = self.consumer.commit(&offset_list(offsets), CommitMode::Async) {
            self.consumer.context().commit_failed(&e);
        }
    }

    /// Stops polling and leaves the group. Call after the final checkpoint.
    pub fn stop(mut self, final_offsets: &[(PartitionKey, i64)]) {
        self.stopping.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if !final_offsets.is_empty()
            && let Err(e) = self.consumer.commit(&offset_list(final_offsets), CommitMode::Sync)
        {
            tracing::warn!("final offset commit failed (the checkpoint still holds the offsets): {e}");
        }
        self.consumer.unsubscribe();
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
    }
}

/// The consumer thread.
struct Poller {
    consumer: Arc<BaseConsumer<Context>>,
    events: mpsc::Sender<KafkaEvent>,
    /// Format and event time of each topic.
    formats: Vec<(Format, EventTime)>,
    metrics: Arc<PipelineMetrics>,
    max_messages: usize,
    max_bytes: usize,
    linger: Duration,
    stopping: Arc<AtomicBool>,
    /// Per partition delivered since its assignment: the offset after the last delivered
    /// message; and the revocation count that assignment belongs to. Only these partitions are
    /// paused, and on resume each is sought back to exactly that offset, so that no prefetched
    /// message is skipped however librdkafka handled its fetch queue during the pause.
    delivered: std::cell::RefCell<(Positions, u64)>,
    /// Partitions paused for back-pressure, resumed together whatever rebalances came in
    /// between: librdkafka keeps a partition's pause through a revocation and re-assignment, so
    /// a partition paused before a rebalance and assigned again after it would never fetch again.
    paused: std::cell::RefCell<Vec<(String, i32)>>,
}

/// Next offset per (topic, partition).
type Positions = HashMap<(String, i32), i64>;

fn partition_list(partitions: &[(String, i32)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in partitions {
        tpl.add_partition(topic, *partition);
    }
    tpl
}

/// Messages being collected for one partition.
struct Pending {
    key: PartitionKey,
    format: Format,
    event_time: EventTime,
    messages: Messages,
    offsets: Vec<i64>,
}

impl Poller {
    fn run(self) {
        // Batches polled but not yet handed over, and the revocation count when they were polled.
        let mut held: Option<(Vec<SourceBatch>, u64)> = None;
        let mut paused = false;
        while !self.stopping.load(Ordering::Acquire) {
            let generation = self.generation();
            if held.as_ref().is_some_and(|(_, g)| *g != generation) {
                // Not processed, so not covered by the checkpoint: the next owner reads them again.
                held = None;
                tracing::debug!("dropped a held batch of revoked partitions");
            }
            if let Some((batches, generation)) = held.take() {
                match self.events.try_send(KafkaEvent::Batches(batches)) {
                    Ok(()) => {
                        self.metrics.kafka.queued_batches.set(self.queued());
                        if paused {
                            self.set_paused(false);
                            paused = false;
                        }
                    }
                    Err(mpsc::error::TrySendError::Full(KafkaEvent::Batches(b))) => {
                        if !paused {
                            self.set_paused(true);
                            paused = true;
                        }
                        // Keep serving the group (heartbeats, rebalances) while paused.
                        held = match self.collect(Duration::from_millis(50), 1, usize::MAX) {
                            Some((extra, g)) if g == generation => Some((b.into_iter().chain(extra).collect(), generation)),
                            // A revocation came in between: the held batch is stale, the new one is not.
                            Some((extra, g)) => Some((extra, g)),
                            None => Some((b, generation)),
                        };
                        continue;
                    }
                    Err(_) => return,
                }
            }
            held = self.collect(self.linger, self.max_messages, self.max_bytes);
        }
    }

    fn generation(&self) -> u64 {
        self.consumer.context().revocations.load(Ordering::Acquire)
    }

    fn queued(&self) -> i64 {
        (self.events.max_capacity() - self.events.capacity()) as i64
    }

    fn set_paused(&self, pause: bool) {
        let (delivered, generation) = &*self.delivered.borrow();
        let current = *generation == self.generation();
        if pause {
            // Revoked partitions since the last delivery need no pause; the others are recorded.
            let mut paused = self.paused.borrow_mut();
            if current {
                let new: Vec<_> = delivered.keys().filter(|k| !paused.contains(k)).cloned().collect();
                paused.extend(new);
            }
            let tpl = partition_list(&paused);
            if let Err(e) = self.consumer.pause(&tpl) {
                tracing::warn!("cannot pause partitions: {e}");
            }
            self.metrics.kafka.paused.set(1);
            self.metrics.kafka.pauses.inc();
            tracing::debug!(partitions = tpl.count(), "pipeline behind: partitions paused");
            return;
        }
        // Every partition this consumer paused is resumed, assigned now or not (resuming an
        // unassigned partition only clears its flag).
        let paused = std::mem::take(&mut *self.paused.borrow_mut());
        if let Err(e) = self.consumer.resume(&partition_list(&paused)) {
            tracing::warn!("cannot resume partitions: {e}");
        }
        self.metrics.kafka.paused.set(0);
        if current {
            let mut positions = TopicPartitionList::new();
            for ((topic, partition), next) in delivered.iter().filter(|(k, _)| paused.contains(k)) {
                // Ignoring the error: only an invalid offset fails, and these come from messages.
                let _ = positions.add_partition_offset(topic, *partition, Offset::Offset(*next));
            }
            if positions.count() > 0
                && let Err(e) = self.consumer.seek_partitions(positions, Duration::from_secs(10))
            {
                tracing::warn!("cannot seek resumed partitions to their positions: {e}");
            }
        }
    }

    /// Records the offset after the last message handed over from a partition.
    fn mark_delivered(&self, key: &PartitionKey, last_offset: i64, generation: u64) {
        let mut d = self.delivered.borrow_mut();
        if d.1 != generation {
            *d = (HashMap::new(), generation);
        }
        d.0.insert((key.topic.clone(), key.partition), last_offset + 1);
    }

    /// Polls for up to `linger`, `max` messages or `max_bytes` of payload; returns one batch per
    /// partition, and the revocation count they belong to.
    fn collect(&self, linger: Duration, max: usize, max_bytes: usize) -> Option<(Vec<SourceBatch>, u64)> {
        let deadline = Instant::now() + linger;
        let mut generation = self.generation();
        let mut pending: Vec<Pending> = Vec::new();
        let (mut count, mut bytes) = (0, 0);
        while count < max && bytes < max_bytes {
            let now = Instant::now();
            let wait = if count == 0 { deadline.saturating_duration_since(now) } else { Duration::ZERO };
            let Some(result) = self.consumer.poll(wait) else {
                if count > 0 && Instant::now() < deadline {
                    // Nothing ready right now: wait a little for more, up to the linger.
                    std::thread::sleep(Duration::from_millis(1).min(deadline.saturating_duration_since(Instant::now())));
                    continue;
                }
                break;
            };
            if self.generation() != generation {
                // A revocation ran inside poll: what was collected belongs to released partitions.
                generation = self.generation();
                pending.clear();
                (count, bytes) = (0, 0);
            }
            let msg = match result {
                Ok(m) => m,
                Err(e) => {
                    let context = self.consumer.context();
                    if let Some(code) = e.rdkafka_error_code().filter(|c| is_connectivity(*c)) {
                        report_connectivity(&context.health, code, &e.to_string());
                    } else if let Some(held) = context.limiter.allow(&format!("poll {e}"), Instant::now()) {
                        tracing::warn!(held_back = held, "kafka: {e}");
                    }
                    break;
                }
            };
            let Some(&index) = self.consumer.context().topics.get(msg.topic()) else { continue };
            let i = match pending.iter().position(|p| p.key.partition == msg.partition() && p.key.topic == msg.topic()) {
                Some(i) => i,
                None => {
                    pending.push(Pending {
                        key: PartitionKey { topic: msg.topic().to_string(), partition: msg.partition() },
                        format: self.formats[index].0,
                        event_time: self.formats[index].1,
                        messages: Messages::with_capacity(max.min(4096), 64 * 1024),
                        offsets: Vec::new(),
                    });
                    pending.len() - 1
                }
            };
            let p = &mut pending[i];
            let payload = msg.payload().unwrap_or_default();
            p.messages.push(payload);
            p.offsets.push(msg.offset());
            count += 1;
            bytes += payload.len();
            if Instant::now() >= deadline {
                break;
            }
        }
        if pending.is_empty() {
            return None;
        }
        self.consumer.context().health.up(Instant::now());
        // Once per partition and batch, not per message.
        for p in &pending {
            self.mark_delivered(&p.key, *p.offsets.last().expect("pending partitions hold a message"), generation);
        }
        let received = Instant::now();
        let topics = &self.consumer.context().topics;
        Some((
            pending
                .into_iter()
                .map(|p| SourceBatch {
                    partition: partition_id(topics[&p.key.topic], p.key.partition),
                    format: p.format,
                    event_time: p.event_time,
                    messages: p.messages,
                    received,
                    offsets: p.offsets,
                })
                .collect(),
            generation,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_one_error_then_a_reminder_a_minute_and_one_line_when_it_ends() {
        let gauge = prometheus::IntGauge::new("up", "up").unwrap();
        let health = BrokerHealth::new("kafka-1:9092", gauge.clone(), Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(health.up(t0), None, "the first connection is no news");
        assert_eq!(gauge.get(), 1);
        health.failure("kafka-1:9092/1: Connect to ipv4#10.0.0.1:9092 failed: Connection refused");
        assert_eq!(gauge.get(), 1, "one broker's connection failing is no outage");
        let first = health.down("1/1 brokers are down", t0).expect("the first failure is logged");
        assert!(first.contains("kafka.brokers (kafka-1:9092): 1/1 brokers are down") && first.contains("Connection refused"), "{first}");
        assert_eq!(gauge.get(), 0);
        // librdkafka retries every second or so: silence until the reminder is due.
        let quiet = (1..60).filter_map(|s| health.down("1/1 brokers are down", t0 + Duration::from_secs(s))).count();
        assert_eq!(quiet, 0);
        let reminder = health.down("1/1 brokers are down", t0 + Duration::from_secs(60)).expect("a reminder after a minute");
        assert!(reminder.contains("still") && reminder.contains("after 60 s") && reminder.contains("60 failures"), "{reminder}");
        let back = health.up(t0 + Duration::from_secs(75)).expect("the end of the outage is logged");
        assert!(back.contains("after 75 s"), "{back}");
        assert_eq!((gauge.get(), health.up(t0 + Duration::from_secs(76))), (1, None));
    }

    #[test]
    fn repeated_librdkafka_lines_pass_once_a_minute_with_a_count() {
        let limiter = LogLimiter::default();
        let t0 = Instant::now();
        assert_eq!(limiter.allow("SASL", t0), Some(0));
        assert_eq!(limiter.allow("SASL", t0 + Duration::from_secs(1)), None);
        assert_eq!(limiter.allow("SSL", t0 + Duration::from_secs(1)), Some(0), "kinds are limited apart");
        assert_eq!(limiter.allow("SASL", t0 + Duration::from_secs(30)), None);
        assert_eq!(limiter.allow("SASL", t0 + Duration::from_secs(61)), Some(2));
    }
}
