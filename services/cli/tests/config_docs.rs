//! Keeps `docs/configuration.md` in step with the settings of every binary:
//! `sluice_cli::settings::Settings` (the `sluice` command) and the settings of
//! the four services (`sluice-source`, `sluice-enrich`, `sluice-window`,
//! `sluice-sink`).
//!
//! The page is written by hand (so it can say *why* and *when*), but every
//! fact it shares with the code is checked here:
//!
//! - every leaf key of every binary's settings has a table row `` | `section.key` | `default` | ``
//!   whose default is the value the settings' `Default` serialises to, written
//!   as TOML (numbers as digits, strings quoted, booleans bare); a key several
//!   binaries share has one row, so their defaults must agree;
//! - no table row documents a key that no binary has;
//! - the table of sections marks, for every binary, exactly the sections its
//!   settings have;
//! - the example file of `sluice` (the ```` ```toml ```` block under
//!   `## A complete file`) sets every key of `Settings` to its default, and
//!   loads through the real loader into exactly `Settings::default()`;
//! - the services' example (the ```` ```toml ```` block under `## A complete
//!   file for the services`) sets every key of the four services to its
//!   default; each service's sections of it load into exactly that service's
//!   defaults, and the whole file is refused by each service (it has sections
//!   the service does not read);
//! - the environment-variable examples the page gives really override.
//!
//! When one of these fails, the code changed: update docs/configuration.md.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_cli::settings::Settings;
use sluice_enrich::service::EnrichServiceSettings;
use sluice_sink::service::SinkServiceSettings;
use sluice_source::service::SourceServiceSettings;
use sluice_window::service::WindowServiceSettings;

const DOC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");

/// The heading the example file of `sluice` sits under.
const CLI_EXAMPLE: &str = "## A complete file";
/// The heading the services' example file sits under.
const SERVICES_EXAMPLE: &str = "## A complete file for the services";

type Env = Vec<(String, String)>;

fn doc() -> String {
    std::fs::read_to_string(DOC_PATH)
        .unwrap_or_else(|e| panic!("reading {DOC_PATH}: {e}; create docs/configuration.md"))
}

fn env(vars: &[(&str, &str)]) -> Env {
    vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// One binary's settings, seen as JSON so that every settings type can be
/// compared (not all of them implement `PartialEq`).
struct Binary {
    /// The binary, as the page names it.
    name: &'static str,
    /// Its settings' `Default`, serialised.
    defaults: serde_json::Value,
    /// The real loader, into its settings type, serialised back.
    load: fn(Option<&Path>, Env) -> Result<serde_json::Value, String>,
}

fn load_as<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
    env: Env,
) -> Result<serde_json::Value, String> {
    let settings: T = sluice_runtime::settings::load_from(file, env).map_err(|e| format!("{e:#}"))?;
    serde_json::to_value(settings).map_err(|e| format!("serialising the loaded settings: {e}"))
}

fn binary<T: Serialize + DeserializeOwned + Default>(name: &'static str) -> Binary {
    let defaults = serde_json::to_value(T::default())
        .unwrap_or_else(|e| panic!("the settings of {name} do not serialise to JSON: {e}"));
    Binary { name, defaults, load: load_as::<T> }
}

impl Binary {
    /// Its top-level sections.
    fn sections(&self) -> BTreeSet<String> {
        match &self.defaults {
            serde_json::Value::Object(map) => map.keys().cloned().collect(),
            other => panic!("the settings of {} serialise to {other}, not to sections", self.name),
        }
    }

    /// Every leaf key, dotted, with its default as TOML.
    fn leaves(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        flatten("", &self.defaults, &mut out);
        assert!(!out.is_empty(), "the default settings of {} have no keys?", self.name);
        out
    }
}

/// `sluice` (run, demo, export).
fn cli() -> Binary {
    binary::<Settings>("sluice")
}

/// The four service binaries of distributed mode.
fn services() -> Vec<Binary> {
    vec![
        binary::<SourceServiceSettings>("sluice-source"),
        binary::<EnrichServiceSettings>("sluice-enrich"),
        binary::<WindowServiceSettings>("sluice-window"),
        binary::<SinkServiceSettings>("sluice-sink"),
    ]
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

/// Every leaf key of `binaries`, with its default; a key whose default
/// differs between binaries is reported in `problems` (one row cannot say both).
fn union_of(binaries: &[Binary], problems: &mut Vec<String>) -> BTreeMap<String, String> {
    let mut union: BTreeMap<String, (String, &'static str)> = BTreeMap::new();
    for b in binaries {
        for (key, default) in b.leaves() {
            match union.get(&key) {
                Some((d, first)) if *d != default => problems.push(format!(
                    "`{key}` defaults to `{d}` in {first} but to `{default}` in {}: one row cannot document both \
                     (make the defaults agree, or rename one of the keys)",
                    b.name
                )),
                Some(_) => {}
                None => {
                    union.insert(key, (default, b.name));
                }
            }
        }
    }
    union.into_iter().map(|(k, (d, _))| (k, d)).collect()
}

/// The cells of a table line `| a | b |` → `[a, b]`; `None` for other lines.
fn cells(line: &str) -> Option<Vec<&str>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(str::trim).collect())
}

fn unticked(cell: &str) -> Option<&str> {
    cell.strip_prefix('`')?.strip_suffix('`')
}

/// The key table rows of the page: `` | `key` | `default` | ... `` → (key, default).
fn documented_rows(doc: &str) -> BTreeMap<String, String> {
    let mut rows = BTreeMap::new();
    for cells in doc.lines().filter_map(cells) {
        if cells.len() < 3 {
            continue;
        }
        let (Some(key), Some(default)) = (unticked(cells[0]), unticked(cells[1])) else {
            continue;
        };
        if key.contains('.') && !key.contains(' ') {
            rows.insert(key.to_owned(), default.to_owned());
        }
    }
    rows
}

/// The table of sections, `` | section | `sluice` | `sluice-source` | ... | ``
/// with rows `` | `[name]` | ✓ | | ... | ``: binary → the sections it marks.
fn sections_table(doc: &str) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let mut lines = doc.lines().skip_while(|l| cells(l).is_none_or(|c| c.first() != Some(&"section")));
    let header = lines.next().and_then(cells).ok_or("there is no table of sections `| section | `sluice` | ... |`")?;
    let binaries = header[1..]
        .iter()
        .map(|c| unticked(c).ok_or(format!("the table of sections has a column `{c}`, not a `binary`")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut marks: BTreeMap<String, BTreeSet<String>> =
        binaries.iter().map(|b| ((*b).to_owned(), BTreeSet::new())).collect();
    for row in lines.skip(1).map_while(cells) {
        let section = unticked(row[0])
            .and_then(|s| s.strip_prefix('[')?.strip_suffix(']'))
            .ok_or(format!("the table of sections has a row `{}`, not a `[section]`", row[0]))?;
        for (binary, mark) in binaries.iter().zip(&row[1..]) {
            if !mark.is_empty() {
                marks.entry((*binary).to_owned()).or_default().insert(section.to_owned());
            }
        }
    }
    Ok(marks)
}

/// The first ```toml fenced block under the line `heading`, before the next `## ` heading.
fn example_under(doc: &str, heading: &str) -> String {
    let missing = || panic!("docs/configuration.md has no `{heading}` section with a ```toml example block");
    let Some(at) = doc.lines().position(|l| l.trim_end() == heading) else { missing() };
    let section: Vec<&str> = doc.lines().skip(at + 1).take_while(|l| !l.starts_with("## ")).collect();
    let section = section.join("\n") + "\n";
    let Some(start) = section.find("```toml\n") else { missing() };
    let body = &section[start + "```toml\n".len()..];
    let end = body.find("\n```").unwrap_or_else(|| panic!("the ```toml block under `{heading}` is not closed"));
    body[..end + 1].to_owned()
}

/// The section of a `[name]` line (comments after it allowed).
fn section_header(line: &str) -> Option<&str> {
    let line = line.split('#').next().unwrap_or(line).trim();
    Some(line.strip_prefix('[')?.strip_suffix(']')?.trim())
}

/// What an example file sets: `section.key` → the value as written.
fn listed(example: &str) -> BTreeMap<String, String> {
    let mut section = String::new();
    let mut listed = BTreeMap::new();
    for line in example.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = section_header(line) {
            name.clone_into(&mut section);
        } else if let Some((k, v)) = line.split_once('=') {
            let v = v.split(" #").next().unwrap_or(v).trim();
            listed.insert(format!("{section}.{}", k.trim()), v.to_owned());
        }
    }
    listed
}

/// Problems of an example that should set every key of `want` to its default, and nothing else.
fn check_listing(example: &str, what: &str, want: &BTreeMap<String, String>) -> Vec<String> {
    let listed = listed(example);
    let mut problems = Vec::new();
    for (key, default) in want {
        match listed.get(key) {
            None => problems.push(format!("{what} has no `{key} = {default}`")),
            Some(v) if v != default => problems.push(format!("{what} sets `{key} = {v}`, the default is {default}")),
            Some(_) => {}
        }
    }
    for key in listed.keys().filter(|k| !want.contains_key(*k)) {
        problems.push(format!("{what} sets `{key}`, which is not a setting"));
    }
    problems
}

/// The lines of `example` in the given sections (and any before the first section).
fn only_sections(example: &str, sections: &BTreeSet<String>) -> String {
    let mut keep = true;
    let mut out = String::new();
    for line in example.lines() {
        if let Some(name) = section_header(line.trim()) {
            keep = sections.contains(name);
        }
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn every_setting_is_documented_with_its_default() {
    let doc = doc();
    let rows = documented_rows(&doc);
    let mut binaries = vec![cli()];
    binaries.extend(services());
    let mut problems = Vec::new();
    let known = union_of(&binaries, &mut problems);
    for (key, default) in &known {
        match rows.get(key) {
            None => problems.push(format!("`{key}` has no row `| `{key}` | `{default}` | ... |`")),
            Some(d) if d != default => {
                problems.push(format!("`{key}`: the page says default `{d}`, the code's default is `{default}`"))
            }
            Some(_) => {}
        }
    }
    for key in rows.keys().filter(|k| !known.contains_key(*k)) {
        problems.push(format!(
            "`{key}` is documented but is not a setting of `sluice` or of any service (renamed or removed?)"
        ));
    }
    assert!(problems.is_empty(), "update docs/configuration.md:\n  {}", problems.join("\n  "));
}

#[test]
fn the_table_of_sections_matches_every_binary() {
    let doc = doc();
    let marked = sections_table(&doc).unwrap_or_else(|e| panic!("update docs/configuration.md: {e}"));
    let mut binaries = vec![cli()];
    binaries.extend(services());
    let mut problems = Vec::new();
    for b in &binaries {
        let Some(marks) = marked.get(b.name) else {
            problems.push(format!("the table of sections has no column `{}`", b.name));
            continue;
        };
        let has = b.sections();
        for s in has.difference(marks) {
            problems
                .push(format!("`{}` reads `[{s}]`, but its column in the table of sections has no ✓ there", b.name));
        }
        for s in marks.difference(&has) {
            problems.push(format!("the table of sections marks `[{s}]` for `{}`, which has no such section", b.name));
        }
    }
    for name in marked.keys().filter(|n| !binaries.iter().any(|b| b.name == n.as_str())) {
        problems.push(format!("the table of sections has a column `{name}`, which is not a binary this test knows"));
    }
    assert!(problems.is_empty(), "update docs/configuration.md:\n  {}", problems.join("\n  "));
}

#[test]
fn example_file_lists_every_default_and_loads_as_the_defaults() -> Result<(), Box<dyn std::error::Error>> {
    let doc = doc();
    let example = example_under(&doc, CLI_EXAMPLE);

    // Every key, with its default written exactly as in the table, and nothing else.
    let problems = check_listing(&example, "the example of `sluice`", &cli().leaves());
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
fn services_example_lists_every_default_and_each_service_loads_its_sections_as_its_defaults()
-> Result<(), Box<dyn std::error::Error>> {
    let doc = doc();
    let example = example_under(&doc, SERVICES_EXAMPLE);
    let services = services();

    let mut problems = Vec::new();
    let want = union_of(&services, &mut problems);
    problems.extend(check_listing(&example, "the services' example", &want));
    assert!(problems.is_empty(), "update docs/configuration.md:\n  {}", problems.join("\n  "));

    let dir = tempfile::tempdir()?;
    let whole = dir.path().join("services.toml");
    std::fs::write(&whole, &example)?;
    for service in &services {
        // Its own sections load into exactly its defaults ...
        let own = only_sections(&example, &service.sections());
        problems.extend(check_listing(
            &own,
            &format!("the services' example cut for {}", service.name),
            &service.leaves(),
        ));
        let path = dir.path().join(format!("{}.toml", service.name));
        std::fs::write(&path, &own)?;
        match (service.load)(Some(&path), Vec::new()) {
            Err(e) => problems
                .push(format!("the services' example, cut to the sections of {}, does not load: {e}", service.name)),
            Ok(loaded) if loaded != service.defaults => problems.push(format!(
                "the services' example, cut to the sections of {}, loads as {loaded}, not as its defaults {}",
                service.name, service.defaults
            )),
            Ok(_) => {}
        }
        // ... and the whole file, with sections it does not read, is refused, as the page says.
        if (service.load)(Some(&whole), Vec::new()).is_ok() {
            problems.push(format!(
                "{} accepts the whole services' example, though the page says a binary refuses sections it does not read",
                service.name
            ));
        }
    }
    assert!(problems.is_empty(), "update docs/configuration.md:\n  {}", problems.join("\n  "));
    Ok(())
}

#[test]
fn documented_environment_overrides_work() -> Result<(), Box<dyn std::error::Error>> {
    // The examples the page gives, verbatim.
    let doc = doc();
    for example in [
        "SLUICE_PIPELINE__KEY_GROUPS=128",
        "SLUICE_STATE__COMMIT_INTERVAL=5s",
        "SLUICE_SERVICE__INSTANCE=1 SLUICE_SERVICE__INSTANCES=2 SLUICE_NATS__URL=nats://nats:4222 sluice-window",
        "SLUICE_KAFKA__BROKERS=kafka:9092",
    ] {
        assert!(
            doc.contains(example),
            "docs/configuration.md no longer shows `{example}`; update this test or the page"
        );
    }

    // sluice
    let vars = env(&[("SLUICE_PIPELINE__KEY_GROUPS", "128"), ("SLUICE_STATE__COMMIT_INTERVAL", "5s")]);
    let s: Settings = sluice_runtime::settings::load_from(None, vars)?;
    assert_eq!(s.pipeline.key_groups, 128);
    assert_eq!(s.state.commit_interval, std::time::Duration::from_secs(5));
    assert_eq!(s.source, Settings::default().source, "other sections keep their defaults");

    // sluice-window: its place among the instances, and the server.
    let vars = env(&[
        ("SLUICE_SERVICE__INSTANCE", "1"),
        ("SLUICE_SERVICE__INSTANCES", "2"),
        ("SLUICE_NATS__URL", "nats://nats:4222"),
    ]);
    let w: WindowServiceSettings = sluice_runtime::settings::load_from(None, vars)
        .map_err(|e| format!("the window example of docs/configuration.md does not load: {e:#}"))?;
    assert_eq!((w.service.instance, w.service.instances), (1, 2));
    assert_eq!(w.nats.url, "nats://nats:4222");
    let defaults = WindowServiceSettings::default();
    assert_eq!(w.state.commit_interval, defaults.state.commit_interval, "other keys keep their defaults");
    assert_eq!(w.nats.prefix, defaults.nats.prefix, "other keys keep their defaults");

    // SLUICE_KAFKA__BROKERS: taken by sluice-source, refused by sluice-enrich, as the page says.
    let vars = env(&[("SLUICE_KAFKA__BROKERS", "kafka:9092")]);
    let s: SourceServiceSettings = sluice_runtime::settings::load_from(None, vars.clone())?;
    assert_eq!(s.kafka.brokers, "kafka:9092");
    let refused = sluice_runtime::settings::load_from::<EnrichServiceSettings>(None, vars);
    let err = refused.err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(
        err.contains("kafka"),
        "sluice-enrich should refuse SLUICE_KAFKA__BROKERS naming `kafka` (docs/configuration.md says so), got {err:?}"
    );
    Ok(())
}
