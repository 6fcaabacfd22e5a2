//! Helpers for end-to-end tests: start the real coordinator and agent binaries on 127.0.0.1,
//! wait for the log lines they print (never a sleep), and show everything on failure.
//!
//! - [`Cluster`]: one test's temp dir, state dir, coordinator and agents, with the CLI and
//!   `run` helpers every area shares; [`Proc`]: a child process and its log.
//! - [`skip`]: the one way a test says it cannot run here (a failure under `PYPE_REQUIRE_ALL=1`).
//! - [`Slurm`], [`Moto`], [`Lan`]: outside services; [`connect`], [`hello`]: hand-made agents.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

mod child;
mod cluster;
pub mod hollow;
mod peer;
mod services;
mod tree;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use child::{Proc, signal_pid};
pub use cluster::{Agent, Cluster, Coord, dispatched};
pub use peer::{closed_reason, connect, hello, hello_minor, keep_alive};
pub use rustix::process::Signal;
pub use services::{Lan, MOTO_SECRET, Moto, OpenMetricsParser, Scrape, Slurm};
pub use tree::{Entry, Rng, manifest};

/// Heartbeat interval of the coordinators the tests start, unless a test says otherwise.
pub const HEARTBEAT_MS: u64 = 200;
/// How long a test waits for something that should come at once.
pub const T: Duration = Duration::from_secs(20);
/// How long a test waits for a whole run.
pub const LONG: Duration = Duration::from_secs(120);

/// Paths of the binaries under test.
pub struct Bins {
    pub coordinator: PathBuf,
    pub agent: PathBuf,
}

/// The binaries under test: the `e2e-coordinator` and `e2e-agent` shims, which cargo builds
/// for this package's tests and benches beside them (`CARGO_BIN_EXE_*` when cargo runs the
/// test; `target/<profile>/`, above the test binary in `deps/`, when run by hand).
pub fn bins() -> Bins {
    let find = |name: &str| {
        if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
            return PathBuf::from(path);
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let path = exe.parent().and_then(Path::parent).map(|dir| dir.join(name));
        match path {
            Some(p) if p.exists() => p,
            _ => panic!("no {name} beside {} (cargo test -p tests builds it)", exe.display()),
        }
    };
    Bins { coordinator: find("e2e-coordinator"), agent: find("e2e-agent") }
}

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository").to_path_buf()
}

/// Says loudly that `test` did not run: `missing` is what this machine lacks, `fix` how to get
/// it. Under `PYPE_REQUIRE_ALL=1` (CI) a skip is a failure: the test panics with that line.
pub fn skip(test: &str, missing: &str, fix: &str) {
    let line = format!("SKIPPED {test}: {missing} ({fix})");
    if std::env::var_os("PYPE_REQUIRE_ALL").is_some_and(|v| v == "1") {
        panic!("{line}; PYPE_REQUIRE_ALL=1 makes a skip a failure");
    }
    // Straight to the stderr handle, not `eprintln!`: the test harness captures what the
    // macro prints and shows it only for failed tests, which would make the skip silent.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("\n!!! {line}\n\n").as_bytes());
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// True as root; otherwise [`skip`]s `test`, saying why it needs root (`why`).
pub fn require_root(test: &str, why: &str) -> bool {
    if is_root() {
        return true;
    }
    skip(test, &format!("not root ({why})"), "run the tests as root");
    false
}

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

/// The run id in a coordinator log line (`run=...`).
pub fn run_id(line: &str) -> String {
    line.split("run=").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().trim_matches('"').to_string()
}

/// The agent named in a coordinator log line (`agent="..."`).
pub fn agent_of(line: &str) -> String {
    line.split("agent=").nth(1).unwrap().split_whitespace().next().unwrap().trim_matches('"').to_string()
}

/// Copies the shipped example pipeline and its profile into `dir`; returns the pipeline.
pub fn example_in(dir: &Path) -> PathBuf {
    let example = repo().join("examples/genome-stats");
    for f in ["pipeline.toml", "profile.toml"] {
        std::fs::copy(example.join(f), dir.join(f)).unwrap();
    }
    dir.join("pipeline.toml")
}

/// The bytes of the file whose path ends with `suffix` in snapshot `id` of the local store
/// under `state` (read from its manifest and blobs, each verified).
pub fn snapshot_file(state: &Path, id: &str, suffix: &str) -> Vec<u8> {
    use transport::cas::{BlobStore, ChunkSource, Manifest};
    let snaps = state.join("snapshots");
    let bytes = std::fs::read(snaps.join(format!("{id}.manifest"))).expect("the snapshot's manifest");
    let m = Manifest::decode(&bytes, transport::UnpackLimits::default()).expect("a valid manifest");
    let blobs = BlobStore::open(snaps.join("blobs")).expect("the blob store");
    let e =
        m.entries.iter().find(|e| e.path.ends_with(suffix)).unwrap_or_else(|| panic!("no {suffix} in {id}"));
    e.chunks.iter().flat_map(|c| blobs.read(c).expect("a verified blob")).collect()
}

/// Checks `status --json`'s cost of a run on `instances` provisioned instances at `price` an
/// hour that lasted at most `wall_h` hours: the parts add up, each step's share is within the
/// steps' part, and the total is what that many instances can have cost. Returns the cost.
pub fn check_cost(status_json: &str, instances: usize, price: f64, wall_h: f64) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(status_json).unwrap_or_else(|e| panic!("{e}: {status_json}"));
    let c = v["cost"].clone();
    let f = |k: &str| c[k].as_f64().unwrap_or_else(|| panic!("no {k} in {c}"));
    let (total, steps, boot, idle) = (f("total"), f("steps"), f("boot"), f("idle"));
    assert!(total > 0.0, "{c}");
    assert!((total - (steps + boot + idle)).abs() < 1e-9, "parts do not add up: {c}");
    assert!(steps > 0.0 && boot > 0.0, "{c}");
    let by_step: f64 = c["by_step"].as_array().unwrap().iter().map(|s| s["cost"].as_f64().unwrap()).sum();
    assert!((by_step - steps).abs() < 1e-9, "steps' shares do not add up to the steps' part: {c}");
    assert!(
        total <= instances as f64 * price * wall_h * 1.01 + 1e-9,
        "more than {instances} instances can cost: {c}"
    );
    c
}
