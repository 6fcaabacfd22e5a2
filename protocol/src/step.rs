//! What a step attempt is on the wire: the coordinator's [`StepSpec`] and the agent's
//! [`StepOutcome`].

use serde::{Deserialize, Serialize};

use crate::registry::RegistryEntry;

/// One attempt of one step, as the coordinator hands it to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StepSpec {
    /// Unique per attempt, chosen by the coordinator; results name it.
    pub attempt_id: u64,
    pub run: String,
    pub step: String,
    pub kind: StepKind,
    /// Bash snippet.
    pub command: String,
    /// Declared input paths (absolute).
    pub inputs: Vec<String>,
    /// Declared output paths (absolute).
    pub outputs: Vec<String>,
    /// Outputs not to harvest (bio-pype's `output_harvest[path] = False`).
    pub no_harvest: Vec<String>,
    /// The program the snippet runs, restored before the outputs are prepared.
    pub program: Option<ProgramRef>,
    /// Environment variables for the snippet (declared paths in values are substituted).
    pub env: Vec<(String, String)>,
    /// Wall-clock limit; the process group is killed when it passes.
    pub timeout_secs: Option<u64>,
    /// Registry entries the attempt needs (inputs, program); merged into the agent's registry
    /// before the backend runs.
    pub registry: Vec<(String, RegistryEntry)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum StepKind {
    /// A pipeline step: prepare_inputs, restore_program, prepare_outputs, run, harvest.
    #[default]
    Run,
    /// A profile build: prepare_build over the artifacts, run the build command, then
    /// stage_program for each artifact.
    Build { profile: String, programs: Vec<ProgramArtifact> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramRef {
    pub profile: String,
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramArtifact {
    pub key: String,
    /// Absolute path of the file or directory the build command produces.
    pub artifact_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub stream: OutputStream,
    pub line: String,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepExit {
    /// The snippet exited with this code.
    Exited(i32),
    /// The snippet was killed by this signal (not by the agent).
    Signalled(i32),
    /// `timeout_secs` passed; the process group was killed.
    TimedOut,
    /// The coordinator cancelled it or the agent shut down; the process group was killed.
    Cancelled,
    /// The backend failed before the snippet ran (see `error`).
    SetupFailed,
    /// The snippet succeeded but harvesting its outputs failed (see `error`).
    HarvestFailed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepOutcome {
    pub attempt_id: u64,
    pub exit: StepExit,
    /// What went wrong, for every exit but `Exited(0)`.
    pub error: Option<String>,
    /// The backend that ran it (`direct`, `overlay`, `snapshot`, or an external name).
    pub backend: String,
    /// `check_outputs` of the declared outputs after harvest.
    pub outputs: Vec<(String, Option<u64>)>,
    /// Registry entries the harvest produced.
    pub new_entries: Vec<(String, RegistryEntry)>,
    pub elapsed_ms: u64,
}

impl StepOutcome {
    pub fn succeeded(&self) -> bool {
        self.exit == StepExit::Exited(0)
    }
}
