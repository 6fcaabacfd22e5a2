//! Crafted archives that must be refused, leaving the destination as it was.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use std::fs;
use std::path::Path;

use transport::tree::{self, TreeError, UnpackLimits};

enum E {
    File(&'static str, &'static [u8]),
    Dir(&'static str),
    Symlink(&'static str, &'static str),
    Hardlink(&'static str, &'static str),
    Special(&'static str, tar::EntryType),
}

/// Builds a tar with raw names, bypassing the tar crate's own path checks.
fn craft(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_old();
        let (name, kind, data, link): (&str, tar::EntryType, &[u8], Option<&str>) = match e {
            E::File(n, d) => (n, tar::EntryType::Regular, d, None),
            E::Dir(n) => (n, tar::EntryType::Directory, b"", None),
            E::Symlink(n, t) => (n, tar::EntryType::Symlink, b"", Some(t)),
            E::Hardlink(n, t) => (n, tar::EntryType::Link, b"", Some(t)),
            E::Special(n, k) => (n, *k, b"", None),
        };
        let raw = h.as_old_mut();
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(t) = link {
            raw.linkname[..t.len()].copy_from_slice(t.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    out.sort();
    out
}

/// Unpacks `entries` into a destination holding one marker file; expects a refusal naming
/// `offending`, and checks that neither the destination nor its parent gained anything.
fn check_refused(entries: &[E], offending: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("marker"), b"keep").unwrap();
    let archive = craft(entries);
    let err = tree::unpack_into(&archive[..], &dest, UnpackLimits::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TreeError::Refused { .. }), "expected a refusal, got {msg}");
    assert!(msg.contains(offending), "error {msg:?} does not name {offending:?}");
    assert_eq!(listing(&dest), vec!["marker"], "destination changed");
    assert_eq!(listing(tmp.path()), vec!["dest"], "staging left behind");
    assert!(!tmp.path().parent().unwrap().join("escaped").exists());
}

#[test]
fn absolute_path() {
    check_refused(&[E::File("/tmp/pype-escaped-abs", b"x")], "/tmp/pype-escaped-abs");
    assert!(!Path::new("/tmp/pype-escaped-abs").exists());
}

#[test]
fn parent_components() {
    check_refused(&[E::File("../escaped", b"x")], "../escaped");
    check_refused(&[E::Dir("a"), E::File("a/../../escaped", b"x")], "a/../../escaped");
}

#[test]
fn symlinks_escaping() {
    check_refused(&[E::Symlink("l", "/etc")], "\"l\"");
    check_refused(&[E::Symlink("l", "../escaped")], "\"l\"");
    check_refused(&[E::Dir("d"), E::Symlink("d/l", "../../x")], "d/l");
    // `p` -> `.` looks one level deep but is not: `p/..` leaves the destination.
    check_refused(&[E::Symlink("p", "."), E::Symlink("e", "p/..")], "\"e\"");
    // A symlink made harmless at first and turned hostile by a later entry.
    check_refused(&[E::Symlink("a", "b/.."), E::Symlink("b", ".")], "\"a\"");
}

#[test]
fn writing_through_a_symlink() {
    check_refused(&[E::Symlink("s", "inner"), E::File("s/file", b"x")], "s/file");
}

#[test]
fn hardlinks_escaping() {
    check_refused(&[E::Hardlink("h", "/etc/passwd")], "\"h\"");
    check_refused(&[E::Hardlink("h", "../outside")], "\"h\"");
    check_refused(&[E::File("f", b"x"), E::Symlink("s", "f"), E::Hardlink("h", "s")], "\"h\"");
}

#[test]
fn special_files() {
    check_refused(&[E::Special("dev", tar::EntryType::Char)], "dev");
    check_refused(&[E::Special("blk", tar::EntryType::Block)], "blk");
    check_refused(&[E::Special("fifo", tar::EntryType::Fifo)], "fifo");
}

#[test]
fn late_refusal_removes_earlier_entries() {
    check_refused(
        &[E::Dir("ok"), E::File("ok/a", b"hello"), E::File("ok/b", b"world"), E::File("../escaped", b"x")],
        "../escaped",
    );
}

#[test]
fn size_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let big = vec![7u8; 64 * 1024];
    let archive = craft(&[E::File("big", Box::leak(big.into_boxed_slice()))]);
    let err = tree::unpack_into(&archive[..], &dest, UnpackLimits { max_bytes: 16 * 1024 }).unwrap_err();
    assert!(matches!(err, TreeError::TooLarge { limit: 16384 }), "{err}");
    assert!(!dest.exists());
    assert!(fs::read_dir(tmp.path()).unwrap().next().is_none(), "staging left behind");
}

#[test]
fn benign_links_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let archive = craft(&[
        E::Dir("lib"),
        E::File("lib/libx.so.1", b"elf"),
        E::Symlink("lib/libx.so", "libx.so.1"),
        E::Dir("bin"),
        E::Symlink("bin/lib", "../lib"),
        E::Hardlink("copy", "lib/libx.so.1"),
        E::Symlink("dangling", "not/yet/there"),
    ]);
    let stats = tree::unpack_into(&archive[..], &dest, UnpackLimits::default()).unwrap();
    assert_eq!(stats.entries, 7);
    assert_eq!(fs::read(dest.join("bin/lib/libx.so")).unwrap(), b"elf");
    assert_eq!(fs::read(dest.join("copy")).unwrap(), b"elf");
    assert_eq!(fs::read_link(dest.join("dangling")).unwrap(), Path::new("not/yet/there"));
}
