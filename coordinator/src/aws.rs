//! The AWS SDK's shared configuration: the only module naming `aws-config` and
//! `aws-smithy-http-client`. Credentials come only from the SDK's standard chain (environment,
//! profile files, web identity, container and instance metadata); nothing here reads or stores
//! a secret itself.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_smithy_http_client::tls;

/// Where the SDK talks to: a region, and an endpoint for S3-compatible stores, VPC endpoints
/// or an emulator.
#[derive(Debug, Clone, Default)]
pub struct Endpoint {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// Attempts per call, throttling and transient errors retried with exponential backoff.
    pub max_attempts: u32,
}

/// The SDK configuration for `ep`: rustls with ring (no second TLS stack), the standard retry
/// policy (exponential backoff with jitter on throttling, 5xx and connection errors).
pub async fn sdk_config(ep: &Endpoint) -> aws_config::SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https();
    let retry = RetryConfig::standard()
        .with_max_attempts(ep.max_attempts.max(1))
        .with_initial_backoff(Duration::from_millis(500))
        .with_max_backoff(Duration::from_secs(20));
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10))
        .operation_attempt_timeout(Duration::from_secs(60))
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .retry_config(retry)
        .timeout_config(timeouts);
    if let Some(r) = &ep.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    if let Some(u) = &ep.endpoint_url {
        loader = loader.endpoint_url(u.clone());
    }
    loader.load().await
}
