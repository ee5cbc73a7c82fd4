//! Crash recovery at every open, in this order: cdk's saga recovery and pending melts →
//! the proofs that recovery released from its sagas, checked with the mint (cdk releases them
//! on local state alone; a send killed inside its swap would count the spent inputs again) →
//! our own proofs left reserved/pending without a saga, settled by NUT-07 → pending receipts
//! → outgoing tokens still `creating` (never handed out) revoked → `pending` payouts whose
//! melt never reached the mint marked `failed` → rebalances. `tests/tests/wallet_crash.rs`
//! SIGKILLs a harness process at each step and checks the result against the mint.
//!
//! | what a crash left                              | settled by                              |
//! |------------------------------------------------|-----------------------------------------|
//! | a cdk saga (send, receive, swap, melt)         | cdk's `recover_incomplete_sagas`        |
//! | our proofs held by a saga, released unspent    | NUT-07: spent ones marked spent         |
//! | our proofs reserved/pending with no saga       | NUT-07: unspent → spendable, spent → spent |
//! | a receipt `pending`                            | [`receive`](super::receive)'s resolution |
//! | an outgoing token `creating`                   | revoked (`reclaimed`) or `failed`       |
//! | an outgoing token `issued` whose saga is gone  | `claimed`                               |
//! | a payout `pending` / a rebalance row           | [`payout`](super::payout), [`rebalance`](super::rebalance) |
//!
//! A mint that is down is logged and skipped: its sagas stay and are retried next start.

use cdk::cdk_database::WalletDatabase;
use cdk::nuts::{CheckStateRequest, PublicKey, State};

use super::{storage, unit_of, MintState, Wallet, WalletError};

impl Wallet {
    /// Start-up recovery: cdk sagas, pending melts, our pending receipts, stale reservations.
    /// A mint that is down is logged and skipped: its sagas stay and are retried next start.
    pub(super) async fn recover(&self) -> Result<(), WalletError> {
        for state in self.inner.mints.values() {
            let w = self.cdk_wallet(state).await?;
            self.adopt_swapped_token_proofs(state).await?;
            let held = self.held_by_open_sagas(state).await?;
            match w.recover_incomplete_sagas().await {
                Ok(report) => tracing::info!(mint = %state.url, ?report, "saga recovery"),
                Err(e) => tracing::warn!(mint = %state.url, error = %e, "saga recovery failed"),
            }
            if let Err(e) = w.finalize_pending_melts().await {
                tracing::warn!(mint = %state.url, error = %e, "finalising pending melts failed");
            }
            if let Err(e) = self.verify_released_proofs(state, &w, held).await {
                tracing::warn!(mint = %state.url, error = %e, "verifying released proofs failed");
            }
            if let Err(e) = self.release_orphaned_proofs(state, &w).await {
                tracing::warn!(mint = %state.url, error = %e, "releasing orphaned proofs failed");
            }
        }
        for (token_id, token) in self.inner.store.pending_receipts()? {
            if let Err(e) = self.resolve_pending_receipt(&token_id, &token).await {
                tracing::warn!(%token_id, error = %e, "pending receipt unresolved");
            }
        }
        self.recover_unissued_tokens().await?;
        self.inner.store.prune_reservations()?;
        self.finalize_pending_payouts().await;
        self.recover_rebalances().await;
        Ok(())
    }

    /// cdk reserves proofs *before* it writes the saga that would release them (send, swap
    /// and melt `prepare`): a crash in between leaves our own proofs `Reserved` with no
    /// saga, which no recovery ever looks at — the balance silently drops by them. After
    /// saga recovery, any of our proofs (deterministic, so derived from our seed) still
    /// reserved or pending without an open saga is settled by the mint's word (NUT-07):
    /// unspent → spendable again, spent → spent. Foreign proofs (a customer's, mid-receive)
    /// are left to the receipt logic.
    pub(super) async fn release_orphaned_proofs(
        &self,
        state: &MintState,
        w: &cdk::Wallet,
    ) -> Result<(), WalletError> {
        let orphans: Vec<PublicKey> = self
            .own_held_proofs(state)
            .await?
            .into_iter()
            .filter(|(_, by_saga)| !by_saga)
            .map(|(y, _)| y)
            .collect();
        if orphans.is_empty() {
            return Ok(());
        }
        let (unspent, spent) = self.settle_by_mint(state, w, orphans).await?;
        tracing::warn!(
            mint = %state.url,
            released = unspent,
            spent,
            "settled proofs a crash left reserved without a saga"
        );
        Ok(())
    }

    /// A token's proofs that came out of the send's swap are stored by cdk's swap with no
    /// owning operation, so cdk's send recovery — which judges "claimed" from the proofs the
    /// send owns — sees only the swap's inputs (spent by that swap) and deletes the saga of a
    /// token nobody redeemed: it could never be reclaimed and its proofs stayed pending-spent
    /// for good. Before recovery, give those proofs to their send saga (cdk's saga data lists
    /// the token's proofs), so "claimed" means the token's own proofs are spent.
    pub(super) async fn adopt_swapped_token_proofs(
        &self,
        state: &MintState,
    ) -> Result<(), WalletError> {
        use cdk::wallet::types::{OperationData, SendSagaState, WalletSagaState};
        let db = &self.inner.db;
        for saga in db.get_incomplete_sagas().await.map_err(storage)? {
            let (
                WalletSagaState::Send(SendSagaState::TokenCreated | SendSagaState::RollingBack),
                OperationData::Send(data),
            ) = (&saga.state, &saga.data)
            else {
                continue;
            };
            let Some(proofs) = data.proofs.as_ref().filter(|_| saga.mint_url == state.url) else {
                continue;
            };
            let ys = proofs
                .iter()
                .map(|p| p.y())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| WalletError::InvalidToken {
                    reason: e.to_string(),
                })?;
            let ownerless: Vec<_> = db
                .get_proofs_by_ys(ys)
                .await
                .map_err(storage)?
                .into_iter()
                .filter(|p| p.used_by_operation.is_none() && p.state != State::Unspent)
                .map(|mut p| {
                    p.used_by_operation = Some(saga.id);
                    p
                })
                .collect();
            if !ownerless.is_empty() {
                db.update_proofs(ownerless, Vec::new())
                    .await
                    .map_err(storage)?;
            }
        }
        Ok(())
    }

    /// Our own proofs (derived from our seed) that an open cdk saga holds reserved or pending:
    /// taken before cdk's saga recovery, for [`Wallet::verify_released_proofs`] after it.
    pub(super) async fn held_by_open_sagas(
        &self,
        state: &MintState,
    ) -> Result<Vec<PublicKey>, WalletError> {
        Ok(self
            .own_held_proofs(state)
            .await?
            .into_iter()
            .filter(|(_, by_saga)| *by_saga)
            .map(|(y, _)| y)
            .collect())
    }

    /// Our own proofs (derived from our seed; a customer's mid-receive are not) of this mint
    /// that are reserved or pending, each with whether an open cdk saga holds it.
    async fn own_held_proofs(
        &self,
        state: &MintState,
    ) -> Result<Vec<(PublicKey, bool)>, WalletError> {
        let db = &self.inner.db;
        let open: Vec<uuid::Uuid> = db
            .get_incomplete_sagas()
            .await
            .map_err(storage)?
            .into_iter()
            .map(|s| s.id)
            .collect();
        Ok(db
            .get_proofs(
                Some(state.url.clone()),
                Some(unit_of(&state.settings.unit)?),
                Some(vec![State::Reserved, State::Pending, State::PendingSpent]),
                None,
            )
            .await
            .map_err(storage)?
            .into_iter()
            .filter(|p| p.derivation_index.is_some())
            .map(|p| {
                (
                    p.y,
                    p.used_by_operation.is_some_and(|op| open.contains(&op)),
                )
            })
            .collect())
    }

    /// cdk's saga recovery releases a saga's reserved proofs from the local state alone: a
    /// send that died inside its swap (the swap's inputs are reserved under the *send's* id,
    /// so the swap's own recovery restores the outputs but never marks those inputs spent)
    /// gets its compensation, and the spent inputs come back as unspent — counted twice next
    /// to the restored outputs. Of the proofs `held` before recovery, those it made unspent
    /// are settled by the mint's word (NUT-07). If the mint cannot answer, they are kept
    /// pending (not counted) for the next open to settle: never count what may be spent.
    pub(super) async fn verify_released_proofs(
        &self,
        state: &MintState,
        w: &cdk::Wallet,
        held: Vec<PublicKey>,
    ) -> Result<(), WalletError> {
        if held.is_empty() {
            return Ok(());
        }
        let db = &self.inner.db;
        let released: Vec<PublicKey> = db
            .get_proofs_by_ys(held)
            .await
            .map_err(storage)?
            .into_iter()
            .filter(|p| p.state == State::Unspent)
            .map(|p| p.y)
            .collect();
        if released.is_empty() {
            return Ok(());
        }
        match self.settle_by_mint(state, w, released.clone()).await {
            Ok((_, 0)) => Ok(()),
            Ok((_, spent)) => {
                tracing::warn!(
                    mint = %state.url,
                    spent,
                    "saga recovery released proofs the mint says are spent; marked spent"
                );
                Ok(())
            }
            Err(e) => {
                db.update_proofs_state(released, State::Pending)
                    .await
                    .map_err(storage)?;
                Err(e)
            }
        }
    }

    /// Set each of `ys` to the state the mint reports for it (NUT-07): unspent, spent, or
    /// pending (not counted; settled at a later open). Returns how many were unspent / spent.
    pub(super) async fn settle_by_mint(
        &self,
        state: &MintState,
        w: &cdk::Wallet,
        ys: Vec<PublicKey>,
    ) -> Result<(usize, usize), WalletError> {
        let states = w
            .mint_connector()
            .post_check_state(CheckStateRequest { ys: ys.clone() })
            .await
            .map_err(|e| WalletError::from_cdk(&state.settings.url, e))?;
        let pick = |want: State| -> Vec<PublicKey> {
            states
                .states
                .iter()
                .filter(|s| s.state == want && ys.contains(&s.y))
                .map(|s| s.y)
                .collect()
        };
        let (unspent, spent, pending) = (
            pick(State::Unspent),
            pick(State::Spent),
            pick(State::Pending),
        );
        let counts = (unspent.len(), spent.len());
        for (ys, to) in [
            (unspent, State::Unspent),
            (spent, State::Spent),
            (pending, State::Pending),
        ] {
            if !ys.is_empty() {
                self.inner
                    .db
                    .update_proofs_state(ys, to)
                    .await
                    .map_err(storage)?;
            }
        }
        Ok(counts)
    }

    /// Tokens created but never handed out (crash between cdk's confirm and our return):
    /// nobody else can hold them, so take them back. A row whose cdk saga is gone was
    /// compensated by cdk itself (the crash came before the token existed).
    pub(super) async fn recover_unissued_tokens(&self) -> Result<(), WalletError> {
        // Issued tokens whose cdk saga is gone were settled (redeemed by the payee; cdk's
        // recovery saw the proofs spent): say so, so the ledger does not offer them for
        // reclaiming.
        for (op_id, _) in self.inner.store.outgoing_in_state("issued")? {
            let Ok(uuid) = uuid::Uuid::parse_str(&op_id) else {
                continue;
            };
            if let Ok(None) = self.inner.db.get_saga(&uuid).await {
                self.inner.store.set_outgoing_state(&op_id, "claimed")?;
            }
        }
        for (op_id, mint) in self.inner.store.outgoing_in_state("creating")? {
            let Ok(state) = self.mint_state(&mint) else {
                continue;
            };
            let Ok(uuid) = uuid::Uuid::parse_str(&op_id) else {
                self.inner.store.set_outgoing_state(&op_id, "failed")?;
                continue;
            };
            let saga = self.inner.db.get_saga(&uuid).await.map_err(storage)?;
            if saga.is_none() {
                tracing::info!(%op_id, "unissued token never created; nothing to reclaim");
                self.inner.store.set_outgoing_state(&op_id, "failed")?;
                continue;
            }
            let _guard = state.lock.lock().await;
            let w = self.cdk_wallet(state).await?;
            match w.revoke_send(uuid).await {
                Ok(amount) => {
                    tracing::info!(%op_id, %amount, "reclaimed a token a crash kept from its payee");
                    self.inner.store.set_outgoing_state(&op_id, "reclaimed")?;
                }
                // Mint down or the saga is mid-rollback: the row stays, next open retries.
                Err(e) => tracing::warn!(%op_id, error = %e, "reclaiming unissued token"),
            }
        }
        Ok(())
    }
}
