//! The agent's snapshot cache and the trust boundary around it, through the real binaries
//! (`pype-coordinator run` with one local agent, real QUIC, real overlayfs when root):
//!
//! - whatever a step does to its inputs (rewrite in place, truncate, chmod, touch, rename,
//!   delete, add files), in every view the agent builds, the cached snapshot stays
//!   byte-identical and the next step on the same agent reads the stored bytes;
//! - a snapshot whose symlinks leave the path they are restored for is refused on restore,
//!   naming the entry, and the step never runs;
//! - the agent never writes a view through a symlink.
//!
//! Snapshots with hostile content are crafted here byte by byte (a ustar archive in a zstd
//! frame of raw blocks) and put straight into the coordinator's local store, so nothing on
//! the packing side can tidy them up first.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tests::{Cluster, Proc, manifest};

/// This file's helpers on the shared fixture: one local agent, its cache and its log.
trait AgentCache {
    /// `{d}` without its leading `/`: where the fixture's paths sit inside a snapshot.
    fn rd(&self) -> String;
    fn agent_dir(&self) -> PathBuf;
    fn agent_log(&self) -> String;
    /// The cached tree of a snapshot on the one local agent.
    fn cached(&self, id: &str) -> PathBuf;
    /// Merges `{path: (snapshot_id, in_snapshot_path)}` into the working registry.
    fn register(&self, entries: &[(String, &str, String)]);
    fn entry(&self, path: &str) -> (String, String);
    /// Runs a pipeline (`{d}` replaced) to its end with one local agent whose environment
    /// has `env`; returns (success, run id, the run's process for its log).
    fn run_text(&self, text: &str, env: &[(&str, &str)]) -> (bool, String, Proc);
}

impl AgentCache for Cluster {
    fn rd(&self) -> String {
        self.d().trim_start_matches('/').to_string()
    }

    fn agent_dir(&self) -> PathBuf {
        self.state().join("local-agents/agent-1")
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.agent_dir().join("agent.log")).unwrap_or_default()
    }

    fn cached(&self, id: &str) -> PathBuf {
        self.agent_dir().join("cache").join(id)
    }

    fn register(&self, entries: &[(String, &str, String)]) {
        let mut reg = serde_json::Map::new();
        for (path, id, isp) in entries {
            reg.insert(path.clone(), json!({ "snapshot_id": id, "in_snapshot_path": isp }));
        }
        let file = self.p(&format!("reg-{}.json", rand::random::<u32>()));
        std::fs::write(&file, Value::Object(reg).to_string()).unwrap();
        self.cli_ok(&["registry", "import", file.to_str().unwrap()]);
    }

    fn entry(&self, path: &str) -> (String, String) {
        let out = self.cli_ok(&["registry", "get", path]);
        let v: Value = serde_json::from_str(&out).unwrap();
        let e = &v[path];
        (e["snapshot_id"].as_str().unwrap().to_string(), e["in_snapshot_path"].as_str().unwrap().to_string())
    }

    fn run_text(&self, text: &str, env: &[(&str, &str)]) -> (bool, String, Proc) {
        let path = self.pipeline(&format!("p-{}.toml", rand::random::<u32>()), text);
        self.run_env(&["--agents", "1", "--infra-retries", "0", path.to_str().unwrap()], env)
    }
}

/// Heartbeats every second: these runs copy and mount on a loaded 2-core machine, and
/// nothing here is about losing agents.
fn cluster() -> Cluster {
    Cluster::new().heartbeat_ms(1000)
}

// ---------------------------------------------------------------------------------------
// Crafted snapshots: ustar entries in a zstd frame of raw blocks, stored as the local store
// keeps them (`<state>/snapshots/<id>.tar.zst` and its index `<id>.json`).

enum Item<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Link(&'a str, &'a str),
    /// A character device in the archive, listed as an empty file in the index.
    Device(&'a str),
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{:0w$o}\0", v, w = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}

fn tar_entry(out: &mut Vec<u8>, path: &str, kind: u8, mode: u32, link: &str, body: &[u8]) {
    let mut h = [0u8; 512];
    let (prefix, name) = if path.len() <= 100 {
        ("", path)
    } else {
        let cut = path
            .char_indices()
            .filter(|(i, c)| *c == '/' && path.len() - i - 1 <= 100)
            .map(|(i, _)| i)
            .next();
        let cut = cut.filter(|i| *i <= 155).expect("path too long for ustar");
        (&path[..cut], &path[cut + 1..])
    };
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], body.len() as u64);
    octal(&mut h[136..148], 1_600_000_000);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(body);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// A zstd frame holding `data` in raw (stored) blocks of at most 128 KiB.
fn zstd_raw(data: &[u8]) -> Vec<u8> {
    // Magic, a frame header without content size or checksum, a 128 KiB window.
    let mut out = vec![0x28, 0xB5, 0x2F, 0xFD, 0x00, 7 << 3];
    let chunks: Vec<&[u8]> = data.chunks(128 * 1024).collect();
    for (i, c) in chunks.iter().enumerate() {
        let last = u32::from(i + 1 == chunks.len());
        let header = last | ((c.len() as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(c);
    }
    out
}

/// Stores `items` as a snapshot in the coordinator's local store; returns its id.
fn store_snapshot(state: &Path, items: &[Item]) -> String {
    let mut tar = Vec::new();
    let mut files = Vec::new();
    for item in items {
        match item {
            Item::Dir(p) => {
                tar_entry(&mut tar, &format!("{p}/"), b'5', 0o755, "", b"");
                files.push(json!({ "path": p, "kind": "dir", "size": 0 }));
            }
            Item::File(p, body) => {
                tar_entry(&mut tar, p, b'0', 0o644, "", body);
                files.push(json!({ "path": p, "kind": "file", "size": body.len() }));
            }
            Item::Link(p, target) => {
                tar_entry(&mut tar, p, b'2', 0o777, target, b"");
                files.push(json!({ "path": p, "kind": "symlink", "size": 0 }));
            }
            Item::Device(p) => {
                tar_entry(&mut tar, p, b'3', 0o644, "", b"");
                files.push(json!({ "path": p, "kind": "file", "size": 0 }));
            }
        }
    }
    tar.extend_from_slice(&[0u8; 1024]);
    let archive = zstd_raw(&tar);
    let digest = blake3::hash(&archive);
    let id = format!("snap-{}", &digest.to_hex()[..32]);
    files.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    let content: u64 = items
        .iter()
        .map(|i| match i {
            Item::File(_, b) => b.len() as u64,
            _ => 0,
        })
        .sum();
    let meta = json!({
        "snapshot_id": id,
        "wire_bytes": archive.len(),
        "content_bytes": content,
        "entries": files.len(),
        "digest": digest.to_hex().to_string(),
        "created_at": 1_600_000_000,
        "files": files,
    });
    let store = state.join("snapshots");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(store.join(format!("{id}.tar.zst")), &archive).unwrap();
    std::fs::write(store.join(format!("{id}.json")), meta.to_string()).unwrap();
    id
}

/// The parent directories of `path` (relative), outermost first, as `Dir` items.
fn dirs_of(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut acc = String::new();
    for part in path.split('/').filter(|s| !s.is_empty()) {
        if !acc.is_empty() {
            acc.push('/');
        }
        acc.push_str(part);
        out.push(acc.clone());
    }
    out
}

// ---------------------------------------------------------------------------------------
// Point 5: steps cannot change the agent's cache.

/// Files of the input directory: (name, contents). Each is a target of one kind of damage.
const DIR_FILES: &[(&str, &str)] = &[
    ("appended.txt", "appended stays\n"),
    ("deleted.txt", "deleted stays\n"),
    ("kept.txt", "kept stays\n"),
    ("mode.txt", "mode stays\n"),
    ("renamed.txt", "renamed stays\n"),
    ("rewritten.txt", "rewritten stays\n"),
    ("sub/deep.txt", "deep stays\n"),
    ("trunc.txt", "truncated stays\n"),
];

/// What a step sees of `{p}/in.txt` and `{p}/dir`: names, then mode, size and mtime of each
/// file, then the contents (paths written out in full, so rewritten paths are rewritten).
fn listing(p: &str) -> String {
    format!(
        "(cd {p}/dir && find . | sort && find . -type f | sort | xargs stat -c '%n %a %s %Y' && find . -type f | sort | xargs cat)\n\
         stat -c '%a %s %Y' {p}/in.txt\ncat {p}/in.txt\n"
    )
}

/// Every kind of change a root step can make to an input, through the paths it was given.
fn damage(p: &str) -> String {
    format!(
        "printf EVIL | dd of={p}/in.txt conv=notrunc status=none\n\
         touch -d @1000000000 {p}/in.txt\n\
         grep -q EVIL {p}/in.txt\n\
         echo more >> {p}/dir/appended.txt\n\
         echo gone > {p}/dir/rewritten.txt\n\
         truncate -s 0 {p}/dir/trunc.txt\n\
         chmod 4777 {p}/dir/mode.txt\n\
         touch -d @1000000000 {p}/dir/kept.txt\n\
         mv {p}/dir/renamed.txt {p}/dir/moved.txt\n\
         rm {p}/dir/deleted.txt\n\
         echo new > {p}/dir/new.txt\n\
         rm -r {p}/dir/sub\n\
         chmod 700 {p}/dir\n\
         test ! -e {p}/dir/deleted.txt && test -s {p}/dir/new.txt && test ! -s {p}/dir/trunc.txt\n"
    )
}

/// Step `vandal` damages its inputs, seen both at their own paths (`data/`, the snapshot's
/// own layout) and at other paths (`alias/`, registry entries naming the same snapshot paths,
/// presented through the remap layer); step `reader`, later on the same agent, lists them.
fn vandal_then_reader(env: &[(&str, &str)], expect_view: &str) {
    let fx = cluster();
    let d = fx.d();
    for (name, body) in DIR_FILES {
        let f = fx.p(&format!("data/dir/{name}"));
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, body).unwrap();
    }
    std::fs::write(fx.p("data/in.txt"), "original bytes\n").unwrap();
    // Read-only, as a restored snapshot's files are: what the reader sees is what was stored.
    for (name, _) in
        DIR_FILES.iter().map(|(n, b)| (format!("dir/{n}"), b)).chain([("in.txt".to_string(), &"")])
    {
        std::fs::set_permissions(fx.p(&format!("data/{name}")), std::fs::Permissions::from_mode(0o444))
            .unwrap();
    }
    let original = manifest(&fx.p("data"));
    fx.cli_ok(&["import", &format!("{d}/data/in.txt"), &format!("{d}/data/dir")]);
    let (snap, in_isp) = fx.entry(&format!("{d}/data/in.txt"));
    let (snap_dir, dir_isp) = fx.entry(&format!("{d}/data/dir"));
    assert_eq!(snap, snap_dir, "one import, one snapshot");
    fx.register(&[(format!("{d}/alias/in.txt"), &snap, in_isp), (format!("{d}/alias/dir"), &snap, dir_isp)]);
    let expected = Command::new("bash")
        .arg("-c")
        .arg(format!("export LC_ALL=C; set -eo pipefail\n{0}{0}", listing(&format!("{d}/data"))))
        .output()
        .unwrap();
    assert!(expected.status.success(), "{}", String::from_utf8_lossy(&expected.stderr));
    let expected = String::from_utf8(expected.stdout).unwrap();

    let inputs = r#""{d}/data/in.txt", "{d}/data/dir", "{d}/alias/in.txt", "{d}/alias/dir""#;
    let pipeline = format!(
        r#"
name = "vandal"
[[steps]]
name = "vandal"
command = '''
{}{}echo done > {{d}}/out/vandal.txt
'''
inputs = [{inputs}]
outputs = ["{{d}}/out/vandal.txt"]
[[steps]]
name = "reader"
command = '''
export LC_ALL=C
( {}{} ) > {{d}}/out/reader.txt
'''
inputs = [{inputs}, "{{d}}/out/vandal.txt"]
outputs = ["{{d}}/out/reader.txt"]
"#,
        damage("{d}/data"),
        damage("{d}/alias"),
        listing("{d}/data"),
        listing("{d}/alias"),
    );
    let (ok, _run, p) = fx.run_text(&pipeline, env);
    let log = fx.agent_log();
    assert!(ok, "the run failed\n{}\n--- agent\n{log}", p.dump());
    assert!(log.contains(expect_view), "expected {expect_view:?} in the agent's log\n{log}");
    // Both steps ran on the one agent, from its cache: one fetch of the inputs, then a hit.
    let fetched = log.lines().filter(|l| l.contains("snapshot fetched") && l.contains(&snap)).count();
    assert_eq!(fetched, 1, "{log}");
    assert!(log.contains(&format!("snapshot cache hit snapshot={snap}")), "{log}");
    let read = std::fs::read_to_string(fx.p("out/reader.txt")).unwrap();
    assert_eq!(read, expected, "the later step did not get the stored bytes\n{log}");
    // The cached tree is exactly what was stored (modes read-only, as the cache keeps them).
    let cached = manifest(&fx.cached(&snap).join(format!("{}/data", fx.rd())));
    assert_eq!(cached, original, "the step changed the agent's cache");
}

#[test]
fn overlayfs_view_in_a_namespace_keeps_the_cache_intact() {
    if !tests::require_root("overlayfs_view_in_a_namespace_keeps_the_cache_intact", "overlayfs needs it") {
        return;
    }
    vandal_then_reader(&[], "overlayfs view mounted");
}

#[test]
fn overlayfs_view_with_rewritten_paths_keeps_the_cache_intact() {
    if !tests::require_root(
        "overlayfs_view_with_rewritten_paths_keeps_the_cache_intact",
        "overlayfs needs it",
    ) {
        return;
    }
    vandal_then_reader(&[("PYPE_MOUNT_NAMESPACE", "never")], "overlayfs view mounted");
}

#[test]
fn copied_view_in_a_namespace_keeps_the_cache_intact() {
    vandal_then_reader(&[("PYPE_OVERLAY_MOUNT", "never")], "PYPE_OVERLAY_MOUNT=never");
}

#[test]
fn copied_view_with_rewritten_paths_keeps_the_cache_intact() {
    vandal_then_reader(
        &[("PYPE_OVERLAY_MOUNT", "never"), ("PYPE_MOUNT_NAMESPACE", "never")],
        "PYPE_OVERLAY_MOUNT=never",
    );
}

// ---------------------------------------------------------------------------------------
// Point 1: links are judged where they will really sit.

/// A snapshot in the store holds `data/dir/leak -> ../../secret.txt` (inside the snapshot,
/// but out of `data/dir`: at its real place it reaches the host's `{d}/secret.txt`) and
/// `data/link.txt -> ../secret.txt` (an input that is itself a link). The agent refuses both
/// on restore, naming the snapshot, the entry and its target, as a setup failure; the steps
/// never run. A link that stays inside its input is restored as before.
#[test]
fn restore_refuses_links_that_leave_their_input() {
    let fx = cluster();
    let d = fx.d();
    let rd = fx.rd();
    std::fs::write(fx.p("secret.txt"), "HOST SECRET\n").unwrap();
    let mut items: Vec<Item> = Vec::new();
    let dirs: Vec<String> =
        dirs_of(&format!("{rd}/data/dir")).into_iter().chain([format!("{rd}/data/good")]).collect();
    items.extend(dirs.iter().map(|p| Item::Dir(p)));
    let (ok_txt, leak, link, good_f, good_l) = (
        format!("{rd}/data/dir/ok.txt"),
        format!("{rd}/data/dir/leak"),
        format!("{rd}/data/link.txt"),
        format!("{rd}/data/good/f.txt"),
        format!("{rd}/data/good/l"),
    );
    items.push(Item::File(&ok_txt, b"fine\n"));
    items.push(Item::Link(&leak, "../../secret.txt"));
    items.push(Item::Link(&link, "../secret.txt"));
    items.push(Item::File(&good_f, b"good\n"));
    items.push(Item::Link(&good_l, "f.txt"));
    let snap = store_snapshot(&fx.state(), &items);
    fx.register(&[
        (format!("{d}/data/dir"), &snap, format!("{rd}/data/dir")),
        (format!("{d}/data/link.txt"), &snap, link.clone()),
        (format!("{d}/data/good"), &snap, format!("{rd}/data/good")),
    ]);
    let (ok, _run, p) = fx.run_text(
        r#"
name = "leaky"
[[steps]]
name = "through-dir"
command = "touch {d}/ran-dir; cat {d}/data/dir/leak > {d}/out/stolen-dir.txt"
inputs = ["{d}/data/dir"]
outputs = ["{d}/out/stolen-dir.txt"]
[[steps]]
name = "through-link"
command = "touch {d}/ran-link; cat {d}/data/link.txt > {d}/out/stolen-link.txt"
inputs = ["{d}/data/link.txt"]
outputs = ["{d}/out/stolen-link.txt"]
[[steps]]
name = "inside"
command = "cat {d}/data/good/l > {d}/out/good.txt"
inputs = ["{d}/data/good"]
outputs = ["{d}/out/good.txt"]
"#,
        &[],
    );
    let log = fx.agent_log();
    assert!(!ok, "the run should fail\n{}", p.dump());
    for (step, entry, target) in
        [("through-dir", leak.as_str(), "../../secret.txt"), ("through-link", link.as_str(), "../secret.txt")]
    {
        let line = p.wait_for(&["step failed", &format!("step=\"{step}\"")], Duration::from_secs(1));
        for needle in ["setup failed", snap.as_str(), entry, target] {
            assert!(line.contains(needle), "{needle:?} not in {line:?}\n{log}");
        }
    }
    // The refused steps never ran, and nothing of the host's file left the agent.
    assert!(!fx.p("ran-dir").exists() && !fx.p("ran-link").exists(), "a refused step ran\n{log}");
    assert!(!fx.p("out/stolen-dir.txt").exists() && !fx.p("out/stolen-link.txt").exists());
    // The link that stays inside its input was restored, and its step ran (a failed run
    // writes nothing out, so its output is only in the store).
    p.wait_for(&["step harvested", "step=\"inside\""], Duration::from_secs(1));
    fx.entry(&format!("{d}/out/good.txt"));
}

// ---------------------------------------------------------------------------------------
// Point 2: nothing writes through a link.

/// Input `{d}/x` is a directory of snapshot A (presented at another path, so through the
/// remap layer) holding `link -> sub`; input `{d}/x/link/f.txt` is a file of snapshot B. The
/// view would have to be written through `x/link`: the agent refuses, naming both paths, and
/// neither the cache nor anything the link reaches gets `f.txt`. An output below the link is
/// refused the same way.
#[test]
fn view_is_never_written_through_a_link() {
    let fx = cluster();
    let d = fx.d();
    let rd = fx.rd();
    let mut a_items: Vec<Item> = Vec::new();
    let a_dirs = dirs_of(&format!("{rd}/w/a/sub"));
    a_items.extend(a_dirs.iter().map(|p| Item::Dir(p)));
    let (a_file, a_link) = (format!("{rd}/w/a/sub/in-a.txt"), format!("{rd}/w/a/link"));
    a_items.push(Item::File(&a_file, b"from a\n"));
    a_items.push(Item::Link(&a_link, "sub"));
    let a = store_snapshot(&fx.state(), &a_items);
    let mut b_items: Vec<Item> = Vec::new();
    let b_dirs = dirs_of(&format!("{rd}/w"));
    b_items.extend(b_dirs.iter().map(|p| Item::Dir(p)));
    let b_file = format!("{rd}/w/b.txt");
    b_items.push(Item::File(&b_file, b"from b\n"));
    let b = store_snapshot(&fx.state(), &b_items);
    fx.register(&[
        (format!("{d}/x"), &a, format!("{rd}/w/a")),
        (format!("{d}/x/link/f.txt"), &b, b_file.clone()),
        (format!("{d}/y"), &a, format!("{rd}/w/a")),
    ]);
    let (ok, _run, p) = fx.run_text(
        r#"
name = "through"
[[steps]]
name = "nested-input"
command = "touch {d}/ran-nested; cat {d}/x/link/f.txt > {d}/out/nested.txt"
inputs = ["{d}/x", "{d}/x/link/f.txt"]
outputs = ["{d}/out/nested.txt"]
[[steps]]
name = "output-below-link"
command = "touch {d}/ran-output; echo hi > {d}/y/link/out.txt"
inputs = ["{d}/y"]
outputs = ["{d}/y/link/out.txt"]
"#,
        &[],
    );
    let log = fx.agent_log();
    assert!(!ok, "the run should fail\n{}", p.dump());
    for (step, dest, link) in
        [("nested-input", "x/link/f.txt", "x/link"), ("output-below-link", "y/link/out.txt", "y/link")]
    {
        let line = p.wait_for(&["step failed", &format!("step=\"{step}\"")], Duration::from_secs(1));
        for needle in ["setup failed", "symlink", dest, &format!("{link} -> sub")] {
            assert!(line.contains(needle), "{needle:?} not in {line:?}\n{log}");
        }
    }
    assert!(!fx.p("ran-nested").exists() && !fx.p("ran-output").exists(), "a refused step ran\n{log}");
    // Nothing was written where the link points: not in the cache, not anywhere else.
    let cached_a = fx.cached(&a).join(format!("{rd}/w/a"));
    let names: Vec<String> = manifest(&cached_a).iter().map(|e| e.path.display().to_string()).collect();
    assert_eq!(names, vec!["link", "sub", "sub/in-a.txt"], "the cache of {a} changed\n{log}");
}

/// Issue 16 point 9: a relayed snapshot the agent refuses while receiving it (a device entry
/// its index calls a file) is refused with a reason the coordinator logs, naming the agent
/// and the snapshot, instead of a stream stopped by the peer; the step fails at setup.
#[test]
fn an_agent_refusing_a_relayed_snapshot_tells_the_coordinator_why() {
    let fx = cluster();
    let d = fx.d();
    let rd = fx.rd();
    let mut items: Vec<Item> = Vec::new();
    let dirs = dirs_of(&format!("{rd}/data"));
    items.extend(dirs.iter().map(|p| Item::Dir(p)));
    let dev = format!("{rd}/data/dev.txt");
    items.push(Item::Device(&dev));
    let snap = store_snapshot(&fx.state(), &items);
    fx.register(&[(format!("{d}/data/dev.txt"), &snap, dev.clone())]);
    let (ok, _run, p) = fx.run_text(
        r#"
name = "device"
[[steps]]
name = "use"
command = "cat {d}/data/dev.txt > {d}/out/x.txt"
inputs = ["{d}/data/dev.txt"]
outputs = ["{d}/out/x.txt"]
"#,
        &[],
    );
    assert!(!ok, "{}", p.dump());
    let line = p.wait_for(&["agent local-1 refused snapshot", &snap], Duration::from_secs(1));
    assert!(line.contains("dev.txt"), "{line}");
    assert_eq!(p.count(&["snapshot request failed"]), 0, "{}", p.dump());
    p.wait_for(&["step failed", "setup failed"], Duration::from_secs(1));
}
