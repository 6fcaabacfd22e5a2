//! Everything that moves bytes between coordinator and agent: QUIC endpoints with mutual TLS
//! ([`endpoint`], [`pki`]), framed control messages ([`framed`]) and tar streams ([`tree`],
//! [`bulk`]). The coordinator and the agent both build on it; neither names quinn's
//! configuration, rcgen or tar directly.

pub mod archive;
pub mod blobwire;
pub mod bulk;
pub mod cas;
pub mod cli;
pub mod endpoint;
pub mod framed;
pub mod fsafe;
pub mod httpd;
pub mod links;
pub mod pack;
pub mod pki;
pub mod reuse;
pub mod silence;
pub mod spool;
pub mod telemetry;
pub mod tree;

pub use bulk::{BulkError, recv_tree, send_tree};
pub use framed::{FrameError, read_frame, write_frame};
pub use tree::{TreeError, UnpackLimits};
