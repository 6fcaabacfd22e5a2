//! Agents enroll, connect, heartbeat, reconnect, get lost and leave: real processes.

use std::time::Duration;

use tests::{Agent, Cluster, Proc, Signal, T};

#[test]
fn enroll_connect_heartbeat_and_reconnect_after_restart() {
    let mut fx = Cluster::new().serve();
    let token = fx.token(&["--ttl", "10m", "--uses", "1"]);
    let agent_dir = fx.p("agent");
    let agent = fx.spawn_agent(Agent::named("node-a").dir(&agent_dir).token(&token));
    agent.wait_for(&["enrolled"], T);
    agent.wait_for(&["connected to coordinator"], T);
    fx.coord().proc.wait_for(&["agent joined", "node-a"], T);

    // Key and certificate stay on the agent, key readable by its owner only.
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(agent_dir.join("agent.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    for key in ["ca.key", "server.key", "admin.key"] {
        let mode = std::fs::metadata(fx.coord().state_dir.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }

    // `agents` lists it with its host facts and a recent heartbeat.
    let listing = fx.cli_ok(&["agents"]);
    let row = listing.lines().find(|l| l.starts_with("node-a")).unwrap_or_else(|| panic!("{listing}"));
    let last_hb_ms: u64 = row.split_whitespace().last().unwrap().trim_end_matches("ms").parse().unwrap();
    assert!(last_hb_ms < 3 * tests::HEARTBEAT_MS, "{row}");

    // Restart the coordinator on the same port: the agent reconnects with its certificate.
    let addr = fx.kill_coordinator(); // SIGKILL
    agent.wait_for(&["lost coordinator"], T);
    fx.start_coordinator(&addr.to_string());
    fx.coord().proc.wait_for(&["agent joined", "node-a"], T);
    agent.wait_for_nth(&["connected to coordinator"], 2, T);
    assert_eq!(agent.count(&["enrolled"]), 1, "agent enrolled twice");
    assert!(fx.cli_ok(&["agents"]).contains("node-a"));
}

/// The restarted coordinator keeps its stateless-reset secret (`reset.key`): the agent's next
/// heartbeat on its old connection is answered with a reset, and it reconnects at once instead
/// of after three silent heartbeat intervals (9 s here).
#[test]
fn a_restarted_coordinator_resets_the_connections_of_the_one_it_replaced() {
    let mut fx = Cluster::new().heartbeat_ms(3000).serve().agent(Agent::named("kept"));
    fx.coord().proc.wait_for(&["agent joined", "kept"], T);
    fx.agents[0].wait_for(&["connected to coordinator"], T); // it has its Welcome
    let addr = fx.kill_coordinator(); // SIGKILL: no CONNECTION_CLOSE reaches the agent
    fx.start_coordinator(&addr.to_string());
    fx.coord().proc.wait_for(&["agent joined", "kept"], T);
    let agent = &fx.agents[0];
    let line = agent.wait_for(&["lost coordinator"], T);
    assert!(line.contains("reset by peer"), "{line}\n{}", agent.dump());
    assert_eq!(agent.count(&["no answer from coordinator"]), 0, "{}", agent.dump());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(fx.state().join("reset.key")).unwrap().permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn silent_agent_is_lost_then_rejoins() {
    let fx = Cluster::new().serve().agent(Agent::named("sleepy"));
    let coord = &fx.coord().proc;
    let agent = &fx.agents[0];
    coord.wait_for(&["agent joined", "sleepy"], T);
    agent.signal(Signal::STOP);
    coord.wait_for(&["agent lost", "heartbeats missed", "sleepy"], T);
    assert!(!fx.cli_ok(&["agents"]).contains("sleepy"));
    agent.signal(Signal::CONT);
    coord.wait_for_nth(&["agent joined", "sleepy"], 2, T);
}

#[test]
fn sigterm_sends_going_away_and_exits_cleanly() {
    let mut fx = Cluster::new().serve().agent(Agent::named("leaver"));
    fx.coord().proc.wait_for(&["agent joined", "leaver"], T);
    fx.agents[0].signal(Signal::TERM);
    let status = fx.agents[0].wait_exit(T);
    assert!(status.success(), "agent exited with {status}\n{}", fx.agents[0].dump());
    fx.coord().proc.wait_for(&["agent left", "going away", "leaver"], T);
}

#[test]
fn agent_waits_for_a_coordinator_that_is_not_there_yet() {
    // Start once to create the CA and learn a free port, then stop.
    let mut fx = Cluster::new().serve().agent(Agent::named("early"));
    fx.coord().proc.wait_for(&["agent joined", "early"], T);
    let addr = fx.kill_coordinator();
    // Several failed attempts while nothing listens, with growing delays.
    fx.agents[0].wait_for_nth(&["cannot reach coordinator"], 2, Duration::from_secs(30));
    fx.start_coordinator(&addr.to_string());
    fx.coord().proc.wait_for(&["agent joined", "early"], T);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let fx = Cluster::new();
    let mut cmd = std::process::Command::new(&fx.bins.coordinator);
    cmd.args(["--log-format", "json", "--state-dir"]).arg(fx.state()).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
    ]);
    let proc = Proc::spawn("coordinator (json)", cmd);
    let line = proc.wait_for(&["coordinator listening"], T);
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    assert!(line.contains("\"level\":\"INFO\"") && line.contains("\"addr\":\"127.0.0.1:"), "{line}");
}

#[test]
fn step_run_ends_with_an_error_when_its_agent_is_lost() {
    let fx = Cluster::new().serve().agent(Agent::named("doomed"));
    fx.coord().proc.wait_for(&["agent joined", "doomed"], T);
    let file = fx.p("long.toml");
    std::fs::write(&file, "command = \"echo started; sleep 30\"\n").unwrap();
    let mut cmd = fx.command();
    cmd.args(["step", "run", "--agent", "doomed"]).arg(&file);
    let mut run = Proc::spawn("step run", cmd);
    fx.agents[0].wait_for(&["running snippet"], T);

    // The agent dies with the attempt: `step run` ends once the agent is lost, not never.
    fx.agents[0].signal(Signal::KILL);
    let status = run.wait_exit(T);
    assert!(!status.success(), "{}", run.dump());
    let lost = run.count(&["agent doomed was lost with attempt", "disconnected for more than"]);
    assert!(lost > 0, "{}", run.dump());
    fx.coord().proc.wait_for(&["step lost with its agent", "doomed"], T);
}
