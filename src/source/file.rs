//! A finite source: recorded messages from files (a capture replayed without Kafka).
//!
//! JSON formats are one message per line; goflow2 protobuf files are varint length-delimited
//! messages, as goflow2 writes them. Each file is its own partition (its own event-time clocks);
//! the files are read side by side, a batch of `batch_messages` from each in turn, as parallel
//! streams arrive from a broker. When every file is read the source ends, and the pipeline
//! flushes every open window: a replay shows all its windows.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::decode::Format;
use crate::event_time::EventTime;
use crate::source::{Messages, PartitionId, Source, SourceBatch};

/// A file that cannot be replayed, named.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: byte {offset}: a length prefix runs past the end of the file (not {format})")]
    Truncated { path: PathBuf, offset: usize, format: &'static str },
}

/// The messages of one file, split, and how many were handed out.
struct FileMessages {
    messages: Messages,
    next: usize,
}

/// Reads each file whole and splits it into messages.
fn split(path: &Path, format: Format) -> Result<FileMessages, FileSourceError> {
    let data = std::fs::read(path).map_err(|source| FileSourceError::Read { path: path.to_path_buf(), source })?;
    let mut messages = Messages::with_capacity(data.len() / 256 + 1, data.len());
    if format == Format::Goflow2Protobuf {
        let mut at = 0;
        while at < data.len() {
            let (len, used) =
                varint(&data[at..]).ok_or(FileSourceError::Truncated { path: path.to_path_buf(), offset: at, format: format.as_str() })?;
            let end = at + used + len;
            if end > data.len() {
                return Err(FileSourceError::Truncated { path: path.to_path_buf(), offset: at, format: format.as_str() });
            }
            // The decoder of this format reads the length prefix itself.
            messages.push(&data[at..end]);
            at = end;
        }
    } else {
        for line in data.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if !line.iter().all(u8::is_ascii_whitespace) {
                messages.push(line);
            }
        }
    }
    Ok(FileMessages { messages, next: 0 })
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

/// Replays files of one format, each as its own partition.
pub struct FileSource {
    format: Format,
    event_time: EventTime,
    files: Vec<(PartitionId, FileMessages)>,
    /// The file whose turn it is.
    turn: usize,
    batch_messages: usize,
}

impl FileSource {
    /// Opens and splits every file first, so a bad file is reported before anything runs.
    pub fn open(paths: &[PathBuf], format: Format, event_time: EventTime, batch_messages: usize) -> Result<Self, FileSourceError> {
        let files = paths.iter().enumerate().map(|(i, p)| Ok((i as PartitionId, split(p, format)?))).collect::<Result<_, _>>()?;
        Ok(Self { format, event_time, files, turn: 0, batch_messages: batch_messages.max(1) })
    }

    /// Messages in all files.
    pub fn total_messages(&self) -> usize {
        self.files.iter().map(|(_, f)| f.messages.len()).sum()
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
            return Some(SourceBatch {
                partition: *partition,
                format: self.format,
                event_time: self.event_time,
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
        // Let the pipeline's timers and signals run between batches of a fast replay.
        tokio::task::yield_now().await;
        self.next_sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_files_are_split_by_line_and_protobuf_by_length_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("a.json");
        std::fs::write(&json, b"{\"a\":1}\n\n{\"a\":2}\r\n{\"a\":3}").unwrap();
        let pb = dir.path().join("b.bin");
        std::fs::write(&pb, [2u8, 8, 1, 0, 1, 9]).unwrap();
        let mut s = FileSource::open(std::slice::from_ref(&json), Format::Goflow2Json, EventTime::FlowEnd, 2).unwrap();
        assert_eq!(s.total_messages(), 3);
        let first = s.next_sync().unwrap();
        assert_eq!(first.messages.iter().collect::<Vec<_>>(), vec![&b"{\"a\":1}"[..], &b"{\"a\":2}"[..]]);
        assert_eq!(s.next_sync().unwrap().messages.len(), 1);
        assert!(s.next_sync().is_none());
        let mut s = FileSource::open(std::slice::from_ref(&pb), Format::Goflow2Protobuf, EventTime::FlowEnd, 10).unwrap();
        assert_eq!(s.next_sync().unwrap().messages.iter().collect::<Vec<_>>(), vec![&[2u8, 8, 1][..], &[0u8][..], &[1u8, 9][..]]);
        std::fs::write(&pb, [5u8, 1]).unwrap();
        let err = FileSource::open(&[pb], Format::Goflow2Protobuf, EventTime::FlowEnd, 10).err().unwrap().to_string();
        assert!(err.contains("b.bin: byte 0"), "{err}");
    }
}
