//! Operator requests on `pype-admin/1`: agents, drain, push/pull, steps and runs submitted
//! to this coordinator, output checks, cancels.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use protocol::{
    AdminRequest, AdminResponse, BulkReply, BulkRequest, DataHeader, ErrorCode, RemoteError, StepSpec,
    TransferSummary,
};
use tokio::sync::mpsc;
use tracing::{info, warn};
use transport::framed;

use crate::hub::away::Away;
use crate::hub::{Hub, StepEvent};

pub(super) async fn handle_admin(coord: Arc<Hub>, conn: quinn::Connection) {
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

pub(super) async fn admin_request(coord: &Hub, req: AdminRequest) -> AdminResponse {
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
            // The registry is read and parsed there too.
            return match tokio::task::spawn_blocking(move || {
                let reg = runs.registry()?;
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
pub(super) async fn admin_submit(
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
pub(super) async fn admin_run_step(
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
    // An agent that vanishes with the attempt (killed, its host gone) is lost after the
    // heartbeat window, as in a run; a reconnect within it keeps the attempt.
    let mut away = Away::new(coord.heartbeat_window());
    loop {
        let event = match coord.next_attempt_event(agent, &mut away, &mut events).await {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(reason) => {
                coord.forget_attempt(attempt_id);
                warn!(agent = %agent, attempt = attempt_id, "step lost with its agent: {reason}");
                return AdminResponse::Error(RemoteError {
                    code: ErrorCode::Internal,
                    message: format!("agent {agent} was lost with attempt {attempt_id}: {reason}"),
                });
            }
        };
        let frame = match event {
            StepEvent::Started { backend, view } => {
                info!(attempt = attempt_id, backend = %backend, view = %view, "step started");
                AdminResponse::StepStarted { backend, view }
            }
            StepEvent::Output(lines) => AdminResponse::StepOutput(lines),
            StepEvent::Usage(_) => continue,
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

pub(super) fn log_transfer(direction: &str, agent: &str, s: &TransferSummary) {
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
    let to_agent = if direction == "push" { "to_agent" } else { "from_agent" };
    crate::metrics::get().transfer(to_agent, s.content_bytes, s.wire_bytes, s.elapsed_ms as f64 / 1e3);
}

/// The connection's path as quinn sees it after a transfer (debug level): the datagram size
/// MTU discovery reached, losses and congestion events explain a slow transfer.
fn log_path(agent: &str, conn: &quinn::Connection) {
    let s = conn.stats();
    tracing::debug!(
        agent = %agent,
        mtu = s.path.current_mtu,
        rtt_us = s.path.rtt.as_micros() as u64,
        cwnd = s.path.cwnd,
        lost_packets = s.path.lost_packets,
        congestion_events = s.path.congestion_events,
        sent_packets = s.path.sent_packets,
        mtu_probes_sent = s.path.sent_plpmtud_probes,
        mtu_probes_lost = s.path.lost_plpmtud_probes,
        "connection path"
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
            log_path(agent, &conn);
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
