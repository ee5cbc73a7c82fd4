//! Profit payouts over Lightning.
//!
//! ```text
//! every payout_interval_seconds, per mint (one round at a time per mint):
//!   finalise pending melts from earlier rounds (mints with a request in flight: next round)
//!   lock(mint): payable = balance − min_balance − reserved; skip if balance < min_payout_amount
//!   shares = payable × factor, owner first
//!   per share: LNURL invoice ─> melt quote            (no lock: nothing reserved yet)
//!              ─> lock(mint) ─> re-check budget ─> prepare (inputs Reserved) ─> row 'pending'
//!              ─> unlock ─> confirm: swap + melt at the mint ─> record
//! ```
//! The share is the whole budget: invoice amount + Lightning fee reserve + input fees ≤ share,
//! and each melt re-checks `balance − min_balance − reserved` under the mint lock, so a
//! reservation made while an invoice was being fetched is never paid out.
//!
//! Reserve, then release the lock for the round trips (issue 11): `prepare_melt` is local —
//! it selects the inputs and marks them `Reserved` in cdk, which takes them out of the
//! balance every reservation and payout checks. That is the share's reservation: after it,
//! the lock is released and the melt (a swap for exact inputs, then the melt, possibly
//! waiting on Lightning) runs while reservations, sends and customers' payments at the same
//! mint go on (`a_stalled_melt_holds_no_reservation_or_payment_at_its_mint`). What had to be
//! made safe for that:
//!
//! | conflict                                   | how                                        |
//! |--------------------------------------------|--------------------------------------------|
//! | two prepares select the same unspent proofs (cdk's "proof not in unspent state") | selection only under `lock` |
//! | bitreq sends a mint's requests one by one on one connection | `transport.rs`: a connection per call in flight |
//! | saga recovery (another round's `finalize_pending_melts`, a receipt's `recover_incomplete_sagas`) sees the quote unpaid before the melt arrives and releases its inputs | the melt holds `in_flight` shared; recoveries take it exclusive (or skip) |
//! | the fee was `balance before − after − amount`, wrong once others move the balance | `fee_paid` (Lightning + melt input fee) + the pre-melt swap's fee, from this melt's own proofs |
//!
//! | the inputs cdk selects exceed the share (change comes back after the melt): during the melt they may hold value a reservation needs | if `unspent < reserved` after prepare, this melt keeps the lock (the old behaviour) |
//!
//! No new durable state: a crash between prepare and confirm leaves the cdk saga in
//! `ProofsReserved` (compensated at open) and the row `pending` (then `failed`), as before.
//!
//! Failure policy: if the owner's share fails, the round stops (others are not paid) and
//! everything stays in the wallet for the next round — otherwise the next round would re-split
//! the owner's retained share among everyone. A non-owner failure keeps that share in the
//! wallet and the recipient is retried with exponential backoff (60 s doubling, 1 h max).
//!
//! | outcome   | meaning                                            |
//! |-----------|----------------------------------------------------|
//! | `pending` | melt sent, Lightning unresolved; finalised later  |
//! | `paid`    | recipient paid; `fee` = Lightning + input fees    |
//! | `failed`  | melt failed; cdk returned the proofs to the wallet |
//! | `skipped` | invoice could not be obtained; nothing spent       |

use std::collections::HashMap;
use std::sync::Mutex as StdMutex;
use std::time::{Duration, Instant};

use cdk::cdk_database::WalletDatabase;
use cdk::nuts::{MeltQuoteState, PaymentMethod};
use cdk::wallet::MeltOutcome;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{lnurl, MintState, Wallet, WalletError};

/// How long a payout round waits on a melt the mint reports as pending.
const PENDING_WAIT: Duration = Duration::from_secs(3);

/// One payout attempt, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutRecord {
    pub id: i64,
    pub mint: String,
    pub identity: String,
    pub lightning_address: String,
    /// Amount the recipient receives.
    pub amount: u64,
    /// Lightning fee + input fees paid on top (inside the share).
    pub fee: u64,
    /// `pending`, `paid`, `failed` or `skipped`.
    pub outcome: String,
    pub message: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
}

#[derive(Default)]
pub(crate) struct PayoutState {
    /// Backoff per Lightning address: (consecutive failures, not before).
    backoff: StdMutex<HashMap<String, (u32, Instant)>>,
}

impl PayoutState {
    fn ready(&self, address: &str) -> bool {
        let map = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        map.get(address).is_none_or(|(_, t)| Instant::now() >= *t)
    }

    fn failed(&self, address: &str) {
        let mut map = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map
            .entry(address.to_string())
            .or_insert((0, Instant::now()));
        entry.0 += 1;
        let secs = (60u64 << entry.0.min(6)).min(3600);
        entry.1 = Instant::now() + Duration::from_secs(secs);
    }

    fn succeeded(&self, address: &str) {
        self.backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(address);
    }

    pub(crate) fn warnings(&self) -> Vec<String> {
        self.backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(a, (n, _))| format!("payouts to {a} failed {n} time(s) in a row"))
            .collect()
    }
}

/// Split `payable` by factors, owner first. Rounds down: the remainder stays in the wallet.
pub(crate) fn split(payable: u64, shares: &[super::ProfitShare]) -> Vec<(super::ProfitShare, u64)> {
    let mut out: Vec<(super::ProfitShare, u64)> = shares
        .iter()
        .map(|s| {
            let amt = (payable as f64 * s.factor.clamp(0.0, 1.0)).floor() as u64;
            (s.clone(), amt.min(payable))
        })
        .collect();
    out.sort_by_key(|(s, _)| s.identity != "owner");
    out
}

impl Wallet {
    /// Run payouts for every accepted mint on its interval until `shutdown` fires.
    pub fn spawn_payouts(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        let wallet = self.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for (key, state) in &wallet.inner.mints {
                let wallet = wallet.clone();
                let key = key.clone();
                let period = Duration::from_secs(state.settings.payout_interval_seconds.max(1));
                let shutdown = shutdown.clone();
                tasks.push(tokio::spawn(async move {
                    let mut ticker = tokio::time::interval(period);
                    // The first tick fires at once; skip it so a restart does not pay out
                    // before the gateway has settled.
                    ticker.tick().await;
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = ticker.tick() => {
                                if let Err(e) = wallet.payout_once(&key).await {
                                    tracing::warn!(mint = %key, error = %e, "payout round failed");
                                }
                            }
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    }

    /// Every payout attempt ever recorded, oldest first.
    pub async fn payouts(&self) -> Result<Vec<PayoutRecord>, WalletError> {
        Ok(self
            .inner
            .store
            .payouts()?
            .into_iter()
            .map(|r| PayoutRecord {
                id: r.id,
                mint: r.mint,
                identity: r.identity,
                lightning_address: r.address,
                amount: r.amount,
                fee: r.fee,
                outcome: r.outcome,
                message: r.message,
                created_at: r.created_at,
            })
            .collect())
    }

    /// Check melts a previous round (or a previous process) left pending. A mint with a
    /// request in flight is skipped (its sagas are not settled yet); the next round retries.
    pub(crate) async fn finalize_pending_payouts(&self) {
        let rows = match self.inner.store.payouts() {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "reading payouts");
                return;
            }
        };
        for state in self.inner.mints.values() {
            let Ok(_quiet) = state.in_flight.try_write() else {
                tracing::debug!(mint = %state.url, "a request is in flight; finalising later");
                continue;
            };
            let Ok(w) = self.cdk_wallet(state).await else {
                continue;
            };
            // Every mint, not only those with a pending row: a melt that a killed process
            // left in flight at the mint keeps its cdk saga (and its proofs reserved) until
            // it is resumed, also when our row was settled meanwhile from the quote's state.
            // Cheap when there is none (a local query).
            if let Err(e) = w.finalize_pending_melts().await {
                tracing::debug!(mint = %state.url, error = %e, "finalize_pending_melts");
            }
            let pending = rows.iter().filter(|r| {
                r.outcome == "pending"
                    && self
                        .mint_state(&r.mint)
                        .is_ok_and(|s| std::ptr::eq(s, state))
            });
            for row in pending {
                let Some(quote_id) = row.quote_id.as_deref() else {
                    continue;
                };
                match w.check_melt_quote_status(quote_id).await {
                    Ok(q) => {
                        let outcome = match q.state {
                            MeltQuoteState::Paid => "paid",
                            MeltQuoteState::Failed => "failed",
                            // Unpaid with no melt saga left in cdk: the melt never reached
                            // the mint (crash before confirm) or cdk rolled it back; the
                            // proofs are back in the wallet and nothing is in flight.
                            MeltQuoteState::Unpaid if !self.melt_in_flight(quote_id).await => {
                                "failed"
                            }
                            // Pending/Unknown, or a saga still open: not settled yet.
                            _ => continue,
                        };
                        let _ = self
                            .inner
                            .store
                            .update_payout(row.id, row.fee, outcome, None);
                    }
                    Err(e) => tracing::debug!(quote_id, error = %e, "melt status"),
                }
            }
        }
    }

    /// Whether cdk still holds an unfinished melt saga for `quote_id`.
    pub(super) async fn melt_in_flight(&self, quote_id: &str) -> bool {
        match self.inner.db.get_incomplete_sagas().await {
            Ok(sagas) => sagas
                .iter()
                .any(|s| s.quote_id.as_deref() == Some(quote_id)),
            // Cannot tell: assume in flight, never mark a maybe-paid melt failed.
            Err(_) => true,
        }
    }

    /// One payout round for `mint`. Returns the records written in this round.
    pub async fn payout_once(&self, mint: &str) -> Result<Vec<PayoutRecord>, WalletError> {
        let state = self.mint_state(mint)?;
        let key = state.url.to_string();
        let _round = state.payout_round.lock().await;
        self.finalize_pending_payouts().await;
        let before = self.inner.store.payouts()?.len();

        let payable = {
            let _guard = state.lock.lock().await;
            let balance = self.balance_of(state).await?;
            if balance < state.settings.min_payout_amount {
                return Ok(Vec::new());
            }
            self.payable(state, balance)?
        };
        if payable == 0 {
            return Ok(Vec::new());
        }
        for (share, amount) in split(payable, &self.inner.settings.profit_share) {
            if amount == 0 {
                continue;
            }
            let is_owner = share.identity == "owner";
            if !self.inner.payouts.ready(&share.lightning_address) {
                if is_owner {
                    break;
                }
                continue;
            }
            let ok = match self.pay_share(state, &key, &share, amount).await {
                Ok(ok) => ok,
                Err(e) => {
                    tracing::warn!(identity = %share.identity, error = %e, "payout share failed");
                    false
                }
            };
            if ok {
                self.inner.payouts.succeeded(&share.lightning_address);
            } else {
                self.inner.payouts.failed(&share.lightning_address);
                if is_owner {
                    break;
                }
            }
        }
        let all = self.payouts().await?;
        Ok(all.into_iter().skip(before).collect())
    }

    fn payable(&self, state: &MintState, balance: u64) -> Result<u64, WalletError> {
        let reserved = self.reserved_of(&state.url.to_string())?;
        Ok(balance
            .saturating_sub(state.settings.min_balance)
            .saturating_sub(reserved))
    }

    /// Pay one share. `Ok(true)` when paid or pending, `Ok(false)` when recorded as failed
    /// or skipped.
    async fn pay_share(
        &self,
        state: &MintState,
        key: &str,
        share: &super::ProfitShare,
        budget: u64,
    ) -> Result<bool, WalletError> {
        let w = self.cdk_wallet(state).await?;
        let address = &share.lightning_address;
        let record = |amount, fee, outcome: &str, quote: Option<&str>, msg: Option<&str>| {
            self.inner.store.put_payout(
                key,
                &share.identity,
                address,
                amount,
                fee,
                outcome,
                quote,
                msg,
            )
        };
        // Start by guessing the Lightning fee reserve (1 % + 2 sat), then adjust to the
        // mint's real quote: invoice + fee_reserve + input fees must fit in the share.
        let mut invoice_amount = budget.saturating_sub(budget / 100 + 2);
        for _ in 0..4 {
            if invoice_amount == 0 {
                record(0, 0, "skipped", None, Some("share too small for fees"))?;
                // Not the recipient's fault: no backoff.
                return Ok(true);
            }
            let invoice = match lnurl::invoice_for(
                address,
                invoice_amount * 1000,
                self.inner.settings.allow_loopback_lnurl,
            )
            .await
            {
                Ok(i) => i,
                Err(e) => {
                    record(invoice_amount, 0, "skipped", None, Some(&e.to_string()))?;
                    return Ok(false);
                }
            };
            // The quote is a round trip that moves no proofs: no lock.
            let quote = w
                .melt_quote(PaymentMethod::BOLT11, &invoice, None, None)
                .await
                .map_err(|e| WalletError::from_cdk(key, e))?;
            let guard = state.lock.lock().await;
            // No saga recovery of this mint may run from here until cdk's saga is past the
            // melt request: it would find the quote unpaid and hand the inputs back while
            // the mint is about to spend them. Always taken after `lock` (see `MintState`).
            let in_flight = state.in_flight.read().await;
            // Re-check under the lock: reservations may have appeared while we fetched.
            let balance = self.balance_of(state).await?;
            let payable = self.payable(state, balance)?;
            let budget = budget.min(payable);
            // Local: selects the inputs and reserves them in cdk (state `Reserved`, out of
            // every balance), which is the share's reservation once the lock is released.
            let prepared = w
                .prepare_melt(&quote.id, HashMap::new())
                .await
                .map_err(|e| WalletError::from_cdk(key, e))?;
            let cost: u64 = u64::from(quote.amount)
                + u64::from(quote.fee_reserve)
                + u64::from(prepared.total_fee());
            if cost > budget {
                let _ = prepared.cancel().await;
                let excess = cost - budget;
                invoice_amount = invoice_amount.saturating_sub(excess);
                continue;
            }
            // Record before confirming: a crash after the mint took the melt still leaves a
            // row whose quote id the next start finalises.
            let id = match record(invoice_amount, 0, "pending", Some(&quote.id), None) {
                Ok(id) => id,
                Err(e) => {
                    let _ = prepared.cancel().await;
                    return Err(e);
                }
            };
            self.hook("melt:recorded");
            // Reserved: the round trips run without the mint lock — unless the inputs cdk
            // picked (it over-selects, the excess comes back as change after the melt's
            // swap) took value that reservations still need: then a reserved payment would
            // find too little until the melt returns, so the lock stays held for this melt.
            let short = match (self.balance_of(state).await, self.reserved_of(key)) {
                (Ok(unspent), Ok(reserved)) => unspent < reserved,
                _ => true, // cannot tell: keep it
            };
            let guard = short.then_some(guard);
            // The pre-melt swap's fee, on inputs already chosen: exact. cdk's `fee_paid`
            // covers the rest (Lightning fee + the melt's input fee).
            let swap_fee = u64::from(prepared.swap_fee());
            let confirmed = prepared.confirm_prefer_async().await;
            self.hook("melt:confirmed");
            let outcome = match confirmed {
                // The mint answered asynchronously: give Lightning a moment, then leave the
                // rest to finalize_pending_payouts (the melt saga stays in cdk's database).
                Ok(MeltOutcome::Pending(pending)) => {
                    match tokio::time::timeout(PENDING_WAIT, pending).await {
                        Ok(r) => r.map(Some),
                        Err(_) => Ok(None),
                    }
                }
                Ok(MeltOutcome::Paid(done)) => Ok(Some(done)),
                Err(e) => Err(e),
            };
            drop(in_flight);
            drop(guard);
            return match outcome {
                Ok(Some(done)) => {
                    // What left the wallet beyond the invoice, from this melt's own proofs:
                    // the balance may have moved meanwhile (the lock is not held).
                    let fee = u64::from(done.fee_paid()) + swap_fee;
                    let state = match done.state() {
                        MeltQuoteState::Paid => "paid",
                        MeltQuoteState::Pending | MeltQuoteState::Unknown => "pending",
                        _ => "failed",
                    };
                    self.inner.store.update_payout(id, fee, state, None)?;
                    Ok(state != "failed")
                }
                Ok(None) => Ok(true),
                Err(e) => {
                    self.inner
                        .store
                        .update_payout(id, 0, "failed", Some(&e.to_string()))?;
                    Ok(false)
                }
            };
        }
        record(
            invoice_amount,
            0,
            "skipped",
            None,
            Some("fees exceed the share"),
        )?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::ProfitShare;
    use super::*;

    fn share(id: &str, f: f64) -> ProfitShare {
        ProfitShare {
            identity: id.to_string(),
            factor: f,
            lightning_address: format!("{id}@example.com"),
        }
    }

    #[test]
    fn split_owner_first_rounds_down() {
        let s = split(1001, &[share("dev", 0.21), share("owner", 0.79)]);
        assert_eq!(s[0].0.identity, "owner");
        assert_eq!(s[0].1, 790);
        assert_eq!(s[1].1, 210);
        assert!(s.iter().map(|x| x.1).sum::<u64>() <= 1001);
    }
}
