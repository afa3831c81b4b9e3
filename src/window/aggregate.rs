//! A pipeline SQL aggregation split into DataFusion's partial and final aggregate plans.
//!
//! The SQL is planned once. Its aggregate node is split in two (the Arroyo approach): the
//! partial plan runs on every micro-batch and turns records into per-group accumulator state;
//! the final plan runs when a window closes and merges that window's states into result rows.
//! Both read from slots that are refilled before each run, so nothing is planned twice and the
//! state kept per window is proportional to the number of groups, not records.

use std::sync::{Arc, Mutex};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};

/// The column every pipeline aggregation must group by.
pub const WINDOW_START: &str = "window_start";

/// A pipeline SQL statement that cannot run as a windowed aggregation.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    DataFusion(#[from] DataFusionError),
    #[error("{0}")]
    Shape(String),
}

/// Batches handed to the next execution of a plan; the plan's leaf takes them.
#[derive(Debug)]
struct Slot {
    schema: SchemaRef,
    batches: Mutex<Vec<RecordBatch>>,
}

impl Slot {
    fn new(schema: SchemaRef) -> Arc<Self> {
        Arc::new(Self { schema, batches: Mutex::new(Vec::new()) })
    }

    fn fill(&self, batches: Vec<RecordBatch>) {
        *self.batches.lock().expect("slot lock") = batches;
    }
}

impl PartitionStream for Slot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batches = std::mem::take(&mut *self.batches.lock().expect("slot lock"));
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), futures::stream::iter(batches.into_iter().map(Ok))))
    }
}

/// A windowed aggregation: partial plan per micro-batch, final plan per closed window.
#[derive(Debug)]
pub struct SplitAggregate {
    input: Arc<Slot>,
    states: Arc<Slot>,
    partial: Arc<dyn ExecutionPlan>,
    final_plan: Arc<dyn ExecutionPlan>,
    /// States in, states out (one row per group): keeps a published window's states small
    /// while it may still be corrected.
    reduce_input: Arc<Slot>,
    reduce_plan: Arc<dyn ExecutionPlan>,
    task: Arc<TaskContext>,
    state_window_column: usize,
    group_keys: Vec<String>,
    compact_open_states: usize,
    /// The smallest capacity of its `heavy_hitters` aggregates, if it has any.
    heavy_hitters_capacity: Option<usize>,
}

/// An open window with this many states has them merged per partition: memory follows the
/// groups, not the micro-batches.
const COMPACT_OPEN_STATES: usize = 64;
/// The same for an aggregation with bounded state per group (`heavy_hitters`): its per-batch
/// states are about as large as the batch until merged, and a merge costs at most `capacity`
/// counters per group, so they are merged early.
const COMPACT_OPEN_BOUNDED_STATES: usize = 16;

fn session() -> SessionContext {
    let mut config = SessionConfig::new().with_target_partitions(1).with_batch_size(8192);
    // Plans are executed many times: no run-time filters that carry state between runs.
    config.options_mut().optimizer.enable_dynamic_filter_pushdown = false;
    let ctx = SessionContext::new_with_config(config);
    ctx.register_udaf(super::heavy_hitters::udaf());
    ctx
}

/// Only queries: a pipeline file must not create, change or read anything else.
fn query_only() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}

fn count_aggregates(plan: &Arc<dyn ExecutionPlan>) -> usize {
    let mut n = 0;
    plan.apply(|node| {
        n += usize::from(node.is::<AggregateExec>());
        Ok(TreeNodeRecursion::Continue)
    })
    .expect("counting never fails");
    n
}

/// The partial aggregate under a final one (through coalesce/repartition nodes).
fn find_partial(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
    let mut found = None;
    plan.apply(|node| {
        if let Some(agg) = node.downcast_ref::<AggregateExec>()
            && *agg.mode() == AggregateMode::Partial
        {
            found = Some(node.clone());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .expect("search never fails");
    found
}

impl SplitAggregate {
    /// Plans `sql` over a table `table` of `schema`, and splits its aggregation.
    pub async fn plan(sql: &str, table: &str, schema: SchemaRef) -> Result<Self, PlanError> {
        let ctx = session();
        let input = Slot::new(schema.clone());
        let provider = StreamingTable::try_new(schema, vec![input.clone() as Arc<dyn PartitionStream>])?;
        ctx.register_table(table, Arc::new(provider))?;
        let frame = ctx.sql_with_options(sql, query_only()).await?;
        let plan = frame.create_physical_plan().await?;

        let mut partial: Option<Arc<dyn ExecutionPlan>> = None;
        let mut states: Option<Arc<Slot>> = None;
        let mut reduce: Option<(Arc<Slot>, Arc<dyn ExecutionPlan>)> = None;
        let mut problem: Option<String> = None;
        let final_plan = plan
            .transform_down(|node| {
                let Some(agg) = node.downcast_ref::<AggregateExec>() else {
                    return Ok(Transformed::no(node));
                };
                let partial_node: Arc<dyn ExecutionPlan> = match agg.mode() {
                    AggregateMode::Single | AggregateMode::SinglePartitioned => Arc::new(AggregateExec::try_new(
                        AggregateMode::Partial,
                        agg.group_expr().clone(),
                        agg.aggr_expr().to_vec(),
                        agg.filter_expr().to_vec(),
                        agg.input().clone(),
                        agg.input_schema(),
                    )?),
                    AggregateMode::Final | AggregateMode::FinalPartitioned => match find_partial(agg.input()) {
                        Some(p) => p,
                        None => {
                            problem = Some("final aggregate without a partial one".into());
                            return Ok(Transformed::new(node, false, TreeNodeRecursion::Stop));
                        }
                    },
                    AggregateMode::Partial | AggregateMode::PartialReduce => {
                        problem = Some("unexpected partial aggregate at the top".into());
                        return Ok(Transformed::new(node, false, TreeNodeRecursion::Stop));
                    }
                };
                let p = partial_node.downcast_ref::<AggregateExec>().expect("partial is an AggregateExec");
                if count_aggregates(p.input()) > 0 {
                    problem = Some("only one level of GROUP BY is supported (found an aggregate inside the aggregated input)".into());
                    return Ok(Transformed::new(node, false, TreeNodeRecursion::Stop));
                }
                let slot = Slot::new(partial_node.schema());
                let leaf = Arc::new(StreamingTableExec::try_new(
                    partial_node.schema(),
                    vec![slot.clone() as Arc<dyn PartitionStream>],
                    None,
                    vec![],
                    false,
                    None,
                )?);
                let final_node = Arc::new(AggregateExec::try_new(
                    AggregateMode::Final,
                    p.group_expr().as_final(),
                    p.aggr_expr().to_vec(),
                    p.filter_expr().to_vec(),
                    leaf,
                    p.input_schema(),
                )?);
                let reduce_slot = Slot::new(partial_node.schema());
                let reduce_leaf = Arc::new(StreamingTableExec::try_new(
                    partial_node.schema(),
                    vec![reduce_slot.clone() as Arc<dyn PartitionStream>],
                    None,
                    vec![],
                    false,
                    None,
                )?);
                let reduce_node: Arc<dyn ExecutionPlan> = Arc::new(AggregateExec::try_new(
                    AggregateMode::PartialReduce,
                    p.group_expr().as_final(),
                    p.aggr_expr().to_vec(),
                    p.filter_expr().to_vec(),
                    reduce_leaf,
                    p.input_schema(),
                )?);
                reduce = Some((reduce_slot, reduce_node));
                partial = Some(partial_node);
                states = Some(slot);
                Ok(Transformed::new(final_node, true, TreeNodeRecursion::Jump))
            })?
            .data;
        if let Some(problem) = problem {
            return Err(PlanError::Shape(problem));
        }
        let (Some(partial), Some(states), Some((reduce_input, reduce_plan))) = (partial, states, reduce) else {
            return Err(PlanError::Shape(format!("the query has no GROUP BY aggregation; group by {WINDOW_START} and the keys to report")));
        };
        if count_aggregates(&final_plan) != 1 {
            return Err(PlanError::Shape("only one aggregation per pipeline query is supported".into()));
        }
        let agg = partial.downcast_ref::<AggregateExec>().expect("partial is an AggregateExec");
        let keys: Vec<&str> = agg.group_expr().expr().iter().map(|(_, name)| name.as_str()).collect();
        if !keys.contains(&WINDOW_START) {
            return Err(PlanError::Shape(format!("the query must GROUP BY {WINDOW_START} (it groups by: {})", keys.join(", "))));
        }
        let state_window_column = partial.schema().index_of(WINDOW_START).map_err(DataFusionError::from)?;
        if final_plan.properties().output_partitioning().partition_count() != 1 {
            return Err(PlanError::Shape("the plan has more than one output partition".into()));
        }
        if final_plan.schema().index_of(WINDOW_START).is_err() {
            return Err(PlanError::Shape(format!("the query must select {WINDOW_START}")));
        }
        let group_keys = keys.iter().map(|k| k.to_string()).collect();
        let heavy_hitters = agg.aggr_expr().iter().filter(|a| a.fun().name() == super::heavy_hitters::NAME);
        let bounded = heavy_hitters.clone().count() > 0;
        let heavy_hitters_capacity =
            heavy_hitters.filter_map(|a| a.expressions().first().and_then(|e| super::heavy_hitters::capacity_of(e).ok())).min();
        let compact_open_states = if bounded { COMPACT_OPEN_BOUNDED_STATES } else { COMPACT_OPEN_STATES };
        Ok(Self {
            input,
            states,
            partial,
            final_plan,
            reduce_input,
            reduce_plan,
            task: ctx.task_ctx(),
            state_window_column,
            group_keys,
            compact_open_states,
            heavy_hitters_capacity,
        })
    }

    /// Names of the GROUP BY keys.
    pub fn group_keys(&self) -> &[String] {
        &self.group_keys
    }

    /// The smallest capacity of its `heavy_hitters` aggregates (none without one).
    pub fn heavy_hitters_capacity(&self) -> Option<usize> {
        self.heavy_hitters_capacity
    }

    /// How many states an open window collects before they are merged per partition.
    pub fn compact_open_states(&self) -> usize {
        self.compact_open_states
    }

    /// Schema of the rows a closed window produces.
    pub fn output_schema(&self) -> SchemaRef {
        self.final_plan.schema()
    }

    /// Schema of the partial-aggregate state rows.
    pub fn state_schema(&self) -> SchemaRef {
        self.partial.schema()
    }

    /// Index of `window_start` in the state batches.
    pub fn state_window_column(&self) -> usize {
        self.state_window_column
    }

    /// Runs the partial aggregate over one micro-batch; returns accumulator state rows.
    pub async fn partial(&self, batch: RecordBatch) -> Result<Vec<RecordBatch>, DataFusionError> {
        self.input.fill(vec![batch]);
        collect(self.partial.clone(), self.task.clone()).await
    }

    /// Merges the accumulated states of one window into its result rows.
    pub async fn finish(&self, states: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, DataFusionError> {
        self.states.fill(states);
        collect(self.final_plan.clone(), self.task.clone()).await
    }

    /// Merges states into fewer states (one row per group), to be finished or merged later.
    pub async fn reduce(&self, states: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, DataFusionError> {
        self.reduce_input.fill(states);
        collect(self.reduce_plan.clone(), self.task.clone()).await
    }

    /// The plans, for `siteflow check` and debugging.
    pub fn describe(&self) -> String {
        use datafusion::physical_plan::displayable;
        format!(
            "partial (per micro-batch):\n{}final (per closed window):\n{}",
            displayable(self.partial.as_ref()).indent(false),
            displayable(self.final_plan.as_ref()).indent(false)
        )
    }
}
