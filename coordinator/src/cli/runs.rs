//! `run` and `plan`: a pipeline on the embedded coordinator (local agents or a provider's) or
//! on a running one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use protocol::{AdminRequest, AdminResponse, Registry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cli::display::Display;
use crate::embedded::{LocalCluster, LocalOptions};
use crate::persist::state::State;
use crate::pipeline::Pipeline;
use crate::provision;
use crate::provision::provider::{self, ProviderConfig};
use crate::run::RunOptions;
use crate::store::SnapshotStore;

pub struct RunRequest {
    pub pipeline: Option<PathBuf>,
    pub resume: Option<String>,
    pub coordinator: Option<SocketAddr>,
    pub local: LocalOptions,
    pub options: RunOptions,
    pub materialize: bool,
    /// Agents from a provider (name, config file) instead of local child processes.
    pub provider: Option<(String, Option<PathBuf>)>,
    /// Command-line settings over the provider config file.
    pub overrides: provider::Overrides,
    /// The pipeline is JSON (`-`: stdin's first line); events go to stdout as JSON lines
    /// (see [`crate::cli::client`]).
    pub json: bool,
}

/// `pype-coordinator run`.
pub async fn run(dir: &Path, req: RunRequest) -> Result<()> {
    let (pipeline, resume) = match (&req.pipeline, &req.resume) {
        (Some(path), None) if req.json => (crate::cli::client::read_pipeline(path)?, None),
        (Some(path), None) => (Pipeline::load(path)?, None),
        (None, Some(run_id)) => {
            let state = State::open(dir)?;
            let rec = state.run(run_id)?.ok_or_else(|| anyhow!("no run {run_id} in {}", dir.display()))?;
            if rec.state == "succeeded" {
                bail!("run {run_id} already succeeded");
            }
            let p: Pipeline =
                serde_json::from_str(&rec.pipeline_json).context("reading the run's pipeline")?;
            (p, Some(run_id.clone()))
        }
        (Some(_), Some(_)) => bail!("give either a pipeline file or --resume RUN, not both"),
        (None, None) => bail!("give a pipeline file (or --resume RUN)"),
    };
    if let Some(addr) = req.coordinator {
        if resume.is_some() {
            bail!("--resume runs on an embedded coordinator; resume on the host of the state dir");
        }
        if req.json {
            return crate::cli::client::run_remote(dir, addr, &pipeline, &req.options).await;
        }
        return run_remote(dir, addr, &pipeline, &req.options).await;
    }
    let mut options = req.options.clone();
    let mut local = req.local;
    // With a provider: no local agents; the reconciler first, before the server listens, so
    // no instance a previous coordinator left behind joins this run.
    let provider = match &req.provider {
        None => None,
        Some((name, cfg_path)) => {
            let mut cfg = ProviderConfig::load(cfg_path.as_deref())?;
            cfg.apply(&req.overrides)?;
            let provider = provider::open(name, &cfg, dir)?;
            provider.preflight().await.with_context(|| format!("provider {name}"))?;
            let swept = provision::startup_sweep(provider.as_ref(), dir, &State::open(dir)?).await?;
            if swept > 0 {
                tracing::warn!(
                    instances = swept,
                    "reconciler terminated instances left by a previous coordinator"
                );
            }
            local.agents = 0;
            local.advertise.push(cfg.coordinator_host_for(name, local.listen));
            options.agent_wait_secs = options.agent_wait_secs.max(cfg.boot_timeout_secs * 2 + 60);
            Some((provider, cfg))
        }
    };
    let mut cluster = LocalCluster::start(dir, &local).await?;
    let ready = cluster.wait_ready(Duration::from_secs(options.agent_wait_secs.max(1))).await;
    if let Err(e) = ready {
        cluster.stop().await;
        return Err(e);
    }
    let provisioning = CancellationToken::new();
    let provisioner = match provider {
        None => None,
        Some((provider, cfg)) => {
            let host = cfg.coordinator_host_for(provider.name(), local.listen);
            let ca_pem = provision::ca_pem(dir)?;
            let p = provision::Provisioner {
                tag: provider::coordinator_tag(&ca_pem),
                coordinator_addr: format!("{host}:{}", cluster.addr.port()),
                provider,
                cfg,
                coord: cluster.coord.clone(),
                state: cluster.engine.state.clone(),
                registry: cluster.engine.registry.clone(),
                ca_pem,
            };
            Some(tokio::spawn(p.run(cluster.engine.demand.subscribe(), provisioning.clone())))
        }
    };
    let json = req.json;
    let display = Arc::new(Display::new(false));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let d = display.clone();
    let shown = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if json {
                crate::cli::client::print_line(&crate::cli::client::event_line(&ev));
            } else {
                d.event(&ev);
            }
        }
    });
    let cancel = CancellationToken::new();
    let control = json.then(|| crate::cli::client::control_embedded(cluster.engine.clone(), cancel.clone()));
    let c = cancel.clone();
    let signal = tokio::spawn(async move {
        transport::cli::shutdown_signal().await;
        tracing::warn!("interrupted: cancelling running steps");
        c.cancel();
    });
    let result = cluster.engine.run(pipeline.clone(), options, resume, Some(tx), cancel).await;
    signal.abort();
    // Every instance of the run goes, whatever the outcome.
    provisioning.cancel();
    if let Some(task) = provisioner {
        let _ = task.await;
    }
    let _ = shown.await;
    display.finish();
    if let Some(c) = control {
        c.abort();
    }
    let outcome = match result {
        Ok(r) if json => {
            crate::cli::client::print_line(&crate::cli::client::done_line(
                &r.run_id,
                r.succeeded,
                &r.summary,
            ));
            if r.succeeded { Ok(()) } else { Err(anyhow!("run {} did not succeed: {}", r.run_id, r.summary)) }
        }
        Ok(r) if r.succeeded => {
            let reg = cluster.engine.registry.load()?;
            let store = cluster.coord.store().clone();
            let finals = pipeline.final_outputs();
            let materialize = req.materialize;
            let data_root = pipeline.data_root.clone();
            tokio::task::spawn_blocking(move || {
                report_outputs(&finals, &data_root, &reg, store.as_ref(), materialize)
            })
            .await??;
            println!("run {} succeeded: {}", r.run_id, r.summary);
            Ok(())
        }
        Ok(r) => Err(anyhow!(
            "run {} did not succeed: {}\n(resume with: pype-coordinator --state-dir {} run --resume {})",
            r.run_id,
            r.summary,
            dir.display(),
            r.run_id
        )),
        Err(e) => Err(e),
    };
    cluster.stop().await;
    outcome
}

/// The directory a final output is written beneath: the pipeline's data root for the outputs
/// below it, else the output's own parent. The operator chose these, so symlinks in them are
/// followed; nothing beneath them ever is.
pub fn output_root(data_root: &Path, out: &Path) -> PathBuf {
    if out.starts_with(data_root) && out != data_root {
        data_root.to_path_buf()
    } else {
        out.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"))
    }
}

/// Prints where each final output is: on this host after writing it out from its snapshot
/// (`materialize`), or in the store.
fn report_outputs(
    finals: &[String],
    data_root: &Path,
    reg: &Registry,
    store: &dyn SnapshotStore,
    materialize: bool,
) -> Result<()> {
    for out in finals {
        match reg.get(out) {
            None => println!("{out}\tnot in the registry (the step's backend keeps it in place)"),
            Some(e) if materialize => {
                let dest = Path::new(out);
                let stats = store
                    .write_out(&e.snapshot_id, &e.in_snapshot_path, dest, &output_root(data_root, dest))
                    .with_context(|| format!("writing {out} from snapshot {}", e.snapshot_id))?;
                if stats.written == 0 && stats.dirs_created == 0 {
                    println!("{out}\tup to date (from {})", e.snapshot_id);
                } else {
                    println!(
                        "{out}\twritten (from {}: {} written, {} unchanged)",
                        e.snapshot_id, stats.written, stats.unchanged
                    );
                }
            }
            Some(e) => println!("{out}\tin snapshot {}", e.snapshot_id),
        }
    }
    Ok(())
}

async fn run_remote(dir: &Path, addr: SocketAddr, pipeline: &Pipeline, opts: &RunOptions) -> Result<()> {
    let req = AdminRequest::SubmitRun {
        pipeline_json: serde_json::to_string(pipeline)?,
        options_json: serde_json::to_string(opts)?,
    };
    let display = Display::new(true);
    let last = crate::cli::admin::admin_stream(dir, Some(addr), req, |frame| {
        if let AdminResponse::RunEvent(ev) = frame {
            display.event(&ev);
        }
    })
    .await;
    display.finish();
    match last? {
        AdminResponse::RunDone { run, succeeded: true, summary } => {
            println!("run {run} succeeded: {summary}");
            Ok(())
        }
        AdminResponse::RunDone { run, summary, .. } => bail!("run {run} did not succeed: {summary}"),
        other => Err(crate::cli::admin::unexpected(other)),
    }
}

/// `pype-coordinator plan`: decisions from the working registry and the snapshot store's
/// index (what the snapshot backend's check_outputs answers), nothing run.
/// `pype-coordinator plan`: what `run` with the same backend and options would do with each
/// step, decided by the same code, with one local agent of that backend checking the outputs.
/// Nothing runs.
pub async fn plan(dir: &Path, pipeline: &Path, local: LocalOptions, options: &RunOptions) -> Result<()> {
    let p = Pipeline::load(pipeline)?;
    for f in &options.force {
        p.index_of(f).ok_or_else(|| anyhow!("--force {f}: the pipeline has no such step"))?;
    }
    let mut cluster = LocalCluster::start(dir, &LocalOptions { agents: 1, ..local }).await?;
    let decided = async {
        cluster.wait_ready(Duration::from_secs(options.agent_wait_secs.max(1))).await?;
        let reg = cluster.engine.registry.load()?;
        cluster.engine.decide(&p, options, Default::default(), &[], &reg).await
    }
    .await;
    cluster.stop().await;
    let decisions = decided?;
    let width = p.steps.iter().map(|s| s.name.len()).max().unwrap_or(4).max(4);
    println!("{:<width$}  {:<6} WHY", "STEP", "ACTION");
    for (s, d) in p.steps.iter().zip(&decisions) {
        println!("{:<width$}  {:<6} {}", s.name, d.action.as_str(), d.why);
    }
    Ok(())
}
