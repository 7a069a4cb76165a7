//! The `sluice` binary itself: arguments, exit codes, files written. The
//! tables' correctness against oracle.py is tested in `tests/` at the root;
//! here the data set is the Rust-generated demo sample.

use std::path::Path;
use std::process::{Command, Output};

fn sluice(args: &[&str], env: &[(&str, &str)]) -> std::io::Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

#[test]
fn run_export_and_rerun_over_a_sample() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (data, state) = (dir.path().join("data"), dir.path().join("state"));
    std::fs::create_dir_all(&data)?;
    sluice_cli::sample::write_sample(&data, 3, 3_000)?;

    let first = sluice(&["run", "--data", path(&data), "--state", path(&state)], &[])?;
    assert!(first.status.success(), "{}", text(&first));
    assert!(text(&first).contains("done: 3000 records"), "{}", text(&first));

    let again = sluice(&["run", "--data", path(&data), "--state", path(&state)], &[])?;
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("done: 0 records"), "a second run changes nothing: {}", text(&again));

    let (out1, out2) = (dir.path().join("out1"), dir.path().join("out2"));
    let export = sluice(&["export", "--state", path(&state), "--out", path(&out1)], &[])?;
    assert!(export.status.success(), "{}", text(&export));
    for table in ["daily", "sessions_per_device", "custom_events", "minute", "rejects"] {
        let rows = std::fs::read_to_string(out1.join(format!("{table}.jsonl")))?;
        assert!(rows.lines().count() > 0, "{table} has rows");
        assert!(rows.lines().all(|l| l.starts_with('{') && l.ends_with('}')), "{table}: one object a line");
    }

    // The same input in another state, with another P and tiny chunks: same tables.
    let env = [("SLUICE_PIPELINE__KEY_GROUPS", "3"), ("SLUICE_SOURCE__CHUNK_BYTES", "4096")];
    let other = sluice(&["run", "--data", path(&data), "--state", path(&dir.path().join("s2"))], &env)?;
    assert!(other.status.success(), "{}", text(&other));
    let export = sluice(&["export", "--state", path(&dir.path().join("s2")), "--out", path(&out2)], &[])?;
    assert!(export.status.success(), "{}", text(&export));
    for table in ["daily", "sessions_per_device", "custom_events", "minute", "rejects"] {
        let name = format!("{table}.jsonl");
        assert_eq!(std::fs::read(out1.join(&name))?, std::fs::read(out2.join(&name))?, "{table}");
    }
    Ok(())
}

#[test]
fn refuses_bad_configuration_and_another_inputs_state() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (a, b, state) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("state"));
    std::fs::create_dir_all(&a)?;
    std::fs::create_dir_all(&b)?;
    sluice_cli::sample::write_sample(&a, 1, 500)?;
    sluice_cli::sample::write_sample(&b, 2, 500)?;

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[pipeline]\nkey_grups = 8\n")?;
    let o = sluice(&["--config", path(&typo), "run", "--data", path(&a), "--state", path(&state)], &[])?;
    assert!(!o.status.success() && text(&o).contains("key_grups"), "{}", text(&o));

    let o = sluice(&["run", "--data", path(&a), "--state", path(&state)], &[("SLUICE_PIPELINE__KEY_GROUPS", "0")])?;
    assert!(!o.status.success() && text(&o).contains("pipeline.key_groups"), "{}", text(&o));

    let o = sluice(&["run", "--data", path(&a), "--state", path(&state)], &[])?;
    assert!(o.status.success(), "{}", text(&o));
    let o = sluice(&["run", "--data", path(&b), "--state", path(&state)], &[])?;
    assert!(!o.status.success() && text(&o).contains("different input"), "{}", text(&o));

    let o = sluice(&["run", "--data", path(&dir.path().join("missing")), "--state", path(&state)], &[])?;
    assert!(!o.status.success() && text(&o).contains("sdk-events.tsv"), "{}", text(&o));
    Ok(())
}

#[test]
fn demo_prints_the_summary() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let o = sluice(&["demo", "--messages", "4000", "--keep", path(dir.path())], &[])?;
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    for part in ["Top apps by daily active devices", "New devices per day", "█", "Rejects by reason"] {
        assert!(out.contains(part), "missing {part:?} in:\n{out}");
    }
    assert!(dir.path().join("tables/daily.jsonl").is_file());
    Ok(())
}
