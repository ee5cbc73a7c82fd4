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
//!                DHCP / ND / portal to the gateway ──────────────> pass, not metered
//!                DNS to the gateway, unpaid ─────────────────────> per-MAC token bucket (TG_DNS)
//!                ND on egress: hop limit 255, link-local source ─> pass
//!                to/from the gateway's own addresses (paid) ─────> pass, not metered
//!                POLICY[mac] open, in time, within quota ────────> meter in USAGE, pass
//!                otherwise: portal redirect (TCP/80) / allow-list / drop (+1 event on exhaustion)
//! ```
//! TC programs return `TCX_NEXT` on a pass (later TCX programs and legacy clsact filters, e.g.
//! SQM, still run) and `TC_ACT_SHOT` on a drop; the valve attaches them first in the chain.
//! In meter-only mode (`config_flags::METER_ONLY`, the WAN side of a reseller) every frame
//! passes; IP packets from/to a MAC with a POLICY entry are counted in USAGE (ingress in
//! `bytes_up`, egress in `bytes_down`) with no limit or deadline, except those to/from the
//! configured gateway addresses (the upstream itself) and neighbour discovery, which the
//! upstream does not bill. Verdicts there: PassPaid = counted, PassGateway/PassGarden = the
//! exceptions, PassLink = anything else (other MACs, non-IP, unparseable).
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
    bindings::{xdp_action, BPF_NOEXIST, TC_ACT_SHOT},
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    helpers::{bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use tollgate_common::{
    config_flags, direction, policy_flags, DnsBucket, ExhaustReason, GateConfig, GateEvent, MacKey,
    Policy, Usage, Verdict, VerdictCount, DNS_BUCKETS, EVENTS_BYTES, GARDEN_TCP_PORTS, MAX_CLIENTS,
    MAX_GARDEN_PREFIXES,
};

#[btf_map]
static TG_POLICY: HashMap<MacKey, Policy, { MAX_CLIENTS as usize }> = HashMap::new();
#[btf_map]
static TG_USAGE: HashMap<MacKey, Usage, { MAX_CLIENTS as usize }> = HashMap::new();
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
/// Headers we want in the linear area for parsing: Ethernet + 2 VLAN tags + IPv6 + a few
/// extension headers + L4 ports.
const PARSE_BYTES: u32 = 128;

/// Bounds-checked view of the frame (direct packet access, shared by TC and XDP).
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

    /// One byte, but bounds-checked as two: LLVM folds a one-byte check `p + 1 > end` into
    /// `p < end`, which the verifier does not accept for variable offsets. Every byte read
    /// here is followed by more header bytes in any valid packet.
    #[inline(always)]
    fn u8_at(&self, off: usize) -> Option<u8> {
        // SAFETY: bounds checked by `ptr`.
        self.ptr::<[u8; 2]>(off).map(|p| unsafe { (*p)[0] })
    }

    #[inline(always)]
    fn be16_at(&self, off: usize) -> Option<u16> {
        // SAFETY: bounds checked by `ptr`; unaligned read of packet bytes.
        self.ptr::<[u8; 2]>(off)
            .map(|p| u16::from_be_bytes(unsafe { *p }))
    }

    #[inline(always)]
    fn bytes4(&self, off: usize) -> Option<[u8; 4]> {
        // SAFETY: bounds checked by `ptr`.
        self.ptr::<[u8; 4]>(off).map(|p| unsafe { *p })
    }

    #[inline(always)]
    fn bytes16(&self, off: usize) -> Option<[u8; 16]> {
        // SAFETY: bounds checked by `ptr`.
        self.ptr::<[u8; 16]>(off).map(|p| unsafe { *p })
    }

    #[inline(always)]
    fn mac(&self, off: usize) -> Option<[u8; 6]> {
        // SAFETY: bounds checked by `ptr`.
        self.ptr::<[u8; 6]>(off).map(|p| unsafe { *p })
    }
}

/// What the parser learned about a packet.
struct Packet {
    /// Client MAC (source on ingress, destination on egress).
    mac: [u8; 6],
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
    /// Peer address (destination on ingress, source on egress), 16 bytes, IPv4 as ::ffff:a.b.c.d.
    peer: [u8; 16],
    /// Client-side address (source on ingress), same encoding.
    local: [u8; 16],
    is_v4: bool,
    /// L4 protocol (after IPv6 extension headers); 255 when unknown.
    proto: u8,
    /// Destination port on ingress / source port on egress ... see `dport`/`sport`.
    sport: u16,
    dport: u16,
    /// ICMPv6 type (when proto == ICMPv6).
    icmp_type: u8,
    /// L4 header was found (not a non-first fragment, not an unknown/opaque chain).
    l4: bool,
}

#[inline(always)]
fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// Parses Ethernet (+ up to two 802.1Q/802.1ad tags), IPv4 or IPv6 (+ extension headers) and
/// the L4 ports. `segs` is the skb's `gso_segs` (0/1 for a single packet). `Err(())` =
/// truncated/malformed headers.
#[inline(always)]
fn parse(f: &Frame, total_len: u64, segs: u32, dir: u8) -> Result<Packet, ()> {
    let dst = f.mac(0).ok_or(())?;
    let src = f.mac(6).ok_or(())?;
    let mut off = 12usize;
    let mut ethertype = f.be16_at(off).ok_or(())?;
    off += 2;
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
    let (mac, l2_group) = if dir == direction::UP {
        (src, dst[0] & 1 == 1)
    } else {
        (dst, dst[0] & 1 == 1)
    };
    let mut p = Packet {
        mac,
        l2_group,
        ethertype,
        l3_len: total_len.saturating_sub(off as u64),
        l3_group: false,
        hop_limit: 0,
        udp_payload: 0,
        peer: [0; 16],
        local: [0; 16],
        is_v4: false,
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
        let vihl = f.u8_at(off).ok_or(())?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return Err(());
        }
        // The whole header must be present (options included).
        f.ptr::<[u8; 20]>(off).ok_or(())?;
        let tot = f.be16_at(off + 2).ok_or(())? as u64;
        // The IP length, not the frame: Ethernet padding is not IP. Zero (BIG TCP) or a
        // length beyond the frame falls back to the frame.
        if tot != 0 && tot < frame_l3 {
            if tot < ihl as u64 {
                return Err(());
            }
            p.l3_len = tot;
        }
        let frag = f.be16_at(off + 6).ok_or(())?;
        p.proto = f.u8_at(off + 9).ok_or(())?;
        let s = f.bytes4(off + 12).ok_or(())?;
        let d = f.bytes4(off + 16).ok_or(())?;
        let (local, peer) = if dir == direction::UP { (s, d) } else { (d, s) };
        p.local = v4_mapped(local);
        p.peer = v4_mapped(peer);
        p.is_v4 = true;
        p.l3_group = d[0] & 0xf0 == 0xe0 || d == [255, 255, 255, 255];
        if frag & 0x1fff != 0 {
            return Ok(p); // non-first fragment: no L4 header to classify
        }
        l4_off = off + ihl;
    } else if ethertype == ETH_P_IPV6 {
        let v = f.u8_at(off).ok_or(())?;
        if v >> 4 != 6 {
            return Err(());
        }
        let plen = f.be16_at(off + 4).ok_or(())? as u64;
        if plen != 0 && plen + 40 < frame_l3 {
            p.l3_len = plen + 40;
        }
        p.hop_limit = f.u8_at(off + 7).ok_or(())?;
        let s = f.bytes16(off + 8).ok_or(())?;
        let d = f.bytes16(off + 24).ok_or(())?;
        let (local, peer) = if dir == direction::UP { (s, d) } else { (d, s) };
        p.local = local;
        p.peer = peer;
        p.l3_group = d[0] == 0xff;
        let mut nh = f.u8_at(off + 6).ok_or(())?;
        let mut o = off + 40;
        // Walk extension headers so a chain of them cannot disguise the L4 protocol.
        let mut i = 0;
        while i < 6 {
            match nh {
                0 | 43 | 60 => {
                    let next = f.u8_at(o).ok_or(())?;
                    let len = f.u8_at(o + 1).ok_or(())? as usize;
                    nh = next;
                    o += (len + 1) * 8;
                }
                44 => {
                    let next = f.u8_at(o).ok_or(())?;
                    let fo = f.be16_at(o + 2).ok_or(())?;
                    nh = next;
                    o += 8;
                    if fo & 0xfff8 != 0 {
                        p.proto = nh;
                        return Ok(p); // non-first fragment
                    }
                }
                51 => {
                    let next = f.u8_at(o).ok_or(())?;
                    let len = f.u8_at(o + 1).ok_or(())? as usize;
                    nh = next;
                    o += (len + 2) * 4;
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
            let a = f.be16_at(l4_off).ok_or(())?;
            let b = f.be16_at(l4_off + 2).ok_or(())?;
            if dir == direction::UP {
                p.sport = a;
                p.dport = b;
            } else {
                // On egress keep the client's view: `dport` is the client's port.
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

#[inline(always)]
fn is_gateway(cfg: &GateConfig, a: &[u8; 16], v4: bool) -> bool {
    if v4 {
        let g = cfg.gateway_v4;
        return g != [0; 4] && a[12..16] == g;
    }
    (cfg.gateway_v6[0] != [0; 16] && *a == cfg.gateway_v6[0])
        || (cfg.gateway_v6[1] != [0; 16] && *a == cfg.gateway_v6[1])
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
/// gateway's answers are covered by "from the gateway" on egress. DNS is [`dns_to_gateway`].
#[inline(always)]
fn local_garden(cfg: &GateConfig, p: &Packet) -> bool {
    if !p.l4 {
        return false;
    }
    let to_gw = is_gateway(cfg, &p.peer, p.is_v4);
    match p.proto {
        IPPROTO_UDP => {
            // p.sport/dport are (client port, server port) on ingress.
            if p.is_v4 && p.dport == 67 {
                return to_gw || p.peer[12..16] == [255, 255, 255, 255];
            }
            if !p.is_v4 && p.dport == 547 {
                return to_gw || p.peer[0] == 0xff;
            }
            false
        }
        IPPROTO_TCP => to_gw && p.dport != 53 && tcp_port_open(cfg, p.dport),
        // ICMPv6 only inside IPv6 (protocol 58 in IPv4 is no neighbour discovery).
        IPPROTO_ICMPV6 if !p.is_v4 => {
            // RS, RA, NS, NA, redirect — only to link-local/multicast/the gateway, so ND
            // cannot be used as a tunnel to a routed destination.
            (133..=137).contains(&p.icmp_type)
                && (p.peer[0] == 0xff || (p.peer[0] == 0xfe && p.peer[1] & 0xc0 == 0x80) || to_gw)
        }
        _ => false,
    }
}

/// DNS (UDP/TCP 53) between a client and the gateway (`dport` is the gateway's port in both
/// directions).
#[inline(always)]
fn dns_to_gateway(cfg: &GateConfig, p: &Packet) -> bool {
    p.l4 && (p.proto == IPPROTO_UDP || p.proto == IPPROTO_TCP)
        && p.dport == 53
        && is_gateway(cfg, &p.peer, p.is_v4)
}

/// ICMPv6 router/neighbour discovery (RS, RA, NS, NA, redirect).
#[inline(always)]
fn is_nd(p: &Packet) -> bool {
    !p.is_v4 && p.proto == IPPROTO_ICMPV6 && p.l4 && (133..=137).contains(&p.icmp_type)
}

/// Does `key` have an open gate, before its deadline and below its total limit right now?
/// (Only asked for DNS, off the metered fast path.)
#[inline(always)]
fn paid_now(key: &MacKey) -> bool {
    // SAFETY: the value is copied out immediately.
    let pol = match unsafe { TG_POLICY.get(key) } {
        Some(pol) if pol.flags & policy_flags::ALLOWED != 0 => *pol,
        _ => return false,
    };
    // SAFETY: helper without preconditions.
    if pol.expires_at_ns != 0 && unsafe { bpf_ktime_get_boot_ns() } >= pol.expires_at_ns {
        return false;
    }
    // SAFETY: the value is copied out immediately.
    match unsafe { TG_USAGE.get(key) } {
        Some(u) => u.bytes_up.saturating_add(u.bytes_down) < pol.limit_total,
        None => pol.limit_total > 0,
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
fn allow_listed(peer: &[u8; 16]) -> bool {
    let key = Key::new(128, *peer);
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
fn exhausted(p: &Packet, pol: &Policy, u: *mut Usage, reason: ExhaustReason, dir: u8) {
    // SAFETY: `u` points into a live hash map value; aligned u32 read.
    let cur = unsafe { core::ptr::read_volatile(&raw const (*u).notified_generation) };
    if (pol.generation.wrapping_sub(cur) as i32) <= 0 {
        return; // already notified for this generation or a newer one
    }
    // SAFETY: `u` points into a live hash map value; the exchange is atomic across CPUs.
    let (_, won) = unsafe {
        atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*u).notified_generation,
            cur,
            pol.generation,
        )
    };
    if !won {
        return; // another CPU claimed this generation (or a newer one) meanwhile
    }
    // SAFETY: plain reads of counters (torn values are impossible for aligned u64).
    let (up, down, pup) = unsafe { ((*u).bytes_up, (*u).bytes_down, (*u).packets_up) };
    let ev = GateEvent {
        mac: p.mac,
        reason: reason as u8,
        direction: dir,
        generation: pol.generation,
        _pad: 0,
        bytes_up: up,
        bytes_down: down,
        packets_up: pup,
        // SAFETY: helper without preconditions.
        at_ns: unsafe { bpf_ktime_get_boot_ns() },
    };
    // A full ring loses the event; the chandler also reconciles from the maps periodically.
    let _ = TG_EVENTS.output(&ev, 0);
}

#[inline(always)]
fn usage_slot(key: &MacKey) -> Option<*mut Usage> {
    if let Some(u) = TG_USAGE.get_ptr_mut(key) {
        return Some(u);
    }
    // The valve creates the entry when it opens a gate; this covers a gate opened by an
    // older daemon or an entry removed by hand. NOEXIST never overwrites counts.
    let _ = TG_USAGE.insert(key, Usage::default(), BPF_NOEXIST as u64);
    TG_USAGE.get_ptr_mut(key)
}

/// Counts one metered packet of `len` L3 bytes in direction `dir`.
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
        (*u).last_seen_mono_ns = bpf_ktime_get_coarse_ns();
    }
}

/// Result of the decision: verdict and, for portal redirects, the mark to set.
struct Decision {
    verdict: Verdict,
    mark: u32,
}

#[inline(always)]
fn verdict(v: Verdict) -> Decision {
    Decision {
        verdict: v,
        mark: 0,
    }
}

/// The decision and the frame's metered size (for the verdict counters).
struct Outcome {
    d: Decision,
    l3_len: u64,
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
            };
        }
        if p.dport == 80 && dir == direction::DOWN && skb_mark == cfg.portal_mark && skb_mark != 0 {
            return verdict(Verdict::PassPortal);
        }
    }
    if (p.ethertype == ETH_P_IP || p.ethertype == ETH_P_IPV6) && allow_listed(&p.peer) {
        return verdict(Verdict::PassGarden);
    }
    verdict(reason)
}

/// Meter-only mode: count what a registered MAC sends and receives, never drop.
#[inline(always)]
fn meter_only(cfg: &GateConfig, p: &Packet, dir: u8) -> Decision {
    if !(p.ethertype == ETH_P_IP || p.ethertype == ETH_P_IPV6) {
        return verdict(Verdict::PassLink);
    }
    // `local` is the far end in both directions (source on ingress, destination on egress).
    if is_gateway(cfg, &p.local, p.is_v4) {
        return verdict(Verdict::PassGateway);
    }
    if is_nd(p) {
        return verdict(Verdict::PassGarden);
    }
    let key = MacKey::new(p.mac);
    // SAFETY: only presence is checked; the value is not read.
    if unsafe { TG_POLICY.get(&key) }.is_none() {
        return verdict(Verdict::PassLink);
    }
    let u = match usage_slot(&key) {
        Some(u) => u,
        None => return verdict(Verdict::PassLink),
    };
    let len = p.l3_len;
    add_usage(u, dir, len);
    verdict(Verdict::PassPaid)
}

/// The whole decision for one frame, with its metered size.
#[inline(always)]
fn decide(f: &Frame, total_len: u64, segs: u32, dir: u8, skb_mark: u32) -> Outcome {
    match parse(f, total_len, segs, dir) {
        Ok(p) => Outcome {
            d: decide_packet(&p, dir, skb_mark),
            l3_len: p.l3_len,
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
            }
        }
    }
}

#[inline(always)]
fn decide_packet(p: &Packet, dir: u8, skb_mark: u32) -> Decision {
    let ip = p.ethertype == ETH_P_IP || p.ethertype == ETH_P_IPV6;
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
        return meter_only(cfg, p, dir);
    }
    let key = MacKey::new(p.mac);
    if ip {
        if dns_to_gateway(cfg, p) {
            // Every client may resolve names; an unpaid one only within its DNS budget,
            // so DNS cannot carry a tunnel. Never metered.
            if cfg.flags & config_flags::DNS_BUDGET != 0 && !paid_now(&key) {
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
        if dir == direction::UP {
            if local_garden(cfg, p) {
                return verdict(Verdict::PassGarden);
            }
        } else {
            // The gateway's own traffic (DHCP/portal answers, RAs) is never billed.
            if is_gateway(cfg, &p.peer, p.is_v4) {
                return verdict(Verdict::PassGateway);
            }
            // Neighbour discovery only as RFC 4861 sends it: hop limit 255 (never forwarded)
            // from a link-local source, so no routed host can push payload inside ND.
            if is_nd(p) && p.hop_limit == 255 && p.peer[0] == 0xfe && p.peer[1] & 0xc0 == 0x80 {
                return verdict(Verdict::PassGarden);
            }
        }
    }
    // SAFETY: the value is copied out immediately; userspace replaces it atomically.
    let pol = match unsafe { TG_POLICY.get(&key) } {
        Some(pol) if pol.flags & policy_flags::ALLOWED != 0 => *pol,
        _ => return not_entitled(cfg, p, dir, skb_mark, Verdict::DropUnpaid),
    };
    if dir == direction::UP
        && pol.flags & policy_flags::BIND_IPV4 != 0
        && p.ethertype == ETH_P_IP
        && p.local[12..16] != pol.bound_ipv4
    {
        return verdict(Verdict::DropSpoofed);
    }
    if ip && dir == direction::UP && is_gateway(cfg, &p.peer, p.is_v4) {
        return verdict(Verdict::PassGateway);
    }
    let u = match usage_slot(&key) {
        Some(u) => u,
        None => return verdict(Verdict::DropNoSlot),
    };
    if pol.expires_at_ns != 0 {
        // SAFETY: helper without preconditions.
        let now = unsafe { bpf_ktime_get_boot_ns() };
        if now >= pol.expires_at_ns {
            exhausted(p, &pol, u, ExhaustReason::Expired, dir);
            return not_entitled(cfg, p, dir, skb_mark, Verdict::DropExpired);
        }
    }
    let len = p.l3_len;
    // SAFETY: aligned u64 reads of a live map value.
    let (up, down) = unsafe { ((*u).bytes_up, (*u).bytes_down) };
    let over = if up.saturating_add(down).saturating_add(len) > pol.limit_total {
        Some(ExhaustReason::Quota)
    } else if dir == direction::UP && up.saturating_add(len) > pol.limit_up {
        Some(ExhaustReason::QuotaUp)
    } else if dir == direction::DOWN && down.saturating_add(len) > pol.limit_down {
        Some(ExhaustReason::QuotaDown)
    } else {
        None
    };
    if let Some(reason) = over {
        exhausted(p, &pol, u, reason, dir);
        // SAFETY: atomic add on a live map value.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*u).bytes_dropped, len)
        };
        return not_entitled(cfg, p, dir, skb_mark, Verdict::DropQuota);
    }
    add_usage(u, dir, len);
    verdict(Verdict::PassPaid)
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
    let mut f = tc_frame(ctx);
    let want = if len < PARSE_BYTES { len } else { PARSE_BYTES };
    if ((f.end - f.start) as u32) < want {
        // Headers outside the linear area (e.g. after GRO): pull them in before parsing.
        let _ = ctx.pull_data(want);
        f = tc_frame(ctx);
    }
    // SAFETY: reading fields of the context's own skb.
    let (mark, segs) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).gso_segs) };
    let o = decide(&f, len as u64, segs, dir, mark);
    count(o.d.verdict, o.l3_len);
    if o.d.mark != 0 {
        ctx.set_mark(o.d.mark);
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
