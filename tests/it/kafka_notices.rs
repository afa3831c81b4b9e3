//! What siteflow says about its Kafka input: `check --connect` before a run, and the log and
//! `siteflow_kafka_broker_up` during one (a wrong format, a broker outage, the status line).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{S, start_ns};
use crate::kafka_support::*;
use crate::support::{free_addr, run_siteflow, write};

/// A configuration reading `topics` (name, format) from `brokers`.
fn config(dir: &Path, name: &str, brokers: &str, topics: &[(&str, &str)]) -> PathBuf {
    let topics_yaml: String = topics.iter().map(|(t, f)| format!("    - {{ name: {t}, format: {f} }}\n")).collect();
    write(
        dir,
        &format!("{name}.yaml"),
        &format!(
            "source: {{ kind: kafka }}\nkafka:\n  brokers: \"{brokers}\"\n  topics:\n{topics_yaml}checkpoint: {{ dir: ckpt }}\ndecode: {{ max_future_secs: 86400 }}\n"
        ),
    )
}

struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn check_connect(config: &Path) -> Outcome {
    let started = Instant::now();
    let out = run_siteflow(&["check", "--config", config.to_str().unwrap(), "--connect"], &[]);
    Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
        took: started.elapsed(),
    }
}

/// `n` goflow2 JSON flows, one per message, over `partitions` partitions of `topic`.
fn produce_json_flows(broker: &Broker, topic: &str, partitions: i32, n: usize, traffic: &mut Traffic) {
    let producer = broker.producer();
    for i in 0..n {
        let f = traffic.flow(traffic.start_ns + i as i64 * 10_000_000);
        send(&producer, topic, i as i32 % partitions, traffic.goflow2_json(&f).as_bytes());
    }
    flush(&producer);
}

#[test]
fn check_connect_reports_each_topic_and_fails_on_a_wrong_format_a_missing_topic_or_a_dead_broker() {
    let dir = super::test_dir();
    let broker = Broker::start(dir.path());
    broker.create_topic("flows", 2);
    broker.create_topic("flows.pb", 1);
    let mut traffic = Traffic::new(31, start_ns());
    produce_json_flows(&broker, "flows", 2, 300, &mut traffic);
    // goflow2 JSON in a topic configured as goflow2's protobuf: the classic collector mix-up.
    produce_json_flows(&broker, "flows.pb", 1, 40, &mut traffic);

    // The right format: every sampled record decodes and belongs to a site.
    let right = check_connect(&config(dir.path(), "right", &broker.brokers(), &[("flows", "goflow2_json")]));
    assert!(right.ok, "stdout:\n{}\nstderr:\n{}", right.stdout, right.stderr);
    assert!(right.stdout.contains(&format!("kafka.brokers {}: reachable", broker.brokers())), "{}", right.stdout);
    assert!(
        right.stdout.contains(
            "topic flows (goflow2_json): 2 partitions, 300 message(s), 100 sampled: 100 records, 100 decoded, 0 rejected; 100 of 100 match a site (100 %)"
        ),
        "{}",
        right.stdout
    );
    assert!(!right.stdout.contains("problem"), "{}", right.stdout);

    // The wrong format: named, with the format the messages are in.
    let wrong =
        check_connect(&config(dir.path(), "wrong", &broker.brokers(), &[("flows", "goflow2_json"), ("flows.pb", "goflow2_protobuf")]));
    assert!(!wrong.ok, "a wrong format must fail the check:\n{}", wrong.stdout);
    let expected = "topic flows.pb: 40 of 40 sampled records are not goflow2_protobuf (not_protobuf); they decode as goflow2_json";
    assert!(wrong.stdout.contains(&format!("problem: {expected}")), "{}", wrong.stdout);
    assert!(wrong.stderr.contains("check --connect found 1 problem(s)") && wrong.stderr.contains(expected), "{}", wrong.stderr);

    // A topic the brokers do not have.
    let missing = check_connect(&config(dir.path(), "missing", &broker.brokers(), &[("flows", "goflow2_json"), ("flowz", "goflow2_json")]));
    assert!(!missing.ok, "a missing topic must fail the check:\n{}", missing.stdout);
    assert!(missing.stdout.contains("topic flowz (goflow2_json): missing"), "{}", missing.stdout);
    assert!(missing.stderr.contains("topic flowz does not exist on the brokers (kafka.topics)"), "{}", missing.stderr);

    // Nothing listening: a clear error naming kafka.brokers within a few seconds, not a hang.
    let nowhere = free_addr().to_string();
    let dead = check_connect(&config(dir.path(), "dead", &nowhere, &[("flows", "goflow2_json")]));
    assert!(!dead.ok, "an unreachable broker must fail the check:\n{}", dead.stdout);
    assert!(dead.stderr.contains(&format!("kafka.brokers {nowhere}: no broker answered within 5 s")), "{}", dead.stderr);
    assert!(dead.took < Duration::from_secs(15), "check --connect took {:?} on a dead broker", dead.took);
}

/// Lines of `text` after the first `skip` that are logged at `level` (text log format).
fn lines_at<'a>(text: &'a str, skip: usize, level: &str) -> Vec<&'a str> {
    text.lines().skip(skip).filter(|l| l.split_whitespace().nth(1) == Some(level)).collect()
}

#[test]
fn a_broker_outage_is_one_error_naming_kafka_brokers_and_broker_up_follows_it() {
    let dir = super::test_dir();
    let mut broker = Broker::start(dir.path());
    broker.create_topic("flows", 1);
    let checkpoints = dir.path().join("ckpt");
    let a = Instance::start(dir.path(), "a", &broker, &[("flows", "goflow2_json")], &checkpoints, "");
    let up = wait_until(Duration::from_secs(60), || a.metric("siteflow_kafka_broker_up", "") == Some(1.0));
    assert!(up, "siteflow_kafka_broker_up never reached 1:\n{}", a.log_summary());

    let before = a.log_text().lines().count();
    broker.stop();
    let down = wait_until(Duration::from_secs(60), || a.metric("siteflow_kafka_broker_up", "") == Some(0.0));
    assert!(down, "siteflow_kafka_broker_up stayed 1 with the broker stopped:\n{}", a.log_summary());
    // Watch the log for a while into the outage: librdkafka retries every second or so.
    let observed = Instant::now();
    std::thread::sleep(Duration::from_secs(12));
    let text = a.log_text();
    let errors = lines_at(&text, before, "ERROR");
    let warnings = lines_at(&text, before, "WARN");
    assert_eq!(errors.len(), 1, "one ERROR for the outage, {:?} after it began; got:\n{}", observed.elapsed(), errors.join("\n"));
    assert!(errors[0].contains("kafka.brokers") && errors[0].contains(&broker.brokers()), "{}", errors[0]);
    assert!(warnings.is_empty(), "no warning flood during the outage:\n{}", warnings.join("\n"));

    broker.restart();
    let back = wait_until(Duration::from_secs(90), || a.metric("siteflow_kafka_broker_up", "") == Some(1.0));
    assert!(back, "siteflow_kafka_broker_up did not return to 1 after the broker restarted:\n{}", a.log_summary());
    assert!(a.log_text().contains("answer again after"), "{}", a.log_summary());
}

#[test]
fn a_topic_in_the_wrong_format_gets_one_warning_and_the_run_reports_status_and_first_windows() {
    let dir = super::test_dir();
    let broker = Broker::start(dir.path());
    broker.create_topic("flows", 1);
    broker.create_topic("flows.pb", 1);
    let mut traffic = Traffic::new(41, start_ns());
    produce_json_flows(&broker, "flows", 1, 500, &mut traffic);
    // A flow an hour later closes the data's windows.
    let end_ns = traffic.start_ns + 500 * 10_000_000;
    let producer = broker.producer();
    let sentinel = Flow { site: 0, inbound: true, t_ns: end_ns + 3600 * S, bytes: 1, packets: 1, sampling: 1 };
    send(&producer, "flows", 0, traffic.goflow2_json(&sentinel).as_bytes());
    flush(&producer);

    let checkpoints = dir.path().join("ckpt");
    let mut a = Instance::start_with_env(
        dir.path(),
        "a",
        &broker,
        &[("flows", "goflow2_json"), ("flows.pb", "goflow2_protobuf")],
        &checkpoints,
        "",
        &[("SITEFLOW_LOG__REJECTION_WARN_AFTER_SECS", "2"), ("SITEFLOW_LOG__STATUS_INTERVAL_SECS", "2")],
    );
    let status_lines = |a: &Instance| a.log_text().lines().filter(|l| l.contains(" status: ")).count();
    let warnings = |a: &Instance| -> Vec<String> {
        a.log_text().lines().filter(|l| l.contains("records mostly rejected")).map(str::to_string).collect()
    };
    // goflow2 JSON keeps arriving in the protobuf topic over several warning periods.
    let mut sent = 0;
    let mut flow_at = traffic.start_ns;
    let done = wait_until(Duration::from_secs(120), || {
        for _ in 0..20 {
            flow_at += 10_000_000;
            let f = traffic.flow(flow_at);
            send(&producer, "flows.pb", 0, traffic.goflow2_json(&f).as_bytes());
            sent += 1;
        }
        flush(&producer);
        !warnings(&a).is_empty() && status_lines(&a) >= 6
    });
    assert!(done, "no rejection warning or status lines:\n{}", a.log_summary());
    let rejected = a.metric("siteflow_records_rejected_total", "format=\"goflow2_protobuf\"").unwrap_or(0.0);
    assert!(rejected >= 20.0, "{rejected} of {sent} rejected:\n{}", a.log_summary());
    let w = warnings(&a);
    assert_eq!(w.len(), 1, "one warning over several periods of rejected records:\n{}", w.join("\n"));
    assert!(w[0].contains(" WARN ") && w[0].contains("topic=flows.pb"), "{}", w[0]);
    assert!(w[0].contains("rejected as goflow2_protobuf (mostly not_protobuf)"), "{}", w[0]);

    // The good topic's windows: announced once when the first one is published, and counted
    // in the status lines (records per second, sites, windows).
    let first = wait_until(Duration::from_secs(60), || a.log_text().contains("first flows window published"));
    assert!(first, "{}", a.log_summary());
    let text = a.log_text();
    assert_eq!(text.matches("first flows window published").count(), 1);
    assert!(!text.contains("first probes window published"), "no probe data, no probe window");
    assert!(!text.contains("restored from its checkpoint"), "a first start restores nothing:\n{text}");
    let busy =
        text.lines().filter(|l| l.contains(" status: ")).find(|l| !l.contains(" 0 sites seen") && !l.contains(" 0 window(s) closed"));
    assert!(busy.is_some(), "no status line reported the published windows:\n{}", a.log_summary());
    let busy = busy.unwrap();
    assert!(busy.contains("records/s") && busy.contains("Kafka lag"), "{busy}");

    // The shutdown summary counts what was left out.
    a.terminate();
    let text = a.log_text();
    let stopped = text.lines().find(|l| l.contains("pipeline stopped")).unwrap_or_else(|| panic!("no shutdown summary:\n{text}"));
    let field = |name: &str| -> u64 {
        let v =
            stopped.split_whitespace().find_map(|f| f.strip_prefix(&format!("{name}="))).unwrap_or_else(|| panic!("{name} in {stopped}"));
        v.parse().unwrap()
    };
    assert!(field("rejected") >= 20 && field("rejected") <= sent, "{stopped}");
    assert_eq!((field("unmatched"), field("late")), (0, 0), "{stopped}");
    assert!(!text.contains("history written"), "no history directory, no history line:\n{text}");
}
