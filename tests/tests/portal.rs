//! The captive portal for real: the eBPF data plane marks an unpaid client's plain HTTP, the
//! daemon's nft table redirects it to the portal listener, the portal answers with a redirect;
//! once paid, the same requests reach the real web server upstream.
//!
//! 1. Lab: client ── lan0 ── gateway (daemon, mint on loopback) ── wan0 ── upstream (web :80).
//! 2. Unpaid: `GET http://10.78.0.2/…` and the connectivity probe `/generate_204` get the
//!    gateway's 302 to `http://10.77.0.1:2121/portal` (never the upstream's answer); the
//!    portal page is served there.
//! 3. Pay a real token: the same requests reach upstream; `/generate_204` is upstream's 204.
//! 4. Stop the daemon: its nft table is gone.

use std::{net::SocketAddr, sync::Arc};

use tollgate_tests::{
    gateway::{http, in_ns, json_body, ns_runtime, write_config, Daemon},
    mint::TestMint,
    netns::{Lab3, GW_LAN_IP, UPSTREAM_IP},
    pins::PinBase,
    tollgate_bin,
    web::{get, serve_web},
};

const TABLE: &str = "tollgate_lan0";

fn nft_table(lab: &Lab3) -> Option<String> {
    let out = lab
        .gateway
        .command("nft")
        .args(["list", "table", "inet", TABLE])
        .output()
        .expect("nft (install nftables)");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Packets the data plane let through as portal traffic so far.
fn pass_portal_packets(pins: &PinBase) -> u64 {
    let out = std::process::Command::new(tollgate_bin())
        .args(["dataplane", "show", "--pin-base"])
        .arg(pins.path())
        .output()
        .expect("tollgate dataplane show");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["verdicts"]["pass_portal"]["packets"]
        .as_u64()
        .expect("pass_portal count")
}

#[test]
fn unpaid_http_is_redirected_to_the_portal_and_paid_http_reaches_the_internet() {
    let lab = Lab3::new("ptl");
    let pins = PinBase::new("ptl");
    let tmp = tempfile::tempdir().unwrap();
    let (config_dir, state_dir) = (tmp.path().join("etc"), tmp.path().join("state"));
    serve_web(&lab.upstream);
    let rt = ns_runtime(&lab.gateway);
    let mint = Arc::new(in_ns(&lab.gateway, &rt, || TestMint::start(0)));
    write_config(&config_dir, "bytes", 1_000, &[(&mint.url(), 1)]);
    let mut daemon = Daemon::start(&lab, &config_dir, &state_dir, &pins);
    let log = || std::fs::read_to_string(state_dir.join("daemon.log")).unwrap_or_default();

    let table = nft_table(&lab).unwrap_or_else(|| panic!("nft table installed; log: {}", log()));
    assert!(
        table.contains("iifname \"lan0\"") && table.contains("redirect to :2121"),
        "{table}"
    );
    assert_eq!(
        lab.gateway
            .sh("cat /proc/sys/net/ipv4/tcp_fwmark_accept")
            .trim(),
        "1"
    );

    // Unpaid: the gateway answers for the internet with a redirect to its portal.
    let web = SocketAddr::from((UPSTREAM_IP, 80));
    let portal = "http://10.77.0.1:2121/portal";
    for path in ["/some/page?x=1", "/generate_204", "/hotspot-detect.html"] {
        let r = get(&lab.client, web, "example.com", path)
            .unwrap_or_else(|e| panic!("{path}: {e}; log: {}", log()));
        assert!(!r.from_upstream(), "{path} must not reach upstream: {r:?}");
        assert_eq!(r.status, 302, "{path}: {r:?}");
        assert_eq!(r.header("location"), Some(portal), "{path}");
    }
    // The portal page is where the redirect points.
    let page = get(
        &lab.client,
        SocketAddr::from((GW_LAN_IP, 2121)),
        "10.77.0.1:2121",
        "/portal",
    )
    .expect("portal page");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("id=\"token\""), "{}", page.body);
    assert!(page.header("content-security-policy").is_some());
    // The API on 2121 is untouched: GET / is still the advertisement.
    let (st, body) = http(&lab.client, "GET", "/", None);
    assert_eq!((st, json_body(&body)["kind"].as_u64()), (200, Some(10021)));

    // Pay.
    let token = {
        let m = mint.clone();
        in_ns(
            &lab.gateway,
            &rt,
            move || async move { m.mint_token(100).await },
        )
    };
    let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &token)));
    assert_eq!(st, 200, "paid: {body}");

    // Paid: no mark, no redirect; the probe succeeds against the real server.
    let r = get(&lab.client, web, "example.com", "/some/page?x=1").expect("page after paying");
    assert!(r.from_upstream(), "reaches upstream once paid: {r:?}");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "upstream page /some/page?x=1\n");
    let r = get(
        &lab.client,
        web,
        "connectivitycheck.gstatic.com",
        "/generate_204",
    )
    .expect("probe after paying");
    assert!(r.from_upstream(), "{r:?}");
    assert_eq!(r.status, 204);

    daemon.stop();
    assert!(
        nft_table(&lab).is_none(),
        "the nft table is removed at shutdown; log: {}",
        log()
    );
    // And a restart puts it back (replacing nothing stale, since there is none).
    let mut daemon = Daemon::start(&lab, &config_dir, &state_dir, &pins);
    assert!(nft_table(&lab).is_some(), "reinstalled on start");
    daemon.stop();
    assert!(nft_table(&lab).is_none());
}

#[test]
fn a_stale_table_is_replaced_and_the_switch_turns_the_redirect_off() {
    let lab = Lab3::new("pts");
    let pins = PinBase::new("pts");
    let tmp = tempfile::tempdir().unwrap();
    let (config_dir, state_dir) = (tmp.path().join("etc"), tmp.path().join("state"));
    serve_web(&lab.upstream);
    // A crashed run's leftover, pointing at the wrong port.
    lab.gateway.sh(&format!(
        "printf 'table inet {TABLE} {{\\n chain portal_redirect {{\\n type nat hook prerouting \
         priority dstnat; policy accept;\\n iifname \"lan0\" tcp dport 80 redirect to :9\\n }}\\n}}\\n' \
         | nft -f -"
    ));
    write_config(&config_dir, "bytes", 1_000, &[("http://127.0.0.1:9", 1)]);
    let mut daemon = Daemon::start(&lab, &config_dir, &state_dir, &pins);
    let table = nft_table(&lab).expect("table");
    assert!(
        table.contains("redirect to :2121") && !table.contains(":9"),
        "{table}"
    );
    let web = SocketAddr::from((UPSTREAM_IP, 80));
    let r = get(&lab.client, web, "example.com", "/").expect("redirected");
    assert_eq!(r.status, 302);
    let portal_packets = pass_portal_packets(&pins);
    assert!(portal_packets > 0);
    daemon.stop();
    // Stopped: no redirect, and the kernel no longer lets unpaid TCP/80 through (it would be
    // forwarded to the WAN with nothing to answer it on the gateway).
    assert!(get(&lab.client, web, "example.com", "/").is_err());
    assert_eq!(
        pass_portal_packets(&pins),
        portal_packets,
        "no unpaid TCP/80 passes while the daemon is down"
    );

    // A separate portal port: the daemon serves the portal there too and redirects to it.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(config_dir.join("config.json")).unwrap())
            .unwrap();
    cfg["dataplane"] = serde_json::json!({"portal_port": 2180});
    std::fs::write(config_dir.join("config.json"), cfg.to_string()).unwrap();
    let mut daemon = Daemon::start(&lab, &config_dir, &state_dir, &pins);
    assert!(nft_table(&lab)
        .expect("table")
        .contains("redirect to :2180"));
    let r = get(&lab.client, web, "example.com", "/generate_204").expect("redirected");
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("http://10.77.0.1:2180/portal"));
    let page = get(
        &lab.client,
        SocketAddr::from((GW_LAN_IP, 2180)),
        "10.77.0.1:2180",
        "/portal",
    )
    .expect("portal on its own port, open to the unpaid client");
    assert_eq!(page.status, 200);
    daemon.stop();

    // Switched off: no table (the stale one removed), unpaid HTTP goes nowhere.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(config_dir.join("config.json")).unwrap())
            .unwrap();
    cfg["dataplane"] = serde_json::json!({"portal_redirect": false});
    std::fs::write(config_dir.join("config.json"), cfg.to_string()).unwrap();
    lab.gateway.sh(&format!(
        "printf 'table inet {TABLE} {{\\n}}\\n' | nft -f -"
    ));
    let mut daemon = Daemon::start(&lab, &config_dir, &state_dir, &pins);
    assert!(nft_table(&lab).is_none(), "redirect off: no table");
    assert!(
        get(&lab.client, web, "example.com", "/").is_err(),
        "redirect off: unpaid HTTP is simply blocked"
    );
    daemon.stop();
}
