//! Length-prefixed frames over any async byte stream (QUIC streams in practice).

use protocol::codec::{self, CodecError, FRAME_HEADER_LEN, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes one frame; one over its type's limit is refused before anything is written.
pub async fn write_frame<T: Frame, W: AsyncWrite + Unpin>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let frame = codec::encode(msg)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame of at most its type's limit ([`Frame::MAX_LEN`]). `Ok(None)` when the
/// stream ended cleanly before a new frame began.
pub async fn read_frame<T: Frame, R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<T>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(FrameError::Truncated) };
        }
        got += n;
    }
    let len = codec::payload_len(header, T::MAX_LEN)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(Some(codec::decode(&payload)?))
}
