//! `pype-coordinator`: accepts agents over QUIC with mutual TLS, tracks them, and moves trees
//! to and from them. `main.rs` only calls [`cli_main`]; the library does the work.

pub mod server;
pub mod state;
pub mod trust;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use protocol::{AdminRequest, AdminResponse, Compression};
use tokio_util::sync::CancellationToken;
use transport::telemetry::LogFormat;
use transport::{endpoint, framed, pki};

/// Runs pipelines of steps on pype agents.
#[derive(Parser, Debug)]
#[command(name = "pype-coordinator", version)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "human", global = true)]
    log_format: LogFormat,
    /// State directory: CA, certificates, state database.
    #[arg(long, env = "PYPE_STATE_DIR", default_value = "/var/lib/pype/coordinator", global = true)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
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
    let cli = Cli::parse();
    transport::telemetry::init(cli.log_format);
    transport::cli::block_on_main(run_cli(cli))
}

async fn run_cli(cli: Cli) -> Result<()> {
    let dir = cli.state_dir;
    match cli.command {
        Command::Serve { listen, advertise, heartbeat_interval_ms } => {
            serve(&dir, listen, &advertise, Duration::from_millis(heartbeat_interval_ms)).await
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

fn unexpected(resp: AdminResponse) -> anyhow::Error {
    match resp {
        AdminResponse::Error(e) => anyhow!("{}", e.message),
        other => anyhow!("unexpected answer from coordinator: {other:?}"),
    }
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

const ADDR_FILE: &str = "coordinator.addr";

async fn serve(
    dir: &Path,
    listen: SocketAddr,
    advertise: &[String],
    heartbeat_interval: Duration,
) -> Result<()> {
    let state = Arc::new(state::State::open(dir)?);
    let names = trust::server_names(listen, advertise);
    let identity = trust::setup(dir, &names, &state)?;
    let tls = pki::server_tls(
        &identity.ca.cert_key.cert_pem,
        &identity.server,
        &[protocol::ALPN_AGENT, protocol::ALPN_ENROLL, protocol::ALPN_ADMIN],
    )?;
    let endpoint = endpoint::server(listen, tls, &endpoint::Tuning::default())?;
    let local = endpoint.local_addr()?;
    pki::write_file(&dir.join(ADDR_FILE), local.to_string().as_bytes(), 0o644)?;
    tracing::info!(addr = %local, state_dir = %dir.display(), "coordinator listening");
    let config = server::ServerConfig { heartbeat_interval, ..Default::default() };
    let coord = server::Coordinator::new(state, identity.ca, config);
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        transport::cli::shutdown_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    server::run(endpoint, coord, shutdown).await;
    Ok(())
}

/// Sends one operator request to the running coordinator with the admin identity.
async fn admin(dir: &Path, addr: Option<SocketAddr>, req: AdminRequest) -> Result<AdminResponse> {
    let addr = match addr {
        Some(a) => a,
        None => {
            let path = dir.join(ADDR_FILE);
            std::fs::read_to_string(&path)
                .with_context(|| {
                    format!("reading {} (is `pype-coordinator serve` running?)", path.display())
                })?
                .trim()
                .parse()
                .with_context(|| format!("parsing {}", path.display()))?
        }
    };
    let ca = std::fs::read_to_string(dir.join("ca.pem")).context("reading ca.pem from the state dir")?;
    let admin = pki::CertKey::load(dir, "admin")?
        .ok_or_else(|| anyhow!("no admin certificate in {}", dir.display()))?;
    let tuning = endpoint::Tuning::default();
    let tls = pki::client_tls(&ca, Some(&admin), protocol::ALPN_ADMIN)?;
    let ep = endpoint::client(addr, &tuning)?;
    let conn = ep
        .connect_with(endpoint::client_config(tls, &tuning)?, addr, "localhost")?
        .await
        .with_context(|| format!("connecting to coordinator at {addr}"))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    framed::write_frame(&mut send, &req).await?;
    send.finish()?;
    let resp = framed::read_frame::<AdminResponse, _>(&mut recv, protocol::MAX_FRAME_LEN)
        .await?
        .ok_or_else(|| anyhow!("coordinator closed the request without an answer"))?;
    conn.close(quinn::VarInt::from_u32(0), b"done");
    ep.wait_idle().await;
    Ok(resp)
}
