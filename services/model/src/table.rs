//! The five tables of SPEC section 3, as partial rows and as final rows.
//!
//! The window stage keeps, per key group, a *partial* row for every table key
//! it has seen: distinct-device counts are exact within a key group because all
//! of a device's events live in its key group. The sink keeps the newest
//! version of every (table, key, key group) partial and adds them up when it
//! answers or exports. A partial is an absolute value, so applying one twice,
//! or an older one after a newer, changes nothing.

use std::fmt;
use std::sync::Arc;

use crate::event_time::{LocalDay, LocalMinute};
use crate::json::JsonObject;
use crate::reject::RejectReason;

/// The tables of SPEC section 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Table {
    /// Per (app, day, os, channel, country).
    Daily,
    /// Per (app, day): devices bucketed by launches.
    SessionsPerDevice,
    /// Per (app, day, event_id).
    CustomEvents,
    /// Per (app, minute).
    Minute,
    /// Per reason.
    Rejects,
}

impl Table {
    /// Every table, in export order.
    pub const ALL: [Table; 5] = [Self::Daily, Self::SessionsPerDevice, Self::CustomEvents, Self::Minute, Self::Rejects];

    /// The table's name (and export file stem).
    pub fn name(self) -> &'static str {
        match self {
            Self::Daily => "daily",
            Self::SessionsPerDevice => "sessions_per_device",
            Self::CustomEvents => "custom_events",
            Self::Minute => "minute",
            Self::Rejects => "rejects",
        }
    }

    /// The table named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The upper bounds (exclusive) of the play-time histogram buckets, seconds:
/// [0,3) [3,10) [10,30) [30,60) [60,180) [180,600) [600,1800) [1800,inf).
pub const PLAYTIME_BOUNDS: [i64; 7] = [3, 10, 30, 60, 180, 600, 1800];

/// The play-time histogram bucket of a terminate of `dur` seconds (dur >= 0).
pub fn playtime_bucket(dur: i64) -> usize {
    PLAYTIME_BOUNDS.iter().take_while(|&&b| dur >= b).count()
}

/// The sessions bucket of a device with `launches` launches in a day:
/// 0, 1, 2, 3, 4, 5, 6-10, 11-20, 21-50, 51+.
pub fn sessions_bucket(launches: u64) -> usize {
    match launches {
        0..=5 => launches as usize,
        6..=10 => 6,
        11..=20 => 7,
        21..=50 => 8,
        _ => 9,
    }
}

/// Key of the `daily` table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct DailyKey {
    /// App key.
    pub app: Arc<str>,
    /// Local day.
    pub day: LocalDay,
    /// OS dimension.
    pub os: Arc<str>,
    /// Channel group.
    pub channel: Arc<str>,
    /// Country.
    pub country: Arc<str>,
}

/// Values of the `daily` table (partial or merged).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DailyValue {
    /// Accepted events.
    pub events: u64,
    /// Launch events.
    pub launches: u64,
    /// Distinct devices with an event in the key.
    pub active_devices: u64,
    /// Devices whose first event falls in the key (signed: see [`crate::batch::FirstEventMove`]).
    pub new_devices: i64,
    /// Sum of terminate durations, seconds.
    pub playtime_s: i128,
    /// Terminates per play-time bucket.
    pub playtime_hist: [u64; 8],
    /// Distinct devices with a payment in the key.
    pub payers: u64,
    /// Sum of payments per currency; a currency is present iff it had a payment.
    pub revenue: Revenue,
}

impl DailyValue {
    fn add(&mut self, o: &DailyValue) {
        self.events += o.events;
        self.launches += o.launches;
        self.active_devices += o.active_devices;
        self.new_devices += o.new_devices;
        self.playtime_s += o.playtime_s;
        for (a, b) in self.playtime_hist.iter_mut().zip(o.playtime_hist) {
            *a += b;
        }
        self.payers += o.payers;
        for (cur, amount) in o.revenue.iter() {
            self.revenue.add(cur, *amount);
        }
    }
}

/// Payments summed per currency, sorted by currency. A currency is present
/// iff it had a payment (even of 0). A sorted vector for the usual one or two
/// currencies (a map node would cost hundreds of bytes per row), a B-tree
/// beyond a few, so input with thousands of currency strings stays O(log n).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(from = "Vec<(Arc<str>, i128)>", into = "Vec<(Arc<str>, i128)>")]
pub struct Revenue(Currencies);

#[derive(Debug, Clone)]
enum Currencies {
    Few(Vec<(Arc<str>, i128)>),
    Many(std::collections::BTreeMap<Arc<str>, i128>),
}

/// Currencies kept in a vector at most.
const FEW_CURRENCIES: usize = 16;

impl Default for Revenue {
    fn default() -> Self {
        Self(Currencies::Few(Vec::new()))
    }
}

impl PartialEq for Revenue {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Revenue {}

impl From<Vec<(Arc<str>, i128)>> for Revenue {
    fn from(pairs: Vec<(Arc<str>, i128)>) -> Self {
        let mut r = Self::default();
        for (c, a) in pairs {
            r.add(&c, a);
        }
        r
    }
}

impl From<Revenue> for Vec<(Arc<str>, i128)> {
    fn from(r: Revenue) -> Self {
        r.into_iter().collect()
    }
}

impl Revenue {
    /// Add `amount` to `currency`'s sum.
    pub fn add(&mut self, currency: &Arc<str>, amount: i128) {
        match &mut self.0 {
            Currencies::Few(v) => match v.binary_search_by(|(c, _)| (**c).cmp(&**currency)) {
                Ok(i) => v[i].1 += amount,
                Err(i) if v.len() < FEW_CURRENCIES => v.insert(i, (currency.clone(), amount)),
                Err(_) => {
                    let mut m: std::collections::BTreeMap<Arc<str>, i128> = std::mem::take(v).into_iter().collect();
                    *m.entry(currency.clone()).or_default() += amount;
                    self.0 = Currencies::Many(m);
                }
            },
            Currencies::Many(m) => *m.entry(currency.clone()).or_default() += amount,
        }
    }

    /// Same as [`Self::add`] (for building values).
    pub fn insert(&mut self, currency: Arc<str>, amount: i128) {
        self.add(&currency, amount);
    }

    /// (currency, sum), sorted by currency.
    pub fn iter(&self) -> Box<dyn Iterator<Item = (&Arc<str>, &i128)> + '_> {
        match &self.0 {
            Currencies::Few(v) => Box::new(v.iter().map(|(c, a)| (c, a))),
            Currencies::Many(m) => Box::new(m.iter()),
        }
    }

    /// Currencies with payments.
    pub fn len(&self) -> usize {
        match &self.0 {
            Currencies::Few(v) => v.len(),
            Currencies::Many(m) => m.len(),
        }
    }

    /// Whether there was no payment.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl IntoIterator for Revenue {
    type Item = (Arc<str>, i128);
    type IntoIter = Box<dyn Iterator<Item = (Arc<str>, i128)>>;

    fn into_iter(self) -> Self::IntoIter {
        match self.0 {
            Currencies::Few(v) => Box::new(v.into_iter()),
            Currencies::Many(m) => Box::new(m.into_iter()),
        }
    }
}

/// Key of `sessions_per_device` (and the app-day part of other keys).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct AppDay {
    /// App key.
    pub app: Arc<str>,
    /// Local day.
    pub day: LocalDay,
}

/// Key of `custom_events`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct CustomKey {
    /// App key.
    pub app: Arc<str>,
    /// Local day.
    pub day: LocalDay,
    /// The custom event id.
    pub event_id: Arc<str>,
}

/// Values of `custom_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CustomValue {
    /// Events.
    pub count: u64,
    /// Distinct devices.
    pub devices: u64,
}

/// Key of `minute`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct MinuteKey {
    /// App key.
    pub app: Arc<str>,
    /// Local minute.
    pub minute: LocalMinute,
}

/// Values of `minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct MinuteValue {
    /// Events.
    pub events: u64,
    /// Launch events.
    pub launches: u64,
    /// Sum of CNY payments, fen.
    pub revenue_cny: i128,
}

/// Key of a minute block: the `minute` rows of one app in one local hour.
/// The window keeps and emits the minute table as blocks, because a row per
/// (app, minute, key group) would be millions of tiny partials; a block is
/// still an absolute, versioned partial of one key group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct MinuteBlockKey {
    /// App key.
    pub app: Arc<str>,
    /// Local hour number (hours since 1970-01-01T00:00, UTC+08:00).
    pub hour: i64,
}

impl MinuteBlockKey {
    /// The block a minute of an app belongs to.
    pub fn of(app: Arc<str>, minute: LocalMinute) -> Self {
        Self { app, hour: minute.hour() }
    }

    /// The local day of the block's hour.
    pub fn day(&self) -> LocalDay {
        LocalDay(self.hour.div_euclid(24))
    }
}

/// One minute of a minute block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MinuteCell {
    /// The minute.
    pub minute: LocalMinute,
    /// Its values.
    pub value: MinuteValue,
}

/// Add `value` to the cell of `minute` in `cells` (sorted by minute).
pub fn add_minute(cells: &mut Vec<MinuteCell>, minute: LocalMinute, value: &MinuteValue) {
    match cells.binary_search_by_key(&minute, |c| c.minute) {
        Ok(i) => {
            let v = &mut cells[i].value;
            v.events += value.events;
            v.launches += value.launches;
            v.revenue_cny += value.revenue_cny;
        }
        Err(i) => cells.insert(i, MinuteCell { minute, value: *value }),
    }
}

/// A table key: which row of which table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum RowKey {
    /// A `daily` row.
    Daily(DailyKey),
    /// A `sessions_per_device` row.
    SessionsPerDevice(AppDay),
    /// A `custom_events` row.
    CustomEvents(CustomKey),
    /// A `minute` row.
    Minute(MinuteKey),
    /// A block of `minute` rows (partial rows only).
    MinuteBlock(MinuteBlockKey),
    /// A `rejects` row.
    Rejects(RejectReason),
}

impl RowKey {
    /// The table this key belongs to.
    pub fn table(&self) -> Table {
        match self {
            Self::Daily(_) => Table::Daily,
            Self::SessionsPerDevice(_) => Table::SessionsPerDevice,
            Self::CustomEvents(_) => Table::CustomEvents,
            Self::Minute(_) | Self::MinuteBlock(_) => Table::Minute,
            Self::Rejects(_) => Table::Rejects,
        }
    }
}

/// A row's values, matching its key's table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RowValue {
    /// `daily` values.
    Daily(DailyValue),
    /// `sessions_per_device` buckets.
    SessionsPerDevice([u64; 10]),
    /// `custom_events` values.
    CustomEvents(CustomValue),
    /// `minute` values.
    Minute(MinuteValue),
    /// The cells of a minute block, sorted by minute (partial rows only).
    MinuteBlock(Vec<MinuteCell>),
    /// `rejects` count.
    Rejects(u64),
}

impl RowValue {
    /// An all-zero value for `table`, the neutral element of [`Self::add`].
    pub fn zero(table: Table) -> Self {
        match table {
            Table::Daily => Self::Daily(DailyValue::default()),
            Table::SessionsPerDevice => Self::SessionsPerDevice([0; 10]),
            Table::CustomEvents => Self::CustomEvents(CustomValue::default()),
            Table::Minute => Self::Minute(MinuteValue::default()),
            Table::Rejects => Self::Rejects(0),
        }
    }

    /// Add another partial of the same key. Partials of different tables never
    /// meet (they have different keys), so a mismatch is ignored.
    pub fn add(&mut self, other: &RowValue) {
        match (self, other) {
            (Self::Daily(a), Self::Daily(b)) => a.add(b),
            (Self::SessionsPerDevice(a), Self::SessionsPerDevice(b)) => {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
            }
            (Self::CustomEvents(a), Self::CustomEvents(b)) => {
                a.count += b.count;
                a.devices += b.devices;
            }
            (Self::Minute(a), Self::Minute(b)) => {
                a.events += b.events;
                a.launches += b.launches;
                a.revenue_cny += b.revenue_cny;
            }
            (Self::MinuteBlock(a), Self::MinuteBlock(b)) => {
                for cell in b {
                    add_minute(a, cell.minute, &cell.value);
                }
            }
            (Self::Rejects(a), Self::Rejects(b)) => *a += b,
            _ => {}
        }
    }

    /// Whether the row has at least one accepted event (or reject): SPEC §3
    /// holds a row only for such keys.
    pub fn is_present(&self) -> bool {
        match self {
            Self::Daily(v) => v.events > 0,
            Self::SessionsPerDevice(b) => b.iter().any(|&n| n > 0),
            Self::CustomEvents(v) => v.count > 0,
            Self::Minute(v) => v.events > 0,
            Self::MinuteBlock(cells) => cells.iter().any(|c| c.value.events > 0),
            Self::Rejects(n) => *n > 0,
        }
    }
}

/// One table row's partial within one key group, at a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialRow {
    /// Grows with every change of this partial; the sink keeps the newest.
    pub version: u64,
    /// Which row.
    pub key: RowKey,
    /// Its absolute partial value.
    pub value: RowValue,
}

/// Write a final (merged) row as SPEC §3 JSON: keys sorted.
pub fn write_row(key: &RowKey, value: &RowValue, out: &mut String) {
    let mut o = JsonObject::new(out);
    match (key, value) {
        (RowKey::Daily(k), RowValue::Daily(v)) => {
            o.uint("active_devices", v.active_devices);
            o.str("app", &k.app);
            o.str("channel", &k.channel);
            o.str("country", &k.country);
            o.display("day", &k.day);
            o.uint("events", v.events);
            o.uint("launches", v.launches);
            o.int("new_devices", i128::from(v.new_devices));
            o.str("os", &k.os);
            o.uint("payers", v.payers);
            o.uints("playtime_hist", &v.playtime_hist);
            o.int("playtime_s", v.playtime_s);
            o.map("revenue", v.revenue.iter().map(|(c, a)| (&**c, *a)));
        }
        (RowKey::SessionsPerDevice(k), RowValue::SessionsPerDevice(b)) => {
            o.str("app", &k.app);
            o.uints("buckets", b);
            o.display("day", &k.day);
        }
        (RowKey::CustomEvents(k), RowValue::CustomEvents(v)) => {
            o.str("app", &k.app);
            o.uint("count", v.count);
            o.display("day", &k.day);
            o.uint("devices", v.devices);
            o.str("event_id", &k.event_id);
        }
        (RowKey::Minute(k), RowValue::Minute(v)) => {
            o.str("app", &k.app);
            o.uint("events", v.events);
            o.uint("launches", v.launches);
            o.display("minute", &k.minute);
            o.int("revenue_cny", v.revenue_cny);
        }
        (RowKey::Rejects(r), RowValue::Rejects(n)) => {
            o.uint("count", *n);
            o.str("reason", r.as_str());
        }
        _ => {}
    }
    o.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_spec_bounds() {
        let hist: Vec<usize> = [0, 2, 3, 9, 10, 29, 30, 59, 60, 179, 180, 599, 600, 1799, 1800, i64::MAX]
            .into_iter()
            .map(playtime_bucket)
            .collect();
        assert_eq!(hist, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]);
        let sessions: Vec<usize> = [0, 1, 5, 6, 10, 11, 20, 21, 50, 51, 999].into_iter().map(sessions_bucket).collect();
        assert_eq!(sessions, [0, 1, 5, 6, 6, 7, 7, 8, 8, 9, 9]);
    }

    #[test]
    fn daily_row_json_has_sorted_keys() {
        let key = RowKey::Daily(DailyKey {
            app: "app-0001".into(),
            day: LocalDay(20_045),
            os: "ios".into(),
            channel: "apple".into(),
            country: "CN".into(),
        });
        let mut v = DailyValue { events: 3, launches: 1, active_devices: 1, ..Default::default() };
        v.revenue.insert("USD".into(), 99);
        v.revenue.insert("CNY".into(), 0);
        let mut s = String::new();
        write_row(&key, &RowValue::Daily(v), &mut s);
        assert_eq!(
            s,
            r#"{"active_devices":1,"app":"app-0001","channel":"apple","country":"CN","day":"2024-11-18","events":3,"launches":1,"new_devices":0,"os":"ios","payers":0,"playtime_hist":[0,0,0,0,0,0,0,0],"playtime_s":0,"revenue":{"CNY":0,"USD":99}}"#
        );
    }

    #[test]
    fn revenue_stays_sorted_and_exact_past_the_small_form() {
        let mut r = Revenue::default();
        for i in (0..100).rev() {
            r.add(&Arc::from(format!("C{i:03}")), 1);
            r.add(&Arc::from(format!("C{i:03}")), i);
        }
        assert_eq!(r.len(), 100);
        let got: Vec<(String, i128)> = r.iter().map(|(c, a)| (c.to_string(), *a)).collect();
        let want: Vec<(String, i128)> = (0..100).map(|i| (format!("C{i:03}"), 1 + i)).collect();
        assert_eq!(got, want);
        let back: Revenue = Vec::from(r.clone()).into();
        assert_eq!(back, r);
    }

    #[test]
    fn partials_add_up() {
        let mut a = RowValue::Minute(MinuteValue { events: 2, launches: 1, revenue_cny: 600 });
        a.add(&RowValue::Minute(MinuteValue { events: 1, launches: 0, revenue_cny: 1 }));
        assert_eq!(a, RowValue::Minute(MinuteValue { events: 3, launches: 1, revenue_cny: 601 }));
        assert!(!RowValue::zero(Table::Daily).is_present());
    }
}
