//! Sinks: where closed windows go. Sinks see closed windows only, so every reader sees whole windows.

pub mod prometheus;
pub mod readiness;

use std::sync::{Arc, Mutex};

use crate::table::TableDef;
use crate::window::ClosedWindow;

/// Receives each closed window once, oldest first.
pub trait WindowSink: Send {
    /// A closed window (or a correction: `window.previous` is set) of `table`.
    fn on_window(&mut self, table: &'static TableDef, window: &ClosedWindow);

    /// Receives the enriched flow records of each micro-batch, before any window they close
    /// is published (which exporters are alive: a quiet site is not a silent one).
    fn on_flows(&mut self, _flows: &datafusion::arrow::array::RecordBatch) {}

    /// Receives the on-time records of `table` from each micro-batch (late ones left out), for
    /// readers that judge raw records rather than windows.
    fn on_records(&mut self, _table: &'static TableDef, _on_time: &datafusion::arrow::array::RecordBatch) {}

    /// Called once a second, with or without new data.
    fn on_tick(&mut self, _now: std::time::Instant) {}

    /// Receives the sites' verdicts after each window is judged (all tables of it closed).
    fn on_readiness(&mut self, _start_ns: i64, _end_ns: i64, _sites: &[crate::readiness::SiteReadiness]) {}
}

/// Keeps every closed window in memory: for tests and embedding.
#[derive(Clone, Default)]
pub struct CollectSink {
    pub windows: Arc<Mutex<Vec<ClosedWindow>>>,
}

impl WindowSink for CollectSink {
    fn on_window(&mut self, _table: &'static TableDef, window: &ClosedWindow) {
        self.windows.lock().expect("collect lock").push(window.clone());
    }
}
