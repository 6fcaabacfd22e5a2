//! Directory trees as tar streams. This is the only module that names the `tar` crate.
//!
//! [`pack`] writes a tree (regular files, directories, symlinks that stay inside the tree,
//! modes and mtimes) to any `Write`. [`unpack`] reads a tar stream into a staging directory
//! next to the destination and refuses, naming the entry: absolute paths, `..` components,
//! symlinks or hardlinks that resolve outside the destination, device/fifo/socket entries, and
//! streams over a byte limit. Only when the whole stream was read and accepted is the staging
//! directory merged into the destination; on any refusal it is removed and the destination is
//! left as it was. Memory does not grow with the size of the tree: files are streamed through
//! fixed buffers, and the only per-entry state kept is the list of directories (for their
//! final mode and mtime) and of symlinks (for the final containment check).

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use filetime::FileTime;

use crate::fsafe::{Dir, Kind, O_NOFOLLOW};

/// Buffer size for file contents in both directions.
pub const COPY_BUF: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("refused entry {entry:?}: {reason}")]
    Refused { entry: String, reason: String },
    #[error("stream exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// Stored bytes that do not match their recorded length and digest.
    #[error("{0}")]
    Mismatch(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl TreeError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }

    fn refused(entry: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Self::Refused { entry: entry.as_ref().display().to_string(), reason: reason.into() }
    }
}

/// What a pack or unpack moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeStats {
    pub entries: u64,
    pub content_bytes: u64,
    /// A check only: every entry is judged and every file opened, no content is read.
    dry: bool,
}

/// Packs the tree rooted at `src` (a directory, or a single file) into `out`.
pub fn pack(src: &Path, out: impl Write) -> Result<TreeStats, TreeError> {
    pack_tree(src, out, TreeStats::default())
}

/// Whether [`pack`] would pack `src`: the same walk and the same refusals (special files,
/// links leaving the tree, unreadable files), without reading any content. A sender runs it
/// before it starts a transfer, so a refusal is a message to the receiver, not a broken stream.
pub fn check_packable(src: &Path) -> Result<TreeStats, TreeError> {
    pack_tree(src, io::sink(), TreeStats { dry: true, ..Default::default() })
}

/// Like [`check_packable`], for [`pack_paths`].
pub fn check_paths_packable(root: &Path, paths: &[PathBuf]) -> Result<TreeStats, TreeError> {
    pack_paths_into(root, paths, io::sink(), TreeStats { dry: true, ..Default::default() })
}

fn pack_tree(src: &Path, out: impl Write, mut stats: TreeStats) -> Result<TreeStats, TreeError> {
    let mut builder = tar::Builder::new(io::BufWriter::with_capacity(COPY_BUF, out));
    builder.follow_symlinks(false);
    let meta =
        fs::symlink_metadata(src).map_err(|e| TreeError::io(format!("reading {}", src.display()), e))?;
    if meta.is_file() {
        let name = src.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("file"));
        append_file(&mut builder, src, &name, &meta, &mut stats)?;
    } else if meta.is_dir() {
        let root =
            fs::canonicalize(src).map_err(|e| TreeError::io(format!("resolving {}", src.display()), e))?;
        pack_dir(&mut builder, &root, Path::new(""), Path::new(""), &mut stats)?;
    } else {
        return Err(TreeError::refused(src, "not a regular file or directory"));
    }
    finish(builder)?;
    Ok(stats)
}

/// Writes the end-of-archive blocks and flushes everything down to `out`.
fn finish<W: Write>(builder: tar::Builder<io::BufWriter<W>>) -> Result<(), TreeError> {
    let inner = builder.into_inner().map_err(|e| TreeError::io("finishing tar stream", e))?;
    inner
        .into_inner()
        .map_err(|e| TreeError::io("flushing tar stream", e.into_error()))?
        .flush()
        .map_err(|e| TreeError::io("flushing tar stream", e))
}

/// Packs the directory `rel` (relative to `root`) recursively. Links must stay within
/// `within` (relative to `root`): the declared path the packed tree belongs to.
fn pack_dir<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    within: &Path,
    stats: &mut TreeStats,
) -> Result<(), TreeError> {
    let dir = root.join(rel);
    let mut names: Vec<OsString> = fs::read_dir(&dir)
        .map_err(|e| TreeError::io(format!("listing {}", dir.display()), e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| TreeError::io(format!("listing {}", dir.display()), e))?;
    names.sort();
    for name in names {
        let rel_child = rel.join(&name);
        let path = root.join(&rel_child);
        let meta = fs::symlink_metadata(&path)
            .map_err(|e| TreeError::io(format!("reading {}", path.display()), e))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            let mut header = base_header(&meta, tar::EntryType::Directory);
            header.set_size(0);
            builder
                .append_data(&mut header, &rel_child, io::empty())
                .map_err(|e| TreeError::io(format!("packing {}", path.display()), e))?;
            stats.entries += 1;
            pack_dir(builder, root, &rel_child, within, stats)?;
        } else if ft.is_file() {
            append_file(builder, &path, &rel_child, &meta, stats)?;
        } else if ft.is_symlink() {
            append_symlink(builder, root, &rel_child, within, &meta, stats, &path)?;
        } else {
            return Err(TreeError::refused(&rel_child, "device, fifo or socket cannot be packed"));
        }
    }
    Ok(())
}

fn base_header(meta: &fs::Metadata, kind: tar::EntryType) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(meta.mode() & 0o7777);
    header.set_mtime(meta.mtime().max(0) as u64);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn append_file<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &Path,
    rel: &Path,
    meta: &fs::Metadata,
    stats: &mut TreeStats,
) -> Result<(), TreeError> {
    // Never through a link: the path was seen as a regular file, and must still be one.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NOFOLLOW)
        .open(path)
        .map_err(|e| TreeError::io(format!("opening {}", path.display()), e))?;
    let mut header = base_header(meta, tar::EntryType::Regular);
    if stats.dry {
        header.set_size(0);
        builder
            .append_data(&mut header, rel, io::empty())
            .map_err(|e| TreeError::io(format!("packing {}", path.display()), e))?;
    } else {
        header.set_size(meta.len());
        // A file that changes size while being read would corrupt the archive; take exactly len.
        builder
            .append_data(&mut header, rel, io::BufReader::with_capacity(COPY_BUF, file.take(meta.len())))
            .map_err(|e| TreeError::io(format!("packing {}", path.display()), e))?;
    }
    stats.entries += 1;
    stats.content_bytes += meta.len();
    Ok(())
}

/// Limits applied while unpacking.
#[derive(Debug, Clone, Copy)]
pub struct UnpackLimits {
    /// Largest tar stream (after decompression) accepted, in bytes.
    pub max_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self { max_bytes: 1 << 40 }
    }
}

/// A destination being filled: entries go to a staging directory beside `dest`, and
/// [`Staging::commit`] merges them in. Dropping it without committing removes the staging dir.
pub struct Staging {
    dest: PathBuf,
    dir: PathBuf,
    committed: bool,
}

impl Staging {
    pub fn new(dest: &Path) -> Result<Self, TreeError> {
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent)
            .map_err(|e| TreeError::io(format!("creating {}", parent.display()), e))?;
        let base = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dir = parent.join(format!(".{base}.pype-incoming-{:016x}", rand::random::<u64>()));
        fs::create_dir(&dir).map_err(|e| TreeError::io(format!("creating {}", dir.display()), e))?;
        Ok(Self { dest: dest.to_path_buf(), dir, committed: false })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves everything staged into the destination (files replace files of the same name).
    /// The destination's parent is trusted (the caller chose it); beneath it no symlink is
    /// followed: a link where a directory is being merged is replaced, never written through.
    pub fn commit(mut self) -> Result<(), TreeError> {
        let parent = match self.dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (Some(name), Some(staged)) = (self.dest.file_name(), self.dir.file_name()) else {
            return Err(TreeError::refused(&self.dest, "destination has no file name"));
        };
        let io = |e: io::Error| TreeError::io(format!("moving into {}", self.dest.display()), e);
        let top = Dir::open(&parent).map_err(io)?;
        match top.stat(name).map_err(io)? {
            Some(st) if st.kind == Kind::Dir => {
                links_stay_inside_merged(&self.dir, &self.dest)?;
                let from = top.open_dir(Path::new(staged)).map_err(io)?;
                let into = top.open_dir(Path::new(name)).map_err(io)?;
                merge_dir(&from, &into).map_err(io)?;
                top.remove_all(staged).map_err(io)?;
            }
            Some(_) => {
                // A file or a link (never followed) gives way to the tree.
                top.remove_file(name).map_err(io)?;
                top.rename(staged, &top, name).map_err(io)?;
            }
            None => top.rename(staged, &top, name).map_err(io)?,
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Merges the directory `from` into `into`, both open directories: a file or link replaces
/// what has its name, a directory merges into a directory, and a directory and a
/// non-directory replace each other. Nothing is resolved through a link.
fn merge_dir(from: &Dir, into: &Dir) -> io::Result<()> {
    for name in from.names()? {
        let Some(src) = from.stat(&name)? else { continue };
        let src_is_dir = src.kind == Kind::Dir;
        match into.stat(&name)? {
            Some(d) if d.kind == Kind::Dir && src_is_dir => {
                merge_dir(&from.open_dir(Path::new(&name))?, &into.open_dir(Path::new(&name))?)?;
            }
            Some(d) if d.kind == Kind::Dir || src_is_dir => {
                into.remove_all(&name)?;
                from.rename(&name, into, &name)?;
            }
            _ => from.rename(&name, into, &name)?,
        }
    }
    // Keep the merged directory's mode and mtime as sent.
    if let Ok(st) = from.own_stat() {
        let _ = into.set_mode(st.mode);
        let _ = into.set_mtime(st.mtime);
    }
    Ok(())
}

/// Checks an archive path: relative, no `..`, not empty. Returns it without `.` components.
fn sanitize(path: &Path) -> Result<PathBuf, TreeError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(TreeError::refused(path, "path contains '..'")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(TreeError::refused(path, "absolute path"));
            }
        }
    }
    Ok(out)
}

/// Whether symlink `link` (relative to `root`) with `target` stays inside `root` when resolved
/// against what is on disk now: every component that is itself a symlink is followed (up to
/// [`crate::links::MAX_HOPS`]), components that do not exist count as plain directories.
pub fn resolves_inside(root: &Path, link: &Path, target: &Path) -> bool {
    let on_disk = |rel: &Path| -> Option<PathBuf> {
        let here = root.join(rel);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                Some(fs::read_link(&here).unwrap_or_else(|_| PathBuf::from("/")))
            }
            _ => None,
        }
    };
    crate::links::stays_within(&on_disk, link, target)
}

/// Before a staged tree is merged into an existing `dest`: every link of the tree must still
/// resolve inside `dest` once merged, through the tree's own entries and through what `dest`
/// already holds (a link already there that leads out must not become the way out of a new
/// link that points at it). The staging dir is ours; `dest`'s entries are only looked at.
fn links_stay_inside_merged(staging: &Path, dest: &Path) -> Result<(), TreeError> {
    let link_at = |root: &Path, rel: &Path| -> Option<Option<PathBuf>> {
        let m = fs::symlink_metadata(root.join(rel)).ok()?;
        Some(if m.file_type().is_symlink() {
            Some(fs::read_link(root.join(rel)).unwrap_or_else(|_| PathBuf::from("/")))
        } else {
            None
        })
    };
    // The merged view: what the tree holds wins over what was there.
    let lookup = |rel: &Path| link_at(staging, rel).or_else(|| link_at(dest, rel)).flatten();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = staging.join(&rel);
        let entries =
            fs::read_dir(&dir).map_err(|e| TreeError::io(format!("reading {}", dir.display()), e))?;
        for e in entries {
            let e = e.map_err(|e| TreeError::io(format!("reading {}", dir.display()), e))?;
            let path = rel.join(e.file_name());
            let kind = e.file_type().map_err(|e| TreeError::io(format!("reading {}", dir.display()), e))?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_symlink() {
                let target = fs::read_link(e.path()).unwrap_or_else(|_| PathBuf::from("/"));
                if !crate::links::stays_within(&lookup, &path, &target) {
                    return Err(TreeError::refused(
                        &path,
                        format!(
                            "symlink to {} would leave the destination through a link already there",
                            target.display()
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Counts bytes read and fails past a limit (a decompression bomb stops here).
struct Limited<R> {
    inner: R,
    read: u64,
    limit: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(io::Error::other(LimitExceeded(self.limit)));
        }
        Ok(n)
    }
}

#[derive(Debug)]
struct LimitExceeded(u64);
impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stream exceeds the limit of {} bytes", self.0)
    }
}
impl std::error::Error for LimitExceeded {}

/// The target of a link entry; `what` names the kind of link in the refusal.
fn link_target<R: Read>(
    entry: &tar::Entry<'_, R>,
    raw_path: &Path,
    what: &str,
) -> Result<PathBuf, TreeError> {
    Ok(entry
        .link_name()
        .map_err(|e| map_read_err("reading link target", e))?
        .ok_or_else(|| TreeError::refused(raw_path, format!("{what} without a target")))?
        .into_owned())
}

fn map_read_err(context: impl Into<String>, e: io::Error) -> TreeError {
    if let Some(LimitExceeded(limit)) = e.get_ref().and_then(|i| i.downcast_ref::<LimitExceeded>()) {
        return TreeError::TooLarge { limit: *limit };
    }
    TreeError::io(context, e)
}

/// Unpacks the tar stream `input` into `staging` (see [`Staging`]), checking every entry.
/// The caller commits the staging directory only after verifying the stream's trailer.
pub fn unpack(input: impl Read, staging: &Path, limits: UnpackLimits) -> Result<TreeStats, TreeError> {
    let mut archive = tar::Archive::new(Limited { inner: input, read: 0, limit: limits.max_bytes });
    let mut stats = TreeStats::default();
    let mut dirs: Vec<(PathBuf, u32, u64)> = Vec::new();
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut known_dirs: HashSet<PathBuf> = HashSet::new();
    let mut buf = vec![0u8; COPY_BUF];
    let entries = archive.entries().map_err(|e| map_read_err("reading tar stream", e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| map_read_err("reading tar entry", e))?;
        let raw_path = entry.path().map_err(|e| map_read_err("reading entry path", e))?.into_owned();
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        let rel = sanitize(&raw_path)?;
        if rel.as_os_str().is_empty() {
            if kind.is_dir() {
                continue;
            }
            return Err(TreeError::refused(&raw_path, "entry has an empty name"));
        }
        let mode = entry.header().mode().map_err(|e| map_read_err("reading entry mode", e))? & 0o777;
        let mtime = entry.header().mtime().unwrap_or(0);
        let out = staging.join(&rel);
        match kind {
            tar::EntryType::Directory => {
                ensure_dir(staging, &rel, &mut known_dirs, &raw_path)?;
                dirs.push((rel, mode, mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                prepare_leaf(staging, &rel, &mut known_dirs, &raw_path)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(O_NOFOLLOW)
                    .mode(0o600)
                    .open(&out)
                    .map_err(|e| TreeError::io(format!("creating {}", out.display()), e))?;
                let mut written = 0u64;
                loop {
                    let n = entry
                        .read(&mut buf)
                        .map_err(|e| map_read_err(format!("reading {}", raw_path.display()), e))?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(&buf[..n])
                        .map_err(|e| TreeError::io(format!("writing {}", out.display()), e))?;
                    written += n as u64;
                }
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| TreeError::io(format!("setting mode of {}", out.display()), e))?;
                filetime::set_file_handle_times(&file, None, Some(FileTime::from_unix_time(mtime as i64, 0)))
                    .map_err(|e| TreeError::io(format!("setting mtime of {}", out.display()), e))?;
                stats.content_bytes += written;
            }
            tar::EntryType::Symlink => {
                let target = link_target(&entry, &raw_path, "symlink")?;
                if !resolves_inside(staging, &rel, &target) {
                    return Err(TreeError::refused(
                        &raw_path,
                        format!("symlink to {} points outside the destination", target.display()),
                    ));
                }
                prepare_leaf(staging, &rel, &mut known_dirs, &raw_path)?;
                std::os::unix::fs::symlink(&target, &out)
                    .map_err(|e| TreeError::io(format!("creating link {}", out.display()), e))?;
                let _ = filetime::set_symlink_file_times(
                    &out,
                    FileTime::from_unix_time(mtime as i64, 0),
                    FileTime::from_unix_time(mtime as i64, 0),
                );
                links.push((rel, target));
            }
            tar::EntryType::Link => {
                let target = link_target(&entry, &raw_path, "hardlink")?;
                let target_rel = sanitize(&target).map_err(|_| {
                    TreeError::refused(
                        &raw_path,
                        format!("hardlink to {} points outside the destination", target.display()),
                    )
                })?;
                // The target must be a regular file already unpacked, reached without symlinks.
                if !no_symlink_ancestors(staging, &target_rel)
                    || !fs::symlink_metadata(staging.join(&target_rel)).map(|m| m.is_file()).unwrap_or(false)
                {
                    return Err(TreeError::refused(
                        &raw_path,
                        format!("hardlink to {} does not name a file unpacked earlier", target.display()),
                    ));
                }
                prepare_leaf(staging, &rel, &mut known_dirs, &raw_path)?;
                fs::hard_link(staging.join(&target_rel), &out)
                    .map_err(|e| TreeError::io(format!("creating hardlink {}", out.display()), e))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(TreeError::refused(&raw_path, "device entries are not accepted"));
            }
            tar::EntryType::Fifo => {
                return Err(TreeError::refused(&raw_path, "fifo entries are not accepted"));
            }
            other => {
                return Err(TreeError::refused(&raw_path, format!("entry type {other:?} is not accepted")));
            }
        }
        stats.entries += 1;
    }
    // Drain what follows the end-of-archive blocks, so the whole stream is accounted for.
    let mut rest = archive.into_inner();
    loop {
        let n = rest.read(&mut buf).map_err(|e| map_read_err("reading tar stream", e))?;
        if n == 0 {
            break;
        }
    }
    // A later entry may have changed what an earlier symlink resolves through: check again.
    for (rel, target) in &links {
        if !resolves_inside(staging, rel, target) {
            return Err(TreeError::refused(
                rel,
                format!("symlink to {} points outside the destination", target.display()),
            ));
        }
    }
    // Directories last, deepest first, so read-only modes do not block their own contents.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0.components().count()));
    for (rel, mode, mtime) in dirs {
        let p = staging.join(&rel);
        fs::set_permissions(&p, fs::Permissions::from_mode(mode | 0o700))
            .map_err(|e| TreeError::io(format!("setting mode of {}", p.display()), e))?;
        let _ = filetime::set_file_mtime(&p, FileTime::from_unix_time(mtime as i64, 0));
    }
    Ok(stats)
}

fn no_symlink_ancestors(root: &Path, rel: &Path) -> bool {
    let mut cur = root.to_path_buf();
    let parent = rel.parent().unwrap_or(Path::new(""));
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// Creates `rel` and its parents as real directories, refusing to go through a symlink or
/// a file. `known` caches directories already checked.
fn ensure_dir(root: &Path, rel: &Path, known: &mut HashSet<PathBuf>, entry: &Path) -> Result<(), TreeError> {
    if known.contains(rel) {
        return Ok(());
    }
    let mut cur = PathBuf::new();
    for c in rel.components() {
        cur.push(c);
        if known.contains(&cur) {
            continue;
        }
        let abs = root.join(&cur);
        match fs::symlink_metadata(&abs) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(TreeError::refused(entry, format!("{} is not a directory", cur.display())));
            }
            Err(_) => {
                fs::create_dir(&abs).map_err(|e| TreeError::io(format!("creating {}", abs.display()), e))?;
            }
        }
        known.insert(cur.clone());
    }
    Ok(())
}

/// Prepares the parent directories of a file or link entry and removes an earlier entry of the
/// same name (a later entry wins, as with tar), never a directory.
fn prepare_leaf(
    root: &Path,
    rel: &Path,
    known: &mut HashSet<PathBuf>,
    entry: &Path,
) -> Result<(), TreeError> {
    if let Some(parent) = rel.parent()
        && !parent.as_os_str().is_empty()
    {
        ensure_dir(root, parent, known, entry)?;
    }
    let abs = root.join(rel);
    if let Ok(m) = fs::symlink_metadata(&abs) {
        if m.is_dir() {
            return Err(TreeError::refused(entry, "would replace a directory"));
        }
        fs::remove_file(&abs).map_err(|e| TreeError::io(format!("replacing {}", abs.display()), e))?;
    }
    Ok(())
}

/// Unpacks a local tar stream into `dest` through a staging directory (no digest to check).
pub fn unpack_into(input: impl Read, dest: &Path, limits: UnpackLimits) -> Result<TreeStats, TreeError> {
    let staging = Staging::new(dest)?;
    let stats = unpack(input, staging.path(), limits)?;
    staging.commit()?;
    Ok(stats)
}

/// Like [`unpack_into`], staging in `staging` (which must not exist), which is left as it is
/// when the unpack fails: a resumed transfer can reuse what it holds. On success it becomes
/// `dest` (renamed when `dest` does not exist, merged in otherwise).
pub fn unpack_into_at(
    input: impl Read,
    dest: &Path,
    staging: &Path,
    limits: UnpackLimits,
) -> Result<TreeStats, TreeError> {
    fs::create_dir(staging).map_err(|e| TreeError::io(format!("creating {}", staging.display()), e))?;
    let stats = unpack(input, staging, limits)?;
    let io = |e: io::Error| TreeError::io(format!("moving into {}", dest.display()), e);
    match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::rename(staging, dest).map_err(io)?,
        Ok(m) if m.is_dir() => {
            links_stay_inside_merged(staging, dest)?;
            let from = Dir::open(staging).map_err(io)?;
            let into = Dir::open(dest).map_err(io)?;
            merge_dir(&from, &into).map_err(io)?;
            fs::remove_dir_all(staging).map_err(io)?;
        }
        Ok(_) => return Err(TreeError::refused(dest, "exists and is not a directory")),
        Err(e) => return Err(io(e)),
    }
    Ok(stats)
}

/// Packs the entries `paths` (relative to `root`, each a file, symlink or directory) into
/// `out` at their relative paths, preceded by entries for their parent directories. This is
/// how a snapshot holds outputs: `/results/a.txt` harvested from a view rooted at `root` is
/// the entry `results/a.txt`.
pub fn pack_paths(root: &Path, paths: &[PathBuf], out: impl Write) -> Result<TreeStats, TreeError> {
    pack_paths_into(root, paths, out, TreeStats::default())
}

fn pack_paths_into(
    root: &Path,
    paths: &[PathBuf],
    out: impl Write,
    mut stats: TreeStats,
) -> Result<TreeStats, TreeError> {
    let mut builder = tar::Builder::new(io::BufWriter::with_capacity(COPY_BUF, out));
    builder.follow_symlinks(false);
    let mut emitted: HashSet<PathBuf> = HashSet::new();
    let mut sorted: Vec<PathBuf> = Vec::with_capacity(paths.len());
    for p in paths {
        sorted.push(sanitize(p)?);
    }
    sorted.sort();
    sorted.dedup();
    let root_dir = crate::fsafe::Dir::open(root).map_err(|e| TreeError::io("opening the tree", e))?;
    for rel in &sorted {
        if rel.as_os_str().is_empty() {
            return Err(TreeError::refused(rel, "cannot pack the whole root as an entry"));
        }
        // Every directory above a packed path is a real directory, never a link followed.
        if let Some(parent) = rel.parent() {
            root_dir.open_dir(parent).map_err(|e| TreeError::refused(rel, e.to_string()))?;
        }
        // Skip paths inside a directory packed already.
        if rel
            .ancestors()
            .skip(1)
            .any(|a| emitted.contains(a) && sorted.binary_search(&a.to_path_buf()).is_ok())
        {
            continue;
        }
        let mut parents: Vec<&Path> = rel.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()).collect();
        parents.reverse();
        for parent in parents {
            if emitted.insert(parent.to_path_buf()) {
                let abs = root.join(parent);
                let meta = fs::symlink_metadata(&abs)
                    .map_err(|e| TreeError::io(format!("reading {}", abs.display()), e))?;
                if !meta.is_dir() {
                    return Err(TreeError::refused(parent, "parent is not a directory"));
                }
                append_dir(&mut builder, parent, &meta, &mut stats, &abs)?;
            }
        }
        let abs = root.join(rel);
        let meta =
            fs::symlink_metadata(&abs).map_err(|e| TreeError::io(format!("reading {}", abs.display()), e))?;
        let ft = meta.file_type();
        emitted.insert(rel.clone());
        if ft.is_dir() {
            append_dir(&mut builder, rel, &meta, &mut stats, &abs)?;
            pack_dir(&mut builder, root, rel, rel, &mut stats)?;
        } else if ft.is_file() {
            append_file(&mut builder, &abs, rel, &meta, &mut stats)?;
        } else if ft.is_symlink() {
            append_symlink(&mut builder, root, rel, rel, &meta, &mut stats, &abs)?;
        } else {
            return Err(TreeError::refused(rel, "device, fifo or socket cannot be packed"));
        }
    }
    finish(builder)?;
    Ok(stats)
}

fn append_dir<W: Write>(
    builder: &mut tar::Builder<W>,
    rel: &Path,
    meta: &fs::Metadata,
    stats: &mut TreeStats,
    abs: &Path,
) -> Result<(), TreeError> {
    let mut header = base_header(meta, tar::EntryType::Directory);
    header.set_size(0);
    builder
        .append_data(&mut header, rel, io::empty())
        .map_err(|e| TreeError::io(format!("packing {}", abs.display()), e))?;
    stats.entries += 1;
    Ok(())
}

fn append_symlink<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    within: &Path,
    meta: &fs::Metadata,
    stats: &mut TreeStats,
    abs: &Path,
) -> Result<(), TreeError> {
    let target =
        fs::read_link(abs).map_err(|e| TreeError::io(format!("reading link {}", abs.display()), e))?;
    // Judged from where it will sit: inside the declared path it belongs to.
    let inside = match rel.strip_prefix(within) {
        Ok(r) => resolves_inside(&root.join(within), r, &target) && !r.as_os_str().is_empty(),
        Err(_) => false,
    };
    if !inside {
        let declared = if within.as_os_str().is_empty() {
            "the tree".to_string()
        } else {
            format!("/{}", within.display())
        };
        return Err(TreeError::refused(
            rel,
            format!("symlink to {} leads outside {declared}", target.display()),
        ));
    }
    let mut header = base_header(meta, tar::EntryType::Symlink);
    header.set_size(0);
    builder
        .append_link(&mut header, rel, &target)
        .map_err(|e| TreeError::io(format!("packing {}", abs.display()), e))?;
    stats.entries += 1;
    Ok(())
}

/// What an archive entry is, for an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Hardlink,
}

/// One entry of an archive's index.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IndexEntry {
    /// Relative path, without `./` or a leading `/`.
    pub path: String,
    pub kind: EntryKind,
    /// Content bytes (0 for everything but files).
    pub size: u64,
    /// A link's target as stored (indexes written before links were indexed have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Lists a tar stream without writing anything: the index of a stored snapshot. Entries
/// that [`unpack`] would refuse by name (absolute, `..`, devices) are refused here too.
pub fn list(input: impl Read, limits: UnpackLimits) -> Result<(Vec<IndexEntry>, TreeStats), TreeError> {
    let mut archive = tar::Archive::new(Limited { inner: input, read: 0, limit: limits.max_bytes });
    let mut out = Vec::new();
    let mut stats = TreeStats::default();
    let entries = archive.entries().map_err(|e| map_read_err("reading tar stream", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| map_read_err("reading tar entry", e))?;
        let raw_path = entry.path().map_err(|e| map_read_err("reading entry path", e))?.into_owned();
        let kind = match entry.header().entry_type() {
            tar::EntryType::XGlobalHeader => continue,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Link => EntryKind::Hardlink,
            other => {
                return Err(TreeError::refused(&raw_path, format!("entry type {other:?} is not accepted")));
            }
        };
        let rel = sanitize(&raw_path)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let size = if kind == EntryKind::File { entry.size() } else { 0 };
        let target = match kind {
            EntryKind::Symlink | EntryKind::Hardlink => {
                let t = entry
                    .link_name()
                    .map_err(|e| map_read_err("reading link target", e))?
                    .ok_or_else(|| TreeError::refused(&raw_path, "link without a target"))?;
                Some(
                    t.to_str()
                        .ok_or_else(|| TreeError::refused(&raw_path, "link target is not UTF-8"))?
                        .to_string(),
                )
            }
            _ => None,
        };
        stats.entries += 1;
        stats.content_bytes += size;
        let path =
            rel.to_str().ok_or_else(|| TreeError::refused(&raw_path, "path is not UTF-8"))?.to_string();
        out.push(IndexEntry { path, kind, size, target });
    }
    Ok((out, stats))
}

/// What writing a snapshot path out did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutStats {
    /// Files (and links) written, each to a temp file renamed over its destination.
    pub written: u64,
    /// Files and links that already held the stored content: left as they were.
    pub unchanged: u64,
    pub dirs_created: u64,
    pub bytes_written: u64,
}

/// A write-out prepared but not yet visible: new content waits in temp files beside each
/// destination. [`PendingOut::commit`] renames them over their destinations; dropping it
/// instead removes the temp files and every directory it created, leaving the destination as
/// it was.
pub struct PendingOut {
    root: Dir,
    /// Each parent directory is held open once, however many files it gets.
    renames: Vec<(std::sync::Arc<Dir>, OsString, OsString)>,
    /// Files that hold the stored bytes but not the stored mode: set at commit.
    modes: Vec<(std::sync::Arc<Dir>, OsString, u32)>,
    created: Vec<PathBuf>,
    dir_times: Vec<(PathBuf, u32, u64)>,
    done: bool,
}

impl PendingOut {
    pub fn commit(mut self) -> Result<(), TreeError> {
        // On a failure, dropping `self` removes every temp file still there (those renamed
        // already are gone under their temp names).
        for (dir, temp, name) in &self.renames {
            dir.rename(temp, dir, name).map_err(|e| TreeError::io("writing out", e))?;
        }
        self.renames.clear();
        for (dir, name, mode) in std::mem::take(&mut self.modes) {
            if let Ok(f) = dir.open_file(&name) {
                let _ = f.set_permissions(fs::Permissions::from_mode(mode));
            }
        }
        // Directories this write-out created take the stored mode and mtime, deepest first.
        self.dir_times.sort_by_key(|d| std::cmp::Reverse(d.0.components().count()));
        for (rel, mode, mtime) in &self.dir_times {
            if self.created.contains(rel)
                && let Ok(d) = self.root.open_dir(rel)
            {
                let _ = d.set_mode(mode | 0o700);
                let _ = d.set_mtime(*mtime as i64);
            }
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for PendingOut {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for (dir, temp, _) in &self.renames {
            let _ = dir.remove_file(temp);
        }
        for rel in self.created.iter().rev() {
            if let Ok((parent, name)) = crate::fsafe::split(rel)
                && let Ok(p) = self.root.open_dir(&parent)
            {
                let _ = p.remove_dir(&name);
            }
        }
    }
}

/// Fills `buf` from `r` as far as it goes; returns how many bytes were read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes `entry` (of `size` bytes) as `name` in `dir`, unless `existing` already holds the
/// same bytes. Returns the temp file written, or `None` when the file was left as it was.
fn stage_file(
    entry: &mut impl Read,
    size: u64,
    dir: &Dir,
    name: &std::ffi::OsStr,
    existing: Option<crate::fsafe::EntryStat>,
    bufs: &mut (Vec<u8>, Vec<u8>),
) -> io::Result<Option<(OsString, fs::File, u64)>> {
    let (buf, cmp) = bufs;
    let mut head = 0u64;
    let mut pending: Option<usize> = None;
    if let Some(st) = existing
        && st.kind == Kind::File
        && st.size == size
    {
        let mut cur = dir.open_file(name)?;
        loop {
            let n = read_full(entry, buf)?;
            if n == 0 {
                return Ok(None);
            }
            let m = read_full(&mut cur, &mut cmp[..n])?;
            if m != n || buf[..n] != cmp[..n] {
                pending = Some(n);
                break;
            }
            head += n as u64;
        }
    }
    let temp = Dir::temp_name(name);
    let mut out = dir.create_new(&temp, 0o600)?;
    let mut written = 0u64;
    if head > 0 {
        // The first `head` bytes matched: take them from the existing file.
        let cur = dir.open_file(name)?;
        written += io::copy(&mut cur.take(head), &mut out)?;
    }
    if let Some(n) = pending {
        out.write_all(&buf[..n])?;
        written += n as u64;
    }
    loop {
        let n = entry.read(buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        written += n as u64;
    }
    Ok(Some((temp, out, written)))
}

/// Prepares writing the entry `isp` of the tar stream `input` (and everything below it) to
/// `dest_rel` beneath the trusted directory `root`, without making anything visible: see
/// [`PendingOut`]. Nothing beneath `root` is resolved through a symlink (an error names the
/// link and its target); a file that already holds the stored bytes is left as it is (same
/// inode, not rewritten); nothing is ever deleted, so a destination directory holding a file
/// the stream names as a directory (or the reverse) is refused. Links in the stream must
/// stay within `isp` judged from where they will sit (see [`crate::links`]). The caller
/// verifies the stream's digest before committing.
pub fn stage_out(
    input: impl Read,
    isp: &Path,
    root: &Path,
    dest_rel: &Path,
    limits: UnpackLimits,
) -> Result<(PendingOut, WriteOutStats), TreeError> {
    let isp = sanitize(isp)?;
    let dest_rel = sanitize(dest_rel)?;
    if isp.as_os_str().is_empty() || dest_rel.as_os_str().is_empty() {
        return Err(TreeError::refused(&isp, "a write-out needs a path in the snapshot and a destination"));
    }
    let root_dir = Dir::open(root).map_err(|e| TreeError::io(format!("opening {}", root.display()), e))?;
    let mut pending = PendingOut {
        root: root_dir.try_clone().map_err(|e| TreeError::io("opening the root", e))?,
        renames: Vec::new(),
        modes: Vec::new(),
        created: Vec::new(),
        dir_times: Vec::new(),
        done: false,
    };
    let mut stats = WriteOutStats::default();
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut seen = false;
    // Parent directories held for the commit, one handle each.
    let mut held: std::collections::HashMap<PathBuf, std::sync::Arc<Dir>> = std::collections::HashMap::new();
    let mut hold = |parent_rel: &Path, parent: &Dir| -> Result<std::sync::Arc<Dir>, TreeError> {
        if let Some(d) = held.get(parent_rel) {
            return Ok(d.clone());
        }
        let d = std::sync::Arc::new(parent.try_clone().map_err(|e| TreeError::io("opening a directory", e))?);
        held.insert(parent_rel.to_path_buf(), d.clone());
        Ok(d)
    };
    let mut bufs = (vec![0u8; COPY_BUF], vec![0u8; COPY_BUF]);
    let mut archive = tar::Archive::new(Limited { inner: input, read: 0, limit: limits.max_bytes });
    let entries = archive.entries().map_err(|e| map_read_err("reading tar stream", e))?;
    let dest_display = |rest: &Path| root.join(&dest_rel).join(rest);
    for entry in entries {
        let mut entry = entry.map_err(|e| map_read_err("reading tar entry", e))?;
        let raw_path = entry.path().map_err(|e| map_read_err("reading entry path", e))?.into_owned();
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        let rel = sanitize(&raw_path)?;
        let Ok(rest) = rel.strip_prefix(&isp) else { continue };
        let rest = rest.to_path_buf();
        seen = true;
        let target_rel = dest_rel.join(&rest);
        let (parent_rel, name) =
            crate::fsafe::split(&target_rel).map_err(|e| TreeError::refused(&raw_path, e.to_string()))?;
        let before = pending.created.len();
        let parent = root_dir
            .create_dirs(&parent_rel, &mut pending.created)
            .map_err(|e| TreeError::refused(&raw_path, e.to_string()))?;
        stats.dirs_created += (pending.created.len() - before) as u64;
        let existing = parent
            .stat(&name)
            .map_err(|e| TreeError::io(format!("reading {}", dest_display(&rest).display()), e))?;
        let mode = entry.header().mode().map_err(|e| map_read_err("reading entry mode", e))? & 0o777;
        let mtime = entry.header().mtime().unwrap_or(0);
        match kind {
            tar::EntryType::Directory => match existing {
                Some(st) if st.kind == Kind::Dir => {}
                Some(st) if st.kind == Kind::Symlink => {
                    // Never written through: the fsafe error names the link and its target.
                    let e =
                        parent.open_dir(Path::new(&name)).err().map(|e| e.to_string()).unwrap_or_default();
                    return Err(TreeError::refused(&raw_path, e));
                }
                Some(_) => {
                    return Err(TreeError::refused(
                        &raw_path,
                        format!(
                            "{} exists and is not a directory (left as it is)",
                            dest_display(&rest).display()
                        ),
                    ));
                }
                None => {
                    let before = pending.created.len();
                    root_dir
                        .create_dirs(&target_rel, &mut pending.created)
                        .map_err(|e| TreeError::refused(&raw_path, e.to_string()))?;
                    stats.dirs_created += (pending.created.len() - before) as u64;
                    pending.dir_times.push((target_rel.clone(), mode, mtime));
                }
            },
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if matches!(existing, Some(st) if st.kind == Kind::Dir) {
                    return Err(TreeError::refused(
                        &raw_path,
                        format!("{} is a directory (left as it is)", dest_display(&rest).display()),
                    ));
                }
                let size = entry.size();
                let staged = stage_file(&mut entry, size, &parent, &name, existing, &mut bufs)
                    .map_err(|e| map_read_err(format!("writing {}", dest_display(&rest).display()), e))?;
                match staged {
                    None => {
                        stats.unchanged += 1;
                        if let Some(st) = existing
                            && st.mode & 0o777 != mode
                            && let Ok(d) = hold(&parent_rel, &parent)
                        {
                            pending.modes.push((d, name.clone(), mode));
                        }
                    }
                    Some((temp, file, written)) => {
                        pending.renames.push((hold(&parent_rel, &parent)?, temp, name.clone()));
                        file.set_permissions(fs::Permissions::from_mode(mode))
                            .map_err(|e| TreeError::io("setting a mode", e))?;
                        filetime::set_file_handle_times(
                            &file,
                            None,
                            Some(FileTime::from_unix_time(mtime as i64, 0)),
                        )
                        .map_err(|e| TreeError::io("setting an mtime", e))?;
                        file.sync_all().map_err(|e| TreeError::io("syncing", e))?;
                        stats.written += 1;
                        stats.bytes_written += written;
                    }
                }
            }
            tar::EntryType::Symlink => {
                let target = link_target(&entry, &raw_path, "symlink")?;
                links.push((rest.clone(), target.clone()));
                match existing {
                    Some(st) if st.kind == Kind::Dir => {
                        return Err(TreeError::refused(
                            &raw_path,
                            format!("{} is a directory (left as it is)", dest_display(&rest).display()),
                        ));
                    }
                    Some(st)
                        if st.kind == Kind::Symlink
                            && fs::read_link(parent.path().join(&name)).ok().as_deref() == Some(&target) =>
                    {
                        stats.unchanged += 1;
                    }
                    _ => {
                        let temp = Dir::temp_name(&name);
                        parent.symlink(&target, &temp).map_err(|e| TreeError::io("writing out", e))?;
                        pending.renames.push((hold(&parent_rel, &parent)?, temp, name.clone()));
                        stats.written += 1;
                    }
                }
            }
            other => {
                return Err(TreeError::refused(
                    &raw_path,
                    format!("entry type {other:?} is not written out"),
                ));
            }
        }
    }
    // Drain what follows the end-of-archive blocks, so the whole stream is accounted for.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| map_read_err("reading tar stream", e))?;
    if !seen {
        return Err(TreeError::refused(&isp, "the snapshot holds no such path"));
    }
    if let Some((link, target)) = crate::links::first_escape(&links, Path::new("")) {
        return Err(TreeError::refused(
            isp.join(link),
            format!("symlink to {} leads outside /{}", target.display(), isp.display()),
        ));
    }
    Ok((pending, stats))
}

/// One entry of a tree as a manifest records it: what a tar header carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    /// Relative path, without `./` or a leading `/`.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Content bytes (0 for everything but files).
    pub size: u64,
    /// A link's target.
    pub target: Option<String>,
}

/// Reads a tar stream entry by entry, handing each to `f` with a reader of its content (files
/// only; empty for the rest). Entries [`unpack`] would refuse by name are refused here too;
/// links are judged when the tree is unpacked.
pub fn visit(
    input: impl Read,
    limits: UnpackLimits,
    mut f: impl FnMut(EntryMeta, &mut dyn Read) -> Result<(), TreeError>,
) -> Result<TreeStats, TreeError> {
    let mut archive = tar::Archive::new(Limited { inner: input, read: 0, limit: limits.max_bytes });
    let mut stats = TreeStats::default();
    let entries = archive.entries().map_err(|e| map_read_err("reading tar stream", e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| map_read_err("reading tar entry", e))?;
        let raw_path = entry.path().map_err(|e| map_read_err("reading entry path", e))?.into_owned();
        let kind = match entry.header().entry_type() {
            tar::EntryType::XGlobalHeader => continue,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Link => EntryKind::Hardlink,
            other => {
                return Err(TreeError::refused(&raw_path, format!("entry type {other:?} is not accepted")));
            }
        };
        let rel = sanitize(&raw_path)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let path =
            rel.to_str().ok_or_else(|| TreeError::refused(&raw_path, "path is not UTF-8"))?.to_string();
        let target = match kind {
            EntryKind::Symlink | EntryKind::Hardlink => {
                let t = entry
                    .link_name()
                    .map_err(|e| map_read_err("reading link target", e))?
                    .ok_or_else(|| TreeError::refused(&raw_path, "link without a target"))?;
                Some(
                    t.to_str()
                        .ok_or_else(|| TreeError::refused(&raw_path, "link target is not UTF-8"))?
                        .to_string(),
                )
            }
            _ => None,
        };
        let header = entry.header();
        let mode = header.mode().map_err(|e| map_read_err("reading entry mode", e))? & 0o7777;
        let mtime = header.mtime().map_err(|e| map_read_err("reading entry mtime", e))?;
        let size = if kind == EntryKind::File { entry.size() } else { 0 };
        stats.entries += 1;
        stats.content_bytes += size;
        let meta =
            EntryMeta { path, kind, mode, mtime: i64::try_from(mtime).unwrap_or(i64::MAX), size, target };
        f(meta, &mut entry)?;
    }
    Ok(stats)
}

/// Writes a tree as a tar stream, entry by entry (the inverse of [`visit`]).
pub struct TarWriter<W: Write> {
    builder: tar::Builder<io::BufWriter<W>>,
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        Self { builder: tar::Builder::new(io::BufWriter::with_capacity(COPY_BUF, out)) }
    }

    /// Appends `meta`; a file's content is read from `content`, exactly `meta.size` bytes.
    pub fn append(&mut self, meta: &EntryMeta, content: &mut dyn Read) -> Result<(), TreeError> {
        let kind = match meta.kind {
            EntryKind::File => tar::EntryType::Regular,
            EntryKind::Dir => tar::EntryType::Directory,
            EntryKind::Symlink => tar::EntryType::Symlink,
            EntryKind::Hardlink => tar::EntryType::Link,
        };
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(meta.mode & 0o7777);
        header.set_mtime(meta.mtime.max(0) as u64);
        header.set_uid(0);
        header.set_gid(0);
        let err = |e| TreeError::io(format!("writing entry {}", meta.path), e);
        match (&meta.kind, &meta.target) {
            (EntryKind::File, _) => {
                header.set_size(meta.size);
                self.builder.append_data(&mut header, &meta.path, content.take(meta.size)).map_err(err)
            }
            (EntryKind::Dir, _) => {
                header.set_size(0);
                self.builder.append_data(&mut header, &meta.path, io::empty()).map_err(err)
            }
            (_, Some(target)) => {
                header.set_size(0);
                self.builder.append_link(&mut header, &meta.path, target).map_err(err)
            }
            (_, None) => Err(TreeError::refused(&meta.path, "link without a target")),
        }
    }

    /// Writes the end-of-archive blocks and flushes.
    pub fn finish(self) -> Result<(), TreeError> {
        finish(self.builder)
    }
}
