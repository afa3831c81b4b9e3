//! Wires the stages together: source → decode → enrich → window → sinks.
//!
//! One task runs the whole chain batch by batch, so there is no channel hop per record and
//! back-pressure is implicit: the source is polled only when the previous batch is done.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::checkpoint::{CheckpointStore, PartitionCheckpoint, PartitionKey};
use crate::config::{Config, resolve};
use crate::dead_letter::DeadLetters;
use crate::decode::{DecodeLimits, Decoded, decode_with};
use crate::enrich::{EnrichStats, Enricher, Sampling};
use crate::inventory::{Inventory, InventoryError, addr_from_ip};
use crate::metrics::PipelineMetrics;
use crate::rates::CounterRates;
use crate::readiness::meetings::load_schedule;
use crate::readiness::{Meeting, Policy, ReadinessEngine, SharedReadiness};
use crate::sink::WindowSink;
use crate::source::Source;
use crate::source::kafka::{KafkaEvent, KafkaSource};
use crate::sql::RecentFlows;
use crate::table::{Input, ReadinessFeed, TABLES, TableDef};
use crate::types::{Format, Messages, PartitionId, SourceBatch, unix_now_ns};
use crate::window::{Closed, ClosedWindow, TableId, WindowOperator, WindowSpec};

/// A pipeline that cannot be built, naming the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("{file}: {message}")]
    Sql { file: String, message: String },
    #[error("{0}")]
    Other(String),
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
            Some(p) => Policy::load(&resolve(p)).map_err(BuildError::Other)?,
            None => Policy::embedded(),
        };
        policy.check_sites(&inventory).map_err(|e| BuildError::Other(format!("readiness policy: {e}")))?;
        let meetings = match &config.readiness.meetings {
            Some(p) => load_schedule(&resolve(p), &inventory, &policy).map_err(BuildError::Other)?,
            None => Vec::new(),
        };
        Ok(Self { inventory: Arc::new(inventory), sql, policy, meetings })
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

/// Totals of one run, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunSummary {
    pub batches: u64,
    pub records: u64,
    pub windows_closed: u64,
    pub windows_flushed_at_end: u64,
}

/// The processing chain with its state.
pub struct Pipeline {
    limits: DecodeLimits,
    max_future_ns: i64,
    /// Spreads flows of `event_time: spread` sources over the windows they cover.
    spreader: crate::event_time::Spreader,
    enricher: Enricher,
    windows: WindowOperator,
    /// The tables, indexed by the window operator's [`TableId`].
    tables: Vec<&'static TableDef>,
    /// Interface counters' previous samples, to turn counters into traffic.
    counter_rates: CounterRates,
    metrics: Arc<PipelineMetrics>,
    sinks: Vec<Box<dyn WindowSink>>,
    /// Site verdicts and meetings, shared with the HTTP API and /metrics.
    pub readiness: Arc<SharedReadiness>,
    /// Set once the first window has been published (for `/readyz`).
    pub ready: Arc<AtomicBool>,
    summary: RunSummary,
    /// Partitions, checkpoints and dead letters when reading from Kafka.
    durable: Option<Durable>,
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
}

/// How long to wait before warning again about a source whose records are still rejected.
const REJECTION_WARN_REPEAT: Duration = Duration::from_secs(300);

/// A partition this instance owns.
#[derive(Debug)]
struct Owned {
    key: PartitionKey,
    /// The first offset not yet processed; anything below it is already counted.
    next_offset: i64,
}

/// Exactly-once bookkeeping: owned partitions, their checkpoints and results logs.
struct Durable {
    store: CheckpointStore,
    owned: std::collections::HashMap<PartitionId, Owned>,
    dead_letters: Option<DeadLetters>,
}

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
            return Err(BuildError::Other(format!(
                "readiness policy: period_secs ({}) must be at least window.size_secs ({})",
                res.policy.period_secs, config.window.size_secs
            )));
        }
        let windows = plan_windows(spec, res).await?;
        let tables: Vec<&'static TableDef> = res.sql.iter().map(|(table, _)| *table).collect();
        let sampling = Sampling {
            default_rate: config.sampling.default_rate,
            overrides: config.sampling.overrides.iter().map(|(ip, r)| (addr_from_ip(*ip), *r)).collect(),
        };
        Ok(Self {
            limits: DecodeLimits {
                max_message_bytes: config.decode.max_message_bytes,
                max_bytes_per_record: config.decode.max_bytes_per_record,
                min_time_ns: DecodeLimits::MIN_TIME_NS,
                max_time_ns: i64::MAX,
            },
            max_future_ns: (config.decode.max_future_secs as i64).saturating_mul(1_000_000_000),
            spreader: crate::event_time::Spreader::new(config.window_size(), config.decode.max_spread_windows),
            enricher: Enricher::new(res.inventory.clone(), sampling),
            readiness: SharedReadiness::new(
                ReadinessEngine::new(res.inventory.clone(), res.policy.clone(), spec.size_ns()),
                res.meetings.clone(),
            ),
            windows,
            first_published: vec![false; tables.len()],
            tables,
            counter_rates: CounterRates::default(),
            metrics,
            sinks,
            ready: Arc::new(AtomicBool::new(false)),
            summary: RunSummary::default(),
            durable: None,
            recent_flows: None,
            top_talkers: config.sql.top_talkers > 0,
            newest_event: None,
            rejections: crate::notices::RejectionWatch::new(
                Duration::from_secs(config.log.rejection_warn_after_secs),
                REJECTION_WARN_REPEAT.max(Duration::from_secs(config.log.rejection_warn_after_secs)),
            ),
            status: crate::notices::StatusLog::new(Duration::from_secs(config.log.status_interval_secs), Instant::now()),
        })
    }

    /// Keeps checkpoints and per-partition results logs in `store` (the Kafka source's mode).
    pub fn enable_checkpoints(&mut self, store: CheckpointStore, dead_letters: Option<DeadLetters>) {
        self.windows.set_per_partition_results(true);
        for (id, table) in self.tables.iter().enumerate() {
            self.windows.set_results_log(id, table.results_log);
        }
        self.durable = Some(Durable { store, owned: Default::default(), dead_letters });
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

    fn state_schemas(&self) -> Vec<datafusion::arrow::datatypes::SchemaRef> {
        (0..self.windows.table_count()).map(|t| self.windows.state_schema(t)).collect()
    }

    /// Takes over partitions: restores each from its checkpoint and cuts its results logs back
    /// to what that checkpoint covers.
    pub fn assign(&mut self, partitions: &[(PartitionId, PartitionKey)]) -> anyhow::Result<()> {
        let schemas = self.state_schemas();
        let now = Instant::now();
        let durable = self.durable.as_mut().ok_or_else(|| anyhow::anyhow!("checkpoints are not enabled"))?;
        for (id, key) in partitions {
            let ckpt = durable.store.load(key, &schemas)?;
            let restored = ckpt.is_some();
            let (next_offset, max_event, lens, states, counters, clocks) = match ckpt {
                Some(c) => (c.next_offset, c.max_event_ns, c.results_len, c.states, c.counters, c.clocks),
                None => (0, None, vec![0; schemas.len()], vec![Vec::new(); schemas.len()], Vec::new(), Vec::new()),
            };
            for (table, len) in lens.iter().enumerate() {
                durable.store.truncate_results(table, key, *len)?;
            }
            self.windows.restore_partition(*id, max_event, &clocks, states, now)?;
            self.counter_rates.restore_partition(*id, &counters);
            if restored {
                tracing::info!(partition = %key, next_offset, "partition restored from its checkpoint");
            } else {
                tracing::info!(partition = %key, "partition has no checkpoint yet: starting at its committed offset, else its beginning");
            }
            durable.owned.insert(*id, Owned { key: key.clone(), next_offset });
        }
        Ok(())
    }

    /// Releases partitions: checkpoints them, drops their state, returns the offsets to commit.
    pub fn revoke(&mut self, partitions: &[PartitionId]) -> anyhow::Result<Vec<(PartitionKey, i64)>> {
        let offsets = self.checkpoint_partitions(partitions)?;
        if let Some(durable) = self.durable.as_mut() {
            for id in partitions {
                durable.owned.remove(id);
                self.windows.release_partition(*id);
                self.counter_rates.release_partition(*id);
            }
        }
        Ok(offsets)
    }

    /// Checkpoints every owned partition; returns the offsets now safe to commit.
    pub fn checkpoint(&mut self) -> anyhow::Result<Vec<(PartitionKey, i64)>> {
        let ids: Vec<PartitionId> = self.durable.as_ref().map(|d| d.owned.keys().copied().collect()).unwrap_or_default();
        self.checkpoint_partitions(&ids)
    }

    fn checkpoint_partitions(&mut self, ids: &[PartitionId]) -> anyhow::Result<Vec<(PartitionKey, i64)>> {
        let Some(durable) = self.durable.as_ref() else { return Ok(Vec::new()) };
        let started = Instant::now();
        let result = (|| -> anyhow::Result<Vec<(PartitionKey, i64)>> {
            if let Some(dl) = &durable.dead_letters {
                dl.flush().map_err(anyhow::Error::msg)?;
            }
            let schemas = self.state_schemas();
            let mut offsets = Vec::with_capacity(ids.len());
            for id in ids {
                let Some(owned) = durable.owned.get(id) else { continue };
                let results_len = (0..schemas.len()).map(|t| durable.store.sync_results(t, &owned.key)).collect::<Result<Vec<_>, _>>()?;
                let ckpt = PartitionCheckpoint {
                    next_offset: owned.next_offset,
                    max_event_ns: self.windows.watermarks().partition_max_event(*id),
                    results_len,
                    states: self.windows.partition_states(*id),
                    counters: self.counter_rates.partition_baselines(*id),
                    clocks: self.windows.watermarks().partition_clocks(*id),
                };
                durable.store.save(&owned.key, &ckpt, &schemas)?;
                offsets.push((owned.key.clone(), owned.next_offset));
            }
            Ok(offsets)
        })();
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.metrics.checkpoints.with_label_values(&[outcome]).inc();
        if result.is_ok() {
            self.metrics.checkpoint_duration.observe(started.elapsed().as_secs_f64());
            self.metrics.checkpoint_last_success.set(unix_now_ns() as f64 / 1e9);
        }
        result
    }

    /// Drops messages a partition has already counted (delivered again after a restart).
    fn skip_processed(&mut self, batch: &mut SourceBatch) {
        let Some(owned) = self.durable.as_ref().and_then(|d| d.owned.get(&batch.partition)) else { return };
        let from = owned.next_offset;
        if batch.offsets.first().is_none_or(|&o| o >= from) {
            return;
        }
        let keep = batch.offsets.iter().filter(|&&o| o >= from).count();
        self.metrics.kafka_replayed_skipped.inc_by((batch.offsets.len() - keep) as u64);
        let mut messages = Messages::with_capacity(keep, batch.messages.total_bytes());
        let mut offsets = Vec::with_capacity(keep);
        for (m, &o) in batch.messages.iter().zip(&batch.offsets) {
            if o >= from {
                messages.push(m);
                offsets.push(o);
            }
        }
        batch.messages = messages;
        batch.offsets = offsets;
    }

    /// Formats every source of this pipeline can deliver.
    pub const FORMATS: [Format; 6] = Format::ALL;

    /// Each table with the schema of its closed windows (what SQL declares).
    pub fn output_schemas(&self) -> Vec<(&'static TableDef, datafusion::arrow::datatypes::SchemaRef)> {
        self.tables.iter().enumerate().map(|(id, table)| (*table, self.windows.output_schema(id))).collect()
    }

    pub fn windows(&self) -> &WindowOperator {
        &self.windows
    }

    /// Runs one source batch through decode, enrich and window, then publishes closed windows.
    pub async fn process(&mut self, mut batch: SourceBatch) -> anyhow::Result<()> {
        self.skip_processed(&mut batch);
        if batch.messages.is_empty() {
            return Ok(());
        }
        self.limits.max_time_ns = unix_now_ns().saturating_add(self.max_future_ns);
        let (decoded, stats) = decode_with(batch.format, batch.event_time, &batch.messages, &self.limits);
        self.metrics.record_decode(batch.format, batch.messages.total_bytes(), &stats);
        let source =
            self.durable.as_ref().and_then(|d| d.owned.get(&batch.partition)).map_or(batch.format.as_str(), |o| o.key.topic.as_str());
        self.rejections.observe(source, batch.format, &stats, batch.received);
        if let Some(durable) = self.durable.as_mut()
            && let Some(owned) = durable.owned.get_mut(&batch.partition)
        {
            if let Some(dl) = &durable.dead_letters {
                dl.send(&owned.key, batch.format, &batch.messages, &batch.offsets, &stats);
            }
            if let (Some(first), Some(last)) = (batch.offsets.first(), batch.offsets.last()) {
                if *first > owned.next_offset && owned.next_offset > 0 {
                    // Legitimate after compaction or transactions; otherwise records were skipped.
                    self.metrics.kafka_offset_gaps.inc();
                    tracing::warn!(partition = %owned.key, expected = owned.next_offset, got = first, "offset gap in a partition");
                }
                owned.next_offset = last + 1;
            }
        }
        self.summary.batches += 1;
        self.summary.records += stats.records;
        // Each input's enriched rows, with (for several inputs from the same messages) each row's
        // position among the messages' records.
        let inputs: Vec<(Input, RecordBatch, EnrichStats, Vec<u32>)> = match decoded {
            Decoded::Flows(b) => {
                let (b, spread) = self.spreader.apply(batch.event_time, b);
                if let Some(stats) = spread {
                    self.metrics.record_spread(&stats);
                }
                let (rows, stats) = self.enricher.enrich_flows(&b);
                vec![(Input::Flows, rows, stats, Vec::new())]
            }
            Decoded::Probes(b) => {
                let (rows, stats) = self.enricher.enrich_probes(&b);
                vec![(Input::Probes, rows, stats, Vec::new())]
            }
            Decoded::Telemetry { probes, counters, is_counter } => {
                let (traffic, counter_stats, sample_rows) = self.counter_rates.apply(batch.partition, &counters);
                self.metrics.record_counters(&counter_stats);
                let (probes, probe_stats, probe_rows) = self.enricher.enrich_probes_keeping(&probes);
                let (traffic, traffic_stats, traffic_rows) = self.enricher.enrich_interfaces(&traffic);
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
        self.feed(&batch, inputs).await?;
        if let Some(newest) = &self.newest_event
            && let Some(t) = self.windows.watermarks().partition_max_event(batch.partition)
        {
            newest.fetch_max(t, Ordering::Relaxed);
        }
        let closed = self.windows.close_ready(batch.received).await?;
        self.publish(closed, false)
    }

    /// Hands the enriched rows of one source batch to every table that reads them, all tables
    /// together (see [`WindowOperator::process_together`]).
    async fn feed(&mut self, batch: &SourceBatch, inputs: Vec<(Input, RecordBatch, EnrichStats, Vec<u32>)>) -> anyhow::Result<()> {
        let mut fed: Vec<(TableId, &RecordBatch)> = Vec::new();
        let mut fed_ordinals = Vec::new();
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
                }
            }
        }
        if fed.is_empty() {
            return Ok(());
        }
        let outcomes = self.windows.process_together(batch.partition, &fed, &fed_ordinals, batch.received).await?;
        for ((id, _), outcome) in fed.iter().zip(outcomes) {
            let table = self.tables[*id];
            if !table.second_view {
                self.metrics.records_late.with_label_values(&[table.name]).inc_by(outcome.late);
            }
            if table.readiness == ReadinessFeed::OnTimeRecords
                && let Some(on_time) = &outcome.on_time
            {
                self.readiness.engine.write().expect("readiness lock").observe_probes(on_time);
            }
        }
        Ok(())
    }

    /// Periodic work without new data: idle partitions release the watermark; gauges refresh.
    pub async fn tick(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        self.readiness.engine.write().expect("readiness lock").expire_if_stalled(now);
        self.windows.advance_idle(now);
        let closed = self.windows.close_ready(now).await?;
        self.publish(closed, false)?;
        self.notify(now);
        Ok(())
    }

    /// Logs what is due: warnings about rejected sources, the periodic status line.
    fn notify(&mut self, now: Instant) {
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
            let kafka = self.durable.is_some().then(|| self.metrics.kafka_lag_total());
            let kafka_text = kafka.map_or_else(String::new, |k| format!(", Kafka lag {k} messages"));
            tracing::info!(
                records_per_sec = s.records_per_sec.round(),
                sites_seen = s.sites_seen,
                windows_closed = s.windows_closed,
                rejected = s.rejected,
                watermark_lag_secs = lag.map(|l| l.round()),
                kafka_lag = kafka,
                "status: {:.0} records/s, {} sites seen, {} window(s) closed, {} rejected, {lag_text}{kafka_text}",
                s.records_per_sec,
                s.sites_seen,
                s.windows_closed,
                s.rejected
            );
        }
    }

    /// Closes every open window (at shutdown) and returns the run's totals.
    pub async fn finish(&mut self) -> anyhow::Result<RunSummary> {
        let closed = self.windows.flush(Instant::now()).await?;
        self.publish(closed, true)?;
        Ok(self.summary)
    }

    /// The run's totals so far.
    pub fn summary(&self) -> RunSummary {
        self.summary
    }

    /// Logs the run's totals and what was lost, once the pipeline has stopped.
    fn log_stopped(&self) {
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
        for sink in &mut self.sinks {
            sink.on_window(table, w);
        }
        if w.previous.is_some() {
            self.metrics.windows_corrected.with_label_values(&[table.name]).inc();
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
        if table.readiness == ReadinessFeed::Windows {
            self.readiness.engine.write().expect("readiness lock").observe_flow_window(&w.rows, w.end_ns);
        }
        self.metrics.windows_closed.with_label_values(&[table.name]).inc();
        if !flushing {
            self.metrics.record_close_latency(w.closed_by.elapsed());
        }
    }

    /// Every table's windows up to `end` are with the sinks: judge the sites over them.
    fn windows_complete(&mut self, start: i64, end: i64) {
        let mut engine = self.readiness.engine.write().expect("readiness lock");
        engine.evaluate(start, end);
        for sink in &mut self.sinks {
            sink.on_readiness(start, end, engine.latest());
        }
    }

    fn publish(&mut self, closed: Closed, flushing: bool) -> anyhow::Result<()> {
        self.metrics.window_late_contributions.inc_by(closed.late_contributions);
        if let Some(durable) = &self.durable {
            for c in &closed.contributions {
                let Some(owned) = durable.owned.get(&c.partition) else { continue };
                durable.store.append_results(c.table, &owned.key, &c.rows)?;
            }
        }
        let Closed { windows, completed, .. } = closed;
        if !completed.is_empty() {
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
        self.metrics.windows_correctable.set(self.windows.correctable_window_count() as i64);
        self.metrics.windows_open.set(self.windows.open_window_count() as i64);
        if let Some(wm) = self.windows.watermark_ns() {
            self.metrics.watermark_timestamp.set(wm as f64 / 1e9);
            self.metrics.watermark_lag.set(unix_now_ns().saturating_sub(wm) as f64 / 1e9);
        }
        Ok(())
    }
}

/// Runs `source` through `pipeline` until the source ends or `shutdown` turns true, then
/// flushes the open windows.
pub async fn run<S: Source>(mut source: S, mut pipeline: Pipeline, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<RunSummary> {
    pipeline.windows.register_partitions(&source.partitions(), Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    tracing::info!("shutdown requested: flushing open windows");
                    break;
                }
            }
            _ = tick.tick() => pipeline.tick().await?,
            batch = source.next_batch() => match batch {
                Some(batch) => pipeline.process(batch).await?,
                None => {
                    tracing::info!("source finished: flushing open windows");
                    break;
                }
            },
        }
    }
    let summary = pipeline.finish().await?;
    pipeline.log_stopped();
    Ok(summary)
}

/// Runs the Kafka source through `pipeline` with checkpoints until `shutdown` turns true. At
/// shutdown the open windows are checkpointed, not flushed: the next start goes on with them.
pub async fn run_kafka(
    source: KafkaSource,
    mut events: tokio::sync::mpsc::Receiver<KafkaEvent>,
    mut pipeline: Pipeline,
    checkpoint_interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<RunSummary> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_checkpoint = Instant::now();
    loop {
        tokio::select! {
            biased;
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    tracing::info!("shutdown requested: checkpointing open windows");
                    break;
                }
            }
            _ = tick.tick() => {
                pipeline.tick().await?;
                if last_checkpoint.elapsed() >= checkpoint_interval {
                    match pipeline.checkpoint() {
                        Ok(offsets) => source.commit(&offsets),
                        // Not fatal: the previous checkpoint still holds; the next attempt may succeed.
                        Err(e) => tracing::error!("checkpoint failed: {e:#}"),
                    }
                    last_checkpoint = Instant::now();
                }
            }
            event = events.recv() => match event {
                Some(KafkaEvent::Batches(batches)) => {
                    pipeline.metrics.kafka_queued_batches.set(events.len() as i64);
                    for batch in batches {
                        pipeline.process(batch).await?;
                    }
                }
                Some(KafkaEvent::Assigned(partitions)) => pipeline.assign(&partitions)?,
                Some(KafkaEvent::Revoked { partitions, reply }) => {
                    let ids: Vec<PartitionId> = partitions.iter().map(|(id, _)| *id).collect();
                    let offsets = pipeline.revoke(&ids)?;
                    let _ = reply.send(offsets);
                }
                None => {
                    tracing::warn!("the Kafka consumer stopped");
                    break;
                }
            },
        }
    }
    let offsets = pipeline.checkpoint()?;
    // The consumer may be waiting in a rebalance for the pipeline: answer it, then stop.
    events.close();
    while let Ok(event) = events.try_recv() {
        if let KafkaEvent::Revoked { reply, .. } = event {
            let _ = reply.send(Vec::new());
        }
    }
    tokio::task::spawn_blocking(move || source.stop(&offsets)).await?;
    pipeline.log_stopped();
    Ok(pipeline.summary())
}
