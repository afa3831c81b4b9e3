//! Which time of a flow places it in a window, and spreading long flows over the windows they
//! cover.
//!
//! A NetFlow/IPFIX record sums a flow from its first to its last packet; routers export long
//! flows every active timeout (often 60 s or more). Counted at one instant, a long flow puts a
//! minute of traffic into one 10 s window and none into the five before it. `spread` apportions
//! its bytes and packets over the windows its [start, end] covers, in proportion to the time it
//! spent in each, so per-window bandwidth is what the link carried.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, PrimitiveArray, RecordBatch, UInt32Array};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{TimestampNanosecondType, UInt64Type};

use crate::types::EventTime;

/// Spreading as configured: the window size and the most windows one flow may cover.
#[derive(Debug, Clone, Copy)]
pub struct Spreader {
    size_ns: i64,
    max_windows: u32,
}

impl Spreader {
    pub fn new(window: std::time::Duration, max_windows: u32) -> Self {
        Self { size_ns: window.as_nanos() as i64, max_windows }
    }

    /// Decoded flows of a source in `mode`: spread if the mode is `spread` (with what spreading
    /// did), else as they are.
    pub fn apply(&self, mode: EventTime, batch: RecordBatch) -> (RecordBatch, Option<SpreadStats>) {
        if mode != EventTime::Spread {
            return (batch, None);
        }
        let (out, stats) = spread(&batch, self.size_ns, self.max_windows);
        (out, Some(stats))
    }
}

/// What spreading did to one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SpreadStats {
    /// Rows added: a flow over three windows adds two.
    pub extra_rows: u64,
    /// Flows whose start was after their end, or more than the cap of windows before it:
    /// spread over the last windows only (or not at all).
    pub clamped: u64,
}

/// The windows of `size_ns` that the flow [start, end] covers, at most `max_windows`: for each,
/// the event time of its piece (the start of the overlap; the end for the last) and the
/// cumulative overlap up to the end of that window. Returns whether the span was clamped.
fn pieces(start: i64, end: i64, size_ns: i64, max_windows: i64, out: &mut Vec<(i64, i128)>) -> bool {
    out.clear();
    let end_window = end.div_euclid(size_ns);
    let mut clamped = start > end;
    let mut start = start.min(end);
    if end_window - start.div_euclid(size_ns) >= max_windows {
        start = (end_window - max_windows + 1) * size_ns;
        clamped = true;
    }
    let mut t = start;
    loop {
        let window_end = (t.div_euclid(size_ns) + 1) * size_ns;
        if window_end > end {
            out.push((end, i128::from(end - start)));
            return clamped;
        }
        out.push((t, i128::from(window_end - start)));
        t = window_end;
    }
}

/// The share of `total` up to cumulative overlap `upto` of `span` (> 0), rounded down: the
/// differences of consecutive shares, the last piece taking the rest, sum exactly to `total`.
fn share(total: u64, upto: i128, span: i128) -> u64 {
    (i128::from(total) * upto / span) as u64
}

/// Spreads the flows of a decoded batch (schema [`crate::schema::flow_schema`]) over the windows
/// of `size_ns` that each covers (from `flow_start` to `event_time`), at most `max_windows` per
/// flow. Pieces keep the record's order, earliest first, so the partition's clock advances as
/// with `flow_end`; the piece in the window of the end keeps the end as its time and carries
/// the record's `flows`. Bytes and packets are apportioned by overlap and sum exactly to the
/// record's; pieces with neither are left out.
pub fn spread(batch: &RecordBatch, size_ns: i64, max_windows: u32) -> (RecordBatch, SpreadStats) {
    let mut stats = SpreadStats::default();
    let col = |name: &str| batch.column_by_name(name).expect("flow_schema column");
    let ends = col("event_time").as_primitive::<TimestampNanosecondType>().values();
    let starts = col("flow_start").as_primitive::<TimestampNanosecondType>().values();
    let max_windows = i64::from(max_windows.max(1));
    // Most flows end in the window they started in: then the batch is returned as is.
    let single = |i: usize| starts[i] <= ends[i] && starts[i].div_euclid(size_ns) == ends[i].div_euclid(size_ns);
    if (0..batch.num_rows()).all(single) {
        return (batch.clone(), stats);
    }
    let bytes = col("bytes").as_primitive::<UInt64Type>().values();
    let packets = col("packets").as_primitive::<UInt64Type>().values();
    let flows = col("flows").as_primitive::<UInt64Type>().values();
    let n = batch.num_rows();
    let (mut rows, mut times) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut out_bytes, mut out_packets, mut out_flows) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let mut spans = Vec::new();
    for i in 0..n {
        if single(i) {
            rows.push(i as u32);
            times.push(ends[i]);
            out_bytes.push(bytes[i]);
            out_packets.push(packets[i]);
            out_flows.push(flows[i]);
            continue;
        }
        stats.clamped += u64::from(pieces(starts[i], ends[i], size_ns, max_windows, &mut spans));
        let span = spans.last().expect("at least the end's window").1;
        let (mut given_bytes, mut given_packets, mut kept) = (0u64, 0u64, 0u64);
        for (k, &(t, upto)) in spans.iter().enumerate() {
            let last = k + 1 == spans.len();
            let (b, p) = if last {
                (bytes[i] - given_bytes, packets[i] - given_packets)
            } else {
                (share(bytes[i], upto, span) - given_bytes, share(packets[i], upto, span) - given_packets)
            };
            given_bytes += b;
            given_packets += p;
            if b == 0 && p == 0 && !last {
                continue;
            }
            rows.push(i as u32);
            times.push(t);
            out_bytes.push(b);
            out_packets.push(p);
            out_flows.push(if last { flows[i] } else { 0 });
            kept += 1;
        }
        stats.extra_rows += kept - 1;
    }
    let rows = UInt32Array::from(rows);
    let schema = batch.schema();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(field, column)| -> ArrayRef {
            match field.name().as_str() {
                "event_time" => Arc::new(PrimitiveArray::<TimestampNanosecondType>::new(std::mem::take(&mut times).into(), None)),
                "bytes" => Arc::new(PrimitiveArray::<UInt64Type>::new(std::mem::take(&mut out_bytes).into(), None)),
                "packets" => Arc::new(PrimitiveArray::<UInt64Type>::new(std::mem::take(&mut out_packets).into(), None)),
                "flows" => Arc::new(PrimitiveArray::<UInt64Type>::new(std::mem::take(&mut out_flows).into(), None)),
                _ => take(column.as_ref(), &rows, None).expect("indices in range"),
            }
        })
        .collect();
    let out = RecordBatch::try_new(schema.clone(), columns).expect("same schema");
    debug_assert_eq!(out.num_rows(), rows.len());
    (out, stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{FlowColumns, FlowRecord};
    use proptest::prelude::*;

    const S: i64 = 10_000_000_000;

    fn batch(flows: &[(i64, i64, u64, u64)]) -> RecordBatch {
        let mut cols = FlowColumns::default();
        for (k, &(start, end, bytes, packets)) in flows.iter().enumerate() {
            cols.push(&FlowRecord {
                event_time_ns: end,
                flow_start_ns: start,
                src_port: k as u16,
                bytes,
                packets,
                flows: 1,
                ..Default::default()
            });
        }
        cols.finish()
    }

    /// (row's src_port = input index, event time, bytes, packets, flows) of each output row.
    fn rows(b: &RecordBatch) -> Vec<(u16, i64, u64, u64, u64)> {
        let c = |n: &str| b.column_by_name(n).unwrap().clone();
        let u = |n: &str| c(n).as_primitive::<UInt64Type>().values().to_vec();
        let (bytes, packets, flows) = (u("bytes"), u("packets"), u("flows"));
        let times = c("event_time").as_primitive::<TimestampNanosecondType>().values().to_vec();
        let ports = c("src_port").as_primitive::<datafusion::arrow::datatypes::UInt16Type>().values().to_vec();
        (0..b.num_rows()).map(|i| (ports[i], times[i], bytes[i], packets[i], flows[i])).collect()
    }

    #[test]
    fn a_flow_over_three_windows_is_split_by_overlap() {
        // 25 s from 5 s into the first window: 5 s, 10 s and 10 s of it in three windows.
        let t0 = 1_764_000_000 * 1_000_000_000;
        let (out, stats) = spread(&batch(&[(t0 + 5 * S / 10, t0 + 3 * S, 2500, 25)]), S, 100);
        assert_eq!(
            rows(&out),
            vec![(0, t0 + S / 2, 500, 5, 0), (0, t0 + S, 1000, 10, 0), (0, t0 + 2 * S, 1000, 10, 0), (0, t0 + 3 * S, 0, 0, 1)]
        );
        assert_eq!(stats, SpreadStats { extra_rows: 3, clamped: 0 });
    }

    #[test]
    fn flows_within_a_window_are_left_alone_and_broken_starts_are_clamped() {
        let t0 = 1_764_000_000 * 1_000_000_000;
        let b = batch(&[(t0, t0 + 1, 10, 1), (t0 + 2, t0 + 3, 20, 2)]);
        let (out, stats) = spread(&b, S, 100);
        assert_eq!(rows(&out), rows(&b));
        assert_eq!(stats, SpreadStats::default());
        // A start a year before the end: only the last 3 windows; a start after the end: none.
        let (out, stats) = spread(&batch(&[(t0 - 365 * 86_400 * 1_000_000_000, t0 + S / 2, 300, 3), (t0 + 2 * S, t0, 7, 1)]), S, 3);
        assert_eq!(rows(&out), vec![(0, t0 - 2 * S, 120, 1, 0), (0, t0 - S, 120, 1, 0), (0, t0 + S / 2, 60, 1, 1), (1, t0, 7, 1, 1)]);
        assert_eq!(stats, SpreadStats { extra_rows: 2, clamped: 2 });
    }

    proptest! {
        /// Every flow's pieces sum exactly to its bytes, packets and flows; each piece lies in a
        /// window the flow covers (inside the cap), in time order, with the flows in the end's window.
        #[test]
        fn spreading_preserves_totals_and_places_each_piece_in_its_window(
            flows in proptest::collection::vec((0i64..40 * S, 0i64..40 * S, 0u64..1 << 40, 0u64..1 << 30), 1..30),
            size in prop_oneof![Just(S), 1i64..5 * S],
            cap in 1u32..50,
        ) {
            let t0 = 1_764_000_000 * 1_000_000_000;
            let input: Vec<_> = flows.iter().map(|&(a, d, b, p)| (t0 + a, t0 + a + d - 10 * S, b, p)).collect();
            let (out, stats) = spread(&batch(&input), size, cap);
            let out = rows(&out);
            prop_assert_eq!(out.len() as u64, input.len() as u64 + stats.extra_rows);
            for (k, &(start, end, bytes, packets)) in input.iter().enumerate() {
                let mine: Vec<_> = out.iter().filter(|r| usize::from(r.0) == k).collect();
                prop_assert_eq!(mine.iter().map(|r| r.2).sum::<u64>(), bytes);
                prop_assert_eq!(mine.iter().map(|r| r.3).sum::<u64>(), packets);
                prop_assert_eq!(mine.iter().map(|r| r.4).sum::<u64>(), 1);
                let last = mine.last().unwrap();
                prop_assert_eq!((last.1, last.4), (end, 1));
                let first_window = end.div_euclid(size) - i64::from(cap) + 1;
                for w in mine.windows(2) {
                    prop_assert!(w[0].1.div_euclid(size) < w[1].1.div_euclid(size), "one piece per window, in order");
                }
                for r in &mine {
                    let window = r.1.div_euclid(size);
                    prop_assert!(window >= first_window && window <= end.div_euclid(size));
                    if start <= end {
                        prop_assert!(r.1 >= start && window >= start.div_euclid(size));
                    }
                }
                // Pieces are proportional to overlap within one unit (rounding down, carried on).
                if start <= end && end.div_euclid(size) - start.div_euclid(size) < i64::from(cap) && end > start {
                    for r in &mine {
                        let w0 = r.1.div_euclid(size) * size;
                        let overlap = (end.min(w0 + size) - start.max(w0)).max(0);
                        let exact = bytes as f64 * overlap as f64 / (end - start) as f64;
                        prop_assert!((r.2 as f64 - exact).abs() <= 1.0 + exact * 1e-9, "{} vs {}", r.2, exact);
                    }
                }
            }
        }
    }
}
