//! The captive portal in a real browser: headless Chromium in the client namespace, driven over
//! the DevTools protocol.
//!
//! 1. Lab with the daemon, a TestMint on the gateway's loopback, a web server and the bulk
//!    server upstream.
//! 2. The browser opens a plain-HTTP page on the "internet" and lands on the gateway's portal.
//! 3. The price list from the advertisement is shown.
//! 4. A hostile non-token is pasted and paid: the page shows the notice as text (no markup).
//! 5. A real token from the mint is pasted and paid: the page shows the remaining bytes.
//! 6. The client downloads through the gate.

use std::{sync::Arc, time::Duration};

use tollgate_tests::{
    chromium::Chromium,
    gateway::{in_ns, ns_runtime, write_config, Daemon},
    mint::TestMint,
    netns::{download, serve_bulk, Lab3},
    pins::PinBase,
    web::serve_web,
};

const STEP: u64 = 1_000;

#[test]
fn a_browser_is_sent_to_the_portal_pays_there_and_gets_online() {
    let lab = Lab3::new("pbr");
    let pins = PinBase::new("pbr");
    let tmp = tempfile::tempdir().unwrap();
    let (config_dir, state_dir) = (tmp.path().join("etc"), tmp.path().join("state"));
    serve_web(&lab.upstream);
    serve_bulk(&lab.upstream);
    let rt = ns_runtime(&lab.gateway);
    let mint = Arc::new(in_ns(&lab.gateway, &rt, || TestMint::start(0)));
    write_config(&config_dir, "bytes", STEP, &[(&mint.url(), 1)]);
    let mut daemon = Daemon::start(&lab, &config_dir, &state_dir, &pins);
    assert_eq!(
        download(&lab.client, 10_000, Duration::from_secs(1)),
        0,
        "unpaid client blocked"
    );

    let mut chrome = Chromium::launch(&lab.client);
    let tab = chrome.open("http://10.78.0.2/news/today");
    chrome.wait_for(
        &tab,
        "location.href === 'http://10.77.0.1:2121/portal'",
        "the plain-HTTP page redirects to the portal",
    );

    // The price list, from the signed advertisement.
    let prices = chrome.wait_for(
        &tab,
        "Array.from(document.querySelectorAll('#prices li.price')).map(e => e.textContent).join('\\n')",
        "price list shown",
    );
    let prices = prices.as_str().unwrap_or_default().to_string();
    assert!(
        prices.contains("1 sat per 1.0 KB") && prices.contains(&mint.url()),
        "price list: {prices:?}"
    );
    chrome.wait_for(
        &tab,
        "document.getElementById('status').textContent.startsWith('Not connected')",
        "unpaid status",
    );

    // Garbage with markup: refused, and shown as text.
    let hostile = "cashuB<img src=x onerror=\"document.title='pwned'\">";
    chrome
        .eval(&tab, "document.getElementById('token').focus()")
        .unwrap();
    chrome.insert_text(&tab, hostile);
    chrome.click(&tab, "#pay");
    let refused = chrome.wait_for(
        &tab,
        "(t => t.startsWith('Payment refused') ? t : '')(document.getElementById('result').textContent)",
        "the notice of a bad token is shown",
    );
    assert!(
        refused.as_str().unwrap_or_default().contains("invalid"),
        "{refused}"
    );
    let markup = chrome
        .eval(
            &tab,
            "document.querySelectorAll('#result *, #prices img').length + (document.title === 'pwned' ? 100 : 0)",
        )
        .unwrap();
    assert_eq!(markup, 0, "no markup injected into the page");

    // A real token, pasted and paid.
    let token = {
        let m = mint.clone();
        in_ns(
            &lab.gateway,
            &rt,
            move || async move { m.mint_token(200).await },
        )
    };
    chrome
        .eval(
            &tab,
            "(e => { e.value = ''; e.focus(); })(document.getElementById('token'))",
        )
        .unwrap();
    chrome.insert_text(&tab, &token);
    assert_eq!(
        chrome
            .eval(&tab, "document.getElementById('token').value")
            .unwrap(),
        token.as_str(),
        "the token is in the textarea"
    );
    chrome.click(&tab, "#pay");
    chrome.wait_for(
        &tab,
        "document.getElementById('result').textContent.startsWith('Paid')",
        "payment accepted",
    );
    let remaining = chrome.wait_for(
        &tab,
        "(m => m ? Number(m[1]) : 0)(document.getElementById('remaining').textContent.match(/^(\\d+) bytes remaining/))",
        "remaining bytes shown",
    );
    let remaining = remaining.as_u64().expect("number");
    assert!(
        remaining > 0 && remaining <= 200 * STEP,
        "remaining {remaining}"
    );
    chrome.wait_for(
        &tab,
        "document.getElementById('status').textContent === 'Connected.'",
        "connected status",
    );
    drop(chrome);

    let got = download(&lab.client, 50_000, Duration::from_secs(2));
    assert!(
        got >= 50_000,
        "paid client downloads through the gate ({got})"
    );
    daemon.stop();
}
