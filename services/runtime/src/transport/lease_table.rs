//! The lease table in a NATS KV bucket: one key per leased group (a stage's
//! key groups, the source's partitions), its value the JSON of a
//! [`LeaseTable`], changed only by compare-and-set on the entry's revision.
//!
//! nats-server 2.9 (Debian's) has no per-key TTL, and async-nats's
//! `create_key_value` cannot parse 2.9's account-info reply, so the bucket's
//! stream is created here by hand, the way the KV layer lays it out, and
//! opened with `get_key_value`. Expiry lives in the value (each member's
//! `ttl_ms`, judged by [`Liveness`]), not in the server.
//!
//! A heartbeat task reads the table, runs [`step`] and writes the result
//! every `heartbeat_interval`; each successful write becomes the [`View`]
//! the service acts on. Write failures are retried at the next beat; a
//! member whose last successful write is older than its ttl must consider
//! its leases gone ([`View::is_current`]), because others may already have
//! taken them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::protocol::ownership::{Fenced, LeaseTable, Liveness, Me, checkpoint, step};

/// What can go wrong with the lease table.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// NATS failed.
    #[error("lease table {bucket}/{key}: {detail}")]
    Transport {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// What failed.
        detail: String,
    },
    /// The stored table cannot be read.
    #[error("lease table {key}: {detail}")]
    Table {
        /// The key.
        key: String,
        /// Why.
        detail: String,
    },
    /// The member no longer holds a unit it tried to checkpoint or release.
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// The heartbeat task ended.
    #[error("the lease heartbeat stopped")]
    Stopped,
}

/// One successful heartbeat: what the member holds, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The table as written.
    pub table: LeaseTable,
    /// Units held, with their fences.
    pub held: BTreeMap<u32, u64>,
    /// Units held that the plan gives to another member.
    pub to_release: BTreeSet<u32>,
    /// When the write was made.
    pub written_at: Instant,
    /// The member's ttl: the holdings are valid until `written_at + ttl`.
    pub ttl: Duration,
}

impl View {
    /// Whether the holdings can still be trusted at `now`: no other member
    /// can have taken a unit over before the member's ttl has passed since
    /// its last write, as they measure it from when they saw that write.
    pub fn is_current(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.written_at) < self.ttl
    }
}

/// Create (if missing) and open the KV bucket `bucket`, laid out as the KV
/// layer expects: one stream `KV_<bucket>`, the last value per key, rollups
/// allowed, deletes denied, direct gets allowed.
pub async fn open_bucket(js: &jetstream::Context, bucket: &str, replicas: usize) -> Result<kv::Store, LeaseError> {
    let fail = |detail: String| LeaseError::Transport { bucket: bucket.into(), key: String::new(), detail };
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        // A few revisions back: a table overwritten by a value no member
        // wrote is restored from the newest readable one ([`read`]).
        max_messages_per_subject: TABLE_HISTORY,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: replicas,
        ..Default::default()
    };
    let mut stream = js
        .get_or_create_stream(config.clone())
        .await
        .map_err(|e| fail(format!("creating the bucket's stream: {e}")))?;
    // A bucket made by an earlier version kept one revision: keep more.
    let info = stream.info().await.map_err(|e| fail(format!("reading the bucket's stream: {e}")))?;
    if info.config.max_messages_per_subject < TABLE_HISTORY {
        let wider = stream::Config { max_messages_per_subject: TABLE_HISTORY, ..info.config.clone() };
        js.update_stream(wider).await.map_err(|e| fail(format!("keeping {TABLE_HISTORY} revisions: {e}")))?;
    }
    js.get_key_value(bucket).await.map_err(|e| fail(format!("opening the bucket: {e}")))
}

/// Revisions of each lease table the bucket keeps.
const TABLE_HISTORY: i64 = 8;

/// A member's handle on its group's lease table.
pub struct LeaseGroup {
    store: kv::Store,
    bucket: String,
    key: String,
    name: String,
    units: usize,
    view: watch::Receiver<Option<View>>,
    leaving: Arc<AtomicBool>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// How a member joins.
#[derive(Debug, Clone)]
pub struct Membership {
    /// The bucket.
    pub bucket: String,
    /// The group's key in it (the stage, or `source`).
    pub key: String,
    /// How many units the group leases.
    pub units: usize,
    /// The member.
    pub me: Me,
    /// How often it heartbeats.
    pub interval: Duration,
    /// Replicas of the bucket, when it is created (`nats.replicas`).
    pub replicas: usize,
}

impl LeaseGroup {
    /// Join the group: start heartbeating. The first [`View`] arrives after
    /// the first successful write ([`LeaseGroup::first_view`]).
    pub async fn join(js: &jetstream::Context, m: Membership) -> Result<Self, LeaseError> {
        let store = open_bucket(js, &m.bucket, m.replicas).await?;
        let (tx, view) = watch::channel(None);
        let leaving = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let task = tokio::spawn(heartbeat(store.clone(), m.clone(), tx, leaving.clone(), stop.clone()));
        Ok(Self { store, bucket: m.bucket, key: m.key, name: m.me.name, units: m.units, view, leaving, stop, task })
    }

    /// The member's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Updates of the view.
    pub fn watch(&self) -> watch::Receiver<Option<View>> {
        self.view.clone()
    }

    /// Wait for the first successful heartbeat.
    pub async fn first_view(&mut self) -> Result<View, LeaseError> {
        loop {
            if let Some(v) = self.view.borrow_and_update().clone() {
                return Ok(v);
            }
            self.view.changed().await.map_err(|_| LeaseError::Stopped)?;
        }
    }

    /// Take nothing more and give everything up at the next beats.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::SeqCst);
    }

    /// Record `checkpoints` (unit → (fence held at, checkpoint)), releasing
    /// the units too with `release`. Fails with [`LeaseError::Fenced`] if a
    /// unit moved on.
    pub async fn checkpoint(
        &self,
        checkpoints: &BTreeMap<u32, (u64, Option<u64>)>,
        release: bool,
    ) -> Result<(), LeaseError> {
        if checkpoints.is_empty() {
            return Ok(());
        }
        self.modify(|table| Ok(Some(checkpoint(table, &self.name, checkpoints, release)?))).await
    }

    /// Stop heartbeating and remove this member from the table if it owns
    /// nothing (else others take its units over once its ttl passed).
    pub async fn depart(&self) -> Result<(), LeaseError> {
        self.stop.cancel();
        self.task.abort();
        let name = self.name.clone();
        let modify = |table: &LeaseTable| {
            if table.leases.iter().any(|l| l.owner.as_deref() == Some(name.as_str())) {
                return Ok(None);
            }
            let mut next = table.clone();
            Ok(next.members.remove(&name).map(|_| next))
        };
        modify_table(&self.store, &self.bucket, &self.key, self.units, modify).await
    }

    async fn modify(
        &self,
        f: impl Fn(&LeaseTable) -> Result<Option<LeaseTable>, LeaseError>,
    ) -> Result<(), LeaseError> {
        modify_table(&self.store, &self.bucket, &self.key, self.units, f).await
    }
}

/// Read the table (a fresh one if the key is new), with its revision.
async fn read(
    store: &kv::Store,
    bucket: &str,
    key: &str,
    units: usize,
) -> Result<(LeaseTable, Option<u64>), LeaseError> {
    let entry = store.entry(key).await.map_err(|e| LeaseError::Transport {
        bucket: bucket.into(),
        key: key.into(),
        detail: format!("reading: {e}"),
    })?;
    let Some(entry) = entry else {
        return Ok((LeaseTable::new(units), None));
    };
    let table = match (entry.operation, serde_json::from_slice::<LeaseTable>(&entry.value)) {
        (kv::Operation::Put, Ok(table)) => table,
        (operation, read) => {
            // No member writes anything but a table, and none deletes it: a
            // later member may not start over from a fresh table (its fences
            // would go back). What was there before still holds.
            let why = match read {
                Err(e) if operation == kv::Operation::Put => format!("not a lease table: {e}"),
                _ => format!("{operation:?} of the key"),
            };
            let Some(table) = newest_readable(store, key).await else {
                return Err(LeaseError::Table {
                    key: key.into(),
                    detail: format!("{why}, and no earlier revision is a lease table"),
                });
            };
            tracing::warn!(
                %bucket, %key, revision = entry.revision, %why,
                "the lease table was overwritten by something no member wrote; going on from the revision before"
            );
            table
        }
    };
    table.v.check("lease table").map_err(|e| LeaseError::Table { key: key.into(), detail: e.to_string() })?;
    if table.leases.len() != units {
        return Err(LeaseError::Table {
            key: key.into(),
            detail: format!(
                "it leases {} units where this instance expects {units}: pipeline.key_groups (or the topic's \
                 partition count) differs between instances",
                table.leases.len()
            ),
        });
    }
    Ok((table, Some(entry.revision)))
}

/// The newest revision of `key` that is a lease table (the bucket keeps
/// [`TABLE_HISTORY`]), if any.
async fn newest_readable(store: &kv::Store, key: &str) -> Option<LeaseTable> {
    use futures_util::StreamExt;
    let mut history = store.history(key).await.ok()?;
    let mut newest = None;
    while let Some(Ok(entry)) = history.next().await {
        if entry.operation == kv::Operation::Put
            && let Ok(table) = serde_json::from_slice::<LeaseTable>(&entry.value)
        {
            newest = Some(table);
        }
        if entry.delta == 0 {
            break;
        }
    }
    newest
}

/// Compare-and-set `table` over `revision` (`None`: the key must not exist).
/// `Ok(false)`: someone else wrote first.
async fn write(
    store: &kv::Store,
    bucket: &str,
    key: &str,
    table: &LeaseTable,
    revision: Option<u64>,
) -> Result<bool, LeaseError> {
    let fail = |detail: String| LeaseError::Transport { bucket: bucket.into(), key: key.into(), detail };
    let value = serde_json::to_vec(table).map_err(|e| fail(format!("encoding: {e}")))?;
    let result = match revision {
        None => store
            .create(key, value.into())
            .await
            .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string())),
        Some(r) => store
            .update(key, value.into(), r)
            .await
            .map_err(|e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string())),
    };
    match result {
        Ok(_) => Ok(true),
        Err((true, _)) => Ok(false),
        // nats-server 2.9 reports a wrong revision as a plain API error.
        Err((false, e)) if e.contains("wrong last sequence") || e.contains("10071") => Ok(false),
        Err((false, e)) => Err(fail(format!("writing: {e}"))),
    }
}

/// Read, change with `f` (`None`: nothing to change) and compare-and-set,
/// retrying on conflicts.
async fn modify_table(
    store: &kv::Store,
    bucket: &str,
    key: &str,
    units: usize,
    f: impl Fn(&LeaseTable) -> Result<Option<LeaseTable>, LeaseError>,
) -> Result<(), LeaseError> {
    loop {
        let (table, revision) = read(store, bucket, key, units).await?;
        let Some(next) = f(&table)? else { return Ok(()) };
        if write(store, bucket, key, &next, revision).await? {
            return Ok(());
        }
    }
}

async fn heartbeat(
    store: kv::Store,
    m: Membership,
    tx: watch::Sender<Option<View>>,
    leaving: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut liveness = Liveness::default();
    let mut tick = tokio::time::interval(m.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let me = Me { leaving: leaving.load(Ordering::SeqCst), ..m.me.clone() };
        match beat(&store, &m, &me, &mut liveness).await {
            Ok(view) => {
                tx.send_replace(Some(view));
            }
            Err(e) => tracing::warn!(group = %m.key, member = %me.name, "lease heartbeat failed (retrying): {e}"),
        }
    }
}

/// One heartbeat: read, step, write; retried at once on a conflict.
async fn beat(store: &kv::Store, m: &Membership, me: &Me, liveness: &mut Liveness) -> Result<View, LeaseError> {
    loop {
        let (table, revision) = read(store, &m.bucket, &m.key, m.units).await?;
        let now = Instant::now();
        liveness.observe(&table, now);
        let s = step(&table, me, |name, member| liveness.is_alive(name, member, now));
        if write(store, &m.bucket, &m.key, &s.table, revision).await? {
            for (unit, was) in &s.acquired {
                tracing::info!(group = %m.key, member = %me.name, unit, fence = s.held[unit], from = ?was.owner, "lease acquired");
            }
            return Ok(View { table: s.table, held: s.held, to_release: s.to_release, written_at: now, ttl: me.ttl });
        }
    }
}
