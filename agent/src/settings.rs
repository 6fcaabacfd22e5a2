//! The agent's storage settings, read once at start: each `PYPE_*` key from the environment,
//! else from the agent's config file (`KEY=VALUE` lines, the format of a systemd
//! `EnvironmentFile`), else its default.
//!
//! | key | default |
//! |---|---|
//! | `PYPE_OVERLAY_MODE` | `direct` (also `overlay`, `snapshot`, or an external backend name) |
//! | `PYPE_OVERLAY_SCRATCH` | `<work-dir>/scratch`; `$VAR` and `${VAR}` are expanded per step |
//! | `PYPE_SNAPSHOT_REGISTRY` | `/var/lib/pype/snapshot_registry.json` |
//! | `PYPE_QUEUES` | empty; `:`-separated directories searched for `pype-backend-<name>` |
//! | `PYPE_CACHE_SIZE_BYTES` | 21474836480 (20 GiB) of restored snapshots kept |
//! | `PYPE_OVERLAY_MOUNT` | `auto`: mount overlayfs when root; `never`: build views with hardlinks |
//! | `PYPE_MOUNT_NAMESPACE` | `auto`: present views at the original paths in a private mount namespace when root; `never`: rewrite paths |
//! | `PYPE_CGROUPS` | `auto`: measure (and limit) each attempt in a cgroup of its own when possible; `never`: sample its process group |
//! | `PYPE_LAUNCHER` | `auto`: start snippets from a warm bash (a fork, no exec) where that gives them what `bash -c` does; `never`: always `bash -c` |
//!
//! Connection keys (also flags of `pype-agent run`): `PYPE_COORDINATOR`, `PYPE_TOKEN`,
//! `PYPE_CA`, `PYPE_INSTANCE_ID`, `PYPE_AGENT_STATE_DIR`, `PYPE_WORK_DIR`, `PYPE_SLOTS`,
//! `PYPE_LABELS` (`k=v,k=v`); for ephemeral instances `PYPE_ORPHAN_TIMEOUT_SECS` (give up
//! after that long without a coordinator), `PYPE_ORPHAN_ACTION` (`exit` or `poweroff`) and
//! `PYPE_REGISTRY_FETCH=1` (fetch the registry over QUIC after connecting).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub const DEFAULT_REGISTRY: &str = "/var/lib/pype/snapshot_registry.json";
const DEFAULT_CACHE_SIZE_BYTES: u64 = 20 << 30;

/// Keys the config file may hold: the storage keys and the connection keys `pype-agent run`
/// also takes as flags.
const KNOWN_KEYS: &[&str] = &[
    "PYPE_OVERLAY_MODE",
    "PYPE_OVERLAY_SCRATCH",
    "PYPE_SNAPSHOT_REGISTRY",
    "PYPE_QUEUES",
    "PYPE_CACHE_SIZE_BYTES",
    "PYPE_OVERLAY_MOUNT",
    "PYPE_MOUNT_NAMESPACE",
    "PYPE_CGROUPS",
    "PYPE_LAUNCHER",
    "PYPE_COORDINATOR",
    "PYPE_TOKEN",
    "PYPE_INSTANCE_ID",
    "PYPE_CA",
    "PYPE_AGENT_STATE_DIR",
    "PYPE_WORK_DIR",
    "PYPE_ORPHAN_TIMEOUT_SECS",
    "PYPE_ORPHAN_ACTION",
    "PYPE_SLOTS",
    "PYPE_LABELS",
    "PYPE_REGISTRY_FETCH",
];

#[derive(Debug, Clone)]
pub struct Settings {
    pub overlay_mode: String,
    /// Unexpanded; see [`Settings::scratch_root`].
    pub overlay_scratch: Option<String>,
    pub snapshot_registry: PathBuf,
    pub queues: Vec<PathBuf>,
    pub cache_size_bytes: u64,
    pub mount_overlay: bool,
    pub mount_namespace: bool,
    /// `PYPE_CGROUPS`: measure (and limit) each attempt in a cgroup of its own when the agent
    /// can create one (`auto`), or never (`never`: its process group is sampled instead).
    pub cgroups: bool,
    /// `PYPE_LAUNCHER`: start snippets from a warm bash when that gives them what `bash -c`
    /// would (`auto`), or always with `bash -c` (`never`). See `launcher.rs`.
    pub launcher: bool,
    pub work_dir: PathBuf,
}

/// A parsed config file.
#[derive(Debug, Clone, Default)]
pub struct ConfigFile {
    pub values: BTreeMap<String, String>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading agent config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in agent config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut values = BTreeMap::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let Some((k, v)) = line.split_once('=') else {
                bail!("line {}: expected KEY=VALUE, got {raw:?}", n + 1);
            };
            let k = k.trim();
            if !KNOWN_KEYS.contains(&k) {
                bail!("line {}: unknown key {k:?} (known: {})", n + 1, KNOWN_KEYS.join(", "));
            }
            let v = v.trim();
            let v = match (v.chars().next(), v.chars().last()) {
                (Some(q @ ('"' | '\'')), Some(e)) if q == e && v.len() >= 2 => &v[1..v.len() - 1],
                _ => v,
            };
            values.insert(k.to_string(), v.to_string());
        }
        Ok(Self { values })
    }

    /// The environment's value, else the file's.
    pub fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty()).or_else(|| self.values.get(key).cloned())
    }
}

fn policy(cfg: &ConfigFile, key: &str) -> Result<bool> {
    match cfg.get(key).as_deref() {
        None | Some("auto") => Ok(true),
        Some("never") => Ok(false),
        Some(other) => bail!("{key}={other:?}: expected auto or never"),
    }
}

impl Settings {
    pub fn from_config(cfg: &ConfigFile, work_dir: &Path) -> Result<Self> {
        let cache_size_bytes = match cfg.get("PYPE_CACHE_SIZE_BYTES") {
            None => DEFAULT_CACHE_SIZE_BYTES,
            Some(v) => {
                v.parse().with_context(|| format!("PYPE_CACHE_SIZE_BYTES={v:?} is not a number of bytes"))?
            }
        };
        Ok(Self {
            overlay_mode: cfg.get("PYPE_OVERLAY_MODE").unwrap_or_else(|| "direct".into()),
            overlay_scratch: cfg.get("PYPE_OVERLAY_SCRATCH"),
            snapshot_registry: cfg
                .get("PYPE_SNAPSHOT_REGISTRY")
                .map_or_else(|| PathBuf::from(DEFAULT_REGISTRY), PathBuf::from),
            queues: cfg
                .get("PYPE_QUEUES")
                .map(|q| q.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect())
                .unwrap_or_default(),
            cache_size_bytes,
            mount_overlay: policy(cfg, "PYPE_OVERLAY_MOUNT")?,
            mount_namespace: policy(cfg, "PYPE_MOUNT_NAMESPACE")?,
            cgroups: policy(cfg, "PYPE_CGROUPS")?,
            launcher: policy(cfg, "PYPE_LAUNCHER")?,
            work_dir: work_dir.to_path_buf(),
        })
    }

    /// The overlay scratch root with `$VAR` / `${VAR}` expanded from the agent's environment.
    pub fn scratch_root(&self) -> Result<PathBuf> {
        match &self.overlay_scratch {
            None => Ok(self.work_dir.join("scratch")),
            Some(raw) => {
                let expanded = expand_vars(raw, |k| std::env::var(k).ok())
                    .with_context(|| format!("expanding PYPE_OVERLAY_SCRATCH={raw:?}"))?;
                Ok(PathBuf::from(expanded))
            }
        }
    }
}

/// Expands `$NAME` and `${NAME}`; an unset variable is an error (a scratch dir under the wrong
/// root is worse than none).
pub fn expand_vars(s: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, consumed) = if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').with_context(|| format!("unclosed ${{ in {s:?}"))?;
            (&body[..end], end + 2)
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..end], end)
        };
        if name.is_empty() {
            out.push('$');
            rest = after;
            continue;
        }
        let value = lookup(name).with_context(|| format!("variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_lines() {
        let cfg = ConfigFile::parse("# comment\nexport PYPE_OVERLAY_MODE=overlay\nPYPE_QUEUES='/a:/b'\n\n")
            .unwrap();
        assert_eq!(cfg.values["PYPE_OVERLAY_MODE"], "overlay");
        assert_eq!(cfg.values["PYPE_QUEUES"], "/a:/b");
        let err = ConfigFile::parse("PYPE_OVERLAY_MOOD=x").unwrap_err();
        assert!(format!("{err:#}").contains("line 1: unknown key \"PYPE_OVERLAY_MOOD\""), "{err:#}");
        assert!(ConfigFile::parse("no equals sign").is_err());
    }

    #[test]
    fn vars_expand_or_fail() {
        let env = |k: &str| match k {
            "SLURM_TMPDIR" => Some("/tmp/job7".to_string()),
            _ => None,
        };
        assert_eq!(expand_vars("$SLURM_TMPDIR/pype", env).unwrap(), "/tmp/job7/pype");
        assert_eq!(expand_vars("${SLURM_TMPDIR}x/$", env).unwrap(), "/tmp/job7x/$");
        assert!(expand_vars("$NOPE/pype", env).is_err());
        assert!(expand_vars("${SLURM_TMPDIR", env).is_err());
    }
}
