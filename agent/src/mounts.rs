//! Mounts: overlayfs views, their teardown, and the private mount namespace a snippet may run
//! in. This is the only module that mounts (through rustix, no hand-written system calls).
//!
//! A view is mounted with the new mount API (`fsopen`, `fsconfig`, `fsmount`, `move_mount`),
//! giving overlayfs one lower layer per `lowerdir+` (Linux 6.8), so the number of layers is
//! bounded by overlayfs (500), not by the page of options `mount(2)` takes (a hundred layers
//! at 40-byte paths do not fit in it). On an older kernel, the view falls back to one
//! `mount(2)` with the option string.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MountPropagationFlags, MoveMountFlags,
    UnmountFlags,
};

/// Whether this process may mount (it runs as root).
pub fn can_mount() -> bool {
    rustix::process::geteuid().is_root()
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::other(format!("{} contains a NUL byte", p.display())))
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

/// The `mount(2)` option string of an overlayfs view (`lowers` first is topmost), refused when
/// it does not fit the page `mount(2)` copies.
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
    // mount(2) copies at most a page of options, its terminating NUL included.
    let page = rustix::param::page_size();
    if opts.len() >= page {
        return Err(io::Error::other(format!(
            "{} lower layers make {} bytes of overlayfs options, over the {} a mount(2) takes \
             (Linux 6.8 or later takes up to 500, one at a time)",
            lowers.len(),
            opts.len(),
            page - 1
        )));
    }
    Ok(opts)
}

/// Why the new mount API did not mount a view.
enum NewApiError {
    /// ENOSYS or EINVAL: the kernel lacks the API or `lowerdir+` (before Linux 6.8), or took
    /// the view for invalid. `mount(2)` is tried next, and its error carries this one.
    Refused(String),
    /// Any other failure, which `mount(2)` would repeat.
    Failed(io::Error),
}

/// Mounts overlayfs at `target`: `lowers` first is topmost.
pub fn mount_overlay(lowers: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
    let refused = match mount_overlay_fsopen(lowers, upper, work, target) {
        Ok(()) => return Ok(()),
        Err(NewApiError::Failed(e)) => return Err(e),
        Err(NewApiError::Refused(why)) => why,
    };
    tracing::debug!(layers = lowers.len(), reason = %refused, "overlayfs view falls back to mount(2)");
    mount_overlay_legacy(lowers, upper, work, target)
        .map_err(|e| io::Error::new(e.kind(), format!("{e} (the new mount API was refused: {refused})")))
}

/// One `mount(2)` with the option string: kernels before 6.8.
fn mount_overlay_legacy(lowers: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
    let opts = CString::new(overlay_options(lowers, upper, work)?).map_err(io::Error::other)?;
    rustix::mount::mount(c"overlay", target, c"overlay", MountFlags::empty(), opts.as_c_str())?;
    Ok(())
}

/// `fsopen("overlay")`, one `lowerdir+` per layer in `lowers`' order (each appends a layer
/// below the ones before, as in the `lowerdir=` list), `upperdir`, `workdir`, then a detached
/// mount moved onto `target`.
fn mount_overlay_fsopen(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), NewApiError> {
    use rustix::mount::{fsconfig_create, fsconfig_set_string, fsmount, fsopen, move_mount};
    let fs = match fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
        Ok(fd) => fd,
        Err(e) if e == Errno::NOSYS => return Err(NewApiError::Refused(format!("fsopen: {e}"))),
        Err(e) => return Err(NewApiError::Failed(with_context(e, format!("fsopen(\"overlay\"): {e}")))),
    };
    // The kernel explains a refusal in the context's log; the errno alone rarely says what.
    let failed = |what: String, e: Errno| {
        let log = context_log(&fs);
        let msg = if log.is_empty() { format!("{what}: {e}") } else { format!("{what}: {e} ({log})") };
        // EINVAL: an unknown key (no `lowerdir+` before 6.8) or, before overlayfs took the
        // new API (6.5), its generic adapter's page of options overflowing or refused.
        if e == Errno::INVAL || e == Errno::NOSYS {
            NewApiError::Refused(msg)
        } else {
            NewApiError::Failed(with_context(e, msg))
        }
    };
    fsconfig_set_string(&fs, "source", "overlay").map_err(|e| failed("source".into(), e))?;
    for (i, l) in lowers.iter().enumerate() {
        fsconfig_set_string(&fs, "lowerdir+", l.as_path()).map_err(|e| {
            failed(format!("lowerdir+ {} (layer {} of {})", l.display(), i + 1, lowers.len()), e)
        })?;
    }
    fsconfig_set_string(&fs, "upperdir", upper)
        .map_err(|e| failed(format!("upperdir {}", upper.display()), e))?;
    fsconfig_set_string(&fs, "workdir", work)
        .map_err(|e| failed(format!("workdir {}", work.display()), e))?;
    fsconfig_create(&fs).map_err(|e| failed("creating the overlay".into(), e))?;
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())
        .map_err(|e| NewApiError::Failed(with_context(e, format!("fsmount: {e}"))))?;
    move_mount(&mnt, c"", rustix::fs::CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH).map_err(|e| {
        NewApiError::Failed(with_context(e, format!("moving the overlay onto {}: {e}", target.display())))
    })
}

/// An `io::Error` of `e`'s kind with the message `msg`.
fn with_context(e: Errno, msg: String) -> io::Error {
    io::Error::new(io::Error::from(e).kind(), msg)
}

/// The messages the kernel logged on a filesystem context (`e overlay: ...`), joined.
fn context_log(fs: &OwnedFd) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    // Each read takes one message; an empty log answers ENODATA. Bounded all the same.
    for _ in 0..16 {
        match rustix::io::read(fs.as_fd(), &mut buf) {
            Ok(n) if n > 0 => out.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_string()),
            _ => break,
        }
    }
    out.join("; ")
}

/// Unmounts `target`; a busy mount is detached lazily rather than left behind.
pub fn unmount(target: &Path) -> io::Result<()> {
    match rustix::mount::unmount(target, UnmountFlags::empty()) {
        Err(e) if e == Errno::BUSY => Ok(rustix::mount::unmount(target, UnmountFlags::DETACH)?),
        other => Ok(other?),
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
    steps: Vec<NsStep>,
}

/// One `mount(2)` of a plan, its arguments ready.
enum NsStep {
    /// A recursive bind of `src` over `dst`.
    Bind { src: CString, dst: CString },
    /// overlayfs at `target` with the option string `opts` (one lower layer: well under a
    /// page, and `mount(2)` is the one call a namespace needs).
    Overlay { target: CString, opts: CString },
}

impl NsPlan {
    pub fn new(mounts: &[NsMount]) -> io::Result<Self> {
        let mut steps = Vec::new();
        for m in mounts {
            match m {
                NsMount::Bind { src, dst } => steps.push(NsStep::Bind { src: cstr(src)?, dst: cstr(dst)? }),
                NsMount::Overlay { lower, upper, work, target } => {
                    let opts = overlay_options(std::slice::from_ref(lower), upper, work)?;
                    steps.push(NsStep::Overlay {
                        target: cstr(target)?,
                        opts: CString::new(opts).map_err(io::Error::other)?,
                    });
                }
            }
        }
        Ok(Self { steps })
    }

    /// Enters a new mount namespace, makes it private and performs the mounts. Meant for the
    /// child between `fork` and `exec` (`pre_exec`): only system calls on the C strings made
    /// in [`NsPlan::new`], no allocation (rustix takes a `&CStr` as is, and turns an errno into
    /// an `io::Error` without allocating). Called anywhere else, it would move the calling
    /// thread into a namespace of its own.
    pub fn enter(&self) -> io::Result<()> {
        use rustix::thread::{UnshareFlags, unshare_unsafe};
        // SAFETY: `unshare_unsafe` is unsafe because of `UnshareFlags::FILES`, which would take
        // descriptors other threads opened away from this one; only `NEWNS` is asked for.
        unsafe { unshare_unsafe(UnshareFlags::NEWNS)? };
        rustix::mount::mount_change(c"/", MountPropagationFlags::REC | MountPropagationFlags::PRIVATE)?;
        for step in &self.steps {
            match step {
                NsStep::Bind { src, dst } => {
                    rustix::mount::mount_bind_recursive(src.as_c_str(), dst.as_c_str())?
                }
                NsStep::Overlay { target, opts } => rustix::mount::mount(
                    c"overlay",
                    target.as_c_str(),
                    c"overlay",
                    MountFlags::empty(),
                    opts.as_c_str(),
                )?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
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

    /// Whether the test may mount; if not, says so loudly (or fails, under
    /// `PYPE_REQUIRE_ALL=1`).
    pub(crate) fn root_or_skip(test: &str) -> bool {
        if can_mount() {
            return true;
        }
        assert!(
            std::env::var_os("PYPE_REQUIRE_ALL").is_none_or(|v| v != "1"),
            "{test}: not root (overlayfs mounts need it), and PYPE_REQUIRE_ALL=1 forbids skipping"
        );
        eprintln!("\n!!! SKIPPED {test}: not root (overlayfs mounts need it)\n");
        false
    }

    /// `n` layers under `dir`: layer `i` holds `only-i`, `d/f-i` and `shadowed`, all reading `i`.
    fn layers(dir: &Path, n: usize) -> Vec<PathBuf> {
        (0..n)
            .map(|i| {
                let l = dir.join(format!("layer-{i:03}"));
                std::fs::create_dir_all(l.join("d")).unwrap();
                for f in [format!("only-{i}"), format!("d/f-{i}"), "shadowed".into()] {
                    std::fs::write(l.join(f), i.to_string()).unwrap();
                }
                l
            })
            .collect()
    }

    /// upper, work and target dirs under `dir`.
    fn scratch(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let dirs = (dir.join("upper"), dir.join("work"), dir.join("merged"));
        for d in [&dirs.0, &dirs.1, &dirs.2] {
            std::fs::create_dir_all(d).unwrap();
        }
        dirs
    }

    #[test]
    fn a_view_of_200_layers_mounts_with_the_topmost_layer_winning() {
        if !root_or_skip("a_view_of_200_layers_mounts_with_the_topmost_layer_winning") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let lowers = layers(&tmp.path().join("layers"), 200);
        let (upper, work, merged) = scratch(tmp.path());
        // One mount(2) could not have carried these layers: its options take a page.
        let colon_list: usize = lowers.iter().map(|l| l.as_os_str().len() + 1).sum();
        assert!(colon_list > 4096, "the test's layer paths take only {colon_list} bytes");
        let e = overlay_options(&lowers, &upper, &work).unwrap_err().to_string();
        assert!(e.contains("200 lower layers"), "{e}");

        mount_overlay(&lowers, &upper, &work, &merged).unwrap();
        let read = |rel: &str| std::fs::read_to_string(merged.join(rel));
        let checked = std::panic::catch_unwind(|| {
            assert_eq!(read("shadowed").unwrap(), "0", "the first layer is the topmost");
            for i in 0..200 {
                assert_eq!(read(&format!("only-{i}")).unwrap(), i.to_string());
            }
            assert_eq!(std::fs::read_dir(merged.join("d")).unwrap().count(), 200);
            // Writes are copied up; no layer is written.
            std::fs::write(merged.join("shadowed"), "new").unwrap();
            assert_eq!(read("shadowed").unwrap(), "new");
            assert_eq!(std::fs::read_to_string(upper.join("shadowed")).unwrap(), "new");
            assert_eq!(std::fs::read_to_string(lowers[0].join("shadowed")).unwrap(), "0");
            assert_eq!(mounts_under(tmp.path()), vec![merged.clone()]);
        });
        unmount(&merged).unwrap();
        if let Err(panic) = checked {
            std::panic::resume_unwind(panic);
        }
        assert!(mounts_under(tmp.path()).is_empty());
        assert!(!merged.join("shadowed").exists());
    }

    #[test]
    fn the_new_mount_api_and_mount2_stack_layers_alike() {
        if !root_or_skip("the_new_mount_api_and_mount2_stack_layers_alike") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let lowers = layers(&tmp.path().join("layers"), 3);
        let mut seen = Vec::new();
        for (name, mount) in [
            (
                "fsopen",
                (|l, u, w, t| match mount_overlay_fsopen(l, u, w, t) {
                    Ok(()) => Ok(()),
                    Err(NewApiError::Refused(e)) => Err(io::Error::other(e)),
                    Err(NewApiError::Failed(e)) => Err(e),
                }) as fn(&[PathBuf], &Path, &Path, &Path) -> io::Result<()>,
            ),
            ("mount(2)", mount_overlay_legacy),
        ] {
            let (upper, work, merged) = scratch(&tmp.path().join(name));
            mount(&lowers, &upper, &work, &merged).unwrap();
            let shadowed = std::fs::read_to_string(merged.join("shadowed"));
            let names = std::fs::read_dir(&merged).map(|d| d.count());
            unmount(&merged).unwrap();
            seen.push((shadowed.unwrap(), names.unwrap()));
        }
        // Topmost first either way; three `only-*`, `d` and `shadowed`.
        assert_eq!(seen, vec![("0".to_string(), 5), ("0".to_string(), 5)]);
    }
}
