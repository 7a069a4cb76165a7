//! How far a file input has been consumed: committed with the state it
//! produced, so a restart resumes exactly after the last committed line.
//!
//! The position also carries a fingerprint of the input consumed so far, so
//! that a state directory is never resumed over a different input file (which
//! would silently skip or double-count records).

use serde::{Deserialize, Serialize};

/// The position of a file input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FilePosition {
    /// Bytes consumed (always at a line boundary).
    pub offset: u64,
    /// Lines consumed; the next line's lineage offset.
    pub line: u64,
    /// [`fingerprint`] of the first bytes consumed.
    pub fingerprint: u64,
}

/// Bytes of the input the fingerprint covers.
pub const FINGERPRINT_BYTES: u64 = 64 * 1024;

/// XXH3 of the first `min(consumed, FINGERPRINT_BYTES)` bytes of the input.
pub fn fingerprint(prefix: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(prefix)
}
