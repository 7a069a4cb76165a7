//! SDK uploads: both generations read into the unified model, and the rules
//! of SPEC section 2 that need nothing but the upload itself.
//!
//! Order matters and follows the SPEC exactly: rule 1 (`malformed`), then rule 2
//! (`missing_field`) decide about the whole message here; rules 3 and 4 need the
//! app catalogue and the dedup memory and are enrich's. Rules 5-7 are checked
//! here per event, but a failing event is only *marked*: it is counted when
//! enrich accepts its message, so the events of a message rejected later are
//! never counted.
//!
//! v1 (legacy) uploads have a `ver` key and carry one event; they are mapped
//! field by field (`msgid`→mid, `time` seconds→ms, `money` yuan string→fen...).

use std::sync::Arc;

use sluice_model::batch::{EventBody, RawEvent, Upload};
use sluice_model::reject::RejectReason;

use crate::json_reader::{NotJson, Reader, Scalar};

/// The fields of one v2 event that the rules read.
#[derive(Default)]
struct EventFields<'a> {
    t: Scalar<'a>,
    ts: Scalar<'a>,
    dur: Scalar<'a>,
    amount: Scalar<'a>,
    cur: Scalar<'a>,
    id: Scalar<'a>,
}

/// An element of a v2 `events` array.
enum EventItem<'a> {
    Object(EventFields<'a>),
    NotObject,
}

/// The `events` member of an upload.
#[derive(Default)]
enum Events<'a> {
    #[default]
    Absent,
    NotArray,
    Array(Vec<EventItem<'a>>),
}

/// Every top-level field either generation uses; which ones count is decided
/// after the whole object is read (a `ver` key anywhere makes it v1), and a
/// repeated key keeps its last value, as in Python's `json`.
#[derive(Default)]
struct UploadFields<'a> {
    is_v1: bool,
    // v2
    mid: Scalar<'a>,
    app: Scalar<'a>,
    dev: Scalar<'a>,
    os: Scalar<'a>,
    ch: Scalar<'a>,
    ip: Scalar<'a>,
    sent: Scalar<'a>,
    events: Events<'a>,
    // v1
    msgid: Scalar<'a>,
    appkey: Scalar<'a>,
    deviceid: Scalar<'a>,
    platform: Scalar<'a>,
    channel: Scalar<'a>,
    clientip: Scalar<'a>,
    kind: Scalar<'a>,
    time: Scalar<'a>,
    duration: Scalar<'a>,
    eventid: Scalar<'a>,
    money: Scalar<'a>,
    currency: Scalar<'a>,
}

fn read_event<'a>(r: &mut Reader<'a>, depth: usize) -> Result<EventItem<'a>, NotJson> {
    if !r.at_object() {
        r.skip(depth)?;
        return Ok(EventItem::NotObject);
    }
    let mut f = EventFields::default();
    r.object(depth, |r, key| {
        let slot = match &*key {
            "t" => &mut f.t,
            "ts" => &mut f.ts,
            "dur" => &mut f.dur,
            "amount" => &mut f.amount,
            "cur" => &mut f.cur,
            "id" => &mut f.id,
            _ => return r.skip(depth + 1),
        };
        *slot = r.scalar(depth + 1)?;
        Ok(())
    })?;
    Ok(EventItem::Object(f))
}

fn read_upload(value: &str) -> Result<UploadFields<'_>, NotJson> {
    let mut r = Reader::new(value);
    if !r.at_object() {
        // Rule 1: whatever it is, it is not a JSON object.
        return Err(NotJson);
    }
    let mut f = UploadFields::default();
    r.object(1, |r, key| {
        let slot = match &*key {
            "events" => {
                f.events = if r.at_array() {
                    let mut items = Vec::new();
                    r.array(2, |r| {
                        items.push(read_event(r, 3)?);
                        Ok(())
                    })?;
                    Events::Array(items)
                } else {
                    r.skip(2)?;
                    Events::NotArray
                };
                return Ok(());
            }
            "ver" => {
                f.is_v1 = true;
                return r.skip(2);
            }
            "mid" => &mut f.mid,
            "app" => &mut f.app,
            "dev" => &mut f.dev,
            "os" => &mut f.os,
            "ch" => &mut f.ch,
            "ip" => &mut f.ip,
            "sent" => &mut f.sent,
            "msgid" => &mut f.msgid,
            "appkey" => &mut f.appkey,
            "deviceid" => &mut f.deviceid,
            "platform" => &mut f.platform,
            "channel" => &mut f.channel,
            "clientip" => &mut f.clientip,
            "type" => &mut f.kind,
            "time" => &mut f.time,
            "duration" => &mut f.duration,
            "eventid" => &mut f.eventid,
            "money" => &mut f.money,
            "currency" => &mut f.currency,
            _ => return r.skip(2),
        };
        *slot = r.scalar(2)?;
        Ok(())
    })?;
    r.end()?;
    Ok(f)
}

fn owned(s: &Scalar<'_>) -> Option<Box<str>> {
    s.str().map(Box::from)
}

/// Rules 1-2 and the SPEC §1 mapping, then rules 5-7 per event: the upload in
/// the unified model, or why the whole message is rejected.
pub fn parse_upload(value: &[u8]) -> Result<Upload, RejectReason> {
    parse_upload_with(value, &mut Labels::default())
}

/// Shared copies of the short strings events repeat (currencies, custom
/// event ids): a handful of values occur millions of times, and each event
/// would otherwise allocate its own. Bounded: past [`Labels::LIMIT`] distinct
/// values, new ones are allocated as they come.
#[derive(Default)]
pub struct Labels {
    seen: std::collections::HashMap<Box<str>, Arc<str>, rustc_hash::FxBuildHasher>,
}

impl Labels {
    /// Distinct strings remembered at most.
    pub const LIMIT: usize = 4096;

    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.seen.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        if self.seen.len() < Self::LIMIT {
            self.seen.insert(s.into(), a.clone());
        }
        a
    }
}

/// [`parse_upload`], sharing repeated labels through `labels`.
pub fn parse_upload_with(value: &[u8], labels: &mut Labels) -> Result<Upload, RejectReason> {
    // Rule 1 covers bytes that are not UTF-8 and an empty VALUE too.
    let text = std::str::from_utf8(value).map_err(|_| RejectReason::Malformed)?;
    let f = read_upload(text).map_err(|NotJson| RejectReason::Malformed)?;
    if f.is_v1 { v1(&f, labels) } else { v2(f, labels) }
}

fn required<'s>(mid: &'s Scalar<'_>, app: &'s Scalar<'_>, dev: &'s Scalar<'_>) -> Option<(&'s str, &'s str, &'s str)> {
    Some((mid.non_empty_str()?, app.non_empty_str()?, dev.non_empty_str()?))
}

fn v2(f: UploadFields<'_>, labels: &mut Labels) -> Result<Upload, RejectReason> {
    let (Some((mid, app, dev)), Some(sent), Events::Array(items)) =
        (required(&f.mid, &f.app, &f.dev), f.sent.int(), &f.events)
    else {
        return Err(RejectReason::MissingField);
    };
    if items.is_empty() {
        return Err(RejectReason::MissingField);
    }
    let events = items
        .iter()
        .map(|item| match item {
            EventItem::NotObject => RawEvent { ts: 0, body: Err(RejectReason::UnknownEvent) },
            EventItem::Object(ev) => v2_event(ev, sent, labels),
        })
        .collect();
    Ok(Upload {
        mid: mid.into(),
        app: Arc::from(app),
        dev: Arc::from(dev),
        os: owned(&f.os),
        channel: owned(&f.ch),
        ip: owned(&f.ip),
        sent,
        events,
    })
}

/// Rules 5-7 for one v2 event.
fn v2_event(ev: &EventFields<'_>, sent: i64, labels: &mut Labels) -> RawEvent {
    let reject = |reason| RawEvent { ts: 0, body: Err(reason) };
    let Some(t) = ev.t.str() else {
        return reject(RejectReason::UnknownEvent);
    };
    if !matches!(t, "launch" | "page" | "custom" | "pay" | "terminate") {
        return reject(RejectReason::UnknownEvent);
    }
    let Some(ts) = ev.ts.int().filter(|&ts| in_bounds(ts, sent)) else {
        return reject(RejectReason::BadTimestamp);
    };
    let body = match t {
        "launch" => Some(EventBody::Launch),
        "page" => ev.dur.int().filter(|d| *d >= 0).map(|dur| EventBody::Page { dur }),
        "terminate" => ev.dur.int().filter(|d| *d >= 0).map(|dur| EventBody::Terminate { dur }),
        "custom" => ev.id.str().map(|id| EventBody::Custom { id: labels.get(id) }),
        _ => match (ev.amount.int().filter(|a| *a >= 0), ev.cur.str()) {
            (Some(amount), Some(cur)) => Some(EventBody::Pay { amount, currency: labels.get(cur) }),
            _ => None,
        },
    };
    match body {
        Some(body) => RawEvent { ts, body: Ok(body) },
        None => reject(RejectReason::BadValue),
    }
}

/// Rule 6: ts within [sent - 7 days, sent + 10 minutes] (exact, no overflow).
fn in_bounds(ts: i64, sent: i64) -> bool {
    sluice_model::validate::ts_within_bounds(ts, sent)
}

fn v1(f: &UploadFields<'_>, labels: &mut Labels) -> Result<Upload, RejectReason> {
    let (Some((mid, app, dev)), Some(time), Some(kind)) =
        (required(&f.msgid, &f.appkey, &f.deviceid), f.time.int(), f.kind.str())
    else {
        return Err(RejectReason::MissingField);
    };
    // sent = ts = time * 1000. A time whose ms do not fit in 64 bits is still
    // a valid *message* (rule 2 only asks for an integer), but its event's ts
    // is no integer, so the event is a bad_timestamp (rule 6).
    let ts = time.checked_mul(1000);
    let sent = ts.unwrap_or(if time < 0 { i64::MIN } else { i64::MAX });
    let event = match (v1_kind(kind), ts) {
        (None, _) => RawEvent { ts: 0, body: Err(RejectReason::UnknownEvent) },
        (Some(_), None) => RawEvent { ts: 0, body: Err(RejectReason::BadTimestamp) },
        (Some(k), Some(ts)) => RawEvent { ts, body: v1_body(k, f, labels).ok_or(RejectReason::BadValue) },
    };
    Ok(Upload {
        mid: mid.into(),
        app: Arc::from(app),
        dev: Arc::from(dev),
        os: owned(&f.platform),
        channel: owned(&f.channel),
        ip: owned(&f.clientip),
        sent,
        events: vec![event],
    })
}

#[derive(Clone, Copy)]
enum V1Kind {
    Launch,
    Page,
    Event,
    Payment,
    Exit,
}

fn v1_kind(kind: &str) -> Option<V1Kind> {
    Some(match kind {
        "launch" => V1Kind::Launch,
        "page" => V1Kind::Page,
        "event" => V1Kind::Event,
        "payment" => V1Kind::Payment,
        "exit" => V1Kind::Exit,
        _ => return None,
    })
}

/// Rule 7 for the one event of a v1 upload.
fn v1_body(kind: V1Kind, f: &UploadFields<'_>, labels: &mut Labels) -> Option<EventBody> {
    let dur = || f.duration.int().filter(|d| *d >= 0);
    match kind {
        V1Kind::Launch => Some(EventBody::Launch),
        V1Kind::Page => dur().map(|dur| EventBody::Page { dur }),
        V1Kind::Exit => dur().map(|dur| EventBody::Terminate { dur }),
        V1Kind::Event => f.eventid.str().map(|id| EventBody::Custom { id: labels.get(id) }),
        V1Kind::Payment => {
            let amount = f.money.str().and_then(money_to_fen)?;
            let currency = f.currency.str()?;
            Some(EventBody::Pay { amount, currency: labels.get(currency) })
        }
    }
}

/// A v1 `money` decimal string in yuan (`[0-9]+(\.[0-9]{1,2})?`) as fen,
/// exactly; `None` when it is not such a string or does not fit in i64.
pub fn money_to_fen(money: &str) -> Option<i64> {
    let (yuan, fen) = match money.split_once('.') {
        Some((y, f)) if (1..=2).contains(&f.len()) => (y, f),
        Some(_) => return None,
        None => (money, ""),
    };
    if yuan.is_empty() || !yuan.bytes().all(|b| b.is_ascii_digit()) || !fen.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let yuan = yuan.trim_start_matches('0');
    if yuan.len() > 20 {
        return None; // far beyond i64 fen
    }
    let y: i128 = if yuan.is_empty() { 0 } else { yuan.parse().ok()? };
    let f: i128 = match fen.len() {
        0 => 0,
        1 => fen.parse::<i128>().ok()? * 10,
        _ => fen.parse().ok()?,
    };
    i64::try_from(y * 100 + f).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reject(v: &str) -> Option<RejectReason> {
        parse_upload(v.as_bytes()).err()
    }

    fn events(v: &str) -> Vec<Result<EventBody, RejectReason>> {
        parse_upload(v.as_bytes()).map(|u| u.events.into_iter().map(|e| e.body).collect()).unwrap_or_default()
    }

    const V2: &str = r#"{"sdk":"json/2.4.0","mid":"m1","app":"app-0007","dev":"d-1","os":"iOS","ch":"AppStore","ip":"36.110.4.7","sent":1732000000123,"events":[{"t":"launch","ts":1732000000000,"sid":"s"}]}"#;

    #[test]
    fn rule1_malformed() {
        for v in ["", "   ", "null", "[]", "\"ok\"", "123", "ping", "{", "{\"a\":1} x", &format!("[{V2}]")] {
            assert_eq!(reject(v), Some(RejectReason::Malformed), "{v:?}");
        }
        assert_eq!(parse_upload(b"{\"mid\":\"\xff\"}").err(), Some(RejectReason::Malformed));
        assert_eq!(reject(&V2[..V2.len() - 1]), Some(RejectReason::Malformed), "truncated");
    }

    #[test]
    fn rule2_missing_field_v2() {
        assert_eq!(reject("{}"), Some(RejectReason::MissingField));
        for (from, to) in [
            (r#""mid":"m1","#, ""),
            (r#""mid":"m1""#, r#""mid":12"#),
            (r#""dev":"d-1""#, r#""dev":"""#),
            (r#""app":"app-0007""#, r#""app":null"#),
            (r#""sent":1732000000123"#, r#""sent":"1732000000123""#),
            (r#""sent":1732000000123"#, r#""sent":1732000000123.5"#),
            (r#""events":[{"t":"launch","ts":1732000000000,"sid":"s"}]"#, r#""events":[]"#),
            (r#""events":[{"t":"launch","ts":1732000000000,"sid":"s"}]"#, r#""events":{}"#),
            (r#""events":[{"t":"launch","ts":1732000000000,"sid":"s"}]"#, r#""events":"launch""#),
        ] {
            let v = V2.replace(from, to);
            assert_ne!(v, V2);
            assert_eq!(reject(&v), Some(RejectReason::MissingField), "{v}");
        }
    }

    #[test]
    fn v2_maps_fields_and_last_duplicate_key_wins() {
        let u = parse_upload(V2.replace(r#""os":"iOS""#, r#""os":"x","os":"iOS""#).as_bytes());
        let u = u.expect("valid upload");
        assert_eq!((&*u.mid, &*u.app, &*u.dev, u.sent), ("m1", "app-0007", "d-1", 1_732_000_000_123));
        assert_eq!(u.os.as_deref(), Some("iOS"));
        assert_eq!(u.events, [RawEvent { ts: 1_732_000_000_000, body: Ok(EventBody::Launch) }]);
        let u = parse_upload(V2.replace(r#""os":"iOS""#, r#""os":7"#).as_bytes()).expect("valid");
        assert_eq!(u.os, None);
    }

    #[test]
    fn rules_5_to_7_per_event() {
        let up = |evs: &str| V2.replace(r#"[{"t":"launch","ts":1732000000000,"sid":"s"}]"#, evs);
        let sent = 1_732_000_000_123_i64;
        let got = events(&up(&format!(
            r#"[7,{{"ts":1}},{{"t":"Launch","ts":{sent}}},{{"t":"launch"}},{{"t":"launch","ts":"{sent}"}},
               {{"t":"launch","ts":{late}}},{{"t":"launch","ts":{edge}}},{{"t":"launch","ts":{old}}},{{"t":"launch","ts":{oldest}}},
               {{"t":"page","ts":{sent},"dur":-1}},{{"t":"page","ts":{sent},"dur":1.5}},{{"t":"terminate","ts":{sent},"dur":0}},
               {{"t":"pay","ts":{sent},"amount":600}},{{"t":"pay","ts":{sent},"amount":600,"cur":"CNY"}},{{"t":"pay","ts":{sent},"amount":0,"cur":1}},
               {{"t":"custom","ts":{sent},"id":null}},{{"t":"custom","ts":{sent},"id":""}}]"#,
            late = sent + 600_001,
            edge = sent + 600_000,
            old = sent - 604_800_000,
            oldest = sent - 604_800_001,
        )));
        use RejectReason::*;
        assert_eq!(
            got,
            [
                Err(UnknownEvent),
                Err(UnknownEvent),
                Err(UnknownEvent),
                Err(BadTimestamp),
                Err(BadTimestamp),
                Err(BadTimestamp),
                Ok(EventBody::Launch),
                Ok(EventBody::Launch),
                Err(BadTimestamp),
                Err(BadValue),
                Err(BadValue),
                Ok(EventBody::Terminate { dur: 0 }),
                Err(BadValue),
                Ok(EventBody::Pay { amount: 600, currency: "CNY".into() }),
                Err(BadValue),
                Err(BadValue),
                Ok(EventBody::Custom { id: "".into() }),
            ]
        );
    }

    const V1: &str = r#"{"ver":"1.9.3","msgid":"0a1b","appkey":"app-0007","deviceid":"d-1","platform":"Android","channel":"huawei","appversion":"3.3.9","clientip":"36.110.4.7","type":"exit","time":1732000004,"session":"s-01","duration":512}"#;

    #[test]
    fn v1_maps_to_the_unified_model() {
        let u = parse_upload(V1.as_bytes()).expect("valid v1");
        assert_eq!((&*u.mid, &*u.app, &*u.dev, u.sent), ("0a1b", "app-0007", "d-1", 1_732_000_004_000));
        assert_eq!((u.os.as_deref(), u.channel.as_deref()), (Some("Android"), Some("huawei")));
        assert_eq!(u.events, [RawEvent { ts: 1_732_000_004_000, body: Ok(EventBody::Terminate { dur: 512 }) }]);
        let pay = V1.replace(r#""type":"exit""#, r#""type":"payment","money":"6.5","currency":"CNY""#);
        assert_eq!(events(&pay), [Ok(EventBody::Pay { amount: 650, currency: "CNY".into() })]);
        let custom = V1.replace(r#""type":"exit""#, r#""type":"event","eventid":"share""#);
        assert_eq!(events(&custom), [Ok(EventBody::Custom { id: "share".into() })]);
        assert_eq!(events(&V1.replace("exit", "Exit")), [Err(RejectReason::UnknownEvent)]);
        assert_eq!(events(&V1.replace("512", "\"512\"")), [Err(RejectReason::BadValue)]);
        // A `ver` key makes it v1 wherever it stands; v2 fields are then ignored.
        let late_ver = V1.replace(r#""ver":"1.9.3","#, "").replace('}', r#","events":5,"ver":1}"#);
        assert!(parse_upload(late_ver.as_bytes()).is_ok());
    }

    #[test]
    fn v1_rule2_and_overflowing_time() {
        for (from, to) in [
            (r#""time":1732000004"#, r#""time":"1732000004""#),
            (r#""type":"exit""#, r#""type":3"#),
            (r#""msgid":"0a1b""#, r#""msgid":5"#),
        ] {
            assert_eq!(reject(&V1.replace(from, to)), Some(RejectReason::MissingField));
        }
        let huge = V1.replace("1732000004", "9223372036854776"); // * 1000 > i64::MAX
        assert_eq!(events(&huge), [Err(RejectReason::BadTimestamp)]);
    }

    #[test]
    fn money_strings_are_exact() {
        for (s, fen) in [
            ("6", Some(600)),
            ("6.5", Some(650)),
            ("6.05", Some(605)),
            ("0.01", Some(1)),
            ("007.50", Some(750)),
            ("92233720368547758.07", Some(i64::MAX)),
        ] {
            assert_eq!(money_to_fen(s), fen, "{s}");
        }
        for s in ["", "6.", ".5", "6.123", "-6.00", "6,00", "six", "6元", "92233720368547758.08", "1e3", " 6"] {
            assert_eq!(money_to_fen(s), None, "{s}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 1024, ..Default::default() })]

        /// A Kafka record is whatever a client sent: any bytes are an
        /// upload or a counted reject, never a panic.
        #[test]
        fn any_record_bytes_parse_or_reject(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let _ = parse_upload(&bytes);
        }

        /// Random bytes are rejected at the first one; real uploads with a
        /// few bytes changed reach every field and every event rule.
        #[test]
        fn damaged_uploads_parse_or_reject(
            edits in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::num::u8::ANY), 1..8),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            for valid in [V1, V2] {
                let mut bytes = valid.as_bytes().to_vec();
                for (at, byte) in &edits {
                    let at = at.index(bytes.len());
                    bytes[at] = *byte;
                }
                bytes.truncate(cut.index(bytes.len() + 1));
                let _ = parse_upload(&bytes);
            }
        }
    }
}
