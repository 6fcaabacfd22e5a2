//! Helpers for end-to-end tests: start the real coordinator and agent binaries on 127.0.0.1,
//! wait for the log lines they print (never a sleep), and show everything on failure.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Paths of the binaries under test; set by the integration tests from `CARGO_BIN_EXE_*`.
pub struct Bins {
    pub coordinator: PathBuf,
    pub agent: PathBuf,
}

/// The binaries under test, in an integration test (where cargo sets `CARGO_BIN_EXE_*`).
#[macro_export]
macro_rules! bins {
    () => {
        $crate::Bins {
            coordinator: ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_e2e-coordinator")),
            agent: ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_e2e-agent")),
        }
    };
}

type Lines = Arc<(Mutex<Vec<String>>, Condvar)>;

/// A child process whose stderr is captured line by line.
pub struct Proc {
    pub name: String,
    pub child: Child,
    lines: Lines,
    cmdline: String,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let cmdline = format!("{cmd:?}");
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmdline}: {e}"));
        let lines: Lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (lock, cv) = &*sink;
                lock.lock().unwrap().push(line);
                cv.notify_all();
            }
        });
        Proc { name: name.to_string(), child, lines, cmdline }
    }

    /// Waits until a log line contains every one of `needles`; returns it.
    pub fn wait_for(&self, needles: &[&str], timeout: Duration) -> String {
        self.wait_for_nth(needles, 1, timeout)
    }

    /// Waits until `n` log lines contain every one of `needles`; returns the n-th.
    pub fn wait_for_nth(&self, needles: &[&str], n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.lines;
        let mut lines = lock.lock().unwrap();
        loop {
            let hits: Vec<&String> = lines.iter().filter(|l| needles.iter().all(|n| l.contains(n))).collect();
            if hits.len() >= n {
                return hits[n - 1].clone();
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                panic!(
                    "{}: no log line with {needles:?} (x{n}) within {timeout:?}\n{}",
                    self.name,
                    self.dump()
                );
            }
            lines = cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    pub fn count(&self, needles: &[&str]) -> usize {
        self.lines.0.lock().unwrap().iter().filter(|l| needles.iter().all(|n| l.contains(n))).count()
    }

    pub fn dump(&self) -> String {
        format!("--- {} ({})\n{}\n---", self.name, self.cmdline, self.lines.0.lock().unwrap().join("\n"))
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for exit; panics with the logs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                panic!("{} did not exit within {timeout:?}\n{}", self.name, self.dump());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.dump());
        }
    }
}

/// Runs `pype-coordinator --state-dir STATE ARGS...` to its end; returns (ok, stdout, stderr).
pub fn cli(bins: &Bins, state: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(&bins.coordinator)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("running pype-coordinator");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A coordinator with its own state dir.
pub struct Coord {
    pub proc: Proc,
    pub state_dir: PathBuf,
    pub addr: SocketAddr,
}

pub const HEARTBEAT_MS: u64 = 200;
pub const T: Duration = Duration::from_secs(20);

impl Coord {
    pub fn start(bins: &Bins, state_dir: &Path, listen: &str) -> Coord {
        Coord::start_with_heartbeat(bins, state_dir, listen, HEARTBEAT_MS)
    }

    pub fn start_with_heartbeat(bins: &Bins, state_dir: &Path, listen: &str, heartbeat_ms: u64) -> Coord {
        let mut cmd = Command::new(&bins.coordinator);
        cmd.arg("--state-dir").arg(state_dir).arg("serve").arg("--listen").arg(listen);
        cmd.arg("--heartbeat-interval-ms").arg(heartbeat_ms.to_string());
        let proc = Proc::spawn("coordinator", cmd);
        let line = proc.wait_for(&["coordinator listening"], T);
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Coord { proc, state_dir: state_dir.to_path_buf(), addr }
    }

    /// Runs a `pype-coordinator` subcommand against this state dir; returns (ok, stdout, stderr).
    pub fn cli(&self, bins: &Bins, args: &[&str]) -> (bool, String, String) {
        cli(bins, &self.state_dir, args)
    }

    pub fn cli_ok(&self, bins: &Bins, args: &[&str]) -> String {
        let (ok, out, err) = self.cli(bins, args);
        assert!(ok, "pype-coordinator {args:?} failed:\n{out}\n{err}\n{}", self.proc.dump());
        out
    }

    pub fn token(&self, bins: &Bins, extra: &[&str]) -> String {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(extra);
        self.cli_ok(bins, &args).trim().to_string()
    }

    pub fn ca(&self) -> PathBuf {
        self.state_dir.join("ca.pem")
    }
}

/// Starts an agent; `token` may be None when its state dir already holds a certificate.
pub fn start_agent(bins: &Bins, coord: &Coord, dir: &Path, name: &str, token: Option<&str>) -> Proc {
    start_agent_env(bins, coord, dir, name, token, &[])
}

/// Like [`start_agent`], with extra environment variables (`PYPE_OVERLAY_MODE`, ...).
pub fn start_agent_env(
    bins: &Bins,
    coord: &Coord,
    dir: &Path,
    name: &str,
    token: Option<&str>,
    env: &[(&str, &str)],
) -> Proc {
    let mut cmd = Command::new(&bins.agent);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.arg("run")
        .arg("--coordinator")
        .arg(coord.addr.to_string())
        .arg("--ca")
        .arg(coord.ca())
        .arg("--state-dir")
        .arg(dir)
        .arg("--name")
        .arg(name)
        .arg("--min-backoff-ms")
        .arg("50")
        .arg("--max-backoff-ms")
        .arg("500");
    if let Some(t) = token {
        cmd.arg("--token").arg(t);
    }
    Proc::spawn(&format!("agent {name}"), cmd)
}

/// A deterministic pseudo-random byte source (xorshift), for test data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// One entry of a tree as compared by the round-trip tests.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub kind: &'static str,
    pub mode: u32,
    pub mtime: i64,
    /// BLAKE3 of file contents, or the link target.
    pub content: String,
}

/// Every entry under `root` (not `root` itself), sorted, with contents hashed.
pub fn manifest(root: &Path) -> Vec<Entry> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let rel_child = rel.join(e.file_name());
            let path = e.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let (kind, content) = if meta.is_dir() {
                stack.push(rel_child.clone());
                ("dir", String::new())
            } else if meta.file_type().is_symlink() {
                ("symlink", std::fs::read_link(&path).unwrap().display().to_string())
            } else {
                let mut h = blake3::Hasher::new();
                h.update_reader(std::fs::File::open(&path).unwrap()).unwrap();
                ("file", h.finalize().to_hex().to_string())
            };
            let mode = if kind == "symlink" { 0 } else { meta.mode() & 0o7777 };
            out.push(Entry { path: rel_child, kind, mode, mtime: meta.mtime(), content });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Connects to `addr` as a raw QUIC client with the given identity and ALPN.
pub async fn connect(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<&transport::pki::CertKey>,
    alpn: &[u8],
) -> anyhow::Result<quinn::Connection> {
    use transport::{endpoint, pki};
    let tuning = endpoint::Tuning::default();
    let ep = endpoint::client(addr, &tuning)?;
    let tls = pki::client_tls(ca_pem, client, alpn)?;
    let conn = ep.connect_with(endpoint::client_config(tls, &tuning)?, addr, "127.0.0.1")?.await?;
    Ok(conn)
}

/// The first message of a hand-made agent: `agent_id` speaking protocol `major`.
pub fn hello(agent_id: &str, major: u32) -> protocol::AgentToCoordinator {
    protocol::AgentToCoordinator::Hello(protocol::Hello {
        protocol_major: major,
        protocol_minor: 0,
        agent_version: "test".into(),
        agent_id: agent_id.into(),
        host: protocol::HostFacts::default(),
        labels: vec![],
        slots: 1,
        instance_id: None,
    })
}

/// Enrolls an identity for the test itself, through the real enrollment path.
pub async fn enroll_identity(
    coord: &Coord,
    b: &Bins,
    dir: &std::path::Path,
    name: &str,
) -> agent::session::Identity {
    let token = coord.token(b, &[]);
    let cfg = agent::session::AgentConfig {
        coordinator: coord.addr.to_string(),
        ca_pem: std::fs::read_to_string(coord.ca()).unwrap(),
        state_dir: dir.to_path_buf(),
        work_dir: dir.join("work"),
        name: Some(name.into()),
        token: Some(token.clone()),
        labels: vec![],
        slots: 1,
        instance_id: None,
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        unpack_limits: Default::default(),
        settings: agent::settings::Settings::from_config(&Default::default(), &dir.join("work")).unwrap(),
        orphan_timeout: None,
        orphan_action: agent::session::OrphanAction::Exit,
        fetch_registry: false,
    };
    agent::session::enroll(&cfg, &token).await.unwrap()
}

/// Waits for `conn` to be closed by the peer and returns the close reason as text.
pub async fn closed_reason(conn: &quinn::Connection, timeout: Duration) -> String {
    match tokio::time::timeout(timeout, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            format!("code {}: {}", c.error_code, String::from_utf8_lossy(&c.reason))
        }
        Ok(other) => other.to_string(),
        Err(_) => "still open".to_string(),
    }
}

/// A real Slurm cluster (tests/slurm/cluster.sh) for as long as it lives.
pub struct Slurm {
    pub dir: tempfile::TempDir,
    /// The cluster's slurm.conf: `SLURM_CONF` for every Slurm command and the coordinator.
    pub conf: PathBuf,
}

impl Slurm {
    /// Starts a two-node cluster, or says loudly why it cannot and returns `None`.
    pub fn start(test: &str) -> Option<Slurm> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("\n!!! SKIPPED {test}: not root (slurmd runs jobs as root here)\n");
            return None;
        }
        for tool in ["munged", "slurmctld", "slurmd", "sbatch"] {
            if Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .output()
                .map_or(true, |o| !o.status.success())
            {
                eprintln!("\n!!! SKIPPED {test}: {tool} is missing (./ci-setup installs slurm)\n");
                return None;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("slurm/cluster.sh");
        let out = Command::new(&script).arg("start").arg(dir.path()).arg("2").output().unwrap();
        assert!(
            out.status.success(),
            "starting slurm: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = dir.path().join("slurm.conf");
        Some(Slurm { dir, conf })
    }

    pub fn cmd(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// `squeue`: one `JOBID NAME STATE` line per job.
    pub fn jobs(&self) -> String {
        let out = self.cmd("squeue").args(["-h", "-o", "%i %j %T"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("slurm/cluster.sh");
        let _ = Command::new(script).arg("stop").arg(self.dir.path()).status();
    }
}

/// The run id in a coordinator log line (`run=...`).
pub fn run_id(line: &str) -> String {
    line.split("run=").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().trim_matches('"').to_string()
}

/// The agent named in a coordinator log line (`agent="..."`).
pub fn agent_of(line: &str) -> String {
    line.split("agent=").nth(1).unwrap().split_whitespace().next().unwrap().trim_matches('"').to_string()
}

/// moto's server (AWS API emulator) on 127.0.0.1, from the venv `ci-setup` installs.
pub struct Moto {
    pub proc: Proc,
    /// `http://HOST:PORT`
    pub endpoint: String,
}

/// Dummy credentials for moto: a secret that must never show up in user-data.
pub const MOTO_SECRET: &str = "moto-dummy-secret-not-for-user-data";

impl Moto {
    /// Starts moto_server on `host` (a free port), or says loudly why not and returns `None`.
    pub fn start_on(test: &str, host: &str) -> Option<Moto> {
        let venv = std::env::var_os("PYPE_MOTO_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-moto"));
        let bin = venv.join("bin/moto_server");
        if !bin.exists() {
            eprintln!(
                "\n!!! SKIPPED {test}: {} is missing (./ci-setup installs moto[server])\n",
                bin.display()
            );
            return None;
        }
        let port = std::net::TcpListener::bind((host, 0)).unwrap().local_addr().unwrap().port();
        let mut cmd = Command::new(bin);
        cmd.args(["-H", host, "-p", &port.to_string()]);
        let proc = Proc::spawn("moto", cmd);
        proc.wait_for(&["Running on"], T);
        Some(Moto { proc, endpoint: format!("http://{host}:{port}") })
    }

    pub fn start(test: &str) -> Option<Moto> {
        Self::start_on(test, "127.0.0.1")
    }

    /// The environment a coordinator talking to moto runs with: dummy credentials through the
    /// standard chain (environment variables), no instance metadata lookups, no profile files.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", MOTO_SECRET.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("AWS_CONFIG_FILE", "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
        ]
    }

    /// Creates an IAM instance profile (moto routes by the credential scope; it does not check
    /// signatures).
    pub fn create_instance_profile(&self, name: &str) {
        let out = Command::new("curl")
            .args(["-sS", "-f", "-X", "POST", &self.endpoint])
            .args(["-H", "Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0"])
            .args(["--data", &format!("Action=CreateInstanceProfile&InstanceProfileName={name}&Version=2010-05-08")])
            .output()
            .expect("running curl");
        assert!(out.status.success(), "CreateInstanceProfile: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn http() -> aws_sdk_ec2::config::SharedHttpClient {
        use aws_smithy_http_client::tls;
        aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .build_https()
    }

    /// An EC2 client on moto, for the test's own look at what the coordinator did.
    pub fn ec2(&self) -> aws_sdk_ec2::Client {
        let conf = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .credentials_provider(Self::credentials())
            .http_client(Self::http())
            .build();
        aws_sdk_ec2::Client::from_conf(conf)
    }

    /// The dummy credentials moto takes (one type behind both SDKs' re-exports).
    fn credentials() -> aws_sdk_s3::config::Credentials {
        aws_sdk_s3::config::Credentials::new("testing", MOTO_SECRET, None, None, "moto")
    }

    pub fn s3(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(Self::credentials())
            .http_client(Self::http())
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }
}

/// A Linux bridge in this network namespace with one network namespace per "host" behind it
/// (veth pairs): hosts reach this namespace at [`Lan::gateway`], and nothing else.
pub struct Lan {
    bridge: String,
    net: u8,
    hosts: Mutex<Vec<String>>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Lan {
    /// A new bridge, or `None` (said loudly) when this process may not make one.
    pub fn new(test: &str) -> Option<Lan> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("\n!!! SKIPPED {test}: not root (network namespaces need it)\n");
            return None;
        }
        let net = 100 + (std::process::id() % 100) as u8 + (rand::random::<u8>() % 50);
        let bridge = format!("pbr{}-{}", std::process::id() % 10000, rand::random::<u16>() % 1000);
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("10.213.{net}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        Some(Lan { bridge, net, hosts: Mutex::new(Vec::new()) })
    }

    pub fn gateway(&self) -> String {
        format!("10.213.{}.1", self.net)
    }

    /// A new namespace on the bridge; returns its name.
    pub fn host(&self) -> String {
        let mut hosts = self.hosts.lock().unwrap();
        let n = hosts.len() + 10;
        let ns = format!("{}-h{n}", self.bridge);
        let veth = format!("pv{}-{n}", &self.bridge[3..]);
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        ip(&["link", "set", &veth, "master", &self.bridge, "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("10.213.{}.{n}/24", self.net), "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        hosts.push(ns.clone());
        ns
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.hosts.lock().map(|h| h.clone()).unwrap_or_default() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// Copies the shipped example pipeline and its profile into `dir`; returns the pipeline.
pub fn example_in(dir: &Path) -> PathBuf {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/genome-stats");
    for f in ["pipeline.toml", "profile.toml"] {
        std::fs::copy(example.join(f), dir.join(f)).unwrap();
    }
    dir.join("pipeline.toml")
}
