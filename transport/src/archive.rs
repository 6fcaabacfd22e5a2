//! Stored archives: a zstd-compressed tar file with the BLAKE3 digest of its bytes, the form
//! in which the coordinator keeps snapshots and the bytes it streams verbatim to agents.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use protocol::Trailer;

use crate::tree::{self, IndexEntry, TreeError, TreeStats, UnpackLimits};

/// Counts and hashes what passes through to the inner writer.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> TreeError {
    move |source| TreeError::Io { context, source }
}

/// Packs `paths` under `root` (see [`tree::pack_paths`]) into the new file `dest` as zstd at
/// `level`, fsynced. Returns the byte count and digest of the file, and what was packed.
pub fn write(
    root: &Path,
    paths: &[PathBuf],
    dest: &Path,
    level: i32,
) -> Result<(Trailer, TreeStats), TreeError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(io_err(format!("creating {}", dest.display())))?;
    let mut w = Hashing {
        inner: io::BufWriter::with_capacity(tree::COPY_BUF, file),
        hasher: blake3::Hasher::new(),
        bytes: 0,
    };
    let packed = (|| {
        let mut enc =
            zstd::stream::write::Encoder::new(&mut w, level).map_err(io_err("starting zstd".into()))?;
        let stats = tree::pack_paths(root, paths, &mut enc)?;
        enc.finish().map_err(io_err("finishing zstd".into()))?;
        Ok::<_, TreeError>(stats)
    })();
    let stats = match packed {
        Ok(s) => s,
        Err(e) => {
            let _ = fs::remove_file(dest);
            return Err(e);
        }
    };
    let trailer = Trailer { bytes: w.bytes, digest: *w.hasher.finalize().as_bytes() };
    let file = w.inner.into_inner().map_err(|e| TreeError::Io {
        context: format!("writing {}", dest.display()),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io_err(format!("syncing {}", dest.display())))?;
    Ok((trailer, stats))
}

/// Reads the archive at `path` and lists its entries.
pub fn index(path: &Path, limits: UnpackLimits) -> Result<(Vec<IndexEntry>, TreeStats), TreeError> {
    let file = fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let dec = zstd::stream::read::Decoder::new(file).map_err(io_err("starting zstd".into()))?;
    tree::list(dec, limits)
}

/// The BLAKE3 digest and length of a file.
pub fn digest(path: &Path) -> Result<Trailer, TreeError> {
    let mut file = fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; tree::COPY_BUF];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(Trailer { bytes, digest: *hasher.finalize().as_bytes() })
}

/// Reads through to a hasher, counting.
pub struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<R> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, hasher: blake3::Hasher::new(), bytes: 0 }
    }

    /// Bytes read and their digest.
    pub fn finish(&self) -> (u64, [u8; 32]) {
        (self.bytes, *self.hasher.finalize().as_bytes())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Writes `isp` of the stored archive at `path` to `dest_rel` beneath `root` (see
/// [`tree::stage_out`]), committing only once every byte of the archive was read and matched
/// `expected`: a tampered archive fails with [`TreeError::Mismatch`] and leaves the
/// destination as it was.
pub fn write_out(
    path: &Path,
    expected: &Trailer,
    isp: &Path,
    root: &Path,
    dest_rel: &Path,
    limits: UnpackLimits,
) -> Result<tree::WriteOutStats, TreeError> {
    let file = fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let mut hashing = HashingReader { inner: file, hasher: blake3::Hasher::new(), bytes: 0 };
    let staged = (|| {
        let mut dec =
            zstd::stream::read::Decoder::new(&mut hashing).map_err(io_err("starting zstd".into()))?;
        let staged = tree::stage_out(&mut dec, isp, root, dest_rel, limits)?;
        // Whatever follows the zstd frame counts too.
        let mut rest = dec.finish();
        io::copy(&mut rest, &mut io::sink()).map_err(io_err(format!("reading {}", path.display())))?;
        Ok::<_, TreeError>(staged)
    })();
    let (pending, stats) = match staged {
        Ok(s) => s,
        Err(e) => {
            // A tampered archive may not even decompress: say so rather than the symptom.
            io::copy(&mut hashing, &mut io::sink()).ok();
            if hashing.bytes != expected.bytes || *hashing.hasher.finalize().as_bytes() != expected.digest {
                return Err(TreeError::Mismatch(format!(
                    "{} does not match its recorded length and digest ({e})",
                    path.display()
                )));
            }
            return Err(e);
        }
    };
    if hashing.bytes != expected.bytes || *hashing.hasher.finalize().as_bytes() != expected.digest {
        return Err(TreeError::Mismatch(format!(
            "{} does not match its recorded length and digest ({} bytes read, {} recorded)",
            path.display(),
            hashing.bytes,
            expected.bytes
        )));
    }
    pending.commit()?;
    Ok(stats)
}
