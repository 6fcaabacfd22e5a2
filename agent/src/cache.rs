//! Restored snapshots, kept by id under `<state-dir>/cache`. Snapshots are immutable, so a
//! snapshot restored once is never fetched again while it stays cached; the cache is bounded by
//! `cache_size_bytes`, evicting least recently used snapshots that no running step uses.
//!
//! Layout: `<id>/` is the unpacked tree (files read-only), `<id>.size` its content bytes;
//! the `.size` file's mtime is the last use, so the order survives restarts. A tree without
//! its `.size` file is an interrupted fetch and is removed when the cache opens.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, bail};
use protocol::registry::valid_snapshot_id;
use tracing::{info, warn};

use crate::remote::SnapshotRemote;

struct Entry {
    size: u64,
    last_used: SystemTime,
    pins: u32,
}

pub struct Cache {
    dir: PathBuf,
    limit_bytes: u64,
    entries: Mutex<HashMap<String, Entry>>,
    /// One lock per snapshot being fetched, so concurrent steps fetch it once.
    fetching: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Keeps a snapshot from eviction while a step uses it.
pub struct Pin {
    cache: Arc<Cache>,
    id: String,
    pub path: PathBuf,
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Some(e) = self.cache.lock().get_mut(&self.id) {
            e.pins = e.pins.saturating_sub(1);
        }
    }
}

impl Cache {
    pub fn open(dir: PathBuf, limit_bytes: u64) -> Result<Arc<Self>> {
        fs::create_dir_all(&dir).with_context(|| format!("creating snapshot cache {}", dir.display()))?;
        let mut entries = HashMap::new();
        for e in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if let Some(id) = name.strip_suffix(".size") {
                let size = fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok());
                match size {
                    Some(size) if dir.join(id).is_dir() => {
                        let last_used =
                            e.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
                        entries.insert(id.to_string(), Entry { size, last_used, pins: 0 });
                    }
                    _ => {
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        for e in fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".size") && !entries.contains_key(&name) {
                warn!(path = %e.path().display(), "removing an incomplete snapshot from the cache");
                remove_tree(&e.path());
            }
        }
        Ok(Arc::new(Self { dir, limit_bytes, entries: Mutex::new(entries), fetching: Default::default() }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn total_bytes(&self) -> u64 {
        self.lock().values().map(|e| e.size).sum()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    fn pin(self: &Arc<Self>, id: &str) -> Option<Pin> {
        let mut entries = self.lock();
        let e = entries.get_mut(id)?;
        e.pins += 1;
        e.last_used = SystemTime::now();
        let _ = filetime::set_file_mtime(self.dir.join(format!("{id}.size")), filetime::FileTime::now());
        Some(Pin { cache: self.clone(), id: id.to_string(), path: self.dir.join(id) })
    }

    /// The snapshot's tree, fetched from `remote` unless cached.
    pub async fn get(self: &Arc<Self>, id: &str, remote: &dyn SnapshotRemote) -> Result<Pin> {
        if !valid_snapshot_id(id) {
            bail!("invalid snapshot id {id:?}");
        }
        let lock = self.fetching.lock().await.entry(id.to_string()).or_default().clone();
        let _guard = lock.lock().await;
        if let Some(pin) = self.pin(id) {
            info!(snapshot = %id, "snapshot cache hit");
            return Ok(pin);
        }
        let started = Instant::now();
        let dest = self.dir.join(id);
        let summary = remote.fetch(id, &dest).await?;
        let d = dest.clone();
        tokio::task::spawn_blocking(move || make_read_only(&d)).await??;
        transport::pki::write_file(
            &self.dir.join(format!("{id}.size")),
            summary.content_bytes.to_string().as_bytes(),
            0o644,
        )?;
        self.lock().insert(
            id.to_string(),
            Entry { size: summary.content_bytes, last_used: SystemTime::now(), pins: 0 },
        );
        info!(
            snapshot = %id,
            bytes = summary.content_bytes,
            entries = summary.entries,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot fetched"
        );
        let pin = self.pin(id).with_context(|| format!("snapshot {id} vanished from the cache"))?;
        self.evict();
        Ok(pin)
    }

    /// Removes unpinned snapshots, least recently used first, until under the limit.
    fn evict(&self) {
        let victims: Vec<String> = {
            let mut entries = self.lock();
            let mut total: u64 = entries.values().map(|e| e.size).sum();
            let mut order: Vec<(SystemTime, String)> =
                entries.iter().filter(|(_, e)| e.pins == 0).map(|(k, e)| (e.last_used, k.clone())).collect();
            order.sort();
            let mut out = Vec::new();
            for (_, id) in order {
                if total <= self.limit_bytes {
                    break;
                }
                if let Some(e) = entries.remove(&id) {
                    total -= e.size;
                    out.push(id);
                }
            }
            out
        };
        for id in victims {
            info!(snapshot = %id, "evicting snapshot from the cache");
            let _ = fs::remove_file(self.dir.join(format!("{id}.size")));
            remove_tree(&self.dir.join(&id));
        }
    }
}

/// Files become read-only: a hardlinked view must not let a step change the cached copy.
fn make_read_only(root: &Path) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let mut perm = e.metadata()?.permissions();
                perm.set_mode(perm.mode() & !0o222);
                fs::set_permissions(e.path(), perm)?;
            }
        }
    }
    Ok(())
}

pub fn remove_tree(p: &Path) {
    let r = match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            // Directories unpacked read-only would block their own removal.
            let mut stack = vec![p.to_path_buf()];
            while let Some(d) = stack.pop() {
                let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o755));
                if let Ok(rd) = fs::read_dir(&d) {
                    stack.extend(
                        rd.flatten()
                            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                            .map(|e| e.path()),
                    );
                }
            }
            fs::remove_dir_all(p)
        }
        Ok(_) => fs::remove_file(p),
        Err(_) => Ok(()),
    };
    if let Err(e) = r {
        warn!(path = %p.display(), "could not remove: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use protocol::{SnapshotInfo, TransferSummary};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Serves snapshots from local directories, counting fetches.
    struct DirRemote {
        root: PathBuf,
        fetches: AtomicU32,
    }

    #[async_trait]
    impl SnapshotRemote for DirRemote {
        async fn fetch(&self, id: &str, dest: &Path) -> Result<TransferSummary> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let src = self.root.join(id);
            fs::create_dir_all(dest)?;
            let mut bytes = 0;
            for e in fs::read_dir(&src)? {
                let e = e?;
                bytes += fs::copy(e.path(), dest.join(e.file_name()))?;
            }
            Ok(TransferSummary { wire_bytes: bytes, content_bytes: bytes, entries: 1, elapsed_ms: 0 })
        }
        async fn store(&self, _root: &Path, _paths: Vec<PathBuf>) -> Result<SnapshotInfo> {
            bail!("not used")
        }
        async fn stat(&self, _q: Vec<(String, String)>) -> Result<Vec<Option<u64>>> {
            bail!("not used")
        }
    }

    #[tokio::test]
    async fn cached_snapshots_are_fetched_once_and_evicted_lru_unless_pinned() {
        let tmp = tempfile::tempdir().unwrap();
        let remote = DirRemote { root: tmp.path().join("remote"), fetches: AtomicU32::new(0) };
        for id in ["snap-a", "snap-b", "snap-c"] {
            fs::create_dir_all(remote.root.join(id)).unwrap();
            fs::write(remote.root.join(id).join("f"), vec![b'x'; 400]).unwrap();
        }
        let cache = Cache::open(tmp.path().join("cache"), 1000).unwrap();
        let a = cache.get("snap-a", &remote).await.unwrap();
        drop(cache.get("snap-a", &remote).await.unwrap());
        assert_eq!(remote.fetches.load(Ordering::SeqCst), 1, "a cached snapshot is not fetched again");
        assert!(fs::metadata(a.path.join("f")).unwrap().permissions().readonly());
        drop(cache.get("snap-b", &remote).await.unwrap());
        // Over the limit with c: b (unpinned, least recently used) goes; a is pinned and stays.
        let _c = cache.get("snap-c", &remote).await.unwrap();
        assert!(cache.contains("snap-a") && cache.contains("snap-c") && !cache.contains("snap-b"));
        assert!(!tmp.path().join("cache/snap-b").exists());
        assert!(cache.get("../x", &remote).await.is_err());
        drop(a);
        // The cache survives a restart; an interrupted fetch does not.
        fs::create_dir_all(tmp.path().join("cache/snap-partial")).unwrap();
        let reopened = Cache::open(tmp.path().join("cache"), 1000).unwrap();
        assert!(reopened.contains("snap-a") && reopened.contains("snap-c"));
        assert!(!tmp.path().join("cache/snap-partial").exists());
        drop(reopened.get("snap-c", &remote).await.unwrap());
        assert_eq!(remote.fetches.load(Ordering::SeqCst), 3);
    }
}
