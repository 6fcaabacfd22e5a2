//! The state the server and the runs share: connected agents, attempts in flight and where
//! their events go, output checks in flight, results nobody waits for yet. The server feeds it
//! what agents say; a run dispatches through it and hears its attempts' events from it. What
//! the server asks of a run (submit, cancel, the working registry) goes through [`Runs`], which
//! the run layer implements: the hub imports nothing above it.

pub mod away;
pub mod unclaimed;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use protocol::{
    AgentInfo, CoordinatorToAgent, HostFacts, LogLine, RegistryEntry, RemoteError, RunEvent, StepOutcome,
    StepSpec,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use transport::{pki, tree::UnpackLimits};

use crate::persist::state::State;
use crate::store::SnapshotStore;
use unclaimed::Unclaimed;

/// What the server asks of the run layer (implemented by `run::Engine`).
#[async_trait::async_trait]
pub trait Runs: Send + Sync {
    /// The working registry as JSON (for an agent that asks for all of it).
    fn registry_json(&self) -> Result<String>;
    /// The working registry.
    fn registry(&self) -> Result<protocol::Registry>;
    /// Cancels `step` of the running `run`.
    fn cancel_step(&self, run: &str, step: &str) -> Result<()>;
    /// Runs a submitted pipeline (JSON) with its options (JSON), sending its events to
    /// `events`; returns (run id, succeeded, summary). `Err` is a message for the client.
    async fn submit(
        &self,
        pipeline_json: &str,
        options_json: &str,
        events: mpsc::UnboundedSender<RunEvent>,
        shutdown: CancellationToken,
    ) -> std::result::Result<(String, bool, String), String>;
}

pub struct ServerConfig {
    pub heartbeat_interval: Duration,
    /// Heartbeats missed in a row before an agent counts as lost.
    pub heartbeats_missed: u32,
    pub client_cert_days: i64,
    pub unpack_limits: UnpackLimits,
    /// Bounds of the results kept for attempts nobody waits for yet.
    pub unclaimed: crate::hub::unclaimed::Limits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            heartbeats_missed: 3,
            client_cert_days: 365,
            unpack_limits: UnpackLimits::default(),
            unclaimed: Default::default(),
        }
    }
}

/// A connection the server accepted from an agent that said Hello.
pub struct Joining {
    pub conn: quinn::Connection,
    pub host: HostFacts,
    pub slots: u32,
    pub labels: Vec<(String, String)>,
    pub outbox: mpsc::Sender<CoordinatorToAgent>,
}

struct ConnectedAgent {
    conn: quinn::Connection,
    conn_serial: u64,
    addr: SocketAddr,
    host: HostFacts,
    connected_at: Instant,
    last_heartbeat: Instant,
    load_average: f64,
    slots: u32,
    labels: Vec<(String, String)>,
    outbox: mpsc::Sender<CoordinatorToAgent>,
    /// It said `Draining`: no new work for it.
    draining: bool,
    /// The attempts it said it holds (running or with a result to deliver), once it said so.
    in_hand: Option<Vec<u64>>,
    /// Its last reported totals (minor 7).
    stats: protocol::AgentStats,
}

/// What happens to a dispatched attempt, in order: `Started`, any number of `Output`,
/// one `Finished`.
#[derive(Debug, Clone)]
pub enum StepEvent {
    Started {
        backend: String,
        view: String,
    },
    Output(Vec<LogLine>),
    /// What the attempt used (from agents of minor 7 on), just before `Finished`.
    Usage(protocol::ResourceUsage),
    Finished(StepOutcome),
}

/// Where an attempt's events go, tagged with its id so one receiver can serve many attempts.
pub type EventSink = mpsc::UnboundedSender<(u64, StepEvent)>;

struct Attempt {
    agent: String,
    events: EventSink,
}

/// A connected agent as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct AgentView {
    pub agent_id: String,
    pub host: HostFacts,
    pub slots: u32,
    pub labels: Vec<(String, String)>,
    /// Finishing its steps before it leaves: place nothing new on it.
    pub draining: bool,
    /// Attempts it holds, as it reported after connecting (`None` until it has).
    pub in_hand: Option<Vec<u64>>,
    /// Its last reported totals (zero until it reports; agents of minor 6 never do).
    pub stats: protocol::AgentStats,
    /// Its connection's serial: higher after every reconnect. `in_hand` is what it said on
    /// this connection, so it is silent about attempts sent on this connection after it said.
    pub serial: u64,
}

/// What became of a result an agent sent, which says whether to acknowledge it now. An agent
/// keeps a result until it is acknowledged and sends it again after a reconnect, so a result is
/// acknowledged only once it is recorded (by whoever awaited it) or will never be wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// To the run (or operator) awaiting it, which acknowledges it once recorded
    /// ([`Hub::ack_result`]).
    Awaited,
    /// Kept in memory for a run that may adopt the attempt, or not kept (the database failed,
    /// too many kept): not acknowledged, so the agent still holds it.
    Later,
    /// Refused or of an attempt that ended: acknowledge it, nobody will want it.
    Done,
}

/// An attempt handed to an agent's connection.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub attempt_id: u64,
    /// The serial of the connection it went out on (see [`AgentView::serial`]).
    pub serial: u64,
}

pub type CheckReply = Result<Vec<(String, Option<u64>)>, RemoteError>;

/// Most (attempt, sender) pairs whose refusal was logged, before the set starts over.
const MAX_REFUSALS_REMEMBERED: usize = 4096;

pub struct Hub {
    state: Arc<State>,
    ca: pki::Ca,
    config: ServerConfig,
    store: Arc<dyn SnapshotStore>,
    agents: Mutex<HashMap<String, ConnectedAgent>>,
    attempts: Mutex<HashMap<u64, Attempt>>,
    /// Output checks in flight: the agent asked, and where its answer goes.
    checks: Mutex<HashMap<u64, (String, oneshot::Sender<CheckReply>)>>,
    /// Results of attempts nobody waited for when they came (agents reporting to a restarted
    /// coordinator before its run adopts the attempts), with the agent that sent each.
    unclaimed: Mutex<Unclaimed>,
    /// Messages refused because their sender does not hold the attempt: (attempt, sender,
    /// kind), each logged once.
    refusals: Mutex<std::collections::HashSet<(u64, String, &'static str)>>,
    next_serial: std::sync::atomic::AtomicU64,
    /// Bumped whenever an agent joins or leaves.
    members: tokio::sync::watch::Sender<u64>,
    runs: std::sync::OnceLock<Arc<dyn Runs>>,
    shutdown: CancellationToken,
    /// Why the provisioner's last create failed (`None` after a success), for the operator
    /// who is told no agent came.
    provisioning_error: Mutex<Option<String>>,
    /// Set when the provider refused creates again and again: no instance is coming.
    provisioning_refused: Mutex<Option<String>>,
}

/// A fresh attempt id: random, 52 bits (exact in JSON numbers), never 0.
pub fn new_attempt_id() -> u64 {
    (rand::random::<u64>() >> 12) | 1
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    pub fn new(
        state: Arc<State>,
        ca: pki::Ca,
        config: ServerConfig,
        store: Arc<dyn SnapshotStore>,
    ) -> Arc<Self> {
        let unclaimed = Unclaimed::new(config.unclaimed);
        Arc::new(Self {
            state,
            ca,
            config,
            store,
            agents: Mutex::new(HashMap::new()),
            attempts: Mutex::new(HashMap::new()),
            checks: Mutex::new(HashMap::new()),
            unclaimed: Mutex::new(unclaimed),
            refusals: Mutex::new(Default::default()),
            next_serial: std::sync::atomic::AtomicU64::new(1),
            members: tokio::sync::watch::Sender::new(0),
            runs: std::sync::OnceLock::new(),
            shutdown: CancellationToken::new(),
            provisioning_error: Mutex::new(None),
            provisioning_refused: Mutex::new(None),
        })
    }

    /// Lets this coordinator run submitted pipelines.
    pub fn set_runs(&self, runs: Arc<dyn Runs>) {
        let _ = self.runs.set(runs);
    }

    pub fn runs(&self) -> Option<Arc<dyn Runs>> {
        self.runs.get().cloned()
    }

    /// Cancelled when the coordinator shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Records the outcome of the provisioner's last create.
    pub fn set_provisioning_error(&self, error: Option<String>) {
        *lock(&self.provisioning_error) = error;
    }

    pub fn provisioning_error(&self) -> Option<String> {
        lock(&self.provisioning_error).clone()
    }

    /// Records that the provider keeps refusing creates (`None`: it created one after all),
    /// and wakes whoever waits on membership.
    pub fn set_provisioning_refused(&self, reason: Option<String>) {
        *lock(&self.provisioning_refused) = reason;
        self.members.send_modify(|g| *g += 1);
    }

    pub fn provisioning_refused(&self) -> Option<String> {
        lock(&self.provisioning_refused).clone()
    }

    /// Changes whenever an agent joins or leaves.
    pub fn membership(&self) -> tokio::sync::watch::Receiver<u64> {
        self.members.subscribe()
    }

    /// The next event of an attempt held by `agent`: `Ok(None)` once its events ended,
    /// `Err(reason)` once `away` says the agent has been away longer than the heartbeat
    /// window (a reconnect within it keeps the attempt). `away` carries the absence from one
    /// call to the next. For attempts followed outside a run (`step run`, program builds).
    pub async fn next_attempt_event(
        &self,
        agent: &str,
        away: &mut away::Away,
        events: &mut mpsc::UnboundedReceiver<(u64, StepEvent)>,
    ) -> std::result::Result<Option<StepEvent>, String> {
        let mut members = self.membership();
        loop {
            let wake = match away.observe(Instant::now(), self.connection_of(agent).is_some()) {
                away::Verdict::Present => None,
                away::Verdict::Away { until } => Some(until),
                away::Verdict::Lost { reason } => return Err(reason),
            };
            tokio::select! {
                ev = events.recv() => {
                    // Its consumers (an operator's `step run`, a program build) record nothing
                    // that outlives the coordinator: the result is acknowledged as it comes.
                    if let Some((attempt_id, StepEvent::Finished(_))) = &ev {
                        self.ack_result(agent, *attempt_id);
                    }
                    return Ok(ev.map(|(_, event)| event));
                }
                _ = members.changed() => {}
                _ = sleep_until_or_forever(wake) => {}
            }
        }
    }

    pub fn heartbeat_window(&self) -> Duration {
        self.config.heartbeat_interval * self.config.heartbeats_missed.max(1)
    }

    /// Connected agents with what they offer.
    pub fn agent_views(&self) -> Vec<AgentView> {
        let mut out: Vec<AgentView> = self
            .agents()
            .iter()
            .map(|(id, a)| AgentView {
                agent_id: id.clone(),
                host: a.host.clone(),
                slots: a.slots,
                labels: a.labels.clone(),
                draining: a.draining,
                in_hand: a.in_hand.clone(),
                stats: a.stats.clone(),
                serial: a.conn_serial,
            })
            .collect();
        out.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        out
    }

    /// How many agents are connected.
    pub fn agent_count(&self) -> usize {
        self.agents().len()
    }

    /// Every connected agent's connection.
    pub fn connections(&self) -> Vec<(String, quinn::Connection)> {
        self.agents().iter().map(|(id, a)| (id.clone(), a.conn.clone())).collect()
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub fn ca(&self) -> &pki::Ca {
        &self.ca
    }

    /// Records a connected agent; a previous connection of the same agent is closed as
    /// replaced. Returns the connection's serial, which [`Hub::leave`] takes.
    pub fn join(&self, agent_id: &str, j: Joining) -> u64 {
        let serial = self.next_id();
        let now = Instant::now();
        let addr = j.conn.remote_address();
        let previous = self.agents().insert(
            agent_id.to_string(),
            ConnectedAgent {
                conn: j.conn,
                conn_serial: serial,
                addr,
                host: j.host,
                connected_at: now,
                last_heartbeat: now,
                load_average: 0.0,
                slots: j.slots,
                labels: j.labels,
                outbox: j.outbox,
                draining: false,
                in_hand: None,
                stats: Default::default(),
            },
        );
        self.members.send_modify(|g| *g += 1);
        if let Some(prev) = previous {
            prev.conn.close(
                quinn::VarInt::from_u32(protocol::CloseCode::Replaced as u32),
                b"replaced by a newer connection of the same agent",
            );
        }
        serial
    }

    /// Removes the agent's connection `serial` (not a newer one); true when it was there.
    pub fn leave(&self, agent_id: &str, serial: u64) -> bool {
        let mut agents = self.agents();
        if agents.get(agent_id).is_some_and(|a| a.conn_serial == serial) {
            agents.remove(agent_id);
            drop(agents);
            self.members.send_modify(|g| *g += 1);
            return true;
        }
        false
    }

    pub fn heartbeat(&self, agent_id: &str, hb: &protocol::Heartbeat) {
        if let Some(a) = self.agents().get_mut(agent_id) {
            a.last_heartbeat = Instant::now();
            a.load_average = hb.load_average;
            a.host.memory_available_bytes = hb.memory_available_bytes;
            a.host.work_dir_free_bytes = hb.work_dir_free_bytes;
        }
    }

    /// The agent's reported totals.
    pub fn agent_stats(&self, agent_id: &str, stats: protocol::AgentStats) {
        crate::metrics::get().agent_cache_totals(agent_id, stats.cache_hits, stats.cache_misses);
        if let Some(a) = self.agents().get_mut(agent_id) {
            a.stats = stats;
        }
    }

    /// What the agent said it holds on its connection `serial`. A report read late from a
    /// connection the agent has since replaced is not taken for what it holds now.
    pub fn in_hand(&self, agent_id: &str, serial: u64, attempts: Vec<u64>) {
        if let Some(a) = self.agents().get_mut(agent_id).filter(|a| a.conn_serial == serial) {
            a.in_hand = Some(attempts);
        }
        self.members.send_modify(|g| *g += 1);
    }

    /// The agent said it drains (on its connection `serial`, which must be its current one).
    pub fn draining(&self, agent_id: &str, serial: u64) {
        if let Some(a) = self.agents().get_mut(agent_id).filter(|a| a.conn_serial == serial) {
            a.draining = true;
        }
        self.members.send_modify(|g| *g += 1);
    }

    /// An agent's answer to an output check: handed over only when that agent was asked.
    pub fn outputs_checked(&self, agent_id: &str, request_id: u64, result: CheckReply) {
        let mut checks = lock(&self.checks);
        match checks.get(&request_id) {
            Some((asked, _)) if asked == agent_id => {
                if let Some((_, tx)) = checks.remove(&request_id) {
                    let _ = tx.send(result);
                }
            }
            Some((asked, _)) => {
                let asked = asked.clone();
                drop(checks);
                self.refused(agent_id, &asked, request_id, "an output check answer");
            }
            None => {}
        }
    }

    /// Asks a connected agent to drain (finish its steps, take nothing new, leave).
    pub fn drain_agent(&self, agent: &str) -> Result<()> {
        let outbox = self.outbox_of(agent).ok_or_else(|| anyhow!("agent {agent} is not connected"))?;
        outbox
            .try_send(CoordinatorToAgent::Drain { reason: "drain requested by the operator".into() })
            .map_err(|e| anyhow!("agent {agent}: {e}"))?;
        info!(agent = %agent, "asked agent to drain");
        Ok(())
    }

    /// Stops waiting for an attempt: a result it sends later is discarded.
    pub fn forget_attempt(&self, attempt_id: u64) -> bool {
        lock(&self.attempts).remove(&attempt_id).is_some()
    }

    pub fn next_id(&self) -> u64 {
        self.next_serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn outbox_of(&self, agent: &str) -> Option<mpsc::Sender<CoordinatorToAgent>> {
        self.agents().get(agent).map(|a| a.outbox.clone())
    }

    /// Sends `spec` to `agent` and returns the attempt's events. An `attempt_id` of 0 is
    /// replaced by a fresh one (returned). The attempt stays registered until it finishes,
    /// across reconnects of the agent.
    pub async fn run_step(
        &self,
        agent: &str,
        spec: StepSpec,
    ) -> Result<(u64, mpsc::UnboundedReceiver<(u64, StepEvent)>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let sent = self.dispatch(agent, spec, tx).await?;
        Ok((sent.attempt_id, rx))
    }

    /// Like [`Coordinator::run_step`], with the events going to `events`.
    pub async fn dispatch(&self, agent: &str, mut spec: StepSpec, events: EventSink) -> Result<Sent> {
        if spec.attempt_id == 0 {
            spec.attempt_id = new_attempt_id();
        }
        let attempt_id = spec.attempt_id;
        let (outbox, serial) = self
            .agents()
            .get(agent)
            .map(|a| (a.outbox.clone(), a.conn_serial))
            .ok_or_else(|| anyhow!("agent {agent} is not connected"))?;
        lock(&self.attempts).insert(attempt_id, Attempt { agent: agent.to_string(), events });
        tracing::debug!(agent = %agent, run = %spec.run, step = %spec.step, attempt = attempt_id, "step dispatched");
        if outbox.send(CoordinatorToAgent::RunStep(Box::new(spec))).await.is_err() {
            lock(&self.attempts).remove(&attempt_id);
            return Err(anyhow!("agent {agent} disconnected"));
        }
        Ok(Sent { attempt_id, serial })
    }

    /// Tells `agent` its result of `attempt_id` is recorded: it may forget it. Best effort: an
    /// acknowledgement that cannot be queued is sent again when the agent resends the result.
    pub fn ack_result(&self, agent: &str, attempt_id: u64) {
        if let Some(outbox) = self.outbox_of(agent) {
            let _ = outbox.try_send(CoordinatorToAgent::StepResultAck { attempt_id });
        }
    }

    /// The attempt's result has not come yet (it was dispatched or adopted, and not delivered).
    pub fn awaiting(&self, attempt_id: u64) -> bool {
        lock(&self.attempts).contains_key(&attempt_id)
    }

    /// Whether `sender` holds `attempt_id`: the attempt was dispatched to it, or adopted from
    /// it. A message about an attempt another agent holds is refused, and logged once per
    /// attempt and sender with both agent ids. `None`: no one waits for the attempt.
    fn holder_check(
        &self,
        attempts: &HashMap<u64, Attempt>,
        sender: &str,
        attempt_id: u64,
        what: &'static str,
    ) -> Option<bool> {
        let holder = &attempts.get(&attempt_id)?.agent;
        if holder == sender {
            return Some(true);
        }
        self.refused(sender, holder, attempt_id, what);
        Some(false)
    }

    pub fn refused(&self, sender: &str, holder: &str, attempt_id: u64, what: &'static str) {
        let mut seen = lock(&self.refusals);
        if seen.len() >= MAX_REFUSALS_REMEMBERED {
            seen.clear();
        }
        if seen.insert((attempt_id, sender.to_string(), what)) {
            warn!(
                agent = %sender,
                holder = %holder,
                attempt = attempt_id,
                "refused {what} from agent {sender} for attempt {attempt_id}, which agent {holder} holds"
            );
        }
    }

    /// Hands a result from `sender` to whoever waits for its attempt, or keeps it for a run
    /// that will adopt the attempt from that agent: only a result of an attempt the state
    /// database has open on `sender` is kept. Says whether the result may be acknowledged now.
    pub fn deliver(&self, sender: &str, outcome: StepOutcome) -> Delivered {
        let attempt_id = outcome.attempt_id;
        let outcome = match self.deliver_awaited(sender, outcome) {
            Ok(true) => return Delivered::Awaited,
            Ok(false) => return Delivered::Done,
            Err(outcome) => outcome,
        };
        // Nobody waits: is it an attempt a run dispatched to this agent and has not ended?
        match self.state.attempt_holder(attempt_id) {
            Ok(Some((holder, _))) if holder != sender => {
                self.refused(sender, &holder, attempt_id, "a result");
                return Delivered::Done;
            }
            Ok(Some((_, true))) => {}
            Ok(Some((_, false))) => {
                tracing::debug!(attempt = attempt_id, "discarding the result of an attempt that ended");
                return Delivered::Done;
            }
            Ok(None) => {
                // Made-up attempt ids: one line per sender, however many come.
                let mut seen = lock(&self.refusals);
                if seen.insert((0, sender.to_string(), "results for attempts no run dispatched")) {
                    warn!(
                        agent = %sender,
                        attempt = attempt_id,
                        "refused results from agent {sender} for attempts no run dispatched (first: {attempt_id})"
                    );
                }
                return Delivered::Done;
            }
            Err(e) => {
                warn!(attempt = attempt_id, "state database: {e:#}; result not kept");
                return Delivered::Later;
            }
        }
        // A run may have adopted it meanwhile.
        let outcome = match self.deliver_awaited(sender, outcome) {
            Ok(true) => return Delivered::Awaited,
            Ok(false) => return Delivered::Done,
            Err(outcome) => outcome,
        };
        // Lock order: attempts, then unclaimed (as in `adopt`).
        let _attempts = lock(&self.attempts);
        let mut kept = lock(&self.unclaimed);
        match kept.insert(sender, outcome) {
            Ok(evicted) => {
                info!(
                    attempt = attempt_id,
                    kept = kept.len(),
                    kept_bytes = kept.bytes(),
                    evicted,
                    "keeping the result of an attempt nobody waits for yet"
                );
                Delivered::Later
            }
            Err(why) => {
                warn!(attempt = attempt_id, agent = %sender, "result not kept: {why}");
                Delivered::Later
            }
        }
    }

    /// Delivers to whoever waits for the attempt (false: refused); the outcome back when
    /// nobody does.
    fn deliver_awaited(&self, sender: &str, outcome: StepOutcome) -> Result<bool, StepOutcome> {
        let attempt_id = outcome.attempt_id;
        let mut attempts = lock(&self.attempts);
        match self.holder_check(&attempts, sender, attempt_id, "a result") {
            None => return Err(outcome),
            Some(false) => return Ok(false),
            Some(true) => {}
        }
        let Some(a) = attempts.remove(&attempt_id) else { return Err(outcome) };
        tracing::debug!(
            attempt = attempt_id,
            exit = ?outcome.exit,
            backend = %outcome.backend,
            new_entries = outcome.new_entries.len(),
            elapsed_ms = outcome.elapsed_ms,
            error = outcome.error.as_deref().unwrap_or(""),
            "step finished"
        );
        let _ = a.events.send((attempt_id, StepEvent::Finished(outcome)));
        Ok(true)
    }

    /// Routes a step's start or output lines from `sender` to whoever waits for the attempt.
    pub fn route(&self, sender: &str, attempt_id: u64, event: StepEvent) {
        let attempts = lock(&self.attempts);
        if self.holder_check(&attempts, sender, attempt_id, "step events") == Some(true)
            && let Some(a) = attempts.get(&attempt_id)
        {
            let _ = a.events.send((attempt_id, event));
        }
    }

    /// Waits for the events of an attempt a previous coordinator dispatched to `agent` (a
    /// resumed run): a result that agent sent already is delivered at once.
    pub fn adopt(&self, attempt_id: u64, agent: &str, events: EventSink) {
        let mut attempts = lock(&self.attempts);
        match lock(&self.unclaimed).take(attempt_id, agent) {
            Ok(Some(outcome)) => {
                let _ = events.send((attempt_id, StepEvent::Finished(outcome)));
                return;
            }
            Ok(None) => {}
            Err(sender) => self.refused(&sender, agent, attempt_id, "a result"),
        }
        attempts.insert(attempt_id, Attempt { agent: agent.to_string(), events });
    }

    /// Asks the agent running `attempt_id` to stop it.
    pub async fn cancel_step(&self, attempt_id: u64, reason: &str) -> Result<()> {
        let agent = lock(&self.attempts)
            .get(&attempt_id)
            .map(|a| a.agent.clone())
            .ok_or_else(|| anyhow!("no running attempt {attempt_id}"))?;
        let outbox = self.outbox_of(&agent).ok_or_else(|| anyhow!("agent {agent} is not connected"))?;
        outbox
            .send(CoordinatorToAgent::CancelStep { attempt_id, reason: reason.to_string() })
            .await
            .map_err(|_| anyhow!("agent {agent} disconnected"))
    }

    /// `check_outputs(paths)` through `agent`'s backend.
    pub async fn check_outputs(
        &self,
        agent: &str,
        paths: Vec<String>,
        registry: Vec<(String, RegistryEntry)>,
    ) -> Result<Vec<(String, Option<u64>)>> {
        let outbox = self.outbox_of(agent).ok_or_else(|| anyhow!("agent {agent} is not connected"))?;
        let request_id = self.next_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.checks).insert(request_id, (agent.to_string(), tx));
        let sent = outbox.send(CoordinatorToAgent::CheckOutputs { request_id, paths, registry }).await;
        if sent.is_err() {
            lock(&self.checks).remove(&request_id);
            return Err(anyhow!("agent {agent} disconnected"));
        }
        match tokio::time::timeout(Duration::from_secs(300), rx).await {
            Ok(Ok(Ok(sizes))) => Ok(sizes),
            Ok(Ok(Err(e))) => Err(anyhow!("agent {agent} could not check outputs: {}", e.message)),
            Ok(Err(_)) | Err(_) => {
                lock(&self.checks).remove(&request_id);
                Err(anyhow!("agent {agent} did not answer the output check"))
            }
        }
    }

    pub fn store(&self) -> &Arc<dyn SnapshotStore> {
        &self.store
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<String, ConnectedAgent>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn agent_infos(&self) -> Vec<AgentInfo> {
        let now = Instant::now();
        let mut out: Vec<AgentInfo> = self
            .agents()
            .iter()
            .map(|(id, a)| AgentInfo {
                agent_id: id.clone(),
                address: a.addr.to_string(),
                host: a.host.clone(),
                connected_for_ms: now.duration_since(a.connected_at).as_millis() as u64,
                last_heartbeat_ms_ago: now.duration_since(a.last_heartbeat).as_millis() as u64,
                load_average: a.load_average,
            })
            .collect();
        out.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        out
    }

    pub fn connection_of(&self, agent: &str) -> Option<quinn::Connection> {
        self.agents().get(agent).map(|a| a.conn.clone())
    }
}

async fn sleep_until_or_forever(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
