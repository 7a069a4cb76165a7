//! The PostgreSQL sink mode against a real PostgreSQL server: the small
//! gen.py set through the distributed stack, with the sink mirroring into
//! PostgreSQL; the PostgreSQL tables must equal the sink's export, row for
//! row, integers exact.
//!
//! Three checks on one run: the rows written after each commit (the live
//! path) reach PostgreSQL, even when it was down while they were committed;
//! a restart rewrites rows PostgreSQL lost or that were changed behind the
//! sink's back (the full sync on start); and a SIGTERM drain writes
//! everything before the sink exits.
//!
//! The server is started here (initdb into a temp dir, trust auth on
//! 127.0.0.1, a free port; as the `postgres` user when running as root,
//! since initdb refuses root). The test fails, never skips, when it cannot.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use sluice_tests::stack::{Stack, StackConfig, free_port, http_get, terminate};
use sluice_tests::{DataSet, assert_tables_equal, scratch};
use tempfile::TempDir;

const TABLES: [&str; 5] = ["daily", "sessions_per_device", "custom_events", "minute", "rejects"];
const SCHEMA: &str = "sluice";
/// How long PostgreSQL, or the mirror, may take to get somewhere.
const DEADLINE: Duration = Duration::from_secs(60);

/// A PostgreSQL server in a temp dir; dropping it stops the server.
struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    /// (uid, gid) to run initdb and postgres as (when this test runs as root).
    user: Option<(u32, u32)>,
    /// The postmaster, while it runs.
    server: Option<Child>,
    log: PathBuf,
    dir: TempDir,
}

/// The directory of initdb, postgres and psql: where the `initdb` on
/// `PATH` really lives (a symlink's target), else Debian's
/// `/usr/lib/postgresql/<newest>/bin`.
fn postgres_bin() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    let server_dir = |initdb: PathBuf| -> Option<PathBuf> {
        let dir = std::fs::canonicalize(initdb).ok()?.parent()?.to_path_buf();
        ["postgres", "psql"].iter().all(|b| dir.join(b).is_file()).then_some(dir)
    };
    if let Some(dir) = on_path.into_iter().find_map(|d| server_dir(d.join("initdb"))) {
        return Ok(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context(
        "PostgreSQL server binaries (initdb, postgres) not found on PATH nor in /usr/lib/postgresql/*/bin: \
         run `bash scripts/servers.sh` to install them",
    )
}

/// `id -u USER` / `id -g USER`.
fn id_of(flag: &str, user: &str) -> anyhow::Result<u32> {
    let out = Command::new("id").args([flag, user]).output().with_context(|| format!("running id {flag} {user}"))?;
    ensure!(out.status.success(), "no system user {user} (id {flag} {user} failed): PostgreSQL cannot run as root");
    String::from_utf8_lossy(&out.stdout).trim().parse().with_context(|| format!("id {flag} {user} said {out:?}"))
}

impl Postgres {
    /// A new cluster (initdb) on a free port, started.
    fn start() -> anyhow::Result<Self> {
        let bin = postgres_bin()?;
        let dir = scratch()?;
        let root = std::fs::metadata("/proc/self").context("reading /proc/self")?.uid() == 0;
        // initdb and postgres refuse to run as root: then run them as `postgres`, in a dir it owns.
        let user = if root {
            let ids = (id_of("-u", "postgres")?, id_of("-g", "postgres")?);
            std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1))
                .context("handing the temp dir to postgres")?;
            Some(ids)
        } else {
            None
        };
        let (data, log) = (dir.path().join("data"), dir.path().join("postgres.log"));
        let mut pg = Self { bin, data, port: free_port()?, user, server: None, log, dir };
        let mut initdb = pg.command("initdb");
        initdb.arg("-D").arg(&pg.data).args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"]);
        let out = initdb.output().context("running initdb")?;
        ensure!(out.status.success(), "initdb failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        pg.run()?;
        Ok(pg)
    }

    /// One of the server binaries, run as the server's user.
    fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(name));
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Start the server (again) and wait until it answers queries.
    fn run(&mut self) -> anyhow::Result<()> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="])
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .stdout(file.try_clone()?)
            .stderr(file);
        self.server = Some(cmd.spawn().context("starting postgres")?);
        let started = Instant::now();
        loop {
            if let Some(status) = self.server.as_mut().map(Child::try_wait).transpose()?.flatten() {
                bail!("postgres exited ({status}) while starting; its log:\n{}", self.log_text());
            }
            match self.psql("SELECT 1") {
                Ok(_) => return Ok(()),
                Err(e) if started.elapsed() > DEADLINE => {
                    bail!(
                        "PostgreSQL did not accept queries within {DEADLINE:?} ({e:#}); its log:\n{}",
                        self.log_text()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Stop the server at once (SIGQUIT: PostgreSQL's immediate shutdown,
    /// its backends too), as an outage would; SIGKILL after 10 s.
    fn stop(&mut self) {
        let Some(mut server) = self.server.take() else { return };
        let _ = Command::new("kill").arg("-QUIT").arg(server.id().to_string()).status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = server.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = server.kill();
        let _ = server.wait();
    }

    fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run `sql`; the rows, one line each, columns `|`-separated.
    fn psql(&self, sql: &str) -> anyhow::Result<Vec<String>> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-p", &self.port.to_string(), "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        ensure!(out.status.success(), "psql -c {sql:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(String::from_utf8(out.stdout).context("psql output is not UTF-8")?.lines().map(str::to_owned).collect())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// JSON `text` parsed with every number made a string of its digits, so
/// that integers of any size compare exactly (serde_json alone turns those
/// beyond 64 bits into floats).
fn exact(text: &str) -> anyhow::Result<Value> {
    let mut quoted = String::with_capacity(text.len() + 64);
    let (mut in_string, mut escaped) = (false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            quoted.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                quoted.push(c);
            }
            '-' | '0'..='9' => {
                quoted.push_str("\"\\u0001");
                quoted.push(c);
                while let Some(&d) = chars.peek() {
                    if !(d.is_ascii_digit() || matches!(d, '.' | 'e' | 'E' | '+' | '-')) {
                        break;
                    }
                    quoted.push(d);
                    chars.next();
                }
                quoted.push('"');
            }
            _ => quoted.push(c),
        }
    }
    serde_json::from_str(&quoted).with_context(|| format!("not JSON: {text:.300}"))
}

/// Rows as canonical JSON text (keys sorted, numbers exact), sorted: a
/// multiset that compares independently of order and formatting.
fn canonical<'a>(rows: impl IntoIterator<Item = &'a str>) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = rows.into_iter().map(|r| exact(r).map(|v| v.to_string())).collect::<Result<_, _>>()?;
    out.sort();
    Ok(out)
}

/// Where PostgreSQL's `table` differs from the export in `dir`, if it does.
fn difference(pg: &Postgres, dir: &Path, table: &str) -> anyhow::Result<Option<String>> {
    let path = dir.join(format!("{table}.jsonl"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let exported = canonical(text.lines())?;
    // Column names are the export's field names: row_to_json gives the exported object.
    let lines = pg.psql(&format!("SELECT row_to_json(t)::text FROM {SCHEMA}.{table} t"))?;
    let mirrored = canonical(lines.iter().map(String::as_str))?;
    if exported == mirrored {
        return Ok(None);
    }
    let missing: Vec<&String> = exported.iter().filter(|r| mirrored.binary_search(r).is_err()).collect();
    let extra: Vec<&String> = mirrored.iter().filter(|r| exported.binary_search(r).is_err()).collect();
    Ok(Some(format!(
        "{table}: exported {} rows, PostgreSQL has {}; {} exported rows not in PostgreSQL (first: {:?}); \
         {} PostgreSQL rows not exported (first: {:?})",
        exported.len(),
        mirrored.len(),
        missing.len(),
        missing.first(),
        extra.len(),
        extra.first()
    )))
}

fn differences(pg: &Postgres, dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut diffs = Vec::new();
    for table in TABLES {
        diffs.extend(difference(pg, dir, table)?);
    }
    Ok(diffs)
}

/// Wait until every PostgreSQL table equals the export in `dir`.
fn wait_until_mirrored(pg: &Postgres, dir: &Path, what: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let diffs = differences(pg, dir)?;
        if diffs.is_empty() {
            return Ok(());
        }
        ensure!(
            started.elapsed() < DEADLINE,
            "{what}: PostgreSQL still differs after {DEADLINE:?}:\n{}",
            diffs.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGTERM `sink-0`, require a clean exit, and start it again (with the
/// stack's current environment); return once it is ready.
fn restart_sink(stack: &mut Stack) -> anyhow::Result<()> {
    let sink = stack.processes.iter_mut().find(|p| p.name == "sink-0").context("no sink-0 in the stack")?;
    terminate(&mut sink.child);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = sink.child.try_wait()? {
            break status;
        }
        ensure!(started.elapsed() < DEADLINE, "sink-0 did not stop within {DEADLINE:?} of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure!(status.success(), "sink-0 exited with {status} on SIGTERM; log {}", sink.log.display());
    stack.start_service("sink", 0, 1)?;
    let addr = stack.http("sink-0")?.to_string();
    let started = Instant::now();
    loop {
        if let Some(dead) = stack.exited()? {
            bail!("{dead} while waiting for the restarted sink");
        }
        if let Ok((200, _)) = http_get(&addr, "/readyz") {
            return Ok(());
        }
        // The sink connects to PostgreSQL (for up to a minute) before it serves.
        ensure!(started.elapsed() < DEADLINE * 2, "the restarted sink was not ready within {:?}", DEADLINE * 2);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_postgresql_tables_equal_the_export() -> anyhow::Result<()> {
    let mut pg = Postgres::start()?;
    let set = DataSet::small()?;
    let dir = scratch()?;
    let mut stack = Stack::start(StackConfig::new(&dir.path().join("stack"), &set.data()))?;
    // Every service gets the stack's variables, and the others refuse a
    // `postgres` section: only the sink, restarted, is given the URL.
    stack.config.env.push(("SLUICE_POSTGRES__URL".into(), pg.url()));
    restart_sink(&mut stack)?;

    // PostgreSQL goes away while the data flows: the sink carries on, and
    // its mirror retries until the server is back.
    pg.stop();
    let records = stack.produce(&set.data())?;
    stack.wait_for_sink(records, Duration::from_secs(300))?;
    let got = dir.path().join("got");
    stack.export(&got)?;
    assert_tables_equal(&set.expected(), &got)?;
    pg.run()?;
    wait_until_mirrored(&pg, &got, "rows written after each commit, across an outage")?;

    // Real tables, with their keys as primary keys.
    let keys = pg.psql(&format!(
        "SELECT count(*) FROM information_schema.table_constraints \
         WHERE table_schema = '{SCHEMA}' AND constraint_type = 'PRIMARY KEY'"
    ))?;
    ensure!(keys == ["5"], "expected 5 tables with a primary key in schema {SCHEMA}, found {keys:?}");

    // Lose and spoil rows behind the sink's back; its next start rewrites
    // every row, and its drain writes them all before it exits.
    pg.psql(&format!(
        "DELETE FROM {SCHEMA}.minute WHERE ctid IN (SELECT ctid FROM {SCHEMA}.minute LIMIT 1000); \
         DELETE FROM {SCHEMA}.rejects; \
         UPDATE {SCHEMA}.daily SET events = events + 1, revenue = '{{}}'; \
         UPDATE {SCHEMA}.sessions_per_device SET buckets = '[]'"
    ))?;
    ensure!(!differences(&pg, &got)?.is_empty(), "spoiling the PostgreSQL tables changed nothing");
    restart_sink(&mut stack)?;
    stack.wait_for_sink(records, Duration::from_secs(300))?;
    stack.stop()?;
    let diffs = differences(&pg, &got)?;
    ensure!(diffs.is_empty(), "after a restart and a drain, PostgreSQL differs from the export:\n{}", diffs.join("\n"));
    Ok(())
}

#[test]
fn numbers_compare_exactly_whatever_their_size() -> anyhow::Result<()> {
    let a = exact(r#"{"s":"x\"1","n":170141183460469231731687303715884105727,"m":{"a":-1}}"#)?;
    let b = exact(r#"{"m": {"a": -1}, "n": 170141183460469231731687303715884105727, "s": "x\"1"}"#)?;
    let c = exact(r#"{"s":"x\"1","n":170141183460469231731687303715884105726,"m":{"a":-1}}"#)?;
    ensure!(a == b && a != c, "{a} / {b} / {c}");
    ensure!(canonical(["[1,2]", "[3]"])? == canonical(["[3]", "[1, 2]"])?);
    Ok(())
}
