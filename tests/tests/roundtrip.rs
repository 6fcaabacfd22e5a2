//! A large, awkward tree pushed to an agent and pulled back through the real binaries arrives
//! byte-identical with modes, mtimes and links preserved.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tests::{Bins, Coord, T, manifest, start_agent};

fn bins() -> Bins {
    tests::bins!()
}

fn build_tree(root: &Path) {
    let mut rng = tests::Rng(42);
    std::fs::create_dir_all(root.join("deep/er/and/deeper")).unwrap();
    // 10,000 small files over 100 directories.
    for d in 0..100 {
        let dir = root.join(format!("many/d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            let mut buf = vec![0u8; (rng.next_u64() % 2048) as usize];
            rng.fill(&mut buf);
            std::fs::write(dir.join(format!("f{f:03}.dat")), &buf).unwrap();
        }
    }
    // A 1 GiB file: sparse, with random blocks at the start, middle and end.
    let mut big = std::fs::File::create(root.join("big.bin")).unwrap();
    big.set_len(1 << 30).unwrap();
    for off in [0u64, 1 << 29, (1 << 30) - 65536] {
        let mut block = vec![0u8; 65536];
        rng.fill(&mut block);
        big.seek(SeekFrom::Start(off)).unwrap();
        big.write_all(&block).unwrap();
    }
    drop(big);
    // Unicode, spaces, a long name.
    std::fs::write(root.join("deep/er/naïve façade ünïcode ✓.txt"), "ok").unwrap();
    std::fs::write(root.join("deep/with space"), "spaces").unwrap();
    let long = "l".repeat(200);
    std::fs::write(root.join("deep/er/and/deeper").join(&long), "long name").unwrap();
    // Exec bits and a read-only file.
    let script = root.join("deep/run.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("deep/readonly"), "ro").unwrap();
    std::fs::set_permissions(root.join("deep/readonly"), std::fs::Permissions::from_mode(0o444)).unwrap();
    // Symlinks inside the tree: relative file, relative dir, dangling-inside.
    std::os::unix::fs::symlink("run.sh", root.join("deep/run-link")).unwrap();
    std::os::unix::fs::symlink("../many/d001", root.join("deep/many-link")).unwrap();
    std::os::unix::fs::symlink("er/not-yet", root.join("deep/dangling")).unwrap();
    // Fixed mtimes on a few entries, to see them survive.
    let t = filetime_like(1_600_000_000);
    for p in ["deep/run.sh", "many/d050/f050.dat", "big.bin"] {
        set_mtime(&root.join(p), t);
    }
}

fn filetime_like(secs: i64) -> libc::timespec {
    libc::timespec { tv_sec: secs, tv_nsec: 0 }
}

fn set_mtime(path: &Path, t: libc::timespec) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let times = [libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }, t];
    // SAFETY: valid C string and array of two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(r, 0);
}

#[test]
fn push_and_pull_a_large_tree() {
    let b = bins();
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coord::start(&b, &tmp.path().join("coord"), "127.0.0.1:0");
    let token = coord.token(&b, &[]);
    let _agent = start_agent(&b, &coord, &tmp.path().join("agent"), "mover", Some(&token));
    coord.proc.wait_for(&["agent joined", "mover"], T);

    let src = tmp.path().join("src");
    build_tree(&src);
    let on_agent = tmp.path().join("on-agent/tree");
    let back = tmp.path().join("back");
    let out = coord.cli_ok(&b, &["push", "mover", src.to_str().unwrap(), on_agent.to_str().unwrap()]);
    assert!(out.contains("entries"), "{out}");
    coord.cli_ok(&b, &["pull", "mover", on_agent.to_str().unwrap(), back.to_str().unwrap(), "--zstd", "1"]);

    let want = manifest(&src);
    assert!(want.len() > 10_100, "tree has {} entries", want.len());
    for (name, got) in [("pushed", manifest(&on_agent)), ("pulled back", manifest(&back))] {
        assert_eq!(got.len(), want.len(), "{name}: entry count");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w, "{name}: entry differs");
        }
    }
    coord.proc.wait_for(&["transfer done", "push", "mover"], T);
    // No staging directories left anywhere.
    for dir in [tmp.path().join("on-agent"), tmp.path().to_path_buf()] {
        for e in std::fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains("pype-incoming"), "staging left: {name}");
        }
    }
}

#[test]
fn pull_of_a_missing_path_is_a_clear_error() {
    let b = bins();
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coord::start(&b, &tmp.path().join("coord"), "127.0.0.1:0");
    let token = coord.token(&b, &[]);
    let _agent = start_agent(&b, &coord, &tmp.path().join("agent"), "a", Some(&token));
    coord.proc.wait_for(&["agent joined"], T);
    let (ok, _, err) =
        coord.cli(&b, &["pull", "a", "/nonexistent/pype", tmp.path().join("x").to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/pype"), "{err}");
    let (ok, _, err) = coord.cli(&b, &["push", "nobody", tmp.path().to_str().unwrap(), "/tmp/x"]);
    assert!(!ok);
    assert!(err.contains("agent nobody is not connected"), "{err}");
}
