//! The gate against a hostile customer, daemon side (issue 9: items 2, 6 and 7): a real daemon,
//! a real mint and real packets in a lab of namespaces; what gets through is counted on the far
//! side, never by asking the daemon.
//!
//! - `an_old_http_connection_carries_nothing_after_the_gate_closes`: a TCP/80 connection opened
//!   while paid is still marked for the portal once the gate shuts, but NAT only rewrites a
//!   connection's first packet; the nft table's forward chain must drop it.

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
    gateway::{http, in_ns, ns_runtime, write_config, Daemon},
    mint::TestMint,
    netns::{Lab3, Netns, UPSTREAM_IP},
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
    let lab = Lab3::new("adh");
    let pins = PinBase::new("adh");
    let tmp = tempfile::tempdir().expect("tmp");
    let (config_dir, state_dir) = (tmp.path().join("etc"), tmp.path().join("state"));
    let received = counting_server(&lab.upstream, SocketAddr::from((UPSTREAM_IP, 80)));
    let rt = ns_runtime(&lab.gateway);
    let mint = Arc::new(in_ns(&lab.gateway, &rt, || TestMint::start(0)));
    write_config(&config_dir, "bytes", 1_000, &[(&mint.url(), 1)]);
    let mut daemon = Daemon::start(&lab, &config_dir, &state_dir, &pins);

    let token = {
        let m = mint.clone();
        in_ns(&lab.gateway, &rt, move || async move {
            m.mint_token(1000).await
        })
    };
    let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &token)));
    assert_eq!(st, 200, "paid: {body}; log: {}", log(&state_dir));

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
