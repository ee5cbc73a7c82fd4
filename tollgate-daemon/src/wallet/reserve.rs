//! Reservations: funds set aside for a payment about to be made, so a payout can never spend
//! them between the chandler's balance check and its token creation (the seed's race).
//! `reserve` checks and inserts under the mint lock; a payout spends only
//! `balance − min_balance − reserved`.
//!
//! | state    | meaning                                   | leaves by                      |
//! |----------|-------------------------------------------|--------------------------------|
//! | active   | row in `reservations`, `expires_at` ahead | consumed by a token, `release` |
//! | expired  | row with `expires_at` past: ignored       | pruned on open / next reserve  |

use std::time::Duration;

use super::{store, Reservation, Wallet, WalletError};

impl Wallet {
    pub(super) fn reserved_of(&self, mint_key: &str) -> Result<u64, WalletError> {
        if self.bypass_reservations() {
            return Ok(0);
        }
        self.inner.store.reserved(mint_key)
    }

    /// Set `amount` aside for a payment about to be made. Fails with `InsufficientFunds`
    /// rather than over-committing. Expires after `ttl` by itself.
    pub async fn reserve(
        &self,
        mint: &str,
        amount: u64,
        ttl: Duration,
    ) -> Result<Reservation, WalletError> {
        let state = self.mint_state(mint)?;
        let key = state.url.to_string();
        let _guard = state.lock.lock().await;
        let balance = self.balance_of(state).await?;
        let available = balance.saturating_sub(self.reserved_of(&key)?);
        if available < amount {
            return Err(WalletError::InsufficientFunds {
                mint: key,
                needed: amount,
                available,
            });
        }
        let id = uuid::Uuid::new_v4().to_string();
        if !self.bypass_reservations() {
            let expires = store::now_ms() + ttl.as_millis() as u64;
            self.inner
                .store
                .put_reservation(&id, &key, amount, expires)?;
        }
        Ok(Reservation {
            id,
            mint: key,
            amount,
        })
    }

    /// Give a reservation back. Returns false if it had already expired or been used.
    pub fn release(&self, reservation: &Reservation) -> Result<bool, WalletError> {
        self.inner.store.delete_reservation(&reservation.id)
    }

    /// Keep a reservation alive for another `ttl` (a standing hold for the next upstream
    /// renewal). Returns false if it had already expired or been used.
    pub fn extend(&self, reservation: &Reservation, ttl: Duration) -> Result<bool, WalletError> {
        let expires = store::now_ms() + ttl.as_millis() as u64;
        self.inner
            .store
            .extend_reservation(&reservation.id, expires)
    }

    /// Default reservation lifetime from the settings.
    pub fn reservation_ttl(&self) -> Duration {
        self.inner.settings.reservation_ttl
    }
}
