//! Snapshot streams an agent opens: fetches and stores relayed through the coordinator,
//! or handed to an object store's presigned URLs; each transfer logged and recorded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use protocol::{Compression, DataHeader, ErrorCode, RemoteError, SnapshotReply, SnapshotRequest};
use tokio::task::JoinSet;
use tracing::{Instrument, warn};
use transport::framed;

use super::cas::log_snapshot_transfer;
use crate::hub::Hub;

/// How long a relayed fetch waits for the agent's verdict after the last byte.
const REFUSAL_WAIT: Duration = Duration::from_secs(30);

/// Serves the streams an agent opens after its control stream: snapshot fetches, stores and
/// index lookups, each on its own task.
pub(super) async fn serve_snapshot_streams(coord: Arc<Hub>, conn: quinn::Connection, agent: String) {
    let mut tasks = JoinSet::new();
    while let Ok((send, recv)) = conn.accept_bi().await {
        let coord = coord.clone();
        let agent = agent.clone();
        tasks.spawn(
            async move {
                if let Err(e) = snapshot_stream(&coord, &agent, send, recv).await {
                    warn!("snapshot request failed: {e:#}");
                }
            }
            .in_current_span(),
        );
        while tasks.try_join_next().is_some() {}
    }
}

pub(super) async fn snapshot_stream(
    coord: &Hub,
    agent: &str,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<()> {
    let req = framed::read_frame::<SnapshotRequest, _>(&mut recv)
        .await?
        .ok_or_else(|| anyhow!("stream closed before its request"))?;
    let store = coord.store().clone();
    let reply_err = |code, message: String| SnapshotReply::Error(RemoteError { code, message });
    match req {
        SnapshotRequest::FetchDirect { snapshot_id } if store.direct().is_some() => {
            let started = Instant::now();
            let id = snapshot_id.clone();
            let s = store.clone();
            let found = tokio::task::spawn_blocking(move || match s.direct() {
                Some(d) => d.download(&id).map(|dl| (dl, s.meta(&id).ok().flatten())),
                None => Err(anyhow!("the store has no direct path")),
            })
            .await?;
            let reply = match found {
                Ok((dl, meta)) => {
                    let content = meta.map_or(dl.wire_bytes, |m| m.content_bytes);
                    log_snapshot_transfer(
                        coord,
                        agent,
                        "fetch-direct",
                        &snapshot_id,
                        content,
                        dl.wire_bytes,
                        started.elapsed().as_millis() as u64,
                    );
                    SnapshotReply::Download { url: dl.url, wire_bytes: dl.wire_bytes, digest: dl.digest }
                }
                Err(e) => reply_err(ErrorCode::NotFound, format!("{e:#}")),
            };
            framed::write_frame(&mut send, &reply).await?;
            send.finish()?;
        }
        SnapshotRequest::Fetch { snapshot_id } | SnapshotRequest::FetchDirect { snapshot_id } => {
            relay_fetch(coord, agent, &mut send, &mut recv, snapshot_id).await?;
        }
        SnapshotRequest::Store { data } => {
            if !matches!(data.compression, Compression::Zstd { .. }) {
                framed::write_frame(
                    &mut send,
                    &reply_err(ErrorCode::InvalidRequest, "snapshots are stored as zstd streams".into()),
                )
                .await?;
                send.finish()?;
                return Ok(());
            }
            relay_store(coord, agent, &mut send, &mut recv).await?;
        }
        SnapshotRequest::StoreBegin => match store.direct().map(|d| d.part_size()) {
            None => {
                framed::write_frame(&mut send, &SnapshotReply::Relay).await?;
                relay_store(coord, agent, &mut send, &mut recv).await?;
            }
            Some(part_size) => {
                framed::write_frame(&mut send, &SnapshotReply::Direct { part_size }).await?;
                let reply = match direct_store(coord, agent, &mut send, &mut recv).await {
                    Ok(r) => r,
                    Err(e) => reply_err(ErrorCode::RefusedArchive, format!("{e:#}")),
                };
                framed::write_frame(&mut send, &reply).await?;
                send.finish()?;
            }
        },
        SnapshotRequest::StoreObject { .. }
        | SnapshotRequest::StoreParts { .. }
        | SnapshotRequest::Refused(_) => {
            let reply = reply_err(
                ErrorCode::InvalidRequest,
                "an upload step or refusal outside of its exchange".into(),
            );
            framed::write_frame(&mut send, &reply).await?;
            send.finish()?;
        }
        SnapshotRequest::Manifest { snapshot_id } => {
            super::cas::fetch(coord, agent, &mut send, &mut recv, snapshot_id).await?;
        }
        SnapshotRequest::StoreManifest { bytes } => {
            super::cas::store(coord, agent, &mut send, &mut recv, bytes, false).await?;
        }
        SnapshotRequest::StoreManifestDirect { bytes } => {
            super::cas::store(coord, agent, &mut send, &mut recv, bytes, true).await?;
        }
        SnapshotRequest::Want { .. }
        | SnapshotRequest::WantPlaces { .. }
        | SnapshotRequest::PutPacks { .. }
        | SnapshotRequest::PacksPut => {
            let reply =
                reply_err(ErrorCode::InvalidRequest, "a step of a manifest exchange outside of one".into());
            framed::write_frame(&mut send, &reply).await?;
            send.finish()?;
        }
        SnapshotRequest::Stat { queries } => {
            let sizes =
                tokio::task::spawn_blocking(move || crate::store::sizes_of(store.as_ref(), queries)).await?;
            let reply = match sizes {
                Ok(s) => SnapshotReply::Sizes(s),
                Err(e) => reply_err(ErrorCode::InvalidRequest, format!("{e:#}")),
            };
            framed::write_frame(&mut send, &reply).await?;
            send.finish()?;
        }
        SnapshotRequest::Registry => {
            // Read, parsed and written out again on the blocking pool: it grows with the run.
            let json = match coord.runs() {
                Some(runs) => Some(tokio::task::spawn_blocking(move || runs.registry_json()).await?),
                None => None,
            };
            let reply = match json {
                Some(Ok(json)) => SnapshotReply::Registry { json },
                Some(Err(e)) => reply_err(ErrorCode::Internal, format!("{e:#}")),
                None => reply_err(ErrorCode::NotFound, "this coordinator keeps no working registry".into()),
            };
            framed::write_frame(&mut send, &reply).await?;
            send.finish()?;
        }
    }
    Ok(())
}

/// Sends a stored snapshot over the stream (the relay).
pub(super) async fn relay_fetch(
    coord: &Hub,
    agent: &str,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    snapshot_id: String,
) -> Result<()> {
    let store = coord.store().clone();
    let reply_err = |code, message: String| SnapshotReply::Error(RemoteError { code, message });

    let id = snapshot_id.clone();
    let opened = tokio::task::spawn_blocking(move || store.open(&id)).await?;
    let (path, digest) = match opened {
        Ok(v) => v,
        Err(e) => {
            framed::write_frame(send, &reply_err(ErrorCode::NotFound, format!("{e:#}"))).await?;
            send.finish()?;
            return Ok(());
        }
    };
    let started = Instant::now();
    let header = DataHeader { expected_bytes: None, compression: Compression::Zstd { level: 0 } };
    framed::write_frame(send, &SnapshotReply::Data(header)).await?;
    let sent = transport::bulk::send_file(send, &path, Some(digest)).await;
    if sent.is_ok() {
        let _ = send.finish();
    }
    // An agent that refused the bytes says why before it closes its side.
    let answer = tokio::time::timeout(REFUSAL_WAIT, framed::read_frame::<SnapshotRequest, _>(recv)).await;
    if let Ok(Ok(Some(SnapshotRequest::Refused(e)))) = answer {
        warn!(agent = %agent, snapshot = %snapshot_id, "agent {agent} refused snapshot {snapshot_id}: {}", e.message);
        return Ok(());
    }
    let bytes = sent.with_context(|| format!("sending snapshot {snapshot_id}"))?;
    let _ = send.stopped().await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let store = coord.store().clone();
    let id = snapshot_id.clone();
    let content = tokio::task::spawn_blocking(move || store.meta(&id))
        .await
        .ok()
        .and_then(|m| m.ok().flatten())
        .map_or(bytes, |m| m.content_bytes);
    log_snapshot_transfer(coord, agent, "fetch", &snapshot_id, content, bytes, elapsed_ms);
    Ok(())
}

/// Receives a snapshot on the stream (the relay) and stores it.
pub(super) async fn relay_store(
    coord: &Hub,
    agent: &str,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<()> {
    let store = coord.store().clone();
    let reply_err = |code, message: String| SnapshotReply::Error(RemoteError { code, message });
    let started = Instant::now();
    let tmp = store.incoming_path()?;
    let reply = match transport::bulk::recv_file(recv, &tmp, coord.config().unpack_limits.max_bytes).await {
        Err(e) => reply_err(e.code(), e.to_string()),
        Ok(trailer) => {
            let t = tmp.clone();
            match tokio::task::spawn_blocking(move || store.ingest(&t, &trailer)).await? {
                Ok(meta) => {
                    let elapsed_ms = started.elapsed().as_millis() as u64;
                    log_snapshot_transfer(
                        coord,
                        agent,
                        "store",
                        &meta.snapshot_id,
                        meta.content_bytes,
                        meta.wire_bytes,
                        elapsed_ms,
                    );
                    SnapshotReply::Stored(meta.info())
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    reply_err(ErrorCode::RefusedArchive, format!("{e:#}"))
                }
            }
        }
    };
    framed::write_frame(send, &reply).await?;
    send.finish()?;
    Ok(())
}

/// A direct upload: the agent announces the packed snapshot, PUTs its parts at presigned URLs,
/// then sends their ETags and the file index. An upload that does not complete is aborted.
pub(super) async fn direct_store(
    coord: &Hub,
    agent: &str,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<SnapshotReply> {
    let started = Instant::now();
    let (wire_bytes, digest) = match framed::read_frame::<SnapshotRequest, _>(recv).await? {
        Some(SnapshotRequest::StoreObject { wire_bytes, digest }) => (wire_bytes, digest),
        other => bail!("expected the packed snapshot's size and digest, got {other:?}"),
    };
    let max = coord.config().unpack_limits.max_bytes;
    if wire_bytes > max {
        bail!("a snapshot of {wire_bytes} bytes is over the limit of {max}");
    }
    let store = coord.store().clone();
    let begun = tokio::task::spawn_blocking(move || match store.direct() {
        Some(d) => d.begin(wire_bytes, digest),
        None => Err(anyhow!("the store has no direct path")),
    })
    .await??;
    let (ticket, urls) = match begun {
        crate::store::Begin::Exists(meta) => return Ok(SnapshotReply::Stored(meta.info())),
        crate::store::Begin::Upload { ticket, urls } => (ticket, urls),
    };
    let parts = async {
        framed::write_frame(send, &SnapshotReply::Upload { urls }).await?;
        match framed::read_frame::<SnapshotRequest, _>(recv).await? {
            Some(SnapshotRequest::StoreParts { etags, index_json }) => anyhow::Ok((etags, index_json)),
            other => bail!("expected the uploaded parts, got {other:?}"),
        }
    }
    .await;
    let store = coord.store().clone();
    let t = ticket.clone();
    let meta = tokio::task::spawn_blocking(move || {
        let d = store.direct().ok_or_else(|| anyhow!("the store has no direct path"))?;
        // The file index (up to a frame's size, an entry per file) is parsed here, off the
        // thread that answers heartbeats.
        let parsed = parts.and_then(|(etags, index_json)| {
            let files: Vec<transport::tree::IndexEntry> =
                serde_json::from_slice(&index_json).context("parsing the snapshot's file index")?;
            Ok((etags, files))
        });
        match parsed {
            Ok((etags, files)) => d.finish(&t, etags, files),
            Err(e) => {
                d.abort(&t);
                Err(e)
            }
        }
    })
    .await??;
    log_snapshot_transfer(
        coord,
        agent,
        "store-direct",
        &meta.snapshot_id,
        meta.content_bytes,
        meta.wire_bytes,
        started.elapsed().as_millis() as u64,
    );
    Ok(SnapshotReply::Stored(meta.info()))
}
