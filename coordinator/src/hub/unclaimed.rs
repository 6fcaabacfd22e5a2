//! Results of attempts nobody waits for yet: an agent reporting to a restarted coordinator
//! before its resumed run adopts the attempt. Kept with the agent that sent each one (only
//! that agent's result is handed over), bounded in count and in bytes, the oldest evicted
//! first, so an agent cannot grow the coordinator's memory by sending results for attempts
//! that do not exist.

use std::collections::{BTreeMap, HashMap};

use protocol::StepOutcome;

/// Bounds of [`Unclaimed`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_results: usize,
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_results: 4096, max_bytes: 64 << 20 }
    }
}

struct Kept {
    agent: String,
    outcome: StepOutcome,
    bytes: usize,
    seq: u64,
}

#[derive(Default)]
pub struct Unclaimed {
    limits: Limits,
    by_attempt: HashMap<u64, Kept>,
    /// Arrival order: sequence number -> attempt id.
    order: BTreeMap<u64, u64>,
    bytes: usize,
    next_seq: u64,
}

/// Roughly what a result holds in memory: its strings and entries.
pub fn size_of(outcome: &StepOutcome) -> usize {
    let entries: usize = outcome
        .new_entries
        .iter()
        .map(|(k, e)| {
            k.len()
                + e.snapshot_id.len()
                + e.in_snapshot_path.len()
                + e.bind_path.as_ref().map_or(0, String::len)
                + e.produced_by.as_ref().map_or(0, |p| p.run.len() + p.step.len())
                + 96
        })
        .sum();
    let outputs: usize = outcome.outputs.iter().map(|(p, _)| p.len() + 40).sum();
    std::mem::size_of::<StepOutcome>()
        + outputs
        + outcome.backend.len()
        + outcome.error.as_ref().map_or(0, String::len)
        + entries
}

impl Unclaimed {
    pub fn new(limits: Limits) -> Self {
        Self { limits, ..Default::default() }
    }

    /// Keeps `outcome` from `agent`, evicting the oldest results until both bounds hold, and
    /// returns how many were evicted. Refused: a result for an attempt another agent's result
    /// is kept for, or one larger than the whole byte bound.
    pub fn insert(&mut self, agent: &str, outcome: StepOutcome) -> Result<usize, String> {
        let attempt = outcome.attempt_id;
        if let Some(k) = self.by_attempt.get(&attempt)
            && k.agent != agent
        {
            return Err(format!("agent {} sent a result for attempt {attempt} first", k.agent));
        }
        self.remove(attempt);
        let bytes = size_of(&outcome) + agent.len();
        if bytes > self.limits.max_bytes || self.limits.max_results == 0 {
            return Err(format!("{bytes} bytes, over the bound of {} bytes", self.limits.max_bytes));
        }
        let mut evicted = 0;
        while self.by_attempt.len() + 1 > self.limits.max_results
            || self.bytes + bytes > self.limits.max_bytes
        {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            if let Some(k) = self.by_attempt.remove(&oldest) {
                self.bytes -= k.bytes;
                evicted += 1;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, attempt);
        self.bytes += bytes;
        self.by_attempt.insert(attempt, Kept { agent: agent.to_string(), outcome, bytes, seq });
        Ok(evicted)
    }

    /// The result of `attempt` if `agent` sent it; a result another agent sent stays (and is
    /// reported as `Err` with that agent's id).
    pub fn take(&mut self, attempt: u64, agent: &str) -> Result<Option<StepOutcome>, String> {
        match self.by_attempt.get(&attempt) {
            None => Ok(None),
            Some(k) if k.agent != agent => Err(k.agent.clone()),
            Some(_) => Ok(self.remove(attempt)),
        }
    }

    fn remove(&mut self, attempt: u64) -> Option<StepOutcome> {
        let k = self.by_attempt.remove(&attempt)?;
        self.order.remove(&k.seq);
        self.bytes -= k.bytes;
        Some(k.outcome)
    }

    pub fn len(&self) -> usize {
        self.by_attempt.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_attempt.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::RegistryEntry;

    fn outcome(attempt: u64, entries: usize) -> StepOutcome {
        let mut o = StepOutcome {
            attempt_id: attempt,
            exit: protocol::StepExit::Exited(0),
            error: None,
            backend: "snapshot".into(),
            outputs: Vec::new(),
            new_entries: Vec::new(),
            elapsed_ms: 1,
        };
        for i in 0..entries {
            o.new_entries.push((
                format!("/data/out/{i:08}"),
                RegistryEntry {
                    snapshot_id: "snap-0123456789abcdef0123456789abcdef".into(),
                    in_snapshot_path: format!("data/out/{i:08}"),
                    bind_path: None,
                    produced_by: None,
                },
            ));
        }
        o
    }

    #[test]
    fn bounded_in_bytes_oldest_first() {
        let one = size_of(&outcome(1, 100)) + "a".len();
        let mut u = Unclaimed::new(Limits { max_results: 1000, max_bytes: one * 3 });
        for id in 1..=3 {
            assert_eq!(u.insert("a", outcome(id, 100)), Ok(0));
        }
        assert_eq!((u.len(), u.bytes()), (3, one * 3));
        // A fourth pushes out the first only.
        assert_eq!(u.insert("a", outcome(4, 100)), Ok(1));
        assert_eq!(u.take(1, "a"), Ok(None));
        assert!(u.take(2, "a").unwrap().is_some());
        // One big result pushes out as many as it needs, oldest first.
        let big = outcome(5, 250);
        assert_eq!(u.insert("a", big), Ok(2));
        assert_eq!(u.len(), 1);
        assert!(u.bytes() <= one * 3);
        // A result over the whole bound is not kept, and evicts nothing.
        assert!(u.insert("a", outcome(6, 1000)).is_err());
        assert_eq!(u.take(6, "a"), Ok(None));
        assert!(u.take(5, "a").unwrap().is_some());
        assert_eq!((u.len(), u.bytes()), (0, 0));
    }

    #[test]
    fn bounded_in_count() {
        let mut u = Unclaimed::new(Limits { max_results: 2, max_bytes: usize::MAX });
        for id in 1..=3 {
            u.insert("a", outcome(id, 0)).unwrap();
        }
        assert_eq!(u.len(), 2);
        assert_eq!(u.take(1, "a"), Ok(None));
        // Sending the same attempt again replaces it, no growth.
        u.insert("a", outcome(3, 10)).unwrap();
        assert_eq!(u.len(), 2);
    }

    #[test]
    fn only_the_sender_takes_its_result() {
        let mut u = Unclaimed::new(Limits::default());
        u.insert("honest", outcome(7, 1)).unwrap();
        // A forger can neither take it nor replace it.
        assert!(u.insert("forger", outcome(7, 5)).unwrap_err().contains("agent honest"));
        assert_eq!(u.take(7, "forger"), Err("honest".to_string()));
        assert!(u.take(7, "honest").unwrap().is_some());
        assert!(u.is_empty());
    }
}
