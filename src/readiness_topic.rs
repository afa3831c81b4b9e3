//! Verdicts shared by the site-stage instances of a scale-out (`scale_out.readiness_topic`).
//!
//! Each site-stage instance judges only the sites of its internal partitions. After every
//! evaluation it writes their verdicts to a compacted topic (key: the site id; value: the site's
//! entry as `/api/readiness` shows it) and it reads everyone's from the beginning, so that
//! `/api/readiness` answers for every site from any instance. A site that moves to another
//! instance is simply written by its new owner.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, DefaultConsumerContext};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::Offset;

use crate::config::KafkaConfig;
use crate::kafka_client;
use crate::readiness::{SharedReadiness, SiteReadiness};
use crate::sink::WindowSink;

/// The readiness topic: a producer of this instance's verdicts (a window sink) and a thread
/// reading everyone's into [`SharedReadiness`].
pub struct ReadinessTopic {
    topic: String,
    producer: ThreadedProducer<DefaultProducerContext>,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// When a verdict was last dropped (the local queue full), to say so once a minute.
    dropped_said: Option<Instant>,
    readiness: Arc<SharedReadiness>,
    /// What was last written per site: a verdict is written again only when it changed.
    sent: std::collections::HashMap<String, Vec<u8>>,
}

impl ReadinessTopic {
    /// Checks that `topic` exists, then starts reading it into `readiness`.
    pub fn start(config: &KafkaConfig, topic: &str, readiness: Arc<SharedReadiness>) -> Result<Self, String> {
        let setup = |m: String| format!("scale_out.readiness_topic {topic:?}: {m}");
        let producer = kafka_client::producer(config).map_err(setup)?;
        let missing = "create it with cleanup.policy=compact (docs/operations.md)";
        let consumer = kafka_client::whole_topic_reader(config, topic, "readiness", missing, |_| Offset::Beginning).map_err(setup)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let name = topic.to_string();
        let shared = readiness.clone();
        let thread = std::thread::Builder::new()
            .name("readiness-topic".into())
            .spawn(move || read(&consumer, &name, &shared, &stop))
            .map_err(|e| setup(format!("cannot start the reader thread: {e}")))?;
        tracing::info!(topic, "site stage: verdicts shared through the readiness topic");
        Ok(Self {
            topic: topic.to_string(),
            producer,
            stopping,
            thread: Some(thread),
            dropped_said: None,
            readiness,
            sent: Default::default(),
        })
    }

    /// Writes the verdicts among `sites` that changed since they were last written.
    fn write(&mut self, sites: &[SiteReadiness]) {
        for s in sites {
            let value = serde_json::to_vec(s).expect("a verdict serialises");
            if self.sent.get(&s.site) == Some(&value) {
                continue;
            }
            let record: BaseRecord<'_, str, [u8]> = BaseRecord::to(&self.topic).key(s.site.as_str()).payload(value.as_slice());
            match self.producer.send(record) {
                Ok(()) => {
                    self.sent.insert(s.site.clone(), value);
                }
                // Not worth holding the pipeline for: the next evaluation or tick tries again.
                Err((e, _)) => {
                    if self.dropped_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!(topic = %self.topic, "readiness topic: a verdict not queued: {e}");
                        self.dropped_said = Some(Instant::now());
                    }
                }
            }
        }
    }
}

/// Reads every record until `stopping`: a site's latest verdict, or a tombstone.
fn read(consumer: &BaseConsumer<DefaultConsumerContext>, topic: &str, readiness: &SharedReadiness, stopping: &AtomicBool) {
    while !stopping.load(Ordering::Acquire) {
        let Some(result) = consumer.poll(Duration::from_millis(200)) else { continue };
        let message = match result {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(topic, "readiness topic: {e}");
                continue;
            }
        };
        let Some(site) = message.key().and_then(|k| std::str::from_utf8(k).ok()) else { continue };
        match message.payload().filter(|p| !p.is_empty()).map(serde_json::from_slice::<SiteReadiness>) {
            None => {
                readiness.put_peer_verdict(site, None);
            }
            Some(Ok(v)) if v.site == site => {
                if !readiness.put_peer_verdict(site, Some(v)) {
                    tracing::warn!(topic, site, offset = message.offset(), "readiness topic: a site this inventory does not have, skipped");
                }
            }
            Some(Ok(_)) => {
                tracing::warn!(topic, site, offset = message.offset(), "readiness topic: the key is not the verdict's site, skipped")
            }
            Some(Err(e)) => tracing::warn!(topic, site, offset = message.offset(), "readiness topic: not a verdict, skipped: {e}"),
        }
    }
}

impl WindowSink for ReadinessTopic {
    /// Windows are not its business: the verdicts they lead to are.
    fn on_window(&mut self, _table: &'static crate::table::TableDef, _window: &crate::window::ClosedWindow) {}

    fn on_readiness(&mut self, _start_ns: i64, _end_ns: i64, sites: &[SiteReadiness]) {
        self.write(sites);
    }

    /// Verdicts also change without an evaluation (all `unknown` when the input stalls).
    fn on_tick(&mut self, _now: Instant) {
        let owned: Vec<SiteReadiness> = self.readiness.engine.read().expect("readiness lock").owned_latest().into_iter().cloned().collect();
        self.write(&owned);
    }
}

impl Drop for ReadinessTopic {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
