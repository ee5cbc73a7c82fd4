//! The gate against a hostile customer, daemon side (issue 9: items 2, 6 and 7): a real daemon,
//! a real mint and real packets in a lab of namespaces; what gets through is counted on the far
//! side, never by asking the daemon.
//!
//! - `an_old_http_connection_carries_nothing_after_the_gate_closes`: a TCP/80 connection opened
//!   while paid is still marked for the portal once the gate shuts, but NAT only rewrites a
//!   connection's first packet; the nft table's forward chain must drop it.
//! - `hostile_payments_from_two_thousand_macs_leave_no_kernel_entry`: junk, foreign-mint and
//!   spent tokens never create a kernel entry (the pre-flight is a capacity check only).
//! - `payers_leave_at_most_the_retention_and_a_full_map_admits_a_payer`: entries
//!   of ended sessions are evicted after the retention; a map full of closed entries still
//!   admits a new payer; an active client is never evicted.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tollgate_tests::{
    crowd::Crowd,
    gateway::{http, in_ns, write_config, write_config_value, GatewayLab},
    mint::TestMint,
    netns::{Netns, UPSTREAM_IP},
    pins::PinBase,
    tollgate_bin,
};

/// Runs `tollgate <args>`; panics with its stderr unless it succeeds.
fn tg(args: &[&str]) -> String {
    let out = Command::new(tollgate_bin())
        .args(args)
        .output()
        .expect("spawn tollgate");
    assert!(
        out.status.success(),
        "tollgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A TCP server on `ip:port` in `ns` that reads every connection to the end and counts the
/// bytes it received (the far side's own count).
fn counting_server(ns: &Netns, addr: SocketAddr) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let l = TcpListener::bind(addr).expect("bind counting server");
        tx.send(()).expect("ready");
        for s in l.incoming().flatten() {
            let c = c.clone();
            std::thread::spawn(move || {
                let mut s = s;
                let mut b = [0u8; 16384];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 {
                        break;
                    }
                    c.fetch_add(n as u64, Ordering::SeqCst);
                }
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("counting server up");
    count
}

/// Waits until `f` holds (or panics with `what` after `secs`).
fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(secs), "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log(state: &Path) -> String {
    std::fs::read_to_string(state.join("daemon.log")).unwrap_or_default()
}

/// 1. Lab: client ── lan0 ── gateway (daemon + mint) ── wan0 ── upstream (counting server :80).
/// 2. The client pays and opens a TCP/80 connection to the upstream; its bytes arrive.
/// 3. The operator closes the gate. The client's packets on that connection are now marked for
///    the portal, but the connection is not new, so the redirect does not apply to them.
/// 4. The client keeps sending on it: the upstream receives nothing more.
#[test]
fn an_old_http_connection_carries_nothing_after_the_gate_closes() {
    let g = GatewayLab::new("adh");
    let GatewayLab {
        lab,
        config_dir,
        state_dir,
        rt,
        mint,
        ..
    } = &g;
    let received = counting_server(&lab.upstream, SocketAddr::from((UPSTREAM_IP, 80)));
    write_config(config_dir, "bytes", 1_000, &[(&mint.url(), 1)]);
    let mut daemon = g.start();

    let token = {
        let m = mint.clone();
        in_ns(
            &lab.gateway,
            rt,
            move || async move { m.mint_token(1000).await },
        )
    };
    let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &token)));
    assert_eq!(st, 200, "paid: {body}; log: {}", log(state_dir));

    let mut conn = lab.client.run(|| {
        TcpStream::connect_timeout(&SocketAddr::from((UPSTREAM_IP, 80)), Duration::from_secs(5))
            .expect("paid client connects to upstream :80")
    });
    conn.write_all(&[b'a'; 1000]).expect("write while paid");
    wait_for(10, "bytes sent while paid arrive", || {
        received.load(Ordering::SeqCst) == 1000
    });

    let sock = state_dir.join("control.sock");
    tg(&[
        "gate",
        "close",
        &mac_text(lab.client_mac()),
        "--control-socket",
        sock.to_str().expect("utf-8 path"),
    ]);
    // The socket still thinks the connection is fine: its segments leave the client and reach
    // the gateway (retransmitted as they go unanswered).
    conn.set_write_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    for _ in 0..20 {
        let _ = conn.write_all(&[b'b'; 1000]);
        std::thread::sleep(Duration::from_millis(50));
    }
    // Retransmissions back off from 200 ms: 3 s covers several.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        received.load(Ordering::SeqCst),
        1000,
        "bytes reached the upstream on a connection opened while paid, after the gate closed"
    );
    drop(conn);
    daemon.stop();
}

/// `tollgate maps --json`: (policy entries, usage entries, capacity), read from the pins.
fn occupancy(pins: &PinBase) -> (u64, u64, u64) {
    let out = tg(&[
        "maps",
        "--json",
        "--pin-base",
        pins.path().to_str().expect("utf-8 path"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("maps json");
    let o = &v["occupancy"];
    (
        o["policy"].as_u64().expect("policy"),
        o["usage"].as_u64().expect("usage"),
        o["capacity"].as_u64().expect("capacity"),
    )
}

/// A config selling `metric` in `step`s at 1 sat each (minimum 10 steps) with a `dataplane`
/// section and a payment rate high enough for a crowd.
fn crowd_config(dir: &Path, mint: &str, metric: &str, step: u64, dataplane: serde_json::Value) {
    let config = serde_json::json!({
        "config_version": "v0.0.8", "log_level": "info",
        "metric": metric, "step_size": step,
        "accepted_mints": [{
            "url": mint, "price_per_step": 1, "price_unit": "sat",
            "purchase_min_steps": 10, "min_balance": 64, "min_payout_amount": 1000000,
            "payout_interval_seconds": 3600, "balance_tolerance_percent": 10
        }],
        "profit_share": [{"identity": "owner", "factor": 1.0}],
        "reseller_mode": false,
        "usage_snapshot_interval": "500ms",
        "post_rate_per_minute": 100000,
        "dataplane": dataplane
    });
    write_config_value(dir, &config);
}

const CROWD: usize = 2000;
/// Real payments: the wallet swaps each token at the mint. The map is sized well below the
/// crowd so it turns over several times.
const PAYERS: usize = 2000;
const PAYER_WAVE: usize = 250;
const PAYER_SLOTS: u64 = 256;

/// 1. A gateway with a real mint; one legitimate payment from the lab's client (its token is
///    spent from then on).
/// 2. 2 000 devices (macvlans, distinct MACs and addresses) each POST one hostile body: junk
///    that looks like a token, a token of a mint the gateway does not accept, the spent token.
/// 3. Every POST is refused, and the kernel maps hold exactly what they held before.
#[test]
fn hostile_payments_from_two_thousand_macs_leave_no_kernel_entry() {
    let g = GatewayLab::new("adj");
    let GatewayLab {
        lab,
        pins,
        config_dir,
        state_dir,
        rt,
        mint,
        ..
    } = &g;
    let foreign = Arc::new(in_ns(&lab.gateway, rt, || TestMint::start(0)));
    crowd_config(
        config_dir,
        &mint.url(),
        "bytes",
        1_000,
        serde_json::json!({}),
    );
    let mut daemon = g.start();
    let crowd = Crowd::new(lab, CROWD);

    let spent = {
        let m = mint.clone();
        in_ns(
            &lab.gateway,
            rt,
            move || async move { m.mint_token(20).await },
        )
    };
    let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &spent)));
    assert_eq!(
        st,
        200,
        "legitimate payment: {body}; log: {}",
        log(state_dir)
    );
    let foreign_tokens = {
        let f = foreign.clone();
        in_ns(&lab.gateway, rt, move || async move {
            f.mint_tokens(20, 4).await
        })
    };
    let before = occupancy(pins);
    assert_eq!((before.0, before.1), (1, 1), "the paying client's entries");

    let bodies: Vec<String> = (0..CROWD)
        .map(|i| match i % 4 {
            0 => format!("cashuBo2FteBhodHRwOi8vMTI3LjAuMC4xOjEvbm90LWEtbWludGF1{i:08}"),
            1 => foreign_tokens[i % foreign_tokens.len()].clone(),
            2 => spent.clone(),
            _ => format!("cashuA{}", "x".repeat(i % 97 + 1)),
        })
        .collect();
    let statuses = crowd.post(0, &bodies);
    let answered = statuses.iter().filter(|s| **s != 0).count();
    assert_eq!(answered, CROWD, "every hostile POST got an answer");
    let granted = statuses.iter().filter(|s| **s == 200).count();
    // The spent token replayed answers with the session it bought (for its own device), so
    // 200s may come back for those; they must not open anything for the crowd.
    assert!(
        granted <= CROWD / 4,
        "only replays of the spent token may answer 200: {granted}"
    );
    let after = occupancy(pins);
    assert_eq!(
        (after.0, after.1),
        (before.0, before.1),
        "hostile payments left kernel entries behind; log: {}",
        log(state_dir)
    );
    daemon.stop();
}

/// 1. A gateway selling 100 ms steps (a 16 sat token buys 1.6 s) with `max_clients` 256 and a
///    2 s retention for closed entries.
/// 2. 2 000 devices each pay once (in waves of 250, so active sessions fit in the map): every
///    payment is granted although 2 000 > 256, because ended sessions' entries are evicted.
/// 3. After the last session ended and the retention passed, the maps are empty again.
/// 4. A second gateway with `max_clients` 16 and a retention of an hour: the lab's client pays for an hour, 15 devices pay and
///    their sessions end, so the map is full of closed entries; a 17th device still pays and
///    gets in (the oldest closed entry makes room); one device paying for an hour is never
///    evicted while others come and go.
#[test]
fn payers_leave_at_most_the_retention_and_a_full_map_admits_a_payer() {
    let g = GatewayLab::new("adp");
    let GatewayLab {
        lab,
        pins,
        config_dir,
        state_dir,
        rt,
        mint,
        ..
    } = &g;
    crowd_config(
        config_dir,
        &mint.url(),
        "milliseconds",
        100,
        serde_json::json!({"max_clients": PAYER_SLOTS, "closed_retention": "2s"}),
    );
    let mut daemon = g.start();
    assert_eq!(
        occupancy(pins).2,
        PAYER_SLOTS,
        "dataplane.max_clients applied"
    );
    let crowd = Crowd::new(lab, PAYERS + 35);
    let tokens = {
        let m = mint.clone();
        in_ns(&lab.gateway, rt, move || async move {
            m.mint_tokens(16, PAYERS).await
        })
    };
    for (w, wave) in tokens.chunks(PAYER_WAVE).enumerate() {
        let statuses = crowd.post(w * PAYER_WAVE, wave);
        let ok = statuses.iter().filter(|s| **s == 200).count();
        assert_eq!(
            ok,
            wave.len(),
            "every payer admitted; log: {}",
            log(state_dir)
        );
        assert!(occupancy(pins).0 <= PAYER_SLOTS);
        // This wave's 1.6 s sessions end (and the chandler closes them) before the next wave.
        std::thread::sleep(Duration::from_millis(2300));
    }
    wait_for(
        20,
        "entries of ended sessions evicted after the retention",
        || occupancy(pins).0 == 0,
    );
    assert_eq!(occupancy(pins).1, 0, "no counters left either");
    daemon.stop();

    // A small map and a long retention: only room-making evicts (and the pinned 64-entry maps
    // are recreated at 16).
    crowd_config(
        config_dir,
        &mint.url(),
        "milliseconds",
        100,
        serde_json::json!({"max_clients": 16, "closed_retention": "1h"}),
    );
    let mut daemon = g.start();
    assert_eq!(occupancy(pins).2, 16, "maps recreated at the new size");
    let hour = {
        let m = mint.clone();
        in_ns(&lab.gateway, rt, move || async move {
            m.mint_token(36_000).await
        })
    };
    let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &hour)));
    assert_eq!(st, 200, "an hour for the lab's client: {body}");
    let tokens = {
        let m = mint.clone();
        in_ns(&lab.gateway, rt, move || async move {
            m.mint_tokens(16, 35).await
        })
    };
    // 15 devices fill the map with the paying client; their sessions end.
    let statuses = crowd.post(PAYERS, &tokens[..15]);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    std::thread::sleep(Duration::from_millis(2300));
    assert_eq!(
        occupancy(pins).0,
        16,
        "full of closed entries (retention 1 h)"
    );
    // Full: a new payer still gets in, and again, wave after wave.
    for (w, wave) in tokens[15..].chunks(10).enumerate() {
        let statuses = crowd.post(PAYERS + 15 + w * 10, wave);
        assert!(
            statuses.iter().all(|s| *s == 200),
            "a full map admits new payers: {statuses:?}; log: {}",
            log(state_dir)
        );
        assert!(occupancy(pins).0 <= 16);
        std::thread::sleep(Duration::from_millis(2300));
    }
    // The paying client was never evicted: its gate is open and its traffic passes.
    let maps: serde_json::Value = serde_json::from_str(&tg(&[
        "maps",
        "--json",
        "--pin-base",
        pins.path().to_str().expect("utf-8 path"),
    ]))
    .expect("maps json");
    let me = mac_text(lab.client_mac());
    let gate = maps["gates"]
        .as_array()
        .expect("gates")
        .iter()
        .find(|g| g["mac"] == me.as_str())
        .unwrap_or_else(|| panic!("the active client's entry is still there: {maps}"));
    assert_eq!(gate["open"], true, "{gate}");
    lab.client.sh("ping -c1 -W3 10.78.0.2 >/dev/null");
    daemon.stop();
}

/// A UDP server on `addr` in `ns` counting the payload bytes it receives.
fn udp_counter(ns: &Netns, addr: SocketAddr) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let s = std::net::UdpSocket::bind(addr).expect("bind udp counter");
        tx.send(()).expect("ready");
        let mut b = [0u8; 65536];
        while let Ok(n) = s.recv(&mut b) {
            c.fetch_add(n as u64, Ordering::SeqCst);
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("udp counter up");
    count
}

/// Sends `n` datagrams of 500 bytes from `from` to `to`, inside `ns`.
fn udp_send(ns: &Netns, from: std::net::Ipv4Addr, to: SocketAddr, n: usize) {
    ns.run(move || {
        let s = std::net::UdpSocket::bind((from, 0)).expect("bind sender");
        for _ in 0..n {
            let _ = s.send_to(&[7u8; 500], to);
            std::thread::sleep(Duration::from_millis(2));
        }
    });
}

/// 1. The lab's client pays from 10.77.0.2: its gate is bound to that address.
/// 2. A second device with the same MAC (the client's own NIC with a second address,
///    10.77.0.99: to the gateway exactly a clone elsewhere on the segment) sends UDP and
///    opens TCP to the upstream.
/// 3. The upstream receives nothing from the clone (counted there), while the payer's own
///    datagrams arrive; the drops are reported in the status warnings, the verdict counters
///    and the log.
/// 4. After a restart that lost the kernel's maps (a reboot), the reopened gate is bound
///    again: the clone still gets nothing.
#[test]
fn a_clone_of_a_paid_mac_from_another_address_gets_nothing() {
    let g = GatewayLab::new("adc");
    let GatewayLab {
        lab,
        pins,
        config_dir,
        state_dir,
        rt,
        mint,
        ..
    } = &g;
    let far = SocketAddr::from((UPSTREAM_IP, 9009));
    let udp = udp_counter(&lab.upstream, far);
    let tcp = counting_server(&lab.upstream, far);
    crowd_config(
        config_dir,
        &mint.url(),
        "bytes",
        1_000,
        serde_json::json!({}),
    );
    let mut daemon = g.start();
    let token = {
        let m = mint.clone();
        in_ns(
            &lab.gateway,
            rt,
            move || async move { m.mint_token(1000).await },
        )
    };
    let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &token)));
    assert_eq!(st, 200, "paid: {body}; log: {}", log(state_dir));

    let clone = std::net::Ipv4Addr::new(10, 77, 0, 99);
    lab.client
        .ip(&["addr", "add", "10.77.0.99/24", "dev", "eth0"]);
    udp_send(&lab.client, clone, far, 100);
    let tcp_ok = lab.client.run(move || tcp_connects_from(clone, far));
    // The payer itself still gets through (so the far side is listening and reachable).
    udp_send(&lab.client, tollgate_tests::netns::CLIENT_IP, far, 10);
    wait_for(10, "the payer's datagrams arrive", || {
        udp.load(Ordering::SeqCst) >= 10 * 500
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        udp.load(Ordering::SeqCst),
        10 * 500,
        "the clone's datagrams reached the upstream"
    );
    assert!(!tcp_ok, "the clone opened a TCP connection to the upstream");
    assert_eq!(tcp.load(Ordering::SeqCst), 0);

    let sock = state_dir.join("control.sock");
    let status: serde_json::Value = serde_json::from_str(&tg(&[
        "status",
        "--json",
        "--control-socket",
        sock.to_str().expect("utf-8 path"),
    ]))
    .expect("status json");
    let warnings = status["warnings"].to_string();
    assert!(warnings.contains("MAC cloning"), "status warns: {warnings}");
    wait_for(10, "the drops are logged", || {
        log(state_dir).contains("a cloned MAC or a spoofed address")
    });

    // A reboot: the kernel forgets its maps, and the binding with them. Start-up
    // reconciliation reopens the paid gate and binds it again from the daemon's store.
    daemon.stop();
    pins.wipe();
    let mut daemon = g.start();
    let before = udp.load(Ordering::SeqCst);
    udp_send(&lab.client, clone, far, 100);
    udp_send(&lab.client, tollgate_tests::netns::CLIENT_IP, far, 10);
    wait_for(10, "the payer's datagrams arrive after the restart", || {
        udp.load(Ordering::SeqCst) >= before + 10 * 500
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        udp.load(Ordering::SeqCst),
        before + 10 * 500,
        "after a restart that lost the kernel's maps, the clone's datagrams reached the \
         upstream; log: {}",
        log(state_dir)
    );
    daemon.stop();
}

/// Whether a TCP connection from `from` to `to` can be opened within 3 s (run inside a
/// namespace: the socket lives there).
fn tcp_connects_from(from: std::net::Ipv4Addr, to: SocketAddr) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let s = tokio::net::TcpSocket::new_v4().expect("socket");
        s.bind(SocketAddr::from((from, 0))).expect("bind");
        matches!(
            tokio::time::timeout(Duration::from_secs(3), s.connect(to)).await,
            Ok(Ok(_))
        )
    })
}
