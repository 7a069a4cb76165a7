//! The batches stages hand each other, in memory.
//!
//! In embedded mode a batch moves from stage to stage as these Rust values,
//! never encoded; in distributed mode [`crate::codec`] turns them into the
//! Cap'n Proto messages of `schemas/batch.capnp` and back. Every batch belongs
//! to one key group and every record carries its [`Lineage`].
//!
//! Strings that repeat across records (dimension values, apps) are
//! `Arc<str>`, so fanning an upload's dimensions out to its events is a
//! reference count, not a copy.

use std::sync::Arc;

use crate::event_time::LocalDay;
use crate::key_group::KeyGroup;
use crate::lineage::Lineage;
use crate::reject::{RejectCounts, RejectReason};
use crate::table::PartialRow;

/// Version of the batch format; a reader refuses batches of another version.
pub const FORMAT_VERSION: u16 = 1;

/// What an accepted event says, by kind (SPEC section 1, unified model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    /// A session start.
    Launch,
    /// A page view of `dur` seconds.
    Page {
        /// Seconds, >= 0.
        dur: i64,
    },
    /// A session end after `dur` seconds of play.
    Terminate {
        /// Seconds, >= 0.
        dur: i64,
    },
    /// A custom event.
    Custom {
        /// The event id (any string, possibly empty).
        id: Arc<str>,
    },
    /// A payment.
    Pay {
        /// Minor units (fen for CNY), >= 0.
        amount: i64,
        /// Currency code as the SDK sent it.
        currency: Arc<str>,
    },
}

/// One event of an upload that passed rules 1-2: accepted by rules 5-7, or the
/// reason it was not. Rejected events travel on because they are counted only
/// if enrich accepts their message (rules 3-4 come first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    /// ms since the Unix epoch (0 for a rejected event).
    pub ts: i64,
    /// The event, or why rules 5-7 dropped it.
    pub body: Result<EventBody, RejectReason>,
}

/// An upload that passed rules 1-2, in the unified model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// Message id (dedup key).
    pub mid: Box<str>,
    /// App key.
    pub app: Arc<str>,
    /// Device id.
    pub dev: Arc<str>,
    /// OS as the SDK sent it, `None` when missing or not a string.
    pub os: Option<Box<str>>,
    /// Raw channel, `None` when missing or not a string.
    pub channel: Option<Box<str>>,
    /// Client IP, `None` when missing or not a string.
    pub ip: Option<Box<str>>,
    /// When the SDK sent it, ms since the epoch (v1: `time * 1000`, saturated).
    pub sent: i64,
    /// The events, in upload order (their index is their position).
    pub events: Vec<RawEvent>,
}

/// A record of the source's output: an upload, or the reason rules 1-2 rejected it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawUpload {
    /// Where the record came from.
    pub lineage: Lineage,
    /// The parsed upload, or its reject.
    pub body: Result<Upload, RejectReason>,
}

/// Source → enrich.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawBatch {
    /// The key group every upload of this batch belongs to.
    pub key_group: KeyGroup,
    /// Uploads in input order.
    pub uploads: Vec<RawUpload>,
}

/// A batch that belongs to one key group: what a runner routes by.
pub trait Keyed {
    /// The key group of every record in it.
    fn key_group(&self) -> KeyGroup;
}

impl Keyed for RawBatch {
    fn key_group(&self) -> KeyGroup {
        self.key_group
    }
}

/// The dimensions an accepted message gives each of its events.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Dimensions {
    /// Lower-cased OS, or `unknown`.
    pub os: Arc<str>,
    /// Channel group from channels.csv, or `other`.
    pub channel: Arc<str>,
    /// Country from geo.csv, or `ZZ`.
    pub country: Arc<str>,
}

/// An accepted event with its position in the upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrichedEvent {
    /// Position of the event in its upload.
    pub index: u32,
    /// ms since the Unix epoch.
    pub ts: i64,
    /// What happened.
    pub body: EventBody,
}

/// An accepted upload's accepted events, with the dimensions they share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrichedUpload {
    /// Where the upload came from.
    pub lineage: Lineage,
    /// App key (known to the catalogue).
    pub app: Arc<str>,
    /// Device id.
    pub dev: Arc<str>,
    /// The upload's dimensions.
    pub dimensions: Dimensions,
    /// Accepted events only (rejected ones were counted).
    pub events: Vec<EnrichedEvent>,
}

/// A cell of the `daily` table a device's first event can fall in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DailyCell {
    /// Local day of the event.
    pub day: LocalDay,
    /// The event's dimensions.
    pub dimensions: Dimensions,
}

/// The device registry moved a device's first event: count the device as new
/// in `into` and, if it was counted before, retract it from `out_of`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstEventMove {
    /// The upload that caused the move.
    pub lineage: Lineage,
    /// App key.
    pub app: Arc<str>,
    /// Device id.
    pub dev: Arc<str>,
    /// Where the device was counted as new, if anywhere.
    pub out_of: Option<DailyCell>,
    /// Where it is new now.
    pub into: DailyCell,
}

/// How much input a batch accounts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InputSpan {
    /// Raw records (uploads, accepted or rejected).
    pub records: u64,
    /// Lineage of the last of them.
    pub last: Lineage,
}

/// Enrich → window.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EnrichedBatch {
    /// The key group of every record in the batch.
    pub key_group: KeyGroup,
    /// Accepted uploads.
    pub uploads: Vec<EnrichedUpload>,
    /// Changes of first events (new devices and retractions).
    pub first_event_moves: Vec<FirstEventMove>,
    /// Rejects of every rule counted for this batch's input.
    pub rejects: RejectCounts,
    /// The raw input the batch accounts for.
    pub input: InputSpan,
}

/// Window → sink: partial rows of one key group, as absolute values.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RowBatch {
    /// The key group the partials belong to.
    pub key_group: KeyGroup,
    /// Absolute partial rows with their versions.
    pub rows: Vec<PartialRow>,
    /// Input records the key group accounts for so far (only grows).
    pub covered: u64,
}
