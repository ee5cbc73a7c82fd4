//! The data plane on real veth pairs: client → gateway → upstream in three fresh namespaces,
//! real TCP/UDP traffic, real kernel enforcement.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tollgate::valve::{Allowance, ExhaustReason, Gates, MacAddr, Valve, ValveConfig, Verdict};
use tollgate_tests::{
    frames::{send_nonlinear, Frame, L4},
    netns::{download, serve_bulk, Lab3, Netns, CLIENT_IP, GW_LAN_IP, LAN_IFACE, UPSTREAM_IP},
    pins::PinBase,
    tollgate_bin,
};

fn valve_config(pins: &PinBase) -> ValveConfig {
    let mut cfg = ValveConfig::new(LAN_IFACE);
    cfg.pin_base = pins.path().to_path_buf();
    cfg.gateway_v4 = Some(GW_LAN_IP);
    cfg.tcp_ports = vec![2121];
    cfg
}

fn attach(lab: &Lab3, pins: &PinBase) -> Valve {
    let cfg = valve_config(pins);
    lab.gateway
        .run(move || Valve::attach(&cfg))
        .expect("attach the data plane in the gateway namespace")
}

/// Upstream servers: echoes one line per connection (port 5001) and the bulk server.
fn upstream_servers(ns: &Netns) {
    serve_bulk(ns);
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let echo = TcpListener::bind((UPSTREAM_IP, 5001)).unwrap();
        tx.send(()).unwrap();
        for s in echo.incoming().flatten() {
            let mut s = s;
            let mut b = [0u8; 64];
            if let Ok(n) = s.read(&mut b) {
                let _ = s.write_all(&b[..n]);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("upstream servers up");
}

/// Gateway services unpaid clients may use: DNS (UDP 53) and the payment port (TCP 2121).
fn gateway_services(ns: &Netns) {
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let dns = UdpSocket::bind((GW_LAN_IP, 53)).unwrap();
        let api = TcpListener::bind((GW_LAN_IP, 2121)).unwrap();
        tx.send(()).unwrap();
        std::thread::spawn(move || {
            let mut b = [0u8; 512];
            while let Ok((n, from)) = dns.recv_from(&mut b) {
                let _ = dns.send_to(&b[..n], from);
            }
        });
        for s in api.incoming().flatten() {
            let mut s = s;
            let _ = s.write_all(b"tollgate\n");
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("gateway services up");
}

/// One TCP round trip from the client namespace; false if the connection cannot be made.
fn echo(lab: &Lab3) -> bool {
    lab.client.run(|| {
        let addr = SocketAddr::from((UPSTREAM_IP, 5001));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(1500)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        if s.write_all(b"ping").is_err() {
            return false;
        }
        let mut b = [0u8; 4];
        s.read_exact(&mut b).is_ok() && &b == b"ping"
    })
}

/// Downloads from the upstream bulk server in the client namespace.
fn bulk(lab: &Lab3, limit: u64, idle: Duration) -> u64 {
    download(&lab.client, limit, idle)
}

#[test]
fn unpaid_client_reaches_only_the_garden_until_the_gate_opens() {
    let lab = Lab3::new("gard");
    let pins = PinBase::new("netns-garden");
    upstream_servers(&lab.upstream);
    gateway_services(&lab.gateway);
    // Without the data plane the route works (so a failure below is the gate, not the lab).
    assert!(echo(&lab), "lab routing works before attach");
    let valve = attach(&lab, &pins);
    assert!(
        !echo(&lab),
        "unpaid client must not open a TCP connection upstream"
    );
    // DNS and the payment port on the gateway still answer.
    let (dns, api) = lab.client.run(|| {
        let u = UdpSocket::bind((CLIENT_IP, 0)).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        u.send_to(b"query", (GW_LAN_IP, 53)).unwrap();
        let mut b = [0u8; 16];
        let dns = u.recv_from(&mut b).map(|(n, _)| b[..n].to_vec()).ok();
        let mut s = TcpStream::connect_timeout(&(GW_LAN_IP, 2121).into(), Duration::from_secs(2))
            .expect("payment port reachable before paying");
        let mut line = String::new();
        s.read_to_string(&mut line).unwrap();
        (dns, line)
    });
    assert_eq!(
        dns.as_deref(),
        Some(&b"query"[..]),
        "DNS to the gateway answered"
    );
    assert_eq!(api, "tollgate\n");
    // DNS to anywhere else is dropped.
    let leaked = lab.client.run(|| {
        let u = UdpSocket::bind((CLIENT_IP, 0)).unwrap();
        u.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        u.send_to(b"query", (UPSTREAM_IP, 53)).unwrap();
        let mut b = [0u8; 16];
        u.recv_from(&mut b).is_ok()
    });
    assert!(!leaked);
    let mac = MacAddr(lab.client_mac());
    valve.open(mac, Allowance::default()).unwrap();
    assert!(echo(&lab), "paid client gets through");
    let g = valve.gate(mac).unwrap().unwrap();
    assert!(
        g.usage.bytes_up > 0 && g.usage.bytes_down > 0,
        "both directions metered: {g:?}"
    );
    valve.close(mac).unwrap();
    assert!(!echo(&lab), "closed again");
}

#[tokio::test(flavor = "multi_thread")]
async fn quota_stops_a_bulk_transfer_within_one_packet_and_reports_it() {
    let lab = Lab3::new("quota");
    let pins = PinBase::new("netns-quota");
    upstream_servers(&lab.upstream);
    let valve = attach(&lab, &pins);
    let mut events = valve.events().unwrap();
    let mac = MacAddr(lab.client_mac());
    let quota = 3_000_000u64;
    valve
        .open(
            mac,
            Allowance {
                bytes: Some(quota),
                ..Default::default()
            },
        )
        .unwrap();
    // Blocking socket I/O on this worker; the event task runs on the other one.
    let got = tokio::task::block_in_place(|| bulk(&lab, quota * 2, Duration::from_secs(2)));
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("exhaustion event")
        .unwrap();
    assert_eq!(ev.mac, mac);
    assert_eq!(ev.reason, ExhaustReason::Quota);
    let g = valve.gate(mac).unwrap().unwrap();
    let used = g.usage.bytes();
    assert!(
        used <= quota,
        "the kernel never lets usage pass the quota: {used} > {quota}"
    );
    // One packet: a GSO/GRO aggregate on veth is at most 64 KiB of L3 payload plus headers.
    assert!(
        quota - used <= 65_536 + 1_500,
        "the transfer stopped within one packet of the quota (used {used} of {quota})"
    );
    assert!(
        got < quota && got > quota * 9 / 10,
        "client received {got} payload bytes"
    );
    // The gate stays shut: a second transfer gets at most the sliver that was left.
    let more = tokio::task::block_in_place(|| bulk(&lab, quota, Duration::from_secs(1)));
    assert!(
        more <= quota - used,
        "after exhaustion only {} bytes remained, got {more}",
        quota - used
    );
    assert!(valve.gate(mac).unwrap().unwrap().usage.bytes() <= quota);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deadline_closes_the_gate_in_the_kernel() {
    let lab = Lab3::new("dead");
    let pins = PinBase::new("netns-deadline");
    upstream_servers(&lab.upstream);
    let valve = attach(&lab, &pins);
    let mut events = valve.events().unwrap();
    let mac = MacAddr(lab.client_mac());
    let until = valve.now_boot_ns() + 2_000_000_000;
    valve
        .open(
            mac,
            Allowance {
                until_boot_ns: Some(until),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        tokio::task::block_in_place(|| echo(&lab)),
        "open before the deadline"
    );
    while valve.now_boot_ns() < until + 100_000_000 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !tokio::task::block_in_place(|| echo(&lab)),
        "closed after the deadline, with no daemon action"
    );
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.reason, ExhaustReason::Expired);
}

/// `tollgate dataplane attach` in the gateway namespace, killed with SIGKILL on drop.
struct Attached(Child);

impl Attached {
    fn start(lab: &Lab3, pins: &PinBase) -> Self {
        // `--netns` rather than `ip netns exec`: the latter gives the process a private /sys
        // (and so a private bpffs), hiding its pins from everyone else.
        let mut child = Command::new(tollgate_bin())
            .args([
                "dataplane",
                "attach",
                "--iface",
                LAN_IFACE,
                "--gateway-v4",
                "10.77.0.1",
            ])
            .args(["--netns", &lab.gateway.name])
            .arg("--pin-base")
            .arg(pins.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tollgate dataplane attach");
        let mut out = child.stdout.take().unwrap();
        let start = Instant::now();
        let mut buf = Vec::new();
        let mut b = [0u8; 256];
        while !String::from_utf8_lossy(&buf).contains("attached") {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "attach did not report in time"
            );
            let n = out.read(&mut b).expect("read attach output");
            assert!(
                n > 0,
                "attach exited early: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&b[..n]);
        }
        Attached(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.kill();
    }
}

fn cli(pins: &PinBase, args: &[&str]) -> serde_json::Value {
    let out = Command::new(tollgate_bin())
        .args(["dataplane"])
        .args(args)
        .arg("--pin-base")
        .arg(pins.path())
        .output()
        .expect("run tollgate");
    assert!(
        out.status.success(),
        "tollgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn used_bytes(pins: &PinBase, mac: &str) -> u64 {
    let v = cli(pins, &["show"]);
    let g = v["gates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["mac"] == mac)
        .expect("client in the maps");
    g["usage"]["bytes_up"].as_u64().unwrap() + g["usage"]["bytes_down"].as_u64().unwrap()
}

#[test]
fn killing_the_daemon_leaves_enforcement_and_a_restart_keeps_the_counts() {
    let lab = Lab3::new("kill");
    let pins = PinBase::new("netns-kill");
    upstream_servers(&lab.upstream);
    let mac = MacAddr(lab.client_mac()).to_string();
    let mut daemon = Attached::start(&lab, &pins);
    assert!(!echo(&lab), "unpaid before open");
    let quota = 2_000_000u64;
    cli(&pins, &["open", &mac, "--bytes", &quota.to_string()]);
    assert!(echo(&lab));
    let before = used_bytes(&pins, &mac);

    daemon.kill();
    // Still metered and still enforced with no process holding the data plane.
    assert!(
        echo(&lab),
        "paid client keeps its allowance while the daemon is down"
    );
    let during = used_bytes(&pins, &mac);
    assert!(during > before, "counting goes on without the daemon");
    bulk(&lab, quota * 2, Duration::from_secs(2));
    let exhausted = used_bytes(&pins, &mac);
    assert!(
        exhausted <= quota,
        "quota enforced without the daemon ({exhausted} > {quota})"
    );
    assert!(
        quota - exhausted <= 65_536 + 1_500,
        "stopped within one packet of the quota"
    );

    // A restart re-uses the pins: same counts, no reset, no gap.
    let _daemon = Attached::start(&lab, &pins);
    assert_eq!(
        used_bytes(&pins, &mac),
        exhausted,
        "restart keeps the counts"
    );
    let more = bulk(&lab, quota, Duration::from_secs(1));
    assert!(
        more <= quota - exhausted,
        "restart does not reopen an exhausted gate"
    );
    cli(&pins, &["extend", &mac, "--bytes", "1000000"]);
    assert!(echo(&lab), "top-up after restart opens the gate");
    // Another, unpaid client stays blocked across all of this.
    let v = cli(&pins, &["show"]);
    assert!(v["verdicts"]["drop_unpaid"]["packets"].as_u64().unwrap() > 0);
}

/// Issue 13: a non-linear skb (only the Ethernet header linear, every other header in page
/// fragments, sent through AF_PACKET with a virtio-net header) gets the verdict and the
/// metering of its linear twin: the gate reads only the linear area and pulls the headers in
/// when it ends inside them (without that fallback the frame would be dropped as malformed).
#[test]
fn non_linear_skbs_are_parsed_and_metered() {
    let lab = Lab3::new("nonlin");
    let pins = PinBase::new("nonlin");
    for (ns, dev) in [(&lab.client, "eth0"), (&lab.gateway, LAN_IFACE)] {
        ns.ip(&["link", "set", dev, "mtu", "9000"]);
    }
    let valve = attach(&lab, &pins);
    let mac = lab.client_mac();
    let gw_mac = lab.gateway.mac(LAN_IFACE);
    valve
        .open(
            MacAddr(mac),
            Allowance {
                bytes: Some(1_000_000),
                ..Default::default()
            },
        )
        .unwrap();
    let udp = L4::Udp {
        sport: 4000,
        dport: 9,
    };
    // 6000 L3 bytes: more than a page, so AF_PACKET leaves only 14 bytes linear.
    let paid = Frame::new(mac, gw_mac).ipv4(CLIENT_IP, UPSTREAM_IP, udp.clone(), 6000 - 28);
    let stranger = [0x02, 0, 0, 0, 0, 0x77];
    let unpaid = Frame::new(stranger, gw_mac).ipv4(CLIENT_IP, UPSTREAM_IP, udp, 6000 - 28);
    let send = |f: Vec<u8>| {
        lab.client
            .run(move || send_nonlinear("eth0", &f))
            .expect("AF_PACKET send")
    };
    let v0 = valve.verdicts().unwrap();
    let u0 = valve.gate(MacAddr(mac)).unwrap().unwrap().usage;
    for _ in 0..3 {
        send(paid.clone());
        send(unpaid.clone());
    }
    // The frames cross the veth synchronously, but give the softirq a moment.
    let t = Instant::now();
    let mut v1 = valve.verdicts().unwrap();
    while t.elapsed() < Duration::from_secs(3)
        && v1.packets(Verdict::PassPaid) + v1.packets(Verdict::DropUnpaid)
            < v0.packets(Verdict::PassPaid) + v0.packets(Verdict::DropUnpaid) + 6
    {
        std::thread::sleep(Duration::from_millis(20));
        v1 = valve.verdicts().unwrap();
    }
    let u1 = valve.gate(MacAddr(mac)).unwrap().unwrap().usage;
    let d = |v: Verdict| v1.packets(v) - v0.packets(v);
    println!(
        "non-linear: pass_paid +{}, drop_unpaid +{}, drop_malformed +{}, metered +{} B",
        d(Verdict::PassPaid),
        d(Verdict::DropUnpaid),
        d(Verdict::DropMalformed),
        u1.bytes_up - u0.bytes_up
    );
    assert_eq!(d(Verdict::DropMalformed), 0, "nothing taken for malformed");
    assert_eq!(d(Verdict::PassPaid), 3, "the paid frames pass");
    assert_eq!(d(Verdict::DropUnpaid), 3, "the unpaid frames are dropped");
    assert_eq!(
        u1.bytes_up - u0.bytes_up,
        3 * 6000,
        "metered as the wire carries them"
    );
}
