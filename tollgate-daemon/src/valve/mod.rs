//! The valve: the only code that touches BPF maps (and the only importer of aya).
//!
//! The implementation lands with the data-plane issue; the [`Gates`] trait is the seam the
//! chandler drives (the real [`Valve`] in production and tests, an in-memory double only in
//! unit tests of session arithmetic).

mod types;

pub use types::*;

/// Errors of the valve.
#[derive(Debug, thiserror::Error)]
pub enum ValveError {
    /// The per-client maps are full: the gate cannot be opened (the payment must not be taken).
    #[error("no room for client {mac} in the data plane ({capacity} clients)")]
    Full { mac: MacAddr, capacity: u32 },
    /// A BPF map operation failed.
    #[error("bpf map {map}: {message}")]
    Map { map: &'static str, message: String },
    /// Loading or attaching the programs failed.
    #[error("data plane attach on {iface}: {message}")]
    Attach { iface: String, message: String },
    #[error("{0}")]
    Other(String),
}

/// The verbs the chandler needs from the data plane.
///
/// Byte allowances are relative to the kernel's cumulative counters at the time of the call;
/// the kernel enforces them (and deadlines) on its own, even while the daemon is down.
pub trait Gates: Send + Sync + 'static {
    /// Pre-flight before taking money: can a gate be opened for `mac` right now?
    fn check(&self, mac: MacAddr) -> Result<(), ValveError>;
    /// Opens (or replaces) the gate: `allowance` counts from now.
    fn open(&self, mac: MacAddr, allowance: Allowance) -> Result<GateState, ValveError>;
    /// Extends an open gate without a gap: byte limit += `add_bytes`,
    /// deadline = max(now, deadline) + `add_ns` (only if the gate has a deadline or `add_ns` > 0).
    fn extend(&self, mac: MacAddr, add_bytes: u64, add_ns: u64) -> Result<GateState, ValveError>;
    /// Shuts the gate (counters are kept).
    fn close(&self, mac: MacAddr) -> Result<(), ValveError>;
    /// One client's gate and counters; `None` if the kernel has never heard of it.
    fn gate(&self, mac: MacAddr) -> Result<Option<GateState>, ValveError>;
    /// All clients with a gate or counters.
    fn gates(&self) -> Result<Vec<GateState>, ValveError>;
    /// `CLOCK_BOOTTIME` ns, the clock deadlines are expressed in.
    fn now_boot_ns(&self) -> u64 {
        boot_time_ns()
    }
}
