//! Content-addressed snapshots: a [`Manifest`] (every entry's path, kind, mode, mtime, link
//! target, and for each file the BLAKE3 digests and lengths of its chunks) plus blobs kept by
//! digest in a [`BlobStore`]. This is the only module that names `fastcdc`.
//!
//! Files up to [`CHUNK_THRESHOLD`] bytes are one blob; larger files are cut with
//! content-defined chunking (FastCDC 2020, chunks of 256 KiB to 4 MiB, 1 MiB on average), so
//! an edit inside a large file changes the chunks around it and no others. A snapshot id is the
//! content address of the manifest's bytes (`snap-` and 32 hex digits of their BLAKE3).
//!
//! Trees go in and out as tar streams through [`crate::tree`], so every check of the packer
//! (special files, links leaving the tree) and of the unpacker (hostile paths and links,
//! limits, staging and commit) applies to content-addressed snapshots unchanged:
//! [`build`] reads the packer's stream, [`write_tar`] writes the stream the unpacker reads,
//! verifying every chunk against its digest before a byte of it is written.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tree::{self, EntryKind, EntryMeta, IndexEntry, TreeError, TreeStats, UnpackLimits};

/// A BLAKE3 digest.
pub type Digest = [u8; 32];

/// Files larger than this are cut into content-defined chunks; smaller ones are one blob.
pub const CHUNK_THRESHOLD: u64 = 1 << 20;
const CDC_MIN: usize = 256 << 10;
const CDC_AVG: usize = 1 << 20;
const CDC_MAX: usize = 4 << 20;
/// Largest blob: a chunk, or a file below the threshold.
pub const MAX_BLOB: u64 = CDC_MAX as u64;
/// Largest manifest accepted from a peer or a store.
pub const MAX_MANIFEST: u64 = 512 << 20;
/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 1;

/// How a stored or sent blob's payload is encoded.
pub const ENC_RAW: u8 = 0;
pub const ENC_ZSTD: u8 = 1;

/// One chunk of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    pub digest: Digest,
    pub len: u64,
}

/// One entry of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub mtime: i64,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `digest:len` for each chunk, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "chunks_text")]
    pub chunks: Vec<Chunk>,
}

mod chunks_text {
    use super::Chunk;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(chunks: &[Chunk], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(chunks.iter().map(|c| format!("{}:{}", hex::encode(c.digest), c.len)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Chunk>, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        texts
            .iter()
            .map(|t| {
                let (h, l) = t.split_once(':').ok_or_else(|| D::Error::custom("chunk without a length"))?;
                let mut digest = [0u8; 32];
                hex::decode_to_slice(h, &mut digest).map_err(D::Error::custom)?;
                Ok(Chunk { digest, len: l.parse().map_err(D::Error::custom)? })
            })
            .collect()
    }
}

/// What a snapshot holds: its entries in the order a tar stream of it lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub entries: Vec<Entry>,
}

/// The content address of stored bytes whose digest is `digest`.
pub fn snapshot_id_of(digest: &Digest) -> String {
    format!("snap-{}", hex::encode(&digest[..16]))
}

impl Manifest {
    /// The canonical bytes (what is stored and sent) and their digest.
    pub fn encode(&self) -> (Vec<u8>, Digest) {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        let digest = *blake3::hash(&bytes).as_bytes();
        (bytes, digest)
    }

    /// Parses and checks a manifest from a peer or a store (see [`Manifest::check`]).
    pub fn decode(bytes: &[u8], limits: UnpackLimits) -> Result<Self, TreeError> {
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(TreeError::TooLarge { limit: MAX_MANIFEST });
        }
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| TreeError::Mismatch(format!("malformed manifest: {e}")))?;
        m.check(limits)?;
        Ok(m)
    }

    /// Refuses, naming the entry: a version this build does not know, a path that is not a
    /// plain relative path or appears twice, a file whose chunks do not add up to its size or
    /// hold a chunk of 0 or more than [`MAX_BLOB`] bytes, chunks on anything but a file, a
    /// link without a target, and content over the byte limit. (Where links lead is judged
    /// when the tree is unpacked, as for any tar stream.)
    pub fn check(&self, limits: UnpackLimits) -> Result<(), TreeError> {
        if self.version != MANIFEST_VERSION {
            return Err(TreeError::Mismatch(format!(
                "manifest version {} is not {MANIFEST_VERSION}",
                self.version
            )));
        }
        let refuse = |e: &Entry, why: String| TreeError::Refused { entry: e.path.clone(), reason: why };
        let mut seen = HashSet::with_capacity(self.entries.len());
        let mut total = 0u64;
        for e in &self.entries {
            if e.path.split('/').any(|c| c.is_empty() || c == "." || c == "..") || e.path.contains('\0') {
                return Err(refuse(e, "not a plain relative path".into()));
            }
            if !seen.insert(e.path.as_str()) {
                return Err(refuse(e, "appears twice in the manifest".into()));
            }
            if e.mode > 0o7777 {
                return Err(refuse(e, format!("mode {:o} is not a permission mode", e.mode)));
            }
            match e.kind {
                EntryKind::File => {
                    let mut sum = 0u64;
                    for c in &e.chunks {
                        if c.len == 0 || c.len > MAX_BLOB {
                            return Err(refuse(e, format!("a chunk of {} bytes", c.len)));
                        }
                        sum = sum.saturating_add(c.len);
                    }
                    if sum != e.size {
                        return Err(refuse(
                            e,
                            format!("its chunks add up to {sum} bytes, its size is {}", e.size),
                        ));
                    }
                    total = total.saturating_add(e.size);
                    if e.target.is_some() {
                        return Err(refuse(e, "a file with a link target".into()));
                    }
                }
                EntryKind::Dir | EntryKind::Symlink | EntryKind::Hardlink => {
                    if !e.chunks.is_empty() || e.size != 0 {
                        return Err(refuse(e, "content on an entry that is not a file".into()));
                    }
                    let is_link = e.kind != EntryKind::Dir;
                    if is_link != e.target.is_some() {
                        return Err(refuse(e, "a link needs a target, and only a link has one".into()));
                    }
                }
            }
        }
        if total > limits.max_bytes {
            return Err(TreeError::TooLarge { limit: limits.max_bytes });
        }
        // Links: a symlink resolves (through the tree's other symlinks) inside the tree; a
        // hardlink names a file listed before it.
        let symlinks: std::collections::HashMap<&Path, &Path> = self
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::Symlink)
            .filter_map(|e| Some((Path::new(&e.path), Path::new(e.target.as_deref()?))))
            .collect();
        let lookup = |p: &Path| symlinks.get(p).map(|t| t.to_path_buf());
        let mut files = HashSet::new();
        for e in &self.entries {
            match (e.kind, e.target.as_deref()) {
                (EntryKind::File, _) => {
                    files.insert(e.path.as_str());
                }
                (EntryKind::Symlink, Some(t))
                    if !crate::links::stays_within(&lookup, Path::new(&e.path), Path::new(t)) =>
                {
                    return Err(refuse(e, format!("symlink to {t} leads outside the snapshot")));
                }
                (EntryKind::Hardlink, Some(t)) if !files.contains(t) => {
                    return Err(refuse(e, format!("hardlink to {t}, which is not a file listed before it")));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Every distinct chunk, in first-use order.
    pub fn chunks(&self) -> Vec<Chunk> {
        let mut seen = HashSet::new();
        self.entries.iter().flat_map(|e| &e.chunks).filter(|c| seen.insert(c.digest)).copied().collect()
    }

    pub fn content_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// The index the store answers `check_outputs` from.
    pub fn index(&self) -> Vec<IndexEntry> {
        let mut files: Vec<IndexEntry> = self
            .entries
            .iter()
            .map(|e| IndexEntry {
                path: e.path.clone(),
                kind: e.kind,
                size: e.size,
                target: e.target.clone(),
            })
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        files
    }

    /// Where each chunk sits in the tree the manifest describes: `(path, offset)` by digest
    /// (the first place it appears).
    pub fn locations(&self) -> std::collections::HashMap<Digest, (String, u64, u64)> {
        let mut out = std::collections::HashMap::new();
        for e in &self.entries {
            let mut off = 0;
            for c in &e.chunks {
                out.entry(c.digest).or_insert_with(|| (e.path.clone(), off, c.len));
                off += c.len;
            }
        }
        out
    }
}

/// Builds the manifest of a tar stream, handing each distinct chunk to `blob` (with its
/// bytes) the first time it appears.
pub fn build_from_tar(
    input: impl Read,
    limits: UnpackLimits,
    mut blob: impl FnMut(&Chunk, &[u8]) -> Result<(), TreeError>,
) -> Result<(Manifest, TreeStats), TreeError> {
    let mut entries = Vec::new();
    let mut seen: HashSet<Digest> = HashSet::new();
    let stats = tree::visit(input, limits, |meta, content| {
        let mut chunks = Vec::new();
        if meta.kind == EntryKind::File && meta.size > 0 {
            let mut take = content.take(meta.size);
            let mut emit = |data: &[u8]| -> Result<(), TreeError> {
                let c = Chunk { digest: *blake3::hash(data).as_bytes(), len: data.len() as u64 };
                if seen.insert(c.digest) {
                    blob(&c, data)?;
                }
                chunks.push(c);
                Ok(())
            };
            if meta.size <= CHUNK_THRESHOLD {
                let mut data = Vec::with_capacity(meta.size as usize);
                take.read_to_end(&mut data).map_err(|e| io_err(&meta.path, e))?;
                emit(&data)?;
            } else {
                for c in fastcdc::v2020::StreamCDC::new(&mut take, CDC_MIN, CDC_AVG, CDC_MAX) {
                    let c = c.map_err(|e| io_err(&meta.path, e.into()))?;
                    emit(&c.data)?;
                }
            }
            let got: u64 = chunks.iter().map(|c| c.len).sum();
            if got != meta.size {
                return Err(TreeError::Mismatch(format!(
                    "{} ended after {got} of its {} bytes",
                    meta.path, meta.size
                )));
            }
        }
        entries.push(Entry {
            path: meta.path,
            kind: meta.kind,
            mode: meta.mode,
            mtime: meta.mtime,
            size: meta.size,
            target: meta.target,
            chunks,
        });
        Ok(())
    })?;
    Ok((Manifest { version: MANIFEST_VERSION, entries }, stats))
}

fn io_err(path: &str, e: io::Error) -> TreeError {
    TreeError::Io { context: format!("reading {path}"), source: e }
}

/// A pipe with a 1 MiB buffer (the default 64 KiB costs a context switch per 64 KiB).
fn pipe() -> Result<(io::PipeReader, io::PipeWriter), TreeError> {
    let (r, w) = io::pipe().map_err(|e| TreeError::Io { context: "making a pipe".into(), source: e })?;
    let _ = rustix::pipe::fcntl_setpipe_size(&w, 1 << 20);
    Ok((r, w))
}

/// Builds the manifest of `paths` beneath `root` (as [`tree::pack_paths`] would pack them, with
/// the same refusals), handing each distinct chunk to `blob`.
pub fn build(
    root: &Path,
    paths: &[PathBuf],
    limits: UnpackLimits,
    blob: impl FnMut(&Chunk, &[u8]) -> Result<(), TreeError>,
) -> Result<(Manifest, TreeStats), TreeError> {
    let (reader, writer) = pipe()?;
    std::thread::scope(|s| {
        let packer = s.spawn(move || tree::pack_paths(root, paths, writer));
        let built = build_from_tar(reader, limits, blob);
        let packed =
            packer.join().unwrap_or_else(|_| Err(TreeError::Mismatch("the packer thread panicked".into())));
        // The packer's refusal says why the stream ended early.
        packed?;
        built
    })
}

/// Where [`write_tar`] reads chunks: it checks each against its digest.
pub trait ChunkSource: Send + Sync {
    /// Whether the chunk is here (cheap; no verification).
    fn has(&self, digest: &Digest) -> bool;
    /// The chunk's bytes (verified by the caller).
    fn read(&self, chunk: &Chunk) -> io::Result<Vec<u8>>;
    /// A file this source holds whose bytes are exactly `chunks` in order, to be reused whole
    /// (see [`crate::reuse`]); unverified, the caller checks it.
    fn whole_file(&self, _chunks: &[Chunk]) -> Option<PathBuf> {
        None
    }
    /// A file of this source that holds the start of `chunks`, written by a transfer that
    /// broke off, to be completed in place (see [`crate::reuse::complete`]); unverified.
    fn partial_file(&self, _chunks: &[Chunk]) -> Option<PathBuf> {
        None
    }
}

/// Writes the tree a manifest describes as a tar stream (see [`tree::TarWriter`]), reading
/// chunks from `source` and checking each against its digest and length first: a chunk that
/// does not match ends the stream with [`TreeError::Mismatch`], before any of its bytes.
pub fn write_tar(manifest: &Manifest, source: &dyn ChunkSource, out: impl Write) -> Result<(), TreeError> {
    let mut w = tree::TarWriter::new(out);
    for e in &manifest.entries {
        let meta = EntryMeta {
            path: e.path.clone(),
            kind: e.kind,
            mode: e.mode,
            mtime: e.mtime,
            size: e.size,
            target: e.target.clone(),
        };
        let mut content =
            ChunkReader { chunks: &e.chunks, next: 0, buf: Vec::new(), pos: 0, source, failed: None };
        let appended = w.append(&meta, &mut content);
        if let Some(why) = content.failed.take() {
            return Err(TreeError::Mismatch(format!("{}: {why}", e.path)));
        }
        appended?;
        if content.next < e.chunks.len() || content.pos < content.buf.len() {
            return Err(TreeError::Mismatch(format!("{} was not written whole", e.path)));
        }
    }
    w.finish()
}

/// Hands `consume` the tar stream of the tree `manifest` describes (see [`write_tar`]), written
/// on a thread of its own. A chunk that fails verification is the error, whatever the
/// consumer made of the stream it cut short; what the consumer left unread is drained.
pub fn with_tar<T>(
    manifest: &Manifest,
    source: &dyn ChunkSource,
    consume: impl FnOnce(&mut dyn Read) -> Result<T, TreeError>,
) -> Result<T, TreeError> {
    let (mut reader, writer) = pipe()?;
    std::thread::scope(|s| {
        let w = s.spawn(move || write_tar(manifest, source, writer));
        let consumed = consume(&mut reader);
        let _ = io::copy(&mut reader, &mut io::sink());
        drop(reader);
        match w.join() {
            Ok(Ok(())) => consumed,
            Ok(Err(e @ TreeError::Mismatch(_))) => Err(e),
            Ok(Err(e)) => consumed.and(Err(e)),
            Err(_) => Err(TreeError::Mismatch("the tar writer thread panicked".into())),
        }
    })
}

/// Reads a file's chunks in order, each verified.
struct ChunkReader<'a> {
    chunks: &'a [Chunk],
    next: usize,
    buf: Vec<u8>,
    pos: usize,
    source: &'a dyn ChunkSource,
    /// Why a chunk could not be read or failed verification.
    failed: Option<String>,
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            let Some(c) = self.chunks.get(self.next) else { return Ok(0) };
            let data = match self.source.read(c) {
                Ok(d) => d,
                Err(e) => {
                    let why = format!("blob {}: {e}", hex::encode(c.digest));
                    self.failed = Some(why.clone());
                    return Err(io::Error::other(why));
                }
            };
            if let Err(e) = check_blob(c, &data) {
                self.failed = Some(e.to_string());
                return Err(io::Error::other(e.to_string()));
            }
            self.buf = data;
            self.pos = 0;
            self.next += 1;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Whether `data` is the chunk `c`: its length and BLAKE3 digest.
pub fn check_blob(c: &Chunk, data: &[u8]) -> Result<(), TreeError> {
    if data.len() as u64 != c.len || *blake3::hash(data).as_bytes() != c.digest {
        return Err(TreeError::Mismatch(format!(
            "blob {} does not match its digest and length ({} bytes, {} expected)",
            hex::encode(c.digest),
            data.len(),
            c.len
        )));
    }
    Ok(())
}

/// Decodes a blob's payload (at most [`MAX_BLOB`] bytes once decoded) and checks it.
pub fn decode_blob(c: &Chunk, encoding: u8, payload: &[u8]) -> Result<Vec<u8>, TreeError> {
    let data = decode_unchecked(c, encoding, payload)?;
    check_blob(c, &data)?;
    Ok(data)
}

/// Decodes a blob's payload without checking it against its digest: for a reader whose
/// caller checks (a [`ChunkSource`] read goes through [`Sources`] or [`with_tar`], which do).
pub fn decode_unchecked(c: &Chunk, encoding: u8, payload: &[u8]) -> Result<Vec<u8>, TreeError> {
    Ok(match encoding {
        ENC_RAW => payload.to_vec(),
        ENC_ZSTD => {
            let mut out = Vec::with_capacity(c.len.min(MAX_BLOB) as usize);
            zstd::stream::read::Decoder::new(payload)
                .and_then(|d| d.take(MAX_BLOB + 1).read_to_end(&mut out))
                .map_err(|e| TreeError::Mismatch(format!("blob {}: {e}", hex::encode(c.digest))))?;
            out
        }
        other => return Err(TreeError::Mismatch(format!("blob encoding {other} is not known"))),
    })
}

/// Encodes a blob for the wire and the store: zstd when that saves an eighth or more.
pub fn encode_blob(data: &[u8], level: i32) -> (u8, Vec<u8>) {
    if level > 0
        && let Ok(z) = zstd::bulk::compress(data, level)
        && z.len() < data.len() - data.len() / 8
    {
        return (ENC_ZSTD, z);
    }
    (ENC_RAW, data.to_vec())
}

/// Blobs kept by digest under a directory: `<dir>/<first two hex digits>/<hex digest>`, each
/// file holding one encoding byte and the payload. A blob is written beside its place and
/// renamed into it once verified, so a present blob is always whole.
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    pub fn open(dir: PathBuf) -> io::Result<Self> {
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, d: &Digest) -> PathBuf {
        let h = hex::encode(d);
        self.dir.join(&h[..2]).join(h)
    }

    pub fn has(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// Stored size of a blob (encoding byte and payload), when present.
    pub fn stored_len(&self, d: &Digest) -> Option<u64> {
        fs::metadata(self.path(d)).ok().map(|m| m.len())
    }

    /// Verifies `payload` as chunk `c` and keeps it (once: a present blob is left alone).
    /// Returns the stored bytes.
    pub fn put(&self, c: &Chunk, encoding: u8, payload: &[u8]) -> Result<u64, TreeError> {
        decode_blob(c, encoding, payload)?;
        self.put_verified(&c.digest, encoding, payload)
    }

    /// Keeps a payload the caller verified.
    pub fn put_verified(&self, d: &Digest, encoding: u8, payload: &[u8]) -> Result<u64, TreeError> {
        let path = self.path(d);
        let len = 1 + payload.len() as u64;
        if path.is_file() {
            return Ok(len);
        }
        let err = |e| TreeError::Io { context: format!("storing blob {}", hex::encode(d)), source: e };
        let parent = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(parent).map_err(err)?;
        let tmp = parent.join(format!(".{:016x}.tmp", rand::random::<u64>()));
        let written = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&[encoding])?;
            f.write_all(payload)?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(err(e));
        }
        Ok(len)
    }

    /// The stored encoding and payload, as kept (not verified: the reader verifies).
    pub fn get_raw(&self, d: &Digest) -> io::Result<(u8, Vec<u8>)> {
        let mut bytes = fs::read(self.path(d))?;
        if bytes.is_empty() {
            return Err(io::Error::other(format!("blob {} is empty", hex::encode(d))));
        }
        let enc = bytes.remove(0);
        Ok((enc, bytes))
    }

    /// Every blob's digest.
    pub fn list(&self) -> io::Result<Vec<Digest>> {
        let mut out = Vec::new();
        for shard in fs::read_dir(&self.dir)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(shard.path())? {
                let name = f?.file_name();
                let mut d = [0u8; 32];
                if hex::decode_to_slice(name.as_encoded_bytes(), &mut d).is_ok() {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    pub fn remove(&self, d: &Digest) -> io::Result<u64> {
        let p = self.path(d);
        let len = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        fs::remove_file(p)?;
        Ok(len)
    }

    /// Total stored bytes.
    pub fn total_bytes(&self) -> u64 {
        self.list().unwrap_or_default().iter().filter_map(|d| self.stored_len(d)).sum()
    }
}

impl ChunkSource for BlobStore {
    fn has(&self, digest: &Digest) -> bool {
        BlobStore::has(self, digest)
    }

    fn read(&self, c: &Chunk) -> io::Result<Vec<u8>> {
        let (enc, payload) = self.get_raw(&c.digest)?;
        decode_blob(c, enc, &payload).map_err(io::Error::other)
    }
}

/// Chunks read from files of a tree a manifest describes (`root` joined with each entry's
/// path, at the chunk's offset): a tree on disk as a chunk source.
pub struct TreeSource {
    root: PathBuf,
    at: std::collections::HashMap<Digest, (String, u64, u64)>,
}

impl TreeSource {
    pub fn new(root: PathBuf, manifest: &Manifest) -> Self {
        Self { root, at: manifest.locations() }
    }

    /// The chunk of this digest, if the tree holds it.
    pub fn chunk(&self, digest: &Digest) -> Option<Chunk> {
        self.at.get(digest).map(|&(_, _, len)| Chunk { digest: *digest, len })
    }
}

impl ChunkSource for TreeSource {
    fn has(&self, digest: &Digest) -> bool {
        self.at.contains_key(digest)
    }

    fn read(&self, c: &Chunk) -> io::Result<Vec<u8>> {
        let Some((path, off, len)) = self.at.get(&c.digest) else {
            return Err(io::Error::new(io::ErrorKind::NotFound, "chunk not in this tree"));
        };
        read_range(&self.root.join(path), *off, *len)
    }
}

/// `len` bytes at `off` of a file, opened without following a symlink.
pub fn read_range(path: &Path, off: u64, len: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    if len > MAX_BLOB {
        return Err(io::Error::other("chunk over the blob limit"));
    }
    let f = fs::OpenOptions::new().read(true).custom_flags(crate::fsafe::O_NOFOLLOW).open(path)?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, off)?;
    Ok(buf)
}

/// The files of a tree a fetch that broke off had written (its staging directory, laid out
/// by the same manifest): only files of their full size count, each chunk at its offset, so a
/// resumed fetch reuses them whole (see [`crate::reuse`], which checks every one against its
/// digests before it is linked in) instead of fetching and writing them again. Files that
/// count are made read-only with the manifest's mode, so they can be hard-linked.
pub struct PartialTree {
    whole: std::collections::HashMap<Vec<Digest>, PathBuf>,
    /// Files written in part: the chunks of their start that lie within their length.
    started: std::collections::HashMap<Vec<Digest>, PathBuf>,
    at: std::collections::HashMap<Digest, (PathBuf, u64, u64)>,
}

impl PartialTree {
    pub fn new(root: &Path, manifest: &Manifest) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let mut whole = std::collections::HashMap::new();
        let mut started = std::collections::HashMap::new();
        let mut at = std::collections::HashMap::new();
        for e in &manifest.entries {
            if e.kind != EntryKind::File || e.size == 0 {
                continue;
            }
            let path = root.join(&e.path);
            // Never through a link: the tree's own entries only.
            let len = fs::symlink_metadata(&path).ok().filter(|m| m.file_type().is_file()).map(|m| m.len());
            let Some(len) = len.filter(|l| *l > 0 && *l <= e.size) else { continue };
            let mut off = 0;
            for c in &e.chunks {
                if off + c.len > len {
                    break;
                }
                at.entry(c.digest).or_insert_with(|| (path.clone(), off, c.len));
                off += c.len;
            }
            let key: Vec<Digest> = e.chunks.iter().map(|c| c.digest).collect();
            if len == e.size {
                let _ = fs::set_permissions(&path, fs::Permissions::from_mode(e.mode & 0o7777 & !0o222));
                whole.entry(key).or_insert(path);
            } else if off > 0 {
                started.entry(key).or_insert(path);
            }
        }
        Self { whole, started, at }
    }

    /// Whether it holds anything at all.
    pub fn is_empty(&self) -> bool {
        self.whole.is_empty() && self.started.is_empty()
    }
}

impl ChunkSource for PartialTree {
    fn has(&self, digest: &Digest) -> bool {
        self.at.contains_key(digest)
    }

    fn read(&self, c: &Chunk) -> io::Result<Vec<u8>> {
        let Some((path, off, len)) = self.at.get(&c.digest) else {
            return Err(io::Error::new(io::ErrorKind::NotFound, "chunk not in this tree"));
        };
        read_range(path, *off, *len)
    }

    fn whole_file(&self, chunks: &[Chunk]) -> Option<PathBuf> {
        self.whole.get(&chunks.iter().map(|c| c.digest).collect::<Vec<_>>()).cloned()
    }

    fn partial_file(&self, chunks: &[Chunk]) -> Option<PathBuf> {
        self.started.get(&chunks.iter().map(|c| c.digest).collect::<Vec<_>>()).cloned()
    }
}

/// Chunks from the first of several sources that has them.
pub struct Sources<'a>(pub Vec<&'a dyn ChunkSource>);

impl ChunkSource for Sources<'_> {
    fn whole_file(&self, chunks: &[Chunk]) -> Option<PathBuf> {
        self.0.iter().find_map(|s| s.whole_file(chunks))
    }

    fn partial_file(&self, chunks: &[Chunk]) -> Option<PathBuf> {
        self.0.iter().find_map(|s| s.partial_file(chunks))
    }

    fn has(&self, digest: &Digest) -> bool {
        self.0.iter().any(|s| s.has(digest))
    }

    /// Checked here only when another source could stand in for a damaged copy: a single
    /// copy goes to the caller unchecked, and the caller checks it ([`with_tar`] does).
    fn read(&self, c: &Chunk) -> io::Result<Vec<u8>> {
        let holders: Vec<&&dyn ChunkSource> = self.0.iter().filter(|s| s.has(&c.digest)).collect();
        if let [only] = holders[..] {
            return only.read(c);
        }
        let mut last = None;
        for s in holders {
            match s.read(c) {
                Ok(d) if check_blob(c, &d).is_ok() => return Ok(d),
                Ok(_) => {
                    last =
                        Some(io::Error::other(format!("a copy of blob {} is damaged", hex::encode(c.digest))))
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("blob {} is not here", hex::encode(c.digest)))
        }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn tree(dir: &Path) {
        fs::create_dir_all(dir.join("out/sub")).unwrap();
        fs::write(dir.join("out/a.txt"), b"alpha\n").unwrap();
        fs::write(dir.join("out/empty"), b"").unwrap();
        let big: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        fs::write(dir.join("out/sub/big"), &big).unwrap();
        std::os::unix::fs::symlink("a.txt", dir.join("out/link")).unwrap();
    }

    /// `dir/out` built into a manifest, its blobs kept in `blobs`.
    pub(crate) fn store_of(dir: &Path, blobs: &BlobStore) -> Manifest {
        build(dir, &[PathBuf::from("out")], UnpackLimits::default(), |c, data| {
            let (enc, payload) = encode_blob(data, 1);
            blobs.put(c, enc, &payload).map(|_| ())
        })
        .unwrap()
        .0
    }

    #[test]
    fn a_tree_round_trips_through_manifest_and_blobs() {
        let src = tempfile::tempdir().unwrap();
        tree(src.path());
        let blobs = BlobStore::open(src.path().join("blobs")).unwrap();
        let m = store_of(src.path(), &blobs);
        let big = m.entries.iter().find(|e| e.path == "out/sub/big").unwrap();
        assert!(big.chunks.len() >= 2, "a 5 MB file is chunked: {}", big.chunks.len());
        let (bytes, digest) = m.encode();
        assert_eq!(Manifest::decode(&bytes, UnpackLimits::default()).unwrap(), m);
        assert!(snapshot_id_of(&digest).starts_with("snap-"));
        let dest = tempfile::tempdir().unwrap();
        with_tar(&m, &blobs, |r| tree::unpack_into(r, &dest.path().join("t"), UnpackLimits::default()))
            .unwrap();
        for p in ["out/a.txt", "out/empty", "out/sub/big"] {
            assert_eq!(
                fs::read(dest.path().join("t").join(p)).unwrap(),
                fs::read(src.path().join(p)).unwrap()
            );
        }
        assert_eq!(fs::read_link(dest.path().join("t/out/link")).unwrap(), Path::new("a.txt"));
    }

    #[test]
    fn an_edit_inside_a_large_file_changes_few_chunks() {
        let src = tempfile::tempdir().unwrap();
        tree(src.path());
        let blobs = BlobStore::open(src.path().join("blobs")).unwrap();
        let before = store_of(src.path(), &blobs).chunks();
        let mut big = fs::read(src.path().join("out/sub/big")).unwrap();
        for b in &mut big[2_500_000..2_510_000] {
            *b ^= 0xff;
        }
        fs::write(src.path().join("out/sub/big"), &big).unwrap();
        let after = store_of(src.path(), &blobs).chunks();
        let old: HashSet<_> = before.iter().map(|c| c.digest).collect();
        let new: Vec<_> = after.iter().filter(|c| !old.contains(&c.digest)).collect();
        let new_bytes: u64 = new.iter().map(|c| c.len).sum();
        assert!(new.len() <= 2 && new_bytes < 4_500_000, "{} new chunks, {new_bytes} bytes", new.len());
    }

    #[test]
    fn hostile_manifests_are_refused() {
        let ok = Entry {
            path: "a".into(),
            kind: EntryKind::File,
            mode: 0o644,
            mtime: 0,
            size: 3,
            target: None,
            chunks: vec![Chunk { digest: [1; 32], len: 3 }],
        };
        let check = |e: Entry| Manifest { version: 1, entries: vec![e] }.check(UnpackLimits::default());
        assert!(check(ok.clone()).is_ok());
        for bad in [
            Entry { path: "../x".into(), ..ok.clone() },
            Entry { path: "/etc/passwd".into(), ..ok.clone() },
            Entry { path: "a/./b".into(), ..ok.clone() },
            Entry { path: String::new(), ..ok.clone() },
            Entry { size: 4, ..ok.clone() },
            Entry { chunks: vec![Chunk { digest: [1; 32], len: 0 }], size: 0, ..ok.clone() },
            Entry {
                chunks: vec![Chunk { digest: [1; 32], len: MAX_BLOB + 1 }],
                size: MAX_BLOB + 1,
                ..ok.clone()
            },
            Entry { kind: EntryKind::Symlink, ..ok.clone() },
            Entry { kind: EntryKind::Symlink, size: 0, chunks: vec![], target: None, ..ok.clone() },
            Entry { mode: 0o170000, ..ok.clone() },
        ] {
            assert!(check(bad.clone()).is_err(), "accepted {bad:?}");
        }
        let link = |path: &str, kind, target: &str| Entry {
            path: path.into(),
            kind,
            size: 0,
            chunks: vec![],
            target: Some(target.into()),
            ..ok.clone()
        };
        let with =
            |e: Entry| Manifest { version: 1, entries: vec![ok.clone(), e] }.check(UnpackLimits::default());
        assert!(with(link("l", EntryKind::Symlink, "a")).is_ok());
        assert!(with(link("d/l", EntryKind::Symlink, "../a")).is_ok());
        assert!(with(link("l", EntryKind::Hardlink, "a")).is_ok());
        for bad in [
            link("l", EntryKind::Symlink, "/etc/passwd"),
            link("l", EntryKind::Symlink, "../a"),
            link("d/l", EntryKind::Symlink, "../../a"),
            link("l", EntryKind::Hardlink, "../a"),
            link("l", EntryKind::Hardlink, "missing"),
        ] {
            assert!(with(bad.clone()).is_err(), "accepted {bad:?}");
        }
        // Through another link of the tree.
        let up = Manifest {
            version: 1,
            entries: vec![link("d", EntryKind::Symlink, ".."), link("e", EntryKind::Symlink, "d/../x")],
        };
        assert!(up.check(UnpackLimits::default()).is_err());
        let twice = Manifest { version: 1, entries: vec![ok.clone(), ok.clone()] };
        assert!(twice.check(UnpackLimits::default()).is_err());
        assert!(
            Manifest::decode(b"{\"version\":1,\"entries\":[{\"path\":", UnpackLimits::default()).is_err()
        );
    }

    #[test]
    fn a_blob_that_does_not_match_its_digest_is_not_kept_or_written() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("b")).unwrap();
        let data = b"hello";
        let c = Chunk { digest: *blake3::hash(data).as_bytes(), len: 5 };
        assert!(blobs.put(&c, ENC_RAW, b"hellp").is_err());
        assert!(!blobs.has(&c.digest));
        blobs.put(&c, ENC_RAW, data).unwrap();
        assert_eq!(blobs.list().unwrap(), vec![c.digest]);
        // A stored blob tampered with afterwards fails where it is read into a tree.
        let p = blobs.path(&c.digest);
        fs::write(&p, b"\0hellq").unwrap();
        let m = Manifest {
            version: 1,
            entries: vec![Entry {
                path: "f".into(),
                kind: EntryKind::File,
                mode: 0o644,
                mtime: 0,
                size: 5,
                target: None,
                chunks: vec![c],
            }],
        };
        let err = write_tar(&m, &blobs, io::sink()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }
}
