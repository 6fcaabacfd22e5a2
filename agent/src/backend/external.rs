//! External backends: an executable `pype-backend-<name>` started once per attempt and spoken
//! to over stdin/stdout, one JSON object per line (documented in PROTOCOL.md). The agent sends
//! `{"id": N, "method": "...", "params": {...}}`; the backend answers each with
//! `{"id": N, "result": {...}}` or `{"id": N, "error": {"message": "..."}}`. The first call is
//! `init`; after `cleanup` the agent closes stdin and the backend exits. Whatever the backend
//! writes to stderr goes to the agent's log.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use protocol::RegistryEntry;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tracing::{info, warn};

use super::{OverlayVolume, StepContext, StorageBackend, View};

/// Version of the JSON-lines protocol, sent in `init`.
pub const EXTERNAL_PROTOCOL: u32 = 1;
/// Longest answer line accepted.
const MAX_LINE: usize = 16 * 1024 * 1024;

pub struct External {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    next_id: u64,
    new_entries: Vec<(String, RegistryEntry)>,
    rewrite: bool,
}

impl External {
    pub async fn start(name: &str, exe: &Path, ctx: &StepContext) -> Result<Self> {
        let mut child = Command::new(exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting external backend {}", exe.display()))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("backend has no stdout"))?);
        if let Some(stderr) = child.stderr.take() {
            let backend = name.to_string();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    warn!(backend = %backend, "{line}");
                }
            });
        }
        info!(backend = %name, exe = %exe.display(), "external backend started");
        let mut me = Self {
            name: name.to_string(),
            child,
            stdin,
            stdout,
            next_id: 0,
            new_entries: Vec::new(),
            rewrite: false,
        };
        let scratch = ctx.settings.scratch_root()?;
        let r = me
            .call(
                "init",
                json!({
                    "protocol": EXTERNAL_PROTOCOL,
                    "attempt_id": ctx.attempt_id,
                    "run": ctx.run,
                    "step": ctx.step,
                    "step_dir": ctx.step_dir,
                    "work_dir": ctx.settings.work_dir,
                    "scratch_root": scratch,
                    "snapshot_registry": ctx.settings.snapshot_registry,
                }),
            )
            .await?;
        if let Some(p) = r.get("protocol").and_then(Value::as_u64)
            && p != u64::from(EXTERNAL_PROTOCOL)
        {
            bail!("external backend {name} speaks protocol {p}, the agent speaks {EXTERNAL_PROTOCOL}");
        }
        Ok(me)
    }

    async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut line = serde_json::to_vec(&json!({"id": id, "method": method, "params": params}))?;
        line.push(b'\n');
        let stdin = self.stdin.as_mut().ok_or_else(|| anyhow!("backend {} already closed", self.name))?;
        let write = async {
            stdin.write_all(&line).await?;
            stdin.flush().await
        };
        if let Err(e) = write.await {
            return Err(self.died(method, &e.to_string()).await);
        }
        let mut buf = Vec::new();
        let n = (&mut self.stdout).take(MAX_LINE as u64).read_until(b'\n', &mut buf).await;
        match n {
            Ok(0) => return Err(self.died(method, "closed its stdout").await),
            Err(e) => return Err(self.died(method, &e.to_string()).await),
            Ok(_) => {}
        }
        let reply: Value = serde_json::from_slice(&buf).with_context(|| {
            format!("backend {} answered {method} with a line that is not JSON", self.name)
        })?;
        if reply.get("id").and_then(Value::as_u64) != Some(id) {
            bail!("backend {} answered {method} with the wrong id: {reply}", self.name);
        }
        if let Some(err) = reply.get("error") {
            let msg = err.get("message").and_then(Value::as_str).unwrap_or("no message");
            bail!("backend {} failed in {method}: {msg}", self.name);
        }
        Ok(reply.get("result").cloned().unwrap_or(Value::Null))
    }

    async fn died(&mut self, method: &str, what: &str) -> anyhow::Error {
        let status = tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await;
        let status = match status {
            Ok(Ok(s)) => s.to_string(),
            _ => "still running".into(),
        };
        anyhow!("backend {} {what} during {method} ({status})", self.name)
    }

    fn volumes_from(result: &Value, ovs: &mut Vec<OverlayVolume>) -> Result<()> {
        if let Some(v) = result.get("overlay_volumes") {
            *ovs = serde_json::from_value(v.clone()).context("backend returned malformed overlay_volumes")?;
        }
        Ok(())
    }

    fn entries_from(&mut self, result: &Value) -> Result<()> {
        if let Some(v) = result.get("new_entries") {
            let reg = protocol::Registry::parse(&v.to_string())
                .context("backend returned malformed new_entries")?;
            self.new_entries.extend(reg.entries);
        }
        Ok(())
    }
}

#[async_trait]
impl StorageBackend for External {
    fn name(&self) -> &str {
        &self.name
    }

    async fn prepare_inputs(&mut self, inputs: &[String], ovs: &mut Vec<OverlayVolume>) -> Result<()> {
        let r = self.call("prepare_inputs", json!({"inputs": inputs, "overlay_volumes": ovs})).await?;
        Self::volumes_from(&r, ovs)
    }

    async fn restore_program(&mut self, profile_name: &str, program_key: &str) -> Result<()> {
        self.call("restore_program", json!({"profile_name": profile_name, "program_key": program_key}))
            .await?;
        Ok(())
    }

    async fn prepare_outputs(
        &mut self,
        outputs: &[String],
        output_harvest: &BTreeMap<String, bool>,
        ovs: &mut Vec<OverlayVolume>,
    ) -> Result<()> {
        let r = self
            .call(
                "prepare_outputs",
                json!({"outputs": outputs, "output_harvest": output_harvest, "overlay_volumes": ovs}),
            )
            .await?;
        Self::volumes_from(&r, ovs)?;
        self.rewrite = !ovs.is_empty();
        Ok(())
    }

    async fn harvest(&mut self, upper: &Path, original_dir: &Path) -> Result<()> {
        let r = self.call("harvest", json!({"upper": upper, "original_dir": original_dir})).await?;
        self.entries_from(&r)
    }

    async fn cleanup(&mut self) -> Result<()> {
        let r = self.call("cleanup", json!({})).await;
        self.stdin = None;
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(status)) if !status.success() => {
                warn!(backend = %self.name, %status, "external backend exited with an error")
            }
            Ok(_) => {}
            Err(_) => {
                warn!(backend = %self.name, "external backend did not exit after cleanup; killing it");
                let _ = self.child.kill().await;
            }
        }
        r.map(|_| ())
    }

    async fn check_outputs(&mut self, paths: &[String]) -> Result<BTreeMap<String, Option<u64>>> {
        let r = self.call("check_outputs", json!({"paths": paths})).await?;
        let sizes: BTreeMap<String, Option<u64>> =
            serde_json::from_value(r.get("sizes").cloned().unwrap_or(Value::Null))
                .context("backend returned malformed sizes")?;
        Ok(paths.iter().map(|p| (p.clone(), sizes.get(p).copied().flatten())).collect())
    }

    async fn prepare_build(&mut self, paths: &[String], program_keys: &[String]) -> Result<()> {
        self.call("prepare_build", json!({"paths": paths, "program_keys": program_keys})).await?;
        Ok(())
    }

    async fn stage_program(
        &mut self,
        profile_name: &str,
        program_key: &str,
        artifact_path: &Path,
    ) -> Result<()> {
        let r = self
            .call(
                "stage_program",
                json!({"profile_name": profile_name, "program_key": program_key, "artifact_path": artifact_path}),
            )
            .await?;
        self.entries_from(&r)
    }

    fn view(&self) -> View {
        if self.rewrite { View::RewriteOnly } else { View::Host }
    }

    fn take_new_entries(&mut self) -> Vec<(String, RegistryEntry)> {
        std::mem::take(&mut self.new_entries)
    }
}
