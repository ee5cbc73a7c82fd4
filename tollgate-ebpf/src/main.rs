//! tollgate's kernel data plane: per-MAC metering and gates on the LAN interface.
//!
//! ```text
//!            client ──frame──> [TC ingress | XDP]  key = source MAC,      direction UP
//!            client <──frame── [TC egress]         key = destination MAC, direction DOWN
//!
//!  every frame:  L2 group dst, non-IP or L3 group dst ───────────> pass (never forwarded)
//!                L2 group dst, unicast IP: ingress ──────────────> gated like unicast
//!                                          egress ───────────────> drop (poisoned neighbour)
//!                ARP ────────────────────────────────────────────> pass
//!  peer is the gateway:
//!                DNS, unpaid ────────────────────────────────────> per-MAC token bucket (TG_DNS)
//!                DHCP / ND / portal ports (ingress) ─────────────> pass, not metered
//!                anything from the gateway (egress) ─────────────> pass, not metered
//!  other peers:  DHCP to broadcast, ND to link-local/multicast ──> pass, not metered
//!                ND on egress: hop limit 255, link-local source ─> pass
//!  then ONE lookup: INDEX[hash(mac)] → POLICY[record] = {gate, slot} (an array walk, no helper)
//!                open, in time, within quota ────────────────────> add to USAGE[slot], pass
//!                to the gateway's own addresses (paid) ──────────> pass, not metered
//!                otherwise: portal redirect (TCP/80) / allow-list / drop (+1 event on exhaustion)
//! ```
//! The parser reads headers in 16/32/64-bit words straight from the packet and keeps the
//! addresses as words; the 16-byte allow-list key is built only for traffic without an open
//! gate. TC reads the linear area only; when the headers it needs are not all there (a
//! non-linear skb whose linear part ends inside them) it pulls them in and parses again, so
//! `bpf_skb_pull_data` never runs on the common path (TCP keeps its ≈ 66 header bytes linear).
//! The paid path reads no clock unless the gate has a deadline, and then `jiffies` (one
//! inlined load; the exact boot clock once per tick per CPU and within 20 ms of the deadline).
//!
//! TC programs return `TCX_NEXT` on a pass (later TCX programs and legacy clsact filters, e.g.
//! SQM, still run) and `TC_ACT_SHOT` on a drop; the valve attaches them first in the chain.
//! In meter-only mode (`config_flags::METER_ONLY`, the WAN side of a reseller) every frame
//! passes; IP packets from/to a MAC whose POLICY entry is `METERED` are counted in USAGE (ingress in
//! `bytes_up`, egress in `bytes_down`) with no limit or deadline, except those to/from the
//! configured gateway addresses (the upstream itself) and neighbour discovery, which the
//! upstream does not bill. Verdicts there: PassPaid = counted, PassGateway/PassGarden = the
//! exceptions, PassLink = anything else (other MACs, non-IP, unparseable).
//!
//! **Rate limits** (only for a client whose policy has a rate; an unshaped client reads no
//! clock): with `config_flags::EDT_DOWN` a download gets an Earliest Departure Time from the
//! client's virtual clock in its usage slot, written to `skb->tstamp`, which the `fq` qdisc on
//! the LAN interface honours (cilium's bandwidth manager); without it (a kernel without
//! `sch_fq`) a download is policed by a token bucket like an upload. An upload is policed by a
//! token bucket in the slot (dropped when empty, `DropRateUp`; TCP adapts). A packet dropped
//! for its rate is not metered. Both read the coarse monotonic clock from a per-CPU copy
//! refreshed once per tick (`mono_coarse_now`), not through a helper call per packet.
//!
//! ```text
//!  download: t = max(now, next)   t - now > HORIZON ──> drop (DropRateDown), clock unchanged
//!            next = t + len·1e9/rate, skb->tstamp = t
//!  upload (and download without EDT):
//!            tokens = min(burst, tokens + elapsed·rate)   tokens <= 0 ──> drop (DropRate*)
//!            tokens -= len   (a debt below zero: any packet, even one larger than the
//!                             burst, eventually passes, and the long-run rate stays exact)
//! ```
//! Both are plain read-modify-writes of the slot, not atomics: two CPUs handling the same
//! client at the same instant can both see the same state, so each such race lets one
//! packet through without its share of the rate (the clock never moves backwards by more
//! than one packet's transmission time). Approximate by at most one packet per racing CPU.
//!
//! The metered quantity is the L3 length (see `tollgate-common`). Quota checks read the
//! counters and then add atomically, so concurrent CPUs can overshoot a limit by at most one
//! packet (one wire segment's worth of an aggregate) each; the exhaustion event is claimed with
//! a compare-and-exchange on the usage entry that only ever moves the generation forward, so
//! exactly one CPU emits it per policy generation.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{
    intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering},
    mem::size_of,
};

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_MMAPABLE, BPF_NOEXIST, TC_ACT_SHOT},
    btf_maps::{lpm_trie::Key, Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    helpers::{bpf_jiffies64, bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use tollgate_common::{
    burst_for, config_flags, direction, index, policy_flags, DnsBucket, ExhaustReason, GateConfig,
    GateEvent, MacKey, Policy, Usage, Verdict, VerdictCount, DNS_BUCKETS, EVENTS_BYTES,
    GARDEN_TCP_PORTS, MAX_BOUND_V6, MAX_CLIENTS, MAX_GARDEN_PREFIXES, UNLIMITED,
};

/// Policy records, reached only through [`TG_INDEX`] (see [`policy_of`]); written by the valve
/// through a shared mapping, so mmapable.
#[btf_map]
static TG_POLICY: Array<Policy, { MAX_CLIENTS as usize }, { BPF_F_MMAPABLE as usize }> =
    Array::new();
/// The open-addressing index MAC → record (`tollgate_common::index`); sized at load time.
#[btf_map]
static TG_INDEX: Array<
    u64,
    { (index::HEADER + index::slots_for(MAX_CLIENTS) + index::MAX_PROBE) as usize },
    { BPF_F_MMAPABLE as usize },
> = Array::new();
/// Indexed by `Policy::slot`. Mmapable only for its layout: the values then start on a page
/// boundary, so every 128-byte `Usage` is cache-line aligned (its up and down halves never
/// share a line).
#[btf_map]
static TG_USAGE: Array<Usage, { MAX_CLIENTS as usize }, { BPF_F_MMAPABLE as usize }> = Array::new();
#[btf_map]
static TG_CONFIG: Array<GateConfig, 1> = Array::new();
#[btf_map]
static TG_GARDEN: LpmTrie<[u8; 16], u8, { MAX_GARDEN_PREFIXES as usize }> = LpmTrie::new();
#[btf_map]
static TG_VERDICTS: PerCpuArray<VerdictCount, { Verdict::COUNT as usize }> = PerCpuArray::new();
#[btf_map]
static TG_EVENTS: RingBuf<GateEvent, { EVENTS_BYTES as usize }> = RingBuf::new();
#[btf_map]
static TG_DNS: LruHashMap<MacKey, DnsBucket, { DNS_BUCKETS as usize }> = LruHashMap::new();
/// Per CPU, each a clock and the `jiffies` it was read at: [`CLOCK_BOOT`] the boot clock
/// (see [`boot_now_estimate`]), [`CLOCK_MONO_COARSE`] the coarse monotonic clock (see
/// [`mono_coarse_now`]).
#[btf_map]
static TG_CLOCK: PerCpuArray<[u64; 2], 2> = PerCpuArray::new();
const CLOCK_BOOT: u32 = 0;
const CLOCK_MONO_COARSE: u32 = 1;

/// Deadlines closer than this to the estimate are checked on the exact boot clock.
const CLOCK_MARGIN_NS: u64 = 20_000_000;

/// How far into the future a download may be scheduled; beyond it the packet is dropped
/// rather than queued. It bounds the queue `fq` holds for one client to `rate × 2 s` (the
/// bufferbloat a shaped client can see), and stays below `fq`'s own horizon (10 s by default),
/// so `fq` never drops, after it was metered, a packet this program passed. Cilium's value.
const HORIZON_NS: u64 = 2_000_000_000;
/// An upload bucket idle this long is full for any rate and burst that fit in `u32` (the cap
/// keeps `elapsed × rate` below 2^64: 4e9 × (2^32 − 1) < 1.85e19).
const REFILL_CAP_NS: u64 = 4_000_000_000;
const NS_PER_S: u64 = 1_000_000_000;
/// L3 length up to which a packet counts as small (a TCP ACK with timestamps and SACK
/// blocks, IPv4 or IPv6) for the rate limits: see `police` and `depart_down`.
const SMALL_PACKET: u64 = 128;
/// Largest length the EDT arithmetic takes (2^34 × 1e9 < 2^64).
const MAX_SHAPED_LEN: u64 = 1 << 34;

/// `TCX_NEXT`: pass, and let the next program in the TCX chain (or legacy tc) decide too.
const TCX_NEXT: i32 = -1;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
/// What TC pulls into the linear area when the headers are not all there: Ethernet + 2 VLAN
/// tags + IPv6 + a few extension headers + L4 ports.
const PARSE_BYTES: u32 = 128;

/// Bounds-checked view of the frame (direct packet access, shared by TC and XDP). Loads are
/// whole words (the JIT emits one unaligned load each; x86 and arm64 allow them).
#[derive(Clone, Copy)]
struct Frame {
    start: usize,
    end: usize,
}

impl Frame {
    #[inline(always)]
    fn ptr<T>(&self, off: usize) -> Option<*const T> {
        if self.start + off + size_of::<T>() > self.end {
            return None;
        }
        Some((self.start + off) as *const T)
    }

    /// A word at `off` in host order of the packet's bytes (callers convert with `from_be`).
    #[inline(always)]
    fn ld<T: Copy>(&self, off: usize) -> Option<T> {
        // SAFETY: bounds checked by `ptr`; a plain load of packet bytes (unaligned loads are
        // allowed for packet memory).
        self.ptr::<T>(off).map(|p| unsafe { *p })
    }

    /// A load from a range an earlier `ptr` check covered.
    ///
    /// # Safety
    /// `off + size_of::<T>()` must be within a range checked before on this frame.
    #[inline(always)]
    unsafe fn raw<T: Copy>(&self, off: usize) -> T {
        *((self.start + off) as *const T)
    }

    /// One byte, but bounds-checked as two: LLVM folds a one-byte check `p + 1 > end` into
    /// `p < end`, which the verifier does not accept for variable offsets. Every byte read
    /// here is followed by more header bytes in any valid packet.
    #[inline(always)]
    fn u8_at(&self, off: usize) -> Option<u8> {
        self.ld::<u16>(off).map(|w| w as u8)
    }

    #[inline(always)]
    fn be16_at(&self, off: usize) -> Option<u16> {
        self.ld::<u16>(off).map(u16::from_be)
    }
}

/// What the parser learned about a packet. Addresses are raw words in packet byte order.
struct Packet {
    /// `MacKey` of the client (source on ingress, destination on egress) as one word.
    key: u64,
    /// Destination MAC is multicast/broadcast.
    l2_group: bool,
    ethertype: u16,
    /// Metered bytes: the IP length field (capped by the frame), plus the headers every
    /// further segment of a GSO/GRO aggregate repeats; non-IP: frame length minus L2.
    l3_len: u64,
    /// Destination IP address is broadcast/multicast (IPv4 255.255.255.255 or 224/4, IPv6 ff00::/8).
    l3_group: bool,
    /// IPv6 hop limit (0 for IPv4).
    hop_limit: u8,
    /// UDP payload bytes (0 unless UDP with a header).
    udp_payload: u64,
    /// IPv4 peer (destination on ingress, source on egress) and client-side address.
    peer4: u32,
    local4: u32,
    /// IPv6 peer address as two words (IPv4: zero).
    peer6: [u64; 2],
    /// Offset of the IPv6 client-side address in the frame (read only when needed).
    local6_off: usize,
    /// L4 protocol (after IPv6 extension headers); 255 when unknown.
    proto: u8,
    /// Client port and server port (ingress: source/destination; egress: the reverse).
    sport: u16,
    dport: u16,
    /// ICMPv6 type (when proto == ICMPv6).
    icmp_type: u8,
    /// L4 header was found (not a non-first fragment, not an unknown/opaque chain).
    l4: bool,
}

impl Packet {
    #[inline(always)]
    fn v4(&self) -> bool {
        self.ethertype == ETH_P_IP
    }

    #[inline(always)]
    fn v6(&self) -> bool {
        self.ethertype == ETH_P_IPV6
    }

    #[inline(always)]
    fn mac(&self) -> [u8; 6] {
        let b = self.key.to_le_bytes();
        [b[0], b[1], b[2], b[3], b[4], b[5]]
    }

    #[inline(always)]
    fn mac_key(&self) -> MacKey {
        MacKey::new(self.mac())
    }

    /// First two bytes of the IPv6 peer address.
    #[inline(always)]
    fn peer6_b0(&self) -> u8 {
        self.peer6[0] as u8
    }

    #[inline(always)]
    fn peer6_link_local(&self) -> bool {
        self.peer6[0] as u8 == 0xfe && (self.peer6[0] >> 8) as u8 & 0xc0 == 0x80
    }

    /// The peer as the allow-list key (IPv4 as ::ffff:a.b.c.d). Built only off the paid path.
    #[inline(always)]
    fn peer16(&self) -> [u8; 16] {
        if self.v4() {
            let a = self.peer4.to_le_bytes();
            [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
            ]
        } else {
            let h = self.peer6[0].to_le_bytes();
            let l = self.peer6[1].to_le_bytes();
            [
                h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], l[0], l[1], l[2], l[3], l[4], l[5],
                l[6], l[7],
            ]
        }
    }
}

/// Parses Ethernet (+ up to two 802.1Q/802.1ad tags), IPv4 or IPv6 (+ extension headers) and
/// the L4 ports. `segs` is the skb's `gso_segs` (0/1 for a single packet). `Err(())` =
/// truncated/malformed headers (or, in TC, headers beyond the linear area).
#[inline(always)]
fn parse(f: &Frame, total_len: u64, segs: u32, dir: u8) -> Result<Packet, ()> {
    f.ptr::<[u8; ETH_HLEN]>(0).ok_or(())?;
    // SAFETY: the Ethernet header was checked just above.
    let (d0, d4, s6, s8, et) = unsafe {
        (
            f.raw::<u32>(0),
            f.raw::<u16>(4),
            f.raw::<u16>(6),
            f.raw::<u32>(8),
            f.raw::<u16>(12),
        )
    };
    let mut off = ETH_HLEN;
    let mut ethertype = u16::from_be(et);
    // Tagged frames are classified by their inner protocol, so a tag never hides a packet.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = f.be16_at(off + 2).ok_or(())?;
        off += 4;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            ethertype = f.be16_at(off + 2).ok_or(())?;
            off += 4;
            if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
                return Err(()); // three tags: refuse rather than guess
            }
        }
    }
    // The MacKey (6 address bytes + 2 zero bytes) as one little-endian word.
    let key = if dir == direction::UP {
        s6 as u64 | (s8 as u64) << 16
    } else {
        d0 as u64 | (d4 as u64) << 32
    };
    let mut p = Packet {
        key,
        l2_group: d0 & 1 != 0,
        ethertype,
        l3_len: total_len.saturating_sub(off as u64),
        l3_group: false,
        hop_limit: 0,
        udp_payload: 0,
        peer4: 0,
        local4: 0,
        peer6: [0; 2],
        local6_off: 0,
        proto: 255,
        sport: 0,
        dport: 0,
        icmp_type: 0,
        l4: false,
    };
    let l4_off;
    // Bytes after the L2 header in this skb (the aggregate, for GSO/GRO).
    let frame_l3 = p.l3_len;
    if ethertype == ETH_P_IP {
        // The fixed header in one check; options are checked with the L4 header.
        f.ptr::<[u8; 20]>(off).ok_or(())?;
        // SAFETY: the 20-byte header was checked just above.
        let (w0, w1, w2, s, d) = unsafe {
            (
                u32::from_be(f.raw::<u32>(off)),
                u32::from_be(f.raw::<u32>(off + 4)),
                u32::from_be(f.raw::<u32>(off + 8)),
                f.raw::<u32>(off + 12),
                f.raw::<u32>(off + 16),
            )
        };
        let ihl = ((w0 >> 24) & 0x0f) as usize * 4;
        if w0 >> 28 != 4 || ihl < 20 {
            return Err(());
        }
        let tot = (w0 & 0xffff) as u64;
        // The IP length, not the frame: Ethernet padding is not IP. Zero (BIG TCP) or a
        // length beyond the frame falls back to the frame.
        if tot != 0 && tot < frame_l3 {
            if tot < ihl as u64 {
                return Err(());
            }
            p.l3_len = tot;
        }
        p.proto = (w2 >> 16) as u8;
        let (local, peer) = if dir == direction::UP { (s, d) } else { (d, s) };
        p.local4 = local;
        p.peer4 = peer;
        // In packet byte order the first address byte is the low byte of the word.
        p.l3_group = d & 0xf0 == 0xe0 || d == u32::MAX;
        if w1 & 0x1fff != 0 {
            return Ok(p); // non-first fragment: no L4 header to classify
        }
        l4_off = off + ihl;
    } else if ethertype == ETH_P_IPV6 {
        f.ptr::<[u8; 40]>(off).ok_or(())?;
        // SAFETY: the 40-byte header was checked just above.
        let (w0, w1, s, d) = unsafe {
            (
                u32::from_be(f.raw::<u32>(off)),
                u32::from_be(f.raw::<u32>(off + 4)),
                f.raw::<[u64; 2]>(off + 8),
                f.raw::<[u64; 2]>(off + 24),
            )
        };
        if w0 >> 28 != 6 {
            return Err(());
        }
        let plen = (w1 >> 16) as u64;
        if plen != 0 && plen + 40 < frame_l3 {
            p.l3_len = plen + 40;
        }
        p.hop_limit = w1 as u8;
        if dir == direction::UP {
            p.peer6 = d;
            p.local6_off = off + 8;
        } else {
            p.peer6 = s;
            p.local6_off = off + 24;
        }
        p.l3_group = d[0] as u8 == 0xff;
        let mut nh = (w1 >> 8) as u8;
        let mut o = off + 40;
        // Walk extension headers so a chain of them cannot disguise the L4 protocol.
        let mut i = 0;
        while i < 6 {
            match nh {
                0 | 43 | 60 => {
                    let w = f.be16_at(o).ok_or(())?;
                    nh = (w >> 8) as u8;
                    o += ((w & 0xff) as usize + 1) * 8;
                }
                44 => {
                    let w = f.ld::<u32>(o).ok_or(())?;
                    let w = u32::from_be(w);
                    nh = (w >> 24) as u8;
                    o += 8;
                    if w & 0xfff8 != 0 {
                        p.proto = nh;
                        return Ok(p); // non-first fragment
                    }
                }
                51 => {
                    let w = f.be16_at(o).ok_or(())?;
                    nh = (w >> 8) as u8;
                    o += ((w & 0xff) as usize + 2) * 4;
                }
                _ => break,
            }
            i += 1;
        }
        p.proto = nh;
        if matches!(nh, 0 | 43 | 44 | 51 | 60) {
            return Ok(p); // chain too long to follow: L4 unknown
        }
        l4_off = o;
    } else {
        return Ok(p);
    }
    // L3 + L4 headers: what every segment of an aggregate repeats.
    let mut hdrs = (l4_off - off) as u64;
    match p.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let w = u32::from_be(f.ld::<u32>(l4_off).ok_or(())?);
            let (a, b) = ((w >> 16) as u16, w as u16);
            if dir == direction::UP {
                p.sport = a;
                p.dport = b;
            } else {
                // On egress keep the client's view: `dport` is the server's port.
                p.sport = b;
                p.dport = a;
            }
            if p.proto == IPPROTO_TCP {
                let doff = f.u8_at(l4_off + 12).ok_or(())?;
                hdrs += ((doff >> 4) as u64) * 4;
            } else {
                hdrs += 8;
                p.udp_payload = p.l3_len.saturating_sub(hdrs);
            }
            p.l4 = true;
        }
        IPPROTO_ICMPV6 => {
            p.icmp_type = f.u8_at(l4_off).ok_or(())?;
            p.l4 = true;
        }
        _ => {}
    }
    if segs > 1 {
        // Each segment after the first carries its own copy of the headers on the wire.
        p.l3_len = p
            .l3_len
            .saturating_add(((segs - 1) as u64).saturating_mul(hdrs));
    }
    Ok(p)
}

/// The gateway's IPv6 address `i` as two words (zero = none).
#[inline(always)]
fn gw6(cfg: &GateConfig, i: usize) -> [u64; 2] {
    // SAFETY: reading 16 bytes of the config value as two words (the value is 8-aligned in
    // the map and `gateway_v6` sits at offset 24).
    unsafe { *(cfg.gateway_v6[i].as_ptr() as *const [u64; 2]) }
}

#[inline(always)]
fn is_gateway6(cfg: &GateConfig, a: [u64; 2]) -> bool {
    let g0 = gw6(cfg, 0);
    let g1 = gw6(cfg, 1);
    (g0 != [0; 2] && a == g0) || (g1 != [0; 2] && a == g1)
}

/// Is the peer (destination on ingress, source on egress) one of the gateway's addresses?
#[inline(always)]
fn peer_is_gateway(cfg: &GateConfig, p: &Packet) -> bool {
    if p.v4() {
        let g = u32::from_ne_bytes(cfg.gateway_v4);
        return g != 0 && p.peer4 == g;
    }
    is_gateway6(cfg, p.peer6)
}

/// Is the client-side address one of the configured gateway addresses? (Meter-only mode:
/// there the "client" is the upstream.)
#[inline(always)]
fn local_is_gateway(cfg: &GateConfig, f: &Frame, p: &Packet) -> bool {
    if p.v4() {
        let g = u32::from_ne_bytes(cfg.gateway_v4);
        return g != 0 && p.local4 == g;
    }
    match f.ld::<[u64; 2]>(p.local6_off) {
        Some(a) => is_gateway6(cfg, a),
        None => false,
    }
}

#[inline(always)]
fn tcp_port_open(cfg: &GateConfig, port: u16) -> bool {
    let mut i = 0;
    while i < GARDEN_TCP_PORTS {
        if cfg.tcp_ports[i] != 0 && cfg.tcp_ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

/// Link-local infrastructure every client needs before paying: DHCP, neighbour discovery,
/// and the portal/payment ports on the gateway. Never metered. Only on ingress; the
/// gateway's answers are covered by "from the gateway" on egress. DNS is handled before.
#[inline(always)]
fn local_garden(cfg: &GateConfig, p: &Packet, to_gw: bool) -> bool {
    if !p.l4 {
        return false;
    }
    match p.proto {
        IPPROTO_UDP => {
            // p.sport/dport are (client port, server port) on ingress.
            if p.v4() && p.dport == 67 {
                return to_gw || p.peer4 == u32::MAX;
            }
            if p.v6() && p.dport == 547 {
                return to_gw || p.peer6_b0() == 0xff;
            }
            false
        }
        IPPROTO_TCP => to_gw && p.dport != 53 && tcp_port_open(cfg, p.dport),
        // ICMPv6 only inside IPv6 (protocol 58 in IPv4 is no neighbour discovery).
        IPPROTO_ICMPV6 if p.v6() => {
            // RS, RA, NS, NA, redirect — only to link-local/multicast/the gateway, so ND
            // cannot be used as a tunnel to a routed destination.
            (133..=137).contains(&p.icmp_type)
                && (p.peer6_b0() == 0xff || p.peer6_link_local() || to_gw)
        }
        _ => false,
    }
}

/// Is the IPv6 source of an upload one of the gate's bound addresses? A link-local source
/// passes only towards the gateway itself (it cannot be routed anywhere else).
#[inline(always)]
fn bound_v6(f: &Frame, p: &Packet, bound: &[[u8; 16]; MAX_BOUND_V6], to_gw: bool) -> bool {
    let Some(src) = f.ld::<[u64; 2]>(p.local6_off) else {
        return false;
    };
    if to_gw && src[0] as u8 == 0xfe && (src[0] >> 8) as u8 & 0xc0 == 0x80 {
        return true;
    }
    let mut i = 0;
    while i < MAX_BOUND_V6 {
        // SAFETY: 16 bytes of the policy value read as two words (8-aligned in the map).
        let b = unsafe { *(bound[i].as_ptr() as *const [u64; 2]) };
        if b != [0; 2] && b == src {
            return true;
        }
        i += 1;
    }
    false
}

/// ICMPv6 router/neighbour discovery (RS, RA, NS, NA, redirect).
#[inline(always)]
fn is_nd(p: &Packet) -> bool {
    p.v6() && p.proto == IPPROTO_ICMPV6 && p.l4 && (133..=137).contains(&p.icmp_type)
}

/// `CLOCK_BOOTTIME` at this CPU's last exact reading, taken again whenever `jiffies` has
/// moved since (the verifier inlines `bpf_jiffies64` into one load, where the boot clock
/// costs tens of ns in a VM). The estimate never runs ahead of the boot clock and trails it
/// by less than one tick (≤ 10 ms at HZ ≥ 100), which the caller's margin covers.
#[inline(always)]
fn boot_now_estimate() -> u64 {
    // SAFETY: helper without preconditions.
    once_per_tick(CLOCK_BOOT, || unsafe { bpf_ktime_get_boot_ns() })
}

/// The coarse `CLOCK_MONOTONIC` (what `bpf_ktime_get_coarse_ns` returns) for the rate
/// limits, read through the helper once per tick per CPU and otherwise from this CPU's copy:
/// the helper call costs ≈ 13 ns here (measured: most of what shaping added), the copy two
/// inlined loads. The coarse clock only moves at a tick, so the copy is what the helper
/// would return, except in the instant between a tick's `jiffies` update and its clock
/// update: a reading that has not moved since the copy is then not kept (the next packet
/// reads again), and one kept from that instant trails by at most one more tick.
#[inline(always)]
fn mono_coarse_now() -> u64 {
    // SAFETY: helper without preconditions.
    once_per_tick(CLOCK_MONO_COARSE, || unsafe { bpf_ktime_get_coarse_ns() })
}

/// `read()` at most once per tick on this CPU: the copy in `TG_CLOCK[entry]` while `jiffies`
/// has not moved since it was taken, else a fresh reading. A reading equal to the copy is
/// returned but not kept (see [`mono_coarse_now`]; the boot clock always moves between two
/// readings, so for it this never happens).
#[inline(always)]
fn once_per_tick(entry: u32, read: impl Fn() -> u64) -> u64 {
    // SAFETY: helper without preconditions (inlined by the verifier into one load).
    let j = unsafe { bpf_jiffies64() };
    let Some(c) = TG_CLOCK.get_ptr_mut(entry) else {
        return read();
    };
    // SAFETY: per-CPU value, only this CPU touches it while the program runs.
    unsafe {
        let [ns, at] = *c;
        if ns != 0 && at == j {
            return ns;
        }
        let now = read();
        *c = [now, if now != ns { j } else { 0 }];
        now
    }
}

/// `key`'s policy record (`key` a `MacKey::word`), through the index: the hash (two
/// multiplies), then a walk from the home entry until an empty one (at most `MAX_PROBE`
/// entries, usually one), every load an array index (inlined by the verifier, no helper
/// call). A fingerprint match counts only when the record holds this very MAC.
#[inline(always)]
fn policy_of(key: u64) -> Option<*const Policy> {
    // The home entry inline (nearly every lookup ends there); the rest of the walk in a
    // global function.
    let seed = *TG_INDEX.get(0)?;
    let (home, fp) = index::hash(key, seed, *TG_INDEX.get(1)?);
    // SAFETY: a live array value; one aligned word load (userspace stores it atomically).
    let e = unsafe { core::ptr::read_volatile(TG_INDEX.get_ptr(index::HEADER + home as u32)?) };
    if e == 0 || seed == 0 {
        return None;
    }
    if e >> index::RECORD_BITS == fp {
        if let Some(r) = index::record(e) {
            let p = TG_POLICY.get_ptr(r)?;
            // SAFETY: a live array value, published whole before its entry.
            if unsafe { (*p).mac } == key {
                return Some(p);
            }
        }
    }
    TG_POLICY.get_ptr(tollgate_find_record(key))
}

/// The walk of [`policy_of`]: the record's index, or `u32::MAX` (beyond any array) when `key`
/// has none.
///
/// A global function: the verifier checks it once on its own, instead of once for every
/// state the parser can reach its call with (the walk's 32 iterations times those states
/// exceeds the verifier's budget). It costs a BPF-to-BPF call.
#[no_mangle]
#[inline(never)]
pub extern "C" fn tollgate_find_record(key: u64) -> u32 {
    let Some(&seed) = TG_INDEX.get(0) else {
        return u32::MAX;
    };
    let Some(&shift) = TG_INDEX.get(1) else {
        return u32::MAX;
    };
    if seed == 0 {
        return u32::MAX;
    }
    let (home, fp) = index::hash(key, seed, shift);
    let start = index::HEADER + home as u32;
    for pos in start..start + index::MAX_PROBE {
        let Some(e) = TG_INDEX.get_ptr(pos) else {
            return u32::MAX;
        };
        // SAFETY: a live array value; one aligned word load (userspace stores it atomically).
        let e = unsafe { core::ptr::read_volatile(e) };
        if e == 0 {
            return u32::MAX;
        }
        if e >> index::RECORD_BITS == fp {
            if let Some(r) = index::record(e) {
                if let Some(p) = TG_POLICY.get_ptr(r) {
                    // SAFETY: a live array value, published whole before its entry.
                    if unsafe { (*p).mac } == key {
                        return r;
                    }
                }
            }
        }
    }
    u32::MAX
}

/// Does `key` have an open gate, before its deadline and below its total limit right now?
/// (Only asked for DNS, off the metered fast path.)
#[inline(always)]
fn paid_now(key: u64) -> bool {
    let pol = match policy_of(key) {
        Some(pol) => pol,
        None => return false,
    };
    // SAFETY: `pol` points into a live map value; plain field reads.
    let (flags, expires, slot, limit) = unsafe {
        (
            (*pol).flags,
            (*pol).expires_at_ns,
            (*pol).slot,
            (*pol).limit_total,
        )
    };
    if flags & policy_flags::ALLOWED == 0 {
        return false;
    }
    // SAFETY: helper without preconditions.
    if expires != 0 && unsafe { bpf_ktime_get_boot_ns() } >= expires {
        return false;
    }
    match TG_USAGE.get_ptr(slot) {
        // SAFETY: aligned u64 reads of a live map value.
        Some(u) => unsafe { (*u).bytes_up.saturating_add((*u).bytes_down) < limit },
        None => false,
    }
}

/// Takes `len` bytes from the DNS bucket of `key`. A query (`strict`) needs the tokens and
/// takes nothing when they are missing; an answer always passes and may leave a debt.
/// Concurrent CPUs update the bucket without atomics, so each may admit one query extra.
#[inline(always)]
fn dns_take(cfg: &GateConfig, key: &MacKey, len: u64, strict: bool) -> bool {
    // SAFETY: helper without preconditions.
    let now_ms = unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000;
    let burst = cfg.dns_burst as i64;
    let b = match TG_DNS.get_ptr_mut(key) {
        Some(b) => b,
        None => {
            let fresh = DnsBucket {
                tokens: burst,
                last_ms: now_ms,
            };
            let _ = TG_DNS.insert(key, fresh, BPF_NOEXIST as u64);
            match TG_DNS.get_ptr_mut(key) {
                Some(b) => b,
                None => return !strict,
            }
        }
    };
    // SAFETY: `b` points into a live map value; plain reads and writes (see above).
    unsafe {
        let mut tokens = (*b).tokens;
        let last = (*b).last_ms;
        if now_ms > last {
            // Capped so the product cannot overflow; a day refills any bucket.
            let elapsed = if now_ms - last > 86_400_000 {
                86_400_000
            } else {
                now_ms - last
            };
            let refill = (elapsed * cfg.dns_rate as u64 / 1000) as i64;
            if refill > 0 {
                tokens = if tokens + refill > burst {
                    burst
                } else {
                    tokens + refill
                };
                (*b).last_ms = now_ms;
            }
        }
        let len = len as i64;
        if strict && tokens < len {
            (*b).tokens = tokens;
            return false;
        }
        (*b).tokens = tokens - len;
    }
    true
}

#[inline(always)]
fn allow_listed(p: &Packet) -> bool {
    let key = Key::new(128, p.peer16());
    TG_GARDEN.get(&key).is_some()
}

#[inline(always)]
fn count(v: Verdict, bytes: u64) {
    if let Some(c) = TG_VERDICTS.get_ptr_mut(v as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Emits the exhaustion event unless another CPU already did for this policy generation.
/// Generations only move forward (modulo 2^32, skipping 0): a CPU holding a stale policy
/// can never move `notified_generation` back and so make a later generation fire twice.
#[inline(always)]
fn exhausted(p: &Packet, generation: u32, u: *mut Usage, reason: ExhaustReason, dir: u8) {
    // SAFETY: `u` points into a live array value; aligned u32 read.
    let cur = unsafe { core::ptr::read_volatile(&raw const (*u).notified_generation) };
    if (generation.wrapping_sub(cur) as i32) <= 0 {
        return; // already notified for this generation or a newer one
    }
    // SAFETY: `u` points into a live array value; the exchange is atomic across CPUs.
    let (_, won) = unsafe {
        atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*u).notified_generation,
            cur,
            generation,
        )
    };
    if !won {
        return; // another CPU claimed this generation (or a newer one) meanwhile
    }
    // SAFETY: plain reads of counters (torn values are impossible for aligned u64).
    let (up, down, pup) = unsafe { ((*u).bytes_up, (*u).bytes_down, (*u).packets_up) };
    let ev = GateEvent {
        mac: p.mac(),
        reason: reason as u8,
        direction: dir,
        generation,
        _pad: 0,
        bytes_up: up,
        bytes_down: down,
        packets_up: pup,
        // SAFETY: helper without preconditions.
        at_ns: unsafe { bpf_ktime_get_boot_ns() },
    };
    // A full ring loses the event; the chandler also reconciles from the maps periodically.
    let _ = TG_EVENTS.output(ev, 0);
}

/// Counts one metered packet of `len` L3 bytes in direction `dir`: two atomic adds on the
/// direction's own cache line of the slot.
#[inline(always)]
fn add_usage(u: *mut Usage, dir: u8, len: u64) {
    // SAFETY: atomic adds on a live map value; the return values are unused.
    unsafe {
        if dir == direction::UP {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*u).bytes_up, len);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*u).packets_up, 1);
        } else {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*u).bytes_down, len);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*u).packets_down, 1);
        }
    }
}

/// Result of the decision: verdict and, for portal redirects, the mark to set.
struct Decision {
    verdict: Verdict,
    mark: u32,
    /// EDT departure time (CLOCK_MONOTONIC ns) to write to `skb->tstamp`; 0 = untouched.
    tstamp: u64,
}

#[inline(always)]
fn verdict(v: Verdict) -> Decision {
    Decision {
        verdict: v,
        mark: 0,
        tstamp: 0,
    }
}

/// The decision and the frame's metered size (for the verdict counters).
struct Outcome {
    d: Decision,
    l3_len: u64,
    /// The headers could not be parsed (TC: maybe only because they are not linear).
    unparsed: bool,
}

/// The client is not entitled to general access: portal redirect, allow-list or `reason`.
#[inline(always)]
fn not_entitled(cfg: &GateConfig, p: &Packet, dir: u8, skb_mark: u32, reason: Verdict) -> Decision {
    if cfg.flags & config_flags::PORTAL_REDIRECT != 0 && p.l4 && p.proto == IPPROTO_TCP {
        // Ingress: the client's plain-HTTP request is marked and redirected locally.
        // Egress: only the local portal's answers (which carry the mark through
        // tcp_fwmark_accept) pass; a real port-80 server can never reach the client.
        if p.dport == 80 && dir == direction::UP {
            return Decision {
                verdict: Verdict::PassPortal,
                mark: cfg.portal_mark,
                tstamp: 0,
            };
        }
        if p.dport == 80 && dir == direction::DOWN && skb_mark == cfg.portal_mark && skb_mark != 0 {
            return verdict(Verdict::PassPortal);
        }
    }
    if (p.v4() || p.v6()) && allow_listed(p) {
        return verdict(Verdict::PassGarden);
    }
    verdict(reason)
}

/// Meter-only mode: count what a registered MAC sends and receives, never drop.
#[inline(always)]
fn meter_only(cfg: &GateConfig, f: &Frame, p: &Packet, dir: u8) -> Decision {
    if !(p.v4() || p.v6()) {
        return verdict(Verdict::PassLink);
    }
    // The client-side address is the far end in both directions (source on ingress,
    // destination on egress).
    if local_is_gateway(cfg, f, p) {
        return verdict(Verdict::PassGateway);
    }
    if is_nd(p) {
        return verdict(Verdict::PassGarden);
    }
    let slot = match policy_of(p.key) {
        // SAFETY: `pol` points into a live map value.
        Some(pol) if unsafe { (*pol).flags } & policy_flags::METERED != 0 => unsafe { (*pol).slot },
        _ => return verdict(Verdict::PassLink),
    };
    let u = match TG_USAGE.get_ptr_mut(slot) {
        Some(u) => u,
        None => return verdict(Verdict::PassLink),
    };
    add_usage(u, dir, p.l3_len);
    verdict(Verdict::PassPaid)
}

/// The whole decision for one frame, with its metered size.
#[inline(always)]
fn decide(f: &Frame, total_len: u64, segs: u32, dir: u8, skb_mark: u32) -> Outcome {
    match parse(f, total_len, segs, dir) {
        Ok(p) => Outcome {
            d: decide_packet(f, &p, dir, skb_mark),
            l3_len: p.l3_len,
            unparsed: false,
        },
        Err(()) => {
            // Off the hot path: only unparseable frames pay for this config read.
            let d = match TG_CONFIG.get(0) {
                Some(c) if c.flags & config_flags::METER_ONLY != 0 => verdict(Verdict::PassLink),
                _ => verdict(Verdict::DropMalformed),
            };
            Outcome {
                d,
                l3_len: total_len.saturating_sub(ETH_HLEN as u64),
                unparsed: true,
            }
        }
    }
}

#[inline(always)]
fn decide_packet(f: &Frame, p: &Packet, dir: u8, skb_mark: u32) -> Decision {
    let ip = p.v4() || p.v6();
    if p.l2_group {
        // Link-wide traffic stays on the segment. Unicast IP in a group frame is a poisoned
        // neighbour entry (egress) or a way around the gate (ingress): gate it like unicast.
        if !ip || p.l3_group {
            return verdict(Verdict::PassMulticast);
        }
        if dir == direction::DOWN {
            // Off the hot path: only these frames pay for this config read. A meter never
            // drops anything.
            return match TG_CONFIG.get(0) {
                Some(c) if c.flags & config_flags::METER_ONLY != 0 => verdict(Verdict::PassLink),
                _ => verdict(Verdict::DropGroupUnicast),
            };
        }
    }
    if p.ethertype == ETH_P_ARP {
        return verdict(Verdict::PassLink);
    }
    let cfg = match TG_CONFIG.get(0) {
        Some(c) if c.flags & config_flags::CONFIGURED != 0 => c,
        // Not configured yet: nothing but link traffic (handled above) passes.
        _ => return verdict(Verdict::DropUnpaid),
    };
    if cfg.flags & config_flags::METER_ONLY != 0 {
        return meter_only(cfg, f, p, dir);
    }
    let mut to_gw = false;
    if ip {
        to_gw = peer_is_gateway(cfg, p);
        if to_gw {
            // The garden lives on the gateway: only its traffic pays for these checks.
            if p.l4 && (p.proto == IPPROTO_UDP || p.proto == IPPROTO_TCP) && p.dport == 53 {
                // Every client may resolve names; an unpaid one only within its DNS budget,
                // so DNS cannot carry a tunnel. Never metered.
                let key = p.mac_key();
                if cfg.flags & config_flags::DNS_BUDGET != 0 && !paid_now(p.key) {
                    if dir == direction::UP {
                        if p.proto == IPPROTO_UDP && p.udp_payload > cfg.dns_max_udp as u64 {
                            return verdict(Verdict::DropDnsBudget);
                        }
                        if !dns_take(cfg, &key, p.l3_len, true) {
                            return verdict(Verdict::DropDnsBudget);
                        }
                    } else {
                        dns_take(cfg, &key, p.l3_len, false);
                    }
                }
                return verdict(if dir == direction::UP {
                    Verdict::PassGarden
                } else {
                    Verdict::PassGateway
                });
            }
            if dir == direction::DOWN {
                // The gateway's own traffic (DHCP/portal answers, RAs) is never billed.
                return verdict(Verdict::PassGateway);
            }
            if local_garden(cfg, p, true) {
                return verdict(Verdict::PassGarden);
            }
        } else if dir == direction::UP {
            if p.l4 && local_garden(cfg, p, false) {
                return verdict(Verdict::PassGarden);
            }
        } else if is_nd(p) && p.hop_limit == 255 && p.peer6_link_local() {
            // Neighbour discovery only as RFC 4861 sends it: hop limit 255 (never forwarded)
            // from a link-local source, so no routed host can push payload inside ND.
            return verdict(Verdict::PassGarden);
        }
    }
    // The one lookup of the paid path (the index); the counters are an array index away.
    let pol = match policy_of(p.key) {
        Some(pol) => pol,
        None => return not_entitled(cfg, p, dir, skb_mark, Verdict::DropUnpaid),
    };
    // SAFETY: `pol` points into a live map value; userspace replaces values whole, and only
    // the fields needed are read.
    let (flags, slot) = unsafe { ((*pol).flags, (*pol).slot) };
    if flags & policy_flags::ALLOWED == 0 {
        return not_entitled(cfg, p, dir, skb_mark, Verdict::DropUnpaid);
    }
    if dir == direction::UP
        && flags & policy_flags::BIND_IPV4 != 0
        && p.v4()
        // SAFETY: as above.
        && p.local4 != u32::from_ne_bytes(unsafe { (*pol).bound_ipv4 })
    {
        return verdict(Verdict::DropSpoofed);
    }
    if dir == direction::UP && flags & policy_flags::BIND_IPV6 != 0 && p.v6() {
        // SAFETY: as above.
        if !bound_v6(f, p, unsafe { &(*pol).bound_ipv6 }, to_gw) {
            return verdict(Verdict::DropSpoofed);
        }
    }
    if to_gw {
        // Only reachable on ingress (egress from the gateway returned above).
        return verdict(Verdict::PassGateway);
    }
    let u = match TG_USAGE.get_ptr_mut(slot) {
        Some(u) => u,
        None => return verdict(Verdict::DropNoSlot),
    };
    // SAFETY: as above.
    let expires = unsafe { (*pol).expires_at_ns };
    if expires != 0 && boot_now_estimate().saturating_add(CLOCK_MARGIN_NS) >= expires {
        // Near or past the deadline: decide on the exact clock.
        // SAFETY: helper without preconditions.
        let now = unsafe { bpf_ktime_get_boot_ns() };
        if now >= expires {
            // SAFETY: as above.
            exhausted(
                p,
                unsafe { (*pol).generation },
                u,
                ExhaustReason::Expired,
                dir,
            );
            return not_entitled(cfg, p, dir, skb_mark, Verdict::DropExpired);
        }
    }
    let len = p.l3_len;
    // SAFETY: as above.
    let (limit_total, limit_dir) = unsafe {
        (
            (*pol).limit_total,
            if dir == direction::UP {
                (*pol).limit_up
            } else {
                (*pol).limit_down
            },
        )
    };
    // SAFETY: aligned u64 reads of a live array value. The other direction's line is read
    // only for a total limit.
    let (mine, other) = unsafe {
        if dir == direction::UP {
            (
                (*u).bytes_up,
                if limit_total != UNLIMITED {
                    (*u).bytes_down
                } else {
                    0
                },
            )
        } else {
            (
                (*u).bytes_down,
                if limit_total != UNLIMITED {
                    (*u).bytes_up
                } else {
                    0
                },
            )
        }
    };
    let over = if limit_total != UNLIMITED
        && mine.saturating_add(other).saturating_add(len) > limit_total
    {
        Some(ExhaustReason::Quota)
    } else if mine.saturating_add(len) > limit_dir {
        Some(if dir == direction::UP {
            ExhaustReason::QuotaUp
        } else {
            ExhaustReason::QuotaDown
        })
    } else {
        None
    };
    if let Some(reason) = over {
        // SAFETY: as above.
        exhausted(p, unsafe { (*pol).generation }, u, reason, dir);
        // SAFETY: atomic add on a live map value.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*u).bytes_dropped, len)
        };
        return not_entitled(cfg, p, dir, skb_mark, Verdict::DropQuota);
    }
    // SAFETY: as above (the rates sit next to the fields read already).
    let rate = unsafe {
        if dir == direction::UP {
            (*pol).rate_up
        } else {
            (*pol).rate_down
        }
    };
    let mut tstamp = 0;
    if rate != 0 {
        if dir == direction::UP {
            // SAFETY: as above; the bucket is on the upload line of the slot.
            let ok = unsafe {
                police(
                    &raw mut (*u).up_tokens,
                    &raw mut (*u).up_refill_ns,
                    len,
                    rate,
                    burst_for(rate),
                )
            };
            if !ok {
                return verdict(Verdict::DropRateUp);
            }
        } else if cfg.flags & config_flags::EDT_DOWN != 0 {
            match depart_down(u, len, rate) {
                Some(t) => tstamp = t,
                None => return verdict(Verdict::DropRateDown),
            }
        } else {
            // SAFETY: as above; the bucket is on the download line of the slot.
            let ok = unsafe {
                police(
                    &raw mut (*u).down_tokens,
                    &raw mut (*u).down_refill_ns,
                    len,
                    rate,
                    burst_for(rate),
                )
            };
            if !ok {
                return verdict(Verdict::DropRateDown);
            }
        }
    }
    add_usage(u, dir, len);
    Decision {
        verdict: Verdict::PassPaid,
        mark: 0,
        tstamp,
    }
}

/// EDT for a download of `len` L3 bytes at `rate` bytes/s: its departure time, the client's
/// virtual clock moved on by its transmission time; `None` beyond the horizon (the clock does
/// not move, so a dropped packet costs the client no time).
#[inline(always)]
fn depart_down(u: *mut Usage, len: u64, rate: u32) -> Option<u64> {
    // CLOCK_MONOTONIC (the clock `fq` compares with), coarse, from this CPU's copy: no clock
    // read (≈ 30 ns in a VM) and no helper call; it trails the exact clock by at most one
    // tick, so a departure is at most a tick early (fq sends it now) and a client coming
    // back from idle gains at most one tick's worth of its rate.
    let now = mono_coarse_now();
    // SAFETY: `u` points into a live array value; aligned u64 read (see the module doc on
    // races between CPUs).
    let next = unsafe { core::ptr::read_volatile(&raw const (*u).down_next_ns) };
    let t = if next > now { next } else { now };
    if t - now > HORIZON_NS {
        return None;
    }
    // A small packet (an ACK of the client's upload) leaves now instead of behind the
    // client's queued download, but still moves the clock (is charged): a flood of small
    // packets reaches the horizon and is dropped like any other.
    let depart = if len <= SMALL_PACKET { now } else { t };
    // `len` is below 2^33 (an skb's u32 length plus headers of at most 65 535 segments);
    // capped anyway so the product stays below 2^64 (no 128-bit multiply in BPF). `rate` is
    // non-zero.
    let len = if len > MAX_SHAPED_LEN {
        MAX_SHAPED_LEN
    } else {
        len
    };
    let delay = len * NS_PER_S / rate as u64;
    // SAFETY: as above; aligned u64 write.
    unsafe { core::ptr::write_volatile(&raw mut (*u).down_next_ns, t.saturating_add(delay)) };
    Some(depart)
}

/// Token-bucket policing of `len` L3 bytes at `rate` bytes/s with `burst` bytes (the bucket
/// is `*tokens`, last refilled at `*refill_ns`): passes while the bucket holds anything,
/// taking `len` (possibly into debt).
///
/// # Safety
/// Both pointers point into a live USAGE value.
#[inline(always)]
unsafe fn police(tokens_p: *mut i64, refill_p: *mut u64, len: u64, rate: u32, burst: u32) -> bool {
    // Coarse CLOCK_MONOTONIC (see `depart_down`): the refill is counted in whole ticks,
    // which loses nothing (the remainder is kept).
    let now = mono_coarse_now();
    let burst = burst as i64;
    // SAFETY: the caller's pointers; aligned reads and writes of one direction's line (see
    // the module doc on races between CPUs).
    unsafe {
        let mut tokens = *tokens_p;
        let last = *refill_p;
        if last == 0 || now.wrapping_sub(last) >= REFILL_CAP_NS {
            // First use, or idle long enough to fill any bucket.
            tokens = burst;
            *refill_p = now;
        } else {
            let prod = (now - last) * rate as u64; // < 2^64: see REFILL_CAP_NS
            let refill = prod / NS_PER_S;
            if refill > 0 {
                // Credit whole bytes only and keep the remainder's time for the next refill,
                // so frequent small refills do not lose rate to rounding.
                *refill_p = now - (prod % NS_PER_S) / rate as u64;
                tokens = if tokens >= burst || refill >= (burst - tokens) as u64 {
                    burst
                } else {
                    tokens + refill as i64
                };
            }
        }
        // A small packet (a TCP ACK of the other direction's transfer) may take the bucket
        // into debt down to -burst: dropping the ACKs of a download because the client's
        // upload is saturated would stall the download (measured: a 2 Mbit/s upload fell to
        // 1.3 with a download beside it). Still charged, so a flood of small packets gains
        // at most one burst over the rate.
        let floor = if len <= SMALL_PACKET { -burst } else { 0 };
        if tokens <= floor {
            *tokens_p = tokens;
            return false;
        }
        *tokens_p = tokens - len as i64;
    }
    true
}

#[inline(always)]
fn tc_frame(ctx: &TcContext) -> Frame {
    Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    }
}

#[inline(always)]
fn tc_run(ctx: &TcContext, dir: u8) -> i32 {
    let len = ctx.len();
    // SAFETY: reading fields of the context's own skb.
    let (mark, segs) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).gso_segs) };
    let f = tc_frame(ctx);
    let mut o = decide(&f, len as u64, segs, dir, mark);
    if o.unparsed {
        // Maybe only the linear area ended inside the headers: pull them in and try again.
        // Off the common path (a TCP skb keeps all its headers linear).
        let want = if len < PARSE_BYTES { len } else { PARSE_BYTES };
        if ((f.end - f.start) as u32) < want && ctx.pull_data(want).is_ok() {
            let f = tc_frame(ctx);
            o = decide(&f, len as u64, segs, dir, mark);
        }
    }
    count(o.d.verdict, o.l3_len);
    if o.d.mark != 0 {
        ctx.set_mark(o.d.mark);
    }
    if o.d.tstamp != 0 {
        // SAFETY: the context's own skb; the verifier rewrites this store into
        // `skb->tstamp` (on egress as is: `fq` reads it as CLOCK_MONOTONIC ns).
        unsafe { (*ctx.skb.skb).tstamp = o.d.tstamp };
    }
    if o.d.verdict.is_pass() {
        TCX_NEXT
    } else {
        TC_ACT_SHOT
    }
}

/// Client upload on the LAN interface (keyed by source MAC).
#[classifier]
pub fn tollgate_tc_ingress(ctx: TcContext) -> i32 {
    tc_run(&ctx, direction::UP)
}

/// Client download on the LAN interface (keyed by destination MAC).
#[classifier]
pub fn tollgate_tc_egress(ctx: TcContext) -> i32 {
    tc_run(&ctx, direction::DOWN)
}

/// The ingress verdict at the driver, for NICs that run XDP natively. Portal redirect needs
/// an skb mark, which XDP cannot set, so in XDP mode unpaid TCP/80 is simply dropped.
#[xdp]
pub fn tollgate_xdp_ingress(ctx: XdpContext) -> u32 {
    let f = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let len = (f.end - f.start) as u64;
    let o = decide(&f, len, 1, direction::UP, 0);
    let mut d = o.d;
    if d.verdict == Verdict::PassPortal {
        d.verdict = Verdict::DropUnpaid;
    }
    count(d.verdict, o.l3_len);
    if d.verdict.is_pass() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// The benchmark's floor for TC: the cost of running any program at this hook.
#[classifier]
pub fn tollgate_empty_tc(_ctx: TcContext) -> i32 {
    TCX_NEXT
}

/// The benchmark's floor for XDP.
#[xdp]
pub fn tollgate_empty_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
