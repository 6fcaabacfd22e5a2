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
";

impl State {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating state dir {}", dir.display()))?;
        let path = dir.join("state.db");
        let db = rusqlite::Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        db.busy_timeout(Duration::from_secs(10))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch(SCHEMA).context("creating state schema")?;
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
        let row: Option<(u64, i64)> = tx
            .query_row(
                "SELECT expires_at, uses_left FROM tokens WHERE hash = ?1",
                params![token_hash(token)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| other(e.into()))?;
        let Some((expires_at, uses_left)) = row else { return Err(EnrollRefusal::UnknownToken) };
        if expires_at <= now_secs() {
            return Err(EnrollRefusal::Expired);
        }
        if uses_left <= 0 {
            return Err(EnrollRefusal::UsedUp);
        }
        tx.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE hash = ?1", params![token_hash(token)])
            .map_err(|e| other(e.into()))?;
        let base = sanitize_name(name);
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

/// Agent ids are certificate common names and log fields: keep them short and plain.
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
