//! Certificates: the coordinator's CA, its server certificate, agents' keys and CSRs, and the
//! rustls configurations built from them. This is the only module that names rcgen.
//!
//! Private keys are generated where they are used and written with mode 0600; an agent's key
//! never leaves the agent (it sends a CSR).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

/// Common name of the CA certificate.
pub const CA_COMMON_NAME: &str = "pype coordinator CA";

/// A certificate with its private key, both PEM.
#[derive(Clone)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertKey {
    pub fn cert_der(&self) -> Result<CertificateDer<'static>> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).context("parsing certificate PEM")
    }

    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).context("parsing private key PEM")
    }

    /// Writes `<stem>.pem` (0644) and `<stem>.key` (0600) into `dir`.
    pub fn save(&self, dir: &Path, stem: &str) -> Result<()> {
        write_file(&dir.join(format!("{stem}.pem")), self.cert_pem.as_bytes(), 0o644)?;
        write_file(&dir.join(format!("{stem}.key")), self.key_pem.as_bytes(), 0o600)
    }

    pub fn load(dir: &Path, stem: &str) -> Result<Option<Self>> {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        if !cert.exists() || !key.exists() {
            return Ok(None);
        }
        Ok(Some(Self {
            cert_pem: std::fs::read_to_string(&cert)
                .with_context(|| format!("reading {}", cert.display()))?,
            key_pem: std::fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?,
        }))
    }
}

/// Writes a file atomically (temp name + rename) with the given mode.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data).with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all().ok();
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(days);
}

fn random_serial(params: &mut CertificateParams) {
    let mut serial = [0u8; 16];
    rand::fill(&mut serial);
    serial[0] &= 0x7f;
    params.serial_number = Some(serial.to_vec().into());
}

/// The coordinator's certificate authority.
pub struct Ca {
    pub cert_key: CertKey,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate().context("generating CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        // A unique name per CA, so a certificate from another coordinator's CA is reported as
        // "unknown issuer" rather than as a bad signature.
        let id: u32 = rand::random();
        params.distinguished_name.push(DnType::CommonName, format!("{CA_COMMON_NAME} {id:08x}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, 3650);
        random_serial(&mut params);
        let cert = params.self_signed(&key).context("self-signing CA")?;
        let cert_key = CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        Self::from_cert_key(cert_key)
    }

    pub fn from_cert_key(cert_key: CertKey) -> Result<Self> {
        let key = KeyPair::from_pem(&cert_key.key_pem).context("parsing CA key")?;
        let issuer = Issuer::from_ca_cert_pem(&cert_key.cert_pem, key).context("parsing CA certificate")?;
        Ok(Self { cert_key, issuer })
    }

    /// Loads the CA from `dir` (`ca.pem`, `ca.key`), creating it on first use.
    pub fn load_or_create(dir: &Path) -> Result<(Self, bool)> {
        if let Some(ck) = CertKey::load(dir, "ca")? {
            return Ok((Self::from_cert_key(ck)?, false));
        }
        let ca = Self::generate()?;
        ca.cert_key.save(dir, "ca")?;
        Ok((ca, true))
    }

    /// Issues the coordinator's server certificate for the given names and addresses.
    pub fn issue_server(&self, names: &[String]) -> Result<CertKey> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "pype coordinator");
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()
            .context("building server certificate names")?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 825);
        random_serial(&mut params);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Signs a client certificate for `common_name` using only the public key of the CSR:
    /// nothing else the requester asked for (names, CA flags, validity) is trusted.
    pub fn sign_client_csr(&self, csr_pem: &str, common_name: &str, days: i64) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .context("parsing certificate signing request")?;
        let params = client_params(common_name, days);
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }

    /// Issues a client certificate and key in one go (for the coordinator's admin identity and
    /// for tests), valid from `not_before` for `days` days.
    pub fn issue_client(&self, common_name: &str, days: i64) -> Result<CertKey> {
        let key = KeyPair::generate()?;
        let params = client_params(common_name, days);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Issues a client certificate whose validity window has already ended (tests only).
    pub fn issue_expired_client(&self, common_name: &str) -> Result<CertKey> {
        let key = KeyPair::generate()?;
        let mut params = client_params(common_name, 1);
        params.not_before = OffsetDateTime::now_utc() - Duration::days(10);
        params.not_after = OffsetDateTime::now_utc() - Duration::days(1);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn client_params(common_name: &str, days: i64) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    random_serial(&mut params);
    params
}

/// A key pair generated on the agent and the CSR to send for it.
pub fn generate_csr(common_name: &str) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, common_name);
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// Stable identity of a certificate: BLAKE3 of its DER, hex.
pub fn fingerprint(der: &[u8]) -> String {
    blake3::hash(der).to_hex().to_string()
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Result<String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| anyhow::anyhow!("parsing certificate: {e}"))?;
    let cn = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned);
    match cn {
        Some(cn) => Ok(cn),
        None => bail!("certificate has no common name"),
    }
}

/// rustls with ring, preferring AES-128-GCM (the fastest suite for bulk QUIC on x86 with AES-NI).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    Arc::new(provider)
}

fn roots(ca_pem: &str) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("parsing CA PEM")?).context("adding CA certificate")?;
    }
    if roots.is_empty() {
        bail!("no certificate found in the CA file");
    }
    Ok(roots)
}

/// Server TLS config: the server certificate, client certificates verified against the CA
/// when presented. Connections without a client certificate complete the handshake so that
/// enrollment works; the coordinator refuses them on every other ALPN before reading anything.
pub fn server_tls(ca_pem: &str, server: &CertKey, alpns: &[&[u8]]) -> Result<rustls::ServerConfig> {
    let provider = crypto_provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(ca_pem)?),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .context("building client certificate verifier")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server.cert_der()?], server.key_der()?)
        .context("loading server certificate")?;
    cfg.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// Client TLS config: verifies the coordinator against `ca_pem`, presents `client` if given.
pub fn client_tls(ca_pem: &str, client: Option<&CertKey>, alpn: &[u8]) -> Result<rustls::ClientConfig> {
    let provider = crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?);
    let mut cfg = match client {
        Some(ck) => builder
            .with_client_auth_cert(vec![ck.cert_der()?], ck.key_der()?)
            .context("loading client certificate")?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_is_signed_with_our_name_only() {
        let ca = Ca::generate().unwrap();
        let (csr, _key) = generate_csr("requested-admin").unwrap();
        let pem = ca.sign_client_csr(&csr, "agent-7", 30).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(common_name(&der).unwrap(), "agent-7");
    }

    #[test]
    fn garbage_csr_is_an_error() {
        let ca = Ca::generate().unwrap();
        assert!(ca.sign_client_csr("not a csr", "a", 1).is_err());
    }
}
