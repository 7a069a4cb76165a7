//! Records into raw batches, one per key group.
//!
//! An accepted upload goes to the key group of its (app, device); a record
//! rejected by rules 1-2 has no trustworthy app, so it goes to the key group of
//! its raw Kafka key. Either way every record, and so every reject, is counted
//! by exactly one key group.

use sluice_model::batch::{RawBatch, RawUpload};
use sluice_model::key_group::{KeyGroup, KeyGroups};
use sluice_model::lineage::Lineage;

use crate::upload::{Labels, parse_upload_with};

/// Collects records into per-key-group batches.
pub struct Batcher {
    key_groups: KeyGroups,
    batches: Vec<Vec<RawUpload>>,
    records: usize,
    labels: Labels,
}

impl Batcher {
    /// An empty batcher for `key_groups`.
    pub fn new(key_groups: KeyGroups) -> Self {
        Self {
            key_groups,
            batches: vec![Vec::new(); usize::from(key_groups.count())],
            records: 0,
            labels: Labels::default(),
        }
    }

    /// Bytes the record would take encoded as a batch of its own: a record
    /// whose batch cannot fit the largest message cannot be published at all.
    pub fn encoded_alone(&mut self, lineage: Lineage, value: &[u8]) -> usize {
        let body = parse_upload_with(value, &mut self.labels);
        let batch = RawBatch { key_group: KeyGroup(0), uploads: vec![RawUpload { lineage, body }] };
        sluice_model::codec::encode_raw(&batch).len()
    }

    /// Parse one record and add it to its key group's batch.
    pub fn push(&mut self, lineage: Lineage, key: &[u8], value: &[u8]) {
        let body = parse_upload_with(value, &mut self.labels);
        let kg = match &body {
            Ok(up) => self.key_groups.of_device(up.app.as_bytes(), up.dev.as_bytes()),
            Err(_) => self.key_groups.of_raw_key(key),
        };
        self.batches[usize::from(kg.0)].push(RawUpload { lineage, body });
        self.records += 1;
    }

    /// Records pushed since the last [`Self::take`].
    pub fn len(&self) -> usize {
        self.records
    }

    /// Whether nothing was pushed since the last [`Self::take`].
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The non-empty batches, in key group order; the batcher is empty after.
    pub fn take(&mut self) -> Vec<RawBatch> {
        self.records = 0;
        self.batches
            .iter_mut()
            .enumerate()
            .filter(|(_, b)| !b.is_empty())
            // The index is below the key group count, itself a u16.
            .map(|(i, b)| RawBatch { key_group: KeyGroup(i as u16), uploads: std::mem::take(b) })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_device_and_rejects_by_raw_key() {
        let p = KeyGroups::new(8).expect("valid");
        let mut b = Batcher::new(p);
        let up = br#"{"mid":"m","app":"a","dev":"d","sent":1,"events":[{"t":"launch","ts":1}]}"#;
        b.push(Lineage::line(0), b"ignored", up);
        b.push(Lineage::line(1), b"d", b"not json");
        assert_eq!(b.len(), 2);
        let batches = b.take();
        let total: usize = batches.iter().map(|b| b.uploads.len()).sum();
        assert_eq!(total, 2);
        let kg_of =
            |line| batches.iter().find(|b| b.uploads.iter().any(|u| u.lineage.offset == line)).map(|b| b.key_group);
        assert_eq!(kg_of(0), Some(p.of_device(b"a", b"d")));
        assert_eq!(kg_of(1), Some(p.of_raw_key(b"d")));
        assert!(b.is_empty() && b.take().is_empty());
    }
}
