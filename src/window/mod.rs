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
    /// Table name: `flows` or `probes`.
    pub table: Arc<str>,
    pub start_ns: i64,
    pub end_ns: i64,
    /// The final aggregate's rows (possibly none).
    pub rows: RecordBatch,
    /// When the batch that closed the window arrived (for close-to-visible latency).
    pub closed_by: Instant,
}

/// A windowed table: its aggregation and the partial states of its open windows.
#[derive(Debug)]
struct WindowedTable {
    name: Arc<str>,
    schema: SchemaRef,
    aggregate: SplitAggregate,
    open: BTreeMap<i64, Vec<RecordBatch>>,
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
    open_windows: BTreeSet<i64>,
}

/// Index of a table in the operator, in the order tables were added.
pub type TableId = usize;

impl WindowOperator {
    pub fn new(spec: WindowSpec) -> Self {
        Self {
            watermarks: Watermarks::new(spec.size_ns(), spec.allowed_lateness.as_nanos() as i64, spec.idle_partition_timeout),
            spec,
            tables: Vec::new(),
            open_windows: BTreeSet::new(),
        }
    }

    /// Adds a table whose enriched batches have schema `enriched` and are aggregated by `sql`.
    pub async fn add_table(&mut self, name: &str, enriched: &SchemaRef, sql: &str) -> Result<TableId, PlanError> {
        let schema = table_schema(enriched);
        let aggregate = SplitAggregate::plan(sql, name, schema.clone()).await?;
        self.tables.push(WindowedTable { name: name.into(), schema, aggregate, open: BTreeMap::new() });
        Ok(self.tables.len() - 1)
    }

    pub fn spec(&self) -> WindowSpec {
        self.spec
    }

    pub fn watermark_ns(&self) -> Option<i64> {
        self.watermarks.watermark()
    }

    pub fn open_window_count(&self) -> usize {
        self.open_windows.len()
    }

    /// Output schema of a table's closed windows.
    pub fn output_schema(&self, table: TableId) -> SchemaRef {
        self.tables[table].aggregate.output_schema()
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
        let times = batch
            .column_by_name("event_time")
            .ok_or_else(|| DataFusionError::Internal("batch without event_time".into()))?
            .as_primitive::<TimestampNanosecondType>();
        let assignment = self.watermarks.assign(partition, times.values(), now);
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
                t.open.entry(start).or_default().push(rows);
                self.open_windows.insert(start);
            }
        }
        Ok(outcome)
    }

    /// Lets idle partitions stop holding the watermark back (call on a timer).
    pub fn advance_idle(&mut self, now: Instant) {
        self.watermarks.advance_idle(now);
    }

    /// Closes every window whose end the watermark has reached, oldest first.
    pub async fn close_ready(&mut self, closed_by: Instant) -> Result<Vec<ClosedWindow>, DataFusionError> {
        let Some(watermark) = self.watermarks.watermark() else { return Ok(Vec::new()) };
        let size = self.spec.size_ns();
        let ready: Vec<i64> = self.open_windows.iter().copied().take_while(|s| s + size <= watermark).collect();
        self.close(&ready, closed_by).await
    }

    /// Closes every open window regardless of the watermark (at shutdown).
    pub async fn flush(&mut self, closed_by: Instant) -> Result<Vec<ClosedWindow>, DataFusionError> {
        let all: Vec<i64> = self.open_windows.iter().copied().collect();
        self.close(&all, closed_by).await
    }

    async fn close(&mut self, starts: &[i64], closed_by: Instant) -> Result<Vec<ClosedWindow>, DataFusionError> {
        let size = self.spec.size_ns();
        let mut out = Vec::with_capacity(starts.len() * self.tables.len());
        for &start in starts {
            self.open_windows.remove(&start);
            for t in &mut self.tables {
                let states = t.open.remove(&start).unwrap_or_default();
                let schema = t.aggregate.output_schema();
                let rows = if states.is_empty() {
                    RecordBatch::new_empty(schema)
                } else {
                    let batches = t.aggregate.finish(states).await?;
                    concat_batches(&schema, &batches)?
                };
                out.push(ClosedWindow { table: t.name.clone(), start_ns: start, end_ns: start + size, rows, closed_by });
            }
        }
        Ok(out)
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
