//! Durable state of the merchant and the chandler: `tollgate.sqlite` in the state dir.
//!
//! ```text
//! grants:   token_id ─ redeeming ──receive ok──> redeemed ──chandler applied──> applied
//!                          │                         └──below min steps──> rejected-below-min
//!                          └──receive failed──> failed (a retry may run it again)
//! sessions: one row per MAC (active or closed), allotment cumulative, usage baseline/snapshot,
//!           deadline both as unix ms and as CLOCK_BOOTTIME ns (+ the boot id it belongs to)
//! session_log / usage_snapshots: history (grants, admin actions, exhaustion; usage at most
//!           once per hour per device — the latest usage lives in the session row)
//! retention: `prune` deletes closed sessions, log lines, usage history and finished grants
//!           (applied / rejected / failed) older than the retention (default 30 days); a grant
//!           still `redeeming`/`redeemed` is never pruned (it is money not yet applied), and the
//!           wallet's receipts live in its own database
//! ```
//! WAL. Durability is chosen per write, because every fsync is paid by a waiting customer:
//! - a grant is recorded with `synchronous=FULL` (on disk, with everything before it in the WAL)
//!   before the mint sees the token: that row (with the device's MAC) is the only place the
//!   grant can be rebuilt from after a power loss;
//! - everything after the redeem (redeemed, applied + the session, snapshots, closes) commits
//!   with `synchronous=NORMAL`: atomic and safe against a crashed or killed process (the WAL is
//!   in the page cache), and on a power loss the last few seconds roll back to a state start-up
//!   reconciliation repairs — a grant back at `redeeming` is finished again from the wallet's
//!   receipt (its ledger syncs fully), and the session is re-applied exactly once because the
//!   grant's `applied` mark and the session change are one transaction.
//!
//! The connection sits behind a std mutex; every call is a short local transaction, never held
//! across an await.

use std::{net::IpAddr, path::Path, sync::Arc, time::Duration};

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::{
    db::{self, Pragmas, Synchronous},
    protocol::Metric,
    valve::MacAddr,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {source}")]
    Sqlite {
        #[from]
        source: rusqlite::Error,
    },
    #[error("creating state dir {path}: {source}")]
    Dir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt row in {table}: {message}")]
    Corrupt {
        table: &'static str,
        message: String,
    },
}

/// Where a grant is in its life (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantStatus {
    Redeeming,
    Redeemed,
    Applied,
    RejectedBelowMin,
    Failed,
}

impl GrantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantStatus::Redeeming => "redeeming",
            GrantStatus::Redeemed => "redeemed",
            GrantStatus::Applied => "applied",
            GrantStatus::RejectedBelowMin => "rejected-below-min",
            GrantStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "redeeming" => GrantStatus::Redeeming,
            "redeemed" => GrantStatus::Redeemed,
            "applied" => GrantStatus::Applied,
            "rejected-below-min" => GrantStatus::RejectedBelowMin,
            "failed" => GrantStatus::Failed,
            _ => return None,
        })
    }
}

/// One payment, keyed by the token's id (unique: the same token never credits twice).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub token_id: String,
    pub token: String,
    pub mac: MacAddr,
    /// Hex pubkey of the customer, when the payment was a kind-21000 event.
    pub customer: Option<String>,
    pub mint: String,
    pub unit: String,
    pub gross: u64,
    pub net: u64,
    pub steps: u64,
    pub allotment: u64,
    pub metric: Metric,
    pub status: GrantStatus,
    /// The kind-1022 answer (applied) or kind-21023 notice (rejected) as JSON.
    pub answer: Option<String>,
    pub error: Option<String>,
    pub created_unix: u64,
    /// The tier the customer asked for (`None` = the default tier). Stored with the grant so
    /// a grant finished after a crash is priced as it was bought.
    pub tier: Option<String>,
}

/// A device's session (at most one row per MAC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRow {
    pub mac: MacAddr,
    pub metric: Metric,
    /// Cumulative allotment of this session, metric units.
    pub allotment: u64,
    /// Bytes used before the current kernel-counter epoch (counters reset on reboot).
    pub used_before: u64,
    /// Kernel cumulative byte counter at the start of the current epoch.
    pub baseline: u64,
    /// Last known usage (metric units), kept so a lost kernel state never gives usage back.
    pub used_snapshot: u64,
    /// Policy generation of the last open/extend (stale exhaustion events are ignored).
    pub generation: u32,
    pub end_unix_ms: Option<u64>,
    pub end_boot_ns: Option<u64>,
    /// `/proc/sys/kernel/random/boot_id` the boot-ns deadline belongs to.
    pub boot_id: String,
    pub started_unix: u64,
    pub active: bool,
    pub close_reason: Option<Action>,
    /// The tier bought (`None` = default).
    pub tier: Option<String>,
    /// The price factor that tier was bought at (1 = default): what a top-up is priced and
    /// converted against, whatever the config says of the tier later.
    pub price_factor: u64,
    /// Rates of this session (`None` = the default tier's, i.e. `shaping`, as configured now).
    pub rates: Option<SessionRates>,
}

/// A session's own rate limits and where they came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionRates {
    pub rates: crate::valve::Rates,
    pub source: RateSource,
}

/// Who set a session's rates: its tier (a reload follows the tier's new rates) or the
/// operator (`tollgate gate … --down-kbit`, kept until the session ends or a dearer tier is
/// bought). `Kernel`: a session active when the database gained the rate columns — its rates
/// are whatever its open gate has (maybe an operator's), adopted by the next reconciliation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateSource {
    Tier,
    Admin,
    Kernel,
}

impl RateSource {
    pub fn as_str(self) -> &'static str {
        match self {
            RateSource::Tier => "tier",
            RateSource::Admin => "admin",
            RateSource::Kernel => "kernel",
        }
    }
}

impl SessionRates {
    /// The rates this session asks for (`None`: the default tier's, or for `Kernel` those of
    /// the open gate).
    pub fn own(rates: Option<SessionRates>) -> Option<crate::valve::Rates> {
        rates
            .filter(|r| r.source != RateSource::Kernel)
            .map(|r| r.rates)
    }
}

/// What a session-history line records; stored (and shown) as its name. A session's close
/// reason is one of the closing actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// A paid grant opened or extended the session.
    Grant,
    AdminOpen,
    AdminExtend,
    AdminClose,
    /// Closed: the byte allotment is used up.
    Quota,
    /// Closed: the time allotment ran out.
    Expiry,
    /// Start-up reconciliation with the kernel.
    Reconcile,
}

impl Action {
    const ALL: [Action; 7] = [
        Action::Grant,
        Action::AdminOpen,
        Action::AdminExtend,
        Action::AdminClose,
        Action::Quota,
        Action::Expiry,
        Action::Reconcile,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Grant => "grant",
            Action::AdminOpen => "admin-open",
            Action::AdminExtend => "admin-extend",
            Action::AdminClose => "admin-close",
            Action::Quota => "quota",
            Action::Expiry => "expiry",
            Action::Reconcile => "reconcile",
        }
    }
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown session action {s:?}"))
    }
}

impl serde::Serialize for Action {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A line of the session history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub mac: MacAddr,
    pub action: Action,
    pub amount: u64,
    pub detail: String,
}

pub struct Store {
    conn: db::Conn,
    /// Unix seconds (a test clock in the soak test).
    clock: Clock,
    retention: Duration,
}

/// The store's wall clock, unix seconds: row ages for retention, never deadlines.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Default retention of finished history.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// Usage history is kept at most this often per device (the session row has the latest).
pub const HISTORY_EVERY_SECS: u64 = 3_600;

/// What one `prune` deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub sessions: usize,
    pub log_lines: usize,
    pub snapshots: usize,
    pub grants: usize,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS grants (
    token_id TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    mac TEXT NOT NULL,
    customer TEXT,
    mint TEXT NOT NULL,
    unit TEXT NOT NULL,
    gross INTEGER NOT NULL DEFAULT 0,
    net INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    allotment INTEGER NOT NULL DEFAULT 0,
    metric TEXT NOT NULL,
    status TEXT NOT NULL,
    answer TEXT,
    error TEXT,
    created_unix INTEGER NOT NULL,
    updated_unix INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS grants_status ON grants(status);
CREATE TABLE IF NOT EXISTS sessions (
    mac TEXT PRIMARY KEY,
    metric TEXT NOT NULL,
    allotment INTEGER NOT NULL,
    used_before INTEGER NOT NULL,
    baseline INTEGER NOT NULL,
    used_snapshot INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    end_unix_ms INTEGER,
    end_boot_ns INTEGER,
    boot_id TEXT NOT NULL,
    started_unix INTEGER NOT NULL,
    active INTEGER NOT NULL,
    close_reason TEXT,
    updated_unix INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS session_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_unix INTEGER NOT NULL,
    mac TEXT NOT NULL,
    action TEXT NOT NULL,
    amount INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS usage_snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_unix INTEGER NOT NULL,
    mac TEXT NOT NULL,
    used INTEGER NOT NULL,
    allotment INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS bindings (
    mac TEXT NOT NULL,
    address TEXT NOT NULL,
    updated_unix INTEGER NOT NULL,
    PRIMARY KEY (mac, address)
);
CREATE INDEX IF NOT EXISTS sessions_active ON sessions(active, updated_unix);
CREATE INDEX IF NOT EXISTS session_log_at ON session_log(at_unix);
CREATE INDEX IF NOT EXISTS session_log_mac ON session_log(mac, id);
CREATE INDEX IF NOT EXISTS usage_snapshots_mac ON usage_snapshots(mac, at_unix);
CREATE INDEX IF NOT EXISTS usage_snapshots_at ON usage_snapshots(at_unix);
CREATE INDEX IF NOT EXISTS grants_updated ON grants(status, updated_unix);
";

/// WAL, NORMAL by default (FULL per durable write: see the module doc).
const PRAGMAS: Pragmas = Pragmas {
    synchronous: Synchronous::Normal,
    foreign_keys: true,
    busy_timeout: Some(Duration::from_secs(5)),
};

/// Columns added after the first schema: (table, column, type). A database from before gets
/// them with `ALTER TABLE … ADD COLUMN` (existing rows read NULL: the default tier and rates).
const ADDED_COLUMNS: [(&str, &str, &str); 6] = [
    ("sessions", "tier", "TEXT"),
    ("sessions", "price_factor", "INTEGER"),
    ("sessions", "down_kbit", "INTEGER"),
    ("sessions", "up_kbit", "INTEGER"),
    ("sessions", "rate_source", "TEXT"),
    ("grants", "tier", "TEXT"),
];

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    for (table, column, ty) in ADDED_COLUMNS {
        let has = conn
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = '{column}'"
            ))?
            .exists([])?;
        if !has {
            conn.execute(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"), [])?;
            if column == "rate_source" {
                // Active sessions from before: their rates (maybe set by the operator) live
                // only in the kernel; reconciliation adopts what the open gate has.
                conn.execute(
                    "UPDATE sessions SET rate_source = 'kernel' WHERE active = 1",
                    [],
                )?;
            }
        }
    }
    Ok(())
}

// SQLite integers are i64; our amounts fit (allotments are far below 2^63), and the cast
// round-trips exactly either way.
fn i(v: u64) -> i64 {
    v as i64
}
fn u(v: i64) -> u64 {
    v as u64
}

impl Store {
    /// Opens (creating) `path`, enables WAL (+ synchronous=NORMAL; see the module doc) and
    /// creates the schema.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        Self::init(db::open(path, PRAGMAS)?)
    }

    /// A private in-memory database (tests).
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::init(db::open_in_memory(PRAGMAS)?)
    }

    fn init(conn: Connection) -> Result<Store, StoreError> {
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        let store = Store {
            conn: db::Conn::new(conn),
            clock: Arc::new(crate::sys::clock::unix_secs),
            retention: DEFAULT_RETENTION,
        };
        store.ln_schema()?;
        Ok(store)
    }

    /// Keeps finished history for `retention` (see the module doc).
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Ages rows by `clock` instead of the system's wall clock (the soak test's 24 h).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn now_unix(&self) -> u64 {
        (self.clock)()
    }

    /// Runs `f` with `synchronous=FULL`: its commit (and every earlier one in the WAL) is on
    /// disk when this returns.
    fn durable<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let c = self.conn();
        c.pragma_update(None, "synchronous", "FULL")?;
        let r = f(&c);
        c.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(r?)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock()
    }

    /// Raw SQL against the database (tests inject failures with triggers).
    #[cfg(test)]
    pub(crate) fn execute_batch_for_test(&self, sql: &str) {
        self.conn().execute_batch(sql).expect("test sql");
    }

    // ------------------------------------------------------------ grants

    pub fn grant(&self, token_id: &str) -> Result<Option<Grant>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare_cached("SELECT * FROM grants WHERE token_id = ?1")?;
        let row = st.query_row([token_id], grant_from_row).optional()?;
        row.transpose()
    }

    /// Records a payment before the mint is contacted. Returns false if the token id is known.
    pub fn insert_grant(&self, g: &Grant) -> Result<bool, StoreError> {
        let now = self.now_unix();
        let n = self.durable(|c| {
            c.execute(
                "INSERT OR IGNORE INTO grants (token_id, token, mac, customer, mint, unit, gross,
                   net, steps, allotment, metric, status, answer, error, created_unix, updated_unix,
                   tier)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?15,?16)",
                params![
                    g.token_id,
                    g.token,
                    g.mac.to_string(),
                    g.customer,
                    g.mint,
                    g.unit,
                    i(g.gross),
                    i(g.net),
                    i(g.steps),
                    i(g.allotment),
                    g.metric.as_str(),
                    g.status.as_str(),
                    g.answer,
                    g.error,
                    i(now),
                    g.tier,
                ],
            )
        })?;
        Ok(n == 1)
    }

    /// Replaces a grant whose redemption failed for good (nothing was swapped) with a new
    /// attempt at the same proofs: another encoding of the token, maybe from another device.
    /// Returns false if the stored grant is not `failed` (then it must be finished as is).
    pub fn retry_failed_grant(&self, g: &Grant) -> Result<bool, StoreError> {
        let n = self.durable(|c| {
            c.execute(
                "UPDATE grants SET token = ?2, mac = ?3, customer = ?4, status = ?5, error = NULL,
                   updated_unix = ?6, tier = ?7
                 WHERE token_id = ?1 AND status = 'failed'",
                params![
                    g.token_id,
                    g.token,
                    g.mac.to_string(),
                    g.customer,
                    g.status.as_str(),
                    i(self.now_unix()),
                    g.tier,
                ],
            )
        })?;
        Ok(n == 1)
    }

    /// Moves a grant to `status` (redeeming/failed), keeping amounts.
    pub fn set_grant_status(
        &self,
        token_id: &str,
        status: GrantStatus,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE grants SET status = ?2, error = ?3, updated_unix = ?4 WHERE token_id = ?1",
            params![token_id, status.as_str(), error, i(self.now_unix())],
        )?;
        Ok(())
    }

    /// The mint swapped the token into our wallet.
    pub fn mark_redeemed(&self, token_id: &str, gross: u64, net: u64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE grants SET status = 'redeemed', gross = ?2, net = ?3, error = NULL,
               updated_unix = ?4 WHERE token_id = ?1 AND status IN ('redeeming', 'failed', 'redeemed')",
            params![token_id, i(gross), i(net), i(self.now_unix())],
        )?;
        Ok(())
    }

    /// Too little for the minimum purchase: the value stays in our wallet, the notice is kept.
    pub fn mark_rejected_below_min(
        &self,
        token_id: &str,
        steps: u64,
        notice_json: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE grants SET status = 'rejected-below-min', steps = ?2, answer = ?3,
               updated_unix = ?4 WHERE token_id = ?1",
            params![token_id, i(steps), notice_json, i(self.now_unix())],
        )?;
        Ok(())
    }

    /// Grants received or being received but not yet applied (for reconcile at start).
    pub fn unfinished_grants(&self) -> Result<Vec<Grant>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare_cached(
            "SELECT * FROM grants WHERE status IN ('redeeming', 'redeemed') ORDER BY created_unix",
        )?;
        let rows = st.query_map([], grant_from_row)?;
        rows.map(|r| r?).collect()
    }

    // ------------------------------------------------------------ sessions

    pub fn session(&self, mac: MacAddr) -> Result<Option<SessionRow>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare_cached("SELECT * FROM sessions WHERE mac = ?1")?;
        let row = st
            .query_row([mac.to_string()], session_from_row)
            .optional()?;
        row.transpose()
    }

    pub fn sessions(&self) -> Result<Vec<SessionRow>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare_cached("SELECT * FROM sessions ORDER BY mac")?;
        let rows = st.query_map([], session_from_row)?;
        rows.map(|r| r?).collect()
    }

    /// Writes a session, optionally marks a grant applied with its answer, and logs the action,
    /// all in one transaction: a crash leaves either all or none of it.
    pub fn commit_session(
        &self,
        s: &SessionRow,
        applied: Option<AppliedGrant<'_>>,
        log: &LogEntry,
    ) -> Result<(), StoreError> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let now = i(self.now_unix());
        tx.execute(
            "INSERT INTO sessions (mac, metric, allotment, used_before, baseline, used_snapshot,
               generation, end_unix_ms, end_boot_ns, boot_id, started_unix, active, close_reason,
               updated_unix, tier, down_kbit, up_kbit, rate_source, price_factor)
             VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19)
             ON CONFLICT(mac) DO UPDATE SET metric=?2, allotment=?3, used_before=?4, baseline=?5,
               used_snapshot=?6, generation=?7, end_unix_ms=?8, end_boot_ns=?9, boot_id=?10,
               started_unix=?11, active=?12, close_reason=?13, updated_unix=?14, tier=?15,
               down_kbit=?16, up_kbit=?17, rate_source=?18, price_factor=?19",
            params![
                s.mac.to_string(),
                s.metric.as_str(),
                i(s.allotment),
                i(s.used_before),
                i(s.baseline),
                i(s.used_snapshot),
                s.generation,
                s.end_unix_ms.map(i),
                s.end_boot_ns.map(i),
                s.boot_id,
                i(s.started_unix),
                s.active,
                s.close_reason.map(Action::as_str),
                now,
                s.tier,
                s.rates.map(|r| i(r.rates.down_kbit)),
                s.rates.map(|r| i(r.rates.up_kbit)),
                s.rates.map(|r| r.source.as_str()),
                i(s.price_factor),
            ],
        )?;
        if let Some(a) = applied {
            tx.execute(
                "UPDATE grants SET status = 'applied', steps = ?2, allotment = ?3, answer = ?4,
                   error = NULL, updated_unix = ?5 WHERE token_id = ?1",
                params![a.token_id, i(a.steps), i(a.allotment), a.answer, now],
            )?;
        }
        tx.execute(
            "INSERT INTO session_log (at_unix, mac, action, amount, detail) VALUES (?1,?2,?3,?4,?5)",
            params![now, log.mac.to_string(), log.action.as_str(), i(log.amount), log.detail],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Only the active sessions (what the periodic snapshot and reconciliation walk; closed
    /// rows are history).
    pub fn active_sessions(&self) -> Result<Vec<SessionRow>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare_cached("SELECT * FROM sessions WHERE active = 1 ORDER BY mac")?;
        let rows = st.query_map([], session_from_row)?;
        rows.map(|r| r?).collect()
    }

    /// Records usage of one device (see [`Store::snapshot_usages`]).
    pub fn snapshot_usage(
        &self,
        mac: MacAddr,
        used: u64,
        allotment: u64,
    ) -> Result<(), StoreError> {
        self.snapshot_usages(&[(mac, used, allotment)])
    }

    /// Records usage of many devices in one transaction: each session's snapshot is updated;
    /// the history gains a row per device at most every [`HISTORY_EVERY_SECS`] (the row of the
    /// current hour is updated in place), so a tick every 10 s does not grow the file.
    pub fn snapshot_usages(&self, rows: &[(MacAddr, u64, u64)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let now = self.now_unix();
        let bucket = i(now - now % HISTORY_EVERY_SECS);
        let mut c = self.conn();
        let tx = c.transaction()?;
        for (mac, used, allotment) in rows {
            let m = mac.to_string();
            tx.execute(
                "UPDATE sessions SET used_snapshot = MAX(used_snapshot, ?2), updated_unix = ?3 WHERE mac = ?1",
                params![m, i(*used), i(now)],
            )?;
            let n = tx.execute(
                "UPDATE usage_snapshots SET used = ?2, allotment = ?3, at_unix = ?4
                 WHERE mac = ?1 AND at_unix >= ?5",
                params![m, i(*used), i(*allotment), i(now), bucket],
            )?;
            if n == 0 {
                tx.execute(
                    "INSERT INTO usage_snapshots (at_unix, mac, used, allotment) VALUES (?1,?2,?3,?4)",
                    params![i(now), m, i(*used), i(*allotment)],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes finished history older than the retention. Never an active session, never a
    /// grant whose money is not yet applied (`redeeming`, `redeemed`).
    pub fn prune(&self) -> Result<PruneReport, StoreError> {
        let cutoff = i(self.now_unix().saturating_sub(self.retention.as_secs()));
        let mut c = self.conn();
        let tx = c.transaction()?;
        let report = PruneReport {
            sessions: tx.execute(
                "DELETE FROM sessions WHERE active = 0 AND updated_unix < ?1",
                [cutoff],
            )?,
            log_lines: tx.execute("DELETE FROM session_log WHERE at_unix < ?1", [cutoff])?,
            snapshots: tx.execute("DELETE FROM usage_snapshots WHERE at_unix < ?1", [cutoff])?,
            grants: tx.execute(
                "DELETE FROM grants WHERE status IN ('applied', 'rejected-below-min', 'failed')
                   AND updated_unix < ?1",
                [cutoff],
            )?,
        };
        // A binding outlives its session only until the next prune: a device that pays
        // again is bound anew by its payment.
        tx.execute(
            "DELETE FROM bindings WHERE mac NOT IN (SELECT mac FROM sessions WHERE active = 1)",
            [],
        )?;
        tx.commit()?;
        Ok(report)
    }

    /// Records the addresses a device's gate is bound to (`&[]` forgets them), so start-up
    /// reconciliation and top-ups can bind a gate they reopen (the kernel's binding goes with
    /// its maps, and an open replaces it).
    pub fn set_binding(&self, mac: MacAddr, addresses: &[IpAddr]) -> Result<(), StoreError> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute("DELETE FROM bindings WHERE mac = ?1", [mac.to_string()])?;
        for a in addresses {
            tx.execute(
                "INSERT OR IGNORE INTO bindings (mac, address, updated_unix) VALUES (?1, ?2, ?3)",
                params![mac.to_string(), a.to_string(), i(self.now_unix())],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The addresses a device's gate is bound to, in the order they were bound (an
    /// unparsable row is skipped).
    pub fn binding(&self, mac: MacAddr) -> Result<Vec<IpAddr>, StoreError> {
        let c = self.conn();
        let mut st =
            c.prepare_cached("SELECT address FROM bindings WHERE mac = ?1 ORDER BY rowid")?;
        let rows = st.query_map([mac.to_string()], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for r in rows {
            if let Ok(a) = r?.parse() {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Rows in (sessions, session_log, usage_snapshots, grants).
    pub fn row_counts(&self) -> Result<[u64; 4], StoreError> {
        let c = self.conn();
        let mut out = [0u64; 4];
        for (n, t) in ["sessions", "session_log", "usage_snapshots", "grants"]
            .iter()
            .enumerate()
        {
            out[n] = u(c.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))?);
        }
        Ok(out)
    }

    /// Bytes the database occupies (pages in use, excluding free pages; the WAL is
    /// checkpointed into it).
    pub fn size_bytes(&self) -> Result<u64, StoreError> {
        let c = self.conn();
        // A busy database cannot truncate its WAL now: the size then includes it.
        if let Err(e) = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "WAL checkpoint before measuring");
        }
        let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        let size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(u((pages - free) * size))
    }

    /// The last `limit` history lines for a MAC, newest first.
    pub fn log(&self, mac: MacAddr, limit: u32) -> Result<Vec<LogEntry>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare_cached(
            "SELECT mac, action, amount, detail FROM session_log WHERE mac = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![mac.to_string(), limit], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get(3)?,
            ))
        })?;
        rows.map(|r| {
            let (m, action, amount, detail) = r?;
            Ok(LogEntry {
                mac: parse_mac("session_log", &m)?,
                action: parse_action("session_log", &action)?,
                amount: u(amount),
                detail,
            })
        })
        .collect()
    }
}

/// A grant applied together with a session change.
#[derive(Clone, Copy, Debug)]
pub struct AppliedGrant<'a> {
    pub token_id: &'a str,
    pub steps: u64,
    pub allotment: u64,
    pub answer: &'a str,
}

fn parse_mac(table: &'static str, s: &str) -> Result<MacAddr, StoreError> {
    s.parse()
        .map_err(|e: crate::valve::ParseMacError| StoreError::Corrupt {
            table,
            message: e.to_string(),
        })
}

fn parse_action(table: &'static str, s: &str) -> Result<Action, StoreError> {
    s.parse()
        .map_err(|message| StoreError::Corrupt { table, message })
}

fn parse_metric(table: &'static str, s: &str) -> Result<Metric, StoreError> {
    s.parse()
        .map_err(|message| StoreError::Corrupt { table, message })
}

fn grant_from_row(r: &Row<'_>) -> rusqlite::Result<Result<Grant, StoreError>> {
    let mac: String = r.get("mac")?;
    let metric: String = r.get("metric")?;
    let status: String = r.get("status")?;
    let g = (|| {
        Ok(Grant {
            token_id: r.get("token_id")?,
            token: r.get("token")?,
            mac: parse_mac("grants", &mac)?,
            customer: r.get("customer")?,
            mint: r.get("mint")?,
            unit: r.get("unit")?,
            gross: u(r.get("gross")?),
            net: u(r.get("net")?),
            steps: u(r.get("steps")?),
            allotment: u(r.get("allotment")?),
            metric: parse_metric("grants", &metric)?,
            status: GrantStatus::parse(&status).ok_or(StoreError::Corrupt {
                table: "grants",
                message: format!("status {status:?}"),
            })?,
            answer: r.get("answer")?,
            error: r.get("error")?,
            created_unix: u(r.get("created_unix")?),
            tier: r.get("tier")?,
        })
    })();
    Ok(g)
}

fn session_from_row(r: &Row<'_>) -> rusqlite::Result<Result<SessionRow, StoreError>> {
    let mac: String = r.get("mac")?;
    let metric: String = r.get("metric")?;
    let s = (|| {
        Ok(SessionRow {
            mac: parse_mac("sessions", &mac)?,
            metric: parse_metric("sessions", &metric)?,
            allotment: u(r.get("allotment")?),
            used_before: u(r.get("used_before")?),
            baseline: u(r.get("baseline")?),
            used_snapshot: u(r.get("used_snapshot")?),
            generation: r.get("generation")?,
            end_unix_ms: r.get::<_, Option<i64>>("end_unix_ms")?.map(u),
            end_boot_ns: r.get::<_, Option<i64>>("end_boot_ns")?.map(u),
            boot_id: r.get("boot_id")?,
            started_unix: u(r.get("started_unix")?),
            active: r.get("active")?,
            close_reason: r
                .get::<_, Option<String>>("close_reason")?
                .map(|a| parse_action("sessions", &a))
                .transpose()?,
            tier: r.get("tier")?,
            price_factor: r.get::<_, Option<i64>>("price_factor")?.map_or(1, u).max(1),
            rates: session_rates(r)?,
        })
    })();
    Ok(s)
}

/// The rate columns of a session row: all NULL = the default tier's rates.
fn session_rates(r: &Row<'_>) -> Result<Option<SessionRates>, StoreError> {
    let source: Option<String> = r.get("rate_source")?;
    let Some(source) = source else {
        return Ok(None);
    };
    let source = match source.as_str() {
        "tier" => RateSource::Tier,
        "admin" => RateSource::Admin,
        "kernel" => RateSource::Kernel,
        other => {
            return Err(StoreError::Corrupt {
                table: "sessions",
                message: format!("rate_source {other:?}"),
            })
        }
    };
    let kbit =
        |c: &str| -> Result<u64, StoreError> { Ok(r.get::<_, Option<i64>>(c)?.map_or(0, u)) };
    Ok(Some(SessionRates {
        rates: crate::valve::Rates {
            down_kbit: kbit("down_kbit")?,
            up_kbit: kbit("up_kbit")?,
        },
        source,
    }))
}

// ------------------------------------------------------------ Lightning quotes

/// The Lightning checkout's quotes (`lightning.rs`): which device a mint quote was bought for.
/// `open` until it is handed to the grants table (then `settled`, the grant `ln:<quote>` says
/// how it ended) or expires unpaid (`expired`).
const LN_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ln_quotes (
    quote TEXT PRIMARY KEY,
    mint TEXT NOT NULL,
    amount INTEGER NOT NULL,
    mac TEXT NOT NULL,
    request TEXT NOT NULL,
    expiry INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_unix INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ln_quotes_state ON ln_quotes(state);
";

/// One Lightning quote row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LnQuote {
    pub quote: String,
    pub mint: String,
    pub amount: u64,
    pub mac: MacAddr,
    pub request: String,
    pub expiry: u64,
    /// `open`, `settled` or `expired`.
    pub state: String,
    pub created_unix: u64,
}

impl Store {
    fn ln_schema(&self) -> Result<(), StoreError> {
        Ok(self.conn().execute_batch(LN_SCHEMA)?)
    }

    /// Records a new quote (durably: the bolt11 is about to be shown to the customer).
    pub fn insert_ln_quote(&self, q: &LnQuote) -> Result<(), StoreError> {
        self.durable(|c| {
            c.execute(
                "INSERT INTO ln_quotes (quote, mint, amount, mac, request, expiry, state,
                   created_unix) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
                params![
                    q.quote,
                    q.mint,
                    i(q.amount),
                    q.mac.to_string(),
                    q.request,
                    i(q.expiry),
                    q.state,
                    i(q.created_unix),
                ],
            )
        })?;
        Ok(())
    }

    pub fn ln_quote(&self, quote: &str) -> Result<Option<LnQuote>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare_cached("SELECT * FROM ln_quotes WHERE quote = ?1")?;
        st.query_row([quote], ln_quote_from_row)
            .optional()?
            .transpose()
    }

    /// Quotes still `open` (oldest first, at most `limit`).
    pub fn open_ln_quotes(&self, limit: u32) -> Result<Vec<LnQuote>, StoreError> {
        let c = self.conn();
        let mut st = c.prepare_cached(
            "SELECT * FROM ln_quotes WHERE state = 'open' ORDER BY created_unix LIMIT ?1",
        )?;
        let rows = st.query_map([limit], ln_quote_from_row)?;
        rows.map(|r| r?).collect()
    }

    /// Open quotes of one device not yet expired at `now`.
    pub fn open_ln_quotes_of(&self, mac: MacAddr, now: u64) -> Result<u64, StoreError> {
        let c = self.conn();
        let n: i64 = c.query_row(
            "SELECT COUNT(*) FROM ln_quotes WHERE state = 'open' AND mac = ?1 AND expiry > ?2",
            params![mac.to_string(), i(now)],
            |r| r.get(0),
        )?;
        Ok(u(n))
    }

    pub fn set_ln_quote_state(&self, quote: &str, state: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE ln_quotes SET state = ?2 WHERE quote = ?1",
            params![quote, state],
        )?;
        Ok(())
    }
}

fn ln_quote_from_row(r: &Row<'_>) -> rusqlite::Result<Result<LnQuote, StoreError>> {
    let mac: String = r.get("mac")?;
    Ok((|| {
        Ok(LnQuote {
            quote: r.get("quote")?,
            mint: r.get("mint")?,
            amount: u(r.get("amount")?),
            mac: parse_mac("ln_quotes", &mac)?,
            request: r.get("request")?,
            expiry: u(r.get("expiry")?),
            state: r.get("state")?,
            created_unix: u(r.get("created_unix")?),
        })
    })())
}

#[cfg(test)]
mod tests {
    #[test]
    fn actions_round_trip_by_name_and_unknown_names_are_refused() {
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>(), Ok(a));
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
        }
        assert!("exhausted".parse::<Action>().is_err());
        assert!("".parse::<Action>().is_err());
    }

    use super::*;

    fn mac() -> MacAddr {
        "02:00:00:00:00:01".parse().expect("mac")
    }

    fn grant(id: &str) -> Grant {
        Grant {
            token_id: id.into(),
            token: "cashuB…".into(),
            mac: mac(),
            customer: None,
            mint: "https://mint.example".into(),
            unit: "sat".into(),
            gross: 0,
            net: 0,
            steps: 0,
            allotment: 0,
            metric: Metric::Bytes,
            status: GrantStatus::Redeeming,
            answer: None,
            error: None,
            created_unix: 0,
            tier: None,
        }
    }

    #[test]
    fn grant_lifecycle_and_uniqueness() {
        let s = Store::open_in_memory().expect("db");
        assert!(s.insert_grant(&grant("t1")).expect("insert"));
        assert!(
            !s.insert_grant(&grant("t1")).expect("insert twice"),
            "token id is unique"
        );
        assert_eq!(s.unfinished_grants().expect("list").len(), 1);
        s.mark_redeemed("t1", 10, 9).expect("redeemed");
        let g = s.grant("t1").expect("get").expect("exists");
        assert_eq!((g.status, g.gross, g.net), (GrantStatus::Redeemed, 10, 9));
        let sess = SessionRow {
            mac: mac(),
            metric: Metric::Bytes,
            allotment: 100,
            used_before: 0,
            baseline: 5,
            used_snapshot: 0,
            generation: 1,
            end_unix_ms: None,
            end_boot_ns: None,
            boot_id: "b".into(),
            started_unix: 1,
            active: true,
            close_reason: None,
            tier: Some("fast".into()),
            price_factor: 3,
            rates: Some(SessionRates {
                rates: crate::valve::Rates {
                    down_kbit: 20_000,
                    up_kbit: 0,
                },
                source: RateSource::Tier,
            }),
        };
        let log = LogEntry {
            mac: mac(),
            action: Action::Grant,
            amount: 100,
            detail: "t1".into(),
        };
        s.commit_session(
            &sess,
            Some(AppliedGrant {
                token_id: "t1",
                steps: 9,
                allotment: 100,
                answer: "{}",
            }),
            &log,
        )
        .expect("commit");
        assert_eq!(
            s.grant("t1").expect("get").expect("g").status,
            GrantStatus::Applied
        );
        assert!(s.unfinished_grants().expect("list").is_empty());
        assert_eq!(s.session(mac()).expect("get"), Some(sess));
        s.snapshot_usage(mac(), 40, 100).expect("snap");
        s.snapshot_usage(mac(), 30, 100)
            .expect("snap never goes back");
        assert_eq!(s.session(mac()).expect("get").expect("s").used_snapshot, 40);
        assert_eq!(s.log(mac(), 10).expect("log"), vec![log]);
    }

    #[test]
    fn file_database_persists() {
        let path = std::env::temp_dir().join(format!(
            "tollgate-store-{}/tollgate.sqlite",
            std::process::id()
        ));
        std::fs::remove_file(&path).ok();
        {
            let s = Store::open(&path).expect("open");
            s.insert_grant(&grant("x")).expect("insert");
        }
        let s = Store::open(&path).expect("reopen");
        assert!(s.grant("x").expect("get").is_some());
        std::fs::remove_dir_all(path.parent().expect("dir")).ok();
    }

    /// A database written before sessions stored their tier and rates (and grants their
    /// tier) opens with its rows intact: they read as the default tier at the default rates,
    /// and new rows store both.
    #[test]
    fn a_database_from_before_tiers_is_migrated_and_keeps_its_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tollgate.sqlite");
        {
            let c = Connection::open(&path).expect("old db");
            // `SCHEMA` is the first schema (added columns come from `migrate`).
            c.execute_batch(SCHEMA).expect("schema");
            c.execute(
                "INSERT INTO sessions (mac, metric, allotment, used_before, baseline,
                   used_snapshot, generation, boot_id, started_unix, active, updated_unix)
                 VALUES ('02:00:00:00:00:01', 'bytes', 100, 0, 0, 10, 1, 'b', 1, 1, 1)",
                [],
            )
            .expect("old row");
            c.execute(
                "INSERT INTO grants (token_id, token, mac, mint, unit, metric, status,
                   created_unix, updated_unix)
                 VALUES ('t', 'cashuB', '02:00:00:00:00:01', 'm', 'sat', 'bytes', 'redeemed', 1, 1)",
                [],
            )
            .expect("old grant");
            let cols: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM pragma_table_info('sessions') WHERE name = 'tier'",
                    [],
                    |r| r.get(0),
                )
                .expect("cols");
            assert_eq!(cols, 0, "the old schema has no tier column");
        }
        let s = Store::open(&path).expect("migrated");
        let row = s.session(mac()).expect("read").expect("row kept");
        assert_eq!((row.allotment, row.used_snapshot), (100, 10));
        assert_eq!((row.tier, row.price_factor), (None, 1), "the default tier");
        assert_eq!(
            row.rates.map(|r| r.source),
            Some(RateSource::Kernel),
            "an active session's rates are its gate's until reconciliation adopts them"
        );
        assert_eq!(SessionRates::own(row.rates), None);
        assert_eq!(s.grant("t").expect("grant").expect("kept").tier, None);
        drop(s);
        // Opening again is a no-op (the columns exist now).
        let s = Store::open(&path).expect("reopened");
        let mut row = s.session(mac()).expect("read").expect("row");
        row.rates = Some(SessionRates {
            rates: crate::valve::Rates {
                down_kbit: 7,
                up_kbit: 9,
            },
            source: RateSource::Admin,
        });
        let log = LogEntry {
            mac: mac(),
            action: Action::AdminExtend,
            amount: 0,
            detail: String::new(),
        };
        s.commit_session(&row, None, &log).expect("commit");
        assert_eq!(s.session(mac()).expect("read").expect("row"), row);
    }

    #[test]
    fn only_grant_records_pay_for_a_full_sync() {
        let s = Store::open_in_memory().expect("open");
        let mode = |s: &Store| -> i64 {
            s.conn()
                .pragma_query_value(None, "synchronous", |r| r.get(0))
                .expect("pragma")
        };
        assert_eq!(mode(&s), 1, "NORMAL by default");
        let seen = s
            .durable(|c| c.pragma_query_value(None, "synchronous", |r| r.get::<_, i64>(0)))
            .expect("durable");
        assert_eq!(seen, 2, "FULL inside");
        assert_eq!(mode(&s), 1, "NORMAL again after");
        s.durable(|c| c.execute("INSERT INTO nowhere VALUES (1)", []))
            .expect_err("a failing write");
        assert_eq!(mode(&s), 1, "NORMAL again after an error too");
    }
}
