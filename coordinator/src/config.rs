//! The coordinator config file (TOML): `--config FILE`, else `<state>/coordinator.toml` when
//! it exists. Today it holds the `[store]` table: where snapshots live.
//!
//! ```toml
//! [store]
//! kind = "s3"                 # or "local" (the default): <state>/snapshots
//! bucket = "my-pype-snapshots"
//! prefix = "pype/snapshots"
//! region = "eu-west-1"
//! part_size_mib = 16
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::store::{SnapshotStore, StoreConfig};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    pub store: StoreConfig,
}

/// The `--config` given on the command line, if any (set once at start).
static EXPLICIT: OnceLock<PathBuf> = OnceLock::new();

pub fn set_explicit(path: PathBuf) {
    let _ = EXPLICIT.set(path);
}

impl CoordinatorConfig {
    /// The config for `state_dir`: `--config`, else `<state>/coordinator.toml`, else defaults.
    pub fn load(state_dir: &Path) -> Result<Self> {
        let path = match EXPLICIT.get() {
            Some(p) => p.clone(),
            None => {
                let p = state_dir.join("coordinator.toml");
                if !p.exists() {
                    return Ok(Self::default());
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading coordinator config {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            let at = e
                .span()
                .map(|s| format!(":{}", text[..s.start.min(text.len())].matches('\n').count() + 1))
                .unwrap_or_default();
            anyhow::anyhow!("{}{at}: {}", path.display(), e.message())
        })
    }
}

/// The snapshot store `state_dir`'s config names.
pub fn open_store(state_dir: &Path) -> Result<Arc<dyn SnapshotStore>> {
    crate::store::open(state_dir, &CoordinatorConfig::load(state_dir)?.store)
}
