//! QUIC endpoints tuned for bulk transfer. This is the only module that configures quinn.
//!
//! Defaults of quinn 0.11 cap throughput at any real RTT (1.25 MB stream receive window,
//! 10 MB send window) and Linux's default UDP buffers (208 KiB) drop packets at speed, so the
//! windows are raised and the socket buffers enlarged before the socket is handed to quinn.
//! The buffers (64 MiB) exceed the connection window (24 MiB) plus the kernel's per-datagram
//! overhead, so for one busy connection flow control, not a full buffer, bounds what is in
//! flight: on loopback a drop is the only loss, and each one costs a congestion event. Many
//! connections sending at once share the coordinator's one socket and can still fill it.
//! quinn's cost is per packet, so the packet size matters most: MTU discovery searches up to
//! the largest UDP payload (loopback and jumbo-frame LANs carry far more than Ethernet's 1452
//! bytes; on a 1500-byte path the search settles there), and both endpoints accept such
//! datagrams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

/// Flow-control and timing settings of every pype connection.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub stream_receive_window: u64,
    pub connection_receive_window: u64,
    pub send_window: u64,
    pub socket_buffer_bytes: usize,
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    /// Upper bound of MTU discovery, and the largest UDP payload accepted from peers.
    pub max_udp_payload: u16,
}

/// The largest UDP payload (IPv6; quinn's own maximum).
pub const MAX_UDP_PAYLOAD: u16 = 65_527;

impl Default for Tuning {
    fn default() -> Self {
        Self {
            stream_receive_window: 12 * 1024 * 1024,
            connection_receive_window: 24 * 1024 * 1024,
            send_window: 24 * 1024 * 1024,
            socket_buffer_bytes: 64 * 1024 * 1024,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            max_udp_payload: MAX_UDP_PAYLOAD,
        }
    }
}

fn transport_config(t: &Tuning) -> Arc<quinn::TransportConfig> {
    let mut cfg = quinn::TransportConfig::default();
    let varint = |v: u64| quinn::VarInt::from_u64(v).unwrap_or(quinn::VarInt::MAX);
    cfg.stream_receive_window(varint(t.stream_receive_window))
        .receive_window(varint(t.connection_receive_window))
        .send_window(t.send_window)
        .max_concurrent_bidi_streams(varint(256))
        .max_concurrent_uni_streams(varint(16))
        .keep_alive_interval(Some(t.keep_alive));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(t.max_udp_payload);
    cfg.mtu_discovery_config(Some(mtu));
    if let Ok(idle) = quinn::IdleTimeout::try_from(t.idle_timeout) {
        cfg.max_idle_timeout(Some(idle));
    }
    Arc::new(cfg)
}

/// Binds a UDP socket with enlarged buffers. As root, `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` pass
/// the `net.core.rmem_max` cap; otherwise the kernel clamps and the effective sizes are logged.
pub fn bind_socket(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .context("creating UDP socket")?;
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    force_buffer(&socket, buffer);
    socket.bind(&addr.into()).with_context(|| format!("binding UDP {addr}"))?;
    let (recv, send) = (socket.recv_buffer_size().unwrap_or(0), socket.send_buffer_size().unwrap_or(0));
    tracing::debug!(recv_buffer = recv, send_buffer = send, "UDP socket bound");
    if recv < buffer {
        // Once per process: an agent binds a socket per connection attempt.
        static CLAMPED: std::sync::Once = std::sync::Once::new();
        CLAMPED.call_once(|| {
            tracing::warn!(
                wanted = buffer,
                got = recv,
                "UDP receive buffer clamped by net.core.rmem_max (not root): fast transfers may drop \
                 packets; raise net.core.rmem_max and net.core.wmem_max to at least {buffer}"
            )
        });
    }
    Ok(socket.into())
}

fn force_buffer(socket: &socket2::Socket, buffer: usize) {
    use rustix::net::sockopt;
    if socket.recv_buffer_size().unwrap_or(0) >= buffer {
        return;
    }
    // Refused unless root (CAP_NET_ADMIN): the sizes set above stand, and are logged.
    let _ = sockopt::set_socket_recv_buffer_size_force(socket, buffer);
    let _ = sockopt::set_socket_send_buffer_size_force(socket, buffer);
}

fn endpoint_config(t: &Tuning) -> quinn::EndpointConfig {
    let mut cfg = quinn::EndpointConfig::default();
    // Out of range only below 1200: keep quinn's default then.
    let _ = cfg.max_udp_payload_size(t.max_udp_payload);
    cfg
}

/// The secret a server's stateless-reset tokens are derived from (BLAKE3 in keyed mode).
struct ResetKey([u8; 32]);

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mac = blake3::keyed_hash(&self.0, data);
        let n = signature_out.len().min(blake3::OUT_LEN);
        signature_out[..n].copy_from_slice(&mac.as_bytes()[..n]);
    }

    fn signature_len(&self) -> usize {
        blake3::OUT_LEN
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let given: [u8; blake3::OUT_LEN] = signature.try_into().map_err(|_| quinn::crypto::CryptoError)?;
        // `blake3::Hash`'s equality takes the same time whatever the bytes.
        if blake3::keyed_hash(&self.0, data) == blake3::Hash::from_bytes(given) {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

/// A server endpoint (the coordinator) that also opens no outgoing connections.
///
/// `reset_key` is the secret its stateless resets are derived from. A server that keeps it
/// across restarts resets its predecessor's connections as soon as their peers send to it
/// (an agent's next heartbeat), so agents of a killed coordinator reconnect within one
/// heartbeat instead of after their silence timeout. Resets are rate-limited to one per
/// 500 µs, each smaller than the packet that caused it.
pub fn server(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    tuning: &Tuning,
    reset_key: [u8; 32],
) -> Result<quinn::Endpoint> {
    let crypto = QuicServerConfig::try_from(tls).context("TLS config unusable for QUIC")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport_config(tuning));
    let socket = bind_socket(addr, tuning.socket_buffer_bytes)?;
    let mut cfg = quinn::EndpointConfig::new(Arc::new(ResetKey(reset_key)));
    // Connection ids carry a check keyed by the same secret: a restarted server recognises its
    // predecessor's ids as its own kind (quinn resets only ids that pass the check).
    let cid_key = u64::from_le_bytes(
        blake3::derive_key("pype 2026-12 connection id key", &reset_key)[..8].try_into().unwrap_or([0; 8]),
    );
    cfg.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    let _ = cfg.max_udp_payload_size(tuning.max_udp_payload);
    cfg.min_reset_interval(std::time::Duration::from_micros(500));
    quinn::Endpoint::new(cfg, Some(server), socket, Arc::new(quinn::TokioRuntime))
        .context("starting QUIC endpoint")
}

/// A client endpoint bound to an ephemeral port of the right address family.
pub fn client(remote: SocketAddr, tuning: &Tuning) -> Result<quinn::Endpoint> {
    let local: SocketAddr =
        if remote.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().context("local address")?;
    let socket = bind_socket(local, tuning.socket_buffer_bytes)?;
    quinn::Endpoint::new(endpoint_config(tuning), None, socket, Arc::new(quinn::TokioRuntime))
        .context("starting QUIC endpoint")
}

/// Client configuration for one connection.
pub fn client_config(tls: rustls::ClientConfig, tuning: &Tuning) -> Result<quinn::ClientConfig> {
    let crypto = QuicClientConfig::try_from(tls).context("TLS config unusable for QUIC")?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport_config(tuning));
    Ok(cfg)
}

/// The TLS identity (certificate DER) the peer presented on `conn`, if any.
pub fn peer_certificate(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| c.as_ref().to_vec())
}

/// The ALPN protocol negotiated on `conn`.
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let data = conn.handshake_data()?;
    let data = data.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?;
    data.protocol
}

/// TLS alert `no_application_protocol` (120): the peers share no ALPN, i.e. no protocol major.
pub fn is_alpn_mismatch(err: &quinn::ConnectionError) -> bool {
    matches!(err, quinn::ConnectionError::TransportError(te) if te.code == quinn::TransportErrorCode::crypto(120))
        || matches!(err, quinn::ConnectionError::ConnectionClosed(cc) if cc.error_code == quinn::TransportErrorCode::crypto(120))
}
