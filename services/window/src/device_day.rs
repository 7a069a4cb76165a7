//! What one device did on one local day, as far as distinct counts need it.
//!
//! A device counts once in `active_devices` of every daily cell (os, channel,
//! country) it had an event in, once in `payers` of a cell it paid in, once in
//! `devices` of every custom event id it sent, and in exactly one
//! `sessions_per_device` bucket: the one of its launch count. These
//! transitions are decided here, purely: "first time in this cell", "first
//! payment in this cell", "launches moved from bucket a to b".

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use rustc_hash::FxBuildHasher;

use serde::{Deserialize, Serialize};
use sluice_model::batch::Dimensions;
use sluice_model::key_group::KeyGroup;
use sluice_model::table::sessions_bucket;

/// Members of a small set with a value each: a vector while small (the usual
/// case: one or two members), a hash map beyond, so a device that sends
/// thousands of distinct custom ids in a day costs O(1) per id, not O(n).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members<K: Eq + Hash, V> {
    /// Up to [`FEW`] members, searched linearly.
    Few(Vec<(K, V)>),
    /// More.
    Many(HashMap<K, V, FxBuildHasher>),
}

/// Members kept in a vector at most.
pub const FEW: usize = 16;

impl<K: Eq + Hash, V> Default for Members<K, V> {
    fn default() -> Self {
        Self::Few(Vec::new())
    }
}

impl<K: Eq + Hash, V> Members<K, V> {
    fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        match self {
            Self::Few(v) => v.iter_mut().find(|(x, _)| x == k).map(|(_, v)| v),
            Self::Many(m) => m.get_mut(k),
        }
    }

    /// Insert a member known to be absent.
    fn insert_new(&mut self, k: K, v: V) {
        match self {
            Self::Few(vec) if vec.len() < FEW => vec.push((k, v)),
            Self::Few(vec) => {
                let mut m: HashMap<K, V, FxBuildHasher> = std::mem::take(vec).into_iter().collect();
                m.insert(k, v);
                *self = Self::Many(m);
            }
            Self::Many(m) => {
                m.insert(k, v);
            }
        }
    }

    /// Every member, in no particular order.
    pub fn iter(&self) -> Box<dyn Iterator<Item = (&K, &V)> + '_> {
        match self {
            Self::Few(v) => Box::new(v.iter().map(|(k, v)| (k, v))),
            Self::Many(m) => Box::new(m.iter()),
        }
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        match self {
            Self::Few(v) => v.is_empty(),
            Self::Many(m) => m.is_empty(),
        }
    }
}

/// A device's day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDay {
    /// The device's key group.
    pub key_group: KeyGroup,
    /// Launches so far.
    pub launches: u64,
    /// The daily cells the device was active in, and whether it paid there.
    pub cells: Members<Dimensions, bool>,
    /// The custom event ids it sent.
    pub custom_ids: Members<Arc<str>, ()>,
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
        Self { key_group, launches: 0, cells: Members::default(), custom_ids: Members::default(), dirty: false }
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
        match self.cells.get_mut(dims) {
            Some(payer) => {
                change.new_payer = paid && !*payer;
                *payer |= paid;
            }
            None => {
                change.new_in_cell = true;
                change.new_payer = paid;
                self.cells.insert_new(dims.clone(), paid);
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
        if self.custom_ids.get_mut(id).is_some() {
            return false;
        }
        self.custom_ids.insert_new(id.clone(), ());
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
            custom_ids: self.custom_ids.iter().map(|(c, ())| c.to_string()).collect(),
        }
    }

    /// From the durable form.
    pub fn from_stored(key_group: KeyGroup, s: StoredDeviceDay) -> Self {
        Self {
            key_group,
            launches: s.launches,
            cells: {
                let mut m = Members::default();
                for (os, channel, country, p) in s.cells {
                    m.insert_new(Dimensions { os: os.into(), channel: channel.into(), country: country.into() }, p);
                }
                m
            },
            custom_ids: {
                let mut m = Members::default();
                for id in s.custom_ids {
                    m.insert_new(Arc::from(id), ());
                }
                m
            },
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

    #[test]
    fn many_members_switch_to_a_map_and_stay_exact() {
        let mut d = DeviceDay::new(KeyGroup(0));
        let ids: Vec<Arc<str>> = (0..1000).map(|i| Arc::from(format!("id-{i}"))).collect();
        assert!(ids.iter().all(|id| d.observe_custom(id)), "each is new once");
        assert!(ids.iter().all(|id| !d.observe_custom(id)), "and known after");
        assert!(matches!(d.custom_ids, Members::Many(_)));
        for i in 0..100 {
            let dims = Dimensions { os: format!("os-{i}").into(), channel: "x".into(), country: "ZZ".into() };
            assert!(d.observe(&dims, 0, false).new_in_cell);
            assert!(!d.observe(&dims, 0, false).new_in_cell);
        }
    }
}
