//! Content-addressed transfers on a snapshot stream: a fetch sends the manifest and then only
//! the blobs the agent asks for; a store takes the manifest, answers the blobs the store
//! lacks, and commits once every blob of the manifest is present and verified. Blobs are read,
//! verified and written on blocking threads; the network task only moves bytes.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use protocol::{ErrorCode, RemoteError, SnapshotReply, SnapshotRequest};
use tokio::sync::mpsc;
use tracing::{info, warn};
use transport::blobwire;
use transport::cas::{self, Chunk, Digest, Manifest};
use transport::framed;

use crate::hub::Hub;
use crate::store::{CasStore, SnapshotStore};

/// Digests per `Missing` frame (32 bytes each: well under a frame's limit).
const DIGESTS_PER_FRAME: usize = 100_000;
/// Blobs read ahead of the network, or received ahead of their verification.
const BLOBS_IN_FLIGHT: usize = 16;

fn reply_err(code: ErrorCode, message: String) -> SnapshotReply {
    SnapshotReply::Error(RemoteError { code, message })
}

fn cas_of(store: &Arc<dyn SnapshotStore>) -> Option<&dyn CasStore> {
    store.cas()
}

/// `Manifest { snapshot_id }`: the manifest, then the blobs the agent wants.
pub(super) async fn fetch(
    coord: &Hub,
    agent: &str,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    snapshot_id: String,
) -> Result<()> {
    let store = coord.store().clone();
    if cas_of(&store).is_none() {
        framed::write_frame(send, &SnapshotReply::Archive).await?;
        send.finish()?;
        return Ok(());
    }
    let started = Instant::now();
    let (s, id) = (store.clone(), snapshot_id.clone());
    let found = tokio::task::spawn_blocking(move || s.cas().map(|c| c.manifest(&id)).transpose()).await?;
    let (bytes, manifest) = match found {
        Ok(Some(Some(m))) => m,
        Ok(_) if store.open(&snapshot_id).is_ok() => {
            // Kept as an archive the store could not convert: the agent fetches it whole.
            framed::write_frame(send, &SnapshotReply::Archive).await?;
            send.finish()?;
            return Ok(());
        }
        Ok(_) => {
            let msg = format!("snapshot {snapshot_id} is not in the store");
            framed::write_frame(send, &reply_err(ErrorCode::NotFound, msg)).await?;
            send.finish()?;
            return Ok(());
        }
        Err(e) => {
            framed::write_frame(send, &reply_err(ErrorCode::Internal, format!("{e:#}"))).await?;
            send.finish()?;
            return Ok(());
        }
    };
    framed::write_frame(send, &SnapshotReply::ManifestFollows { bytes: bytes.len() as u64 }).await?;
    send.write_all(&bytes).await?;
    let known: std::collections::HashMap<Digest, u64> =
        manifest.chunks().iter().map(|c| (c.digest, c.len)).collect();
    let mut wire = bytes.len() as u64;
    loop {
        let digests = match framed::read_frame::<SnapshotRequest, _>(recv).await? {
            Some(SnapshotRequest::Want { digests }) if digests.is_empty() => break,
            Some(SnapshotRequest::Want { digests }) => digests,
            Some(SnapshotRequest::Refused(e)) => {
                tracing::warn!(agent, snapshot = %snapshot_id, "agent {agent} refused snapshot {snapshot_id}: {}", e.message);
                return Ok(());
            }
            other => bail!("expected Want, got {other:?}"),
        };
        let mut chunks = Vec::with_capacity(digests.len());
        for d in digests {
            let Some(len) = known.get(&d) else {
                bail!(
                    "agent {agent} asked for blob {} which snapshot {snapshot_id} does not hold",
                    hex::encode(d)
                );
            };
            chunks.push(Chunk { digest: d, len: *len });
        }
        wire += send_blobs(&store, chunks, send).await?;
    }
    blobwire::write_end(send).await?;
    let _ = send.finish();
    // The agent's verdict (a refusal) or the end of its side.
    if let Ok(Some(SnapshotRequest::Refused(e))) = framed::read_frame::<SnapshotRequest, _>(recv).await {
        tracing::warn!(agent, snapshot = %snapshot_id, "agent {agent} refused snapshot {snapshot_id}: {}", e.message);
        return Ok(());
    }
    let elapsed = started.elapsed().as_millis() as u64;
    log_snapshot_transfer(coord, agent, "fetch", &snapshot_id, manifest.content_bytes(), wire, elapsed);
    Ok(())
}

/// Reads `digests` from the store on a blocking thread and writes them as blob records.
/// Returns the bytes written.
async fn send_blobs(
    store: &Arc<dyn SnapshotStore>,
    chunks: Vec<Chunk>,
    send: &mut quinn::SendStream,
) -> Result<u64> {
    let (tx, mut rx) = mpsc::channel::<Result<(Chunk, u8, Vec<u8>)>>(BLOBS_IN_FLIGHT);
    let s = store.clone();
    let reader = tokio::task::spawn_blocking(move || {
        for c in chunks {
            let got = s.cas().ok_or_else(|| anyhow!("no blob store")).and_then(|cas| cas.blob(&c.digest));
            let stop = got.is_err();
            if tx.blocking_send(got.map(|(e, p)| (c, e, p))).is_err() || stop {
                return;
            }
        }
    });
    let mut bytes = 0u64;
    while let Some(item) = rx.recv().await {
        // Sent as stored: the agent verifies each blob against its digest.
        let (c, enc, payload) = item?;
        blobwire::write_blob(send, &c, enc, &payload).await?;
        bytes += (protocol::BLOB_HEADER_LEN + payload.len()) as u64;
    }
    reader.await?;
    Ok(bytes)
}

/// `StoreManifest { bytes }`: the manifest, the blobs the store lacks, the commit.
pub(super) async fn store(
    coord: &Hub,
    agent: &str,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    manifest_len: u64,
) -> Result<()> {
    let started = Instant::now();
    let store = coord.store().clone();
    let raw = blobwire::read_bytes(recv, manifest_len, cas::MAX_MANIFEST).await;
    if cas_of(&store).is_none() {
        framed::write_frame(send, &SnapshotReply::Archive).await?;
        send.finish()?;
        return Ok(());
    }
    let reply = match receive(coord, &store, send, recv, raw.map_err(anyhow::Error::from)).await {
        Ok((meta, wire)) => {
            let elapsed = started.elapsed().as_millis() as u64;
            log_snapshot_transfer(
                coord,
                agent,
                "store",
                &meta.snapshot_id,
                meta.content_bytes,
                wire,
                elapsed,
            );
            SnapshotReply::Stored(protocol::SnapshotInfo { wire_bytes: wire, ..meta.info() })
        }
        Err(e) => {
            tracing::warn!(agent, "refused a snapshot from agent {agent}: {e:#}");
            reply_err(ErrorCode::RefusedArchive, format!("{e:#}"))
        }
    };
    framed::write_frame(send, &reply).await?;
    send.finish()?;
    Ok(())
}

async fn receive(
    coord: &Hub,
    store: &Arc<dyn SnapshotStore>,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    raw: Result<Vec<u8>>,
) -> Result<(crate::store::SnapshotMeta, u64)> {
    let bytes = raw.context("reading the manifest")?;
    let mut wire = bytes.len() as u64;
    let limits = coord.config().unpack_limits;
    let s = store.clone();
    let (bytes, manifest, missing) =
        tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, Manifest, Vec<Chunk>)> {
            let m = Manifest::decode(&bytes, limits).map_err(|e| anyhow!("the manifest is refused: {e}"))?;
            let cas = s.cas().ok_or_else(|| anyhow!("no blob store"))?;
            let missing = m.chunks().into_iter().filter(|c| !cas.has_blob(&c.digest)).collect();
            Ok((bytes, m, missing))
        })
        .await??;
    let mut batches = missing.chunks(DIGESTS_PER_FRAME).peekable();
    if batches.peek().is_none() {
        framed::write_frame(send, &SnapshotReply::Missing { digests: Vec::new(), done: true }).await?;
    }
    while let Some(b) = batches.next() {
        let digests = b.iter().map(|c| c.digest).collect();
        framed::write_frame(send, &SnapshotReply::Missing { digests, done: batches.peek().is_none() })
            .await?;
    }
    // Received blobs go to a blocking thread that verifies and keeps them, in order.
    let mut expected: std::collections::HashMap<Digest, u64> =
        missing.iter().map(|c| (c.digest, c.len)).collect();
    let (tx, mut rx) = mpsc::channel::<blobwire::Received>(BLOBS_IN_FLIGHT);
    let s = store.clone();
    let keeper = tokio::task::spawn_blocking(move || -> Result<()> {
        let cas = s.cas().ok_or_else(|| anyhow!("no blob store"))?;
        while let Some(r) = rx.blocking_recv() {
            cas.put_blob(&r.chunk, r.encoding, &r.payload)?;
        }
        Ok(())
    });
    let received = async {
        while let Some(r) = blobwire::read_blob(recv).await? {
            match expected.remove(&r.chunk.digest) {
                Some(len) if len == r.chunk.len => {}
                Some(len) => bail!(
                    "blob {} is {} bytes on the wire, {len} in the manifest",
                    hex::encode(r.chunk.digest),
                    r.chunk.len
                ),
                None => bail!("blob {} was not asked for (or sent twice)", hex::encode(r.chunk.digest)),
            }
            wire += (protocol::BLOB_HEADER_LEN + r.payload.len()) as u64;
            if tx.send(r).await.is_err() {
                break;
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let kept = keeper.await?;
    kept.context("a received blob is refused; nothing committed")?;
    received?;
    if let Some(d) = expected.keys().next() {
        bail!(
            "the manifest names blob {} which was not sent ({} blobs missing); nothing committed",
            hex::encode(d),
            expected.len()
        );
    }
    let s = store.clone();
    let meta = tokio::task::spawn_blocking(move || {
        s.cas().ok_or_else(|| anyhow!("no blob store")).and_then(|c| c.commit(&bytes, &manifest))
    })
    .await??;
    Ok((meta, wire))
}

/// One "transfer done" line (for a direct fetch: "download handed out") and one `transfers`
/// row per snapshot moved.
pub(super) fn log_snapshot_transfer(
    coord: &Hub,
    agent: &str,
    direction: &str,
    snapshot_id: &str,
    bytes: u64,
    wire_bytes: u64,
    elapsed_ms: u64,
) {
    if direction == "fetch-direct" {
        // The agent downloads on its own (its log has the rate); here only a URL went out.
        info!(direction, snapshot = %snapshot_id, bytes, wire_bytes, elapsed_ms, "download handed out");
    } else {
        let mb_s = if elapsed_ms > 0 { bytes as f64 / 1e6 / (elapsed_ms as f64 / 1e3) } else { 0.0 };
        info!(
            direction,
            snapshot = %snapshot_id,
            bytes,
            wire_bytes,
            elapsed_ms,
            mb_per_s = format!("{mb_s:.1}"),
            "transfer done"
        );
    }
    if let Err(e) =
        coord.state().record_transfer(agent, direction, snapshot_id, bytes, wire_bytes, elapsed_ms)
    {
        warn!("could not record a transfer: {e:#}");
    }
}
