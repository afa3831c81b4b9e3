//! pmacct sfacctd's stream of sFlow counter samples (`sfacctd_counter_kafka_topic`, or
//! `sfacctd_counter_file` with `sfacctd_counter_output: json`): one JSON object per counter
//! record. Schema: `schemas/pmacct-sflow-counters.schema.json`.
//!
//! A generic interface record (`"sf_cnt_type": "sflow_cnt_generic"`, sFlow's counters record
//! 0:1) becomes a counter sample like Telegraf's SNMP one: the device is the agent address
//! (`peer_ip_src`), the interface its `ifIndex` as a decimal number (an inventory names it in
//! `uplinks` as `3@192.0.2.1`, or `3` on the site's own exporter), octets `ifInOctets` /
//! `ifOutOctets` (64-bit in sFlow), the speed `ifSpeed` (bit/s) and the link state bit 1 of
//! `ifStatus` (sFlow: bit 0 admin up, bit 1 oper up). Other lines (`log_init`, Ethernet, VLAN
//! and processor records) are counted as `unsupported_measurement` and skipped.
//!
//! The timestamp is when sfacctd received the datagram: RFC 3339 (`timestamps_rfc3339`),
//! seconds since the epoch (`timestamps_since_epoch`, a string or a number) or sfacctd's
//! default `YYYY-MM-DD HH:MM:SS.ffffff`, which has no zone and is read as UTC: run sfacctd
//! with `timestamps_utc: true` (its default is the collector's local time).

use std::borrow::Cow;

use serde::Deserialize;

use super::telegraf_json::counter_value;
use super::{CounterRecord, DecodeLimits, RejectReason};

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    #[serde(default, borrow)]
    sf_cnt_type: Option<Cow<'a, str>>,
    timestamp: serde_json::Value,
    #[serde(default, borrow)]
    peer_ip_src: Option<Cow<'a, str>>,
    #[serde(rename = "ifIndex")]
    if_index: Option<u64>,
    #[serde(rename = "ifSpeed", default)]
    if_speed: Option<u64>,
    #[serde(rename = "ifStatus", default)]
    if_status: Option<u64>,
    #[serde(rename = "ifInOctets", default)]
    in_octets: Option<serde_json::Value>,
    #[serde(rename = "ifOutOctets", default)]
    out_octets: Option<serde_json::Value>,
}

/// Nanoseconds since the epoch of sfacctd's `timestamp`, in any of its three forms.
fn timestamp_ns(v: &serde_json::Value) -> Option<i64> {
    let seconds = |s: f64| (s.is_finite() && s > 0.0 && s < 9.2e9).then(|| (s * 1e9).round() as i64);
    match v {
        // The shortest decimal of the number, read exactly.
        serde_json::Value::Number(n) => decimal_seconds_ns(&n.to_string()).or_else(|| seconds(n.as_f64()?)),
        serde_json::Value::String(s) => {
            if let Some(ns) = decimal_seconds_ns(s) {
                return Some(ns);
            }
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
                return t.timestamp_nanos_opt();
            }
            let naive = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").ok()?;
            naive.and_utc().timestamp_nanos_opt()
        }
        _ => None,
    }
}

/// `"1796043576.382629"` as nanoseconds, exactly (through f64 the microseconds would drift).
fn decimal_seconds_ns(s: &str) -> Option<i64> {
    let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = &fraction[..fraction.len().min(9)];
    let nanos = if digits.is_empty() { 0 } else { digits.parse::<i64>().ok()? * 10i64.pow(9 - digits.len() as u32) };
    whole.parse::<i64>().ok()?.checked_mul(1_000_000_000)?.checked_add(nanos).filter(|ns| *ns > 0)
}

/// Decodes one line of sfacctd's counter stream; a generic interface record goes to `push`.
pub fn decode_record(rec: &[u8], limits: &DecodeLimits, push: &mut impl FnMut(&CounterRecord<'_>)) -> Result<(), RejectReason> {
    let line: Line = serde_json::from_slice(rec).map_err(|e| RejectReason::of_json_error(&e))?;
    if line.event_type != "log" || line.sf_cnt_type.as_deref() != Some("sflow_cnt_generic") {
        return Err(RejectReason::UnsupportedMeasurement);
    }
    let t = timestamp_ns(&line.timestamp).ok_or(RejectReason::BadTimestamp)?;
    let device = line.peer_ip_src.as_deref().filter(|d| !d.is_empty()).ok_or(RejectReason::WrongSchema)?;
    let interface = line.if_index.ok_or(RejectReason::WrongSchema)?.to_string();
    let in_octets = line.in_octets.as_ref().map(|v| counter_value(v, 64)).transpose()?;
    let out_octets = line.out_octets.as_ref().map(|v| counter_value(v, 64)).transpose()?;
    push(&CounterRecord {
        event_time_ns: limits.check_time(t)?,
        site_id: "",
        device,
        interface: &interface,
        in_octets,
        out_octets,
        counter_bits: 64,
        link_up: line.if_status.map(|s| s & 2 != 0),
        speed_bps: line.if_speed.filter(|s| *s > 0),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as sfacctd 1.7.7 wrote them for sFlow v5 counter samples (generic interface
    /// records), timestamps as with `timestamps_utc: true`.
    const UP: &str = r#"{"seq": 1, "timestamp": "2026-11-30 12:58:51.045302", "peer_ip_src": "192.0.2.1", "event_type": "log", "source_id_index": 1, "sflow_seq": 1, "sflow_cnt_seq": 1, "sf_cnt_type": "sflow_cnt_generic", "ifIndex": 1, "ifType": 6, "ifSpeed": 100000000, "ifDirection": 1, "ifStatus": 3, "ifInOctets": 1000000, "ifInUcastPkts": 1000, "ifInMulticastPkts": 11, "ifInBroadcastPkts": 12, "ifInDiscards": 13, "ifInErrors": 14, "ifInUnknownProtos": 15, "ifOutOctets": 500000, "ifOutUcastPkts": 500, "ifOutMulticastPkts": 21, "ifOutBroadcastPkts": 22, "ifOutDiscards": 23, "ifOutErrors": 24, "ifPromiscuousMode": 0}"#;
    const DOWN: &str = r#"{"seq": 4, "timestamp": "2026-11-30 12:58:53.045811", "peer_ip_src": "192.0.2.1", "event_type": "log", "source_id_index": 2, "sflow_seq": 2, "sflow_cnt_seq": 2, "sf_cnt_type": "sflow_cnt_generic", "ifIndex": 2, "ifType": 6, "ifSpeed": 50000000, "ifDirection": 1, "ifStatus": 1, "ifInOctets": 2250000, "ifInUcastPkts": 1100, "ifInMulticastPkts": 11, "ifInBroadcastPkts": 12, "ifInDiscards": 13, "ifInErrors": 14, "ifInUnknownProtos": 15, "ifOutOctets": 1125000, "ifOutUcastPkts": 550, "ifOutMulticastPkts": 21, "ifOutBroadcastPkts": 22, "ifOutDiscards": 23, "ifOutErrors": 24, "ifPromiscuousMode": 0}"#;

    type Sample = (i64, String, String, Option<u64>, Option<u64>, Option<bool>, Option<u64>);

    fn decode(line: &str) -> Result<Sample, RejectReason> {
        let limits = DecodeLimits { max_message_bytes: 1 << 20, max_bytes_per_record: 1 << 40, min_time_ns: 0, max_time_ns: i64::MAX };
        let mut got = None;
        decode_record(line.as_bytes(), &limits, &mut |r| {
            got = Some((r.event_time_ns, r.device.to_string(), r.interface.to_string(), r.in_octets, r.out_octets, r.link_up, r.speed_bps))
        })?;
        Ok(got.expect("a sample"))
    }

    #[test]
    fn generic_interface_records_are_counter_samples_with_link_state_and_speed() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-30T12:58:51.045302Z").unwrap().timestamp_nanos_opt().unwrap();
        assert_eq!(decode(UP), Ok((t, "192.0.2.1".into(), "1".into(), Some(1_000_000), Some(500_000), Some(true), Some(100_000_000))));
        // ifStatus 1: admin up, oper down.
        assert_eq!(decode(DOWN).unwrap().5, Some(false));
        assert_eq!(decode(&DOWN.replace(r#""ifStatus": 1"#, r#""ifStatus": 0"#)).unwrap().5, Some(false));
    }

    #[test]
    fn every_timestamp_form_of_sfacctd_reads_the_same() {
        let want = decode(UP).unwrap().0;
        for stamp in
            [r#""2026-11-30T12:58:51.045302Z""#, r#""2026-11-30T13:58:51.045302+01:00""#, r#""1796043531.045302""#, "1796043531.045302"]
        {
            let line = UP.replace(r#""2026-11-30 12:58:51.045302""#, stamp);
            assert_eq!(decode(&line).unwrap().0, want, "{stamp}");
        }
    }

    #[test]
    fn other_lines_are_skipped_by_reason() {
        let init = r#"{"seq": 0, "timestamp": "2026-11-30 12:58:51.045302", "peer_src_ip": "192.0.2.1", "event_type": "log_init"}"#;
        assert_eq!(decode(init), Err(RejectReason::UnsupportedMeasurement));
        let vlan = UP.replace("sflow_cnt_generic", "sflow_cnt_vlan");
        assert_eq!(decode(&vlan), Err(RejectReason::UnsupportedMeasurement));
        let stub = r#"{"seq": 4, "timestamp": "2026-11-30 12:58:51.045302", "peer_ip_src": "192.0.2.1", "event_type": "log", "source_id_index": 3, "sflow_seq": 7, "sflow_cnt_seq": 70}"#;
        assert_eq!(decode(stub), Err(RejectReason::UnsupportedMeasurement));
        assert_eq!(decode(&UP.replace(r#""peer_ip_src": "192.0.2.1", "#, "")), Err(RejectReason::WrongSchema));
        assert_eq!(decode(&UP.replace(r#""ifIndex": 1, "#, "")), Err(RejectReason::WrongSchema));
        assert_eq!(decode(&UP.replace("2026-11-30 12:58:51.045302", "yesterday")), Err(RejectReason::BadTimestamp));
        assert_eq!(decode(&UP.replace(r#""ifInOctets": 1000000"#, r#""ifInOctets": -5"#)), Err(RejectReason::NegativeCounter));
        assert!(decode("{not json").is_err());
    }
}
