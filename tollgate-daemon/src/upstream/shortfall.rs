//! Covering a shortfall before an upstream purchase: when the cheapest option's mint holds
//! too little but another accepted mint holds enough, the wallet moves the difference over
//! Lightning (see `wallet/rebalance.rs`) instead of the purchase being refused.
//!
//! ```text
//! policy::choose ─> FundsLow { mint, needed, available } ─> auto rebalance on?
//!   ─> wallet.rebalance_and_hold(mint, needed − available, hold) ─> done: the moved amount
//!      is reserved at `mint` (grown into our standing hold) ─> choose again
//! ```
//! The fee budget is the wallet's (`rebalance.fee_budget_percent`); a rebalance that would
//! cost more is refused by the wallet and the purchase stays refused as `FundsLow`.

use crate::wallet::{Reservation, Wallet};

use super::Refusal;

/// If `refusal` is a shortfall the wallet may cover, move it and return the reservation that
/// now holds it at the short mint (`hold` grown when it was ours there). `None` when there is
/// nothing to do or the rebalance did not complete (logged).
pub async fn cover(
    wallet: &Wallet,
    refusal: &Refusal,
    hold: Option<&Reservation>,
) -> Option<Reservation> {
    let Refusal::FundsLow {
        mint,
        needed,
        available,
    } = refusal
    else {
        return None;
    };
    if !wallet.auto_rebalance() || needed <= available {
        return None;
    }
    let shortfall = needed - available;
    match wallet.rebalance_and_hold(mint, shortfall, None, hold).await {
        Ok((record, Some(held))) => {
            tracing::info!(target = %record.target, source = %record.source,
                amount = record.amount, fee = record.fee, id = %record.id,
                "moved funds between mints for an upstream purchase");
            Some(held)
        }
        Ok((record, None)) => {
            tracing::warn!(id = %record.id, state = %record.state,
                "rebalance for an upstream purchase not finished yet");
            None
        }
        Err(e) => {
            tracing::warn!(%mint, shortfall, error = %e,
                "cannot cover the upstream purchase from another mint");
            None
        }
    }
}
