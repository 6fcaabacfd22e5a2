//! A large, awkward tree pushed to an agent and pulled back through the real binaries arrives
//! byte-identical with modes, mtimes and links preserved.

use std::fs::FileTimes;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use tests::{Agent, Cluster, T, manifest};

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
    // (The access time is left as it is.)
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    for p in ["deep/run.sh", "many/d050/f050.dat", "big.bin"] {
        let f = std::fs::File::open(root.join(p)).unwrap();
        f.set_times(FileTimes::new().set_modified(t)).unwrap();
    }
}

#[test]
fn push_and_pull_a_large_tree() {
    let fx = Cluster::new().serve().agent(Agent::named("mover"));
    fx.coord().proc.wait_for(&["agent joined", "mover"], T);

    let src = fx.p("src");
    build_tree(&src);
    let on_agent = fx.p("on-agent/tree");
    let back = fx.p("back");
    let out = fx.cli_ok(&["push", "mover", src.to_str().unwrap(), on_agent.to_str().unwrap()]);
    assert!(out.contains("entries"), "{out}");
    fx.cli_ok(&["pull", "mover", on_agent.to_str().unwrap(), back.to_str().unwrap(), "--zstd", "1"]);

    let want = manifest(&src);
    assert!(want.len() > 10_100, "tree has {} entries", want.len());
    for (name, got) in [("pushed", manifest(&on_agent)), ("pulled back", manifest(&back))] {
        assert_eq!(got.len(), want.len(), "{name}: entry count");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w, "{name}: entry differs");
        }
    }
    fx.coord().proc.wait_for(&["transfer done", "push", "mover"], T);
    // No staging directories left anywhere.
    for dir in [fx.p("on-agent"), fx.dir.path().to_path_buf()] {
        for e in std::fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains("pype-incoming"), "staging left: {name}");
        }
    }
}

#[test]
fn pull_of_a_missing_path_is_a_clear_error() {
    let fx = Cluster::new().serve().agent(Agent::named("a"));
    fx.coord().proc.wait_for(&["agent joined"], T);
    let (ok, _, err) = fx.cli(&["pull", "a", "/nonexistent/pype", fx.p("x").to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/pype"), "{err}");
    let (ok, _, err) = fx.cli(&["push", "nobody", fx.dir.path().to_str().unwrap(), "/tmp/x"]);
    assert!(!ok);
    assert!(err.contains("agent nobody is not connected"), "{err}");
}
