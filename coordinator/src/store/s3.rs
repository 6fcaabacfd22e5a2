//! The S3 snapshot store: the only module naming `aws-sdk-s3`.
//!
//! Snapshots are content-addressed, as in the local store: `cas/manifests/<id>` holds a
//! snapshot's manifest (its id the address of those bytes), blobs live in packs
//! (`cas/packs/<digest>` and its index `cas/packs/<digest>.idx`, see [`super::packs`]), so
//! 100,000 small files make a few packs, not 100,000 objects. `<id>.json`, the snapshot's
//! file index, is written last (its presence means the snapshot is complete). Agents read
//! and write packs themselves at presigned URLs ([`PackDirect`]): they fetch only the blobs
//! they lack, with byte ranges, and upload only the blobs the store lacks, in packs the
//! coordinator reads back and verifies before it counts their blobs as stored.
//!
//! Snapshots of an older store stay readable: `<id>.tar.zst` holds the archive, with the
//! BLAKE3 digest of its bytes as object metadata (`x-amz-meta-blake3`); agents fetch it at a
//! presigned URL ([`DirectStore`]) and every reader checks the digest. Agents without packs
//! (protocol minor 5) still store archives that way; an archive relayed through the
//! coordinator, and an import, become manifest and packs.
//!
//! The SDK is async and the store's interface blocks, so the store runs the SDK on a runtime
//! of its own: a blocking call never needs the caller's runtime.

use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::RequestChecksumCalculation;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::RequestId;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use protocol::Trailer;
use tracing::{debug, info, warn};
use transport::tree::{IndexEntry, UnpackLimits};

use super::packs::{Objects, Packs};
use super::{
    Begin, CasStore, DirectStore, Download, PackDirect, S3Config, SnapshotMeta, SnapshotStore, Ticket,
    snapshot_id_of,
};
use transport::cas::{self, Chunk, ChunkSource, Digest, Manifest};
use transport::pack::PackIndex;

/// Object metadata key of the stored bytes' BLAKE3 digest (hex).
const DIGEST_META: &str = "blake3";
/// S3 allows at most this many parts per upload.
const MAX_PARTS: u64 = 10_000;
/// S3's smallest part (but the last).
const MIN_PART: u64 = 5 << 20;
/// A cached object used this recently is never trimmed: a reader may hold its path.
const CACHE_MIN_AGE: Duration = Duration::from_secs(300);
/// zstd level of blobs the coordinator encodes itself (relayed archives, imports).
const BLOB_ZSTD_LEVEL: i32 = 3;

pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    part_size: u64,
    ttl: Duration,
    /// Incoming streams (relayed stores, imports) and verified downloads for local reads.
    local: PathBuf,
    limits: UnpackLimits,
    /// Indexes read so far (snapshots never change once complete).
    metas: Mutex<HashMap<String, SnapshotMeta>>,
    /// Most bytes the read cache keeps.
    cache_max: u64,
    /// Blobs, in packs; set once the store has opened.
    packs: Option<Packs>,
    rt: Background,
}

/// A small runtime of the store's own for the SDK's futures.
struct Background(Option<tokio::runtime::Runtime>);

impl Background {
    fn block<F>(&self, f: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let rt = self.0.as_ref().ok_or_else(|| anyhow!("object store shut down"))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().map_err(|_| anyhow!("object store call abandoned"))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's async context panics; this does not.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// One line per call with its request id; a failure as an error naming code and request id.
fn checked<T: RequestId, E>(op: &str, key: &str, r: Result<T, SdkError<E>>) -> Result<T>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match r {
        Ok(out) => {
            debug!(op, key, request_id = out.request_id().unwrap_or("-"), "s3 call");
            Ok(out)
        }
        Err(e) => {
            let rid = e.request_id().unwrap_or("-").to_string();
            warn!(op, key, request_id = %rid, code = e.code().unwrap_or("-"), "s3 call failed");
            match e.code() {
                Some(code) => {
                    Err(anyhow!("{op} {key}: {code}: {} (request {rid})", e.message().unwrap_or("")))
                }
                None => Err(anyhow!("{op} {key}: {} (request {rid})", DisplayErrorContext(e))),
            }
        }
    }
}

fn parse_digest(hex_digest: &str) -> Option<[u8; 32]> {
    let mut d = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut d).ok().map(|_| d)
}

impl S3Store {
    pub fn open(cfg: &S3Config, local: &Path) -> Result<Self> {
        if cfg.bucket.is_empty() {
            bail!("store config: bucket is required for an s3 store");
        }
        let part_size = cfg.part_size_mib << 20;
        if part_size < MIN_PART {
            bail!("store config: part_size_mib must be at least 5 (S3's smallest part)");
        }
        if cfg.presign_ttl_secs == 0 || cfg.presign_ttl_secs > 7 * 24 * 3600 {
            bail!("store config: presign_ttl_secs must be between 1 and 604800");
        }
        fs::create_dir_all(local.join("incoming"))
            .with_context(|| format!("creating {}", local.display()))?;
        fs::create_dir_all(local.join("cache")).with_context(|| format!("creating {}", local.display()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pype-s3")
            .enable_all()
            .build()
            .context("starting the object store's runtime")?;
        let rt = Background(Some(rt));
        let ep = crate::aws::Endpoint {
            region: cfg.region.clone(),
            endpoint_url: cfg.endpoint_url.clone(),
            max_attempts: cfg.max_attempts,
        };
        let sdk = rt.block(async move { crate::aws::sdk_config(&ep).await })?;
        let conf = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(cfg.force_path_style)
            // Presigned part URLs must not carry a checksum of an empty body.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .build();
        let prefix = cfg.prefix.trim_matches('/').to_string();
        info!(bucket = %cfg.bucket, prefix = %prefix, part_mib = cfg.part_size_mib, "snapshot store: s3");
        let mut store = Self {
            client: Client::from_conf(conf),
            bucket: cfg.bucket.clone(),
            prefix,
            part_size,
            ttl: Duration::from_secs(cfg.presign_ttl_secs),
            local: local.to_path_buf(),
            limits: UnpackLimits::default(),
            metas: Mutex::new(HashMap::new()),
            cache_max: cfg.cache_max_mib << 20,
            packs: None,
            rt,
        };
        fs::create_dir_all(local.join("manifests"))
            .with_context(|| format!("creating {}", local.display()))?;
        let packs = Packs::load(&store, store.key("cas/packs/"), local.join("cache"))?;
        store.packs = Some(packs);
        Ok(store)
    }

    fn packs(&self) -> Result<&Packs> {
        self.packs.as_ref().ok_or_else(|| anyhow!("the object store has not opened"))
    }

    fn manifest_key(&self, id: &str) -> String {
        self.key(&format!("cas/manifests/{id}"))
    }

    fn presign_get(&self, key: String) -> Result<String> {
        let (c, b, ttl) = (self.client.clone(), self.bucket.clone(), self.ttl);
        self.rt.block(async move {
            let req = c.get_object().bucket(b).key(key).presigned(PresigningConfig::expires_in(ttl)?).await?;
            anyhow::Ok(req.uri().to_string())
        })?
    }

    fn presign_put(&self, key: String) -> Result<String> {
        let (c, b, ttl) = (self.client.clone(), self.bucket.clone(), self.ttl);
        self.rt.block(async move {
            let req = c.put_object().bucket(b).key(key).presigned(PresigningConfig::expires_in(ttl)?).await?;
            anyhow::Ok(req.uri().to_string())
        })?
    }

    /// Keeps a chunk the coordinator read itself (relayed archives, imports), encoded.
    fn keep(&self, c: &Chunk, data: &[u8]) -> Result<(), transport::TreeError> {
        let packs = self.packs().map_err(|e| transport::TreeError::Mismatch(format!("{e:#}")))?;
        if packs.has(&c.digest) {
            return Ok(());
        }
        let (enc, payload) = cas::encode_blob(data, BLOB_ZSTD_LEVEL);
        packs
            .put(self, c, enc, &payload)
            .map(|_| ())
            .map_err(|e| transport::TreeError::Mismatch(format!("{e:#}")))
    }

    /// Takes a tar stream into the store as manifest and packed blobs.
    fn ingest_tar(&self, input: impl std::io::Read) -> Result<SnapshotMeta> {
        let (manifest, _) = cas::build_from_tar(input, self.limits, |c, data| self.keep(c, data))?;
        let (bytes, _) = manifest.encode();
        self.commit(&bytes, &manifest)
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}/{name}", self.prefix) }
    }

    fn data_key(&self, id: &str) -> String {
        self.key(&format!("{id}.tar.zst"))
    }

    fn index_key(&self, id: &str) -> String {
        self.key(&format!("{id}.json"))
    }

    /// The stored bytes' length and the digest in their metadata; `None` when absent.
    fn head(&self, id: &str) -> Result<Option<(u64, [u8; 32])>> {
        let (c, b, k) = (self.client.clone(), self.bucket.clone(), self.data_key(id));
        let key = k.clone();
        let r = self.rt.block(async move { c.head_object().bucket(b).key(k).send().await })?;
        if let Err(SdkError::ServiceError(e)) = &r
            && e.err().is_not_found()
        {
            return Ok(None);
        }
        let out = checked("HeadObject", &key, r)?;
        let len = out.content_length().unwrap_or(0).max(0) as u64;
        let digest = out
            .metadata()
            .and_then(|m| m.get(DIGEST_META))
            .and_then(|d| parse_digest(d))
            .ok_or_else(|| anyhow!("object {key} has no valid {DIGEST_META} digest metadata"))?;
        Ok(Some((len, digest)))
    }

    fn create_upload(&self, id: &str, digest: &[u8; 32]) -> Result<String> {
        let (c, b, k) = (self.client.clone(), self.bucket.clone(), self.data_key(id));
        let key = k.clone();
        let d = hex::encode(digest);
        let r = self.rt.block(async move {
            c.create_multipart_upload()
                .bucket(b)
                .key(k)
                .metadata(DIGEST_META, d)
                .content_type("application/zstd")
                .send()
                .await
        })?;
        let out = checked("CreateMultipartUpload", &key, r)?;
        out.upload_id()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("CreateMultipartUpload {key}: no upload id"))
    }

    fn complete(&self, t: &Ticket, etags: Vec<String>) -> Result<()> {
        let parts = etags
            .into_iter()
            .enumerate()
            .map(|(i, e)| CompletedPart::builder().e_tag(e).part_number(i as i32 + 1).build())
            .collect();
        let (c, b, k, u) =
            (self.client.clone(), self.bucket.clone(), self.data_key(&t.snapshot_id), t.upload_id.clone());
        let key = k.clone();
        let r = self.rt.block(async move {
            c.complete_multipart_upload()
                .bucket(b)
                .key(k)
                .upload_id(u)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await
        })?;
        checked("CompleteMultipartUpload", &key, r).map(|_| ())
    }

    fn put_index(&self, meta: &SnapshotMeta) -> Result<()> {
        let json = serde_json::to_vec(meta)?;
        let (c, b, k) = (self.client.clone(), self.bucket.clone(), self.index_key(&meta.snapshot_id));
        let key = k.clone();
        let r = self.rt.block(async move {
            c.put_object()
                .bucket(b)
                .key(k)
                .content_type("application/json")
                .body(ByteStream::from(json))
                .send()
                .await
        })?;
        checked("PutObject", &key, r)?;
        if let Ok(mut m) = self.metas.lock() {
            m.insert(meta.snapshot_id.clone(), meta.clone());
        }
        Ok(())
    }

    fn delete(&self, key: String) -> Result<()> {
        let (c, b, k) = (self.client.clone(), self.bucket.clone(), key.clone());
        let r = self.rt.block(async move { c.delete_object().bucket(b).key(k).send().await })?;
        checked("DeleteObject", &key, r).map(|_| ())
    }

    /// Rebuilds the index of stored snapshot `id` from its bytes, read through the verified
    /// read cache, and stores it.
    fn reindex(&self, id: &str) -> Result<SnapshotMeta> {
        let (path, digest) = self.open(id)?;
        let wire_bytes = fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?.len();
        let (files, _) = transport::archive::index(&path, self.limits)
            .with_context(|| format!("indexing snapshot {id}"))?;
        let meta = super::meta_from_index(id, wire_bytes, &digest, files)?;
        self.put_index(&meta)?;
        info!(snapshot = %id, "snapshot store: indexed an old snapshot again, with its link targets");
        Ok(meta)
    }

    fn cache_path(&self, id: &str) -> PathBuf {
        self.local.join("cache").join(format!("{id}.tar.zst"))
    }

    /// Downloads the stored bytes to `dest`, checking them against `digest`.
    fn download_to(&self, id: &str, dest: &Path, len: u64, digest: &[u8; 32]) -> Result<()> {
        let (c, b, k) = (self.client.clone(), self.bucket.clone(), self.data_key(id));
        let key = k.clone();
        let tmp = dest.with_extension("part");
        let t = tmp.clone();
        let r = self.rt.block(async move {
            let out = c.get_object().bucket(b).key(k).send().await;
            let out = checked("GetObject", &key, out)?;
            let mut body = out.body;
            let mut f = std::io::BufWriter::new(fs::File::create(&t)?);
            let mut hasher = blake3::Hasher::new();
            let mut n = 0u64;
            while let Some(chunk) = body.try_next().await.context("reading the object")? {
                hasher.update(&chunk);
                n += chunk.len() as u64;
                f.write_all(&chunk)?;
            }
            f.flush()?;
            anyhow::Ok((n, *hasher.finalize().as_bytes()))
        })?;
        let (n, got) = match r {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if n != len || got != *digest {
            let _ = fs::remove_file(&tmp);
            bail!(
                "snapshot {id}: the stored object does not match its digest ({n} bytes read, {len} expected)"
            );
        }
        fs::rename(&tmp, dest).with_context(|| format!("moving into {}", dest.display()))
    }
}

impl SnapshotStore for S3Store {
    /// Listing the bucket costs requests: hourly.
    fn usage_every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(3600)
    }

    fn direct(&self) -> Option<&dyn DirectStore> {
        Some(self)
    }

    fn cas(&self) -> Option<&dyn CasStore> {
        Some(self)
    }

    fn import(&self, paths: &[PathBuf]) -> Result<SnapshotMeta> {
        let rels = super::import_rels(paths)?;
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
        match self.manifest(snapshot_id)? {
            Some((_, m)) => super::write_out_manifest(
                snapshot_id,
                &m,
                &Blobs(self),
                self.limits,
                in_snapshot_path,
                dest,
                root,
            ),
            None => super::write_out_archive(self, snapshot_id, in_snapshot_path, dest, root),
        }
    }

    fn incoming_path(&self) -> Result<PathBuf> {
        Ok(self.local.join("incoming").join(format!("{:016x}.part", rand::random::<u64>())))
    }

    /// A verified zstd tar stream (relayed from an agent) becomes manifest and packed blobs.
    fn ingest(&self, file: &Path, _trailer: &Trailer) -> Result<SnapshotMeta> {
        let result = (|| {
            let input = fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
            self.ingest_tar(zstd::stream::read::Decoder::new(input)?)
        })();
        let _ = fs::remove_file(file);
        result
    }

    fn open(&self, snapshot_id: &str) -> Result<(PathBuf, [u8; 32])> {
        let meta =
            self.meta(snapshot_id)?.ok_or_else(|| anyhow!("snapshot {snapshot_id} is not in the store"))?;
        let digest = parse_digest(&meta.digest)
            .ok_or_else(|| anyhow!("index of snapshot {snapshot_id} has a bad digest"))?;
        let path = self.cache_path(snapshot_id);
        // A cached copy of another length is not the stored object: fetch it again. (Its
        // digest is checked by every reader: agents, and the coordinator's own write-out.)
        let cached = fs::metadata(&path).map(|m| m.len() == meta.wire_bytes).unwrap_or(false);
        if cached {
            super::touch(&path);
        } else {
            self.download_to(snapshot_id, &path, meta.wire_bytes, &digest)?;
            let cache = self.local.join("cache");
            match super::trim_cache(&cache, self.cache_max, &path, CACHE_MIN_AGE) {
                Ok(0) => {}
                Ok(n) => info!(bytes = n, "snapshot store: trimmed the read cache"),
                Err(e) => warn!("snapshot store: could not trim the read cache: {e:#}"),
            }
        }
        Ok((path, digest))
    }

    fn evict(&self, snapshot_id: &str) {
        let _ = fs::remove_file(self.cache_path(snapshot_id));
    }

    fn meta(&self, snapshot_id: &str) -> Result<Option<SnapshotMeta>> {
        if !protocol::registry::valid_snapshot_id(snapshot_id) {
            bail!("invalid snapshot id {snapshot_id:?}");
        }
        if let Some(m) = self.metas.lock().ok().and_then(|m| m.get(snapshot_id).cloned()) {
            return Ok(Some(m));
        }
        let (c, b, k) = (self.client.clone(), self.bucket.clone(), self.index_key(snapshot_id));
        let key = k.clone();
        let r = self.rt.block(async move {
            match c.get_object().bucket(b).key(k).send().await {
                Ok(out) => Ok(Some(out.body.collect().await.map(|d| d.into_bytes()))),
                Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => Ok(None),
                Err(e) => Err(e),
            }
        })?;
        let Some(body) = checked_opt("GetObject", &key, r)? else { return Ok(None) };
        let body = body.with_context(|| format!("reading {key}"))?;
        let meta: SnapshotMeta = serde_json::from_slice(&body).with_context(|| format!("parsing {key}"))?;
        super::check_meta(snapshot_id, &meta)?;
        if let Ok(mut m) = self.metas.lock() {
            m.insert(snapshot_id.to_string(), meta.clone());
        }
        Ok(Some(meta))
    }

    fn list(&self) -> Result<Vec<String>> {
        let (c, b) = (self.client.clone(), self.bucket.clone());
        let prefix = self.key("");
        let p = prefix.clone();
        let r = self.rt.block(async move {
            let mut keys = Vec::new();
            let mut pages = c.list_objects_v2().bucket(b).prefix(p).into_paginator().send();
            while let Some(page) = pages.next().await {
                let page = checked("ListObjectsV2", "", page)?;
                keys.extend(page.contents().iter().filter_map(|o| o.key().map(str::to_string)));
            }
            anyhow::Ok(keys)
        })??;
        let mut out: Vec<String> = r
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix)?.strip_suffix(".json"))
            .filter(|id| protocol::registry::valid_snapshot_id(id))
            .map(str::to_string)
            .collect();
        out.sort();
        Ok(out)
    }

    fn remove(&self, snapshot_id: &str) -> Result<()> {
        if !protocol::registry::valid_snapshot_id(snapshot_id) {
            bail!("invalid snapshot id {snapshot_id:?}");
        }
        // The index first: without it the snapshot no longer counts as stored.
        self.delete(self.index_key(snapshot_id))?;
        self.delete(self.data_key(snapshot_id))?;
        self.delete(self.manifest_key(snapshot_id))?;
        let _ = fs::remove_file(self.local.join("manifests").join(snapshot_id));
        if let Ok(mut m) = self.metas.lock() {
            m.remove(snapshot_id);
        }
        let _ = fs::remove_file(self.cache_path(snapshot_id));
        Ok(())
    }
}

fn checked_opt<T, E>(op: &str, key: &str, r: Result<Option<T>, SdkError<E>>) -> Result<Option<T>>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    r.map_err(|e| {
        let rid = e.request_id().unwrap_or("-").to_string();
        match e.code() {
            Some(code) => anyhow!("{op} {key}: {code}: {} (request {rid})", e.message().unwrap_or("")),
            None => anyhow!("{op} {key}: {} (request {rid})", DisplayErrorContext(e)),
        }
    })
}

impl DirectStore for S3Store {
    fn part_size(&self) -> u64 {
        self.part_size
    }

    fn download(&self, snapshot_id: &str) -> Result<Download> {
        let meta =
            self.meta(snapshot_id)?.ok_or_else(|| anyhow!("snapshot {snapshot_id} is not in the store"))?;
        let (len, digest) = self
            .head(snapshot_id)?
            .ok_or_else(|| anyhow!("snapshot {snapshot_id}: its object is missing"))?;
        if hex::encode(digest) != meta.digest || len != meta.wire_bytes {
            bail!("snapshot {snapshot_id}: the object's size or digest metadata differs from its index");
        }
        let (c, b, k, ttl) = (self.client.clone(), self.bucket.clone(), self.data_key(snapshot_id), self.ttl);
        let url = self.rt.block(async move {
            let cfg = PresigningConfig::expires_in(ttl)?;
            let req = c.get_object().bucket(b).key(k).presigned(cfg).await?;
            anyhow::Ok(req.uri().to_string())
        })??;
        Ok(Download { url, wire_bytes: len, digest })
    }

    fn begin(&self, wire_bytes: u64, digest: [u8; 32]) -> Result<Begin> {
        let id = snapshot_id_of(&digest);
        if let Some(meta) = self.meta(&id)? {
            if meta.links_indexed() {
                return Ok(Begin::Exists(meta));
            }
            // An index from before link targets were recorded: the coordinator indexes the
            // stored bytes again (checked against their digest on the way). Nothing an agent
            // uploads ever replaces an object the store holds.
            return self.reindex(&id).map(Begin::Exists);
        }
        let parts = wire_bytes.div_ceil(self.part_size).max(1);
        if parts > MAX_PARTS {
            bail!("{wire_bytes} bytes need more than {MAX_PARTS} parts of {} MiB", self.part_size >> 20);
        }
        let upload_id = self.create_upload(&id, &digest)?;
        let ticket = Ticket { snapshot_id: id.clone(), upload_id, wire_bytes, digest, parts: parts as usize };
        let (c, b, k, u, ttl) = (
            self.client.clone(),
            self.bucket.clone(),
            self.data_key(&id),
            ticket.upload_id.clone(),
            self.ttl,
        );
        let urls = self.rt.block(async move {
            let mut urls = Vec::with_capacity(parts as usize);
            for n in 1..=parts {
                let req = c
                    .upload_part()
                    .bucket(&b)
                    .key(&k)
                    .upload_id(&u)
                    .part_number(n as i32)
                    .presigned(PresigningConfig::expires_in(ttl)?)
                    .await?;
                urls.push(req.uri().to_string());
            }
            anyhow::Ok(urls)
        })?;
        match urls {
            Ok(urls) => Ok(Begin::Upload { ticket, urls }),
            Err(e) => {
                self.abort(&ticket);
                Err(e.context("presigning part URLs"))
            }
        }
    }

    fn finish(&self, t: &Ticket, etags: Vec<String>, files: Vec<IndexEntry>) -> Result<SnapshotMeta> {
        let result = (|| {
            if etags.len() != t.parts {
                bail!("{} parts uploaded, {} expected", etags.len(), t.parts);
            }
            let meta = super::meta_from_index(&t.snapshot_id, t.wire_bytes, &t.digest, files)?;
            self.complete(t, etags)?;
            Ok(meta)
        })();
        let meta = match result {
            Ok(m) => m,
            Err(e) => {
                self.abort(t);
                return Err(e);
            }
        };
        // The object must be as long as announced; its digest is checked by every reader.
        match self.head(&t.snapshot_id)? {
            Some((len, _)) if len == t.wire_bytes => {}
            other => {
                let _ = self.delete(self.data_key(&t.snapshot_id));
                bail!(
                    "snapshot {}: {} bytes announced, the store holds {:?}",
                    t.snapshot_id,
                    t.wire_bytes,
                    other.map(|(l, _)| l)
                );
            }
        }
        self.put_index(&meta)?;
        Ok(meta)
    }

    fn abort(&self, t: &Ticket) {
        let (c, b, k, u) =
            (self.client.clone(), self.bucket.clone(), self.data_key(&t.snapshot_id), t.upload_id.clone());
        let key = k.clone();
        match self
            .rt
            .block(async move { c.abort_multipart_upload().bucket(b).key(k).upload_id(u).send().await })
        {
            Ok(r) => {
                let _ = checked("AbortMultipartUpload", &key, r);
            }
            Err(e) => warn!("aborting the upload of {key}: {e:#}"),
        }
    }
}

impl Objects for S3Store {
    fn get(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let (c, b, k) = (self.client.clone(), self.bucket.clone(), key.to_string());
        let too_long = format!("{key} is longer than {max} bytes");
        let r = self.rt.block(async move {
            match c.get_object().bucket(b).key(k).send().await {
                Ok(out) if out.content_length().unwrap_or(i64::MAX).max(0) as u64 > max => {
                    Ok(Some(Err(anyhow!(too_long))))
                }
                Ok(out) => Ok(Some(
                    out.body.collect().await.map(|d| d.into_bytes().to_vec()).map_err(anyhow::Error::from),
                )),
                Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => Ok(None),
                Err(e) => Err(e),
            }
        })?;
        match checked_opt("GetObject", key, r)? {
            Some(body) => Ok(Some(body.with_context(|| format!("reading {key}"))?)),
            None => Ok(None),
        }
    }

    fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let (c, b, k) = (self.client.clone(), self.bucket.clone(), key.to_string());
        let r = self.rt.block(async move {
            c.put_object().bucket(b).key(k).body(ByteStream::from(bytes)).send().await
        })?;
        checked("PutObject", key, r).map(|_| ())
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, i64)>> {
        let (c, b, p) = (self.client.clone(), self.bucket.clone(), prefix.to_string());
        self.rt.block(async move {
            let mut keys = Vec::new();
            let mut pages = c.list_objects_v2().bucket(b).prefix(p).into_paginator().send();
            while let Some(page) = pages.next().await {
                let page = checked("ListObjectsV2", "", page)?;
                keys.extend(page.contents().iter().filter_map(|o| {
                    Some((o.key()?.to_string(), o.last_modified().map(|t| t.secs()).unwrap_or(0)))
                }));
            }
            anyhow::Ok(keys)
        })?
    }

    fn delete(&self, key: &str) -> Result<()> {
        S3Store::delete(self, key.to_string())
    }
}

/// The store's blobs as a chunk source (for writing outputs out).
struct Blobs<'a>(&'a S3Store);

impl ChunkSource for Blobs<'_> {
    fn has(&self, digest: &Digest) -> bool {
        self.0.packs.as_ref().is_some_and(|p| p.has(digest))
    }

    fn read(&self, c: &Chunk) -> std::io::Result<Vec<u8>> {
        let (enc, payload) = self.0.blob(&c.digest).map_err(std::io::Error::other)?;
        cas::decode_blob(c, enc, &payload).map_err(std::io::Error::other)
    }
}

impl CasStore for S3Store {
    fn manifest(&self, snapshot_id: &str) -> Result<Option<(Vec<u8>, Manifest)>> {
        if !protocol::registry::valid_snapshot_id(snapshot_id) {
            bail!("invalid snapshot id {snapshot_id:?}");
        }
        let local = self.local.join("manifests").join(snapshot_id);
        let addressed = |b: &[u8]| snapshot_id_of(blake3::hash(b).as_bytes()) == snapshot_id;
        let bytes = match fs::read(&local) {
            Ok(b) if addressed(&b) => b,
            _ => {
                let Some(b) = Objects::get(self, &self.manifest_key(snapshot_id), cas::MAX_MANIFEST)? else {
                    return Ok(None);
                };
                if !addressed(&b) {
                    bail!("the manifest of snapshot {snapshot_id} does not match its id");
                }
                let _ = transport::pki::write_file(&local, &b, 0o644);
                b
            }
        };
        let m = Manifest::decode(&bytes, self.limits)
            .with_context(|| format!("manifest of snapshot {snapshot_id}"))?;
        Ok(Some((bytes, m)))
    }

    fn has_blob(&self, digest: &Digest) -> bool {
        self.packs.as_ref().is_some_and(|p| p.has(digest))
    }

    fn blob(&self, digest: &Digest) -> Result<(u8, Vec<u8>)> {
        self.packs()?.blob(self, digest)
    }

    fn put_blob(&self, chunk: &Chunk, encoding: u8, payload: &[u8]) -> Result<u64> {
        self.packs()?.put(self, chunk, encoding, payload)
    }

    fn commit(&self, bytes: &[u8], manifest: &Manifest) -> Result<SnapshotMeta> {
        let packs = self.packs()?;
        // Blobs still in the open pack are sealed first: a committed snapshot's blobs are all
        // in sealed packs.
        packs.seal(self)?;
        if let Some(c) = manifest.chunks().iter().find(|c| packs.locate(&c.digest).is_none()) {
            bail!(
                "the manifest names blob {} which the store does not hold: nothing committed",
                hex::encode(c.digest)
            );
        }
        let digest = *blake3::hash(bytes).as_bytes();
        let id = snapshot_id_of(&digest);
        if let Some(meta) = self.meta(&id)? {
            return Ok(meta);
        }
        let files = manifest.index();
        let meta = SnapshotMeta {
            snapshot_id: id.clone(),
            wire_bytes: packs.stored_bytes(manifest.chunks().iter().map(|c| c.digest)),
            content_bytes: manifest.content_bytes(),
            entries: files.len() as u64,
            digest: hex::encode(digest),
            created_at: super::now_secs(),
            files,
            manifest_digest: None,
        };
        Objects::put(self, &self.manifest_key(&id), bytes.to_vec())?;
        let _ = transport::pki::write_file(&self.local.join("manifests").join(&id), bytes, 0o644);
        // The index is written last: its presence means the snapshot is complete.
        self.put_index(&meta)?;
        Ok(meta)
    }

    fn gc_blobs(&self, min_age: Duration) -> Result<(u64, u64)> {
        let mut referenced = std::collections::HashSet::new();
        for id in SnapshotStore::list(self)? {
            if let Some((_, m)) = self.manifest(&id)? {
                referenced.extend(m.chunks().into_iter().map(|c| c.digest));
            }
        }
        self.packs()?.gc(self, &referenced, min_age.as_secs() as i64)
    }

    fn packs_direct(&self) -> Option<&dyn PackDirect> {
        Some(self)
    }
}

impl PackDirect for S3Store {
    fn places(&self, digests: &[Digest]) -> Result<Vec<(String, Vec<transport::pack::Placed>)>> {
        let packs = self.packs()?;
        if digests.iter().any(|d| packs.locate(d).is_none()) {
            // Blobs of a relayed store still in the open pack.
            packs.seal(self)?;
        }
        let mut by_pack: std::collections::BTreeMap<String, Vec<transport::pack::Placed>> =
            Default::default();
        for d in digests {
            let loc =
                packs.locate(d).ok_or_else(|| anyhow!("blob {} is not in the store", hex::encode(d)))?;
            by_pack.entry(loc.pack).or_default().push(loc.place);
        }
        let mut out = Vec::with_capacity(by_pack.len());
        for (pack, mut places) in by_pack {
            places.sort_by_key(|p| p.offset);
            out.push((self.presign_get(packs.pack_key(&pack))?, places));
        }
        Ok(out)
    }

    fn upload_urls(&self, packs: &[PackIndex]) -> Result<Vec<String>> {
        let p = self.packs()?;
        packs.iter().map(|idx| self.presign_put(p.pack_key(&idx.digest))).collect()
    }

    fn adopt(&self, pack: &PackIndex) -> Result<()> {
        self.packs()?.adopt(self, pack)
    }

    fn has_pack(&self, pack: &str) -> bool {
        self.packs.as_ref().is_some_and(|p| p.has_pack(pack))
    }
}
