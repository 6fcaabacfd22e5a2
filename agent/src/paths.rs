//! Path helpers shared by the backends and the cache.

use std::path::{Component, Path, PathBuf};

use anyhow::{Result, bail};

/// `rel` as plain components (relative, no `..`, no root; `.` dropped).
pub fn plain(rel: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => bail!("{} is not a plain relative path (no '..', not absolute)", rel.display()),
        }
    }
    Ok(out)
}
