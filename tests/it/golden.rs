//! Golden files: each decoder's output (as an Arrow table) and reject reasons for a fixed input
//! of good and bad records. `UPDATE_GOLDEN=1 cargo test --test it golden` rewrites them; review
//! the diff before committing.

use datafusion::arrow::util::pretty::pretty_format_batches;
use siteflow::decode::{DecodeLimits, Decoded, Format, decode};
use siteflow::source::Messages;

use crate::support::repo;

fn check_golden(format: Format, name: &str) {
    let dir = repo().join("tests/golden");
    let input = std::fs::read(dir.join(format!("{name}.jsonl"))).unwrap();
    // The whole file is one newline-delimited message, as collectors batch them.
    let mut msgs = Messages::default();
    msgs.push(&input);
    let limits = DecodeLimits {
        max_message_bytes: 1 << 20,
        max_bytes_per_record: 1 << 40,
        min_time_ns: DecodeLimits::MIN_TIME_NS,
        max_time_ns: i64::MAX,
    };
    let (decoded, stats) = decode(format, &msgs, &limits);
    let batches = match decoded {
        Decoded::Flows(b) | Decoded::Probes(b) => vec![b],
        Decoded::Telemetry { probes, counters, .. } => vec![probes, counters],
    };
    let tables: Vec<String> = batches.iter().map(|b| pretty_format_batches(std::slice::from_ref(b)).unwrap().to_string()).collect();
    let mut rejected = stats.rejected.clone();
    rejected.sort();
    let actual = format!(
        "{}\nrecords: {}, decoded: {}, missing sampling rate: {}\nrejected: {}\n",
        tables.join("\n"),
        stats.records,
        stats.decoded,
        stats.missing_sampling_rate,
        rejected.iter().map(|(r, n)| format!("{}={n}", r.as_str())).collect::<Vec<_>>().join(", ")
    );
    let expected_path = dir.join(format!("{name}.expected"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&expected_path, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
    assert_eq!(actual, expected, "golden {name} differs (UPDATE_GOLDEN=1 to rewrite)");
}

#[test]
fn goflow2_json() {
    check_golden(Format::Goflow2Json, "goflow2_json");
}

#[test]
fn siteflow_probe_json() {
    check_golden(Format::SiteflowProbeJson, "siteflow_probe_json");
}

#[test]
fn pmacct_json() {
    check_golden(Format::PmacctJson, "pmacct_json");
}

#[test]
fn telegraf_json() {
    check_golden(Format::TelegrafJson, "telegraf_json");
}
