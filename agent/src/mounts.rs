//! Mounts: overlayfs views, their teardown, and the private mount namespace a snippet may run
//! in. This is the only module that calls `mount(2)`.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Whether this process may mount (it runs as root).
pub fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::other(format!("{} contains a NUL byte", p.display())))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// overlayfs option values separate lower dirs with `:` and options with `,`.
fn overlay_safe(p: &Path) -> io::Result<&str> {
    let s = p.to_str().ok_or_else(|| io::Error::other(format!("{} is not UTF-8", p.display())))?;
    if s.contains([':', ',', '\\']) {
        return Err(io::Error::other(format!(
            "{s} contains ':', ',' or '\\', which overlayfs options cannot carry"
        )));
    }
    Ok(s)
}

fn overlay_options(lowers: &[PathBuf], upper: &Path, work: &Path) -> io::Result<String> {
    let mut lower = Vec::with_capacity(lowers.len());
    for l in lowers {
        lower.push(overlay_safe(l)?);
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        overlay_safe(upper)?,
        overlay_safe(work)?
    );
    // mount(2) takes at most a page of options.
    if opts.len() >= 4096 {
        return Err(io::Error::other(format!(
            "{} lower layers make {} bytes of overlayfs options, over the 4095 a mount takes",
            lowers.len(),
            opts.len()
        )));
    }
    Ok(opts)
}

/// Mounts overlayfs at `target`: `lowers` first is topmost.
pub fn mount_overlay(lowers: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
    let opts = CString::new(overlay_options(lowers, upper, work)?).map_err(io::Error::other)?;
    let target_c = cstr(target)?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    check(unsafe {
        libc::mount(c"overlay".as_ptr(), target_c.as_ptr(), c"overlay".as_ptr(), 0, opts.as_ptr().cast())
    })
}

/// Unmounts `target`; a busy mount is detached lazily rather than left behind.
pub fn unmount(target: &Path) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: t is a valid NUL-terminated string.
    match check(unsafe { libc::umount2(t.as_ptr(), 0) }) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            // SAFETY: as above.
            check(unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) })
        }
        other => other,
    }
}

/// Mount points at or below `root` in this process's mount namespace, deepest first.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(root))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A mount made inside a snippet's private namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NsMount {
    /// Bind `src` over `dst`.
    Bind { src: PathBuf, dst: PathBuf },
    /// overlayfs at `target` with `lower` (usually `target` itself) below `upper`.
    Overlay { lower: PathBuf, upper: PathBuf, work: PathBuf, target: PathBuf },
}

/// [`NsMount`]s turned into C strings before `fork`, so the child allocates nothing.
pub struct NsPlan {
    steps: Vec<MountCall>,
}

/// The arguments of one `mount(2)`: source, target, fs type, flags, data.
type MountCall = (Option<CString>, CString, Option<CString>, libc::c_ulong, Option<CString>);

impl NsPlan {
    pub fn new(mounts: &[NsMount]) -> io::Result<Self> {
        let mut steps = Vec::new();
        for m in mounts {
            match m {
                NsMount::Bind { src, dst } => {
                    steps.push((Some(cstr(src)?), cstr(dst)?, None, libc::MS_BIND | libc::MS_REC, None));
                }
                NsMount::Overlay { lower, upper, work, target } => {
                    let opts = overlay_options(std::slice::from_ref(lower), upper, work)?;
                    steps.push((
                        Some(CString::from(c"overlay")),
                        cstr(target)?,
                        Some(CString::from(c"overlay")),
                        0,
                        Some(CString::new(opts).map_err(io::Error::other)?),
                    ));
                }
            }
        }
        Ok(Self { steps })
    }

    /// Enters a new mount namespace, makes it private and performs the mounts. Runs in the
    /// child between `fork` and `exec`: only system calls, no allocation.
    ///
    /// # Safety
    /// Must only be called in a freshly forked child (`pre_exec`).
    pub unsafe fn enter(&self) -> io::Result<()> {
        // SAFETY: plain system calls on valid C strings owned by `self`.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for (src, dst, fstype, flags, data) in &self.steps {
                check(libc::mount(
                    src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                    dst.as_ptr(),
                    fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                    *flags,
                    data.as_ref().map_or(std::ptr::null(), |s| s.as_ptr().cast()),
                ))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b\134c"), "/tmp/a b\\c");
        assert_eq!(unescape_mountinfo(r"/x\04"), r"/x\04");
    }

    #[test]
    fn overlay_options_refuse_separators() {
        let p = |s: &str| PathBuf::from(s);
        assert!(overlay_options(&[p("/a:b")], &p("/u"), &p("/w")).is_err());
        assert_eq!(
            overlay_options(&[p("/a"), p("/b")], &p("/u"), &p("/w")).unwrap(),
            "lowerdir=/a:/b,upperdir=/u,workdir=/w"
        );
    }
}
