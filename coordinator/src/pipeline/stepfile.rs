//! One step as a TOML file, for `pype-coordinator step run`: the same fields a pipeline step
//! has, without the pipeline around it.
//!
//! ```toml
//! command = "sort /data/in.txt > /results/out.txt"
//! inputs = ["/data/in.txt"]
//! outputs = ["/results/out.txt"]
//! env = { LC_ALL = "C" }
//! timeout_secs = 60
//! program = { profile = "default", key = "sort" }   # optional
//! [build]                                           # optional: a profile build
//! profile = "default"
//! programs = [{ key = "tool", artifact_path = "/opt/tools/tool.sif" }]
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use protocol::{ProgramArtifact, ProgramRef, Registry, StepKind, StepSpec};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    #[serde(default)]
    name: Option<String>,
    command: String,
    #[serde(default)]
    inputs: Vec<String>,
    #[serde(default)]
    outputs: Vec<String>,
    #[serde(default)]
    no_harvest: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    timeout_secs: Option<u64>,
    #[serde(default)]
    program: Option<ProgramFile>,
    #[serde(default)]
    build: Option<BuildFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgramFile {
    profile: String,
    key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildFile {
    profile: String,
    programs: Vec<ArtifactFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArtifactFile {
    key: String,
    artifact_path: String,
}

/// Reads a step file into a spec (attempt id 0: the coordinator assigns one) carrying the
/// registry entries it needs.
pub fn load(path: &Path, registry: &Registry) -> Result<StepSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: StepFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for p in file.inputs.iter().chain(&file.outputs) {
        if !p.starts_with('/') {
            bail!("{}: path {p:?} is not absolute", path.display());
        }
    }
    let name = file.name.unwrap_or_else(|| {
        path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "step".into())
    });
    let mut profiles: Vec<&str> = Vec::new();
    if let Some(p) = &file.program {
        profiles.push(&p.profile);
    }
    if let Some(b) = &file.build {
        profiles.push(&b.profile);
    }
    let paths = file.inputs.iter().chain(&file.outputs).map(String::as_str);
    let entries = registry.relevant(paths, &profiles);
    Ok(StepSpec {
        attempt_id: 0,
        run: "adhoc".into(),
        step: name,
        kind: match file.build {
            None => StepKind::Run,
            Some(b) => StepKind::Build {
                profile: b.profile,
                programs: b
                    .programs
                    .into_iter()
                    .map(|a| ProgramArtifact { key: a.key, artifact_path: a.artifact_path })
                    .collect(),
            },
        },
        command: file.command,
        inputs: file.inputs,
        outputs: file.outputs,
        no_harvest: file.no_harvest,
        program: file.program.map(|p| ProgramRef { profile: p.profile, key: p.key }),
        env: file.env.into_iter().collect(),
        timeout_secs: file.timeout_secs,
        registry: entries,
    })
}

/// Reads a registry file; a missing file is an empty registry.
pub fn read_registry(path: &Path) -> Result<Registry> {
    match std::fs::read_to_string(path) {
        Ok(text) => Registry::parse(&text).with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes a registry file atomically.
pub fn write_registry(path: &Path, registry: &Registry) -> Result<()> {
    transport::pki::write_file(path, registry.to_json().as_bytes(), 0o644)
}
