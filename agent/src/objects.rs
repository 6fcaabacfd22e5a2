//! Snapshot objects read and written directly in the object store, at short-lived presigned
//! URLs the coordinator hands out: the only module naming `ureq`. Bulk bytes then go between
//! the agent and the store, not through the coordinator.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use protocol::{Compression, Trailer, TransferSummary};
use transport::tree::UnpackLimits;

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
