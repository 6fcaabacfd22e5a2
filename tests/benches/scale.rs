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

fn start_coordinator(bin: &Path, state: &Path, listen: &str, log: &str) -> Coordinator {
    start_coordinator_with(bin, state, &["serve", "--listen", listen], "", log)
}

impl Coordinator {
    /// Waits for the coordinator to exit: `Some(success)`, or `None` (killed) after `limit`.
    fn wait_timeout_or_kill(&mut self, limit: Duration) -> Option<bool> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.success());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

/// `pype-coordinator --state-dir STATE --metrics-listen 127.0.0.1:0 ARGS... [LAST]`, its log in
/// `STATE/LOG`, once it says where it listens.
// The child goes to the caller, which kills and waits for it.
#[allow(clippy::zombie_processes)]
fn start_coordinator_with(bin: &Path, state: &Path, args: &[&str], last: &str, log: &str) -> Coordinator {
    let log_path = state.join(log);
    std::fs::create_dir_all(state).unwrap();
    let mut child = Command::new(bin)
        .arg("--state-dir")
        .arg(state)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(args)
        .args((!last.is_empty()).then_some(last))
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

/// Seconds from the log's `run started` to its `run finished` (RFC 3339 timestamps, one day).
fn run_span(log: &str) -> f64 {
    let at = |needle: &str| {
        let line = log.lines().find(|l| l.contains(needle))?;
        let time = line.split_whitespace().next()?.split('T').nth(1)?.trim_end_matches('Z');
        let mut parts = time.split(':').map(|p| p.parse::<f64>().ok());
        Some((parts.next()?? * 60.0 + parts.next()??) * 60.0 + parts.next()??)
    };
    match (at("run started"), at("run finished")) {
        (Some(a), Some(b)) => b - a,
        _ => f64::NAN,
    }
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

fn wait_ready(coord: &mut Coordinator, n: usize, timeout: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if metric(&scrape(&coord.metrics), "pype_agents{state=\"ready\"}") as usize >= n {
            return Some(t.elapsed());
        }
        if let Ok(Some(_)) = coord.child.try_wait() {
            return None;
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
    tests::hollow::spawn_fleet(rt, addr, &ca, ids, &facts, 4, 500, &counters, &stop).unwrap();
    let connect = wait_ready(&mut coord, n, Duration::from_secs(600));
    let connect_s = connect.map_or(f64::NAN, |d| d.as_secs_f64());

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
    let in_coordinator =
        run_span(&std::fs::read_to_string(coord.state.join("coordinator.log")).unwrap_or_default());
    println!(
        "{n:>6} agents | enroll {enroll_s:>6.1} s | connect {connect_s:>6.1} s | idle {idle_cores:>4.2} cores {idle_rss:>6.0} MiB | \
         {steps} steps {} in {run_s:>6.1} s = {:>6.0} steps/s ({in_coordinator:.1} s from run started to run finished = {:.0} steps/s; \
         {run_cores:.2} cores, {run_rss:.0} MiB), answered {answered} | dispatch p50 {:.1} ms p99 {:.1} ms",
        if run.success() { "ok" } else { "FAILED" },
        steps as f64 / run_s,
        steps as f64 / in_coordinator,
        p50 * 1e3,
        p99 * 1e3,
    );

    // A restart in the middle of a run: the `serve` goes, an embedded coordinator (`run
    // --agents 0 --listen` on the same address and state) takes the agents back and starts a
    // second run of as many steps; halfway through it is killed (SIGKILL) and started again
    // with `--resume`. Every agent must be back, and every step answered exactly once.
    let _ = coord.child.kill();
    let _ = coord.child.wait();
    let mut text = String::from("name = \"restart\"\n");
    let names: Vec<String> = (0..steps).map(|i| format!("r{i:06}")).collect();
    for name in &names {
        text.push_str(&format!("[[steps]]\nname = \"{name}\"\ncommand = \"true\"\n"));
    }
    let pipeline2 = dir.path().join("p2.toml");
    std::fs::write(&pipeline2, text).unwrap();
    let embedded = |log: &str, resume: Option<&str>| {
        // The heartbeat of `serve` (5 s), not the 1 s `run` takes for its local agents.
        let mut args = vec![
            "run",
            "--agents",
            "0",
            "--listen",
            &coord.addr,
            "--agent-wait",
            "600s",
            "--heartbeat-interval-ms",
            "5000",
        ];
        let last = match resume {
            Some(id) => {
                args.extend(["--resume", id]);
                ""
            }
            None => pipeline2.to_str().unwrap(),
        };
        start_coordinator_with(&bin, &coord.state, &args, last, log)
    };
    let answered_r = || {
        let (_, once, more) = counters.tally(names.iter().map(String::as_str));
        once + more
    };
    let t = Instant::now();
    let mut first = embedded("run-2.log", None);
    // Killed once half the steps are answered, whether or not every agent is back by then.
    let mut back_1 = f64::NAN;
    let mut looked = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    while answered_r() < steps / 2 && Instant::now() < deadline && matches!(first.child.try_wait(), Ok(None))
    {
        if back_1.is_nan() && looked.elapsed() >= Duration::from_millis(500) {
            looked = Instant::now();
            if counters.welcomed_since(t) >= n {
                back_1 = t.elapsed().as_secs_f64();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log1 = std::fs::read_to_string(coord.state.join("run-2.log")).unwrap_or_default();
    // `... run started run=ID ...` (the log) or `[ID] run started ...` (the event lines).
    let run_id = log1
        .lines()
        .filter(|l| l.contains("run started"))
        .find_map(|l| match l.split_once("run=") {
            Some((_, rest)) => rest.split_whitespace().next().map(str::to_string),
            None => l.split_once('[').and_then(|(_, r)| r.split_once(']')).map(|(id, _)| id.to_string()),
        })
        .unwrap_or_default();
    assert!(!run_id.is_empty(), "no run id in the log:\n{log1}");
    let kill_s = t.elapsed().as_secs_f64();
    let _ = first.child.kill();
    let _ = first.child.wait();
    let at_kill = answered_r();
    let before = counters.sessions_ended.load(Ordering::Relaxed);
    let t = Instant::now();
    let mut second = embedded("run-3.log", Some(&run_id));
    // Back: welcomed by the restarted coordinator (counted by the fleet, so it holds even when
    // the run ends, and the coordinator with it, before the last agent is back).
    let mut restart_s = f64::NAN;
    while restart_s.is_nan()
        && t.elapsed() < Duration::from_secs(300)
        && matches!(second.child.try_wait(), Ok(None))
    {
        if counters.welcomed_since(t) >= n {
            restart_s = t.elapsed().as_secs_f64();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let back_at_end = counters.welcomed_since(t);
    let ended = counters.sessions_ended.load(Ordering::Relaxed) - before;
    let done = second.wait_timeout_or_kill(Duration::from_secs(900));
    let resumed_s = t.elapsed().as_secs_f64();
    let (never, once, more) = counters.tally(names.iter().map(String::as_str));

    // A plain restart, the fleet idle: `serve` again, all connected, SIGKILL, `serve` again on
    // the same address; the time until every agent is welcomed by the new one.
    let mut idle1 = start_coordinator(&bin, &coord.state, &coord.addr, "coordinator-3.log");
    let settled = wait_ready(&mut idle1, n, Duration::from_secs(300)).is_some();
    let _ = idle1.child.kill();
    let _ = idle1.child.wait();
    let t = Instant::now();
    let before = counters.sessions_ended.load(Ordering::Relaxed);
    let mut idle2 = start_coordinator(&bin, &coord.state, &coord.addr, "coordinator-4.log");
    let mut idle_back_s = f64::NAN;
    while idle_back_s.is_nan() && t.elapsed() < Duration::from_secs(300) {
        if counters.welcomed_since(t) >= n {
            idle_back_s = t.elapsed().as_secs_f64();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let idle_ended = counters.sessions_ended.load(Ordering::Relaxed) - before;
    let _ = idle2.child.kill();
    let _ = idle2.child.wait();
    stop.cancel();
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "       restart of `serve` into a run: all back in {back_1:.1} s (NaN: not all by the kill) | killed after {kill_s:.1} s with {at_kill} of {steps} steps answered; \
         after the restart {ended} sessions ended, all back in {restart_s:.1} s ({back_at_end} back before the run ended), run {} in {resumed_s:.1} s | \
         steps answered never {never}, once {once}, more than once {more}",
        match done {
            Some(true) => "succeeded",
            Some(false) => "FAILED",
            None => "DID NOT END",
        },
    );
    println!(
        "       restart of an idle `serve` (SIGKILL){}: all {n} back in {idle_back_s:.1} s, {idle_ended} sessions ended",
        if settled { "" } else { " (NOT all connected before the kill)" }
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
