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
//!
//! Mints started with [`TestMint::start_linked`] share a [`Lightning`] network instead: an
//! invoice such a mint issues is paid when, and only when, a melt at another linked mint pays
//! it (or the test pays it with [`Lightning::pay`]) — what cross-mint rebalancing needs to be
//! tested honestly, since FakeWallet alone settles its own invoices at once and pays nothing.
//!
//! [`TestMint::gate`] catches the next request to one endpoint and holds it, so a crash test
//! can kill the wallet process while its request is in flight at the mint: dropped unseen,
//! processed with the answer lost, or forwarded only later (see [`GateMode`]).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdk::cdk_payment::{MintPayment, PaymentIdentifier, WaitPaymentResponse};
use cdk::mint::{MintBuilder, MintMeltLimits};
use cdk::nuts::nut00::KnownMethod;
use cdk::nuts::{CurrencyUnit, MeltQuoteState, PaymentMethod};
use cdk::types::FeeReserve;
use cdk::wallet::{SendOptions, Wallet, WalletBuilder};
use cdk::Amount;
pub use cdk_fake_wallet::FakeInvoiceDescription;
use cdk_fake_wallet::FakeWallet;

/// What the [`Gate`] does with the request it catches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// Hold it; on release it is dropped and never reaches the mint.
    Drop,
    /// Let the mint process it at once (detached from the client, so a dead client does not
    /// cancel it), then hold the answer: "the mint did it, the wallet never heard".
    Commit,
    /// Hold it, then forward it to the mint on release: "the request arrived late".
    Delay,
}

/// Catches the next request whose path starts with a prefix. See [`TestMint::gate`].
pub struct Gate {
    armed: std::sync::Mutex<Option<(String, GateMode)>>,
    /// Requests caught so far (for `Commit`: caught and processed by the mint).
    held: tokio::sync::watch::Sender<u32>,
    /// Releases counted; a held request waits for the next one.
    released: tokio::sync::watch::Sender<u32>,
    /// Caught requests fully dealt with after release (a `Delay` one forwarded and answered).
    finished: tokio::sync::watch::Sender<u32>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            armed: std::sync::Mutex::new(None),
            held: tokio::sync::watch::channel(0).0,
            released: tokio::sync::watch::channel(0).0,
            finished: tokio::sync::watch::channel(0).0,
        }
    }

    /// Catch the next request to a path starting with `path_prefix` (only that one).
    pub fn arm(&self, path_prefix: &str, mode: GateMode) {
        *self.armed.lock().expect("gate") = Some((path_prefix.to_string(), mode));
    }

    /// Disarm without catching anything.
    pub fn disarm(&self) {
        *self.armed.lock().expect("gate") = None;
    }

    /// Requests caught so far.
    pub fn held_count(&self) -> u32 {
        *self.held.borrow()
    }

    /// Wait until more than `seen` requests were caught; false on timeout.
    pub async fn wait_held(&self, seen: u32, timeout: Duration) -> bool {
        let mut rx = self.held.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n > seen))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Wait until more than `seen` caught requests were dealt with after their release.
    pub async fn wait_finished(&self, seen: u32, timeout: Duration) -> bool {
        let mut rx = self.finished.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n > seen))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Caught requests dealt with after release so far.
    pub fn finished_count(&self) -> u32 {
        *self.finished.borrow()
    }

    /// Let the caught request go (as its mode says).
    pub fn release(&self) {
        self.released.send_modify(|n| *n += 1);
    }

    fn take(&self, path: &str) -> Option<GateMode> {
        let mut armed = self.armed.lock().expect("gate");
        match armed.as_ref() {
            Some((prefix, mode)) if path.starts_with(prefix.as_str()) => {
                let mode = *mode;
                *armed = None;
                Some(mode)
            }
            _ => None,
        }
    }
}

async fn gate_layer(
    axum::extract::State(gate): axum::extract::State<Arc<Gate>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(mode) = gate.take(req.uri().path()) else {
        return next.run(req).await;
    };
    let released_before = *gate.released.borrow();
    // Everything in a task of its own: when the test kills the client, hyper drops this
    // future, but what the mint does with the request must not depend on that.
    tokio::spawn(async move {
        let mut pending = Some(req);
        let mut answer = None;
        if mode == GateMode::Commit {
            answer = Some(next.clone().run(pending.take().expect("request")).await);
        }
        gate.held.send_modify(|n| *n += 1);
        let mut rx = gate.released.subscribe();
        let _ = rx.wait_for(|n| *n > released_before).await;
        let response = match (answer, pending) {
            (Some(answer), _) => answer,
            (None, Some(req)) if mode == GateMode::Delay => next.run(req).await,
            _ => axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response(),
        };
        gate.finished.send_modify(|n| *n += 1);
        response
    })
    .await
    .unwrap_or_else(|_| axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A Lightning network between linked test mints (see [`TestMint::start_linked`]): a bolt11
/// invoice a linked mint issued is settled at that mint when a linked mint's melt pays it.
/// Cheap to clone; all clones are one network.
#[derive(Clone, Default)]
pub struct Lightning {
    /// Open and settled invoices by payment hash: (amount in sat, the issuing mint's side).
    invoices: Arc<std::sync::Mutex<HashMap<String, Invoice>>>,
}

/// An invoice a linked mint issued.
struct Invoice {
    /// In sat.
    amount: u64,
    id: PaymentIdentifier,
    to: Arc<Receiving>,
    paid: bool,
}

/// The receiving side of one linked mint's backend.
struct Receiving {
    events: tokio::sync::mpsc::UnboundedSender<WaitPaymentResponse>,
    settled: std::sync::Mutex<HashMap<PaymentIdentifier, Vec<WaitPaymentResponse>>>,
}

impl Lightning {
    /// A new, empty network.
    pub fn new() -> Lightning {
        Lightning::default()
    }

    /// Pay `bolt11` from outside the linked mints (the test's own node). False if no linked
    /// mint issued it or it was paid already.
    pub fn pay(&self, bolt11: &str) -> bool {
        match bolt11.parse::<cdk::Bolt11Invoice>() {
            Ok(inv) => self.settle(&inv.payment_hash().to_string()),
            Err(_) => false,
        }
    }

    /// Whether a linked mint issued this invoice and it has been paid.
    pub fn is_paid(&self, bolt11: &str) -> bool {
        let Ok(inv) = bolt11.parse::<cdk::Bolt11Invoice>() else {
            return false;
        };
        let invoices = self.invoices.lock().expect("lightning");
        invoices
            .get(&inv.payment_hash().to_string())
            .is_some_and(|i| i.paid)
    }

    fn settle(&self, hash: &str) -> bool {
        let (amount, id, to) = {
            let mut invoices = self.invoices.lock().expect("lightning");
            match invoices.get_mut(hash) {
                Some(i) if !i.paid => {
                    i.paid = true;
                    (i.amount, i.id.clone(), i.to.clone())
                }
                _ => return false,
            }
        };
        let response = WaitPaymentResponse {
            payment_identifier: id.clone(),
            payment_amount: cdk::Amount::new(amount, CurrencyUnit::Sat),
            payment_id: hash.to_string(),
        };
        to.settled
            .lock()
            .expect("settled")
            .entry(id)
            .or_default()
            .push(response.clone());
        let _ = to.events.send(response);
        true
    }
}

/// FakeWallet for everything except bolt11 invoices the mint issues (registered with the
/// [`Lightning`] network, paid only when someone pays them) and bolt11 payments (made by
/// FakeWallet, then settled at the linked mint that issued the invoice, if any).
struct LinkedBackend {
    fake: FakeWallet,
    lightning: Lightning,
    receiving: Arc<Receiving>,
    events: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<WaitPaymentResponse>>>,
    active: std::sync::atomic::AtomicBool,
}

type PaymentErr = cdk::cdk_payment::Error;

#[async_trait::async_trait]
impl MintPayment for LinkedBackend {
    type Err = PaymentErr;

    async fn get_settings(&self) -> Result<cdk::cdk_payment::SettingsResponse, PaymentErr> {
        self.fake.get_settings().await
    }

    async fn create_incoming_payment_request(
        &self,
        options: cdk::cdk_payment::IncomingPaymentOptions,
    ) -> Result<cdk::cdk_payment::CreateIncomingPaymentResponse, PaymentErr> {
        let cdk::cdk_payment::IncomingPaymentOptions::Bolt11(o) = options else {
            return self.fake.create_incoming_payment_request(options).await;
        };
        let sat = o.amount.value();
        let invoice = cdk_fake_wallet::create_fake_invoice(
            sat * 1000,
            o.description.clone().unwrap_or_default(),
        );
        let id = PaymentIdentifier::PaymentHash(*invoice.payment_hash().as_ref());
        self.lightning.invoices.lock().expect("lightning").insert(
            invoice.payment_hash().to_string(),
            Invoice {
                amount: sat,
                id: id.clone(),
                to: self.receiving.clone(),
                paid: false,
            },
        );
        Ok(cdk::cdk_payment::CreateIncomingPaymentResponse {
            request_lookup_id: id,
            request: invoice.to_string(),
            expiry: o.unix_expiry,
            extra_json: None,
        })
    }

    async fn get_payment_quote(
        &self,
        unit: &CurrencyUnit,
        options: cdk::cdk_payment::OutgoingPaymentOptions,
    ) -> Result<cdk::cdk_payment::PaymentQuoteResponse, PaymentErr> {
        self.fake.get_payment_quote(unit, options).await
    }

    async fn make_payment(
        &self,
        unit: &CurrencyUnit,
        options: cdk::cdk_payment::OutgoingPaymentOptions,
    ) -> Result<cdk::cdk_payment::MakePaymentResponse, PaymentErr> {
        let hash = match &options {
            cdk::cdk_payment::OutgoingPaymentOptions::Bolt11(o) => {
                Some(o.bolt11.payment_hash().to_string())
            }
            _ => None,
        };
        let made = self.fake.make_payment(unit, options).await?;
        if made.status == MeltQuoteState::Paid {
            if let Some(h) = hash {
                self.lightning.settle(&h);
            }
        }
        Ok(made)
    }

    async fn wait_payment_event(
        &self,
    ) -> Result<
        std::pin::Pin<Box<dyn futures::Stream<Item = cdk::cdk_payment::Event> + Send>>,
        PaymentErr,
    > {
        let rx = self
            .events
            .lock()
            .expect("events")
            .take()
            .ok_or_else(|| PaymentErr::Custom("payment event stream taken twice".into()))?;
        self.active.store(true, Ordering::SeqCst);
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|r| (cdk::cdk_payment::Event::PaymentReceived(r), rx))
        })))
    }

    fn is_payment_event_stream_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    fn cancel_payment_event_stream(&self) {
        self.active.store(false, Ordering::SeqCst);
    }

    async fn check_incoming_payment_status(
        &self,
        id: &PaymentIdentifier,
    ) -> Result<Vec<WaitPaymentResponse>, PaymentErr> {
        Ok(self
            .receiving
            .settled
            .lock()
            .expect("settled")
            .get(id)
            .cloned()
            .unwrap_or_default())
    }

    async fn check_outgoing_payment(
        &self,
        id: &PaymentIdentifier,
    ) -> Result<cdk::cdk_payment::MakePaymentResponse, PaymentErr> {
        self.fake.check_outgoing_payment(id).await
    }
}

/// An in-process mint over HTTP on loopback.
pub struct TestMint {
    addr: SocketAddr,
    gate: Arc<Gate>,
    fee_ppk: u64,
    mint: Arc<cdk::Mint>,
    server: tokio::task::JoinHandle<()>,
    /// The customer-side wallet that funds [`TestMint::mint_token`] (in-memory, random seed).
    customer: Wallet,
    /// Requests served and nanoseconds spent in the mint's HTTP handlers (benchmarks).
    served: Arc<(AtomicU64, AtomicU64)>,
    /// The network this mint's invoices are paid over, when linked.
    lightning: Option<Lightning>,
}

impl TestMint {
    /// Start a mint charging `fee_ppk` parts per thousand per input (NUT-02).
    pub async fn start(fee_ppk: u64) -> TestMint {
        Self::try_start(fee_ppk).await.expect("start test mint")
    }

    /// Like [`TestMint::start`] but listening on `ip` (a namespace address several gateways
    /// can reach) instead of loopback.
    pub async fn start_on(fee_ppk: u64, ip: std::net::IpAddr) -> TestMint {
        Self::try_start_on(fee_ppk, ip)
            .await
            .expect("start test mint")
    }

    /// Like [`TestMint::start`] but on the `lightning` network: its invoices are paid only
    /// when a linked mint's melt (or [`Lightning::pay`]) pays them. Customer funding
    /// ([`TestMint::mint_token`]) pays through the network by itself.
    pub async fn start_linked(fee_ppk: u64, lightning: &Lightning) -> TestMint {
        Self::try_start_with(
            fee_ppk,
            std::net::Ipv4Addr::LOCALHOST.into(),
            Some(lightning.clone()),
            0,
        )
        .await
        .expect("start linked test mint")
    }

    /// Like [`TestMint::start_on`], but the fake Lightning backend settles an incoming quote
    /// (and a melt) only `secs` seconds after it was made: a Lightning payment that arrives
    /// while the gateway is down.
    pub async fn start_with_payment_delay(ip: std::net::IpAddr, secs: u64) -> TestMint {
        Self::try_start_with(0, ip, None, secs)
            .await
            .expect("start test mint")
    }

    async fn try_start(fee_ppk: u64) -> anyhow::Result<TestMint> {
        Self::try_start_on(fee_ppk, std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    async fn try_start_on(fee_ppk: u64, ip: std::net::IpAddr) -> anyhow::Result<TestMint> {
        Self::try_start_with(fee_ppk, ip, None, 0).await
    }

    async fn try_start_with(
        fee_ppk: u64,
        ip: std::net::IpAddr,
        lightning: Option<Lightning>,
        payment_delay_secs: u64,
    ) -> anyhow::Result<TestMint> {
        let db = Arc::new(cdk_sqlite::mint::memory::empty().await?);
        let mut builder = MintBuilder::new(db.clone());
        // 1 % / at least 1 sat, like a small real Lightning node would reserve.
        let fee_reserve = FeeReserve {
            min_fee_reserve: 1.into(),
            percent_fee_reserve: 0.01,
        };
        // Delay 0 (the default): incoming quotes are paid at once so tests never sleep.
        let backend = FakeWallet::new(
            fee_reserve,
            HashMap::default(),
            HashSet::default(),
            payment_delay_secs,
            CurrencyUnit::Sat,
        );
        let processor: cdk::cdk_payment::DynMintPayment = match &lightning {
            None => Arc::new(backend),
            Some(net) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                Arc::new(LinkedBackend {
                    fake: backend,
                    lightning: net.clone(),
                    receiving: Arc::new(Receiving {
                        events: tx,
                        settled: Default::default(),
                    }),
                    events: std::sync::Mutex::new(Some(rx)),
                    active: Default::default(),
                })
            }
        };
        builder
            .add_payment_processor(
                CurrencyUnit::Sat,
                PaymentMethod::Known(KnownMethod::Bolt11),
                MintMeltLimits::new(1, 1_000_000),
                processor,
            )
            .await?;
        builder.set_unit_fee(&CurrencyUnit::Sat, fee_ppk)?;

        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
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

        let gate = Arc::new(Gate::new());
        let served: Arc<(AtomicU64, AtomicU64)> = Arc::default();
        // The gate is outermost, so a held request does not count as handler time.
        let router = cdk_axum::create_mint_router(mint.clone(), vec!["bolt11".into()])
            .await?
            .layer(axum::middleware::from_fn_with_state(served.clone(), timed))
            .layer(axum::middleware::from_fn_with_state(
                gate.clone(),
                gate_layer,
            ));
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
            gate,
            fee_ppk,
            mint,
            server,
            customer,
            served,
            lightning,
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
    ///
    /// A power-of-two `amount` takes the fast path: one proof per token, minted 250 at a time
    /// and wrapped into tokens offline (no swap per token), so thousands take seconds.
    pub async fn mint_tokens(&self, amount: u64, count: usize) -> Vec<String> {
        if amount.is_power_of_two() {
            return self.mint_single_proof_tokens(amount, count).await;
        }
        let total = (amount + 4) * count as u64;
        self.fund_customer(total).await.expect("fund customer");
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(self.mint_token(amount).await);
        }
        out
    }

    async fn mint_single_proof_tokens(&self, amount: u64, count: usize) -> Vec<String> {
        let url: cdk::mint_url::MintUrl = self.url().parse().expect("mint url");
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let n = (count - out.len()).min(250);
            let quote = self
                .customer
                .mint_quote(
                    PaymentMethod::BOLT11,
                    Some(Amount::from(amount * n as u64)),
                    None,
                    None,
                )
                .await
                .expect("mint quote");
            let proofs = self
                .customer
                .wait_and_mint_quote(
                    quote,
                    cdk::amount::SplitTarget::Values(vec![Amount::from(amount); n]),
                    Default::default(),
                    Duration::from_secs(30),
                )
                .await
                .expect("mint proofs");
            assert_eq!(proofs.len(), n, "one proof per token");
            for p in proofs {
                let t = cdk::nuts::Token::new(url.clone(), vec![p], None, CurrencyUnit::Sat);
                out.push(t.to_string());
            }
        }
        out
    }

    /// The mint's URL, `http://127.0.0.1:<port>` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request gate in front of this mint's HTTP API (disarmed unless a test arms it).
    pub fn gate(&self) -> &Gate {
        &self.gate
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
        if let Some(net) = &self.lightning {
            anyhow::ensure!(
                net.pay(&quote.request),
                "funding invoice unknown to the network"
            );
        }
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
