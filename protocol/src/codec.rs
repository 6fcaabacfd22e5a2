//! Frame codec: a 4-byte big-endian payload length, then the bincode payload.
//!
//! This is the only module that names bincode, so the encoding can be replaced in one place.
//! Encoding: bincode 1.3 with fixed-width little-endian integers, enum variants as `u32`
//! indexes, strings and sequences prefixed by a `u64` length. Decoding is bounded: the length
//! prefix is checked against [`MAX_FRAME_LEN`] before any allocation, and bincode itself runs
//! with the same byte limit so a hostile inner length cannot allocate more.

use bincode::Options;
use serde::{Serialize, de::DeserializeOwned};

/// Length of the frame header (payload length, big-endian `u32`).
pub const FRAME_HEADER_LEN: usize = 4;
/// Largest payload of every frame but an operator's request.
pub const MAX_FRAME_LEN: usize = 8 * 1024 * 1024;
/// Largest operator request (an admin peer, with the admin certificate): a submitted pipeline
/// of 50,000 steps is about 9 MiB of JSON.
pub const MAX_ADMIN_REQUEST_LEN: usize = 64 * 1024 * 1024;
/// Largest payload any frame may carry.
const LARGEST_FRAME: usize = MAX_ADMIN_REQUEST_LEN;
/// Largest enrollment request or answer: read before the peer has a certificate.
pub const MAX_ENROLL_FRAME: usize = 64 * 1024;

/// A message type that travels in frames, with the largest payload of one.
pub trait Frame: Serialize + DeserializeOwned {
    const MAX_LEN: usize;
}

macro_rules! frames {
    ($($t:ty => $max:expr),* $(,)?) => {
        $(impl Frame for $t {
            const MAX_LEN: usize = $max;
        })*
        const _: () = { $(assert!($max <= LARGEST_FRAME);)* };
    };
}

frames! {
    crate::AgentToCoordinator => MAX_FRAME_LEN,
    crate::CoordinatorToAgent => MAX_FRAME_LEN,
    crate::EnrollRequest => MAX_ENROLL_FRAME,
    crate::EnrollResponse => MAX_ENROLL_FRAME,
    crate::AdminRequest => MAX_ADMIN_REQUEST_LEN,
    crate::AdminResponse => MAX_FRAME_LEN,
    crate::BulkRequest => MAX_FRAME_LEN,
    crate::BulkReply => MAX_FRAME_LEN,
    // The largest: `StoreParts` carries a direct upload's file index.
    crate::SnapshotRequest => MAX_FRAME_LEN,
    crate::SnapshotReply => MAX_FRAME_LEN,
}

/// Longest part ETag a direct upload may report (S3's are 34 characters).
pub const MAX_ETAG_LEN: usize = 128;

/// Payload bytes of a `StoreParts` frame for `parts` ETags of at most [`MAX_ETAG_LEN`] and an
/// index of `index_len` bytes: checked against [`Frame::MAX_LEN`] before an upload starts.
pub fn store_parts_len(parts: usize, index_len: usize) -> usize {
    // Variant index, two sequence lengths, each ETag's length and bytes.
    4 + 8 + parts.saturating_mul(8 + MAX_ETAG_LEN) + 8 + index_len
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("malformed message: {0}")]
    Malformed(String),
}

fn options(limit: usize) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(limit as u64)
        .reject_trailing_bytes()
}

/// Encodes `msg` as one frame (header plus payload), refusing one its receiver would refuse.
pub fn encode<T: Frame>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let payload = options(T::MAX_LEN).serialize(msg).map_err(|e| match *e {
        bincode::ErrorKind::SizeLimit => CodecError::TooLarge { len: T::MAX_LEN + 1, max: T::MAX_LEN },
        e => CodecError::Malformed(e.to_string()),
    })?;
    if payload.len() > T::MAX_LEN {
        return Err(CodecError::TooLarge { len: payload.len(), max: T::MAX_LEN });
    }
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Reads the payload length from a frame header, refusing lengths over `max` (at most
/// [`MAX_ADMIN_REQUEST_LEN`], the largest frame of any type).
pub fn payload_len(header: [u8; FRAME_HEADER_LEN], max: usize) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    let max = max.min(LARGEST_FRAME);
    if len == 0 {
        return Err(CodecError::Empty);
    }
    if len > max {
        return Err(CodecError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes one payload (without its header). Trailing bytes are an error.
pub fn decode<T: Frame>(payload: &[u8]) -> Result<T, CodecError> {
    if payload.len() > T::MAX_LEN {
        return Err(CodecError::TooLarge { len: payload.len(), max: T::MAX_LEN });
    }
    options(payload.len()).deserialize(payload).map_err(|e| CodecError::Malformed(e.to_string()))
}

/// Decodes a whole frame held in memory (header plus payload).
pub fn decode_frame<T: Frame>(frame: &[u8]) -> Result<T, CodecError> {
    let Some((header, payload)) = frame.split_first_chunk::<FRAME_HEADER_LEN>() else {
        return Err(CodecError::Malformed("frame shorter than its header".into()));
    };
    let len = payload_len(*header, T::MAX_LEN)?;
    if payload.len() != len {
        return Err(CodecError::Malformed(format!(
            "frame says {len} payload bytes, holds {}",
            payload.len()
        )));
    }
    decode(payload)
}
