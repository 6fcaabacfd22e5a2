//! bio-pype pipelines, unchanged, on pype agents: the real bio-pype 2.0.99rc9 (`pype
//! pipelines`, `pype resume`) with this repo's `pype_rs` queue module and storage backend
//! (python/, taken from the working tree through PYTHONPATH), against the module set in
//! tests/biopype/ (markdown snippets, an API 2.1.0 pipeline with a fan-out and a join, a
//! profile with a program and a file). bio-pype's own `parallel` queue is the reference.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tests::{Cluster, Slurm, repo};

/// The venv ci-setup makes (bio-pype 2.0.99rc9 and python/), or a loud skip.
fn venv(test: &str) -> Option<PathBuf> {
    let v = std::env::var_os("PYPE_BIOPYPE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv-biopype"));
    if !v.join("bin/pype").exists() {
        tests::skip(test, &format!("bio-pype is not installed at {}", v.display()), "./ci-setup installs it");
        return None;
    }
    Some(v)
}

struct Job {
    name: String,
    status: String,
    error: String,
    started_at: String,
}

/// The shared fixture (its state dir is the pype_rs runs'), bio-pype's venv and the
/// environment bio-pype runs with; derefs to the [`Cluster`].
struct Bp {
    cluster: Cluster,
    venv: PathBuf,
    /// `PYPE_RS_RUN_ARGS` for pype_rs runs.
    run_args: String,
    env: Vec<(String, String)>,
}

impl Deref for Bp {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Bp {
    fn new(test: &str) -> Option<Bp> {
        let venv = venv(test)?;
        let bp = Bp {
            cluster: Cluster::new(),
            venv,
            run_args: "--heartbeat-interval-ms 200".into(),
            env: Vec::new(),
        };
        let src = repo().join("tests/biopype");
        copy_dir(&src.join("modules"), &bp.p("modules"));
        copy_dir(&src.join("data"), &bp.p("data"));
        // The profile names its file by absolute path: point it at this copy.
        let profile = bp.p("modules/profiles/biopype_test.yaml");
        let text = std::fs::read_to_string(&profile).unwrap();
        let data = bp.p("data");
        std::fs::write(&profile, text.replace("/work/main/tests/biopype/data", data.to_str().unwrap()))
            .unwrap();
        // `pype-rs install` puts the queue module where bio-pype looks: $PYPE_MODULES/queues.
        let out =
            bp.python_cmd("pype-rs").args(["install", "--dir"]).arg(bp.p("modules/queues")).output().unwrap();
        assert!(out.status.success(), "pype-rs install: {}", String::from_utf8_lossy(&out.stderr));
        Some(bp)
    }

    /// A venv executable with the test environment (bio-pype's modules, this repo's python/).
    fn python_cmd(&self, exe: &str) -> Command {
        let mut cmd = Command::new(self.venv.join("bin").join(exe));
        cmd.env("PYTHONPATH", repo().join("python"))
            .env("PYPE_MODULES", self.p("modules"))
            .env("PYPE_QUEUE_POLL_INTERVAL", "1")
            .env("PYPE_NCPU", "4")
            .env("PYPE_RS_COORDINATOR_BIN", &self.bins.coordinator)
            .env("PYPE_RS_STATE_DIR", self.state())
            .env("PYPE_RS_RUN_ARGS", &self.run_args)
            .env_remove("PYPE_OVERLAY_MODE")
            .env_remove("PYPE_RS_COORDINATOR");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// `pype -p biopype_test pipelines --queue QUEUE --log LOG PIPELINE --input ... --out OUT`.
    fn pipelines(&self, queue: &str, log: &str, pipeline: &str, out: &str) -> Output {
        let mut cmd = self.python_cmd("pype");
        if queue == "pype_rs" {
            cmd.env("PYPE_OVERLAY_MODE", "pype_rs");
        }
        cmd.args(["-p", "biopype_test", "pipelines", "--queue", queue, "--log"])
            .arg(self.p(log))
            .arg(pipeline)
            .arg("--input")
            .arg(self.p("data/input.txt"))
            .arg("--out")
            .arg(self.p(out));
        let out = cmd.output().unwrap();
        eprintln!(
            "--- pype pipelines --queue {queue} {pipeline}: {}\n{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 15)
        );
        out
    }

    /// The pipeline log dir a `--log` got (bio-pype makes one per run inside it).
    fn plog(&self, log: &str) -> PathBuf {
        self.try_plog(log)
            .unwrap_or_else(|| panic!("no pipeline_runtime.yaml under {}", self.p(log).display()))
    }

    fn try_plog(&self, log: &str) -> Option<PathBuf> {
        let mut runs: Vec<PathBuf> = std::fs::read_dir(self.p(log))
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("pipeline_runtime.yaml").exists())
            .collect();
        runs.sort();
        runs.pop()
    }

    /// Jobs of `pipeline_runtime.yaml`, by run id.
    fn jobs(&self, plog: &Path) -> BTreeMap<String, Job> {
        let script = "import json,sys,yaml\nd=yaml.safe_load(open(sys.argv[1])) or {}\n\
                      print(json.dumps({k:{f:str(v.get(f,'')) for f in ('name','status','error_msg','started_at')} \
                      for k,v in d.items() if not k.startswith('__')}))";
        let out = self
            .python_cmd("python")
            .arg("-c")
            .arg(script)
            .arg(plog.join("pipeline_runtime.yaml"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, j)| {
                let f = |n: &str| j[n].as_str().unwrap_or("").to_string();
                (
                    k.clone(),
                    Job {
                        name: f("name"),
                        status: f("status"),
                        error: f("error_msg"),
                        started_at: f("started_at"),
                    },
                )
            })
            .collect()
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// Every file below `dir`, relative path to content.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

fn statuses(jobs: &BTreeMap<String, Job>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = jobs.values().map(|j| (j.name.clone(), j.status.clone())).collect();
    v.sort();
    v
}

const EXPECTED_JOBS: [&str; 7] =
    ["count_chunk_00", "count_chunk_01", "count_chunk_02", "count_chunk_03", "merge", "split_4", "stats"];

#[test]
fn a_biopype_pipeline_runs_unchanged_skips_from_the_registry_and_writes_back() {
    let Some(bp) = Bp::new("a_biopype_pipeline_runs_unchanged_skips_from_the_registry_and_writes_back")
    else {
        return;
    };
    // The reference: bio-pype's own parallel queue.
    let r = bp.pipelines("parallel", "ref-log", "wordcount", "ref");
    assert!(r.status.success());
    let reference = tree(&bp.p("ref"));
    assert!(
        reference.contains_key("summary.tsv") && reference.contains_key("report.tsv"),
        "{:?}",
        reference.keys()
    );

    // Through pype agents: an embedded coordinator, 2 local agents, the snapshot backend.
    let r = bp.pipelines("pype_rs", "log1", "wordcount", "out");
    assert!(r.status.success());
    let plog = bp.plog("log1");
    let jobs = bp.jobs(&plog);
    let names: Vec<String> = statuses(&jobs).into_iter().map(|(n, s)| format!("{n}={s}")).collect();
    assert_eq!(names, EXPECTED_JOBS.iter().map(|n| format!("{n}=completed")).collect::<Vec<_>>());
    assert_eq!(tree(&bp.p("out")), reference, "outputs byte-identical to the parallel queue's");

    // The logs came back: each job's log dir at its absolute path, with the snippet's
    // registry entries beside its log (as bio-pype's cloud backend writes them).
    let split_log = std::fs::read_dir(&plog)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().contains("split_4_pype_rs"));
    let split_log = split_log.expect("split's queue log dir");
    let reg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(split_log.join("split/snapshot_registry.json")).unwrap(),
    )
    .unwrap();
    let chunks = bp.p("out/chunks").display().to_string();
    assert!(reg.get(&chunks).and_then(|e| e.get("snapshot_id")).is_some(), "{reg}");
    assert!(split_log.join("split/split.log").exists());
    // The coordinator knows the run: `status` and `logs` show it.
    let (ok, status, err) = bp.cli(&["status"]);
    assert!(ok, "{err}");
    assert!(status.contains("succeeded"), "{status}");
    let split_run = jobs.iter().find(|(_, j)| j.name == "split_4").map(|(k, _)| k.clone()).unwrap();
    let run = status
        .lines()
        .find_map(|l| l.split_whitespace().find(|w| w.starts_with("wordcount-")))
        .unwrap()
        .to_string();
    let (ok, logs, err) = bp.cli(&["logs", &run, &format!("split_4.{split_run}")]);
    assert!(ok, "{err}");
    assert!(logs.contains("chunk_00.txt"), "the job's output (its `ls`):\n{logs}");

    // Second run: the planner's skip checks are answered by the coordinator: no job.
    let r = bp.pipelines("pype_rs", "log2", "wordcount", "out");
    assert!(r.status.success());
    assert!(bp.jobs(&bp.plog("log2")).is_empty(), "a second run registers no job");

    // The submitting host's copies gone: the registry is the truth, still no job ...
    std::fs::remove_dir_all(bp.p("out")).unwrap();
    let r = bp.pipelines("pype_rs", "log3", "wordcount", "out");
    assert!(r.status.success());
    assert!(bp.jobs(&bp.plog("log3")).is_empty(), "the registry, not this disk, decides");
    assert!(!bp.p("out").exists());
    // ... and the outputs come back from the store.
    let out = bp.p("out").display().to_string();
    let (ok, _, err) = bp.cli(&["registry", "write-out", &out]);
    assert!(ok, "{err}");
    assert_eq!(tree(&bp.p("out")), reference);

    // `paths`, the skip check the planner makes, answers sizes from the registry; a
    // directory has its total, a path the registry does not know is null.
    let summary = bp.p("out/summary.tsv").display().to_string();
    let (ok, present, err) = bp.cli(&["paths", &summary, &chunks, "/nowhere/x"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&present).unwrap();
    assert_eq!(v[&summary], serde_json::json!(reference["summary.tsv"].len()));
    let chunk_total: usize =
        reference.iter().filter(|(k, _)| k.starts_with("chunks/")).map(|(_, v)| v.len()).sum();
    assert_eq!(v[&chunks], serde_json::json!(chunk_total));
    assert!(v["/nowhere/x"].is_null());
}

#[test]
fn a_failing_snippet_fails_its_job_and_cancels_its_dependents() {
    let Some(bp) = Bp::new("a_failing_snippet_fails_its_job_and_cancels_its_dependents") else { return };
    let r = bp.pipelines("pype_rs", "log", "wordcount_fail", "out");
    assert!(r.status.success(), "bio-pype's pipelines exits 0 when jobs fail");
    let jobs = bp.jobs(&bp.plog("log"));
    let by_name: BTreeMap<String, (String, String)> =
        jobs.values().map(|j| (j.name.clone(), (j.status.clone(), j.error.clone()))).collect();
    assert_eq!(by_name["fail"].0, "failed", "{by_name:?}");
    assert_eq!(by_name["stats"].0, "cancelled", "{by_name:?}");
    assert_eq!(by_name["split_4"].0, "completed");
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("pype_rs: 1 failed: fail ("), "the summary names the failed job:\n{stderr}");
    assert!(stderr.contains("cancelled: stats ("), "and the cancelled one:\n{stderr}");
}

#[test]
fn resume_after_the_coordinator_was_killed_runs_only_what_did_not_finish() {
    let Some(mut bp) = Bp::new("resume_after_the_coordinator_was_killed_runs_only_what_did_not_finish")
    else {
        return;
    };
    // One agent: jobs one after another, so the kill lands between them.
    bp.run_args = "--heartbeat-interval-ms 200 --agents 1".into();
    let mut cmd = bp.python_cmd("pype");
    cmd.env("PYPE_OVERLAY_MODE", "pype_rs")
        .args(["-p", "biopype_test", "pipelines", "--queue", "pype_rs", "--log"])
        .arg(bp.p("log"))
        .args(["wordcount", "--input"])
        .arg(bp.p("data/input.txt"))
        .arg("--out")
        .arg(bp.p("out"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut planner = cmd.spawn().unwrap();
    // Kill the coordinator (the `run --json` child) once the first job has completed.
    let deadline = Instant::now() + Duration::from_secs(120);
    let killed = loop {
        assert!(Instant::now() < deadline, "no job completed");
        if let Some(plog) = bp.try_plog("log")
            && bp.jobs(&plog).values().any(|j| j.status == "completed")
        {
            let state = bp.state().display().to_string();
            let out = Command::new("pkill")
                .args(["-9", "-f", "--", &format!("--state-dir {state} run --json")])
                .output()
                .unwrap();
            break out.status.success();
        }
        if planner.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(planner.wait().unwrap().success());
    assert!(killed, "the run ended before the coordinator could be killed");
    let plog = bp.plog("log");
    let before = bp.jobs(&plog);
    let completed: Vec<(String, String)> = before
        .iter()
        .filter(|(_, j)| j.status == "completed")
        .map(|(k, j)| (k.clone(), j.started_at.clone()))
        .collect();
    assert!(!completed.is_empty() && completed.len() < 7, "{:?}", statuses(&before));
    assert!(
        before.values().all(|j| j.status == "completed" || j.status == "cancelled"),
        "unfinished jobs are cancelled, so resume runs them: {:?}",
        statuses(&before)
    );

    let out = bp.python_cmd("pype").arg("resume").arg(plog.join("pipeline_runtime.yaml")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = bp.jobs(&plog);
    assert!(after.values().all(|j| j.status == "completed"), "{:?}", statuses(&after));
    for (k, started) in &completed {
        assert_eq!(&after[k].started_at, started, "job {} ran again", after[k].name);
    }
    assert_eq!(tree(&bp.p("out")).len(), 10, "4 chunks, 4 counts, summary, report");
}

#[test]
fn the_same_pipeline_runs_on_slurm_agents() {
    let Some(mut bp) = Bp::new("the_same_pipeline_runs_on_slurm_agents") else { return };
    let Some(slurm) = Slurm::start("the_same_pipeline_runs_on_slurm_agents") else { return };
    let cfg = bp.p("provider.toml");
    std::fs::write(
        &cfg,
        format!(
            "boot_timeout_secs = 60\nsweep_interval_secs = 5\norphan_timeout_secs = 600\n\
             [slurm]\nagent_bin = \"{}\"\nlog_dir = \"{}\"\n[slurm.env]\nTMPDIR = \"{}\"\n",
            bp.bins.agent.display(),
            bp.p("jobs").display(),
            bp.dir.path().display()
        ),
    )
    .unwrap();
    bp.run_args = format!("--heartbeat-interval-ms 200 --provider slurm --provider-config {}", cfg.display());
    bp.env.push(("SLURM_CONF".into(), slurm.conf.display().to_string()));
    let r = bp.pipelines("parallel", "ref-log", "wordcount", "ref");
    assert!(r.status.success());
    let r = bp.pipelines("pype_rs", "log", "wordcount", "out");
    assert!(r.status.success());
    let jobs = bp.jobs(&bp.plog("log"));
    assert!(jobs.values().all(|j| j.status == "completed"), "{:?}", statuses(&jobs));
    assert_eq!(tree(&bp.p("out")), tree(&bp.p("ref")));
    let log = std::fs::read_to_string(bp.plog("log").join("pype_rs_run/pype-coordinator.log")).unwrap();
    assert!(log.contains("instance requested"), "the agents were Slurm jobs:\n{}", tail(&log, 30));
}

#[test]
fn bad_input_gets_a_clear_error_and_leaves_the_run_consistent() {
    let Some(mut bp) = Bp::new("bad_input_gets_a_clear_error_and_leaves_the_run_consistent") else { return };
    // An unreachable coordinator: the planner's first skip check says so.
    bp.env.push(("PYPE_RS_COORDINATOR".into(), "127.0.0.1:9".into()));
    let r = bp.pipelines("pype_rs", "log-unreachable", "wordcount", "out");
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains("--coordinator 127.0.0.1:9") && stderr.contains("failed:"),
        "the planner's skip check names the coordinator it could not ask:\n{stderr}"
    );
    bp.env.clear();
    let (ok, runs, _) = bp.cli(&["status"]);
    assert!(!ok || !runs.contains("wordcount-"), "no run was recorded:\n{runs}");

    // A job whose command is not a bio-pype job (a hand-edited runtime file): `pype resume`
    // fails it with the reason in bio-pype's log, and runs nothing.
    let r = bp.pipelines("pype_rs", "log", "wordcount", "out");
    assert!(r.status.success());
    let plog = bp.plog("log");
    let yaml = plog.join("pipeline_runtime.yaml");
    let edit = "import sys,yaml\np=sys.argv[1]\nd=yaml.safe_load(open(p))\n\
                for k,v in d.items():\n  if not k.startswith('__'):\n    v['status']='pending'\n    v.pop('queue_id',None)\n    v['command']='rm -rf /tmp/not-a-job'\n\
                yaml.safe_dump(d,open(p,'w'))";
    let out = bp.python_cmd("python").arg("-c").arg(edit).arg(&yaml).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out =
        bp.python_cmd("pype").env("PYPE_OVERLAY_MODE", "pype_rs").arg("resume").arg(&yaml).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("its command is not a bio-pype job"), "{stderr}");
    let jobs = bp.jobs(&plog);
    assert!(
        jobs.values().all(|j| j.status == "failed" && j.error.contains("not a bio-pype job")),
        "{:?}",
        statuses(&jobs)
    );
}

/// The socket an agent serves to a step, driven by hand (no bio-pype): mode 0600, the
/// protocol checked at `init`, paths outside the step's declared world refused, a chunk that
/// harvests under the roots merged, and the socket gone after the attempt.
#[test]
fn the_served_backend_checks_protocol_and_paths_and_goes_with_the_attempt() {
    served_backend_on("snapshot");
}

/// The same through the overlay backend: each chunk has its own scratch, harvested in place.
#[test]
fn the_served_overlay_backend_keeps_chunks_apart() {
    served_backend_on("overlay");
}

fn served_backend_on(backend: &str) {
    let fx = Cluster::new();
    let d = fx.d();
    let client = r#"
import json, os, socket, stat, sys
path = os.environ["PYPE_RS_SOCKET"]
print("socket-mode", oct(stat.S_IMODE(os.stat(path).st_mode)), "socket-path", path)
def conn():
    s = socket.socket(socket.AF_UNIX); s.connect(path); return s, s.makefile("rb")
def call(c, method, params, i=[0]):
    i[0] += 1
    c[0].sendall((json.dumps({"id": i[0], "method": method, "params": params}) + "\n").encode())
    return json.loads(c[1].readline())
c = conn()
print("old-client", json.dumps(call(c, "init", {"protocol": 99})))
print("no-init", json.dumps(call(c, "prepare_inputs", {"inputs": ["/x"]})))
c = conn()
print("init", json.dumps(call(c, "init", {"protocol": 1})))
print("outside", json.dumps(call(c, "prepare_inputs", {"inputs": ["/etc/passwd"], "overlay_volumes": []})))
print("relative", json.dumps(call(c, "prepare_outputs", {"outputs": ["out/x"], "output_harvest": {}, "overlay_volumes": []})))
print("dotdot", json.dumps(call(c, "check_outputs", {"paths": [sys.argv[1] + "/../../etc"]})))
print("bad-upper", json.dumps(call(c, "harvest", {"upper": "/etc", "original_dir": sys.argv[1]})))
print("bad-key", json.dumps(call(c, "restore_program", {"profile_name": "../p", "program_key": "k"})))
print("bad-build", json.dumps(call(c, "prepare_build", {"paths": [], "program_keys": ["/data/secret"]})))
print("read-only", json.dumps(call(c, "prepare_outputs", {"outputs": [sys.argv[2] + "/x"], "output_harvest": {}, "overlay_volumes": []})))
r = call(c, "prepare_outputs", {"outputs": [sys.argv[1] + "/res.txt"], "output_harvest": {sys.argv[1] + "/res.txt": True}, "overlay_volumes": []})
vol = r["result"]["overlay_volumes"][0]
open(vol["bind_file"], "w").write("served\n")
os.makedirs(sys.argv[1], exist_ok=True)  # as bio-pype's overlay mode, the output's directory exists
print("harvest", json.dumps(call(c, "harvest", {"upper": vol["scratch_dir"], "original_dir": vol["original_dir"]})))
print("check", json.dumps(call(c, "check_outputs", {"paths": [sys.argv[1] + "/res.txt"]})))
print("cleanup", json.dumps(call(c, "cleanup", {})))
"#;
    std::fs::write(fx.p("client.py"), client).unwrap();
    let pipeline = serde_json::json!({
        "version": 1,
        "name": "served",
        "roots": [format!("{d}/work"), format!("{d}/ref")],
        "write_roots": [format!("{d}/work")],
        "write_back": true,
        "steps": [{
            "name": "chunk",
            "command": format!("python3 {d}/client.py {d}/work/out {d}/ref"),
            "serve_backend": true,
        }],
    });
    let mut child = fx
        .command()
        .args(["run", "--json", "-", "--heartbeat-interval-ms", "200", "--backend", backend])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{pipeline}").unwrap();
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    let events = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{events}\n{}", tail(&String::from_utf8_lossy(&out.stderr), 30));
    let lines: Vec<serde_json::Value> = events.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().all(|l| l["v"] == 1), "{events}");
    let kinds: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    for k in ["step dispatched", "step started", "step exited", "step harvested", "run done"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    let run = lines.last().unwrap()["run"].as_str().unwrap().to_string();
    assert_eq!(lines.last().unwrap()["succeeded"], true);
    let (ok, log, err) = fx.cli(&["logs", &run, "chunk"]);
    assert!(ok, "{err}");
    let field = |k: &str| {
        log.lines()
            .find(|l| l.starts_with(&format!("{k} ")))
            .unwrap_or_else(|| panic!("{k} in\n{log}"))
            .to_string()
    };
    assert!(field("socket-mode").contains("0o600"), "{log}");
    assert!(field("old-client").contains("protocol 1, the client speaks 99"), "{log}");
    assert!(field("no-init").contains("the first call must be init"), "{log}");
    assert!(field("init").contains("\"protocol\": 1"), "{log}");
    assert!(field("outside").contains("outside the step's declared world"), "{log}");
    assert!(field("relative").contains("not an absolute path"), "{log}");
    assert!(field("dotdot").contains("not an absolute path"), "{log}");
    assert!(field("bad-upper").contains("not a scratch dir this backend handed out"), "{log}");
    assert!(field("bad-key").contains("profile_name \\\"../p\\\""), "{log}");
    assert!(field("bad-build").contains("not of the form PROFILE/programs/KEY"), "{log}");
    assert!(field("read-only").contains("outside the step's declared world"), "a read-only root: {log}");
    if backend == "snapshot" {
        assert!(field("harvest").contains("snapshot_id"), "{log}");
    } else {
        assert!(field("harvest").contains("\"new_entries\": {}"), "harvested in place: {log}");
    }
    assert!(field("check").contains("\"sizes\": {") && field("check").contains(": 7}"), "{log}");
    // Written back at once, and the socket is gone with the attempt.
    assert_eq!(std::fs::read_to_string(fx.p("work/out/res.txt")).unwrap(), "served\n");
    let socket = field("socket-mode").rsplit(' ').next().unwrap().to_string();
    assert!(!Path::new(&socket).exists(), "{socket} removed");
}

/// Workers need bio-pype: a worker's own `pype` (`PYPE_RS_WORKER_PYPE` in the agent's
/// environment) replaces the submitting host's path in the job command; or bio-pype's
/// packages and the modules directory travel with the run (`PYPE_RS_SHIP_PYPE=1`) and the
/// job runs from the agent's restored copies.
#[test]
fn jobs_use_the_workers_pype_or_a_shipped_one() {
    let Some(mut bp) = Bp::new("jobs_use_the_workers_pype_or_a_shipped_one") else { return };
    let r = bp.pipelines("parallel", "ref-log", "wordcount", "ref");
    assert!(r.status.success());
    let reference = tree(&bp.p("ref"));

    // The worker's own pype: a wrapper that leaves a mark, then runs bio-pype.
    let wrapper = bp.p("worker-pype");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$$\" >> {}\nexec {} \"$@\"\n",
            bp.p("worker-pype.calls").display(),
            bp.venv.join("bin/pype").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    bp.env.push(("PYPE_RS_WORKER_PYPE".into(), wrapper.display().to_string()));
    let r = bp.pipelines("pype_rs", "log1", "wordcount", "out1");
    assert!(r.status.success());
    let jobs = bp.jobs(&bp.plog("log1"));
    assert!(jobs.values().all(|j| j.status == "completed"), "{:?}", statuses(&jobs));
    assert_eq!(tree(&bp.p("out1")), reference);
    let calls = std::fs::read_to_string(bp.p("worker-pype.calls")).unwrap_or_default();
    assert_eq!(calls.lines().count(), 7, "every job ran the worker's pype");
    bp.env.clear();

    // Shipped: the job command names the agent's restored copies, not this host's paths.
    bp.env.push(("PYPE_RS_SHIP_PYPE".into(), "1".into()));
    let r = bp.pipelines("pype_rs", "log2", "wordcount", "out2");
    assert!(r.status.success());
    let jobs = bp.jobs(&bp.plog("log2"));
    assert!(jobs.values().all(|j| j.status == "completed"), "{:?}", statuses(&jobs));
    assert_eq!(tree(&bp.p("out2")), reference);
    let site = bp.venv.join("lib");
    let (ok, reg, err) = bp.cli(&["registry", "show"]);
    assert!(ok, "{err}");
    assert!(reg.contains(&site.display().to_string()), "bio-pype's packages were imported:\n{reg}");
    assert!(reg.contains(&bp.p("modules").display().to_string()), "and the modules:\n{reg}");
    let (ok, status, _) = bp.cli(&["status"]);
    assert!(ok);
    let run = status
        .lines()
        .find_map(|l| l.split_whitespace().find(|w| w.starts_with("wordcount-")))
        .unwrap()
        .to_string();
    let merge = jobs.iter().find(|(_, j)| j.name == "merge").map(|(k, _)| format!("merge.{k}")).unwrap();
    // The step's command as the agent ran it is in its log dir: find it by the attempt.
    let mut commands = Vec::new();
    for agent in std::fs::read_dir(bp.state().join("local-agents")).unwrap().flatten() {
        for a in std::fs::read_dir(agent.path().join("work/logs")).into_iter().flatten().flatten() {
            if let Ok(c) = std::fs::read_to_string(a.path().join("command.sh")) {
                commands.push(c);
            }
        }
    }
    let shipped = commands.iter().filter(|c| c.contains("python3 -m pype.commands")).count();
    assert!(shipped >= 7, "{run} {merge}: jobs ran `python3 -m pype.commands`: {commands:?}");
}

/// The Python package's own unit tests (python/tests), with Debian's Python and bio-pype.
#[test]
fn the_python_package_unit_tests_pass() {
    let Some(venv) = venv("the_python_package_unit_tests_pass") else { return };
    let out = Command::new(venv.join("bin/python"))
        .args(["-m", "unittest", "discover", "-s"])
        .arg(repo().join("python/tests"))
        .env("PYTHONPATH", repo().join("python"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("OK"));
}
