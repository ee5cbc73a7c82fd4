//! End to end: a real `tollgate run` in a gateway namespace, a real cdk mint on the gateway's
//! loopback, a real data plane, and a customer in a client namespace paying over HTTP.
//!
//! 1. Lab: client ── lan0 ── gateway ── wan0 ── upstream (servers).
//! 2. Mint: TestMint on 127.0.0.1 inside the gateway namespace (the daemon's loopback).
//! 3. Daemon: `tollgate run --netns <gw>` with a config selling bytes for that mint.
//! 4. Customer: unpaid (blocked) → pays a token → kind-1022 with the allotment → traffic flows
//!    → the quota runs out in the kernel → the chandler closes the session → `/usage` = -1/-1.
//! 5. The same token again credits nothing more; a spent token / a foreign mint get notices.
//! 6. The daemon is restarted mid-session: used bytes and remaining allotment survive.
//!
//! Run with `--nocapture` (as `cargo xtask demo` does) to see the story as it happens.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tollgate_tests::{
    gateway::{http, in_ns, json_body, ns_runtime, tag, write_config, Daemon},
    mint::TestMint,
    netns::{download, serve_bulk, Lab3, Netns},
    pins::PinBase,
};

const STEP: u64 = 1_000; // bytes per step
const PRICE: u64 = 1; // sat per step

fn say(msg: impl AsRef<str>) {
    println!("[e2e] {}", msg.as_ref());
}

#[test]
fn a_customer_pays_gets_metered_access_and_the_gate_closes_at_the_quota() {
    let lab = Lab3::new("e2e");
    let pins = PinBase::new("e2e");
    let tmp = tempfile::tempdir().unwrap();
    let (config_dir, state_dir) = (tmp.path().join("etc"), tmp.path().join("state"));
    serve_bulk(&lab.upstream);

    // The mint lives on the gateway's loopback, where the daemon can reach it.
    let rt = ns_runtime(&lab.gateway);
    let mint = Arc::new(in_ns(&lab.gateway, &rt, || TestMint::start(0)));
    let other_mint = Arc::new(in_ns(&lab.gateway, &rt, || TestMint::start(0)));
    let token_of = |m: &Arc<TestMint>, amount: u64| {
        let m = m.clone();
        in_ns(&lab.gateway, &rt, move || async move {
            m.mint_token(amount).await
        })
    };
    say(format!(
        "mint at {} (inside the gateway namespace)",
        mint.url()
    ));
    write_config(&config_dir, "bytes", STEP, &[(&mint.url(), PRICE)]);
    let mut daemon = Daemon::start(&lab, &config_dir, &state_dir, &pins);
    say("daemon up on 10.77.0.1:2121");

    // The advertisement.
    let (st, body) = http(&lab.client, "GET", "/", None);
    assert_eq!(st, 200);
    let ad = json_body(&body);
    assert_eq!(ad["kind"], 10021);
    assert_eq!(tag(&ad, "metric"), Some("bytes"));
    say(format!(
        "advertisement: {STEP} bytes per step, {PRICE} sat per step"
    ));

    // Unpaid: nothing gets through.
    assert_eq!(
        download(&lab.client, 10_000, Duration::from_secs(1)),
        0,
        "unpaid client blocked"
    );
    let (_, usage) = http(&lab.client, "GET", "/usage", None);
    assert!(usage.contains("-1/-1"), "no session yet: {usage}");

    // A foreign mint's token is refused without touching our wallet.
    let foreign = token_of(&other_mint, 50);
    let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &foreign)));
    assert_eq!(st, 400);
    assert_eq!(
        tag(&json_body(&body), "code"),
        Some("payment-error-mint-not-accepted")
    );

    // Pay 200 sat → 200 steps → 200 000 bytes.
    let token = token_of(&mint, 200);
    let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &token)));
    assert_eq!(st, 200, "payment accepted: {body}");
    let session = json_body(&body);
    assert_eq!(session["kind"], 1022);
    let allotment: u64 = tag(&session, "allotment").unwrap().parse().unwrap();
    assert_eq!(allotment, 200 * STEP);
    say(format!("paid 200 sat, allotment {allotment} bytes"));

    // The same token again: the same session, no second credit (concurrently too).
    let handles: Vec<_> = (0..5)
        .map(|_| {
            let ns = Netns {
                name: lab.client.name.clone(),
            };
            let t = token.clone();
            std::thread::spawn(move || {
                let r = http(&ns, "POST", "/", Some(("text/plain", &t)));
                std::mem::forget(ns); // the lab owns the namespace
                r
            })
        })
        .collect();
    for h in handles {
        let (st, body) = h.join().unwrap();
        assert_eq!(st, 200);
        assert_eq!(
            tag(&json_body(&body), "allotment")
                .unwrap()
                .parse::<u64>()
                .unwrap(),
            allotment
        );
    }

    // Traffic flows, counted by the kernel.
    let got = download(&lab.client, 50_000, Duration::from_secs(2));
    assert!(got >= 50_000, "paid client downloads ({got})");
    let (_, usage) = http(&lab.client, "GET", "/usage", None);
    let (used, total) = usage
        .trim()
        .rsplit_once('\n')
        .map_or(usage.trim(), |x| x.1)
        .split_once('/')
        .unwrap();
    let (used, total): (u64, u64) = (used.trim().parse().unwrap(), total.trim().parse().unwrap());
    assert_eq!(total, allotment);
    assert!(used >= 50_000 && used <= allotment, "usage {used}/{total}");
    say(format!(
        "downloaded {got} bytes; /usage says {used}/{total}"
    ));

    // Restart the daemon mid-session: used bytes and remaining allotment survive.
    daemon.stop();
    let during_stop = download(&lab.client, 20_000, Duration::from_secs(2));
    assert!(
        during_stop > 0,
        "the gate stays open while the daemon is down"
    );
    let mut daemon = Daemon::start(&lab, &config_dir, &state_dir, &pins);
    let (_, usage) = http(&lab.client, "GET", "/usage", None);
    let after: u64 = usage
        .trim()
        .split('/')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        after >= used + during_stop,
        "used bytes stay used across a restart ({after} < {used} + {during_stop}): /usage said {usage:?}; log: {}",
        std::fs::read_to_string(state_dir.join("daemon.log")).unwrap_or_default()
    );
    say(format!(
        "daemon restarted; usage carried over: {after} bytes used"
    ));

    // Use up the allotment: the kernel stops it, the chandler closes the session.
    let rest = download(&lab.client, allotment * 2, Duration::from_secs(2));
    say(format!("bulk download stopped after {rest} more bytes"));
    let start = Instant::now();
    loop {
        let (_, usage) = http(&lab.client, "GET", "/usage", None);
        if usage.contains("-1/-1") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "session closed after exhaustion: {usage}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        download(&lab.client, 10_000, Duration::from_secs(1)),
        0,
        "gate closed at the quota"
    );
    say("quota used up: the kernel closed the gate and /usage is -1/-1");

    // A token somebody else already swapped gets `payment-error-token-spent`.
    let spent = token_of(&mint, 20);
    {
        let (m, t) = (mint.clone(), spent.clone());
        in_ns(&lab.gateway, &rt, move || async move {
            let w = m.new_wallet().await;
            w.receive(&t, Default::default())
                .await
                .expect("someone else spends it");
        });
    }
    let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &spent)));
    assert_eq!(st, 400);
    assert_eq!(
        tag(&json_body(&body), "code"),
        Some("payment-error-token-spent")
    );

    // Top-up opens the gate again with the new allotment.
    let token2 = token_of(&mint, 50);
    let (st, _) = http(
        &lab.client,
        "POST",
        "/",
        Some(("application/x-www-form-urlencoded", &token2)),
    );
    assert_eq!(st, 200);
    assert!(
        download(&lab.client, 10_000, Duration::from_secs(2)) >= 10_000,
        "topped up"
    );
    say("topped up with 50 sat: traffic flows again");
    daemon.stop();
}
