//! An agent's connection: Hello, joining the hub, Welcome, then the control loop (outbox,
//! heartbeats, step events and results handed to the hub).

use std::sync::Arc;

use anyhow::Result;
use protocol::{AgentToCoordinator, CloseCode, CoordinatorToAgent, Welcome};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};
use transport::framed;
use transport::silence::{Silence, Verdict};

use super::snapshots::serve_snapshot_streams;
use super::{FIRST_MESSAGE_TIMEOUT, close_code, refuse};
use crate::hub::{Delivered, Hub, Joining, StepEvent};

/// Control messages queued for one agent's control stream.
const OUTBOX_DEPTH: usize = 256;

/// Most attempts an agent may say it holds (running, or with a result not acknowledged): the
/// list is kept per connection and compared with the run's attempts on every look.
pub(super) const MAX_IN_HAND: usize = 65_536;

pub(super) async fn handle_agent(
    coord: Arc<Hub>,
    conn: quinn::Connection,
    agent_id: String,
    shutdown: CancellationToken,
    members: super::Members,
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
    if hello.protocol_minor < protocol::OLDEST_AGENT_MINOR {
        let reason = format!(
            "agent speaks protocol {}.{}, this coordinator needs {}.{} or newer (snapshots moved to \
             manifests and blobs in {}.{}): upgrade pype-agent",
            hello.protocol_major,
            hello.protocol_minor,
            protocol::PROTOCOL_MAJOR,
            protocol::OLDEST_AGENT_MINOR,
            protocol::PROTOCOL_MAJOR,
            protocol::OLDEST_AGENT_MINOR
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
    if super::MemberLines::one_by_one(&members, true, &coord) {
        info!(
            hostname = %hello.host.hostname,
            cpus = hello.host.cpus,
            memory_total_bytes = hello.host.memory_total_bytes,
            work_dir_free_bytes = hello.host.work_dir_free_bytes,
            agent_version = %hello.agent_version,
            "agent joined"
        );
    }
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
                control_loop(&coord, &conn, &agent_id, serial, &mut send, recv, &mut outbox_rx, &shutdown)
                    .await;
            streams.abort();
            reason
        }
    };
    if coord.leave(&agent_id, serial) && super::MemberLines::one_by_one(&members, false, &coord) {
        info!(reason = %reason, "agent left");
    }
}

/// Reads control messages until the agent leaves or goes silent; returns why it ended.
#[allow(clippy::too_many_arguments)]
pub(super) async fn control_loop(
    coord: &Hub,
    conn: &quinn::Connection,
    agent_id: &str,
    serial: u64,
    send: &mut quinn::SendStream,
    recv: quinn::RecvStream,
    outbox: &mut mpsc::Receiver<CoordinatorToAgent>,
    shutdown: &CancellationToken,
) -> String {
    let allowed = coord.config().heartbeat_interval * coord.config().heartbeats_missed.max(1);
    // Frames arrive through their own task: reading a frame is not cancel-safe, and the
    // select below must be free to send to the agent while one is half read.
    let mut frames = FrameReader::spawn(recv);
    // A stall of this process is not the agent's silence (`transport::silence`).
    let mut silence = Silence::new(allowed, tokio::time::Instant::now());
    loop {
        let msg = tokio::select! {
            Some(out) = outbox.recv() => {
                // What else is queued (an acknowledgement and the next step) goes in the
                // same write.
                if let Err(e) = framed::write_batch(send, &out, || outbox.try_recv().ok().map(Some)).await {
                    return format!("could not send to agent: {e}");
                }
                continue;
            }
            _ = shutdown.cancelled() => {
                // Acknowledgements queued by a run that recorded its last results go out first:
                // an agent keeps an unacknowledged result (a draining one waits for it).
                while let Ok(out) = outbox.try_recv() {
                    if matches!(out, CoordinatorToAgent::StepResultAck { .. }) {
                        let _ = framed::write_frame(send, &out).await;
                    }
                }
                let bye = CoordinatorToAgent::GoingAway { reason: "coordinator shutting down".into() };
                let _ = framed::write_frame(send, &bye).await;
                let _ = send.finish();
                // Closing drops what the peer has not acknowledged yet: give the stream a moment
                // to be read to its end (the server closes whatever is left after 500 ms).
                let _ = tokio::time::timeout(std::time::Duration::from_millis(400), send.stopped()).await;
                conn.close(close_code(CloseCode::GoingAway), b"coordinator shutting down");
                return "coordinator shutting down".into();
            }
            _ = tokio::time::sleep_until(silence.deadline()) => {
                if silence.check(tokio::time::Instant::now()) == Verdict::Alive {
                    continue;
                }
                None
            }
            frame = frames.rx.recv() => Some(frame.unwrap_or(Ok(None))),
        };
        silence.heard(tokio::time::Instant::now());
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
                // A result is acknowledged once recorded: by the run that awaited it, after its
                // database write (`Hub::ack_result`), or here when nobody will want it.
                if coord.deliver(agent_id, outcome) == Delivered::Done
                    && let Err(e) =
                        framed::write_frame(send, &CoordinatorToAgent::StepResultAck { attempt_id }).await
                {
                    return format!("could not acknowledge a result: {e}");
                }
            }
            Some(Ok(Some(AgentToCoordinator::StepUsage { attempt_id, mut usage }))) => {
                // Free text from a peer goes into logs, events and the database: only the
                // known ways of measuring pass.
                if !["cgroup v2", "cgroup v1", "procfs"].contains(&usage.measured_by.as_str()) {
                    usage.measured_by = "unknown".into();
                }
                coord.route(agent_id, attempt_id, StepEvent::Usage(usage));
            }
            Some(Ok(Some(AgentToCoordinator::Stats(stats)))) => {
                coord.agent_stats(agent_id, stats);
            }
            Some(Ok(Some(AgentToCoordinator::InHand { attempts }))) if attempts.len() > MAX_IN_HAND => {
                let reason = format!(
                    "InHand lists {} attempts, more than the {MAX_IN_HAND} an agent may hold",
                    attempts.len()
                );
                warn!(reason = %reason, "closing agent connection");
                conn.close(close_code(CloseCode::ProtocolViolation), reason.as_bytes());
                return reason;
            }
            Some(Ok(Some(AgentToCoordinator::InHand { attempts }))) => {
                tracing::debug!(attempts = ?attempts, "attempts the agent holds");
                coord.in_hand(agent_id, serial, attempts);
            }
            Some(Ok(Some(AgentToCoordinator::Draining { reason }))) => {
                coord.draining(agent_id, serial);
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
