//! The coordinator's snapshot store as the agent reaches it: fetch a snapshot into a
//! directory, store a selection of paths as a new snapshot, and look up sizes in the store's
//! index. [`QuicRemote`] opens one stream per request on the current connection.
//!
//! When the coordinator's store is an object store, it answers a fetch with a presigned URL
//! and a store with presigned part URLs: the bytes then go between the agent and the store
//! ([`crate::objects`]), checked against the BLAKE3 digest the store keeps as object metadata.
//! Otherwise they go over the QUIC stream (the relay).
//!
//! When the store keeps manifests and blobs (the coordinator's local store), a fetch asks for
//! the manifest, then only for the blobs neither the agent's cache nor its blob spool holds,
//! and builds the tree from all three; a store sends the manifest, then only the blobs the
//! store lacks. Received blobs are kept in the spool (`<state>/blobs`) until the tree they
//! belong to is committed, so a fetch broken off by a lost connection or a restart resumes
//! from the blobs already here.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use protocol::{RemoteError, SnapshotInfo, SnapshotReply, SnapshotRequest, Trailer, TransferSummary};
use tokio::sync::{mpsc, watch};
use transport::cas::{self, Chunk, ChunkSource, Manifest, PartialTree};
use transport::reuse;
use transport::spool::{Arriving, Spool};
use transport::{blobwire, framed, tree::UnpackLimits};

/// zstd level of the snapshots the agent stores.
const STORE_ZSTD_LEVEL: i32 = 3;
/// zstd level of the blobs the agent sends (kept only when it saves an eighth).
const BLOB_ZSTD_LEVEL: i32 = 1;
/// Digests per `Want` frame.
const DIGESTS_PER_FRAME: usize = 100_000;
/// Blobs in flight between the network task and the blocking thread that reads or keeps them.
const BLOBS_IN_FLIGHT: usize = 16;

/// What a fetch brought: its summary, and the manifest's bytes when the snapshot came as
/// manifest and blobs (the cache keeps them, to offer the tree's chunks to later fetches).
pub struct Fetched {
    pub summary: TransferSummary,
    pub manifest: Option<Vec<u8>>,
}
/// How long a request waits for the agent to be connected.
const CONNECTION_WAIT: Duration = Duration::from_secs(120);

#[async_trait]
pub trait SnapshotRemote: Send + Sync {
    /// Unpacks snapshot `id` into `dest` (committed only when complete and verified), taking
    /// the chunks `held` has from it instead of fetching them.
    async fn fetch(&self, id: &str, dest: &Path, held: Arc<dyn ChunkSource>) -> Result<Fetched>;
    /// Stores `paths` (relative to `root`) as one snapshot.
    async fn store(&self, root: &Path, paths: Vec<PathBuf>) -> Result<SnapshotInfo>;
    /// Sizes of `(snapshot_id, in_snapshot_path)` pairs, from the store's index.
    async fn stat(&self, queries: Vec<(String, String)>) -> Result<Vec<Option<u64>>>;
    /// The coordinator's working registry.
    async fn registry(&self) -> Result<protocol::Registry> {
        bail!("this snapshot remote has no registry")
    }
}

/// Requests over the agent's QUIC connection, whichever connection is current.
pub struct QuicRemote {
    /// The current connection and the coordinator's protocol minor.
    conn: watch::Receiver<Option<(quinn::Connection, u32)>>,
    limits: UnpackLimits,
    /// Where snapshots are packed before a direct upload.
    spool: PathBuf,
    /// Blobs received for trees not committed yet.
    blobs: Arc<Spool>,
}

impl QuicRemote {
    pub fn new(
        conn: watch::Receiver<Option<(quinn::Connection, u32)>>,
        limits: UnpackLimits,
        spool: PathBuf,
        blobs: Arc<Spool>,
    ) -> Self {
        Self { conn, limits, spool, blobs }
    }

    async fn open(&self) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        self.open_with_minor().await.map(|(send, recv, _)| (send, recv))
    }

    /// A snapshot stream, and the protocol minor of the coordinator it goes to.
    async fn open_with_minor(&self) -> Result<(quinn::SendStream, quinn::RecvStream, u32)> {
        let mut rx = self.conn.clone();
        let (conn, minor) = tokio::time::timeout(CONNECTION_WAIT, rx.wait_for(|c| c.is_some()))
            .await
            .map_err(|_| anyhow!("not connected to the coordinator for {CONNECTION_WAIT:?}"))?
            .map_err(|_| anyhow!("agent is shutting down"))?
            .clone()
            .ok_or_else(|| anyhow!("not connected to the coordinator"))?;
        let (send, recv) = conn.open_bi().await.context("opening a snapshot stream")?;
        Ok((send, recv, minor))
    }

    /// The coordinator's working registry, for an instance whose user-data had no room for it.
    pub async fn fetch_registry(&self) -> Result<protocol::Registry> {
        let (mut send, mut recv) = self.open().await?;
        framed::write_frame(&mut send, &SnapshotRequest::Registry).await?;
        send.finish()?;
        match framed::read_frame::<SnapshotReply, _>(&mut recv).await? {
            Some(SnapshotReply::Registry { json }) => {
                protocol::Registry::parse(&json).map_err(|e| anyhow!("registry from the coordinator: {e}"))
            }
            Some(SnapshotReply::Error(e)) => Err(refused(e)).context("fetching the registry"),
            other => bail!("unexpected answer to a registry fetch: {other:?}"),
        }
    }
    /// A snapshot as one archive (an object store's, or relayed).
    async fn fetch_archive(&self, id: &str, dest: &Path) -> Result<TransferSummary> {
        let (mut send, mut recv) = self.open().await?;
        framed::write_frame(&mut send, &SnapshotRequest::FetchDirect { snapshot_id: id.to_string() }).await?;
        let reply = framed::read_frame::<SnapshotReply, _>(&mut recv).await;
        if !matches!(reply, Ok(Some(SnapshotReply::Data(_)))) {
            let _ = send.finish();
        }
        match reply? {
            Some(SnapshotReply::Data(header)) => {
                let got =
                    transport::recv_tree(&mut recv, dest.to_path_buf(), header.compression, self.limits)
                        .await;
                // The coordinator learns why a relayed snapshot was refused.
                if let Err(e) = &got {
                    let why = RemoteError { code: e.code(), message: e.to_string() };
                    let _ = framed::write_frame(&mut send, &SnapshotRequest::Refused(why)).await;
                }
                let _ = send.finish();
                got.with_context(|| format!("receiving snapshot {id}"))
            }
            Some(SnapshotReply::Download { url, wire_bytes, digest }) => {
                let (dest, limits) = (dest.to_path_buf(), self.limits);
                let expected = Trailer { bytes: wire_bytes, digest };
                tokio::task::spawn_blocking(move || {
                    crate::objects::download_tree(&url, expected, &dest, limits)
                })
                .await?
                .with_context(|| format!("downloading snapshot {id} from the object store"))
            }
            Some(SnapshotReply::Error(e)) => {
                Err(refused(e)).with_context(|| format!("fetching snapshot {id}"))
            }
            other => bail!("unexpected answer to a snapshot fetch: {other:?}"),
        }
    }

    /// A snapshot as manifest and blobs; `None` when the store keeps archives.
    async fn fetch_cas(&self, id: &str, dest: &Path, held: Arc<dyn ChunkSource>) -> Result<Option<Fetched>> {
        let started = Instant::now();
        let (mut send, mut recv, minor) = self.open_with_minor().await?;
        framed::write_frame(&mut send, &SnapshotRequest::Manifest { snapshot_id: id.to_string() }).await?;
        let len = match framed::read_frame::<SnapshotReply, _>(&mut recv).await? {
            Some(SnapshotReply::ManifestFollows { bytes }) => bytes,
            Some(SnapshotReply::Archive) => return Ok(None),
            Some(SnapshotReply::Error(e)) => {
                return Err(refused(e)).with_context(|| format!("fetching snapshot {id}"));
            }
            other => bail!("unexpected answer to a manifest fetch: {other:?}"),
        };
        let bytes = blobwire::read_bytes(&mut recv, len, cas::MAX_MANIFEST).await?;
        // What earlier fetches of this snapshot that broke off had written, and where this
        // one stages its tree (left in place if it breaks off too).
        let (olds, staging) = partials(&self.blobs.dir().with_file_name("partial"), id)?;
        let (limits, spool, h) = (self.limits, self.blobs.clone(), held.clone());
        type Parsed = (Manifest, Vec<Chunk>, reuse::Plan, Vec<PartialTree>);
        let from = olds.clone();
        let parsed = tokio::task::spawn_blocking(move || -> Result<Parsed> {
            let m = Manifest::decode(&bytes, limits)?;
            let trees: Vec<PartialTree> =
                from.iter().map(|d| PartialTree::new(d, &m)).filter(|t| !t.is_empty()).collect();
            let mut all: Vec<&dyn ChunkSource> = vec![h.as_ref()];
            all.extend(trees.iter().map(|t| t as &dyn ChunkSource));
            let all = cas::Sources(all);
            // Files held whole are checked now: a damaged copy's chunks are fetched.
            let plan = reuse::plan(&m, &all);
            let held = |c: &Chunk| all.has(&c.digest) && !plan.damaged.contains(&c.digest);
            let wanted = m.chunks().into_iter().filter(|c| !held(c) && !spool.has(&c.digest)).collect();
            Ok((m, wanted, plan, trees))
        })
        .await?;
        let (manifest, wanted, plan, trees) = match parsed {
            Ok(v) => v,
            Err(e) => {
                let why =
                    RemoteError { code: protocol::ErrorCode::RefusedArchive, message: format!("{e:#}") };
                let _ = framed::write_frame(&mut send, &SnapshotRequest::Refused(why)).await;
                let _ = send.finish();
                return Err(e).with_context(|| format!("manifest of snapshot {id}"));
            }
        };
        // From an object store's packs, at URLs the coordinator hands out (minor 6), or
        // relayed on this stream.
        let mut relayed = wanted.clone();
        let mut direct_bytes = 0u64;
        if minor >= 6 && !wanted.is_empty() {
            let mut places = Vec::new();
            for batch in wanted.chunks(DIGESTS_PER_FRAME) {
                let digests = batch.iter().map(|c| c.digest).collect();
                framed::write_frame(&mut send, &SnapshotRequest::WantPlaces { digests }).await?;
                match framed::read_frame::<SnapshotReply, _>(&mut recv).await? {
                    Some(SnapshotReply::Places { packs }) => places.extend(packs),
                    Some(SnapshotReply::Relay) => break,
                    other => bail!("unexpected answer to WantPlaces: {other:?}"),
                }
            }
            if !places.is_empty() {
                let asked: HashMap<[u8; 32], u64> = wanted.iter().map(|c| (c.digest, c.len)).collect();
                let spool = self.blobs.clone();
                let got = tokio::task::spawn_blocking(move || {
                    crate::objects::fetch_places(&places, &asked, &spool)
                })
                .await?;
                let (bytes, fetched) = match got {
                    Ok(v) => v,
                    Err(e) => {
                        let why = RemoteError {
                            code: protocol::ErrorCode::RefusedArchive,
                            message: format!("{e:#}"),
                        };
                        let _ = framed::write_frame(&mut send, &SnapshotRequest::Refused(why)).await;
                        let _ = send.finish();
                        return Err(e).with_context(|| format!("reading the packs of snapshot {id}"));
                    }
                };
                direct_bytes = bytes;
                relayed.retain(|c| !fetched.contains(&c.digest));
            }
        }
        for batch in relayed.chunks(DIGESTS_PER_FRAME) {
            let digests = batch.iter().map(|c| c.digest).collect();
            framed::write_frame(&mut send, &SnapshotRequest::Want { digests }).await?;
        }
        framed::write_frame(&mut send, &SnapshotRequest::Want { digests: Vec::new() }).await?;
        // The tree is built from the cache's trees and the spool while the relayed blobs
        // arrive: a read of one still on its way waits for it.
        let given_up = Arc::new(AtomicBool::new(false));
        let (dest_buf, spool, limits) = (dest.to_path_buf(), self.blobs.clone(), self.limits);
        let coming: HashSet<[u8; 32]> = relayed.iter().map(|c| c.digest).collect();
        // Files held whole are linked or copied in after the rest is unpacked around them.
        let (m, stop) = (manifest, given_up.clone());
        let build = tokio::task::spawn_blocking(move || {
            let arriving = Arriving { spool: &spool, coming, given_up: &stop };
            let mut all: Vec<&dyn ChunkSource> = vec![held.as_ref()];
            all.extend(trees.iter().map(|t| t as &dyn ChunkSource));
            all.push(&arriving);
            let sources = cas::Sources(all);
            let skeleton = reuse::placeholders(&m, &plan);
            let mut stats = cas::with_tar(&skeleton, &sources, |r| {
                transport::tree::unpack_into_at(r, &dest_buf, &staging, limits)
            })?;
            // Files a fetch that broke off had written in part get the rest of their chunks.
            let mut plan = plan;
            let appended = reuse::complete(&m, &mut plan, &sources)?;
            if appended > 0 {
                tracing::debug!(bytes = appended, "files written in part by an earlier fetch completed");
            }
            let placed = reuse::place(&dest_buf, &m, plan)?;
            if placed != reuse::Placed::default() {
                tracing::debug!(
                    linked = placed.linked,
                    cloned = placed.cloned,
                    copied = placed.copied,
                    bytes = placed.bytes,
                    "files held under other snapshots reused"
                );
            }
            stats.content_bytes += placed.bytes;
            Ok::<_, transport::tree::TreeError>((stats, m))
        });
        let received = receive_blobs(&mut recv, &relayed, self.blobs.clone()).await;
        if received.is_err() {
            given_up.store(true, Ordering::Release);
            self.blobs.wake();
        }
        let built = build.await?;
        let wire =
            len + direct_bytes + received.with_context(|| format!("receiving the blobs of snapshot {id}"))?;
        let (stats, manifest) = match built {
            Ok(v) => v,
            Err(e) => {
                if matches!(e, transport::TreeError::Mismatch(_)) {
                    // Something held here did not match its digest: the next fetch starts from
                    // what the cache and the spool hold, not from these partial trees.
                    for d in &olds {
                        let _ = std::fs::remove_dir_all(d);
                    }
                }
                let why = RemoteError { code: protocol::ErrorCode::RefusedArchive, message: e.to_string() };
                let _ = framed::write_frame(&mut send, &SnapshotRequest::Refused(why)).await;
                let _ = send.finish();
                return Err(e).with_context(|| format!("building snapshot {id}"));
            }
        };
        let _ = send.finish();
        // The tree holds them now: the spool's copies go (before the fetch counts as done, so
        // the spool holds only blobs of fetches under way or broken off).
        // Every blob of the tree, spooled by this fetch or one that broke off. The manifest is
        // encoded for the cache there too (a large one takes long enough to hold up heartbeats).
        let spool = self.blobs.clone();
        let bytes = tokio::task::spawn_blocking(move || {
            spool.forget(manifest.chunks().into_iter().map(|c| c.digest));
            for d in olds {
                let _ = std::fs::remove_dir_all(d);
            }
            manifest.encode().0
        })
        .await?;
        drop(wanted);
        Ok(Some(Fetched {
            summary: TransferSummary {
                wire_bytes: wire,
                content_bytes: stats.content_bytes,
                entries: stats.entries,
                elapsed_ms: started.elapsed().as_millis() as u64,
            },
            manifest: Some(bytes),
        }))
    }

    /// Stores `paths` as manifest and blobs; `None` when the store keeps archives.
    async fn store_cas(&self, root: &Path, paths: &[PathBuf]) -> Result<Option<SnapshotInfo>> {
        // Walking, hashing, encoding and indexing a tree of many files takes long enough to
        // hold up heartbeats: all of it happens on a blocking thread.
        let (r, p, limits) = (root.to_path_buf(), paths.to_vec(), self.limits);
        let (bytes, source) = tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, cas::TreeSource)> {
            let manifest =
                cas::build(&r, &p, limits, |_, _| Ok(())).context("refusing to store the outputs")?.0;
            let (bytes, _) = manifest.encode();
            Ok((bytes, cas::TreeSource::new(r, &manifest)))
        })
        .await??;
        let (mut send, mut recv, minor) = self.open_with_minor().await?;
        let len = bytes.len() as u64;
        let ask = if minor >= 6 {
            SnapshotRequest::StoreManifestDirect { bytes: len }
        } else {
            SnapshotRequest::StoreManifest { bytes: len }
        };
        framed::write_frame(&mut send, &ask).await?;
        send.write_all(&bytes).await?;
        let mut packs = false;
        if minor >= 6 {
            match framed::read_frame::<SnapshotReply, _>(&mut recv).await? {
                Some(SnapshotReply::Direct { .. }) => packs = true,
                Some(SnapshotReply::Relay) => {}
                Some(SnapshotReply::Archive) => return Ok(None),
                other => return stored(other).map(Some),
            }
        }
        let mut missing = Vec::new();
        loop {
            match framed::read_frame::<SnapshotReply, _>(&mut recv).await? {
                Some(SnapshotReply::Missing { digests, done }) => {
                    missing.extend(digests);
                    if done {
                        break;
                    }
                }
                Some(SnapshotReply::Archive) => return Ok(None),
                other => return stored(other).map(Some),
            }
        }
        let mut chunks = Vec::with_capacity(missing.len());
        for d in missing {
            let Some(c) = source.chunk(&d) else {
                bail!("the coordinator asked for blob {} which the outputs do not hold", hex::encode(d));
            };
            chunks.push(c);
        }
        if packs {
            return self.store_packs(source, chunks, &mut send, &mut recv).await.map(Some);
        }
        // Read, verified and encoded on a blocking thread; sent here.
        let (tx, mut rx) = mpsc::channel::<Result<(Chunk, u8, Vec<u8>)>>(BLOBS_IN_FLIGHT);
        let reader = tokio::task::spawn_blocking(move || {
            for c in chunks {
                let got = source.read(&c).map_err(anyhow::Error::from).and_then(|data| {
                    cas::check_blob(&c, &data).map_err(|_| {
                        anyhow!(
                            "an output changed while it was being stored (blob {})",
                            hex::encode(c.digest)
                        )
                    })?;
                    Ok(cas::encode_blob(&data, BLOB_ZSTD_LEVEL))
                });
                let stop = got.is_err();
                if tx.blocking_send(got.map(|(e, p)| (c, e, p))).is_err() || stop {
                    return;
                }
            }
        });
        let sent = async {
            while let Some(item) = rx.recv().await {
                let (c, enc, payload) = item?;
                blobwire::write_blob(&mut send, &c, enc, &payload).await?;
            }
            blobwire::write_end(&mut send).await?;
            anyhow::Ok(())
        }
        .await;
        drop(rx);
        let _ = reader.await;
        if sent.is_ok() {
            let _ = send.finish();
        }
        let reply = framed::read_frame::<SnapshotReply, _>(&mut recv).await;
        sent.context("sending outputs to the coordinator")?;
        stored(reply.context("reading the store reply")?).map(Some)
    }
}

impl QuicRemote {
    /// The direct half of a store: packs the missing blobs in the spool, names the packs,
    /// uploads each at the URL the coordinator hands out, and waits for the verdict.
    async fn store_packs(
        &self,
        source: cas::TreeSource,
        chunks: Vec<Chunk>,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<SnapshotInfo> {
        let spool = self.spool.clone();
        let built = tokio::task::spawn_blocking(move || {
            crate::objects::build_packs(&source, chunks, &spool, BLOB_ZSTD_LEVEL)
        })
        .await?
        .context("packing the outputs")?;
        let built: Vec<(Spooled, protocol::PackPlan)> =
            built.into_iter().map(|(path, plan)| (Spooled(path), plan)).collect();
        let plans = built.iter().map(|(_, plan)| plan.clone()).collect();
        framed::write_frame(send, &SnapshotRequest::PutPacks { packs: plans }).await?;
        let urls = match framed::read_frame::<SnapshotReply, _>(recv).await? {
            Some(SnapshotReply::Upload { urls }) => urls,
            other => return stored(other),
        };
        let files: Vec<PathBuf> = built.iter().map(|(f, _)| f.0.clone()).collect();
        let uploaded = tokio::task::spawn_blocking(move || crate::objects::put_files(&files, &urls)).await?;
        drop(built);
        uploaded.context("uploading packs to the object store")?;
        framed::write_frame(send, &SnapshotRequest::PacksPut).await?;
        let _ = send.finish();
        stored(framed::read_frame::<SnapshotReply, _>(recv).await.context("reading the store reply")?)
    }
}

/// A packed snapshot in the spool, removed when dropped.
struct Spooled(PathBuf);

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn stored(reply: Option<SnapshotReply>) -> Result<SnapshotInfo> {
    match reply {
        Some(SnapshotReply::Stored(info)) => Ok(info),
        Some(SnapshotReply::Error(e)) => Err(refused(e)).context("storing a snapshot"),
        other => bail!("unexpected answer to a snapshot store: {other:?}"),
    }
}

fn refused(e: protocol::RemoteError) -> anyhow::Error {
    anyhow!("coordinator: {}", e.message)
}

#[async_trait]
impl SnapshotRemote for QuicRemote {
    async fn registry(&self) -> Result<protocol::Registry> {
        self.fetch_registry().await
    }

    async fn fetch(&self, id: &str, dest: &Path, held: Arc<dyn ChunkSource>) -> Result<Fetched> {
        if let Some(done) = self.fetch_cas(id, dest, held).await? {
            return Ok(done);
        }
        let summary = self.fetch_archive(id, dest).await?;
        Ok(Fetched { summary, manifest: None })
    }

    async fn store(&self, root: &Path, paths: Vec<PathBuf>) -> Result<SnapshotInfo> {
        let started = std::time::Instant::now();
        let info = self.store_any(root, paths).await?;
        let secs = started.elapsed().as_secs_f64();
        crate::metrics::get().transfer(&crate::metrics::STORED, info.content_bytes, secs);
        Ok(info)
    }

    async fn stat(&self, queries: Vec<(String, String)>) -> Result<Vec<Option<u64>>> {
        self.stat_any(queries).await
    }
}

impl QuicRemote {
    async fn store_any(&self, root: &Path, paths: Vec<PathBuf>) -> Result<SnapshotInfo> {
        // What the packer would refuse is refused here, before a transfer begins: the
        // coordinator never sees a stream broken off half way.
        let (r, p) = (root.to_path_buf(), paths.clone());
        tokio::task::spawn_blocking(move || transport::tree::check_paths_packable(&r, &p))
            .await?
            .context("refusing to store the outputs")?;
        if let Some(info) = self.store_cas(root, &paths).await? {
            return Ok(info);
        }
        let (mut send, mut recv) = self.open().await?;
        framed::write_frame(&mut send, &SnapshotRequest::StoreBegin).await?;
        let part_size = match framed::read_frame::<SnapshotReply, _>(&mut recv).await? {
            Some(SnapshotReply::Relay) => None,
            Some(SnapshotReply::Direct { part_size }) if part_size > 0 => Some(part_size),
            Some(SnapshotReply::Error(e)) => return Err(refused(e)).context("storing a snapshot"),
            other => bail!("unexpected answer to a snapshot store: {other:?}"),
        };
        let Some(part_size) = part_size else {
            let sent =
                transport::bulk::send_paths(&mut send, root.to_path_buf(), paths, STORE_ZSTD_LEVEL).await;
            if sent.is_ok() {
                let _ = send.finish();
            }
            let reply = framed::read_frame::<SnapshotReply, _>(&mut recv).await;
            sent.context("sending outputs to the coordinator")?;
            return stored(reply.context("reading the store reply")?);
        };
        // Pack to a spool file first: the object's digest is its metadata, set when the upload
        // starts, and the part count follows from the size.
        let packed = Spooled(self.spool.join(format!("{:016x}.tar.zst", rand::random::<u64>())));
        let (file, root, limits) = (packed.0.clone(), root.to_path_buf(), self.limits);
        let (trailer, index_json, entries) =
            tokio::task::spawn_blocking(move || -> Result<(Trailer, Vec<u8>, usize)> {
                let (trailer, _) = transport::archive::write(&root, &paths, &file, STORE_ZSTD_LEVEL)
                    .context("packing outputs")?;
                let (files, _) = transport::archive::index(&file, limits).context("indexing outputs")?;
                Ok((trailer, serde_json::to_vec(&files)?, files.len()))
            })
            .await??;
        // The index goes in one frame after the parts: refuse now what the coordinator would
        // refuse then, before a byte is uploaded.
        let parts = usize::try_from(trailer.bytes.div_ceil(part_size).max(1)).unwrap_or(usize::MAX);
        let frame = protocol::codec::store_parts_len(parts, index_json.len());
        let max = <SnapshotRequest as protocol::codec::Frame>::MAX_LEN;
        if frame > max {
            bail!(
                "the outputs' file index is {} bytes ({} entries) and with the ETags of {parts} parts makes a \
                 {frame}-byte frame, over the {max}-byte limit of a direct upload: nothing was uploaded \
                 (store fewer files per output, e.g. as one archive)",
                index_json.len(),
                entries
            );
        }
        let object = SnapshotRequest::StoreObject { wire_bytes: trailer.bytes, digest: trailer.digest };
        framed::write_frame(&mut send, &object).await?;
        let urls = match framed::read_frame::<SnapshotReply, _>(&mut recv).await? {
            Some(SnapshotReply::Upload { urls }) => urls,
            other => return stored(other),
        };
        let file = packed.0.clone();
        let etags =
            tokio::task::spawn_blocking(move || crate::objects::upload_parts(&file, part_size, &urls))
                .await?
                .context("uploading outputs to the object store")?;
        if let Some(long) = etags.iter().find(|e| e.len() > protocol::codec::MAX_ETAG_LEN) {
            bail!(
                "the object store answered a part with an ETag of {} bytes, over {}",
                long.len(),
                protocol::codec::MAX_ETAG_LEN
            );
        }
        framed::write_frame(&mut send, &SnapshotRequest::StoreParts { etags, index_json }).await?;
        send.finish()?;
        stored(framed::read_frame::<SnapshotReply, _>(&mut recv).await?)
    }

    async fn stat_any(&self, queries: Vec<(String, String)>) -> Result<Vec<Option<u64>>> {
        let n = queries.len();
        let (mut send, mut recv) = self.open().await?;
        framed::write_frame(&mut send, &SnapshotRequest::Stat { queries }).await?;
        send.finish()?;
        match framed::read_frame::<SnapshotReply, _>(&mut recv).await? {
            Some(SnapshotReply::Sizes(s)) if s.len() == n => Ok(s),
            Some(SnapshotReply::Error(e)) => {
                Err(refused(e)).context("looking up outputs in the snapshot index")
            }
            other => bail!("unexpected answer to a snapshot lookup: {other:?}"),
        }
    }
}

/// Removes the partial trees under `root` untouched for `max_age` (fetches that never
/// resumed).
pub fn sweep_partials(root: &Path, max_age: Duration) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for e in entries.flatten() {
        let stale =
            e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().unwrap_or_default() > max_age);
        if stale {
            tracing::info!(path = %e.path().display(), "removing the partial tree of a fetch that never resumed");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Partial trees of earlier fetches of `id` under `root` (the newest four; older ones go) and
/// a fresh staging path for this one.
fn partials(root: &Path, id: &str) -> Result<(Vec<PathBuf>, PathBuf)> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(root)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix(id).and_then(|r| r.strip_prefix('.')).and_then(|n| n.parse().ok())
        {
            found.push((n, e.path()));
        }
    }
    found.sort();
    let next = found.last().map_or(0, |(n, _)| n + 1);
    let keep = found.len().saturating_sub(4);
    for (_, old) in found.drain(..keep) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok((found.into_iter().map(|(_, p)| p).collect(), root.join(format!("{id}.{next}"))))
}

/// Reads blob records until the end record, verifying and keeping each in `spool` on a
/// blocking thread; every one of `wanted` must come, and nothing else. Returns the bytes read.
async fn receive_blobs(recv: &mut quinn::RecvStream, wanted: &[Chunk], spool: Arc<Spool>) -> Result<u64> {
    let mut expected: std::collections::HashMap<[u8; 32], u64> =
        wanted.iter().map(|c| (c.digest, c.len)).collect();
    let (tx, mut rx) = mpsc::channel::<blobwire::Received>(BLOBS_IN_FLIGHT);
    let keeper = tokio::task::spawn_blocking(move || -> Result<()> {
        while let Some(r) = rx.blocking_recv() {
            spool.put(&r.chunk, r.encoding, &r.payload)?;
        }
        Ok(())
    });
    let mut wire = 0u64;
    let received = async {
        while let Some(r) = blobwire::read_blob(recv).await? {
            match expected.remove(&r.chunk.digest) {
                Some(len) if len == r.chunk.len => {}
                _ => {
                    bail!("the coordinator sent blob {} which was not asked for", hex::encode(r.chunk.digest))
                }
            }
            wire += (protocol::BLOB_HEADER_LEN + r.payload.len()) as u64;
            if tx.send(r).await.is_err() {
                break;
            }
        }
        anyhow::Ok(())
    }
    .await;
    drop(tx);
    keeper.await??;
    received?;
    if let Some(d) = expected.keys().next() {
        bail!("blob {} never came ({} missing)", hex::encode(d), expected.len());
    }
    Ok(wire)
}
