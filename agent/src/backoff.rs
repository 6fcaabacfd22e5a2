//! How long the agent waits before reconnecting: jittered exponential backoff between a
//! minimum and a maximum, started afresh after a session that lasted, and the maximum at once
//! when the coordinator refused this agent's certificate (reconnecting at full rate would only
//! be refused again, and fill the coordinator's log). A state machine: the session loop tells
//! it how the last attempt ended and sleeps what it answers.

use std::time::Duration;

/// How the last attempt to hold a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A session was up (or an attempt failed) after this long.
    After(Duration),
    /// The coordinator refused this agent's certificate at the TLS handshake.
    CertificateRefused,
}

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Self { min, max, next: min }
    }

    /// The wait before the next attempt; `jitter` in [0, 1) scales it to between half and all
    /// of the current step.
    pub fn after(&mut self, ended: Ended, jitter: f64) -> Duration {
        match ended {
            Ended::CertificateRefused => {
                self.next = self.max;
                return self.max;
            }
            // A session that lasted a while starts the backoff afresh.
            Ended::After(lasted) if lasted > self.max => self.next = self.min,
            Ended::After(_) => {}
        }
        let wait = self.next.mul_f64(0.5 + jitter.clamp(0.0, 1.0) * 0.5);
        self.next = (self.next * 2).min(self.max);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_maximum_and_resets_after_a_long_session() {
        let mut b = Backoff::new(50 * MS, 1000 * MS);
        let waits: Vec<Duration> = (0..7).map(|_| b.after(Ended::After(10 * MS), 1.0)).collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1000, 1000].map(|m| m * MS));
        assert_eq!(b.after(Ended::After(2000 * MS), 1.0), 50 * MS);
        assert_eq!(b.after(Ended::After(10 * MS), 0.0), 50 * MS);
    }

    #[test]
    fn a_refused_certificate_waits_the_maximum_at_once() {
        let mut b = Backoff::new(50 * MS, 1000 * MS);
        assert_eq!(b.after(Ended::CertificateRefused, 0.0), 1000 * MS);
        assert_eq!(b.after(Ended::CertificateRefused, 0.0), 1000 * MS);
        // A plain failure next stays at the maximum step.
        assert_eq!(b.after(Ended::After(10 * MS), 1.0), 1000 * MS);
        // Only a session that lasted starts over.
        assert_eq!(b.after(Ended::After(1500 * MS), 1.0), 50 * MS);
    }
}
