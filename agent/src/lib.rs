//! `pype-agent`: runs on each worker, connects to the coordinator over QUIC with mutual TLS,
//! and moves trees to and from it. `main.rs` only calls [`cli_main`].

pub mod backend;
pub mod backoff;
pub mod cache;
pub mod exec;
pub mod facts;
pub mod launcher;
pub mod metrics;
pub mod mounts;
pub mod objects;
pub mod paths;
pub mod remote;
pub mod runner;
pub mod served;
pub mod session;
pub mod settings;
pub mod step;
pub mod subst;
pub mod usage;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use transport::telemetry::LogFormat;
use transport::tree::UnpackLimits;

/// Runs pype steps on this worker for a coordinator.
#[derive(Parser, Debug)]
#[command(name = "pype-agent", version)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "human", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Connect to a coordinator and serve it until SIGTERM (which drains: running steps
    /// finish, nothing new is taken; a second SIGTERM cancels them and exits).
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Agent config file: `KEY=VALUE` lines (PYPE_OVERLAY_MODE, PYPE_OVERLAY_SCRATCH,
    /// PYPE_SNAPSHOT_REGISTRY, PYPE_QUEUES, PYPE_CACHE_SIZE_BYTES, PYPE_COORDINATOR, ...);
    /// the environment overrides it.
    #[arg(long, env = "PYPE_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Coordinator address, HOST:PORT (or PYPE_COORDINATOR in the config file).
    #[arg(long, env = "PYPE_COORDINATOR")]
    coordinator: Option<String>,
    /// CA certificate of the coordinator (default: PYPE_CA, else the copy kept in the state dir).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Enrollment token (needed once, when the state dir holds no certificate).
    #[arg(long, env = "PYPE_TOKEN")]
    token: Option<String>,
    /// State directory: certificate, key, CA copy (default: PYPE_AGENT_STATE_DIR of the
    /// config file, else /var/lib/pype/agent).
    #[arg(long, env = "PYPE_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Work directory for steps and transfers (default: PYPE_WORK_DIR of the config file,
    /// else <state-dir>/work).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Name to enroll under (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Scheduling label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Steps this agent runs at once (default: PYPE_SLOTS, else 1).
    #[arg(long)]
    slots: Option<u32>,
    /// Instance id, when the coordinator provisioned this machine.
    #[arg(long, env = "PYPE_INSTANCE_ID")]
    instance_id: Option<String>,
    /// First reconnect delay, doubled per failed attempt (with jitter).
    #[arg(long, default_value_t = 200)]
    min_backoff_ms: u64,
    /// Longest reconnect delay.
    #[arg(long, default_value_t = 30_000)]
    max_backoff_ms: u64,
    /// Largest tree accepted in one transfer, in bytes.
    #[arg(long, default_value_t = 1 << 40)]
    max_transfer_bytes: u64,
    /// What the first SIGTERM or SIGINT does: `drain` (running steps finish, nothing new is
    /// taken, then exit 0) or `stop` (running steps are cancelled and reported). A second
    /// signal always stops.
    #[arg(long, env = "PYPE_ON_SIGTERM", value_enum, default_value = "drain")]
    on_sigterm: OnSigterm,
    /// Serve Prometheus metrics (OpenMetrics text at /metrics) on this TCP address
    /// (default: PYPE_METRICS_LISTEN of the config file, else off).
    #[arg(long, env = "PYPE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnSigterm {
    Drain,
    Stop,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("invalid label {s:?}: expected KEY=VALUE"))
}

pub fn cli_main() -> ExitCode {
    cli_main_from(std::env::args_os())
}

/// [`cli_main`] with explicit arguments (the first names the program), for binaries that
/// embed the agent.
pub fn cli_main_from(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    transport::telemetry::init(cli.log_format);
    match cli.command {
        Command::Run(args) => transport::cli::block_on_main(transport::cli::Threads::One, run(args)),
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let file = match &args.config {
        Some(p) => settings::ConfigFile::load(p)?,
        None => settings::ConfigFile::default(),
    };
    let coordinator = args
        .coordinator
        .clone()
        .or_else(|| file.get("PYPE_COORDINATOR"))
        .ok_or_else(|| anyhow!("no coordinator address: pass --coordinator or set PYPE_COORDINATOR"))?;
    // Flags (and the environment) win over the config file, which wins over the defaults.
    let state_dir = args
        .state_dir
        .clone()
        .or_else(|| file.get("PYPE_AGENT_STATE_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/lib/pype/agent"));
    let ca_path = args
        .ca
        .clone()
        .or_else(|| file.get("PYPE_CA").map(PathBuf::from))
        .unwrap_or_else(|| state_dir.join("ca.pem"));
    let ca_pem = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("reading CA certificate {} (pass --ca)", ca_path.display()))?;
    let work_dir = args
        .work_dir
        .clone()
        .or_else(|| file.get("PYPE_WORK_DIR").map(PathBuf::from))
        .unwrap_or_else(|| state_dir.join("work"));
    let settings = settings::Settings::from_config(&file, &work_dir)?;
    let orphan_timeout = match file.get("PYPE_ORPHAN_TIMEOUT_SECS") {
        None => None,
        Some(v) => Some(Duration::from_secs(
            v.parse()
                .with_context(|| format!("PYPE_ORPHAN_TIMEOUT_SECS={v:?} is not a number of seconds"))?,
        )),
    };
    let orphan_action: session::OrphanAction =
        file.get("PYPE_ORPHAN_ACTION").as_deref().unwrap_or("exit").parse()?;
    // Flags win over the config file.
    let slots = match (args.slots, file.get("PYPE_SLOTS")) {
        (Some(n), _) => n,
        (None, Some(v)) => v.parse().with_context(|| format!("PYPE_SLOTS={v:?} is not a number"))?,
        (None, None) => 1,
    }
    .max(1);
    let mut labels = args.labels;
    if let Some(v) = file.get("PYPE_LABELS").filter(|_| labels.is_empty()) {
        for l in v.split(',').filter(|l| !l.trim().is_empty()) {
            labels.push(parse_label(l).map_err(|e| anyhow!("PYPE_LABELS: {e}"))?);
        }
    }
    let cfg = session::AgentConfig {
        settings,
        coordinator,
        ca_pem,
        state_dir,
        work_dir,
        name: args.name,
        token: args.token.or_else(|| file.get("PYPE_TOKEN")),
        labels,
        slots,
        instance_id: args.instance_id.or_else(|| file.get("PYPE_INSTANCE_ID")),
        min_backoff: Duration::from_millis(args.min_backoff_ms.max(1)),
        max_backoff: Duration::from_millis(args.max_backoff_ms.max(args.min_backoff_ms).max(1)),
        unpack_limits: UnpackLimits { max_bytes: args.max_transfer_bytes },
        orphan_timeout,
        orphan_action,
        fetch_registry: matches!(file.get("PYPE_REGISTRY_FETCH").as_deref(), Some("1" | "true" | "yes")),
    };
    let metrics_listen = match (args.metrics_listen, file.get("PYPE_METRICS_LISTEN")) {
        (Some(a), _) => Some(a),
        (None, Some(v)) => {
            Some(v.parse().with_context(|| format!("PYPE_METRICS_LISTEN={v:?} is not an address"))?)
        }
        (None, None) => None,
    };
    if let Some(addr) = metrics_listen {
        let listener = transport::httpd::bind(addr)
            .await
            .with_context(|| format!("listening for metrics scrapes on {addr}"))?;
        tokio::spawn(transport::httpd::serve(listener, std::sync::Arc::new(|| metrics::get().render())));
    }
    let stop = session::Stop::default();
    let signalled = stop.clone();
    let on_sigterm = args.on_sigterm;
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    tokio::spawn(async move {
        let mut first = true;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if first && on_sigterm == OnSigterm::Drain {
                tracing::info!("signal: draining (a second signal cancels running steps)");
                signalled.drain.cancel();
                first = false;
                continue;
            }
            tracing::info!("signal: shutting down");
            signalled.shutdown.cancel();
            return;
        }
    });
    session::run(cfg, stop).await.map_err(|e| anyhow!("{e:#}"))
}
