//! Opening the wallet: the seed file, cdk's repository over `wallet.sqlite` (one bounded
//! connector per accepted mint), our ledger, then [`recover`](super::recover) before anything
//! else runs.
//!
//! ```text
//! open:    state_dir/seed (created 0600 if missing) ─> build ─> recover
//! restore: mnemonic ─> seed written ─> build ─> NUT-09/13 restore per mint ─> recover
//! ```
//!
//! | seed file | `open`                          | `restore`                              |
//! |-----------|---------------------------------|----------------------------------------|
//! | missing   | a fresh 12-word mnemonic, 0600  | written from the words given           |
//! | present   | read (invalid words: `Mnemonic`) | replaced (tmp file + rename, no torn seed) |

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex as StdMutex};

use cdk::mint_url::MintUrl;
use cdk::wallet::WalletRepositoryBuilder;
use tokio::sync::{Mutex, RwLock};

use super::store::Store;
use super::{
    payout, storage, transport, unit_of, Inner, MintState, Wallet, WalletError, WalletSettings,
};

pub(super) fn write_seed(path: &Path, mnemonic: &bip39::Mnemonic) -> Result<(), WalletError> {
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

pub(super) fn load_or_create_seed(state_dir: &Path) -> Result<bip39::Mnemonic, WalletError> {
    let path = state_dir.join("seed");
    match std::fs::read_to_string(&path) {
        Ok(words) => {
            bip39::Mnemonic::parse(words.trim()).map_err(|source| WalletError::Mnemonic { source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mnemonic =
                bip39::Mnemonic::generate(12).map_err(|source| WalletError::Mnemonic { source })?;
            write_seed(&path, &mnemonic)?;
            Ok(mnemonic)
        }
        Err(source) => Err(WalletError::Seed { path, source }),
    }
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
        let mnemonic = bip39::Mnemonic::parse(mnemonic.trim())
            .map_err(|source| WalletError::Mnemonic { source })?;
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

    pub(super) async fn build(
        state_dir: &Path,
        mnemonic: bip39::Mnemonic,
        settings: WalletSettings,
    ) -> Result<Wallet, WalletError> {
        let db = Arc::new(
            cdk_sqlite::WalletSqliteDatabase::new(state_dir.join("wallet.sqlite"))
                .await
                .map_err(storage)?,
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

    /// The BIP-39 words of the wallet seed: the backup.
    pub fn mnemonic(&self) -> String {
        self.inner.mnemonic.to_string()
    }
}
