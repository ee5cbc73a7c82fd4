//! Balances and what the operator is told about them.
//!
//! ```text
//! balance   = cdk's unspent proofs of the mint (reserved/pending ones are not counted)
//! reserved  = active reservations ([`reserve`](super::reserve))
//! available = balance − reserved
//! ```
//!
//! | query                  | reads                    | network             |
//! |------------------------|--------------------------|---------------------|
//! | `balances`, `available_balance` | cdk database + ledger | none           |
//! | `probe_mints`          | —                        | `GET /v1/info`, each bounded |
//! | `warnings`             | balances, minimum purchases, payout backoff | none |

use std::time::Duration;

use super::{canonical_mint_url, MintBalance, MintProbe, MintState, Wallet, WalletError};

impl Wallet {
    /// Balances of every accepted mint.
    pub async fn balances(&self) -> Result<Vec<MintBalance>, WalletError> {
        let mut out = Vec::new();
        for (key, state) in &self.inner.mints {
            let balance = self.balance_of(state).await?;
            let reserved = self.reserved_of(key)?;
            out.push(MintBalance {
                mint: key.clone(),
                unit: state.settings.unit.clone(),
                balance,
                reserved,
                available: balance.saturating_sub(reserved),
            });
        }
        Ok(out)
    }

    pub(super) async fn balance_of(&self, state: &MintState) -> Result<u64, WalletError> {
        let w = self.cdk_wallet(state).await?;
        let b: u64 = w
            .total_balance()
            .await
            .map_err(|e| WalletError::Cdk { source: e })?
            .into();
        Ok(b)
    }

    /// Unspent balance minus active reservations.
    pub async fn available_balance(&self, mint: &str) -> Result<u64, WalletError> {
        let state = self.mint_state(mint)?;
        let balance = self.balance_of(state).await?;
        Ok(balance.saturating_sub(self.reserved_of(&state.url.to_string())?))
    }

    /// Asks every accepted mint for its info, all at once, each bounded by `timeout`.
    /// Uses a bare HTTP client: nothing in the wallet's database changes.
    pub async fn probe_mints(&self, timeout: Duration) -> Vec<MintProbe> {
        use cdk::wallet::MintConnector;
        let mut set = tokio::task::JoinSet::new();
        for (key, state) in &self.inner.mints {
            let (key, url) = (key.clone(), state.url.clone());
            set.spawn(async move {
                let client = cdk::wallet::HttpClient::new(url, None);
                let error = match tokio::time::timeout(timeout, client.get_mint_info()).await {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some(format!("no answer within {} ms", timeout.as_millis())),
                };
                MintProbe {
                    mint: key,
                    reachable: error.is_none(),
                    error,
                }
            });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok(p) = r {
                out.push(p);
            }
        }
        out.sort_by(|a, b| a.mint.cmp(&b.mint));
        out
    }

    /// The chandler registers the smallest purchase an upstream accepts at `mint`, so that
    /// [`Wallet::warnings`] can tell the operator before a purchase fails.
    pub fn set_minimum_purchase(&self, mint: &str, amount: u64) {
        if let Ok(key) = canonical_mint_url(mint) {
            self.inner
                .minimum_purchase
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, amount);
        }
    }

    /// Operator-facing warnings, e.g. too little balance for an upstream's minimum purchase.
    /// Uses the balances cached by the last [`Wallet::balances`]-style query.
    pub async fn warnings(&self) -> Vec<String> {
        let mins: Vec<(String, u64)> = self
            .inner
            .minimum_purchase
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let mut out = Vec::new();
        let balances = match self.balances().await {
            Ok(b) => b,
            Err(e) => return vec![format!("wallet balance unavailable: {e}")],
        };
        for (mint, min) in mins {
            match balances.iter().find(|b| b.mint == mint) {
                Some(b) if b.available < min => out.push(format!(
                    "available balance {} at {mint} is below the upstream minimum purchase {min}",
                    b.available
                )),
                Some(_) => {}
                None => out.push(format!(
                    "upstream requires mint {mint}, which is not an accepted mint"
                )),
            }
        }
        out.extend(self.inner.payouts.warnings());
        out
    }
}
