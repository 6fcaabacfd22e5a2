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

/// Most frames and bytes [`write_batch`] puts in one write.
pub const BATCH_FRAMES: usize = 64;
pub const BATCH_BYTES: usize = 256 * 1024;

/// Writes `first` and, in the same write, the messages `more` has ready at once (until it
/// returns `None`, [`BATCH_FRAMES`] or [`BATCH_BYTES`]): messages made together (a result
/// and its usage, an acknowledgement and the next step) leave in one QUIC packet instead of
/// one each, and the connection's task is woken once. `more` may skip a message by returning
/// `Some(None)`. A message over its type's limit is refused: what was batched before it is
/// written, then the error returned.
pub async fn write_batch<T: Frame, W: AsyncWrite + Unpin>(
    w: &mut W,
    first: &T,
    mut more: impl FnMut() -> Option<Option<T>>,
) -> Result<(), FrameError> {
    let mut buf = codec::encode(first)?;
    let mut frames = 1;
    let mut refused = None;
    while frames < BATCH_FRAMES && buf.len() < BATCH_BYTES {
        let Some(next) = more() else { break };
        let Some(msg) = next else { continue };
        match codec::encode(&msg) {
            Ok(frame) => buf.extend_from_slice(&frame),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
        frames += 1;
    }
    w.write_all(&buf).await?;
    match refused {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
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

#[cfg(test)]
mod tests {
    use protocol::CoordinatorToAgent;
    use protocol::codec::MAX_FRAME_LEN;

    use super::*;

    fn ack(seq: u64) -> CoordinatorToAgent {
        CoordinatorToAgent::HeartbeatAck { seq }
    }

    async fn read_all(mut bytes: &[u8]) -> Vec<CoordinatorToAgent> {
        let mut out = Vec::new();
        while let Some(m) = read_frame::<CoordinatorToAgent, _>(&mut bytes).await.unwrap() {
            out.push(m);
        }
        out
    }

    #[tokio::test]
    async fn a_batch_is_one_write_of_the_ready_frames_in_order_without_the_skipped() {
        let mut ready = vec![Some(ack(2)), None, Some(ack(4))].into_iter();
        let mut wire = Vec::new();
        write_batch(&mut wire, &ack(1), || ready.next()).await.unwrap();
        assert_eq!(read_all(&wire).await, vec![ack(1), ack(2), ack(4)]);
    }

    #[tokio::test]
    async fn a_batch_stops_at_its_frame_limit_and_leaves_the_rest_queued() {
        let mut queue = (2..1000).map(|s| Some(ack(s)));
        let mut wire = Vec::new();
        write_batch(&mut wire, &ack(1), || queue.next()).await.unwrap();
        assert_eq!(read_all(&wire).await.len(), BATCH_FRAMES);
        assert_eq!(queue.next(), Some(Some(ack(BATCH_FRAMES as u64 + 1))));
    }

    #[tokio::test]
    async fn an_oversized_message_is_refused_after_the_frames_before_it_are_written() {
        let huge = CoordinatorToAgent::GoingAway { reason: "x".repeat(MAX_FRAME_LEN + 1) };
        let mut ready = vec![Some(ack(2)), Some(huge), Some(ack(3))].into_iter();
        let mut wire = Vec::new();
        let err = write_batch(&mut wire, &ack(1), || ready.next()).await.unwrap_err();
        assert!(matches!(err, FrameError::Codec(CodecError::TooLarge { .. })), "{err}");
        assert_eq!(read_all(&wire).await, vec![ack(1), ack(2)]);
    }
}
