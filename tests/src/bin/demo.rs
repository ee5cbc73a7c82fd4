//! `cargo xtask demo`: the whole thing, end to end, narrated.
//!
//! ```text
//!  lab:  client ── lan0 [gateway: tollgate run + data plane + mint on loopback] wan0 ── upstream
//!  1. the customer reads the advertisement            GET  /
//!  2. unpaid: nothing gets through                    (kernel: walled garden)
//!  3. pays a real token                               POST / → kind 1022, allotment
//!  4. downloads in steps; kernel counters rise        (pinned maps, read like `bpftool`)
//!  5. the kernel closes the gate at the quota         GET  /usage → -1/-1
//!  6. tops up; traffic flows again
//!  7. summary: paid, allotted, delivered, kernel's count vs the client's own count
//! ```
//!
//! Everything it creates (namespaces, pins, the daemon, temp dirs) is removed when it ends.
//! If it is interrupted, `cargo xtask demo` sweeps what is left (names carry this pid).

use std::{sync::Arc, time::Duration};

use tollgate::valve::{GateState, Gates, MacAddr, Valve};
use tollgate_tests::{
    gateway::{http, in_ns, json_body, ns_runtime, tag, write_config, Daemon},
    mint::TestMint,
    netns::{download, serve_bulk, Lab3},
    pins::PinBase,
};

const STEP: u64 = 1_000; // bytes per step
const PRICE: u64 = 1; // sat per step

fn say(msg: impl AsRef<str>) {
    println!("  {}", msg.as_ref());
}

fn section(title: &str) {
    println!("\n== {title}");
}

fn kernel(valve: &Valve, mac: MacAddr) -> Option<GateState> {
    valve.gate(mac).ok().flatten()
}

fn kernel_line(g: &Option<GateState>) -> String {
    match g {
        Some(g) => format!(
            "kernel: up {} B / {} pkts, down {} B / {} pkts, gate {}{}",
            g.usage.bytes_up,
            g.usage.packets_up,
            g.usage.bytes_down,
            g.usage.packets_down,
            if g.open { "open" } else { "closed" },
            g.remaining_bytes
                .map(|r| format!(", {r} B left"))
                .unwrap_or_default()
        ),
        None => "kernel: no entry for this client yet".into(),
    }
}

fn usage(lab: &Lab3) -> String {
    http(&lab.client, "GET", "/usage", None)
        .1
        .trim()
        .to_string()
}

fn main() {
    println!("tollgate demo (pid {})", std::process::id());
    section("lab");
    let lab = Lab3::new("demo");
    let pins = PinBase::new("demo");
    let tmp = tempfile::Builder::new()
        .prefix(&format!("tollgate-demo-{}-", std::process::id()))
        .tempdir()
        .expect("temp dir");
    let (config_dir, state_dir) = (tmp.path().join("etc"), tmp.path().join("state"));
    say(format!(
        "namespaces: client {} ── gateway {} ── upstream {}",
        lab.client.name, lab.gateway.name, lab.upstream.name
    ));
    serve_bulk(&lab.upstream);
    let rt = ns_runtime(&lab.gateway);
    let mint = Arc::new(in_ns(&lab.gateway, &rt, || TestMint::start(0)));
    let token = |amount: u64| {
        let m = mint.clone();
        in_ns(&lab.gateway, &rt, move || async move {
            m.mint_token(amount).await
        })
    };
    say(format!(
        "Cashu mint (cdk, fake Lightning) at {}",
        mint.url()
    ));
    write_config(&config_dir, "bytes", STEP, &[(&mint.url(), PRICE)]);
    let mut daemon = Daemon::start(&lab, &config_dir, &state_dir, &pins);
    say(format!(
        "tollgate run on lan0, API on 10.77.0.1:2121, state in {}",
        state_dir.display()
    ));
    let valve = Valve::open_pinned(pins.path()).expect("the daemon's pinned maps");
    let mac = MacAddr(lab.client_mac());
    say(format!("the customer's device: {mac}"));

    section("1. the advertisement (kind 10021, signed)");
    let (_, body) = http(&lab.client, "GET", "/", None);
    let ad = json_body(&body);
    say(format!(
        "merchant {}…, metric {}, step {} bytes",
        &ad["pubkey"].as_str().unwrap_or("?")[..16],
        tag(&ad, "metric").unwrap_or("?"),
        tag(&ad, "step_size").unwrap_or("?")
    ));
    for t in ad["tags"].as_array().into_iter().flatten() {
        if t[0] == "price_per_step" {
            say(format!("price: {} {} per step at {}", t[2], t[3], t[4]));
        }
    }

    section("2. unpaid");
    let got = download(&lab.client, 10_000, Duration::from_secs(1));
    say(format!(
        "download attempt: {got} bytes; /usage {}",
        usage(&lab)
    ));

    section("3. pay 100 sat");
    let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &token(100))));
    let session = json_body(&body);
    let allotment: u64 = tag(&session, "allotment")
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    say(format!(
        "HTTP {st}, kind {} session: allotment {allotment} bytes",
        session["kind"]
    ));

    section("4. traffic, metered in the kernel");
    let mut delivered = 0u64;
    for _ in 0..4 {
        delivered += download(&lab.client, 20_000, Duration::from_secs(2));
        say(format!(
            "client received {delivered} B; /usage {}",
            usage(&lab)
        ));
        say(kernel_line(&kernel(&valve, mac)));
    }

    section("5. the quota runs out");
    delivered += download(&lab.client, allotment, Duration::from_secs(2));
    for _ in 0..50 {
        if usage(&lab) == "-1/-1" {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    say(format!(
        "client received {delivered} B in all; /usage {}",
        usage(&lab)
    ));
    let at_quota = kernel(&valve, mac);
    say(kernel_line(&at_quota));
    let more = download(&lab.client, 10_000, Duration::from_secs(1));
    say(format!("another download attempt: {more} bytes"));

    section("6. top up 50 sat");
    let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &token(50))));
    let topped: u64 = tag(&json_body(&body), "allotment")
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    say(format!("HTTP {st}: allotment now {topped} bytes"));
    let after = download(&lab.client, 20_000, Duration::from_secs(2));
    delivered += after;
    say(format!("download: {after} bytes; /usage {}", usage(&lab)));
    let end = kernel(&valve, mac);

    section("summary");
    let k = end.as_ref().map(|g| g.usage).unwrap_or_default();
    let kq = at_quota.as_ref().map(|g| g.usage).unwrap_or_default();
    println!("  {:<44}{:>14}", "paid", "150 sat");
    println!(
        "  {:<44}{:>14}",
        "allotted (L3 bytes: session 1 + session 2)",
        allotment + topped
    );
    println!(
        "  {:<44}{:>14}",
        "kernel counted at the quota (up + down)",
        kq.bytes()
    );
    println!(
        "  {:<44}{:>14}",
        "kernel counted in all (up + down)",
        k.bytes()
    );
    println!(
        "  {:<44}{:>14}",
        "client's own count (TCP payload received)", delivered
    );
    println!(
        "  {:<44}{:>14}",
        "kernel − client (IP/TCP headers, ACKs)",
        k.bytes() as i64 - delivered as i64
    );
    println!(
        "  {:<44}{:>14}",
        "first session: kernel count − allotment",
        kq.bytes() as i64 - allotment as i64
    );

    daemon.stop();
    drop(valve);
    println!("\ncleaning up: daemon stopped, namespaces, pins and temp files removed");
}
