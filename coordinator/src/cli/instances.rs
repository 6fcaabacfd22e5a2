//! `cloud-init render` and `instances`: a provider's instances, for operators.

use std::path::Path;

use anyhow::{Result, bail};

use crate::persist::state::State;
use crate::persist::working::WorkingRegistry;
use crate::pipeline::Pipeline;
use crate::provision;
use crate::provision::provider::{self, ProviderConfig};

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
