//! Agent membership as a run sees it: which agents joined, which drain, and when one that
//! disconnected counts as lost (after the heartbeat window, so a reconnect within it keeps
//! its running steps), or as gone after a drain. An attempt adopted from a previous
//! coordinator gives its agent extra time to come back (its reconnect backoff).
//!
//! A state machine in the style of [`super::sched`]: [`Membership::handle`] takes `now` and
//! what the hub shows, [`Membership::handle_timeout`] takes `now` alone,
//! [`Membership::poll_action`] says what changed, [`Membership::next_timeout`] when to call
//! again. No IO, no clock of its own.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::sched::AgentCapacity;

/// A connected agent, as the hub shows it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub agent_id: String,
    pub draining: bool,
    /// It has reported the attempts it holds since it connected (agents say `Draining`
    /// before that report): until then `draining: false` may only mean "not said yet".
    pub settled: bool,
    pub capacity: AgentCapacity,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// Every agent connected now.
    Agents(Vec<Seen>),
    /// A resumed run awaits an attempt held by `agent`: if it is not connected, it has
    /// `extra` beyond the heartbeat window to come back before it counts as lost.
    Expect { agent: String, extra: Duration },
    /// A message to `agent` could not be sent: it is away from now, whatever the hub showed
    /// last, and counts as back only when it is seen connected again.
    Unreachable { agent: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// New to this run, or back without the drain it had (restarted): it takes work.
    Joined { agent: String, capacity: AgentCapacity },
    /// It finishes its steps and takes no new ones.
    Draining { agent: String },
    /// Disconnected, inside its window: it keeps its running steps and takes nothing new.
    Away { agent: String },
    /// Reconnected inside its window: it takes work again.
    Back { agent: String },
    /// Disconnected past its deadline: its running attempts are lost.
    Lost { agent: String, reason: String },
    /// A draining agent that left and did not come back: gone as planned.
    Left { agent: String },
}

/// Disconnected agents and when each counts as lost, indexed both ways: the next deadline and
/// the ones due cost time in what is due, not in how many agents are away (a restarted
/// coordinator awaits thousands).
#[derive(Default)]
struct Deadlines {
    at: HashMap<String, Instant>,
    order: BTreeSet<(Instant, String)>,
}

impl Deadlines {
    fn insert(&mut self, id: String, t: Instant) {
        if let Some(old) = self.at.insert(id.clone(), t) {
            self.order.remove(&(old, id.clone()));
        }
        self.order.insert((t, id));
    }

    /// Inserts unless `id` has a deadline already; says whether it inserted.
    fn insert_if_absent(&mut self, id: String, t: Instant) -> bool {
        if self.at.contains_key(&id) {
            return false;
        }
        self.insert(id, t);
        true
    }

    fn remove(&mut self, id: &str) -> Option<Instant> {
        let t = self.at.remove(id)?;
        self.order.remove(&(t, id.to_string()));
        Some(t)
    }

    fn first(&self) -> Option<Instant> {
        self.order.first().map(|(t, _)| *t)
    }

    /// Removes and returns the agents whose deadline is at or before `now`, by id.
    fn take_due(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        while let Some((t, _)) = self.order.first()
            && *t <= now
        {
            let (_, id) = self.order.pop_first().expect("looked at above");
            self.at.remove(&id);
            due.push(id);
        }
        due.sort();
        due
    }
}

pub struct Membership {
    /// How long a disconnected agent has to reconnect.
    window: Duration,
    /// Agents this run has placed work on or may: joined and not lost.
    known: HashSet<String>,
    draining: HashSet<String>,
    /// Disconnected agents and when they count as lost.
    gone: Deadlines,
    connected: HashSet<String>,
    actions: VecDeque<Action>,
}

impl Membership {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            known: HashSet::new(),
            draining: HashSet::new(),
            gone: Deadlines::default(),
            connected: HashSet::new(),
            actions: VecDeque::new(),
        }
    }

    pub fn handle(&mut self, now: Instant, event: Event) {
        match event {
            Event::Agents(seen) => self.agents(now, seen),
            Event::Expect { agent, extra } => {
                if !self.connected.contains(&agent) {
                    self.gone.insert(agent, now + extra + self.window);
                }
            }
            Event::Unreachable { agent } => {
                if self.known.contains(&agent) {
                    self.connected.remove(&agent);
                    self.gone.insert_if_absent(agent, now + self.window);
                }
            }
        }
        self.handle_timeout(now);
    }

    fn agents(&mut self, now: Instant, seen: Vec<Seen>) {
        let mut connected = HashSet::new();
        for v in seen {
            let was_gone = self.gone.remove(&v.agent_id).is_some();
            let was_draining = self.draining.contains(&v.agent_id);
            if v.draining && !was_draining {
                self.draining.insert(v.agent_id.clone());
                self.actions.push_back(Action::Draining { agent: v.agent_id.clone() });
            }
            // The same agent back without the drain (restarted) takes work again; a draining
            // agent that reconnected has not said so again until it settled.
            let back = was_draining && !v.draining && v.settled && self.draining.remove(&v.agent_id);
            if self.known.insert(v.agent_id.clone()) || back {
                self.actions.push_back(Action::Joined { agent: v.agent_id.clone(), capacity: v.capacity });
            } else if was_gone && !self.draining.contains(&v.agent_id) {
                self.actions.push_back(Action::Back { agent: v.agent_id.clone() });
            }
            connected.insert(v.agent_id);
        }
        let mut away: Vec<&String> = self.known.iter().filter(|id| !connected.contains(*id)).collect();
        away.sort();
        for id in away {
            if self.gone.insert_if_absent(id.clone(), now + self.window) {
                // A draining agent takes nothing new anyway: its leaving is said when it has left.
                if !self.draining.contains(id) {
                    self.actions.push_back(Action::Away { agent: id.clone() });
                }
            }
        }
        self.connected = connected;
    }

    /// Agents past their deadline are lost (or gone, after a drain).
    pub fn handle_timeout(&mut self, now: Instant) {
        for id in self.gone.take_due(now) {
            self.known.remove(&id);
            if self.draining.remove(&id) {
                self.actions.push_back(Action::Left { agent: id });
            } else {
                let reason = format!("disconnected for more than {} ms", self.window.as_millis());
                self.actions.push_back(Action::Lost { agent: id, reason });
            }
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Membership::handle_timeout`] has something to do.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.gone.first()
    }

    /// Agents that are disconnected and not lost yet, with their deadlines.
    pub fn awaited(&self) -> HashMap<&str, Instant> {
        self.gone.at.iter().map(|(id, t)| (id.as_str(), *t)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(15);

    fn seen(id: &str, draining: bool) -> Seen {
        Seen {
            agent_id: id.into(),
            draining,
            settled: true,
            capacity: AgentCapacity {
                cpus: 2.0,
                memory_bytes: 1 << 30,
                slots: 1,
                labels: Default::default(),
            },
        }
    }

    fn drain(m: &mut Membership) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    fn names(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Joined { agent, .. } => format!("joined {agent}"),
                Action::Draining { agent } => format!("draining {agent}"),
                Action::Away { agent } => format!("away {agent}"),
                Action::Back { agent } => format!("back {agent}"),
                Action::Lost { agent, .. } => format!("lost {agent}"),
                Action::Left { agent } => format!("left {agent}"),
            })
            .collect()
    }

    #[test]
    fn an_agent_that_joins_then_goes_silent_is_lost_after_the_window() {
        let t0 = Instant::now();
        let mut m = Membership::new(W);
        m.handle(t0, Event::Agents(vec![seen("a", false), seen("b", false)]));
        assert_eq!(names(&drain(&mut m)), ["joined a", "joined b"]);
        assert_eq!(m.next_timeout(), None);
        // b disconnects at t0+1s.
        m.handle(t0 + Duration::from_secs(1), Event::Agents(vec![seen("a", false)]));
        assert_eq!(names(&drain(&mut m)), ["away b"]);
        assert_eq!(m.next_timeout(), Some(t0 + Duration::from_secs(1) + W));
        // Still inside the window: nothing.
        m.handle_timeout(t0 + Duration::from_secs(15));
        assert!(drain(&mut m).is_empty());
        // Seeing the same set again does not move the deadline.
        m.handle(t0 + Duration::from_secs(10), Event::Agents(vec![seen("a", false)]));
        assert_eq!(m.next_timeout(), Some(t0 + Duration::from_secs(1) + W));
        m.handle_timeout(t0 + Duration::from_secs(16));
        let lost = drain(&mut m);
        assert_eq!(names(&lost), ["lost b"]);
        assert!(matches!(&lost[0], Action::Lost { reason, .. } if reason.contains("15000 ms")));
        assert_eq!(m.next_timeout(), None);
        // Coming back after being lost is a new join.
        m.handle(t0 + Duration::from_secs(20), Event::Agents(vec![seen("a", false), seen("b", false)]));
        assert_eq!(names(&drain(&mut m)), ["joined b"]);
    }

    #[test]
    fn an_agent_that_rejoins_inside_the_window_is_neither_lost_nor_joined_again() {
        let t0 = Instant::now();
        let mut m = Membership::new(W);
        m.handle(t0, Event::Agents(vec![seen("a", false)]));
        drain(&mut m);
        m.handle(t0 + Duration::from_secs(2), Event::Agents(vec![]));
        assert_eq!(names(&drain(&mut m)), ["away a"]);
        m.handle(t0 + Duration::from_secs(14), Event::Agents(vec![seen("a", false)]));
        assert_eq!(names(&drain(&mut m)), ["back a"]);
        assert_eq!(m.next_timeout(), None);
        m.handle_timeout(t0 + Duration::from_secs(60));
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn a_draining_agent_that_leaves_has_left_and_one_back_without_the_drain_takes_work() {
        let t0 = Instant::now();
        let mut m = Membership::new(W);
        m.handle(t0, Event::Agents(vec![seen("a", false), seen("b", false)]));
        drain(&mut m);
        m.handle(t0, Event::Agents(vec![seen("a", true), seen("b", true)]));
        assert_eq!(names(&drain(&mut m)), ["draining a", "draining b"]);
        // Draining twice is said once.
        m.handle(t0, Event::Agents(vec![seen("a", true), seen("b", true)]));
        assert!(drain(&mut m).is_empty());
        // a leaves for good; b restarts (reconnects without the drain).
        m.handle(t0 + Duration::from_secs(1), Event::Agents(vec![seen("b", false)]));
        assert_eq!(names(&drain(&mut m)), ["joined b"]);
        m.handle_timeout(t0 + Duration::from_secs(1) + W);
        assert_eq!(names(&drain(&mut m)), ["left a"]);
    }

    #[test]
    fn a_draining_agent_that_reconnects_stays_draining_until_it_settles() {
        let t0 = Instant::now();
        let mut m = Membership::new(W);
        m.handle(t0, Event::Agents(vec![seen("a", false)]));
        m.handle(t0, Event::Agents(vec![seen("a", true)]));
        assert_eq!(names(&drain(&mut m)), ["joined a", "draining a"]);
        m.handle(t0 + Duration::from_millis(100), Event::Agents(vec![]));
        assert!(drain(&mut m).is_empty(), "a draining agent's disconnect is said when it has left");
        // Back on a new connection: not settled, its drain not said again yet.
        let unsettled = Seen { settled: false, ..seen("a", false) };
        m.handle(t0 + Duration::from_millis(200), Event::Agents(vec![unsettled.clone()]));
        assert!(drain(&mut m).is_empty(), "taken for a restarted agent");
        m.handle(t0 + Duration::from_millis(210), Event::Agents(vec![seen("a", true)]));
        assert!(drain(&mut m).is_empty());
        m.handle_timeout(t0 + Duration::from_secs(60));
        assert!(drain(&mut m).is_empty());
        // A restart: unsettled, then settled without the drain: it takes work again.
        m.handle(t0 + Duration::from_secs(61), Event::Agents(vec![unsettled]));
        assert!(drain(&mut m).is_empty());
        m.handle(t0 + Duration::from_secs(61), Event::Agents(vec![seen("a", false)]));
        assert_eq!(names(&drain(&mut m)), ["joined a"]);
    }

    #[test]
    fn an_adopted_attempts_agent_gets_the_adoption_grace_and_may_rejoin_inside_it() {
        let t0 = Instant::now();
        let extra = Duration::from_secs(45);
        let mut m = Membership::new(W);
        m.handle(t0, Event::Agents(vec![seen("a", false)]));
        drain(&mut m);
        // b held an attempt of the previous coordinator; a is connected, so it needs no grace.
        m.handle(t0, Event::Expect { agent: "b".into(), extra });
        m.handle(t0, Event::Expect { agent: "a".into(), extra });
        assert_eq!(m.next_timeout(), Some(t0 + extra + W));
        // Seeing the agents again (b still away) keeps b's longer deadline.
        m.handle(t0 + Duration::from_secs(30), Event::Agents(vec![seen("a", false)]));
        m.handle_timeout(t0 + W + Duration::from_secs(1));
        assert!(drain(&mut m).is_empty(), "lost before the grace ended");
        // b reconnects inside the grace: it joins, nothing is lost.
        m.handle(t0 + Duration::from_secs(50), Event::Agents(vec![seen("a", false), seen("b", false)]));
        assert_eq!(names(&drain(&mut m)), ["joined b"]);
        m.handle_timeout(t0 + Duration::from_secs(120));
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn an_adopted_attempts_agent_that_never_returns_is_lost_when_the_grace_ends() {
        let t0 = Instant::now();
        let extra = Duration::from_secs(45);
        let mut m = Membership::new(W);
        m.handle(t0, Event::Expect { agent: "b".into(), extra });
        m.handle_timeout(t0 + extra + W - Duration::from_millis(1));
        assert!(drain(&mut m).is_empty());
        m.handle_timeout(t0 + extra + W);
        assert_eq!(names(&drain(&mut m)), ["lost b"]);
    }

    #[test]
    fn an_agent_that_could_not_be_reached_is_away_until_it_is_seen_again() {
        let t0 = Instant::now();
        let mut m = Membership::new(W);
        m.handle(t0, Event::Agents(vec![seen("a", false)]));
        drain(&mut m);
        // A send failed although the hub still showed a (it reconnected in between, or
        // the hub had not noticed yet): the caller has set it away itself.
        m.handle(t0 + Duration::from_secs(1), Event::Unreachable { agent: "a".into() });
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.next_timeout(), Some(t0 + Duration::from_secs(1) + W));
        // Seen again: back, and no longer awaited.
        m.handle(t0 + Duration::from_secs(2), Event::Agents(vec![seen("a", false)]));
        assert_eq!(names(&drain(&mut m)), ["back a"]);
        assert_eq!(m.next_timeout(), None);
        // Unreachable and never seen again: lost when its window ends.
        m.handle(t0 + Duration::from_secs(3), Event::Unreachable { agent: "a".into() });
        m.handle(t0 + Duration::from_secs(4), Event::Agents(vec![]));
        assert!(drain(&mut m).is_empty(), "away is said once");
        m.handle_timeout(t0 + Duration::from_secs(3) + W);
        assert_eq!(names(&drain(&mut m)), ["lost a"]);
        // An agent this run never knew is not awaited.
        m.handle(t0 + Duration::from_secs(30), Event::Unreachable { agent: "z".into() });
        assert_eq!(m.next_timeout(), None);
    }
}
