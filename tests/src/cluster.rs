//! One test's world: a temp dir with the coordinator's state dir in it, a `serve` coordinator
//! and agents when the test asks for them, and the CLI and `run` helpers the tests share.
//!
//! ```text
//! let fx = Cluster::new().serve().agent(Agent::named("a1").env("PYPE_OVERLAY_MODE", "snapshot"));
//! fx.coord().proc.wait_for(&["agent joined", "a1"], T);
//! let (run, p) = fx.run_ok(&[fx.pipeline("p.toml", "name = \"x\" ...").to_str().unwrap()]);
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Bins, HEARTBEAT_MS, LONG, Proc, T, bins, run_id};

/// A `pype-coordinator serve` with its own state dir.
pub struct Coord {
    pub proc: Proc,
    pub state_dir: PathBuf,
    pub addr: SocketAddr,
}

impl Coord {
    /// The CA certificate agents are given (`--ca`).
    pub fn ca(&self) -> PathBuf {
        self.state_dir.join("ca.pem")
    }
}

/// How a [`Cluster`] starts one agent: `Agent::named("a1").env("PYPE_OVERLAY_MODE", "direct")`.
#[derive(Clone, Debug)]
pub struct Agent {
    name: String,
    dir: Option<PathBuf>,
    env: Vec<(String, String)>,
    labels: Vec<String>,
    token: Token,
}

#[derive(Clone, Debug)]
enum Token {
    /// A token made for this agent alone (`token create`).
    Fresh,
    Given(String),
    /// None: the agent's state dir already holds its certificate.
    Enrolled,
}

impl Agent {
    /// Agent `name`, in state dir `<temp dir>/<name>`, enrolling with a token of its own.
    pub fn named(name: &str) -> Agent {
        Agent { name: name.into(), dir: None, env: Vec::new(), labels: Vec::new(), token: Token::Fresh }
    }

    /// Its state dir (`--state-dir`).
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Agent {
        self.dir = Some(dir.into());
        self
    }

    /// An environment variable of its process (`PYPE_OVERLAY_MODE`, ...).
    pub fn env(mut self, key: &str, value: &str) -> Agent {
        self.env.push((key.into(), value.into()));
        self
    }

    /// A scheduling label `KEY=VALUE` (`--label`).
    pub fn label(mut self, label: &str) -> Agent {
        self.labels.push(label.into());
        self
    }

    /// Enrolls with `token` (shared, used up, expired, ...).
    pub fn token(mut self, token: &str) -> Agent {
        self.token = Token::Given(token.into());
        self
    }

    /// Starts without a token: its state dir already holds a certificate.
    pub fn enrolled(mut self) -> Agent {
        self.token = Token::Enrolled;
        self
    }
}

/// A temp dir, the state dir `<temp dir>/state`, and what runs on it. Fields drop in order:
/// agents, then the coordinator, then the temp dir.
pub struct Cluster {
    /// Agents started by [`Cluster::agent`], in order.
    pub agents: Vec<Proc>,
    specs: Vec<Agent>,
    coord: Option<Coord>,
    /// Environment of every coordinator process started here: `serve`, `run` and the CLI.
    env: Vec<(String, String)>,
    heartbeat_ms: u64,
    pub bins: Bins,
    pub dir: tempfile::TempDir,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster::new()
    }
}

impl Cluster {
    /// A fresh temp dir; nothing started.
    pub fn new() -> Cluster {
        Cluster {
            agents: Vec::new(),
            specs: Vec::new(),
            coord: None,
            env: Vec::new(),
            heartbeat_ms: HEARTBEAT_MS,
            bins: bins(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// An environment variable for every coordinator process (`SLURM_CONF`, credentials).
    pub fn env(mut self, key: &str, value: &str) -> Cluster {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Heartbeat interval of `serve` and `run` (default [`HEARTBEAT_MS`]).
    pub fn heartbeat_ms(mut self, ms: u64) -> Cluster {
        self.heartbeat_ms = ms;
        self
    }

    /// Starts `serve` on 127.0.0.1, port 0.
    pub fn serve(self) -> Cluster {
        self.serve_on("127.0.0.1:0")
    }

    /// Starts `serve` on `listen`.
    pub fn serve_on(mut self, listen: &str) -> Cluster {
        self.start_coordinator(listen);
        self
    }

    /// Starts an agent of the coordinator, kept in [`Cluster::agents`].
    pub fn agent(mut self, agent: Agent) -> Cluster {
        let proc = self.spawn_agent(agent.clone());
        self.specs.push(agent);
        self.agents.push(proc);
        self
    }

    // -- Paths --------------------------------------------------------------------------------

    /// The temp dir, as `{d}` in pipeline texts.
    pub fn d(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// A path under the temp dir.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// [`Cluster::p`] as a string.
    pub fn pstr(&self, rel: &str) -> String {
        self.p(rel).display().to_string()
    }

    /// The coordinator's state dir.
    pub fn state(&self) -> PathBuf {
        self.p("state")
    }

    // -- The coordinator ----------------------------------------------------------------------

    /// The `serve` coordinator; panics when none runs.
    pub fn coord(&self) -> &Coord {
        self.coord.as_ref().expect("no coordinator: start one with serve()")
    }

    /// Starts `serve` on `listen` and waits for its address.
    pub fn start_coordinator(&mut self, listen: &str) -> &Coord {
        let mut cmd = self.command();
        cmd.arg("serve").arg("--listen").arg(listen);
        cmd.arg("--heartbeat-interval-ms").arg(self.heartbeat_ms.to_string());
        let proc = Proc::spawn("coordinator", cmd);
        let line = proc.wait_for(&["coordinator listening"], T);
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        self.coord.insert(Coord { proc, state_dir: self.state(), addr })
    }

    /// Kills the coordinator (SIGKILL); returns the address it listened on.
    pub fn kill_coordinator(&mut self) -> SocketAddr {
        let coord = self.coord.take().expect("no coordinator to kill");
        coord.addr
    }

    // -- Agents -------------------------------------------------------------------------------

    /// Starts an agent of the coordinator; the caller owns it.
    pub fn spawn_agent(&self, agent: Agent) -> Proc {
        let coord = self.coord();
        let dir = agent.dir.clone().unwrap_or_else(|| self.p(&agent.name));
        let mut cmd = Command::new(&self.bins.agent);
        cmd.envs(agent.env.iter().map(|(k, v)| (k, v)));
        cmd.arg("run")
            .arg("--coordinator")
            .arg(coord.addr.to_string())
            .arg("--ca")
            .arg(coord.ca())
            .arg("--state-dir")
            .arg(dir)
            .arg("--name")
            .arg(&agent.name)
            .arg("--min-backoff-ms")
            .arg("50")
            .arg("--max-backoff-ms")
            .arg("500");
        for label in &agent.labels {
            cmd.arg("--label").arg(label);
        }
        match &agent.token {
            Token::Fresh => {
                cmd.arg("--token").arg(self.token(&[]));
            }
            Token::Given(t) => {
                cmd.arg("--token").arg(t);
            }
            Token::Enrolled => {}
        }
        Proc::spawn(&format!("agent {}", agent.name), cmd)
    }

    /// Starts agent `i` of [`Cluster::agents`] again, from the certificate in its state dir;
    /// the process it replaces is killed.
    pub fn restart_agent(&mut self, i: usize) -> &mut Proc {
        let proc = self.spawn_agent(self.specs[i].clone().enrolled());
        self.agents[i] = proc;
        &mut self.agents[i]
    }

    /// `token create EXTRA...`: an enrollment token.
    pub fn token(&self, extra: &[&str]) -> String {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(extra);
        self.cli_ok(&args).trim().to_string()
    }

    /// Enrolls an identity for the test itself (a hand-made agent), through the real
    /// enrollment path, with state dir `<temp dir>/<name>`.
    pub async fn enroll_identity(&self, name: &str) -> agent::session::Identity {
        let coord = self.coord();
        let dir = self.p(name);
        let token = self.token(&[]);
        let ca = std::fs::read_to_string(coord.ca()).unwrap();
        let cfg = crate::hollow::agent_config(coord.addr, &ca, &dir, name, &token);
        agent::session::enroll(&cfg, &token).await.unwrap()
    }

    // -- The CLI ------------------------------------------------------------------------------

    /// `pype-coordinator --state-dir STATE`, with this cluster's environment.
    pub fn command(&self) -> Command {
        self.command_at(&self.state())
    }

    /// `pype-coordinator --state-dir STATE` for another state dir.
    pub fn command_at(&self, state: &Path) -> Command {
        let mut cmd = Command::new(&self.bins.coordinator);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.arg("--state-dir").arg(state);
        cmd
    }

    /// Runs `pype-coordinator ARGS...` to its end; returns (ok, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.command().args(args).output().expect("running pype-coordinator");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// [`Cluster::cli`] that must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cli(args);
        let logs = self.coord.as_ref().map(|c| c.proc.dump()).unwrap_or_default();
        assert!(ok, "pype-coordinator {args:?} failed:\n{out}\n{err}\n{logs}");
        out
    }

    // -- Pipelines ----------------------------------------------------------------------------

    /// Writes pipeline file `name` in the temp dir; `{d}` in `text` becomes the temp dir.
    pub fn pipeline(&self, name: &str, text: &str) -> PathBuf {
        let path = self.p(name);
        std::fs::write(&path, text.replace("{d}", &self.d())).unwrap();
        path
    }

    /// Starts `pype-coordinator run --heartbeat-interval-ms HB ARGS...`, stdout kept.
    pub fn start_run(&self, args: &[&str]) -> Proc {
        self.start_run_at(&self.state(), args, &[])
    }

    /// [`Cluster::start_run`] with more environment (the local agents inherit it).
    pub fn start_run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Proc {
        self.start_run_at(&self.state(), args, env)
    }

    /// [`Cluster::start_run_env`] on another state dir.
    pub fn start_run_at(&self, state: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = self.command_at(state);
        cmd.envs(env.iter().copied());
        cmd.arg("run").arg("--heartbeat-interval-ms").arg(self.heartbeat_ms.to_string()).args(args);
        Proc::spawn_keeping_stdout("run", cmd)
    }

    /// Runs to the end (within [`LONG`]); returns (success, the run id, the process for its log).
    pub fn run(&self, args: &[&str]) -> (bool, String, Proc) {
        self.run_env(args, &[])
    }

    /// [`Cluster::run`] with more environment.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> (bool, String, Proc) {
        let mut p = self.start_run_env(args, env);
        let status = p.wait_exit(LONG);
        let line = p.wait_for(&["run started"], Duration::from_secs(1));
        (status.success(), run_id(&line), p)
    }

    /// [`Cluster::run`] that must succeed; returns the run id and the process.
    pub fn run_ok(&self, args: &[&str]) -> (String, Proc) {
        let (ok, id, p) = self.run(args);
        assert!(ok, "run failed\n{}", p.dump());
        (id, p)
    }

    /// `status RUN`'s step table: (step, state, attempts, agent); the agent only for steps
    /// that ran (succeeded, failed, running).
    pub fn steps(&self, run: &str) -> Vec<(String, String, u32, String)> {
        let out = self.cli_ok(&["status", run]);
        let mut rows = Vec::new();
        let mut in_steps = false;
        for line in out.lines() {
            if line.starts_with("STEP ") {
                in_steps = true;
                continue;
            }
            if !in_steps || line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let agent = if f[1] == "succeeded" || f[1] == "failed" || f[1] == "running" {
                f[3].to_string()
            } else {
                String::new()
            };
            rows.push((f[0].to_string(), f[1].to_string(), f[2].parse().unwrap(), agent));
        }
        rows
    }

    /// One step of `status RUN`: (state, attempts, agent).
    pub fn state_of(&self, run: &str, step: &str) -> (String, u32, String) {
        let row = self.steps(run).into_iter().find(|r| r.0 == step);
        let row = row.unwrap_or_else(|| panic!("no step {step} in\n{}", self.cli_ok(&["status", run])));
        (row.1, row.2, row.3)
    }
}

/// How many times a run's log says `step` was dispatched.
pub fn dispatched(p: &Proc, step: &str) -> usize {
    p.count(&["step dispatched", &format!("step=\"{step}\"")])
}
