//! `/readyz` with Kafka: ready once the consumer group has assigned the instance its partitions
//! and each is within `kafka.ready_lag` messages of its end, not at the first window. An
//! instance without brokers is not ready; one catching up on a backlog is not ready before it
//! has read it (although it publishes windows meanwhile); a spare replica that owns no
//! partition is ready once it has joined.

use std::time::Duration;

use super::{S, produce_flows, start_ns, test_dir};
use crate::kafka_support::*;
use crate::support::http_get;

/// The status of `/readyz`, 0 when it does not answer.
fn readyz(i: &Instance) -> u16 {
    http_get(i.http, "/readyz").map_or(0, |(status, _)| status)
}

/// The `partitions assigned` lines of an instance's log.
fn assignments(i: &Instance) -> Vec<String> {
    i.log_text().lines().filter(|l| l.contains("partitions assigned")).map(String::from).collect()
}

#[test]
fn readyz_follows_the_group_and_the_lag_not_the_first_window() {
    let dir = test_dir();
    let mut broker = Broker::start(dir.path());
    broker.create_topic("flows", 1);
    // A backlog of 40,000 records, produced before any instance starts.
    let mut traffic = Traffic::new(41, start_ns());
    produce_flows(&broker, "flows", &mut traffic, 1, 2_000, 20, S / 20);
    let produced: u64 = traffic.truth.values().map(|v| v.2).sum();
    assert_eq!(produced, 40_000);
    let checkpoints = dir.path().join("ckpt");

    // No broker: the instance runs (/healthz) but is not ready.
    broker.stop();
    // client.id orders the members (librdkafka's range assignor sorts them by member id): `a`
    // keeps the one partition when `b` joins. It is set through the environment, `_` for `.`.
    let ready_now = [("SITEFLOW_KAFKA__READY_LAG", "0"), ("SITEFLOW_KAFKA__PROPERTIES__CLIENT_ID", "a-siteflow")];
    let a = Instance::start_with_env(dir.path(), "a", &broker, &[("flows", "goflow2_json")], &checkpoints, "", &ready_now);
    let said = wait_until(Duration::from_secs(60), || a.log_text().lines().any(|l| l.contains("ERROR") && l.contains("kafka.brokers")));
    assert!(said, "no error naming kafka.brokers with the broker stopped:\n{}", a.log_summary());
    assert_eq!(http_get(a.http, "/healthz").unwrap().0, 200);
    let (status, body) = http_get(a.http, "/readyz").unwrap();
    assert_eq!(status, 503, "ready without a broker: {body}");

    // The broker comes back: `a` joins and reads the backlog. It turns ready only once it has
    // read it all (ready_lag 0), although windows are published while it reads.
    broker.restart();
    let received = || a.metric("siteflow_records_received_total", "").unwrap_or(0.0) as u64;
    let ready = wait_while_progressing(Duration::from_secs(120), || readyz(&a) == 200, received);
    assert!(ready, "never ready:\n{}", a.log_summary());
    assert_eq!(received(), produced, "ready before the backlog was read:\n{}", a.log_summary());
    assert!(a.metric("siteflow_windows_closed_total", "table=\"flows\"").unwrap_or(0.0) > 0.0, "{}", a.log_summary());
    let text = a.log_text();
    let line = text.lines().find(|l| l.contains("ready: joined the consumer group")).unwrap_or_else(|| panic!("{}", a.log_summary()));
    assert!(line.contains("with 1 partition(s)"), "{line}");

    // A second replica in the same group gets no partition: ready as soon as it has joined.
    let spare_env = [("SITEFLOW_KAFKA__PROPERTIES__CLIENT_ID", "b-siteflow")];
    let b = Instance::start_with_env(dir.path(), "b", &broker, &[("flows", "goflow2_json")], &checkpoints, "", &spare_env);
    let joined = wait_until(Duration::from_secs(90), || !assignments(&b).is_empty());
    assert!(joined, "b never joined the group:\n{}", b.log_summary());
    let last = assignments(&b).pop().unwrap();
    assert!(last.contains("partitions=[]"), "b was meant to be the spare replica: {last}\n{}", b.log_summary());
    let spare_ready = wait_until(Duration::from_secs(30), || readyz(&b) == 200);
    assert!(spare_ready, "a replica without partitions never turned ready:\n{}", b.log_summary());
    let text = b.log_text();
    let line = text.lines().find(|l| l.contains("ready: joined the consumer group")).unwrap_or_else(|| panic!("{}", b.log_summary()));
    assert!(line.contains("with 0 partition(s)"), "{line}");
    // The first replica stays ready through the rebalance.
    assert_eq!(readyz(&a), 200);
}
