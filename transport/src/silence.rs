//! When a peer that should speak every so often has gone silent: the judgement both sides of a
//! control connection make (the agent of its coordinator, the coordinator of each agent).
//!
//! A process that was itself held up (a thread busy with a long task, a host short of CPU, a
//! paused VM) finds its silence deadline long past when it runs again, while what the peer sent
//! in the meantime still waits, unread, in the socket. Blaming the peer then ends a healthy
//! connection and retries its steps. So a deadline that is checked late by more than
//! `limit / 3` (one heartbeat interval with the default of three missed) is not a verdict:
//! the peer gets that much again, in which what is waiting is read. A peer that is really gone
//! is then judged at most `limit / 3` later.
//!
//! Plain state: the caller passes `now` and arms its own timer at [`Silence::deadline`].

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct Silence {
    limit: Duration,
    /// The peer was last heard at this time (or was given until `deadline` after a stall).
    since: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not silent for `limit` yet (or this process was stalled: see the module docs).
    Alive,
    /// Silent for longer than `limit` while this process was running.
    Silent,
}

impl Silence {
    pub fn new(limit: Duration, now: Instant) -> Self {
        Self { limit, since: now }
    }

    /// The peer said something.
    pub fn heard(&mut self, now: Instant) {
        self.since = self.since.max(now);
    }

    /// When the peer is silent for `limit`: the time to check next.
    pub fn deadline(&self) -> Instant {
        self.since + self.limit
    }

    /// How late a check may come before this process counts as stalled.
    fn slack(&self) -> Duration {
        self.limit / 3
    }

    /// The judgement at `now`. A check later than the deadline by more than the slack is this
    /// process's stall: the peer gets the slack from `now`, and `Alive` is returned.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let deadline = self.deadline();
        if now < deadline {
            return Verdict::Alive;
        }
        if now - deadline > self.slack() {
            // The peer has until now + slack.
            if let Some(since) = (now + self.slack()).checked_sub(self.limit) {
                self.since = since;
            }
            return Verdict::Alive;
        }
        Verdict::Silent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_millis(600);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_peer_silent_past_the_limit_is_silent_when_checked_on_time() {
        let t0 = Instant::now();
        let mut s = Silence::new(LIMIT, t0);
        assert_eq!(s.check(t0 + ms(599)), Verdict::Alive);
        assert_eq!(s.deadline(), t0 + LIMIT);
        assert_eq!(s.check(t0 + ms(600)), Verdict::Silent);
        // A check a little late (a ticker's period, under the slack) still judges.
        let mut s = Silence::new(LIMIT, t0);
        assert_eq!(s.check(t0 + ms(790)), Verdict::Silent);
    }

    #[test]
    fn hearing_moves_the_deadline_and_never_back() {
        let t0 = Instant::now();
        let mut s = Silence::new(LIMIT, t0);
        s.heard(t0 + ms(500));
        assert_eq!(s.check(t0 + ms(1000)), Verdict::Alive);
        assert_eq!(s.deadline(), t0 + ms(1100));
        s.heard(t0 + ms(100));
        assert_eq!(s.deadline(), t0 + ms(1100));
        assert_eq!(s.check(t0 + ms(1100)), Verdict::Silent);
    }

    #[test]
    fn a_stalled_checker_gives_the_peer_the_slack_before_it_judges() {
        let t0 = Instant::now();
        let mut s = Silence::new(LIMIT, t0);
        // This process ran again 2 s after the last frame: a stall, not a verdict.
        let woke = t0 + ms(2000);
        assert_eq!(s.check(woke), Verdict::Alive);
        assert_eq!(s.deadline(), woke + ms(200));
        // What waited in the socket is read: the peer is alive.
        s.heard(woke + ms(5));
        assert_eq!(s.check(woke + ms(300)), Verdict::Alive);
        assert_eq!(s.deadline(), woke + ms(605));
        // Nothing was waiting: judged at the new deadline.
        let mut s = Silence::new(LIMIT, t0);
        assert_eq!(s.check(woke), Verdict::Alive);
        assert_eq!(s.check(woke + ms(199)), Verdict::Alive);
        assert_eq!(s.check(woke + ms(200)), Verdict::Silent);
    }

    #[test]
    fn a_peer_gone_for_good_is_judged_however_often_this_process_stalls() {
        // Every check is a stall but the deadline moves only from `now`: a process that keeps
        // stalling still judges once it checks on time.
        let t0 = Instant::now();
        let mut s = Silence::new(LIMIT, t0);
        let mut now = t0;
        for _ in 0..5 {
            now += ms(1500);
            assert_eq!(s.check(now), Verdict::Alive);
        }
        assert_eq!(s.check(s.deadline()), Verdict::Silent);
    }
}
