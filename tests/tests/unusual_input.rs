//! Inputs no SDK sends but a Kafka topic can hold, compared with oracle.py on
//! the same file: strings that need escaping on output (DEL, controls,
//! non-ASCII, astral), repeated keys, the limits of the oracle's JSON parser,
//! and one very large upload with many distinct ids and currencies.

use std::path::Path;

use sluice_tests::{
    DataSet, assert_tables_equal, copy_dimensions, oracle, run_and_export, scratch, settings, write_records,
};

fn v2(mid: &str, dev: &str, extra: &str, events: &str) -> String {
    format!(r#"{dev}	{{"mid":"{mid}","app":"app-0001","dev":"{dev}","sent":1732000600000{extra},"events":[{events}]}}"#)
}

fn check(records: &[String], dims_from: &Path) -> anyhow::Result<()> {
    let work = scratch()?;
    let data = work.path().join("data");
    copy_dimensions(dims_from, &data)?;
    write_records(&data.join("sdk-events.tsv"), records, false)?;
    let expected = oracle(&data)?;
    run_and_export(&settings(), &data, &work.path().join("state"), &work.path().join("got"))?;
    assert_tables_equal(&expected, &work.path().join("got"))
}

#[test]
fn strings_that_need_escaping_equal_oracle() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let launch = r#"{"t":"launch","ts":1732000000000}"#;
    let custom = |id: &str| format!(r#"{{"t":"custom","ts":1732000000001,"id":"{id}"}}"#);
    let records = vec![
        v2("m1", "d1", r#","os":"ios\u007f""#, launch),
        v2("m2", "d2", r#","os":"Андроид","ch":"\u001f HUAWEI \u3000""#, launch),
        v2("m3", "d3", r#","os":"x\ud83d\ude00""#, &custom(r#"lvl\u007f"#)),
        v2("m4", "d4", r#","os":"a\"b\\c\/d\tx""#, &custom("单抽\\n")),
        v2("m5", "d5", r#","os":"İSTANBUL","os":"ΣΑΣ""#, &custom("")),
        v2("m6", "d6", r#","ip":"036.110.004.007","ch":null"#, launch),
    ];
    check(&records, &set.data())
}

#[test]
fn the_oracles_json_limits_equal_oracle() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let launch = r#"{"t":"launch","ts":1732000000000}"#;
    let nested = |n: usize| format!(r#","x":{}{}"#, "[".repeat(n), "]".repeat(n));
    let digits = |n: usize| format!(r#","x":{}"#, "7".repeat(n));
    let records = vec![
        v2("m1", "d1", &nested(991), launch),
        v2("m2", "d2", &nested(992), launch),
        v2("m3", "d3", &nested(993), launch),
        v2("m4", "d4", &digits(4300), launch),
        v2("m5", "d5", &digits(4301), launch),
        v2("m6", "d6", &format!(r#","x":-{}"#, "7".repeat(4300)), launch),
        v2("m7", "d7", r#","x":1e999,"y":-0,"z":5.0"#, launch),
    ];
    check(&records, &set.data())
}

#[test]
fn one_upload_with_many_ids_and_currencies_equals_oracle() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let mut events: Vec<String> = (0..30_000)
        .map(|i| format!(r#"{{"t":"custom","ts":{},"id":"id-{}"}}"#, 1_732_000_000_000_i64 + i, i % 20_000))
        .collect();
    events
        .extend((0..3_000).map(|i| format!(r#"{{"t":"pay","ts":1732000000000,"amount":{i},"cur":"C{}"}}"#, i % 1_000)));
    let records = vec![v2("m1", "d1", "", &events.join(",")), v2("m2", "d1", "", &events[..500].join(","))];
    check(&records, &set.data())
}
