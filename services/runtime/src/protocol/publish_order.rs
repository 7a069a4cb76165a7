//! Publish order: at most one unacknowledged message per subject.
//!
//! Receivers drop a record at or below the lineage frontier of its key group
//! (see [`crate::protocol::inbox`]), so a subject's messages must be stored in the order
//! they were produced, without gaps: if message 2 were stored while message 1
//! failed and was retried, the receiver would apply 2 and then drop 1 as old.
//! A publisher therefore sends a subject's next message only once the
//! previous one is acknowledged (stored), and retries a failed message, under
//! the same message id, before anything after it on that subject. Different
//! subjects (key groups) are independent, so up to one message per key group
//! is in flight: plenty of parallelism for 64 key groups.
//!
//! This module is the decision; the NATS publisher carries it out.

use std::collections::{HashMap, VecDeque};

/// Messages waiting per subject, and which subjects have one in flight.
#[derive(Debug)]
pub struct PublishOrder<M> {
    waiting: HashMap<String, VecDeque<M>>,
    in_flight: usize,
    queued: usize,
}

impl<M> Default for PublishOrder<M> {
    fn default() -> Self {
        Self { waiting: HashMap::new(), in_flight: 0, queued: 0 }
    }
}

impl<M> PublishOrder<M> {
    /// A message for `subject` was produced: returns it back if it can be
    /// sent now (nothing of its subject is in flight), else queues it.
    pub fn offer(&mut self, subject: &str, message: M) -> Option<M> {
        match self.waiting.get_mut(subject) {
            // The subject is busy: an entry exists exactly while a message of
            // it is in flight.
            Some(queue) => {
                queue.push_back(message);
                self.queued += 1;
                None
            }
            None => {
                self.waiting.insert(subject.to_owned(), VecDeque::new());
                self.in_flight += 1;
                Some(message)
            }
        }
    }

    /// The in-flight message of `subject` was stored: returns the subject's
    /// next message to send, if one waits.
    pub fn stored(&mut self, subject: &str) -> Option<M> {
        let queue = self.waiting.get_mut(subject)?;
        match queue.pop_front() {
            Some(next) => {
                self.queued -= 1;
                Some(next)
            }
            None => {
                self.waiting.remove(subject);
                self.in_flight -= 1;
                None
            }
        }
    }

    /// Messages sent and not yet stored.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Messages waiting behind one in flight.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Whether everything offered has been stored.
    pub fn is_idle(&self) -> bool {
        self.in_flight == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_message_in_flight_per_subject_in_order() {
        let mut order = PublishOrder::default();
        assert_eq!(order.offer("a", 1), Some(1));
        assert_eq!(order.offer("a", 2), None);
        assert_eq!(order.offer("b", 10), Some(10), "another subject goes at once");
        assert_eq!(order.offer("a", 3), None);
        assert_eq!((order.in_flight(), order.queued()), (2, 2));
        assert_eq!(order.stored("a"), Some(2));
        assert_eq!(order.stored("b"), None);
        assert_eq!(order.stored("a"), Some(3));
        assert!(!order.is_idle());
        assert_eq!(order.stored("a"), None);
        assert!(order.is_idle());
        assert_eq!(order.offer("a", 4), Some(4), "an idle subject sends at once again");
    }

    #[test]
    fn a_stored_report_for_an_idle_subject_changes_nothing() {
        let mut order: PublishOrder<u8> = PublishOrder::default();
        assert_eq!(order.stored("x"), None);
        assert!(order.is_idle());
    }
}
