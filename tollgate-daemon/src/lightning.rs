//! The Lightning checkout: a customer without ecash pays a bolt11 invoice of an accepted mint;
//! the paid quote is minted into our wallet and granted like a token (same allotment rules,
//! top-up included). The API is the reference's `/ln-invoice` (see `http.rs`).
//!
//! ```text
//! create(mac, mint, amount)  preflight (can a gate open?) ─> amount buys ≥ min steps ─> mint
//!                            quote ─> row `open` (quote, mint, amount, MAC; fsync) ─> bolt11
//! settle(quote)              the mint's state: UNPAID ─> nothing (EXPIRED once past expiry)
//!   (GET poll, every          PAID   ─> wallet mints the proofs ─┐
//!    `POLL` in the            ISSUED ─> minted before a crash ───┴> merchant.grant_minted(
//!    background, at start)              "ln:<quote>", the row's MAC) ─> row `settled`
//! ```
//! Exactly once: the grant's key is the quote id, and the grants table applies a grant once
//! (its `applied` mark and the session change are one transaction). A crash after minting
//! leaves the quote `ISSUED` at the mint with the proofs in our wallet (cdk's mint saga), and
//! the next settle grants it. The quote is bound to the MAC that asked for it: another device
//! polling it learns nothing (404) and the access always goes to the recorded MAC.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::{
    merchant::{steps_at, Merchant, MerchantError},
    protocol::Metric,
    store::{GrantStatus, LnQuote, Store, StoreError},
    types::canonical_mint_url,
    valve::MacAddr,
    wallet::{QuoteState, Wallet, WalletError},
};

/// Largest invoice we ask for, in sat (a bound on what one request can make us hold open).
pub const MAX_AMOUNT: u64 = 1_000_000;
/// Unpaid, unexpired quotes one device may hold.
pub const MAX_OPEN_PER_DEVICE: u64 = 5;
/// How often open quotes are settled in the background (a customer who closed the page is
/// still granted).
pub const POLL: Duration = Duration::from_secs(5);
/// A poll of one quote within this long of the last mint check answers from memory.
const RECHECK: Duration = Duration::from_secs(1);
/// The mint may still mark a quote paid a little after its expiry.
const EXPIRY_GRACE_SECS: u64 = 120;

#[derive(Debug, thiserror::Error)]
pub enum LightningError {
    #[error("{reason}")]
    BadRequest { reason: String },
    #[error("mint {mint} is not accepted")]
    MintNotAccepted { mint: String },
    #[error("too many open invoices for this device ({open}); pay or let one expire")]
    TooManyOpen { open: u64 },
    #[error("unknown quote")]
    NotFound,
    #[error("mint: {source}")]
    Wallet {
        #[source]
        source: WalletError,
    },
    #[error("{source}")]
    Merchant {
        #[source]
        source: MerchantError,
    },
    #[error("store: {source}")]
    Store {
        #[from]
        source: StoreError,
    },
}

impl LightningError {
    /// The HTTP status the reference answers with.
    pub fn status(&self) -> u16 {
        match self {
            LightningError::BadRequest { .. }
            | LightningError::MintNotAccepted { .. }
            | LightningError::TooManyOpen { .. } => 400,
            LightningError::NotFound => 404,
            LightningError::Wallet {
                source: WalletError::MintUnavailable { .. } | WalletError::RateLimited { .. },
            }
            | LightningError::Merchant {
                source: MerchantError::Unavailable { .. },
            } => 503,
            LightningError::Merchant {
                source: MerchantError::BelowMinimum { .. },
            } => 400,
            _ => 500,
        }
    }
}

/// What `/ln-invoice` reports about one quote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuoteView {
    pub quote: String,
    pub mint_url: String,
    pub amount: u64,
    pub invoice: String,
    pub expiry: u64,
    /// `UNPAID`, `PAID`, `ISSUED` (NUT-04) or `EXPIRED`.
    pub state: &'static str,
    pub access_granted: bool,
    /// Allotment this payment bought, in metric units (0 until granted).
    pub allotment: u64,
    pub metric: Metric,
}

pub struct Checkout {
    wallet: Wallet,
    merchant: Merchant,
    store: Arc<Store>,
    /// One settle at a time: bounds the load on the mints and makes check-mint-grant atomic.
    settling: tokio::sync::Mutex<()>,
    /// Quote id → when the mint last said UNPAID.
    checked: Mutex<HashMap<String, Instant>>,
}

impl Checkout {
    pub fn new(wallet: Wallet, merchant: Merchant, store: Arc<Store>) -> Self {
        Checkout {
            wallet,
            merchant,
            store,
            settling: tokio::sync::Mutex::new(()),
            checked: Mutex::default(),
        }
    }

    /// A new invoice for `mac`: `amount` sat at `mint_url`.
    pub async fn create(
        &self,
        mac: MacAddr,
        mint_url: &str,
        amount: u64,
    ) -> Result<QuoteView, LightningError> {
        if amount == 0 || amount > MAX_AMOUNT {
            return Err(LightningError::BadRequest {
                reason: format!("amount must be between 1 and {MAX_AMOUNT} sat"),
            });
        }
        let mint = canonical_mint_url(mint_url).map_err(|_| LightningError::MintNotAccepted {
            mint: mint_url.to_string(),
        })?;
        let cfg = self.merchant.config();
        let offer = cfg
            .offer(&mint)
            .ok_or_else(|| LightningError::MintNotAccepted { mint: mint.clone() })?;
        // Refuse up front what the grant would refuse after the customer paid (at the price
        // of the device's active tier, which a top-up is priced at).
        let factor = self.merchant.price_factor_for(mac);
        let (steps, enough) = steps_at(amount, offer, factor);
        if !enough {
            return Err(LightningError::BadRequest {
                reason: format!(
                    "{amount} sat buys {steps} steps; the minimum is {} steps at {} sat",
                    offer.purchase_min_steps.max(1),
                    offer.price_per_step.max(1).saturating_mul(factor)
                ),
            });
        }
        self.merchant
            .preflight(mac)
            .map_err(|source| LightningError::Merchant { source })?;
        let open = self
            .store
            .open_ln_quotes_of(mac, crate::sys::clock::unix_secs())?;
        if open >= MAX_OPEN_PER_DEVICE {
            return Err(LightningError::TooManyOpen { open });
        }
        let q = self
            .wallet
            .create_mint_quote(&mint, amount)
            .await
            .map_err(|source| LightningError::Wallet { source })?;
        let row = LnQuote {
            quote: q.id,
            mint,
            amount,
            mac,
            request: q.request,
            expiry: q.expiry,
            state: "open".into(),
            created_unix: crate::sys::clock::unix_secs(),
        };
        self.store.insert_ln_quote(&row)?;
        tracing::info!(%mac, quote = %row.quote, mint = %row.mint, amount, "lightning invoice created");
        Ok(self.view(&row, QuoteState::Unpaid.as_str(), None))
    }

    /// The quote's state for the device that asked for it; settles it when paid.
    pub async fn status(&self, mac: MacAddr, quote: &str) -> Result<QuoteView, LightningError> {
        let row = self.store.ln_quote(quote)?;
        match row {
            Some(row) if row.mac == mac => self.settle(&row.quote).await,
            // Another device's quote (or none): the same answer, nothing about it leaks.
            _ => Err(LightningError::NotFound),
        }
    }

    /// The bolt11 of the device's own quote (no mint contact), for the QR code.
    pub fn invoice_of(&self, mac: MacAddr, quote: &str) -> Result<String, LightningError> {
        match self.store.ln_quote(quote)? {
            Some(row) if row.mac == mac => Ok(row.request),
            _ => Err(LightningError::NotFound),
        }
    }

    /// Settles every open quote (at start and every [`POLL`]); returns how many were granted.
    pub async fn settle_open(&self) -> usize {
        let rows = match self.store.open_ln_quotes(1000) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "listing open lightning quotes");
                return 0;
            }
        };
        let mut granted = 0;
        for row in rows {
            match self.settle(&row.quote).await {
                Ok(v) if v.access_granted => granted += 1,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(quote = %row.quote, error = %e, "settling lightning quote")
                }
            }
        }
        granted
    }

    /// Background settling until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
            self.settle_open().await;
        }
    }

    async fn settle(&self, quote: &str) -> Result<QuoteView, LightningError> {
        let recent = self
            .checked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(quote)
            .is_some_and(|t| t.elapsed() < RECHECK);
        let _one = self.settling.lock().await;
        let row = self
            .store
            .ln_quote(quote)?
            .ok_or(LightningError::NotFound)?;
        let grant_id = grant_id(&row.quote);
        match row.state.as_str() {
            "expired" => return Ok(self.view(&row, "EXPIRED", None)),
            "settled" => {
                let g = self.store.grant(&grant_id)?;
                if g.as_ref()
                    .is_some_and(|g| g.status == GrantStatus::Redeemed)
                {
                    // Minted and recorded, but the gate could not open yet: try again.
                    self.grant(&row, row.amount).await?;
                }
                return Ok(self.view(&row, "ISSUED", self.store.grant(&grant_id)?));
            }
            _ => {}
        }
        if recent {
            return Ok(self.view(&row, QuoteState::Unpaid.as_str(), None));
        }
        let state = self
            .wallet
            .mint_quote_state(&row.mint, &row.quote)
            .await
            .map_err(|source| LightningError::Wallet { source })?;
        let minted = match state {
            QuoteState::Unpaid => {
                if crate::sys::clock::unix_secs() > row.expiry.saturating_add(EXPIRY_GRACE_SECS) {
                    self.store.set_ln_quote_state(&row.quote, "expired")?;
                    return Ok(self.view(&row, "EXPIRED", None));
                }
                self.checked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(row.quote.clone(), Instant::now());
                return Ok(self.view(&row, state.as_str(), None));
            }
            QuoteState::Paid => self
                .wallet
                .mint_paid_quote(&row.mint, &row.quote)
                .await
                .map_err(|source| LightningError::Wallet { source })?,
            // Minted before a crash or a lost answer: cdk's mint saga put the proofs in our
            // wallet. The invoice was for exactly `amount`.
            QuoteState::Issued => row.amount,
        };
        self.checked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&row.quote);
        self.grant(&row, minted).await?;
        self.store.set_ln_quote_state(&row.quote, "settled")?;
        Ok(self.view(&row, "ISSUED", self.store.grant(&grant_id)?))
    }

    async fn grant(&self, row: &LnQuote, amount: u64) -> Result<(), LightningError> {
        match self
            .merchant
            .grant_minted(&grant_id(&row.quote), row.mac, &row.mint, amount)
            .await
        {
            Ok(_) => {
                tracing::info!(mac = %row.mac, quote = %row.quote, amount, "lightning payment granted");
                Ok(())
            }
            // Final: the grant row says so; the quote is settled either way.
            Err(e @ MerchantError::BelowMinimum { .. }) => {
                self.store.set_ln_quote_state(&row.quote, "settled")?;
                Err(LightningError::Merchant { source: e })
            }
            Err(source) => Err(LightningError::Merchant { source }),
        }
    }

    fn view(
        &self,
        row: &LnQuote,
        state: &'static str,
        grant: Option<crate::store::Grant>,
    ) -> QuoteView {
        let applied = grant.filter(|g| g.status == GrantStatus::Applied);
        QuoteView {
            quote: row.quote.clone(),
            mint_url: row.mint.clone(),
            amount: row.amount,
            invoice: row.request.clone(),
            expiry: row.expiry,
            state,
            access_granted: applied.is_some(),
            allotment: applied.map_or(0, |g| g.allotment),
            metric: self.merchant.config().metric,
        }
    }
}

/// The grants-table key of a Lightning quote (a token's key is a sha256 hex: no collision).
pub fn grant_id(quote: &str) -> String {
    format!("ln:{quote}")
}

/// A QR code of a bolt11 invoice as a self-contained SVG (no script, no external resource), so
/// the portal can show it under its CSP (`img-src 'self'`). The invoice is upper-cased with the
/// `LIGHTNING:` scheme (BOLT-11 allows it; QR's alphanumeric mode makes the code smaller).
pub fn invoice_qr_svg(invoice: &str) -> Result<String, LightningError> {
    use qrcode::{Color, EcLevel, QrCode};
    let text = format!("LIGHTNING:{}", invoice.to_ascii_uppercase());
    let code = QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M).map_err(|e| {
        LightningError::BadRequest {
            reason: format!("invoice does not fit a QR code: {e}"),
        }
    })?;
    let width = code.width();
    let quiet = 4;
    let size = width + 2 * quiet;
    let mut path = String::with_capacity(width * width * 4);
    for (i, c) in code.to_colors().iter().enumerate() {
        if *c == Color::Dark {
            let (x, y) = (i % width + quiet, i / width + quiet);
            path.push_str(&format!("M{x} {y}h1v1h-1z"));
        }
    }
    Ok(format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {size} {size}\" \
         shape-rendering=\"crispEdges\"><rect width=\"{size}\" height=\"{size}\" fill=\"#fff\"/>\
         <path fill=\"#000\" d=\"{path}\"/></svg>"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qr_svg_is_self_contained_and_sized_for_the_invoice() {
        let invoice = format!("lnbc200n1{}", "q".repeat(300));
        let svg = invoice_qr_svg(&invoice).expect("fits");
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(
            !svg.contains("href") && !svg.contains("<script"),
            "nothing external"
        );
        let code = qrcode::QrCode::with_error_correction_level(
            format!("LIGHTNING:{}", invoice.to_ascii_uppercase()).as_bytes(),
            qrcode::EcLevel::M,
        )
        .expect("code");
        let dark = code
            .to_colors()
            .iter()
            .filter(|c| **c == qrcode::Color::Dark)
            .count();
        assert_eq!(svg.matches('z').count(), dark, "one square per dark module");
        assert!(
            invoice_qr_svg(&"x".repeat(10_000)).is_err(),
            "too long for any QR version"
        );
    }
}
