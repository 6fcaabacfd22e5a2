//! Instances the coordinator provisions for its agents: the `Provider` trait every backend
//! (qemu VMs, Slurm jobs, EC2 instances) implements, and the provider config file.
//!
//! A provider only creates, describes, terminates and lists; the lifecycle (intents in the
//! state database, boot timeout, termination when work ends, the reconciler) lives in
//! [`crate::provision`] and is the same for all of them.

pub mod aws;
pub mod qemu;
pub mod slurm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::provision::cloudinit::AgentDelivery;

/// Tag keys every instance carries from its creation.
pub const TAG_COORDINATOR: &str = "pype:coordinator";
pub const TAG_RUN: &str = "pype:run";
pub const TAG_INSTANCE: &str = "pype:instance";
pub const TAG_STEP: &str = "pype:step";

/// Why a provider call failed, in terms every provider shares: what the provisioner does
/// next depends on it, never on a provider's own error type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No capacity or quota for it now (the step stays queued; try later or elsewhere).
    Capacity,
    /// Refused for how it was asked (an image, subnet, partition or permission that is not
    /// there), not for how busy the provider is: trying again will not help, and the
    /// provisioner gives up after a few in a row.
    Refused,
    /// Anything else (network, throttling, a provider hiccup): tried again with a backoff.
    Transient,
}

/// A provider error with its [`ErrorKind`]; errors without one are [`ErrorKind::Transient`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ProviderError {
    pub fn capacity(message: String) -> anyhow::Error {
        ProviderError { kind: ErrorKind::Capacity, message }.into()
    }

    pub fn refused(message: String) -> anyhow::Error {
        ProviderError { kind: ErrorKind::Refused, message }.into()
    }
}

/// The kind of a provider call's error: the first [`ProviderError`] in its chain.
pub fn error_kind(e: &anyhow::Error) -> ErrorKind {
    e.chain().find_map(|c| c.downcast_ref::<ProviderError>()).map_or(ErrorKind::Transient, |p| p.kind)
}

/// What to create.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// Our id for the instance (the agent enrolls under it); providers may assign their own.
    pub instance_id: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub tags: BTreeMap<String, String>,
}

/// How a new instance's agent finds and joins the coordinator.
pub struct Launch {
    /// Coordinator address, CA, one-time token bound to the instance id, backend, orphan
    /// guard, registry.
    pub boot: crate::provision::cloudinit::Inputs,
    /// The rendered cloud-init user-data, for providers that boot machines with it.
    pub user_data: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Pending,
    Running,
    /// Stopped, terminated or unknown to the provider.
    Gone,
}

#[derive(Debug, Clone)]
pub struct Listed {
    pub provider_id: String,
    pub state: InstanceState,
    pub tags: BTreeMap<String, String>,
}

#[async_trait]
pub trait Provider: Send + Sync {
    fn name(&self) -> &'static str;
    /// Whether [`Launch::user_data`] is needed (machines booted by cloud-init).
    fn wants_user_data(&self) -> bool {
        true
    }
    /// Whether instances start for steps still waiting on others: worth it when an instance
    /// takes a minute to boot, not when it takes seconds.
    fn prestarts(&self) -> bool {
        true
    }
    /// Creates an instance whose agent joins as `launch` says, tagged from the start; returns
    /// the provider's id for it.
    async fn create(&self, spec: &InstanceSpec, launch: &Launch) -> Result<String>;
    async fn describe(&self, provider_id: &str) -> Result<InstanceState>;
    /// Terminates; an instance already gone is not an error.
    async fn terminate(&self, provider_id: &str) -> Result<()>;
    /// Instances carrying `pype:coordinator = coordinator_tag`, whatever their state.
    async fn list(&self, coordinator_tag: &str) -> Result<Vec<Listed>>;
    /// Checks what creating an instance needs (tools, images, credentials) before a run
    /// waits on instances that could never be made.
    async fn preflight(&self) -> Result<()> {
        Ok(())
    }

    /// What instance `provider_id` (created by this provider) costs per hour, when the
    /// provider knows (its instance type's price).
    fn price_per_hour(&self, _provider_id: &str) -> Option<f64> {
        None
    }

    /// The end of the instance's console, where the provider can read it.
    async fn console(&self, _provider_id: &str) -> Result<Option<String>> {
        Ok(None)
    }
}

/// The provider config file (TOML): lifecycle settings shared by all providers, then one
/// table per provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// An instance whose agent has not connected within this is terminated and replaced.
    pub boot_timeout_secs: u64,
    /// How often the reconciler lists tagged instances and terminates unaccounted ones.
    pub sweep_interval_secs: u64,
    /// The agent on an instance gives up (powers off) after losing its coordinator this long.
    pub orphan_timeout_secs: u64,
    /// Most instances at once.
    pub max_instances: usize,
    /// An instance without work is terminated once idle this long (0: as soon as no step
    /// wants it).
    pub idle_timeout_secs: u64,
    /// Instances kept while a run has work, from its start: they boot in parallel instead of
    /// one after another as steps become ready.
    pub min_instances: usize,
    /// Cap on rendered user-data bytes.
    pub user_data_limit: usize,
    /// Host (or IP) at which instances reach the coordinator (default: 10.0.2.2 for qemu's
    /// user networking; for slurm the listen address, or this host's name).
    pub coordinator_host: Option<String>,
    /// `PYPE_OVERLAY_MODE` of instance agents.
    pub backend: String,
    /// `PYPE_SNAPSHOT_REGISTRY` on instances.
    pub registry_path: String,
    /// How the agent gets onto an instance.
    pub agent: AgentDelivery,
    /// What one instance costs per hour (any currency), for providers without instance types
    /// of their own (qemu, slurm); `aws` prices each instance by its type.
    pub price_per_hour: Option<f64>,
    pub qemu: qemu::QemuConfig,
    pub slurm: slurm::SlurmConfig,
    pub aws: aws::AwsConfig,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            boot_timeout_secs: 300,
            sweep_interval_secs: 60,
            orphan_timeout_secs: 600,
            max_instances: 2,
            idle_timeout_secs: 0,
            min_instances: 0,
            user_data_limit: crate::provision::cloudinit::EC2_USER_DATA_LIMIT,
            coordinator_host: None,
            backend: "snapshot".into(),
            registry_path: "/var/lib/pype/snapshot_registry.json".into(),
            agent: AgentDelivery::default(),
            price_per_hour: None,
            qemu: qemu::QemuConfig::default(),
            slurm: slurm::SlurmConfig::default(),
            aws: aws::AwsConfig::default(),
        }
    }
}

impl ProviderConfig {
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let cfg: Self = match path {
            None => Self::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading provider config {}", p.display()))?;
                toml::from_str(&text).map_err(|e| {
                    let at = e
                        .span()
                        .map(|s| {
                            let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                            format!(":{line}")
                        })
                        .unwrap_or_default();
                    anyhow::anyhow!("{}{at}: {}", p.display(), e.message())
                })?
            }
        };
        cfg.agent.check().context("provider config [agent]")?;
        if cfg.max_instances == 0 {
            bail!("provider config: max_instances must be at least 1");
        }
        if cfg.boot_timeout_secs == 0 || cfg.sweep_interval_secs == 0 {
            bail!("provider config: boot_timeout_secs and sweep_interval_secs must be positive");
        }
        Ok(cfg)
    }
}

/// The provider named `name`, with its part of `cfg`; `state_dir` holds what it keeps locally.
pub fn open(name: &str, cfg: &ProviderConfig, state_dir: &Path) -> Result<Arc<dyn Provider>> {
    match name {
        "qemu" => Ok(Arc::new(qemu::Qemu::new(cfg.qemu.clone(), instances_dir(state_dir, "qemu"))?)),
        "slurm" => Ok(Arc::new(slurm::Slurm::new(cfg.slurm.clone(), instances_dir(state_dir, "slurm"))?)),
        #[cfg(feature = "aws")]
        "aws" => Ok(Arc::new(aws::Ec2::new(cfg.aws.clone())?)),
        #[cfg(not(feature = "aws"))]
        "aws" => {
            bail!("this pype-coordinator was built without the `aws` feature (cargo build --features aws)")
        }
        other => bail!("unknown provider {other:?} (known: qemu, slurm, aws)"),
    }
}

/// Command-line settings that win over the provider config file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub max_instances: Option<usize>,
    pub idle_timeout_secs: Option<u64>,
    pub boot_timeout_secs: Option<u64>,
    pub partition: Option<String>,
    pub account: Option<String>,
    /// Appended to the config's `[slurm] sbatch_args`.
    pub sbatch_args: Vec<String>,
}

impl ProviderConfig {
    pub fn apply(&mut self, o: &Overrides) -> Result<()> {
        if let Some(n) = o.max_instances {
            if n == 0 {
                bail!("--max-agents must be at least 1");
            }
            self.max_instances = n;
        }
        if let Some(t) = o.idle_timeout_secs {
            self.idle_timeout_secs = t;
        }
        if let Some(t) = o.boot_timeout_secs {
            if t == 0 {
                bail!("--boot-timeout must be positive");
            }
            self.boot_timeout_secs = t;
        }
        if o.partition.is_some() {
            self.slurm.partition = o.partition.clone();
        }
        if o.account.is_some() {
            self.slurm.account = o.account.clone();
        }
        self.slurm.sbatch_args.extend(o.sbatch_args.iter().cloned());
        Ok(())
    }

    /// The host instances of `provider` reach the coordinator at, when it listens on `listen`.
    pub fn coordinator_host_for(&self, provider: &str, listen: std::net::SocketAddr) -> String {
        if let Some(h) = &self.coordinator_host {
            return h.clone();
        }
        match provider {
            "qemu" => "10.0.2.2".into(),
            _ if !listen.ip().is_unspecified() => listen.ip().to_string(),
            _ => crate::provision::hostname(),
        }
    }
}

pub fn instances_dir(state_dir: &Path, provider: &str) -> PathBuf {
    state_dir.join("instances").join(provider)
}

/// This coordinator's tag value: derived from its CA, so it is stable across restarts and
/// distinct between coordinators.
pub fn coordinator_tag(ca_pem: &str) -> String {
    let h = blake3::hash(ca_pem.as_bytes()).to_hex();
    format!("pype-{}", &h[..12])
}
