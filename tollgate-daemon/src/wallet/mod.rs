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
//! One file per operation, each its own `impl Wallet` with its state table:
//!
//! | file            | operation                                                  |
//! |-----------------|------------------------------------------------------------|
//! | [`open`]        | seed, cdk repository, ledger; `open`, `restore`            |
//! | [`recover`]     | crash recovery at every open                               |
//! | [`receive`]     | customers' tokens: decode, NUT-07, receipt, swap           |
//! | [`reserve`]     | funds set aside for an upcoming payment                    |
//! | [`send`]        | outgoing tokens for upstream gateways, reclaim             |
//! | [`balance`]     | balances, mint probes, operator warnings                   |
//! | [`issue`]       | Lightning mint quotes (the checkout)                       |
//! | [`payout`]      | profit payouts over LNURL-pay                              |
//! | [`rebalance`]   | moving funds between accepted mints                        |
//! | [`lnurl`]       | LNURL-pay resolution                                       |
//! | [`store`]       | our ledger (`ledger.sqlite`)                               |
//! | [`transport`]   | bounded HTTP to the mints                                  |
//! | [`test_hooks`]  | the crash harness's kill points, the race test's bypass    |
//!
//! Every operation that selects proofs of one mint (send, a melt's prepare, payout budget)
//! runs under that mint's lock, because cdk fails concurrent selections from one wallet.
//! `reserve` takes the same lock, so the check "available ≥ n" and the insert are atomic with
//! respect to payouts: the seed's race (payout drains the wallet between the chandler's
//! balance check and its token creation) cannot happen — a payout only ever spends
//! `balance − min_balance − reserved`. A payout's melt releases the lock once its inputs are
//! reserved in cdk, so a stalled melt holds nobody else (see [`payout`]).

mod balance;
mod issue;
mod lnurl;
mod open;
mod payout;
mod rebalance;
mod receive;
mod recover;
mod reserve;
mod send;
mod store;
mod test_hooks;
mod transport;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use cdk::mint_url::MintUrl;
use cdk::nuts::CurrencyUnit;
use cdk::wallet::WalletRepository;
use tokio::sync::{Mutex, RwLock};

pub use issue::{MintQuote, QuoteState};
pub use payout::PayoutRecord;
pub use rebalance::RebalanceRecord;
pub use receive::decode_token;
use store::Store;
#[doc(hidden)]
pub use test_hooks::TestHook;

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
    /// Our ledger or cdk's database failed.
    #[error("storage: {source}")]
    Storage {
        #[source]
        source: StorageError,
    },
    /// The seed file could not be read or written.
    #[error("seed file {path}: {source}")]
    Seed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The mnemonic is not valid BIP-39 (or none could be generated).
    #[error("invalid mnemonic: {source}")]
    Mnemonic {
        #[source]
        source: bip39::Error,
    },
    /// cdk failed in a way none of the above describes.
    #[error("cashu wallet: {source}")]
    Cdk {
        #[source]
        source: cdk::Error,
    },
}

/// Which database failed, with its error.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Our ledger (`ledger.sqlite`).
    #[error("ledger: {0}")]
    Ledger(#[source] rusqlite::Error),
    /// cdk's wallet database (`wallet.sqlite`).
    #[error("cdk database: {0}")]
    Cdk(#[source] cdk::cdk_database::Error),
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

impl Wallet {
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
}

/// cdk's database failed under us.
fn storage(e: cdk::cdk_database::Error) -> WalletError {
    WalletError::Storage {
        source: StorageError::Cdk(e),
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
