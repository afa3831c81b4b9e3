//! Wires the stages together: decode → rates → enrich → window → publish to the sinks.
//!
//! One task runs the whole chain batch by batch, so there is no channel hop per record and
//! back-pressure is implicit: the source is polled only when the previous batch is done. What
//! feeds the pipeline, and what happens at the end, is a driver's business (`driver`): the
//! pipeline offers the calls (process, tick, finish) and a partition's state to save, restore
//! and release.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::error::DataFusionError;

use crate::checkpoint::CheckpointError;
use crate::config::{Config, resolve};
use crate::decode::{DecodeLimits, DecodeStats, Decoded, decode_parallel};
use crate::enrich::{EnrichStats, Enricher, Sampling};
use crate::inventory::{Inventory, InventoryError, addr_from_ip};
use crate::metrics::PipelineMetrics;
use crate::rates::{CounterBaseline, CounterRates};
use crate::readiness::meetings::load_schedule;
use crate::readiness::{Meeting, Policy, PolicyError, ReadinessEngine, SharedReadiness};
use crate::sink::WindowSink;
use crate::sink::readiness::ReadinessSink;
use crate::sql::RecentFlows;
use crate::table::{Input, ReadinessFeed, TABLES, TableDef};
use crate::types::{Format, PartitionId, SourceBatch, unix_now_ns};
use crate::window::{Closed, ClosedWindow, Contribution, ExporterKey, PartialsAhead, StatesAhead, TableId, WindowOperator, WindowSpec};

/// A pipeline that cannot be built, naming the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("{file}: {message}")]
    Sql { file: String, message: String },
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The meetings file: unreadable, or a meeting that selects no site or names no profile.
    #[error("{0}")]
    Meetings(String),
    /// The maintenance file: unreadable, or a window that selects no site or ends before it starts.
    #[error("{0}")]
    Maintenance(String),
    /// Settings that contradict each other, naming them.
    #[error("{0}")]
    Config(String),
}

/// Why a run stopped. Every variant is fatal to the run; bad input never is (it is counted by
/// reason and skipped), and a failed periodic checkpoint is retried by the Kafka driver.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Aggregating or restoring a window failed in DataFusion: a bug or memory, not the input.
    #[error("window aggregation failed: {0}")]
    Window(#[from] DataFusionError),
    /// A checkpoint or results log could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The dead-letter topic did not take the rejected messages.
    #[error(transparent)]
    DeadLetters(#[from] crate::dead_letter::DeadLetterError),
    /// The ingest stage could not hand its partial aggregates on.
    #[error(transparent)]
    HandOff(#[from] crate::shuffle::IngestError),
    /// A task the run waits for panicked or was cancelled.
    #[error("a pipeline task ended abnormally: {0}")]
    Task(String),
}

/// What a partition's checkpoint keeps of the pipeline, so that the partition can go on
/// elsewhere or after a restart.
#[derive(Debug, Default)]
pub struct PartitionState {
    /// The partition's newest event time.
    pub max_event_ns: Option<i64>,
    /// Per table (in the window operator's order): the partition's open window states.
    pub states: Vec<Vec<RecordBatch>>,
    /// The partition's last interface counter samples (the baselines of the next deltas).
    pub counters: Vec<CounterBaseline>,
    /// The partition's event-time clocks: (exporter, largest event time).
    pub clocks: Vec<(ExporterKey, i64)>,
}

/// A SQL text and where it came from.
#[derive(Debug, Clone)]
pub struct SqlSource {
    pub origin: String,
    pub text: String,
}

impl SqlSource {
    fn load(path: Option<&Path>, embedded: &str, embedded_name: &str) -> Result<Self, BuildError> {
        match path {
            None => Ok(Self { origin: format!("<embedded>/{embedded_name}"), text: embedded.to_string() }),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| BuildError::Sql { file: p.display().to_string(), message: format!("cannot read: {e}") })?;
                Ok(Self { origin: p.display().to_string(), text })
            }
        }
    }
}

/// The inventory, pipeline SQL, policy and meetings a configuration points to.
pub struct Resources {
    pub inventory: Arc<Inventory>,
    /// Each table with its SQL, in the window operator's order.
    pub sql: Vec<(&'static TableDef, SqlSource)>,
    pub policy: Policy,
    pub meetings: Vec<Meeting>,
    /// Planned maintenance windows (`readiness.maintenance`).
    pub maintenance: Vec<crate::readiness::maintenance::Maintenance>,
}

impl Resources {
    /// Loads what `config` names, for the tables of [`TABLES`].
    pub fn load(config: &Config) -> Result<Self, BuildError> {
        Self::load_with_tables(config, &TABLES)
    }

    /// Loads what `config` names, for `tables` (a test adds its own table this way).
    pub fn load_with_tables(config: &Config, tables: &[&'static TableDef]) -> Result<Self, BuildError> {
        let inventory = match &config.inventory.sites_csv {
            Some(p) => Inventory::load(&resolve(p))?,
            None => Inventory::embedded(),
        };
        let sql = tables
            .iter()
            .map(|&table| {
                let path = config.pipeline.sql_file(table.config_key).map(resolve);
                Ok((table, SqlSource::load(path.as_deref(), table.embedded_sql, table.embedded_path)?))
            })
            .collect::<Result<Vec<_>, BuildError>>()?;
        let policy = match &config.readiness.policy {
            Some(p) => Policy::load(&resolve(p))?,
            None => Policy::embedded(),
        };
        policy.check_sites(&inventory)?;
        let meetings = match &config.readiness.meetings {
            Some(p) => load_schedule(&resolve(p), &inventory, &policy).map_err(BuildError::Meetings)?,
            None => Vec::new(),
        };
        let maintenance = match &config.readiness.maintenance {
            Some(p) => crate::readiness::maintenance::load(&resolve(p), &inventory).map_err(BuildError::Maintenance)?,
            None => Vec::new(),
        };
        Ok(Self { inventory: Arc::new(inventory), sql, policy, meetings, maintenance })
    }

    /// The SQL of `table`.
    pub fn sql_of(&self, table: &TableDef) -> Option<&SqlSource> {
        self.sql.iter().find(|(t, _)| *t == table).map(|(_, s)| s)
    }

    /// The window operator's id of `table` (see [`plan_windows`]).
    pub fn table_id(&self, table: &TableDef) -> Option<TableId> {
        self.sql.iter().position(|(t, _)| *t == table)
    }
}

/// Builds the window operator with every table of `res` planned from its SQL, in order: table
/// `i` of `res.sql` is the operator's [`TableId`] `i`.
pub async fn plan_windows(spec: WindowSpec, res: &Resources) -> Result<WindowOperator, BuildError> {
    let mut windows = WindowOperator::new(spec);
    for (table, sql) in &res.sql {
        let err = |message: String| BuildError::Sql { file: sql.origin.clone(), message };
        let name = table.name;
        let id = windows.add_table(name, table.input.name(), &table.input.schema(), &sql.text).await.map_err(|e| err(e.to_string()))?;
        let out = windows.output_schema(id);
        for col in table.required_columns {
            if out.index_of(col).is_err() {
                return Err(err(format!(
                    "the query over `{name}` must output a `{col}` column (it outputs: {})",
                    out.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        if let Some(extra) = windows.group_keys(id).iter().find(|k| !table.allowed_keys.contains(&k.as_str())) {
            return Err(err(format!(
                "the query over `{name}` groups by `{extra}`: only {} are allowed, one row per site per window",
                table.allowed_keys.join(", ")
            )));
        }
    }
    Ok(windows)
}

/// A warning when `sql.top_talkers` asks for more conversations per site, direction and window
/// than the `top_talkers` SQL keeps (its `heavy_hitters` capacity): the table would list fewer
/// than asked, and its last ranks would be the least exact.
pub fn top_talkers_warning(config: &Config, res: &Resources, windows: &WindowOperator) -> Option<String> {
    let wanted = config.sql.top_talkers;
    let table = res.table_id(&crate::table::CONVERSATIONS)?;
    let capacity = windows.heavy_hitters_capacity(table)?;
    let origin = &res.sql_of(&crate::table::CONVERSATIONS)?.origin;
    (wanted > capacity).then(|| {
        format!(
            "sql.top_talkers is {wanted}, but {origin} keeps at most {capacity} conversations per site, direction and window \
             (heavy_hitters capacity {capacity}): raise the capacity to at least {wanted} (up to {}) or lower sql.top_talkers",
            crate::window::heavy_hitters::MAX_CAPACITY
        )
    })
}

/// Totals of one run, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunSummary {
    pub batches: u64,
    pub records: u64,
    pub windows_closed: u64,
    pub windows_flushed_at_end: u64,
    /// Flow inputs whose partial aggregates, computed ahead (`decode.ahead`), were used; and
    /// those of them whose windows with late records were aggregated again in line.
    pub states_ahead_used: u64,
    pub states_ahead_redone: u64,
}

/// The processing chain with its state.
pub struct Pipeline {
    /// Decode and enrich: shared with the thread that runs them ahead (`decode.ahead`).
    preparer: Arc<Preparer>,
    /// Whether the source driver decodes the next batches on another thread.
    decode_ahead: bool,
    windows: WindowOperator,
    /// The tables, indexed by the window operator's [`TableId`].
    tables: Vec<&'static TableDef>,
    /// Interface counters' previous samples, to turn counters into traffic.
    counter_rates: CounterRates,
    metrics: Arc<PipelineMetrics>,
    sinks: Vec<Box<dyn WindowSink>>,
    /// The sink that judges the sites; its verdicts go to the other sinks.
    readiness: ReadinessSink,
    /// Set once the first window has been published (for `/readyz`), unless a driver decides
    /// (see [`Pipeline::leave_readiness_to_the_driver`]).
    pub ready: Arc<AtomicBool>,
    /// Whether publishing the first window sets `ready`.
    ready_on_first_window: bool,
    summary: RunSummary,
    /// Per-partition results of the windows published since the driver last took them (only
    /// kept after [`Pipeline::keep_results_per_partition`]).
    results: Vec<Contribution>,
    /// The newest enriched flow records, for SQL (`flows_recent`).
    recent_flows: Option<Arc<RecentFlows>>,
    /// Whether flows also feed the top-talker tables (`sql.top_talkers` > 0): it costs about as
    /// much as decoding, so `0` turns it off (BENCHMARKS.md).
    top_talkers: bool,
    /// Raised to the newest event time after each batch, for a replay's progress and pacing.
    newest_event: Option<Arc<std::sync::atomic::AtomicI64>>,
    /// Sources whose records are mostly rejected, said once in the log.
    rejections: crate::notices::RejectionWatch,
    /// The periodic one-line status.
    status: crate::notices::StatusLog,
    /// Per table: whether its first window was published.
    first_published: Vec<bool>,
    /// The ingest stage of a scale-out: windows are not closed here; their partial states are
    /// taken at each checkpoint and handed on (see [`Pipeline::hand_windows_on`]).
    hand_on: bool,
    /// The ingest stage: per partition, the on-time records readiness reads one by one (probe
    /// results, uplink counters and link states) with their tables, handed on with the
    /// partition's states.
    handed_records: std::collections::HashMap<PartitionId, Vec<(TableId, RecordBatch)>>,
}

/// The first half of a batch's processing, which holds no state between batches: decode,
/// spread (`event_time: spread`) and enrich flows and probes. So it can run on another thread,
/// ahead of the windows (`decode.ahead`), and give the same rows as in line. Ahead, it also
/// computes the flow tables' partial aggregates (see [`PartialsAhead`]).
pub struct Preparer {
    limits: DecodeLimits,
    /// Threads decoding one batch (`decode.threads`, resolved).
    decode_threads: usize,
    max_future_ns: i64,
    /// Spreads flows of `event_time: spread` sources over the windows they cover.
    spreader: crate::event_time::Spreader,
    enricher: Enricher,
    /// With `decode.ahead`: the flow tables' partial aggregates, computed ahead.
    partials: Option<PartialsAhead>,
}

/// A batch decoded and, but for interface counters (their rates need the partition's previous
/// samples), enriched.
pub struct Prepared {
    stats: DecodeStats,
    rows: PreparedRows,
}

enum PreparedRows {
    Flows { rows: RecordBatch, enrich: EnrichStats, spread: Option<crate::event_time::SpreadStats>, ahead: Option<StatesAhead> },
    Probes { rows: RecordBatch, enrich: EnrichStats },
    Telemetry { probes: RecordBatch, counters: RecordBatch, is_counter: Vec<bool> },
}

impl Preparer {
    /// Decodes and enriches `batch`, and with `decode.ahead` computes the flow tables' partial
    /// aggregates; event times further ahead of now than `decode.max_future_secs` are rejected
    /// as of this call.
    pub fn prepare(&self, batch: &SourceBatch) -> Prepared {
        self.prepare_with(batch, true)
    }

    /// [`Self::prepare`], the partial aggregates left to the window stage unless `ahead`.
    fn prepare_with(&self, batch: &SourceBatch, ahead: bool) -> Prepared {
        let limits = DecodeLimits { max_time_ns: unix_now_ns().saturating_add(self.max_future_ns), ..self.limits };
        let (decoded, stats) = decode_parallel(batch.format, batch.event_time, &batch.messages, &limits, self.decode_threads);
        let rows = match decoded {
            Decoded::Flows(b) => {
                let (b, spread) = self.spreader.apply(batch.event_time, b);
                let (rows, enrich) = self.enricher.enrich_flows(&b);
                let ahead = match &self.partials {
                    Some(partials) if ahead && rows.num_rows() > 0 => partials.compute(&rows),
                    _ => None,
                };
                PreparedRows::Flows { rows, enrich, spread, ahead }
            }
            Decoded::Probes(b) => {
                let (rows, enrich) = self.enricher.enrich_probes(&b);
                PreparedRows::Probes { rows, enrich }
            }
            Decoded::Telemetry { probes, counters, is_counter } => PreparedRows::Telemetry { probes, counters, is_counter },
        };
        Prepared { stats, rows }
    }
}

/// How long to wait before warning again about a source whose records are still rejected.
const REJECTION_WARN_REPEAT: Duration = Duration::from_secs(300);

impl Pipeline {
    /// Builds the pipeline for `config` over the loaded resources.
    pub async fn build(
        config: &Config,
        res: &Resources,
        metrics: Arc<PipelineMetrics>,
        sinks: Vec<Box<dyn WindowSink>>,
    ) -> Result<Self, BuildError> {
        let spec = config.window_spec();
        if res.policy.period_secs < config.window.size_secs {
            return Err(BuildError::Config(format!(
                "readiness policy: period_secs ({}) must be at least window.size_secs ({})",
                res.policy.period_secs, config.window.size_secs
            )));
        }
        let mut windows = plan_windows(spec, res).await?;
        windows.set_parallel_tables(config.window.parallel_tables.enabled());
        if let Some(warning) = top_talkers_warning(config, res, &windows) {
            tracing::warn!("{warning}");
        }
        let tables: Vec<&'static TableDef> = res.sql.iter().map(|(table, _)| *table).collect();
        let top_talkers = config.sql.top_talkers > 0;
        let decode_ahead = config.decode.decode_ahead();
        // The tables `feed` hands flows to.
        let flow_tables: Vec<TableId> =
            (0..tables.len()).filter(|&id| tables[id].input == Input::Flows && (top_talkers || !tables[id].top_talkers)).collect();
        let partials = (decode_ahead && !flow_tables.is_empty()).then(|| windows.partials_ahead(&flow_tables));
        let sampling = Sampling {
            default_rate: config.sampling.default_rate,
            overrides: config.sampling.overrides.iter().map(|(ip, r)| (addr_from_ip(*ip), *r)).collect(),
        };
        Ok(Self {
            preparer: Arc::new(Preparer {
                limits: DecodeLimits {
                    max_message_bytes: config.decode.max_message_bytes,
                    max_bytes_per_record: config.decode.max_bytes_per_record,
                    min_time_ns: DecodeLimits::MIN_TIME_NS,
                    max_time_ns: i64::MAX,
                },
                decode_threads: config.decode.decode_threads(),
                max_future_ns: (config.decode.max_future_secs as i64).saturating_mul(1_000_000_000),
                spreader: crate::event_time::Spreader::new(config.window_size(), config.decode.max_spread_windows),
                enricher: Enricher::new(res.inventory.clone(), sampling),
                partials,
            }),
            decode_ahead,
            readiness: ReadinessSink::new(SharedReadiness::new(
                ReadinessEngine::new(res.inventory.clone(), res.policy.clone(), spec.size_ns()).with_maintenance(res.maintenance.clone()),
                res.meetings.clone(),
            )),
            windows,
            first_published: vec![false; tables.len()],
            tables,
            counter_rates: CounterRates::default(),
            metrics,
            sinks,
            ready: Arc::new(AtomicBool::new(false)),
            ready_on_first_window: true,
            summary: RunSummary::default(),
            results: Vec::new(),
            recent_flows: None,
            top_talkers,
            newest_event: None,
            rejections: crate::notices::RejectionWatch::new(
                Duration::from_secs(config.log.rejection_warn_after_secs),
                REJECTION_WARN_REPEAT.max(Duration::from_secs(config.log.rejection_warn_after_secs)),
            ),
            status: crate::notices::StatusLog::new(Duration::from_secs(config.log.status_interval_secs), Instant::now()),
            hand_on: false,
            handed_records: Default::default(),
        })
    }

    /// Adds a sink after the pipeline was built (what a driver brings, e.g. the readiness topic).
    pub fn add_sink(&mut self, sink: Box<dyn WindowSink>) {
        self.sinks.push(sink);
    }

    /// Keeps each published window's per-partition results for [`Pipeline::take_results`]
    /// (what the Kafka driver's results logs hold), for the tables that log them.
    pub fn keep_results_per_partition(&mut self) {
        self.windows.set_per_partition_results(true);
        for (id, table) in self.tables.iter().enumerate() {
            self.windows.set_results_log(id, table.results_log);
        }
    }

    /// The per-partition results of the windows published since the last call.
    pub fn take_results(&mut self) -> Vec<Contribution> {
        std::mem::take(&mut self.results)
    }

    /// Keeps the newest enriched flow records in `ring` (SQL table `flows_recent`).
    pub fn keep_recent_flows(&mut self, ring: Arc<RecentFlows>) {
        self.recent_flows = Some(ring);
    }

    /// Raises `newest` to the newest event time seen after every batch (a replay shows it and
    /// paces by it; the watermark trails it and stalls on the slowest file).
    pub fn track_event_time(&mut self, newest: Arc<std::sync::atomic::AtomicI64>) {
        self.newest_event = Some(newest);
    }

    /// Table names in the window operator's order (the checkpoint layout).
    pub fn table_names(&self) -> Vec<String> {
        (0..self.windows.table_count()).map(|t| self.windows.table_name(t).to_string()).collect()
    }

    /// The schema of each table's window states (the checkpoint layout).
    pub fn state_schemas(&self) -> Vec<datafusion::arrow::datatypes::SchemaRef> {
        (0..self.windows.table_count()).map(|t| self.windows.state_schema(t)).collect()
    }

    /// Announces partitions before their first records (the watermark waits for them).
    pub fn register_partitions(&mut self, partitions: &[PartitionId]) {
        self.windows.register_partitions(partitions, Instant::now());
    }

    /// What a checkpoint of `partition` must keep.
    pub fn partition_state(&self, partition: PartitionId) -> PartitionState {
        PartitionState {
            max_event_ns: self.windows.watermarks().partition_max_event(partition),
            states: self.windows.partition_states(partition),
            counters: self.counter_rates.partition_baselines(partition),
            clocks: self.windows.watermarks().partition_clocks(partition),
        }
    }

    /// Takes `partition` over: from its saved state, or from nothing.
    pub fn restore_partition(&mut self, partition: PartitionId, state: Option<PartitionState>) -> Result<(), PipelineError> {
        self.handed_records.remove(&partition);
        let state = state.unwrap_or_else(|| PartitionState { states: vec![Vec::new(); self.windows.table_count()], ..Default::default() });
        self.windows.restore_partition(partition, state.max_event_ns, &state.clocks, state.states, Instant::now())?;
        self.counter_rates.restore_partition(partition, &state.counters);
        Ok(())
    }

    /// Lets `partition` go (after its state was saved): its open windows and baselines are dropped.
    pub fn release_partition(&mut self, partition: PartitionId) {
        self.handed_records.remove(&partition);
        self.windows.release_partition(partition);
        self.counter_rates.release_partition(partition);
    }

    /// Makes this the ingest stage of a scale-out: no window closes here; the driver takes each
    /// partition's partial states ([`Pipeline::take_partition_states`]) and hands them to the
    /// site stage, which publishes them.
    pub fn hand_windows_on(&mut self) {
        self.hand_on = true;
        self.ready_on_first_window = false;
    }

    /// Takes a partition's open partial states, per table (the ingest stage's span).
    pub fn take_partition_states(&mut self, partition: PartitionId) -> Vec<Vec<RecordBatch>> {
        self.windows.take_partition_states(partition)
    }

    /// Windows wait for every registered partition's first records (or, in the site stage of
    /// a scale-out, its first partial) until it goes idle: the Kafka drivers register what the
    /// group assigns. Without it, a backlog in several topics is published as the fastest
    /// partition reads it (probes before any flow) and every window arrives as corrections.
    pub fn wait_for_unheard_partitions(&mut self) {
        self.windows.wait_for_unheard_partitions();
    }

    /// Takes a partition's on-time records that readiness reads one by one, with their tables
    /// (the ingest stage hands them on with the partition's states).
    pub fn take_partition_records(&mut self, partition: PartitionId) -> Vec<(TableId, RecordBatch)> {
        self.handed_records.remove(&partition).unwrap_or_default()
    }

    /// The site stage of a scale-out: merges what an ingest stage made of one source
    /// partition's span (`partition` is this stage's id for that source on one internal
    /// partition), then publishes what that closes. Readiness reads the span's on-time records
    /// before the clocks move, as it would have read them before the window closed.
    pub async fn merge_partial(
        &mut self,
        partition: PartitionId,
        clocks: &[(ExporterKey, i64)],
        states: Vec<Vec<RecordBatch>>,
        records: &[(TableId, RecordBatch)],
        now: Instant,
    ) -> Result<(), PipelineError> {
        for (id, rows) in records {
            let table = if *id == crate::shuffle::LEGACY_PROBE_RECORDS {
                self.tables.iter().copied().find(|t| t.readiness == ReadinessFeed::OnTimeRecords)
            } else {
                self.tables.get(*id).copied()
            };
            let Some(table) = table else { continue };
            self.readiness.on_records(table, rows);
            for sink in &mut self.sinks {
                sink.on_records(table, rows);
            }
        }
        self.windows.merge_partition_states(partition, clocks, states, now).await?;
        let closed = self.windows.close_ready(now).await?;
        self.publish(closed, false);
        Ok(())
    }

    /// The first window published no longer sets `ready`: the driver knows better (the Kafka
    /// driver: joined the group and caught up, since a backlog publishes windows long before).
    pub fn leave_readiness_to_the_driver(&mut self) {
        self.ready_on_first_window = false;
    }

    /// Site verdicts and meetings, shared with the HTTP API and /metrics.
    pub fn readiness(&self) -> Arc<SharedReadiness> {
        self.readiness.shared().clone()
    }

    /// The counters and gauges the pipeline updates.
    pub fn metrics(&self) -> &Arc<PipelineMetrics> {
        &self.metrics
    }

    /// Formats every source of this pipeline can deliver.
    pub const FORMATS: [Format; 7] = Format::ALL;

    /// Each table with the schema of its closed windows (what SQL declares).
    pub fn output_schemas(&self) -> Vec<(&'static TableDef, datafusion::arrow::datatypes::SchemaRef)> {
        self.tables.iter().enumerate().map(|(id, table)| (*table, self.windows.output_schema(id))).collect()
    }

    pub fn windows(&self) -> &WindowOperator {
        &self.windows
    }

    /// Runs one source batch through decode, enrich and window, then publishes closed windows;
    /// returns how its records decoded. `source` names where the batch came from (a topic) in
    /// the log's warnings.
    pub async fn process(&mut self, batch: &SourceBatch, source: &str) -> Result<DecodeStats, PipelineError> {
        if batch.messages.is_empty() {
            return Ok(DecodeStats::default());
        }
        let prepared = self.preparer.prepare_with(batch, false);
        self.process_prepared(batch, prepared, source).await
    }

    /// The decoding and enrichment of batches, to run them ahead on another thread.
    pub fn preparer(&self) -> Arc<Preparer> {
        self.preparer.clone()
    }

    /// Whether the source driver should decode the next batches ahead (`decode.ahead`).
    pub fn decodes_ahead(&self) -> bool {
        self.decode_ahead
    }

    /// [`Pipeline::process`] of a batch [`Preparer::prepare`] decoded and enriched (on this
    /// thread or ahead on another): the rest of the chain, in the same order.
    pub async fn process_prepared(&mut self, batch: &SourceBatch, prepared: Prepared, source: &str) -> Result<DecodeStats, PipelineError> {
        if batch.messages.is_empty() {
            return Ok(DecodeStats::default());
        }
        let Prepared { stats, rows } = prepared;
        // Read, whatever its records turn out to be: it no longer holds windows back as unheard.
        self.windows.heard_from(batch.partition, batch.received);
        self.metrics.record_decode(batch.format, batch.messages.total_bytes(), &stats);
        self.rejections.observe(source, batch.format, &stats, batch.received);
        self.summary.batches += 1;
        self.summary.records += stats.records;
        // Each input's enriched rows, with (for several inputs from the same messages) each row's
        // position among the messages' records.
        let mut ahead = None;
        let inputs: Vec<(Input, RecordBatch, EnrichStats, Vec<u32>)> = match rows {
            PreparedRows::Flows { rows, enrich, spread, ahead: states } => {
                if let Some(stats) = spread {
                    self.metrics.record_spread(&stats);
                }
                ahead = states;
                vec![(Input::Flows, rows, enrich, Vec::new())]
            }
            PreparedRows::Probes { rows, enrich } => vec![(Input::Probes, rows, enrich, Vec::new())],
            PreparedRows::Telemetry { probes, counters, is_counter } => {
                let (traffic, counter_stats, sample_rows) = self.counter_rates.apply(batch.partition, &counters);
                self.metrics.record_counters(&counter_stats);
                let enricher = &self.preparer.enricher;
                let (probes, probe_stats, probe_rows) = enricher.enrich_probes_keeping(&probes);
                let (traffic, traffic_stats, traffic_rows) = enricher.enrich_interfaces(&traffic);
                // Where each surviving row stood among the messages' metrics.
                let (mut probe_ordinal, mut counter_ordinal) = (Vec::new(), Vec::new());
                for (k, &counter) in is_counter.iter().enumerate() {
                    if counter { &mut counter_ordinal } else { &mut probe_ordinal }.push(k as u32);
                }
                vec![
                    (Input::Probes, probes, probe_stats, probe_rows.iter().map(|&r| probe_ordinal[r as usize]).collect()),
                    (
                        Input::Interfaces,
                        traffic,
                        traffic_stats,
                        traffic_rows.iter().map(|&r| counter_ordinal[sample_rows[r as usize] as usize]).collect(),
                    ),
                ]
            }
        };
        self.feed(batch, inputs, ahead).await?;
        if let Some(newest) = &self.newest_event
            && let Some(t) = self.windows.watermarks().partition_max_event(batch.partition)
        {
            newest.fetch_max(t, Ordering::Relaxed);
        }
        if !self.hand_on {
            let closed = self.windows.close_ready(batch.received).await?;
            self.publish(closed, false);
        }
        Ok(stats)
    }

    /// Hands the enriched rows of one source batch to every table that reads them, all tables
    /// together (see [`WindowOperator::process_together`]).
    /// `ahead`: the flow tables' partial states computed ahead.
    async fn feed(
        &mut self,
        batch: &SourceBatch,
        inputs: Vec<(Input, RecordBatch, EnrichStats, Vec<u32>)>,
        mut ahead: Option<StatesAhead>,
    ) -> Result<(), PipelineError> {
        let mut fed: Vec<(TableId, &RecordBatch)> = Vec::new();
        let mut fed_ordinals = Vec::new();
        let mut fed_ahead = Vec::new();
        for (input, rows, stats, ordinals) in &inputs {
            if *input == Input::Flows {
                if let Some(ring) = &self.recent_flows {
                    ring.push(rows);
                }
                for sink in &mut self.sinks {
                    sink.on_flows(rows);
                }
            }
            for (id, table) in self.tables.iter().enumerate() {
                if table.input != *input || (table.top_talkers && !self.top_talkers) {
                    continue;
                }
                // A second view of rows another table counts: not counted again.
                if !table.second_view {
                    self.metrics.record_enrich(batch.format, table.name, stats);
                }
                if rows.num_rows() > 0 {
                    fed.push((id, rows));
                    fed_ordinals.push(ordinals.clone());
                    fed_ahead.push(ahead.as_mut().filter(|_| *input == Input::Flows).and_then(|a| a.take(id)));
                }
            }
        }
        if fed.is_empty() {
            return Ok(());
        }
        let outcomes = self.windows.process_together(batch.partition, &fed, &fed_ordinals, fed_ahead, batch.received).await?;
        for ((id, _), outcome) in fed.iter().zip(outcomes) {
            let table = self.tables[*id];
            if !table.second_view {
                self.metrics.records_late.with_label_values(&[table.name]).inc_by(outcome.late);
            }
            if let Some(on_time) = &outcome.on_time {
                if self.hand_on {
                    if matches!(table.readiness, ReadinessFeed::OnTimeRecords | ReadinessFeed::LinkStates) {
                        self.handed_records.entry(batch.partition).or_default().push((*id, on_time.clone()));
                    }
                    continue;
                }
                self.readiness.on_records(table, on_time);
                for sink in &mut self.sinks {
                    sink.on_records(table, on_time);
                }
            }
        }
        Ok(())
    }

    /// Periodic work without new data: idle partitions release the watermark; gauges refresh.
    /// `status_note` ends the periodic status line (the driver's say, e.g. the Kafka lag).
    pub async fn tick(&mut self, status_note: Option<String>) -> Result<(), PipelineError> {
        let now = Instant::now();
        self.readiness.on_tick(now);
        for sink in &mut self.sinks {
            sink.on_tick(now);
        }
        if !self.hand_on {
            self.windows.advance_idle(now);
            let closed = self.windows.close_ready(now).await?;
            self.publish(closed, false);
        }
        self.notify(now, status_note);
        Ok(())
    }

    /// Logs what is due: warnings about rejected sources, the periodic status line.
    fn notify(&mut self, now: Instant, status_note: Option<String>) {
        for w in self.rejections.evaluate(now) {
            tracing::warn!(
                topic = %w.source,
                format = w.format.as_str(),
                reason = w.top_reason.as_str(),
                rejected = w.rejected,
                records = w.records,
                "records mostly rejected: {w}"
            );
        }
        let (rejected, _, _) = self.metrics.lost_records();
        if let Some(s) = self.status.due(now, self.summary.records, self.summary.windows_closed, rejected) {
            let lag = self.windows.watermark_ns().map(|wm| unix_now_ns().saturating_sub(wm) as f64 / 1e9);
            let lag_text = lag.map_or_else(|| "no watermark yet".to_string(), |l| format!("watermark {l:.0} s behind"));
            let note = status_note.map_or_else(String::new, |n| format!(", {n}"));
            tracing::info!(
                records_per_sec = s.records_per_sec.round(),
                sites_seen = s.sites_seen,
                windows_closed = s.windows_closed,
                rejected = s.rejected,
                watermark_lag_secs = lag.map(|l| l.round()),
                "status: {:.0} records/s, {} sites seen, {} window(s) closed, {} rejected, {lag_text}{note}",
                s.records_per_sec,
                s.sites_seen,
                s.windows_closed,
                s.rejected
            );
        }
    }

    /// Closes every open window (at shutdown) and returns the run's totals.
    pub async fn finish(&mut self) -> Result<RunSummary, PipelineError> {
        let closed = self.windows.flush(Instant::now()).await?;
        self.publish(closed, true);
        Ok(self.summary)
    }

    /// The run's totals so far.
    pub fn summary(&self) -> RunSummary {
        let (states_ahead_used, states_ahead_redone) = self.windows.states_ahead_used();
        RunSummary { states_ahead_used, states_ahead_redone, ..self.summary }
    }

    /// Logs the run's totals and what was lost, once the pipeline has stopped.
    pub fn log_stopped(&self) {
        let summary = self.summary;
        let (rejected, unmatched, late) = self.metrics.lost_records();
        tracing::info!(
            batches = summary.batches,
            records = summary.records,
            rejected,
            unmatched,
            late,
            windows = summary.windows_closed,
            flushed = summary.windows_flushed_at_end,
            "pipeline stopped"
        );
    }

    /// Hands one closed window (or a correction) to the sinks and what else reads its table.
    fn publish_window(&mut self, w: &ClosedWindow, flushing: bool) {
        let table = self.tables[w.table_id];
        self.readiness.on_window(table, w);
        for sink in &mut self.sinks {
            sink.on_window(table, w);
        }
        if w.previous.is_some() {
            self.metrics.windows.corrected.with_label_values(&[table.name]).inc();
            return;
        }
        // Empty windows of a table without input are published too: not news.
        if !self.first_published[w.table_id] && w.rows.num_rows() > 0 {
            self.first_published[w.table_id] = true;
            let start = chrono::DateTime::from_timestamp_nanos(w.start_ns).to_rfc3339();
            tracing::info!(table = %table.name, window_start = %start, rows = w.rows.num_rows(), "first {} window published", table.name);
        }
        // The SQL decides the column's type (often a dictionary): read it as text.
        if !table.second_view
            && let Some(column) = w.rows.column_by_name("site")
            && let Ok(text) = datafusion::arrow::compute::cast(column, &datafusion::arrow::datatypes::DataType::Utf8)
            && let Some(sites) = text.as_any().downcast_ref::<datafusion::arrow::array::StringArray>()
        {
            self.status.saw_sites(sites.iter().flatten());
        }
        self.metrics.windows.closed.with_label_values(&[table.name]).inc();
        if !flushing {
            self.metrics.record_close_latency(w.closed_by.elapsed());
        }
    }

    /// Every table's windows up to `end` are with the sinks: judge the sites over them.
    fn windows_complete(&mut self, start: i64, end: i64) {
        let sinks = &mut self.sinks;
        self.readiness.windows_complete(start, end, |verdicts| {
            for sink in sinks {
                sink.on_readiness(start, end, verdicts);
            }
        });
    }

    fn publish(&mut self, closed: Closed, flushing: bool) {
        self.metrics.windows.late_contributions.inc_by(closed.late_contributions);
        let Closed { windows, completed, contributions, .. } = closed;
        self.results.extend(contributions);
        if !completed.is_empty() && self.ready_on_first_window {
            // Before the sinks see the window: whoever sees it on /metrics also sees /readyz ready.
            self.ready.store(true, Ordering::Release);
        }
        // Windows come oldest first, every table of a window together: each window goes to the
        // sinks whole, then, if it completes the windows up to its end, readiness judges them.
        let mut completed = completed.into_iter().peekable();
        for same_window in windows.chunk_by(|a, b| a.start_ns == b.start_ns) {
            for w in same_window {
                self.publish_window(w, flushing);
            }
            if same_window.iter().any(|w| w.previous.is_none()) {
                self.summary.windows_closed += 1;
                self.summary.windows_flushed_at_end += u64::from(flushing);
            }
            while let Some((start, end)) = completed.next_if(|(start, _)| *start <= same_window[0].start_ns) {
                self.windows_complete(start, end);
            }
        }
        // Every completed window has its tables among `windows`; this only guards that rule.
        for (start, end) in completed {
            self.windows_complete(start, end);
        }
        self.metrics.windows.correctable.set(self.windows.correctable_window_count() as i64);
        self.metrics.windows.open.set(self.windows.open_window_count() as i64);
        if let Some(wm) = self.windows.watermark_ns() {
            self.metrics.windows.watermark_timestamp.set(wm as f64 / 1e9);
            self.metrics.windows.watermark_lag.set(unix_now_ns().saturating_sub(wm) as f64 / 1e9);
        }
    }
}
