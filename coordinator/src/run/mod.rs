//! Runs a pipeline on the coordinator's agents: plan (skip / prune), stage programs and
//! inputs, dispatch through the [`Scheduler`], merge harvests into the working registry,
//! record everything in the state database, and report each lifecycle event as one log line
//! and one [`RunEvent`].
//!
//! The same driver serves `pype-coordinator run` (embedded coordinator) and runs submitted to
//! a running `serve` (`AdminRequest::SubmitRun`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use protocol::registry::Provenance;
use protocol::{
    ProgramArtifact, ProgramRef, Registry, RunEvent, RunProgress, StepKind, StepOutcome, StepSpec,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub mod cost;
pub mod membership;
pub mod outcome;
pub mod sched;

use crate::hub::away::Away;
use crate::hub::{Hub, Runs, StepEvent};
use crate::lograte::{Burst, LeftOut, MEMBER_LINES, member_burst};
use crate::metrics;
use crate::persist::state::{self, AttemptRecord, RunRecord, State, now_ms};
use crate::persist::working::WorkingRegistry;
use crate::pipeline::plan::{self, Action as Planned, PlanOptions};
use crate::pipeline::{Pipeline, Profile};
use membership::Membership;
use outcome::{check_harvest, exit_text, judge, usage_text, write_back};
use sched::{Action, AgentCapacity, AttemptEnd, Event, Scheduler};

/// Lines of a failed step's log printed with the failure.
const TAIL_LINES: usize = 20;
/// Agents a program build is tried on before the run fails (a lost agent is not the build's fault).
const BUILD_TRIES: u32 = 3;
/// Most paths in one `CheckOutputs` request.
const CHECK_CHUNK: usize = 5000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunOptions {
    /// Steps to re-run, with everything downstream of them.
    pub force: Vec<String>,
    pub empty_ok: bool,
    /// Re-runs after infrastructure failures (lost agent, failed setup or harvest), per step.
    pub infra_retries: u32,
    /// Import external inputs that are not in the registry from this host.
    pub import_inputs: bool,
    /// Fail a step no connected agent can ever fit instead of waiting for one.
    pub fail_unschedulable: bool,
    /// Longest wait for the first agent.
    pub agent_wait_secs: u64,
}

/// Where a run keeps its files: `<state>/runs/<run>/<step>/attempt-<n>.log`.
pub fn runs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("runs")
}

pub struct RunResult {
    pub run_id: String,
    pub succeeded: bool,
    pub summary: String,
}

/// Everything a run needs from its coordinator.
pub struct Engine {
    pub coord: Arc<Hub>,
    pub state: Arc<State>,
    pub registry: Arc<WorkingRegistry>,
    pub state_dir: PathBuf,
    /// Agents the current run wants, for a provisioner to follow.
    pub demand: tokio::sync::watch::Sender<crate::provision::Demand>,
    /// Steps clients cancel, `(run, step)`: each running run takes its own.
    pub cancels: tokio::sync::broadcast::Sender<(String, String)>,
}

impl Engine {
    /// The working registry, read and parsed on the blocking pool (it grows with every
    /// harvested output; agents' heartbeats share this thread).
    async fn load_registry(&self) -> Result<Registry> {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || registry.load()).await?
    }

    /// Merges `entries` into the working registry on the blocking pool.
    async fn merge_registry(&self, entries: Vec<(String, protocol::RegistryEntry)>) -> Result<usize> {
        let registry = self.registry.clone();
        tokio::task::spawn_blocking(move || registry.merge(entries)).await?
    }
}

fn new_run_id(pipeline: &str) -> String {
    let secs = now_ms() / 1000;
    let t =
        time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{pipeline}-{:04}{:02}{:02}-{:02}{:02}{:02}-{:04x}",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        rand::random::<u16>()
    )
}

/// Events out of a run: to the log, and to whoever watches (terminal display, admin stream).
pub struct Reporter {
    run: String,
    started_ms: u64,
    sink: Option<mpsc::UnboundedSender<RunEvent>>,
    progress: RunProgress,
    /// Each step's state as the metrics count it, and since when it is ready.
    states: HashMap<usize, (&'static str, Option<Instant>)>,
    /// When each running attempt was dispatched.
    dispatched: HashMap<u64, Instant>,
    /// Steps already warned about their memory.
    memory_warned: HashSet<String>,
    /// When the bytes the run moved were last summed (see [`BYTES_LOOK_EVERY`]).
    bytes_looked: Option<Instant>,
    /// The log lines of each kind of membership event (see [`Reporter::emit_member`]).
    member_lines: HashMap<&'static str, Burst>,
}

/// The bytes a run moved are summed over its transfers at most this often, not at every
/// finished step: the sum grows with the run, and a 50,000-step run would sum 50,000 times.
const BYTES_LOOK_EVERY: Duration = Duration::from_secs(1);
/// Longest a step's start (or an attempt's figures) waits uncommitted for a transaction
/// that has to happen anyway.
const COMMIT_WAIT: Duration = Duration::from_millis(200);

impl Drop for Reporter {
    /// A run's steps leave `pype_steps` with it (`pype_steps_ended` keeps what they became).
    fn drop(&mut self) {
        for (state, _) in self.states.values() {
            metrics::get().step_moved(Some(state), None);
        }
    }
}

impl Reporter {
    fn new(run: &str, sink: Option<mpsc::UnboundedSender<RunEvent>>) -> Self {
        Reporter {
            run: run.to_string(),
            started_ms: now_ms(),
            sink,
            progress: RunProgress::default(),
            states: HashMap::new(),
            dispatched: HashMap::new(),
            memory_warned: HashSet::new(),
            bytes_looked: None,
            member_lines: HashMap::new(),
        }
    }

    /// Step `step` is now in `state` (for `pype_steps`). `ended` says whether reaching it
    /// counts in `pype_steps_ended` (not for a step a resumed run finds done).
    fn step_state(&mut self, step: usize, state: &'static str, ended: bool) {
        let now = Instant::now();
        let prev = self.states.insert(step, (state, (state == "ready").then_some(now)));
        let m = metrics::get();
        if ended {
            m.step_moved(prev.map(|p| p.0), Some(state));
        } else {
            if let Some((p, _)) = prev {
                m.step_moved(Some(p), None);
            }
            m.steps.get_or_create(&metrics::l1("state", state)).inc();
        }
    }

    /// Step `step`'s attempt `attempt_id` was sent: its dispatch latency is observed.
    fn step_dispatched(&mut self, step: usize, attempt_id: u64) {
        let now = Instant::now();
        if let Some((_, Some(ready))) = self.states.get(&step) {
            metrics::get().dispatch_latency.observe(now.duration_since(*ready).as_secs_f64());
        }
        self.dispatched.insert(attempt_id, now);
        self.step_state(step, "running", false);
    }

    /// Attempt `attempt_id` ended with `outcome` (`succeeded`, `command_failed`,
    /// `infra_failed`, `lost`, `superseded`, `not_sent`).
    fn attempt_ended(&mut self, attempt_id: u64, outcome: &str) {
        let m = metrics::get();
        m.attempts.get_or_create(&metrics::l1("outcome", outcome)).inc();
        if let Some(t) = self.dispatched.remove(&attempt_id) {
            m.step_duration
                .get_or_create(&metrics::l1("outcome", outcome))
                .observe(t.elapsed().as_secs_f64());
        }
    }

    fn emit(&self, event: &str, step: Option<&str>, attempt: Option<u64>, agent: Option<&str>, detail: &str) {
        self.log(event, step, attempt, agent, detail);
        self.send(event, step, attempt, agent, detail);
    }

    fn log(&self, event: &str, step: Option<&str>, attempt: Option<u64>, agent: Option<&str>, detail: &str) {
        info!(
            run = %self.run,
            step = step.unwrap_or(""),
            attempt = attempt.unwrap_or(0),
            agent = agent.unwrap_or(""),
            detail = %detail,
            "{event}"
        );
    }

    /// A membership event (`agent joined`, `agent left`, ...): to whoever watches, always; to
    /// the log one by one up to [`MEMBER_LINES`] per window and kind, the rest in one line
    /// when the window ends (a fleet of 10,000 agents joining is not 10,000 lines).
    fn emit_member(&mut self, event: &'static str, agent: &str, detail: &str) {
        let burst = self.member_lines.entry(event).or_insert_with(member_burst);
        let (one, ended) = burst.event(Instant::now());
        if let Some(l) = ended {
            self.say_left_out(event, l);
        }
        if one {
            self.log(event, None, None, Some(agent), detail);
        }
        self.send(event, None, None, Some(agent), detail);
    }

    /// Says what the membership windows that have ended (all of them, at the run's `end`)
    /// left out of the log.
    fn say_members_left_out(&mut self, now: Instant, end: bool) {
        let ended: Vec<(&'static str, LeftOut)> = self
            .member_lines
            .iter_mut()
            .filter_map(|(k, b)| if end { b.end(now) } else { b.poll(now) }.map(|l| (*k, l)))
            .collect();
        for (event, l) in ended {
            self.say_left_out(event, l);
        }
    }

    fn say_left_out(&self, event: &str, l: LeftOut) {
        info!(
            run = %self.run,
            events = l.count,
            "{} more `{event}` in the last {} s (past {MEMBER_LINES}, not logged one by one)",
            l.count,
            l.over.as_secs().max(1)
        );
    }

    fn send(&self, event: &str, step: Option<&str>, attempt: Option<u64>, agent: Option<&str>, detail: &str) {
        if let Some(sink) = &self.sink {
            let _ = sink.send(RunEvent {
                run: self.run.clone(),
                event: event.to_string(),
                step: step.map(str::to_string),
                attempt,
                agent: agent.map(str::to_string),
                detail: detail.to_string(),
                progress: self.progress,
            });
        }
    }
}

/// Output of one running attempt: its log file and the last lines.
struct AttemptLog {
    file: Option<std::fs::File>,
    path: PathBuf,
    tail: VecDeque<String>,
}

impl AttemptLog {
    fn new(path: PathBuf) -> Self {
        Self { file: None, path, tail: VecDeque::new() }
    }

    fn push(&mut self, line: &str) {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            self.file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).ok();
        }
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{line}");
        }
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_string());
    }
}

/// The least time between two demands sent to a provisioner.
const DEMAND_EVERY: Duration = Duration::from_millis(200);

/// The least time between two looks at the connected agents while they keep changing, per
/// connected agent (a look costs time linear in them), and at most. A few agents are looked at
/// on every change; 10,000 joining at once are taken in 50 ms at a time.
const MEMBERSHIP_COALESCE_PER_AGENT: Duration = Duration::from_micros(5);
const MEMBERSHIP_COALESCE: Duration = Duration::from_millis(50);

/// How long an agent that ran an adopted attempt has to reconnect to a restarted coordinator
/// (beyond the heartbeat window): agents retry with a backoff of up to 30 s.
const ADOPT_RECONNECT_GRACE: Duration = Duration::from_secs(45);

struct Running {
    step: usize,
    agent: String,
    log: AttemptLog,
    /// What the attempt used, when its agent said (just before its result).
    usage: Option<protocol::ResourceUsage>,
    /// The serial of the agent's connection it was sent on; 0 for an attempt adopted from a
    /// previous coordinator (see [`lost_on_reconnect`]).
    serial: u64,
}

/// What a run has decided and not yet committed: its writes to the state database, the
/// attempts to send once their rows are in, and the results to acknowledge once their ends
/// are in. One burst (a loop's dispatches, a batch of results) is one transaction
/// ([`Engine::commit`]) instead of one per row; nothing that depends on a write leaves first.
#[derive(Default)]
struct Journal {
    writes: Vec<state::Write>,
    sends: Vec<Outgoing>,
    acks: Vec<(String, u64)>,
    /// Since when writes that can wait ([`state::Write::can_wait`]) wait uncommitted.
    waiting_since: Option<Instant>,
}

impl Journal {
    /// Whether to leave the writes for a later transaction: all of them can wait, nothing
    /// waits on them, and the first has waited less than [`COMMIT_WAIT`]. An empty step's
    /// start then goes in with its end, one transaction instead of two.
    fn can_wait(&mut self, now: Instant) -> bool {
        if !self.acks.is_empty() || !self.sends.is_empty() || !self.writes.iter().all(state::Write::can_wait)
        {
            self.waiting_since = None;
            return false;
        }
        let since = *self.waiting_since.get_or_insert(now);
        if now.duration_since(since) < COMMIT_WAIT {
            return true;
        }
        self.waiting_since = None;
        false
    }

    /// When writes left waiting must be committed.
    fn commit_due(&self) -> Option<Instant> {
        self.waiting_since.map(|t| t + COMMIT_WAIT)
    }
}

/// An attempt decided and recorded in the journal, sent once the journal is committed.
struct Outgoing {
    step: usize,
    agent: String,
    attempt_id: u64,
    number: u32,
    spec: StepSpec,
}

impl Engine {
    /// Sums the bytes the run moved so far into its progress, if [`BYTES_LOOK_EVERY`] has
    /// passed since the last sum (or `now`).
    fn look_at_bytes(&self, rep: &mut Reporter, now: bool) {
        if !now && rep.bytes_looked.is_some_and(|t| t.elapsed() < BYTES_LOOK_EVERY) {
            return;
        }
        rep.bytes_looked = Some(Instant::now());
        if let Ok(b) = self.state.transfer_bytes_since(rep.started_ms) {
            rep.progress.bytes = b;
        }
    }

    /// Commits the journal's writes, then acknowledges its results. Its attempts to send are
    /// left for the caller, who sends them only if this succeeded. On failure the writes and
    /// acknowledgements are dropped (an agent sends an unacknowledged result again).
    fn commit(&self, j: &mut Journal) -> Result<()> {
        let writes = std::mem::take(&mut j.writes);
        if let Err(e) = self.state.apply(&writes) {
            j.acks.clear();
            return Err(e);
        }
        for (agent, attempt_id) in j.acks.drain(..) {
            self.coord.ack_result(&agent, attempt_id);
        }
        Ok(())
    }

    /// Sends the journal's attempts, whose rows `committed` says are in the state database (or
    /// not: then each attempt fails as an infrastructure failure, unsent). An attempt that
    /// cannot be sent waits for another agent without using a retry, and its agent takes
    /// nothing new until it is seen again.
    #[allow(clippy::too_many_arguments)]
    async fn send_attempts(
        &self,
        committed: &Result<()>,
        j: &mut Journal,
        p: &Pipeline,
        run_id: &str,
        runs: &Path,
        tx: &mpsc::UnboundedSender<(u64, StepEvent)>,
        sched: &mut Scheduler,
        running: &mut HashMap<u64, Running>,
        membership: &mut Membership,
        rep: &mut Reporter,
    ) {
        for o in std::mem::take(&mut j.sends) {
            let name = &p.steps[o.step].name;
            if let Err(e) = committed {
                // Every attempt is in the attempts table before it is sent: a resumed run
                // adopts only what the table knows, so an attempt it cannot record is not sent.
                let reason = format!("state database: could not record the attempt: {e:#}");
                warn!(run = %run_id, step = %name, attempt = o.attempt_id, "{reason}; not dispatched");
                sched.handle(Event::Finished {
                    attempt_id: o.attempt_id,
                    end: AttemptEnd::InfraFailed(reason),
                });
                continue;
            }
            let log = AttemptLog::new(runs.join(name).join(format!("attempt-{}.log", o.number)));
            let r = Running { step: o.step, agent: o.agent.clone(), log, usage: None, serial: 0 };
            running.insert(o.attempt_id, r);
            rep.progress.running += 1;
            rep.step_dispatched(o.step, o.attempt_id);
            rep.emit(
                "step dispatched",
                Some(name),
                Some(o.attempt_id),
                Some(&o.agent),
                &format!("attempt {}", o.number),
            );
            match self.coord.dispatch(&o.agent, o.spec, tx.clone()).await {
                Ok(sent) => {
                    if let Some(r) = running.get_mut(&o.attempt_id) {
                        r.serial = sent.serial;
                    }
                }
                Err(e) => {
                    running.remove(&o.attempt_id);
                    rep.progress.running = rep.progress.running.saturating_sub(1);
                    rep.attempt_ended(o.attempt_id, "not_sent");
                    rep.step_state(o.step, "ready", false);
                    j.writes.push(state::Write::attempt_ended(
                        o.attempt_id,
                        "lost",
                        None,
                        Some(&format!("{e:#}")),
                        None,
                    ));
                    sched.handle(Event::Finished {
                        attempt_id: o.attempt_id,
                        end: AttemptEnd::NotSent(format!("{e:#}")),
                    });
                    membership.handle(Instant::now(), membership::Event::Unreachable { agent: o.agent });
                }
            }
        }
    }

    /// Records what an attempt used, says it as a `step resources` event, and warns once per
    /// step when its peak memory was above what it requested or below a quarter of it.
    #[allow(clippy::too_many_arguments)]
    fn report_usage(
        &self,
        run_id: &str,
        step: &crate::pipeline::Step,
        attempt_id: u64,
        agent: &str,
        u: &protocol::ResourceUsage,
        rep: &mut Reporter,
        journal: &mut Journal,
    ) {
        let requested = step.resources.memory_bytes;
        match state::Write::attempt_usage(attempt_id, u, requested) {
            Ok(w) => journal.writes.push(w),
            Err(e) => warn!(run = %run_id, "state database: {e:#}"),
        }
        rep.emit(
            "step resources",
            Some(&step.name),
            Some(attempt_id),
            Some(agent),
            &usage_text(u, requested),
        );
        let judged = outcome::memory_judgement(u.peak_memory_bytes, requested);
        if let Some(why) = judged
            && rep.memory_warned.insert(step.name.clone())
        {
            warn!(run = %run_id, step = %step.name, attempt = attempt_id, "step {}: {why}", step.name);
            rep.emit("step memory", Some(&step.name), Some(attempt_id), Some(agent), &why);
        }
    }

    /// Publishes what the run wants from the provisioner.
    fn want_agents(
        &self,
        run: &str,
        want: usize,
        active: usize,
        busy: HashSet<String>,
        unplaced: Vec<crate::provision::Need>,
    ) {
        let d = crate::provision::Demand { want, active, busy, run: Some(run.to_string()), unplaced };
        self.demand.send_if_modified(|cur| {
            let changed = *cur != d;
            *cur = d;
            changed
        });
    }

    /// Opens (or reopens, with `resume`) a run and drives it to its end.
    /// Cancels `step` of the running `run` (a client's request): its attempt is cancelled
    /// without a retry, and what depends on it is cancelled. Errors when no run of this
    /// coordinator is running.
    pub fn cancel_step(&self, run: &str, step: &str) -> Result<()> {
        let rec = self.state.run(run)?.ok_or_else(|| anyhow!("no run {run}"))?;
        if rec.state != "running" {
            bail!("run {run} is {}, not running", rec.state);
        }
        if !self.state.has_step(run, step)? {
            bail!("run {run} has no step {step}");
        }
        self.cancels
            .send((run.to_string(), step.to_string()))
            .map_err(|_| anyhow!("run {run} is not running on this coordinator"))?;
        Ok(())
    }

    pub async fn run(
        &self,
        pipeline: Pipeline,
        opts: RunOptions,
        resume: Option<String>,
        sink: Option<mpsc::UnboundedSender<RunEvent>>,
        shutdown: CancellationToken,
    ) -> Result<RunResult> {
        let mut in_flight = Vec::new();
        let is_new = resume.is_none();
        let (run_id, done, attempts_before) = match resume {
            None => {
                let run_id = new_run_id(&pipeline.name);
                self.state.create_run(&RunRecord {
                    run_id: run_id.clone(),
                    pipeline: pipeline.name.clone(),
                    pipeline_file: pipeline.file.display().to_string(),
                    pipeline_json: serde_json::to_string(&pipeline)?,
                    options_json: serde_json::to_string(&opts)?,
                    state: "running".into(),
                    created_ms: now_ms(),
                    finished_ms: None,
                    error: None,
                })?;
                (run_id, HashSet::new(), vec![0; pipeline.steps.len()])
            }
            Some(run_id) => {
                // Attempts in flight when the previous coordinator died may still run on
                // persistent agents: the run adopts them (see `schedule`).
                in_flight = self.state.open_attempts(&run_id)?;
                let steps = self.state.steps_of(&run_id)?;
                let mut done = HashSet::new();
                let mut attempts = vec![0; pipeline.steps.len()];
                for s in steps {
                    if let Some(i) = pipeline.index_of(&s.step) {
                        attempts[i] = s.attempts;
                        if s.state == "succeeded" {
                            done.insert(i);
                        }
                    }
                }
                // An attempt recorded as succeeded (its entries merged) whose step's own row was
                // not written yet when the coordinator died: done as well, not run twice.
                for step in self.state.succeeded_attempt_steps(&run_id)? {
                    if let Some(i) = pipeline.index_of(&step) {
                        done.insert(i);
                    }
                }
                self.state.set_run_state(&run_id, "running", None)?;
                (run_id, done, attempts)
            }
        };
        let mut rep = Reporter::new(&run_id, sink);
        rep.progress.total = pipeline.steps.len() as u32;
        rep.emit(
            "run started",
            None,
            None,
            None,
            &format!("{} steps, pipeline {}", pipeline.steps.len(), pipeline.file.display()),
        );
        // One agent to plan with; the scheduler raises the demand as steps become ready.
        self.want_agents(&run_id, 1, 1, HashSet::new(), Vec::new());
        let prepared = self.prepare(&pipeline, &opts, &run_id, done, &in_flight, &mut rep, &shutdown).await;
        let result = match prepared {
            Ok(Some((decisions, reg))) => {
                self.schedule(
                    &pipeline,
                    &opts,
                    &run_id,
                    &decisions,
                    &attempts_before,
                    in_flight,
                    reg,
                    &mut rep,
                    &shutdown,
                )
                .await
            }
            Ok(None) if is_new => {
                let e = anyhow!("interrupted before the run started; nothing ran");
                return Err(self.not_started(&pipeline, &run_id, &rep, e));
            }
            Ok(None) => Ok((false, "interrupted before any agent joined".to_string())),
            Err(e) if is_new => return Err(self.not_started(&pipeline, &run_id, &rep, e)),
            Err(e) => Err(e),
        };
        self.want_agents(&run_id, 0, 0, HashSet::new(), Vec::new());
        let (state, error, succeeded, summary) = match result {
            Ok((true, summary)) => ("succeeded", None, true, summary),
            Ok((false, summary)) if shutdown.is_cancelled() => {
                ("interrupted", Some(summary.clone()), false, summary)
            }
            Ok((false, summary)) => ("failed", Some(summary.clone()), false, summary),
            Err(e) => {
                let msg = format!("{e:#}");
                ("failed", Some(msg.clone()), false, msg)
            }
        };
        self.state.set_run_state(&run_id, state, error.as_deref())?;
        self.look_at_bytes(&mut rep, true);
        rep.say_members_left_out(Instant::now(), true);
        rep.emit("run finished", None, None, None, &format!("{state}: {summary}"));
        Ok(RunResult { run_id, succeeded, summary })
    }

    /// A new run that could not start leaves nothing to resume: it is removed from the state
    /// database, and the error says it did not start.
    fn not_started(
        &self,
        pipeline: &Pipeline,
        run_id: &str,
        rep: &Reporter,
        e: anyhow::Error,
    ) -> anyhow::Error {
        self.want_agents(run_id, 0, 0, HashSet::new(), Vec::new());
        if let Err(db) = self.state.forget_run(run_id) {
            warn!(run = %run_id, "state database: could not remove the run that did not start: {db:#}");
        }
        rep.emit("run not started", None, None, None, &format!("{e:#}"));
        e.context(format!("pipeline {} did not start", pipeline.name))
    }

    /// Waits until at least `n` agents are connected.
    pub async fn wait_for_agents(&self, n: usize, timeout: Duration) -> Result<()> {
        let mut members = self.coord.membership();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.coord.agent_views().len() >= n {
                return Ok(());
            }
            if let Some(refused) = self.coord.provisioning_refused() {
                bail!(
                    "{} of {n} agents connected, and no instance can be created: {refused}",
                    self.coord.agent_views().len()
                );
            }
            if tokio::time::timeout_at(deadline, members.changed()).await.is_err() {
                let why = match self.coord.provisioning_error() {
                    Some(e) => format!(" (the last instance create failed: {e})"),
                    None => String::new(),
                };
                bail!(
                    "{} of {n} agents connected after {}s{why}",
                    self.coord.agent_views().len(),
                    timeout.as_secs()
                );
            }
        }
    }

    /// The first connected agent, for work any agent can do.
    fn first_agent(&self, purpose: &str) -> Result<String> {
        self.coord
            .agent_views()
            .into_iter()
            .next()
            .map(|a| a.agent_id)
            .ok_or_else(|| anyhow!("no agent connected to {purpose}"))
    }

    /// `check_outputs` of `paths` through the first connected agent's backend.
    pub async fn check_outputs(
        &self,
        paths: &[String],
        reg: &Registry,
    ) -> Result<HashMap<String, Option<u64>>> {
        let agent = self.first_agent("check outputs with")?;
        let mut out = HashMap::new();
        for chunk in paths.chunks(CHECK_CHUNK) {
            let entries = reg.relevant(chunk.iter().map(String::as_str), &[]);
            let sizes = self.coord.check_outputs(&agent, chunk.to_vec(), entries).await?;
            out.extend(sizes);
        }
        Ok(out)
    }

    /// Builds the profile's programs that are not in the registry yet (all of them with
    /// `force`) on an agent, one build step each, and merges their entries. A build whose
    /// agent is lost is tried again on another one (waiting up to `agent_wait` for it), at
    /// most [`BUILD_TRIES`] times.
    pub async fn build_programs(
        &self,
        profile: &Profile,
        keys: &[String],
        force: bool,
        run: &str,
        rep: Option<&Reporter>,
        agent_wait: Duration,
    ) -> Result<usize> {
        let mut built = 0;
        for key in keys {
            let program = profile
                .program(key)
                .ok_or_else(|| anyhow!("profile {} has no program {key}", profile.name))?;
            let reg_key = protocol::registry::program_key(&profile.name, key);
            let reg = self.load_registry().await?;
            if !force && reg.get(&reg_key).is_some() {
                continue;
            }
            let mut tries = 0;
            let (agent, step_name, outcome, tail) = loop {
                tries += 1;
                self.wait_for_agents(1, agent_wait)
                    .await
                    .with_context(|| format!("waiting for an agent to build {reg_key} on"))?;
                let agent = self.first_agent("build programs on")?;
                let spec = StepSpec {
                    attempt_id: crate::hub::new_attempt_id(),
                    ..build_spec(profile, program, run)
                };
                let step_name = spec.step.clone();
                if let Some(r) = rep {
                    r.emit("program build", Some(&step_name), Some(spec.attempt_id), Some(&agent), &reg_key);
                }
                let attempt_id = spec.attempt_id;
                let (_, events) = self.coord.run_step(&agent, spec).await?;
                match self.await_build(&agent, attempt_id, events).await {
                    Ok((outcome, tail)) => break (agent, step_name, outcome, tail),
                    Err(lost) => {
                        self.coord.forget_attempt(attempt_id);
                        let why = format!("agent {agent} lost while building {reg_key}: {lost}");
                        if let Some(r) = rep {
                            r.emit(
                                "program build lost",
                                Some(&step_name),
                                Some(attempt_id),
                                Some(&agent),
                                &why,
                            );
                        } else {
                            tracing::warn!("{why}");
                        }
                        if tries >= BUILD_TRIES {
                            bail!("{why} ({tries} tries)");
                        }
                    }
                }
            };
            if !outcome.succeeded() {
                bail!(
                    "building program {reg_key} failed ({}): {}\n{}",
                    exit_text(&outcome),
                    outcome.error.unwrap_or_default(),
                    tail.join("\n")
                );
            }
            // A build's result is judged like a harvest: only its own key, links inside it.
            let (store, outputs, entries, name) = (
                self.coord.store().clone(),
                vec![reg_key.clone()],
                outcome.new_entries.clone(),
                step_name.clone(),
            );
            tokio::task::spawn_blocking(move || {
                check_harvest(store.as_ref(), &name, &outputs, &[], &entries)
            })
            .await?
            .map_err(|why| anyhow!("building program {reg_key}: the result was refused: {why}"))?;
            self.merge_registry(outcome.new_entries).await?;
            if let Some(r) = rep {
                r.emit("program built", Some(&step_name), Some(outcome.attempt_id), Some(&agent), &reg_key);
            }
            built += 1;
        }
        Ok(built)
    }

    /// Follows a build attempt to its result and the last lines of its output; `Err` when the
    /// agent is gone for longer than the heartbeat window (a reconnect within it keeps the
    /// attempt, as for any step).
    async fn await_build(
        &self,
        agent: &str,
        attempt_id: u64,
        mut events: mpsc::UnboundedReceiver<(u64, StepEvent)>,
    ) -> std::result::Result<(StepOutcome, Vec<String>), String> {
        let mut away = Away::new(self.coord.heartbeat_window());
        let mut tail = VecDeque::new();
        loop {
            match self.coord.next_attempt_event(agent, &mut away, &mut events).await {
                Err(reason) => {
                    tracing::debug!(attempt = attempt_id, "build attempt given up");
                    return Err(reason);
                }
                Ok(None) => return Err("its events ended".into()),
                Ok(Some(StepEvent::Finished(o))) => return Ok((o, tail.into_iter().collect())),
                Ok(Some(StepEvent::Output(lines))) => {
                    for l in lines {
                        if tail.len() == TAIL_LINES {
                            tail.pop_front();
                        }
                        tail.push_back(l.line);
                    }
                }
                Ok(Some(_)) => {}
            }
        }
    }

    /// What a run would do with each step: the plan `run` and `plan` both print, from the
    /// outputs the first connected agent's backend finds.
    pub async fn decide(
        &self,
        p: &Pipeline,
        opts: &RunOptions,
        done: HashSet<usize>,
        in_flight: &[AttemptRecord],
        reg: &Registry,
    ) -> Result<Vec<plan::Decision>> {
        let mut force = Vec::new();
        for name in &opts.force {
            force.push(
                p.index_of(name).ok_or_else(|| anyhow!("--force {name}: the pipeline has no such step"))?,
            );
        }
        let outputs: Vec<String> = p.steps.iter().flat_map(|s| s.outputs.iter().cloned()).collect();
        let sizes = self.check_outputs(&outputs, reg).await.context("checking which outputs exist")?;
        let mut decisions = plan::plan(p, &sizes, &PlanOptions { force, empty_ok: opts.empty_ok, done });
        // A step with an attempt in flight (a resumed run) waits for that attempt, even when its
        // outputs are there already: they may be the attempt's own, its result still to come.
        for a in in_flight {
            if let Some(i) = p.index_of(&a.step)
                && decisions[i].action == Planned::Skip
            {
                decisions[i].action = Planned::Run;
                decisions[i].why = format!("attempt {} was in flight on {}", a.number, a.agent);
            }
        }
        Ok(decisions)
    }

    /// Everything before the first step is dispatched: agents, the plan, the inputs, the
    /// programs. An error here means the run could not start. `None`: interrupted first.
    #[allow(clippy::too_many_arguments)]
    async fn prepare(
        &self,
        p: &Pipeline,
        opts: &RunOptions,
        run_id: &str,
        done: HashSet<usize>,
        in_flight: &[AttemptRecord],
        rep: &mut Reporter,
        shutdown: &CancellationToken,
    ) -> Result<Option<(Vec<plan::Decision>, Registry)>> {
        let wait = Duration::from_secs(opts.agent_wait_secs.max(1));
        tokio::select! {
            r = self.wait_for_agents(1, wait) => r?,
            _ = shutdown.cancelled() => return Ok(None),
        }
        let mut reg = self.load_registry().await?;
        let decisions = self.decide(p, opts, done, in_flight, &reg).await?;
        let rows: Vec<(usize, String, &str, String)> = decisions
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let state = match d.action {
                    Planned::Run => "pending",
                    Planned::Skip => "skipped",
                    Planned::Prune => "pruned",
                    Planned::Done => "succeeded",
                };
                (i, p.steps[i].name.clone(), state, d.why.clone())
            })
            .collect();
        // A row per step in one transaction: on the blocking pool for a pipeline of thousands.
        let (state, run) = (self.state.clone(), run_id.to_string());
        tokio::task::spawn_blocking(move || {
            let rows: Vec<(usize, &str, &str, &str)> =
                rows.iter().map(|(i, name, st, why)| (*i, name.as_str(), *st, why.as_str())).collect();
            state.plan_steps(&run, &rows)
        })
        .await??;
        for (i, d) in decisions.iter().enumerate() {
            match d.action {
                Planned::Skip => {
                    rep.progress.done += 1;
                    rep.step_state(i, "skipped", true);
                    rep.emit("step skipped", Some(&p.steps[i].name), None, None, &d.why);
                }
                Planned::Prune => {
                    rep.progress.done += 1;
                    rep.step_state(i, "pruned", true);
                    rep.emit("step pruned", Some(&p.steps[i].name), None, None, &d.why);
                }
                Planned::Done => {
                    rep.progress.done += 1;
                    rep.step_state(i, "succeeded", false);
                }
                Planned::Run => rep.step_state(i, "pending", false),
            }
        }
        let running_steps: Vec<usize> =
            (0..p.steps.len()).filter(|&i| decisions[i].action == Planned::Run).collect();
        // External inputs not in the registry: import them from this host.
        let needed: HashSet<&String> = running_steps.iter().flat_map(|&i| p.steps[i].inputs.iter()).collect();
        reg = self.load_registry().await?;
        let mut missing: Vec<String> =
            p.external_inputs().into_iter().filter(|x| needed.contains(x) && reg.get(x).is_none()).collect();
        for x in &p.imports {
            // Not when the registry knows it (its entry, or a harvested directory above it).
            if reg.locate(x).is_empty() && !missing.contains(x) {
                missing.push(x.clone());
            }
        }
        if opts.import_inputs && !missing.is_empty() {
            let absent: Vec<&String> =
                missing.iter().filter(|m| std::fs::symlink_metadata(m).is_err()).collect();
            if let Some(first) = absent.first() {
                bail!(
                    "{}: input {first} is neither in the registry nor on this host{}",
                    p.input_at(first),
                    if absent.len() > 1 {
                        format!(" (and {} more)", absent.len() - 1)
                    } else {
                        String::new()
                    }
                );
            }
            let store = self.coord.store().clone();
            let paths: Vec<PathBuf> = missing.iter().map(PathBuf::from).collect();
            let meta = tokio::task::spawn_blocking(move || store.import(&paths)).await??;
            let entries = missing.iter().map(|m| {
                (
                    m.clone(),
                    protocol::RegistryEntry {
                        snapshot_id: meta.snapshot_id.clone(),
                        in_snapshot_path: m.trim_start_matches('/').to_string(),
                        bind_path: None,
                        produced_by: None,
                    },
                )
            });
            self.merge_registry(entries.collect()).await?;
            rep.emit(
                "inputs imported",
                None,
                None,
                None,
                &format!("{} paths, {} bytes as {}", missing.len(), meta.content_bytes, meta.snapshot_id),
            );
        }
        // Programs the running steps need.
        if let Some(profile) = &p.profile {
            let mut keys: Vec<String> =
                running_steps.iter().filter_map(|&i| p.steps[i].program.clone()).collect();
            keys.sort();
            keys.dedup();
            let wait = Duration::from_secs(opts.agent_wait_secs.max(1));
            self.build_programs(profile, &keys, false, run_id, Some(rep), wait).await?;
        }
        let reg = self.load_registry().await?;
        Ok(Some((decisions, reg)))
    }

    #[allow(clippy::too_many_arguments)]
    async fn schedule(
        &self,
        p: &Pipeline,
        opts: &RunOptions,
        run_id: &str,
        decisions: &[plan::Decision],
        attempts_before: &[u32],
        in_flight: Vec<AttemptRecord>,
        mut reg: Registry,
        rep: &mut Reporter,
        shutdown: &CancellationToken,
    ) -> Result<(bool, String)> {
        let mut sched = Scheduler::new(
            p,
            decisions,
            attempts_before,
            opts.infra_retries,
            Box::new(crate::hub::new_attempt_id),
        );
        let (tx, mut rx) = mpsc::unbounded_channel::<(u64, StepEvent)>();
        let mut cancels = self.cancels.subscribe();
        let mut running: HashMap<u64, Running> = HashMap::new();
        let mut members = self.coord.membership();
        let mut membership = Membership::new(self.coord.heartbeat_window());
        let mut failures: Vec<String> = Vec::new();
        let runs = runs_dir(&self.state_dir).join(run_id);
        let mut interrupted = false;
        let profile_name = p.profile.as_ref().map(|pr| pr.name.clone());
        let adopted = self.adopt(p, decisions, in_flight, &runs, &tx, &mut sched, &mut running, rep);
        // An adopted attempt's agent not back yet gets time to reconnect (its backoff) before
        // it counts as lost and the attempt is retried.
        self.sync_agents(&self.coord.agent_views(), &mut sched, &mut membership, rep);
        let mut last_sync = Instant::now();
        let mut last_demand: Option<Instant> = None;
        let mut sync_due: Option<Instant> = None;
        for agent in adopted.values() {
            membership.handle(
                Instant::now(),
                membership::Event::Expect { agent: agent.clone(), extra: ADOPT_RECONNECT_GRACE },
            );
        }
        let mut journal = Journal::default();
        loop {
            // Carry out everything the scheduler wants now: its writes in one transaction,
            // then the attempts it dispatched (which may make it want more).
            loop {
                while let Some(action) = sched.poll_action() {
                    self.carry_out(
                        action,
                        p,
                        run_id,
                        &runs,
                        &reg,
                        &profile_name,
                        &mut sched,
                        &mut running,
                        &mut failures,
                        rep,
                        opts,
                        &mut journal,
                    )
                    .await;
                }
                let nothing =
                    journal.writes.is_empty() && journal.acks.is_empty() && journal.sends.is_empty();
                if nothing || journal.can_wait(Instant::now()) {
                    break;
                }
                let results = !journal.acks.is_empty();
                let committed = self.commit(&mut journal);
                // Results are recorded before they are acknowledged, and a run that cannot
                // record them stops (an unacknowledged result comes again, to a run that would
                // see it as new).
                if results && let Err(e) = &committed {
                    return Err(anyhow!("recording step results: {e:#}"));
                }
                if journal.sends.is_empty() {
                    if let Err(e) = committed {
                        warn!(run = %run_id, "state database: {e:#}");
                    }
                    break;
                }
                self.send_attempts(
                    &committed,
                    &mut journal,
                    p,
                    run_id,
                    &runs,
                    &tx,
                    &mut sched,
                    &mut running,
                    &mut membership,
                    rep,
                )
                .await;
            }
            let counts = sched.counts();
            // Every step not yet ended may want an agent: instances boot while upstream steps
            // run (a VM takes a minute), and an instance stays while work remains for it.
            let n = |k: &str| counts.get(k).copied().unwrap_or(0);
            let active = n("ready") + n("running");
            // The demand costs time linear in the run's steps and agents: it is worked out
            // only for a provisioner, and at most every DEMAND_EVERY (a VM takes a minute).
            if self.demand.receiver_count() > 0 && last_demand.is_none_or(|t| t.elapsed() >= DEMAND_EVERY) {
                last_demand = Some(Instant::now());
                let busy = sched.agent_load().into_iter().filter(|(_, n)| *n > 0).map(|(a, _)| a).collect();
                let unplaced = sched
                    .unplaced()
                    .into_iter()
                    .map(|i| {
                        let s = &p.steps[i];
                        crate::provision::Need {
                            step: s.name.clone(),
                            cpus: s.resources.cpus.ceil().max(1.0) as u32,
                            memory_bytes: s.resources.memory_bytes,
                        }
                    })
                    .collect();
                self.want_agents(run_id, n("waiting") + active, active, busy, unplaced);
            }
            // No agent left, none coming: what remains cannot run.
            if !interrupted
                && running.is_empty()
                && self.coord.agent_views().is_empty()
                && let Some(refused) = self.coord.provisioning_refused()
            {
                interrupted = true;
                let reason = format!("no agent is connected and no instance can be created: {refused}");
                rep.emit("run stalled", None, None, None, &reason);
                failures.push(reason.clone());
                sched.handle(Event::Abort { reason });
                continue;
            }
            if let Some(ok) = sched.finished() {
                if !journal.writes.is_empty()
                    && let Err(e) = self.commit(&mut journal)
                {
                    warn!(run = %run_id, "state database: {e:#}");
                }
                let counts = sched.counts();
                let summary = counts.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ");
                let summary =
                    if failures.is_empty() { summary } else { format!("{summary}; {}", failures.join("; ")) };
                return Ok((ok && !interrupted, summary));
            }
            // Wake for the next membership deadline, and at least every second (adopted
            // attempts whose agent came back without them are found by looking).
            let wake = Instant::now() + Duration::from_secs(1);
            let wake = membership.next_timeout().map_or(wake, |t| t.min(wake));
            let wake = sync_due.map_or(wake, |t| t.min(wake));
            // Woken only to commit, the agents are not looked at (that costs time in their number).
            let look = wake;
            let wake = journal.commit_due().map_or(wake, |t| t.min(wake));
            let tick = tokio::time::sleep_until(wake.into());
            tokio::select! {
                _ = shutdown.cancelled(), if !interrupted => {
                    interrupted = true;
                    sched.handle(Event::Abort { reason: "the coordinator is shutting down".into() });
                }
                got = cancels.recv() => {
                    let (run, step) = match got {
                        Ok(c) => c,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            warn!(run = %run_id, missed = n, "cancel requests came faster than the run took them; some were lost");
                            continue;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => continue,
                    };
                    if run == run_id {
                        match p.index_of(&step) {
                            Some(i) => {
                                info!(run = %run_id, step = %step, "step cancelled by a client");
                                sched.handle(Event::Cancel { step: i, reason: "cancelled by a client".into() });
                            }
                            None => warn!(run = %run_id, step = %step, "a client cancelled a step the run does not have"),
                        }
                    }
                }
                Some((attempt_id, event)) = rx.recv() => {
                    let j = &mut journal;
                    self.on_step_event(attempt_id, event, p, run_id, &mut reg, &mut sched, &mut running, rep, j).await?;
                    // Take whatever else is queued before planning again.
                    while let Ok((attempt_id, event)) = rx.try_recv() {
                        self.on_step_event(attempt_id, event, p, run_id, &mut reg, &mut sched, &mut running, rep, j).await?;
                    }
                    // The results' ends are committed with the attempts they let the scheduler
                    // dispatch, in one transaction, at the top of the loop, before the results
                    // are acknowledged and the attempts sent.
                }
                // Looking at the agents costs time linear in their number: while they keep
                // changing, looks are spaced by MEMBERSHIP_COALESCE_PER_AGENT per agent.
                _ = members.changed(), if sync_due.is_none() => {
                    let agents = u32::try_from(self.coord.agent_count()).unwrap_or(u32::MAX);
                    let at = last_sync + (MEMBERSHIP_COALESCE_PER_AGENT * agents).min(MEMBERSHIP_COALESCE);
                    if at <= Instant::now() {
                        self.look_at_agents(p, &mut sched, &mut membership, &mut running, rep, &mut journal);
                        last_sync = Instant::now();
                    } else {
                        sync_due = Some(at);
                    }
                }
                _ = tick => {
                    if Instant::now() >= look {
                        rep.say_members_left_out(Instant::now(), false);
                        self.look_at_agents(p, &mut sched, &mut membership, &mut running, rep, &mut journal);
                        last_sync = Instant::now();
                        sync_due = None;
                    }
                }
            }
        }
    }

    /// Takes over the attempts a previous coordinator had in flight (a resumed run) whose
    /// steps still need to run: they stay running and their results are awaited, since a
    /// persistent agent keeps running a step while its coordinator is away and reports the
    /// result when it reconnects. The others are recorded as lost. Returns attempt → agent.
    #[allow(clippy::too_many_arguments)]
    fn adopt(
        &self,
        p: &Pipeline,
        decisions: &[plan::Decision],
        in_flight: Vec<AttemptRecord>,
        runs: &Path,
        tx: &mpsc::UnboundedSender<(u64, StepEvent)>,
        sched: &mut Scheduler,
        running: &mut HashMap<u64, Running>,
        rep: &mut Reporter,
    ) -> HashMap<u64, String> {
        let mut adopted = HashMap::new();
        for a in in_flight {
            let step = p.index_of(&a.step).filter(|&i| decisions[i].action == Planned::Run);
            match step {
                Some(i) if sched.adopt(i, a.attempt_id, &a.agent) => {
                    let log = AttemptLog::new(runs.join(&a.step).join(format!("attempt-{}.log", a.number)));
                    running.insert(
                        a.attempt_id,
                        Running { step: i, agent: a.agent.clone(), log, usage: None, serial: 0 },
                    );
                    self.coord.adopt(a.attempt_id, &a.agent, tx.clone());
                    rep.progress.running += 1;
                    rep.step_dispatched(i, a.attempt_id);
                    rep.emit(
                        "step adopted",
                        Some(&a.step),
                        Some(a.attempt_id),
                        Some(&a.agent),
                        &format!("attempt {} of the previous coordinator; awaiting its result", a.number),
                    );
                    adopted.insert(a.attempt_id, a.agent);
                }
                _ => {
                    if let Err(e) = self.state.attempt_ended(
                        a.attempt_id,
                        "lost",
                        None,
                        Some("coordinator restarted"),
                        None,
                    ) {
                        warn!("state database: {e:#}");
                    }
                }
            }
        }
        adopted
    }

    /// What the hub shows of the agents, to the membership and to the check of what they hold.
    fn look_at_agents(
        &self,
        p: &Pipeline,
        sched: &mut Scheduler,
        membership: &mut Membership,
        running: &mut HashMap<u64, Running>,
        rep: &mut Reporter,
        journal: &mut Journal,
    ) {
        let views = self.coord.agent_views();
        self.sync_agents(&views, sched, membership, rep);
        self.check_in_hand(&views, p, sched, running, rep, journal);
    }

    /// An attempt whose agent reconnected and said it does not hold it is retried now rather
    /// than awaited forever: the agent restarted and lost it, or the connection broke before
    /// the agent read it (an adopted attempt's agent, or a `RunStep` lost with a connection).
    #[allow(clippy::too_many_arguments)]
    fn check_in_hand(
        &self,
        views: &[crate::hub::AgentView],
        p: &Pipeline,
        sched: &mut Scheduler,
        running: &mut HashMap<u64, Running>,
        rep: &mut Reporter,
        journal: &mut Journal,
    ) {
        if running.is_empty() {
            return;
        }
        let lost = lost_on_reconnect(running.iter().map(|(id, r)| (*id, r.agent.as_str(), r.serial)), views);
        for (attempt_id, agent) in lost {
            // A result delivered meanwhile is in the run's channel: it counts, not a retry.
            if !self.coord.awaiting(attempt_id) {
                continue;
            }
            let reason = format!("agent {agent} came back without attempt {attempt_id}");
            if let Some(r) = running.remove(&attempt_id) {
                rep.progress.running = rep.progress.running.saturating_sub(1);
                rep.attempt_ended(attempt_id, "lost");
                rep.emit(
                    "attempt lost",
                    Some(&p.steps[r.step].name),
                    Some(attempt_id),
                    Some(&agent),
                    &reason,
                );
            }
            self.coord.forget_attempt(attempt_id);
            journal.writes.push(state::Write::attempt_ended(attempt_id, "lost", None, Some(&reason), None));
            sched.handle(Event::Finished { attempt_id, end: AttemptEnd::InfraFailed(reason) });
        }
    }

    /// Feeds what the hub shows to the run's [`Membership`] and carries out what it decides:
    /// agents that joined, drain, left or are lost (a reconnect within the heartbeat window
    /// keeps an agent's running steps).
    fn sync_agents(
        &self,
        views: &[crate::hub::AgentView],
        sched: &mut Scheduler,
        membership: &mut Membership,
        rep: &mut Reporter,
    ) {
        let seen = views.iter().map(|v| membership::Seen {
            capacity: AgentCapacity {
                cpus: f64::from(v.host.cpus.max(1)),
                memory_bytes: v.host.memory_total_bytes,
                slots: v.slots,
                labels: v.labels.iter().cloned().collect(),
            },
            agent_id: v.agent_id.clone(),
            draining: v.draining,
            settled: v.in_hand.is_some(),
        });
        membership.handle(Instant::now(), membership::Event::Agents(seen.collect()));
        while let Some(action) = membership.poll_action() {
            match action {
                membership::Action::Joined { agent, capacity } => {
                    let detail = format!("{} cpus, {} MiB", capacity.cpus, capacity.memory_bytes >> 20);
                    rep.emit_member("agent joined", &agent, &detail);
                    sched.handle(Event::AgentUp { agent, capacity });
                }
                membership::Action::Draining { agent } => {
                    rep.emit_member("agent draining", &agent, "running steps finish, no new ones");
                    sched.handle(Event::AgentDraining { agent });
                }
                membership::Action::Away { agent } => {
                    rep.emit_member("agent away", &agent, "disconnected; its steps wait for it, no new ones");
                    sched.handle(Event::AgentAway { agent });
                }
                membership::Action::Back { agent } => {
                    rep.emit_member("agent back", &agent, "reconnected inside its window");
                    sched.handle(Event::AgentBack { agent });
                }
                membership::Action::Left { agent } => {
                    rep.emit_member("agent left", &agent, "drained");
                    let reason = "drained and disconnected".to_string();
                    sched.handle(Event::AgentDown { agent, reason });
                }
                membership::Action::Lost { agent, reason } => {
                    rep.emit_member("agent lost", &agent, &reason);
                    sched.handle(Event::AgentDown { agent, reason });
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn carry_out(
        &self,
        action: Action,
        p: &Pipeline,
        run_id: &str,
        runs: &Path,
        reg: &Registry,
        profile: &Option<String>,
        sched: &mut Scheduler,
        running: &mut HashMap<u64, Running>,
        failures: &mut Vec<String>,
        rep: &mut Reporter,
        opts: &RunOptions,
        journal: &mut Journal,
    ) {
        match action {
            Action::Ready { step } => {
                journal.writes.push(state::Write::step_state(run_id, &p.steps[step].name, "ready", ""));
                rep.step_state(step, "ready", false);
                rep.emit("step ready", Some(&p.steps[step].name), None, None, "");
            }
            Action::Dispatch { step, agent, attempt_id, attempt } => {
                let s = &p.steps[step];
                let program = s
                    .program
                    .as_ref()
                    .zip(profile.as_ref())
                    .map(|(key, prof)| ProgramRef { profile: prof.clone(), key: key.clone() });
                let profiles: Vec<&str> = profile.iter().map(String::as_str).collect();
                let paths = s.inputs.iter().chain(&s.outputs).map(String::as_str);
                let spec = StepSpec {
                    attempt_id,
                    run: run_id.to_string(),
                    step: s.name.clone(),
                    kind: StepKind::Run,
                    command: s.command.clone(),
                    inputs: s.inputs.clone(),
                    outputs: s.outputs.clone(),
                    no_harvest: s.no_harvest.clone(),
                    program,
                    env: served_env(p, s),
                    timeout_secs: s.timeout_secs,
                    registry: reg.relevant(paths, &profiles),
                };
                // Sent by `send_attempts` once this row is committed.
                journal
                    .writes
                    .push(state::Write::attempt_dispatched(run_id, &s.name, attempt_id, attempt, &agent));
                journal.sends.push(Outgoing { step, agent, attempt_id, number: attempt, spec });
            }
            Action::Supersede { step: _, attempt_id, agent } => {
                // Decided in this burst and not sent yet: it is never sent.
                journal.sends.retain(|o| o.attempt_id != attempt_id);
                // Cancel first: the coordinator finds the attempt's agent by the attempt.
                let _ = self.coord.cancel_step(attempt_id, "superseded").await;
                self.coord.forget_attempt(attempt_id);
                if running.remove(&attempt_id).is_some() {
                    rep.progress.running = rep.progress.running.saturating_sub(1);
                    rep.attempt_ended(attempt_id, "superseded");
                }
                journal.writes.push(state::Write::attempt_ended(
                    attempt_id,
                    "superseded",
                    None,
                    Some(&format!("agent {agent} lost")),
                    None,
                ));
            }
            Action::Retry { step, reason, infra } => {
                let kind = if infra { "infrastructure" } else { "command" };
                metrics::get().retries.get_or_create(&metrics::l1("kind", kind)).inc();
                rep.step_state(step, "ready", false);
                journal.writes.push(state::Write::step_state(run_id, &p.steps[step].name, "ready", &reason));
                rep.emit(
                    "step retried",
                    Some(&p.steps[step].name),
                    None,
                    None,
                    &format!("{kind} failure: {reason}"),
                );
            }
            Action::Succeeded { step } => {
                rep.progress.done += 1;
                rep.step_state(step, "succeeded", true);
                journal.writes.push(state::Write::step_state(run_id, &p.steps[step].name, "succeeded", ""));
            }
            Action::Failed { step, reason } => {
                rep.progress.failed += 1;
                rep.step_state(step, "failed", true);
                let name = &p.steps[step].name;
                journal.writes.push(state::Write::step_state(run_id, name, "failed", &reason));
                rep.emit("step failed", Some(name), None, None, &reason);
                let tail = last_log_lines(runs, name, sched.attempts(step));
                if !tail.is_empty() {
                    rep.emit("log tail", Some(name), None, None, &tail.join("\n"));
                }
                failures.push(format!("step {name} failed: {reason}"));
            }
            Action::Cancelled { step, reason } => {
                rep.progress.failed += 1;
                rep.step_state(step, "cancelled", true);
                journal.writes.push(state::Write::step_state(
                    run_id,
                    &p.steps[step].name,
                    "cancelled",
                    &reason,
                ));
                rep.emit("step cancelled", Some(&p.steps[step].name), None, None, &reason);
            }
            Action::Unschedulable { step, reason } => {
                rep.emit("step unschedulable", Some(&p.steps[step].name), None, None, &reason);
                if opts.fail_unschedulable {
                    sched.handle(Event::Abort {
                        reason: format!("step {} cannot be scheduled: {reason}", p.steps[step].name),
                    });
                    failures.push(format!("step {} cannot be scheduled: {reason}", p.steps[step].name));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn on_step_event(
        &self,
        attempt_id: u64,
        event: StepEvent,
        p: &Pipeline,
        run_id: &str,
        reg: &mut Registry,
        sched: &mut Scheduler,
        running: &mut HashMap<u64, Running>,
        rep: &mut Reporter,
        journal: &mut Journal,
    ) -> Result<()> {
        let Some(r) = running.get_mut(&attempt_id) else {
            warn!(run = %run_id, attempt = attempt_id, "discarding an event of a superseded attempt");
            return Ok(());
        };
        let name = p.steps[r.step].name.clone();
        match event {
            StepEvent::Started { backend, view } => {
                journal.writes.push(state::Write::attempt_started(attempt_id));
                rep.emit(
                    "step started",
                    Some(&name),
                    Some(attempt_id),
                    Some(&r.agent),
                    &format!("backend {backend}, view {view}"),
                );
            }
            StepEvent::Output(lines) => {
                for l in lines {
                    r.log.push(&l.line);
                }
            }
            StepEvent::Usage(u) => r.usage = Some(u),
            StepEvent::Finished(mut outcome) => {
                // The agent's own figure (a false one only changes whether it is sent a step to
                // queue); an attempt that did not succeed ends its run of quick ones.
                let ok = matches!(outcome.exit, protocol::StepExit::Exited(0));
                sched.handle(Event::Took {
                    attempt_id,
                    elapsed_ms: if ok { outcome.elapsed_ms } else { u64::MAX },
                });
                let r = running.remove(&attempt_id).expect("looked up above");
                rep.progress.running = rep.progress.running.saturating_sub(1);
                let step = &p.steps[r.step];
                let mut end = judge(step, &outcome);
                if let (Some(u), AttemptEnd::CommandFailed(_)) = (&r.usage, &end)
                    && u.oom_killed
                {
                    end = AttemptEnd::CommandFailed(outcome::oom_reason(u));
                }
                // Each entry's snapshot index is read and its links followed (an index lists
                // every file): on the blocking pool, so the agents' heartbeats go on meanwhile.
                if matches!(end, AttemptEnd::Succeeded) && !outcome.new_entries.is_empty() {
                    let store = self.coord.store().clone();
                    let (step_name, outputs) = (step.name.clone(), step.outputs.clone());
                    let roots = if step.serve_backend { p.harvest_roots().to_vec() } else { Vec::new() };
                    let entries = std::mem::take(&mut outcome.new_entries);
                    let (checked, entries) = tokio::task::spawn_blocking(move || {
                        (check_harvest(store.as_ref(), &step_name, &outputs, &roots, &entries), entries)
                    })
                    .await
                    .unwrap_or_else(|e| (Err(format!("the harvest check stopped: {e}")), Vec::new()));
                    outcome.new_entries = entries;
                    if let Err(why) = checked {
                        warn!(run = %run_id, step = %name, attempt = attempt_id, agent = %r.agent, "harvest refused: {why}");
                        end = AttemptEnd::InfraFailed(format!("harvest refused: {why}"));
                    }
                }
                let exit = exit_text(&outcome);
                rep.attempt_ended(
                    attempt_id,
                    match &end {
                        AttemptEnd::Succeeded => "succeeded",
                        AttemptEnd::CommandFailed(_) => "command_failed",
                        AttemptEnd::InfraFailed(_) => "infra_failed",
                        AttemptEnd::NotSent(_) => "not_sent",
                    },
                );
                if let Some(u) = &r.usage {
                    self.report_usage(run_id, step, attempt_id, &r.agent, u, rep, journal);
                }
                self.look_at_bytes(rep, false);
                rep.emit(
                    "step exited",
                    Some(&name),
                    Some(attempt_id),
                    Some(&r.agent),
                    &format!("{exit} after {} ms", outcome.elapsed_ms),
                );
                match &end {
                    AttemptEnd::Succeeded => {
                        let provenance =
                            Provenance { run: run_id.to_string(), step: name.clone(), attempt: attempt_id };
                        let entries: Vec<_> = outcome
                            .new_entries
                            .into_iter()
                            .map(|(k, mut e)| {
                                e.produced_by.get_or_insert_with(|| provenance.clone());
                                (k, e)
                            })
                            .collect();
                        let n = entries.len();
                        // Written back before merged: a client that sees `step harvested`
                        // finds the files, and a write-back that fails fails the attempt.
                        // The copy and the registry's rewrite run on the blocking pool: the run
                        // waits for them, the agents' connections and heartbeats do not.
                        let merged = if entries.is_empty() {
                            Ok(None)
                        } else {
                            let store = self.coord.store().clone();
                            let registry = self.registry.clone();
                            let roots = p.write_back.then(|| p.harvest_roots().to_vec());
                            let (run, step) = (run_id.to_string(), name.clone());
                            tokio::task::spawn_blocking(move || -> Result<Option<Registry>> {
                                if let Some(roots) = roots {
                                    let w = write_back(store.as_ref(), &roots, &entries)
                                        .map_err(|e| anyhow!("writing the harvest back failed: {e:#}"))?;
                                    debug!(run = %run, step = %step, files = w, "harvest written back");
                                }
                                registry
                                    .update(|g| {
                                        g.merge(entries);
                                        Some(g.clone())
                                    })
                                    .map_err(|e| anyhow!("merging the registry failed: {e:#}"))
                            })
                            .await
                            .unwrap_or_else(|e| Err(anyhow!("the write-back stopped: {e}")))
                        };
                        match merged {
                            Ok(Some(g)) => *reg = g,
                            Ok(None) => {}
                            Err(e) => {
                                // The outputs exist in the store but not in the registry (or
                                // not where the client looks): the attempt does not count.
                                let msg = format!("{e:#}");
                                warn!(run = %run_id, step = %name, attempt = attempt_id, "{msg}");
                                journal.writes.push(state::Write::attempt_ended(
                                    attempt_id,
                                    "failed",
                                    Some(&exit),
                                    Some(&msg),
                                    Some(outcome.elapsed_ms),
                                ));
                                journal.acks.push((r.agent.clone(), attempt_id));
                                sched.handle(Event::Finished {
                                    attempt_id,
                                    end: AttemptEnd::InfraFailed(msg),
                                });
                                return Ok(());
                            }
                        }
                        rep.emit(
                            "step harvested",
                            Some(&name),
                            Some(attempt_id),
                            Some(&r.agent),
                            &format!("{n} registry entries"),
                        );
                        journal.writes.push(state::Write::attempt_ended(
                            attempt_id,
                            "succeeded",
                            Some(&exit),
                            None,
                            Some(outcome.elapsed_ms),
                        ));
                    }
                    AttemptEnd::CommandFailed(e) | AttemptEnd::InfraFailed(e) | AttemptEnd::NotSent(e) => {
                        journal.writes.push(state::Write::attempt_ended(
                            attempt_id,
                            "failed",
                            Some(&exit),
                            Some(e),
                            Some(outcome.elapsed_ms),
                        ));
                    }
                }
                // Acknowledged once recorded (`Engine::commit`): the agent may forget the result
                // then (until then it would send it again to a restarted coordinator, whose
                // resumed run adopts the attempt).
                journal.acks.push((r.agent, attempt_id));
                sched.handle(Event::Finished { attempt_id, end });
            }
        }
        Ok(())
    }
}

/// The build step of one profile program: prepare_build, its build command, stage_program.
/// The attempt id is left 0 (the coordinator assigns one).
pub fn build_spec(profile: &Profile, program: &crate::pipeline::Program, run: &str) -> StepSpec {
    StepSpec {
        run: run.to_string(),
        step: format!("build-{}", program.key),
        kind: StepKind::Build {
            profile: profile.name.clone(),
            programs: vec![ProgramArtifact {
                key: program.key.clone(),
                artifact_path: program.artifact_path.clone(),
            }],
        },
        command: program.build.clone(),
        ..Default::default()
    }
}

/// A step's environment, with what the agent needs to serve it its backend.
fn served_env(p: &Pipeline, s: &crate::pipeline::Step) -> Vec<(String, String)> {
    // What the agent serves is the coordinator's to say, never the step's own env.
    let mut env: Vec<(String, String)> =
        s.env.iter().filter(|(k, _)| !k.starts_with("PYPE_RS_")).cloned().collect();
    if s.resources.memory_bytes > 0 {
        // The agent's cgroup for the attempt enforces it.
        env.push(("PYPE_RS_MEMORY_BYTES".into(), s.resources.memory_bytes.to_string()));
    }
    if s.serve_backend {
        env.push(("PYPE_RS_SERVE".into(), "1".into()));
        env.push(("PYPE_RS_ROOTS".into(), p.roots.join(":")));
        env.push(("PYPE_RS_WRITE_ROOTS".into(), p.harvest_roots().join(":")));
    }
    env
}

/// The last lines of a step attempt's log file.
pub fn last_log_lines(runs: &Path, step: &str, attempt: u32) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    // Only the log's end is read (a verbose step's log may be gigabytes), and bytes that are
    // not UTF-8 are shown replaced, not taken for an empty log.
    const TAIL_BYTES: u64 = 64 << 10;
    let path = runs.join(step).join(format!("attempt-{attempt}.log"));
    let Ok(mut f) = std::fs::File::open(path) else { return Vec::new() };
    let start = f.metadata().map_or(0, |m| m.len()).saturating_sub(TAIL_BYTES);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.take(TAIL_BYTES).read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && lines.len() > 1 {
        // Read from the middle of a line.
        lines.remove(0);
    }
    lines[lines.len().saturating_sub(TAIL_LINES)..].iter().map(|l| l.to_string()).collect()
}

#[async_trait::async_trait]
impl Runs for Engine {
    fn registry_json(&self) -> Result<String> {
        Ok(self.registry.load()?.to_json())
    }

    fn registry(&self) -> Result<Registry> {
        self.registry.load()
    }

    fn cancel_step(&self, run: &str, step: &str) -> Result<()> {
        Engine::cancel_step(self, run, step)
    }

    async fn submit(
        &self,
        pipeline_json: &str,
        options_json: &str,
        events: mpsc::UnboundedSender<RunEvent>,
        shutdown: CancellationToken,
    ) -> std::result::Result<(String, bool, String), String> {
        let pipeline: Pipeline =
            serde_json::from_str(pipeline_json).map_err(|e| format!("malformed pipeline: {e}"))?;
        pipeline.check_submitted().map_err(|e| format!("pipeline {}: {e}", pipeline.name))?;
        let opts: RunOptions =
            serde_json::from_str(options_json).map_err(|e| format!("malformed run options: {e}"))?;
        let r = self.run(pipeline, opts, None, Some(events), shutdown).await.map_err(|e| format!("{e:#}"))?;
        Ok((r.run_id, r.succeeded, r.summary))
    }
}

/// Attempts (id, agent) that their agent does not hold although it said what it holds on a
/// connection newer than the one each went out on. `running` is (attempt, agent, serial of
/// the connection it was sent on, 0 for one adopted from a previous coordinator). An attempt
/// sent on the agent's current connection is not judged: the agent may have said what it
/// holds before it read it.
pub(crate) fn lost_on_reconnect<'a>(
    running: impl Iterator<Item = (u64, &'a str, u64)>,
    views: &[crate::hub::AgentView],
) -> Vec<(u64, String)> {
    let by_id: HashMap<&str, &crate::hub::AgentView> =
        views.iter().map(|v| (v.agent_id.as_str(), v)).collect();
    let mut lost: Vec<(u64, String)> = running
        .filter(|(id, agent, serial)| {
            by_id.get(agent).is_some_and(|v| {
                *serial < v.serial && v.in_hand.as_ref().is_some_and(|held| !held.contains(id))
            })
        })
        .map(|(id, agent, _)| (id, agent.to_string()))
        .collect();
    lost.sort();
    lost
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::AgentView;

    #[test]
    fn a_start_waits_for_the_next_transaction_but_not_long() {
        let t0 = Instant::now();
        let mut j = Journal::default();
        j.writes.push(state::Write::attempt_started(7));
        assert!(j.can_wait(t0), "a start alone waits");
        assert_eq!(j.commit_due(), Some(t0 + COMMIT_WAIT));
        assert!(j.can_wait(t0 + COMMIT_WAIT / 2), "still within COMMIT_WAIT");
        assert!(!j.can_wait(t0 + COMMIT_WAIT), "waited long enough: committed");
        assert_eq!(j.commit_due(), None);
        // A result to acknowledge, an attempt to send, or a write something depends on:
        // committed now, the start with it.
        let mut j = Journal::default();
        j.writes.push(state::Write::attempt_started(7));
        assert!(j.can_wait(t0));
        j.writes.push(state::Write::attempt_ended(7, "succeeded", Some("exit 0"), None, Some(3)));
        j.acks.push(("a".into(), 7));
        assert!(!j.can_wait(t0 + Duration::from_millis(1)));
        assert_eq!(j.commit_due(), None);
        let mut j = Journal::default();
        j.writes.push(state::Write::attempt_started(7));
        j.writes.push(state::Write::step_state("r", "s", "cancelled", "by a client"));
        assert!(!j.can_wait(t0));
    }

    #[test]
    fn a_failed_steps_tail_is_its_last_lines_however_long_or_binary_its_log() {
        let runs = tempfile::tempdir().unwrap();
        let dir = runs.path().join("s");
        std::fs::create_dir_all(&dir).unwrap();
        // 4 MiB of lines, a byte that is not UTF-8 near the end.
        let mut log: Vec<u8> = (0..100_000).flat_map(|i| format!("line {i:040}\n").into_bytes()).collect();
        log.extend_from_slice(b"bad \xff byte\nlast\n");
        std::fs::write(dir.join("attempt-1.log"), &log).unwrap();
        let tail = last_log_lines(runs.path(), "s", 1);
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail[TAIL_LINES - 1], "last");
        assert_eq!(tail[TAIL_LINES - 2], "bad \u{fffd} byte");
        assert_eq!(tail[0], format!("line {:040}", 100_000 - TAIL_LINES + 2));
        // A short log whole; no log, no lines.
        std::fs::write(dir.join("attempt-2.log"), "one\ntwo\n").unwrap();
        assert_eq!(last_log_lines(runs.path(), "s", 2), ["one", "two"]);
        assert!(last_log_lines(runs.path(), "s", 3).is_empty());
    }

    fn view(id: &str, serial: u64, in_hand: Option<Vec<u64>>) -> AgentView {
        AgentView {
            agent_id: id.into(),
            host: Default::default(),
            slots: 1,
            labels: vec![],
            draining: false,
            in_hand,
            stats: Default::default(),
            serial,
        }
    }

    #[test]
    fn an_attempt_sent_on_an_older_connection_and_not_held_is_lost() {
        let views = [view("a", 5, Some(vec![11])), view("b", 3, None), view("c", 7, Some(vec![]))];
        let running = [
            (10, "a", 4), // sent before the reconnect, not held: lost
            (11, "a", 4), // held: the agent still runs it or resends its result
            (12, "a", 5), // sent on the current connection, maybe after the agent said
            (13, "b", 1), // b has not said what it holds yet
            (14, "c", 0), // adopted from a previous coordinator, not held: lost
            (15, "d", 1), // d is not connected: membership decides when it is lost
        ];
        let lost = lost_on_reconnect(running.iter().map(|&(id, a, s)| (id, a, s)), &views);
        assert_eq!(lost, vec![(10, "a".to_string()), (14, "c".to_string())]);
    }

    #[test]
    fn nothing_is_lost_while_every_agent_holds_its_attempts() {
        let views = [view("a", 9, Some(vec![1, 2])), view("b", 2, Some(vec![3]))];
        let running = [(1, "a", 1), (2, "a", 8), (3, "b", 0)];
        assert!(lost_on_reconnect(running.iter().map(|&(id, a, s)| (id, a, s)), &views).is_empty());
    }
}
