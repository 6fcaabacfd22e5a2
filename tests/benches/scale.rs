//! How many agents one coordinator holds, and how fast it dispatches when steps cost nothing
//! (issue 21): hollow agents (`tests::hollow`) from this process, a real `pype-coordinator
//! serve` in another.
//!
//!     cargo bench -p tests --bench scale [-- --agents 1000,5000,10000 --steps 20000]
//!
//! For each fleet size: enroll every agent (a certificate each), connect them all and time it
//! (until the coordinator's `pype_agents{state="ready"}` says all), the coordinator's CPU and
//! RSS over 10 s of idle (heartbeats only), the throughput of a run of independent no-op
//! steps and its dispatch latency (ready to sent, from `pype_dispatch_latency_seconds`), then
//! the time for all agents to reconnect to a restarted coordinator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

struct Coordinator {
    child: Child,
    state: PathBuf,
    addr: String,
    metrics: String,
}

// The child goes to the caller, which kills and waits for it.
#[allow(clippy::zombie_processes)]
fn start_coordinator(bin: &Path, state: &Path, listen: &str, log: &str) -> Coordinator {
    let log_path = state.join(log);
    std::fs::create_dir_all(state).unwrap();
    let mut child = Command::new(bin)
        .arg("--state-dir")
        .arg(state)
        .args(["serve", "--listen", listen, "--metrics-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn,coordinator=info,transport::httpd=info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let addr_of = |needle: &str| {
            text.lines()
                .find(|l| l.contains(needle))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|s| s.split_whitespace().next())
                .map(str::to_string)
        };
        if let (Some(addr), Some(metrics)) = (addr_of("coordinator listening"), addr_of("metrics listening"))
        {
            return Coordinator { child, state: state.to_path_buf(), addr, metrics };
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("coordinator did not start:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn scrape(addr: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ =
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The `q` quantile of a histogram from its cumulative buckets (linear within a bucket).
fn quantile(page: &str, name: &str, q: f64) -> f64 {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = page
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, v) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, v.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return f64::NAN;
    }
    let want = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= want {
            if le.is_infinite() {
                return lo;
            }
            let inside = count - below;
            return if inside > 0.0 { lo + (le - lo) * (want - below) / inside } else { le };
        }
        (lo, below) = (le, count);
    }
    lo
}

/// utime + stime of `pid`, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let n = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (n(14) + n(15)) / 100.0
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn wait_ready(metrics: &str, n: usize, timeout: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if metric(&scrape(metrics), "pype_agents{state=\"ready\"}") as usize >= n {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

fn one(rt: &tokio::runtime::Runtime, n: usize, steps: usize) {
    let bin = tests::bins().coordinator;
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
    let state = dir.path().join("state");
    let mut coord = start_coordinator(&bin, &state, "127.0.0.1:0", "coordinator.log");
    let addr: std::net::SocketAddr = coord.addr.parse().unwrap();
    let out = Command::new(&bin)
        .arg("--state-dir")
        .arg(&state)
        .args(["token", "create", "--ttl", "2h", "--uses", &n.to_string()])
        .output()
        .unwrap();
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let ca: Arc<str> = std::fs::read_to_string(state.join("ca.pem")).unwrap().into();

    let t = Instant::now();
    let ids = rt
        .block_on(tests::hollow::enroll(addr, &ca, &token, n, "hollow", &dir.path().join("agents"), 32))
        .unwrap();
    let enroll_s = t.elapsed().as_secs_f64();

    let counters = Arc::new(tests::hollow::Counters::default());
    let stop = CancellationToken::new();
    let facts = agent::facts::host_facts(dir.path());
    let ep = rt.block_on(async {
        transport::endpoint::client(addr, &transport::endpoint::Tuning::default()).unwrap()
    });
    let t = Instant::now();
    for id in ids {
        rt.spawn(tests::hollow::run(
            ep.clone(),
            addr,
            ca.clone(),
            id,
            facts.clone(),
            4,
            counters.clone(),
            stop.clone(),
        ));
    }
    let connect = wait_ready(&coord.metrics, n, Duration::from_secs(600));
    let connect_s = connect.map_or(f64::NAN, |d| d.as_secs_f64());
    let _ = t;

    // Idle: heartbeats only.
    std::thread::sleep(Duration::from_secs(3));
    let pid = coord.child.id();
    let (c0, t0) = (cpu_secs(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let idle_cores = (cpu_secs(pid) - c0) / t0.elapsed().as_secs_f64();
    let idle_rss = rss_mib(pid);

    // A run of no-op steps.
    let mut text = String::from("name = \"scale\"\n");
    for i in 0..steps {
        text.push_str(&format!("[[steps]]\nname = \"s{i:06}\"\ncommand = \"true\"\n"));
    }
    let pipeline = dir.path().join("p.toml");
    std::fs::write(&pipeline, text).unwrap();
    let (c0, t0) = (cpu_secs(pid), Instant::now());
    let run = Command::new(&bin)
        .arg("--state-dir")
        .arg(&state)
        .args(["run", "--coordinator", &coord.addr])
        .arg(&pipeline)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("run.log")).unwrap())
        .status()
        .unwrap();
    let run_s = t0.elapsed().as_secs_f64();
    let run_cores = (cpu_secs(pid) - c0) / run_s;
    let run_rss = rss_mib(pid);
    let page = scrape(&coord.metrics);
    let (p50, p99) = (
        quantile(&page, "pype_dispatch_latency_seconds", 0.5),
        quantile(&page, "pype_dispatch_latency_seconds", 0.99),
    );
    let answered = counters.steps.load(Ordering::Relaxed);

    // A restart: every agent reconnects.
    let _ = coord.child.kill();
    let _ = coord.child.wait();
    let before = counters.sessions_ended.load(Ordering::Relaxed);
    let t = Instant::now();
    let mut coord2 = start_coordinator(&bin, &coord.state, &coord.addr, "coordinator-2.log");
    let reconnect = wait_ready(&coord2.metrics, n, Duration::from_secs(300));
    let restart_s = reconnect.map_or(f64::NAN, |_| t.elapsed().as_secs_f64());
    let ended = counters.sessions_ended.load(Ordering::Relaxed) - before;

    stop.cancel();
    std::thread::sleep(Duration::from_millis(500));
    let _ = coord2.child.kill();
    let _ = coord2.child.wait();
    println!(
        "{n:>6} agents | enroll {enroll_s:>6.1} s | connect {connect_s:>6.1} s | idle {idle_cores:>4.2} cores {idle_rss:>6.0} MiB | \
         {steps} steps {} in {run_s:>6.1} s = {:>6.0} steps/s ({run_cores:.2} cores, {run_rss:.0} MiB), answered {answered} | \
         dispatch p50 {:.1} ms p99 {:.1} ms | restart: {ended} sessions ended, all back in {restart_s:.1} s",
        if run.success() { "ok" } else { "FAILED" },
        steps as f64 / run_s,
        p50 * 1e3,
        p99 * 1e3,
    );
    if std::env::var_os("SCALE_KEEP").is_some() {
        let kept = dir.keep();
        println!("       logs kept in {}", kept.display());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let counts: Vec<usize> = arg("--agents")
        .unwrap_or_else(|| "1000,5000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let steps: usize = arg("--steps").and_then(|s| s.parse().ok()).unwrap_or(20_000);
    // Many connections: raise the descriptor limit as far as allowed.
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit { current: Some(65_536), maximum: Some(65_536) },
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!(
        "scale benchmark: hollow agents against one `pype-coordinator serve` on 127.0.0.1, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for n in counts {
        one(&rt, n, steps);
    }
}
