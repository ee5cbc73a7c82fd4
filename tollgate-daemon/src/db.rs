//! SQLite for every store: one way to open a database file with its pragmas, and one
//! connection behind a mutex. The stores keep their schemas and queries; this module owns how
//! a connection is made and shared.
//!
//! ```text
//! store.rs / wallet/store.rs / upstream/db.rs
//!   open ─> db::open(path, Pragmas) ─> WAL + synchronous + (foreign keys) + (busy timeout)
//!        ─> schema (the store's own) ─> db::Conn::new(connection)
//!   every statement ─> conn.lock() ─> one short local transaction, never across an await
//! ```
//!
//! | store             | file              | synchronous                      | busy timeout | foreign keys |
//! |-------------------|-------------------|----------------------------------|--------------|--------------|
//! | `store.rs`        | `tollgate.sqlite` | NORMAL (FULL for durable writes) | 5 s          | on           |
//! | `wallet/store.rs` | `ledger.sqlite`   | FULL                             | 5 s          | off          |
//! | `upstream/db.rs`  | `upstream.sqlite` | FULL                             | none         | off          |

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::Connection;

/// SQLite's `synchronous` pragma, as the stores use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Synchronous {
    /// Commits survive a killed process; the last few may roll back on a power loss.
    Normal,
    /// Every commit is on disk when it returns.
    Full,
}

impl Synchronous {
    /// The pragma's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

/// How a store wants its connection set up (always WAL).
#[derive(Clone, Copy, Debug)]
pub struct Pragmas {
    pub synchronous: Synchronous,
    pub foreign_keys: bool,
    /// Wait this long for another connection's lock instead of failing at once.
    pub busy_timeout: Option<Duration>,
}

/// Opens (creating) `path` with `pragmas`.
pub fn open(path: &Path, pragmas: Pragmas) -> rusqlite::Result<Connection> {
    configure(Connection::open(path)?, pragmas)
}

/// A private in-memory database with `pragmas` (tests).
pub fn open_in_memory(pragmas: Pragmas) -> rusqlite::Result<Connection> {
    configure(Connection::open_in_memory()?, pragmas)
}

fn configure(conn: Connection, pragmas: Pragmas) -> rusqlite::Result<Connection> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", pragmas.synchronous.as_str())?;
    if pragmas.foreign_keys {
        conn.pragma_update(None, "foreign_keys", "ON")?;
    }
    if let Some(timeout) = pragmas.busy_timeout {
        conn.busy_timeout(timeout)?;
    }
    Ok(conn)
}

/// A store's one connection. rusqlite is synchronous and every statement is a short local
/// transaction, so a std mutex held across one statement is cheaper than a blocking-pool hop.
pub struct Conn(Mutex<Connection>);

impl Conn {
    pub fn new(conn: Connection) -> Conn {
        Conn(Mutex::new(conn))
    }

    /// The connection. A panic while it was held leaves SQLite itself consistent (the
    /// transaction rolls back), so a poisoned mutex is safe to reuse.
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_applies_the_pragmas() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pragmas = Pragmas {
            synchronous: Synchronous::Normal,
            foreign_keys: true,
            busy_timeout: Some(Duration::from_secs(5)),
        };
        let conn = Conn::new(open(&dir.path().join("t.sqlite"), pragmas).expect("open"));
        let c = conn.lock();
        let get = |p: &str| -> String {
            c.query_row(&format!("PRAGMA {p}"), [], |r| {
                r.get::<_, rusqlite::types::Value>(0)
            })
            .map(|v| format!("{v:?}"))
            .expect("pragma")
        };
        assert_eq!(get("journal_mode"), "Text(\"wal\")");
        assert_eq!(get("synchronous"), "Integer(1)"); // NORMAL
        assert_eq!(get("foreign_keys"), "Integer(1)");
        assert_eq!(get("busy_timeout"), "Integer(5000)");
    }
}
