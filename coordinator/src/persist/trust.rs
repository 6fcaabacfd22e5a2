//! The coordinator's identity on disk: CA, server certificate, admin certificate.
//!
//! Files in the state dir: `ca.pem`/`ca.key`, `server.pem`/`server.key` (reissued when the
//! set of names changes, listed in `server.names`), `admin.pem`/`admin.key` (the operator's
//! client identity for `pype-coordinator agents|push|pull`), `reset.key` (the secret QUIC
//! stateless resets are derived from, kept so a restarted coordinator can reset its
//! predecessor's connections). Keys are 0600.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result};
use transport::pki::{self, Ca, CertKey};

use crate::persist::state::{Role, State};

pub struct Identity {
    pub ca: Ca,
    pub server: CertKey,
}

/// Names the server certificate carries: the listen address (loopback and the host name when
/// listening on all addresses), `localhost`, and every `--advertise` value.
pub fn server_names(listen: SocketAddr, advertise: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_string());
        }
    }
    for a in advertise {
        // Accept "host", "ip" and "host:port".
        let name = match a.parse::<SocketAddr>() {
            Ok(sa) => sa.ip().to_string(),
            Err(_) => match a.parse::<IpAddr>() {
                Ok(ip) => ip.to_string(),
                Err(_) => a
                    .rsplit_once(':')
                    .filter(|(_, p)| p.parse::<u16>().is_ok())
                    .map_or(a.clone(), |(h, _)| h.to_string()),
            },
        };
        names.push(name);
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// Loads or creates the CA and a server certificate for `names`; makes sure the admin
/// identity exists and is recorded in the state database.
pub fn setup(dir: &Path, names: &[String], state: &State) -> Result<Identity> {
    let (ca, created) = Ca::load_or_create(dir).context("loading the CA")?;
    if created {
        tracing::info!(dir = %dir.display(), "created certificate authority");
    }
    let names_file = dir.join("server.names");
    let wanted = names.join("\n");
    let server = match (CertKey::load(dir, "server")?, std::fs::read_to_string(&names_file).ok()) {
        (Some(ck), Some(have)) if have == wanted => ck,
        _ => {
            let ck = ca.issue_server(names)?;
            ck.save(dir, "server")?;
            pki::write_file(&names_file, wanted.as_bytes(), 0o644)?;
            tracing::info!(names = %names.join(","), "issued server certificate");
            ck
        }
    };
    ensure_admin(dir, &ca, state)?;
    Ok(Identity { ca, server })
}

/// The coordinator's stateless-reset secret: `reset.key` in `dir`, made (32 random bytes,
/// 0600) the first time. A file of another length is refused, not replaced.
pub fn reset_key(dir: &Path) -> Result<[u8; 32]> {
    let path = dir.join("reset.key");
    match std::fs::read(&path) {
        Ok(bytes) => bytes.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!(
                "{} holds {} bytes, not 32: remove it to make a new one",
                path.display(),
                bytes.len()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            pki::write_file(&path, &key, 0o600)?;
            Ok(key)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
    }
}

fn ensure_admin(dir: &Path, ca: &Ca, state: &State) -> Result<()> {
    let admin = match CertKey::load(dir, "admin")? {
        Some(ck) => ck,
        None => {
            let ck = ca.issue_client("admin", 3650)?;
            ck.save(dir, "admin")?;
            ck
        }
    };
    let der = admin.cert_der()?;
    state.record_cert("admin", &pki::fingerprint(&der), Role::Admin, &admin.cert_pem)
}
