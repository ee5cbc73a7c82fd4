//! tollgate: sell network access for Cashu ecash, enforced by an eBPF data plane.
//!
//! ```text
//!  customer ──HTTP :2121──> http ──> merchant ──receive──> wallet (cdk + SQLite)
//!                                       │ grant
//!                                       v
//!                                    chandler ──open/extend/close──> valve ──> BPF maps (kernel)
//!                                       ^                                       │
//!                                       └──────── exhaustion events ────────────┘
//! ```
//! Each module owns one component and exposes a narrow API; only `valve` touches aya.

pub mod chandler;
pub mod config;
pub mod daemon;
pub mod http;
pub mod merchant;
pub mod neighbour;
pub mod portal;
pub mod protocol;
pub mod store;
pub mod valve;
pub mod wallet;
