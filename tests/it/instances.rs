//! Ephemeral instances: user-data checked by the real cloud-init, the agent's orphan guard and
//! registry fetch, the reconciler, and real VMs booted by the `qemu` provider from the image
//! `deploy/qemu/build-image.sh` builds (ci-setup builds it), inside a network namespace each
//! test creates (only `lo` in it: the guests reach the coordinator at 10.0.2.2 and nothing
//! leaves the machine).

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::{Agent, Cluster, Proc, Signal, T, example_in, have, signal_pid, skip};

// ---------------------------------------------------------------------------------------------
// User-data

#[test]
fn rendered_user_data_passes_cloud_init_schema_small_and_large() {
    if !have("cloud-init") {
        return skip(
            "rendered_user_data_passes_cloud_init_schema_small_and_large",
            "cloud-init is not installed",
            "./ci-setup installs it",
        );
    }
    let fx = Cluster::new();
    let example = example_in(fx.dir.path());
    let schema = |text: &str, name: &str| {
        let f = fx.p(name);
        std::fs::write(&f, text).unwrap();
        let out = Command::new("cloud-init").args(["schema", "--config-file"]).arg(&f).output().unwrap();
        assert!(
            out.status.success(),
            "cloud-init schema refused {name}:\n{}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // Small: an empty registry, inline.
    let (ok, small, err) = fx.cli(&["cloud-init", "render", "--step", "generate", example.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(small.starts_with("#cloud-config\n"), "{small}");
    assert!(err.contains("registry inline"), "{err}");
    assert!(small.contains("path: /var/lib/pype/snapshot_registry.json"), "{small}");
    schema(&small, "small.yaml");

    // Large but compressible: gzip-compressed inline.
    let mut reg = serde_json::Map::new();
    for i in 0..300 {
        reg.insert(
            format!("/data/sample-{i:05}/reads.fq.gz"),
            serde_json::json!({"snapshot_id": format!("snap-{:032x}", i % 7), "in_snapshot_path": format!("data/sample-{i:05}/reads.fq.gz")}),
        );
    }
    let reg_file = fx.p("big.json");
    std::fs::write(&reg_file, serde_json::Value::Object(reg).to_string()).unwrap();
    let (ok, _, err) = fx.cli(&["registry", "import", reg_file.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, large, err) = fx.cli(&["cloud-init", "render", "--step", "generate", example.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(err.contains("registry gzip-compressed inline"), "{err}");
    assert!(large.len() <= 16 * 1024, "{} bytes", large.len());
    assert!(large.contains("encoding: gz+b64"));
    schema(&large, "large.yaml");

    // Too large even compressed (random ids): the agent fetches it; no registry file.
    let mut reg = serde_json::Map::new();
    let mut rng = tests::Rng(7);
    for i in 0..3000 {
        reg.insert(
            format!("/data/s{i}"),
            serde_json::json!({"snapshot_id": format!("snap-{:016x}{:016x}", rng.next_u64(), rng.next_u64()), "in_snapshot_path": format!("data/s{i}")}),
        );
    }
    std::fs::write(&reg_file, serde_json::Value::Object(reg).to_string()).unwrap();
    let (ok, _, err) = fx.cli(&["registry", "import", reg_file.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, huge, err) = fx.cli(&["cloud-init", "render", "--step", "generate", example.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(err.contains("registry fetched over QUIC"), "{err}");
    assert!(!huge.contains("snapshot_registry.json\n"), "{huge}");
    schema(&huge, "huge.yaml");

    // A step the pipeline does not have.
    let (ok, _, err) = fx.cli(&["cloud-init", "render", "--step", "nope", example.to_str().unwrap()]);
    assert!(!ok && err.contains("no step nope"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Agent side: registry fetch and the orphan guard (local processes)

#[test]
fn agent_fetches_the_registry_over_quic_when_told_to() {
    let fx = Cluster::new().serve();
    let reg_file = fx.p("in.json");
    std::fs::write(
        &reg_file,
        r#"{"/ref/genome.fa": {"snapshot_id": "snap-0123456789abcdef0123456789abcdef", "in_snapshot_path": "ref/genome.fa"},
           "/ref/genome.fai": {"snapshot_id": "snap-0123456789abcdef0123456789abcdef", "in_snapshot_path": "ref/genome.fai"}}"#,
    )
    .unwrap();
    fx.cli_ok(&["registry", "import", reg_file.to_str().unwrap()]);
    let agent_reg = fx.p("agent/registry.json");
    let agent = fx.spawn_agent(
        Agent::named("fetcher")
            .dir(fx.p("agent"))
            .env("PYPE_REGISTRY_FETCH", "1")
            .env("PYPE_SNAPSHOT_REGISTRY", agent_reg.to_str().unwrap()),
    );
    agent.wait_for(&["registry fetched from the coordinator", "entries=2"], T);
    let got: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&agent_reg).unwrap()).unwrap();
    assert_eq!(got["/ref/genome.fa"]["snapshot_id"], "snap-0123456789abcdef0123456789abcdef");
    assert_eq!(got["/ref/genome.fai"]["in_snapshot_path"], "ref/genome.fai");
}

#[test]
fn orphaned_agent_gives_up_after_the_orphan_timeout() {
    let fx = Cluster::new().serve();
    let mut agent = fx.spawn_agent(
        Agent::named("orphan").env("PYPE_ORPHAN_TIMEOUT_SECS", "2").env("PYPE_ORPHAN_ACTION", "exit"),
    );
    agent.wait_for(&["connected to coordinator"], T);
    // Connected agents are not orphans, however long they run.
    std::thread::sleep(Duration::from_secs(3));
    assert!(agent.count(&["orphaned"]) == 0, "{}", agent.dump());
    fx.coord().proc.signal(Signal::KILL);
    let killed = Instant::now();
    let status = agent.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", agent.dump());
    agent.wait_for(&["orphaned: no coordinator for longer than 2s"], T);
    assert!(killed.elapsed() >= Duration::from_secs(2), "gave up after {:?}", killed.elapsed());
}

#[test]
fn provider_without_its_image_fails_at_once_with_the_fix() {
    let fx = Cluster::new();
    let pipeline = example_in(fx.dir.path());
    let cfg = fx.p("provider.toml");
    std::fs::write(&cfg, format!("[qemu]\nimage_dir = \"{}\"\n", fx.p("no-images").display())).unwrap();
    let run_qemu = || {
        let args = [
            "run",
            "--provider",
            "qemu",
            "--provider-config",
            cfg.to_str().unwrap(),
            pipeline.to_str().unwrap(),
        ];
        fx.cli(&args)
    };
    let started = Instant::now();
    let (ok, _, err) = run_qemu();
    assert!(!ok);
    assert!(err.contains("base.qcow2 is missing") && err.contains("deploy/qemu/build-image.sh"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    // An unknown provider and a broken config are refused too.
    let (ok, _, err) = fx.cli(&["run", "--provider", "nimbus", pipeline.to_str().unwrap()]);
    assert!(!ok && err.contains("unknown provider \"nimbus\""), "{err}");
    std::fs::write(&cfg, "max_instances = 0\n").unwrap();
    let (ok, _, err) = run_qemu();
    assert!(!ok && err.contains("max_instances must be at least 1"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The reconciler, on stand-in instances (processes whose command line names their directory,
// as qemu's does)

fn fake_instance(root: &Path, id: &str, tags: &serde_json::Value) -> std::process::Child {
    let d = root.join(id);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("tags.json"), tags.to_string()).unwrap();
    let child = Command::new("sh").arg("-c").arg("sleep 600").arg(d.to_str().unwrap()).spawn().unwrap();
    std::fs::write(d.join("qemu.pid"), child.id().to_string()).unwrap();
    child
}

fn gone(child: &mut std::process::Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn sweep_terminates_tagged_instances_nothing_accounts_for_and_spares_others() {
    let fx = Cluster::new();
    let state = fx.state();
    // A CA, hence this coordinator's tag (rendering user-data makes one).
    let example = example_in(fx.dir.path());
    let (ok, _, err) = fx.cli(&["cloud-init", "render", "--step", "generate", example.to_str().unwrap()]);
    assert!(ok, "{err}");
    let ca = std::fs::read_to_string(state.join("ca.pem")).unwrap();
    let tag = format!("pype-{}", &blake3::hash(ca.as_bytes()).to_hex()[..12]);
    let root = state.join("instances/qemu");
    let mut ours = fake_instance(&root, "pype-i-000000000001", &serde_json::json!({"pype:coordinator": tag}));
    let mut other = fake_instance(
        &root,
        "pype-i-000000000002",
        &serde_json::json!({"pype:coordinator": "pype-someone-else"}),
    );

    let (ok, list, err) = fx.cli(&["instances", "list"]);
    assert!(ok, "{err}");
    assert!(list.contains("pype-i-000000000001") && list.contains("not accounted for"), "{list}");
    assert!(!list.contains("pype-i-000000000002"), "another coordinator's instance is not ours:\n{list}");

    let (ok, out, err) = fx.cli(&["instances", "sweep"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("terminated pype-i-000000000001") && out.contains("1 instances terminated"),
        "{out}"
    );
    assert!(gone(&mut ours), "the unaccounted instance still runs");
    assert!(!root.join("pype-i-000000000001").exists());
    assert!(other.try_wait().unwrap().is_none(), "another coordinator's instance was killed");
    assert!(root.join("pype-i-000000000002").exists());

    // terminate by id works on anything listed.
    let (ok, _, err) = fx.cli(&["instances", "terminate", "pype-i-000000000002"]);
    assert!(ok, "{err}");
    assert!(gone(&mut other));
    // Unsafe ids are refused, not used as paths.
    let (ok, _, err) = fx.cli(&["instances", "terminate", "../../etc"]);
    assert!(!ok && err.contains("invalid qemu instance id"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Real VMs

fn image_dir() -> PathBuf {
    std::env::var_os("PYPE_QEMU_IMAGE_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/pype/images/bookworm"), PathBuf::from)
}

/// What a VM test needs, or why it must skip.
fn vm_prereqs() -> Result<(), String> {
    if !tests::is_root() {
        return Err("not root (network namespaces)".into());
    }
    for tool in ["qemu-system-x86_64", "qemu-img", "genisoimage", "ip", "python3"] {
        if !have(tool) {
            return Err(format!("{tool} is not installed"));
        }
    }
    for f in ["base.qcow2", "vmlinuz", "initrd.img"] {
        if !image_dir().join(f).exists() {
            return Err(format!(
                "no VM image at {} (deploy/qemu/build-image.sh builds it)",
                image_dir().join(f).display()
            ));
        }
    }
    Ok(())
}

/// A network namespace with only `lo`, an HTTP server in it offering the agent binary, and
/// a provider config pointing at both; derefs to the shared fixture.
struct VmFx {
    cluster: Cluster,
    netns: String,
    http: std::process::Child,
}

impl Deref for VmFx {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl VmFx {
    fn new(test: &str) -> Option<Self> {
        if let Err(why) = vm_prereqs() {
            skip(test, &why, "./ci-setup installs it");
            return None;
        }
        let cluster = Cluster::new();
        let netns = format!("pype-t{}-{}", std::process::id(), &test[..test.len().min(6)]);
        let _ =
            Command::new("ip").args(["netns", "del", &netns]).stderr(std::process::Stdio::null()).status();
        assert!(Command::new("ip").args(["netns", "add", &netns]).status().unwrap().success());
        assert!(
            Command::new("ip")
                .args(["netns", "exec", &netns, "ip", "link", "set", "lo", "up"])
                .status()
                .unwrap()
                .success()
        );
        let www = cluster.p("www");
        std::fs::create_dir_all(&www).unwrap();
        let agent = www.join("pype-agent");
        let stripped = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&cluster.bins.agent)
            .arg(&agent)
            .status()
            .is_ok_and(|s| s.success());
        if !stripped {
            std::fs::copy(&cluster.bins.agent, &agent).unwrap();
        }
        let http = Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "python3",
                "-m",
                "http.server",
                "8089",
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(&www)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Some(Self { cluster, netns, http })
    }

    fn agent_sha256(&self) -> String {
        let bytes = std::fs::read(self.p("www/pype-agent")).unwrap();
        let out = Command::new("sha256sum").arg(self.p("www/pype-agent")).output().unwrap();
        assert!(!bytes.is_empty());
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
    }

    /// Provider config: the agent downloaded from the namespace's HTTP server, or
    /// `preinstalled` at a path no image has (an agent that never starts).
    fn provider_config(&self, extra: &str, download: bool) -> PathBuf {
        let agent = if download {
            format!(
                "[agent]\nmode = \"download\"\nurl = \"http://10.0.2.2:8089/pype-agent\"\nsha256 = \"{}\"\n",
                self.agent_sha256()
            )
        } else {
            "[agent]\nmode = \"preinstalled\"\npath = \"/opt/pype/no-such-agent\"\n".to_string()
        };
        let text = format!(
            "{extra}\nsweep_interval_secs = 5\norphan_timeout_secs = 120\n{agent}[qemu]\nimage_dir = \"{}\"\n",
            image_dir().display()
        );
        let path = self.p("provider.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `pype-coordinator run --provider qemu ...` inside the namespace.
    fn start_qemu_run(&self, name: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(&self.bins.coordinator);
        cmd.arg("--state-dir").arg(self.state()).args(["run", "--provider", "qemu"]);
        // TCG guests on a loaded 2-core machine can stall for a second or two.
        cmd.args(["--heartbeat-interval-ms", "2000"]);
        cmd.arg("--provider-config").arg(self.p("provider.toml"));
        cmd.args(args);
        Proc::spawn(name, cmd)
    }

    /// Live qemu processes whose command line names this test's state dir.
    fn qemus(&self) -> Vec<i32> {
        let needle = self.state().join("instances").display().to_string();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("qemu-system") && cmd.contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }

    fn instance_rows(&self) -> String {
        let (ok, out, err) =
            self.cli(&["instances", "list", "--provider-config", self.p("provider.toml").to_str().unwrap()]);
        assert!(ok, "{err}");
        out
    }

    fn assert_no_instances_left(&self, context: &Proc) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.qemus().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(self.qemus().is_empty(), "qemu still running: {:?}\n{}", self.qemus(), context.dump());
        let left: Vec<_> = std::fs::read_dir(self.state().join("instances/qemu"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "instance dirs left: {left:?}");
        let rows = self.instance_rows();
        for line in rows.lines().skip(1) {
            assert!(line.contains(" terminated "), "instance not terminated: {line}\n{rows}");
        }
    }
}

impl Drop for VmFx {
    fn drop(&mut self) {
        for pid in self.qemus() {
            signal_pid(pid, Signal::KILL);
        }
        let _ = self.http.kill();
        let _ = self.http.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
    }
}

const BOOT: Duration = Duration::from_secs(300);

#[test]
fn example_pipeline_on_two_qemu_vms() {
    let Some(fx) = VmFx::new("example_pipeline_on_two_qemu_vms") else { return };
    example_in(fx.dir.path());
    // Both boot from the start (the example's steps take seconds, a VM a minute).
    fx.provider_config(
        "max_instances = 2\nmin_instances = 2\nboot_timeout_secs = 400\nprice_per_hour = 0.5",
        true,
    );
    let started = std::time::Instant::now();
    let mut run = fx.start_qemu_run("run", &[fx.p("pipeline.toml").to_str().unwrap()]);
    let status = run.wait_exit(Duration::from_secs(600));
    let wall_h = started.elapsed().as_secs_f64() / 3600.0;
    assert!(status.success(), "{status}\n{}", run.dump());
    // Two instances, each enrolled from its own user-data.
    assert_eq!(run.count(&["instance requested"]), 2, "{}", run.dump());
    assert_eq!(run.count(&["instance joined: agent connected"]), 2, "{}", run.dump());
    assert_eq!(run.count(&["agent enrolled", "agent=pype-i-"]), 2, "{}", run.dump());
    assert!(run.count(&["user-data:", "registry inline"]) >= 2);
    // Steps ran on instances, with the snapshot backend.
    let started = run.wait_for(&["step started", "step=\"summary\""], T);
    assert!(started.contains("agent=\"pype-i-") && started.contains("backend snapshot"), "{started}");
    // Outputs in the registry, produced by this run.
    let reg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.state().join("snapshot_registry.json")).unwrap())
            .unwrap();
    let summary = fx.p("out/summary.txt");
    let entry = &reg[summary.to_str().unwrap()];
    assert!(entry["snapshot_id"].as_str().is_some_and(|s| s.starts_with("snap-")), "{reg:#}");
    assert_eq!(entry["produced_by"]["step"], "summary");
    assert!(std::fs::read_to_string(&summary).unwrap().lines().count() >= 2);
    // And both VMs are gone.
    fx.assert_no_instances_left(&run);
    // What they cost at the configured $0.50 an hour each, boot and idle included.
    let id = tests::run_id(&run.wait_for(&["run started"], T));
    let out = fx.command().args(["status", &id, "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cost = tests::check_cost(&String::from_utf8_lossy(&out.stdout), 2, 0.5, wall_h);
    // A VM boots for tens of seconds: its boot is a visible part of the bill.
    assert!(cost["boot"].as_f64().unwrap() > 0.5 * 10.0 / 3600.0, "{cost}");
}

#[test]
fn killed_coordinator_leaves_a_vm_that_the_restart_terminates_and_the_run_resumes() {
    let Some(fx) =
        VmFx::new("killed_coordinator_leaves_a_vm_that_the_restart_terminates_and_the_run_resumes")
    else {
        return;
    };
    let pipeline = fx.p("slow.toml");
    std::fs::write(
        &pipeline,
        format!(
            "name = \"slow\"\ndata_root = \"{}\"\n[[steps]]\nname = \"slow\"\noutputs = [\"slow.txt\"]\ncommand = \"sleep 8 && echo done > {{{{data_root}}}}/slow.txt\"\n",
            fx.p("out").display()
        ),
    )
    .unwrap();
    fx.provider_config("max_instances = 1\nboot_timeout_secs = 400", true);
    let mut first = fx.start_qemu_run("first", &[pipeline.to_str().unwrap()]);
    first.wait_for(&["step started", "step=\"slow\""], BOOT);
    let run_id = first
        .wait_for(&["run started"], T)
        .split("run=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_string();
    let orphans = fx.qemus();
    assert_eq!(orphans.len(), 1, "{}", first.dump());
    first.signal(Signal::KILL);
    first.wait_exit(T);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(fx.qemus(), orphans, "the VM outlives a killed coordinator");

    let mut second = fx.start_qemu_run("second", &["--resume", &run_id]);
    second.wait_for(&["reconciler: terminating an instance left by a previous coordinator"], T);
    let status = second.wait_exit(Duration::from_secs(600));
    assert!(status.success(), "{status}\n{}", second.dump());
    for pid in &orphans {
        assert!(!fx.qemus().contains(pid), "orphan qemu {pid} survived the restart");
    }
    assert_eq!(second.count(&["instance joined: agent connected"]), 1, "{}", second.dump());
    assert_eq!(std::fs::read_to_string(fx.p("out/slow.txt")).unwrap().trim(), "done");
    fx.assert_no_instances_left(&second);
}

#[test]
fn instance_whose_agent_never_starts_times_out_is_replaced_and_ctrl_c_leaves_nothing_and_strays_are_swept() {
    let Some(fx) = VmFx::new(
        "instance_whose_agent_never_starts_times_out_is_replaced_and_ctrl_c_leaves_nothing_and_strays_are_swept",
    ) else {
        return;
    };
    let pipeline = fx.p("one.toml");
    std::fs::write(&pipeline, "name = \"one\"\n[[steps]]\nname = \"one\"\ncommand = \"true\"\n").unwrap();
    // An agent path the image does not have: the unit never starts.
    fx.provider_config("max_instances = 1\nboot_timeout_secs = 25", false);
    let mut run = fx.start_qemu_run("run", &[pipeline.to_str().unwrap()]);
    // Meanwhile something tagged as ours appears that the state database does not know: the
    // periodic reconciler (every 5 s here) terminates it.
    run.wait_for(&["instance requested"], T);
    let ca = std::fs::read_to_string(fx.state().join("ca.pem")).unwrap();
    let tag = format!("pype-{}", &blake3::hash(ca.as_bytes()).to_hex()[..12]);
    let mut stray = fake_instance(
        &fx.state().join("instances/qemu"),
        "pype-i-5742a7000000",
        &serde_json::json!({"pype:coordinator": tag}),
    );
    run.wait_for(&["reconciler: terminating an instance nothing accounts for", "pype-i-5742a7000000"], T);
    assert!(gone(&mut stray), "the stray instance still runs");
    let timed_out = run.wait_for(&["boot timeout: no agent within 25s"], Duration::from_secs(120));
    assert!(timed_out.contains("console tail"), "{timed_out}");
    run.wait_for(&["instance terminated", "boot timeout"], T);
    // Replaced while the demand lasts.
    run.wait_for_nth(&["instance requested"], 2, T);
    run.signal(Signal::TERM);
    run.wait_exit(Duration::from_secs(60));
    fx.assert_no_instances_left(&run);
    let rows = fx.instance_rows();
    assert!(rows.contains("boot timeout"), "{rows}");
}

#[test]
fn orphaned_vm_powers_itself_off() {
    let Some(fx) = VmFx::new("orphaned_vm_powers_itself_off") else { return };
    let pipeline = fx.p("long.toml");
    std::fs::write(&pipeline, "name = \"long\"\n[[steps]]\nname = \"long\"\ncommand = \"sleep 600\"\n")
        .unwrap();
    fx.provider_config("max_instances = 1\nboot_timeout_secs = 400", true);
    // The provider config's orphan timeout goes into the user-data.
    let cfg = fx.p("provider.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("orphan_timeout_secs = 120", "orphan_timeout_secs = 10");
    std::fs::write(&cfg, text).unwrap();
    let mut run = fx.start_qemu_run("run", &[pipeline.to_str().unwrap()]);
    run.wait_for(&["step started", "step=\"long\""], BOOT);
    let vms = fx.qemus();
    assert_eq!(vms.len(), 1);
    run.signal(Signal::KILL);
    run.wait_exit(T);
    // Nobody terminates it: its agent gives up after 10 s and powers the VM off, and qemu exits.
    let deadline = Instant::now() + Duration::from_secs(180);
    while !fx.qemus().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    let console: String = std::fs::read_dir(fx.state().join("instances/qemu"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path().join("console.log")).unwrap_or_default())
        .collect();
    assert!(fx.qemus().is_empty(), "the orphaned VM still runs; console:\n{console}");
    assert!(console.contains("Power"), "no power-off on the console:\n{console}");
    // What is left on disk is swept without a coordinator.
    let (ok, out, err) = fx.cli(&["instances", "sweep", "--provider-config", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("1 instances terminated"), "{out}");
}
