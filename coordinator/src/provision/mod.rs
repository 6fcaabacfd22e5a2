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
pub mod planner;
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
use planner::Planner;
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
    /// Follows `demand` until `shutdown`, then terminates every instance it made. The
    /// decisions are the [`Planner`]'s; this feeds it the demand, the connected agents and
    /// the provider's answers, and carries out its actions.
    pub async fn run(self, mut demand: watch::Receiver<Demand>, shutdown: CancellationToken) {
        let settings = planner::Settings {
            min_instances: self.cfg.min_instances,
            max_instances: self.cfg.max_instances,
            boot_timeout: Duration::from_secs(self.cfg.boot_timeout_secs),
            idle_timeout: Duration::from_secs(self.cfg.idle_timeout_secs),
            heartbeat_window: self.coord.heartbeat_window(),
            sweep_interval: Duration::from_secs(self.cfg.sweep_interval_secs),
            prestarts: self.provider.prestarts(),
        };
        let new_id = Box::new(|| format!("pype-i-{:012x}", rand::random::<u64>() >> 16));
        let mut plan = Planner::new(settings, Instant::now(), new_id);
        let mut marks: HashMap<String, usize> = HashMap::new();
        let mut members = self.coord.membership();
        loop {
            plan.handle(Instant::now(), planner::Event::Demand(demand.borrow().clone()));
            plan.handle(Instant::now(), planner::Event::Agents(self.seen()));
            self.follow_boots(&mut plan, &mut marks).await;
            self.carry_out(&mut plan, &mut marks).await;
            // Console lines of booting instances are polled; otherwise wake when the planner
            // has something due.
            let poll = Instant::now() + Duration::from_millis(500);
            let wake = plan.next_timeout().map_or(poll, |t| t.min(poll));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = demand.changed() => if r.is_err() { break },
                _ = members.changed() => {}
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        plan.handle(Instant::now(), planner::Event::Shutdown);
        self.carry_out(&mut plan, &mut marks).await;
    }

    fn seen(&self) -> Vec<planner::Seen> {
        self.coord
            .agent_views()
            .into_iter()
            .map(|a| planner::Seen { agent_id: a.agent_id, draining: a.draining, slots: a.slots })
            .collect()
    }

    /// Boot progress from the consoles of instances not joined yet, once per mark; an
    /// instance the provider says stopped is reported to the planner.
    async fn follow_boots(&self, plan: &mut Planner, marks: &mut HashMap<String, usize>) {
        for (id, pid, requested) in plan.booting() {
            let seen = marks.entry(id.clone()).or_insert(0);
            if let Ok(Some(console)) = self.provider.console(&pid).await {
                while *seen < BOOT_MARKS.len() && boot_mark(&console, *seen) {
                    info!(
                        instance = %id,
                        after_ms = requested.elapsed().as_millis() as u64,
                        "instance boot: {}",
                        BOOT_MARKS[*seen].1
                    );
                    *seen += 1;
                }
            }
            let described = self.provider.describe(&pid).await;
            self.called("describe", &described);
            if matches!(described, Ok(InstanceState::Gone)) {
                plan.handle(Instant::now(), planner::Event::Stopped { id });
            }
        }
    }

    /// Carries out the planner's actions until it has none (a create's result is fed back
    /// and may lead to more).
    async fn carry_out(&self, plan: &mut Planner, marks: &mut HashMap<String, usize>) {
        while let Some(action) = plan.poll_action() {
            match action {
                planner::Action::Create { id, need, run } => {
                    let event = match self.create(&id, need, run).await {
                        Ok(provider_id) => planner::Event::Created { id, provider_id },
                        Err(e) => {
                            let kind = provider::error_kind(&e);
                            planner::Event::CreateFailed { id, kind, message: format!("{e:#}") }
                        }
                    };
                    plan.handle(Instant::now(), event);
                }
                planner::Action::Joined { id, boot } => {
                    marks.remove(&id);
                    let provider = crate::metrics::l1("provider", self.provider.name());
                    crate::metrics::get().boot_seconds.get_or_create(&provider).observe(boot.as_secs_f64());
                    let _ = self.state.instance_update(&id, "joined", None, None);
                    info!(
                        instance = %id,
                        provider = self.provider.name(),
                        boot_ms = boot.as_millis() as u64,
                        "instance joined: agent connected"
                    );
                }
                planner::Action::Terminate { id, provider_id, reason, failed_to_join } => {
                    marks.remove(&id);
                    if failed_to_join {
                        let tail = match &provider_id {
                            Some(pid) => self.provider.console(pid).await.ok().flatten().unwrap_or_default(),
                            None => String::new(),
                        };
                        let tail: Vec<&str> =
                            tail.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
                        warn!(
                            instance = %id,
                            "instance failed to join ({reason}); console tail:\n{}",
                            tail.join("\n")
                        );
                    }
                    self.terminate(&id, provider_id, &reason).await;
                }
                planner::Action::CreateError(e) => self.coord.set_provisioning_error(e),
                planner::Action::NoCapacity { message, retry_in } => warn!(
                    provider = self.provider.name(),
                    retry_in_s = retry_in.as_secs(),
                    "no capacity for an instance: the step stays queued ({message})"
                ),
                planner::Action::Refused(Some(message)) => {
                    tracing::error!(
                        provider = self.provider.name(),
                        refusals = planner::REFUSALS_TO_GIVE_UP,
                        "provisioning: the provider refuses to create instances as configured: {message}"
                    );
                    self.coord.set_provisioning_refused(Some(message));
                }
                planner::Action::Refused(None) => self.coord.set_provisioning_refused(None),
                planner::Action::Failed { message, retry_in } => {
                    warn!(retry_in_s = retry_in.as_secs(), "provisioning: {message}")
                }
                planner::Action::Sweep => {
                    if let Err(e) = self.sweep(&plan.instances()).await {
                        warn!("reconciler: {e:#}");
                    }
                }
            }
        }
    }

    /// Counts a provider API call in the metrics, by its result.
    fn called<T>(&self, call: &str, result: &Result<T>) {
        let result = match result {
            Ok(_) => "ok",
            Err(e) => match provider::error_kind(e) {
                provider::ErrorKind::Capacity => "capacity",
                provider::ErrorKind::Refused => "refused",
                provider::ErrorKind::Transient => "transient",
            },
        };
        crate::metrics::get().provider_call(self.provider.name(), call, result);
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

    /// Creates instance `id` (its intent recorded first); returns the provider's id.
    async fn create(&self, id: &str, need: Option<Need>, run: Option<String>) -> Result<String> {
        self.state.instance_intent(id, self.provider.name(), run.as_deref())?;
        let requested = Instant::now();
        let launch = match self.launch(id) {
            Ok(l) => l,
            Err(e) => {
                self.state.instance_update(id, "terminated", None, Some(&format!("launch: {e:#}")))?;
                return Err(e.context("preparing the instance's launch"));
            }
        };
        let mut tags = BTreeMap::new();
        tags.insert(TAG_COORDINATOR.to_string(), self.tag.clone());
        tags.insert(TAG_INSTANCE.to_string(), id.to_string());
        if let Some(run) = &run {
            tags.insert(TAG_RUN.to_string(), run.clone());
        }
        // Empty for an instance started before any step was ready (the run's planning agent).
        tags.insert(TAG_STEP.to_string(), need.as_ref().map(|n| n.step.clone()).unwrap_or_default());
        let (cpus, memory_bytes) = need.as_ref().map_or((1, 0), |n| (n.cpus, n.memory_bytes));
        let spec = InstanceSpec { instance_id: id.to_string(), cpus, memory_bytes, tags };
        let created = self.provider.create(&spec, &launch).await;
        self.called("create", &created);
        match created {
            Ok(pid) => {
                if std::env::var_os("PYPE_FAULT_KILL_AFTER_CREATE").is_some() {
                    // For the crash test: the instance exists, the database does not know its id.
                    warn!(instance = %id, provider_id = %pid, "fault injection: SIGKILL after create");
                    let _ = rustix::process::kill_process(
                        rustix::process::getpid(),
                        rustix::process::Signal::KILL,
                    );
                }
                self.state.instance_update(id, "booting", Some(&pid), None)?;
                if let Some(price) = self.provider.price_per_hour(&pid).or(self.cfg.price_per_hour) {
                    self.state.instance_price(id, price)?;
                }
                info!(
                    instance = %id,
                    provider = self.provider.name(),
                    provider_id = %pid,
                    create_ms = requested.elapsed().as_millis() as u64,
                    "instance requested"
                );
                Ok(pid)
            }
            Err(e) => {
                // Whatever the failed create left behind goes too.
                let _ = self.provider.terminate(id).await;
                self.state.instance_update(id, "terminated", None, Some(&format!("create failed: {e:#}")))?;
                Err(e.context(format!("creating instance {id}")))
            }
        }
    }

    async fn terminate(&self, id: &str, provider_id: Option<String>, why: &str) {
        let pid = provider_id.unwrap_or_else(|| id.to_string());
        let _ = self.state.instance_update(id, "terminating", None, Some(why));
        let terminated = self.provider.terminate(&pid).await;
        self.called("terminate", &terminated);
        match terminated {
            Ok(()) => {
                let _ = self.state.instance_update(id, "terminated", None, Some(why));
                let _ = self.state.revoke(id);
                info!(instance = %id, provider = self.provider.name(), reason = why, "instance terminated");
            }
            Err(e) => warn!(instance = %id, "terminating: {e:#} (the reconciler will retry)"),
        }
    }

    /// Terminates tagged instances that are neither ours nor live in the database.
    async fn sweep(&self, mine: &[(String, Option<String>)]) -> Result<()> {
        let accounted: HashSet<String> = self
            .state
            .instances(true)?
            .into_iter()
            .flat_map(|r| [Some(r.instance_id), r.provider_id])
            .flatten()
            .collect();
        let ours: HashSet<&String> =
            mine.iter().flat_map(|(id, pid)| [Some(id), pid.as_ref()]).flatten().collect();
        let listed = self.provider.list(&self.tag).await;
        self.called("list", &listed);
        for listed in listed? {
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
