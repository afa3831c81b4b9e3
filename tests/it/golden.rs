//! Golden files: each decoder's output (as an Arrow table) and reject reasons for a fixed input
//! of good and bad records. `UPDATE_GOLDEN=1 cargo test --test it golden` rewrites them; review
//! the diff before committing.

use datafusion::arrow::util::pretty::pretty_format_batches;
use siteflow::decode::{DecodeLimits, Decoded, decode};
use siteflow::types::{Format, Messages};

use crate::support::repo;

const LIMITS: DecodeLimits = DecodeLimits {
    max_message_bytes: 1 << 20,
    max_bytes_per_record: 1 << 40,
    min_time_ns: DecodeLimits::MIN_TIME_NS,
    max_time_ns: i64::MAX,
};

/// The input file as one newline-delimited message, as collectors batch them.
fn input(name: &str) -> Messages {
    let mut msgs = Messages::default();
    msgs.push(&std::fs::read(repo().join("tests/golden").join(format!("{name}.jsonl"))).unwrap());
    msgs
}

fn compare(name: &str, actual: &str) {
    let expected_path = repo().join("tests/golden").join(format!("{name}.expected"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&expected_path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
    assert_eq!(actual, expected, "golden {name} differs (UPDATE_GOLDEN=1 to rewrite)");
}

fn check_golden(format: Format, name: &str) {
    let (decoded, stats) = decode(format, &input(name), &LIMITS);
    let batches = match decoded {
        Decoded::Flows(b) | Decoded::Probes(b) => vec![b],
        Decoded::Telemetry { probes, counters, .. } => vec![probes, counters],
    };
    let tables: Vec<String> = batches.iter().map(|b| pretty_format_batches(std::slice::from_ref(b)).unwrap().to_string()).collect();
    let mut rejected = stats.rejected.clone();
    rejected.sort();
    let actual = format!(
        "{}\nrecords: {}, decoded: {}, no traffic: {}, missing sampling rate: {}\nrejected: {}\n",
        tables.join("\n"),
        stats.records,
        stats.decoded,
        stats.no_traffic,
        stats.missing_sampling_rate,
        rejected.iter().map(|(r, n)| format!("{}={n}", r.as_str())).collect::<Vec<_>>().join(", ")
    );
    compare(name, &actual);
}

/// Each event-time mode on each JSON flow decoder's golden input: the event time and start of
/// every decoded record, and how many fell back (the protobuf decoder's are unit tests).
#[test]
fn event_time_modes() {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::{TimestampNanosecondType, UInt64Type};
    use siteflow::decode::decode_with;
    use siteflow::types::EventTime;
    let mut actual = String::new();
    for (format, name) in [(Format::Goflow2Json, "goflow2_json"), (Format::PmacctJson, "pmacct_json")] {
        for mode in [EventTime::FlowEnd, EventTime::FlowStart, EventTime::Arrival, EventTime::Spread] {
            let (Decoded::Flows(b), stats) = decode_with(format, mode, &input(name), &LIMITS) else { unreachable!() };
            let ns = |c: &str| b.column_by_name(c).unwrap().as_primitive::<TimestampNanosecondType>().values().to_vec();
            let bytes = b.column_by_name("bytes").unwrap().as_primitive::<UInt64Type>().values().to_vec();
            let rows: Vec<String> =
                ns("event_time").iter().zip(ns("flow_start")).zip(bytes).map(|((t, s), b)| format!("{t}/{s}/{b}")).collect();
            actual += &format!(
                "{name} {}: decoded {}, fell back {}, rejected {}: {}\n",
                mode.as_str(),
                stats.decoded,
                stats.event_time_fallback,
                stats.rejected_total(),
                rows.join(" ")
            );
        }
    }
    compare("event_time_modes", &actual);
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

/// sfacctd 1.7.7's own output for sFlow v5 counter samples (generic interface records up and
/// down, Ethernet, VLAN and an unsupported record; the default, epoch and RFC 3339 timestamps),
/// and two broken lines.
#[test]
fn pmacct_sflow_counters_json() {
    check_golden(Format::PmacctSflowCountersJson, "pmacct_sflow_counters_json");
}
