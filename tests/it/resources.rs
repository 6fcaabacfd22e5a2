//! What each attempt used: CPU time, peak memory and I/O measured by the agent (a cgroup per
//! attempt, or its process group sampled from /proc), the step's memory limit enforced by the
//! cgroup, and what `status`, the run's events and the state database say about it.

use serde_json::Value;
use tests::{Cluster, Proc, is_root, skip};

/// Allocates and touches `MiB` of memory, then burns `secs` of CPU time.
const HOG: &str = r#"
import sys, time
mib, secs = int(sys.argv[1]), float(sys.argv[2])
b = bytearray(mib << 20)
b[::4096] = b"x" * (len(b) // 4096)
t = time.process_time()
while time.process_time() - t < secs:
    pass
"#;

/// Pipeline `text` beside `hog.py`.
fn hog_pipeline(fx: &Cluster, text: &str) -> std::path::PathBuf {
    std::fs::write(fx.p("hog.py"), HOG).unwrap();
    fx.pipeline("p.toml", text)
}

fn pipeline(fx: &Cluster) -> std::path::PathBuf {
    hog_pipeline(
        fx,
        r#"
name = "res"
[[steps]]
name = "hog"
command = "python3 {d}/hog.py 200 1.0"
resources = { memory = "512M" }
[[steps]]
name = "small"
command = "python3 {d}/hog.py 4 0.1"
resources = { memory = "1G" }
"#,
    )
}

/// `status --json` of `run`: step name → its object.
fn status(fx: &Cluster, run: &str) -> std::collections::HashMap<String, Value> {
    let out = fx.cli_ok(&["status", run, "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap().to_string(), s.clone()))
        .collect()
}

fn mib(v: &Value) -> f64 {
    v.as_u64().unwrap() as f64 / (1 << 20) as f64
}

/// What both ways of measuring must show for the same pipeline.
fn check_run(fx: &Cluster, run: &str, p: &Proc, measured_by: &str) {
    let steps = status(fx, run);
    let hog = &steps["hog"]["usage"];
    assert_eq!(hog["measured_by"], measured_by, "{hog}");
    let peak = mib(&hog["peak_memory_bytes"]);
    assert!((195.0..320.0).contains(&peak), "hog touched 200 MiB; peak {peak} MiB: {hog}");
    let cpu = (hog["cpu_user_ms"].as_u64().unwrap() + hog["cpu_system_ms"].as_u64().unwrap()) as f64 / 1e3;
    // Sampling misses what the group did after its last look (up to one interval, more on a
    // loaded machine): a looser floor for it.
    let floor = if measured_by == "procfs" { 0.5 } else { 0.85 };
    assert!((floor..3.0).contains(&cpu), "hog burnt 1.0 s of CPU; measured {cpu} s: {hog}");
    assert_eq!(hog["oom_killed"], false);
    assert_eq!(steps["hog"]["requested_memory_bytes"], 512u64 << 20);
    // The run's events and log: one `step resources` line per attempt, and one warning for
    // the step that asked for 1 GiB and used a few MiB (none for `hog`).
    assert_eq!(p.count(&["step resources", "step=\"hog\""]), 1, "{}", p.dump());
    assert_eq!(p.count(&["step memory", "step=\"small\"", "less than a quarter"]), 1, "{}", p.dump());
    assert_eq!(
        p.count(&["WARN", "small", "less than a quarter of the 1024 MiB it requested"]),
        1,
        "{}",
        p.dump()
    );
    assert_eq!(p.count(&["step memory", "step=\"hog\""]), 0, "{}", p.dump());
    // The table shows the same figures.
    let table = fx.cli_ok(&["status", run]);
    assert!(table.contains("PEAK MEM") && table.contains("512 MiB") && table.contains("1024 MiB"), "{table}");
}

/// The cgroup hierarchies attempts can use here, or a loud skip of `test`.
fn cgroups(test: &str) -> Option<agent::usage::Hierarchies> {
    let h = agent::usage::Hierarchies::of_this_process();
    if !is_root() || (h.v2.is_none() && (h.memory.is_none() || h.cpuacct.is_none())) {
        skip(
            test,
            "root with cgroup v2 (memory delegated) or the v1 memory and cpuacct controllers",
            "run as root",
        );
        return None;
    }
    Some(h)
}

#[test]
fn an_attempt_in_its_own_cgroup_reports_cpu_and_peak_memory() {
    let test = "resources::an_attempt_in_its_own_cgroup_reports_cpu_and_peak_memory";
    let Some(h) = cgroups(test) else { return };
    let fx = Cluster::new();
    let p = pipeline(&fx);
    let (run, proc) = fx.run_ok(&[p.to_str().unwrap()]);
    let by = if h.v2.is_some() { "cgroup v2" } else { "cgroup v1" };
    check_run(&fx, &run, &proc, by);
    let hog = &status(&fx, &run)["hog"]["usage"];
    assert_eq!(hog["memory_limit_bytes"], 512u64 << 20, "the cgroup enforced the request: {hog}");
    // This run's attempt cgroups are gone once its attempts are (other tests' may be there).
    let attempts: Vec<String> = proc
        .dump()
        .lines()
        .filter(|l| l.contains("step dispatched"))
        .filter_map(|l| l.split("attempt=").nth(1)?.split_whitespace().next().map(str::to_string))
        .collect();
    assert_eq!(attempts.len(), 2, "{}", proc.dump());
    for dir in [&h.v2, &h.memory, &h.cpuacct].into_iter().flatten() {
        for a in &attempts {
            let cg = dir.join(format!("pype-attempt-{a}"));
            assert!(!cg.exists(), "{} left behind", cg.display());
        }
    }
}

#[test]
fn without_a_cgroup_the_process_group_is_sampled() {
    let fx = Cluster::new();
    let p = pipeline(&fx);
    let (ok, run, proc) = fx.run_env(&[p.to_str().unwrap()], &[("PYPE_CGROUPS", "never")]);
    assert!(ok, "{}", proc.dump());
    check_run(&fx, &run, &proc, "procfs");
}

#[test]
fn a_step_over_its_memory_limit_is_killed_and_reported_as_such() {
    let test = "resources::a_step_over_its_memory_limit_is_killed_and_reported_as_such";
    if cgroups(test).is_none() {
        return;
    }
    let fx = Cluster::new();
    let p = hog_pipeline(
        &fx,
        r#"
name = "oom"
[[steps]]
name = "greedy"
command = "python3 {d}/hog.py 400 0.1"
resources = { memory = "64M" }
"#,
    );
    let (ok, run, proc) = fx.run(&[p.to_str().unwrap()]);
    assert!(!ok, "a step over its limit must fail\n{}", proc.dump());
    let steps = status(&fx, &run);
    let greedy = &steps["greedy"];
    assert_eq!(greedy["state"], "failed", "{greedy}");
    assert_eq!(greedy["usage"]["oom_killed"], true, "{greedy}");
    assert!(mib(&greedy["usage"]["peak_memory_bytes"]) <= 64.5, "{greedy}");
    assert_eq!(
        proc.count(&["step failed", "greedy", "out-of-memory killer", "memory limit of 64 MiB"]),
        1,
        "{}",
        proc.dump()
    );
}
