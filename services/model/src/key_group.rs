//! Key groups: the fixed partitions of all device-keyed state.
//!
//! A record's key group is a stable hash of (app, device) modulo P, computed by
//! the same function in every process and every version, so that all state of
//! one device lives in one key group and the window stage can count distinct
//! devices without a second shuffle. P is fixed for a deployment (like a
//! maximum parallelism); instances divide the key groups between them.
//!
//! The hash is XXH3-64 (seed 0) over `app`, a 0xFF separator byte (which never
//! occurs in UTF-8, so ("ab","c") and ("a","bc") differ), and `device`.

use std::fmt;

/// One of the P fixed partitions of device-keyed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize, serde::Deserialize)]
pub struct KeyGroup(pub u16);

impl fmt::Display for KeyGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kg{}", self.0)
    }
}

/// The number of key groups of a deployment, and the function into them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyGroups {
    count: u16,
}

/// The most key groups a deployment may have (the key group travels as a UInt16).
pub const MAX_KEY_GROUPS: u32 = 1 << 15;

impl KeyGroups {
    /// P key groups; `None` when P is zero or above [`MAX_KEY_GROUPS`].
    pub fn new(count: u32) -> Option<Self> {
        if count == 0 || count > MAX_KEY_GROUPS {
            return None;
        }
        u16::try_from(count).ok().map(|count| Self { count })
    }

    /// How many key groups there are.
    pub fn count(self) -> u16 {
        self.count
    }

    /// The key group of a device of an app.
    pub fn of_device(self, app: &[u8], device: &[u8]) -> KeyGroup {
        let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
        hasher.update(app);
        hasher.update(&[0xFF]);
        hasher.update(device);
        self.bucket(hasher.digest())
    }

    /// The key group of a record that could not be parsed far enough to know
    /// its app: it is placed by its raw Kafka key so that its reject is counted
    /// by exactly one key group.
    pub fn of_raw_key(self, key: &[u8]) -> KeyGroup {
        self.of_device(b"", key)
    }

    fn bucket(self, hash: u64) -> KeyGroup {
        // The remainder is below `count`, itself a u16.
        KeyGroup((hash % u64::from(self.count)) as u16)
    }

    /// Every key group, in order.
    pub fn all(self) -> impl Iterator<Item = KeyGroup> {
        (0..self.count).map(KeyGroup)
    }
}

/// The key groups one instance (or one worker) owns. Instances of a stage
/// divide the P key groups between them as evenly as their number allows
/// (sizes differ by at most one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyGroupSet {
    owned: Vec<bool>,
}

impl KeyGroupSet {
    /// Every key group.
    pub fn all(p: KeyGroups) -> Self {
        Self { owned: vec![true; usize::from(p.count())] }
    }

    /// No key group (of P).
    pub fn none(p: KeyGroups) -> Self {
        Self { owned: vec![false; usize::from(p.count())] }
    }

    /// Exactly `key_groups` (of P; those beyond P are ignored).
    pub fn of(p: KeyGroups, key_groups: impl IntoIterator<Item = KeyGroup>) -> Self {
        let mut set = Self::none(p);
        for kg in key_groups {
            if let Some(o) = set.owned.get_mut(usize::from(kg.0)) {
                *o = true;
            }
        }
        set
    }

    /// The owned key groups, in order.
    pub fn iter(&self) -> impl Iterator<Item = KeyGroup> + '_ {
        self.owned.iter().enumerate().filter(|(_, o)| **o).map(|(i, _)| KeyGroup(i as u16))
    }

    /// The share of instance `index` of `count` (0-based): key groups
    /// `index`, `index + count`, ... Panics never; an `index >= count` owns none.
    pub fn share(p: KeyGroups, index: usize, count: usize) -> Self {
        Self { owned: p.all().map(|kg| Self::owner(kg, count) == index).collect() }
    }

    /// The instance (of `count`) whose [`KeyGroupSet::share`] holds `kg`.
    pub fn owner(kg: KeyGroup, count: usize) -> usize {
        usize::from(kg.0) % count.max(1)
    }

    /// Whether `kg` is owned.
    pub fn contains(&self, kg: KeyGroup) -> bool {
        self.owned.get(usize::from(kg.0)).copied().unwrap_or(false)
    }

    /// How many key groups are owned.
    pub fn len(&self) -> usize {
        self.owned.iter().filter(|&&o| o).count()
    }

    /// Whether none is owned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_stable_across_versions() {
        // Pinned values: changing the function would silently re-partition
        // every deployment's state. Never update these numbers.
        let p = KeyGroups::new(64).expect("64 is valid");
        assert_eq!(p.of_device(b"app-0001", b"d-0000001"), KeyGroup(52));
        assert_eq!(p.of_device(b"app-0007", b"d-0001234"), KeyGroup(51));
        assert_eq!(p.of_raw_key(b""), p.of_device(b"", b""));
    }

    #[test]
    fn separates_app_from_device() {
        let p = KeyGroups::new(1 << 15).expect("valid");
        assert_ne!(p.of_device(b"ab", b"c"), p.of_device(b"a", b"bc"));
    }

    #[test]
    fn rejects_zero_and_too_many() {
        assert!(KeyGroups::new(0).is_none());
        assert!(KeyGroups::new(MAX_KEY_GROUPS + 1).is_none());
        assert_eq!(KeyGroups::new(1).map(|p| p.count()), Some(1));
    }

    #[test]
    fn shares_are_disjoint_and_balanced() {
        let p = KeyGroups::new(64).expect("valid");
        for count in [1, 2, 3, 7, 64, 100] {
            let shares: Vec<KeyGroupSet> = (0..count).map(|i| KeyGroupSet::share(p, i, count)).collect();
            for kg in p.all() {
                assert_eq!(shares.iter().filter(|s| s.contains(kg)).count(), 1, "{kg} owned once");
            }
            let sizes: Vec<usize> = shares.iter().map(KeyGroupSet::len).collect();
            let (min, max) = (sizes.iter().min(), sizes.iter().max());
            assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{count}: {sizes:?}");
        }
        assert_eq!(KeyGroupSet::all(p).len(), 64);
    }

    #[test]
    fn spreads_devices_evenly() {
        let p = KeyGroups::new(64).expect("valid");
        let mut counts = [0u32; 64];
        for d in 0..64_000 {
            counts[p.of_device(b"app-0001", format!("d-{d:07}").as_bytes()).0 as usize] += 1;
        }
        let (min, max) = (counts.iter().min(), counts.iter().max());
        assert!(min >= Some(&850) && max <= Some(&1150), "{min:?}..{max:?}");
    }
}
