//! Payouts over Lightning (LNURL-pay on loopback, real mints over HTTP) and the seed's race
//! between a payout tick and the chandler's token creation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tollgate::wallet::{MintSettings, ProfitShare, Wallet, WalletError, WalletSettings};
use tollgate_tests::lnurl::{Behaviour, LnurlServer, REDIRECT_TARGET};
use tollgate_tests::mint::TestMint;

fn settings(mint: &TestMint, min_balance: u64, shares: Vec<ProfitShare>) -> WalletSettings {
    let mut m = MintSettings::new(mint.url());
    m.min_balance = min_balance;
    m.min_payout_amount = min_balance + 1;
    let mut s = WalletSettings::new(vec![m]);
    s.profit_share = shares;
    s.allow_loopback_lnurl = true;
    s
}

fn share(identity: &str, factor: f64, address: String) -> ProfitShare {
    ProfitShare {
        identity: identity.to_string(),
        factor,
        lightning_address: address,
    }
}

/// 1. Fund 1000 sat at a 100 ppk mint; 2. pay out above min_balance 100 to three recipients;
/// 3. owner is paid first, every share's amount + fee fits in the share, the balance never goes
/// below min_balance and the recipient mint issued exactly the invoices that were paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payout_splits_across_three_recipients_with_fees() {
    let mint = TestMint::start(100).await;
    let recipient_mint = TestMint::start(0).await;
    let ln = LnurlServer::start(&recipient_mint).await;
    let shares = vec![
        share("dev", 0.2, ln.add_user("dev", Behaviour::Normal)),
        share("owner", 0.5, ln.add_user("owner", Behaviour::Normal)),
        share("ops", 0.3, ln.add_user("ops", Behaviour::Normal)),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let wallet = Wallet::open(dir.path(), settings(&mint, 100, shares))
        .await
        .expect("open");
    let net = wallet
        .receive(&mint.mint_token(1000).await)
        .await
        .expect("fund")
        .net;
    let records = wallet.payout_once(&mint.url()).await.expect("payout");
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(records[0].identity, "owner");
    assert!(records.iter().all(|r| r.outcome == "paid"), "{records:?}");
    let payable = net - 100;
    for r in &records {
        let factor = match r.identity.as_str() {
            "owner" => 0.5,
            "ops" => 0.3,
            _ => 0.2,
        };
        let share = (payable as f64 * factor).floor() as u64;
        assert!(r.amount + r.fee <= share, "{r:?} exceeds share {share}");
        assert!(r.amount > 0);
        assert_eq!(ln.invoiced_to(&r.identity), r.amount);
    }
    let balance = wallet.balances().await.expect("b")[0].balance;
    assert!(balance >= 100, "balance {balance} below min_balance");
    let spent: u64 = records.iter().map(|r| r.amount + r.fee).sum();
    assert_eq!(balance, net - spent, "everything accounted for");
    // Below min_payout_amount now (or close): a second round pays nothing out of min_balance.
    wallet.payout_once(&mint.url()).await.expect("payout 2");
    assert!(wallet.balances().await.expect("b")[0].balance >= 100);
}

/// An unreachable non-owner keeps its share in the wallet (recorded `skipped`); a failing
/// owner melt stops the round and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_recipient_and_failing_melt_lose_nothing() {
    let mint = TestMint::start(0).await;
    let recipient_mint = TestMint::start(0).await;
    let ln = LnurlServer::start(&recipient_mint).await;
    let shares = vec![
        share("owner", 0.5, ln.add_user("owner", Behaviour::Normal)),
        share("dev", 0.5, ln.add_user("dev", Behaviour::Unreachable)),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let wallet = Wallet::open(dir.path(), settings(&mint, 0, shares))
        .await
        .expect("open");
    wallet
        .receive(&mint.mint_token(400).await)
        .await
        .expect("fund");
    let records = wallet.payout_once(&mint.url()).await.expect("payout");
    let owner = records
        .iter()
        .find(|r| r.identity == "owner")
        .expect("owner");
    let dev = records.iter().find(|r| r.identity == "dev").expect("dev");
    assert_eq!(owner.outcome, "paid");
    assert_eq!(dev.outcome, "skipped");
    let balance = wallet.balances().await.expect("b")[0].balance;
    assert_eq!(
        balance,
        400 - owner.amount - owner.fee,
        "dev's share stayed"
    );
    assert!(wallet.warnings().await.iter().any(|w| w.contains("dev@")));

    // Owner's melt fails at the mint: proofs come back, dev is not paid this round.
    ln.set_behaviour("owner", Behaviour::FailingMelt);
    ln.set_behaviour("dev", Behaviour::Normal);
    let records = wallet.payout_once(&mint.url()).await.expect("payout");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].identity, "owner");
    assert_eq!(records[0].outcome, "failed");
    assert_eq!(wallet.balances().await.expect("b")[0].balance, balance);
}

/// A hostile LNURL server: a redirect (to a payable address on loopback) is refused, not
/// followed, and a 1 MiB answer is refused unread past 64 KiB. Both shares stay in the wallet
/// (recorded `skipped`) and no invoice is paid. Before: both were paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lnurl_redirects_and_oversized_answers_are_refused() {
    let mint = TestMint::start(0).await;
    let recipient_mint = TestMint::start(0).await;
    let ln = LnurlServer::start(&recipient_mint).await;
    ln.add_user(REDIRECT_TARGET, Behaviour::Normal);
    for (user, behaviour, why) in [
        ("redirector", Behaviour::Redirect, "redirect refused"),
        ("big", Behaviour::Oversized, "larger than"),
    ] {
        let shares = vec![share("owner", 1.0, ln.add_user(user, behaviour))];
        let dir = tempfile::tempdir().expect("tempdir");
        let wallet = Wallet::open(dir.path(), settings(&mint, 0, shares))
            .await
            .expect("open");
        wallet
            .receive(&mint.mint_token(400).await)
            .await
            .expect("fund");
        let records = wallet.payout_once(&mint.url()).await.expect("payout");
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].outcome, "skipped", "{records:?}");
        let message = records[0].message.clone().unwrap_or_default();
        assert!(message.contains(why), "{user}: {message}");
        assert!(ln.invoices().is_empty(), "{:?}", ln.invoices());
        assert_eq!(wallet.balances().await.expect("b")[0].balance, 400);
    }
}

/// A melt that stays pending is recorded once, survives a restart still pending, is not
/// paid again, and its proofs are not counted as spendable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_melt_survives_restart_and_is_not_repaid() {
    let mint = TestMint::start(0).await;
    let recipient_mint = TestMint::start(0).await;
    let ln = LnurlServer::start(&recipient_mint).await;
    let shares = vec![share(
        "owner",
        1.0,
        ln.add_user("owner", Behaviour::PendingMelt),
    )];
    let dir = tempfile::tempdir().expect("tempdir");
    let wallet = Wallet::open(dir.path(), settings(&mint, 50, shares.clone()))
        .await
        .expect("open");
    wallet
        .receive(&mint.mint_token(300).await)
        .await
        .expect("fund");
    let records = wallet.payout_once(&mint.url()).await.expect("payout");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].outcome, "pending", "{records:?}");
    let after = wallet.balances().await.expect("b")[0].balance;
    assert!(after >= 50, "never below min_balance: {after}");
    drop(wallet);

    let wallet = Wallet::open(dir.path(), settings(&mint, 50, shares))
        .await
        .expect("reopen");
    let all = wallet.payouts().await.expect("payouts");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].outcome, "pending");
    // Next round: only what is above min_balance and not in flight could go out.
    let records = wallet.payout_once(&mint.url()).await.expect("payout 2");
    let balance = wallet.balances().await.expect("b")[0].balance;
    assert!(balance >= 50, "{balance}");
    assert!(records.iter().all(|r| r.amount + r.fee <= after - 50));
}

/// The seed's race. Concurrent mode (`forced = false`): each iteration the chandler reserves,
/// a payout round is spawned on another worker (it drains everything payable), the chandler
/// waits 5–24 ms (long enough for the round to reach the mint) and creates its token; a
/// refill task keeps customers paying. Forced mode: the payout round runs to completion
/// exactly between the reservation and the token creation — the seed's interleaving, every
/// iteration, no timing involved. With reservations, no token creation after a successful
/// reserve ever fails for lack of funds, and payouts never touch reserved funds.
/// Iterations: `TOLLGATE_RACE_ITERS` (default 300 concurrent, 10 forced).
async fn race(bypass: bool, forced: bool) -> (u64, u64) {
    let iters: u64 = std::env::var("TOLLGATE_RACE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if forced { 10 } else { 300 });
    let mint = TestMint::start(0).await;
    let recipient_mint = TestMint::start(0).await;
    let ln = LnurlServer::start(&recipient_mint).await;
    let shares = vec![share("owner", 1.0, ln.add_user("owner", Behaviour::Normal))];
    let mut s = settings(&mint, 0, shares);
    s.mints[0].min_payout_amount = 1;
    s.bypass_reservations_for_tests = bypass;
    let dir = tempfile::tempdir().expect("tempdir");
    let wallet = Wallet::open(dir.path(), s).await.expect("open");
    let url = mint.url();
    let mint = Arc::new(mint);
    let spurious = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let done = tokio_util::sync::CancellationToken::new();

    let refill = {
        let (w, url, done, mint) = (wallet.clone(), url.clone(), done.clone(), mint.clone());
        tokio::spawn(async move {
            while !forced && !done.is_cancelled() {
                if w.available_balance(&url).await.unwrap_or(0) < 64 {
                    let t = mint.mint_token(256).await;
                    w.receive(&t).await.expect("refill receive");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    for i in 0..iters {
        let amount = 8 + (i % 8);
        if forced && wallet.available_balance(&url).await.expect("b") < 64 {
            // Refill only here, so nothing tops the wallet up inside the window.
            let t = mint.mint_token(256).await;
            wallet.receive(&t).await.expect("refill receive");
        }
        let r = match wallet.reserve(&url, amount, Duration::from_secs(30)).await {
            Ok(r) => r,
            Err(WalletError::InsufficientFunds { .. }) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            Err(e) => panic!("reserve: {e}"),
        };
        // The window the seed describes: balance checked, a payout tick lands (on another
        // worker thread, really concurrent), then creation.
        let tick = {
            let (w, url) = (wallet.clone(), url.clone());
            tokio::spawn(async move { w.payout_once(&url).await })
        };
        let created = if forced {
            tick.await.expect("payout task").expect("payout round");
            wallet.create_payment_token(&url, amount, Some(r)).await
        } else {
            tokio::time::sleep(Duration::from_millis(5 + i % 20)).await;
            let created = wallet.create_payment_token(&url, amount, Some(r)).await;
            tick.await.expect("payout task").expect("payout round");
            created
        };
        match created {
            Ok(_) => {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(WalletError::InsufficientFunds { .. }) => {
                spurious.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => panic!("create_payment_token: {e}"),
        }
    }
    done.cancel();
    refill.await.expect("refill task");
    // No overdraft: every payout fit inside what was payable, nothing reserved is left over.
    let b = wallet.balances().await.expect("b");
    assert_eq!(b[0].reserved, 0, "all reservations consumed");
    (ok.load(Ordering::Relaxed), spurious.load(Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reservations_prevent_payout_race() {
    let (ok, spurious) = race(false, false).await;
    assert!(ok > 0, "some payments went through");
    assert_eq!(spurious, 0, "spurious insufficient-funds after reserve");
}

/// The seed's interleaving forced every iteration: with reservations every creation succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_survive_a_payout_between_check_and_creation() {
    let (ok, spurious) = race(false, true).await;
    assert!(ok > 0, "some payments went through");
    assert_eq!(spurious, 0, "spurious insufficient-funds after reserve");
}

/// The same forced interleaving with reservations switched off must show the seed's failure
/// (every iteration), proving the tests above can see the race at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reservations_the_race_is_caught() {
    let (ok, spurious) = race(true, true).await;
    eprintln!("bypass: ok {ok}, spurious {spurious}");
    assert_eq!(
        ok, 0,
        "a payout drained the wallet between check and creation"
    );
    assert!(spurious > 0, "the bypass variant must hit the race");
}

/// Issue 11: a payout whose melt is stuck at the mint holds no lock over that mint. The melt
/// request (`POST /v1/melt/bolt11`) is caught and held by the mint's gate; while it is held a
/// reservation, a token spending it and a customer's payment at the SAME mint complete, the
/// in-flight share is never counted as available, and once the melt is let through every sat
/// is accounted for. Before: the payout held the mint lock across the melt, so the reservation
/// waited for the melt (here: forever, the gate is only released afterwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_melt_holds_no_reservation_or_payment_at_its_mint() {
    use tollgate_tests::mint::GateMode;
    let mint = TestMint::start(0).await;
    let recipient_mint = TestMint::start(0).await;
    let ln = LnurlServer::start(&recipient_mint).await;
    let shares = vec![share("owner", 1.0, ln.add_user("owner", Behaviour::Normal))];
    let dir = tempfile::tempdir().expect("tempdir");
    // min_balance 300: the payout takes about 700 of 1000, the rest is there to reserve.
    let wallet = Wallet::open(dir.path(), settings(&mint, 300, shares))
        .await
        .expect("open");
    let url = mint.url();
    let funded = wallet
        .receive(&mint.mint_token(1000).await)
        .await
        .expect("fund")
        .net;

    let seen = mint.gate().held_count();
    mint.gate().arm("/v1/melt/bolt11", GateMode::Delay);
    let payout = {
        let (w, url) = (wallet.clone(), url.clone());
        tokio::spawn(async move { w.payout_once(&url).await })
    };
    assert!(
        mint.gate().wait_held(seen, Duration::from_secs(20)).await,
        "the payout never sent its melt"
    );

    // The melt is in flight at the mint. Everything below must finish while it is held.
    let limit = Duration::from_secs(10);
    let in_flight = wallet.payouts().await.expect("payouts");
    assert_eq!(in_flight.len(), 1, "{in_flight:?}");
    assert_eq!(in_flight[0].outcome, "pending", "{in_flight:?}");
    let available = wallet.available_balance(&url).await.expect("available");
    assert!(
        available + in_flight[0].amount <= funded,
        "the in-flight share ({}) is counted as available ({available} of {funded})",
        in_flight[0].amount
    );
    let r = tokio::time::timeout(limit, wallet.reserve(&url, 50, Duration::from_secs(30)))
        .await
        .expect("a reservation at the mint waited for the stalled melt")
        .expect("reserve");
    let token = tokio::time::timeout(limit, wallet.create_payment_token(&url, 50, Some(r)))
        .await
        .expect("a token at the mint waited for the stalled melt")
        .expect("create_payment_token");
    let customer = mint.mint_token(64).await;
    let paid = tokio::time::timeout(limit, wallet.receive(&customer))
        .await
        .expect("a customer payment at the mint waited for the stalled melt")
        .expect("receive");
    assert!(!payout.is_finished(), "the melt was still held throughout");
    assert_eq!(mint.gate().finished_count(), 0, "still held");

    mint.gate().release();
    let records = tokio::time::timeout(Duration::from_secs(30), payout)
        .await
        .expect("the payout ends once the melt is let through")
        .expect("payout task")
        .expect("payout round");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].outcome, "paid", "{records:?}");
    assert_eq!(ln.invoiced_to("owner"), records[0].amount);
    let b = &wallet.balances().await.expect("balances")[0];
    assert_eq!(b.reserved, 0, "the reservation was consumed");
    assert_eq!(
        b.balance,
        funded + paid.net - token.value - records[0].amount - records[0].fee,
        "every sat accounted for: {b:?} {records:?} token {}",
        token.value
    );
    // The payout's budget was taken at 1000: it left 300, the token and the payment came after.
    assert!(b.balance >= 300, "the payout kept min_balance: {b:?}");
}

/// The limit of the above: cdk may pick inputs larger than the share (here the wallet's only
/// proof, 1024, for a ~920 share), and until the melt's swap returns the change those inputs
/// hold the value a reservation made earlier still needs. Such a melt keeps the mint lock, so
/// the reserved payment waits for the change instead of failing. The swap is held at the mint
/// while the token is asked for; the 500 ms only lets the token task run (without the lock it
/// failed at once with `InsufficientFunds`, its reservation left behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_melt_whose_inputs_hold_reserved_funds_keeps_the_lock() {
    use tollgate_tests::mint::GateMode;
    let mint = TestMint::start(0).await;
    let recipient_mint = TestMint::start(0).await;
    let ln = LnurlServer::start(&recipient_mint).await;
    let shares = vec![share("owner", 1.0, ln.add_user("owner", Behaviour::Normal))];
    let dir = tempfile::tempdir().expect("tempdir");
    drop(
        Wallet::open(dir.path(), settings(&mint, 0, shares.clone()))
            .await
            .expect("create"),
    );
    tollgate_tests::crash::fund_as_one_proof(dir.path(), &mint, 1024).await;
    let wallet = Wallet::open(dir.path(), settings(&mint, 0, shares))
        .await
        .expect("open");
    let url = mint.url();
    let r = wallet
        .reserve(&url, 100, Duration::from_secs(60))
        .await
        .expect("reserve");

    let seen = mint.gate().held_count();
    mint.gate().arm("/v1/swap", GateMode::Delay);
    let payout = {
        let (w, url) = (wallet.clone(), url.clone());
        tokio::spawn(async move { w.payout_once(&url).await })
    };
    assert!(
        mint.gate().wait_held(seen, Duration::from_secs(20)).await,
        "the payout's melt never swapped its inputs"
    );
    let token = {
        let (w, url) = (wallet.clone(), url.clone());
        tokio::spawn(async move { w.create_payment_token(&url, 100, Some(r)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    mint.gate().release();
    let records = payout.await.expect("payout task").expect("payout round");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].outcome, "paid", "{records:?}");
    let token = token
        .await
        .expect("token task")
        .expect("the reserved payment waited for the change and went through");
    let b = &wallet.balances().await.expect("balances")[0];
    assert_eq!(b.reserved, 0, "{b:?}");
    assert_eq!(
        b.balance,
        1024 - token.value - records[0].amount - records[0].fee,
        "{b:?} {records:?}"
    );
}
