//! Message types. bincode encodes enum variants by index: variants are only ever appended,
//! and `Hello` stays variant 0 of [`AgentToCoordinator`] forever.

use serde::{Deserialize, Serialize};

use crate::bulk::DataHeader;
use crate::registry::RegistryEntry;
use crate::step::{LogLine, StepOutcome, StepSpec};

/// Facts about the agent's host, read with sysinfo when the agent connects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct HostFacts {
    pub hostname: String,
    pub os: String,
    pub cpus: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// The agent's work directory, and the free space of the filesystem holding it.
    pub work_dir: String,
    pub work_dir_free_bytes: u64,
}

/// First message on the control stream, exactly once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_major: u32,
    pub protocol_minor: u32,
    pub agent_version: String,
    /// Must equal the agent id in the client certificate.
    pub agent_id: String,
    pub host: HostFacts,
    /// Scheduling labels (`partition=bigmem`), as `key=value` pairs.
    pub labels: Vec<(String, String)>,
    /// Steps the agent runs at once.
    pub slots: u32,
    /// Cloud or VM instance this agent runs on, when provisioned by the coordinator.
    pub instance_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub seq: u64,
    pub memory_available_bytes: u64,
    pub work_dir_free_bytes: u64,
    /// One-minute load average of the host.
    pub load_average: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentToCoordinator {
    Hello(Hello),
    Heartbeat(Heartbeat),
    GoingAway {
        reason: String,
    },
    /// The attempt passed its setup and the snippet is starting.
    StepStarted {
        attempt_id: u64,
        backend: String,
        view: String,
    },
    /// Lines the snippet wrote, batched; the agent's log files hold the full output.
    StepOutput {
        attempt_id: u64,
        lines: Vec<LogLine>,
    },
    /// The attempt ended (success or not) and its cleanup ran. Sent again after a reconnect
    /// until the coordinator answers [`CoordinatorToAgent::StepResultAck`].
    StepFinished(StepOutcome),
    /// Answer to [`CoordinatorToAgent::CheckOutputs`].
    OutputsChecked {
        request_id: u64,
        result: Result<Vec<(String, Option<u64>)>, RemoteError>,
    },
    /// The agent finishes what it runs and takes nothing new (SIGTERM, or
    /// [`CoordinatorToAgent::Drain`]); `GoingAway` follows once its results are acknowledged.
    /// Sent again after a reconnect while the drain lasts.
    Draining {
        reason: String,
    },
    /// Sent once after each Welcome: the attempts this agent is running or holds an
    /// unacknowledged result of, so a restarted coordinator knows which of the attempts it
    /// had dispatched are still alive.
    InHand {
        attempts: Vec<u64>,
    },
    /// The agent's running totals, sent after each heartbeat to a coordinator of minor 7 or
    /// later. (Minor 7.)
    Stats(AgentStats),
    /// What attempt `attempt_id` used, sent just before its `StepFinished` (and again before
    /// each resend of it) to a coordinator of minor 7 or later. (Minor 7.)
    StepUsage {
        attempt_id: u64,
        usage: ResourceUsage,
    },
}

/// What one attempt used, measured by the agent. (Minor 7.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUsage {
    /// CPU time in user and kernel mode, of the snippet and everything it started.
    pub cpu_user_ms: u64,
    pub cpu_system_ms: u64,
    /// Peak memory: of the attempt's cgroup (page cache included), or the largest sum of
    /// resident set sizes seen across its process group.
    pub peak_memory_bytes: u64,
    /// Bytes read from and written to storage (cgroup I/O accounting), or through
    /// read/write calls (procfs).
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// How it was measured: `cgroup v2`, `cgroup v1` or `procfs` (sampled every 100 ms).
    pub measured_by: String,
    /// The memory limit the cgroup enforced, if any.
    pub memory_limit_bytes: Option<u64>,
    /// The kernel's out-of-memory killer killed a process of the attempt.
    pub oom_killed: bool,
}

/// What an agent counted since it started (totals, not increments: a restarted agent starts
/// over from zero). (Minor 7.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStats {
    /// Snapshot lookups its cache answered.
    pub cache_hits: u64,
    /// Snapshot lookups that had to fetch.
    pub cache_misses: u64,
    /// Content bytes its cache holds now.
    pub cache_bytes: u64,
    pub steps_running: u32,
    /// Snapshot content bytes fetched and stored.
    pub bytes_fetched: u64,
    pub bytes_stored: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_major: u32,
    pub protocol_minor: u32,
    pub coordinator_version: String,
    pub agent_id: String,
    pub heartbeat_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorToAgent {
    Welcome(Welcome),
    HeartbeatAck {
        seq: u64,
    },
    GoingAway {
        reason: String,
    },
    /// Run one step attempt through the agent's storage backend.
    RunStep(Box<StepSpec>),
    /// Stop a running attempt: its process group is killed and its cleanup runs.
    CancelStep {
        attempt_id: u64,
        reason: String,
    },
    /// The coordinator has recorded this attempt's outcome; the agent may forget it.
    StepResultAck {
        attempt_id: u64,
    },
    /// Answer `check_outputs(paths)` through the agent's backend, after merging `registry`.
    CheckOutputs {
        request_id: u64,
        paths: Vec<String>,
        registry: Vec<(String, RegistryEntry)>,
    },
    /// Finish the running steps, take nothing new, then leave (the operator's
    /// `pype-coordinator agent drain`).
    Drain {
        reason: String,
    },
}

/// An error that crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    Internal,
    InvalidRequest,
    NotFound,
    Unauthorized,
    /// A tar stream was refused (hostile entry, over the size limit, bad digest).
    RefusedArchive,
    Io,
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for RemoteError {}

/// What a finished transfer moved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferSummary {
    /// Raw bytes on the stream (after compression).
    pub wire_bytes: u64,
    /// Bytes of file content packed or unpacked.
    pub content_bytes: u64,
    /// Entries (files, directories, links) in the tree.
    pub entries: u64,
    pub elapsed_ms: u64,
}

/// First frame on a bulk stream, from the side that opened it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BulkRequest {
    /// A tree follows (header, raw bytes, trailer); unpack it into `dest` on the receiver.
    Put { dest: String, data: DataHeader },
    /// Pack the tree at `src` and send it back in the reply.
    Get { src: String, compression: crate::Compression },
}

/// Frames the side that accepted a bulk stream sends back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BulkReply {
    /// The `Put` was verified and stored.
    Stored(TransferSummary),
    /// Answer to `Get`: a tree follows (raw bytes, trailer).
    Data(DataHeader),
    Error(RemoteError),
}

/// The one request of an enrollment connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub protocol_major: u32,
    pub token: String,
    /// PKCS#10 certificate signing request (PEM); the private key stays on the agent.
    pub csr_pem: String,
    /// Name the agent asks for; the coordinator makes it unique.
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EnrollResponse {
    Enrolled { agent_id: String, cert_pem: String },
    Refused(RemoteError),
}

/// A connected agent as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub agent_id: String,
    pub address: String,
    pub host: HostFacts,
    pub connected_for_ms: u64,
    pub last_heartbeat_ms_ago: u64,
    pub load_average: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminRequest {
    ListAgents,
    /// Send the coordinator-side tree `src` to `dest` on `agent`.
    Push {
        agent: String,
        src: String,
        dest: String,
        compression: crate::Compression,
    },
    /// Fetch the agent-side tree `src` into the coordinator-side `dest`.
    Pull {
        agent: String,
        src: String,
        dest: String,
        compression: crate::Compression,
    },
    /// Run one step attempt on `agent`; the answer is a stream of `StepStarted`,
    /// `StepOutput` and one final `StepDone` (or `Error`).
    RunStep {
        agent: String,
        spec: Box<StepSpec>,
    },
    /// Ask `agent`'s backend which of `paths` exist.
    CheckOutputs {
        agent: String,
        paths: Vec<String>,
        registry: Vec<(String, RegistryEntry)>,
    },
    /// Cancel a running attempt wherever it runs.
    CancelStep {
        attempt_id: u64,
    },
    /// Run a pipeline on this coordinator's agents. `pipeline_json` is the pipeline as the
    /// submitting `pype-coordinator` resolved and checked it; `options_json` the run options.
    /// The answer is a stream of `RunEvent` frames and one final `RunDone` (or `Error`).
    SubmitRun {
        pipeline_json: String,
        options_json: String,
    },
    /// Ask `agent` to drain: finish its running steps, take nothing new, then leave.
    DrainAgent {
        agent: String,
    },
    /// Which of `paths` the working registry and the snapshot store hold, with their sizes
    /// (answered with `Outputs`). (Minor 4.)
    Present {
        paths: Vec<String>,
    },
    /// Cancel one step of a running run: no retry, its dependents cancelled. (Minor 4.)
    CancelRunStep {
        run: String,
        step: String,
    },
}

/// One lifecycle event of a run, for operators' displays; the coordinator's log has the same
/// event as a structured line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEvent {
    pub run: String,
    /// `run started`, `step ready`, `step skipped`, `step pruned`, `step dispatched`,
    /// `step started`, `step exited`, `step harvested`, `step retried`, `step failed`,
    /// `step cancelled`, `agent joined`, `agent lost`, `log tail`, `run finished`, ...
    pub event: String,
    pub step: Option<String>,
    pub attempt: Option<u64>,
    pub agent: Option<String>,
    pub detail: String,
    pub progress: RunProgress,
}

/// Step counts of a run, carried by every event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunProgress {
    pub total: u32,
    /// Succeeded, skipped or pruned.
    pub done: u32,
    pub running: u32,
    pub failed: u32,
    /// Snapshot bytes moved so far.
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminResponse {
    Agents(Vec<AgentInfo>),
    TransferDone(TransferSummary),
    Error(RemoteError),
    StepStarted { backend: String, view: String },
    StepOutput(Vec<LogLine>),
    StepDone(StepOutcome),
    Outputs(Vec<(String, Option<u64>)>),
    Done,
    RunEvent(RunEvent),
    RunDone { run: String, succeeded: bool, summary: String },
}

/// First frame of a stream the agent opens to the coordinator's snapshot store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SnapshotRequest {
    /// Send snapshot `snapshot_id`: the reply is `Data`, raw bytes and a trailer.
    Fetch { snapshot_id: String },
    /// A snapshot follows (raw bytes and a trailer); store it and answer `Stored`.
    Store { data: DataHeader },
    /// Sizes of `(snapshot_id, in_snapshot_path)` pairs from the store's index.
    Stat { queries: Vec<(String, String)> },
    /// The working registry (bio-pype's JSON), for an instance whose user-data had no room for
    /// it: the reply is `Registry`.
    Registry,
    /// Like `Fetch`, but the answer may be `Download`: a short-lived URL at which the object
    /// store serves the stored bytes, so they do not pass through the coordinator. Otherwise
    /// the answer is as for `Fetch`. (Minor 2.)
    FetchDirect { snapshot_id: String },
    /// Asks how to store a snapshot. The answer is `Relay` (the raw bytes and trailer follow on
    /// this stream, as after `Store`) or `Direct` (pack it, then send `StoreObject`). (Minor 2.)
    StoreBegin,
    /// The packed snapshot's size and BLAKE3 digest. The answer is `Stored` (the store holds
    /// these bytes already) or `Upload`.
    StoreObject { wire_bytes: u64, digest: [u8; 32] },
    /// Every part is uploaded: their ETags in part order, and the snapshot's file index (JSON).
    /// The answer is `Stored`.
    StoreParts { etags: Vec<String>, index_json: Vec<u8> },
    /// After a relayed `Fetch`: the agent refused what it received, and why. (Minor 3.)
    Refused(RemoteError),
    /// A content-addressed snapshot's manifest: the answer is `ManifestFollows` and the
    /// manifest's bytes, or `Archive` when the store keeps snapshots as archives (then use
    /// `FetchDirect`). The agent then sends `Want` batches, the last one empty; the
    /// coordinator answers with blob records (see [`crate::bulk::BlobHeader`]) for every
    /// wanted digest, then an end record. (Minor 5.)
    Manifest { snapshot_id: String },
    /// Digests of blobs the agent lacks; an empty batch ends the wants. (Minor 5.)
    Want { digests: Vec<[u8; 32]> },
    /// A manifest of `bytes` bytes follows; the coordinator answers `Missing` batches (the
    /// last with `done`), the agent sends a blob record for each missing digest and an end
    /// record, and the coordinator answers `Stored` once every blob of the manifest is
    /// present and verified, or `Error` (nothing committed). `Archive` when the store keeps
    /// snapshots as archives (then use `StoreBegin`). (Minor 5.)
    StoreManifest { bytes: u64 },
    /// After `ManifestFollows`, instead of `Want`: where the wanted blobs lie in the object
    /// store's packs. The answer is `Places` (GET the byte ranges yourself; every record is
    /// checked against its digest) or `Relay` (send `Want` for them instead). (Minor 6.)
    WantPlaces { digests: Vec<[u8; 32]> },
    /// Like `StoreManifest`, for an agent that can upload packs: the answer is `Relay` (then
    /// everything goes as after `StoreManifest`) or `Direct`, then the `Missing` batches;
    /// the agent packs the missing blobs and sends `PutPacks`. (Minor 6.)
    StoreManifestDirect { bytes: u64 },
    /// The packs holding every missing blob (each blob in exactly one): the answer is
    /// `Upload`, one presigned PUT URL per pack in order. (Minor 6.)
    PutPacks { packs: Vec<PackPlan> },
    /// Every pack is uploaded: the coordinator verifies each (its digest, and every record
    /// against its blob's digest) and answers `Stored`, or `Error` with nothing committed.
    /// (Minor 6.)
    PacksPut,
}

/// Where a blob's record (one encoding byte and the payload) lies in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobPlace {
    pub digest: [u8; 32],
    /// Length of the chunk the record decodes to.
    pub len: u64,
    pub offset: u64,
    /// Bytes of the record.
    pub stored: u64,
}

/// A pack of blobs an agent uploads: its BLAKE3 digest and length, and where each blob lies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackPlan {
    pub digest: [u8; 32],
    pub len: u64,
    pub blobs: Vec<BlobPlace>,
}

/// Blobs of one pack: GET `url` (short-lived) with byte ranges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackPlaces {
    pub url: String,
    pub blobs: Vec<BlobPlace>,
}

/// What a stored snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub snapshot_id: String,
    /// Bytes of the stored (compressed) stream.
    pub wire_bytes: u64,
    /// Bytes of file content.
    pub content_bytes: u64,
    pub entries: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SnapshotReply {
    Data(DataHeader),
    Stored(SnapshotInfo),
    Sizes(Vec<Option<u64>>),
    Error(RemoteError),
    Registry {
        json: String,
    },
    /// GET `url` for the stored bytes: `wire_bytes` of zstd tar whose BLAKE3 digest is `digest`.
    Download {
        url: String,
        wire_bytes: u64,
        digest: [u8; 32],
    },
    /// Store through the object store, in parts of `part_size` bytes (the last may be shorter).
    Direct {
        part_size: u64,
    },
    /// Send the snapshot on this stream.
    Relay,
    /// PUT part `i + 1` to `urls[i]`; the URLs expire after a few minutes.
    Upload {
        urls: Vec<String>,
    },
    /// The manifest's `bytes` bytes follow. (Minor 5.)
    ManifestFollows {
        bytes: u64,
    },
    /// Blobs the store lacks; `done` on the last batch. (Minor 5.)
    Missing {
        digests: Vec<[u8; 32]>,
        done: bool,
    },
    /// The store keeps snapshots as archives: use the archive requests. (Minor 5.)
    Archive,
    /// Answer to `WantPlaces`: the packs to read the wanted blobs from. (Minor 6.)
    Places {
        packs: Vec<PackPlaces>,
    },
}
