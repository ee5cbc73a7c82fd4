//! The merchant turns a payment into allotment, in an order that never loses the customer's
//! money and never credits a token twice.
//!
//! ```text
//! purchase(mac, payment)
//!  0 tiers.choose(payment.tier)          unknown / hostile tier name → refused, not redeemed
//!  1 chandler.check(mac)                 pre-flight: can a gate open? (before taking money)
//!  2 redeemer.inspect(token)             offline: decode, mint accepted, unit, not locked,
//!                                        face value below purchase_min_steps → refused, the
//!                                        token is not redeemed and stays the customer's
//!  3 ── spawned task (survives the request timeout) ──────────────────────────────────────
//!    per-token lock; known token? replay answer; received by the wallet outside a grant
//!    (`tollgate wallet receive`)? → token-spent; grant row (redeeming, token stored, fsync)
//!    redeemer.receive(token)             idempotent per token id → grant redeemed (gross, net)
//!  4 steps = net / (price_per_step × tier factor)   below purchase_min_steps (the mint's
//!                                        input fee took the difference) → rejected-below-min
//!  5 chandler.add_paid(mac, tier, price, grant)   priced at the active tier when dearer;
//!                                        kernel op, then ONE tx: session + grant applied +
//!                                        the signed kind-1022 answer
//! ```
//! A late mint answer is never discarded: the request may time out, the task goes on, and
//! a retry with the same token returns the stored answer. `reconcile()` at start finishes
//! grants left in `redeeming` / `redeemed` (run it after `Chandler::reconcile`).
//! Every `purchase` is counted by (mint, outcome) for the operator's metrics
//! ([`Merchant::payment_counts`]); a token that does not decode counts under mint `unknown`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use nostr::{JsonUtil, Keys, PublicKey};

use crate::{
    chandler::{Chandler, ChandlerError, GrantCommit},
    config::{MerchantConfig, MintOffer},
    protocol::{
        self, Advertisement, Notice, NoticeCode, Payment, PriceOption, ProtocolError, Session,
        TierOption,
    },
    store::{Grant, GrantStatus, Store, StoreError},
    tiers::TierError,
    types::canonical_mint_url,
    valve::MacAddr,
    wallet::{Wallet, WalletError},
};

pub use crate::wallet::{Receipt, TokenInfo};

/// Errors of the wallet as the merchant sees them (mirrors the wallet's `WalletError`).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RedeemError {
    #[error("invalid token: {reason}")]
    InvalidToken { reason: String },
    #[error("mint {mint} is not accepted")]
    MintNotAccepted { mint: String },
    #[error("unit {unit} is not accepted")]
    WrongUnit { unit: String },
    #[error("token is locked (p2pk/htlc)")]
    Locked,
    #[error("token already spent")]
    TokenSpent,
    /// The proofs are in a pending transaction at the mint (someone is spending them now).
    #[error("token is pending at the mint")]
    TokenPending,
    #[error("mint {mint} unavailable: {message}")]
    MintUnavailable { mint: String, message: String },
    #[error("mint rate limited, retry after {retry_after_secs}s")]
    RateLimited { retry_after_secs: u64 },
    #[error("insufficient funds: {message}")]
    InsufficientFunds { message: String },
    #[error("wallet storage: {message}")]
    Storage { message: String },
    #[error("wallet: {message}")]
    Internal { message: String },
}

impl RedeemError {
    /// The outcome is known and final (a retry cannot succeed), so the grant may be marked
    /// failed; otherwise the mint may have swapped and reconcile must try again.
    fn is_final(&self) -> bool {
        matches!(
            self,
            RedeemError::InvalidToken { .. }
                | RedeemError::MintNotAccepted { .. }
                | RedeemError::WrongUnit { .. }
                | RedeemError::Locked
                | RedeemError::TokenSpent
        )
    }
}

/// The wallet seam: the real `wallet::Wallet` implements this at integration time.
#[async_trait]
pub trait Redeemer: Send + Sync + 'static {
    /// Offline checks only (no mint contact).
    fn inspect(&self, token: &str) -> Result<TokenInfo, RedeemError>;
    /// Swaps the token at its mint; idempotent and durable per token id.
    async fn receive(&self, token: &str) -> Result<Receipt, RedeemError>;
    /// Whether the wallet already received (or is receiving) this token, by any path.
    fn has_receipt(&self, token_id: &str) -> Result<bool, RedeemError>;
}

#[derive(Debug, thiserror::Error)]
pub enum MerchantError {
    #[error("cannot open a gate for {mac}: {source}")]
    Unavailable {
        mac: MacAddr,
        #[source]
        source: ChandlerError,
    },
    #[error("{source}")]
    Redeem {
        #[from]
        source: RedeemError,
    },
    /// Too little for the minimum purchase; `notice_json` is the stored signed notice.
    #[error("{steps} steps is below the minimum of {min_steps}")]
    BelowMinimum {
        steps: u64,
        min_steps: u64,
        notice_json: String,
    },
    #[error("the mint has not answered yet; the payment continues, retry with the same token")]
    Timeout { token_id: String },
    /// Received, but the gate could not be opened: the grant stays `redeemed` and a retry
    /// (or reconcile) applies it; the customer's value is not lost.
    #[error("payment received but access could not be granted yet: {source}")]
    Apply {
        #[source]
        source: ChandlerError,
    },
    #[error("merchant store: {source}")]
    Store {
        #[from]
        source: StoreError,
    },
    #[error("{source}")]
    Protocol {
        #[from]
        source: ProtocolError,
    },
    #[error("internal: {message}")]
    Internal { message: String },
    /// The tier named is not sold here (or not a tier name): refused before the token is
    /// redeemed, so it is still the customer's.
    #[error("{source}; the token was not redeemed and is still yours")]
    Tier {
        #[from]
        source: TierError,
    },
}

impl MerchantError {
    /// The notice code clients know for this failure.
    pub fn code(&self) -> NoticeCode {
        match self {
            MerchantError::Unavailable { .. } | MerchantError::Apply { .. } => {
                NoticeCode::ServiceUnavailable
            }
            MerchantError::Redeem { source } => match source {
                RedeemError::InvalidToken { .. } | RedeemError::WrongUnit { .. } => {
                    NoticeCode::InvalidToken
                }
                RedeemError::MintNotAccepted { .. } => NoticeCode::MintNotAccepted,
                RedeemError::Locked => NoticeCode::LockedToken,
                RedeemError::TokenSpent => NoticeCode::TokenSpent,
                RedeemError::TokenPending => NoticeCode::ProcessingFailed,
                RedeemError::MintUnavailable { .. } => NoticeCode::NoReachableMints,
                RedeemError::RateLimited { .. } => NoticeCode::MintRateLimited,
                RedeemError::InsufficientFunds { .. } => NoticeCode::ProcessingFailed,
                RedeemError::Storage { .. } | RedeemError::Internal { .. } => {
                    NoticeCode::InternalError
                }
            },
            MerchantError::BelowMinimum { .. } => NoticeCode::SessionError,
            MerchantError::Timeout { .. } => NoticeCode::ProcessingTimeout,
            MerchantError::Store { .. } | MerchantError::Internal { .. } => {
                NoticeCode::InternalError
            }
            MerchantError::Tier { .. } => NoticeCode::InvalidRequest,
            MerchantError::Protocol { source } => match source {
                ProtocolError::InvalidToken { .. } => NoticeCode::InvalidToken,
                ProtocolError::Sign { .. } => NoticeCode::InternalError,
                _ => NoticeCode::InvalidEvent,
            },
        }
    }
}

/// A successful purchase: the signed kind-1022 JSON (identical on every retry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Purchase {
    pub session_json: String,
    pub replayed: bool,
    /// Time spent in the wallet's receive (the swap at the mint) for this request; `None`
    /// when nothing was redeemed (a replay). The API reports it in `Server-Timing`.
    pub redeem: Option<Duration>,
}

/// Payments of one (mint, outcome): how many, and the sats credited (net, first acceptance
/// only; replays credit nothing).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PaymentCount {
    pub mint: String,
    /// `accepted`, `replayed`, or the notice code of the refusal.
    pub outcome: String,
    pub count: u64,
    pub sats: u64,
}

/// (mint, outcome) → (count, sats).
type PaymentTally = BTreeMap<(String, String), (u64, u64)>;

/// Pure pricing: steps bought for `net`, and whether that is at least the minimum purchase
/// (at least one step).
pub fn steps_for(net: u64, offer: &MintOffer) -> (u64, bool) {
    steps_at(net, offer, 1)
}

/// [`steps_for`] at a tier whose price is `factor` × the mint's price per step.
pub fn steps_at(net: u64, offer: &MintOffer, factor: u64) -> (u64, bool) {
    let steps = crate::tiers::steps(net, offer.price_per_step, factor);
    (steps, steps >= offer.purchase_min_steps.max(1))
}

#[derive(Clone)]
pub struct Merchant {
    cfg: Arc<MerchantConfig>,
    redeemer: Arc<dyn Redeemer>,
    chandler: Arc<Chandler>,
    store: Arc<Store>,
    /// One async lock per token id being processed: concurrent POSTs of one token serialise.
    locks: Arc<Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>>,
    /// (mint, outcome) → (count, sats): in memory, since the daemon started.
    counts: Arc<Mutex<PaymentTally>>,
    /// The last signed advertisement and the second it was signed for. `GET /` is the
    /// hottest path and a Schnorr signature per request would dominate it; `created_at` has
    /// one-second resolution, so within that second the cached event is exactly what a
    /// fresh signature would say.
    ad_cache: Arc<Mutex<Option<(u64, String)>>>,
}

impl Merchant {
    /// `cfg.keys` signs every event. `redeemer` is the wallet.
    pub fn new(
        cfg: MerchantConfig,
        redeemer: Arc<dyn Redeemer>,
        chandler: Arc<Chandler>,
        store: Arc<Store>,
    ) -> Self {
        Merchant {
            cfg: Arc::new(cfg),
            redeemer,
            chandler,
            store,
            locks: Arc::default(),
            counts: Arc::default(),
            ad_cache: Arc::default(),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.cfg.keys
    }

    pub fn config(&self) -> &MerchantConfig {
        &self.cfg
    }

    /// The signed kind-10021 advertisement, with a real `created_at` (the current second;
    /// signed at most once per second, see `ad_cache`).
    pub fn advertisement(&self) -> Result<String, MerchantError> {
        let now = crate::sys::clock::unix_secs();
        if let Some((at, json)) = &*self.ad_cache.lock().unwrap_or_else(|p| p.into_inner()) {
            if *at == now {
                return Ok(json.clone());
            }
        }
        // Signed outside the lock: two requests racing at a second boundary both sign.
        let json = self.sign_advertisement(now)?;
        *self.ad_cache.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, json.clone()));
        Ok(json)
    }

    fn sign_advertisement(&self, created_at: u64) -> Result<String, MerchantError> {
        let tiers = self.chandler.tiers();
        let tier_tags: Vec<TierOption> = tiers
            .extra()
            .iter()
            .flat_map(|t| {
                self.cfg.mints.iter().map(move |m| TierOption {
                    name: t.name.clone(),
                    down_kbit: t.rates.down_kbit,
                    up_kbit: t.rates.up_kbit,
                    price: PriceOption {
                        price_per_step: m.price_per_step.max(1).saturating_mul(t.factor),
                        unit: m.unit.clone(),
                        mint_url: m.url.clone(),
                        min_steps: m.purchase_min_steps.max(1),
                    },
                })
            })
            .collect();
        let ad = Advertisement {
            metric: self.cfg.metric,
            step_size: self.cfg.step_size,
            tips: protocol::TIPS.iter().map(|s| s.to_string()).collect(),
            prices: self
                .cfg
                .mints
                .iter()
                .map(|m| PriceOption {
                    price_per_step: m.price_per_step,
                    unit: m.unit.clone(),
                    mint_url: m.url.clone(),
                    // What we enforce (`steps_for`): at least one step. Wally rejects 0.
                    min_steps: m.purchase_min_steps.max(1),
                })
                .collect(),
        };
        Ok(ad
            .to_event_with(&self.cfg.keys, created_at, &tier_tags)?
            .as_json())
    }

    /// A signed kind-21023 notice.
    pub fn notice(&self, n: &Notice) -> Result<String, MerchantError> {
        Ok(n.to_event(&self.cfg.keys, crate::sys::clock::unix_secs())?
            .as_json())
    }

    /// Payments since start, by (mint, outcome).
    pub fn payment_counts(&self) -> Vec<PaymentCount> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((mint, outcome), (count, sats))| PaymentCount {
                mint: mint.clone(),
                outcome: outcome.clone(),
                count: *count,
                sats: *sats,
            })
            .collect()
    }

    fn count(&self, mint: &str, outcome: &str, sats: u64) {
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let e = m
            .entry((mint.to_string(), outcome.to_string()))
            .or_default();
        e.0 += 1;
        e.1 += sats;
    }

    /// Sells access to `mac` for the payment (see the module doc for the order of steps).
    pub async fn purchase(
        &self,
        mac: MacAddr,
        payment: Payment,
    ) -> Result<Purchase, MerchantError> {
        let info = self.redeemer.inspect(&payment.token).ok();
        let mint = info
            .as_ref()
            .and_then(|i| canonical_mint_url(&i.mint).ok())
            .unwrap_or_else(|| "unknown".to_string());
        let r = self.purchase_inner(mac, payment).await;
        match &r {
            Ok(p) if p.replayed => self.count(&mint, "replayed", 0),
            Ok(_) => {
                let net = info
                    .and_then(|i| self.store.grant(&i.token_id).ok().flatten())
                    .map_or(0, |g| g.net);
                self.count(&mint, "accepted", net);
            }
            Err(e) => self.count(&mint, &e.code().to_string(), 0),
        }
        r
    }

    async fn purchase_inner(
        &self,
        mac: MacAddr,
        payment: Payment,
    ) -> Result<Purchase, MerchantError> {
        // The tier first: an unknown or hostile name is refused before anything else, so
        // the token is never redeemed for it.
        let tier = self
            .chandler
            .tiers()
            .choose(payment.tier.as_deref())?
            .clone();
        self.chandler
            .check(mac)
            .map_err(|source| MerchantError::Unavailable { mac, source })?;
        let info = self.redeemer.inspect(&payment.token)?;
        let offer = self.offer_for(&info.mint, &info.unit)?;
        let token_id = info.token_id.clone();
        // The face value bounds what the swap can credit: too little is refused before the
        // mint sees the token, so it stays the customer's. (A grant already stored for this
        // token keeps its own answer.) Priced at the tier it would be applied at now: a
        // cheap top-up of a fast session is priced at the fast tier.
        let at = self
            .chandler
            .pricing_tier(mac, &tier)
            .map_err(|source| MerchantError::Unavailable { mac, source })?;
        if !steps_at(info.amount, offer, at.factor).1 && self.store.grant(&token_id)?.is_none() {
            return Err(self.below_minimum_unredeemed(
                info.amount,
                offer,
                at.factor,
                payment.customer,
            )?);
        }
        let grant = Grant {
            token_id: info.token_id,
            token: payment.token,
            mac,
            customer: payment.customer.map(|p| p.to_hex()),
            mint: offer.url.clone(),
            unit: offer.unit.clone(),
            gross: info.amount,
            net: 0,
            steps: 0,
            allotment: 0,
            metric: self.cfg.metric,
            status: GrantStatus::Redeeming,
            answer: None,
            error: None,
            created_unix: crate::sys::clock::unix_secs(),
            tier: (!tier.is_default()).then(|| tier.name.clone()),
        };
        // The redemption runs in its own task: a slow mint makes this request time out, but
        // the late answer is still applied and a retry gets the session.
        let me = self.clone();
        let task = tokio::spawn(async move { me.redeem_and_apply(grant).await });
        match tokio::time::timeout(self.cfg.payment_timeout, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(MerchantError::Internal {
                message: format!("payment task failed: {join}"),
            }),
            Err(_) => Err(MerchantError::Timeout { token_id }),
        }
    }

    /// The refusal of a token whose face value is below the minimum purchase.
    fn below_minimum_unredeemed(
        &self,
        amount: u64,
        offer: &MintOffer,
        factor: u64,
        customer: Option<PublicKey>,
    ) -> Result<MerchantError, MerchantError> {
        let (steps, _) = steps_at(amount, offer, factor);
        let mut notice = Notice::error(
            NoticeCode::SessionError,
            format!(
                "the token is worth {amount} {unit} = {steps} steps at {price} {unit}/step, below \
                 the minimum purchase of {min} steps; it was not redeemed and is still yours",
                unit = offer.unit,
                price = offer.price_per_step.max(1).saturating_mul(factor),
                min = offer.purchase_min_steps.max(1),
            ),
        );
        notice.customer = customer;
        Ok(MerchantError::BelowMinimum {
            steps,
            min_steps: offer.purchase_min_steps,
            notice_json: self.notice(&notice)?,
        })
    }

    /// A token the wallet received outside any grant (e.g. `tollgate wallet receive`) is the
    /// operator's already: selling access for it again would credit one token twice.
    fn refuse_if_received_elsewhere(&self, token_id: &str) -> Result<(), MerchantError> {
        if self.redeemer.has_receipt(token_id)? {
            tracing::warn!(%token_id, "token already received by the wallet outside a grant; refused");
            return Err(RedeemError::TokenSpent.into());
        }
        Ok(())
    }

    fn offer_for(&self, mint: &str, unit: &str) -> Result<&MintOffer, MerchantError> {
        let canonical =
            canonical_mint_url(mint).map_err(|reason| RedeemError::InvalidToken { reason })?;
        let offer = self
            .cfg
            .offer(&canonical)
            .ok_or(RedeemError::MintNotAccepted { mint: canonical })?;
        if offer.unit != unit {
            return Err(RedeemError::WrongUnit {
                unit: unit.to_string(),
            }
            .into());
        }
        Ok(offer)
    }

    fn token_lock(&self, token_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = map.get(token_id).and_then(Weak::upgrade) {
            return l;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let l = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(token_id.to_string(), Arc::downgrade(&l));
        l
    }

    async fn redeem_and_apply(&self, new: Grant) -> Result<Purchase, MerchantError> {
        let lock = self.token_lock(&new.token_id);
        let _held = lock.lock().await;
        let grant = match self.store.grant(&new.token_id)? {
            // A definitive failure swapped nothing: this request's own token string gets its
            // chance (a corrupted copy of a token must not poison the genuine one).
            Some(g) if g.status == GrantStatus::Failed => {
                // A failed grant swapped nothing, so a receipt means another path received it.
                self.refuse_if_received_elsewhere(&new.token_id)?;
                if !self.store.retry_failed_grant(&new)? {
                    g
                } else {
                    new
                }
            }
            // Another device's token (already applied to it, or being redeemed for it): for
            // this device it is spent. Its answer would hand over A's session and identity.
            Some(g) if g.mac != new.mac => {
                tracing::info!(token_id = %g.token_id, "token of another device posted again");
                return Err(RedeemError::TokenSpent.into());
            }
            Some(g) => g,
            None => {
                self.refuse_if_received_elsewhere(&new.token_id)?;
                // Durable before the mint sees the token: a crash after the swap is recoverable.
                // The fsync runs off the async workers so other requests keep being served.
                let (store, g) = (self.store.clone(), new.clone());
                tokio::task::spawn_blocking(move || store.insert_grant(&g))
                    .await
                    .map_err(|e| MerchantError::Internal {
                        message: format!("recording the grant: {e}"),
                    })??;
                new
            }
        };
        self.finish(grant).await
    }

    /// Drives one grant to its end state (shared by purchase retries and reconcile).
    async fn finish(&self, mut grant: Grant) -> Result<Purchase, MerchantError> {
        let mut redeem = None;
        match grant.status {
            GrantStatus::Applied => {
                return Ok(Purchase {
                    session_json: grant.answer.unwrap_or_default(),
                    replayed: true,
                    redeem: None,
                })
            }
            GrantStatus::RejectedBelowMin => {
                let offer = self.cfg.offer(&grant.mint);
                return Err(MerchantError::BelowMinimum {
                    steps: grant.steps,
                    min_steps: offer.map_or(0, |o| o.purchase_min_steps),
                    notice_json: grant.answer.unwrap_or_default(),
                });
            }
            GrantStatus::Redeeming | GrantStatus::Failed => {
                let started = Instant::now();
                let received = self.redeemer.receive(&grant.token).await;
                redeem = Some(started.elapsed());
                match received {
                    Ok(r) => {
                        self.store.mark_redeemed(&grant.token_id, r.gross, r.net)?;
                        grant.gross = r.gross;
                        grant.net = r.net;
                        grant.status = GrantStatus::Redeemed;
                    }
                    Err(e) => {
                        let status = if e.is_final() {
                            GrantStatus::Failed
                        } else {
                            GrantStatus::Redeeming
                        };
                        self.store.set_grant_status(
                            &grant.token_id,
                            status,
                            Some(&e.to_string()),
                        )?;
                        return Err(e.into());
                    }
                }
            }
            GrantStatus::Redeemed => {}
        }
        let mut p = self.apply(grant)?;
        p.redeem = redeem;
        Ok(p)
    }

    fn apply(&self, grant: Grant) -> Result<Purchase, MerchantError> {
        let offer = self
            .cfg
            .offer(&grant.mint)
            .ok_or_else(|| MerchantError::Internal {
                message: format!("received from {} which is no longer configured", grant.mint),
            })?;
        let customer = grant
            .customer
            .as_deref()
            .and_then(|h| PublicKey::from_hex(h).ok());
        // The tier as bought (one removed from the config since counts as the default: the
        // customer gets more steps, never fewer).
        let tier = grant
            .tier
            .clone()
            .unwrap_or_else(|| crate::tiers::DEFAULT_TIER.into());
        let below_min = |steps: u64, factor: u64| -> Result<MerchantError, MerchantError> {
            let mut notice = Notice::error(
                NoticeCode::SessionError,
                format!(
                    "received {net} {unit} = {steps} steps at {price} {unit}/step, below the \
                     minimum purchase of {min} steps; the payment was received and is kept by \
                     this gateway (not refunded)",
                    net = grant.net,
                    unit = offer.unit,
                    price = offer.price_per_step.max(1).saturating_mul(factor),
                    min = offer.purchase_min_steps.max(1),
                ),
            );
            notice.customer = customer;
            let notice_json = self.notice(&notice)?;
            self.store
                .mark_rejected_below_min(&grant.token_id, steps, &notice_json)?;
            Ok(MerchantError::BelowMinimum {
                steps,
                min_steps: offer.purchase_min_steps,
                notice_json,
            })
        };
        let requested = self
            .chandler
            .tiers()
            .get(Some(&tier))
            .map_or(1, |t| t.factor);
        let (steps, enough) = steps_at(grant.net, offer, requested);
        if !enough {
            return Err(below_min(steps, requested)?);
        }
        let (net, step_size) = (grant.net, self.cfg.step_size);
        let price = move |factor: u64| {
            let (steps, enough) = steps_at(net, offer, factor);
            enough.then(|| (steps, steps.saturating_mul(step_size)))
        };
        let keys = self.cfg.keys.clone();
        let metric = self.cfg.metric;
        let mac = grant.mac;
        let answer = move |total: u64, tier: &str| {
            let s = Session {
                customer,
                mac,
                allotment: total,
                metric,
            };
            let tier = (tier != crate::tiers::DEFAULT_TIER).then_some(tier);
            match s.to_event_with_tier(&keys, crate::sys::clock::unix_secs(), tier) {
                Ok(ev) => ev.as_json(),
                Err(e) => {
                    // Unreachable with well-formed tags; the grant is still applied.
                    tracing::error!(error = %e, "signing session event");
                    String::new()
                }
            }
        };
        let view = match self.chandler.add_paid(
            mac,
            &tier,
            &price,
            GrantCommit {
                token_id: &grant.token_id,
                steps,
                answer: &answer,
            },
        ) {
            Ok(v) => v,
            // Priced at the session's dearer active tier it buys too little (the session
            // changed tier after the pre-flight check).
            Err(ChandlerError::BelowMinimum { tier, .. }) => {
                let factor = self
                    .chandler
                    .tiers()
                    .get(Some(&tier))
                    .map_or(1, |t| t.factor);
                return Err(below_min(steps_at(net, offer, factor).0, factor)?);
            }
            Err(source) => return Err(MerchantError::Apply { source }),
        };
        let allotment = view.allotment;
        let stored = self
            .store
            .grant(&grant.token_id)?
            .and_then(|g| g.answer)
            .unwrap_or_default();
        tracing::info!(%mac, token_id = %grant.token_id, net = grant.net, %tier, allotment, "grant applied");
        Ok(Purchase {
            session_json: stored,
            replayed: false,
            redeem: None,
        })
    }

    /// The price factor a default-tier payment for `mac` is charged now: the active tier's
    /// when the device has a session at a dearer one (1 otherwise, or when unknown).
    pub fn price_factor_for(&self, mac: MacAddr) -> u64 {
        let tiers = self.chandler.tiers();
        self.chandler
            .pricing_tier(mac, tiers.default_tier())
            .map_or(1, |t| t.factor)
    }

    /// Can a gate open for `mac` (before a customer is asked to pay)?
    pub fn preflight(&self, mac: MacAddr) -> Result<(), MerchantError> {
        self.chandler
            .check(mac)
            .map_err(|source| MerchantError::Unavailable { mac, source })
    }

    /// Grants value already in our wallet (a paid Lightning quote, minted): the same
    /// allotment rules and top-up as a token. `grant_id` (`ln:<quote>`) is the grant's key,
    /// so however often this runs (polls, restarts) the device is credited once.
    pub async fn grant_minted(
        &self,
        grant_id: &str,
        mac: MacAddr,
        mint: &str,
        amount: u64,
    ) -> Result<Purchase, MerchantError> {
        let offer = self.offer_for(mint, "sat")?.clone();
        let lock = self.token_lock(grant_id);
        let _held = lock.lock().await;
        let grant = match self.store.grant(grant_id)? {
            Some(g) => g,
            None => {
                let g = Grant {
                    token_id: grant_id.to_string(),
                    token: grant_id.to_string(),
                    mac,
                    customer: None,
                    mint: offer.url.clone(),
                    unit: offer.unit.clone(),
                    gross: amount,
                    net: amount,
                    steps: 0,
                    allotment: 0,
                    metric: self.cfg.metric,
                    status: GrantStatus::Redeemed,
                    answer: None,
                    error: None,
                    created_unix: crate::sys::clock::unix_secs(),
                    tier: None,
                };
                self.store.insert_grant(&g)?;
                self.count(&offer.url, "lightning", amount);
                g
            }
        };
        self.finish(grant).await
    }

    /// Start-up: finish grants stuck in `redeeming` / `redeemed` (receive is idempotent).
    /// Returns how many were applied.
    pub async fn reconcile(&self) -> Result<usize, MerchantError> {
        let mut applied = 0;
        for grant in self.store.unfinished_grants()? {
            let lock = self.token_lock(&grant.token_id);
            let _held = lock.lock().await;
            let token_id = grant.token_id.clone();
            match self.finish(grant).await {
                Ok(_) => applied += 1,
                Err(e) => tracing::warn!(%token_id, error = %e, "reconcile grant"),
            }
        }
        Ok(applied)
    }
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    /// A registered token and what receiving it does (gross amount or an error).
    pub type Entry = (TokenInfo, Result<u64, RedeemError>);

    /// In-memory wallet: tokens are `cashuB…` strings registered with an outcome.
    #[derive(Default)]
    pub struct FakeRedeemer {
        pub tokens: Mutex<HashMap<String, Entry>>,
        pub received: Mutex<HashMap<String, u64>>,
        pub receive_calls: AtomicU32,
        pub delay: Mutex<Duration>,
        /// Fee in base units per receive (gross - net).
        pub fee: u64,
    }

    impl FakeRedeemer {
        pub fn add(&self, token: &str, mint: &str, amount: u64, outcome: Result<(), RedeemError>) {
            let info = TokenInfo {
                token_id: format!("id-{token}"),
                mint: mint.into(),
                unit: "sat".into(),
                amount,
            };
            self.tokens
                .lock()
                .expect("lock")
                .insert(token.into(), (info, outcome.map(|_| amount)));
        }
        pub fn calls(&self) -> u32 {
            self.receive_calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl Redeemer for FakeRedeemer {
        fn inspect(&self, token: &str) -> Result<TokenInfo, RedeemError> {
            match self.tokens.lock().expect("lock").get(token) {
                Some((
                    _,
                    Err(
                        e @ (RedeemError::Locked
                        | RedeemError::MintNotAccepted { .. }
                        | RedeemError::InvalidToken { .. }),
                    ),
                )) => Err(e.clone()),
                Some((info, _)) => Ok(info.clone()),
                None => Err(RedeemError::InvalidToken {
                    reason: "unknown".into(),
                }),
            }
        }
        async fn receive(&self, token: &str) -> Result<Receipt, RedeemError> {
            self.receive_calls.fetch_add(1, Ordering::SeqCst);
            let delay = *self.delay.lock().expect("lock");
            tokio::time::sleep(delay).await;
            let (info, outcome) = self
                .tokens
                .lock()
                .expect("lock")
                .get(token)
                .cloned()
                .ok_or(RedeemError::InvalidToken {
                    reason: "unknown".into(),
                })?;
            let mut rec = self.received.lock().expect("lock");
            let replayed = rec.contains_key(&info.token_id);
            let gross = outcome?;
            rec.insert(info.token_id.clone(), gross);
            Ok(Receipt {
                token_id: info.token_id,
                mint: info.mint,
                unit: info.unit,
                gross,
                net: gross - self.fee.min(gross),
                replayed,
            })
        }
        fn has_receipt(&self, token_id: &str) -> Result<bool, RedeemError> {
            Ok(self.received.lock().expect("lock").contains_key(token_id))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::{fake::FakeRedeemer, *};
    use crate::{
        chandler::fake::FakeGates, config::ChandlerConfig, protocol::Metric, valve::Gates,
    };
    use std::time::Duration;

    pub const MINT: &str = "https://mint.example";

    pub fn offer(price: u64, min: u64) -> MintOffer {
        MintOffer {
            url: MINT.into(),
            price_per_step: price,
            unit: "sat".into(),
            purchase_min_steps: min,
            min_balance: 0,
            min_payout_amount: 0,
            payout_interval: Duration::from_secs(60),
            balance_tolerance_percent: 0,
        }
    }

    pub struct Rig {
        pub gates: Arc<FakeGates>,
        pub store: Arc<Store>,
        pub chandler: Arc<Chandler>,
        pub redeemer: Arc<FakeRedeemer>,
        pub merchant: Merchant,
    }

    pub fn rig(price: u64, min: u64, timeout: Duration) -> Rig {
        rig_with_fee(price, min, timeout, 0)
    }

    /// A rig whose fake mint takes `fee` per receive.
    pub fn rig_with_fee(price: u64, min: u64, timeout: Duration, fee: u64) -> Rig {
        rig_full(price, min, timeout, fee, crate::tiers::Tiers::default())
    }

    /// The default tier at 3000/1000 kbit/s, "fast" at 3× the price and 20000/5000 kbit/s.
    pub fn tiered_rig(min: u64) -> Rig {
        let default = crate::valve::Rates {
            down_kbit: 3_000,
            up_kbit: 1_000,
        };
        let tiers = crate::tiers::Tiers::new(
            default,
            &[crate::tiers::TierSettings {
                name: "fast".into(),
                down_kbit: 20_000,
                up_kbit: 5_000,
                price_factor: 3,
            }],
        );
        let r = rig_full(1, min, Duration::from_secs(5), 0, tiers);
        r.gates.lock().default_rates = default;
        r
    }

    fn rig_full(
        price: u64,
        min: u64,
        timeout: Duration,
        fee: u64,
        tiers: crate::tiers::Tiers,
    ) -> Rig {
        let gates = Arc::new(FakeGates::new());
        let store = Arc::new(Store::open_in_memory().expect("db"));
        let chandler = Arc::new(
            Chandler::new(
                ChandlerConfig {
                    metric: Metric::Bytes,
                    usage_snapshot_interval: Duration::from_secs(1),
                    closed_retention: Duration::from_secs(60),
                    bind_payer: true,
                },
                gates.clone(),
                store.clone(),
            )
            .with_tiers(tiers),
        );
        let redeemer = Arc::new(FakeRedeemer {
            fee,
            ..Default::default()
        });
        let cfg = MerchantConfig {
            metric: Metric::Bytes,
            step_size: 1000,
            mints: vec![offer(price, min)],
            payment_timeout: timeout,
            keys: Keys::generate(),
        };
        let merchant = Merchant::new(cfg, redeemer.clone(), chandler.clone(), store.clone());
        Rig {
            gates,
            store,
            chandler,
            redeemer,
            merchant,
        }
    }

    fn mac() -> MacAddr {
        "02:00:00:00:00:01".parse().expect("mac")
    }

    fn pay(t: &str) -> Payment {
        Payment {
            token: t.into(),
            customer: None,
            tier: None,
        }
    }

    #[test]
    fn pricing() {
        assert_eq!(steps_for(10, &offer(3, 0)), (3, true));
        assert_eq!(
            steps_for(2, &offer(3, 0)),
            (0, false),
            "zero steps is never a purchase"
        );
        assert_eq!(steps_for(9, &offer(3, 4)), (3, false));
        assert_eq!(steps_for(12, &offer(3, 4)), (4, true));
    }

    fn at(t: &str, tier: &str) -> Payment {
        Payment {
            tier: Some(tier.into()),
            ..pay(t)
        }
    }

    fn tier_tag(json: &str) -> Option<String> {
        let ev: serde_json::Value = serde_json::from_str(json).expect("json");
        ev["tags"]
            .as_array()
            .expect("tags")
            .iter()
            .find(|t| t[0] == "tier")
            .map(|t| t[1].as_str().expect("str").to_string())
    }

    /// Issue 15: the price of a tier, the conversion of what remains on an upgrade, a cheap
    /// top-up of a fast session priced at the fast tier, and an unknown tier refused before
    /// the token is redeemed. Step 1000 bytes, 1 sat per default step, "fast" 3 sat per step.
    #[tokio::test]
    async fn tiers_are_priced_converted_and_cannot_be_gamed() {
        let r = tiered_rig(1);
        let m = mac();
        let rates = |r: &Rig| r.gates.lock().gates[&m].rates;
        // 1. 30 sat at the default tier: 30 steps at the default rate.
        r.redeemer.add("cashuBd", MINT, 30, Ok(()));
        let p = r.merchant.purchase(m, pay("cashuBd")).await.expect("paid");
        assert_eq!(tier_tag(&p.session_json), None, "default: no tier tag");
        assert_eq!(rates(&r).down_kbit, 3_000);
        // 2. 6000 bytes used: 24000 (24 default steps) remain.
        r.gates.traffic(m, 6_000);
        // 3. An unknown tier is refused before the mint sees the token.
        r.redeemer.add("cashuBf", MINT, 9, Ok(()));
        let calls = r.redeemer.calls();
        let e = r
            .merchant
            .purchase(m, at("cashuBf", "slow"))
            .await
            .expect_err("unknown tier");
        assert!(matches!(e, MerchantError::Tier { .. }), "{e}");
        assert_eq!(e.code(), NoticeCode::InvalidRequest);
        assert!(e.to_string().contains("still yours"), "{e}");
        assert_eq!(r.redeemer.calls(), calls, "not redeemed");
        let huge = "f".repeat(10_000);
        let e = r
            .merchant
            .purchase(m, at("cashuBf", &huge))
            .await
            .expect_err("hostile tier");
        assert!(!e.to_string().contains(&huge[..100]), "not echoed");
        assert_eq!(r.redeemer.calls(), calls, "not redeemed");
        // 4. 9 sat at "fast": 3 fast steps (3000), and the 24000 default bytes left are worth
        //    24000 / 3 = 8000 at the fast tier: 6000 used + 8000 + 3000 = 17000.
        let p = r
            .merchant
            .purchase(m, at("cashuBf", "fast"))
            .await
            .expect("the same token pays at a known tier");
        assert_eq!(tier_tag(&p.session_json).as_deref(), Some("fast"));
        let v = r.chandler.usage(m).expect("usage").expect("session");
        assert_eq!((v.allotment, v.used, v.remaining), (17_000, 6_000, 11_000));
        assert_eq!(v.tier.as_deref(), Some("fast"));
        assert_eq!(r.gates.lock().gates[&m].remaining_bytes, Some(11_000));
        assert_eq!(
            rates(&r),
            crate::valve::Rates {
                down_kbit: 20_000,
                up_kbit: 5_000
            },
            "rate raised"
        );
        assert_eq!(r.store.grant("id-cashuBf").expect("g").expect("g").steps, 3);
        // 5. 9 sat at the default tier while "fast" is active: priced at fast, 3 steps.
        r.redeemer.add("cashuBc", MINT, 9, Ok(()));
        let p = r.merchant.purchase(m, pay("cashuBc")).await.expect("paid");
        assert_eq!(tier_tag(&p.session_json).as_deref(), Some("fast"));
        let v = r.chandler.usage(m).expect("usage").expect("session");
        assert_eq!(v.allotment, 20_000, "3 steps at the fast price, not 9");
        assert_eq!(rates(&r).down_kbit, 20_000, "still fast");
        assert_eq!(r.store.grant("id-cashuBc").expect("g").expect("g").steps, 3);
        // 6. Below the minimum at the active tier: refused unredeemed (2 sat = 0 fast steps).
        r.redeemer.add("cashuBtiny", MINT, 2, Ok(()));
        let calls = r.redeemer.calls();
        let e = r
            .merchant
            .purchase(m, pay("cashuBtiny"))
            .await
            .expect_err("below the minimum at the fast tier");
        assert!(matches!(e, MerchantError::BelowMinimum { .. }), "{e}");
        assert_eq!(r.redeemer.calls(), calls, "not redeemed");
        // 7. The advertisement: standard tags first, then one tier tag per tier and mint.
        let ad: serde_json::Value =
            serde_json::from_str(&r.merchant.advertisement().expect("ad")).expect("json");
        let tags = ad["tags"].as_array().expect("tags");
        let tier_at = tags.iter().position(|t| t[0] == "tier").expect("tier tag");
        assert!(tags[..tier_at].iter().any(|t| t[0] == "price_per_step"));
        assert_eq!(
            tags[tier_at],
            serde_json::json!(["tier", "fast", "20000", "5000", "cashu", "3", "sat", MINT, "1"])
        );
    }

    /// Adversary: a cheap and a fast payment of one device in flight at once (the mint slow,
    /// so both pass the pre-flight before either is applied). Pricing happens under the
    /// chandler's guard, so the order does not matter: either the fast one converts first and
    /// the cheap one is priced at fast, or the cheap one lands first and is converted with the
    /// rest. Both give 30000/3 + 3000 + 30000/3 = 23000 bytes; a race pricing the cheap
    /// payment at the default tier after the upgrade would give 43000.
    #[tokio::test]
    async fn concurrent_cheap_and_fast_payments_cannot_both_be_priced_cheap() {
        let r = tiered_rig(1);
        let m = mac();
        r.redeemer.add("cashuBfirst", MINT, 30, Ok(()));
        r.merchant
            .purchase(m, pay("cashuBfirst"))
            .await
            .expect("paid");
        *r.redeemer.delay.lock().expect("lock") = Duration::from_millis(100);
        r.redeemer.add("cashuBcheap", MINT, 30, Ok(()));
        r.redeemer.add("cashuBfast", MINT, 9, Ok(()));
        // The fast one is started first, so it is usually applied first: the cheap one then
        // passed its pre-flight at the default tier and is applied to a fast session.
        let (fast, cheap) = tokio::join!(
            r.merchant.purchase(m, at("cashuBfast", "fast")),
            r.merchant.purchase(m, pay("cashuBcheap")),
        );
        cheap.expect("cheap");
        fast.expect("fast");
        let v = r.chandler.usage(m).expect("usage").expect("session");
        assert_eq!(v.allotment, 23_000, "value conserved whatever the order");
        assert_eq!(v.tier.as_deref(), Some("fast"));
    }

    #[tokio::test]
    async fn purchase_then_retry_returns_same_session() {
        let r = rig(1, 0, Duration::from_secs(5));
        r.redeemer
            .add("cashuB1", "HTTPS://MINT.EXAMPLE/", 5, Ok(()));
        let p = r
            .merchant
            .purchase(mac(), pay("cashuB1"))
            .await
            .expect("purchase");
        assert!(!p.replayed);
        let ev = nostr::Event::from_json(&p.session_json).expect("event");
        let s = Session::from_event(&ev).expect("1022");
        assert_eq!((s.mac, s.allotment, s.customer), (mac(), 5000, None));
        let again = r
            .merchant
            .purchase(mac(), pay("cashuB1"))
            .await
            .expect("retry");
        assert_eq!(again.session_json, p.session_json);
        assert!(again.replayed);
        assert_eq!(r.redeemer.calls(), 1);
        assert_eq!(r.gates.lock().gates[&mac()].remaining_bytes, Some(5000));
    }

    /// Issue 12 item 3: device B posts the token already applied to device A. The shipped
    /// portal treats any 200 as "access granted", and A's kind 1022 names A's MAC.
    #[tokio::test]
    async fn another_devices_token_is_spent_and_does_not_leak_its_session() {
        let r = rig(1, 0, Duration::from_secs(5));
        r.redeemer.add("cashuBa", MINT, 5, Ok(()));
        r.merchant
            .purchase(mac(), pay("cashuBa"))
            .await
            .expect("A pays");
        let b: MacAddr = "02:00:00:00:00:02".parse().expect("mac");
        let e = r
            .merchant
            .purchase(b, pay("cashuBa"))
            .await
            .expect_err("B must not get A's session");
        assert_eq!(e.code(), NoticeCode::TokenSpent, "{e}");
        assert!(!e.to_string().contains(&mac().to_string()), "{e}");
        assert!(
            r.chandler.usage(b).expect("usage").is_none(),
            "B got nothing"
        );
        assert_eq!(r.redeemer.calls(), 1, "no second swap");
        // A's own retry still gets its stored answer.
        let again = r.merchant.purchase(mac(), pay("cashuBa")).await;
        assert!(again.expect("A retries").replayed);
    }

    /// Issue 12 item 5: we enforce at least one step, so we advertise at least one (Wally
    /// rejects an advertisement whose minimum is 0).
    #[test]
    fn advertises_the_minimum_it_enforces() {
        let r = rig(1, 0, Duration::from_secs(5));
        let ev = nostr::Event::from_json(r.merchant.advertisement().expect("ad")).expect("ev");
        let ad = Advertisement::from_event(&ev).expect("10021");
        assert_eq!(ad.prices[0].min_steps, 1);
        let limits: Vec<&[String]> = ev
            .tags
            .iter()
            .map(|t| t.as_slice())
            .filter(|t| t[0] == "step_purchase_limits")
            .collect();
        assert_eq!(
            limits,
            vec![&["step_purchase_limits", "1", "0"].map(String::from)[..]]
        );
    }

    #[tokio::test]
    async fn a_corrupted_copy_does_not_poison_the_genuine_token() {
        let r = rig(1, 0, Duration::from_secs(5));
        r.redeemer.add("cashuBgood", MINT, 4, Ok(()));
        // Same proofs (same token id), but receiving this encoding fails for good.
        let info = r.redeemer.tokens.lock().expect("lock")["cashuBgood"]
            .0
            .clone();
        r.redeemer.tokens.lock().expect("lock").insert(
            "cashuBgood-corrupted".into(),
            (info, Err(RedeemError::WrongUnit { unit: "?".into() })),
        );
        r.merchant
            .purchase(mac(), pay("cashuBgood-corrupted"))
            .await
            .expect_err("the corrupted copy fails");
        let p = r
            .merchant
            .purchase(mac(), pay("cashuBgood"))
            .await
            .expect("the genuine token still pays");
        let s = Session::from_event(&nostr::Event::from_json(&p.session_json).expect("event"))
            .expect("1022");
        assert_eq!(s.allotment, 4000);
    }

    #[tokio::test]
    async fn twenty_concurrent_posts_credit_once() {
        let r = rig(1, 0, Duration::from_secs(5));
        r.redeemer.add("cashuBx", MINT, 3, Ok(()));
        *r.redeemer.delay.lock().expect("lock") = Duration::from_millis(50);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let m = r.merchant.clone();
            set.spawn(async move { m.purchase(mac(), pay("cashuBx")).await });
        }
        let mut answers = std::collections::HashSet::new();
        while let Some(res) = set.join_next().await {
            answers.insert(res.expect("join").expect("purchase").session_json);
        }
        assert_eq!(answers.len(), 1, "every POST gets the same session event");
        assert_eq!(r.redeemer.calls(), 1);
        assert_eq!(
            r.chandler
                .usage(mac())
                .expect("usage")
                .expect("s")
                .allotment,
            3000
        );
    }

    #[tokio::test]
    async fn below_minimum_after_the_fee_keeps_value_and_says_so() {
        // Face value 6 = 3 steps passes the check before redeeming; the mint's fee of 1
        // leaves 5 = 2 steps, below the minimum of 3.
        let r = rig_with_fee(2, 3, Duration::from_secs(5), 1);
        r.redeemer.add("cashuBsmall", MINT, 6, Ok(()));
        let e = r
            .merchant
            .purchase(mac(), pay("cashuBsmall"))
            .await
            .expect_err("below min");
        let MerchantError::BelowMinimum {
            steps, notice_json, ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(*steps, 2);
        assert!(notice_json.contains("kept by this gateway"));
        assert!(notice_json.contains("session-error"));
        assert_eq!(
            r.store
                .grant("id-cashuBsmall")
                .expect("g")
                .expect("g")
                .status,
            GrantStatus::RejectedBelowMin
        );
        assert!(r.chandler.usage(mac()).expect("usage").is_none());
        // Retry: same notice, no second receive.
        let e2 = r
            .merchant
            .purchase(mac(), pay("cashuBsmall"))
            .await
            .expect_err("again");
        assert!(
            matches!(e2, MerchantError::BelowMinimum { notice_json: ref n, .. } if n == notice_json)
        );
        assert_eq!(r.redeemer.calls(), 1);
    }

    /// Before: the token was redeemed first and refused after (kept by the gateway).
    #[tokio::test]
    async fn below_minimum_face_value_is_refused_before_redeeming() {
        let r = rig(2, 3, Duration::from_secs(5));
        r.redeemer.add("cashuBsmall", MINT, 5, Ok(()));
        for _ in 0..2 {
            let e = r
                .merchant
                .purchase(mac(), pay("cashuBsmall"))
                .await
                .expect_err("below min");
            let MerchantError::BelowMinimum {
                steps, notice_json, ..
            } = &e
            else {
                panic!("{e:?}")
            };
            assert_eq!(*steps, 2);
            assert!(notice_json.contains("still yours"), "{notice_json}");
            assert_eq!(e.code(), NoticeCode::SessionError);
        }
        assert_eq!(r.redeemer.calls(), 0, "the mint never saw the token");
        assert!(r.store.grant("id-cashuBsmall").expect("g").is_none());
        assert!(r.chandler.usage(mac()).expect("usage").is_none());
    }

    /// Before: the wallet's `replayed` receipt was ignored and a second grant was created.
    #[tokio::test]
    async fn a_token_the_operator_already_received_is_token_spent() {
        let r = rig(1, 0, Duration::from_secs(5));
        r.redeemer.add("cashuBmine", MINT, 5, Ok(()));
        // `tollgate wallet receive cashuBmine`: the wallet credits it, no grant exists.
        Redeemer::receive(&*r.redeemer, "cashuBmine")
            .await
            .expect("operator receive");
        for _ in 0..2 {
            let e = r
                .merchant
                .purchase(mac(), pay("cashuBmine"))
                .await
                .expect_err("replay");
            assert_eq!(e.code(), NoticeCode::TokenSpent, "{e:?}");
        }
        assert!(r.chandler.usage(mac()).expect("usage").is_none());
        assert!(r.store.grant("id-cashuBmine").expect("g").is_none());
        assert_eq!(r.redeemer.calls(), 1, "only the operator's receive");
    }

    #[tokio::test]
    async fn offline_rejections_never_contact_the_mint() {
        let r = rig(1, 0, Duration::from_secs(5));
        r.redeemer
            .add("cashuBother", "https://other.example", 5, Ok(()));
        r.redeemer
            .add("cashuBlocked", MINT, 5, Err(RedeemError::Locked));
        let codes = [
            ("cashuBother", NoticeCode::MintNotAccepted),
            ("cashuBlocked", NoticeCode::LockedToken),
            ("cashuBunknown", NoticeCode::InvalidToken),
        ];
        for (t, code) in codes {
            let e = r.merchant.purchase(mac(), pay(t)).await.expect_err(t);
            assert_eq!(e.code(), code, "{t}");
        }
        assert_eq!(r.redeemer.calls(), 0);
    }

    #[tokio::test]
    async fn payments_are_counted_by_mint_and_outcome() {
        let r = rig(1, 0, Duration::from_secs(5));
        r.redeemer.add("cashuB1", MINT, 5, Ok(()));
        r.redeemer
            .add("cashuBother", "https://other.example", 5, Ok(()));
        r.merchant
            .purchase(mac(), pay("cashuB1"))
            .await
            .expect("ok");
        r.merchant
            .purchase(mac(), pay("cashuB1"))
            .await
            .expect("replay");
        assert!(r
            .merchant
            .purchase(mac(), pay("cashuBother"))
            .await
            .is_err());
        assert!(r.merchant.purchase(mac(), pay("garbage")).await.is_err());
        let counts = r.merchant.payment_counts();
        let find = |mint: &str, outcome: &str| {
            counts
                .iter()
                .find(|c| c.mint == mint && c.outcome == outcome)
                .map(|c| (c.count, c.sats))
        };
        let mint = canonical_mint_url(MINT).expect("url");
        assert_eq!(find(&mint, "accepted"), Some((1, 5)), "{counts:?}");
        assert_eq!(find(&mint, "replayed"), Some((1, 0)), "{counts:?}");
        assert_eq!(
            find("https://other.example", "payment-error-mint-not-accepted"),
            Some((1, 0)),
            "{counts:?}"
        );
        assert_eq!(
            find("unknown", "payment-error-invalid-token"),
            Some((1, 0)),
            "{counts:?}"
        );
    }

    #[tokio::test]
    async fn preflight_failure_takes_no_money() {
        let r = rig(1, 0, Duration::from_secs(5));
        r.redeemer.add("cashuB1", MINT, 5, Ok(()));
        r.gates.lock().full = true;
        let e = r
            .merchant
            .purchase(mac(), pay("cashuB1"))
            .await
            .expect_err("full");
        assert_eq!(e.code(), NoticeCode::ServiceUnavailable);
        assert_eq!(r.redeemer.calls(), 0);
        assert!(r.store.grant("id-cashuB1").expect("g").is_none());
    }

    #[tokio::test]
    async fn gate_failure_after_receive_keeps_value_and_retry_applies() {
        let r = rig(1, 0, Duration::from_secs(5));
        r.redeemer.add("cashuB1", MINT, 5, Ok(()));
        r.gates.lock().fail_open = true;
        let e = r
            .merchant
            .purchase(mac(), pay("cashuB1"))
            .await
            .expect_err("open fails");
        assert!(matches!(e, MerchantError::Apply { .. }), "{e:?}");
        assert_eq!(e.code(), NoticeCode::ServiceUnavailable);
        let g = r.store.grant("id-cashuB1").expect("g").expect("g");
        assert_eq!(
            (g.status, g.net),
            (GrantStatus::Redeemed, 5),
            "received value is recorded"
        );
        r.gates.lock().fail_open = false;
        let p = r
            .merchant
            .purchase(mac(), pay("cashuB1"))
            .await
            .expect("retry applies");
        assert!(!p.replayed);
        assert_eq!(r.redeemer.calls(), 1, "no second receive");
        assert_eq!(
            r.chandler.usage(mac()).expect("u").expect("s").allotment,
            5000
        );
    }

    #[tokio::test]
    async fn spent_token() {
        let r = rig(1, 0, Duration::from_secs(5));
        r.redeemer
            .add("cashuBspent", MINT, 5, Err(RedeemError::TokenSpent));
        let e = r
            .merchant
            .purchase(mac(), pay("cashuBspent"))
            .await
            .expect_err("spent");
        assert_eq!(e.code(), NoticeCode::TokenSpent);
        assert_eq!(
            r.store
                .grant("id-cashuBspent")
                .expect("g")
                .expect("g")
                .status,
            GrantStatus::Failed
        );
    }

    #[tokio::test]
    async fn late_mint_answer_is_applied_and_retry_gets_it() {
        let r = rig(1, 0, Duration::from_millis(20));
        r.redeemer.add("cashuBslow", MINT, 4, Ok(()));
        *r.redeemer.delay.lock().expect("lock") = Duration::from_millis(150);
        let e = r
            .merchant
            .purchase(mac(), pay("cashuBslow"))
            .await
            .expect_err("timeout");
        assert_eq!(e.code(), NoticeCode::ProcessingTimeout);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            r.chandler.usage(mac()).expect("u").expect("s").allotment,
            4000,
            "applied anyway"
        );
        *r.redeemer.delay.lock().expect("lock") = Duration::ZERO;
        let p = r
            .merchant
            .purchase(mac(), pay("cashuBslow"))
            .await
            .expect("retry");
        assert!(p.replayed);
        assert_eq!(r.redeemer.calls(), 1);
    }

    #[tokio::test]
    async fn reconcile_finishes_redeeming_and_redeemed_grants() {
        let r = rig(1, 0, Duration::from_secs(5));
        r.redeemer.add("cashuB1", MINT, 5, Ok(()));
        r.redeemer.add(
            "cashuB2",
            MINT,
            5,
            Err(RedeemError::MintUnavailable {
                mint: MINT.into(),
                message: "down".into(),
            }),
        );
        let e = r
            .merchant
            .purchase(mac(), pay("cashuB2"))
            .await
            .expect_err("mint down");
        assert_eq!(e.code(), NoticeCode::NoReachableMints);
        assert_eq!(
            r.store.grant("id-cashuB2").expect("g").expect("g").status,
            GrantStatus::Redeeming,
            "retried at start"
        );

        // Simulate a crash after the swap: grant redeemed, never applied.
        let g = Grant {
            token_id: "id-cashuB1".into(),
            token: "cashuB1".into(),
            mac: mac(),
            customer: None,
            mint: MINT.into(),
            unit: "sat".into(),
            gross: 5,
            net: 0,
            steps: 0,
            allotment: 0,
            metric: Metric::Bytes,
            status: GrantStatus::Redeeming,
            answer: None,
            error: None,
            created_unix: 0,
            tier: None,
        };
        r.store.insert_grant(&g).expect("insert");
        r.store.mark_redeemed("id-cashuB1", 5, 5).expect("redeemed");
        r.redeemer.add("cashuB2", MINT, 2, Ok(()));
        let n = r.merchant.reconcile().await.expect("reconcile");
        assert_eq!(n, 2);
        assert_eq!(
            r.chandler.usage(mac()).expect("u").expect("s").allotment,
            7000
        );
        assert!(r.store.unfinished_grants().expect("list").is_empty());
        assert_eq!(
            r.redeemer.calls(),
            2,
            "only the unredeemed one is received again"
        );
        assert!(r.gates.gate(mac()).expect("gate").expect("g").open);
    }
}

impl From<WalletError> for RedeemError {
    fn from(e: WalletError) -> Self {
        match e {
            WalletError::InvalidToken { reason } => RedeemError::InvalidToken { reason },
            WalletError::MintNotAccepted { mint } => RedeemError::MintNotAccepted { mint },
            WalletError::WrongUnit { unit } => RedeemError::WrongUnit { unit },
            WalletError::Locked => RedeemError::Locked,
            WalletError::TokenSpent => RedeemError::TokenSpent,
            WalletError::TokenPending => RedeemError::TokenPending,
            WalletError::MintUnavailable { mint, message } => {
                RedeemError::MintUnavailable { mint, message }
            }
            WalletError::RateLimited { retry_after_secs } => {
                RedeemError::RateLimited { retry_after_secs }
            }
            WalletError::InsufficientFunds {
                mint,
                needed,
                available,
            } => RedeemError::InsufficientFunds {
                message: format!("{mint}: need {needed}, available {available}"),
            },
            e @ (WalletError::Storage { .. }
            | WalletError::Seed { .. }
            | WalletError::Mnemonic { .. }) => RedeemError::Storage {
                message: e.to_string(),
            },
            other => RedeemError::Internal {
                message: other.to_string(),
            },
        }
    }
}

/// The real wallet behind the merchant's seam.
#[async_trait]
impl Redeemer for Wallet {
    fn inspect(&self, token: &str) -> Result<TokenInfo, RedeemError> {
        Wallet::inspect(self, token).map_err(RedeemError::from)
    }

    async fn receive(&self, token: &str) -> Result<Receipt, RedeemError> {
        // On the grant's behalf: a token the operator received in between (after the
        // `has_receipt` check) is `TokenSpent` here, not a replay to credit.
        Wallet::receive_as(self, token, crate::wallet::Receiver::Grant)
            .await
            .map_err(RedeemError::from)
    }

    fn has_receipt(&self, token_id: &str) -> Result<bool, RedeemError> {
        Wallet::has_receipt(self, token_id).map_err(RedeemError::from)
    }
}
