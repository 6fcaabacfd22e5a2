//! Runs a snippet: `bash -c` with `set -eo pipefail`, in its own process group (killed whole
//! on cancel or timeout: SIGTERM, then SIGKILL after a grace period), optionally inside a
//! private mount namespace, with stdout and stderr written to log files and sent on as lines.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use protocol::{LogLine, OutputStream};
use rustix::process::{Pid, Signal};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::launcher::{self, Launchers};
use crate::mounts::NsPlan;
use crate::usage::{Join, Meter};
use protocol::ResourceUsage;

/// Time between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Longest line sent to the coordinator; longer output is cut into pieces of this size.
const MAX_LINE: usize = 64 * 1024;

pub struct ExecSpec {
    pub script: String,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub stdout_log: PathBuf,
    pub stderr_log: PathBuf,
    pub timeout: Option<Duration>,
    pub namespace: Option<NsPlan>,
    /// Where the script is kept (`command.sh`), its first line naming the process group that
    /// runs it (pid and start time), so a later agent can kill what a killed agent left
    /// running. One file, not two: on a busy ext4 each new inode costs more than the write.
    pub record: PathBuf,
    /// How the attempt's resource use is measured (and its memory limited), if at all.
    pub meter: Option<Meter>,
    /// Warm shells that start the snippet without an exec of bash, when they can.
    pub launchers: Option<Arc<Launchers>>,
}

/// `bash` as found on `PATH` once, so each spawn is one `execve` instead of a search.
pub fn bash_path() -> &'static std::path::Path {
    static BASH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BASH.get_or_init(|| {
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|d| d.join("bash"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("bash"))
    })
}

/// Start time of a process in clock ticks since boot (field 22 of `/proc/PID/stat`).
fn start_time(pid: i32) -> Option<u64> {
    // One read: the line is a few hundred bytes (`read_to_string` grows its buffer from 32
    // bytes, a system call per doubling).
    let path = format!("/proc/{pid}/stat");
    let mut buf = [0u8; 1024];
    let n = std::io::Read::read(&mut std::fs::File::open(&path).ok()?, &mut buf).ok()?;
    let long;
    let stat = match n < buf.len() {
        true => std::str::from_utf8(buf.get(..n)?).ok()?,
        false => {
            long = std::fs::read_to_string(&path).ok()?;
            &long
        }
    };
    stat.rsplit(") ").next()?.split(' ').nth(19)?.parse().ok()
}

/// The first line of `command.sh` once its snippet started: what [`recorded_group`] reads.
fn record_header(pgid: i32, started: u64) -> String {
    format!("# pype: process group {pgid}, started {started} clock ticks after boot\n")
}

/// The process group and its leader's start time, from a `command.sh` [`record_header`]
/// wrote (or the `pid` file of an agent before it: `PGID START`).
fn recorded_group(text: &str) -> Option<(i32, u64)> {
    let first = text.lines().next()?;
    let record = first.strip_prefix("set -eo pipefail ").unwrap_or(first);
    let (pgid, started) = match record.strip_prefix("# pype: process group ") {
        Some(rest) => {
            let (pgid, rest) = rest.split_once(", started ")?;
            (pgid, rest.trim_start().split(' ').next()?)
        }
        None => first.trim().split_once(' ')?,
    };
    Some((pgid.trim().parse().ok().filter(|p: &i32| *p > 0)?, started.trim().parse().ok()?))
}

/// Kills the process group a file names (see [`recorded_group`]) if its leader is still the
/// same process.
pub fn kill_recorded(record: &std::path::Path) -> bool {
    // Only the first line matters, and a step's `command.sh` may be large.
    let Ok(f) = std::fs::File::open(record) else { return false };
    let mut head = Vec::with_capacity(128);
    if std::io::Read::read_to_end(&mut std::io::Read::take(f, 128), &mut head).is_err() {
        return false;
    }
    let Some((pid, started)) = recorded_group(&String::from_utf8_lossy(&head)) else { return false };
    if start_time(pid) == Some(started) {
        kill_group(pid, Signal::KILL);
        wait_group_gone(pid, Duration::from_secs(10));
        return true;
    }
    false
}

/// Waits (at most `limit`) until no live process of group `pgid` is left: a killed process
/// can take a while to exit (tearing down its mount namespace), and the leftovers it holds
/// (mounts, open files in the step directory) are only gone once it has. Zombies count as
/// gone: whoever inherited them reaps them, or not, in its own time.
fn wait_group_gone(pgid: i32, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while group_has_live_process(pgid) {
        if std::time::Instant::now() > deadline {
            tracing::warn!(pgid, "a killed snippet's processes are still there");
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a process of group `pgid` exists that is not a zombie (from `/proc/*/stat`).
fn group_has_live_process(pgid: i32) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else { return false };
    rd.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { return false };
        let mut fields = stat.rsplit(") ").next().unwrap_or("").split(' ');
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|v| v.parse::<i32>().ok());
        pgrp == Some(pgid) && state != Some("Z")
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecEnd {
    Exited(i32),
    Signalled(i32),
    TimedOut,
    Cancelled,
}

/// Signals the process group `pgid` (not a group at all when `pgid` is not positive); a group
/// already gone is no error.
fn kill_group(pgid: i32, signal: Signal) {
    if pgid > 0
        && let Some(pid) = Pid::from_raw(pgid)
    {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

/// Runs the snippet to its end; returns how it ended and, with a meter, what it used.
/// `lines` receives its output (dropped when the receiver lags behind by more than the
/// channel holds: the log files keep everything).
pub async fn run(
    mut spec: ExecSpec,
    cancel: &CancellationToken,
    lines: mpsc::Sender<LogLine>,
) -> Result<(ExecEnd, Option<ResourceUsage>)> {
    let meter = spec.meter.take();
    let end = run_metered(spec, meter.as_ref(), cancel, lines).await;
    // The group is gone (killed whole either way); what left it but not the attempt's cgroup
    // is killed by `finish`, which may wait for it: off the async threads.
    let usage = match meter {
        Some(m) if m.finish_may_block() => tokio::task::spawn_blocking(move || m.finish()).await.ok(),
        Some(m) => Some(m.finish()),
        None => None,
    };
    Ok((end?, usage))
}

/// The first line of a gated snippet: it waits for one line on stdin, which the agent sends
/// once it has moved the shell into the attempt's cgroups, then takes stdin from /dev/null as
/// an ungated snippet does. The gate was closed without that line: the shell exits.
const GATE: &str = "IFS= read -r _ || exit 125; exec </dev/null; ";

/// Whether bash could run code before the gate, from the snippet's or the agent's
/// environment: `BASH_ENV` (or `ENV`) names a file a non-interactive bash reads first, an
/// exported function (`BASH_FUNC_*`) can replace the gate's `read`, and `SHELLOPTS` /
/// `BASHOPTS` can turn on tracing whose prompt runs commands.
fn runs_code_before_the_gate(env: &[(String, String)]) -> bool {
    let risky =
        |k: &str| matches!(k, "BASH_ENV" | "ENV" | "SHELLOPTS" | "BASHOPTS") || k.starts_with("BASH_FUNC_");
    env.iter().any(|(k, _)| risky(k)) || std::env::vars_os().any(|(k, _)| k.to_str().is_some_and(risky))
}

async fn run_metered(
    mut spec: ExecSpec,
    meter: Option<&Meter>,
    cancel: &CancellationToken,
    lines: mpsc::Sender<LogLine>,
) -> Result<ExecEnd> {
    let join = meter.and_then(Meter::join);
    let started = match &spec.launchers {
        Some(pool) if spec.namespace.is_none() && !runs_code_before_the_gate(&spec.env) => {
            launch(pool, &spec, join.as_ref()).await
        }
        _ => None,
    };
    let (mut proc, out, err): (Proc, Option<Pipe>, Option<Pipe>) = match started {
        Some(mut r) => {
            let out = r.stdout.take().map(|p| Box::new(p) as Pipe);
            let err = r.stderr.take().map(|p| Box::new(p) as Pipe);
            (Proc::Launched(Box::new(r)), out, err)
        }
        None => {
            let mut child = spawn_bash(&mut spec, join).await?;
            let out = child.stdout.take().map(|p| Box::new(p) as Pipe);
            let err = child.stderr.take().map(|p| Box::new(p) as Pipe);
            (Proc::Bash(child), out, err)
        }
    };
    let pgid = proc.pid();
    if let Some(m) = meter {
        m.started(pgid);
    }
    // A launcher's fork wrote its own (it runs it).
    if let Proc::Bash(_) = proc {
        let header = start_time(pgid).map(|t| record_header(pgid, t)).unwrap_or_default();
        if let Err(e) = std::fs::write(&spec.record, format!("{header}{}", spec.script)) {
            tracing::warn!(path = %spec.record.display(), "cannot write the snippet's command.sh: {e}");
        }
    }
    let out =
        out.map(|s| tokio::spawn(pump(s, spec.stdout_log.clone(), OutputStream::Stdout, lines.clone())));
    let err = err.map(|s| tokio::spawn(pump(s, spec.stderr_log.clone(), OutputStream::Stderr, lines)));
    let deadline = async {
        match spec.timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let forced = tokio::select! {
        end = proc.wait() => {
            // Whatever the snippet left running in its group goes with it.
            kill_group(pgid, Signal::KILL);
            finish(out, err).await;
            proc.release(spec.launchers.as_deref());
            return end;
        }
        _ = cancel.cancelled() => ExecEnd::Cancelled,
        _ = deadline => ExecEnd::TimedOut,
    };
    kill_group(pgid, Signal::TERM);
    if tokio::time::timeout(KILL_GRACE, proc.wait()).await.is_err() {
        kill_group(pgid, Signal::KILL);
        let _ = proc.wait().await;
    }
    kill_group(pgid, Signal::KILL);
    finish(out, err).await;
    proc.release(spec.launchers.as_deref());
    Ok(forced)
}

/// Starts the snippet on one of the agent's launchers, its script the attempt's `command.sh`;
/// `None` when it goes to `bash -c` instead.
async fn launch(pool: &Launchers, spec: &ExecSpec, join: Option<&Join>) -> Option<launcher::Running> {
    // Absolute: the fork changes directory before it writes the script (a relative work dir
    // is the agent's own working directory's).
    let record = std::path::absolute(&spec.record).ok()?;
    let cwd = std::path::absolute(&spec.cwd).ok()?;
    // A kept cgroup's launcher may live in it.
    let settle = join.filter(|j| j.takes_residents()).map(|j| move |pid: u32| j.settle(pid));
    let req = launcher::Request {
        script: &spec.script,
        env: &spec.env,
        cwd: &cwd,
        cgroups: join.map(Join::paths).unwrap_or_default(),
        settle: settle.as_ref().map(|f| f as &(dyn Fn(u32) -> std::io::Result<()> + Sync)),
        record: &record,
    };
    if !pool.can_start(&req) {
        return None;
    }
    // Created executable here, but never opened for writing by the agent: the fork writes it
    // and then executes it, and a writable descriptor of the agent's (inherited for a moment
    // by any child it spawns meanwhile) would make that exec fail (`ETXTBSY`).
    use rustix::fs::{Mode, OFlags};
    let created =
        rustix::fs::open(&record, OFlags::CREATE | OFlags::RDONLY | OFlags::CLOEXEC, Mode::from(0o700))
            .and_then(|fd| rustix::fs::fchmod(&fd, Mode::from(0o700)));
    if let Err(e) = created {
        tracing::debug!(path = %record.display(), "starting with bash -c: cannot create the script: {e}");
        return None;
    }
    match pool.start(&req).await {
        Ok(r) => Some(r),
        Err(launcher::Refused(e)) => {
            tracing::debug!("starting with bash -c: {e:#}");
            None
        }
    }
}

type Pipe = Box<dyn AsyncRead + Unpin + Send>;

/// The snippet's shell: a `bash -c` of the agent's, or a launcher's fork.
enum Proc {
    Bash(tokio::process::Child),
    Launched(Box<launcher::Running>),
}

impl Proc {
    /// Its process group (its pid).
    fn pid(&self) -> i32 {
        match self {
            Proc::Bash(c) => c.id().map(|p| p as i32).unwrap_or(0),
            Proc::Launched(r) => r.pid,
        }
    }

    /// How it ended. Cancel-safe.
    async fn wait(&mut self) -> Result<ExecEnd> {
        match self {
            Proc::Bash(c) => {
                let status = c.wait().await.context("waiting for bash")?;
                use std::os::unix::process::ExitStatusExt;
                Ok(match (status.code(), status.signal()) {
                    (Some(c), _) => ExecEnd::Exited(c),
                    (None, Some(s)) => ExecEnd::Signalled(s),
                    (None, None) => ExecEnd::Exited(-1),
                })
            }
            Proc::Launched(r) => Ok(ExecEnd::Exited(r.wait().await?)),
        }
    }

    fn release(self, pool: Option<&Launchers>) {
        if let (Proc::Launched(r), Some(pool)) = (self, pool) {
            r.release(pool);
        }
    }
}

/// Starts `bash -c` with the snippet, moved into its cgroups (`join`) before it runs.
async fn spawn_bash(spec: &mut ExecSpec, join: Option<Join>) -> Result<tokio::process::Child> {
    // A child that joins its cgroups itself must do it between `fork` and `exec`, and a fork
    // of the agent (copying its page tables, then copy-on-write faults in the agent until the
    // exec) costs more than the snippet `true`. So when nothing else must happen in the child
    // (no mount namespace), it is spawned without a fork (`posix_spawn`) and waits at a gate
    // while the agent moves it into the cgroups. Before the gate it has started nothing.
    let plan = spec.namespace.take();
    let gated = join.is_some() && plan.is_none() && !runs_code_before_the_gate(&spec.env);
    let mut cmd = Command::new(bash_path());
    cmd.arg("-c")
        .arg(format!("{}set -eo pipefail\n{}", if gated { GATE } else { "" }, spec.script))
        .current_dir(&spec.cwd)
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(if gated { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let (gate_join, join): (Option<Join>, Option<Join>) = if gated { (join, None) } else { (None, join) };
    if plan.is_some() || join.is_some() {
        // A mount namespace must be entered by the child alone (entered by the agent, it would
        // hold the agent's own thread), and so must its cgroups then (nothing it starts may
        // run outside them); std has no safe hook between `fork` and `exec`: `process_group`
        // above covers the process group, nothing covers `unshare` or a cgroup.
        // SAFETY: `pre_exec` runs the closure in the forked child of a multithreaded process,
        // where only async-signal-safe work is sound; `Join::enter` and `NsPlan::enter` only
        // make system calls on C strings prepared before the fork and allocate nothing.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(j) = &join {
                    j.enter()?;
                }
                match &plan {
                    Some(p) => p.enter(),
                    None => Ok(()),
                }
            });
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::write(&spec.record, &spec.script);
            return Err(e).context("starting bash");
        }
    };
    if let (Some(j), Some(pid)) = (&gate_join, child.id()) {
        let opened = match j.place(pid) {
            Ok(()) => match child.stdin.take() {
                Some(mut gate) => {
                    tokio::io::AsyncWriteExt::write_all(&mut gate, b"\n").await.map_err(anyhow::Error::from)
                }
                None => Err(anyhow::anyhow!("no gate to open")),
            },
            Err(e) => Err(e.into()),
        };
        if let Err(e) = opened {
            kill_group(pid as i32, Signal::KILL);
            let _ = child.wait().await;
            let _ = std::fs::write(&spec.record, &spec.script);
            return Err(e).context("moving the snippet into its cgroups");
        }
    }
    Ok(child)
}

async fn finish(out: Option<tokio::task::JoinHandle<()>>, err: Option<tokio::task::JoinHandle<()>>) {
    for h in [out, err].into_iter().flatten() {
        // A grandchild holding the pipe open must not hold the step: give up after a while.
        let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
    }
}

/// Copies a pipe to its log file and cuts it into lines for the coordinator.
async fn pump(
    mut pipe: impl AsyncRead + Unpin,
    log: PathBuf,
    stream: OutputStream,
    lines: mpsc::Sender<LogLine>,
) {
    // Created on the first output (a silent step leaves no empty files), written with plain
    // file IO: appends to a local work dir land in the page cache without blocking, and a
    // blocking-pool hop per write costs more than the write.
    let mut file: Option<std::fs::File> = None;
    let mut failed = false;
    let mut buf = vec![0u8; 64 * 1024];
    let mut partial: Vec<u8> = Vec::new();
    let send = |bytes: &[u8]| {
        let line = String::from_utf8_lossy(bytes).into_owned();
        let _ = lines.try_send(LogLine { stream, line });
    };
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if file.is_none() && !failed {
            match std::fs::OpenOptions::new().create(true).append(true).open(&log) {
                Ok(f) => file = Some(f),
                Err(e) => {
                    failed = true;
                    tracing::warn!(path = %log.display(), "cannot write step log: {e}");
                }
            }
        }
        if let Some(f) = file.as_mut() {
            let _ = std::io::Write::write_all(f, &buf[..n]);
        }
        partial.extend_from_slice(&buf[..n]);
        let mut start = 0;
        while let Some(i) = partial[start..].iter().position(|b| *b == b'\n') {
            send(&partial[start..start + i]);
            start += i + 1;
        }
        partial.drain(..start);
        while partial.len() >= MAX_LINE {
            send(&partial[..MAX_LINE]);
            partial.drain(..MAX_LINE);
        }
    }
    if !partial.is_empty() {
        send(&partial);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::mounts::{self, NsMount};
    use crate::usage::Hierarchies;

    fn spec(dir: &Path, script: &str, namespace: Option<NsPlan>) -> ExecSpec {
        ExecSpec {
            script: script.into(),
            env: Vec::new(),
            cwd: dir.to_path_buf(),
            stdout_log: dir.join("stdout"),
            stderr_log: dir.join("stderr"),
            timeout: Some(Duration::from_secs(60)),
            namespace,
            record: dir.join("command.sh"),
            meter: None,
            launchers: None,
        }
    }

    /// `spec`, started by one of `pool`'s launchers when it can be.
    fn launched(dir: &Path, script: &str, pool: &Arc<Launchers>) -> ExecSpec {
        ExecSpec { launchers: Some(pool.clone()), ..spec(dir, script, None) }
    }

    fn pool(dir: &Path) -> Arc<Launchers> {
        Arc::new(Launchers::new(dir.join("launch"), bash_path().into()).expect("launchers"))
    }

    /// Runs `s`; its end, stdout and stderr.
    async fn outcome(s: ExecSpec) -> (ExecEnd, String, String) {
        let (out, err) = (s.stdout_log.clone(), s.stderr_log.clone());
        let _ = std::fs::remove_file(&out);
        let _ = std::fs::remove_file(&err);
        let (tx, _rx) = mpsc::channel(256);
        let (end, _) = run(s, &CancellationToken::new(), tx).await.unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        (end, read(&out), read(&err))
    }

    /// What a snippet can see of how it was started, apart from pids and what a launcher is
    /// allowed to change (`$0`, `BASH_SUBSHELL`, the `c` in `$-`, bash's fd 255 on the script).
    const PROBE: &str = r#"read -r _ _ _ _ pgrp _ < /proc/$$/stat
[ "$pgrp" = "$$" ] && echo "leads its process group"
[ "$$" = "$BASHPID" ] && echo "\$\$ is its own pid"
echo "parent is the agent: $([ "$PPID" = "$AGENT" ] && echo yes || echo no)"
env -0 | sort -z | tr '\0' '\n' | grep -av '^_='
for f in /proc/$BASHPID/fd/*; do [ "${f##*/}" = 255 ] || echo "fd ${f##*/} -> $(readlink "$f" | sed 's/[0-9]\+/N/g')"; done
grep -E '^Sig(Ign|Blk)' /proc/$BASHPID/status
umask; ulimit -a; set -o; shopt -p; trap -p; declare -F; alias
echo "BASH=$BASH source-dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
echo "SHLVL=$SHLVL PWD=$PWD OLDPWD=${OLDPWD-unset} cwd=$(pwd -P) opts=${-/c/}"
compgen -v | grep -v -e '^BASH_EXECUTION_STRING$' -e '^BASH_SUBSHELL$' | tr '\n' ' '
"#;

    #[tokio::test]
    async fn a_snippet_in_a_namespace_sees_its_mounts_and_the_host_does_not() {
        let test = "a_snippet_in_a_namespace_sees_its_mounts_and_the_host_does_not";
        if !mounts::tests::root_or_skip(test) {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let d = |p: &str| {
            let p = tmp.path().join(p);
            std::fs::create_dir_all(&p).unwrap();
            p
        };
        let (host, view, out, upper, work) = (d("host"), d("view"), d("out"), d("upper"), d("work"));
        std::fs::write(host.join("a"), "host").unwrap();
        std::fs::write(view.join("a"), "view").unwrap();
        std::fs::write(out.join("kept"), "kept").unwrap();
        let plan = NsPlan::new(&[
            NsMount::Bind { src: view, dst: host.clone() },
            NsMount::Overlay { lower: out.clone(), upper: upper.clone(), work, target: out.clone() },
        ])
        .unwrap();
        let script = format!(
            "cat {h}/a; echo; cat {o}/kept; echo; echo new > {o}/new",
            h = host.display(),
            o = out.display()
        );
        let (tx, _rx) = mpsc::channel(16);
        let (end, _) =
            run(spec(tmp.path(), &script, Some(plan)), &CancellationToken::new(), tx).await.unwrap();
        let stderr = std::fs::read_to_string(tmp.path().join("stderr")).unwrap_or_default();
        assert_eq!(end, ExecEnd::Exited(0), "{stderr}");
        assert_eq!(std::fs::read_to_string(tmp.path().join("stdout")).unwrap(), "view\nkept\n");
        // The mounts lived and died with the snippet's namespace: the host kept its files, and
        // the write went to the overlay's upper dir.
        assert_eq!(std::fs::read_to_string(host.join("a")).unwrap(), "host");
        assert!(!out.join("new").exists());
        assert_eq!(std::fs::read_to_string(upper.join("new")).unwrap(), "new\n");
        assert!(mounts::mounts_under(tmp.path()).is_empty());
    }

    #[tokio::test]
    async fn a_timed_out_snippet_is_killed_with_its_whole_group() {
        let tmp = tempfile::tempdir().unwrap();
        let (tx, _rx) = mpsc::channel(16);
        // Field 5 of /proc/PID/stat is the process group.
        let script = "read -r _ _ _ _ pgrp _ < /proc/$$/stat; echo $pgrp $$; sleep 600 & echo $!; wait";
        let mut s = spec(tmp.path(), script, None);
        s.timeout = Some(Duration::from_millis(500));
        let (end, _) = run(s, &CancellationToken::new(), tx).await.unwrap();
        assert_eq!(end, ExecEnd::TimedOut);
        let text = std::fs::read_to_string(tmp.path().join("stdout")).unwrap();
        let ids: Vec<i32> = text.split_whitespace().map(|v| v.parse().unwrap()).collect();
        assert_eq!(ids.len(), 3, "{text}");
        assert_eq!(ids[0], ids[1], "the snippet leads a process group of its own");
        // The background `sleep` went with the group (a zombie at most, until reaped by init).
        // SIGKILL was sent to the group; the kernel may take a moment to finish it off (its
        // state reads `R` while it exits), so it is given a few seconds, not an instant.
        let zombie = |s: &String| s.rsplit(") ").next().is_some_and(|r| r.starts_with('Z'));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", ids[2])).ok();
            if stat.as_ref().is_none_or(zombie) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the group's sleep outlived its kill: {stat:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Tests that take cgroups from the agent's pool one after the other.
    static CGROUP_POOL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// The cgroup pool to oneself, for a test of kept cgroups; `None` (said loudly) when they
    /// cannot be tested here: not root, or cgroup v2, whose cgroups are not kept.
    async fn kept_cgroups(test: &str) -> Option<tokio::sync::MutexGuard<'static, ()>> {
        if !mounts::tests::root_or_skip(test) {
            return None;
        }
        if Hierarchies::get().v2.is_some() {
            eprintln!("\n!!! {test}: cgroup v2 here, whose cgroups are not kept; nothing to test\n");
            return None;
        }
        Some(CGROUP_POOL.lock().await)
    }

    /// A cgroup v1 kept from one attempt to the next: the second attempt gets the same
    /// cgroup, and its figures are its own (the first one's CPU and peak memory do not show
    /// in them); one whose attempt left a lot of page cache charged to it is not kept.
    #[tokio::test]
    async fn a_kept_cgroup_counts_only_the_attempt_that_holds_it() {
        let test = "a_kept_cgroup_counts_only_the_attempt_that_holds_it";
        let Some(_one_at_a_time) = kept_cgroups(test).await else { return };
        let tmp = tempfile::tempdir().unwrap();
        let attempt = |script: &str| {
            let meter = Meter::new(true, 1, None);
            let dir = meter.cgroup_dir().map(Path::to_path_buf);
            let mut s = spec(tmp.path(), script, None);
            s.meter = Some(meter);
            (s, dir)
        };
        // 48 MB in a shell variable (freed when the shell exits).
        let (s, first_dir) = attempt("x=$(head -c 48000000 /dev/zero | tr '\\0' a); echo ${#x}");
        let Some(first_dir) = first_dir else {
            skip_without_cgroups(test);
            return;
        };
        let (tx, _rx) = mpsc::channel(64);
        let (end, first) = run(s, &CancellationToken::new(), tx.clone()).await.unwrap();
        assert_eq!(end, ExecEnd::Exited(0));
        let first = first.unwrap();
        assert!(first_dir.file_name().unwrap().to_string_lossy().starts_with("pype-slot-"), "{first_dir:?}");
        assert!(first.peak_memory_bytes > 48_000_000, "{first:?}");
        assert!(first.cpu_user_ms + first.cpu_system_ms > 0, "{first:?}");

        let (s, second_dir) = attempt("true");
        assert_eq!(second_dir.as_deref(), Some(first_dir.as_path()), "the kept cgroup was not reused");
        let (end, second) = run(s, &CancellationToken::new(), tx).await.unwrap();
        assert_eq!(end, ExecEnd::Exited(0));
        let second = second.unwrap();
        assert!(second.peak_memory_bytes < 8_000_000, "the first attempt's memory shows: {second:?}");
        assert!(
            second.cpu_user_ms + second.cpu_system_ms < first.cpu_user_ms + first.cpu_system_ms,
            "{second:?}"
        );
        assert!(!second.oom_killed);

        // 32 MB left in the page cache, charged to the cgroup: the next attempt gets another.
        let (s, third_dir) = attempt("head -c 32000000 /dev/urandom > big; sync");
        assert_eq!(third_dir.as_deref(), Some(first_dir.as_path()));
        let (tx, _rx) = mpsc::channel(64);
        let (end, _) = run(s, &CancellationToken::new(), tx).await.unwrap();
        assert_eq!(end, ExecEnd::Exited(0));
        let (s, fourth_dir) = attempt("true");
        assert_ne!(fourth_dir.as_deref(), Some(first_dir.as_path()), "a cgroup holding 32 MB was kept");
        assert!(!first_dir.exists(), "{first_dir:?} was neither kept nor removed");

        // A kept cgroup whose cpuacct directory is removed by hand while it waits in the pool
        // (its control files are held open) is not handed out again: the next attempt gets
        // another and runs.
        let (tx, _rx) = mpsc::channel(64);
        let (end, _) = run(s, &CancellationToken::new(), tx).await.unwrap();
        assert_eq!(end, ExecEnd::Exited(0));
        let fourth_dir = fourth_dir.unwrap();
        let cpuacct = Hierarchies::get().cpuacct.as_ref().unwrap().join(fourth_dir.file_name().unwrap());
        std::fs::remove_dir(&cpuacct).unwrap();
        let (s, fifth_dir) = attempt("echo five");
        assert_ne!(
            fifth_dir.as_deref(),
            Some(fourth_dir.as_path()),
            "a cgroup missing its cpuacct part was kept"
        );
        let (tx, _rx) = mpsc::channel(64);
        let (end, fifth) = run(s, &CancellationToken::new(), tx).await.unwrap();
        assert_eq!(end, ExecEnd::Exited(0));
        assert_eq!(fifth.unwrap().measured_by, "cgroup v1");
        assert!(!fourth_dir.exists(), "{fourth_dir:?} was neither kept nor removed");
    }

    /// Says loudly that `test` is skipped for want of a cgroup hierarchy, unless
    /// `PYPE_REQUIRE_ALL=1` forbids skipping (then it fails).
    fn skip_without_cgroups(test: &str) {
        assert!(
            std::env::var_os("PYPE_REQUIRE_ALL").is_none_or(|v| v != "1"),
            "{test}: no usable cgroup hierarchy, and PYPE_REQUIRE_ALL=1 forbids skipping"
        );
        eprintln!("\n!!! SKIPPED {test}: no cgroup hierarchy this process can create cgroups in\n");
    }

    /// Whether process `pid` is gone (or a zombie).
    fn gone(pid: i32) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(") ").is_none_or(|(_, rest)| rest.starts_with('Z'))
    }

    /// Whether `done` comes true within 5 s.
    fn soon(done: impl Fn() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Whether process `pid` is gone (or a zombie) within 5 s.
    fn gone_soon(pid: i32) -> bool {
        soon(|| gone(pid))
    }

    /// A launcher lives in a kept cgroup: moved there once, it starts the later attempts that
    /// hold that cgroup, and its forks are born in it (no move per snippet). The attempt's end
    /// spares it while it kills what the snippet left there, and removing the cgroup ends it:
    /// so does moving it out (the cgroup is then not kept).
    #[tokio::test]
    async fn a_launcher_lives_in_a_kept_cgroup_and_its_forks_are_born_there() {
        let test = "a_launcher_lives_in_a_kept_cgroup_and_its_forks_are_born_there";
        let Some(_one_at_a_time) = kept_cgroups(test).await else { return };
        let tmp = tempfile::tempdir().unwrap();
        let pool = pool(tmp.path());
        let memory_cgroup = |pid: i32| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            text.lines().find(|l| l.split(':').nth(1) == Some("memory")).unwrap_or_default().to_string()
        };
        let hierarchies = Hierarchies::get();
        let Some(agents_memory) = hierarchies.memory.clone() else {
            skip_without_cgroups(test);
            return;
        };
        let mut launchers = Vec::new();
        let mut dir = None;
        for round in 0..3 {
            let meter = Meter::new(true, 1, None);
            let Some(this) = meter.cgroup_dir().map(Path::to_path_buf) else {
                skip_without_cgroups(test);
                return;
            };
            assert_eq!(
                dir.get_or_insert(this.clone()),
                &this,
                "round {round}: the kept cgroup was not reused"
            );
            let name = this.file_name().unwrap().to_string_lossy().into_owned();
            // A busy loop (CPU to count), and a process leaving the group for the cgroup's
            // end to kill. In round 1 the snippet also moves its launcher out of the cgroup.
            let move_out = if round == 1 {
                format!("echo $PPID > {}/cgroup.procs;", agents_memory.display())
            } else {
                String::new()
            };
            let script = format!(
                "echo $PPID; grep ':memory:' /proc/self/cgroup; \
                 setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!; \
                 i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; {move_out}"
            );
            let work = tempfile::tempdir().unwrap();
            let mut s = launched(work.path(), &script, &pool);
            s.meter = Some(meter);
            let (tx, _rx) = mpsc::channel(64);
            let (end, usage) = run(s, &CancellationToken::new(), tx).await.unwrap();
            let out = std::fs::read_to_string(work.path().join("stdout")).unwrap();
            let err = std::fs::read_to_string(work.path().join("stderr")).unwrap_or_default();
            assert_eq!(end, ExecEnd::Exited(0), "round {round}: {out}{err}");
            let mut lines = out.lines();
            let parent: i32 = lines.next().unwrap().parse().unwrap();
            assert!(
                lines.next().unwrap().ends_with(&name),
                "round {round}: the snippet is not in {name}: {out}"
            );
            let escaped: i32 = lines.next().unwrap().parse().unwrap();
            assert_ne!(parent, std::process::id() as i32, "round {round}: not launched");
            assert!(gone_soon(escaped), "round {round}: what left the group outlived the attempt");
            let usage = usage.unwrap();
            assert!(usage.measured_by.starts_with("cgroup"), "{usage:?}");
            assert!(usage.cpu_user_ms + usage.cpu_system_ms > 0, "round {round}: {usage:?}");
            launchers.push(parent);
            if round == 1 {
                // Moved out, it would start the next attempts outside the cgroup: the cgroup
                // is removed, and the launcher ended.
                assert_eq!(launchers[1], launchers[0], "round 1 got another launcher");
                assert!(gone_soon(parent), "a launcher moved out of its cgroup still serves it");
                assert!(soon(|| !this.exists()), "{this:?} was kept");
                dir = None;
                continue;
            }
            // It lives in the cgroup, in each hierarchy, and outlived the attempt.
            assert!(!gone(parent), "round {round}: the launcher was killed");
            let procs = |h: &Option<PathBuf>| {
                h.as_ref()
                    .map(|h| std::fs::read_to_string(h.join(&name).join("cgroup.procs")).unwrap_or_default())
            };
            for h in [&hierarchies.memory, &hierarchies.cpuacct, &hierarchies.blkio] {
                if let Some(procs) = procs(h) {
                    assert!(
                        procs.lines().any(|p| p == parent.to_string()),
                        "round {round}: not in {h:?}/{name}"
                    );
                }
            }
        }
        assert_ne!(launchers[2], launchers[1], "round 2 was started by the launcher moved out");

        // An attempt with a memory limit has a cgroup of its own: started by a launcher that
        // does not live in a kept one, its fork moves itself there.
        let meter = Meter::new(true, u64::from(std::process::id()) << 8 | 9, Some(512 << 20));
        let limited = meter.cgroup_dir().unwrap().file_name().unwrap().to_string_lossy().into_owned();
        assert!(limited.starts_with("pype-attempt-"), "{limited}");
        let work = tempfile::tempdir().unwrap();
        let mut s = launched(work.path(), "echo $PPID; grep ':memory:' /proc/self/cgroup", &pool);
        s.meter = Some(meter);
        let (tx, _rx) = mpsc::channel(64);
        let (end, _) = run(s, &CancellationToken::new(), tx).await.unwrap();
        let out = std::fs::read_to_string(work.path().join("stdout")).unwrap();
        assert_eq!(end, ExecEnd::Exited(0), "{out}");
        let mut lines = out.lines();
        let parent: i32 = lines.next().unwrap().parse().unwrap();
        assert!(lines.next().unwrap().ends_with(&limited), "not in its limited cgroup: {out}");
        assert!(!launchers.contains(&parent), "a kept cgroup's launcher started a limited attempt");
        assert!(!memory_cgroup(parent).contains("pype-"), "its launcher lives in an attempt's cgroup");

        // An attempt that leaves more page cache charged than a kept cgroup may hold: the
        // cgroup is removed, and its launcher ends with it.
        let meter = Meter::new(true, 1, None);
        let dir = dir.unwrap();
        assert_eq!(meter.cgroup_dir(), Some(dir.as_path()));
        let mut s = launched(tmp.path(), "echo $PPID; head -c 8000000 /dev/urandom > big", &pool);
        s.meter = Some(meter);
        let (tx, _rx) = mpsc::channel(64);
        let (end, _) = run(s, &CancellationToken::new(), tx).await.unwrap();
        assert_eq!(end, ExecEnd::Exited(0));
        assert!(gone_soon(launchers[2]), "the launcher outlived its cgroup");
        // Removed on a thread of its own once the launcher has exited.
        assert!(soon(|| !dir.exists()), "{dir:?} is still there");
    }

    /// A cgroup spares its resident only while that lives: once it has exited, a process the
    /// kernel gives its pid (forced here through `ns_last_pid`) is killed with the rest.
    #[tokio::test]
    async fn a_cgroup_spares_its_resident_only_while_it_lives() {
        let test = "a_cgroup_spares_its_resident_only_while_it_lives";
        let Some(_one_at_a_time) = kept_cgroups(test).await else { return };
        let meter = Meter::new(true, 1, None);
        let Some(join) = meter.join() else {
            skip_without_cgroups(test);
            return;
        };
        assert!(join.takes_residents());
        let dir = meter.cgroup_dir().unwrap().to_path_buf();
        let mut resident = std::process::Command::new("sleep").arg("600").spawn().unwrap();
        let pid = resident.id();
        join.settle(pid).unwrap();
        let meter = tokio::task::spawn_blocking(move || {
            let _ = meter.finish();
        });
        meter.await.unwrap();
        assert!(!gone(pid as i32), "the live resident was killed");

        // It exits; a new process with its pid is placed in the cgroup, which the next
        // attempt holds.
        let _ = resident.kill();
        let _ = resident.wait();
        let mut reused = None;
        for _ in 0..200 {
            if let Err(e) = std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()) {
                assert!(
                    std::env::var_os("PYPE_REQUIRE_ALL").is_none_or(|v| v != "1"),
                    "{test}: cannot write ns_last_pid ({e}), and PYPE_REQUIRE_ALL=1 forbids skipping"
                );
                eprintln!("\n!!! SKIPPED the rest of {test}: cannot choose the next pid: {e}\n");
                return;
            }
            let child = std::process::Command::new("sleep").arg("600").spawn().unwrap();
            if child.id() == pid {
                reused = Some(child);
                break;
            }
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut reused = reused.expect("no process got the resident's pid again in 200 tries");
        let meter = Meter::new(true, 1, None);
        assert_eq!(meter.cgroup_dir(), Some(dir.as_path()), "the kept cgroup was not reused");
        meter.join().unwrap().place(pid).unwrap();
        let meter = tokio::task::spawn_blocking(move || {
            let _ = meter.finish();
        });
        meter.await.unwrap();
        assert!(gone_soon(pid as i32), "a process with the dead resident's pid was spared");
        let _ = reused.wait();
    }

    /// A process that left the snippet's process group (`setsid`) is still in the attempt's
    /// cgroup: the attempt's end kills it there, and the emptied cgroup goes back to the pool.
    #[tokio::test]
    async fn a_process_that_left_the_group_dies_with_the_attempts_cgroup() {
        let test = "a_process_that_left_the_group_dies_with_the_attempts_cgroup";
        if !mounts::tests::root_or_skip(test) {
            return;
        }
        let _one_at_a_time = CGROUP_POOL.lock().await;
        let tmp = tempfile::tempdir().unwrap();
        let meter = Meter::new(true, 1, None);
        let Some(dir) = meter.cgroup_dir().map(Path::to_path_buf) else {
            skip_without_cgroups(test);
            return;
        };
        let pid_file = tmp.path().join("escaped.pid");
        let script = format!(
            "setsid bash -c 'echo $$ > {p}; exec sleep 300' </dev/null >/dev/null 2>&1 &\n\
             while [ ! -s {p} ]; do sleep 0.01; done",
            p = pid_file.display()
        );
        let mut s = spec(tmp.path(), &script, None);
        s.meter = Some(meter);
        let (tx, _rx) = mpsc::channel(64);
        let (end, usage) = run(s, &CancellationToken::new(), tx).await.unwrap();
        assert_eq!(end, ExecEnd::Exited(0));
        assert!(usage.is_some());
        let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        // Gone, or a zombie until init reaps it: not running.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|st| st.rsplit_once(") ").map(|(_, rest)| rest.chars().next()));
        assert!(matches!(state, None | Some(Some('Z'))), "the escaped process {pid} survived: {state:?}");
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        assert!(procs.trim().is_empty(), "left in {dir:?}: {procs}");
    }

    /// All three ways into the attempt's cgroups (a launcher's fork joining them itself, the
    /// gate, and `pre_exec` when `BASH_ENV` would run code before the gate) put the shell and
    /// what it starts there, and leave the snippet an empty stdin.
    #[tokio::test]
    async fn a_snippet_and_its_children_run_in_the_attempts_cgroups_gated_or_not() {
        let test = "a_snippet_and_its_children_run_in_the_attempts_cgroups_gated_or_not";
        if !mounts::tests::root_or_skip(test) {
            return;
        }
        let _one_at_a_time = CGROUP_POOL.lock().await;
        let launch = tempfile::tempdir().unwrap();
        let pool = pool(launch.path());
        for (i, (bash_env, launcher)) in
            [(false, false), (true, false), (false, true)].into_iter().enumerate()
        {
            let attempt = (u64::from(std::process::id()) << 8) + i as u64;
            let meter = Meter::new(true, attempt, None);
            let meter_dir = meter.cgroup_dir().map(Path::to_path_buf).unwrap_or_default();
            if meter.join().is_none() {
                skip_without_cgroups(test);
                return;
            }
            let tmp = tempfile::tempdir().unwrap();
            let script = "cat /proc/self/cgroup; (cat /proc/self/cgroup) & wait; \
                          if read -r line; then echo \"stdin: $line\"; else echo stdin-empty; fi; \
                          echo \"parent $PPID\"";
            let mut s =
                if launcher { launched(tmp.path(), script, &pool) } else { spec(tmp.path(), script, None) };
            s.meter = Some(meter);
            if bash_env {
                std::fs::write(tmp.path().join("env.sh"), "echo sourced\n").unwrap();
                s.env.push(("BASH_ENV".into(), tmp.path().join("env.sh").to_string_lossy().into_owned()));
            }
            let (tx, _rx) = mpsc::channel(64);
            let (end, usage) = run(s, &CancellationToken::new(), tx).await.unwrap();
            let out = std::fs::read_to_string(tmp.path().join("stdout")).unwrap();
            let err = std::fs::read_to_string(tmp.path().join("stderr")).unwrap_or_default();
            assert_eq!(end, ExecEnd::Exited(0), "bash_env={bash_env}: {out}{err}");
            // The cgroup this attempt had (a kept one is named after its agent, not the attempt).
            let name = meter_dir.file_name().unwrap().to_string_lossy().into_owned();
            // The memory hierarchy's line (v1), or the unified one where memory is there (v2).
            let controllers = if Hierarchies::get().v2.is_some() { "" } else { "memory" };
            let memory: Vec<&str> = out
                .lines()
                .filter(|l| l.split(':').nth(1).is_some_and(|c| c.split(',').any(|c| c == controllers)))
                .collect();
            assert!(memory.len() >= 2, "bash_env={bash_env}: {out}");
            assert!(memory.iter().all(|l| l.ends_with(&name)), "bash_env={bash_env}: not in {name}: {out}");
            assert!(out.contains("stdin-empty"), "bash_env={bash_env}: {out}");
            assert_eq!(out.contains("sourced"), bash_env, "{out}");
            let agent = format!("parent {}", std::process::id());
            assert_eq!(!out.contains(&agent), launcher, "launched or not: {out}");
            assert!(usage.is_some_and(|u| u.measured_by.starts_with("cgroup")));
        }
        // An exported function named like the gate's `read` would run before the gate, maybe
        // before the agent has moved the shell (a race the agent almost always wins, so this
        // cannot show it): with one in the environment the child joins its cgroups itself,
        // before bash starts, and the function runs inside them.
        let tmp = tempfile::tempdir().unwrap();
        let meter = Meter::new(true, u64::from(std::process::id()) << 8 | 7, None);
        let name = meter.cgroup_dir().unwrap().file_name().unwrap().to_string_lossy().into_owned();
        let mut s = spec(tmp.path(), "read -r _ < /dev/null || true", None);
        s.meter = Some(meter);
        let early = tmp.path().join("early");
        s.env.push((
            "BASH_FUNC_read%%".into(),
            format!("() {{ cat /proc/self/cgroup >> {}; builtin read \"$@\"; }}", early.display()),
        ));
        let (tx, _rx) = mpsc::channel(64);
        let (end, _) = run(s, &CancellationToken::new(), tx).await.unwrap();
        assert_eq!(end, ExecEnd::Exited(0));
        let seen = std::fs::read_to_string(&early).unwrap();
        let controllers = if Hierarchies::get().v2.is_some() { "" } else { "memory" };
        let lines: Vec<&str> = seen
            .lines()
            .filter(|l| l.split(':').nth(1).is_some_and(|c| c.split(',').any(|c| c == controllers)))
            .collect();
        assert!(!lines.is_empty() && lines.iter().all(|l| l.ends_with(&name)), "ran outside {name}: {seen}");
    }

    #[tokio::test]
    async fn a_launched_snippet_sees_what_bash_c_shows_it() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = pool(tmp.path());
        let cwd = tmp.path().join("work dir 'quoted'");
        std::fs::create_dir_all(&cwd).unwrap();
        let env = vec![
            ("AGENT".to_string(), std::process::id().to_string()),
            ("TRICKY".to_string(), "it's \"quoted\" $HOME `date` \\\nsecond line".to_string()),
            ("EMPTY".to_string(), String::new()),
        ];
        let run_one = |launcher: bool| {
            let mut s =
                if launcher { launched(tmp.path(), PROBE, &pool) } else { spec(tmp.path(), PROBE, None) };
            // As on an agent: `command.sh` is in the snippet's working directory.
            s.cwd = cwd.clone();
            s.record = cwd.join("command.sh");
            s.env = env.clone();
            outcome(s)
        };
        let (end, plain, err) = run_one(false).await;
        assert_eq!(end, ExecEnd::Exited(0), "{err}");
        let (end, warm, err) = run_one(true).await;
        assert_eq!(end, ExecEnd::Exited(0), "{err}");
        assert!(plain.contains("parent is the agent: yes"), "{plain}");
        assert!(warm.contains("parent is the agent: no"), "not started by a launcher: {warm}");
        let same = |t: &str| t.replace("parent is the agent: no", "parent is the agent: yes");
        assert_eq!(same(&warm), plain);
        assert!(plain.contains("leads its process group") && plain.contains("is its own pid"), "{plain}");
    }

    /// The launcher's pid a launched snippet printed first (its `$PPID`).
    fn parent(out: &str) -> u32 {
        out.lines().next().and_then(|l| l.parse().ok()).unwrap_or_else(|| panic!("no parent in {out:?}"))
    }

    /// A launched snippet's exit code and both streams come back; one that times out goes
    /// with its whole group, and its launcher then starts the next snippet.
    #[tokio::test]
    async fn a_launched_snippet_ends_like_bash_c_and_its_launcher_serves_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = pool(tmp.path());
        let (end, out, err) = outcome(launched(tmp.path(), "echo $PPID; echo oops >&2; exit 3", &pool)).await;
        assert_eq!((end, err.as_str()), (ExecEnd::Exited(3), "oops\n"));
        let launcher = parent(&out);
        assert_ne!(launcher, std::process::id(), "not started by a launcher");
        // Its command.sh is the script it ran, after the record of its process group.
        let (end, out, _) = outcome(launched(tmp.path(), "echo $$", &pool)).await;
        assert_eq!(end, ExecEnd::Exited(0));
        let text = std::fs::read_to_string(tmp.path().join("command.sh")).unwrap();
        let pid: i32 = out.trim().parse().unwrap();
        assert_eq!(recorded_group(&text).map(|(p, _)| p), Some(pid), "{text}");
        assert!(
            text.starts_with("set -eo pipefail # pype: process group ") && text.ends_with("\necho $$"),
            "{text}"
        );

        let mut s = launched(tmp.path(), "echo $PPID; sleep 600 & echo $!; wait", &pool);
        s.timeout = Some(Duration::from_millis(500));
        let (end, out, _) = outcome(s).await;
        assert_eq!(end, ExecEnd::TimedOut);
        assert_eq!(parent(&out), launcher, "the same launcher again");
        let sleep: i32 = out.lines().nth(1).unwrap().parse().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{sleep}/stat"))
            .is_ok_and(|s| !s.rsplit(") ").next().is_some_and(|r| r.starts_with('Z')))
        {
            assert!(std::time::Instant::now() < deadline, "the background sleep outlived the timeout");
            std::thread::sleep(Duration::from_millis(20));
        }

        let (end, out, _) = outcome(launched(tmp.path(), "echo $PPID; set -o | grep -c 'on$'", &pool)).await;
        assert_eq!(end, ExecEnd::Exited(0));
        assert_eq!(parent(&out), launcher, "the launcher was given back after the timeout");
    }

    /// What a launcher cannot start exactly as `bash -c` would goes to `bash -c`, with the
    /// same result; the launchers go on serving the snippets they can start.
    #[tokio::test]
    async fn a_snippet_a_launcher_cannot_start_goes_to_bash_c() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = pool(tmp.path());
        let me = std::process::id();
        // A name bash cannot export, and one it gives a meaning of its own (exported from a
        // shell, it would not reach the snippet's children).
        for (name, value) in [("odd-name", "1"), ("GROUPS", "case,control")] {
            let mut s = launched(tmp.path(), &format!("echo $PPID; env | grep '^{name}='"), &pool);
            s.env.push((name.into(), value.into()));
            let (end, out, err) = outcome(s).await;
            assert_eq!(end, ExecEnd::Exited(0), "{err}");
            let seen = format!("{name}={value}");
            assert_eq!((parent(&out), out.lines().nth(1)), (me, Some(seen.as_str())));
        }
        // A working directory that is not there: the launcher's fork gives up before the
        // snippet, and `bash -c` fails to start as it always did.
        let mut s = launched(tmp.path(), "echo ran > ran", &pool);
        s.cwd = tmp.path().join("missing");
        let (tx, _rx) = mpsc::channel(16);
        let failed = run(s, &CancellationToken::new(), tx).await.map(|(end, _)| end);
        assert!(failed.as_ref().is_err_and(|e| format!("{e:#}").contains("starting bash")), "{failed:?}");
        assert!(!tmp.path().join("ran").exists());
        // The launchers are not given up on for that.
        let (end, out, _) = outcome(launched(tmp.path(), "echo $PPID", &pool)).await;
        assert_eq!(end, ExecEnd::Exited(0));
        assert_ne!(parent(&out), me, "launchers were given up on");
    }

    /// A stopped snippet is waited for until it continues and ends (a batch system's suspend
    /// and resume), launched or not; a snippet that stops its launcher and exits still has
    /// its end reported.
    #[tokio::test]
    async fn a_stopped_snippet_or_launcher_is_waited_for() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = pool(tmp.path());
        let script = "( sleep 0.5; kill -CONT $$ ) & kill -STOP $$; echo resumed; exit 6";
        for launcher in [false, true] {
            let s =
                if launcher { launched(tmp.path(), script, &pool) } else { spec(tmp.path(), script, None) };
            let (end, out, err) = outcome(s).await;
            assert_eq!((end, out.as_str()), (ExecEnd::Exited(6), "resumed\n"), "launcher={launcher}: {err}");
        }
        let started = std::time::Instant::now();
        let (end, out, err) =
            outcome(launched(tmp.path(), "echo $PPID; kill -STOP $PPID; exit 5", &pool)).await;
        assert_eq!(end, ExecEnd::Exited(5), "{err}");
        assert!(started.elapsed() < Duration::from_secs(20));
        // The launcher was continued, and serves the next snippet.
        let (end, again, _) = outcome(launched(tmp.path(), "echo $PPID", &pool)).await;
        assert_eq!((end, parent(&again)), (ExecEnd::Exited(0), parent(&out)));
    }

    /// A snippet that kills its launcher fails (its end cannot be known), and the next
    /// snippet gets a new launcher.
    #[tokio::test]
    async fn a_snippet_that_kills_its_launcher_fails_and_the_next_gets_a_new_one() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = pool(tmp.path());
        let (end, out, _) = outcome(launched(tmp.path(), "echo $PPID", &pool)).await;
        assert_eq!(end, ExecEnd::Exited(0));
        let first = parent(&out);
        let (tx, _rx) = mpsc::channel(16);
        let s = launched(tmp.path(), "kill -9 $PPID; sleep 600", &pool);
        let started = std::time::Instant::now();
        let failed = run(s, &CancellationToken::new(), tx).await.map(|(end, _)| end);
        assert!(failed.as_ref().is_err_and(|e| format!("{e:#}").contains("launcher")), "{failed:?}");
        assert!(started.elapsed() < Duration::from_secs(30), "waited for the orphaned snippet");
        let (end, out, _) = outcome(launched(tmp.path(), "echo $PPID", &pool)).await;
        assert_eq!(end, ExecEnd::Exited(0));
        let second = parent(&out);
        assert!(second != first && second != std::process::id(), "{first} then {second}");
    }

    /// A snippet that sends its launcher a request of its own (through `/proc`) runs nothing
    /// again: a request runs only under its own number, and the launcher's answer about a
    /// number the agent did not send is not taken for the next snippet's.
    #[tokio::test]
    async fn a_request_a_snippet_sends_its_launcher_runs_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = pool(tmp.path());
        let marker = tmp.path().join("ran");
        let script = format!("echo $PPID; echo once >> '{}'; echo 999 > /proc/$PPID/fd/0", marker.display());
        let (end, out, err) = outcome(launched(tmp.path(), &script, &pool)).await;
        assert_eq!(end, ExecEnd::Exited(0), "{err}");
        let launcher = parent(&out);
        // The launcher has run the injected request by now or will before the next one.
        let (end, out, err) = outcome(launched(tmp.path(), "echo $PPID; exit 4", &pool)).await;
        assert_eq!(end, ExecEnd::Exited(4), "{err}");
        assert_eq!(parent(&out), launcher);
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "once\n");
    }

    #[test]
    fn the_group_is_read_back_from_command_sh_or_an_older_pid_file() {
        let text = format!("{}true\n", record_header(4242, 987654));
        assert_eq!(recorded_group(&text), Some((4242, 987654)));
        // A launched snippet's script: the record follows bash's options on its first line.
        let text =
            "set -eo pipefail # pype: process group 4242, started 987654 clock ticks after boot\ntrue\n";
        assert_eq!(recorded_group(text), Some((4242, 987654)));
        assert_eq!(recorded_group("4242 987654\n"), Some((4242, 987654)), "an older agent's pid file");
        for bad in [
            "",
            "true\n",
            "# pype: process group 0, started 5",
            "# pype: process group -1, started 5",
            "# pype: process group x, started 5",
            "# pype: process group 12",
            "4242",
            "4242 x",
        ] {
            assert_eq!(recorded_group(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_recorded_group_is_gone_when_kill_recorded_returns() {
        use std::os::unix::process::CommandExt;
        let tmp = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("bash")
            .args(["-c", "sleep 600 & sleep 600 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let started = start_time(pid).unwrap();
        let record = tmp.path().join("command.sh");
        std::fs::write(&record, format!("{}sleep 600 & sleep 600 & wait\n", record_header(pid, started)))
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("stat"))
                    .is_ok_and(|s| s.contains("(sleep)") && s.split(' ').nth(4) == Some(&pid.to_string()))
            })
            .count()
            < 2
        {
            assert!(std::time::Instant::now() < deadline, "the sleeps never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(group_has_live_process(pid));
        assert!(kill_recorded(&record));
        // The leader is our child: a zombie until we reap it, which counts as gone.
        assert!(!group_has_live_process(pid), "kill_recorded returned with the group alive");
        let _ = child.wait();
        // A record naming another start time for a live process kills nothing.
        std::fs::write(&record, record_header(std::process::id() as i32, 1)).unwrap();
        assert!(!kill_recorded(&record));
    }
}
