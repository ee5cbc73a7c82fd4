//! Rate limits through the real daemon (issue 15): `shaping` in config.json, the LAN's root
//! qdisc, `tollgate gate open|extend --down-kbit/--up-kbit` over the control socket, and each
//! client's current rate in `tollgate clients` and `/metrics`.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tollgate_tests::{
    gateway::{http_to, tg, tg_json, write_config_value, GatewayLab},
    netns::{download, serve_bulk, LAN_IFACE},
    tollgate_bin,
};

const STEP: u64 = 1024;

/// The lab's config with `shaping` added.
fn write_shaping_config(g: &GatewayLab, shaping: serde_json::Value) {
    g.write_config("bytes", STEP);
    let path = g.config_dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c["shaping"] = shaping;
    write_config_value(&g.config_dir, &c);
}

fn root_qdisc(g: &GatewayLab) -> String {
    g.lab
        .gateway
        .sh(&format!("tc qdisc show dev {LAN_IFACE} root"))
}

/// 1. The configured default rates go to every gate the daemon opens (here an operator's
///    `gate open`), `gate extend --down-kbit` changes the download rate of the open gate
///    without touching the upload rate or the session, `tollgate clients` shows the limits,
///    and the daemon says how downloads are shaped. After SIGTERM no qdisc of ours is left.
///    (Old code: no `shaping` section, no `--down-kbit` flag, no rates in the client rows.)
#[test]
fn configured_rates_apply_and_the_cli_changes_them() {
    let g = GatewayLab::new("shd");
    write_shaping_config(&g, serde_json::json!({"down_kbit": 3000, "up_kbit": 1000}));
    let mut d = g.start();
    let sock = g.state_dir.join("control.sock");
    let sock = sock.to_str().unwrap();
    let mac = tollgate::valve::MacAddr(g.lab.client_mac()).to_string();
    let r = tg_json(
        &[
            "gate",
            "open",
            &mac,
            "--bytes",
            "1000000",
            "--json",
            "--control-socket",
            sock,
        ],
        None,
    );
    assert_eq!(
        (r["down_kbit"].as_u64(), r["up_kbit"].as_u64()),
        (Some(3000), Some(1000))
    );
    let r = tg_json(
        &[
            "gate",
            "extend",
            &mac,
            "--bytes",
            "1000",
            "--down-kbit",
            "8000",
            "--json",
            "--control-socket",
            sock,
        ],
        None,
    );
    assert_eq!(
        (r["down_kbit"].as_u64(), r["up_kbit"].as_u64()),
        (Some(8000), Some(1000))
    );
    assert_eq!(r["state"], "active");
    let (code, text, _) = tg(&["clients", "--control-socket", sock], None);
    assert_eq!(code, 0);
    assert!(
        text.contains("rate limit down 8000 kbit/s, up 1000 kbit/s"),
        "{text}"
    );
    // Hostile input: a rate beyond what the kernel holds is refused, nothing changes.
    let (code, _, err) = tg(
        &[
            "gate",
            "extend",
            &mac,
            "--bytes",
            "1",
            "--up-kbit",
            "99999999999",
            "--control-socket",
            sock,
        ],
        None,
    );
    assert_ne!(code, 0, "too fast a rate is refused");
    assert!(err.contains("largest rate"), "{err}");
    let log = std::fs::read_to_string(g.state_dir.join("daemon.log")).unwrap();
    assert!(log.contains("per-client rate limits on"), "{log}");
    assert!(
        log.contains("installed fq") || log.contains("no fq qdisc"),
        "the daemon says how downloads are shaped: {log}"
    );
    d.stop();
    assert!(
        !root_qdisc(&g).contains("7467:"),
        "our fq is removed at shutdown: {}",
        root_qdisc(&g)
    );
}

/// 2. Another root qdisc on the LAN (an operator's tbf): the daemon refuses to start shaping
///    and says how to allow it; with `replace_qdisc: true` it starts (and replaces it where
///    the kernel has fq). (Old code: `shaping` was ignored and the daemon started.)
#[test]
fn a_foreign_root_qdisc_is_refused_unless_replacing_is_allowed() {
    let g = GatewayLab::new("shq");
    g.lab.gateway.sh(&format!(
        "tc qdisc add dev {LAN_IFACE} root handle 1: tbf rate 100mbit burst 100k latency 50ms"
    ));
    write_shaping_config(&g, serde_json::json!({"down_kbit": 3000}));
    std::fs::create_dir_all(&g.state_dir).unwrap();
    let mut child = Command::new(tollgate_bin())
        .args([
            "--netns",
            &g.lab.gateway.name,
            "run",
            "--lan-iface",
            LAN_IFACE,
        ])
        .args([
            "--listen",
            "10.77.0.1:2121",
            "--admin-listen",
            "127.0.0.1:2122",
        ])
        .arg("--config-dir")
        .arg(&g.config_dir)
        .arg("--state-dir")
        .arg(&g.state_dir)
        .arg("--pin-base")
        .arg(g.pins.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tollgate run");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the daemon started shaping over a foreign root qdisc");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "refused: {err}");
    assert!(
        err.contains("replace_qdisc") && err.contains("tbf"),
        "the error names the qdisc and the fix: {err}"
    );
    assert!(
        root_qdisc(&g).contains("tbf"),
        "the operator's qdisc is untouched"
    );
    // Allowed: the daemon starts.
    write_shaping_config(
        &g,
        serde_json::json!({"down_kbit": 3000, "replace_qdisc": true}),
    );
    let mut d = g.start();
    d.stop();
}

/// 3. Each client's current rate: a client capped at 4 Mbit/s that downloads shows about
///    4 Mbit/s "now" in `tollgate clients` (JSON and table) and in `/metrics` (the sum, the
///    clients at their cap, the fastest clients by MAC); once it stops, its rate falls to 0.
///    (Old code: no current rate anywhere, only cumulative counters.)
#[test]
fn clients_and_metrics_show_the_current_rate() {
    let g = GatewayLab::new("shr");
    write_shaping_config(&g, serde_json::json!({"down_kbit": 4000}));
    let mut d = g.start();
    serve_bulk(&g.lab.upstream);
    let sock = g.state_dir.join("control.sock");
    let sock = sock.to_str().unwrap();
    let mac = tollgate::valve::MacAddr(g.lab.client_mac()).to_string();
    tg_json(
        &[
            "gate",
            "open",
            &mac,
            "--bytes",
            "100000000",
            "--json",
            "--control-socket",
            sock,
        ],
        None,
    );
    let rows = || tg_json(&["clients", "--json", "--control-socket", sock], None);
    let now_down = || {
        rows().as_array().unwrap()[0]["now"]["down_bps"]
            .as_f64()
            .unwrap_or(-1.0)
    };
    std::thread::scope(|s| {
        // 4 MB at 4 Mbit/s: ≈ 8 s of download.
        let dl = s.spawn(|| download(&g.lab.client, 4_000_000, Duration::from_secs(3)));
        // Two samples (≥ 2 s apart) wholly inside the transfer, after its first second (the
        // bucket's 128 KiB burst).
        std::thread::sleep(Duration::from_millis(5_500));
        let (code, table, _) = tg(&["clients", "--control-socket", sock], None);
        assert_eq!(code, 0);
        let rate = now_down();
        let (st, page) = http_to(
            &g.lab.gateway,
            SocketAddr::from(([127, 0, 0, 1], 2122)),
            "GET",
            "/metrics",
            None,
        );
        assert_eq!(st, 200, "{page}");
        let got = dl.join().unwrap();
        eprintln!("current rate {rate:.0} bit/s during the download; {got} bytes downloaded");
        eprintln!("{table}");
        // The kernel meters L3 bytes and polices them at 4 000 kbit/s: over a 2 s window of a
        // steady TCP flow the metered rate is within a fifth of the cap.
        assert!(
            (3.2e6..=4.4e6).contains(&rate),
            "current download rate {rate} bit/s, cap 4 Mbit/s"
        );
        assert!(table.contains("now down "), "{table}");
        let samples = tollgate::ops::metrics::parse(&page).expect("metrics parse");
        let v = |name: &str, labels: &[(&str, &str)]| {
            tollgate::ops::metrics::value(&samples, name, labels).unwrap_or(-1.0)
        };
        assert_eq!(
            v("tollgate_clients_at_rate_limit", &[("direction", "down")]),
            1.0,
            "{page}"
        );
        let top = v(
            "tollgate_client_top_rate_bits_per_second",
            &[("mac", &mac), ("direction", "down")],
        );
        assert!((3.2e6..=4.4e6).contains(&top), "{page}");
        assert!(
            v(
                "tollgate_client_rate_bits_per_second",
                &[("direction", "down")]
            ) >= top,
            "{page}"
        );
    });
    // Idle now: within two samples the rate is 0.
    let t0 = Instant::now();
    while now_down() != 0.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the rate falls to 0 once idle: {}",
            rows()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    d.stop();
}
