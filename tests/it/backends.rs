//! Storage backends and the step lifecycle through the real binaries: a coordinator with its
//! snapshot store and an agent, steps sent with `pype-coordinator step run`, outputs checked
//! on disk, in the registry, in the coordinator's index and in `/proc/self/mountinfo`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tests::{Agent, Cluster, Signal, T};

/// Whether this test may mount (overlayfs, mount namespaces); says loudly when not.
fn can_mount(test: &str) -> bool {
    tests::require_root(test, "overlayfs and mount namespaces need it to mount")
}

/// A coordinator and one agent `a1` (`fx.agents[0]`, with `env` and its own registry), in a
/// temp dir holding `data/`, `results/` and the operator's registry `registry.json`.
fn cluster(env: &[(&str, &str)]) -> Cluster {
    let fx = Cluster::new();
    std::fs::create_dir_all(fx.p("data")).unwrap();
    std::fs::create_dir_all(fx.p("results")).unwrap();
    let mut agent = Agent::named("a1");
    for (k, v) in env {
        agent = agent.env(k, v);
    }
    let agent = agent.env("PYPE_SNAPSHOT_REGISTRY", &fx.pstr("agent-registry.json"));
    let fx = fx.serve().agent(agent);
    fx.agents[0].wait_for(&["connected to coordinator"], T);
    fx
}

/// This file's helpers on the shared fixture: steps sent to `a1` with `step run`.
trait Backends {
    fn work_dir(&self) -> PathBuf;
    fn registry(&self) -> PathBuf;
    fn import(&self, rels: &[&str]);
    /// Runs a step file (TOML text, `{d}` replaced by the temp dir); returns (ok, outcome, stderr).
    fn step(&self, toml: &str) -> (bool, Value, String);
    fn step_ok(&self, toml: &str) -> (Value, String);
    fn registry_json(&self) -> Value;
    fn check_outputs(&self, rels: &[&str]) -> Vec<String>;
    /// Mount points below the agent's work dir, as the kernel lists them.
    fn mounts(&self) -> Vec<String>;
    fn step_dirs(&self) -> Vec<String>;
    fn assert_clean(&self);
}

impl Backends for Cluster {
    fn work_dir(&self) -> PathBuf {
        self.p("a1/work")
    }

    fn registry(&self) -> PathBuf {
        self.p("registry.json")
    }

    fn import(&self, rels: &[&str]) {
        let mut args = vec!["import".to_string()];
        args.extend(rels.iter().map(|r| self.pstr(r)));
        args.push("--registry".into());
        args.push(self.registry().display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.cli_ok(&args);
    }

    fn step(&self, toml: &str) -> (bool, Value, String) {
        let file = self.pipeline(&format!("step-{}.toml", rand::random::<u32>()), toml);
        let (ok, out, err) = self.cli(&[
            "step",
            "run",
            "--agent",
            "a1",
            file.to_str().unwrap(),
            "--registry",
            self.registry().to_str().unwrap(),
        ]);
        let outcome: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
            panic!(
                "no outcome JSON ({e}):\n{out}\n{err}\n{}\n{}",
                self.agents[0].dump(),
                self.coord().proc.dump()
            )
        });
        (ok, outcome, err)
    }

    fn step_ok(&self, toml: &str) -> (Value, String) {
        let (ok, outcome, err) = self.step(toml);
        assert!(ok, "step failed: {outcome}\n{err}\n{}", self.agents[0].dump());
        (outcome, err)
    }

    fn registry_json(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.registry()).unwrap()).unwrap()
    }

    fn check_outputs(&self, rels: &[&str]) -> Vec<String> {
        let mut args = vec!["check-outputs", "--agent", "a1", "--registry"];
        let reg = self.registry().display().to_string();
        args.push(&reg);
        let paths: Vec<String> = rels.iter().map(|r| self.pstr(r)).collect();
        args.extend(paths.iter().map(String::as_str));
        let out = self.cli_ok(&args);
        out.lines().map(|l| l.rsplit('\t').next().unwrap().to_string()).collect()
    }

    fn mounts(&self) -> Vec<String> {
        let work = self.work_dir().display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&work))
            .collect()
    }

    fn step_dirs(&self) -> Vec<String> {
        match std::fs::read_dir(self.work_dir().join("steps")) {
            Ok(rd) => rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn assert_clean(&self) {
        assert!(self.mounts().is_empty(), "mounts left: {:?}", self.mounts());
        assert!(self.step_dirs().is_empty(), "step dirs left: {:?}", self.step_dirs());
    }
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    k.sort();
    k
}

/// The snapshot backend end to end: inputs restored from the store (one fetch per snapshot,
/// cached across steps), exactly the declared outputs harvested (spaces, unicode, symlinks
/// inside a directory output), a second step consuming the first one's outputs, cleanup.
fn snapshot_pipeline(env: &[(&str, &str)], expect_view: &str) {
    let fx = cluster(env);
    std::fs::write(fx.p("data/a.txt"), "alpha\n").unwrap();
    std::fs::write(fx.p("data/b.txt"), "beta\n").unwrap();
    fx.import(&["data/a.txt", "data/b.txt"]);
    let (outcome, err) = fx.step_ok(
        r#"
command = '''
cat {d}/data/a.txt {d}/data/b.txt > "{d}/results/my out ü.txt"
echo scratch > {d}/results/undeclared.tmp
mkdir -p {d}/results/tree/sub
echo leaf > {d}/results/tree/sub/leaf.txt
ln -s sub/leaf.txt {d}/results/tree/link
echo "merged view ok"
'''
inputs = ["{d}/data/a.txt", "{d}/data/b.txt"]
outputs = ["{d}/results/my out ü.txt", "{d}/results/tree", "{d}/results/never-written"]
"#,
    );
    assert!(err.contains("merged view ok"), "snippet output streamed to the operator: {err}");
    assert!(err.contains(&format!("view {expect_view}")), "{err}");
    let new = &outcome["new_entries"];
    assert_eq!(keys(new), vec![fx.pstr("results/my out ü.txt"), fx.pstr("results/tree")], "{outcome}");
    assert_eq!(outcome["outputs"][fx.pstr("results/my out ü.txt")], 11);
    assert_eq!(outcome["outputs"][fx.pstr("results/never-written")], Value::Null);
    // The outputs went to the store, not to the host paths.
    assert!(!fx.p("results/my out ü.txt").exists());
    // Undeclared paths are not part of the view: in a namespace they land in the merged view
    // and vanish with it; with rewritten paths they are written on the host, never harvested.
    let undeclared = fx.p("results/undeclared.tmp").exists();
    assert_eq!(undeclared, expect_view == "rewritten paths");
    let reg = fx.registry_json();
    assert_eq!(
        reg[fx.pstr("results/tree")]["in_snapshot_path"],
        fx.pstr("results/tree").trim_start_matches('/')
    );
    assert!(reg[fx.pstr("results/tree")]["produced_by"]["attempt"].is_u64());
    fx.assert_clean();

    // check_outputs answers from the coordinator's index.
    let sizes = fx.check_outputs(&[
        "results/my out ü.txt",
        "results/tree",
        "results/tree/sub/leaf.txt",
        "results/nope",
    ]);
    assert_eq!(sizes, vec!["11", "5", "5", "missing"]);

    // A second step reads the first one's outputs and one of the imported inputs again.
    let (outcome2, _) = fx.step_ok(
        r#"
command = '''
test "$(readlink {d}/results/tree/link)" = sub/leaf.txt
cat "{d}/results/my out ü.txt" {d}/results/tree/link {d}/data/a.txt | wc -l > {d}/results/count.txt
'''
inputs = ["{d}/results/my out ü.txt", "{d}/results/tree", "{d}/data/a.txt"]
outputs = ["{d}/results/count.txt"]
"#,
    );
    assert_eq!(outcome2["outputs"][fx.pstr("results/count.txt")], 2, "{outcome2}");
    assert_eq!(fx.check_outputs(&["results/count.txt"]), vec!["2"]);
    let imported = reg[fx.pstr("data/a.txt")]["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(fx.agents[0].count(&["snapshot fetched", &imported]), 1, "{}", fx.agents[0].dump());
    assert!(fx.agents[0].count(&["snapshot cache hit", &imported]) >= 1, "{}", fx.agents[0].dump());
    assert_eq!(fx.coord().proc.count(&["transfer done", "fetch", &imported]), 1);
    fx.assert_clean();
    let agent_reg: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.dir.path().join("agent-registry.json")).unwrap())
            .unwrap();
    assert!(
        agent_reg.get(fx.pstr("results/count.txt")).is_some(),
        "the agent keeps its registry: {agent_reg}"
    );
}

#[test]
fn snapshot_backend_with_overlayfs_and_mount_namespace() {
    if !can_mount("snapshot_backend_with_overlayfs_and_mount_namespace") {
        return;
    }
    snapshot_pipeline(&[("PYPE_OVERLAY_MODE", "snapshot")], "mount namespace");
}

#[test]
fn snapshot_backend_with_hardlinked_view_and_rewritten_paths() {
    snapshot_pipeline(
        &[
            ("PYPE_OVERLAY_MODE", "snapshot"),
            ("PYPE_OVERLAY_MOUNT", "never"),
            ("PYPE_MOUNT_NAMESPACE", "never"),
        ],
        "rewritten paths",
    );
}

#[test]
fn snapshot_backend_with_overlayfs_and_rewritten_paths() {
    if !can_mount("snapshot_backend_with_overlayfs_and_rewritten_paths") {
        return;
    }
    snapshot_pipeline(
        &[("PYPE_OVERLAY_MODE", "snapshot"), ("PYPE_MOUNT_NAMESPACE", "never")],
        "rewritten paths",
    );
}

#[test]
fn failed_timed_out_and_cancelled_steps_harvest_nothing_and_clean_up() {
    let fx = cluster(&[("PYPE_OVERLAY_MODE", "snapshot")]);
    std::fs::write(fx.p("data/a.txt"), "alpha\n").unwrap();
    fx.import(&["data/a.txt"]);
    let (ok, outcome, _) = fx.step(
        r#"
command = "cat {d}/data/a.txt > {d}/results/out.txt; exit 3"
inputs = ["{d}/data/a.txt"]
outputs = ["{d}/results/out.txt"]
"#,
    );
    assert!(!ok);
    assert_eq!(outcome["exit"], "Exited(3)");
    assert_eq!(keys(&outcome["new_entries"]), Vec::<String>::new());
    assert!(fx.registry_json().get(fx.pstr("results/out.txt")).is_none());
    fx.assert_clean();

    // A timeout kills the whole process group, background children included.
    let (ok, outcome, _) = fx.step(
        r#"
command = "sleep 300 & echo $! > {d}/bg.pid; echo partial > {d}/results/out.txt; wait"
inputs = ["{d}/data/a.txt"]
outputs = ["{d}/results/out.txt"]
timeout_secs = 1
"#,
    );
    assert!(!ok);
    assert_eq!(outcome["exit"], "TimedOut");
    assert_eq!(keys(&outcome["new_entries"]), Vec::<String>::new());
    let pid: i32 = std::fs::read_to_string(fx.p("bg.pid")).unwrap().trim().parse().unwrap();
    // Dead, or a zombie waiting for its new parent to reap it.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let alive = !state.is_empty() && state.rsplit(") ").next().is_some_and(|rest| !rest.starts_with('Z'));
    assert!(!alive, "background child {pid} survived the timeout: {state}");
    fx.assert_clean();

    // Cancel from the coordinator.
    let file = fx.dir.path().join("long.toml");
    std::fs::write(
        &file,
        format!(
            "command = \"echo started; sleep 300\"\ninputs = [\"{0}/data/a.txt\"]\noutputs = [\"{0}/results/x\"]\n",
            fx.dir.path().display()
        ),
    )
    .unwrap();
    let runner = fx
        .command()
        .args(["step", "run", "--agent", "a1", "--registry"])
        .arg(fx.registry())
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let line = fx.coord().proc.wait_for(&["step started", "view="], T);
    let _ = line;
    let dispatched = fx.coord().proc.wait_for_nth(&["step dispatched"], 3, T);
    let attempt = dispatched.split("attempt=").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    fx.agents[0].wait_for(&["running snippet", &format!("attempt={attempt}")], T);
    fx.cli_ok(&["step", "cancel", &attempt]);
    let out = runner.wait_with_output().unwrap();
    assert!(!out.status.success());
    let outcome: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome["exit"], "Cancelled");
    fx.assert_clean();
}

#[test]
fn killed_agent_leaves_mounts_and_scratch_that_the_next_start_removes() {
    if !can_mount("killed_agent_leaves_mounts_and_scratch_that_the_next_start_removes") {
        return;
    }
    let mut fx = cluster(&[("PYPE_OVERLAY_MODE", "snapshot")]);
    std::fs::write(fx.p("data/a.txt"), "alpha\n").unwrap();
    fx.import(&["data/a.txt"]);
    let file = fx.dir.path().join("long.toml");
    std::fs::write(
        &file,
        format!(
            "command = \"sleep 300 & echo $! > {0}/bg.pid; wait\"\ninputs = [\"{0}/data/a.txt\"]\noutputs = [\"{0}/results/x\"]\n",
            fx.dir.path().display()
        ),
    )
    .unwrap();
    let mut runner = fx
        .command()
        .args(["step", "run", "--agent", "a1", "--registry"])
        .arg(fx.registry())
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    fx.agents[0].wait_for(&["running snippet"], T);
    let deadline = std::time::Instant::now() + T;
    let pid = loop {
        match std::fs::read_to_string(fx.p("bg.pid")) {
            Ok(p) if p.ends_with('\n') => break p,
            _ if std::time::Instant::now() > deadline => {
                panic!("the snippet never wrote bg.pid\n{}", fx.agents[0].dump())
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    fx.agents[0].signal(Signal::KILL);
    fx.agents[0].wait_exit(T);
    assert_eq!(fx.mounts().len(), 1, "the killed agent's overlay is still mounted");
    assert_eq!(fx.step_dirs().len(), 1);
    assert!(Path::new(&format!("/proc/{}", pid.trim())).exists());
    fx.restart_agent(0).wait_for(&["connected to coordinator"], T);
    fx.agents[0].wait_for(&["killed a snippet an earlier agent left running"], T);
    fx.agents[0].wait_for(&["unmounted a leftover"], T);
    fx.assert_clean();
    let state = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    assert!(state.is_empty() || state.contains(") Z"), "the left-over snippet still runs: {state}");
    let _ = runner.kill();
    let _ = runner.wait();
}

#[test]
fn ten_thousand_file_output_directory() {
    let fx = cluster(&[("PYPE_OVERLAY_MODE", "snapshot")]);
    let (outcome, _) = fx.step_ok(
        r#"
command = '''
mkdir -p {d}/results/many
cd {d}/results/many
for d in $(seq 0 99); do mkdir d$d; for f in $(seq 0 99); do echo $d-$f > d$d/f$f; done; done
'''
outputs = ["{d}/results/many"]
"#,
    );
    let size = outcome["outputs"][fx.pstr("results/many")].as_u64().unwrap();
    assert!(size > 40_000, "{outcome}");
    let (outcome2, _) = fx.step_ok(
        r#"
command = "find {d}/results/many -type f | wc -l > {d}/results/n.txt; test $(cat {d}/results/n.txt) -eq 10000"
inputs = ["{d}/results/many"]
outputs = ["{d}/results/n.txt"]
"#,
    );
    assert_eq!(outcome2["outputs"][fx.pstr("results/n.txt")], 6);
    fx.assert_clean();
}

#[test]
fn profile_build_stages_a_program_and_steps_find_it_at_its_bind_path() {
    let fx = cluster(&[("PYPE_OVERLAY_MODE", "snapshot")]);
    let build = r#"
command = '''
if [ -e {d}/opt/tools/hello.sh ]; then echo "already there"; exit 0; fi
mkdir -p {d}/opt/tools
printf '#!/bin/sh\necho hello from the program\n' > {d}/opt/tools/hello.sh
chmod 755 {d}/opt/tools/hello.sh
'''
[build]
profile = "demo"
programs = [{ key = "hello", artifact_path = "{d}/opt/tools/hello.sh" }]
"#;
    let (outcome, _) = fx.step_ok(build);
    let entry = &outcome["new_entries"]["demo/programs/hello"];
    assert_eq!(entry["bind_path"], fx.pstr("opt/tools"), "{outcome}");
    assert_eq!(entry["in_snapshot_path"], fx.pstr("opt/tools/hello.sh"));
    // Building again finds the staged program in place and keeps it.
    let (again, err) = fx.step_ok(build);
    assert!(err.contains("already there"), "{err}");
    assert_eq!(keys(&again["new_entries"]), Vec::<String>::new(), "{again}");
    // A step naming the program runs it from its bind path.
    let (_, err) = fx.step_ok(
        r#"
command = "{d}/opt/tools/hello.sh"
program = { profile = "demo", key = "hello" }
"#,
    );
    assert!(err.contains("hello from the program"), "{err}");
    fx.assert_clean();
}

/// The overlay backend: scratch per output dir, copied back only on success, in place when
/// the output shares a directory with an input.
fn overlay_backend(env: &[(&str, &str)]) {
    let mut all = vec![("PYPE_OVERLAY_MODE", "overlay")];
    all.extend_from_slice(env);
    let fx = cluster(&all);
    std::fs::write(fx.p("data/in.txt"), "input\n").unwrap();
    std::fs::write(fx.p("results/existing.txt"), "keep me\n").unwrap();
    let (ok, _, _) = fx.step(
        r#"
command = "echo half > {d}/results/out.txt; exit 1"
outputs = ["{d}/results/out.txt"]
"#,
    );
    assert!(!ok);
    assert!(!fx.p("results/out.txt").exists(), "a failed step left an output in place");
    let (outcome, _) = fx.step_ok(
        r#"
command = '''
cat {d}/results/existing.txt > {d}/results/out.txt
echo undeclared > {d}/results/undeclared.txt
mkdir -p "{d}/results/dir ü" && echo x > "{d}/results/dir ü/f" && ln -s f "{d}/results/dir ü/l"
echo beside > {d}/data/beside.txt
'''
inputs = ["{d}/data/in.txt"]
outputs = ["{d}/results/out.txt", "{d}/results/dir ü", "{d}/data/beside.txt"]
"#,
    );
    assert_eq!(std::fs::read_to_string(fx.p("results/out.txt")).unwrap(), "keep me\n");
    // Undeclared files: in a namespace they stay in scratch; with rewritten paths they are
    // written in place on the host (bio-pype's behaviour), never through scratch.
    let in_namespace = !env.contains(&("PYPE_MOUNT_NAMESPACE", "never"));
    assert_eq!(fx.p("results/undeclared.txt").exists(), !in_namespace);
    assert_eq!(std::fs::read_link(fx.p("results/dir ü/l")).unwrap(), Path::new("f"));
    assert_eq!(std::fs::read_to_string(fx.p("data/beside.txt")).unwrap(), "beside\n");
    assert_eq!(outcome["outputs"][fx.pstr("results/out.txt")], 8);
    let leftovers: Vec<_> = std::fs::read_dir(fx.p("results"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("pype-tmp"))
        .collect();
    assert!(leftovers.is_empty());
    let scratch = fx.work_dir().join("scratch");
    let left: Vec<_> = std::fs::read_dir(&scratch).map(|r| r.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "scratch left behind: {left:?}");
}

#[test]
fn overlay_backend_with_rewritten_paths() {
    overlay_backend(&[("PYPE_MOUNT_NAMESPACE", "never")]);
}

#[test]
fn overlay_backend_in_a_mount_namespace() {
    if !can_mount("overlay_backend_in_a_mount_namespace") {
        return;
    }
    overlay_backend(&[]);
}

#[test]
fn direct_backend_runs_in_place_and_stats_outputs() {
    let fx = cluster(&[]);
    let (outcome, _) = fx.step_ok(
        r#"
command = "printf abc > {d}/results/x; printf '' > {d}/results/empty"
outputs = ["{d}/results/x", "{d}/results/empty", "{d}/results/missing"]
env = { GREETING = "hi" }
"#,
    );
    assert_eq!(outcome["backend"], "direct");
    assert_eq!(std::fs::read_to_string(fx.p("results/x")).unwrap(), "abc");
    assert_eq!(
        fx.check_outputs(&["results/x", "results/empty", "results/missing"]),
        vec!["3", "0", "missing"]
    );
}

#[test]
fn external_backend_over_json_lines() {
    let queues = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/backends");
    let queues = queues.canonicalize().unwrap().display().to_string();
    let fx = cluster(&[("PYPE_OVERLAY_MODE", "copydir"), ("PYPE_QUEUES", &queues)]);
    let (ok, _, _) = fx.step(
        r#"
command = "echo no > {d}/results/out.txt; false"
outputs = ["{d}/results/out.txt"]
"#,
    );
    assert!(!ok);
    assert!(!fx.p("results/out.txt").exists());
    let (outcome, _) = fx.step_ok(
        r#"
command = "echo via external > {d}/results/out.txt"
outputs = ["{d}/results/out.txt"]
"#,
    );
    assert_eq!(outcome["backend"], "copydir");
    assert_eq!(std::fs::read_to_string(fx.p("results/out.txt")).unwrap(), "via external\n");
    assert_eq!(outcome["outputs"][fx.pstr("results/out.txt")], 13);
    assert_eq!(fx.check_outputs(&["results/out.txt", "results/nope"]), vec!["13", "missing"]);
    fx.agents[0].wait_for(&["external backend started", "copydir"], T);
}

#[test]
fn unknown_mode_is_an_error_naming_the_valid_modes_and_where_it_looked() {
    let fx = cluster(&[("PYPE_OVERLAY_MODE", "nosuch"), ("PYPE_QUEUES", "/nonexistent/queues")]);
    let (ok, outcome, _) = fx.step(r#"command = "true""#);
    assert!(!ok);
    assert_eq!(outcome["exit"], "SetupFailed");
    let err = outcome["error"].as_str().unwrap();
    assert!(err.contains("unknown PYPE_OVERLAY_MODE \"nosuch\""), "{err}");
    assert!(err.contains("direct, overlay, snapshot"), "{err}");
    assert!(err.contains("pype-backend-nosuch"), "{err}");
    assert!(err.contains("/nonexistent/queues"), "{err}");
    // The agent is still there for the next step.
    std::thread::sleep(Duration::from_millis(1));
    assert!(fx.agents[0].count(&["step finished"]) >= 1);
}

/// Wire bytes of the `n`th (from 1) transfer in `direction` the coordinator logged.
fn transfer_wire_bytes(fx: &Cluster, direction: &str, n: usize) -> u64 {
    let needle = format!("direction=\"{direction}\"");
    let line = fx.coord().proc.wait_for_nth(&["transfer done", &needle], n, T);
    line.split("wire_bytes=").nth(1).and_then(|v| v.split_whitespace().next()).unwrap().parse().unwrap()
}

/// Issue 19, points 1 and 2 through the real agent: outputs that differ from stored ones in
/// one file of twenty move that file's blob and the manifest, not the tree; a fetch of that
/// second snapshot by an agent that holds the first moves the changed file only, and the view
/// holds the right bytes.
#[test]
fn a_re_harvest_and_a_fetch_move_only_what_the_other_side_lacks() {
    let fx = cluster(&[("PYPE_OVERLAY_MODE", "snapshot")]);
    let src = fx.p("data/src");
    std::fs::create_dir_all(&src).unwrap();
    let mut rng = tests::Rng(7);
    for i in 0..20 {
        let mut body = vec![0u8; 64 << 10];
        rng.fill(&mut body);
        std::fs::write(src.join(format!("f{i:02}")), body).unwrap();
    }
    let tree = 20u64 * (64 << 10);
    fx.step_ok(
        "command = \"cp -a {d}/data/src {d}/results/one\"\noutputs = [\"{d}/results/one\"]\n"
            .replace("{d}", &fx.d())
            .as_str(),
    );
    let first = transfer_wire_bytes(&fx, "store", 1);
    assert!(first >= tree, "the first harvest moved {first} bytes of a {tree}-byte tree");
    fx.step_ok(
        "command = \"cp -a {d}/data/src {d}/results/two && head -c 65536 /dev/urandom > {d}/results/two/f07\"\n\
         outputs = [\"{d}/results/two\"]\n"
            .replace("{d}", &fx.d())
            .as_str(),
    );
    let second = transfer_wire_bytes(&fx, "store", 2);
    assert!(second < tree / 10, "a re-harvest with one file of 20 changed moved {second} of {tree} bytes");

    fx.step_ok(
        "command = \"cat {d}/results/one/* > /dev/null\"\ninputs = [\"{d}/results/one\"]\n"
            .replace("{d}", &fx.d())
            .as_str(),
    );
    let fetched_one = transfer_wire_bytes(&fx, "fetch", 1);
    assert!(fetched_one >= tree, "{fetched_one}");
    fx.step_ok(
        "command = \"cmp {d}/results/two/f00 {d}/data/src/f00 && ! cmp -s {d}/results/two/f07 {d}/data/src/f07 && \
         test $(stat -c %s {d}/results/two/f07) = 65536\"\ninputs = [\"{d}/results/two\"]\n"
            .replace("{d}", &fx.d())
            .as_str(),
    );
    let fetched_two = transfer_wire_bytes(&fx, "fetch", 2);
    assert!(
        fetched_two < tree / 10,
        "a fetch of a snapshot whose other 19 files are cached moved {fetched_two}"
    );
    fx.agents[0].wait_for(&["snapshot fetched"], T);
    // The 19 files held under the first snapshot, same bytes, mode and mtime, are hard links
    // in the agent's cache, not copies; the changed one is a file of its own.
    let inodes = |name: &str| {
        use std::os::unix::fs::MetadataExt;
        let mut out = vec![];
        let mut stack = vec![fx.p("a1/cache")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let md = std::fs::symlink_metadata(e.path()).unwrap();
                if md.is_dir() {
                    stack.push(e.path());
                } else if e.file_name() == name {
                    out.push(md.ino());
                }
            }
        }
        out
    };
    let f00 = inodes("f00");
    assert!(f00.len() == 2 && f00[0] == f00[1], "f00 in the cache: inodes {f00:?}");
    let f07 = inodes("f07");
    assert!(f07.len() == 2 && f07[0] != f07[1], "f07 in the cache: inodes {f07:?}");
}
