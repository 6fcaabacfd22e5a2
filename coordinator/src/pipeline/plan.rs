//! What a run does with each step before anything is dispatched: run it, skip it (all its
//! declared outputs exist), or prune it (its missing outputs are only needed by steps that are
//! skipped). This is bio-pype's LAYER 2a / 2b skip check and `_prune_upstream_jobs`, with two
//! differences: a zero-byte output counts as present only when the operator says so
//! (`--empty-ok`), and a step is pruned only when none of its missing outputs is a final
//! deliverable (an output no step consumes).

use std::collections::{HashMap, HashSet};

use crate::pipeline::Pipeline;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Run,
    Skip,
    Prune,
    /// Finished earlier in the same run (resume).
    Done,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Run => "run",
            Action::Skip => "skip",
            Action::Prune => "prune",
            Action::Done => "done",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub why: String,
}

#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Steps to run again, with everything downstream of them.
    pub force: Vec<usize>,
    /// Count zero-byte outputs as present.
    pub empty_ok: bool,
    /// Steps that already succeeded in this run.
    pub done: HashSet<usize>,
}

/// Steps downstream of `roots`, the roots included.
pub fn downstream(p: &Pipeline, roots: &[usize]) -> HashSet<usize> {
    let dependents = p.dependents();
    let mut out: HashSet<usize> = HashSet::new();
    let mut stack: Vec<usize> = roots.to_vec();
    while let Some(i) = stack.pop() {
        if out.insert(i) {
            stack.extend(&dependents[i]);
        }
    }
    out
}

/// Decides every step. `sizes` holds what `check_outputs` said about each declared output
/// (absent keys count as missing).
///
/// The steps that run are the smallest set that contains every forced step, every step with a
/// missing final output (one no step consumes) or with no outputs at all, and is closed under
/// two rules: the producer of a missing input of a running step runs; a consumer of an output
/// a running step rewrites runs (its outputs would be stale). Every other step is skipped
/// when all its outputs exist, and pruned otherwise: its missing outputs are only needed by
/// steps that do not run.
pub fn plan(p: &Pipeline, sizes: &HashMap<String, Option<u64>>, opts: &PlanOptions) -> Vec<Decision> {
    let forced = downstream(p, &opts.force);
    let missing_of = |out: &String| -> Option<String> {
        match sizes.get(out).copied().flatten() {
            None => Some(format!("{out} is missing")),
            Some(0) if !opts.empty_ok => {
                Some(format!("{out} is empty (pass --empty-ok to accept empty outputs)"))
            }
            Some(_) => None,
        }
    };
    let consumers = consumers(p);
    let n = p.steps.len();
    let mut why: Vec<Option<String>> = vec![None; n];
    let mut queue: Vec<usize> = Vec::new();
    for (i, s) in p.steps.iter().enumerate() {
        if opts.done.contains(&i) && !forced.contains(&i) {
            continue;
        }
        let reason = if forced.contains(&i) {
            Some(if opts.force.contains(&i) {
                "forced".to_string()
            } else {
                "downstream of a forced step".to_string()
            })
        } else if s.outputs.is_empty() {
            Some("declares no outputs".to_string())
        } else {
            s.outputs
                .iter()
                .filter(|o| consumers.get(o.as_str()).is_none_or(Vec::is_empty))
                .find_map(missing_of)
        };
        if let Some(r) = reason {
            why[i] = Some(r);
            queue.push(i);
        }
    }
    while let Some(i) = queue.pop() {
        let s = &p.steps[i];
        // The producers of its missing inputs must run first.
        for input in &s.inputs {
            if let Some(&j) = p.producers.get(input)
                && why[j].is_none()
                && !opts.done.contains(&j)
                && let Some(m) = missing_of(input)
            {
                why[j] = Some(format!("{m}; step {} needs it", s.name));
                queue.push(j);
            }
        }
        // What it rewrites makes its consumers' outputs stale.
        for out in &s.outputs {
            for &c in consumers.get(out.as_str()).map(Vec::as_slice).unwrap_or(&[]) {
                if why[c].is_none() && !opts.done.contains(&c) {
                    why[c] = Some(format!("its input {out} is made again by step {}", s.name));
                    queue.push(c);
                }
            }
        }
    }
    (0..n)
        .map(|i| {
            if let Some(w) = why[i].take() {
                return Decision { action: Action::Run, why: w };
            }
            if opts.done.contains(&i) {
                return Decision { action: Action::Done, why: "succeeded earlier in this run".into() };
            }
            let s = &p.steps[i];
            let missing: Vec<String> = s.outputs.iter().filter_map(missing_of).collect();
            match missing.first() {
                None => {
                    Decision { action: Action::Skip, why: format!("all {} outputs exist", s.outputs.len()) }
                }
                Some(first) => {
                    let mut users: Vec<&str> = s
                        .outputs
                        .iter()
                        .flat_map(|o| consumers.get(o.as_str()).map(Vec::as_slice).unwrap_or(&[]))
                        .map(|&c| p.steps[c].name.as_str())
                        .collect();
                    users.sort_unstable();
                    users.dedup();
                    Decision {
                        action: Action::Prune,
                        why: format!("{first}; only needed by {} (not running)", users.join(", ")),
                    }
                }
            }
        })
        .collect()
}

fn consumers(p: &Pipeline) -> HashMap<&str, Vec<usize>> {
    let mut out: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, s) in p.steps.iter().enumerate() {
        for input in &s.inputs {
            out.entry(input.as_str()).or_default().push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// a -> b -> c, and a -> d (d's output is a deliverable).
    fn pipeline() -> Pipeline {
        Pipeline::parse(
            Path::new("/p/x.toml"),
            r#"
name = "t"
[[steps]]
name = "a"
command = "true"
outputs = ["/a"]
[[steps]]
name = "b"
command = "true"
inputs = ["/a"]
outputs = ["/b"]
[[steps]]
name = "c"
command = "true"
inputs = ["/b"]
outputs = ["/c"]
[[steps]]
name = "d"
command = "true"
inputs = ["/a"]
outputs = ["/d"]
"#,
        )
        .unwrap()
    }

    fn actions(d: &[Decision]) -> Vec<&'static str> {
        d.iter().map(|d| d.action.as_str()).collect()
    }

    fn sizes(present: &[(&str, u64)]) -> HashMap<String, Option<u64>> {
        present.iter().map(|(p, s)| (p.to_string(), Some(*s))).collect()
    }

    #[test]
    fn skips_and_prunes_upstream_of_skipped_steps() {
        let p = pipeline();
        let none = PlanOptions::default();
        assert_eq!(actions(&plan(&p, &HashMap::new(), &none)), ["run", "run", "run", "run"]);
        // c and d exist: b is only needed by c, a only by b and d: both pruned.
        let d = plan(&p, &sizes(&[("/c", 3), ("/d", 1)]), &none);
        assert_eq!(actions(&d), ["prune", "prune", "skip", "skip"]);
        assert!(d[1].why.contains("/b is missing") && d[1].why.contains("only needed by c"), "{:?}", d[1]);
        // d missing: a must run for d, which makes b's input stale: b and c run again.
        let d = plan(&p, &sizes(&[("/b", 1), ("/c", 3)]), &none);
        assert_eq!(actions(&d), ["run", "run", "run", "run"]);
        assert!(d[0].why.contains("/a is missing; step d needs it"), "{:?}", d[0]);
        assert!(d[1].why.contains("made again by step a"), "{:?}", d[1]);
        // c missing (a final output): c runs; b's output exists, so nothing upstream does.
        let d = plan(&p, &sizes(&[("/b", 1), ("/d", 1)]), &none);
        assert_eq!(actions(&d), ["prune", "skip", "run", "skip"]);
        // Everything there: all skipped.
        let all = sizes(&[("/a", 1), ("/b", 1), ("/c", 1), ("/d", 1)]);
        assert_eq!(actions(&plan(&p, &all, &none)), ["skip", "skip", "skip", "skip"]);
        // Force b: b and c run, the rest skip.
        let force = PlanOptions { force: vec![1], ..Default::default() };
        let d = plan(&p, &all, &force);
        assert_eq!(actions(&d), ["skip", "run", "run", "skip"]);
        assert_eq!(d[2].why, "downstream of a forced step");
    }

    #[test]
    fn empty_outputs_count_only_when_allowed() {
        let p = pipeline();
        let all = sizes(&[("/a", 1), ("/b", 1), ("/c", 0), ("/d", 1)]);
        let d = plan(&p, &all, &PlanOptions::default());
        assert_eq!(actions(&d), ["skip", "skip", "run", "skip"]);
        assert!(d[2].why.contains("--empty-ok"), "{:?}", d[2]);
        let ok = PlanOptions { empty_ok: true, ..Default::default() };
        assert_eq!(actions(&plan(&p, &all, &ok)), ["skip", "skip", "skip", "skip"]);
    }

    #[test]
    fn done_steps_stay_done() {
        let p = pipeline();
        let opts = PlanOptions { done: [0, 1].into_iter().collect(), ..Default::default() };
        assert_eq!(actions(&plan(&p, &HashMap::new(), &opts)), ["done", "done", "run", "run"]);
    }
}
