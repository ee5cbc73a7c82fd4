//! The kernel/user contract: every type that crosses between `tollgate-ebpf` and the daemon.
//!
//! ```text
//!   userspace (valve) ──writes──> POLICY[mac]   (gate: limits, deadline, binding, generation,
//!                                                 and `slot`: the client's index in USAGE)
//!                     ──writes──> CONFIG[0]     (gateway addresses, portal ports)
//!                     ──writes──> GARDEN[prefix] (allow-list; LPM key = u32 prefix length +
//!                                                 16 address bytes, IPv4 as ::ffff:a.b.c.d)
//!   kernel (TC/XDP)   ──writes──> USAGE[slot]   (bytes/packets up and down; userspace only reads,
//!                                                 and zeroes a slot before handing it out again)
//!                     ──writes──> VERDICTS[v]   (per-CPU packet/byte counts by verdict)
//!                     ──emits───> EVENTS        (one `GateEvent` per exhaustion)
//! ```
//!
//! **Metered quantity**: L3 bytes — the IP packet including its IP header, excluding the
//! Ethernet header and any 802.1Q tags — as RFC 8908 `bytes-remaining` counts them, taken from
//! the IP header's length field (Ethernet padding is not counted). A GSO/GRO aggregate is
//! metered as the segments it stands for: its L3 length plus the L3+L4 headers repeated in
//! every segment after the first, i.e. the sum of the IP packets' lengths on the wire.
//!
//! **Quotas are cumulative limits**: a `Policy` carries limits on the *cumulative* counters in
//! `Usage` (`limit_total` applies to `bytes_up + bytes_down`). Opening a gate with an allowance
//! of N bytes sets `limit = used + N`; extending raises the limit. Userspace never writes usage,
//! so a policy update can never erase what the kernel counted.
//!
//! **One lookup per packet**: the kernel looks the MAC up once in POLICY (a hash map) and
//! reaches the counters through `Policy::slot` in the USAGE *array* (no second hash lookup;
//! the katran/cilium split of a user-written entry and kernel-owned counters).
//!
//! **Rate limits** (schema 4): the policy carries a per-direction rate (0 = unlimited); the
//! shaping state is kernel-owned and sits in the usage slot on its direction's cache line —
//! download: an Earliest-Departure-Time virtual clock (`fq` on the LAN interface releases each
//! packet at the `skb->tstamp` the program wrote; `config_flags::EDT_DOWN`), or, on a kernel
//! without `fq`, a token bucket; upload: a token bucket (policing).
//!
//! Every layout change bumps [`SCHEMA_VERSION`], which is part of the pin directory, so an old
//! pin is never reused with a new layout.
#![no_std]

/// Version of the map layouts below; pins live in `<pin base>/v<SCHEMA_VERSION>/`.
pub const SCHEMA_VERSION: u32 = 5;

/// Map names (the pin file names under the schema directory).
pub mod maps {
    /// Policy records (an array, written by userspace through a shared mapping).
    pub const POLICY: &str = "TG_POLICY";
    /// The open-addressing index MAC → policy record (see [`crate::index`]).
    pub const INDEX: &str = "TG_INDEX";
    pub const USAGE: &str = "TG_USAGE";
    pub const CONFIG: &str = "TG_CONFIG";
    pub const GARDEN: &str = "TG_GARDEN";
    pub const VERDICTS: &str = "TG_VERDICTS";
    pub const EVENTS: &str = "TG_EVENTS";
    pub const DNS: &str = "TG_DNS";
    pub const CLOCK: &str = "TG_CLOCK";
}

/// Program names (the ELF symbol names in the object).
pub mod programs {
    pub const TC_INGRESS: &str = "tollgate_tc_ingress";
    pub const TC_EGRESS: &str = "tollgate_tc_egress";
    pub const XDP_INGRESS: &str = "tollgate_xdp_ingress";
    /// Programs that only return "pass": the benchmark's floor for each hook (never attached).
    pub const EMPTY_TC: &str = "tollgate_empty_tc";
    pub const EMPTY_XDP: &str = "tollgate_empty_xdp";
}

/// Default capacity of the per-client maps (POLICY and USAGE); `dataplane.max_clients`
/// overrides it at load time.
pub const MAX_CLIENTS: u32 = 131_072;
/// Capacity of the walled-garden LPM trie.
pub const MAX_GARDEN_PREFIXES: u32 = 1_024;
/// Size of the exhaustion event ring buffer in bytes (a power of two, page multiple).
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// Number of TCP ports on the gateway reachable by unpaid clients.
pub const GARDEN_TCP_PORTS: usize = 4;
/// Capacity of the DNS budget map (an LRU hash: per-MAC token buckets of unpaid clients; the
/// least recently used bucket is recycled, which only ever hands a MAC a fresh burst).
pub const DNS_BUCKETS: u32 = 16_384;
/// Default DNS budget of an unpaid MAC: sustained bytes per second (L3 bytes of queries to
/// and answers from the gateway's port 53).
pub const DNS_RATE_DEFAULT: u32 = 4 * 1024;
/// Default DNS burst of an unpaid MAC in bytes.
pub const DNS_BURST_DEFAULT: u32 = 32 * 1024;
/// Default largest UDP DNS query payload an unpaid MAC may send (the classic DNS limit;
/// a name is at most 255 bytes, so every legitimate query fits).
pub const DNS_MAX_UDP_DEFAULT: u16 = 512;
/// A limit that never binds.
pub const UNLIMITED: u64 = u64::MAX;

/// A client's Ethernet address as a map key.
///
/// layout: 8 bytes (6 address bytes + 2 explicit padding bytes, always zero)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacKey {
    pub addr: [u8; 6],
    pub _pad: [u8; 2],
}

impl MacKey {
    pub const fn new(addr: [u8; 6]) -> Self {
        Self { addr, _pad: [0; 2] }
    }

    /// The key as one little-endian word (the address in the low 48 bits): what the kernel's
    /// parser builds from a frame and what `Policy::mac` holds.
    pub const fn word(&self) -> u64 {
        let a = self.addr;
        u64::from_le_bytes([a[0], a[1], a[2], a[3], a[4], a[5], 0, 0])
    }
}

/// The policy index: an open-addressing table (linear probing) in an mmapable array of
/// `u64` words, written only by userspace, read by the kernel with no lock and no helper call.
///
/// ```text
///  word 0: SEED (odd, random per table; 0 = not initialised)   word 1: SHIFT (64 - log2 S)
///  words HEADER .. HEADER + S + MAX_PROBE: entries; a client's home is HEADER + hash >> SHIFT
///  and it sits at most MAX_PROBE - 1 entries after it (no wrap-around: the table has
///  MAX_PROBE spare entries at its end)
///  entry: 0 = empty (a lookup stops) · TOMB = deleted (a lookup goes on)
///         fingerprint (40 bits) << 24 | record + 1 (24 bits)
/// ```
/// A lookup hashes the MAC word (`index::hash`: two multiplies), walks from its home until an
/// empty entry, and checks a matching fingerprint against the MAC stored in the record
/// (`Policy::mac`), so neither a fingerprint collision nor a stale entry can hand out another
/// client's gate.
///
/// Userspace changes a policy by writing a fresh record and then publishing it with one
/// atomic store of the entry (release); the kernel reaches the record through the entry, an
/// address dependency, so it sees the record whole. A record that is no longer published is
/// not rewritten for a grace period far longer than a program run, so a reader never sees
/// one change under it.
pub mod index {
    /// Words before the first entry (the seed and the shift).
    pub const HEADER: u32 = 2;
    /// Longest walk from a home entry; also the spare entries at the end of the table.
    pub const MAX_PROBE: u32 = 32;
    /// A deleted entry: lookups walk past it, inserts reuse it.
    pub const TOMB: u64 = 1 << 24;
    /// Bits of an entry holding `record + 1`.
    pub const RECORD_BITS: u32 = 24;
    pub const RECORD_MASK: u64 = (1 << RECORD_BITS) - 1;
    /// Most records a table can name.
    pub const MAX_RECORDS: u32 = (1 << RECORD_BITS) - 2;

    /// Fixed odd multiplier of the hash's second round (2^64 / golden ratio).
    pub const MIX: u64 = 0x9E37_79B9_7F4A_7C15;

    /// Home offset (from `HEADER`) and fingerprint of `key` (a `MacKey::word`).
    ///
    /// Multiply by the table's secret seed, fold the high half down, multiply again; the home
    /// is the top bits. One multiply-shift alone is not enough for linear probing: MACs that
    /// count up (a vendor's range, a lab, a customer's crafted set) are an arithmetic
    /// progression, which a multiply keeps one, and for some seeds it piles into runs longer
    /// than `MAX_PROBE` at 1/4 load. The fold makes the second product depend non-linearly on
    /// every key bit (`structured_macs_never_fill_a_window`).
    #[inline(always)]
    pub fn hash(key: u64, seed: u64, shift: u64) -> (u64, u64) {
        let x = key.wrapping_mul(seed);
        let h = (x ^ (x >> 32)).wrapping_mul(MIX);
        (h >> (shift & 63), h >> RECORD_BITS)
    }

    /// The entry naming `record` for a key with fingerprint `fp`.
    #[inline(always)]
    pub const fn entry(fp: u64, record: u32) -> u64 {
        fp << RECORD_BITS | (record as u64 + 1)
    }

    /// The record an entry names (`None`: empty or deleted).
    #[inline(always)]
    pub const fn record(entry: u64) -> Option<u32> {
        match entry & RECORD_MASK {
            0 => None,
            r => Some(r as u32 - 1),
        }
    }

    /// Entries (without the header) of a table for `capacity` clients: a power of two at
    /// least four times the capacity, so that linear probing stays short (load ≤ 1/4).
    pub const fn slots_for(capacity: u32) -> u32 {
        let want = (capacity as u64 * 4).next_power_of_two();
        if want < 64 {
            64
        } else {
            want as u32
        }
    }

    /// `SHIFT` for a table of `slots` entries (a power of two).
    pub const fn shift_for(slots: u32) -> u64 {
        64 - slots.trailing_zeros() as u64
    }
}

/// The token bucket of a policed direction at `bytes_per_s`: 200 ms at the rate, and at
/// least 128 KiB so one GSO/GRO aggregate (64 KiB) and the window TCP has in flight after a
/// loss fit (a smaller bucket makes TCP fall well short of the rate). Computed by the kernel
/// from the rate (not stored in the policy) and by the valve for display.
#[inline(always)]
pub const fn burst_for(bytes_per_s: u32) -> u32 {
    let b = bytes_per_s / 5;
    if b < 128 * 1024 {
        128 * 1024
    } else {
        b
    }
}

/// `Policy::flags` bits.
pub mod policy_flags {
    /// The gate is open: traffic within the limits and before the deadline passes.
    pub const ALLOWED: u32 = 1 << 0;
    /// Drop IPv4 packets from this MAC whose source is not `bound_ipv4` (anti-spoofing).
    pub const BIND_IPV4: u32 = 1 << 1;
    /// Drop IPv6 packets from this MAC whose source is none of `bound_ipv6` (a link-local
    /// source may still reach the gateway itself).
    pub const BIND_IPV6: u32 = 1 << 3;
    /// Meter-only mode: count this MAC's traffic (an entry without it keeps its counts but
    /// is no longer counted).
    pub const METERED: u32 = 1 << 2;
}

/// IPv6 source addresses a gate can be bound to (unused entries are zero).
pub const MAX_BOUND_V6: usize = 4;

/// A client's gate, written only by userspace.
///
/// A record of the POLICY array, reached through the [`index`]. The fields the paid path
/// reads (flags, limits, deadline, slot, rates, the MAC it belongs to) are in the first 64 bytes; the IPv6 binding, read only for bound IPv6 uploads, fills the second half.
///
/// layout: 128 bytes, align 8
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// [`policy_flags`] bits.
    pub flags: u32,
    /// Bumped by userspace on every open/extend; the kernel emits at most one exhaustion event
    /// per generation.
    pub generation: u32,
    /// Limit on cumulative `bytes_up + bytes_down` ([`UNLIMITED`] = none).
    pub limit_total: u64,
    /// Limit on cumulative `bytes_up` ([`UNLIMITED`] = none).
    pub limit_up: u64,
    /// Limit on cumulative `bytes_down` ([`UNLIMITED`] = none).
    pub limit_down: u64,
    /// `bpf_ktime_get_boot_ns()` after which the gate is shut; 0 = no deadline.
    pub expires_at_ns: u64,
    /// Bound IPv4 source address in network byte order (only with `BIND_IPV4`).
    pub bound_ipv4: [u8; 4],
    /// Index of this client's counters in the USAGE array, allocated by userspace; never
    /// shared by two entries.
    pub slot: u32,
    /// Download rate in L3 bytes per second, shaped with EDT on LAN egress; 0 = unlimited.
    pub rate_down: u32,
    /// Upload rate in L3 bytes per second, policed on LAN ingress; 0 = unlimited.
    pub rate_up: u32,
    /// The client's `MacKey::word`: a lookup through the index checks it, so an entry can
    /// only ever hand out this client's gate. (Schema 4 held the token bucket sizes here;
    /// they are `burst_for` the rates.)
    pub mac: u64,
    /// Bound IPv6 source addresses (only with `BIND_IPV6`); in the entry so that binding
    /// costs no lookup.
    pub bound_ipv6: [[u8; 16]; MAX_BOUND_V6],
}

impl Policy {
    pub const CLOSED: Policy = Policy {
        flags: 0,
        generation: 0,
        limit_total: 0,
        limit_up: 0,
        limit_down: 0,
        expires_at_ns: 0,
        bound_ipv4: [0; 4],
        slot: 0,
        rate_down: 0,
        rate_up: 0,
        mac: 0,
        bound_ipv6: [[0; 16]; MAX_BOUND_V6],
    };
}

/// A client's counters (the USAGE array, indexed by `Policy::slot`), written only by the
/// kernel (cumulative since the slot was handed to the client).
///
/// The upload half and the download half sit on separate 64-byte cache lines: ingress and
/// egress usually run on different CPUs, and each adds to its own line only. The other line
/// is read only for a total limit (`limit_total`). No clock is read on the metered path: the
/// valve derives "last seen" from counter changes.
///
/// The shaping state (schema 4) is kernel-owned too and sits on its direction's line: the
/// upload token bucket with the upload counters, the download virtual clock with the download
/// counters. Both are read and written only for a client with a rate.
///
/// layout: 128 bytes, align 64
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes_up: u64,
    pub packets_up: u64,
    /// Bytes dropped because of quota or deadline (both directions; drops only).
    pub bytes_dropped: u64,
    /// The policy generation for which the exhaustion event was emitted (0 = none yet); the
    /// kernel swaps it atomically so exactly one CPU emits the event.
    pub notified_generation: u32,
    pub _pad: u32,
    /// Upload token bucket: bytes the client may still send (below zero: a debt, see the
    /// kernel's `police_up`).
    pub up_tokens: i64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the bucket's last refill; 0 = never.
    pub up_refill_ns: u64,
    pub _pad_up: [u64; 2],
    pub bytes_down: u64,
    pub packets_down: u64,
    /// Download virtual clock: CLOCK_MONOTONIC ns at which the client's next packet may
    /// leave (the EDT departure of the last one plus its transmission time at the rate).
    pub down_next_ns: u64,
    /// Download token bucket (policing, when the LAN has no `fq` to honour EDT): as
    /// `up_tokens` / `up_refill_ns`.
    pub down_tokens: i64,
    pub down_refill_ns: u64,
    pub _pad_down: [u64; 3],
}

/// `GateConfig::flags` bits.
pub mod config_flags {
    /// Mark unpaid clients' TCP port 80 packets with `portal_mark` and let them through to
    /// the gateway, where a local redirect answers with the captive portal.
    pub const PORTAL_REDIRECT: u32 = 1 << 0;
    /// The configuration has been written (before that, every client is treated as unpaid
    /// and only ARP/DHCP/ND pass).
    pub const CONFIGURED: u32 = 1 << 1;
    /// Meter only (the WAN side of a reseller): every frame passes, nothing is gated or
    /// redirected. IP packets from (ingress) / to (egress) a MAC whose `POLICY` entry has
    /// `policy_flags::METERED` are
    /// counted in `USAGE` with no limit or deadline checks, except traffic to/from the
    /// addresses in `gateway_v4`/`gateway_v6` (the upstream gateway itself) and neighbour
    /// discovery, which an upstream TollGate does not bill either. Frames from or to any other
    /// MAC are not counted, so random hosts on the WAN cannot fill the map.
    pub const METER_ONLY: u32 = 1 << 2;
    /// Unpaid clients' DNS to the gateway is held to a per-MAC token bucket
    /// (`dns_rate`/`dns_burst`) and UDP queries above `dns_max_udp` payload bytes are dropped.
    pub const DNS_BUDGET: u32 = 1 << 3;
    /// Shaped downloads get an EDT departure time (`skb->tstamp`) for the `fq` qdisc on the
    /// LAN interface to honour. Without it (no `fq` in the kernel, or none installed) they are
    /// policed with a token bucket like uploads.
    pub const EDT_DOWN: u32 = 1 << 4;
}

/// The gateway's own addresses and the ports unpaid clients may reach on it.
///
/// layout: 80 bytes, align 4
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateConfig {
    pub flags: u32,
    /// skb mark set on portal-redirected packets.
    pub portal_mark: u32,
    /// Gateway IPv4 address on the LAN (network order; zero = none).
    pub gateway_v4: [u8; 4],
    /// TCP ports on the gateway open to unpaid clients (portal, payment API); 0 = unused slot.
    pub tcp_ports: [u16; GARDEN_TCP_PORTS],
    pub _pad: [u8; 4],
    /// Gateway IPv6 addresses on the LAN (typically link-local and global; zero = none).
    pub gateway_v6: [[u8; 16]; 2],
    /// Unpaid DNS budget: sustained L3 bytes per second per MAC (with `DNS_BUDGET`).
    pub dns_rate: u32,
    /// Unpaid DNS budget: bucket size in bytes (with `DNS_BUDGET`).
    pub dns_burst: u32,
    /// Largest UDP payload of an unpaid client's DNS query (with `DNS_BUDGET`).
    pub dns_max_udp: u16,
    pub _pad2: [u8; 14],
}

impl GateConfig {
    pub const EMPTY: GateConfig = GateConfig {
        flags: 0,
        portal_mark: 0,
        gateway_v4: [0; 4],
        tcp_ports: [0; GARDEN_TCP_PORTS],
        _pad: [0; 4],
        gateway_v6: [[0; 16]; 2],
        dns_rate: 0,
        dns_burst: 0,
        dns_max_udp: 0,
        _pad2: [0; 14],
    };
}

/// Why a packet passed or was dropped. Index of the per-CPU `VERDICTS` array.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Paid client within its allowance; metered.
    PassPaid = 0,
    /// Walled garden (DHCP, DNS/portal on the gateway, allow-listed destination); not metered.
    PassGarden = 1,
    /// Traffic to or from the gateway's own addresses; never billed.
    PassGateway = 2,
    /// ARP and other non-IP link traffic.
    PassLink = 3,
    /// L2 broadcast/multicast: stays on the segment (the kernel never forwards it).
    PassMulticast = 4,
    /// Unpaid TCP/80, marked for the captive-portal redirect.
    PassPortal = 5,
    /// Unpaid client, not garden traffic.
    DropUnpaid = 6,
    /// The packet would take the client past its byte quota.
    DropQuota = 7,
    /// The client's deadline has passed.
    DropExpired = 8,
    /// The source address is not one the client is bound to (IPv4 or IPv6).
    DropSpoofed = 9,
    /// Truncated or unparseable headers (cannot be classified, so cannot be allowed).
    DropMalformed = 10,
    /// No room left in the usage map (fail closed).
    DropNoSlot = 11,
    /// An unpaid client's DNS beyond its budget, or an oversized query.
    DropDnsBudget = 12,
    /// Unicast IP in a broadcast/multicast frame towards a client (a poisoned neighbour
    /// entry must not carry downloads past the gate).
    DropGroupUnicast = 13,
    /// An upload beyond the client's rate and burst (token bucket empty).
    DropRateUp = 14,
    /// A download the client's rate would send more than the horizon into the future.
    DropRateDown = 15,
}

impl Verdict {
    pub const COUNT: u32 = 16;
    pub const ALL: [Verdict; Self::COUNT as usize] = [
        Verdict::PassPaid,
        Verdict::PassGarden,
        Verdict::PassGateway,
        Verdict::PassLink,
        Verdict::PassMulticast,
        Verdict::PassPortal,
        Verdict::DropUnpaid,
        Verdict::DropQuota,
        Verdict::DropExpired,
        Verdict::DropSpoofed,
        Verdict::DropMalformed,
        Verdict::DropNoSlot,
        Verdict::DropDnsBudget,
        Verdict::DropGroupUnicast,
        Verdict::DropRateUp,
        Verdict::DropRateDown,
    ];

    pub const fn from_u8(v: u8) -> Option<Verdict> {
        if (v as u32) < Self::COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    pub const fn is_pass(self) -> bool {
        (self as u8) < Verdict::DropUnpaid as u8
    }

    /// Stable snake_case name (metrics label, JSON).
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::PassPaid => "pass_paid",
            Verdict::PassGarden => "pass_garden",
            Verdict::PassGateway => "pass_gateway",
            Verdict::PassLink => "pass_link",
            Verdict::PassMulticast => "pass_multicast",
            Verdict::PassPortal => "pass_portal",
            Verdict::DropUnpaid => "drop_unpaid",
            Verdict::DropQuota => "drop_quota",
            Verdict::DropExpired => "drop_expired",
            Verdict::DropSpoofed => "drop_spoofed",
            Verdict::DropMalformed => "drop_malformed",
            Verdict::DropNoSlot => "drop_no_slot",
            Verdict::DropDnsBudget => "drop_dns_budget",
            Verdict::DropGroupUnicast => "drop_group_unicast",
            Verdict::DropRateUp => "drop_rate_up",
            Verdict::DropRateDown => "drop_rate_down",
        }
    }
}

/// An unpaid client's DNS token bucket, written only by the kernel.
///
/// layout: 16 bytes, align 8
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsBucket {
    /// Bytes the client may still send; answers may take it below zero (a debt the next
    /// queries wait out), so the sustained rate holds for both directions together.
    pub tokens: i64,
    /// `bpf_ktime_get_coarse_ns() / 1 000 000` of the last refill.
    pub last_ms: u64,
}

/// Per-CPU count for one verdict.
///
/// layout: 16 bytes, align 8
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictCount {
    pub packets: u64,
    /// L3 bytes of those packets.
    pub bytes: u64,
}

/// Why a gate was shut by the kernel.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExhaustReason {
    /// `limit_total` reached.
    Quota = 1,
    /// `limit_up` reached.
    QuotaUp = 2,
    /// `limit_down` reached.
    QuotaDown = 3,
    /// `expires_at_ns` passed.
    Expired = 4,
}

impl ExhaustReason {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Quota),
            2 => Some(Self::QuotaUp),
            3 => Some(Self::QuotaDown),
            4 => Some(Self::Expired),
            _ => None,
        }
    }
}

/// Packet direction from the client's point of view.
pub mod direction {
    pub const UP: u8 = 0;
    pub const DOWN: u8 = 1;
}

/// Emitted on the `EVENTS` ring buffer, exactly once per policy generation, when a client's
/// first packet is dropped for quota or deadline.
///
/// layout: 48 bytes, align 8
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateEvent {
    pub mac: [u8; 6],
    /// [`ExhaustReason`] as u8.
    pub reason: u8,
    /// [`direction`] of the packet that hit the limit.
    pub direction: u8,
    pub generation: u32,
    pub _pad: u32,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub packets_up: u64,
    /// `bpf_ktime_get_boot_ns()` when the event was emitted.
    pub at_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all impls): `#[repr(C)]`, only integer/byte-array fields, every padding byte is
    // an explicit field, so any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::MacKey {}
    unsafe impl aya::Pod for super::Policy {}
    unsafe impl aya::Pod for super::Usage {}
    unsafe impl aya::Pod for super::GateConfig {}
    unsafe impl aya::Pod for super::VerdictCount {}
    unsafe impl aya::Pod for super::GateEvent {}
    unsafe impl aya::Pod for super::DnsBucket {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::mem::{align_of, size_of};
    use std::{boxed::Box, vec};

    use super::*;

    #[test]
    fn layouts() {
        assert_eq!((size_of::<MacKey>(), align_of::<MacKey>()), (8, 1));
        assert_eq!((size_of::<Policy>(), align_of::<Policy>()), (128, 8));
        assert_eq!((size_of::<Usage>(), align_of::<Usage>()), (128, 64));
        assert_eq!((size_of::<GateConfig>(), align_of::<GateConfig>()), (80, 4));
        assert_eq!(
            (size_of::<VerdictCount>(), align_of::<VerdictCount>()),
            (16, 8)
        );
        assert_eq!((size_of::<GateEvent>(), align_of::<GateEvent>()), (48, 8));
        assert_eq!((size_of::<DnsBucket>(), align_of::<DnsBucket>()), (16, 8));
    }

    #[test]
    fn field_offsets() {
        assert_eq!(core::mem::offset_of!(Policy, limit_total), 8);
        assert_eq!(core::mem::offset_of!(Policy, expires_at_ns), 32);
        assert_eq!(core::mem::offset_of!(Policy, bound_ipv4), 40);
        assert_eq!(core::mem::offset_of!(Policy, slot), 44);
        assert_eq!(core::mem::offset_of!(Policy, rate_down), 48);
        assert_eq!(core::mem::offset_of!(Policy, rate_up), 52);
        assert_eq!(core::mem::offset_of!(Policy, mac), 56);
        assert_eq!(core::mem::offset_of!(Policy, bound_ipv6), 64);
        // The shaping state on its direction's cache line.
        assert_eq!(core::mem::offset_of!(Usage, up_tokens), 32);
        assert_eq!(core::mem::offset_of!(Usage, up_refill_ns), 40);
        assert_eq!(core::mem::offset_of!(Usage, down_next_ns), 80);
        assert_eq!(core::mem::offset_of!(Usage, down_tokens), 88);
        assert_eq!(core::mem::offset_of!(Usage, down_refill_ns), 96);
        assert_eq!(core::mem::offset_of!(Usage, notified_generation), 24);
        assert_eq!(core::mem::offset_of!(Usage, bytes_down), 64);
        assert_eq!(core::mem::offset_of!(GateConfig, gateway_v6), 24);
        assert_eq!(core::mem::offset_of!(GateConfig, dns_rate), 56);
        assert_eq!(core::mem::offset_of!(GateConfig, dns_max_udp), 64);
        assert_eq!(core::mem::offset_of!(GateEvent, generation), 8);
        assert_eq!(core::mem::offset_of!(GateEvent, bytes_up), 16);
    }

    #[test]
    fn index_entries_and_sizes() {
        use super::index::*;
        for r in [0, 1, 77, MAX_RECORDS] {
            let e = entry(0xAB_CDEF_0123, r);
            assert_eq!(record(e), Some(r));
            assert_eq!(e >> RECORD_BITS, 0xAB_CDEF_0123);
            assert_ne!(e, 0);
            assert_ne!(e, TOMB);
        }
        assert_eq!(record(0), None);
        assert_eq!(record(TOMB), None);
        assert_eq!(slots_for(1), 64);
        assert_eq!(slots_for(131_072), 524_288);
        assert_eq!(slots_for(1_000_000), 4_194_304);
        assert_eq!(shift_for(64), 58);
        // The home is the top bits of the product: always inside the table.
        let (seed, shift) = (0x9E37_79B9_7F4A_7C15u64, shift_for(1024));
        for k in [0u64, 1, 0xFFFF_FFFF_FFFF, 0x0200_0000_0001] {
            assert!(hash(k, seed, shift).0 < 1024);
        }
        assert_eq!(MacKey::new([1, 2, 3, 4, 5, 6]).word(), 0x0605_0403_0201);
        assert_eq!(burst_for(0), 128 * 1024);
        assert_eq!(burst_for(5_000_000), 1_000_000);
    }

    /// Longest displacement from home when `keys` are inserted into an index of `cap` clients
    /// with linear probing (the valve's insert, without deletes).
    fn longest_walk(keys: impl Iterator<Item = u64>, seed: u64, cap: u32) -> u64 {
        use super::index::*;
        let slots = slots_for(cap) as usize;
        let shift = shift_for(slots as u32);
        let mut taken = vec![false; slots + MAX_PROBE as usize * 4];
        let mut longest = 0;
        for k in keys {
            let home = hash(k, seed, shift).0 as usize;
            let mut d = 0;
            while taken[home + d] {
                d += 1;
            }
            taken[home + d] = true;
            longest = longest.max(d as u64);
        }
        longest
    }

    /// The shapes of MAC address a crowd (or a hostile customer) brings: consecutive addresses
    /// of one vendor, strides, one varying byte. Whatever the table's random seed, a full table
    /// of them stays far from the walk limit. (A bare multiply-shift fails this: consecutive
    /// keys are an arithmetic progression, and for some multipliers they pile up into runs
    /// longer than `MAX_PROBE`, so a payer at 1/4 load was refused as "full".)
    #[test]
    fn structured_macs_never_fill_a_window() {
        let mut state = 0x1234_5678_9ABC_DEF0u64;
        let mut next = || {
            // splitmix64
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let mac = |a: [u8; 6]| MacKey::new(a).word();
        // 4 000 full tables (≈ 9 M inserts). A random hash's longest walk at 1/4 load is
        // ≈ 16 here (a walk of d entries has odds ≈ (¼·e^¾)^d ≈ 0.53^d); the bare multiply
        // reached 391.
        let mut worst = 0;
        for _ in 0..400 {
            let seed = next() | 1;
            for cap in [256u32, 4096] {
                let n = cap as u64;
                let shapes: [Box<dyn Fn(u64) -> u64>; 5] = [
                    // the last two bytes counting up (the test crowds, a DHCP-like lab)
                    Box::new(|i| mac([2, 0xa2, 0x15, 0xcc, (i >> 8) as u8, i as u8])),
                    // the first byte counting (little-endian word: its low bits)
                    Box::new(|i| mac([(i as u8) << 1, (i >> 7) as u8, 0x15, 0xcc, 0, 1])),
                    // a stride of 4 in the last byte, then the next byte
                    Box::new(|i| mac([2, 0, 0, 0, (i >> 6) as u8, (i << 2) as u8])),
                    // one vendor, the middle bytes counting
                    Box::new(|i| mac([0x3c, 0x22, 0xfb, (i >> 8) as u8, i as u8, 0x10])),
                    // stride of 256: only byte 4 and byte 3 vary
                    Box::new(|i| mac([2, 9, 9, (i >> 8) as u8, i as u8, 7])),
                ];
                for shape in &shapes {
                    worst = worst.max(longest_walk((0..n).map(shape), seed, cap));
                }
            }
        }
        assert!(
            worst < super::index::MAX_PROBE as u64 * 3 / 4,
            "a structured set of MACs walked {worst} entries from home"
        );
    }

    #[test]
    fn verdict_round_trip() {
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i, "ALL is in discriminant order");
            assert_eq!(Verdict::from_u8(*v as u8), Some(*v));
        }
        assert_eq!(Verdict::from_u8(Verdict::COUNT as u8), None);
        assert_eq!(Verdict::from_u8(255), None);
        assert!(Verdict::PassPortal.is_pass());
        assert!(!Verdict::DropUnpaid.is_pass());
        assert_eq!(Verdict::DropQuota.name(), "drop_quota");
    }

    #[test]
    fn exhaust_reason_round_trip() {
        for r in [
            ExhaustReason::Quota,
            ExhaustReason::QuotaUp,
            ExhaustReason::QuotaDown,
            ExhaustReason::Expired,
        ] {
            assert_eq!(ExhaustReason::from_u8(r as u8), Some(r));
        }
        assert_eq!(ExhaustReason::from_u8(0), None);
        assert_eq!(ExhaustReason::from_u8(5), None);
    }
}
