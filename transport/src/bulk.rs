//! Trees over QUIC streams: tar (optionally zstd) bytes followed by a [`Trailer`].
//!
//! The tar work runs on a blocking thread and the stream's BLAKE3 on a thread of its own;
//! chunks of up to [`CHUNK`] bytes cross bounded channels to or from the QUIC stream, so memory
//! per transfer stays under about 16 MiB whatever the tree.
//! The sender does not write the header frame nor finish the stream: callers own the framing
//! around the raw bytes.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use protocol::{Compression, TRAILER_LEN, Trailer, TransferSummary};
use tokio::sync::mpsc;

use crate::tree::{self, Staging, TreeError, UnpackLimits};

/// Size of the chunks that cross between the tar thread and the QUIC stream.
pub const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the two: bounds the memory of one transfer.
const CHANNEL_DEPTH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("transfer corrupted: {0}")]
    Corrupt(String),
    #[error("stream error: {0}")]
    Stream(String),
    #[error("the peer stopped the transfer")]
    Cancelled,
}

impl BulkError {
    /// The wire error code that describes this failure to the peer.
    pub fn code(&self) -> protocol::ErrorCode {
        match self {
            BulkError::Tree(TreeError::Io { .. }) => protocol::ErrorCode::Io,
            BulkError::Tree(_) | BulkError::Corrupt(_) => protocol::ErrorCode::RefusedArchive,
            BulkError::Stream(_) | BulkError::Cancelled => protocol::ErrorCode::Io,
        }
    }
}

/// Writes to a channel in [`CHUNK`]-sized pieces, counting what passes.
struct ChannelWriter {
    tx: mpsc::Sender<Bytes>,
    buf: BytesMut,
    bytes: u64,
}

impl ChannelWriter {
    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.bytes += chunk.len() as u64;
        self.buf.reserve(CHUNK);
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "transfer stream closed"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.flush_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_chunk()
    }
}

/// Packs `src` and writes the raw bytes plus the trailer to `send`.
pub async fn send_tree(
    send: &mut quinn::SendStream,
    src: PathBuf,
    compression: Compression,
) -> Result<TransferSummary, BulkError> {
    send_packed(send, compression, move |w| tree::pack(&src, w)).await
}

/// Runs `pack` on a blocking thread, compressed as `compression`, and writes what it produces
/// plus the trailer to `send`, chunk by chunk through a bounded channel.
async fn send_packed(
    send: &mut quinn::SendStream,
    compression: Compression,
    pack: impl FnOnce(&mut dyn Write) -> Result<tree::TreeStats, TreeError> + Send + 'static,
) -> Result<TransferSummary, BulkError> {
    let started = Instant::now();
    let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    let (hash_tx, digest) = spawn_hasher()?;
    let packer = tokio::task::spawn_blocking(move || -> Result<(tree::TreeStats, u64), TreeError> {
        let mut w = ChannelWriter { tx, buf: BytesMut::with_capacity(CHUNK), bytes: 0 };
        let stats = match compression {
            Compression::None => pack(&mut w)?,
            Compression::Zstd { level } => {
                let mut enc = zstd::stream::write::Encoder::new(&mut w, level)
                    .map_err(|e| TreeError::Io { context: "starting zstd".into(), source: e })?;
                let stats = pack(&mut enc)?;
                enc.finish().map_err(|e| TreeError::Io { context: "finishing zstd".into(), source: e })?;
                stats
            }
        };
        w.flush().map_err(|e| TreeError::Io { context: "flushing stream".into(), source: e })?;
        Ok((stats, w.bytes))
    });
    let mut write_err = None;
    while let Some(chunk) = rx.recv().await {
        // The hasher outlives this loop; a send fails only if it panicked.
        let _ = hash_tx.send(chunk.clone()).await;
        if let Err(e) = send.write_chunk(chunk).await {
            write_err = Some(e);
            break;
        }
    }
    drop(rx);
    drop(hash_tx);
    let packed = packer.await.map_err(|e| BulkError::Stream(format!("packer task failed: {e}")))?;
    if let Some(e) = write_err {
        return Err(match e {
            quinn::WriteError::Stopped(_) => BulkError::Cancelled,
            other => BulkError::Stream(other.to_string()),
        });
    }
    let (stats, bytes) = match packed {
        Ok(v) => v,
        Err(e) => {
            // Tell the receiver the stream is bad rather than letting it look truncated.
            let _ = send.reset(quinn::VarInt::from_u32(1));
            return Err(e.into());
        }
    };
    let digest = digest.await.map_err(|_| BulkError::Stream("hasher task failed".into()))?;
    let trailer = Trailer { bytes, digest };
    send.write_all(&trailer.encode()).await.map_err(|e| BulkError::Stream(e.to_string()))?;
    Ok(TransferSummary {
        wire_bytes: trailer.bytes,
        content_bytes: stats.content_bytes,
        entries: stats.entries,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

enum Piece {
    Data(Bytes),
    End(Result<Trailer, String>),
}

/// The chunks received so far minus the last [`TRAILER_LEN`] bytes, which may be the trailer.
#[derive(Default)]
struct HeldBack {
    chunks: std::collections::VecDeque<Bytes>,
    len: usize,
}

impl HeldBack {
    /// Takes `chunk` and returns the chunks that can no longer hold any trailer byte.
    fn push(&mut self, chunk: Bytes) -> Vec<Bytes> {
        self.len += chunk.len();
        self.chunks.push_back(chunk);
        let mut ready = Vec::new();
        while let Some(front) = self.chunks.front() {
            if self.len - front.len() < TRAILER_LEN {
                break;
            }
            self.len -= front.len();
            ready.extend(self.chunks.pop_front());
        }
        ready
    }

    /// At the end of the stream: the data still held, and the last TRAILER_LEN bytes (`None`
    /// when the stream was shorter than a trailer).
    fn finish(self) -> (Bytes, Option<[u8; TRAILER_LEN]>) {
        let mut all = BytesMut::with_capacity(self.len);
        for c in self.chunks {
            all.extend_from_slice(&c);
        }
        if all.len() < TRAILER_LEN {
            return (Bytes::new(), None);
        }
        let tail = all.split_off(all.len() - TRAILER_LEN);
        let mut raw = [0u8; TRAILER_LEN];
        raw.copy_from_slice(&tail);
        (all.freeze(), Some(raw))
    }
}

/// Reads chunks from a channel, counting them; remembers the trailer. The digest is another
/// thread's work ([`spawn_hasher`]): hashing beside the unpacking, not before it, keeps the
/// two off each other's critical path.
struct ChannelReader {
    rx: mpsc::Receiver<Piece>,
    current: Bytes,
    bytes: u64,
    wire_limit: u64,
    end: Option<Result<Trailer, String>>,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.end.is_some() {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Piece::Data(b)) => {
                    self.bytes += b.len() as u64;
                    if self.bytes > self.wire_limit {
                        return Err(io::Error::other(format!(
                            "stream exceeds the limit of {} bytes",
                            self.wire_limit
                        )));
                    }
                    self.current = b;
                }
                Some(Piece::End(end)) => self.end = Some(end),
                None => self.end = Some(Err("transfer stream closed".into())),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

type Hasher = (mpsc::Sender<Bytes>, tokio::sync::oneshot::Receiver<[u8; 32]>);

/// A thread that hashes the chunks sent to it and, once the sender is dropped, answers with
/// their BLAKE3 digest. An OS thread of its own, not one of tokio's blocking pool: the tar
/// thread of the same transfer waits on it, and with both in the pool, a pool full of
/// hashers whose tar threads are still queued would wait forever.
fn spawn_hasher() -> Result<Hasher, BulkError> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    let (done, digest) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("pype-hash".into())
        .spawn(move || {
            let mut hasher = blake3::Hasher::new();
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
            }
            let _ = done.send(*hasher.finalize().as_bytes());
        })
        .map_err(|e| BulkError::Stream(format!("starting the hashing thread: {e}")))?;
    Ok((tx, digest))
}

/// Hands `data` to the hasher and then to the unpacker: both see the same pieces in order.
async fn forward(
    data: Bytes,
    hash_tx: &mpsc::Sender<Bytes>,
    tx: &mpsc::Sender<Piece>,
) -> Result<(), &'static str> {
    hash_tx.send(data.clone()).await.map_err(|_| "hasher stopped")?;
    tx.send(Piece::Data(data)).await.map_err(|_| "unpacker stopped")
}

/// Reads raw bytes plus trailer from `recv`, unpacks them into `dest` through a staging
/// directory, and commits only when the byte count and digest match the trailer.
pub async fn recv_tree(
    recv: &mut quinn::RecvStream,
    dest: PathBuf,
    compression: Compression,
    limits: UnpackLimits,
) -> Result<TransferSummary, BulkError> {
    let started = Instant::now();
    let (tx, rx) = mpsc::channel::<Piece>(CHANNEL_DEPTH);
    let (hash_tx, digest) = spawn_hasher()?;
    let unpacker = tokio::task::spawn_blocking(move || -> Result<TransferSummary, BulkError> {
        let staging = Staging::new(&dest)?;
        // The wire may carry a little more than the tar stream (compression framing).
        let wire_limit = limits.max_bytes.saturating_add(limits.max_bytes / 8 + (1 << 20));
        let mut reader = ChannelReader { rx, current: Bytes::new(), bytes: 0, wire_limit, end: None };
        let stats = match compression {
            Compression::None => tree::unpack(&mut reader, staging.path(), limits),
            Compression::Zstd { .. } => {
                let dec = zstd::stream::read::Decoder::new(&mut reader)
                    .map_err(|e| TreeError::Io { context: "starting zstd".into(), source: e })?;
                tree::unpack(dec, staging.path(), limits)
            }
        };
        // A refused entry ends the transfer now; dropping the reader stops the sender.
        let stats = stats?;
        // Read to the end so the digest covers everything the sender sent.
        let mut sink = [0u8; 64 * 1024];
        while reader.end.is_none() || !reader.current.is_empty() {
            match reader.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(BulkError::Corrupt(e.to_string())),
            }
        }
        let trailer = match reader.end.take() {
            Some(Ok(t)) => t,
            Some(Err(e)) => return Err(BulkError::Corrupt(e)),
            None => return Err(BulkError::Corrupt("stream ended without a trailer".into())),
        };
        if trailer.bytes != reader.bytes {
            return Err(BulkError::Corrupt(format!(
                "trailer says {} bytes, received {}",
                trailer.bytes, reader.bytes
            )));
        }
        // The hasher saw every piece the reader saw: the network loop sends each to both.
        let hashed = digest.blocking_recv().map_err(|_| BulkError::Stream("hasher stopped".into()))?;
        if trailer.digest != hashed {
            return Err(BulkError::Corrupt("BLAKE3 digest does not match".into()));
        }
        staging.commit()?;
        Ok(TransferSummary {
            wire_bytes: trailer.bytes,
            content_bytes: stats.content_bytes,
            entries: stats.entries,
            elapsed_ms: 0,
        })
    });

    // Feed chunks, always holding back the last TRAILER_LEN bytes: they may be the trailer.
    // Chunks pass through whole (no copy); only the held-back tail is ever joined.
    let mut held = HeldBack::default();
    let end: Result<Trailer, String> = loop {
        // An unpacker that refused the tree ends the transfer even if the sender stalls.
        let read = tokio::select! {
            read = recv.read_chunk(CHUNK, true) => read,
            _ = tx.closed() => break Err("unpacker stopped".into()),
        };
        match read {
            Ok(Some(chunk)) => {
                let mut stopped = None;
                for data in held.push(chunk.bytes) {
                    if let Err(why) = forward(data, &hash_tx, &tx).await {
                        stopped = Some(why);
                        break;
                    }
                }
                if let Some(why) = stopped {
                    break Err(why.into());
                }
            }
            Ok(None) => {
                let (data, tail) = held.finish();
                if !data.is_empty()
                    && let Err(why) = forward(data, &hash_tx, &tx).await
                {
                    break Err(why.into());
                }
                break match tail.and_then(|t| Trailer::decode(&t)) {
                    Some(t) => Ok(t),
                    None => Err("stream ended without a valid trailer".into()),
                };
            }
            Err(e) => break Err(format!("stream error: {e}")),
        }
    };
    let stream_failed = end.is_err();
    // No more data: the hasher finishes its digest while the unpacker drains.
    drop(hash_tx);
    let _ = tx.send(Piece::End(end)).await;
    drop(tx);
    let result = unpacker.await.map_err(|e| BulkError::Stream(format!("unpacker task failed: {e}")))?;
    if result.is_err() && !stream_failed {
        // Tell the sender to stop if it is still sending.
        let _ = recv.stop(quinn::VarInt::from_u32(1));
    }
    result.map(|mut s| {
        s.elapsed_ms = started.elapsed().as_millis() as u64;
        s
    })
}

/// Sends the stored stream at `path` verbatim, then its trailer. When `expected` names the
/// digest recorded at store time and the bytes read now differ (corruption at rest), the
/// stream is reset instead of trailed, so the receiver never commits it.
pub async fn send_file(
    send: &mut quinn::SendStream,
    path: &std::path::Path,
    expected: Option<[u8; 32]>,
) -> Result<u64, BulkError> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await.map_err(|e| {
        BulkError::Tree(TreeError::Io { context: format!("opening {}", path.display()), source: e })
    })?;
    let mut hasher = blake3::Hasher::new();
    let mut bytes = 0u64;
    loop {
        let mut buf = BytesMut::with_capacity(CHUNK);
        let n = file.read_buf(&mut buf).await.map_err(|e| {
            BulkError::Tree(TreeError::Io { context: format!("reading {}", path.display()), source: e })
        })?;
        if n == 0 {
            break;
        }
        let chunk = buf.freeze();
        hasher.update(&chunk);
        bytes += n as u64;
        send.write_chunk(chunk).await.map_err(|e| match e {
            quinn::WriteError::Stopped(_) => BulkError::Cancelled,
            other => BulkError::Stream(other.to_string()),
        })?;
    }
    let digest = *hasher.finalize().as_bytes();
    if let Some(want) = expected
        && want != digest
    {
        let _ = send.reset(quinn::VarInt::from_u32(1));
        return Err(BulkError::Corrupt(format!(
            "{} does not match its recorded BLAKE3 digest",
            path.display()
        )));
    }
    send.write_all(&Trailer { bytes, digest }.encode())
        .await
        .map_err(|e| BulkError::Stream(e.to_string()))?;
    Ok(bytes)
}

/// Receives raw bytes plus trailer from `recv` into the new file `path` (fsynced), checking
/// the byte count, the `max_bytes` limit and the digest. On any failure the file is removed.
pub async fn recv_file(
    recv: &mut quinn::RecvStream,
    path: &std::path::Path,
    max_bytes: u64,
) -> Result<Trailer, BulkError> {
    let result = recv_file_inner(recv, path, max_bytes).await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(path).await;
        let _ = recv.stop(quinn::VarInt::from_u32(1));
    }
    result
}

async fn recv_file_inner(
    recv: &mut quinn::RecvStream,
    path: &std::path::Path,
    max_bytes: u64,
) -> Result<Trailer, BulkError> {
    use tokio::io::AsyncWriteExt;
    let io_err = |context: String| move |e| BulkError::Tree(TreeError::Io { context, source: e });
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .map_err(io_err(format!("creating {}", path.display())))?;
    let mut hasher = blake3::Hasher::new();
    let mut bytes = 0u64;
    let mut tail = BytesMut::new();
    loop {
        match recv.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => {
                tail.extend_from_slice(&chunk.bytes);
                if tail.len() > TRAILER_LEN {
                    let data = tail.split_to(tail.len() - TRAILER_LEN);
                    bytes += data.len() as u64;
                    if bytes > max_bytes {
                        return Err(BulkError::Tree(TreeError::TooLarge { limit: max_bytes }));
                    }
                    hasher.update(&data);
                    file.write_all(&data).await.map_err(io_err(format!("writing {}", path.display())))?;
                }
            }
            Ok(None) => break,
            Err(e) => return Err(BulkError::Stream(format!("stream error: {e}"))),
        }
    }
    let raw: Option<&[u8; TRAILER_LEN]> = tail.as_ref().try_into().ok();
    let trailer = raw
        .and_then(Trailer::decode)
        .ok_or_else(|| BulkError::Corrupt("stream ended without a valid trailer".into()))?;
    if trailer.bytes != bytes {
        return Err(BulkError::Corrupt(format!("trailer says {} bytes, received {bytes}", trailer.bytes)));
    }
    if trailer.digest != *hasher.finalize().as_bytes() {
        return Err(BulkError::Corrupt("BLAKE3 digest does not match".into()));
    }
    file.flush().await.map_err(io_err(format!("writing {}", path.display())))?;
    file.sync_all().await.map_err(io_err(format!("syncing {}", path.display())))?;
    Ok(trailer)
}

/// Sends a selection of paths under `root` (see [`tree::pack_paths`]) as a zstd tar stream
/// plus trailer.
pub async fn send_paths(
    send: &mut quinn::SendStream,
    root: PathBuf,
    paths: Vec<PathBuf>,
    level: i32,
) -> Result<TransferSummary, BulkError> {
    send_packed(send, Compression::Zstd { level }, move |w| tree::pack_paths(&root, &paths, w)).await
}

/// Counts and hashes what passes through, refusing to read past `limit` bytes.
struct Verifying<R> {
    inner: R,
    hasher: blake3::Hasher,
    bytes: u64,
    limit: u64,
}

impl<R: Read> Read for Verifying<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.hasher.update(&out[..n]);
        self.bytes += n as u64;
        if self.bytes > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {} bytes", self.limit),
            ));
        }
        Ok(n)
    }
}

/// Unpacks raw bytes read from `input` (e.g. an HTTP body from an object store) into `dest`
/// through a staging directory, committing only when they are exactly `expected.bytes` long
/// and their BLAKE3 digest is `expected.digest`: the same guarantee as [`recv_tree`].
pub fn unpack_verified(
    input: impl Read,
    dest: &std::path::Path,
    compression: Compression,
    limits: UnpackLimits,
    expected: Trailer,
) -> Result<TransferSummary, BulkError> {
    let started = Instant::now();
    let staging = Staging::new(dest)?;
    let mut reader =
        Verifying { inner: input, hasher: blake3::Hasher::new(), bytes: 0, limit: expected.bytes };
    let stats = match compression {
        Compression::None => tree::unpack(&mut reader, staging.path(), limits),
        Compression::Zstd { .. } => {
            let dec = zstd::stream::read::Decoder::new(&mut reader)
                .map_err(|e| TreeError::Io { context: "starting zstd".into(), source: e })?;
            tree::unpack(dec, staging.path(), limits)
        }
    };
    // A digest mismatch explains a refused archive better than the archive error itself.
    let drain = io::copy(&mut reader, &mut io::sink());
    let digest_ok = reader.bytes == expected.bytes && *reader.hasher.finalize().as_bytes() == expected.digest;
    if let Err(e) = drain {
        return Err(BulkError::Stream(format!("reading the object: {e}")));
    }
    if reader.bytes != expected.bytes {
        return Err(BulkError::Corrupt(format!("expected {} bytes, read {}", expected.bytes, reader.bytes)));
    }
    if !digest_ok {
        return Err(BulkError::Corrupt("BLAKE3 digest does not match the stored digest".into()));
    }
    let stats = stats?;
    staging.commit()?;
    Ok(TransferSummary {
        wire_bytes: expected.bytes,
        content_bytes: stats.content_bytes,
        entries: stats.entries,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// However the stream is cut into chunks, the data passed on plus the data left at
        /// the end is the stream minus its last TRAILER_LEN bytes, and those are the tail.
        #[test]
        fn held_back_passes_everything_but_the_trailer(
            stream in proptest::collection::vec(any::<u8>(), 0..400),
            cuts in proptest::collection::vec(0usize..400, 0..12),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= stream.len()).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            let mut held = HeldBack::default();
            let mut passed = Vec::new();
            for w in cuts.windows(2) {
                for data in held.push(Bytes::copy_from_slice(&stream[w[0]..w[1]])) {
                    passed.extend_from_slice(&data);
                    // Nothing passed on may overlap the trailer.
                    prop_assert!(passed.len() + TRAILER_LEN <= stream.len());
                }
            }
            let (rest, tail) = held.finish();
            passed.extend_from_slice(&rest);
            if stream.len() < TRAILER_LEN {
                prop_assert!(tail.is_none());
            } else {
                let split = stream.len() - TRAILER_LEN;
                prop_assert_eq!(&passed[..], &stream[..split]);
                prop_assert_eq!(&tail.unwrap()[..], &stream[split..]);
            }
        }
    }
}
