//! The receiving side's blob spool: blobs of transfers not committed yet, appended as blob
//! records (the wire's [`BlobHeader`] and the payload) to log files, so a transfer that breaks
//! resumes from what arrived, at the cost of one sequential append per blob instead of a file
//! per blob (creating and deleting a thousand files per GiB cost a sixth of a fetch's time in
//! ext4's inode allocator).
//!
//! A blob is appended only once it decoded to its digest and length; a read checks it again.
//! Opening a spool scans its logs and keeps every whole record that still matches its digest,
//! cutting a log at the first record that does not (a crash mid-append). A reader may wait for
//! a blob that is still on its way ([`Spool::wait_read`]), so a tree is unpacked while its
//! blobs arrive.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use protocol::{BLOB_HEADER_LEN, BlobHeader};

use crate::cas::{self, Chunk, ChunkSource, Digest};
use crate::tree::{TreeError, read_full};

/// A log is closed for appends once it holds this much.
const LOG_MAX: u64 = 256 << 20;

#[derive(Clone, Copy)]
struct At {
    log: u64,
    /// Where the payload starts.
    offset: u64,
    payload: u64,
    encoding: u8,
}

struct Log {
    file: File,
    len: u64,
    /// Blobs of this log not forgotten yet.
    live: u64,
}

#[derive(Default)]
struct State {
    index: HashMap<Digest, At>,
    logs: HashMap<u64, Log>,
    current: Option<u64>,
    next_log: u64,
}

pub struct Spool {
    dir: PathBuf,
    state: Mutex<State>,
    arrived: Condvar,
}

fn log_name(n: u64) -> String {
    format!("{n:016x}.log")
}

impl Spool {
    /// Opens the spool in `dir`, keeping every whole, matching record of its logs.
    pub fn open(dir: PathBuf) -> io::Result<Self> {
        fs::create_dir_all(&dir)?;
        let mut st = State::default();
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for e in fs::read_dir(&dir)? {
            let p = e?.path();
            let n = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| u64::from_str_radix(n, 16).ok());
            match n {
                Some(n) => names.push((n, p)),
                // Files of an older agent's spool (a blob per file) are not read: a fetch
                // asks for those blobs again.
                None if p.is_dir() => {
                    let _ = fs::remove_dir_all(&p);
                }
                None => {
                    let _ = fs::remove_file(&p);
                }
            }
        }
        names.sort();
        for (n, path) in names {
            let file = File::options().read(true).append(true).open(&path)?;
            let (len, found) = scan(&file)?;
            if found.is_empty() {
                drop(file);
                let _ = fs::remove_file(&path);
                continue;
            }
            file.set_len(len)?;
            let live = found.len() as u64;
            for (d, mut at) in found {
                at.log = n;
                st.index.insert(d, at);
            }
            st.logs.insert(n, Log { file, len, live });
            st.next_log = st.next_log.max(n + 1);
        }
        Ok(Self { dir, state: Mutex::new(st), arrived: Condvar::new() })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn has(&self, d: &Digest) -> bool {
        self.lock().index.contains_key(d)
    }

    /// Verifies a blob and appends it (once: a blob held already is left alone).
    pub fn put(&self, c: &Chunk, encoding: u8, payload: &[u8]) -> Result<(), TreeError> {
        cas::decode_blob(c, encoding, payload)?;
        let err =
            |e| TreeError::Io { context: format!("spooling blob {}", hex::encode(c.digest)), source: e };
        let mut st = self.lock();
        if st.index.contains_key(&c.digest) {
            return Ok(());
        }
        let n = match st.current.filter(|n| st.logs.get(n).is_some_and(|l| l.len < LOG_MAX)) {
            Some(n) => n,
            None => {
                let n = st.next_log;
                st.next_log += 1;
                let file = File::options()
                    .read(true)
                    .append(true)
                    .create_new(true)
                    .open(self.dir.join(log_name(n)))
                    .map_err(err)?;
                st.logs.insert(n, Log { file, len: 0, live: 0 });
                st.current = Some(n);
                n
            }
        };
        let log = st.logs.get_mut(&n).ok_or_else(|| err(io::Error::other("log vanished")))?;
        let header = BlobHeader { digest: c.digest, encoding, len: c.len, payload_len: payload.len() as u32 };
        let mut record = Vec::with_capacity(BLOB_HEADER_LEN + payload.len());
        record.extend_from_slice(&header.encode());
        record.extend_from_slice(payload);
        if let Err(e) = log.file.write_all(&record) {
            // A torn append is cut off at the next open; this log takes nothing more.
            st.current = None;
            return Err(err(e));
        }
        let at =
            At { log: n, offset: log.len + BLOB_HEADER_LEN as u64, payload: payload.len() as u64, encoding };
        log.len += record.len() as u64;
        log.live += 1;
        st.index.insert(c.digest, at);
        drop(st);
        self.arrived.notify_all();
        Ok(())
    }

    /// A blob's bytes, decoded but not checked (a [`ChunkSource`] read is checked by its
    /// caller); `None` when the spool does not hold it.
    fn get(&self, c: &Chunk) -> io::Result<Option<Vec<u8>>> {
        let (at, file) = {
            let st = self.lock();
            let Some(at) = st.index.get(&c.digest).copied() else { return Ok(None) };
            let Some(log) = st.logs.get(&at.log) else { return Ok(None) };
            (at, log.file.try_clone()?)
        };
        let mut payload = vec![0u8; at.payload as usize];
        file.read_exact_at(&mut payload, at.offset)?;
        if at.encoding == cas::ENC_RAW {
            return Ok(Some(payload));
        }
        cas::decode_unchecked(c, at.encoding, &payload).map(Some).map_err(io::Error::other)
    }

    /// Like [`ChunkSource::read`], waiting for a blob still on its way until it arrives or
    /// `given_up` is set (the transfer bringing it failed).
    pub fn wait_read(&self, c: &Chunk, given_up: &AtomicBool) -> io::Result<Vec<u8>> {
        loop {
            if let Some(data) = self.get(c)? {
                return Ok(data);
            }
            if given_up.load(Ordering::Acquire) {
                return Err(io::Error::other(format!("blob {} never came", hex::encode(c.digest))));
            }
            let st = self.lock();
            if st.index.contains_key(&c.digest) {
                continue;
            }
            // A bounded wait: `given_up` is set without the lock.
            let _ = self.arrived.wait_timeout(st, Duration::from_millis(50));
        }
    }

    /// Wakes every reader waiting in [`Spool::wait_read`] (after setting its `given_up`).
    pub fn wake(&self) {
        self.arrived.notify_all();
    }

    /// Forgets blobs whose tree has committed; a log whose blobs are all forgotten goes.
    pub fn forget(&self, digests: impl IntoIterator<Item = Digest>) {
        let mut st = self.lock();
        for d in digests {
            let Some(at) = st.index.remove(&d) else { continue };
            if let Some(log) = st.logs.get_mut(&at.log) {
                log.live = log.live.saturating_sub(1);
            }
        }
        let empty: Vec<u64> = st.logs.iter().filter(|(_, l)| l.live == 0).map(|(n, _)| *n).collect();
        for n in empty {
            st.logs.remove(&n);
            if st.current == Some(n) {
                st.current = None;
            }
            let _ = fs::remove_file(self.dir.join(log_name(n)));
        }
    }

    /// Bytes the spool's logs hold.
    pub fn bytes(&self) -> u64 {
        self.lock().logs.values().map(|l| l.len).sum()
    }
}

/// Reads a log's records from the start: the length of its whole, matching prefix and the
/// blobs in it.
fn scan(file: &File) -> io::Result<(u64, Vec<(Digest, At)>)> {
    let mut r = io::BufReader::with_capacity(1 << 20, file.try_clone()?);
    let mut found = Vec::new();
    let mut at = 0u64;
    loop {
        let mut raw = [0u8; BLOB_HEADER_LEN];
        if read_full(&mut r, &mut raw)? < BLOB_HEADER_LEN {
            break;
        }
        let Some(h) = BlobHeader::decode(&raw).filter(|h| !h.is_end()) else { break };
        let mut payload = vec![0u8; h.payload_len as usize];
        if read_full(&mut r, &mut payload)? < payload.len() {
            break;
        }
        let c = Chunk { digest: h.digest, len: h.len };
        if cas::decode_blob(&c, h.encoding, &payload).is_err() {
            break;
        }
        let offset = at + BLOB_HEADER_LEN as u64;
        found.push((h.digest, At { log: 0, offset, payload: payload.len() as u64, encoding: h.encoding }));
        at = offset + payload.len() as u64;
    }
    Ok((at, found))
}

impl ChunkSource for Spool {
    fn has(&self, digest: &Digest) -> bool {
        Spool::has(self, digest)
    }

    fn read(&self, c: &Chunk) -> io::Result<Vec<u8>> {
        self.get(c)?
            .ok_or_else(|| io::Error::other(format!("blob {} is not in the spool", hex::encode(c.digest))))
    }
}

/// The spool as a source of the blobs one transfer brings: a read of one of `coming` waits for
/// it until it arrives or `given_up` is set.
pub struct Arriving<'a> {
    pub spool: &'a Spool,
    pub coming: std::collections::HashSet<Digest>,
    pub given_up: &'a AtomicBool,
}

impl ChunkSource for Arriving<'_> {
    fn has(&self, digest: &Digest) -> bool {
        self.coming.contains(digest) || self.spool.has(digest)
    }

    fn read(&self, c: &Chunk) -> io::Result<Vec<u8>> {
        if self.coming.contains(&c.digest) {
            self.spool.wait_read(c, self.given_up)
        } else {
            ChunkSource::read(self.spool, c)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: &[u8]) -> Chunk {
        Chunk { digest: *blake3::hash(data).as_bytes(), len: data.len() as u64 }
    }

    #[test]
    fn blobs_survive_a_reopen_and_a_torn_or_tampered_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let datas: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000 + i as usize]).collect();
        {
            let s = Spool::open(dir.path().to_path_buf()).unwrap();
            for d in &datas[..4] {
                let (enc, payload) = cas::encode_blob(d, 3);
                s.put(&chunk(d), enc, &payload).unwrap();
            }
            assert!(s.put(&chunk(b"x"), cas::ENC_RAW, b"y").is_err(), "a blob that does not match");
        }
        let log = fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        // A torn append: half a record at the end.
        let mut f = File::options().append(true).open(&log).unwrap();
        let h = BlobHeader { digest: chunk(&datas[4]).digest, encoding: 0, len: 1004, payload_len: 1004 };
        f.write_all(&h.encode()).unwrap();
        f.write_all(&datas[4][..10]).unwrap();
        drop(f);
        let s = Spool::open(dir.path().to_path_buf()).unwrap();
        for d in &datas[..4] {
            assert_eq!(ChunkSource::read(&s, &chunk(d)).unwrap(), *d);
        }
        assert!(!s.has(&chunk(&datas[4]).digest));
        // New appends go to a new log, readable after another reopen.
        let (enc, payload) = cas::encode_blob(&datas[4], 0);
        s.put(&chunk(&datas[4]), enc, &payload).unwrap();
        drop(s);
        // A byte flipped in the third record's payload: it and everything after it in its
        // log go.
        let mut bytes = fs::read(&log).unwrap();
        let s = Spool::open(dir.path().to_path_buf()).unwrap();
        assert!(datas.iter().all(|d| s.has(&chunk(d).digest)));
        drop(s);
        let mut at = 0usize;
        for _ in 0..2 {
            let h = BlobHeader::decode(bytes[at..at + BLOB_HEADER_LEN].try_into().unwrap()).unwrap();
            at += BLOB_HEADER_LEN + h.payload_len as usize;
        }
        bytes[at + BLOB_HEADER_LEN] ^= 0xff;
        fs::write(&log, &bytes).unwrap();
        let s = Spool::open(dir.path().to_path_buf()).unwrap();
        let held: Vec<bool> = datas.iter().map(|d| s.has(&chunk(d).digest)).collect();
        assert_eq!(held, [true, true, false, false, true], "the fifth is in the second log");
        // Forgetting every blob removes the log.
        s.forget(datas.iter().map(|d| chunk(d).digest));
        assert_eq!(s.bytes(), 0);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_reader_waits_for_a_blob_on_its_way_and_gives_up_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Spool::open(dir.path().to_path_buf()).unwrap());
        let data = b"arrives later".to_vec();
        let c = chunk(&data);
        let given_up = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let writer = s.clone();
            let d = data.clone();
            scope.spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                writer.put(&c, cas::ENC_RAW, &d).unwrap();
            });
            let src = Arriving { spool: &s, coming: [c.digest].into(), given_up: &given_up };
            assert_eq!(src.read(&c).unwrap(), data);
        });
        let never = chunk(b"never sent");
        let src = Arriving { spool: &s, coming: [never.digest].into(), given_up: &given_up };
        std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                given_up.store(true, Ordering::Release);
                s.wake();
            });
            assert!(src.read(&never).unwrap_err().to_string().contains("never came"));
        });
    }
}
