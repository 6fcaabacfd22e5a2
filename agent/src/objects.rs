//! Snapshot objects read and written directly in the object store, at short-lived presigned
//! URLs the coordinator hands out: the only module naming `ureq`. Bulk bytes then go between
//! the agent and the store, not through the coordinator.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use protocol::{Compression, PackPlaces, PackPlan, Trailer, TransferSummary};
use transport::cas::{self, Chunk, ChunkSource};
use transport::pack::{PackBuilder, Placed, record};
use transport::spool::Spool;
use transport::tree::UnpackLimits;

/// Records this far apart in a pack are read with one GET (the bytes between are skipped).
const RANGE_GAP: u64 = 1 << 20;

/// Parts uploaded at once.
const UPLOAD_THREADS: usize = 4;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(10)))
        // A stalled transfer fails instead of hanging the step.
        .timeout_recv_body(Some(Duration::from_secs(120)))
        .timeout_send_body(Some(Duration::from_secs(120)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Where a URL points, without its signature (for messages).
fn shown(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

fn status_error(what: &str, url: &str, mut resp: ureq::http::Response<ureq::Body>) -> anyhow::Error {
    let status = resp.status();
    let body = resp.body_mut().with_config().limit(4096).read_to_string().unwrap_or_default();
    let code = body.split("<Code>").nth(1).and_then(|r| r.split("</Code>").next()).unwrap_or("").to_string();
    anyhow!("{what} {}: HTTP {status} {code}", shown(url))
}

/// GETs a stored snapshot and unpacks it into `dest`, committed only when its length and
/// BLAKE3 digest are `expected`'s.
pub fn download_tree(
    url: &str,
    expected: Trailer,
    dest: &Path,
    limits: UnpackLimits,
) -> Result<TransferSummary> {
    let resp = agent().get(url).call().with_context(|| format!("GET {}", shown(url)))?;
    if !resp.status().is_success() {
        return Err(status_error("GET", url, resp));
    }
    let body = resp.into_body().into_reader();
    transport::bulk::unpack_verified(body, dest, Compression::Zstd { level: 0 }, limits, expected)
        .with_context(|| format!("snapshot object {}", shown(url)))
}

/// PUTs `file` in parts of `part_size` bytes, part `i + 1` to `urls[i]`, a few at a time;
/// returns the parts' ETags in order.
pub fn upload_parts(file: &Path, part_size: u64, urls: &[String]) -> Result<Vec<String>> {
    let f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let len = f.metadata()?.len();
    let parts = len.div_ceil(part_size).max(1) as usize;
    if parts != urls.len() {
        bail!("{} bytes make {parts} parts of {part_size}, the coordinator sent {} URLs", len, urls.len());
    }
    let next = AtomicUsize::new(0);
    let etags: Mutex<Vec<Option<String>>> = Mutex::new(vec![None; parts]);
    let http = agent();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..UPLOAD_THREADS.min(parts))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= parts {
                            return Ok(());
                        }
                        let off = i as u64 * part_size;
                        let n = part_size.min(len - off) as usize;
                        buf.resize(n, 0);
                        f.read_exact_at(&mut buf, off)
                            .with_context(|| format!("reading {}", file.display()))?;
                        let url = &urls[i];
                        let resp =
                            http.put(url).send(&buf[..]).with_context(|| format!("PUT {}", shown(url)))?;
                        if !resp.status().is_success() {
                            // Stop the other workers early.
                            next.store(parts, Ordering::Relaxed);
                            return Err(status_error("PUT", url, resp));
                        }
                        let etag = resp
                            .headers()
                            .get("etag")
                            .and_then(|v| v.to_str().ok())
                            .ok_or_else(|| anyhow!("PUT {}: no ETag in the answer", shown(url)))?
                            .to_string();
                        if let Ok(mut e) = etags.lock() {
                            e[i] = Some(etag);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow!("upload thread panicked"))??;
        }
        anyhow::Ok(())
    })?;
    let etags = etags.into_inner().map_err(|_| anyhow!("upload state poisoned"))?;
    etags
        .into_iter()
        .enumerate()
        .map(|(i, e)| e.ok_or_else(|| anyhow!("part {} not uploaded", i + 1)))
        .collect()
}

/// Reads the blobs of `packs` with byte-range GETs (records close together in one request), a
/// few packs at a time, and keeps each in `spool` once it matches its digest. Only blobs in
/// `asked` (digest → length) are taken. Returns the bytes read and the blobs kept.
pub fn fetch_places(
    packs: &[PackPlaces],
    asked: &HashMap<[u8; 32], u64>,
    spool: &Spool,
) -> Result<(u64, HashSet<[u8; 32]>)> {
    // Every range to read: (url, first byte, records).
    let mut runs: Vec<(&str, u64, u64, Vec<Placed>)> = Vec::new();
    for p in packs {
        let mut places: Vec<Placed> = p.blobs.iter().map(|b| Placed::from(*b)).collect();
        places.sort_by_key(|b| b.offset);
        for b in places {
            match asked.get(&b.digest) {
                Some(len) if *len == b.len => {}
                _ => bail!("the coordinator placed blob {} which was not asked for", hex::encode(b.digest)),
            }
            let end = b.offset.checked_add(b.stored).ok_or_else(|| anyhow!("a blob's place overflows"))?;
            if b.stored == 0 || b.stored > 2 * cas::MAX_BLOB {
                bail!("blob {} has an impossible size in its pack", hex::encode(b.digest));
            }
            match runs.last_mut() {
                // One GET reads at most a pack's worth, whatever offsets the places give.
                Some((url, start, run_end, members))
                    if *url == p.url.as_str()
                        && b.offset >= *run_end
                        && b.offset - *run_end <= RANGE_GAP
                        && end - *start <= transport::pack::MAX_PACK =>
                {
                    *run_end = end;
                    members.push(b);
                }
                _ => runs.push((p.url.as_str(), b.offset, end, vec![b])),
            }
        }
    }
    let next = AtomicUsize::new(0);
    let total = std::sync::atomic::AtomicU64::new(0);
    let kept: Mutex<HashSet<[u8; 32]>> = Mutex::new(HashSet::new());
    let http = agent();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..UPLOAD_THREADS.min(runs.len()))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((url, start, end, members)) = runs.get(i) else { return Ok(()) };
                        let bytes = get_range(&http, url, *start, *end).inspect_err(|_| {
                            next.store(runs.len(), Ordering::Relaxed);
                        })?;
                        total.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        for b in members {
                            let rel = Placed { offset: b.offset - start, ..*b };
                            let (enc, payload) = record(&bytes, &rel)?;
                            spool
                                .put(&Chunk { digest: b.digest, len: b.len }, enc, payload)
                                .with_context(|| format!("a blob read from {}", shown(url)))?;
                            if let Ok(mut k) = kept.lock() {
                                k.insert(b.digest);
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow!("download thread panicked"))??;
        }
        anyhow::Ok(())
    })?;
    let kept = kept.into_inner().map_err(|_| anyhow!("download state poisoned"))?;
    Ok((total.into_inner(), kept))
}

/// GETs bytes `start..end` of `url`: exactly that many, or an error.
fn get_range(http: &ureq::Agent, url: &str, start: u64, end: u64) -> Result<Vec<u8>> {
    let want = end - start;
    let resp = http
        .get(url)
        .header("Range", format!("bytes={start}-{}", end - 1))
        .call()
        .with_context(|| format!("GET {}", shown(url)))?;
    if !resp.status().is_success() {
        return Err(status_error("GET", url, resp));
    }
    let mut buf = Vec::with_capacity(want as usize);
    resp.into_body()
        .into_reader()
        .take(want + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {}", shown(url)))?;
    if buf.len() as u64 != want {
        bail!("GET {}: {} bytes for a range of {want}", shown(url), buf.len());
    }
    Ok(buf)
}

/// Packs `chunks`, read from `source` and checked against their digests, into pack files in
/// `spool`; returns each file and its plan.
pub fn build_packs(
    source: &dyn ChunkSource,
    chunks: Vec<Chunk>,
    spool: &Path,
    level: i32,
) -> Result<Vec<(PathBuf, PackPlan)>> {
    let mut out = Vec::new();
    let mut pack = PackBuilder::new();
    let seal = |pack: PackBuilder, out: &mut Vec<(PathBuf, PackPlan)>| -> Result<()> {
        let (bytes, idx) = pack.finish();
        let path = spool.join(format!("pack-{}", idx.digest));
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        let digest = idx.pack_digest()?;
        out.push((
            path,
            PackPlan { digest, len: idx.len, blobs: idx.blobs.into_iter().map(Into::into).collect() },
        ));
        Ok(())
    };
    for c in chunks {
        let data = source.read(&c)?;
        cas::check_blob(&c, &data).map_err(|_| {
            anyhow!("an output changed while it was being stored (blob {})", hex::encode(c.digest))
        })?;
        let (enc, payload) = cas::encode_blob(&data, level);
        pack.push(&c, enc, &payload);
        if pack.full() {
            seal(std::mem::take(&mut pack), &mut out)?;
        }
    }
    if !pack.is_empty() {
        seal(pack, &mut out)?;
    }
    Ok(out)
}

/// PUTs each file to its URL, a few at a time.
pub fn put_files(files: &[PathBuf], urls: &[String]) -> Result<()> {
    if files.len() != urls.len() {
        bail!("{} packs to upload, the coordinator sent {} URLs", files.len(), urls.len());
    }
    let next = AtomicUsize::new(0);
    let http = agent();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..UPLOAD_THREADS.min(files.len()))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let (Some(file), Some(url)) = (files.get(i), urls.get(i)) else { return Ok(()) };
                        let body =
                            std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
                        let resp =
                            http.put(url).send(&body[..]).with_context(|| format!("PUT {}", shown(url)))?;
                        if !resp.status().is_success() {
                            next.store(files.len(), Ordering::Relaxed);
                            return Err(status_error("PUT", url, resp));
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow!("upload thread panicked"))??;
        }
        anyhow::Ok(())
    })
}
