//! Starts snippets from a warm `bash` instead of a fresh one.
//!
//! Starting `bash` costs an `execve`, the dynamic loader, and glibc's start-up (on a VM, its
//! `cpuid` probes trap to the hypervisor: a quarter of all CPU when steps are empty). A
//! launcher is a `bash` kept running by the agent, one per snippet running at once. For each
//! snippet it forks, and the fork, after setting up what `bash -c` would have been given
//! (output pipes, cgroups, working directory, environment), executes the snippet's script
//! file. That file has no `#!` line, so the kernel refuses it (`ENOEXEC`) and bash does what
//! POSIX asks of it: it runs the file as a new shell in the same process, with its variables,
//! functions, aliases, options and traps reset and the exported environment imported afresh.
//! The snippet gets a process of its own (its own `$$`, its own process group: the launcher
//! forks it under job control, `set -m`), and the start costs a fork instead of an exec.
//!
//! The script file is the attempt's `command.sh` (in its working directory), its first line
//! `set -eo pipefail` and the record of the process group running it, written by the fork. What differs from
//! `bash -c`: `$0` and `BASH_SOURCE` name that file, `$-` lacks `c`, `BASH_SUBSHELL` is 1,
//! bash holds the file open on fd 255 (close-on-exec), bash's own messages name it instead of
//! `bash`, `ps` shows the launcher's command line, and a snippet killed by a signal reports
//! bash's exit code for it (128 + the signal). A stopped snippet is waited for until it
//! continues and ends, as the agent waits for `bash -c`. Whatever the launcher cannot give
//! exactly (a mount namespace, an environment that runs code when bash starts, such as the
//! exported functions of environment modules, a name bash cannot export or gives a meaning of
//! its own) goes to `bash -c`, as does every snippet once launchers failed, one after the
//! other, in ways that are not the snippet's (see [`Refused`]).
//!
//! A launcher that serves a kept cgroup (see `usage.rs`) lives in it: moved there once it
//! has started ([`Request::settle`]), it starts the snippets of the later attempts that hold
//! that cgroup, and its forks are born in it instead of moving there one by one. Moving a
//! process between cgroups takes a lock that every `fork` and `exit` on the host waits for;
//! three moves per empty step cost a sixth of their throughput.
//!
//! The protocol with a launcher (its stdin and stdout are pipes to the agent): the agent
//! writes the script and a request (`<n>.req`, bash that sets the fork up) and then the
//! request's token (random) on a line; the fork checks the token, empties the request file,
//! and writes `pid TOKEN N` once set up; the launcher writes `exit TOKEN C` when the fork
//! ends. `exit` before `pid` means nothing of the snippet ran; other lines are ignored.
//! The fork takes its output pipes by opening the agent's ends (`/proc/<agent>/fd/<fd>`):
//! bash cannot receive a file descriptor any other way.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rustix::process::{Pid, Signal};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe::Receiver;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The launcher (`$1`: its request file), once it says it is ready: forks a subshell per
/// token on stdin that sources
/// the request, in a process group of its own (started under `set -m`), waits for its end
/// with job control off again (so a stop is not taken for an end), and says how it ended,
/// with the token. SIGTERM, SIGINT and SIGHUP sent to everything (a batch system ending the
/// job) end the snippet, not the launcher: trapped signals are reset to their defaults in the
/// fork, and a `wait` they interrupt is waited again. `TMOUT` from the environment must not
/// end the launcher's `read`.
const LOOP: &str = "echo ready\n\
    trap 'sig=1' TERM INT HUP\n\
    while IFS= TMOUT= read -r n; do\n\
    set -m; ( . \"$1\" ) & p=$!; set +m\n\
    while :; do sig=0; wait $p; c=$?; [ $sig = 1 ] || break; done\n\
    echo \"exit $n $c\"\n\
    done\n";

/// Launchers kept idle beyond this many are ended (as many as the cgroups an agent keeps,
/// each of which may have one living in it).
const IDLE_MAX: usize = 64;

/// Launchers that failed to start a snippet, one after the other, before they are given up.
const FAILURES_MAX: u32 = 3;

/// How long a launcher may take to say its fork ended once the fork is gone.
const REPORT_GRACE: Duration = Duration::from_secs(5);

/// Exit codes of a request's set-up steps.
const SETUP_FAILED: i32 = 120;
const CGROUP_FAILED: i32 = 121;
const CWD_FAILED: i32 = 122;

/// The agent's launchers: idle ones wait here between snippets.
pub struct Launchers {
    dir: PathBuf,
    /// The agent's pid as `/proc` names it (which may not be the agent's own pid namespace).
    proc_pid: u32,
    bash: PathBuf,
    /// The launchers' process name (bash's file name) has no `)`: the first `) ` in a fork's
    /// `/proc/PID/stat` ends it, and the shorter pattern finds it sooner.
    plain_name: bool,
    idle: Mutex<Vec<Launcher>>,
    next: AtomicU64,
    /// Launchers that failed one after the other in ways that were not the snippet's; at
    /// [`FAILURES_MAX`] every snippet goes to `bash -c` from then on.
    failures: AtomicU32,
    /// Launchers that could not be moved into a kept cgroup; at [`FAILURES_MAX`] they stay
    /// in the agent's.
    unsettled: AtomicU32,
}

struct Launcher {
    child: Child,
    /// The `cgroup.procs` files of the kept cgroups it lives in ([`Request::settle`]), whose
    /// snippets it forks without joining; empty: the agent's own, and each fork joins.
    home: Vec<PathBuf>,
    requests: ChildStdin,
    status: ChildStdout,
    /// What was read from `status` beyond the last whole line.
    buf: Vec<u8>,
    /// The current request's token: lines about any other are not this snippet's.
    token: u64,
    req: PathBuf,
}

/// The launcher did not start the snippet, and nothing of it ran: start it with `bash -c`.
#[derive(Debug)]
pub struct Refused(pub anyhow::Error);

/// What a snippet is started with.
pub struct Request<'a> {
    pub env: &'a [(String, String)],
    pub cwd: &'a Path,
    /// `cgroup.procs` files the snippet moves itself into before it runs anything.
    pub cgroups: Vec<&'a Path>,
    /// Moves a launcher (its pid) into `cgroups` to stay, when they are kept from one attempt
    /// to the next: the snippets of later attempts in them are then started by that launcher,
    /// and its forks are born there (moving a process between cgroups is costly).
    pub settle: Option<&'a (dyn Fn(u32) -> std::io::Result<()> + Sync)>,
    pub script: &'a str,
    /// Where the fork writes the script and runs it from (`command.sh`: created executable
    /// by the caller, never opened for writing by the agent).
    pub record: &'a Path,
}

/// A snippet a launcher started.
pub struct Running {
    pub pid: i32,
    pub stdout: Option<Receiver>,
    pub stderr: Option<Receiver>,
    /// Readable once the snippet's process is gone (none on kernels before 5.3).
    pidfd: Option<AsyncFd<OwnedFd>>,
    launcher: Option<Launcher>,
    ended: bool,
}

impl Launchers {
    /// Launchers keeping their files in `dir` (emptied first; only the agent's user can read
    /// it: requests hold the snippets' environments), or `None` when scripts there cannot be
    /// executed (a `noexec` mount), `/proc` does not show the agent, or the agent's environment
    /// has `POSIXLY_CORRECT`.
    pub fn new(dir: PathBuf, bash: PathBuf) -> Option<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::remove_dir_all(&dir);
        let probe = dir.join("probe");
        let ok = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).is_ok()
            && std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o700)
                .open(&probe)
                .is_ok()
            && rustix::fs::access(&probe, rustix::fs::Access::EXEC_OK).is_ok();
        if !ok {
            tracing::warn!(dir = %dir.display(), "cannot execute files here: snippets start with bash -c");
            return None;
        }
        // A launcher in POSIX mode would refuse some of the exports a step asks for.
        if std::env::var_os("POSIXLY_CORRECT").is_some() {
            tracing::warn!("POSIXLY_CORRECT is set: snippets start with bash -c");
            return None;
        }
        Some(Self {
            dir: std::fs::canonicalize(&dir).ok()?,
            proc_pid: std::fs::read_link("/proc/self").ok()?.to_str()?.parse().ok()?,
            plain_name: bash.file_name().is_some_and(|n| !n.as_encoded_bytes().contains(&b')')),
            bash,
            idle: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            unsettled: AtomicU32::new(0),
        })
    }

    /// Whether a launcher can start this snippet as `bash -c` would.
    pub fn can_start(&self, req: &Request) -> bool {
        let path = |p: &Path| p.is_absolute() && p.to_str().is_some_and(|s| !s.contains('\0'));
        self.failures.load(Ordering::Relaxed) < FAILURES_MAX
            && req.env.iter().all(|(k, v)| exportable(k) && !special(k) && !v.contains('\0'))
            && !req.script.contains('\0')
            && path(req.cwd)
            && path(req.record)
            && req.cgroups.iter().all(|p| path(p))
    }

    /// Starts the snippet on an idle launcher (or a new one).
    pub async fn start(&self, req: &Request<'_>) -> Result<Running, Refused> {
        // A launcher living in the snippet's cgroups, or a new one settled there.
        let settle = req.settle.filter(|_| self.unsettled.load(Ordering::Relaxed) < FAILURES_MAX);
        let home: &[&Path] = if settle.is_some() { &req.cgroups } else { &[] };
        let mut launcher = match (self.take(home), settle) {
            (Some(l), _) => l,
            (None, None) => self.spawn().map_err(|e| self.failed(e))?,
            (None, Some(settle)) => self.settled(home, settle).await?,
        };
        let joins: &[&Path] = if launcher.lives_in(home) && !home.is_empty() { &[] } else { &req.cgroups };
        let out = std::io::pipe().context("creating the snippet's stdout pipe").map_err(Refused)?;
        let err = std::io::pipe().context("creating the snippet's stderr pipe").map_err(Refused)?;
        launcher.token = rand::random::<u64>() >> 1;
        let fds = (out.1.as_raw_fd(), err.1.as_raw_fd());
        let text = request(req, joins, launcher.token, self.proc_pid, fds, self.plain_name);
        if let Err(e) = std::fs::write(&launcher.req, text) {
            let e = anyhow!(e).context(format!("writing {}", launcher.req.display()));
            self.put(launcher);
            return Err(Refused(e));
        }
        if let Err(e) = launcher.requests.write_all(format!("{}\n", launcher.token).as_bytes()).await {
            return Err(self.failed(anyhow!(e).context("sending a request to a launcher")));
        }
        let said = launcher.said().await;
        // The fork holds its own ends now (or is gone).
        drop((out.1, err.1));
        match said {
            Ok(Said::Pid(pid)) => {
                self.failures.store(0, Ordering::Relaxed);
                let pidfd = Pid::from_raw(pid)
                    .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok())
                    // SAFETY: the `OwnedFd` is moved into the `AsyncFd` and stays open, the same
                    // descriptor, until it is dropped with it.
                    .and_then(|fd| {
                        unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
                    });
                Ok(Running {
                    pid,
                    stdout: Receiver::from_owned_fd(OwnedFd::from(out.0)).ok(),
                    stderr: Receiver::from_owned_fd(OwnedFd::from(err.0)).ok(),
                    pidfd,
                    launcher: Some(launcher),
                    ended: false,
                })
            }
            Ok(Said::Exit(code)) => {
                // The environment it held is not left on disk.
                let _ = std::fs::write(&launcher.req, "");
                let said = read_all(out.0) + &read_all(err.0);
                let why = anyhow!("a launcher could not set the snippet up (exit {code}): {}", said.trim());
                self.put(launcher);
                match code {
                    // The snippet's own directory or cgroup: `bash -c` reports it as before.
                    CGROUP_FAILED | CWD_FAILED => Err(Refused(why)),
                    _ => Err(self.failed(why)),
                }
            }
            Err(e) => {
                let _ = std::fs::write(&launcher.req, "");
                Err(self.failed(e.context("a launcher ended")))
            }
        }
    }

    /// A launcher moved into the kept cgroups `home` to live there: an idle one of the agent's
    /// own cgroups, or a new one once it has started (the memory it touches starting stays
    /// charged to the agent's cgroup, not to the kept one, whose leftover decides its
    /// keeping). One that cannot be moved is ended (part of it may have been), and a new one
    /// starts the snippet; after [`FAILURES_MAX`] such, launchers stay in the agent's cgroups.
    async fn settled(
        &self,
        home: &[&Path],
        settle: &(dyn Fn(u32) -> std::io::Result<()> + Sync),
    ) -> Result<Launcher, Refused> {
        let mut l = match self.take(&[]) {
            Some(l) => l,
            None => {
                let mut l = self.spawn().map_err(|e| self.failed(e))?;
                match l.line().await {
                    Ok(line) if line == "ready" => {}
                    Ok(line) => return Err(self.failed(anyhow!("a new launcher said {line:?}"))),
                    Err(e) => return Err(self.failed(e.context("a new launcher"))),
                }
                l
            }
        };
        match l.child.id().context("a launcher without a pid").and_then(|pid| Ok(settle(pid)?)) {
            Ok(()) => l.home = home.iter().map(|p| p.to_path_buf()).collect(),
            Err(e) => {
                if self.unsettled.fetch_add(1, Ordering::Relaxed) + 1 == FAILURES_MAX {
                    tracing::warn!(
                        "launchers stay in the agent's cgroups: cannot move one into an attempt's: {e:#}"
                    );
                } else {
                    tracing::debug!("cannot move a launcher into an attempt's cgroups: {e:#}");
                }
                drop(l);
                l = self.spawn().map_err(|e| self.failed(e))?;
            }
        }
        Ok(l)
    }

    /// A launcher failed in a way that is not the snippet's; after [`FAILURES_MAX`] in a row,
    /// launchers are given up.
    fn failed(&self, e: anyhow::Error) -> Refused {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n == FAILURES_MAX {
            tracing::warn!("snippets start with bash -c from now on: {e:#}");
        } else {
            tracing::debug!("a launcher failed: {e:#}");
        }
        Refused(e)
    }

    /// An idle launcher living in `home` (the agent's own cgroups when empty).
    fn take(&self, home: &[&Path]) -> Option<Launcher> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let i = idle.iter().rposition(|l| l.lives_in(home))?;
            let mut l = idle.remove(i);
            // Not one its cgroup ended since (see `usage.rs`).
            if matches!(l.child.try_wait(), Ok(None)) {
                return Some(l);
            }
        }
    }

    /// Keeps an idle launcher. Those that ended (their cgroup was removed) are let go (and
    /// reaped); with [`IDLE_MAX`] idle, so is the one idle the longest.
    fn put(&self, launcher: Launcher) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain_mut(|l| matches!(l.child.try_wait(), Ok(None)));
        if idle.len() >= IDLE_MAX {
            idle.remove(0);
        }
        idle.push(launcher);
    }

    fn spawn(&self) -> Result<Launcher> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let req = self.dir.join(format!("{n}.req"));
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&req)
            .with_context(|| format!("creating {}", req.display()))?;
        // `$0` is bash's own path: a snippet's `$BASH` comes from it.
        let mut child = Command::new(&self.bash)
            .arg("-c")
            .arg(LOOP)
            .arg(&self.bash)
            .arg(&req)
            .current_dir(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("starting a launcher")?;
        let requests = child.stdin.take().context("a launcher without stdin")?;
        let status = child.stdout.take().context("a launcher without stdout")?;
        Ok(Launcher { child, home: Vec::new(), requests, status, buf: Vec::new(), token: 0, req })
    }
}

/// A line from a launcher about the current request.
enum Said {
    /// The fork is set up and about to run the snippet, as this process (and group).
    Pid(i32),
    /// The fork ended, with bash's exit code for it.
    Exit(i32),
}

impl Drop for Launcher {
    /// Its request file goes with it.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.req);
    }
}

impl Launcher {
    fn lives_in(&self, home: &[&Path]) -> bool {
        self.home.iter().map(PathBuf::as_path).eq(home.iter().copied())
    }

    /// The next line about the current request; cancel-safe (what was read stays in `buf`).
    async fn said(&mut self) -> Result<Said> {
        loop {
            let line = self.line().await?;
            let mut words = line.split(' ');
            let (kind, token, value) =
                (words.next(), words.next(), words.next().and_then(|v| v.parse().ok()));
            if token.and_then(|s| s.parse::<u64>().ok()) != Some(self.token) {
                tracing::debug!(line, "a launcher's line about another request");
                continue;
            }
            match (kind, value) {
                (Some("pid"), Some(pid)) if pid > 0 => return Ok(Said::Pid(pid)),
                (Some("exit"), Some(code)) => return Ok(Said::Exit(code)),
                _ => bail!("a launcher said {line:?}"),
            }
        }
    }

    /// The next line the launcher wrote; cancel-safe.
    async fn line(&mut self) -> Result<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..=i);
                return Ok(line);
            }
            if self.buf.len() > 4096 {
                bail!("a launcher wrote a line longer than 4 KiB");
            }
            let mut chunk = [0u8; 256];
            let n = self.status.read(&mut chunk).await?;
            if n == 0 {
                let _ = self.child.start_kill();
                bail!("the launcher exited");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Running {
    /// Waits for the snippet's end: bash's exit code for it. Cancel-safe. A launcher that does
    /// not say so within [`REPORT_GRACE`] of the snippet's process being gone (stopped or
    /// killed by the snippet) is ended, and the snippet's end is unknown.
    pub async fn wait(&mut self) -> Result<i32> {
        let launcher = self.launcher.as_mut().context("the launcher is gone")?;
        let launcher_pid = launcher.child.id().and_then(|p| Pid::from_raw(p as i32));
        let said = {
            let gone = async {
                match &self.pidfd {
                    Some(fd) => {
                        let _ = fd.readable().await;
                        if let Some(pid) = launcher_pid {
                            let _ = rustix::process::kill_process(pid, Signal::CONT);
                        }
                        tokio::time::sleep(REPORT_GRACE).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                said = launcher.said() => said,
                () = gone => Err(anyhow!("the launcher did not say how the snippet ended")),
            }
        };
        match said {
            Ok(Said::Exit(code)) => {
                self.ended = true;
                Ok(code)
            }
            Ok(Said::Pid(_)) => {
                self.launcher = None;
                bail!("a launcher said pid twice")
            }
            Err(e) => {
                self.launcher = None;
                Err(e.context("the launcher of a running snippet"))
            }
        }
    }

    /// Gives the launcher back for the next snippet, once this one ended.
    pub fn release(mut self, pool: &Launchers) {
        if let Some(l) = self.launcher.take()
            && self.ended
        {
            pool.put(l);
        }
    }
}

/// Whether bash can export a variable of this name (`export` takes identifiers only).
fn exportable(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `s` as one bash word, single-quoted.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Names bash gives a meaning of its own (or uses itself before the snippet runs): set in the
/// fork, they would not reach the snippet as `bash -c` gives them.
fn special(name: &str) -> bool {
    name.starts_with("BASH")
        || name.starts_with("COMP_")
        || name.starts_with("LC_")
        || name.starts_with("HIST")
        || matches!(
            name,
            "LANG"
                | "GROUPS"
                | "DIRSTACK"
                | "FUNCNAME"
                | "PIPESTATUS"
                | "UID"
                | "EUID"
                | "PPID"
                | "SHELLOPTS"
                | "LINENO"
                | "RANDOM"
                | "SRANDOM"
                | "SECONDS"
                | "EPOCHREALTIME"
                | "EPOCHSECONDS"
                | "OPTIND"
                | "OPTERR"
                | "OPTARG"
                | "IFS"
                | "PS4"
                | "PWD"
                | "OLDPWD"
                | "SHLVL"
                | "_"
                | "POSIXLY_CORRECT"
                | "ENV"
                | "CDPATH"
                | "TMOUT"
                | "HOSTNAME"
                | "HOSTTYPE"
                | "MACHTYPE"
                | "OSTYPE"
                | "GLOBIGNORE"
                | "EXECIGNORE"
                | "TIMEFORMAT"
        )
}

/// The bash a fork sources: output pipes, cgroups, working directory and environment, then
/// the script. `SHLVL` and `OLDPWD` are the agent's, as `bash -c` would have them (the fork's
/// own are the launcher's: one level deeper, and the directory `cd` left). A set-up step that
/// fails ends the fork before the snippet (a failed redirection does not end bash by itself).
fn request(
    req: &Request,
    joins: &[&Path],
    token: u64,
    agent: u32,
    (out, err): (i32, i32),
    plain_name: bool,
) -> String {
    use std::fmt::Write;
    // Only for the request it was sent for (`$n`, the token the launcher read); read whole
    // already, the file is then emptied so that nothing else sent to the launcher runs it.
    let mut s = format!("[ \"$n\" = {token} ] || exit 0\n: >\"$1\"\n");
    let _ = writeln!(
        s,
        "exec 3>&1 </dev/null >/proc/{agent}/fd/{out} 2>/proc/{agent}/fd/{err} || exit {SETUP_FAILED}"
    );
    for p in joins {
        let _ = writeln!(s, "echo 0 >{} || exit {CGROUP_FAILED}", quote(p.to_str().unwrap_or_default()));
    }
    let _ = writeln!(s, "cd -P -- {} || exit {CWD_FAILED}", quote(req.cwd.to_str().unwrap_or_default()));
    for name in ["SHLVL", "OLDPWD"] {
        match std::env::var(name) {
            Ok(v) => _ = writeln!(s, "export {}", quote(&format!("{name}={v}"))),
            Err(_) => _ = writeln!(s, "unset {name}"),
        }
    }
    for (k, v) in req.env {
        let _ = writeln!(s, "export {}", quote(&format!("{k}={v}")));
    }
    // The script, its first line bash's options and the record of the process group running
    // it (the start time from `/proc`), written by the fork itself: no other process holds it
    // open for writing when it is executed.
    let record = quote(req.record.to_str().unwrap_or_default());
    // The fields after the process name, which ends at the last `) ` (the first, when the
    // name has no `)`).
    let cut = if plain_name { "#" } else { "##" };
    let _ = writeln!(s, "read -r stat </proc/$BASHPID/stat || exit {SETUP_FAILED}\nset -- ${{stat{cut}*) }}");
    let _ = writeln!(
        s,
        "printf '%s\\n%s' \"set -eo pipefail # pype: process group $BASHPID, started ${{20}} clock ticks after boot\" \
         {} >{record} || exit {SETUP_FAILED}",
        quote(req.script)
    );
    let _ = writeln!(s, "[ -x {record} ] || exit {SETUP_FAILED}");
    let _ = writeln!(s, "echo \"pid {token} $BASHPID\" >&3 || exit {SETUP_FAILED}");
    s += "exec 3>&-\n";
    let _ = writeln!(s, "exec -- {record}");
    s
}

/// What a pipe holds once all its writers are gone (at most 4 KiB).
fn read_all(r: std::io::PipeReader) -> String {
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::Read::take(r, 4096), &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_identifiers_are_exported() {
        assert!(exportable("PATH") && exportable("_x1"));
        assert!(!exportable("") && !exportable("1x") && !exportable("a-b") && !exportable("a.b"));
    }

    #[test]
    fn a_quoted_word_keeps_quotes_and_newlines() {
        assert_eq!(quote("a'b\nc"), "'a'\\''b\nc'");
    }
}
