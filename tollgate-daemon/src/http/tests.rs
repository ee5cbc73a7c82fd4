//! Router tests: `oneshot` with a faked peer address, fake gates, fake wallet, fake neighbours.

use std::{net::SocketAddr, str::FromStr, time::Duration};

use axum::{
    body::Body,
    extract::connect_info::MockConnectInfo,
    http::{HeaderMap, Request, StatusCode},
};
use http_body_util::BodyExt;
use nostr::{Event, JsonUtil, Keys};
use tower::ServiceExt;

use super::*;
use crate::{
    config::HttpConfig,
    merchant::tests::{rig, Rig, MINT},
    neighbour::StaticNeighbours,
    protocol::{tests::independently_verify, tests::TOKEN_B, Session},
};

const PEER: &str = "10.0.0.5:40000";
const UNKNOWN_PEER: &str = "10.0.0.99:40000";

fn client_mac() -> MacAddr {
    "aa:bb:cc:00:00:05".parse().expect("mac")
}

/// A distinct, decodable v4 token per `n` (the memo differs).
fn token(n: u32) -> String {
    let mut t = cdk::nuts::TokenV4::from_str(TOKEN_B).expect("test vector");
    t.memo = Some(format!("t{n}"));
    t.to_string()
}

struct T {
    rig: Rig,
    app: Router,
}

fn setup(price: u64, min: u64, rate: u32) -> T {
    let rig = rig(price, min, Duration::from_secs(5));
    let mut map = HashMap::new();
    map.insert("10.0.0.5".parse().expect("ip"), client_mac());
    let cfg = HttpConfig {
        listen: "0.0.0.0:2121".parse().expect("addr"),
        admin_listen: "127.0.0.1:2122".parse().expect("addr"),
        lan_interface: None,
        post_rate_per_minute: rate,
        portal_port: 2121,
        portal_mark: Some(0x7467),
    };
    let state = AppState::new(
        &cfg,
        rig.merchant.clone(),
        rig.chandler.clone(),
        Arc::new(StaticNeighbours(map)),
    );
    let app = router(state);
    T { rig, app }
}

async fn send(
    app: &Router,
    method: &str,
    uri: &str,
    ct: Option<&str>,
    body: Vec<u8>,
    peer: &str,
) -> (StatusCode, HeaderMap, String) {
    send_h(app, method, uri, ct, body, peer, &[]).await
}

async fn send_h(
    app: &Router,
    method: &str,
    uri: &str,
    ct: Option<&str>,
    body: Vec<u8>,
    peer: &str,
    extra: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(ct) = ct {
        b = b.header("content-type", ct);
    }
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    let req = b.body(Body::from(body)).expect("request");
    let peer: SocketAddr = peer.parse().expect("peer");
    let resp = app
        .clone()
        .layer(MockConnectInfo(peer))
        .oneshot(req)
        .await
        .expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn notice_code(body: &str) -> String {
    independently_verify(body);
    let ev = Event::from_json(body).expect("notice event");
    assert_eq!(ev.kind.as_u16(), protocol::KIND_NOTICE, "{body}");
    ev.tags
        .iter()
        .find(|t| t.as_slice()[0] == "code")
        .map(|t| t.as_slice()[1].clone())
        .expect("code tag")
}

#[tokio::test]
async fn get_root_is_signed_advertisement() {
    let t = setup(1, 0, 60);
    let (s, h, body) = send(&t.app, "GET", "/", None, vec![], PEER).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["content-type"], "application/json");
    independently_verify(&body);
    let ad =
        protocol::Advertisement::from_event(&Event::from_json(&body).expect("ev")).expect("10021");
    assert_eq!(ad.prices[0].mint_url, MINT);
    let created = Event::from_json(&body).expect("ev").created_at.as_secs();
    assert!(created > 1_600_000_000, "real created_at");
}

#[tokio::test]
async fn post_token_in_every_content_type() {
    let t = setup(1, 0, 600);
    let cts = [
        None,
        Some("text/plain"),
        Some("text/plain; charset=utf-8"),
        Some("application/json"),
        Some("application/x-www-form-urlencoded"),
    ];
    for (n, ct) in cts.iter().enumerate() {
        let tok = token(n as u32);
        t.rig.redeemer.add(&tok, MINT, 2, Ok(()));
        let (s, _, body) = send(&t.app, "POST", "/", *ct, tok.into_bytes(), PEER).await;
        assert_eq!(s, StatusCode::OK, "{ct:?}: {body}");
        independently_verify(&body);
        let sess = Session::from_event(&Event::from_json(&body).expect("ev")).expect("1022");
        assert_eq!(sess.mac, client_mac());
        assert_eq!(
            sess.allotment,
            2000 * (n as u64 + 1),
            "cumulative allotment"
        );
    }
    // `token=` form field, percent-encoded.
    let tok = token(100);
    t.rig.redeemer.add(&tok, MINT, 1, Ok(()));
    let form = format!(
        "token={}",
        url::form_urlencoded::byte_serialize(tok.as_bytes()).collect::<String>()
    );
    let (s, _, body) = send(
        &t.app,
        "POST",
        "/",
        Some("application/x-www-form-urlencoded"),
        form.into_bytes(),
        PEER,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // /usage and /balance see it.
    let (_, h, body) = send(&t.app, "GET", "/usage", None, vec![], PEER).await;
    assert_eq!(h["content-type"], "text/plain");
    assert_eq!(body, "0/11000");
    let (_, _, body) = send(&t.app, "GET", "/balance", None, vec![], PEER).await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["session_active"], true);
    assert_eq!(v["allotment"], 11000);
    assert_eq!(v["remaining"], 11000);
    assert_eq!(v["metric"], "bytes");
}

#[tokio::test]
async fn post_kind_21000_event_puts_customer_in_p() {
    let t = setup(1, 0, 60);
    let tok = token(1);
    t.rig.redeemer.add(&tok, MINT, 3, Ok(()));
    let customer = Keys::generate();
    // The event claims another MAC: it must be ignored.
    let claimed: MacAddr = "02:de:ad:be:ef:00".parse().expect("mac");
    let ev = protocol::payment_event(
        &customer,
        &t.rig.merchant.keys().public_key(),
        claimed,
        &tok,
        crate::sys::clock::unix_secs(),
    )
    .expect("event");
    let (s, _, body) = send(
        &t.app,
        "POST",
        "/",
        Some("application/json"),
        ev.as_json().into_bytes(),
        PEER,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let sess = Session::from_event(&Event::from_json(&body).expect("ev")).expect("1022");
    assert_eq!(sess.customer, Some(customer.public_key()));
    assert_eq!(
        sess.mac,
        client_mac(),
        "MAC from the neighbour table, not the body"
    );
}

#[tokio::test]
async fn every_notice_code_and_status() {
    let t = setup(2, 2, 600);
    let (spent, other, locked, small, down, limited, broken) = (
        token(1),
        token(2),
        token(3),
        token(4),
        token(5),
        token(6),
        token(7),
    );
    t.rig
        .redeemer
        .add(&spent, MINT, 10, Err(RedeemError::TokenSpent));
    t.rig
        .redeemer
        .add(&other, "https://other.example", 10, Ok(()));
    t.rig
        .redeemer
        .add(&locked, MINT, 10, Err(RedeemError::Locked));
    t.rig.redeemer.add(&small, MINT, 3, Ok(()));
    t.rig.redeemer.add(
        &down,
        MINT,
        10,
        Err(RedeemError::MintUnavailable {
            mint: MINT.into(),
            message: "refused".into(),
        }),
    );
    t.rig.redeemer.add(
        &limited,
        MINT,
        10,
        Err(RedeemError::RateLimited {
            retry_after_secs: 7,
        }),
    );
    t.rig.redeemer.add(
        &broken,
        MINT,
        10,
        Err(RedeemError::Storage {
            message: "disk".into(),
        }),
    );
    let cases: Vec<(Vec<u8>, &str, StatusCode, &str)> = vec![
        (
            spent.into_bytes(),
            PEER,
            StatusCode::BAD_REQUEST,
            "payment-error-token-spent",
        ),
        (
            other.into_bytes(),
            PEER,
            StatusCode::BAD_REQUEST,
            "payment-error-mint-not-accepted",
        ),
        (
            locked.into_bytes(),
            PEER,
            StatusCode::BAD_REQUEST,
            "payment-error-locked-token",
        ),
        (
            small.clone().into_bytes(),
            PEER,
            StatusCode::BAD_REQUEST,
            "session-error",
        ),
        (
            down.into_bytes(),
            PEER,
            StatusCode::SERVICE_UNAVAILABLE,
            "no-reachable-mints",
        ),
        (
            limited.into_bytes(),
            PEER,
            StatusCode::TOO_MANY_REQUESTS,
            "mint-rate-limited",
        ),
        (
            broken.into_bytes(),
            PEER,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal-error",
        ),
        (
            b"cashuBgarbage".to_vec(),
            PEER,
            StatusCode::BAD_REQUEST,
            "payment-error-invalid-token",
        ),
        (
            b"hello".to_vec(),
            PEER,
            StatusCode::BAD_REQUEST,
            "payment-error-invalid-token",
        ),
        (
            b"".to_vec(),
            PEER,
            StatusCode::BAD_REQUEST,
            "invalid-request",
        ),
        (
            b"{\"kind\":1}".to_vec(),
            PEER,
            StatusCode::BAD_REQUEST,
            "invalid-event",
        ),
        (
            token(8).into_bytes(),
            UNKNOWN_PEER,
            StatusCode::BAD_REQUEST,
            "mac-address-lookup-failed",
        ),
    ];
    for (body, peer, status, code) in cases {
        let (s, h, resp) = send(&t.app, "POST", "/", Some("text/plain"), body, peer).await;
        assert_eq!((s, notice_code(&resp).as_str()), (status, code), "{resp}");
        if code == "mint-rate-limited" {
            assert_eq!(h["retry-after"], "7");
        }
        if code == "session-error" {
            // Refused before redeeming: the token stays the customer's.
            assert!(resp.contains("still yours"), "{resp}");
        }
    }
    // Retrying the below-minimum token is refused the same way (nothing was redeemed).
    let (_, _, a) = send(&t.app, "POST", "/", None, small.clone().into_bytes(), PEER).await;
    let (_, _, b) = send(&t.app, "POST", "/", None, small.into_bytes(), PEER).await;
    assert_eq!(notice_code(&a), notice_code(&b));
    assert!(b.contains("still yours"), "{b}");
    // Gate full: 503 service-unavailable before any redemption.
    t.rig.gates.lock().full = true;
    let tok = token(9);
    t.rig.redeemer.add(&tok, MINT, 10, Ok(()));
    let before = t.rig.redeemer.calls();
    let (s, _, resp) = send(&t.app, "POST", "/", None, tok.into_bytes(), PEER).await;
    assert_eq!(
        (s, notice_code(&resp).as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "service-unavailable")
    );
    assert_eq!(t.rig.redeemer.calls(), before);
}

#[tokio::test]
async fn body_limits_and_content_types() {
    let t = setup(1, 0, 60);
    let huge = vec![b'a'; protocol::MAX_BODY_BYTES + 1];
    let (s, _, body) = send(&t.app, "POST", "/", Some("text/plain"), huge, PEER).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(notice_code(&body), "invalid-request");
    let (s, _, body) = send(
        &t.app,
        "POST",
        "/",
        Some("multipart/form-data; boundary=x"),
        b"x".to_vec(),
        PEER,
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(notice_code(&body), "invalid-request");
}

#[tokio::test]
async fn per_ip_rate_limit() {
    let t = setup(1, 0, 1);
    let mut last = None;
    for _ in 0..12 {
        last = Some(send(&t.app, "POST", "/", None, b"x".to_vec(), PEER).await);
    }
    let (s, h, _) = last.expect("responses");
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(h.contains_key("retry-after"));
    // Another client is not affected.
    let (s, _, _) = send(&t.app, "POST", "/", None, b"x".to_vec(), UNKNOWN_PEER).await;
    assert_ne!(s, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn whoami_usage_balance_without_session() {
    let t = setup(1, 0, 60);
    let (s, h, body) = send(&t.app, "GET", "/whoami", None, vec![], PEER).await;
    assert_eq!(
        (s, body.as_str()),
        (StatusCode::OK, "mac=aa:bb:cc:00:00:05")
    );
    assert_eq!(h["content-type"], "text/plain");
    let (_, _, body) = send(&t.app, "GET", "/usage", None, vec![], PEER).await;
    assert_eq!(body, "-1/-1");
    let (_, _, body) = send(&t.app, "GET", "/balance", None, vec![], PEER).await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["session_active"], false);
    assert_eq!(v["status"], 1, "the reference's /balance carries `status`");
}

/// Issue 12 item 2: HTTP-03 says `/usage` MUST answer 200 (`-1/-1` without a session); the
/// reference buyer and the laptop client stop on any other status. A device whose MAC we
/// cannot find has no session: /usage, /balance and /whoami answer 200 saying so.
#[tokio::test]
async fn unknown_device_gets_200_no_session_answers() {
    let t = setup(1, 0, 60);
    let (s, h, body) = send(&t.app, "GET", "/usage", None, vec![], UNKNOWN_PEER).await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "-1/-1"));
    assert_eq!(h["content-type"], "text/plain");
    let (s, _, body) = send(&t.app, "GET", "/balance", None, vec![], UNKNOWN_PEER).await;
    assert_eq!(s, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (v["status"].clone(), v["session_active"].clone()),
        (1.into(), false.into())
    );
    assert_eq!(v["remaining"], 0);
    let (s, _, body) = send(&t.app, "GET", "/whoami", None, vec![], UNKNOWN_PEER).await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "mac=unknown"));
    // A payment still needs the MAC: refused, and nothing was taken.
    let (s, _, body) = send(
        &t.app,
        "POST",
        "/",
        None,
        token(7).into_bytes(),
        UNKNOWN_PEER,
    )
    .await;
    assert_eq!(
        (s, notice_code(&body).as_str()),
        (StatusCode::BAD_REQUEST, "mac-address-lookup-failed")
    );
}

/// Issue 12 item 8: with no accepted mint reachable, `GET /` answers the reference's
/// kind-21023 warning `no-reachable-mints` (the shipped portal shows it and retries).
#[tokio::test]
async fn advertisement_warns_when_no_mint_is_reachable() {
    let rig = rig(1, 0, Duration::from_secs(5));
    let cfg = HttpConfig {
        listen: "0.0.0.0:2121".parse().expect("addr"),
        admin_listen: "127.0.0.1:2122".parse().expect("addr"),
        lan_interface: None,
        post_rate_per_minute: 60,
        portal_port: 2121,
        portal_mark: None,
    };
    let state = AppState::new(
        &cfg,
        rig.merchant.clone(),
        rig.chandler.clone(),
        Arc::new(StaticNeighbours(HashMap::new())),
    );
    state
        .mints_reachable
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let app = router(state.clone());
    let (s, h, body) = send(&app, "GET", "/", None, vec![], PEER).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(notice_code(&body), "no-reachable-mints");
    let ev: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(ev["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .any(|t| t[0] == "level" && t[1] == "warning"));
    assert!(h.contains_key("retry-after"));
    state
        .mints_reachable
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (s, _, _) = send(&app, "GET", "/", None, vec![], PEER).await;
    assert_eq!(s, StatusCode::OK, "back to the advertisement");
}

/// Issue 12 item 8: the laptop client POSTs to `/?mac=<its MAC>`. The query is accepted
/// and ignored: the session goes to the MAC of the source address, never the claimed one.
#[tokio::test]
async fn post_with_mac_query_is_accepted_but_not_trusted() {
    let t = setup(1, 0, 60);
    let tok = token(8);
    t.rig.redeemer.add(&tok, MINT, 3, Ok(()));
    let (s, _, body) = send(
        &t.app,
        "POST",
        "/?mac=de:ad:be:ef:00:01",
        Some("text/plain"),
        tok.into_bytes(),
        PEER,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let sess = Session::from_event(&Event::from_json(&body).expect("ev")).expect("1022");
    assert_eq!(sess.mac, client_mac());
    let claimed: MacAddr = "de:ad:be:ef:00:01".parse().expect("mac");
    assert!(t.rig.chandler.usage(claimed).expect("usage").is_none());
}

/// Issue 12 item 8: `X-Real-IP` from a reverse proxy on loopback names the client (the
/// reference reads it first); from a LAN peer it is ignored.
#[tokio::test]
async fn real_ip_only_from_loopback() {
    let t = setup(1, 0, 60);
    let rip = [("x-real-ip", "10.0.0.5")];
    let (_, _, body) = send_h(
        &t.app,
        "GET",
        "/whoami",
        None,
        vec![],
        "127.0.0.1:1000",
        &rip,
    )
    .await;
    assert_eq!(body, "mac=aa:bb:cc:00:00:05");
    let (_, _, body) = send_h(&t.app, "GET", "/whoami", None, vec![], UNKNOWN_PEER, &rip).await;
    assert_eq!(
        body, "mac=unknown",
        "a LAN client cannot claim another's address"
    );
}

/// Issue 12 item 8: a page served by this router under a public-looking name (the Host the
/// request came in with) may call the API from another port.
#[tokio::test]
async fn cors_accepts_same_host_origin() {
    let t = setup(1, 0, 60);
    let hdr = [
        ("origin", "http://gate.example.net:8080"),
        ("host", "gate.example.net:2121"),
    ];
    let (s, h, _) = send_h(&t.app, "OPTIONS", "/", None, vec![], PEER, &hdr).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(
        h["access-control-allow-origin"],
        "http://gate.example.net:8080"
    );
    let other = [
        ("origin", "http://evil.example.net"),
        ("host", "gate.example.net:2121"),
    ];
    let (s, _, _) = send_h(&t.app, "POST", "/", None, b"x".to_vec(), PEER, &other).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(!same_host("http://gate.example.net", None));
    assert!(!same_host(
        "file://gate.example.net",
        Some("gate.example.net")
    ));
}

#[tokio::test]
async fn forwarded_for_only_from_loopback() {
    let t = setup(1, 0, 60);
    let xff = [("x-forwarded-for", "10.0.0.5")];
    let (s, _, body) = send_h(
        &t.app,
        "GET",
        "/whoami",
        None,
        vec![],
        "127.0.0.1:1000",
        &xff,
    )
    .await;
    assert_eq!(
        (s, body.as_str()),
        (StatusCode::OK, "mac=aa:bb:cc:00:00:05")
    );
    let (_, _, body) = send_h(&t.app, "GET", "/whoami", None, vec![], UNKNOWN_PEER, &xff).await;
    assert_eq!(
        body, "mac=unknown",
        "a LAN client cannot claim another's address"
    );
}

#[tokio::test]
async fn captive_api() {
    let t = setup(1, 0, 60);
    let host = [("host", "10.0.0.1:2121")];
    let (s, h, body) = send_h(&t.app, "GET", "/captive", None, vec![], PEER, &host).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["content-type"], "application/captive+json");
    assert_eq!(h["cache-control"], "no-store");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["captive"], true);
    assert_eq!(v["user-portal-url"], "http://10.0.0.1:2121/portal");
    let tok = token(1);
    t.rig.redeemer.add(&tok, MINT, 2, Ok(()));
    send(&t.app, "POST", "/", None, tok.into_bytes(), PEER).await;
    let (_, _, body) = send_h(&t.app, "GET", "/captive", None, vec![], PEER, &host).await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["captive"], false);
    assert_eq!(v["bytes-remaining"], 2000);
    assert_eq!(v["can-extend-session"], true);
}

#[tokio::test]
async fn cors_local_origins_only() {
    let t = setup(1, 0, 60);
    let (s, h, _) = send_h(
        &t.app,
        "OPTIONS",
        "/",
        None,
        vec![],
        PEER,
        &[("origin", "http://10.0.0.1:8080")],
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(h["access-control-allow-origin"], "http://10.0.0.1:8080");
    let (s, h, _) = send_h(
        &t.app,
        "GET",
        "/",
        None,
        vec![],
        PEER,
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(!h.contains_key("access-control-allow-origin"));
    let (s, _, _) = send_h(
        &t.app,
        "POST",
        "/",
        None,
        b"x".to_vec(),
        PEER,
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    for (o, ok) in [
        ("http://192.168.1.1", true),
        ("http://tollgate.lan", true),
        ("http://localhost:3000", true),
        ("http://[fd00::1]", true),
        ("https://example.com", false),
        ("http://8.8.8.8", false),
        ("null", false),
    ] {
        assert_eq!(is_local_origin(o), ok, "{o}");
    }
}

#[tokio::test]
async fn admin_grant_and_close() {
    let t = setup(1, 0, 60);
    let mut map = HashMap::new();
    map.insert("10.0.0.5".parse().expect("ip"), client_mac());
    let cfg = HttpConfig {
        listen: "0.0.0.0:2121".parse().expect("addr"),
        admin_listen: "127.0.0.1:2122".parse().expect("addr"),
        lan_interface: None,
        post_rate_per_minute: 60,
        portal_port: 2121,
        portal_mark: Some(0x7467),
    };
    let st = AppState::new(
        &cfg,
        t.rig.merchant.clone(),
        t.rig.chandler.clone(),
        Arc::new(StaticNeighbours(map)),
    );
    // The read-only half (what admin_listen serves) refuses the verbs (issue 11).
    let read_only = admin_router(st.clone());
    for verb in ["grant?amount=500", "close"] {
        let (s, _, _) = send(
            &read_only,
            "POST",
            &format!("/clients/aa:bb:cc:00:00:05/{verb}"),
            None,
            vec![],
            "127.0.0.1:1",
        )
        .await;
        assert!(
            s.is_client_error(),
            "{verb} on the read-only admin API: {s}"
        );
    }
    let admin = admin_router(st.clone()).merge(admin_verbs_router(st));
    let (s, _, body) = send(
        &admin,
        "POST",
        "/clients/aa:bb:cc:00:00:05/grant?amount=500",
        None,
        vec![],
        "127.0.0.1:1",
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (_, _, body) = send(&t.app, "GET", "/usage", None, vec![], PEER).await;
    assert_eq!(body, "0/500");
    let (s, _, _) = send(
        &admin,
        "POST",
        "/clients/aa:bb:cc:00:00:05/close",
        None,
        vec![],
        "127.0.0.1:1",
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, _, body) = send(&t.app, "GET", "/usage", None, vec![], PEER).await;
    assert_eq!(body, "-1/-1");
    let (s, _, body) = send(&admin, "GET", "/clients", None, vec![], "127.0.0.1:1").await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("admin-close"), "{body}");
    let (s, _, _) = send(
        &admin,
        "POST",
        "/clients/nope/close",
        None,
        vec![],
        "127.0.0.1:1",
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn bind_lan_pins_to_interface() {
    let l = bind_lan("127.0.0.1:0".parse().expect("addr"), Some("lo"));
    match l {
        Ok(l) => assert!(l.local_addr().is_ok()),
        // Without CAP_NET_RAW on old kernels SO_BINDTODEVICE is refused: say so, don't hide it.
        Err(e) => eprintln!("SKIP bind_lan_pins_to_interface: SO_BINDTODEVICE refused: {e}"),
    }
    assert!(bind_lan("127.0.0.1:0".parse().expect("addr"), Some("no-such-if0")).is_err());
}

// ------------------------------------------------------------------ captive portal

/// A request on a connection with `mark` that reached `10.0.0.1:2121` from `peer`.
async fn send_marked(
    app: &Router,
    method: &str,
    uri: &str,
    host: &str,
    peer: &str,
    mark: u32,
) -> (StatusCode, HeaderMap, String) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", host)
        .body(Body::empty())
        .expect("request");
    let p = Peer {
        remote: peer.parse().expect("peer"),
        local: "10.0.0.1:2121".parse().expect("local"),
        mark,
    };
    let resp = app
        .clone()
        .layer(MockConnectInfo(p))
        .oneshot(req)
        .await
        .expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

const PROBES: [&str; 9] = [
    "/generate_204",
    "/gen_204",
    "/hotspot-detect.html",
    "/library/test/success.html",
    "/connecttest.txt",
    "/ncsi.txt",
    "/success.txt",
    "/canonical.html",
    "/redirect",
];

#[tokio::test]
async fn redirected_connections_of_unpaid_clients_go_to_the_portal() {
    let t = setup(1, 0, 60);
    // Even the API's own paths: on a redirected connection the client meant another server.
    for path in PROBES
        .iter()
        .chain(&["/", "/usage", "/portal", "/any/page?x=%3Cb%3E"])
    {
        let (s, h, body) = send_marked(&t.app, "GET", path, "example.com", PEER, 0x7467).await;
        assert_eq!(s, StatusCode::FOUND, "{path}");
        assert_eq!(h["location"], "http://10.0.0.1:2121/portal", "{path}");
        assert_eq!(h["cache-control"], "no-store");
        assert!(body.contains("http://10.0.0.1:2121/portal"), "{body}");
    }
    let (s, h, _) = send_marked(&t.app, "POST", "/form", "example.com", PEER, 0x7467).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(h["location"], "http://10.0.0.1:2121/portal");
    // A client whose MAC is unknown is unpaid too.
    let (s, _, _) = send_marked(&t.app, "GET", "/generate_204", "x", UNKNOWN_PEER, 0x7467).await;
    assert_eq!(s, StatusCode::FOUND);
}

#[tokio::test]
async fn unmarked_or_foreign_marked_connections_reach_the_api() {
    let t = setup(1, 0, 60);
    for mark in [0, 0x7468, 0xffff_ffff] {
        let (s, h, body) = send_marked(&t.app, "GET", "/", "10.0.0.1:2121", PEER, mark).await;
        assert_eq!(s, StatusCode::OK, "mark {mark:#x}");
        assert_eq!(h["content-type"], "application/json");
        assert!(body.contains("10021"), "{body}");
        let (s, _, body) = send_marked(&t.app, "GET", "/usage", "h", PEER, mark).await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "-1/-1"));
        let (s, _, _) = send_marked(&t.app, "GET", "/generate_204", "h", PEER, mark).await;
        assert_eq!(
            s,
            StatusCode::NOT_FOUND,
            "no probe answers off the redirect"
        );
    }
}

#[tokio::test]
async fn paid_clients_on_a_stale_redirected_connection_get_success_or_a_retry() {
    let t = setup(1, 0, 60);
    let tok = token(7);
    t.rig.redeemer.add(&tok, MINT, 2, Ok(()));
    let (s, _, _) = send(&t.app, "POST", "/", None, tok.into_bytes(), PEER).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, body) = send_marked(&t.app, "GET", "/generate_204", "g.co", PEER, 0x7467).await;
    assert_eq!((s, body.as_str()), (StatusCode::NO_CONTENT, ""));
    let (s, _, body) = send_marked(
        &t.app,
        "GET",
        "/hotspot-detect.html",
        "captive.apple.com",
        PEER,
        0x7467,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("Success"));
    let (s, h, _) = send_marked(&t.app, "GET", "/a?b=1", "example.com", PEER, 0x7467).await;
    assert_eq!(s, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(h["location"], "http://example.com/a?b=1");
    assert_eq!(h["connection"], "close");
    let (s, h, _) = send_marked(&t.app, "GET", "/a", "evil/x", PEER, 0x7467).await;
    assert_eq!(s, StatusCode::FOUND, "insane Host: the portal");
    assert_eq!(h["location"], "http://10.0.0.1:2121/portal");
}

#[tokio::test]
async fn redirect_off_means_no_mark_is_special() {
    let rig = rig(1, 0, Duration::from_secs(5));
    let cfg = HttpConfig {
        listen: "0.0.0.0:2121".parse().expect("addr"),
        admin_listen: "127.0.0.1:2122".parse().expect("addr"),
        lan_interface: None,
        post_rate_per_minute: 60,
        portal_port: 2121,
        portal_mark: None,
    };
    let app = router(AppState::new(
        &cfg,
        rig.merchant.clone(),
        rig.chandler.clone(),
        Arc::new(StaticNeighbours(HashMap::new())),
    ));
    let (s, _, _) = send_marked(&app, "GET", "/", "h", PEER, 0x7467).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn portal_page_and_assets_with_csp() {
    let t = setup(1, 0, 60);
    for (path, ct, needle) in [
        ("/portal", "text/html; charset=utf-8", "id=\"token\""),
        (
            "/portal/app.js",
            "text/javascript; charset=utf-8",
            "textContent",
        ),
        ("/portal/style.css", "text/css; charset=utf-8", "textarea"),
    ] {
        let (s, h, body) = send(&t.app, "GET", path, None, vec![], PEER).await;
        assert_eq!(s, StatusCode::OK, "{path}");
        assert_eq!(h["content-type"], ct);
        let csp = h["content-security-policy"].to_str().expect("csp");
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert!(body.contains(needle), "{path}");
    }
    let (_, _, html) = send(&t.app, "GET", "/portal", None, vec![], PEER).await;
    // No external resources, no inline script or style (the CSP would block them).
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"));
    assert!(!html.contains("<script>") && !html.contains("style="));
    let (_, _, js) = send(&t.app, "GET", "/portal/app.js", None, vec![], PEER).await;
    assert!(!js.contains("innerHTML") && !js.contains("eval(") && !js.contains("document.write"));
    // The API routes are untouched.
    let (s, h, _) = send(&t.app, "GET", "/", None, vec![], PEER).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["content-type"], "application/json");
}

/// `(name, dur ms)` pairs of a `Server-Timing` header.
fn timings(h: &HeaderMap) -> Vec<(String, f64)> {
    let v = h
        .get("server-timing")
        .expect("server-timing header")
        .to_str()
        .expect("ascii");
    v.split(',')
        .map(|m| {
            let (name, dur) = m.trim().split_once(";dur=").expect("name;dur=");
            (name.to_string(), dur.parse().expect("ms"))
        })
        .collect()
}

#[tokio::test]
async fn paid_post_reports_the_redeem_time_in_server_timing() {
    let t = setup(1, 0, 600);
    *t.rig.redeemer.delay.lock().expect("lock") = Duration::from_millis(40);
    let tok = token(7);
    t.rig.redeemer.add(&tok, MINT, 2, Ok(()));
    let (s, h, body) = send(
        &t.app,
        "POST",
        "/",
        Some("text/plain"),
        tok.clone().into_bytes(),
        PEER,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let m = timings(&h);
    assert_eq!(m.len(), 2, "{m:?}");
    assert_eq!(m[0].0, "redeem");
    assert_eq!(m[1].0, "total");
    assert!(
        m[0].1 >= 40.0,
        "the wallet's 40 ms are the redeem share: {m:?}"
    );
    assert!(m[1].1 >= m[0].1, "total includes redeem: {m:?}");

    // A replay redeems nothing: only the total is reported.
    let (s, h, _) = send(
        &t.app,
        "POST",
        "/",
        Some("text/plain"),
        tok.into_bytes(),
        PEER,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let m = timings(&h);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0].0, "total");
}

#[test]
fn server_timing_format() {
    assert_eq!(
        server_timing(
            Some(Duration::from_micros(12_345)),
            Duration::from_micros(14_000)
        ),
        "redeem;dur=12.345, total;dur=14.000"
    );
    assert_eq!(
        server_timing(None, Duration::from_micros(1_500)),
        "total;dur=1.500"
    );
}

#[tokio::test]
async fn advertisement_is_cached_within_a_second_and_created_at_moves_on() {
    let t = setup(1, 0, 60);
    let created = |body: &str| Event::from_json(body).expect("ev").created_at.as_secs();
    let (_, _, first) = send(&t.app, "GET", "/", None, vec![], PEER).await;
    independently_verify(&first);
    let (_, _, second) = send(&t.app, "GET", "/", None, vec![], PEER).await;
    if created(&first) == created(&second) {
        assert_eq!(first, second, "same second: the cached event");
    }
    // A later second gets a freshly signed event with the real time.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let before = crate::sys::clock::unix_secs();
        let (_, _, body) = send(&t.app, "GET", "/", None, vec![], PEER).await;
        let after = crate::sys::clock::unix_secs();
        independently_verify(&body);
        let c = created(&body);
        assert!(
            before <= c && c <= after,
            "created_at {c} is now ({before}..={after})"
        );
        if c > created(&first) {
            assert_ne!(body, first);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "created_at never moved on"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
