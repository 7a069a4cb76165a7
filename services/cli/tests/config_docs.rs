//! Keeps `docs/configuration.md` in step with `sluice_cli::settings::Settings`.
//!
//! The page is written by hand (so it can say *why* and *when*), but every
//! fact it shares with the code is checked here:
//!
//! - every leaf key of the settings has a table row `` | `section.key` | `default` | ``
//!   whose default is the value `Settings::default()` serialises to, written as
//!   TOML (numbers as digits, strings quoted, booleans bare);
//! - no table row documents a key the settings do not have;
//! - the example file (the first ```` ```toml ```` block) sets every key to its
//!   default, and loads through the real loader into exactly `Settings::default()`;
//! - the environment-variable examples the page gives really override.
//!
//! When one of these fails, the code changed: update docs/configuration.md.

use std::collections::BTreeMap;

use sluice_cli::settings::Settings;

const DOC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");

fn doc() -> String {
    std::fs::read_to_string(DOC_PATH)
        .unwrap_or_else(|e| panic!("reading {DOC_PATH}: {e}; create docs/configuration.md"))
}

/// A JSON leaf as it is written in TOML (and in the page).
fn render(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => format!("{s:?}"),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        other => panic!("a setting serialises to {other}, which this test cannot render as TOML; extend render()"),
    }
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        leaf => {
            out.insert(prefix.to_owned(), render(leaf));
        }
    }
}

/// Every leaf key of the default settings, dotted, with its default as TOML.
fn defaults() -> BTreeMap<String, String> {
    let value = serde_json::to_value(Settings::default()).expect("Settings serialise to JSON");
    let mut out = BTreeMap::new();
    flatten("", &value, &mut out);
    assert!(!out.is_empty(), "Settings::default() has no keys?");
    out
}

/// The key table rows of the page: `` | `key` | `default` | ... `` → (key, default).
fn documented_rows(doc: &str) -> BTreeMap<String, String> {
    let mut rows = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.trim().split('|').map(str::trim).collect();
        // "| a | b | c |" splits into ["", a, b, c, ""].
        if cells.len() < 4 || !cells[0].is_empty() {
            continue;
        }
        let (Some(key), Some(default)) = (unticked(cells[1]), unticked(cells[2])) else {
            continue;
        };
        if key.contains('.') && !key.contains(' ') {
            rows.insert(key.to_owned(), default.to_owned());
        }
    }
    rows
}

fn unticked(cell: &str) -> Option<&str> {
    cell.strip_prefix('`')?.strip_suffix('`')
}

/// The first ```toml fenced block of the page.
fn example_toml(doc: &str) -> String {
    let start = doc.find("```toml\n").expect("docs/configuration.md has no ```toml example block");
    let body = &doc[start + "```toml\n".len()..];
    let end = body.find("\n```").expect("the ```toml block of docs/configuration.md is not closed");
    body[..end + 1].to_owned()
}

#[test]
fn every_setting_is_documented_with_its_default() {
    let doc = doc();
    let rows = documented_rows(&doc);
    let mut problems = Vec::new();
    for (key, default) in defaults() {
        match rows.get(&key) {
            None => problems.push(format!("`{key}` has no row `| `{key}` | `{default}` | ... |`")),
            Some(d) if *d != default => {
                problems.push(format!("`{key}`: the page says default `{d}`, the code's default is `{default}`"))
            }
            Some(_) => {}
        }
    }
    let known = defaults();
    for key in rows.keys().filter(|k| !known.contains_key(*k)) {
        problems.push(format!("`{key}` is documented but is not a setting (renamed or removed?)"));
    }
    assert!(problems.is_empty(), "update docs/configuration.md:\n  {}", problems.join("\n  "));
}

#[test]
fn example_file_lists_every_default_and_loads_as_the_defaults() -> Result<(), Box<dyn std::error::Error>> {
    let doc = doc();
    let example = example_toml(&doc);

    // Every key, with its default written exactly as in the table, and nothing else.
    let mut section = String::new();
    let mut listed = BTreeMap::new();
    for line in example.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_owned();
        } else if let Some((k, v)) = line.split_once('=') {
            let v = v.split(" #").next().unwrap_or(v).trim();
            listed.insert(format!("{section}.{}", k.trim()), v.to_owned());
        }
    }
    let want = defaults();
    let mut problems = Vec::new();
    for (key, default) in &want {
        match listed.get(key) {
            None => problems.push(format!("the example has no `{key} = {default}`")),
            Some(v) if v != default => {
                problems.push(format!("the example sets `{key} = {v}`, the default is {default}"))
            }
            Some(_) => {}
        }
    }
    for key in listed.keys().filter(|k| !want.contains_key(*k)) {
        problems.push(format!("the example sets `{key}`, which is not a setting"));
    }
    assert!(problems.is_empty(), "update docs/configuration.md:\n  {}", problems.join("\n  "));

    // And the real loader reads it back into exactly the defaults.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, &example)?;
    let loaded: Settings = sluice_runtime::settings::load_from(Some(&path), [])
        .map_err(|e| format!("the example in docs/configuration.md does not load: {e:#}"))?;
    assert_eq!(loaded, Settings::default(), "the example in docs/configuration.md is not the defaults; update it");
    Ok(())
}

#[test]
fn documented_environment_overrides_work() -> Result<(), Box<dyn std::error::Error>> {
    // The examples the page gives, verbatim.
    let doc = doc();
    for example in ["SLUICE_PIPELINE__KEY_GROUPS=128", "SLUICE_RUN__COMMIT_INTERVAL=5s"] {
        assert!(
            doc.contains(example),
            "docs/configuration.md no longer shows `{example}`; update this test or the page"
        );
    }
    let env = [
        ("SLUICE_PIPELINE__KEY_GROUPS".to_string(), "128".to_string()),
        ("SLUICE_RUN__COMMIT_INTERVAL".to_string(), "5s".to_string()),
    ];
    let s: Settings = sluice_runtime::settings::load_from(None, env)?;
    assert_eq!(s.pipeline.key_groups, 128);
    assert_eq!(s.run.commit_interval, std::time::Duration::from_secs(5));
    assert_eq!(s.source, Settings::default().source, "other sections keep their defaults");
    Ok(())
}
