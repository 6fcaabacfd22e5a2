//! The embedded default: a coordinator on 127.0.0.1 (random port) inside this process, and
//! local agents as child processes with their own state and work dirs under
//! `<state>/local-agents/`, using the snapshot backend. The agents die with this process
//! (`PR_SET_PDEATHSIG`) and are stopped (SIGTERM, then SIGKILL) when the cluster stops.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use transport::{endpoint, pki};

use crate::hub::{Hub, ServerConfig};
use crate::metrics;
use crate::persist::state::State;
use crate::persist::trust;
use crate::persist::working::WorkingRegistry;
use crate::run::Engine;
use crate::server;

/// The hidden subcommand under which `pype-coordinator` runs as an agent.
pub const AGENT_SUBCOMMAND: &str = "__agent";

pub struct LocalOptions {
    pub agents: usize,
    pub heartbeat_interval: Duration,
    /// `pype-agent` binary; default: this executable in agent mode.
    pub agent_bin: Option<PathBuf>,
    /// `PYPE_OVERLAY_MODE` of the agents.
    pub backend: String,
    /// Address to listen on (port 0: any).
    pub listen: SocketAddr,
    /// Extra names agents reach the coordinator by (server certificate SANs).
    pub advertise: Vec<String>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

pub struct LocalCluster {
    pub coord: Arc<Hub>,
    pub engine: Arc<Engine>,
    pub addr: SocketAddr,
    agents: Vec<(Child, PathBuf)>,
    server_stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

/// Starts the QUIC server for `state_dir` and returns the coordinator with its engine.
pub async fn start_server(
    state_dir: &Path,
    listen: SocketAddr,
    advertise: &[String],
    heartbeat_interval: Duration,
    metrics_listen: Option<SocketAddr>,
    shutdown: CancellationToken,
) -> Result<(Arc<Hub>, Arc<Engine>, SocketAddr, tokio::task::JoinHandle<()>)> {
    let state = Arc::new(State::open(state_dir)?);
    let names = trust::server_names(listen, advertise);
    let identity = trust::setup(state_dir, &names, &state)?;
    let tls = pki::server_tls(
        &identity.ca.cert_key.cert_pem,
        &identity.server,
        &[protocol::ALPN_AGENT, protocol::ALPN_ENROLL, protocol::ALPN_ADMIN],
    )?;
    let ep = endpoint::server(listen, tls, &endpoint::Tuning::default(), trust::reset_key(state_dir)?)?;
    let local = ep.local_addr()?;
    pki::write_file(&state_dir.join(crate::persist::ADDR_FILE), local.to_string().as_bytes(), 0o644)?;
    tracing::info!(addr = %local, state_dir = %state_dir.display(), "coordinator listening");
    let config = ServerConfig { heartbeat_interval, ..Default::default() };
    let store = crate::persist::config::open_store(state_dir)?;
    let coord = Hub::new(state.clone(), identity.ca, config, store);
    let engine = Arc::new(Engine {
        coord: coord.clone(),
        state,
        registry: Arc::new(WorkingRegistry::open(state_dir)?),
        state_dir: state_dir.to_path_buf(),
        demand: tokio::sync::watch::channel(Default::default()).0,
        cancels: tokio::sync::broadcast::channel(64).0,
    });
    coord.set_runs(engine.clone());
    if let Some(addr) = metrics_listen {
        export_metrics(addr, &coord, shutdown.clone()).await?;
    }
    let c = coord.clone();
    let task = tokio::spawn(server::run(ep, c, shutdown));
    Ok((coord, engine, local, task))
}

impl LocalCluster {
    pub async fn start(state_dir: &Path, opts: &LocalOptions) -> Result<Self> {
        let server_stop = CancellationToken::new();
        let (coord, engine, addr, server) = start_server(
            state_dir,
            opts.listen,
            &opts.advertise,
            opts.heartbeat_interval,
            opts.metrics_listen,
            server_stop.clone(),
        )
        .await?;
        let token = engine.state.create_token(Duration::from_secs(600), opts.agents.max(1) as u32, None)?;
        let mut cluster = LocalCluster { coord, engine, addr, agents: Vec::new(), server_stop, server };
        for i in 1..=opts.agents {
            let dir = state_dir.join("local-agents").join(format!("agent-{i}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let child =
                spawn_agent(&dir, &format!("local-{i}"), addr, &state_dir.join("ca.pem"), &token, opts)?;
            cluster.agents.push((child, dir));
        }
        Ok(cluster)
    }

    /// Waits for every local agent to connect; an agent that exits first is an error naming its log.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.coord.agent_views().len() >= self.agents.len() {
                return Ok(());
            }
            for (child, dir) in &mut self.agents {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = dir.join("agent.log");
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> =
                        tail.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
                    anyhow::bail!(
                        "local agent exited with {status} (log {}):\n{}",
                        log.display(),
                        tail.join("\n")
                    );
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{} of {} local agents connected within {}s (logs under {})",
                    self.coord.agent_views().len(),
                    self.agents.len(),
                    timeout.as_secs(),
                    self.agents
                        .first()
                        .and_then(|(_, d)| d.parent())
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the agents (SIGTERM, SIGKILL after 10 s), then the server.
    pub async fn stop(mut self) {
        for (child, _) in &self.agents {
            let pid = rustix::process::Pid::from_child(child);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (child, _) in &mut self.agents {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
        self.server_stop.cancel();
        let _ = (&mut self.server).await;
        // Nobody answers at the recorded address any more (unless another coordinator wrote
        // its own since).
        let file = self.engine.state_dir.join(crate::persist::ADDR_FILE);
        if std::fs::read_to_string(&file).is_ok_and(|a| a.trim() == self.addr.to_string()) {
            let _ = std::fs::remove_file(&file);
        }
    }
}

fn spawn_agent(
    dir: &Path,
    name: &str,
    addr: SocketAddr,
    ca: &Path,
    token: &str,
    opts: &LocalOptions,
) -> Result<Child> {
    let mut cmd = match &opts.agent_bin {
        Some(bin) => Command::new(bin),
        None => {
            let mut c = Command::new(std::env::current_exe().context("locating this executable")?);
            c.arg(AGENT_SUBCOMMAND);
            c
        }
    };
    let log = std::fs::File::create(dir.join("agent.log")).context("creating the agent log")?;
    let log2 = log.try_clone()?;
    cmd.arg("run")
        .arg("--coordinator")
        .arg(addr.to_string())
        .arg("--ca")
        .arg(ca)
        .arg("--state-dir")
        .arg(dir)
        .arg("--name")
        .arg(name)
        .arg("--token")
        .arg(token)
        .arg("--min-backoff-ms")
        .arg("50")
        .arg("--max-backoff-ms")
        .arg("1000")
        // The coordinator stops its own agents when its runs are over (or it is).
        .arg("--on-sigterm")
        .arg("stop")
        .env("PYPE_OVERLAY_MODE", &opts.backend)
        .env("PYPE_SNAPSHOT_REGISTRY", dir.join("snapshot_registry.json"))
        .env_remove("PYPE_AGENT_CONFIG")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // SAFETY: `pre_exec` is unsafe by std's API (the closure runs between fork and exec);
    // it only makes prctl(PR_SET_PDEATHSIG), which is async-signal-safe and allocates
    // nothing: this child gets SIGTERM when the thread that spawned it (a runtime worker,
    // alive as long as the process) exits.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))?;
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting local agent {name}"))
}

/// Most labels of one agent that become `pype_agents_by_label` series.
const MAX_LABELS_PER_AGENT: usize = 8;

/// Serves the metrics at `addr` until `shutdown`: what the hub shows (agents, the agents'
/// caches) is read at each scrape; what takes IO (the store's size, instances and cost from
/// the state database) on a blocking thread at most every `SnapshotStore::usage_every`, a
/// scrape showing the last figures.
async fn export_metrics(addr: SocketAddr, hub: &Arc<Hub>, shutdown: CancellationToken) -> Result<()> {
    let listener = transport::httpd::bind(addr)
        .await
        .with_context(|| format!("listening for metrics scrapes on {addr}"))?;
    let weak = Arc::downgrade(hub);
    metrics::get().on_scrape(move |m| {
        let Some(hub) = weak.upgrade() else { return };
        let views = hub.agent_views();
        let (mut ready, mut draining, mut cache_bytes) = (0, 0, 0u64);
        m.agents_by_label.clear();
        for v in &views {
            let state = if v.draining { "draining" } else { "ready" };
            if v.draining {
                draining += 1;
            } else {
                ready += 1;
            }
            cache_bytes = cache_bytes.saturating_add(v.stats.cache_bytes);
            // Labels come from agents: only their first few, in a safe alphabet (the metric
            // text is not escaped by the encoder), become series.
            let labels: Vec<String> = v
                .labels
                .iter()
                .take(MAX_LABELS_PER_AGENT)
                .map(|(k, v)| metrics::label_value(&format!("{k}={v}")))
                .collect();
            for label in if labels.is_empty() { vec!["none".to_string()] } else { labels } {
                m.agents_by_label.get_or_create(&[("state", state.to_string()), ("label", label)]).inc();
            }
        }
        m.agents.get_or_create(&metrics::l1("state", "ready")).set(ready);
        m.agents.get_or_create(&metrics::l1("state", "draining")).set(draining);
        m.agent_cache_bytes.set(i64::try_from(cache_bytes).unwrap_or(i64::MAX));
    });
    // Figures that take IO: measured off the scrape's task, a scrape shows the last ones.
    let store = hub.store().clone();
    let state = hub.state().clone();
    let every = store.usage_every();
    let last: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    metrics::get().on_scrape(move |_| {
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        let due = last.is_none_or(|t| t.elapsed() >= every);
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        if !due || busy.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        *last = Some(Instant::now());
        let (store, state, busy) = (store.clone(), state.clone(), busy.clone());
        rt.spawn_blocking(move || {
            let m = metrics::get();
            // The state database's figures: instances by state, and what they cost.
            if let Ok(cost) = crate::run::cost::load(&state, None) {
                for (part, v) in [("steps", cost.steps), ("boot", cost.boot), ("idle", cost.idle)] {
                    m.cost.get_or_create(&metrics::l1("part", part)).set(v);
                }
            }
            if let Ok(instances) = state.instances(false) {
                let mut counts: std::collections::BTreeMap<(String, String), i64> = Default::default();
                for i in instances {
                    *counts.entry((i.provider, i.state)).or_default() += 1;
                }
                m.instances.clear();
                for ((provider, state), n) in counts {
                    m.instances.get_or_create(&[("provider", provider), ("state", state)]).set(n);
                }
            }
            match store.usage() {
                Ok((snapshots, bytes)) => {
                    metrics::get().store_snapshots.set(i64::try_from(snapshots).unwrap_or(i64::MAX));
                    metrics::get().store_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
                }
                Err(e) => tracing::debug!("metrics: store usage: {e:#}"),
            }
            busy.store(false, std::sync::atomic::Ordering::Release);
        });
    });
    let served = tokio::spawn(transport::httpd::serve(listener, Arc::new(|| metrics::get().render())));
    tokio::spawn(async move {
        shutdown.cancelled().await;
        served.abort();
    });
    Ok(())
}
