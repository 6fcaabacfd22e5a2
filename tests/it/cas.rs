//! Content-addressed transfers against a real coordinator, spoken by a hand-made enrolled
//! agent: hostile manifests and blobs are refused with a clear error and commit nothing while
//! other transfers go on; a store broken off half way resumes from the blobs already
//! committed; a fetch asks only for what it lacks.

use std::path::Path;
use std::time::Duration;

use protocol::{SnapshotReply, SnapshotRequest};
use tests::{Cluster, T, connect, hello, keep_alive};
use transport::cas::{self, Chunk, Entry, Manifest};
use transport::tree::EntryKind;
use transport::{blobwire, framed};

fn wait_for(p: &tests::Proc, needles: &[&str], timeout: Duration) -> String {
    tokio::task::block_in_place(|| p.wait_for(needles, timeout))
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    tests::Rng(seed).fill(&mut v);
    v
}

fn file(path: &str, data: &[u8]) -> (Entry, Chunk) {
    let c = Chunk { digest: *blake3::hash(data).as_bytes(), len: data.len() as u64 };
    let e = Entry {
        path: path.into(),
        kind: EntryKind::File,
        mode: 0o644,
        mtime: 1,
        size: data.len() as u64,
        target: None,
        chunks: vec![c],
    };
    (e, c)
}

fn dir(path: &str) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::Dir,
        mode: 0o755,
        mtime: 1,
        size: 0,
        target: None,
        chunks: vec![],
    }
}

/// What a store exchange came to: the digests the coordinator asked for and its last answer.
struct Stored {
    missing: Vec<[u8; 32]>,
    reply: Option<SnapshotReply>,
}

/// Sends `manifest_bytes` as `StoreManifest`, then for each asked-for digest what `send`
/// returns for it (`None`: skip it), then `extra` records, then the end record.
async fn store(
    conn: &quinn::Connection,
    manifest_bytes: &[u8],
    send_blob: impl Fn(&[u8; 32]) -> Option<(Chunk, u8, Vec<u8>)>,
    end: bool,
) -> Stored {
    store_then(conn, manifest_bytes, send_blob, end, || {}).await
}

/// Like [`store`]; when not `end`, `before_reset` runs before the stream is reset.
async fn store_then(
    conn: &quinn::Connection,
    manifest_bytes: &[u8],
    send_blob: impl Fn(&[u8; 32]) -> Option<(Chunk, u8, Vec<u8>)>,
    end: bool,
    before_reset: impl FnOnce(),
) -> Stored {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let req = SnapshotRequest::StoreManifest { bytes: manifest_bytes.len() as u64 };
    framed::write_frame(&mut send, &req).await.unwrap();
    send.write_all(manifest_bytes).await.unwrap();
    let mut missing = Vec::new();
    loop {
        match framed::read_frame::<SnapshotReply, _>(&mut recv).await.unwrap() {
            Some(SnapshotReply::Missing { digests, done }) => {
                missing.extend(digests);
                if done {
                    break;
                }
            }
            other => return Stored { missing, reply: other },
        }
    }
    for d in &missing {
        if let Some((c, enc, payload)) = send_blob(d) {
            blobwire::write_blob(&mut send, &c, enc, &payload).await.unwrap();
        }
    }
    if !end {
        // Broken off: the stream is reset, as a lost connection would.
        tokio::task::block_in_place(before_reset);
        let _ = send.reset(0u32.into());
        return Stored { missing, reply: None };
    }
    blobwire::write_end(&mut send).await.unwrap();
    let _ = send.finish();
    let reply = framed::read_frame::<SnapshotReply, _>(&mut recv).await.unwrap();
    Stored { missing, reply }
}

fn refusal(s: &Stored) -> String {
    match &s.reply {
        Some(SnapshotReply::Error(e)) => e.message.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn committed(state: &Path) -> usize {
    std::fs::read_dir(state.join("snapshots"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".manifest"))
        .count()
}

async fn mallory(fx: &Cluster) -> (quinn::Connection, (tokio::task::JoinHandle<()>, quinn::RecvStream)) {
    let coord = fx.coord();
    let me = fx.enroll_identity("mallory").await;
    let ca_pem = std::fs::read_to_string(coord.ca()).unwrap();
    let conn = connect(coord.addr, &ca_pem, Some(&me.cert), protocol::ALPN_AGENT).await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    framed::write_frame(&mut send, &hello("mallory", protocol::PROTOCOL_MAJOR)).await.unwrap();
    wait_for(&coord.proc, &["agent joined", "mallory"], T);
    // The control stream's receiving half stays open: dropping it would end the connection.
    (conn, (keep_alive(send), recv))
}

/// Point 6: a manifest naming a blob the sender then does not send, a blob whose bytes do not
/// match its digest, an unrequested blob, a manifest with hostile paths or links, and a chunk
/// list that does not add up to its file's size are each refused with an error saying so;
/// nothing is committed; the honest store on the same connection afterwards succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_manifests_and_blobs_are_refused_and_commit_nothing() {
    let fx = Cluster::new().serve();
    let (conn, _alive) = mallory(&fx).await;
    let state = fx.state();
    let (a, ca) = file("out/a.txt", b"alpha alpha alpha\n");
    let (b, cb) = file("out/b.txt", &vec![7u8; 300_000]);
    let good = Manifest { version: cas::MANIFEST_VERSION, entries: vec![dir("out"), a.clone(), b.clone()] };
    let (good_bytes, good_digest) = good.encode();
    let body = |c: &Chunk| -> Vec<u8> {
        if *c == ca { b"alpha alpha alpha\n".to_vec() } else { vec![7u8; 300_000] }
    };
    let honest =
        |d: &[u8; 32]| [ca, cb].into_iter().find(|c| c.digest == *d).map(|c| (c, cas::ENC_RAW, body(&c)));
    let before = committed(&state);

    // A blob the manifest names, never sent.
    let s = store(&conn, &good_bytes, |d| if *d == cb.digest { None } else { honest(d) }, true).await;
    assert_eq!(s.missing.len(), 2);
    let why = refusal(&s);
    assert!(why.contains("not sent") && why.contains(&hex::encode(cb.digest)), "{why}");
    // Bytes that do not match their digest.
    let s = store(
        &conn,
        &good_bytes,
        |d| {
            honest(d).map(|(c, e, mut p)| {
                if c == cb {
                    p[1000] ^= 1;
                }
                (c, e, p)
            })
        },
        true,
    )
    .await;
    let why = refusal(&s);
    assert!(why.contains("does not match"), "{why}");
    // A blob nobody asked for (sent in place of one that was). Blob a is no longer asked
    // for: it was verified and kept during the first exchange.
    let (_, stray) = file("x", b"stray");
    let s = store(
        &conn,
        &good_bytes,
        |d| if *d == cb.digest { Some((stray, cas::ENC_RAW, b"stray".to_vec())) } else { honest(d) },
        true,
    )
    .await;
    assert_eq!(s.missing, vec![cb.digest]);
    assert!(refusal(&s).contains("not asked for"), "{}", refusal(&s));
    // Hostile paths, links, and a chunk list that does not add up.
    let hostile = [
        (Entry { path: "../../etc/cron.d/x".into(), ..a.clone() }, "plain relative path"),
        (Entry { path: "/etc/passwd".into(), ..a.clone() }, "plain relative path"),
        (
            Entry {
                kind: EntryKind::Symlink,
                size: 0,
                chunks: vec![],
                target: Some("/etc/shadow".into()),
                ..a.clone()
            },
            "leads outside",
        ),
        (
            Entry {
                kind: EntryKind::Symlink,
                size: 0,
                chunks: vec![],
                target: Some("../../x".into()),
                ..a.clone()
            },
            "leads outside",
        ),
        (
            Entry {
                kind: EntryKind::Hardlink,
                size: 0,
                chunks: vec![],
                target: Some("/etc/passwd".into()),
                ..a.clone()
            },
            "hardlink",
        ),
        (Entry { size: a.size + 5, ..a.clone() }, "add up"),
    ];
    for (entry, expect) in hostile {
        let m = Manifest { version: cas::MANIFEST_VERSION, entries: vec![dir("out"), entry] };
        let s = store(&conn, &m.encode().0, honest, true).await;
        assert!(s.missing.is_empty(), "a hostile manifest was answered with Missing");
        let why = refusal(&s);
        assert!(why.contains("refused") && why.contains(expect), "{expect}: {why}");
    }
    // Not JSON at all.
    let s = store(&conn, b"{\"version\":1,\"entries\":[{", honest, true).await;
    assert!(refusal(&s).contains("malformed manifest"), "{}", refusal(&s));
    assert_eq!(committed(&state), before, "a refused manifest was committed");

    // The same connection still stores, and only what the store still lacks is asked for:
    // blob a went in whole during the first refused exchange (every blob is kept once it is
    // verified), so only b is missing.
    let s = store(&conn, &good_bytes, honest, true).await;
    assert_eq!(s.missing, vec![cb.digest]);
    match s.reply {
        Some(SnapshotReply::Stored(info)) => {
            assert_eq!(info.snapshot_id, cas::snapshot_id_of(&good_digest));
            assert_eq!(info.content_bytes, a.size + b.size);
        }
        other => panic!("the honest store failed: {other:?}"),
    }
    assert_eq!(committed(&state), before + 1);
    // Storing it again moves no blob at all.
    let s = store(&conn, &good_bytes, honest, true).await;
    assert!(s.missing.is_empty() && matches!(s.reply, Some(SnapshotReply::Stored(_))));
}

/// Point 3: a store broken off half way (the stream reset, as a lost connection does) commits
/// nothing; the next attempt is asked only for the blobs that had not arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_broken_off_half_way_resumes_from_the_committed_blobs() {
    let fx = Cluster::new().serve();
    let (conn, _alive) = mallory(&fx).await;
    let state = fx.state();
    let bodies: Vec<Vec<u8>> = (0..40u32).map(|i| bytes(i as u64 + 1, 200_000)).collect();
    let mut entries = vec![dir("out")];
    let mut chunks = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let (e, c) = file(&format!("out/f{i:02}"), body);
        entries.push(e);
        chunks.push(c);
    }
    let m = Manifest { version: cas::MANIFEST_VERSION, entries };
    let (bytes, _) = m.encode();
    let blob = |d: &[u8; 32]| {
        let i = chunks.iter().position(|c| c.digest == *d)?;
        Some((chunks[i], cas::ENC_RAW, bodies[i].clone()))
    };
    let sent = std::sync::atomic::AtomicUsize::new(0);
    let half = |d: &[u8; 32]| {
        if sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 20 { blob(d) } else { None }
    };
    let blobs = state.join("snapshots/blobs");
    let held = || -> usize {
        std::fs::read_dir(&blobs).map_or(0, |d| {
            d.flatten().map(|s| std::fs::read_dir(s.path()).map_or(0, |f| f.flatten().count())).sum()
        })
    };
    // Broken off once the coordinator has taken in the 20 blobs that were sent (blobs still in
    // flight when a connection drops are lost, as they would be).
    let settled = || {
        let deadline = std::time::Instant::now() + T;
        while held() < 20 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let s = store_then(&conn, &bytes, half, false, settled).await;
    assert_eq!(s.missing.len(), 40);
    assert_eq!(held(), 20);
    let before = committed(&state);
    let second = store(&conn, &bytes, blob, true).await;
    assert_eq!(second.missing.len(), 20, "the resumed store was asked for {} blobs", second.missing.len());
    assert!(matches!(second.reply, Some(SnapshotReply::Stored(_))), "{:?}", second.reply);
    assert_eq!(committed(&state), before + 1);
}

/// Point 2, fetch: the coordinator sends the manifest and exactly the blobs asked for, and
/// refuses a request for a blob the snapshot does not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_sends_only_the_blobs_asked_for() {
    let fx = Cluster::new().serve();
    let (conn, _alive) = mallory(&fx).await;
    let bodies: Vec<Vec<u8>> = (0..4u32).map(|i| bytes(i as u64 + 9, 50_000)).collect();
    let mut entries = vec![dir("out")];
    let mut chunks = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let (e, c) = file(&format!("out/g{i}"), body);
        entries.push(e);
        chunks.push(c);
    }
    let m = Manifest { version: cas::MANIFEST_VERSION, entries };
    let (bytes, _) = m.encode();
    let blob = |d: &[u8; 32]| {
        let i = chunks.iter().position(|c| c.digest == *d)?;
        Some((chunks[i], cas::ENC_RAW, bodies[i].clone()))
    };
    let id = match store(&conn, &bytes, blob, true).await.reply {
        Some(SnapshotReply::Stored(info)) => info.snapshot_id,
        other => panic!("{other:?}"),
    };
    let fetch = |wants: Vec<[u8; 32]>| {
        let (conn, id) = (conn.clone(), id.clone());
        async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            framed::write_frame(&mut send, &SnapshotRequest::Manifest { snapshot_id: id }).await.unwrap();
            let len = match framed::read_frame::<SnapshotReply, _>(&mut recv).await.unwrap() {
                Some(SnapshotReply::ManifestFollows { bytes }) => bytes,
                other => panic!("{other:?}"),
            };
            let got = blobwire::read_bytes(&mut recv, len, cas::MAX_MANIFEST).await.unwrap();
            framed::write_frame(&mut send, &SnapshotRequest::Want { digests: wants }).await.unwrap();
            // The end of the wants. Refused by then when the coordinator already stopped the
            // stream over a digest it does not hold (the second fetch below): what it sent is
            // what the assertions look at.
            let _ = framed::write_frame(&mut send, &SnapshotRequest::Want { digests: vec![] }).await;
            let mut blobs = Vec::new();
            while let Ok(Some(r)) = blobwire::read_blob(&mut recv).await {
                blobs.push(r);
            }
            (got, blobs)
        }
    };
    let (got, blobs) = fetch(vec![chunks[1].digest, chunks[3].digest]).await;
    assert_eq!(got, bytes);
    assert_eq!(blobs.iter().map(|b| b.chunk).collect::<Vec<_>>(), vec![chunks[1], chunks[3]]);
    for b in &blobs {
        cas::decode_blob(&b.chunk, b.encoding, &b.payload).unwrap();
    }
    let (_, none) = fetch(vec![[9u8; 32]]).await;
    assert!(none.is_empty());
    wait_for(&fx.coord().proc, &["asked for blob", "does not hold"], T);
}
