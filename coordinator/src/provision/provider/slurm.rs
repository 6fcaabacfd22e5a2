//! The `slurm` provider: each instance is a Slurm batch job running one `pype-agent` in the
//! foreground (`deploy/slurm/pype-agent.sbatch`, embedded, or a site's own script).
//!
//! A job is submitted with `sbatch --export=ALL` and the agent's settings in the environment
//! of sbatch: coordinator address, the CA (base64), a one-time enrollment token bound to the
//! instance id, the instance id, backend, orphan guard, and the instruction to fetch the
//! registry over QUIC. Its name is the instance id and its comment carries the tags
//! (`pype:coordinator=... pype:instance=... pype:run=...`), so `squeue --me` finds every job
//! of this coordinator and `scancel --name` can cancel one whose job id was never recorded.
//! Terminating is `scancel`: Slurm sends SIGTERM to the agent, which drains and exits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use super::{InstanceSpec, InstanceState, Launch, Listed, Provider, TAG_COORDINATOR};

/// The shipped batch script, used unless the config names another.
const SCRIPT: &str = include_str!("../../../../deploy/slurm/pype-agent.sbatch");
/// Longest a Slurm command may take (slurmctld busy or down).
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmConfig {
    /// `--partition` of agent jobs.
    pub partition: Option<String>,
    /// `--account` of agent jobs.
    pub account: Option<String>,
    /// `--time` of agent jobs (the agent drains when Slurm signals the end is near).
    pub time_limit: Option<String>,
    /// More sbatch arguments, as given (e.g. `--qos=short`, `--constraint=ssd`).
    pub sbatch_args: Vec<String>,
    /// Batch script to submit (default: the shipped `deploy/slurm/pype-agent.sbatch`).
    pub script: Option<PathBuf>,
    /// `pype-agent` on the nodes (default: `pype-agent` next to this executable, else on PATH).
    pub agent_bin: Option<String>,
    /// Where jobs write their output (default: `<state>/instances/slurm`). Must be writable
    /// from the nodes (a shared filesystem) for `instances`' console tail to show it.
    pub log_dir: Option<PathBuf>,
    /// Extra environment for the agent (e.g. `PYPE_OVERLAY_SCRATCH = '$SLURM_TMPDIR/pype'`).
    pub env: BTreeMap<String, String>,
    /// The Slurm commands (a site may wrap them).
    pub sbatch: Option<String>,
    pub squeue: Option<String>,
    pub scancel: Option<String>,
}

pub struct Slurm {
    cfg: SlurmConfig,
    log_dir: PathBuf,
    script: PathBuf,
}

impl Slurm {
    pub fn new(cfg: SlurmConfig, dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log_dir = cfg.log_dir.clone().unwrap_or_else(|| dir.clone());
        std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        let script = match &cfg.script {
            Some(p) => p.clone(),
            None => {
                let p = dir.join("pype-agent.sbatch");
                if std::fs::read_to_string(&p).ok().as_deref() != Some(SCRIPT) {
                    std::fs::write(&p, SCRIPT).with_context(|| format!("writing {}", p.display()))?;
                }
                p
            }
        };
        Ok(Self { cfg, log_dir, script })
    }

    fn tool(&self, which: &str) -> Command {
        let name = match which {
            "sbatch" => self.cfg.sbatch.as_deref(),
            "squeue" => self.cfg.squeue.as_deref(),
            "scancel" => self.cfg.scancel.as_deref(),
            _ => None,
        }
        .unwrap_or(which);
        let mut c = Command::new(name);
        c.kill_on_drop(true);
        c
    }

    fn agent_bin(&self) -> String {
        if let Some(b) = &self.cfg.agent_bin {
            return b.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("pype-agent")))
            .filter(|p| p.exists())
            .map_or_else(|| "pype-agent".to_string(), |p| p.display().to_string())
    }

    fn log_file(&self, instance: &str) -> PathBuf {
        self.log_dir.join(format!("{instance}.log"))
    }
}

/// Runs a Slurm command; its stdout, or an error with its stderr.
async fn output(mut cmd: Command, what: &str) -> Result<String> {
    let out = tokio::time::timeout(TOOL_TIMEOUT, cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("{what}: no answer within {TOOL_TIMEOUT:?}"))?
        .with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A job id as sbatch and squeue print it (`123`, or `123_4` for an array task).
fn valid_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.chars().all(|c| c.is_ascii_digit() || c == '_')
        && id.starts_with(|c: char| c.is_ascii_digit())
}

fn valid_instance_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// sbatch errors no retry cures: the job as asked for cannot be queued on this cluster.
fn is_refusal(sbatch_error: &str) -> bool {
    const REFUSALS: &[&str] = &[
        "invalid partition",
        "invalid account",
        "invalid qos",
        "invalid generic resource",
        "invalid feature specification",
        "invalid time limit",
        "requested node configuration is not available",
        "memory specification can not be satisfied",
    ];
    let e = sbatch_error.to_lowercase();
    REFUSALS.iter().any(|r| e.contains(r))
}

/// Tags as a job comment: `k=v` pairs separated by spaces (keys and values hold no spaces).
/// An empty value says nothing (a step tag on an agent made for no step in particular) and
/// is left out, as `tags_of` would read it back as absent anyway.
fn comment_of(tags: &BTreeMap<String, String>) -> Result<String> {
    let mut parts = Vec::new();
    for (k, v) in tags {
        if v.is_empty() {
            continue;
        }
        if k.is_empty() || k.contains([' ', '=']) || v.contains(' ') {
            bail!("tag {k:?}={v:?} cannot go into a Slurm comment");
        }
        parts.push(format!("{k}={v}"));
    }
    Ok(parts.join(" "))
}

fn tags_of(comment: &str) -> BTreeMap<String, String> {
    comment
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Slurm's job state names, as far as an agent's life goes.
fn state_of(slurm_state: &str) -> InstanceState {
    match slurm_state.trim() {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESIZING"
        | "SUSPENDED" | "STAGE_OUT" | "SIGNALING" => InstanceState::Pending,
        "RUNNING" | "COMPLETING" => InstanceState::Running,
        _ => InstanceState::Gone,
    }
}

#[async_trait]
impl Provider for Slurm {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn prestarts(&self) -> bool {
        // A job starts in seconds: agents for steps that are not ready yet would sit idle.
        false
    }

    async fn create(&self, spec: &InstanceSpec, launch: &Launch) -> Result<String> {
        if !valid_instance_id(&spec.instance_id) {
            bail!("invalid instance id {:?}", spec.instance_id);
        }
        let b = &launch.boot;
        let mut cmd = self.tool("sbatch");
        cmd.arg("--parsable")
            .arg("--export=ALL")
            .arg(format!("--job-name={}", spec.instance_id))
            .arg(format!("--comment={}", comment_of(&spec.tags)?))
            .arg(format!("--output={}", self.log_file(&spec.instance_id).display()))
            .arg(format!("--cpus-per-task={}", spec.cpus.max(1)));
        if spec.memory_bytes > 0 {
            cmd.arg(format!("--mem={}M", spec.memory_bytes.div_ceil(1 << 20)));
        }
        if let Some(p) = &self.cfg.partition {
            cmd.arg(format!("--partition={p}"));
        }
        if let Some(a) = &self.cfg.account {
            cmd.arg(format!("--account={a}"));
        }
        if let Some(t) = &self.cfg.time_limit {
            cmd.arg(format!("--time={t}"));
        }
        cmd.args(&self.cfg.sbatch_args).arg(&self.script);
        // The agent's settings travel in the job's environment (sbatch --export=ALL).
        use base64::Engine as _;
        cmd.env("PYPE_COORDINATOR", &b.coordinator)
            .env("PYPE_CA_B64", base64::engine::general_purpose::STANDARD.encode(&b.ca_pem))
            .env("PYPE_TOKEN", &b.token)
            .env("PYPE_INSTANCE_ID", &spec.instance_id)
            .env("PYPE_AGENT_BIN", self.agent_bin())
            .env("PYPE_OVERLAY_MODE", &b.backend)
            .env("PYPE_REGISTRY_FETCH", "1")
            .env("PYPE_SLOTS", spec.cpus.max(1).to_string())
            .env("PYPE_ORPHAN_TIMEOUT_SECS", b.orphan_timeout_secs.to_string())
            .env("PYPE_ORPHAN_ACTION", "exit");
        for (k, v) in &self.cfg.env {
            cmd.env(k, v);
        }
        let out = match output(cmd, "sbatch").await {
            Ok(out) => out,
            Err(e) if is_refusal(&format!("{e:#}")) => {
                return Err(super::ProviderError::refused(format!("{e:#}")));
            }
            Err(e) => return Err(e),
        };
        let job = out.trim().split(';').next().unwrap_or("").trim().to_string();
        if !valid_job_id(&job) {
            bail!("sbatch printed {out:?}, not a job id");
        }
        Ok(job)
    }

    async fn preflight(&self) -> Result<()> {
        let mut v = self.tool("sbatch");
        v.arg("--version");
        output(v, "sbatch --version")
            .await
            .context("Slurm's client commands are needed (Debian package slurm-client)")?;
        let mut q = self.tool("squeue");
        q.args(["--me", "-h", "-o", "%i"]);
        output(q, "squeue").await.context("slurmctld does not answer (is SLURM_CONF right?)")?;
        if !self.script.is_file() {
            bail!("batch script {} does not exist", self.script.display());
        }
        let bin = self.agent_bin();
        if bin.contains('/') && !Path::new(&bin).is_file() {
            bail!("agent binary {bin} does not exist (set [slurm] agent_bin)");
        }
        Ok(())
    }

    async fn describe(&self, provider_id: &str) -> Result<InstanceState> {
        if !valid_job_id(provider_id) {
            bail!("invalid Slurm job id {provider_id:?}");
        }
        let mut q = self.tool("squeue");
        q.args(["-h", "-j", provider_id, "-o", "%T"]);
        match output(q, "squeue").await {
            Ok(out) => Ok(out.lines().next().map_or(InstanceState::Gone, state_of)),
            // Purged from slurmctld's memory: long gone.
            Err(e) if e.to_string().contains("Invalid job id") => Ok(InstanceState::Gone),
            Err(e) => Err(e),
        }
    }

    async fn terminate(&self, provider_id: &str) -> Result<()> {
        let mut c = self.tool("scancel");
        if valid_job_id(provider_id) {
            c.arg(provider_id);
        } else if valid_instance_id(provider_id) {
            // A job whose id was never recorded: by its name, among this user's jobs.
            c.arg("--me").arg(format!("--name={provider_id}"));
        } else {
            bail!("invalid Slurm job id {provider_id:?}");
        }
        match output(c, "scancel").await {
            Ok(_) => Ok(()),
            Err(e)
                if e.to_string().contains("Invalid job id")
                    || e.to_string().contains("already completing") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn list(&self, coordinator_tag: &str) -> Result<Vec<Listed>> {
        let mut q = self.tool("squeue");
        q.args(["--me", "-h", "-o", "%i|%T|%k"]);
        let out = output(q, "squeue").await?;
        let mut found = Vec::new();
        for line in out.lines() {
            let mut f = line.splitn(3, '|');
            let (Some(id), Some(state), Some(comment)) = (f.next(), f.next(), f.next()) else { continue };
            let tags = tags_of(comment);
            if tags.get(TAG_COORDINATOR).map(String::as_str) != Some(coordinator_tag) {
                continue;
            }
            let state = state_of(state);
            // Cancelled jobs linger as COMPLETING for a moment: nothing left to do.
            if state == InstanceState::Gone {
                continue;
            }
            found.push(Listed { provider_id: id.trim().to_string(), state, tags });
        }
        Ok(found)
    }

    async fn console(&self, provider_id: &str) -> Result<Option<String>> {
        // The log is named after the instance; the job id maps to it through squeue.
        let name = if valid_job_id(provider_id) {
            let mut q = self.tool("squeue");
            q.args(["-h", "-j", provider_id, "-o", "%j"]);
            output(q, "squeue").await.ok().and_then(|o| o.lines().next().map(str::to_string))
        } else {
            Some(provider_id.to_string())
        };
        let Some(name) = name.filter(|n| valid_instance_id(n)) else { return Ok(None) };
        Ok(std::fs::read(self.log_file(&name)).ok().map(|b| String::from_utf8_lossy(&b).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_through_a_comment() {
        let mut tags = BTreeMap::new();
        tags.insert("pype:coordinator".to_string(), "pype-0123456789ab".to_string());
        tags.insert("pype:instance".to_string(), "pype-i-00ff".to_string());
        let c = comment_of(&tags).unwrap();
        assert_eq!(c, "pype:coordinator=pype-0123456789ab pype:instance=pype-i-00ff");
        assert_eq!(tags_of(&c), tags);
        // An agent made for no step in particular: the empty step tag stays out.
        let mut with_empty = tags.clone();
        with_empty.insert("pype:step".into(), String::new());
        assert_eq!(comment_of(&with_empty).unwrap(), c);
        tags.insert("bad key".into(), "v".into());
        assert!(comment_of(&tags).is_err());
    }

    #[test]
    fn refusals() {
        assert!(is_refusal(
            "sbatch failed (exit status: 1): sbatch: error: Batch job submission failed: Invalid partition name specified"
        ));
        assert!(is_refusal(
            "sbatch: error: Batch job submission failed: Requested node configuration is not available"
        ));
        assert!(!is_refusal(
            "sbatch: error: Batch job submission failed: Unable to contact slurm controller"
        ));
    }

    #[test]
    fn job_ids_and_states() {
        assert!(valid_job_id("123") && valid_job_id("123_4"));
        assert!(!valid_job_id("") && !valid_job_id("12;rm") && !valid_job_id("_1") && !valid_job_id("-1"));
        assert_eq!(state_of("PENDING"), InstanceState::Pending);
        assert_eq!(state_of("RUNNING"), InstanceState::Running);
        assert_eq!(state_of("CANCELLED"), InstanceState::Gone);
        assert_eq!(state_of("TIMEOUT"), InstanceState::Gone);
    }

    #[test]
    fn the_embedded_script_execs_the_agent_with_the_instance_id() {
        assert!(SCRIPT.contains("exec \"$agent\" run"));
        assert!(SCRIPT.contains("PYPE_INSTANCE_ID"));
        assert!(SCRIPT.contains("PYPE_CA_B64"));
    }
}
