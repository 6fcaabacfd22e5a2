//! Files a receiver already holds, put into a new tree without moving their bytes again.
//!
//! A fetch whose manifest names a file the agent holds whole under another snapshot (same
//! chunks, in order) does not send that file through the tar stream: [`plan`] finds such
//! files and checks each against its chunks' digests, [`placeholders`] turns them into empty
//! files of the manifest the unpacker builds (so every path and link check of
//! [`crate::tree`] still applies), and [`place`] then swaps each placeholder for the held file:
//!
//! - a **hard link** when the held file's mode (write bits aside: cached trees are read-only)
//!   and mtime are the entry's, so nothing about the shared inode differs;
//! - otherwise a **reflink** (`FICLONE`) where the filesystem shares extents,
//! - otherwise a kernel copy (`copy_file_range`), with the entry's mode and mtime set after.
//!
//! A held file that does not match its digests is not reused: its chunks are fetched like any
//! other missing chunk (see [`Plan::damaged`]). After a hard link the linked inode is compared
//! with the one that was checked, so a file swapped between the check and the link is refused.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};

use crate::cas::{Chunk, ChunkSource, Digest, Entry, Manifest};
use crate::fsafe::{self, Dir, EntryStat, Kind};
use crate::tree::{EntryKind, TreeError};

/// A file of the manifest held whole elsewhere, checked.
#[derive(Debug)]
pub struct Held {
    /// Index of the entry in the manifest.
    pub entry: usize,
    pub path: PathBuf,
    file: File,
    stat: EntryStat,
}

/// A file of the manifest a transfer that broke off had written in part: its first `chunks`
/// chunks (`bytes` bytes) lie within its length, checked by [`complete`] (while the rest is on
/// its way), which then appends the rest.
#[derive(Debug)]
pub struct Started {
    pub entry: usize,
    pub path: PathBuf,
    pub chunks: usize,
    pub bytes: u64,
}

/// What [`plan`] found.
#[derive(Debug, Default)]
pub struct Plan {
    pub held: Vec<Held>,
    /// Files to complete in place.
    pub started: Vec<Started>,
    /// Chunks of held copies that failed their check: fetch them although the source has them.
    pub damaged: HashSet<Digest>,
}

/// How many files [`place`] put in place, by how.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub linked: u64,
    pub cloned: u64,
    pub copied: u64,
    pub bytes: u64,
}

/// Finds the non-empty regular files of `m` that `source` holds whole, and checks each.
pub fn plan(m: &Manifest, source: &dyn ChunkSource) -> Plan {
    let mut out = Plan::default();
    for (i, e) in m.entries.iter().enumerate() {
        if e.kind != EntryKind::File || e.size == 0 {
            continue;
        }
        let Some(path) = source.whole_file(&e.chunks) else {
            if let Some(path) = source.partial_file(&e.chunks) {
                let (chunks, bytes) = start_of(&path, e);
                // Whatever follows the checked start is fetched, wherever else it may lie.
                out.damaged.extend(e.chunks[chunks..].iter().map(|c| c.digest));
                if chunks > 0 {
                    out.started.push(Started { entry: i, path, chunks, bytes });
                }
            }
            continue;
        };
        match checked(&path, e) {
            Ok((file, stat)) => out.held.push(Held { entry: i, path, file, stat }),
            Err(why) => {
                tracing::warn!(file = %path.display(), "held copy not reused, fetching it again: {why}");
                out.damaged.extend(e.chunks.iter().map(|c| c.digest));
            }
        }
    }
    out
}

/// Opens `path` without following a link and checks that it is a regular file of exactly
/// `e`'s chunks.
fn checked(path: &Path, e: &Entry) -> Result<(File, EntryStat), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(fsafe::O_NOFOLLOW)
        .open(path)
        .map_err(|e| e.to_string())?;
    let stat = fsafe::file_stat(&f).map_err(|e| e.to_string())?;
    if stat.kind != Kind::File {
        return Err("not a regular file".into());
    }
    if stat.size != e.size {
        return Err(format!("{} bytes, the manifest says {}", stat.size, e.size));
    }
    let mut buf = Vec::new();
    for c in &e.chunks {
        read_chunk(&mut f, c, &mut buf).map_err(|e| e.to_string())?;
        if *blake3::hash(&buf).as_bytes() != c.digest {
            return Err(format!("chunk {} does not match its digest", hex::encode(c.digest)));
        }
    }
    Ok((f, stat))
}

/// How many leading chunks of `e` lie within the length of the regular file at `path`, and
/// their bytes (not read here: [`complete`] checks them).
fn start_of(path: &Path, e: &Entry) -> (usize, u64) {
    let Ok(md) = std::fs::symlink_metadata(path) else { return (0, 0) };
    if !md.file_type().is_file() {
        return (0, 0);
    }
    let (mut n, mut bytes) = (0, 0);
    for c in &e.chunks {
        if bytes + c.len > md.len() {
            break;
        }
        n += 1;
        bytes += c.len;
    }
    (n, bytes)
}

/// Completes each file of `plan.started` in place: its start checked against its chunks'
/// digests (a file whose start does not match is removed, and the transfer fails: the next one
/// fetches it whole), cut to that start, the rest of its chunks appended from `source` (each
/// checked first), the entry's mode (read-only) and mtime set; it is then held whole, for
/// [`place`]. Returns the bytes appended.
pub fn complete(m: &Manifest, plan: &mut Plan, source: &dyn ChunkSource) -> Result<u64, TreeError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut appended = 0;
    for s in std::mem::take(&mut plan.started) {
        let Some(e) = m.entries.get(s.entry) else { continue };
        let ioe = |source| TreeError::Io { context: format!("completing {}", s.path.display()), source };
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(fsafe::O_NOFOLLOW)
            .open(&s.path)
            .map_err(ioe)?;
        if fsafe::file_stat(&f).map_err(ioe)?.kind != Kind::File {
            return Err(TreeError::Mismatch(format!("{} is not a regular file", s.path.display())));
        }
        let mut buf = Vec::new();
        for c in &e.chunks[..s.chunks] {
            if read_chunk(&mut f, c, &mut buf).is_err() || *blake3::hash(&buf).as_bytes() != c.digest {
                let _ = std::fs::remove_file(&s.path);
                return Err(TreeError::Mismatch(format!(
                    "{}, written in part by an earlier transfer, does not match its chunks: removed",
                    s.path.display()
                )));
            }
        }
        f.set_len(s.bytes).map_err(ioe)?;
        f.seek(io::SeekFrom::End(0)).map_err(ioe)?;
        for c in &e.chunks[s.chunks..] {
            let data = source.read(c).map_err(ioe)?;
            crate::cas::check_blob(c, &data)?;
            f.write_all(&data).map_err(ioe)?;
            appended += c.len;
        }
        f.set_permissions(std::fs::Permissions::from_mode(e.mode & 0o7777 & !0o222)).map_err(ioe)?;
        filetime::set_file_handle_times(&f, None, Some(filetime::FileTime::from_unix_time(e.mtime, 0)))
            .map_err(ioe)?;
        drop(f);
        // Its start and every appended chunk were checked: the file is opened again (never
        // through a link) for its inode and size, not read again.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(fsafe::O_NOFOLLOW)
            .open(&s.path)
            .map_err(ioe)?;
        let stat = fsafe::file_stat(&file).map_err(ioe)?;
        if stat.kind != Kind::File || stat.size != e.size {
            return Err(TreeError::Mismatch(format!("{} changed while it was completed", s.path.display())));
        }
        plan.held.push(Held { entry: s.entry, path: s.path, file, stat });
    }
    Ok(appended)
}

fn read_chunk(f: &mut File, c: &Chunk, buf: &mut Vec<u8>) -> io::Result<()> {
    if c.len > crate::cas::MAX_BLOB {
        return Err(io::Error::other("chunk over the blob limit"));
    }
    buf.resize(c.len as usize, 0);
    f.read_exact(buf)
}

/// `m` with each held file's content left out (an empty file in its place, writable so that
/// [`place`] can replace it), for the unpacker.
pub fn placeholders(m: &Manifest, plan: &Plan) -> Manifest {
    let mut out = m.clone();
    for i in plan.held.iter().map(|h| h.entry).chain(plan.started.iter().map(|s| s.entry)) {
        if let Some(e) = out.entries.get_mut(i) {
            e.size = 0;
            e.chunks.clear();
        }
    }
    out
}

/// Replaces the placeholder of each held file in the tree at `root` (built from
/// [`placeholders`]) with the held file, and puts back the mtime of each directory touched.
pub fn place(root: &Path, m: &Manifest, plan: Plan) -> Result<Placed, TreeError> {
    let ioe = |context: String| move |source| TreeError::Io { context, source };
    let top = Dir::open(root).map_err(ioe(format!("opening {}", root.display())))?;
    let mut placed = Placed::default();
    for mut h in plan.held {
        let Some(e) = m.entries.get(h.entry) else { continue };
        let (parent, name) = fsafe::split(Path::new(&e.path)).map_err(ioe(format!("placing {}", e.path)))?;
        let dir = top.open_dir(&parent).map_err(ioe(format!("placing {}", e.path)))?;
        let how = put(&dir, &name, e, &mut h).map_err(ioe(format!("placing {}", e.path)))?;
        match how {
            How::Linked => placed.linked += 1,
            How::Cloned => placed.cloned += 1,
            How::Copied => placed.copied += 1,
        }
        placed.bytes += e.size;
    }
    Ok(placed)
}

enum How {
    Linked,
    Cloned,
    Copied,
}

fn put(dir: &Dir, name: &OsStr, e: &Entry, h: &mut Held) -> io::Result<How> {
    match dir.stat(name)? {
        Some(s) if s.kind == Kind::File && s.size == 0 => {}
        _ => return Err(io::Error::other("its placeholder is not an empty regular file")),
    }
    let own = dir.own_stat()?;
    if own.mode & 0o200 == 0 {
        dir.set_mode(own.mode | 0o700)?;
    }
    let tmp = Dir::temp_name(name);
    let how = fill(dir, &tmp, e, h).and_then(|how| {
        dir.rename(&tmp, dir, name)?;
        Ok(how)
    });
    if how.is_err() {
        let _ = dir.remove_file(&tmp);
    }
    if own.mode & 0o200 == 0 {
        dir.set_mode(own.mode)?;
    }
    dir.set_mtime(own.mtime)?;
    how
}

/// Writes the held file as `tmp` in `dir`.
fn fill(dir: &Dir, tmp: &OsStr, e: &Entry, h: &mut Held) -> io::Result<How> {
    let same_meta = h.stat.mtime == e.mtime && h.stat.mode & 0o7777 == e.mode & 0o7777 & !0o222;
    if same_meta && dir.hard_link(&h.path, tmp).is_ok() {
        match dir.stat(tmp)? {
            Some(s) if s.kind == Kind::File && s.ino == h.stat.ino && s.dev == h.stat.dev => {
                return Ok(How::Linked);
            }
            _ => {
                dir.remove_file(tmp)?;
                return Err(io::Error::other("the held file changed between its check and its link"));
            }
        }
    }
    let mut out = dir.create_new(tmp, 0o600)?;
    let how = if fsafe::reflink(&out, &h.file).is_ok() {
        How::Cloned
    } else {
        h.file.rewind()?;
        let n = io::copy(&mut h.file, &mut out)?;
        if n != e.size {
            return Err(io::Error::other(format!("copied {n} bytes of {}", e.size)));
        }
        How::Copied
    };
    use std::os::unix::fs::PermissionsExt;
    out.set_permissions(std::fs::Permissions::from_mode(e.mode & 0o7777))?;
    filetime::set_file_handle_times(&out, None, Some(filetime::FileTime::from_unix_time(e.mtime, 0)))?;
    Ok(how)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cas::{self, TreeSource};
    use crate::tree::UnpackLimits;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    const LIMITS: UnpackLimits = UnpackLimits { max_bytes: 1 << 30 };

    fn sample_tree(dir: &Path) {
        fs::create_dir_all(dir.join("out/sub")).unwrap();
        fs::write(dir.join("out/a.txt"), b"alpha\n").unwrap();
        fs::write(dir.join("out/empty"), b"").unwrap();
        let big: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        fs::write(dir.join("out/sub/big"), &big).unwrap();
    }

    #[test]
    fn a_partial_tree_offers_its_whole_files_and_the_checked_start_of_the_others() {
        let src = tempfile::tempdir().unwrap();
        sample_tree(src.path());
        let blobs = cas::BlobStore::open(src.path().join("blobs")).unwrap();
        let m = cas::tests::store_of(src.path(), &blobs);
        let entry = |p: &str| m.entries.iter().find(|e| e.path == p).unwrap().clone();
        let (a, big) = (entry("out/a.txt"), entry("out/sub/big"));
        assert!(big.chunks.len() >= 2);
        // An unpack into a staging dir that broke off: the big file cut inside its last chunk.
        let work = tempfile::tempdir().unwrap();
        let partial = work.path().join("partial.0");
        let limits = LIMITS;
        cas::with_tar(&m, &blobs, |r| {
            crate::tree::unpack_into_at(r, &work.path().join("t0"), &partial, limits)
        })
        .unwrap();
        fs::rename(work.path().join("t0"), &partial).unwrap();
        let big_path = partial.join("out/sub/big");
        let cut = big.size - big.chunks.last().unwrap().len + 10;
        fs::OpenOptions::new().write(true).open(&big_path).unwrap().set_len(cut).unwrap();
        let t = cas::PartialTree::new(&partial, &m);
        assert_eq!(t.whole_file(&a.chunks), Some(partial.join("out/a.txt")));
        assert_eq!(t.whole_file(&big.chunks), None, "a short file is not whole");
        assert_eq!(t.partial_file(&big.chunks), Some(big_path.clone()));
        assert!(t.has(&big.chunks[0].digest), "the chunks of its start are offered");
        assert!(!t.has(&big.chunks.last().unwrap().digest), "the cut one is not");
        assert_eq!(t.read(&a.chunks[0]).unwrap(), b"alpha\n");
        // A resumed fetch: plan, unpack around placeholders, complete, place.
        let mut plan = super::plan(&m, &t);
        assert!(plan.damaged.contains(&big.chunks.last().unwrap().digest), "the rest is fetched");
        assert!(!plan.damaged.contains(&big.chunks[0].digest));
        assert_eq!(plan.started.len(), 1);
        let skeleton = placeholders(&m, &plan);
        let sources = cas::Sources(vec![&t as &dyn ChunkSource, &blobs]);
        let dest = work.path().join("t");
        cas::with_tar(&skeleton, &sources, |r| {
            crate::tree::unpack_into_at(r, &dest, &work.path().join("partial.1"), limits)
        })
        .unwrap();
        assert!(!work.path().join("partial.1").exists(), "the staging dir became the tree");
        let appended = complete(&m, &mut plan, &sources).unwrap();
        assert_eq!(appended, big.chunks.last().unwrap().len, "only the cut chunk is written again");
        let placed = place(&dest, &m, plan).unwrap();
        assert_eq!(placed.linked, 2, "a.txt and the completed big file are linked in: {placed:?}");
        for p in ["out/a.txt", "out/empty", "out/sub/big"] {
            assert_eq!(fs::read(dest.join(p)).unwrap(), fs::read(src.path().join(p)).unwrap(), "{p}");
        }
        // A staging dir that exists already is refused, nothing touched.
        assert!(
            cas::with_tar(&m, &blobs, |r| crate::tree::unpack_into_at(
                r,
                &work.path().join("t2"),
                &partial,
                limits
            ))
            .is_err()
        );
        // A start that does not match its chunks: the completion fails and removes the file.
        let bad = work.path().join("partial.2");
        cas::with_tar(&m, &blobs, |r| crate::tree::unpack_into_at(r, &work.path().join("t3"), &bad, limits))
            .unwrap();
        fs::rename(work.path().join("t3"), &bad).unwrap();
        let bad_big = bad.join("out/sub/big");
        let mut bytes = fs::read(&bad_big).unwrap();
        bytes.truncate(cut as usize);
        bytes[100] ^= 1;
        fs::write(&bad_big, &bytes).unwrap();
        let t = cas::PartialTree::new(&bad, &m);
        let mut plan = super::plan(&m, &t);
        assert_eq!(plan.started.len(), 1);
        let sources = cas::Sources(vec![&t as &dyn ChunkSource, &blobs]);
        let err = complete(&m, &mut plan, &sources).unwrap_err();
        assert!(err.to_string().contains("does not match its chunks"), "{err}");
        assert!(!bad_big.exists());
    }

    /// A snapshot of `out/` under `root`, and the tree it was made from.
    fn snapshot(root: &Path) -> Manifest {
        cas::build(root, &[PathBuf::from("out")], LIMITS, |_, _| Ok(())).unwrap().0
    }

    fn fetch_with(m: &Manifest, held: &dyn ChunkSource, dest: &Path) -> Placed {
        let plan = plan(m, held);
        assert!(plan.damaged.is_empty(), "{:?}", plan.damaged);
        let skeleton = placeholders(m, &plan);
        cas::with_tar(&skeleton, held, |r| crate::tree::unpack_into(r, dest, LIMITS)).unwrap();
        place(dest, m, plan).unwrap()
    }

    /// Strips the write bits of every file under `root`, as the agent's cache does.
    fn read_only(root: &Path) {
        use std::os::unix::fs::PermissionsExt;
        for e in walk(root) {
            let md = fs::symlink_metadata(&e).unwrap();
            if md.is_file() {
                fs::set_permissions(&e, fs::Permissions::from_mode(md.mode() & 0o7555)).unwrap();
            }
        }
    }

    fn walk(root: &Path) -> Vec<PathBuf> {
        let mut out = vec![];
        for e in fs::read_dir(root).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
        out
    }

    #[test]
    fn held_files_are_linked_when_their_metadata_agrees_and_copied_when_not() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        fs::create_dir_all(a.join("out/sub")).unwrap();
        fs::write(a.join("out/big"), vec![7u8; 3 << 20]).unwrap();
        fs::write(a.join("out/sub/small"), b"small file\n").unwrap();
        fs::write(a.join("out/empty"), b"").unwrap();
        read_only(&a);
        let m = snapshot(&a);
        let held = TreeSource::new(a.clone(), &m);
        let dest = t.path().join("b");
        let placed = fetch_with(&m, &WholeFiles(&held, &a, &m), &dest);
        assert_eq!((placed.linked, placed.cloned + placed.copied), (2, 0), "{placed:?}");
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&dest.join("out/big")), ino(&a.join("out/big")));
        // The new tree is the manifest's tree (directory mtimes included): building it again
        // gives the same manifest.
        assert_eq!(snapshot(&dest), m);

        // Another mtime and mode: the bytes are reused, the inode is not.
        let mut m2 = m.clone();
        for e in &mut m2.entries {
            e.mtime += 1;
            if e.kind == EntryKind::File {
                e.mode |= 0o200;
            }
        }
        let dest2 = t.path().join("c");
        let placed = fetch_with(&m2, &WholeFiles(&held, &a, &m), &dest2);
        assert_eq!((placed.linked, placed.cloned + placed.copied), (0, 2), "{placed:?}");
        assert_ne!(ino(&dest2.join("out/big")), ino(&a.join("out/big")));
        assert_eq!(fs::read(dest2.join("out/big")).unwrap(), vec![7u8; 3 << 20]);
        assert_eq!(snapshot(&dest2), m2);
    }

    #[test]
    fn a_damaged_held_copy_is_not_reused_and_its_chunks_are_asked_for() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        fs::create_dir_all(a.join("out")).unwrap();
        fs::write(a.join("out/x"), b"original bytes").unwrap();
        fs::write(a.join("out/y"), b"other bytes").unwrap();
        let m = snapshot(&a);
        let held = TreeSource::new(a.clone(), &m);
        // Same length, other bytes.
        fs::write(a.join("out/x"), b"tampered bytes").unwrap();
        let plan = plan(&m, &WholeFiles(&held, &a, &m));
        assert_eq!(plan.held.len(), 1);
        let x = m.entries.iter().find(|e| e.path == "out/x").unwrap();
        assert!(plan.damaged.contains(&x.chunks[0].digest));
        // A symlink where the held file was is not followed.
        fs::remove_file(a.join("out/y")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", a.join("out/y")).unwrap();
        let plan = super::plan(&m, &WholeFiles(&held, &a, &m));
        assert!(plan.held.is_empty());
        assert_eq!(plan.damaged.len(), 2);
    }

    /// A tree as a source of whole files (what the agent's cache does from its manifests).
    struct WholeFiles<'a>(&'a TreeSource, &'a Path, &'a Manifest);

    impl ChunkSource for WholeFiles<'_> {
        fn has(&self, d: &Digest) -> bool {
            self.0.has(d)
        }
        fn read(&self, c: &Chunk) -> io::Result<Vec<u8>> {
            self.0.read(c)
        }
        fn whole_file(&self, chunks: &[Chunk]) -> Option<PathBuf> {
            let e = self.2.entries.iter().find(|e| e.chunks == chunks)?;
            Some(self.1.join(&e.path))
        }
    }
}
