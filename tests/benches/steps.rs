//! Per-step overhead and throughput of empty steps through `pype-coordinator run` (embedded
//! coordinator, local agents, snapshot backend), against the cost of spawning `bash -c true`
//! measured in the same run.
//!
//!     cargo bench -p tests --bench steps [-- STEPS_CHAIN STEPS_FAN]
//!
//! Overhead: a chain of empty steps (`true`, each `after` the previous) on one warm agent; the
//! time from one step's dispatch to the next one's is a full round trip (dispatch, agent,
//! bash, result, database, scheduling). Throughput: independent empty steps over 4 agents,
//! from the first dispatch to the end of the run, with snippets started by the agents'
//! launchers (the default), then again with `bash -c` for each (`PYPE_LAUNCHER=never`).
//! Ceiling: the same number of bash spawns from 4 threads with nothing else running, the most
//! any scheduler starting `bash` for each step could reach on this machine. Ceiling and fans
//! are measured in turn, three rounds; the ratios are the medians of each round's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// Rounds of (ceiling, fan with launchers, fan with `bash -c`).
const ROUNDS: usize = 3;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p) as usize]
}

/// Microseconds since midnight of a log line's RFC 3339 timestamp.
fn ts_us(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?;
    let time = t.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(((h * 60.0 + m) * 60.0 + s) * 1e6)
}

fn run(bin: &Path, state: &Path, pipeline: &Path, agents: usize, launcher: bool) -> Vec<String> {
    let out = Command::new(bin)
        .env("PYPE_LAUNCHER", if launcher { "auto" } else { "never" })
        .arg("--state-dir")
        .arg(state)
        .args(["run", "--agents", &agents.to_string(), "--no-materialize"])
        .arg(pipeline)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "run failed:\n{err}");
    err.lines().map(str::to_string).collect()
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let chain = args.first().copied().unwrap_or(300);
    let fan = args.get(1).copied().unwrap_or(1000);
    let bin = tests::bins().coordinator;
    let dir = tempfile::tempdir().unwrap();

    // Baseline: spawning bash -c true.
    let mut bash = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        let s = Command::new("bash").args(["-c", "true"]).status().unwrap();
        assert!(s.success());
        bash.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let bash_med = median(&mut bash);

    // Ceiling: the same bash snippet the agent runs, spawned by 4 threads with nothing else
    // (no coordinator, no agent). No scheduler that starts bash for each step can run empty
    // steps faster than this machine can start bash.
    let ceiling = || {
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..fan / 4 {
                        let st =
                            Command::new("bash").args(["-c", "set -eo pipefail\ntrue"]).status().unwrap();
                        assert!(st.success());
                    }
                });
            }
        });
        (fan / 4 * 4) as f64 / started.elapsed().as_secs_f64()
    };

    // Chain on one agent.
    let mut text = String::from("name = \"chain\"\n");
    for i in 0..chain {
        text += &format!("[[steps]]\nname = \"s{i}\"\ncommand = \"true\"\n");
        if i > 0 {
            text += &format!("after = [\"s{}\"]\n", i - 1);
        }
    }
    let p = dir.path().join("chain.toml");
    std::fs::write(&p, text).unwrap();
    let lines = run(&bin, &dir.path().join("state-chain"), &p, 1, true);
    let dispatches: Vec<f64> = lines
        .iter()
        .filter(|l| l.contains("coordinator::run: step dispatched"))
        .filter_map(|l| ts_us(l))
        .collect();
    assert_eq!(dispatches.len(), chain, "one dispatch per step");
    // Skip the first steps (warm-up: first fetches, page cache).
    let mut gaps: Vec<f64> = dispatches.windows(2).skip(10).map(|w| (w[1] - w[0]) / 1e3).collect();
    let step_med = median(&mut gaps);
    let step_p90 = percentile(&mut gaps, 0.9);

    // Fan of independent steps over 4 agents.
    let mut text = String::from("name = \"fan\"\n");
    for i in 0..fan {
        text += &format!("[[steps]]\nname = \"f{i}\"\ncommand = \"true\"\n");
    }
    let p = dir.path().join("fan.toml");
    std::fs::write(&p, text).unwrap();
    let fans = std::cell::Cell::new(0);
    let fan_rate = |launcher: bool| {
        let started = Instant::now();
        fans.set(fans.get() + 1);
        let state = dir.path().join(format!("state-fan-{}", fans.get()));
        let lines = run(&bin, &state, &p, 4, launcher);
        let wall = started.elapsed().as_secs_f64();
        let first = lines.iter().find(|l| l.contains("step dispatched")).and_then(|l| ts_us(l)).unwrap();
        let last = lines.iter().rev().find(|l| l.contains("run finished")).and_then(|l| ts_us(l)).unwrap();
        let secs = (last - first) / 1e6;
        (fan as f64 / secs, secs, wall)
    };
    // This machine's speed drifts by 10% and more within minutes: the ceiling and both fans
    // are measured in turn, ROUNDS times, and each fan is compared with the ceiling measured
    // just before it.
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let c = ceiling();
        let (rate, secs, wall) = fan_rate(true);
        // The same fan with every snippet started by `bash -c` (PYPE_LAUNCHER=never).
        let (bash_c_rate, _, _) = fan_rate(false);
        rounds.push((c, rate, secs, wall, bash_c_rate));
    }
    let mut ratios: Vec<f64> = rounds.iter().map(|r| r.1 / r.0).collect();
    let mut bash_c_ratios: Vec<f64> = rounds.iter().map(|r| r.4 / r.0).collect();
    let ratio = median(&mut ratios);
    let bash_c_ratio = median(&mut bash_c_ratios);
    let mut ceilings: Vec<f64> = rounds.iter().map(|r| r.0).collect();
    let mut rates: Vec<f64> = rounds.iter().map(|r| r.1).collect();
    let mut bash_c_rates: Vec<f64> = rounds.iter().map(|r| r.4).collect();
    let (ceiling, rate, bash_c_rate) = (median(&mut ceilings), median(&mut rates), median(&mut bash_c_rates));
    let (secs, wall) = (rounds[0].2, rounds[0].3);

    println!("bash -c true spawn:        median {bash_med:.2} ms ({} runs)", bash.len());
    println!(
        "empty step round trip:     median {step_med:.2} ms, p90 {step_p90:.2} ms ({chain}-step chain, 1 agent)"
    );
    println!(
        "overhead above bash:       {:.2} ms  (ratio {:.2}x of a bash spawn; target < 3 ms)",
        step_med - bash_med,
        step_med / bash_med
    );
    println!(
        "bash-only ceiling:         {ceiling:.0} spawns/s, median of {ROUNDS} ({} bash -c spawns from 4 threads, nothing else running)",
        fan / 4 * 4
    );
    println!(
        "throughput:                {rate:.0} steps/s, median of {ROUNDS} ({fan} steps, 4 agents; first: {secs:.2} s dispatch to finish, {wall:.2} s with startup; target >= 1000)"
    );
    for (i, r) in rounds.iter().enumerate() {
        println!(
            "  round {}: ceiling {:.0}/s, launchers {:.0}/s ({:.2}), bash -c {:.0}/s ({:.2})",
            i + 1,
            r.0,
            r.1,
            r.1 / r.0,
            r.4,
            r.4 / r.0
        );
    }
    println!("throughput / ceiling:      {ratio:.2} (median of the rounds' ratios)");
    println!(
        "with bash -c per snippet:  {bash_c_rate:.0} steps/s (PYPE_LAUNCHER=never), {bash_c_ratio:.2} of the ceiling"
    );
}
