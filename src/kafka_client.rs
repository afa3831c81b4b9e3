//! Kafka clients beside the main consumer: which of `kafka.properties` a producer takes, a
//! producer for the topics the site-stage instances share (verdicts, windows), and a reader of
//! every partition of one topic that commits nothing (each instance reads everything).

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, DefaultConsumerContext};
use rdkafka::producer::{DefaultProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;

/// Properties only a consumer understands (a producer built from the same settings warns on them).
fn is_consumer_only(key: &str) -> bool {
    const KEYS: [&str; 11] = [
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "partition.assignment.strategy",
        "group.instance.id",
        "group.protocol",
        "auto.offset.reset",
        "isolation.level",
        "enable.partition.eof",
        "check.crcs",
        "auto.commit.interval.ms",
    ];
    KEYS.contains(&key) || key.starts_with("fetch.") || key.starts_with("queued.")
}

/// A producer's settings: the brokers and the shared `kafka.properties` (TLS, SASL...) minus
/// those only a consumer understands; each producer adds its own.
pub fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    for (k, v) in config.properties.iter().filter(|(k, _)| !is_consumer_only(k)) {
        client.set(k, v);
    }
    client
}

/// A producer for the shared topics, batching for 20 ms.
pub fn producer(config: &KafkaConfig) -> Result<ThreadedProducer<DefaultProducerContext>, String> {
    producer_config(config).set("linger.ms", "20").create().map_err(|e| format!("cannot create the producer: {e}"))
}

/// A consumer assigned every partition of `topic`, each from `start(partition)`; group
/// `<kafka.group_id>.<group_suffix>`, never committed. `missing`: what to say if the topic
/// does not exist.
pub fn whole_topic_reader(
    config: &KafkaConfig,
    topic: &str,
    group_suffix: &str,
    missing: &str,
    start: impl Fn(i32) -> Offset,
) -> Result<BaseConsumer<DefaultConsumerContext>, String> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    for (k, v) in &config.properties {
        client.set(k, v);
    }
    // A start offset the topic's retention has deleted meanwhile: from the oldest one left.
    client
        .set("group.id", format!("{}.{group_suffix}", config.group_id))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer<DefaultConsumerContext> = client.create().map_err(|e| format!("cannot create the reader: {e}"))?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30)).map_err(|e| format!("cannot read its metadata: {e}"))?;
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    if partitions.is_empty() {
        return Err(format!("does not exist; {missing}"));
    }
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, p, start(p)).map_err(|e| e.to_string())?;
    }
    consumer.assign(&tpl).map_err(|e| format!("cannot assign its partitions: {e}"))?;
    Ok(consumer)
}
