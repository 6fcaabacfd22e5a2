//! The coordinator's QUIC server: enrollment, agent control streams, operator requests.
//!
//! Every incoming connection is sorted by ALPN. Enrollment connections are the only ones
//! accepted without a client certificate. Agent and admin connections are checked before any
//! stream is read: a certificate must be present, known to the state database, not revoked
//! and of the right role; each refusal is one log line and the connection is closed with a
//! [`CloseCode`] and reason. Nothing a peer sends can stop the accept loop.

mod admin;
mod agent;
mod cas;
mod enroll;
mod snapshots;

pub use admin::{pull, push};

use admin::handle_admin;
use agent::handle_agent;
use enroll::handle_enroll;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::CloseCode;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};
use transport::pki;

use crate::hub::Hub;
use crate::lograte::{Burst, LeftOut, LogRate, MEMBER_LINES, Verdict, member_burst};
use crate::persist::state::Role;

/// Time a peer has to open its first stream and send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// A peer refused at the TLS handshake is logged once per address and reason in this window.
const HANDSHAKE_LOG_WINDOW: Duration = Duration::from_secs(60);

/// The log lines of agents joining and leaving (see [`crate::lograte::MEMBER_LINES`]).
pub(super) struct MemberLines {
    joined: Burst,
    left: Burst,
}

pub(super) type Members = Arc<Mutex<MemberLines>>;

impl MemberLines {
    fn new() -> Self {
        Self { joined: member_burst(), left: member_burst() }
    }

    /// Whether an agent that joins (`joined`) or leaves now is logged on a line of its own;
    /// what an earlier window left out is logged first.
    pub(super) fn one_by_one(members: &Members, joined: bool, coord: &Hub) -> bool {
        let now = Instant::now();
        let (one, ended) = {
            let mut m = members.lock().unwrap_or_else(|p| p.into_inner());
            if joined { m.joined.event(now) } else { m.left.event(now) }
        };
        if let Some(l) = ended {
            say_left_out(if joined { "joined" } else { "left" }, l, coord.agent_count());
        }
        one
    }
}

fn say_left_out(kind: &str, l: LeftOut, connected: usize) {
    // Not in the span of the agent whose join happened to end the window.
    info!(
        parent: None,
        agents = l.count,
        connected,
        "{} more agents {kind} in the last {} s (past {MEMBER_LINES}, not logged one by one)",
        l.count,
        l.over.as_secs().max(1)
    );
}

/// Says what the member windows left out once they end, without waiting for the next join.
async fn member_lines_watch(coord: Arc<Hub>, members: Members, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let now = Instant::now();
        let (joined, left) = {
            let mut m = members.lock().unwrap_or_else(|p| p.into_inner());
            (m.joined.poll(now), m.left.poll(now))
        };
        for (kind, l) in [("joined", joined), ("left", left)] {
            if let Some(l) = l {
                say_left_out(kind, l, coord.agent_count());
            }
        }
    }
}

/// Serves until `shutdown` is cancelled, then tells every agent it is going away.
pub async fn run(endpoint: quinn::Endpoint, coord: Arc<Hub>, shutdown: CancellationToken) {
    let mut tasks = JoinSet::new();
    tasks.spawn(revocation_watch(coord.clone(), shutdown.clone()));
    let members: Members = Arc::new(Mutex::new(MemberLines::new()));
    tasks.spawn(member_lines_watch(coord.clone(), members.clone(), shutdown.clone()));
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
        let members = members.clone();
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
            handle_connection(coord, conn, shutdown, members).await;
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

async fn handle_connection(
    coord: Arc<Hub>,
    conn: quinn::Connection,
    shutdown: CancellationToken,
    members: Members,
) {
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
            handle_agent(coord, conn, record.agent_id, shutdown, members).instrument(span).await
        }
        Role::Admin => handle_admin(coord, conn).await,
    }
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
