//! Job and key metadata in SQLite (WAL). One connection behind a mutex: every statement is
//! short, and the ciphertexts themselves live in files.

use super::util::{now_ms, rfc3339};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::json;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

pub struct Db {
    conn: Mutex<Connection>,
}

#[derive(Debug, Clone)]
pub struct JobRow {
    pub job_id: String,
    pub token_hash: Vec<u8>,
    pub model: String,
    pub fingerprint: String,
    pub key_id: String,
    pub batch: i64,
    pub inputs_total: i64,
    pub state: String,
    pub progress: f64,
    pub stage: Option<String>,
    pub eta_s: Option<f64>,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

pub const UPLOADING: &str = "uploading";
pub const QUEUED: &str = "queued";
pub const RUNNING: &str = "running";
pub const DONE: &str = "done";
pub const FAILED: &str = "failed";
pub const CANCELLED: &str = "cancelled";

const JOB_COLUMNS: &str = "job_id, token_hash, model, fingerprint, key_id, batch, inputs_total, \
     state, progress, stage, eta_s, error, created_at, updated_at";

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        job_id: r.get(0)?,
        token_hash: r.get(1)?,
        model: r.get(2)?,
        fingerprint: r.get(3)?,
        key_id: r.get(4)?,
        batch: r.get(5)?,
        inputs_total: r.get(6)?,
        state: r.get(7)?,
        progress: r.get(8)?,
        stage: r.get(9)?,
        eta_s: r.get(10)?,
        error: r.get(11)?,
        created_at: r.get(12)?,
        updated_at: r.get(13)?,
    })
}

impl Db {
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS keys (
                 key_id TEXT PRIMARY KEY,
                 fingerprint TEXT NOT NULL,
                 bytes INTEGER NOT NULL,
                 created_at INTEGER NOT NULL,
                 last_used INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS jobs (
                 job_id TEXT PRIMARY KEY,
                 token_hash BLOB NOT NULL,
                 model TEXT NOT NULL,
                 fingerprint TEXT NOT NULL,
                 key_id TEXT NOT NULL,
                 batch INTEGER NOT NULL,
                 inputs_total INTEGER NOT NULL,
                 state TEXT NOT NULL,
                 progress REAL NOT NULL DEFAULT 0,
                 stage TEXT,
                 eta_s REAL,
                 error TEXT,
                 created_at INTEGER NOT NULL,
                 updated_at INTEGER NOT NULL,
                 queued_at INTEGER);
             CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, queued_at);
             CREATE TABLE IF NOT EXISTS inputs (
                 job_id TEXT NOT NULL,
                 k INTEGER NOT NULL,
                 sha256 TEXT NOT NULL,
                 PRIMARY KEY (job_id, k));",
        )?;
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    /// The connection; a poisoned lock (a panic elsewhere) still hands it out: SQLite keeps
    /// its own consistency.
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn upsert_key(
        &self,
        key_id: &str,
        fingerprint: &str,
        bytes: u64,
    ) -> rusqlite::Result<bool> {
        let now = now_ms();
        let c = self.lock();
        let n = c.execute(
            "INSERT OR IGNORE INTO keys (key_id, fingerprint, bytes, created_at, last_used)
             VALUES (?1, ?2, ?3, ?4, ?4)",
            params![key_id, fingerprint, bytes as i64, now],
        )?;
        if n == 0 {
            c.execute(
                "UPDATE keys SET last_used = ?2 WHERE key_id = ?1",
                params![key_id, now],
            )?;
        }
        Ok(n == 1)
    }

    /// The fingerprint of a known key.
    pub fn key_fingerprint(&self, key_id: &str) -> rusqlite::Result<Option<String>> {
        self.lock()
            .query_row(
                "SELECT fingerprint FROM keys WHERE key_id = ?1",
                [key_id],
                |r| r.get(0),
            )
            .optional()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn create_job(
        &self,
        job_id: &str,
        token_hash: &[u8],
        model: &str,
        fingerprint: &str,
        key_id: &str,
        batch: i64,
        inputs_total: i64,
    ) -> rusqlite::Result<()> {
        let now = now_ms();
        let c = self.lock();
        c.execute(
            "INSERT INTO jobs (job_id, token_hash, model, fingerprint, key_id, batch, inputs_total,
                               state, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'uploading', ?8, ?8)",
            params![
                job_id,
                token_hash,
                model,
                fingerprint,
                key_id,
                batch,
                inputs_total,
                now
            ],
        )?;
        c.execute(
            "UPDATE keys SET last_used = ?2 WHERE key_id = ?1",
            params![key_id, now],
        )?;
        Ok(())
    }

    pub fn job(&self, job_id: &str) -> rusqlite::Result<Option<JobRow>> {
        Self::job_in(&self.lock(), job_id)
    }

    pub fn job_in(c: &Connection, job_id: &str) -> rusqlite::Result<Option<JobRow>> {
        c.query_row(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?1"),
            [job_id],
            job_from_row,
        )
        .optional()
    }

    pub fn inputs_present(c: &Connection, job_id: &str) -> rusqlite::Result<i64> {
        c.query_row(
            "SELECT COUNT(*) FROM inputs WHERE job_id = ?1",
            [job_id],
            |r| r.get(0),
        )
    }

    /// The indices in `0..total` with no stored input, at most `limit` of them.
    pub fn missing_inputs(
        &self,
        job_id: &str,
        total: i64,
        limit: usize,
    ) -> rusqlite::Result<Vec<i64>> {
        let c = self.lock();
        let mut st = c.prepare("SELECT k FROM inputs WHERE job_id = ?1 ORDER BY k")?;
        let present: Vec<i64> = st
            .query_map([job_id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut missing = Vec::new();
        let mut it = present.iter().peekable();
        for k in 0..total {
            while it.peek().is_some_and(|&&p| p < k) {
                it.next();
            }
            if it.peek() == Some(&&k) {
                continue;
            }
            missing.push(k);
            if missing.len() >= limit {
                break;
            }
        }
        Ok(missing)
    }

    /// Records an uploaded input. The commit is not synchronous (no fsync: it survives a
    /// crash of the process, not a power loss); the synchronous commit of `start` makes it
    /// durable with everything before it in the log.
    pub fn record_input(c: &Connection, job_id: &str, k: i64, sha: &str) -> rusqlite::Result<()> {
        c.pragma_update(None, "synchronous", "NORMAL")?;
        let r = (|| {
            c.execute_batch("BEGIN")?;
            let r = c
                .execute(
                    "INSERT OR REPLACE INTO inputs (job_id, k, sha256) VALUES (?1, ?2, ?3)",
                    params![job_id, k, sha],
                )
                .and_then(|_| {
                    c.execute(
                        "UPDATE jobs SET updated_at = ?2 WHERE job_id = ?1",
                        params![job_id, now_ms()],
                    )
                });
            match r {
                Ok(_) => c.execute_batch("COMMIT"),
                Err(e) => {
                    let _ = c.execute_batch("ROLLBACK");
                    Err(e)
                }
            }
        })();
        c.pragma_update(None, "synchronous", "FULL")?;
        r
    }

    /// Forgets an input whose file did not survive (see `start`).
    pub fn forget_input(c: &Connection, job_id: &str, k: i64) -> rusqlite::Result<()> {
        c.execute(
            "DELETE FROM inputs WHERE job_id = ?1 AND k = ?2",
            params![job_id, k],
        )?;
        Ok(())
    }

    pub fn set_state(c: &Connection, job_id: &str, from: &str, to: &str) -> rusqlite::Result<bool> {
        let now = now_ms();
        let n = c.execute(
            "UPDATE jobs SET state = ?3, updated_at = ?4,
                 queued_at = CASE WHEN ?3 = 'queued' THEN ?4 ELSE queued_at END
             WHERE job_id = ?1 AND state = ?2",
            params![job_id, from, to, now],
        )?;
        Ok(n == 1)
    }

    pub fn set_progress(&self, job_id: &str, progress: f64, stage: &str, eta_s: Option<f64>) {
        let _ = self.lock().execute(
            "UPDATE jobs SET progress = ?2, stage = ?3, eta_s = ?4, updated_at = ?5
             WHERE job_id = ?1 AND state = 'running'",
            params![job_id, progress, stage, eta_s, now_ms()],
        );
    }

    /// Ends a running job; false when it is no longer running (deleted meanwhile).
    pub fn finish(&self, job_id: &str, state: &str, error: Option<&str>) -> rusqlite::Result<bool> {
        let progress_done = if state == DONE { Some(1.0) } else { None };
        let n = self.lock().execute(
            "UPDATE jobs SET state = ?2, error = ?3, updated_at = ?4, eta_s = NULL,
                 progress = COALESCE(?5, progress)
             WHERE job_id = ?1 AND state = 'running'",
            params![job_id, state, error, now_ms(), progress_done],
        )?;
        Ok(n == 1)
    }

    pub fn delete_job(&self, job_id: &str) -> rusqlite::Result<()> {
        let c = self.lock();
        c.execute("DELETE FROM inputs WHERE job_id = ?1", [job_id])?;
        c.execute("DELETE FROM jobs WHERE job_id = ?1", [job_id])?;
        Ok(())
    }

    pub fn delete_inputs(&self, job_id: &str) -> rusqlite::Result<()> {
        self.lock()
            .execute("DELETE FROM inputs WHERE job_id = ?1", [job_id])?;
        Ok(())
    }

    /// Jobs that were running when the server stopped go back to the queue.
    pub fn requeue_running(&self) -> rusqlite::Result<usize> {
        self.lock().execute(
            "UPDATE jobs SET state = 'queued', progress = 0, stage = NULL, eta_s = NULL
             WHERE state = 'running'",
            [],
        )
    }

    /// Queued jobs, oldest first: (job_id, model).
    pub fn queued(&self) -> rusqlite::Result<Vec<(String, String)>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT job_id, model FROM jobs WHERE state = 'queued' ORDER BY queued_at, created_at",
        )?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Jobs created before `cutoff` that are not running.
    pub fn expired_jobs(&self, cutoff: i64) -> rusqlite::Result<Vec<String>> {
        let c = self.lock();
        let mut st =
            c.prepare("SELECT job_id FROM jobs WHERE created_at < ?1 AND state != 'running'")?;
        let rows = st
            .query_map([cutoff], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Keys unused since `cutoff` that no job refers to; removed from the table.
    pub fn take_expired_keys(&self, cutoff: i64) -> rusqlite::Result<Vec<String>> {
        let c = self.lock();
        let mut st = c.prepare(
            "SELECT key_id FROM keys WHERE last_used < ?1
                 AND key_id NOT IN (SELECT key_id FROM jobs)",
        )?;
        let rows: Vec<String> = st
            .query_map([cutoff], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for k in &rows {
            c.execute("DELETE FROM keys WHERE key_id = ?1", [k])?;
        }
        Ok(rows)
    }
}

impl JobRow {
    pub fn status_json(&self, inputs_present: i64) -> serde_json::Value {
        json!({
            "job_id": self.job_id,
            "model": self.model,
            "batch": self.batch,
            "state": self.state,
            "inputs_present": inputs_present,
            "inputs_total": self.inputs_total,
            "progress": self.progress,
            "stage": self.stage,
            "eta_s": self.eta_s,
            "error": self.error,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        })
    }
}
