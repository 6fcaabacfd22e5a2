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
        let located = |span: Option<std::ops::Range<usize>>, message: &str| {
            let at = span.map(|s| {
                let (line, col) = line_col(&text, s.start);
                format!(":{line}:{col}")
            });
            anyhow::anyhow!("{}{}: {}", path.display(), at.unwrap_or_default(), message.trim())
        };
        check_store_keys(&text).map_err(|(span, m)| located(span, &m))?;
        toml::from_str(&text).map_err(|e| located(e.span(), e.message()))
    }
}

/// Line and column (from 1) of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut at = offset.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Refuses a key of `[store]` its kind does not have, at the key's own place: the tagged
/// enum that reads the table would report it at the table, or (for `local`) not at all.
fn check_store_keys(text: &str) -> Result<(), (Option<std::ops::Range<usize>>, String)> {
    use toml::de::{DeTable, DeValue};
    // Syntax errors are left to the full parse, which reports them.
    let Ok(doc) = DeTable::parse(text) else { return Ok(()) };
    let Some(store) = doc.get_ref().get("store") else { return Ok(()) };
    let DeValue::Table(table) = store.get_ref() else { return Ok(()) };
    let kind = match table.get("kind").map(|k| k.get_ref()) {
        None => "local".to_string(),
        Some(DeValue::String(k)) => k.to_string(),
        // A kind of the wrong type: the full parse names it.
        Some(_) => return Ok(()),
    };
    let known: Vec<String> = match kind.as_str() {
        "local" => Vec::new(),
        "s3" => serde_json::to_value(crate::store::S3Config::default())
            .ok()
            .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect()))
            .unwrap_or_default(),
        _ => return Ok(()),
    };
    for (key, _) in table.iter() {
        let name = key.get_ref();
        if name != "kind" && !known.iter().any(|k| k == name) {
            let expected = if known.is_empty() {
                "it has only `kind`".to_string()
            } else {
                format!(
                    "expected one of `kind`, {}",
                    known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
                )
            };
            return Err((
                Some(key.span()),
                format!("unknown key `{name}` in a [store] of kind {kind:?}: {expected}"),
            ));
        }
    }
    Ok(())
}

/// The snapshot store `state_dir`'s config names.
pub fn open_store(state_dir: &Path) -> Result<Arc<dyn SnapshotStore>> {
    crate::store::open(state_dir, &CoordinatorConfig::load(state_dir)?.store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<CoordinatorConfig> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("coordinator.toml"), text).unwrap();
        CoordinatorConfig::load(dir.path())
    }

    #[test]
    fn unknown_store_keys_are_refused_where_they_are() {
        let e = load("# store\n[store]\nkind = \"local\"\n  bucket = \"b\"\n").unwrap_err().to_string();
        assert!(e.ends_with("coordinator.toml:4:3: unknown key `bucket` in a [store] of kind \"local\": it has only `kind`"), "{e}");
        let e = load("[store]\nbucket = \"b\"\n").unwrap_err().to_string();
        assert!(
            e.contains("coordinator.toml:2:1: unknown key `bucket` in a [store] of kind \"local\""),
            "{e}"
        );
        let e = load("[store]\nkind = \"s3\"\nbucket = \"b\"\n\nregoin = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("coordinator.toml:5:1: unknown key `regoin` in a [store] of kind \"s3\""), "{e}");
        assert!(e.contains("`region`") && e.contains("`cache_max_mib`"), "{e}");
        let e = load("store = { kind = \"s3\", bucket = \"b\", part_size = 5 }\n").unwrap_err().to_string();
        assert!(e.contains("coordinator.toml:1:38: unknown key `part_size`"), "{e}");
        let e = load("[store]\nkind = \"ftp\"\n").unwrap_err().to_string();
        assert!(e.contains("coordinator.toml:2:"), "{e}");
        let e = load("[stor]\nkind = \"s3\"\n").unwrap_err().to_string();
        assert!(e.contains("coordinator.toml:1:2: unknown field `stor`"), "{e}");
        let ok = load("[store]\nkind = \"s3\"\nbucket = \"b\"\nregion = \"eu-west-1\"\npart_size_mib = 8\n")
            .unwrap();
        assert!(matches!(ok.store, StoreConfig::S3(ref c) if c.bucket == "b" && c.part_size_mib == 8));
        assert!(matches!(load("[store]\nkind = \"local\"\n").unwrap().store, StoreConfig::Local));
    }
}
