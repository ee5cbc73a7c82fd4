//! Outgoing tokens (paying an upstream gateway): created under the mint lock, written ahead,
//! verified against the receiver's swap fee, and reclaimable until the payee redeems them.
//!
//! ```text
//! lock(mint) ─> reservation? ─> prepare_send ─> row 'creating' ─> confirm (swap) ─> value ok?
//!   ├ yes ─> reservation consumed ─> 'issued' ─> token to the caller
//!   └ no  ─> revoke ─> 'revoked' ─> ask again (≤ 3 times)
//! ```
//!
//! | state       | meaning                                   | next                          |
//! |-------------|-------------------------------------------|-------------------------------|
//! | `creating`  | confirmed or about to be, not handed out  | open: revoked → `reclaimed`   |
//! | `issued`    | the caller holds the token                | `reclaim`, or `claimed` at open |
//! | `claimed`   | the payee redeemed it (seen at an open)   | —                             |
//! | `reclaimed` | taken back into the wallet                | —                             |
//! | `revoked`   | value off, taken back and retried         | —                             |
//! | `failed`    | never created                             | —                             |

use cdk::wallet::SendOptions;
use cdk::Amount;

use super::{OutgoingRecord, OutgoingToken, Reservation, Wallet, WalletError};

impl Wallet {
    /// Create a token the receiver can swap for at least `amount` (its input fee included).
    /// With a reservation, the funds it holds are used and the reservation is consumed.
    pub async fn create_payment_token(
        &self,
        mint: &str,
        amount: u64,
        reservation: Option<Reservation>,
    ) -> Result<OutgoingToken, WalletError> {
        let state = self.mint_state(mint)?;
        let key = state.url.to_string();
        let _guard = state.lock.lock().await;
        let _in_flight = state.in_flight.read().await;
        let own = match &reservation {
            Some(r) if !self.bypass_reservations() => match self.inner.store.reservation(&r.id)? {
                Some((m, amt)) if m == key => amt,
                _ => {
                    return Err(WalletError::ReservationExpired { id: r.id.clone() });
                }
            },
            _ => 0,
        };
        let balance = self.balance_of(state).await?;
        let others = self.reserved_of(&key)?.saturating_sub(own);
        let available = balance.saturating_sub(others);
        if available < amount {
            return Err(WalletError::InsufficientFunds {
                mint: key,
                needed: amount,
                available,
            });
        }
        let w = self.cdk_wallet(state).await?;
        let max_fee_ppk = w
            .get_keyset_fees_and_amounts()
            .await
            .map_err(|e| WalletError::from_cdk(&key, e))?
            .values()
            .map(|f| f.fee())
            .max()
            .unwrap_or(0);
        // include_fee can be off by a few sats (cdk issue 2493): verify, top up, retry.
        let mut ask = amount;
        let tolerance = amount * state.settings.balance_tolerance_percent / 100 + 1;
        for _ in 0..3 {
            let opts = SendOptions {
                include_fee: true,
                ..Default::default()
            };
            let prepared = w.prepare_send(Amount::from(ask), opts).await.map_err(|e| {
                match WalletError::from_cdk(&key, e) {
                    WalletError::InsufficientFunds { .. } => WalletError::InsufficientFunds {
                        mint: key.clone(),
                        needed: ask,
                        available,
                    },
                    other => other,
                }
            })?;
            let op_id = prepared.operation_id();
            let op = op_id.to_string();
            self.hook("send:prepared");
            // Write-ahead: once confirmed, the token exists only in cdk's saga until we hand
            // it out. A crash in between would leave its proofs pending-spent with no record
            // to reclaim them by; with this row the next open revokes it.
            if let Err(e) = self.inner.store.put_outgoing_creating(&op, &key, amount) {
                let _ = prepared.cancel().await;
                return Err(e);
            }
            let token = prepared
                .confirm(None)
                .await
                .map_err(|e| WalletError::from_cdk(&key, e))?;
            self.hook("send:confirmed");
            let value: u64 = token
                .value()
                .map_err(|e| WalletError::InvalidToken {
                    reason: e.to_string(),
                })?
                .into();
            let n = token.token_secrets().len() as u64;
            let receiver_fee = (n * max_fee_ppk).div_ceil(1000);
            let net = value.saturating_sub(receiver_fee);
            self.inner
                .store
                .set_outgoing_value(&op, value, receiver_fee)?;
            if net >= amount && net <= amount + tolerance {
                if let Some(r) = &reservation {
                    self.inner.store.delete_reservation(&r.id)?;
                }
                // From here the caller holds the token: never revoke it behind its back.
                self.inner.store.set_outgoing_state(&op, "issued")?;
                self.hook("send:issued");
                return Ok(OutgoingToken {
                    token: token.to_string(),
                    op_id: op,
                    mint: key,
                    amount,
                    value,
                    receiver_fee,
                });
            }
            tracing::warn!(
                amount,
                value,
                receiver_fee,
                "token value off; revoking and retrying"
            );
            w.revoke_send(op_id)
                .await
                .map_err(|e| WalletError::from_cdk(&key, e))?;
            self.inner
                .store
                .set_outgoing_state(&op_id.to_string(), "revoked")?;
            ask = if net < amount {
                ask + (amount - net)
            } else {
                ask.saturating_sub(net - amount).max(1)
            };
        }
        Err(WalletError::FeeBudget {
            fee: ask.saturating_sub(amount),
            budget: tolerance,
        })
    }

    /// Every outgoing token recorded, oldest first: after a crash, `issued` ones whose payee
    /// never got them can be taken back with [`Wallet::reclaim`].
    pub fn outgoing_tokens(&self) -> Result<Vec<OutgoingRecord>, WalletError> {
        self.inner.store.outgoing()
    }

    /// Take back an outgoing token the upstream did not claim (or rejected). Returns the
    /// amount returned to the wallet.
    pub async fn reclaim(&self, op_id: &str) -> Result<u64, WalletError> {
        let mint = self.inner.store.outgoing_mint(op_id)?.ok_or_else(|| {
            WalletError::UnknownOperation {
                op_id: op_id.to_string(),
            }
        })?;
        let uuid = uuid::Uuid::parse_str(op_id).map_err(|_| WalletError::UnknownOperation {
            op_id: op_id.to_string(),
        })?;
        let state = self.mint_state(&mint)?;
        let _guard = state.lock.lock().await;
        let _in_flight = state.in_flight.read().await;
        let w = self.cdk_wallet(state).await?;
        let amount: u64 = w
            .revoke_send(uuid)
            .await
            .map_err(|e| WalletError::from_cdk(&mint, e))?
            .into();
        self.inner.store.set_outgoing_state(op_id, "reclaimed")?;
        Ok(amount)
    }
}
