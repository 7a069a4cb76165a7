//! The source's file adapter for the chained runner: the lines of an
//! `sdk-events.tsv` file, cut into chunks of whole lines and parsed into raw
//! batches by key group, each chunk with the [`FilePosition`] after it.
//!
//! The file is checked against the committed position before anything is
//! read: a state is never resumed over another input (the fingerprint of
//! what it consumed must match), which would silently skip or double-count
//! records.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_model::batch::RawBatch;
use sluice_model::key_group::KeyGroups;
use sluice_model::lineage::Lineage;
use sluice_runtime::runner::chained::{ChainError, Input, Next, Parsed, Position};

use crate::batcher::Batcher;
use crate::framing::{count_lines, lines, split_record};
use crate::position::{FINGERPRINT_BYTES, FilePosition, fingerprint};

/// What can go wrong with the input file.
#[derive(Debug, thiserror::Error)]
pub enum FileInputError {
    /// Opening, reading or seeking failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The state was made from another file.
    #[error(
        "the state was made from a different input than {} (it consumed {consumed} bytes of another file)",
        path.display()
    )]
    DifferentInput {
        /// The file given now.
        path: PathBuf,
        /// Bytes the state consumed of its input.
        consumed: u64,
    },
}

impl From<FileInputError> for ChainError {
    fn from(e: FileInputError) -> Self {
        ChainError::Input(Box::new(e))
    }
}

impl Position for FilePosition {
    fn bytes(&self) -> u64 {
        self.offset
    }
}

/// Whole lines of the input, and the line number of the first.
pub struct LineChunk {
    first_line: u64,
    bytes: Vec<u8>,
}

/// The lines of one file from a committed position on.
pub struct FileInput {
    file: File,
    path: PathBuf,
    /// The first [`FINGERPRINT_BYTES`] of the file.
    head: Vec<u8>,
    /// After the last chunk read.
    at: FilePosition,
    /// The start of a line cut off by the last chunk.
    carry: Vec<u8>,
    total: u64,
    eof: bool,
    chunk_bytes: usize,
    pause: Duration,
}

impl FileInput {
    /// Open `path` to read on from `start`, in chunks of at least
    /// `chunk_bytes` (a long line makes a long chunk), sleeping `pause`
    /// after each (for tests and demos of a slow input).
    pub fn open(path: &Path, start: FilePosition, chunk_bytes: usize, pause: Duration) -> Result<Self, FileInputError> {
        let io = |what| move |source| FileInputError::Io { what, path: path.to_path_buf(), source };
        let mut file = File::open(path).map_err(io("opening"))?;
        let total = file.metadata().map_err(io("reading"))?.len();
        let mut head = vec![0u8; FINGERPRINT_BYTES.min(total) as usize];
        file.read_exact(&mut head).map_err(io("reading"))?;
        if start.offset > 0 {
            let covered = start.offset.min(FINGERPRINT_BYTES) as usize;
            if start.offset > total || fingerprint(&head[..covered]) != start.fingerprint {
                return Err(FileInputError::DifferentInput { path: path.to_path_buf(), consumed: start.offset });
            }
        }
        file.seek(SeekFrom::Start(start.offset)).map_err(io("seeking to the committed position in"))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            head,
            at: start,
            carry: Vec::new(),
            total,
            eof: false,
            chunk_bytes,
            pause,
        })
    }

    /// Fill a buffer to at least `chunk_bytes`, and on until a line ends.
    fn fill(&mut self) -> Result<Vec<u8>, FileInputError> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.reserve(self.chunk_bytes);
        loop {
            let filled = buf.len();
            // `read_to_end` appends without zero-filling the buffer first.
            let want = self.chunk_bytes.max(64 * 1024) as u64;
            let n = (&mut self.file).take(want).read_to_end(&mut buf).map_err(|source| FileInputError::Io {
                what: "reading",
                path: self.path.clone(),
                source,
            })?;
            if n == 0 {
                self.eof = true;
                return Ok(buf);
            }
            if buf.len() >= self.chunk_bytes && buf[filled..].contains(&b'\n') {
                return Ok(buf);
            }
        }
    }
}

impl Input for FileInput {
    type Chunk = LineChunk;
    type Position = FilePosition;
    const POSITION_KEY: &'static str = "source/file-position";

    fn read(&mut self) -> Result<Option<Next<Self>>, ChainError> {
        while !self.eof {
            let mut buf = self.fill()?;
            let cut =
                if self.eof { buf.len() } else { buf.iter().rposition(|&b| b == b'\n').map_or(buf.len(), |i| i + 1) };
            self.carry = buf.split_off(cut);
            if buf.is_empty() {
                continue;
            }
            let first_line = self.at.line;
            self.at.offset += buf.len() as u64;
            self.at.line += count_lines(&buf);
            self.at.fingerprint = fingerprint(&self.head[..self.at.offset.min(FINGERPRINT_BYTES) as usize]);
            if !self.pause.is_zero() {
                std::thread::sleep(self.pause);
            }
            return Ok(Some((LineChunk { first_line, bytes: buf }, self.at)));
        }
        Ok(None)
    }

    fn position(&self) -> FilePosition {
        self.at
    }

    fn total_bytes(&self) -> u64 {
        self.total
    }

    fn describe(chunk: &LineChunk) -> String {
        format!("the chunk starting at line {}", chunk.first_line)
    }
}

/// A parser of line chunks into raw batches by key group (the source
/// stage's work), one per parser thread: each line is a KEY/VALUE record
/// whose lineage is its line number.
pub fn line_parser(key_groups: KeyGroups) -> impl FnMut(LineChunk) -> Parsed<RawBatch> + Send + 'static {
    let mut batcher = Batcher::new(key_groups);
    move |chunk| {
        let mut records = 0u64;
        for (i, line) in lines(&chunk.bytes).enumerate() {
            let (key, value) = split_record(line);
            batcher.push(Lineage::line(chunk.first_line + i as u64), key, value);
            records += 1;
        }
        Parsed { records, batches: batcher.take() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(input: &mut FileInput) -> Result<Vec<(String, FilePosition)>, ChainError> {
        let mut all = Vec::new();
        while let Some((chunk, at)) = input.read()? {
            all.push((String::from_utf8_lossy(&chunk.bytes).into_owned(), at));
        }
        Ok(all)
    }

    #[test]
    fn chunks_hold_whole_lines_and_resume_only_over_the_same_input() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sdk-events.tsv");
        let line = format!("{}\t{{}}\n", "k".repeat(600));
        std::fs::write(&path, line.repeat(5) + "last\t{}")?;
        let mut input = FileInput::open(&path, FilePosition::default(), 1024, Duration::ZERO)?;
        let all = chunks(&mut input)?;
        assert!(all.len() >= 2, "{} chunks", all.len());
        assert!(all[..all.len() - 1].iter().all(|(text, _)| text.ends_with('\n')), "cut at line ends");
        let (_, end) = all[all.len() - 1];
        assert_eq!((end.offset, end.line), (input.total_bytes(), 6), "the last line has no newline");

        // Resuming after the first chunk reads the rest, and nothing else.
        let (first, after_first) = all[0].clone();
        let mut again = FileInput::open(&path, after_first, 1024, Duration::ZERO)?;
        let rest: String = chunks(&mut again)?.into_iter().map(|(t, _)| t).collect();
        assert_eq!(first + &rest, std::fs::read_to_string(&path)?);

        // Another file under the same position is refused.
        std::fs::write(&path, line.replace('k', "j").repeat(6))?;
        assert!(matches!(
            FileInput::open(&path, after_first, 1024, Duration::ZERO),
            Err(FileInputError::DifferentInput { .. })
        ));
        Ok(())
    }
}
