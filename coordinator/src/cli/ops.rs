//! Operator commands around runs: `run`, `plan`, `registry`, `gc`, `profiles build`, `logs`,
//! `status`, `cloud-init render`, `instances`. `lib.rs` parses the command line and calls these.

use std::io::{Read, Seek, SeekFrom};
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
use crate::persist::state::{State, now_ms};
use crate::persist::working::WorkingRegistry;
use crate::pipeline::{Pipeline, Profile};
use crate::provision;
use crate::provision::provider::{self, ProviderConfig};
use crate::run::{RunOptions, runs_dir};
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

pub enum RegistryOp {
    Show,
    Get(String),
    Import(PathBuf),
    Export(Option<PathBuf>),
    Remove(Vec<String>),
    WriteOut(Vec<String>),
}

/// `pype-coordinator registry ...`.
pub fn registry(dir: &Path, op: RegistryOp) -> Result<()> {
    let working = WorkingRegistry::open(dir)?;
    match op {
        RegistryOp::Show => {
            let reg = working.load()?;
            println!("{:<48} {:<38} {:<32} PRODUCED_BY", "PATH", "SNAPSHOT", "IN_SNAPSHOT_PATH");
            for (k, e) in &reg.entries {
                let by = e
                    .produced_by
                    .as_ref()
                    .map(|p| format!("{}/{}/{}", p.run, p.step, p.attempt))
                    .unwrap_or_default();
                println!("{k:<48} {:<38} {:<32} {by}", e.snapshot_id, e.in_snapshot_path);
            }
            Ok(())
        }
        RegistryOp::Get(path) => {
            let reg = working.load()?;
            let e = reg.get(&path).ok_or_else(|| anyhow!("no registry entry for {path}"))?;
            let mut one = Registry::default();
            one.entries.insert(path, e.clone());
            print!("{}", one.to_json());
            Ok(())
        }
        RegistryOp::Import(file) => {
            let incoming = crate::pipeline::stepfile::read_registry(&file)?;
            let n = incoming.entries.len();
            let changed = working.merge(incoming.entries)?;
            println!("merged {n} entries from {} ({changed} new or changed)", file.display());
            Ok(())
        }
        RegistryOp::Export(out) => {
            let json = working.load()?.to_json();
            match out {
                Some(path) => transport::pki::write_file(&path, json.as_bytes(), 0o644),
                None => {
                    print!("{json}");
                    Ok(())
                }
            }
        }
        RegistryOp::WriteOut(paths) => {
            let reg = working.load()?;
            let store = crate::persist::config::open_store(dir)?;
            for path in &paths {
                let found = reg.locate(path);
                if found.is_empty() || !path.starts_with('/') {
                    bail!("{path} is not in the registry");
                }
                // Beneath the asked path's parent: nothing in the tree below it is followed.
                let root =
                    Path::new(path).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
                std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
                for (at, id, isp) in found {
                    let stats = store
                        .write_out(&id, &isp, Path::new(&at), &root)
                        .with_context(|| format!("writing {at} from snapshot {id}"))?;
                    println!("{at}\t{} written, {} unchanged (from {id})", stats.written, stats.unchanged);
                }
            }
            Ok(())
        }
        RegistryOp::Remove(paths) => {
            let removed =
                working.update(|reg| paths.iter().filter(|p| reg.entries.remove(*p).is_some()).count())?;
            if removed < paths.len() {
                bail!("removed {removed} of {} entries (the others were not in the registry)", paths.len());
            }
            println!("removed {removed} entries");
            Ok(())
        }
    }
}

/// `pype-coordinator gc`: removes snapshots no registry entry references and older than
/// `min_age` (younger ones may belong to a harvest whose entries are being merged).
pub fn gc(dir: &Path, min_age: Duration, dry_run: bool) -> Result<()> {
    let reg = WorkingRegistry::open(dir)?.load()?;
    let store = crate::persist::config::open_store(dir)?;
    let referenced: std::collections::HashSet<&str> =
        reg.entries.values().map(|e| e.snapshot_id.as_str()).collect();
    let now = (now_ms() / 1000) as i64;
    let (mut removed, mut bytes, mut kept) = (0, 0u64, 0);
    for id in store.list()? {
        if referenced.contains(id.as_str()) {
            kept += 1;
            continue;
        }
        let Some(meta) = store.meta(&id)? else { continue };
        if now - meta.created_at < min_age.as_secs() as i64 {
            kept += 1;
            continue;
        }
        if !dry_run {
            store.remove(&id)?;
        }
        removed += 1;
        bytes += meta.wire_bytes;
        println!("{} {id} ({} bytes)", if dry_run { "would remove" } else { "removed" }, meta.wire_bytes);
    }
    println!(
        "{removed} snapshots ({bytes} bytes) {}, {kept} kept",
        if dry_run { "to remove" } else { "removed" }
    );
    Ok(())
}

/// `pype-coordinator profiles build`: on a local agent, or on `agent` of a running coordinator.
pub async fn profiles_build(
    dir: &Path,
    profile: &Path,
    force: bool,
    remote: Option<(Option<SocketAddr>, String)>,
    local: LocalOptions,
) -> Result<()> {
    let profile = Profile::load(profile)?;
    let keys: Vec<String> = profile.programs.iter().map(|p| p.key.clone()).collect();
    if let Some((addr, agent)) = remote {
        let working = WorkingRegistry::open(dir)?;
        for program in &profile.programs {
            let reg_key = protocol::registry::program_key(&profile.name, &program.key);
            let reg = working.load()?;
            if !force && reg.get(&reg_key).is_some() {
                println!("{reg_key}\talready staged");
                continue;
            }
            let spec = crate::run::build_spec(&profile, program, "profiles-build");
            let req = AdminRequest::RunStep { agent: agent.clone(), spec: Box::new(spec) };
            let last = crate::cli::admin::admin_stream(dir, addr, req, |frame| {
                if let AdminResponse::StepOutput(lines) = frame {
                    for l in lines {
                        eprintln!("{}", l.line);
                    }
                }
            })
            .await?;
            let AdminResponse::StepDone(outcome) = last else {
                return Err(crate::cli::admin::unexpected(last));
            };
            if !outcome.succeeded() {
                bail!("building {reg_key} failed: {:?} {}", outcome.exit, outcome.error.unwrap_or_default());
            }
            working.merge(outcome.new_entries)?;
            println!("{reg_key}\tstaged");
        }
        return Ok(());
    }
    let mut cluster = LocalCluster::start(dir, &LocalOptions { agents: 1, ..local }).await?;
    let result = async {
        cluster.wait_ready(Duration::from_secs(60)).await?;
        cluster
            .engine
            .build_programs(&profile, &keys, force, "profiles-build", None, Duration::from_secs(60))
            .await
    }
    .await;
    let reg = cluster.engine.registry.load();
    cluster.stop().await;
    let built = result?;
    let reg = reg?;
    for key in &keys {
        let reg_key = protocol::registry::program_key(&profile.name, key);
        let e = reg.get(&reg_key).ok_or_else(|| anyhow!("{reg_key} missing after the build"))?;
        println!("{reg_key}\t{}", e.snapshot_id);
    }
    eprintln!("built {built} of {} programs", keys.len());
    Ok(())
}

/// `pype-coordinator logs RUN STEP [--follow]`.
pub async fn logs(dir: &Path, run: &str, step: &str, attempt: Option<u32>, follow: bool) -> Result<()> {
    let state = State::open(dir)?;
    state.run(run)?.ok_or_else(|| anyhow!("no run {run}"))?;
    let step_dir = runs_dir(dir).join(run).join(step);
    let current = |state: &State| -> Result<(u32, bool)> {
        let rec = state.steps_of(run)?.into_iter().find(|s| s.step == step);
        let rec = rec.ok_or_else(|| anyhow!("run {run} has no step {step}"))?;
        let terminal =
            matches!(rec.state.as_str(), "succeeded" | "failed" | "cancelled" | "skipped" | "pruned");
        let run_over = state.run(run)?.is_some_and(|r| r.finished_ms.is_some());
        Ok((rec.attempts, terminal || run_over))
    };
    let (mut n, _) = current(&state)?;
    if let Some(a) = attempt {
        n = a;
    }
    if n == 0 && !follow {
        bail!("step {step} of run {run} has not run");
    }
    let mut pos = 0u64;
    loop {
        let path = step_dir.join(format!("attempt-{n}.log"));
        if let Ok(mut f) = std::fs::File::open(&path) {
            f.seek(SeekFrom::Start(pos))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            pos += buf.len() as u64;
            use std::io::Write;
            std::io::stdout().write_all(&buf)?;
            std::io::stdout().flush()?;
        }
        if !follow {
            return Ok(());
        }
        let (latest, done) = current(&state)?;
        if attempt.is_none() && latest > n {
            n = latest;
            pos = 0;
            eprintln!("--- attempt {n} ---");
            continue;
        }
        if done {
            // One last read for what was written before the state changed.
            if let Ok(mut f) = std::fs::File::open(&path) {
                f.seek(SeekFrom::Start(pos))?;
                let mut rest = Vec::new();
                f.read_to_end(&mut rest)?;
                use std::io::Write;
                std::io::stdout().write_all(&rest)?;
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn fmt_ms(ms: u64) -> String {
    if ms < 10_000 { format!("{ms}ms") } else { format!("{:.1}s", ms as f64 / 1e3) }
}

/// `pype-coordinator status [RUN]`.
pub async fn status(dir: &Path, run: Option<&str>, addr: Option<SocketAddr>) -> Result<()> {
    let state = State::open(dir)?;
    let agents = if dir.join(crate::persist::ADDR_FILE).exists() || addr.is_some() {
        let req = crate::cli::admin::admin(dir, addr, AdminRequest::ListAgents);
        match tokio::time::timeout(Duration::from_secs(3), req).await {
            Ok(Ok(AdminResponse::Agents(a))) => Some(a),
            _ => None,
        }
    } else {
        None
    };
    let run_id = match run {
        Some(r) => r.to_string(),
        None => match state.runs(1)?.into_iter().next() {
            Some(r) => r.run_id,
            None => {
                println!("no runs in {}", dir.display());
                return Ok(());
            }
        },
    };
    let rec = state.run(&run_id)?.ok_or_else(|| anyhow!("no run {run_id}"))?;
    let steps = state.steps_of(&run_id)?;
    let end = rec.finished_ms.unwrap_or_else(now_ms);
    println!(
        "run {} ({}): {} after {}{}",
        rec.run_id,
        rec.pipeline,
        rec.state,
        fmt_ms(end.saturating_sub(rec.created_ms)),
        rec.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
    );
    match agents {
        Some(list) => {
            println!("\n{:<20} {:>5} {:>6} RUNNING", "AGENT", "CPUS", "LOAD");
            for a in list {
                let running: Vec<&str> = steps
                    .iter()
                    .filter(|s| s.state == "running" && s.agent.as_deref() == Some(a.agent_id.as_str()))
                    .map(|s| s.step.as_str())
                    .collect();
                println!(
                    "{:<20} {:>5} {:>6.2} {}",
                    a.agent_id,
                    a.host.cpus,
                    a.load_average,
                    running.join(",")
                );
            }
        }
        None => println!("\n(no running coordinator reachable: agents not shown)"),
    }
    let width = steps.iter().map(|s| s.step.len()).max().unwrap_or(4).max(4);
    println!(
        "\n{:<width$} {:<10} {:>7} {:<14} {:>9} {:>12} WHY",
        "STEP", "STATE", "ATTEMPT", "AGENT", "DURATION", "BYTES"
    );
    for s in &steps {
        let dur = match (s.started_ms, s.finished_ms) {
            (Some(a), Some(b)) => fmt_ms(b.saturating_sub(a)),
            (Some(a), None) if s.state == "running" => fmt_ms(now_ms().saturating_sub(a)),
            _ => String::new(),
        };
        println!(
            "{:<width$} {:<10} {:>7} {:<14} {:>9} {:>12} {}",
            s.step,
            s.state,
            s.attempts,
            s.agent.as_deref().unwrap_or(""),
            dur,
            s.bytes,
            s.why
        );
    }
    Ok(())
}

/// `pype-coordinator cloud-init render --step STEP PIPELINE`.
pub fn cloud_init_render(
    dir: &Path,
    pipeline: &Path,
    step: &str,
    provider_config: Option<&Path>,
    port: u16,
) -> Result<()> {
    let p = Pipeline::load(pipeline)?;
    if p.index_of(step).is_none() {
        bail!("pipeline {} has no step {step}", p.name);
    }
    let cfg = ProviderConfig::load(provider_config)?;
    let state = State::open(dir)?;
    let host = cfg.coordinator_host_for("qemu", ([127, 0, 0, 1], port).into());
    let names =
        crate::persist::trust::server_names(([127, 0, 0, 1], port).into(), std::slice::from_ref(&host));
    crate::persist::trust::setup(dir, &names, &state)?;
    let ca_pem = provision::ca_pem(dir)?;
    let registry = WorkingRegistry::open(dir)?.load()?;
    // A token of the real shape that enrolls nothing: it is not in the database.
    let mut raw = [0u8; 24];
    rand::fill(&mut raw);
    let token = format!("pype1.{}", hex::encode(raw));
    let ttl = cfg.boot_timeout_secs + 60;
    let inputs = provision::render_inputs(
        &cfg,
        "pype-i-preview",
        &format!("{host}:{port}"),
        &ca_pem,
        token,
        ttl,
        registry.to_json(),
    );
    let rendered = crate::provision::cloudinit::render(&inputs)?;
    print!("{}", rendered.text);
    eprintln!("step {step}: {}", rendered.summary(cfg.user_data_limit));
    Ok(())
}

pub enum InstancesOp {
    List,
    Terminate(String),
    Sweep,
}

/// `pype-coordinator instances list|terminate ID|sweep`.
pub async fn instances(dir: &Path, provider: &str, cfg: Option<&Path>, op: InstancesOp) -> Result<()> {
    let cfg = ProviderConfig::load(cfg)?;
    let p = provider::open(provider, &cfg, dir)?;
    let state = State::open(dir)?;
    let tag = provision::ca_pem(dir).map(|ca| provider::coordinator_tag(&ca)).unwrap_or_default();
    match op {
        InstancesOp::List => {
            let rows = state.instances(false)?;
            println!("{:<22} {:<8} {:<12} {:<10} {:<28} note", "instance", "provider", "state", "age", "run");
            for r in &rows {
                let age = crate::persist::state::now_ms().saturating_sub(r.created_ms) / 1000;
                println!(
                    "{:<22} {:<8} {:<12} {:<10} {:<28} {}",
                    r.instance_id,
                    r.provider,
                    r.state,
                    format!("{age}s"),
                    r.run_id.as_deref().unwrap_or("-"),
                    r.note
                );
            }
            let known: std::collections::HashSet<&str> = rows
                .iter()
                .filter(|r| r.state != crate::persist::state::INSTANCE_ENDED)
                .flat_map(|r| [Some(r.instance_id.as_str()), r.provider_id.as_deref()])
                .flatten()
                .collect();
            for l in p.list(&tag).await? {
                if !known.contains(l.provider_id.as_str()) {
                    println!(
                        "{:<22} {:<8} {:<12} (tagged, not accounted for: `instances sweep` terminates it)",
                        l.provider_id,
                        p.name(),
                        format!("{:?}", l.state).to_lowercase()
                    );
                }
            }
            Ok(())
        }
        InstancesOp::Terminate(id) => {
            let row = state
                .instances(false)?
                .into_iter()
                .find(|r| r.instance_id == id || r.provider_id.as_deref() == Some(&id));
            let pid = row.as_ref().and_then(|r| r.provider_id.clone()).unwrap_or_else(|| id.clone());
            p.terminate(&pid).await?;
            if let Some(r) = row {
                state.instance_update(&r.instance_id, "terminated", None, Some("terminated by operator"))?;
                let _ = state.revoke(&r.instance_id);
            }
            println!("terminated {id}");
            Ok(())
        }
        InstancesOp::Sweep => {
            let live: std::collections::HashSet<String> = state
                .instances(true)?
                .into_iter()
                .flat_map(|r| [Some(r.instance_id), r.provider_id])
                .flatten()
                .collect();
            let mut n = 0;
            for l in p.list(&tag).await? {
                let stopped = l.state == provider::InstanceState::Gone;
                if !live.contains(&l.provider_id) || stopped {
                    p.terminate(&l.provider_id).await?;
                    if stopped {
                        // Whatever the database said, nothing runs there any more.
                        for r in state.instances(true)? {
                            if r.instance_id == l.provider_id
                                || r.provider_id.as_deref() == Some(&l.provider_id)
                            {
                                state.instance_update(
                                    &r.instance_id,
                                    "terminated",
                                    None,
                                    Some("found stopped"),
                                )?;
                            }
                        }
                    }
                    let why = if stopped { "stopped" } else { "not accounted for" };
                    println!("terminated {} ({why})", l.provider_id);
                    n += 1;
                }
            }
            println!("{n} instances terminated");
            Ok(())
        }
    }
}
