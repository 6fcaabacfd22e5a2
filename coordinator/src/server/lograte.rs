//! At most one log line per key per window: a peer refused at the TLS handshake again and
//! again (a misconfigured agent reconnecting, a scanner) is logged once a minute per address
//! and reason, with the count of refusals left out since. A state machine over `now`, so it is
//! tested with a fake clock; the server only asks it and logs what it says.

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
