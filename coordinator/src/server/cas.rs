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
    // The manifest, else whether the store keeps the snapshot as an archive (an object store
    // is asked over the network): on the blocking pool.
    let found = tokio::task::spawn_blocking(move || {
        let m = s.cas().map(|c| c.manifest(&id)).transpose()?.flatten();
        let archived = m.is_none() && s.meta(&id).ok().flatten().is_some();
        anyhow::Ok((m, archived))
    })
    .await?;
    let (bytes, manifest) = match found {
        Ok((Some(m), _)) => m,
        Ok((None, true)) => {
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
    // Bytes of blob records handed out as places in packs (the agent reads them itself).
    let mut direct = 0u64;
    loop {
        let digests = match framed::read_frame::<SnapshotRequest, _>(recv).await? {
            Some(SnapshotRequest::Want { digests }) if digests.is_empty() => break,
            Some(SnapshotRequest::Want { digests }) => digests,
            Some(SnapshotRequest::WantPlaces { digests }) => {
                if let Some(d) = digests.iter().find(|d| !known.contains_key(*d)) {
                    bail!(
                        "agent {agent} asked for blob {} which snapshot {snapshot_id} does not hold",
                        hex::encode(d)
                    );
                }
                let reply = places(&store, digests).await?;
                if let SnapshotReply::Places { packs } = &reply {
                    direct += packs.iter().flat_map(|p| &p.blobs).map(|b| b.stored).sum::<u64>();
                }
                framed::write_frame(send, &reply).await?;
                continue;
            }
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
    if direct > 0 {
        log_snapshot_transfer(
            coord,
            agent,
            "fetch-direct",
            &snapshot_id,
            manifest.content_bytes(),
            direct,
            elapsed,
        );
    }
    if direct == 0 || wire > bytes.len() as u64 {
        log_snapshot_transfer(coord, agent, "fetch", &snapshot_id, manifest.content_bytes(), wire, elapsed);
    }
    Ok(())
}

/// Where `digests` lie in the store's packs (`Places`), or `Relay` when the store has no
/// packs to hand out.
async fn places(store: &Arc<dyn SnapshotStore>, digests: Vec<Digest>) -> Result<SnapshotReply> {
    let s = store.clone();
    tokio::task::spawn_blocking(move || {
        let Some(direct) = s.cas().and_then(|c| c.packs_direct()) else { return Ok(SnapshotReply::Relay) };
        let packs = direct
            .places(&digests)?
            .into_iter()
            .map(|(url, blobs)| protocol::PackPlaces {
                url,
                blobs: blobs.into_iter().map(Into::into).collect(),
            })
            .collect();
        Ok(SnapshotReply::Places { packs })
    })
    .await?
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

/// `StoreManifest { bytes }` (or `StoreManifestDirect`, `direct`): the manifest, the blobs
/// the store lacks (sent on this stream, or uploaded by the agent in packs), the commit.
pub(super) async fn store(
    coord: &Hub,
    agent: &str,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    manifest_len: u64,
    direct: bool,
) -> Result<()> {
    let started = Instant::now();
    let store = coord.store().clone();
    let raw = blobwire::read_bytes(recv, manifest_len, cas::MAX_MANIFEST).await;
    if cas_of(&store).is_none() {
        framed::write_frame(send, &SnapshotReply::Archive).await?;
        send.finish()?;
        return Ok(());
    }
    let packs = direct && store.cas().is_some_and(|c| c.packs_direct().is_some());
    if direct {
        let how = if packs {
            SnapshotReply::Direct { part_size: transport::pack::PACK_TARGET }
        } else {
            SnapshotReply::Relay
        };
        framed::write_frame(send, &how).await?;
    }
    let received = if packs {
        receive_packs(coord, &store, send, recv, raw.map_err(anyhow::Error::from)).await
    } else {
        receive(coord, &store, send, recv, raw.map_err(anyhow::Error::from)).await
    };
    let reply = match received {
        Ok((meta, wire)) => {
            let elapsed = started.elapsed().as_millis() as u64;
            log_snapshot_transfer(
                coord,
                agent,
                if packs { "store-direct" } else { "store" },
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

/// Decodes a manifest from an agent and finds the blobs the store lacks, on a blocking thread.
async fn missing_of(
    coord: &Hub,
    store: &Arc<dyn SnapshotStore>,
    bytes: Vec<u8>,
) -> Result<(Vec<u8>, Manifest, Vec<Chunk>)> {
    let limits = coord.config().unpack_limits;
    let s = store.clone();
    tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, Manifest, Vec<Chunk>)> {
        let m = Manifest::decode(&bytes, limits).map_err(|e| anyhow!("the manifest is refused: {e}"))?;
        let cas = s.cas().ok_or_else(|| anyhow!("no blob store"))?;
        let mut seen = std::collections::HashSet::new();
        let missing =
            m.chunks().into_iter().filter(|c| seen.insert(c.digest) && !cas.has_blob(&c.digest)).collect();
        Ok((bytes, m, missing))
    })
    .await?
}

async fn send_missing(send: &mut quinn::SendStream, missing: &[Chunk]) -> Result<()> {
    let mut batches = missing.chunks(DIGESTS_PER_FRAME).peekable();
    if batches.peek().is_none() {
        framed::write_frame(send, &SnapshotReply::Missing { digests: Vec::new(), done: true }).await?;
    }
    while let Some(b) = batches.next() {
        let digests = b.iter().map(|c| c.digest).collect();
        framed::write_frame(send, &SnapshotReply::Missing { digests, done: batches.peek().is_none() })
            .await?;
    }
    Ok(())
}

/// The direct half of a store: the agent names the packs that hold the missing blobs, gets a
/// PUT URL for each, uploads them, and says so; each pack is read back and verified before the
/// manifest is committed. Returns the snapshot and the pack bytes uploaded.
async fn receive_packs(
    coord: &Hub,
    store: &Arc<dyn SnapshotStore>,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    raw: Result<Vec<u8>>,
) -> Result<(crate::store::SnapshotMeta, u64)> {
    let bytes = raw.context("reading the manifest")?;
    let (bytes, manifest, missing) = missing_of(coord, store, bytes).await?;
    send_missing(send, &missing).await?;
    let plans = match framed::read_frame::<SnapshotRequest, _>(recv).await? {
        Some(SnapshotRequest::PutPacks { packs }) => packs,
        other => bail!("expected PutPacks, got {other:?}"),
    };
    // Tens of thousands of blobs take a while to check: not on the thread that answers heartbeats.
    let indexes = tokio::task::spawn_blocking(move || pack_indexes(&missing, plans)).await??;
    // An upload never replaces a stored pack (its name is its digest: same name, same bytes,
    // unless the agent lies).
    let s = store.clone();
    let names: Vec<String> = indexes.iter().map(|i| i.digest.clone()).collect();
    let taken = tokio::task::spawn_blocking(move || {
        s.cas().and_then(|c| c.packs_direct()).map(|d| names.into_iter().find(|n| d.has_pack(n)))
    })
    .await?
    .flatten();
    if let Some(name) = taken {
        bail!("the store already holds pack {name}: nothing uploaded, nothing committed");
    }
    let wire: u64 = indexes.iter().map(|i| i.len).sum();
    let s = store.clone();
    let idx = indexes.clone();
    let urls = tokio::task::spawn_blocking(move || {
        s.cas()
            .and_then(|c| c.packs_direct())
            .ok_or_else(|| anyhow!("no packs"))
            .and_then(|d| d.upload_urls(&idx))
    })
    .await??;
    framed::write_frame(send, &SnapshotReply::Upload { urls }).await?;
    match framed::read_frame::<SnapshotRequest, _>(recv).await? {
        Some(SnapshotRequest::PacksPut) => {}
        other => bail!("expected PacksPut, got {other:?}"),
    }
    let s = store.clone();
    let meta = tokio::task::spawn_blocking(move || -> Result<crate::store::SnapshotMeta> {
        let cas = s.cas().ok_or_else(|| anyhow!("no blob store"))?;
        let direct = cas.packs_direct().ok_or_else(|| anyhow!("no packs"))?;
        for idx in &indexes {
            direct.adopt(idx).context("nothing committed")?;
        }
        cas.commit(&bytes, &manifest)
    })
    .await??;
    Ok((meta, wire))
}

/// Checks an agent's packs against the blobs the store asked for: each pack laid out end to
/// end, each blob asked for, of its manifest length, in exactly one pack, and none missing.
fn pack_indexes(
    missing: &[Chunk],
    plans: Vec<protocol::PackPlan>,
) -> Result<Vec<transport::pack::PackIndex>> {
    use transport::pack::{MAX_PACK, PACK_VERSION, PackIndex, Placed, check_places};
    let mut expected: std::collections::HashMap<Digest, u64> =
        missing.iter().map(|c| (c.digest, c.len)).collect();
    let mut out = Vec::with_capacity(plans.len());
    for plan in plans {
        let blobs: Vec<Placed> = plan.blobs.into_iter().map(Into::into).collect();
        if blobs.is_empty() || plan.len > MAX_PACK {
            bail!("a pack of {} blobs and {} bytes is refused", blobs.len(), plan.len);
        }
        check_places(&blobs, plan.len).map_err(|e| anyhow!("a pack is refused: {e}"))?;
        for b in &blobs {
            match expected.remove(&b.digest) {
                Some(len) if len == b.len => {}
                Some(len) => bail!(
                    "blob {} is {} bytes in a pack, {len} in the manifest",
                    hex::encode(b.digest),
                    b.len
                ),
                None => bail!("blob {} was not asked for (or is in two packs)", hex::encode(b.digest)),
            }
        }
        out.push(PackIndex { version: PACK_VERSION, digest: hex::encode(plan.digest), len: plan.len, blobs });
    }
    if let Some(d) = expected.keys().next() {
        bail!(
            "the manifest names blob {} which no pack holds ({} blobs missing); nothing committed",
            hex::encode(d),
            expected.len()
        );
    }
    Ok(out)
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
    let (bytes, manifest, missing) = missing_of(coord, store, bytes).await?;
    send_missing(send, &missing).await?;
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
    let to_agent = direction.starts_with("fetch");
    // A direct fetch's time here is only the URL's: no rate from it.
    let secs = if direction == "fetch-direct" { 0.0 } else { elapsed_ms as f64 / 1e3 };
    crate::metrics::get().transfer(if to_agent { "to_agent" } else { "from_agent" }, bytes, wire_bytes, secs);
    if let Err(e) =
        coord.state().record_transfer(agent, direction, snapshot_id, bytes, wire_bytes, elapsed_ms)
    {
        warn!("could not record a transfer: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{BlobPlace, PackPlan};

    fn chunk(data: &[u8]) -> Chunk {
        Chunk { digest: *blake3::hash(data).as_bytes(), len: data.len() as u64 }
    }

    fn place(c: &Chunk, offset: u64) -> BlobPlace {
        BlobPlace { digest: c.digest, len: c.len, offset, stored: 1 + c.len }
    }

    #[test]
    fn an_agents_packs_must_hold_exactly_the_missing_blobs_laid_end_to_end() {
        let (a, b, c) = (chunk(b"alpha"), chunk(b"beta"), chunk(b"gamma"));
        let missing = vec![a, b];
        let plan = |blobs: Vec<BlobPlace>| PackPlan {
            digest: [7; 32],
            len: blobs.iter().map(|p| p.stored).sum(),
            blobs,
        };
        let good = vec![plan(vec![place(&a, 0), place(&b, 6)])];
        let idx = pack_indexes(&missing, good).unwrap();
        assert_eq!(idx.len(), 1);
        assert_eq!(idx[0].blobs.len(), 2);
        // In two packs is fine too.
        assert!(pack_indexes(&missing, vec![plan(vec![place(&a, 0)]), plan(vec![place(&b, 0)])]).is_ok());
        let err = |plans: Vec<PackPlan>| format!("{:#}", pack_indexes(&missing, plans).unwrap_err());
        assert!(err(vec![plan(vec![place(&a, 0)])]).contains("which no pack holds"));
        assert!(err(vec![plan(vec![place(&a, 0), place(&b, 6), place(&c, 11)])]).contains("not asked for"));
        assert!(
            err(vec![plan(vec![place(&a, 0)]), plan(vec![place(&a, 0), place(&b, 6)])])
                .contains("not asked for")
        );
        assert!(err(vec![plan(vec![place(&a, 0), place(&b, 7)])]).contains("starts at"));
        let mut long = place(&b, 6);
        long.len += 1;
        long.stored += 1;
        assert!(err(vec![plan(vec![place(&a, 0), long])]).contains("in the manifest"));
        assert!(err(vec![plan(vec![])]).contains("refused"));
        let mut over = plan(vec![place(&a, 0), place(&b, 6)]);
        over.len += 1;
        assert!(err(vec![over]).contains("add up"));
    }
}
