//! Each client's current rate, from the kernel's counters: what `tollgate clients` shows next
//! to its rate limits and what `/metrics` sums (issue 15: is a customer at its cap, who fills
//! the line).
//!
//! ```text
//! run() task: every `interval` (≥ 2 s, stretched to 50 × the last listing's own time, so the
//!   │         sampling costs ≤ 2 % of a core even at 1 000 000 clients)
//!   └─ Gates::gates() ── observe(gates, now) ── per MAC: bits/s = Δbytes · 8 / Δt since the
//!                                               previous sample (the kernel meters L3 bytes)
//! clients / metrics ── current(mac) | summary()   (read-only, never touch the maps)
//! ```
//! A client seen for the first time has no rate yet (one interval later it has). A client
//! whose entry went (evicted, swept) is forgotten at the next sample, so the table is bounded
//! by the data plane's own `max_clients`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::valve::{GateState, Gates, MacAddr, Rates};

/// The shortest sampling interval.
pub const MIN_INTERVAL: Duration = Duration::from_secs(2);
/// The sampling interval is at least this many times the last listing's own duration.
const COST_FACTOR: u32 = 50;
/// At or above this share of its limit (a policed TCP flow averages a little under its cap) a client counts as held at its cap.
const AT_CAP: f64 = 0.8;

/// A client's rate over the last sampling interval, bits per second of L3 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentRate {
    pub up_bps: u64,
    pub down_bps: u64,
}

/// What `/metrics` shows of the rates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RateSummary {
    /// Sum over every client.
    pub total: CurrentRate,
    /// Clients whose rate is at least 80 % of their limit: (up, down).
    pub at_cap: (u64, u64),
    /// The fastest clients by download + upload, at most `TOP` of them, fastest first.
    pub top: Vec<(MacAddr, CurrentRate)>,
    /// Length of the interval the rates are over, ms (0 = no two samples yet).
    pub window_ms: u64,
}

/// Clients listed by name in `/metrics` (the rest only in the sums: one series per client
/// would grow the scrape with the client count).
pub const TOP: usize = 10;

struct Sample {
    bytes_up: u64,
    bytes_down: u64,
    rates: Rates,
    current: Option<CurrentRate>,
}

#[derive(Default)]
struct Inner {
    at: Option<Instant>,
    window: Duration,
    clients: HashMap<MacAddr, Sample>,
}

/// The per-client rates, shared between the sampling task and the readers.
#[derive(Default)]
pub struct RateMeter {
    inner: Mutex<Inner>,
}

impl RateMeter {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding it leaves plain numbers behind: still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one sample of every gate at `now`.
    pub fn observe(&self, gates: &[GateState], now: Instant) {
        let mut m = self.lock();
        let dt = m.at.map(|at| now.saturating_duration_since(at));
        let mut next = HashMap::with_capacity(gates.len());
        for g in gates {
            let (up, down) = (g.usage.bytes_up, g.usage.bytes_down);
            let current = match (m.clients.get(&g.mac), dt) {
                (Some(prev), Some(dt)) if !dt.is_zero() => Some(CurrentRate {
                    // Counters restart from zero when an entry is re-created: no rate then.
                    up_bps: bps(up.checked_sub(prev.bytes_up), dt),
                    down_bps: bps(down.checked_sub(prev.bytes_down), dt),
                }),
                _ => None,
            };
            next.insert(
                g.mac,
                Sample {
                    bytes_up: up,
                    bytes_down: down,
                    rates: g.rates,
                    current,
                },
            );
        }
        m.clients = next;
        m.window = dt.unwrap_or_default();
        m.at = Some(now);
    }

    /// `mac`'s rate over the last interval (`None`: not sampled twice yet).
    pub fn current(&self, mac: MacAddr) -> Option<CurrentRate> {
        self.lock().clients.get(&mac).and_then(|s| s.current)
    }

    pub fn summary(&self) -> RateSummary {
        let m = self.lock();
        let mut s = RateSummary {
            window_ms: m.window.as_millis() as u64,
            ..RateSummary::default()
        };
        let mut all = Vec::new();
        for (mac, c) in &m.clients {
            let Some(r) = c.current else { continue };
            s.total.up_bps = s.total.up_bps.saturating_add(r.up_bps);
            s.total.down_bps = s.total.down_bps.saturating_add(r.down_bps);
            s.at_cap.0 += u64::from(at_cap(r.up_bps, c.rates.up_kbit));
            s.at_cap.1 += u64::from(at_cap(r.down_bps, c.rates.down_kbit));
            if r != CurrentRate::default() {
                all.push((*mac, r));
            }
        }
        all.sort_by_key(|(mac, r)| (std::cmp::Reverse(r.up_bps.saturating_add(r.down_bps)), *mac));
        all.truncate(TOP);
        s.top = all;
        s
    }

    /// Samples `gates` until `stop` is cancelled (the valve is read off the async workers).
    pub async fn run<G: Gates + Send + Sync + 'static>(
        self: Arc<Self>,
        gates: Arc<G>,
        stop: CancellationToken,
    ) {
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
            let g = gates.clone();
            let t0 = Instant::now();
            match tokio::task::spawn_blocking(move || g.gates()).await {
                Ok(Ok(list)) => self.observe(&list, Instant::now()),
                Ok(Err(e)) => tracing::warn!(error = %e, "sampling client rates"),
                Err(e) => tracing::warn!(error = %e, "client rate task"),
            }
            wait = MIN_INTERVAL.max(t0.elapsed() * COST_FACTOR);
        }
    }
}

fn bps(delta: Option<u64>, dt: Duration) -> u64 {
    delta.map_or(0, |d| {
        (u128::from(d) * 8 * 1_000_000_000 / dt.as_nanos().max(1)).min(u128::from(u64::MAX)) as u64
    })
}

fn at_cap(bps: u64, limit_kbit: u64) -> bool {
    limit_kbit != 0 && bps as f64 >= limit_kbit as f64 * 1e3 * AT_CAP
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::valve::ClientUsage;

    fn gate(mac: u8, up: u64, down: u64, down_kbit: u64) -> GateState {
        GateState {
            mac: MacAddr([2, 0, 0, 0, 0, mac]),
            open: true,
            remaining_bytes: None,
            until_boot_ns: None,
            bound_ipv4: None,
            generation: 1,
            usage: ClientUsage {
                bytes_up: up,
                bytes_down: down,
                ..ClientUsage::default()
            },
            rates: Rates {
                down_kbit,
                up_kbit: 0,
            },
        }
    }

    #[test]
    fn rates_are_deltas_over_the_interval_and_gone_clients_are_forgotten() {
        let m = RateMeter::default();
        let t0 = Instant::now();
        m.observe(&[gate(1, 0, 0, 1_000), gate(2, 5, 5, 0)], t0);
        assert_eq!(
            m.current(MacAddr([2, 0, 0, 0, 0, 1])),
            None,
            "one sample: no rate"
        );
        let t1 = t0 + Duration::from_secs(2);
        // Client 1: 250 000 B down in 2 s = 1 Mbit/s, at its 1 000 kbit/s cap. Client 2's
        // counters went backwards (its entry was re-created): no rate rather than a huge one.
        // Client 3 is new.
        m.observe(
            &[
                gate(1, 1_000, 250_000, 1_000),
                gate(2, 0, 0, 0),
                gate(3, 9, 9, 0),
            ],
            t1,
        );
        assert_eq!(
            m.current(MacAddr([2, 0, 0, 0, 0, 1])),
            Some(CurrentRate {
                up_bps: 4_000,
                down_bps: 1_000_000
            })
        );
        assert_eq!(
            m.current(MacAddr([2, 0, 0, 0, 0, 2])),
            Some(CurrentRate::default())
        );
        assert_eq!(m.current(MacAddr([2, 0, 0, 0, 0, 3])), None);
        let s = m.summary();
        assert_eq!(s.window_ms, 2_000);
        assert_eq!(s.total.down_bps, 1_000_000);
        assert_eq!(s.at_cap, (0, 1));
        assert_eq!(s.top.len(), 1, "idle clients are not listed");
        m.observe(&[gate(3, 9, 9, 0)], t1 + Duration::from_secs(2));
        assert_eq!(
            m.current(MacAddr([2, 0, 0, 0, 0, 1])),
            None,
            "gone: forgotten"
        );
        assert_eq!(m.lock().clients.len(), 1);
    }

    #[test]
    fn the_top_list_is_bounded_and_fastest_first() {
        let m = RateMeter::default();
        let t0 = Instant::now();
        let n = 3 * TOP as u8;
        m.observe(&(0..n).map(|i| gate(i, 0, 0, 0)).collect::<Vec<_>>(), t0);
        m.observe(
            &(0..n)
                .map(|i| gate(i, 0, u64::from(i) * 1_000, 0))
                .collect::<Vec<_>>(),
            t0 + Duration::from_secs(1),
        );
        let s = m.summary();
        assert_eq!(s.top.len(), TOP);
        assert_eq!(s.top[0].0, MacAddr([2, 0, 0, 0, 0, n - 1]));
        assert!(s.top.windows(2).all(|w| w[0].1.down_bps >= w[1].1.down_bps));
    }
}
