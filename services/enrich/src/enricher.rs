//! The enrich stage: rules 3-4, dimensions, the device registry.
//!
//! For every upload of a raw batch, in order: a source reject is counted;
//! an unknown app is rejected (rule 3); a message id the device had accepted
//! before is a duplicate (rule 4); otherwise the message is accepted, its
//! rejected events are counted now (never before: rules 3-4 come first), its
//! accepted events get the message's dimensions, and the earliest of them is
//! offered to the device registry as the device's first event.
//!
//! State is the registry, kept in memory and written to the commit store for
//! the devices that changed since the last commit, under the key group they
//! belong to (so a key group's state is one contiguous key range).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rustc_hash::FxBuildHasher;
use sluice_model::batch::{DailyCell, EnrichedBatch, EnrichedEvent, EnrichedUpload, FirstEventMove, RawBatch};
use sluice_model::event_time::LocalDay;
use sluice_model::key_group::{KeyGroup, KeyGroupSet};
use sluice_model::reject::RejectReason;
use sluice_runtime::observe::metrics::Metrics;
use sluice_runtime::stage::{Stage, StageError};
use sluice_runtime::store::changelog::ChangelogTable;
use sluice_runtime::store::{CommitBatch, CommitStore};

use crate::dimensions::{DimensionCache, DimensionTables};
use crate::registry::{DeviceRecord, FirstEvent, StoredDevice};
use crate::settings::EnrichSettings;

type DeviceKey = (Arc<str>, Arc<str>);

struct Device {
    /// The registry's copies of app and device, shared by every record of
    /// the device it emits.
    key: DeviceKey,
    key_group: KeyGroup,
    record: DeviceRecord,
    /// Changed since the last commit (and listed in `Enricher::dirty`).
    dirty: bool,
}

/// The namespace of the device registry: per key group, what moves with it.
pub const DEVICE_NAMESPACE: &str = "enrich/device";

/// The enrich stage.
pub struct Enricher {
    tables: Arc<DimensionTables>,
    cache: DimensionCache,
    dedup_window_ms: i64,
    devices: HashMap<DeviceKey, Device, FxBuildHasher>,
    dirty: Vec<DeviceKey>,
    log: ChangelogTable<DeviceKey, StoredDevice>,
    owned: Option<KeyGroupSet>,
}

impl Enricher {
    /// A stage over these dimension tables.
    pub fn new(tables: Arc<DimensionTables>, settings: &EnrichSettings) -> Self {
        let dedup_window_ms = i64::try_from(settings.dedup_window.as_millis()).unwrap_or(i64::MAX);
        Self {
            tables,
            cache: DimensionCache::default(),
            dedup_window_ms,
            devices: HashMap::default(),
            dirty: Vec::new(),
            log: ChangelogTable::new(DEVICE_NAMESPACE),
            owned: None,
        }
    }

    /// Own only these key groups: restore reads only their state. Batches of
    /// other key groups must not be given to this instance.
    pub fn owning(mut self, key_groups: KeyGroupSet) -> Self {
        self.owned = Some(key_groups);
        self
    }

    /// Whether the state of `kg` is here (every key group, unless
    /// [`Enricher::owning`] narrowed it).
    pub fn owns(&self, kg: KeyGroup) -> bool {
        self.owned.as_ref().is_none_or(|o| o.contains(kg))
    }

    /// Devices in the registry.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// The dimension tables in use.
    pub fn tables(&self) -> &Arc<DimensionTables> {
        &self.tables
    }

    /// Replace the dimension tables (a reload): uploads enriched from now on
    /// use them. Records already enriched keep the dimensions they got.
    pub fn replace_tables(&mut self, tables: Arc<DimensionTables>) {
        self.tables = tables;
        self.cache = DimensionCache::default();
    }

    /// What the registry holds for a device of an app, if anything.
    pub fn device(&self, app: &str, dev: &str) -> Option<&DeviceRecord> {
        self.devices.get(&(Arc::from(app), Arc::from(dev))).map(|d| &d.record)
    }

    /// What [`Stage::batch`] would emit for `input`, without changing the
    /// registry: the devices the batch touches are copied into a scratch
    /// enricher that processes it.
    pub fn preview(&self, input: RawBatch) -> Result<EnrichedBatch, StageError> {
        let mut scratch = Enricher {
            tables: self.tables.clone(),
            cache: DimensionCache::default(),
            dedup_window_ms: self.dedup_window_ms,
            devices: HashMap::default(),
            dirty: Vec::new(),
            log: ChangelogTable::new("enrich/preview"),
            owned: None,
        };
        for up in input.uploads.iter().filter_map(|u| u.body.as_ref().ok()) {
            let key = (up.app.clone(), up.dev.clone());
            if let Some(device) = self.devices.get(&key) {
                let copy = Device {
                    key: device.key.clone(),
                    key_group: device.key_group,
                    record: device.record.clone(),
                    dirty: false,
                };
                scratch.devices.insert(key, copy);
            }
        }
        let mut out = Vec::with_capacity(1);
        scratch.batch(input, &mut out)?;
        Ok(out.pop().unwrap_or_default())
    }
}

impl Stage for Enricher {
    type Input = RawBatch;
    type Output = EnrichedBatch;

    fn name(&self) -> &'static str {
        "enrich"
    }

    fn start(&mut self, store: &CommitStore) -> Result<(), StageError> {
        let devices = &mut self.devices;
        let owned = &self.owned;
        let owns = |kg| owned.as_ref().is_none_or(|o| o.contains(kg));
        self.log.restore_owned(store, owns, |kg, key, stored| match stored {
            Some(stored) => {
                devices.insert(
                    key.clone(),
                    Device { key, key_group: kg, record: DeviceRecord::from_stored(stored), dirty: false },
                );
            }
            None => {
                devices.remove(&key);
            }
        })?;
        Ok(())
    }

    fn batch(&mut self, input: RawBatch, out: &mut Vec<EnrichedBatch>) -> Result<(), StageError> {
        let kg = input.key_group;
        let mut batch = EnrichedBatch { key_group: kg, ..Default::default() };
        batch.input.records = input.uploads.len() as u64;
        batch.input.last = input.uploads.last().map(|u| u.lineage).unwrap_or_default();
        for raw in input.uploads {
            let up = match raw.body {
                Ok(up) => up,
                Err(reason) => {
                    batch.rejects.add(reason);
                    continue;
                }
            };
            if self.tables.app(&up.app).is_none() {
                batch.rejects.add(RejectReason::UnknownApp);
                continue;
            }
            let app = self.cache.app(&up.app);
            let key = (app, up.dev);
            let device = self.devices.entry(key.clone()).or_insert_with(|| Device {
                key,
                key_group: kg,
                record: DeviceRecord::default(),
                dirty: false,
            });
            if device.record.is_duplicate(&up.mid) {
                batch.rejects.add(RejectReason::Duplicate);
                continue;
            }
            device.record.remember(&up.mid, up.sent, self.dedup_window_ms);
            if !device.dirty {
                device.dirty = true;
                self.dirty.push(device.key.clone());
            }
            // The registry's own copies of app and device: every record of a
            // device downstream shares one allocation, so the window's lookups
            // compare pointers instead of bytes.
            let (app, dev) = device.key.clone();
            let dimensions =
                self.cache.dimensions(&self.tables, up.os.as_deref(), up.channel.as_deref(), up.ip.as_deref());
            let mut events = Vec::with_capacity(up.events.len());
            for (index, ev) in up.events.into_iter().enumerate() {
                match ev.body {
                    Err(reason) => batch.rejects.add(reason),
                    // An upload of more than 4 billion events cannot be framed.
                    Ok(body) => events.push(EnrichedEvent { index: index as u32, ts: ev.ts, body }),
                }
            }
            if let Some(first) = events.iter().min_by_key(|e| (e.ts, e.index)) {
                if device.record.would_be_first(first.ts, &up.mid, first.index) {
                    let into = DailyCell { day: LocalDay::of_ms(first.ts), dimensions: dimensions.clone() };
                    let candidate =
                        FirstEvent { ts: first.ts, mid: up.mid.clone(), index: first.index, cell: into.clone() };
                    if let Some(out_of) = device.record.offer_first(candidate) {
                        let (app, dev) = (app.clone(), dev.clone());
                        batch.first_event_moves.push(FirstEventMove { lineage: raw.lineage, app, dev, out_of, into });
                    }
                }
                batch.uploads.push(EnrichedUpload { lineage: raw.lineage, app, dev, dimensions, events });
            }
        }
        out.push(batch);
        Ok(())
    }

    /// What an enriched batch says for the metrics: its accepted events and
    /// every reject of its input (the source's included: they travel in the
    /// raw batch), so `sluice_records_rejected_total` of enrich is the
    /// rejects table's total.
    fn count_output(output: &EnrichedBatch, metrics: &Metrics) {
        metrics.events_accepted.inc_by(output.uploads.iter().map(|u| u.events.len() as u64).sum());
        metrics.rejects(&output.rejects);
    }

    fn commit(&mut self, _out: &mut Vec<EnrichedBatch>, tx: &mut CommitBatch) -> Result<(), StageError> {
        let mut changes: BTreeMap<KeyGroup, Vec<(&DeviceKey, Option<StoredDevice>)>> = BTreeMap::new();
        let dirty = std::mem::take(&mut self.dirty);
        for key in &dirty {
            if let Some(device) = self.devices.get_mut(key) {
                device.dirty = false;
            }
        }
        for key in &dirty {
            if let Some((key, device)) = self.devices.get_key_value(key) {
                changes.entry(device.key_group).or_default().push((key, Some(device.record.to_stored())));
            }
        }
        let devices = &self.devices;
        self.log.commit(tx, changes, || {
            let mut all: BTreeMap<KeyGroup, Vec<(&DeviceKey, Option<StoredDevice>)>> = BTreeMap::new();
            for (key, device) in devices {
                all.entry(device.key_group).or_default().push((key, Some(device.record.to_stored())));
            }
            all
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use sluice_model::batch::{EventBody, RawEvent, RawUpload, Upload};
    use sluice_model::lineage::Lineage;
    use sluice_runtime::store::StateSettings;

    use super::*;

    fn tables() -> Arc<DimensionTables> {
        Arc::new(
            DimensionTables::from_csv(
                "app_key,name,kind\napp-1,A,game\n",
                "start_ip,end_ip,country,region\n1.0.0.0,1.0.0.255,US,Texas\n",
                "raw,group\nappstore,apple\n",
            )
            .expect("valid"),
        )
    }

    fn upload(line: u64, mid: &str, app: &str, events: Vec<RawEvent>) -> RawUpload {
        RawUpload {
            lineage: Lineage::line(line),
            body: Ok(Upload {
                mid: mid.into(),
                app: app.into(),
                dev: "d-1".into(),
                os: Some("iOS".into()),
                channel: Some(" AppStore".into()),
                ip: Some("1.0.0.7".into()),
                sent: 1_000_000,
                events,
            }),
        }
    }

    fn launch(ts: i64) -> RawEvent {
        RawEvent { ts, body: Ok(EventBody::Launch) }
    }

    fn run(e: &mut Enricher, uploads: Vec<RawUpload>) -> EnrichedBatch {
        let mut out = Vec::new();
        e.batch(RawBatch { key_group: KeyGroup(3), uploads }, &mut out).expect("batch");
        out.pop().expect("one batch out")
    }

    #[test]
    fn rules_3_and_4_come_before_event_rejects() {
        let mut e = Enricher::new(tables(), &EnrichSettings::default());
        let bad = RawEvent { ts: 0, body: Err(RejectReason::BadValue) };
        let out = run(
            &mut e,
            vec![
                RawUpload { lineage: Lineage::line(0), body: Err(RejectReason::Malformed) },
                upload(1, "m1", "app-9", vec![bad.clone()]),
                upload(2, "m1", "app-1", vec![launch(1_000), bad.clone()]),
                upload(3, "m1", "app-1", vec![launch(1_000), bad]),
            ],
        );
        let rejects: Vec<(RejectReason, u64)> = out.rejects.iter().collect();
        use RejectReason::*;
        assert_eq!(rejects, [(Malformed, 1), (UnknownApp, 1), (Duplicate, 1), (BadValue, 1)]);
        assert_eq!(out.uploads.len(), 1);
        let dims = &out.uploads[0].dimensions;
        assert_eq!((&*dims.os, &*dims.channel, &*dims.country), ("ios", "apple", "US"));
        assert_eq!(out.first_event_moves.len(), 1);
        assert_eq!(out.first_event_moves[0].out_of, None);
    }

    #[test]
    fn late_data_retracts_and_state_survives_a_restart() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = CommitStore::open(dir.path(), &StateSettings::default())?;
        let mut e = Enricher::new(tables(), &EnrichSettings::default());
        e.start(&store)?;
        run(&mut e, vec![upload(0, "m2", "app-1", vec![launch(90_000_000)])]);
        let mut tx = CommitBatch::default();
        e.commit(&mut Vec::new(), &mut tx)?;
        store.commit(tx)?;
        drop(e);

        let mut e = Enricher::new(tables(), &EnrichSettings::default());
        e.start(&store)?;
        assert_eq!(e.devices(), 1);
        let out =
            run(&mut e, vec![upload(1, "m2", "app-1", vec![launch(1)]), upload(2, "m1", "app-1", vec![launch(1)])]);
        assert_eq!(out.rejects.iter().collect::<Vec<_>>(), [(RejectReason::Duplicate, 1)]);
        let mv = &out.first_event_moves[0];
        assert_eq!(mv.out_of.as_ref().map(|c| c.day), Some(LocalDay::of_ms(90_000_000)));
        assert_eq!(mv.into.day, LocalDay::of_ms(1));
        Ok(())
    }
}
