//! One step attempt through its storage backend, in the seed design's order.
//!
//! `run`: resolve the backend once, `prepare_inputs`, `restore_program` when the step names a
//! program (a profile build calls `prepare_build` instead), `prepare_outputs`, then either a
//! private mount namespace showing the view at the original paths or path substitution, then
//! the snippet. `close`: on exit code 0, `harvest` each distinct scratch dir with
//! `harvest = true` (a build calls `stage_program` per artifact); then `cleanup`, always:
//! after failure, timeout, cancellation and agent shutdown alike.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use protocol::{LogLine, Registry, RegistryEntry, ResourceUsage, StepExit, StepKind, StepOutcome, StepSpec};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backend::{self, OverlayVolume, StepContext, StorageBackend, View};
use crate::cache::{Cache, remove_tree};
use crate::exec::{self, ExecEnd, ExecSpec};
use crate::mounts::{self, NsPlan};
use crate::remote::SnapshotRemote;
use crate::settings::Settings;
use crate::{served, subst};

/// The step's `resources.memory` in bytes, which the coordinator puts in the step's
/// environment (its `PYPE_RS_` variables are the coordinator's to set): the attempt's cgroup
/// enforces it.
pub const MEMORY_ENV: &str = "PYPE_RS_MEMORY_BYTES";

/// What every attempt on this agent shares.
#[derive(Clone)]
pub struct Steps {
    pub settings: Arc<Settings>,
    pub cache: Arc<Cache>,
    pub remote: Arc<dyn SnapshotRemote>,
    /// Serializes read-modify-write of the agent's registry file.
    pub registry_lock: Arc<tokio::sync::Mutex<()>>,
    /// Warm shells that start snippets (`None`: every snippet starts with `bash -c`).
    pub launchers: Option<Arc<crate::launcher::Launchers>>,
}

/// Called once the snippet is about to start: backend name and how the view is shown.
pub type OnStart = Box<dyn FnOnce(&str, &str) + Send>;

impl Steps {
    pub fn step_dir(&self, attempt_id: u64) -> PathBuf {
        self.settings.work_dir.join("steps").join(format!("attempt-{attempt_id}"))
    }

    /// The attempt's script, whose first line names the process group running it (kept with
    /// its logs: a later agent kills that group only if its leader is still the same process).
    fn record(&self, spec: &StepSpec) -> PathBuf {
        self.log_dir(spec).join("command.sh")
    }

    pub fn log_dir(&self, spec: &StepSpec) -> PathBuf {
        self.settings.work_dir.join("logs").join(format!("attempt-{}", spec.attempt_id))
    }

    pub(crate) fn context(&self, attempt_id: u64, run: &str, step: &str) -> StepContext {
        StepContext {
            settings: self.settings.clone(),
            attempt_id,
            run: run.to_string(),
            step: step.to_string(),
            step_dir: self.step_dir(attempt_id),
            cache: self.cache.clone(),
            remote: self.remote.clone(),
            registry: None,
        }
    }

    /// Merges `entries` into the agent's registry file (atomically rewritten).
    pub async fn merge_registry(&self, entries: &[(String, RegistryEntry)]) -> Result<()> {
        self.sync_registry(&[], entries).await
    }

    /// Merges `entries`, and first drops this agent's entries for `paths` that the
    /// coordinator did not send: for the paths it names, the coordinator's registry is the
    /// truth (an entry an operator deleted there is missing here too).
    pub async fn sync_registry(&self, paths: &[String], entries: &[(String, RegistryEntry)]) -> Result<()> {
        if entries.is_empty() && paths.is_empty() {
            return Ok(());
        }
        let _g = self.registry_lock.lock().await;
        // The whole file is read, parsed, rewritten and synced, which grows with the registry:
        // on a blocking thread (the lock above is held across it).
        let path = self.settings.snapshot_registry.clone();
        let (paths, entries) = (paths.to_vec(), entries.to_vec());
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut reg = backend::read_registry(&path)?;
            let mut changed = 0;
            for p in &paths {
                if !entries.iter().any(|(k, _)| k == p) && reg.entries.remove(p).is_some() {
                    changed += 1;
                }
            }
            if reg.merge(entries) + changed > 0 {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                }
                transport::pki::write_file(&path, reg.to_json().as_bytes(), 0o644)?;
            }
            Ok(())
        })
        .await?
    }

    /// `check_outputs` through a fresh backend (its cleanup runs too).
    pub async fn check_outputs(
        &self,
        paths: &[String],
        registry: &[(String, RegistryEntry)],
    ) -> Result<Vec<(String, Option<u64>)>> {
        self.sync_registry(paths, registry).await?;
        let id = rand::random::<u64>() >> 1;
        let ctx = self.context(id, "check", "check");
        let mut b = backend::resolve_backend(&ctx).await?;
        let r = b.check_outputs(paths).await;
        let c = b.cleanup().await;
        let sizes = r?;
        c?;
        Ok(paths.iter().map(|p| (p.clone(), sizes.get(p).copied().flatten())).collect())
    }

    /// Runs one attempt to its end; never fails: every failure is in the outcome.
    pub async fn run(
        &self,
        spec: StepSpec,
        cancel: CancellationToken,
        lines: mpsc::Sender<LogLine>,
        on_start: OnStart,
    ) -> (StepOutcome, Option<ResourceUsage>) {
        let started = Instant::now();
        let mut usage = None;
        let mut outcome = StepOutcome {
            attempt_id: spec.attempt_id,
            exit: StepExit::SetupFailed,
            error: None,
            backend: self.settings.overlay_mode.clone(),
            outputs: Vec::new(),
            new_entries: Vec::new(),
            elapsed_ms: 0,
        };
        let declared: Vec<String> = spec.inputs.iter().chain(&spec.outputs).cloned().collect();
        if let Err(e) = self.sync_registry(&declared, &spec.registry).await {
            outcome.error = Some(format!("{e:#}"));
            return (outcome, usage);
        }
        let ctx = self.context(spec.attempt_id, &spec.run, &spec.step);
        let mut backend = match backend::resolve_backend(&ctx).await {
            Ok(b) => b,
            Err(e) => {
                outcome.error = Some(format!("{e:#}"));
                return (outcome, usage);
            }
        };
        outcome.backend = backend.name().to_string();
        let result =
            self.run_with(&spec, backend.as_mut(), &cancel, lines, on_start, &mut outcome, &mut usage).await;
        if let Err(e) = result {
            outcome.error = Some(format!("{e:#}"));
        }
        // Cleanup, always.
        if let Err(e) = backend.cleanup().await {
            warn!(attempt = spec.attempt_id, "cleanup failed: {e:#}");
            let msg = format!("cleanup failed: {e:#}");
            outcome.error = Some(match outcome.error.take() {
                Some(prev) => format!("{prev}; {msg}"),
                None => msg,
            });
        }
        let step_dir = self.step_dir(spec.attempt_id);
        if step_dir.exists() && mounts::mounts_under(&step_dir).is_empty() {
            remove_tree(&step_dir);
        }
        // What the snippet's own processes harvested through the served backend comes first.
        outcome.new_entries.extend(backend.take_new_entries());
        // Only a successful attempt's entries (a failed one's chunks may have harvested).
        if !outcome.succeeded() {
            outcome.new_entries.clear();
        }
        if let Err(e) = self.merge_registry(&outcome.new_entries).await {
            warn!("could not record new registry entries: {e:#}");
        }
        if !outcome.new_entries.is_empty() {
            let mut reg = Registry::default();
            reg.merge(outcome.new_entries.iter().cloned());
            let path = self.log_dir(&spec).join("snapshot_registry.json");
            if let Err(e) = transport::pki::write_file(&path, reg.to_json().as_bytes(), 0o644) {
                warn!(path = %path.display(), "could not write: {e:#}");
            }
        }
        outcome.elapsed_ms = started.elapsed().as_millis() as u64;
        (outcome, usage)
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_with(
        &self,
        spec: &StepSpec,
        backend: &mut dyn StorageBackend,
        cancel: &CancellationToken,
        lines: mpsc::Sender<LogLine>,
        on_start: OnStart,
        outcome: &mut StepOutcome,
        usage: &mut Option<ResourceUsage>,
    ) -> Result<()> {
        let log_dir = self.log_dir(spec);
        // The snippet works in its attempt's log directory: what it leaves there stays with its
        // logs. (No per-step directory is created and deleted for a step whose backend needs
        // none: on ext4, allocating inodes next to many recently deleted ones is slow.)
        let cwd = log_dir.clone();
        std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        let mut ovs: Vec<OverlayVolume> = Vec::new();
        backend.prepare_inputs(&spec.inputs, &mut ovs).await.context("prepare_inputs")?;
        let (outputs, harvest): (Vec<String>, BTreeMap<String, bool>) = match &spec.kind {
            StepKind::Run => {
                if let Some(p) = &spec.program {
                    backend.restore_program(&p.profile, &p.key).await.context("restore_program")?;
                }
                let h = spec.outputs.iter().map(|o| (o.clone(), !spec.no_harvest.contains(o))).collect();
                (spec.outputs.clone(), h)
            }
            StepKind::Build { profile, programs } => {
                let paths: Vec<String> = programs.iter().map(|p| p.artifact_path.clone()).collect();
                let keys: Vec<String> =
                    programs.iter().map(|p| protocol::registry::program_key(profile, &p.key)).collect();
                backend.prepare_build(&paths, &keys).await.context("prepare_build")?;
                let h = paths.iter().map(|p| (p.clone(), false)).collect();
                (paths, h)
            }
        };
        backend.prepare_outputs(&outputs, &harvest, &mut ovs).await.context("prepare_outputs")?;
        if cancel.is_cancelled() {
            outcome.exit = StepExit::Cancelled;
            return Ok(());
        }

        // Show the view: a private namespace when possible, else rewrite paths.
        let (namespace, pairs, how) = match backend.view() {
            View::Host => (None, Vec::new(), "host paths".to_string()),
            View::Mounts(m) if self.settings.mount_namespace && mounts::can_mount() => {
                for mnt in &m {
                    let target = match mnt {
                        mounts::NsMount::Bind { dst, .. } => dst,
                        mounts::NsMount::Overlay { target, .. } => target,
                    };
                    create_mount_point(target)?;
                }
                (
                    Some(NsPlan::new(&m).context("preparing the mount namespace")?),
                    Vec::new(),
                    "mount namespace".into(),
                )
            }
            View::Mounts(_) | View::RewriteOnly => {
                let pairs: Vec<(String, String)> =
                    ovs.iter().map(|v| (v.path.clone(), v.bind_file.clone())).collect();
                (None, pairs, "rewritten paths".into())
            }
        };
        let script = subst::substitute(&spec.command, &pairs);
        let mut env: Vec<(String, String)> =
            spec.env.iter().map(|(k, v)| (k.clone(), subst::substitute(v, &pairs))).collect();
        let effective = |p: &str| subst::substitute(p, &pairs);
        for (i, p) in spec.inputs.iter().enumerate() {
            env.push((format!("PYPE_INPUT_{}", i + 1), effective(p)));
        }
        for (i, p) in outputs.iter().enumerate() {
            env.push((format!("PYPE_OUTPUT_{}", i + 1), effective(p)));
        }
        let served = if matches!(spec.kind, StepKind::Run) && served::wanted(spec) {
            let s =
                served::Served::start(self, spec).await.context("serving the storage backend to the step")?;
            env.push((served::SOCKET_ENV.to_string(), s.socket.to_string_lossy().into_owned()));
            Some(s)
        } else {
            None
        };
        info!(attempt = spec.attempt_id, backend = %backend.name(), view = %how, "running snippet");
        let memory_limit = spec
            .env
            .iter()
            .find(|(k, _)| k == MEMORY_ENV)
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .filter(|&b| b > 0);
        let meter = crate::usage::Meter::new(self.settings.cgroups, spec.attempt_id, memory_limit);
        on_start(backend.name(), &how);
        let end = exec::run(
            ExecSpec {
                script,
                env,
                cwd,
                stdout_log: log_dir.join("stdout.log"),
                stderr_log: log_dir.join("stderr.log"),
                timeout: spec.timeout_secs.map(Duration::from_secs),
                namespace,
                record: self.record(spec),
                meter: Some(meter),
                launchers: self.launchers.clone(),
            },
            cancel,
            lines,
        )
        .await;
        if let Some(s) = served {
            outcome.new_entries = s.finish().await;
        }
        let (end, used) = end?;
        let oom = used.as_ref().filter(|u| u.oom_killed).map(|u| u.memory_limit_bytes);
        *usage = used;
        outcome.exit = match end {
            ExecEnd::Exited(c) => StepExit::Exited(c),
            ExecEnd::Signalled(s) => StepExit::Signalled(s),
            ExecEnd::TimedOut => StepExit::TimedOut,
            ExecEnd::Cancelled => StepExit::Cancelled,
        };
        // A snippet the out-of-memory killer ended (not one that timed out or was cancelled).
        let killed = matches!(end, ExecEnd::Signalled(_)) || matches!(end, ExecEnd::Exited(c) if c != 0);
        if killed && let Some(limit) = oom {
            outcome.error = Some(match limit {
                Some(l) => format!(
                    "killed by the out-of-memory killer: the step used all of its memory limit of {} MiB \
                     (resources.memory)",
                    l >> 20
                ),
                None => "killed by the out-of-memory killer".to_string(),
            });
            return Ok(());
        }
        if end != ExecEnd::Exited(0) {
            outcome.error = Some(match end {
                ExecEnd::Exited(c) => format!("snippet exited with code {c}"),
                ExecEnd::Signalled(s) => format!("snippet killed by signal {s}"),
                ExecEnd::TimedOut => format!("timed out after {}s", spec.timeout_secs.unwrap_or(0)),
                ExecEnd::Cancelled => "cancelled".into(),
            });
            return Ok(());
        }

        // Close: harvest on success.
        let closed = async {
            match &spec.kind {
                StepKind::Run => {
                    let mut seen = BTreeSet::new();
                    for v in ovs.iter().filter(|v| v.harvest) {
                        if seen.insert(v.scratch_dir.clone()) {
                            backend
                                .harvest(Path::new(&v.scratch_dir), Path::new(&v.original_dir))
                                .await
                                .context("harvest")?;
                        }
                    }
                }
                StepKind::Build { profile, programs } => {
                    for p in programs {
                        backend
                            .stage_program(profile, &p.key, Path::new(&p.artifact_path))
                            .await
                            .context("stage_program")?;
                    }
                }
            }
            anyhow::Ok(())
        };
        if let Err(e) = closed.await {
            outcome.exit = StepExit::HarvestFailed;
            return Err(e);
        }
        // Outputs as the backend now sees them (after harvest: at their real place).
        match backend.check_outputs(&outputs).await {
            Ok(sizes) => {
                outcome.outputs =
                    outputs.iter().map(|o| (o.clone(), sizes.get(o).copied().flatten())).collect()
            }
            Err(e) => warn!("check_outputs after harvest failed: {e:#}"),
        }
        Ok(())
    }
}

/// Creates the (empty) directory a namespace mount goes on, and its parents. It stays after
/// the step: removing it would detach the mounts of concurrent steps that use the same
/// mount point in their own namespaces (the kernel lazily unmounts them).
fn create_mount_point(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating mount point {}", dir.display()))
}

/// Removes what attempts of an earlier agent process left: mounts and step directories under
/// `<work>/steps`, and `attempt-*` scratch dirs under the overlay scratch root.
pub fn sweep_leftovers(settings: &Settings) {
    let steps = settings.work_dir.join("steps");
    if let Ok(rd) = std::fs::read_dir(settings.work_dir.join("logs")) {
        for e in rd.flatten() {
            // `pid` is where an agent before this one recorded the group.
            if exec::kill_recorded(&e.path().join("command.sh")) || exec::kill_recorded(&e.path().join("pid"))
            {
                warn!(log_dir = %e.path().display(), "killed a snippet an earlier agent left running");
            }
        }
    }
    for m in mounts::mounts_under(&settings.work_dir) {
        match mounts::unmount(&m) {
            Ok(()) => warn!(mount = %m.display(), "unmounted a leftover of an earlier agent"),
            Err(e) => warn!(mount = %m.display(), "cannot unmount a leftover: {e}"),
        }
    }
    let mut roots = vec![steps];
    if let Ok(s) = settings.scratch_root() {
        roots.push(s);
    }
    for root in roots {
        let Ok(rd) = std::fs::read_dir(&root) else { continue };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("attempt-") {
                warn!(path = %e.path().display(), "removing a leftover of an earlier agent");
                remove_tree(&e.path());
            }
        }
    }
}
