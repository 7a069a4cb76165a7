//! Where key-group snapshots live between owners: the JetStream object store.
//!
//! Why there: it is the one shared, durable place every instance already
//! reaches (no extra volume or cloud bucket to provision), with the same
//! durability as the streams whose positions the snapshots record (both are
//! created with one replica, like the hops: see docs/exactly-once.md,
//! Limits), and it chunks objects of any size under the server's max
//! payload. A snapshot is named by stage, key group and
//! the **fence** its owner held it at, so a zombie owner can only ever
//! overwrite its own generation: the lease table says which generation a
//! new owner restores ([`crate::protocol::ownership::Lease::checkpoint`]).

use async_nats::jetstream::{self, object_store};
use tokio::io::AsyncReadExt;

use crate::store::key_group_state::KeyGroupSnapshot;
use sluice_model::key_group::KeyGroup;

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
    pub async fn open(js: &jetstream::Context, bucket: &str, stage: &str) -> Result<Self, SnapshotError> {
        let fail = |detail: String| SnapshotError { bucket: bucket.into(), detail };
        let store = match js.get_object_store(bucket).await {
            Ok(store) => store,
            Err(_) => {
                let config = object_store::Config {
                    bucket: bucket.into(),
                    description: Some("sluice key-group snapshots".into()),
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: 1,
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

    fn name(&self, kg: KeyGroup, fence: u64) -> String {
        format!("{}/kg{}/f{fence}", self.stage, kg.0)
    }

    fn fail(&self, detail: String) -> SnapshotError {
        SnapshotError { bucket: self.bucket.clone(), detail }
    }

    /// Store `snapshot` (replacing one of the same key group and fence).
    pub async fn put(&self, snapshot: &KeyGroupSnapshot) -> Result<(), SnapshotError> {
        let name = self.name(snapshot.key_group, snapshot.fence);
        let bytes = snapshot.encode().map_err(|e| self.fail(format!("{name}: {e}")))?;
        self.store
            .put(name.as_str(), &mut bytes.as_slice())
            .await
            .map_err(|e| self.fail(format!("putting {name}: {e}")))?;
        Ok(())
    }

    /// The snapshot of `kg` taken at `fence`, if it exists.
    pub async fn get(&self, kg: KeyGroup, fence: u64) -> Result<Option<KeyGroupSnapshot>, SnapshotError> {
        let name = self.name(kg, fence);
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

    /// Delete the snapshot of `kg` at `fence` (an older generation no one
    /// will restore). Missing is fine.
    pub async fn delete(&self, kg: KeyGroup, fence: u64) -> Result<(), SnapshotError> {
        let name = self.name(kg, fence);
        match self.store.delete(name.as_str()).await {
            Ok(()) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(self.fail(format!("deleting {name}: {e}"))),
        }
    }
}
