//! Enrollment: a one-time token and a CSR in, a signed client certificate out (the only
//! connection served without a client certificate).

use std::time::Duration;

use anyhow::anyhow;
use protocol::{CloseCode, EnrollRequest, EnrollResponse, ErrorCode, RemoteError};
use tracing::{info, warn};
use transport::{framed, pki};

use crate::hub::Hub;

use super::{FIRST_MESSAGE_TIMEOUT, close_code};

pub(super) async fn handle_enroll(coord: &Hub, conn: &quinn::Connection) {
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
