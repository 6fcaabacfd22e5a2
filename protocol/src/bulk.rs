//! Bulk transfer framing.
//!
//! A bulk stream carries: one header frame ([`crate::BulkRequest`] or [`crate::BulkReply`]
//! holding a [`DataHeader`]), then raw tar bytes (zstd-compressed when the header says so),
//! then a fixed-size [`Trailer`] of [`TRAILER_LEN`] bytes, then the end of the stream.
//! The receiver keeps the last [`TRAILER_LEN`] bytes it has seen aside; when the stream ends
//! they are the trailer. It checks the byte count and the BLAKE3 digest of the raw bytes
//! (as sent on the wire, after compression) before it accepts anything.

use serde::{Deserialize, Serialize};

/// How the raw bytes of a bulk stream are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Compression {
    /// Plain tar.
    #[default]
    None,
    /// tar compressed with zstd at the given level.
    Zstd { level: i32 },
}

/// Describes the raw bytes that follow a header frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataHeader {
    /// Bytes of uncompressed content the sender expects to send, when it knows.
    pub expected_bytes: Option<u64>,
    pub compression: Compression,
}

/// Length of the encoded trailer.
pub const TRAILER_LEN: usize = 4 + 8 + 32;
const TRAILER_MAGIC: [u8; 4] = *b"PYTR";

/// End of a bulk stream: how many raw bytes were sent and their BLAKE3 digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub bytes: u64,
    pub digest: [u8; 32],
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut out = [0u8; TRAILER_LEN];
        out[..4].copy_from_slice(&TRAILER_MAGIC);
        out[4..12].copy_from_slice(&self.bytes.to_le_bytes());
        out[12..].copy_from_slice(&self.digest);
        out
    }

    /// Decodes a trailer; `None` when the magic is wrong (the stream was cut or is not ours).
    pub fn decode(raw: &[u8; TRAILER_LEN]) -> Option<Self> {
        if raw[..4] != TRAILER_MAGIC {
            return None;
        }
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&raw[4..12]);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&raw[12..]);
        Some(Self { bytes: u64::from_le_bytes(bytes), digest })
    }
}

/// Length of an encoded [`BlobHeader`].
pub const BLOB_HEADER_LEN: usize = 32 + 1 + 8 + 4;
/// Largest blob payload on the wire: a 4 MiB chunk and zstd's worst case.
pub const MAX_BLOB_PAYLOAD: u32 = (4 << 20) + (64 << 10);
const BLOB_END: u8 = 0xff;

/// Precedes each blob's payload in a content-addressed transfer: the blob's digest, how its
/// payload is encoded (0 raw, 1 zstd), its decoded length and the payload's length. An end
/// record ([`BlobHeader::END`]) closes the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobHeader {
    pub digest: [u8; 32],
    pub encoding: u8,
    pub len: u64,
    pub payload_len: u32,
}

impl BlobHeader {
    pub const END: Self = Self { digest: [0; 32], encoding: BLOB_END, len: 0, payload_len: 0 };

    pub fn is_end(&self) -> bool {
        self.encoding == BLOB_END
    }

    pub fn encode(&self) -> [u8; BLOB_HEADER_LEN] {
        let mut out = [0u8; BLOB_HEADER_LEN];
        out[..32].copy_from_slice(&self.digest);
        out[32] = self.encoding;
        out[33..41].copy_from_slice(&self.len.to_le_bytes());
        out[41..].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }

    /// Decodes a header; `None` when its payload would exceed [`MAX_BLOB_PAYLOAD`] or an end
    /// record carries anything.
    pub fn decode(raw: &[u8; BLOB_HEADER_LEN]) -> Option<Self> {
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&raw[..32]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&raw[33..41]);
        let mut payload_len = [0u8; 4];
        payload_len.copy_from_slice(&raw[41..]);
        let h = Self {
            digest,
            encoding: raw[32],
            len: u64::from_le_bytes(len),
            payload_len: u32::from_le_bytes(payload_len),
        };
        if h.payload_len > MAX_BLOB_PAYLOAD || (h.is_end() && h != Self::END) {
            return None;
        }
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailer_round_trip_and_bad_magic() {
        let t = Trailer { bytes: 123_456_789, digest: [7; 32] };
        let raw = t.encode();
        assert_eq!(Trailer::decode(&raw), Some(t));
        let mut bad = raw;
        bad[0] = b'X';
        assert_eq!(Trailer::decode(&bad), None);
    }

    #[test]
    fn blob_header_round_trip_and_limits() {
        let h = BlobHeader { digest: [3; 32], encoding: 1, len: 4 << 20, payload_len: 1234 };
        assert_eq!(BlobHeader::decode(&h.encode()), Some(h));
        assert_eq!(BlobHeader::decode(&BlobHeader::END.encode()), Some(BlobHeader::END));
        let big = BlobHeader { payload_len: MAX_BLOB_PAYLOAD + 1, ..h };
        assert_eq!(BlobHeader::decode(&big.encode()), None);
        let odd_end = BlobHeader { len: 1, ..BlobHeader::END };
        assert_eq!(BlobHeader::decode(&odd_end.encode()), None);
    }
}
