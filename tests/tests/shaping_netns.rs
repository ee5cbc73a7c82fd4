//! Per-client rate limits (issue 15) with real traffic: clients on a bridged LAN
//! (`LabLan`), the data plane on `br-lan`, iperf3 between the clients and the upstream.
//!
//! The LAN is prepared exactly as the daemon does (`shaping::Lan::prepare`): `fq` as the root
//! qdisc and EDT departure times where the kernel has `sch_fq`, else (as on the CI kernel,
//! which lacks it) download policing in the data plane. Each test says which it ran.
//!
//! Why ±10 % is a sound tolerance here: the limit is on L3 bytes, iperf3 reports TCP payload,
//! so the expected goodput is the rate × 1448/1500 (MSS over IP packet with timestamps); the
//! 128 KiB bucket is spent in the omitted first seconds (`-O 2`); the rates (≤ 6 Mbit/s) are
//! a few percent of what one core forwards on veth even while the other engineers' builds
//! load the machine, so CPU starvation cannot hold a flow below its cap, and a token bucket
//! cannot let more than rate × time + burst through (the burst is over 20 % of a 2 Mbit/s
//! second, hence the omitted seconds).

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tollgate::{
    shaping::{DownMode, Lan},
    valve::{Allowance, Gates, MacAddr, Rates, Valve, ValveConfig, Verdict},
};
use tollgate_tests::{
    netns::{download, serve_bulk, Lab3, LabLan, Netns, BR_LAN, GW_LAN_IP, LAN_IFACE, UPSTREAM_IP},
    pins::PinBase,
};

/// Payload share of a full-size TCP/IPv4 segment with timestamps (what iperf3 counts of the
/// L3 bytes the data plane limits).
const GOODPUT: f64 = 1448.0 / 1500.0;

/// Child processes killed (and reaped) on drop, so a failing test leaves no iperf3 behind
/// (a process would keep its namespace alive after `ip netns del`).
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One-off iperf3 server in `ns` on `port`.
fn iperf_server(ns: &Netns, port: u16, procs: &mut Procs) {
    let c = ns
        .command("iperf3")
        .args([
            "-s",
            "-1",
            "-p",
            &port.to_string(),
            "-B",
            &UPSTREAM_IP.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server (apt install iperf3)");
    procs.0.push(c);
}

/// Waits until every server listens (iperf3 has no readiness signal).
fn wait_listening(ns: &Netns, ports: &[u16]) {
    let t0 = Instant::now();
    loop {
        let out = ns.sh("ss -ltnH");
        if ports.iter().all(|p| out.contains(&format!(":{p} "))) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "iperf3 servers up: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An iperf3 client run in `ns` (JSON output on stdout): `-R` = download.
fn iperf_client(ns: &Netns, port: u16, secs: u32, download: bool, extra: &[&str]) -> Command {
    let mut c = ns.command("iperf3");
    c.args([
        "-c",
        &UPSTREAM_IP.to_string(),
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
        "-J",
    ]);
    if download {
        c.arg("-R");
    }
    c.args(extra);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn finish(c: Child) -> serde_json::Value {
    let out = c.wait_with_output().expect("iperf3 client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "iperf3 failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text).expect("iperf3 JSON")
}

/// Bits per second the receiving side counted over the measured (non-omitted) seconds.
fn received_bps(v: &serde_json::Value) -> f64 {
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("sum_received")
}

fn within(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= want * tol
}

/// Attaches the data plane to the gateway's `iface` after preparing it as the daemon does.
fn attach(gw: &Netns, iface: &'static str, pins: &PinBase) -> (Valve, DownMode) {
    let mut cfg = ValveConfig::new(iface);
    cfg.pin_base = pins.path().to_path_buf();
    cfg.gateway_v4 = Some(GW_LAN_IP);
    gw.run(move || {
        let lan = Lan::prepare(iface, false).expect("prepare the LAN for shaping");
        let mode = lan.mode();
        cfg.edt_down = mode == DownMode::Edt;
        eprintln!("shaping downloads with {mode:?} (Police: this kernel has no sch_fq)");
        (Valve::attach(&cfg).expect("attach"), mode)
    })
}

/// 1. A client capped at 5 Mbit/s down and 2 Mbit/s up gets each within ±10 % over 8 s
///    (after 2 omitted), while an uncapped client on the same LAN gets its 40 Mbit/s at the
///    same time; the kernel's rate drops show the caps were what held the first client.
///    (Old code: no rates; the first client got hundreds of Mbit/s.)
#[test]
fn a_capped_client_gets_its_rates_and_an_uncapped_one_the_rest() {
    let lab = LabLan::new("shcap", 2);
    let pins = PinBase::new("netns-shcap");
    let (valve, _mode) = attach(&lab.gateway, BR_LAN, &pins);
    let (a, b) = (MacAddr(lab.client_mac(0)), MacAddr(lab.client_mac(1)));
    let caps = Rates {
        down_kbit: 5_000,
        up_kbit: 2_000,
    };
    let st = valve
        .open(
            a,
            Allowance {
                rates: Some(caps),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(st.rates, caps);
    valve.open(b, Allowance::default()).unwrap();
    let mut procs = Procs(Vec::new());
    for p in [5301, 5302, 5303] {
        iperf_server(&lab.upstream, p, &mut procs);
    }
    wait_listening(&lab.upstream, &[5301, 5302, 5303]);
    let before = valve.verdicts().unwrap();
    let a_down = iperf_client(&lab.clients[0], 5301, 8, true, &["-O", "2"])
        .spawn()
        .unwrap();
    let a_up = iperf_client(&lab.clients[0], 5302, 8, false, &["-O", "2"])
        .spawn()
        .unwrap();
    let b_down = iperf_client(&lab.clients[1], 5303, 8, true, &["-O", "2", "-b", "40M"])
        .spawn()
        .unwrap();
    let (a_down, a_up, b_down) = (finish(a_down), finish(a_up), finish(b_down));
    let after = valve.verdicts().unwrap();
    let (ad, au, bd) = (
        received_bps(&a_down),
        received_bps(&a_up),
        received_bps(&b_down),
    );
    eprintln!(
        "capped down {:.2} Mbit/s, capped up {:.2} Mbit/s, uncapped down {:.2} Mbit/s",
        ad / 1e6,
        au / 1e6,
        bd / 1e6
    );
    let want_down = 5e6 * GOODPUT;
    let want_up = 2e6 * GOODPUT;
    assert!(
        within(ad, want_down, 0.10),
        "capped download {ad:.0} bit/s, want {want_down:.0} ± 10 %"
    );
    assert!(
        within(au, want_up, 0.10),
        "capped upload {au:.0} bit/s, want {want_up:.0} ± 10 %"
    );
    assert!(
        bd >= 40e6 * 0.9,
        "the uncapped client gets the rest: {bd:.0} bit/s of 40 Mbit/s"
    );
    let drops = |v| after.packets(v) - before.packets(v);
    assert!(
        drops(Verdict::DropRateUp) > 0,
        "the upload was held by the bucket"
    );
    eprintln!(
        "rate drops: down {} up {}",
        drops(Verdict::DropRateDown),
        drops(Verdict::DropRateUp)
    );
    // The uncapped client was never rate-dropped: every rate drop is the capped client's,
    // and its counters only hold what passed (checked exactly in shaping_testrun).
    let g = valve.gate(b).unwrap().unwrap();
    assert_eq!(g.rates, Rates::UNLIMITED);
}

/// The per-second receive rates (iperf3 interval reports).
fn intervals(v: &serde_json::Value) -> Vec<f64> {
    v["intervals"]
        .as_array()
        .expect("intervals")
        .iter()
        .map(|i| i["sum"]["bits_per_second"].as_f64().unwrap())
        .collect()
}

/// 2. Raising the rate mid-transfer (a tier bought mid-download: `set_rate`) raises the
///    measured rate on the same connection without a gap: every second before the raise is
///    near 2 Mbit/s, every second after the change settles near 4 Mbit/s, none near zero.
///    (Old code: no `set_rate`; re-opening the gate was the only way to change a policy.)
#[test]
fn raising_the_rate_mid_transfer_raises_it_without_a_gap() {
    let lab = LabLan::new("shraise", 1);
    let pins = PinBase::new("netns-shraise");
    let (valve, _mode) = attach(&lab.gateway, BR_LAN, &pins);
    let a = MacAddr(lab.client_mac(0));
    valve
        .open(
            a,
            Allowance {
                bytes: Some(1 << 40),
                rates: Some(Rates {
                    down_kbit: 2_000,
                    up_kbit: 0,
                }),
                ..Default::default()
            },
        )
        .unwrap();
    let mut procs = Procs(Vec::new());
    iperf_server(&lab.upstream, 5311, &mut procs);
    wait_listening(&lab.upstream, &[5311]);
    let c = iperf_client(&lab.clients[0], 5311, 12, true, &["-i", "1"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(5_500));
    let before = valve.gate(a).unwrap().unwrap();
    let st = valve
        .set_rate(
            a,
            Rates {
                down_kbit: 4_000,
                up_kbit: 0,
            },
        )
        .unwrap();
    assert_eq!(
        st.generation, before.generation,
        "the gate itself is unchanged"
    );
    let v = finish(c);
    let iv = intervals(&v);
    eprintln!(
        "per-second Mbit/s: {:?}",
        iv.iter()
            .map(|x| (x / 1e5).round() / 10.0)
            .collect::<Vec<_>>()
    );
    assert!(iv.len() >= 12, "12 intervals");
    let mean = |r: std::ops::RangeInclusive<usize>| {
        let n = r.clone().count() as f64;
        iv[r].iter().sum::<f64>() / n
    };
    let (slow, fast) = (mean(1..=4), mean(8..=11));
    assert!(
        within(slow, 2e6 * GOODPUT, 0.15),
        "before the raise {slow:.0} bit/s, want 2 Mbit/s goodput ± 15 %"
    );
    assert!(
        within(fast, 4e6 * GOODPUT, 0.15),
        "after the raise {fast:.0} bit/s, want 4 Mbit/s goodput ± 15 %"
    );
    let low = iv[1..].iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        low > 2e6 * GOODPUT * 0.5,
        "no gap: the slowest second carried {low:.0} bit/s"
    );
}

/// 3. Metering and quotas stay exact while shaped: a capped client downloading past its
///    allowance is cut within one packet of it, the kernel's count never passes it, and what
///    the bucket dropped was not charged (the client received most of what it paid for).
///    (Old code: no rates; this checks the shaped path keeps the quota arithmetic.)
#[test]
fn a_shaped_client_is_metered_exactly_to_its_quota() {
    let lab = Lab3::new("shquota");
    let pins = PinBase::new("netns-shquota");
    serve_bulk(&lab.upstream);
    let (valve, _mode) = attach(&lab.gateway, LAN_IFACE, &pins);
    let mac = MacAddr(lab.client_mac());
    let quota = 1_500_000u64;
    valve
        .open(
            mac,
            Allowance {
                bytes: Some(quota),
                rates: Some(Rates {
                    down_kbit: 5_000,
                    up_kbit: 5_000,
                }),
                ..Default::default()
            },
        )
        .unwrap();
    let before = valve.verdicts().unwrap();
    let got = download(&lab.client, quota * 2, Duration::from_secs(2));
    let after = valve.verdicts().unwrap();
    let used = valve.gate(mac).unwrap().unwrap().usage.bytes();
    assert!(used <= quota, "usage {used} never passes the quota {quota}");
    assert!(
        quota - used <= 65_536 + 1_500,
        "cut within one packet of the quota (used {used} of {quota})"
    );
    assert!(
        got < quota && got > quota * 8 / 10,
        "the client received {got} payload bytes of {quota} L3 bytes paid"
    );
    eprintln!(
        "rate drops while metering: {}",
        after.packets(Verdict::DropRateDown) - before.packets(Verdict::DropRateDown)
    );
    // The packets the rate dropped were not charged: the count of passed L3 bytes is what
    // was metered (both directions of this client only).
    let passed = after.bytes(Verdict::PassPaid) - before.bytes(Verdict::PassPaid);
    assert_eq!(
        passed, used,
        "metered = passed; rate drops are never charged"
    );
}

/// 4. Fair shares on one shared bottleneck: the uplink (a 16 Mbit/s `tbf` on the upstream's
///    side of the WAN, what a café's DSL line is) carries two paid clients' downloads at once,
///    one with 8 parallel connections (a bulk downloader), one with a single connection (a
///    video call). First without caps — printed, not asserted: plain TCP shares per
///    connection, so the 8-connection client takes most of the line — then, in the same lab,
///    with each client capped at half the line (`set_rate`, as a tier or the default rate
///    would): the single-connection client now gets close to its half while the other pushes.
///    (Old code: no rates; the second arm is the first, and the light client gets ≈ 1/9.)
#[test]
fn per_client_caps_share_a_full_uplink_fairly() {
    let lab = LabLan::new("shfair", 2);
    let pins = PinBase::new("netns-shfair");
    let (valve, _mode) = attach(&lab.gateway, BR_LAN, &pins);
    let (heavy, light) = (MacAddr(lab.client_mac(0)), MacAddr(lab.client_mac(1)));
    valve.open(heavy, Allowance::default()).unwrap();
    valve.open(light, Allowance::default()).unwrap();
    const LINE_KBIT: u64 = 16_000;
    lab.upstream.sh(&format!(
        "tc qdisc add dev eth0 root tbf rate {LINE_KBIT}kbit burst 32kb latency 100ms"
    ));
    let mut procs = Procs(Vec::new());
    let ports = [5321, 5322, 5323, 5324];
    for p in ports {
        // `-1` serves one test: two per client, one per arm.
        iperf_server(&lab.upstream, p, &mut procs);
    }
    wait_listening(&lab.upstream, &ports);
    let run = |heavy_port: u16, light_port: u16| {
        let h = iperf_client(
            &lab.clients[0],
            heavy_port,
            8,
            true,
            &["-O", "2", "-P", "8"],
        )
        .spawn()
        .unwrap();
        let l = iperf_client(&lab.clients[1], light_port, 8, true, &["-O", "2"])
            .spawn()
            .unwrap();
        (received_bps(&finish(h)), received_bps(&finish(l)))
    };
    let (h0, l0) = run(5321, 5322);
    let half = Rates {
        down_kbit: LINE_KBIT / 2,
        up_kbit: 0,
    };
    valve.set_rate(heavy, half).unwrap();
    valve.set_rate(light, half).unwrap();
    let (h1, l1) = run(5323, 5324);
    let line = LINE_KBIT as f64 * 1e3 * GOODPUT;
    eprintln!(
        "line {:.2} Mbit/s goodput; uncapped: heavy {:.2}, light {:.2}; capped at half: \
         heavy {:.2}, light {:.2} Mbit/s",
        line / 1e6,
        h0 / 1e6,
        l0 / 1e6,
        h1 / 1e6,
        l1 / 1e6
    );
    // The cap bounds the heavy client from above (a token bucket: rate × time + burst) ...
    assert!(
        h1 <= line / 2.0 * 1.10,
        "the heavy client stays within its half: {h1:.0} bit/s"
    );
    // ... and so leaves the light one well over a third of the line where it had a tenth
    // (≈ 1.5 of 15.5 Mbit/s here) without caps. Its fair half is 50 %: the heavy client's
    // bursts still queue at the line before its cap drops them (6.4 Mbit/s measured).
    assert!(
        l1 >= line * 0.35,
        "the light client gets its share: {l1:.0} bit/s of {line:.0}"
    );
}
