//! What an attempt uses (CPU time, peak memory, bytes read and written), and its memory
//! limit. With a cgroup of its own when the agent can create one: cgroup v2 where the memory
//! controller is delegated to the agent's cgroup, else the v1 `memory`, `cpuacct` (and
//! `blkio`) hierarchies, which is what many HPC nodes run. The cgroup enforces the step's
//! `resources.memory`, and the kernel's out-of-memory kill of one of its processes is
//! reported as such. Otherwise the attempt's process group is sampled from `/proc` every
//! [`SAMPLE_EVERY`], and the figures are lower bounds (what the group did after the last
//! sample is not seen).
//!
//! The child joins its cgroups before the snippet runs, so nothing it starts escapes them:
//! moved there by the agent while it waits at a gate ([`Join::place`]), or, when it must
//! enter a mount namespace too, between `fork` and `exec` ([`Join::enter`]), or it writes
//! its own pid there first thing (a launcher's fork), or it is born there: a kept cgroup's
//! resident launcher forks it ([`Join::settle`]).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::ResourceUsage;
use tracing::{debug, warn};

/// How often the process group is sampled when there is no cgroup.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Prefix of the attempts' cgroup names.
const PREFIX: &str = "pype-attempt-";
/// Prefix of the cgroups an agent keeps from one attempt to the next (cgroup v1, attempts
/// without a memory limit): `pype-slot-<agent pid>-<random>-<n>`. Creating and removing three cgroups
/// per attempt cost more than an empty step's bash. One is kept only when its attempt left
/// less than [`POOL_LEFTOVER`] charged to it (emptying it with `memory.force_empty` costs
/// more than a new one); the next attempt's counters and peak memory are read as
/// differences from what it found.
const SLOT_PREFIX: &str = "pype-slot-";
/// At most this many cgroups kept per agent.
const POOL_MAX: usize = 64;
/// A cgroup whose ended attempt left this much memory charged to it (page cache of the files
/// it wrote, kernel memory, and what the kernel charged ahead per CPU) beyond its resident's
/// pages is removed rather than kept: the next attempt's peak could be off by as much.
const POOL_LEFTOVER: u64 = 2 << 20;

/// The agent's kept cgroups.
static POOL: Mutex<Vec<Cgroup>> = Mutex::new(Vec::new());
static NEXT_SLOT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// This agent process's part of its kept cgroups' names, `<pid>-<random>`: a later process
/// with the same pid (pid 1 in a container) neither collides with them nor takes them for
/// its own.
fn slot_owner() -> &'static str {
    static OWNER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    OWNER.get_or_init(|| format!("{}-{:08x}", std::process::id(), rand::random::<u32>()))
}

/// The cgroup hierarchies this process can place children in, found once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hierarchies {
    /// cgroup v2: the agent's own cgroup directory, when its memory controller can be used
    /// for children.
    pub v2: Option<PathBuf>,
    /// cgroup v1: the agent's own cgroup directory in each hierarchy.
    pub memory: Option<PathBuf>,
    pub cpuacct: Option<PathBuf>,
    pub blkio: Option<PathBuf>,
}

/// A cgroup mount from `/proc/self/mountinfo`.
struct Mount {
    point: PathBuf,
    /// The cgroup at the mount point (`/` unless a subtree is mounted, as in containers).
    root: String,
    v2: bool,
    controllers: Vec<String>,
}

fn cgroup_mounts(mountinfo: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let f: Vec<&str> = left.split(' ').collect();
        let (Some(root), Some(mount_point)) = (f.get(3), f.get(4)) else { continue };
        let mut r = right.split(' ');
        let (Some(fstype), Some(_source), Some(opts)) = (r.next(), r.next(), r.next()) else { continue };
        let point = PathBuf::from(mount_point.replace("\\040", " "));
        let root = root.replace("\\040", " ");
        match fstype {
            "cgroup2" => out.push(Mount { point, root, v2: true, controllers: Vec::new() }),
            "cgroup" => out.push(Mount {
                point,
                root,
                v2: false,
                controllers: opts.split(',').map(str::to_string).collect(),
            }),
            _ => {}
        }
    }
    out
}

/// A cgroup path as seen from a mount of the subtree `root`.
fn below_root<'a>(path: &'a str, root: &str) -> &'a str {
    if root == "/" {
        return path;
    }
    match path.strip_prefix(root) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ => path,
    }
}

/// This process's cgroup path per v1 controller, and its v2 path (key `""`), from
/// `/proc/self/cgroup`.
fn own_paths(proc_cgroup: &str) -> Vec<(String, String)> {
    proc_cgroup
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            Some((ctrls.to_string(), path.to_string()))
        })
        .collect()
}

/// Joins a mount point and a cgroup path; a path that climbs out is refused.
fn under(mount: &Path, cg: &str) -> Option<PathBuf> {
    let rel = cg.trim_start_matches('/');
    if rel.split('/').any(|c| c == "..") {
        return None;
    }
    Some(if rel.is_empty() { mount.to_path_buf() } else { mount.join(rel) })
}

impl Hierarchies {
    /// From the text of `/proc/self/mountinfo` and `/proc/self/cgroup`.
    pub fn parse(mountinfo: &str, proc_cgroup: &str) -> Self {
        let mounts = cgroup_mounts(mountinfo);
        let own = own_paths(proc_cgroup);
        let mut h = Hierarchies::default();
        for m in &mounts {
            if m.v2 {
                let Some((_, path)) = own.iter().find(|(c, _)| c.is_empty()) else { continue };
                h.v2 = under(&m.point, below_root(path, &m.root));
                continue;
            }
            for (name, slot) in
                [("memory", &mut h.memory), ("cpuacct", &mut h.cpuacct), ("blkio", &mut h.blkio)]
            {
                if !m.controllers.iter().any(|o| o == name) {
                    continue;
                }
                let path = own.iter().find(|(c, _)| c.split(',').any(|x| x == name)).map(|(_, p)| p);
                if let Some(p) = path {
                    *slot = under(&m.point, below_root(p, &m.root));
                }
            }
        }
        h
    }

    /// This process's hierarchies.
    pub fn of_this_process() -> Self {
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let cg = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut h = Self::parse(&mi, &cg);
        // v2 only where children can get the memory controller.
        if let Some(dir) = h.v2.take() {
            let ctrls = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
            if ctrls.split_whitespace().any(|c| c == "memory") {
                match delegate_v2(&dir) {
                    Ok(()) => h.v2 = Some(dir),
                    Err(e) => warn!(
                        cgroup = %dir.display(),
                        "cgroup v2: cannot hand the memory controller to attempt cgroups ({e}); \
                         attempts are sampled from /proc and their memory is not limited"
                    ),
                }
            }
        }
        h
    }

    /// Which hierarchies an attempt's cgroup would use, for the log.
    pub fn describe(&self) -> String {
        match (&self.v2, &self.memory, &self.cpuacct) {
            (Some(d), _, _) => format!("v2 under {}", d.display()),
            (None, Some(m), Some(c)) => format!(
                "v1 under {} and {}{}",
                m.display(),
                c.display(),
                self.blkio.as_ref().map(|b| format!(" and {}", b.display())).unwrap_or_default()
            ),
            _ => "none usable".into(),
        }
    }

    /// The process-wide answer, found once.
    pub fn get() -> &'static Hierarchies {
        static H: std::sync::OnceLock<Hierarchies> = std::sync::OnceLock::new();
        H.get_or_init(Hierarchies::of_this_process)
    }
}

/// Hands the memory (and, where available, cpu and io) controller of the agent's own v2
/// cgroup down to children. cgroup v2 allows that only in a cgroup that holds no process
/// itself, so the agent's processes move first into a leaf beside the attempts' cgroups,
/// `pype-agent` (as under a systemd service with `Delegate=yes`).
fn delegate_v2(own: &Path) -> std::io::Result<()> {
    let enabled = |own: &Path| {
        std::fs::read_to_string(own.join("cgroup.subtree_control"))
            .unwrap_or_default()
            .split_whitespace()
            .any(|c| c == "memory")
    };
    if enabled(own) {
        return Ok(());
    }
    let leaf = own.join("pype-agent");
    match std::fs::create_dir(&leaf) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    // Every process of the agent's cgroup (the agent, and what else shares it) moves.
    let procs = std::fs::read_to_string(own.join("cgroup.procs"))?;
    for pid in procs.split_whitespace() {
        let _ = std::fs::write(leaf.join("cgroup.procs"), pid);
    }
    std::fs::write(own.join("cgroup.subtree_control"), "+memory")?;
    // Each on its own: a controller the parent does not offer must not cost the others.
    for c in ["+cpu", "+io"] {
        let _ = std::fs::write(own.join("cgroup.subtree_control"), c);
    }
    if enabled(own) {
        Ok(())
    } else {
        Err(std::io::Error::other("memory not enabled in cgroup.subtree_control"))
    }
}

/// The attempt's cgroups as a child joins them: itself between `fork` and `exec`
/// ([`Join::enter`]), or moved there by the agent while it waits ([`Join::place`]).
pub struct Join {
    procs: Vec<CString>,
    /// The same files held open by the cgroup, for [`Join::place`].
    open: Vec<Arc<std::fs::File>>,
    /// A kept cgroup's resident (see [`Join::settle`]).
    resident: Option<Arc<Mutex<Option<Resident>>>>,
}

/// The process living in a kept cgroup between attempts (a launcher), held by a pidfd: once
/// it has exited, a process the kernel gives its pid is not taken for it.
struct Resident {
    /// In the agent's pid namespace, as `cgroup.procs` lists it to the agent.
    pid: i32,
    fd: std::os::fd::OwnedFd,
}

impl Resident {
    /// Whether it has not exited, waiting up to `limit` for it to.
    fn alive_after(&self, limit: Duration) -> bool {
        let mut fds = [rustix::event::PollFd::new(&self.fd, rustix::event::PollFlags::IN)];
        let limit = rustix::event::Timespec {
            tv_sec: limit.as_secs() as i64,
            tv_nsec: i64::from(limit.subsec_nanos()),
        };
        // The pidfd turns readable when the process exits. A poll that fails (but for a
        // signal, which is waited again) says nothing: taken as alive, it is spared.
        loop {
            match rustix::event::poll(&mut fds, Some(&limit)) {
                Err(rustix::io::Errno::INTR) => continue,
                Ok(n) => return n == 0,
                Err(_) => return true,
            }
        }
    }

    fn alive(&self) -> bool {
        self.alive_after(Duration::ZERO)
    }

    /// Kills it and waits (at most a second) for it to leave the cgroup.
    fn end(&self) {
        if self.alive() {
            let _ = rustix::process::pidfd_send_signal(&self.fd, rustix::process::Signal::KILL);
            self.alive_after(Duration::from_secs(1));
        }
    }
}

/// A path kept as a C string (for use between `fork` and `exec`) as a `Path` again.
fn c_path(p: &CString) -> &Path {
    Path::new(std::ffi::OsStr::from_bytes(p.as_bytes()))
}

impl Join {
    /// The `cgroup.procs` files to move into.
    pub fn paths(&self) -> Vec<&Path> {
        self.procs.iter().map(c_path).collect()
    }

    /// Moves process `pid` (and its threads) into the cgroups, from the agent.
    pub fn place(&self, pid: u32) -> std::io::Result<()> {
        if self.open.len() == self.procs.len() {
            use std::os::unix::fs::FileExt;
            let pid = pid.to_string();
            for (f, p) in self.open.iter().zip(&self.procs) {
                f.write_at(pid.as_bytes(), 0).map_err(|e| {
                    let path = c_path(p);
                    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                })?;
            }
            return Ok(());
        }
        for p in &self.procs {
            let path = c_path(p);
            std::fs::write(path, pid.to_string())
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        }
        Ok(())
    }

    /// Whether a process of the agent's may live in these cgroups from one attempt to the
    /// next (a kept cgroup): see [`Join::settle`].
    pub fn takes_residents(&self) -> bool {
        self.resident.is_some()
    }

    /// Moves process `pid`, a child of the agent's, into the cgroups to stay: a launcher,
    /// whose forks are then born in them and need not join. Moving a process between
    /// cgroups takes a lock every `fork` and `exit` on the host waits for, which cost empty
    /// steps a sixth of their throughput. The cgroup holds its resident by a pidfd (no pid the
    /// kernel reuses is taken for it), spares it while it has not exited when it kills what
    /// an attempt left behind and when it judges itself empty, leaves its anonymous memory
    /// out of the leftover that decides its keeping, is not kept when it finds it moved out
    /// of any of its directories, and kills it when removed (then removed on a thread of its
    /// own once the resident has exited).
    pub fn settle(&self, pid: u32) -> std::io::Result<()> {
        let slot = self.resident.as_ref().ok_or(std::io::ErrorKind::Unsupported)?;
        let raw = i32::try_from(pid).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let id = rustix::process::Pid::from_raw(raw).ok_or(std::io::ErrorKind::InvalidInput)?;
        let fd = rustix::process::pidfd_open(id, rustix::process::PidfdFlags::empty())?;
        self.place(pid)?;
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Resident { pid: raw, fd });
        Ok(())
    }

    /// Moves the calling process into the cgroups. Only system calls on C strings prepared
    /// before the fork: sound between `fork` and `exec`.
    pub fn enter(&self) -> std::io::Result<()> {
        for p in &self.procs {
            let fd = rustix::fs::open(p.as_c_str(), rustix::fs::OFlags::WRONLY, rustix::fs::Mode::empty())?;
            rustix::io::write(&fd, b"0")?;
        }
        Ok(())
    }
}

/// One attempt's cgroup (its directory in each hierarchy used).
pub struct Cgroup {
    v2: bool,
    dirs: Vec<PathBuf>,
    limit: Option<u64>,
    /// Kept for the next attempt when this one ends (see [`SLOT_PREFIX`]).
    kept: bool,
    /// The counters when this attempt took the cgroup (zero for a new one).
    base: Counters,
    /// Its control files, opened once: a kept cgroup's are read at every attempt's start and
    /// end, and each open is a path walk and a kernfs file set up and torn down again.
    /// Keyed by path and whether opened for writing.
    open: Mutex<std::collections::HashMap<(PathBuf, bool), Arc<std::fs::File>>>,
    /// A control file of it failed to read or write during this attempt.
    failed: std::sync::atomic::AtomicBool,
    /// The agent's child living in it between attempts ([`Join::settle`]).
    resident: Arc<Mutex<Option<Resident>>>,
}

/// What a cgroup counts from its creation on.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Counters {
    cpu_user_ms: u64,
    cpu_system_ms: u64,
    read_bytes: u64,
    write_bytes: u64,
    oom_kills: u64,
    /// Memory charged (v1 `memory.usage_in_bytes`; 0 for a new cgroup).
    memory_bytes: u64,
}

/// A small control file's text, at most [`CONTROL_FILE_MAX`] bytes. Read through `take`,
/// which skips the `statx` a `File` makes to size its buffer (a cgroup file's size reads as 0
/// or a page anyway, and an attempt reads a dozen).
fn read(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path).ok()?.take(CONTROL_FILE_MAX).read_to_string(&mut text).ok()?;
    Some(text)
}

/// The most of a control file [`read`] takes (a `cgroup.procs` of some 100,000 processes).
const CONTROL_FILE_MAX: u64 = 1 << 20;

/// `key value` lines (cpu.stat, memory.events, memory.oom_control, cpuacct.stat).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// io.stat (v2): `MAJ:MIN rbytes=N wbytes=N ...` per device, summed.
fn io_stat_v2(text: &str) -> (u64, u64) {
    let (mut r, mut w) = (0u64, 0u64);
    for field in text.split_whitespace() {
        if let Some(v) = field.strip_prefix("rbytes=") {
            r = r.saturating_add(v.parse().unwrap_or(0));
        } else if let Some(v) = field.strip_prefix("wbytes=") {
            w = w.saturating_add(v.parse().unwrap_or(0));
        }
    }
    (r, w)
}

/// blkio.throttle.io_service_bytes (v1): `MAJ:MIN Read N` / `MAJ:MIN Write N` lines, summed.
fn io_service_v1(text: &str) -> (u64, u64) {
    let (mut r, mut w) = (0u64, 0u64);
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let [_, op, n] = f[..] {
            let n: u64 = n.parse().unwrap_or(0);
            match op {
                "Read" => r = r.saturating_add(n),
                "Write" => w = w.saturating_add(n),
                _ => {}
            }
        }
    }
    (r, w)
}

/// USER_HZ: the unit of cpuacct.stat and /proc/PID/stat times.
const TICKS_PER_SEC: u64 = 100;

impl Cgroup {
    /// Creates the cgroup `pype-attempt-<attempt>` in each usable hierarchy, with `limit` as
    /// its memory limit. `None` when there is none to create it in, or creating it failed
    /// (not root, not delegated): the caller samples instead.
    pub fn create(h: &Hierarchies, attempt: u64, limit: Option<u64>) -> Option<Cgroup> {
        let (v2, parents): (bool, Vec<&PathBuf>) = match (&h.v2, &h.memory, &h.cpuacct) {
            (Some(d), _, _) => (true, vec![d]),
            (None, Some(m), Some(c)) => {
                (false, [Some(m), Some(c), h.blkio.as_ref()].into_iter().flatten().collect())
            }
            _ => return None,
        };
        let kept = !v2 && limit.is_none();
        let name = if kept {
            let n = NEXT_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("{SLOT_PREFIX}{}-{n}", slot_owner())
        } else {
            format!("{PREFIX}{attempt}")
        };
        let mut cg = Cgroup {
            v2,
            dirs: Vec::new(),
            limit,
            kept,
            base: Counters::default(),
            open: Default::default(),
            failed: Default::default(),
            resident: Default::default(),
        };
        for parent in parents {
            let dir = parent.join(&name);
            match std::fs::create_dir(&dir) {
                Ok(()) => cg.dirs.push(dir),
                Err(e) if parent.ends_with("blkio") || h.blkio.as_ref() == Some(parent) => {
                    // I/O accounting is a bonus: without it the figures say 0.
                    debug!(dir = %dir.display(), "no blkio cgroup: {e}");
                }
                Err(e) => {
                    debug!(dir = %dir.display(), "cannot create a cgroup: {e}");
                    return None; // Drop removes what was created.
                }
            }
        }
        if v2 && !cg.dirs[0].join("memory.max").exists() {
            warn!("cgroup v2: the memory controller is not enabled for attempt cgroups");
            return None;
        }
        if let Some(limit) = limit {
            let file = if v2 { "memory.max" } else { "memory.limit_in_bytes" };
            if let Err(e) = std::fs::write(cg.dirs[0].join(file), limit.to_string()) {
                warn!("cannot set the memory limit of {}: {e}", cg.dirs[0].display());
                return None;
            }
            if v2 {
                // No swapping around the limit.
                let _ = std::fs::write(cg.dirs[0].join("memory.swap.max"), "0");
            } else {
                let _ = std::fs::write(cg.dirs[0].join("memory.memsw.limit_in_bytes"), limit.to_string());
            }
        }
        Some(cg)
    }

    pub fn join(&self) -> Join {
        let paths: Vec<PathBuf> = self.dirs.iter().map(|d| d.join("cgroup.procs")).collect();
        let open = paths.iter().filter_map(|p| self.file(p, true)).collect();
        let procs = paths
            .into_iter()
            .filter_map(|p| CString::new(p.into_os_string().into_encoded_bytes()).ok())
            .collect();
        Join { procs, open, resident: self.kept.then(|| self.resident.clone()) }
    }

    fn resident(&self) -> std::sync::MutexGuard<'_, Option<Resident>> {
        self.resident.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pids in a `cgroup.procs` of it; `None` when it cannot be read.
    fn procs(dir: &Path) -> Option<Vec<i32>> {
        let text = read(&dir.join("cgroup.procs"))?;
        Some(text.split_whitespace().filter_map(|p| p.parse().ok()).collect())
    }

    /// The processes in it other than its resident (while that has not exited); `None` when
    /// `cgroup.procs` cannot be read.
    fn others(&self) -> Option<Vec<i32>> {
        let mut pids = Self::procs(self.dirs.first()?)?;
        if let Some(r) = self.resident().as_ref().filter(|r| pids.contains(&r.pid) && r.alive()) {
            pids.retain(|p| *p != r.pid);
        }
        Some(pids)
    }

    /// Whether its resident, if it has a live one, is in each of its directories. One moved
    /// out (by a snippet, or by hand) would start the next attempts outside the cgroup: the
    /// cgroup is then not kept, and its removal ends the resident.
    fn resident_in_place(&self) -> bool {
        let resident = self.resident();
        let Some(r) = resident.as_ref().filter(|r| r.alive()) else { return true };
        self.dirs.iter().all(|d| Self::procs(d).is_some_and(|p| p.contains(&r.pid)))
    }

    /// The anonymous memory of its resident, in bytes (`/proc/PID/statm`: resident less
    /// shared pages), 0 without one.
    fn resident_anon(&self) -> u64 {
        // Only where `/proc` names processes as the agent's pid namespace does.
        static PROC_IS_OURS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let ours = PROC_IS_OURS.get_or_init(|| {
            std::fs::read_link("/proc/self")
                .is_ok_and(|p| p.to_str() == Some(&std::process::id().to_string()))
        });
        let Some(r) = self.resident().as_ref().filter(|r| *ours && r.alive()).map(|r| r.pid) else {
            return 0;
        };
        let statm = std::fs::read_to_string(format!("/proc/{r}/statm")).unwrap_or_default();
        let mut pages = statm.split(' ').skip(1).map(|v| v.parse::<u64>().unwrap_or(0));
        let (rss, shared) = (pages.next().unwrap_or(0), pages.next().unwrap_or(0));
        rss.saturating_sub(shared).saturating_mul(rustix::param::page_size() as u64)
    }

    /// Whether a kept cgroup that holds no process but its resident can be kept for the next
    /// attempt: whole, and little left charged to it.
    fn keepable(&self) -> bool {
        let memory = &self.dirs[0];
        let charged = self.read_u64(&memory.join("memory.usage_in_bytes")).unwrap_or(u64::MAX);
        // Less the anonymous memory of its resident, a launcher, whose own pages came to be
        // charged here as it forked (no more than the anonymous memory charged here at all).
        let anon = keyed(&self.read(&memory.join("memory.stat")).unwrap_or_default(), "rss").unwrap_or(0);
        let left = charged.saturating_sub(anon.min(self.resident_anon()));
        // A cgroup missing one of its directories (removed by hand, or by an agent in another
        // pid namespace) would fail every attempt that took it: not kept. This attempt wrote
        // and read a file in each through files held open, which fail once it is gone.
        let whole = !self.failed.load(std::sync::atomic::Ordering::Relaxed);
        whole && left < POOL_LEFTOVER
    }

    /// `path` held open ([`Cgroup::open`]) for reading or for writing. `None` when it cannot
    /// be opened (a missing file reads as nothing).
    fn file(&self, path: &Path, write: bool) -> Option<Arc<std::fs::File>> {
        let key = (path.to_path_buf(), write);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = open.get(&key) {
            return Some(f.clone());
        }
        let f = if write {
            std::fs::OpenOptions::new().write(true).open(path)
        } else {
            std::fs::File::open(path)
        };
        let f = match f {
            Ok(f) => Arc::new(f),
            Err(_) => {
                // A file this kernel lacks reads as nothing; a directory gone fails the cgroup.
                if path.parent().is_some_and(|d| !d.exists()) {
                    self.failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                return None;
            }
        };
        open.insert(key, f.clone());
        Some(f)
    }

    /// Forgets an open file that failed (opened again next time), and marks the cgroup as
    /// not to be kept: one of its directories may be gone.
    fn forget(&self, path: &Path, write: bool) {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).remove(&(path.to_path_buf(), write));
        self.failed.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A control file's text, through its open file (see [`read`]). Not for `cgroup.procs`,
    /// which is read with [`read`], through a fresh open: v1 keeps the pid list an open file
    /// read first and serves it again, up to a second stale, to later reads through that file.
    fn read(&self, path: &Path) -> Option<String> {
        use std::os::unix::fs::FileExt;
        let f = self.file(path, false)?;
        let mut text = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match f.read_at(&mut chunk, text.len() as u64) {
                Ok(0) => break,
                // A control file is a seq_file: a read comes short only at its end.
                Ok(n) if n < chunk.len() => {
                    text.extend_from_slice(&chunk[..n]);
                    break;
                }
                Ok(n) => text.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.forget(path, false);
                    return None;
                }
            }
            if text.len() as u64 >= CONTROL_FILE_MAX {
                break;
            }
        }
        String::from_utf8(text).ok()
    }

    fn read_u64(&self, path: &Path) -> Option<u64> {
        self.read(path)?.trim().parse().ok()
    }

    /// Writes a control file through its open file.
    fn write(&self, path: &Path, text: &str) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let f = self.file(path, true).ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        f.write_at(text.as_bytes(), 0).map(drop).inspect_err(|_| self.forget(path, true))
    }

    /// No process but its resident is left in it (or it cannot be read: then
    /// [`Cgroup::kill_all`] decides).
    fn is_empty(&self) -> bool {
        self.others().is_some_and(|p| p.is_empty())
    }

    /// Kills whatever is still in the cgroup but its resident (a process that left the
    /// attempt's process group with `setsid` is still here), for at most a second.
    fn kill_all(&self) {
        for _ in 0..100 {
            let pids = self.others().unwrap_or_default();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        warn!(cgroup = %self.dirs[0].display(), "processes of a finished attempt survive SIGKILL");
    }

    /// A cgroup an earlier attempt of this agent left in the pool, made ready: its peak
    /// memory reset (to what is still charged) and its counters taken as this attempt's zero.
    /// `None` when the pool is empty.
    fn from_pool() -> Option<Cgroup> {
        loop {
            let mut cg = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
            // Gone (removed by hand): dropped, and the next one tried.
            if cg.write(&cg.dirs[0].join("memory.max_usage_in_bytes"), "0").is_err() {
                continue;
            }
            cg.base = cg.counters();
            cg.base.memory_bytes = cg.read_u64(&cg.dirs[0].join("memory.usage_in_bytes")).unwrap_or(0);
            if cg.failed.load(std::sync::atomic::Ordering::Relaxed) {
                continue; // One of its other directories is gone.
            }
            return Some(cg);
        }
    }

    /// Puts a kept cgroup whose attempt ended back in the pool; one with a process left, or
    /// [`POOL_LEFTOVER`] or more still charged, is removed instead (dropped).
    fn release(self) {
        if !self.kept {
            return;
        }
        if self.is_empty() && self.keepable() && self.resident_in_place() {
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < POOL_MAX {
                pool.push(self);
            }
        }
    }

    /// The counters as they stand (from the cgroup's creation on).
    fn counters(&self) -> Counters {
        let mut c = Counters::default();
        // v1: the dirs are memory, cpuacct, and blkio when it could be made (`create`); each
        // file is read in its controller's, with no look for it first (a missing one reads
        // as nothing).
        let file = |name: &str| {
            let i = if name.starts_with("memory.") {
                0
            } else if name.starts_with("cpuacct.") {
                1
            } else {
                2
            };
            self.dirs.get(i).map(|d| d.join(name))
        };
        if self.v2 {
            let d = &self.dirs[0];
            let cpu = self.read(&d.join("cpu.stat")).unwrap_or_default();
            c.cpu_user_ms = keyed(&cpu, "user_usec").unwrap_or(0) / 1000;
            c.cpu_system_ms = keyed(&cpu, "system_usec").unwrap_or(0) / 1000;
            c.oom_kills =
                keyed(&self.read(&d.join("memory.events")).unwrap_or_default(), "oom_kill").unwrap_or(0);
            (c.read_bytes, c.write_bytes) = io_stat_v2(&self.read(&d.join("io.stat")).unwrap_or_default());
        } else {
            match (
                file("cpuacct.usage_user").and_then(|p| self.read_u64(&p)),
                file("cpuacct.usage_sys").and_then(|p| self.read_u64(&p)),
            ) {
                (Some(user), Some(sys)) => {
                    c.cpu_user_ms = user / 1_000_000;
                    c.cpu_system_ms = sys / 1_000_000;
                }
                _ => {
                    let stat = file("cpuacct.stat").and_then(|p| self.read(&p)).unwrap_or_default();
                    c.cpu_user_ms = keyed(&stat, "user").unwrap_or(0).saturating_mul(1000) / TICKS_PER_SEC;
                    c.cpu_system_ms =
                        keyed(&stat, "system").unwrap_or(0).saturating_mul(1000) / TICKS_PER_SEC;
                }
            }
            let oom = file("memory.oom_control").and_then(|p| self.read(&p)).unwrap_or_default();
            c.oom_kills = keyed(&oom, "oom_kill").unwrap_or(0);
            let io = file("blkio.throttle.io_service_bytes_recursive")
                .and_then(|p| self.read(&p))
                .or_else(|| file("blkio.throttle.io_service_bytes").and_then(|p| self.read(&p)))
                .unwrap_or_default();
            (c.read_bytes, c.write_bytes) = io_service_v1(&io);
        }
        c
    }

    /// What the cgroup counted during this attempt.
    pub fn usage(&self) -> ResourceUsage {
        let now = self.counters();
        let b = self.base;
        let peak = if self.v2 { "memory.peak" } else { "memory.max_usage_in_bytes" };
        ResourceUsage {
            measured_by: if self.v2 { "cgroup v2" } else { "cgroup v1" }.into(),
            memory_limit_bytes: self.limit,
            cpu_user_ms: now.cpu_user_ms.saturating_sub(b.cpu_user_ms),
            cpu_system_ms: now.cpu_system_ms.saturating_sub(b.cpu_system_ms),
            // From the charge the attempt found (under a MiB, see POOL_LEFTOVER) to its peak.
            peak_memory_bytes: self
                .read_u64(&self.dirs[0].join(peak))
                .unwrap_or(0)
                .saturating_sub(b.memory_bytes),
            read_bytes: now.read_bytes.saturating_sub(b.read_bytes),
            write_bytes: now.write_bytes.saturating_sub(b.write_bytes),
            oom_killed: now.oom_kills > b.oom_kills,
        }
    }
}

impl Drop for Cgroup {
    /// Removes the cgroup. Its processes are gone by now (the group was killed); a cgroup
    /// still busy for a moment is tried again briefly, then left (the next start sweeps it).
    /// One with a live resident is removed on a thread of its own, once the resident (killed)
    /// has exited: the async threads do not wait for it.
    fn drop(&mut self) {
        // Closed before the directories go.
        self.open.get_mut().unwrap_or_else(|p| p.into_inner()).clear();
        let dirs = std::mem::take(&mut self.dirs);
        match self.resident().take().filter(Resident::alive) {
            None => remove_dirs(&dirs),
            Some(r) => {
                let removal = std::thread::Builder::new().name("cgroup-removal".into()).spawn(move || {
                    r.end();
                    remove_dirs(&dirs);
                });
                if let Err(e) = removal {
                    warn!("cannot remove a cgroup with its launcher: {e}");
                }
            }
        }
    }
}

/// Removes a cgroup's directories, each tried again for a moment while busy.
fn remove_dirs(dirs: &[PathBuf]) {
    for d in dirs {
        for _ in 0..20 {
            match std::fs::remove_dir(d) {
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => break,
            }
        }
    }
}

/// Removes the empty attempt cgroups a killed agent left behind.
pub fn sweep(h: &Hierarchies) {
    for parent in [&h.v2, &h.memory, &h.cpuacct, &h.blkio].into_iter().flatten() {
        let Ok(rd) = std::fs::read_dir(parent) else { continue };
        for e in rd.flatten() {
            // Only one a minute old: another agent on this host may have just made its own.
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60));
            let name = e.file_name().to_string_lossy().into_owned();
            // A kept cgroup goes with its agent: once that process is gone, or when this
            // process has its pid (it is not this process's own).
            let orphan = name.strip_prefix(SLOT_PREFIX).is_some_and(|rest| {
                let mut it = rest.split('-');
                let (pid, token) = (it.next().and_then(|p| p.parse::<u32>().ok()), it.next());
                match pid {
                    Some(pid) if pid == std::process::id() => {
                        token.is_none_or(|t| !slot_owner().ends_with(&format!("-{t}")))
                    }
                    Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
                    None => false,
                }
            });
            if (name.starts_with(PREFIX) && old) || orphan {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

/// The process group's figures from `/proc`, the largest seen so far.
#[derive(Debug, Default, Clone)]
pub struct Sampled {
    /// Looks taken: none for an attempt shorter than one interval.
    samples: u64,
    cpu_ticks_user: u64,
    cpu_ticks_system: u64,
    peak_rss: u64,
    read: u64,
    write: u64,
}

/// Per process group: (user ticks, system ticks, resident bytes, read bytes, write bytes).
type Figures = (u64, u64, u64, u64, u64);

/// One look at every process in `/proc`, summed per process group of `groups`. A process's
/// figures include its waited-for children.
fn scan(groups: &std::collections::HashSet<i32>, page: u64) -> std::collections::HashMap<i32, Figures> {
    let mut out: std::collections::HashMap<i32, Figures> = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let Some(stat) = read(&Path::new("/proc").join(pid).join("stat")) else { continue };
        // Fields after the command's closing parenthesis: state is field 3.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let Some(pgid) = f.get(5 - 3).and_then(|v| v.parse::<i32>().ok()).filter(|g| groups.contains(g))
        else {
            continue;
        };
        let g = out.entry(pgid).or_default();
        g.0 = g.0.saturating_add(num(14).saturating_add(num(16)));
        g.1 = g.1.saturating_add(num(15).saturating_add(num(17)));
        g.2 = g.2.saturating_add(num(24).saturating_mul(page));
        if let Some(io) = read(&Path::new("/proc").join(pid).join("io")) {
            let kv = |k: &str| {
                io.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u64>().ok())
            };
            g.3 = g.3.saturating_add(kv("rchar:").unwrap_or(0));
            g.4 = g.4.saturating_add(kv("wchar:").unwrap_or(0));
        }
    }
    out
}

/// The agent's one sampler: a scan of `/proc` per [`SAMPLE_EVERY`] for all the process groups
/// being measured at once, not one per attempt.
#[derive(Default)]
struct Sampler {
    groups: Mutex<std::collections::HashMap<i32, Arc<Mutex<Sampled>>>>,
    running: std::sync::atomic::AtomicBool,
}

static SAMPLER: std::sync::LazyLock<Sampler> = std::sync::LazyLock::new(Sampler::default);

impl Sampler {
    fn add(&'static self, pgid: i32, sampled: Arc<Mutex<Sampled>>) {
        self.groups.lock().unwrap_or_else(|p| p.into_inner()).insert(pgid, sampled);
        if self.running.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let page = rustix::param::page_size() as u64;
        tokio::spawn(async move {
            loop {
                // First look after one interval: a step shorter than that costs no scan of /proc.
                tokio::time::sleep(SAMPLE_EVERY).await;
                let groups: Vec<(i32, Arc<Mutex<Sampled>>)> = {
                    let g = self.groups.lock().unwrap_or_else(|p| p.into_inner());
                    g.iter().map(|(k, v)| (*k, v.clone())).collect()
                };
                if groups.is_empty() {
                    continue;
                }
                let wanted = groups.iter().map(|(g, _)| *g).collect();
                let Ok(figures) = tokio::task::spawn_blocking(move || scan(&wanted, page)).await else {
                    continue;
                };
                for (pgid, sampled) in groups {
                    let Some(s) = figures.get(&pgid) else { continue };
                    let mut m = sampled.lock().unwrap_or_else(|p| p.into_inner());
                    m.samples += 1;
                    m.cpu_ticks_user = m.cpu_ticks_user.max(s.0);
                    m.cpu_ticks_system = m.cpu_ticks_system.max(s.1);
                    m.peak_rss = m.peak_rss.max(s.2);
                    m.read = m.read.max(s.3);
                    m.write = m.write.max(s.4);
                }
            }
        });
    }

    fn remove(&self, pgid: i32) {
        self.groups.lock().unwrap_or_else(|p| p.into_inner()).remove(&pgid);
    }
}

/// How one attempt is measured.
pub enum Meter {
    Cgroup(Cgroup),
    Procfs { sampled: Arc<Mutex<Sampled>>, pgid: std::sync::atomic::AtomicI32 },
}

impl Meter {
    /// A cgroup when `use_cgroups` and one can be created, else sampling.
    pub fn new(use_cgroups: bool, attempt: u64, memory_limit: Option<u64>) -> Meter {
        if use_cgroups {
            let kept = if memory_limit.is_none() { Cgroup::from_pool() } else { None };
            if let Some(cg) = kept.or_else(|| Cgroup::create(Hierarchies::get(), attempt, memory_limit)) {
                return Meter::Cgroup(cg);
            }
        }
        Meter::Procfs { sampled: Default::default(), pgid: Default::default() }
    }

    /// The attempt's cgroup (its memory one under v1), if it has one.
    #[cfg(test)]
    pub(crate) fn cgroup_dir(&self) -> Option<&Path> {
        match self {
            Meter::Cgroup(cg) => cg.dirs.first().map(PathBuf::as_path),
            Meter::Procfs { .. } => None,
        }
    }

    /// What the child must do between `fork` and `exec`.
    pub fn join(&self) -> Option<Join> {
        match self {
            Meter::Cgroup(cg) => Some(cg.join()),
            Meter::Procfs { .. } => None,
        }
    }

    /// The snippet started as process group `pgid`.
    pub fn started(&self, pgid: i32) {
        let Meter::Procfs { sampled, pgid: mine } = self else { return };
        mine.store(pgid, std::sync::atomic::Ordering::Relaxed);
        SAMPLER.add(pgid, sampled.clone());
    }

    /// Whether [`Meter::finish`] may wait: a cgroup with processes left (killed, then waited
    /// for); sampling's, and an empty cgroup's (the common end), do not.
    pub fn finish_may_block(&self) -> bool {
        match self {
            Meter::Cgroup(cg) => !cg.is_empty(),
            Meter::Procfs { .. } => false,
        }
    }

    /// The attempt's figures, once its processes are gone.
    /// May block (see [`Meter::finish_may_block`]): then call it off the async threads.
    pub fn finish(self) -> ResourceUsage {
        match self {
            Meter::Cgroup(cg) => {
                cg.kill_all();
                let u = cg.usage();
                cg.release();
                u
            }
            Meter::Procfs { sampled, pgid } => {
                SAMPLER.remove(pgid.load(std::sync::atomic::Ordering::Relaxed));
                let s = sampled.lock().unwrap_or_else(|p| p.into_inner()).clone();
                ResourceUsage {
                    cpu_user_ms: s.cpu_ticks_user.saturating_mul(1000) / TICKS_PER_SEC,
                    cpu_system_ms: s.cpu_ticks_system.saturating_mul(1000) / TICKS_PER_SEC,
                    // 0 when never sampled: the coordinator takes it as not measured.
                    peak_memory_bytes: s.peak_rss,
                    read_bytes: s.read,
                    write_bytes: s.write,
                    measured_by: "procfs".into(),
                    memory_limit_bytes: None,
                    oom_killed: false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
24 30 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
25 24 0:23 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
26 24 0:24 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
27 24 0:25 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
28 24 0:26 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
29 24 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const CGROUP_V1: &str = "\
7:blkio:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn finds_each_v1_hierarchy_at_this_process_own_path() {
        let h = Hierarchies::parse(MOUNTINFO_V1, CGROUP_V1);
        assert_eq!(h.memory.as_deref(), Some(Path::new("/sys/fs/cgroup/memory/process_api/abc")));
        assert_eq!(h.cpuacct.as_deref(), Some(Path::new("/sys/fs/cgroup/cpuacct")));
        assert_eq!(h.blkio.as_deref(), Some(Path::new("/sys/fs/cgroup/blkio")));
        assert_eq!(h.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn a_combined_cpu_cpuacct_hierarchy_and_a_pure_v2_host() {
        let mi = "30 24 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let h = Hierarchies::parse(mi, "3:cpu,cpuacct:/slurm/job_1\n");
        assert_eq!(h.cpuacct.as_deref(), Some(Path::new("/sys/fs/cgroup/cpu,cpuacct/slurm/job_1")));
        let v2 = Hierarchies::parse(
            "35 24 0:29 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n",
            "0::/system.slice/pype-agent.service\n",
        );
        assert_eq!(v2.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/system.slice/pype-agent.service")));
        assert_eq!(v2.memory, None);
        // A path that climbs out of the mount is not taken.
        let bad =
            Hierarchies::parse("35 24 0:29 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "0::/../../etc\n");
        assert_eq!(bad.v2, None);
    }

    #[test]
    fn reads_cgroup_files() {
        assert_eq!(
            keyed("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n", "system_usec"),
            Some(500000)
        );
        assert_eq!(keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n", "oom_kill"), Some(1));
        assert_eq!(
            io_stat_v2("8:0 rbytes=4096 wbytes=8192 rios=1 wios=2\n8:16 rbytes=1 wbytes=0\n"),
            (4097, 8192)
        );
        assert_eq!(
            io_service_v1("8:0 Read 100\n8:0 Write 50\n8:0 Sync 0\n8:0 Total 150\nTotal 150\n"),
            (100, 50)
        );
    }
}
