//! Settings of the source stage.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Settings of the source stage (`[source]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceSettings {
    /// Bytes of input read and parsed as one unit (whole lines; a longer line
    /// makes a larger chunk). Larger chunks amortise hand-over costs; smaller
    /// ones bound memory: at most `queue_chunks` chunks are in flight.
    pub chunk_bytes: u64,
    /// Threads that parse uploads. 0 means one per core, minus one for the
    /// stage thread, at least one.
    pub parse_threads: usize,
    /// Chunks in flight between reading, parsing and processing; with
    /// `chunk_bytes` it bounds the memory for input in flight.
    pub queue_chunks: usize,
    /// A pause after reading each chunk: slows the input on purpose, for
    /// tests and demos of stops, crashes and back-pressure. 0 in production.
    #[serde(with = "humantime_serde")]
    pub chunk_pause: Duration,
}

impl Default for SourceSettings {
    fn default() -> Self {
        Self { chunk_bytes: 1 << 20, parse_threads: 0, queue_chunks: 8, chunk_pause: Duration::ZERO }
    }
}
