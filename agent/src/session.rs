//! The agent's connection to its coordinator: enrollment, then a reconnect loop with jittered
//! exponential backoff around one session (Hello, heartbeats, bulk streams).
//!
//! When the connection drops, running transfers fail with it and the loop reconnects; the
//! certificate stays in the state dir, so a coordinator restart costs one handshake.
//!
//! Two ways to stop: `drain` (first SIGTERM, or the coordinator's `Drain`) lets running steps
//! finish, refuses new ones, tells the coordinator (`Draining`), and leaves once every result
//! is acknowledged; `shutdown` (a second SIGTERM) cancels running steps and leaves at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use protocol::{
    AgentToCoordinator, BulkReply, BulkRequest, CloseCode, CoordinatorToAgent, DataHeader, EnrollRequest,
    EnrollResponse, ErrorCode, Heartbeat, Hello, RemoteError,
};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};
use transport::silence::{Silence, Verdict};
use transport::{endpoint, framed, pki, tree::UnpackLimits};

use crate::cache::Cache;
use crate::facts;
use crate::remote::QuicRemote;
use crate::runner::Runner;
use crate::settings::Settings;
use crate::step::{self, Steps};

/// Control messages queued for the coordinator.
const OUTBOX_DEPTH: usize = 4096;

/// Longest a QUIC handshake may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct AgentConfig {
    /// `HOST:PORT` as the operator gave it; the host is also the TLS server name.
    pub coordinator: String,
    pub ca_pem: String,
    pub state_dir: PathBuf,
    pub work_dir: PathBuf,
    pub name: Option<String>,
    pub token: Option<String>,
    pub labels: Vec<(String, String)>,
    pub slots: u32,
    pub instance_id: Option<String>,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub unpack_limits: UnpackLimits,
    pub settings: Settings,
    /// Give up once the coordinator has been unreachable this long (ephemeral instances).
    pub orphan_timeout: Option<Duration>,
    pub orphan_action: OrphanAction,
    /// Fetch the working registry over QUIC after connecting (user-data had no room for it).
    pub fetch_registry: bool,
}

/// What an orphaned agent does: exit, or power the machine off (an ephemeral VM nobody
/// will terminate otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrphanAction {
    Exit,
    Poweroff,
}

impl std::str::FromStr for OrphanAction {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exit" => Ok(OrphanAction::Exit),
            "poweroff" => Ok(OrphanAction::Poweroff),
            other => bail!("PYPE_ORPHAN_ACTION={other:?}: expected exit or poweroff"),
        }
    }
}

fn power_off() {
    for (cmd, args) in [("systemctl", &["poweroff"][..]), ("poweroff", &[][..])] {
        match std::process::Command::new(cmd).args(args).status() {
            Ok(s) if s.success() => return,
            Ok(s) => warn!("{cmd} {}: {s}", args.join(" ")),
            Err(e) => warn!("{cmd}: {e}"),
        }
    }
}

/// The agent's certificate, key and id, kept in the state dir.
pub struct Identity {
    pub agent_id: String,
    pub cert: pki::CertKey,
}

impl Identity {
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let Some(cert) = pki::CertKey::load(dir, "agent")? else { return Ok(None) };
        let der = cert.cert_der()?;
        let agent_id = pki::common_name(&der)?;
        Ok(Some(Self { agent_id, cert }))
    }
}

fn server_name(coordinator: &str) -> String {
    match coordinator.parse::<SocketAddr>() {
        Ok(sa) => sa.ip().to_string(),
        Err(_) => {
            coordinator.rsplit_once(':').map_or(coordinator, |(h, _)| h).trim_matches(['[', ']']).to_string()
        }
    }
}

async fn resolve(coordinator: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(coordinator)
        .await
        .with_context(|| format!("resolving coordinator address {coordinator}"))?
        .next()
        .ok_or_else(|| anyhow!("coordinator address {coordinator} resolves to nothing"))
}

/// Enrolls with `token`: the key pair is generated here and only the CSR is sent.
pub async fn enroll(cfg: &AgentConfig, token: &str) -> Result<Identity> {
    let addr = resolve(&cfg.coordinator).await?;
    let tuning = endpoint::Tuning::default();
    let ep = endpoint::client(addr, &tuning)?;
    let tls = pki::client_tls(&cfg.ca_pem, None, protocol::ALPN_ENROLL)?;
    let connecting =
        ep.connect_with(endpoint::client_config(tls, &tuning)?, addr, &server_name(&cfg.coordinator))?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("no QUIC handshake within {CONNECT_TIMEOUT:?}"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("connecting to coordinator {} to enroll", cfg.coordinator))?;
    let name = cfg.name.clone().unwrap_or_else(|| facts::host_facts(&cfg.work_dir).hostname);
    let (csr_pem, key_pem) = pki::generate_csr(&name)?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let req = EnrollRequest {
        protocol_major: protocol::PROTOCOL_MAJOR,
        token: token.to_string(),
        csr_pem,
        name: Some(name),
    };
    framed::write_frame(&mut send, &req).await?;
    send.finish()?;
    let resp = framed::read_frame::<EnrollResponse, _>(&mut recv)
        .await
        .map_err(|e| match conn.close_reason() {
            Some(reason) => anyhow!("enrollment refused: {reason}"),
            None => anyhow!("enrollment failed: {e}"),
        })?
        .ok_or_else(|| anyhow!("coordinator closed enrollment without an answer"))?;
    conn.close(quinn::VarInt::from_u32(0), b"enrolled");
    // The close drains in the background: the session need not wait for it.
    tokio::spawn(async move { ep.wait_idle().await });
    match resp {
        EnrollResponse::Enrolled { agent_id, cert_pem } => {
            let cert = pki::CertKey { cert_pem, key_pem };
            std::fs::create_dir_all(&cfg.state_dir)?;
            cert.save(&cfg.state_dir, "agent")?;
            pki::write_file(&cfg.state_dir.join("ca.pem"), cfg.ca_pem.as_bytes(), 0o644)?;
            info!(agent = %agent_id, "enrolled");
            Ok(Identity { agent_id, cert })
        }
        EnrollResponse::Refused(e) => bail!("enrollment refused: {}", e.message),
    }
}

/// Enrolls, retrying with backoff while the coordinator is unreachable (an instance may boot
/// before its network is up); a refusal is final. Gives up at the orphan timeout.
async fn enroll_patiently(cfg: &AgentConfig, token: &str, stop: &Stop) -> Result<Option<Identity>> {
    let started = Instant::now();
    let mut delay = cfg.min_backoff;
    loop {
        let attempt = tokio::select! {
            r = enroll(cfg, token) => r,
            // Nothing runs yet, so a drain has nothing to wait for.
            _ = stop.drain.cancelled() => return Ok(None),
            _ = stop.shutdown.cancelled() => return Ok(None),
        };
        match attempt {
            Ok(id) => return Ok(Some(id)),
            Err(e) if e.to_string().starts_with("enrollment refused") => return Err(e),
            Err(e) => warn!("cannot enroll yet: {e:#}"),
        }
        if let Some(limit) = cfg.orphan_timeout.filter(|l| started.elapsed() > *l) {
            if cfg.orphan_action == OrphanAction::Poweroff {
                tracing::error!("orphaned before enrolling: no coordinator for {}s", limit.as_secs());
                power_off();
            }
            bail!("no coordinator for {}s; giving up", limit.as_secs());
        }
        tokio::select! {
            _ = stop.drain.cancelled() => return Ok(None),
            _ = stop.shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay.mul_f64(0.5 + rand::random::<f64>() * 0.5)) => {}
        }
        delay = (delay * 2).min(cfg.max_backoff);
    }
}

/// How a session ended.
enum Ended {
    /// Shutdown requested locally: stop.
    Shutdown,
    /// Connection lost; reconnect.
    Lost(String),
    /// The coordinator refused this agent's certificate at the TLS handshake; reconnect at
    /// the longest interval.
    CertificateRefused(String),
    /// The coordinator will never accept this agent as it is (revoked, other version): stop.
    Fatal(String),
}

/// How the agent is asked to stop.
#[derive(Clone, Default)]
pub struct Stop {
    /// Finish running steps, take nothing new, leave once the results are acknowledged.
    pub drain: CancellationToken,
    /// Cancel running steps and leave now.
    pub shutdown: CancellationToken,
}

/// Runs until drained or shut down: connect, serve, reconnect with jittered exponential backoff.
pub async fn run(cfg: AgentConfig, stop: Stop) -> Result<()> {
    let shutdown = stop.shutdown.clone();
    let identity = match Identity::load(&cfg.state_dir)? {
        Some(id) => id,
        None => {
            let token = cfg.token.clone().ok_or_else(|| {
                anyhow!("no certificate in {} and no --token to enroll with", cfg.state_dir.display())
            })?;
            match enroll_patiently(&cfg, &token, &stop).await? {
                Some(id) => id,
                None => {
                    info!("stopped before enrolling");
                    return Ok(());
                }
            }
        }
    };
    std::fs::create_dir_all(&cfg.work_dir)
        .with_context(|| format!("creating work dir {}", cfg.work_dir.display()))?;
    step::sweep_leftovers(&cfg.settings);
    let cgroups = crate::usage::Hierarchies::get();
    crate::usage::sweep(cgroups);
    info!(
        cgroups = %if !cfg.settings.cgroups { "off (PYPE_CGROUPS=never)".to_string() } else { cgroups.describe() },
        "attempts' resource use: a cgroup per attempt where one can be created, else the process group sampled from /proc"
    );
    let cache = Cache::open(cfg.state_dir.join("cache"), cfg.settings.cache_size_bytes)?;
    let held = Arc::downgrade(&cache);
    crate::metrics::get().on_scrape(move |m| {
        if let Some(c) = held.upgrade() {
            m.cache_bytes.set(i64::try_from(c.total_bytes()).unwrap_or(i64::MAX));
        }
    });
    let (conn_tx, conn_rx) = watch::channel(None);
    let (outbox_tx, mut outbox) = mpsc::channel(OUTBOX_DEPTH);
    // Snapshots packed for a direct upload wait here; what a killed agent left is stale.
    let spool = cfg.state_dir.join("spool");
    let _ = std::fs::remove_dir_all(&spool);
    std::fs::create_dir_all(&spool).with_context(|| format!("creating {}", spool.display()))?;
    // Blobs of fetches not finished yet survive a restart: a fetch resumes from them.
    // Trees of fetches that broke off wait for the fetch to resume; after a day they are stale.
    crate::remote::sweep_partials(&cfg.state_dir.join("partial"), Duration::from_secs(24 * 3600));
    let blobs = transport::spool::Spool::open(cfg.state_dir.join("blobs"))
        .with_context(|| format!("creating {}", cfg.state_dir.join("blobs").display()))?;
    let quic = Arc::new(QuicRemote::new(conn_rx, cfg.unpack_limits, spool, Arc::new(blobs)));
    let steps = Steps {
        settings: Arc::new(cfg.settings.clone()),
        cache,
        remote: quic.clone(),
        registry_lock: Default::default(),
        launchers: cfg
            .settings
            .launcher
            .then(|| {
                crate::launcher::Launchers::new(cfg.work_dir.join("launch"), crate::exec::bash_path().into())
            })
            .flatten()
            .map(Arc::new),
    };
    if cfg.fetch_registry {
        tokio::spawn(fetch_registry(quic, steps.clone(), shutdown.clone()));
    }
    info!(
        backend = %cfg.settings.overlay_mode,
        registry = %cfg.settings.snapshot_registry.display(),
        work_dir = %cfg.work_dir.display(),
        "agent ready"
    );
    let runner = Runner::new(steps, outbox_tx, cfg.slots);
    let mut link = Link {
        conn: conn_tx,
        outbox: &mut outbox,
        runner: &runner,
        connected: false,
        drain: stop.drain.clone(),
    };
    let tuning = endpoint::Tuning::default();
    let mut backoff = crate::backoff::Backoff::new(cfg.min_backoff, cfg.max_backoff);
    let mut ep: Option<quinn::Endpoint> = None;
    // Since when no session has been up (the orphan guard's clock).
    let mut alone_since = Instant::now();
    loop {
        let attempt_started = Instant::now();
        let span = info_span!("session", agent = %identity.agent_id, coordinator = %cfg.coordinator);
        let ended = session(&cfg, &identity, &tuning, &mut ep, &shutdown, &mut link).instrument(span).await;
        let _ = link.conn.send(None);
        if std::mem::take(&mut link.connected) {
            alone_since = Instant::now();
        }
        let mut how = crate::backoff::Ended::After(attempt_started.elapsed());
        match ended {
            Ok(Ended::Shutdown) => return Ok(()),
            Ok(Ended::Fatal(reason)) if runner.running() > 0 => {
                runner.shutdown().await;
                bail!("{reason}")
            }
            Ok(Ended::Fatal(reason)) => bail!("{reason}"),
            Ok(Ended::Lost(reason)) => warn!(reason = %reason, "lost coordinator"),
            Ok(Ended::CertificateRefused(reason)) => {
                how = crate::backoff::Ended::CertificateRefused;
                warn!(
                    retry_ms = cfg.max_backoff.as_millis() as u64,
                    "the coordinator {} refused this agent's certificate: {reason}; retrying at the longest interval",
                    cfg.coordinator
                );
            }
            Err(e) if certificate_refused(&e) => {
                how = crate::backoff::Ended::CertificateRefused;
                warn!(
                    retry_ms = cfg.max_backoff.as_millis() as u64,
                    "the coordinator {} refused this agent's certificate: {e:#}; retrying at the longest interval",
                    cfg.coordinator
                );
            }
            Err(e) => warn!("cannot reach coordinator {}: {e:#}", cfg.coordinator),
        }
        if let Some(limit) = cfg.orphan_timeout.filter(|l| alone_since.elapsed() > *l) {
            tracing::error!(
                alone_secs = alone_since.elapsed().as_secs(),
                action = ?cfg.orphan_action,
                "orphaned: no coordinator for longer than {}s; giving up",
                limit.as_secs()
            );
            runner.shutdown().await;
            if cfg.orphan_action == OrphanAction::Poweroff {
                power_off();
            }
            return Ok(());
        }
        if stop.drain.is_cancelled() {
            runner.drain();
        }
        if runner.draining() && runner.idle() {
            info!("drained: nothing running, no result waiting; exiting");
            return Ok(());
        }
        let delay = backoff.after(how, rand::random::<f64>());
        debug!(delay_ms = delay.as_millis() as u64, "reconnecting");
        tokio::select! {
            _ = shutdown.cancelled() => {
                runner.shutdown().await;
                return Ok(());
            }
            _ = stop.drain.cancelled(), if !runner.draining() => {
                info!("draining while disconnected: running steps finish, nothing new is taken");
                runner.drain();
                if runner.idle() {
                    info!("drained: nothing running, no result waiting; exiting");
                    return Ok(());
                }
            }
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Whether `e` is the coordinator closing the handshake with a TLS alert about this agent's
/// certificate (QUIC carries alert N as transport error 0x100 + N).
fn certificate_refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<quinn::ConnectionError>().is_some_and(certificate_alert))
}

/// Whether the peer closed the connection with a TLS alert about our certificate.
fn certificate_alert(err: &quinn::ConnectionError) -> bool {
    // bad_certificate, unsupported_certificate, certificate_revoked, certificate_expired,
    // certificate_unknown, unknown_ca, access_denied, certificate_required.
    const ALERTS: [u64; 8] = [42, 43, 44, 45, 46, 48, 49, 116];
    match err {
        quinn::ConnectionError::ConnectionClosed(close) => {
            let code = u64::from(close.error_code);
            (0x100..0x200).contains(&code) && ALERTS.contains(&(code - 0x100))
        }
        _ => false,
    }
}

fn close_reason_of(err: &quinn::ConnectionError) -> Option<(CloseCode, String)> {
    match err {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let code = u32::try_from(c.error_code.into_inner()).ok().and_then(CloseCode::from_u32)?;
            Some((code, String::from_utf8_lossy(&c.reason).into_owned()))
        }
        _ => None,
    }
}

fn classify(err: &quinn::ConnectionError) -> Ended {
    if certificate_alert(err) {
        return Ended::CertificateRefused(err.to_string());
    }
    match close_reason_of(err) {
        Some((CloseCode::VersionMismatch, r)) => Ended::Fatal(format!("coordinator refused this agent: {r}")),
        Some((CloseCode::Unauthorized, r)) => Ended::Fatal(format!(
            "coordinator refused this agent's certificate: {r}; enroll again with a new token"
        )),
        Some((_, r)) => Ended::Lost(format!("coordinator closed the connection: {r}")),
        None => Ended::Lost(err.to_string()),
    }
}

/// What a session shares with the steps: the current connection, the messages they send.
struct Link<'a> {
    /// The current connection and the coordinator's protocol minor.
    conn: watch::Sender<Option<(quinn::Connection, u32)>>,
    outbox: &'a mut mpsc::Receiver<AgentToCoordinator>,
    runner: &'a Arc<Runner>,
    /// Set when a session got its Welcome.
    connected: bool,
    drain: CancellationToken,
}

/// Fetches the working registry once connected and merges it into the agent's file;
/// retried until it works or the agent stops.
async fn fetch_registry(quic: Arc<QuicRemote>, steps: Steps, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(500);
    loop {
        let got = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = quic.fetch_registry() => r,
        };
        match got {
            Ok(reg) => {
                let n = reg.entries.len();
                let entries: Vec<_> = reg.entries.into_iter().collect();
                match steps.merge_registry(&entries).await {
                    Ok(()) => {
                        info!(entries = n, "registry fetched from the coordinator");
                        return;
                    }
                    Err(e) => warn!("writing the fetched registry: {e:#}"),
                }
            }
            Err(e) => warn!("fetching the registry: {e:#}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn session(
    cfg: &AgentConfig,
    identity: &Identity,
    tuning: &endpoint::Tuning,
    ep: &mut Option<quinn::Endpoint>,
    shutdown: &CancellationToken,
    link: &mut Link<'_>,
) -> Result<Ended> {
    let addr = resolve(&cfg.coordinator).await?;
    if ep.is_none() {
        *ep = Some(endpoint::client(addr, tuning)?);
    }
    let endpoint = ep.as_ref().ok_or_else(|| anyhow!("no QUIC endpoint"))?;
    let tls = pki::client_tls(&cfg.ca_pem, Some(&identity.cert), protocol::ALPN_AGENT)?;
    let connecting =
        endpoint.connect_with(endpoint::client_config(tls, tuning)?, addr, &server_name(&cfg.coordinator))?;
    let conn = tokio::select! {
        _ = shutdown.cancelled() => {
            link.runner.shutdown().await;
            return Ok(Ended::Shutdown);
        }
        c = tokio::time::timeout(CONNECT_TIMEOUT, connecting) => {
            match c.map_err(|_| anyhow!("no QUIC handshake within {CONNECT_TIMEOUT:?}"))? {
                Ok(conn) => conn,
                Err(e) if endpoint::is_alpn_mismatch(&e) => {
                    return Ok(Ended::Fatal(format!(
                        "protocol version mismatch: the coordinator does not speak {}",
                        String::from_utf8_lossy(protocol::ALPN_AGENT)
                    )));
                }
                Err(e) => return Err(anyhow!(e).context("QUIC handshake")),
            }
        }
    };
    let (mut send, mut recv) = conn.open_bi().await.context("opening control stream")?;
    let hello = AgentToCoordinator::Hello(Hello {
        protocol_major: protocol::PROTOCOL_MAJOR,
        protocol_minor: protocol::PROTOCOL_MINOR,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        agent_id: identity.agent_id.clone(),
        host: facts::host_facts(&cfg.work_dir),
        labels: cfg.labels.clone(),
        slots: cfg.slots,
        instance_id: cfg.instance_id.clone(),
    });
    framed::write_frame(&mut send, &hello).await.context("sending Hello")?;
    let welcome = match tokio::time::timeout(
        Duration::from_secs(10),
        framed::read_frame::<CoordinatorToAgent, _>(&mut recv),
    )
    .await
    {
        Err(_) => return Ok(Ended::Lost("no Welcome within 10s".into())),
        Ok(Ok(Some(CoordinatorToAgent::Welcome(w)))) => w,
        Ok(Ok(Some(other))) => return Ok(Ended::Lost(format!("expected Welcome, got {other:?}"))),
        Ok(Ok(None)) | Ok(Err(_)) => {
            let err = conn.closed().await;
            return Ok(classify(&err));
        }
    };
    info!(
        coordinator_version = %welcome.coordinator_version,
        heartbeat_interval_ms = welcome.heartbeat_interval_ms,
        "connected to coordinator"
    );
    // Output queued for an earlier connection is stale; results are re-sent from `pending`.
    while link.outbox.try_recv().is_ok() {}
    // Draining before InHand: once the coordinator has the InHand report, it knows whether
    // this agent drains (a draining agent that reconnects is not taken for a restarted one).
    if link.runner.draining() {
        let msg = AgentToCoordinator::Draining { reason: "agent draining".into() };
        framed::write_frame(&mut send, &msg).await?;
    }
    let in_hand = AgentToCoordinator::InHand { attempts: link.runner.in_hand() };
    framed::write_frame(&mut send, &in_hand).await?;
    for (outcome, usage) in link.runner.unacknowledged() {
        info!(attempt = outcome.attempt_id, "reporting a result finished while disconnected");
        if let Some(usage) = usage.filter(|_| welcome.protocol_minor >= 7) {
            let msg = AgentToCoordinator::StepUsage { attempt_id: outcome.attempt_id, usage };
            framed::write_frame(&mut send, &msg).await?;
        }
        framed::write_frame(&mut send, &AgentToCoordinator::StepFinished(outcome)).await?;
    }
    let _ = link.conn.send(Some((conn.clone(), welcome.protocol_minor)));
    link.connected = true;

    // Frames from the coordinator arrive through a task, so the loop below can select on them.
    let (frames_tx, mut frames) = mpsc::channel::<Result<CoordinatorToAgent, String>>(16);
    let reader = tokio::spawn(async move {
        loop {
            let msg = match framed::read_frame::<CoordinatorToAgent, _>(&mut recv).await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err("control stream closed".to_string()),
                Err(e) => Err(e.to_string()),
            };
            let stop = msg.is_err();
            if frames_tx.send(msg).await.is_err() || stop {
                return;
            }
        }
    });
    let bulk = tokio::spawn(accept_bulk(conn.clone(), cfg.work_dir.clone(), cfg.unpack_limits));
    let interval = Duration::from_millis(welcome.heartbeat_interval_ms.max(50));
    let mut ticker = tokio::time::interval(interval);
    let mut seq = 0u64;
    // Three intervals without any frame from the coordinator: it is gone (a killed process
    // sends no close; QUIC's idle timeout alone would take much longer).
    // A stall of this process is not the coordinator's silence (`transport::silence`).
    let silence_limit = interval * 3;
    let mut silence = Silence::new(silence_limit, tokio::time::Instant::now());
    let drain = link.drain.clone();
    // `StepStarted` frames wait up to START_HOLD for the next frame to share its write.
    let mut held = Held::default();
    let ended = loop {
        if link.runner.draining() && link.runner.idle() {
            info!("drained: every step finished and its result acknowledged; leaving");
            break leave(&mut send, &conn, link, held.take(), "agent drained").await;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(held.until.unwrap_or_else(tokio::time::Instant::now)), if held.until.is_some() => {
                let mut frames = held.take().into_iter();
                if let Some(first) = frames.next()
                    && framed::write_batch(&mut send, &first, || frames.next().map(Some)).await.is_err()
                {
                    break classify(&conn.closed().await);
                }
            }
            _ = drain.cancelled(), if !link.runner.draining() => {
                let running = link.runner.running();
                info!(running, "draining: running steps finish, nothing new is taken");
                link.runner.drain();
                let msg = AgentToCoordinator::Draining { reason: "agent draining".into() };
                if framed::write_frame(&mut send, &msg).await.is_err() {
                    break classify(&conn.closed().await);
                }
            }
            _ = shutdown.cancelled() => {
                link.runner.shutdown().await;
                break leave(&mut send, &conn, link, held.take(), "agent shutting down").await;
            }
            _ = tokio::time::sleep_until(silence.deadline()) => {
                if silence.check(tokio::time::Instant::now()) == Verdict::Silent {
                    let reason = format!("no answer from coordinator for {}ms", silence_limit.as_millis());
                    conn.close(quinn::VarInt::from_u32(CloseCode::HeartbeatTimeout as u32), reason.as_bytes());
                    break Ended::Lost(reason);
                }
            }
            _ = ticker.tick() => {
                seq += 1;
                let hb = AgentToCoordinator::Heartbeat(Heartbeat {
                    seq,
                    memory_available_bytes: facts::available_memory(),
                    work_dir_free_bytes: facts::free_bytes(&cfg.work_dir),
                    load_average: facts::load_average(),
                });
                if framed::write_frame(&mut send, &hb).await.is_err() {
                    break classify(&conn.closed().await);
                }
                if welcome.protocol_minor >= 7 {
                    let stats = AgentToCoordinator::Stats(crate::metrics::get().stats());
                    if framed::write_frame(&mut send, &stats).await.is_err() {
                        break classify(&conn.closed().await);
                    }
                }
            }
            Some(msg) = link.outbox.recv() => {
                // Older coordinators do not know this message.
                let unknown = |m: &AgentToCoordinator| {
                    matches!(m, AgentToCoordinator::StepUsage { .. }) && welcome.protocol_minor < 7
                };
                if unknown(&msg) {
                    continue;
                }
                if matches!(msg, AgentToCoordinator::StepStarted { .. }) {
                    held.hold(msg);
                    continue;
                }
                // What was held, then this, then what else is ready (a result and its usage,
                // several steps' results) go in the same write, in the order they were made.
                let mut made = held.take().into_iter().chain(std::iter::once(msg));
                let Some(first) = made.next() else { continue };
                let outbox = &mut link.outbox;
                let more = || {
                    made.next().map(Some).or_else(|| outbox.try_recv().ok().map(|m| (!unknown(&m)).then_some(m)))
                };
                if framed::write_batch(&mut send, &first, more).await.is_err() {
                    break classify(&conn.closed().await);
                }
            }
            frame = frames.recv() => {
                // Any frame but a farewell says the coordinator is there.
                if let Some(Ok(f)) = &frame && !matches!(f, CoordinatorToAgent::GoingAway { .. }) {
                    silence.heard(tokio::time::Instant::now());
                }
                match frame {
                    Some(Ok(CoordinatorToAgent::HeartbeatAck { .. })) => {}
                    Some(Ok(CoordinatorToAgent::RunStep(spec))) => link.runner.start(*spec),
                    Some(Ok(CoordinatorToAgent::CancelStep { attempt_id, reason })) => {
                        link.runner.cancel(attempt_id, &reason);
                    }
                    Some(Ok(CoordinatorToAgent::StepResultAck { attempt_id })) => link.runner.ack(attempt_id),
                    Some(Ok(CoordinatorToAgent::CheckOutputs { request_id, paths, registry })) => {
                        link.runner.check_outputs(request_id, paths, registry);
                    }
                    Some(Ok(CoordinatorToAgent::GoingAway { reason })) => {
                        info!(reason = %reason, "coordinator going away");
                    }
                    Some(Ok(CoordinatorToAgent::Drain { reason })) => {
                        info!(reason = %reason, "the coordinator asks this agent to drain");
                        link.drain.cancel();
                    }
                    Some(Ok(CoordinatorToAgent::Welcome(_))) => {
                        conn.close(quinn::VarInt::from_u32(CloseCode::ProtocolViolation as u32), b"second Welcome");
                        break Ended::Lost("coordinator sent a second Welcome".into());
                    }
                    Some(Err(_)) | None => {
                        let closed = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                        break match closed {
                            Ok(err) => classify(&err),
                            Err(_) => {
                                conn.close(quinn::VarInt::from_u32(CloseCode::ProtocolViolation as u32), b"control stream ended");
                                Ended::Lost("control stream ended".into())
                            }
                        };
                    }
                }
            }
        }
    };
    reader.abort();
    bulk.abort();
    if matches!(ended, Ended::Shutdown) {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
    Ok(ended)
}

/// How long a `StepStarted` frame may wait for the step's next frame (its result, for a
/// step this short) to share a write: one packet and one wake-up of the coordinator instead
/// of two, which for empty steps is a tenth of what a step costs (issue 21). The coordinator
/// logs `step started` at most this much later.
const START_HOLD: Duration = Duration::from_millis(10);

/// Frames held back for [`START_HOLD`], in the order they were made.
#[derive(Default)]
struct Held {
    frames: Vec<AgentToCoordinator>,
    /// When the oldest must leave.
    until: Option<tokio::time::Instant>,
}

impl Held {
    fn hold(&mut self, msg: AgentToCoordinator) {
        self.frames.push(msg);
        self.until.get_or_insert_with(|| tokio::time::Instant::now() + START_HOLD);
    }

    fn take(&mut self) -> Vec<AgentToCoordinator> {
        self.until = None;
        std::mem::take(&mut self.frames)
    }
}

/// Sends what the outbox holds (results of the attempts just ended), then goodbye, and closes.
async fn leave(
    send: &mut quinn::SendStream,
    conn: &quinn::Connection,
    link: &mut Link<'_>,
    held: Vec<AgentToCoordinator>,
    reason: &str,
) -> Ended {
    for msg in held {
        let _ = framed::write_frame(send, &msg).await;
    }
    while let Ok(msg) = link.outbox.try_recv() {
        let _ = framed::write_frame(send, &msg).await;
    }
    let bye = AgentToCoordinator::GoingAway { reason: reason.into() };
    let _ = framed::write_frame(send, &bye).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(quinn::VarInt::from_u32(CloseCode::GoingAway as u32), reason.as_bytes());
    Ended::Shutdown
}

/// Serves bulk streams the coordinator opens, each on its own task.
async fn accept_bulk(conn: quinn::Connection, work_dir: PathBuf, limits: UnpackLimits) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let work_dir = work_dir.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_bulk(send, recv, &work_dir, limits).await {
                warn!("transfer failed: {e:#}");
            }
        });
    }
}

fn resolve_path(work_dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() { p.to_path_buf() } else { work_dir.join(p) }
}

async fn handle_bulk(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    work_dir: &Path,
    limits: UnpackLimits,
) -> Result<()> {
    let req = framed::read_frame::<BulkRequest, _>(&mut recv)
        .await?
        .ok_or_else(|| anyhow!("transfer stream closed before its request"))?;
    match req {
        BulkRequest::Put { dest, data } => {
            let dest = resolve_path(work_dir, &dest);
            let reply = match transport::recv_tree(&mut recv, dest.clone(), data.compression, limits).await {
                Ok(summary) => {
                    info!(dest = %dest.display(), bytes = summary.content_bytes, entries = summary.entries, elapsed_ms = summary.elapsed_ms, "received tree");
                    BulkReply::Stored(summary)
                }
                Err(e) => {
                    warn!(dest = %dest.display(), "refused transfer: {e}");
                    BulkReply::Error(RemoteError { code: e.code(), message: e.to_string() })
                }
            };
            framed::write_frame(&mut send, &reply).await?;
            send.finish()?;
        }
        BulkRequest::Get { src, compression } => {
            let src = resolve_path(work_dir, &src);
            // Refusals go back as a message before any data, never as a stream cut short.
            let s = src.clone();
            let check = tokio::task::spawn_blocking(move || match std::fs::symlink_metadata(&s) {
                Err(e) => {
                    Err(RemoteError { code: ErrorCode::NotFound, message: format!("{}: {e}", s.display()) })
                }
                Ok(_) => transport::tree::check_packable(&s).map(|_| ()).map_err(|e| RemoteError {
                    code: ErrorCode::RefusedArchive,
                    message: format!("{}: {e}", s.display()),
                }),
            })
            .await?;
            if let Err(err) = check {
                warn!(src = %src.display(), "refused to send: {}", err.message);
                framed::write_frame(&mut send, &BulkReply::Error(err)).await?;
                send.finish()?;
                return Ok(());
            }
            framed::write_frame(
                &mut send,
                &BulkReply::Data(DataHeader { expected_bytes: None, compression }),
            )
            .await?;
            let summary = transport::send_tree(&mut send, src.clone(), compression).await?;
            send.finish()?;
            info!(src = %src.display(), bytes = summary.content_bytes, entries = summary.entries, "sent tree");
        }
    }
    Ok(())
}
