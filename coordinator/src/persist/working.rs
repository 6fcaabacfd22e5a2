//! The coordinator's working registry: `<state>/snapshot_registry.json`, in bio-pype's format.
//!
//! Every change is a read-modify-write under an exclusive lock on a lock file beside it, and
//! the file is replaced atomically (temporary file, fsync, rename), so concurrent harvests,
//! and an operator's `registry import` while a run goes on, never lose entries and a reader
//! never sees half a file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use protocol::{Registry, RegistryEntry};

pub struct WorkingRegistry {
    path: PathBuf,
    lock_path: PathBuf,
    /// Serialises writers inside this process; the file lock does it across processes.
    local: Mutex<()>,
}

pub const FILE_NAME: &str = "snapshot_registry.json";

impl WorkingRegistry {
    pub fn open(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
        Ok(Self {
            path: state_dir.join(FILE_NAME),
            lock_path: state_dir.join(format!("{FILE_NAME}.lock")),
            local: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> Result<Registry> {
        crate::pipeline::stepfile::read_registry(&self.path)
    }

    /// Applies `change` to the current file contents and writes the result back atomically.
    pub fn update<T>(&self, change: impl FnOnce(&mut Registry) -> T) -> Result<T> {
        let _local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .with_context(|| format!("opening {}", self.lock_path.display()))?;
        lock.lock().with_context(|| format!("locking {}", self.lock_path.display()))?;
        let mut reg = self.load()?;
        let out = change(&mut reg);
        crate::pipeline::stepfile::write_registry(&self.path, &reg)?;
        drop(lock);
        Ok(out)
    }

    /// Merges entries; returns how many were new or changed.
    pub fn merge(&self, entries: impl IntoIterator<Item = (String, RegistryEntry)>) -> Result<usize> {
        self.update(|reg| reg.merge(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn entry(id: &str) -> RegistryEntry {
        RegistryEntry {
            snapshot_id: id.into(),
            in_snapshot_path: "x".into(),
            bind_path: None,
            produced_by: None,
        }
    }

    #[test]
    fn concurrent_merges_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Arc::new(WorkingRegistry::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let reg = reg.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        reg.merge([(format!("/t{t}/f{i}"), entry(&format!("snap-{t}-{i}")))]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // A second handle (as another process would have) sees everything.
        let other = WorkingRegistry::open(dir.path()).unwrap();
        assert_eq!(other.load().unwrap().entries.len(), 200);
    }
}
