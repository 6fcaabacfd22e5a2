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
/// Largest payload any frame may carry.
pub const MAX_FRAME_LEN: usize = 8 * 1024 * 1024;

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

/// Encodes `msg` as one frame (header plus payload).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let payload = options(MAX_FRAME_LEN).serialize(msg).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(CodecError::TooLarge { len: payload.len(), max: MAX_FRAME_LEN });
    }
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Reads the payload length from a frame header, refusing lengths over `max`
/// (at most [`MAX_FRAME_LEN`]).
pub fn payload_len(header: [u8; FRAME_HEADER_LEN], max: usize) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    let max = max.min(MAX_FRAME_LEN);
    if len == 0 {
        return Err(CodecError::Empty);
    }
    if len > max {
        return Err(CodecError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes one payload (without its header). Trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(CodecError::TooLarge { len: payload.len(), max: MAX_FRAME_LEN });
    }
    options(payload.len()).deserialize(payload).map_err(|e| CodecError::Malformed(e.to_string()))
}

/// Decodes a whole frame held in memory (header plus payload).
pub fn decode_frame<T: DeserializeOwned>(frame: &[u8]) -> Result<T, CodecError> {
    let Some((header, payload)) = frame.split_first_chunk::<FRAME_HEADER_LEN>() else {
        return Err(CodecError::Malformed("frame shorter than its header".into()));
    };
    let len = payload_len(*header, MAX_FRAME_LEN)?;
    if payload.len() != len {
        return Err(CodecError::Malformed(format!(
            "frame says {len} payload bytes, holds {}",
            payload.len()
        )));
    }
    decode(payload)
}
