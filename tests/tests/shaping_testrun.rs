//! Per-client rate limits (issue 15) in the kernel programs, driven with crafted frames
//! through `BPF_PROG_TEST_RUN`: the EDT departure times written to `skb->tstamp` on
//! egress (read back from the context) and the upload token bucket on ingress.
//!
//! Every expected departure is computed here in 128-bit arithmetic from the rate and the
//! packet's L3 length, and compared exactly with what the kernel wrote; no assertion depends
//! on how fast the machine runs, except where a bound is derived from the time measured.
//! Requires root (CI is root).

use std::{net::Ipv4Addr, time::Instant};

use tollgate::valve::{Allowance, Gates, Hook, MacAddr, Rates, Valve, ValveConfig, Verdict};
use tollgate_common::Usage;
use tollgate_tests::{
    frames::{Frame, L4},
    pins::PinBase,
    testrun::{self, OldPins},
};

const CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x31];
const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x32];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GW4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CL4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const NET4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// Longest a tick can be (HZ ≥ 100): the kernel reads the coarse monotonic clock.
const TICK_NS: u64 = 10_000_000;
/// The kernel's horizon (`HORIZON_NS` in tollgate-ebpf).
const HORIZON_NS: u128 = 2_000_000_000;

struct Lab {
    valve: Valve,
    pins: PinBase,
}

/// A data plane whose LAN has `fq`: shaped downloads get EDT departure times.
fn lab(tag: &str) -> Lab {
    lab_with(tag, true)
}

fn lab_with(tag: &str, edt_down: bool) -> Lab {
    let (valve, pins) = testrun::load(tag, |cfg| {
        cfg.gateway_v4 = Some(GW4);
        cfg.edt_down = edt_down;
    });
    Lab { valve, pins }
}

/// A UDP download of `l3` L3 bytes from the internet to `mac`.
fn down(mac: [u8; 6], l3: usize) -> Vec<u8> {
    Frame::new(GW_MAC, mac).ipv4(NET4, CL4, L4::Udp { sport: 9, dport: 1 }, l3 - 28)
}

/// A UDP upload of `l3` L3 bytes from `mac` to the internet.
fn up(mac: [u8; 6], l3: usize) -> Vec<u8> {
    Frame::new(mac, GW_MAC).ipv4(CL4, NET4, L4::Udp { sport: 1, dport: 9 }, l3 - 28)
}

/// CLOCK_MONOTONIC ns: the clock of `skb->tstamp` for `fq`.
fn mono() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Transmission time of `len` bytes at `kbit`, as the kernel computes it (exact, in u128).
fn delay(len: usize, kbit: u64) -> u64 {
    (len as u128 * 1_000_000_000 / (kbit as u128 * 125)) as u64
}

impl Lab {
    fn open(&self, mac: [u8; 6], rates: Rates) {
        self.valve
            .open(
                MacAddr(mac),
                Allowance {
                    rates: Some(rates),
                    ..Default::default()
                },
            )
            .expect("open");
    }

    /// One egress run: (verdict counter that moved, tstamp the program left).
    fn egress(&self, frame: &[u8], tstamp_in: u64) -> (Verdict, u64) {
        let before = self.valve.verdicts().unwrap();
        let (o, t) = self
            .valve
            .test_run_tstamp(Hook::TcEgress, frame, tstamp_in)
            .expect("BPF_PROG_TEST_RUN with a context");
        let v = self.moved(&before);
        assert_eq!(o.passed(Hook::TcEgress), v.is_pass(), "{v:?}");
        (v, t)
    }

    fn ingress(&self, frame: &[u8]) -> Verdict {
        let before = self.valve.verdicts().unwrap();
        let o = self
            .valve
            .test_run(Hook::TcIngress, frame, 1)
            .expect("BPF_PROG_TEST_RUN");
        let v = self.moved(&before);
        assert_eq!(o.passed(Hook::TcIngress), v.is_pass(), "{v:?}");
        v
    }

    fn moved(&self, before: &tollgate::valve::VerdictCounts) -> Verdict {
        let after = self.valve.verdicts().unwrap();
        let moved: Vec<Verdict> = Verdict::ALL
            .into_iter()
            .filter(|v| after.packets(*v) != before.packets(*v))
            .collect();
        assert_eq!(moved.len(), 1, "one verdict per packet: {moved:?}");
        moved[0]
    }

    /// The client's raw USAGE slot (the kernel's shaping state included), read behind the
    /// valve's back from the pins.
    fn raw_usage(&self, mac: [u8; 6]) -> Usage {
        testrun::raw_usage(&self.pins, mac)
    }
}

/// 1. A client without a rate: the program leaves `skb->tstamp` as it came (zero or a
///    sender's own departure time) and reads no shaping state. A client with only an upload
///    rate is not shaped on download either.
#[test]
fn an_unshaped_download_keeps_its_tstamp() {
    let l = lab("shunshaped");
    l.open(CLIENT, Rates::UNLIMITED);
    l.open(
        OTHER,
        Rates {
            down_kbit: 0,
            up_kbit: 1000,
        },
    );
    for mac in [CLIENT, OTHER] {
        for t in [0, 1, 123_456_789, u64::MAX] {
            let (v, out) = l.egress(&down(mac, 1000), t);
            assert_eq!(v, Verdict::PassPaid);
            assert_eq!(out, t, "tstamp untouched");
        }
        assert_eq!(l.raw_usage(mac).down_next_ns, 0, "no clock kept");
    }
}

/// 2. Departures of a shaped download: the first leaves now, each next one exactly one
///    transmission time (len·1e9/rate) after the previous, whatever tstamp the packet came
///    with; a packet that would leave more than the 2 s horizon ahead is dropped as
///    `drop_rate_down`, does not move the clock and is not metered.
///
///    At 8 kbit/s (1000 B/s) a 1000-byte packet takes exactly 1 s, so the schedule is far
///    ahead of the clock for the whole test: the comparisons are exact on any machine.
#[test]
fn download_departures_are_spaced_by_the_rate_and_bounded_by_the_horizon() {
    let l = lab("shedt");
    let kbit = 8;
    l.open(
        CLIENT,
        Rates {
            down_kbit: kbit,
            up_kbit: 0,
        },
    );
    let f = down(CLIENT, 1000);
    let before = mono();
    let (v, t1) = l.egress(&f, 0);
    let after = mono();
    assert_eq!(v, Verdict::PassPaid);
    assert!(
        (before - TICK_NS..=after).contains(&t1),
        "the first packet leaves now (coarse clock: up to a tick behind): {before} <= {t1} <= {after}"
    );
    assert_eq!(l.raw_usage(CLIENT).down_next_ns, t1 + delay(1000, kbit));
    // A sender's own (earlier) tstamp does not let it jump the queue.
    let (v, t2) = l.egress(&f, 5);
    assert_eq!(v, Verdict::PassPaid);
    assert_eq!(
        t2,
        t1 + 1_000_000_000,
        "exactly 1 s later (after the small one)"
    );
    let (v, t3) = l.egress(&f, 0);
    assert_eq!(v, Verdict::PassPaid);
    assert_eq!(t3, t2 + 1_000_000_000);
    assert!(
        t3 as u128 - mono() as u128 <= HORIZON_NS,
        "still within the horizon"
    );
    // The next would leave 3 s ahead: dropped, and nothing moves.
    let clock = l.raw_usage(CLIENT).down_next_ns;
    let (v, t4) = l.egress(&f, 77);
    assert_eq!(v, Verdict::DropRateDown);
    assert_eq!(t4, 77, "a dropped packet's tstamp is not written");
    let u = l.raw_usage(CLIENT);
    assert_eq!(u.down_next_ns, clock, "a dropped packet costs no time");
    assert_eq!(
        (u.bytes_down, u.packets_down),
        (3000, 3),
        "only what passed is metered"
    );
    // Monotonic: every departure is after the one before.
    assert!(t1 < t2 && t2 < t3);
    // A small packet (an ACK of the client's upload) leaves now, not behind the queue, but
    // is charged on the clock.
    l.open(
        OTHER,
        Rates {
            down_kbit: kbit,
            up_kbit: 0,
        },
    );
    let (_, first) = l.egress(&f_other(), 0);
    let clock = l.raw_usage(OTHER).down_next_ns;
    assert_eq!(clock, first + 1_000_000_000);
    let b0 = mono();
    let (v, ts) = l.egress(&down(OTHER, 100), 0);
    let b1 = mono();
    assert_eq!(v, Verdict::PassPaid);
    assert!(
        (b0 - TICK_NS..=b1).contains(&ts),
        "a small packet leaves now"
    );
    assert_eq!(l.raw_usage(OTHER).down_next_ns, clock + delay(100, kbit));
}

fn f_other() -> Vec<u8> {
    down(OTHER, 1000)
}

/// 3. No overflow at the extremes: the largest rate the kernel takes (u32::MAX bytes/s) with
///    a 1-byte-per-ns-scale delay, and the smallest (1 kbit/s) with a 1500-byte packet
///    (12 s: beyond the horizon for the next packet, but computed exactly), and a
///    65 535-segment GSO aggregate. The clock advances by exactly len·1e9/rate each time.
#[test]
fn extreme_rates_and_lengths_do_not_overflow() {
    let l = lab("shextreme");
    // The largest rate: a 1500-byte packet takes 349 ns.
    l.open(
        CLIENT,
        Rates {
            down_kbit: Rates::MAX_KBIT,
            up_kbit: 0,
        },
    );
    let rate_b = Rates::bytes_per_s(Rates::MAX_KBIT) as u128;
    let mut last = 0;
    for _ in 0..5 {
        let (v, t) = l.egress(&down(CLIENT, 1500), 0);
        assert_eq!(v, Verdict::PassPaid);
        assert!(t >= last, "monotonic: {t} >= {last}");
        let want = t as u128 + 1500 * 1_000_000_000 / rate_b;
        assert_eq!(l.raw_usage(CLIENT).down_next_ns as u128, want);
        last = t;
    }
    // The smallest rate: 1 kbit/s = 125 B/s; 1500 bytes = 12 s.
    l.open(
        OTHER,
        Rates {
            down_kbit: 1,
            up_kbit: 0,
        },
    );
    let (v, t) = l.egress(&down(OTHER, 1500), 0);
    assert_eq!(v, Verdict::PassPaid);
    assert_eq!(
        l.raw_usage(OTHER).down_next_ns,
        t + 12_000_000_000,
        "12 s exactly"
    );
    let (v, _) = l.egress(&down(OTHER, 1500), 0);
    assert_eq!(v, Verdict::DropRateDown, "12 s ahead is beyond the horizon");
}

/// 4. The largest aggregate a context can describe (gso_segs = 65 535) is metered and timed
///    as the segments it stands for, without overflow, through the same path as real GSO.
///    (BPF_PROG_TEST_RUN takes `gso_segs` from the context.)
#[test]
fn a_huge_aggregate_is_timed_as_its_segments() {
    let l = lab("shgso");
    l.open(
        CLIENT,
        Rates {
            down_kbit: Rates::MAX_KBIT,
            up_kbit: 0,
        },
    );
    let f = Frame::new(GW_MAC, CLIENT).ipv4(NET4, CL4, L4::Tcp { sport: 9, dport: 1 }, 1400);
    let (o, t) = l
        .valve
        .test_run_gso(Hook::TcEgress, &f, 65_535)
        .expect("BPF_PROG_TEST_RUN with gso_segs");
    assert!(o.passed(Hook::TcEgress));
    let u = l.raw_usage(CLIENT);
    // 1440 L3 bytes + 65 534 more copies of the 40 header bytes.
    let len = 1440u128 + 65_534 * 40;
    assert_eq!(u.bytes_down as u128, len);
    let rate_b = Rates::bytes_per_s(Rates::MAX_KBIT) as u128;
    assert_eq!(
        u.down_next_ns as u128,
        t as u128 + len * 1_000_000_000 / rate_b
    );
}

/// 5. Upload policing: a fresh client may send its burst (128 KiB at low rates), the packet
///    that finds the bucket empty is dropped as `drop_rate_up` and not metered, and the
///    bucket refills at the rate. At 8 kbit/s (1000 B/s) refilling one 1400-byte packet's
///    debt takes over half a second, so the burst count is exact on any machine; the refill
///    is checked against a bound derived from the time that really passed.
#[test]
fn upload_bucket_drops_beyond_the_burst_and_refills() {
    let l = lab("shbucket");
    l.open(
        CLIENT,
        Rates {
            down_kbit: 0,
            up_kbit: 8,
        },
    );
    let f = up(CLIENT, 1400);
    let burst = Rates::burst(1000) as u64;
    assert_eq!(burst, 128 * 1024);
    // Passes while the bucket holds anything: ceil(burst / 1400) packets.
    let want = burst.div_ceil(1400);
    let mut passed = 0;
    loop {
        match l.ingress(&f) {
            Verdict::PassPaid => passed += 1,
            Verdict::DropRateUp => break,
            v => panic!("unexpected verdict {v:?}"),
        }
        assert!(passed <= want, "more than the burst passed");
    }
    assert_eq!(passed, want, "exactly the burst passes");
    let u = l.raw_usage(CLIENT);
    assert_eq!(u.bytes_up, passed * 1400, "a dropped upload is not metered");
    assert_eq!(u.packets_up, passed);
    // Still empty right away (the debt is burst - 1400·want < 0).
    assert_eq!(l.ingress(&f), Verdict::DropRateUp);
    // Refill: 1.5 s at 1000 B/s repays the debt (at most 1400 bytes) and leaves some.
    let t0 = Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let mut more = 0;
    while l.ingress(&f) == Verdict::PassPaid {
        more += 1;
        assert!(
            more < 100,
            "the bucket refills to the rate, not without bound"
        );
    }
    let secs = t0.elapsed().as_secs_f64();
    assert!(more >= 1, "the bucket refilled");
    let bound = (secs * 1000.0 / 1400.0).ceil() as u64 + 1;
    assert!(
        more <= bound,
        "{more} packets after {secs:.2} s: at most {bound} at 1000 B/s"
    );
    // The other direction is not limited by the upload rate.
    for _ in 0..200 {
        assert_eq!(l.egress(&down(CLIENT, 1400), 0).0, Verdict::PassPaid);
    }
    // Small packets (the ACKs of a download) may go on into debt down to -burst, charged,
    // after large ones are dropped; a flood of them stops there: one burst over the rate.
    l.open(
        OTHER,
        Rates {
            down_kbit: 0,
            up_kbit: 8,
        },
    );
    let mut big = 0u64;
    while l.ingress(&up(OTHER, 1400)) == Verdict::PassPaid {
        big += 1;
    }
    let ack = up(OTHER, 100);
    let mut acks = 0u64;
    while l.ingress(&ack) == Verdict::PassPaid {
        acks += 1;
        assert!(acks <= 2 * burst / 100, "small packets are bounded too");
    }
    // From a debt of at most 1400 down to -burst, in 100-byte steps (plus what the
    // bucket refilled meanwhile at 1000 B/s, a few packets at most).
    assert!(
        acks >= burst / 100 - 14,
        "small packets pass into the debt: {acks}"
    );
    let u = l.raw_usage(OTHER);
    assert_eq!(u.bytes_up, big * 1400 + acks * 100, "all charged");
    assert!(u.up_tokens <= -(burst as i64) + 100);
}

/// 6. `set_rate` changes the rate on the next packet without touching the limits, the
///    generation or the counts (a tier raised mid-transfer); `open` without rates keeps an
///    open gate's rate (a top-up), and `extend` keeps it too.
#[test]
fn set_rate_changes_only_the_rate() {
    let l = lab("shsetrate");
    let mac = MacAddr(CLIENT);
    let st = l
        .valve
        .open(
            mac,
            Allowance {
                bytes: Some(1_000_000),
                rates: Some(Rates {
                    down_kbit: 16,
                    up_kbit: 8,
                }),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        st.rates,
        Rates {
            down_kbit: 16,
            up_kbit: 8
        }
    );
    let f = down(CLIENT, 1000);
    let (_, t1) = l.egress(&f, 0);
    let (_, t2) = l.egress(&f, 0);
    assert_eq!(t2, t1 + 500_000_000, "0.5 s at 16 kbit/s");
    let before = l.valve.gate(mac).unwrap().unwrap();
    let faster = Rates {
        down_kbit: 80,
        up_kbit: 16,
    };
    let after = l.valve.set_rate(mac, faster).unwrap();
    assert_eq!(after.rates, faster);
    assert_eq!(after.usage, before.usage, "counts untouched");
    assert_eq!(after.generation, before.generation, "same generation");
    assert_eq!(after.remaining_bytes, before.remaining_bytes);
    assert!(after.open);
    // The packet already scheduled keeps its slot; the next ones go at the new rate.
    let (_, t3) = l.egress(&f, 0);
    assert_eq!(
        t3,
        t2 + 500_000_000,
        "scheduled at the old rate before the change"
    );
    let (_, t4) = l.egress(&f, 0);
    assert_eq!(t4, t3 + 100_000_000, "0.1 s at 80 kbit/s: no gap, no reset");
    // A top-up (open without rates) and an extend keep the rate.
    let st = l
        .valve
        .open(
            mac,
            Allowance {
                bytes: Some(2_000_000),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(st.rates, faster);
    let st = l.valve.extend(mac, 1000, 0).unwrap();
    assert_eq!(st.rates, faster);
    // A closed gate has no rate to change.
    l.valve.close(mac).unwrap();
    assert!(l.valve.set_rate(mac, faster).is_err());
}

/// 6b. Without `fq` on the LAN (`edt_down` off: a kernel without `sch_fq`), a shaped
///     download is policed like an upload: the burst passes with its tstamp untouched, the
///     next is dropped as `drop_rate_down` and not metered.
#[test]
fn without_fq_downloads_are_policed() {
    let l = lab_with("shpolice", false);
    l.open(
        CLIENT,
        Rates {
            down_kbit: 8,
            up_kbit: 0,
        },
    );
    let f = down(CLIENT, 1400);
    let want = (Rates::burst(1000) as u64).div_ceil(1400);
    let mut passed = 0;
    loop {
        match l.egress(&f, 42) {
            (Verdict::PassPaid, t) => {
                assert_eq!(t, 42, "no departure time without fq");
                passed += 1;
            }
            (Verdict::DropRateDown, _) => break,
            (v, _) => panic!("unexpected verdict {v:?}"),
        }
        assert!(passed <= want, "more than the burst passed");
    }
    assert_eq!(passed, want);
    let u = l.raw_usage(CLIENT);
    assert_eq!(
        u.bytes_down,
        passed * 1400,
        "a dropped download is not metered"
    );
    assert_eq!(u.down_next_ns, 0, "no EDT clock");
    // Uploads are not limited by the download rate.
    for _ in 0..200 {
        assert_eq!(l.ingress(&up(CLIENT, 1400)), Verdict::PassPaid);
    }
}

/// 7. The XDP ingress program polices uploads the same way (no skb needed for a bucket).
#[test]
fn xdp_ingress_polices_uploads_too() {
    let l = lab("shxdp");
    l.open(
        CLIENT,
        Rates {
            down_kbit: 0,
            up_kbit: 8,
        },
    );
    let f = up(CLIENT, 1400);
    let want = (Rates::burst(1000) as u64).div_ceil(1400);
    let mut passed = 0;
    while l
        .valve
        .test_run(Hook::XdpIngress, &f, 1)
        .unwrap()
        .passed(Hook::XdpIngress)
    {
        passed += 1;
        assert!(passed <= want);
    }
    assert_eq!(passed, want);
    assert!(l.valve.verdicts().unwrap().packets(Verdict::DropRateUp) >= 1);
}

/// 9. The rate limits read the coarse clock from a per-CPU copy refreshed once per tick (no
///    helper call per packet): after each pause (20 ms and more, five ticks at HZ = 250) the
///    departure of an idle shaped client is "now" again, within a tick of CLOCK_MONOTONIC. A
///    copy that was not refreshed at the next tick would leave it tens of ms in the past.
#[test]
fn the_clock_copy_follows_the_clock_across_ticks() {
    let l = lab("shclock");
    l.open(
        CLIENT,
        Rates {
            down_kbit: Rates::MAX_KBIT,
            up_kbit: 0,
        },
    );
    let f = down(CLIENT, 1000);
    let mut last = 0;
    for i in 0..8 {
        std::thread::sleep(std::time::Duration::from_millis(20 + 7 * i));
        let before = mono();
        let (v, t) = l.egress(&f, 0);
        let after = mono();
        assert_eq!(v, Verdict::PassPaid);
        assert!(
            (before - TICK_NS..=after).contains(&t),
            "pause {i}: the departure is now: {before} - tick <= {t} <= {after}"
        );
        assert!(t > last, "monotonic");
        last = t;
    }
}

/// 9. Schema 4 → 5: a load next to schema 4's pins (a hash map of gates with the token
///    bucket sizes) carries every client into the policy table with its gate, binding,
///    generation, rates, counts and shaping state, and unpins the old client maps (old
///    code: schema 4 was the current one; a v5 load started from empty maps).
#[test]
fn an_upgrade_from_schema_4_carries_clients_rates_and_counts_over() {
    let pins = PinBase::new("v4up");
    let old = OldPins::new(&pins, "v4");
    let (pp, up_) = (old.path("TG_POLICY"), old.path("TG_USAGE"));
    old.create("TG_POLICY", "hash", 8, 128, 64);
    old.create("TG_USAGE", "array", 4, 128, 64);
    // v4 Policy: flags, generation, limits, expires, bound_ipv4, slot, rate_down, rate_up,
    // burst_up, burst_down, bound_ipv6.
    let mut pol = Vec::new();
    pol.extend(3u32.to_le_bytes()); // ALLOWED | BIND_IPV4
    pol.extend(11u32.to_le_bytes());
    pol.extend(80_000u64.to_le_bytes());
    pol.extend(u64::MAX.to_le_bytes());
    pol.extend(u64::MAX.to_le_bytes());
    pol.extend(0u64.to_le_bytes());
    pol.extend(CL4.octets());
    pol.extend(5u32.to_le_bytes()); // slot 5
    pol.extend(250_000u32.to_le_bytes()); // 2000 kbit/s down
    pol.extend(125_000u32.to_le_bytes()); // 1000 kbit/s up
    pol.extend(131_072u32.to_le_bytes());
    pol.extend(131_072u32.to_le_bytes());
    pol.extend([0u8; 64]);
    assert_eq!(pol.len(), 128);
    // v4 Usage in slot 5: up line (bytes, packets, dropped, notified, pad, up_tokens,
    // up_refill_ns, pad), down line.
    let mut u = Vec::new();
    for v in [4000u64, 40, 66] {
        u.extend(v.to_le_bytes());
    }
    u.extend(10u32.to_le_bytes());
    u.extend(0u32.to_le_bytes());
    u.extend(777i64.to_le_bytes());
    u.extend(123_456u64.to_le_bytes());
    u.extend([0u8; 16]);
    u.extend(6000u64.to_le_bytes());
    u.extend(60u64.to_le_bytes());
    u.extend([0u8; 48]);
    assert_eq!(u.len(), 128);
    let key = [
        CLIENT[0], CLIENT[1], CLIENT[2], CLIENT[3], CLIENT[4], CLIENT[5], 0, 0,
    ];
    old.update("TG_POLICY", &key, &pol);
    old.update("TG_USAGE", &5u32.to_le_bytes(), &u);

    let mut cfg = ValveConfig::new("lo");
    cfg.pin_base = pins.path().to_path_buf();
    cfg.gateway_v4 = Some(GW4);
    let v = Valve::load(&cfg).expect("load over v4 pins");
    let g = v.gate(MacAddr(CLIENT)).unwrap().expect("carried over");
    assert!(g.open);
    assert_eq!(g.generation, 11);
    assert_eq!(g.bound_ipv4, Some(CL4));
    assert_eq!(
        g.rates,
        Rates {
            down_kbit: 2000,
            up_kbit: 1000
        }
    );
    assert_eq!(
        (
            g.usage.bytes_up,
            g.usage.bytes_down,
            g.usage.packets_up,
            g.usage.packets_down
        ),
        (4000, 6000, 40, 60)
    );
    assert_eq!(g.remaining_bytes, Some(70_000));
    let raw = testrun::raw_usage(&pins, CLIENT);
    assert_eq!(
        (raw.up_tokens, raw.up_refill_ns),
        (777, 123_456),
        "shaping state kept"
    );
    assert!(
        !pp.exists() && !up_.exists(),
        "v4's client maps are unpinned"
    );
    // Metering goes on from the carried counts, through the new index.
    let f = up(CLIENT, 100);
    assert!(v
        .test_run(Hook::TcIngress, &f, 1)
        .unwrap()
        .passed(Hook::TcIngress));
    assert_eq!(
        v.gate(MacAddr(CLIENT)).unwrap().unwrap().usage.bytes_up,
        4100
    );
}

/// 8. Schema 3 → 5: a load next to schema 3's pins carries every client (gate, binding,
///    generation, counts) into the new layout without a rate, and unpins the old client
///    maps (old code: schema 3 was the current one; a v4 load started from empty maps).
#[test]
fn an_upgrade_from_schema_3_carries_clients_and_counts_over() {
    let pins = PinBase::new("v3up");
    let old = OldPins::new(&pins, "v3");
    let (pp, up_) = (old.path("TG_POLICY"), old.path("TG_USAGE"));
    old.create("TG_POLICY", "hash", 8, 112, 64);
    old.create("TG_USAGE", "array", 4, 128, 64);
    // v3 Policy: flags, generation, limits, expires, bound_ipv4, slot, bound_ipv6.
    let mut pol = Vec::new();
    pol.extend(3u32.to_le_bytes()); // ALLOWED | BIND_IPV4
    pol.extend(9u32.to_le_bytes());
    pol.extend(50_000u64.to_le_bytes());
    pol.extend(u64::MAX.to_le_bytes());
    pol.extend(u64::MAX.to_le_bytes());
    pol.extend(0u64.to_le_bytes());
    pol.extend(CL4.octets());
    pol.extend(7u32.to_le_bytes()); // slot 7
    pol.extend([0u8; 64]);
    assert_eq!(pol.len(), 112);
    // v3 Usage in slot 7: up line (bytes, packets, dropped, notified, pad), down line.
    let mut u = Vec::new();
    for v in [2000u64, 20, 55] {
        u.extend(v.to_le_bytes());
    }
    u.extend(8u32.to_le_bytes());
    u.extend(0u32.to_le_bytes());
    u.extend([0u8; 32]);
    u.extend(3000u64.to_le_bytes());
    u.extend(30u64.to_le_bytes());
    u.extend([0u8; 48]);
    assert_eq!(u.len(), 128);
    let key = [
        CLIENT[0], CLIENT[1], CLIENT[2], CLIENT[3], CLIENT[4], CLIENT[5], 0, 0,
    ];
    old.update("TG_POLICY", &key, &pol);
    old.update("TG_USAGE", &7u32.to_le_bytes(), &u);

    let mut cfg = ValveConfig::new("lo");
    cfg.pin_base = pins.path().to_path_buf();
    cfg.gateway_v4 = Some(GW4);
    let v = Valve::load(&cfg).expect("load over v3 pins");
    let g = v.gate(MacAddr(CLIENT)).unwrap().expect("carried over");
    assert!(g.open);
    assert_eq!(g.generation, 9);
    assert_eq!(g.bound_ipv4, Some(CL4));
    assert_eq!(g.rates, Rates::UNLIMITED);
    assert_eq!(
        (
            g.usage.bytes_up,
            g.usage.bytes_down,
            g.usage.packets_up,
            g.usage.packets_down
        ),
        (2000, 3000, 20, 30)
    );
    assert_eq!(g.remaining_bytes, Some(45_000));
    assert!(
        !pp.exists() && !up_.exists(),
        "v3's client maps are unpinned"
    );
    // Metering goes on from the carried counts, unshaped.
    let f = up(CLIENT, 100);
    assert!(v
        .test_run(Hook::TcIngress, &f, 1)
        .unwrap()
        .passed(Hook::TcIngress));
    assert_eq!(
        v.gate(MacAddr(CLIENT)).unwrap().unwrap().usage.bytes_up,
        2100
    );
}
