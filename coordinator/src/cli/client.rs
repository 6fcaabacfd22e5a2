//! The interface for programs (bio-pype's `pype_rs` queue module, or any other client that is
//! not written in Rust): `run --json` reads a JSON pipeline and writes one JSON event per line
//! on stdout, and takes control lines on stdin; `paths` says which paths the registry and store
//! hold; `cancel` cancels one step of a running run. Versioned by [`EVENTS_VERSION`] (the `v`
//! of every event line) and [`crate::pipeline::JSON_PIPELINE_VERSION`] (the pipeline's
//! `version`); PROTOCOL.md gives the rules.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use protocol::{AdminRequest, AdminResponse, RunEvent};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Pipeline;
use crate::run::{Engine, RunOptions};

/// Version of the event lines `run --json` writes.
pub const EVENTS_VERSION: u64 = 1;

/// Reads a JSON pipeline from a file, or from the first line of stdin for `-` (the lines after
/// it are control lines, see [`control`]).
pub fn read_pipeline(path: &Path) -> Result<Pipeline> {
    let text = if path == Path::new("-") {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).context("reading the pipeline from stdin")?;
        if line.trim().is_empty() {
            bail!("stdin held no pipeline: give the JSON pipeline on its first line");
        }
        line
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    Ok(Pipeline::parse_json(&text)?)
}

/// One event line.
pub fn event_line(ev: &RunEvent) -> String {
    let mut v = serde_json::to_value(ev).unwrap_or_else(|_| json!({}));
    v["v"] = json!(EVENTS_VERSION);
    v.to_string()
}

/// The last line of a run: `run done` with whether it succeeded.
pub fn done_line(run: &str, succeeded: bool, summary: &str) -> String {
    json!({"v": EVENTS_VERSION, "event": "run done", "run": run, "succeeded": succeeded, "summary": summary})
        .to_string()
}

/// Prints a line on stdout at once (a client follows it live).
pub fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// What a control line asks.
#[derive(Debug, PartialEq)]
pub enum Control {
    /// `{"cancel": {"run": R, "step": S}}`
    Cancel { run: String, step: String },
}

pub fn parse_control(line: &str) -> Result<Control> {
    let v: Value = serde_json::from_str(line).map_err(|e| anyhow!("a control line that is not JSON: {e}"))?;
    if let Some(c) = v.get("cancel") {
        let field = |k: &str| {
            c.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| anyhow!("cancel: missing string {k:?}"))
        };
        return Ok(Control::Cancel { run: field("run")?, step: field("step")? });
    }
    bail!("unknown control line {line:?}: expected {{\"cancel\": {{\"run\": ..., \"step\": ...}}}}")
}

/// Reads control lines from stdin on a thread of its own.
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if !line.trim().is_empty() && tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Carries out stdin's control lines on an embedded run. The end of stdin means the client
/// went away: the run is cancelled (`cancel`), as on Ctrl-C.
pub fn control_embedded(engine: Arc<Engine>, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
    let mut lines = stdin_lines();
    tokio::spawn(async move {
        while let Some(line) = lines.recv().await {
            match parse_control(&line) {
                Ok(Control::Cancel { run, step }) => {
                    if let Err(e) = engine.cancel_step(&run, &step) {
                        tracing::warn!(run = %run, step = %step, "cancel refused: {e:#}");
                    }
                }
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
        tracing::warn!("stdin closed: the client went away; cancelling the run");
        cancel.cancel();
    })
}

/// `run --json --coordinator ADDR`: submits the pipeline and prints its events; control lines
/// go to the coordinator as admin requests. The run goes on there if this process ends.
pub async fn run_remote(dir: &Path, addr: SocketAddr, pipeline: &Pipeline, opts: &RunOptions) -> Result<()> {
    let req = AdminRequest::SubmitRun {
        pipeline_json: serde_json::to_string(pipeline)?,
        options_json: serde_json::to_string(opts)?,
    };
    let mut lines = stdin_lines();
    let d = dir.to_path_buf();
    let control = tokio::spawn(async move {
        while let Some(line) = lines.recv().await {
            match parse_control(&line) {
                Ok(Control::Cancel { run, step }) => {
                    let r = crate::cli::admin::admin_stream(
                        &d,
                        Some(addr),
                        AdminRequest::CancelRunStep { run, step },
                        |_| {},
                    )
                    .await;
                    match r {
                        Ok(AdminResponse::Done) => {}
                        Ok(other) => {
                            tracing::warn!("cancel refused: {:#}", crate::cli::admin::unexpected(other))
                        }
                        Err(e) => tracing::warn!("cancel failed: {e:#}"),
                    }
                }
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
    });
    let last = crate::cli::admin::admin_stream(dir, Some(addr), req, |frame| {
        if let AdminResponse::RunEvent(ev) = frame {
            print_line(&event_line(&ev));
        }
    })
    .await;
    control.abort();
    match last? {
        AdminResponse::RunDone { run, succeeded, summary } => {
            print_line(&done_line(&run, succeeded, &summary));
            if succeeded { Ok(()) } else { bail!("run {run} did not succeed: {summary}") }
        }
        other => Err(crate::cli::admin::unexpected(other)),
    }
}

/// `paths`: `{path: size or null}` on stdout, from a running coordinator, else from the state
/// dir's working registry and store.
pub async fn paths(dir: &Path, addr: Option<SocketAddr>, paths: Vec<String>) -> Result<()> {
    for p in &paths {
        if !p.starts_with('/') {
            bail!("{p:?} is not an absolute path");
        }
    }
    let sizes = match addr {
        Some(addr) => {
            match crate::cli::admin::admin_stream(dir, Some(addr), AdminRequest::Present { paths }, |_| {})
                .await?
            {
                AdminResponse::Outputs(s) => s,
                other => return Err(crate::cli::admin::unexpected(other)),
            }
        }
        None => {
            let reg = crate::persist::working::WorkingRegistry::open(dir)?.load()?;
            let store = crate::persist::config::open_store(dir)?;
            tokio::task::spawn_blocking(move || crate::store::present(store.as_ref(), &reg, &paths)).await??
        }
    };
    let obj: serde_json::Map<String, Value> = sizes.into_iter().map(|(p, s)| (p, json!(s))).collect();
    print_line(&Value::Object(obj).to_string());
    Ok(())
}

/// `cancel RUN STEP`: asks the coordinator running the run (`--coordinator`, else the one the
/// state dir records) to cancel the step.
pub async fn cancel(dir: &Path, addr: Option<SocketAddr>, run: String, step: String) -> Result<()> {
    match crate::cli::admin::admin_stream(dir, addr, AdminRequest::CancelRunStep { run, step }, |_| {})
        .await?
    {
        AdminResponse::Done => Ok(()),
        other => Err(crate::cli::admin::unexpected(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_lines_parse_or_are_refused_with_the_expected_form() {
        assert_eq!(
            parse_control(r#"{"cancel": {"run": "r", "step": "s"}}"#).unwrap(),
            Control::Cancel { run: "r".into(), step: "s".into() }
        );
        let e = parse_control(r#"{"cancel": {"run": "r"}}"#).unwrap_err().to_string();
        assert!(e.contains("step"), "{e}");
        let e = parse_control(r#"{"drop": 1}"#).unwrap_err().to_string();
        assert!(e.contains("expected"), "{e}");
        assert!(parse_control("not json").is_err());
    }

    #[test]
    fn event_lines_carry_the_version() {
        let ev = RunEvent {
            run: "r".into(),
            event: "step started".into(),
            step: Some("s".into()),
            attempt: Some(7),
            agent: Some("a".into()),
            detail: String::new(),
            progress: Default::default(),
        };
        let v: Value = serde_json::from_str(&event_line(&ev)).unwrap();
        assert_eq!(v["v"], json!(EVENTS_VERSION));
        assert_eq!(v["event"], json!("step started"));
        assert_eq!(v["attempt"], json!(7));
    }
}
