//! The storage backend served to a step's own processes: bio-pype's `pype_rs` backend (one
//! Python `StorageBackend` per code chunk) calls the agent's backend through a Unix socket
//! instead of doing the storage work itself.
//!
//! For an attempt whose spec asks for it (`PYPE_RS_SERVE=1` in its environment), the agent
//! listens on `<work>/sock/<attempt>.sock` (a short directory under the temp dir when that path
//! is too long for a socket address), mode 0600 in a 0700 directory, tells the snippet where in
//! `PYPE_RS_SOCKET`, and removes it when the snippet has ended. Each connection is one chunk:
//! JSON lines, the agent answering (PROTOCOL.md, "Storage backend served to a step"). Each
//! connection gets a backend of the agent's own mode in its own directory under the attempt's
//! step dir, resolving paths with the coordinator's working registry (fetched when the chunk
//! starts) plus what the attempt harvested so far; what the chunks harvest is reported with
//! the attempt's result. A connection that ends without `cleanup` is cleaned up all the same.
//!
//! Nothing a chunk sends is trusted for paths: every path must be absolute and normal, lie
//! inside the world the coordinator declared for the step (`PYPE_RS_ROOTS`), and never inside
//! the agent's own directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use protocol::{Registry, RegistryEntry, StepSpec};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backend::{self, OverlayVolume, StorageBackend};
use crate::cache::remove_tree;
use crate::step::Steps;

/// Version of the served protocol; the client sends its own in `init`.
pub const SERVED_PROTOCOL: u64 = 1;
/// In a spec's environment: serve the backend to this attempt's processes.
pub const SERVE_ENV: &str = "PYPE_RS_SERVE";
/// In a spec's environment: `:`-separated absolute directories the served backend may touch.
pub const ROOTS_ENV: &str = "PYPE_RS_ROOTS";
/// In a spec's environment: the roots beneath which outputs may be written and harvested.
pub const WRITE_ROOTS_ENV: &str = "PYPE_RS_WRITE_ROOTS";
/// Most chunks connected at once.
const MAX_CHUNKS: usize = 256;
/// How long the end of an attempt waits for its chunks to finish their calls.
const FINISH_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
/// In the snippet's environment: the socket path.
pub const SOCKET_ENV: &str = "PYPE_RS_SOCKET";
/// Longest request line.
const MAX_LINE: usize = 4 << 20;
/// Longest socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 100;

/// Whether `spec` asks for a served backend.
pub fn wanted(spec: &StepSpec) -> bool {
    spec.env.iter().any(|(k, v)| k == SERVE_ENV && v == "1")
}

struct Shared {
    steps: Steps,
    spec_run: String,
    spec_step: String,
    attempt_id: u64,
    step_dir: PathBuf,
    roots: Vec<String>,
    write_roots: Vec<String>,
    /// Registry entries the attempt's chunks harvested, in order.
    entries: Mutex<Vec<(String, RegistryEntry)>>,
    /// The coordinator's working registry, fetched once per attempt.
    registry: Mutex<Option<Arc<Registry>>>,
}

/// A listening socket for one attempt.
pub struct Served {
    pub socket: PathBuf,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

fn socket_path(steps: &Steps, attempt_id: u64) -> Result<PathBuf> {
    let dir = steps.settings.work_dir.join("sock");
    let name = format!("{}-{attempt_id}.sock", std::process::id());
    let dir = if dir.join(&name).as_os_str().len() <= MAX_SOCKET_PATH {
        dir
    } else {
        std::env::temp_dir().join(format!("pype-agent-sock-{}", own_uid()))
    };
    private_dir(&dir)?;
    Ok(dir.join(name))
}

/// This process's user, as the owner of `/proc/self`.
fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX)
}

/// Creates `dir` with mode 0700, or checks that the existing one is a directory of ours that
/// nobody else can enter (a shared temp dir could hold one made by someone else).
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let m = std::fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !m.is_dir() || m.uid() != own_uid() || m.mode() & 0o077 != 0 {
        bail!(
            "{} is not a private directory of this user (mode {:o}, owner {})",
            dir.display(),
            m.mode() & 0o7777,
            m.uid()
        );
    }
    Ok(())
}

impl Served {
    /// Listens for `spec`'s chunks.
    pub async fn start(steps: &Steps, spec: &StepSpec) -> Result<Served> {
        let env_roots = |key: &str| -> Vec<String> {
            spec.env
                .iter()
                .filter(|(k, _)| k == key)
                .flat_map(|(_, v)| {
                    v.split(':').filter(|r| !r.is_empty()).map(str::to_string).collect::<Vec<_>>()
                })
                .collect()
        };
        let roots = env_roots(ROOTS_ENV);
        if roots.is_empty() || roots.iter().any(|r| !normal_abs(r) || r == "/") {
            bail!("the step serves its backend but names no valid roots ({ROOTS_ENV}={roots:?})");
        }
        let mut write_roots = env_roots(WRITE_ROOTS_ENV);
        if write_roots.is_empty() {
            write_roots = roots.clone();
        }
        let socket = socket_path(steps, spec.attempt_id)?;
        let _ = std::fs::remove_file(&socket);
        let listener =
            UnixListener::bind(&socket).with_context(|| format!("listening on {}", socket.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("chmod {}", socket.display()))?;
        }
        let shared = Arc::new(Shared {
            steps: steps.clone(),
            spec_run: spec.run.clone(),
            spec_step: spec.step.clone(),
            attempt_id: spec.attempt_id,
            step_dir: steps.step_dir(spec.attempt_id).join("served"),
            roots,
            write_roots,
            entries: Mutex::new(Vec::new()),
            registry: Mutex::new(None),
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, shared.clone(), cancel.clone()));
        info!(attempt = spec.attempt_id, socket = %socket.display(), "serving the storage backend to the step");
        Ok(Served { socket, cancel, task, shared })
    }

    /// Stops listening, ends every chunk (each cleaned up), removes the socket, and returns
    /// what the chunks harvested.
    pub async fn finish(mut self) -> Vec<(String, RegistryEntry)> {
        self.cancel.cancel();
        // A chunk stuck in a call (a client that never reads its answers) is abandoned: its
        // views are copies under the step dir, removed below.
        if tokio::time::timeout(FINISH_GRACE, &mut self.task).await.is_err() {
            warn!(
                attempt = self.shared.attempt_id,
                "chunks still busy after the snippet ended; abandoning them"
            );
            self.task.abort();
            let _ = (&mut self.task).await;
        }
        let _ = std::fs::remove_file(&self.socket);
        let dir = self.shared.step_dir.clone();
        if dir.exists() {
            let _ = tokio::task::spawn_blocking(move || remove_tree(&dir)).await;
        }
        std::mem::take(&mut *self.shared.entries.lock().await)
    }
}

async fn accept_loop(listener: UnixListener, shared: Arc<Shared>, cancel: CancellationToken) {
    let mut chunks = JoinSet::new();
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => match a {
                Ok((stream, _)) if chunks.len() >= MAX_CHUNKS => {
                    warn!(attempt = shared.attempt_id, "refusing a chunk connection: {MAX_CHUNKS} are open");
                    drop(stream);
                }
                Ok((stream, _)) => {
                    n += 1;
                    chunks.spawn(serve_chunk(stream, shared.clone(), n, cancel.clone()));
                }
                Err(e) => {
                    // Out of descriptors, say: try again shortly rather than stop serving.
                    warn!(attempt = shared.attempt_id, "accepting a chunk connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(_) = chunks.join_next(), if !chunks.is_empty() => {}
        }
    }
    while chunks.join_next().await.is_some() {}
}

/// One chunk's backend, resolved at its first storage call.
struct Chunk {
    shared: Arc<Shared>,
    n: u64,
    initialized: bool,
    backend: Option<Box<dyn StorageBackend>>,
    cleaned: bool,
    /// The registry the backend resolves paths with.
    registry: Arc<Registry>,
    /// Scratch dirs this chunk's backend handed out: the only `upper` a harvest may name.
    scratch_dirs: Vec<String>,
}

async fn serve_chunk(stream: UnixStream, shared: Arc<Shared>, n: u64, cancel: CancellationToken) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut chunk = Chunk {
        shared: shared.clone(),
        n,
        initialized: false,
        backend: None,
        cleaned: false,
        registry: Arc::new(Registry::default()),
        scratch_dirs: Vec::new(),
    };
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = tokio::select! {
            _ = cancel.cancelled() => break,
            r = read_line(&mut lines, &mut buf) => r,
        };
        match read {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let _ = reply(&mut write, &Value::Null, Err(anyhow!("{e:#}"))).await;
                break;
            }
        }
        let req: Value = match serde_json::from_slice(&buf) {
            Ok(v) => v,
            Err(e) => {
                let _ =
                    reply(&mut write, &Value::Null, Err(anyhow!("a request that is not JSON: {e}"))).await;
                break;
            }
        };
        let id = req.get("id").cloned().unwrap_or(Value::Null);
        let method = req.get("method").and_then(Value::as_str).unwrap_or("").to_string();
        let params = req.get("params").cloned().unwrap_or_else(|| json!({}));
        let result = chunk.call(&method, &params).await;
        if let Err(e) = &result {
            warn!(
                attempt = shared.attempt_id,
                chunk = n,
                method = %method,
                "served backend call refused or failed: {e:#}"
            );
        }
        if reply(&mut write, &id, result).await.is_err() {
            break;
        }
    }
    chunk.end().await;
}

/// Reads one line into `buf` (without the newline); `false` at the end of the stream.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<bool> {
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(!buf.is_empty());
        }
        if let Some(i) = avail.iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&avail[..i]);
            r.consume(i + 1);
            if buf.len() > MAX_LINE {
                bail!("a request line over {MAX_LINE} bytes");
            }
            return Ok(true);
        }
        let len = avail.len();
        buf.extend_from_slice(avail);
        r.consume(len);
        if buf.len() > MAX_LINE {
            bail!("a request line over {MAX_LINE} bytes");
        }
    }
}

async fn reply(w: &mut tokio::net::unix::OwnedWriteHalf, id: &Value, result: Result<Value>) -> Result<()> {
    let msg = match result {
        Ok(v) => json!({"id": id, "result": v}),
        Err(e) => json!({"id": id, "error": {"message": format!("{e:#}")}}),
    };
    let mut line = serde_json::to_vec(&msg)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    Ok(())
}

/// An absolute path of normal components only (no `.`, `..`, empty component, NUL or newline).
fn normal_abs(p: &str) -> bool {
    p == "/"
        || (p.starts_with('/')
            && p[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..")
            && !p.contains('\0')
            && !p.contains('\n'))
}

/// A profile or program name: one path component of letters, digits, `.`, `_`, `-`.
fn check_name(what: &str, n: &str) -> Result<()> {
    if n.is_empty()
        || n.len() > 200
        || n.starts_with('.')
        || !n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        bail!("{what} {n:?}: use letters, digits, '.', '_', '-'");
    }
    Ok(())
}

fn strings(params: &Value, key: &str) -> Result<Vec<String>> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => {
            serde_json::from_value(v.clone()).with_context(|| format!("{key}: expected a list of paths"))
        }
    }
}

fn string(params: &Value, key: &str) -> Result<String> {
    params
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("missing string parameter {key:?}"))
}

fn volumes(params: &Value) -> Result<Vec<OverlayVolume>> {
    match params.get("overlay_volumes") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => {
            serde_json::from_value(v.clone()).context("overlay_volumes: expected bio-pype OverlayVolumes")
        }
    }
}

/// Registry entries as bio-pype writes them (no provenance).
fn entries_json(entries: &[(String, RegistryEntry)]) -> Value {
    let mut m = serde_json::Map::new();
    for (k, e) in entries {
        let mut v = json!({"snapshot_id": e.snapshot_id, "in_snapshot_path": e.in_snapshot_path});
        if let Some(b) = &e.bind_path {
            v["bind_path"] = json!(b);
        }
        m.insert(k.clone(), v);
    }
    Value::Object(m)
}

impl Chunk {
    /// Refuses a path the step may not name: relative, not normal, outside the declared
    /// roots, or inside the agent's own directories.
    fn check_path(&self, what: &str, p: &str) -> Result<()> {
        self.check_beneath(what, p, &self.shared.roots)
    }

    /// As [`Chunk::check_path`], for a path the chunk writes.
    fn check_write(&self, what: &str, p: &str) -> Result<()> {
        self.check_beneath(what, p, &self.shared.write_roots)
    }

    /// Refuses a path the step may not name: not absolute and normal, outside `roots`, or the
    /// agent's own directories.
    fn check_beneath(&self, what: &str, p: &str, roots: &[String]) -> Result<()> {
        if !normal_abs(p) {
            bail!("{what} {p:?} is not an absolute path without '.', '..' or '//'");
        }
        let path = Path::new(p);
        let settings = &self.shared.steps.settings;
        let mut own = vec![settings.work_dir.clone()];
        if let Ok(s) = settings.scratch_root() {
            own.push(s);
        }
        if let Some(o) = own.iter().find(|o| path.starts_with(o) || o.starts_with(path)) {
            bail!("{what} {p} is the agent's own directory {} or holds it", o.display());
        }
        if !roots.iter().any(|r| path.starts_with(r)) {
            bail!("{what} {p} is outside the step's declared world ({})", roots.join(", "));
        }
        Ok(())
    }

    async fn backend(&mut self) -> Result<&mut Box<dyn StorageBackend>> {
        if !self.initialized {
            bail!("the first call must be init");
        }
        if self.cleaned {
            bail!("this backend was cleaned up; open a new connection");
        }
        if self.backend.is_none() {
            let steps = &self.shared.steps;
            if steps.settings.overlay_mode == "snapshot" {
                let mut cached = self.shared.registry.lock().await;
                let base = match &*cached {
                    Some(r) => r.clone(),
                    None => {
                        let reg = match steps.remote.registry().await {
                            Ok(r) => r,
                            Err(e) => {
                                warn!(
                                    "the coordinator's registry is not available ({e:#}); using the agent's"
                                );
                                backend::read_registry(&steps.settings.snapshot_registry)?
                            }
                        };
                        let reg = Arc::new(reg);
                        *cached = Some(reg.clone());
                        reg
                    }
                };
                drop(cached);
                let harvested = self.shared.entries.lock().await;
                self.registry = if harvested.is_empty() {
                    base
                } else {
                    let mut reg = (*base).clone();
                    reg.merge(harvested.iter().cloned());
                    Arc::new(reg)
                };
            }
            let mut ctx =
                steps.context(self.shared.attempt_id, &self.shared.spec_run, &self.shared.spec_step);
            ctx.step_dir = self.shared.step_dir.join(format!("chunk-{}", self.n));
            ctx.registry = Some(self.registry.clone());
            // The snippet may already run in a mount namespace of its own, made before this
            // chunk: a mount the agent makes now would not reach it. Views are copies.
            let mut settings = (*ctx.settings).clone();
            settings.mount_overlay = false;
            // Each chunk's scratch of its own (the overlay backend keys it by attempt).
            settings.overlay_scratch = Some(ctx.step_dir.join("scratch").to_string_lossy().into_owned());
            ctx.settings = Arc::new(settings);
            self.backend = Some(backend::resolve_backend(&ctx).await?);
        }
        Ok(self.backend.as_mut().expect("set above"))
    }

    fn snapshot_mode(&self) -> bool {
        self.shared.steps.settings.overlay_mode == "snapshot"
    }

    async fn call(&mut self, method: &str, params: &Value) -> Result<Value> {
        if method != "init" && !self.initialized {
            bail!("the first call must be init");
        }
        match method {
            "init" => {
                let theirs = params.get("protocol").and_then(Value::as_u64);
                if theirs != Some(SERVED_PROTOCOL) {
                    bail!(
                        "this agent ({}) serves the storage backend protocol {SERVED_PROTOCOL}, the client speaks {}; \
                         install the pype_rs package of the agent's version",
                        env!("CARGO_PKG_VERSION"),
                        theirs.map(|p| p.to_string()).unwrap_or_else(|| "none".into())
                    );
                }
                self.initialized = true;
                Ok(json!({
                    "protocol": SERVED_PROTOCOL,
                    "agent_version": env!("CARGO_PKG_VERSION"),
                    "backend": self.shared.steps.settings.overlay_mode,
                    "attempt_id": self.shared.attempt_id,
                }))
            }
            "prepare_inputs" => {
                let inputs = strings(params, "inputs")?;
                for p in &inputs {
                    self.check_path("input", p)?;
                }
                let mut ovs = volumes(params)?;
                let snapshot = self.snapshot_mode();
                // Resolving the backend loads the registry the inputs are located in.
                self.backend().await?;
                let mut served = Vec::new();
                let mut warnings = Vec::new();
                for p in &inputs {
                    if !snapshot || !self.registry.locate(p).is_empty() {
                        served.push(p.clone());
                    } else if tokio::fs::symlink_metadata(p).await.is_ok() {
                        warnings.push(format!("{p} is not in the snapshot registry: using the real path"));
                    } else {
                        bail!("input {p} is neither in the snapshot registry nor on this worker");
                    }
                }
                let b = self.backend().await?;
                b.prepare_inputs(&served, &mut ovs).await?;
                Ok(json!({"overlay_volumes": ovs, "warnings": warnings}))
            }
            "restore_program" => {
                let profile = string(params, "profile_name")?;
                let key = string(params, "program_key")?;
                check_name("profile_name", &profile)?;
                check_name("program_key", &key)?;
                let snapshot = self.snapshot_mode();
                self.backend().await?;
                let reg_key = protocol::registry::program_key(&profile, &key);
                if snapshot && self.registry.get(&reg_key).is_none() {
                    // As bio-pype's cloud backend: a program never staged runs from the
                    // worker's own install (a `path@` or module namespace).
                    return Ok(json!({"warnings": [format!(
                        "program {reg_key} is not in the snapshot registry: using the worker's own install"
                    )]}));
                }
                self.backend().await?.restore_program(&profile, &key).await?;
                Ok(json!({}))
            }
            "prepare_outputs" => {
                let outputs = strings(params, "outputs")?;
                for p in &outputs {
                    self.check_write("output", p)?;
                }
                let harvest: BTreeMap<String, bool> = match params.get("output_harvest") {
                    None | Some(Value::Null) => BTreeMap::new(),
                    Some(v) => {
                        serde_json::from_value(v.clone()).context("output_harvest: expected {path: bool}")?
                    }
                };
                let mut ovs = volumes(params)?;
                // As bio-pype's cloud backend: an output nothing harvests is written in place.
                let redirected: Vec<String> = if self.snapshot_mode() {
                    outputs.iter().filter(|o| harvest.get(*o).copied().unwrap_or(true)).cloned().collect()
                } else {
                    outputs.clone()
                };
                self.backend().await?.prepare_outputs(&redirected, &harvest, &mut ovs).await?;
                self.scratch_dirs.extend(ovs.iter().map(|v| v.scratch_dir.clone()));
                Ok(json!({"overlay_volumes": ovs}))
            }
            "harvest" => {
                let upper = string(params, "upper")?;
                let original = string(params, "original_dir")?;
                self.check_write("original_dir", &original)?;
                if !self.scratch_dirs.contains(&upper) {
                    bail!("harvest: upper {upper} is not a scratch dir this backend handed out");
                }
                let b = self.backend().await?;
                b.harvest(Path::new(&upper), Path::new(&original)).await?;
                let new = b.take_new_entries();
                self.shared.entries.lock().await.extend(new.iter().cloned());
                if !new.is_empty() {
                    let mut reg = (*self.registry).clone();
                    reg.merge(new.iter().cloned());
                    self.registry = Arc::new(reg);
                }
                Ok(json!({"new_entries": entries_json(&new)}))
            }
            "cleanup" => {
                if let Some(b) = self.backend.as_mut()
                    && !self.cleaned
                {
                    self.cleaned = true;
                    b.cleanup().await?;
                }
                self.cleaned = true;
                Ok(json!({}))
            }
            "check_outputs" => {
                let paths = strings(params, "paths")?;
                for p in &paths {
                    self.check_path("path", p)?;
                }
                let sizes = self.backend().await?.check_outputs(&paths).await?;
                Ok(json!({"sizes": sizes}))
            }
            "prepare_build" => {
                let paths = strings(params, "paths")?;
                for p in &paths {
                    self.check_path("path", p)?;
                }
                let keys = strings(params, "program_keys")?;
                for k in &keys {
                    match k.split_once("/programs/") {
                        Some((profile, key))
                            if check_name("", profile).is_ok() && check_name("", key).is_ok() => {}
                        _ => bail!("program key {k:?} is not of the form PROFILE/programs/KEY"),
                    }
                }
                self.backend().await?.prepare_build(&paths, &keys).await?;
                Ok(json!({}))
            }
            "stage_program" => {
                let profile = string(params, "profile_name")?;
                let key = string(params, "program_key")?;
                let artifact = string(params, "artifact_path")?;
                check_name("profile_name", &profile)?;
                check_name("program_key", &key)?;
                self.check_write("artifact_path", &artifact)?;
                let b = self.backend().await?;
                b.stage_program(&profile, &key, Path::new(&artifact)).await?;
                let new = b.take_new_entries();
                self.shared.entries.lock().await.extend(new.iter().cloned());
                Ok(json!({"new_entries": entries_json(&new)}))
            }
            "" => bail!("a request without a method"),
            other => bail!("unknown method {other:?}"),
        }
    }

    /// Cleans up a backend the chunk did not clean up itself.
    async fn end(mut self) {
        if let Some(b) = self.backend.as_mut()
            && !self.cleaned
        {
            if let Err(e) = b.cleanup().await {
                warn!(
                    attempt = self.shared.attempt_id,
                    chunk = self.n,
                    "cleanup of an abandoned chunk failed: {e:#}"
                );
            }
            self.cleaned = true;
        }
    }
}
