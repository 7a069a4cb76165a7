//! The dimension tables: app catalogue, IP→country ranges, channel groups.
//!
//! Loaded from `apps.csv`, `geo.csv` and `channels.csv` (SPEC §1; every file
//! starts with its header line and no field holds a comma or a quote). The
//! lookups reproduce the SPEC to the character: the OS is lower-cased as
//! Python's `str.lower` does, the raw channel is trimmed as `str.strip` does
//! (which also strips U+001C..U+001F) and lower-cased, and only a dotted IPv4
//! of four 1-3 digit parts up to 255 has a country. Country lookup is a binary
//! search over the sorted, non-overlapping ranges.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use rustc_hash::FxBuildHasher;

use sluice_model::batch::Dimensions as EventDimensions;

/// A dimension table that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DimensionError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file's content is not what the SPEC describes.
    #[error("{file} line {line}: {problem}")]
    Content {
        /// The file name.
        file: &'static str,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
}

/// Rows of a small CSV file as maps from header name to field.
fn csv_rows<'a>(
    file: &'static str,
    text: &'a str,
    columns: &[&str],
) -> Result<Vec<(usize, Vec<&'a str>)>, DimensionError> {
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).enumerate();
    let header: Vec<&str> = lines.next().map(|(_, h)| h.split(',').collect()).unwrap_or_default();
    let index: Vec<usize> = columns
        .iter()
        .map(|c| {
            header.iter().position(|h| h == c).ok_or_else(|| DimensionError::Content {
                file,
                line: 1,
                problem: format!("no column `{c}` in header {header:?}"),
            })
        })
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    for (i, line) in lines {
        if line.is_empty() {
            continue; // csv readers skip blank lines
        }
        let fields: Vec<&str> = line.split(',').collect();
        let row = index.iter().map(|&j| fields.get(j).copied()).collect::<Option<Vec<&str>>>().ok_or_else(|| {
            DimensionError::Content {
                file,
                line: i + 1,
                problem: format!("expected {} fields, found {}", header.len(), fields.len()),
            }
        })?;
        rows.push((i + 1, row));
    }
    Ok(rows)
}

fn read(dir: &Path, name: &str) -> Result<String, DimensionError> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).map_err(|source| DimensionError::Read { path: path.display().to_string(), source })
}

/// An app of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    /// Display name.
    pub name: String,
    /// `game` or `app`.
    pub kind: String,
}

/// A range of IPv4 addresses and its country.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeoRange {
    /// First address, inclusive.
    pub start: u32,
    /// Last address, inclusive.
    pub end: u32,
    /// Country code.
    pub country: Arc<str>,
    /// Region name.
    pub region: Arc<str>,
}

/// All three dimension tables, read-only once loaded (replaced whole on reload).
#[derive(Debug, Clone)]
pub struct DimensionTables {
    apps: HashMap<Arc<str>, App, FxBuildHasher>,
    geo: Vec<GeoRange>,
    channels: HashMap<String, Arc<str>>,
    unknown_os: Arc<str>,
    other_channel: Arc<str>,
    no_country: Arc<str>,
}

impl DimensionTables {
    /// Load `apps.csv`, `geo.csv` and `channels.csv` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, DimensionError> {
        Self::from_csv(&read(dir, "apps.csv")?, &read(dir, "geo.csv")?, &read(dir, "channels.csv")?)
    }

    /// Build from the three files' contents.
    pub fn from_csv(apps: &str, geo: &str, channels: &str) -> Result<Self, DimensionError> {
        let apps = csv_rows("apps.csv", apps, &["app_key", "name", "kind"])?
            .into_iter()
            .map(|(_, r)| (Arc::from(r[0]), App { name: r[1].to_owned(), kind: r[2].to_owned() }))
            .collect();
        let mut ranges = Vec::new();
        for (line, r) in csv_rows("geo.csv", geo, &["start_ip", "end_ip", "country", "region"])? {
            let ip = |s: &str| {
                ipv4_to_u32(s).ok_or_else(|| DimensionError::Content {
                    file: "geo.csv",
                    line,
                    problem: format!("`{s}` is not a dotted IPv4 address"),
                })
            };
            let (start, end) = (ip(r[0])?, ip(r[1])?);
            if start > end {
                return Err(DimensionError::Content {
                    file: "geo.csv",
                    line,
                    problem: "start_ip is after end_ip".into(),
                });
            }
            ranges.push(GeoRange { start, end, country: Arc::from(r[2]), region: Arc::from(r[3]) });
        }
        ranges.sort_by_key(|r| (r.start, r.end));
        if let Some(w) = ranges.windows(2).find(|w| w[1].start <= w[0].end) {
            return Err(DimensionError::Content {
                file: "geo.csv",
                line: 0,
                problem: format!("ranges overlap at {}", u32_to_ipv4(w[1].start)),
            });
        }
        let channels = csv_rows("channels.csv", channels, &["raw", "group"])?
            .into_iter()
            .map(|(_, r)| (normalise_channel(r[0]), Arc::from(r[1])))
            .collect();
        Ok(Self {
            apps,
            geo: ranges,
            channels,
            unknown_os: Arc::from("unknown"),
            other_channel: Arc::from("other"),
            no_country: Arc::from("ZZ"),
        })
    }

    /// The catalogue entry of `app_key` (rule 3: unknown apps are rejected).
    pub fn app(&self, app_key: &str) -> Option<&App> {
        self.apps.get(app_key)
    }

    /// How many apps, geo ranges and channel strings are loaded.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.apps.len(), self.geo.len(), self.channels.len())
    }

    /// The geo range holding `ip`, if `ip` is a dotted IPv4 in one.
    pub fn geo(&self, ip: &str) -> Option<&GeoRange> {
        let n = ipv4_to_u32(ip)?;
        let i = self.geo.partition_point(|r| r.start <= n).checked_sub(1)?;
        let range = &self.geo[i];
        (n <= range.end).then_some(range)
    }

    /// The country of a message's ip: `ZZ` when missing, not IPv4, or in no range.
    pub fn country(&self, ip: Option<&str>) -> Arc<str> {
        ip.and_then(|ip| self.geo(ip)).map_or_else(|| self.no_country.clone(), |r| r.country.clone())
    }

    /// The channel group of a raw channel string: `other` when missing or unlisted.
    pub fn channel_group(&self, raw: Option<&str>) -> Arc<str> {
        raw.and_then(|raw| self.channels.get(&normalise_channel(raw)))
            .map_or_else(|| self.other_channel.clone(), Clone::clone)
    }

    /// The OS dimension: lower-cased, or `unknown` when missing.
    pub fn os(&self, os: Option<&str>) -> Arc<str> {
        os.map_or_else(|| self.unknown_os.clone(), |s| Arc::from(s.to_lowercase()))
    }

    /// All three dimensions of a message (uncached; see [`DimensionCache`]).
    pub fn dimensions(&self, os: Option<&str>, channel: Option<&str>, ip: Option<&str>) -> EventDimensions {
        EventDimensions { os: self.os(os), channel: self.channel_group(channel), country: self.country(ip) }
    }
}

/// Python's `str.strip()` whitespace: Unicode White_Space plus U+001C..U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `raw.strip().lower()`, the SPEC's channel matching key.
pub fn normalise_channel(raw: &str) -> String {
    raw.trim_matches(is_python_space).to_lowercase()
}

/// A dotted IPv4 (four parts of 1-3 ASCII digits, each at most 255) as a number.
pub fn ipv4_to_u32(s: &str) -> Option<u32> {
    let mut n: u32 = 0;
    let mut parts = 0;
    for part in s.split('.') {
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let v: u32 = part.parse().ok()?;
        if v > 255 {
            return None;
        }
        n = (n << 8) | v;
        parts += 1;
    }
    (parts == 4).then_some(n)
}

fn u32_to_ipv4(n: u32) -> String {
    let [a, b, c, d] = n.to_be_bytes();
    format!("{a}.{b}.{c}.{d}")
}

/// A bounded memo of OS and channel normalisation: the same few raw strings
/// repeat across millions of messages, and each lookup would allocate.
#[derive(Default)]
pub struct DimensionCache {
    os: HashMap<Box<str>, Arc<str>, FxBuildHasher>,
    channel: HashMap<Box<str>, Arc<str>, FxBuildHasher>,
    seen_apps: HashSet<Arc<str>, FxBuildHasher>,
}

/// Entries per memo; beyond it lookups are computed, not cached.
const CACHE_LIMIT: usize = 4096;

impl DimensionCache {
    /// The dimensions of a message, using and filling the memo.
    pub fn dimensions(
        &mut self,
        tables: &DimensionTables,
        os: Option<&str>,
        channel: Option<&str>,
        ip: Option<&str>,
    ) -> EventDimensions {
        let os = match os {
            None => tables.unknown_os.clone(),
            Some(raw) => memo(&mut self.os, raw, || tables.os(Some(raw))),
        };
        let channel = match channel {
            None => tables.other_channel.clone(),
            Some(raw) => memo(&mut self.channel, raw, || tables.channel_group(Some(raw))),
        };
        EventDimensions { os, channel, country: tables.country(ip) }
    }

    /// A shared copy of an app key, so every record of an app points at one
    /// allocation (bounded like the other memos).
    pub fn app(&mut self, app: &Arc<str>) -> Arc<str> {
        if let Some(a) = self.seen_apps.get(app) {
            return a.clone();
        }
        if self.seen_apps.len() < CACHE_LIMIT {
            self.seen_apps.insert(app.clone());
        }
        app.clone()
    }
}

fn memo(
    map: &mut HashMap<Box<str>, Arc<str>, FxBuildHasher>,
    raw: &str,
    compute: impl FnOnce() -> Arc<str>,
) -> Arc<str> {
    if let Some(v) = map.get(raw) {
        return v.clone();
    }
    let v = compute();
    if map.len() < CACHE_LIMIT {
        map.insert(raw.into(), v.clone());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> DimensionTables {
        DimensionTables::from_csv(
            "app_key,name,kind\napp-0001,Star Legends,game\n",
            "start_ip,end_ip,country,region\n36.110.0.0,36.110.255.255,CN,Beijing\n1.0.0.0,1.0.0.255,US,Texas\n",
            "raw,group\nappstore,apple\napp store,apple\nhuawei,huawei\n",
        )
        .expect("valid tables")
    }

    #[test]
    fn looks_up_like_the_spec() {
        let t = tables();
        assert!(t.app("app-0001").is_some() && t.app("app-0002").is_none());
        assert_eq!(&*t.country(Some("36.110.4.7")), "CN");
        assert_eq!(&*t.country(Some("1.0.0.255")), "US");
        assert_eq!(&*t.country(Some("1.0.1.0")), "ZZ");
        assert_eq!(&*t.country(Some("036.110.004.007")), "CN", "leading zeros are digits");
        for bad in
            [None, Some("240e:1::1"), Some("36.110.4"), Some("36.110.4.256"), Some("36.110.4.7 "), Some("0.0.0.0")]
        {
            assert_eq!(&*t.country(bad), "ZZ", "{bad:?}");
        }
        assert_eq!(&*t.channel_group(Some(" App Store")), "apple");
        assert_eq!(&*t.channel_group(Some("APPSTORE ")), "apple");
        assert_eq!(&*t.channel_group(Some("\u{1f}HUAWEI\u{3000}")), "huawei");
        assert_eq!(&*t.channel_group(Some("TestFlight")), "other");
        assert_eq!(&*t.channel_group(None), "other");
        assert_eq!(&*t.os(Some("iPadOS")), "ipados");
        assert_eq!(&*t.os(None), "unknown");
    }

    #[test]
    fn cache_agrees_with_tables() {
        let t = tables();
        let mut c = DimensionCache::default();
        for _ in 0..2 {
            assert_eq!(
                c.dimensions(&t, Some("iOS"), Some(" appstore"), Some("36.110.0.1")),
                t.dimensions(Some("iOS"), Some(" appstore"), Some("36.110.0.1"))
            );
        }
    }

    #[test]
    fn refuses_broken_tables() {
        let err = DimensionTables::from_csv("app_key,name\n", "start_ip,end_ip,country,region\n", "raw,group\n")
            .expect_err("no kind column");
        assert!(err.to_string().contains("kind"), "{err}");
        let err = DimensionTables::from_csv(
            "app_key,name,kind\n",
            "start_ip,end_ip,country,region\n1.0.0.0,1.0.0.9,US,X\n1.0.0.5,1.0.0.20,CN,Y\n",
            "raw,group\n",
        )
        .expect_err("overlap");
        assert!(err.to_string().contains("overlap"), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 512, ..Default::default() })]

        /// Dimension CSVs come from files and from `LoadDimensions` calls:
        /// any text is a set of tables or a clear error, and the tables it
        /// gives answer any lookup.
        #[test]
        fn any_dimension_csv_loads_or_fails_cleanly(
            apps in "(app_key,name,kind\n)?[a-z0-9,\n\\\" -]{0,80}",
            geo in "(start_ip,end_ip,country,region\n)?[0-9.,A-Z\n\" -]{0,120}",
            channels in "(raw,group\n)?[a-zA-Z ,\n\"]{0,60}",
            ip in "[0-9.]{0,20}",
            raw in "[a-zA-Z ]{0,12}",
        ) {
            if let Ok(tables) = DimensionTables::from_csv(&apps, &geo, &channels) {
                let _ = tables.dimensions(Some(&raw), Some(&raw), Some(&ip));
                let _ = tables.app(&raw);
            }
        }
    }
}
