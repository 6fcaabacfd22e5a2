//! Blob records and raw byte runs on a stream: the content-addressed transfers' wire half
//! (see `protocol::SnapshotRequest::Manifest` and `StoreManifest`). Reading and writing only:
//! hashing, compression and disk IO stay on blocking threads ([`crate::cas`]).

use protocol::{BLOB_HEADER_LEN, BlobHeader};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::cas::{self, Chunk};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("stream ended inside {0}")]
    Truncated(&'static str),
    #[error("{0}")]
    Refused(String),
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

fn eof(what: &'static str) -> impl Fn(std::io::Error) -> WireError {
    move |e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireError::Truncated(what),
        _ => WireError::Io(e),
    }
}

/// Reads exactly `len` bytes, refusing a length over `max` before allocating.
pub async fn read_bytes<R: AsyncRead + Unpin>(r: &mut R, len: u64, max: u64) -> Result<Vec<u8>, WireError> {
    if len > max {
        return Err(WireError::Refused(format!("{len} bytes announced, at most {max} accepted")));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await.map_err(eof("a manifest"))?;
    Ok(buf)
}

/// Writes one blob record.
pub async fn write_blob<W: AsyncWrite + Unpin>(
    w: &mut W,
    c: &Chunk,
    encoding: u8,
    payload: &[u8],
) -> Result<(), WireError> {
    let payload_len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= protocol::bulk::MAX_BLOB_PAYLOAD)
        .ok_or_else(|| WireError::Refused(format!("a blob payload of {} bytes", payload.len())))?;
    let h = BlobHeader { digest: c.digest, encoding, len: c.len, payload_len };
    w.write_all(&h.encode()).await?;
    w.write_all(payload).await?;
    Ok(())
}

pub async fn write_end<W: AsyncWrite + Unpin>(w: &mut W) -> Result<(), WireError> {
    w.write_all(&BlobHeader::END.encode()).await?;
    Ok(())
}

/// One received blob record, not yet verified.
pub struct Received {
    pub chunk: Chunk,
    pub encoding: u8,
    pub payload: Vec<u8>,
}

/// Reads the next blob record; `None` at the end record. A header announcing more than a
/// blob may hold is refused before its payload is read.
pub async fn read_blob<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Received>, WireError> {
    let mut raw = [0u8; BLOB_HEADER_LEN];
    r.read_exact(&mut raw).await.map_err(eof("a blob header"))?;
    let h = BlobHeader::decode(&raw).ok_or_else(|| WireError::Refused("a malformed blob header".into()))?;
    if h.is_end() {
        return Ok(None);
    }
    if h.len == 0 || h.len > cas::MAX_BLOB {
        return Err(WireError::Refused(format!("a blob of {} bytes", h.len)));
    }
    let mut payload = vec![0u8; h.payload_len as usize];
    r.read_exact(&mut payload).await.map_err(eof("a blob"))?;
    Ok(Some(Received { chunk: Chunk { digest: h.digest, len: h.len }, encoding: h.encoding, payload }))
}
