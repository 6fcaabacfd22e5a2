//! A child process whose stderr (its log) is captured line by line and waited on, never slept on.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

type Lines = Arc<(Mutex<Vec<String>>, Condvar)>;

/// A child process whose stderr is captured line by line.
pub struct Proc {
    pub name: String,
    pub child: Child,
    lines: Lines,
    cmdline: String,
    /// Where its stdout goes, when kept ([`Proc::spawn_keeping_stdout`]).
    stdout: Option<std::fs::File>,
}

impl Proc {
    /// Spawns `cmd` with stdout discarded.
    pub fn spawn(name: &str, cmd: Command) -> Proc {
        Self::spawn_with(name, cmd, None)
    }

    /// Spawns `cmd` with its stdout kept (in an anonymous temp file) for [`Proc::stdout`].
    pub fn spawn_keeping_stdout(name: &str, cmd: Command) -> Proc {
        let file = tempfile::tempfile().expect("a temp file for stdout");
        Self::spawn_with(name, cmd, Some(file))
    }

    fn spawn_with(name: &str, mut cmd: Command, stdout: Option<std::fs::File>) -> Proc {
        let cmdline = format!("{cmd:?}");
        let out = match &stdout {
            Some(f) => Stdio::from(f.try_clone().expect("duplicating the stdout file")),
            None => Stdio::null(),
        };
        cmd.stdin(Stdio::null()).stdout(out).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmdline}: {e}"));
        let lines: Lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (lock, cv) = &*sink;
                lock.lock().unwrap().push(line);
                cv.notify_all();
            }
        });
        Proc { name: name.to_string(), child, lines, cmdline, stdout }
    }

    /// What the process wrote to stdout so far (spawned with [`Proc::spawn_keeping_stdout`]).
    pub fn stdout(&self) -> String {
        let file = self.stdout.as_ref().unwrap_or_else(|| panic!("{}: stdout was not kept", self.name));
        // Positional reads: the file offset is the child's.
        let mut buf = vec![0u8; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut buf, 0).unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Waits until a log line contains every one of `needles`; returns it.
    pub fn wait_for(&self, needles: &[&str], timeout: Duration) -> String {
        self.wait_for_nth(needles, 1, timeout)
    }

    /// Waits until `n` log lines contain every one of `needles`; returns the n-th.
    pub fn wait_for_nth(&self, needles: &[&str], n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.lines;
        let mut lines = lock.lock().unwrap();
        loop {
            let hits: Vec<&String> = lines.iter().filter(|l| needles.iter().all(|n| l.contains(n))).collect();
            if hits.len() >= n {
                return hits[n - 1].clone();
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                panic!(
                    "{}: no log line with {needles:?} (x{n}) within {timeout:?}\n{}",
                    self.name,
                    self.dump()
                );
            }
            lines = cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    pub fn count(&self, needles: &[&str]) -> usize {
        self.lines.0.lock().unwrap().iter().filter(|l| needles.iter().all(|n| l.contains(n))).count()
    }

    pub fn dump(&self) -> String {
        format!("--- {} ({})\n{}\n---", self.name, self.cmdline, self.lines.0.lock().unwrap().join("\n"))
    }

    /// Sends `sig` to the process (nothing if it is gone).
    pub fn signal(&self, sig: Signal) {
        let _ = kill_process(Pid::from_child(&self.child), sig);
    }

    /// Waits for exit; panics with the logs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                panic!("{} did not exit within {timeout:?}\n{}", self.name, self.dump());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.dump());
        }
    }
}

/// Sends `sig` to process `pid`, one this test started (nothing if it is gone).
pub fn signal_pid(pid: i32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = kill_process(pid, sig);
    }
}
