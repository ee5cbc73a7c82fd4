//! Receiving customer tokens against a real mint over HTTP with the real SQLite wallet.

use std::time::Duration;

use tollgate::wallet::{MintSettings, Wallet, WalletError, WalletSettings};
use tollgate_tests::mint::TestMint;

fn settings(mints: &[&TestMint]) -> WalletSettings {
    WalletSettings::new(mints.iter().map(|m| MintSettings::new(m.url())).collect())
}

/// 1. A good token at fee 0 is credited in full; 2. at 100 ppk the net after the input fee.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_good_token_credits_net() {
    for fee_ppk in [0u64, 100] {
        let mint = TestMint::start(fee_ppk).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let wallet = Wallet::open(dir.path(), settings(&[&mint]))
            .await
            .expect("open wallet");
        let token = mint.mint_token(21).await;
        let info = wallet.inspect(&token).expect("inspect");
        assert_eq!(info.amount, 21);
        assert_eq!(info.unit, "sat");
        let r = wallet.receive(&token).await.expect("receive");
        assert_eq!(r.gross, 21);
        assert!(!r.replayed);
        let fee = 21 - r.net;
        if fee_ppk == 0 {
            assert_eq!(fee, 0);
        } else {
            assert!(fee >= 1, "a 100 ppk mint charges at least 1 sat");
        }
        assert_eq!(
            wallet
                .available_balance(&mint.url())
                .await
                .expect("balance"),
            r.net
        );
    }
}

/// The same token twice (also concurrently, also with a `cashu:` prefix and whitespace):
/// one credit, the rest replayed with the first receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_token_twice_is_replayed() {
    let mint = TestMint::start(100).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let wallet = Wallet::open(dir.path(), settings(&[&mint]))
        .await
        .expect("open wallet");
    let token = mint.mint_token(64).await;
    let variants = [
        token.clone(),
        format!("cashu:{token}"),
        format!("  {token}\n"),
        token.clone(),
    ];
    let mut tasks = Vec::new();
    for v in variants {
        let w = wallet.clone();
        tasks.push(tokio::spawn(async move { w.receive(&v).await }));
    }
    let mut receipts = Vec::new();
    for t in tasks {
        receipts.push(t.await.expect("join").expect("receive"));
    }
    assert_eq!(receipts.iter().filter(|r| !r.replayed).count(), 1);
    let net = receipts[0].net;
    assert!(receipts
        .iter()
        .all(|r| r.net == net && r.token_id == receipts[0].token_id));
    assert_eq!(wallet.available_balance(&mint.url()).await.expect("b"), net);

    // After a restart the receipt is still there.
    drop(wallet);
    let wallet = Wallet::open(dir.path(), settings(&[&mint]))
        .await
        .expect("reopen");
    let again = wallet.receive(&token).await.expect("receive after restart");
    assert!(again.replayed);
    assert_eq!(again.net, net);
    assert_eq!(wallet.available_balance(&mint.url()).await.expect("b"), net);
}

/// A token someone else already redeemed: `TokenSpent`, no phantom pending balance, no stuck
/// saga making the next start fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_token_is_rejected_cleanly() {
    let mint = TestMint::start(0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let wallet = Wallet::open(dir.path(), settings(&[&mint]))
        .await
        .expect("open wallet");
    let token = mint.mint_token(32).await;
    // Another wallet redeems it first.
    let thief = mint.new_wallet().await;
    thief
        .receive(&token, Default::default())
        .await
        .expect("thief receives");
    let err = wallet.receive(&token).await.expect_err("spent");
    assert!(matches!(err, WalletError::TokenSpent), "{err:?}");
    let b = wallet.balances().await.expect("balances");
    assert_eq!(b[0].balance, 0);

    drop(wallet);
    let wallet = Wallet::open(dir.path(), settings(&[&mint]))
        .await
        .expect("reopen");
    assert_eq!(wallet.available_balance(&mint.url()).await.expect("b"), 0);
    // A good token still works afterwards.
    let r = wallet
        .receive(&mint.mint_token(8).await)
        .await
        .expect("receive good");
    assert_eq!(r.net, 8);
}

/// Unaccepted mint, wrong unit, garbage and oversized inputs are refused offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_unaccepted_mint_and_garbage() {
    let ours = TestMint::start(0).await;
    let theirs = TestMint::start(0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let wallet = Wallet::open(dir.path(), settings(&[&ours]))
        .await
        .expect("open wallet");
    let foreign = theirs.mint_token(8).await;
    assert!(matches!(
        wallet.receive(&foreign).await,
        Err(WalletError::MintNotAccepted { .. })
    ));
    for bad in [
        "",
        "cashuB",
        "not a token",
        "cashuAbm90IGpzb24",
        &"cashuB".repeat(20_000),
        "\u{0}\u{1}cashuB\u{ffff}",
    ] {
        assert!(
            matches!(
                wallet.receive(bad).await,
                Err(WalletError::InvalidToken { .. })
            ),
            "{:.40}",
            bad
        );
    }
    // A well-formed token in another unit: re-encode a real token with unit "usd".
    let token = ours.mint_token(4).await;
    let parsed: cdk::nuts::Token = token.parse().expect("parse");
    let cdk::nuts::Token::TokenV4(mut v4) = parsed else {
        panic!("cdk sends v4 tokens")
    };
    v4.unit = cdk::nuts::CurrencyUnit::Usd;
    let usd = cdk::nuts::Token::TokenV4(v4).to_string();
    assert!(matches!(
        wallet.receive(&usd).await,
        Err(WalletError::WrongUnit { .. })
    ));
}

/// A token locked (P2PK) to someone else's key is refused without contacting the mint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_locked_token() {
    use cdk::nuts::{SecretKey, SpendingConditions};
    use cdk::wallet::SendOptions;
    let mint = TestMint::start(0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let wallet = Wallet::open(dir.path(), settings(&[&mint]))
        .await
        .expect("open wallet");
    // Fund a customer wallet via a plain token, then send a locked one.
    let customer = mint.new_wallet().await;
    customer
        .receive(&mint.mint_token(16).await, Default::default())
        .await
        .expect("fund customer");
    let other = SecretKey::generate().public_key();
    let prepared = customer
        .prepare_send(
            cdk::Amount::from(8),
            SendOptions {
                conditions: Some(SpendingConditions::new_p2pk(other, None)),
                ..Default::default()
            },
        )
        .await
        .expect("prepare locked send");
    let locked = prepared
        .confirm(None)
        .await
        .expect("locked token")
        .to_string();
    assert!(matches!(wallet.inspect(&locked), Err(WalletError::Locked)));
    assert!(matches!(
        wallet.receive(&locked).await,
        Err(WalletError::Locked)
    ));
}

/// Reservations survive a restart, expire by themselves, and are honoured by token creation;
/// an outgoing token can be reclaimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_tokens_and_reclaim() {
    let mint = TestMint::start(100).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let wallet = Wallet::open(dir.path(), settings(&[&mint]))
        .await
        .expect("open wallet");
    let net = wallet
        .receive(&mint.mint_token(200).await)
        .await
        .expect("receive")
        .net;
    let r = wallet
        .reserve(&mint.url(), 100, Duration::from_secs(600))
        .await
        .expect("reserve");
    let short = wallet
        .reserve(&mint.url(), 10, Duration::from_millis(1))
        .await
        .expect("short reserve");
    assert!(matches!(
        wallet
            .reserve(&mint.url(), net, Duration::from_secs(60))
            .await,
        Err(WalletError::InsufficientFunds { .. })
    ));
    drop(wallet);
    let wallet = Wallet::open(dir.path(), settings(&[&mint]))
        .await
        .expect("reopen");
    // The long reservation survived; the 1 ms one has expired.
    assert_eq!(
        wallet.available_balance(&mint.url()).await.expect("b"),
        net - 100
    );
    assert!(matches!(
        wallet
            .create_payment_token(&mint.url(), 5, Some(short))
            .await,
        Err(WalletError::ReservationExpired { .. })
    ));
    let out = wallet
        .create_payment_token(&mint.url(), 100, Some(r))
        .await
        .expect("token from reservation");
    assert!(out.value - out.receiver_fee >= 100, "{out:?}");
    // The receiver nets at least the amount.
    let upstream = mint.new_wallet().await;
    let got: u64 = upstream
        .receive(&out.token, Default::default())
        .await
        .expect("upstream receives")
        .into();
    assert!(got >= 100, "upstream netted {got}");

    // A second token, never claimed, is reclaimed.
    let before = wallet.available_balance(&mint.url()).await.expect("b");
    let out2 = wallet
        .create_payment_token(&mint.url(), 20, None)
        .await
        .expect("token");
    let back = wallet.reclaim(&out2.op_id).await.expect("reclaim");
    assert!(back > 0);
    let after = wallet.available_balance(&mint.url()).await.expect("b");
    assert!(
        after <= before && before - after <= 4,
        "{before} -> {after}"
    );
}
