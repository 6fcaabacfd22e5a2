//! The snapshot store. Each snapshot is one stored archive (zstd tar, see
//! [`transport::archive`]) plus an index of its entries and sizes, so `check_outputs` is
//! answered without touching the archive. The embedded default, [`LocalStore`], keeps both in
//! a directory of the state dir; [`s3::S3Store`] (feature `aws`) keeps them in an S3 bucket,
//! and lets agents read and write them directly at presigned URLs ([`SnapshotStore::direct`]).
//! [`open`] picks one from the coordinator config's `[store]` table.
//!
//! Snapshot ids are content addresses: `snap-` and the first 32 hex digits of the BLAKE3
//! digest of the stored bytes, so storing the same outputs twice stores them once.
//!
//! The local store keeps snapshots content-addressed ([`CasStore`]): a manifest per snapshot
//! (`<id>.manifest`, its id the address of its bytes) and blobs by digest under `blobs/`
//! ([`transport::cas`]), so two snapshots share every chunk they have in common and an agent
//! sends or fetches only the blobs the other side lacks. Archives of an older store
//! (`<id>.tar.zst`) are converted when the store opens, keeping their ids.

#[cfg_attr(not(feature = "aws"), allow(dead_code))]
pub mod packs;
#[cfg(feature = "aws")]
pub mod s3;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use protocol::{SnapshotInfo, Trailer, registry::valid_snapshot_id};
use serde::{Deserialize, Serialize};
use transport::cas::{self, BlobStore, Chunk, Digest, Manifest};
use transport::tree::{EntryKind, IndexEntry, UnpackLimits};

/// Compression level of archives the coordinator writes itself (imports).
const IMPORT_ZSTD_LEVEL: i32 = 3;

/// What the store keeps beside each archive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub snapshot_id: String,
    pub wire_bytes: u64,
    pub content_bytes: u64,
    pub entries: u64,
    /// BLAKE3 of the stored bytes, hex.
    pub digest: String,
    pub created_at: i64,
    pub files: Vec<IndexEntry>,
    /// BLAKE3 of the manifest's bytes, hex, for a snapshot converted from an archive (whose
    /// id is the address of the archive, not of its manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,
}

impl SnapshotMeta {
    /// Whether every link in the index records its target (indexes written before they did
    /// cannot be judged, see `engine::check_harvest`).
    pub fn links_indexed(&self) -> bool {
        self.files
            .iter()
            .all(|f| f.target.is_some() || !matches!(f.kind, EntryKind::Symlink | EntryKind::Hardlink))
    }

    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            snapshot_id: self.snapshot_id.clone(),
            wire_bytes: self.wire_bytes,
            content_bytes: self.content_bytes,
            entries: self.entries,
        }
    }

    /// Size of `in_snapshot_path` (leading `/` ignored): a file's length, the total of the
    /// files below a directory, 0 for a link; `None` when the snapshot does not hold it.
    pub fn size_of(&self, in_snapshot_path: &str) -> Option<u64> {
        let p = in_snapshot_path.trim_start_matches('/').trim_end_matches('/');
        if p.is_empty() {
            return Some(self.content_bytes);
        }
        let i = self.files.binary_search_by(|e| e.path.as_str().cmp(p)).ok()?;
        let e = &self.files[i];
        match e.kind {
            EntryKind::File => Some(e.size),
            EntryKind::Symlink | EntryKind::Hardlink => Some(0),
            EntryKind::Dir => {
                let prefix = format!("{p}/");
                Some(
                    self.files[i + 1..]
                        .iter()
                        .take_while(|f| f.path.starts_with(&prefix))
                        .map(|f| f.size)
                        .sum(),
                )
            }
        }
    }
}

/// Which of `paths` the registry and the store hold, as the snapshot backend's
/// `check_outputs` answers them (bio-pype's conventions: a zero-byte file is present, a
/// directory's size is the total below it): a path is present when the registry locates it
/// (its own entry, a directory entry above it, or entries below it) and every snapshot it
/// lives in holds it.
pub fn present(
    store: &dyn SnapshotStore,
    reg: &protocol::Registry,
    paths: &[String],
) -> Result<Vec<(String, Option<u64>)>> {
    let q = reg.size_queries(paths);
    let answers = if q.queries.is_empty() { Vec::new() } else { sizes_of(store, q.queries.clone())? };
    Ok(paths.iter().cloned().zip(q.sizes(answers)).collect())
}

/// Sizes of `(snapshot_id, in_snapshot_path)` pairs from the store's index (each snapshot's
/// index read once): what the snapshot backend's `check_outputs` answers.
pub fn sizes_of(store: &dyn SnapshotStore, queries: Vec<(String, String)>) -> Result<Vec<Option<u64>>> {
    let mut metas: std::collections::HashMap<String, Option<SnapshotMeta>> = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(queries.len());
    for (id, path) in queries {
        if !metas.contains_key(&id) {
            let m = store.meta(&id)?;
            metas.insert(id.clone(), m);
        }
        out.push(metas.get(&id).and_then(|m| m.as_ref()).and_then(|m| m.size_of(&path)));
    }
    Ok(out)
}

/// Which store holds the snapshots: the `[store]` table of the coordinator config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// `<state>/snapshots`, bytes relayed to agents over QUIC.
    #[default]
    Local,
    /// An S3 bucket (or S3-compatible store); agents move bytes at presigned URLs.
    S3(S3Config),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix of the snapshot objects and their indexes.
    pub prefix: String,
    /// Region (default: from the standard AWS configuration chain).
    pub region: Option<String>,
    /// Endpoint of an S3-compatible store (or an emulator in tests).
    pub endpoint_url: Option<String>,
    /// Path-style URLs (`endpoint/bucket/key`), as most S3-compatible stores want.
    pub force_path_style: bool,
    /// Fixed multipart part size in MiB (S3's minimum is 5; at most 10,000 parts).
    pub part_size_mib: u64,
    /// Lifetime of the presigned URLs handed to agents.
    pub presign_ttl_secs: u64,
    /// Attempts per API call (throttling and transient errors retried with backoff).
    pub max_attempts: u32,
    /// Largest size of the coordinator's read cache of objects (`<state>/snapshots/cache`,
    /// for materializing outputs and relaying to agents that cannot fetch directly), in MiB;
    /// the least recently used objects go first.
    pub cache_max_mib: u64,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            prefix: "pype/snapshots".into(),
            region: None,
            endpoint_url: None,
            force_path_style: false,
            part_size_mib: 16,
            presign_ttl_secs: 900,
            max_attempts: 8,
            cache_max_mib: 16 << 10,
        }
    }
}

/// The snapshot store the config names; `state_dir` holds the local store, or the object
/// store's spool and read cache.
pub fn open(state_dir: &Path, cfg: &StoreConfig) -> Result<Arc<dyn SnapshotStore>> {
    match cfg {
        StoreConfig::Local => Ok(Arc::new(LocalStore::open_dir(state_dir.join("snapshots"))?)),
        #[cfg(feature = "aws")]
        StoreConfig::S3(c) => Ok(Arc::new(s3::S3Store::open(c, &state_dir.join("snapshots"))?)),
        #[cfg(not(feature = "aws"))]
        StoreConfig::S3(_) => {
            bail!("this pype-coordinator was built without the `aws` feature, needed for an S3 store")
        }
    }
}

/// Where an agent reads a snapshot's bytes directly.
#[derive(Debug, Clone)]
pub struct Download {
    pub url: String,
    pub wire_bytes: u64,
    pub digest: [u8; 32],
}

/// A direct upload the store expects.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub snapshot_id: String,
    pub upload_id: String,
    pub wire_bytes: u64,
    pub digest: [u8; 32],
    pub parts: usize,
}

pub enum Begin {
    /// The store holds these bytes already.
    Exists(SnapshotMeta),
    /// PUT part `i + 1` to `urls[i]`, then [`DirectStore::finish`].
    Upload { ticket: Ticket, urls: Vec<String> },
}

/// A store agents read and write directly, at presigned URLs.
pub trait DirectStore: Send + Sync {
    /// The fixed size of upload parts.
    fn part_size(&self) -> u64;
    /// A short-lived URL for a snapshot's stored bytes, with their length and digest.
    fn download(&self, snapshot_id: &str) -> Result<Download>;
    /// Starts storing `wire_bytes` bytes whose digest is `digest` (or finds them stored).
    fn begin(&self, wire_bytes: u64, digest: [u8; 32]) -> Result<Begin>;
    /// Completes an upload from its parts' ETags; stores `files` as the snapshot's index.
    fn finish(&self, ticket: &Ticket, etags: Vec<String>, files: Vec<IndexEntry>) -> Result<SnapshotMeta>;
    /// Gives up an upload (its parts are deleted).
    fn abort(&self, ticket: &Ticket);
}

/// A snapshot's meta from an index the uploader built: sorted, one entry per path, every path
/// relative and free of `..`.
pub fn meta_from_index(
    snapshot_id: &str,
    wire_bytes: u64,
    digest: &[u8; 32],
    mut files: Vec<IndexEntry>,
) -> Result<SnapshotMeta> {
    for f in &files {
        let p = Path::new(&f.path);
        if f.path.is_empty()
            || p.is_absolute()
            || p.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            bail!("index entry {:?} is not a plain relative path", f.path);
        }
        if matches!(f.kind, EntryKind::Symlink | EntryKind::Hardlink) && f.target.is_none() {
            bail!("index entry {:?} is a link without a target", f.path);
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files.dedup_by(|later, earlier| later.path == earlier.path);
    Ok(SnapshotMeta {
        snapshot_id: snapshot_id.to_string(),
        wire_bytes,
        content_bytes: files.iter().filter(|f| f.kind == EntryKind::File).map(|f| f.size).sum(),
        entries: files.len() as u64,
        digest: hex::encode(digest),
        created_at: now_secs(),
        files,
        manifest_digest: None,
    })
}

/// The content address of stored bytes whose digest is `digest`.
pub fn snapshot_id_of(digest: &[u8; 32]) -> String {
    cas::snapshot_id_of(digest)
}

/// Where snapshots live. Methods block (file IO); async callers use `spawn_blocking`.
pub trait SnapshotStore: Send + Sync {
    /// The direct path for agents, when the store has one (object stores).
    fn direct(&self) -> Option<&dyn DirectStore> {
        None
    }
    /// The content-addressed side, when the store keeps snapshots as manifests and blobs.
    fn cas(&self) -> Option<&dyn CasStore> {
        None
    }
    /// A fresh path for an incoming stream, on the same filesystem as the store.
    fn incoming_path(&self) -> Result<PathBuf>;
    /// Takes a verified stream file (see [`transport::bulk::recv_file`]) into the store.
    fn ingest(&self, file: &Path, trailer: &Trailer) -> Result<SnapshotMeta>;
    /// The stored bytes of a snapshot and their recorded digest, for streaming.
    fn open(&self, snapshot_id: &str) -> Result<(PathBuf, [u8; 32])>;
    fn meta(&self, snapshot_id: &str) -> Result<Option<SnapshotMeta>>;
    fn list(&self) -> Result<Vec<String>>;
    fn remove(&self, snapshot_id: &str) -> Result<()>;

    /// Packs local paths (absolute) into one snapshot, laid out at their absolute paths.
    fn import(&self, paths: &[PathBuf]) -> Result<SnapshotMeta> {
        let rels = import_rels(paths)?;
        let tmp = self.incoming_path()?;
        let (trailer, _) = transport::archive::write(Path::new("/"), &rels, &tmp, IMPORT_ZSTD_LEVEL)
            .context("packing the imported paths")?;
        let meta = self.ingest(&tmp, &trailer);
        let _ = fs::remove_file(&tmp);
        meta
    }

    /// Forgets any local copy of a snapshot's bytes (an object store's read cache), after
    /// they failed verification.
    fn evict(&self, _snapshot_id: &str) {}

    /// How often at most [`SnapshotStore::usage`] is asked for (metrics): an object store
    /// lists its bucket for it, which costs requests.
    fn usage_every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(10)
    }

    /// How many snapshots the store holds and their stored bytes (for metrics). By default
    /// the sum of each snapshot's recorded stored size, which counts blobs shared between
    /// snapshots once per snapshot.
    fn usage(&self) -> Result<(u64, u64)> {
        let ids = self.list()?;
        let bytes = ids.iter().filter_map(|id| self.meta(id).ok().flatten()).map(|m| m.wire_bytes).sum();
        Ok((ids.len() as u64, bytes))
    }

    /// Writes `in_snapshot_path` of a snapshot to the local path `dest`, beneath the trusted
    /// directory `root` (see [`transport::tree::stage_out`]): every byte of the stored archive
    /// is checked against its recorded length and digest before anything becomes visible;
    /// files that already hold the stored bytes are left as they are; changed files are
    /// written beside their destination and renamed over it; nothing beneath `root` is
    /// resolved through a symlink and nothing is deleted.
    fn write_out(
        &self,
        snapshot_id: &str,
        in_snapshot_path: &str,
        dest: &Path,
        root: &Path,
    ) -> Result<transport::tree::WriteOutStats> {
        write_out_archive(self, snapshot_id, in_snapshot_path, dest, root)
    }
}

/// [`SnapshotStore::write_out`] for a snapshot kept as one archive.
pub fn write_out_archive<S: SnapshotStore + ?Sized>(
    store: &S,
    snapshot_id: &str,
    in_snapshot_path: &str,
    dest: &Path,
    root: &Path,
) -> Result<transport::tree::WriteOutStats> {
    let meta =
        store.meta(snapshot_id)?.ok_or_else(|| anyhow!("snapshot {snapshot_id} is not in the store"))?;
    let (archive, digest) = store.open(snapshot_id)?;
    let dest_rel = dest
        .strip_prefix(root)
        .map_err(|_| anyhow!("{} is not beneath {}", dest.display(), root.display()))?;
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let expected = Trailer { bytes: meta.wire_bytes, digest };
    let isp = Path::new(in_snapshot_path.trim_start_matches('/'));
    match transport::archive::write_out(&archive, &expected, isp, root, dest_rel, UnpackLimits::default()) {
        Ok(stats) => Ok(stats),
        Err(e @ transport::tree::TreeError::Mismatch(_)) => {
            store.evict(snapshot_id);
            Err(anyhow!("snapshot {snapshot_id} failed verification: {e}"))
        }
        Err(e) => Err(anyhow!("snapshot {snapshot_id}: {e}")),
    }
}

/// A store of manifests and blobs. Methods block (file IO).
pub trait CasStore: Send + Sync {
    /// A snapshot's manifest as stored (its bytes, checked against the snapshot's id) and
    /// parsed; `None` when the store does not hold it.
    fn manifest(&self, snapshot_id: &str) -> Result<Option<(Vec<u8>, Manifest)>>;
    fn has_blob(&self, digest: &Digest) -> bool;
    /// A blob as stored: its encoding and payload (the reader verifies them).
    fn blob(&self, digest: &Digest) -> Result<(u8, Vec<u8>)>;
    /// Verifies and keeps a blob; returns its stored size.
    fn put_blob(&self, chunk: &Chunk, encoding: u8, payload: &[u8]) -> Result<u64>;
    /// Commits a manifest whose every blob is present: the snapshot becomes visible.
    fn commit(&self, bytes: &[u8], manifest: &Manifest) -> Result<SnapshotMeta>;
    /// Removes blobs no manifest references and older than `min_age` (a transfer in progress
    /// may have stored them for a manifest not committed yet). Returns (blobs, bytes).
    fn gc_blobs(&self, min_age: std::time::Duration) -> Result<(u64, u64)>;
    /// The direct path to the store's packs, when it keeps blobs in an object store's packs.
    fn packs_direct(&self) -> Option<&dyn PackDirect> {
        None
    }
}

/// Blobs in an object store's packs, read and written by agents at presigned URLs.
pub trait PackDirect: Send + Sync {
    /// Where each of `digests` lies: per pack, a short-lived GET URL and the blobs' places.
    fn places(&self, digests: &[Digest]) -> Result<Vec<(String, Vec<transport::pack::Placed>)>>;
    /// A short-lived PUT URL for each pack, in order.
    fn upload_urls(&self, packs: &[transport::pack::PackIndex]) -> Result<Vec<String>>;
    /// Takes in an uploaded pack once it matches its index (deleted otherwise).
    fn adopt(&self, pack: &transport::pack::PackIndex) -> Result<()>;
    /// Whether a sealed pack of that name is stored.
    fn has_pack(&self, pack: &str) -> bool;
}

/// Absolute paths to import, relative to `/`; each must exist.
fn import_rels(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut rels = Vec::with_capacity(paths.len());
    for p in paths {
        if !p.is_absolute() {
            bail!("{} is not an absolute path", p.display());
        }
        fs::symlink_metadata(p).with_context(|| format!("reading {}", p.display()))?;
        rels.push(p.strip_prefix("/").map(Path::to_path_buf).unwrap_or_else(|_| p.clone()));
    }
    Ok(rels)
}

/// Checks that an index read from the store describes the snapshot it was asked for: its id,
/// and the content address of its recorded digest. A store whose index was swapped or edited
/// fails here, naming the snapshot.
pub fn check_meta(snapshot_id: &str, meta: &SnapshotMeta) -> Result<()> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(&meta.digest, &mut digest)
        .map_err(|e| anyhow!("index of snapshot {snapshot_id} has a bad digest: {e}"))?;
    if meta.snapshot_id != snapshot_id || snapshot_id_of(&digest) != snapshot_id {
        bail!(
            "index of snapshot {snapshot_id} does not describe it (it names {} with digest {})",
            meta.snapshot_id,
            meta.digest
        );
    }
    Ok(())
}

pub struct LocalStore {
    dir: PathBuf,
    limits: UnpackLimits,
    blobs: BlobStore,
}

/// zstd level of blobs the coordinator encodes itself (imports, conversions).
const BLOB_ZSTD_LEVEL: i32 = 3;

impl LocalStore {
    pub fn open_dir(dir: PathBuf) -> Result<Self> {
        fs::create_dir_all(dir.join("incoming")).with_context(|| format!("creating {}", dir.display()))?;
        let blobs = BlobStore::open(dir.join("blobs"))
            .with_context(|| format!("creating {}/blobs", dir.display()))?;
        let store = Self { dir, limits: UnpackLimits::default(), blobs };
        store.convert_archives()?;
        Ok(store)
    }

    fn data_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.tar.zst"))
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn manifest_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.manifest"))
    }

    /// Converts the archives of an older store into manifests and blobs, keeping their ids
    /// (the registry names them); one log line for all. An archive that fails its digest is
    /// left as it is, with a warning naming it.
    fn convert_archives(&self) -> Result<()> {
        let mut pending = Vec::new();
        for e in fs::read_dir(&self.dir).with_context(|| format!("listing {}", self.dir.display()))? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".tar.zst")
                && valid_snapshot_id(id)
                && !self.manifest_path(id).exists()
                && self.meta_path(id).exists()
            {
                pending.push(id.to_string());
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let (mut converted, mut bytes) = (0u64, 0u64);
        for id in &pending {
            match self.convert_archive(id) {
                Ok(n) => {
                    converted += 1;
                    bytes += n;
                }
                Err(e) => {
                    tracing::warn!(snapshot = %id, "snapshot store: could not convert the archive: {e:#}")
                }
            }
        }
        tracing::info!(
            converted,
            of = pending.len(),
            content_bytes = bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot store: converted archives to manifests and blobs"
        );
        Ok(())
    }

    fn convert_archive(&self, id: &str) -> Result<u64> {
        let mut meta: SnapshotMeta = serde_json::from_slice(&fs::read(self.meta_path(id))?)?;
        check_meta(id, &meta)?;
        let mut expected = [0u8; 32];
        hex::decode_to_slice(&meta.digest, &mut expected)?;
        let file = fs::File::open(self.data_path(id))?;
        let mut hashing = transport::archive::HashingReader::new(file);
        let built = {
            let dec = zstd::stream::read::Decoder::new(&mut hashing)?;
            cas::build_from_tar(dec, self.limits, |c, data| {
                let (enc, payload) = cas::encode_blob(data, BLOB_ZSTD_LEVEL);
                self.blobs.put_verified(&c.digest, enc, &payload).map(|_| ())
            })
        };
        std::io::copy(&mut hashing, &mut std::io::sink())?;
        let (bytes_read, digest) = hashing.finish();
        if bytes_read != meta.wire_bytes || digest != expected {
            bail!("the archive does not match its recorded length and digest");
        }
        let (manifest, _) = built?;
        let (bytes, mdigest) = manifest.encode();
        transport::pki::write_file(&self.manifest_path(id), &bytes, 0o644)?;
        meta.manifest_digest = Some(hex::encode(mdigest));
        meta.files = manifest.index();
        meta.wire_bytes = self.stored_bytes(&manifest);
        transport::pki::write_file(&self.meta_path(id), &serde_json::to_vec(&meta)?, 0o644)?;
        let _ = fs::remove_file(self.data_path(id));
        Ok(manifest.content_bytes())
    }

    /// Stored bytes of a manifest's distinct blobs.
    fn stored_bytes(&self, m: &Manifest) -> u64 {
        m.chunks().iter().filter_map(|c| self.blobs.stored_len(&c.digest)).sum()
    }

    /// Keeps a chunk the coordinator read itself (relayed archives, imports), encoded.
    fn keep(&self, c: &Chunk, data: &[u8]) -> Result<(), transport::TreeError> {
        if self.blobs.has(&c.digest) {
            return Ok(());
        }
        let (enc, payload) = cas::encode_blob(data, BLOB_ZSTD_LEVEL);
        self.blobs.put_verified(&c.digest, enc, &payload).map(|_| ())
    }

    /// Takes a tar stream into the store as manifest and blobs.
    fn ingest_tar(&self, input: impl std::io::Read) -> Result<SnapshotMeta> {
        let (manifest, _) = cas::build_from_tar(input, self.limits, |c, data| self.keep(c, data))?;
        let (bytes, _) = manifest.encode();
        self.commit(&bytes, &manifest)
    }

    /// The blob store's directory (for benchmarks and tests).
    pub fn blob_dir(&self) -> &Path {
        self.blobs.dir()
    }
}

pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl CasStore for LocalStore {
    fn manifest(&self, snapshot_id: &str) -> Result<Option<(Vec<u8>, Manifest)>> {
        let Some(meta) = self.meta(snapshot_id)? else { return Ok(None) };
        let path = self.manifest_path(snapshot_id);
        if !path.exists() && self.data_path(snapshot_id).exists() {
            // An archive stored after this store opened (by an older coordinator sharing the
            // directory, or planted): converted on first use. One that cannot be converted
            // stays an archive, served as one.
            match self.convert_archive(snapshot_id) {
                Ok(_) => {
                    tracing::info!(snapshot = %snapshot_id, "snapshot store: converted an archive on first use")
                }
                Err(e) => {
                    tracing::warn!(snapshot = %snapshot_id, "snapshot store: serving an archive that cannot be converted: {e:#}");
                    return Ok(None);
                }
            }
        }
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let digest = hex::encode(blake3::hash(&bytes).as_bytes());
        let expected = meta.manifest_digest.as_deref().unwrap_or(&meta.digest);
        if digest != expected {
            bail!("the manifest of snapshot {snapshot_id} does not match its digest");
        }
        let m = Manifest::decode(&bytes, self.limits)
            .with_context(|| format!("manifest of snapshot {snapshot_id}"))?;
        Ok(Some((bytes, m)))
    }

    fn has_blob(&self, digest: &Digest) -> bool {
        self.blobs.has(digest)
    }

    fn blob(&self, digest: &Digest) -> Result<(u8, Vec<u8>)> {
        self.blobs.get_raw(digest).with_context(|| format!("reading blob {}", hex::encode(digest)))
    }

    fn put_blob(&self, chunk: &Chunk, encoding: u8, payload: &[u8]) -> Result<u64> {
        Ok(self.blobs.put(chunk, encoding, payload)?)
    }

    fn commit(&self, bytes: &[u8], manifest: &Manifest) -> Result<SnapshotMeta> {
        if let Some(c) = manifest.chunks().iter().find(|c| !self.blobs.has(&c.digest)) {
            bail!(
                "the manifest names blob {} which the store does not hold: nothing committed",
                hex::encode(c.digest)
            );
        }
        let digest = *blake3::hash(bytes).as_bytes();
        let id = snapshot_id_of(&digest);
        if let Some(meta) = self.meta(&id)?
            && self.manifest_path(&id).exists()
        {
            return Ok(meta);
        }
        let files = manifest.index();
        let meta = SnapshotMeta {
            snapshot_id: id.clone(),
            wire_bytes: self.stored_bytes(manifest),
            content_bytes: manifest.content_bytes(),
            entries: files.len() as u64,
            digest: hex::encode(digest),
            created_at: now_secs(),
            files,
            manifest_digest: None,
        };
        transport::pki::write_file(&self.manifest_path(&id), bytes, 0o644)?;
        // The index is written last: its presence means the snapshot is complete.
        transport::pki::write_file(&self.meta_path(&id), &serde_json::to_vec(&meta)?, 0o644)?;
        Ok(meta)
    }

    fn gc_blobs(&self, min_age: std::time::Duration) -> Result<(u64, u64)> {
        let mut referenced = std::collections::HashSet::new();
        for id in self.list()? {
            if let Some((_, m)) = self.manifest(&id)? {
                referenced.extend(m.chunks().into_iter().map(|c| c.digest));
            }
        }
        let (mut n, mut bytes) = (0, 0);
        for d in self.blobs.list()? {
            if referenced.contains(&d) {
                continue;
            }
            let p = self.blobs.dir().join(&hex::encode(d)[..2]).join(hex::encode(d));
            let young = fs::metadata(&p)
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() < min_age)
                .unwrap_or(true);
            if young {
                continue;
            }
            bytes += self.blobs.remove(&d).unwrap_or(0);
            n += 1;
        }
        Ok((n, bytes))
    }
}

impl SnapshotStore for LocalStore {
    /// Snapshots, and the bytes of every file under the store's directory (blobs, manifests,
    /// indexes, archives), each blob counted once.
    fn usage(&self) -> Result<(u64, u64)> {
        fn walk(dir: &Path) -> u64 {
            let Ok(rd) = fs::read_dir(dir) else { return 0 };
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&e.path()),
                    Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
                    _ => 0,
                })
                .sum()
        }
        Ok((self.list()?.len() as u64, walk(&self.dir)))
    }

    fn cas(&self) -> Option<&dyn CasStore> {
        Some(self)
    }

    fn incoming_path(&self) -> Result<PathBuf> {
        Ok(self.dir.join("incoming").join(format!("{:016x}.part", rand::random::<u64>())))
    }

    /// A verified zstd tar stream (an agent that stores through the archive requests) becomes
    /// manifest and blobs.
    fn ingest(&self, file: &Path, _trailer: &Trailer) -> Result<SnapshotMeta> {
        let input = fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let dec = zstd::stream::read::Decoder::new(input)?;
        let meta = self.ingest_tar(dec);
        let _ = fs::remove_file(file);
        meta
    }

    fn open(&self, snapshot_id: &str) -> Result<(PathBuf, [u8; 32])> {
        let meta =
            self.meta(snapshot_id)?.ok_or_else(|| anyhow!("snapshot {snapshot_id} is not in the store"))?;
        let path = self.data_path(snapshot_id);
        if !path.exists() {
            bail!("snapshot {snapshot_id} is kept as manifest and blobs, not as an archive");
        }
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&meta.digest, &mut digest)
            .map_err(|e| anyhow!("index of snapshot {snapshot_id} has a bad digest: {e}"))?;
        Ok((path, digest))
    }

    fn meta(&self, snapshot_id: &str) -> Result<Option<SnapshotMeta>> {
        if !valid_snapshot_id(snapshot_id) {
            bail!("invalid snapshot id {snapshot_id:?}");
        }
        let path = self.meta_path(snapshot_id);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let meta = serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
        check_meta(snapshot_id, &meta)?;
        Ok(Some(meta))
    }

    fn list(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).with_context(|| format!("listing {}", self.dir.display()))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                out.push(id.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    fn remove(&self, snapshot_id: &str) -> Result<()> {
        if !valid_snapshot_id(snapshot_id) {
            bail!("invalid snapshot id {snapshot_id:?}");
        }
        let _ = fs::remove_file(self.meta_path(snapshot_id));
        let _ = fs::remove_file(self.manifest_path(snapshot_id));
        let _ = fs::remove_file(self.data_path(snapshot_id));
        Ok(())
    }

    fn import(&self, paths: &[PathBuf]) -> Result<SnapshotMeta> {
        let rels = import_rels(paths)?;
        let (manifest, _) = cas::build(Path::new("/"), &rels, self.limits, |c, data| self.keep(c, data))
            .context("packing the imported paths")?;
        let (bytes, _) = manifest.encode();
        self.commit(&bytes, &manifest)
    }

    fn write_out(
        &self,
        snapshot_id: &str,
        in_snapshot_path: &str,
        dest: &Path,
        root: &Path,
    ) -> Result<transport::tree::WriteOutStats> {
        let Some((_, manifest)) = self.manifest(snapshot_id)? else {
            bail!("snapshot {snapshot_id} is not in the store");
        };
        write_out_manifest(snapshot_id, &manifest, &self.blobs, self.limits, in_snapshot_path, dest, root)
    }
}

/// [`SnapshotStore::write_out`] for a snapshot kept as manifest and blobs: every chunk is
/// checked against its digest before a byte of it is written.
pub fn write_out_manifest(
    snapshot_id: &str,
    manifest: &Manifest,
    source: &dyn cas::ChunkSource,
    limits: UnpackLimits,
    in_snapshot_path: &str,
    dest: &Path,
    root: &Path,
) -> Result<transport::tree::WriteOutStats> {
    let dest_rel = dest
        .strip_prefix(root)
        .map_err(|_| anyhow!("{} is not beneath {}", dest.display(), root.display()))?;
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let isp = Path::new(in_snapshot_path.trim_start_matches('/'));
    let staged =
        cas::with_tar(manifest, source, |r| transport::tree::stage_out(r, isp, root, dest_rel, limits));
    let staged = match staged {
        Err(e @ transport::tree::TreeError::Mismatch(_)) => {
            bail!("snapshot {snapshot_id} failed verification: {e}")
        }
        other => other,
    };
    let (pending, stats) = staged.map_err(|e| anyhow!("snapshot {snapshot_id}: {e}"))?;
    pending.commit().map_err(|e| anyhow!("snapshot {snapshot_id}: {e}"))?;
    Ok(stats)
}

/// Removes the least recently used files of the flat cache directory `dir` until their sizes
/// add up to at most `max_bytes`. A file used within `min_age` stays (a reader may have just
/// been handed its path), and so does `keep`. Returns the bytes removed.
pub fn trim_cache(dir: &Path, max_bytes: u64, keep: &Path, min_age: std::time::Duration) -> Result<u64> {
    let mut files = Vec::new();
    let mut total = 0u64;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if !meta.is_file() {
            continue;
        }
        total += meta.len();
        let used = meta.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH);
        files.push((used, meta.len(), entry.path()));
    }
    files.sort();
    let mut removed = 0u64;
    for (used, len, path) in files {
        if total <= max_bytes {
            break;
        }
        if path == keep || used.elapsed().unwrap_or_default() < min_age {
            continue;
        }
        if fs::remove_file(&path).is_ok() {
            total -= len;
            removed += len;
        }
    }
    Ok(removed)
}

/// Marks a cached file as just used (for [`trim_cache`]'s order).
pub fn touch(path: &Path) {
    if let Ok(f) = fs::File::options().append(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn trim_cache_goes_least_recently_used_first_and_spares_fresh_files() {
        use std::time::{Duration, SystemTime};
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, len: usize, age_s: u64| {
            let p = dir.path().join(name);
            fs::write(&p, vec![0u8; len]).unwrap();
            let f = fs::File::options().append(true).open(&p).unwrap();
            f.set_modified(SystemTime::now() - Duration::from_secs(age_s)).unwrap();
            p
        };
        let oldest = file("a", 100, 3000);
        let old = file("b", 100, 2000);
        let kept = file("c", 100, 1000);
        let fresh = file("d", 100, 0);
        // 400 bytes, at most 150: the two least recently used go; `kept` is spared as the
        // file being handed out, `fresh` for its age, so the cache stays over the cap.
        let removed = trim_cache(dir.path(), 150, &kept, Duration::from_secs(60)).unwrap();
        assert_eq!(removed, 200);
        assert!(!oldest.exists() && !old.exists() && kept.exists() && fresh.exists());
        // A touched file counts as just used.
        touch(&kept);
        assert_eq!(trim_cache(dir.path(), 0, &fresh, Duration::from_secs(60)).unwrap(), 0);
        assert_eq!(trim_cache(dir.path(), 100, &fresh, Duration::ZERO).unwrap(), 100);
        assert!(!kept.exists() && fresh.exists());
    }

    use super::*;

    #[test]
    fn import_indexes_and_dedups() {
        let src = tempfile::tempdir().unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_dir(store_dir.path().join("s")).unwrap();
        let d = src.path().join("dir");
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::write(d.join("a.txt"), b"hello").unwrap();
        fs::write(d.join("sub/b.txt"), b"world!!").unwrap();
        fs::write(src.path().join("empty"), b"").unwrap();
        let meta = store.import(&[d.clone(), src.path().join("empty")]).unwrap();
        let rel = |p: &Path| p.strip_prefix("/").unwrap().to_string_lossy().into_owned();
        assert_eq!(meta.size_of(&rel(&d.join("a.txt"))), Some(5));
        assert_eq!(meta.size_of(&format!("/{}", rel(&d))), Some(12));
        assert_eq!(meta.size_of(&rel(&src.path().join("empty"))), Some(0));
        assert_eq!(meta.size_of(&rel(&src.path().join("missing"))), None);
        let again = store.import(&[d, src.path().join("empty")]).unwrap();
        assert_eq!(again.snapshot_id, meta.snapshot_id);
        assert_eq!(store.list().unwrap(), vec![meta.snapshot_id.clone()]);
        assert!(store.meta("../x").is_err());
    }
}
