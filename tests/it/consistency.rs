//! `plan` and `run` agree, and what cannot start leaves no trace, through the real binaries:
//! overlapping outputs are a located parse error, `plan` takes `run`'s backend and decides as
//! `run` does for direct, overlay and snapshot, and a run that cannot start (missing input,
//! bad config) records nothing and suggests no `--resume`.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use tests::Cluster;

/// What a command printed: success, stdout, stderr.
struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// This file's helpers on the shared fixture.
trait Consistency {
    /// [`Cluster::cli`] as an [`Out`].
    fn out(&self, args: &[&str]) -> Out;
    /// `run` with one local agent and no infrastructure retries, to its end.
    fn run_pipeline(&self, pipeline: &Path, extra: &[&str]) -> Out;
    /// `plan`'s table: step -> action.
    fn plan(&self, pipeline: &Path, extra: &[&str]) -> BTreeMap<String, String>;
    /// No run is recorded.
    fn no_runs(&self);
}

impl Consistency for Cluster {
    fn out(&self, args: &[&str]) -> Out {
        let (ok, stdout, stderr) = self.cli(args);
        Out { ok, stdout, stderr }
    }

    fn run_pipeline(&self, pipeline: &Path, extra: &[&str]) -> Out {
        let mut args = vec!["run", "--agents", "1", "--heartbeat-interval-ms", "200", "--infra-retries", "0"];
        args.extend_from_slice(extra);
        args.push(pipeline.to_str().unwrap());
        self.out(&args)
    }

    fn plan(&self, pipeline: &Path, extra: &[&str]) -> BTreeMap<String, String> {
        let mut args = vec!["plan"];
        args.extend_from_slice(extra);
        args.push(pipeline.to_str().unwrap());
        let out = self.out(&args);
        assert!(out.ok, "plan failed\n{}\n{}", out.stdout, out.stderr);
        out.stdout
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.to_string(), w.next()?.to_string()))
            })
            .collect()
    }

    fn no_runs(&self) {
        let out = self.out(&["status"]);
        assert!(out.ok && out.stdout.starts_with("no runs in"), "{}\n{}", out.stdout, out.stderr);
    }
}

/// What a run did with each step, from its log: run (dispatched), skip or prune.
fn decided(log: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in log.lines() {
        let action = if line.contains(" step dispatched ") {
            "run"
        } else if line.contains(" step skipped ") {
            "skip"
        } else if line.contains(" step pruned ") {
            "prune"
        } else {
            continue;
        };
        let Some(rest) = line.split(" step=\"").nth(1) else { continue };
        let step = rest.split('"').next().unwrap().to_string();
        out.entry(step).or_insert_with(|| action.to_string());
    }
    out
}

/// Point 3: an output inside another output (two steps, or one) is refused at parse time,
/// naming the file, line and column of the inner one; by `run` and by `plan`, before anything
/// is recorded.
#[test]
fn overlapping_outputs_are_a_located_pipeline_error() {
    let fx = Cluster::new();
    let two = fx.pipeline(
        "pipeline.toml",
        "name = \"nest\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\noutputs = [\"{d}/out\"]\n\
         [[steps]]\nname = \"b\"\ncommand = \"true\"\noutputs = [\"{d}/out/f.txt\"]\n",
    );
    let out = fx.run_pipeline(&two, &[]);
    assert!(!out.ok, "{}", out.stderr);
    let d = fx.d();
    let want = format!(
        "{}:9:12: output {d}/out/f.txt overlaps output {d}/out that step \"a\" declares",
        two.display()
    );
    assert!(out.stderr.contains(&want), "{want:?} not in\n{}", out.stderr);
    let plan = fx.out(&["plan", two.to_str().unwrap()]);
    assert!(!plan.ok && plan.stderr.contains(&want), "{}", plan.stderr);
    let one = fx.pipeline(
        "pipeline.toml",
        "name = \"nest\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\noutputs = [\"{d}/o/x/y\", \"{d}/o\"]\n",
    );
    let out = fx.run_pipeline(&one, &[]);
    let want = format!(
        "{}:5:{}: output {d}/o overlaps output {d}/o/x/y that step \"a\" also declares",
        one.display(),
        12 + d.len() + 8 + 2
    );
    assert!(!out.ok && out.stderr.contains(&want), "{want:?} not in\n{}", out.stderr);
    fx.no_runs();
}

/// Point 10: on the same state, `plan --backend B` and `run --backend B` decide the same for
/// every step: after a first run (all skip), and after one output goes away (its step and
/// what follows run, the rest skip).
fn plan_agrees_with_run(backend: &str) {
    let fx = Cluster::new();
    fs::create_dir_all(fx.p("out")).unwrap();
    let pipeline = fx.pipeline(
        "pipeline.toml",
        r#"
name = "agree"
[[steps]]
name = "first"
command = "echo one > {d}/out/a.txt"
outputs = ["{d}/out/a.txt"]
[[steps]]
name = "second"
command = "cat {d}/out/a.txt > {d}/out/b.txt; echo two >> {d}/out/b.txt"
inputs = ["{d}/out/a.txt"]
outputs = ["{d}/out/b.txt"]
[[steps]]
name = "third"
command = "cat {d}/out/b.txt > {d}/out/c.txt"
inputs = ["{d}/out/b.txt"]
outputs = ["{d}/out/c.txt"]
"#,
    );
    let b = ["--backend", backend];
    let before = fx.plan(&pipeline, &b);
    let first = fx.run_pipeline(&pipeline, &b);
    assert!(first.ok, "{backend}: first run failed\n{}", first.stderr);
    let all_run: BTreeMap<String, String> =
        ["first", "second", "third"].iter().map(|s| (s.to_string(), "run".to_string())).collect();
    assert_eq!(before, all_run, "{backend}: plan on an empty state");
    assert_eq!(decided(&first.stderr), all_run, "{backend}\n{}", first.stderr);
    assert_eq!(fs::read_to_string(fx.p("out/c.txt")).unwrap(), "one\ntwo\n");

    // Everything is there: both say skip.
    let plan = fx.plan(&pipeline, &b);
    let again = fx.run_pipeline(&pipeline, &b);
    assert!(again.ok, "{}", again.stderr);
    let all_skip: BTreeMap<String, String> =
        ["first", "second", "third"].iter().map(|s| (s.to_string(), "skip".to_string())).collect();
    assert_eq!(plan, all_skip, "{backend}: plan after a complete run");
    assert_eq!(decided(&again.stderr), plan, "{backend}: run and plan disagree\n{}", again.stderr);

    // The middle output goes, from where this backend looks for it: the step is pruned, as
    // what it feeds is there. Then the last output goes too: both run again.
    let expect = [("skip", "prune", "skip"), ("skip", "run", "run")];
    for (gone, (a, b2, c)) in ["b.txt", "c.txt"].into_iter().zip(expect) {
        if backend == "snapshot" {
            let out = fx.out(&["registry", "remove", &format!("{}/out/{gone}", fx.d())]);
            assert!(out.ok, "{}", out.stderr);
        } else {
            fs::remove_file(fx.p(&format!("out/{gone}"))).unwrap();
        }
        let plan = fx.plan(&pipeline, &b);
        let want: BTreeMap<String, String> = [("first", a), ("second", b2), ("third", c)]
            .iter()
            .map(|(s, x)| (s.to_string(), x.to_string()))
            .collect();
        assert_eq!(plan, want, "{backend}: plan without {gone}");
        let run = fx.run_pipeline(&pipeline, &b);
        assert!(run.ok, "{}", run.stderr);
        assert_eq!(decided(&run.stderr), plan, "{backend}: run and plan disagree\n{}", run.stderr);
    }
    assert_eq!(fs::read_to_string(fx.p("out/c.txt")).unwrap(), "one\ntwo\n");
}

#[test]
fn plan_agrees_with_run_direct() {
    plan_agrees_with_run("direct");
}

#[test]
fn plan_agrees_with_run_overlay() {
    if !tests::require_root("plan_agrees_with_run_overlay", "the overlay backend mounts overlayfs") {
        return;
    }
    plan_agrees_with_run("overlay");
}

#[test]
fn plan_agrees_with_run_snapshot() {
    plan_agrees_with_run("snapshot");
}

/// Point 11: a missing input is named with where it is declared; the run is not recorded and
/// no `--resume` is suggested.
#[test]
fn a_run_missing_an_input_is_not_recorded() {
    let fx = Cluster::new();
    let pipeline = fx.pipeline(
        "pipeline.toml",
        "name = \"lacking\"\n[[steps]]\nname = \"use\"\ncommand = \"cat {d}/in/nope.txt > {d}/out.txt\"\n\
         inputs = [\n  \"{d}/in/nope.txt\",\n]\noutputs = [\"{d}/out.txt\"]\n",
    );
    let out = fx.run_pipeline(&pipeline, &[]);
    assert!(!out.ok, "{}", out.stderr);
    let want = format!(
        "{}:6:3: input {}/in/nope.txt is neither in the registry nor on this host",
        pipeline.display(),
        fx.d()
    );
    assert!(out.stderr.contains(&want), "{want:?} not in\n{}", out.stderr);
    assert!(!out.stderr.contains("--resume"), "{}", out.stderr);
    assert!(!out.stderr.contains("step dispatched"), "{}", out.stderr);
    fx.no_runs();
    // With the input there, the same pipeline runs, and that run is recorded.
    fs::create_dir_all(fx.p("in")).unwrap();
    fs::write(fx.p("in/nope.txt"), "here now\n").unwrap();
    let out = fx.run_pipeline(&pipeline, &[]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(fs::read_to_string(fx.p("out.txt")).unwrap(), "here now\n");
    let status = fx.out(&["status"]);
    assert!(status.stdout.starts_with("run lacking-"), "{}", status.stdout);
}

/// Point 11: an unknown key in `[store]` is refused at its own line for every kind, before
/// anything starts or is recorded.
#[test]
fn unknown_store_keys_are_refused_at_their_line() {
    let fx = Cluster::new();
    fs::create_dir_all(fx.p("state")).unwrap();
    let pipeline =
        fx.pipeline(
"pipeline.toml",
"name = \"cfg\"\n[[steps]]\nname = \"a\"\ncommand = \"echo a > {d}/a.txt\"\noutputs = [\"{d}/a.txt\"]\n");
    let config = fx.p("state/coordinator.toml");
    for (kind, text, at) in [
        ("local", "[store]\nkind = \"local\"\n\n   bucket = \"b\"\n", ":4:4:"),
        ("local", "[store]\nprefix = \"p\"\n", ":2:1:"),
        ("s3", "[store]\nkind = \"s3\"\nbucket = \"b\"\npart_size = 8\n", ":4:1:"),
    ] {
        fs::write(&config, text).unwrap();
        let out = fx.run_pipeline(&pipeline, &[]);
        assert!(!out.ok, "{text}\n{}", out.stderr);
        let want = format!("{}{at} unknown key", config.display());
        assert!(out.stderr.contains(&want), "{kind}: {want:?} not in\n{}", out.stderr);
        assert!(out.stderr.contains(&format!("of kind \"{kind}\"")), "{}", out.stderr);
        assert!(!out.stderr.contains("--resume"), "{}", out.stderr);
        assert!(!fx.p("a.txt").exists());
        fx.no_runs();
    }
}
