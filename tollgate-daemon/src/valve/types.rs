//! Plain types of the valve's API (no aya here, so they can be used and tested anywhere).

use std::{fmt, net::Ipv4Addr, str::FromStr};

use serde::{Deserialize, Serialize};
pub use tollgate_common::{ExhaustReason, Verdict};

/// An Ethernet address, `aa:bb:cc:dd:ee:ff` in text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid MAC address {0:?} (expected aa:bb:cc:dd:ee:ff)")]
pub struct ParseMacError(pub String);

impl FromStr for MacAddr {
    type Err = ParseMacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.chars().take(64).collect());
        let mut out = [0u8; 6];
        let mut parts = s.trim().split([':', '-']);
        for byte in out.iter_mut() {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A client's rate limits in kbit/s of L3 traffic (1 kbit = 1000 bits); 0 = unlimited.
/// Download is shaped (EDT + `fq`), upload policed (token bucket) in the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rates {
    #[serde(default)]
    pub down_kbit: u64,
    #[serde(default)]
    pub up_kbit: u64,
}

impl Rates {
    /// No limit either way.
    pub const UNLIMITED: Rates = Rates {
        down_kbit: 0,
        up_kbit: 0,
    };
    /// The largest rate the kernel takes: `u32::MAX` bytes per second (≈ 34 Gbit/s).
    pub const MAX_KBIT: u64 = u32::MAX as u64 / 125;

    pub fn is_unlimited(&self) -> bool {
        self.down_kbit == 0 && self.up_kbit == 0
    }

    /// L3 bytes per second the kernel enforces for `kbit` (0 = unlimited), clamped to
    /// [`Rates::MAX_KBIT`].
    pub fn bytes_per_s(kbit: u64) -> u32 {
        kbit.min(Self::MAX_KBIT).saturating_mul(125) as u32
    }

    /// The token bucket of a policed direction at `bytes_per_s` (the kernel's sizing,
    /// `tollgate_common::burst_for`).
    pub fn burst(bytes_per_s: u32) -> u32 {
        tollgate_common::burst_for(bytes_per_s)
    }
}

/// What a gate allows from the moment it is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allowance {
    /// Bytes (up + down, L3) allowed from now on; `None` = no byte limit.
    pub bytes: Option<u64>,
    /// Separate upload limit from now on; `None` = none.
    pub bytes_up: Option<u64>,
    /// Separate download limit from now on; `None` = none.
    pub bytes_down: Option<u64>,
    /// `CLOCK_BOOTTIME` nanoseconds after which the kernel shuts the gate; `None` = none.
    pub until_boot_ns: Option<u64>,
    /// Drop IPv4 packets from this MAC with any other source address.
    pub bind_ipv4: Option<Ipv4Addr>,
    /// Rate limits; `None` = those of the gate already open (a top-up keeps its rate), else
    /// the valve's default ([`super::ValveConfig::default_rates`]).
    pub rates: Option<Rates>,
}

/// Cumulative counters the kernel keeps for one client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientUsage {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub packets_up: u64,
    pub packets_down: u64,
    /// CLOCK_MONOTONIC ns when the valve last saw the counters move (the kernel reads no
    /// clock on the metered path; 0 = never).
    pub last_seen_ns: u64,
}

impl ClientUsage {
    pub fn bytes(&self) -> u64 {
        self.bytes_up.saturating_add(self.bytes_down)
    }
}

/// A client's gate as the kernel sees it right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateState {
    pub mac: MacAddr,
    /// The gate is open (it may still be exhausted or expired: see `remaining_bytes` / deadline).
    pub open: bool,
    /// Bytes left before the kernel drops (`None` = no byte limit).
    pub remaining_bytes: Option<u64>,
    /// Boot-time ns deadline (`None` = none).
    pub until_boot_ns: Option<u64>,
    pub bound_ipv4: Option<Ipv4Addr>,
    pub generation: u32,
    pub usage: ClientUsage,
    /// The rate limits in force (as the kernel has them, rounded to whole kbit).
    #[serde(default)]
    pub rates: Rates,
}

/// The kernel shut a gate: quota used up or deadline passed. Emitted once per exhaustion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhaustion {
    pub mac: MacAddr,
    pub reason: ExhaustReason,
    /// The policy generation that ran out (a later open/extend has a higher one).
    pub generation: u32,
    pub usage: ClientUsage,
    pub at_boot_ns: u64,
}

/// Why a client's entry was evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictReason {
    /// Closed for longer than the retention.
    Retention,
    /// The map was near full: the closed entry idle longest made room.
    Pressure,
}

/// Evictions since the valve was loaded, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evictions {
    pub retention: u64,
    pub pressure: u64,
}

/// What one [`super::Gates::sweep`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub evicted: u32,
    /// POLICY entries after the sweep.
    pub occupied: u32,
    pub capacity: u32,
}

/// Packet and byte counts by verdict, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerdictCounts(pub Vec<(Verdict, u64, u64)>);

impl VerdictCounts {
    pub fn packets(&self, v: Verdict) -> u64 {
        self.0.iter().find(|(x, ..)| *x == v).map_or(0, |e| e.1)
    }
    pub fn bytes(&self, v: Verdict) -> u64 {
        self.0.iter().find(|(x, ..)| *x == v).map_or(0, |e| e.2)
    }
}

/// The data plane's CONFIG and GARDEN maps, decoded (for operators).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigView {
    /// The configuration has been written (before that every client is treated as unpaid).
    pub configured: bool,
    /// Unpaid TCP/80 is marked for the captive-portal redirect.
    pub portal_redirect: bool,
    pub portal_mark: u32,
    pub gateway_v4: Option<Ipv4Addr>,
    pub gateway_v6: Vec<std::net::Ipv6Addr>,
    /// TCP ports on the gateway open to unpaid clients.
    pub tcp_ports: Vec<u16>,
    /// Walled-garden prefixes (`addr/len`).
    pub garden: Vec<String>,
    /// DNS budget of unpaid MACs (None = unlimited).
    #[serde(default)]
    pub dns_budget: Option<DnsBudget>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_rejects() {
        let m: MacAddr = "AA:bb:0c:dd:ee:0F".parse().unwrap();
        assert_eq!(m.0, [0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0x0f]);
        assert_eq!(m.to_string(), "aa:bb:0c:dd:ee:0f");
        assert_eq!("aa-bb-0c-dd-ee-0f".parse::<MacAddr>().unwrap(), m);
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aa:bb:cc:dd:ee:fg",
            "a:bb:cc:dd:ee:ff",
            "aaa:bb:cc:dd:ee:f",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} must be rejected");
        }
    }
}

/// The DNS budget of an unpaid MAC, enforced in the kernel (per-MAC token bucket on DNS to
/// and from the gateway, both directions' L3 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsBudget {
    /// Sustained bytes per second.
    pub rate: u32,
    /// Bucket size in bytes (what a fresh MAC may send at once).
    pub burst: u32,
    /// UDP queries with a larger payload are dropped.
    pub max_udp_payload: u16,
}

impl Default for DnsBudget {
    fn default() -> Self {
        Self {
            rate: tollgate_common::DNS_RATE_DEFAULT,
            burst: tollgate_common::DNS_BURST_DEFAULT,
            max_udp_payload: tollgate_common::DNS_MAX_UDP_DEFAULT,
        }
    }
}

/// Where a program sits in an interface's TCX chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TcxPosition {
    /// `ingress` or `egress`.
    pub hook: &'static str,
    /// Programs before ours (id and name), the ones that can bypass the gate.
    pub before: Vec<String>,
    /// Number of programs after ours (they run on what we pass).
    pub after: usize,
    /// Ours was found in the chain at all.
    pub attached: bool,
}

/// The policy index's health (`Valve::index_shape`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IndexShape {
    /// Longest walk a present client needs, in entries (1 = found at its home).
    pub longest_walk: u32,
    /// Deleted entries still inside runs (walks pass them; inserts reuse them).
    pub tombstones: u32,
    /// The longest walk the kernel makes.
    pub max_walk: u32,
}
