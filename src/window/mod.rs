//! Event-time tumbling windows over the enriched tables, aggregated by the pipeline SQL.
//!
//! Per micro-batch: assign records to windows (late ones are counted and dropped), add the
//! `window_start` column, run the partial aggregate and file its state rows under their window.
//! When the watermark passes a window's end, run the final aggregate for every table and hand
//! the rows to the sinks as a [`ClosedWindow`].

pub mod aggregate;
pub mod heavy_hitters;
pub mod watermark;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, PrimitiveArray, RecordBatch};
use datafusion::arrow::compute::{concat_batches, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampNanosecondType};
use datafusion::error::DataFusionError;

pub use aggregate::{PlanError, SplitAggregate, WINDOW_START};
pub use watermark::{Assignment, ExporterKey, Timing, Watermarks, window_start};

use crate::types::PartitionId;

/// Window size, lateness and when windows are published and corrected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub size: Duration,
    /// How far behind its own exporter's newest record a record may be and still count.
    pub allowed_lateness: Duration,
    /// How long after its end (by event time) a window is first published.
    pub publish_delay: Duration,
    /// Exporters further behind the leading one do not hold publication back.
    pub max_exporter_skew: Duration,
    /// How long published windows are kept for corrections (records older are late).
    pub correction_horizon: Duration,
    /// A clock (partition or exporter) silent this long stops holding windows open.
    pub idle_partition_timeout: Duration,
}

impl WindowSpec {
    pub fn size_ns(&self) -> i64 {
        self.size.as_nanos() as i64
    }

    fn timing(&self) -> Timing {
        let ns = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        Timing {
            size_ns: self.size_ns(),
            lateness_ns: ns(self.allowed_lateness),
            publish_delay_ns: ns(self.publish_delay),
            max_skew_ns: ns(self.max_exporter_skew),
            horizon_ns: ns(self.correction_horizon).max(ns(self.allowed_lateness)),
            idle_timeout: self.idle_partition_timeout,
        }
    }
}

/// The schema a pipeline SQL sees for a table: `window_start` first, then the enriched columns.
pub fn table_schema(enriched: &SchemaRef) -> SchemaRef {
    let mut fields = vec![Field::new(WINDOW_START, DataType::Timestamp(TimeUnit::Nanosecond, None), false)];
    fields.extend(enriched.fields().iter().map(|f| f.as_ref().clone()));
    Arc::new(Schema::new(fields))
}

/// One table's rows of one window, published for the first time or corrected.
#[derive(Debug, Clone)]
pub struct ClosedWindow {
    /// The table's name, as added to the operator.
    pub table: Arc<str>,
    /// The table's index in the operator.
    pub table_id: TableId,
    pub start_ns: i64,
    pub end_ns: i64,
    /// The final aggregate's rows (possibly none).
    pub rows: RecordBatch,
    /// When the batch that closed the window arrived (for close-to-visible latency).
    pub closed_by: Instant,
    /// For a correction: the rows published before, which `rows` replace (records that were
    /// on time for their own exporter arrived after the window was first published).
    pub previous: Option<RecordBatch>,
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
    /// Windows published for the first time and corrections, oldest first, each table in order.
    pub windows: Vec<ClosedWindow>,
    /// Windows published for the first time whose every table is in `windows`, oldest first:
    /// `(start, end)`. Only windows newer than every window completed before are listed.
    pub completed: Vec<(i64, i64)>,
    /// Per-partition results (only when [`WindowOperator::set_per_partition_results`] is on).
    pub contributions: Vec<Contribution>,
    /// States that closed after their window was dropped from the correction horizon (a
    /// partition restored far behind the others); they reach the results logs only.
    pub late_contributions: u64,
}

/// A published window of one table, kept within the correction horizon.
#[derive(Debug)]
struct PublishedWindow {
    /// Every state published so far (compacted), so a correction merges old and new exactly.
    states: Vec<RecordBatch>,
    /// The rows last published.
    rows: RecordBatch,
}

/// A windowed table: its aggregation, the partial states of its open windows per partition,
/// and its published windows that may still be corrected.
#[derive(Debug)]
struct WindowedTable {
    name: Arc<str>,
    /// The table its SQL reads, and the SQL (to plan it again: see [`PartialsAhead`]).
    input: String,
    sql: String,
    schema: SchemaRef,
    aggregate: SplitAggregate,
    open: BTreeMap<i64, Vec<(PartitionId, RecordBatch)>>,
    published: BTreeMap<i64, PublishedWindow>,
    /// Whether its per-partition results are produced (see `set_per_partition_results`).
    results_log: bool,
}

impl WindowedTable {
    /// Files a partition's partial states under their open windows. A window open long (a
    /// large lateness) collects a state per micro-batch: once crowded, its states are merged per
    /// partition, so memory follows the groups, not the batches.
    async fn file_open_states(&mut self, partition: PartitionId, states: Vec<RecordBatch>) -> Result<(), DataFusionError> {
        let window_col = self.aggregate.state_window_column();
        let mut crowded = Vec::new();
        for state in states {
            for (start, rows) in split_by_window(&state, window_col)? {
                let open = self.open.entry(start).or_default();
                open.push((partition, rows));
                if open.len() == self.aggregate.compact_open_states() {
                    crowded.push(start);
                }
            }
        }
        for start in crowded {
            let mut by_partition: BTreeMap<PartitionId, Vec<RecordBatch>> = BTreeMap::new();
            for (p, b) in self.open.remove(&start).unwrap_or_default() {
                by_partition.entry(p).or_default().push(b);
            }
            let mut merged = Vec::with_capacity(by_partition.len());
            for (p, batches) in by_partition {
                merged.extend(self.aggregate.reduce(batches).await?.into_iter().map(|b| (p, b)));
            }
            self.open.insert(start, merged);
        }
        Ok(())
    }

    /// Aggregates the on-time records of a batch into their windows' partial states. With
    /// `ahead`, the states computed ahead for the whole batch: each window's states depend on
    /// its own records only (every aggregation groups by `window_start`), so those of windows
    /// without a late record are filed as they are, and only the windows with one are
    /// aggregated again from their on-time records.
    async fn aggregate(
        &mut self,
        partition: PartitionId,
        batch: &RecordBatch,
        assignment: Assignment,
        ahead: Option<Vec<RecordBatch>>,
    ) -> Result<BatchOutcome, DataFusionError> {
        let mut outcome =
            BatchOutcome { accepted: (batch.num_rows() - assignment.late_count) as u64, late: assignment.late_count as u64, on_time: None };
        if outcome.accepted == 0 {
            return Ok(outcome);
        }
        // The windows that hold a late record (only needed with states computed ahead).
        let late_windows: BTreeSet<i64> = match &ahead {
            Some(_) if assignment.late_count > 0 => {
                assignment.window_starts.iter().zip(&assignment.late).filter(|(_, late)| **late).map(|(s, _)| *s).collect()
            }
            _ => BTreeSet::new(),
        };
        let starts: ArrayRef = Arc::new(PrimitiveArray::<TimestampNanosecondType>::new(assignment.window_starts.into(), None));
        let mut columns = vec![starts];
        columns.extend(batch.columns().iter().cloned());
        let mut input = RecordBatch::try_new(self.schema.clone(), columns)?;
        if assignment.late_count > 0 {
            let on_time = BooleanArray::from_iter(assignment.late.iter().map(|late| Some(!late)));
            input = filter_record_batch(&input, &on_time)?;
        }
        let states = match ahead {
            Some(states) if assignment.late_count == 0 => states,
            Some(ahead) => {
                let window_col = self.aggregate.state_window_column();
                let mut states = Vec::with_capacity(ahead.len() + 1);
                for state in &ahead {
                    states.push(rows_in_windows(state, window_col, &late_windows, false)?);
                }
                let redo = rows_in_windows(&input, 0, &late_windows, true)?;
                if redo.num_rows() > 0 {
                    states.extend(self.aggregate.partial(redo).await?);
                }
                states
            }
            None => self.aggregate.partial(input.clone()).await?,
        };
        outcome.on_time = Some(input);
        self.file_open_states(partition, states).await?;
        Ok(outcome)
    }

    /// [`Self::aggregate`] for each of a batch's inputs of this table (`(input index, rows,
    /// their windows, states computed ahead)`), in order.
    async fn aggregate_all(
        &mut self,
        partition: PartitionId,
        inputs: Vec<(usize, &RecordBatch, Assignment, Option<Vec<RecordBatch>>)>,
    ) -> Result<Vec<(usize, BatchOutcome)>, DataFusionError> {
        let mut outcomes = Vec::with_capacity(inputs.len());
        for (i, batch, assignment, ahead) in inputs {
            outcomes.push((i, self.aggregate(partition, batch, assignment, ahead).await?));
        }
        Ok(outcomes)
    }

    /// Closes this table's share of `windows` (oldest first): per window, each partition's
    /// results (when asked for) and the window's rows, unless it was dropped from the horizon.
    async fn close_windows(&mut self, closing: TableClosing, windows: Vec<TableWindow>) -> Result<Vec<TableClosed>, DataFusionError> {
        let mut out = Vec::with_capacity(windows.len());
        for (start, kind, states) in windows {
            let schema = self.aggregate.output_schema();
            let mut closed = TableClosed::default();
            if closing.per_partition_results && self.results_log {
                let mut partitions: Vec<PartitionId> = states.iter().map(|(p, _)| *p).collect();
                partitions.sort_unstable();
                partitions.dedup();
                for partition in partitions {
                    let own: Vec<RecordBatch> = states.iter().filter(|(p, _)| *p == partition).map(|(_, b)| b.clone()).collect();
                    let rows = concat_batches(&schema, &self.aggregate.finish(own).await?)?;
                    closed.contributions.push(Contribution { table: closing.table, partition, start_ns: start, rows });
                }
            }
            let states: Vec<RecordBatch> = states.into_iter().map(|(_, b)| b).collect();
            let (states, previous) = match kind {
                CloseKind::Expired => {
                    out.push(closed);
                    continue;
                }
                CloseKind::Correction if states.is_empty() => {
                    out.push(closed);
                    continue;
                }
                CloseKind::Correction => {
                    let published = self.published.remove(&start).expect("a correction has its published window");
                    (published.states.into_iter().chain(states).collect(), Some(published.rows))
                }
                CloseKind::First => (states, None),
            };
            let states = compact(&self.aggregate, states).await?;
            let rows = if states.is_empty() {
                RecordBatch::new_empty(schema)
            } else {
                concat_batches(&schema, &self.aggregate.finish(states.clone()).await?)?
            };
            self.published.insert(start, PublishedWindow { states, rows: rows.clone() });
            closed.window = Some(ClosedWindow {
                table: self.name.clone(),
                table_id: closing.table,
                start_ns: start,
                end_ns: start + closing.size_ns,
                rows,
                closed_by: closing.closed_by,
                previous,
            });
            out.push(closed);
        }
        Ok(out)
    }
}

/// Merges many states into one per group (fewer rows kept for corrections).
async fn compact(aggregate: &SplitAggregate, states: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, DataFusionError> {
    if states.len() > COMPACT_STATES { aggregate.reduce(states).await } else { Ok(states) }
}

/// One table's states of one window being closed: its start, what closing means, the states.
type TableWindow = (i64, CloseKind, Vec<(PartitionId, RecordBatch)>);

/// What every table's close needs to know besides its windows.
#[derive(Debug, Clone, Copy)]
struct TableClosing {
    table: TableId,
    size_ns: i64,
    closed_by: Instant,
    per_partition_results: bool,
}

/// What closing one window did for one table.
#[derive(Debug, Default)]
struct TableClosed {
    contributions: Vec<Contribution>,
    window: Option<ClosedWindow>,
}

/// The partial aggregates of batches, computed ahead of the window stage on the threads that
/// decode them (`decode.ahead`). A batch's partial aggregate holds no state between batches:
/// only which of its records are late depends on what came before. So the window stage files
/// these states for the windows without a late record, and aggregates the others again in
/// line (the same states either way).
pub struct PartialsAhead {
    size_ns: i64,
    /// Per table: its id, input, schema and SQL.
    tables: Vec<(TableId, String, SchemaRef, String)>,
    /// Plans not in use, one per table in each set: a plan runs one batch at a time, so each
    /// thread computing at the moment takes a set (planned again when none is left).
    idle: Mutex<Vec<Vec<SplitAggregate>>>,
}

/// One batch's partial states per table, computed ahead (see [`PartialsAhead`]).
#[derive(Debug, Default)]
pub struct StatesAhead(Vec<(TableId, Vec<RecordBatch>)>);

impl StatesAhead {
    /// The states of `table`, taken out.
    pub fn take(&mut self, table: TableId) -> Option<Vec<RecordBatch>> {
        let i = self.0.iter().position(|(t, _)| *t == table)?;
        Some(self.0.swap_remove(i).1)
    }
}

impl PartialsAhead {
    /// The partial states of `rows` (enriched rows of the tables' input) for every table, with
    /// `window_start` as the window stage would add it; `None` if anything failed (the window
    /// stage then aggregates in line and reports the error itself).
    pub fn compute(&self, rows: &RecordBatch) -> Option<StatesAhead> {
        let taken = self.idle.lock().expect("plans lock").pop();
        let plans = match taken {
            Some(plans) => plans,
            None => drive(self.plan()).ok()?,
        };
        let states = self.compute_with(&plans, rows).ok();
        self.idle.lock().expect("plans lock").push(plans);
        states
    }

    fn compute_with(&self, plans: &[SplitAggregate], rows: &RecordBatch) -> Result<StatesAhead, DataFusionError> {
        let times = rows
            .column_by_name("event_time")
            .ok_or_else(|| DataFusionError::Internal("batch without event_time".into()))?
            .as_primitive::<TimestampNanosecondType>();
        let starts: Vec<i64> = times.values().iter().map(|&t| window_start(t, self.size_ns)).collect();
        let starts: ArrayRef = Arc::new(PrimitiveArray::<TimestampNanosecondType>::new(starts.into(), None));
        let mut out = Vec::with_capacity(plans.len());
        for ((id, _, schema, _), plan) in self.tables.iter().zip(plans) {
            let mut columns = vec![starts.clone()];
            columns.extend(rows.columns().iter().cloned());
            let input = RecordBatch::try_new(schema.clone(), columns)?;
            out.push((*id, drive(plan.partial(input))?));
        }
        Ok(StatesAhead(out))
    }

    async fn plan(&self) -> Result<Vec<SplitAggregate>, DataFusionError> {
        let mut plans = Vec::with_capacity(self.tables.len());
        for (_, input, schema, sql) in &self.tables {
            plans.push(SplitAggregate::plan(sql, input, schema.clone()).await.map_err(|e| DataFusionError::Plan(e.to_string()))?);
        }
        Ok(plans)
    }
}

/// Runs a table's future to its end on this thread. Outside tokio's cooperative budget: the
/// budget is given back only when a task yields to the runtime, which this thread never does, so
/// an operator that checks it would wait forever once it ran out.
fn drive<T>(work: impl std::future::Future<Output = T>) -> T {
    futures::executor::block_on(tokio::task::unconstrained(work))
}

/// Runs `work` once for each `(table, job)`, each table at most once, every job on its own
/// thread (each table has its own plans and state: the tables of one batch need nothing from
/// each other). Results in the jobs' order.
fn side_by_side<J: Send, R: Send>(
    tables: &mut [WindowedTable],
    jobs: Vec<(TableId, J)>,
    work: impl Fn(&mut WindowedTable, J) -> Result<R, DataFusionError> + Sync,
) -> Result<Vec<R>, DataFusionError> {
    let mut slots: Vec<Option<&mut WindowedTable>> = tables.iter_mut().map(Some).collect();
    let jobs: Vec<(&mut WindowedTable, J)> =
        jobs.into_iter().map(|(id, job)| (slots[id].take().expect("one job per table"), job)).collect();
    // Entered on every thread, for any code that looks for the runtime.
    let runtime = tokio::runtime::Handle::try_current().ok();
    let mut results: Vec<Option<Result<R, DataFusionError>>> = jobs.iter().map(|_| None).collect();
    rayon::in_place_scope(|scope| {
        let mut jobs = jobs.into_iter().zip(results.iter_mut());
        let first = jobs.next();
        for ((table, job), slot) in jobs {
            let (work, runtime) = (&work, &runtime);
            scope.spawn(move |_| {
                let _entered = runtime.as_ref().map(|r| r.enter());
                *slot = Some(work(table, job));
            });
        }
        if let Some(((table, job), slot)) = first {
            *slot = Some(work(table, job));
        }
    });
    results.into_iter().map(|r| r.expect("every job ran")).collect()
}

/// What closing a window means for its outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseKind {
    /// Published for the first time.
    First,
    /// Already published: the new states correct it.
    Correction,
    /// Dropped from the correction horizon: the states reach the results logs only.
    Expired,
}

/// More published states than this are merged into one per group.
const COMPACT_STATES: usize = 8;

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
    /// Newest window start dropped from the correction horizon.
    expired_upto: Option<i64>,
    /// End of the newest window completed (for readiness, which judges windows in order).
    completed_upto: Option<i64>,
    per_partition_results: bool,
    /// Whether the tables of a batch or a close run side by side (see [`Self::set_parallel_tables`]).
    parallel_tables: bool,
    /// Inputs whose states computed ahead were filed, and those of them with windows
    /// aggregated again in line because they held late records (see [`PartialsAhead`]).
    ahead_filed: u64,
    ahead_redone: u64,
}

/// A window being closed: its start, what closing means, and per table the states that close now.
type Taken = (i64, CloseKind, Vec<Vec<(PartitionId, RecordBatch)>>);

/// Index of a table in the operator, in the order tables were added.
pub type TableId = usize;

impl WindowOperator {
    pub fn new(spec: WindowSpec) -> Self {
        Self {
            watermarks: Watermarks::new(spec.timing()),
            spec,
            tables: Vec::new(),
            expired_upto: None,
            completed_upto: None,
            per_partition_results: false,
            parallel_tables: false,
            ahead_filed: 0,
            ahead_redone: 0,
        }
    }

    /// What computes the partial states of `tables` ahead, on other threads (see
    /// [`PartialsAhead`]); the tables must read the same input.
    pub fn partials_ahead(&self, tables: &[TableId]) -> PartialsAhead {
        let tables = tables
            .iter()
            .map(|&id| {
                let t = &self.tables[id];
                (id, t.input.clone(), t.schema.clone(), t.sql.clone())
            })
            .collect();
        PartialsAhead { size_ns: self.spec.size_ns(), tables, idle: Mutex::new(Vec::new()) }
    }

    /// Inputs whose states computed ahead were filed, and those of them with windows
    /// aggregated again in line because they held late records.
    pub fn states_ahead_used(&self) -> (u64, u64) {
        (self.ahead_filed, self.ahead_redone)
    }

    /// Aggregates and closes the tables of one batch side by side, each on its own thread
    /// (`window.parallel_tables`): the results are those of one table after the other.
    pub fn set_parallel_tables(&mut self, on: bool) {
        self.parallel_tables = on;
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
        self.tables.push(WindowedTable {
            name: name.into(),
            input: input.into(),
            sql: sql.into(),
            schema,
            aggregate,
            open: BTreeMap::new(),
            published: BTreeMap::new(),
            results_log: true,
        });
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

    /// Published windows kept for corrections.
    pub fn correctable_window_count(&self) -> usize {
        self.tables.first().map_or(0, |t| t.published.len())
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

    /// The smallest `heavy_hitters` capacity in a table's aggregation, if it has one.
    pub fn heavy_hitters_capacity(&self, table: TableId) -> Option<usize> {
        self.tables[table].aggregate.heavy_hitters_capacity()
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
        let mut outcomes = self.process_together(partition, &[(table, batch)], &[], Vec::new(), now).await?;
        Ok(outcomes.pop().expect("one outcome per input"))
    }

    /// Feeds batches of several tables that came from the same messages. `ordinals[i][r]` is the
    /// position of row `r` of input `i` among all the records of those messages: event time
    /// advances in that order, as if the tables' records had come one by one. (Feeding one
    /// table after the other would make the second table's records late whenever the first
    /// table's reach further in time; and the order must not depend on how messages were
    /// grouped into micro-batches, or a replay after a crash could judge lateness differently.)
    /// `ahead[i]`, when present, holds input `i`'s partial states computed ahead (see
    /// [`PartialsAhead`]).
    pub async fn process_together(
        &mut self,
        partition: PartitionId,
        inputs: &[(TableId, &RecordBatch)],
        ordinals: &[Vec<u32>],
        mut ahead: Vec<Option<Vec<RecordBatch>>>,
        now: Instant,
    ) -> Result<Vec<BatchOutcome>, DataFusionError> {
        let mut rows: Vec<(u32, usize, usize)> = Vec::with_capacity(inputs.iter().map(|(_, b)| b.num_rows()).sum());
        let mut columns = Vec::with_capacity(inputs.len());
        let mut exporter_columns = Vec::with_capacity(inputs.len());
        for (i, (_, batch)) in inputs.iter().enumerate() {
            let column = batch
                .column_by_name("event_time")
                .ok_or_else(|| DataFusionError::Internal("batch without event_time".into()))?
                .as_primitive::<TimestampNanosecondType>();
            let order = ordinals.get(i).filter(|o| o.len() == batch.num_rows());
            rows.extend((0..batch.num_rows()).map(|r| (order.map_or(r as u32, |o| o[r]), i, r)));
            columns.push(column.values().clone());
            // Flows carry their exporter: each exporter's records are judged by its own clock.
            exporter_columns.push(batch.column_by_name("exporter").and_then(|c| c.as_fixed_size_binary_opt().cloned()));
        }
        rows.sort_by_key(|&(ordinal, i, r)| (ordinal, i, r));
        let times: Vec<i64> = rows.iter().map(|&(_, i, r)| columns[i][r]).collect();
        let exporters: Option<Vec<ExporterKey>> = exporter_columns.iter().any(Option::is_some).then(|| {
            rows.iter()
                .map(|&(_, i, r)| exporter_columns[i].as_ref().map_or(0, |c| c.value(r).try_into().map_or(0, ExporterKey::from_be_bytes)))
                .collect()
        });
        let assignment = self.watermarks.assign(partition, &times, exporters.as_deref(), now);
        let mut parts: Vec<Assignment> = inputs
            .iter()
            .map(|(_, b)| Assignment { window_starts: vec![0; b.num_rows()], late: vec![false; b.num_rows()], late_count: 0 })
            .collect();
        for (k, &(_, i, r)) in rows.iter().enumerate() {
            parts[i].window_starts[r] = assignment.window_starts[k];
            parts[i].late[r] = assignment.late[k];
            parts[i].late_count += usize::from(assignment.late[k]);
        }
        let mut outcomes: Vec<Option<BatchOutcome>> = inputs.iter().map(|_| None).collect();
        ahead.resize_with(inputs.len(), || None);
        // One job per table: the inputs of a table (usually one) in order.
        let mut jobs: Vec<(TableId, Vec<(usize, &RecordBatch, Assignment, Option<Vec<RecordBatch>>)>)> = Vec::new();
        for (i, (((table, batch), part), ahead)) in inputs.iter().zip(parts).zip(ahead).enumerate() {
            if ahead.is_some() {
                self.ahead_filed += 1;
                self.ahead_redone += u64::from(part.late_count > 0);
            }
            match jobs.iter_mut().find(|(t, _)| t == table) {
                Some((_, job)) => job.push((i, batch, part, ahead)),
                None => jobs.push((*table, vec![(i, *batch, part, ahead)])),
            }
        }
        // The plans run to completion without waiting on anything (their input is in memory):
        // side by side, each thread drives its table's futures itself (see `drive`).
        let done = if self.parallel_tables && jobs.len() > 1 {
            side_by_side(&mut self.tables, jobs, |table, job| drive(table.aggregate_all(partition, job)))?
        } else {
            let mut done = Vec::with_capacity(jobs.len());
            for (id, job) in jobs {
                done.push(self.tables[id].aggregate_all(partition, job).await?);
            }
            done
        };
        for (i, outcome) in done.into_iter().flatten() {
            outcomes[i] = Some(outcome);
        }
        Ok(outcomes.into_iter().map(|o| o.expect("one outcome per input")).collect())
    }

    /// Registered partitions not heard from yet hold publication back until they go idle (the
    /// site stage of a scale-out; see [`Watermarks::wait_for_unheard`]).
    pub fn wait_for_unheard_partitions(&mut self) {
        self.watermarks.wait_for_unheard();
    }

    /// A partition delivered messages without any record (see [`Watermarks::heard_from`]).
    pub fn heard_from(&mut self, partition: PartitionId, now: Instant) {
        self.watermarks.heard_from(partition, now);
    }

    /// Lets idle and lagging clocks stop holding the watermark back (call on a timer).
    pub fn advance_idle(&mut self, now: Instant) {
        self.watermarks.advance(now);
    }

    /// Whether a window was published and is still kept for corrections, dropped, or new.
    fn kind_of(&self, start: i64) -> CloseKind {
        if self.tables.first().is_some_and(|t| t.published.contains_key(&start)) {
            CloseKind::Correction
        } else if self.expired_upto.is_some_and(|e| start <= e) {
            CloseKind::Expired
        } else {
            CloseKind::First
        }
    }

    /// Publishes what the watermark has passed, oldest first. A window is first published with
    /// every state it has once the publish watermark passes its end. States that arrive after
    /// that (records on time for their own exporter) close once their partition can send no
    /// more on-time records for the window, and correct it: the published rows are replaced by
    /// the merge of everything so far, so no on-time record is left out of any output.
    pub async fn close_ready(&mut self, now: Instant) -> Result<Closed, DataFusionError> {
        let Some(watermark) = self.watermarks.watermark() else { return Ok(Closed::default()) };
        let size = self.spec.size_ns();
        let starts: Vec<i64> = self.open_starts().into_iter().take_while(|s| s + size <= watermark).collect();
        let mut taken: Vec<Taken> = Vec::with_capacity(starts.len());
        // Each partition's close watermark, computed once per call: it is a minimum over every
        // exporter clock of the partition, and a window being corrected asks it of each state.
        let mut close_marks: HashMap<PartitionId, Option<i64>> = HashMap::new();
        for start in starts {
            let kind = self.kind_of(start);
            let watermarks = &self.watermarks;
            let mut per_table = Vec::with_capacity(self.tables.len());
            for t in &mut self.tables {
                let states = t.open.remove(&start).unwrap_or_default();
                let (closing, waiting): (Vec<_>, Vec<_>) = if kind == CloseKind::First {
                    (states, Vec::new())
                } else {
                    // A partition whose active clocks have all passed the window's end (plus
                    // the lateness) can send it no more on-time records.
                    states.into_iter().partition(|(p, _)| {
                        let mark = *close_marks.entry(*p).or_insert_with(|| watermarks.close_watermark(*p, now));
                        !mark.is_some_and(|w| w < start + size)
                    })
                };
                if !waiting.is_empty() {
                    t.open.insert(start, waiting);
                }
                per_table.push(closing);
            }
            if per_table.iter().any(|c| !c.is_empty()) {
                taken.push((start, kind, per_table));
            }
        }
        let closed = self.close(taken, now).await?;
        self.expire(now);
        Ok(closed)
    }

    /// Drops published windows that no active partition can correct any more.
    fn expire(&mut self, now: Instant) {
        let Some(horizon) = self.watermarks.horizon(now) else { return };
        let size = self.spec.size_ns();
        let open = self.open_starts();
        let expired: Vec<i64> = self.tables.first().map_or_else(Vec::new, |t| {
            t.published.keys().copied().take_while(|s| s + size <= horizon).filter(|s| !open.contains(s)).collect()
        });
        for t in &mut self.tables {
            for s in &expired {
                t.published.remove(s);
            }
        }
        if let Some(&last) = expired.last() {
            self.expired_upto = Some(self.expired_upto.map_or(last, |e| e.max(last)));
        }
    }

    /// Closes every open window regardless of the watermark (at the end of a finite input).
    pub async fn flush(&mut self, closed_by: Instant) -> Result<Closed, DataFusionError> {
        let starts = self.open_starts();
        let mut taken = Vec::with_capacity(starts.len());
        for start in starts {
            let kind = self.kind_of(start);
            let per_table = self.tables.iter_mut().map(|t| t.open.remove(&start).unwrap_or_default()).collect();
            taken.push((start, kind, per_table));
        }
        self.close(taken, closed_by).await
    }

    async fn close(&mut self, taken: Vec<Taken>, closed_by: Instant) -> Result<Closed, DataFusionError> {
        let size = self.spec.size_ns();
        let mut out = Closed::default();
        if taken.is_empty() {
            return Ok(out);
        }
        let mut per_table: Vec<Vec<TableWindow>> = self.tables.iter().map(|_| Vec::with_capacity(taken.len())).collect();
        let mut windows = Vec::with_capacity(taken.len());
        for (start, kind, states) in taken {
            if kind == CloseKind::Expired {
                out.late_contributions += states.iter().map(|s| s.len() as u64).sum::<u64>();
            }
            for (table, states) in states.into_iter().enumerate() {
                per_table[table].push((start, kind, states));
            }
            windows.push((start, kind));
        }
        let closing = |table| TableClosing { table, size_ns: size, closed_by, per_partition_results: self.per_partition_results };
        let jobs: Vec<(TableId, (TableClosing, Vec<TableWindow>))> =
            per_table.into_iter().enumerate().map(|(id, windows)| (id, (closing(id), windows))).collect();
        let closed = if self.parallel_tables && jobs.len() > 1 {
            side_by_side(&mut self.tables, jobs, |table, (closing, windows)| drive(table.close_windows(closing, windows)))?
        } else {
            let mut closed = Vec::with_capacity(jobs.len());
            for (id, (closing, windows)) in jobs {
                closed.push(self.tables[id].close_windows(closing, windows).await?);
            }
            closed
        };
        let mut closed: Vec<std::vec::IntoIter<TableClosed>> = closed.into_iter().map(Vec::into_iter).collect();
        // Oldest window first, each table in order, as if closed one after the other.
        for (start, kind) in windows {
            for table in &mut closed {
                let TableClosed { contributions, window } = table.next().expect("one result per window");
                out.contributions.extend(contributions);
                out.windows.extend(window);
            }
            if kind == CloseKind::First && self.completed_upto.is_none_or(|c| start + size > c) {
                out.completed.push((start, start + size));
                self.completed_upto = Some(start + size);
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

    /// Takes a partition's open states per table, leaving its windows to the stage they are
    /// handed to (the ingest stage of a scale-out deployment closes no window itself).
    pub fn take_partition_states(&mut self, partition: PartitionId) -> Vec<Vec<RecordBatch>> {
        let taken = self.partition_states(partition);
        for t in &mut self.tables {
            for states in t.open.values_mut() {
                states.retain(|(p, _)| *p != partition);
            }
            t.open.retain(|_, v| !v.is_empty());
        }
        taken
    }

    /// Merges partial states another stage made from `partition`'s records, then advances that
    /// partition's clocks to `clocks` (its clocks after those records). States first: a window
    /// closes only once every partition's clocks have passed it, so no state arrives after the
    /// clock that would have closed its window without it.
    pub async fn merge_partition_states(
        &mut self,
        partition: PartitionId,
        clocks: &[(ExporterKey, i64)],
        states: Vec<Vec<RecordBatch>>,
        now: Instant,
    ) -> Result<(), DataFusionError> {
        for (t, batches) in self.tables.iter_mut().zip(states) {
            t.file_open_states(partition, batches).await?;
        }
        self.watermarks.advance_to(partition, clocks, now);
        Ok(())
    }

    /// Registers partitions before their first records (see [`Watermarks::register`]).
    pub fn register_partitions(&mut self, partitions: &[PartitionId], now: Instant) {
        for p in partitions {
            self.watermarks.register(*p, now);
        }
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

    /// Resumes a partition from its checkpoint: its clocks and its open states per table.
    pub fn restore_partition(
        &mut self,
        partition: PartitionId,
        max_event_ns: Option<i64>,
        clocks: &[(ExporterKey, i64)],
        states: Vec<Vec<RecordBatch>>,
        now: Instant,
    ) -> Result<(), DataFusionError> {
        self.release_partition(partition);
        self.watermarks.restore(partition, max_event_ns, clocks, now);
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
/// The rows of `batch` whose window (column `window_col`) is in `windows` (`inside`), or not.
fn rows_in_windows(batch: &RecordBatch, window_col: usize, windows: &BTreeSet<i64>, inside: bool) -> Result<RecordBatch, DataFusionError> {
    let starts = batch.column(window_col).as_primitive::<TimestampNanosecondType>();
    let mask = BooleanArray::from_iter(starts.values().iter().map(|s| Some(windows.contains(s) == inside)));
    Ok(filter_record_batch(batch, &mask)?)
}

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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use datafusion::arrow::array::{FixedSizeBinaryArray, StringArray, TimestampNanosecondArray, UInt64Array};
    use proptest::prelude::*;

    use super::*;

    const S: i64 = 1_000_000_000;
    const SQL: &str = "SELECT window_start, site, sum(bytes) AS bytes, count(*) AS records FROM t GROUP BY window_start, site";

    fn spec(lateness_s: u64, skew_s: u64, horizon_s: u64) -> WindowSpec {
        WindowSpec {
            size: Duration::from_secs(10),
            allowed_lateness: Duration::from_secs(lateness_s),
            publish_delay: Duration::from_secs(5),
            max_exporter_skew: Duration::from_secs(skew_s),
            correction_horizon: Duration::from_secs(horizon_s),
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

    /// A record: (event time ns, exporter, site, bytes).
    type Rec = (i64, u8, &'static str, u64);

    fn batch(records: &[Rec]) -> RecordBatch {
        let exporters: Vec<[u8; 16]> = records.iter().map(|r| u128::from(r.1).to_be_bytes()).collect();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(TimestampNanosecondArray::from(records.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(FixedSizeBinaryArray::try_from_iter(exporters.iter()).unwrap()),
                Arc::new(StringArray::from(records.iter().map(|r| r.2).collect::<Vec<_>>())),
                Arc::new(UInt64Array::from(records.iter().map(|r| r.3).collect::<Vec<_>>())),
            ],
        )
        .unwrap()
    }

    /// Per (window start, site): (bytes, records) of the rows as last published, checking that
    /// each correction names the rows it replaces.
    fn fold(windows: &[ClosedWindow], latest: &mut BTreeMap<i64, RecordBatch>) {
        for w in windows {
            let before = latest.insert(w.start_ns, w.rows.clone());
            assert_eq!(w.previous.as_ref().map(RecordBatch::num_rows), before.as_ref().map(RecordBatch::num_rows));
        }
    }

    fn totals(latest: &BTreeMap<i64, RecordBatch>) -> BTreeMap<(i64, String), (u64, u64)> {
        let mut out = BTreeMap::new();
        for (start, rows) in latest {
            let sites = rows.column_by_name("site").unwrap().as_string::<i32>();
            let bytes = rows.column_by_name("bytes").unwrap().as_primitive::<datafusion::arrow::datatypes::UInt64Type>();
            let records = rows.column_by_name("records").unwrap().as_primitive::<datafusion::arrow::datatypes::Int64Type>();
            for i in 0..rows.num_rows() {
                let prev = out.insert((*start, sites.value(i).to_string()), (bytes.value(i), records.value(i) as u64));
                assert!(prev.is_none(), "one row per site and window");
            }
        }
        out
    }

    /// Feeds `(partition, records)` batches in order, closing after each, then flushes.
    async fn run(spec: WindowSpec, batches: &[(PartitionId, Vec<Rec>)]) -> (BTreeMap<(i64, String), (u64, u64)>, u64, u64, usize) {
        let mut op = WindowOperator::new(spec);
        let table = op.add_table("t", "t", &schema(), SQL).await.unwrap();
        let now = Instant::now();
        op.register_partitions(&[0, 1], now);
        let (mut latest, mut late, mut corrections) = (BTreeMap::new(), 0, 0);
        let mut first_published_before_flush = 0;
        for (partition, records) in batches {
            late += op.process(table, *partition, &batch(records), now).await.unwrap().late;
            let closed = op.close_ready(now).await.unwrap();
            corrections += closed.windows.iter().filter(|w| w.previous.is_some()).count() as u64;
            first_published_before_flush += closed.completed.len();
            fold(&closed.windows, &mut latest);
        }
        let closed = op.flush(now).await.unwrap();
        corrections += closed.windows.iter().filter(|w| w.previous.is_some()).count() as u64;
        fold(&closed.windows, &mut latest);
        (totals(&latest), late, corrections, first_published_before_flush)
    }

    /// The truth from the lateness rule's definition: a record counts unless its window ended
    /// at least `lateness` before its own exporter's newest record, or `horizon` before its
    /// partition's newest record.
    fn truth(spec: WindowSpec, batches: &[(PartitionId, Vec<Rec>)]) -> (BTreeMap<(i64, String), (u64, u64)>, u64) {
        let (lateness, horizon) = (spec.allowed_lateness.as_nanos() as i64, spec.correction_horizon.as_nanos() as i64);
        let mut clocks: HashMap<(PartitionId, u8), i64> = HashMap::new();
        let mut leads: HashMap<PartitionId, i64> = HashMap::new();
        let (mut out, mut late) = (BTreeMap::new(), 0);
        for (p, records) in batches {
            for &(t, e, site, bytes) in records {
                let end = window_start(t, 10 * S) + 10 * S;
                let is_late = clocks.get(&(*p, e)).is_some_and(|&m| end <= m - lateness)
                    || leads.get(p).is_some_and(|&m| end <= m - horizon.max(lateness));
                let c = clocks.entry((*p, e)).or_insert(t);
                *c = (*c).max(t);
                let l = leads.entry(*p).or_insert(t);
                *l = (*l).max(t);
                if is_late {
                    late += 1;
                } else {
                    let v: &mut (u64, u64) = out.entry((window_start(t, 10 * S), site.to_string())).or_default();
                    v.0 += bytes;
                    v.1 += 1;
                }
            }
        }
        (out, late)
    }

    #[tokio::test]
    async fn a_lagging_exporter_corrects_published_windows_and_nothing_is_lost() {
        // Exporters 1 and 2 share partition 0; exporter 2's clock is 300 s behind. Exporter 3
        // is alone on partition 1. Each export holds flows that ended up to 60 s apart.
        let mut batches = Vec::new();
        for second in (100..700).step_by(5) {
            let t = second * S;
            batches.push((0, vec![(t, 1, "a", 100), (t - 60 * S, 1, "a", 10), (t - 300 * S, 2, "b", 7), (t - 330 * S, 2, "b", 1)]));
            batches.push((1, vec![(t - 30 * S, 3, "c", 5), (t, 3, "c", 3)]));
        }
        let spec = spec(120, 60, 600);
        let (got, late, corrections, published_early) = run(spec, &batches).await;
        let (want, want_late) = truth(spec, &batches);
        assert_eq!(late, 0, "nothing is beyond its own exporter's lateness");
        assert_eq!(want_late, 0);
        assert_eq!(got, want);
        assert!(published_early > 40, "windows are published while the lagging exporter is still behind: {published_early}");
        assert!(corrections > 40, "the lagging exporter's figures arrive as corrections: {corrections}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// Any mix of exporters, partitions, skews and disorder: the outputs, corrections
        /// applied, equal the truth of the lateness rule, and the late count matches.
        #[test]
        fn outputs_equal_the_truth_whatever_the_disorder(
            records in proptest::collection::vec((0i64..2_000, 0u8..3, 0u32..2, 0usize..3, 1u64..1000), 1..200),
            skews in proptest::collection::vec(0i64..400, 3),
            cut in 1usize..20,
        ) {
            let sites = ["a", "b", "c"];
            let recs: Vec<(PartitionId, Rec)> =
                records.iter().map(|&(t, e, p, s, b)| (p, ((t - skews[usize::from(e)]) * S / 2, e, sites[s], b))).collect();
            let mut batches: Vec<(PartitionId, Vec<Rec>)> = Vec::new();
            for chunk in recs.chunks(cut) {
                for p in 0..2 {
                    let part: Vec<Rec> = chunk.iter().filter(|(q, _)| *q == p).map(|(_, r)| *r).collect();
                    if !part.is_empty() {
                        batches.push((p, part));
                    }
                }
            }
            let spec = spec(30, 20, 120);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (got, late, _, _) = rt.block_on(run(spec, &batches));
            let (want, want_late) = truth(spec, &batches);
            prop_assert_eq!(late, want_late);
            prop_assert_eq!(got, want);
        }
    }
}
