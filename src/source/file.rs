//! A finite source: recorded messages from files (a capture replayed without Kafka).
//!
//! JSON formats are one message per line; goflow2 protobuf files are varint length-delimited
//! messages, as goflow2 writes them. Files may be gzip- or zstd-compressed (told by their magic
//! bytes, not their name). Each file has its own format — given, or detected from its first
//! messages — and is its own partition (its own event-time clocks); the files are read side by
//! side, a batch of `batch_messages` from each in turn, as parallel streams arrive from a broker.
//! When every file is read the source ends, and the pipeline flushes every open window: a replay
//! shows all its windows.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::decode::DecodeLimits;
use crate::decode::detect::{Trial, detect, trials};
use crate::source::Source;
use crate::types::{EventTime, Format, Messages, PartitionId, SourceBatch};

/// Messages of each file that detection looks at.
pub const DETECT_SAMPLE: usize = 100;

/// A file that cannot be replayed, named.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid {compression} file: {source}")]
    Decompress { path: PathBuf, compression: &'static str, source: std::io::Error },
    #[error("{path}: byte {offset}: a length prefix runs past the end of the file (not {format})")]
    Truncated { path: PathBuf, offset: usize, format: &'static str },
    #[error("{path}: empty: no message to tell its format from")]
    Empty { path: PathBuf },
    #[error("{path}: {format} cannot be replayed from a file (its messages have no delimiter); use goflow2_protobuf")]
    NotReplayable { path: PathBuf, format: &'static str },
    #[error(
        "{path}: cannot tell its format from its first {sample} messages (give it with --format or `format:`); \
         what each format made of them: {trials}"
    )]
    Undetected { path: PathBuf, sample: usize, trials: String },
}

/// One file to replay: its format (`None`: detected) and which time of a flow is its event time.
#[derive(Debug, Clone, PartialEq)]
pub struct FileInput {
    pub path: PathBuf,
    pub format: Option<Format>,
    pub event_time: EventTime,
}

/// How a file was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Told by the first bytes, so a `.gz` renamed `.json` (or the reverse) still reads.
    fn sniff(data: &[u8]) -> Self {
        if data.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "plain",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// Reads a file whole, decompressed.
fn read_input(path: &Path) -> Result<(Vec<u8>, Compression), FileSourceError> {
    let raw = std::fs::read(path).map_err(|source| FileSourceError::Read { path: path.to_path_buf(), source })?;
    let compression = Compression::sniff(&raw);
    let failed = |source| FileSourceError::Decompress { path: path.to_path_buf(), compression: compression.as_str(), source };
    let data = match compression {
        Compression::None => raw,
        Compression::Gzip => {
            let mut out = Vec::with_capacity(raw.len() * 4);
            // Multi-member: `cat a.gz b.gz` and pigz output are one stream to gzip(1).
            flate2::read::MultiGzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(failed)?;
            out
        }
        Compression::Zstd => zstd::stream::decode_all(&raw[..]).map_err(failed)?,
    };
    Ok((data, compression))
}

/// How a file's bytes are cut into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Lines,
    LengthDelimited,
}

impl Framing {
    fn of(format: Format) -> Self {
        if format == Format::Goflow2Protobuf { Framing::LengthDelimited } else { Framing::Lines }
    }
}

/// Splits `data` into at most `limit` messages.
fn split(path: &Path, data: &[u8], framing: Framing, limit: usize) -> Result<Messages, FileSourceError> {
    let mut messages = Messages::with_capacity((data.len() / 256 + 1).min(limit), data.len().min(limit.saturating_mul(4096)));
    match framing {
        Framing::LengthDelimited => {
            let mut at = 0;
            while at < data.len() && messages.len() < limit {
                let truncated = || FileSourceError::Truncated { path: path.to_path_buf(), offset: at, format: "goflow2_protobuf" };
                let (len, used) = varint(&data[at..]).ok_or_else(truncated)?;
                let end = at.checked_add(used + len).filter(|&e| e <= data.len()).ok_or_else(truncated)?;
                // The decoder of this format reads the length prefix itself.
                messages.push(&data[at..end]);
                at = end;
            }
        }
        Framing::Lines => {
            for line in data.split(|&b| b == b'\n') {
                if messages.len() >= limit {
                    break;
                }
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if !line.iter().all(u8::is_ascii_whitespace) {
                    messages.push(line);
                }
            }
        }
    }
    Ok(messages)
}

/// A protobuf varint: (value, bytes used).
fn varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((usize::try_from(value).ok()?, i + 1));
        }
    }
    None
}

/// The format of a file's first messages: as lines (the JSON formats), else as length-delimited
/// protobuf. The error shows what every format made of the sample.
fn detect_format(path: &Path, data: &[u8], limits: &DecodeLimits) -> Result<Format, FileSourceError> {
    let lines = split(path, data, Framing::Lines, DETECT_SAMPLE)?;
    if lines.is_empty() {
        return Err(FileSourceError::Empty { path: path.to_path_buf() });
    }
    // Protobuf cut at newlines is never a real format: only the JSON formats count as lines.
    if let Some(f) = detect(&lines, limits).filter(|f| Framing::of(*f) == Framing::Lines && *f != Format::Goflow2ProtobufPlain) {
        return Ok(f);
    }
    let delimited = split(path, data, Framing::LengthDelimited, DETECT_SAMPLE).ok();
    if let Some(sample) = &delimited
        && detect(sample, limits) == Some(Format::Goflow2Protobuf)
    {
        return Ok(Format::Goflow2Protobuf);
    }
    let mut shown: Vec<Trial> = trials(&lines, limits)
        .into_iter()
        .filter(|t| !matches!(t.format, Format::Goflow2Protobuf | Format::Goflow2ProtobufPlain))
        .collect();
    if let Some(sample) = &delimited {
        shown.extend(trials(sample, limits).into_iter().filter(|t| t.format == Format::Goflow2Protobuf));
    }
    if !shown.iter().any(|t| t.format == Format::Goflow2Protobuf) {
        shown.push(Trial { format: Format::Goflow2Protobuf, stats: Default::default() });
    }
    shown.sort_by(|a, b| b.share().total_cmp(&a.share()));
    Err(FileSourceError::Undetected { path: path.to_path_buf(), sample: lines.len(), trials: describe(&shown) })
}

/// "goflow2_json decoded 0 % (mostly not_json), …" for an error message.
fn describe(trials: &[Trial]) -> String {
    trials
        .iter()
        .map(|t| {
            let top = t.stats.rejected.iter().max_by_key(|(_, n)| *n).map(|(r, _)| r.as_str());
            let why = match (t.stats.records, top) {
                (0, _) => "no records: a length prefix runs past the end".to_string(),
                (_, Some(reason)) => format!("mostly {reason}"),
                (_, None) => "nothing rejected".to_string(),
            };
            format!("{} decoded {:.0} % ({why})", t.format.as_str(), t.share() * 100.0)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Counters a replay shows while it runs; shared by the source, the pipeline and the reporter.
#[derive(Debug)]
pub struct FileProgress {
    pub messages_total: u64,
    pub bytes_total: u64,
    pub messages_done: AtomicU64,
    pub bytes_done: AtomicU64,
    /// The newest event time the pipeline has seen, in ns (`i64::MIN` before the first record):
    /// the pipeline sets it (`Pipeline::track_event_time`).
    pub newest_event_ns: Arc<AtomicI64>,
}

impl FileProgress {
    pub fn newest_event_ns(&self) -> Option<i64> {
        Some(self.newest_event_ns.load(Ordering::Relaxed)).filter(|&t| t != i64::MIN)
    }
}

/// The messages of one file, split, and how many were handed out.
struct FileMessages {
    path: PathBuf,
    format: Format,
    event_time: EventTime,
    compression: Compression,
    messages: Messages,
    next: usize,
}

/// Holds batches back so that event time advances `speed` times as fast as the wall clock.
#[derive(Debug)]
struct Pacing {
    speed: f64,
    /// When the first event time was known, and that event time.
    anchor: Option<(tokio::time::Instant, i64)>,
}

impl Pacing {
    /// When the data up to `newest_ns` is due; `None` before the first event time.
    fn due(&mut self, newest_ns: Option<i64>) -> Option<tokio::time::Instant> {
        let newest = newest_ns?;
        let (wall, event) = *self.anchor.get_or_insert((tokio::time::Instant::now(), newest));
        let ahead_secs = newest.saturating_sub(event) as f64 / 1e9 / self.speed;
        Some(wall + Duration::from_secs_f64(ahead_secs.clamp(0.0, 1e9)))
    }
}

/// Replays files, each as its own partition in its own format.
pub struct FileSource {
    files: Vec<(PartitionId, FileMessages)>,
    /// The file whose turn it is.
    turn: usize,
    batch_messages: usize,
    progress: Arc<FileProgress>,
    pacing: Option<Pacing>,
}

impl FileSource {
    /// Reads, decompresses, detects and splits every file first, so a bad file is reported
    /// before anything runs. `limits` judge the detection sample as the pipeline would.
    pub fn open(inputs: &[FileInput], limits: &DecodeLimits, batch_messages: usize) -> Result<Self, FileSourceError> {
        let mut files = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            let path = &input.path;
            let (data, compression) = read_input(path)?;
            let format = match input.format {
                Some(Format::Goflow2ProtobufPlain) => {
                    return Err(FileSourceError::NotReplayable { path: path.clone(), format: Format::Goflow2ProtobufPlain.as_str() });
                }
                Some(f) => f,
                None => detect_format(path, &data, limits)?,
            };
            let messages = split(path, &data, Framing::of(format), usize::MAX)?;
            let file = FileMessages { path: path.clone(), format, event_time: input.event_time, compression, messages, next: 0 };
            files.push((i as PartitionId, file));
        }
        let progress = Arc::new(FileProgress {
            messages_total: files.iter().map(|(_, f)| f.messages.len() as u64).sum(),
            bytes_total: files.iter().map(|(_, f)| f.messages.total_bytes() as u64).sum(),
            messages_done: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            newest_event_ns: Arc::new(AtomicI64::new(i64::MIN)),
        });
        Ok(Self { files, turn: 0, batch_messages: batch_messages.max(1), progress, pacing: None })
    }

    /// Paces the replay: `speed` seconds of event time per second (1: as recorded). Batches get
    /// small so that no batch jumps far ahead in event time.
    pub fn pace(&mut self, speed: f64) {
        self.pacing = Some(Pacing { speed: speed.max(1e-6), anchor: None });
        self.batch_messages = self.batch_messages.min(100);
    }

    /// Messages in all files.
    pub fn total_messages(&self) -> usize {
        self.files.iter().map(|(_, f)| f.messages.len()).sum()
    }

    /// What the source has handed out so far (and the event time the pipeline reached).
    pub fn progress(&self) -> Arc<FileProgress> {
        self.progress.clone()
    }

    /// Each file with its format, how it was stored and its message count.
    pub fn describe_files(&self) -> Vec<(PathBuf, Format, Compression, usize)> {
        self.files.iter().map(|(_, f)| (f.path.clone(), f.format, f.compression, f.messages.len())).collect()
    }

    /// The formats of the files, each once.
    pub fn formats(&self) -> Vec<Format> {
        let mut formats: Vec<Format> = Vec::new();
        for (_, f) in &self.files {
            if !formats.contains(&f.format) {
                formats.push(f.format);
            }
        }
        formats
    }

    fn next_sync(&mut self) -> Option<SourceBatch> {
        for _ in 0..self.files.len() {
            let turn = self.turn;
            self.turn = (turn + 1) % self.files.len();
            let (partition, f) = &mut self.files[turn];
            if f.next >= f.messages.len() {
                continue;
            }
            let end = (f.next + self.batch_messages).min(f.messages.len());
            let mut batch = Messages::with_capacity(end - f.next, 0);
            for i in f.next..end {
                batch.push(f.messages.get(i).expect("index below len"));
            }
            f.next = end;
            self.progress.messages_done.fetch_add(batch.len() as u64, Ordering::Relaxed);
            self.progress.bytes_done.fetch_add(batch.total_bytes() as u64, Ordering::Relaxed);
            return Some(SourceBatch {
                partition: *partition,
                format: f.format,
                event_time: f.event_time,
                messages: batch,
                received: Instant::now(),
                offsets: Vec::new(),
            });
        }
        None
    }
}

impl Source for FileSource {
    fn partitions(&self) -> Vec<PartitionId> {
        self.files.iter().map(|(p, _)| *p).collect()
    }

    async fn next_batch(&mut self) -> Option<SourceBatch> {
        // Paced: the batches so far are processed when this is called; wait until their event
        // time is due (also after the last one, so the whole replay takes its time). Dropping
        // this future while it waits loses nothing: no batch was taken yet.
        if let Some(due) = self.pacing.as_mut().and_then(|p| p.due(self.progress.newest_event_ns())) {
            tokio::time::sleep_until(due).await;
        }
        // Let the pipeline's timers and signals run between batches of a fast replay.
        tokio::task::yield_now().await;
        self.next_sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DecodeLimits {
        DecodeLimits {
            max_message_bytes: 1 << 20,
            max_bytes_per_record: 1 << 40,
            min_time_ns: DecodeLimits::MIN_TIME_NS,
            max_time_ns: i64::MAX,
        }
    }

    fn input(path: &Path, format: Option<Format>) -> FileInput {
        FileInput { path: path.to_path_buf(), format, event_time: EventTime::FlowEnd }
    }

    const GOFLOW2: &str = r#"{"type":"NETFLOW_V9","time_received_ns":1764000000500000000,"sampling_rate":100,"sampler_address":"172.16.2.21","time_flow_start_ns":1764000000000000000,"time_flow_end_ns":1764000000400000000,"bytes":1500,"packets":3,"src_addr":"10.2.21.5","dst_addr":"203.0.113.9","etype":"IPv4","proto":"TCP","src_port":51000,"dst_port":443,"in_if":1,"out_if":2}"#;
    const PMACCT: &str = r#"{"event_type":"purge","peer_ip_src":"172.16.2.21","ip_src":"203.0.113.9","ip_dst":"10.2.21.5","port_src":443,"port_dst":51000,"ip_proto":"tcp","timestamp_start":"1764000000.000000","timestamp_end":"1764000000.400000","packets":3,"bytes":1500}"#;

    #[test]
    fn json_files_are_split_by_line_and_protobuf_by_length_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("a.json");
        std::fs::write(&json, b"{\"a\":1}\n\n{\"a\":2}\r\n{\"a\":3}").unwrap();
        let pb = dir.path().join("b.bin");
        std::fs::write(&pb, [2u8, 8, 1, 0, 1, 9]).unwrap();
        let mut s = FileSource::open(&[input(&json, Some(Format::Goflow2Json))], &limits(), 2).unwrap();
        assert_eq!(s.total_messages(), 3);
        let first = s.next_sync().unwrap();
        assert_eq!(first.messages.iter().collect::<Vec<_>>(), vec![&b"{\"a\":1}"[..], &b"{\"a\":2}"[..]]);
        assert_eq!(s.next_sync().unwrap().messages.len(), 1);
        assert!(s.next_sync().is_none());
        assert_eq!(s.progress().messages_done.load(Ordering::Relaxed), 3);
        let mut s = FileSource::open(&[input(&pb, Some(Format::Goflow2Protobuf))], &limits(), 10).unwrap();
        assert_eq!(s.next_sync().unwrap().messages.iter().collect::<Vec<_>>(), vec![&[2u8, 8, 1][..], &[0u8][..], &[1u8, 9][..]]);
        std::fs::write(&pb, [5u8, 1]).unwrap();
        let err = FileSource::open(&[input(&pb, Some(Format::Goflow2Protobuf))], &limits(), 10).err().unwrap().to_string();
        assert!(err.contains("b.bin: byte 0"), "{err}");
    }

    #[test]
    fn compressed_files_are_read_by_their_magic_bytes_whatever_their_name() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{GOFLOW2}\n{GOFLOW2}\n");
        let gz = dir.path().join("flows.json");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(text.as_bytes()).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        let zst = dir.path().join("flows.zst");
        std::fs::write(&zst, zstd::stream::encode_all(format!("{PMACCT}\n").as_bytes(), 1).unwrap()).unwrap();
        let s = FileSource::open(&[input(&gz, None), input(&zst, None)], &limits(), 10).unwrap();
        let files = s.describe_files();
        assert_eq!((files[0].1, files[0].2, files[0].3), (Format::Goflow2Json, Compression::Gzip, 2));
        assert_eq!((files[1].1, files[1].2, files[1].3), (Format::PmacctJson, Compression::Zstd, 1));
        assert_eq!(s.formats(), vec![Format::Goflow2Json, Format::PmacctJson]);
        // A cut-off gzip file is named, as a gzip file.
        let cut = dir.path().join("cut.json.gz");
        let whole = std::fs::read(&gz).unwrap();
        std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
        let err = FileSource::open(&[input(&cut, None)], &limits(), 10).err().unwrap().to_string();
        assert!(err.contains("cut.json.gz: not a valid gzip file"), "{err}");
    }

    #[test]
    fn protobuf_files_are_detected_and_garbage_is_explained() {
        use prost::Message as _;
        let dir = tempfile::tempdir().unwrap();
        let flow = crate::decode::goflow2_pb::FlowMessage {
            time_received_ns: 1_764_000_000_000_000_000,
            time_flow_end_ns: 1_764_000_000_000_000_000,
            bytes: 1500,
            packets: 1,
            src_addr: vec![10, 1, 0, 5],
            dst_addr: vec![8, 8, 8, 8],
            sampler_address: vec![10, 0, 0, 1],
            ..Default::default()
        };
        let mut data = Vec::new();
        for _ in 0..3 {
            data.extend(flow.encode_length_delimited_to_vec());
        }
        let pb = dir.path().join("flows.bin");
        std::fs::write(&pb, &data).unwrap();
        let s = FileSource::open(&[input(&pb, None)], &limits(), 10).unwrap();
        assert_eq!((s.describe_files()[0].1, s.total_messages()), (Format::Goflow2Protobuf, 3));

        let junk = dir.path().join("junk.txt");
        std::fs::write(&junk, "hello\nworld\n").unwrap();
        let err = FileSource::open(&[input(&junk, None)], &limits(), 10).err().unwrap().to_string();
        assert!(err.starts_with(&format!("{}: cannot tell its format", junk.display())), "{err}");
        assert!(err.contains("goflow2_json decoded 0 % (mostly not_json)"), "{err}");
        assert!(err.contains("goflow2_protobuf decoded 0 %"), "{err}");
        let empty = dir.path().join("empty.json");
        std::fs::write(&empty, "\n").unwrap();
        let err = FileSource::open(&[input(&empty, None)], &limits(), 10).err().unwrap().to_string();
        assert!(err.ends_with("empty.json: empty: no message to tell its format from"), "{err}");
        assert_eq!(FileSource::open(&[input(&empty, Some(Format::PmacctJson))], &limits(), 10).unwrap().total_messages(), 0);
        let err = FileSource::open(&[input(&junk, Some(Format::Goflow2ProtobufPlain))], &limits(), 10).err().unwrap().to_string();
        assert!(err.contains("use goflow2_protobuf"), "{err}");
    }

    #[test]
    fn pacing_is_due_by_event_time_over_speed() {
        let mut p = Pacing { speed: 10.0, anchor: None };
        assert!(p.due(None).is_none());
        let start = p.due(Some(1_000_000_000_000)).unwrap();
        let later = p.due(Some(1_000_000_000_000 + 20_000_000_000)).unwrap();
        assert_eq!(later - start, Duration::from_secs(2));
        // Older data than the anchor is due at once.
        assert_eq!(p.due(Some(0)).unwrap(), start);
    }
}
