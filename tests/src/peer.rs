//! Hand-made agents for hostile-peer tests: a raw QUIC connection with any identity and ALPN,
//! a `Hello` of any version, and the reason the coordinator closed it.

use std::net::SocketAddr;
use std::time::Duration;

/// Connects to `addr` as a raw QUIC client with the given identity and ALPN.
pub async fn connect(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<&transport::pki::CertKey>,
    alpn: &[u8],
) -> anyhow::Result<quinn::Connection> {
    use transport::{endpoint, pki};
    let tuning = endpoint::Tuning::default();
    let ep = endpoint::client(addr, &tuning)?;
    let tls = pki::client_tls(ca_pem, client, alpn)?;
    let conn = ep.connect_with(endpoint::client_config(tls, &tuning)?, addr, "127.0.0.1")?.await?;
    Ok(conn)
}

/// The first message of a hand-made agent: `agent_id` speaking protocol `major`.
pub fn hello(agent_id: &str, major: u32) -> protocol::AgentToCoordinator {
    hello_minor(agent_id, major, protocol::PROTOCOL_MINOR)
}

/// A `Hello` claiming protocol `major.minor`.
pub fn hello_minor(agent_id: &str, major: u32, minor: u32) -> protocol::AgentToCoordinator {
    protocol::AgentToCoordinator::Hello(protocol::Hello {
        protocol_major: major,
        protocol_minor: minor,
        agent_version: "test".into(),
        agent_id: agent_id.into(),
        host: protocol::HostFacts::default(),
        labels: vec![],
        slots: 1,
        instance_id: None,
    })
}

/// Waits for `conn` to be closed by the peer and returns the close reason as text.
pub async fn closed_reason(conn: &quinn::Connection, timeout: Duration) -> String {
    match tokio::time::timeout(timeout, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            format!("code {}: {}", c.error_code, String::from_utf8_lossy(&c.reason))
        }
        Ok(other) => other.to_string(),
        Err(_) => "still open".to_string(),
    }
}

/// Heartbeats on `send` every 50 ms, so the hand-made agent stays connected.
pub fn keep_alive(mut send: quinn::SendStream) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for seq in 1.. {
            let hb = protocol::AgentToCoordinator::Heartbeat(protocol::Heartbeat {
                seq,
                memory_available_bytes: 1 << 30,
                work_dir_free_bytes: 1 << 30,
                load_average: 0.0,
            });
            if transport::framed::write_frame(&mut send, &hb).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}
