//! The command line: clap's types and what each command does. Commands that act on a
//! running coordinator go through [`admin`]; the others open the state dir themselves.

pub mod admin;
pub mod client;
pub mod display;
pub mod instances;
pub mod profiles;
pub mod registry;
pub mod runs;
pub mod status;
pub mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use admin::{admin, admin_stream, unexpected};

use crate::persist::{config, state, working};
use crate::pipeline::stepfile;
use crate::provision::provider;
use protocol::{AdminRequest, AdminResponse, Compression};
use tokio_util::sync::CancellationToken;
use transport::telemetry::LogFormat;

/// Runs pipelines of steps on pype agents.
#[derive(Parser, Debug)]
#[command(name = "pype-coordinator", version)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "human", global = true)]
    log_format: LogFormat,
    /// State directory: CA, certificates, state database, registry, snapshots, run logs
    /// [default: /var/lib/pype/coordinator as root, else ~/.local/state/pype/coordinator].
    #[arg(long, env = "PYPE_STATE_DIR", global = true)]
    state_dir: Option<PathBuf>,
    /// Coordinator config file (TOML; `[store]`: local or s3)
    /// [default: <state>/coordinator.toml when it exists].
    #[arg(long, env = "PYPE_COORDINATOR_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics (OpenMetrics text at /metrics) on this TCP address while
    /// `serve` or an embedded `run` lasts [default: off].
    #[arg(long, env = "PYPE_METRICS_LISTEN", global = true)]
    metrics_listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a pipeline: on an embedded coordinator with local agents (the default), or on a
    /// running `serve` (--coordinator). Prints where the final outputs are.
    Run(Box<RunArgs>),
    /// Print what `run` with the same backend and options would do with each step (run /
    /// skip / prune, and why): one local agent of that backend checks the outputs, as a
    /// run's agent would; nothing runs.
    Plan {
        pipeline: PathBuf,
        /// Re-run this step and everything downstream of it (repeatable).
        #[arg(long)]
        force: Vec<String>,
        /// Count zero-byte outputs as present.
        #[arg(long)]
        empty_ok: bool,
        /// Storage backend that checks the outputs (PYPE_OVERLAY_MODE), as for `run`.
        #[arg(long, default_value = "snapshot")]
        backend: String,
        /// `pype-agent` binary for the local agent (default: this executable).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// Longest wait for the local agent to connect.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        agent_wait: Duration,
    },
    /// The working registry (`<state>/snapshot_registry.json`, bio-pype's format).
    Registry {
        #[command(subcommand)]
        command: RegistryCommand,
    },
    /// Remove snapshots that no registry entry references.
    Gc {
        /// Keep unreferenced snapshots younger than this (a harvest may be merging them).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        min_age: Duration,
        #[arg(long)]
        dry_run: bool,
    },
    /// Program profiles.
    Profiles {
        #[command(subcommand)]
        command: ProfilesCommand,
    },
    /// Print a step's output (the latest attempt's unless --attempt); --follow until it ends.
    Logs {
        run: String,
        step: String,
        #[arg(long)]
        attempt: Option<u32>,
        #[arg(long, short)]
        follow: bool,
    },
    /// Which paths the working registry and snapshot store hold: `{path: size or null}` as
    /// JSON on stdout (from a running coordinator with --coordinator, else the state dir).
    Paths {
        #[arg(required = true)]
        paths: Vec<String>,
        #[arg(long)]
        coordinator: Option<SocketAddr>,
    },
    /// Cancel one step of a running run (no retry; what depends on it is cancelled too).
    Cancel {
        run: String,
        step: String,
        /// Coordinator address (default: the one recorded in the state dir).
        #[arg(long)]
        coordinator: Option<SocketAddr>,
    },
    /// Show a run (default: the latest): its steps, and the connected agents.
    Status {
        run: Option<String>,
        #[arg(long)]
        coordinator: Option<SocketAddr>,
        /// One JSON object: the run, its steps with what their last attempts used, its cost,
        /// the agents.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// A full-terminal view redrawn every second (q quits); without RUN, the newest run.
        #[arg(long)]
        watch: bool,
    },
    /// cloud-init user-data for ephemeral instances.
    #[command(name = "cloud-init")]
    CloudInit {
        #[command(subcommand)]
        command: CloudInitCommand,
    },
    /// Instances provisioned by this coordinator.
    Instances {
        #[command(subcommand)]
        command: InstancesCommand,
        #[arg(long, default_value = "qemu", global = true)]
        provider: String,
        #[arg(long, global = true)]
        provider_config: Option<PathBuf>,
    },
    /// Accept agents and serve operators' requests until SIGTERM or Ctrl-C.
    Serve {
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: SocketAddr,
        /// Extra names or addresses agents use to reach this coordinator (server certificate SANs).
        #[arg(long)]
        advertise: Vec<String>,
        /// Interval agents heartbeat at; three missed in a row and the agent counts as lost.
        #[arg(long, default_value_t = 5000)]
        heartbeat_interval_ms: u64,
    },
    /// Enrollment tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Enrolled agents.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// List the agents connected to the running coordinator.
    Agents {
        /// Coordinator address (default: the one recorded in the state dir by `serve`).
        #[arg(long)]
        coordinator: Option<SocketAddr>,
    },
    /// Send a directory tree from the coordinator's host to an agent.
    Push {
        agent: String,
        src: PathBuf,
        dest: String,
        /// Compress the stream with zstd at this level.
        #[arg(long)]
        zstd: Option<i32>,
        #[arg(long)]
        coordinator: Option<SocketAddr>,
    },
    /// Store local files or directories as one snapshot and add their registry entries.
    Import {
        /// Absolute paths; each becomes an entry keyed by its path.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Registry file to merge the new entries into (default: the working registry).
        #[arg(long)]
        registry: Option<PathBuf>,
    },
    /// Single steps, for operators and tests.
    Step {
        #[command(subcommand)]
        command: StepCommand,
    },
    /// Ask an agent's storage backend which outputs exist: one `PATH<TAB>SIZE|missing` line each.
    CheckOutputs {
        #[arg(long)]
        agent: String,
        /// Registry the agent resolves the paths with (snapshot backend).
        #[arg(long)]
        registry: Option<PathBuf>,
        #[arg(required = true)]
        paths: Vec<String>,
        #[arg(long)]
        coordinator: Option<SocketAddr>,
    },
    /// Fetch a directory tree from an agent to the coordinator's host.
    Pull {
        agent: String,
        src: String,
        dest: PathBuf,
        #[arg(long)]
        zstd: Option<i32>,
        #[arg(long)]
        coordinator: Option<SocketAddr>,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Pipeline file (TOML; with --json, JSON, `-` for stdin's first line).
    pipeline: Option<PathBuf>,
    /// For programs: the pipeline is JSON (version 1), events go to stdout as JSON lines, and
    /// stdin's later lines are control lines (PROTOCOL.md, "Runs from programs").
    #[arg(long)]
    json: bool,
    /// Finish an interrupted run (its pipeline is kept in the state database).
    #[arg(long, value_name = "RUN")]
    resume: Option<String>,
    /// Submit to a running `pype-coordinator serve` at this address instead.
    #[arg(long)]
    coordinator: Option<SocketAddr>,
    /// Local agents to start; 0 for none: the run uses agents that connect on their own
    /// (persistent agents enrolled with `token create`; give --listen a fixed port so they
    /// find a restarted coordinator).
    #[arg(long, default_value_t = 2)]
    agents: usize,
    /// Re-run this step and everything downstream of it (repeatable).
    #[arg(long)]
    force: Vec<String>,
    /// Count zero-byte outputs as present.
    #[arg(long)]
    empty_ok: bool,
    /// Re-runs per step after infrastructure failures (lost agent, failed setup or harvest).
    #[arg(long, default_value_t = 2)]
    infra_retries: u32,
    /// Do not import local input files missing from the registry.
    #[arg(long)]
    no_import: bool,
    /// Leave the final outputs in the snapshot store instead of writing them to their paths.
    #[arg(long)]
    no_materialize: bool,
    /// Storage backend of the local agents (PYPE_OVERLAY_MODE).
    #[arg(long, default_value = "snapshot")]
    backend: String,
    /// Heartbeat interval of the embedded coordinator's agents.
    #[arg(long, default_value_t = 1000)]
    heartbeat_interval_ms: u64,
    /// `pype-agent` binary for the local agents (default: this executable).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Longest wait for agents to connect (with --provider: at least the boot timeout).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    agent_wait: Duration,
    /// Where agents come from: `local` child processes (--agents), or instances a provider
    /// creates on demand (`qemu` VMs, `slurm` batch jobs).
    #[arg(long, default_value = "local")]
    provider: String,
    /// UDP address the embedded coordinator listens on; instances of a provider reach it as
    /// `coordinator_host` and this port (qemu user networking maps 10.0.2.2 to loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Provider config file (TOML): boot/sweep/orphan timeouts, max_instances, agent
    /// delivery, the provider's own table.
    #[arg(long)]
    provider_config: Option<PathBuf>,
    /// Most agents a provider runs at once (the config's max_instances).
    #[arg(long)]
    max_agents: Option<usize>,
    /// A provider's agent without work goes after idling this long (e.g. 5m; default: at once).
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// A provider's agent not connected this long after its request is replaced (e.g. 10m).
    #[arg(long, value_parser = parse_duration)]
    boot_timeout: Option<Duration>,
    /// Slurm partition of agent jobs (--provider slurm).
    #[arg(long)]
    partition: Option<String>,
    /// Slurm account of agent jobs (--provider slurm).
    #[arg(long)]
    account: Option<String>,
    /// Extra sbatch argument for agent jobs, repeatable (--provider slurm), e.g.
    /// `--sbatch-arg=--qos=short`.
    #[arg(long = "sbatch-arg", allow_hyphen_values = true)]
    sbatch_args: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum CloudInitCommand {
    /// Print the user-data an instance running STEP would get (a token of the real shape
    /// that enrolls nothing), and on stderr its size and which registry path it took.
    Render {
        pipeline: PathBuf,
        #[arg(long)]
        step: String,
        #[arg(long)]
        provider_config: Option<PathBuf>,
        /// Port instances would reach the coordinator at.
        #[arg(long, default_value_t = 7400)]
        port: u16,
    },
}

#[derive(Subcommand, Debug)]
enum InstancesCommand {
    /// Instances in the state database, and tagged instances the provider lists.
    List,
    /// Terminate one instance (our instance id or the provider's id).
    Terminate { id: String },
    /// Terminate every tagged instance the state database does not account for.
    Sweep,
}

#[derive(Subcommand, Debug)]
enum RegistryCommand {
    /// Every entry: path, snapshot, path inside it, and the run/step/attempt that produced it.
    Show,
    /// One entry, as JSON.
    Get { path: String },
    /// Merge a registry file (bio-pype's JSON) into the working registry.
    Import { file: PathBuf },
    /// The working registry as JSON, on stdout or into a file.
    Export {
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Remove entries (their steps run again next time).
    Remove {
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Write paths (a directory: everything the registry holds below it) from their snapshots
    /// to their real places on this host: compared first, changed files replaced by rename.
    #[command(name = "write-out")]
    WriteOut {
        #[arg(required = true)]
        paths: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ProfilesCommand {
    /// Build the profile's programs (prepare_build, the build command, stage_program) on an
    /// agent, so they become snapshots in the registry. Staged programs are kept unless --force.
    Build {
        profile: PathBuf,
        #[arg(long)]
        force: bool,
        /// Build on this agent of a running coordinator (default: a local agent).
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        coordinator: Option<SocketAddr>,
        /// `pype-agent` binary for the local agent (default: this executable).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum StepCommand {
    /// Run one step file on an agent; its output goes to stderr, its outcome (JSON) to stdout.
    /// Exits non-zero when the step fails.
    Run {
        #[arg(long)]
        agent: String,
        step: PathBuf,
        /// Registry to hand the agent and to merge the step's new entries into.
        #[arg(long)]
        registry: Option<PathBuf>,
        #[arg(long)]
        coordinator: Option<SocketAddr>,
    },
    /// Cancel a running attempt.
    Cancel {
        attempt_id: u64,
        #[arg(long)]
        coordinator: Option<SocketAddr>,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create an enrollment token and print it on stdout.
    Create {
        /// How long the token stays valid (e.g. 30m, 1h, 7d).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// Revoke an agent's certificate: it is refused from now on, and disconnected if connected.
    Revoke { id: String },
    /// List enrolled agents (from the state database; works without a running coordinator).
    List,
    /// Ask a connected agent to drain: its running steps finish, it takes nothing new, then it
    /// exits (as on SIGTERM).
    Drain {
        id: String,
        /// Coordinator address (default: the one in the state dir).
        #[arg(long)]
        coordinator: Option<std::net::SocketAddr>,
    },
}

/// Parses `90`, `90s`, `30m`, `1h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 =
        num.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 90s, 30m, 1h, 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("invalid duration unit in {s:?}: use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

pub fn cli_main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == crate::embedded::AGENT_SUBCOMMAND) {
        args.remove(1);
        args[0] = "pype-agent".into();
        return agent::cli_main_from(args);
    }
    let cli = Cli::parse_from(args);
    transport::telemetry::init(cli.log_format);
    if let Some(c) = &cli.config {
        crate::persist::config::set_explicit(c.clone());
    }
    transport::cli::block_on_main(threads(&cli.command), run_cli(cli))
}

/// A coordinator that holds a fleet (`serve`, or a run that agents from a provider or from
/// elsewhere join on the address `--listen` names) gets a worker thread per core for their
/// connections. A run of only its own local agents, and a client command, run on one
/// thread: every hand-off between tasks there is a function call, not a wake-up of another
/// thread, which at a thousand empty steps a second was a quarter of the coordinator's CPU
/// (BENCHMARKS.md, issue 21). Blocking work (a harvest's write-back) goes to the blocking
/// pool either way.
fn threads(command: &Command) -> transport::cli::Threads {
    use transport::cli::Threads;
    match command {
        Command::Run(a) if a.coordinator.is_some() => Threads::One,
        // Only its own agents can find a run on loopback port 0 (`--listen` names an address
        // for agents from elsewhere: then it may hold a fleet).
        Command::Run(a) if a.provider == "local" && a.listen.ip().is_loopback() && a.listen.port() == 0 => {
            Threads::One
        }
        Command::Serve { .. } | Command::Run(_) => Threads::PerCore,
        _ => Threads::One,
    }
}

/// `--state-dir`, else `$PYPE_STATE_DIR` (clap reads it), else the default for this user.
fn default_state_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/pype/coordinator");
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("pype/coordinator")
}

fn local_options(
    agents: usize,
    heartbeat_ms: u64,
    agent_bin: Option<PathBuf>,
    backend: String,
) -> crate::embedded::LocalOptions {
    crate::embedded::LocalOptions {
        agents,
        heartbeat_interval: Duration::from_millis(heartbeat_ms.max(50)),
        agent_bin,
        backend,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        advertise: Vec::new(),
        metrics_listen: None,
    }
}

async fn run_cli(cli: Cli) -> Result<()> {
    let dir = match cli.state_dir {
        Some(d) => std::path::absolute(&d).unwrap_or(d),
        None => default_state_dir(),
    };
    match cli.command {
        Command::Run(a) => {
            let req = runs::RunRequest {
                pipeline: a.pipeline,
                resume: a.resume,
                coordinator: a.coordinator,
                local: crate::embedded::LocalOptions {
                    listen: a.listen,
                    metrics_listen: cli.metrics_listen,
                    ..local_options(a.agents, a.heartbeat_interval_ms, a.agent_bin, a.backend)
                },
                options: crate::run::RunOptions {
                    force: a.force,
                    empty_ok: a.empty_ok,
                    infra_retries: a.infra_retries,
                    import_inputs: !a.no_import,
                    fail_unschedulable: a.coordinator.is_none(),
                    agent_wait_secs: a.agent_wait.as_secs(),
                },
                materialize: !a.no_materialize && a.coordinator.is_none() && !a.json,
                json: a.json,
                provider: (a.provider != "local").then(|| (a.provider.clone(), a.provider_config.clone())),
                overrides: provider::Overrides {
                    max_instances: a.max_agents,
                    idle_timeout_secs: a.idle_timeout.map(|d| d.as_secs()),
                    boot_timeout_secs: a.boot_timeout.map(|d| d.as_secs()),
                    partition: a.partition,
                    account: a.account,
                    sbatch_args: a.sbatch_args,
                },
            };
            runs::run(&dir, req).await
        }
        Command::Paths { paths, coordinator } => client::paths(&dir, coordinator, paths).await,
        Command::Cancel { run, step, coordinator } => client::cancel(&dir, coordinator, run, step).await,
        Command::CloudInit {
            command: CloudInitCommand::Render { pipeline, step, provider_config, port },
        } => instances::cloud_init_render(&dir, &pipeline, &step, provider_config.as_deref(), port),
        Command::Instances { command, provider, provider_config } => {
            let op = match command {
                InstancesCommand::List => instances::InstancesOp::List,
                InstancesCommand::Terminate { id } => instances::InstancesOp::Terminate(id),
                InstancesCommand::Sweep => instances::InstancesOp::Sweep,
            };
            instances::instances(&dir, &provider, provider_config.as_deref(), op).await
        }
        Command::Plan { pipeline, force, empty_ok, backend, agent_bin, agent_wait } => {
            let options = crate::run::RunOptions {
                force,
                empty_ok,
                agent_wait_secs: agent_wait.as_secs(),
                ..Default::default()
            };
            runs::plan(&dir, &pipeline, local_options(1, 200, agent_bin, backend), &options).await
        }
        Command::Registry { command } => registry::registry(
            &dir,
            match command {
                RegistryCommand::Show => registry::RegistryOp::Show,
                RegistryCommand::Get { path } => registry::RegistryOp::Get(path),
                RegistryCommand::Import { file } => registry::RegistryOp::Import(file),
                RegistryCommand::Export { output } => registry::RegistryOp::Export(output),
                RegistryCommand::Remove { paths } => registry::RegistryOp::Remove(paths),
                RegistryCommand::WriteOut { paths } => registry::RegistryOp::WriteOut(paths),
            },
        ),
        Command::Gc { min_age, dry_run } => registry::gc(&dir, min_age, dry_run),
        Command::Profiles {
            command: ProfilesCommand::Build { profile, force, agent, coordinator, agent_bin },
        } => {
            let remote = agent.map(|a| (coordinator, a));
            profiles::profiles_build(
                &dir,
                &profile,
                force,
                remote,
                local_options(1, 1000, agent_bin, "snapshot".into()),
            )
            .await
        }
        Command::Logs { run, step, attempt, follow } => {
            status::logs(&dir, &run, &step, attempt, follow).await
        }
        Command::Status { run, coordinator, watch: true, .. } => {
            watch::watch(&dir, run.as_deref(), coordinator).await
        }
        Command::Status { run, coordinator, json, watch: false } => {
            status::status(&dir, run.as_deref(), coordinator, json).await
        }
        Command::Serve { listen, advertise, heartbeat_interval_ms } => {
            serve(&dir, listen, &advertise, Duration::from_millis(heartbeat_interval_ms), cli.metrics_listen)
                .await
        }
        Command::Token { command: TokenCommand::Create { ttl, uses } } => {
            let state = state::State::open(&dir)?;
            let token = state.create_token(ttl, uses, None)?;
            println!("{token}");
            Ok(())
        }
        Command::Agent { command: AgentCommand::Revoke { id } } => {
            let state = state::State::open(&dir)?;
            if !state.revoke(&id)? {
                bail!("no enrolled agent {id} (or it is already revoked)");
            }
            println!("revoked {id}");
            Ok(())
        }
        Command::Agent { command: AgentCommand::Drain { id, coordinator } } => {
            match admin(&dir, coordinator, AdminRequest::DrainAgent { agent: id.clone() }).await? {
                AdminResponse::Done => {
                    println!("draining {id}");
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        Command::Agent { command: AgentCommand::List } => {
            let state = state::State::open(&dir)?;
            println!("{:<24} {:<8} {:<22} LAST_SEEN", "AGENT", "REVOKED", "LAST_ADDRESS");
            for a in state.enrolled()? {
                println!(
                    "{:<24} {:<8} {:<22} {}",
                    a.agent_id,
                    if a.revoked { "yes" } else { "no" },
                    a.last_addr.unwrap_or_default(),
                    a.last_seen.map(|s| s.to_string()).unwrap_or_default()
                );
            }
            Ok(())
        }
        Command::Agents { coordinator } => match admin(&dir, coordinator, AdminRequest::ListAgents).await? {
            AdminResponse::Agents(agents) => {
                println!(
                    "{:<24} {:<22} {:<16} {:>4} {:>10} {:>6} {:>8}",
                    "AGENT", "ADDRESS", "HOST", "CPUS", "MEM_AVAIL", "LOAD", "LAST_HB"
                );
                for a in agents {
                    println!(
                        "{:<24} {:<22} {:<16} {:>4} {:>9}M {:>6.2} {:>6}ms",
                        a.agent_id,
                        a.address,
                        a.host.hostname,
                        a.host.cpus,
                        a.host.memory_available_bytes / (1 << 20),
                        a.load_average,
                        a.last_heartbeat_ms_ago
                    );
                }
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        Command::Push { agent, src, dest, zstd, coordinator } => {
            let src = std::path::absolute(&src).with_context(|| format!("resolving {}", src.display()))?;
            let req = AdminRequest::Push {
                agent,
                src: src.to_string_lossy().into_owned(),
                dest,
                compression: compression(zstd),
            };
            print_transfer(admin(&dir, coordinator, req).await?)
        }
        Command::Import { paths, registry } => {
            let mut abs = Vec::with_capacity(paths.len());
            for p in paths {
                abs.push(std::path::absolute(&p).with_context(|| format!("resolving {}", p.display()))?);
            }
            let store = config::open_store(&dir)?;
            let meta = tokio::task::spawn_blocking(move || {
                let meta = store.import(&abs)?;
                anyhow::Ok((meta, abs))
            })
            .await??;
            let (meta, abs) = meta;
            let mut new = protocol::Registry::default();
            for p in abs {
                let key = p.to_string_lossy().into_owned();
                let in_snapshot_path = key.trim_start_matches('/').to_string();
                new.entries.insert(
                    key,
                    protocol::RegistryEntry {
                        snapshot_id: meta.snapshot_id.clone(),
                        in_snapshot_path,
                        bind_path: None,
                        produced_by: None,
                    },
                );
            }
            eprintln!(
                "imported {} entries ({} bytes, {} stored) as {}",
                meta.entries, meta.content_bytes, meta.wire_bytes, meta.snapshot_id
            );
            print!("{}", new.to_json());
            match registry {
                Some(path) => {
                    let mut reg = stepfile::read_registry(&path)?;
                    reg.merge(new.entries);
                    stepfile::write_registry(&path, &reg)
                }
                None => working::WorkingRegistry::open(&dir)?.merge(new.entries).map(|_| ()),
            }
        }
        Command::Step { command: StepCommand::Run { agent, step, registry, coordinator } } => {
            let reg = match &registry {
                Some(p) => stepfile::read_registry(p)?,
                None => protocol::Registry::default(),
            };
            let spec = stepfile::load(&step, &reg)?;
            let req = AdminRequest::RunStep { agent, spec: Box::new(spec) };
            let last = admin_stream(&dir, coordinator, req, |frame| match frame {
                AdminResponse::StepStarted { backend, view } => {
                    eprintln!("[pype] step started (backend {backend}, view {view})");
                }
                AdminResponse::StepOutput(lines) => {
                    for l in lines {
                        eprintln!("{}", l.line);
                    }
                }
                _ => {}
            })
            .await?;
            let AdminResponse::StepDone(outcome) = last else { return Err(unexpected(last)) };
            if let Some(path) = &registry {
                let mut reg = stepfile::read_registry(path)?;
                reg.merge(outcome.new_entries.iter().cloned());
                stepfile::write_registry(path, &reg)?;
            }
            println!("{}", outcome_json(&outcome));
            if !outcome.succeeded() {
                bail!(
                    "step ended with {:?}{}",
                    outcome.exit,
                    outcome.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
                );
            }
            Ok(())
        }
        Command::Step { command: StepCommand::Cancel { attempt_id, coordinator } } => {
            match admin(&dir, coordinator, AdminRequest::CancelStep { attempt_id }).await? {
                AdminResponse::Done => Ok(()),
                other => Err(unexpected(other)),
            }
        }
        Command::CheckOutputs { agent, registry, paths, coordinator } => {
            let reg = match &registry {
                Some(p) => stepfile::read_registry(p)?,
                None => protocol::Registry::default(),
            };
            let registry = reg.relevant(paths.iter().map(String::as_str), &[]);
            match admin(&dir, coordinator, AdminRequest::CheckOutputs { agent, paths, registry }).await? {
                AdminResponse::Outputs(sizes) => {
                    for (p, size) in sizes {
                        println!("{p}\t{}", size.map_or("missing".to_string(), |s| s.to_string()));
                    }
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        Command::Pull { agent, src, dest, zstd, coordinator } => {
            let dest = std::path::absolute(&dest).with_context(|| format!("resolving {}", dest.display()))?;
            let req = AdminRequest::Pull {
                agent,
                src,
                dest: dest.to_string_lossy().into_owned(),
                compression: compression(zstd),
            };
            print_transfer(admin(&dir, coordinator, req).await?)
        }
    }
}

fn compression(zstd: Option<i32>) -> Compression {
    zstd.map_or(Compression::None, |level| Compression::Zstd { level })
}

fn print_transfer(resp: AdminResponse) -> Result<()> {
    match resp {
        AdminResponse::TransferDone(s) => {
            let secs = (s.elapsed_ms.max(1)) as f64 / 1e3;
            println!(
                "{} bytes in {} entries ({} on the wire) in {} ms: {:.1} MB/s, {:.0} entries/s",
                s.content_bytes,
                s.entries,
                s.wire_bytes,
                s.elapsed_ms,
                s.content_bytes as f64 / 1e6 / secs,
                s.entries as f64 / secs
            );
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

async fn serve(
    dir: &Path,
    listen: SocketAddr,
    advertise: &[String],
    heartbeat_interval: Duration,
    metrics_listen: Option<SocketAddr>,
) -> Result<()> {
    let shutdown = CancellationToken::new();
    let (coord, _engine, _addr, server) = crate::embedded::start_server(
        dir,
        listen,
        advertise,
        heartbeat_interval,
        metrics_listen,
        shutdown.clone(),
    )
    .await?;
    let runs = coord.shutdown_token();
    tokio::spawn(async move {
        transport::cli::shutdown_signal().await;
        tracing::info!("shutting down");
        // Runs stop first (their attempts are cancelled), then the server.
        runs.cancel();
        tokio::time::sleep(Duration::from_millis(500)).await;
        shutdown.cancel();
    });
    let _ = server.await;
    Ok(())
}

fn outcome_json(o: &protocol::StepOutcome) -> String {
    let outputs: serde_json::Map<String, serde_json::Value> =
        o.outputs.iter().map(|(p, s)| (p.clone(), serde_json::json!(s))).collect();
    let mut new = protocol::Registry::default();
    new.merge(o.new_entries.iter().cloned());
    let new_entries: serde_json::Value = serde_json::from_str(&new.to_json()).unwrap_or_default();
    serde_json::json!({
        "attempt_id": o.attempt_id,
        "exit": format!("{:?}", o.exit),
        "succeeded": o.succeeded(),
        "error": o.error,
        "backend": o.backend,
        "elapsed_ms": o.elapsed_ms,
        "outputs": outputs,
        "new_entries": new_entries,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use transport::cli::Threads;

    use super::*;

    fn threads_for(args: &[&str]) -> Threads {
        threads(&Cli::parse_from(std::iter::once("pype-coordinator").chain(args.iter().copied())).command)
    }

    #[test]
    fn a_fleet_gets_a_thread_per_core_a_local_run_and_a_client_one() {
        assert_eq!(threads_for(&["serve"]), Threads::PerCore);
        assert_eq!(threads_for(&["run", "p.toml", "--provider", "slurm"]), Threads::PerCore);
        assert_eq!(
            threads_for(&["run", "p.toml", "--agents", "0", "--listen", "0.0.0.0:7400"]),
            Threads::PerCore
        );
        assert_eq!(threads_for(&["run", "p.toml", "--provider", "qemu"]), Threads::PerCore);
        assert_eq!(threads_for(&["run", "p.toml"]), Threads::One);
        assert_eq!(threads_for(&["run", "p.toml", "--agents", "4"]), Threads::One);
        assert_eq!(threads_for(&["run", "p.toml", "--listen", "127.0.0.1:0"]), Threads::One);
        // Agents started by hand, or hollow ones by the thousand, join a run on a known port.
        assert_eq!(
            threads_for(&["run", "p.toml", "--agents", "0", "--listen", "127.0.0.1:7400"]),
            Threads::PerCore
        );
        assert_eq!(threads_for(&["run", "p.toml", "--coordinator", "127.0.0.1:7400"]), Threads::One);
        assert_eq!(threads_for(&["status"]), Threads::One);
    }
}
