//! Issue 12: our daemon against peers shaped like the ecosystem's (see `tollgate_tests::refpeer`).
//!
//! - the shipped portal's Lightning checkout (`POST /ln-invoice`, `GET /ln-invoice?quote=`):
//!   the invoice is paid while the daemon is down (SIGKILL), the device is granted at the next
//!   start, once, on top of what it already had;
//! - the laptop client (`tollgate-clientd`): `POST /?mac=<its MAC>` with a raw token, `/usage`
//!   every 2 s, a top-up below a threshold.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tollgate_tests::{
    gateway::{http, in_ns, json_body, ns_runtime, write_config_value, Daemon},
    mint::TestMint,
    netns::{download, serve_bulk, Lab3, GW_LAN_IP},
    pins::PinBase,
    refpeer::RefCustomer,
};

const STEP: u64 = 1000;

fn say(msg: impl AsRef<str>) {
    println!("[compat] {}", msg.as_ref());
}

struct Gw {
    lab: Lab3,
    pins: PinBase,
    _tmp: tempfile::TempDir,
    etc: PathBuf,
    state: PathBuf,
    rt: Arc<tokio::runtime::Runtime>,
    mint: Arc<TestMint>,
}

impl Gw {
    /// A lab whose mint's fake Lightning backend pays incoming invoices `delay` s after they
    /// are made; the gateway sells bytes, `STEP` per sat, at least 10 steps.
    fn new(tag: &str, delay: u64) -> Gw {
        let lab = Lab3::new(tag);
        let pins = PinBase::new(tag);
        let tmp = tempfile::tempdir().unwrap();
        let (etc, state) = (tmp.path().join("etc"), tmp.path().join("state"));
        serve_bulk(&lab.upstream);
        let rt = ns_runtime(&lab.gateway);
        let mint = Arc::new(in_ns(&lab.gateway, &rt, move || {
            TestMint::start_with_payment_delay(std::net::Ipv4Addr::LOCALHOST.into(), delay)
        }));
        write_config_value(
            &etc,
            &json!({
                "metric": "bytes", "step_size": STEP,
                "accepted_mints": [{
                    "url": mint.url(), "price_per_step": 1, "price_unit": "sat",
                    "purchase_min_steps": 10, "min_balance": 64,
                    "min_payout_amount": 1000000, "payout_interval_seconds": 3600
                }],
                "profit_share": [{"identity": "owner", "factor": 1.0}]
            }),
        );
        Gw {
            lab,
            pins,
            _tmp: tmp,
            etc,
            state,
            rt,
            mint,
        }
    }

    fn start(&self) -> Daemon {
        Daemon::start(&self.lab, &self.etc, &self.state, &self.pins)
    }

    fn token(&self, amount: u64) -> String {
        let m = self.mint.clone();
        in_ns(&self.lab.gateway, &self.rt, move || async move {
            m.mint_token(amount).await
        })
    }

    fn allotment(&self) -> Option<u64> {
        let (st, body) = http(&self.lab.client, "GET", "/usage", None);
        assert_eq!(st, 200, "/usage: {body}");
        let (u, a) = body.trim().split_once('/').expect("used/allotment");
        (u != "-1").then(|| a.parse().expect("allotment"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("daemon.log")).unwrap_or_default()
    }

    fn ln(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (st, b) = http(
            &self.lab.client,
            method,
            path,
            body.map(|b| ("application/json", b)),
        );
        (st, json_body(&b))
    }
}

/// The shipped portal's Lightning flow, with a crash between payment and grant:
/// 1. hostile requests (below the minimum, a foreign mint, garbage, another quote id) are
///    refused with the reference's `{"status":0,"error"}` and cost nothing;
/// 2. the device pays 10 sat in ecash (10 000 bytes), then asks for a 20-sat invoice: the
///    answer carries the reference's fields and the state `UNPAID`;
/// 3. the daemon is SIGKILLed; the invoice gets paid while it is down;
/// 4. at the next start the quote is minted and granted: 30 000 bytes (a top-up), the status
///    says `access_granted`; more polls and another restart grant nothing more.
#[test]
fn lightning_invoice_paid_while_down_is_granted_once_at_start() {
    let gw = Gw::new("cmpln", 3);
    let mut d = gw.start();
    let url = gw.mint.url();

    for (body, what) in [
        (
            json!({"amount": 5, "mint_url": url}).to_string(),
            "below 10 steps",
        ),
        (
            json!({"amount": 20, "mint_url": "https://evil.example"}).to_string(),
            "foreign mint",
        ),
        (json!({"amount": 0, "mint_url": url}).to_string(), "zero"),
        (
            json!({"amount": 2_000_000, "mint_url": url}).to_string(),
            "too large",
        ),
        ("{\"amount\":".to_string(), "garbage"),
    ] {
        let (st, v) = gw.ln("POST", "/ln-invoice", Some(&body));
        assert_eq!((st, v["status"].clone()), (400, json!(0)), "{what}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {v}"
        );
    }
    let (st, v) = gw.ln("GET", "/ln-invoice?quote=not-a-quote", None);
    assert_eq!((st, v["status"].clone()), (404, json!(0)), "{v}");

    assert_eq!(gw.allotment(), None);
    let (st, body) = http(
        &gw.lab.client,
        "POST",
        "/",
        Some(("text/plain", &gw.token(10))),
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(gw.allotment(), Some(10 * STEP));

    let (st, v) = gw.ln(
        "POST",
        "/ln-invoice",
        Some(&json!({"amount": 20, "mint_url": url}).to_string()),
    );
    assert_eq!(st, 200, "{v}");
    say(format!("invoice: {v}"));
    assert_eq!(v["status"], 1);
    assert_eq!(v["state"], "UNPAID");
    assert_eq!(v["amount"], 20);
    assert_eq!(v["mint_url"], url);
    assert_eq!(v["access_granted"], false);
    assert!(
        v["invoice"].as_str().is_some_and(|i| i.starts_with("lnbc")),
        "{v}"
    );
    assert!(v["expiry"].as_u64().is_some_and(|e| e > 0), "{v}");
    let quote = v["quote"].as_str().expect("quote").to_string();
    d.kill();

    // FakeWallet pays the invoice 3 s after it was made: while the daemon is down.
    std::thread::sleep(Duration::from_secs(4));
    let mut d = gw.start();
    let start = Instant::now();
    while gw.allotment() != Some(30 * STEP) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the paid invoice was not granted: {:?}\n{}",
            gw.allotment(),
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    say(format!(
        "granted {}s after the restart",
        start.elapsed().as_secs_f32()
    ));
    let path = format!("/ln-invoice?quote={quote}");
    for _ in 0..3 {
        let (st, v) = gw.ln("GET", &path, None);
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["access_granted"], true, "{v}");
        assert_eq!(v["state"], "ISSUED", "{v}");
        assert_eq!(v["allotment"], 20 * STEP, "{v}");
        assert_eq!(v["metric"], "bytes", "{v}");
    }
    d.stop();
    let _d = gw.start();
    let (_, v) = gw.ln("GET", &path, None);
    assert_eq!(v["access_granted"], true, "{v}");
    assert_eq!(gw.allotment(), Some(30 * STEP), "granted exactly once");
    assert!(
        download(&gw.lab.client, 4_000, Duration::from_millis(800)) >= 4_000,
        "the paid device gets through"
    );
}

/// The laptop client end to end: it pays with `POST /?mac=<its MAC>` (a wrong MAC here: the
/// query must never be trusted), polls `/usage` every 2 s like the reference client, and tops
/// up when less than half of its allotment is left.
#[test]
fn laptop_client_pays_polls_and_tops_up() {
    let gw = Gw::new("cmplap", 0);
    let _d = gw.start();
    let client = RefCustomer {
        ns: &gw.lab.client,
        gateway: SocketAddr::from((GW_LAN_IP, 2121)),
        mac: "02:de:ad:be:ef:01".into(),
    };
    assert_eq!(client.usage(), None);
    assert_eq!(client.pay(&gw.token(10)), 10 * STEP);
    let mut top_ups = 0;
    let mut moved = 0;
    let start = Instant::now();
    while top_ups == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "no top-up happened"
        );
        moved += download(&gw.lab.client, 3 * STEP, Duration::from_millis(800));
        let (used, allotment) = client.usage().expect("a session");
        say(format!("usage {used}/{allotment} after {moved} bytes"));
        if allotment - used.min(allotment) < allotment / 2 {
            assert_eq!(
                client.pay(&gw.token(10)),
                allotment + 10 * STEP,
                "cumulative"
            );
            top_ups += 1;
        } else {
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    let (used, allotment) = client.usage().expect("a session");
    assert_eq!(allotment, 20 * STEP);
    assert!(used < allotment, "{used}/{allotment}");
    // The MAC in the query got nothing: the admin view shows only the real one.
    let (st, body) = tollgate_tests::gateway::http_to(
        &gw.lab.gateway,
        SocketAddr::from(([127, 0, 0, 1], 2122)),
        "GET",
        &format!("/clients/{}", client.mac),
        None,
    );
    assert_eq!(
        (st, body.trim()),
        (200, "null"),
        "the claimed MAC has no session"
    );
}

/// The portal page's Lightning tab in a real browser (headless Chromium in the client
/// namespace): the mint list and amount come from the advertisement, the invoice is shown as
/// text and as a QR code (an SVG image from the gateway itself, allowed by the page's CSP),
/// and the page follows the invoice live until access is granted.
#[test]
fn portal_lightning_tab_shows_invoice_and_qr_then_grants() {
    use tollgate_tests::chromium::Chromium;
    let gw = Gw::new("cmpbr", 2);
    let _d = gw.start();
    let mut chrome = Chromium::launch(&gw.lab.client);
    let tab = chrome.open("http://10.77.0.1:2121/portal");
    chrome.wait_for(
        &tab,
        "(m => m && m.options.length === 1)(document.getElementById('ln-mint'))",
        "the mint list from the advertisement",
    );
    chrome.click(&tab, "#tab-ln");
    chrome.wait_for(
        &tab,
        "document.getElementById('ln-amount').value === '10' && \
         !document.getElementById('pane-ln').hidden",
        "the Lightning tab with the minimum amount",
    );
    chrome.click(&tab, "#ln-get");
    let invoice = chrome.wait_for(
        &tab,
        "(v => v.startsWith('lnbc') ? v : '')(document.getElementById('ln-invoice').value)",
        "the invoice as text",
    );
    say(format!("invoice shown: {invoice}"));
    let qr = chrome.wait_for(
        &tab,
        "(i => i.complete && !i.hidden ? i.naturalWidth : 0)(document.getElementById('ln-qr'))",
        "the QR code image loaded",
    );
    assert!(qr.as_u64().is_some_and(|w| w > 0), "{qr}");
    chrome.wait_for(
        &tab,
        "document.getElementById('ln-state').textContent.startsWith('Paid: access granted')",
        "the page follows the invoice until access is granted",
    );
    chrome.wait_for(
        &tab,
        "document.getElementById('status').textContent === 'Connected.'",
        "connected status",
    );
    drop(chrome);
    assert_eq!(gw.allotment(), Some(10 * STEP));
}

/// Issue 15: with a speed tier configured,
/// 1. the advertisement's standard tags are exactly those of the same gateway without tiers
///    (our `tier` extension tags come after them), and a parser of the standard shape reads
///    one price, the default one;
/// 2. the laptop client (`POST /?mac=<MAC>`, raw token) and the shipped portal's kind 21000
///    (no tier tag) pay at the default tier: default steps, no tier tag in the answer, the
///    default (here unlimited) rate — not the tier's.
#[test]
fn reference_clients_ignore_tier_tags_and_pay_the_default_tier() {
    let gw = Gw::new("cmptier", 0);
    let ad = |gw: &Gw| -> Value {
        let (st, body) = http(&gw.lab.client, "GET", "/", None);
        assert_eq!(st, 200, "{body}");
        json_body(&body)
    };
    let standard = |ev: &Value| -> Vec<Value> {
        ev["tags"]
            .as_array()
            .expect("tags")
            .iter()
            .filter(|t| t[0] != "tier")
            .cloned()
            .collect()
    };
    let mut d = gw.start();
    let without = standard(&ad(&gw));
    d.stop();
    let path = gw.etc.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c["tiers"] = json!([{"name": "fast", "down_kbit": 20000, "up_kbit": 5000, "price_factor": 3}]);
    write_config_value(&gw.etc, &c);
    let _d = gw.start();
    let with = ad(&gw);
    assert_eq!(standard(&with), without, "standard tags unchanged");
    let tags = with["tags"].as_array().expect("tags");
    let first_tier = tags.iter().position(|t| t[0] == "tier").expect("tier tag");
    assert!(
        tags[first_tier..].iter().all(|t| t[0] == "tier"),
        "extension tags come last: {with}"
    );
    let ev = <nostr::Event as nostr::JsonUtil>::from_json(with.to_string()).expect("event");
    let parsed = tollgate::protocol::Advertisement::from_event(&ev).expect("standard parser");
    assert_eq!(parsed.prices.len(), 1, "{parsed:?}");
    assert_eq!(parsed.prices[0].price_per_step, 1);

    let laptop = RefCustomer {
        ns: &gw.lab.client,
        gateway: SocketAddr::from((GW_LAN_IP, 2121)),
        mac: "02:de:ad:be:ef:01".into(),
    };
    assert_eq!(laptop.pay(&gw.token(10)), 10 * STEP, "default steps");
    let gateway = nostr::Keys::parse(tollgate_tests::gateway::MERCHANT_KEY)
        .expect("key")
        .public_key();
    let portal = tollgate::protocol::payment_event(
        &nostr::Keys::generate(),
        &gateway,
        tollgate::valve::MacAddr(gw.lab.client_mac()),
        &gw.token(10),
        tollgate::sys::clock::unix_secs(),
    )
    .expect("event");
    let (st, body) = http(
        &gw.lab.client,
        "POST",
        "/",
        Some(("application/json", &nostr::JsonUtil::as_json(&portal))),
    );
    assert_eq!(st, 200, "{body}");
    let session = json_body(&body);
    assert_eq!(
        tollgate_tests::gateway::tag(&session, "allotment"),
        Some("20000")
    );
    assert_eq!(tollgate_tests::gateway::tag(&session, "tier"), None);
    let sock = gw.state.join("control.sock");
    let rows = tollgate_tests::gateway::tg_json(
        &[
            "clients",
            "--json",
            "--control-socket",
            sock.to_str().expect("utf-8"),
        ],
        None,
    );
    say(format!("clients: {rows}"));
    let row = &rows[0];
    assert_eq!(row["tier"], "default", "{rows}");
    assert_eq!(
        (row["down_kbit"].as_u64(), row["up_kbit"].as_u64()),
        (Some(0), Some(0))
    );
}
