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
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::pipeline::{Pipeline, PipelineError, RunSummary};
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
/// flushed, whether the source ran out or a shutdown was requested.
pub struct SourceDriver<S> {
    source: S,
}

impl<S: Source> SourceDriver<S> {
    pub fn new(source: S) -> Self {
        Self { source }
    }
}

impl<S: Source> Driver for SourceDriver<S> {
    type Event = SourceBatch;

    fn start(&mut self, pipeline: &mut Pipeline) {
        pipeline.register_partitions(&self.source.partitions());
    }

    fn next(&mut self) -> impl Future<Output = Option<SourceBatch>> + Send {
        self.source.next_batch()
    }

    async fn handle(&mut self, batch: SourceBatch, pipeline: &mut Pipeline) -> Result<(), PipelineError> {
        pipeline.process(&batch, batch.format.as_str()).await.map(|_| ())
    }

    async fn stop(self, pipeline: &mut Pipeline, end: End) -> Result<(), PipelineError> {
        match end {
            End::SourceEnded => tracing::info!("source finished: flushing open windows"),
            End::Shutdown => tracing::info!("shutdown requested: flushing open windows"),
        }
        pipeline.finish().await.map(|_| ())
    }
}

/// Runs `source` through `pipeline` (see [`SourceDriver`]).
pub async fn run_source<S: Source>(source: S, pipeline: Pipeline, shutdown: watch::Receiver<bool>) -> Result<RunSummary, PipelineError> {
    run(SourceDriver::new(source), pipeline, shutdown).await
}
