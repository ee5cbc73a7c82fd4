//! End to end, the protocol's edges against a real daemon, a real mint and the real data plane:
//!
//! - a `milliseconds` session: the kernel ends it at the deadline, a top-up mid-session carries
//!   the remaining time over (`new_end = max(now, old_end) + added`);
//! - the same token POSTed 20 times at once credits exactly once;
//! - a corpus of malformed and hostile bodies: every one gets a kind-21023 notice with the right
//!   status, none creates a session, none takes the daemon down.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tollgate_tests::{
    gateway::{http, in_ns, json_body, ns_runtime, tag, write_config_value, Daemon, MERCHANT_KEY},
    mint::TestMint,
    netns::{download, serve_bulk, Lab3, Netns},
    pins::PinBase,
};

/// A lab with a running daemon selling `metric` in steps of `step` for 1 sat per step.
struct Gateway {
    lab: Lab3,
    pins: PinBase,
    _tmp: tempfile::TempDir,
    rt: Arc<tokio::runtime::Runtime>,
    mint: Arc<TestMint>,
    daemon: Daemon,
}

impl Gateway {
    fn start(tag: &str, metric: &str, step: u64) -> Gateway {
        let lab = Lab3::new(tag);
        let pins = PinBase::new(tag);
        let tmp = tempfile::tempdir().unwrap();
        let (config_dir, state_dir) = (tmp.path().join("etc"), tmp.path().join("state"));
        serve_bulk(&lab.upstream);
        let rt = ns_runtime(&lab.gateway);
        let mint = Arc::new(in_ns(&lab.gateway, &rt, || TestMint::start(0)));
        write_config_value(
            &config_dir,
            &serde_json::json!({
                "metric": metric, "step_size": step,
                "accepted_mints": [{
                    "url": mint.url(), "price_per_step": 1, "price_unit": "sat",
                    "purchase_min_steps": 10, "min_balance": 64,
                    "min_payout_amount": 1000000, "payout_interval_seconds": 3600
                }],
                "profit_share": [{"identity": "owner", "factor": 1.0}],
                // The corpus and the concurrency test POST more than a customer would.
                "post_rate_per_minute": 10000
            }),
        );
        let daemon = Daemon::start(&lab, &config_dir, &state_dir, &pins);
        Gateway {
            lab,
            pins,
            _tmp: tmp,
            rt,
            mint,
            daemon,
        }
    }

    fn token(&self, amount: u64) -> String {
        let m = self.mint.clone();
        in_ns(&self.lab.gateway, &self.rt, move || async move {
            m.mint_token(amount).await
        })
    }

    fn post(&self, content_type: &str, body: &str) -> (u16, String) {
        http(&self.lab.client, "POST", "/", Some((content_type, body)))
    }

    /// `/usage` as (used, allotment); `None` for `-1/-1`.
    fn usage(&self) -> Option<(u64, u64)> {
        let (st, body) = http(&self.lab.client, "GET", "/usage", None);
        assert_eq!(st, 200, "/usage: {body}");
        let (u, a) = body.trim().split_once('/').expect("used/allotment");
        if u == "-1" {
            return None;
        }
        Some((u.parse().unwrap(), a.parse().unwrap()))
    }

    fn flows(&self) -> bool {
        download(&self.lab.client, 4_000, Duration::from_millis(800)) >= 4_000
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.daemon.stop();
        let _ = &self.pins;
    }
}

#[test]
fn a_time_session_expires_in_the_kernel_and_a_top_up_carries_over() {
    // 500 ms per step, at least 10 steps: 10 sat buy 5 s.
    let gw = Gateway::start("e2ems", "milliseconds", 500);
    assert!(!gw.flows(), "unpaid client blocked");

    let (st, body) = gw.post("text/plain", &gw.token(10));
    let paid_at = Instant::now();
    assert_eq!(st, 200, "payment accepted: {body}");
    let ev = json_body(&body);
    assert_eq!(tag(&ev, "metric"), Some("milliseconds"));
    assert_eq!(tag(&ev, "allotment"), Some("5000"));
    assert!(gw.flows(), "a paid client gets through");

    // Top up 1 s in: the 5 s still left plus 5 s more, not 5 s from now.
    std::thread::sleep(Duration::from_millis(1000).saturating_sub(paid_at.elapsed()));
    let (st, body) = gw.post("text/plain", &gw.token(10));
    assert_eq!(st, 200, "top-up accepted: {body}");
    assert_eq!(
        tag(&json_body(&body), "allotment"),
        Some("10000"),
        "the allotment is cumulative"
    );
    let (used, allotment) = gw.usage().expect("an active session");
    assert_eq!(allotment, 10_000);
    assert!(
        (900..5_000).contains(&used),
        "time used so far is counted, not reset by the top-up: {used} ms"
    );

    // Past the first purchase's end: still open, because the top-up carried over.
    std::thread::sleep(Duration::from_millis(6_500).saturating_sub(paid_at.elapsed()));
    assert!(gw.flows(), "6.5 s in, the topped-up session still passes");

    // The kernel ends it at 10 s; the chandler closes the session.
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.usage().is_some() {
        assert!(Instant::now() < deadline, "the time session never ended");
        std::thread::sleep(Duration::from_millis(200));
    }
    let ended = paid_at.elapsed();
    assert!(
        ended >= Duration::from_millis(9_500),
        "the session ended at {ended:?}, before the 10 s it was paid for"
    );
    assert!(!gw.flows(), "after expiry the gate is closed");
}

#[test]
fn the_same_token_posted_20_times_at_once_credits_once() {
    let gw = Gateway::start("e2e20", "bytes", 1_000);
    let token = gw.token(100);
    let results: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let (ns, t) = (gw.lab.client.name.clone(), token.clone());
                s.spawn(move || {
                    let ns = std::mem::ManuallyDrop::new(Netns { name: ns });
                    http(&ns, "POST", "/", Some(("text/plain", &t)))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (st, body) in &results {
        assert_eq!(*st, 200, "every retry gets the session: {body}");
        assert_eq!(
            tag(&json_body(body), "allotment"),
            Some("100000"),
            "and the same allotment: {body}"
        );
    }
    assert_eq!(gw.usage().map(|u| u.1), Some(100_000), "credited once");
    // A different token afterwards adds to it: the session is live, not wedged.
    let (st, body) = gw.post("text/plain", &gw.token(10));
    assert_eq!(st, 200, "{body}");
    assert_eq!(tag(&json_body(&body), "allotment"), Some("110000"));
}

#[test]
fn malformed_and_hostile_bodies_get_notices_and_change_nothing() {
    let gw = Gateway::start("e2ebad", "bytes", 1_000);
    let good = gw.token(20);
    let keys = nostr_keys();
    let huge = "A".repeat(2 * 1024 * 1024);
    let corpus: Vec<(&str, String, u16)> = vec![
        ("empty", String::new(), 400),
        ("whitespace", " \n\t ".into(), 400),
        ("bare prefix A", "cashuA".into(), 400),
        ("bare prefix B", "cashuB".into(), 400),
        ("truncated token", good[..good.len() / 2].to_string(), 400),
        ("token with a corrupted middle", corrupt_middle(&good), 400),
        ("bad base64", "cashuB!!!!not*base64@@@".into(), 400),
        (
            "base64 of garbage CBOR",
            "cashuBo2FteBhodHRwOi8vbG9jYWxob3N0OjMzMzhhdWNzYXRhdIGiYWlIAAAA".into(),
            400,
        ),
        ("json garbage", "{\"kind\":".into(), 400),
        ("json array", "[1,2,3]".into(), 400),
        (
            "deeply nested json",
            format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
            400,
        ),
        (
            "binary",
            String::from_utf8_lossy(&[0xff, 0xfe, 0, 1, 2, 0x80]).into(),
            400,
        ),
        ("over 1 MiB", huge, 413),
        (
            "event with a bad signature",
            signed_event(&keys, 21000, &good, true),
            400,
        ),
        (
            "event of the wrong kind",
            signed_event(&keys, 1, &good, false),
            400,
        ),
        (
            "event without a payment tag",
            signed_event(&keys, 21000, "", false),
            400,
        ),
    ];
    for (what, body, status) in &corpus {
        let (st, resp) = gw.post("text/plain", body);
        assert_eq!(st, *status, "{what}: status ({resp})");
        if *status == 400 {
            let notice = json_body(&resp);
            assert_eq!(notice["kind"], 21023, "{what}: a notice ({resp})");
            assert!(tag(&notice, "code").is_some(), "{what}: a code ({resp})");
            assert!(tag(&notice, "level").is_some(), "{what}: a level ({resp})");
        }
        assert_eq!(gw.usage(), None, "{what}: no session from a bad body");
    }
    // The daemon is still up and the good token (never redeemed by any of the above) still pays.
    let (st, _) = http(&gw.lab.client, "GET", "/", None);
    assert_eq!(st, 200, "the daemon survived the corpus");
    let (st, body) = gw.post("text/plain", &good);
    assert_eq!(st, 200, "the untouched token still pays: {body}");
    assert_eq!(tag(&json_body(&body), "allotment"), Some("20000"));
}

/// `token` with one character in the middle swapped for another base64url character.
fn corrupt_middle(token: &str) -> String {
    let mut b = token.as_bytes().to_vec();
    let i = b.len() / 2;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

fn nostr_keys() -> nostr::Keys {
    nostr::Keys::generate()
}

/// A kind-`kind` event carrying `token` in a `payment` tag, signed by `keys`; with
/// `corrupt_sig`, one signature byte is flipped after signing.
fn signed_event(keys: &nostr::Keys, kind: u16, token: &str, corrupt_sig: bool) -> String {
    use nostr::{EventBuilder, Kind, Tag};
    let merchant = nostr::Keys::parse(MERCHANT_KEY).unwrap().public_key();
    let mut tags = vec![
        Tag::public_key(merchant),
        Tag::parse(["device-identifier", "mac", "00:00:00:00:00:00"]).unwrap(),
    ];
    if !token.is_empty() {
        tags.push(Tag::parse(["payment", token]).unwrap());
    }
    let ev = EventBuilder::new(Kind::from_u16(kind), "")
        .tags(tags)
        .sign_with_keys(keys)
        .unwrap();
    let mut v = serde_json::to_value(&ev).unwrap();
    if corrupt_sig {
        let sig = v["sig"].as_str().unwrap().to_string();
        let flipped = if sig.starts_with('0') { "1" } else { "0" };
        v["sig"] = format!("{flipped}{}", &sig[1..]).into();
    }
    v.to_string()
}
