//! Checkpoints and results logs, one of each per input partition.
//!
//! A partition's checkpoint holds the offset to resume from, its event-time clock, its open
//! window states (Arrow IPC) and, per table, the length its results log had. Its results log
//! holds one JSON line per output row of each window the partition contributed to. Restoring a
//! partition truncates its logs to the checkpointed lengths and replays its input from the
//! checkpointed offset, so every input record reaches the logs exactly once, whichever instance
//! of the group owns the partition, and however often instances crash.
//!
//! Layout under the checkpoint directory:
//! `state/<topic>/<partition>.ckpt` and `results/<table>/<topic>/<partition>.jsonl`.
//! Files are replaced atomically (write, fsync, rename, fsync the directory).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::json::LineDelimitedWriter;
use serde::{Deserialize, Serialize};

use crate::rates::CounterBaseline;

const MAGIC: &[u8; 8] = b"SFCKPT1\n";

/// A checkpoint that cannot be written or read, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint {path}: {message}")]
pub struct CheckpointError {
    pub path: PathBuf,
    pub message: String,
}

fn err(path: &Path, message: impl ToString) -> CheckpointError {
    CheckpointError { path: path.to_path_buf(), message: message.to_string() }
}

/// A Kafka partition: topic and partition number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PartitionKey {
    pub topic: String,
    pub partition: i32,
}

impl std::fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// The small part of a checkpoint, stored as JSON in front of the window states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Header {
    topic: String,
    partition: i32,
    next_offset: i64,
    max_event_ns: Option<i64>,
    /// Results log length per table name, in bytes.
    results_len: BTreeMap<String, u64>,
    tables: Vec<String>,
    written_unix_ms: i64,
    /// Last interface counter samples (absent in checkpoints of older versions).
    #[serde(default)]
    counters: Vec<CounterBaseline>,
    /// Per-exporter clocks: exporter address (as text) → largest event time (absent in
    /// checkpoints of older versions: one clock for the partition).
    #[serde(default)]
    clocks: Vec<(String, i64)>,
    /// The internal partition of each message in the outbox (after the states).
    #[serde(default)]
    outbox: Vec<i32>,
    /// The site stage: which spans of each source partition were merged.
    #[serde(default)]
    ledger: Option<serde_json::Value>,
    /// The site stage: how many encoded partials of open states follow the outbox.
    #[serde(default)]
    sources: usize,
}

/// One partition's saved state.
#[derive(Debug, Clone)]
pub struct PartitionCheckpoint {
    /// The first offset not covered by this checkpoint.
    pub next_offset: i64,
    pub max_event_ns: Option<i64>,
    /// Per table (in the operator's order): results log length at the checkpoint.
    pub results_len: Vec<u64>,
    /// Per table: the partition's open window states.
    pub states: Vec<Vec<RecordBatch>>,
    /// The partition's last interface counter samples (the baselines of the next deltas).
    pub counters: Vec<CounterBaseline>,
    /// The partition's event-time clocks: (exporter, largest event time).
    pub clocks: Vec<(crate::window::ExporterKey, i64)>,
    /// The ingest stage of a scale-out deployment: messages for the internal topic (its
    /// partition, the encoded partial) written with the checkpoint and produced after it, so
    /// that a crash after the checkpoint sends them again, unchanged (docs/scale-out.md).
    pub outbox: Vec<(i32, Vec<u8>)>,
    /// The site stage of a scale-out, for one internal partition: the ledger of the spans
    /// merged, and per source partition its open states and clocks as an encoded partial.
    pub site_stage: Option<SiteStageState>,
}

/// What a site-stage checkpoint of one internal partition adds (docs/scale-out.md).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SiteStageState {
    /// The ledger of the spans merged, as the site stage serialises it.
    pub ledger: serde_json::Value,
    pub sources: Vec<Vec<u8>>,
}

/// The checkpoint directory.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
    /// Table names, in the window operator's order.
    tables: Vec<String>,
}

fn safe(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect()
}

/// Writes `bytes` to `path` atomically.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let dir = path.parent().expect("checkpoint paths have a parent");
    fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| err(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| err(path, e))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| err(dir, e))
}

impl CheckpointStore {
    pub fn open(dir: &Path, tables: Vec<String>) -> Result<Self, CheckpointError> {
        fs::create_dir_all(dir.join("state")).map_err(|e| err(dir, format!("cannot create: {e}")))?;
        Ok(Self { dir: dir.to_path_buf(), tables })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state_path(&self, key: &PartitionKey) -> PathBuf {
        self.dir.join("state").join(safe(&key.topic)).join(format!("{}.ckpt", key.partition))
    }

    /// The results log of `table` for a partition.
    pub fn results_path(&self, table: usize, key: &PartitionKey) -> PathBuf {
        self.dir.join("results").join(safe(&self.tables[table])).join(safe(&key.topic)).join(format!("{}.jsonl", key.partition))
    }

    /// The offset a partition resumes from, if it has a checkpoint (read by the consumer on assignment).
    pub fn next_offset(&self, key: &PartitionKey) -> Result<Option<i64>, CheckpointError> {
        let path = self.state_path(key);
        if !path.exists() {
            return Ok(None);
        }
        let (header, _) = self.read_header(&path)?;
        Ok(Some(header.next_offset))
    }

    fn read_header(&self, path: &Path) -> Result<(Header, Vec<u8>), CheckpointError> {
        let mut bytes = Vec::new();
        File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(|e| err(path, e))?;
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(err(path, "not a siteflow checkpoint (bad magic)"));
        }
        let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        let header_bytes = bytes.get(12..12 + len).ok_or_else(|| err(path, "truncated header"))?;
        let header: Header = serde_json::from_slice(header_bytes).map_err(|e| err(path, format!("bad header: {e}")))?;
        let rest = bytes[12 + len..].to_vec();
        Ok((header, rest))
    }

    /// Loads a partition's checkpoint, reading states with the operator's state schemas.
    pub fn load(&self, key: &PartitionKey, schemas: &[SchemaRef]) -> Result<Option<PartitionCheckpoint>, CheckpointError> {
        let path = self.state_path(key);
        if !path.exists() {
            return Ok(None);
        }
        let (header, rest) = self.read_header(&path)?;
        if header.tables != self.tables {
            return Err(err(&path, format!("written for tables {:?}, this pipeline has {:?}", header.tables, self.tables)));
        }
        let mut states = Vec::with_capacity(schemas.len());
        let mut at = 0usize;
        for schema in schemas {
            let len_bytes = rest.get(at..at + 8).ok_or_else(|| err(&path, "truncated states"))?;
            let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
            let ipc = rest.get(at + 8..at + 8 + len).ok_or_else(|| err(&path, "truncated states"))?;
            at += 8 + len;
            let reader = StreamReader::try_new(ipc, None).map_err(|e| err(&path, e))?;
            if reader.schema().fields() != schema.fields() {
                return Err(err(&path, "window state schema differs from this pipeline's SQL (was the SQL changed?)"));
            }
            let batches = reader.collect::<Result<Vec<_>, _>>().map_err(|e| err(&path, e))?;
            states.push(batches);
        }
        let mut outbox = Vec::with_capacity(header.outbox.len());
        for &partition in &header.outbox {
            let len_bytes = rest.get(at..at + 8).ok_or_else(|| err(&path, "truncated outbox"))?;
            let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
            let message = rest.get(at + 8..at + 8 + len).ok_or_else(|| err(&path, "truncated outbox"))?;
            at += 8 + len;
            outbox.push((partition, message.to_vec()));
        }
        let site_stage = match header.ledger {
            None => None,
            Some(ledger) => {
                let mut sources = Vec::with_capacity(header.sources);
                for _ in 0..header.sources {
                    let len_bytes = rest.get(at..at + 8).ok_or_else(|| err(&path, "truncated sources"))?;
                    let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
                    let source = rest.get(at + 8..at + 8 + len).ok_or_else(|| err(&path, "truncated sources"))?;
                    at += 8 + len;
                    sources.push(source.to_vec());
                }
                Some(SiteStageState { ledger, sources })
            }
        };
        let results_len = self.tables.iter().map(|t| header.results_len.get(t).copied().unwrap_or(0)).collect();
        Ok(Some(PartitionCheckpoint {
            next_offset: header.next_offset,
            max_event_ns: header.max_event_ns,
            results_len,
            states,
            counters: header.counters,
            clocks: header.clocks.iter().filter_map(|(e, t)| e.parse::<std::net::Ipv6Addr>().ok().map(|a| (u128::from(a), *t))).collect(),
            outbox,
            site_stage,
        }))
    }

    /// Writes a partition's checkpoint atomically. Its results logs must already be synced.
    pub fn save(&self, key: &PartitionKey, ckpt: &PartitionCheckpoint, schemas: &[SchemaRef]) -> Result<(), CheckpointError> {
        let path = self.state_path(key);
        let header = Header {
            topic: key.topic.clone(),
            partition: key.partition,
            next_offset: ckpt.next_offset,
            max_event_ns: ckpt.max_event_ns,
            results_len: self.tables.iter().cloned().zip(ckpt.results_len.iter().copied()).collect(),
            tables: self.tables.clone(),
            written_unix_ms: chrono::Utc::now().timestamp_millis(),
            counters: ckpt.counters.clone(),
            clocks: ckpt.clocks.iter().map(|(e, t)| (std::net::Ipv6Addr::from(*e).to_string(), *t)).collect(),
            outbox: ckpt.outbox.iter().map(|(p, _)| *p).collect(),
            ledger: ckpt.site_stage.as_ref().map(|s| s.ledger.clone()),
            sources: ckpt.site_stage.as_ref().map_or(0, |s| s.sources.len()),
        };
        let header = serde_json::to_vec(&header).expect("header serialises");
        let mut bytes = Vec::with_capacity(4096);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&header);
        for (schema, batches) in schemas.iter().zip(&ckpt.states) {
            let mut ipc = Vec::new();
            {
                let mut w = StreamWriter::try_new(&mut ipc, schema).map_err(|e| err(&path, e))?;
                for b in batches {
                    w.write(b).map_err(|e| err(&path, e))?;
                }
                w.finish().map_err(|e| err(&path, e))?;
            }
            bytes.extend_from_slice(&(ipc.len() as u64).to_le_bytes());
            bytes.extend_from_slice(&ipc);
        }
        let sources = ckpt.site_stage.iter().flat_map(|s| &s.sources);
        for message in ckpt.outbox.iter().map(|(_, m)| m).chain(sources) {
            bytes.extend_from_slice(&(message.len() as u64).to_le_bytes());
            bytes.extend_from_slice(message);
        }
        replace_file(&path, &bytes)
    }

    /// Appends rows to a partition's results log; returns the log's new length.
    pub fn append_results(&self, table: usize, key: &PartitionKey, rows: &RecordBatch) -> Result<u64, CheckpointError> {
        let path = self.results_path(table, key);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
        }
        let mut f = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| err(&path, e))?;
        if rows.num_rows() > 0 {
            let mut buf = Vec::new();
            let mut w = LineDelimitedWriter::new(&mut buf);
            w.write(rows).map_err(|e| err(&path, e))?;
            w.finish().map_err(|e| err(&path, e))?;
            f.write_all(&buf).map_err(|e| err(&path, e))?;
        }
        f.metadata().map(|m| m.len()).map_err(|e| err(&path, e))
    }

    /// Syncs a partition's results log to disk and returns its length (0 if it does not exist).
    pub fn sync_results(&self, table: usize, key: &PartitionKey) -> Result<u64, CheckpointError> {
        let path = self.results_path(table, key);
        match File::options().append(true).open(&path) {
            Ok(f) => {
                f.sync_all().map_err(|e| err(&path, e))?;
                f.metadata().map(|m| m.len()).map_err(|e| err(&path, e))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(err(&path, e)),
        }
    }

    /// Cuts a partition's results log back to `len` bytes: rows written after the checkpoint
    /// are produced again by the replay.
    pub fn truncate_results(&self, table: usize, key: &PartitionKey, len: u64) -> Result<(), CheckpointError> {
        let path = self.results_path(table, key);
        match File::options().write(true).open(&path) {
            Ok(f) => {
                let current = f.metadata().map_err(|e| err(&path, e))?.len();
                if current < len {
                    return Err(err(&path, format!("results log is {current} bytes, shorter than its checkpoint says ({len})")));
                }
                f.set_len(len).and_then(|_| f.sync_all()).map_err(|e| err(&path, e))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && len == 0 => Ok(()),
            Err(e) => Err(err(&path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("site", DataType::Utf8, false), Field::new("bytes", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(vec!["HG-001"])), Arc::new(Int64Array::from(vec![n]))]).unwrap()
    }

    #[test]
    fn round_trip_and_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path(), vec!["flows".into()]).unwrap();
        let key = PartitionKey { topic: "flows/raw".into(), partition: 3 };
        assert!(store.load(&key, &[batch(1).schema()]).unwrap().is_none());
        let len1 = store.append_results(0, &key, &batch(10)).unwrap();
        assert_eq!(store.sync_results(0, &key).unwrap(), len1);
        let counters =
            vec![CounterBaseline { device: "r1".into(), interface: "eth0".into(), direction: "in".into(), time_ns: 9, value: 1 << 40 }];
        let ckpt = PartitionCheckpoint {
            next_offset: 42,
            max_event_ns: Some(7),
            results_len: vec![len1],
            states: vec![vec![batch(5)]],
            counters,
            clocks: vec![(0xac10_0215, 7), (0, 5)],
            outbox: vec![(2, b"partial for 2".to_vec()), (0, Vec::new())],
            site_stage: Some(SiteStageState { ledger: serde_json::json!({"merged": {}}), sources: vec![b"open states".to_vec(), vec![]] }),
        };
        store.save(&key, &ckpt, &[batch(1).schema()]).unwrap();
        let len2 = store.append_results(0, &key, &batch(20)).unwrap();
        assert!(len2 > len1);
        let back = store.load(&key, &[batch(1).schema()]).unwrap().unwrap();
        assert_eq!((back.next_offset, back.max_event_ns, back.results_len.clone()), (42, Some(7), vec![len1]));
        assert_eq!(back.states[0], vec![batch(5)]);
        assert_eq!(back.counters, ckpt.counters);
        assert_eq!(back.clocks, ckpt.clocks);
        assert_eq!(back.outbox, ckpt.outbox);
        assert_eq!(back.site_stage, ckpt.site_stage);
        assert_eq!(store.next_offset(&key).unwrap(), Some(42));
        store.truncate_results(0, &key, back.results_len[0]).unwrap();
        let text = fs::read_to_string(store.results_path(0, &key)).unwrap();
        assert_eq!(text, "{\"site\":\"HG-001\",\"bytes\":10}\n");
    }

    #[test]
    fn corrupt_checkpoint_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path(), vec!["flows".into()]).unwrap();
        let key = PartitionKey { topic: "t".into(), partition: 0 };
        let path = store.state_path(&key);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"garbage").unwrap();
        let e = store.load(&key, &[batch(1).schema()]).unwrap_err().to_string();
        assert!(e.contains("0.ckpt") && e.contains("bad magic"), "{e}");
    }
}
