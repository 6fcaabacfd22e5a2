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
//! runs with job control, `set -m`), and the start costs a fork instead of an exec.
//!
//! What differs from `bash -c`: `$0` is the script file's path, `$-` lacks `c`,
//! `BASH_SUBSHELL` is 1, bash holds the script open on fd 255 (close-on-exec), bash's own
//! messages name that file instead of `bash`, `ps` shows the launcher's command line, and a
//! snippet killed by a signal reports bash's exit code for it (128 + the signal). Whatever
//! the launcher cannot give exactly (a mount namespace, an environment that runs code when
//! bash starts, a name bash cannot export) goes through `bash -c` instead, as does every
//! snippet once a launcher failed in a way that is not the snippet's (see [`Refused`]).
//!
//! The protocol with a launcher (its stdin and stdout are pipes to the agent): the agent
//! writes the snippet's script and a request (`<n>.req`, bash that sets the fork up) and then
//! the request's number on a line; the fork checks the number, empties the request file, and writes
//! `pid SEQ N` once set up; the launcher writes `exit SEQ C` when the fork ends. `exit` before
//! `pid` means nothing of the snippet ran; lines about other numbers are ignored.
//! The fork takes its output pipes by opening the agent's ends (`/proc/<agent>/fd/<fd>`):
//! bash cannot receive a file descriptor any other way.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe::Receiver;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The launcher: forks a subshell per request number on stdin (its own process group under
/// `set -m`) that sources the request (`$0`), and says how it ended, with the number. SIGTERM,
/// SIGINT and SIGHUP sent to everything (a batch system ending the job) end the snippet, not
/// the launcher: trapped signals are reset to their defaults in the fork.
const LOOP: &str =
    "trap : TERM INT HUP\nset -m\nwhile IFS= read -r n; do ( . \"$0\" ); echo \"exit $n $?\"; done\n";

/// Launchers kept idle beyond this many are ended.
const IDLE_MAX: usize = 32;

/// Exit codes of a request's set-up steps (a redirection that fails ends it with 1).
const CGROUP_FAILED: i32 = 121;
const CWD_FAILED: i32 = 122;

/// The agent's launchers: idle ones wait here between snippets.
pub struct Launchers {
    dir: PathBuf,
    /// The agent's pid as `/proc` names it (which may not be the agent's own pid namespace).
    proc_pid: u32,
    bash: PathBuf,
    idle: Mutex<Vec<Launcher>>,
    next: AtomicU64,
    /// Set once a launcher failed in a way that is not the snippet's: every snippet then goes
    /// through `bash -c`.
    broken: AtomicBool,
}

struct Launcher {
    child: Child,
    requests: ChildStdin,
    status: ChildStdout,
    /// What was read from `status` beyond the last whole line.
    buf: Vec<u8>,
    /// The number of the last request: lines about any other are not this snippet's (a
    /// request the launcher was sent by something else finds its request file emptied).
    seq: u64,
    req: PathBuf,
    script: PathBuf,
}

/// The launcher did not start the snippet, and nothing of it ran: start it with `bash -c`.
#[derive(Debug)]
pub struct Refused(pub anyhow::Error);

/// What a snippet is started with.
pub struct Request<'a> {
    pub script: &'a str,
    pub env: &'a [(String, String)],
    pub cwd: &'a Path,
    /// `cgroup.procs` files the snippet moves itself into before it runs anything.
    pub cgroups: Vec<&'a Path>,
}

/// A snippet a launcher started.
pub struct Running {
    pub pid: i32,
    pub stdout: Option<Receiver>,
    pub stderr: Option<Receiver>,
    launcher: Option<Launcher>,
    ended: bool,
}

impl Launchers {
    /// Launchers keeping their files in `dir` (emptied first; only the agent's user can read
    /// it: requests hold the snippets' environments), or `None` when scripts there cannot be
    /// executed (a `noexec` mount) or `/proc` does not show the agent.
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
        let proc_pid = std::fs::read_link("/proc/self").ok()?.to_str()?.parse().ok()?;
        Some(Self {
            dir,
            proc_pid,
            bash,
            idle: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        })
    }

    /// Whether a launcher can start this snippet exactly as `bash -c` would.
    pub fn can_start(&self, req: &Request) -> bool {
        !self.broken.load(Ordering::Relaxed)
            && !req.script.contains('\0')
            && req.env.iter().all(|(k, _)| exportable(k))
            && req.cwd.to_str().is_some()
            && req.cgroups.iter().all(|p| p.to_str().is_some())
    }

    /// Starts the snippet on an idle launcher (or a new one).
    pub async fn start(&self, req: &Request<'_>) -> Result<Running, Refused> {
        let mut launcher = match self.take() {
            Some(l) => l,
            None => self.spawn().map_err(|e| self.refuse(e))?,
        };
        let out = std::io::pipe().context("creating the snippet's stdout pipe").map_err(Refused)?;
        let err = std::io::pipe().context("creating the snippet's stderr pipe").map_err(Refused)?;
        launcher.seq += 1;
        let text = request(req, launcher.seq, self.proc_pid, out.1.as_raw_fd(), err.1.as_raw_fd());
        let written = std::fs::write(&launcher.script, format!("set -eo pipefail\n{}", req.script))
            .and_then(|()| std::fs::write(&launcher.req, text))
            .with_context(|| format!("writing the snippet's script in {}", self.dir.display()));
        if let Err(e) = written {
            self.put(launcher);
            return Err(Refused(e));
        }
        if let Err(e) = launcher.requests.write_all(format!("{}\n", launcher.seq).as_bytes()).await {
            return Err(self.refuse(anyhow!(e).context("sending a request to a launcher")));
        }
        let said = launcher.said().await;
        // The fork holds its own ends now (or is gone).
        drop((out.1, err.1));
        match said {
            Ok(Said::Pid(pid)) => {
                let stdout = Receiver::from_owned_fd(OwnedFd::from(out.0)).ok();
                let stderr = Receiver::from_owned_fd(OwnedFd::from(err.0)).ok();
                Ok(Running { pid, stdout, stderr, launcher: Some(launcher), ended: false })
            }
            Ok(Said::Exit(code)) => {
                let said = read_all(out.0) + &read_all(err.0);
                let why = anyhow!("a launcher could not set the snippet up (exit {code}): {}", said.trim());
                self.put(launcher);
                if code == CGROUP_FAILED || code == CWD_FAILED {
                    Err(Refused(why))
                } else {
                    Err(self.refuse(why))
                }
            }
            Err(e) => Err(self.refuse(e.context("a launcher ended"))),
        }
    }

    fn refuse(&self, e: anyhow::Error) -> Refused {
        if !self.broken.swap(true, Ordering::Relaxed) {
            tracing::warn!("snippets start with bash -c from now on: {e:#}");
        }
        Refused(e)
    }

    fn take(&self) -> Option<Launcher> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put(&self, launcher: Launcher) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_MAX {
            idle.push(launcher);
        }
    }

    fn spawn(&self) -> Result<Launcher> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let req = self.dir.join(format!("{n}.req"));
        let script = self.dir.join(format!("{n}.sh"));
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o700)
            .open(&script)
            .with_context(|| format!("creating {}", script.display()))?;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&req)
            .with_context(|| format!("creating {}", req.display()))?;
        let mut child = Command::new(&self.bash)
            .arg("-c")
            .arg(LOOP)
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
        Ok(Launcher { child, requests, status, buf: Vec::new(), seq: 0, req, script })
    }
}

/// A line from a launcher about the current request.
enum Said {
    /// The fork is set up and about to run the snippet, as this process (and group).
    Pid(i32),
    /// The fork ended, with bash's exit code for it.
    Exit(i32),
}

impl Launcher {
    /// The next line about the current request; cancel-safe (what was read stays in `buf`).
    async fn said(&mut self) -> Result<Said> {
        loop {
            let line = self.line().await?;
            let mut words = line.split(' ');
            let (kind, seq, value) = (words.next(), words.next(), words.next().and_then(|v| v.parse().ok()));
            if seq.and_then(|s| s.parse::<u64>().ok()) != Some(self.seq) {
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
    /// Waits for the snippet's end: bash's exit code for it. Cancel-safe.
    pub async fn wait(&mut self) -> Result<i32> {
        let launcher = self.launcher.as_mut().context("the launcher is gone")?;
        match launcher.said().await {
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

/// The bash a fork sources: output pipes, cgroups, working directory and environment, then
/// the script. `SHLVL` and `OLDPWD` are set to what `bash -c` would have been given (the
/// fork's own are the launcher's: one level deeper, and the directory `cd` left).
fn request(req: &Request, seq: u64, agent: u32, out: i32, err: i32) -> String {
    use std::fmt::Write;
    // Only for the request it was sent for (`$n`, the number the launcher read); read whole
    // already, the file is then emptied so that nothing else sent to the launcher runs it.
    let mut s = format!("[ \"$n\" = {seq} ] || exit 0\n: >\"$0\"\n");
    let _ = writeln!(s, "exec 3>&1 </dev/null >/proc/{agent}/fd/{out} 2>/proc/{agent}/fd/{err}");
    for p in &req.cgroups {
        let _ = writeln!(s, "echo 0 >{} || exit {CGROUP_FAILED}", quote(p.to_str().unwrap_or_default()));
    }
    let _ = writeln!(s, "cd -- {} || exit {CWD_FAILED}", quote(req.cwd.to_str().unwrap_or_default()));
    for name in ["SHLVL", "OLDPWD"] {
        let given = req.env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        match given.or_else(|| std::env::var(name).ok()) {
            Some(v) => _ = writeln!(s, "export {}", quote(&format!("{name}={v}"))),
            None => _ = writeln!(s, "unset {name}"),
        }
    }
    for (k, v) in req.env {
        let _ = writeln!(s, "export {}", quote(&format!("{k}={v}")));
    }
    let _ = writeln!(s, "echo \"pid {seq} $BASHPID\" >&3");
    s += "exec 3>&-\n";
    s += "exec -- \"${0%.req}.sh\"\n";
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
