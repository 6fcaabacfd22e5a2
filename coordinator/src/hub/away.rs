//! One agent's absence, for whoever follows a single attempt outside a run's scheduler
//! (`step run`, a program build; see `Hub::next_attempt_event`): an
//! agent away longer than the heartbeat window is lost, and the attempt with it. A reconnect
//! within the window keeps the attempt, as it does for a run (`run::membership`).
//!
//! A state machine: [`Away::observe`] takes `now` and whether the agent is connected, and
//! says what that means and when to look again. No IO, no clock of its own.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Connected: nothing to wait for.
    Present,
    /// Disconnected: lost unless it is back by `until`.
    Away { until: Instant },
    /// Disconnected past the window.
    Lost { reason: String },
}

#[derive(Debug)]
pub struct Away {
    window: Duration,
    /// When the agent was first seen disconnected, since it was last seen connected.
    since: Option<Instant>,
}

impl Away {
    pub fn new(window: Duration) -> Self {
        Self { window, since: None }
    }

    pub fn observe(&mut self, now: Instant, connected: bool) -> Verdict {
        if connected {
            self.since = None;
            return Verdict::Present;
        }
        let since = *self.since.get_or_insert(now);
        let until = since + self.window;
        if now >= until {
            Verdict::Lost { reason: format!("disconnected for more than {} ms", self.window.as_millis()) }
        } else {
            Verdict::Away { until }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(15);

    #[test]
    fn connected_agents_are_never_lost() {
        let t0 = Instant::now();
        let mut a = Away::new(W);
        for s in [0, 10, 100, 1000] {
            assert_eq!(a.observe(t0 + Duration::from_secs(s), true), Verdict::Present);
        }
    }

    #[test]
    fn lost_once_away_for_the_whole_window() {
        let t0 = Instant::now();
        let mut a = Away::new(W);
        assert_eq!(a.observe(t0, true), Verdict::Present);
        let gone = t0 + Duration::from_secs(5);
        assert_eq!(a.observe(gone, false), Verdict::Away { until: gone + W });
        // Looking again later does not move the deadline.
        assert_eq!(a.observe(gone + W - Duration::from_millis(1), false), Verdict::Away { until: gone + W });
        match a.observe(gone + W, false) {
            Verdict::Lost { reason } => assert!(reason.contains("15000 ms"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_reconnect_inside_the_window_starts_a_new_one_next_time() {
        let t0 = Instant::now();
        let mut a = Away::new(W);
        assert_eq!(a.observe(t0, false), Verdict::Away { until: t0 + W });
        let back = t0 + Duration::from_secs(14);
        assert_eq!(a.observe(back, true), Verdict::Present);
        // Away again: the window counts from this disconnect, not the first one.
        let again = t0 + Duration::from_secs(20);
        assert_eq!(a.observe(again, false), Verdict::Away { until: again + W });
        assert!(matches!(a.observe(again + W, false), Verdict::Lost { .. }));
    }
}
