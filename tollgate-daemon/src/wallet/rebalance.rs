//! Cross-mint rebalancing: move `amount` sat from a source mint to a target mint over
//! Lightning, as a saga with a durable record in the ledger (`rebalances` table).
//!
//! ```text
//! mint quote (bolt11, amount) on the target ─> lock(source) ─> melt quote on the source for
//! that invoice ─> prepare melt ─> fee ≤ budget? ── no ─> cancel (nothing moved)
//!   └ yes ─> row 'melting' {both quote ids} ─> confirm melt ─> paid? ─> row 'minting'
//!      ─> lock(target) ─> invoice paid at the target? ─> mint ─> [hold] ─> row 'done'
//! ```
//! Every irreversible step is preceded by the row that lets recovery finish it: the melt (the
//! money leaves the source) by `melting`, the mint (the money appears at the target) by
//! `minting`. Recovery at every open (after cdk's own saga recovery) and before every new
//! rebalance settles the open rows by asking the mints:
//!
//! | state     | meaning                                  | recovery                             |
//! |-----------|------------------------------------------|--------------------------------------|
//! | `melting` | melt about to be sent, or sent           | source says paid → `minting`; unpaid or failed with no melt in flight → `failed`; pending → wait |
//! | `minting` | the source paid the target's invoice     | target quote paid → mint → `done`; issued → `done`; unpaid → wait |
//! | `done`    | minted at the target; `fee` = source loss − amount | —                          |
//! | `failed`  | the melt never paid: the amount (and the fee reserve) stayed at the source | — |
//!
//! So after a kill at any point the amount is at exactly one side: at the source until the
//! source's melt quote is paid, at the target (as a paid quote, then as proofs) after.
//! Reservations: the source's lock is held from the balance check to the melt, so a payout
//! can never spend the same proofs; the melted proofs leave the balance at once. With a
//! hold ([`Wallet::rebalance_and_hold`]) the minted amount is reserved at the target inside
//! the target's lock, so a payout tick cannot take it before the caller's purchase.

use std::collections::HashMap;
use std::time::Duration;

use cdk::amount::SplitTarget;
use cdk::nuts::{MeltQuoteState, MintQuoteState, PaymentMethod};

use super::{store, MintState, Reservation, Wallet, WalletError};

/// How long a rebalance waits for the target mint to see its invoice paid before leaving
/// the row `minting` for the next open (or the next rebalance) to finish.
const PAID_WAIT: Duration = Duration::from_secs(20);

/// One rebalance, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebalanceRecord {
    pub id: String,
    /// Canonical URL of the mint the amount leaves.
    pub source: String,
    /// Canonical URL of the mint the amount arrives at.
    pub target: String,
    /// What arrives at the target.
    pub amount: u64,
    /// What the source lost beyond `amount` (Lightning fee + input fees); 0 until `done`.
    pub fee: u64,
    pub mint_quote_id: String,
    pub melt_quote_id: String,
    /// `melting`, `minting`, `done` or `failed` (see the module doc).
    pub state: String,
    pub message: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
}

impl Wallet {
    /// Move `amount` to `to`, from `from` or else from the other accepted mint with the most
    /// available, within the fee budget (`rebalance_fee_budget_percent` of the amount + 1 sat).
    /// Returns the record: `done`, or `minting` if the target has not seen the payment yet
    /// (finished later by recovery).
    pub async fn rebalance(
        &self,
        to: &str,
        amount: u64,
        from: Option<&str>,
    ) -> Result<RebalanceRecord, WalletError> {
        self.rebalance_inner(to, amount, from, None)
            .await
            .map(|(r, _)| r)
    }

    /// Like [`Wallet::rebalance`], and once minted keeps the amount reserved at the target:
    /// added to `hold` when it is a live reservation there, else as a new reservation with
    /// the default lifetime. `None` if the rebalance did not reach `done`.
    pub async fn rebalance_and_hold(
        &self,
        to: &str,
        amount: u64,
        from: Option<&str>,
        hold: Option<&Reservation>,
    ) -> Result<(RebalanceRecord, Option<Reservation>), WalletError> {
        self.rebalance_inner(to, amount, from, Some(hold)).await
    }

    /// Every rebalance ever recorded, oldest first.
    pub fn rebalances(&self) -> Result<Vec<RebalanceRecord>, WalletError> {
        self.inner.store.rebalances(false)
    }

    /// Whether the upstream buyer may rebalance by itself (`rebalance.auto`).
    pub fn auto_rebalance(&self) -> bool {
        self.inner.settings.auto_rebalance
    }

    /// The most a rebalance of `amount` may cost in fees.
    pub fn rebalance_fee_budget(&self, amount: u64) -> u64 {
        amount.saturating_mul(self.inner.settings.rebalance_fee_budget_percent) / 100 + 1
    }

    async fn rebalance_inner(
        &self,
        to: &str,
        amount: u64,
        from: Option<&str>,
        hold: Option<Option<&Reservation>>,
    ) -> Result<(RebalanceRecord, Option<Reservation>), WalletError> {
        if amount == 0 {
            return Err(WalletError::InvalidRequest {
                message: "rebalance amount must be at least 1".to_string(),
            });
        }
        // Finish what an earlier attempt left open first: its amount may be what we need.
        self.recover_rebalances().await;
        let target = self.mint_state(to)?;
        let target_key = target.url.to_string();
        let budget = self.rebalance_fee_budget(amount);
        let source = match from {
            Some(f) => self.mint_state(f)?,
            None => self.pick_source(&target_key, amount + budget).await?,
        };
        let source_key = source.url.to_string();
        if source_key == target_key {
            return Err(WalletError::InvalidRequest {
                message: format!("source and target are the same mint ({target_key})"),
            });
        }

        let sw = self.cdk_wallet(source).await?;
        // Costs nothing: an unpaid quote at the target simply expires.
        let quote = self.create_mint_quote(&target_key, amount).await?;

        let mut record = {
            let _guard = source.lock.lock().await;
            let _in_flight = source.in_flight.read().await;
            let balance = self.balance_of(source).await?;
            let available = self.spendable(source, balance)?;
            if available < amount + budget {
                return Err(WalletError::InsufficientFunds {
                    mint: source_key,
                    needed: amount + budget,
                    available,
                });
            }
            let melt_quote = sw
                .melt_quote(PaymentMethod::BOLT11, &quote.request, None, None)
                .await
                .map_err(|e| WalletError::from_cdk(&source_key, e))?;
            if u64::from(melt_quote.amount) != amount {
                return Err(WalletError::MintUnavailable {
                    mint: source_key,
                    message: format!(
                        "melt quote for {} sat instead of {amount}",
                        melt_quote.amount
                    ),
                });
            }
            let prepared = sw
                .prepare_melt(&melt_quote.id, HashMap::new())
                .await
                .map_err(|e| WalletError::from_cdk(&source_key, e))?;
            let max_fee: u64 = (melt_quote.fee_reserve + prepared.total_fee()).into();
            if max_fee > budget {
                let _ = prepared.cancel().await;
                return Err(WalletError::FeeBudget {
                    fee: max_fee,
                    budget,
                });
            }
            let mut record = RebalanceRecord {
                id: uuid::Uuid::new_v4().to_string(),
                source: source_key.clone(),
                target: target_key.clone(),
                amount,
                fee: 0,
                mint_quote_id: quote.id.clone(),
                melt_quote_id: melt_quote.id.clone(),
                state: "melting".to_string(),
                message: None,
                created_at: store::now_ms() / 1000,
            };
            // Write-ahead: from here a crash is settled by the source's melt quote state.
            if let Err(e) = self.inner.store.put_rebalance(&record) {
                let _ = prepared.cancel().await;
                return Err(e);
            }
            self.hook("rebalance:recorded");
            let confirmed = prepared.confirm().await;
            self.hook("rebalance:melted");
            match confirmed {
                Ok(done) if done.state() == MeltQuoteState::Paid => {
                    let after = self.balance_of(source).await?;
                    let fee = balance.saturating_sub(after).saturating_sub(amount);
                    self.set_state(&mut record, "minting", Some(fee), None)?;
                }
                Ok(done) if done.state() == MeltQuoteState::Failed => {
                    self.set_state(&mut record, "failed", None, Some("payment failed"))?;
                    return Err(WalletError::MintUnavailable {
                        mint: source_key,
                        message: "the Lightning payment to the target failed".to_string(),
                    });
                }
                // Pending, or an error after which we cannot tell: recovery decides.
                Ok(_) | Err(_) => {
                    drop(_guard);
                    self.settle_melting(&mut record).await?;
                    if record.state != "minting" {
                        return Ok((record, None));
                    }
                }
            }
            record
        };
        self.hook("rebalance:paid");
        let held = self.finish_minting(&mut record, PAID_WAIT, hold).await?;
        Ok((record, held))
    }

    /// `balance − min_balance − reserved`: what may leave this mint.
    fn spendable(&self, state: &MintState, balance: u64) -> Result<u64, WalletError> {
        Ok(balance
            .saturating_sub(state.settings.min_balance)
            .saturating_sub(self.reserved_of(&state.url.to_string())?))
    }

    /// The other accepted mint with the most spendable funds, if it has `needed`.
    async fn pick_source(&self, target: &str, needed: u64) -> Result<&MintState, WalletError> {
        let mut best: Option<(&MintState, u64)> = None;
        for (key, state) in &self.inner.mints {
            if key == target {
                continue;
            }
            let spendable = self.spendable(state, self.balance_of(state).await?)?;
            if best.is_none_or(|(_, b)| spendable > b) {
                best = Some((state, spendable));
            }
        }
        match best {
            Some((state, spendable)) if spendable >= needed => Ok(state),
            other => Err(WalletError::InsufficientFunds {
                mint: "any other accepted mint".to_string(),
                needed,
                available: other.map_or(0, |(_, b)| b),
            }),
        }
    }

    fn set_state(
        &self,
        record: &mut RebalanceRecord,
        state: &str,
        fee: Option<u64>,
        message: Option<&str>,
    ) -> Result<(), WalletError> {
        self.inner
            .store
            .set_rebalance_state(&record.id, state, fee, message)?;
        record.state = state.to_string();
        if let Some(f) = fee {
            record.fee = f;
        }
        if let Some(m) = message {
            record.message = Some(m.to_string());
        }
        Ok(())
    }

    /// A `melting` row: did the source pay? Asks the source mint (cdk resumes or compensates
    /// its melt saga on the way). Leaves the row as it is while the payment is pending.
    async fn settle_melting(&self, record: &mut RebalanceRecord) -> Result<(), WalletError> {
        let source = self.mint_state(&record.source)?;
        let _guard = source.lock.lock().await;
        let sw = self.cdk_wallet(source).await?;
        let quote = sw
            .check_melt_quote_status(&record.melt_quote_id)
            .await
            .map_err(|e| WalletError::from_cdk(&record.source, e))?;
        match quote.state {
            MeltQuoteState::Paid => self.set_state(record, "minting", None, None),
            MeltQuoteState::Failed if !self.melt_in_flight(&record.melt_quote_id).await => {
                self.set_state(record, "failed", None, Some("payment failed"))
            }
            // Never reached the mint (killed before the melt request) or rolled back: the
            // proofs are back in the wallet, nothing is in flight.
            MeltQuoteState::Unpaid if !self.melt_in_flight(&record.melt_quote_id).await => {
                self.set_state(record, "failed", None, Some("the melt was never sent"))
            }
            _ => Ok(()),
        }
    }

    /// A `minting` row: wait up to `wait` for the target to see its invoice paid, mint, and
    /// (with `hold`) reserve the minted amount at the target in the same lock.
    async fn finish_minting(
        &self,
        record: &mut RebalanceRecord,
        wait: Duration,
        hold: Option<Option<&Reservation>>,
    ) -> Result<Option<Reservation>, WalletError> {
        let target = self.mint_state(&record.target)?;
        let tw = self.cdk_wallet(target).await?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = Duration::from_millis(50);
        let _guard = loop {
            let guard = target.lock.lock().await;
            let quote = tw
                .check_mint_quote_status(&record.mint_quote_id)
                .await
                .map_err(|e| WalletError::from_cdk(&record.target, e))?;
            match quote.state {
                MintQuoteState::Issued => {
                    self.set_state(record, "done", None, None)?;
                    return Ok(None);
                }
                MintQuoteState::Paid => break guard,
                MintQuoteState::Unpaid => {}
            }
            drop(guard);
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(id = %record.id, target = %record.target,
                    "rebalance paid at the source but not seen at the target yet; recovery will mint it");
                return Ok(None);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        };
        tw.mint(&record.mint_quote_id, SplitTarget::default(), None)
            .await
            .map_err(|e| WalletError::from_cdk(&record.target, e))?;
        self.hook("rebalance:minted");
        let held = match hold {
            None => None,
            Some(existing) => Some(self.hold_minted(&record.target, record.amount, existing)?),
        };
        self.set_state(record, "done", None, None)?;
        Ok(held)
    }

    /// Reserve `amount` at `mint` (caller holds the mint's lock): grow `existing` if it is a
    /// live reservation there, else a new one.
    fn hold_minted(
        &self,
        mint: &str,
        amount: u64,
        existing: Option<&Reservation>,
    ) -> Result<Reservation, WalletError> {
        let expires = store::now_ms() + self.reservation_ttl().as_millis() as u64;
        if let Some(r) = existing.filter(|r| r.mint == mint) {
            if self.inner.store.grow_reservation(&r.id, amount, expires)? {
                return Ok(Reservation {
                    id: r.id.clone(),
                    mint: r.mint.clone(),
                    amount: r.amount + amount,
                });
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        self.inner
            .store
            .put_reservation(&id, mint, amount, expires)?;
        Ok(Reservation {
            id,
            mint: mint.to_string(),
            amount,
        })
    }

    /// Settle every open rebalance (at open, and before each new one). A mint that is down
    /// leaves its rows open for the next try.
    pub(crate) async fn recover_rebalances(&self) {
        let rows = match self.inner.store.rebalances(true) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "reading open rebalances");
                return;
            }
        };
        for mut row in rows {
            if row.state == "melting" {
                if let Err(e) = self.settle_melting(&mut row).await {
                    tracing::warn!(id = %row.id, error = %e, "rebalance: checking the melt");
                    continue;
                }
            }
            if row.state == "minting" {
                if let Err(e) = self.finish_minting(&mut row, Duration::ZERO, None).await {
                    tracing::warn!(id = %row.id, error = %e, "rebalance: minting at the target");
                }
            }
            tracing::info!(id = %row.id, source = %row.source, target = %row.target,
                amount = row.amount, state = %row.state, "recovered rebalance");
        }
    }
}
