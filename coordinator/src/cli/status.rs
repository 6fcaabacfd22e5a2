//! `logs` and `status`: what runs did, from the state dir (and a running coordinator).

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use protocol::{AdminRequest, AdminResponse};

use crate::persist::state::{State, now_ms};
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

/// `pype-coordinator status [RUN]`.
pub async fn status(dir: &Path, run: Option<&str>, addr: Option<SocketAddr>) -> Result<()> {
    let state = State::open(dir)?;
    let agents = if dir.join(crate::persist::ADDR_FILE).exists() || addr.is_some() {
        let req = crate::cli::admin::admin(dir, addr, AdminRequest::ListAgents);
        match tokio::time::timeout(Duration::from_secs(3), req).await {
            Ok(Ok(AdminResponse::Agents(a))) => Some(a),
            _ => None,
        }
    } else {
        None
    };
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
        "\n{:<width$} {:<10} {:>7} {:<14} {:>9} {:>12} WHY",
        "STEP", "STATE", "ATTEMPT", "AGENT", "DURATION", "BYTES"
    );
    for s in &steps {
        let dur = match (s.started_ms, s.finished_ms) {
            (Some(a), Some(b)) => fmt_ms(b.saturating_sub(a)),
            (Some(a), None) if s.state == "running" => fmt_ms(now_ms().saturating_sub(a)),
            _ => String::new(),
        };
        println!(
            "{:<width$} {:<10} {:>7} {:<14} {:>9} {:>12} {}",
            s.step,
            s.state,
            s.attempts,
            s.agent.as_deref().unwrap_or(""),
            dur,
            s.bytes,
            s.why
        );
    }
    Ok(())
}
