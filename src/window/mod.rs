//! Event-time tumbling windows over the enriched tables, aggregated by the pipeline SQL.
//!
//! Per micro-batch: assign records to windows (late ones are counted and dropped), add the
//! `window_start` column, run the partial aggregate and file its state rows under their window.
//! When the watermark passes a window's end, run the final aggregate for every table and hand
//! the rows to the sinks as a [`ClosedWindow`].

pub mod aggregate;
pub mod watermark;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, PrimitiveArray, RecordBatch};
use datafusion::arrow::compute::{concat_batches, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampNanosecondType};
use datafusion::error::DataFusionError;

pub use aggregate::{PlanError, SplitAggregate, WINDOW_START};
pub use watermark::{Assignment, Watermarks, window_start};

use crate::source::PartitionId;

/// Window size and lateness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub size: Duration,
    pub allowed_lateness: Duration,
    pub idle_partition_timeout: Duration,
}

impl WindowSpec {
    pub fn size_ns(&self) -> i64 {
        self.size.as_nanos() as i64
    }
}

/// The schema a pipeline SQL sees for a table: `window_start` first, then the enriched columns.
pub fn table_schema(enriched: &SchemaRef) -> SchemaRef {
    let mut fields = vec![Field::new(WINDOW_START, DataType::Timestamp(TimeUnit::Nanosecond, None), false)];
    fields.extend(enriched.fields().iter().map(|f| f.as_ref().clone()));
    Arc::new(Schema::new(fields))
}

/// One table's rows of one closed window.
#[derive(Debug, Clone)]
pub struct ClosedWindow {
    /// Table name: `flows`, `interfaces` or `probes`.
    pub table: Arc<str>,
    pub start_ns: i64,
    pub end_ns: i64,
    /// The final aggregate's rows (possibly none).
    pub rows: RecordBatch,
    /// When the batch that closed the window arrived (for close-to-visible latency).
    pub closed_by: Instant,
}

/// One partition's share of a closed window: what a partition's results log records, so that a
/// partition's output can be replayed, truncated and moved together with its input offsets.
#[derive(Debug, Clone)]
pub struct Contribution {
    pub table: TableId,
    pub partition: PartitionId,
    pub start_ns: i64,
    pub rows: RecordBatch,
}

/// What closing windows produced.
#[derive(Debug, Default)]
pub struct Closed {
    /// Windows to publish, oldest first, each table in order.
    pub windows: Vec<ClosedWindow>,
    /// Per-partition results (only when [`WindowOperator::set_per_partition_results`] is on).
    pub contributions: Vec<Contribution>,
    /// States that closed after their window had already been published (a partition that
    /// caught up after a takeover or idleness); they reach the results logs only.
    pub late_contributions: u64,
}

/// A windowed table: its aggregation and the partial states of its open windows, per partition.
#[derive(Debug)]
struct WindowedTable {
    name: Arc<str>,
    schema: SchemaRef,
    aggregate: SplitAggregate,
    open: BTreeMap<i64, Vec<(PartitionId, RecordBatch)>>,
    /// Whether its per-partition results are produced (see `set_per_partition_results`).
    results_log: bool,
}

/// What one micro-batch did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BatchOutcome {
    pub accepted: u64,
    pub late: u64,
    /// The on-time records with their `window_start`, as the aggregation saw them.
    pub on_time: Option<RecordBatch>,
}

/// The window stage: watermarks plus one [`SplitAggregate`] per table.
#[derive(Debug)]
pub struct WindowOperator {
    spec: WindowSpec,
    watermarks: Watermarks,
    tables: Vec<WindowedTable>,
    /// Newest window start handed to the sinks; older windows are never published again.
    published_upto: Option<i64>,
    per_partition_results: bool,
}

/// A window being closed: its start and, per table, the partition states that close now.
type Taken = (i64, Vec<Vec<(PartitionId, RecordBatch)>>);

/// Index of a table in the operator, in the order tables were added.
pub type TableId = usize;

impl WindowOperator {
    pub fn new(spec: WindowSpec) -> Self {
        Self {
            watermarks: Watermarks::new(spec.size_ns(), spec.allowed_lateness.as_nanos() as i64, spec.idle_partition_timeout),
            spec,
            tables: Vec::new(),
            published_upto: None,
            per_partition_results: false,
        }
    }

    /// Also produce each partition's share of every closed window (for checkpointed results).
    /// Leaves a table out of the per-partition results (its windows still close and publish).
    pub fn set_results_log(&mut self, table: TableId, on: bool) {
        self.tables[table].results_log = on;
    }

    pub fn set_per_partition_results(&mut self, on: bool) {
        self.per_partition_results = on;
    }

    /// Adds a table whose enriched batches have schema `enriched` and are aggregated by `sql`.
    /// Adds table `name`, aggregated by `sql`, which reads its input as table `input`.
    pub async fn add_table(&mut self, name: &str, input: &str, enriched: &SchemaRef, sql: &str) -> Result<TableId, PlanError> {
        let schema = table_schema(enriched);
        let aggregate = SplitAggregate::plan(sql, input, schema.clone()).await?;
        self.tables.push(WindowedTable { name: name.into(), schema, aggregate, open: BTreeMap::new(), results_log: true });
        Ok(self.tables.len() - 1)
    }

    pub fn spec(&self) -> WindowSpec {
        self.spec
    }

    pub fn watermark_ns(&self) -> Option<i64> {
        self.watermarks.watermark()
    }

    pub fn watermarks(&self) -> &Watermarks {
        &self.watermarks
    }

    fn open_starts(&self) -> BTreeSet<i64> {
        self.tables.iter().flat_map(|t| t.open.keys().copied()).collect()
    }

    pub fn open_window_count(&self) -> usize {
        self.open_starts().len()
    }

    pub fn table_count(&self) -> usize {
        self.tables.len()
    }

    pub fn table_name(&self, table: TableId) -> &str {
        &self.tables[table].name
    }

    /// Output schema of a table's closed windows.
    pub fn output_schema(&self, table: TableId) -> SchemaRef {
        self.tables[table].aggregate.output_schema()
    }

    /// Schema of a table's partial-aggregate states (what checkpoints store).
    pub fn state_schema(&self, table: TableId) -> SchemaRef {
        self.tables[table].aggregate.state_schema()
    }

    /// GROUP BY keys of a table's aggregation.
    pub fn group_keys(&self, table: TableId) -> &[String] {
        self.tables[table].aggregate.group_keys()
    }

    pub fn describe(&self, table: TableId) -> String {
        self.tables[table].aggregate.describe()
    }

    /// Feeds an enriched batch of `table` (it must have an `event_time` column).
    pub async fn process(
        &mut self,
        table: TableId,
        partition: PartitionId,
        batch: &RecordBatch,
        now: Instant,
    ) -> Result<BatchOutcome, DataFusionError> {
        let mut outcomes = self.process_together(partition, &[(table, batch)], &[], now).await?;
        Ok(outcomes.pop().expect("one outcome per input"))
    }

    /// Feeds batches of several tables that came from the same messages. `ordinals[i][r]` is the
    /// position of row `r` of input `i` among all the records of those messages: event time
    /// advances in that order, as if the tables' records had come one by one. (Feeding one
    /// table after the other would make the second table's records late whenever the first
    /// table's reach further in time; and the order must not depend on how messages were
    /// grouped into micro-batches, or a replay after a crash could judge lateness differently.)
    pub async fn process_together(
        &mut self,
        partition: PartitionId,
        inputs: &[(TableId, &RecordBatch)],
        ordinals: &[Vec<u32>],
        now: Instant,
    ) -> Result<Vec<BatchOutcome>, DataFusionError> {
        let mut rows: Vec<(u32, usize, usize)> = Vec::with_capacity(inputs.iter().map(|(_, b)| b.num_rows()).sum());
        let mut columns = Vec::with_capacity(inputs.len());
        for (i, (_, batch)) in inputs.iter().enumerate() {
            let column = batch
                .column_by_name("event_time")
                .ok_or_else(|| DataFusionError::Internal("batch without event_time".into()))?
                .as_primitive::<TimestampNanosecondType>();
            let order = ordinals.get(i).filter(|o| o.len() == batch.num_rows());
            rows.extend((0..batch.num_rows()).map(|r| (order.map_or(r as u32, |o| o[r]), i, r)));
            columns.push(column.values().clone());
        }
        rows.sort_by_key(|&(ordinal, i, r)| (ordinal, i, r));
        let times: Vec<i64> = rows.iter().map(|&(_, i, r)| columns[i][r]).collect();
        let assignment = self.watermarks.assign(partition, &times, now);
        let mut parts: Vec<Assignment> = inputs
            .iter()
            .map(|(_, b)| Assignment { window_starts: vec![0; b.num_rows()], late: vec![false; b.num_rows()], late_count: 0 })
            .collect();
        for (k, &(_, i, r)) in rows.iter().enumerate() {
            parts[i].window_starts[r] = assignment.window_starts[k];
            parts[i].late[r] = assignment.late[k];
            parts[i].late_count += usize::from(assignment.late[k]);
        }
        let mut outcomes = Vec::with_capacity(inputs.len());
        for ((table, batch), part) in inputs.iter().zip(parts) {
            outcomes.push(self.aggregate(*table, partition, batch, part).await?);
        }
        Ok(outcomes)
    }

    /// Aggregates the on-time records of a batch into their windows' partial states.
    async fn aggregate(
        &mut self,
        table: TableId,
        partition: PartitionId,
        batch: &RecordBatch,
        assignment: Assignment,
    ) -> Result<BatchOutcome, DataFusionError> {
        let mut outcome =
            BatchOutcome { accepted: (batch.num_rows() - assignment.late_count) as u64, late: assignment.late_count as u64, on_time: None };
        if outcome.accepted == 0 {
            return Ok(outcome);
        }
        let starts: ArrayRef = Arc::new(PrimitiveArray::<TimestampNanosecondType>::new(assignment.window_starts.into(), None));
        let t = &mut self.tables[table];
        let mut columns = vec![starts];
        columns.extend(batch.columns().iter().cloned());
        let mut input = RecordBatch::try_new(t.schema.clone(), columns)?;
        if assignment.late_count > 0 {
            let on_time = BooleanArray::from_iter(assignment.late.iter().map(|late| Some(!late)));
            input = filter_record_batch(&input, &on_time)?;
        }
        let window_col = t.aggregate.state_window_column();
        outcome.on_time = Some(input.clone());
        for state in t.aggregate.partial(input).await? {
            for (start, rows) in split_by_window(&state, window_col)? {
                t.open.entry(start).or_default().push((partition, rows));
            }
        }
        Ok(outcome)
    }

    /// Lets idle partitions stop holding the watermark back (call on a timer).
    pub fn advance_idle(&mut self, now: Instant) {
        self.watermarks.advance_idle(now);
    }

    /// Closes what the watermark has passed, oldest first. A partition's state in a window closes
    /// once the pipeline watermark has passed the window's end and the partition's own watermark
    /// has too (or the partition is idle): a partition that lags after a takeover keeps its
    /// windows open until it catches up, so none of its records turn late.
    pub async fn close_ready(&mut self, now: Instant) -> Result<Closed, DataFusionError> {
        let Some(watermark) = self.watermarks.watermark() else { return Ok(Closed::default()) };
        let size = self.spec.size_ns();
        let watermarks = &self.watermarks;
        let ready = |p: PartitionId, end: i64| watermarks.is_idle(p, now) || watermarks.partition_watermark(p).is_none_or(|w| w >= end);
        let starts: Vec<i64> = self.open_starts().into_iter().take_while(|s| s + size <= watermark).collect();
        let mut taken: Vec<Taken> = Vec::with_capacity(starts.len());
        for &start in &starts {
            let mut per_table = Vec::with_capacity(self.tables.len());
            for t in &mut self.tables {
                let states = t.open.remove(&start).unwrap_or_default();
                let (closing, waiting): (Vec<_>, Vec<_>) = states.into_iter().partition(|(p, _)| ready(*p, start + size));
                if !waiting.is_empty() {
                    t.open.insert(start, waiting);
                }
                per_table.push(closing);
            }
            // A window whose every state waits for a lagging partition is published once it catches up.
            if per_table.iter().any(|c| !c.is_empty()) {
                taken.push((start, per_table));
            }
        }
        self.close(taken, now).await
    }

    /// Closes every open window regardless of the watermark (at shutdown without checkpoints).
    pub async fn flush(&mut self, closed_by: Instant) -> Result<Closed, DataFusionError> {
        let starts = self.open_starts();
        let mut taken = Vec::with_capacity(starts.len());
        for start in starts {
            let per_table = self.tables.iter_mut().map(|t| t.open.remove(&start).unwrap_or_default()).collect();
            taken.push((start, per_table));
        }
        self.close(taken, closed_by).await
    }

    async fn close(&mut self, taken: Vec<Taken>, closed_by: Instant) -> Result<Closed, DataFusionError> {
        let size = self.spec.size_ns();
        let mut out = Closed::default();
        for (start, per_table) in taken {
            let publish = self.published_upto.is_none_or(|p| start > p);
            if !publish {
                out.late_contributions += per_table.iter().map(|s| s.len() as u64).sum::<u64>();
                if per_table.iter().all(Vec::is_empty) {
                    continue;
                }
            }
            for (table, states) in per_table.into_iter().enumerate() {
                let t = &self.tables[table];
                let schema = t.aggregate.output_schema();
                if self.per_partition_results && t.results_log {
                    let mut partitions: Vec<PartitionId> = states.iter().map(|(p, _)| *p).collect();
                    partitions.sort_unstable();
                    partitions.dedup();
                    for partition in partitions {
                        let own: Vec<RecordBatch> = states.iter().filter(|(p, _)| *p == partition).map(|(_, b)| b.clone()).collect();
                        let rows = concat_batches(&schema, &t.aggregate.finish(own).await?)?;
                        out.contributions.push(Contribution { table, partition, start_ns: start, rows });
                    }
                }
                if !publish {
                    continue;
                }
                let rows = if states.is_empty() {
                    RecordBatch::new_empty(schema)
                } else {
                    let batches = t.aggregate.finish(states.into_iter().map(|(_, b)| b).collect()).await?;
                    concat_batches(&schema, &batches)?
                };
                out.windows.push(ClosedWindow { table: t.name.clone(), start_ns: start, end_ns: start + size, rows, closed_by });
            }
            if publish {
                self.published_upto = Some(start);
            }
        }
        Ok(out)
    }

    /// A partition's open states per table (for its checkpoint).
    pub fn partition_states(&self, partition: PartitionId) -> Vec<Vec<RecordBatch>> {
        self.tables
            .iter()
            .map(|t| t.open.values().flat_map(|v| v.iter().filter(|(p, _)| *p == partition).map(|(_, b)| b.clone())).collect())
            .collect()
    }

    /// Drops a partition this instance no longer owns (after its checkpoint was written).
    pub fn release_partition(&mut self, partition: PartitionId) {
        for t in &mut self.tables {
            for states in t.open.values_mut() {
                states.retain(|(p, _)| *p != partition);
            }
            t.open.retain(|_, v| !v.is_empty());
        }
        self.watermarks.forget(partition);
    }

    /// Resumes a partition from its checkpoint: its clock and its open states per table.
    pub fn restore_partition(
        &mut self,
        partition: PartitionId,
        max_event_ns: Option<i64>,
        states: Vec<Vec<RecordBatch>>,
        now: Instant,
    ) -> Result<(), DataFusionError> {
        self.release_partition(partition);
        self.watermarks.restore(partition, max_event_ns, now);
        for (t, batches) in self.tables.iter_mut().zip(states) {
            let window_col = t.aggregate.state_window_column();
            for batch in batches {
                for (start, rows) in split_by_window(&batch, window_col)? {
                    t.open.entry(start).or_default().push((partition, rows));
                }
            }
        }
        Ok(())
    }
}

/// Splits state rows by their window start (a batch usually holds one or two windows).
fn split_by_window(state: &RecordBatch, window_col: usize) -> Result<Vec<(i64, RecordBatch)>, DataFusionError> {
    let starts = state.column(window_col).as_primitive::<TimestampNanosecondType>();
    if starts.is_empty() {
        return Ok(Vec::new());
    }
    let values = starts.values();
    let first = values[0];
    if starts.null_count() == 0 && values.iter().all(|&v| v == first) {
        return Ok(vec![(first, state.clone())]);
    }
    let distinct: BTreeSet<i64> = values.iter().copied().collect();
    distinct
        .into_iter()
        .map(|s| {
            let mask = BooleanArray::from_iter(values.iter().map(|&v| Some(v == s)));
            Ok((s, filter_record_batch(state, &mask)?))
        })
        .collect()
}
