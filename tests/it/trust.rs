//! The coordinator refuses every untrusted peer before any application message, logs one line
//! saying why, and keeps serving the agents it trusts.

use std::time::Duration;

use protocol::AgentToCoordinator;
use tests::{Agent, Cluster, T, closed_reason, connect, hello};
use transport::{framed, pki};

fn state_ca(fx: &Cluster) -> pki::Ca {
    let ck = pki::CertKey::load(&fx.state(), "ca").unwrap().unwrap();
    pki::Ca::from_cert_key(ck).unwrap()
}

/// A coordinator, its CA certificate, and one well-behaved agent (`fx.agents[0]`) that every
/// test checks is never disturbed by what the others do.
fn coordinator_with_healthy_agent() -> (Cluster, String) {
    coordinator_with_healthy_agent_at(tests::HEARTBEAT_MS)
}

fn coordinator_with_healthy_agent_at(heartbeat_ms: u64) -> (Cluster, String) {
    let fx = Cluster::new().heartbeat_ms(heartbeat_ms).serve().agent(Agent::named("healthy"));
    let ca_pem = std::fs::read_to_string(fx.coord().ca()).unwrap();
    fx.coord().proc.wait_for(&["agent joined", "healthy"], T);
    (fx, ca_pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_peers_are_refused_and_others_keep_working() {
    let (fx, ca_pem) = coordinator_with_healthy_agent();
    let coord = fx.coord();

    // No client certificate.
    let conn = connect(coord.addr, &ca_pem, None, protocol::ALPN_AGENT).await.unwrap();
    let reason = closed_reason(&conn, T).await;
    assert!(reason.contains("no client certificate"), "{reason}");
    coord.proc.wait_for(&["refused connection", "no client certificate"], T);
    // Nor on the admin protocol.
    let conn = connect(coord.addr, &ca_pem, None, protocol::ALPN_ADMIN).await.unwrap();
    let reason = closed_reason(&conn, T).await;
    assert!(reason.contains("no client certificate"), "{reason}");

    // A certificate from another CA fails the TLS handshake.
    let other_ca = pki::Ca::generate().unwrap();
    let forged = other_ca.issue_client("healthy", 30).unwrap();
    let r = connect(coord.addr, &ca_pem, Some(&forged), protocol::ALPN_AGENT).await;
    if let Ok(conn) = r {
        let reason = closed_reason(&conn, T).await;
        assert!(!reason.contains("still open"), "{reason}");
    }
    coord.proc.wait_for(&["refused connection", "TLS handshake failed", "UnknownIssuer"], T);

    // An expired certificate from the right CA.
    let ca = state_ca(&fx);
    let expired = ca.issue_expired_client("healthy").unwrap();
    if let Ok(conn) = connect(coord.addr, &ca_pem, Some(&expired), protocol::ALPN_AGENT).await {
        assert!(!closed_reason(&conn, T).await.contains("still open"));
    }
    coord.proc.wait_for(&["refused connection", "TLS handshake failed", "certificate expired"], T);

    // A valid certificate from the right CA that enrollment never issued.
    let stray = ca.issue_client("healthy", 30).unwrap();
    let conn = connect(coord.addr, &ca_pem, Some(&stray), protocol::ALPN_AGENT).await.unwrap();
    let reason = closed_reason(&conn, T).await;
    assert!(reason.contains("not issued to any enrolled agent"), "{reason}");

    // An agent certificate is not an admin certificate.
    let me = fx.enroll_identity("prober").await;
    let conn = connect(coord.addr, &ca_pem, Some(&me.cert), protocol::ALPN_ADMIN).await.unwrap();
    let reason = closed_reason(&conn, T).await;
    assert!(reason.contains("not allowed on this protocol"), "{reason}");

    // Another major version: the ALPN does not match, the handshake fails on both sides.
    let err = connect(coord.addr, &ca_pem, Some(&me.cert), b"pype/2").await.unwrap_err();
    assert!(format!("{err:#}").to_lowercase().contains("protocol"), "{err:#}");
    coord.proc.wait_for(&["refused connection", "protocol version mismatch", "does not speak pype/1"], T);

    // A Hello claiming another major version, or another agent's id.
    let mismatch = format!(
        "protocol version mismatch: coordinator speaks {}.{}, agent speaks 2.{}",
        protocol::PROTOCOL_MAJOR,
        protocol::PROTOCOL_MINOR,
        protocol::PROTOCOL_MINOR
    );
    // An agent of before manifests and blobs (minor 4) is told to upgrade.
    let old = format!("agent speaks protocol 1.4, this coordinator needs 1.{}", protocol::OLDEST_AGENT_MINOR);
    for (msg, expect) in [
        (hello("prober", 2), mismatch.as_str()),
        (tests::hello_minor("prober", 1, 4), old.as_str()),
        (hello("healthy", 1), "certificate belongs to prober"),
    ] {
        let conn = connect(coord.addr, &ca_pem, Some(&me.cert), protocol::ALPN_AGENT).await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        framed::write_frame(&mut send, &msg).await.unwrap();
        let reason = closed_reason(&conn, T).await;
        assert!(reason.contains(expect), "expected {expect:?}, got {reason}");
        coord.proc.wait_for(&["refused connection", expect], T);
    }

    // Tokens: used up, expired, unknown.
    let once = fx.token(&["--uses", "1"]);
    let mut first = fx.spawn_agent(Agent::named("t1").token(&once));
    first.wait_for(&["connected to coordinator"], T);
    let mut second = fx.spawn_agent(Agent::named("t2").token(&once));
    assert!(!second.wait_exit(T).success());
    second.wait_for(&["enrollment refused", "enrollment token used up"], T);
    coord.proc.wait_for(&["refused enrollment", "used up"], T);
    let stale = fx.token(&["--ttl", "0s"]);
    let mut third = fx.spawn_agent(Agent::named("t3").token(&stale));
    assert!(!third.wait_exit(T).success());
    third.wait_for(&["enrollment token expired"], T);
    let mut fourth = fx.spawn_agent(Agent::named("t4").token("pype1.0000"));
    assert!(!fourth.wait_exit(T).success());
    fourth.wait_for(&["unknown enrollment token"], T);
    assert!(!fx.p("t2/agent.key").exists(), "refused agent kept a certificate");

    // Revocation: the connected agent is cut off and cannot come back.
    fx.cli_ok(&["agent", "revoke", "t1"]);
    assert!(!first.wait_exit(T).success());
    first.wait_for(&["revoked"], T);
    coord.proc.wait_for(&["closing connection of revoked agent", "t1"], T);
    let mut again = fx.spawn_agent(Agent::named("t1").enrolled());
    assert!(!again.wait_exit(T).success());
    coord.proc.wait_for(&["refused connection", "certificate of agent t1 is revoked"], T);

    // Through all of this the healthy agent stayed connected and heartbeating.
    assert_eq!(coord.proc.count(&["agent joined", "healthy"]), 1);
    assert_eq!(coord.proc.count(&["agent left", "healthy"]), 0);
    let listing = fx.cli_ok(&["agents"]);
    assert!(listing.contains("healthy"), "{listing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_truncated_control_frames() {
    let (fx, ca_pem) = coordinator_with_healthy_agent();
    let coord = fx.coord();
    let me = fx.enroll_identity("fuzzer").await;

    let valid_hello = protocol::codec::encode(&hello("fuzzer", 1)).unwrap();
    let mut rng = tests::Rng(0x5EED_1234_ABCD_0001);
    let cases = 300;
    for case in 0..cases {
        let bytes: Vec<u8> = match case % 6 {
            // Pure noise.
            0 => {
                let mut v = vec![0u8; (rng.next_u64() % 200) as usize + 1];
                rng.fill(&mut v);
                v
            }
            // A Hello cut short.
            1 => valid_hello[..(rng.next_u64() as usize % (valid_hello.len() - 1)) + 1].to_vec(),
            // A Hello with a flipped byte in its payload.
            2 => {
                let mut v = valid_hello.clone();
                let i = 4 + rng.next_u64() as usize % (v.len() - 4);
                v[i] ^= (rng.next_u64() as u8) | 1;
                v
            }
            // A length prefix far over the limit.
            3 => {
                let mut v = (u32::MAX - (rng.next_u64() as u32 % 1000)).to_be_bytes().to_vec();
                v.extend_from_slice(&[0; 16]);
                v
            }
            // A Hello followed by garbage in place of heartbeats.
            4 => {
                let mut v = valid_hello.clone();
                let mut g = vec![0u8; 32];
                rng.fill(&mut g);
                v.extend_from_slice(&g);
                v
            }
            // A zero-length frame.
            _ => vec![0, 0, 0, 0],
        };
        let conn = connect(coord.addr, &ca_pem, Some(&me.cert), protocol::ALPN_AGENT).await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let _ = tokio::io::AsyncWriteExt::write_all(&mut send, &bytes).await;
        let _ = send.finish();
        let reason = closed_reason(&conn, Duration::from_secs(15)).await;
        assert!(!reason.contains("still open"), "case {case}: connection left open after {bytes:02x?}");
        conn.close(0u32.into(), b"");
    }

    // The coordinator is still up and the healthy agent never noticed.
    assert_eq!(coord.proc.count(&["agent left", "healthy"]), 0);
    assert!(fx.cli_ok(&["agents"]).contains("healthy"));
    let src = fx.p("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"still works").unwrap();
    let dest = fx.p("dest");
    fx.cli_ok(&["push", "healthy", src.to_str().unwrap(), dest.to_str().unwrap()]);
    assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"still works");
}

async fn next_frame(recv: &mut quinn::RecvStream) -> protocol::CoordinatorToAgent {
    let frame = framed::read_frame::<protocol::CoordinatorToAgent, _>(recv);
    tokio::time::timeout(T, frame).await.expect("no frame from the coordinator").unwrap().unwrap()
}

/// A frame from the agent that arrives in pieces, with the coordinator sending to the agent
/// between them, is read whole: the control loop never drops half a frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_split_around_a_coordinator_send_is_read_whole() {
    use protocol::{CoordinatorToAgent, Heartbeat};
    // Heartbeats every 2 s: the coordinator waits 6 s for a frame, time enough for the
    // drain command below while our half frame blocks the stream.
    let (fx, ca_pem) = coordinator_with_healthy_agent_at(2000);
    let coord = fx.coord();
    let me = fx.enroll_identity("slowpoke").await;
    let conn = connect(coord.addr, &ca_pem, Some(&me.cert), protocol::ALPN_AGENT).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    framed::write_frame(&mut send, &hello("slowpoke", protocol::PROTOCOL_MAJOR)).await.unwrap();
    assert!(matches!(next_frame(&mut recv).await, CoordinatorToAgent::Welcome(_)));
    coord.proc.wait_for(&["agent joined", "slowpoke"], T);
    let heartbeat = |seq| {
        protocol::codec::encode(&AgentToCoordinator::Heartbeat(Heartbeat {
            seq,
            memory_available_bytes: 1 << 30,
            work_dir_free_bytes: 1 << 30,
            load_average: 0.5,
        }))
        .unwrap()
    };
    let first = heartbeat(1);
    let cut = first.len() / 2;
    send.write_all(&first[..cut]).await.unwrap();
    // While that half waits in the coordinator's reader, the coordinator sends us a Drain.
    let mut drain = fx.command();
    drain.args(["agent", "drain", "slowpoke"]);
    let drained = tokio::task::spawn_blocking(move || drain.output().unwrap()).await.unwrap();
    assert!(drained.status.success(), "{}", String::from_utf8_lossy(&drained.stderr));
    assert!(matches!(next_frame(&mut recv).await, CoordinatorToAgent::Drain { .. }));
    // Then the rest of the frame, and a whole one: both are acknowledged in order.
    send.write_all(&first[cut..]).await.unwrap();
    send.write_all(&heartbeat(2)).await.unwrap();
    for want in [1, 2] {
        match next_frame(&mut recv).await {
            CoordinatorToAgent::HeartbeatAck { seq } => assert_eq!(seq, want),
            other => panic!("expected the ack of heartbeat {want}, got {other:?}"),
        }
    }
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    assert_eq!(coord.proc.count(&["slowpoke", "malformed"]), 0, "{}", coord.proc.dump());
    assert_eq!(coord.proc.count(&["agent left", "healthy"]), 0);
    conn.close(0u32.into(), b"");
}
