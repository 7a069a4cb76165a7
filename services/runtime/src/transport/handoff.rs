//! The hand-over between a stage and its publisher, bounded in bytes.
//!
//! A stage hands its outputs to the publisher task ([`crate::transport::publisher::run_publisher`]),
//! which holds them until their receiver grants credit and the server
//! stores them. Everything handed over and not yet stored counts against
//! one budget, `nats.publish_buffer_bytes`: the channel between the two and
//! the publisher's own queues together. A stage whose publisher is full
//! waits in [`Handoff::blocking_publish`], so it stops taking input; that
//! wait is what the stage reports as back-pressured time, and what makes the
//! source pause its Kafka partitions.
//!
//! Bounding the channel by count would not do: one slot holds anything from
//! a few bytes to `nats.max_batch_bytes`.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::protocol::fence::FenceStamp;

/// What the publisher is told, in order.
#[derive(Debug)]
pub enum ToPublisher {
    /// Publish this, after everything before it on its subject. `budget` is
    /// what it holds of the hand-over budget, returned once it is stored.
    Publish(Outgoing, Budget),
    /// Answer once everything offered before this is stored.
    Barrier(oneshot::Sender<()>),
}

/// Bytes of the hand-over budget held by one message until it is stored.
#[derive(Debug)]
pub struct Budget {
    bytes: u64,
    pool: Arc<Pool>,
}

impl Drop for Budget {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().unwrap_or_else(PoisonError::into_inner);
        *free += self.bytes;
        self.pool.freed.notify_all();
    }
}

/// The free bytes of a hand-over. The waiters are plain threads (a stage
/// thread, the source's Kafka thread), so a mutex and a condition variable
/// are all it takes.
#[derive(Debug)]
struct Pool {
    free: Mutex<u64>,
    freed: Condvar,
}

/// The publisher is gone: it failed (its error says why) or stopped. A
/// publish that found it gone hands its message back, unsent, so a caller
/// can count it, set it aside or offer it to another publisher.
#[derive(Debug, Default, thiserror::Error)]
#[error("the publisher stopped (see its error)")]
pub struct PublisherGone {
    /// The message of the publish that failed (none for a barrier).
    pub unsent: Option<Box<Outgoing>>,
}

/// The stage's end of the hand-over.
#[derive(Debug, Clone)]
pub struct Handoff {
    tx: mpsc::Sender<ToPublisher>,
    pool: Arc<Pool>,
    capacity: u64,
}

/// The publisher's end of the hand-over.
pub type PublisherEnd = mpsc::Receiver<ToPublisher>;

/// Slots of the channel: only a guard, the bytes bound the hand-over.
const SLOTS: usize = 4096;

impl Handoff {
    /// A hand-over of `capacity` bytes (at least 1).
    pub fn new(capacity: u64) -> (Handoff, PublisherEnd) {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(SLOTS);
        let pool = Arc::new(Pool { free: Mutex::new(capacity), freed: Condvar::new() });
        (Handoff { tx, pool, capacity }, rx)
    }

    fn free(&self) -> std::sync::MutexGuard<'_, u64> {
        self.pool.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What a message of `len` bytes takes from the budget: its size, but
    /// never more than the whole budget (a message larger than the budget
    /// goes alone) and never nothing.
    fn cost(&self, len: usize) -> u64 {
        (len.max(1) as u64).min(self.capacity)
    }

    /// Whether handing over `len` bytes now would wait for the publisher.
    pub fn would_wait(&self, len: usize) -> bool {
        *self.free() < self.cost(len)
    }

    /// Bytes free in the budget.
    pub fn available(&self) -> u64 {
        *self.free()
    }

    /// Wait up to `timeout` until `len` bytes could be handed over without
    /// waiting; whether they can. For a caller that has more to do while it
    /// waits (the source keeps its lag fresh).
    pub fn wait_for_room(&self, len: usize, timeout: Duration) -> bool {
        let bytes = self.cost(len);
        let free = self.free();
        let (free, _) = self
            .pool
            .freed
            .wait_timeout_while(free, timeout, |free| *free < bytes)
            .unwrap_or_else(PoisonError::into_inner);
        *free >= bytes
    }

    /// Hand `out` over, waiting while the budget is spent; returns how long
    /// it waited. From a thread outside the tokio runtime only (a stage
    /// thread, the source's Kafka thread).
    pub fn blocking_publish(&self, out: Outgoing) -> Result<Duration, PublisherGone> {
        let bytes = self.cost(out.payload.len());
        let t0 = Instant::now();
        {
            // Every message holding budget is dropped when the publisher
            // stops (stored, failed or aborted), so this wait ends.
            let mut free = self.free();
            while *free < bytes {
                free = self.pool.freed.wait(free).unwrap_or_else(PoisonError::into_inner);
            }
            *free -= bytes;
        }
        let waited = t0.elapsed();
        let budget = Budget { bytes, pool: self.pool.clone() };
        self.tx.blocking_send(ToPublisher::Publish(out, budget)).map_err(|e| match e.0 {
            // The budget it held is returned as it drops.
            ToPublisher::Publish(out, _) => PublisherGone { unsent: Some(Box::new(out)) },
            ToPublisher::Barrier(_) => PublisherGone::default(),
        })?;
        Ok(waited)
    }

    /// Ask to be told once everything handed over before is stored, without
    /// waiting for it: the answer comes on the returned receiver. From a
    /// thread outside the tokio runtime only.
    pub fn barrier(&self) -> Result<oneshot::Receiver<()>, PublisherGone> {
        let (tx, rx) = oneshot::channel();
        self.tx.blocking_send(ToPublisher::Barrier(tx)).map_err(|_| PublisherGone::default())?;
        Ok(rx)
    }

    /// Return once everything handed over before is stored; returns how
    /// long that took. From a thread outside the tokio runtime only.
    pub fn blocking_barrier(&self) -> Result<Duration, PublisherGone> {
        let t0 = Instant::now();
        self.barrier()?.blocking_recv().map_err(|_| PublisherGone::default())?;
        Ok(t0.elapsed())
    }
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Its subject (one key group of one hop).
    pub subject: String,
    /// Its deterministic message id.
    pub id: String,
    /// The encoded batch.
    pub payload: Bytes,
    /// The writer's lease fence for the message's unit, if it holds the
    /// unit by lease (sent as the [`FENCE_HEADER`]).
    pub fence: Option<FenceStamp>,
    /// Set for a copy of unreadable input stored in the dead-letter stream:
    /// where it came from (sent as headers). Dead letters take no credit.
    pub dead_letter: Option<Box<crate::transport::dead_letter::DeadLetter>>,
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn out(len: usize) -> Outgoing {
        Outgoing {
            subject: "s.raw.0".into(),
            id: format!("id-{len}"),
            payload: Bytes::from(vec![0u8; len]),
            fence: None,
            dead_letter: None,
        }
    }

    #[test]
    fn the_budget_is_held_until_the_publisher_drops_the_message() {
        let (handoff, mut end) = Handoff::new(100);
        handoff.blocking_publish(out(60)).expect("room for 60");
        assert!(handoff.would_wait(41));
        assert!(!handoff.would_wait(40));
        let first = end.try_recv().expect("handed over");
        assert_eq!(handoff.available(), 40);
        drop(first);
        assert_eq!(handoff.available(), 100);
    }

    #[test]
    fn a_message_larger_than_the_budget_goes_alone() {
        let (handoff, mut end) = Handoff::new(10);
        handoff.blocking_publish(out(1000)).expect("an empty budget takes anything");
        assert_eq!(handoff.available(), 0);
        assert!(handoff.would_wait(1));
        drop(end.try_recv().expect("handed over"));
        assert_eq!(handoff.available(), 10);
    }

    #[test]
    fn a_full_hand_over_waits_until_the_publisher_stores() {
        let (handoff, mut end) = Handoff::new(100);
        handoff.blocking_publish(out(100)).expect("room");
        let stage = {
            let handoff = handoff.clone();
            std::thread::spawn(move || handoff.blocking_publish(out(50)))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!stage.is_finished(), "the second message must wait for the first to be stored");
        drop(end.try_recv().expect("the first"));
        let waited = stage.join().expect("no panic").expect("handed over");
        assert!(waited >= Duration::from_millis(40), "waited {waited:?}");
    }

    #[test]
    fn waiting_for_room_ends_at_the_timeout_or_when_room_is_made() {
        let (handoff, mut end) = Handoff::new(100);
        handoff.blocking_publish(out(100)).expect("room");
        assert!(!handoff.wait_for_room(1, Duration::from_millis(20)), "no room while the message is held");
        let publisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(end.try_recv());
        });
        assert!(handoff.wait_for_room(100, Duration::from_secs(10)), "room once the message is stored");
        publisher.join().expect("no panic");
    }

    #[test]
    fn a_gone_publisher_is_an_error_not_a_hang() {
        let (handoff, end) = Handoff::new(100);
        drop(end);
        let gone = handoff.blocking_publish(out(10)).err().and_then(|e| e.unsent);
        assert_eq!(gone.map(|m| m.payload.len()), Some(10), "the unsent message comes back");
        assert_eq!(handoff.available(), 100, "and its budget is free again");
        assert!(handoff.blocking_barrier().is_err());
    }
}
