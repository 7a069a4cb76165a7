//! A topic's id: what tells a topic from one deleted and created again
//! under the same name (Kafka's topic ids, KIP-516).
//!
//! Offsets alone cannot: a recreated topic numbers its records from 0
//! again, and once it was refilled past the old position every stored
//! offset looks valid. rdkafka 0.39 does not wrap librdkafka's
//! DescribeTopics, which returns the id, so this module calls it through
//! `rdkafka::bindings`: the one place of the workspace with `unsafe` code,
//! kept to a handful of calls whose ownership rules librdkafka documents
//! (rdkafka.h: every `_new` has its `_destroy`; what a result event hands
//! out lives as long as the event).

#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char};
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Why a topic's id could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TopicIdError {
    /// A topic name cannot hold a NUL byte.
    #[error("the topic name {0:?} holds a NUL byte")]
    Name(String),
    /// The broker or librdkafka answered with an error.
    #[error("describing topic {topic}: {message}")]
    Describe {
        /// The topic.
        topic: String,
        /// What librdkafka said.
        message: String,
    },
    /// No answer in time.
    #[error("describing topic {topic}: no answer within {timeout:?}")]
    Timeout {
        /// The topic.
        topic: String,
        /// How long was waited.
        timeout: Duration,
    },
}

/// The id of `topic` as Kafka tools print it (base64, as `kafka-topics
/// --describe` shows it), or `None` when the broker has none (brokers older
/// than Kafka 2.8 answer with the zero id).
pub fn topic_id(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Result<Option<String>, TopicIdError> {
    let name = CString::new(topic).map_err(|_| TopicIdError::Name(topic.to_owned()))?;
    let describe = |message: String| TopicIdError::Describe { topic: topic.to_owned(), message };
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let rk = consumer.client().native_ptr();
    let mut names = [name.as_ptr()];
    // SAFETY: `names` holds one pointer to a NUL-terminated string that
    // outlives the call; librdkafka copies the names.
    let topics = Owned::new(unsafe { rd::rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1) }, |p| {
        // SAFETY: made by rd_kafka_TopicCollection_of_topic_names, destroyed once.
        unsafe { rd::rd_kafka_TopicCollection_destroy(p) }
    })
    .ok_or_else(|| describe("librdkafka made no topic collection".into()))?;
    // SAFETY: `rk` is the live handle of `consumer`, borrowed for this call.
    let options = Owned::new(
        unsafe { rd::rd_kafka_AdminOptions_new(rk, rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS) },
        |p| {
            // SAFETY: made by rd_kafka_AdminOptions_new, destroyed once.
            unsafe { rd::rd_kafka_AdminOptions_destroy(p) }
        },
    )
    .ok_or_else(|| describe("librdkafka made no admin options".into()))?;
    let mut errstr = [0 as c_char; 256];
    // SAFETY: `options` is live; `errstr` is writable for its length.
    let set = unsafe {
        rd::rd_kafka_AdminOptions_set_request_timeout(options.0, timeout_ms, errstr.as_mut_ptr(), errstr.len())
    };
    if set != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        // SAFETY: librdkafka wrote a NUL-terminated message into `errstr`.
        return Err(describe(unsafe { CStr::from_ptr(errstr.as_ptr()) }.to_string_lossy().into_owned()));
    }
    // SAFETY: `rk` is live; the queue is destroyed before `consumer` can be.
    let queue = Owned::new(unsafe { rd::rd_kafka_queue_new(rk) }, |p| {
        // SAFETY: made by rd_kafka_queue_new, destroyed once.
        unsafe { rd::rd_kafka_queue_destroy(p) }
    })
    .ok_or_else(|| describe("librdkafka made no queue".into()))?;
    // SAFETY: every argument is live; the result is posted to `queue`.
    unsafe { rd::rd_kafka_DescribeTopics(rk, topics.0, options.0, queue.0) };
    // The request times out on its own; wait a little past it for the event.
    let wait_ms = timeout_ms.saturating_add(1000);
    // SAFETY: `queue` is live.
    let event = Owned::new(unsafe { rd::rd_kafka_queue_poll(queue.0, wait_ms) }, |p| {
        // SAFETY: an event polled from a queue is the caller's to destroy, once.
        unsafe { rd::rd_kafka_event_destroy(p) }
    })
    .ok_or_else(|| TopicIdError::Timeout { topic: topic.to_owned(), timeout })?;
    // SAFETY: `event` is live.
    if unsafe { rd::rd_kafka_event_error(event.0) } != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        // SAFETY: the string lives as long as the event, and is copied now.
        return Err(describe(unsafe { text(rd::rd_kafka_event_error_string(event.0)) }));
    }
    // SAFETY: `event` is live; null when it is not a DescribeTopics result.
    let result = unsafe { rd::rd_kafka_event_DescribeTopics_result(event.0) };
    if result.is_null() {
        return Err(describe("the answer was not a DescribeTopics result".into()));
    }
    let mut count = 0usize;
    // SAFETY: `result` lives as long as `event`; the array holds `count`
    // descriptions owned by it.
    let descriptions = unsafe { rd::rd_kafka_DescribeTopics_result_topics(result, &mut count) };
    for i in 0..count {
        // SAFETY: `i < count`, within the array librdkafka returned.
        let description = unsafe { *descriptions.add(i) };
        // SAFETY: a description of the result; its name lives as long.
        if unsafe { text(rd::rd_kafka_TopicDescription_name(description)) } != topic {
            continue;
        }
        // SAFETY: as above; null when the topic was described.
        let error = unsafe { rd::rd_kafka_TopicDescription_error(description) };
        // SAFETY: `error` is checked for null before it is read.
        if !error.is_null()
            && unsafe { rd::rd_kafka_error_code(error) } != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            // SAFETY: the error lives as long as the description.
            return Err(describe(unsafe { text(rd::rd_kafka_error_string(error)) }));
        }
        // SAFETY: as above; the id lives as long as the description.
        let id = unsafe { rd::rd_kafka_TopicDescription_topic_id(description) };
        if id.is_null() {
            return Ok(None);
        }
        // SAFETY: `id` is live and non-null.
        let zero = unsafe {
            rd::rd_kafka_Uuid_most_significant_bits(id) == 0 && rd::rd_kafka_Uuid_least_significant_bits(id) == 0
        };
        if zero {
            return Ok(None);
        }
        // SAFETY: the string is the id's, copied now.
        return Ok(Some(unsafe { text(rd::rd_kafka_Uuid_base64str(id)) }));
    }
    Err(describe("the answer did not describe the topic".into()))
}

/// A copy of a C string that librdkafka owns; empty for null.
///
/// # Safety
/// `p` is null or a live NUL-terminated string.
unsafe fn text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the caller's promise.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// A librdkafka object destroyed when dropped.
struct Owned<T>(*mut T, fn(*mut T));

impl<T> Owned<T> {
    /// `None` for null.
    fn new(p: *mut T, destroy: fn(*mut T)) -> Option<Self> {
        (!p.is_null()).then_some(Self(p, destroy))
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        (self.1)(self.0);
    }
}
