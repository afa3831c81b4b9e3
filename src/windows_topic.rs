//! Closed windows shared by the site-stage instances of a scale-out (`scale_out.windows_topic`),
//! so that SQL on any instance covers every site.
//!
//! Each site-stage instance publishes only the windows of its own sites. It writes every
//! window's rows as the history keeps them (a correction again, in full), and every readiness
//! evaluation, to this topic: key `<table>/<window start in ns>`, value one Arrow IPC stream,
//! header `siteflow-origin` naming the writing process. Every instance reads every partition
//! and files the other instances' rows into its own history with
//! [`History::replace_window`], which replaces the rows of that window *for the sites in the
//! message* only. Reading a message twice, or an instance's own rows after a restart (a new
//! origin), therefore changes nothing: the same sites' rows are replaced by the same rows.
//!
//! Where the history is on disk, the offsets read are saved with each flush, and a restart
//! reads on from there; in memory only, from the beginning of the topic (its retention bounds
//! that). Rows of a table this instance does not have, or with other columns (an upgrade in
//! progress), are skipped, logged and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{AsArray, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{cast, take_record_batch};
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use prometheus::{IntCounter, IntCounterVec};
use rdkafka::consumer::{BaseConsumer, DefaultConsumerContext};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::Offset;

use crate::config::KafkaConfig;
use crate::history::{History, READINESS_TABLE, readiness_rows, top_n};
use crate::kafka_client;
use crate::readiness::SiteReadiness;
use crate::sink::WindowSink;
use crate::table::TableDef;
use crate::window::ClosedWindow;

/// The header naming the process that wrote a message.
const ORIGIN: &str = "siteflow-origin";

/// Largest value written in one message; a larger window is split by site (Kafka's default
/// limit is 1 MB).
const MAX_MESSAGE_BYTES: usize = 900_000;

/// The windows topic: a producer of this instance's windows (a window sink) and a thread filing
/// everyone else's into the history.
pub struct WindowsTopic {
    topic: String,
    origin: String,
    producer: ThreadedProducer<DefaultProducerContext>,
    top_talkers: usize,
    written: IntCounter,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// When a write failure was last logged, to say so once a minute.
    failed_said: Option<Instant>,
}

impl WindowsTopic {
    /// Checks that `topic` exists, then starts reading it into `history`.
    /// `top_talkers`: conversations kept per site, direction and window (as the history keeps them).
    pub fn start(
        config: &KafkaConfig,
        topic: &str,
        history: History,
        top_talkers: usize,
        (written, read): (IntCounter, IntCounterVec),
    ) -> Result<Self, String> {
        let setup = |m: String| format!("scale_out.windows_topic {topic:?}: {m}");
        let producer = kafka_client::producer(config).map_err(setup)?;
        // After the offsets whose rows the history holds (saved with its flushes).
        let applied = history.applied_offsets(topic);
        let start = |p| applied.get(&p).map_or(Offset::Beginning, |o| Offset::Offset(o + 1));
        let missing = "create it (docs/operations.md, \"Two stages\")";
        let consumer = kafka_client::whole_topic_reader(config, topic, "windows", missing, start).map_err(setup)?;
        let origin = format!("{}-{}", std::process::id(), chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let reading = Reading { topic: topic.to_string(), origin: origin.clone(), history, read, said_skipped: Default::default() };
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("windows-topic".into())
            .spawn(move || reading.run(&consumer, &stop))
            .map_err(|e| setup(format!("cannot start the reader thread: {e}")))?;
        tracing::info!(topic, origin, "site stage: windows shared through the windows topic (SQL covers every site)");
        Ok(Self { topic: topic.to_string(), origin, producer, top_talkers, written, stopping, thread: Some(thread), failed_said: None })
    }

    /// Writes one window's rows of `table` (split by site if they are large).
    fn write(&mut self, table: &str, start_ns: i64, rows: &RecordBatch) {
        if rows.num_rows() == 0 {
            return;
        }
        let key = format!("{table}/{start_ns}");
        let mut parts = 1;
        let payloads = loop {
            match split_by_site(rows, parts).iter().map(encode).collect::<Result<Vec<_>, _>>() {
                Ok(p) if p.iter().all(|v| v.len() <= MAX_MESSAGE_BYTES) || parts >= rows.num_rows() => break p,
                Ok(p) => parts = (parts * 2).max(p.iter().map(Vec::len).max().unwrap_or(0).div_ceil(MAX_MESSAGE_BYTES / 2)),
                Err(e) => return self.failed(&key, &format!("cannot encode the rows: {e}")),
            }
        };
        for payload in payloads {
            let headers = OwnedHeaders::new().insert(Header { key: ORIGIN, value: Some(self.origin.as_str()) });
            let mut record: BaseRecord<'_, str, [u8]> =
                BaseRecord::to(&self.topic).key(key.as_str()).payload(payload.as_slice()).headers(headers);
            loop {
                match self.producer.send(record) {
                    Ok(()) => {
                        self.written.inc();
                        break;
                    }
                    // The local queue is full: wait for deliveries rather than drop a window.
                    Err((e, back)) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) => {
                        std::thread::sleep(Duration::from_millis(10));
                        record = back;
                    }
                    Err((e, _)) => {
                        self.failed(&key, &e.to_string());
                        break;
                    }
                }
            }
        }
    }

    fn failed(&mut self, key: &str, message: &str) {
        if self.failed_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            tracing::warn!(topic = %self.topic, key, "windows topic: a window not written (other instances' SQL misses it): {message}");
            self.failed_said = Some(Instant::now());
        }
    }
}

/// One Arrow IPC stream holding `rows`.
fn encode(rows: &RecordBatch) -> Result<Vec<u8>, datafusion::arrow::error::ArrowError> {
    let mut out = Vec::new();
    let mut w = StreamWriter::try_new(&mut out, &rows.schema())?;
    w.write(rows)?;
    w.finish()?;
    drop(w);
    Ok(out)
}

/// `rows` in `parts` batches, each site's rows in one of them (by a hash of the site).
fn split_by_site(rows: &RecordBatch, parts: usize) -> Vec<RecordBatch> {
    let sites = rows.column_by_name("site").and_then(|c| cast(c, &DataType::Utf8).ok());
    let Some(sites) = sites.filter(|_| parts > 1) else { return vec![rows.clone()] };
    let mut indices: Vec<Vec<u32>> = vec![Vec::new(); parts];
    for (i, site) in sites.as_string::<i32>().iter().enumerate() {
        let h = site.unwrap_or("").bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        indices[(h % parts as u64) as usize].push(i as u32);
    }
    indices
        .into_iter()
        .filter(|i| !i.is_empty())
        .map(|i| take_record_batch(rows, &UInt32Array::from(i)).expect("indices within the batch"))
        .collect()
}

/// The reader thread's state.
struct Reading {
    topic: String,
    origin: String,
    history: History,
    read: IntCounterVec,
    /// Tables already logged as skipped (said once each).
    said_skipped: std::collections::HashSet<String>,
}

impl Reading {
    fn run(mut self, consumer: &BaseConsumer<DefaultConsumerContext>, stopping: &AtomicBool) {
        while !stopping.load(Ordering::Acquire) {
            let Some(result) = consumer.poll(Duration::from_millis(200)) else { continue };
            let message = match result {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(topic = %self.topic, "windows topic: {e}");
                    continue;
                }
            };
            let outcome = self.apply(&message);
            self.read.with_label_values(&[outcome]).inc();
            self.history.note_applied(&self.topic, message.partition(), message.offset());
        }
    }

    /// Files one message's rows into the history; returns the outcome counted.
    fn apply(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) -> &'static str {
        let own = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == ORIGIN).and_then(|h| h.value))
            .is_some_and(|v| v == self.origin.as_bytes());
        if own {
            return "own";
        }
        let offset = message.offset();
        let key = message.key().and_then(|k| std::str::from_utf8(k).ok()).unwrap_or("");
        let Some((table, start_ns)) = key.split_once('/').and_then(|(t, s)| Some((t, s.parse::<i64>().ok()?))) else {
            tracing::warn!(topic = %self.topic, offset, key, "windows topic: not a <table>/<window start> key, skipped");
            return "rejected";
        };
        let rows = match decode(message.payload().unwrap_or_default()) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(topic = %self.topic, offset, key, "windows topic: not Arrow IPC rows, skipped: {e}");
                return "rejected";
            }
        };
        let fits = self.history.schema_of(table).is_some_and(|schema| {
            let normal = crate::history::normalise(&RecordBatch::new_empty(rows.schema())).schema();
            normal.fields().len() == schema.fields().len()
                && normal.fields().iter().zip(schema.fields()).all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type())
        });
        if !fits {
            if self.said_skipped.insert(table.to_string()) {
                tracing::warn!(
                    topic = %self.topic, offset, table,
                    "windows topic: rows of a table this instance does not have, or with other columns (another pipeline version?), skipped"
                );
            }
            return "rejected";
        }
        match self.history.replace_window(table, start_ns, &rows) {
            Ok(()) => "applied",
            Err(e) => {
                tracing::error!(topic = %self.topic, offset, table, "windows topic: filing another instance's window failed: {e:#}");
                "rejected"
            }
        }
    }
}

/// The rows of one message (one or more batches of one schema).
fn decode(payload: &[u8]) -> Result<RecordBatch, datafusion::arrow::error::ArrowError> {
    let reader = StreamReader::try_new(std::io::Cursor::new(payload), None)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    datafusion::arrow::compute::concat_batches(&schema, &batches)
}

impl WindowSink for WindowsTopic {
    fn on_window(&mut self, table: &'static TableDef, window: &ClosedWindow) {
        // The rows as this instance's history keeps them (a correction in full: it replaces).
        let rows = if table.top_talkers { top_n(&window.rows, self.top_talkers) } else { window.rows.clone() };
        self.write(table.sql_table, window.start_ns, &rows);
    }

    fn on_readiness(&mut self, start_ns: i64, end_ns: i64, sites: &[SiteReadiness]) {
        self.write(READINESS_TABLE, start_ns, &readiness_rows(start_ns, end_ns, sites));
    }
}

impl Drop for WindowsTopic {
    fn drop(&mut self) {
        // Windows published just before a shutdown reach the others too.
        if let Err(e) = self.producer.flush(Duration::from_secs(10)) {
            tracing::warn!(topic = %self.topic, "windows topic: windows not delivered at shutdown: {e}");
        }
        self.stopping.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
