//! Host facts from sysinfo. This is the only module that names sysinfo.

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

/// Free space of the filesystem holding `path` (the disk with the longest matching mount point).
pub fn free_bytes(path: &Path) -> u64 {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let disks = sysinfo::Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.available_space())
        .unwrap_or(0)
}

pub fn available_memory() -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.available_memory()
}

pub fn load_average() -> f64 {
    sysinfo::System::load_average().one
}
