//! The operator's client: one admin request to a running coordinator over QUIC, with the
//! admin identity from the state dir.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use protocol::{AdminRequest, AdminResponse};
use transport::{endpoint, framed, pki};

use crate::persist::ADDR_FILE;

/// How long an operator request waits for the coordinator's handshake.
const ADMIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a finished request waits for its CONNECTION_CLOSE to leave.
const CLOSE_GRACE: Duration = Duration::from_millis(10);

pub fn unexpected(resp: AdminResponse) -> anyhow::Error {
    match resp {
        AdminResponse::Error(e) => anyhow!("{}", e.message),
        other => anyhow!("unexpected answer from coordinator: {other:?}"),
    }
}

/// Sends one operator request to the running coordinator with the admin identity.
pub async fn admin(dir: &Path, addr: Option<SocketAddr>, req: AdminRequest) -> Result<AdminResponse> {
    admin_stream(dir, addr, req, |_| {}).await
}

/// Like [`admin`], for requests answered with progress frames before the last one:
/// `progress` sees every `StepStarted`/`StepOutput`, the final frame is returned.
pub async fn admin_stream(
    dir: &Path,
    addr: Option<SocketAddr>,
    req: AdminRequest,
    mut progress: impl FnMut(AdminResponse),
) -> Result<AdminResponse> {
    let addr = match addr {
        Some(a) => a,
        None => {
            let path = dir.join(ADDR_FILE);
            std::fs::read_to_string(&path)
                .with_context(|| {
                    format!("reading {} (is `pype-coordinator serve` running?)", path.display())
                })?
                .trim()
                .parse()
                .with_context(|| format!("parsing {}", path.display()))?
        }
    };
    let ca = std::fs::read_to_string(dir.join("ca.pem")).context("reading ca.pem from the state dir")?;
    let admin = pki::CertKey::load(dir, "admin")?
        .ok_or_else(|| anyhow!("no admin certificate in {}", dir.display()))?;
    let tuning = endpoint::Tuning::default();
    let tls = pki::client_tls(&ca, Some(&admin), protocol::ALPN_ADMIN)?;
    let ep = endpoint::client(addr, &tuning)?;
    let connecting = ep.connect_with(endpoint::client_config(tls, &tuning)?, addr, "localhost")?;
    let conn = tokio::time::timeout(ADMIN_CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("no answer within {ADMIN_CONNECT_TIMEOUT:?} (is it running?)"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("connecting to coordinator at {addr}"))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    framed::write_frame(&mut send, &req).await?;
    send.finish()?;
    let resp = loop {
        let frame = framed::read_frame::<AdminResponse, _>(&mut recv)
            .await?
            .ok_or_else(|| anyhow!("coordinator closed the request without an answer"))?;
        match frame {
            AdminResponse::StepStarted { .. } | AdminResponse::StepOutput(_) | AdminResponse::RunEvent(_) => {
                progress(frame)
            }
            last => break last,
        }
    };
    conn.close(quinn::VarInt::from_u32(0), b"done");
    // The close goes out on the endpoint's next poll; the rest of the draining period (three
    // probe timeouts, about 80 ms on loopback) only answers a peer that missed it, which then
    // times out on its own. Every command would pay it.
    let _ = tokio::time::timeout(CLOSE_GRACE, ep.wait_idle()).await;
    Ok(resp)
}
