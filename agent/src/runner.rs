//! The agent's steps across connections: attempts keep running when the connection drops,
//! their results wait in `pending` until the coordinator acknowledges them (they are sent
//! again after each reconnect), a drain lets running attempts finish and refuses new ones,
//! and shutdown cancels every attempt and waits for its cleanup.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::{
    AgentToCoordinator, LogLine, RegistryEntry, RemoteError, ResourceUsage, StepExit, StepOutcome, StepSpec,
};
use rustix::process::Signal;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::metrics;
use crate::step::Steps;

/// Lines buffered per attempt before output is dropped (the log files keep it all).
const LINE_BUFFER: usize = 8192;
/// Most lines in one `StepOutput` message.
const LINES_PER_MESSAGE: usize = 512;
/// Longest wait for running attempts to clean up at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

pub struct Runner {
    steps: Steps,
    outbox: mpsc::Sender<AgentToCoordinator>,
    running: Mutex<HashMap<u64, CancellationToken>>,
    pending: Mutex<BTreeMap<u64, StepOutcome>>,
    /// What the pending results' attempts used, sent before each (again with each resend).
    usages: Mutex<BTreeMap<u64, ResourceUsage>>,
    tasks: TaskTracker,
    draining: AtomicBool,
    /// Steps this agent runs at once.
    slots: u32,
    /// A permit per slot, per run (each run's scheduler counts the agent's slots on its own):
    /// an attempt beyond them (a run queues one on an agent of quick steps) waits here until
    /// one frees, or until it is cancelled or the agent drains. Program builds do not wait.
    permits: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Cancelled when the agent drains: attempts still waiting for a slot are refused.
    drained: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Runner {
    pub fn new(steps: Steps, outbox: mpsc::Sender<AgentToCoordinator>, slots: u32) -> Arc<Self> {
        Arc::new(Self {
            steps,
            outbox,
            running: Mutex::new(HashMap::new()),
            pending: Mutex::new(BTreeMap::new()),
            usages: Mutex::new(BTreeMap::new()),
            tasks: TaskTracker::new(),
            draining: AtomicBool::new(false),
            slots: slots.max(1),
            permits: Mutex::new(HashMap::new()),
            drained: CancellationToken::new(),
        })
    }

    pub fn running(&self) -> usize {
        lock(&self.running).len()
    }

    /// From now on new attempts are refused; running ones go on.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.drained.cancel();
    }

    /// The slots of `run`, shared by its attempts while any is here.
    fn permits(&self, run: &str) -> Arc<Semaphore> {
        let mut all = lock(&self.permits);
        all.entry(run.to_string()).or_insert_with(|| Arc::new(Semaphore::new(self.slots as usize))).clone()
    }

    /// Forgets `run`'s slots once no attempt of it holds them.
    fn done_with(&self, run: &str, permits: Arc<Semaphore>) {
        drop(permits);
        let mut all = lock(&self.permits);
        if all.get(run).is_some_and(|p| Arc::strong_count(p) == 1) {
            all.remove(run);
        }
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Nothing running and every result acknowledged: a draining agent may leave.
    pub fn idle(&self) -> bool {
        lock(&self.running).is_empty() && lock(&self.pending).is_empty()
    }

    /// Starts an attempt unless it is running or finished already (a coordinator that
    /// re-sends an assignment after a reconnect gets the result again instead).
    pub fn start(self: &Arc<Self>, spec: StepSpec) {
        let attempt_id = spec.attempt_id;
        if lock(&self.running).contains_key(&attempt_id) {
            warn!(attempt = attempt_id, "attempt is running already");
            return;
        }
        if let Some(done) = lock(&self.pending).get(&attempt_id).cloned() {
            if let Some(usage) = lock(&self.usages).get(&attempt_id).cloned() {
                let _ = self.outbox.try_send(AgentToCoordinator::StepUsage { attempt_id, usage });
            }
            let _ = self.outbox.try_send(AgentToCoordinator::StepFinished(done));
            return;
        }
        if self.draining() {
            // Sent before the coordinator saw our Draining: refused, so it goes elsewhere.
            warn!(attempt = attempt_id, step = %spec.step, "refusing a step: this agent is draining");
            let refused = not_started(attempt_id, "agent is draining: step refused before it started");
            lock(&self.pending).insert(attempt_id, refused.clone());
            let _ = self.outbox.try_send(AgentToCoordinator::StepFinished(refused));
            return;
        }
        let cancel = CancellationToken::new();
        lock(&self.running).insert(attempt_id, cancel.clone());
        let me = self.clone();
        let span = info_span!("step", run = %spec.run, step = %spec.step, attempt = attempt_id);
        self.tasks.spawn(
            async move {
                tracing::debug!("step received");
                let (tx, rx) = mpsc::channel::<LogLine>(LINE_BUFFER);
                let forward = tokio::spawn(forward_lines(attempt_id, rx, me.outbox.clone()));
                let outbox = me.outbox.clone();
                let on_start = Box::new(move |backend: &str, view: &str| {
                    let _ = outbox.try_send(AgentToCoordinator::StepStarted {
                        attempt_id,
                        backend: backend.to_string(),
                        view: view.to_string(),
                    });
                });
                let m = crate::metrics::get();
                let run = spec.run.clone();
                let permits = me.permits(&run);
                let build = matches!(spec.kind, protocol::StepKind::Build { .. });
                let permit = match permits.clone().try_acquire_owned() {
                    Ok(p) => Ok(Some(p)),
                    Err(_) if build => Ok(None),
                    Err(_) => {
                        tracing::debug!("step queued: every slot is busy");
                        tokio::select! {
                            biased;
                            _ = cancel.cancelled() => Err("cancelled while queued for a slot: it never started"),
                            _ = me.drained.cancelled() => Err("agent is draining: step refused before it started"),
                            p = permits.clone().acquire_owned() => p.map(Some).map_err(|_| "no slot"),
                        }
                    }
                };
                let (mut outcome, usage) = match permit {
                    Ok(_slot) => {
                        m.steps_running.inc();
                        let ran = me.steps.run(spec, cancel, tx, on_start).await;
                        m.steps_running.dec();
                        ran
                    }
                    Err(why) => {
                        drop(tx);
                        (not_started(attempt_id, why), None)
                    }
                };
                me.done_with(&run, permits);
                m.steps.get_or_create(if outcome.succeeded() { &metrics::SUCCEEDED } else { &metrics::FAILED }).inc();
                // A launcher's snippet reports a signal as bash does: 128 + the signal.
                let signalled = match outcome.exit {
                    StepExit::Signalled(sig) => Some(sig),
                    StepExit::Exited(c) if c > 128 => Some(c - 128),
                    _ => None,
                };
                if let Some(sig) = signalled
                    && me.draining()
                    && !usage.as_ref().is_some_and(|u| u.oom_killed)
                    && [Signal::TERM, Signal::KILL, Signal::INT, Signal::HUP].iter().any(|s| s.as_raw() == sig)
                {
                    // The batch system ended the job (scancel, preemption, time limit) and
                    // signalled the snippet with the agent: not the command's fault.
                    outcome.exit = StepExit::Cancelled;
                    outcome.error = Some(format!(
                        "the snippet was killed by signal {sig} while the agent was draining (its job was cancelled or preempted)"
                    ));
                }
                let _ = forward.await;
                // One line per attempt's end, with what it used.
                let u = usage.clone().unwrap_or_default();
                info!(
                    exit = ?outcome.exit,
                    elapsed_ms = outcome.elapsed_ms,
                    error = outcome.error.as_deref().unwrap_or(""),
                    cpu_user_ms = u.cpu_user_ms,
                    cpu_system_ms = u.cpu_system_ms,
                    peak_memory_bytes = u.peak_memory_bytes,
                    read_bytes = u.read_bytes,
                    write_bytes = u.write_bytes,
                    oom_killed = u.oom_killed,
                    measured_by = %u.measured_by,
                    "step finished"
                );
                lock(&me.pending).insert(attempt_id, outcome.clone());
                lock(&me.running).remove(&attempt_id);
                if let Some(usage) = usage {
                    lock(&me.usages).insert(attempt_id, usage.clone());
                    let _ = me.outbox.send(AgentToCoordinator::StepUsage { attempt_id, usage }).await;
                }
                let _ = me.outbox.send(AgentToCoordinator::StepFinished(outcome)).await;
            }
            .instrument(span),
        );
    }

    pub fn cancel(&self, attempt_id: u64, reason: &str) {
        match lock(&self.running).get(&attempt_id) {
            Some(token) => {
                info!(attempt = attempt_id, reason = %reason, "cancelling step");
                token.cancel();
            }
            None => warn!(attempt = attempt_id, "cancel for an attempt that is not running"),
        }
    }

    pub fn ack(&self, attempt_id: u64) {
        lock(&self.pending).remove(&attempt_id);
        lock(&self.usages).remove(&attempt_id);
    }

    /// Attempts running or holding an unacknowledged result.
    pub fn in_hand(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = lock(&self.running).keys().copied().collect();
        ids.extend(lock(&self.pending).keys().copied());
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Results not yet acknowledged, to send again on a new connection, with what their
    /// attempts used.
    pub fn unacknowledged(&self) -> Vec<(StepOutcome, Option<ResourceUsage>)> {
        let usages = lock(&self.usages);
        lock(&self.pending).values().map(|o| (o.clone(), usages.get(&o.attempt_id).cloned())).collect()
    }

    pub fn check_outputs(
        self: &Arc<Self>,
        request_id: u64,
        paths: Vec<String>,
        registry: Vec<(String, RegistryEntry)>,
    ) {
        let me = self.clone();
        self.tasks.spawn(async move {
            let result = me
                .steps
                .check_outputs(&paths, &registry)
                .await
                .map_err(|e| RemoteError { code: protocol::ErrorCode::Internal, message: format!("{e:#}") });
            let _ = me.outbox.send(AgentToCoordinator::OutputsChecked { request_id, result }).await;
        });
    }

    /// Cancels every running attempt and waits (bounded) for their cleanup.
    pub async fn shutdown(&self) {
        let tokens: Vec<CancellationToken> = lock(&self.running).values().cloned().collect();
        if !tokens.is_empty() {
            info!(steps = tokens.len(), "cancelling running steps before shutdown");
        }
        for t in tokens {
            t.cancel();
        }
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait()).await.is_err() {
            warn!("steps did not finish their cleanup within {SHUTDOWN_GRACE:?}");
        }
    }
}

/// The outcome of an attempt that ended before it started.
fn not_started(attempt_id: u64, why: &str) -> StepOutcome {
    StepOutcome {
        attempt_id,
        exit: StepExit::Cancelled,
        error: Some(why.into()),
        backend: String::new(),
        outputs: Vec::new(),
        new_entries: Vec::new(),
        elapsed_ms: 0,
    }
}

async fn forward_lines(
    attempt_id: u64,
    mut rx: mpsc::Receiver<LogLine>,
    outbox: mpsc::Sender<AgentToCoordinator>,
) {
    while let Some(first) = rx.recv().await {
        let mut lines = vec![first];
        while lines.len() < LINES_PER_MESSAGE {
            match rx.try_recv() {
                Ok(l) => lines.push(l),
                Err(_) => break,
            }
        }
        // Output is best effort: the log files on the agent keep all of it.
        let _ = outbox.try_send(AgentToCoordinator::StepOutput { attempt_id, lines });
    }
}
