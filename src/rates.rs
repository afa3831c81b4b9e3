//! Interface byte rates from cumulative octet counters (Telegraf `net` and SNMP samples).
//!
//! A counter sample alone says nothing about traffic; the difference from the interface's
//! previous sample does. This stage keeps the last sample of every (device, interface,
//! direction), per input partition so that a partition's state moves with its checkpoint, and
//! turns each new sample into one row: the bytes since the previous sample and the seconds
//! between them. The window SQL sums both, so `sum(bytes) / sum(seconds)` is the mean rate.
//!
//! When a counter goes down it either wrapped (passed its width, 2^32 or 2^64) or restarted
//! from zero (device reboot, counter cleared). A decrease that is less than half the counter's
//! range away when read as a wrap is taken as a wrap; otherwise as a reset, and the new value
//! counts as the bytes since the reset (as Prometheus' `rate()` assumes). For 64-bit counters a
//! decrease is in practice always a reset. A sample not newer than the previous one is skipped.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, PrimitiveArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{Float64Type, TimestampNanosecondType, UInt8Type, UInt64Type};
use serde::{Deserialize, Serialize};

use crate::schema::interface_traffic_schema;
use crate::types::PartitionId;

/// The last sample of one counter, as kept in a partition's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterBaseline {
    pub device: String,
    pub interface: String,
    /// `in` or `out`.
    pub direction: String,
    pub time_ns: i64,
    pub value: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CounterKey {
    device: String,
    interface: String,
    direction: &'static str,
}

#[derive(Debug, Clone, Copy)]
struct Last {
    time_ns: i64,
    value: u64,
}

/// What happened to counter samples, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CounterStats {
    /// Increases since the previous sample.
    pub deltas: u64,
    /// First sample of a counter: kept as the baseline, no traffic yet.
    pub baselines: u64,
    /// Decreases read as a wrap past the counter's width.
    pub wraps: u64,
    /// Decreases read as a restart from zero.
    pub resets: u64,
    /// Samples not newer than the counter's previous one (skipped).
    pub stale: u64,
}

/// The traffic between two readings of a counter of `bits` width, and how it was read.
fn delta(prev: u64, cur: u64, bits: u8) -> (u64, Option<&'static str>) {
    if cur >= prev {
        return (cur - prev, None);
    }
    let range = 1u128 << bits.clamp(1, 64);
    let wrapped = range - u128::from(prev) + u128::from(cur);
    if wrapped < range / 2 { (wrapped as u64, Some("wrap")) } else { (cur, Some("reset")) }
}

/// Per-partition last samples of every counter.
#[derive(Debug, Default)]
pub struct CounterRates {
    last: HashMap<PartitionId, HashMap<CounterKey, Last>>,
}

impl CounterRates {
    /// Turns a batch of counter samples (schema `decode::counter_schema`) from `partition` into
    /// interface traffic rows ([`interface_traffic_schema`]), in sample order; also returns the
    /// sample row of each traffic row.
    pub fn apply(&mut self, partition: PartitionId, samples: &RecordBatch) -> (RecordBatch, CounterStats, Vec<u32>) {
        let col = |name: &str| samples.column_by_name(name).expect("counter_schema column");
        let times = col("event_time").as_primitive::<TimestampNanosecondType>();
        let (sites, devices, interfaces) =
            (col("site_id").as_string::<i32>(), col("device").as_string::<i32>(), col("interface").as_string::<i32>());
        let bits = col("counter_bits").as_primitive::<UInt8Type>();
        let (link_up, speed) = (col("link_up").as_boolean(), col("speed_bits_per_second").as_primitive::<UInt64Type>());
        let values = [("in", col("in_octets").as_primitive::<UInt64Type>()), ("out", col("out_octets").as_primitive::<UInt64Type>())];

        let last = self.last.entry(partition).or_default();
        let mut stats = CounterStats::default();
        let mut source_rows = Vec::new();
        let (mut t_out, mut site_out, mut dev_out, mut if_out, mut dir_out, mut bytes_out, mut secs_out) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut up_out, mut speed_out) = (Vec::new(), Vec::new());
        for i in 0..samples.num_rows() {
            let t = times.value(i);
            // A sample without a device is keyed by its site tag (the decoder requires one of them).
            let device = if devices.value(i).is_empty() { sites.value(i) } else { devices.value(i) };
            for (direction, column) in &values {
                if column.is_null(i) {
                    continue;
                }
                let value = column.value(i);
                let key = CounterKey { device: device.to_string(), interface: interfaces.value(i).to_string(), direction };
                let Some(prev) = last.get(&key).copied() else {
                    stats.baselines += 1;
                    last.insert(key, Last { time_ns: t, value });
                    continue;
                };
                if t <= prev.time_ns {
                    stats.stale += 1;
                    continue;
                }
                let (bytes, how) = delta(prev.value, value, bits.value(i));
                match how {
                    Some("wrap") => stats.wraps += 1,
                    Some(_) => stats.resets += 1,
                    None => stats.deltas += 1,
                }
                last.insert(key, Last { time_ns: t, value });
                source_rows.push(i as u32);
                t_out.push(t);
                site_out.push(sites.value(i));
                dev_out.push(devices.value(i));
                if_out.push(interfaces.value(i));
                dir_out.push(*direction);
                bytes_out.push(bytes);
                secs_out.push((t - prev.time_ns) as f64 / 1e9);
                up_out.push(link_up.is_valid(i).then(|| link_up.value(i)));
                speed_out.push(speed.is_valid(i).then(|| speed.value(i)));
            }
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(PrimitiveArray::<TimestampNanosecondType>::new(t_out.into(), None)),
            Arc::new(StringArray::from(site_out)),
            Arc::new(StringArray::from(dev_out)),
            Arc::new(StringArray::from(if_out)),
            Arc::new(StringArray::from(dir_out)),
            Arc::new(PrimitiveArray::<UInt64Type>::new(bytes_out.into(), None)),
            Arc::new(PrimitiveArray::<Float64Type>::new(secs_out.into(), None)),
            Arc::new(datafusion::arrow::array::BooleanArray::from(up_out)),
            Arc::new(PrimitiveArray::<UInt64Type>::from(speed_out)),
        ];
        let out = RecordBatch::try_new(interface_traffic_schema(), columns).expect("columns match interface_traffic_schema");
        (out, stats, source_rows)
    }

    /// A partition's last samples (for its checkpoint).
    pub fn partition_baselines(&self, partition: PartitionId) -> Vec<CounterBaseline> {
        let mut out: Vec<CounterBaseline> = self
            .last
            .get(&partition)
            .into_iter()
            .flatten()
            .map(|(k, l)| CounterBaseline {
                device: k.device.clone(),
                interface: k.interface.clone(),
                direction: k.direction.to_string(),
                time_ns: l.time_ns,
                value: l.value,
            })
            .collect();
        out.sort_by(|a, b| (&a.device, &a.interface, &a.direction).cmp(&(&b.device, &b.interface, &b.direction)));
        out
    }

    /// Replaces a partition's last samples with a checkpoint's.
    pub fn restore_partition(&mut self, partition: PartitionId, baselines: &[CounterBaseline]) {
        let last = baselines
            .iter()
            .map(|b| {
                let direction = if b.direction == "out" { "out" } else { "in" };
                (
                    CounterKey { device: b.device.clone(), interface: b.interface.clone(), direction },
                    Last { time_ns: b.time_ns, value: b.value },
                )
            })
            .collect();
        self.last.insert(partition, last);
    }

    /// Forgets a partition (revoked: its new owner restores it from the checkpoint).
    pub fn release_partition(&mut self, partition: PartitionId) {
        self.last.remove(&partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{CounterColumns, CounterRecord};

    const S: i64 = 1_000_000_000;
    const T0: i64 = 1_764_000_000 * S;

    fn samples(rows: &[(i64, &str, Option<u64>, Option<u64>, u8)]) -> RecordBatch {
        let mut cols = CounterColumns::default();
        for &(t, interface, in_octets, out_octets, counter_bits) in rows {
            cols.push(&CounterRecord {
                event_time_ns: t,
                site_id: "",
                device: "r1",
                interface,
                in_octets,
                out_octets,
                counter_bits,
                link_up: None,
                speed_bps: None,
            });
        }
        cols.finish()
    }

    /// (interface, direction, bytes, seconds) of each output row.
    fn rows(b: &RecordBatch) -> Vec<(String, String, u64, f64)> {
        let s = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
        let bytes = b.column_by_name("bytes").unwrap().as_primitive::<UInt64Type>().clone();
        let secs = b.column_by_name("seconds").unwrap().as_primitive::<Float64Type>().clone();
        (0..b.num_rows()).map(|i| (s("interface").value(i).into(), s("direction").value(i).into(), bytes.value(i), secs.value(i))).collect()
    }

    #[test]
    fn deltas_wraps_and_resets() {
        let mut rates = CounterRates::default();
        let near_top = u64::from(u32::MAX) - 999;
        let (out, stats, source_rows) = rates.apply(
            1,
            &samples(&[
                (T0, "eth0", Some(1_000), Some(50), 64),
                (T0 + 10 * S, "eth0", Some(6_000), Some(80), 64),
                (T0, "wan", Some(near_top), None, 32),
                (T0 + 10 * S, "wan", Some(500), None, 32), // wrapped: 1,000 up to 2^32, then 500
                (T0 + 20 * S, "eth0", Some(700), Some(90), 64), // rebooted: 700 since the reset
                (T0 + 20 * S, "eth0", Some(800), Some(95), 64), // not newer: skipped
                (T0 + 30 * S, "wan", Some(100), None, 32), // 32-bit, far from a wrap: a reset
            ]),
        );
        assert_eq!(
            rows(&out),
            vec![
                ("eth0".into(), "in".into(), 5_000, 10.0),
                ("eth0".into(), "out".into(), 30, 10.0),
                ("wan".into(), "in".into(), 1_500, 10.0),
                ("eth0".into(), "in".into(), 700, 10.0),
                ("eth0".into(), "out".into(), 10, 10.0),
                ("wan".into(), "in".into(), 100, 20.0),
            ]
        );
        assert_eq!(source_rows, vec![1, 1, 3, 4, 4, 6]);
        assert_eq!(stats, CounterStats { deltas: 3, baselines: 3, wraps: 1, resets: 2, stale: 2 });
    }

    #[test]
    fn partitions_keep_their_own_baselines_through_a_checkpoint() {
        let mut rates = CounterRates::default();
        rates.apply(1, &samples(&[(T0, "eth0", Some(100), None, 64)]));
        rates.apply(2, &samples(&[(T0, "eth0", Some(900), None, 64)]));
        let saved = rates.partition_baselines(1);
        rates.release_partition(1);

        let mut taken_over = CounterRates::default();
        taken_over.restore_partition(1, &saved);
        let (out, stats, _) = taken_over.apply(1, &samples(&[(T0 + 5 * S, "eth0", Some(400), None, 64)]));
        assert_eq!(rows(&out), vec![("eth0".into(), "in".into(), 300, 5.0)]);
        assert_eq!(stats.baselines, 0);
        assert_eq!(rates.partition_baselines(2)[0].value, 900);
    }

    #[test]
    fn wrap_or_reset_by_distance() {
        assert_eq!(delta(10, 25, 32), (15, None));
        assert_eq!(delta(u64::from(u32::MAX), 0, 32), (1, Some("wrap")));
        assert_eq!(delta(1 << 30, 5, 32), (5, Some("reset")));
        assert_eq!(delta(u64::MAX - 1, 3, 64), (5, Some("wrap")));
        assert_eq!(delta(1 << 40, 3, 64), (3, Some("reset")));
    }
}
