//! Writing beneath a destination root without ever following a symlink. This is the only
//! module that reaches the filesystem through rustix (`endpoint` sets socket options with it).
//!
//! A [`Dir`] is an open directory. Every path handed to its methods is relative, made of
//! plain components only, and resolved one component at a time with `openat(O_NOFOLLOW |
//! O_DIRECTORY)`: a component that is a symlink (or not a directory) is refused with an error
//! naming the link and its target. This is what `openat2`'s `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS` gives, done by hand so that it also holds on kernels before 5.6 (the
//! RHEL 8 nodes of many HPC sites). Because each step works on a directory file descriptor,
//! swapping a directory for a link after it was checked changes nothing: the descriptor still
//! names the directory that was checked.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

/// `O_NOFOLLOW`, for `std::os::unix::fs::OpenOptionsExt::custom_flags` (which takes raw bits):
/// a path opened with it that ends in a symlink is refused, not followed.
/// Most bytes of a file's name kept in its temporary name (the rest of which is 27 bytes).
pub const TEMP_BASE_MAX: usize = 200;
pub const O_NOFOLLOW: i32 = OFlags::NOFOLLOW.bits() as i32;

/// What one directory entry is, read without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// An entry's kind, size and identity.
#[derive(Debug, Clone, Copy)]
pub struct EntryStat {
    pub kind: Kind,
    pub size: u64,
    pub ino: u64,
    pub dev: u64,
    pub mode: u32,
    /// Modification time, seconds.
    pub mtime: i64,
}

fn entry_stat(st: &rustix::fs::Stat) -> EntryStat {
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    };
    EntryStat {
        kind,
        size: st.st_size as u64,
        ino: st.st_ino,
        dev: st.st_dev,
        mode: st.st_mode & 0o7777,
        mtime: st.st_mtime,
    }
}

/// An open directory beneath which paths are resolved without following symlinks.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn err(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

/// The plain components of `rel`, refusing anything else (absolute, `..`).
fn components(rel: &Path) -> io::Result<Vec<&OsStr>> {
    let mut out = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is not a plain relative path", rel.display()),
                ));
            }
        }
    }
    Ok(out)
}

fn single(name: &OsStr) -> io::Result<&OsStr> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not a file name")));
    }
    Ok(name)
}

impl Dir {
    /// Opens `path`, a directory the caller trusts (the operator's destination, the agent's
    /// own work dir): symlinks in `path` itself are followed, nothing beneath it ever is.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| {
                io::Error::new(io::Error::from(e).kind(), format!("opening {}: {e}", path.display()))
            })?;
        Ok(Dir { fd, path: path.to_path_buf() })
    }

    /// The path this directory was reached by (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn refuse_link(&self, name: &OsStr) -> io::Error {
        let at = self.path.join(name);
        let target = rustix::fs::readlinkat(&self.fd, name, Vec::new())
            .map(|t| PathBuf::from(OsStr::from_bytes(t.as_bytes())).display().to_string())
            .unwrap_or_else(|_| "?".into());
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} -> {target} is a symlink: refusing to go through it", at.display()),
        )
    }

    /// Opens the child directory `name`, refusing a symlink or anything but a directory.
    fn child(&self, name: &OsStr) -> io::Result<Dir> {
        let path = self.path.join(name);
        match rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Dir { fd, path }),
            Err(e) if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR => {
                match self.stat(name)? {
                    Some(s) if s.kind == Kind::Symlink => Err(self.refuse_link(name)),
                    _ => Err(io::Error::new(
                        io::ErrorKind::NotADirectory,
                        format!("{} is not a directory", path.display()),
                    )),
                }
            }
            Err(e) => Err(io::Error::new(err(e).kind(), format!("opening {}: {e}", path.display()))),
        }
    }

    /// Opens the directory `rel` beneath this one; no component may be a symlink.
    pub fn open_dir(&self, rel: &Path) -> io::Result<Dir> {
        let mut cur = self.try_clone()?;
        for c in components(rel)? {
            cur = cur.child(c)?;
        }
        Ok(cur)
    }

    /// Like [`Dir::open_dir`], creating missing directories (mode 0755 before umask); each
    /// directory created is pushed to `created` (relative to this one, outermost first), so a
    /// caller that gives up can remove them again.
    pub fn create_dirs(&self, rel: &Path, created: &mut Vec<PathBuf>) -> io::Result<Dir> {
        let mut cur = self.try_clone()?;
        let mut walked = PathBuf::new();
        for c in components(rel)? {
            walked.push(c);
            match rustix::fs::mkdirat(&cur.fd, c, Mode::from_raw_mode(0o755)) {
                Ok(()) => created.push(walked.clone()),
                Err(e) if e == rustix::io::Errno::EXIST => {}
                Err(e) => {
                    return Err(io::Error::new(
                        err(e).kind(),
                        format!("creating {}: {e}", cur.path.join(c).display()),
                    ));
                }
            }
            cur = cur.child(c)?;
        }
        Ok(cur)
    }

    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir { fd: self.fd.as_fd().try_clone_to_owned()?, path: self.path.clone() })
    }

    /// The entry `name`, not followed; `None` when there is none.
    pub fn stat(&self, name: &OsStr) -> io::Result<Option<EntryStat>> {
        let name = single(name)?;
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(entry_stat(&st))),
            Err(e) if e == rustix::io::Errno::NOENT => Ok(None),
            Err(e) => {
                Err(io::Error::new(err(e).kind(), format!("reading {}: {e}", self.path.join(name).display())))
            }
        }
    }

    /// Opens the regular file `name` for reading, refusing a symlink, and anything else that
    /// is not a regular file (without blocking on a fifo put in its place).
    pub fn open_file(&self, name: &OsStr) -> io::Result<File> {
        let name = single(name)?;
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| {
            if e == rustix::io::Errno::LOOP {
                self.refuse_link(name)
            } else {
                io::Error::new(err(e).kind(), format!("opening {}: {e}", self.path.join(name).display()))
            }
        })?;
        let st = rustix::fs::fstat(&fd).map_err(err)?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", self.path.join(name).display()),
            ));
        }
        Ok(File::from(fd))
    }

    /// Creates the new file `name` (never an existing one, never through a link).
    pub fn create_new(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        let name = single(name)?;
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .map_err(|e| {
            io::Error::new(err(e).kind(), format!("creating {}: {e}", self.path.join(name).display()))
        })?;
        Ok(File::from(fd))
    }

    /// A fresh name beside `base` for a file being written (`.base.pype-tmp-<random>`), with
    /// `base` cut to its first [`TEMP_BASE_MAX`] bytes so a name near the filesystem's limit
    /// of 255 bytes still has a temporary name.
    pub fn temp_name(base: &OsStr) -> OsString {
        let b = base.as_bytes();
        let mut n = OsString::from(".");
        n.push(OsStr::from_bytes(&b[..b.len().min(TEMP_BASE_MAX)]));
        n.push(format!(".pype-tmp-{:016x}", rand::random::<u64>()));
        n
    }

    /// Creates the symlink `name` pointing at `target` (the target is not resolved).
    pub fn symlink(&self, target: &Path, name: &OsStr) -> io::Result<()> {
        let name = single(name)?;
        rustix::fs::symlinkat(target, &self.fd, name).map_err(|e| {
            io::Error::new(err(e).kind(), format!("creating link {}: {e}", self.path.join(name).display()))
        })
    }

    /// Renames `name` here to `to` in `dir` (replacing a file or link there, as rename does).
    pub fn rename(&self, name: &OsStr, dir: &Dir, to: &OsStr) -> io::Result<()> {
        let (name, to) = (single(name)?, single(to)?);
        rustix::fs::renameat(&self.fd, name, &dir.fd, to).map_err(|e| {
            io::Error::new(
                err(e).kind(),
                format!("moving {} to {}: {e}", self.path.join(name).display(), dir.path.join(to).display()),
            )
        })
    }

    /// Hard-links `from` as the new entry `name` here. `from` is a path the caller trusts
    /// (the agent's own cache) up to its last component, which is not followed: a symlink
    /// there is linked as a symlink, so callers compare [`Dir::stat`] of `name` with the file
    /// they checked.
    pub fn hard_link(&self, from: &Path, name: &OsStr) -> io::Result<()> {
        let name = single(name)?;
        rustix::fs::linkat(rustix::fs::CWD, from, &self.fd, name, AtFlags::empty()).map_err(|e| {
            io::Error::new(
                err(e).kind(),
                format!("linking {} as {}: {e}", from.display(), self.path.join(name).display()),
            )
        })
    }

    /// Removes the file or link `name` (never a directory).
    pub fn remove_file(&self, name: &OsStr) -> io::Result<()> {
        let name = single(name)?;
        rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()).map_err(|e| {
            io::Error::new(err(e).kind(), format!("removing {}: {e}", self.path.join(name).display()))
        })
    }

    /// Removes the empty directory `name`.
    pub fn remove_dir(&self, name: &OsStr) -> io::Result<()> {
        let name = single(name)?;
        rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR).map_err(|e| {
            io::Error::new(err(e).kind(), format!("removing {}: {e}", self.path.join(name).display()))
        })
    }

    /// Removes `name` and, when it is a directory, everything in it; links are removed, never
    /// followed.
    pub fn remove_all(&self, name: &OsStr) -> io::Result<()> {
        match self.stat(name)? {
            None => Ok(()),
            Some(s) if s.kind == Kind::Dir => {
                let child = self.child(name)?;
                for n in child.names()? {
                    child.remove_all(&n)?;
                }
                self.remove_dir(name)
            }
            Some(_) => self.remove_file(name),
        }
    }

    /// The names in this directory (without `.` and `..`).
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let fd = rustix::fs::openat(
            &self.fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err)?;
        let mut dir = rustix::fs::Dir::read_from(&fd)
            .map_err(|e| io::Error::new(err(e).kind(), format!("listing {}: {e}", self.path.display())))?;
        let mut out = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(|e| {
                io::Error::new(err(e).kind(), format!("listing {}: {e}", self.path.display()))
            })?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                out.push(OsStr::from_bytes(name).to_os_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// This directory's own kind, mode and mtime.
    pub fn own_stat(&self) -> io::Result<EntryStat> {
        Ok(entry_stat(&rustix::fs::fstat(&self.fd).map_err(err)?))
    }

    /// Sets this directory's mode.
    pub fn set_mode(&self, mode: u32) -> io::Result<()> {
        rustix::fs::fchmod(&self.fd, Mode::from_raw_mode(mode)).map_err(err)
    }

    /// Sets this directory's mtime (seconds).
    pub fn set_mtime(&self, mtime: i64) -> io::Result<()> {
        let f = File::from(self.fd.as_fd().try_clone_to_owned()?);
        filetime::set_file_handle_times(&f, None, Some(filetime::FileTime::from_unix_time(mtime, 0)))
    }
}

/// Kind, size, inode, mode and mtime of an open file.
pub fn file_stat(f: &File) -> io::Result<EntryStat> {
    Ok(entry_stat(&rustix::fs::fstat(f).map_err(err)?))
}

/// Makes `dst` share `src`'s extents (`FICLONE`: btrfs, XFS with reflink, bcachefs); an error
/// where the filesystem cannot (ext4) or the two are on different filesystems.
pub fn reflink(dst: &File, src: &File) -> io::Result<()> {
    rustix::fs::ioctl_ficlone(dst, src).map_err(err)
}

/// Splits `rel` into its parent and last component.
pub fn split(rel: &Path) -> io::Result<(PathBuf, OsString)> {
    let comps = components(rel)?;
    let (last, parent) = comps
        .split_last()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty path".to_string()))?;
    Ok((parent.iter().collect(), last.to_os_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn never_goes_through_a_link() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("real/up")).unwrap();
        let d = Dir::open(&root).unwrap();
        let e = d.open_dir(Path::new("link")).unwrap_err().to_string();
        assert!(e.contains("link") && e.contains("outside") && e.contains("symlink"), "{e}");
        let mut created = Vec::new();
        let e = d.create_dirs(Path::new("real/up/x"), &mut created).unwrap_err().to_string();
        assert!(e.contains("real/up"), "{e}");
        assert!(created.is_empty());
        assert!(!outside.join("x").exists());
        let sub = d.create_dirs(Path::new("new/deeper"), &mut created).unwrap();
        assert_eq!(created, vec![PathBuf::from("new"), PathBuf::from("new/deeper")]);
        sub.create_new(OsStr::new("f"), 0o644).unwrap();
        assert!(sub.create_new(OsStr::new("f"), 0o644).is_err());
        assert!(d.open_file(OsStr::new("link")).is_err());
        assert!(d.open_dir(Path::new("../root")).is_err());
        assert_eq!(d.stat(OsStr::new("link")).unwrap().unwrap().kind, Kind::Symlink);
        d.remove_all(OsStr::new("real")).unwrap();
        assert!(outside.exists());
        assert_eq!(d.names().unwrap(), vec![OsString::from("link"), OsString::from("new")]);
    }

    #[test]
    fn a_fifo_in_place_of_a_file_is_refused_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        rustix::fs::mkfifoat(rustix::fs::CWD, t.path().join("f"), Mode::from_raw_mode(0o644)).unwrap();
        std::fs::write(t.path().join("plain"), b"x").unwrap();
        let d = Dir::open(t.path()).unwrap();
        let e = d.open_file(OsStr::new("f")).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut d.open_file(OsStr::new("plain")).unwrap(), &mut text).unwrap();
        assert_eq!(text, "x");
    }
}
