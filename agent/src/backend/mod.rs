//! Storage backends: the one abstraction through which a step's I/O goes. Every attempt
//! resolves one backend ([`resolve_backend`], the single dispatch point) and calls its eight
//! methods, in the order the seed design gives (see [`crate::step`]):
//!
//! `prepare_inputs` → `restore_program` → `prepare_outputs` → (snippet) → `harvest` per
//! harvested scratch dir on success → `cleanup`, always. `check_outputs` answers skip checks;
//! `prepare_build` / `stage_program` serve profile builds.
//!
//! Four methods have defaults, right for a backend that leaves files where the host has them
//! (`direct`, `overlay`): `restore_program`, `prepare_build` and `stage_program` do nothing
//! (programs stay installed on the host) and `check_outputs` stats the local paths.
//! `prepare_inputs`, `prepare_outputs`, `harvest` and `cleanup` have none: a backend that
//! forgot one would lose outputs or leave mounts and scratch behind.
//!
//! Built in: [`direct`] (no-ops), [`overlay`] (scratch dirs, harvested back in place),
//! [`snapshot`] (snapshots streamed from the coordinator, overlayfs views). Any other mode
//! names an external executable `pype-backend-<name>` spoken to over JSON lines ([`external`]).

pub mod direct;
pub mod external;
pub mod layers;
pub mod overlay;
pub mod snapshot;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, bail};
use async_trait::async_trait;
use protocol::RegistryEntry;
use serde::{Deserialize, Serialize};

use crate::cache::Cache;
use crate::mounts::NsMount;
use crate::remote::SnapshotRemote;
use crate::settings::Settings;

/// Connects a backend to path substitution (bio-pype's `OverlayVolume`, same fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayVolume {
    /// Original declared path.
    pub path: String,
    /// Parent directory of `path`.
    pub original_dir: String,
    /// Directory that maps to `original_dir` (the harvest source).
    pub scratch_dir: String,
    /// Counterpart of `path` in the view (the substitution target).
    pub bind_file: String,
    /// Whether to harvest this output after a successful run.
    pub harvest: bool,
}

/// How the snippet can see a prepared view at the original paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// Paths are real on the host (direct, or outputs written in place): nothing to do.
    Host,
    /// The view cannot be shown at the original paths: rewrite them.
    RewriteOnly,
    /// In a private mount namespace, these mounts show the view at the original paths; without
    /// one, paths are rewritten with the overlay volumes.
    Mounts(Vec<NsMount>),
}

#[async_trait]
pub trait StorageBackend: Send {
    /// The mode name (`direct`, `overlay`, `snapshot` or the external name).
    fn name(&self) -> &str;

    /// Makes declared inputs available at their expected paths (or adds volumes for them).
    async fn prepare_inputs(
        &mut self,
        inputs: &[String],
        overlay_volumes: &mut Vec<OverlayVolume>,
    ) -> Result<()>;

    /// Makes the program `{profile_name}/programs/{program_key}` available. By default
    /// nothing: the program is installed on the host.
    async fn restore_program(&mut self, _profile_name: &str, _program_key: &str) -> Result<()> {
        Ok(())
    }

    /// Intercepts writes to the declared outputs.
    async fn prepare_outputs(
        &mut self,
        outputs: &[String],
        output_harvest: &BTreeMap<String, bool>,
        overlay_volumes: &mut Vec<OverlayVolume>,
    ) -> Result<()>;

    /// Persists a completed output directory (`upper` is a volume's `scratch_dir`).
    async fn harvest(&mut self, upper: &Path, original_dir: &Path) -> Result<()>;

    /// Tears down mounts and transient storage. Called always, once.
    async fn cleanup(&mut self) -> Result<()>;

    /// `{path: Some(size)}` for present outputs, `{path: None}` for missing ones. A
    /// directory's size is the total of the files below it. By default the local paths are
    /// stat'ed ([`stat_local`]): outputs are where the step says.
    async fn check_outputs(&mut self, paths: &[String]) -> Result<BTreeMap<String, Option<u64>>> {
        stat_local(paths).await
    }

    /// Makes already-staged programs (`program_keys`: registry keys) appear at `paths`. By
    /// default nothing: a build finds earlier builds where they were installed.
    async fn prepare_build(&mut self, _paths: &[String], _program_keys: &[String]) -> Result<()> {
        Ok(())
    }

    /// Persists a freshly built artifact as `{profile_name}/programs/{program_key}`. By
    /// default nothing: the artifact stays where the build installed it.
    async fn stage_program(
        &mut self,
        _profile_name: &str,
        _program_key: &str,
        _artifact_path: &Path,
    ) -> Result<()> {
        Ok(())
    }

    /// How the snippet may see the view at the original paths (beyond bio-pype).
    fn view(&self) -> View {
        View::Host
    }

    /// Registry entries `harvest` and `stage_program` produced.
    fn take_new_entries(&mut self) -> Vec<(String, RegistryEntry)> {
        Vec::new()
    }
}

/// Everything a backend may need for one attempt.
#[derive(Clone)]
pub struct StepContext {
    pub settings: Arc<Settings>,
    pub attempt_id: u64,
    pub run: String,
    pub step: String,
    /// `<work>/steps/attempt-<id>`: private to this attempt, removed by cleanup.
    pub step_dir: PathBuf,
    pub cache: Arc<Cache>,
    pub remote: Arc<dyn SnapshotRemote>,
    /// The registry to resolve paths with, when not the agent's registry file (the backend a
    /// step's processes call through [`crate::served`]: the coordinator's working registry
    /// and what the attempt harvested so far).
    pub registry: Option<Arc<protocol::Registry>>,
}

pub const BUILT_IN: &[&str] = &["direct", "overlay", "snapshot"];

/// The single dispatch point: picks the backend `settings.overlay_mode` names.
pub async fn resolve_backend(ctx: &StepContext) -> Result<Box<dyn StorageBackend>> {
    let mode = ctx.settings.overlay_mode.as_str();
    Ok(match mode {
        "direct" | "" => Box::new(direct::Direct),
        "overlay" => Box::new(overlay::Overlay::new(ctx)?),
        // The agent's registry file is read and parsed for the attempt: a large one on a
        // blocking thread (it grows with what this agent ever harvested or was sent), a small
        // one here (a thread hop would cost an empty step more than the read).
        "snapshot"
            if ctx.registry.is_none() && file_len(&ctx.settings.snapshot_registry) > REGISTRY_READ_INLINE =>
        {
            let c = ctx.clone();
            Box::new(tokio::task::spawn_blocking(move || snapshot::Snapshot::new(&c)).await??)
        }
        "snapshot" => Box::new(snapshot::Snapshot::new(ctx)?),
        name => {
            let (found, searched) = find_external(name, &ctx.settings.queues);
            match found {
                Some(exe) => Box::new(external::External::start(name, &exe, ctx).await?),
                None => bail!(
                    "unknown PYPE_OVERLAY_MODE {name:?}: valid modes are {}, or the name of an external backend \
                     (an executable pype-backend-{name}); looked in {}",
                    BUILT_IN.join(", "),
                    if searched.is_empty() { "no directories".into() } else { searched.join(", ") }
                ),
            }
        }
    })
}

/// Registry files up to this size are read on the runtime thread.
const REGISTRY_READ_INLINE: u64 = 64 << 10;

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Looks for `pype-backend-<name>` in the `PYPE_QUEUES` dirs, then `PATH`.
fn find_external(name: &str, queues: &[PathBuf]) -> (Option<PathBuf>, Vec<String>) {
    let mut searched = Vec::new();
    let valid =
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    let path_dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    for dir in queues.iter().chain(path_dirs.iter()) {
        searched.push(dir.display().to_string());
        if !valid {
            continue;
        }
        let candidate = dir.join(format!("pype-backend-{name}"));
        if is_executable(&candidate) {
            return (Some(candidate), searched);
        }
    }
    (None, searched)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Reads the snapshot registry file; a missing file is an empty registry.
pub fn read_registry(path: &Path) -> Result<protocol::Registry> {
    use anyhow::Context;
    match std::fs::read_to_string(path) {
        Ok(t) => protocol::Registry::parse(&t).with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(protocol::Registry::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// [`stat_paths`] on a blocking thread: `check_outputs` of the backends that use local paths.
pub async fn stat_local(paths: &[String]) -> Result<BTreeMap<String, Option<u64>>> {
    let paths = paths.to_vec();
    Ok(tokio::task::spawn_blocking(move || stat_paths(&paths)).await?)
}

/// Stats each path: a file's length, a directory's total, `None` when missing.
pub fn stat_paths(paths: &[String]) -> BTreeMap<String, Option<u64>> {
    paths.iter().map(|p| (p.clone(), local_size(Path::new(p)))).collect()
}

pub fn local_size(p: &Path) -> Option<u64> {
    let meta = std::fs::symlink_metadata(p).ok()?;
    if meta.is_dir() {
        let mut total = 0;
        let mut stack = vec![p.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).ok()?.flatten() {
                match e.file_type() {
                    Ok(t) if t.is_dir() => stack.push(e.path()),
                    Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                    _ => {}
                }
            }
        }
        Some(total)
    } else if meta.is_file() {
        Some(meta.len())
    } else {
        Some(0)
    }
}

/// Parent directory of a declared path, as a string.
pub fn parent_of(path: &str) -> String {
    match Path::new(path).parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_string_lossy().into_owned(),
        _ => "/".into(),
    }
}
