//! Broken and extreme records: each is rejected (or, for a huge valid upload,
//! processed) exactly as the oracle does, and nothing panics or stalls.

use anyhow::Context;
use sluice_tests::{
    DataSet, INPUT_FILE, assert_tables_equal, copy_dimensions, oracle, read_records, reject_counts, run_and_export,
    scratch, settings, sum_field, write_records,
};

const MB10: usize = 10_000_000;

/// The first app key of `apps.csv` (one that exists, so an upload for it is accepted).
fn first_app(data: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(data.join("apps.csv")).context("reading apps.csv")?;
    let line = text.lines().nth(1).context("apps.csv has no app")?;
    Ok(line.split(',').next().unwrap_or_default().to_owned())
}

/// Event `i` of a v2 upload sent at `sent`: every event type in turn, all valid.
fn event(i: usize, sent: i64) -> String {
    let ts = sent - 1000 * (5001 - i as i64);
    let sid = format!("s-big-{}", i / 5);
    match i % 5 {
        0 => format!(r#"{{"t":"launch","ts":{ts},"sid":"{sid}"}}"#),
        1 => format!(r#"{{"t":"page","ts":{ts},"sid":"{sid}","page":"level_{}","dur":{}}}"#, i % 40, i % 97),
        2 => format!(
            r#"{{"t":"custom","ts":{ts},"sid":"{sid}","id":"big_upload","label":"w{}","params":{{"n":{i}}}}}"#,
            i % 3
        ),
        3 => format!(
            r#"{{"t":"pay","ts":{ts},"sid":"{sid}","amount":{},"cur":"{}","order":"o-big-{i}"}}"#,
            i,
            if i.is_multiple_of(2) { "CNY" } else { "USD" }
        ),
        _ => format!(r#"{{"t":"terminate","ts":{ts},"sid":"{sid}","dur":{}}}"#, (i * 7) % 4000),
    }
}

/// A v2 upload of `events` (already JSON) with its envelope.
fn upload(app: &str, dev: &str, mid: &str, sent: i64, events: &str) -> String {
    format!(
        r#"{{"sdk":"json/2.4.0","mid":"{mid}","app":"{app}","dev":"{dev}","os":"ios","appv":"3.4.0","ch":"AppStore","ip":"36.110.4.7","sent":{sent},"events":[{events}]}}"#
    )
}

#[test]
fn broken_lines_are_rejected_like_the_oracle_and_a_huge_upload_is_processed() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let work = scratch()?;
    let data = work.path().join("data");
    copy_dimensions(&set.data(), &data)?;
    let app = first_app(&set.data())?;
    let sent: i64 = 1_732_000_000_000;

    // A valid v2 upload of 5,000 events (SPEC §1: a valid upload of any size is processed).
    let big_events: Vec<String> = (0..5000).map(|i| event(i, sent)).collect();
    let big =
        format!("d-big-0001\t{}", upload(&app, "d-big-0001", "big-upload-5000-events", sent, &big_events.join(",")));

    // A valid-looking v2 upload cut off at 10 MB (never closed: not JSON).
    let mut truncated = format!("d-big-0002\t{}", upload(&app, "d-big-0002", "truncated-10mb", sent, ""));
    truncated.truncate(truncated.len() - 2); // drop the closing `]}`
    let mut i = 0;
    while truncated.len() < MB10 + 11 {
        truncated.push_str(&event(i % 5000, sent));
        truncated.push(',');
        i += 1;
    }
    truncated.truncate("d-big-0002\t".len() + MB10);

    // (record, reason the oracle gives it; None: accepted)
    let added: Vec<(Vec<u8>, Option<&str>)> = vec![
        (b"a line with no tab at all {\"mid\":\"m\"}".to_vec(), Some("malformed")),
        (b"dev\t{\"mid\":\"\xff\"}".to_vec(), Some("malformed")),
        (Vec::new(), Some("malformed")), // an empty line
        ([&b"d-x\t"[..], &vec![b'x'; MB10]].concat(), Some("malformed")),
        (big.into_bytes(), None),
        (b"\t".to_vec(), Some("malformed")),
        (truncated.into_bytes(), Some("malformed")),
        ([&b"d-deep-1\t"[..], &vec![b'['; 100_000]].concat(), Some("malformed")),
        ([&b"d-deep-2\t"[..], &b"{\"a\":".repeat(100_000)].concat(), Some("malformed")),
        ([&b"d-deep-3\t"[..], &b"[".repeat(100_000), &b"]".repeat(100_000)].concat(), Some("malformed")), // valid JSON, not an object
        (b"d-v1\t{\"ver\":1}".to_vec(), Some("missing_field")),
        (Vec::new(), Some("malformed")), // another empty line, last
    ];
    let mut records = read_records(&set.input())?;
    let original = records.len();
    records.extend(added.iter().map(|(r, _)| r.clone()));
    write_records(&data.join(INPUT_FILE), &records, false)?;

    let expected = oracle(&data)?;
    let out = work.path().join("out");
    let report = run_and_export(&settings(), &data, &work.path().join("state"), &out)?;
    assert_eq!(report.progress.records, (original + added.len()) as u64, "every line is one record");
    assert_tables_equal(&expected, &out)?;

    // Directly: the added lines moved exactly their reject counts, and the
    // 5,000 events of the huge upload were all accepted.
    let before = reject_counts(&set.expected())?;
    let after = reject_counts(&out)?;
    for reason in
        ["malformed", "missing_field", "unknown_app", "duplicate", "unknown_event", "bad_timestamp", "bad_value"]
    {
        let added_here = added.iter().filter(|(_, r)| *r == Some(reason)).count() as u64;
        let (b, a) = (before.get(reason).copied().unwrap_or(0), after.get(reason).copied().unwrap_or(0));
        assert_eq!(
            a,
            b + added_here,
            "rejects `{reason}`: {b} in the plain small set + {added_here} added lines, got {a}"
        );
    }
    let events_before = sum_field(&set.expected(), "daily", "events")?;
    let events_after = sum_field(&out, "daily", "events")?;
    assert_eq!(events_after, events_before + 5000, "the 5,000-event upload is processed in full");
    Ok(())
}
