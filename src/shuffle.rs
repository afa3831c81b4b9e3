//! What one stage of a scale-out deployment hands the next (docs/scale-out.md): the partial
//! aggregates an *ingest* stage made from one source partition over one span of offsets, cut by
//! site for the partitions of an internal topic, and the ledger with which the *site* stage
//! merges each span exactly once.
//!
//! A [`Partial`] carries, besides the states, the source partition's clocks after the span: the
//! site stage advances its watermarks with them, so a window closes there exactly when it would
//! have closed on one instance reading every partition. Every internal partition gets a partial
//! for every span, empty or not, so every site-stage instance sees every source's progress.

use std::collections::BTreeMap;

use datafusion::arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use serde::{Deserialize, Serialize};

use crate::checkpoint::PartitionKey;
use crate::window::ExporterKey;

/// A message of the internal topic that cannot be read: counted and skipped by the site stage.
#[derive(Debug, thiserror::Error)]
pub enum ShuffleError {
    #[error("partial: {0}")]
    Malformed(String),
    #[error("partial: table {table}: {source}")]
    Arrow { table: usize, source: ArrowError },
}

/// The internal topic cannot be written: at start the configuration's fault; later the
/// checkpoint fails (and is retried) rather than commit offsets whose partials are not out.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("scale_out.topic {topic:?}: {message}")]
    Setup { topic: String, message: String },
    #[error("scale_out.topic {topic:?}: {failed} partial(s) not delivered; they stay in the checkpoint and are sent again")]
    NotDelivered { topic: String, failed: u64 },
    #[error("scale_out: cutting states by site: {0}")]
    Route(#[from] datafusion::arrow::error::ArrowError),
    #[error("scale_out: encoding a partial: {0}")]
    Encode(#[from] ShuffleError),
}

/// One span of one source partition, for one partition of the internal topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    pub source: PartitionKey,
    /// The span's offsets: from its first message to the one after its last.
    pub from_offset: i64,
    pub to_offset: i64,
    /// The source partition's clocks after the span: `(exporter, largest event time)`.
    pub clocks: Vec<(ExporterKey, i64)>,
    /// Per table (registry order), the state rows of the sites routed to this partition.
    pub states: Vec<Vec<RecordBatch>>,
    /// The span's on-time records that readiness reads one by one (probe results, uplink
    /// counters and link states), each with its table (registry order), of the sites routed to
    /// this partition: the site stage judges them as one instance would.
    pub records: Vec<(usize, RecordBatch)>,
    /// A span too large for one message is cut into `parts` messages, sent in order.
    pub part: u32,
    pub parts: u32,
}

#[derive(Serialize, Deserialize)]
struct Header {
    topic: String,
    partition: i32,
    from: i64,
    to: i64,
    /// Exporter keys as decimal strings (JSON numbers stop at 64 bits).
    clocks: Vec<(String, i64)>,
    tables: usize,
    part: u32,
    parts: u32,
    /// Written by earlier siteflows (never now): one Arrow IPC stream of on-time probe
    /// records follows the tables; read as [`LEGACY_PROBE_RECORDS`].
    #[serde(default)]
    records: bool,
    /// The tables of the Arrow IPC streams of on-time records that follow the tables, in order.
    #[serde(default)]
    record_tables: Vec<usize>,
}

/// The table of on-time records in a partial from a siteflow that sent only probe results
/// (header `records: true`): the site stage gives them to the table that reads probe records.
pub const LEGACY_PROBE_RECORDS: usize = usize::MAX;

impl Partial {
    /// A header line of JSON, then per table the length (u64, little-endian) and an Arrow IPC
    /// stream of its states.
    pub fn encode(&self, schemas: &[SchemaRef]) -> Result<Vec<u8>, ShuffleError> {
        let header = Header {
            topic: self.source.topic.clone(),
            partition: self.source.partition,
            from: self.from_offset,
            to: self.to_offset,
            clocks: self.clocks.iter().map(|(k, t)| (k.to_string(), *t)).collect(),
            tables: self.states.len(),
            part: self.part,
            parts: self.parts,
            records: false,
            record_tables: record_tables(&self.records),
        };
        let mut out = serde_json::to_vec(&header).expect("a header serialises");
        out.push(b'\n');
        for (table, (batches, schema)) in self.states.iter().zip(schemas).enumerate() {
            let mut ipc = Vec::new();
            let arrow = |source| ShuffleError::Arrow { table, source };
            let mut writer = StreamWriter::try_new(&mut ipc, schema).map_err(arrow)?;
            for b in batches.iter().filter(|b| b.num_rows() > 0) {
                writer.write(b).map_err(arrow)?;
            }
            writer.finish().map_err(arrow)?;
            drop(writer);
            out.extend_from_slice(&(ipc.len() as u64).to_le_bytes());
            out.extend_from_slice(&ipc);
        }
        for (i, table) in header.record_tables.iter().enumerate() {
            let batches: Vec<&RecordBatch> = self.records.iter().filter(|(t, _)| t == table).map(|(_, b)| b).collect();
            let arrow = |source| ShuffleError::Arrow { table: schemas.len() + i, source };
            let mut ipc = Vec::new();
            let mut writer = StreamWriter::try_new(&mut ipc, &batches[0].schema()).map_err(arrow)?;
            for b in batches {
                writer.write(b).map_err(arrow)?;
            }
            writer.finish().map_err(arrow)?;
            drop(writer);
            out.extend_from_slice(&(ipc.len() as u64).to_le_bytes());
            out.extend_from_slice(&ipc);
        }
        Ok(out)
    }

    /// Reads what [`Partial::encode`] wrote; `schemas` are the site stage's state schemas, which
    /// the message's must equal (both stages run the same pipeline SQL).
    pub fn decode(bytes: &[u8], schemas: &[SchemaRef]) -> Result<Self, ShuffleError> {
        let malformed = |m: String| ShuffleError::Malformed(m);
        let end = bytes.iter().position(|&b| b == b'\n').ok_or_else(|| malformed("no header line".into()))?;
        let header: Header = serde_json::from_slice(&bytes[..end]).map_err(|e| malformed(format!("header: {e}")))?;
        if header.tables != schemas.len() {
            return Err(malformed(format!("{} tables, this pipeline has {}", header.tables, schemas.len())));
        }
        let mut clocks = Vec::with_capacity(header.clocks.len());
        for (k, t) in header.clocks {
            clocks.push((k.parse().map_err(|_| malformed(format!("clock {k:?} is not an exporter key")))?, t));
        }
        let mut rest = &bytes[end + 1..];
        let mut states = Vec::with_capacity(schemas.len());
        for (table, schema) in schemas.iter().enumerate() {
            let (len, tail) = rest.split_at_checked(8).ok_or_else(|| malformed(format!("table {table}: truncated")))?;
            let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
            let (ipc, tail) = tail.split_at_checked(len).ok_or_else(|| malformed(format!("table {table}: truncated")))?;
            let arrow = |source| ShuffleError::Arrow { table, source };
            let reader = StreamReader::try_new(ipc, None).map_err(arrow)?;
            if reader.schema() != *schema {
                return Err(malformed(format!("table {table}: the states' schema differs from this pipeline's (another pipeline SQL?)")));
            }
            states.push(reader.collect::<Result<Vec<_>, _>>().map_err(arrow)?);
            rest = tail;
        }
        let mut streams: Vec<usize> = header.record_tables.clone();
        if header.records {
            streams.push(LEGACY_PROBE_RECORDS);
        }
        let mut records = Vec::new();
        for (i, &table) in streams.iter().enumerate() {
            if table >= schemas.len() && table != LEGACY_PROBE_RECORDS {
                return Err(malformed(format!("records of table {table}, this pipeline has {}", schemas.len())));
            }
            let (len, tail) = rest.split_at_checked(8).ok_or_else(|| malformed(format!("records of table {table}: truncated")))?;
            let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
            let (ipc, tail) = tail.split_at_checked(len).ok_or_else(|| malformed(format!("records of table {table}: truncated")))?;
            let arrow = |source| ShuffleError::Arrow { table: schemas.len() + i, source };
            for batch in StreamReader::try_new(ipc, None).map_err(arrow)? {
                records.push((table, batch.map_err(arrow)?));
            }
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(malformed(format!("{} bytes after the last table", rest.len())));
        }
        let source = PartitionKey { topic: header.topic, partition: header.partition };
        if header.parts == 0 || header.part >= header.parts {
            return Err(malformed(format!("part {} of {}", header.part, header.parts)));
        }
        Ok(Self { source, from_offset: header.from, to_offset: header.to, clocks, states, records, part: header.part, parts: header.parts })
    }

    /// Encodes the partial in as many parts as it takes for each message to stay under
    /// `max_bytes` (brokers refuse messages above their `message.max.bytes`, 1 MB by default);
    /// the rows are cut evenly, the clocks go with every part.
    pub fn encode_parts(&self, schemas: &[SchemaRef], max_bytes: usize) -> Result<Vec<Vec<u8>>, ShuffleError> {
        let rows: usize = self.states.iter().flatten().map(RecordBatch::num_rows).sum();
        let mut parts = 1usize;
        loop {
            let pieces = self.cut_rows(parts as u32);
            let encoded = pieces.iter().map(|p| p.encode(schemas)).collect::<Result<Vec<_>, _>>()?;
            if encoded.iter().all(|e| e.len() <= max_bytes) || parts >= rows.max(1) {
                return Ok(encoded);
            }
            parts = (parts * 2).min(rows.max(1));
        }
    }

    /// The partial cut into `parts` pieces of about the same number of state rows (the on-time
    /// records, few, go with the first).
    fn cut_rows(&self, parts: u32) -> Vec<Partial> {
        let n = parts.max(1) as usize;
        let mut pieces: Vec<Partial> = (0..n)
            .map(|i| Partial {
                states: vec![Vec::new(); self.states.len()],
                records: if i == 0 { self.records.clone() } else { Vec::new() },
                part: i as u32,
                parts: n as u32,
                ..self.clone()
            })
            .collect();
        let rows: Vec<(usize, &RecordBatch)> = self.states.iter().enumerate().flat_map(|(t, bs)| bs.iter().map(move |b| (t, b))).collect();
        let total: usize = rows.iter().map(|(_, b)| b.num_rows()).sum();
        let per = total.div_ceil(n).max(1);
        let mut at = 0usize;
        for (table, batch) in rows {
            let mut offset = 0;
            while offset < batch.num_rows() {
                let piece = (at / per).min(n - 1);
                let take = (per - at % per).min(batch.num_rows() - offset);
                pieces[piece].states[table].push(batch.slice(offset, take));
                offset += take;
                at += take;
            }
        }
        pieces
    }
}

/// The internal partition of a site: FNV-1a of its id, so every instance and version routes a
/// site the same way whatever its inventory's order.
pub fn partition_of(site: &str, partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in site.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

/// What one span of one source partition produced: its clocks after the span, its open states
/// per table, and its on-time records that readiness reads one by one.
pub struct Span<'a> {
    pub source: &'a PartitionKey,
    pub offsets: (i64, i64),
    pub clocks: &'a [(ExporterKey, i64)],
    pub states: &'a [Vec<RecordBatch>],
    pub records: &'a [(usize, RecordBatch)],
}

/// The distinct tables of `records`, in order of first appearance: one IPC stream each.
fn record_tables(records: &[(usize, RecordBatch)]) -> Vec<usize> {
    let mut tables = Vec::new();
    for (table, _) in records {
        if !tables.contains(table) {
            tables.push(*table);
        }
    }
    tables
}

/// The partition of each row of `batch`, by its `site` column (at `column`).
fn targets(batch: &RecordBatch, column: usize, partitions: u32) -> Result<Vec<u32>, ArrowError> {
    let sites = cast(batch.column(column), &DataType::Utf8)?;
    let sites = sites.as_string::<i32>();
    Ok((0..sites.len()).map(|i| partition_of(if sites.is_null(i) { "" } else { sites.value(i) }, partitions)).collect())
}

/// The rows of `batch` whose target is `q`, if any.
fn rows_for(batch: &RecordBatch, targets: &[u32], q: usize) -> Result<Option<RecordBatch>, ArrowError> {
    let mask = BooleanArray::from_iter(targets.iter().map(|&t| Some(t as usize == q)));
    let rows = filter_record_batch(batch, &mask)?;
    Ok((rows.num_rows() > 0).then_some(rows))
}

/// Cuts one span by site into one partial per internal partition (every partition gets one,
/// empty or not: it carries the source's clocks). `site_columns[t]` is the index of table `t`'s
/// `site` column in its state rows.
pub fn route(span: &Span<'_>, site_columns: &[usize], partitions: u32) -> Result<Vec<Partial>, ArrowError> {
    let Span { source, offsets: span, clocks, states, records } = *span;
    let n = partitions.max(1) as usize;
    let mut out: Vec<Partial> = (0..n)
        .map(|_| Partial {
            source: source.clone(),
            from_offset: span.0,
            to_offset: span.1,
            clocks: clocks.to_vec(),
            states: vec![Vec::new(); states.len()],
            records: Vec::new(),
            part: 0,
            parts: 1,
        })
        .collect();
    for (table, batches) in states.iter().enumerate() {
        for batch in batches.iter().filter(|b| b.num_rows() > 0) {
            let targets = targets(batch, site_columns[table], partitions)?;
            for (q, partial) in out.iter_mut().enumerate() {
                partial.states[table].extend(rows_for(batch, &targets, q)?);
            }
        }
    }
    for (table, batch) in records.iter().filter(|(_, b)| b.num_rows() > 0) {
        let column = batch.schema().index_of("site")?;
        let targets = targets(batch, column, partitions)?;
        for (q, partial) in out.iter_mut().enumerate() {
            partial.records.extend(rows_for(batch, &targets, q)?.map(|rows| (*table, rows)));
        }
    }
    Ok(out)
}

/// What the ledger decided about a partial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// New: merge it.
    Merge,
    /// Its span was merged before (a replay after a crash or a rebalance): drop it.
    Duplicate,
    /// It overlaps a merged span without repeating it: cannot be merged exactly; dropped and
    /// counted (the ingest stage replays only whole spans, so this is a bug or a foreign writer).
    Overlap,
    /// The first part of the next span while the last one still misses parts (messages lost
    /// to an offset gap): merge it, and the missing parts are given up, so that one lost
    /// message costs its span and not every span after it.
    MergeAfterLoss,
}

/// Per source partition, the last span merged and how many of its parts: kept in the site
/// stage's checkpoint with the internal partition's offset, so spans are merged exactly once
/// across crashes of either stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    merged: BTreeMap<String, Progress>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Progress {
    to: i64,
    next_part: u32,
    parts: u32,
}

impl Ledger {
    /// Whether to merge a partial: the next part of the span being merged, or the first part of
    /// a span that starts where the last complete one ended (or later: offsets have gaps).
    pub fn admit(&mut self, partial: &Partial) -> Admission {
        let key = partial.source.to_string();
        let (to, part) = (partial.to_offset, partial.part);
        let next = Progress { to, next_part: part + 1, parts: partial.parts };
        match self.merged.get_mut(&key) {
            None if part == 0 => {
                self.merged.insert(key, next);
                Admission::Merge
            }
            None => Admission::Overlap,
            Some(m) if to < m.to || (to == m.to && part < m.next_part) => Admission::Duplicate,
            Some(m) if to == m.to && part == m.next_part => {
                m.next_part += 1;
                Admission::Merge
            }
            Some(m) if to > m.to && partial.from_offset >= m.to && part == 0 => {
                let complete = m.next_part >= m.parts;
                *m = next;
                if complete { Admission::Merge } else { Admission::MergeAfterLoss }
            }
            Some(_) => Admission::Overlap,
        }
    }
}

/// The schemas' `site` column indexes (a pipeline table without one cannot be routed).
pub fn site_columns(schemas: &[SchemaRef]) -> Result<Vec<usize>, String> {
    schemas.iter().enumerate().map(|(t, s)| s.index_of("site").map_err(|_| format!("table {t}: no `site` column in its states"))).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use datafusion::arrow::array::{FixedSizeBinaryArray, StringArray, TimestampNanosecondArray, UInt64Array};
    use datafusion::arrow::datatypes::{Field, Schema, TimeUnit};
    use proptest::prelude::*;

    use super::*;
    use crate::window::{ClosedWindow, WindowOperator, WindowSpec};

    const S: i64 = 1_000_000_000;
    const SQL: &str = "SELECT window_start, site, sum(bytes) AS bytes, count(*) AS records FROM t GROUP BY window_start, site";
    const SITES: [&str; 5] = ["a", "b", "c", "d", "e"];

    fn spec() -> WindowSpec {
        WindowSpec {
            size: Duration::from_secs(10),
            allowed_lateness: Duration::from_secs(30),
            publish_delay: Duration::from_secs(5),
            max_exporter_skew: Duration::from_secs(20),
            correction_horizon: Duration::from_secs(120),
            idle_partition_timeout: Duration::from_secs(3600),
        }
    }

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("event_time", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
            Field::new("exporter", DataType::FixedSizeBinary(16), false),
            Field::new("site", DataType::Utf8, false),
            Field::new("bytes", DataType::UInt64, false),
        ]))
    }

    /// (event time, exporter, site index, bytes)
    type Rec = (i64, u8, usize, u64);

    fn batch(records: &[Rec]) -> RecordBatch {
        let exporters: Vec<[u8; 16]> = records.iter().map(|r| u128::from(r.1).to_be_bytes()).collect();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(TimestampNanosecondArray::from(records.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(FixedSizeBinaryArray::try_from_iter(exporters.iter()).unwrap()),
                Arc::new(StringArray::from(records.iter().map(|r| SITES[r.2]).collect::<Vec<_>>())),
                Arc::new(UInt64Array::from(records.iter().map(|r| r.3).collect::<Vec<_>>())),
            ],
        )
        .unwrap()
    }

    async fn operator() -> WindowOperator {
        let mut op = WindowOperator::new(spec());
        op.add_table("t", "t", &schema(), SQL).await.unwrap();
        op
    }

    /// Per (window start, site): (bytes, records), corrections applied.
    fn fold(windows: &[ClosedWindow], latest: &mut BTreeMap<(i64, String), (u64, i64)>) {
        for w in windows {
            if let Some(previous) = &w.previous {
                for (k, _) in rows(w.start_ns, previous) {
                    latest.remove(&k);
                }
            }
            latest.extend(rows(w.start_ns, &w.rows));
        }
    }

    fn rows(start: i64, b: &RecordBatch) -> Vec<((i64, String), (u64, i64))> {
        let sites = b.column_by_name("site").unwrap().as_string::<i32>();
        let bytes = b.column_by_name("bytes").unwrap().as_primitive::<datafusion::arrow::datatypes::UInt64Type>();
        let records = b.column_by_name("records").unwrap().as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        (0..b.num_rows()).map(|i| ((start, sites.value(i).to_string()), (bytes.value(i), records.value(i)))).collect()
    }

    /// One instance reading every partition: the reference.
    async fn one_instance(batches: &[(u32, Vec<Rec>)]) -> BTreeMap<(i64, String), (u64, i64)> {
        let mut op = operator().await;
        let now = Instant::now();
        op.register_partitions(&[0, 1, 2], now);
        let mut latest = BTreeMap::new();
        for (p, records) in batches {
            op.process(0, *p, &batch(records), now).await.unwrap();
            fold(&op.close_ready(now).await.unwrap().windows, &mut latest);
        }
        fold(&op.flush(now).await.unwrap().windows, &mut latest);
        latest
    }

    /// Ingest operators (one per source partition) hand their states after every batch, through
    /// the codec, to `sites` site-stage operators; every `replay`-th partial is delivered twice.
    async fn two_stages(batches: &[(u32, Vec<Rec>)], sites: u32, replay: usize) -> BTreeMap<(i64, String), (u64, i64)> {
        let now = Instant::now();
        let mut ingest = Vec::new();
        for _ in 0..3 {
            ingest.push(operator().await);
        }
        let mut stage = Vec::new();
        for _ in 0..sites {
            let mut op = operator().await;
            op.register_partitions(&[0, 1, 2], now);
            stage.push((op, Ledger::default()));
        }
        let schemas = [ingest[0].state_schema(0)];
        let site_cols = site_columns(&schemas).unwrap();
        let mut offsets = [0i64; 3];
        let mut latest = BTreeMap::new();
        let mut sent = 0;
        for (p, records) in batches {
            let op = &mut ingest[*p as usize];
            op.process(0, *p, &batch(records), now).await.unwrap();
            let states = op.take_partition_states(*p);
            let clocks = op.watermarks().partition_clocks(*p);
            let from = offsets[*p as usize];
            offsets[*p as usize] += records.len() as i64;
            let source = PartitionKey { topic: "flows".into(), partition: *p as i32 };
            let span = Span { source: &source, offsets: (from, offsets[*p as usize]), clocks: &clocks, states: &states, records: &[] };
            let partials = route(&span, &site_cols, sites).unwrap();
            for (q, partial) in partials.iter().enumerate() {
                // Small messages: spans go in several parts.
                let messages = partial.encode_parts(&schemas, 2_000).unwrap();
                sent += 1;
                // A replay sends the whole span again, from its first part.
                let copies = if replay > 0 && sent % replay == 0 { 2 } else { 1 };
                for _ in 0..copies {
                    for bytes in &messages {
                        let got = Partial::decode(bytes, &schemas).unwrap();
                        let (op, ledger) = &mut stage[q];
                        if ledger.admit(&got) == Admission::Merge {
                            op.merge_partition_states(*p, &got.clocks, got.states, now).await.unwrap();
                            fold(&op.close_ready(now).await.unwrap().windows, &mut latest);
                        }
                    }
                }
            }
        }
        for (op, _) in &mut stage {
            fold(&op.flush(now).await.unwrap().windows, &mut latest);
        }
        latest
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
        /// Whatever the disorder, skew and replays, the site stage publishes the same per-site
        /// window totals as one instance reading every partition.
        #[test]
        fn two_stages_publish_what_one_instance_does(
            records in proptest::collection::vec((0i64..1_500, 0u8..3, 0u32..3, 0usize..5, 1u64..1000), 1..150),
            skews in proptest::collection::vec(0i64..200, 3),
            cut in 1usize..12,
            sites in 1u32..4,
            replay in 0usize..4,
        ) {
            let recs: Vec<(u32, Rec)> =
                records.iter().map(|&(t, e, p, s, b)| (p, ((t - skews[usize::from(e)]) * S / 2, e, s, b))).collect();
            let mut batches: Vec<(u32, Vec<Rec>)> = Vec::new();
            for chunk in recs.chunks(cut) {
                for p in 0..3 {
                    let part: Vec<Rec> = chunk.iter().filter(|(q, _)| *q == p).map(|(_, r)| *r).collect();
                    if !part.is_empty() {
                        batches.push((p, part));
                    }
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let want = rt.block_on(one_instance(&batches));
            let got = rt.block_on(two_stages(&batches, sites, replay));
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn a_partial_round_trips_and_bad_bytes_are_typed_errors() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut op = rt.block_on(operator());
        let now = Instant::now();
        rt.block_on(op.process(0, 0, &batch(&[(5 * S, 1, 0, 10), (15 * S, 2, 3, 7)]), now)).unwrap();
        let schemas = [op.state_schema(0), op.state_schema(0)];
        let mut states = op.take_partition_states(0);
        states.push(Vec::new());
        // Records of two tables (the probes' and the interfaces'), each table's in order.
        let records = vec![(1, batch(&[(7 * S, 1, 2, 3)])), (1, batch(&[(8 * S, 1, 2, 4)])), (0, batch(&[(9 * S, 2, 1, 5)]))];
        let partial = Partial {
            source: PartitionKey { topic: "flows".into(), partition: 3 },
            from_offset: 10,
            to_offset: 12,
            clocks: vec![(u128::MAX, 15 * S), (1, 5 * S)],
            states,
            records,
            part: 0,
            parts: 1,
        };
        let bytes = partial.encode(&schemas).unwrap();
        assert_eq!(Partial::decode(&bytes, &schemas).unwrap(), partial);

        // A partial of an older siteflow: one stream of probe records, no tables named.
        let probes_only = Partial { records: vec![(0, batch(&[(9 * S, 2, 1, 5)]))], ..partial.clone() };
        let encoded = probes_only.encode(&schemas).unwrap();
        let end = encoded.iter().position(|&b| b == b'\n').unwrap();
        let header = std::str::from_utf8(&encoded[..end]).unwrap();
        let with_header = |h: String| [h.as_bytes(), &encoded[end..]].concat();
        let legacy = with_header(header.replacen(r#""records":false,"record_tables":[0]"#, r#""records":true"#, 1));
        assert_ne!(legacy, encoded);
        let decoded = Partial::decode(&legacy, &schemas).unwrap();
        assert_eq!(decoded.records, vec![(LEGACY_PROBE_RECORDS, probes_only.records[0].1.clone())]);
        let foreign = with_header(header.replacen(r#""record_tables":[0]"#, r#""record_tables":[5]"#, 1));
        assert!(Partial::decode(&foreign, &schemas).unwrap_err().to_string().contains("records of table 5, this pipeline has 2"));
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(Partial::decode(&bytes[..cut], &schemas).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Partial::decode(&longer, &schemas).unwrap_err().to_string().contains("1 bytes after the last table"));
        assert!(Partial::decode(&bytes, &[]).unwrap_err().to_string().contains("2 tables, this pipeline has 0"));
        assert!(op.take_partition_states(0).iter().all(Vec::is_empty), "taken states leave the operator");
    }

    #[test]
    fn the_ledger_merges_each_span_once() {
        let partial = |from, to| Partial {
            source: PartitionKey { topic: "flows".into(), partition: 0 },
            from_offset: from,
            to_offset: to,
            clocks: vec![],
            states: vec![],
            records: vec![],
            part: 0,
            parts: 1,
        };
        let mut ledger = Ledger::default();
        assert_eq!(ledger.admit(&partial(0, 10)), Admission::Merge);
        assert_eq!(ledger.admit(&partial(0, 10)), Admission::Duplicate);
        assert_eq!(ledger.admit(&partial(10, 25)), Admission::Merge);
        assert_eq!(ledger.admit(&partial(0, 10)), Admission::Duplicate);
        assert_eq!(ledger.admit(&partial(20, 30)), Admission::Overlap);
        assert_eq!(ledger.admit(&partial(25, 30)), Admission::Merge);
        // Another source partition has its own spans.
        let other = Partial { source: PartitionKey { topic: "flows".into(), partition: 1 }, ..partial(0, 10) };
        assert_eq!(ledger.admit(&other), Admission::Merge);
        // A span in three parts, replayed from its first part after a crash in the middle.
        let part = |i| Partial { part: i, parts: 3, ..partial(30, 40) };
        assert_eq!(ledger.admit(&part(0)), Admission::Merge);
        assert_eq!(ledger.admit(&part(1)), Admission::Merge);
        assert_eq!(ledger.admit(&part(0)), Admission::Duplicate);
        assert_eq!(ledger.admit(&part(1)), Admission::Duplicate);
        assert_eq!(ledger.admit(&part(2)), Admission::Merge);
        assert_eq!(ledger.admit(&partial(40, 50)), Admission::Merge);
        // A part lost (an offset gap): the next span is merged and the lost part given up; it
        // cannot come later in the same partition, and a replay of its span is a duplicate.
        let part = |i| Partial { part: i, parts: 3, ..partial(50, 60) };
        assert_eq!(ledger.admit(&part(0)), Admission::Merge);
        assert_eq!(ledger.admit(&part(2)), Admission::Overlap, "a part that skips ahead");
        assert_eq!(ledger.admit(&partial(60, 70)), Admission::MergeAfterLoss, "the next span before the last part");
        assert_eq!(ledger.admit(&part(1)), Admission::Duplicate);
    }

    #[test]
    fn sites_route_the_same_everywhere() {
        assert_eq!(partition_of("tinh.vp-ubnd", 1), 0);
        let spread: std::collections::BTreeSet<u32> = (0..242).map(|i| partition_of(&format!("site-{i}"), 8)).collect();
        assert_eq!(spread.len(), 8, "242 sites reach every one of 8 partitions");
    }
}
