//! What an attempt's outcome is worth: whether it succeeded (`judge`), whether its harvested
//! entries may enter the registry (`check_harvest`: only the step's declared outputs, or
//! paths under its write roots for a step that serves its backend, each stored, every link
//! inside the path it belongs to), and writing them back where the pipeline asks
//! (`write_back`).

use std::path::{Path, PathBuf};

use std::collections::HashMap;

use anyhow::{Context, Result};
use protocol::{StepExit, StepOutcome};

use super::sched::AttemptEnd;

pub fn exit_text(o: &StepOutcome) -> String {
    match o.exit {
        StepExit::Exited(c) => format!("exit {c}"),
        StepExit::Signalled(s) => format!("signal {s}"),
        StepExit::TimedOut => "timed out".into(),
        StepExit::Cancelled => "cancelled".into(),
        StepExit::SetupFailed => "setup failed".into(),
        StepExit::HarvestFailed => "harvest failed".into(),
    }
}

/// Checks the registry entries an attempt reports before they are merged: each names one of
/// the step's declared outputs, a snapshot the store holds with that path in it, and no link
/// in it leads outside the declared output once restored at its real path.
pub fn check_harvest(
    store: &dyn crate::store::SnapshotStore,
    step: &str,
    outputs: &[String],
    roots: &[String],
    entries: &[(String, protocol::RegistryEntry)],
) -> std::result::Result<(), String> {
    for (path, e) in entries {
        if !outputs.contains(path) && !under_roots(path, roots) {
            return Err(if roots.is_empty() {
                format!("{path} is not a declared output of step {step}")
            } else {
                format!(
                    "{path} is neither a declared output of step {step} nor under its roots ({})",
                    roots.join(", ")
                )
            });
        }
        let meta = match store.meta(&e.snapshot_id) {
            Ok(Some(m)) => m,
            Ok(None) => return Err(format!("snapshot {} of {path} is not in the store", e.snapshot_id)),
            Err(err) => return Err(format!("reading snapshot {} of {path}: {err:#}", e.snapshot_id)),
        };
        let isp = e.in_snapshot_path.trim_start_matches('/').trim_end_matches('/');
        if meta.size_of(isp).is_none() {
            return Err(format!("snapshot {} holds no {isp} for {path}", e.snapshot_id));
        }
        let mut links = Vec::new();
        for f in &meta.files {
            if matches!(f.kind, transport::tree::EntryKind::Symlink | transport::tree::EntryKind::Hardlink) {
                let Some(t) = &f.target else {
                    return Err(format!(
                        "snapshot {}: the index records no target for the link {}",
                        e.snapshot_id, f.path
                    ));
                };
                if f.kind == transport::tree::EntryKind::Symlink {
                    links.push((PathBuf::from(&f.path), PathBuf::from(t)));
                }
            }
        }
        if let Some((link, target)) = transport::links::first_escape(&links, Path::new(isp)) {
            return Err(format!(
                "snapshot {}: symlink /{} to {} leads outside {path}",
                e.snapshot_id,
                link.display(),
                target.display()
            ));
        }
    }
    Ok(())
}

/// Writes harvested paths to their real places on this host, each beneath the root holding
/// it (else its parent), through the store's verified write-out. Returns the files written.
pub fn write_back(
    store: &dyn crate::store::SnapshotStore,
    roots: &[String],
    entries: &[(String, protocol::RegistryEntry)],
) -> Result<u64> {
    let mut written = 0;
    for (path, e) in entries.iter().filter(|(k, _)| k.starts_with('/')) {
        let dest = Path::new(path);
        let root = roots
            .iter()
            .map(Path::new)
            .find(|r| dest.starts_with(r) && dest != *r)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dest.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/")));
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let stats = store
            .write_out(&e.snapshot_id, &e.in_snapshot_path, dest, &root)
            .with_context(|| format!("writing {path} from snapshot {}", e.snapshot_id))?;
        written += stats.written;
    }
    Ok(written)
}

/// Whether `path` is a normal absolute path at or below one of `roots`.
pub fn under_roots(path: &str, roots: &[String]) -> bool {
    let p = Path::new(path);
    path.starts_with('/')
        && p.components()
            .all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)))
        && roots.iter().any(|r| p.starts_with(r))
}

/// Whose fault an attempt's end is: the command's (its retry budget) or the
/// infrastructure's (the run's).
pub fn judge(step: &crate::pipeline::Step, o: &StepOutcome) -> AttemptEnd {
    let error = o.error.clone().unwrap_or_default();
    match o.exit {
        StepExit::Exited(0) => {
            let produced: HashMap<&str, Option<u64>> =
                o.outputs.iter().map(|(p, s)| (p.as_str(), *s)).collect();
            let missing: Vec<&String> = step
                .outputs
                .iter()
                .filter(|out| !step.no_harvest.contains(out))
                .filter(|out| produced.get(out.as_str()).copied().flatten().is_none())
                .collect();
            match missing.first() {
                None => AttemptEnd::Succeeded,
                Some(m) => {
                    AttemptEnd::CommandFailed(format!("the command succeeded but did not produce {m}"))
                }
            }
        }
        StepExit::Exited(c) => AttemptEnd::CommandFailed(format!("exit {c}")),
        StepExit::Signalled(s) => AttemptEnd::CommandFailed(format!("killed by signal {s}")),
        StepExit::TimedOut => {
            AttemptEnd::CommandFailed(format!("timed out after {}s", step.timeout_secs.unwrap_or(0)))
        }
        StepExit::SetupFailed => AttemptEnd::InfraFailed(format!("setup failed: {error}")),
        StepExit::HarvestFailed => AttemptEnd::InfraFailed(format!("harvest failed: {error}")),
        StepExit::Cancelled => AttemptEnd::InfraFailed(format!("cancelled on the agent: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_normal_paths_strictly_below_a_root_are_under_it() {
        let roots = vec!["/data/run".to_string()];
        assert!(under_roots("/data/run/x", &roots));
        assert!(under_roots("/data/run/a/b", &roots));
        assert!(under_roots("/data/run", &roots), "a directory output may be the root itself");
        assert!(!under_roots("/data/run2/x", &roots), "component-wise, not a string prefix");
        assert!(!under_roots("/data/run/../etc", &roots));
        assert!(!under_roots("data/run/x", &roots));
        assert!(!under_roots("/data/run/x", &[]));
        assert!(!under_roots("p/programs/tool", &roots));
    }
}

/// Bytes as `12 MiB` (or `512 KiB`, `100 B`).
pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 10 << 30 => format!("{} GiB", b >> 30),
        b if b >= 10 << 20 => format!("{} MiB", b >> 20),
        b if b >= 10 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// A peak memory for tables: `-` when not measured (0: an attempt too short to sample).
pub fn peak_text(peak: u64) -> String {
    if peak == 0 { "-".into() } else { human_bytes(peak) }
}

/// What an attempt used, in one line: `cpu 1.02 s user + 0.01 s system, peak memory 210 MiB
/// of 256 MiB requested, read 0 B, written 4096 B (cgroup v1)`.
pub fn usage_text(u: &protocol::ResourceUsage, requested_memory: u64) -> String {
    let mut s = format!(
        "cpu {:.2} s user + {:.2} s system, peak memory {}",
        u.cpu_user_ms as f64 / 1e3,
        u.cpu_system_ms as f64 / 1e3,
        if u.peak_memory_bytes == 0 { "not measured".to_string() } else { human_bytes(u.peak_memory_bytes) }
    );
    if requested_memory > 0 {
        s.push_str(&format!(" of {} requested", human_bytes(requested_memory)));
    }
    s.push_str(&format!(
        ", read {}, written {} ({})",
        human_bytes(u.read_bytes),
        human_bytes(u.write_bytes),
        u.measured_by
    ));
    if u.oom_killed {
        s.push_str(", killed by the out-of-memory killer");
    }
    s
}

/// Why an attempt the out-of-memory killer ended failed.
pub fn oom_reason(u: &protocol::ResourceUsage) -> String {
    match u.memory_limit_bytes {
        Some(l) => format!(
            "killed by the out-of-memory killer: it reached its memory limit of {} (resources.memory)",
            human_bytes(l)
        ),
        None => "killed by the out-of-memory killer".to_string(),
    }
}

/// Why a step's peak memory deserves a warning: above what it requested, or below a quarter
/// of it (its request holds back memory other steps could use). `None` without a request.
pub fn memory_judgement(peak: u64, requested: u64) -> Option<String> {
    // Peak 0: not measured (an attempt shorter than one sample), nothing to judge.
    if requested == 0 || peak == 0 {
        return None;
    }
    if peak > requested {
        Some(format!(
            "used {} of memory at its peak, more than the {} it requested (resources.memory)",
            human_bytes(peak),
            human_bytes(requested)
        ))
    } else if peak < requested / 4 {
        Some(format!(
            "used {} of memory at its peak, less than a quarter of the {} it requested (resources.memory)",
            human_bytes(peak),
            human_bytes(requested)
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod usage_tests {
    use super::*;

    #[test]
    fn memory_is_judged_against_the_request() {
        assert_eq!(memory_judgement(10 << 30, 0), None);
        assert_eq!(memory_judgement(0, 1 << 30), None, "not measured");
        assert!(memory_judgement(300 << 20, 256 << 20).unwrap().contains("more than the 256 MiB"));
        assert!(memory_judgement(60 << 20, 256 << 20).unwrap().contains("less than a quarter"));
        assert_eq!(memory_judgement(64 << 20, 256 << 20), None);
        assert_eq!(memory_judgement(256 << 20, 256 << 20), None);
    }

    #[test]
    fn usage_reads_as_one_line() {
        let u = protocol::ResourceUsage {
            cpu_user_ms: 1020,
            cpu_system_ms: 10,
            peak_memory_bytes: 210 << 20,
            read_bytes: 0,
            write_bytes: 4096,
            measured_by: "cgroup v1".into(),
            memory_limit_bytes: Some(256 << 20),
            oom_killed: true,
        };
        assert_eq!(
            usage_text(&u, 256 << 20),
            "cpu 1.02 s user + 0.01 s system, peak memory 210 MiB of 256 MiB requested, read 0 B, \
             written 4096 B (cgroup v1), killed by the out-of-memory killer"
        );
    }
}
