//! What one device did on one local day, as far as distinct counts need it.
//!
//! A device counts once in `active_devices` of every daily cell (os, channel,
//! country) it had an event in, once in `payers` of a cell it paid in, once in
//! `devices` of every custom event id it sent, and in exactly one
//! `sessions_per_device` bucket: the one of its launch count. These
//! transitions are decided here, purely: "first time in this cell", "first
//! payment in this cell", "launches moved from bucket a to b".

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_runtime::batch::Dimensions;
use sluice_runtime::key_group::KeyGroup;
use sluice_runtime::table::sessions_bucket;

/// A device's day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDay {
    /// The device's key group.
    pub key_group: KeyGroup,
    /// Launches so far.
    pub launches: u64,
    /// The daily cells the device was active in, and whether it paid there.
    pub cells: Vec<(Dimensions, bool)>,
    /// The custom event ids it sent.
    pub custom_ids: Vec<Arc<str>>,
    /// Changed since the last commit.
    pub dirty: bool,
}

/// What changed for the tables when a device's day took more events.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeviceDayChange {
    /// The device is active in this cell for the first time.
    pub new_in_cell: bool,
    /// The device paid in this cell for the first time.
    pub new_payer: bool,
    /// The device's sessions bucket moved: (from, to); `from` is `None` for
    /// the first event of the day.
    pub bucket_move: Option<(Option<usize>, usize)>,
}

impl DeviceDay {
    /// An empty day of a device in `key_group`.
    pub fn new(key_group: KeyGroup) -> Self {
        Self { key_group, launches: 0, cells: Vec::new(), custom_ids: Vec::new(), dirty: false }
    }

    /// Whether the day has seen any event (a new one has not).
    pub fn is_new(&self) -> bool {
        self.cells.is_empty()
    }

    /// Take events of one upload in one cell: `launches` of them launches,
    /// `paid` whether one was a payment.
    pub fn observe(&mut self, dims: &Dimensions, launches: u64, paid: bool) -> DeviceDayChange {
        let was_new = self.is_new();
        let mut change = DeviceDayChange::default();
        match self.cells.iter_mut().find(|(d, _)| d == dims) {
            Some((_, payer)) => {
                change.new_payer = paid && !*payer;
                *payer |= paid;
            }
            None => {
                change.new_in_cell = true;
                change.new_payer = paid;
                self.cells.push((dims.clone(), paid));
            }
        }
        let before = sessions_bucket(self.launches);
        self.launches += launches;
        let after = sessions_bucket(self.launches);
        if was_new {
            change.bucket_move = Some((None, after));
        } else if before != after {
            change.bucket_move = Some((Some(before), after));
        }
        self.dirty = true;
        change
    }

    /// Record a custom event id; true when the device sends it for the first
    /// time this day.
    pub fn observe_custom(&mut self, id: &Arc<str>) -> bool {
        if self.custom_ids.iter().any(|c| c == id) {
            return false;
        }
        self.custom_ids.push(id.clone());
        self.dirty = true;
        true
    }

    /// The durable form.
    pub fn to_stored(&self) -> StoredDeviceDay {
        StoredDeviceDay {
            launches: self.launches,
            cells: self
                .cells
                .iter()
                .map(|(d, p)| (d.os.to_string(), d.channel.to_string(), d.country.to_string(), *p))
                .collect(),
            custom_ids: self.custom_ids.iter().map(|c| c.to_string()).collect(),
        }
    }

    /// From the durable form.
    pub fn from_stored(key_group: KeyGroup, s: StoredDeviceDay) -> Self {
        Self {
            key_group,
            launches: s.launches,
            cells: s
                .cells
                .into_iter()
                .map(|(os, channel, country, p)| {
                    (Dimensions { os: os.into(), channel: channel.into(), country: country.into() }, p)
                })
                .collect(),
            custom_ids: s.custom_ids.into_iter().map(Arc::from).collect(),
            dirty: false,
        }
    }
}

/// A [`DeviceDay`] as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDeviceDay {
    launches: u64,
    cells: Vec<(String, String, String, bool)>,
    custom_ids: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(country: &str) -> Dimensions {
        Dimensions { os: "ios".into(), channel: "apple".into(), country: country.into() }
    }

    #[test]
    fn counts_each_device_once_per_cell_and_bucket() {
        let mut d = DeviceDay::new(KeyGroup(0));
        let c = d.observe(&dims("CN"), 0, false);
        assert_eq!(c, DeviceDayChange { new_in_cell: true, new_payer: false, bucket_move: Some((None, 0)) });
        let c = d.observe(&dims("CN"), 1, true);
        assert_eq!(c, DeviceDayChange { new_in_cell: false, new_payer: true, bucket_move: Some((Some(0), 1)) });
        let c = d.observe(&dims("US"), 5, true);
        assert_eq!(c, DeviceDayChange { new_in_cell: true, new_payer: true, bucket_move: Some((Some(1), 6)) });
        let c = d.observe(&dims("US"), 1, true);
        assert_eq!(c, DeviceDayChange::default(), "7 launches stay in bucket 6-10");
        let id: Arc<str> = "level_up".into();
        assert!(d.observe_custom(&id) && !d.observe_custom(&id));
        let back = DeviceDay::from_stored(KeyGroup(0), d.to_stored());
        assert_eq!(back.to_stored(), d.to_stored());
    }
}
