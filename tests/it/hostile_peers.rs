//! Hostile peers through the real binaries: a second enrolled agent forging another agent's
//! results is refused and changes nothing; results for attempts nobody waits for are bounded
//! in bytes.

use std::process::Command;
use std::time::Duration;

use protocol::{AgentToCoordinator, RegistryEntry, StepExit, StepOutcome};
use tests::{Agent, Cluster, LONG, Proc, Signal, T, connect, hello, keep_alive};
use transport::framed;

/// Waits for a log line without holding up the runtime's other tasks.
fn wait_for(p: &Proc, needles: &[&str], timeout: Duration) -> String {
    tokio::task::block_in_place(|| p.wait_for(needles, timeout))
}

fn forged(attempt_id: u64, path: &str, entries: usize) -> StepOutcome {
    let mut new_entries = vec![(
        path.to_string(),
        RegistryEntry {
            snapshot_id: "snap-f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0".into(),
            in_snapshot_path: path.trim_start_matches('/').into(),
            bind_path: None,
            produced_by: None,
        },
    )];
    for i in 0..entries {
        new_entries.push((
            format!("/forged/{i:0200}"),
            RegistryEntry {
                snapshot_id: "snap-f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0".into(),
                in_snapshot_path: format!("forged/{i:0200}"),
                bind_path: None,
                produced_by: None,
            },
        ));
    }
    StepOutcome {
        attempt_id,
        exit: StepExit::Exited(0),
        error: None,
        backend: "snapshot".into(),
        outputs: vec![(path.to_string(), Some(6))],
        new_entries,
        elapsed_ms: 1,
    }
}

/// Point 7: agent `forger`, enrolled like any other, sends start, output lines and a
/// successful result for the attempt the coordinator dispatched to agent `honest`. Each kind
/// is refused and logged once with both agent ids, however often it comes; the run goes on,
/// takes `honest`'s real result, and the registry names `honest`'s snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_results_for_another_agents_attempt_are_refused() {
    let fx = Cluster::new().serve();
    let d = fx.d();
    let coord = fx.coord();
    let reg = fx.pstr("honest/registry.json");
    let _honest = fx.spawn_agent(
        Agent::named("honest").env("PYPE_OVERLAY_MODE", "snapshot").env("PYPE_SNAPSHOT_REGISTRY", &reg),
    );
    wait_for(&coord.proc, &["agent joined", "honest"], T);
    let forger = fx.enroll_identity("forger").await;
    let _ = &forger;

    let out = format!("{d}/out.txt");
    let pipeline = fx.pipeline(
        "p.toml",
        &format!(
            "name = \"victim\"\n[[steps]]\nname = \"slow\"\n\
             command = \"sleep 3; echo honest > {out}\"\noutputs = [\"{out}\"]\n"
        ),
    );
    let mut cmd = fx.command();
    cmd.arg("run").arg("--coordinator").arg(coord.addr.to_string()).arg(&pipeline);
    let mut run = Proc::spawn("run", cmd);
    let line = wait_for(&coord.proc, &["step dispatched", "agent=\"honest\""], LONG);
    let attempt: u64 =
        line.split("attempt=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();

    // The forger connects as itself and speaks for the honest agent's attempt, twice over.
    let ca_pem = std::fs::read_to_string(coord.ca()).unwrap();
    let conn = connect(coord.addr, &ca_pem, Some(&forger.cert), protocol::ALPN_AGENT).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    framed::write_frame(&mut send, &hello("forger", protocol::PROTOCOL_MAJOR)).await.unwrap();
    wait_for(&coord.proc, &["agent joined", "forger"], T);
    for _ in 0..2 {
        let started = AgentToCoordinator::StepStarted {
            attempt_id: attempt,
            backend: "forged".into(),
            view: "forged".into(),
        };
        framed::write_frame(&mut send, &started).await.unwrap();
        let lines = AgentToCoordinator::StepOutput {
            attempt_id: attempt,
            lines: vec![protocol::LogLine {
                stream: protocol::OutputStream::Stdout,
                line: "FORGED LINE".into(),
            }],
        };
        framed::write_frame(&mut send, &lines).await.unwrap();
        framed::write_frame(&mut send, &AgentToCoordinator::StepFinished(forged(attempt, &out, 0)))
            .await
            .unwrap();
    }
    let _alive = keep_alive(send);
    let refusal = wait_for(&coord.proc, &["refused a result from agent forger", &attempt.to_string()], T);
    assert!(refusal.contains("which agent honest holds"), "{refusal}");
    wait_for(&coord.proc, &["refused step events from agent forger", "which agent honest holds"], T);

    // The run ends on the honest result.
    let status = tokio::task::block_in_place(|| run.wait_exit(LONG));
    assert!(status.success(), "{}\n{}", run.dump(), coord.proc.dump());
    assert_eq!(coord.proc.count(&["refused a result from agent forger"]), 1, "{}", coord.proc.dump());
    assert_eq!(coord.proc.count(&["refused step events from agent forger"]), 1, "{}", coord.proc.dump());
    assert_eq!(run.count(&["FORGED"]), 0, "{}", run.dump());
    assert_eq!(run.count(&["step started", "forged"]), 0, "{}", run.dump());
    let reg = tokio::task::block_in_place(|| fx.cli_ok(&["registry", "get", &out]));
    let v: serde_json::Value = serde_json::from_str(&reg).unwrap();
    let e = &v[out.as_str()];
    assert_ne!(e["snapshot_id"], "snap-f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0", "{reg}");
    assert_eq!(e["produced_by"]["attempt"].as_u64(), Some(attempt), "{reg}");
    // The honest agent's bytes are what the store holds for it.
    let id = e["snapshot_id"].as_str().unwrap();
    let held = tests::snapshot_file(&fx.state(), id, "out.txt");
    assert!(held.windows(7).any(|w| w == b"honest\n"), "{id} does not hold the honest output");
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib << 10
}

/// Point 8: an enrolled agent sending ~100 MiB of results for attempts no run dispatched
/// (each frame under the limit) gets them refused, one log line for all of them; none is
/// kept, and the coordinator's memory does not grow with them. (Results of real attempts
/// nobody waits for yet are kept within a byte bound, oldest evicted first: the unit tests
/// of `coordinator::hub::unclaimed`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_for_attempts_no_run_dispatched_are_refused_without_growing_memory() {
    let fx = Cluster::new().serve();
    let coord = fx.coord();
    let forger = fx.enroll_identity("flooder").await;
    let ca_pem = std::fs::read_to_string(coord.ca()).unwrap();
    let conn = connect(coord.addr, &ca_pem, Some(&forger.cert), protocol::ALPN_AGENT).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    framed::write_frame(&mut send, &hello("flooder", protocol::PROTOCOL_MAJOR)).await.unwrap();
    wait_for(&coord.proc, &["agent joined", "flooder"], T);
    let before = rss(coord.proc.child.id());
    // ~900 KiB each.
    let one = forged(1, "/x", 1900);
    let frame = protocol::codec::encode(&AgentToCoordinator::StepFinished(one.clone())).unwrap();
    assert!(frame.len() > 800 << 10 && frame.len() < 1 << 20, "{}", frame.len());
    let n = 110;
    for i in 0..n {
        let mut o = one.clone();
        o.attempt_id = 1000 + i;
        framed::write_frame(&mut send, &AgentToCoordinator::StepFinished(o)).await.unwrap();
    }
    // A heartbeat after the flood: once it is answered, every result was read.
    let hb = AgentToCoordinator::Heartbeat(protocol::Heartbeat {
        seq: 77,
        memory_available_bytes: 1 << 30,
        work_dir_free_bytes: 1 << 30,
        load_average: 0.0,
    });
    framed::write_frame(&mut send, &hb).await.unwrap();
    let _alive = keep_alive(send);
    let acked = tokio::time::timeout(T, async {
        loop {
            match framed::read_frame::<protocol::CoordinatorToAgent, _>(&mut recv).await {
                Ok(Some(protocol::CoordinatorToAgent::HeartbeatAck { seq: 77 })) => return true,
                Ok(Some(_)) => {}
                _ => return false,
            }
        }
    })
    .await;
    assert_eq!(acked, Ok(true), "the flood was not read through\n{}", coord.proc.dump());
    wait_for(
        &coord.proc,
        &["refused results from agent flooder for attempts no run dispatched", "first: 1000"],
        T,
    );
    let agents = tokio::task::block_in_place(|| fx.cli_ok(&["agents"]));
    assert!(agents.contains("flooder"), "{agents}");
    let after = rss(coord.proc.child.id());
    assert_eq!(coord.proc.count(&["refused results from agent flooder"]), 1, "{}", coord.proc.dump());
    assert_eq!(coord.proc.count(&["keeping the result"]), 0, "{}", coord.proc.dump());
    let grown = after.saturating_sub(before);
    assert!(
        grown < 48 << 20,
        "the coordinator grew by {} MiB for {} MiB of refused results",
        grown >> 20,
        (frame.len() * n as usize) >> 20
    );
}

/// Seconds since midnight of a log line's timestamp (`2026-12-01T23:44:38.677523Z ...`).
fn at(line: &str) -> f64 {
    let t = line.split('T').nth(1).and_then(|r| r.split('Z').next()).unwrap();
    let p: Vec<f64> = t.split(':').map(|x| x.parse().unwrap()).collect();
    p[0] * 3600.0 + p[1] * 60.0 + p[2]
}

/// Point 9: an agent whose certificate the coordinator refuses at the TLS handshake (here:
/// expired) is logged by the coordinator once per address and reason per minute, however
/// often it retries; the agent says why and waits its longest retry interval (500 ms here)
/// between attempts from the first refusal on, instead of reconnecting at full rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_certificate_is_logged_once_and_its_agent_backs_off() {
    let fx = Cluster::new().serve();
    let coord = fx.coord();
    let dir = fx.p("stale");
    let mut first = fx.spawn_agent(Agent::named("stale"));
    wait_for(&coord.proc, &["agent joined", "stale"], T);
    first.signal(Signal::KILL);
    tokio::task::block_in_place(|| first.wait_exit(T));
    // Its certificate is replaced by an expired one from the same CA.
    let ca =
        transport::pki::Ca::from_cert_key(transport::pki::CertKey::load(&fx.state(), "ca").unwrap().unwrap())
            .unwrap();
    ca.issue_expired_client("stale").unwrap().save(&dir, "agent").unwrap();
    let again = fx.spawn_agent(Agent::named("stale").enrolled());
    let fourth = wait_for_nth(&again, &["refused this agent's certificate"], 4, T);
    let refusals: Vec<String> = tokio::task::block_in_place(|| {
        (1..=4).map(|n| again.wait_for_nth(&["refused this agent's certificate"], n, T)).collect()
    });
    assert_eq!(refusals[3], fourth);
    for (i, line) in refusals.iter().enumerate() {
        assert!(line.contains("retry_ms=500"), "{line}");
        if i > 0 {
            let gap = at(line) - at(&refusals[i - 1]);
            assert!(gap >= 0.45, "attempt {i} came {gap:.3}s after the previous one\n{}", again.dump());
        }
    }
    // Four refusals, one line in the coordinator's log.
    let lines = coord.proc.count(&["refused connection", "TLS handshake failed", "expired"]);
    assert_eq!(lines, 1, "{}", coord.proc.dump());
}

fn wait_for_nth(p: &Proc, needles: &[&str], n: usize, timeout: Duration) -> String {
    tokio::task::block_in_place(|| p.wait_for_nth(needles, n, timeout))
}

/// Point 9: when an agent refuses a transfer, its reason comes back as a `RemoteError`: the
/// CLI prints it and the coordinator logs it, for a `pull` (a fifo in the tree: refused before
/// any byte is sent) and a `push` (a destination the agent cannot write), instead of a stream
/// reset by the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_refusals_reach_the_operator() {
    let fx = Cluster::new().serve().agent(Agent::named("refuser"));
    let coord = fx.coord();
    wait_for(&coord.proc, &["agent joined", "refuser"], T);

    let tree = fx.p("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("ok.txt"), "fine\n").unwrap();
    let fifo = tree.join("pipe");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let dest = fx.p("pulled");
    let (ok, out, err) = tokio::task::block_in_place(|| {
        fx.cli(&["pull", "refuser", tree.to_str().unwrap(), dest.to_str().unwrap()])
    });
    assert!(!ok, "{out}{err}");
    let want = format!("agent refuser refused to send {}", tree.display());
    assert!(err.contains(&want) && err.contains("device, fifo or socket cannot be packed"), "{err}");
    assert!(!err.contains("reset"), "{err}");
    assert!(!dest.exists(), "a refused pull left {}", dest.display());
    wait_for(&coord.proc, &["agent refused a pull", "device, fifo or socket"], T);

    let src = fx.p("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f.txt"), vec![7u8; 4 << 20]).unwrap();
    let (ok, out, err) = tokio::task::block_in_place(|| {
        fx.cli(&["push", "refuser", src.to_str().unwrap(), "/proc/pype-no-such-dir/dest"])
    });
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains("agent refuser refused the transfer") && err.contains("/proc/pype-no-such-dir"),
        "{err}"
    );
    assert!(!err.contains("reset") && !err.contains("stopped"), "{err}");
    wait_for(&coord.proc, &["agent refused a push", "/proc/pype-no-such-dir"], T);
}

/// An agent that says it holds more attempts than any agent can is cut off with the reason, and
/// the list is not kept (it would be copied and searched on every look at the agents).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_hand_report_longer_than_any_agent_holds_closes_the_connection() {
    let fx = Cluster::new().serve();
    let coord = fx.coord();
    let liar = fx.enroll_identity("hoarder").await;
    let ca_pem = std::fs::read_to_string(coord.ca()).unwrap();
    let conn = connect(coord.addr, &ca_pem, Some(&liar.cert), protocol::ALPN_AGENT).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    framed::write_frame(&mut send, &hello("hoarder", protocol::PROTOCOL_MAJOR)).await.unwrap();
    wait_for(&coord.proc, &["agent joined", "hoarder"], T);
    let attempts: Vec<u64> = (1..=100_000).collect();
    framed::write_frame(&mut send, &AgentToCoordinator::InHand { attempts }).await.unwrap();
    let reason = tests::closed_reason(&conn, T).await;
    assert!(reason.contains("InHand lists 100000 attempts, more than the 65536"), "{reason}");
    wait_for(&coord.proc, &["agent left", "hoarder", "InHand lists 100000 attempts"], T);
}
