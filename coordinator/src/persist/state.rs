//! The coordinator's state database (SQLite, bundled). This is the only module that names
//! rusqlite. Several processes may open it at once (`serve` and the operator's commands):
//! WAL mode and a busy timeout keep them from stepping on each other.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use rusqlite::{OptionalExtension, params};

pub struct State {
    db: Mutex<rusqlite::Connection>,
}

/// Role of a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Admin,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CertRecord {
    pub agent_id: String,
    pub role: Role,
    pub revoked: bool,
}

#[derive(Debug, Clone)]
pub struct EnrolledAgent {
    pub agent_id: String,
    pub enrolled_at: u64,
    pub revoked: bool,
    pub last_addr: Option<String>,
    pub last_seen: Option<u64>,
}

/// Why an enrollment was refused; the message is sent to the agent and logged.
#[derive(Debug, thiserror::Error)]
pub enum EnrollRefusal {
    #[error("unknown enrollment token")]
    UnknownToken,
    #[error("enrollment token expired")]
    Expired,
    #[error("enrollment token used up")]
    UsedUp,
    #[error("{0}")]
    Other(String),
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn token_hash(token: &str) -> String {
    blake3::hash(token.trim().as_bytes()).to_hex().to_string()
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    uses_left INTEGER NOT NULL,
    instance_id TEXT
);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    cert_pem TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,
    revoked_at INTEGER,
    last_addr TEXT,
    last_seen INTEGER,
    host_json TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    pipeline TEXT NOT NULL,
    pipeline_file TEXT NOT NULL,
    pipeline_json TEXT NOT NULL,
    options_json TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    error TEXT
);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL,
    step TEXT NOT NULL,
    idx INTEGER NOT NULL,
    state TEXT NOT NULL,
    why TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    attempt_id INTEGER,
    agent TEXT,
    started_ms INTEGER,
    finished_ms INTEGER,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS attempts (
    attempt_id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    step TEXT NOT NULL,
    number INTEGER NOT NULL,
    agent TEXT NOT NULL,
    state TEXT NOT NULL,
    dispatched_ms INTEGER NOT NULL,
    started_ms INTEGER,
    finished_ms INTEGER,
    exit TEXT,
    error TEXT,
    elapsed_ms INTEGER,
    usage_json TEXT,
    requested_memory INTEGER
);
CREATE INDEX IF NOT EXISTS attempts_by_step ON attempts (run_id, step);
CREATE INDEX IF NOT EXISTS attempts_by_agent ON attempts (agent);
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    state TEXT NOT NULL,
    run_id TEXT,
    step TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    detail_json TEXT NOT NULL DEFAULT '{}',
    provider_id TEXT,
    note TEXT NOT NULL DEFAULT '',
    price_per_hour REAL,
    joined_ms INTEGER,
    ended_ms INTEGER
);
CREATE TABLE IF NOT EXISTS transfers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    agent TEXT NOT NULL,
    direction TEXT NOT NULL,
    snapshot_id TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    wire_bytes INTEGER NOT NULL,
    elapsed_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS transfers_by_agent ON transfers (agent, at_ms);
CREATE INDEX IF NOT EXISTS transfers_by_time ON transfers (at_ms);
";

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// One run, as `status` lists it.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub run_id: String,
    pub pipeline: String,
    pub pipeline_file: String,
    pub pipeline_json: String,
    pub options_json: String,
    pub state: String,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    pub error: Option<String>,
}

/// One step of a run.
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub step: String,
    pub idx: usize,
    pub state: String,
    pub why: String,
    pub attempts: u32,
    pub attempt_id: Option<u64>,
    pub agent: Option<String>,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// Snapshot bytes the step's agent moved while the step ran (exact when the agent ran
    /// nothing else at the time).
    pub bytes: u64,
    /// What its last attempt used, when its agent measured it.
    pub usage: Option<protocol::ResourceUsage>,
    /// The memory the step requested (`resources.memory`; 0: none).
    pub requested_memory: u64,
}

/// One snapshot transfer.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferRow {
    pub at_ms: u64,
    pub agent: String,
    /// `fetch`, `store`, `fetch-direct`, `store-direct`.
    pub direction: String,
    pub bytes: u64,
    pub elapsed_ms: u64,
}

/// When an attempt ran, and on which agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptSpan {
    pub step: String,
    pub agent: String,
    pub dispatched_ms: u64,
    /// `None` while it runs.
    pub finished_ms: Option<u64>,
}

/// One attempt.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub attempt_id: u64,
    pub step: String,
    pub number: u32,
    pub agent: String,
    pub state: String,
    pub dispatched_ms: u64,
    pub finished_ms: Option<u64>,
}

/// One write of a run's steps and attempts, made (with its time) when the run decides it and
/// applied later with others in one transaction ([`State::apply`]): a burst of results or
/// dispatches costs one commit, not one per row.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    StepState {
        run_id: String,
        step: String,
        state: String,
        why: String,
        at_ms: u64,
    },
    AttemptDispatched {
        run_id: String,
        step: String,
        attempt_id: u64,
        number: u32,
        agent: String,
        at_ms: u64,
    },
    AttemptStarted {
        attempt_id: u64,
        at_ms: u64,
    },
    AttemptEnded {
        attempt_id: u64,
        state: String,
        exit: Option<String>,
        error: Option<String>,
        elapsed_ms: Option<u64>,
        at_ms: u64,
    },
    AttemptUsage {
        attempt_id: u64,
        usage_json: String,
        requested_memory: u64,
    },
}

impl Write {
    /// Nothing waits on this write being committed (no result acknowledged, no attempt sent
    /// after it): it may wait for the next transaction. A crash before then loses only a
    /// start time or an attempt's figures; a resumed run treats a dispatched attempt as a
    /// started one.
    pub fn can_wait(&self) -> bool {
        matches!(self, Write::AttemptStarted { .. } | Write::AttemptUsage { .. })
    }

    pub fn step_state(run_id: &str, step: &str, state: &str, why: &str) -> Self {
        let (run_id, step, state, why) = (run_id.into(), step.into(), state.into(), why.into());
        Write::StepState { run_id, step, state, why, at_ms: now_ms() }
    }

    pub fn attempt_dispatched(run_id: &str, step: &str, attempt_id: u64, number: u32, agent: &str) -> Self {
        let (run_id, step, agent) = (run_id.into(), step.into(), agent.into());
        Write::AttemptDispatched { run_id, step, attempt_id, number, agent, at_ms: now_ms() }
    }

    pub fn attempt_started(attempt_id: u64) -> Self {
        Write::AttemptStarted { attempt_id, at_ms: now_ms() }
    }

    /// `state` is succeeded, failed, lost or superseded.
    pub fn attempt_ended(
        attempt_id: u64,
        state: &str,
        exit: Option<&str>,
        error: Option<&str>,
        elapsed_ms: Option<u64>,
    ) -> Self {
        Write::AttemptEnded {
            attempt_id,
            state: state.into(),
            exit: exit.map(str::to_string),
            error: error.map(str::to_string),
            elapsed_ms,
            at_ms: now_ms(),
        }
    }

    pub fn attempt_usage(
        attempt_id: u64,
        usage: &protocol::ResourceUsage,
        requested_memory: u64,
    ) -> Result<Self> {
        Ok(Write::AttemptUsage { attempt_id, usage_json: serde_json::to_string(usage)?, requested_memory })
    }

    fn execute(&self, tx: &rusqlite::Transaction<'_>) -> Result<()> {
        match self {
            Write::StepState { run_id, step, state, why, at_ms } => {
                let finished =
                    matches!(state.as_str(), "succeeded" | "failed" | "cancelled").then_some(*at_ms);
                tx.prepare_cached(
                    "UPDATE steps SET state = ?3, why = ?4, finished_ms = COALESCE(?5, finished_ms)
                     WHERE run_id = ?1 AND step = ?2",
                )?
                .execute(params![run_id, step, state, why, finished])?;
            }
            Write::AttemptDispatched { run_id, step, attempt_id, number, agent, at_ms } => {
                tx.prepare_cached(
                    "INSERT INTO attempts (attempt_id, run_id, step, number, agent, state, dispatched_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'dispatched', ?6)",
                )?
                .execute(params![*attempt_id as i64, run_id, step, number, agent, at_ms])?;
                tx.prepare_cached(
                    "UPDATE steps SET state = 'running', attempts = ?3, attempt_id = ?4, agent = ?5,
                     started_ms = ?6, finished_ms = NULL WHERE run_id = ?1 AND step = ?2",
                )?
                .execute(params![run_id, step, number, *attempt_id as i64, agent, at_ms])?;
            }
            Write::AttemptStarted { attempt_id, at_ms } => {
                tx.prepare_cached(
                    "UPDATE attempts SET state = 'started', started_ms = ?2
                     WHERE attempt_id = ?1 AND state = 'dispatched'",
                )?
                .execute(params![*attempt_id as i64, at_ms])?;
            }
            Write::AttemptEnded { attempt_id, state, exit, error, elapsed_ms, at_ms } => {
                tx.prepare_cached(
                    "UPDATE attempts SET state = ?2, exit = ?3, error = ?4, elapsed_ms = ?5, finished_ms = ?6
                     WHERE attempt_id = ?1",
                )?
                .execute(params![
                    *attempt_id as i64,
                    state,
                    exit,
                    error,
                    elapsed_ms,
                    at_ms
                ])?;
            }
            Write::AttemptUsage { attempt_id, usage_json, requested_memory } => {
                tx.prepare_cached(
                    "UPDATE attempts SET usage_json = ?2, requested_memory = ?3 WHERE attempt_id = ?1",
                )?
                .execute(params![
                    *attempt_id as i64,
                    usage_json,
                    *requested_memory as i64
                ])?;
            }
        }
        Ok(())
    }
}

impl State {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating state dir {}", dir.display()))?;
        let path = dir.join("state.db");
        let db = rusqlite::Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        db.busy_timeout(Duration::from_secs(10))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch(SCHEMA).context("creating state schema")?;
        // Databases made before instances were provisioned, or before attempts recorded what
        // they used, lack these columns.
        for (table, column, decl) in [
            ("instances", "provider_id", "TEXT"),
            ("instances", "note", "TEXT NOT NULL DEFAULT ''"),
            ("attempts", "usage_json", "TEXT"),
            ("instances", "price_per_hour", "REAL"),
            ("instances", "joined_ms", "INTEGER"),
            ("instances", "ended_ms", "INTEGER"),
            ("attempts", "requested_memory", "INTEGER"),
        ] {
            let present: bool = db
                .prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?
                .exists(params![column])?;
            if !present {
                db.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
            }
        }
        Ok(Self { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates an enrollment token; only its hash is stored.
    pub fn create_token(&self, ttl: Duration, uses: u32, instance_id: Option<&str>) -> Result<String> {
        let mut raw = [0u8; 24];
        rand::fill(&mut raw);
        let token = format!("pype1.{}", hex::encode(raw));
        let now = now_secs();
        self.db().execute(
            "INSERT INTO tokens (hash, created_at, expires_at, uses_left, instance_id) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![token_hash(&token), now, now + ttl.as_secs(), uses, instance_id],
        )?;
        Ok(token)
    }

    /// Spends one use of `token` and records the agent whose certificate `sign` produces for
    /// the id chosen here, all in one transaction.
    pub fn enroll(
        &self,
        token: &str,
        name: &str,
        sign: impl FnOnce(&str) -> Result<String>,
        fingerprint_of: impl Fn(&str) -> Result<String>,
    ) -> Result<(String, String), EnrollRefusal> {
        let other = |e: anyhow::Error| EnrollRefusal::Other(format!("{e:#}"));
        let mut db = self.db();
        let tx = db.transaction().map_err(|e| other(e.into()))?;
        let row: Option<(u64, i64, Option<String>)> = tx
            .query_row(
                "SELECT expires_at, uses_left, instance_id FROM tokens WHERE hash = ?1",
                params![token_hash(token)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| other(e.into()))?;
        let Some((expires_at, uses_left, instance)) = row else { return Err(EnrollRefusal::UnknownToken) };
        if expires_at <= now_secs() {
            return Err(EnrollRefusal::Expired);
        }
        if uses_left <= 0 {
            return Err(EnrollRefusal::UsedUp);
        }
        tx.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE hash = ?1", params![token_hash(token)])
            .map_err(|e| other(e.into()))?;
        // A token bound to an instance enrolls that instance's agent, named after it.
        let base = sanitize_name(instance.as_deref().unwrap_or(name));
        let mut id = base.clone();
        let mut n = 1;
        while tx
            .query_row("SELECT 1 FROM agents WHERE agent_id = ?1", params![id], |_| Ok(()))
            .optional()
            .map_err(|e| other(e.into()))?
            .is_some()
        {
            n += 1;
            id = format!("{base}-{n}");
        }
        let cert_pem = sign(&id).map_err(other)?;
        let fp = fingerprint_of(&cert_pem).map_err(other)?;
        tx.execute(
            "INSERT INTO agents (agent_id, fingerprint, role, cert_pem, enrolled_at) VALUES (?1, ?2, 'agent', ?3, ?4)",
            params![id, fp, cert_pem, now_secs()],
        )
        .map_err(|e| other(e.into()))?;
        tx.commit().map_err(|e| other(e.into()))?;
        Ok((id, cert_pem))
    }

    /// Records a certificate issued outside enrollment (the admin identity).
    pub fn record_cert(&self, id: &str, fingerprint: &str, role: Role, cert_pem: &str) -> Result<()> {
        self.db().execute(
            "INSERT INTO agents (agent_id, fingerprint, role, cert_pem, enrolled_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(agent_id) DO UPDATE SET fingerprint = excluded.fingerprint, cert_pem = excluded.cert_pem,
             role = excluded.role, revoked_at = NULL",
            params![id, fingerprint, role.as_str(), cert_pem, now_secs()],
        )?;
        Ok(())
    }

    pub fn lookup_cert(&self, fingerprint: &str) -> Result<Option<CertRecord>> {
        Ok(self
            .db()
            .query_row(
                "SELECT agent_id, role, revoked_at IS NOT NULL FROM agents WHERE fingerprint = ?1",
                params![fingerprint],
                |r| {
                    let role: String = r.get(1)?;
                    Ok(CertRecord {
                        agent_id: r.get(0)?,
                        role: if role == "admin" { Role::Admin } else { Role::Agent },
                        revoked: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// Revokes an agent's certificate. Returns false when no such agent exists.
    pub fn revoke(&self, agent_id: &str) -> Result<bool> {
        let n = self.db().execute(
            "UPDATE agents SET revoked_at = ?2 WHERE agent_id = ?1 AND role = 'agent' AND revoked_at IS NULL",
            params![agent_id, now_secs()],
        )?;
        Ok(n > 0)
    }

    pub fn revoked_ids(&self) -> Result<Vec<String>> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT agent_id FROM agents WHERE revoked_at IS NOT NULL")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn record_seen(&self, agent_id: &str, addr: &str, host_json: &str) -> Result<()> {
        self.db().execute(
            "UPDATE agents SET last_addr = ?2, last_seen = ?3, host_json = ?4 WHERE agent_id = ?1",
            params![agent_id, addr, now_secs(), host_json],
        )?;
        Ok(())
    }

    pub fn enrolled(&self) -> Result<Vec<EnrolledAgent>> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT agent_id, enrolled_at, revoked_at IS NOT NULL, last_addr, last_seen FROM agents
             WHERE role = 'agent' ORDER BY agent_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(EnrolledAgent {
                agent_id: r.get(0)?,
                enrolled_at: r.get(1)?,
                revoked: r.get(2)?,
                last_addr: r.get(3)?,
                last_seen: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Runs, steps, attempts and transfers.
impl State {
    pub fn create_run(&self, r: &RunRecord) -> Result<()> {
        self.db().prepare_cached(
            "INSERT INTO runs (run_id, pipeline, pipeline_file, pipeline_json, options_json, state, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?.execute(params![r.run_id, r.pipeline, r.pipeline_file, r.pipeline_json, r.options_json, r.state, r.created_ms])?;
        Ok(())
    }

    /// Removes a run that never started, with its planned steps and any attempts.
    pub fn forget_run(&self, run_id: &str) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for table in ["attempts", "steps", "runs"] {
            tx.execute(&format!("DELETE FROM {table} WHERE run_id = ?1"), params![run_id])?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn set_run_state(&self, run_id: &str, state: &str, error: Option<&str>) -> Result<()> {
        let finished = matches!(state, "succeeded" | "failed" | "interrupted").then(now_ms);
        self.db()
            .prepare_cached("UPDATE runs SET state = ?2, error = ?3, finished_ms = ?4 WHERE run_id = ?1")?
            .execute(params![run_id, state, error, finished])?;
        Ok(())
    }

    fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
        Ok(RunRecord {
            run_id: r.get(0)?,
            pipeline: r.get(1)?,
            pipeline_file: r.get(2)?,
            pipeline_json: r.get(3)?,
            options_json: r.get(4)?,
            state: r.get(5)?,
            created_ms: r.get(6)?,
            finished_ms: r.get(7)?,
            error: r.get(8)?,
        })
    }

    const RUN_COLUMNS: &str =
        "run_id, pipeline, pipeline_file, pipeline_json, options_json, state, created_ms, finished_ms, error";

    pub fn run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        let sql = format!("SELECT {} FROM runs WHERE run_id = ?1", Self::RUN_COLUMNS);
        Ok(self.db().query_row(&sql, params![run_id], Self::run_row).optional()?)
    }

    /// Runs, newest first.
    pub fn runs(&self, limit: usize) -> Result<Vec<RunRecord>> {
        let db = self.db();
        let sql =
            format!("SELECT {} FROM runs ORDER BY created_ms DESC, run_id DESC LIMIT ?1", Self::RUN_COLUMNS);
        let mut stmt = db.prepare(&sql)?;
        let rows = stmt.query_map(params![limit as i64], Self::run_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records what the plan decided for each step (replacing what a previous start decided).
    pub fn plan_steps(&self, run_id: &str, steps: &[(usize, &str, &str, &str)]) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO steps (run_id, step, idx, state, why) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(run_id, step) DO UPDATE SET idx = excluded.idx, state = excluded.state, why = excluded.why",
            )?;
            for (idx, step, state, why) in steps {
                stmt.execute(params![run_id, step, *idx as i64, state, why])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn set_step_state(&self, run_id: &str, step: &str, state: &str, why: &str) -> Result<()> {
        self.apply(&[Write::step_state(run_id, step, state, why)])
    }

    /// Records a dispatched attempt and points its step at it, in one transaction.
    pub fn attempt_dispatched(
        &self,
        run_id: &str,
        step: &str,
        attempt_id: u64,
        number: u32,
        agent: &str,
    ) -> Result<()> {
        self.apply(&[Write::attempt_dispatched(run_id, step, attempt_id, number, agent)])
    }

    /// Applies `writes` in order, in one transaction: all of them or none.
    pub fn apply(&self, writes: &[Write]) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut db = self.db();
        let tx = db.transaction()?;
        for w in writes {
            w.execute(&tx)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The agent an attempt was dispatched to, and whether it is still open (dispatched or
    /// started); `None` for an attempt no run recorded.
    pub fn attempt_holder(&self, attempt_id: u64) -> Result<Option<(String, bool)>> {
        Ok(self
            .db()
            .prepare_cached("SELECT agent, state FROM attempts WHERE attempt_id = ?1")?
            .query_row(params![attempt_id as i64], |r| {
                let state: String = r.get(1)?;
                Ok((r.get::<_, String>(0)?, matches!(state.as_str(), "dispatched" | "started")))
            })
            .optional()?)
    }

    pub fn attempt_started(&self, attempt_id: u64) -> Result<()> {
        self.apply(&[Write::attempt_started(attempt_id)])
    }

    /// Ends an attempt: `state` is succeeded, failed, lost or superseded.
    pub fn attempt_ended(
        &self,
        attempt_id: u64,
        state: &str,
        exit: Option<&str>,
        error: Option<&str>,
        elapsed_ms: Option<u64>,
    ) -> Result<()> {
        self.apply(&[Write::attempt_ended(attempt_id, state, exit, error, elapsed_ms)])
    }

    /// Steps of `run_id` with an attempt that ended `succeeded`.
    pub fn succeeded_attempt_steps(&self, run_id: &str) -> Result<Vec<String>> {
        let db = self.db();
        let mut stmt =
            db.prepare("SELECT DISTINCT step FROM attempts WHERE run_id = ?1 AND state = 'succeeded'")?;
        let rows = stmt.query_map(params![run_id], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
    }

    /// What attempt `attempt_id` used, as its agent measured it, and the memory its step
    /// requested (0: none).
    pub fn attempt_usage(
        &self,
        attempt_id: u64,
        usage: &protocol::ResourceUsage,
        requested_memory: u64,
    ) -> Result<()> {
        self.apply(&[Write::attempt_usage(attempt_id, usage, requested_memory)?])
    }

    /// Attempts of a run still marked as in flight (after a coordinator crash).
    pub fn open_attempts(&self, run_id: &str) -> Result<Vec<AttemptRecord>> {
        self.attempts_where("run_id = ?1 AND state IN ('dispatched', 'started')", run_id)
    }

    pub fn attempts_of(&self, run_id: &str) -> Result<Vec<AttemptRecord>> {
        self.attempts_where("run_id = ?1", run_id)
    }

    fn attempts_where(&self, cond: &str, run_id: &str) -> Result<Vec<AttemptRecord>> {
        let db = self.db();
        let sql = format!(
            "SELECT attempt_id, step, number, agent, state, dispatched_ms, finished_ms FROM attempts WHERE {cond}
             ORDER BY dispatched_ms, attempt_id"
        );
        let mut stmt = db.prepare(&sql)?;
        let rows = stmt.query_map(params![run_id], |r| {
            Ok(AttemptRecord {
                attempt_id: r.get::<_, i64>(0)? as u64,
                step: r.get(1)?,
                number: r.get(2)?,
                agent: r.get(3)?,
                state: r.get(4)?,
                dispatched_ms: r.get(5)?,
                finished_ms: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether `run_id` has a step named `step` (one indexed row, not the run's steps).
    pub fn has_step(&self, run_id: &str, step: &str) -> Result<bool> {
        let db = self.db();
        let mut stmt = db.prepare_cached("SELECT 1 FROM steps WHERE run_id = ?1 AND step = ?2")?;
        Ok(stmt.exists(params![run_id, step])?)
    }

    pub fn steps_of(&self, run_id: &str) -> Result<Vec<StepRecord>> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT s.step, s.idx, s.state, s.why, s.attempts, s.attempt_id, s.agent, s.started_ms, s.finished_ms,
               (SELECT COALESCE(SUM(t.bytes), 0) FROM transfers t WHERE t.agent = s.agent
                  AND t.at_ms >= s.started_ms AND t.at_ms <= COALESCE(s.finished_ms, 1 << 62)),
               a.usage_json, a.requested_memory
             FROM steps s LEFT JOIN attempts a ON a.attempt_id = s.attempt_id
             WHERE s.run_id = ?1 ORDER BY s.idx",
        )?;
        let rows = stmt.query_map(params![run_id], |r| {
            Ok(StepRecord {
                step: r.get(0)?,
                idx: r.get::<_, i64>(1)? as usize,
                state: r.get(2)?,
                why: r.get(3)?,
                attempts: r.get(4)?,
                attempt_id: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
                agent: r.get(6)?,
                started_ms: r.get(7)?,
                finished_ms: r.get(8)?,
                bytes: r.get::<_, i64>(9)? as u64,
                // A row this version cannot read shows as unmeasured, not as an error.
                usage: r.get::<_, Option<String>>(10)?.and_then(|j| serde_json::from_str(&j).ok()),
                requested_memory: r.get::<_, Option<i64>>(11)?.map_or(0, |v| v.max(0) as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The last `limit` transfers, newest first.
    pub fn recent_transfers(&self, limit: u32) -> Result<Vec<TransferRow>> {
        let db = self.db();
        let mut stmt = db.prepare_cached(
            "SELECT at_ms, agent, direction, bytes, elapsed_ms FROM transfers ORDER BY at_ms DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit], |r| {
            Ok(TransferRow {
                at_ms: r.get(0)?,
                agent: r.get(1)?,
                direction: r.get(2)?,
                bytes: r.get::<_, i64>(3)?.max(0) as u64,
                elapsed_ms: r.get::<_, i64>(4)?.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Snapshot bytes moved since `since_ms`.
    pub fn transfer_bytes_since(&self, since_ms: u64) -> Result<u64> {
        let n: i64 = self
            .db()
            .prepare_cached("SELECT COALESCE(SUM(bytes), 0) FROM transfers WHERE at_ms >= ?1")?
            .query_row(params![since_ms as i64], |r| r.get(0))?;
        Ok(n as u64)
    }

    pub fn record_transfer(
        &self,
        agent: &str,
        direction: &str,
        snapshot_id: &str,
        bytes: u64,
        wire_bytes: u64,
        elapsed_ms: u64,
    ) -> Result<()> {
        self.db()
            .prepare_cached(
                "INSERT INTO transfers (at_ms, agent, direction, snapshot_id, bytes, wire_bytes, elapsed_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                now_ms(),
                agent,
                direction,
                snapshot_id,
                bytes as i64,
                wire_bytes as i64,
                elapsed_ms as i64
            ])?;
        Ok(())
    }
}

/// Agent ids are certificate common names and log fields: keep them short and plain.
/// An instance the coordinator provisioned (or meant to: `creating` is the intent written
/// before the provider's create call).
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceRecord {
    pub instance_id: String,
    pub provider: String,
    pub provider_id: Option<String>,
    /// creating, booting, joined, terminating, terminated
    pub state: String,
    pub run_id: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub note: String,
    /// What it costs per hour, when the provider config says.
    pub price_per_hour: Option<f64>,
    /// When its agent connected, and when it was terminated.
    pub joined_ms: Option<u64>,
    pub ended_ms: Option<u64>,
}

/// Instance states after which nothing runs.
pub const INSTANCE_ENDED: &str = "terminated";

impl State {
    /// Records the intent to create an instance, before the provider is called.
    pub fn instance_intent(&self, instance_id: &str, provider: &str, run_id: Option<&str>) -> Result<()> {
        let now = now_ms();
        self.db().execute(
            "INSERT INTO instances (instance_id, provider, state, run_id, created_ms, updated_ms) \
             VALUES (?1, ?2, 'creating', ?3, ?4, ?4)",
            params![instance_id, provider, run_id, now],
        )?;
        Ok(())
    }

    /// Moves an instance to `state`; `provider_id` and `note` are kept unless given.
    pub fn instance_update(
        &self,
        instance_id: &str,
        state: &str,
        provider_id: Option<&str>,
        note: Option<&str>,
    ) -> Result<()> {
        // The life a cost is computed from: joined (its agent connected) and ended, each the
        // first time.
        self.db().execute(
            "UPDATE instances SET state = ?2, provider_id = COALESCE(?3, provider_id), \
             note = COALESCE(?4, note), updated_ms = ?5, \
             joined_ms = CASE WHEN ?2 = 'joined' THEN COALESCE(joined_ms, ?5) ELSE joined_ms END, \
             ended_ms = CASE WHEN ?2 = 'terminated' THEN COALESCE(ended_ms, ?5) ELSE ended_ms END \
             WHERE instance_id = ?1",
            params![instance_id, state, provider_id, note, now_ms()],
        )?;
        Ok(())
    }

    /// What instance `instance_id` costs per hour.
    pub fn instance_price(&self, instance_id: &str, per_hour: f64) -> Result<()> {
        self.db().execute(
            "UPDATE instances SET price_per_hour = ?2 WHERE instance_id = ?1",
            params![instance_id, per_hour],
        )?;
        Ok(())
    }

    /// The attempts that ran on any of `agents`.
    pub fn attempts_on(&self, agents: &[&str]) -> Result<Vec<AttemptSpan>> {
        let db = self.db();
        let mut stmt = db.prepare_cached(
            "SELECT step, agent, dispatched_ms, finished_ms FROM attempts WHERE agent = ?1 ORDER BY dispatched_ms",
        )?;
        let mut out = Vec::new();
        for a in agents {
            let rows = stmt.query_map(params![a], |r| {
                Ok(AttemptSpan {
                    step: r.get(0)?,
                    agent: r.get(1)?,
                    dispatched_ms: r.get(2)?,
                    finished_ms: r.get(3)?,
                })
            })?;
            for row in rows {
                out.push(row?);
            }
        }
        Ok(out)
    }

    /// Instances, newest first; `live_only` leaves out terminated ones.
    pub fn instances(&self, live_only: bool) -> Result<Vec<InstanceRecord>> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT instance_id, provider, provider_id, state, run_id, created_ms, updated_ms, note, \
                    price_per_hour, joined_ms, ended_ms \
             FROM instances WHERE (?1 = 0 OR state != 'terminated') ORDER BY created_ms DESC, instance_id",
        )?;
        let rows = stmt.query_map(params![live_only as i64], |r| {
            Ok(InstanceRecord {
                instance_id: r.get(0)?,
                provider: r.get(1)?,
                provider_id: r.get(2)?,
                state: r.get(3)?,
                run_id: r.get(4)?,
                created_ms: r.get(5)?,
                updated_ms: r.get(6)?,
                note: r.get(7)?,
                price_per_hour: r.get(8)?,
                joined_ms: r.get(9)?,
                ended_ms: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

pub fn sanitize_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '-' })
        .take(48)
        .collect();
    let s = s.trim_matches('-').to_string();
    if s.is_empty() || s == "admin" { "agent".to_string() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enroll(state: &State, token: &str, name: &str) -> Result<String, EnrollRefusal> {
        state
            .enroll(token, name, |id| Ok(format!("cert-{id}")), |pem| Ok(format!("fp-{pem}")))
            .map(|(id, _)| id)
    }

    #[test]
    fn tokens_count_uses_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let t = state.create_token(Duration::from_secs(3600), 2, None).unwrap();
        assert_eq!(enroll(&state, &t, "node").unwrap(), "node");
        assert_eq!(enroll(&state, &t, "node").unwrap(), "node-2");
        assert!(matches!(enroll(&state, &t, "node"), Err(EnrollRefusal::UsedUp)));
        let expired = state.create_token(Duration::from_secs(0), 5, None).unwrap();
        assert!(matches!(enroll(&state, &expired, "x"), Err(EnrollRefusal::Expired)));
        assert!(matches!(enroll(&state, "pype1.nope", "x"), Err(EnrollRefusal::UnknownToken)));
        // Only the hash is stored.
        let db = state.db();
        let found: i64 =
            db.query_row("SELECT count(*) FROM tokens WHERE hash = ?1", params![t], |r| r.get(0)).unwrap();
        assert_eq!(found, 0);
    }

    #[test]
    fn a_batch_of_writes_is_applied_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let run = RunRecord {
            run_id: "r".into(),
            pipeline: "p".into(),
            pipeline_file: String::new(),
            pipeline_json: "{}".into(),
            options_json: "{}".into(),
            state: "running".into(),
            created_ms: now_ms(),
            finished_ms: None,
            error: None,
        };
        state.create_run(&run).unwrap();
        state.plan_steps("r", &[(0, "a", "run", ""), (1, "b", "run", "")]).unwrap();
        assert!(state.has_step("r", "b").unwrap());
        assert!(!state.has_step("r", "c").unwrap() && !state.has_step("q", "a").unwrap());
        state
            .apply(&[
                Write::attempt_dispatched("r", "a", 1, 1, "agent-1"),
                Write::attempt_started(1),
                Write::attempt_dispatched("r", "b", 2, 1, "agent-2"),
                Write::attempt_ended(1, "succeeded", Some("exit 0"), None, Some(5)),
                Write::step_state("r", "a", "succeeded", ""),
            ])
            .unwrap();
        let states = |state: &State| {
            let mut a: Vec<(u64, String)> =
                state.attempts_of("r").unwrap().into_iter().map(|a| (a.attempt_id, a.state)).collect();
            a.sort();
            a
        };
        assert_eq!(states(&state), vec![(1, "succeeded".to_string()), (2, "dispatched".to_string())]);
        let steps = state.steps_of("r").unwrap();
        assert_eq!(steps.iter().find(|s| s.step == "a").unwrap().state, "succeeded");
        assert_eq!(steps.iter().find(|s| s.step == "b").unwrap().state, "running");
        // The second write fails (attempt 2 exists): the first, before it, is not kept either.
        let failed = state.apply(&[
            Write::attempt_ended(2, "failed", Some("exit 1"), Some("boom"), Some(5)),
            Write::attempt_dispatched("r", "b", 2, 2, "agent-2"),
        ]);
        assert!(failed.is_err());
        assert_eq!(states(&state), vec![(1, "succeeded".to_string()), (2, "dispatched".to_string())]);
        state.apply(&[]).unwrap();
    }

    #[test]
    fn revoke_marks_cert() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let t = state.create_token(Duration::from_secs(60), 1, None).unwrap();
        let id = enroll(&state, &t, "a b/c").unwrap();
        assert_eq!(id, "a-b-c");
        assert!(!state.lookup_cert("fp-cert-a-b-c").unwrap().unwrap().revoked);
        assert!(state.revoke(&id).unwrap());
        assert!(state.lookup_cert("fp-cert-a-b-c").unwrap().unwrap().revoked);
        assert!(!state.revoke("missing").unwrap());
    }
}
