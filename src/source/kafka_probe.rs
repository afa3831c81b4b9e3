//! `siteflow check --connect`: reaches the brokers, samples the newest messages of every
//! configured topic and says what siteflow would make of them: decoded or rejected (and why),
//! how many match a site, and, when most are rejected, which known format they are in.
//!
//! A wrong format, a missing topic or an unreachable broker otherwise shows only at run time,
//! as rejected-record counters or a silent pipeline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::decode::detect::trials;
use crate::decode::{DecodeLimits, DecodeStats, Decoded, decode_with};
use crate::enrich::{Enricher, Sampling};
use crate::inventory::{Inventory, addr_from_ip};
use crate::rates::CounterRates;
use crate::types::{Format, Messages};

/// How much to sample and how long to wait for the brokers.
#[derive(Debug, Clone, Copy)]
pub struct ProbeOptions {
    /// Messages sampled per topic (the newest, spread over its partitions).
    pub sample: usize,
    /// Longest wait for the metadata, for each partition's offsets and for the sample.
    pub timeout: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self { sample: 100, timeout: Duration::from_secs(5) }
    }
}

/// What the brokers said about one configured topic and what its sample decoded to.
#[derive(Debug, Clone)]
pub struct TopicReport {
    pub name: String,
    pub format: Format,
    /// Absent from the brokers' metadata.
    pub missing: bool,
    pub partitions: usize,
    /// Messages in the topic (end minus start offsets, over its partitions).
    pub available: u64,
    /// Messages read for the sample.
    pub sampled: usize,
    /// Messages the sample should have held (fewer arrive only on a timeout).
    pub expected: usize,
    /// The sample decoded with the configured format.
    pub stats: DecodeStats,
    /// Decoded records that belong to a site, and those the enricher placed at all.
    pub matched: u64,
    pub placed: u64,
    /// When most records are rejected: the known format that decodes most of them, and its share.
    pub decodes_as: Option<(Format, f64)>,
}

impl TopicReport {
    fn new(name: &str, format: Format) -> Self {
        Self {
            name: name.to_string(),
            format,
            missing: false,
            partitions: 0,
            available: 0,
            sampled: 0,
            expected: 0,
            stats: DecodeStats::default(),
            matched: 0,
            placed: 0,
            decodes_as: None,
        }
    }

    /// Whether most sampled records were rejected.
    pub fn mostly_rejected(&self) -> bool {
        self.stats.records > 0 && self.stats.rejected_total() * 2 > self.stats.records
    }

    /// The most frequent rejection reason.
    pub fn top_reason(&self) -> Option<&'static str> {
        self.stats.rejected.iter().max_by_key(|(_, n)| *n).map(|(r, _)| r.as_str())
    }

    /// What is wrong with this topic, one sentence each (empty: nothing).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let t = &self.name;
        if self.missing {
            out.push(format!("topic {t} does not exist on the brokers (kafka.topics)"));
            return out;
        }
        if self.sampled < self.expected {
            out.push(format!(
                "topic {t}: only {} of the {} newest messages arrived within the timeout (--timeout-secs)",
                self.sampled, self.expected
            ));
        }
        if self.mostly_rejected() {
            let f = self.format.as_str();
            let (rejected, records) = (self.stats.rejected_total(), self.stats.records);
            let reason = self.top_reason().unwrap_or("unknown");
            out.push(match self.decodes_as {
                Some((other, _)) => {
                    format!("topic {t}: {rejected} of {records} sampled records are not {f} ({reason}); they decode as {}", other.as_str())
                }
                None => format!("topic {t}: {rejected} of {records} sampled records are not {f} ({reason}), nor any other known format"),
            });
        } else if self.placed > 0 && self.matched == 0 {
            out.push(format!(
                "topic {t}: none of the {} decoded records matches a site of the inventory (inventory.sites_csv: prefixes, exporters)",
                self.placed
            ));
        }
        out
    }
}

/// The outcome of `check --connect` for every configured topic.
#[derive(Debug, Clone)]
pub struct ConnectReport {
    pub brokers: String,
    /// Brokers in the cluster's metadata.
    pub broker_count: usize,
    pub topics: Vec<TopicReport>,
}

impl ConnectReport {
    /// Every problem found, one sentence each; empty when all is well.
    pub fn problems(&self) -> Vec<String> {
        self.topics.iter().flat_map(TopicReport::problems).collect()
    }
}

impl std::fmt::Display for ConnectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = if self.broker_count == 1 { "" } else { "s" };
        writeln!(f, "  kafka.brokers {}: reachable ({} broker{s} in the cluster)", self.brokers, self.broker_count)?;
        for t in &self.topics {
            write!(f, "  topic {} ({}): ", t.name, t.format.as_str())?;
            if t.missing {
                writeln!(f, "missing")?;
            } else {
                let ps = if t.partitions == 1 { "" } else { "s" };
                write!(f, "{} partition{ps}, {} message(s), {} sampled", t.partitions, t.available, t.sampled)?;
                let st = &t.stats;
                if t.sampled > 0 {
                    write!(f, ": {} records, {} decoded, {} rejected", st.records, st.decoded, st.rejected_total())?;
                    if !st.rejected.is_empty() {
                        let mut reasons = st.rejected.clone();
                        reasons.sort_by(|a, b| b.1.cmp(&a.1));
                        let list: Vec<String> = reasons.iter().map(|(r, n)| format!("{} {n}", r.as_str())).collect();
                        write!(f, " ({})", list.join(", "))?;
                    }
                    if st.no_traffic > 0 {
                        write!(f, ", {} without traffic", st.no_traffic)?;
                    }
                    if t.placed > 0 {
                        write!(f, "; {} of {} match a site ({:.0} %)", t.matched, t.placed, 100.0 * t.matched as f64 / t.placed as f64)?;
                    }
                } else if t.available == 0 {
                    write!(f, " (the topic is empty: nothing to judge yet)")?;
                }
                writeln!(f)?;
            }
            for p in t.problems() {
                writeln!(f, "    problem: {p}")?;
            }
        }
        Ok(())
    }
}

/// Keeps the last error librdkafka logged, to explain a timeout ("Connection refused").
#[derive(Default)]
struct ProbeContext {
    last_error: Mutex<Option<String>>,
}

impl ClientContext for ProbeContext {
    fn log(&self, level: RDKafkaLogLevel, _fac: &str, message: &str) {
        if !matches!(level, RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info | RDKafkaLogLevel::Debug) {
            *self.last_error.lock().expect("probe lock") = Some(message.to_string());
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        *self.last_error.lock().expect("probe lock") = Some(format!("{error}: {reason}"));
    }
}

impl ConsumerContext for ProbeContext {}

/// Connects to `config.kafka.brokers`, samples every topic of `config.kafka.topics` and
/// decodes the samples. Blocking (seconds): run it off the async threads. An error means the
/// brokers could not be reached at all, and names `kafka.brokers`.
pub fn probe(config: &Config, inventory: Arc<Inventory>, options: ProbeOptions) -> Result<ConnectReport, String> {
    let kafka = &config.kafka;
    let timeout = options.timeout.max(Duration::from_millis(100));
    let mut client = ClientConfig::new();
    for (k, v) in &kafka.properties {
        client.set(k, v);
    }
    let timeout_ms = timeout.as_millis().to_string();
    client
        .set("bootstrap.servers", &kafka.brokers)
        // Never joined nor committed: partitions are assigned by hand.
        .set("group.id", format!("{}.check", kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("socket.timeout.ms", timeout_ms.as_str())
        .set("socket.connection.setup.timeout.ms", timeout_ms.as_str())
        .set("allow.auto.create.topics", "false");
    client.set_log_level(RDKafkaLogLevel::Warning);
    let consumer: BaseConsumer<ProbeContext> = client
        .create_with_context(ProbeContext::default())
        .map_err(|e| format!("kafka.brokers {}: cannot create a Kafka client: {e}", kafka.brokers))?;
    let unreachable = |e: KafkaError| {
        let last = consumer.context().last_error.lock().expect("probe lock").clone();
        let why = last.map_or_else(|| e.to_string(), |l| format!("{e}; {l}"));
        format!(
            "kafka.brokers {}: no broker answered within {} s ({why}); is a broker running there and reachable from here (TLS and SASL settings go in kafka.properties)?",
            kafka.brokers,
            timeout.as_secs_f64()
        )
    };
    let metadata = consumer.fetch_metadata(None, timeout).map_err(unreachable)?;
    let mut report = ConnectReport { brokers: kafka.brokers.clone(), broker_count: metadata.brokers().len(), topics: Vec::new() };

    // Where each topic's sample starts, per partition.
    let mut assignment = TopicPartitionList::new();
    for topic in &kafka.topics {
        let mut t = TopicReport::new(&topic.name, topic.format);
        match metadata.topics().iter().find(|m| m.name() == topic.name) {
            Some(m) if m.error().is_none() && !m.partitions().is_empty() => {
                t.partitions = m.partitions().len();
                let per_partition = options.sample.div_ceil(t.partitions).max(1) as i64;
                for p in m.partitions() {
                    let (low, high) = consumer.fetch_watermarks(&topic.name, p.id(), timeout).map_err(unreachable)?;
                    t.available += (high - low).max(0) as u64;
                    let start = low.max(high - per_partition);
                    if high > start {
                        t.expected += (high - start) as usize;
                        assignment
                            .add_partition_offset(&topic.name, p.id(), Offset::Offset(start))
                            .map_err(|e| format!("topic {}: {e}", topic.name))?;
                    }
                }
            }
            _ => t.missing = true,
        }
        report.topics.push(t);
    }

    let samples = read_samples(&consumer, &assignment, &report.topics, timeout * 2)?;
    let limits = DecodeLimits {
        max_message_bytes: config.decode.max_message_bytes,
        max_bytes_per_record: config.decode.max_bytes_per_record,
        min_time_ns: DecodeLimits::MIN_TIME_NS,
        max_time_ns: crate::types::unix_now_ns().saturating_add((config.decode.max_future_secs as i64).saturating_mul(1_000_000_000)),
    };
    let sampling = Sampling {
        default_rate: config.sampling.default_rate,
        overrides: config.sampling.overrides.iter().map(|(ip, r)| (addr_from_ip(*ip), *r)).collect(),
    };
    let enricher = Enricher::new(inventory, sampling);
    for (t, topic) in report.topics.iter_mut().zip(&kafka.topics) {
        let Some(messages) = samples.get(&t.name) else { continue };
        t.sampled = messages.len();
        let (decoded, stats) = decode_with(topic.format, topic.event_time, messages, &limits);
        t.stats = stats;
        let (matched, placed) = place(&enricher, decoded);
        (t.matched, t.placed) = (matched, placed);
        if t.mostly_rejected() {
            t.decodes_as =
                trials(messages, &limits).into_iter().find(|x| x.format != topic.format && x.share() >= 0.5).map(|x| (x.format, x.share()));
        }
    }
    Ok(report)
}

/// Reads the assigned messages until every topic has its sample or `timeout` passes.
fn read_samples(
    consumer: &BaseConsumer<ProbeContext>,
    assignment: &TopicPartitionList,
    topics: &[TopicReport],
    timeout: Duration,
) -> Result<HashMap<String, Messages>, String> {
    let mut samples: HashMap<String, Messages> = HashMap::new();
    if assignment.count() == 0 {
        return Ok(samples);
    }
    consumer.assign(assignment).map_err(|e| format!("cannot read the topics' newest messages: {e}"))?;
    let wanted: HashMap<&str, usize> = topics.iter().map(|t| (t.name.as_str(), t.expected)).collect();
    let total: usize = wanted.values().sum();
    let mut got = 0;
    let deadline = Instant::now() + timeout;
    while got < total && Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else { continue };
        let want = wanted.get(m.topic()).copied().unwrap_or(0);
        let sample = samples.entry(m.topic().to_string()).or_default();
        if sample.len() < want {
            sample.push(m.payload().unwrap_or_default());
            got += 1;
        }
    }
    Ok(samples)
}

/// How many decoded records the enricher puts at a site, of those it could place at all.
fn place(enricher: &Enricher, decoded: Decoded) -> (u64, u64) {
    match decoded {
        Decoded::Flows(b) => {
            let (rows, stats) = enricher.enrich_flows(&b);
            (rows.num_rows() as u64, rows.num_rows() as u64 + stats.unmatched)
        }
        Decoded::Probes(b) => {
            let (rows, stats) = enricher.enrich_probes(&b);
            (rows.num_rows() as u64, rows.num_rows() as u64 + stats.unmatched)
        }
        Decoded::Telemetry { probes, counters, .. } => {
            let (probes, probe_stats) = enricher.enrich_probes(&probes);
            // A counter's first sample is only a baseline: interfaces count from their second.
            let (traffic, _, _) = CounterRates::default().apply(0, &counters);
            let (traffic, traffic_stats, _) = enricher.enrich_interfaces(&traffic);
            let matched = (probes.num_rows() + traffic.num_rows()) as u64;
            (matched, matched + probe_stats.unmatched + traffic_stats.unmatched)
        }
    }
}
