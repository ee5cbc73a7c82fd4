//! Our own count of the upstream traffic, compared with the upstream's `/usage`.
//!
//! ```text
//!  every /usage poll (metric bytes or not):
//!    gateway IP ─/proc/net/arp─> upstream MAC ─(new?)─> WanMeter::watch(mac, gateway IP)
//!    WanMeter::read(mac) ─> ours = sent + received (cumulative, WAN TC hooks)
//!    reference (ours₀, theirs₀): set at the first poll with a session, at each purchase that
//!      started a new session (ours at that moment, 0), and again whenever `used` goes down
//!    compare ours − ours₀ with used − theirs₀; large = |difference| > max(10 %, 64 KiB)
//! ```
//! **What each side counts.** Both count L3 bytes (IP header included, Ethernet excluded) of
//! the same frames on the same link: we on our WAN interface keyed by the upstream's MAC, the
//! upstream on its LAN interface keyed by ours. Both leave out traffic to/from the upstream's
//! own (IPv4 gateway) address — the `/usage` polls and the payments themselves — and neighbour
//! discovery. Expected, small differences: GSO/GRO aggregates (each side meters an aggregate as
//! one packet with one set of headers, and the two sides aggregate differently, ~3 % of a bulk
//! upload), packets the upstream dropped after we sent them (e.g. past its quota), traffic to
//! the upstream's IPv6 addresses (we only know its IPv4 gateway address), and whatever was in
//! flight between its answer and our read. A large difference means one of the meters is wrong
//! (or the upstream bills what it does not carry): it is logged and exposed, never acted on.

use super::MeterStatus;
use crate::valve::MacAddr;

/// A difference below this never counts as large (in-flight traffic, aggregation effects).
pub const MIN_LARGE_BYTES: u64 = 64 * 1024;
/// Relative difference above which (and above [`MIN_LARGE_BYTES`]) the meters disagree.
pub const LARGE_FRACTION: f64 = 0.10;

/// Where both meters stood when the comparison (re)started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reference {
    pub ours: u64,
    pub theirs: u64,
}

/// The comparison of our count (`ours`, cumulative) with the upstream's `used`, both since
/// `reference`. `theirs = None` when the upstream meters time (nothing to compare).
pub fn compare(
    mac: MacAddr,
    sent: u64,
    received: u64,
    reference: Reference,
    theirs: Option<u64>,
) -> MeterStatus {
    let ours_total = sent.saturating_add(received);
    let ours = ours_total.saturating_sub(reference.ours);
    let mut s = MeterStatus {
        upstream_mac: mac.to_string(),
        ours,
        sent,
        received,
        ..Default::default()
    };
    let Some(used) = theirs else { return s };
    let theirs = used.saturating_sub(reference.theirs);
    let diff = ours as i128 - theirs as i128;
    let abs = diff.unsigned_abs() as u64;
    let base = ours.max(theirs);
    s.theirs = Some(theirs);
    s.difference = Some(diff.clamp(i64::MIN as i128, i64::MAX as i128) as i64);
    s.disagreement = if base == 0 {
        0.0
    } else {
        abs as f64 / base as f64
    };
    let threshold = MIN_LARGE_BYTES.max((base as f64 * LARGE_FRACTION) as u64);
    s.threshold = threshold;
    s.large = abs > threshold;
    if s.large {
        s.warning = Some(format!(
            "our WAN meter counts {ours} bytes with the upstream ({mac}), its /usage {theirs}: \
             {} {} bytes apart ({:.1} %)",
            if diff > 0 { "we count" } else { "it bills" },
            abs,
            s.disagreement * 100.0
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xb]);
    const ZERO: Reference = Reference { ours: 0, theirs: 0 };

    #[test]
    fn agreement_within_the_threshold() {
        let s = compare(MAC, 100_000, 900_000, ZERO, Some(950_000));
        assert_eq!(s.ours, 1_000_000);
        assert_eq!(s.theirs, Some(950_000));
        assert_eq!(s.difference, Some(50_000));
        assert!(!s.large && s.warning.is_none());
        assert_eq!(s.threshold, 100_000);
        assert!((s.disagreement - 0.05).abs() < 1e-9);
    }

    #[test]
    fn small_absolute_differences_are_never_large() {
        // 100 % apart but under 64 KiB: a poll racing a transfer, not a broken meter.
        let s = compare(MAC, 0, 60_000, ZERO, Some(0));
        assert!(!s.large);
        assert_eq!(s.disagreement, 1.0);
        assert_eq!(compare(MAC, 0, 0, ZERO, Some(0)).disagreement, 0.0);
    }

    #[test]
    fn large_disagreement_is_flagged_both_ways() {
        let s = compare(MAC, 0, 1_000_000, ZERO, Some(2_000_000));
        assert!(s.large);
        assert_eq!(s.difference, Some(-1_000_000));
        assert!(s.warning.unwrap().contains("it bills 1000000"));
        let s = compare(MAC, 0, 2_000_000, ZERO, Some(1_000_000));
        assert!(s.large && s.warning.unwrap().contains("we count"));
    }

    #[test]
    fn counts_start_at_the_reference() {
        let r = Reference {
            ours: 5_000_000,
            theirs: 700,
        };
        let s = compare(MAC, 1_000_000, 4_200_000, r, Some(200_700));
        assert_eq!((s.ours, s.theirs), (200_000, Some(200_000)));
        assert_eq!((s.sent, s.received), (1_000_000, 4_200_000));
        // A counter below the reference (pins removed by hand) saturates instead of wrapping.
        let s = compare(MAC, 0, 0, r, Some(0));
        assert_eq!((s.ours, s.theirs), (0, Some(0)));
    }

    #[test]
    fn time_metric_has_nothing_to_compare() {
        let s = compare(MAC, 10, 20, ZERO, None);
        assert_eq!(s.ours, 30);
        assert_eq!((s.theirs, s.difference, s.large), (None, None, false));
    }
}
