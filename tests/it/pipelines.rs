//! Pipelines end to end: `pype-coordinator run` with its embedded coordinator and local agents
//! (real child processes, real QUIC, the snapshot backend), and runs submitted to `serve`.

use std::process::Command;
use std::time::Duration;

use tests::{Agent, Cluster, Proc, Signal, T, agent_of, dispatched, example_in, run_id, signal_pid};

const LONG: Duration = Duration::from_secs(90);

/// The shipped example, copied so its outputs land in a temp dir: runs, writes the summary,
/// then a second run skips everything.
#[test]
fn example_pipeline_runs_then_skips_everything() {
    let fx = Cluster::new();
    let pipeline = example_in(fx.dir.path());
    let (run, p) = fx.run_ok(&[pipeline.to_str().unwrap()]);
    let summary = std::fs::read_to_string(fx.p("out/summary.txt")).unwrap();
    assert!(summary.starts_with("sequences\t800\nbases\t"), "{summary}");
    assert_eq!(p.count(&["program built", "demo/programs/gc-count"]), 1, "{}", p.dump());
    for step in ["generate", "gc-1", "gc-2", "gc-3", "gc-4", "summary"] {
        assert_eq!(dispatched(&p, step), 1, "{step}\n{}", p.dump());
        assert_eq!(fx.state_of(&run, step).0, "succeeded");
    }
    // Provenance in the working registry.
    let entry = fx.cli_ok(&["registry", "get", fx.p("out/summary.txt").to_str().unwrap()]);
    assert!(
        entry.contains(&format!("\"run\": \"{run}\"")) && entry.contains("\"step\": \"summary\""),
        "{entry}"
    );
    // The step's output is kept under the state dir and printed by `logs`.
    let logs = fx.cli_ok(&["logs", &run, "generate"]);
    assert_eq!(logs, "", "generate prints nothing");
    // Second run: everything skipped, nothing dispatched, no program rebuilt.
    let (run2, p2) = fx.run_ok(&[pipeline.to_str().unwrap()]);
    assert_eq!(p2.count(&["step skipped"]), 6, "{}", p2.dump());
    assert_eq!(p2.count(&["step dispatched"]), 0);
    assert_eq!(p2.count(&["program build"]), 0);
    assert!(fx.steps(&run2).iter().all(|r| r.1 == "skipped"));
    // plan agrees without running anything.
    let plan = fx.cli_ok(&["plan", pipeline.to_str().unwrap()]);
    assert_eq!(plan.lines().filter(|l| l.contains(" skip ")).count(), 6, "{plan}");
}

/// a -> b -> c, where b also writes a report nobody consumes. Deleting the report's registry
/// entry re-runs exactly b and c; deleting b's intermediate output alone prunes b. The report
/// differs per run (a timestamp), so every re-run of b supersedes a snapshot for `gc` to remove.
#[test]
fn deleting_a_registry_entry_reruns_that_step_and_its_dependents() {
    let fx = Cluster::new();
    let pipeline = fx.pipeline(
        "p.toml",
        r#"
name = "chain"
data_root = "{d}/data"
[[steps]]
name = "a"
command = "mkdir -p {{data_root}} && echo a > {{data_root}}/a.txt"
outputs = ["a.txt"]
[[steps]]
name = "b"
command = "cat {{data_root}}/a.txt > {{data_root}}/b.txt && echo b >> {{data_root}}/b.txt && echo report $(date +%s%N) > {{data_root}}/b-report.txt"
inputs = ["a.txt"]
outputs = ["b.txt", "b-report.txt"]
[[steps]]
name = "c"
command = "cat {{data_root}}/b.txt > {{data_root}}/c.txt && echo c >> {{data_root}}/c.txt"
inputs = ["b.txt"]
outputs = ["c.txt"]
"#,
    );
    let pl = pipeline.to_str().unwrap();
    fx.run_ok(&[pl]);
    assert_eq!(std::fs::read_to_string(fx.p("data/c.txt")).unwrap(), "a\nb\nc\n");
    let report = fx.p("data/b-report.txt").display().to_string();
    fx.cli_ok(&["registry", "remove", &report]);
    let (run, p) = fx.run_ok(&[pl]);
    assert_eq!((dispatched(&p, "a"), dispatched(&p, "b"), dispatched(&p, "c")), (0, 1, 1), "{}", p.dump());
    assert_eq!(fx.state_of(&run, "a").0, "skipped");
    // The intermediate alone: b is pruned, nothing runs.
    let b = fx.p("data/b.txt").display().to_string();
    fx.cli_ok(&["registry", "remove", &b]);
    let plan = fx.cli_ok(&["plan", pl]);
    assert!(
        plan.lines().any(|l| l.starts_with("b ") && l.contains("prune") && l.contains("only needed by c")),
        "{plan}"
    );
    let (_, p) = fx.run_ok(&[pl]);
    assert_eq!(p.count(&["step dispatched"]), 0, "{}", p.dump());
    assert_eq!(p.count(&["step pruned", "step=\"b\""]), 1);
    // --force b re-runs b and c.
    let (_, p) = fx.run_ok(&[pl, "--force", "b"]);
    assert_eq!((dispatched(&p, "a"), dispatched(&p, "b"), dispatched(&p, "c")), (0, 1, 1), "{}", p.dump());
    // export / import round trip: an entry removed comes back from the exported file.
    let exported = fx.p("exported.json");
    fx.cli_ok(&["registry", "export", "--output", exported.to_str().unwrap()]);
    let c = fx.p("data/c.txt").display().to_string();
    fx.cli_ok(&["registry", "remove", &c]);
    assert!(!fx.cli(&["registry", "get", &c]).0);
    let out = fx.cli_ok(&["registry", "import", exported.to_str().unwrap()]);
    assert!(out.contains("(1 new or changed)"), "{out}");
    assert!(fx.cli_ok(&["registry", "get", &c]).contains("snap-"));
    // gc keeps every snapshot the registry references and removes the superseded ones.
    let out = fx.cli_ok(&["gc", "--min-age", "0"]);
    assert!(out.contains("snapshots") && !out.starts_with("0 snapshots"), "{out}");
    let (_, p) = fx.run_ok(&[pl]);
    assert_eq!(p.count(&["step skipped"]), 3, "everything still resolvable after gc\n{}", p.dump());
}

/// 20 independent steps over 4 agents run in parallel on all of them, then fan in.
#[test]
fn fan_out_of_20_steps_over_4_agents() {
    let fx = Cluster::new();
    let mut text = String::from("name = \"fan\"\ndata_root = \"{d}/data\"\n");
    let mut inputs = Vec::new();
    for i in 0..20 {
        text += &format!(
            "[[steps]]\nname = \"part-{i}\"\ncommand = \"mkdir -p {{{{data_root}}}}/parts && sleep 0.3 && echo {i} > {{{{data_root}}}}/parts/{i}.txt\"\noutputs = [\"parts/{i}.txt\"]\n"
        );
        inputs.push(format!("\"parts/{i}.txt\""));
    }
    text += &format!(
        "[[steps]]\nname = \"join\"\ncommand = \"cat {} > {{{{data_root}}}}/all.txt\"\ninputs = [{}]\noutputs = [\"all.txt\"]\n",
        (0..20).map(|i| format!("{{{{data_root}}}}/parts/{i}.txt")).collect::<Vec<_>>().join(" "),
        inputs.join(", ")
    );
    let pipeline = fx.pipeline("fan.toml", &text);
    let (run, p) = fx.run_ok(&[pipeline.to_str().unwrap(), "--agents", "4"]);
    let all = std::fs::read_to_string(fx.p("data/all.txt")).unwrap();
    assert_eq!(all, (0..20).map(|i| format!("{i}\n")).collect::<String>());
    let rows = fx.steps(&run);
    let agents: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.3.as_str()).collect();
    assert_eq!(agents.len(), 4, "parts ran on {agents:?}\n{}", p.dump());
    // Parallel: 20 x 0.3 s of sleep finished far sooner than in sequence.
    let finished: Vec<&(String, String, u32, String)> = rows.iter().filter(|r| r.1 == "succeeded").collect();
    assert_eq!(finished.len(), 21);
    let started_before_first_exit = {
        let lines = p.dump();
        let first_exit = lines.find("step exited").unwrap();
        lines[..first_exit].matches("step dispatched").count()
    };
    assert!(started_before_first_exit >= 4, "only {started_before_first_exit} steps in flight at once");
}

/// A failing step fails the run after its retries, prints its last log lines, cancels its
/// dependents, and leaves nothing of it in the registry.
#[test]
fn failing_step_fails_the_run_with_its_log_tail() {
    let fx = Cluster::new();
    let pipeline = fx.pipeline(
        "p.toml",
        r#"
name = "boom"
data_root = "{d}/data"
[[steps]]
name = "ok"
command = "mkdir -p {{data_root}} && echo fine > {{data_root}}/ok.txt"
outputs = ["ok.txt"]
[[steps]]
name = "bad"
retries = 1
command = "mkdir -p {{data_root}}; echo half > {{data_root}}/bad.txt; for i in 1 2 3; do echo line-$i; done; echo 'the-last-words' >&2; exit 3"
outputs = ["bad.txt"]
[[steps]]
name = "after-bad"
command = "cat {{data_root}}/bad.txt > {{data_root}}/x.txt"
inputs = ["bad.txt"]
outputs = ["x.txt"]
"#,
    );
    let (ok, run, p) = fx.run(&[pipeline.to_str().unwrap()]);
    assert!(!ok, "the run should fail\n{}", p.dump());
    assert_eq!(dispatched(&p, "bad"), 2, "one retry\n{}", p.dump());
    assert_eq!(p.count(&["step retried", "step=\"bad\"", "command failure"]), 1);
    p.wait_for(&["log tail", "step=\"bad\""], Duration::from_secs(1));
    p.wait_for(&["the-last-words"], Duration::from_secs(1));
    p.wait_for(&["step cancelled", "step=\"after-bad\""], Duration::from_secs(1));
    p.wait_for(&["did not succeed", "step bad failed: exit 3"], Duration::from_secs(1));
    let reg = fx.cli_ok(&["registry", "export"]);
    assert!(reg.contains("ok.txt") && !reg.contains("bad.txt") && !reg.contains("x.txt"), "{reg}");
    assert_eq!(fx.state_of(&run, "bad").0, "failed");
    assert_eq!(fx.state_of(&run, "after-bad").0, "cancelled");
    let logs = fx.cli_ok(&["logs", &run, "bad"]);
    assert!(logs.contains("line-3") && logs.contains("the-last-words"), "{logs}");
}

/// An agent killed with SIGKILL mid-step: the step is retried on another agent and the run
/// succeeds.
#[test]
fn agent_killed_mid_step_is_retried_elsewhere() {
    let fx = Cluster::new();
    let pipeline = fx.pipeline(
        "p.toml",
        r#"
name = "kill"
data_root = "{d}/data"
[[steps]]
name = "slow"
command = "mkdir -p {{data_root}} && sleep 3 && echo done > {{data_root}}/slow.txt"
outputs = ["slow.txt"]
"#,
    );
    let mut p = fx.start_run(&[pipeline.to_str().unwrap(), "--agents", "2"]);
    let line = p.wait_for(&["step started", "step=\"slow\""], LONG);
    let agent = sigkill_agent_of(&fx, &line);
    p.wait_for(&["agent lost", &format!("agent=\"{agent}\"")], LONG);
    p.wait_for(&["step retried", "infrastructure failure"], LONG);
    let status = p.wait_exit(LONG);
    assert!(status.success(), "{}", p.dump());
    let run = run_id(&p.wait_for(&["run started"], Duration::from_secs(1)));
    let (state, attempts, on) = fx.state_of(&run, "slow");
    assert_eq!((state.as_str(), attempts), ("succeeded", 2));
    assert_ne!(on, agent, "retried on the other agent");
    assert_eq!(std::fs::read_to_string(fx.p("data/slow.txt")).unwrap(), "done\n");
}

/// The agent building a program is SIGKILLed: the build is tried again on the other agent,
/// and the step that uses the program runs.
#[test]
fn agent_killed_mid_build_builds_on_another() {
    let fx = Cluster::new();
    std::fs::write(
        fx.p("profile.toml"),
        r#"
name = "t"
[[programs]]
key = "hello"
kind = "file"
artifact_path = "/opt/pype-t/bin/hello"
build = """
sleep 3
mkdir -p /opt/pype-t/bin
printf '#!/bin/sh\\necho hello from the build\\n' > /opt/pype-t/bin/hello
chmod 755 /opt/pype-t/bin/hello
"""
"#,
    )
    .unwrap();
    let pipeline = fx.pipeline(
        "p.toml",
        r#"
name = "killbuild"
data_root = "{d}/data"
profile = "profile.toml"
[[steps]]
name = "use"
program = "hello"
command = "mkdir -p {{data_root}} && /opt/pype-t/bin/hello > {{data_root}}/use.txt"
outputs = ["use.txt"]
"#,
    );
    let mut p = fx.start_run(&[pipeline.to_str().unwrap(), "--agents", "2"]);
    let line = p.wait_for(&["program build", "t/programs/hello"], LONG);
    let agent = sigkill_agent_of(&fx, &line);
    p.wait_for(&["program build lost", &format!("agent=\"{agent}\"")], LONG);
    let status = p.wait_exit(LONG);
    assert!(status.success(), "{}", p.dump());
    let again = p.wait_for(&["program built", "t/programs/hello"], Duration::from_secs(1));
    assert!(!again.contains(&format!("agent=\"{agent}\"")), "built on the killed agent: {again}");
    assert_eq!(std::fs::read_to_string(fx.p("data/use.txt")).unwrap(), "hello from the build\n");
}

/// SIGKILLs the local agent a log line names (`agent="local-N"`); returns its id.
fn sigkill_agent_of(fx: &Cluster, line: &str) -> String {
    let agent =
        line.split("agent=").nth(1).unwrap().split_whitespace().next().unwrap().trim_matches('"').to_string();
    let n = agent.trim_start_matches("local-");
    let marker = fx.state().join(format!("local-agents/agent-{n}")).display().to_string();
    let pid = agent_pid(&marker).unwrap_or_else(|| panic!("no process for {marker}"));
    signal_pid(pid, Signal::KILL);
    agent
}

/// The pid of the local agent whose command line mentions `marker` (its state dir).
fn agent_pid(marker: &str) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()? {
        let entry = entry.ok()?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("__agent") && cmdline.contains(marker) {
            return Some(pid);
        }
    }
    None
}

/// A host that freezes (a paused VM; here SIGSTOP) stops a coordinator and its local agent
/// together for ten heartbeat intervals. When both run again, each finds its silence deadline
/// long past while the other's frames wait unread: neither blames the other for its own
/// stall. The running step finishes on its first attempt; no agent is lost, nothing retried.
#[test]
fn a_frozen_host_loses_no_agent_and_runs_nothing_twice() {
    let fx = Cluster::new();
    let pipeline = fx.pipeline(
        "p.toml",
        r#"
name = "frozen"
[[steps]]
name = "waits"
command = "sleep 3; echo once >> {d}/ran"
"#,
    );
    let mut p = fx.start_run(&[pipeline.to_str().unwrap(), "--agents", "1"]);
    p.wait_for(&["step started", "step=\"waits\""], LONG);
    let marker = fx.state().join("local-agents/agent-1").display().to_string();
    let agent = agent_pid(&marker).unwrap_or_else(|| panic!("no process for {marker}"));
    p.signal(Signal::STOP);
    signal_pid(agent, Signal::STOP);
    // The freeze is time passing: nothing else to wait for.
    std::thread::sleep(Duration::from_millis(10 * tests::HEARTBEAT_MS));
    signal_pid(agent, Signal::CONT);
    p.signal(Signal::CONT);
    let status = p.wait_exit(LONG);
    assert!(status.success(), "{}", p.dump());
    assert_eq!(p.count(&["agent lost"]), 0, "{}", p.dump());
    assert_eq!(p.count(&["step retried"]), 0, "{}", p.dump());
    assert_eq!(p.count(&["step dispatched"]), 1, "{}", p.dump());
    assert_eq!(std::fs::read_to_string(fx.p("ran")).unwrap(), "once\n");
    let log = std::fs::read_to_string(fx.state().join("local-agents/agent-1/agent.log")).unwrap();
    assert!(!log.contains("lost coordinator"), "{log}");
}

/// A coordinator killed with SIGKILL mid-run: `run --resume` finishes the run without
/// running completed steps again.
#[test]
fn killed_coordinator_resumes_the_run() {
    let fx = Cluster::new();
    let pipeline = fx.pipeline(
        "p.toml",
        r#"
name = "resume"
data_root = "{d}/data"
[[steps]]
name = "first"
command = "mkdir -p {{data_root}} && echo 1 > {{data_root}}/1.txt"
outputs = ["1.txt"]
[[steps]]
name = "second"
command = "sleep 2 && cat {{data_root}}/1.txt > {{data_root}}/2.txt && echo 2 >> {{data_root}}/2.txt"
inputs = ["1.txt"]
outputs = ["2.txt"]
[[steps]]
name = "third"
command = "cat {{data_root}}/2.txt > {{data_root}}/3.txt && echo 3 >> {{data_root}}/3.txt"
inputs = ["2.txt"]
outputs = ["3.txt"]
"#,
    );
    let mut p = fx.start_run(&[pipeline.to_str().unwrap()]);
    p.wait_for(&["step started", "step=\"second\""], LONG);
    let run = run_id(&p.wait_for(&["run started"], Duration::from_secs(1)));
    p.signal(Signal::KILL);
    p.wait_exit(LONG);
    assert_eq!(fx.state_of(&run, "first").0, "succeeded");
    assert_eq!(fx.state_of(&run, "second").0, "running", "the database saw it running");
    let mut again = fx.start_run(&["--resume", &run]);
    let status = again.wait_exit(LONG);
    assert!(status.success(), "{}", again.dump());
    assert_eq!(dispatched(&again, "first"), 0, "{}", again.dump());
    assert_eq!(dispatched(&again, "second"), 1);
    assert_eq!(dispatched(&again, "third"), 1);
    let (state, attempts, _) = fx.state_of(&run, "second");
    assert_eq!((state.as_str(), attempts), ("succeeded", 2));
    assert_eq!(fx.state_of(&run, "first").1, 1, "first ran once");
    assert_eq!(std::fs::read_to_string(fx.p("data/3.txt")).unwrap(), "1\n2\n3\n");
    let (ok, _, err) = fx.cli(&["run", "--resume", &run]);
    assert!(!ok && err.contains("already succeeded"), "{err}");
}

/// Broken pipeline files are refused with file:line:column, before anything starts.
#[test]
fn malformed_pipelines_give_located_errors() {
    let fx = Cluster::new();
    let cases = [
        ("syntax.toml", "name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\n", ":4:"),
        (
            "unknown.toml",
            "name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\nouptuts = [\"/o\"]\n",
            ":5:1: unknown field `ouptuts`",
        ),
        ("missing.toml", "name = \"x\"\n[[steps]]\nname = \"a\"\n", "missing field `command`"),
        (
            "cycle.toml",
            "name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\nafter = [\"b\"]\n[[steps]]\nname = \"b\"\ncommand = \"true\"\nafter = [\"a\"]\n",
            "dependency cycle:",
        ),
        (
            "twice.toml",
            "name = \"x\"\n[[steps]]\nname = \"a\"\ncommand = \"true\"\noutputs = [\"/o\"]\n[[steps]]\nname = \"b\"\ncommand = \"true\"\noutputs = [\"/o\"]\n",
            ":9:12: /o is produced by two steps",
        ),
    ];
    for (file, text, want) in cases {
        let path = fx.pipeline(file, text);
        let (ok, _, err) = fx.cli(&["run", path.to_str().unwrap()]);
        assert!(!ok, "{file} accepted");
        assert!(err.contains(&format!("{}:", path.display())) && err.contains(want), "{file}: {err}");
        let (ok, _, err) = fx.cli(&["plan", path.to_str().unwrap()]);
        assert!(!ok && err.contains(want), "plan {file}: {err}");
    }
    assert!(!fx.state().join("local-agents").exists(), "no agent was started for a broken file");
}

/// `run --coordinator ADDR` submits to a running `serve` whose agents were started apart.
#[test]
fn run_submitted_to_a_running_coordinator() {
    let fx = Cluster::new().serve();
    let token = fx.token(&["--uses", "2"]);
    let agent = |dir: &str, name: &str| {
        let reg = fx.pstr(&format!("{dir}/registry.json"));
        let agent = Agent::named(name).dir(fx.p(dir)).token(&token);
        fx.spawn_agent(agent.env("PYPE_OVERLAY_MODE", "snapshot").env("PYPE_SNAPSHOT_REGISTRY", &reg))
    };
    let _agents = [agent("a1", "r1"), agent("a2", "r2")];
    let coord = fx.coord();
    coord.proc.wait_for_nth(&["agent joined"], 2, LONG);
    std::fs::create_dir_all(fx.p("in")).unwrap();
    std::fs::write(fx.p("in/words.txt"), "b\na\nc\n").unwrap();
    let pipeline = fx.pipeline(
        "p.toml",
        r#"
name = "remote"
data_root = "{d}"
[[steps]]
name = "sort"
command = "mkdir -p {{data_root}}/out && sort {{data_root}}/in/words.txt > {{data_root}}/out/sorted.txt"
inputs = ["in/words.txt"]
outputs = ["out/sorted.txt"]
"#,
    );
    let addr = coord.addr.to_string();
    let (ok, out, err) = fx.cli(&["run", "--coordinator", &addr, pipeline.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}\n{}", coord.proc.dump());
    assert!(out.contains("succeeded"), "{out}");
    assert!(err.contains("step dispatched") && err.contains("inputs imported"), "{err}");
    coord.proc.wait_for(&["run finished", "succeeded"], LONG);
    let reg = fx.cli_ok(&["registry", "export"]);
    let sorted = fx.p("out/sorted.txt").display().to_string();
    assert!(reg.contains(&sorted) && reg.contains(&fx.p("in/words.txt").display().to_string()), "{reg}");
}

/// `logs RUN STEP --follow` prints a running step's output as it comes and returns when the
/// step ends.
#[test]
fn logs_follow_a_running_step() {
    let fx = Cluster::new();
    let pipeline = fx.pipeline(
        "p.toml",
        r#"
name = "ticks"
[[steps]]
name = "tick"
command = "for i in 1 2 3 4; do echo tick-$i; sleep 0.4; done"
"#,
    );
    let mut run = fx.start_run(&[pipeline.to_str().unwrap()]);
    run.wait_for(&["step started", "step=\"tick\""], LONG);
    let id = run_id(&run.wait_for(&["run started"], Duration::from_secs(1)));
    let out = Command::new(&fx.bins.coordinator)
        .arg("--state-dir")
        .arg(fx.state())
        .args(["logs", &id, "tick", "--follow"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text, "tick-1\ntick-2\ntick-3\ntick-4\n");
    assert!(run.wait_exit(LONG).success(), "{}", run.dump());
}

/// Ctrl-C during a run cancels the running snippet on its agent and leaves the run
/// interrupted, to be resumed.
#[test]
fn interrupt_cancels_running_steps() {
    let fx = Cluster::new();
    let pipeline = fx.pipeline(
        "p.toml",
        r#"
name = "int"
[[steps]]
name = "long"
command = "sleep 300"
"#,
    );
    let mut p = fx.start_run(&[pipeline.to_str().unwrap()]);
    p.wait_for(&["step started", "step=\"long\""], LONG);
    let run = run_id(&p.wait_for(&["run started"], Duration::from_secs(1)));
    p.signal(Signal::INT);
    let status = p.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    p.wait_for(&["run finished", "interrupted"], Duration::from_secs(1));
    let agents = fx.state().join("local-agents");
    let cancelled = std::fs::read_dir(&agents).unwrap().flatten().any(|d| {
        std::fs::read_to_string(d.path().join("agent.log")).unwrap_or_default().contains("exit=Cancelled")
    });
    assert!(cancelled, "no agent cancelled the snippet\n{}", p.dump());
    let out = fx.cli_ok(&["status", &run]);
    assert!(out.contains("interrupted"), "{out}");
}

/// Two agents serve a coordinator; SIGTERM to the one running a step drains it: the step
/// finishes there (once), the next step goes to the other agent, and the drained agent says
/// going-away and exits 0. `agent drain` does the same from the operator's side.
#[test]
fn sigterm_drains_an_agent_and_agent_drain_asks_for_it() {
    let fx = Cluster::new().serve();
    let token = fx.token(&["--uses", "2"]);
    let agent = |dir: &str, name: &str| {
        let reg = fx.pstr(&format!("{dir}/registry.json"));
        let agent = Agent::named(name).dir(fx.p(dir)).token(&token);
        fx.spawn_agent(agent.env("PYPE_OVERLAY_MODE", "snapshot").env("PYPE_SNAPSHOT_REGISTRY", &reg))
    };
    let mut agents = [agent("a1", "d1"), agent("a2", "d2")];
    let coord = fx.coord();
    coord.proc.wait_for_nth(&["agent joined"], 2, LONG);
    let pipeline = fx.pipeline(
        "p.toml",
        r#"
name = "drain"
data_root = "{d}/data"
[[steps]]
name = "slow"
command = "mkdir -p {{data_root}} && echo run >> {d}/slow.count && sleep 3 && echo done > {{data_root}}/slow.txt"
outputs = ["slow.txt"]
[[steps]]
name = "next"
command = "echo run >> {d}/next.count && cat {{data_root}}/slow.txt > {{data_root}}/next.txt"
inputs = ["slow.txt"]
outputs = ["next.txt"]
"#,
    );
    let mut cmd = fx.command();
    cmd.args(["run", "--coordinator", &coord.addr.to_string()]);
    cmd.arg(&pipeline);
    let mut client = Proc::spawn("run client", cmd);
    let started = coord.proc.wait_for(&["step started", "step=\"slow\""], LONG);
    let busy = agent_of(&started);
    let (bi, other) = if busy == "d1" { (0, "d2") } else { (1, "d1") };
    agents[bi].signal(Signal::TERM);
    agents[bi].wait_for(&["draining: running steps finish"], T);
    coord.proc.wait_for(&["agent draining", &format!("agent=\"{busy}\"")], T);
    let next = coord.proc.wait_for(&["step started", "step=\"next\""], LONG);
    assert_eq!(agent_of(&next), other, "the draining agent took a new step\n{}", coord.proc.dump());
    let status = agents[bi].wait_exit(LONG);
    assert!(status.success(), "drained agent exited with {status}\n{}", agents[bi].dump());
    agents[bi].wait_for(&["drained: every step finished"], T);
    coord.proc.wait_for(&["agent left", "going away: agent drained", &format!("agent={busy} peer")], T);
    assert!(client.wait_exit(LONG).success(), "{}", client.dump());
    assert_eq!(std::fs::read_to_string(fx.p("slow.count")).unwrap(), "run\n", "slow ran more than once");
    assert_eq!(std::fs::read_to_string(fx.p("next.count")).unwrap(), "run\n");
    let reg = fx.cli_ok(&["registry", "export"]);
    assert!(reg.contains(&fx.p("data/next.txt").display().to_string()), "{reg}");
    assert_eq!(agents[bi].count(&["exit=Cancelled"]), 0, "{}", agents[bi].dump());

    // The operator drains the other (idle) agent: it leaves at once and exits 0.
    let out = fx.cli_ok(&["agent", "drain", other]);
    assert!(out.contains(&format!("draining {other}")), "{out}");
    let oi = 1 - bi;
    assert!(agents[oi].wait_exit(T).success(), "{}", agents[oi].dump());
    agents[oi].wait_for(&["the coordinator asks this agent to drain"], T);
    // An agent not connected is an error naming it.
    let (ok, _, err) = fx.cli(&["agent", "drain", other]);
    assert!(!ok && err.contains(&format!("agent {other} is not connected")), "{err}");
}

/// A second SIGTERM during a drain cancels the running step (reported, so the coordinator
/// retries it) and the agent exits.
#[test]
fn second_sigterm_stops_a_draining_agent() {
    let mut fx = Cluster::new().serve().agent(Agent::named("d").env("PYPE_OVERLAY_MODE", "direct"));
    let coord = fx.coord();
    coord.proc.wait_for(&["agent joined"], LONG);
    let pipeline =
        fx.pipeline("p.toml", "name = \"long\"\n[[steps]]\nname = \"long\"\ncommand = \"sleep 300\"\n");
    let mut cmd = fx.command();
    cmd.args(["run", "--coordinator", &coord.addr.to_string()]);
    cmd.arg(&pipeline);
    let _client = Proc::spawn("run client", cmd);
    coord.proc.wait_for(&["step started", "step=\"long\""], LONG);
    let agent = &mut fx.agents[0];
    agent.signal(Signal::TERM);
    agent.wait_for(&["draining: running steps finish"], T);
    agent.signal(Signal::TERM);
    assert!(agent.wait_exit(T).success(), "{}", agent.dump());
    agent.wait_for(&["exit=Cancelled"], T);
    fx.coord().proc.wait_for(&["agent left", "going away: agent shutting down"], T);
}

/// Every attempt is in the attempts table before it is sent: while the state database refuses
/// new attempts (a trigger fails every insert), no step is dispatched, the run fails naming the
/// state database, and the agent never runs the command. Without the trigger it runs.
#[test]
fn an_attempt_the_state_database_cannot_record_is_never_sent() {
    let fx = Cluster::new();
    // Any command that opens the state database creates it.
    fx.cli_ok(&["token", "create"]);
    let db = fx.state().join("state.db");
    assert!(db.exists(), "no state database at {}", db.display());
    let sql = |stmt: &str| {
        let out = Command::new("python3")
            .args([
                "-c",
                "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()",
            ])
            .arg(&db)
            .arg(stmt)
            .output()
            .expect("python3");
        assert!(out.status.success(), "{stmt}: {}", String::from_utf8_lossy(&out.stderr));
    };
    sql(
        "CREATE TRIGGER refuse_attempts BEFORE INSERT ON attempts BEGIN SELECT RAISE(FAIL, 'injected: disk full'); END",
    );
    let pipeline = fx.pipeline(
        "p.toml",
        r#"
name = "record"
data_root = "{d}/data"
[[steps]]
name = "a"
command = "touch {d}/ran && mkdir -p {{data_root}} && echo a > {{data_root}}/a.txt"
outputs = ["a.txt"]
"#,
    );
    let pl = pipeline.to_str().unwrap();
    let (ok, _, p) = fx.run(&[pl]);
    assert!(!ok, "{}", p.dump());
    assert_eq!(p.count(&["step dispatched"]), 0, "{}", p.dump());
    assert!(
        p.count(&["could not record the attempt", "injected: disk full", "not dispatched"]) >= 1,
        "{}",
        p.dump()
    );
    assert!(p.count(&["step failed", "could not record the attempt"]) == 1, "{}", p.dump());
    assert!(!fx.p("ran").exists(), "the command ran although its attempt was never recorded");
    sql("DROP TRIGGER refuse_attempts");
    let (_, p) = fx.run_ok(&[pl]);
    assert_eq!(dispatched(&p, "a"), 1, "{}", p.dump());
    assert!(fx.p("ran").exists());
}

/// A pipeline of three quick steps in a row, then `long` and `second` side by side: on one
/// agent of one slot, `second` is sent to wait behind `long`.
fn quick_then_two(name: &str, long: &str, second: &str) -> String {
    let mut text = format!("name = \"{name}\"\n");
    for (i, after) in [(1, ""), (2, "q1"), (3, "q2")] {
        text += &format!("[[steps]]\nname = \"q{i}\"\ncommand = \"true\"\n");
        if !after.is_empty() {
            text += &format!("after = [\"{after}\"]\n");
        }
    }
    for (step, command) in [("long", long), ("second", second)] {
        text += &format!("[[steps]]\nname = \"{step}\"\ncommand = \"{command}\"\nafter = [\"q3\"]\n");
    }
    text
}

/// An agent of quick steps is sent one step beyond its single slot: that step waits on the
/// agent (it never runs beside the other), starts when the slot frees, and a cancel while it
/// waits ends it without its command ever running.
#[test]
fn a_step_queued_behind_a_busy_slot_waits_its_turn_or_is_cancelled_unstarted() {
    let fx = Cluster::new();
    let pipeline = fx.pipeline(
        "p.toml",
        &quick_then_two(
            "queued",
            "touch {d}/long.started; sleep 3; touch {d}/long.done",
            "test -e {d}/long.done && touch {d}/second.ran",
        ),
    );
    // Three quick steps, then two at once on the one agent: `second` waits for `long`.
    let (run, p) = fx.run_ok(&[pipeline.to_str().unwrap(), "--agents", "1"]);
    assert!(fx.p("second.ran").exists(), "second ran beside long, or not at all:\n{}", p.dump());
    let lines = p.dump();
    let at = |needle: &[&str]| lines.lines().position(|l| needle.iter().all(|n| l.contains(n)));
    let sent = at(&["step dispatched", "step=\"second\""]).unwrap();
    let long_ended = at(&["step exited", "step=\"long\""]).unwrap();
    assert!(sent < long_ended, "second was not sent until long ended (nothing queued):\n{lines}");
    assert_eq!(fx.state_of(&run, "second").0, "succeeded");

    // The same, with the queued step cancelled before its turn.
    std::fs::remove_file(fx.p("long.done")).unwrap();
    std::fs::remove_file(fx.p("second.ran")).unwrap();
    let pipeline = fx.pipeline(
        "c.toml",
        &std::fs::read_to_string(fx.p("p.toml"))
            .unwrap()
            .replace("name = \"queued\"", "name = \"cancelled\""),
    );
    let mut p = fx.start_run(&[pipeline.to_str().unwrap(), "--agents", "1"]);
    p.wait_for(&["step dispatched", "step=\"second\""], LONG);
    p.wait_for(&["step started", "step=\"long\""], LONG);
    let run = run_id(&p.wait_for(&["run started"], Duration::from_secs(1)));
    fx.cli_ok(&["cancel", &run, "second"]);
    let status = p.wait_exit(LONG);
    assert!(!status.success(), "a run with a cancelled step succeeded:\n{}", p.dump());
    assert!(fx.p("long.done").exists(), "long did not finish:\n{}", p.dump());
    assert!(!fx.p("second.ran").exists(), "second ran:\n{}", p.dump());
    assert_eq!(fx.state_of(&run, "second").0, "cancelled");
    assert_eq!(fx.state_of(&run, "long").0, "succeeded");
    let log = std::fs::read_to_string(fx.state().join("local-agents/agent-1/agent.log")).unwrap();
    let second: Vec<&str> =
        log.lines().filter(|l| l.contains(&format!("run={run}")) && l.contains("step=second")).collect();
    assert!(second.iter().any(|l| l.contains("cancelled while queued for a slot")), "{log}");
    assert!(!second.iter().any(|l| l.contains("running snippet")), "{log}");
}

/// SIGTERM drains an agent holding a step queued behind its one busy slot: the queued step is
/// refused before it starts (it goes to another agent), the running one finishes there.
#[test]
fn a_draining_agent_refuses_the_step_it_held_queued() {
    let fx = Cluster::new().serve();
    let token = fx.token(&["--uses", "2"]);
    let agent = |dir: &str, name: &str| {
        let reg = fx.pstr(&format!("{dir}/registry.json"));
        let agent = Agent::named(name).dir(fx.p(dir)).token(&token);
        fx.spawn_agent(agent.env("PYPE_OVERLAY_MODE", "snapshot").env("PYPE_SNAPSHOT_REGISTRY", &reg))
    };
    let mut first = agent("a1", "d1");
    let coord = fx.coord();
    coord.proc.wait_for(&["agent joined"], LONG);
    let pipeline = fx.pipeline(
        "p.toml",
        &quick_then_two(
            "drain-queued",
            "sleep 3; echo run >> {d}/long.count",
            "echo run >> {d}/second.count",
        ),
    );
    let mut cmd = fx.command();
    cmd.args(["run", "--coordinator", &coord.addr.to_string()]);
    cmd.arg(&pipeline);
    let mut client = Proc::spawn("run client", cmd);
    coord.proc.wait_for(&["step dispatched", "step=\"second\""], LONG);
    coord.proc.wait_for(&["step started", "step=\"long\""], LONG);
    first.signal(Signal::TERM);
    first.wait_for(&["agent is draining: step refused before it started"], T);
    let mut other = agent("a2", "d2");
    let ran = coord.proc.wait_for(&["step started", "step=\"second\""], LONG);
    assert_eq!(agent_of(&ran), "d2", "{}", coord.proc.dump());
    assert!(first.wait_exit(LONG).success(), "{}", first.dump());
    assert!(client.wait_exit(LONG).success(), "{}", client.dump());
    assert_eq!(std::fs::read_to_string(fx.p("long.count")).unwrap(), "run\n");
    assert_eq!(std::fs::read_to_string(fx.p("second.count")).unwrap(), "run\n", "second ran twice");
    assert_eq!(first.count(&["step=second", "running snippet"]), 0, "{}", first.dump());
    other.signal(Signal::TERM);
    assert!(other.wait_exit(LONG).success(), "{}", other.dump());
}
