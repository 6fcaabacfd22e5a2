//! Wire protocol between `pype-coordinator` and `pype-agent`.
//!
//! Message flow on an agent connection (ALPN [`ALPN_AGENT`]):
//!
//! 1. the agent opens the first bidirectional stream, the *control stream*, and sends
//!    [`AgentToCoordinator::Hello`];
//! 2. the coordinator answers [`CoordinatorToAgent::Welcome`] or closes the connection
//!    with a [`CloseCode`] and a one-line reason;
//! 3. the agent sends [`AgentToCoordinator::Heartbeat`] every `heartbeat_interval_ms`, the
//!    coordinator answers each with [`CoordinatorToAgent::HeartbeatAck`];
//! 4. either side may send `GoingAway` before closing.
//!
//! Every bulk transfer runs on its own bidirectional stream: a [`BulkRequest`] frame, then
//! (when the request carries data) raw tar bytes and a fixed-size [`Trailer`]; the peer answers
//! with [`BulkReply`] frames (see [`bulk`]).
//!
//! Agents without a certificate enroll on a separate ALPN ([`ALPN_ENROLL`]): one
//! [`EnrollRequest`] with a token and a CSR, one [`EnrollResponse`]. Operators' commands use
//! [`ALPN_ADMIN`] with [`AdminRequest`] / [`AdminResponse`].
//!
//! This crate does no IO: it knows nothing of sockets, tokio or quinn.

pub mod bulk;
pub mod codec;
mod messages;
pub mod registry;
pub mod step;

pub use bulk::{BLOB_HEADER_LEN, BlobHeader, Compression, DataHeader, TRAILER_LEN, Trailer};
pub use codec::{CodecError, FRAME_HEADER_LEN, MAX_FRAME_LEN};
pub use messages::*;
pub use registry::{Registry, RegistryEntry};
pub use step::*;

/// Major protocol version: carried in the ALPN string; peers with different majors never talk.
pub const PROTOCOL_MAJOR: u32 = 1;
/// Minor protocol version: carried in `Hello`/`Welcome`; minors only add enum variants at the end.
pub const PROTOCOL_MINOR: u32 = 7;
/// The oldest agent minor a coordinator accepts: minor 5 moved snapshots to manifests and
/// blobs, which older agents cannot read.
pub const OLDEST_AGENT_MINOR: u32 = 5;

/// ALPN of agent connections (control stream plus bulk streams).
pub const ALPN_AGENT: &[u8] = b"pype/1";
/// ALPN of enrollment connections: the only connections accepted without a client certificate.
pub const ALPN_ENROLL: &[u8] = b"pype-enroll/1";
/// ALPN of operator (admin) connections: require the coordinator's admin certificate.
pub const ALPN_ADMIN: &[u8] = b"pype-admin/1";

/// Application close codes carried in QUIC `CONNECTION_CLOSE` frames, with a reason string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Orderly close.
    Normal = 0,
    /// Peers speak different protocol versions.
    VersionMismatch = 1,
    /// The peer sent something that is not a valid message at this point.
    ProtocolViolation = 2,
    /// Certificate unknown to the coordinator, revoked, or not allowed on this ALPN.
    Unauthorized = 3,
    /// The sender is shutting down (after `GoingAway`).
    GoingAway = 4,
    /// No heartbeat within the allowed time.
    HeartbeatTimeout = 5,
    /// A newer connection of the same agent replaced this one.
    Replaced = 6,
}

impl CloseCode {
    pub fn from_u32(code: u32) -> Option<Self> {
        Some(match code {
            0 => Self::Normal,
            1 => Self::VersionMismatch,
            2 => Self::ProtocolViolation,
            3 => Self::Unauthorized,
            4 => Self::GoingAway,
            5 => Self::HeartbeatTimeout,
            6 => Self::Replaced,
            _ => return None,
        })
    }
}
