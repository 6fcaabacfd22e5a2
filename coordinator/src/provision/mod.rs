//! The instance lifecycle, the same for every [`Provider`]: instances follow the engine's
//! demand, each create is an intent in the state database before the provider is called,
//! an instance whose agent does not connect within `boot_timeout_secs` is terminated (and
//! replaced while the demand lasts), idle instances beyond the demand are terminated, and a
//! reconciler terminates every tagged instance the database does not account for: at start
//! ([`startup_sweep`], before the server listens) and every `sweep_interval_secs`.
//!
//! Instance states in the database: `creating` (intent) → `booting` (provider id known) →
//! `joined` (its agent connected) → `terminated` (with a note saying why).

pub mod cloudinit;
pub mod provider;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::hub::Hub;
use crate::persist::state::State;
use crate::persist::working::WorkingRegistry;
use provider::{
    InstanceSpec, InstanceState, Provider, ProviderConfig, TAG_COORDINATOR, TAG_INSTANCE, TAG_RUN, TAG_STEP,
};

/// What the engine wants from the provisioner right now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Demand {
    /// Agents wanted: steps not yet ended (at least one while the run plans).
    pub want: usize,
    /// Of those, the steps ready or running: all a provider whose instances start in seconds
    /// provides for.
    pub active: usize,
    /// Agents running a step: never terminated for being idle.
    pub busy: HashSet<String>,
    /// The run the instances work for (a tag).
    pub run: Option<String>,
    /// Steps no agent runs yet, ready ones first: a new instance is sized for the first one
    /// no booting instance was made for.
    pub unplaced: Vec<Need>,
}

/// What one step asks of an instance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Need {
    pub step: String,
    pub cpus: u32,
    pub memory_bytes: u64,
}

/// Lines on an instance's console that mark boot progress, reported once each.
const BOOT_MARKS: &[(&str, &str)] = &[
    ("Linux version", "kernel started"),
    ("running 'init-local'", "cloud-init init-local"),
    ("running 'init'", "cloud-init init (network up)"),
    ("running 'modules:config'", "cloud-init modules:config"),
    ("running 'modules:final'", "cloud-init modules:final"),
    ("pype-agent.service", "pype-agent unit started"),
    ("Cloud-init v.", "cloud-init finished"),
];

fn boot_mark(console: &str, mark: usize) -> bool {
    let (needle, _) = BOOT_MARKS[mark];
    if mark == BOOT_MARKS.len() - 1 {
        return console.contains("finished at");
    }
    console.contains(needle)
}

/// When the next create may be tried, after consecutive failures.
struct Pace {
    after: Instant,
    failures: u32,
    /// Consecutive creates the provider refused ([`provider::Refused`]).
    refusals: u32,
}

/// Refused creates in a row after which the run is told no instance is coming (a few, as a
/// just-made instance profile or subnet can take seconds to be seen).
const REFUSALS_TO_GIVE_UP: u32 = 3;

struct Mine {
    /// The step the instance was sized for.
    for_step: Option<String>,
    provider_id: Option<String>,
    requested: Instant,
    joined: Option<Instant>,
    gone_since: Option<Instant>,
    marks_seen: usize,
    /// Since when it has been connected without a step.
    idle_since: Option<Instant>,
}

pub struct Provisioner {
    pub provider: Arc<dyn Provider>,
    pub cfg: ProviderConfig,
    pub coord: Arc<Hub>,
    pub state: Arc<State>,
    pub registry: Arc<WorkingRegistry>,
    /// This coordinator's tag value.
    pub tag: String,
    /// HOST:PORT at which instances reach the coordinator.
    pub coordinator_addr: String,
    pub ca_pem: String,
}

/// Terminates every instance a previous coordinator on this state dir left behind: tagged
/// instances the provider lists, and database rows not terminated. Run before the server
/// accepts agents, so none of them joins.
pub async fn startup_sweep(provider: &dyn Provider, state_dir: &Path, state: &State) -> Result<usize> {
    let Ok(ca_pem) = std::fs::read_to_string(state_dir.join("ca.pem")) else { return Ok(0) };
    let tag = provider::coordinator_tag(&ca_pem);
    let mut n = 0;
    for listed in provider.list(&tag).await? {
        warn!(
            provider = provider.name(),
            instance = %listed.provider_id,
            state = ?listed.state,
            "reconciler: terminating an instance left by a previous coordinator"
        );
        provider.terminate(&listed.provider_id).await?;
        let _ = state.revoke(&listed.provider_id);
        n += 1;
    }
    for row in state.instances(true)? {
        if row.provider != provider.name() {
            continue;
        }
        if let Some(pid) = &row.provider_id {
            provider.terminate(pid).await?;
        }
        let _ = state.revoke(&row.instance_id);
        state.instance_update(&row.instance_id, "terminated", None, Some("coordinator restarted"))?;
    }
    Ok(n)
}

impl Provisioner {
    /// Follows `demand` until `shutdown`, then terminates every instance it made.
    pub async fn run(self, mut demand: watch::Receiver<Demand>, shutdown: CancellationToken) {
        let mut mine: HashMap<String, Mine> = HashMap::new();
        let mut next_sweep = Instant::now() + Duration::from_secs(self.cfg.sweep_interval_secs);
        let mut pace = Pace { after: Instant::now(), failures: 0, refusals: 0 };
        let mut members = self.coord.membership();
        loop {
            let d = demand.borrow().clone();
            self.observe(&mut mine).await;
            if let Err(e) = self.scale(&d, &mut mine, &mut pace).await {
                warn!("provisioning: {e:#}");
            }
            if Instant::now() >= next_sweep {
                next_sweep = Instant::now() + Duration::from_secs(self.cfg.sweep_interval_secs);
                if let Err(e) = self.sweep(&mine).await {
                    warn!("reconciler: {e:#}");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = demand.changed() => if r.is_err() { break },
                _ = members.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        let ids: Vec<String> = mine.keys().cloned().collect();
        for id in ids {
            self.terminate(&id, &mut mine, "run ended").await;
        }
    }

    /// Joins, losses, boot progress and boot timeouts.
    async fn observe(&self, mine: &mut HashMap<String, Mine>) {
        let connected: HashSet<String> = self.coord.agent_views().into_iter().map(|a| a.agent_id).collect();
        let boot_timeout = Duration::from_secs(self.cfg.boot_timeout_secs);
        let mut doomed: Vec<(String, String)> = Vec::new();
        for (id, m) in mine.iter_mut() {
            if connected.contains(id) {
                m.gone_since = None;
                if m.joined.is_none() {
                    m.joined = Some(Instant::now());
                    let _ = self.state.instance_update(id, "joined", None, None);
                    info!(
                        instance = %id,
                        provider = self.provider.name(),
                        boot_ms = m.requested.elapsed().as_millis() as u64,
                        "instance joined: agent connected"
                    );
                }
                continue;
            }
            match m.joined {
                None => {
                    if let Some(pid) = &m.provider_id {
                        if let Ok(Some(console)) = self.provider.console(pid).await {
                            while m.marks_seen < BOOT_MARKS.len() && boot_mark(&console, m.marks_seen) {
                                info!(
                                    instance = %id,
                                    after_ms = m.requested.elapsed().as_millis() as u64,
                                    "instance boot: {}",
                                    BOOT_MARKS[m.marks_seen].1
                                );
                                m.marks_seen += 1;
                            }
                        }
                        if matches!(self.provider.describe(pid).await, Ok(InstanceState::Gone)) {
                            doomed.push((id.clone(), "stopped before its agent connected".into()));
                            continue;
                        }
                    }
                    if m.requested.elapsed() > boot_timeout {
                        doomed.push((
                            id.clone(),
                            format!("boot timeout: no agent within {}s", self.cfg.boot_timeout_secs),
                        ));
                    }
                }
                Some(_) => {
                    let since = *m.gone_since.get_or_insert_with(Instant::now);
                    // The engine declares the agent lost after the heartbeat window; the
                    // instance goes once it has been gone that long too.
                    if since.elapsed() > self.coord.heartbeat_window() {
                        doomed.push((id.clone(), "agent lost".into()));
                    }
                }
            }
        }
        for (id, why) in doomed {
            if why.starts_with("boot timeout") || why.starts_with("stopped") {
                let tail = match mine.get(&id).and_then(|m| m.provider_id.clone()) {
                    Some(pid) => self.provider.console(&pid).await.ok().flatten().unwrap_or_default(),
                    None => String::new(),
                };
                let tail: Vec<&str> =
                    tail.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
                warn!(instance = %id, "instance failed to join ({why}); console tail:\n{}", tail.join("\n"));
            }
            self.terminate(&id, mine, &why).await;
        }
    }

    async fn scale(&self, d: &Demand, mine: &mut HashMap<String, Mine>, pace: &mut Pace) -> Result<()> {
        let floor = if d.want > 0 { self.cfg.min_instances } else { 0 };
        let steps = if self.provider.prestarts() { d.want } else { d.active };
        let views = self.coord.agent_views();
        // Agents that are not ours (persistent ones) take steps first.
        let others: usize = views
            .iter()
            .filter(|a| !a.draining && !mine.contains_key(&a.agent_id))
            .map(|a| a.slots.max(1) as usize)
            .sum();
        let want = steps.saturating_sub(others).max(floor).min(self.cfg.max_instances);
        let now = Instant::now();
        for (id, m) in mine.iter_mut() {
            if m.joined.is_some() && !d.busy.contains(id) {
                m.idle_since.get_or_insert(now);
            } else {
                m.idle_since = None;
            }
        }
        // Instances whose agents drain (their job is ending) are replaced while they finish.
        let draining: HashSet<String> =
            views.into_iter().filter(|a| a.draining).map(|a| a.agent_id).collect();
        let live = mine.keys().filter(|id| !draining.contains(*id)).count();
        if live < want && mine.len() < self.cfg.max_instances + draining.len() && Instant::now() >= pace.after
        {
            let created = self.create(d, mine).await;
            self.coord.set_provisioning_error(created.as_ref().err().map(|e| format!("{e:#}")));
            match created {
                Ok(()) => {
                    pace.failures = 0;
                    if pace.refusals >= REFUSALS_TO_GIVE_UP {
                        self.coord.set_provisioning_refused(None);
                    }
                    pace.refusals = 0;
                }
                Err(e) => {
                    // Do not hammer a failing provider: 2 s, 4 s, ... up to a minute.
                    pace.failures += 1;
                    let wait = Duration::from_secs(1u64 << pace.failures.min(6)).min(Duration::from_secs(60));
                    pace.after = Instant::now() + wait;
                    if let Some(c) = e.root_cause().downcast_ref::<provider::aws::Capacity>() {
                        warn!(
                            provider = self.provider.name(),
                            code = %c.code,
                            instance_type = %c.instance_type,
                            retry_in_s = wait.as_secs(),
                            "no capacity for an instance: the step stays queued ({})",
                            c.message
                        );
                        return Ok(());
                    }
                    if e.root_cause().downcast_ref::<provider::Refused>().is_some() {
                        pace.refusals += 1;
                        if pace.refusals == REFUSALS_TO_GIVE_UP {
                            tracing::error!(
                                provider = self.provider.name(),
                                refusals = pace.refusals,
                                "provisioning: the provider refuses to create instances as configured: {e:#}"
                            );
                            self.coord.set_provisioning_refused(Some(format!("{e:#}")));
                            return Ok(());
                        }
                    } else {
                        pace.refusals = 0;
                    }
                    return Err(e);
                }
            }
        }
        if live > want {
            // Idle joined instances first, then the youngest still booting (draining ones
            // leave by themselves).
            let idle_timeout = Duration::from_secs(self.cfg.idle_timeout_secs);
            let mut idle: Vec<(&String, &Mine)> = mine
                .iter()
                .filter(|(id, _)| !draining.contains(*id))
                .filter(|(_, m)| m.idle_since.is_some_and(|t| now.duration_since(t) >= idle_timeout))
                .collect();
            idle.sort_by_key(|(_, m)| m.requested);
            let mut booting: Vec<(&String, &Mine)> =
                mine.iter().filter(|(id, m)| m.joined.is_none() && !draining.contains(*id)).collect();
            booting.sort_by_key(|(_, m)| std::cmp::Reverse(m.requested));
            // Instances still booting go only when nothing else is wanted of them.
            if !idle_timeout.is_zero() {
                booting.clear();
            }
            let excess = live - want;
            let victims: Vec<String> =
                idle.into_iter().chain(booting).take(excess).map(|(id, _)| id.clone()).collect();
            for id in victims {
                self.terminate(&id, mine, "no work left for it").await;
            }
        }
        Ok(())
    }

    /// What a new instance `instance_id` gets: a fresh one-time token bound to it, and the
    /// user-data when the provider boots machines with cloud-init.
    pub fn launch(&self, instance_id: &str) -> Result<provider::Launch> {
        let ttl = self.cfg.boot_timeout_secs + 60;
        let token = self.state.create_token(Duration::from_secs(ttl), 1, Some(instance_id))?;
        let registry_json =
            if self.provider.wants_user_data() { self.registry.load()?.to_json() } else { String::new() };
        let boot = render_inputs(
            &self.cfg,
            instance_id,
            &self.coordinator_addr,
            &self.ca_pem,
            token,
            ttl,
            registry_json,
        );
        let user_data = if self.provider.wants_user_data() {
            let rendered = cloudinit::render(&boot)?;
            info!(instance = %instance_id, "user-data: {}", rendered.summary(self.cfg.user_data_limit));
            Some(rendered.text)
        } else {
            None
        };
        Ok(provider::Launch { boot, user_data })
    }

    async fn create(&self, d: &Demand, mine: &mut HashMap<String, Mine>) -> Result<()> {
        let id = format!("pype-i-{:012x}", rand::random::<u64>() >> 16);
        self.state.instance_intent(&id, self.provider.name(), d.run.as_deref())?;
        let requested = Instant::now();
        let launch = match self.launch(&id) {
            Ok(l) => l,
            Err(e) => {
                self.state.instance_update(&id, "terminated", None, Some(&format!("launch: {e:#}")))?;
                return Err(e.context("preparing the instance's launch"));
            }
        };
        let mut tags = BTreeMap::new();
        tags.insert(TAG_COORDINATOR.to_string(), self.tag.clone());
        tags.insert(TAG_INSTANCE.to_string(), id.clone());
        if let Some(run) = &d.run {
            tags.insert(TAG_RUN.to_string(), run.clone());
        }
        // Sized for the first step no booting instance was made for.
        let claimed: HashSet<&str> =
            mine.values().filter(|m| m.joined.is_none()).filter_map(|m| m.for_step.as_deref()).collect();
        let need = d.unplaced.iter().find(|n| !claimed.contains(n.step.as_str())).cloned();
        // Empty for an instance started before any step was ready (the run's planning agent).
        tags.insert(TAG_STEP.to_string(), need.as_ref().map(|n| n.step.clone()).unwrap_or_default());
        let (cpus, memory_bytes) = need.as_ref().map_or((1, 0), |n| (n.cpus, n.memory_bytes));
        let spec = InstanceSpec { instance_id: id.clone(), cpus, memory_bytes, tags };
        mine.insert(
            id.clone(),
            Mine {
                for_step: need.map(|n| n.step),
                provider_id: None,
                requested,
                joined: None,
                gone_since: None,
                marks_seen: 0,
                idle_since: None,
            },
        );
        match self.provider.create(&spec, &launch).await {
            Ok(pid) => {
                if std::env::var_os("PYPE_FAULT_KILL_AFTER_CREATE").is_some() {
                    // For the crash test: the instance exists, the database does not know its id.
                    warn!(instance = %id, provider_id = %pid, "fault injection: SIGKILL after create");
                    // SAFETY: kill and getpid have no preconditions.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                }
                self.state.instance_update(&id, "booting", Some(&pid), None)?;
                info!(
                    instance = %id,
                    provider = self.provider.name(),
                    provider_id = %pid,
                    create_ms = requested.elapsed().as_millis() as u64,
                    "instance requested"
                );
                if let Some(m) = mine.get_mut(&id) {
                    m.provider_id = Some(pid);
                }
                Ok(())
            }
            Err(e) => {
                // Whatever the failed create left behind goes too.
                let _ = self.provider.terminate(&id).await;
                mine.remove(&id);
                self.state.instance_update(
                    &id,
                    "terminated",
                    None,
                    Some(&format!("create failed: {e:#}")),
                )?;
                Err(e.context(format!("creating instance {id}")))
            }
        }
    }

    async fn terminate(&self, id: &str, mine: &mut HashMap<String, Mine>, why: &str) {
        let Some(m) = mine.remove(id) else { return };
        let pid = m.provider_id.unwrap_or_else(|| id.to_string());
        let _ = self.state.instance_update(id, "terminating", None, Some(why));
        match self.provider.terminate(&pid).await {
            Ok(()) => {
                let _ = self.state.instance_update(id, "terminated", None, Some(why));
                let _ = self.state.revoke(id);
                info!(instance = %id, provider = self.provider.name(), reason = why, "instance terminated");
            }
            Err(e) => warn!(instance = %id, "terminating: {e:#} (the reconciler will retry)"),
        }
    }

    /// Terminates tagged instances that are neither ours nor live in the database.
    async fn sweep(&self, mine: &HashMap<String, Mine>) -> Result<()> {
        let accounted: HashSet<String> = self
            .state
            .instances(true)?
            .into_iter()
            .flat_map(|r| [Some(r.instance_id), r.provider_id])
            .flatten()
            .collect();
        let ours: HashSet<&String> =
            mine.iter().flat_map(|(id, m)| [Some(id), m.provider_id.as_ref()]).flatten().collect();
        for listed in self.provider.list(&self.tag).await? {
            if ours.contains(&listed.provider_id) || accounted.contains(&listed.provider_id) {
                continue;
            }
            warn!(instance = %listed.provider_id, "reconciler: terminating an instance nothing accounts for");
            self.provider.terminate(&listed.provider_id).await?;
        }
        Ok(())
    }
}

pub fn render_inputs(
    cfg: &ProviderConfig,
    instance_id: &str,
    coordinator_addr: &str,
    ca_pem: &str,
    token: String,
    token_ttl_secs: u64,
    registry_json: String,
) -> cloudinit::Inputs {
    cloudinit::Inputs {
        instance_id: instance_id.to_string(),
        coordinator: coordinator_addr.to_string(),
        ca_pem: ca_pem.to_string(),
        token,
        token_ttl_secs,
        registry_json,
        registry_path: cfg.registry_path.clone(),
        agent: cfg.agent.clone(),
        backend: cfg.backend.clone(),
        orphan_timeout_secs: cfg.orphan_timeout_secs,
        orphan_action: "poweroff".into(),
        slots: 1,
        labels: Vec::new(),
        limit: cfg.user_data_limit,
    }
}

/// The CA certificate of the coordinator in `state_dir`.
pub fn ca_pem(state_dir: &Path) -> Result<String> {
    std::fs::read_to_string(state_dir.join("ca.pem"))
        .with_context(|| format!("reading {}", state_dir.join("ca.pem").display()))
}

/// This machine's host name (what other hosts of a cluster usually know it by).
pub fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}
