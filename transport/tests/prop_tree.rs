//! Property tests over the unpacker, the write-out and the link judge: random trees with
//! random hostile entries and links. The invariants: nothing is written outside the
//! destination, nothing partial is left, and every non-hostile tree round-trips byte for byte
//! with modes, mtimes and link targets.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use transport::tree::{self, UnpackLimits};

/// One node of a generated tree, by path relative to its root.
#[derive(Debug, Clone)]
enum Node {
    Dir(u32),
    File(Vec<u8>, u32, u64),
    Link(String),
}

/// What a tree on disk holds: path -> (kind, mode, mtime, content or target).
fn snapshot(root: &Path) -> BTreeMap<String, (char, u32, i64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let m = fs::symlink_metadata(e.path()).unwrap();
            let key = r.to_string_lossy().into_owned();
            if m.is_dir() {
                out.insert(key, ('d', m.mode() & 0o777, m.mtime(), Vec::new()));
                stack.push(r);
            } else if m.file_type().is_symlink() {
                let t = fs::read_link(e.path()).unwrap();
                out.insert(key, ('l', 0, 0, t.to_string_lossy().into_owned().into_bytes()));
            } else {
                out.insert(key, ('f', m.mode() & 0o777, m.mtime(), fs::read(e.path()).unwrap()));
            }
        }
    }
    out
}

/// Random names from a small alphabet, so that paths collide and nest.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("c"), Just("d.txt"), Just("e e")].prop_map(str::to_string)
}

/// A random tree: a list of (path, node); parents are created as directories as needed.
fn tree_nodes() -> impl Strategy<Value = Vec<(Vec<String>, Node)>> {
    let node = prop_oneof![
        (0o700u32..0o777).prop_map(Node::Dir),
        (proptest::collection::vec(any::<u8>(), 0..300), 0o400u32..0o777, 1_000_000u64..2_000_000_000)
            .prop_map(|(d, m, t)| Node::File(d, m, t)),
        proptest::collection::vec(prop_oneof![Just("..".to_string()), name()], 1..4)
            .prop_map(|parts| Node::Link(parts.join("/"))),
    ];
    proptest::collection::vec((proptest::collection::vec(name(), 1..4), node), 1..14)
}

/// Lays out `nodes` under `root` the way a step would; returns false when the tree came out
/// degenerate (a later node wanted a file as a directory).
fn build(root: &Path, nodes: &[(Vec<String>, Node)]) {
    for (parts, node) in nodes {
        let rel: PathBuf = parts.iter().collect();
        let path = root.join(&rel);
        // Parents must be plain directories; skip the node otherwise.
        let mut ok = true;
        let mut cur = root.to_path_buf();
        for p in &parts[..parts.len() - 1] {
            cur.push(p);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => ok = false,
                Err(_) => fs::create_dir(&cur).unwrap(),
            }
            if !ok {
                break;
            }
        }
        if !ok || fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        match node {
            Node::Dir(m) => {
                fs::create_dir(&path).unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(*m)).unwrap();
            }
            Node::File(d, m, t) => {
                fs::write(&path, d).unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(*m)).unwrap();
                filetime::set_file_mtime(&path, filetime::FileTime::from_unix_time(*t as i64, 0)).unwrap();
            }
            Node::Link(t) => std::os::unix::fs::symlink(t, &path).unwrap(),
        }
    }
}

/// A hostile or odd tar entry.
#[derive(Debug, Clone)]
enum Raw {
    File(String, Vec<u8>),
    Dir(String),
    Symlink(String, String),
    Hardlink(String, String),
    Fifo(String),
}

fn raw_path() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![3 => name(), 1 => Just("..".to_string()), 1 => Just(".".to_string())],
        1..4,
    )
    .prop_flat_map(|parts| {
        let p = parts.join("/");
        prop_oneof![4 => Just(p.clone()), 1 => Just(format!("/{p}"))]
    })
}

fn raw_entries() -> impl Strategy<Value = Vec<Raw>> {
    let e = prop_oneof![
        3 => (raw_path(), proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(p, d)| Raw::File(p, d)),
        2 => raw_path().prop_map(Raw::Dir),
        3 => (raw_path(), raw_path()).prop_map(|(p, t)| Raw::Symlink(p, t)),
        1 => (raw_path(), raw_path()).prop_map(|(p, t)| Raw::Hardlink(p, t)),
        1 => raw_path().prop_map(Raw::Fifo),
    ];
    proptest::collection::vec(e, 1..10)
}

/// A tar with raw names, bypassing the tar crate's own path checks.
fn craft(entries: &[Raw]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_old();
        let (name, kind, data, link): (&str, tar::EntryType, &[u8], Option<&str>) = match e {
            Raw::File(n, d) => (n, tar::EntryType::Regular, d, None),
            Raw::Dir(n) => (n, tar::EntryType::Directory, b"", None),
            Raw::Symlink(n, t) => (n, tar::EntryType::Symlink, b"", Some(t)),
            Raw::Hardlink(n, t) => (n, tar::EntryType::Link, b"", Some(t)),
            Raw::Fifo(n) => (n, tar::EntryType::Fifo, b"", None),
        };
        let raw = h.as_old_mut();
        let n = name.len().min(99);
        raw.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        if let Some(t) = link {
            let n = t.len().min(99);
            raw.linkname[..n].copy_from_slice(&t.as_bytes()[..n]);
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Non-hostile trees round-trip byte for byte, with modes, mtimes and link targets.
    #[test]
    fn trees_round_trip(nodes in tree_nodes()) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        build(&src, &nodes);
        let mut packed = Vec::new();
        match tree::pack(&src, &mut packed) {
            Ok(_) => {}
            // Links that leave the tree are refused by the packer: then nothing to compare.
            Err(tree::TreeError::Refused { reason, .. }) => {
                prop_assert!(reason.contains("symlink"), "{reason}");
                return Ok(());
            }
            Err(e) => panic!("{e}"),
        }
        let dest = tmp.path().join("dest");
        tree::unpack_into(&packed[..], &dest, UnpackLimits::default()).unwrap();
        prop_assert_eq!(snapshot(&src), snapshot(&dest));
        // Nothing else appeared beside the destination.
        let mut names: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        prop_assert_eq!(names, vec![std::ffi::OsString::from("dest"), std::ffi::OsString::from("src")]);
    }

    /// Random hostile streams: whatever the unpacker accepts lands inside the destination, and
    /// whatever it refuses leaves the destination exactly as it was, with no staging left.
    #[test]
    fn hostile_streams_never_escape(entries in raw_entries()) {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"host file").unwrap();
        let box_dir = tmp.path().join("box");
        let dest = box_dir.join("dest");
        fs::create_dir_all(&dest).unwrap();
        fs::write(dest.join("marker"), b"keep").unwrap();
        // A link already in the destination pointing out of it must never be written through.
        std::os::unix::fs::symlink(&outside, dest.join("a")).unwrap();
        let before_dest = snapshot(&dest);
        let before_outside = snapshot(&outside);
        let archive = craft(&entries);
        let result = tree::unpack_into(&archive[..], &dest, UnpackLimits::default());
        prop_assert_eq!(snapshot(&outside), before_outside, "wrote outside the destination");
        let beside: Vec<_> = fs::read_dir(&box_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        prop_assert_eq!(beside, vec![std::ffi::OsString::from("dest")], "staging left behind");
        match result {
            Err(_) => prop_assert_eq!(snapshot(&dest), before_dest),
            Ok(_) => {
                // Every link in the result resolves inside the destination.
                for (path, (kind, _, _, target)) in snapshot(&dest) {
                    if kind == 'l' && path != "a" {
                        let t = PathBuf::from(String::from_utf8(target).unwrap());
                        prop_assert!(
                            tree::resolves_inside(&dest, Path::new(&path), &t),
                            "{path} -> {} escapes", t.display()
                        );
                    }
                }
            }
        }
    }

    /// The write-out: a second write of the same snapshot changes nothing (same inodes), a
    /// user's own file survives, and a link planted in the destination is never written
    /// through.
    #[test]
    fn write_out_is_idempotent_and_never_follows_links(nodes in tree_nodes(), plant in any::<bool>()) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("out")).unwrap();
        build(&src.join("out"), &nodes);
        let archive = tmp.path().join("snap.tar.zst");
        let (trailer, _) = match transport::archive::write(&src, &[PathBuf::from("out")], &archive, 1) {
            Ok(t) => t,
            Err(_) => return Ok(()), // a link leaving `out`: refused by the packer
        };
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let root = tmp.path().join("root");
        fs::create_dir(&root).unwrap();
        let write = || transport::archive::write_out(
            &archive, &trailer, Path::new("out"), &root, Path::new("res"), UnpackLimits::default());
        if plant {
            // An earlier output left a link where a directory goes.
            fs::create_dir(root.join("res")).unwrap();
            std::os::unix::fs::symlink(&outside, root.join("res/a")).unwrap();
            let _ = write();
            prop_assert!(fs::read_dir(&outside).unwrap().next().is_none(), "wrote through a link");
            return Ok(());
        }
        write().unwrap();
        prop_assert_eq!(snapshot(&src.join("out")), snapshot(&root.join("res")));
        fs::write(root.join("res/users-own-file"), b"mine").unwrap();
        let inodes: BTreeMap<String, u64> = snapshot(&root.join("res"))
            .keys()
            .map(|k| (k.clone(), fs::symlink_metadata(root.join("res").join(k)).unwrap().ino()))
            .collect();
        let stats = write().unwrap();
        prop_assert_eq!(stats.written, 0);
        let after: BTreeMap<String, u64> = snapshot(&root.join("res"))
            .keys()
            .map(|k| (k.clone(), fs::symlink_metadata(root.join("res").join(k)).unwrap().ino()))
            .collect();
        prop_assert_eq!(inodes, after);
        prop_assert_eq!(fs::read(root.join("res/users-own-file")).unwrap(), b"mine".to_vec());
    }
}

/// A tampered archive with its old digest: refused, destination untouched.
#[test]
fn tampered_archive_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("out")).unwrap();
    fs::write(src.join("out/f"), vec![7u8; 100_000]).unwrap();
    let archive = tmp.path().join("snap.tar.zst");
    let (trailer, _) = transport::archive::write(&src, &[PathBuf::from("out")], &archive, 1).unwrap();
    // Same length, other bytes: a re-compressed archive of other content would do the same.
    let mut bytes = fs::read(&archive).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40;
    fs::write(&archive, &bytes).unwrap();
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    let err = transport::archive::write_out(
        &archive,
        &trailer,
        Path::new("out"),
        &root,
        Path::new("res"),
        UnpackLimits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, tree::TreeError::Mismatch(_)), "{err}");
    assert_eq!(fs::read_dir(&root).unwrap().count(), 0, "a refused write left something behind");
}

/// The case proptest found: a new link `b -> a` is fine within the tree, but `a` in the
/// destination is already a link leading out; merged, `b` would lead out through it.
#[test]
fn a_link_already_in_the_destination_is_not_the_way_out_of_a_new_one() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let dest = tmp.path().join("box").join("dest");
    fs::create_dir_all(&dest).unwrap();
    std::os::unix::fs::symlink(&outside, dest.join("a")).unwrap();
    let before = snapshot(&dest);
    let archive = craft(&[Raw::Symlink("b".into(), "a".into())]);
    let err = tree::unpack_into(&archive[..], &dest, UnpackLimits::default()).unwrap_err();
    assert!(err.to_string().contains("through a link already there"), "{err}");
    assert_eq!(snapshot(&dest), before, "the destination is as it was");
    // Into an empty destination the same link is fine.
    let fresh = tmp.path().join("fresh");
    tree::unpack_into(&archive[..], &fresh, UnpackLimits::default()).unwrap();
    assert_eq!(fs::read_link(fresh.join("b")).unwrap(), Path::new("a"));
}
