//! `#cloud-config` user-data for an ephemeral instance, rendered from the templates in the
//! repository's `cloud-init/` directory (compiled in).
//!
//! What an instance gets: the agent config (`/etc/pype/agent.env`: coordinator address, CA
//! path, a single-use enrollment token bound to the instance id, the instance id, the
//! snapshot backend, the orphan guard), the CA certificate, a systemd unit for `pype-agent`,
//! the snapshot registry at `PYPE_SNAPSHOT_REGISTRY`, and, when the agent is not in the
//! image, a script that downloads it and checks its pinned SHA-256.
//!
//! Providers cap user-data (EC2: 16 KiB). The renderer tries, in order: the registry inline;
//! the registry gzip-compressed (`encoding: gz+b64`, which cloud-init decodes); no registry
//! in the user-data, the agent fetching it over QUIC after enrollment. [`Rendered`] says which.

use anyhow::{Result, bail};
use base64::Engine as _;
use std::io::Write as _;

const USER_DATA: &str = include_str!("../../../cloud-init/user-data.yaml");
const AGENT_UNIT: &str = include_str!("../../../cloud-init/pype-agent.service");
const INSTALL_AGENT: &str = include_str!("../../../cloud-init/install-agent.sh");

/// EC2's limit on user-data, the default cap.
pub const EC2_USER_DATA_LIMIT: usize = 16 * 1024;
/// Where the agent binary lives on an instance.
pub const AGENT_PATH: &str = "/usr/local/bin/pype-agent";

/// How the agent gets onto the instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum AgentDelivery {
    /// Already in the image at this path.
    Preinstalled { path: String },
    /// Downloaded at boot and checked against a pinned SHA-256 (64 hex digits).
    Download { url: String, sha256: String },
}

impl Default for AgentDelivery {
    fn default() -> Self {
        AgentDelivery::Preinstalled { path: AGENT_PATH.to_string() }
    }
}

impl AgentDelivery {
    pub fn check(&self) -> Result<()> {
        let shell_safe = |s: &str| {
            !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/:._-~%+=?&@,".contains(c))
        };
        match self {
            AgentDelivery::Preinstalled { path } => {
                if !path.starts_with('/') || !shell_safe(path) {
                    bail!("agent path {path:?} must be absolute, without spaces or quotes");
                }
            }
            AgentDelivery::Download { url, sha256 } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) || !shell_safe(url) {
                    bail!("agent_url {url:?} must be an http(s) URL without spaces or quotes");
                }
                if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                    bail!("agent_sha256 {sha256:?} must be 64 hex digits");
                }
            }
        }
        Ok(())
    }

    fn agent_path(&self) -> &str {
        match self {
            AgentDelivery::Preinstalled { path } => path,
            AgentDelivery::Download { .. } => AGENT_PATH,
        }
    }
}

/// Everything one instance's user-data carries.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub instance_id: String,
    /// HOST:PORT as the instance reaches the coordinator.
    pub coordinator: String,
    pub ca_pem: String,
    pub token: String,
    pub token_ttl_secs: u64,
    /// The registry in bio-pype's JSON format, profile program entries included.
    pub registry_json: String,
    /// `PYPE_SNAPSHOT_REGISTRY` on the instance.
    pub registry_path: String,
    pub agent: AgentDelivery,
    /// `PYPE_OVERLAY_MODE` on the instance.
    pub backend: String,
    pub orphan_timeout_secs: u64,
    /// What the agent does once orphaned: `poweroff` on a VM, `exit` for a local process.
    pub orphan_action: String,
    pub slots: u32,
    pub labels: Vec<(String, String)>,
    /// Cap on the rendered bytes.
    pub limit: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryPath {
    /// In the user-data as is (base64).
    Inline,
    /// In the user-data, gzip-compressed (`gz+b64`).
    Gzip,
    /// Not in the user-data: the agent fetches it over QUIC after enrollment.
    Fetch,
}

impl std::fmt::Display for RegistryPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RegistryPath::Inline => "registry inline",
            RegistryPath::Gzip => "registry gzip-compressed inline",
            RegistryPath::Fetch => "registry fetched over QUIC after enrollment",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Rendered {
    pub text: String,
    pub registry: RegistryPath,
    /// Registry size before encoding.
    pub registry_bytes: usize,
}

impl Rendered {
    pub fn summary(&self, limit: usize) -> String {
        format!(
            "{} bytes of user-data (limit {limit}), {} ({} bytes of registry)",
            self.text.len(),
            self.registry,
            self.registry_bytes
        )
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(bytes);
    enc.finish().unwrap_or_default()
}

/// Replaces `{{key}}` with its value and keeps `{{?key}}...{{/key}}` only when the key has a
/// value. Unknown placeholders are a bug in the template, reported as an error.
pub fn fill(template: &str, values: &[(&str, Option<&str>)]) -> Result<String> {
    let mut text = template.to_string();
    for (key, value) in values {
        let (open, close) = (format!("{{{{?{key}}}}}"), format!("{{{{/{key}}}}}"));
        while let Some(start) = text.find(&open) {
            let Some(end) = text[start..].find(&close).map(|e| start + e) else {
                bail!("template: {open} without {close}");
            };
            let body = text[start + open.len()..end].to_string();
            let keep = if value.is_some() { body } else { String::new() };
            text.replace_range(start..end + close.len(), &keep);
        }
        if let Some(v) = value {
            text = text.replace(&format!("{{{{{key}}}}}"), v);
        }
    }
    if let Some(i) = text.find("{{") {
        let rest: String = text[i..].chars().take(40).collect();
        bail!("template: unfilled placeholder at {rest:?}");
    }
    Ok(text)
}

fn agent_env(i: &Inputs, fetch_registry: bool) -> String {
    let mut env = vec![
        ("PYPE_COORDINATOR", i.coordinator.clone()),
        ("PYPE_CA", "/etc/pype/ca.pem".to_string()),
        ("PYPE_TOKEN", i.token.clone()),
        ("PYPE_INSTANCE_ID", i.instance_id.clone()),
        ("PYPE_AGENT_STATE_DIR", "/var/lib/pype/agent".to_string()),
        ("PYPE_OVERLAY_MODE", i.backend.clone()),
        ("PYPE_SNAPSHOT_REGISTRY", i.registry_path.clone()),
        ("PYPE_ORPHAN_TIMEOUT_SECS", i.orphan_timeout_secs.to_string()),
        ("PYPE_ORPHAN_ACTION", i.orphan_action.clone()),
        ("PYPE_SLOTS", i.slots.max(1).to_string()),
    ];
    if !i.labels.is_empty() {
        let labels: Vec<String> = i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.push(("PYPE_LABELS", labels.join(",")));
    }
    if fetch_registry {
        env.push(("PYPE_REGISTRY_FETCH", "1".to_string()));
    }
    let mut text = format!("# pype agent config for instance {}\n", i.instance_id);
    for (k, v) in env {
        text += &format!("{k}={v}\n");
    }
    text
}

fn check_inputs(i: &Inputs) -> Result<()> {
    i.agent.check()?;
    let plain = |what: &str, s: &str| -> Result<()> {
        if s.is_empty() || s.chars().any(|c| c.is_control() || c == '"' || c == '\'' || c == ' ') {
            bail!("{what} {s:?} must be non-empty, without spaces, quotes or control characters");
        }
        Ok(())
    };
    plain("instance id", &i.instance_id)?;
    plain("coordinator address", &i.coordinator)?;
    plain("backend", &i.backend)?;
    plain("orphan action", &i.orphan_action)?;
    if !i.registry_path.starts_with('/') {
        bail!("PYPE_SNAPSHOT_REGISTRY {:?} must be absolute", i.registry_path);
    }
    plain("registry path", &i.registry_path)?;
    for (k, v) in &i.labels {
        plain("label", &format!("{k}={v}"))?;
        if k.contains([',', '=']) || v.contains(',') {
            bail!("label {k}={v}: keys and values may not contain ',' or '='");
        }
    }
    Ok(())
}

fn render_with(i: &Inputs, registry: RegistryPath) -> Result<String> {
    let unit = fill(
        AGENT_UNIT,
        &[("instance_id", Some(&i.instance_id)), ("agent_path", Some(i.agent.agent_path()))],
    )?;
    let install = match &i.agent {
        AgentDelivery::Preinstalled { .. } => None,
        AgentDelivery::Download { url, sha256 } => Some(b64(fill(
            INSTALL_AGENT,
            &[("agent_url", Some(url)), ("agent_sha256", Some(sha256)), ("agent_path", Some(AGENT_PATH))],
        )?
        .as_bytes())),
    };
    let (reg, encoding) = match registry {
        RegistryPath::Inline => (Some(b64(i.registry_json.as_bytes())), "b64"),
        RegistryPath::Gzip => (Some(b64(&gzip(i.registry_json.as_bytes()))), "gz+b64"),
        RegistryPath::Fetch => (None, "b64"),
    };
    fill(
        USER_DATA,
        &[
            ("registry", reg.as_deref()),
            ("install", install.as_deref()),
            ("instance_id", Some(&i.instance_id)),
            ("token_ttl_secs", Some(&i.token_ttl_secs.to_string())),
            ("agent_env", Some(&b64(agent_env(i, registry == RegistryPath::Fetch).as_bytes()))),
            ("ca_pem", Some(&b64(i.ca_pem.as_bytes()))),
            ("agent_unit", Some(&b64(unit.as_bytes()))),
            ("registry_path", Some(&i.registry_path)),
            ("registry_encoding", Some(encoding)),
        ],
    )
}

/// Renders the smallest form that fits `limit`: registry inline, then gzip-compressed, then
/// fetched after enrollment. An error when even that does not fit.
pub fn render(i: &Inputs) -> Result<Rendered> {
    check_inputs(i)?;
    let mut last = 0;
    for path in [RegistryPath::Inline, RegistryPath::Gzip, RegistryPath::Fetch] {
        let text = render_with(i, path)?;
        if text.len() <= i.limit {
            return Ok(Rendered { text, registry: path, registry_bytes: i.registry_json.len() });
        }
        last = text.len();
    }
    bail!("user-data is {last} bytes even without the registry; the provider's limit is {}", i.limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(registry_json: String) -> Inputs {
        Inputs {
            instance_id: "pype-i-0123".into(),
            coordinator: "10.0.2.2:7000".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            token: "tok".into(),
            token_ttl_secs: 300,
            registry_json,
            registry_path: "/var/lib/pype/snapshot_registry.json".into(),
            agent: AgentDelivery::default(),
            backend: "snapshot".into(),
            orphan_timeout_secs: 300,
            orphan_action: "poweroff".into(),
            slots: 1,
            labels: vec![],
            limit: EC2_USER_DATA_LIMIT,
        }
    }

    fn decode_file(text: &str, path: &str) -> Option<Vec<u8>> {
        let at = text.find(&format!("- path: {path}\n"))?;
        let rest = &text[at..];
        let enc = rest.lines().find_map(|l| l.trim().strip_prefix("encoding: "))?.to_string();
        let content = rest.lines().find_map(|l| l.trim().strip_prefix("content: "))?;
        let raw = base64::engine::general_purpose::STANDARD.decode(content).ok()?;
        if enc == "gz+b64" {
            use std::io::Read;
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).ok()?;
            Some(out)
        } else {
            Some(raw)
        }
    }

    #[test]
    fn small_registry_is_inline_and_round_trips() {
        let reg = r#"{"/data/ref.fa": {"snapshot_id": "ab", "type": "file"}}"#.to_string();
        let r = render(&inputs(reg.clone())).unwrap();
        assert_eq!(r.registry, RegistryPath::Inline);
        assert!(r.text.starts_with("#cloud-config\n"));
        let got = decode_file(&r.text, "/var/lib/pype/snapshot_registry.json").unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), reg);
        let env = String::from_utf8(decode_file(&r.text, "/etc/pype/agent.env").unwrap()).unwrap();
        assert!(env.contains("PYPE_INSTANCE_ID=pype-i-0123\n"), "{env}");
        assert!(!env.contains("PYPE_REGISTRY_FETCH"));
        assert!(!r.text.contains("install-agent"), "preinstalled agent: no download script");
    }

    #[test]
    fn large_registries_compress_then_move_to_fetch() {
        // Compressible: repeated structure, as real registries are.
        let mut reg = String::from("{");
        for n in 0..400 {
            reg += &format!(
                "\"/data/sample-{n}/reads.fq\": {{\"snapshot_id\": \"{n:064x}\", \"type\": \"file\"}},"
            );
        }
        reg.pop();
        reg.push('}');
        let r = render(&inputs(reg.clone())).unwrap();
        assert_eq!(r.registry, RegistryPath::Gzip, "{}", r.summary(EC2_USER_DATA_LIMIT));
        assert!(r.text.len() <= EC2_USER_DATA_LIMIT);
        let got = decode_file(&r.text, "/var/lib/pype/snapshot_registry.json").unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), reg);

        // Incompressible and large: fetched.
        let noise: String = (0..60_000u32).map(|i| format!("{:x}", i.wrapping_mul(2654435761))).collect();
        let r = render(&inputs(format!("{{\"/x\": {{\"snapshot_id\": \"{noise}\"}}}}"))).unwrap();
        assert_eq!(r.registry, RegistryPath::Fetch);
        assert!(!r.text.contains("snapshot_registry.json\n    owner"));
        let env = String::from_utf8(decode_file(&r.text, "/etc/pype/agent.env").unwrap()).unwrap();
        assert!(env.contains("PYPE_REGISTRY_FETCH=1\n"), "{env}");
    }

    #[test]
    fn download_delivery_pins_the_digest_and_refuses_unsafe_values() {
        let mut i = inputs("{}".into());
        i.agent =
            AgentDelivery::Download { url: "http://10.0.2.2:8000/pype-agent".into(), sha256: "a".repeat(64) };
        let r = render(&i).unwrap();
        let script =
            String::from_utf8(decode_file(&r.text, "/usr/local/lib/pype/install-agent.sh").unwrap()).unwrap();
        assert!(script.contains(&"a".repeat(64)));
        assert!(r.text.contains("  - [/usr/local/lib/pype/install-agent.sh]\n"));

        i.agent = AgentDelivery::Download { url: "http://x/'; rm -rf /".into(), sha256: "a".repeat(64) };
        assert!(render(&i).is_err());
        i.agent = AgentDelivery::Download { url: "http://x/a".into(), sha256: "xyz".into() };
        assert!(render(&i).is_err());
        let mut i = inputs("{}".into());
        i.instance_id = "a b".into();
        assert!(render(&i).is_err());
    }

    #[test]
    fn too_small_a_limit_is_an_error() {
        let mut i = inputs("{}".into());
        i.limit = 200;
        let e = render(&i).unwrap_err().to_string();
        assert!(e.contains("limit is 200"), "{e}");
    }

    #[test]
    fn fill_sections_and_unfilled_placeholders() {
        let t = "a{{?x}}[{{x}}]{{/x}}b{{y}}";
        assert_eq!(fill(t, &[("x", Some("1")), ("y", Some("2"))]).unwrap(), "a[1]b2");
        assert_eq!(fill(t, &[("x", None), ("y", Some("2"))]).unwrap(), "ab2");
        assert!(fill(t, &[("x", None)]).is_err());
    }
}
