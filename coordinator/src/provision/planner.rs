//! The provisioning decisions, with no IO and no clock of its own: how many instances to
//! want for the run's demand, when the next create may be tried after failures (backoff),
//! when repeated refusals mean no instance is coming, which instance joined, which failed
//! to boot in time, which lost its agent, which is idle long enough to go, and when the
//! reconciler sweeps. In the style of `run::sched`: [`Planner::handle`] and
//! [`Planner::handle_timeout`] take `now`, [`Planner::poll_action`] says what to do,
//! [`Planner::next_timeout`] when to call again. The driver ([`super::Provisioner`]) calls
//! the provider and the state database and feeds the results back.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::provider::ErrorKind;
use super::{Demand, Need};

/// Refused creates in a row after which the run is told no instance is coming (a few, as a
/// just-made instance profile or subnet can take seconds to be seen).
pub const REFUSALS_TO_GIVE_UP: u32 = 3;

/// Longest wait between failed creates.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Settings {
    pub min_instances: usize,
    pub max_instances: usize,
    /// An instance whose agent has not connected this long after the create is terminated.
    pub boot_timeout: Duration,
    /// A joined instance without a step this long is terminated when beyond the demand
    /// (0: at once, and instances still booting may go too).
    pub idle_timeout: Duration,
    /// An instance whose agent has been away this long is terminated (the run has declared
    /// the agent lost by then).
    pub heartbeat_window: Duration,
    pub sweep_interval: Duration,
    /// The provider's instances take long to start: provide for every step not yet ended,
    /// not only the ready and running ones.
    pub prestarts: bool,
}

/// A connected agent, as the hub shows it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub agent_id: String,
    pub draining: bool,
    pub slots: u32,
}

#[derive(Debug, Clone)]
pub enum Event {
    Demand(Demand),
    /// Every agent connected now.
    Agents(Vec<Seen>),
    /// The create asked for by [`Action::Create`] succeeded.
    Created {
        id: String,
        provider_id: String,
    },
    /// It failed, for this reason.
    CreateFailed {
        id: String,
        kind: ErrorKind,
        message: String,
    },
    /// The provider says the instance stopped before its agent connected.
    Stopped {
        id: String,
    },
    /// The run ended: every instance goes.
    Shutdown,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create instance `id` (record the intent first), sized for `need`.
    Create { id: String, need: Option<Need>, run: Option<String> },
    /// Its agent connected, `boot` after the create was asked for.
    Joined { id: String, boot: Duration },
    /// Terminate it. `failed_to_join`: it never joined (show its console).
    Terminate { id: String, provider_id: Option<String>, reason: String, failed_to_join: bool },
    /// The last create failed (`None`: it succeeded), for whoever is told no agent came.
    CreateError(Option<String>),
    /// No capacity for an instance now: the step stays queued and creates resume later.
    NoCapacity { message: String, retry_in: Duration },
    /// The provider refused creates again and again: no instance is coming (`None`: it
    /// created one after all).
    Refused(Option<String>),
    /// A create failed for another reason; tried again in `retry_in`.
    Failed { message: String, retry_in: Duration },
    /// Time to terminate tagged instances nothing accounts for.
    Sweep,
}

#[derive(Debug)]
struct Mine {
    for_step: Option<String>,
    provider_id: Option<String>,
    requested: Instant,
    joined: Option<Instant>,
    gone_since: Option<Instant>,
    idle_since: Option<Instant>,
}

pub struct Planner {
    settings: Settings,
    demand: Demand,
    agents: Vec<Seen>,
    mine: BTreeMap<String, Mine>,
    /// The create in flight (one at a time).
    creating: Option<String>,
    /// No create before this (backoff after failures).
    pace_after: Instant,
    failures: u32,
    /// Consecutive refused creates.
    refusals: u32,
    next_sweep: Instant,
    /// The latest `now` seen.
    now: Instant,
    new_id: Box<dyn FnMut() -> String + Send>,
    actions: VecDeque<Action>,
}

impl Planner {
    pub fn new(settings: Settings, now: Instant, new_id: Box<dyn FnMut() -> String + Send>) -> Self {
        let next_sweep = now + settings.sweep_interval;
        Self {
            settings,
            demand: Demand::default(),
            agents: Vec::new(),
            mine: BTreeMap::new(),
            creating: None,
            pace_after: now,
            failures: 0,
            refusals: 0,
            next_sweep,
            now,
            new_id,
            actions: VecDeque::new(),
        }
    }

    pub fn handle(&mut self, now: Instant, event: Event) {
        match event {
            Event::Demand(d) => self.demand = d,
            Event::Agents(seen) => self.agents = seen,
            Event::Created { id, provider_id } => {
                if self.creating.as_deref() == Some(id.as_str()) {
                    self.creating = None;
                }
                if let Some(m) = self.mine.get_mut(&id) {
                    m.provider_id = Some(provider_id);
                }
                self.failures = 0;
                self.actions.push_back(Action::CreateError(None));
                if self.refusals >= REFUSALS_TO_GIVE_UP {
                    self.actions.push_back(Action::Refused(None));
                }
                self.refusals = 0;
            }
            Event::CreateFailed { id, kind, message } => {
                if self.creating.as_deref() == Some(id.as_str()) {
                    self.creating = None;
                }
                self.mine.remove(&id);
                self.create_failed(now, kind, message);
            }
            Event::Stopped { id } => {
                if self.mine.get(&id).is_some_and(|m| m.joined.is_none()) {
                    self.terminate(&id, "stopped before its agent connected".into(), true);
                }
            }
            Event::Shutdown => {
                let ids: Vec<String> = self.mine.keys().cloned().collect();
                for id in ids {
                    self.terminate(&id, "run ended".into(), false);
                }
                self.demand = Demand::default();
                return;
            }
        }
        self.handle_timeout(now);
    }

    fn create_failed(&mut self, now: Instant, kind: ErrorKind, message: String) {
        // Do not hammer a failing provider: 2 s, 4 s, ... up to a minute.
        self.failures += 1;
        let retry_in = Duration::from_secs(1u64 << self.failures.min(6)).min(MAX_BACKOFF);
        self.pace_after = now + retry_in;
        self.actions.push_back(Action::CreateError(Some(message.clone())));
        match kind {
            ErrorKind::Capacity => self.actions.push_back(Action::NoCapacity { message, retry_in }),
            ErrorKind::Refused => {
                self.refusals += 1;
                if self.refusals == REFUSALS_TO_GIVE_UP {
                    self.actions.push_back(Action::Refused(Some(message)));
                } else {
                    self.actions.push_back(Action::Failed { message, retry_in });
                }
            }
            ErrorKind::Transient => {
                self.refusals = 0;
                self.actions.push_back(Action::Failed { message, retry_in });
            }
        }
    }

    /// Joins, losses, boot timeouts, idleness, scaling and the sweep, as of `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        self.observe(now);
        self.scale(now);
        if now >= self.next_sweep {
            self.next_sweep = now + self.settings.sweep_interval;
            self.actions.push_back(Action::Sweep);
        }
    }

    fn observe(&mut self, now: Instant) {
        let connected: HashSet<&str> = self.agents.iter().map(|a| a.agent_id.as_str()).collect();
        let mut doomed = Vec::new();
        for (id, m) in self.mine.iter_mut() {
            if connected.contains(id.as_str()) {
                m.gone_since = None;
                if m.joined.is_none() {
                    m.joined = Some(now);
                    self.actions.push_back(Action::Joined { id: id.clone(), boot: now - m.requested });
                }
                continue;
            }
            match m.joined {
                // An instance whose create is still in flight has not started booting.
                None if (m.provider_id.is_some() || self.creating.as_deref() != Some(id.as_str()))
                    && now.duration_since(m.requested) > self.settings.boot_timeout =>
                {
                    let reason =
                        format!("boot timeout: no agent within {}s", self.settings.boot_timeout.as_secs());
                    doomed.push((id.clone(), reason, true));
                }
                None => {}
                Some(_) => {
                    let since = *m.gone_since.get_or_insert(now);
                    if now.duration_since(since) > self.settings.heartbeat_window {
                        doomed.push((id.clone(), "agent lost".into(), false));
                    }
                }
            }
        }
        for (id, reason, failed) in doomed {
            self.terminate(&id, reason, failed);
        }
    }

    fn scale(&mut self, now: Instant) {
        let s = &self.settings;
        let d = &self.demand;
        let floor = if d.want > 0 { s.min_instances } else { 0 };
        let steps = if s.prestarts { d.want } else { d.active };
        // Agents that are not ours (persistent ones) take steps first.
        let others: usize = self
            .agents
            .iter()
            .filter(|a| !a.draining && !self.mine.contains_key(&a.agent_id))
            .map(|a| a.slots.max(1) as usize)
            .sum();
        let want = steps.saturating_sub(others).max(floor).min(s.max_instances);
        for (id, m) in self.mine.iter_mut() {
            if m.joined.is_some() && !d.busy.contains(id) {
                m.idle_since.get_or_insert(now);
            } else {
                m.idle_since = None;
            }
        }
        // Instances whose agents drain (their job is ending) are replaced while they finish.
        let draining: HashSet<String> =
            self.agents.iter().filter(|a| a.draining).map(|a| a.agent_id.clone()).collect();
        let live = self.mine.keys().filter(|id| !draining.contains(*id)).count();
        if live < want
            && self.mine.len() < s.max_instances + draining.len()
            && now >= self.pace_after
            && self.creating.is_none()
        {
            self.create(now);
        }
        if live > want {
            // Idle joined instances first, then the youngest still booting (draining ones
            // leave by themselves); instances still booting go only when idle instances may
            // go at once.
            let idle_timeout = self.settings.idle_timeout;
            let mut idle: Vec<(&String, &Mine)> = self
                .mine
                .iter()
                .filter(|(id, _)| !draining.contains(*id))
                .filter(|(_, m)| m.idle_since.is_some_and(|t| now.duration_since(t) >= idle_timeout))
                .collect();
            idle.sort_by_key(|(_, m)| m.requested);
            let mut booting: Vec<(&String, &Mine)> = self
                .mine
                .iter()
                .filter(|(id, m)| {
                    m.joined.is_none()
                        && !draining.contains(*id)
                        && self.creating.as_deref() != Some(id.as_str())
                })
                .collect();
            booting.sort_by_key(|(_, m)| std::cmp::Reverse(m.requested));
            if !idle_timeout.is_zero() {
                booting.clear();
            }
            let victims: Vec<String> =
                idle.into_iter().chain(booting).take(live - want).map(|(id, _)| id.clone()).collect();
            for id in victims {
                self.terminate(&id, "no work left for it".into(), false);
            }
        }
    }

    fn create(&mut self, now: Instant) {
        let id = (self.new_id)();
        // Sized for the first step no booting instance was made for.
        let claimed: HashSet<&str> =
            self.mine.values().filter(|m| m.joined.is_none()).filter_map(|m| m.for_step.as_deref()).collect();
        let need = self.demand.unplaced.iter().find(|n| !claimed.contains(n.step.as_str())).cloned();
        self.mine.insert(
            id.clone(),
            Mine {
                for_step: need.as_ref().map(|n| n.step.clone()),
                provider_id: None,
                requested: now,
                joined: None,
                gone_since: None,
                idle_since: None,
            },
        );
        self.creating = Some(id.clone());
        self.actions.push_back(Action::Create { id, need, run: self.demand.run.clone() });
    }

    fn terminate(&mut self, id: &str, reason: String, failed_to_join: bool) {
        if let Some(m) = self.mine.remove(id) {
            if self.creating.as_deref() == Some(id) {
                self.creating = None;
            }
            let provider_id = m.provider_id;
            self.actions.push_back(Action::Terminate {
                id: id.to_string(),
                provider_id,
                reason,
                failed_to_join,
            });
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Planner::handle_timeout`] may decide something without a new event.
    pub fn next_timeout(&self) -> Option<Instant> {
        let s = &self.settings;
        let mut t = vec![self.next_sweep];
        if self.creating.is_none() && self.pace_after > self.now {
            t.push(self.pace_after);
        }
        for m in self.mine.values() {
            match (m.joined, m.gone_since, m.idle_since) {
                (None, _, _) => t.push(m.requested + s.boot_timeout + Duration::from_millis(1)),
                (Some(_), Some(g), _) => t.push(g + s.heartbeat_window + Duration::from_millis(1)),
                (Some(_), None, Some(i)) => t.push(i + s.idle_timeout),
                _ => {}
            }
        }
        t.into_iter().min()
    }

    /// Instances created and not joined yet: (id, provider id, requested at), for the driver
    /// to follow their boot on the console.
    pub fn booting(&self) -> Vec<(String, String, Instant)> {
        self.mine
            .iter()
            .filter(|(_, m)| m.joined.is_none())
            .filter_map(|(id, m)| Some((id.clone(), m.provider_id.clone()?, m.requested)))
            .collect()
    }

    /// Every instance this planner made and has not terminated: (id, provider id).
    pub fn instances(&self) -> Vec<(String, Option<String>)> {
        self.mine.iter().map(|(id, m)| (id.clone(), m.provider_id.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            min_instances: 0,
            max_instances: 4,
            boot_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(30),
            heartbeat_window: Duration::from_secs(15),
            sweep_interval: Duration::from_secs(600),
            prestarts: true,
        }
    }

    fn planner(s: Settings, now: Instant) -> Planner {
        let mut n = 0;
        Planner::new(
            s,
            now,
            Box::new(move || {
                n += 1;
                format!("i{n}")
            }),
        )
    }

    fn demand(want: usize, busy: &[&str]) -> Event {
        Event::Demand(Demand {
            want,
            active: want,
            busy: busy.iter().map(|s| s.to_string()).collect(),
            run: Some("r".into()),
            unplaced: (0..want).map(|i| Need { step: format!("s{i}"), cpus: 1, memory_bytes: 0 }).collect(),
        })
    }

    fn agents(ids: &[&str]) -> Event {
        Event::Agents(
            ids.iter().map(|id| Seen { agent_id: id.to_string(), draining: false, slots: 1 }).collect(),
        )
    }

    fn drain(p: &mut Planner) -> Vec<Action> {
        std::iter::from_fn(|| p.poll_action()).collect()
    }

    fn created(p: &mut Planner, now: Instant, id: &str) {
        p.handle(now, Event::Created { id: id.into(), provider_id: format!("p-{id}") });
    }

    fn creates(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| if let Action::Create { id, .. } = a { Some(id.clone()) } else { None })
            .collect()
    }

    fn terminated(actions: &[Action]) -> Vec<(String, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Terminate { id, reason, .. } => Some((id.clone(), reason.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn creates_one_at_a_time_up_to_the_demand_sized_for_unplaced_steps() {
        let t0 = Instant::now();
        let mut p = planner(settings(), t0);
        p.handle(t0, demand(2, &[]));
        let a = drain(&mut p);
        assert_eq!(
            a,
            [Action::Create {
                id: "i1".into(),
                need: Some(Need { step: "s0".into(), cpus: 1, memory_bytes: 0 }),
                run: Some("r".into())
            }]
        );
        // Nothing more while the create is in flight.
        p.handle_timeout(t0);
        assert!(creates(&drain(&mut p)).is_empty());
        created(&mut p, t0, "i1");
        let a = drain(&mut p);
        assert!(a.contains(&Action::CreateError(None)));
        // The second is sized for the step the first was not made for.
        assert!(
            matches!(&a[..], [.., Action::Create { id, need: Some(n), .. }] if id == "i2" && n.step == "s1")
        );
        created(&mut p, t0, "i2");
        assert!(creates(&drain(&mut p)).is_empty());
        p.handle(t0, agents(&["i1", "i2"]));
        let a = drain(&mut p);
        assert_eq!(a.iter().filter(|x| matches!(x, Action::Joined { .. })).count(), 2, "{a:?}");
    }

    #[test]
    fn a_boot_timeout_terminates_the_instance_and_it_is_replaced() {
        let t0 = Instant::now();
        let mut p = planner(settings(), t0);
        p.handle(t0, demand(1, &[]));
        drain(&mut p);
        created(&mut p, t0, "i1");
        drain(&mut p);
        assert_eq!(p.next_timeout(), Some(t0 + Duration::from_secs(120) + Duration::from_millis(1)));
        p.handle_timeout(t0 + Duration::from_secs(120));
        assert!(drain(&mut p).is_empty(), "timed out at the limit, not past it");
        let t1 = t0 + Duration::from_secs(121);
        p.handle_timeout(t1);
        let a = drain(&mut p);
        assert_eq!(
            a[0],
            Action::Terminate {
                id: "i1".into(),
                provider_id: Some("p-i1".into()),
                reason: "boot timeout: no agent within 120s".into(),
                failed_to_join: true
            }
        );
        assert_eq!(creates(&a), ["i2"], "replaced while the demand lasts");
    }

    #[test]
    fn a_boot_that_times_out_during_a_refusal_backoff_goes_and_creates_wait_for_the_backoff() {
        let t0 = Instant::now();
        let mut s = settings();
        s.boot_timeout = Duration::from_secs(5);
        let mut p = planner(s, t0);
        p.handle(t0, demand(2, &[]));
        drain(&mut p);
        created(&mut p, t0, "i1");
        assert_eq!(creates(&drain(&mut p)), ["i2"]);
        // The second create is refused: backoff 2 s.
        let t1 = t0 + Duration::from_secs(4);
        p.handle(
            t1,
            Event::CreateFailed { id: "i2".into(), kind: ErrorKind::Refused, message: "no subnet".into() },
        );
        let a = drain(&mut p);
        assert!(
            a.contains(&Action::Failed { message: "no subnet".into(), retry_in: Duration::from_secs(2) })
        );
        assert!(creates(&a).is_empty());
        // i1's boot times out inside the backoff: it goes, nothing is created yet.
        let t2 = t0 + Duration::from_secs(5) + Duration::from_millis(500);
        p.handle_timeout(t2);
        let a = drain(&mut p);
        assert_eq!(terminated(&a), [("i1".to_string(), "boot timeout: no agent within 5s".to_string())]);
        assert!(creates(&a).is_empty(), "created during the backoff: {a:?}");
        // The backoff ends: a replacement is tried.
        assert_eq!(p.next_timeout(), Some(t1 + Duration::from_secs(2)));
        p.handle_timeout(t1 + Duration::from_secs(2));
        assert_eq!(creates(&drain(&mut p)), ["i3"]);
    }

    #[test]
    fn refusals_in_a_row_give_up_and_a_later_success_clears_it() {
        let t0 = Instant::now();
        let mut p = planner(settings(), t0);
        p.handle(t0, demand(1, &[]));
        let mut now = t0;
        let mut gave_up = Vec::new();
        for i in 1..=REFUSALS_TO_GIVE_UP {
            let a = drain(&mut p);
            let id = creates(&a).pop().unwrap_or_else(|| panic!("try {i}: no create in {a:?}"));
            p.handle(now, Event::CreateFailed { id, kind: ErrorKind::Refused, message: "denied".into() });
            gave_up.extend(drain(&mut p).into_iter().filter(|a| matches!(a, Action::Refused(_))));
            now = p.next_timeout().unwrap();
            p.handle_timeout(now);
        }
        assert_eq!(gave_up, [Action::Refused(Some("denied".into()))]);
        // A transient failure in between would have reset the count; here a success clears it.
        let id = creates(&drain(&mut p)).pop().unwrap();
        created(&mut p, now, &id);
        assert!(drain(&mut p).contains(&Action::Refused(None)));
    }

    #[test]
    fn a_capacity_error_then_success_on_the_next_try() {
        let t0 = Instant::now();
        let mut p = planner(settings(), t0);
        p.handle(t0, demand(1, &[]));
        drain(&mut p);
        p.handle(
            t0,
            Event::CreateFailed {
                id: "i1".into(),
                kind: ErrorKind::Capacity,
                message: "InsufficientInstanceCapacity for m5.large".into(),
            },
        );
        let a = drain(&mut p);
        assert!(a.contains(&Action::NoCapacity {
            message: "InsufficientInstanceCapacity for m5.large".into(),
            retry_in: Duration::from_secs(2)
        }));
        assert!(!a.iter().any(|x| matches!(x, Action::Refused(_))), "capacity is not a refusal");
        p.handle_timeout(t0 + Duration::from_secs(1));
        assert!(creates(&drain(&mut p)).is_empty());
        p.handle_timeout(t0 + Duration::from_secs(2));
        let a = drain(&mut p);
        assert_eq!(creates(&a), ["i2"]);
        created(&mut p, t0 + Duration::from_secs(3), "i2");
        assert!(drain(&mut p).contains(&Action::CreateError(None)));
        p.handle(t0 + Duration::from_secs(40), agents(&["i2"]));
        assert_eq!(drain(&mut p), [Action::Joined { id: "i2".into(), boot: Duration::from_secs(38) }]);
    }

    #[test]
    fn an_idle_instance_that_gets_work_back_stays() {
        let t0 = Instant::now();
        let mut p = planner(settings(), t0);
        p.handle(t0, demand(1, &["i1"]));
        drain(&mut p);
        created(&mut p, t0, "i1");
        p.handle(t0, agents(&["i1"]));
        drain(&mut p);
        // Its step ended, nothing else wanted: idle from t1.
        let t1 = t0 + Duration::from_secs(10);
        p.handle(t1, demand(0, &[]));
        assert!(terminated(&drain(&mut p)).is_empty());
        assert_eq!(p.next_timeout(), Some(t1 + Duration::from_secs(30)));
        // Work comes back before the idle timeout: it stays, and idleness starts over.
        let t2 = t1 + Duration::from_secs(20);
        p.handle(t2, demand(1, &["i1"]));
        p.handle(t2 + Duration::from_secs(5), demand(0, &[]));
        p.handle_timeout(t1 + Duration::from_secs(31));
        assert!(terminated(&drain(&mut p)).is_empty(), "idle time was not reset");
        p.handle_timeout(t2 + Duration::from_secs(35));
        assert_eq!(terminated(&drain(&mut p)), [("i1".to_string(), "no work left for it".to_string())]);
    }

    #[test]
    fn a_joined_instance_whose_agent_is_away_past_the_window_goes() {
        let t0 = Instant::now();
        let mut p = planner(settings(), t0);
        p.handle(t0, demand(1, &["i1"]));
        drain(&mut p);
        created(&mut p, t0, "i1");
        p.handle(t0, agents(&["i1"]));
        drain(&mut p);
        p.handle(t0 + Duration::from_secs(1), agents(&[]));
        // Back inside the window: kept.
        p.handle(t0 + Duration::from_secs(10), agents(&["i1"]));
        p.handle(t0 + Duration::from_secs(11), agents(&[]));
        p.handle_timeout(t0 + Duration::from_secs(26));
        assert!(terminated(&drain(&mut p)).is_empty());
        p.handle_timeout(t0 + Duration::from_secs(27));
        let a = drain(&mut p);
        assert_eq!(terminated(&a), [("i1".to_string(), "agent lost".to_string())]);
        assert_eq!(creates(&a), ["i2"], "replaced while the demand lasts");
    }

    #[test]
    fn stopped_instances_shutdown_and_the_sweep() {
        let t0 = Instant::now();
        let mut s = settings();
        s.boot_timeout = Duration::from_secs(3600);
        let mut p = planner(s, t0);
        p.handle(t0, demand(2, &[]));
        drain(&mut p);
        created(&mut p, t0, "i1");
        drain(&mut p);
        created(&mut p, t0, "i2");
        drain(&mut p);
        p.handle(t0, Event::Stopped { id: "i1".into() });
        let a = drain(&mut p);
        assert!(matches!(&a[0], Action::Terminate { id, failed_to_join: true, .. } if id == "i1"));
        assert_eq!(creates(&a), ["i3"]);
        p.handle_timeout(t0 + Duration::from_secs(600));
        assert!(drain(&mut p).contains(&Action::Sweep));
        p.handle(t0 + Duration::from_secs(601), Event::Shutdown);
        let mut gone: Vec<String> = terminated(&drain(&mut p)).into_iter().map(|(id, _)| id).collect();
        gone.sort();
        assert_eq!(gone, ["i2", "i3"]);
        assert!(p.instances().is_empty());
    }
}
