//! The wallet's own durable ledger, next to cdk's database: receipts (idempotent receive),
//! reservations, outgoing tokens and payouts. cdk's SQLite holds the proofs and sagas; this
//! file holds what the gateway promised on top of them. Every write is one autocommitted
//! statement, so a crash leaves either the old or the new row, never half of one.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::db::{self, Pragmas, Synchronous};

use super::WalletError;

pub(crate) struct Store {
    conn: db::Conn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReceiptState {
    /// Swap may be in flight (or was, before a crash): resolve before answering.
    Pending,
    /// Credited `net`.
    Done { gross: u64, net: u64 },
    /// The proofs were spent by someone else: nothing credited.
    Spent,
}

#[derive(Debug, Clone)]
pub(crate) struct ReceiptRow {
    pub token: String,
    pub state: ReceiptState,
    /// Who received it ([`super::Receiver::as_str`]); `None` for rows older than the column.
    pub receiver: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct PayoutRow {
    pub id: i64,
    pub mint: String,
    pub identity: String,
    pub address: String,
    pub amount: u64,
    pub fee: u64,
    pub outcome: String,
    pub quote_id: Option<String>,
    pub message: Option<String>,
    pub created_at: u64,
}

fn storage(e: rusqlite::Error) -> WalletError {
    WalletError::Storage {
        source: super::StorageError::Ledger(e),
    }
}

impl Store {
    pub(crate) fn open(path: &Path) -> Result<Store, WalletError> {
        let pragmas = Pragmas {
            synchronous: Synchronous::Full,
            foreign_keys: false,
            busy_timeout: Some(std::time::Duration::from_secs(5)),
        };
        let conn = db::open(path, pragmas).map_err(storage)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS receipts (
                 token_id TEXT PRIMARY KEY, mint TEXT NOT NULL, unit TEXT NOT NULL,
                 token TEXT NOT NULL, state TEXT NOT NULL, gross INTEGER NOT NULL DEFAULT 0,
                 net INTEGER NOT NULL DEFAULT 0, updated_at INTEGER NOT NULL,
                 receiver TEXT);
             CREATE TABLE IF NOT EXISTS reservations (
                 id TEXT PRIMARY KEY, mint TEXT NOT NULL, amount INTEGER NOT NULL,
                 expires_at_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS outgoing (
                 op_id TEXT PRIMARY KEY, mint TEXT NOT NULL, amount INTEGER NOT NULL,
                 value INTEGER NOT NULL, receiver_fee INTEGER NOT NULL, state TEXT NOT NULL,
                 created_at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS payouts (
                 id INTEGER PRIMARY KEY AUTOINCREMENT, mint TEXT NOT NULL,
                 identity TEXT NOT NULL, address TEXT NOT NULL, amount INTEGER NOT NULL,
                 fee INTEGER NOT NULL, outcome TEXT NOT NULL, quote_id TEXT, message TEXT,
                 created_at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS rebalances (
                 id TEXT PRIMARY KEY, source TEXT NOT NULL, target TEXT NOT NULL,
                 amount INTEGER NOT NULL, fee INTEGER NOT NULL DEFAULT 0,
                 mint_quote_id TEXT NOT NULL, melt_quote_id TEXT NOT NULL, state TEXT NOT NULL,
                 message TEXT, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);",
        )
        .map_err(storage)?;
        // Ledgers from before receipts named their receiver.
        let has_receiver = conn
            .prepare("SELECT 1 FROM pragma_table_info('receipts') WHERE name = 'receiver'")
            .and_then(|mut q| q.exists([]))
            .map_err(storage)?;
        if !has_receiver {
            conn.execute("ALTER TABLE receipts ADD COLUMN receiver TEXT", [])
                .map_err(storage)?;
        }
        Ok(Store {
            conn: db::Conn::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock()
    }

    // ---- receipts ----

    pub(crate) fn receipt(&self, token_id: &str) -> Result<Option<ReceiptRow>, WalletError> {
        self.conn()
            .query_row(
                "SELECT token, state, gross, net, receiver FROM receipts WHERE token_id = ?1",
                params![token_id],
                |r| {
                    let state: String = r.get(1)?;
                    let gross: u64 = r.get(2)?;
                    let net: u64 = r.get(3)?;
                    Ok(ReceiptRow {
                        token: r.get(0)?,
                        state: match state.as_str() {
                            "done" => ReceiptState::Done { gross, net },
                            "spent" => ReceiptState::Spent,
                            _ => ReceiptState::Pending,
                        },
                        receiver: r.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(storage)
    }

    pub(crate) fn pending_receipts(&self) -> Result<Vec<(String, String)>, WalletError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT token_id, token FROM receipts WHERE state = 'pending'")
            .map_err(storage)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(storage)?;
        rows.collect::<Result<_, _>>().map_err(storage)
    }

    pub(crate) fn put_receipt_pending(
        &self,
        token_id: &str,
        mint: &str,
        unit: &str,
        token: &str,
        receiver: &str,
    ) -> Result<(), WalletError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO receipts
                     (token_id, mint, unit, token, state, updated_at, receiver)
                 VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6)",
                params![token_id, mint, unit, token, now_ms(), receiver],
            )
            .map_err(storage)?;
        Ok(())
    }

    pub(crate) fn set_receipt_done(
        &self,
        token_id: &str,
        gross: u64,
        net: u64,
    ) -> Result<(), WalletError> {
        self.conn()
            .execute(
                "UPDATE receipts SET state = 'done', gross = ?2, net = ?3, updated_at = ?4
                 WHERE token_id = ?1",
                params![token_id, gross, net, now_ms()],
            )
            .map_err(storage)?;
        Ok(())
    }

    pub(crate) fn set_receipt_spent(&self, token_id: &str) -> Result<(), WalletError> {
        self.conn()
            .execute(
                "UPDATE receipts SET state = 'spent', updated_at = ?2 WHERE token_id = ?1",
                params![token_id, now_ms()],
            )
            .map_err(storage)?;
        Ok(())
    }

    pub(crate) fn delete_receipt(&self, token_id: &str) -> Result<(), WalletError> {
        self.conn()
            .execute(
                "DELETE FROM receipts WHERE token_id = ?1",
                params![token_id],
            )
            .map_err(storage)?;
        Ok(())
    }

    // ---- reservations ----

    pub(crate) fn reserved(&self, mint: &str) -> Result<u64, WalletError> {
        self.conn()
            .query_row(
                "SELECT COALESCE(SUM(amount), 0) FROM reservations
                 WHERE mint = ?1 AND expires_at_ms > ?2",
                params![mint, now_ms()],
                |r| r.get(0),
            )
            .map_err(storage)
    }

    /// `Some((mint, amount))` if the reservation exists and has not expired.
    pub(crate) fn reservation(&self, id: &str) -> Result<Option<(String, u64)>, WalletError> {
        self.conn()
            .query_row(
                "SELECT mint, amount FROM reservations WHERE id = ?1 AND expires_at_ms > ?2",
                params![id, now_ms()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(storage)
    }

    pub(crate) fn put_reservation(
        &self,
        id: &str,
        mint: &str,
        amount: u64,
        expires_at_ms: u64,
    ) -> Result<(), WalletError> {
        self.conn()
            .execute(
                "INSERT INTO reservations (id, mint, amount, expires_at_ms) VALUES (?1,?2,?3,?4)",
                params![id, mint, amount, expires_at_ms],
            )
            .map_err(storage)?;
        Ok(())
    }

    /// Moves an unexpired reservation's expiry to `expires_at_ms`; false if it is gone.
    pub(crate) fn extend_reservation(
        &self,
        id: &str,
        expires_at_ms: u64,
    ) -> Result<bool, WalletError> {
        let n = self
            .conn()
            .execute(
                "UPDATE reservations SET expires_at_ms = ?2 WHERE id = ?1 AND expires_at_ms > ?3",
                params![id, expires_at_ms, now_ms()],
            )
            .map_err(storage)?;
        Ok(n == 1)
    }

    pub(crate) fn delete_reservation(&self, id: &str) -> Result<bool, WalletError> {
        let n = self
            .conn()
            .execute("DELETE FROM reservations WHERE id = ?1", params![id])
            .map_err(storage)?;
        Ok(n > 0)
    }

    pub(crate) fn prune_reservations(&self) -> Result<usize, WalletError> {
        self.conn()
            .execute(
                "DELETE FROM reservations WHERE expires_at_ms <= ?1",
                params![now_ms()],
            )
            .map_err(storage)
    }

    // ---- outgoing tokens ----

    /// Write-ahead row for a token about to be created (`state = 'creating'`): if we crash
    /// before handing the token out, the next open revokes it (nobody else can hold it).
    pub(crate) fn put_outgoing_creating(
        &self,
        op_id: &str,
        mint: &str,
        amount: u64,
    ) -> Result<(), WalletError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO outgoing (op_id, mint, amount, value, receiver_fee, state,
                 created_at) VALUES (?1, ?2, ?3, 0, 0, 'creating', ?4)",
                params![op_id, mint, amount, now_ms()],
            )
            .map_err(storage)?;
        Ok(())
    }

    /// The token exists; record its value (still `creating` until handed out).
    pub(crate) fn set_outgoing_value(
        &self,
        op_id: &str,
        value: u64,
        receiver_fee: u64,
    ) -> Result<(), WalletError> {
        self.conn()
            .execute(
                "UPDATE outgoing SET value = ?2, receiver_fee = ?3 WHERE op_id = ?1",
                params![op_id, value, receiver_fee],
            )
            .map_err(storage)?;
        Ok(())
    }

    pub(crate) fn outgoing(&self) -> Result<Vec<super::OutgoingRecord>, WalletError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT op_id, mint, amount, value, state FROM outgoing
                 ORDER BY created_at, op_id",
            )
            .map_err(storage)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(super::OutgoingRecord {
                    op_id: r.get(0)?,
                    mint: r.get(1)?,
                    amount: r.get(2)?,
                    value: r.get(3)?,
                    state: r.get(4)?,
                })
            })
            .map_err(storage)?;
        rows.collect::<Result<_, _>>().map_err(storage)
    }

    /// `(op_id, mint)` of every outgoing token in `state`.
    pub(crate) fn outgoing_in_state(
        &self,
        state: &str,
    ) -> Result<Vec<(String, String)>, WalletError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT op_id, mint FROM outgoing WHERE state = ?1")
            .map_err(storage)?;
        let rows = stmt
            .query_map(params![state], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(storage)?;
        rows.collect::<Result<_, _>>().map_err(storage)
    }

    pub(crate) fn outgoing_mint(&self, op_id: &str) -> Result<Option<String>, WalletError> {
        self.conn()
            .query_row(
                "SELECT mint FROM outgoing WHERE op_id = ?1",
                params![op_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(storage)
    }

    pub(crate) fn set_outgoing_state(&self, op_id: &str, state: &str) -> Result<(), WalletError> {
        self.conn()
            .execute(
                "UPDATE outgoing SET state = ?2 WHERE op_id = ?1",
                params![op_id, state],
            )
            .map_err(storage)?;
        Ok(())
    }

    // ---- rebalances (see rebalance.rs for the states) ----

    /// Write-ahead row of a rebalance, recorded before the melt on the source is confirmed.
    pub(crate) fn put_rebalance(&self, r: &super::RebalanceRecord) -> Result<(), WalletError> {
        self.conn()
            .execute(
                "INSERT INTO rebalances (id, source, target, amount, fee, mint_quote_id,
                 melt_quote_id, state, message, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)",
                params![
                    r.id,
                    r.source,
                    r.target,
                    r.amount,
                    r.fee,
                    r.mint_quote_id,
                    r.melt_quote_id,
                    r.state,
                    r.message,
                    now_ms()
                ],
            )
            .map_err(storage)?;
        Ok(())
    }

    pub(crate) fn set_rebalance_state(
        &self,
        id: &str,
        state: &str,
        fee: Option<u64>,
        message: Option<&str>,
    ) -> Result<(), WalletError> {
        self.conn()
            .execute(
                "UPDATE rebalances SET state = ?2, fee = COALESCE(?3, fee),
                 message = COALESCE(?4, message), updated_at = ?5 WHERE id = ?1",
                params![id, state, fee, message, now_ms()],
            )
            .map_err(storage)?;
        Ok(())
    }

    /// Every rebalance, oldest first; `open_only` keeps the ones recovery must finish.
    pub(crate) fn rebalances(
        &self,
        open_only: bool,
    ) -> Result<Vec<super::RebalanceRecord>, WalletError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, source, target, amount, fee, mint_quote_id, melt_quote_id, state,
                 message, created_at FROM rebalances
                 WHERE NOT ?1 OR state IN ('melting', 'minting')
                 ORDER BY created_at, id",
            )
            .map_err(storage)?;
        let rows = stmt
            .query_map(params![open_only], |r| {
                Ok(super::RebalanceRecord {
                    id: r.get(0)?,
                    source: r.get(1)?,
                    target: r.get(2)?,
                    amount: r.get(3)?,
                    fee: r.get(4)?,
                    mint_quote_id: r.get(5)?,
                    melt_quote_id: r.get(6)?,
                    state: r.get(7)?,
                    message: r.get(8)?,
                    created_at: r.get::<_, u64>(9)? / 1000,
                })
            })
            .map_err(storage)?;
        rows.collect::<Result<_, _>>().map_err(storage)
    }

    /// Adds `extra` to an unexpired reservation and moves its expiry; false if it is gone.
    pub(crate) fn grow_reservation(
        &self,
        id: &str,
        extra: u64,
        expires_at_ms: u64,
    ) -> Result<bool, WalletError> {
        let n = self
            .conn()
            .execute(
                "UPDATE reservations SET amount = amount + ?2, expires_at_ms = ?3
                 WHERE id = ?1 AND expires_at_ms > ?4",
                params![id, extra, expires_at_ms, now_ms()],
            )
            .map_err(storage)?;
        Ok(n == 1)
    }

    // ---- payouts ----

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn put_payout(
        &self,
        mint: &str,
        identity: &str,
        address: &str,
        amount: u64,
        fee: u64,
        outcome: &str,
        quote_id: Option<&str>,
        message: Option<&str>,
    ) -> Result<i64, WalletError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO payouts (mint, identity, address, amount, fee, outcome, quote_id, message,
             created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                mint,
                identity,
                address,
                amount,
                fee,
                outcome,
                quote_id,
                message,
                now_ms() / 1000
            ],
        )
        .map_err(storage)?;
        Ok(conn.last_insert_rowid())
    }

    pub(crate) fn update_payout(
        &self,
        id: i64,
        fee: u64,
        outcome: &str,
        message: Option<&str>,
    ) -> Result<(), WalletError> {
        self.conn()
            .execute(
                "UPDATE payouts SET fee = ?2, outcome = ?3, message = ?4 WHERE id = ?1",
                params![id, fee, outcome, message],
            )
            .map_err(storage)?;
        Ok(())
    }

    pub(crate) fn payouts(&self) -> Result<Vec<PayoutRow>, WalletError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, mint, identity, address, amount, fee, outcome, quote_id, message,
                 created_at FROM payouts ORDER BY id",
            )
            .map_err(storage)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(PayoutRow {
                    id: r.get(0)?,
                    mint: r.get(1)?,
                    identity: r.get(2)?,
                    address: r.get(3)?,
                    amount: r.get(4)?,
                    fee: r.get(5)?,
                    outcome: r.get(6)?,
                    quote_id: r.get(7)?,
                    message: r.get(8)?,
                    created_at: r.get(9)?,
                })
            })
            .map_err(storage)?;
        rows.collect::<Result<_, _>>().map_err(storage)
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_expire_and_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("t.sqlite")).expect("open");
        let far = now_ms() + 60_000;
        store.put_reservation("a", "m", 10, far).expect("put");
        store
            .put_reservation("b", "m", 5, now_ms() - 1)
            .expect("put");
        assert_eq!(store.reserved("m").expect("sum"), 10, "expired one ignored");
        assert!(store.delete_reservation("a").expect("del"));
        assert_eq!(store.reserved("m").expect("sum"), 0);
        assert_eq!(store.prune_reservations().expect("prune"), 1);
    }

    #[test]
    fn rebalance_rows_and_growing_reservations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("t.sqlite")).expect("open");
        let row = super::super::RebalanceRecord {
            id: "r1".into(),
            source: "a".into(),
            target: "b".into(),
            amount: 100,
            fee: 0,
            mint_quote_id: "mq".into(),
            melt_quote_id: "lq".into(),
            state: "melting".into(),
            message: None,
            created_at: 0,
        };
        store.put_rebalance(&row).expect("put");
        assert!(store.put_rebalance(&row).is_err(), "one row per rebalance");
        assert_eq!(store.rebalances(true).expect("open").len(), 1);
        store
            .set_rebalance_state("r1", "minting", Some(2), None)
            .expect("minting");
        store
            .set_rebalance_state("r1", "done", None, None)
            .expect("done");
        assert!(store.rebalances(true).expect("open").is_empty());
        let all = store.rebalances(false).expect("all");
        assert_eq!((all[0].state.as_str(), all[0].fee), ("done", 2), "fee kept");

        let far = now_ms() + 60_000;
        store.put_reservation("h", "b", 10, far).expect("put");
        assert!(store.grow_reservation("h", 5, far).expect("grow"));
        assert_eq!(store.reserved("b").expect("sum"), 15);
        store
            .put_reservation("x", "b", 1, now_ms() - 1)
            .expect("put");
        assert!(
            !store.grow_reservation("x", 5, far).expect("grow"),
            "expired stays gone"
        );
    }

    #[test]
    fn receipt_lifecycle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("t.sqlite")).expect("open");
        store
            .put_receipt_pending("t", "m", "sat", "cashuB", "operator")
            .expect("put");
        assert_eq!(
            store.receipt("t").expect("get").expect("row").state,
            ReceiptState::Pending
        );
        store.set_receipt_done("t", 21, 20).expect("done");
        assert_eq!(
            store.receipt("t").expect("get").expect("row").state,
            ReceiptState::Done { gross: 21, net: 20 }
        );
        assert!(store.pending_receipts().expect("list").is_empty());
    }
}
