//! What provisioned instances cost, and to whom: each instance's life (requested to
//! terminated, boot and idle included) times its hourly price, split into its boot (requested
//! to its agent connected), the attempts it ran (attributed to their steps) and the rest
//! (idle). Pure: the caller reads the instances and attempts from the state database.

use std::collections::BTreeMap;

/// One instance's life, in milliseconds since the epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Life {
    /// Its id, which is also its agent's.
    pub id: String,
    pub price_per_hour: f64,
    pub requested_ms: u64,
    pub joined_ms: Option<u64>,
    /// `None`: still alive (counted to `now`).
    pub ended_ms: Option<u64>,
}

/// One attempt on an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub step: String,
    pub agent: String,
    pub from_ms: u64,
    /// `None`: still running (counted to `now`).
    pub to_ms: Option<u64>,
}

/// A cost, split.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Cost {
    pub total: f64,
    /// Instance time spent running steps.
    pub steps: f64,
    /// Requested to the agent connected.
    pub boot: f64,
    /// Connected, running nothing.
    pub idle: f64,
    /// Each step's share, most expensive first.
    pub by_step: Vec<(String, f64)>,
}

const MS_PER_HOUR: f64 = 3_600_000.0;

/// Total length of the union of `spans` (sorted or not), each clipped to `[lo, hi]`.
fn union_ms(mut spans: Vec<(u64, u64)>, lo: u64, hi: u64) -> u64 {
    spans.sort_unstable();
    let (mut total, mut cur): (u64, Option<(u64, u64)>) = (0, None);
    for (a, b) in spans {
        let (a, b) = (a.clamp(lo, hi), b.clamp(lo, hi));
        if a >= b {
            continue;
        }
        cur = match cur {
            Some((ca, cb)) if a <= cb => Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                total += cb - ca;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    total + cur.map_or(0, |(a, b)| b - a)
}

/// What `instances` cost up to `now_ms`, with the `attempts` they ran.
pub fn attribute(instances: &[Life], attempts: &[Span], now_ms: u64) -> Cost {
    let mut cost = Cost::default();
    let mut by_step: BTreeMap<String, f64> = BTreeMap::new();
    for i in instances {
        let end = i.ended_ms.unwrap_or(now_ms).max(i.requested_ms);
        let price = i.price_per_hour.max(0.0);
        let of = |ms: u64| ms as f64 * price / MS_PER_HOUR;
        let life = end - i.requested_ms;
        let joined = i.joined_ms.unwrap_or(end).clamp(i.requested_ms, end);
        let boot = joined - i.requested_ms;
        let mine: Vec<&Span> = attempts.iter().filter(|a| a.agent == i.id).collect();
        let busy =
            union_ms(mine.iter().map(|a| (a.from_ms, a.to_ms.unwrap_or(now_ms))).collect(), joined, end);
        let idle = life - boot - busy;
        cost.total += of(life);
        cost.boot += of(boot);
        cost.idle += of(idle);
        cost.steps += of(busy);
        // The busy time's cost is shared by the attempts in proportion to their own time (they
        // may overlap on an agent with several slots).
        let lens: Vec<u64> = mine
            .iter()
            .map(|a| {
                a.to_ms.unwrap_or(now_ms).clamp(joined, end).saturating_sub(a.from_ms.clamp(joined, end))
            })
            .collect();
        let sum: u64 = lens.iter().sum();
        if sum > 0 {
            for (a, len) in mine.iter().zip(lens) {
                *by_step.entry(a.step.clone()).or_default() += of(busy) * len as f64 / sum as f64;
            }
        }
    }
    cost.by_step = by_step.into_iter().collect();
    cost.by_step.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    cost
}

/// What the priced instances of `run` (every run: `None`) cost up to now, from the state
/// database.
pub fn load(state: &crate::persist::state::State, run: Option<&str>) -> anyhow::Result<Cost> {
    let mut finished: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    let mut lives = Vec::new();
    for i in state.instances(false)? {
        if run.is_some() && i.run_id.as_deref() != run {
            continue;
        }
        let Some(price_per_hour) = i.price_per_hour else { continue };
        // An instance never recorded as terminated (a terminate that failed, a coordinator
        // gone since) counts to its last update once its run is over, not forever.
        let run_over = match &i.run_id {
            Some(r) => match finished.get(r) {
                Some(&f) => f,
                None => {
                    let f = state.run(r)?.is_some_and(|rec| rec.state != "running");
                    finished.insert(r.clone(), f);
                    f
                }
            },
            None => false,
        };
        let ended_ms = i.ended_ms.or((i.state == "terminated" || run_over).then_some(i.updated_ms));
        lives.push(Life {
            price_per_hour,
            requested_ms: i.created_ms,
            joined_ms: i.joined_ms,
            ended_ms,
            id: i.instance_id,
        });
    }
    let ids: Vec<&str> = lives.iter().map(|l| l.id.as_str()).collect();
    let spans = state
        .attempts_on(&ids)?
        .into_iter()
        .map(|a| Span { step: a.step, agent: a.agent, from_ms: a.dispatched_ms, to_ms: a.finished_ms })
        .collect::<Vec<_>>();
    Ok(attribute(&lives, &spans, crate::persist::state::now_ms()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;

    fn life(id: &str, price: f64, req: u64, joined: Option<u64>, ended: Option<u64>) -> Life {
        Life { id: id.into(), price_per_hour: price, requested_ms: req, joined_ms: joined, ended_ms: ended }
    }

    fn span(step: &str, agent: &str, a: u64, b: Option<u64>) -> Span {
        Span { step: step.into(), agent: agent.into(), from_ms: a, to_ms: b }
    }

    #[test]
    fn boot_steps_and_idle_add_up_to_the_life() {
        // $2/h for 4 h: 1 h booting, 2 h of steps, 1 h idle.
        let i = [life("i1", 2.0, 0, Some(H), Some(4 * H))];
        let a = [
            span("a", "i1", H, Some(2 * H)),
            span("b", "i1", 2 * H, Some(3 * H)),
            span("x", "other", 0, Some(H)),
        ];
        let c = attribute(&i, &a, 10 * H);
        assert_eq!((c.total, c.boot, c.steps, c.idle), (8.0, 2.0, 4.0, 2.0));
        assert_eq!(c.by_step, vec![("a".to_string(), 2.0), ("b".to_string(), 2.0)]);
    }

    #[test]
    fn overlapping_attempts_share_the_time_they_overlap() {
        // Two slots: a runs 2 h, b the second of those hours: 2 h busy, shared 2:1.
        let i = [life("i1", 3.0, 0, Some(0), Some(2 * H))];
        let a = [span("a", "i1", 0, Some(2 * H)), span("b", "i1", H, Some(2 * H))];
        let c = attribute(&i, &a, 2 * H);
        assert_eq!((c.total, c.steps, c.idle), (6.0, 6.0, 0.0));
        assert_eq!(c.by_step, vec![("a".to_string(), 4.0), ("b".to_string(), 2.0)]);
    }

    #[test]
    fn a_live_instance_counts_to_now_and_one_that_never_joined_is_all_boot() {
        let i = [life("i1", 1.0, 0, Some(H), None), life("i2", 1.0, 0, None, Some(H))];
        let a = [span("a", "i1", H, None)];
        let c = attribute(&i, &a, 3 * H);
        assert_eq!((c.total, c.boot, c.steps, c.idle), (4.0, 2.0, 2.0, 0.0));
        // Clock skew (an end before the request, an attempt outside the life) costs nothing.
        let odd = [life("i3", 1.0, 5 * H, Some(4 * H), Some(4 * H))];
        let c = attribute(&odd, &[span("z", "i3", 0, Some(H))], 6 * H);
        assert_eq!(c, Cost { by_step: vec![], ..Default::default() });
    }
}
