//! The format version of the JSON records services exchange over NATS:
//! credit grants and status reports, the lease table, the dimension tables.
//!
//! Each record carries it as a top-level field `v`. A record without one is
//! version 1 (written before records were versioned); a reader refuses a
//! version newer than it knows with a clear error instead of misreading it.
//! Adding a field with a default keeps the version; changing the meaning
//! of one raises it. Readers of version N must still read N-1, so a rolling
//! upgrade can run both.

use serde::{Deserialize, Serialize};

/// A record's format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WireVersion(pub u32);

impl WireVersion {
    /// The version this build writes, and the newest it reads.
    pub const CURRENT: WireVersion = WireVersion(1);

    /// Whether this build can read a record of this version; the error
    /// names the record (`what`).
    pub fn check(self, what: &'static str) -> Result<(), NewerRecord> {
        if self > Self::CURRENT { Err(NewerRecord { what, version: self.0 }) } else { Ok(()) }
    }
}

impl Default for WireVersion {
    /// A record without a version was written before versions: version 1.
    fn default() -> Self {
        WireVersion(1)
    }
}

/// A record written by a newer build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a {what} of format version {version}, newer than this build reads ({}): upgrade this instance",
    WireVersion::CURRENT.0
)]
pub struct NewerRecord {
    /// The record.
    pub what: &'static str,
    /// Its version.
    pub version: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Serialize)]
    struct Record {
        #[serde(default)]
        v: WireVersion,
        x: u32,
    }

    #[test]
    fn a_record_without_a_version_is_version_one_and_newer_ones_are_refused() -> Result<(), serde_json::Error> {
        let old: Record = serde_json::from_str(r#"{"x":1}"#)?;
        assert_eq!(old.v, WireVersion(1));
        assert!(old.v.check("test record").is_ok());
        let newer: Record = serde_json::from_str(r#"{"v":2,"x":1}"#)?;
        let err = newer.v.check("test record").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("format version 2"), "{err}");
        assert_eq!(serde_json::to_string(&Record { v: WireVersion::CURRENT, x: 1 })?, r#"{"v":1,"x":1}"#);
        Ok(())
    }
}
