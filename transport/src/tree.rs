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

/// Buffer size for file contents in both directions.
pub const COPY_BUF: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("refused entry {entry:?}: {reason}")]
    Refused { entry: String, reason: String },
    #[error("stream exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
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
}

/// Packs the tree rooted at `src` (a directory, or a single file) into `out`.
pub fn pack(src: &Path, out: impl Write) -> Result<TreeStats, TreeError> {
    let mut builder = tar::Builder::new(io::BufWriter::with_capacity(COPY_BUF, out));
    builder.follow_symlinks(false);
    let mut stats = TreeStats::default();
    let meta =
        fs::symlink_metadata(src).map_err(|e| TreeError::io(format!("reading {}", src.display()), e))?;
    if meta.is_file() {
        let name = src.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("file"));
        append_file(&mut builder, src, &name, &meta, &mut stats)?;
    } else if meta.is_dir() {
        let root =
            fs::canonicalize(src).map_err(|e| TreeError::io(format!("resolving {}", src.display()), e))?;
        pack_dir(&mut builder, &root, Path::new(""), &mut stats)?;
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

fn pack_dir<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
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
            pack_dir(builder, root, &rel_child, stats)?;
        } else if ft.is_file() {
            append_file(builder, &path, &rel_child, &meta, stats)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path)
                .map_err(|e| TreeError::io(format!("reading link {}", path.display()), e))?;
            if !resolves_inside(root, &rel_child, &target) {
                return Err(TreeError::refused(
                    &rel_child,
                    format!("symlink to {} points outside the tree", target.display()),
                ));
            }
            let mut header = base_header(&meta, tar::EntryType::Symlink);
            header.set_size(0);
            builder
                .append_link(&mut header, &rel_child, &target)
                .map_err(|e| TreeError::io(format!("packing {}", path.display()), e))?;
            stats.entries += 1;
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
    let file = fs::File::open(path).map_err(|e| TreeError::io(format!("opening {}", path.display()), e))?;
    let mut header = base_header(meta, tar::EntryType::Regular);
    header.set_size(meta.len());
    // A file that changes size while being read would corrupt the archive; take exactly len.
    builder
        .append_data(&mut header, rel, io::BufReader::with_capacity(COPY_BUF, file.take(meta.len())))
        .map_err(|e| TreeError::io(format!("packing {}", path.display()), e))?;
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
    pub fn commit(mut self) -> Result<(), TreeError> {
        let dest_is_dir = fs::symlink_metadata(&self.dest).map(|m| m.is_dir()).unwrap_or(false);
        if !dest_is_dir {
            if fs::symlink_metadata(&self.dest).is_ok() {
                remove_any(&self.dest)?;
            }
            fs::rename(&self.dir, &self.dest)
                .map_err(|e| TreeError::io(format!("moving into {}", self.dest.display()), e))?;
        } else {
            merge_dir(&self.dir, &self.dest)?;
            fs::remove_dir_all(&self.dir)
                .map_err(|e| TreeError::io(format!("removing {}", self.dir.display()), e))?;
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

fn remove_any(path: &Path) -> Result<(), TreeError> {
    let meta =
        fs::symlink_metadata(path).map_err(|e| TreeError::io(format!("reading {}", path.display()), e))?;
    let r = if meta.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    r.map_err(|e| TreeError::io(format!("removing {}", path.display()), e))
}

fn merge_dir(from: &Path, into: &Path) -> Result<(), TreeError> {
    let from_meta =
        fs::symlink_metadata(from).map_err(|e| TreeError::io(format!("reading {}", from.display()), e))?;
    for entry in fs::read_dir(from).map_err(|e| TreeError::io(format!("listing {}", from.display()), e))? {
        let entry = entry.map_err(|e| TreeError::io(format!("listing {}", from.display()), e))?;
        let src = entry.path();
        let dst = into.join(entry.file_name());
        let src_is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        match fs::symlink_metadata(&dst) {
            Ok(m) if m.is_dir() && src_is_dir => merge_dir(&src, &dst)?,
            Ok(m) if m.is_dir() || src_is_dir => {
                remove_any(&dst)?;
                fs::rename(&src, &dst)
                    .map_err(|e| TreeError::io(format!("moving into {}", dst.display()), e))?;
            }
            _ => fs::rename(&src, &dst)
                .map_err(|e| TreeError::io(format!("moving into {}", dst.display()), e))?,
        }
    }
    // Keep the merged directory's mode and mtime as sent.
    let _ = fs::set_permissions(into, from_meta.permissions());
    let _ = filetime::set_file_mtime(into, FileTime::from_last_modification_time(&from_meta));
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
/// against what is on disk now: every component that is itself a symlink is followed (up to 40
/// hops), components that do not exist count as plain directories.
pub fn resolves_inside(root: &Path, link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut stack: Vec<OsString> = link
        .parent()
        .map(|p| {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(n) => Some(n.to_os_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let mut hops = 0;
    walk_target(root, &mut stack, target, &mut hops)
}

fn walk_target(root: &Path, stack: &mut Vec<OsString>, target: &Path, hops: &mut u32) -> bool {
    for c in target.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if stack.pop().is_none() {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
            Component::Normal(n) => {
                stack.push(n.to_os_string());
                let here: PathBuf = root.join(stack.iter().collect::<PathBuf>());
                if let Ok(meta) = fs::symlink_metadata(&here)
                    && meta.file_type().is_symlink()
                {
                    *hops += 1;
                    if *hops > 40 {
                        return false;
                    }
                    let Ok(next) = fs::read_link(&here) else { return false };
                    if next.is_absolute() {
                        return false;
                    }
                    stack.pop();
                    if !walk_target(root, stack, &next, hops) {
                        return false;
                    }
                }
            }
        }
    }
    true
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
                    .custom_flags(libc::O_NOFOLLOW)
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
                let target = entry
                    .link_name()
                    .map_err(|e| map_read_err("reading link target", e))?
                    .ok_or_else(|| TreeError::refused(&raw_path, "symlink without a target"))?
                    .into_owned();
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
                let target = entry
                    .link_name()
                    .map_err(|e| map_read_err("reading link target", e))?
                    .ok_or_else(|| TreeError::refused(&raw_path, "hardlink without a target"))?
                    .into_owned();
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

/// Packs the entries `paths` (relative to `root`, each a file, symlink or directory) into
/// `out` at their relative paths, preceded by entries for their parent directories. This is
/// how a snapshot holds outputs: `/results/a.txt` harvested from a view rooted at `root` is
/// the entry `results/a.txt`.
pub fn pack_paths(root: &Path, paths: &[PathBuf], out: impl Write) -> Result<TreeStats, TreeError> {
    let mut builder = tar::Builder::new(io::BufWriter::with_capacity(COPY_BUF, out));
    builder.follow_symlinks(false);
    let mut stats = TreeStats::default();
    let mut emitted: HashSet<PathBuf> = HashSet::new();
    let mut sorted: Vec<PathBuf> = Vec::with_capacity(paths.len());
    for p in paths {
        sorted.push(sanitize(p)?);
    }
    sorted.sort();
    sorted.dedup();
    for rel in &sorted {
        if rel.as_os_str().is_empty() {
            return Err(TreeError::refused(rel, "cannot pack the whole root as an entry"));
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
            pack_dir(&mut builder, root, rel, &mut stats)?;
        } else if ft.is_file() {
            append_file(&mut builder, &abs, rel, &meta, &mut stats)?;
        } else if ft.is_symlink() {
            append_symlink(&mut builder, root, rel, &meta, &mut stats, &abs)?;
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
    meta: &fs::Metadata,
    stats: &mut TreeStats,
    abs: &Path,
) -> Result<(), TreeError> {
    let target =
        fs::read_link(abs).map_err(|e| TreeError::io(format!("reading link {}", abs.display()), e))?;
    if !resolves_inside(root, rel, &target) {
        return Err(TreeError::refused(
            rel,
            format!("symlink to {} points outside the tree", target.display()),
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
        stats.entries += 1;
        stats.content_bytes += size;
        let path =
            rel.to_str().ok_or_else(|| TreeError::refused(&raw_path, "path is not UTF-8"))?.to_string();
        out.push(IndexEntry { path, kind, size });
    }
    Ok((out, stats))
}
