//! Dead letters: input a stage cannot read, set aside so that the stage and
//! every other key group go on.
//!
//! A message on a hop that is not a batch of this format, or a batch that
//! fails its checks ([`sluice_model::validate`]), cannot be applied and
//! would fail the same way on every redelivery: stopping on it would stop
//! the whole pipeline (one key group's consumer blocks; under Kubernetes
//! the pod crash-loops). Instead the stage copies it to the stream
//! `<PREFIX>_DEAD` (subject `<prefix>.dead.<stage>`) with headers saying
//! where it came from and why it was refused, counts it in
//! `sluice_dead_letters_total{reason}`, and acknowledges it with the commit
//! that covers its place in the input.
//!
//! The copy goes through the stage's publisher like an output, so the
//! commit's barrier stores it before the delivery is acknowledged: a crash
//! in between redelivers the message, which is refused again and copied
//! again under the same message id (dropped by the server as a duplicate
//! within the duplicate window). Dead letters take no credit: they go to no
//! stage. `sluice dead-letters` lists them ([`list`]).

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use sluice_model::codec::CodecError;
use sluice_model::validate::InvalidBatch;

use crate::transport::handoff::Outgoing;
use crate::transport::nats::{NatsSettings, TransportError, js_err};

/// Header: the stage that refused the message.
pub const STAGE_HEADER: &str = "Sluice-Dead-Stage";
/// Header: the stream (or Kafka topic) it came from.
pub const STREAM_HEADER: &str = "Sluice-Dead-Stream";
/// Header: its subject (or Kafka partition, `p<n>`).
pub const SUBJECT_HEADER: &str = "Sluice-Dead-Subject";
/// Header: its stream sequence (or Kafka offset).
pub const SEQUENCE_HEADER: &str = "Sluice-Dead-Sequence";
/// Header: the reason, one of [`Reason::as_str`].
pub const REASON_HEADER: &str = "Sluice-Dead-Reason";
/// Header: the error, in words.
pub const ERROR_HEADER: &str = "Sluice-Dead-Error";

/// Why a message was set aside: the `reason` label of the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not a Cap'n Proto message of the expected type.
    NotCapnp,
    /// An enum value or union member this build does not know.
    UnknownSchemaMember,
    /// Text that is not UTF-8.
    NotUtf8,
    /// A batch of another format version.
    FormatVersion,
    /// A number that cannot be what the schema says.
    InvalidField,
    /// A batch for another key group than its subject's.
    KeyGroup,
    /// Records out of input order.
    LineageBackwards,
    /// A value a stage's rules never let through.
    OutOfRange,
    /// A Kafka record too large to publish as a batch of its own.
    Unframable,
    /// A control message (credit status or grant, dimension update, lease
    /// table) that cannot be read: counted and skipped, not copied (the
    /// next one replaces it; nothing of the input is in it).
    ControlMessage,
}

impl Reason {
    /// Every reason (each is exposed at 0 from the start).
    pub const ALL: [Reason; 10] = [
        Reason::NotCapnp,
        Reason::UnknownSchemaMember,
        Reason::NotUtf8,
        Reason::FormatVersion,
        Reason::InvalidField,
        Reason::KeyGroup,
        Reason::LineageBackwards,
        Reason::OutOfRange,
        Reason::Unframable,
        Reason::ControlMessage,
    ];

    /// Its label value and header text.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotCapnp => "not_capnp",
            Reason::UnknownSchemaMember => "unknown_schema_member",
            Reason::NotUtf8 => "not_utf8",
            Reason::FormatVersion => "format_version",
            Reason::InvalidField => "invalid_field",
            Reason::KeyGroup => "key_group",
            Reason::LineageBackwards => "lineage_backwards",
            Reason::OutOfRange => "out_of_range",
            Reason::Unframable => "unframable",
            Reason::ControlMessage => "control_message",
        }
    }
}

/// Why a delivered batch cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum Unreadable {
    /// The bytes are not a batch of this format.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The batch fails its checks.
    #[error(transparent)]
    Invalid(#[from] InvalidBatch),
}

impl Unreadable {
    /// Its reason label.
    pub fn reason(&self) -> Reason {
        match self {
            Unreadable::Codec(CodecError::Capnp(_)) => Reason::NotCapnp,
            Unreadable::Codec(CodecError::NotInSchema(_)) => Reason::UnknownSchemaMember,
            Unreadable::Codec(CodecError::Utf8(_)) => Reason::NotUtf8,
            Unreadable::Codec(CodecError::Version { .. }) => Reason::FormatVersion,
            Unreadable::Codec(CodecError::Invalid(_)) => Reason::InvalidField,
            Unreadable::Invalid(InvalidBatch::KeyGroup { .. }) => Reason::KeyGroup,
            Unreadable::Invalid(InvalidBatch::LineageBackwards { .. }) => Reason::LineageBackwards,
            Unreadable::Invalid(InvalidBatch::OutOfRange { .. }) => Reason::OutOfRange,
        }
    }
}

/// Where a refused message came from and why: its headers in the
/// dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The stage that refused it.
    pub stage: &'static str,
    /// Its stream (or Kafka topic).
    pub stream: String,
    /// Its subject (or Kafka partition).
    pub subject: String,
    /// Its stream sequence (or Kafka offset).
    pub sequence: u64,
    /// Why.
    pub reason: Reason,
    /// The error, in words.
    pub error: String,
}

impl DeadLetter {
    /// The headers it is stored with.
    pub fn headers(&self) -> [(&'static str, String); 6] {
        [
            (STAGE_HEADER, self.stage.to_owned()),
            (STREAM_HEADER, self.stream.clone()),
            (SUBJECT_HEADER, self.subject.clone()),
            (SEQUENCE_HEADER, self.sequence.to_string()),
            (REASON_HEADER, self.reason.as_str().to_owned()),
            // Header values are one line.
            (ERROR_HEADER, self.error.replace(['\r', '\n'], " ")),
        ]
    }

    /// The message that stores it with the original bytes, under an id
    /// that is the same whenever the same input is refused again.
    pub fn into_outgoing(self, prefix: &str, original: Bytes) -> Outgoing {
        Outgoing {
            subject: subject(prefix, self.stage),
            id: format!("dead-{}-{}-{}-{}", self.stage, self.stream, self.subject, self.sequence),
            payload: original,
            fence: None,
            dead_letter: Some(Box::new(self)),
        }
    }
}

/// The dead-letter stream (`prefix` upper-cased).
pub fn stream_name(prefix: &str) -> String {
    format!("{}_DEAD", prefix.to_ascii_uppercase())
}

/// The subject of `stage`'s dead letters.
pub fn subject(prefix: &str, stage: &str) -> String {
    format!("{}.dead.{stage}", prefix.to_ascii_lowercase())
}

/// Create the dead-letter stream if it does not exist: limits retention
/// (kept until `nats.dead_letter_max_age` or `nats.dead_letter_max_bytes`,
/// oldest dropped first), so dead letters can never stop a publisher.
pub async fn ensure_stream(js: &jetstream::Context, settings: &NatsSettings) -> Result<stream::Stream, TransportError> {
    let name = stream_name(&settings.prefix);
    let config = stream::Config {
        name: name.clone(),
        subjects: vec![format!("{}.dead.*", settings.prefix.to_ascii_lowercase())],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        max_age: settings.dead_letter_max_age,
        max_bytes: settings.dead_letter_max_bytes,
        duplicate_window: settings.duplicate_window.min(settings.dead_letter_max_age),
        num_replicas: settings.replicas,
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map_err(|e| js_err(format!("creating stream {name}"))(Box::new(e)))
}

/// One stored dead letter, as [`list`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    /// Its sequence in the dead-letter stream.
    pub seq: u64,
    /// When it was stored (RFC 3339).
    pub stored: String,
    /// The headers' values (empty where a header is missing).
    pub stage: String,
    /// The stream it came from.
    pub stream: String,
    /// Its subject there.
    pub subject: String,
    /// Its sequence there.
    pub sequence: String,
    /// Why it was refused.
    pub reason: String,
    /// The error.
    pub error: String,
    /// Size of the original message.
    pub bytes: usize,
}

/// Every dead letter stored (up to `limit`, oldest first).
pub async fn list(js: &jetstream::Context, prefix: &str, limit: usize) -> Result<Vec<Listed>, TransportError> {
    let name = stream_name(prefix);
    let mut stream = match js.get_stream(&name).await {
        Ok(stream) => stream,
        // No service has started yet: nothing was set aside.
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok(Vec::new());
        }
        Err(e) => return Err(js_err(format!("opening stream {name}"))(Box::new(e))),
    };
    let info = stream.info().await.map_err(|e| js_err(format!("reading stream {name}"))(Box::new(e)))?;
    let total = usize::try_from(info.state.messages).unwrap_or(usize::MAX).min(limit);
    if total == 0 {
        return Ok(Vec::new());
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .map_err(|e| js_err(format!("reading stream {name}"))(Box::new(e)))?;
    let mut messages = consumer.messages().await.map_err(|e| js_err(format!("reading stream {name}"))(Box::new(e)))?;
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
        let message = match next {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(js_err(format!("reading stream {name}"))(Box::new(e))),
            Ok(None) | Err(_) => break,
        };
        let header = |name: &str| {
            message.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned()).unwrap_or_default()
        };
        let info = message.info().map_err(|e| js_err(format!("reading stream {name}"))(e))?;
        out.push(Listed {
            seq: info.stream_sequence,
            stored: rfc3339(info.published.unix_timestamp()),
            stage: header(STAGE_HEADER),
            stream: header(STREAM_HEADER),
            subject: header(SUBJECT_HEADER),
            sequence: header(SEQUENCE_HEADER),
            reason: header(REASON_HEADER),
            error: header(ERROR_HEADER),
            bytes: message.payload.len(),
        });
    }
    Ok(out)
}

/// Seconds since the Unix epoch as RFC 3339 (UTC).
fn rfc3339(unix_seconds: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix_seconds).unwrap_or(0));
    humantime_serde::re::humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_batch_is_stored_under_an_id_fixed_by_where_it_came_from() {
        let letter = || DeadLetter {
            stage: "enrich",
            stream: "SLUICE_RAW".into(),
            subject: "sluice.raw.3".into(),
            sequence: 17,
            reason: Reason::NotCapnp,
            error: "batch is not valid Cap'n Proto:\nline two".into(),
        };
        let a = letter().into_outgoing("sluice", Bytes::from_static(b"garbage"));
        let b = letter().into_outgoing("sluice", Bytes::from_static(b"garbage"));
        assert_eq!(a.id, b.id, "a redelivery refused again is the same message");
        assert_eq!(a.subject, "sluice.dead.enrich");
        assert_eq!(&a.payload[..], b"garbage", "the original bytes, unchanged");
        let headers = letter().headers();
        assert!(headers.iter().all(|(_, v)| !v.contains('\n')), "header values are one line");
        assert!(headers.contains(&(REASON_HEADER, "not_capnp".into())));
    }

    #[test]
    fn every_reason_has_its_own_label() {
        let labels: std::collections::BTreeSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
    }

    #[test]
    fn codec_and_check_errors_map_to_their_reasons() {
        let garbage = sluice_model::codec::decode_raw(b"not a batch").err().map(Unreadable::from);
        assert_eq!(garbage.map(|e| e.reason()), Some(Reason::NotCapnp));
        let other = Unreadable::from(InvalidBatch::KeyGroup {
            found: sluice_model::key_group::KeyGroup(1),
            expected: sluice_model::key_group::KeyGroup(2),
        });
        assert_eq!(other.reason(), Reason::KeyGroup);
    }
}
