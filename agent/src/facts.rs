//! Host facts from sysinfo (the only module that names it) and statvfs.

use std::path::Path;

use protocol::HostFacts;

pub fn host_facts(work_dir: &Path) -> HostFacts {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    HostFacts {
        hostname: sysinfo::System::host_name().unwrap_or_else(|| "unknown".into()),
        os: sysinfo::System::long_os_version().unwrap_or_else(|| std::env::consts::OS.into()),
        cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        memory_total_bytes: sys.total_memory(),
        memory_available_bytes: sys.available_memory(),
        work_dir: work_dir.display().to_string(),
        work_dir_free_bytes: free_bytes(work_dir),
    }
}

/// Space an unprivileged writer may still use on the filesystem holding `path`: one
/// `statvfs`, whatever else is mounted on the host (the overlays of running steps, say).
pub fn free_bytes(path: &Path) -> u64 {
    rustix::fs::statvfs(path).map(|s| s.f_bavail.saturating_mul(s.f_frsize)).unwrap_or(0)
}

pub fn available_memory() -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.available_memory()
}

pub fn load_average() -> f64 {
    sysinfo::System::load_average().one
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_bytes_is_what_statvfs_gives_the_filesystem_of_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path());
        let out = std::process::Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(dir.path())
            .output()
            .unwrap();
        let df: u64 = String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap();
        // The same figure, give or take what other writers did between the two reads.
        assert!(free.abs_diff(df) < 64 << 20, "statvfs says {free}, df says {df}");
        assert!(free > 0);
        assert_eq!(free_bytes(&dir.path().join("not-there")), 0);
    }
}
