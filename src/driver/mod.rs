//! One run loop for every source. A [`Driver`] turns what its source delivers into pipeline
//! calls and decides what happens at the end; the loop itself only adds the periodic tick and
//! the shutdown signal.
//!
//! - [`SourceDriver`]: any [`Source`] of batches (the simulator, files, a test's batches). At
//!   the end, by the source running out or by a shutdown, every open window is flushed.
//! - [`kafka::KafkaDriver`]: the Kafka consumer, which owns exactly-once (offsets, checkpoints,
//!   results logs, dead letters). At shutdown open windows are checkpointed, not flushed.

pub mod ingest;
pub mod kafka;
pub mod site;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;

use crate::pipeline::{Pipeline, PipelineError, Prepared, Preparer, RunSummary};
use crate::source::Source;
use crate::types::SourceBatch;

/// Why a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The source has nothing more to deliver (a finite simulation, files read to the end).
    SourceEnded,
    /// A shutdown was requested (a signal).
    Shutdown,
}

/// What drives a pipeline: a source of events and what to do with each.
pub trait Driver: Send {
    type Event: Send;

    /// Called once before the first event.
    fn start(&mut self, _pipeline: &mut Pipeline) {}

    /// The next event; `None` when the source has ended. Must be cancel-safe: the run loop
    /// drops it when the tick or a shutdown comes first.
    fn next(&mut self) -> impl Future<Output = Option<Self::Event>> + Send;

    /// Handles one event.
    fn handle(&mut self, event: Self::Event, pipeline: &mut Pipeline) -> impl Future<Output = Result<(), PipelineError>> + Send;

    /// Periodic work after the pipeline's own (once a second).
    fn tick(&mut self, _pipeline: &mut Pipeline) -> Result<(), PipelineError> {
        Ok(())
    }

    /// A note for the periodic status line (e.g. the Kafka lag).
    fn status_note(&self, _pipeline: &Pipeline) -> Option<String> {
        None
    }

    /// Ends the run: flush, or checkpoint, as the source's semantics say.
    fn stop(self, pipeline: &mut Pipeline, end: End) -> impl Future<Output = Result<(), PipelineError>> + Send;
}

/// Drives `pipeline` with `driver` until the source ends or `shutdown` turns true; returns the
/// run's totals.
pub async fn run<D: Driver>(
    mut driver: D,
    mut pipeline: Pipeline,
    mut shutdown: watch::Receiver<bool>,
) -> Result<RunSummary, PipelineError> {
    driver.start(&mut pipeline);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let end = loop {
        tokio::select! {
            biased;
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break End::Shutdown;
                }
            }
            _ = tick.tick() => {
                let note = driver.status_note(&pipeline);
                pipeline.tick(note).await?;
                driver.tick(&mut pipeline)?;
            }
            event = driver.next() => match event {
                Some(event) => driver.handle(event, &mut pipeline).await?,
                None => break End::SourceEnded,
            },
        }
    };
    driver.stop(&mut pipeline, end).await?;
    pipeline.log_stopped();
    Ok(pipeline.summary())
}

/// Drives any [`Source`] of batches: each batch is processed; at the end every open window is
/// flushed, whether the source ran out or a shutdown was requested. With `decode.ahead` a task
/// reads the source and prepares the next batches on blocking threads, [`PREPARING`] at a
/// time, while this one aggregates; batches keep their order.
pub struct SourceDriver<S> {
    source: Option<S>,
    ahead: Option<(mpsc::Receiver<Ahead>, tokio::task::JoinHandle<()>)>,
}

/// A batch decoded ahead, or the panic that decoding it ended in.
type Ahead = Result<(SourceBatch, Prepared), tokio::task::JoinError>;

impl<S: Source + 'static> SourceDriver<S> {
    pub fn new(source: S) -> Self {
        Self { source: Some(source), ahead: None }
    }
}

/// Batches in preparation at once. Preparing (decode, enrich, partial aggregates) costs several
/// times the rest of a batch, and batches are handed on in order: with two, a core stood idle
/// whenever the later batch was ready first (1.58 of 2 cores busy, BENCHMARKS.md).
const PREPARING: usize = 3;

/// Reads `source` and prepares its batches on blocking threads, [`PREPARING`] at a time; hands
/// them on in order, one in the channel at most.
fn decode_ahead<S: Source + 'static>(source: S, preparer: Arc<Preparer>) -> (mpsc::Receiver<Ahead>, tokio::task::JoinHandle<()>) {
    use futures::StreamExt as _;
    let (tx, rx) = mpsc::channel(1);
    let task = tokio::spawn(async move {
        let batches = futures::stream::unfold(source, |mut source| async move { source.next_batch().await.map(|b| (b, source)) });
        let prepared = batches
            .map(|batch| {
                let preparer = preparer.clone();
                tokio::task::spawn_blocking(move || {
                    let prepared = preparer.prepare(&batch);
                    (batch, prepared)
                })
            })
            .buffered(PREPARING);
        let mut prepared = std::pin::pin!(prepared);
        while let Some(prepared) = prepared.next().await {
            let failed = prepared.is_err();
            if tx.send(prepared).await.is_err() || failed {
                break;
            }
        }
    });
    (rx, task)
}

impl<S: Source + 'static> Driver for SourceDriver<S> {
    type Event = (SourceBatch, Option<Prepared>);

    fn start(&mut self, pipeline: &mut Pipeline) {
        let source = self.source.take().expect("started once");
        pipeline.register_partitions(&source.partitions());
        if pipeline.decodes_ahead() {
            self.ahead = Some(decode_ahead(source, pipeline.preparer()));
        } else {
            self.source = Some(source);
        }
    }

    async fn next(&mut self) -> Option<Self::Event> {
        match (&mut self.ahead, &mut self.source) {
            (Some((ahead, _)), _) => match ahead.recv().await? {
                Ok((batch, prepared)) => Some((batch, Some(prepared))),
                // A panic while decoding is a panic of the pipeline, as it would be in line.
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            },
            (None, Some(source)) => source.next_batch().await.map(|batch| (batch, None)),
            (None, None) => None,
        }
    }

    async fn handle(&mut self, (batch, prepared): Self::Event, pipeline: &mut Pipeline) -> Result<(), PipelineError> {
        let source = batch.format.as_str();
        match prepared {
            Some(prepared) => pipeline.process_prepared(&batch, prepared, source).await.map(|_| ()),
            None => pipeline.process(&batch, source).await.map(|_| ()),
        }
    }

    async fn stop(self, pipeline: &mut Pipeline, end: End) -> Result<(), PipelineError> {
        if let Some((_, task)) = &self.ahead {
            task.abort();
        }
        match end {
            End::SourceEnded => tracing::info!("source finished: flushing open windows"),
            End::Shutdown => tracing::info!("shutdown requested: flushing open windows"),
        }
        pipeline.finish().await.map(|_| ())
    }
}

/// Runs `source` through `pipeline` (see [`SourceDriver`]).
pub async fn run_source<S: Source + 'static>(
    source: S,
    pipeline: Pipeline,
    shutdown: watch::Receiver<bool>,
) -> Result<RunSummary, PipelineError> {
    run(SourceDriver::new(source), pipeline, shutdown).await
}
