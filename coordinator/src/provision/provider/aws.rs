//! The `aws` provider: each instance is an EC2 instance booted from an image with cloud-init,
//! its agent configured by the rendered user-data.
//!
//! RunInstances carries the user-data, the cheapest configured instance type that fits the
//! step, image, subnet, security groups, instance profile, spot or on-demand, and the tags on
//! the instance and its volumes (TagSpecifications), so nothing exists untagged even for a
//! moment. Instances shut down on power-off are terminated (the orphan guard powers off).
//! The SDK retries throttling and transient errors with backoff; capacity and quota errors
//! come back as [`ErrorKind::Capacity`](super::ErrorKind), so the provisioner keeps the step queued and tries again later
//! (with the next instance type). Every call is logged with its request id.
//!
//! Credentials come from the standard AWS chain on the coordinator; the user-data holds no AWS
//! secret (an instance that needs AWS access gets `instance_profile`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One instance type the provider may start, with what it costs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InstanceType {
    pub name: String,
    pub cpus: u32,
    pub memory_gib: f64,
    /// Price per hour (any currency, only compared).
    pub price: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// Region (default: from the standard AWS configuration chain).
    pub region: Option<String>,
    /// EC2 endpoint (VPC endpoint, or an emulator in tests).
    pub endpoint_url: Option<String>,
    /// AMI with cloud-init (Debian, Ubuntu, Amazon Linux).
    pub image_id: String,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    /// Instance profile (name, or ARN) for instances that need AWS access (S3).
    pub instance_profile: Option<String>,
    pub key_name: Option<String>,
    /// `on-demand` or `spot`.
    pub market: Market,
    /// Spot price cap per hour (default: the on-demand price).
    pub spot_max_price: Option<String>,
    /// Size of the root volume in GiB (default: the image's).
    pub root_volume_gib: Option<i32>,
    /// Device name of the root volume, for `root_volume_gib`.
    pub root_device: String,
    /// Instance types to choose from: the cheapest that fits a step's cpus and memory wins.
    pub instance_types: Vec<InstanceType>,
    /// Attempts per API call (throttling and transient errors retried with backoff).
    pub max_attempts: u32,
    /// How long an instance type that hit a capacity or quota error is passed over.
    pub capacity_cooldown_secs: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Market {
    #[default]
    OnDemand,
    Spot,
}

impl Default for AwsConfig {
    fn default() -> Self {
        Self {
            region: None,
            endpoint_url: None,
            image_id: String::new(),
            subnet_id: None,
            security_group_ids: Vec::new(),
            instance_profile: None,
            key_name: None,
            market: Market::OnDemand,
            spot_max_price: None,
            root_volume_gib: None,
            root_device: "/dev/xvda".into(),
            instance_types: vec![
                InstanceType { name: "c7i.large".into(), cpus: 2, memory_gib: 4.0, price: 0.0893 },
                InstanceType { name: "m7i.large".into(), cpus: 2, memory_gib: 8.0, price: 0.1008 },
                InstanceType { name: "c7i.xlarge".into(), cpus: 4, memory_gib: 8.0, price: 0.1785 },
                InstanceType { name: "m7i.xlarge".into(), cpus: 4, memory_gib: 16.0, price: 0.2016 },
                InstanceType { name: "r7i.xlarge".into(), cpus: 4, memory_gib: 32.0, price: 0.2646 },
                InstanceType { name: "m7i.2xlarge".into(), cpus: 8, memory_gib: 32.0, price: 0.4032 },
                InstanceType { name: "m7i.4xlarge".into(), cpus: 16, memory_gib: 64.0, price: 0.8064 },
            ],
            max_attempts: 8,
            capacity_cooldown_secs: 120,
        }
    }
}

/// EC2 error codes that mean "not now, not this type": the run waits instead of failing.
pub fn is_capacity_code(code: &str) -> bool {
    matches!(
        code,
        "InsufficientInstanceCapacity"
            | "InsufficientCapacity"
            | "InsufficientHostCapacity"
            | "InsufficientReservedInstanceCapacity"
            | "InstanceLimitExceeded"
            | "VcpuLimitExceeded"
            | "MaxSpotInstanceCountExceeded"
            | "SpotMaxPriceTooLow"
            | "InsufficientFreeAddressesInSubnet"
            | "Unsupported"
    )
}

/// EC2 error codes for a request that cannot succeed as made: a missing or malformed image,
/// subnet, security group, key or profile, a bad parameter, missing permissions.
pub fn is_refusal_code(code: &str) -> bool {
    (code.starts_with("Invalid") && !code.starts_with("InvalidInstanceID"))
        || matches!(
            code,
            "UnauthorizedOperation"
                | "AuthFailure"
                | "OptInRequired"
                | "Blocked"
                | "MissingParameter"
                | "VPCIdNotSpecified"
                | "PendingVerification"
        )
}

/// Instance types passed over after a capacity error, until their cooldown ends.
#[derive(Default)]
pub struct Cooldowns {
    until: Mutex<HashMap<String, Instant>>,
}

impl Cooldowns {
    pub fn hit(&self, name: &str, d: Duration) {
        if let Ok(mut m) = self.until.lock() {
            m.insert(name.to_string(), Instant::now() + d);
        }
    }

    fn cooling(&self, name: &str) -> bool {
        self.until.lock().map(|m| m.get(name).is_some_and(|t| *t > Instant::now())).unwrap_or(false)
    }
}

/// The cheapest type that fits `cpus` and `memory_bytes`, skipping types cooling down after a
/// capacity error (unless every fitting type is); ties go to the earlier in the list.
pub fn choose_type<'a>(
    types: &'a [InstanceType],
    cpus: u32,
    memory_bytes: u64,
    cooldowns: &Cooldowns,
) -> Option<&'a InstanceType> {
    let mem_gib = memory_bytes as f64 / (1u64 << 30) as f64;
    let fits: Vec<&InstanceType> =
        types.iter().filter(|t| t.cpus >= cpus && t.memory_gib >= mem_gib).collect();
    let cheapest = |c: &mut dyn Iterator<Item = &'a InstanceType>| {
        c.fold(None::<&InstanceType>, |best, t| match best {
            Some(b) if b.price <= t.price => Some(b),
            _ => Some(t),
        })
    };
    cheapest(&mut fits.iter().copied().filter(|t| !cooldowns.cooling(&t.name)))
        .or_else(|| cheapest(&mut fits.iter().copied()))
}

/// The value of the `pype:instance-secret-hash` tag: ties an instance to its enrollment token
/// without revealing it.
pub fn secret_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex()[..32].to_string()
}

#[cfg(feature = "aws")]
pub use ec2::Ec2;

#[cfg(feature = "aws")]
mod ec2 {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, anyhow, bail};
    use async_trait::async_trait;
    use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
    use aws_sdk_ec2::operation::RequestId;
    use aws_sdk_ec2::types::{
        BlockDeviceMapping, EbsBlockDevice, Filter, IamInstanceProfileSpecification,
        InstanceMarketOptionsRequest, InstanceStateName, MarketType, ResourceType, ShutdownBehavior,
        SpotInstanceType, SpotMarketOptions, Tag, TagSpecification,
    };
    use base64::Engine as _;
    use tokio::sync::OnceCell;
    use tracing::{info, warn};

    use super::{AwsConfig, Cooldowns, Market, choose_type, is_capacity_code, is_refusal_code, secret_hash};
    use crate::provision::provider::{
        InstanceSpec, InstanceState, Launch, Listed, Provider, ProviderError, TAG_COORDINATOR, TAG_INSTANCE,
    };

    /// Tag holding the hash of the instance's enrollment token.
    pub const TAG_SECRET_HASH: &str = "pype:instance-secret-hash";

    pub struct Ec2 {
        cfg: AwsConfig,
        client: OnceCell<aws_sdk_ec2::Client>,
        cooldowns: Cooldowns,
        /// What each instance created here costs per hour (its type's price, or the spot cap).
        prices: std::sync::Mutex<std::collections::HashMap<String, f64>>,
    }

    /// Logs one finished call with its request id and duration.
    fn logged<T, E>(op: &str, started: Instant, r: &Result<T, SdkError<E>>)
    where
        T: RequestId,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let ms = started.elapsed().as_millis() as u64;
        match r {
            Ok(out) => info!(op, request_id = out.request_id().unwrap_or("-"), ms, "ec2 call"),
            Err(e) => warn!(
                op,
                request_id = e.request_id().unwrap_or("-"),
                code = e.code().unwrap_or("-"),
                ms,
                "ec2 call failed: {}",
                e.message().map(str::to_string).unwrap_or_else(|| format!("{e}"))
            ),
        }
    }

    fn describe_err<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
        op: &str,
        e: SdkError<E>,
    ) -> anyhow::Error {
        let code = e.code().unwrap_or("").to_string();
        let msg = e.message().map(str::to_string).unwrap_or_default();
        let rid = e.request_id().unwrap_or("-").to_string();
        if code.is_empty() {
            anyhow!(aws_sdk_ec2::error::DisplayErrorContext(e)).context(format!("{op} (request {rid})"))
        } else {
            anyhow!("{op}: {code}: {msg} (request {rid})")
        }
    }

    fn not_found(code: Option<&str>) -> bool {
        matches!(code, Some("InvalidInstanceID.NotFound" | "InvalidInstanceID.Malformed"))
    }

    fn state_of(name: Option<&InstanceStateName>) -> InstanceState {
        match name {
            Some(InstanceStateName::Pending) => InstanceState::Pending,
            Some(InstanceStateName::Running) => InstanceState::Running,
            _ => InstanceState::Gone,
        }
    }

    impl Ec2 {
        pub fn new(cfg: AwsConfig) -> Result<Self> {
            Ok(Self {
                cfg,
                client: OnceCell::new(),
                cooldowns: Cooldowns::default(),
                prices: Default::default(),
            })
        }

        async fn client(&self) -> &aws_sdk_ec2::Client {
            self.client
                .get_or_init(|| async {
                    let ep = crate::aws::Endpoint {
                        region: self.cfg.region.clone(),
                        endpoint_url: self.cfg.endpoint_url.clone(),
                        max_attempts: self.cfg.max_attempts,
                    };
                    aws_sdk_ec2::Client::new(&crate::aws::sdk_config(&ep).await)
                })
                .await
        }

        fn tag_specs(&self, tags: &BTreeMap<String, String>, instance_id: &str) -> Vec<TagSpecification> {
            let mut all: Vec<Tag> =
                tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect();
            all.push(Tag::builder().key("Name").value(instance_id).build());
            [ResourceType::Instance, ResourceType::Volume]
                .into_iter()
                .map(|rt| TagSpecification::builder().resource_type(rt).set_tags(Some(all.clone())).build())
                .collect()
        }

        /// Our instances (by the `pype:instance` tag) when only our id is known.
        async fn by_instance_tag(&self, instance_id: &str) -> Result<Vec<String>> {
            let started = Instant::now();
            let r = self
                .client()
                .await
                .describe_instances()
                .filters(Filter::builder().name(format!("tag:{TAG_INSTANCE}")).values(instance_id).build())
                .send()
                .await;
            logged("DescribeInstances", started, &r);
            let out = r.map_err(|e| describe_err("DescribeInstances", e))?;
            Ok(out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .filter(|i| state_of(i.state().and_then(|s| s.name())) != InstanceState::Gone)
                .filter_map(|i| i.instance_id().map(str::to_string))
                .collect())
        }
    }

    #[async_trait]
    impl Provider for Ec2 {
        fn name(&self) -> &'static str {
            "aws"
        }

        async fn preflight(&self) -> Result<()> {
            if self.cfg.image_id.is_empty() {
                bail!("provider config [aws]: image_id is required");
            }
            if self.cfg.instance_types.is_empty() {
                bail!("provider config [aws]: instance_types is empty");
            }
            let started = Instant::now();
            let r = self.client().await.describe_images().image_ids(&self.cfg.image_id).send().await;
            logged("DescribeImages", started, &r);
            let out = r.map_err(|e| describe_err("DescribeImages", e)).context("checking the AWS image")?;
            if out.images().is_empty() {
                bail!("image {} does not exist in this account and region", self.cfg.image_id);
            }
            Ok(())
        }

        async fn create(&self, spec: &InstanceSpec, launch: &Launch) -> Result<String> {
            let Some(ty) =
                choose_type(&self.cfg.instance_types, spec.cpus, spec.memory_bytes, &self.cooldowns)
            else {
                bail!(
                    "no configured instance type has {} cpus and {} MiB",
                    spec.cpus,
                    spec.memory_bytes >> 20
                );
            };
            let user_data = launch.user_data.as_deref().ok_or_else(|| anyhow!("no user-data rendered"))?;
            let mut tags = spec.tags.clone();
            tags.insert(TAG_SECRET_HASH.into(), secret_hash(&launch.boot.token));
            let mut req = self
                .client()
                .await
                .run_instances()
                .image_id(&self.cfg.image_id)
                .instance_type(aws_sdk_ec2::types::InstanceType::from(ty.name.as_str()))
                .min_count(1)
                .max_count(1)
                .user_data(base64::engine::general_purpose::STANDARD.encode(user_data))
                .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
                .set_tag_specifications(Some(self.tag_specs(&tags, &spec.instance_id)))
                .client_token(&spec.instance_id);
            if let Some(s) = &self.cfg.subnet_id {
                req = req.subnet_id(s);
            }
            if !self.cfg.security_group_ids.is_empty() {
                req = req.set_security_group_ids(Some(self.cfg.security_group_ids.clone()));
            }
            if let Some(p) = &self.cfg.instance_profile {
                let b = IamInstanceProfileSpecification::builder();
                req = req
                    .iam_instance_profile(if p.starts_with("arn:") { b.arn(p) } else { b.name(p) }.build());
            }
            if let Some(k) = &self.cfg.key_name {
                req = req.key_name(k);
            }
            if let Some(gib) = self.cfg.root_volume_gib {
                req = req.block_device_mappings(
                    BlockDeviceMapping::builder()
                        .device_name(&self.cfg.root_device)
                        .ebs(EbsBlockDevice::builder().volume_size(gib).delete_on_termination(true).build())
                        .build(),
                );
            }
            if self.cfg.market == Market::Spot {
                let mut spot = SpotMarketOptions::builder()
                    .spot_instance_type(SpotInstanceType::OneTime)
                    .instance_interruption_behavior(
                        aws_sdk_ec2::types::InstanceInterruptionBehavior::Terminate,
                    );
                if let Some(p) = &self.cfg.spot_max_price {
                    spot = spot.max_price(p);
                }
                req = req.instance_market_options(
                    InstanceMarketOptionsRequest::builder()
                        .market_type(MarketType::Spot)
                        .spot_options(spot.build())
                        .build(),
                );
            }
            let started = Instant::now();
            let r = req.send().await;
            logged("RunInstances", started, &r);
            let out = match r {
                Ok(out) => out,
                Err(e) if e.code().is_some_and(is_capacity_code) => {
                    self.cooldowns.hit(&ty.name, Duration::from_secs(self.cfg.capacity_cooldown_secs));
                    return Err(ProviderError::capacity(format!(
                        "{} for {}: {}",
                        e.code().unwrap_or_default(),
                        ty.name,
                        e.message().unwrap_or_default()
                    )));
                }
                Err(e) if e.code().is_some_and(is_refusal_code) => {
                    return Err(ProviderError::refused(format!(
                        "RunInstances refused: {}: {}",
                        e.code().unwrap_or_default(),
                        e.message().unwrap_or_default()
                    )));
                }
                Err(e) => return Err(describe_err("RunInstances", e)),
            };
            let id = out
                .instances()
                .first()
                .and_then(|i| i.instance_id())
                .ok_or_else(|| anyhow!("RunInstances returned no instance"))?
                .to_string();
            info!(
                instance = %spec.instance_id,
                ec2_id = %id,
                instance_type = %ty.name,
                market = ?self.cfg.market,
                "ec2 instance launched"
            );
            // On the spot market the configured cap bounds what it costs; without one, the
            // on-demand price does.
            let price = match (self.cfg.market, self.cfg.spot_max_price.as_deref().map(str::parse::<f64>)) {
                (Market::Spot, Some(Ok(cap))) => cap.min(ty.price),
                _ => ty.price,
            };
            self.prices.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), price);
            Ok(id)
        }

        fn price_per_hour(&self, provider_id: &str) -> Option<f64> {
            self.prices.lock().unwrap_or_else(|p| p.into_inner()).get(provider_id).copied()
        }

        async fn describe(&self, provider_id: &str) -> Result<InstanceState> {
            let started = Instant::now();
            let r = self.client().await.describe_instances().instance_ids(provider_id).send().await;
            logged("DescribeInstances", started, &r);
            match r {
                Ok(out) => Ok(out
                    .reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .next()
                    .map_or(InstanceState::Gone, |i| state_of(i.state().and_then(|s| s.name())))),
                Err(e) if not_found(e.code()) => Ok(InstanceState::Gone),
                Err(e) => Err(describe_err("DescribeInstances", e)),
            }
        }

        async fn terminate(&self, provider_id: &str) -> Result<()> {
            let ids = if provider_id.starts_with("i-") {
                vec![provider_id.to_string()]
            } else {
                // Our own id: the create may have gone through without us learning the EC2 id.
                self.by_instance_tag(provider_id).await?
            };
            if ids.is_empty() {
                return Ok(());
            }
            let started = Instant::now();
            let r = self.client().await.terminate_instances().set_instance_ids(Some(ids)).send().await;
            logged("TerminateInstances", started, &r);
            match r {
                Ok(_) => Ok(()),
                Err(e) if not_found(e.code()) => Ok(()),
                Err(e) => Err(describe_err("TerminateInstances", e)),
            }
        }

        async fn list(&self, coordinator_tag: &str) -> Result<Vec<Listed>> {
            let started = Instant::now();
            let mut pages = self
                .client()
                .await
                .describe_instances()
                .filters(
                    Filter::builder().name(format!("tag:{TAG_COORDINATOR}")).values(coordinator_tag).build(),
                )
                .filters(
                    Filter::builder()
                        .name("instance-state-name")
                        .set_values(Some(
                            ["pending", "running", "stopping", "stopped"].map(String::from).to_vec(),
                        ))
                        .build(),
                )
                .into_paginator()
                .send();
            let mut out = Vec::new();
            while let Some(page) = pages.next().await {
                logged("DescribeInstances", started, &page);
                let page = page.map_err(|e| describe_err("DescribeInstances", e))?;
                for i in page.reservations().iter().flat_map(|r| r.instances()) {
                    let Some(id) = i.instance_id() else { continue };
                    let tags = i
                        .tags()
                        .iter()
                        .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                        .collect();
                    out.push(Listed {
                        provider_id: id.to_string(),
                        state: state_of(i.state().and_then(|s| s.name())),
                        tags,
                    });
                }
            }
            Ok(out)
        }

        async fn console(&self, provider_id: &str) -> Result<Option<String>> {
            let r =
                self.client().await.get_console_output().instance_id(provider_id).latest(true).send().await;
            let Ok(out) = r else { return Ok(None) };
            let Some(b64) = out.output() else { return Ok(None) };
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim()).unwrap_or_default();
            Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, cpus: u32, mem: f64, price: f64) -> InstanceType {
        InstanceType { name: name.into(), cpus, memory_gib: mem, price }
    }

    #[test]
    fn cheapest_fitting_type_and_cooldown() {
        let types = vec![t("big", 8, 32.0, 0.4), t("small", 2, 4.0, 0.09), t("mem", 2, 16.0, 0.12)];
        let cd = Cooldowns::default();
        assert_eq!(choose_type(&types, 1, 0, &cd).unwrap().name, "small");
        assert_eq!(choose_type(&types, 2, 8 << 30, &cd).unwrap().name, "mem");
        assert_eq!(choose_type(&types, 4, 0, &cd).unwrap().name, "big");
        assert!(choose_type(&types, 16, 0, &cd).is_none());
        cd.hit("small", Duration::from_secs(60));
        assert_eq!(choose_type(&types, 1, 0, &cd).unwrap().name, "mem", "cooling type passed over");
        cd.hit("mem", Duration::from_secs(60));
        cd.hit("big", Duration::from_secs(60));
        assert_eq!(choose_type(&types, 1, 0, &cd).unwrap().name, "small", "all cooling: cheapest again");
    }

    #[test]
    fn refusal_codes() {
        for code in [
            "InvalidSubnetID.NotFound",
            "InvalidAMIID.Malformed",
            "UnauthorizedOperation",
            "InvalidParameterValue",
        ] {
            assert!(is_refusal_code(code), "{code}");
        }
        for code in [
            "RequestLimitExceeded",
            "InsufficientInstanceCapacity",
            "InternalError",
            "InvalidInstanceID.NotFound",
        ] {
            assert!(!is_refusal_code(code), "{code}");
        }
    }

    #[test]
    fn capacity_codes() {
        assert!(is_capacity_code("InsufficientInstanceCapacity"));
        assert!(is_capacity_code("VcpuLimitExceeded"));
        assert!(!is_capacity_code("RequestLimitExceeded"), "throttling is retried by the SDK");
        assert!(!is_capacity_code("InvalidAMIID.NotFound"));
        assert_eq!(secret_hash("tok").len(), 32);
    }
}
