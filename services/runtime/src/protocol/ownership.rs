//! Dynamic ownership: instances of a stage divide leased **units** (key
//! groups, or the source's Kafka partitions) among themselves, with no
//! static index, through one lease table that every instance reads and
//! rewrites by compare-and-set.
//!
//! This module decides; it does no I/O. [`crate::transport::lease_table`] keeps the table in a NATS KV
//! bucket and runs [`step`] once per heartbeat; the service moves state as
//! the steps say.
//!
//! The table is a single value, so one compare-and-set changes any number of
//! leases and a heartbeat atomically: a step either happened completely or
//! not at all, and two instances can never both acquire a unit (the second
//! compare-and-set fails, re-reads and sees the first owner).
//!
//! - **Members** heartbeat by bumping a counter (`beat`) and state how long
//!   (`ttl_ms`) others should wait before taking their units over. Whether a
//!   member is alive is judged on the observer's own monotonic clock (how
//!   long since its beat last changed, [`Liveness`]), never by comparing
//!   wall clocks of two machines.
//! - **Leases**: per unit an owner, a **fence** (raised by every change of
//!   owner) and a **checkpoint** (where a new owner resumes: the fence of
//!   the key group's last snapshot; the source's next Kafka offset). Every
//!   message an owner publishes carries its fence; receivers drop a unit's
//!   messages from a fence older than one they have seen (see
//!   [`crate::protocol::inbox`]), and a zombie's checkpoint update fails its
//!   compare-and-set check.
//! - A unit moves only through a free state: its owner **releases** it
//!   (after draining, committing and snapshotting), or its owner's lease
//!   expired. The new owner then acquires it with the next fence.
//!
//! Placement is [`plan`]: balanced by weight (equal weights: counts differ by
//! at most one), and sticky (a unit stays where it is unless the balance
//! needs it elsewhere), so a join or leave moves as few units as possible.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sluice_model::wire::WireVersion;

/// A member of a stage's group: one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its share relative to the others (an instance with twice the CPU:
    /// weight 2).
    pub weight: u32,
    /// Heartbeat counter: bumped by every step of the member.
    pub beat: u64,
    /// How long others wait after its beat last changed before they take
    /// over its units.
    pub ttl_ms: u64,
}

/// One unit's lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Its owner (a member's name), or none: released or never taken.
    pub owner: Option<String>,
    /// Raised by every acquisition: the owner stamps its outputs with it.
    pub fence: u64,
    /// Where the next owner resumes (its meaning is the stage's).
    pub checkpoint: Option<u64>,
}

/// Every member and every unit's lease: the value of the lease table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTable {
    /// The record's format version.
    #[serde(default)]
    pub v: WireVersion,
    /// Members by name.
    pub members: BTreeMap<String, Member>,
    /// Lease of unit `i` at index `i`.
    pub leases: Vec<Lease>,
}

impl LeaseTable {
    /// An empty table of `units` units.
    pub fn new(units: usize) -> Self {
        Self { v: WireVersion::CURRENT, members: BTreeMap::new(), leases: vec![Lease::default(); units] }
    }

    /// Units owned by `member` per the table, with their fences.
    pub fn held_by(&self, member: &str) -> BTreeMap<u32, u64> {
        self.leases
            .iter()
            .enumerate()
            .filter(|(_, l)| l.owner.as_deref() == Some(member))
            .map(|(u, l)| (u as u32, l.fence))
            .collect()
    }

    /// How many units each member owns (members without any included).
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts: BTreeMap<String, usize> = self.members.keys().map(|m| (m.clone(), 0)).collect();
        for lease in &self.leases {
            if let Some(owner) = &lease.owner {
                *counts.entry(owner.clone()).or_default() += 1;
            }
        }
        counts
    }
}

/// The target owner of every unit: balanced by weight and sticky.
///
/// Each member gets a quota of `units * weight / total` rounded down, and
/// the remaining units go one each to the members with the largest
/// remainders (ties: the member holding more now, then by name), so with
/// equal weights quotas differ by at most one. Units stay with a current
/// owner that is a member and within its quota; the rest go, in unit order,
/// to the member furthest below its quota (ties by name). The result is a
/// function of its arguments only: every instance computing it from the same
/// table gets the same plan.
pub fn plan(units: usize, members: &[(&str, u32)], current: &[Option<&str>]) -> Vec<Option<String>> {
    let members: Vec<(&str, u64)> = members.iter().map(|(n, w)| (*n, u64::from((*w).max(1)))).collect();
    if members.is_empty() {
        return vec![None; units];
    }
    let total: u64 = members.iter().map(|(_, w)| w).sum();
    let holding = |name: &str| current.iter().filter(|c| **c == Some(name)).count();
    let mut quota: HashMap<&str, usize> = HashMap::new();
    let mut remainders = Vec::new();
    for (name, w) in &members {
        let share = units as u128 * u128::from(*w);
        // Below `units`, which is a usize.
        quota.insert(name, (share / u128::from(total)) as usize);
        remainders.push((share % u128::from(total), holding(name), *name));
    }
    let left = units - quota.values().sum::<usize>();
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(b.2)));
    for (_, _, name) in remainders.into_iter().take(left) {
        *quota.entry(name).or_default() += 1;
    }
    let mut count: HashMap<&str, usize> = members.iter().map(|(n, _)| (*n, 0)).collect();
    let mut target: Vec<Option<String>> = vec![None; units];
    for (unit, owner) in current.iter().enumerate().take(units) {
        if let Some(owner) = owner
            && let (Some(q), Some(c)) = (quota.get(owner), count.get_mut(owner))
            && *c < *q
        {
            *c += 1;
            target[unit] = Some((*owner).to_string());
        }
    }
    let mut names: Vec<&str> = members.iter().map(|(n, _)| *n).collect();
    names.sort_unstable();
    for slot in target.iter_mut().filter(|t| t.is_none()) {
        let pick = names
            .iter()
            .copied()
            .max_by(|a, b| {
                let deficit = |n: &str| quota[n] as i64 - count[n] as i64;
                deficit(a).cmp(&deficit(b)).then(b.cmp(a))
            })
            .filter(|n| quota[n] > count[n]);
        if let Some(name) = pick {
            *count.entry(name).or_default() += 1;
            *slot = Some(name.to_string());
        }
    }
    target
}

/// Which members are alive, judged on this observer's monotonic clock: a
/// member is dead once its beat has not changed for its `ttl_ms` of
/// observation. A pause of the observer itself (longer than half the
/// shortest ttl between two observations) restarts every member's clock:
/// the observer cannot tell who beat while it was away.
#[derive(Debug, Default)]
pub struct Liveness {
    seen: HashMap<String, (u64, Instant)>,
    last: Option<Instant>,
}

impl Liveness {
    /// Note the beats of `table` as seen at `now`.
    pub fn observe(&mut self, table: &LeaseTable, now: Instant) {
        let shortest = table.members.values().map(|m| m.ttl_ms).min().unwrap_or(0);
        let paused = self.last.is_some_and(|last| now.saturating_duration_since(last) > ms(shortest) / 2);
        self.last = Some(now);
        self.seen.retain(|name, _| table.members.contains_key(name));
        for (name, member) in &table.members {
            match self.seen.get_mut(name) {
                Some((beat, at)) if *beat == member.beat => {
                    if paused {
                        *at = now;
                    }
                }
                _ => {
                    self.seen.insert(name.clone(), (member.beat, now));
                }
            }
        }
    }

    /// Whether `name` (as in the observed table) is alive at `now`.
    pub fn is_alive(&self, name: &str, member: &Member, now: Instant) -> bool {
        self.seen.get(name).is_some_and(|(_, at)| now.saturating_duration_since(*at) < ms(member.ttl_ms))
    }
}

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Who is stepping, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    /// Its member name (unique in the group: on Kubernetes, the pod name).
    pub name: String,
    /// Its weight.
    pub weight: u32,
    /// Its lease ttl.
    pub ttl: Duration,
    /// Leaving (draining on SIGTERM): it takes nothing and gives everything up.
    pub leaving: bool,
}

/// What one step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The table to write (compare-and-set against the one read).
    pub table: LeaseTable,
    /// Units this member holds once the write succeeds, with their fences
    /// (acquired ones included).
    pub held: BTreeMap<u32, u64>,
    /// Units acquired by this step, with the lease as it was before (its
    /// checkpoint is where to resume).
    pub acquired: BTreeMap<u32, Lease>,
    /// Units held that the plan gives to another member: to drain,
    /// snapshot and [`release`].
    pub to_release: BTreeSet<u32>,
}

/// One heartbeat of `me` over `table`: beat, drop members long dead that
/// own nothing, acquire the units the plan gives `me` that are free or
/// whose owner is dead, and name the units `me` should release.
pub fn step(table: &LeaseTable, me: &Me, alive: impl Fn(&str, &Member) -> bool) -> Step {
    let mut next = table.clone();
    let beat = table.members.get(&me.name).map_or(1, |m| m.beat.wrapping_add(1));
    let ttl_ms = u64::try_from(me.ttl.as_millis()).unwrap_or(u64::MAX);
    next.members.insert(me.name.clone(), Member { weight: me.weight, beat, ttl_ms });
    let live = |name: &str| name == me.name || table.members.get(name).is_some_and(|m| alive(name, m));
    // A dead member that owns nothing is forgotten.
    let owners: BTreeSet<String> = table.leases.iter().filter_map(|l| l.owner.clone()).collect();
    next.members.retain(|name, _| live(name) || owners.contains(name));

    let planned: Vec<(&str, u32)> = next
        .members
        .iter()
        .filter(|(name, _)| live(name) && !(me.leaving && **name == me.name))
        .map(|(name, m)| (name.as_str(), m.weight))
        .collect();
    let current: Vec<Option<&str>> = table.leases.iter().map(|l| l.owner.as_deref().filter(|o| live(o))).collect();
    let target = plan(table.leases.len(), &planned, &current);

    let mut held = BTreeMap::new();
    let mut acquired = BTreeMap::new();
    let mut to_release = BTreeSet::new();
    for (unit, lease) in next.leases.iter_mut().enumerate() {
        let unit = unit as u32;
        let mine = target[unit as usize].as_deref() == Some(me.name.as_str());
        if lease.owner.as_deref() == Some(me.name.as_str()) {
            held.insert(unit, lease.fence);
            if !mine {
                to_release.insert(unit);
            }
        } else if mine
            && !lease.owner.as_deref().is_some_and(live)
            // A fence that cannot be raised (u64::MAX: never reached by
            // acquisitions, only written by someone forging the table) is
            // not wrapped to 0, which would let fenced-out writers back in:
            // the unit stays unowned, and the forgery shows as a stalled
            // unit instead of wrong tables.
            && let Some(fence) = lease.fence.checked_add(1)
        {
            acquired.insert(unit, lease.clone());
            lease.owner = Some(me.name.clone());
            lease.fence = fence;
            held.insert(unit, lease.fence);
        }
    }
    Step { table: next, held, acquired, to_release }
}

/// Why a unit cannot be released or checkpointed by a member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unit {unit} is no longer held by {member} at fence {fence}: another member took it over")]
pub struct Fenced {
    /// The unit.
    pub unit: u32,
    /// The member that thought it held it.
    pub member: String,
    /// The fence it held it at.
    pub fence: u64,
}

/// Record `checkpoints` (unit → (fence held at, checkpoint)) in `table`;
/// with `release`, also give the units up. Refused for a unit whose lease
/// moved on: the caller was fenced.
pub fn checkpoint(
    table: &LeaseTable,
    member: &str,
    checkpoints: &BTreeMap<u32, (u64, Option<u64>)>,
    release: bool,
) -> Result<LeaseTable, Fenced> {
    let mut next = table.clone();
    for (&unit, &(fence, at)) in checkpoints {
        let fenced = || Fenced { unit, member: member.to_string(), fence };
        let lease = next.leases.get_mut(unit as usize).ok_or_else(fenced)?;
        if lease.owner.as_deref() != Some(member) || lease.fence != fence {
            return Err(fenced());
        }
        if at.is_some() {
            lease.checkpoint = at;
        }
        if release {
            lease.owner = None;
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests;
