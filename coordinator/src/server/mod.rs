//! The coordinator's QUIC server: enrollment, agent control streams, operator requests.
//!
//! Every incoming connection is sorted by ALPN. Enrollment connections are the only ones
//! accepted without a client certificate. Agent and admin connections are checked before any
//! stream is read: a certificate must be present, known to the state database, not revoked
//! and of the right role; each refusal is one log line and the connection is closed with a
//! [`CloseCode`] and reason. Nothing a peer sends can stop the accept loop.

pub mod lograte;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use protocol::{
    AdminRequest, AdminResponse, AgentToCoordinator, BulkReply, BulkRequest, CloseCode, Compression,
    CoordinatorToAgent, DataHeader, EnrollRequest, EnrollResponse, ErrorCode, RemoteError, SnapshotReply,
    SnapshotRequest, StepSpec, TransferSummary, Welcome,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};
use transport::{framed, pki};

use crate::hub::{Hub, Joining, StepEvent};
use crate::persist::state::Role;
use crate::server::lograte::{LogRate, Verdict};

/// Control messages queued for one agent's control stream.
const OUTBOX_DEPTH: usize = 256;

/// Time a peer has to open its first stream and send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a relayed fetch waits for the agent's verdict after the last byte.
const REFUSAL_WAIT: Duration = Duration::from_secs(30);

/// A peer refused at the TLS handshake is logged once per address and reason in this window.
const HANDSHAKE_LOG_WINDOW: Duration = Duration::from_secs(60);

/// Serves until `shutdown` is cancelled, then tells every agent it is going away.
pub async fn run(endpoint: quinn::Endpoint, coord: Arc<Hub>, shutdown: CancellationToken) {
    let mut tasks = JoinSet::new();
    tasks.spawn(revocation_watch(coord.clone(), shutdown.clone()));
    // Handshake refusals: one line per address and reason per minute.
    let refusals = Arc::new(Mutex::new(LogRate::new(HANDSHAKE_LOG_WINDOW, 4096)));
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
        };
        let coord = coord.clone();
        let shutdown = shutdown.clone();
        let refusals = refusals.clone();
        tasks.spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    let reason = if transport::endpoint::is_alpn_mismatch(&e) {
                        format!(
                            "protocol version mismatch: the peer does not speak {} (TLS handshake failed: {e})",
                            String::from_utf8_lossy(protocol::ALPN_AGENT)
                        )
                    } else {
                        format!("TLS handshake failed: {e}")
                    };
                    // The reason without its numbers (times, counts): one key per kind.
                    let kind: String = reason.chars().filter(|c| !c.is_ascii_digit()).collect();
                    let verdict = refusals.lock().unwrap_or_else(|p| p.into_inner()).event(&(remote.ip(), kind), Instant::now());
                    if let Verdict::Log { suppressed } = verdict {
                        let since = if suppressed > 0 {
                            format!(" ({suppressed} more from this address left out of the log since the last line)")
                        } else {
                            String::new()
                        };
                        warn!(peer = %remote, "refused connection: {reason}{since}");
                    }
                    return;
                }
            };
            handle_connection(coord, conn, shutdown).await;
        });
        // Reap finished connection tasks so the set does not grow with every connection.
        while tasks.try_join_next().is_some() {}
    }
    // Control loops send GoingAway on their own streams when they see the cancellation.
    let deadline = Instant::now() + Duration::from_millis(500);
    while !coord.connections().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (_, conn) in coord.connections() {
        conn.close(close_code(CloseCode::GoingAway), b"coordinator shutting down");
    }
    tasks.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

fn close_code(code: CloseCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(code as u32)
}

fn refuse(conn: &quinn::Connection, code: CloseCode, reason: &str) {
    warn!(peer = %conn.remote_address(), "refused connection: {reason}");
    conn.close(close_code(code), reason.as_bytes());
}

async fn handle_connection(coord: Arc<Hub>, conn: quinn::Connection, shutdown: CancellationToken) {
    let alpn = transport::endpoint::alpn(&conn).unwrap_or_default();
    if alpn == protocol::ALPN_ENROLL {
        handle_enroll(&coord, &conn).await;
        return;
    }
    let role = if alpn == protocol::ALPN_AGENT {
        Role::Agent
    } else if alpn == protocol::ALPN_ADMIN {
        Role::Admin
    } else {
        refuse(&conn, CloseCode::VersionMismatch, "unsupported protocol");
        return;
    };
    let Some(der) = transport::endpoint::peer_certificate(&conn) else {
        refuse(&conn, CloseCode::Unauthorized, "no client certificate");
        return;
    };
    let fp = pki::fingerprint(&der);
    let record = match coord.state().lookup_cert(&fp) {
        Ok(Some(r)) => r,
        Ok(None) => {
            refuse(&conn, CloseCode::Unauthorized, "client certificate was not issued to any enrolled agent");
            return;
        }
        Err(e) => {
            refuse(&conn, CloseCode::Unauthorized, &format!("state database error: {e:#}"));
            return;
        }
    };
    if record.revoked {
        refuse(
            &conn,
            CloseCode::Unauthorized,
            &format!("certificate of agent {} is revoked", record.agent_id),
        );
        return;
    }
    if record.role != role {
        refuse(
            &conn,
            CloseCode::Unauthorized,
            &format!("certificate of {} is not allowed on this protocol", record.agent_id),
        );
        return;
    }
    match role {
        Role::Agent => {
            let span = info_span!("agent", agent = %record.agent_id, peer = %conn.remote_address());
            handle_agent(coord, conn, record.agent_id, shutdown).instrument(span).await
        }
        Role::Admin => handle_admin(coord, conn).await,
    }
}

async fn handle_enroll(coord: &Hub, conn: &quinn::Connection) {
    let peer = conn.remote_address();
    let result = async {
        let (mut send, mut recv) = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, conn.accept_bi())
            .await
            .map_err(|_| anyhow!("no request within {FIRST_MESSAGE_TIMEOUT:?}"))??;
        let req: EnrollRequest = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, framed::read_frame(&mut recv))
            .await
            .map_err(|_| anyhow!("no request within {FIRST_MESSAGE_TIMEOUT:?}"))??
            .ok_or_else(|| anyhow!("stream closed before the enrollment request"))?;
        let response = if req.protocol_major != protocol::PROTOCOL_MAJOR {
            EnrollResponse::Refused(RemoteError {
                code: ErrorCode::InvalidRequest,
                message: format!(
                    "protocol version mismatch: coordinator speaks {}, agent speaks {}",
                    protocol::PROTOCOL_MAJOR,
                    req.protocol_major
                ),
            })
        } else {
            let name = req.name.clone().unwrap_or_else(|| "agent".into());
            let days = coord.config().client_cert_days;
            match coord.state().enroll(
                &req.token,
                &name,
                |id| coord.ca().sign_client_csr(&req.csr_pem, id, days),
                |pem| {
                    let der =
                        pki::CertKey { cert_pem: pem.to_string(), key_pem: String::new() }.cert_der()?;
                    Ok(pki::fingerprint(&der))
                },
            ) {
                Ok((agent_id, cert_pem)) => {
                    info!(agent = %agent_id, peer = %peer, "agent enrolled");
                    EnrollResponse::Enrolled { agent_id, cert_pem }
                }
                Err(refusal) => {
                    warn!(peer = %peer, "refused enrollment: {refusal}");
                    EnrollResponse::Refused(RemoteError {
                        code: ErrorCode::Unauthorized,
                        message: refusal.to_string(),
                    })
                }
            }
        };
        framed::write_frame(&mut send, &response).await?;
        send.finish()?;
        let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        warn!(peer = %peer, "refused enrollment: {e:#}");
        conn.close(close_code(CloseCode::ProtocolViolation), format!("{e:#}").as_bytes());
    }
}

async fn handle_agent(
    coord: Arc<Hub>,
    conn: quinn::Connection,
    agent_id: String,
    shutdown: CancellationToken,
) {
    let first = async {
        let (send, mut recv) =
            conn.accept_bi().await.map_err(|e| (CloseCode::Normal, format!("connection lost: {e}")))?;
        let msg = framed::read_frame::<AgentToCoordinator, _>(&mut recv)
            .await
            .map_err(|e| (CloseCode::ProtocolViolation, format!("malformed first message: {e}")))?;
        Ok::<_, (CloseCode, String)>((send, recv, msg))
    };
    let (mut send, recv, hello) = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, first).await {
        Err(_) => return refuse(&conn, CloseCode::ProtocolViolation, "no Hello within 10s"),
        Ok(Err((code, reason))) => return refuse(&conn, code, &reason),
        Ok(Ok((s, r, Some(AgentToCoordinator::Hello(h))))) => (s, r, h),
        Ok(Ok((_, _, Some(_)))) => {
            return refuse(&conn, CloseCode::ProtocolViolation, "first message was not Hello");
        }
        Ok(Ok((_, _, None))) => {
            return refuse(&conn, CloseCode::ProtocolViolation, "control stream closed before Hello");
        }
    };
    if hello.protocol_major != protocol::PROTOCOL_MAJOR {
        let reason = format!(
            "protocol version mismatch: coordinator speaks {}.{}, agent speaks {}.{}",
            protocol::PROTOCOL_MAJOR,
            protocol::PROTOCOL_MINOR,
            hello.protocol_major,
            hello.protocol_minor
        );
        return refuse(&conn, CloseCode::VersionMismatch, &reason);
    }
    if hello.agent_id != agent_id {
        return refuse(
            &conn,
            CloseCode::Unauthorized,
            &format!("Hello names agent {} but the certificate belongs to {agent_id}", hello.agent_id),
        );
    }
    let (outbox, mut outbox_rx) = mpsc::channel(OUTBOX_DEPTH);
    let serial = coord.join(
        &agent_id,
        Joining {
            conn: conn.clone(),
            host: hello.host.clone(),
            slots: hello.slots,
            labels: hello.labels.clone(),
            outbox,
        },
    );
    let host_json = serde_json::to_string(&hello.host).unwrap_or_default();
    if let Err(e) = coord.state().record_seen(&agent_id, &conn.remote_address().to_string(), &host_json) {
        warn!("could not record agent in state database: {e:#}");
    }
    info!(
        hostname = %hello.host.hostname,
        cpus = hello.host.cpus,
        memory_total_bytes = hello.host.memory_total_bytes,
        work_dir_free_bytes = hello.host.work_dir_free_bytes,
        agent_version = %hello.agent_version,
        "agent joined"
    );
    let welcome = CoordinatorToAgent::Welcome(Welcome {
        protocol_major: protocol::PROTOCOL_MAJOR,
        protocol_minor: protocol::PROTOCOL_MINOR,
        coordinator_version: env!("CARGO_PKG_VERSION").into(),
        agent_id: agent_id.clone(),
        heartbeat_interval_ms: coord.config().heartbeat_interval.as_millis() as u64,
    });
    let reason = match framed::write_frame(&mut send, &welcome).await {
        Err(e) => format!("could not send Welcome: {e}"),
        Ok(()) => {
            let streams = tokio::spawn(
                serve_snapshot_streams(coord.clone(), conn.clone(), agent_id.clone()).in_current_span(),
            );
            let reason =
                control_loop(&coord, &conn, &agent_id, &mut send, recv, &mut outbox_rx, &shutdown).await;
            streams.abort();
            reason
        }
    };
    if coord.leave(&agent_id, serial) {
        info!(reason = %reason, "agent left");
    }
}

/// Reads control messages until the agent leaves or goes silent; returns why it ended.
async fn control_loop(
    coord: &Hub,
    conn: &quinn::Connection,
    agent_id: &str,
    send: &mut quinn::SendStream,
    recv: quinn::RecvStream,
    outbox: &mut mpsc::Receiver<CoordinatorToAgent>,
    shutdown: &CancellationToken,
) -> String {
    let allowed = coord.config().heartbeat_interval * coord.config().heartbeats_missed.max(1);
    // Frames arrive through their own task: reading a frame is not cancel-safe, and the
    // select below must be free to send to the agent while one is half read.
    let mut frames = FrameReader::spawn(recv);
    let mut last_heard = tokio::time::Instant::now();
    loop {
        let msg = tokio::select! {
            Some(out) = outbox.recv() => {
                if let Err(e) = framed::write_frame(send, &out).await {
                    return format!("could not send to agent: {e}");
                }
                continue;
            }
            _ = shutdown.cancelled() => {
                let bye = CoordinatorToAgent::GoingAway { reason: "coordinator shutting down".into() };
                let _ = framed::write_frame(send, &bye).await;
                let _ = send.finish();
                conn.close(close_code(CloseCode::GoingAway), b"coordinator shutting down");
                return "coordinator shutting down".into();
            }
            _ = tokio::time::sleep_until(last_heard + allowed) => None,
            frame = frames.rx.recv() => Some(frame.unwrap_or(Ok(None))),
        };
        last_heard = tokio::time::Instant::now();
        match msg {
            None => {
                let reason = format!("heartbeats missed for {}ms", allowed.as_millis());
                warn!(reason = %reason, "agent lost");
                conn.close(close_code(CloseCode::HeartbeatTimeout), reason.as_bytes());
                return reason;
            }
            Some(Err(e)) => {
                if let Some(reason) = conn.close_reason() {
                    return format!("connection closed: {reason}");
                }
                let reason = format!("malformed control message: {e}");
                warn!(reason = %reason, "closing agent connection");
                conn.close(close_code(CloseCode::ProtocolViolation), reason.as_bytes());
                return reason;
            }
            Some(Ok(None)) => return "control stream closed".into(),
            Some(Ok(Some(AgentToCoordinator::Heartbeat(hb)))) => {
                coord.heartbeat(agent_id, &hb);
                tracing::debug!(seq = hb.seq, "heartbeat");
                if let Err(e) =
                    framed::write_frame(send, &CoordinatorToAgent::HeartbeatAck { seq: hb.seq }).await
                {
                    return format!("could not answer heartbeat: {e}");
                }
            }
            Some(Ok(Some(AgentToCoordinator::GoingAway { reason }))) => {
                conn.close(close_code(CloseCode::Normal), b"bye");
                return format!("going away: {reason}");
            }
            Some(Ok(Some(AgentToCoordinator::Hello(_)))) => {
                let reason = "second Hello on the control stream".to_string();
                conn.close(close_code(CloseCode::ProtocolViolation), reason.as_bytes());
                return reason;
            }
            Some(Ok(Some(AgentToCoordinator::StepStarted { attempt_id, backend, view }))) => {
                tracing::debug!(attempt = attempt_id, backend = %backend, view = %view, "step started");
                coord.route(agent_id, attempt_id, StepEvent::Started { backend, view });
            }
            Some(Ok(Some(AgentToCoordinator::StepOutput { attempt_id, lines }))) => {
                coord.route(agent_id, attempt_id, StepEvent::Output(lines));
            }
            Some(Ok(Some(AgentToCoordinator::StepFinished(outcome)))) => {
                let attempt_id = outcome.attempt_id;
                coord.deliver(agent_id, outcome);
                if let Err(e) =
                    framed::write_frame(send, &CoordinatorToAgent::StepResultAck { attempt_id }).await
                {
                    return format!("could not acknowledge a result: {e}");
                }
            }
            Some(Ok(Some(AgentToCoordinator::InHand { attempts }))) => {
                tracing::debug!(attempts = ?attempts, "attempts the agent holds");
                coord.in_hand(agent_id, attempts);
            }
            Some(Ok(Some(AgentToCoordinator::Draining { reason }))) => {
                coord.draining(agent_id);
                info!(reason = %reason, "agent draining: its running steps finish, it gets no new ones");
            }
            Some(Ok(Some(AgentToCoordinator::OutputsChecked { request_id, result }))) => {
                coord.outputs_checked(agent_id, request_id, result);
            }
        }
    }
}

/// The control stream's frames, read by a task of their own; the task ends with the stream,
/// at the first bad frame, or when this is dropped.
struct FrameReader {
    rx: mpsc::Receiver<Result<Option<AgentToCoordinator>, transport::FrameError>>,
    task: tokio::task::JoinHandle<()>,
}

impl FrameReader {
    fn spawn(mut recv: quinn::RecvStream) -> FrameReader {
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(
            async move {
                loop {
                    let frame = framed::read_frame::<AgentToCoordinator, _>(&mut recv).await;
                    let last = !matches!(frame, Ok(Some(_)));
                    if tx.send(frame).await.is_err() || last {
                        return;
                    }
                }
            }
            .in_current_span(),
        );
        FrameReader { rx, task }
    }
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the streams an agent opens after its control stream: snapshot fetches, stores and
/// index lookups, each on its own task.
async fn serve_snapshot_streams(coord: Arc<Hub>, conn: quinn::Connection, agent: String) {
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

async fn snapshot_stream(
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
            let reply = match coord.runs().map(|e| e.registry_json()) {
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
async fn relay_fetch(
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
async fn relay_store(
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
async fn direct_store(
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
            Some(SnapshotRequest::StoreParts { etags, index_json }) => {
                let files: Vec<transport::tree::IndexEntry> =
                    serde_json::from_slice(&index_json).context("parsing the snapshot's file index")?;
                anyhow::Ok((etags, files))
            }
            other => bail!("expected the uploaded parts, got {other:?}"),
        }
    }
    .await;
    let store = coord.store().clone();
    let t = ticket.clone();
    let meta = tokio::task::spawn_blocking(move || {
        let d = store.direct().ok_or_else(|| anyhow!("the store has no direct path"))?;
        match parts {
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

/// Closes connections of agents revoked while connected (revocation is done by another
/// process, `pype-coordinator agent revoke`, through the state database).
async fn revocation_watch(coord: Arc<Hub>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let Ok(revoked) = coord.state().revoked_ids() else { continue };
        for (id, conn) in coord.connections() {
            if revoked.contains(&id) {
                warn!(agent = %id, "closing connection of revoked agent");
                conn.close(close_code(CloseCode::Unauthorized), b"certificate revoked");
            }
        }
    }
}

async fn handle_admin(coord: Arc<Hub>, conn: quinn::Connection) {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let coord = coord.clone();
        tokio::spawn(async move {
            let response = match framed::read_frame::<AdminRequest, _>(&mut recv).await {
                Ok(Some(AdminRequest::RunStep { agent, spec })) => {
                    admin_run_step(&coord, &agent, *spec, &mut send).await
                }
                Ok(Some(AdminRequest::SubmitRun { pipeline_json, options_json })) => {
                    admin_submit(&coord, &pipeline_json, &options_json, &mut send).await
                }
                Ok(Some(req)) => admin_request(&coord, req).await,
                Ok(None) => return,
                Err(e) => AdminResponse::Error(RemoteError {
                    code: ErrorCode::InvalidRequest,
                    message: e.to_string(),
                }),
            };
            let _ = framed::write_frame(&mut send, &response).await;
            let _ = send.finish();
        });
    }
}

async fn admin_request(coord: &Hub, req: AdminRequest) -> AdminResponse {
    let result = match req {
        AdminRequest::ListAgents => return AdminResponse::Agents(coord.agent_infos()),
        AdminRequest::Push { agent, src, dest, compression } => {
            push(coord, &agent, src.into(), &dest, compression).await
        }
        AdminRequest::Pull { agent, src, dest, compression } => {
            pull(coord, &agent, &src, dest.into(), compression).await
        }
        AdminRequest::CheckOutputs { agent, paths, registry } => {
            return match coord.check_outputs(&agent, paths, registry).await {
                Ok(sizes) => AdminResponse::Outputs(sizes),
                Err(e) => {
                    AdminResponse::Error(RemoteError { code: ErrorCode::Internal, message: format!("{e:#}") })
                }
            };
        }
        AdminRequest::CancelStep { attempt_id } => {
            return match coord.cancel_step(attempt_id, "cancelled by the operator").await {
                Ok(()) => AdminResponse::Done,
                Err(e) => {
                    AdminResponse::Error(RemoteError { code: ErrorCode::NotFound, message: format!("{e:#}") })
                }
            };
        }
        AdminRequest::Present { paths } => {
            let Some(runs) = coord.runs() else {
                return AdminResponse::Error(RemoteError {
                    code: ErrorCode::NotFound,
                    message: "this coordinator keeps no working registry".into(),
                });
            };
            let store = coord.store().clone();
            let reg = match runs.registry() {
                Ok(r) => r,
                Err(e) => {
                    return AdminResponse::Error(RemoteError {
                        code: ErrorCode::Internal,
                        message: format!("{e:#}"),
                    });
                }
            };
            return match tokio::task::spawn_blocking(move || {
                crate::store::present(store.as_ref(), &reg, &paths)
            })
            .await
            {
                Ok(Ok(sizes)) => AdminResponse::Outputs(sizes),
                Ok(Err(e)) => {
                    AdminResponse::Error(RemoteError { code: ErrorCode::Internal, message: format!("{e:#}") })
                }
                Err(e) => {
                    AdminResponse::Error(RemoteError { code: ErrorCode::Internal, message: format!("{e}") })
                }
            };
        }
        AdminRequest::CancelRunStep { run, step } => {
            let Some(runs) = coord.runs() else {
                return AdminResponse::Error(RemoteError {
                    code: ErrorCode::NotFound,
                    message: "this coordinator runs no pipelines".into(),
                });
            };
            return match runs.cancel_step(&run, &step) {
                Ok(()) => AdminResponse::Done,
                Err(e) => {
                    AdminResponse::Error(RemoteError { code: ErrorCode::NotFound, message: format!("{e:#}") })
                }
            };
        }
        AdminRequest::DrainAgent { agent } => {
            return match coord.drain_agent(&agent) {
                Ok(()) => AdminResponse::Done,
                Err(e) => {
                    AdminResponse::Error(RemoteError { code: ErrorCode::NotFound, message: format!("{e:#}") })
                }
            };
        }
        AdminRequest::RunStep { .. } | AdminRequest::SubmitRun { .. } => {
            Err(anyhow!("this request is answered as a stream"))
        }
    };
    match result {
        Ok(summary) => AdminResponse::TransferDone(summary),
        Err(e) => AdminResponse::Error(RemoteError { code: ErrorCode::Internal, message: format!("{e:#}") }),
    }
}

/// Serves `AdminRequest::SubmitRun`: runs the pipeline, streams its events, and returns the
/// last frame.
async fn admin_submit(
    coord: &Arc<Hub>,
    pipeline_json: &str,
    options_json: &str,
    send: &mut quinn::SendStream,
) -> AdminResponse {
    let err =
        |message: String| AdminResponse::Error(RemoteError { code: ErrorCode::InvalidRequest, message });
    let Some(runs) = coord.runs() else { return err("this coordinator does not run pipelines".into()) };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (pipeline_json, options_json, shutdown) =
        (pipeline_json.to_string(), options_json.to_string(), coord.shutdown_token());
    let run = tokio::spawn(async move { runs.submit(&pipeline_json, &options_json, tx, shutdown).await });
    while let Some(ev) = rx.recv().await {
        // The operator may go away; the run goes on.
        let _ = framed::write_frame(send, &AdminResponse::RunEvent(ev)).await;
    }
    match run.await {
        Ok(Ok((run, succeeded, summary))) => AdminResponse::RunDone { run, succeeded, summary },
        Ok(Err(e)) => err(e),
        Err(e) => err(format!("the run task failed: {e}")),
    }
}

/// Runs a step for an operator, streaming its events as admin frames; returns the last one.
async fn admin_run_step(
    coord: &Hub,
    agent: &str,
    spec: StepSpec,
    send: &mut quinn::SendStream,
) -> AdminResponse {
    let (run, step) = (spec.run.clone(), spec.step.clone());
    let (attempt_id, mut events) = match coord.run_step(agent, spec).await {
        Ok(v) => v,
        Err(e) => {
            return AdminResponse::Error(RemoteError {
                code: ErrorCode::NotFound,
                message: format!("{e:#}"),
            });
        }
    };
    info!(agent = %agent, run = %run, step = %step, attempt = attempt_id, "step dispatched");
    while let Some((_, event)) = events.recv().await {
        let frame = match event {
            StepEvent::Started { backend, view } => {
                info!(attempt = attempt_id, backend = %backend, view = %view, "step started");
                AdminResponse::StepStarted { backend, view }
            }
            StepEvent::Output(lines) => AdminResponse::StepOutput(lines),
            StepEvent::Finished(outcome) => {
                info!(attempt = attempt_id, exit = ?outcome.exit, elapsed_ms = outcome.elapsed_ms, "step finished");
                return AdminResponse::StepDone(outcome);
            }
        };
        // The operator may go away; the step goes on and its result is still recorded.
        let _ = framed::write_frame(send, &frame).await;
    }
    AdminResponse::Error(RemoteError { code: ErrorCode::Internal, message: "the attempt was dropped".into() })
}

/// One "transfer done" line (for a direct fetch: "download handed out") and one `transfers`
/// row per snapshot moved.
fn log_snapshot_transfer(
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

fn log_transfer(direction: &str, agent: &str, s: &TransferSummary) {
    let mb_s =
        if s.elapsed_ms > 0 { s.content_bytes as f64 / 1e6 / (s.elapsed_ms as f64 / 1e3) } else { 0.0 };
    info!(
        agent = %agent,
        direction,
        bytes = s.content_bytes,
        wire_bytes = s.wire_bytes,
        entries = s.entries,
        elapsed_ms = s.elapsed_ms,
        mb_per_s = format!("{mb_s:.1}"),
        "transfer done"
    );
}

/// Sends the local tree `src` to `dest` on `agent`.
pub async fn push(
    coord: &Hub,
    agent: &str,
    src: PathBuf,
    dest: &str,
    compression: protocol::Compression,
) -> Result<TransferSummary> {
    let conn = coord.connection_of(agent).ok_or_else(|| anyhow!("agent {agent} is not connected"))?;
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.context("opening transfer stream")?;
    let header =
        BulkRequest::Put { dest: dest.to_string(), data: DataHeader { expected_bytes: None, compression } };
    framed::write_frame(&mut send, &header).await?;
    let sent = transport::send_tree(&mut send, src.clone(), compression).await;
    if sent.is_ok() {
        let _ = send.finish();
    }
    let reply = framed::read_frame::<BulkReply, _>(&mut recv).await;
    // An agent that refused the tree stops reading it: its reason comes first.
    if let Ok(Some(BulkReply::Error(e))) = &reply {
        warn!(agent = %agent, dest = %dest, "agent refused a push: {}", e.message);
        bail!("agent {agent} refused the transfer: {}", e.message);
    }
    let sent = sent.with_context(|| format!("sending {}", src.display()))?;
    match reply.context("reading transfer reply")? {
        Some(BulkReply::Stored(mut summary)) => {
            summary.elapsed_ms = started.elapsed().as_millis() as u64;
            summary.wire_bytes = sent.wire_bytes;
            log_transfer("push", agent, &summary);
            Ok(summary)
        }
        Some(BulkReply::Error(e)) => Err(anyhow!("agent {agent} refused the transfer: {}", e.message)),
        Some(BulkReply::Data(_)) | None => Err(anyhow!("agent {agent} sent no transfer reply")),
    }
}

/// Fetches the tree `src` from `agent` into the local `dest`.
pub async fn pull(
    coord: &Hub,
    agent: &str,
    src: &str,
    dest: PathBuf,
    compression: protocol::Compression,
) -> Result<TransferSummary> {
    let conn = coord.connection_of(agent).ok_or_else(|| anyhow!("agent {agent} is not connected"))?;
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.context("opening transfer stream")?;
    framed::write_frame(&mut send, &BulkRequest::Get { src: src.to_string(), compression }).await?;
    send.finish()?;
    match framed::read_frame::<BulkReply, _>(&mut recv).await.context("reading transfer reply")? {
        Some(BulkReply::Data(header)) => {
            let mut summary =
                transport::recv_tree(&mut recv, dest, header.compression, coord.config().unpack_limits)
                    .await
                    .with_context(|| format!("receiving {src} from {agent}"))?;
            summary.elapsed_ms = started.elapsed().as_millis() as u64;
            log_transfer("pull", agent, &summary);
            Ok(summary)
        }
        Some(BulkReply::Error(e)) => {
            warn!(agent = %agent, src = %src, "agent refused a pull: {}", e.message);
            Err(anyhow!("agent {agent} refused to send {src}: {}", e.message))
        }
        Some(BulkReply::Stored(_)) | None => Err(anyhow!("agent {agent} sent no data")),
    }
}
