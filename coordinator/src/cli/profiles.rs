//! `profiles build`: a profile's programs built on an agent and recorded in the registry.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use protocol::{AdminRequest, AdminResponse};

use crate::embedded::{LocalCluster, LocalOptions};
use crate::persist::working::WorkingRegistry;
use crate::pipeline::Profile;

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
