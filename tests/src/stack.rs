//! A local distributed stack: a real nats-server with JetStream, a real
//! Kafka-protocol broker (tansu), and the four services as separate
//! processes, on free loopback ports, each logging to a file.
//!
//! Used by the end-to-end tests and by `sluice-stack` (`just up`, `just down`,
//! `just e2e`). Every wait has a deadline and says what it waited for.
//! nats-server and tansu are found on `PATH` (or `~/.cargo/bin`); the test
//! tooling (`scripts/servers.sh`) installs them on a fresh machine.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

/// How long a server or service may take to become ready.
pub const READY_DEADLINE: Duration = Duration::from_secs(60);

/// What to start.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Where state, logs and server data go.
    pub root: PathBuf,
    /// Workload directory (dimension tables for enrich).
    pub data: PathBuf,
    /// Instances of enrich.
    pub enrich: usize,
    /// Instances of window.
    pub window: usize,
    /// Key groups P.
    pub key_groups: u32,
    /// Extra `SLUICE_*` variables, each given to the services that read its section.
    pub env: Vec<(String, String)>,
    /// Start a PostgreSQL server too, and have the sink mirror its tables into it.
    pub postgres: bool,
    /// Where the Kafka broker keeps its records.
    pub kafka_storage: KafkaStorage,
    /// Extra `SLUICE_*` variables for one process only, by its name
    /// (`sink-0`), after `env`; kept for its restarts.
    pub per_service: std::collections::BTreeMap<String, Vec<(String, String)>>,
    /// Source, enrich and window hold their units by lease
    /// (`service.ownership = "leases"`); the sink stays static.
    pub leases: bool,
    /// nats-server fsyncs every write before acknowledging it
    /// (`sync_interval: always`): what surviving its SIGKILL with nothing
    /// lost asks of a single server (docs/exactly-once.md).
    pub nats_sync_always: bool,
    /// Every service reaches NATS through a link of its own, and every Kafka
    /// client (the source, the producer) reaches the broker through one link:
    /// fault-injecting proxies ([`crate::proxy`]) the fault harness cuts.
    pub links: bool,
}

/// The Kafka broker's storage engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaStorage {
    /// tansu's in-memory store: fastest; lost when the broker stops. It
    /// answers a fetch from an offset inside a stored record batch with the
    /// batches after it, skipping the rest of that batch: only for stacks
    /// whose source never restarts at a committed offset (docs/distributed.md).
    Memory,
    /// tansu's SQLite store under the stack's root: survives a broker restart
    /// (the fault harness restarts it), several times slower.
    Sqlite,
}

impl StackConfig {
    /// One instance of each stage, P = 64, under `root`.
    pub fn new(root: &Path, data: &Path) -> Self {
        Self {
            root: root.into(),
            data: data.into(),
            enrich: 1,
            window: 1,
            key_groups: 64,
            env: Vec::new(),
            postgres: false,
            kafka_storage: KafkaStorage::Memory,
            per_service: Default::default(),
            leases: std::env::var(LEASES_VAR).is_ok_and(|v| v == "1"),
            nats_sync_always: false,
            links: false,
        }
    }
}

/// `SLUICE_STACK_LEASES=1`: stacks start with [`StackConfig::leases`] (for
/// `sluice-stack up`, `e2e`, `bench` and the A/B script's `A_ENV`).
pub const LEASES_VAR: &str = "SLUICE_STACK_LEASES";

/// A running process of the stack.
pub struct Process {
    /// `nats`, `kafka`, `source-0`, `enrich-1`, ...
    pub name: String,
    /// The child.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
    /// Its HTTP address (services only).
    pub http: Option<String>,
    /// Its gRPC address (enrich only).
    pub grpc: Option<String>,
    /// For a service: its stage, instance index and instance count.
    pub instance: Option<(String, usize, usize)>,
}

/// A running stack. Dropping it kills whatever still runs.
pub struct Stack {
    /// The configuration it was started with.
    pub config: StackConfig,
    /// NATS URL.
    pub nats_url: String,
    /// nats-server's monitoring address (`/jsz`: stream sizes).
    pub nats_monitor: String,
    /// Kafka bootstrap address.
    pub brokers: String,
    /// Processes, servers first.
    pub processes: Vec<Process>,
    /// The PostgreSQL server the sink mirrors into, when asked for.
    pub postgres: Option<crate::postgres::Postgres>,
    /// With [`StackConfig::links`]: each service's link to NATS (by its
    /// name, `enrich-1`), and the broker's link to its clients (`kafka`).
    /// A link outlives restarts of its process.
    pub links: std::collections::BTreeMap<String, crate::proxy::Proxy>,
}

/// How long a service may take to drain and exit after SIGTERM.
pub const SERVICE_STOP_DEADLINE: Duration = Duration::from_secs(10);

/// The order a stack stops in: input first, so every service drains what
/// its upstream sent before it stops; servers last.
pub const STOP_ORDER: [&str; 7] = ["source", "enrich", "window", "sink", "postgres", "kafka", "nats"];

/// A free loopback port (bound and released: another process could take it
/// in between, which the readiness wait then reports).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The directory of the workspace's binaries (`sluice`, `sluice-source`, ...):
/// `SLUICE_BIN_DIR`, else next to this executable (or its parent, for a test
/// binary in `deps/`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SLUICE_BIN_DIR") {
        return Ok(dir.into());
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut dir = exe.parent().context("executable without a directory")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// A binary of the workspace; an error naming how to build it when missing.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    ensure!(
        path.is_file(),
        "{} is missing: build the workspace's binaries first (cargo build --workspace --bins)",
        path.display()
    );
    Ok(path)
}

/// An external server binary: from the test tooling's own servers
/// (`SLUICE_SERVERS_DIR/bin`, default `~/.cache/sluice-servers/bin`, where
/// `scripts/servers.sh` puts the pinned nats-server), else `PATH`,
/// `/usr/sbin` or `~/.cargo/bin`.
pub fn server_binary(name: &str) -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let own = std::env::var_os("SLUICE_SERVERS_DIR")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".cache/sluice-servers")));
    let mut dirs: Vec<PathBuf> = own.map(|d| d.join("bin")).into_iter().collect();
    dirs.extend(std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default());
    dirs.push("/usr/sbin".into());
    if let Some(home) = home {
        dirs.push(home.join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found on PATH: run `bash scripts/servers.sh` to install the test servers"))
}

/// Wait until `addr` accepts TCP connections.
pub fn wait_for_port(addr: &str, what: &str, deadline: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    while TcpStream::connect(addr).is_err() {
        ensure!(started.elapsed() < deadline, "{what} did not listen on {addr} within {deadline:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// GET `path` from `addr` over plain HTTP/1.1: (status, body).
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text).with_context(|| format!("reading GET {path} from {addr}"))?;
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    let body = if chunked {
        dechunk(body).with_context(|| format!("GET {path} from {addr}: bad chunked body"))?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// The payload of a `Transfer-Encoding: chunked` body (nats-server's
/// monitoring answers so).
fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("no chunk size line")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or_default().trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        ensure!(rest.len() >= size + 2, "a chunk is cut short");
        out.push_str(rest.get(..size).context("a chunk splits a character")?);
        body = &rest[size + 2..];
    }
}

impl Stack {
    /// Start nats-server, tansu and the services; return once every one is ready.
    pub fn start(config: StackConfig) -> anyhow::Result<Stack> {
        let root = &config.root;
        std::fs::create_dir_all(root.join("logs")).context("creating the stack directory")?;
        let nats_port = free_port()?;
        let kafka_port = free_port()?;
        let mut stack = Stack {
            nats_url: format!("nats://127.0.0.1:{nats_port}"),
            nats_monitor: format!("127.0.0.1:{}", free_port()?),
            brokers: format!("127.0.0.1:{kafka_port}"),
            processes: Vec::new(),
            config: config.clone(),
            postgres: None,
            links: Default::default(),
        };
        if config.links {
            // Clients learn the broker's address from its metadata: it
            // advertises the link, so every Kafka connection goes through it.
            let link = crate::proxy::Proxy::start(stack.brokers.parse().context("the broker's address")?)?;
            stack.brokers = link.addr().to_string();
            stack.links.insert("kafka".into(), link);
        }
        if config.postgres {
            let pg = crate::postgres::Postgres::start_in(&root.join("postgres"))?;
            stack.config.env.push(("SLUICE_POSTGRES__URL".into(), pg.url()));
            stack.postgres = Some(pg);
        }
        stack.start_server("nats")?;
        stack.start_server("kafka")?;

        let (e, w) = (config.enrich, config.window);
        for (stage, instances) in [("sink", 1), ("window", w), ("enrich", e), ("source", 1)] {
            for i in 0..instances {
                stack.start_service(stage, i, instances)?;
            }
        }
        for p in &stack.processes {
            if let Some(addr) = &p.http {
                wait_ready(addr, &p.name, &p.log)?;
            }
            if let Some(addr) = &p.grpc {
                wait_for_port(addr, &format!("{} (gRPC)", p.name), READY_DEADLINE)?;
            }
        }
        Ok(stack)
    }

    /// Start (or restart) a server: `nats` or `kafka`, on the stack's port
    /// and data directory, and wait until it listens.
    pub fn start_server(&mut self, name: &str) -> anyhow::Result<()> {
        let root = self.config.root.clone();
        match name {
            "nats" => {
                // nats-server with JetStream; max_payload above the batches' limit.
                let addr = self.nats_url.trim_start_matches("nats://").to_string();
                let nats_conf = root.join("nats.conf");
                let sync = if self.config.nats_sync_always { "  sync_interval: always\n" } else { "" };
                std::fs::write(
                    &nats_conf,
                    format!(
                        "listen: {addr}\nhttp: {}\nmax_payload: 8MB\njetstream {{\n  store_dir: \"{}\"\n{sync}}}\n",
                        self.nats_monitor,
                        root.join("nats").display()
                    ),
                )?;
                let mut cmd = Command::new(server_binary("nats-server")?);
                cmd.arg("-c").arg(&nats_conf);
                self.processes.retain(|p| p.name != name);
                self.spawn("nats", cmd, None)?;
                wait_for_port(&addr, "nats-server", READY_DEADLINE)
            }
            "kafka" => {
                // With links, the broker listens behind its link and advertises the link.
                let advertised = format!("tcp://{}", self.brokers);
                let url = match self.links.get("kafka") {
                    Some(link) => format!("tcp://{}", link.upstream()),
                    None => advertised.clone(),
                };
                let storage = match self.config.kafka_storage {
                    KafkaStorage::Memory => "memory://tansu/".to_string(),
                    KafkaStorage::Sqlite => "sqlite://tansu.db".to_string(),
                };
                let dir = root.join("kafka");
                std::fs::create_dir_all(&dir)?;
                let mut cmd = Command::new(server_binary("tansu")?);
                // The SQLite path is relative to the working directory.
                cmd.current_dir(&dir).args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &advertised,
                    "--storage-engine",
                    &storage,
                ]);
                self.processes.retain(|p| p.name != name);
                self.spawn("kafka", cmd, None)?;
                wait_for_port(url.trim_start_matches("tcp://"), "tansu", READY_DEADLINE)
            }
            _ => bail!("no server named {name}"),
        }
    }

    /// SIGTERM a server (`nats`, `kafka`), wait for it, start it again with
    /// its data kept (for `kafka`, only with [`KafkaStorage::Sqlite`]: the
    /// in-memory store starts empty).
    pub fn restart_server(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self.processes.iter_mut().find(|p| p.name == name).with_context(|| format!("no server {name}"))?;
        terminate(&mut p.child);
        let started = Instant::now();
        while p.child.try_wait()?.is_none() {
            if started.elapsed() > Duration::from_secs(30) {
                let _ = p.child.kill();
                let _ = p.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.start_server(name)
    }

    /// SIGKILL a server (`nats`, `kafka`) and reap it; [`Stack::start_server`]
    /// starts it again on its data.
    pub fn kill_server(&mut self, name: &str) -> anyhow::Result<()> {
        self.kill(name)?;
        self.processes.retain(|p| p.name != name);
        Ok(())
    }

    /// SIGKILL a process of the stack (`source-0`, `nats`, ...) and reap it.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self.processes.iter_mut().find(|p| p.name == name).with_context(|| format!("no process {name}"))?;
        p.child.kill().with_context(|| format!("killing {name}"))?;
        p.child.wait().with_context(|| format!("reaping {name}"))?;
        Ok(())
    }

    /// Stop service `name` for good: SIGTERM (a drain; waiting at most
    /// [`SERVICE_STOP_DEADLINE`], then SIGKILL) or SIGKILL, and forget it.
    /// Returns whether a SIGTERM'd service exited 0.
    pub fn remove_service(&mut self, name: &str, graceful: bool) -> anyhow::Result<bool> {
        let at = self.processes.iter().position(|p| p.name == name).with_context(|| format!("no process {name}"))?;
        let mut p = self.processes.remove(at);
        if !graceful {
            p.child.kill().with_context(|| format!("killing {name}"))?;
            p.child.wait().with_context(|| format!("reaping {name}"))?;
            return Ok(false);
        }
        terminate(&mut p.child);
        let started = Instant::now();
        loop {
            if let Some(status) = p.child.try_wait()? {
                return Ok(status.success());
            }
            if started.elapsed() > SERVICE_STOP_DEADLINE {
                let _ = p.child.kill();
                let _ = p.child.wait();
                bail!("{name} did not exit within {SERVICE_STOP_DEADLINE:?} of SIGTERM; log: {}", p.log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start a service again as it was (same instance, state directory and
    /// share), on a new HTTP port.
    pub fn restart_service(&mut self, name: &str) -> anyhow::Result<()> {
        let (stage, i, n) = self
            .processes
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.instance.clone())
            .with_context(|| format!("no service {name}"))?;
        self.start_service(&stage, i, n)
    }

    /// The names of the services, in start order.
    pub fn services(&self) -> Vec<String> {
        self.processes.iter().filter(|p| p.instance.is_some()).map(|p| p.name.clone()).collect()
    }

    /// Wait until service `name` answers `/readyz` (a deadline of
    /// [`READY_DEADLINE`]).
    pub fn wait_ready(&self, name: &str) -> anyhow::Result<()> {
        let p = self.processes.iter().find(|p| p.name == name).with_context(|| format!("no service {name}"))?;
        wait_ready(p.http.as_deref().with_context(|| format!("{name} has no HTTP address"))?, name, &p.log)
    }

    /// The process id of `name` (a server or a service), while it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.processes.iter().find(|p| p.name == name).map(|p| p.child.id())
    }

    /// Bytes held by each JetStream stream, by name, from nats-server's
    /// monitoring endpoint.
    pub fn stream_bytes(&self) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let (status, body) = http_get(&self.nats_monitor, "/jsz?accounts=true&streams=true")?;
        ensure!(status == 200, "nats-server /jsz answered {status}");
        let v: serde_json::Value = serde_json::from_str(&body).context("parsing /jsz")?;
        let mut out = std::collections::BTreeMap::new();
        for account in v.get("account_details").and_then(|a| a.as_array()).into_iter().flatten() {
            for stream in account.get("stream_detail").and_then(|s| s.as_array()).into_iter().flatten() {
                let name = stream.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_string();
                let bytes = stream.pointer("/state/bytes").and_then(|b| b.as_u64()).unwrap_or(0);
                out.insert(name, bytes);
            }
        }
        Ok(out)
    }

    /// Whether a service answers `/readyz` with 200.
    pub fn is_ready(&self, name: &str) -> bool {
        self.http(name).is_ok_and(|addr| matches!(http_get(addr, "/readyz"), Ok((200, _))))
    }

    /// Input records the sink's tables account for (0 while it does not answer).
    pub fn covered(&self) -> u64 {
        self.http("sink-0")
            .ok()
            .and_then(|addr| http_get(addr, "/progress").ok())
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|v| v.get("covered_records").and_then(serde_json::Value::as_u64))
            .unwrap_or(0)
    }

    /// Records the background producer ([`Stack::spawn_producer`]) has
    /// handed to Kafka, as its log last said (0 before its first line).
    pub fn produced_so_far(&self) -> u64 {
        let log = std::fs::read_to_string(self.config.root.join("logs").join("produce.log")).unwrap_or_default();
        log.rsplit("produced ").find_map(|tail| tail.split(' ').next()?.parse().ok()).unwrap_or(0)
    }

    /// Start `sluice produce` in the background for the records `range` (by
    /// line), at most `rate` records/s (0: unlimited); its stdout is piped
    /// (`produced N` at the end).
    pub fn spawn_producer(&self, data: &Path, rate: u64, range: std::ops::Range<u64>) -> anyhow::Result<Child> {
        let log = self.config.root.join("logs").join("produce.log");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let (skip, limit) = (range.start.to_string(), range.end.saturating_sub(range.start).to_string());
        Command::new(binary("sluice")?)
            .args(["produce", "--brokers", &self.brokers, "--rate", &rate.to_string()])
            .args(["--skip", &skip, "--limit", &limit, "--data"])
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .context("starting sluice produce")
    }

    fn spawn(&mut self, name: &str, mut cmd: Command, http: Option<String>) -> anyhow::Result<()> {
        let log = self.config.root.join("logs").join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        self.processes.push(Process { name: name.into(), child, log, http, grpc: None, instance: None });
        Ok(())
    }

    /// Start instance `i` of `n` of `stage` (also used to restart one).
    pub fn start_service(&mut self, stage: &str, i: usize, n: usize) -> anyhow::Result<()> {
        self.start_named(&format!("{stage}-{i}"), stage, i, n)
    }

    /// Start instance `i` of `n` of `stage` as process `name`, with the state
    /// directory of that name: a second process of one instance (a zombie)
    /// when `name` is not `stage-i`.
    pub fn start_named(&mut self, name: &str, stage: &str, i: usize, n: usize) -> anyhow::Result<()> {
        let name = name.to_string();
        let http = format!("127.0.0.1:{}", free_port()?);
        let state = self.config.root.join("state").join(&name);
        let mut cmd = Command::new(binary(&format!("sluice-{stage}"))?);
        let mut grpc = None;
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("SLUICE_LOG", std::env::var("SLUICE_LOG").unwrap_or_else(|_| "info".into()))
            .env("SLUICE_PIPELINE__KEY_GROUPS", self.config.key_groups.to_string())
            .env("SLUICE_SERVICE__INSTANCE", i.to_string())
            .env("SLUICE_SERVICE__INSTANCES", n.to_string())
            .env("SLUICE_SERVICE__STATE_DIR", &state)
            .env("SLUICE_SERVICE__LISTEN", &http)
            .env("SLUICE_NATS__URL", &self.nats_url)
            // The member name of an instance holding leases (its pod name on Kubernetes).
            .env("SLUICE_INSTANCE_NAME", &name);
        if self.config.links {
            if !self.links.contains_key(&name) {
                let nats = self.nats_url.trim_start_matches("nats://").parse().context("the NATS address")?;
                self.links.insert(name.clone(), crate::proxy::Proxy::start(nats)?);
            }
            if let Some(link) = self.links.get(&name) {
                cmd.env("SLUICE_NATS__URL", format!("nats://{}", link.addr()));
            }
        }
        match stage {
            "source" => {
                cmd.env("SLUICE_KAFKA__BROKERS", &self.brokers);
            }
            "enrich" => {
                grpc = Some(format!("127.0.0.1:{}", free_port()?));
                cmd.env("SLUICE_DIMENSIONS__DIR", &self.config.data)
                    .env("SLUICE_GRPC__LISTEN", grpc.as_deref().unwrap_or_default());
            }
            _ => {}
        }
        // Settings from the caller's environment and the configuration, each
        // given only to the services that have its section.
        if self.config.leases && stage != "sink" {
            cmd.env("SLUICE_SERVICE__OWNERSHIP", "leases");
        }
        let inherited =
            std::env::vars().filter(|(k, _)| k.starts_with("SLUICE_") && k != "SLUICE_LOG" && k != LEASES_VAR);
        let own = self.config.per_service.get(&name).cloned().unwrap_or_default();
        for (k, v) in inherited.chain(self.config.env.iter().cloned()).chain(own) {
            if setting_applies(&k, stage) {
                cmd.env(k, v);
            }
        }
        self.processes.retain(|p| p.name != name);
        self.spawn(&name, cmd, Some(http))?;
        if let Some(p) = self.processes.last_mut() {
            p.grpc = grpc;
            p.instance = Some((stage.to_string(), i, n));
        }
        Ok(())
    }

    /// The gRPC address of an enrich instance (`enrich-0`, ...).
    pub fn grpc(&self, name: &str) -> anyhow::Result<&str> {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.grpc.as_deref())
            .with_context(|| format!("no gRPC address for {name}"))
    }

    /// The HTTP address of a service (`sink-0`, ...).
    pub fn http(&self, name: &str) -> anyhow::Result<&str> {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.http.as_deref())
            .with_context(|| format!("no service {name}"))
    }

    /// The sink's base URL.
    pub fn sink_url(&self) -> anyhow::Result<String> {
        Ok(format!("http://{}", self.http("sink-0")?))
    }

    /// `sluice produce` the data set's records into the stack's Kafka; the
    /// number of records produced.
    pub fn produce(&self, data: &Path) -> anyhow::Result<u64> {
        let out = Command::new(binary("sluice")?)
            .args(["produce", "--brokers", &self.brokers, "--data"])
            .arg(data)
            .stderr(Stdio::inherit())
            .output()
            .context("running sluice produce")?;
        ensure!(out.status.success(), "sluice produce failed: {}", out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .strip_prefix("produced ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("sluice produce said {text:?}"))
    }

    /// Wait until the sink's tables account for `records` input records.
    pub fn wait_for_sink(&mut self, records: u64, deadline: Duration) -> anyhow::Result<()> {
        self.http("sink-0")?;
        let started = Instant::now();
        loop {
            if let Some(dead) = self.exited()? {
                bail!("{dead} while waiting for the sink; see its log");
            }
            let covered = self.covered();
            if covered >= records {
                ensure!(covered == records, "the sink covers {covered} records, more than the {records} produced");
                return Ok(());
            }
            ensure!(
                started.elapsed() < deadline,
                "the sink covers {covered} of {records} records after {deadline:?}; logs are in {}",
                self.config.root.join("logs").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `sluice export --sink` into `out`.
    pub fn export(&self, out: &Path) -> anyhow::Result<()> {
        let status = Command::new(binary("sluice")?)
            .args(["export", "--sink", &self.sink_url()?, "--out"])
            .arg(out)
            .stdout(Stdio::null())
            .status()
            .context("running sluice export")?;
        ensure!(status.success(), "sluice export --sink failed: {status}");
        Ok(())
    }

    /// A process that has exited, described, if any.
    pub fn exited(&mut self) -> anyhow::Result<Option<String>> {
        for p in &mut self.processes {
            if let Some(status) = p.child.try_wait()? {
                return Ok(Some(format!("{} exited ({status}); log {}", p.name, p.log.display())));
            }
        }
        Ok(None)
    }

    /// SIGTERM the services, upstream first, each waited for (exit 0 within
    /// [`SERVICE_STOP_DEADLINE`] required), then the servers.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        for stage in STOP_ORDER {
            for p in self.processes.iter_mut().filter(|p| p.name == stage || p.name.starts_with(&format!("{stage}-"))) {
                terminate(&mut p.child);
                let is_service = p.http.is_some();
                // Services must drain and exit within 10 s (their default
                // drain timeout is 8 s); servers get longer.
                let deadline = if is_service { SERVICE_STOP_DEADLINE } else { Duration::from_secs(30) };
                let started = Instant::now();
                let status = loop {
                    if let Some(s) = p.child.try_wait()? {
                        break Some(s);
                    }
                    if started.elapsed() > deadline {
                        let _ = p.child.kill();
                        let _ = p.child.wait();
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                match status {
                    Some(s) if s.success() || !is_service => {}
                    Some(s) => {
                        failures.push(format!("{} exited with {s} on SIGTERM (log {})", p.name, p.log.display()))
                    }
                    None => failures.push(format!("{} did not stop within {deadline:?} of SIGTERM", p.name)),
                }
            }
        }
        self.processes.clear();
        if let Some(mut pg) = self.postgres.take() {
            pg.stop();
        }
        ensure!(failures.is_empty(), "{}", failures.join("; "));
        Ok(())
    }
}

/// Whether the setting variable `key` (`SLUICE_<SECTION>__...`) belongs to
/// a section `stage`'s service reads: services refuse unknown sections.
pub fn setting_applies(key: &str, stage: &str) -> bool {
    let Some(section) = key.strip_prefix("SLUICE_").and_then(|k| k.split("__").next()) else { return false };
    let section = section.to_ascii_lowercase();
    match section.as_str() {
        "pipeline" | "service" | "nats" | "state" => true,
        "source" | "kafka" => stage == "source",
        "enrich" | "dimensions" | "grpc" => stage == "enrich",
        "postgres" => stage == "sink",
        _ => false,
    }
}

/// Send SIGTERM to `child`.
pub fn terminate(child: &mut Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
}

fn wait_ready(addr: &str, name: &str, log: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = http_get(addr, "/readyz") {
            return Ok(());
        }
        if started.elapsed() > READY_DEADLINE {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(20).collect();
            bail!(
                "{name} was not ready within {READY_DEADLINE:?}; its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for p in &mut self.processes {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}
