//! `deploy/`: the systemd units pass `systemd-analyze verify` (with their binaries at the
//! paths the units name replaced by the ones this build made), the example configs parse with
//! the code that reads them, and the Slurm batch script is valid bash that execs the agent.

use std::path::{Path, PathBuf};
use std::process::Command;

use tests::{Cluster, Slurm, T};

fn deploy() -> PathBuf {
    tests::repo().join("deploy")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(deploy().join(rel)).unwrap()
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        tests::skip(
            "systemd_units_pass_systemd_analyze_verify",
            "systemd-analyze is missing",
            "Debian package systemd; ./ci-setup installs it",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bins = tests::bins();
    for (unit, bin, exe) in [
        ("pype-agent.service", "/usr/local/bin/pype-agent", bins.agent.to_str().unwrap()),
        ("pype-coordinator.service", "/usr/local/bin/pype-coordinator", bins.coordinator.to_str().unwrap()),
    ] {
        let text = read(&format!("systemd/{unit}"));
        assert!(text.contains(&format!("ExecStart={bin} ")), "{unit} runs {bin}");
        for must in [
            "Restart=on-failure",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "ReadWritePaths=/var/lib/pype",
            "User=pype",
        ] {
            assert!(text.contains(must), "{unit} lacks {must}");
        }
        let path = dir.path().join(unit);
        std::fs::write(&path, text.replace(bin, exe)).unwrap();
        let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
        let said =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify {unit}:\n{said}");

        // The check is real: a misspelt directive is reported.
        let bad = dir.path().join(format!("bad-{unit}"));
        std::fs::write(&bad, text.replace(bin, exe).replace("ProtectSystem=", "ProtectSytem=")).unwrap();
        let out = Command::new("systemd-analyze").arg("verify").arg(&bad).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stderr).contains("Unknown key"), "a typo went unnoticed");
    }
}

#[test]
fn example_configs_parse() {
    // The agent's config file, with the agent's own parser and settings.
    let file = agent::settings::ConfigFile::parse(&read("config/agent.env")).unwrap();
    let settings =
        agent::settings::Settings::from_config(&file, Path::new("/var/lib/pype/agent/work")).unwrap();
    assert_eq!(settings.overlay_mode, "overlay");
    assert_eq!(settings.cache_size_bytes, 100 << 30);
    assert_eq!(file.values["PYPE_LABELS"], "partition=bigmem,site=hpc1");
    assert_eq!(file.values["PYPE_COORDINATOR"], "coordinator.example.org:7400");

    // The coordinator's environment file names only what the unit and the CLI read.
    let env = read("config/coordinator.env");
    let unit = read("systemd/pype-coordinator.service");
    for line in env.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
        let (k, v) = line.split_once('=').unwrap();
        assert!(!v.is_empty(), "{k} is empty");
        assert!(k == "PYPE_STATE_DIR" || unit.contains(&format!("${{{k}}}")), "{k} is used by nothing");
    }

    // The provider config, with the coordinator's loader.
    let cfg =
        coordinator::provision::provider::ProviderConfig::load(Some(&deploy().join("config/provider.toml")))
            .unwrap();
    assert_eq!(cfg.max_instances, 2);
    assert_eq!(cfg.qemu.image_dir, PathBuf::from("/var/cache/pype/images/bookworm"));
    assert!(matches!(cfg.agent, coordinator::provision::cloudinit::AgentDelivery::Download { .. }));

    // A typo in it is an error with its line.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("provider.toml");
    let text = read("config/provider.toml");
    let line = text.lines().position(|l| l.starts_with("max_instances")).unwrap() + 1;
    std::fs::write(&bad, text.replace("max_instances", "max_instance")).unwrap();
    let err = coordinator::provision::provider::ProviderConfig::load(Some(&bad)).unwrap_err().to_string();
    assert!(err.contains(&format!("provider.toml:{line}")) && err.contains("max_instance"), "{err}");
}

#[test]
fn slurm_batch_script_is_valid_and_execs_the_agent() {
    let path = deploy().join("slurm/pype-agent.sbatch");
    let text = std::fs::read_to_string(&path).unwrap();
    let out = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("#SBATCH --signal=B:TERM@120"));
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("exec \"$agent\" run")),
        "the agent must be exec'd"
    );

    // Without a coordinator it refuses at once, naming what is missing.
    let out = Command::new("bash").arg(&path).env_remove("PYPE_COORDINATOR").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PYPE_COORDINATOR"));

    // With one, it execs the agent binary it is given, with the job's name and instance id.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake-agent");
    std::fs::write(&fake, "#!/bin/sh\necho \"$@\"\necho \"scratch=$PYPE_OVERLAY_SCRATCH\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("bash")
        .arg(&path)
        .env("PYPE_COORDINATOR", "127.0.0.1:7400")
        .env("PYPE_AGENT_BIN", &fake)
        .env("SLURM_JOB_ID", "4242")
        .env("SLURM_CPUS_ON_NODE", "8")
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("run --name slurm-4242 --instance-id slurm-4242 --slots 8"), "{said}");
    assert!(said.contains(&format!("scratch={}/pype-scratch-4242", dir.path().display())), "{said}");

    // As the slurm provider submits it: named after the instance, the CA inline, the registry
    // fetched into the job's state dir.
    std::fs::write(&fake, "#!/bin/sh\necho \"$@\"\necho \"ca=$PYPE_CA reg=$PYPE_SNAPSHOT_REGISTRY\"\n")
        .unwrap();
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let out = Command::new("bash")
        .arg(&path)
        .env("PYPE_COORDINATOR", "127.0.0.1:7400")
        .env("PYPE_AGENT_BIN", &fake)
        .env("SLURM_JOB_ID", "4243")
        .env("PYPE_INSTANCE_ID", "pype-i-0123")
        .env("PYPE_SLOTS", "1")
        .env("PYPE_REGISTRY_FETCH", "1")
        .env("PYPE_CA_B64", base64_of(pem))
        .env_remove("PYPE_CA")
        .env_remove("PYPE_SNAPSHOT_REGISTRY")
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("run --name pype-i-0123 --instance-id pype-i-0123 --slots 1"), "{said}");
    let state = dir.path().join("pype-agent-4243");
    assert!(said.contains(&format!("ca={}/ca.pem", state.display())), "{said}");
    assert!(said.contains(&format!("reg={}/snapshot_registry.json", state.display())), "{said}");
    assert_eq!(std::fs::read_to_string(state.join("ca.pem")).unwrap(), pem);
}

fn base64_of(s: &str) -> String {
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn slurm_batch_script_runs_an_agent_that_leaves_cleanly_on_scancel_term() {
    let Some(slurm) = Slurm::start("slurm_batch_script_runs_an_agent_that_leaves_cleanly_on_scancel_term")
    else {
        return;
    };
    let fx = Cluster::new().serve();
    let (dir, bins, coord) = (&fx.dir, &fx.bins, fx.coord());
    let token = fx.token(&[]);
    let out = slurm
        .cmd("sbatch")
        .arg("--parsable")
        .arg(format!("--output={}/agent-%j.log", dir.path().display()))
        .arg(format!(
            "--export=ALL,PYPE_COORDINATOR={},PYPE_TOKEN={token},PYPE_CA={},PYPE_AGENT_BIN={},TMPDIR={}",
            coord.addr,
            coord.ca().display(),
            bins.agent.display(),
            dir.path().display()
        ))
        .arg(deploy().join("slurm/pype-agent.sbatch"))
        .output()
        .unwrap();
    assert!(out.status.success(), "sbatch: {}", String::from_utf8_lossy(&out.stderr));
    let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // The job is an agent: enrolled under the job's name, connected.
    coord.proc.wait_for(&["agent joined", &format!("slurm-{job}")], T);
    assert!(slurm.jobs().contains(&format!("{job} pype-agent RUNNING")), "{}", slurm.jobs());
    // TERM to the batch process (what --signal=B:TERM@120 sends before the time limit): the
    // agent leaves cleanly and the job ends.
    let st = slurm.cmd("scancel").args(["--batch", "--signal=TERM", &job]).status().unwrap();
    assert!(st.success());
    coord.proc.wait_for(&["agent left", &format!("slurm-{job}")], T);
    let deadline = std::time::Instant::now() + T;
    while slurm.jobs().contains(&job) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!slurm.jobs().contains(&job), "job still queued: {}", slurm.jobs());
    let log = std::fs::read_to_string(dir.path().join(format!("agent-{job}.log"))).unwrap();
    assert!(log.contains("drained"), "{log}");
}
