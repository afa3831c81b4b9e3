//! Closed windows kept for SQL: the recent ones in memory, older ones in Parquet on disk.
//!
//! Every closed window's rows go to memory first. On an interval (and at shutdown) the memory
//! rows are written to Parquet, one file per table and date, and leave memory in the same step
//! (under one lock), so a query's snapshot sees each window exactly once: in memory or on disk,
//! never both, never neither. Layout: `<dir>/<table>/date=YYYY-MM-DD/<first>-<last>.parquet`
//! (window starts in ns). Dates older than the retention are deleted once their files were
//! also written longer ago than the retention (a replay of last year's flows stays queryable
//! for the retention); a past date with many small files is compacted into one. A published
//! window that is corrected has its rows replaced, in memory or on disk, site by site (on a
//! site-stage instance the window also holds the other instances' sites, which
//! `windows_topic` brings in). Without a directory, windows stay in memory only, bounded
//! by `max_memory_rows` per table (the oldest rows go first).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringBuilder};
use datafusion::arrow::compute::{cast, concat_batches};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimestampNanosecondType};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;

use datafusion::arrow::error::ArrowError;
use datafusion::parquet::errors::ParquetError;

use crate::readiness::SiteReadiness;
use crate::sink::WindowSink;
use crate::table::TableDef;
use crate::window::ClosedWindow;

/// The table of readiness verdicts, one row per site per evaluation.
pub const READINESS_TABLE: &str = "readiness";

/// Schema of the `readiness` table.
pub fn readiness_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("window_start", DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Nanosecond, None), false),
        Field::new("window_end", DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Nanosecond, None), false),
        Field::new("site", DataType::Utf8, false),
        Field::new("district", DataType::Utf8, false),
        Field::new("level", DataType::Utf8, false),
        Field::new("verdict", DataType::Utf8, false),
        Field::new("reasons", DataType::Utf8, false),
        // Nullable: history written before connection status reads them as NULL.
        Field::new("connection", DataType::Utf8, true),
        Field::new("connection_cause", DataType::Utf8, true),
        Field::new("connection_since", DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Nanosecond, None), true),
        Field::new("upstream", DataType::Utf8, true),
        Field::new("maintenance", DataType::Utf8, true),
        Field::new("flow_counter_ratio_in", DataType::Float64, true),
        Field::new("flow_counter_ratio_out", DataType::Float64, true),
        Field::new("utilisation_source", DataType::Utf8, true),
    ]))
}

/// History settings.
#[derive(Debug, Clone)]
pub struct HistoryOptions {
    /// Where Parquet files go; `None`: memory only.
    pub dir: Option<PathBuf>,
    /// Dates older than this many days are deleted.
    pub retention_days: u32,
    /// A past date with at least this many files is compacted into one.
    pub compact_min_files: usize,
    /// Memory-only mode: rows kept per table (the oldest go first).
    pub max_memory_rows: usize,
}

impl HistoryOptions {
    pub fn from_config(c: &crate::config::HistoryConfig) -> Self {
        Self {
            dir: c.dir.as_ref().map(crate::config::resolve),
            retention_days: c.retention_days,
            compact_min_files: c.compact_min_files.max(2),
            max_memory_rows: c.max_memory_rows,
        }
    }
}

#[derive(Debug, Default)]
struct TableHistory {
    schema: Option<SchemaRef>,
    /// Rows not yet on disk, oldest first.
    memory: Vec<RecordBatch>,
    memory_rows: usize,
    /// Parquet files, by date.
    files: BTreeMap<String, Vec<PathBuf>>,
}

#[derive(Debug, Default)]
struct Inner {
    tables: BTreeMap<String, TableHistory>,
    /// Per topic and partition, the offset of the last message whose rows are in the history
    /// (`windows_topic`): saved with each flush, so a restart reads on from there.
    applied: BTreeMap<String, BTreeMap<i32, i64>>,
}

/// Where the applied offsets are kept, next to the tables' directories.
const APPLIED_FILE: &str = "applied-offsets.json";

/// What a query sees of one table at one instant.
#[derive(Debug, Clone)]
pub struct TableSnapshot {
    pub schema: SchemaRef,
    pub memory: Vec<RecordBatch>,
    pub files: Vec<PathBuf>,
}

/// The history store; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct History {
    options: HistoryOptions,
    inner: Arc<Mutex<Inner>>,
}

/// Dictionary columns (site labels) as plain strings: one schema for memory and Parquet.
pub(crate) fn normalise(batch: &RecordBatch) -> RecordBatch {
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    for (f, c) in batch.schema().fields().iter().zip(batch.columns()) {
        if let DataType::Dictionary(_, value) = f.data_type() {
            fields.push(Field::new(f.name(), value.as_ref().clone(), f.is_nullable()));
            columns.push(cast(c, value).expect("dictionary values cast to their type"));
        } else {
            fields.push(f.as_ref().clone());
            columns.push(c.clone());
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("same columns")
}

/// Addresses (16-byte columns) as text, dictionaries as plain strings: what engineers query.
pub fn readable(batch: &RecordBatch) -> RecordBatch {
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (f, c) in batch.schema().fields().iter().zip(batch.columns()) {
        match f.data_type() {
            DataType::FixedSizeBinary(16) => {
                let a = c.as_fixed_size_binary();
                let mut b = StringBuilder::with_capacity(a.len(), a.len() * 12);
                for i in 0..a.len() {
                    let bytes: [u8; 16] = a.value(i).try_into().expect("16 bytes");
                    b.append_value(crate::inventory::ip_from_addr(u128::from_be_bytes(bytes)).to_string());
                }
                fields.push(Field::new(f.name(), DataType::Utf8, false));
                columns.push(Arc::new(b.finish()));
            }
            DataType::Dictionary(_, v) => {
                fields.push(Field::new(f.name(), v.as_ref().clone(), f.is_nullable()));
                columns.push(datafusion::arrow::compute::cast(c, v).expect("dictionary cast"));
            }
            _ => {
                fields.push(f.as_ref().clone());
                columns.push(c.clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("same columns")
}

/// `YYYY-MM-DD` (UTC) of a time in ns.
fn date_of(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).format("%Y-%m-%d").to_string()
}

fn window_starts(batch: &RecordBatch) -> Option<Vec<i64>> {
    let c = batch.column_by_name("window_start")?;
    let c = c.as_primitive_opt::<TimestampNanosecondType>()?;
    Some(c.values().to_vec())
}

/// A history file operation that failed. Never fatal to the pipeline: the windows stay in
/// memory and the next flush tries again; at start, the directory must be usable.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// `history.dir` cannot be created or listed.
    #[error("history directory {}: {source}", path.display())]
    Directory { path: PathBuf, source: std::io::Error },
    /// A history file cannot be written, read, renamed or synced.
    #[error("history file: {0}")]
    File(#[from] std::io::Error),
    #[error("history Parquet: {0}")]
    Parquet(#[from] ParquetError),
    #[error("history rows: {0}")]
    Arrow(#[from] ArrowError),
    /// The file of applied offsets is not what siteflow writes.
    #[error("history offsets file {}: {message}; delete it to read the windows topic from its beginning", path.display())]
    Applied { path: PathBuf, message: String },
}

impl History {
    /// Opens the history, listing the Parquet files already in `options.dir`.
    pub fn open(options: HistoryOptions) -> Result<Self, HistoryError> {
        let mut inner = Inner::default();
        if let Some(dir) = &options.dir {
            let unusable = |source| HistoryError::Directory { path: dir.clone(), source };
            std::fs::create_dir_all(dir).map_err(unusable)?;
            for table in std::fs::read_dir(dir).map_err(unusable)?.flatten().filter(|e| e.path().is_dir()) {
                let name = table.file_name().to_string_lossy().to_string();
                let t = inner.tables.entry(name).or_default();
                for date in std::fs::read_dir(table.path())?.flatten() {
                    let Some(d) = date.file_name().to_string_lossy().strip_prefix("date=").map(str::to_string) else { continue };
                    let mut files: Vec<PathBuf> = std::fs::read_dir(date.path())?
                        .flatten()
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
                        .collect();
                    files.sort();
                    if let Some(first) = files.first()
                        && t.schema.is_none()
                    {
                        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(first)?)?;
                        t.schema = Some(reader.schema().clone());
                    }
                    t.files.insert(d, files);
                }
            }
            let applied = dir.join(APPLIED_FILE);
            if applied.exists() {
                let text = std::fs::read(&applied).map_err(unusable)?;
                inner.applied =
                    serde_json::from_slice(&text).map_err(|e| HistoryError::Applied { path: applied, message: e.to_string() })?;
            }
        }
        Ok(Self { options, inner: Arc::new(Mutex::new(inner)) })
    }

    pub fn options(&self) -> &HistoryOptions {
        &self.options
    }

    /// Declares a table's schema before its first window (so it can be queried empty).
    pub fn declare(&self, table: &str, schema: &SchemaRef) {
        let probe = normalise(&RecordBatch::new_empty(schema.clone()));
        let mut inner = self.inner.lock().expect("history lock");
        inner.tables.entry(table.to_string()).or_default().schema.get_or_insert_with(|| probe.schema());
    }

    /// Appends rows of a table.
    pub fn append(&self, table: &str, rows: &RecordBatch) {
        if rows.num_rows() == 0 {
            return;
        }
        let rows = normalise(rows);
        let mut inner = self.inner.lock().expect("history lock");
        let t = inner.tables.entry(table.to_string()).or_default();
        t.schema.get_or_insert_with(|| rows.schema());
        t.memory_rows += rows.num_rows();
        t.memory.push(rows);
        if self.options.dir.is_none() {
            while t.memory_rows > self.options.max_memory_rows && t.memory.len() > 1 {
                let old = t.memory.remove(0);
                t.memory_rows -= old.num_rows();
            }
        }
    }

    /// Replaces the rows of one window for the sites in `rows` (a correction of a published
    /// window, or another instance's sites): their rows leave memory and the files that hold
    /// them are rewritten without them, then the new rows join memory — all under the lock, so a
    /// query sees the window exactly once. Rows of other sites stay; a table without a `site`
    /// column has the whole window replaced.
    pub fn replace_window(&self, table: &str, start_ns: i64, rows: &RecordBatch) -> Result<(), HistoryError> {
        let rows = normalise(rows);
        let sites = sites_of(&rows);
        let without_window = |batch: &RecordBatch, start_ns: i64| without_window(batch, start_ns, sites.as_ref());
        let mut inner = self.inner.lock().expect("history lock");
        let t = inner.tables.entry(table.to_string()).or_default();
        t.schema.get_or_insert_with(|| rows.schema());
        let mut kept = Vec::with_capacity(t.memory.len());
        for batch in t.memory.drain(..) {
            // Most batches hold other windows: kept as they are, not copied.
            if !holds_window(&batch, start_ns) {
                kept.push(batch);
                continue;
            }
            let rest = without_window(&batch, start_ns)?;
            if rest.num_rows() > 0 {
                kept.push(rest);
            }
        }
        t.memory = kept;
        if let Some(files) = t.files.get_mut(&date_of(start_ns)) {
            let mut emptied = Vec::new();
            for path in files.iter().filter(|p| file_may_hold(p, start_ns)) {
                let batches: Vec<RecordBatch> =
                    ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path)?)?.build()?.collect::<Result<_, _>>()?;
                let before: usize = batches.iter().map(RecordBatch::num_rows).sum();
                let rest: Vec<RecordBatch> = batches
                    .iter()
                    .map(|b| without_window(b, start_ns))
                    .filter(|b| b.as_ref().is_ok_and(|b| b.num_rows() > 0))
                    .collect::<Result<_, _>>()?;
                if rest.iter().map(RecordBatch::num_rows).sum::<usize>() == before {
                    continue;
                }
                if rest.is_empty() {
                    std::fs::remove_file(path)?;
                    emptied.push(path.clone());
                } else {
                    write_parquet(path, &rest)?;
                }
            }
            files.retain(|p| !emptied.contains(p));
        }
        if rows.num_rows() > 0 {
            t.memory.push(rows);
        }
        t.memory_rows = t.memory.iter().map(RecordBatch::num_rows).sum();
        Ok(())
    }

    /// The schema a table's rows have in the history (declared or first seen).
    pub fn schema_of(&self, table: &str) -> Option<SchemaRef> {
        self.inner.lock().expect("history lock").tables.get(table).and_then(|t| t.schema.clone())
    }

    /// The offsets applied from `topic` (partition → offset of the last message applied).
    pub fn applied_offsets(&self, topic: &str) -> BTreeMap<i32, i64> {
        self.inner.lock().expect("history lock").applied.get(topic).cloned().unwrap_or_default()
    }

    /// Notes that the rows of the message at `offset` are in the history (call after applying
    /// them); saved with the next flush.
    pub fn note_applied(&self, topic: &str, partition: i32, offset: i64) {
        self.inner.lock().expect("history lock").applied.entry(topic.to_string()).or_default().insert(partition, offset);
    }

    /// Every table's rows at this instant.
    pub fn snapshot(&self) -> BTreeMap<String, TableSnapshot> {
        let inner = self.inner.lock().expect("history lock");
        inner
            .tables
            .iter()
            .filter_map(|(name, t)| {
                let schema = t.schema.clone()?;
                let files = t.files.values().flatten().cloned().collect();
                Some((name.clone(), TableSnapshot { schema, memory: t.memory.clone(), files }))
            })
            .collect()
    }

    /// Writes the memory rows to Parquet (one file per table and date), then applies retention
    /// and compaction. Returns the rows written. Memory only: does nothing.
    pub fn flush(&self) -> Result<usize, HistoryError> {
        let Some(dir) = self.options.dir.clone() else { return Ok(0) };
        let mut inner = self.inner.lock().expect("history lock");
        let mut written = 0;
        for (name, t) in inner.tables.iter_mut() {
            if t.memory.is_empty() {
                continue;
            }
            let schema = t.schema.clone().expect("a table with rows has a schema");
            let all = concat_batches(&schema, &t.memory)?;
            let starts = window_starts(&all).unwrap_or_else(|| vec![0; all.num_rows()]);
            let mut by_date: BTreeMap<String, Vec<u32>> = BTreeMap::new();
            for (i, s) in starts.iter().enumerate() {
                by_date.entry(date_of(*s)).or_default().push(i as u32);
            }
            for (date, rows) in by_date {
                let indices = datafusion::arrow::array::UInt32Array::from(rows);
                let part = datafusion::arrow::compute::take_record_batch(&all, &indices)?;
                let (first, last) = (starts[indices.value(0) as usize], starts[indices.value(indices.len() - 1) as usize]);
                let path = dir.join(name).join(format!("date={date}")).join(format!("{first}-{last}.parquet"));
                let path = unique(path);
                write_parquet(&path, &[part])?;
                written += indices.len();
                t.files.entry(date).or_default().push(path);
            }
            t.memory.clear();
            t.memory_rows = 0;
        }
        // Every row applied so far is on disk now: a restart reads on after these offsets.
        if !inner.applied.is_empty() {
            let path = dir.join(APPLIED_FILE);
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(&inner.applied).expect("offsets serialise"))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
        }
        drop(inner);
        self.retain_and_compact(chrono::Utc::now())?;
        Ok(written)
    }

    /// Deletes dates past the retention whose files were also all written longer ago than the
    /// retention (so a replay of old data keeps what it just wrote); compacts past dates with
    /// many files.
    pub fn retain_and_compact(&self, now: chrono::DateTime<chrono::Utc>) -> Result<(), HistoryError> {
        let Some(dir) = self.options.dir.clone() else { return Ok(()) };
        let oldest_kept = (now - chrono::Duration::days(i64::from(self.options.retention_days))).format("%Y-%m-%d").to_string();
        let today = now.format("%Y-%m-%d").to_string();
        // Under the lock: forget expired dates and pick what to compact.
        let mut to_compact = Vec::new();
        {
            let mut inner = self.inner.lock().expect("history lock");
            for (name, t) in inner.tables.iter_mut() {
                let retention = std::time::Duration::from_secs(u64::from(self.options.retention_days) * 86_400);
                let written_within = |files: &Vec<PathBuf>| {
                    files.iter().any(|f| {
                        std::fs::metadata(f).and_then(|m| m.modified()).map_or(true, |m| {
                            let age = std::time::SystemTime::from(now).duration_since(m).unwrap_or_default();
                            age < retention
                        })
                    })
                };
                let expired: Vec<String> =
                    t.files.iter().filter(|(d, files)| **d < oldest_kept && !written_within(files)).map(|(d, _)| d.clone()).collect();
                for date in expired {
                    t.files.remove(&date);
                    let _ = std::fs::remove_dir_all(dir.join(name).join(format!("date={date}")));
                    tracing::info!(table = %name, date = %date, "history: date past retention deleted");
                }
                for (date, files) in &t.files {
                    if *date < today && files.len() >= self.options.compact_min_files {
                        to_compact.push((name.clone(), date.clone(), files.clone()));
                    }
                }
            }
        }
        // Without the lock (the pipeline keeps appending, queries keep reading): merge each
        // date's files into one, batch by batch, under a name no snapshot lists yet.
        for (name, date, files) in to_compact {
            let merged =
                dir.join(&name).join(format!("date={date}")).join(format!("compacted-{}.parquet", now.timestamp_nanos_opt().unwrap_or(0)));
            let merged = unique(merged);
            merge_parquet(&files, &merged)?;
            let mut inner = self.inner.lock().expect("history lock");
            let Some(listed) = inner.tables.get_mut(&name).and_then(|t| t.files.get_mut(&date)) else { continue };
            // Files flushed meanwhile (a late window of that date) stay as they are.
            listed.retain(|f| !files.contains(f));
            listed.push(merged);
            drop(inner);
            // A query that listed the parts before the swap and has not opened them yet fails
            // and can be retried; no query ever sees a window twice.
            for f in &files {
                let _ = std::fs::remove_file(f);
            }
            tracing::info!(table = %name, date = %date, files = files.len(), "history: date compacted into one file");
        }
        Ok(())
    }
}

/// Writes the rows of `parts` to `target` (atomically), one record batch at a time.
fn merge_parquet(parts: &[PathBuf], target: &Path) -> Result<(), HistoryError> {
    let dir = target.parent().expect("history files have a parent");
    let tmp = target.with_extension("parquet.tmp");
    let first = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&parts[0])?)?;
    let props = WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::default())).build();
    let mut writer = ArrowWriter::try_new(std::fs::File::create(&tmp)?, first.schema().clone(), Some(props))?;
    for part in parts {
        for batch in ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(part)?)?.build()? {
            writer.write(&batch?)?;
        }
    }
    writer.into_inner()?.sync_all()?;
    std::fs::rename(&tmp, target)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all())?;
    Ok(())
}

/// Whether any row of `batch` is of the window starting at `start_ns`.
fn holds_window(batch: &RecordBatch, start_ns: i64) -> bool {
    batch
        .column_by_name("window_start")
        .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
        .is_none_or(|starts| starts.values().contains(&start_ns))
}

/// How a null `site` is matched (a correction of a window's null-site rows replaces them).
const NULL_SITE: &str = "\0null";

/// The distinct values of the `site` column, or `None` for a table without one.
fn sites_of(batch: &RecordBatch) -> Option<std::collections::HashSet<String>> {
    let text = cast(batch.column_by_name("site")?, &DataType::Utf8).ok()?;
    Some(text.as_string::<i32>().iter().map(|v| v.unwrap_or(NULL_SITE).to_string()).collect())
}

/// The rows of `batch` not of the window starting at `start_ns` (of those of `sites` only, when
/// given).
fn without_window(
    batch: &RecordBatch,
    start_ns: i64,
    sites: Option<&std::collections::HashSet<String>>,
) -> Result<RecordBatch, datafusion::arrow::error::ArrowError> {
    let Some(starts) = batch.column_by_name("window_start").and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>()) else {
        return Ok(batch.clone());
    };
    let site_text = match (sites, batch.column_by_name("site")) {
        (Some(_), Some(c)) => Some(cast(c, &DataType::Utf8)?),
        _ => None,
    };
    let site_values = site_text.as_ref().map(|c| c.as_string::<i32>());
    let keep = datafusion::arrow::array::BooleanArray::from_iter(starts.values().iter().enumerate().map(|(i, &s)| {
        let replaced = s == start_ns
            && site_values.zip(sites).is_none_or(|(v, sites)| sites.contains(if v.is_valid(i) { v.value(i) } else { NULL_SITE }));
        Some(!replaced)
    }));
    datafusion::arrow::compute::filter_record_batch(batch, &keep)
}

/// Whether a history file can hold the window starting at `start_ns`: flushed files are named
/// `<first>-<last>[-n].parquet` by window start; compacted ones hold a whole date.
fn file_may_hold(path: &Path, start_ns: i64) -> bool {
    let name = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let mut parts = name.splitn(3, '-').map(str::parse::<i64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(first)), Some(Ok(last))) => (first..=last).contains(&start_ns),
        _ => true,
    }
}

/// A path not yet taken (a second flush within the same windows gets a suffix).
fn unique(path: PathBuf) -> PathBuf {
    if !path.exists() {
        return path;
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    (1..).map(|i| path.with_file_name(format!("{stem}-{i}.parquet"))).find(|p| !p.exists()).expect("some suffix is free")
}

/// Writes batches to `path` atomically (temporary file, then rename).
fn write_parquet(path: &Path, batches: &[RecordBatch]) -> Result<(), HistoryError> {
    let dir = path.parent().expect("history files have a parent");
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&tmp)?;
    let props = WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::default())).build();
    let mut writer = ArrowWriter::try_new(file, batches[0].schema(), Some(props))?;
    for b in batches {
        writer.write(b)?;
    }
    writer.into_inner()?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The `n` largest rows by `bytes` per site and direction, ranked (column `rank`, from 1), with
/// addresses as text: a closed conversations window as table `top_talkers` keeps it.
pub fn top_n(rows: &RecordBatch, n: usize) -> RecordBatch {
    let as_strings = |name: &str| rows.column_by_name(name).map(|c| cast(c, &DataType::Utf8).expect("castable to text"));
    let (sites, dirs) = (as_strings("site"), as_strings("direction"));
    let bytes = rows.column_by_name("bytes").map(|c| cast(c, &DataType::Float64).expect("numeric bytes"));
    let mut groups: BTreeMap<(String, String), Vec<(f64, u32)>> = BTreeMap::new();
    for i in 0..rows.num_rows() {
        let text = |a: &Option<ArrayRef>| a.as_ref().map(|a| a.as_string::<i32>().value(i).to_string()).unwrap_or_default();
        let b = bytes.as_ref().map_or(0.0, |a| a.as_primitive::<datafusion::arrow::datatypes::Float64Type>().value(i));
        groups.entry((text(&sites), text(&dirs))).or_default().push((b, i as u32));
    }
    let (mut keep, mut ranks) = (Vec::new(), Vec::new());
    for (_, mut members) in groups {
        members.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (rank, (_, i)) in members.into_iter().take(n).enumerate() {
            keep.push(i);
            ranks.push(rank as u32 + 1);
        }
    }
    let kept =
        datafusion::arrow::compute::take_record_batch(rows, &datafusion::arrow::array::UInt32Array::from(keep)).expect("indices in range");
    let kept = readable(&kept);
    let mut fields: Vec<Field> = kept.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("rank", DataType::UInt32, false));
    let mut columns = kept.columns().to_vec();
    columns.push(Arc::new(datafusion::arrow::array::UInt32Array::from(ranks)));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("same rows")
}

/// Declares every SQL table of a pipeline's windows (so each can be queried before it has rows):
/// each table with the schema of its closed windows.
pub fn declare_tables(history: &History, tables: &[(&'static TableDef, SchemaRef)], top_talkers: usize) {
    for (table, schema) in tables {
        let empty = RecordBatch::new_empty(schema.clone());
        let schema = if table.top_talkers { top_n(&empty, top_talkers).schema() } else { empty.schema() };
        history.declare(table.sql_table, &schema);
    }
    history.declare(READINESS_TABLE, &readiness_schema());
}

/// Sends closed windows and readiness verdicts to the history.
pub struct HistorySink {
    history: History,
    top_talkers: usize,
    /// Every window replaces its sites' rows, also the first time it is published.
    replace_always: bool,
}

impl HistorySink {
    /// `top_talkers`: conversations kept per site, direction and window.
    pub fn new(history: History, top_talkers: usize) -> Self {
        Self { history, top_talkers, replace_always: false }
    }

    /// Files every window and evaluation site by site, replacing what the history holds of
    /// those sites: on a site-stage instance, where the same window of the same sites can also
    /// arrive through the windows topic (its own, written before a restart), so neither order
    /// counts them twice. Costs a scan of the rows in memory per window.
    pub fn replacing(mut self) -> Self {
        self.replace_always = true;
        self
    }

    fn replace(&self, name: &str, start_ns: i64, rows: &RecordBatch) {
        if let Err(e) = self.history.replace_window(name, start_ns, rows) {
            tracing::error!(table = name, window_start = start_ns, "history: correcting a window failed: {e:#}");
        }
    }
}

impl WindowSink for HistorySink {
    fn on_window(&mut self, table: &'static TableDef, window: &ClosedWindow) {
        let name = table.sql_table;
        let rows = if table.top_talkers { top_n(&window.rows, self.top_talkers) } else { window.rows.clone() };
        if window.previous.is_none() && !self.replace_always {
            return self.history.append(name, &rows);
        }
        // A correction: one row per key and window in SQL, with the corrected values.
        self.replace(name, window.start_ns, &rows);
    }

    fn on_readiness(&mut self, start_ns: i64, end_ns: i64, sites: &[SiteReadiness]) {
        let rows = readiness_rows(start_ns, end_ns, sites);
        if self.replace_always {
            self.replace(READINESS_TABLE, start_ns, &rows);
        } else {
            self.history.append(READINESS_TABLE, &rows);
        }
    }
}

/// The `readiness` table's rows of one evaluation.
pub fn readiness_rows(start_ns: i64, end_ns: i64, sites: &[SiteReadiness]) -> RecordBatch {
    let n = sites.len();
    let reasons: Vec<String> = sites.iter().map(|s| s.reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")).collect();
    let strings = |f: &dyn Fn(&SiteReadiness) -> &str| -> ArrayRef {
        Arc::new(datafusion::arrow::array::StringArray::from_iter_values(sites.iter().map(f)))
    };
    let ts = |v: i64| -> ArrayRef { Arc::new(datafusion::arrow::array::TimestampNanosecondArray::from(vec![v; n])) };
    let columns = vec![
        ts(start_ns),
        ts(end_ns),
        strings(&|s| &s.site),
        strings(&|s| &s.district),
        strings(&|s| &s.level),
        strings(&|s| s.verdict.as_str()),
        Arc::new(datafusion::arrow::array::StringArray::from(reasons)) as ArrayRef,
        strings(&|s| s.connection.state.as_str()),
        strings(&|s| s.connection.cause.as_str()),
        Arc::new(datafusion::arrow::array::TimestampNanosecondArray::from_iter(sites.iter().map(|s| s.connection.since_ns))),
        Arc::new(datafusion::arrow::array::StringArray::from_iter(sites.iter().map(|s| s.connection.upstream.as_deref()))),
        Arc::new(datafusion::arrow::array::StringArray::from_iter(sites.iter().map(|s| s.maintenance.as_deref()))),
        Arc::new(datafusion::arrow::array::Float64Array::from_iter(sites.iter().map(|s| s.flow_counter_ratio[0]))),
        Arc::new(datafusion::arrow::array::Float64Array::from_iter(sites.iter().map(|s| s.flow_counter_ratio[1]))),
        Arc::new(datafusion::arrow::array::StringArray::from_iter(sites.iter().map(|s| s.traffic.as_ref().map(|t| t.source.as_str())))),
    ];
    RecordBatch::try_new(readiness_schema(), columns).expect("columns match readiness_schema")
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{TimestampNanosecondArray, UInt64Array};
    use datafusion::arrow::datatypes::TimeUnit;

    const DAY_NS: i64 = 86_400_000_000_000;

    fn windows(starts: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("window_start", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
            Field::new("bytes", DataType::UInt64, false),
        ]));
        let columns: Vec<ArrayRef> =
            vec![Arc::new(TimestampNanosecondArray::from(starts.to_vec())), Arc::new(UInt64Array::from(vec![7u64; starts.len()]))];
        RecordBatch::try_new(schema, columns).unwrap()
    }

    fn rows(h: &History) -> (usize, usize) {
        let snap = &h.snapshot()["site_windows"];
        let on_disk: usize = snap
            .files
            .iter()
            .map(|f| {
                ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).unwrap()).unwrap().metadata().file_metadata().num_rows()
                    as usize
            })
            .sum();
        (snap.memory.iter().map(|b| b.num_rows()).sum(), on_disk)
    }

    #[test]
    fn flush_moves_rows_to_disk_once_and_retention_and_compaction_keep_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let options = HistoryOptions { dir: Some(dir.path().to_path_buf()), retention_days: 30, compact_min_files: 3, max_memory_rows: 0 };
        let now = chrono::Utc::now();
        let today = now.timestamp_nanos_opt().unwrap() / DAY_NS * DAY_NS;
        let h = History::open(options.clone()).unwrap();
        // 40 days ago (a replay of old data: kept, it was just written), 2 days ago in four
        // flushes (compacted), today (kept as is).
        h.append("site_windows", &windows(&[today - 40 * DAY_NS]));
        h.flush().unwrap();
        assert_eq!(rows(&h), (0, 1), "what was just written is not deleted, however old its windows");
        for i in 0..4 {
            h.append("site_windows", &windows(&[today - 2 * DAY_NS + i, today - 2 * DAY_NS + 100 + i]));
            h.flush().unwrap();
        }
        h.append("site_windows", &windows(&[today + 5]));
        assert_eq!(rows(&h), (1, 9), "flushed rows left memory");
        h.flush().unwrap();
        assert_eq!(rows(&h), (0, 10));
        let snap = &h.snapshot()["site_windows"];
        // Three files were compacted into one as soon as there were three; the fourth came after.
        let two_days_ago = snap.files.iter().filter(|f| f.parent().unwrap().ends_with(format!("date={}", date_of(today - 2 * DAY_NS))));
        let names: Vec<String> = two_days_ago.map(|f| f.file_name().unwrap().to_string_lossy().to_string()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("compacted-")), "{names:?}");
        // Reopened (a restart): the same files and rows.
        let again = History::open(options).unwrap();
        assert_eq!(rows(&again), (0, 10));
        // 29 days on, every file is younger than the retention: nothing goes. 31 days on, the
        // dates past the retention whose files are older than it go.
        h.retain_and_compact(now + chrono::Duration::days(29)).unwrap();
        assert_eq!(rows(&h), (0, 10));
        h.retain_and_compact(now + chrono::Duration::days(31)).unwrap();
        assert_eq!(rows(&h), (0, 0));
        assert!(!dir.path().join("site_windows").join(format!("date={}", date_of(today - 40 * DAY_NS))).exists());
    }

    #[test]
    fn a_corrected_window_replaces_its_rows_in_memory_and_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let options =
            HistoryOptions { dir: Some(dir.path().to_path_buf()), retention_days: 30, compact_min_files: 100, max_memory_rows: 0 };
        let today = chrono::Utc::now().timestamp_nanos_opt().unwrap() / DAY_NS * DAY_NS;
        let h = History::open(options).unwrap();
        h.append("site_windows", &windows(&[today, today + 10]));
        h.flush().unwrap();
        h.append("site_windows", &windows(&[today + 20]));
        // On disk (window `today`) and in memory (window `today + 20`): each replaced once.
        h.replace_window("site_windows", today, &windows(&[today, today])).unwrap();
        h.replace_window("site_windows", today + 20, &windows(&[today + 20, today + 20, today + 20])).unwrap();
        assert_eq!(rows(&h), (5, 1), "window today+10 stays on disk; the corrected rows are in memory");
        h.flush().unwrap();
        assert_eq!(rows(&h), (0, 6));
    }

    fn site_rows(rows: &[(i64, &str, u64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("window_start", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
            Field::new("site", DataType::Utf8, false),
            Field::new("bytes", DataType::UInt64, false),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(TimestampNanosecondArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
            Arc::new(datafusion::arrow::array::StringArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
            Arc::new(UInt64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
        ];
        RecordBatch::try_new(schema, columns).unwrap()
    }

    /// All rows of `site_windows`, memory and disk, sorted.
    fn all_rows(h: &History) -> Vec<(i64, String, u64)> {
        let snap = &h.snapshot()["site_windows"];
        let mut batches = snap.memory.clone();
        for f in &snap.files {
            batches.extend(
                ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).unwrap()).unwrap().build().unwrap().map(|b| b.unwrap()),
            );
        }
        let mut out = Vec::new();
        for b in batches {
            let (w, s, v) = (
                b.column(0).as_primitive::<TimestampNanosecondType>(),
                b.column(1).as_string::<i32>(),
                b.column(2).as_primitive::<datafusion::arrow::datatypes::UInt64Type>(),
            );
            out.extend((0..b.num_rows()).map(|i| (w.value(i), s.value(i).to_string(), v.value(i))));
        }
        out.sort();
        out
    }

    /// Two instances' sites in one window: each replaces only its own sites' rows, on disk and in
    /// memory, and a message read twice changes nothing.
    #[test]
    fn a_window_is_replaced_site_by_site_and_applied_offsets_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let options =
            HistoryOptions { dir: Some(dir.path().to_path_buf()), retention_days: 30, compact_min_files: 100, max_memory_rows: 0 };
        let w = chrono::Utc::now().timestamp_nanos_opt().unwrap() / DAY_NS * DAY_NS;
        let h = History::open(options.clone()).unwrap();
        // This instance's sites a and b; another instance's site c comes in through the topic.
        h.append("site_windows", &site_rows(&[(w, "a", 1), (w, "b", 2), (w + 10, "a", 3)]));
        h.replace_window("site_windows", w, &site_rows(&[(w, "c", 4)])).unwrap();
        h.note_applied("siteflow.windows", 0, 41);
        h.flush().unwrap();
        // A correction of c (on disk now), then of a and b here: no other site's rows move.
        h.replace_window("site_windows", w, &site_rows(&[(w, "c", 5)])).unwrap();
        h.replace_window("site_windows", w, &site_rows(&[(w, "a", 6), (w, "b", 7)])).unwrap();
        h.replace_window("site_windows", w, &site_rows(&[(w, "a", 6), (w, "b", 7)])).unwrap();
        let want = vec![(w, "a".to_string(), 6), (w, "b".to_string(), 7), (w, "c".to_string(), 5), (w + 10, "a".to_string(), 3)];
        assert_eq!(all_rows(&h), want);
        // Offsets are saved with a flush, not before.
        h.note_applied("siteflow.windows", 0, 42);
        h.note_applied("siteflow.windows", 1, 7);
        assert_eq!(History::open(options.clone()).unwrap().applied_offsets("siteflow.windows"), BTreeMap::from([(0, 41)]));
        h.flush().unwrap();
        let again = History::open(options).unwrap();
        assert_eq!(again.applied_offsets("siteflow.windows"), BTreeMap::from([(0, 42), (1, 7)]));
        assert_eq!(all_rows(&again), want);
        assert!(again.applied_offsets("other").is_empty());
    }
}
