//! Building a step's view out of cached snapshot trees, safely.
//!
//! Two rules hold for every write the agent makes beneath a view's root (`merged/`, the remap
//! layer):
//!
//! - **Nothing is written through a link.** Paths beneath the root are resolved one
//!   component at a time without following symlinks ([`create_dirs_beneath`],
//!   [`check_beneath`]); a component that is a symlink is refused with an error naming the
//!   path being written and the link, never followed. Files are created with `O_NOFOLLOW`
//!   and `O_EXCL`.
//! - **A step never gets the cache's inodes.** The step may run as root, so file modes do not
//!   protect anything: a read-only hardlink to a cached file is written through by root, and
//!   a step running as the agent's user owns the inode and can simply chmod it (or chattr it)
//!   first. Hardlinks cannot be made safe; a step is only ever shown an overlayfs mount
//!   (writes are copied up, lower layers are never written) or [`copy_tree`] copies that share
//!   no inode with the cache: reflinks (`FICLONE`) where the filesystem has them, plain copies
//!   otherwise. Hardlinks ([`Share::Hardlink`]) are used only for layers that the step never
//!   sees: overlayfs lower layers, or the sources of a copied view.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use filetime::FileTime;
use transport::fsafe::{self, O_NOFOLLOW};

pub use crate::paths::plain;

fn through_link(dest: &Path, link: &Path) -> anyhow::Error {
    let target = fs::read_link(link).map(|t| t.display().to_string()).unwrap_or_else(|_| "?".into());
    anyhow!(
        "refusing to write {} through the symlink {} -> {target} (links in a view are never followed)",
        dest.display(),
        link.display()
    )
}

/// Makes `root/rel` a directory, creating what is missing one component at a time, each
/// opened relative to the last without following links ([`transport::fsafe`]). A component
/// that is a symlink is refused: the error names it, its target and `dest`, the path that was
/// to be written.
pub fn create_dirs_beneath(root: &Path, rel: &Path, dest: &Path) -> Result<PathBuf> {
    let rel = plain(rel)?;
    let dir = fsafe::Dir::open(root).with_context(|| format!("opening {}", root.display()))?;
    let mut created = Vec::new();
    dir.create_dirs(&rel, &mut created).map_err(|e| {
        anyhow!("refusing to write {}: {e} (links in a view are never followed)", dest.display())
    })?;
    Ok(root.join(rel))
}

/// Checks that `root/rel` is reached without following a symlink: no directory above it is a
/// link (nor `rel` itself when `leaf`). What does not exist ends the check.
pub fn check_beneath(root: &Path, rel: &Path, leaf: bool) -> Result<()> {
    let rel = plain(rel)?;
    let n = rel.components().count();
    let mut cur = root.to_path_buf();
    for (i, c) in rel.components().enumerate() {
        cur.push(c);
        if i + 1 == n && !leaf {
            break;
        }
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => return Err(through_link(&root.join(&rel), &cur)),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

/// How [`copy_tree`] gives a file to its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// A hardlink (a copy across filesystems): only for layers no step sees.
    Hardlink,
    /// A reflink or a copy: an inode of its own.
    Copy,
}

/// Identity of a file or link [`copy_tree`] made: inode, ctime, mtime and size just after.
type Stamp = (i64, i64, i64, u64);

fn stamp(m: &fs::Metadata) -> Stamp {
    (m.ctime(), m.ctime_nsec(), m.mtime_nsec() + m.mtime() * 1_000_000_000, m.size())
}

/// The copies [`copy_tree`] made, so a later look can tell an entry the step left alone from
/// one it wrote.
#[derive(Debug, Default)]
pub struct Copies(HashMap<(u64, u64), Stamp>);

impl Copies {
    fn record(&mut self, path: &Path) {
        if let Ok(m) = fs::symlink_metadata(path) {
            self.0.insert((m.dev(), m.ino()), stamp(&m));
        }
    }

    /// Whether `path` is still a copy as made: same inode, untouched since.
    pub fn untouched(&self, path: &Path) -> bool {
        fs::symlink_metadata(path)
            .map(|m| self.0.get(&(m.dev(), m.ino())) == Some(&stamp(&m)))
            .unwrap_or(false)
    }
}

/// Copies the tree at `src` (a directory, file or link) to `root/rel`, resolving `rel` and
/// everything below it without following links. Directories merge with directories already
/// there; anything else already there wins (the first layer holding a path wins, and a
/// non-directory hides a directory of a later layer, as in overlayfs). Modes and mtimes of
/// files are kept.
pub fn copy_tree(
    src: &Path,
    root: &Path,
    rel: &Path,
    how: Share,
    mut copies: Option<&mut Copies>,
) -> Result<()> {
    let rel = plain(rel)?;
    let top = root.join(&rel);
    if let Some(parent) = rel.parent() {
        create_dirs_beneath(root, parent, &top)?;
    }
    // Each destination is created only inside a directory this walk made or found to be a
    // real directory (never a link), so joining names onto it cannot leave `root`.
    let mut stack = vec![(src.to_path_buf(), top)];
    while let Some((s, d)) = stack.pop() {
        let meta = fs::symlink_metadata(&s).with_context(|| format!("reading {}", s.display()))?;
        let existing = fs::symlink_metadata(&d).ok();
        let ft = meta.file_type();
        if ft.is_dir() {
            match existing {
                Some(m) if m.is_dir() => {}
                Some(_) => continue,
                None => fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?,
            }
            for e in fs::read_dir(&s).with_context(|| format!("listing {}", s.display()))? {
                let e = e.with_context(|| format!("listing {}", s.display()))?;
                stack.push((e.path(), d.join(e.file_name())));
            }
        } else if existing.is_some() {
            continue;
        } else if ft.is_symlink() {
            let target = fs::read_link(&s).with_context(|| format!("reading link {}", s.display()))?;
            std::os::unix::fs::symlink(&target, &d)
                .with_context(|| format!("creating link {}", d.display()))?;
            let _ = filetime::set_symlink_file_times(
                &d,
                FileTime::from_last_access_time(&meta),
                FileTime::from_last_modification_time(&meta),
            );
            if let Some(c) = copies.as_deref_mut() {
                c.record(&d);
            }
        } else if ft.is_file() {
            if how == Share::Hardlink && fs::hard_link(&s, &d).is_ok() {
                continue;
            }
            clone_or_copy(&s, &d, &meta)
                .with_context(|| format!("copying {} to {}", s.display(), d.display()))?;
            if let Some(c) = copies.as_deref_mut() {
                c.record(&d);
            }
        }
        // Devices, fifos and sockets never come out of an unpacked snapshot; none is copied.
    }
    Ok(())
}

/// A new file `dst` with the contents, mode and mtime of `src`, sharing no inode with it: a
/// reflink where the filesystem can (btrfs, XFS: no data copied), else a copy.
fn clone_or_copy(src: &Path, dst: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let mut from = OpenOptions::new().read(true).custom_flags(O_NOFOLLOW).open(src)?;
    let mut to =
        OpenOptions::new().write(true).create_new(true).custom_flags(O_NOFOLLOW).mode(0o600).open(dst)?;
    if fsafe::reflink(&to, &from).is_err() {
        io::copy(&mut from, &mut to)?;
    }
    to.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o777))?;
    filetime::set_file_handle_times(
        &to,
        Some(FileTime::from_last_access_time(meta)),
        Some(FileTime::from_last_modification_time(meta)),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs_beneath_a_root_are_never_made_through_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("l")).unwrap();
        let dest = root.join("l/a/f");
        let err = create_dirs_beneath(&root, Path::new("l/a"), &dest).unwrap_err().to_string();
        assert!(
            err.contains(&dest.display().to_string()) && err.contains(&root.join("l").display().to_string())
        );
        assert!(!outside.join("a").exists());
        assert!(create_dirs_beneath(&root, Path::new("../x"), &dest).is_err());
        assert_eq!(create_dirs_beneath(&root, Path::new("d/e"), &dest).unwrap(), root.join("d/e"));
        assert!(check_beneath(&root, Path::new("l/a/f"), false).is_err());
        assert!(check_beneath(&root, Path::new("l"), false).is_ok());
        assert!(check_beneath(&root, Path::new("l"), true).is_err());
        assert!(check_beneath(&root, Path::new("d/e/missing/x"), true).is_ok());
    }

    #[test]
    fn copies_share_no_inode_and_keep_mode_and_mtime() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, root) = (tmp.path().join("src"), tmp.path().join("root"));
        fs::create_dir_all(src.join("d")).unwrap();
        fs::write(src.join("d/f"), "bytes").unwrap();
        fs::set_permissions(src.join("d/f"), fs::Permissions::from_mode(0o444)).unwrap();
        filetime::set_file_mtime(src.join("d/f"), FileTime::from_unix_time(1_000_000, 0)).unwrap();
        std::os::unix::fs::symlink("f", src.join("d/l")).unwrap();
        fs::create_dir_all(&root).unwrap();
        let mut copies = Copies::default();
        copy_tree(&src, &root, Path::new("at/x"), Share::Copy, Some(&mut copies)).unwrap();
        let (a, b) = (fs::metadata(src.join("d/f")).unwrap(), fs::metadata(root.join("at/x/d/f")).unwrap());
        assert_ne!(a.ino(), b.ino());
        assert_eq!((b.mode() & 0o777, b.mtime()), (0o444, 1_000_000));
        assert_eq!(fs::read_link(root.join("at/x/d/l")).unwrap(), Path::new("f"));
        assert!(copies.untouched(&root.join("at/x/d/f")));
        fs::set_permissions(root.join("at/x/d/f"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(!copies.untouched(&root.join("at/x/d/f")));
        // A later layer's directory under an existing link is skipped, not followed.
        let later = tmp.path().join("later");
        fs::create_dir_all(later.join("d/l")).unwrap();
        fs::write(later.join("d/l/g"), "g").unwrap();
        copy_tree(&later, &root, Path::new("at/x"), Share::Copy, None).unwrap();
        assert!(!root.join("at/x/d/g").exists());
        // A hardlinked layer shares the inode (it is never shown to a step).
        copy_tree(&src, &root, Path::new("hl"), Share::Hardlink, None).unwrap();
        assert_eq!(fs::metadata(root.join("hl/d/f")).unwrap().ino(), a.ino());
    }
}
