//! A small, deterministic sample of the reference workload (SPEC.md section 1), written in pure Rust.
//!
//! `sluice demo` needs input data but must not depend on Python, so this module re-creates the shape of
//! `shared/workload/gen.py` in a much simpler form: devices with a fixed os and raw channel, sessions over
//! two local days (UTC+08:00), v2 JSON uploads of 1-20 events and v1 legacy uploads of one event, plus a
//! sprinkle of every fault the rules of SPEC section 2 reject. It is not byte-compatible with `gen.py`;
//! the tables the pipeline computes from it are still checked by the oracle like any other input.
//!
//! The output is a pure function of `(seed, messages)`: the PRNG is an in-module SplitMix64 and only
//! IEEE-exact float operations (multiply, divide, compare) are used, so the bytes are the same on every
//! platform and every run.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::Path;

/// What the sample holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleStats {
    /// Lines of `sdk-events.tsv` (always the `messages` asked for).
    pub records: u64,
    /// Devices that sent at least one upload (including those of apps missing in `apps.csv`).
    pub devices: u64,
    /// Apps in `apps.csv`.
    pub apps: u64,
    /// Local days (UTC+08:00) the sessions span.
    pub days: u64,
}

const SECOND: i64 = 1000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;
/// 2024-11-18T00:00 at UTC+08:00, the start of local day 0, in ms since the epoch.
const BASE_MS: i64 = 1_731_859_200_000;
const DAYS: i64 = 2;
const SPAN_END: i64 = BASE_MS + DAYS * DAY;

/// Fault and mix rates, close to gen.py's so a 20,000-record sample shows every reject reason.
const P_V1: f64 = 0.15;
const P_UNKNOWN_APP: f64 = 0.005;
const P_DUPLICATE_PER_100: u64 = 1;
const P_MALFORMED: f64 = 0.003;
const P_MISSING: f64 = 0.003;
const P_LATE: f64 = 0.04;
const P_EV_UNKNOWN: f64 = 0.003;
const P_EV_BAD_TS: f64 = 0.003;
const P_EV_BAD_VALUE: f64 = 0.003;
const MAX_EVENTS_PER_UPLOAD: usize = 20;

const APPS: [(&str, &str, &str); 8] = [
    ("app-0001", "Star Legends", "game"),
    ("app-0002", "Pocket Farm", "game"),
    ("app-0003", "Dragon Raid", "game"),
    ("app-0004", "Photo Mate", "app"),
    ("app-0005", "Puzzle Cats", "game"),
    ("app-0006", "Mahjong Club", "game"),
    ("app-0007", "Quick Notes", "app"),
    ("app-0008", "Idle Tycoon", "game"),
];
/// How often each known app is picked for a device: a few big apps and a long tail.
const APP_WEIGHTS: [u32; 8] = [30, 20, 15, 12, 9, 6, 5, 3];
/// App keys that devices send but `apps.csv` does not list (rule 3, `unknown_app`).
const UNKNOWN_APPS: [&str; 2] = ["app-0009", "app-9901"];

const CHANNELS: [(&str, &str); 16] = [
    ("appstore", "apple"),
    ("app store", "apple"),
    ("huawei", "huawei"),
    ("honor", "huawei"),
    ("xiaomi", "xiaomi"),
    ("mi", "xiaomi"),
    ("oppo", "oppo"),
    ("vivo", "vivo"),
    ("yyb", "tencent"),
    ("tencent", "tencent"),
    ("taptap", "taptap"),
    ("bilibili", "bilibili"),
    ("googleplay", "google"),
    ("google play", "google"),
    ("official", "official"),
    ("4399", "4399"),
];
/// Raw channel strings as SDKs send them: case and whitespace vary, some are not in channels.csv.
const RAW_CH_IOS: [(&str, u32); 6] =
    [("AppStore", 70), ("appstore", 10), (" App Store", 5), ("APPSTORE ", 3), ("TestFlight", 3), ("official", 2)];
const RAW_CH_ANDROID: [(&str, u32); 20] = [
    (" Huawei ", 4),
    ("HUAWEI", 6),
    ("huawei", 8),
    ("honor", 3),
    ("XiaoMi", 5),
    ("xiaomi", 5),
    ("MI", 2),
    ("OPPO", 6),
    (" oppo", 2),
    ("vivo", 6),
    ("yyb", 6),
    ("Tencent", 2),
    ("TapTap", 6),
    ("taptap ", 2),
    ("bilibili", 3),
    ("GooglePlay", 2),
    ("official", 4),
    ("4399", 2),
    ("ad_toutiao_01", 3),
    ("", 1),
];
const V2_OS: [(&str, u32); 6] =
    [("ios", 30), ("android", 55), ("iOS", 6), ("Android", 4), ("harmonyos", 4), ("iPadOS", 1)];
const V1_OS: [(&str, u32); 4] = [("Android", 55), ("iOS", 30), ("ANDROID", 5), ("HarmonyOS", 10)];
const V2_SDK: [&str; 3] = ["json/2.4.0", "json/2.4.1", "json/2.5.0"];
const V1_SDK: [&str; 2] = ["1.9.3", "1.8.7"];
const V2_APPV: [&str; 3] = ["3.4.0", "3.4.1", "3.5.0"];
const V1_APPV: [&str; 2] = ["3.3.9", "2.9.0"];

/// Geo ranges per country; CN dominates like the real traffic.
const COUNTRY_BLOCKS: [(&str, usize, &[&str]); 6] = [
    ("CN", 26, &["Beijing", "Shanghai", "Guangdong", "Zhejiang", "Jiangsu", "Sichuan"]),
    ("US", 4, &["California", "Virginia"]),
    ("JP", 3, &["Tokyo", "Osaka"]),
    ("KR", 3, &["Seoul"]),
    ("SG", 2, &["Singapore"]),
    ("DE", 2, &["Hesse"]),
];
/// First octets of public IPv4 space to place geo ranges in (private and special blocks left out).
const GEO_FIRST_OCTETS: [u32; 16] = [1, 14, 27, 36, 39, 42, 58, 59, 60, 61, 101, 106, 110, 111, 112, 113];

/// Relative session starts per local hour: quiet at night, busiest in the evening.
const HOUR_WEIGHTS: [u32; 24] =
    [30, 20, 12, 8, 6, 6, 10, 18, 26, 30, 32, 34, 40, 38, 34, 34, 36, 40, 46, 56, 66, 72, 68, 52];
/// Session length (play time) buckets of SPEC section 3 with their weights: a heavy tail, every bucket used.
const PLAY_BUCKETS: [(i64, i64, u32); 8] =
    [(0, 2, 6), (3, 9, 8), (10, 29, 12), (30, 59, 12), (60, 179, 20), (180, 599, 20), (600, 1799, 14), (1800, 7200, 8)];
const PAGES: [&str; 12] =
    ["home", "battle", "shop", "bag", "gacha", "rank", "mail", "商城", "主城", "level_1", "level_2", "level_3"];
const PAY_CNY: [i64; 7] = [600, 1800, 3000, 6800, 12800, 32800, 64800];
const PAY_USD: [i64; 4] = [99, 499, 999, 1999];

/// Writes `sdk-events.tsv`, `apps.csv`, `geo.csv` and `channels.csv` into `dir` (created if missing).
///
/// The same `seed` and `messages` always give byte-identical files, so a demo run is reproducible and a
/// test can compare its output against a stored expectation.
pub fn write_sample(dir: &Path, seed: u64, messages: u64) -> io::Result<SampleStats> {
    fs::create_dir_all(dir)?;
    let mut rng = Rng::new(seed);
    let geo = Geo::new(&mut rng);
    write_dimensions(dir, &geo)?;

    let n_devices = (messages / 20).max(20) as usize;
    let mut devices = make_devices(&mut rng, n_devices, &geo);
    let n_dup = messages * P_DUPLICATE_PER_100 / 100;
    let n_uploads = (messages - n_dup) as usize;
    let mut sessions = plan_sessions(&mut rng, &devices, n_uploads);
    schedule(&mut rng, &devices, &mut sessions);
    let mut records = build_records(&mut rng, &geo, &mut devices, &sessions);
    debug_assert_eq!(records.len(), n_uploads);
    // Topic order is delivery time; the upload sequence number breaks ties.
    records.sort_by_key(|r| (r.delivery, r.seq));

    let lines = with_resends(&mut rng, &records, n_dup as usize);
    let mut out = BufWriter::new(fs::File::create(dir.join("sdk-events.tsv"))?);
    for &i in &lines {
        let r = &records[i];
        out.write_all(r.key.as_bytes())?;
        out.write_all(b"\t")?;
        out.write_all(r.value.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()?;

    let mut used: Vec<bool> = vec![false; devices.len()];
    for s in &sessions {
        used[s.dev] = true;
    }
    Ok(SampleStats {
        records: lines.len() as u64,
        devices: used.iter().filter(|&&u| u).count() as u64,
        apps: APPS.len() as u64,
        days: DAYS as u64,
    })
}

// ---------------------------------------------------------------------------------------------------------
// PRNG

/// SplitMix64: tiny, fast, and good enough for test data; keeps the module free of extra crates.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5EED_51A1_CE00_0000)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n); 0 when n is 0.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in [lo, hi], inclusive; `lo` when the range is empty.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below((hi - lo) as u64 + 1) as i64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// A uniform element (a copy: the slices hold `&str`s, numbers and small JSON values); the slices
    /// passed are constants and never empty.
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize].clone()
    }

    /// An index drawn with the given integer weights (not all zero).
    fn weighted_index(&mut self, weights: impl Iterator<Item = u32> + Clone) -> usize {
        let total: u64 = weights.clone().map(u64::from).sum();
        let mut x = self.below(total);
        let mut last = 0;
        for (i, w) in weights.enumerate() {
            last = i;
            if x < u64::from(w) {
                return i;
            }
            x -= u64::from(w);
        }
        last
    }

    fn weighted<T: Copy>(&mut self, pairs: &[(T, u32)]) -> T {
        pairs[self.weighted_index(pairs.iter().map(|p| p.1))].0
    }
}

// ---------------------------------------------------------------------------------------------------------
// Minimal JSON

/// Just enough of a JSON value to build uploads and then break them the way buggy SDKs do.
#[derive(Clone)]
enum Json {
    Null,
    Int(i64),
    /// Number text written as is, for the non-integer numbers that fault injection needs (`12.5`).
    Raw(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

impl Json {
    fn s(v: &str) -> Json {
        Json::Str(v.to_string())
    }

    /// Sets `key` on an object, keeping its position when it exists; no-op on other values.
    fn set(&mut self, key: &'static str, value: Json) {
        if let Json::Obj(fields) = self {
            match fields.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = value,
                None => fields.push((key, value)),
            }
        }
    }

    fn remove(&mut self, key: &'static str) {
        if let Json::Obj(fields) = self {
            fields.retain(|(k, _)| *k != key);
        }
    }

    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| *k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn get_int(&self, key: &str) -> Option<i64> {
        match self.get(key) {
            Some(Json::Int(v)) => Some(*v),
            _ => None,
        }
    }

    fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Json::Str(v)) => Some(v),
            _ => None,
        }
    }

    /// Compact encoding (no spaces), non-ASCII kept as UTF-8 like `ensure_ascii=False`.
    fn encode(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Int(v) => out.push_str(&v.to_string()),
            Json::Raw(v) => out.push_str(v),
            Json::Str(v) => write_json_str(out, v),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_json_str(out, k);
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

/// A JSON string literal: control characters (so TAB and newline) are escaped,
/// so a VALUE never holds a record or field separator.
fn write_json_str(out: &mut String, s: &str) {
    sluice_model::json::write_str(out, s);
}

// ---------------------------------------------------------------------------------------------------------
// Dimension tables

fn ip_str(n: u32) -> String {
    format!("{}.{}.{}.{}", n >> 24, (n >> 16) & 255, (n >> 8) & 255, n & 255)
}

/// Non-overlapping inclusive ranges, one per distinct /16 block, sorted by start.
struct Geo {
    ranges: Vec<(u32, u32, &'static str, &'static str)>,
}

impl Geo {
    fn new(rng: &mut Rng) -> Self {
        let mut countries: Vec<usize> = Vec::new();
        for (i, (_, blocks, _)) in COUNTRY_BLOCKS.iter().enumerate() {
            countries.extend(std::iter::repeat_n(i, *blocks));
        }
        shuffle(rng, &mut countries);
        let n_blocks = (GEO_FIRST_OCTETS.len() * 256) as u64;
        let mut blocks: Vec<u64> = Vec::with_capacity(countries.len());
        while blocks.len() < countries.len() {
            let b = rng.below(n_blocks);
            if !blocks.contains(&b) {
                blocks.push(b);
            }
        }
        blocks.sort_unstable();
        let ranges = blocks
            .iter()
            .zip(&countries)
            .map(|(&b, &ci)| {
                let base = (GEO_FIRST_OCTETS[(b >> 8) as usize] << 24) | (((b & 255) as u32) << 16);
                let start = rng.range(0, 32) as u32;
                let len = rng.range(4, 96) as u32;
                let (country, _, regions) = COUNTRY_BLOCKS[ci];
                (base + (start << 8), base + ((start + len) << 8) - 1, country, rng.pick(regions))
            })
            .collect();
        Geo { ranges }
    }

    fn covers(&self, n: u32) -> bool {
        let i = self.ranges.partition_point(|r| r.0 <= n);
        i > 0 && n <= self.ranges[i - 1].1
    }

    /// A device's address: mostly inside a geo range, some private, unlisted public, or IPv6 (all `ZZ`).
    fn random_ip(&self, rng: &mut Rng) -> String {
        let r = rng.unit();
        if r < 0.90 {
            let (lo, hi, _, _) = rng.pick(&self.ranges);
            return ip_str(rng.range(i64::from(lo), i64::from(hi)) as u32);
        }
        if r < 0.94 {
            return format!("192.168.{}.{}", rng.below(256), rng.range(1, 254));
        }
        if r < 0.98 {
            loop {
                let n = rng.range(1 << 24, (224 << 24) - 1) as u32;
                if !self.covers(n) {
                    return ip_str(n);
                }
            }
        }
        format!("240e:{:x}:{:x}::{:x}", rng.below(65536), rng.below(65536), rng.range(1, 65535))
    }
}

fn shuffle<T>(rng: &mut Rng, xs: &mut [T]) {
    for i in (1..xs.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        xs.swap(i, j);
    }
}

fn write_dimensions(dir: &Path, geo: &Geo) -> io::Result<()> {
    let mut apps = String::from("app_key,name,kind\n");
    for (key, name, kind) in APPS {
        apps.push_str(&format!("{key},{name},{kind}\n"));
    }
    fs::write(dir.join("apps.csv"), apps)?;
    let mut geo_csv = String::from("start_ip,end_ip,country,region\n");
    for &(lo, hi, country, region) in &geo.ranges {
        geo_csv.push_str(&format!("{},{},{country},{region}\n", ip_str(lo), ip_str(hi)));
    }
    fs::write(dir.join("geo.csv"), geo_csv)?;
    let mut channels = String::from("raw,group\n");
    for (raw, group) in CHANNELS {
        channels.push_str(&format!("{raw},{group}\n"));
    }
    fs::write(dir.join("channels.csv"), channels)
}

// ---------------------------------------------------------------------------------------------------------
// Devices and sessions

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Unified JSON SDK.
    V2,
    /// Legacy SDK, one event an upload.
    V1,
    /// Reports an app key missing in apps.csv.
    Unknown,
    /// A test or bot device with dozens of short sessions a day (the high sessions-per-device buckets).
    Heavy,
    /// First session crosses local midnight and its first upload arrives hours late: its first day moves
    /// backwards, which exercises the retraction of `new_devices`.
    Forced,
}

struct Device {
    id: String,
    app: &'static str,
    role: Role,
    os: &'static str,
    ch: Option<&'static str>,
    sdk: &'static str,
    appv: &'static str,
    ip: String,
}

fn make_devices(rng: &mut Rng, n: usize, geo: &Geo) -> Vec<Device> {
    let count = |share: f64, min: usize| ((n as f64 * share) as usize).max(min);
    let mut roles = Vec::with_capacity(n);
    roles.extend(std::iter::repeat_n(Role::Unknown, count(0.005, 2)));
    roles.extend(std::iter::repeat_n(Role::V1, count(0.07, 2)));
    roles.extend(std::iter::repeat_n(Role::Heavy, count(0.001, 1)));
    roles.extend(std::iter::repeat_n(Role::Forced, count(0.003, 3)));
    roles.resize(n.max(roles.len() + 1), Role::V2);
    shuffle(rng, &mut roles);
    roles
        .into_iter()
        .enumerate()
        .map(|(i, role)| {
            let v1 = role == Role::V1;
            let app = if role == Role::Unknown {
                rng.pick(&UNKNOWN_APPS)
            } else {
                APPS[rng.weighted_index(APP_WEIGHTS.iter().copied())].0
            };
            let os = rng.weighted(if v1 { &V1_OS[..] } else { &V2_OS[..] });
            let lower = os.to_ascii_lowercase();
            let raw_ch = if lower == "ios" || lower == "ipados" { &RAW_CH_IOS[..] } else { &RAW_CH_ANDROID[..] };
            let mut ch = Some(rng.weighted(raw_ch));
            if matches!(role, Role::V2 | Role::Unknown) && rng.chance(0.01) {
                ch = None; // a build that does not report its channel
            }
            Device {
                id: format!("d-{:07}", i + 1),
                app,
                role,
                os,
                ch,
                sdk: rng.pick(if v1 { &V1_SDK[..] } else { &V2_SDK[..] }),
                appv: rng.pick(if v1 { &V1_APPV[..] } else { &V2_APPV[..] }),
                ip: geo.random_ip(rng),
            }
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Launch,
    Page,
    Custom,
    Pay,
    Terminate,
}

struct Session {
    dev: usize,
    start: i64,
    dur_s: i64,
    kinds: Vec<Kind>,
    /// Upload sizes, in events; they sum to at most `kinds.len()` (the last session may be cut short).
    chunks: Vec<usize>,
    /// Events before local midnight for a `Forced` session, else 0.
    split: usize,
}

/// Launch, `n_mid` pages/customs/pays drawn by the cumulative percentages, terminate.
fn session_kinds(rng: &mut Rng, n_mid: usize, page_pct: f64, custom_pct: f64) -> Vec<Kind> {
    let mut kinds = vec![Kind::Launch];
    for _ in 0..n_mid {
        let r = rng.unit() * 100.0;
        kinds.push(if r < page_pct {
            Kind::Page
        } else if r < custom_pct {
            Kind::Custom
        } else {
            Kind::Pay
        });
    }
    kinds.push(Kind::Terminate);
    kinds
}

fn play_time(rng: &mut Rng) -> i64 {
    let &(lo, hi, _) = &PLAY_BUCKETS[rng.weighted_index(PLAY_BUCKETS.iter().map(|b| b.2))];
    rng.range(lo, hi)
}

/// How a v2 SDK batches a session of `n` events into uploads of 1-20 events.
fn chunk_sizes(rng: &mut Rng, mut n: usize) -> Vec<usize> {
    if n <= MAX_EVENTS_PER_UPLOAD && rng.chance(0.4) {
        return vec![n];
    }
    let mut sizes = Vec::new();
    if rng.chance(0.5) {
        sizes.push(1); // launch flushed on its own
        n -= 1;
    }
    while n > 0 {
        let s = (rng.range(1, MAX_EVENTS_PER_UPLOAD as i64) as usize).min(n);
        sizes.push(s);
        n -= s;
    }
    sizes
}

fn isqrt(n: i64) -> i64 {
    (n.max(0) as f64).sqrt() as i64
}

/// A session of a device of the given role (start time set later by `schedule`).
fn make_session(rng: &mut Rng, dev: usize, role: Role) -> Session {
    let (dur_s, kinds, chunks, split) = match role {
        Role::Heavy => {
            let dur = rng.range(1, 120);
            let n_mid = rng.range(0, 2) as usize;
            let kinds = session_kinds(rng, n_mid, 50.0, 100.0);
            let n = kinds.len();
            (dur, kinds, vec![n], 0)
        }
        Role::Forced => {
            let (pre, post) = (rng.range(2, 10) as usize, rng.range(2, 10) as usize);
            let kinds = session_kinds(rng, pre + post - 2, 55.0, 99.0);
            (rng.range(40, 100) * 60, kinds, vec![pre, post], pre)
        }
        Role::V1 => {
            let dur = play_time(rng);
            let n_mid = rng.below(2 + isqrt(dur / 60) as u64) as usize;
            let kinds = session_kinds(rng, n_mid, 50.0, 96.0);
            let n = kinds.len();
            (dur, kinds, vec![1; n], 0)
        }
        Role::V2 | Role::Unknown => {
            let dur = play_time(rng);
            let n_mid = rng.below(3 + isqrt(dur / 8) as u64) as usize;
            let kinds = session_kinds(rng, n_mid, 55.0, 95.0);
            let chunks = chunk_sizes(rng, kinds.len());
            (dur, kinds, chunks, 0)
        }
    };
    Session { dev, start: 0, dur_s, kinds, chunks, split }
}

/// Collects sessions until exactly `n_uploads` uploads are planned.
struct Planner {
    sessions: Vec<Session>,
    total: usize,
    n_uploads: usize,
}

impl Planner {
    /// Adds a session, cut short if it would pass the target; returns the uploads it adds.
    fn add(&mut self, mut s: Session) -> usize {
        s.chunks.truncate(self.n_uploads - self.total);
        let added = s.chunks.len();
        if added > 0 {
            self.sessions.push(s);
            self.total += added;
        }
        added
    }

    fn full(&self) -> bool {
        self.total >= self.n_uploads
    }
}

/// Which device plays which session, until exactly `n_uploads` uploads are planned.
fn plan_sessions(rng: &mut Rng, devices: &[Device], n_uploads: usize) -> Vec<Session> {
    let mut plan = Planner { sessions: Vec::new(), total: 0, n_uploads };
    let members =
        |roles: &[Role]| -> Vec<usize> { (0..devices.len()).filter(|&i| roles.contains(&devices[i].role)).collect() };
    for di in members(&[Role::Forced]) {
        if plan.total + 2 <= n_uploads {
            plan.add(make_session(rng, di, Role::Forced));
        }
    }
    let heavy = members(&[Role::Heavy]);
    let heavy_per_day = ((n_uploads * 3 / 100) / (DAYS as usize * heavy.len().max(1))).clamp(1, 80) as i64;
    for &di in &heavy {
        for _ in 0..rng.range(heavy_per_day / 2, heavy_per_day) * DAYS {
            plan.add(make_session(rng, di, Role::Heavy));
        }
    }
    // Activity per device is heavy-tailed too: a Pareto(1) weight capped at 100. Forced devices play
    // ordinary v2 sessions after their first one.
    let pools = [(Role::Unknown, &[Role::Unknown][..]), (Role::V1, &[Role::V1]), (Role::V2, &[Role::V2, Role::Forced])]
        .map(|(role, roles)| {
            let m = members(roles);
            let mut acc = 0.0;
            let cum: Vec<f64> = m
                .iter()
                .map(|_| {
                    acc += (1.0 / (1.0 - rng.unit())).min(100.0);
                    acc
                })
                .collect();
            (role, m, cum)
        });
    let (mut n_unknown, mut n_v1) = (0usize, 0usize);
    while !plan.full() {
        let cat = if (n_unknown as f64) < P_UNKNOWN_APP * plan.total as f64 {
            0
        } else if (n_v1 as f64) < P_V1 * plan.total as f64 {
            1
        } else {
            2
        };
        let (role, members, cum) = &pools[cat];
        // Every pool is non-empty: make_devices gives each role at least one device.
        let x = rng.unit() * cum.last().copied().unwrap_or(0.0);
        let di = members[cum.partition_point(|&c| c <= x).min(members.len() - 1)];
        let added = plan.add(make_session(rng, di, *role));
        match cat {
            0 => n_unknown += added,
            1 => n_v1 += added,
            _ => {}
        }
    }
    plan.sessions
}

fn draw_start(rng: &mut Rng) -> i64 {
    let hour = rng.weighted_index(HOUR_WEIGHTS.iter().copied()) as i64;
    BASE_MS + rng.range(0, DAYS - 1) * DAY + hour * HOUR + rng.range(0, HOUR - 1)
}

/// Session start times per device, in order and not overlapping where the two days leave room.
fn schedule(rng: &mut Rng, devices: &[Device], sessions: &mut [Session]) {
    let mut by_dev: Vec<Vec<usize>> = vec![Vec::new(); devices.len()];
    for (si, s) in sessions.iter().enumerate() {
        by_dev[s.dev].push(si);
    }
    for sis in &by_dev {
        let mut lo = BASE_MS;
        let mut rest = &sis[..];
        if let Some(&first) = sis.first()
            && sessions[first].split > 0
        {
            // Forced: 23:15-23:45 local on day 0, so the session crosses midnight.
            let start = BASE_MS + 23 * HOUR + rng.range(15, 45) * MINUTE;
            sessions[first].start = start;
            lo = start + sessions[first].dur_s * SECOND + 2 * MINUTE;
            rest = &sis[1..];
        }
        let mut starts: Vec<i64> = rest
            .iter()
            .map(|_| {
                let mut s = draw_start(rng);
                for _ in 0..10 {
                    if s >= lo {
                        break;
                    }
                    s = draw_start(rng);
                }
                s.max(lo)
            })
            .collect();
        starts.sort_unstable();
        let mut prev_end = lo;
        for (&si, mut start) in rest.iter().zip(starts) {
            let dur_ms = sessions[si].dur_s * SECOND + SECOND;
            let gap = prev_end + rng.range(5, 600) * SECOND;
            if start < gap && gap + dur_ms <= SPAN_END {
                start = gap;
            }
            if start + dur_ms > SPAN_END {
                start = lo.max(SPAN_END - dur_ms);
            }
            sessions[si].start = start;
            prev_end = prev_end.max(start + dur_ms);
        }
    }
}

/// Millisecond timestamps of a session's events: launch at start, terminate at start + dur.
fn event_times(rng: &mut Rng, s: &Session) -> Vec<i64> {
    let n = s.kinds.len();
    let end = s.start + s.dur_s * SECOND + rng.range(0, SECOND - 1);
    let mut mids: Vec<i64> = Vec::with_capacity(n);
    if s.split > 0 {
        let midnight = BASE_MS + ((s.start - BASE_MS) / DAY + 1) * DAY;
        let mut pre: Vec<i64> = (1..s.split).map(|_| rng.range(s.start + 1, midnight - 1)).collect();
        let mut post: Vec<i64> = (s.split + 1..n).map(|_| rng.range(midnight, end)).collect();
        pre.sort_unstable();
        post.sort_unstable();
        mids.extend(pre);
        mids.extend(post);
    } else {
        mids.extend((2..n).map(|_| rng.range(s.start, end)));
        mids.sort_unstable();
    }
    let mut ts = Vec::with_capacity(n);
    ts.push(s.start);
    ts.extend(mids);
    ts.push(end);
    ts
}

// ---------------------------------------------------------------------------------------------------------
// Uploads

/// One record of the topic.
struct Record {
    delivery: i64,
    seq: u64,
    key: String,
    value: String,
}

/// One upload of a device before delivery times are final.
struct Upload {
    sent: i64,
    delivery: i64,
    key: String,
    value: String,
    protected: bool,
    seq: u64,
}

/// A custom event's id, label and optional integer parameter.
fn custom_fields(rng: &mut Rng) -> (&'static str, String, Option<(&'static str, i64)>) {
    match rng.weighted_index([30u32, 20, 20, 12, 12, 6].into_iter()) {
        0 => ("level_up", format!("world{}", rng.range(1, 5)), Some(("level", rng.range(2, 80)))),
        1 => {
            let step = rng.range(1, 12);
            ("tutorial_step", format!("step_{step}"), Some(("step", step)))
        }
        2 => ("ad_reward", "rewarded_video".to_string(), Some(("coins", rng.pick(&[50, 100, 200])))),
        3 => ("gacha_pull", rng.pick(&["单抽", "十连"]).to_string(), None),
        4 => ("quest_complete", rng.pick(&["daily", "main", "event"]).to_string(), None),
        _ => ("share", rng.pick(&["wechat", "qq", "weibo"]).to_string(), None),
    }
}

/// A payment: mostly CNY, a few USD, rarely a free 0.
fn payment(rng: &mut Rng) -> (i64, &'static str) {
    let r = rng.unit();
    if r < 0.01 {
        (0, "CNY")
    } else if r < 0.95 {
        (PAY_CNY[rng.weighted_index([30u32, 15, 20, 15, 10, 6, 4].into_iter())], "CNY")
    } else {
        (rng.pick(&PAY_USD), "USD")
    }
}

/// v1 money: a decimal string in yuan, written the ways legacy SDKs write it.
fn money_str(rng: &mut Rng, amount: i64) -> String {
    let (yuan, fen) = (amount / 100, amount % 100);
    if fen == 0 && rng.chance(0.3) {
        return yuan.to_string();
    }
    format!("{yuan}.{fen:02}")
}

/// One event in the unified (v2) form, before any fault.
fn v2_event(rng: &mut Rng, kind: Kind, ts: i64, sid: &str, dur_s: i64, order_no: &mut u64) -> Json {
    let mut f: Vec<(&'static str, Json)> = Vec::with_capacity(7);
    let t = match kind {
        Kind::Launch => "launch",
        Kind::Page => "page",
        Kind::Custom => "custom",
        Kind::Pay => "pay",
        Kind::Terminate => "terminate",
    };
    f.push(("t", Json::s(t)));
    f.push(("ts", Json::Int(ts)));
    f.push(("sid", Json::s(sid)));
    match kind {
        Kind::Launch => {}
        Kind::Page => {
            f.push(("page", Json::s(rng.pick(&PAGES))));
            f.push(("dur", Json::Int(rng.range(1, 20) * rng.range(1, 20))));
        }
        Kind::Custom => {
            let (id, label, param) = custom_fields(rng);
            f.push(("id", Json::s(id)));
            f.push(("label", Json::Str(label)));
            if let Some((k, v)) = param {
                f.push(("params", Json::Obj(vec![(k, Json::Int(v))])));
            }
        }
        Kind::Pay => {
            let (amount, cur) = payment(rng);
            *order_no += 1;
            f.push(("amount", Json::Int(amount)));
            f.push(("cur", Json::s(cur)));
            f.push(("order", Json::Str(format!("o-{:09}", *order_no))));
        }
        Kind::Terminate => f.push(("dur", Json::Int(dur_s))),
    }
    Json::Obj(f)
}

/// Per-event faults of a v2 event (rules 5-7); `r` in [0, P_EV_*) picks the kind.
fn corrupt_v2_event(rng: &mut Rng, ev: &mut Json, sent: i64, r: f64) {
    if r < P_EV_UNKNOWN {
        if rng.chance(0.2) {
            ev.remove("t");
        } else {
            let bad = [Json::s("crash"), Json::s("heartbeat"), Json::s("Launch"), Json::s(""), Json::Int(7)];
            ev.set("t", rng.pick(&bad));
        }
        return;
    }
    if r < P_EV_UNKNOWN + P_EV_BAD_TS {
        let ts = ev.get_int("ts").unwrap_or(sent);
        let bad = match rng.below(8) {
            0 => Json::Int(sent - rng.range(8, 900) * DAY), // device clock far in the past
            1 => Json::Int(0),
            2 => Json::Int(sent + rng.range(1, 800) * DAY), // far future
            3 => Json::Int(sent + rng.range(11, 600) * MINUTE),
            4 => Json::Int(sent - 7 * DAY - 1), // just outside the window
            5 => Json::Str(ts.to_string()),
            6 => Json::Raw(format!("{ts}.5")),
            _ => Json::Null,
        };
        ev.set("ts", bad);
        return;
    }
    let k = rng.below(3);
    match ev.get_str("t") {
        Some("page" | "terminate") => {
            let dur = ev.get_int("dur").unwrap_or(0);
            match k {
                0 => ev.set("dur", Json::Int(-rng.range(1, 1000))),
                1 => ev.remove("dur"),
                _ => ev.set("dur", Json::Str(dur.to_string())),
            }
        }
        Some("pay") => {
            let amount = ev.get_int("amount").unwrap_or(0);
            match k {
                0 => ev.remove("amount"),
                1 => ev.set("amount", Json::Int(-rng.pick(&PAY_CNY))),
                _ => ev.set("amount", Json::Str(amount.to_string())),
            }
        }
        Some("custom") => match k {
            0 => ev.remove("id"),
            _ => ev.set("id", if rng.chance(0.5) { Json::Null } else { Json::Int(17) }),
        },
        _ => {} // a launch has no value to break
    }
}

/// Per-event faults of a v1 upload: unknown type or bad value (its time is checked as a field).
fn corrupt_v1_event(rng: &mut Rng, msg: &mut Json, r: f64) {
    if r < P_EV_UNKNOWN {
        msg.set("type", Json::s(rng.pick(&["crash", "heartbeat", "login", "Exit"])));
        return;
    }
    match msg.get_str("type") {
        Some("page" | "exit") => {
            let dur = msg.get_int("duration").unwrap_or(0);
            match rng.below(3) {
                0 => msg.set("duration", Json::Int(-rng.range(1, 1000))),
                1 => msg.remove("duration"),
                _ => msg.set("duration", Json::Str(dur.to_string())),
            }
        }
        Some("payment") => {
            let bad =
                [Json::s("6元"), Json::s("six"), Json::s("-6.00"), Json::s(""), Json::Int(6), Json::Raw("6.5".into())];
            msg.set("money", rng.pick(&bad));
        }
        Some("event") => msg.set("eventid", Json::Int(42)),
        _ => {}
    }
}

/// Missing or mistyped required fields (rule 2). Returns the record KEY to use.
fn break_fields(rng: &mut Rng, msg: &mut Json, v1: bool) -> String {
    let (app, dev, mid) = if v1 { ("appkey", "deviceid", "msgid") } else { ("app", "dev", "mid") };
    match rng.below(10) {
        0 => msg.remove(app),
        1 => msg.remove(dev),
        2 => msg.remove(mid),
        3 => msg.set(dev, Json::s("")),
        4 => msg.set(mid, Json::Int(rng.below(1_000_000) as i64)),
        5 => msg.set(app, Json::Null),
        k if v1 => {
            let time = msg.get_int("time").unwrap_or(0);
            match k {
                6 => msg.set("time", Json::Str(time.to_string())),
                7 => msg.set("time", Json::Raw(format!("{time}.5"))),
                8 => msg.remove("type"),
                _ => msg.set("type", Json::Int(3)),
            }
        }
        k => {
            let sent = msg.get_int("sent").unwrap_or(0);
            match k {
                6 => msg.set("sent", Json::Str(sent.to_string())),
                7 => msg.remove("sent"),
                8 => msg.set("events", Json::Arr(Vec::new())),
                _ => msg.set("events", Json::Null),
            }
        }
    }
    msg.get_str(dev).unwrap_or("").to_string()
}

/// A VALUE that is not a JSON object (rule 1); always valid UTF-8.
fn malformed(rng: &mut Rng, text: &str) -> String {
    match rng.below(6) {
        0..=2 => {
            // A truncated upload, cut on a character boundary.
            let mut cut = rng.range(1, text.len() as i64 - 1).max(1) as usize;
            while cut > 1 && !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.get(..cut).unwrap_or("").to_string()
        }
        3 => format!("[{text}]"), // a batch sent as an array
        4 => rng.pick(&["null", "true", "\"ok\"", "ping", "12345"]).to_string(),
        _ => String::new(),
    }
}

/// The v1 message of a single-event upload.
fn v1_message(rng: &mut Rng, d: &Device, mid: &str, ev: &Json, sid: &str) -> (Json, i64) {
    let ts = ev.get_int("ts").unwrap_or(BASE_MS);
    let time = ts.div_euclid(SECOND);
    let t = ev.get_str("t").unwrap_or("launch");
    let ty = match t {
        "page" => "page",
        "custom" => "event",
        "pay" => "payment",
        "terminate" => "exit",
        _ => "launch",
    };
    let mut msg = Json::Obj(vec![
        ("ver", Json::s(d.sdk)),
        ("msgid", Json::s(mid)),
        ("appkey", Json::s(d.app)),
        ("deviceid", Json::s(&d.id)),
        ("platform", Json::s(d.os)),
        ("channel", Json::s(d.ch.unwrap_or(""))),
        ("appversion", Json::s(d.appv)),
        ("clientip", Json::s(&d.ip)),
        ("type", Json::s(ty)),
        ("time", Json::Int(time)),
        ("session", Json::s(sid)),
    ]);
    let copy = |msg: &mut Json, to: &'static str, from: &str| {
        if let Some(v) = ev.get(from) {
            msg.set(to, v.clone());
        }
    };
    match t {
        "page" => {
            copy(&mut msg, "page", "page");
            copy(&mut msg, "duration", "dur");
        }
        "custom" => {
            copy(&mut msg, "eventid", "id");
            copy(&mut msg, "label", "label");
        }
        "pay" => {
            msg.set("money", Json::Str(money_str(rng, ev.get_int("amount").unwrap_or(0))));
            copy(&mut msg, "currency", "cur");
            copy(&mut msg, "orderid", "order");
        }
        "terminate" => copy(&mut msg, "duration", "dur"),
        _ => {}
    }
    (msg, time * SECOND)
}

/// A v2 upload of `events` (the last at `last`), flushed a moment after its
/// last event, sometimes after minutes offline; its events corrupted at
/// random unless `protected`. With its `sent` time.
fn v2_message(
    rng: &mut Rng,
    d: &Device,
    mid: &str,
    mut events: Vec<Json>,
    last: i64,
    protected: bool,
    p_ev_any: f64,
) -> (Json, i64) {
    let sent = last + if rng.chance(0.97) { rng.range(100, 4000) } else { rng.range(1, 30) * MINUTE };
    if !protected {
        for ev in &mut events {
            let r = rng.unit();
            if r < p_ev_any {
                corrupt_v2_event(rng, ev, sent, r);
            }
        }
    }
    let mut msg = Json::Obj(vec![
        ("sdk", Json::s(d.sdk)),
        ("mid", Json::s(mid)),
        ("app", Json::s(d.app)),
        ("dev", Json::s(&d.id)),
        ("os", Json::s(d.os)),
        ("appv", Json::s(d.appv)),
        ("ch", Json::s(d.ch.unwrap_or(""))),
        ("ip", Json::s(&d.ip)),
        ("sent", Json::Int(sent)),
        ("events", Json::Arr(events)),
    ]);
    if d.ch.is_none() {
        msg.remove("ch");
    }
    (msg, sent)
}

/// Builds every device's uploads and their delivery times (topic order comes from sorting these).
fn build_records(rng: &mut Rng, geo: &Geo, devices: &mut [Device], sessions: &[Session]) -> Vec<Record> {
    let salt = rng.next_u64();
    let p_ev_any = P_EV_UNKNOWN + P_EV_BAD_TS + P_EV_BAD_VALUE;
    let mut by_dev: Vec<Vec<usize>> = vec![Vec::new(); devices.len()];
    for (si, s) in sessions.iter().enumerate() {
        by_dev[s.dev].push(si);
    }
    let (mut records, mut seq, mut order_no) = (Vec::new(), 0u64, 0u64);
    for (di, sis) in by_dev.iter_mut().enumerate() {
        sis.sort_by_key(|&si| (sessions[si].start, si));
        let mut ups: Vec<Upload> = Vec::new();
        for &si in sis.iter() {
            let s = &sessions[si];
            if rng.chance(0.08) {
                devices[di].ip = geo.random_ip(rng); // a new network for this session
            }
            let d = &devices[di];
            let v1 = d.role == Role::V1;
            let ts = event_times(rng, s);
            let sid = format!("s-{si:08x}");
            let protected = s.split > 0;
            let mut pos = 0;
            for &size in &s.chunks {
                seq += 1;
                let mid = format!("{:016x}", seq.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(salt));
                let events: Vec<Json> =
                    (pos..pos + size).map(|k| v2_event(rng, s.kinds[k], ts[k], &sid, s.dur_s, &mut order_no)).collect();
                pos += size;
                let r_msg = if protected { 1.0 } else { rng.unit() };
                let (mut msg, sent) = if v1 {
                    let (mut msg, sent) = v1_message(rng, d, &mid, &events[0], &sid);
                    let r = rng.unit();
                    if r < P_EV_UNKNOWN + P_EV_BAD_VALUE {
                        corrupt_v1_event(rng, &mut msg, r);
                    }
                    (msg, sent)
                } else {
                    v2_message(rng, d, &mid, events, ts[pos - 1], protected, p_ev_any)
                };
                let mut key = d.id.clone();
                if (P_MALFORMED..P_MALFORMED + P_MISSING).contains(&r_msg) {
                    key = break_fields(rng, &mut msg, v1);
                }
                let mut value = msg.encode();
                if r_msg < P_MALFORMED {
                    value = malformed(rng, &value);
                    if rng.chance(0.2) {
                        key.clear();
                    }
                }
                let delivery = sent + rng.range(10, 1500);
                ups.push(Upload { sent, delivery, key, value, protected, seq });
            }
        }
        delay_some(rng, &mut ups);
        records.extend(ups.into_iter().map(|u| Record {
            delivery: u.delivery,
            seq: u.seq,
            key: u.key,
            value: u.value,
        }));
    }
    records
}

/// Late delivery: some uploads arrive hours after the device's next upload, so a device's first event
/// can arrive after later ones. A `Forced` session's pre-midnight upload always does.
fn delay_some(rng: &mut Rng, ups: &mut [Upload]) {
    for j in 0..ups.len().saturating_sub(1) {
        let (next_sent, next_delivery, next_protected) = (ups[j + 1].sent, ups[j + 1].delivery, ups[j + 1].protected);
        let cur = &mut ups[j];
        if cur.protected && next_protected {
            cur.delivery = next_delivery + rng.range(2 * HOUR, 5 * HOUR);
        } else if !cur.protected && next_sent - cur.sent <= 6 * HOUR && rng.chance(P_LATE) {
            cur.delivery = next_delivery + rng.range(2 * HOUR, 6 * HOUR);
        }
    }
}

/// Topic order with exact re-sends: `n_dup` records appear again within the next 2,000 records and an
/// hour of delivery time (an SDK retry). Returns indexes into `records`, one a line.
fn with_resends(rng: &mut Rng, records: &[Record], n_dup: usize) -> Vec<usize> {
    let n = records.len();
    let n_dup = n_dup.min(n);
    let mut idx: Vec<usize> = (0..n).collect();
    // Partial Fisher-Yates: the first n_dup entries are a uniform sample without replacement.
    for i in 0..n_dup {
        let j = i + rng.below((n - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut picked = idx[..n_dup].to_vec();
    picked.sort_unstable();
    let mut inserts: Vec<(usize, usize)> = picked
        .into_iter()
        .map(|i| {
            let deadline = records[i].delivery + HOUR;
            let limit = records.partition_point(|r| r.delivery <= deadline);
            ((i + rng.range(1, 2000) as usize).min(limit).min(n), i)
        })
        .collect();
    inserts.sort_unstable();
    let mut lines = Vec::with_capacity(n + n_dup);
    let mut k = 0;
    for j in 0..=n {
        while k < inserts.len() && inserts[k].0 == j {
            lines.push(inserts[k].1);
            k += 1;
        }
        if j < n {
            lines.push(j);
        }
    }
    lines
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn read_all(dir: &Path) -> Vec<(String, Vec<u8>)> {
        ["sdk-events.tsv", "apps.csv", "geo.csv", "channels.csv"]
            .iter()
            .map(|f| (f.to_string(), fs::read(dir.join(f)).unwrap()))
            .collect()
    }

    #[test]
    fn same_seed_gives_same_bytes() {
        let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sa = write_sample(a.path(), 7, 3000).unwrap();
        let sb = write_sample(b.path(), 7, 3000).unwrap();
        write_sample(c.path(), 8, 3000).unwrap();
        assert_eq!(sa, sb);
        assert_eq!(read_all(a.path()), read_all(b.path()));
        assert_ne!(read_all(a.path())[0], read_all(c.path())[0], "another seed gives other events");
    }

    #[test]
    fn record_count_equals_messages() {
        for messages in [0, 1, 99, 100, 2500] {
            let dir = tempfile::tempdir().unwrap();
            let stats = write_sample(dir.path(), 1, messages).unwrap();
            let text = fs::read_to_string(dir.path().join("sdk-events.tsv")).unwrap();
            assert_eq!(text.lines().count() as u64, messages, "messages={messages}");
            assert_eq!(stats.records, messages);
            assert_eq!((stats.apps, stats.days), (8, 2));
            assert!(text.lines().all(|l| l.matches('\t').count() == 1), "every line is KEY<TAB>VALUE");
        }
    }

    #[test]
    fn default_size_has_every_shape_and_fault() {
        let dir = tempfile::tempdir().unwrap();
        let stats = write_sample(dir.path(), 7, 20_000).unwrap();
        assert!((900..=1000).contains(&stats.devices), "devices={}", stats.devices);
        let text = fs::read_to_string(dir.path().join("sdk-events.tsv")).unwrap();
        let values: Vec<&str> = text.lines().filter_map(|l| l.split_once('\t')).map(|(_, v)| v).collect();
        let count = |needle: &str| values.iter().filter(|v| v.contains(needle)).count();
        let v1 = values.iter().filter(|v| v.starts_with("{\"ver\":")).count();
        assert!((2000..4000).contains(&v1), "v1 uploads: {v1}");
        assert!(count("\"app\":\"app-9901\"") + count("\"app\":\"app-0009\"") > 0, "unknown apps");
        assert!(values.iter().any(|v| v.is_empty()), "empty values");
        assert!(values.iter().any(|v| !v.is_empty() && !v.starts_with('{')), "non-object values");
        assert!(count("\"events\":[]") + count("\"events\":null") > 0, "missing events");
        assert!(count("\"t\":\"crash\"") + count("\"t\":\"heartbeat\"") > 0, "unknown events");
        assert!(count("\"dur\":-") + count("\"duration\":-") > 0, "negative durations");
        assert!(count("\"amount\":\"") > 0 || count("\"amount\":-") > 0, "bad amounts");
        let mut sorted = values.clone();
        sorted.sort_unstable();
        assert!(sorted.windows(2).any(|w| w[0] == w[1] && w[0].contains("\"mid\"")), "re-sends");
    }
}
