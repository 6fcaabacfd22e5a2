//! Pins the encoded bytes of `Hello`: if this test fails, the wire format changed and old
//! agents can no longer talk to new coordinators. Bump `PROTOCOL_MAJOR` instead of editing it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use protocol::{AgentToCoordinator, Hello, HostFacts, codec};

fn sample_hello() -> AgentToCoordinator {
    AgentToCoordinator::Hello(Hello {
        protocol_major: 1,
        protocol_minor: 0,
        agent_version: "0.1.0".into(),
        agent_id: "a1".into(),
        host: HostFacts {
            hostname: "h".into(),
            os: "L".into(),
            cpus: 2,
            memory_total_bytes: 1024,
            memory_available_bytes: 512,
            work_dir: "/w".into(),
            work_dir_free_bytes: 4096,
        },
        labels: vec![("k".into(), "v".into())],
        slots: 1,
        instance_id: None,
    })
}

#[test]
fn hello_bytes_are_pinned() {
    let frame = codec::encode(&sample_hello()).unwrap();
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    let expected = concat!(
        "0000007a", // frame length (122)
        "00000000", // variant 0: Hello
        "01000000",
        "00000000", // protocol_major, protocol_minor
        "0500000000000000",
        "302e312e30", // agent_version "0.1.0"
        "0200000000000000",
        "6131", // agent_id "a1"
        "0100000000000000",
        "68", // hostname "h"
        "0100000000000000",
        "4c",       // os "L"
        "02000000", // cpus
        "0004000000000000",
        "0002000000000000", // memory total / available
        "0200000000000000",
        "2f77",             // work_dir "/w"
        "0010000000000000", // work_dir_free_bytes
        "0100000000000000",
        "0100000000000000",
        "6b",
        "0100000000000000",
        "76",       // labels
        "01000000", // slots
        "00",       // instance_id: None
    );
    assert_eq!(hex, expected);
    let back: AgentToCoordinator = codec::decode_frame(&frame).unwrap();
    assert_eq!(back, sample_hello());
}

#[test]
fn oversized_length_is_refused_before_allocation() {
    let err = codec::payload_len([0xff, 0xff, 0xff, 0xff], codec::MAX_FRAME_LEN).unwrap_err();
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
}

#[test]
fn hostile_inner_length_does_not_allocate() {
    // variant 0 (Hello), then protocol versions, then a string claiming 2^62 bytes.
    let mut payload = vec![0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    payload.extend_from_slice(&(1u64 << 62).to_le_bytes());
    let err = codec::decode::<AgentToCoordinator>(&payload).unwrap_err();
    assert!(matches!(err, codec::CodecError::Malformed(_)), "{err}");
}

#[test]
fn random_payloads_never_panic() {
    // A small xorshift generator keeps this deterministic without a dependency.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for len in 0..2000usize {
        let mut buf = Vec::with_capacity(len % 300);
        for _ in 0..(len % 300) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            buf.push(state as u8);
        }
        let _ = codec::decode::<AgentToCoordinator>(&buf);
        let _ = codec::decode::<protocol::BulkRequest>(&buf);
    }
}

#[test]
fn trailing_bytes_are_refused() {
    let mut frame = codec::encode(&AgentToCoordinator::GoingAway { reason: "x".into() }).unwrap();
    frame.push(0);
    let len = frame.len() - 4;
    frame[..4].copy_from_slice(&(len as u32).to_be_bytes());
    assert!(codec::decode_frame::<AgentToCoordinator>(&frame).is_err());
}
