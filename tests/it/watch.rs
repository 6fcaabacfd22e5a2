//! `status --watch` in a real terminal: tmux runs it, `capture-pane` reads the screen,
//! `send-keys` quits it.

use std::process::Command;
use std::time::{Duration, Instant};

use tests::{Agent, Cluster, LONG, Proc, have, skip};

/// The tmux server of this test (its own socket, so nothing else's sessions are touched).
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.socket);
        c
    }

    fn screen(&self) -> String {
        let out = self.cmd().args(["capture-pane", "-p", "-t", "watch"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen shows every one of `needles`; panics with the screen if not.
    fn wait_for(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.screen();
            if needles.iter().all(|n| s.contains(n)) {
                return s;
            }
            assert!(Instant::now() < deadline, "the screen never showed {needles:?}:\n{s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn alive(&self) -> bool {
        self.cmd().args(["has-session", "-t", "watch"]).output().is_ok_and(|o| o.status.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

#[test]
fn status_watch_follows_a_run_in_a_real_terminal() {
    if !have("tmux") {
        skip(
            "watch::status_watch_follows_a_run_in_a_real_terminal",
            "tmux is missing",
            "./ci-setup installs it",
        );
        return;
    }
    let fx = Cluster::new().serve().agent(Agent::named("w1")).agent(Agent::named("w2"));
    let coord = fx.coord();
    coord.proc.wait_for_nth(&["agent joined"], 2, LONG);
    std::fs::create_dir_all(fx.p("marks")).unwrap();
    let pipeline = fx.pipeline(
        "p.toml",
        r#"
name = "watched"
[[steps]]
name = "quick"
command = "true"
[[steps]]
name = "slowpoke"
command = "while [ ! -e {d}/marks/go ]; do sleep 0.1; done"
"#,
    );
    let mut cmd = fx.command();
    cmd.args(["run", "--coordinator", &coord.addr.to_string(), pipeline.to_str().unwrap()]);
    let mut run = Proc::spawn_keeping_stdout("run", cmd);
    coord.proc.wait_for(&["step started", "step=\"slowpoke\""], LONG);

    let tmux = Tmux { socket: fx.p("tmux.sock") };
    let watch =
        format!("{} --state-dir {} status --watch", fx.bins.coordinator.display(), fx.state().display());
    let ok = tmux
        .cmd()
        .args(["new-session", "-d", "-s", "watch", "-x", "150", "-y", "40", &watch])
        .status()
        .unwrap()
        .success();
    assert!(ok, "tmux new-session failed");
    // The run, its steps as they stand, and both agents, with the one running the step.
    let s = tmux.wait_for(&[
        "run watched-",
        "running",
        "STEP",
        "slowpoke",
        "quick",
        "succeeded",
        "agents (2)",
        "w1",
        "w2",
    ]);
    let line = s.lines().find(|l| l.contains("slowpoke")).unwrap();
    assert!(line.contains("running"), "{s}");
    // It follows the run: the step ends, the view says so within a refresh or two.
    std::fs::write(fx.p("marks/go"), "").unwrap();
    assert!(run.wait_exit(LONG).success(), "{}", run.dump());
    let s = tmux.wait_for(&["run watched-", ": succeeded for"]);
    let line = s.lines().find(|l| l.contains("slowpoke")).unwrap();
    assert!(line.contains("succeeded"), "{s}");
    // q leaves, and the terminal is given back.
    tmux.cmd().args(["send-keys", "-t", "watch", "q"]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.alive() {
        assert!(Instant::now() < deadline, "q did not end the view:\n{}", tmux.screen());
        std::thread::sleep(Duration::from_millis(100));
    }
}
