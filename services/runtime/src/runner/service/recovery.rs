//! Recovery: what a (re)started instance resumes from.
//!
//! Everything comes from the last commit in the instance's own store and
//! nothing from the servers: the stage's state, the [`Inbox`] positions
//! (which drop whatever JetStream delivers again), the epoch (which keeps
//! outbox ids unique) and the outbox (published again by
//! [`StageThread::resume`](super::stage_thread::StageThread::resume)). The
//! consumers are re-created afterwards and deliver every message not yet
//! acknowledged, oldest first. A plain function over the store, so the crash
//! model restarts a stage exactly as [`run`](super::run) does.

use crate::protocol::inbox::Inbox;
use crate::store::{self, CommitStore, StateKey};
use crate::transport::handoff::Outgoing;
use sluice_model::key_group::KeyGroupSet;

use super::{ConsumingStage, EPOCH_KEY, INBOX_NS, ServiceError, outbox};

/// The last commit, as the stage thread starts from it.
pub(super) struct Recovered {
    /// The key groups this instance owns.
    pub(super) owned: KeyGroupSet,
    /// Their committed positions.
    pub(super) inbox: Inbox,
    /// The epoch of the last commit (0: none yet).
    pub(super) epoch: u64,
    /// Outputs committed by the last run and perhaps never stored.
    pub(super) outbox: Vec<(StateKey, Outgoing)>,
    /// This run's number (one more than the last start's): the sender
    /// epoch of flow control.
    pub(super) run: u64,
}

/// Restore `stage` from the store (the caller checked the store belongs to
/// this instance and holds `owned`'s state) and load the positions, the
/// epoch and the outbox.
pub(super) fn recover<S: ConsumingStage>(
    stage: &mut S,
    store: &CommitStore,
    owned: KeyGroupSet,
) -> Result<Recovered, ServiceError> {
    stage.start(store)?;
    let mut inbox = Inbox::new(INBOX_NS);
    inbox.restore(store, |kg| owned.contains(kg))?;
    let epoch: u64 = match store.get(&StateKey::namespace(EPOCH_KEY))? {
        Some(b) => store::decode("epoch", &b)?,
        None => 0,
    };
    let outbox = outbox::load(store)?;
    let run = super::next_run(store)?;
    Ok(Recovered { owned, inbox, epoch, outbox, run })
}
