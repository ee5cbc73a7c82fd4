//! Minting for the Lightning checkout (NUT-04 bolt11): a quote at an accepted mint, its state
//! at the mint, and minting a paid quote into our own proofs.
//!
//! ```text
//! create_mint_quote(mint, amount) ─> quote id + bolt11 (cdk stores the quote and its NUT-20 key)
//! mint_quote_state(mint, id)      ─> Unpaid | Paid | Issued (asks the mint; finishes a mint
//!                                    saga a crash interrupted)
//! mint_paid_quote(mint, id)       ─> proofs in our wallet, amount minted (under the mint lock)
//! ```
//! Crash safety is cdk's: the mint step is a write-ahead saga recovered at open, so a quote the
//! mint reports `Issued` has its proofs in our database. The caller (the Lightning checkout)
//! owns "granted exactly once".

use cdk::amount::SplitTarget;
use cdk::nuts::{MintQuoteState, PaymentMethod};
use cdk::Amount;

use super::{Wallet, WalletError};

/// A mint quote as the customer needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintQuote {
    pub id: String,
    /// The bolt11 invoice to pay.
    pub request: String,
    pub amount: u64,
    /// Unix seconds after which the mint no longer honours the invoice.
    pub expiry: u64,
}

/// Where a mint quote stands at the mint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuoteState {
    Unpaid,
    Paid,
    Issued,
}

impl QuoteState {
    /// NUT-04's spelling, which the reference's `/ln-invoice` passes through as `state`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuoteState::Unpaid => "UNPAID",
            QuoteState::Paid => "PAID",
            QuoteState::Issued => "ISSUED",
        }
    }
}

impl Wallet {
    /// Asks `mint` for a bolt11 invoice of `amount` sat.
    pub async fn create_mint_quote(
        &self,
        mint: &str,
        amount: u64,
    ) -> Result<MintQuote, WalletError> {
        let state = self.mint_state(mint)?;
        let w = self.cdk_wallet(state).await?;
        let q = w
            .mint_quote(
                PaymentMethod::BOLT11,
                Some(Amount::from(amount)),
                None,
                None,
            )
            .await
            .map_err(|e| WalletError::from_cdk(mint, e))?;
        Ok(MintQuote {
            id: q.id,
            request: q.request,
            amount,
            expiry: q.expiry,
        })
    }

    /// The quote's state at the mint (the quote must have been created by this wallet).
    pub async fn mint_quote_state(&self, mint: &str, id: &str) -> Result<QuoteState, WalletError> {
        let state = self.mint_state(mint)?;
        let w = self.cdk_wallet(state).await?;
        let q = w
            .check_mint_quote_status(id)
            .await
            .map_err(|e| WalletError::from_cdk(mint, e))?;
        Ok(match q.state {
            MintQuoteState::Unpaid => QuoteState::Unpaid,
            MintQuoteState::Paid => QuoteState::Paid,
            MintQuoteState::Issued => QuoteState::Issued,
        })
    }

    /// Mints a paid quote into our wallet; returns the amount minted.
    pub async fn mint_paid_quote(&self, mint: &str, id: &str) -> Result<u64, WalletError> {
        let state = self.mint_state(mint)?;
        // Proof-moving operations of one mint run one at a time (see the module doc).
        let _guard = state.lock.lock().await;
        let w = self.cdk_wallet(state).await?;
        let proofs = w
            .mint(id, SplitTarget::default(), None)
            .await
            .map_err(|e| WalletError::from_cdk(mint, e))?;
        Ok(proofs.iter().map(|p| u64::from(p.amount)).sum())
    }
}
