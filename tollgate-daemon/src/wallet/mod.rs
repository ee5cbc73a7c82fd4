//! The merchant wallet: receives customers' Cashu tokens, pays upstream gateways, pays out
//! profits over Lightning. One cdk [`WalletRepository`] over `state_dir/wallet.sqlite` holds
//! the proofs and cdk's write-ahead sagas; `state_dir/ledger.sqlite` ([`store`]) holds what
//! the gateway promised on top (receipts, reservations, outgoing tokens, payouts).
//!
//! ```text
//! customer token ─inspect (offline)─> receipt row 'pending' ─NUT-07─> swap ─> 'done' (net)
//! chandler ─reserve(mint, n)─> reservation ─create_payment_token(.., Some(r))─> token
//! payout tick ─lock(mint)─> balance − min_balance − reserved ─LNURL─> melt ─> payout row
//! ```
//!
//! Every operation that selects proofs of one mint (send, a melt's prepare, payout budget)
//! runs under that mint's lock, because cdk fails concurrent selections from one wallet.
//! `reserve` takes the same lock, so the check "available ≥ n" and the insert are atomic with
//! respect to payouts: the seed's race (payout drains the wallet between the chandler's
//! balance check and its token creation) cannot happen — a payout only ever spends
//! `balance − min_balance − reserved`. A payout's melt releases the lock once its inputs are
//! reserved in cdk, so a stalled melt holds nobody else (see [`payout`]).
//!
//! Reservation states:
//!
//! | state    | meaning                                   | leaves by                      |
//! |----------|-------------------------------------------|--------------------------------|
//! | active   | row in `reservations`, `expires_at` ahead | consumed by a token, `release` |
//! | expired  | row with `expires_at` past: ignored       | pruned on open / next reserve  |
//!
//! Receipt states (idempotent receive, keyed by the proof set's id):
//!
//! | state   | meaning                          | on a repeated `receive` / restart             |
//! |---------|----------------------------------|-----------------------------------------------|
//! | pending | swap may be in flight            | resolved: cdk tx record, else NUT-07 + retry  |
//! | done    | credited `net`                   | returns the first receipt, `replayed = true`; |
//! |         |                                  | `TokenSpent` to another [`Receiver`]          |
//! | spent   | someone else spent the proofs    | `TokenSpent` again                            |
//!
//! Crash recovery at every open, in this order: cdk's saga recovery and pending melts →
//! the proofs that recovery released from its sagas, checked with the mint (cdk releases them
//! on local state alone; a send killed inside its swap would count the spent inputs again) →
//! our own proofs left reserved/pending without a saga, settled by NUT-07 → pending receipts
//! → outgoing tokens still `creating` (never handed out) revoked → `pending` payouts whose
//! melt never reached the mint marked `failed`. `tests/tests/wallet_crash.rs` SIGKILLs a
//! harness process at each step and checks the result against the mint.
//!
//! Rebalances (moving funds between accepted mints over Lightning) are a saga of their own
//! with a durable row per step, settled at open after the payouts: see [`rebalance`].
//!
//! Payout states: `pending` (melt sent, Lightning unresolved; finalised on later ticks and at
//! open) → `paid` | `failed` (proofs returned to the wallet by cdk's melt saga).
//! A `skipped` row records an unreachable recipient; the share stays in the wallet.

mod issue;
mod lnurl;
mod payout;
mod rebalance;
mod store;
mod transport;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use cdk::amount::SplitTarget;
use cdk::cdk_database::WalletDatabase;
use cdk::mint_url::MintUrl;
use cdk::nuts::{CheckStateRequest, CurrencyUnit, PublicKey, State, Token};
use cdk::wallet::{ReceiveOptions, SendOptions, WalletRepository, WalletRepositoryBuilder};
use cdk::Amount;
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, RwLock};

pub use issue::{MintQuote, QuoteState};
pub use payout::PayoutRecord;
pub use rebalance::RebalanceRecord;
use store::{ReceiptState, Store};

/// Largest token string we even try to decode; real tokens are a few KiB.
const MAX_TOKEN_LEN: usize = 64 * 1024;

/// One accepted mint.
#[derive(Debug, Clone)]
pub struct MintSettings {
    /// Mint URL as configured; compared after [`MintUrl`] normalisation.
    pub url: String,
    /// Currency unit; only `sat` is supported.
    pub unit: String,
    /// Never pay out below this balance.
    pub min_balance: u64,
    /// Skip a payout round while the balance is below this.
    pub min_payout_amount: u64,
    /// Payout period for this mint.
    pub payout_interval_seconds: u64,
    /// Tolerated overpayment, in percent, when an exact token is not possible.
    pub balance_tolerance_percent: u64,
}

impl MintSettings {
    /// A mint with the reference daemon's defaults (interval 60 s, tolerance 10 %).
    pub fn new(url: impl Into<String>) -> MintSettings {
        MintSettings {
            url: url.into(),
            unit: "sat".to_string(),
            min_balance: 0,
            min_payout_amount: 0,
            payout_interval_seconds: 60,
            balance_tolerance_percent: 10,
        }
    }
}

/// One profit-share recipient.
#[derive(Debug, Clone)]
pub struct ProfitShare {
    /// Identity name (`owner` is paid first).
    pub identity: String,
    /// Share in [0, 1]; shares sum to 1.
    pub factor: f64,
    /// `user@domain` Lightning address.
    pub lightning_address: String,
}

/// The wallet's section of the configuration.
#[derive(Debug, Clone)]
pub struct WalletSettings {
    /// Accepted mints.
    pub mints: Vec<MintSettings>,
    /// Profit-share recipients.
    pub profit_share: Vec<ProfitShare>,
    /// Maximum Lightning + input fees for a rebalance, in percent of the amount (+ 1 sat).
    pub rebalance_fee_budget_percent: u64,
    /// Let the upstream buyer move a shortfall from another accepted mint before a purchase.
    pub auto_rebalance: bool,
    /// Default reservation lifetime.
    pub reservation_ttl: Duration,
    /// Allow plain-http LNURL on loopback hosts. Tests only.
    pub allow_loopback_lnurl: bool,
    /// TEST ONLY: make reservations no-ops, to prove the race test catches the seed's bug.
    #[doc(hidden)]
    pub bypass_reservations_for_tests: bool,
    /// TEST ONLY: called at named points inside money-moving operations (see [`TestHook`]),
    /// so crash tests can kill the process exactly there.
    #[doc(hidden)]
    pub test_hook: TestHook,
}

/// TEST ONLY: a callback the wallet calls with a point name (`receive:pending`,
/// `send:prepared`, `send:confirmed`, `melt:recorded`, …) right before or after a step that
/// moves money. The crash harness uses it to SIGKILL itself at that point; production
/// settings leave it empty, which costs one `Option` check per point.
#[doc(hidden)]
#[derive(Clone, Default)]
pub struct TestHook(Option<Arc<dyn Fn(&'static str) + Send + Sync>>);

impl TestHook {
    /// A hook calling `f` at every point.
    pub fn new(f: impl Fn(&'static str) + Send + Sync + 'static) -> TestHook {
        TestHook(Some(Arc::new(f)))
    }

    fn at(&self, point: &'static str) {
        if let Some(f) = &self.0 {
            f(point);
        }
    }
}

impl fmt::Debug for TestHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "TestHook(set)"
        } else {
            "TestHook(none)"
        })
    }
}

impl WalletSettings {
    /// Settings with the given mints and defaults elsewhere.
    pub fn new(mints: Vec<MintSettings>) -> WalletSettings {
        WalletSettings {
            mints,
            profit_share: Vec::new(),
            rebalance_fee_budget_percent: 2,
            auto_rebalance: true,
            reservation_ttl: Duration::from_secs(30),
            allow_loopback_lnurl: false,
            bypass_reservations_for_tests: false,
            test_hook: TestHook::default(),
        }
    }
}

/// The wallet's errors. The merchant maps them to TollGate notice codes.
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    /// Not a decodable Cashu token.
    #[error("invalid token: {reason}")]
    InvalidToken { reason: String },
    /// The token's mint is not one we accept.
    #[error("mint not accepted: {mint}")]
    MintNotAccepted { mint: String },
    /// The token's unit is not one we accept.
    #[error("unit not accepted: {unit}")]
    WrongUnit { unit: String },
    /// P2PK/HTLC-locked proofs are never accepted as payment.
    #[error("token is locked by spending conditions")]
    Locked,
    /// The token's proofs are already spent.
    #[error("token already spent")]
    TokenSpent,
    /// The token's proofs are in a pending transaction at the mint.
    #[error("token is pending at the mint")]
    TokenPending,
    /// The mint could not be reached or answered with an error.
    #[error("mint {mint} unavailable: {message}")]
    MintUnavailable { mint: String, message: String },
    /// The mint rate-limits us.
    #[error("mint rate limited, retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// Not enough unreserved funds.
    #[error("insufficient funds at {mint}: need {needed}, available {available}")]
    InsufficientFunds {
        mint: String,
        needed: u64,
        available: u64,
    },
    /// The reservation does not exist or has expired.
    #[error("reservation {id} unknown or expired")]
    ReservationExpired { id: String },
    /// No outgoing token with that operation id.
    #[error("unknown operation {op_id}")]
    UnknownOperation { op_id: String },
    /// Resolving a Lightning address failed.
    #[error("lnurl {address}: {message}")]
    Lnurl { address: String, message: String },
    /// The operation would exceed its fee budget.
    #[error("fee {fee} exceeds budget {budget}")]
    FeeBudget { fee: u64, budget: u64 },
    /// The request itself makes no sense (zero amount, same source and target, …).
    #[error("invalid request: {message}")]
    InvalidRequest { message: String },
    /// Our own database failed.
    #[error("storage: {message}")]
    Storage { message: String },
    /// The seed file could not be read or written.
    #[error("seed file {path}: {source}")]
    Seed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The mnemonic is not valid BIP-39.
    #[error("invalid mnemonic: {message}")]
    Mnemonic { message: String },
    /// cdk failed in a way none of the above describes.
    #[error("cashu wallet: {source}")]
    Cdk {
        #[source]
        source: cdk::Error,
    },
}

impl WalletError {
    fn from_cdk(mint: &str, e: cdk::Error) -> WalletError {
        match e {
            cdk::Error::TokenAlreadySpent => WalletError::TokenSpent,
            cdk::Error::TokenPending => WalletError::TokenPending,
            cdk::Error::HttpError(Some(429), _) => WalletError::RateLimited {
                retry_after_secs: 60,
            },
            cdk::Error::HttpError(_, message) => WalletError::MintUnavailable {
                mint: mint.to_string(),
                message,
            },
            cdk::Error::Timeout => WalletError::MintUnavailable {
                mint: mint.to_string(),
                message: "timeout".to_string(),
            },
            cdk::Error::InsufficientFunds => WalletError::InsufficientFunds {
                mint: mint.to_string(),
                needed: 0,
                available: 0,
            },
            // The token's own content is wrong (forged or corrupted signatures, unknown keyset,
            // duplicate proofs…): the customer's fault, not ours, and nothing was swapped.
            e @ (cdk::Error::DHKE(_)
            | cdk::Error::NUT00(_)
            | cdk::Error::NUT10(_)
            | cdk::Error::NUT11(_)
            | cdk::Error::NUT12(_)
            | cdk::Error::CouldNotVerifyDleq
            | cdk::Error::DleqProofNotProvided
            | cdk::Error::KeysetUnknown(_)
            | cdk::Error::UnknownKeySet
            | cdk::Error::DuplicateInputs
            | cdk::Error::AmountKey
            | cdk::Error::ProofContentTooLarge { .. }
            | cdk::Error::MultipleUnits
            | cdk::Error::UnitMismatch) => WalletError::InvalidToken {
                reason: e.to_string(),
            },
            source => WalletError::Cdk { source },
        }
    }
}

/// What [`Wallet::inspect`] learns from a token without network access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// sha256 over the sorted proof secrets: the same proofs give the same id whatever the
    /// encoding (v3/v4, memo, order).
    pub token_id: String,
    /// Canonical mint URL.
    pub mint: String,
    /// Unit (`sat`).
    pub unit: String,
    /// Face value (before the mint's input fee).
    pub amount: u64,
}

/// The result of [`Wallet::receive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub token_id: String,
    pub mint: String,
    pub unit: String,
    /// Face value of the token.
    pub gross: u64,
    /// Credited after the mint's input fee: price the customer with this.
    pub net: u64,
    /// True when this token was already received before (nothing credited this time).
    pub replayed: bool,
}

/// Balance of one accepted mint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintBalance {
    pub mint: String,
    pub unit: String,
    /// Unspent proofs.
    pub balance: u64,
    /// Sum of active reservations.
    pub reserved: u64,
    /// `balance − reserved`.
    pub available: u64,
}

/// Whether an accepted mint answered `GET /v1/info` (NUT-06) in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintProbe {
    pub mint: String,
    pub reachable: bool,
    /// Why not, when unreachable.
    pub error: Option<String>,
}

/// On whose behalf a token is received: a receipt credits its receiver only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receiver {
    /// The operator (`tollgate wallet receive`, the wallet's own callers).
    Operator,
    /// A customer's payment for access (the merchant's grant).
    Grant,
}

impl Receiver {
    fn as_str(self) -> &'static str {
        match self {
            Receiver::Operator => "operator",
            Receiver::Grant => "grant",
        }
    }
}

/// Funds set aside for one upcoming payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: String,
    pub mint: String,
    pub amount: u64,
}

/// A token created for an upstream gateway.
#[derive(Clone, PartialEq, Eq)]
pub struct OutgoingToken {
    /// The encoded token (cashuB).
    pub token: String,
    /// cdk send operation id: pass to [`Wallet::reclaim`] if the upstream rejects the token.
    pub op_id: String,
    pub mint: String,
    /// Requested amount: what the receiver nets after its swap fee.
    pub amount: u64,
    /// Face value of the token.
    pub value: u64,
    /// Input fee the receiver pays to swap the token.
    pub receiver_fee: u64,
}

impl fmt::Debug for OutgoingToken {
    // The token is bearer money: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingToken")
            .field("op_id", &self.op_id)
            .field("mint", &self.mint)
            .field("amount", &self.amount)
            .field("value", &self.value)
            .field("receiver_fee", &self.receiver_fee)
            .finish()
    }
}

/// An outgoing token as recorded in the ledger (the token itself is not kept there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingRecord {
    pub op_id: String,
    pub mint: String,
    pub amount: u64,
    pub value: u64,
    /// `creating` (not handed out yet), `issued`, `claimed` (the payee redeemed it, seen at
    /// a later open), `reclaimed`, `revoked` or `failed`.
    pub state: String,
}

/// The wallet. Cheap to clone.
#[derive(Clone)]
pub struct Wallet {
    inner: Arc<Inner>,
}

struct MintState {
    settings: MintSettings,
    url: MintUrl,
    /// Serialises proof selection at this mint (cdk's prepare reads the unspent proofs, then
    /// reserves them all-or-nothing: two prepares at once pick the same proofs and one fails
    /// "proof not in unspent state") and makes every budget check-and-reserve atomic. A
    /// payout's melt releases it once cdk holds its inputs `Reserved`; sends still hold it.
    lock: Mutex<()>,
    /// Shared while a cdk saga of this mint has a request on its way to the mint (a payout's
    /// melt, a send's swap); exclusive for whoever resumes this mint's sagas outside `open`
    /// (`finalize_pending_melts`, `recover_incomplete_sagas`, a melt quote's status), which
    /// would otherwise find a melt the mint has not seen yet unpaid and hand its inputs
    /// back. Order: `lock` before `in_flight`, never the other way round.
    in_flight: RwLock<()>,
    /// One payout round at a time at this mint.
    payout_round: Mutex<()>,
}

struct Inner {
    settings: WalletSettings,
    mnemonic: bip39::Mnemonic,
    repo: WalletRepository,
    db: Arc<cdk_sqlite::WalletSqliteDatabase>,
    store: Store,
    mints: BTreeMap<String, MintState>,
    /// Per-token locks so concurrent receives of one token run one after the other.
    receiving: StdMutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Minimum purchase per mint registered by the chandler, for warnings.
    minimum_purchase: StdMutex<HashMap<String, u64>>,
    payouts: payout::PayoutState,
}

fn unit_of(s: &str) -> Result<CurrencyUnit, WalletError> {
    match s {
        "sat" => Ok(CurrencyUnit::Sat),
        other => Err(WalletError::WrongUnit {
            unit: other.to_string(),
        }),
    }
}

/// Canonical form of a mint URL (lower-case host, no trailing slash).
pub fn canonical_mint_url(url: &str) -> Result<String, WalletError> {
    MintUrl::from_str(url.trim())
        .map(|u| u.to_string())
        .map_err(|_| WalletError::MintNotAccepted {
            mint: url.to_string(),
        })
}

fn write_seed(path: &Path, mnemonic: &bip39::Mnemonic) -> Result<(), WalletError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let seed_err = |source| WalletError::Seed {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(seed_err)?;
    f.write_all(mnemonic.to_string().as_bytes())
        .map_err(seed_err)?;
    f.sync_all().map_err(seed_err)?;
    // Rename so a crash never leaves a half-written seed behind.
    std::fs::rename(&tmp, path).map_err(seed_err)
}

fn load_or_create_seed(state_dir: &Path) -> Result<bip39::Mnemonic, WalletError> {
    let path = state_dir.join("seed");
    match std::fs::read_to_string(&path) {
        Ok(words) => bip39::Mnemonic::parse(words.trim()).map_err(|e| WalletError::Mnemonic {
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mnemonic = bip39::Mnemonic::generate(12).map_err(|e| WalletError::Mnemonic {
                message: e.to_string(),
            })?;
            write_seed(&path, &mnemonic)?;
            Ok(mnemonic)
        }
        Err(source) => Err(WalletError::Seed { path, source }),
    }
}

/// Y = hash_to_curve(secret) of each proof: how the mint (NUT-07) and cdk's records name them.
fn token_ys(token: &Token) -> Result<Vec<PublicKey>, WalletError> {
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

impl Wallet {
    /// Open (or create) the wallet in `state_dir` and recover whatever a previous run left
    /// half-done.
    pub async fn open(state_dir: &Path, settings: WalletSettings) -> Result<Wallet, WalletError> {
        std::fs::create_dir_all(state_dir).map_err(|source| WalletError::Seed {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let mnemonic = load_or_create_seed(state_dir)?;
        let wallet = Self::build(state_dir, mnemonic, settings).await?;
        wallet.recover().await?;
        Ok(wallet)
    }

    /// Recreate the wallet from `mnemonic` after losing the database: writes the seed, then
    /// runs NUT-09/13 restore on every accepted mint before anything else touches the
    /// deterministic counters (a fresh counter would make the mint answer "outputs already
    /// signed").
    pub async fn restore(
        state_dir: &Path,
        mnemonic: &str,
        settings: WalletSettings,
    ) -> Result<Wallet, WalletError> {
        std::fs::create_dir_all(state_dir).map_err(|source| WalletError::Seed {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let mnemonic =
            bip39::Mnemonic::parse(mnemonic.trim()).map_err(|e| WalletError::Mnemonic {
                message: e.to_string(),
            })?;
        write_seed(&state_dir.join("seed"), &mnemonic)?;
        let wallet = Self::build(state_dir, mnemonic, settings).await?;
        for state in wallet.inner.mints.values() {
            let w = wallet.cdk_wallet(state).await?;
            let restored = w
                .restore()
                .await
                .map_err(|e| WalletError::from_cdk(&state.settings.url, e))?;
            tracing::info!(mint = %state.url, unspent = %restored.unspent, "restored from seed");
        }
        wallet.recover().await?;
        Ok(wallet)
    }

    async fn build(
        state_dir: &Path,
        mnemonic: bip39::Mnemonic,
        settings: WalletSettings,
    ) -> Result<Wallet, WalletError> {
        let db = Arc::new(
            cdk_sqlite::WalletSqliteDatabase::new(state_dir.join("wallet.sqlite"))
                .await
                .map_err(|e| WalletError::Storage {
                    message: e.to_string(),
                })?,
        );
        let repo = WalletRepositoryBuilder::new()
            .localstore(db.clone())
            .seed(mnemonic.to_seed_normalized(""))
            // cdk's default (20 requests, then 20/min per host) would stall a busy gateway.
            .with_rate_limiting_disabled()
            .build()
            .await
            .map_err(|e| WalletError::Cdk { source: e })?;
        let mut mints = BTreeMap::new();
        for m in &settings.mints {
            let url =
                MintUrl::from_str(m.url.trim()).map_err(|_| WalletError::MintNotAccepted {
                    mint: m.url.clone(),
                })?;
            let unit = unit_of(&m.unit)?;
            // Every wallet (new or loaded from the database) talks to its mint through the
            // bounded transport: no mint call waits forever.
            let connector = cdk::wallet::BaseHttpClient::with_transport(
                url.clone(),
                transport::Bounded::new(transport::DEFAULT_CALL_TIMEOUT),
                None,
            );
            let config = cdk::wallet::WalletConfig::new().with_mint_connector(Arc::new(connector));
            repo.create_wallet(url.clone(), unit, Some(config))
                .await
                .map_err(|e| WalletError::Cdk { source: e })?;
            mints.insert(
                url.to_string(),
                MintState {
                    settings: m.clone(),
                    url,
                    lock: Mutex::new(()),
                    in_flight: RwLock::new(()),
                    payout_round: Mutex::new(()),
                },
            );
        }
        let store = Store::open(&state_dir.join("ledger.sqlite"))?;
        Ok(Wallet {
            inner: Arc::new(Inner {
                settings,
                mnemonic,
                repo,
                db,
                store,
                mints,
                receiving: StdMutex::new(HashMap::new()),
                minimum_purchase: StdMutex::new(HashMap::new()),
                payouts: payout::PayoutState::default(),
            }),
        })
    }

    /// Start-up recovery: cdk sagas, pending melts, our pending receipts, stale reservations.
    /// A mint that is down is logged and skipped: its sagas stay and are retried next start.
    async fn recover(&self) -> Result<(), WalletError> {
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
    async fn release_orphaned_proofs(
        &self,
        state: &MintState,
        w: &cdk::Wallet,
    ) -> Result<(), WalletError> {
        let db = &self.inner.db;
        let storage = |e: cdk::cdk_database::Error| WalletError::Storage {
            message: e.to_string(),
        };
        let unit = unit_of(&state.settings.unit)?;
        let held = db
            .get_proofs(
                Some(state.url.clone()),
                Some(unit),
                Some(vec![State::Reserved, State::Pending, State::PendingSpent]),
                None,
            )
            .await
            .map_err(storage)?;
        if held.is_empty() {
            return Ok(());
        }
        let open: Vec<uuid::Uuid> = db
            .get_incomplete_sagas()
            .await
            .map_err(storage)?
            .into_iter()
            .map(|s| s.id)
            .collect();
        let orphans: Vec<PublicKey> = held
            .iter()
            .filter(|p| p.derivation_index.is_some())
            .filter(|p| p.used_by_operation.is_none_or(|op| !open.contains(&op)))
            .map(|p| p.y)
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
    async fn adopt_swapped_token_proofs(&self, state: &MintState) -> Result<(), WalletError> {
        use cdk::wallet::types::{OperationData, SendSagaState, WalletSagaState};
        let db = &self.inner.db;
        let storage = |e: cdk::cdk_database::Error| WalletError::Storage {
            message: e.to_string(),
        };
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
    async fn held_by_open_sagas(&self, state: &MintState) -> Result<Vec<PublicKey>, WalletError> {
        let db = &self.inner.db;
        let storage = |e: cdk::cdk_database::Error| WalletError::Storage {
            message: e.to_string(),
        };
        let open: Vec<uuid::Uuid> = db
            .get_incomplete_sagas()
            .await
            .map_err(storage)?
            .into_iter()
            .map(|s| s.id)
            .collect();
        if open.is_empty() {
            return Ok(Vec::new());
        }
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
            .filter(|p| p.used_by_operation.is_some_and(|op| open.contains(&op)))
            .map(|p| p.y)
            .collect())
    }

    /// cdk's saga recovery releases a saga's reserved proofs from the local state alone: a
    /// send that died inside its swap (the swap's inputs are reserved under the *send's* id,
    /// so the swap's own recovery restores the outputs but never marks those inputs spent)
    /// gets its compensation, and the spent inputs come back as unspent — counted twice next
    /// to the restored outputs. Of the proofs `held` before recovery, those it made unspent
    /// are settled by the mint's word (NUT-07). If the mint cannot answer, they are kept
    /// pending (not counted) for the next open to settle: never count what may be spent.
    async fn verify_released_proofs(
        &self,
        state: &MintState,
        w: &cdk::Wallet,
        held: Vec<PublicKey>,
    ) -> Result<(), WalletError> {
        if held.is_empty() {
            return Ok(());
        }
        let db = &self.inner.db;
        let storage = |e: cdk::cdk_database::Error| WalletError::Storage {
            message: e.to_string(),
        };
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
    async fn settle_by_mint(
        &self,
        state: &MintState,
        w: &cdk::Wallet,
        ys: Vec<PublicKey>,
    ) -> Result<(usize, usize), WalletError> {
        let storage = |e: cdk::cdk_database::Error| WalletError::Storage {
            message: e.to_string(),
        };
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

    fn hook(&self, point: &'static str) {
        self.inner.settings.test_hook.at(point);
    }

    /// Tokens created but never handed out (crash between cdk's confirm and our return):
    /// nobody else can hold them, so take them back. A row whose cdk saga is gone was
    /// compensated by cdk itself (the crash came before the token existed).
    async fn recover_unissued_tokens(&self) -> Result<(), WalletError> {
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
            let saga = self
                .inner
                .db
                .get_saga(&uuid)
                .await
                .map_err(|e| WalletError::Storage {
                    message: e.to_string(),
                })?;
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

    fn mint_state(&self, mint: &str) -> Result<&MintState, WalletError> {
        let key = canonical_mint_url(mint)?;
        self.inner
            .mints
            .get(&key)
            .ok_or(WalletError::MintNotAccepted { mint: key })
    }

    async fn cdk_wallet(&self, state: &MintState) -> Result<cdk::Wallet, WalletError> {
        let unit = unit_of(&state.settings.unit)?;
        self.inner
            .repo
            .get_wallet(&state.url, &unit)
            .await
            .map_err(|e| WalletError::Cdk { source: e })
    }

    /// The BIP-39 words of the wallet seed: the backup.
    pub fn mnemonic(&self) -> String {
        self.inner.mnemonic.to_string()
    }

    /// Decode and check a token without touching the network.
    pub fn inspect(&self, token: &str) -> Result<TokenInfo, WalletError> {
        let (info, _) = self.decode(token)?;
        Ok(info)
    }

    fn decode(&self, raw: &str) -> Result<(TokenInfo, Token), WalletError> {
        decode_token(raw, |mint| {
            self.inner
                .mints
                .get(mint)
                .map(|state| state.settings.unit.as_str())
        })
    }
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
    let s = raw.trim();
    let s = s
        .strip_prefix("cashu:")
        .or_else(|| s.strip_prefix("CASHU:"))
        .unwrap_or(s)
        .trim();
    let token = Token::from_str(s).map_err(|e| WalletError::InvalidToken {
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

    async fn receive_locked(
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
    async fn resolve_pending_receipt(
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

    async fn completed_incoming(
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
    async fn cleanup_foreign_receive(&self, w: &cdk::Wallet, ys: &[PublicKey]) {
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

    async fn balance_of(&self, state: &MintState) -> Result<u64, WalletError> {
        let w = self.cdk_wallet(state).await?;
        let b: u64 = w
            .total_balance()
            .await
            .map_err(|e| WalletError::Cdk { source: e })?
            .into();
        Ok(b)
    }

    fn reserved_of(&self, mint_key: &str) -> Result<u64, WalletError> {
        if self.inner.settings.bypass_reservations_for_tests {
            return Ok(0);
        }
        self.inner.store.reserved(mint_key)
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
        if !self.inner.settings.bypass_reservations_for_tests {
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
            Some(r) if !self.inner.settings.bypass_reservations_for_tests => {
                match self.inner.store.reservation(&r.id)? {
                    Some((m, amt)) if m == key => amt,
                    _ => {
                        return Err(WalletError::ReservationExpired { id: r.id.clone() });
                    }
                }
            }
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

    /// True when this wallet already has a receipt for the token (received, being received,
    /// or found spent), whoever asked for it: the merchant refuses to sell access for a token
    /// the operator already received with `tollgate wallet receive`.
    pub fn has_receipt(&self, token_id: &str) -> Result<bool, WalletError> {
        Ok(self.inner.store.receipt(token_id)?.is_some())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WalletSettings {
        WalletSettings::new(vec![MintSettings::new("https://Mint.Example.com/")])
    }

    #[tokio::test]
    async fn open_creates_private_seed_and_reopens_same() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let w = Wallet::open(dir.path(), settings()).await.expect("open");
        let words = w.mnemonic();
        assert_eq!(words.split_whitespace().count(), 12);
        let mode = std::fs::metadata(dir.path().join("seed"))
            .expect("seed")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(w);
        let w = Wallet::open(dir.path(), settings()).await.expect("reopen");
        assert_eq!(w.mnemonic(), words);
    }

    #[tokio::test]
    async fn inspect_rejects_garbage_and_oversized() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = Wallet::open(dir.path(), settings()).await.expect("open");
        for bad in ["", "cashuB", "cashu:xyz", "hello", "cashuAeyJ"] {
            assert!(
                matches!(w.inspect(bad), Err(WalletError::InvalidToken { .. })),
                "{bad}"
            );
        }
        let big = "cashuB".to_string() + &"A".repeat(MAX_TOKEN_LEN);
        assert!(matches!(
            w.inspect(&big),
            Err(WalletError::InvalidToken { .. })
        ));
    }

    #[test]
    fn canonical_urls_compare_equal() {
        assert_eq!(
            canonical_mint_url("https://Mint.Example.com/").expect("ok"),
            canonical_mint_url("https://mint.example.com").expect("ok")
        );
    }
}
