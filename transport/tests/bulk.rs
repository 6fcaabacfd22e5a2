//! Bulk streams over a real QUIC connection on 127.0.0.1: the receiver accepts nothing whose
//! byte count or BLAKE3 digest disagrees with the trailer, and leaves nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use std::path::Path;

use protocol::{Compression, Trailer};
use transport::{endpoint, pki, tree};

async fn pair() -> (quinn::Endpoint, quinn::Connection, quinn::Connection) {
    let ca = pki::Ca::generate().unwrap();
    let server_ck = ca.issue_server(&["127.0.0.1".into()]).unwrap();
    let tuning = endpoint::Tuning::default();
    let tls = pki::server_tls(&ca.cert_key.cert_pem, &server_ck, &[b"test"]).unwrap();
    let server = endpoint::server("127.0.0.1:0".parse().unwrap(), tls, &tuning, rand::random()).unwrap();
    let addr = server.local_addr().unwrap();
    let client = endpoint::client(addr, &tuning).unwrap();
    let ctls = pki::client_tls(&ca.cert_key.cert_pem, None, b"test").unwrap();
    let connecting =
        client.connect_with(endpoint::client_config(ctls, &tuning).unwrap(), addr, "127.0.0.1").unwrap();
    let (c, s) = tokio::join!(connecting, async { server.accept().await.unwrap().await });
    (client, c.unwrap(), s.unwrap())
}

fn sample_tar(dir: &Path) -> Vec<u8> {
    std::fs::create_dir_all(dir.join("a/b")).unwrap();
    for i in 0..50 {
        std::fs::write(dir.join(format!("a/b/f{i}")), vec![i as u8; 10_000]).unwrap();
    }
    let mut out = Vec::new();
    tree::pack(dir, &mut out).unwrap();
    out
}

/// Sends `raw` as the whole stream, receives it into a destination holding a marker, and
/// returns the receiver's result and the destination listing.
async fn deliver(
    raw: Vec<u8>,
    reset: bool,
) -> (Result<protocol::TransferSummary, transport::BulkError>, Vec<String>) {
    let (_client_ep, client, server) = pair().await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("marker"), b"m").unwrap();
    let sender = tokio::spawn(async move {
        let mut send = client.open_uni().await.unwrap();
        send.write_all(&raw).await.unwrap();
        if reset {
            send.reset(7u32.into()).unwrap();
        } else {
            send.finish().unwrap();
            let _ = send.stopped().await;
        }
        client
    });
    let mut recv = server.accept_uni().await.unwrap();
    let result = transport::recv_tree(&mut recv, dest.clone(), Compression::None, Default::default()).await;
    let _client = sender.await.unwrap();
    let mut listing: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .chain(std::fs::read_dir(&dest).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listing.sort();
    (result, listing)
}

fn with_trailer(data: &[u8], bytes: u64, digest: [u8; 32]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.extend_from_slice(&Trailer { bytes, digest }.encode());
    v
}

#[tokio::test]
async fn digest_and_count_are_verified() {
    let src = tempfile::tempdir().unwrap();
    let tar = sample_tar(src.path());
    let good = *blake3::hash(&tar).as_bytes();

    let (ok, listing) = deliver(with_trailer(&tar, tar.len() as u64, good), false).await;
    let summary = ok.unwrap();
    assert_eq!(summary.entries, 52);
    assert_eq!(listing.len(), 2 + 1, "{listing:?}"); // dest, marker, a

    let mut bad_digest = good;
    bad_digest[0] ^= 1;
    let mut flipped = tar.clone();
    // Inside the first file's contents (after the headers of a/, a/b/ and a/b/f0).
    flipped[3 * 512 + 100] ^= 0x40;
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        ("wrong digest", with_trailer(&tar, tar.len() as u64, bad_digest), false, "digest does not match"),
        ("wrong count", with_trailer(&tar, tar.len() as u64 + 1, good), false, "trailer says"),
        ("flipped data byte", with_trailer(&flipped, tar.len() as u64, good), false, "digest does not match"),
        ("no trailer", tar[..tar.len() - 100].to_vec(), false, "without a valid trailer"),
        ("sender reset", tar[..tar.len() / 2].to_vec(), true, "stream error"),
    ];
    for (name, raw, reset, expect) in cases {
        eprintln!("case: {name}");
        let (result, listing) = tokio::time::timeout(std::time::Duration::from_secs(20), deliver(raw, reset))
            .await
            .unwrap_or_else(|_| panic!("{name}: transfer hung"));
        let err = result.expect_err(name).to_string();
        assert!(err.contains(expect), "{name}: {err}");
        assert_eq!(listing, vec!["dest", "marker"], "{name}: something stayed behind");
    }
}

#[tokio::test]
async fn send_and_receive_with_zstd() {
    let (_client_ep, client, server) = pair().await;
    let src = tempfile::tempdir().unwrap();
    sample_tar(src.path());
    let path = src.path().to_path_buf();
    let sender = tokio::spawn(async move {
        let mut send = client.open_uni().await.unwrap();
        let s = transport::send_tree(&mut send, path, Compression::Zstd { level: 3 }).await.unwrap();
        send.finish().unwrap();
        let _ = send.stopped().await;
        s
    });
    let dest = tempfile::tempdir().unwrap();
    let mut recv = server.accept_uni().await.unwrap();
    let got = transport::recv_tree(
        &mut recv,
        dest.path().join("out"),
        Compression::Zstd { level: 3 },
        Default::default(),
    )
    .await
    .unwrap();
    let sent = sender.await.unwrap();
    assert_eq!(got.wire_bytes, sent.wire_bytes);
    assert!(sent.wire_bytes < sent.content_bytes / 10, "zstd did not compress: {sent:?}");
    assert_eq!(std::fs::read(dest.path().join("out/a/b/f7")).unwrap(), vec![7u8; 10_000]);
}
