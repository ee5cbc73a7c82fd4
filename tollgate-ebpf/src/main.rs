//! tollgate's kernel data plane: per-MAC metering and gates on the LAN interface.
//!
//! ```text
//!            client ──frame──> [TC ingress | XDP]  key = source MAC,      direction UP
//!            client <──frame── [TC egress]         key = destination MAC, direction DOWN
//!
//!  every frame:  L2 multicast/broadcast ─────────────────────────> pass (never forwarded)
//!                ARP ────────────────────────────────────────────> pass
//!                DHCP / ND / DNS+portal to the gateway ──────────> pass, not metered
//!                to/from the gateway's own addresses (paid) ─────> pass, not metered
//!                POLICY[mac] open, in time, within quota ────────> meter in USAGE, pass
//!                otherwise: portal redirect (TCP/80) / allow-list / drop (+1 event on exhaustion)
//! ```
//! In meter-only mode (`config_flags::METER_ONLY`, the WAN side of a reseller) every frame
//! passes; IP packets from/to a MAC with a POLICY entry are counted in USAGE (ingress in
//! `bytes_up`, egress in `bytes_down`) with no limit or deadline, except those to/from the
//! configured gateway addresses (the upstream itself) and neighbour discovery, which the
//! upstream does not bill. Verdicts there: PassPaid = counted, PassGateway/PassGarden = the
//! exceptions, PassLink = anything else (other MACs, non-IP, unparseable).
//!
//! The metered quantity is the L3 length (see `tollgate-common`). Quota checks read the
//! counters and then add atomically, so concurrent CPUs can overshoot a limit by at most one
//! packet each; the exhaustion event is claimed with an atomic exchange on the usage entry, so
//! exactly one CPU emits it per policy generation.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{
    intrinsics::{atomic_xadd, atomic_xchg, AtomicOrdering},
    mem::size_of,
};

use aya_ebpf::{
    bindings::{xdp_action, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
    helpers::{bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use tollgate_common::{
    config_flags, direction, policy_flags, ExhaustReason, GateConfig, GateEvent, MacKey, Policy,
    Usage, Verdict, VerdictCount, EVENTS_BYTES, GARDEN_TCP_PORTS, MAX_CLIENTS, MAX_GARDEN_PREFIXES,
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
    /// Metered bytes: total length minus the L2 header.
    l3_len: u64,
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
/// the L4 ports. `Err(())` = truncated/malformed headers.
#[inline(always)]
fn parse(f: &Frame, total_len: u64, dir: u8) -> Result<Packet, ()> {
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
    if ethertype == ETH_P_IP {
        let vihl = f.u8_at(off).ok_or(())?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return Err(());
        }
        // The whole header must be present (options included).
        f.ptr::<[u8; 20]>(off).ok_or(())?;
        let frag = f.be16_at(off + 6).ok_or(())?;
        p.proto = f.u8_at(off + 9).ok_or(())?;
        let s = f.bytes4(off + 12).ok_or(())?;
        let d = f.bytes4(off + 16).ok_or(())?;
        let (local, peer) = if dir == direction::UP { (s, d) } else { (d, s) };
        p.local = v4_mapped(local);
        p.peer = v4_mapped(peer);
        p.is_v4 = true;
        if frag & 0x1fff != 0 {
            return Ok(p); // non-first fragment: no L4 header to classify
        }
        l4_off = off + ihl;
    } else if ethertype == ETH_P_IPV6 {
        let v = f.u8_at(off).ok_or(())?;
        if v >> 4 != 6 {
            return Err(());
        }
        let s = f.bytes16(off + 8).ok_or(())?;
        let d = f.bytes16(off + 24).ok_or(())?;
        let (local, peer) = if dir == direction::UP { (s, d) } else { (d, s) };
        p.local = local;
        p.peer = peer;
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
            p.l4 = true;
        }
        IPPROTO_ICMPV6 => {
            p.icmp_type = f.u8_at(l4_off).ok_or(())?;
            p.l4 = true;
        }
        _ => {}
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
/// DNS and the portal/payment ports on the gateway. Never metered. Only on ingress; the
/// gateway's answers are covered by "from the gateway" on egress.
#[inline(always)]
fn local_garden(cfg: &GateConfig, p: &Packet) -> bool {
    if !p.l4 {
        return false;
    }
    let to_gw = is_gateway(cfg, &p.peer, p.is_v4);
    match p.proto {
        IPPROTO_UDP => {
            // p.sport/dport are (client port, server port) on ingress.
            if p.dport == 53 {
                return to_gw;
            }
            if p.is_v4 && p.dport == 67 {
                return to_gw || p.peer[12..16] == [255, 255, 255, 255];
            }
            if !p.is_v4 && p.dport == 547 {
                return to_gw || p.peer[0] == 0xff;
            }
            false
        }
        IPPROTO_TCP => to_gw && (p.dport == 53 || tcp_port_open(cfg, p.dport)),
        IPPROTO_ICMPV6 => {
            // RS, RA, NS, NA, redirect — only to link-local/multicast/the gateway, so ND
            // cannot be used as a tunnel to a routed destination.
            (133..=137).contains(&p.icmp_type)
                && (p.peer[0] == 0xff || (p.peer[0] == 0xfe && p.peer[1] & 0xc0 == 0x80) || to_gw)
        }
        _ => false,
    }
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
#[inline(always)]
fn exhausted(p: &Packet, pol: &Policy, u: *mut Usage, reason: ExhaustReason, dir: u8) {
    // SAFETY: `u` points into a live hash map value; the exchange is atomic across CPUs.
    let prev = unsafe {
        atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(
            &raw mut (*u).notified_generation,
            pol.generation,
        )
    };
    if prev == pol.generation {
        return;
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
    if p.proto == IPPROTO_ICMPV6 && p.l4 && (133..=137).contains(&p.icmp_type) {
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

/// The whole decision for one frame.
#[inline(always)]
fn decide(f: &Frame, total_len: u64, dir: u8, skb_mark: u32) -> Decision {
    let p = match parse(f, total_len, dir) {
        Ok(p) => p,
        Err(()) => {
            // Off the hot path: only unparseable frames pay for this config read.
            return match TG_CONFIG.get(0) {
                Some(c) if c.flags & config_flags::METER_ONLY != 0 => verdict(Verdict::PassLink),
                _ => verdict(Verdict::DropMalformed),
            };
        }
    };
    if p.l2_group {
        return verdict(Verdict::PassMulticast);
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
        return meter_only(cfg, &p, dir);
    }
    let ip = p.ethertype == ETH_P_IP || p.ethertype == ETH_P_IPV6;
    if ip {
        if dir == direction::UP {
            if local_garden(cfg, &p) {
                return verdict(Verdict::PassGarden);
            }
        } else {
            // The gateway's own traffic (DHCP/DNS/portal answers, RAs) is never billed.
            if is_gateway(cfg, &p.peer, p.is_v4) {
                return verdict(Verdict::PassGateway);
            }
            if p.proto == IPPROTO_ICMPV6 && p.l4 && (133..=137).contains(&p.icmp_type) {
                return verdict(Verdict::PassGarden);
            }
        }
    }
    let key = MacKey::new(p.mac);
    // SAFETY: the value is copied out immediately; userspace replaces it atomically.
    let pol = match unsafe { TG_POLICY.get(&key) } {
        Some(pol) if pol.flags & policy_flags::ALLOWED != 0 => *pol,
        _ => return not_entitled(cfg, &p, dir, skb_mark, Verdict::DropUnpaid),
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
            exhausted(&p, &pol, u, ExhaustReason::Expired, dir);
            return not_entitled(cfg, &p, dir, skb_mark, Verdict::DropExpired);
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
        exhausted(&p, &pol, u, reason, dir);
        // SAFETY: atomic add on a live map value.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*u).bytes_dropped, len)
        };
        return not_entitled(cfg, &p, dir, skb_mark, Verdict::DropQuota);
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
    // SAFETY: reading the mark of the context's own skb.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let d = decide(&f, len as u64, dir, mark);
    let l3 = len as u64;
    count(d.verdict, l3);
    if d.mark != 0 {
        ctx.set_mark(d.mark);
    }
    if d.verdict.is_pass() {
        TC_ACT_OK
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
    let mut d = decide(&f, len, direction::UP, 0);
    if d.verdict == Verdict::PassPortal {
        d.verdict = Verdict::DropUnpaid;
    }
    count(d.verdict, len.saturating_sub(ETH_HLEN as u64));
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
