//! The site stage of a scale-out (docs/scale-out.md): a consumer group over the internal topic.
//!
//! Each internal partition brings the sites routed to it, and from every source partition one
//! partial per span (states, on-time probe records and the source's clocks). The driver owns
//! what makes every span count once:
//!
//! 1. each (internal partition, source partition) pair is one partition of the window operator,
//!    registered for every source partition of the input topics on **assign**, so a window
//!    closes once every source's clock has passed it, as on one instance reading them all;
//! 2. each message is decoded and admitted by the internal partition's [`Ledger`]: a span
//!    merged before (a replay by either stage) is dropped, a new one merged;
//! 3. the checkpoint of an internal partition holds its next offset, its ledger, its results
//!    logs' lengths and each source's open states and clocks, written before the offset is
//!    committed. A crash replays the internal topic from the checkpoint; the ledger drops what
//!    the restored states already hold.
//!
//! Readiness judges, and `/metrics` exports, only the sites of the owned internal partitions.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::SchemaRef;
use prometheus::IntCounterVec;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::mpsc;

use super::kafka::{count_checkpoint, count_offset_gap, furthest_behind, stop_consumer};
use super::{Driver, End};
use crate::checkpoint::{CheckpointStore, PartitionCheckpoint, PartitionKey, SiteStageState};
use crate::config::KafkaConfig;
use crate::metrics::PipelineMetrics;
use crate::pipeline::{PartitionState, Pipeline, PipelineError};
use crate::shuffle::{Admission, Ledger, Partial, partition_of};
use crate::source::kafka::{KafkaEvent, KafkaSource};
use crate::types::{PartitionId, SourceBatch};

/// An internal partition this instance owns.
struct Owned {
    key: PartitionKey,
    /// The first offset not yet merged.
    next_offset: i64,
    ledger: Ledger,
    /// The window operator's partition for each source partition seen here.
    sources: BTreeMap<PartitionKey, PartitionId>,
}

/// Drives the site stage's pipeline from the internal topic, with checkpoints.
pub struct SiteDriver {
    source: KafkaSource,
    events: mpsc::Receiver<KafkaEvent>,
    store: CheckpointStore,
    schemas: Vec<SchemaRef>,
    /// The internal topic's partition count (it splits the sites).
    partitions: u32,
    /// The input topics' partitions: each has a clock on every owned internal partition.
    inputs: Vec<PartitionKey>,
    owned: HashMap<PartitionId, Owned>,
    /// Window-operator partition → the internal partition it belongs to.
    composite_of: HashMap<PartitionId, PartitionId>,
    next_composite: PartitionId,
    checkpoint_interval: Duration,
    last_checkpoint: Instant,
    metrics: Arc<PipelineMetrics>,
    partials: IntCounterVec,
    owned_gauge: prometheus::IntGauge,
    joined: bool,
    ready: Option<(Arc<AtomicBool>, u64)>,
}

impl SiteDriver {
    /// Takes over a consumer of the internal topic; `kafka` is the input side's configuration
    /// (its topics' partitions are read from the brokers).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        source: KafkaSource,
        events: mpsc::Receiver<KafkaEvent>,
        store: CheckpointStore,
        schemas: Vec<SchemaRef>,
        kafka: &KafkaConfig,
        topic: &str,
        checkpoint_interval: Duration,
        metrics: Arc<PipelineMetrics>,
    ) -> Result<Self, String> {
        let (partitions, inputs) = read_partitions(kafka, topic)?;
        let (partials, owned_gauge) = metrics.register_site_stage();
        tracing::info!(
            topic,
            partitions,
            input_partitions = inputs.len(),
            "site stage: merging partial aggregates from the internal topic"
        );
        Ok(Self {
            source,
            events,
            store,
            schemas,
            partitions,
            inputs,
            owned: HashMap::new(),
            composite_of: HashMap::new(),
            next_composite: 0,
            checkpoint_interval,
            last_checkpoint: Instant::now(),
            metrics,
            partials,
            owned_gauge,
            joined: false,
            ready: None,
        })
    }

    /// Raises `ready` once the group has assigned this instance its internal partitions and
    /// each is at most `ready_lag` messages behind (see [`super::kafka::KafkaDriver::readiness`]).
    pub fn readiness(mut self, ready: Arc<AtomicBool>, ready_lag: u64) -> Self {
        self.ready = Some((ready, ready_lag));
        self
    }

    fn check_ready(&self) {
        let Some((ready, ready_lag)) = &self.ready else { return };
        if !self.joined || ready.load(Ordering::Acquire) {
            return;
        }
        let Some(behind) = furthest_behind(&self.source, self.owned.values().map(|o| (&o.key, o.next_offset))) else { return };
        if behind <= *ready_lag {
            ready.store(true, Ordering::Release);
            tracing::info!(partitions = self.owned.len(), behind, "ready: joined the site stage's group, caught up within kafka.ready_lag");
        }
    }

    /// The window operator's partition for `source` on internal partition `q` (registered
    /// from nothing the first time).
    fn composite(
        &mut self,
        pipeline: &mut Pipeline,
        q: PartitionId,
        source: &PartitionKey,
        state: Option<PartitionState>,
    ) -> Result<PartitionId, PipelineError> {
        let owned = self.owned.get_mut(&q).expect("an owned partition");
        if let Some(id) = owned.sources.get(source) {
            if state.is_some() {
                pipeline.restore_partition(*id, state)?;
            }
            return Ok(*id);
        }
        let id = self.next_composite;
        self.next_composite += 1;
        owned.sources.insert(source.clone(), id);
        self.composite_of.insert(id, q);
        pipeline.restore_partition(id, state)?;
        Ok(id)
    }

    /// Judges and exports only the sites of the owned internal partitions.
    fn set_ownership(&self, pipeline: &Pipeline) {
        let owned: Vec<i32> = self.owned.values().map(|o| o.key.partition).collect();
        self.owned_gauge.set(owned.len() as i64);
        let shared = pipeline.readiness();
        let mut engine = shared.engine.write().expect("readiness lock");
        let mask = engine.inventory().sites().iter().map(|s| owned.contains(&(partition_of(&s.id, self.partitions) as i32))).collect();
        engine.set_owned(Some(mask));
    }

    /// Takes over internal partitions: restores each from its checkpoint (ledger, sources'
    /// states and clocks) and cuts its results logs back to what it covers.
    fn assign(&mut self, pipeline: &mut Pipeline, partitions: &[(PartitionId, PartitionKey)]) -> Result<(), PipelineError> {
        self.joined = true;
        for (q, key) in partitions {
            let ckpt = self.store.load(key, &self.schemas)?;
            let lens = ckpt.as_ref().map_or_else(|| vec![0; self.schemas.len()], |c| c.results_len.clone());
            for (table, len) in lens.iter().enumerate() {
                self.store.truncate_results(table, key, *len)?;
            }
            let (next_offset, site_stage) = match ckpt {
                Some(c) => (c.next_offset, c.site_stage.unwrap_or_default()),
                None => (0, SiteStageState::default()),
            };
            let ledger = match site_stage.ledger {
                serde_json::Value::Null => Ledger::default(),
                saved => serde_json::from_value(saved).map_err(|e| store_error(&self.store, format!("{key}: the ledger: {e}")))?,
            };
            self.owned.insert(*q, Owned { key: key.clone(), next_offset, ledger, sources: BTreeMap::new() });
            for bytes in &site_stage.sources {
                let saved = Partial::decode(bytes, &self.schemas).map_err(|e| store_error(&self.store, format!("{key}: {e}")))?;
                let state = PartitionState {
                    max_event_ns: saved.clocks.iter().map(|(_, t)| *t).max(),
                    states: saved.states,
                    counters: Vec::new(),
                    clocks: saved.clocks,
                };
                self.composite(pipeline, *q, &saved.source, Some(state))?;
            }
            for input in self.inputs.clone() {
                self.composite(pipeline, *q, &input, None)?;
            }
            tracing::info!(partition = %key, next_offset, sources = site_stage.sources.len(), "internal partition taken over");
        }
        self.set_ownership(pipeline);
        Ok(())
    }

    /// Releases internal partitions: checkpoints them, drops their state.
    fn revoke(&mut self, pipeline: &mut Pipeline, partitions: &[PartitionId]) -> Result<Vec<(PartitionKey, i64)>, PipelineError> {
        let offsets = self.checkpoint_partitions(pipeline, partitions)?;
        for q in partitions {
            if let Some(owned) = self.owned.remove(q) {
                for id in owned.sources.values() {
                    pipeline.release_partition(*id);
                    self.composite_of.remove(id);
                }
            }
        }
        self.set_ownership(pipeline);
        Ok(offsets)
    }

    fn checkpoint(&mut self, pipeline: &mut Pipeline) -> Result<Vec<(PartitionKey, i64)>, PipelineError> {
        let ids: Vec<PartitionId> = self.owned.keys().copied().collect();
        self.checkpoint_partitions(pipeline, &ids)
    }

    fn checkpoint_partitions(&mut self, pipeline: &mut Pipeline, ids: &[PartitionId]) -> Result<Vec<(PartitionKey, i64)>, PipelineError> {
        let started = Instant::now();
        let result = self.write_checkpoints(pipeline, ids);
        count_checkpoint(&self.metrics, started, result.is_ok());
        result
    }

    fn write_checkpoints(&mut self, pipeline: &mut Pipeline, ids: &[PartitionId]) -> Result<Vec<(PartitionKey, i64)>, PipelineError> {
        self.write_results(pipeline)?;
        let mut offsets = Vec::with_capacity(ids.len());
        for q in ids {
            let Some(owned) = self.owned.get(q) else { continue };
            let results_len = (0..self.schemas.len()).map(|t| self.store.sync_results(t, &owned.key)).collect::<Result<Vec<_>, _>>()?;
            let mut sources = Vec::with_capacity(owned.sources.len());
            for (source, id) in &owned.sources {
                let state = pipeline.partition_state(*id);
                let saved = Partial {
                    source: source.clone(),
                    from_offset: 0,
                    to_offset: 0,
                    clocks: state.clocks,
                    states: state.states,
                    records: Vec::new(),
                    part: 0,
                    parts: 1,
                };
                let bytes = saved.encode(&self.schemas).map_err(|e| store_error(&self.store, format!("{}: {e}", owned.key)))?;
                sources.push(bytes);
            }
            let ckpt = PartitionCheckpoint {
                next_offset: owned.next_offset,
                max_event_ns: None,
                results_len,
                states: vec![Vec::new(); self.schemas.len()],
                counters: Vec::new(),
                clocks: Vec::new(),
                outbox: Vec::new(),
                site_stage: Some(SiteStageState { ledger: serde_json::to_value(&owned.ledger).expect("a ledger serialises"), sources }),
            };
            self.store.save(&owned.key, &ckpt, &self.schemas)?;
            offsets.push((owned.key.clone(), owned.next_offset));
        }
        Ok(offsets)
    }

    /// Appends the per-partition results of the windows published since the last call to the
    /// internal partitions' results logs.
    fn write_results(&mut self, pipeline: &mut Pipeline) -> Result<(), PipelineError> {
        for c in pipeline.take_results() {
            let Some(owned) = self.composite_of.get(&c.partition).and_then(|q| self.owned.get(q)) else { continue };
            self.store.append_results(c.table, &owned.key, &c.rows)?;
        }
        Ok(())
    }

    /// Merges the partials of one batch of an internal partition, each span once.
    async fn process(&mut self, pipeline: &mut Pipeline, batch: SourceBatch) -> Result<(), PipelineError> {
        let q = batch.partition;
        for (message, offset) in batch.messages.iter().zip(&batch.offsets) {
            let Some(owned) = self.owned.get_mut(&q) else { return Ok(()) };
            if *offset < owned.next_offset {
                self.metrics.kafka.replayed_skipped.inc();
                continue;
            }
            // After a gap the ledger drops the rest of a span cut in parts (`overlap`).
            count_offset_gap(&self.metrics, &owned.key, owned.next_offset, *offset);
            owned.next_offset = offset + 1;
            let partial = match Partial::decode(message, &self.schemas) {
                Ok(p) => p,
                Err(e) => {
                    self.partials.with_label_values(&["malformed"]).inc();
                    tracing::warn!(partition = %owned.key, offset, "skipping a message of the internal topic: {e}");
                    continue;
                }
            };
            match owned.ledger.admit(&partial) {
                admission @ (Admission::Merge | Admission::MergeAfterLoss) => {
                    if admission == Admission::MergeAfterLoss {
                        tracing::warn!(
                            partition = %owned.key,
                            offset,
                            source = %partial.source,
                            from = partial.from_offset,
                            "the previous span of this source misses parts (an offset gap; counted as overlaps): given up, merging the next"
                        );
                    }
                    let id = self.composite(pipeline, q, &partial.source, None)?;
                    pipeline.merge_partial(id, &partial.clocks, partial.states, &partial.records, Instant::now()).await?;
                    self.partials.with_label_values(&["merged"]).inc();
                }
                Admission::Duplicate => self.partials.with_label_values(&["duplicate"]).inc(),
                Admission::Overlap => {
                    self.partials.with_label_values(&["overlap"]).inc();
                    tracing::warn!(
                        partition = %owned.key,
                        offset,
                        source = %partial.source,
                        from = partial.from_offset,
                        to = partial.to_offset,
                        "a partial overlaps a span already merged without repeating it: dropped"
                    );
                }
            }
        }
        self.write_results(pipeline)
    }
}

/// A saved source state that cannot be read or written, naming the checkpoint directory.
fn store_error(store: &CheckpointStore, message: String) -> crate::checkpoint::CheckpointError {
    crate::checkpoint::CheckpointError { path: store.dir().to_path_buf(), message }
}

/// The internal topic's partition count and the input topics' partitions, from the brokers.
fn read_partitions(kafka: &KafkaConfig, topic: &str) -> Result<(u32, Vec<PartitionKey>), String> {
    let mut client = rdkafka::config::ClientConfig::new();
    client.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in &kafka.properties {
        client.set(k, v);
    }
    let consumer: BaseConsumer = client.create().map_err(|e| format!("scale_out.topic {topic:?}: cannot create a client: {e}"))?;
    let count = |name: &str| -> Result<usize, String> {
        let metadata = consumer
            .fetch_metadata(Some(name), Duration::from_secs(30))
            .map_err(|e| format!("topic {name:?}: cannot read its metadata: {e}"))?;
        Ok(metadata.topics().first().map_or(0, |t| t.partitions().len()))
    };
    let partitions = count(topic)?;
    if partitions == 0 {
        return Err(format!(
            "scale_out.topic {topic:?}: does not exist; create it with as many partitions as site-stage instances you may run"
        ));
    }
    let mut inputs = Vec::new();
    for t in &kafka.topics {
        inputs.extend((0..count(&t.name)?).map(|p| PartitionKey { topic: t.name.clone(), partition: p as i32 }));
    }
    Ok((partitions as u32, inputs))
}

impl Driver for SiteDriver {
    type Event = KafkaEvent;

    fn start(&mut self, pipeline: &mut Pipeline) {
        if self.ready.is_some() {
            pipeline.leave_readiness_to_the_driver();
        }
        pipeline.wait_for_unheard_partitions();
        // Nothing is judged here before the group assigns this instance its sites.
        self.set_ownership(pipeline);
    }

    fn next(&mut self) -> impl Future<Output = Option<KafkaEvent>> + Send {
        self.events.recv()
    }

    async fn handle(&mut self, event: KafkaEvent, pipeline: &mut Pipeline) -> Result<(), PipelineError> {
        match event {
            KafkaEvent::Batches(batches) => {
                self.metrics.kafka.queued_batches.set(self.events.len() as i64);
                for batch in batches {
                    self.process(pipeline, batch).await?;
                }
                Ok(())
            }
            KafkaEvent::Assigned(partitions) => self.assign(pipeline, &partitions),
            KafkaEvent::Revoked { partitions, reply } => {
                let ids: Vec<PartitionId> = partitions.iter().map(|(id, _)| *id).collect();
                let offsets = self.revoke(pipeline, &ids)?;
                let _ = reply.send(offsets);
                Ok(())
            }
        }
    }

    fn tick(&mut self, pipeline: &mut Pipeline) -> Result<(), PipelineError> {
        self.write_results(pipeline)?;
        self.check_ready();
        if self.last_checkpoint.elapsed() >= self.checkpoint_interval {
            match self.checkpoint(pipeline) {
                Ok(offsets) => self.source.commit(&offsets),
                Err(e) => tracing::error!("checkpoint failed: {e}"),
            }
            self.last_checkpoint = Instant::now();
        }
        Ok(())
    }

    fn status_note(&self, _pipeline: &Pipeline) -> Option<String> {
        let merged = self.partials.with_label_values(&["merged"]).get();
        Some(format!(
            "site stage: {} internal partition(s), {merged} partials merged, Kafka lag {}",
            self.owned.len(),
            self.metrics.kafka_lag_total()
        ))
    }

    async fn stop(mut self, pipeline: &mut Pipeline, end: End) -> Result<(), PipelineError> {
        match end {
            End::Shutdown => tracing::info!("shutdown requested: checkpointing open windows"),
            End::SourceEnded => tracing::warn!("the Kafka consumer stopped"),
        }
        let offsets = self.checkpoint(pipeline)?;
        stop_consumer(self.source, self.events, offsets).await
    }
}
