//! Where key-group snapshots live between owners: the JetStream object store.
//!
//! Why there: it is the one shared, durable place every instance already
//! reaches (no extra volume or cloud bucket to provision), with the same
//! durability as the streams whose positions the snapshots record (both are
//! created with `nats.replicas` replicas, like the hops: see
//! docs/exactly-once.md, Limits), and it chunks objects of any size under the server's max
//! payload. A snapshot is named by stage, key group and its
//! [`generation`]: the **fence** its owner held it at and the epoch it was
//! taken at, so no write replaces another, and a zombie owner never
//! overwrites what a later owner restores: the lease table says which
//! generation a new owner restores ([`crate::protocol::ownership::Lease::checkpoint`]).

use async_nats::jetstream::{self, object_store};
use tokio::io::AsyncReadExt;

use crate::store::key_group_state::KeyGroupSnapshot;
use sluice_model::key_group::KeyGroup;

/// The generation of a snapshot its owner took at `fence` and commit
/// `epoch`: the value the lease table's checkpoint records, and the name it
/// is stored under. Every snapshot an owner writes gets a new one (its
/// epochs only grow, across restarts too), so a write never replaces an
/// object the table may point to: an owner deposed while paused that wakes
/// and snapshots again writes a generation no table entry names (its
/// checkpoint's compare-and-set fails), instead of overwriting the one its
/// successor's successor would restore. Fence in the high 32 bits, the
/// epoch's low 32 bits below (never all zero, so a generation is never a
/// bare fence).
pub fn generation(fence: u64, epoch: u64) -> u64 {
    let epoch = match epoch & 0xffff_ffff {
        0 => 1 << 31,
        e => e,
    };
    (fence << 32) | epoch
}

/// A generation's fence and epoch; a checkpoint written before generations
/// had an epoch is the bare fence.
fn split(generation: u64) -> (u64, Option<u64>) {
    match generation >> 32 {
        0 => (generation, None),
        fence => (fence, Some(generation & 0xffff_ffff)),
    }
}

/// A snapshot could not be stored or read.
#[derive(Debug, thiserror::Error)]
#[error("snapshot store {bucket}: {detail}")]
pub struct SnapshotError {
    bucket: String,
    detail: String,
}

/// One stage's snapshots in an object store bucket.
#[derive(Clone)]
pub struct SnapshotStore {
    bucket: String,
    stage: String,
    store: object_store::ObjectStore,
}

impl SnapshotStore {
    /// Open (creating if missing) the bucket `bucket` for `stage`'s snapshots.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        stage: &str,
        replicas: usize,
    ) -> Result<Self, SnapshotError> {
        let fail = |detail: String| SnapshotError { bucket: bucket.into(), detail };
        let store = match js.get_object_store(bucket).await {
            Ok(store) => store,
            Err(_) => {
                let config = object_store::Config {
                    bucket: bucket.into(),
                    description: Some("sluice key-group snapshots".into()),
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                };
                match js.create_object_store(config).await {
                    Ok(store) => store,
                    // Another instance created it first.
                    Err(e) => js.get_object_store(bucket).await.map_err(|_| fail(format!("creating: {e}")))?,
                }
            }
        };
        Ok(Self { bucket: bucket.into(), stage: stage.into(), store })
    }

    fn name(&self, kg: KeyGroup, generation: u64) -> String {
        match split(generation) {
            // Written before generations had an epoch: named by the fence.
            (fence, None) => format!("{}/kg{}/f{fence}", self.stage, kg.0),
            (fence, Some(epoch)) => format!("{}/kg{}/f{fence}-e{epoch}", self.stage, kg.0),
        }
    }

    fn fail(&self, detail: String) -> SnapshotError {
        SnapshotError { bucket: self.bucket.clone(), detail }
    }

    /// Store `snapshot` as `generation` ([`generation`]: a name no other
    /// write of its owner uses).
    pub async fn put(&self, snapshot: &KeyGroupSnapshot, generation: u64) -> Result<(), SnapshotError> {
        let name = self.name(snapshot.key_group, generation);
        let bytes = snapshot.encode().map_err(|e| self.fail(format!("{name}: {e}")))?;
        self.store
            .put(name.as_str(), &mut bytes.as_slice())
            .await
            .map_err(|e| self.fail(format!("putting {name}: {e}")))?;
        Ok(())
    }

    /// The snapshot of `kg` stored as `generation`, if it exists.
    pub async fn get(&self, kg: KeyGroup, generation: u64) -> Result<Option<KeyGroupSnapshot>, SnapshotError> {
        let name = self.name(kg, generation);
        let fence = split(generation).0;
        let mut object = match self.store.get(name.as_str()).await {
            Ok(object) => object,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.fail(format!("getting {name}: {e}"))),
        };
        let mut bytes = Vec::new();
        object.read_to_end(&mut bytes).await.map_err(|e| self.fail(format!("reading {name}: {e}")))?;
        let snapshot = KeyGroupSnapshot::decode(&bytes).map_err(|e| self.fail(format!("{name}: {e}")))?;
        if snapshot.key_group != kg || snapshot.fence != fence || snapshot.stage != self.stage {
            return Err(self
                .fail(format!("{name} holds {}/{} at fence {}", snapshot.stage, snapshot.key_group, snapshot.fence)));
        }
        Ok(Some(snapshot))
    }

    /// Delete the snapshot of `kg` stored as `generation` (an older one no
    /// one will restore). Missing is fine.
    pub async fn delete(&self, kg: KeyGroup, generation: u64) -> Result<(), SnapshotError> {
        let name = self.name(kg, generation);
        match self.store.delete(name.as_str()).await {
            Ok(()) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(self.fail(format!("deleting {name}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_snapshot_of_an_owner_is_a_generation_of_its_own() {
        let (a, b) = (generation(5, 10), generation(5, 11));
        assert_ne!(a, b, "a later snapshot by the same owner is another object");
        assert_eq!(split(a), (5, Some(10)));
        assert_ne!(generation(5, 10), generation(6, 10), "and another owner's is too");
        assert_eq!(split(generation(5, 0)).0, 5, "epoch 0 still names fence 5");
        assert_eq!(split(generation(5, 1 << 32)).0, 5);
    }

    #[test]
    fn checkpoints_written_before_epochs_keep_their_names() {
        assert_eq!(split(7), (7, None), "a bare fence is an old generation");
        assert!(generation(1, 1) >> 32 != 0, "a new generation is never a bare fence");
    }
}
