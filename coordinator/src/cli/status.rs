//! `logs` and `status`: what runs did, from the state dir (and a running coordinator).

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use protocol::{AdminRequest, AdminResponse};

use crate::persist::state::{State, StepRecord, now_ms};
use crate::run::outcome::{human_bytes, peak_text};
use crate::run::runs_dir;

/// `pype-coordinator logs RUN STEP [--follow]`.
pub async fn logs(dir: &Path, run: &str, step: &str, attempt: Option<u32>, follow: bool) -> Result<()> {
    let state = State::open(dir)?;
    state.run(run)?.ok_or_else(|| anyhow!("no run {run}"))?;
    let step_dir = runs_dir(dir).join(run).join(step);
    let current = |state: &State| -> Result<(u32, bool)> {
        let rec = state.steps_of(run)?.into_iter().find(|s| s.step == step);
        let rec = rec.ok_or_else(|| anyhow!("run {run} has no step {step}"))?;
        let terminal =
            matches!(rec.state.as_str(), "succeeded" | "failed" | "cancelled" | "skipped" | "pruned");
        let run_over = state.run(run)?.is_some_and(|r| r.finished_ms.is_some());
        Ok((rec.attempts, terminal || run_over))
    };
    let (mut n, _) = current(&state)?;
    if let Some(a) = attempt {
        n = a;
    }
    if n == 0 && !follow {
        bail!("step {step} of run {run} has not run");
    }
    let mut pos = 0u64;
    loop {
        let path = step_dir.join(format!("attempt-{n}.log"));
        if let Ok(mut f) = std::fs::File::open(&path) {
            f.seek(SeekFrom::Start(pos))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            pos += buf.len() as u64;
            use std::io::Write;
            std::io::stdout().write_all(&buf)?;
            std::io::stdout().flush()?;
        }
        if !follow {
            return Ok(());
        }
        let (latest, done) = current(&state)?;
        if attempt.is_none() && latest > n {
            n = latest;
            pos = 0;
            eprintln!("--- attempt {n} ---");
            continue;
        }
        if done {
            // One last read for what was written before the state changed.
            if let Ok(mut f) = std::fs::File::open(&path) {
                f.seek(SeekFrom::Start(pos))?;
                let mut rest = Vec::new();
                f.read_to_end(&mut rest)?;
                use std::io::Write;
                std::io::stdout().write_all(&rest)?;
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn fmt_ms(ms: u64) -> String {
    if ms < 10_000 { format!("{ms}ms") } else { format!("{:.1}s", ms as f64 / 1e3) }
}

/// The agents a running coordinator (the one in the state dir, or at `addr`) has, if one
/// answers within `wait`.
pub async fn connected_agents(
    dir: &Path,
    addr: Option<SocketAddr>,
    wait: Duration,
) -> Option<Vec<protocol::AgentInfo>> {
    if !dir.join(crate::persist::ADDR_FILE).exists() && addr.is_none() {
        return None;
    }
    let req = crate::cli::admin::admin(dir, addr, AdminRequest::ListAgents);
    match tokio::time::timeout(wait, req).await {
        Ok(Ok(AdminResponse::Agents(a))) => Some(a),
        _ => None,
    }
}

/// `pype-coordinator status [RUN]`.
pub async fn status(dir: &Path, run: Option<&str>, addr: Option<SocketAddr>, json: bool) -> Result<()> {
    let state = State::open(dir)?;
    let agents = connected_agents(dir, addr, Duration::from_secs(3)).await;
    let run_id = match run {
        Some(r) => r.to_string(),
        None => match state.runs(1)?.into_iter().next() {
            Some(r) => r.run_id,
            None => {
                println!("no runs in {}", dir.display());
                return Ok(());
            }
        },
    };
    let rec = state.run(&run_id)?.ok_or_else(|| anyhow!("no run {run_id}"))?;
    let steps = state.steps_of(&run_id)?;
    let end = rec.finished_ms.unwrap_or_else(now_ms);
    let cost = crate::run::cost::load(&state, Some(&run_id))?;
    if json {
        println!("{}", status_json(&rec, &steps, agents.as_deref(), end, &cost));
        return Ok(());
    }
    println!(
        "run {} ({}): {} after {}{}",
        rec.run_id,
        rec.pipeline,
        rec.state,
        fmt_ms(end.saturating_sub(rec.created_ms)),
        rec.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
    );
    match agents {
        Some(list) => {
            println!("\n{:<20} {:>5} {:>6} RUNNING", "AGENT", "CPUS", "LOAD");
            for a in list {
                let running: Vec<&str> = steps
                    .iter()
                    .filter(|s| s.state == "running" && s.agent.as_deref() == Some(a.agent_id.as_str()))
                    .map(|s| s.step.as_str())
                    .collect();
                println!(
                    "{:<20} {:>5} {:>6.2} {}",
                    a.agent_id,
                    a.host.cpus,
                    a.load_average,
                    running.join(",")
                );
            }
        }
        None => println!("\n(no running coordinator reachable: agents not shown)"),
    }
    let width = steps.iter().map(|s| s.step.len()).max().unwrap_or(4).max(4);
    println!(
        "\n{:<width$} {:<10} {:>7} {:<14} {:>9} {:>12} {:>8} {:>9} {:>9} WHY",
        "STEP", "STATE", "ATTEMPT", "AGENT", "DURATION", "BYTES", "CPU", "PEAK MEM", "REQUESTED"
    );
    for s in &steps {
        let (dur, cpu, peak) = step_cells(s, fmt_ms);
        let requested = if s.requested_memory > 0 { human_bytes(s.requested_memory) } else { String::new() };
        println!(
            "{:<width$} {:<10} {:>7} {:<14} {:>9} {:>12} {:>8} {:>9} {:>9} {}",
            s.step,
            s.state,
            s.attempts,
            s.agent.as_deref().unwrap_or(""),
            dur,
            s.bytes,
            cpu,
            peak,
            requested,
            s.why
        );
    }
    if cost.total > 0.0 {
        let top: Vec<String> = cost.by_step.iter().take(5).map(|(s, c)| format!("{s} {c:.4}")).collect();
        println!(
            "\ncost {:.4} (steps {:.4}, boot {:.4}, idle {:.4}){}",
            cost.total,
            cost.steps,
            cost.boot,
            cost.idle,
            if top.is_empty() {
                String::new()
            } else {
                format!("; most expensive steps: {}", top.join(", "))
            }
        );
    }
    Ok(())
}

/// A step's duration (so far, while it runs), CPU time and peak memory, as table cells.
pub fn step_cells(s: &StepRecord, fmt_ms: fn(u64) -> String) -> (String, String, String) {
    let dur = match (s.started_ms, s.finished_ms) {
        (Some(a), Some(b)) => fmt_ms(b.saturating_sub(a)),
        (Some(a), None) if s.state == "running" => fmt_ms(now_ms().saturating_sub(a)),
        _ => String::new(),
    };
    let (cpu, peak) = match &s.usage {
        Some(u) => (
            format!("{:.1}s", u.cpu_user_ms.saturating_add(u.cpu_system_ms) as f64 / 1e3),
            format!("{}{}", peak_text(u.peak_memory_bytes), if u.oom_killed { " OOM" } else { "" }),
        ),
        None => (String::new(), String::new()),
    };
    (dur, cpu, peak)
}

/// `status --json`: the run, its steps with what their last attempt used, and the agents.
fn status_json(
    rec: &crate::persist::state::RunRecord,
    steps: &[crate::persist::state::StepRecord],
    agents: Option<&[protocol::AgentInfo]>,
    end: u64,
    cost: &crate::run::cost::Cost,
) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = steps
        .iter()
        .map(|s| {
            serde_json::json!({
                "step": s.step,
                "state": s.state,
                "attempts": s.attempts,
                "agent": s.agent,
                "started_ms": s.started_ms,
                "finished_ms": s.finished_ms,
                "bytes": s.bytes,
                "why": s.why,
                "usage": s.usage,
                "requested_memory_bytes": s.requested_memory,
            })
        })
        .collect();
    serde_json::json!({
        "run": rec.run_id,
        "pipeline": rec.pipeline,
        "state": rec.state,
        "error": rec.error,
        "created_ms": rec.created_ms,
        "elapsed_ms": end.saturating_sub(rec.created_ms),
        "steps": steps,
        "cost": {
            "total": cost.total,
            "steps": cost.steps,
            "boot": cost.boot,
            "idle": cost.idle,
            "by_step": cost.by_step.iter().map(|(s, c)| serde_json::json!({"step": s, "cost": c})).collect::<Vec<_>>(),
        },
        "agents": agents.map(|list| list.iter().map(|a| serde_json::json!({
            "agent": a.agent_id,
            "cpus": a.host.cpus,
            "load_average": a.load_average,
        })).collect::<Vec<_>>()),
    })
}
