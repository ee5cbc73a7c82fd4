//! The daemon stays up for months (issue 11): hostile clients cannot exhaust it, and the admin
//! API over TCP moves neither money nor access.
//!
//! 1. Lab: client ── lan0 ── gateway; a real mint on the gateway's loopback; a real daemon
//!    whose open-file limit is lowered to 1 024 (`prlimit`, as on a small router).
//! 2. A hostile device (a second address in the client namespace) opens 2 000 connections and
//!    sends each a request head that never ends (slowloris), holding them all open.
//! 3. Meanwhile the customer at the client address pays a real token: it must get its kind-1022
//!    session. Before the limits, the daemon ran out of descriptors and never answered.
//! 4. The admin API is exposed on the LAN with an `admin_token`: without the token it answers
//!    401; with it, reads work and grant/close are refused (they live on the control socket).
//! 5. A daemon whose admin API is on a non-loopback address without a token refuses to start.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use tollgate_tests::{
    gateway::{http, in_ns, json_body, tag, GatewayLab},
    netns::{Lab3, GW_LAN_IP, LAN_IFACE},
    pins::PinBase,
    tollgate_bin,
};

const ATTACK_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(GW_LAN_IP), 2122);
const TOKEN: &str = "0123456789abcdef-test-token";

/// Raises this process's open-file limit to its hard limit (2 000 client sockets + slack).
fn raise_nofile(need: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        assert!(
            r.rlim_max >= need,
            "this test needs {need} open files; the hard limit is {}",
            r.rlim_max
        );
        r.rlim_cur = r.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
    }
}

/// `prlimit --pid <pid> --nofile=<n>`: the daemon gets a small router's descriptor budget.
fn limit_nofile(pid: u32, n: u64) {
    let r = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: prlimit on our own child with a valid struct; old value not requested.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &r,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn config(dir: &std::path::Path, mint: &str, extra: serde_json::Value) {
    let mut cfg = serde_json::json!({
        "config_version": "v0.0.8", "metric": "bytes", "step_size": 1000,
        "accepted_mints": [{"url": mint, "price_per_step": 1, "price_unit": "sat",
            "purchase_min_steps": 10, "min_balance": 64, "min_payout_amount": 1000000,
            "payout_interval_seconds": 3600, "balance_tolerance_percent": 10}],
        "profit_share": [{"identity": "owner", "factor": 1.0}],
        "reseller_mode": false
    });
    for (k, v) in extra.as_object().expect("object") {
        cfg[k] = v.clone();
    }
    tollgate_tests::gateway::write_config_value(dir, &cfg);
}

/// A raw request to the admin API from the client namespace: (status, body).
fn admin(lab: &Lab3, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n{}\r\n",
        token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"))
    );
    lab.client.run(move || {
        let mut s = TcpStream::connect_timeout(&ADMIN, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(req.as_bytes()).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, out)
    })
}

#[test]
fn slowloris_from_2000_connections_does_not_stop_a_payment_and_admin_tcp_is_read_only() {
    raise_nofile(4_096);
    let g = GatewayLab::new("bnd");
    let GatewayLab {
        lab,
        config_dir,
        rt,
        mint,
        ..
    } = &g;
    config(
        config_dir,
        &mint.url(),
        serde_json::json!({"admin_token": TOKEN}),
    );
    let daemon = g.start_with_admin(ADMIN);
    limit_nofile(daemon.child.id(), 1_024);

    // 2. The hostile device: 2 000 connections, each with a head that never ends.
    lab.client
        .ip(&["addr", "add", &format!("{ATTACK_IP}/24"), "dev", "eth0"]);
    let held = lab.client.run(|| {
        let (mut held, mut failed_in_a_row) = (Vec::new(), 0);
        for _ in 0..2_000 {
            match socket_from(ATTACK_IP) {
                Some(mut s) => {
                    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: 10.77.0.1\r\nX-Slow: ");
                    held.push(s);
                    failed_in_a_row = 0;
                }
                // A saturated daemon (the old code) no longer accepts: stop hammering it.
                None if failed_in_a_row == 3 => break,
                None => failed_in_a_row += 1,
            }
        }
        held
    });
    let attempted = held.len();

    // 3. A real payment from the customer while every hostile connection is still open.
    let token = {
        let m = mint.clone();
        in_ns(
            &lab.gateway,
            rt,
            move || async move { m.mint_token(100).await },
        )
    };
    let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &token)));
    assert_eq!(st, 200, "payment during the slowloris: {body}");
    let session = json_body(&body);
    assert_eq!(session["kind"], 1022);
    assert_eq!(tag(&session, "allotment"), Some("100000"));
    // Every hostile connection got through the handshake (none left queued behind a full
    // server), and the daemon holds at most the per-IP cap (32) of them open.
    assert_eq!(attempted, 2_000, "connections the gateway accepted");
    let still_open = lab.client.run(move || {
        held.iter()
            .filter(|s| {
                let mut s: &TcpStream = s;
                s.set_read_timeout(Some(Duration::from_millis(1))).ok();
                let mut b = [0u8; 64];
                matches!(s.read(&mut b), Err(e) if matches!(e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
            })
            .count()
    });
    assert!(
        still_open <= 32,
        "{still_open} hostile connections held open"
    );

    // 4. Admin over TCP: the token is required; reads work; grant/close are not served.
    let (st, _) = admin(lab, "GET", "/metrics", None);
    assert_eq!(st, 401, "no token");
    let (st, _) = admin(lab, "GET", "/metrics", Some("wrong-token-wrong-token"));
    assert_eq!(st, 401, "wrong token");
    let (st, body) = admin(lab, "GET", "/clients", Some(TOKEN));
    assert_eq!(st, 200, "{body}");
    let mac = lab
        .client_mac()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    for verb in [
        format!("/clients/{mac}/grant?amount=1000000"),
        format!("/clients/{mac}/close"),
    ] {
        let (st, body) = admin(lab, "POST", &verb, Some(TOKEN));
        assert!(
            st == 404 || st == 405,
            "{verb} must not be served on TCP: {st} {body}"
        );
    }
    let (_, usage) = http(&lab.client, "GET", "/usage", None);
    assert!(usage.ends_with("/100000"), "allotment unchanged: {usage}");
    drop(daemon);
}

/// A client socket bound to `from`, connected to the API (None if the gateway dropped the SYN).
fn socket_from(from: Ipv4Addr) -> Option<TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: a fresh socket we own; sockaddr_in structs are fully initialised.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let s = TcpStream::from_raw_fd(fd);
        let sa = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let local = sa(from, 0);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, (&raw const local).cast(), len),
            0,
            "bind: {}",
            std::io::Error::last_os_error()
        );
        // A send timeout bounds connect() too: a full backlog drops SYNs.
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let remote = sa(GW_LAN_IP, 2121);
        (libc::connect(fd, (&raw const remote).cast(), len) == 0).then_some(s)
    }
}

#[test]
fn an_exposed_admin_api_without_a_token_refuses_to_start() {
    let lab = Lab3::new("bna");
    let pins = PinBase::new("bna");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (config_dir, state_dir) = (tmp.path().join("etc"), tmp.path().join("state"));
    config(&config_dir, "http://127.0.0.1:1", serde_json::json!({}));
    let mut child = Command::new(tollgate_bin())
        .args([
            "--netns",
            &lab.gateway.name,
            "run",
            "--lan-iface",
            LAN_IFACE,
        ])
        .args(["--admin-listen", &ADMIN.to_string()])
        .arg("--config-dir")
        .arg(&config_dir)
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--pin-base")
        .arg(pins.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tollgate");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon started with an unauthenticated admin API on {ADMIN}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    assert!(!status.success(), "must refuse to start: {err}");
    assert!(err.contains("admin_token"), "says why: {err}");
}
