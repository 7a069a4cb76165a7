//! The window stage: enriched batches in, partial rows out at every commit.
//!
//! Events of one upload share app, device and dimensions, and mostly a day and
//! a few minutes; they are first summed per (day) and per (minute) locally, so
//! that the shared state is touched once per distinct day, minute and custom
//! id of an upload rather than once per event.
//!
//! Outputs are produced only at commit points: every partial row that changed
//! since the last commit is emitted once, at its next version, in one
//! [`RowBatch`] per key group. Rows between commits are never emitted, so the
//! sink's work is proportional to what changed, not to the events.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rustc_hash::FxBuildHasher;
use sluice_model::batch::{Dimensions, EnrichedBatch, EventBody, RowBatch};
use sluice_model::event_time::{LocalDay, LocalMinute};
use sluice_model::key_group::{KeyGroup, KeyGroupSet};
use sluice_model::reject::RejectReason;
use sluice_model::table::{
    AppDay, CustomKey, CustomValue, DailyKey, DailyValue, MinuteBlockKey, MinuteCell, MinuteValue, PartialRow, RowKey,
    RowValue, add_minute, playtime_bucket,
};
use sluice_runtime::stage::{Stage, StageError};
use sluice_runtime::store::changelog::ChangelogTable;
use sluice_runtime::store::{CommitBatch, CommitStore};

use crate::device_day::{DeviceDay, StoredDeviceDay};
use crate::partials::Partials;

type DeviceDayKey = (Arc<str>, Arc<str>, LocalDay);

/// The events of one upload on one day, summed.
struct DaySlot {
    day: LocalDay,
    events: u64,
    launches: u64,
    playtime_s: i128,
    playtime_hist: [u64; 8],
    paid: bool,
    revenue: Vec<(Arc<str>, i128)>,
    custom: Vec<(Arc<str>, u64)>,
}

impl DaySlot {
    fn new(day: LocalDay) -> Self {
        Self {
            day,
            events: 0,
            launches: 0,
            playtime_s: 0,
            playtime_hist: [0; 8],
            paid: false,
            revenue: Vec::new(),
            custom: Vec::new(),
        }
    }
}

/// Sort `pairs` by key and add up the values of equal keys.
fn fold_runs<V: Copy + std::ops::AddAssign>(pairs: &mut Vec<(Arc<str>, V)>) {
    if pairs.len() < 2 {
        return;
    }
    pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    // `dedup_by` hands (later, kept): fold the later into the kept one.
    pairs.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1 += later.1;
        }
        same
    });
}

/// The window stage.
pub struct Window {
    device_days: HashMap<DeviceDayKey, DeviceDay, FxBuildHasher>,
    dirty_days: Vec<DeviceDayKey>,
    device_day_log: ChangelogTable<DeviceDayKey, StoredDeviceDay>,
    daily: Partials<DailyKey, DailyValue>,
    sessions: Partials<AppDay, [u64; 10]>,
    custom: Partials<CustomKey, CustomValue>,
    minute: Partials<MinuteBlockKey, Vec<MinuteCell>>,
    rejects: Partials<RejectReason, u64>,
    /// Input records each key group accounts for (the sink's progress).
    covered: Partials<(), u64>,
    owned: Option<KeyGroupSet>,
    /// Reused per upload: (minute, event index), sorted by minute.
    scratch: Vec<(LocalMinute, usize)>,
    /// Emit changed partials as rows at commits (see [`Window::tables_in_state`]).
    emit_rows: bool,
}

impl Default for Window {
    fn default() -> Self {
        Self::new()
    }
}

/// The namespaces of the window's per-key-group state: what moves with a key group.
pub const KEY_GROUP_STATE: &[&str] = &[
    "window/device-day",
    "window/daily",
    "window/sessions",
    "window/custom",
    "window/minute",
    "window/rejects",
    "window/covered",
];

impl Window {
    /// An empty window stage.
    pub fn new() -> Self {
        Self {
            device_days: HashMap::default(),
            dirty_days: Vec::new(),
            device_day_log: ChangelogTable::new(KEY_GROUP_STATE[0]),
            daily: Partials::new(KEY_GROUP_STATE[1]),
            sessions: Partials::new(KEY_GROUP_STATE[2]),
            custom: Partials::new(KEY_GROUP_STATE[3]),
            minute: Partials::new(KEY_GROUP_STATE[4]),
            rejects: Partials::new(KEY_GROUP_STATE[5]),
            covered: Partials::new(KEY_GROUP_STATE[6]),
            owned: None,
            scratch: Vec::new(),
            emit_rows: true,
        }
    }

    /// Own only these key groups: restore reads only their state. Batches of
    /// other key groups must not be given to this instance.
    pub fn owning(mut self, key_groups: KeyGroupSet) -> Self {
        self.owned = Some(key_groups);
        self
    }

    /// Do not emit rows at commits: the window's committed partials *are* the
    /// tables. For embedded mode, where window and sink share one store and
    /// one process: a sink there would hold a second copy of every partial
    /// and rewrite it at every commit. [`Window::drain_tables`] hands the
    /// partials to a sink when the tables are wanted. Distributed mode keeps
    /// the sink's own copy: it lives in another process.
    pub fn tables_in_state(mut self) -> Self {
        self.emit_rows = false;
        self
    }

    /// Hand every partial row, at its current version, to `each` in row
    /// batches (per key group, at most 4096 rows), emptying the window; its
    /// memory is released table by table.
    pub fn drain_tables(&mut self, mut each: impl FnMut(RowBatch)) {
        self.device_days = HashMap::default();
        self.dirty_days.clear();
        let mut pending: BTreeMap<KeyGroup, Vec<PartialRow>> = BTreeMap::new();
        let mut push = |kg: KeyGroup, row: PartialRow, each: &mut dyn FnMut(RowBatch)| {
            let rows = pending.entry(kg).or_default();
            rows.push(row);
            if rows.len() >= 4096 {
                each(RowBatch { key_group: kg, rows: std::mem::take(rows), covered: 0 });
            }
        };
        let each: &mut dyn FnMut(RowBatch) = &mut each;
        self.daily.drain(|kg, version, k, v| {
            push(kg, PartialRow { version, key: RowKey::Daily(k), value: RowValue::Daily(v) }, each)
        });
        self.sessions.drain(|kg, version, k, v| {
            let row = PartialRow { version, key: RowKey::SessionsPerDevice(k), value: RowValue::SessionsPerDevice(v) };
            push(kg, row, each)
        });
        self.custom.drain(|kg, version, k, v| {
            push(kg, PartialRow { version, key: RowKey::CustomEvents(k), value: RowValue::CustomEvents(v) }, each)
        });
        self.minute.drain(|kg, version, k, v| {
            push(kg, PartialRow { version, key: RowKey::MinuteBlock(k), value: RowValue::MinuteBlock(v) }, each)
        });
        self.rejects.drain(|kg, version, k, v| {
            push(kg, PartialRow { version, key: RowKey::Rejects(k), value: RowValue::Rejects(v) }, each)
        });
        for (key_group, rows) in pending {
            if !rows.is_empty() {
                each(RowBatch { key_group, rows, covered: 0 });
            }
        }
    }

    /// Restore only the partial rows (not the device-days) of every key
    /// group: what reading the tables of an embedded state needs.
    pub fn restore_tables(&mut self, store: &CommitStore) -> Result<(), StageError> {
        self.daily.restore(store, |_| true)?;
        self.sessions.restore(store, |_| true)?;
        self.custom.restore(store, |_| true)?;
        self.minute.restore(store, |_| true)?;
        self.rejects.restore(store, |_| true)?;
        Ok(())
    }

    /// Sizes of the state: (device-days, partial rows).
    pub fn sizes(&self) -> (usize, usize) {
        let partials =
            self.daily.len() + self.sessions.len() + self.custom.len() + self.minute.len() + self.rejects.len();
        (self.device_days.len(), partials)
    }

    fn daily_key(app: &Arc<str>, day: LocalDay, d: &Dimensions) -> DailyKey {
        DailyKey { app: app.clone(), day, os: d.os.clone(), channel: d.channel.clone(), country: d.country.clone() }
    }

    fn upload(
        &mut self,
        kg: KeyGroup,
        app: &Arc<str>,
        dev: &Arc<str>,
        dims: &Dimensions,
        events: &[sluice_model::batch::EnrichedEvent],
    ) {
        let (days, minutes) = self.sum_by_time(events);
        for slot in days {
            self.apply_day(kg, app, dev, dims, slot);
        }
        for (minute, delta) in minutes {
            self.minute.update(kg, MinuteBlockKey::of(app.clone(), minute), |cells| add_minute(cells, minute, &delta));
        }
    }

    /// An upload's events summed by local day and by minute.
    fn sum_by_time(
        &mut self,
        events: &[sluice_model::batch::EnrichedEvent],
    ) -> (Vec<DaySlot>, Vec<(LocalMinute, MinuteValue)>) {
        // Sorted by time, an upload's days and minutes are runs: summing them
        // costs O(n log n) in its events, whatever their spread (an upload
        // may hold any number of events, ids and currencies).
        let mut by_time = std::mem::take(&mut self.scratch);
        by_time.clear();
        by_time.extend(events.iter().enumerate().map(|(i, e)| (LocalMinute::of_ms(e.ts), i)));
        if !by_time.is_sorted_by_key(|(m, _)| *m) {
            // SDKs send events in time order; late or merged uploads may not.
            by_time.sort_unstable_by_key(|(m, _)| *m);
        }
        let mut days: Vec<DaySlot> = Vec::with_capacity(1);
        let mut minutes: Vec<(LocalMinute, MinuteValue)> = Vec::with_capacity(4);
        for &(minute, i) in &by_time {
            let ev = &events[i];
            if days.last().is_none_or(|s| s.day != minute.day()) {
                days.push(DaySlot::new(minute.day()));
            }
            if minutes.last().is_none_or(|(m, _)| *m != minute) {
                minutes.push((minute, MinuteValue::default()));
            }
            let (Some(slot), Some((_, m))) = (days.last_mut(), minutes.last_mut()) else {
                continue; // both were pushed just above
            };
            slot.events += 1;
            m.events += 1;
            match &ev.body {
                EventBody::Launch => {
                    slot.launches += 1;
                    m.launches += 1;
                }
                EventBody::Terminate { dur } => {
                    slot.playtime_s += i128::from(*dur);
                    slot.playtime_hist[playtime_bucket(*dur)] += 1;
                }
                EventBody::Page { .. } => {}
                EventBody::Pay { amount, currency } => {
                    slot.paid = true;
                    slot.revenue.push((currency.clone(), i128::from(*amount)));
                    if &**currency == "CNY" {
                        m.revenue_cny += i128::from(*amount);
                    }
                }
                EventBody::Custom { id } => slot.custom.push((id.clone(), 1)),
            }
        }
        self.scratch = by_time;
        for slot in &mut days {
            fold_runs(&mut slot.revenue);
            fold_runs(&mut slot.custom);
        }
        (days, minutes)
    }

    /// One device's day of an upload: its device-day, and the daily,
    /// session and custom-event partials it changes.
    fn apply_day(&mut self, kg: KeyGroup, app: &Arc<str>, dev: &Arc<str>, dims: &Dimensions, slot: DaySlot) {
        let key = (app.clone(), dev.clone(), slot.day);
        let device_day = match self.device_days.entry(key) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(DeviceDay::new(kg)),
        };
        let was_dirty = device_day.dirty;
        let change = device_day.observe(dims, slot.launches, slot.paid);
        let new_custom: Vec<bool> = slot.custom.iter().map(|(id, _)| device_day.observe_custom(id)).collect();
        if !was_dirty {
            self.dirty_days.push((app.clone(), dev.clone(), slot.day));
        }
        self.daily.update(kg, Self::daily_key(app, slot.day, dims), |v| {
            v.events += slot.events;
            v.launches += slot.launches;
            v.active_devices += u64::from(change.new_in_cell);
            v.payers += u64::from(change.new_payer);
            v.playtime_s += slot.playtime_s;
            for (h, n) in v.playtime_hist.iter_mut().zip(slot.playtime_hist) {
                *h += n;
            }
            for (cur, amount) in &slot.revenue {
                v.revenue.add(cur, *amount);
            }
        });
        if let Some((from, to)) = change.bucket_move {
            self.sessions.update(kg, AppDay { app: app.clone(), day: slot.day }, |b| {
                if let Some(from) = from {
                    // The device was counted in `from` by this same partial.
                    b[from] = b[from].saturating_sub(1);
                }
                b[to] += 1;
            });
        }
        for ((id, count), new_device) in slot.custom.into_iter().zip(new_custom) {
            self.custom.update(kg, CustomKey { app: app.clone(), day: slot.day, event_id: id }, |v| {
                v.count += count;
                v.devices += u64::from(new_device);
            });
        }
    }
}

impl Stage for Window {
    type Input = EnrichedBatch;
    type Output = RowBatch;

    fn name(&self) -> &'static str {
        "window"
    }

    fn start(&mut self, store: &CommitStore) -> Result<(), StageError> {
        let owned = self.owned.clone();
        let owns = |kg| owned.as_ref().is_none_or(|o| o.contains(kg));
        self.daily.restore(store, owns)?;
        self.sessions.restore(store, owns)?;
        self.custom.restore(store, owns)?;
        self.minute.restore(store, owns)?;
        self.rejects.restore(store, owns)?;
        self.covered.restore(store, owns)?;
        let days = &mut self.device_days;
        self.device_day_log.restore_owned(store, owns, |kg, key, stored| match stored {
            Some(stored) => {
                days.insert(key, DeviceDay::from_stored(kg, stored));
            }
            None => {
                days.remove(&key);
            }
        })?;
        Ok(())
    }

    fn batch(&mut self, input: EnrichedBatch, _out: &mut Vec<RowBatch>) -> Result<(), StageError> {
        let kg = input.key_group;
        for up in &input.uploads {
            self.upload(kg, &up.app, &up.dev, &up.dimensions, &up.events);
        }
        for mv in &input.first_event_moves {
            if let Some(out_of) = &mv.out_of {
                self.daily.update(kg, Self::daily_key(&mv.app, out_of.day, &out_of.dimensions), |v| v.new_devices -= 1);
            }
            self.daily.update(kg, Self::daily_key(&mv.app, mv.into.day, &mv.into.dimensions), |v| v.new_devices += 1);
        }
        for (reason, count) in input.rejects.iter() {
            self.rejects.update(kg, reason, |n| *n += count);
        }
        if input.input.records > 0 {
            self.covered.update(kg, (), |n| *n += input.input.records);
        }
        Ok(())
    }

    fn commit(&mut self, out: &mut Vec<RowBatch>, tx: &mut CommitBatch) -> Result<(), StageError> {
        let mut by_kg: BTreeMap<KeyGroup, Vec<PartialRow>> = BTreeMap::new();
        let emit_rows = self.emit_rows;
        let mut emit = |kg: KeyGroup, version: u64, key: &dyn Fn() -> RowKey, value: &dyn Fn() -> RowValue| {
            if emit_rows {
                by_kg.entry(kg).or_default().push(PartialRow { version, key: key(), value: value() });
            }
        };
        self.daily
            .commit(tx, |kg, v, k, x| emit(kg, v, &|| RowKey::Daily(k.clone()), &|| RowValue::Daily(x.clone())))?;
        self.sessions.commit(tx, |kg, v, k, x| {
            emit(kg, v, &|| RowKey::SessionsPerDevice(k.clone()), &|| RowValue::SessionsPerDevice(*x))
        })?;
        self.custom.commit(tx, |kg, v, k, x| {
            emit(kg, v, &|| RowKey::CustomEvents(k.clone()), &|| RowValue::CustomEvents(*x))
        })?;
        self.minute.commit(tx, |kg, v, k, x| {
            emit(kg, v, &|| RowKey::MinuteBlock(k.clone()), &|| RowValue::MinuteBlock(x.clone()))
        })?;
        self.rejects.commit(tx, |kg, v, k, x| emit(kg, v, &|| RowKey::Rejects(*k), &|| RowValue::Rejects(*x)))?;
        self.covered.commit(tx, |kg, _, _, _| {
            if emit_rows {
                by_kg.entry(kg).or_default();
            }
        })?;
        let covered = &self.covered;
        out.extend(by_kg.into_iter().map(|(key_group, rows)| RowBatch {
            key_group,
            rows,
            covered: covered.get(key_group, &()).copied().unwrap_or(0),
        }));

        let dirty = std::mem::take(&mut self.dirty_days);
        let mut changes: BTreeMap<KeyGroup, Vec<(&DeviceDayKey, Option<StoredDeviceDay>)>> = BTreeMap::new();
        for key in &dirty {
            if let Some(day) = self.device_days.get_mut(key) {
                day.dirty = false;
                changes.entry(day.key_group).or_default().push((key, Some(day.to_stored())));
            }
        }
        let days = &self.device_days;
        self.device_day_log.commit(tx, changes, || {
            let mut all: BTreeMap<KeyGroup, Vec<(&DeviceDayKey, Option<StoredDeviceDay>)>> = BTreeMap::new();
            for (key, day) in days {
                all.entry(day.key_group).or_default().push((key, Some(day.to_stored())));
            }
            all
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use sluice_model::batch::{DailyCell, EnrichedEvent, EnrichedUpload, FirstEventMove};
    use sluice_model::lineage::Lineage;
    use sluice_runtime::store::StateSettings;

    use super::*;

    fn dims() -> Dimensions {
        Dimensions { os: "ios".into(), channel: "apple".into(), country: "CN".into() }
    }

    const DAY_MS: i64 = 86_400_000;
    const T0: i64 = 1_731_859_200_000; // local midnight 2024-11-18

    fn upload(dev: &str, events: Vec<(i64, EventBody)>) -> EnrichedUpload {
        EnrichedUpload {
            lineage: Lineage::line(0),
            app: "app-1".into(),
            dev: dev.into(),
            dimensions: dims(),
            events: events
                .into_iter()
                .enumerate()
                .map(|(i, (ts, body))| EnrichedEvent { index: i as u32, ts, body })
                .collect(),
        }
    }

    fn rows(w: &mut Window) -> Vec<PartialRow> {
        let mut out = Vec::new();
        w.commit(&mut out, &mut CommitBatch::default()).expect("commit");
        out.into_iter().flat_map(|b| b.rows).collect()
    }

    #[test]
    fn aggregates_one_key_group_exactly() {
        let mut w = Window::new();
        let pay = |amount, cur: &str| EventBody::Pay { amount, currency: cur.into() };
        let batch = EnrichedBatch {
            key_group: KeyGroup(1),
            uploads: vec![
                upload(
                    "d1",
                    vec![
                        (T0, EventBody::Launch),
                        (T0 + 1, pay(600, "CNY")),
                        (T0 + 2, EventBody::Terminate { dur: 45 }),
                    ],
                ),
                upload("d1", vec![(T0 + 61_000, EventBody::Launch), (T0 + 62_000, pay(99, "USD"))]),
                upload(
                    "d2",
                    vec![(T0 + DAY_MS - 1, EventBody::Custom { id: "share".into() }), (T0 + DAY_MS, EventBody::Launch)],
                ),
            ],
            first_event_moves: vec![FirstEventMove {
                lineage: Lineage::line(0),
                app: "app-1".into(),
                dev: "d1".into(),
                out_of: None,
                into: DailyCell { day: LocalDay::of_ms(T0), dimensions: dims() },
            }],
            ..Default::default()
        };
        w.batch(batch, &mut Vec::new()).expect("batch");
        let rows = rows(&mut w);
        let day0 = LocalDay::of_ms(T0);
        let daily = rows.iter().find_map(|r| match (&r.key, &r.value) {
            (RowKey::Daily(k), RowValue::Daily(v)) if k.day == day0 => Some(v.clone()),
            _ => None,
        });
        let daily = daily.expect("daily row of day 0");
        // d1: 5 events; d2: its custom event one ms before midnight falls on day 0 too.
        let counts = (daily.events, daily.launches, daily.active_devices, daily.new_devices);
        assert_eq!(counts, (6, 2, 2, 1));
        assert_eq!((daily.payers, daily.playtime_s, daily.playtime_hist[3]), (1, 45, 1));
        assert_eq!(
            daily.revenue.into_iter().map(|(c, a)| (c.to_string(), a)).collect::<Vec<_>>(),
            [("CNY".into(), 600), ("USD".into(), 99)]
        );
        let sessions = rows.iter().find_map(|r| match (&r.key, &r.value) {
            (RowKey::SessionsPerDevice(k), RowValue::SessionsPerDevice(b)) if k.day == day0 => Some(*b),
            _ => None,
        });
        assert_eq!(sessions, Some([1, 0, 1, 0, 0, 0, 0, 0, 0, 0]), "d1: 2 launches; d2 (day 0): 0 launches");
        assert!(rows.iter().all(|r| r.version == 1));
        assert!(self::rows(&mut w).is_empty(), "nothing changed since the last commit");
    }

    fn find<T>(rows: &[PartialRow], pick: impl Fn(&RowKey, &RowValue) -> Option<T>) -> Vec<T> {
        rows.iter().filter_map(|r| pick(&r.key, &r.value)).collect()
    }

    #[test]
    fn custom_events_count_events_and_distinct_devices() {
        let mut w = Window::new();
        let custom = |id: &str| EventBody::Custom { id: id.into() };
        let batch = EnrichedBatch {
            key_group: KeyGroup(4),
            uploads: vec![
                upload("d1", vec![(T0, custom("share")), (T0 + 1, custom("share")), (T0 + 2, custom("level_up"))]),
                upload("d1", vec![(T0 + 3, custom("share"))]),
                upload("d2", vec![(T0 + 4, custom("share")), (T0 + DAY_MS, custom("share"))]),
            ],
            ..Default::default()
        };
        w.batch(batch, &mut Vec::new()).expect("batch");
        let day0 = LocalDay::of_ms(T0);
        let got = find(&rows(&mut w), |k, v| match (k, v) {
            (RowKey::CustomEvents(k), RowValue::CustomEvents(v)) => {
                Some((k.day == day0, k.event_id.to_string(), v.count, v.devices))
            }
            _ => None,
        });
        let mut got = got;
        got.sort();
        assert_eq!(
            got,
            [(false, "share".into(), 1, 1), (true, "level_up".into(), 1, 1), (true, "share".into(), 4, 2)],
            "d1 sends share three times on day 0 but counts once among its devices"
        );
    }

    #[test]
    fn minute_blocks_hold_one_cell_per_minute() {
        let mut w = Window::new();
        let pay = |amount, cur: &str| EventBody::Pay { amount, currency: cur.into() };
        let batch = EnrichedBatch {
            key_group: KeyGroup(0),
            uploads: vec![
                upload(
                    "d1",
                    vec![(T0, EventBody::Launch), (T0 + 59_999, pay(600, "CNY")), (T0 + 60_000, pay(99, "USD"))],
                ),
                upload("d2", vec![(T0 + 3_600_000, EventBody::Launch)]),
            ],
            ..Default::default()
        };
        w.batch(batch, &mut Vec::new()).expect("batch");
        let blocks = find(&rows(&mut w), |k, v| match (k, v) {
            (RowKey::MinuteBlock(k), RowValue::MinuteBlock(cells)) => Some((k.hour, cells.clone())),
            _ => None,
        });
        let hour0 = LocalMinute::of_ms(T0).hour();
        let cells = |h| blocks.iter().find(|(hour, _)| *hour == h).map(|(_, c)| c.clone()).unwrap_or_default();
        let first: Vec<(i64, u64, u64, i128)> = cells(hour0)
            .iter()
            .map(|c| (c.minute.0 % 60, c.value.events, c.value.launches, c.value.revenue_cny))
            .collect();
        assert_eq!(first, [(0, 2, 1, 600), (1, 1, 0, 0)], "USD is not revenue_cny");
        assert_eq!(cells(hour0 + 1).len(), 1);
    }

    #[test]
    fn rejects_and_first_event_moves_become_partials() {
        let mut w = Window::new();
        let mut rejects = sluice_model::reject::RejectCounts::default();
        rejects.add(RejectReason::Duplicate);
        rejects.add(RejectReason::Duplicate);
        rejects.add(RejectReason::BadValue);
        let cell = |day_ms: i64| DailyCell { day: LocalDay::of_ms(day_ms), dimensions: dims() };
        let batch = EnrichedBatch {
            key_group: KeyGroup(9),
            uploads: vec![upload("d1", vec![(T0, EventBody::Launch), (T0 + DAY_MS, EventBody::Launch)])],
            first_event_moves: vec![
                FirstEventMove {
                    lineage: Lineage::line(0),
                    app: "app-1".into(),
                    dev: "d1".into(),
                    out_of: None,
                    into: cell(T0 + DAY_MS),
                },
                FirstEventMove {
                    lineage: Lineage::line(1),
                    app: "app-1".into(),
                    dev: "d1".into(),
                    out_of: Some(cell(T0 + DAY_MS)),
                    into: cell(T0),
                },
            ],
            rejects,
            input: sluice_model::batch::InputSpan { records: 4, last: Lineage::line(3) },
        };
        w.batch(batch, &mut Vec::new()).expect("batch");
        let rows = rows(&mut w);
        let mut rejects = find(&rows, |k, v| match (k, v) {
            (RowKey::Rejects(r), RowValue::Rejects(n)) => Some((r.as_str(), *n)),
            _ => None,
        });
        rejects.sort();
        assert_eq!(rejects, [("bad_value", 1), ("duplicate", 2)]);
        let mut new_devices = find(&rows, |k, v| match (k, v) {
            (RowKey::Daily(k), RowValue::Daily(v)) => Some((k.day, v.new_devices)),
            _ => None,
        });
        new_devices.sort();
        assert_eq!(
            new_devices,
            [(LocalDay::of_ms(T0), 1), (LocalDay::of_ms(T0 + DAY_MS), 0)],
            "retracted from the later day"
        );
    }

    #[test]
    fn state_survives_a_restart() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = CommitStore::open(dir.path(), &StateSettings::default())?;
        let one = || EnrichedBatch {
            key_group: KeyGroup(2),
            uploads: vec![upload("d1", vec![(T0, EventBody::Launch)])],
            ..Default::default()
        };
        let mut w = Window::new();
        w.batch(one(), &mut Vec::new())?;
        let mut tx = CommitBatch::default();
        w.commit(&mut Vec::new(), &mut tx)?;
        store.commit(tx)?;

        let mut w = Window::new();
        w.start(&store)?;
        w.batch(one(), &mut Vec::new())?;
        let rows = rows(&mut w);
        let daily = rows.iter().find_map(|r| match &r.value {
            RowValue::Daily(v) => Some((r.version, v.events, v.active_devices)),
            _ => None,
        });
        assert_eq!(daily, Some((2, 2, 1)), "version grows, the device is not counted twice");
        Ok(())
    }
}
