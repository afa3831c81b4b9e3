//! `siteflow replay`: recorded files through the pipeline without Kafka, with progress while it
//! runs and per-site totals at the end. Also opens the files of `source.kind: file` for `run`.
//!
//! Windows follow the data's event time, so last year's capture gives last year's windows; every
//! open window is published when the files end. `--speed N` paces the files at N seconds of
//! event time per second instead of as fast as possible.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use tokio::sync::watch;

use crate::config::Config;
use crate::decode::{DecodeLimits, RejectReason};
use crate::history::{History, HistoryError, HistoryOptions, HistorySink};
use crate::metrics::PipelineMetrics;
use crate::pipeline::{BuildError, Pipeline, PipelineError, Resources};
use crate::source::file::{FileInput, FileProgress, FileSource, FileSourceError};
use crate::sql::{SqlEngine, SqlError, SqlLimits};
use crate::types::{EventTime, Format};

/// Why a replay (or a file source) failed; each names the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Options that do not go together.
    #[error("{0}")]
    Usage(&'static str),
    #[error(transparent)]
    Files(#[from] FileSourceError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("per-site totals: {0}")]
    Totals(#[from] SqlError),
    #[error("--output-file {}: {source}", path.display())]
    OutputFile { path: PathBuf, source: std::io::Error },
    #[error("--output-file {}: {source}", path.display())]
    OutputParquet { path: PathBuf, source: datafusion::parquet::errors::ParquetError },
    #[error("the per-site totals cannot be encoded: {0}")]
    Encode(#[from] datafusion::arrow::error::ArrowError),
    #[error("standard output: {0}")]
    Stdout(std::io::Error),
}

/// Messages per batch of a replay as fast as possible (as a Kafka micro-batch).
const BATCH_MESSAGES: usize = 1_000;

/// How the per-site totals are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// An aligned table with a row count.
    Table,
    Csv,
    /// One JSON array of row objects.
    Json,
    /// A Parquet file (needs --output-file).
    Parquet,
}

/// What `siteflow replay` was asked to do.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub files: Vec<PathBuf>,
    /// `None`: detected per file.
    pub format: Option<Format>,
    pub event_time: EventTime,
    /// Seconds of event time per wall-clock second; `None`: as fast as possible.
    pub speed: Option<f64>,
    pub history_dir: Option<PathBuf>,
    pub output: Output,
    /// Where the totals go (`None`: stdout).
    pub output_file: Option<PathBuf>,
    /// Between progress log lines when stderr is not a terminal.
    pub progress_interval: Duration,
}

/// A `--format` value: a format that can be replayed from files.
pub fn parse_format(s: &str) -> Result<Format, String> {
    Format::ALL.into_iter().find(|f| f.as_str() == s && *f != Format::Goflow2ProtobufPlain).ok_or_else(|| {
        format!("not a replayable format (one of goflow2_json, goflow2_protobuf, pmacct_json, siteflow_probe_json, telegraf_json): {s}")
    })
}

/// An `--event-time` value.
pub fn parse_event_time(s: &str) -> Result<EventTime, String> {
    EventTime::ALL.into_iter().find(|m| m.as_str() == s).ok_or_else(|| format!("one of flow_end, flow_start, arrival, spread: {s}"))
}

/// A `--speed` value: a positive factor.
pub fn parse_speed(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("a positive number (10: ten seconds of event time per second): {s}")),
    }
}

/// The decode limits of `config` as the pipeline applies them now (for format detection).
pub fn decode_limits(config: &Config) -> DecodeLimits {
    let future_ns = (config.decode.max_future_secs as i64).saturating_mul(1_000_000_000);
    let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
    DecodeLimits {
        max_message_bytes: config.decode.max_message_bytes,
        max_bytes_per_record: config.decode.max_bytes_per_record,
        min_time_ns: DecodeLimits::MIN_TIME_NS,
        max_time_ns: now_ns.saturating_add(future_ns),
    }
}

/// Opens `inputs` and logs what each file turned out to be.
fn open_files(inputs: &[FileInput], config: &Config) -> Result<FileSource, FileSourceError> {
    let source = FileSource::open(inputs, &decode_limits(config), BATCH_MESSAGES)?;
    for (path, format, compression, messages) in source.describe_files() {
        let how = if inputs.iter().any(|i| i.path == path && i.format.is_some()) { "given" } else { "detected" };
        tracing::info!(file = %path.display(), format = format.as_str(), how, compression = compression.as_str(), messages, "replay file");
    }
    Ok(source)
}

/// The source of `source.kind: file` (for `siteflow run` and `check`).
pub fn configured_source(config: &Config) -> Result<FileSource, FileSourceError> {
    let inputs: Vec<FileInput> =
        config.source.files.iter().map(|f| FileInput { path: f.path.relative(), format: f.format, event_time: f.event_time }).collect();
    open_files(&inputs, config)
}

/// The per-site totals printed at the end of a replay.
pub const TOTALS_SQL: &str = "SELECT site, direction, count(*) AS windows, min(window_start) AS first_window, \
     max(window_start) AS last_window, sum(bytes) AS bytes, sum(packets) AS packets, sum(records) AS records \
     FROM site_windows GROUP BY site, direction ORDER BY site, direction";

/// Runs `siteflow replay`: files through the pipeline, every window flushed at the end, progress
/// on stderr, per-site totals on stdout (or `output_file`), counts of what was left out on stderr.
pub async fn replay(options: &ReplayOptions, config: &Config) -> Result<(), ReplayError> {
    if options.output == Output::Parquet && options.output_file.is_none() {
        return Err(ReplayError::Usage("--output parquet needs --output-file FILE (Parquet is not written to a terminal)"));
    }
    let res = Resources::load(config)?;
    let inputs: Vec<FileInput> =
        options.files.iter().map(|p| FileInput { path: p.clone(), format: options.format, event_time: options.event_time }).collect();
    let mut source = open_files(&inputs, config)?;
    if let Some(speed) = options.speed {
        source.pace(speed);
    }
    let formats = source.formats();
    let progress = source.progress();
    let metrics = Arc::new(PipelineMetrics::new(&Pipeline::FORMATS, &crate::table::TABLES));
    let history = History::open(HistoryOptions {
        dir: options.history_dir.clone(),
        max_memory_rows: usize::MAX,
        ..HistoryOptions::from_config(&config.history)
    })?;
    let sinks: Vec<Box<dyn crate::sink::WindowSink>> = vec![Box::new(HistorySink::new(history.clone(), config.sql.top_talkers))];
    let mut pipeline = Pipeline::build(config, &res, metrics.clone(), sinks).await?;
    pipeline.track_event_time(progress.newest_event_ns.clone());
    crate::history::declare_tables(&history, &pipeline.output_schemas(), config.sql.top_talkers);
    tracing::info!(
        files = options.files.len(),
        messages = progress.messages_total,
        formats = ?formats.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
        speed = ?options.speed,
        "replaying"
    );

    let reporter = Reporter { progress: progress.clone(), metrics: metrics.clone(), formats: formats.clone(), started: Instant::now() };
    let (done_tx, done_rx) = watch::channel(false);
    // indicatif draws nothing when stderr is no terminal, NO_COLOR is set or TERM is dumb: then lines.
    let bar = !indicatif::ProgressDrawTarget::stderr().is_hidden();
    let report = tokio::spawn(reporter.run(bar, options.progress_interval, done_rx));
    let (_stop, stop_rx) = watch::channel(false);
    let summary = crate::driver::run_source(source, pipeline, stop_rx).await;
    let _ = done_tx.send(true);
    let _ = report.await;
    let summary = summary?;

    let counts = Counts::read(&metrics, &formats);
    eprintln!(
        "replayed {} messages: {} records decoded, {} rejected, {} unmatched, {} late, {} without traffic; {} windows ({} corrected)",
        progress.messages_total,
        counts.decoded,
        counts.rejected.iter().map(|(_, _, n)| n).sum::<u64>(),
        counts.unmatched,
        counts.late,
        counts.no_traffic,
        summary.windows_closed,
        counts.corrected,
    );
    for (format, reason, n) in &counts.rejected {
        eprintln!("  rejected as {} ({}): {n}", reason.as_str(), format.as_str());
    }
    if let Some(dir) = &options.history_dir {
        let rows = history.flush()?;
        eprintln!("{rows} rows written to {}", dir.display());
    }
    let limits = SqlLimits::from_config(&config.sql);
    let engine = SqlEngine::new(res.inventory.clone(), history, None, limits, config.window.size_secs as f64);
    let (schema, batches) = engine.query(TOTALS_SQL).await?;
    write_totals(options, &schema, &batches)
}

/// What the pipeline left out, read from its metrics.
#[derive(Debug, Default, PartialEq)]
struct Counts {
    decoded: u64,
    /// (format, reason, records), only the non-zero ones.
    rejected: Vec<(Format, RejectReason, u64)>,
    unmatched: u64,
    late: u64,
    no_traffic: u64,
    corrected: u64,
}

impl Counts {
    fn read(m: &PipelineMetrics, formats: &[Format]) -> Self {
        let per_table =
            |c: &prometheus::IntCounterVec| -> u64 { crate::table::TABLES.iter().map(|t| c.with_label_values(&[t.name]).get()).sum() };
        let mut counts = Counts {
            unmatched: per_table(&m.records_unmatched),
            late: per_table(&m.records_late),
            corrected: per_table(&m.windows.corrected),
            ..Counts::default()
        };
        for f in formats {
            counts.decoded += m.records_decoded.with_label_values(&[f.as_str()]).get();
            counts.no_traffic += m.records_skipped.with_label_values(&[f.as_str(), "no_traffic"]).get();
            for reason in RejectReason::ALL {
                let n = m.records_rejected.with_label_values(&[f.as_str(), reason.as_str()]).get();
                if n > 0 {
                    counts.rejected.push((*f, reason, n));
                }
            }
        }
        counts
    }
}

/// Writes the totals as asked, to `--output-file` or stdout.
fn write_totals(options: &ReplayOptions, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<(), ReplayError> {
    use crate::http::{SqlFormat, encode_batches};
    let bytes = match options.output {
        Output::Table => {
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            let table = datafusion::arrow::util::pretty::pretty_format_batches(batches)?;
            format!("{table}\n({rows} row{})\n", if rows == 1 { "" } else { "s" }).into_bytes()
        }
        Output::Csv => encode_batches(SqlFormat::Csv, schema, batches)?,
        Output::Json => {
            let mut b = encode_batches(SqlFormat::Json, schema, batches)?;
            b.push(b'\n');
            b
        }
        Output::Parquet => {
            let path = options.output_file.as_ref().expect("checked before the replay");
            let parquet = |source| ReplayError::OutputParquet { path: path.clone(), source };
            let file = std::fs::File::create(path).map_err(|source| ReplayError::OutputFile { path: path.clone(), source })?;
            let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None).map_err(parquet)?;
            for b in batches {
                writer.write(b).map_err(parquet)?;
            }
            writer.close().map_err(parquet)?;
            eprintln!("per-site totals written to {}", path.display());
            return Ok(());
        }
    };
    match &options.output_file {
        Some(path) => std::fs::write(path, bytes).map_err(|source| ReplayError::OutputFile { path: path.clone(), source })?,
        None => std::io::stdout().lock().write_all(&bytes).map_err(ReplayError::Stdout)?,
    }
    Ok(())
}

/// Shows how far a replay is: a progress bar on a terminal (two lines: the bar with percent and
/// ETA by messages, then records, records/s and event time), log lines otherwise.
struct Reporter {
    progress: Arc<FileProgress>,
    metrics: Arc<PipelineMetrics>,
    formats: Vec<Format>,
    started: Instant,
}

/// One look at a replay's progress.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Snapshot {
    messages: u64,
    messages_total: u64,
    records: u64,
    newest_event_ns: Option<i64>,
    elapsed: Duration,
}

impl Snapshot {
    fn records_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 { self.records as f64 / secs } else { 0.0 }
    }

    /// Time left at the pace so far, by messages (`None` before anything is done).
    fn eta(&self) -> Option<Duration> {
        if self.messages == 0 {
            return None;
        }
        let left = self.messages_total.saturating_sub(self.messages) as f64;
        Some(Duration::from_secs_f64(self.elapsed.as_secs_f64() * left / self.messages as f64))
    }

    fn event_time(&self) -> String {
        match self.newest_event_ns {
            Some(ns) => chrono::DateTime::from_timestamp_nanos(ns).format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            None => "-".to_string(),
        }
    }

    /// "12345 records, 4000 records/s, event time 2025-11-03 10:00:00 UTC" (the bar's message).
    fn line(&self) -> String {
        format!("{} records, {:.0} records/s, event time {}", self.records, self.records_per_sec(), self.event_time())
    }
}

impl Reporter {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            messages: self.progress.messages_done.load(Ordering::Relaxed),
            messages_total: self.progress.messages_total,
            records: self.formats.iter().map(|f| self.metrics.records_received.with_label_values(&[f.as_str()]).get()).sum(),
            newest_event_ns: self.progress.newest_event_ns(),
            elapsed: self.started.elapsed(),
        }
    }

    /// Reports until `done` turns true.
    async fn run(self, bar: bool, interval: Duration, mut done: watch::Receiver<bool>) {
        if bar { self.bar(&mut done).await } else { self.log_lines(interval, &mut done).await }
    }

    async fn bar(&self, done: &mut watch::Receiver<bool>) {
        use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
        let bar = ProgressBar::with_draw_target(Some(self.progress.messages_total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {percent:>3}% ETA {eta}\n{msg}")
            .expect("a valid template")
            .progress_chars("=> ");
        bar.set_style(style);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            let s = self.snapshot();
            bar.set_position(s.messages);
            bar.set_message(s.line());
            tokio::select! {
                _ = tick.tick() => {}
                _ = done.wait_for(|d| *d) => break,
            }
        }
        let s = self.snapshot();
        bar.set_position(s.messages);
        bar.set_message(s.line());
        bar.finish();
        // The bar leaves the cursor at the end of its last line.
        eprintln!();
    }

    async fn log_lines(&self, interval: Duration, done: &mut watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = done.wait_for(|d| *d) => return,
            }
            let s = self.snapshot();
            tracing::info!(
                messages = s.messages,
                of = s.messages_total,
                records = s.records,
                records_per_sec = s.records_per_sec().round() as u64,
                event_time = %s.event_time(),
                eta_secs = s.eta().map(|d| d.as_secs()),
                "replay progress"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_figures() {
        let s = Snapshot {
            messages: 250,
            messages_total: 1_000,
            records: 500,
            newest_event_ns: Some(1_730_628_000_000_000_000),
            elapsed: Duration::from_secs(2),
        };
        assert_eq!(s.records_per_sec(), 250.0);
        assert_eq!(s.eta(), Some(Duration::from_secs(6)));
        assert_eq!(s.line(), "500 records, 250 records/s, event time 2024-11-03 10:00:00 UTC");
        let start = Snapshot { messages: 0, newest_event_ns: None, elapsed: Duration::ZERO, ..s };
        assert_eq!((start.eta(), start.records_per_sec(), start.event_time().as_str()), (None, 0.0, "-"));
    }

    #[test]
    fn options_parse_with_the_bad_value_named() {
        assert_eq!(parse_format("pmacct_json"), Ok(Format::PmacctJson));
        assert!(parse_format("goflow2_protobuf_plain").unwrap_err().contains("goflow2_protobuf_plain"));
        assert!(parse_format("netflow").unwrap_err().contains("netflow"));
        assert_eq!(parse_event_time("spread"), Ok(EventTime::Spread));
        assert_eq!(parse_speed("2.5"), Ok(2.5));
        for bad in ["0", "-1", "inf", "fast"] {
            assert!(parse_speed(bad).unwrap_err().contains(bad));
        }
    }
}
