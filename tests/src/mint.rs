//! A real Cashu mint for tests: cdk's `Mint` on an in-memory SQLite database with
//! `cdk_fake_wallet::FakeWallet` as its Lightning backend, served over real HTTP on
//! `127.0.0.1:<free port>` inside the test process.
//!
//! ```no_run
//! # async fn demo() {
//! let mint = tollgate_tests::mint::TestMint::start(100).await; // 100 ppk input fee
//! let token = mint.mint_token(64).await; // a cashuB token a customer would pay with
//! # }
//! ```
//!
//! FakeWallet settles every incoming mint quote at once and "pays" every bolt11 on melt. An
//! invoice whose description is a JSON [`FakeInvoiceDescription`] makes a melt fail or stay
//! pending: see [`fake_invoice`]. Dropping the `TestMint` stops the server.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdk::mint::{MintBuilder, MintMeltLimits};
use cdk::nuts::nut00::KnownMethod;
use cdk::nuts::{CurrencyUnit, MeltQuoteState, PaymentMethod};
use cdk::types::FeeReserve;
use cdk::wallet::{SendOptions, Wallet, WalletBuilder};
use cdk::Amount;
pub use cdk_fake_wallet::FakeInvoiceDescription;
use cdk_fake_wallet::FakeWallet;

/// An in-process mint over HTTP on loopback.
pub struct TestMint {
    addr: SocketAddr,
    fee_ppk: u64,
    mint: Arc<cdk::Mint>,
    server: tokio::task::JoinHandle<()>,
    /// The customer-side wallet that funds [`TestMint::mint_token`] (in-memory, random seed).
    customer: Wallet,
    /// Requests served and nanoseconds spent in the mint's HTTP handlers (benchmarks).
    served: Arc<(AtomicU64, AtomicU64)>,
}

impl TestMint {
    /// Start a mint charging `fee_ppk` parts per thousand per input (NUT-02).
    pub async fn start(fee_ppk: u64) -> TestMint {
        Self::try_start(fee_ppk).await.expect("start test mint")
    }

    async fn try_start(fee_ppk: u64) -> anyhow::Result<TestMint> {
        let db = Arc::new(cdk_sqlite::mint::memory::empty().await?);
        let mut builder = MintBuilder::new(db.clone());
        // 1 % / at least 1 sat, like a small real Lightning node would reserve.
        let fee_reserve = FeeReserve {
            min_fee_reserve: 1.into(),
            percent_fee_reserve: 0.01,
        };
        // Delay 0: incoming quotes are paid at once so tests never sleep.
        let backend = FakeWallet::new(
            fee_reserve,
            HashMap::default(),
            HashSet::default(),
            0,
            CurrencyUnit::Sat,
        );
        builder
            .add_payment_processor(
                CurrencyUnit::Sat,
                PaymentMethod::Known(KnownMethod::Bolt11),
                MintMeltLimits::new(1, 1_000_000),
                Arc::new(backend),
            )
            .await?;
        builder.set_unit_fee(&CurrencyUnit::Sat, fee_ppk)?;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let url = format!("http://{addr}");
        let builder = builder
            .with_name("tollgate test mint".to_string())
            .with_urls(vec![url.clone()]);
        let mut seed = [0u8; 64];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = (i as u8) ^ (addr.port() as u8) ^ (fee_ppk as u8);
        }
        let mint = Arc::new(builder.build_with_seed(db, &seed).await?);
        mint.start().await?;

        let served: Arc<(AtomicU64, AtomicU64)> = Arc::default();
        let router = cdk_axum::create_mint_router(mint.clone(), vec!["bolt11".into()])
            .await?
            .layer(axum::middleware::from_fn_with_state(served.clone(), timed));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });

        let customer = WalletBuilder::new()
            .mint_url(url.parse()?)
            .unit(CurrencyUnit::Sat)
            .localstore(Arc::new(cdk_sqlite::wallet::memory::empty().await?))
            .seed(random_seed())
            .without_rate_limiting()
            .build()?;

        Ok(TestMint {
            addr,
            fee_ppk,
            mint,
            server,
            customer,
            served,
        })
    }

    /// `(requests, total time)` the mint's HTTP handlers have served so far, measured
    /// server-side (from the request's arrival to the response's headers).
    pub fn handler_time(&self) -> (u64, Duration) {
        (
            self.served.0.load(Ordering::Relaxed),
            Duration::from_nanos(self.served.1.load(Ordering::Relaxed)),
        )
    }

    /// `count` tokens worth `amount` sat each, funded by one mint quote (benchmarks).
    pub async fn mint_tokens(&self, amount: u64, count: usize) -> Vec<String> {
        let total = (amount + 4) * count as u64;
        self.fund_customer(total).await.expect("fund customer");
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(self.mint_token(amount).await);
        }
        out
    }

    /// The mint's URL, `http://127.0.0.1:<port>` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The input fee in parts per thousand this mint charges.
    pub fn fee_ppk(&self) -> u64 {
        self.fee_ppk
    }

    /// The cdk mint itself, for tests that need to look at quotes.
    pub fn inner(&self) -> &Arc<cdk::Mint> {
        &self.mint
    }

    /// A customer's cashuB token worth exactly `amount` sat at this mint.
    pub async fn mint_token(&self, amount: u64) -> String {
        self.try_mint_token(amount)
            .await
            .expect("mint a test token")
    }

    async fn try_mint_token(&self, amount: u64) -> anyhow::Result<String> {
        self.fund_customer(amount).await?;
        let prepared = self
            .customer
            .prepare_send(Amount::from(amount), SendOptions::default())
            .await?;
        Ok(prepared.confirm(None).await?.to_string())
    }

    /// Mint `amount` (plus headroom for swap fees) into the customer wallet.
    async fn fund_customer(&self, amount: u64) -> anyhow::Result<()> {
        // Sending an exact amount may need a swap whose fee comes out of the customer's
        // balance, so top up with some margin.
        let want = amount + amount * self.fee_ppk / 1000 + 8;
        let have: u64 = self.customer.total_balance().await?.into();
        if have >= want {
            return Ok(());
        }
        let quote = self
            .customer
            .mint_quote(PaymentMethod::BOLT11, Some(Amount::from(want)), None, None)
            .await?;
        self.customer
            .wait_and_mint_quote(
                quote,
                Default::default(),
                Default::default(),
                Duration::from_secs(30),
            )
            .await?;
        Ok(())
    }

    /// A fresh, empty wallet at this mint (random seed, in-memory DB): a second customer, or
    /// the recipient side of a payout.
    pub async fn new_wallet(&self) -> Wallet {
        WalletBuilder::new()
            .mint_url(self.url().parse().expect("mint url"))
            .unit(CurrencyUnit::Sat)
            .localstore(Arc::new(
                cdk_sqlite::wallet::memory::empty()
                    .await
                    .expect("memory db"),
            ))
            .seed(random_seed())
            .without_rate_limiting()
            .build()
            .expect("build wallet")
    }
}

impl Drop for TestMint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn timed(
    axum::extract::State(served): axum::extract::State<Arc<(AtomicU64, AtomicU64)>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = Instant::now();
    let resp = next.run(req).await;
    served.0.fetch_add(1, Ordering::Relaxed);
    served
        .1
        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    resp
}

/// A bolt11 invoice that FakeWallet pays (or not) as `description` says: for a melt that
/// fails, use `pay_invoice_state: Failed, check_payment_state: Failed, pay_err: true`; for
/// one that stays pending, `Pending` for both.
pub fn fake_invoice(amount_msat: u64, description: &FakeInvoiceDescription) -> String {
    let desc = serde_json::to_string(description).expect("serialise description");
    cdk_fake_wallet::create_fake_invoice(amount_msat, desc).to_string()
}

/// Description for an invoice whose payment fails.
pub fn failing_description() -> FakeInvoiceDescription {
    FakeInvoiceDescription {
        pay_invoice_state: MeltQuoteState::Failed,
        check_payment_state: MeltQuoteState::Failed,
        pay_err: true,
        check_err: false,
    }
}

/// Description for an invoice whose payment stays pending.
pub fn pending_description() -> FakeInvoiceDescription {
    FakeInvoiceDescription {
        pay_invoice_state: MeltQuoteState::Pending,
        check_payment_state: MeltQuoteState::Pending,
        pay_err: false,
        check_err: false,
    }
}

fn random_seed() -> [u8; 64] {
    // Two fresh secp256k1 secret keys: random enough for a throwaway test wallet without
    // another rand dependency.
    let mut seed = [0u8; 64];
    for chunk in seed.chunks_mut(32) {
        chunk.copy_from_slice(&cdk::nuts::SecretKey::generate().secret_bytes());
    }
    seed
}
