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
    let mut decisions: Vec<Decision> = p
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if forced.contains(&i) {
                let why = if opts.force.contains(&i) {
                    "forced".to_string()
                } else {
                    "downstream of a forced step".to_string()
                };
                return Decision { action: Action::Run, why };
            }
            if opts.done.contains(&i) {
                return Decision { action: Action::Done, why: "succeeded earlier in this run".into() };
            }
            if s.outputs.is_empty() {
                return Decision { action: Action::Run, why: "declares no outputs".into() };
            }
            let missing: Vec<String> = s.outputs.iter().filter_map(missing_of).collect();
            match missing.first() {
                None => {
                    Decision { action: Action::Skip, why: format!("all {} outputs exist", s.outputs.len()) }
                }
                Some(first) if missing.len() == 1 => Decision { action: Action::Run, why: first.clone() },
                Some(first) => {
                    Decision { action: Action::Run, why: format!("{first} (and {} more)", missing.len() - 1) }
                }
            }
        })
        .collect();
    // Prune from the leaves up, so a chain of steps feeding only skipped ones goes at once.
    let dependents = p.dependents();
    let consumers = consumers(p);
    for i in (0..p.steps.len()).rev() {
        if decisions[i].action != Action::Run || forced.contains(&i) || dependents[i].is_empty() {
            continue;
        }
        let all_skipped =
            dependents[i].iter().all(|&d| matches!(decisions[d].action, Action::Skip | Action::Prune));
        let deliverable = p.steps[i]
            .outputs
            .iter()
            .filter(|o| missing_of(o).is_some())
            .any(|o| consumers.get(o.as_str()).is_none_or(Vec::is_empty));
        if all_skipped && !deliverable {
            let names: Vec<&str> = dependents[i].iter().map(|&d| p.steps[d].name.as_str()).collect();
            decisions[i] = Decision {
                action: Action::Prune,
                why: format!("{}; only needed by {} (not running)", decisions[i].why, names.join(", ")),
            };
        }
    }
    decisions
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
        // d missing: a must run for d, b stays pruned.
        assert_eq!(actions(&plan(&p, &sizes(&[("/c", 3)]), &none)), ["run", "prune", "skip", "run"]);
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
