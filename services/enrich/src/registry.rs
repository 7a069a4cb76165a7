//! The device registry: per (app, device), its first event and the memory of
//! its recently accepted message ids.
//!
//! Pure decision code: [`DeviceRecord`] takes what was observed and says what
//! follows (a duplicate; a first event that moved), and the enricher carries it
//! out. Both decisions are order-independent, as the SPEC demands of the
//! result:
//!
//! - **first event**: the accepted event with the smallest (ts, mid, index)
//!   wins, whatever order uploads arrive in. When a late upload holds an
//!   earlier event, the device's new-device count moves: the registry returns
//!   the cell it was counted in, so the window can retract it there.
//! - **dedup** (rule 4): a message whose id was accepted before is a
//!   duplicate. Ids are remembered for at least the dedup window of the
//!   device's own `sent` clock (so a device with a broken clock can only have
//!   its own re-sends counted twice), and forgotten in amortised sweeps, never
//!   one per message. Scoping dedup to the device is what makes it
//!   partitionable by key group. It differs from `oracle.py`'s global set of
//!   ids in two cases, both documented limits: two devices that share a
//!   message id, and a re-send arriving after its device's clock moved on by
//!   more than the window.

use std::collections::HashMap;

use rustc_hash::FxBuildHasher;
use serde::{Deserialize, Serialize};
use sluice_model::batch::DailyCell;

/// The first event of a device: its order key and the `daily` cell it falls in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstEvent {
    /// Event time, ms.
    pub ts: i64,
    /// Message id of its upload (second tie-break).
    pub mid: Box<str>,
    /// Position in the upload (third tie-break).
    pub index: u32,
    /// Where the device counts as new.
    pub cell: DailyCell,
}

impl FirstEvent {
    fn order(&self) -> (i64, &str, u32) {
        (self.ts, &self.mid, self.index)
    }
}

/// What the registry knows about one device of one app.
#[derive(Debug, Clone)]
pub struct DeviceRecord {
    /// The device's first accepted event so far.
    pub first: Option<FirstEvent>,
    /// Accepted message ids and their `sent` time.
    recent: HashMap<Box<str>, i64, FxBuildHasher>,
    /// The newest `sent` of an accepted message (the device's dedup clock).
    newest_sent: i64,
    /// Sweep when `recent` reaches this size (amortises forgetting).
    sweep_at: usize,
}

const FIRST_SWEEP: usize = 32;

impl Default for DeviceRecord {
    fn default() -> Self {
        // The dedup clock starts before any `sent` (which may be negative).
        Self { first: None, recent: HashMap::default(), newest_sent: i64::MIN, sweep_at: FIRST_SWEEP }
    }
}

impl DeviceRecord {
    /// Rule 4: was a message with this id accepted before?
    pub fn is_duplicate(&self, mid: &str) -> bool {
        self.recent.contains_key(mid)
    }

    /// Remember an accepted message, forgetting ids older than `window_ms`
    /// before the device's newest `sent` once enough have gathered.
    pub fn remember(&mut self, mid: &str, sent: i64, window_ms: i64) {
        self.newest_sent = self.newest_sent.max(sent);
        self.recent.insert(mid.into(), sent);
        if self.recent.len() >= self.sweep_at.max(FIRST_SWEEP) {
            let cutoff = self.newest_sent.saturating_sub(window_ms);
            self.recent.retain(|_, s| *s >= cutoff);
            self.sweep_at = (2 * self.recent.len()).max(FIRST_SWEEP);
        }
    }

    /// Whether an event with this order key would become the device's first
    /// (cheap: lets callers build a [`FirstEvent`] only when it wins).
    pub fn would_be_first(&self, ts: i64, mid: &str, index: u32) -> bool {
        self.first.as_ref().is_none_or(|current| (ts, mid, index) < current.order())
    }

    /// Offer an accepted event as the device's first. Returns `Some(previous
    /// cell)` when it becomes the first (`Some(None)`: the device is new), and
    /// `None` when the current first event stays.
    pub fn offer_first(&mut self, candidate: FirstEvent) -> Option<Option<DailyCell>> {
        match &self.first {
            Some(current) if current.order() <= candidate.order() => None,
            _ => Some(self.first.replace(candidate).map(|old| old.cell)),
        }
    }

    /// The newest `sent` of an accepted message: when the device was last
    /// seen. `None` before any.
    pub fn last_seen(&self) -> Option<i64> {
        (self.newest_sent != i64::MIN).then_some(self.newest_sent)
    }

    /// How many message ids are remembered.
    pub fn remembered(&self) -> usize {
        self.recent.len()
    }

    /// The durable form of this record.
    pub fn to_stored(&self) -> StoredDevice {
        StoredDevice {
            first: self.first.as_ref().map(|f| StoredFirst {
                ts: f.ts,
                mid: f.mid.to_string(),
                index: f.index,
                day: f.cell.day.0,
                os: f.cell.dimensions.os.to_string(),
                channel: f.cell.dimensions.channel.to_string(),
                country: f.cell.dimensions.country.to_string(),
            }),
            recent: self.recent.iter().map(|(m, s)| (m.to_string(), *s)).collect(),
            newest_sent: self.newest_sent,
        }
    }

    /// A record from its durable form.
    pub fn from_stored(s: StoredDevice) -> Self {
        use sluice_model::batch::Dimensions;
        use sluice_model::event_time::LocalDay;
        let first = s.first.map(|f| FirstEvent {
            ts: f.ts,
            mid: f.mid.into(),
            index: f.index,
            cell: DailyCell {
                day: LocalDay(f.day),
                dimensions: Dimensions { os: f.os.into(), channel: f.channel.into(), country: f.country.into() },
            },
        });
        let recent: HashMap<Box<str>, i64, FxBuildHasher> =
            s.recent.into_iter().map(|(m, sent)| (m.into_boxed_str(), sent)).collect();
        let sweep_at = (2 * recent.len()).max(FIRST_SWEEP);
        Self { first, recent, newest_sent: s.newest_sent, sweep_at }
    }
}

/// The first event as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFirst {
    ts: i64,
    mid: String,
    index: u32,
    day: i64,
    os: String,
    channel: String,
    country: String,
}

/// A [`DeviceRecord`] as stored in the commit store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDevice {
    first: Option<StoredFirst>,
    recent: Vec<(String, i64)>,
    newest_sent: i64,
}

#[cfg(test)]
mod tests {
    use sluice_model::batch::Dimensions;
    use sluice_model::event_time::LocalDay;

    use super::*;

    fn ev(ts: i64, mid: &str, index: u32, day: i64) -> FirstEvent {
        let dimensions = Dimensions { os: "ios".into(), channel: "apple".into(), country: "CN".into() };
        FirstEvent { ts, mid: mid.into(), index, cell: DailyCell { day: LocalDay(day), dimensions } }
    }

    #[test]
    fn first_event_is_the_smallest_whatever_the_order() {
        let events = [ev(10, "b", 0, 2), ev(5, "z", 3, 1), ev(5, "a", 9, 1), ev(5, "a", 2, 0), ev(7, "a", 0, 2)];
        let mut orders: Vec<Vec<usize>> = vec![vec![0, 1, 2, 3, 4], vec![4, 3, 2, 1, 0], vec![2, 0, 4, 3, 1]];
        orders.push(vec![3, 1, 0, 2, 4]);
        for order in orders {
            let mut r = DeviceRecord::default();
            let mut counted = 0i64;
            for &i in &order {
                if let Some(prev) = r.offer_first(events[i].clone()) {
                    counted += 1 - i64::from(prev.is_some());
                }
            }
            assert_eq!(counted, 1, "counted exactly once as new");
            assert_eq!(r.first.as_ref().map(|f| (f.ts, &*f.mid, f.index)), Some((5, "a", 2)), "{order:?}");
        }
    }

    #[test]
    fn late_earlier_event_moves_the_first_and_names_the_old_cell() {
        let mut r = DeviceRecord::default();
        assert_eq!(r.offer_first(ev(100, "m2", 0, 5)), Some(None));
        assert_eq!(r.offer_first(ev(200, "m3", 0, 6)), None);
        let moved = r.offer_first(ev(50, "m1", 1, 4));
        assert_eq!(moved.flatten().map(|c| c.day), Some(LocalDay(5)));
    }

    #[test]
    fn dedup_remembers_at_least_the_window() {
        let mut r = DeviceRecord::default();
        let hour = 3_600_000;
        for i in 0..1000 {
            r.remember(&format!("m{i}"), i * hour / 10, 24 * hour);
        }
        // The newest 24 h (240 ids) are always remembered; older ones are
        // swept in batches, so memory stays within twice the window's ids.
        assert!((960..1000).all(|i| r.is_duplicate(&format!("m{i}"))));
        assert!(r.remembered() <= 2 * 241 + FIRST_SWEEP, "{}", r.remembered());
        assert!(!r.is_duplicate("m-new"));
    }

    #[test]
    fn negative_sent_clocks_remember_too() {
        let mut r = DeviceRecord::default();
        let day = 86_400_000;
        for i in 0..100 {
            r.remember(&format!("m{i}"), -10 * day + i, day);
        }
        assert!((0..100).all(|i| r.is_duplicate(&format!("m{i}"))), "all within a day of the newest sent");
    }

    #[test]
    fn stored_form_round_trips() {
        let mut r = DeviceRecord::default();
        r.remember("m1", 5, 10);
        r.offer_first(ev(1, "m1", 0, 3));
        let back = DeviceRecord::from_stored(r.to_stored());
        assert!(back.is_duplicate("m1"));
        assert_eq!(back.first, r.first);
        assert_eq!(back.to_stored(), r.to_stored());
    }
}
