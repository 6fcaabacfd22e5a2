//! Keeping the log readable at scale. [`LogRate`]: at most one line per key per window (a
//! peer refused at the TLS handshake again and again, a misconfigured agent reconnecting or a
//! scanner, is logged once a minute per address and reason, with the count of refusals left
//! out since). [`Burst`]: lines of one kind that come by the thousand (10,000 agents joining
//! after a restart) are logged one by one up to a number per window, and the rest as one line
//! when the window ends. State machines over `now`, so they are tested with a fake clock; the
//! server and the runs only ask them and log what they say.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// What to do with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` events of the same key were left out since the last line.
    Log { suppressed: u64 },
    /// Leave it out.
    Quiet,
}

pub struct LogRate<K> {
    window: Duration,
    max_keys: usize,
    /// Key -> (when its last line was logged, events left out since).
    keys: HashMap<K, (Instant, u64)>,
}

impl<K: Hash + Eq + Clone> LogRate<K> {
    /// One line per key per `window`; at most `max_keys` keys remembered (past that, keys
    /// whose window has ended are dropped, then the oldest).
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Self { window, max_keys: max_keys.max(1), keys: HashMap::new() }
    }

    pub fn event(&mut self, key: &K, now: Instant) -> Verdict {
        if let Some((logged, suppressed)) = self.keys.get_mut(key) {
            if now.saturating_duration_since(*logged) < self.window {
                *suppressed += 1;
                return Verdict::Quiet;
            }
            let left_out = std::mem::take(suppressed);
            *logged = now;
            return Verdict::Log { suppressed: left_out };
        }
        if self.keys.len() >= self.max_keys {
            let window = self.window;
            self.keys.retain(|_, (logged, _)| now.saturating_duration_since(*logged) < window);
            if self.keys.len() >= self.max_keys
                && let Some(oldest) = self.keys.iter().min_by_key(|(_, (t, _))| *t).map(|(k, _)| k.clone())
            {
                self.keys.remove(&oldest);
            }
        }
        self.keys.insert(key.clone(), (now, 0));
        Verdict::Log { suppressed: 0 }
    }
}

/// Agents joining, leaving, going away or coming back are logged (and printed by a client
/// watching a run) one by one up to this many per [`MEMBER_WINDOW`] and kind, the rest in one
/// line per window: a fleet of 10,000 agents reconnecting is not 10,000 lines.
pub const MEMBER_LINES: u64 = 20;
pub const MEMBER_WINDOW: Duration = Duration::from_secs(10);

/// A [`Burst`] for membership lines.
pub fn member_burst() -> Burst {
    Burst::new(MEMBER_WINDOW, MEMBER_LINES)
}

/// Events of one kind left out of the log over one window of a [`Burst`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeftOut {
    pub count: u64,
    /// From the window's first event to its end.
    pub over: Duration,
}

/// The first `each` events of a window are logged one by one, the rest counted and said in
/// one line ([`LeftOut`]) once the window has ended. A window opens with the first event
/// after the previous one ended.
pub struct Burst {
    window: Duration,
    each: u64,
    /// When the current window opened; `None` between windows.
    opened: Option<Instant>,
    logged: u64,
    left_out: u64,
}

impl Burst {
    pub fn new(window: Duration, each: u64) -> Self {
        Self { window, each, opened: None, logged: 0, left_out: 0 }
    }

    /// One event at `now`: whether to log it on a line of its own, and what an earlier window
    /// that has ended left out (to log first).
    pub fn event(&mut self, now: Instant) -> (bool, Option<LeftOut>) {
        let ended = self.poll(now);
        if self.opened.is_none() {
            self.opened = Some(now);
            self.logged = 0;
        }
        if self.logged < self.each {
            self.logged += 1;
            (true, ended)
        } else {
            self.left_out += 1;
            (false, ended)
        }
    }

    /// What the current window left out, once it has ended (once; `None` when it left out
    /// nothing). Called on a timer, so the last burst is said without waiting for an event.
    pub fn poll(&mut self, now: Instant) -> Option<LeftOut> {
        let opened = self.opened?;
        if now.saturating_duration_since(opened) < self.window {
            return None;
        }
        self.close(self.window)
    }

    /// Ends the current window now (its owner is done): what it left out, if anything.
    pub fn end(&mut self, now: Instant) -> Option<LeftOut> {
        let opened = self.opened?;
        self.close(now.saturating_duration_since(opened).min(self.window))
    }

    fn close(&mut self, over: Duration) -> Option<LeftOut> {
        self.opened = None;
        let count = std::mem::take(&mut self.left_out);
        (count > 0).then_some(LeftOut { count, over })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_key_per_window() {
        let t0 = Instant::now();
        let mut r = LogRate::new(Duration::from_secs(60), 100);
        let a = ("10.0.0.1", "expired");
        let b = ("10.0.0.2", "expired");
        assert_eq!(r.event(&a, t0), Verdict::Log { suppressed: 0 });
        for s in 1..=30 {
            assert_eq!(r.event(&a, t0 + Duration::from_secs(s)), Verdict::Quiet);
        }
        // Another address is its own key.
        assert_eq!(r.event(&b, t0 + Duration::from_secs(2)), Verdict::Log { suppressed: 0 });
        assert_eq!(r.event(&a, t0 + Duration::from_secs(59)), Verdict::Quiet);
        // A minute after its last line, the next one says how many were left out.
        assert_eq!(r.event(&a, t0 + Duration::from_secs(60)), Verdict::Log { suppressed: 31 });
        assert_eq!(r.event(&a, t0 + Duration::from_secs(61)), Verdict::Quiet);
        assert_eq!(r.event(&a, t0 + Duration::from_secs(200)), Verdict::Log { suppressed: 1 });
    }

    #[test]
    fn a_burst_is_logged_one_by_one_up_to_a_number_then_in_one_line() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = Burst::new(s(10), 3);
        let firsts: Vec<bool> = (0..10).map(|i| b.event(t0 + Duration::from_millis(i)).0).collect();
        assert_eq!(firsts, [true, true, true, false, false, false, false, false, false, false]);
        // Nothing is said before the window ends, then once.
        assert_eq!(b.poll(t0 + s(9)), None);
        assert_eq!(b.poll(t0 + s(10)), Some(LeftOut { count: 7, over: s(10) }));
        assert_eq!(b.poll(t0 + s(11)), None);
        // The next event opens a new window.
        assert_eq!(b.event(t0 + s(30)), (true, None));
        for i in 1..5 {
            b.event(t0 + s(30) + Duration::from_millis(i));
        }
        // An event after a window that ended unpolled carries its summary.
        assert_eq!(b.event(t0 + s(41)), (true, Some(LeftOut { count: 2, over: s(10) })));
        // A quiet window says nothing.
        assert_eq!(b.poll(t0 + s(60)), None);
        // A window ended early says what it left out so far, over the time it was open.
        for i in 0..5 {
            b.event(t0 + s(70) + Duration::from_millis(i));
        }
        assert_eq!(b.end(t0 + s(74)), Some(LeftOut { count: 2, over: s(4) }));
        assert_eq!(b.end(t0 + s(75)), None);
    }

    #[test]
    fn remembers_a_bounded_number_of_keys() {
        let t0 = Instant::now();
        let mut r = LogRate::new(Duration::from_secs(60), 3);
        for i in 0..3u32 {
            assert_eq!(r.event(&i, t0 + Duration::from_secs(u64::from(i))), Verdict::Log { suppressed: 0 });
        }
        // A fourth key pushes out the oldest (0), whose next event logs again.
        assert_eq!(r.event(&3, t0 + Duration::from_secs(4)), Verdict::Log { suppressed: 0 });
        assert_eq!(r.keys.len(), 3);
        assert_eq!(r.event(&1, t0 + Duration::from_secs(5)), Verdict::Quiet);
        assert_eq!(r.event(&0, t0 + Duration::from_secs(6)), Verdict::Log { suppressed: 0 });
        // Keys whose window ended go first.
        assert_eq!(r.event(&9, t0 + Duration::from_secs(120)), Verdict::Log { suppressed: 0 });
        assert_eq!(r.keys.len(), 1);
    }
}
