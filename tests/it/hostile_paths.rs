//! The trust boundary on paths and stored data, through the real binaries: links judged where
//! they will really sit, nothing written through a link, every read of a stored snapshot
//! verified, and writing final outputs out idempotent and never destructive.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::{Cluster, LONG, Proc};

/// This file's helpers on the shared fixture.
trait HostilePaths {
    /// Runs `pipeline` with one local agent and no infrastructure retries to its end;
    /// returns (success, its stdout, the process).
    fn run_file(&self, pipeline: &Path) -> (bool, String, Proc);
    fn run_file_ok(&self, pipeline: &Path) -> (String, Proc);
    /// The working registry's entry for `path`: (snapshot id, in-snapshot path).
    fn entry(&self, path: &Path) -> Option<(String, String)>;
}

impl HostilePaths for Cluster {
    fn run_file(&self, pipeline: &Path) -> (bool, String, Proc) {
        let mut p = self.start_run(&["--agents", "1", "--infra-retries", "0", pipeline.to_str().unwrap()]);
        let status = p.wait_exit(LONG);
        (status.success(), p.stdout(), p)
    }

    fn run_file_ok(&self, pipeline: &Path) -> (String, Proc) {
        let (ok, out, p) = self.run_file(pipeline);
        assert!(ok, "run failed\n{out}\n{}", p.dump());
        (out, p)
    }

    fn entry(&self, path: &Path) -> Option<(String, String)> {
        let text = fs::read_to_string(self.state().join("snapshot_registry.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let e = v.get(path.to_str().unwrap())?;
        Some((e["snapshot_id"].as_str()?.to_string(), e["in_snapshot_path"].as_str()?.to_string()))
    }
}

/// Lists every path below `dir` (relative), links not followed.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = fs::read_dir(dir.join(&rel)) else { continue };
        for e in rd {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(r.clone());
            }
            out.push(r.to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

/// Point 1: a step whose output directory holds a link that, from where it will really sit,
/// leads out of the declared output (to a sibling the host has) is refused at harvest as an
/// infrastructure failure naming the entry; nothing is registered, and no later step gets the
/// host's file through it.
#[test]
fn a_link_leading_out_of_its_declared_output_is_refused_at_harvest() {
    let fx = Cluster::new();
    fs::create_dir_all(fx.p("data")).unwrap();
    fs::write(fx.p("data/secret.txt"), "the host's own file\n").unwrap();
    let pipeline = fx.pipeline(
        "pipeline.toml",
        r#"
name = "leak"
data_root = "{d}/data"

[[steps]]
name = "make"
outputs = ["out"]
command = "mkdir -p {{data_root}}/out && echo fine > {{data_root}}/out/ok.txt && ln -s ../secret.txt {{data_root}}/out/leak"

[[steps]]
name = "read"
inputs = ["out"]
outputs = ["copied.txt"]
command = "cat {{data_root}}/out/leak > {{data_root}}/copied.txt"
"#,
    );
    let (ok, _, p) = fx.run_file(&pipeline);
    assert!(!ok, "the run must fail\n{}", p.dump());
    let line = p.wait_for(&["leak", "leads outside"], Duration::from_secs(1));
    assert!(line.contains("out"), "{line}");
    assert!(fx.entry(&fx.p("data/out")).is_none(), "the refused harvest was registered");
    assert!(!fx.p("data/copied.txt").exists(), "a later step ran on the refused output");
}

/// Builds a zstd tar of the tree at `src` (links inside it allowed), stores it in the local
/// snapshot store of `state` under its content address with its index, and returns the id.
fn store_crafted(state: &Path, src: &Path) -> String {
    let mut tar = Vec::new();
    transport::tree::pack(src, &mut tar).unwrap();
    let zst = zstd_compress(&tar);
    let digest = blake3::hash(&zst);
    let id = format!("snap-{}", &digest.to_hex()[..32]);
    let (files, stats) = {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        fs::write(tmp.path(), &zst).unwrap();
        transport::archive::index(tmp.path(), Default::default()).unwrap()
    };
    let meta = serde_json::json!({
        "snapshot_id": id,
        "wire_bytes": zst.len(),
        "content_bytes": stats.content_bytes,
        "entries": stats.entries,
        "digest": digest.to_hex().to_string(),
        "created_at": 0,
        "files": files,
    });
    let dir = state.join("snapshots");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(format!("{id}.tar.zst")), &zst).unwrap();
    fs::write(dir.join(format!("{id}.json")), serde_json::to_vec(&meta).unwrap()).unwrap();
    id
}

fn zstd_compress(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// Points 1 and 4 at write-out: a stored snapshot (bytes in the store, not from any harvest)
/// holding a link that leaves its declared output is refused when the coordinator writes the
/// final output out; a tampered archive with its old digest is refused too. Both name the
/// snapshot, and the destination is left exactly as it was (no file, no empty directory).
#[test]
fn stored_snapshots_are_judged_and_verified_when_written_out() {
    let fx = Cluster::new();
    let data = fx.p("data");
    fs::create_dir_all(&data).unwrap();
    let pipeline = fx.pipeline(
        "pipeline.toml",
        r#"
name = "finals"
data_root = "{d}/data"

[[steps]]
name = "make"
outputs = ["deep/er/out"]
command = "mkdir -p {{data_root}}/deep/er/out && head -c 300000 /dev/urandom > {{data_root}}/deep/er/out/blob"
"#,
    );
    fx.run_file_ok(&pipeline);
    let out = fx.p("data/deep/er/out");
    let blob = fs::read(out.join("blob")).unwrap();
    let (id, isp) = fx.entry(&out).expect("registered");

    // Tampered: the blob holding the file's bytes replaced by other bytes (a valid encoding of
    // other content) under the same digest.
    let snaps = fx.state().join("snapshots");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(snaps.join(format!("{id}.manifest"))).unwrap()).unwrap();
    let chunk = manifest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"].as_str().unwrap().ends_with("/blob"))
        .and_then(|e| e["chunks"][0].as_str())
        .expect("the file's chunk")
        .to_string();
    let digest = chunk.split(':').next().unwrap();
    let stored = snaps.join("blobs").join(&digest[..2]).join(digest);
    let good = fs::read(&stored).unwrap();
    fs::write(&stored, b"\0not what was stored").unwrap();
    fs::remove_dir_all(fx.p("data/deep")).unwrap();
    let (ok, _, p) = fx.run_file(&pipeline);
    assert!(!ok, "a tampered snapshot was written out\n{}", p.dump());
    let err = p.dump();
    assert!(err.contains(&id) && err.contains("verification"), "{err}");
    assert!(!fx.p("data/deep").exists(), "a refused write left {:?}", tree(&data));
    fs::write(&stored, &good).unwrap();

    // A link that leads out of the declared output, from where it will sit.
    let crafted = tempfile::tempdir().unwrap();
    let inner = crafted.path().join(isp.trim_start_matches('/'));
    fs::create_dir_all(&inner).unwrap();
    fs::write(inner.join("blob"), &blob).unwrap();
    fs::write(inner.parent().unwrap().join("secret.txt"), b"beside the output").unwrap();
    std::os::unix::fs::symlink("../secret.txt", inner.join("leak")).unwrap();
    let bad = store_crafted(&fx.state(), crafted.path());
    let reg = fx.p("reg.json");
    fs::write(
        &reg,
        serde_json::json!({ out.to_str().unwrap(): { "snapshot_id": bad, "in_snapshot_path": isp } })
            .to_string(),
    )
    .unwrap();
    let (ok, _, err) = fx.cli(&["registry", "import", reg.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, _, p) = fx.run_file(&pipeline);
    assert!(!ok, "a link leading out of its output was written out\n{}", p.dump());
    let err = p.dump();
    assert!(err.contains(&bad) && err.contains("leak") && err.contains("leads outside"), "{err}");
    assert!(!fx.p("data/deep").exists(), "a refused write left {:?}", tree(&data));
}

/// Point 2: a link on the host where an output's directory goes is never written through: the
/// write-out is refused naming the link and its target, and the place it points at stays
/// empty.
#[test]
fn an_output_is_never_written_through_a_link() {
    let fx = Cluster::new();
    fs::create_dir_all(fx.p("data")).unwrap();
    let elsewhere = fx.p("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    // Left by an earlier output (or anyone) where `results/` goes.
    std::os::unix::fs::symlink("../elsewhere", fx.p("data/results")).unwrap();
    let pipeline = fx.pipeline(
        "pipeline.toml",
        r#"
name = "through"
data_root = "{d}/data"

[[steps]]
name = "summarise"
outputs = ["results/summary.txt"]
command = "mkdir -p {{data_root}}/results && echo summary > {{data_root}}/results/summary.txt"
"#,
    );
    let (ok, _, p) = fx.run_file(&pipeline);
    assert!(!ok, "the write-out must be refused\n{}", p.dump());
    let err = p.dump();
    assert!(err.contains("results") && err.contains("elsewhere") && err.contains("symlink"), "{err}");
    assert_eq!(tree(&elsewhere), Vec::<String>::new(), "written through the link");
}

/// Point 6: writing outputs out is idempotent and never destroys user data: a run in which
/// every step is skipped leaves an output holding the registered content untouched (same
/// inode, same mtime), a file the user placed inside an output directory survives, and a
/// changed file is replaced by rename (a new inode) while its neighbours keep theirs.
#[test]
fn writing_outputs_out_is_idempotent_and_keeps_user_files() {
    let fx = Cluster::new();
    fs::create_dir_all(fx.p("data")).unwrap();
    let pipeline = fx.pipeline(
        "pipeline.toml",
        r#"
name = "idem"
data_root = "{d}/data"

[[steps]]
name = "make"
outputs = ["outdir", "big.bin"]
command = "mkdir -p {{data_root}}/outdir && echo a > {{data_root}}/outdir/a.txt && echo b > {{data_root}}/outdir/b.txt && head -c 20000000 /dev/urandom > {{data_root}}/big.bin"
"#,
    );
    fx.run_file_ok(&pipeline);
    let ino = |p: &str| fs::metadata(fx.p(p)).unwrap().ino();
    let mtime = |p: &str| fs::metadata(fx.p(p)).unwrap().mtime();
    let (big, a, b) = (ino("data/big.bin"), ino("data/outdir/a.txt"), ino("data/outdir/b.txt"));
    let big_mtime = mtime("data/big.bin");
    fs::write(fx.p("data/outdir/mine.txt"), "the user's own notes\n").unwrap();

    let (out, p) = fx.run_file_ok(&pipeline);
    assert!(p.count(&["step skipped"]) >= 1, "{}", p.dump());
    assert!(out.contains("up to date"), "{out}");
    assert_eq!((ino("data/big.bin"), ino("data/outdir/a.txt"), ino("data/outdir/b.txt")), (big, a, b));
    assert_eq!(mtime("data/big.bin"), big_mtime);
    assert_eq!(fs::read_to_string(fx.p("data/outdir/mine.txt")).unwrap(), "the user's own notes\n");

    // A changed file is put back by rename; nothing else is touched.
    fs::write(fx.p("data/outdir/a.txt"), "changed by hand\n").unwrap();
    let a_now = ino("data/outdir/a.txt");
    fx.run_file_ok(&pipeline);
    assert_eq!(fs::read_to_string(fx.p("data/outdir/a.txt")).unwrap(), "a\n");
    assert_ne!(ino("data/outdir/a.txt"), a_now, "rewritten in place instead of renamed over");
    assert_eq!(ino("data/outdir/b.txt"), b);
    assert_eq!(fs::read_to_string(fx.p("data/outdir/mine.txt")).unwrap(), "the user's own notes\n");
    let left: Vec<String> = tree(&fx.p("data")).into_iter().filter(|p| p.contains("pype-")).collect();
    assert!(left.is_empty(), "temp files left: {left:?}");
}
