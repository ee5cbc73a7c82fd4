//! The kernel programs driven with crafted frames through `BPF_PROG_TEST_RUN`.
//!
//! Each test loads the real eBPF object through the valve into its own pin directory, writes
//! the gateway configuration, and checks the verdict of every packet class, the counters and
//! the exhaustion events. Requires root (CI is root).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use tollgate::valve::{
    Allowance, ExhaustReason, Gates, Hook, MacAddr, Valve, ValveConfig, Verdict,
};
use tollgate_tests::{
    frames::{l3_len, Frame, BROADCAST, L4},
    pins::PinBase,
};

const CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GW4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CL4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const NET4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const MINT4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);

fn gw6() -> Ipv6Addr {
    "fd00::1".parse().unwrap()
}
fn cl6() -> Ipv6Addr {
    "fd00::2".parse().unwrap()
}
fn net6() -> Ipv6Addr {
    "2001:db8::7".parse().unwrap()
}

struct Lab {
    valve: Valve,
    _pins: PinBase,
}

fn lab(tag: &str) -> Lab {
    let pins = PinBase::new(tag);
    let mut cfg = ValveConfig::new("lo");
    cfg.pin_base = pins.path().to_path_buf();
    cfg.gateway_v4 = Some(GW4);
    cfg.gateway_v6 = vec![gw6(), "fe80::1".parse().unwrap()];
    cfg.tcp_ports = vec![2121, 8080];
    cfg.garden = vec![
        "203.0.113.0/24".parse().unwrap(),
        "2001:db8:ffff::/48".parse().unwrap(),
    ];
    cfg.portal_mark = Some(0x7467);
    let valve = Valve::load(&cfg).expect("load the eBPF object (root and BPF required)");
    Lab { valve, _pins: pins }
}

fn up() -> Frame {
    Frame::new(CLIENT, GW_MAC)
}
fn down() -> Frame {
    Frame::new(GW_MAC, CLIENT)
}

impl Lab {
    fn pass(&self, hook: Hook, frame: &[u8]) -> bool {
        self.valve
            .test_run(hook, frame, 1)
            .expect("BPF_PROG_TEST_RUN")
            .passed(hook)
    }
    fn verdict_delta(&self, hook: Hook, frame: &[u8]) -> (bool, Verdict) {
        let before = self.valve.verdicts().unwrap();
        let passed = self.pass(hook, frame);
        let after = self.valve.verdicts().unwrap();
        let changed: Vec<Verdict> = tollgate_common::Verdict::ALL
            .into_iter()
            .filter(|v| after.packets(*v) != before.packets(*v))
            .collect();
        assert_eq!(
            changed.len(),
            1,
            "exactly one verdict counter moves per packet: {changed:?}"
        );
        (passed, changed[0])
    }
    fn expect(&self, hook: Hook, frame: &[u8], want: Verdict) {
        let (passed, got) = self.verdict_delta(hook, frame);
        assert_eq!(got, want, "verdict");
        assert_eq!(passed, want.is_pass(), "pass/drop must follow the verdict");
    }
}

#[test]
fn unpaid_client_only_reaches_the_walled_garden() {
    let l = lab("garden");
    use Hook::TcIngress as I;
    use Verdict::*;
    // Link layer.
    l.expect(I, &up().arp(), PassLink);
    l.expect(I, &Frame::new(CLIENT, BROADCAST).arp(), PassMulticast);
    // DHCP: broadcast discover, unicast renew to the gateway; port 67 elsewhere is no tunnel.
    let dhcp = L4::Udp {
        sport: 68,
        dport: 67,
    };
    l.expect(
        I,
        &Frame::new(CLIENT, BROADCAST).ipv4(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            dhcp.clone(),
            300,
        ),
        PassMulticast,
    );
    l.expect(I, &up().ipv4(CL4, GW4, dhcp.clone(), 300), PassGarden);
    l.expect(
        I,
        &up().ipv4(CL4, Ipv4Addr::BROADCAST, dhcp.clone(), 300),
        PassGarden,
    );
    l.expect(I, &up().ipv4(CL4, NET4, dhcp, 300), DropUnpaid);
    // DNS to the gateway only.
    l.expect(
        I,
        &up().ipv4(
            CL4,
            GW4,
            L4::Udp {
                sport: 5353,
                dport: 53,
            },
            40,
        ),
        PassGarden,
    );
    l.expect(
        I,
        &up().ipv4(
            CL4,
            GW4,
            L4::Tcp {
                sport: 5353,
                dport: 53,
            },
            40,
        ),
        PassGarden,
    );
    l.expect(
        I,
        &up().ipv4(
            CL4,
            NET4,
            L4::Udp {
                sport: 5353,
                dport: 53,
            },
            40,
        ),
        DropUnpaid,
    );
    // Portal and payment ports on the gateway, nothing else there.
    l.expect(
        I,
        &up().ipv4(
            CL4,
            GW4,
            L4::Tcp {
                sport: 40000,
                dport: 2121,
            },
            0,
        ),
        PassGarden,
    );
    l.expect(
        I,
        &up().ipv4(
            CL4,
            GW4,
            L4::Tcp {
                sport: 40000,
                dport: 8080,
            },
            0,
        ),
        PassGarden,
    );
    l.expect(
        I,
        &up().ipv4(
            CL4,
            GW4,
            L4::Tcp {
                sport: 40000,
                dport: 22,
            },
            0,
        ),
        DropUnpaid,
    );
    l.expect(
        I,
        &up().ipv4(
            CL4,
            NET4,
            L4::Tcp {
                sport: 40000,
                dport: 2121,
            },
            0,
        ),
        DropUnpaid,
    );
    // Allow-listed destination (e.g. a mint), any port.
    l.expect(
        I,
        &up().ipv4(
            CL4,
            MINT4,
            L4::Tcp {
                sport: 40000,
                dport: 443,
            },
            0,
        ),
        PassGarden,
    );
    // Everything else is dropped, whatever the protocol.
    l.expect(
        I,
        &up().ipv4(
            CL4,
            NET4,
            L4::Tcp {
                sport: 40000,
                dport: 443,
            },
            0,
        ),
        DropUnpaid,
    );
    l.expect(
        I,
        &up().ipv4(CL4, NET4, L4::Raw { proto: 47 }, 64),
        DropUnpaid,
    );
    // Plain HTTP is marked for the captive-portal redirect.
    l.expect(
        I,
        &up().ipv4(
            CL4,
            NET4,
            L4::Tcp {
                sport: 40000,
                dport: 80,
            },
            0,
        ),
        PassPortal,
    );
}

#[test]
fn ipv6_and_extension_headers_do_not_slip_past() {
    let l = lab("ipv6");
    use Hook::TcIngress as I;
    use Verdict::*;
    let tcp443 = L4::Tcp {
        sport: 40000,
        dport: 443,
    };
    l.expect(
        I,
        &up().ipv6(cl6(), net6(), &[], tcp443.clone(), 10),
        DropUnpaid,
    );
    // Neighbour discovery to link-local / multicast / the gateway, never to a routed address.
    let ns = L4::Icmpv6 { ty: 135 };
    l.expect(
        I,
        &up().ipv6(
            "fe80::2".parse().unwrap(),
            "fe80::1".parse().unwrap(),
            &[],
            ns.clone(),
            16,
        ),
        PassGarden,
    );
    l.expect(I, &up().ipv6(cl6(), gw6(), &[], ns.clone(), 16), PassGarden);
    l.expect(I, &up().ipv6(cl6(), net6(), &[], ns, 16), DropUnpaid);
    l.expect(
        I,
        &up().ipv6(cl6(), net6(), &[], L4::Icmpv6 { ty: 128 }, 16),
        DropUnpaid,
    );
    // DNS and the payment port on the gateway behind a chain of extension headers.
    l.expect(
        I,
        &up().ipv6(
            cl6(),
            gw6(),
            &[0, 60, 43],
            L4::Udp {
                sport: 5000,
                dport: 53,
            },
            20,
        ),
        PassGarden,
    );
    l.expect(
        I,
        &up().ipv6(
            cl6(),
            gw6(),
            &[0, 44],
            L4::Tcp {
                sport: 5000,
                dport: 2121,
            },
            20,
        ),
        PassGarden,
    );
    // The same chains to the outside are still dropped.
    l.expect(
        I,
        &up().ipv6(
            cl6(),
            net6(),
            &[0, 60, 43],
            L4::Udp {
                sport: 5000,
                dport: 53,
            },
            20,
        ),
        DropUnpaid,
    );
    l.expect(
        I,
        &up().ipv6(
            cl6(),
            net6(),
            &[0, 60, 43, 60, 0, 60, 60],
            tcp443.clone(),
            20,
        ),
        DropUnpaid,
    );
    // A non-first fragment has no ports: it cannot be garden traffic.
    l.expect(I, &up().ipv6_later_fragment(cl6(), gw6(), 17), DropUnpaid);
    l.expect(
        I,
        &up().ipv4_frag(
            CL4,
            GW4,
            L4::Udp {
                sport: 1,
                dport: 53,
            },
            64,
            185,
        ),
        DropUnpaid,
    );
    // Allow-listed IPv6 prefix.
    l.expect(
        I,
        &up().ipv6(cl6(), "2001:db8:ffff::5".parse().unwrap(), &[], tcp443, 0),
        PassGarden,
    );
}

#[test]
fn vlan_tags_are_looked_through() {
    let l = lab("vlan");
    use Hook::TcIngress as I;
    use Verdict::*;
    let out = L4::Tcp {
        sport: 40000,
        dport: 443,
    };
    l.expect(
        I,
        &up().vlan(10).ipv4(CL4, NET4, out.clone(), 0),
        DropUnpaid,
    );
    l.expect(
        I,
        &up().vlan(10).vlan(20).ipv4(CL4, NET4, out.clone(), 0),
        DropUnpaid,
    );
    l.expect(
        I,
        &up().vlan(10).ipv4(
            CL4,
            GW4,
            L4::Udp {
                sport: 9,
                dport: 53,
            },
            0,
        ),
        PassGarden,
    );
    l.expect(
        I,
        &up()
            .vlan(10)
            .vlan(20)
            .vlan(30)
            .ipv4(CL4, NET4, out.clone(), 0),
        DropMalformed,
    );
    l.expect(
        I,
        &up().vlan(10).ipv6(cl6(), net6(), &[0], out, 0),
        DropUnpaid,
    );
}

#[test]
fn malformed_frames_are_dropped() {
    let l = lab("malformed");
    use Hook::TcIngress as I;
    let good = up().ipv4(CL4, NET4, L4::Tcp { sport: 1, dport: 2 }, 0);
    // (The kernel's test runner refuses IPv4 frames shorter than an IPv4 header, so the
    // truncation cases start after it.) Truncated in the TCP ports, an IHL below 5, an IHL
    // that claims options the packet does not have, a wrong IP version.
    l.expect(I, &good[..14 + 20 + 2], Verdict::DropMalformed);
    let mut long_ihl = good[..14 + 20 + 8].to_vec();
    long_ihl[14] = 0x4f;
    l.expect(I, &long_ihl, Verdict::DropMalformed);
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    l.expect(I, &bad_ihl, Verdict::DropMalformed);
    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    l.expect(I, &bad_version, Verdict::DropMalformed);
    // Paid clients do not get malformed packets through either.
    l.valve.open(MacAddr(CLIENT), Allowance::default()).unwrap();
    l.expect(I, &good[..14 + 20 + 2], Verdict::DropMalformed);
    l.expect(I, &good, Verdict::PassPaid);
}

#[test]
fn paid_client_is_metered_in_l3_bytes_both_ways() {
    let l = lab("paid");
    let mac = MacAddr(CLIENT);
    let upf = up().ipv4(
        CL4,
        NET4,
        L4::Tcp {
            sport: 40000,
            dport: 443,
        },
        1000,
    );
    let downf = down().ipv4(
        NET4,
        CL4,
        L4::Tcp {
            sport: 443,
            dport: 40000,
        },
        500,
    );
    assert!(!l.pass(Hook::TcIngress, &upf), "unpaid before open");
    assert!(
        !l.pass(Hook::TcEgress, &downf),
        "unpaid download dropped too"
    );
    l.valve
        .open(
            mac,
            Allowance {
                bytes: Some(1_000_000),
                ..Default::default()
            },
        )
        .unwrap();
    l.expect(Hook::TcIngress, &upf, Verdict::PassPaid);
    l.expect(Hook::TcEgress, &downf, Verdict::PassPaid);
    let g = l.valve.gate(mac).unwrap().unwrap();
    assert_eq!(g.usage.bytes_up, l3_len(&upf, 0));
    assert_eq!(g.usage.bytes_down, l3_len(&downf, 0));
    assert_eq!((g.usage.packets_up, g.usage.packets_down), (1, 1));
    assert_eq!(
        g.remaining_bytes,
        Some(1_000_000 - l3_len(&upf, 0) - l3_len(&downf, 0))
    );
    // Traffic to and from the gateway itself is never billed.
    l.expect(
        Hook::TcIngress,
        &up().ipv4(
            CL4,
            GW4,
            L4::Tcp {
                sport: 1,
                dport: 22,
            },
            100,
        ),
        Verdict::PassGateway,
    );
    l.expect(
        Hook::TcEgress,
        &down().ipv4(
            GW4,
            CL4,
            L4::Tcp {
                sport: 22,
                dport: 1,
            },
            900,
        ),
        Verdict::PassGateway,
    );
    l.expect(
        Hook::TcEgress,
        &down().ipv6(
            gw6(),
            cl6(),
            &[],
            L4::Udp {
                sport: 53,
                dport: 9,
            },
            900,
        ),
        Verdict::PassGateway,
    );
    // Another client is still unpaid.
    l.expect(
        Hook::TcIngress,
        &Frame::new(OTHER, GW_MAC).ipv4(
            CL4,
            NET4,
            L4::Tcp {
                sport: 1,
                dport: 443,
            },
            0,
        ),
        Verdict::DropUnpaid,
    );
    let g2 = l.valve.gate(mac).unwrap().unwrap();
    assert_eq!(g2.usage, g.usage, "gateway traffic left the counters alone");
    // VLAN-tagged paid traffic is metered without the tag.
    let tagged = up()
        .vlan(7)
        .ipv4(CL4, NET4, L4::Udp { sport: 1, dport: 2 }, 100);
    l.expect(Hook::TcIngress, &tagged, Verdict::PassPaid);
    assert_eq!(
        l.valve.gate(mac).unwrap().unwrap().usage.bytes_up,
        g.usage.bytes_up + l3_len(&tagged, 1)
    );
    // Closing keeps the counts and shuts the gate.
    l.valve.close(mac).unwrap();
    l.expect(Hook::TcIngress, &upf, Verdict::DropUnpaid);
    assert_eq!(l.valve.gate(mac).unwrap().unwrap().usage.packets_up, 2);
}

#[test]
fn spoofed_source_address_is_dropped_for_a_bound_client() {
    let l = lab("spoof");
    l.valve
        .open(
            MacAddr(CLIENT),
            Allowance {
                bind_ipv4: Some(CL4),
                ..Default::default()
            },
        )
        .unwrap();
    let tcp = L4::Tcp {
        sport: 1,
        dport: 443,
    };
    l.expect(
        Hook::TcIngress,
        &up().ipv4(CL4, NET4, tcp.clone(), 0),
        Verdict::PassPaid,
    );
    l.expect(
        Hook::TcIngress,
        &up().ipv4(Ipv4Addr::new(10, 0, 0, 99), NET4, tcp.clone(), 0),
        Verdict::DropSpoofed,
    );
    // DHCP from 0.0.0.0 (renewing) is still garden.
    l.expect(
        Hook::TcIngress,
        &up().ipv4(
            Ipv4Addr::UNSPECIFIED,
            GW4,
            L4::Udp {
                sport: 68,
                dport: 67,
            },
            0,
        ),
        Verdict::PassGarden,
    );
}

#[tokio::test]
async fn quota_boundary_drops_the_crossing_packet_and_emits_one_event() {
    let l = lab("quota");
    let mut events = l.valve.events().unwrap();
    let mac = MacAddr(CLIENT);
    let f = up().ipv4(CL4, NET4, L4::Udp { sport: 1, dport: 9 }, 72); // L3 = 100 bytes
    let len = l3_len(&f, 0);
    assert_eq!(len, 100);
    l.valve
        .open(
            mac,
            Allowance {
                bytes: Some(250),
                ..Default::default()
            },
        )
        .unwrap();
    l.expect(Hook::TcIngress, &f, Verdict::PassPaid); // 100
    l.expect(Hook::TcIngress, &f, Verdict::PassPaid); // 200
    l.expect(Hook::TcIngress, &f, Verdict::DropQuota); // would be 300 > 250
    l.expect(Hook::TcIngress, &f, Verdict::DropQuota);
    l.expect(
        Hook::TcEgress,
        &down().ipv4(NET4, CL4, L4::Udp { sport: 9, dport: 1 }, 72),
        Verdict::DropQuota,
    );
    // An exhausted client can still reach the portal and the mint to top up.
    l.expect(
        Hook::TcIngress,
        &up().ipv4(
            CL4,
            GW4,
            L4::Tcp {
                sport: 1,
                dport: 2121,
            },
            0,
        ),
        Verdict::PassGarden,
    );
    l.expect(
        Hook::TcIngress,
        &up().ipv4(
            CL4,
            MINT4,
            L4::Tcp {
                sport: 1,
                dport: 443,
            },
            100,
        ),
        Verdict::PassGarden,
    );
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("exhaustion event within 5 s")
        .expect("event stream open");
    assert_eq!(ev.mac, mac);
    assert_eq!(ev.reason, ExhaustReason::Quota);
    assert_eq!(ev.usage.bytes_up, 200);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.recv())
            .await
            .is_err(),
        "exactly one event per exhaustion"
    );
    let g = l.valve.gate(mac).unwrap().unwrap();
    assert_eq!(g.usage.bytes_up, 200, "dropped packets are not billed");
    assert_eq!(g.remaining_bytes, Some(50));
    // A top-up adds to what remains (50 + 100 = 150: one more packet fits, the second not).
    l.valve.extend(mac, 100, 0).unwrap();
    l.expect(Hook::TcIngress, &f, Verdict::PassPaid);
    l.expect(Hook::TcIngress, &f, Verdict::DropQuota);
    let ev2 = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("a new exhaustion after the top-up is reported again")
        .unwrap();
    assert!(ev2.generation > ev.generation);
    assert_eq!(ev2.usage.bytes_up, 300);
}

#[test]
fn separate_upload_limit() {
    let l = lab("uplimit");
    let mac = MacAddr(CLIENT);
    let f = up().ipv4(CL4, NET4, L4::Udp { sport: 1, dport: 9 }, 72);
    let d = down().ipv4(NET4, CL4, L4::Udp { sport: 9, dport: 1 }, 72);
    l.valve
        .open(
            mac,
            Allowance {
                bytes_up: Some(150),
                ..Default::default()
            },
        )
        .unwrap();
    l.expect(Hook::TcIngress, &f, Verdict::PassPaid);
    l.expect(Hook::TcIngress, &f, Verdict::DropQuota);
    l.expect(Hook::TcEgress, &d, Verdict::PassPaid);
    l.expect(Hook::TcEgress, &d, Verdict::PassPaid);
}

#[tokio::test]
async fn expiry_closes_the_gate_in_the_kernel() {
    let l = lab("expiry");
    let mut events = l.valve.events().unwrap();
    let mac = MacAddr(CLIENT);
    let f = up().ipv4(
        CL4,
        NET4,
        L4::Tcp {
            sport: 1,
            dport: 443,
        },
        10,
    );
    let now = l.valve.now_boot_ns();
    l.valve
        .open(
            mac,
            Allowance {
                until_boot_ns: Some(now + 200_000_000),
                ..Default::default()
            },
        )
        .unwrap();
    l.expect(Hook::TcIngress, &f, Verdict::PassPaid);
    tokio::time::sleep(Duration::from_millis(300)).await;
    l.expect(Hook::TcIngress, &f, Verdict::DropExpired);
    l.expect(
        Hook::TcEgress,
        &down().ipv4(
            NET4,
            CL4,
            L4::Tcp {
                sport: 443,
                dport: 1,
            },
            10,
        ),
        Verdict::DropExpired,
    );
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.reason, ExhaustReason::Expired);
    // Extending an expired time gate starts from now, not from the old deadline.
    let st = l.valve.extend(mac, 0, 5_000_000_000).unwrap();
    assert!(st.until_boot_ns.unwrap() >= l.valve.now_boot_ns() + 4_000_000_000);
    l.expect(Hook::TcIngress, &f, Verdict::PassPaid);
}

#[test]
fn unpaid_downloads_and_portal_answers() {
    let l = lab("egress");
    use Hook::TcEgress as E;
    // Unsolicited traffic from outside to an unpaid client is dropped.
    l.expect(
        E,
        &down().ipv4(
            NET4,
            CL4,
            L4::Tcp {
                sport: 443,
                dport: 40000,
            },
            0,
        ),
        Verdict::DropUnpaid,
    );
    // Answers from an allow-listed destination pass.
    l.expect(
        E,
        &down().ipv4(
            MINT4,
            CL4,
            L4::Tcp {
                sport: 443,
                dport: 40000,
            },
            0,
        ),
        Verdict::PassGarden,
    );
    // Router advertisements pass; the gateway's DHCP offer passes.
    l.expect(
        E,
        &down().ipv6(
            "fe80::1".parse().unwrap(),
            "fe80::2".parse().unwrap(),
            &[],
            L4::Icmpv6 { ty: 134 },
            16,
        ),
        Verdict::PassGateway,
    );
    l.expect(
        E,
        &down().ipv4(
            GW4,
            CL4,
            L4::Udp {
                sport: 67,
                dport: 68,
            },
            300,
        ),
        Verdict::PassGateway,
    );
    // A port-80 answer without the portal mark (a real web server) is dropped.
    l.expect(
        E,
        &down().ipv4(
            NET4,
            CL4,
            L4::Tcp {
                sport: 80,
                dport: 40000,
            },
            0,
        ),
        Verdict::DropUnpaid,
    );
}

#[test]
fn xdp_program_gives_the_same_ingress_verdicts() {
    let l = lab("xdp");
    use Hook::XdpIngress as X;
    let out = up().ipv4(
        CL4,
        NET4,
        L4::Tcp {
            sport: 1,
            dport: 443,
        },
        100,
    );
    l.expect(X, &out, Verdict::DropUnpaid);
    l.expect(
        X,
        &up().ipv4(
            CL4,
            GW4,
            L4::Udp {
                sport: 1,
                dport: 53,
            },
            0,
        ),
        Verdict::PassGarden,
    );
    l.expect(
        X,
        &up().vlan(3).ipv6(
            cl6(),
            net6(),
            &[0, 60],
            L4::Udp {
                sport: 1,
                dport: 53,
            },
            0,
        ),
        Verdict::DropUnpaid,
    );
    // No skb mark in XDP: unpaid plain HTTP is dropped rather than redirected.
    l.expect(
        X,
        &up().ipv4(
            CL4,
            NET4,
            L4::Tcp {
                sport: 1,
                dport: 80,
            },
            0,
        ),
        Verdict::DropUnpaid,
    );
    l.valve
        .open(
            MacAddr(CLIENT),
            Allowance {
                bytes: Some(10_000),
                ..Default::default()
            },
        )
        .unwrap();
    l.expect(X, &out, Verdict::PassPaid);
    assert_eq!(
        l.valve
            .gate(MacAddr(CLIENT))
            .unwrap()
            .unwrap()
            .usage
            .bytes_up,
        l3_len(&out, 0)
    );
}

#[test]
fn pinned_maps_survive_a_reload() {
    let pins = PinBase::new("reload");
    let mut cfg = ValveConfig::new("lo");
    cfg.pin_base = pins.path().to_path_buf();
    cfg.gateway_v4 = Some(GW4);
    let mac = MacAddr(CLIENT);
    let f = up().ipv4(CL4, NET4, L4::Udp { sport: 1, dport: 9 }, 72);
    {
        let v = Valve::load(&cfg).unwrap();
        v.open(
            mac,
            Allowance {
                bytes: Some(1000),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(v
            .test_run(Hook::TcIngress, &f, 1)
            .unwrap()
            .passed(Hook::TcIngress));
    }
    let v = Valve::load(&cfg).unwrap();
    let g = v
        .gate(mac)
        .unwrap()
        .expect("policy and usage are still pinned");
    assert!(g.open);
    assert_eq!(g.usage.bytes_up, 100);
    assert_eq!(g.remaining_bytes, Some(900));
    for name in [
        "TG_POLICY",
        "TG_USAGE",
        "TG_CONFIG",
        "TG_GARDEN",
        "TG_VERDICTS",
        "TG_EVENTS",
    ] {
        assert!(cfg.pin_dir().join(name).exists(), "{name} is pinned");
    }
}

// ---- The WAN meter (reseller mode): meter-only instance -----------------------------------

/// The upstream gateway's MAC and address as our WAN side sees them, and our WAN address.
const UP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const WAN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const UP4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const WAN4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);

fn meter_lab(tag: &str) -> Lab {
    let pins = PinBase::new(tag);
    let valve = Valve::load(&ValveConfig::meter("lo", pins.path()))
        .expect("load the eBPF object (root and BPF required)");
    Lab { valve, _pins: pins }
}

/// From the upstream to us (WAN ingress) and from us to the upstream (WAN egress).
fn from_up() -> Frame {
    Frame::new(UP_MAC, WAN_MAC)
}
fn to_up() -> Frame {
    Frame::new(WAN_MAC, UP_MAC)
}

#[test]
fn meter_only_passes_everything_and_counts_only_the_watched_mac_both_ways() {
    use tollgate::valve::WanMeter;
    let l = meter_lab("meter");
    use Hook::{TcEgress as E, TcIngress as I};
    use Verdict::*;
    let tcp = L4::Tcp {
        sport: 443,
        dport: 40000,
    };
    let rx = from_up().ipv4(NET4, WAN4, tcp.clone(), 1200);
    let tx = to_up().ipv4(WAN4, NET4, tcp.clone(), 300);
    // Nothing watched yet: everything passes, nothing is counted (no random-host entries).
    l.expect(I, &rx, PassLink);
    l.expect(E, &tx, PassLink);
    assert_eq!(WanMeter::read(&l.valve, MacAddr(UP_MAC)).unwrap(), None);
    assert_eq!(l.valve.gates().unwrap(), vec![], "no entry was created");

    WanMeter::watch(&l.valve, MacAddr(UP_MAC), UP4).unwrap();
    // The watched peer's policy entry is CLOSED with zero limits: in meter-only mode that
    // must neither drop nor stop the counting.
    l.expect(I, &rx, PassPaid);
    l.expect(E, &tx, PassPaid);
    l.expect(I, &rx, PassPaid);
    let u = WanMeter::read(&l.valve, MacAddr(UP_MAC)).unwrap().unwrap();
    assert_eq!(u.bytes_down, 2 * l3_len(&rx, 0), "received = WAN ingress");
    assert_eq!(u.bytes_up, l3_len(&tx, 0), "sent = WAN egress");
    assert_eq!((u.packets_up, u.packets_down), (1, 2));

    // IPv6 and tagged frames are counted in L3 bytes too.
    let rx6 = from_up().ipv6(net6(), cl6(), &[0], L4::Udp { sport: 1, dport: 2 }, 100);
    let tx_tagged = to_up()
        .vlan(5)
        .ipv4(WAN4, NET4, L4::Udp { sport: 2, dport: 1 }, 60);
    l.expect(I, &rx6, PassPaid);
    l.expect(E, &tx_tagged, PassPaid);
    let u2 = WanMeter::read(&l.valve, MacAddr(UP_MAC)).unwrap().unwrap();
    assert_eq!(u2.bytes_down, u.bytes_down + l3_len(&rx6, 0));
    assert_eq!(u2.bytes_up, u.bytes_up + l3_len(&tx_tagged, 1));

    // Not counted, but passed: the upstream's own address (it bills none of that), neighbour
    // discovery, ARP, broadcast, other MACs on the WAN, malformed frames.
    let api = L4::Tcp {
        sport: 40001,
        dport: 2121,
    };
    l.expect(E, &to_up().ipv4(WAN4, UP4, api.clone(), 100), PassGateway);
    l.expect(I, &from_up().ipv4(UP4, WAN4, api, 900), PassGateway);
    l.expect(
        I,
        &from_up().ipv6(
            "fe80::1".parse().unwrap(),
            "fe80::2".parse().unwrap(),
            &[],
            L4::Icmpv6 { ty: 135 },
            24,
        ),
        PassGarden,
    );
    l.expect(I, &from_up().arp(), PassLink);
    l.expect(I, &Frame::new(UP_MAC, BROADCAST).arp(), PassMulticast);
    l.expect(
        I,
        &Frame::new(OTHER, WAN_MAC).ipv4(NET4, WAN4, tcp.clone(), 500),
        PassLink,
    );
    l.expect(
        E,
        &Frame::new(WAN_MAC, OTHER).ipv4(WAN4, NET4, tcp.clone(), 500),
        PassLink,
    );
    let mut bad_version = rx.clone();
    bad_version[14] = 0x65;
    l.expect(I, &bad_version, PassLink);
    l.expect(I, &rx[..14 + 20 + 2], PassLink);
    assert_eq!(
        WanMeter::read(&l.valve, MacAddr(UP_MAC)).unwrap().unwrap(),
        u2,
        "none of that moved the counters"
    );
    assert_eq!(WanMeter::read(&l.valve, MacAddr(OTHER)).unwrap(), None);

    // A new upstream: the old one stops being counted, its counters stay.
    WanMeter::watch(&l.valve, MacAddr(OTHER), Ipv4Addr::new(10, 78, 0, 9)).unwrap();
    l.expect(I, &rx, PassLink);
    assert_eq!(
        WanMeter::read(&l.valve, MacAddr(UP_MAC)).unwrap().unwrap(),
        u2
    );
    l.expect(
        I,
        &Frame::new(OTHER, WAN_MAC).ipv4(CL4, WAN4, tcp, 500),
        PassPaid,
    );
}

#[test]
fn meter_instance_is_separate_from_the_gating_one() {
    use tollgate::valve::WanMeter;
    let pins = PinBase::new("metersep");
    let mut cfg = ValveConfig::new("lo");
    cfg.pin_base = pins.path().to_path_buf();
    cfg.gateway_v4 = Some(GW4);
    let lan = Valve::load(&cfg).unwrap();
    let wan = Valve::load(&ValveConfig::meter("lo", pins.path())).unwrap();
    assert_ne!(lan.pin_dir(), wan.pin_dir(), "own pin directory");
    // The gating instance refuses to become a meter: a POLICY entry there would be a gate.
    assert!(WanMeter::watch(&lan, MacAddr(CLIENT), GW4).is_err());
    let mut bad = ValveConfig::meter("lo", pins.path());
    bad.portal_mark = Some(1);
    assert!(Valve::load(&bad).is_err(), "a meter never redirects");
    // Normal mode is unchanged next to a meter: unpaid and malformed frames are still dropped.
    WanMeter::watch(&wan, MacAddr(CLIENT), GW4).unwrap();
    let f = up().ipv4(CL4, NET4, L4::Tcp { sport: 1, dport: 2 }, 0);
    assert!(!lan
        .test_run(Hook::TcIngress, &f, 1)
        .unwrap()
        .passed(Hook::TcIngress));
    assert!(!lan
        .test_run(Hook::TcIngress, &f[..14 + 20 + 2], 1)
        .unwrap()
        .passed(Hook::TcIngress));
    assert!(wan
        .test_run(Hook::TcIngress, &f, 1)
        .unwrap()
        .passed(Hook::TcIngress));
    assert_eq!(
        lan.gate(MacAddr(CLIENT)).unwrap(),
        None,
        "the meter's entry is not a gate"
    );
    // Tearing the data plane down removes the meter's pins as well.
    let wan_dir = wan.pin_dir().to_path_buf();
    drop((lan, wan));
    Valve::remove_pins(pins.path()).unwrap();
    assert!(!wan_dir.exists() && !pins.path().exists());
}
