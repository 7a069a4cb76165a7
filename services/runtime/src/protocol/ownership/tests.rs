use super::*;

fn counts(target: &[Option<String>]) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for t in target.iter().flatten() {
        *c.entry(t.clone()).or_default() += 1;
    }
    c
}

fn spread(c: &BTreeMap<String, usize>) -> usize {
    c.values().max().copied().unwrap_or(0) - c.values().min().copied().unwrap_or(0)
}

#[test]
fn plans_balance_equal_weights_within_one() {
    let names: Vec<String> = (0..9).map(|i| format!("m{i}")).collect();
    for n in 1..=9 {
        for units in [1, 7, 64, 100] {
            let members: Vec<(&str, u32)> = names[..n].iter().map(|s| (s.as_str(), 1)).collect();
            let target = plan(units, &members, &vec![None; units]);
            assert!(target.iter().all(Option::is_some), "{n} members, {units} units: all placed");
            let c = counts(&target);
            if units >= n {
                assert_eq!(c.len(), n);
            }
            assert!(spread(&c) <= 1, "{n} members, {units} units: {c:?}");
        }
    }
    assert_eq!(plan(5, &[], &[None; 5]), vec![None; 5]);
}

#[test]
fn plans_by_weight() {
    let target = plan(64, &[("a", 1), ("big", 2), ("c", 1)], &[None; 64]);
    let c = counts(&target);
    assert_eq!((c["a"], c["big"], c["c"]), (16, 32, 16));
    // 64 / 3 of weight 1, 1, 1 -> 22, 21, 21; with weight 3 for one: 38.4, 12.8, 12.8.
    let c = counts(&plan(64, &[("a", 3), ("b", 1), ("c", 1)], &[None; 64]));
    assert_eq!((c["a"], c["b"], c["c"]), (38, 13, 13));
}

#[test]
fn plans_move_as_few_units_as_balance_needs() {
    let two = plan(64, &[("a", 1), ("b", 1)], &[None; 64]);
    let current: Vec<Option<&str>> = two.iter().map(|o| o.as_deref()).collect();
    let three = plan(64, &[("a", 1), ("b", 1), ("c", 1)], &current);
    let moved = two.iter().zip(&three).filter(|(x, y)| x != y).count();
    assert_eq!(moved, counts(&three)["c"], "only what the newcomer takes moves");
    assert!(spread(&counts(&three)) <= 1);
    // And back: c leaves; only c's units move.
    let current: Vec<Option<&str>> = three.iter().map(|o| o.as_deref().filter(|o| *o != "c")).collect();
    let back = plan(64, &[("a", 1), ("b", 1)], &current);
    let moved = three.iter().zip(&back).filter(|(x, y)| x != y).count();
    assert_eq!(moved, counts(&three)["c"]);
    // The same arguments, the same plan.
    assert_eq!(
        plan(64, &[("b", 1), ("a", 1), ("c", 1)], &current),
        plan(64, &[("a", 1), ("b", 1), ("c", 1)], &current)
    );
}

fn me(name: &str) -> Me {
    Me { name: name.into(), weight: 1, ttl: Duration::from_secs(6), leaving: false }
}

#[test]
fn a_newcomer_gets_its_share_only_through_releases() -> Result<(), Fenced> {
    let all_alive = |_: &str, _: &Member| true;
    let first = step(&LeaseTable::new(8), &me("a"), all_alive);
    assert_eq!(first.held.len(), 8);
    assert_eq!(first.acquired.len(), 8);
    assert!(first.table.leases.iter().all(|l| l.fence == 1));

    // b joins: it takes nothing a live member holds.
    let b1 = step(&first.table, &me("b"), all_alive);
    assert!(b1.held.is_empty() && b1.acquired.is_empty());
    // a's next step names half its units to release.
    let a2 = step(&b1.table, &me("a"), all_alive);
    assert_eq!(a2.to_release.len(), 4);
    assert_eq!(a2.held.len(), 8, "still held until released");
    // a drains, snapshots and releases them with their checkpoints.
    let done: BTreeMap<u32, (u64, Option<u64>)> = a2.to_release.iter().map(|u| (*u, (1, Some(1)))).collect();
    let released = checkpoint(&a2.table, "a", &done, true)?;
    let b2 = step(&released, &me("b"), all_alive);
    assert_eq!(b2.acquired.len(), 4);
    assert!(b2.acquired.values().all(|was| was.checkpoint == Some(1) && was.owner.is_none()));
    assert!(b2.held.values().all(|fence| *fence == 2), "a new owner, a new fence");
    let a3 = step(&b2.table, &me("a"), all_alive);
    assert!(a3.to_release.is_empty() && a3.acquired.is_empty());
    assert_eq!(a3.held.len(), 4);
    Ok(())
}

#[test]
fn a_dead_owners_units_are_taken_and_its_late_writes_refused() {
    let first = step(&LeaseTable::new(4), &me("a"), |_, _| true);
    let b = step(&first.table, &me("b"), |name, _| name != "a");
    assert_eq!(b.acquired.len(), 4, "a is dead: b takes everything");
    assert!(b.held.values().all(|f| *f == 2));
    // a wakes up and tries to checkpoint: fenced.
    let late = BTreeMap::from([(0, (1, Some(9)))]);
    let err = checkpoint(&b.table, "a", &late, false).expect_err("fenced");
    assert_eq!((err.unit, err.fence), (0, 1));
    // a's own next step sees it holds nothing.
    let a = step(&b.table, &me("a"), |_, _| true);
    assert!(a.held.is_empty() || a.acquired.values().all(|l| l.owner.is_none()));
}

#[test]
fn a_leaving_member_takes_nothing_and_gives_everything_up() {
    let both = step(&step(&LeaseTable::new(6), &me("a"), |_, _| true).table, &me("b"), |_, _| true);
    let leaving = Me { leaving: true, ..me("a") };
    let a = step(&both.table, &leaving, |_, _| true);
    assert_eq!(a.to_release.len(), 6);
    assert!(a.acquired.is_empty());
}

#[test]
fn dead_members_that_own_nothing_are_forgotten() {
    let t = step(&LeaseTable::new(2), &me("a"), |_, _| true).table;
    let mut t = step(&t, &me("b"), |_, _| true).table;
    t.members.insert("ghost".into(), Member { weight: 1, beat: 3, ttl_ms: 1000 });
    let next = step(&t, &me("b"), |name, _| name != "ghost").table;
    assert!(!next.members.contains_key("ghost"));
    assert!(next.members.contains_key("a"), "a owns units: kept");
}

#[test]
fn liveness_is_judged_on_the_observers_clock_and_forgives_its_pauses() {
    let t0 = Instant::now();
    let mut table = LeaseTable::new(1);
    table.members.insert("a".into(), Member { weight: 1, beat: 1, ttl_ms: 3000 });
    let a = table.members["a"].clone();
    let mut live = Liveness::default();
    live.observe(&table, t0);
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    for t in (500..=2500).step_by(500) {
        live.observe(&table, at(t));
    }
    assert!(live.is_alive("a", &a, at(2900)));
    live.observe(&table, at(3000));
    assert!(!live.is_alive("a", &a, at(3000)), "no beat for 3 s of observation");
    // A new beat revives it.
    if let Some(m) = table.members.get_mut("a") {
        m.beat = 2;
    }
    live.observe(&table, at(3500));
    assert!(live.is_alive("a", &a, at(3500)));
    // The observer pauses for 10 s: it cannot tell, so it starts over.
    live.observe(&table, at(13_500));
    assert!(live.is_alive("a", &a, at(13_500)));
    assert!(!live.is_alive("b", &a, at(13_500)), "never seen");
}

/// A tiny deterministic random source for the simulation.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Members joining, leaving, dying and pausing, stepping in random order
/// against one table: a unit never has two active owners (an owner is
/// active until its own ttl passes since its last successful write), and
/// once the group is quiet the balance is within one.
#[test]
fn simulated_groups_never_share_a_unit_and_settle_balanced() {
    const UNITS: usize = 16;
    const TTL: u64 = 3000;
    for seed in 0..40 {
        let mut rng = Lcg(seed);
        let mut table = LeaseTable::new(UNITS);
        let names: Vec<String> = (0..4).map(|i| format!("m{i}")).collect();
        // Per member: running, its liveness view, its last successful write (ms) and what it held then.
        let mut running = [false; 4];
        let mut views: Vec<Liveness> = (0..4).map(|_| Liveness::default()).collect();
        let mut last_ok: Vec<Option<(u64, BTreeMap<u32, u64>)>> = vec![None; 4];
        let t0 = Instant::now();
        let mut now = 0u64;
        for round in 0..400 {
            now += 100 + rng.next(200);
            let quiet = round >= 300;
            if !quiet && rng.next(20) == 0 {
                let i = rng.next(4) as usize;
                running[i] = !running[i];
                if !running[i] {
                    // It dies (SIGKILL) or leaves: either way it stops writing.
                    last_ok[i] = None;
                    views[i] = Liveness::default();
                }
            }
            // Every running member beats about once a round, in random order.
            let first = rng.next(4) as usize;
            for k in 0..4 {
                let i = (first + k) % 4;
                if !running[i] || rng.next(4) == 0 {
                    continue;
                }
                let at = t0 + Duration::from_millis(now);
                views[i].observe(&table, at);
                let view = &views[i];
                let s = step(&table, &Me { ttl: Duration::from_millis(TTL), ..me(&names[i]) }, |n, m| {
                    view.is_alive(n, m, at)
                });
                table = s.table;
                // Releases happen at once here (the drain is instantaneous).
                if !s.to_release.is_empty() {
                    let done: BTreeMap<u32, (u64, Option<u64>)> =
                        s.to_release.iter().map(|u| (*u, (s.held[u], None))).collect();
                    table = checkpoint(&table, &names[i], &done, true).expect("held");
                }
                let held = table.held_by(&names[i]);
                last_ok[i] = Some((now, held));
                // Active owners: members whose last write is within their ttl.
                let mut owner_of: HashMap<u32, usize> = HashMap::new();
                for (j, ok) in last_ok.iter().enumerate() {
                    let Some((at, held)) = ok else { continue };
                    if now - at >= TTL || !running[j] {
                        continue;
                    }
                    for unit in held.keys() {
                        if let Some(other) = owner_of.insert(*unit, j) {
                            // Both think they hold it: only one may be at the current fence,
                            // and the older one must have expired by its own clock.
                            let (fa, fb) = (last_ok[other].as_ref().map(|o| o.1[unit]), held.get(unit).copied());
                            panic!(
                                "seed {seed}: unit {unit} active at m{other} ({fa:?}) and m{j} ({fb:?}) at {now} ms"
                            );
                        }
                    }
                }
            }
        }
        let alive: Vec<&String> = names.iter().zip(running).filter(|(_, r)| *r).map(|(n, _)| n).collect();
        if alive.is_empty() {
            continue;
        }
        let c = table.counts();
        let owned: Vec<usize> = alive.iter().map(|n| c.get(*n).copied().unwrap_or(0)).collect();
        assert_eq!(owned.iter().sum::<usize>(), UNITS, "seed {seed}: every unit owned by a live member: {c:?}");
        let (min, max) = (owned.iter().min(), owned.iter().max());
        assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "seed {seed}: {c:?}");
    }
}

/// Any table a peer could have written (or anyone could have forged, before
/// NATS permissions keep them out): a few member names, any numbers.
fn any_table() -> impl proptest::strategy::Strategy<Value = LeaseTable> {
    use proptest::prelude::*;
    let name = proptest::sample::select(vec!["a", "b", "me", "zombie"]);
    let member =
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(weight, beat, ttl_ms)| Member { weight, beat, ttl_ms });
    let fence = prop_oneof![any::<u64>(), 0u64..3, Just(u64::MAX)];
    let lease = (proptest::option::of(name.clone()), fence, proptest::option::of(any::<u64>()))
        .prop_map(|(owner, fence, checkpoint)| Lease { owner: owner.map(str::to_string), fence, checkpoint });
    (
        proptest::collection::btree_map(name.prop_map(str::to_string), member, 0..4),
        proptest::collection::vec(lease, 0..24),
    )
        .prop_map(|(members, leases)| LeaseTable { v: sluice_model::wire::WireVersion::CURRENT, members, leases })
}

proptest::proptest! {
    /// Whatever table a step reads, it neither panics nor lets a fence go
    /// back, and it only claims what it acquired or already held.
    #[test]
    fn a_step_over_any_table_keeps_fences_growing(
        table in any_table(),
        weight in 0u32..4,
        leaving in proptest::prelude::any::<bool>(),
        dead in proptest::prelude::any::<bool>(),
    ) {
        let me = Me { name: "me".into(), weight, ttl: Duration::from_secs(3), leaving };
        let step = step(&table, &me, |name, _| !(dead && name == "zombie"));
        proptest::prop_assert_eq!(step.table.leases.len(), table.leases.len());
        for (unit, (before, after)) in table.leases.iter().zip(&step.table.leases).enumerate() {
            proptest::prop_assert!(after.fence >= before.fence, "unit {unit}: fence {} -> {}", before.fence, after.fence);
            let unit = unit as u32;
            if after.owner.as_deref() == Some("me") {
                proptest::prop_assert_eq!(step.held.get(&unit), Some(&after.fence));
            } else {
                proptest::prop_assert!(!step.held.contains_key(&unit));
            }
        }
        proptest::prop_assert!(step.acquired.keys().all(|u| step.held.contains_key(u)));
        proptest::prop_assert!(step.to_release.iter().all(|u| step.held.contains_key(u)));
    }

    /// A lease table arrives as JSON from the KV bucket: any bytes either
    /// fail to parse or give a table a step can take.
    #[test]
    fn any_lease_table_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
        if let Ok(table) = serde_json::from_slice::<LeaseTable>(&bytes) {
            let me = Me { name: "me".into(), weight: 1, ttl: Duration::from_secs(3), leaving: false };
            let _ = step(&table, &me, |_, _| true);
        }
    }
}
