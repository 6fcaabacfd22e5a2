//! Real outside services a test may need, each started per test or skipped loudly
//! ([`crate::skip`]): a Slurm cluster, moto's AWS API emulator, a bridge with network
//! namespaces behind it.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use crate::{Proc, T};

/// A real Slurm cluster (tests/slurm/cluster.sh) for as long as it lives.
pub struct Slurm {
    pub dir: tempfile::TempDir,
    /// The cluster's slurm.conf: `SLURM_CONF` for every Slurm command and the coordinator.
    pub conf: PathBuf,
}

impl Slurm {
    /// Starts a two-node cluster, or says loudly why it cannot and returns `None`.
    pub fn start(test: &str) -> Option<Slurm> {
        if !crate::require_root(test, "slurmd runs jobs as root here") {
            return None;
        }
        for tool in ["munged", "slurmctld", "slurmd", "sbatch"] {
            if !crate::have(tool) {
                crate::skip(test, &format!("{tool} is missing"), "./ci-setup installs slurm");
                return None;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let script = crate::repo().join("tests/slurm/cluster.sh");
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
        let script = crate::repo().join("tests/slurm/cluster.sh");
        let _ = Command::new(script).arg("stop").arg(self.dir.path()).status();
    }
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
            .unwrap_or_else(|| crate::repo().join(".venv-moto"));
        let bin = venv.join("bin/moto_server");
        if !bin.exists() {
            crate::skip(test, &format!("{} is missing", bin.display()), "./ci-setup installs moto[server]");
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
        if !crate::require_root(test, "network namespaces need it") {
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

/// One sample of a scraped OpenMetrics page, as prometheus_client's parser read it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Sample {
    pub family: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// `None` for a family declared without samples yet.
    pub value: Option<f64>,
}

/// A scraped page, parsed: its samples, and every family it declares (`# TYPE` lines: a
/// family may have no sample yet), with counters also under their `_total` name.
#[derive(Debug, Clone)]
pub struct Scrape(pub Vec<Sample>, pub std::collections::BTreeSet<String>);

impl Scrape {
    /// The value of sample `name` whose labels include every `(key, value)` of `labels`,
    /// summed when several match; 0 when none does.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|s| {
                s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .filter_map(|s| s.value)
            .sum()
    }

    /// Whether the page has sample `name` at all.
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|s| s.name == name)
    }
}

/// Parses OpenMetrics text with Python's prometheus_client (from the tools venv `ci-setup`
/// installs), or says loudly why not and returns `None`.
pub struct OpenMetricsParser {
    python: PathBuf,
}

impl OpenMetricsParser {
    pub fn find(test: &str) -> Option<Self> {
        let venv = std::env::var_os("PYPE_MOTO_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::repo().join(".venv-moto"));
        let python = venv.join("bin/python");
        let ok = Command::new(&python)
            .args(["-c", "import prometheus_client"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            crate::skip(
                test,
                &format!("prometheus_client in {} is missing", venv.display()),
                "./ci-setup installs it",
            );
            return None;
        }
        Some(Self { python })
    }

    /// GETs `http://ADDR/metrics` and parses it; panics on a page the parser refuses.
    pub fn scrape(&self, addr: &str) -> Scrape {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer: {raw}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
        self.parse(body)
    }

    pub fn parse(&self, text: &str) -> Scrape {
        use std::io::Write;
        let mut child = Command::new(&self.python)
            .arg(crate::repo().join("tests/metrics/parse.py"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "prometheus_client refused the page: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut declared = std::collections::BTreeSet::new();
        for l in text.lines() {
            if let Some([name, kind]) =
                l.strip_prefix("# TYPE ").map(|r| r.split_whitespace().collect::<Vec<_>>()).as_deref()
            {
                declared.insert(name.to_string());
                if *kind == "counter" {
                    declared.insert(format!("{name}_total"));
                }
            }
        }
        Scrape(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect(),
            declared,
        )
    }
}
