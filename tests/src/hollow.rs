//! Hollow agents (issue 21, after Kubernetes' kubemark): many agents in one process, each
//! enrolled through the real enrollment path with a certificate of its own, each holding a
//! real QUIC connection with mutual TLS, heartbeating at the interval its `Welcome` gives, and
//! reporting real host facts; a step is answered at once (started, exit 0) without running
//! anything, so what a benchmark measures is the coordinator.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use protocol::{AgentToCoordinator, CoordinatorToAgent, StepExit, StepOutcome};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use transport::silence::{Silence, Verdict};
use transport::{endpoint, framed, pki};

/// What a fleet counts.
#[derive(Default)]
pub struct Counters {
    /// Hollow agents with a live session (Welcome received).
    pub connected: AtomicUsize,
    /// Steps answered.
    pub steps: AtomicU64,
    /// Sessions that ended (lost connections, a coordinator restart).
    pub sessions_ended: AtomicU64,
    /// Times each step (by name, whatever its run) was answered: a step lost or run twice
    /// shows here.
    pub answered: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// When each agent last got a `Welcome`: after a restart, the agents back are those
    /// welcomed since.
    pub welcomed: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Fault injection: while above 0, an agent that receives a step takes one off and drops
    /// its connection without reading the step (a connection that broke with a step on the
    /// wire).
    pub lose_run_steps: AtomicUsize,
}

impl Counters {
    /// Agents welcomed at or after `since`.
    pub fn welcomed_since(&self, since: std::time::Instant) -> usize {
        self.welcomed.lock().unwrap_or_else(|p| p.into_inner()).values().filter(|t| **t >= since).count()
    }

    /// Of `steps`, how many were answered never, once and more than once.
    pub fn tally<'a>(&self, steps: impl Iterator<Item = &'a str>) -> (usize, usize, usize) {
        let by_step = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        let (mut never, mut once, mut more) = (0, 0, 0);
        for s in steps {
            match by_step.get(s).copied().unwrap_or(0) {
                0 => never += 1,
                1 => once += 1,
                _ => more += 1,
            }
        }
        (never, once, more)
    }
}

/// What an agent named `name` with its state in `dir` enrolls with.
pub fn agent_config(
    coordinator: SocketAddr,
    ca_pem: &str,
    dir: &Path,
    name: &str,
    token: &str,
) -> agent::session::AgentConfig {
    let work = dir.join("work");
    agent::session::AgentConfig {
        coordinator: coordinator.to_string(),
        ca_pem: ca_pem.to_string(),
        state_dir: dir.to_path_buf(),
        settings: agent::settings::Settings::from_config(&Default::default(), &work)
            .expect("the default settings are valid"),
        work_dir: work,
        name: Some(name.into()),
        token: Some(token.into()),
        labels: vec![],
        slots: 1,
        instance_id: None,
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        unpack_limits: Default::default(),
        orphan_timeout: None,
        orphan_action: agent::session::OrphanAction::Exit,
        fetch_registry: false,
    }
}

/// Enrolls `n` agents named `PREFIX-00000`... with `token` (which must allow `n` uses),
/// `concurrency` at a time; each keeps its key and certificate under `dir/<name>`.
pub async fn enroll(
    coordinator: SocketAddr,
    ca_pem: &str,
    token: &str,
    n: usize,
    prefix: &str,
    dir: &Path,
    concurrency: usize,
) -> Result<Vec<agent::session::Identity>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let name = format!("{prefix}-{i:05}");
        let state_dir = dir.join(&name);
        let (ca_pem, token, sem) = (ca_pem.to_string(), token.to_string(), sem.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire().await?;
            let cfg = agent_config(coordinator, &ca_pem, &state_dir, &name, &token);
            agent::session::enroll(&cfg, &token).await.with_context(|| format!("enrolling {name}"))
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        out.push(r??);
    }
    out.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
    Ok(out)
}

/// Starts a hollow agent on `rt` for each of `ids`, `slots` each, sharing one client endpoint (a
/// UDP socket and its driver) per `per_endpoint` agents: real agents each have their own, and
/// one socket for 10,000 connections would make the fleet the bottleneck.
#[allow(clippy::too_many_arguments)]
pub fn spawn_fleet(
    rt: &tokio::runtime::Runtime,
    coordinator: SocketAddr,
    ca_pem: &Arc<str>,
    ids: Vec<agent::session::Identity>,
    facts: &protocol::HostFacts,
    slots: u32,
    per_endpoint: usize,
    counters: &Arc<Counters>,
    stop: &CancellationToken,
) -> Result<()> {
    let eps = rt.block_on(async {
        (0..ids.len().div_ceil(per_endpoint.max(1)).max(1))
            .map(|_| endpoint::client(coordinator, &endpoint::Tuning::default()))
            .collect::<Result<Vec<quinn::Endpoint>>>()
    })?;
    for (i, id) in ids.into_iter().enumerate() {
        let ep = eps[i % eps.len()].clone();
        rt.spawn(run(
            ep,
            coordinator,
            ca_pem.clone(),
            id,
            facts.clone(),
            slots,
            counters.clone(),
            stop.clone(),
        ));
    }
    Ok(())
}

/// Runs one hollow agent until `stop`: connects, serves its session, and reconnects (after a
/// jittered pause of 0.2-2 s) whenever the session ends.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    ep: quinn::Endpoint,
    coordinator: SocketAddr,
    ca_pem: Arc<str>,
    id: agent::session::Identity,
    facts: protocol::HostFacts,
    slots: u32,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    // Results not acknowledged yet: said in `InHand` and sent again after a reconnect, as a
    // real agent does.
    let mut pending: std::collections::BTreeMap<u64, StepOutcome> = Default::default();
    while !stop.is_cancelled() {
        let _ = session(&ep, coordinator, &ca_pem, &id, &facts, slots, &counters, &stop, &mut pending).await;
        counters.sessions_ended.fetch_add(1, Ordering::Relaxed);
        let pause = Duration::from_millis(200 + rand::random::<u64>() % 1800);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    ep: &quinn::Endpoint,
    coordinator: SocketAddr,
    ca_pem: &str,
    id: &agent::session::Identity,
    facts: &protocol::HostFacts,
    slots: u32,
    counters: &Counters,
    stop: &CancellationToken,
    pending: &mut std::collections::BTreeMap<u64, StepOutcome>,
) -> Result<()> {
    let tuning = endpoint::Tuning::default();
    let tls = pki::client_tls(ca_pem, Some(&id.cert), protocol::ALPN_AGENT)?;
    // As a real agent: a session that has no Welcome within 10 s is given up and tried again.
    let opened = tokio::time::timeout(Duration::from_secs(10), async {
        let conn = ep.connect_with(endpoint::client_config(tls, &tuning)?, coordinator, "127.0.0.1")?.await?;
        let (send, recv) = conn.open_bi().await?;
        Ok::<_, anyhow::Error>((conn, send, recv))
    });
    let (conn, mut send, mut recv) = opened.await.map_err(|_| anyhow!("no connection within 10s"))??;
    let hello = AgentToCoordinator::Hello(protocol::Hello {
        protocol_major: protocol::PROTOCOL_MAJOR,
        protocol_minor: protocol::PROTOCOL_MINOR,
        agent_version: "hollow".into(),
        agent_id: id.agent_id.clone(),
        host: facts.clone(),
        labels: vec![],
        slots,
        instance_id: None,
    });
    framed::write_frame(&mut send, &hello).await?;
    let first =
        tokio::time::timeout(Duration::from_secs(10), framed::read_frame::<CoordinatorToAgent, _>(&mut recv));
    let welcome = match first.await {
        Err(_) => {
            conn.close(quinn::VarInt::from_u32(5), b"no Welcome within 10s");
            bail!("no Welcome within 10s")
        }
        Ok(Ok(Some(CoordinatorToAgent::Welcome(w)))) => w,
        Ok(other) => bail!("expected Welcome, got {other:?}"),
    };
    let held: Vec<u64> = pending.keys().copied().collect();
    framed::write_frame(&mut send, &AgentToCoordinator::InHand { attempts: held }).await?;
    for outcome in pending.values() {
        framed::write_frame(&mut send, &AgentToCoordinator::StepFinished(outcome.clone())).await?;
    }
    counters.connected.fetch_add(1, Ordering::Relaxed);
    counters
        .welcomed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.agent_id.clone(), std::time::Instant::now());
    // Frames are read by a task of their own (reading a frame is not cancel-safe).
    let (tx, mut frames) = mpsc::channel::<CoordinatorToAgent>(64);
    let reader = tokio::spawn(async move {
        while let Ok(Some(f)) = framed::read_frame::<CoordinatorToAgent, _>(&mut recv).await {
            if tx.send(f).await.is_err() {
                return;
            }
        }
    });
    let interval = Duration::from_millis(welcome.heartbeat_interval_ms.max(50));
    let mut tick = tokio::time::interval(interval);
    let mut seq = 0u64;
    // As a real agent: three intervals without a frame from the coordinator and it is gone
    // (a killed coordinator sends no close), unless this process was the one stalled.
    let mut silence = Silence::new(interval * 3, tokio::time::Instant::now());
    let ended: Result<()> = loop {
        tokio::select! {
            _ = tokio::time::sleep_until(silence.deadline()) => {
                if silence.check(tokio::time::Instant::now()) == Verdict::Silent {
                    conn.close(quinn::VarInt::from_u32(5), b"no answer from coordinator");
                    break Err(anyhow!("no answer from the coordinator"));
                }
            }
            _ = stop.cancelled() => {
                let _ = framed::write_frame(&mut send, &AgentToCoordinator::GoingAway { reason: "hollow fleet stops".into() }).await;
                conn.close(quinn::VarInt::from_u32(0), b"bye");
                break Ok(());
            }
            _ = tick.tick() => {
                seq += 1;
                let hb = AgentToCoordinator::Heartbeat(protocol::Heartbeat {
                    seq,
                    memory_available_bytes: facts.memory_available_bytes,
                    work_dir_free_bytes: facts.work_dir_free_bytes,
                    load_average: 0.0,
                });
                if let Err(e) = framed::write_frame(&mut send, &hb).await {
                    break Err(anyhow!("heartbeat: {e}"));
                }
            }
            f = frames.recv() => match f.inspect(|_| silence.heard(tokio::time::Instant::now())) {
                None => break Err(anyhow!("control stream closed")),
                Some(CoordinatorToAgent::RunStep(spec)) => {
                    let lose = counters.lose_run_steps.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
                    if lose.is_ok() {
                        conn.close(quinn::VarInt::from_u32(5), b"hollow agent: connection dropped with a step on the wire");
                        break Err(anyhow!("dropped a step (fault injection)"));
                    }
                    let attempt_id = spec.attempt_id;
                    *counters
                        .answered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(spec.step.clone())
                        .or_default() += 1;
                    let started = AgentToCoordinator::StepStarted { attempt_id, backend: "hollow".into(), view: "none".into() };
                    let outcome = StepOutcome {
                        attempt_id,
                        exit: StepExit::Exited(0),
                        error: None,
                        backend: "hollow".into(),
                        outputs: spec.outputs.iter().map(|o| (o.clone(), Some(0))).collect(),
                        new_entries: vec![],
                        elapsed_ms: 0,
                    };
                    // Held from the moment it came, as a real agent's runner holds it: a
                    // session that breaks while answering says so in its next `InHand`.
                    pending.insert(attempt_id, outcome.clone());
                    if let Err(e) = framed::write_frame(&mut send, &started).await {
                        break Err(anyhow!("{e}"));
                    }
                    if let Err(e) = framed::write_frame(&mut send, &AgentToCoordinator::StepFinished(outcome)).await {
                        break Err(anyhow!("{e}"));
                    }
                    counters.steps.fetch_add(1, Ordering::Relaxed);
                }
                Some(CoordinatorToAgent::StepResultAck { attempt_id }) => {
                    pending.remove(&attempt_id);
                }
                Some(CoordinatorToAgent::CheckOutputs { request_id, paths, .. }) => {
                    let result = Ok(paths.into_iter().map(|p| (p, None)).collect());
                    if let Err(e) = framed::write_frame(&mut send, &AgentToCoordinator::OutputsChecked { request_id, result }).await {
                        break Err(anyhow!("{e}"));
                    }
                }
                Some(CoordinatorToAgent::GoingAway { reason }) => break Err(anyhow!("coordinator going away: {reason}")),
                Some(_) => {}
            }
        }
    };
    counters.connected.fetch_sub(1, Ordering::Relaxed);
    reader.abort();
    ended
}
