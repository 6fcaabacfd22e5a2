//! Agents enroll, connect, heartbeat, reconnect, get lost and leave: real processes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use std::time::Duration;

use tests::{Bins, Coord, T, start_agent};

fn bins() -> Bins {
    tests::bins!()
}

#[test]
fn enroll_connect_heartbeat_and_reconnect_after_restart() {
    let b = bins();
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coord::start(&b, &tmp.path().join("coord"), "127.0.0.1:0");
    let token = coord.token(&b, &["--ttl", "10m", "--uses", "1"]);
    let agent_dir = tmp.path().join("agent");
    let agent = start_agent(&b, &coord, &agent_dir, "node-a", Some(&token));
    agent.wait_for(&["enrolled"], T);
    agent.wait_for(&["connected to coordinator"], T);
    coord.proc.wait_for(&["agent joined", "node-a"], T);

    // Key and certificate stay on the agent, key readable by its owner only.
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(agent_dir.join("agent.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    for key in ["ca.key", "server.key", "admin.key"] {
        let mode = std::fs::metadata(coord.state_dir.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }

    // `agents` lists it with its host facts and a recent heartbeat.
    let listing = coord.cli_ok(&b, &["agents"]);
    let row = listing.lines().find(|l| l.starts_with("node-a")).unwrap_or_else(|| panic!("{listing}"));
    let last_hb_ms: u64 = row.split_whitespace().last().unwrap().trim_end_matches("ms").parse().unwrap();
    assert!(last_hb_ms < 3 * tests::HEARTBEAT_MS, "{row}");

    // Restart the coordinator on the same port: the agent reconnects with its certificate.
    let addr = coord.addr;
    let state_dir = coord.state_dir.clone();
    drop(coord); // SIGKILL
    agent.wait_for(&["lost coordinator"], T);
    let coord = Coord::start(&b, &state_dir, &addr.to_string());
    coord.proc.wait_for(&["agent joined", "node-a"], T);
    agent.wait_for_nth(&["connected to coordinator"], 2, T);
    assert_eq!(agent.count(&["enrolled"]), 1, "agent enrolled twice");
    assert!(coord.cli_ok(&b, &["agents"]).contains("node-a"));
}

#[test]
fn silent_agent_is_lost_then_rejoins() {
    let b = bins();
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coord::start(&b, &tmp.path().join("coord"), "127.0.0.1:0");
    let token = coord.token(&b, &[]);
    let agent = start_agent(&b, &coord, &tmp.path().join("agent"), "sleepy", Some(&token));
    coord.proc.wait_for(&["agent joined", "sleepy"], T);
    agent.signal(libc::SIGSTOP);
    coord.proc.wait_for(&["agent lost", "heartbeats missed", "sleepy"], T);
    assert!(!coord.cli_ok(&b, &["agents"]).contains("sleepy"));
    agent.signal(libc::SIGCONT);
    coord.proc.wait_for_nth(&["agent joined", "sleepy"], 2, T);
}

#[test]
fn sigterm_sends_going_away_and_exits_cleanly() {
    let b = bins();
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coord::start(&b, &tmp.path().join("coord"), "127.0.0.1:0");
    let token = coord.token(&b, &[]);
    let mut agent = start_agent(&b, &coord, &tmp.path().join("agent"), "leaver", Some(&token));
    coord.proc.wait_for(&["agent joined", "leaver"], T);
    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(T);
    assert!(status.success(), "agent exited with {status}\n{}", agent.dump());
    coord.proc.wait_for(&["agent left", "going away", "leaver"], T);
}

#[test]
fn agent_waits_for_a_coordinator_that_is_not_there_yet() {
    let b = bins();
    let tmp = tempfile::tempdir().unwrap();
    // Start once to create the CA and learn a free port, then stop.
    let coord = Coord::start(&b, &tmp.path().join("coord"), "127.0.0.1:0");
    let token = coord.token(&b, &[]);
    let agent = start_agent(&b, &coord, &tmp.path().join("agent"), "early", Some(&token));
    coord.proc.wait_for(&["agent joined", "early"], T);
    let (addr, dir) = (coord.addr, coord.state_dir.clone());
    drop(coord);
    // Several failed attempts while nothing listens, with growing delays.
    agent.wait_for_nth(&["cannot reach coordinator"], 2, Duration::from_secs(30));
    let coord = Coord::start(&b, &dir, &addr.to_string());
    coord.proc.wait_for(&["agent joined", "early"], T);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let b = bins();
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(&b.coordinator);
    cmd.args(["--log-format", "json", "--state-dir"]).arg(tmp.path()).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
    ]);
    let proc = tests::Proc::spawn("coordinator (json)", cmd);
    let line = proc.wait_for(&["coordinator listening"], T);
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    assert!(line.contains("\"level\":\"INFO\"") && line.contains("\"addr\":\"127.0.0.1:"), "{line}");
}
