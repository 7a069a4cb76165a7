//! A real PostgreSQL server for the sink's PostgreSQL mode: a new cluster
//! (initdb) in a directory, trust auth on 127.0.0.1, a free port; run as
//! the `postgres` system user when this process is root (initdb refuses
//! root). Used by the PostgreSQL test and by `sluice-stack up --postgres`.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::stack::free_port;

/// How long PostgreSQL may take to accept queries.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A PostgreSQL server in a directory; dropping it stops the server
/// (unless [`Postgres::detach`]ed).
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    /// (uid, gid) to run initdb and postgres as (when this test runs as root).
    user: Option<(u32, u32)>,
    /// The postmaster, while it runs.
    server: Option<Child>,
    log: PathBuf,
    dir: PathBuf,
    /// Removes a scratch directory when dropped (tests).
    _scratch: Option<tempfile::TempDir>,
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
    /// A new cluster (initdb) in a scratch directory on a free port, started.
    pub fn start() -> anyhow::Result<Self> {
        let scratch = crate::scratch()?;
        let mut pg = Self::start_in(scratch.path())?;
        pg._scratch = Some(scratch);
        Ok(pg)
    }

    /// A new cluster (initdb) in `dir` (created) on a free port, started.
    pub fn start_in(dir: &Path) -> anyhow::Result<Self> {
        let bin = postgres_bin()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let root = std::fs::metadata("/proc/self").context("reading /proc/self")?.uid() == 0;
        // initdb and postgres refuse to run as root: then run them as `postgres`, in a dir it owns.
        let user = if root {
            let ids = (id_of("-u", "postgres")?, id_of("-g", "postgres")?);
            std::os::unix::fs::chown(dir, Some(ids.0), Some(ids.1)).context("handing the temp dir to postgres")?;
            Some(ids)
        } else {
            None
        };
        let (data, log) = (dir.join("data"), dir.join("postgres.log"));
        let mut pg =
            Self { bin, data, port: free_port()?, user, server: None, log, dir: dir.to_owned(), _scratch: None };
        let mut initdb = pg.command("initdb");
        initdb.arg("-D").arg(&pg.data).args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"]);
        let out = initdb.output().context("running initdb")?;
        ensure!(out.status.success(), "initdb failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        pg.run()?;
        Ok(pg)
    }

    /// One of the server binaries, run as the server's user.
    pub fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(name));
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Start the server (again) and wait until it answers queries.
    pub fn run(&mut self) -> anyhow::Result<()> {
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
    pub fn stop(&mut self) {
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

    /// Its connection URL.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run `sql`; the rows, one line each, columns `|`-separated.
    pub fn psql(&self, sql: &str) -> anyhow::Result<Vec<String>> {
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

impl Postgres {
    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }

    /// Leave the server running when this is dropped (`sluice-stack up`).
    pub fn detach(mut self) -> Option<u32> {
        let pid = self.pid();
        self.server = None;
        self._scratch = None;
        pid
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
