//! The upstream buyer's renewal pattern against concurrent payout ticks, with a real mint
//! and real Lightning payouts (LNURL on loopback): a standing reservation ("hold") taken
//! after each purchase, extended while the session runs, and consumed by the next renewal's
//! token. Payout ticks drain everything else, every iteration, on another worker thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::wallet::{MintSettings, ProfitShare, Wallet, WalletSettings};
use tollgate_tests::lnurl::{Behaviour, LnurlServer};
use tollgate_tests::mint::TestMint;

/// 1. A wallet paying everything above 0 out to the owner on every tick.
/// 2. Per iteration: hold the renewal amount (refilling from "customers" when needed), start a
///    payout tick on another worker, extend the hold, create the renewal token from it.
/// 3. No renewal ever fails and no tick ever spends held funds; nothing stays reserved.
///
/// Iterations: `TOLLGATE_RENEWAL_ITERS` (default 10: a payout round with a real melt takes
/// about 2 s here, so thousands of rounds belong in a soak run, not CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payout_ticks_never_starve_a_held_renewal() {
    let iters: u64 = std::env::var("TOLLGATE_RENEWAL_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mint = Arc::new(TestMint::start(0).await);
    let recipient_mint = TestMint::start(0).await;
    let ln = LnurlServer::start(&recipient_mint).await;
    let mut m = MintSettings::new(mint.url());
    m.min_balance = 0;
    m.min_payout_amount = 1;
    let mut s = WalletSettings::new(vec![m]);
    s.profit_share = vec![ProfitShare {
        identity: "owner".into(),
        factor: 1.0,
        lightning_address: ln.add_user("owner", Behaviour::Normal),
    }];
    s.allow_loopback_lnurl = true;
    let dir = tempfile::tempdir().expect("tempdir");
    let wallet = Wallet::open(dir.path(), s).await.expect("open");
    let url = mint.url();
    let started = Instant::now();
    let (mut renewed, mut paid_out_ticks) = (0u64, 0u64);
    for i in 0..iters {
        let amount = 4 + (i % 5);
        // The hold, taken right after the previous purchase in the daemon.
        if wallet.available_balance(&url).await.expect("available") < amount {
            let t = mint.mint_token(64).await;
            wallet.receive(&t).await.expect("customer payment");
        }
        let hold = wallet
            .reserve(&url, amount, Duration::from_secs(600))
            .await
            .expect("hold the renewal amount");
        let tick = {
            let (w, url) = (wallet.clone(), url.clone());
            tokio::spawn(async move { w.payout_once(&url).await })
        };
        tokio::time::sleep(Duration::from_millis(i % 4)).await;
        assert!(
            wallet
                .extend(&hold, Duration::from_secs(600))
                .expect("extend"),
            "iteration {i}: the hold vanished"
        );
        let token = wallet
            .create_payment_token(&url, amount, Some(hold))
            .await
            .unwrap_or_else(|e| panic!("iteration {i}: renewal failed: {e}"));
        assert_eq!(token.amount, amount);
        renewed += 1;
        if !tick
            .await
            .expect("tick task")
            .expect("payout round")
            .is_empty()
        {
            paid_out_ticks += 1;
        }
    }
    let b = wallet.balances().await.expect("balances");
    assert_eq!(b[0].reserved, 0, "every hold was consumed by its renewal");
    assert_eq!(renewed, iters);
    assert!(paid_out_ticks > 0, "payouts really ran against the holds");
    eprintln!(
        "{iters} renewals, {paid_out_ticks} ticks paid out, {:?}",
        started.elapsed()
    );
}
