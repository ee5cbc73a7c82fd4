//! Receiving customers' tokens: decoded offline ([`decode_token`]), checked with the mint
//! (NUT-07), written ahead as a receipt, swapped. Idempotent per proof set (the token id is a
//! hash of the sorted secrets), and a receipt credits its [`Receiver`] only.
//!
//! ```text
//! token ─decode─> receipt? ─ none ─> NUT-07 ─> row 'pending' ─> swap ─> 'done' (net)
//!                           └ found ─> by state (below)
//! ```
//!
//! | state   | meaning                          | on a repeated `receive` / restart             |
//! |---------|----------------------------------|-----------------------------------------------|
//! | pending | swap may be in flight            | resolved: cdk tx record, else NUT-07 + retry  |
//! | done    | credited `net`                   | returns the first receipt, `replayed = true`; |
//! |         |                                  | `TokenSpent` to another [`Receiver`]          |
//! | spent   | someone else spent the proofs    | `TokenSpent` again                            |

use std::str::FromStr;
use std::sync::Arc;

use cdk::amount::SplitTarget;
use cdk::cdk_database::WalletDatabase;
use cdk::nuts::{CheckStateRequest, PublicKey, State, Token};
use cdk::wallet::ReceiveOptions;
use sha2::{Digest, Sha256};

use super::store::ReceiptState;
use super::{Receipt, Receiver, TokenInfo, Wallet, WalletError, MAX_TOKEN_LEN};

/// Y = hash_to_curve(secret) of each proof: how the mint (NUT-07) and cdk's records name them.
pub(super) fn token_ys(token: &Token) -> Result<Vec<PublicKey>, WalletError> {
    token
        .token_secrets()
        .into_iter()
        .map(|s| {
            cdk::dhke::hash_to_curve(s.as_bytes()).map_err(|e| WalletError::InvalidToken {
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Decodes and checks a customer's token without network access: the one token parser
/// behind [`Wallet::inspect`] and [`Wallet::receive`] (public so `fuzz/` drives it).
/// `accepted_unit(mint)` is the unit we take at `mint` (canonical URL), `None` if we do not
/// accept that mint.
pub fn decode_token<'a>(
    raw: &str,
    accepted_unit: impl Fn(&str) -> Option<&'a str>,
) -> Result<(TokenInfo, Token), WalletError> {
    if raw.len() > MAX_TOKEN_LEN {
        return Err(WalletError::InvalidToken {
            reason: format!("longer than {MAX_TOKEN_LEN} bytes"),
        });
    }
    // The one place that knows a token's text form (whitespace, a `cashu:` URI prefix).
    let s = crate::protocol::normalize_token(raw).map_err(|e| WalletError::InvalidToken {
        reason: match e {
            crate::protocol::ProtocolError::InvalidToken { reason } => reason,
            other => other.to_string(),
        },
    })?;
    let token = Token::from_str(&s).map_err(|e| WalletError::InvalidToken {
        reason: e.to_string(),
    })?;
    if let Token::TokenV3(v3) = &token {
        if v3.is_multi_mint() {
            return Err(WalletError::InvalidToken {
                reason: "multi-mint token".to_string(),
            });
        }
    }
    let mint = token
        .mint_url()
        .map_err(|e| WalletError::InvalidToken {
            reason: e.to_string(),
        })?
        .to_string();
    let accepted =
        accepted_unit(&mint).ok_or_else(|| WalletError::MintNotAccepted { mint: mint.clone() })?;
    let unit = token.unit().unwrap_or_default().to_string();
    if unit != accepted {
        return Err(WalletError::WrongUnit { unit });
    }
    // Any NUT-10 secret (P2PK, HTLC) is a condition we would have to satisfy: reject all.
    let conditions = token
        .spending_conditions()
        .map_err(|e| WalletError::InvalidToken {
            reason: e.to_string(),
        })?;
    let secrets = token.token_secrets();
    if !conditions.is_empty() || secrets.iter().any(|s| s.as_bytes().first() == Some(&b'[')) {
        return Err(WalletError::Locked);
    }
    if secrets.is_empty() {
        return Err(WalletError::InvalidToken {
            reason: "no proofs".to_string(),
        });
    }
    let amount: u64 = token
        .value()
        .map_err(|e| WalletError::InvalidToken {
            reason: e.to_string(),
        })?
        .into();
    let mut sorted: Vec<&[u8]> = secrets.iter().map(|s| s.as_bytes()).collect();
    sorted.sort_unstable();
    let mut h = Sha256::new();
    for s in sorted {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s);
    }
    let token_id = h
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Ok((
        TokenInfo {
            token_id,
            mint,
            unit,
            amount,
        },
        token,
    ))
}

impl Wallet {
    /// Decode and check a token without touching the network.
    pub fn inspect(&self, token: &str) -> Result<TokenInfo, WalletError> {
        let (info, _) = self.decode(token)?;
        Ok(info)
    }

    pub(super) fn decode(&self, raw: &str) -> Result<(TokenInfo, Token), WalletError> {
        decode_token(raw, |mint| {
            self.inner
                .mints
                .get(mint)
                .map(|state| state.settings.unit.as_str())
        })
    }

    /// Redeem a customer's token. Idempotent per proof set: a repeated call returns the first
    /// receipt with `replayed = true`.
    pub async fn receive(&self, token: &str) -> Result<Receipt, WalletError> {
        self.receive_as(token, Receiver::Operator).await
    }

    /// [`Wallet::receive`] on behalf of `by`. A token already received by someone else is
    /// `TokenSpent` to `by` rather than a replay: the check is made under the token's lock,
    /// with the receive, so an operator's `wallet receive` and a customer's payment racing with
    /// the same token credit it once (the merchant's earlier `has_receipt` check alone left a
    /// window between the check and the receive).
    pub async fn receive_as(&self, token: &str, by: Receiver) -> Result<Receipt, WalletError> {
        let (info, parsed) = self.decode(token)?;
        // Serialise receives of the same proofs; different tokens run in parallel.
        let lock = {
            let mut map = self
                .inner
                .receiving
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            map.entry(info.token_id.clone()).or_default().clone()
        };
        let result = {
            let _guard = lock.lock().await;
            self.receive_locked(&info, &parsed, token.trim(), by).await
        };
        {
            let mut map = self
                .inner
                .receiving
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // Only the map and we hold it: nobody else is waiting, drop the entry.
            if Arc::strong_count(&lock) == 2 {
                map.remove(&info.token_id);
            }
        }
        result
    }

    pub(super) async fn receive_locked(
        &self,
        info: &TokenInfo,
        parsed: &Token,
        raw: &str,
        by: Receiver,
    ) -> Result<Receipt, WalletError> {
        let receipt = |gross, net, replayed| Receipt {
            token_id: info.token_id.clone(),
            mint: info.mint.clone(),
            unit: info.unit.clone(),
            gross,
            net,
            replayed,
        };
        if let Some(row) = self.inner.store.receipt(&info.token_id)? {
            // Credited to someone else: spent, as far as `by` is concerned.
            let theirs = row.receiver.as_deref().is_some_and(|r| r != by.as_str());
            match row.state {
                ReceiptState::Done { .. } if theirs => return Err(WalletError::TokenSpent),
                ReceiptState::Done { gross, net } => return Ok(receipt(gross, net, true)),
                ReceiptState::Spent => return Err(WalletError::TokenSpent),
                ReceiptState::Pending => {
                    if let Some((gross, net)) = self
                        .resolve_pending_receipt(&info.token_id, &row.token)
                        .await?
                    {
                        if theirs {
                            return Err(WalletError::TokenSpent);
                        }
                        return Ok(receipt(gross, net, true));
                    }
                    // Resolved as "never swapped": fall through and receive now.
                }
            }
        }
        let state = self.mint_state(&info.mint)?;
        let w = self.cdk_wallet(state).await?;
        let ys = token_ys(parsed)?;

        // NUT-07 first: receiving a spent token would leave cdk with a stuck saga.
        let states = w
            .mint_connector()
            .post_check_state(CheckStateRequest { ys: ys.clone() })
            .await
            .map_err(|e| WalletError::from_cdk(&info.mint, e))?;
        if states.states.iter().any(|s| s.state == State::Spent) {
            return Err(WalletError::TokenSpent);
        }
        if states.states.iter().any(|s| s.state == State::Pending) {
            return Err(WalletError::TokenPending);
        }

        // Write-ahead: from here on a crash is resolved by resolve_pending_receipt.
        self.inner.store.put_receipt_pending(
            &info.token_id,
            &info.mint,
            &info.unit,
            raw,
            by.as_str(),
        )?;
        self.hook("receive:pending");
        // Least proofs, decided without the wallet: cdk's default (`SplitTarget::None`) loads
        // and parses every unspent proof to refill a stock of denominations, so each payment
        // got slower as the wallet filled (≈ 3× after 1 500 payments, debug build). An empty
        // `Values` list splits the whole amount into powers of two; sends swap when they must.
        let options = ReceiveOptions {
            amount_split_target: SplitTarget::Values(Vec::new()),
            ..ReceiveOptions::default()
        };
        match w.receive(raw, options).await {
            Ok(net) => {
                self.hook("receive:swapped");
                let net: u64 = net.into();
                self.inner
                    .store
                    .set_receipt_done(&info.token_id, info.amount, net)?;
                Ok(receipt(info.amount, net, false))
            }
            Err(cdk::Error::TokenAlreadySpent) | Err(cdk::Error::TokenPending) => {
                // Lost a race against another spender after the NUT-07 check.
                self.cleanup_foreign_receive(&w, &ys).await;
                self.inner.store.set_receipt_spent(&info.token_id)?;
                Err(WalletError::TokenSpent)
            }
            Err(e) => {
                let err = WalletError::from_cdk(&info.mint, e);
                // Ambiguous (the mint may have swapped): keep the row pending; the next call
                // or the next start resolves it. Definitive: cdk compensated, forget it.
                if let Ok(None) = self.resolve_pending_receipt(&info.token_id, raw).await {
                    self.inner.store.delete_receipt(&info.token_id)?;
                }
                Err(err)
            }
        }
    }

    /// Decide what happened to a receipt left `pending`. `Some((gross, net))` if the token
    /// was credited, `None` if it was not (row removed so the caller may retry), `TokenSpent`
    /// if someone else spent it.
    pub(super) async fn resolve_pending_receipt(
        &self,
        token_id: &str,
        raw: &str,
    ) -> Result<Option<(u64, u64)>, WalletError> {
        let (info, parsed) = self.decode(raw)?;
        let state = self.mint_state(&info.mint)?;
        let w = self.cdk_wallet(state).await?;
        // Let cdk finish or compensate its own receive saga first (it re-fetches signatures
        // via NUT-09 when the swap went through but the answer was lost).
        {
            // Waits for this mint's in-flight requests (each bounded by the call deadline).
            let _quiet = state.in_flight.write().await;
            if let Err(e) = w.recover_incomplete_sagas().await {
                tracing::warn!(error = %e, "saga recovery during receipt resolution");
            }
        }
        let ys = token_ys(&parsed)?;
        if let Some(tx) = self.completed_incoming(&w, &ys).await? {
            let net: u64 = tx.amount.into();
            self.inner
                .store
                .set_receipt_done(token_id, info.amount, net)?;
            return Ok(Some((info.amount, net)));
        }
        let states = w
            .mint_connector()
            .post_check_state(CheckStateRequest { ys: ys.clone() })
            .await
            .map_err(|e| WalletError::from_cdk(&info.mint, e))?;
        if states.states.iter().all(|s| s.state == State::Unspent) {
            self.inner.store.delete_receipt(token_id)?;
            return Ok(None);
        }
        if states.states.iter().any(|s| s.state == State::Pending) {
            return Err(WalletError::TokenPending);
        }
        // Spent but no completed incoming transaction of ours: someone else spent it.
        self.cleanup_foreign_receive(&w, &ys).await;
        self.inner.store.set_receipt_spent(token_id)?;
        Err(WalletError::TokenSpent)
    }

    pub(super) async fn completed_incoming(
        &self,
        w: &cdk::Wallet,
        ys: &[PublicKey],
    ) -> Result<Option<cdk::wallet::types::Transaction>, WalletError> {
        let txs = w
            .list_transactions(Some(cdk::wallet::types::TransactionDirection::Incoming))
            .await
            .map_err(|e| WalletError::Cdk { source: e })?;
        Ok(txs.into_iter().find(|tx| {
            tx.status == cdk::wallet::types::TransactionStatus::Completed
                && !ys.is_empty()
                && ys.iter().all(|y| tx.ys.contains(y))
        }))
    }

    /// After a receive of already-spent proofs cdk keeps the receive saga (the error is not
    /// "definitive" to it) and the foreign proofs as pending: a phantom pending balance and a
    /// recovery failure on every start. Remove exactly those: the saga named by the pending
    /// transaction over these Ys, and the proofs with these Ys (foreign proofs, never ours).
    /// `release_proofs` would be wrong: it marks the spent proofs unspent.
    pub(super) async fn cleanup_foreign_receive(&self, w: &cdk::Wallet, ys: &[PublicKey]) {
        let db = &self.inner.db;
        if let Ok(txs) = w
            .list_transactions(Some(cdk::wallet::types::TransactionDirection::Incoming))
            .await
        {
            for tx in txs {
                if tx.status != cdk::wallet::types::TransactionStatus::Completed
                    && ys.iter().all(|y| tx.ys.contains(y))
                {
                    if let Some(saga_id) = tx.saga_id {
                        if let Err(e) = db.delete_saga(&saga_id).await {
                            tracing::warn!(%saga_id, error = %e, "deleting stuck receive saga");
                        }
                    }
                    if let Err(e) = db.remove_transaction(tx.id()).await {
                        tracing::warn!(error = %e, "removing failed receive transaction");
                    }
                }
            }
        }
        if let Err(e) = db.update_proofs(Vec::new(), ys.to_vec()).await {
            tracing::warn!(error = %e, "removing foreign pending proofs");
        }
    }

    /// True when this wallet already has a receipt for the token (received, being received,
    /// or found spent), whoever asked for it: the merchant refuses to sell access for a token
    /// the operator already received with `tollgate wallet receive`.
    pub fn has_receipt(&self, token_id: &str) -> Result<bool, WalletError> {
        Ok(self.inner.store.receipt(token_id)?.is_some())
    }
}
