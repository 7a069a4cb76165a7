//! Batches on the wire: the Cap'n Proto form of `schemas/batch.capnp`.
//!
//! Only distributed mode encodes; embedded mode hands the in-memory batches
//! over as they are. Decoding refuses a batch of another `formatVersion`, an
//! enum value this build does not know, or text that is not UTF-8, with a
//! typed error: such a batch comes from a newer or broken peer and must not be
//! half-applied.

use std::sync::Arc;

use capnp::message::{Builder, ReaderOptions};

use crate::batch::{
    DailyCell, Dimensions, EnrichedBatch, EnrichedEvent, EnrichedUpload, EventBody, FORMAT_VERSION, FirstEventMove,
    InputSpan, RawBatch, RawEvent, RawUpload, RowBatch, Upload,
};
use crate::batch_capnp as wire;
use crate::event_time::{LocalDay, LocalMinute};
use crate::key_group::KeyGroup;
use crate::lineage::Lineage;
use crate::reject::{RejectCounts, RejectReason};
use crate::table::{
    AppDay, CustomKey, CustomValue, DailyKey, DailyValue, MinuteBlockKey, MinuteCell, MinuteValue, PartialRow, RowKey,
    RowValue,
};

/// A batch that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Not a valid Cap'n Proto message of the expected type.
    #[error("batch is not valid Cap'n Proto")]
    Capnp(#[from] capnp::Error),
    /// An enum value or union member this build does not know.
    #[error("batch uses a schema member this build does not know")]
    NotInSchema(#[from] capnp::NotInSchema),
    /// Text that is not UTF-8.
    #[error("batch text is not UTF-8")]
    Utf8(#[from] std::str::Utf8Error),
    /// A batch of another format version.
    #[error("batch format version {found}, this build reads {FORMAT_VERSION}")]
    Version {
        /// The version found.
        found: u16,
    },
    /// A number that cannot be what the schema says (e.g. a decimal sum).
    #[error("batch field {0} holds an invalid value")]
    Invalid(&'static str),
}

type Result<T> = std::result::Result<T, CodecError>;

/// The most words a packed message of `packed_len` bytes can unpack to:
/// packing writes a run of up to 256 zero words as two bytes, so 128 words
/// per byte (plus the one word a message of no bytes still reads). A segment
/// table that claims more is lying, and is refused before anything is
/// allocated for it.
fn unpacked_limit(packed_len: usize) -> usize {
    packed_len.saturating_mul(128).saturating_add(TRAVERSAL_FLOOR_WORDS)
}

/// Headroom every message gets whatever its size: a few root pointers and
/// empty lists, never enough to matter.
const TRAVERSAL_FLOOR_WORDS: usize = 1024;

/// How many times a decoder may read each word of a message. Our decoders
/// read every part once; pointers aimed at the same data (Cap'n Proto's
/// amplification attack) or a list of zero-sized elements (each charged one
/// word) would read more, and are refused at twice the message.
const TRAVERSALS_PER_WORD: usize = 2;

/// Read one packed message with every limit bound by its own size.
///
/// Cap'n Proto's traversal limit guards against a small message that makes
/// its reader walk (and a decoder allocate for) far more than it holds. A
/// fixed limit (8 GiB of words before) made ten hostile bytes worth gigabytes
/// of work. Here the message is first read with the most its bytes can
/// expand to, then reopened with a limit of twice what it really holds, so a
/// decoder's work and its lists' lengths stay within a small factor of the
/// message.
fn read_bounded(bytes: &[u8]) -> Result<capnp::message::Reader<capnp::serialize::OwnedSegments>> {
    let mut read = ReaderOptions::new();
    read.traversal_limit_in_words(Some(unpacked_limit(bytes.len())));
    let message = capnp::serialize_packed::read_message(&mut &bytes[..], read)?;
    let words = message.size_in_words();
    let mut traverse = ReaderOptions::new();
    traverse.traversal_limit_in_words(Some(
        words.saturating_mul(TRAVERSALS_PER_WORD).saturating_add(TRAVERSAL_FLOOR_WORDS),
    ));
    Ok(capnp::message::Reader::new(message.into_segments(), traverse))
}

/// Room to reserve for a list read from a message of `words` words: its
/// length, but never more elements than the message has words (a list of
/// zero-sized elements can claim millions at no cost on the wire).
fn capacity(len: u32, words: usize) -> usize {
    (len as usize).min(words)
}

fn check_version(found: u16) -> Result<()> {
    if found == FORMAT_VERSION { Ok(()) } else { Err(CodecError::Version { found }) }
}

fn reason_to_wire(r: RejectReason) -> wire::RejectReason {
    match r {
        RejectReason::Malformed => wire::RejectReason::Malformed,
        RejectReason::MissingField => wire::RejectReason::MissingField,
        RejectReason::UnknownApp => wire::RejectReason::UnknownApp,
        RejectReason::Duplicate => wire::RejectReason::Duplicate,
        RejectReason::UnknownEvent => wire::RejectReason::UnknownEvent,
        RejectReason::BadTimestamp => wire::RejectReason::BadTimestamp,
        RejectReason::BadValue => wire::RejectReason::BadValue,
    }
}

fn reason_from_wire(r: wire::RejectReason) -> RejectReason {
    match r {
        wire::RejectReason::Malformed => RejectReason::Malformed,
        wire::RejectReason::MissingField => RejectReason::MissingField,
        wire::RejectReason::UnknownApp => RejectReason::UnknownApp,
        wire::RejectReason::Duplicate => RejectReason::Duplicate,
        wire::RejectReason::UnknownEvent => RejectReason::UnknownEvent,
        wire::RejectReason::BadTimestamp => RejectReason::BadTimestamp,
        wire::RejectReason::BadValue => RejectReason::BadValue,
    }
}

fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> Result<&str> {
    Ok(r?.to_str()?)
}

fn set_lineage(mut b: wire::lineage::Builder<'_>, l: Lineage) {
    b.set_partition(l.partition);
    b.set_offset(l.offset);
}

fn get_lineage(r: capnp::Result<wire::lineage::Reader<'_>>) -> Result<Lineage> {
    let r = r?;
    Ok(Lineage { partition: r.get_partition(), offset: r.get_offset() })
}

/// Batches travel packed (Cap'n Proto's zero-run compression): the layout's
/// padding and small integers roughly halve in size, and every byte saved is
/// a byte JetStream does not write, read back and delete.
fn to_bytes(message: &Builder<capnp::message::HeapAllocator>) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.size_in_words() * 8 / 2);
    // Writing into a Vec cannot fail.
    let _ = capnp::serialize_packed::write_message(&mut out, message);
    out
}

// ------------------------------------------------------------------ raw

/// Encode a source → enrich batch.
pub fn encode_raw(batch: &RawBatch) -> Vec<u8> {
    let mut message = Builder::new_default();
    let mut b = message.init_root::<wire::raw_batch::Builder<'_>>();
    b.set_format_version(FORMAT_VERSION);
    b.set_key_group(batch.key_group.0);
    let mut list = b.init_uploads(batch.uploads.len() as u32);
    for (i, up) in batch.uploads.iter().enumerate() {
        let mut u = list.reborrow().get(i as u32);
        set_lineage(u.reborrow().init_lineage(), up.lineage);
        match &up.body {
            Err(reason) => u.set_rejected(reason_to_wire(*reason)),
            Ok(up) => {
                let mut a = u.init_accepted();
                a.set_mid(&*up.mid);
                a.set_app(&*up.app);
                a.set_dev(&*up.dev);
                if let Some(os) = &up.os {
                    a.set_os(&**os);
                }
                if let Some(ch) = &up.channel {
                    a.set_channel(&**ch);
                }
                if let Some(ip) = &up.ip {
                    a.set_ip(&**ip);
                }
                a.set_sent(up.sent);
                let mut evs = a.init_events(up.events.len() as u32);
                for (j, ev) in up.events.iter().enumerate() {
                    let mut e = evs.reborrow().get(j as u32);
                    e.set_ts(ev.ts);
                    match &ev.body {
                        Err(reason) => e.set_rejected(reason_to_wire(*reason)),
                        Ok(EventBody::Launch) => e.set_launch(()),
                        Ok(EventBody::Page { dur }) => e.set_page(*dur),
                        Ok(EventBody::Terminate { dur }) => e.set_terminate(*dur),
                        Ok(EventBody::Custom { id }) => e.set_custom(&**id),
                        Ok(EventBody::Pay { amount, currency }) => {
                            let mut p = e.init_pay();
                            p.set_amount(*amount);
                            p.set_currency(&**currency);
                        }
                    }
                }
            }
        }
    }
    to_bytes(&message)
}

/// Decode a source → enrich batch.
pub fn decode_raw(bytes: &[u8]) -> Result<RawBatch> {
    let message = read_bounded(bytes)?;
    let b = message.get_root::<wire::raw_batch::Reader<'_>>()?;
    check_version(b.get_format_version())?;
    let list = b.get_uploads()?;
    let mut uploads = Vec::with_capacity(capacity(list.len(), message.size_in_words()));
    for u in list.iter() {
        let lineage = get_lineage(u.get_lineage())?;
        let body = match u.which()? {
            wire::raw_upload::Rejected(r) => Err(reason_from_wire(r?)),
            wire::raw_upload::Accepted(a) => {
                let opt = |has: bool, r| -> Result<Option<Box<str>>> {
                    if has { Ok(Some(text(r)?.into())) } else { Ok(None) }
                };
                let mut events = Vec::new();
                for e in a.get_events()?.iter() {
                    use wire::raw_event::Which;
                    let body = match e.which()? {
                        Which::Rejected(r) => Err(reason_from_wire(r?)),
                        Which::Launch(()) => Ok(EventBody::Launch),
                        Which::Page(dur) => Ok(EventBody::Page { dur }),
                        Which::Terminate(dur) => Ok(EventBody::Terminate { dur }),
                        Which::Custom(id) => Ok(EventBody::Custom { id: Arc::from(text(id)?) }),
                        Which::Pay(p) => {
                            Ok(EventBody::Pay { amount: p.get_amount(), currency: Arc::from(text(p.get_currency())?) })
                        }
                    };
                    events.push(RawEvent { ts: e.get_ts(), body });
                }
                Ok(Upload {
                    mid: text(a.get_mid())?.into(),
                    app: Arc::from(text(a.get_app())?),
                    dev: Arc::from(text(a.get_dev())?),
                    os: opt(a.has_os(), a.get_os())?,
                    channel: opt(a.has_channel(), a.get_channel())?,
                    ip: opt(a.has_ip(), a.get_ip())?,
                    sent: a.get_sent(),
                    events,
                })
            }
        };
        uploads.push(RawUpload { lineage, body });
    }
    Ok(RawBatch { key_group: KeyGroup(b.get_key_group()), uploads })
}

// ------------------------------------------------------------------ enriched

fn set_dimensions(mut b: wire::dimensions::Builder<'_>, d: &Dimensions) {
    b.set_os(&*d.os);
    b.set_channel(&*d.channel);
    b.set_country(&*d.country);
}

fn get_dimensions(r: capnp::Result<wire::dimensions::Reader<'_>>) -> Result<Dimensions> {
    let r = r?;
    Ok(Dimensions {
        os: Arc::from(text(r.get_os())?),
        channel: Arc::from(text(r.get_channel())?),
        country: Arc::from(text(r.get_country())?),
    })
}

/// Encode an enrich → window batch.
pub fn encode_enriched(batch: &EnrichedBatch) -> Vec<u8> {
    let mut message = Builder::new_default();
    let mut b = message.init_root::<wire::enriched_batch::Builder<'_>>();
    b.set_format_version(FORMAT_VERSION);
    b.set_key_group(batch.key_group.0);
    let mut list = b.reborrow().init_uploads(batch.uploads.len() as u32);
    for (i, up) in batch.uploads.iter().enumerate() {
        let mut u = list.reborrow().get(i as u32);
        set_lineage(u.reborrow().init_lineage(), up.lineage);
        u.set_app(&*up.app);
        u.set_dev(&*up.dev);
        set_dimensions(u.reborrow().init_dimensions(), &up.dimensions);
        let mut evs = u.init_events(up.events.len() as u32);
        for (j, ev) in up.events.iter().enumerate() {
            let mut e = evs.reborrow().get(j as u32);
            e.set_index(ev.index);
            e.set_ts(ev.ts);
            match &ev.body {
                EventBody::Launch => e.set_launch(()),
                EventBody::Page { dur } => e.set_page(*dur),
                EventBody::Terminate { dur } => e.set_terminate(*dur),
                EventBody::Custom { id } => e.set_custom(&**id),
                EventBody::Pay { amount, currency } => {
                    let mut p = e.init_pay();
                    p.set_amount(*amount);
                    p.set_currency(&**currency);
                }
            }
        }
    }
    let mut moves = b.reborrow().init_first_event_moves(batch.first_event_moves.len() as u32);
    for (i, mv) in batch.first_event_moves.iter().enumerate() {
        let mut m = moves.reborrow().get(i as u32);
        set_lineage(m.reborrow().init_lineage(), mv.lineage);
        m.set_app(&*mv.app);
        m.set_dev(&*mv.dev);
        if let Some(out) = &mv.out_of {
            m.set_has_out_of(true);
            m.set_out_of_day(out.day.0);
            set_dimensions(m.reborrow().init_out_of(), &out.dimensions);
        }
        m.set_into_day(mv.into.day.0);
        set_dimensions(m.init_into(), &mv.into.dimensions);
    }
    let counts: Vec<(RejectReason, u64)> = batch.rejects.iter().collect();
    let mut rejects = b.reborrow().init_rejects(counts.len() as u32);
    for (i, (reason, count)) in counts.into_iter().enumerate() {
        let mut r = rejects.reborrow().get(i as u32);
        r.set_reason(reason_to_wire(reason));
        r.set_count(count);
    }
    b.set_input_records(batch.input.records);
    set_lineage(b.init_input_last(), batch.input.last);
    to_bytes(&message)
}

/// Decode an enrich → window batch.
pub fn decode_enriched(bytes: &[u8]) -> Result<EnrichedBatch> {
    let message = read_bounded(bytes)?;
    let b = message.get_root::<wire::enriched_batch::Reader<'_>>()?;
    check_version(b.get_format_version())?;
    let mut uploads = Vec::new();
    for u in b.get_uploads()?.iter() {
        let mut events = Vec::new();
        for e in u.get_events()?.iter() {
            use wire::enriched_event::Which;
            let body = match e.which()? {
                Which::Launch(()) => EventBody::Launch,
                Which::Page(dur) => EventBody::Page { dur },
                Which::Terminate(dur) => EventBody::Terminate { dur },
                Which::Custom(id) => EventBody::Custom { id: Arc::from(text(id)?) },
                Which::Pay(p) => {
                    EventBody::Pay { amount: p.get_amount(), currency: Arc::from(text(p.get_currency())?) }
                }
            };
            events.push(EnrichedEvent { index: e.get_index(), ts: e.get_ts(), body });
        }
        uploads.push(EnrichedUpload {
            lineage: get_lineage(u.get_lineage())?,
            app: Arc::from(text(u.get_app())?),
            dev: Arc::from(text(u.get_dev())?),
            dimensions: get_dimensions(u.get_dimensions())?,
            events,
        });
    }
    let mut first_event_moves = Vec::new();
    for m in b.get_first_event_moves()?.iter() {
        let out_of = if m.get_has_out_of() {
            Some(DailyCell { day: LocalDay(m.get_out_of_day()), dimensions: get_dimensions(m.get_out_of())? })
        } else {
            None
        };
        first_event_moves.push(FirstEventMove {
            lineage: get_lineage(m.get_lineage())?,
            app: Arc::from(text(m.get_app())?),
            dev: Arc::from(text(m.get_dev())?),
            out_of,
            into: DailyCell { day: LocalDay(m.get_into_day()), dimensions: get_dimensions(m.get_into())? },
        });
    }
    let mut rejects = RejectCounts::default();
    for r in b.get_rejects()?.iter() {
        rejects.0[reason_from_wire(r.get_reason()?).index()] += r.get_count();
    }
    let input = InputSpan { records: b.get_input_records(), last: get_lineage(b.get_input_last())? };
    Ok(EnrichedBatch { key_group: KeyGroup(b.get_key_group()), uploads, first_event_moves, rejects, input })
}

// ------------------------------------------------------------------ rows

fn wide(r: capnp::Result<capnp::text::Reader<'_>>, field: &'static str) -> Result<i128> {
    text(r)?.parse().map_err(|_| CodecError::Invalid(field))
}

/// Encode a window → sink batch.
pub fn encode_rows(batch: &RowBatch) -> Vec<u8> {
    let mut message = Builder::new_default();
    let mut b = message.init_root::<wire::row_batch::Builder<'_>>();
    b.set_format_version(FORMAT_VERSION);
    b.set_key_group(batch.key_group.0);
    b.set_covered_records(batch.covered);
    let mut list = b.init_rows(batch.rows.len() as u32);
    for (i, row) in batch.rows.iter().enumerate() {
        let mut r = list.reborrow().get(i as u32);
        r.set_version(row.version);
        match (&row.key, &row.value) {
            (RowKey::Daily(k), RowValue::Daily(v)) => encode_daily(r.init_daily(), k, v),
            (RowKey::SessionsPerDevice(k), RowValue::SessionsPerDevice(buckets)) => {
                let mut s = r.init_sessions_per_device();
                s.set_app(&*k.app);
                s.set_day(k.day.0);
                let mut list = s.init_buckets(10);
                for (j, n) in buckets.iter().enumerate() {
                    list.set(j as u32, *n);
                }
            }
            (RowKey::CustomEvents(k), RowValue::CustomEvents(v)) => {
                let mut c = r.init_custom_events();
                c.set_app(&*k.app);
                c.set_day(k.day.0);
                c.set_event_id(&*k.event_id);
                c.set_count(v.count);
                c.set_devices(v.devices);
            }
            (RowKey::MinuteBlock(k), RowValue::MinuteBlock(cells)) => {
                encode_minute_block(r.init_minute_block(), k, cells)
            }
            (RowKey::Rejects(reason), RowValue::Rejects(n)) => {
                let mut x = r.init_rejects();
                x.set_reason(reason_to_wire(*reason));
                x.set_count(*n);
            }
            // A key and value of different tables, or a final (merged)
            // minute row, is never emitted by a window: encode it as an
            // empty rejects row, which a sink ignores, rather than panic.
            _ => {
                let mut x = r.init_rejects();
                x.set_count(0);
            }
        }
    }
    to_bytes(&message)
}

/// Decode a window → sink batch.
pub fn decode_rows(bytes: &[u8]) -> Result<RowBatch> {
    use wire::partial_row::Which;
    let message = read_bounded(bytes)?;
    let b = message.get_root::<wire::row_batch::Reader<'_>>()?;
    check_version(b.get_format_version())?;
    let mut rows = Vec::new();
    for r in b.get_rows()?.iter() {
        let (key, value) = match r.which()? {
            Which::Daily(d) => decode_daily(d)?,
            Which::SessionsPerDevice(s) => {
                let list = s.get_buckets()?;
                if list.len() != 10 {
                    return Err(CodecError::Invalid("sessionsPerDevice.buckets"));
                }
                let mut buckets = [0u64; 10];
                for (j, n) in list.iter().enumerate() {
                    buckets[j] = n;
                }
                (
                    RowKey::SessionsPerDevice(AppDay {
                        app: Arc::from(text(s.get_app())?),
                        day: LocalDay(s.get_day()),
                    }),
                    RowValue::SessionsPerDevice(buckets),
                )
            }
            Which::CustomEvents(c) => (
                RowKey::CustomEvents(CustomKey {
                    app: Arc::from(text(c.get_app())?),
                    day: LocalDay(c.get_day()),
                    event_id: Arc::from(text(c.get_event_id())?),
                }),
                RowValue::CustomEvents(CustomValue { count: c.get_count(), devices: c.get_devices() }),
            ),
            Which::MinuteBlock(m) => decode_minute_block(m)?,
            Which::Rejects(x) => (RowKey::Rejects(reason_from_wire(x.get_reason()?)), RowValue::Rejects(x.get_count())),
        };
        rows.push(PartialRow { version: r.get_version(), key, value });
    }
    Ok(RowBatch { key_group: KeyGroup(b.get_key_group()), rows, covered: b.get_covered_records() })
}

/// One daily partial row.
fn encode_daily(mut d: wire::partial_row::daily::Builder<'_>, k: &DailyKey, v: &DailyValue) {
    d.set_app(&*k.app);
    d.set_day(k.day.0);
    set_dimensions(
        d.reborrow().init_dimensions(),
        &Dimensions { os: k.os.clone(), channel: k.channel.clone(), country: k.country.clone() },
    );
    d.set_events(v.events);
    d.set_launches(v.launches);
    d.set_active_devices(v.active_devices);
    d.set_new_devices(v.new_devices);
    d.set_playtime_s(&*v.playtime_s.to_string());
    let mut hist = d.reborrow().init_playtime_hist(8);
    for (j, n) in v.playtime_hist.iter().enumerate() {
        hist.set(j as u32, *n);
    }
    d.set_payers(v.payers);
    let mut rev = d.init_revenue(v.revenue.len() as u32);
    for (j, (cur, amount)) in v.revenue.iter().enumerate() {
        let mut e = rev.reborrow().get(j as u32);
        e.set_currency(&**cur);
        e.set_amount(&*amount.to_string());
    }
}

/// One minute-block partial row.
fn encode_minute_block(mut m: wire::partial_row::minute_block::Builder<'_>, k: &MinuteBlockKey, cells: &[MinuteCell]) {
    m.set_app(&*k.app);
    m.set_hour(k.hour);
    let mut list = m.init_cells(cells.len() as u32);
    for (j, cell) in cells.iter().enumerate() {
        let mut c = list.reborrow().get(j as u32);
        c.set_minute(cell.minute.0);
        c.set_events(cell.value.events);
        c.set_launches(cell.value.launches);
        c.set_revenue_cny(&*cell.value.revenue_cny.to_string());
    }
}

/// One daily partial row.
fn decode_daily(d: wire::partial_row::daily::Reader<'_>) -> Result<(RowKey, RowValue)> {
    let dims = get_dimensions(d.get_dimensions())?;
    let hist_list = d.get_playtime_hist()?;
    if hist_list.len() != 8 {
        return Err(CodecError::Invalid("daily.playtimeHist"));
    }
    let mut playtime_hist = [0u64; 8];
    for (j, n) in hist_list.iter().enumerate() {
        playtime_hist[j] = n;
    }
    let mut revenue = crate::table::Revenue::default();
    for e in d.get_revenue()?.iter() {
        revenue.insert(Arc::from(text(e.get_currency())?), wide(e.get_amount(), "revenue.amount")?);
    }
    Ok((
        RowKey::Daily(DailyKey {
            app: Arc::from(text(d.get_app())?),
            day: LocalDay(d.get_day()),
            os: dims.os,
            channel: dims.channel,
            country: dims.country,
        }),
        RowValue::Daily(DailyValue {
            events: d.get_events(),
            launches: d.get_launches(),
            active_devices: d.get_active_devices(),
            new_devices: d.get_new_devices(),
            playtime_s: wide(d.get_playtime_s(), "daily.playtimeS")?,
            playtime_hist,
            payers: d.get_payers(),
            revenue,
        }),
    ))
}

/// One minute-block partial row.
fn decode_minute_block(m: wire::partial_row::minute_block::Reader<'_>) -> Result<(RowKey, RowValue)> {
    let mut cells = Vec::new();
    for c in m.get_cells()?.iter() {
        let value = MinuteValue {
            events: c.get_events(),
            launches: c.get_launches(),
            revenue_cny: wide(c.get_revenue_cny(), "minuteCell.revenueCny")?,
        };
        cells.push(MinuteCell { minute: LocalMinute(c.get_minute()), value });
    }
    if cells.windows(2).any(|w| w[0].minute >= w[1].minute) {
        return Err(CodecError::Invalid("minuteBlock.cells (not sorted by minute)"));
    }
    Ok((
        RowKey::MinuteBlock(MinuteBlockKey { app: Arc::from(text(m.get_app())?), hour: m.get_hour() }),
        RowValue::MinuteBlock(cells),
    ))
}

// ------------------------------------------------------------------ size limits

/// Encode `batch`, split into parts of at most `max_bytes` each where it can
/// be split (a single record larger than that stays one part). Every part
/// is a batch of its own; each comes with its record count.
fn within<B>(
    batch: &B,
    max_bytes: usize,
    encode: fn(&B) -> Vec<u8>,
    records: fn(&B) -> u64,
    split: fn(&B) -> Option<(B, B)>,
    out: &mut Vec<(Vec<u8>, u64)>,
) {
    let bytes = encode(batch);
    if bytes.len() <= max_bytes {
        out.push((bytes, records(batch)));
        return;
    }
    match split(batch) {
        Some((a, b)) => {
            within(&a, max_bytes, encode, records, split, out);
            within(&b, max_bytes, encode, records, split, out);
        }
        None => out.push((bytes, records(batch))),
    }
}

/// [`encode_raw`] in parts of at most `max_bytes`: halves of the uploads
/// (each keeps its lineage, so a receiver's dedup is unchanged).
pub fn encode_raw_within(batch: &RawBatch, max_bytes: usize) -> Vec<(Vec<u8>, u64)> {
    let mut out = Vec::new();
    within(
        batch,
        max_bytes,
        encode_raw,
        |b| b.uploads.len() as u64,
        |b| {
            (b.uploads.len() >= 2).then(|| {
                let mid = b.uploads.len() / 2;
                let part = |ups: &[RawUpload]| RawBatch { key_group: b.key_group, uploads: ups.to_vec() };
                (part(&b.uploads[..mid]), part(&b.uploads[mid..]))
            })
        },
        &mut out,
    );
    out
}

/// [`encode_enriched`] in parts of at most `max_bytes`: halves of the
/// uploads. The first-event moves, rejects and input count travel with the
/// last part; each part's input lineage is that of its last upload, so the
/// parts' lineages grow and a receiver can drop a replayed part by it.
pub fn encode_enriched_within(batch: &EnrichedBatch, max_bytes: usize) -> Vec<(Vec<u8>, u64)> {
    let mut out = Vec::new();
    within(
        batch,
        max_bytes,
        encode_enriched,
        |b| b.uploads.len() as u64,
        |b| {
            (b.uploads.len() >= 2).then(|| {
                let mid = b.uploads.len() / 2;
                let first = EnrichedBatch {
                    key_group: b.key_group,
                    uploads: b.uploads[..mid].to_vec(),
                    first_event_moves: Vec::new(),
                    rejects: RejectCounts::default(),
                    input: InputSpan { records: 0, last: b.uploads[mid - 1].lineage },
                };
                let second = EnrichedBatch { uploads: b.uploads[mid..].to_vec(), ..b.clone() };
                (first, second)
            })
        },
        &mut out,
    );
    out
}

/// [`encode_rows`] in parts of at most `max_bytes`: halves of the rows, each
/// with the key group's covered count (rows are absolute and versioned, so
/// parts apply in any order).
pub fn encode_rows_within(batch: &RowBatch, max_bytes: usize) -> Vec<(Vec<u8>, u64)> {
    let mut out = Vec::new();
    within(
        batch,
        max_bytes,
        encode_rows,
        |b| b.rows.len() as u64,
        |b| {
            (b.rows.len() >= 2).then(|| {
                let mid = b.rows.len() / 2;
                let part = |rows: &[crate::table::PartialRow]| RowBatch {
                    key_group: b.key_group,
                    rows: rows.to_vec(),
                    covered: b.covered,
                };
                (part(&b.rows[..mid]), part(&b.rows[mid..]))
            })
        },
        &mut out,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> Dimensions {
        Dimensions { os: "ios".into(), channel: "apple".into(), country: "CN".into() }
    }

    fn raw_sample() -> RawBatch {
        RawBatch {
            key_group: KeyGroup(7),
            uploads: vec![
                RawUpload { lineage: Lineage { partition: 3, offset: 99 }, body: Err(RejectReason::Malformed) },
                RawUpload {
                    lineage: Lineage::line(5),
                    body: Ok(Upload {
                        mid: "m".into(),
                        app: "a".into(),
                        dev: "d".into(),
                        os: None,
                        channel: Some("".into()),
                        ip: Some("1.2.3.4".into()),
                        sent: -5,
                        events: vec![
                            RawEvent { ts: 1, body: Ok(EventBody::Launch) },
                            RawEvent { ts: 2, body: Ok(EventBody::Pay { amount: 600, currency: "CNY".into() }) },
                            RawEvent { ts: 3, body: Ok(EventBody::Custom { id: "单抽".into() }) },
                            RawEvent { ts: 0, body: Err(RejectReason::BadValue) },
                        ],
                    }),
                },
            ],
        }
    }

    #[test]
    fn raw_batches_round_trip() -> Result<()> {
        let batch = raw_sample();
        assert_eq!(decode_raw(&encode_raw(&batch))?, batch);
        Ok(())
    }

    fn enriched_sample() -> EnrichedBatch {
        let mut rejects = RejectCounts::default();
        rejects.add(RejectReason::Duplicate);
        EnrichedBatch {
            key_group: KeyGroup(1),
            uploads: vec![EnrichedUpload {
                lineage: Lineage::line(1),
                app: "a".into(),
                dev: "d".into(),
                dimensions: dims(),
                events: vec![EnrichedEvent { index: 2, ts: 9, body: EventBody::Terminate { dur: 12 } }],
            }],
            first_event_moves: vec![FirstEventMove {
                lineage: Lineage::line(1),
                app: "a".into(),
                dev: "d".into(),
                out_of: Some(DailyCell { day: LocalDay(20_000), dimensions: dims() }),
                into: DailyCell { day: LocalDay(19_999), dimensions: dims() },
            }],
            rejects,
            input: InputSpan { records: 3, last: Lineage { partition: 2, offset: 77 } },
        }
    }

    #[test]
    fn enriched_batches_round_trip() -> Result<()> {
        let batch = enriched_sample();
        assert_eq!(decode_enriched(&encode_enriched(&batch))?, batch);
        Ok(())
    }

    /// Cap'n Proto's packing, the plain way (no runs): enough to put a
    /// hand-made message on the wire the way a hostile peer would.
    fn pack(unpacked: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for word in unpacked.chunks(8) {
            let tag = word.iter().enumerate().fold(0u8, |t, (i, b)| if *b != 0 { t | 1 << i } else { t });
            out.push(tag);
            out.extend(word.iter().filter(|b| **b != 0));
            if tag == 0x00 || tag == 0xff {
                out.push(0); // no further zero or literal words
            }
        }
        out
    }

    #[test]
    fn a_segment_table_claiming_more_than_the_bytes_can_hold_is_refused() {
        // One segment of 2^28 words (2 GiB) in two bytes: read with the old
        // fixed limit, this allocated the segment before finding the bytes
        // missing.
        let lying = pack(&[0, 0, 0, 0, 0, 0, 0, 0x10]);
        assert_eq!(lying, [0x80, 0x10]);
        let refused = decode_raw(&lying);
        assert!(
            matches!(&refused, Err(CodecError::Capnp(e)) if matches!(e.kind, capnp::ErrorKind::MessageTooLarge(_))),
            "{refused:?}"
        );
    }

    #[test]
    fn a_list_of_zero_sized_elements_cannot_claim_more_than_the_message_holds() {
        // An empty raw batch, then its uploads list re-labelled as 2^28
        // elements of no size: a few words on the wire. The old limit let
        // that through, and the decoder reserved 2^28 uploads (tens of GiB).
        let mut message = Builder::new_default();
        let mut b = message.init_root::<wire::raw_batch::Builder<'_>>();
        b.set_format_version(FORMAT_VERSION);
        b.init_uploads(0);
        let mut unpacked = capnp::serialize::write_message_segments_to_words(&message);
        let tag = unpacked.len() - 8; // the list's tag word is the last one written
        unpacked[tag..].copy_from_slice(&((1u64 << 28) << 2).to_le_bytes());
        let hostile = pack(&unpacked);
        assert!(hostile.len() < 64, "{} bytes", hostile.len());
        let refused = decode_raw(&hostile);
        assert!(matches!(refused, Err(CodecError::Capnp(_))), "{refused:?}");
        // The same message with its real tag still reads: the limit is what refused it.
        let mut honest = capnp::serialize::write_message_segments_to_words(&message);
        honest[tag..].copy_from_slice(&((3u64) << 2).to_le_bytes());
        let three = decode_raw(&pack(&honest)).map(|batch| batch.uploads.len());
        assert!(matches!(three, Ok(3)), "{three:?}");
    }

    #[test]
    fn oversized_batches_split_into_parts_that_keep_every_record() -> Result<()> {
        let upload = |offset: u64| EnrichedUpload {
            lineage: Lineage { partition: 1, offset },
            app: "a".into(),
            dev: format!("device-{offset}").into(),
            dimensions: dims(),
            events: vec![EnrichedEvent { index: 0, ts: 9, body: EventBody::Launch }; 20],
        };
        let mut rejects = RejectCounts::default();
        rejects.add(RejectReason::UnknownApp);
        let batch = EnrichedBatch {
            key_group: KeyGroup(5),
            uploads: (10..50).map(upload).collect(),
            first_event_moves: Vec::new(),
            rejects,
            input: InputSpan { records: 41, last: Lineage { partition: 1, offset: 50 } },
        };
        let whole = encode_enriched(&batch).len();
        let parts = encode_enriched_within(&batch, whole / 5);
        assert!(parts.len() >= 5, "{} parts", parts.len());
        assert!(parts.iter().all(|(p, _)| p.len() <= whole / 5));
        let decoded: Vec<EnrichedBatch> = parts.iter().map(|(p, _)| decode_enriched(p)).collect::<Result<_>>()?;
        let uploads: Vec<EnrichedUpload> = decoded.iter().flat_map(|b| b.uploads.clone()).collect();
        assert_eq!(uploads, batch.uploads, "every upload once, in order");
        let lasts: Vec<u64> = decoded.iter().map(|b| b.input.last.offset).collect();
        assert!(lasts.windows(2).all(|w| w[0] < w[1]), "part lineages grow: {lasts:?}");
        assert_eq!(decoded.last().map(|b| (b.input, b.rejects)), Some((batch.input, batch.rejects)));
        assert_eq!(decoded.iter().map(|b| b.input.records).sum::<u64>(), 41);
        assert_eq!(parts.iter().map(|(_, n)| n).sum::<u64>(), 40);
        Ok(())
    }

    fn rows_sample() -> RowBatch {
        let mut daily = DailyValue { events: 2, playtime_s: i128::from(i64::MAX) * 3, ..Default::default() };
        daily.revenue.insert("CNY".into(), 600);
        RowBatch {
            key_group: KeyGroup(3),
            covered: 12,
            rows: vec![
                PartialRow {
                    version: 4,
                    key: RowKey::Daily(DailyKey {
                        app: "a".into(),
                        day: LocalDay(1),
                        os: "ios".into(),
                        channel: "apple".into(),
                        country: "CN".into(),
                    }),
                    value: RowValue::Daily(daily),
                },
                PartialRow {
                    version: 5,
                    key: RowKey::MinuteBlock(MinuteBlockKey { app: "a".into(), hour: -1 }),
                    value: RowValue::MinuteBlock(vec![
                        MinuteCell {
                            minute: LocalMinute(-3),
                            value: MinuteValue { events: 1, launches: 1, revenue_cny: 0 },
                        },
                        MinuteCell {
                            minute: LocalMinute(-2),
                            value: MinuteValue { events: 2, launches: 0, revenue_cny: -7 },
                        },
                    ]),
                },
                PartialRow { version: 6, key: RowKey::Rejects(RejectReason::BadValue), value: RowValue::Rejects(3) },
            ],
        }
    }

    #[test]
    fn row_batches_round_trip_and_versions_are_checked() -> Result<()> {
        let batch = rows_sample();
        assert_eq!(decode_rows(&encode_rows(&batch))?, batch);

        let mut message = Builder::new_default();
        message.init_root::<wire::row_batch::Builder<'_>>().set_format_version(FORMAT_VERSION + 1);
        let err = decode_rows(&to_bytes(&message)).expect_err("future version");
        assert!(matches!(err, CodecError::Version { .. }), "{err}");
        assert!(decode_rows(b"garbage").is_err());
        Ok(())
    }

    /// Apply `edits` (position, byte) to `bytes`, then cut it at `cut`.
    fn damage(bytes: &[u8], edits: &[(proptest::sample::Index, u8)], cut: proptest::sample::Index) -> Vec<u8> {
        let mut out = bytes.to_vec();
        for (at, byte) in edits {
            let at = at.index(out.len());
            out[at] = *byte;
        }
        out.truncate(cut.index(out.len() + 1));
        out
    }

    /// Every decoder on `bytes`, and the checks the stages run on what
    /// decodes: none may panic, whatever came in.
    fn read_everything(bytes: &[u8]) {
        if let Ok(batch) = decode_raw(bytes) {
            let _ = crate::validate::raw(&batch, batch.key_group);
        }
        if let Ok(batch) = decode_enriched(bytes) {
            let _ = crate::validate::enriched(&batch, batch.key_group);
        }
        if let Ok(batch) = decode_rows(bytes) {
            let _ = crate::validate::rows(&batch, batch.key_group);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 1024, ..Default::default() })]

        #[test]
        fn decoders_never_panic_on_random_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            read_everything(&bytes);
        }

        /// Random bytes rarely get past the segment table; a real batch with
        /// a few bytes changed reaches every pointer, list and union.
        #[test]
        fn decoders_never_panic_on_damaged_batches(
            edits in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::num::u8::ANY), 1..24),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            for valid in [encode_raw(&raw_sample()), encode_enriched(&enriched_sample()), encode_rows(&rows_sample())] {
                read_everything(&damage(&valid, &edits, cut));
                // Unpacked damage reaches the words themselves, not only the packing tags.
                let mut words = capnp::serialize::write_message_segments_to_words(
                    &capnp::serialize_packed::read_message(&mut &valid[..], ReaderOptions::new())
                        .map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?
                        .into_segments(),
                );
                words = damage(&words, &edits, cut);
                read_everything(&pack(&words));
            }
        }
    }
}
