//! `state_dir/upstream.sqlite`: every payment we make upstream and the last known session of
//! each upstream gateway, so a restart resumes instead of paying again and a payment
//! interrupted by a crash is settled (reclaimed, or known to be taken).
//!
//! Payment states:
//!
//! | state     | meaning                                              | leaves by                 |
//! |-----------|------------------------------------------------------|---------------------------|
//! | pending   | token created, answer not (yet) seen                 | accepted/reclaimed/taken  |
//! | accepted  | the upstream answered with its signed kind-1022      | —                         |
//! | reclaimed | rejected (or unanswered) and swapped back to us      | —                         |
//! | taken     | rejected, but the upstream had already swapped it    | —                         |

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::db::{self, Pragmas, Synchronous};

use super::UpstreamError;

fn storage(e: rusqlite::Error) -> UpstreamError {
    UpstreamError::Storage { source: e }
}

/// The wall clock in ms, as the rows store it.
fn now_ms() -> i64 {
    crate::sys::clock::unix_ms() as i64
}

/// One payment row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PaymentRow {
    pub op_id: String,
    pub pubkey: String,
    pub gateway: String,
    pub mint: String,
    pub amount: u64,
    pub steps: u64,
    pub state: String,
    pub detail: String,
}

/// The last session we saw at one upstream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SessionRow {
    pub pubkey: String,
    pub gateway: String,
    pub metric: String,
    pub used: u64,
    pub allotment: u64,
    pub updated_ms: i64,
}

pub struct Db {
    conn: db::Conn,
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, UpstreamError> {
        let pragmas = Pragmas {
            synchronous: Synchronous::Full,
            foreign_keys: false,
            busy_timeout: None,
        };
        let conn = db::open(path, pragmas).map_err(storage)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS payments (
                op_id TEXT PRIMARY KEY, pubkey TEXT NOT NULL, gateway TEXT NOT NULL,
                mint TEXT NOT NULL, amount INTEGER NOT NULL, steps INTEGER NOT NULL,
                state TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '',
                created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS sessions (
                pubkey TEXT PRIMARY KEY, gateway TEXT NOT NULL, metric TEXT NOT NULL,
                used INTEGER NOT NULL, allotment INTEGER NOT NULL, updated_ms INTEGER NOT NULL);",
        )
        .map_err(storage)?;
        Ok(Db {
            conn: db::Conn::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock()
    }

    /// Written before the token leaves the process.
    pub fn put_pending(&self, p: &PaymentRow) -> Result<(), UpstreamError> {
        let t = now_ms();
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO payments
                 (op_id, pubkey, gateway, mint, amount, steps, state, detail, created_ms, updated_ms)
                 VALUES (?1,?2,?3,?4,?5,?6,'pending',?7,?8,?8)",
                params![p.op_id, p.pubkey, p.gateway, p.mint, p.amount, p.steps, p.detail, t],
            )
            .map_err(storage)?;
        Ok(())
    }

    pub fn set_state(&self, op_id: &str, state: &str, detail: &str) -> Result<(), UpstreamError> {
        self.conn()
            .execute(
                "UPDATE payments SET state = ?2, detail = ?3, updated_ms = ?4 WHERE op_id = ?1",
                params![op_id, state, detail, now_ms()],
            )
            .map_err(storage)?;
        Ok(())
    }

    pub fn payments(&self, state: Option<&str>) -> Result<Vec<PaymentRow>, UpstreamError> {
        let c = self.conn();
        let mut st = c
            .prepare(
                "SELECT op_id, pubkey, gateway, mint, amount, steps, state, detail FROM payments
                 WHERE ?1 IS NULL OR state = ?1 ORDER BY created_ms",
            )
            .map_err(storage)?;
        let rows = st
            .query_map(params![state], |r| {
                Ok(PaymentRow {
                    op_id: r.get(0)?,
                    pubkey: r.get(1)?,
                    gateway: r.get(2)?,
                    mint: r.get(3)?,
                    amount: r.get(4)?,
                    steps: r.get(5)?,
                    state: r.get(6)?,
                    detail: r.get(7)?,
                })
            })
            .map_err(storage)?;
        rows.collect::<Result<_, _>>().map_err(storage)
    }

    /// Sum of amounts in `state`.
    pub fn total(&self, state: &str) -> Result<u64, UpstreamError> {
        self.conn()
            .query_row(
                "SELECT COALESCE(SUM(amount), 0) FROM payments WHERE state = ?1",
                params![state],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v as u64)
            .map_err(storage)
    }

    /// What left our wallet (or may have: `pending`) for payments created in the last
    /// `window`: the amount the hourly spending limit counts. Reclaimed payments cost nothing.
    pub fn spent_within(&self, window: std::time::Duration) -> Result<u64, UpstreamError> {
        let since = now_ms().saturating_sub(window.as_millis().min(i64::MAX as u128) as i64);
        self.conn()
            .query_row(
                "SELECT COALESCE(SUM(amount), 0) FROM payments
                 WHERE state IN ('pending', 'accepted', 'taken') AND created_ms >= ?1",
                params![since],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v as u64)
            .map_err(storage)
    }

    pub fn put_session(&self, s: &SessionRow) -> Result<(), UpstreamError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO sessions (pubkey, gateway, metric, used, allotment, updated_ms)
                 VALUES (?1,?2,?3,?4,?5,?6)",
                params![s.pubkey, s.gateway, s.metric, s.used, s.allotment, s.updated_ms],
            )
            .map_err(storage)?;
        Ok(())
    }

    pub fn session(&self, pubkey: &str) -> Result<Option<SessionRow>, UpstreamError> {
        self.conn()
            .query_row(
                "SELECT pubkey, gateway, metric, used, allotment, updated_ms FROM sessions WHERE pubkey = ?1",
                params![pubkey],
                |r| {
                    Ok(SessionRow {
                        pubkey: r.get(0)?,
                        gateway: r.get(1)?,
                        metric: r.get(2)?,
                        used: r.get(3)?,
                        allotment: r.get(4)?,
                        updated_ms: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(storage)
    }

    pub(crate) fn now_ms() -> i64 {
        now_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payments_and_sessions_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upstream.sqlite");
        let db = Db::open(&path).unwrap();
        let p = PaymentRow {
            op_id: "op1".into(),
            pubkey: "pk".into(),
            gateway: "10.0.0.1".into(),
            mint: "http://m".into(),
            amount: 20,
            steps: 10,
            state: "pending".into(),
            detail: String::new(),
        };
        db.put_pending(&p).unwrap();
        db.put_session(&SessionRow {
            pubkey: "pk".into(),
            gateway: "10.0.0.1".into(),
            metric: "bytes".into(),
            used: 5,
            allotment: 10,
            updated_ms: 1,
        })
        .unwrap();
        drop(db);
        let db = Db::open(&path).unwrap();
        assert_eq!(db.payments(Some("pending")).unwrap(), vec![p.clone()]);
        db.set_state("op1", "accepted", "").unwrap();
        assert!(db.payments(Some("pending")).unwrap().is_empty());
        assert_eq!(db.total("accepted").unwrap(), 20);
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(db.spent_within(hour).unwrap(), 20);
        db.put_pending(&PaymentRow {
            op_id: "op2".into(),
            amount: 7,
            ..p.clone()
        })
        .unwrap();
        db.set_state("op2", "reclaimed", "").unwrap();
        assert_eq!(
            db.spent_within(hour).unwrap(),
            20,
            "reclaimed costs nothing"
        );
        assert_eq!(db.session("pk").unwrap().unwrap().allotment, 10);
        assert!(db.session("other").unwrap().is_none());
    }
}
