//! The Kafka driver: where exactly-once is decided.
//!
//! The consumer thread ([`KafkaSource`]) owns the librdkafka consumer and sends events in
//! order: partitions assigned, batches, partitions revoked (with a reply channel). This driver
//! owns what makes every record count once:
//!
//! 1. on **assign**, each partition is restored from its checkpoint (offset, watermark,
//!    exporter clocks, open windows, counter baselines) and its results logs are cut back to
//!    the length the checkpoint recorded;
//! 2. on each **batch**, messages below the partition's next offset (already counted before a
//!    restart) are dropped, the rest are processed, rejected ones go to the dead-letter topic,
//!    and the next offset advances; each published window's per-partition results are appended
//!    to the partition's results logs;
//! 3. every `checkpoint.interval_secs`, on **revoke** and at shutdown, each owned partition's
//!    checkpoint is written *then* the covered offsets are handed to the consumer to commit.
//!
//! A crash between two checkpoints replays the records since the last one; the checkpoint's
//! state and the truncated results logs make them count once.
//!
//! With `decode.ahead`, the batches the consumer has already delivered are prepared (decoded,
//! enriched, partially aggregated) on blocking threads, up to [`AHEAD`] events ahead, while
//! this one aggregates; events keep their order.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::ingest::IngestOutput;
use super::{Driver, End};
use crate::checkpoint::{CheckpointStore, PartitionCheckpoint, PartitionKey};
use crate::dead_letter::DeadLetters;
use crate::metrics::PipelineMetrics;
use crate::pipeline::{PartitionState, Pipeline, PipelineError, Prepared, Preparer};
use crate::source::kafka::{KafkaEvent, KafkaSource};
use crate::types::{Messages, PartitionId, SourceBatch, unix_now_ns};

/// A partition this instance owns.
#[derive(Debug)]
struct Owned {
    key: PartitionKey,
    /// The first offset not yet processed; anything below it is already counted.
    next_offset: i64,
}

/// How many messages the owned partition furthest from its end is behind (`None` while the
/// statistics have not reported one of them yet: not known to be caught up). `positions` are
/// the owned partitions with their next offsets.
pub(super) fn furthest_behind<'a>(source: &KafkaSource, positions: impl Iterator<Item = (&'a PartitionKey, i64)>) -> Option<u64> {
    let mut behind = 0u64;
    for (key, next_offset) in positions {
        let at = source.partition_end(key)?;
        // Where this instance goes on from: its next offset, or the group's committed offset
        // before its first batch of a partition without a checkpoint.
        let position = next_offset.max(at.committed);
        behind = behind.max(at.end.saturating_sub(position).max(0) as u64);
    }
    Some(behind)
}

/// How many consumer events the driver takes ahead of the one it handles (`decode.ahead`).
const AHEAD: usize = 3;

/// A consumer event taken ahead: as it came, or its batches being prepared.
enum Queued {
    Event(KafkaEvent),
    Preparing(tokio::task::JoinHandle<Vec<(SourceBatch, Prepared)>>),
}

/// What the driver handles: a consumer event, or batches prepared ahead.
pub enum Delivered {
    Consumer(KafkaEvent),
    Prepared(Vec<(SourceBatch, Prepared)>),
}

/// Drives the pipeline from a Kafka consumer, with checkpoints.
pub struct KafkaDriver {
    source: KafkaSource,
    events: mpsc::Receiver<KafkaEvent>,
    /// With `decode.ahead`: what prepares the batches taken ahead.
    preparer: Option<Arc<Preparer>>,
    /// Events taken from `events` ahead of the one being handled, in order.
    ahead: VecDeque<Queued>,
    store: CheckpointStore,
    dead_letters: Option<DeadLetters>,
    owned: HashMap<PartitionId, Owned>,
    checkpoint_interval: Duration,
    last_checkpoint: Instant,
    metrics: Arc<PipelineMetrics>,
    /// Whether the group has assigned this instance its partitions (an empty set included).
    joined: bool,
    /// `/readyz`'s flag, and the lag within which an instance counts as caught up.
    ready: Option<(Arc<AtomicBool>, u64)>,
    /// The ingest stage of a scale-out: where the partial aggregates go at each checkpoint.
    ingest: Option<IngestOutput>,
}

impl KafkaDriver {
    /// Takes over a started consumer and its events; checkpoints go to `store` every
    /// `checkpoint_interval`.
    pub fn new(
        source: KafkaSource,
        events: mpsc::Receiver<KafkaEvent>,
        store: CheckpointStore,
        dead_letters: Option<DeadLetters>,
        checkpoint_interval: Duration,
        metrics: Arc<PipelineMetrics>,
    ) -> Self {
        Self {
            source,
            events,
            preparer: None,
            ahead: VecDeque::new(),
            store,
            dead_letters,
            owned: HashMap::new(),
            checkpoint_interval,
            last_checkpoint: Instant::now(),
            metrics,
            joined: false,
            ready: None,
            ingest: None,
        }
    }

    /// Runs the ingest stage of a scale-out: no window closes here; at each checkpoint every
    /// owned partition's partial states go to the internal topic through the outbox.
    pub fn hand_on(mut self, output: IngestOutput) -> Self {
        self.ingest = Some(output);
        self
    }

    /// Raises `ready` (for `/readyz`) once the group has assigned this instance its partitions
    /// and each is at most `ready_lag` messages behind its end. A replica that owns no
    /// partition is ready as soon as it has joined; one catching up on a backlog is not.
    pub fn readiness(mut self, ready: Arc<AtomicBool>, ready_lag: u64) -> Self {
        self.ready = Some((ready, ready_lag));
        self
    }

    /// See [`KafkaDriver::readiness`]. Once ready, an instance stays ready: falling behind
    /// later shows in `siteflow_kafka_consumer_lag`, not by leaving the load balancer.
    fn check_ready(&self) {
        let Some((ready, ready_lag)) = &self.ready else { return };
        if !self.joined || ready.load(Ordering::Acquire) {
            return;
        }
        let Some(behind) = furthest_behind(&self.source, self.owned.values().map(|o| (&o.key, o.next_offset))) else { return };
        if behind <= *ready_lag {
            ready.store(true, Ordering::Release);
            tracing::info!(
                partitions = self.owned.len(),
                behind,
                ready_lag,
                "ready: joined the consumer group with {} partition(s), each at most {ready_lag} message(s) behind its end (kafka.ready_lag)",
                self.owned.len()
            );
        }
    }

    /// Takes over partitions: restores each from its checkpoint and cuts its results logs back
    /// to what that checkpoint covers.
    fn assign(&mut self, pipeline: &mut Pipeline, partitions: &[(PartitionId, PartitionKey)]) -> Result<(), PipelineError> {
        self.joined = true;
        let schemas = pipeline.state_schemas();
        for (id, key) in partitions {
            let ckpt = self.store.load(key, &schemas)?;
            let lens = ckpt.as_ref().map_or_else(|| vec![0; schemas.len()], |c| c.results_len.clone());
            for (table, len) in lens.iter().enumerate() {
                self.store.truncate_results(table, key, *len)?;
            }
            let next_offset = match ckpt {
                Some(c) => {
                    let next_offset = c.next_offset;
                    if let Some(out) = &mut self.ingest {
                        out.restored(*id, Some(next_offset), c.outbox);
                    }
                    let state = PartitionState { max_event_ns: c.max_event_ns, states: c.states, counters: c.counters, clocks: c.clocks };
                    pipeline.restore_partition(*id, Some(state))?;
                    tracing::info!(partition = %key, next_offset, "partition restored from its checkpoint");
                    next_offset
                }
                None => {
                    if let Some(out) = &mut self.ingest {
                        out.restored(*id, None, Vec::new());
                    }
                    pipeline.restore_partition(*id, None)?;
                    tracing::info!(partition = %key, "partition has no checkpoint yet: starting at its committed offset, else its beginning");
                    0
                }
            };
            self.owned.insert(*id, Owned { key: key.clone(), next_offset });
        }
        Ok(())
    }

    /// Releases partitions: checkpoints them, drops their state, returns the offsets to commit.
    fn revoke(&mut self, pipeline: &mut Pipeline, partitions: &[PartitionId]) -> Result<Vec<(PartitionKey, i64)>, PipelineError> {
        let offsets = self.checkpoint_partitions(pipeline, partitions)?;
        for id in partitions {
            self.owned.remove(id);
            pipeline.release_partition(*id);
            if let Some(out) = &mut self.ingest {
                out.released(*id);
            }
        }
        Ok(offsets)
    }

    /// Checkpoints every owned partition; returns the offsets now safe to commit.
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
        // The results logs first: the checkpoint records their lengths.
        self.write_results(pipeline)?;
        if let Some(dl) = &self.dead_letters {
            dl.flush()?;
        }
        let schemas = pipeline.state_schemas();
        let mut offsets = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(owned) = self.owned.get(id) else { continue };
            let results_len = (0..schemas.len()).map(|t| self.store.sync_results(t, &owned.key)).collect::<Result<Vec<_>, _>>()?;
            // The ingest stage hands the span's states on through the outbox written with the
            // checkpoint; they leave the pipeline only once they are in it.
            let outbox = match &mut self.ingest {
                Some(out) => {
                    let state = pipeline.partition_state(*id);
                    let records = pipeline.take_partition_records(*id);
                    let outbox = out.cut(*id, &owned.key, owned.next_offset, &state.clocks, &state.states, &records)?;
                    pipeline.take_partition_states(*id);
                    outbox
                }
                None => Vec::new(),
            };
            let state = pipeline.partition_state(*id);
            let ckpt = PartitionCheckpoint {
                next_offset: owned.next_offset,
                max_event_ns: state.max_event_ns,
                results_len,
                states: state.states,
                counters: state.counters,
                clocks: state.clocks,
                outbox,
                site_stage: None,
            };
            self.store.save(&owned.key, &ckpt, &schemas)?;
            offsets.push((owned.key.clone(), owned.next_offset));
        }
        // The partials are in the checkpoints' outboxes: whoever restores a checkpoint sends
        // them again, so a failed delivery is retried at the next checkpoint, never lost.
        if let Some(out) = &mut self.ingest
            && let Err(e) = out.deliver()
        {
            tracing::warn!("{e}");
        }
        Ok(offsets)
    }

    /// Appends the per-partition results of the windows published since the last call to the
    /// partitions' results logs.
    fn write_results(&mut self, pipeline: &mut Pipeline) -> Result<(), PipelineError> {
        for c in pipeline.take_results() {
            let Some(owned) = self.owned.get(&c.partition) else { continue };
            self.store.append_results(c.table, &owned.key, &c.rows)?;
        }
        Ok(())
    }

    /// Drops messages a partition has already counted (delivered again after a restart);
    /// returns whether there were any.
    fn skip_processed(&self, batch: &mut SourceBatch) -> bool {
        let Some(owned) = self.owned.get(&batch.partition) else { return false };
        let from = owned.next_offset;
        if batch.offsets.first().is_none_or(|&o| o >= from) {
            return false;
        }
        let keep = batch.offsets.iter().filter(|&&o| o >= from).count();
        self.metrics.kafka.replayed_skipped.inc_by((batch.offsets.len() - keep) as u64);
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
        true
    }

    /// Processes one batch of an owned partition, prepared ahead or not, and moves its next
    /// offset on.
    async fn process(&mut self, pipeline: &mut Pipeline, mut batch: SourceBatch, prepared: Option<Prepared>) -> Result<(), PipelineError> {
        let skipped = self.skip_processed(&mut batch);
        if batch.messages.is_empty() {
            return Ok(());
        }
        if let (Some(out), Some(first)) = (&mut self.ingest, batch.offsets.first()) {
            out.starts_at(batch.partition, *first);
        }
        let topic = self.owned.get(&batch.partition).map_or(batch.format.as_str(), |o| o.key.topic.as_str());
        let stats = match prepared {
            Some(prepared) if !skipped => pipeline.process_prepared(&batch, prepared, topic).await?,
            // Prepared before part of it turned out counted already: prepared again without it.
            _ => pipeline.process(&batch, topic).await?,
        };
        if let Some(owned) = self.owned.get_mut(&batch.partition) {
            if let Some(dl) = &self.dead_letters {
                dl.send(&owned.key, batch.format, &batch.messages, &batch.offsets, &stats);
            }
            if let (Some(first), Some(last)) = (batch.offsets.first(), batch.offsets.last()) {
                count_offset_gap(&self.metrics, &owned.key, owned.next_offset, *first);
                owned.next_offset = last + 1;
            }
        }
        self.write_results(pipeline)
    }

    /// Takes the events the consumer has already delivered, up to [`AHEAD`], and starts
    /// preparing their batches.
    fn take_ahead(&mut self) {
        while self.ahead.len() < AHEAD {
            match self.events.try_recv() {
                Ok(event) => self.queue(event),
                Err(_) => break,
            }
        }
    }

    fn queue(&mut self, event: KafkaEvent) {
        let queued = match (event, &self.preparer) {
            (KafkaEvent::Batches(batches), Some(preparer)) => {
                let preparer = preparer.clone();
                Queued::Preparing(tokio::task::spawn_blocking(move || {
                    batches
                        .into_iter()
                        .map(|batch| {
                            let prepared = preparer.prepare(&batch);
                            (batch, prepared)
                        })
                        .collect()
                }))
            }
            (event, _) => Queued::Event(event),
        };
        self.ahead.push_back(queued);
    }

    /// The next event, in the consumer's order. Cancel-safe: an event being prepared stays
    /// queued.
    async fn next_delivered(&mut self) -> Option<Delivered> {
        self.take_ahead();
        if self.ahead.is_empty() {
            let event = self.events.recv().await?;
            self.queue(event);
        }
        let delivered = if let Some(Queued::Preparing(task)) = self.ahead.front_mut() {
            let prepared = task.await;
            self.ahead.pop_front();
            match prepared {
                Ok(prepared) => Delivered::Prepared(prepared),
                // A panic while decoding is a panic of the pipeline, as it would be in line.
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        } else {
            let Some(Queued::Event(event)) = self.ahead.pop_front() else { unreachable!("the queue holds an event") };
            Delivered::Consumer(event)
        };
        // The next batches are prepared while this one is handled.
        self.take_ahead();
        Some(delivered)
    }
}

impl Driver for KafkaDriver {
    type Event = Delivered;

    fn start(&mut self, pipeline: &mut Pipeline) {
        pipeline.wait_for_unheard_partitions();
        if self.ready.is_some() {
            pipeline.leave_readiness_to_the_driver();
        }
        if self.ingest.is_some() {
            pipeline.hand_windows_on();
        }
        if pipeline.decodes_ahead() {
            self.preparer = Some(pipeline.preparer());
        }
    }

    async fn next(&mut self) -> Option<Delivered> {
        self.next_delivered().await
    }

    async fn handle(&mut self, event: Delivered, pipeline: &mut Pipeline) -> Result<(), PipelineError> {
        let batches: Vec<(SourceBatch, Option<Prepared>)> = match event {
            Delivered::Prepared(batches) => batches.into_iter().map(|(batch, prepared)| (batch, Some(prepared))).collect(),
            Delivered::Consumer(KafkaEvent::Batches(batches)) => batches.into_iter().map(|batch| (batch, None)).collect(),
            Delivered::Consumer(KafkaEvent::Assigned(partitions)) => return self.assign(pipeline, &partitions),
            Delivered::Consumer(KafkaEvent::Revoked { partitions, reply }) => {
                let ids: Vec<PartitionId> = partitions.iter().map(|(id, _)| *id).collect();
                let offsets = self.revoke(pipeline, &ids)?;
                let _ = reply.send(offsets);
                return Ok(());
            }
        };
        self.metrics.kafka.queued_batches.set((self.events.len() + self.ahead.len()) as i64);
        for (batch, prepared) in batches {
            self.process(pipeline, batch, prepared).await?;
        }
        Ok(())
    }

    fn tick(&mut self, pipeline: &mut Pipeline) -> Result<(), PipelineError> {
        self.write_results(pipeline)?;
        self.check_ready();
        if self.last_checkpoint.elapsed() >= self.checkpoint_interval {
            match self.checkpoint(pipeline) {
                Ok(offsets) => self.source.commit(&offsets),
                // Not fatal: the previous checkpoint still holds; the next attempt may succeed.
                Err(e) => tracing::error!("checkpoint failed: {e}"),
            }
            self.last_checkpoint = Instant::now();
        }
        Ok(())
    }

    fn status_note(&self, _pipeline: &Pipeline) -> Option<String> {
        Some(format!("Kafka lag {} messages", self.metrics.kafka_lag_total()))
    }

    async fn stop(mut self, pipeline: &mut Pipeline, end: End) -> Result<(), PipelineError> {
        match end {
            End::Shutdown => tracing::info!("shutdown requested: checkpointing open windows"),
            End::SourceEnded => tracing::warn!("the Kafka consumer stopped"),
        }
        let offsets = self.checkpoint(pipeline)?;
        // Batches taken ahead are not covered by the checkpoint (read again after a restart);
        // revocations taken ahead get their answer as those still in the channel do.
        for queued in std::mem::take(&mut self.ahead) {
            if let Queued::Event(KafkaEvent::Revoked { reply, .. }) = queued {
                let _ = reply.send(Vec::new());
            }
        }
        stop_consumer(self.source, self.events, offsets).await
    }
}

/// Counts and logs an offset gap: `got` past the `expected` next offset. Legitimate after
/// compaction or transactions; otherwise messages were skipped.
pub(super) fn count_offset_gap(metrics: &PipelineMetrics, key: &PartitionKey, expected: i64, got: i64) {
    if got > expected && expected > 0 {
        metrics.kafka.offset_gaps.inc();
        tracing::warn!(partition = %key, expected, got, "offset gap in a partition");
    }
}

/// Counts a checkpoint of every owned partition (outcome, and duration and time when it worked).
pub(super) fn count_checkpoint(metrics: &PipelineMetrics, started: Instant, ok: bool) {
    metrics.checkpoints.written.with_label_values(&[if ok { "ok" } else { "failed" }]).inc();
    if ok {
        metrics.checkpoints.duration.observe(started.elapsed().as_secs_f64());
        metrics.checkpoints.last_success.set(unix_now_ns() as f64 / 1e9);
    }
}

/// Stops the consumer after the last checkpoint: it may be waiting in a rebalance for the
/// pipeline, so pending revocations are answered first; then `offsets` are committed.
pub(super) async fn stop_consumer(
    source: KafkaSource,
    mut events: mpsc::Receiver<KafkaEvent>,
    offsets: Vec<(PartitionKey, i64)>,
) -> Result<(), PipelineError> {
    events.close();
    while let Ok(event) = events.try_recv() {
        if let KafkaEvent::Revoked { reply, .. } = event {
            let _ = reply.send(Vec::new());
        }
    }
    tokio::task::spawn_blocking(move || source.stop(&offsets)).await.map_err(|e| PipelineError::Task(e.to_string()))
}
