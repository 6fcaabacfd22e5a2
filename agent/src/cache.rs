//! Restored snapshots, kept by id under `<state-dir>/cache`. Snapshots are immutable, so a
//! snapshot restored once is never fetched again while it stays cached; the cache is bounded by
//! `cache_size_bytes`, evicting least recently used snapshots that no running step uses.
//!
//! Layout: `<id>/` is the unpacked tree (files read-only), `<id>.size` its content bytes;
//! the `.size` file's mtime is the last use, so the order survives restarts. A tree without
//! its `.size` file is an interrupted fetch and is removed when the cache opens.
//! `<id>.manifest` (snapshots that came as manifest and blobs) says which chunk sits where in
//! the tree: the cache offers every chunk of every cached tree to later fetches
//! ([`ChunkSource`]), so a file held under any snapshot is not fetched again.
//!
//! A cached tree never changes once restored: steps are shown an overlayfs mount of it or
//! copies (see `backend::layers`), never its own inodes. So the symlink check of a
//! path in it ([`Cache::check_links`]) is made once per (snapshot, path) and remembered.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use protocol::registry::valid_snapshot_id;
use tracing::{info, warn};

use transport::cas::{Chunk, ChunkSource, Digest, Manifest};

use crate::remote::SnapshotRemote;

/// Where a chunk sits: a file of a cached tree, at an offset.
type Located = (PathBuf, u64, u64);

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
    /// Verdicts of [`Cache::check_links`] by (snapshot id, in_snapshot_path): `Err` holds the
    /// refusal.
    verdicts: Mutex<HashMap<(String, String), Result<(), String>>>,
    /// Every chunk of the cached trees that came with a manifest.
    chunks: Mutex<HashMap<Digest, Located>>,
    /// Fetches under way: eviction waits for none, as they may read chunks of any tree.
    active: AtomicUsize,
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
        let mut chunks = HashMap::new();
        for id in entries.keys() {
            index_manifest(&dir, id, &mut chunks);
        }
        for e in fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let kept = name.strip_suffix(".manifest").is_some_and(|id| entries.contains_key(id));
            if !kept && !name.ends_with(".size") && !entries.contains_key(&name) {
                warn!(path = %e.path().display(), "removing an incomplete snapshot from the cache");
                remove_tree(&e.path());
            }
        }
        Ok(Arc::new(Self {
            dir,
            limit_bytes,
            entries: Mutex::new(entries),
            fetching: Default::default(),
            verdicts: Default::default(),
            chunks: Mutex::new(chunks),
            active: AtomicUsize::new(0),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn verdicts(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Result<(), String>>> {
        self.verdicts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses `in_snapshot_path` of the cached snapshot `id` (tree at `tree`) unless every
    /// symlink at or below it resolves, from where it sits and following the tree's other
    /// links, to a path inside it (a restored path is presented at real host paths, so a link
    /// leaving it would hand the step whatever the host has there). The path itself must not
    /// be a link, nor be reached through one. Walked once per (snapshot, path).
    pub async fn check_links(&self, id: &str, tree: &Path, in_snapshot_path: &str) -> Result<()> {
        let key = (id.to_string(), in_snapshot_path.to_string());
        if let Some(v) = self.verdicts().get(&key) {
            return v.clone().map_err(|e| anyhow!(e));
        }
        let (t, isp) = (tree.to_path_buf(), in_snapshot_path.to_string());
        let started = Instant::now();
        let verdict = tokio::task::spawn_blocking(move || links_inside(&t, &isp)).await??;
        match &verdict {
            Ok(links) => info!(
                snapshot = %id,
                path = %in_snapshot_path,
                links,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "snapshot links checked"
            ),
            Err(why) => warn!(snapshot = %id, path = %in_snapshot_path, "snapshot refused: {why}"),
        }
        let verdict = verdict.map(|_| ()).map_err(|why| format!("snapshot {id}: {why}"));
        self.verdicts().insert(key, verdict.clone());
        verdict.map_err(|e| anyhow!(e))
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
        let m = crate::metrics::get();
        if let Some(pin) = self.pin(id) {
            info!(snapshot = %id, "snapshot cache hit");
            m.cache.get_or_create(&crate::metrics::HIT).inc();
            return Ok(pin);
        }
        m.cache.get_or_create(&crate::metrics::MISS).inc();
        let started = Instant::now();
        let dest = self.dir.join(id);
        self.active.fetch_add(1, Ordering::SeqCst);
        let held: Arc<dyn ChunkSource> = self.clone();
        let fetched = remote.fetch(id, &dest, held).await;
        self.active.fetch_sub(1, Ordering::SeqCst);
        let fetched = fetched?;
        m.transfer(&crate::metrics::FETCHED, fetched.summary.content_bytes, started.elapsed().as_secs_f64());
        let summary = fetched.summary;
        let d = dest.clone();
        tokio::task::spawn_blocking(move || make_read_only(&d)).await??;
        // Writing the manifest (synced) and indexing its chunks: on a blocking thread, and the
        // chunk map is locked only to take the index in.
        let (me, key) = (self.clone(), id.to_string());
        tokio::task::spawn_blocking(move || -> Result<()> {
            if let Some(bytes) = fetched.manifest {
                transport::pki::write_file(&me.dir.join(format!("{key}.manifest")), &bytes, 0o644)?;
                let mut index = HashMap::new();
                index_manifest_bytes(&me.dir, &key, &bytes, &mut index);
                let mut chunks = me.chunks();
                for (d, at) in index {
                    chunks.entry(d).or_insert(at);
                }
            }
            transport::pki::write_file(
                &me.dir.join(format!("{key}.size")),
                summary.content_bytes.to_string().as_bytes(),
                0o644,
            )?;
            Ok(())
        })
        .await??;
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
        // Evicted trees may hold many files: removed on a blocking thread.
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.evict()).await?;
        Ok(pin)
    }

    fn chunks(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Located>> {
        self.chunks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes unpinned snapshots, least recently used first, until under the limit.
    fn evict(&self) {
        if self.active.load(Ordering::SeqCst) > 0 {
            return;
        }
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
        if !victims.is_empty() {
            self.verdicts().retain(|(id, _), _| !victims.contains(id));
        }
        for id in victims {
            info!(snapshot = %id, "evicting snapshot from the cache");
            let tree = self.dir.join(&id);
            self.chunks().retain(|_, (p, _, _)| !p.starts_with(&tree));
            let _ = fs::remove_file(self.dir.join(format!("{id}.manifest")));
            let _ = fs::remove_file(self.dir.join(format!("{id}.size")));
            remove_tree(&self.dir.join(&id));
        }
    }
}

/// Adds the chunks of cached snapshot `id` (from its manifest, if it has one) to `chunks`.
fn index_manifest(dir: &Path, id: &str, chunks: &mut HashMap<Digest, Located>) {
    if let Ok(bytes) = fs::read(dir.join(format!("{id}.manifest"))) {
        index_manifest_bytes(dir, id, &bytes, chunks);
    }
}

/// Adds the chunks of cached snapshot `id`, whose manifest is `bytes`, to `chunks`.
fn index_manifest_bytes(dir: &Path, id: &str, bytes: &[u8], chunks: &mut HashMap<Digest, Located>) {
    match Manifest::decode(bytes, transport::UnpackLimits { max_bytes: u64::MAX }) {
        Ok(m) => {
            let tree = dir.join(id);
            for (d, (path, off, len)) in m.locations() {
                chunks.entry(d).or_insert_with(|| (tree.join(path), off, len));
            }
        }
        Err(e) => warn!(snapshot = %id, "cached manifest unreadable, its chunks are not offered: {e}"),
    }
}

impl ChunkSource for Cache {
    fn has(&self, digest: &Digest) -> bool {
        self.chunks().contains_key(digest)
    }

    fn read(&self, c: &Chunk) -> std::io::Result<Vec<u8>> {
        let Some((path, off, len)) = self.chunks().get(&c.digest).cloned() else {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "chunk not cached"));
        };
        transport::cas::read_range(&path, off, len)
    }

    /// A cached file made of exactly `chunks`: each chunk located in that file, end to end
    /// from its start (its length is checked when it is opened).
    fn whole_file(&self, chunks: &[Chunk]) -> Option<PathBuf> {
        let at = self.chunks();
        let (first, _, _) = at.get(&chunks.first()?.digest)?;
        let mut off = 0;
        for c in chunks {
            let (p, o, l) = at.get(&c.digest)?;
            if p != first || *o != off || *l != c.len {
                return None;
            }
            off += c.len;
        }
        Some(first.clone())
    }
}

/// The check of [`Cache::check_links`]: `Ok(Ok(links checked))`, `Ok(Err(refusal))`, or an
/// IO error (not remembered: it may pass).
fn links_inside(tree: &Path, isp: &str) -> Result<Result<u64, String>> {
    let Ok(rel) = crate::paths::plain(Path::new(isp)) else {
        return Ok(Err(format!("in_snapshot_path {isp:?} is not a plain relative path")));
    };
    // Reached without links: each directory above the path is a directory of the tree.
    let full = tree.join(&rel);
    let mut cur = tree.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(&cur).unwrap_or_default();
                let entry = cur.strip_prefix(tree).unwrap_or(&cur).display().to_string();
                return Ok(Err(if cur == full {
                    format!(
                        "{entry} is itself a symlink (-> {}), which points out of the path it is restored for; refused",
                        target.display()
                    )
                } else {
                    format!("{isp} is reached through the symlink {entry} -> {}; refused", target.display())
                }));
            }
            Ok(_) => {}
            // Not in the snapshot: nothing to present, nothing to check.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ok(0)),
            Err(e) => return Err(e).with_context(|| format!("reading {}", cur.display())),
        }
    }
    let root = cur;
    let mut links = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel_dir) = stack.pop() {
        let dir = root.join(&rel_dir);
        if !fs::symlink_metadata(&dir).map(|m| m.is_dir()).unwrap_or(false) {
            continue;
        }
        for e in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e.with_context(|| format!("listing {}", dir.display()))?;
            let name: OsString = e.file_name();
            let rel_path = rel_dir.join(&name);
            let t = e.file_type().with_context(|| format!("reading {}", e.path().display()))?;
            if t.is_dir() {
                stack.push(rel_path);
            } else if t.is_symlink() {
                links += 1;
                let target =
                    fs::read_link(e.path()).with_context(|| format!("reading {}", e.path().display()))?;
                if !transport::tree::resolves_inside(&root, &rel_path, &target) {
                    let entry = Path::new(isp.trim_end_matches('/')).join(&rel_path);
                    return Ok(Err(format!(
                        "symlink {} -> {} leaves {isp}, the path it is restored for; refused",
                        entry.display(),
                        target.display()
                    )));
                }
            }
        }
    }
    Ok(Ok(links))
}

/// Files become read-only. (This is no protection against a step: root ignores modes. What
/// protects the cache is that no step is ever given its inodes, see `backend::layers`.)
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
        async fn fetch(
            &self,
            id: &str,
            dest: &Path,
            _held: Arc<dyn ChunkSource>,
        ) -> Result<crate::remote::Fetched> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let src = self.root.join(id);
            fs::create_dir_all(dest)?;
            let mut bytes = 0;
            for e in fs::read_dir(&src)? {
                let e = e?;
                bytes += fs::copy(e.path(), dest.join(e.file_name()))?;
            }
            let summary =
                TransferSummary { wire_bytes: bytes, content_bytes: bytes, entries: 1, elapsed_ms: 0 };
            Ok(crate::remote::Fetched { summary, manifest: None })
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

    #[test]
    fn links_are_judged_from_where_they_sit_inside_their_path() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        fs::create_dir_all(t.join("h/d/sub")).unwrap();
        fs::write(t.join("h/secret"), "x").unwrap();
        fs::write(t.join("h/d/sub/f"), "f").unwrap();
        std::os::unix::fs::symlink("sub/f", t.join("h/d/ok")).unwrap();
        std::os::unix::fs::symlink("../ok", t.join("h/d/sub/up")).unwrap();
        assert_eq!(links_inside(t, "h/d").unwrap(), Ok(2));
        // Inside the tree, but out of the path it is restored for.
        std::os::unix::fs::symlink("../../secret", t.join("h/d/sub/leak")).unwrap();
        let why = links_inside(t, "h/d").unwrap().unwrap_err();
        assert!(why.contains("h/d/sub/leak -> ../../secret"), "{why}");
        // Following another link of the tree.
        fs::remove_file(t.join("h/d/sub/leak")).unwrap();
        std::os::unix::fs::symlink("sub", t.join("h/d/esc")).unwrap();
        std::os::unix::fs::symlink("esc/../../secret", t.join("h/d/two")).unwrap();
        assert!(links_inside(t, "h/d").unwrap().is_err());
        // The path itself a link, reached through a link, or not plain.
        std::os::unix::fs::symlink("d", t.join("h/alias")).unwrap();
        assert!(links_inside(t, "h/alias").unwrap().unwrap_err().contains("is itself a symlink"));
        assert!(links_inside(t, "h/alias/sub").unwrap().unwrap_err().contains("through the symlink h/alias"));
        assert!(links_inside(t, "h/../h/d").unwrap().is_err());
        assert_eq!(links_inside(t, "h/d/sub/f").unwrap(), Ok(0));
        assert_eq!(links_inside(t, "h/missing").unwrap(), Ok(0));
    }
}
