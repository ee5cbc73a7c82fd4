//! The operator CLI against a real daemon: a real data plane in a Lab3, a real cdk mint in the
//! gateway namespace, `tollgate status|clients|maps|wallet|gate` over the control socket and
//! `/metrics` over the admin address.
//!
//! 1. Before the daemon runs: `tollgate status` exits 3 (daemon unreachable).
//! 2. A client pays 200 sat: `clients --json` shows the session and its used bytes equal the
//!    kernel's counters (`maps --json`); `status --json` shows the data plane attached and the
//!    mint reachable with the balance; `wallet balance --json` shows the 200 sat.
//! 3. `/metrics` from inside the gateway namespace: the payment, the sats and the bytes.
//! 4. `gate extend` adds allotment, `gate close` stops traffic, `gate open` lets it through
//!    again; bad MAC / unknown MAC / wrong unit / conflicting flags give clear errors and codes.
//! 5. `wallet send` makes a token; `wallet receive` takes it back (balance unchanged).
//! 6. `wallet backup` refuses a pipe without --force; with it, the words restore the balance
//!    into an empty state directory against the real mint; a non-empty one is refused.
//! 7. After the daemon stops, its socket is gone and `status` exits 3 again.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use tollgate::ops::metrics;
use tollgate_tests::{
    gateway::{http, in_ns, ns_runtime, tg, tg_json, write_config, Daemon, GatewayLab},
    mint::TestMint,
    netns::{download, serve_bulk, Lab3, Netns},
    pins::PinBase,
    wire::{ForeignTcx, TcxHook, TcxPlace},
};

const STEP: u64 = 1_000;

/// GET /metrics on the admin address, from inside the gateway namespace.
fn scrape(gw: &Netns) -> String {
    gw.run(|| {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], 2122)),
            Duration::from_secs(5),
        )
        .expect("connect admin");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        // Our own daemon's answer (Content-Length, connection closed): head and body.
        let raw = String::from_utf8(raw).expect("utf-8");
        let (head, body) = raw.split_once("\r\n\r\n").expect("http answer");
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert!(
            head.lines().any(|l| l
                .to_ascii_lowercase()
                .starts_with("content-type: text/plain; version=0.0.4")),
            "{head}"
        );
        body.to_string()
    })
}

/// The kernel's up+down bytes for `mac` from `tollgate maps --json`.
fn kernel_bytes(pins: &Path, mac: &str) -> u64 {
    let m = tg_json(
        &["maps", "--json", "--pin-base", pins.to_str().unwrap()],
        None,
    );
    let g = m["gates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["mac"] == mac)
        .unwrap_or_else(|| panic!("{mac} in maps: {m}"));
    g["usage"]["bytes_up"].as_u64().unwrap() + g["usage"]["bytes_down"].as_u64().unwrap()
}

#[test]
fn the_operator_sees_and_steers_a_real_gateway() {
    let g = GatewayLab::new("cli");
    let GatewayLab {
        lab,
        pins,
        tmp,
        config_dir,
        state_dir,
        mint,
        ..
    } = &g;
    let restored_dir = tmp.path().join("restored");
    serve_bulk(&lab.upstream);
    let token_of = |amount: u64| g.token(amount);
    g.write_config("bytes", STEP);
    let state = state_dir.to_str().unwrap().to_string();
    let sock = state_dir.join("control.sock");
    let sock = sock.to_str().unwrap().to_string();

    // 1. No daemon yet.
    std::fs::create_dir_all(state_dir).unwrap();
    let (code, _, err) = tg(&["status", "--state-dir", &state], None);
    assert_eq!(code, 3, "daemon not running: {err}");
    assert!(err.contains("not running"), "{err}");

    let mut daemon = g.start();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "control socket is root's only");
    }

    // 2. A customer pays 200 sat and downloads.
    let token = token_of(200);
    let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &token)));
    assert_eq!(st, 200, "payment: {body}");
    let got = download(&lab.client, 50_000, Duration::from_secs(2));
    assert!(got >= 50_000, "paid client downloads ({got})");
    let mac = lab
        .client_mac()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");

    // The session's used bytes agree with the kernel (read maps before and after; traffic
    // stragglers would make them differ, so retry until a quiet read).
    let deadline = Instant::now() + Duration::from_secs(20);
    let row = loop {
        let before = kernel_bytes(pins.path(), &mac);
        let clients = tg_json(&["clients", "--json", "--state-dir", &state], None);
        let after = kernel_bytes(pins.path(), &mac);
        let row = clients
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["mac"] == mac.as_str())
            .unwrap_or_else(|| panic!("{mac} in clients: {clients}"))
            .clone();
        let used = row["used"].as_u64().unwrap();
        if before == after && used == after {
            break row;
        }
        assert!(
            Instant::now() < deadline,
            "used {used} never matched the kernel ({before}/{after})"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(row["state"], "active");
    assert_eq!(row["allotment"], 200 * STEP);
    assert_eq!(row["ip"], "10.77.0.2", "IP from the gateway's ARP table");
    assert_eq!(
        row["used"].as_u64().unwrap() + row["remaining"].as_u64().unwrap(),
        200 * STEP
    );
    assert!(row["bytes_down"].as_u64().unwrap() >= got);
    let (code, text, _) = tg(&["clients", "--control-socket", &sock], None);
    assert_eq!(code, 0);
    assert!(text.contains(&mac) && text.contains("active"), "{text}");
    assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");

    let status = tg_json(&["status", "--json", "--control-socket", &sock], None);
    assert_eq!(status["gateway"]["lan_iface"], "lan0");
    assert_eq!(status["gateway"]["lan_ipv4"], "10.77.0.1");
    assert_eq!(status["dataplane"]["mode"], "tc");
    let aps: Vec<&str> = status["dataplane"]["attach_points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        aps.contains(&"tc_ingress") && aps.contains(&"tc_egress"),
        "{aps:?}"
    );
    assert!(status["upstream"].is_null());
    let m0 = &status["mints"][0];
    assert_eq!(m0["mint"], mint.url().trim_end_matches('/'));
    assert_eq!(m0["reachable"], true, "{status}");
    assert_eq!(m0["balance"], 200);
    assert_eq!(status["clients"]["active"], 1);
    // Supervised background tasks, all running.
    let tasks: Vec<(&str, &str)> = status["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["state"].as_str().unwrap()))
        .collect();
    for name in ["admin", "api", "chandler", "control", "payouts"] {
        assert!(tasks.contains(&(name, "running")), "{name}: {tasks:?}");
    }
    let (code, text, _) = tg(&["status", "--control-socket", &sock], None);
    assert_eq!(code, 0);
    assert!(text.contains("tc_egress, tc_ingress"), "{text}");
    assert!(!text.contains("foreign tcx"), "{text}");
    // A foreign TCX program put in front of the gate (it could pass frames around it) is
    // reported by status.
    let front = lab.gateway.run(|| {
        ForeignTcx::attach(
            tollgate_tests::netns::LAN_IFACE,
            TcxHook::Ingress,
            TcxPlace::First,
            0,
        )
    });
    let status = tg_json(&["status", "--json", "--control-socket", &sock], None);
    drop(front);
    let warnings = status["warnings"].to_string();
    assert!(
        warnings.contains("foreign tcx ingress programs run before the gate"),
        "{warnings}"
    );

    let bal = tg_json(
        &["wallet", "balance", "--json", "--control-socket", &sock],
        None,
    );
    assert_eq!(bal[0]["balance"], 200, "{bal}");
    assert_eq!(bal[0]["available"], 200, "{bal}");

    // 3. /metrics over the admin address.
    let page = scrape(&lab.gateway);
    let samples = metrics::parse(&page).unwrap_or_else(|e| panic!("{e}\n{page}"));
    let v = |n: &str, l: &[(&str, &str)]| metrics::value(&samples, n, l);
    let murl = mint.url().trim_end_matches('/').to_string();
    assert_eq!(v("tollgate_task_up", &[("task", "chandler")]), Some(1.0));
    assert_eq!(
        v("tollgate_task_restarts_total", &[("task", "payouts")]),
        Some(0.0)
    );
    assert_eq!(
        v(
            "tollgate_payments_total",
            &[("mint", &murl), ("outcome", "accepted")]
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        v("tollgate_payments_received_sats_total", &[("mint", &murl)]),
        Some(200.0)
    );
    assert_eq!(
        v("tollgate_wallet_balance_sats", &[("mint", &murl)]),
        Some(200.0)
    );
    assert_eq!(v("tollgate_clients", &[("state", "active")]), Some(1.0));
    let down = v("tollgate_client_bytes_total", &[("direction", "down")]).unwrap();
    assert!(down >= got as f64, "metrics bytes down {down} < {got}");
    assert!(
        v(
            "tollgate_verdict_packets_total",
            &[("verdict", "pass_paid")]
        )
        .unwrap()
            > 0.0
    );
    assert!(v("tollgate_map_entries", &[("map", "policy")]).unwrap() >= 1.0);
    assert_eq!(v("tollgate_upstream_purchases_total", &[]), Some(0.0));

    // 4. Administrative gate changes.
    let r = tg_json(
        &[
            "gate",
            "extend",
            &mac,
            "--bytes",
            "100000",
            "--json",
            "--control-socket",
            &sock,
        ],
        None,
    );
    assert_eq!(r["allotment"], 300 * STEP);
    let (code, _, err) = tg(
        &[
            "gate",
            "open",
            &mac,
            "--bytes",
            "5",
            "--control-socket",
            &sock,
        ],
        None,
    );
    assert_eq!(code, 1, "open on an active session: {err}");
    assert!(err.contains("gate extend"), "{err}");
    let r = tg_json(
        &["gate", "close", &mac, "--json", "--control-socket", &sock],
        None,
    );
    assert_eq!(r["state"], "admin-close");
    assert_eq!(
        download(&lab.client, 10_000, Duration::from_secs(1)),
        0,
        "closed by the operator"
    );
    let (code, _, err) = tg(&["gate", "close", &mac, "--control-socket", &sock], None);
    assert_eq!(code, 4, "no session to close: {err}");
    let (code, _, err) = tg(
        &[
            "gate",
            "extend",
            "02:00:00:00:00:99",
            "--bytes",
            "5",
            "--control-socket",
            &sock,
        ],
        None,
    );
    assert_eq!(code, 4, "unknown MAC: {err}");
    assert!(err.contains("no active session"), "{err}");
    let (code, _, err) = tg(
        &[
            "gate",
            "open",
            "not-a-mac",
            "--bytes",
            "5",
            "--control-socket",
            &sock,
        ],
        None,
    );
    assert_eq!(code, 2, "bad MAC is a usage error: {err}");
    assert!(err.contains("invalid MAC"), "{err}");
    let (code, _, err) = tg(
        &[
            "gate",
            "open",
            &mac,
            "--bytes",
            "5",
            "--seconds",
            "5",
            "--control-socket",
            &sock,
        ],
        None,
    );
    assert_eq!(code, 2, "conflicting flags: {err}");
    let (code, _, err) = tg(
        &[
            "gate",
            "open",
            &mac,
            "--seconds",
            "60",
            "--control-socket",
            &sock,
        ],
        None,
    );
    assert_eq!(code, 1, "wrong unit: {err}");
    assert!(err.contains("sells bytes"), "{err}");
    let r = tg_json(
        &[
            "gate",
            "open",
            &mac,
            "--bytes",
            "40000",
            "--json",
            "--control-socket",
            &sock,
        ],
        None,
    );
    assert_eq!(r["state"], "active");
    assert!(
        download(&lab.client, 10_000, Duration::from_secs(2)) >= 10_000,
        "opened by the operator"
    );
    let log = std::fs::read_to_string(state_dir.join("daemon.log")).unwrap();
    assert!(
        log.contains("session closed") && log.contains("admin-close"),
        "closes are logged with their reason"
    );

    // 5. Send a token and take it back.
    let (code, sent, err) = tg(
        &[
            "wallet",
            "send",
            "--mint",
            &murl,
            "--amount",
            "20",
            "--control-socket",
            &sock,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let sent = sent.trim().to_string();
    assert!(sent.starts_with("cashu"), "{sent}");
    let bal = tg_json(
        &["wallet", "balance", "--json", "--control-socket", &sock],
        None,
    );
    assert_eq!(bal[0]["balance"], 180, "{bal}");
    let r = tg_json(
        &["wallet", "receive", "--json", "--control-socket", &sock],
        Some(&sent),
    );
    assert_eq!(
        (r["net"].as_u64(), r["replayed"].as_bool()),
        (Some(20), Some(false))
    );
    let (code, _, err) = tg(
        &[
            "wallet",
            "receive",
            "cashuBgarbage",
            "--control-socket",
            &sock,
        ],
        None,
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("invalid token"), "{err}");
    let bal = tg_json(
        &["wallet", "balance", "--json", "--control-socket", &sock],
        None,
    );
    assert_eq!(bal[0]["balance"], 200, "{bal}");
    let payouts = tg_json(
        &["wallet", "payouts", "--json", "--control-socket", &sock],
        None,
    );
    assert!(payouts.as_array().unwrap().is_empty(), "{payouts}");

    // 6. Backup and restore.
    let (code, _, err) = tg(&["wallet", "backup", "--state-dir", &state], None);
    assert_eq!(code, 1, "a pipe is refused: {err}");
    assert!(err.contains("--force"), "{err}");
    let (code, words, err) = tg(
        &["wallet", "backup", "--state-dir", &state, "--force"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(words.split_whitespace().count(), 12, "{words}");
    daemon.stop();
    assert!(!Path::new(&sock).exists(), "socket removed at shutdown");
    let (code, _, err) = tg(&["wallet", "balance", "--control-socket", &sock], None);
    assert_eq!(code, 3, "{err}");

    let cfg = config_dir.to_str().unwrap();
    let (code, _, err) = tg(
        &[
            "--netns",
            &lab.gateway.name,
            "wallet",
            "restore",
            "--config-dir",
            cfg,
            "--state-dir",
            &state,
        ],
        Some(&words),
    );
    assert_eq!(code, 1, "non-empty state dir refused: {err}");
    assert!(err.contains("not empty"), "{err}");
    let restored = restored_dir.to_str().unwrap();
    let r = tg_json(
        &[
            "--netns",
            &lab.gateway.name,
            "wallet",
            "restore",
            "--json",
            "--config-dir",
            cfg,
            "--state-dir",
            restored,
        ],
        Some(&words),
    );
    assert_eq!(r[0]["balance"], 200, "restored from the mint: {r}");
}

/// `tollgate wallet rebalance` against a real daemon with two accepted mints whose Lightning
/// backends are linked (B's invoice is paid only by A's melt):
/// 1. The operator funds 400 sat at A with `wallet receive`.
/// 2. Refused without moving anything: `--amount 0` (exit 1), an unaccepted `--to`, more than
///    A can spend (min_balance 64 stays), `--from` equal to `--to`.
/// 3. `wallet rebalance --to B --amount 100` moves 100: the answer says `done`; both mints,
///    asked proof by proof about the daemon's wallet, hold A −100 − fee and B +100;
///    `wallet balance --json` agrees.
#[test]
fn the_operator_rebalances_between_two_real_mints() {
    use tollgate_tests::crash::audit;
    use tollgate_tests::mint::Lightning;

    let lab = Lab3::new("clirb");
    let pins = PinBase::new("clirb");
    let tmp = tempfile::tempdir().unwrap();
    let (config_dir, state_dir) = (tmp.path().join("etc"), tmp.path().join("state"));
    let rt = ns_runtime(&lab.gateway);
    let net = Lightning::new();
    let (na, nb) = (net.clone(), net.clone());
    let a = Arc::new(in_ns(&lab.gateway, &rt, move || async move {
        TestMint::start_linked(100, &na).await
    }));
    let b = Arc::new(in_ns(&lab.gateway, &rt, move || async move {
        TestMint::start_linked(0, &nb).await
    }));
    write_config(&config_dir, "bytes", STEP, &[(&a.url(), 1), (&b.url(), 1)]);
    let sock = state_dir.join("control.sock");
    let sock = sock.to_str().unwrap().to_string();
    let at_mint = |m: &Arc<TestMint>| {
        let (m, dir) = (m.clone(), state_dir.clone());
        in_ns(&lab.gateway, &rt, move || async move {
            let a = audit(&dir, &m).await;
            assert_eq!((a.phantom, a.stuck), (0, 0), "{a:?}");
            a.unspent
        })
    };
    let _daemon = Daemon::start(&lab, &config_dir, &state_dir, &pins);

    // 1. Funding at A.
    let token = {
        let m = a.clone();
        in_ns(
            &lab.gateway,
            &rt,
            move || async move { m.mint_token(400).await },
        )
    };
    let r = tg_json(
        &["wallet", "receive", "--json", "--control-socket", &sock],
        Some(&token),
    );
    let a0 = r["net"].as_u64().unwrap();
    assert_eq!(at_mint(&a), a0);

    // 2. Refusals.
    let (code, _, err) = tg(
        &[
            "wallet",
            "rebalance",
            "--to",
            &b.url(),
            "--amount",
            "0",
            "--control-socket",
            &sock,
        ],
        None,
    );
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = tg(
        &[
            "wallet",
            "rebalance",
            "--to",
            "http://127.0.0.1:9",
            "--amount",
            "10",
            "--control-socket",
            &sock,
        ],
        None,
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not accepted"), "{err}");
    let (code, _, err) = tg(
        &[
            "wallet",
            "rebalance",
            "--to",
            &b.url(),
            "--amount",
            "380",
            "--control-socket",
            &sock,
        ],
        None,
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("insufficient funds"), "{err}");
    let (code, _, err) = tg(
        &[
            "wallet",
            "rebalance",
            "--to",
            &b.url(),
            "--from",
            &b.url(),
            "--amount",
            "10",
            "--control-socket",
            &sock,
        ],
        None,
    );
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        (at_mint(&a), at_mint(&b)),
        (a0, 0),
        "refusals moved nothing"
    );

    // 3. The move.
    let (code, out, err) = tg(
        &[
            "wallet",
            "rebalance",
            "--to",
            &b.url(),
            "--amount",
            "100",
            "--control-socket",
            &sock,
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("moved 100 sat"), "{out}");
    let (a1, b1) = (at_mint(&a), at_mint(&b));
    assert_eq!(b1, 100, "B's mint holds the amount");
    assert!(
        a1 + 100 <= a0 && a0 - a1 - 100 <= 100 * 2 / 100 + 1,
        "A {a0} -> {a1}"
    );
    let bal = tg_json(
        &["wallet", "balance", "--json", "--control-socket", &sock],
        None,
    );
    let of = |url: String| {
        bal.as_array()
            .unwrap()
            .iter()
            .find(|r| r["mint"] == url.as_str())
            .unwrap_or_else(|| panic!("{url} in {bal}"))["balance"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((of(a.url()), of(b.url())), (a1, b1), "{bal}");
}
