//! The coordinator's snapshot store as the agent reaches it: fetch a snapshot into a
//! directory, store a selection of paths as a new snapshot, and look up sizes in the store's
//! index. [`QuicRemote`] opens one stream per request on the current connection.
//!
//! When the coordinator's store is an object store, it answers a fetch with a presigned URL
//! and a store with presigned part URLs: the bytes then go between the agent and the store
//! ([`crate::objects`]), checked against the BLAKE3 digest the store keeps as object metadata.
//! Otherwise they go over the QUIC stream (the relay).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use protocol::{RemoteError, SnapshotInfo, SnapshotReply, SnapshotRequest, Trailer, TransferSummary};
use tokio::sync::watch;
use transport::{framed, tree::UnpackLimits};

/// zstd level of the snapshots the agent stores.
const STORE_ZSTD_LEVEL: i32 = 3;
/// How long a request waits for the agent to be connected.
const CONNECTION_WAIT: Duration = Duration::from_secs(120);

#[async_trait]
pub trait SnapshotRemote: Send + Sync {
    /// Unpacks snapshot `id` into `dest` (committed only when complete and verified).
    async fn fetch(&self, id: &str, dest: &Path) -> Result<TransferSummary>;
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
    conn: watch::Receiver<Option<quinn::Connection>>,
    limits: UnpackLimits,
    /// Where snapshots are packed before a direct upload.
    spool: PathBuf,
}

impl QuicRemote {
    pub fn new(
        conn: watch::Receiver<Option<quinn::Connection>>,
        limits: UnpackLimits,
        spool: PathBuf,
    ) -> Self {
        Self { conn, limits, spool }
    }

    async fn open(&self) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        let mut rx = self.conn.clone();
        let conn = tokio::time::timeout(CONNECTION_WAIT, rx.wait_for(|c| c.is_some()))
            .await
            .map_err(|_| anyhow!("not connected to the coordinator for {CONNECTION_WAIT:?}"))?
            .map_err(|_| anyhow!("agent is shutting down"))?
            .clone()
            .ok_or_else(|| anyhow!("not connected to the coordinator"))?;
        conn.open_bi().await.context("opening a snapshot stream")
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

    async fn fetch(&self, id: &str, dest: &Path) -> Result<TransferSummary> {
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

    async fn store(&self, root: &Path, paths: Vec<PathBuf>) -> Result<SnapshotInfo> {
        // What the packer would refuse is refused here, before a transfer begins: the
        // coordinator never sees a stream broken off half way.
        let (r, p) = (root.to_path_buf(), paths.clone());
        tokio::task::spawn_blocking(move || transport::tree::check_paths_packable(&r, &p))
            .await?
            .context("refusing to store the outputs")?;
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

    async fn stat(&self, queries: Vec<(String, String)>) -> Result<Vec<Option<u64>>> {
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
