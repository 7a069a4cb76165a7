//! Crash plans: which steps a run dies before, enumerated against the run
//! without crashes in the same world.

use std::collections::BTreeSet;

use super::downstream::{Downstream, verdict, view};
use super::driver::{self, Failure, Outcome, Publisher, Scenario, Step};
use super::fixture::{input_stream, oracle};

/// Every world the plans run in: publisher, the output stream's dedup
/// window (forever, none, or 12 steps: some replays caught, some not), and
/// the consumers' ack-pending limit (none, or 2: a key group stops being
/// delivered until a commit acknowledges).
pub(super) fn worlds() -> Vec<Scenario> {
    let mut worlds = Vec::new();
    for publisher in [Publisher::Eager, Publisher::Lazy] {
        for duplicate_window in [u64::MAX, 0, 12] {
            for max_ack_pending in [usize::MAX, 2] {
                worlds.push(Scenario::without_crashes(publisher, duplicate_window, max_ack_pending));
            }
        }
    }
    worlds
}

/// Every world, with key groups held by lease and moved at every death.
pub(super) fn moving_worlds() -> Vec<Scenario> {
    worlds().iter().map(Scenario::moving).collect()
}

/// The hardest worlds: every replay reaches the receiver, and a lost
/// hand-over is really lost.
pub(super) fn without_dedup_lazy() -> Vec<Scenario> {
    worlds().into_iter().filter(|w| w.duplicate_window == 0 && w.publisher == Publisher::Lazy).collect()
}

/// What a set of plans exercised.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Tally {
    /// Runs checked.
    pub(super) runs: usize,
    /// Crashes that happened in them (a planned step past a run's end is none).
    pub(super) crashes: usize,
    /// Runs whose output stream held an id twice: the server's dedup did
    /// not catch a replay, the receiver had to.
    pub(super) replays_past_dedup: usize,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, other: Self) {
        self.runs += other.runs;
        self.crashes += other.crashes;
        self.replays_past_dedup += other.replays_past_dedup;
    }
}

/// Runs crash plans in one world and checks each against the run without
/// crashes.
pub(super) struct Checker<const USES_OUTBOX: bool> {
    world: Scenario,
    baseline: Outcome,
    expected: Downstream,
    tally: Tally,
}

impl<const USES_OUTBOX: bool> Checker<USES_OUTBOX> {
    /// Run `world` without crashes; its result must be the oracle's.
    pub(super) fn new(world: Scenario) -> Result<Self, Failure> {
        let baseline = driver::run::<USES_OUTBOX>(&world, input_stream(&world))?;
        let failure = |why: String| Failure::new(&world, why, baseline.trace.clone());
        let expected = view::<USES_OUTBOX>(&baseline.output).map_err(failure)?;
        if expected.counts != oracle() {
            return Err(failure(format!("without crashes: counts {:?}, expected {:?}", expected.counts, oracle())));
        }
        verdict::<USES_OUTBOX>(&baseline, &expected).map_err(failure)?;
        Ok(Self { world, baseline, expected, tally: Tally::default() })
    }

    /// Lifetimes of the run without crashes that a delivery gap ended.
    pub(super) fn gaps_caught(&self) -> u64 {
        self.baseline.gaps_caught
    }

    /// The steps of the run without crashes.
    pub(super) fn baseline(&self) -> &[Step] {
        &self.baseline.trace
    }

    pub(super) fn tally(&self) -> Tally {
        self.tally
    }

    /// Run dying before each step in `crashes`, check the result, and return
    /// the run.
    pub(super) fn crash(&mut self, crashes: impl IntoIterator<Item = u64>) -> Result<Outcome, Failure> {
        let scenario = self.world.crashing_at(crashes);
        let outcome = driver::run::<USES_OUTBOX>(&scenario, input_stream(&scenario))?;
        if let Err(why) = verdict::<USES_OUTBOX>(&outcome, &self.expected) {
            return Err(Failure::new(&scenario, why, outcome.trace));
        }
        self.tally.runs += 1;
        self.tally.crashes += scenario.crashes.iter().filter(|&&k| k < outcome.trace.len() as u64).count();
        if outcome.output.ids_stored_twice() > 0 {
            self.tally.replays_past_dedup += 1;
        }
        Ok(outcome)
    }

    /// Die before each step of the run without crashes.
    pub(super) fn every_single_crash(&mut self) -> Result<(), Failure> {
        for k in 0..self.baseline().len() as u64 {
            self.crash([k])?;
        }
        Ok(())
    }

    /// Die before step `k1`, then before each later step of that run: in
    /// the recovery, in the first commit after it, and anywhere after.
    pub(super) fn every_pair_of_crashes(&mut self) -> Result<(), Failure> {
        for k1 in 0..self.baseline().len() as u64 {
            let after_one = self.crash([k1])?.trace.len() as u64;
            for k2 in k1 + 1..after_one {
                self.crash([k1, k2])?;
            }
        }
        Ok(())
    }

    /// Die before step `k`, then again `gap` steps into each of the next
    /// `repeats` lifetimes: a crash loop while recovering.
    pub(super) fn crash_loops(&mut self, gaps: std::ops::RangeInclusive<u64>, repeats: u64) -> Result<(), Failure> {
        for k in 0..self.baseline().len() as u64 {
            for gap in gaps.clone() {
                self.crash((0..=repeats).map(|i| k + i * gap))?;
            }
        }
        Ok(())
    }

    /// Die before up to five pseudo-random steps, `runs` times.
    pub(super) fn random_crashes(&mut self, rng: &mut Xorshift, runs: usize) -> Result<(), Failure> {
        let horizon = self.baseline().len() as u64 * 2;
        for _ in 0..runs {
            let crashes: BTreeSet<u64> = (0..=rng.below(5)).map(|_| rng.below(horizon)).collect();
            self.crash(crashes)?;
        }
        Ok(())
    }
}

/// Apply `plans` in each of `worlds`, adding up what they exercised.
pub(super) fn across<const USES_OUTBOX: bool>(
    worlds: Vec<Scenario>,
    mut plans: impl FnMut(&mut Checker<USES_OUTBOX>) -> Result<(), Failure>,
) -> Result<Tally, Failure> {
    let mut tally = Tally::default();
    for world in worlds {
        let mut checker = Checker::<USES_OUTBOX>::new(world)?;
        plans(&mut checker)?;
        tally += checker.tally();
    }
    Ok(tally)
}

/// A fixed pseudo-random sequence (xorshift), so every failure reproduces.
pub(super) struct Xorshift(pub(super) u64);

impl Xorshift {
    /// A number below `n` (0 if `n` is 0).
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}
