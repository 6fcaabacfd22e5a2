//! The run's scheduling state machine, without IO: the driver feeds it events with
//! [`Scheduler::handle`] and carries out what [`Scheduler::poll_action`] returns, so every
//! decision (which agent, retry or fail, what to cancel) is testable on its own.
//!
//! A step waits until every dependency succeeded or was skipped, then is ready. A ready step
//! goes to the connected agent with the most free CPUs among those whose free CPUs, memory,
//! slots and labels fit it (a step asking for more CPUs than an agent has runs there alone).
//! A failing command and a lost agent are counted separately: `retries` of the step against
//! the first, the run's infrastructure budget against the second.
//!
//! An agent whose last [`QUEUE_AFTER`] attempts each took under [`QUICK_MS`] is sent one step
//! more than its slots: it waits on the agent (which runs no more than its slots at once)
//! and starts the moment a slot frees, instead of a round trip to the coordinator later.
//! Only steps that fit the agent's free CPUs and memory alongside the running ones go there,
//! and an agent with room in its slots is always preferred, so a queued step waits only when
//! every agent that fits it is busy. One attempt that takes longer ends the queueing.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::pipeline::plan::{Action as Planned, Decision};
use crate::pipeline::{Pipeline, Resources};

#[derive(Debug, Clone, PartialEq)]
pub enum StepState {
    Waiting,
    Ready,
    Running { attempt_id: u64, agent: String },
    Succeeded,
    Skipped,
    Pruned,
    Failed,
    Cancelled,
}

impl StepState {
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Succeeded | Self::Skipped | Self::Pruned | Self::Failed | Self::Cancelled)
    }

    fn satisfies_dependents(&self) -> bool {
        matches!(self, Self::Succeeded | Self::Skipped)
    }

    /// Index into [`Scheduler`]'s per-state counts.
    fn index(&self) -> usize {
        match self {
            Self::Waiting => 0,
            Self::Ready => 1,
            Self::Running { .. } => 2,
            Self::Succeeded => 3,
            Self::Skipped => 4,
            Self::Pruned => 5,
            Self::Failed => 6,
            Self::Cancelled => 7,
        }
    }

    const NAMES: [&'static str; 8] =
        ["waiting", "ready", "running", "succeeded", "skipped", "pruned", "failed", "cancelled"];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Ready => "ready",
            Self::Running { .. } => "running",
            Self::Succeeded => "succeeded",
            Self::Skipped => "skipped",
            Self::Pruned => "pruned",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// How an attempt ended, as far as scheduling cares.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptEnd {
    Succeeded,
    /// The command failed (non-zero exit, signal, timeout, declared output not produced).
    CommandFailed(String),
    /// The infrastructure failed: agent lost, setup or harvest failed, cancelled by shutdown.
    InfraFailed(String),
    /// The attempt never reached its agent (it had disconnected): the step is ready again
    /// without using a retry, and the agent takes nothing new until it is back.
    NotSent(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentCapacity {
    pub cpus: f64,
    pub memory_bytes: u64,
    /// Most steps at once; 0 for no limit beyond CPUs and memory.
    pub slots: u32,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug)]
pub enum Event {
    AgentUp {
        agent: String,
        capacity: AgentCapacity,
    },
    /// The agent finishes its running steps but takes no new ones (it is leaving).
    AgentDraining {
        agent: String,
    },
    /// The agent disconnected but may come back within its window: its running steps stay
    /// its own, it takes nothing new.
    AgentAway {
        agent: String,
    },
    /// An away agent reconnected: it takes work again (unless it drains).
    AgentBack {
        agent: String,
    },
    /// The agent is gone for good (its steps are retried elsewhere).
    AgentDown {
        agent: String,
        reason: String,
    },
    Finished {
        attempt_id: u64,
        end: AttemptEnd,
    },
    /// How long a running attempt took on its agent (said before its `Finished`): whether the
    /// agent is sent a step to queue.
    Took {
        attempt_id: u64,
        elapsed_ms: u64,
    },
    /// Stop dispatching; running attempts are cancelled.
    Abort {
        reason: String,
    },
    /// A client cancels one step: its running attempt is cancelled without a retry, and it
    /// and everything downstream end cancelled.
    Cancel {
        step: usize,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Steps that became ready.
    Ready {
        step: usize,
    },
    Dispatch {
        step: usize,
        agent: String,
        attempt_id: u64,
        attempt: u32,
    },
    /// The attempt no longer counts; a late result of it is discarded.
    Supersede {
        step: usize,
        attempt_id: u64,
        agent: String,
    },
    Retry {
        step: usize,
        reason: String,
        infra: bool,
    },
    Succeeded {
        step: usize,
    },
    Failed {
        step: usize,
        reason: String,
    },
    Cancelled {
        step: usize,
        reason: String,
    },
    /// No connected agent can ever fit the step (labels, memory); said once per step.
    Unschedulable {
        step: usize,
        reason: String,
    },
}

struct StepSlot {
    deps: Vec<usize>,
    dependents: Vec<usize>,
    resources: Resources,
    retries: u32,
    state: StepState,
    command_failures: u32,
    infra_failures: u32,
    attempts: u32,
    /// The agents' epoch in which this step was said unschedulable (said once per epoch).
    said_unschedulable: Option<u64>,
}

struct AgentSlot {
    capacity: AgentCapacity,
    used_cpus: f64,
    used_memory: u64,
    running: u32,
    draining: bool,
    /// Disconnected, within its window to come back.
    away: bool,
    /// Its key in [`Scheduler::free`], while it is there.
    indexed: Option<FreeKey>,
    /// Its last attempts in a row that took under [`QUICK_MS`].
    quick: u32,
}

/// An attempt this short is dominated by the round trip around it (dispatch, result,
/// database): worth queueing the next step on its agent.
pub const QUICK_MS: u64 = 100;
/// Quick attempts in a row before an agent is sent a step to queue.
pub const QUEUE_AFTER: u32 = 3;

impl AgentSlot {
    /// Free CPUs in thousandths, the key it is placed by.
    fn free_milli(&self) -> i64 {
        milli(self.capacity.cpus - self.used_cpus)
    }

    /// It may take a step now: not draining, not away, a slot free (or one to queue in).
    fn open(&self) -> bool {
        !self.draining && !self.away && self.slot_free()
    }

    /// Where it sorts in [`Scheduler::free`]: agents with a slot free before those that would
    /// queue the step, then by most free CPUs.
    fn key(&self) -> FreeKey {
        let queues = self.capacity.slots != 0 && self.running >= self.capacity.slots;
        (u8::from(queues), Reverse(self.free_milli()))
    }

    /// Steps it holds at most: its slots, and one queued behind them after a run of quick
    /// attempts. No limit (0) stays no limit.
    fn slot_free(&self) -> bool {
        let queued = u32::from(self.quick >= QUEUE_AFTER);
        self.capacity.slots == 0 || self.running < self.capacity.slots.saturating_add(queued)
    }
}

/// An open agent's place in [`Scheduler::free`]: 1 when a step sent there would queue, then
/// its free CPUs in thousandths, most first.
type FreeKey = (u8, Reverse<i64>);

fn milli(cpus: f64) -> i64 {
    (cpus * 1000.0).round() as i64
}

/// The scheduler keeps indexes beside the steps and agents so that every event and every
/// placement costs time in what it touches, not in the size of the run or the fleet (issue
/// 21: 50,000 steps over 10,000 agents): the ready steps in order, each state's count, the
/// running steps by attempt and by agent, and the open agents by free CPUs.
pub struct Scheduler {
    steps: Vec<StepSlot>,
    agents: BTreeMap<String, AgentSlot>,
    infra_retries: u32,
    queue: VecDeque<Action>,
    aborted: bool,
    next_attempt: Box<dyn FnMut() -> u64 + Send>,
    /// Ready steps, in pipeline order.
    ready: BTreeSet<usize>,
    /// The distinct resource requests of the steps; steps of one shape fit the same agents.
    shapes: Vec<Resources>,
    /// Each step's index into `shapes`.
    shape_of: Vec<usize>,
    /// Ready steps per shape, in pipeline order.
    ready_by_shape: Vec<BTreeSet<usize>>,
    /// Steps per state ([`StepState::index`]).
    counts: [usize; 8],
    /// Running steps by attempt id.
    by_attempt: HashMap<u64, usize>,
    /// Running steps by agent (including agents not up yet: adopted attempts).
    by_agent: HashMap<String, BTreeSet<usize>>,
    /// Open agents, those with a slot free first, then by most free CPUs, then by id: where a
    /// step goes is the first that fits.
    free: BTreeSet<(FreeKey, String)>,
    /// Agents by their CPUs in thousandths (a multiset): the smallest says when a walk down
    /// `free` can stop.
    capacities: BTreeMap<i64, usize>,
    /// Bumped when an agent comes or comes back: an unschedulable step is said again.
    epoch: u64,
    /// [`Scheduler::never_fits`] per shape, worked out once per epoch (it looks at every
    /// agent): shape → (epoch, answer).
    never_fits_cache: HashMap<usize, (u64, Option<String>)>,
}

impl Scheduler {
    /// `decisions` come from [`crate::pipeline::plan::plan`]; `attempts_before` counts the attempts each
    /// step already had (resume), so attempt numbers go on.
    pub fn new(
        p: &Pipeline,
        decisions: &[Decision],
        attempts_before: &[u32],
        infra_retries: u32,
        next_attempt: Box<dyn FnMut() -> u64 + Send>,
    ) -> Self {
        let dependents = p.dependents();
        let steps: Vec<StepSlot> = p
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| StepSlot {
                deps: s.deps.clone(),
                dependents: dependents[i].clone(),
                resources: s.resources.clone(),
                retries: s.retries,
                state: match decisions[i].action {
                    Planned::Run => StepState::Waiting,
                    Planned::Skip => StepState::Skipped,
                    Planned::Prune => StepState::Pruned,
                    Planned::Done => StepState::Succeeded,
                },
                command_failures: 0,
                infra_failures: 0,
                attempts: attempts_before.get(i).copied().unwrap_or(0),
                said_unschedulable: None,
            })
            .collect();
        let mut counts = [0; 8];
        for s in &steps {
            counts[s.state.index()] += 1;
        }
        let mut shapes: Vec<Resources> = Vec::new();
        let mut shape_ids: HashMap<(u64, u64, BTreeMap<String, String>), usize> = HashMap::new();
        let shape_of: Vec<usize> = steps
            .iter()
            .map(|s| {
                let r = &s.resources;
                *shape_ids.entry((r.cpus.to_bits(), r.memory_bytes, r.labels.clone())).or_insert_with(|| {
                    shapes.push(r.clone());
                    shapes.len() - 1
                })
            })
            .collect();
        let ready_by_shape = vec![BTreeSet::new(); shapes.len()];
        let mut sched = Self {
            steps,
            agents: BTreeMap::new(),
            infra_retries,
            queue: VecDeque::new(),
            aborted: false,
            next_attempt,
            ready: BTreeSet::new(),
            shapes,
            shape_of,
            ready_by_shape,
            counts,
            by_attempt: HashMap::new(),
            by_agent: HashMap::new(),
            free: BTreeSet::new(),
            capacities: BTreeMap::new(),
            epoch: 0,
            never_fits_cache: HashMap::new(),
        };
        for i in 0..sched.steps.len() {
            if sched.steps[i].state == StepState::Waiting
                && sched.steps[i].deps.iter().all(|&d| sched.steps[d].state.satisfies_dependents())
            {
                sched.set_state(i, StepState::Ready);
                sched.queue.push_back(Action::Ready { step: i });
            }
        }
        sched
    }

    /// Every change of a step's state goes through here, which keeps the indexes.
    fn set_state(&mut self, step: usize, new: StepState) {
        let old = std::mem::replace(&mut self.steps[step].state, new);
        let new = &self.steps[step].state;
        self.counts[old.index()] -= 1;
        self.counts[new.index()] += 1;
        match old {
            StepState::Ready => {
                self.ready.remove(&step);
                self.ready_by_shape[self.shape_of[step]].remove(&step);
            }
            StepState::Running { attempt_id, agent } => {
                self.by_attempt.remove(&attempt_id);
                if let Some(set) = self.by_agent.get_mut(&agent) {
                    set.remove(&step);
                    if set.is_empty() {
                        self.by_agent.remove(&agent);
                    }
                }
            }
            _ => {}
        }
        match new {
            StepState::Ready => {
                self.ready.insert(step);
                self.ready_by_shape[self.shape_of[step]].insert(step);
            }
            StepState::Running { attempt_id, agent } => {
                self.by_attempt.insert(*attempt_id, step);
                self.by_agent.entry(agent.clone()).or_default().insert(step);
            }
            _ => {}
        }
    }

    /// Puts `agent` where it belongs in [`Scheduler::free`] after any change to its slot.
    fn reindex(&mut self, agent: &str) {
        let Some(slot) = self.agents.get_mut(agent) else { return };
        let want = slot.open().then(|| slot.key());
        if slot.indexed == want {
            return;
        }
        if let Some(old) = slot.indexed.take() {
            self.free.remove(&(old, agent.to_string()));
        }
        if let Some(key) = want {
            self.free.insert((key, agent.to_string()));
        }
        slot.indexed = want;
    }

    fn remove_agent(&mut self, agent: &str) {
        if let Some(slot) = self.agents.remove(agent) {
            if let Some(old) = slot.indexed {
                self.free.remove(&(old, agent.to_string()));
            }
            let c = milli(slot.capacity.cpus);
            if let Some(n) = self.capacities.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    self.capacities.remove(&c);
                }
            }
        }
    }

    pub fn state(&self, step: usize) -> &StepState {
        &self.steps[step].state
    }

    pub fn attempts(&self, step: usize) -> u32 {
        self.steps[step].attempts
    }

    /// `Some(succeeded)` once every step is terminal.
    pub fn finished(&self) -> Option<bool> {
        let open = self.counts[0] + self.counts[1] + self.counts[2];
        if !self.queue.is_empty() || open > 0 {
            return None;
        }
        Some(!self.aborted && self.counts[6] == 0 && self.counts[7] == 0)
    }

    /// Steps no agent runs yet, ready ones first: what new instances are sized for.
    pub fn unplaced(&self) -> Vec<usize> {
        let waiting = self.steps.iter().enumerate().filter(|(_, s)| matches!(s.state, StepState::Waiting));
        self.ready.iter().copied().chain(waiting.map(|(i, _)| i)).collect()
    }

    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        StepState::NAMES.iter().zip(self.counts).filter(|(_, n)| *n > 0).map(|(k, n)| (*k, n)).collect()
    }

    /// Agents and their running step counts.
    pub fn agent_load(&self) -> Vec<(String, u32)> {
        self.agents.iter().map(|(id, a)| (id.clone(), a.running)).collect()
    }

    pub fn handle(&mut self, event: Event) {
        match event {
            Event::AgentUp { agent, capacity } => {
                if let Some(slot) = self.agents.get(&agent)
                    && milli(slot.capacity.cpus) != milli(capacity.cpus)
                {
                    // Re-counted below under its new capacity.
                    let c = milli(slot.capacity.cpus);
                    if let Some(n) = self.capacities.get_mut(&c) {
                        *n -= 1;
                        if *n == 0 {
                            self.capacities.remove(&c);
                        }
                    }
                    *self.capacities.entry(milli(capacity.cpus)).or_default() += 1;
                }
                if !self.agents.contains_key(&agent) {
                    // Steps adopted on it before it came back use it already.
                    let mut slot = AgentSlot {
                        capacity: capacity.clone(),
                        used_cpus: 0.0,
                        used_memory: 0,
                        running: 0,
                        draining: false,
                        away: false,
                        indexed: None,
                        quick: 0,
                    };
                    for &i in self.by_agent.get(&agent).into_iter().flatten() {
                        let r = &self.steps[i].resources;
                        slot.used_cpus += r.cpus.min(capacity.cpus);
                        slot.used_memory += r.memory_bytes;
                        slot.running += 1;
                    }
                    *self.capacities.entry(milli(capacity.cpus)).or_default() += 1;
                    self.agents.insert(agent.clone(), slot);
                }
                let slot = self.agents.get_mut(&agent).expect("inserted above");
                slot.capacity = capacity;
                slot.draining = false;
                slot.away = false;
                self.reindex(&agent);
                self.epoch += 1;
            }
            Event::AgentDraining { agent } => {
                if let Some(a) = self.agents.get_mut(&agent) {
                    a.draining = true;
                }
                self.reindex(&agent);
            }
            Event::AgentAway { agent } => {
                if let Some(a) = self.agents.get_mut(&agent) {
                    a.away = true;
                }
                self.reindex(&agent);
            }
            Event::AgentBack { agent } => {
                if let Some(a) = self.agents.get_mut(&agent) {
                    a.away = false;
                }
                self.reindex(&agent);
                self.epoch += 1;
            }
            Event::AgentDown { agent, reason } => {
                self.remove_agent(&agent);
                let lost: Vec<(usize, u64)> = self
                    .by_agent
                    .get(&agent)
                    .into_iter()
                    .flatten()
                    .filter_map(|&i| match &self.steps[i].state {
                        StepState::Running { attempt_id, .. } => Some((i, *attempt_id)),
                        _ => None,
                    })
                    .collect();
                for (step, attempt_id) in lost {
                    self.queue.push_back(Action::Supersede { step, attempt_id, agent: agent.clone() });
                    self.end_attempt(step, AttemptEnd::InfraFailed(format!("agent {agent} lost: {reason}")));
                }
            }
            Event::Finished { attempt_id, end } => {
                let Some(step) = self.running_step(attempt_id) else { return };
                self.end_attempt(step, end);
            }
            Event::Took { attempt_id, elapsed_ms } => {
                let Some(step) = self.running_step(attempt_id) else { return };
                let StepState::Running { agent, .. } = &self.steps[step].state else { return };
                let agent = agent.clone();
                if let Some(a) = self.agents.get_mut(&agent) {
                    a.quick = if elapsed_ms < QUICK_MS { a.quick.saturating_add(1) } else { 0 };
                }
                self.reindex(&agent);
            }
            Event::Cancel { step, reason } => {
                if step < self.steps.len() {
                    self.cancel_step(step, reason);
                }
            }
            Event::Abort { reason } => {
                self.aborted = true;
                for i in 0..self.steps.len() {
                    match self.steps[i].state.clone() {
                        StepState::Running { attempt_id, agent } => {
                            self.release(&agent, i);
                            self.queue.push_back(Action::Supersede { step: i, attempt_id, agent });
                            self.set_state(i, StepState::Cancelled);
                            self.queue.push_back(Action::Cancelled { step: i, reason: reason.clone() });
                        }
                        StepState::Waiting | StepState::Ready => {
                            self.set_state(i, StepState::Cancelled);
                            self.queue.push_back(Action::Cancelled { step: i, reason: reason.clone() });
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    fn cancel_step(&mut self, step: usize, reason: String) {
        let mut stack = vec![step];
        while let Some(i) = stack.pop() {
            let why =
                if i == step { reason.clone() } else { format!("a dependency was cancelled (step #{step})") };
            match self.steps[i].state.clone() {
                StepState::Running { attempt_id, agent } => {
                    self.release(&agent, i);
                    self.queue.push_back(Action::Supersede { step: i, attempt_id, agent });
                }
                StepState::Waiting | StepState::Ready => {}
                _ => continue,
            }
            // A `Ready` still queued for it is dropped when it comes up (see `poll_action`).
            self.set_state(i, StepState::Cancelled);
            self.queue.push_back(Action::Cancelled { step: i, reason: why });
            stack.extend(self.steps[i].dependents.clone());
        }
    }

    /// Takes over an attempt a previous coordinator dispatched (a resumed run) that may still
    /// run on `agent`: the step is running, without a new attempt. Only a ready step can be.
    pub fn adopt(&mut self, step: usize, attempt_id: u64, agent: &str) -> bool {
        if self.steps[step].state != StepState::Ready {
            return false;
        }
        let r = self.steps[step].resources.clone();
        if let Some(a) = self.agents.get_mut(agent) {
            a.used_cpus += r.cpus.min(a.capacity.cpus);
            a.used_memory += r.memory_bytes;
            a.running += 1;
        }
        self.set_state(step, StepState::Running { attempt_id, agent: agent.to_string() });
        self.reindex(agent);
        true
    }

    fn running_step(&self, attempt: u64) -> Option<usize> {
        self.by_attempt.get(&attempt).copied()
    }

    fn release(&mut self, agent: &str, step: usize) {
        let r = &self.steps[step].resources;
        if let Some(a) = self.agents.get_mut(agent) {
            a.used_cpus = (a.used_cpus - r.cpus.min(a.capacity.cpus)).max(0.0);
            a.used_memory = a.used_memory.saturating_sub(r.memory_bytes);
            a.running = a.running.saturating_sub(1);
        }
        self.reindex(agent);
    }

    fn end_attempt(&mut self, step: usize, end: AttemptEnd) {
        let mut held_by = None;
        if let StepState::Running { agent, .. } = self.steps[step].state.clone() {
            self.release(&agent, step);
            held_by = Some(agent);
        }
        match end {
            AttemptEnd::Succeeded => {
                self.set_state(step, StepState::Succeeded);
                self.queue.push_back(Action::Succeeded { step });
                let dependents = self.steps[step].dependents.clone();
                for d in dependents {
                    if self.steps[d].state == StepState::Waiting
                        && self.steps[d].deps.iter().all(|&x| self.steps[x].state.satisfies_dependents())
                    {
                        self.set_state(d, StepState::Ready);
                        self.queue.push_back(Action::Ready { step: d });
                    }
                }
            }
            AttemptEnd::CommandFailed(reason) => {
                let s = &mut self.steps[step];
                s.command_failures += 1;
                if s.command_failures <= s.retries && !self.aborted {
                    let left = s.retries - s.command_failures;
                    self.set_state(step, StepState::Ready);
                    self.queue.push_back(Action::Retry {
                        step,
                        reason: format!("{reason} ({left} command retries left)"),
                        infra: false,
                    });
                } else {
                    self.fail(step, reason);
                }
            }
            AttemptEnd::InfraFailed(reason) => {
                let s = &mut self.steps[step];
                s.infra_failures += 1;
                if s.infra_failures <= self.infra_retries && !self.aborted {
                    let left = self.infra_retries - s.infra_failures;
                    self.set_state(step, StepState::Ready);
                    self.queue.push_back(Action::Retry {
                        step,
                        reason: format!("{reason} ({left} infrastructure retries left)"),
                        infra: true,
                    });
                } else {
                    self.fail(step, reason);
                }
            }
            AttemptEnd::NotSent(reason) => {
                if self.aborted {
                    self.fail(step, reason);
                    return;
                }
                self.set_state(step, StepState::Ready);
                if let Some(agent) = held_by {
                    if let Some(a) = self.agents.get_mut(&agent) {
                        a.away = true;
                    }
                    self.reindex(&agent);
                }
                self.queue.push_back(Action::Retry {
                    step,
                    reason: format!("{reason} (not sent, no retry used)"),
                    infra: true,
                });
            }
        }
    }

    fn fail(&mut self, step: usize, reason: String) {
        self.set_state(step, StepState::Failed);
        self.queue.push_back(Action::Failed { step, reason });
        // Everything downstream can no longer run.
        let mut stack = self.steps[step].dependents.clone();
        while let Some(d) = stack.pop() {
            if matches!(self.steps[d].state, StepState::Waiting | StepState::Ready) {
                self.set_state(d, StepState::Cancelled);
                let name_reason = format!("a dependency failed (step #{step})");
                self.queue.push_back(Action::Cancelled { step: d, reason: name_reason });
                stack.extend(self.steps[d].dependents.clone());
            }
        }
    }

    fn fits(a: &AgentSlot, r: &Resources) -> bool {
        let cpus = r.cpus.min(a.capacity.cpus);
        a.used_cpus + cpus <= a.capacity.cpus + 1e-9
            && a.used_memory + r.memory_bytes <= a.capacity.memory_bytes
            && a.slot_free()
    }

    fn could_ever_fit(a: &AgentSlot, r: &Resources) -> Result<(), String> {
        for (k, v) in &r.labels {
            if a.capacity.labels.get(k) != Some(v) {
                return Err(format!("label {k}={v}"));
            }
        }
        if r.memory_bytes > a.capacity.memory_bytes {
            return Err(format!("{} bytes of memory", r.memory_bytes));
        }
        Ok(())
    }

    /// The open agent that fits `r` now: one with a slot free before one that would queue it,
    /// then the one with the most free CPUs, then the first by id.
    fn place(&self, r: &Resources) -> Option<&str> {
        let needed = milli(r.cpus);
        // An agent with fewer free CPUs than asked fits only if it has fewer CPUs than asked
        // and all of them are free: past `needed`, the walk goes on only while such agents exist.
        let smallest = self.capacities.keys().next().copied().unwrap_or(i64::MAX);
        for tier in [0u8, 1] {
            let from = ((tier, Reverse(i64::MAX)), String::new());
            for ((t, Reverse(free)), id) in self.free.range(from..) {
                if *t != tier || (*free < needed && (smallest >= needed || *free < smallest)) {
                    break;
                }
                let a = &self.agents[id];
                if Self::could_ever_fit(a, r).is_ok() && Self::fits(a, r) {
                    return Some(id);
                }
            }
        }
        None
    }

    /// Why no connected agent (draining ones aside) can ever take `r`; `None` when one can
    /// (it is busy now) or none is connected.
    fn never_fits(&self, r: &Resources) -> Option<String> {
        let mut why = None;
        for a in self.agents.values().filter(|a| !a.draining) {
            match Self::could_ever_fit(a, r) {
                Ok(()) => return None,
                Err(e) => {
                    why.get_or_insert(e);
                }
            }
        }
        why
    }

    /// [`Scheduler::never_fits`] for `shape`, from the cache when this epoch has it.
    fn never_fits_cached(&mut self, shape: usize) -> Option<String> {
        if let Some((at, why)) = self.never_fits_cache.get(&shape)
            && *at == self.epoch
        {
            return why.clone();
        }
        let why = self.never_fits(&self.shapes[shape]);
        self.never_fits_cache.insert(shape, (self.epoch, why.clone()));
        why
    }

    /// The next thing the driver must do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        while let Some(a) = self.queue.pop_front() {
            // A step adopted or cancelled since it became ready is not said to be ready.
            if let Action::Ready { step } = &a
                && self.steps[*step].state != StepState::Ready
            {
                continue;
            }
            return Some(a);
        }
        if self.aborted {
            return None;
        }
        // Steps of one shape fit the same agents: the first ready step of each shape is tried,
        // in pipeline order, so a call costs time in the shapes, not in the ready steps.
        let mut firsts: Vec<(usize, usize)> = self
            .ready_by_shape
            .iter()
            .enumerate()
            .filter_map(|(shape, ready)| ready.first().map(|&i| (i, shape)))
            .collect();
        firsts.sort_unstable();
        for (i, shape) in firsts {
            let Some(agent) = self.place(&self.shapes[shape]).map(str::to_string) else {
                if let Some(e) = self.never_fits_cached(shape) {
                    // Said once per step and epoch, in pipeline order.
                    let epoch = self.epoch;
                    let unsaid = self.ready_by_shape[shape]
                        .iter()
                        .copied()
                        .find(|&j| self.steps[j].said_unschedulable != Some(epoch));
                    if let Some(j) = unsaid {
                        self.steps[j].said_unschedulable = Some(epoch);
                        return Some(Action::Unschedulable {
                            step: j,
                            reason: format!("no connected agent offers {e}"),
                        });
                    }
                }
                continue;
            };
            let r = &self.shapes[shape];
            let attempt_id = (self.next_attempt)();
            let (cpus, mem) = (r.cpus, r.memory_bytes);
            let slot = self.agents.get_mut(&agent).expect("placed on a known agent");
            slot.used_cpus += cpus.min(slot.capacity.cpus);
            slot.used_memory += mem;
            slot.running += 1;
            self.reindex(&agent);
            self.steps[i].attempts += 1;
            let attempt = self.steps[i].attempts;
            self.set_state(i, StepState::Running { attempt_id, agent: agent.clone() });
            return Some(Action::Dispatch { step: i, agent, attempt_id, attempt });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::plan::{PlanOptions, plan};
    use std::collections::HashMap;
    use std::path::Path;

    fn fan(n: usize, retries: u32) -> Pipeline {
        let mut text = String::from("name = \"t\"\n");
        for i in 0..n {
            text += &format!(
                "[[steps]]\nname = \"s{i}\"\ncommand = \"true\"\noutputs = [\"/o{i}\"]\nretries = {retries}\n"
            );
        }
        text += "[[steps]]\nname = \"join\"\ncommand = \"true\"\noutputs = [\"/all\"]\ninputs = [";
        text += &(0..n).map(|i| format!("\"/o{i}\"")).collect::<Vec<_>>().join(",");
        text += "]\n";
        Pipeline::parse(Path::new("/x.toml"), &text).unwrap()
    }

    fn sched(p: &Pipeline, infra: u32) -> Scheduler {
        let d = plan(p, &HashMap::new(), &PlanOptions::default());
        let mut n = 0;
        Scheduler::new(
            p,
            &d,
            &[],
            infra,
            Box::new(move || {
                n += 1;
                n
            }),
        )
    }

    fn cap(cpus: f64) -> AgentCapacity {
        AgentCapacity { cpus, memory_bytes: 1 << 30, slots: 0, labels: BTreeMap::new() }
    }

    fn drain(s: &mut Scheduler) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn dispatched(actions: &[Action]) -> Vec<(usize, String, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Dispatch { step, agent, attempt_id, .. } => Some((*step, agent.clone(), *attempt_id)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_agent_of_quick_steps_is_sent_one_to_queue_until_a_slow_one() {
        let p = fan(20, 0);
        let mut s = sched(&p, 0);
        let one_slot = AgentCapacity { cpus: 4.0, memory_bytes: 1 << 30, slots: 1, labels: BTreeMap::new() };
        s.handle(Event::AgentUp { agent: "a".into(), capacity: one_slot.clone() });
        // Quick attempts, one at a time: nothing is queued before QUEUE_AFTER of them.
        for _ in 0..QUEUE_AFTER {
            let d = dispatched(&drain(&mut s));
            assert_eq!(d.len(), 1, "one slot, no streak yet: {d:?}");
            s.handle(Event::Took { attempt_id: d[0].2, elapsed_ms: QUICK_MS - 1 });
            s.handle(Event::Finished { attempt_id: d[0].2, end: AttemptEnd::Succeeded });
        }
        // Now the next step goes with one queued behind it.
        let d = dispatched(&drain(&mut s));
        assert_eq!(d.len(), 2, "a step to queue: {d:?}");
        assert!(d.iter().all(|x| x.1 == "a"));
        // An agent with a slot free is preferred to queueing on a busy one.
        s.handle(Event::AgentUp { agent: "b".into(), capacity: one_slot.clone() });
        let d_b = dispatched(&drain(&mut s));
        assert_eq!(d_b.len(), 1, "{d_b:?}");
        assert_eq!(d_b[0].1, "b");
        // Its first attempt ends: one step goes (to b, which has no streak, nothing queued).
        s.handle(Event::Took { attempt_id: d[0].2, elapsed_ms: 1 });
        s.handle(Event::Finished { attempt_id: d[0].2, end: AttemptEnd::Succeeded });
        let next = dispatched(&drain(&mut s));
        assert_eq!(next.len(), 1, "a holds its queued step and one more: {next:?}");
        assert_eq!(next[0].1, "a");
        // A slow attempt ends the queueing: a holds at most its one slot again.
        s.handle(Event::Took { attempt_id: d[1].2, elapsed_ms: QUICK_MS });
        s.handle(Event::Finished { attempt_id: d[1].2, end: AttemptEnd::Succeeded });
        assert!(dispatched(&drain(&mut s)).is_empty(), "a is full without its streak");
        s.handle(Event::Took { attempt_id: next[0].2, elapsed_ms: 1 });
        s.handle(Event::Finished { attempt_id: next[0].2, end: AttemptEnd::Succeeded });
        let d = dispatched(&drain(&mut s));
        assert_eq!(d.len(), 1, "one slot, the streak starts over: {d:?}");
        // An agent without a slot limit is never sent more than its CPUs take.
        let mut s = sched(&p, 0);
        s.handle(Event::AgentUp { agent: "c".into(), capacity: cap(2.0) });
        for _ in 0..QUEUE_AFTER + 2 {
            let d = dispatched(&drain(&mut s));
            assert_eq!(d.len(), 2, "{d:?}");
            for x in d {
                s.handle(Event::Took { attempt_id: x.2, elapsed_ms: 1 });
                s.handle(Event::Finished { attempt_id: x.2, end: AttemptEnd::Succeeded });
            }
        }
    }

    #[test]
    fn a_cancelled_step_is_not_retried_and_cancels_what_depends_on_it() {
        let p = fan(2, 3);
        let mut s = sched(&p, 3);
        s.handle(Event::AgentUp { agent: "a".into(), capacity: cap(1.0) });
        let d = dispatched(&drain(&mut s));
        assert_eq!(d.len(), 1, "{d:?}");
        let (running, _, attempt) = d[0].clone();
        s.handle(Event::Cancel { step: running, reason: "by the client".into() });
        let actions = drain(&mut s);
        assert!(
            actions.contains(&Action::Supersede { step: running, attempt_id: attempt, agent: "a".into() }),
            "{actions:?}"
        );
        assert!(actions.contains(&Action::Cancelled { step: running, reason: "by the client".into() }));
        let join = p.index_of("join").unwrap();
        assert_eq!(s.state(join), &StepState::Cancelled, "the join depends on the cancelled step");
        let d = dispatched(&actions);
        assert_eq!(d.len(), 1, "the agent's slot was released for the other step: {actions:?}");
        // The late result of the cancelled attempt changes nothing.
        s.handle(Event::Finished { attempt_id: attempt, end: AttemptEnd::InfraFailed("cancelled".into()) });
        assert!(drain(&mut s).is_empty());
        assert_ne!(d[0].0, running);
        s.handle(Event::Finished { attempt_id: d[0].2, end: AttemptEnd::Succeeded });
        drain(&mut s);
        assert_eq!(s.finished(), Some(false), "a run with a cancelled step did not succeed");
        // Cancelling a finished step does nothing.
        s.handle(Event::Cancel { step: d[0].0, reason: "late".into() });
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn fills_agents_by_cpus_then_fans_in() {
        let p = fan(5, 0);
        let mut s = sched(&p, 1);
        assert!(dispatched(&drain(&mut s)).is_empty(), "no agents yet");
        s.handle(Event::AgentUp { agent: "a".into(), capacity: cap(2.0) });
        s.handle(Event::AgentUp { agent: "b".into(), capacity: cap(1.0) });
        let d = dispatched(&drain(&mut s));
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!(d.iter().filter(|x| x.1 == "a").count(), 2);
        for (_, _, id) in &d {
            s.handle(Event::Finished { attempt_id: *id, end: AttemptEnd::Succeeded });
        }
        let d = dispatched(&drain(&mut s));
        assert_eq!(d.len(), 2);
        for (_, _, id) in &d {
            s.handle(Event::Finished { attempt_id: *id, end: AttemptEnd::Succeeded });
        }
        let d = dispatched(&drain(&mut s));
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![5], "the join runs last");
        assert_eq!(s.finished(), None);
        s.handle(Event::Finished { attempt_id: d[0].2, end: AttemptEnd::Succeeded });
        drain(&mut s);
        assert_eq!(s.finished(), Some(true));
    }

    #[test]
    fn lost_agent_retries_elsewhere_and_late_results_are_ignored() {
        let p = fan(1, 0);
        let mut s = sched(&p, 1);
        s.handle(Event::AgentUp { agent: "a".into(), capacity: cap(1.0) });
        let d = dispatched(&drain(&mut s));
        assert_eq!(d[0].1, "a");
        s.handle(Event::AgentDown { agent: "a".into(), reason: "heartbeats missed".into() });
        let actions = drain(&mut s);
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Supersede { attempt_id, .. } if *attempt_id == d[0].2))
        );
        assert!(actions.iter().any(|a| matches!(a, Action::Retry { infra: true, .. })));
        s.handle(Event::AgentUp { agent: "b".into(), capacity: cap(1.0) });
        let d2 = dispatched(&drain(&mut s));
        assert_eq!(d2[0].1, "b");
        assert_eq!(s.attempts(0), 2);
        // The superseded attempt's result changes nothing.
        s.handle(Event::Finished { attempt_id: d[0].2, end: AttemptEnd::Succeeded });
        assert!(matches!(s.state(0), StepState::Running { .. }));
        // A second loss exhausts the infrastructure budget of 1.
        s.handle(Event::AgentDown { agent: "b".into(), reason: "gone".into() });
        let actions = drain(&mut s);
        assert!(actions.iter().any(|a| matches!(a, Action::Failed { step: 0, .. })), "{actions:?}");
        assert!(actions.iter().any(|a| matches!(a, Action::Cancelled { step: 1, .. })), "{actions:?}");
        assert_eq!(s.finished(), Some(false));
    }

    #[test]
    fn an_attempt_that_was_never_sent_uses_no_retry_and_its_agent_takes_nothing_until_back() {
        let p = fan(3, 0);
        // No infrastructure retries at all: a send that failed must not fail the step.
        let mut s = sched(&p, 0);
        s.handle(Event::AgentUp { agent: "a".into(), capacity: cap(1.0) });
        let d = dispatched(&drain(&mut s));
        assert_eq!(d.len(), 1, "{d:?}");
        s.handle(Event::Finished { attempt_id: d[0].2, end: AttemptEnd::NotSent("not connected".into()) });
        let actions = drain(&mut s);
        assert!(actions.iter().any(|a| matches!(a, Action::Retry { infra: true, .. })), "{actions:?}");
        assert!(
            dispatched(&actions).is_empty(),
            "sent again to the agent that could not be reached: {actions:?}"
        );
        assert_eq!(s.state(d[0].0), &StepState::Ready);
        // Another agent takes work.
        s.handle(Event::AgentUp { agent: "b".into(), capacity: cap(1.0) });
        let on_b = dispatched(&drain(&mut s));
        assert_eq!(on_b.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(), ["b"], "{on_b:?}");
        // a is back: it takes work again.
        s.handle(Event::AgentBack { agent: "a".into() });
        let on_a = dispatched(&drain(&mut s));
        assert_eq!(on_a.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(), ["a"], "{on_a:?}");
        // b disconnects inside its window: it keeps its step, and once that is done it gets
        // no new one while away, although it is the only agent with a free CPU.
        s.handle(Event::AgentAway { agent: "b".into() });
        s.handle(Event::Finished { attempt_id: on_b[0].2, end: AttemptEnd::Succeeded });
        let actions = drain(&mut s);
        assert!(dispatched(&actions).is_empty(), "work for an away agent: {actions:?}");
        assert!(!actions.iter().any(|a| matches!(a, Action::Unschedulable { .. })), "{actions:?}");
        s.handle(Event::AgentBack { agent: "b".into() });
        let back = dispatched(&drain(&mut s));
        assert_eq!(back.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(), ["b"], "{back:?}");
        for id in [on_a[0].2, back[0].2] {
            s.handle(Event::Finished { attempt_id: id, end: AttemptEnd::Succeeded });
        }
        let join = dispatched(&drain(&mut s));
        assert_eq!(join.len(), 1, "{join:?}");
        s.handle(Event::Finished { attempt_id: join[0].2, end: AttemptEnd::Succeeded });
        drain(&mut s);
        assert_eq!(s.finished(), Some(true));
        assert_eq!(s.attempts(d[0].0), 2, "the attempt not sent still has its number");
    }

    #[test]
    fn a_draining_agent_finishes_its_step_and_gets_no_new_one() {
        let p = fan(2, 0);
        let mut s = sched(&p, 0);
        s.handle(Event::AgentUp { agent: "a".into(), capacity: cap(1.0) });
        let d = dispatched(&drain(&mut s));
        assert_eq!(d.len(), 1, "one CPU, one step at a time: {d:?}");
        s.handle(Event::AgentDraining { agent: "a".into() });
        s.handle(Event::Finished { attempt_id: d[0].2, end: AttemptEnd::Succeeded });
        let actions = drain(&mut s);
        assert!(actions.iter().any(|a| matches!(a, Action::Succeeded { .. })), "{actions:?}");
        assert!(dispatched(&actions).is_empty(), "nothing new for a draining agent: {actions:?}");
        assert!(!actions.iter().any(|a| matches!(a, Action::Unschedulable { .. })), "{actions:?}");
        // Its successor (or the same agent back without the drain) gets the rest.
        s.handle(Event::AgentUp { agent: "a".into(), capacity: cap(1.0) });
        assert_eq!(dispatched(&drain(&mut s)).len(), 1);
    }

    #[test]
    fn an_adopted_attempt_runs_on_without_a_new_one() {
        let p = fan(2, 0);
        let mut s = sched(&p, 1);
        assert!(s.adopt(0, 77, "a"));
        assert!(!s.adopt(2, 78, "a"), "the join is not ready");
        s.handle(Event::AgentUp { agent: "a".into(), capacity: cap(1.0) });
        let actions = drain(&mut s);
        assert!(!actions.iter().any(|a| matches!(a, Action::Ready { step: 0 })), "{actions:?}");
        assert!(dispatched(&actions).is_empty(), "its one CPU is taken by the adopted step: {actions:?}");
        s.handle(Event::Finished { attempt_id: 77, end: AttemptEnd::Succeeded });
        let d = dispatched(&drain(&mut s));
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(s.attempts(0), 0, "no new attempt of the adopted step");
        // An adopted attempt whose agent never comes back is retried.
        let mut s = sched(&p, 1);
        assert!(s.adopt(0, 77, "gone"));
        s.handle(Event::AgentDown { agent: "gone".into(), reason: "never came back".into() });
        let actions = drain(&mut s);
        assert!(
            actions.iter().any(|a| matches!(a, Action::Retry { step: 0, infra: true, .. })),
            "{actions:?}"
        );
    }

    #[test]
    fn command_failures_have_their_own_budget() {
        let p = fan(1, 1);
        let mut s = sched(&p, 0);
        s.handle(Event::AgentUp { agent: "a".into(), capacity: cap(4.0) });
        let d = dispatched(&drain(&mut s));
        s.handle(Event::Finished { attempt_id: d[0].2, end: AttemptEnd::CommandFailed("exit 1".into()) });
        let actions = drain(&mut s);
        assert!(actions.iter().any(|a| matches!(a, Action::Retry { infra: false, .. })), "{actions:?}");
        let d = dispatched(&actions);
        s.handle(Event::Finished { attempt_id: d[0].2, end: AttemptEnd::CommandFailed("exit 1".into()) });
        let actions = drain(&mut s);
        assert!(actions.iter().any(|a| matches!(a, Action::Failed { step: 0, .. })), "{actions:?}");
        assert_eq!(s.finished(), Some(false));
    }

    #[test]
    fn labels_and_memory_decide_where_a_step_can_go() {
        let p = Pipeline::parse(
            Path::new("/x.toml"),
            "name = \"t\"\n[[steps]]\nname = \"big\"\ncommand = \"true\"\nresources = { memory = \"2G\", labels = { partition = \"bigmem\" } }\n",
        )
        .unwrap();
        let mut s = sched(&p, 0);
        s.handle(Event::AgentUp { agent: "small".into(), capacity: cap(8.0) });
        let actions = drain(&mut s);
        assert!(actions.iter().any(|a| matches!(a, Action::Unschedulable { .. })), "{actions:?}");
        assert!(drain(&mut s).is_empty(), "said once");
        let mut labels = BTreeMap::new();
        labels.insert("partition".to_string(), "bigmem".to_string());
        let big = AgentCapacity { cpus: 1.0, memory_bytes: 4 << 30, slots: 1, labels };
        s.handle(Event::AgentUp { agent: "big".into(), capacity: big });
        let d = dispatched(&drain(&mut s));
        assert_eq!(d[0].1, "big");
    }

    /// The placement the scheduler made before its indexes (issue 21), by a full scan of the
    /// steps and agents: the first ready step that fits an open agent, on the one with the most
    /// free CPUs, then the first by id.
    fn placement_by_full_scan(s: &Scheduler) -> Option<(usize, String)> {
        for (i, step) in s.steps.iter().enumerate() {
            if step.state != StepState::Ready {
                continue;
            }
            // Agents with a slot free first, those that would queue the step after.
            let mut best: Option<(&String, u8, f64)> = None;
            for (id, a) in s.agents.iter().filter(|(_, a)| !a.draining && !a.away) {
                if Scheduler::could_ever_fit(a, &step.resources).is_ok()
                    && Scheduler::fits(a, &step.resources)
                {
                    let free = a.capacity.cpus - a.used_cpus;
                    let queues = u8::from(a.capacity.slots != 0 && a.running >= a.capacity.slots);
                    if best.is_none_or(|(_, q, f)| queues < q || (queues == q && free > f + 1e-6)) {
                        best = Some((id, queues, free));
                    }
                }
            }
            if let Some((id, ..)) = best {
                return Some((i, id.clone()));
            }
        }
        None
    }

    /// The indexes agree with the steps and agents they index.
    fn check_indexes(s: &Scheduler) {
        let mut counts = [0; 8];
        for st in &s.steps {
            counts[st.state.index()] += 1;
        }
        assert_eq!(counts, s.counts);
        let ready: BTreeSet<usize> = s
            .steps
            .iter()
            .enumerate()
            .filter(|(_, st)| st.state == StepState::Ready)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(ready, s.ready);
        for (shape, by_shape) in s.ready_by_shape.iter().enumerate() {
            let of_shape: BTreeSet<usize> =
                ready.iter().copied().filter(|&i| s.shape_of[i] == shape).collect();
            assert_eq!(&of_shape, by_shape);
            assert!(of_shape.iter().all(|&i| s.steps[i].resources == s.shapes[shape]));
        }
        for (i, st) in s.steps.iter().enumerate() {
            if let StepState::Running { attempt_id, agent } = &st.state {
                assert_eq!(s.by_attempt.get(attempt_id), Some(&i));
                assert!(s.by_agent[agent].contains(&i));
            }
        }
        assert_eq!(s.by_attempt.len(), counts[2]);
        let free: BTreeSet<(FreeKey, String)> =
            s.agents.iter().filter(|(_, a)| a.open()).map(|(id, a)| (a.key(), id.clone())).collect();
        assert_eq!(free, s.free);
    }

    #[test]
    fn indexed_placement_is_the_full_scans_through_random_events() {
        // Steps of mixed shapes, agents of mixed sizes coming, going away, back, draining and
        // down, attempts ending every way: after every event the indexes hold, and every
        // dispatch is where the full scan would have put it.
        let mut text = String::from("name = \"t\"\n");
        for i in 0..120 {
            let cpus = [0.5, 1.0, 2.0, 3.0][i % 4];
            let mem = ["0", "1G", "3G"][i % 3];
            let label = if i % 7 == 0 { ", labels = { pool = \"gpu\" }" } else { "" };
            text += &format!(
                "[[steps]]\nname = \"s{i}\"\ncommand = \"true\"\nretries = 1\nresources = {{ cpus = {cpus}, memory = \"{mem}\"{label} }}\n"
            );
            if i % 5 == 4 {
                text += &format!("after = [\"s{}\"]\n", i - 1);
            }
        }
        let p = Pipeline::parse(Path::new("/x.toml"), &text).unwrap();
        let mut s = sched(&p, 2);
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut running: Vec<u64> = Vec::new();
        let mut compared = 0;
        for round in 0..3000 {
            let agent = format!("a{}", rand(12));
            match rand(10) {
                0 | 1 => {
                    let mut labels = BTreeMap::new();
                    if rand(3) == 0 {
                        labels.insert("pool".to_string(), "gpu".to_string());
                    }
                    let capacity = AgentCapacity {
                        cpus: [1.0, 2.0, 4.0][rand(3) as usize],
                        memory_bytes: [1u64 << 30, 4 << 30][rand(2) as usize],
                        slots: rand(3) as u32,
                        labels,
                    };
                    s.handle(Event::AgentUp { agent, capacity });
                }
                2 => s.handle(Event::AgentAway { agent }),
                3 => s.handle(Event::AgentBack { agent }),
                4 if rand(4) == 0 => s.handle(Event::AgentDraining { agent }),
                5 if rand(4) == 0 => s.handle(Event::AgentDown { agent, reason: "gone".into() }),
                _ if !running.is_empty() => {
                    let attempt_id = running.swap_remove(rand(running.len() as u64) as usize);
                    // Mostly quick attempts, so agents queue steps and stop queueing.
                    s.handle(Event::Took { attempt_id, elapsed_ms: [1, 5, 20, 500][rand(4) as usize] });
                    check_indexes(&s);
                    let end = match rand(5) {
                        0 => AttemptEnd::CommandFailed("exit 1".into()),
                        1 => AttemptEnd::InfraFailed("lost".into()),
                        2 => AttemptEnd::NotSent("not sent".into()),
                        _ => AttemptEnd::Succeeded,
                    };
                    s.handle(Event::Finished { attempt_id, end });
                }
                _ => {}
            }
            check_indexes(&s);
            loop {
                let expected =
                    if s.queue.iter().any(
                        |a| !matches!(a, Action::Ready { step } if s.steps[*step].state != StepState::Ready),
                    ) {
                        None
                    } else {
                        placement_by_full_scan(&s)
                    };
                let Some(action) = s.poll_action() else { break };
                if let Action::Dispatch { step, agent, attempt_id, .. } = &action {
                    if let Some(expected) = &expected {
                        assert_eq!((*step, agent.clone()), expected.clone(), "round {round}");
                        compared += 1;
                    }
                    running.push(*attempt_id);
                }
                check_indexes(&s);
            }
            running.retain(|id| s.by_attempt.contains_key(id));
        }
        assert!(s.counts[3] > 0, "some steps succeeded: {:?}", s.counts());
        assert!(compared > 100, "only {compared} dispatches compared");
    }
}
