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
//! The operator's side: `ops` serves status, clients, wallet and `/metrics` on the admin
//! address and the `control` Unix socket; the `tollgate` commands are its clients.
//! Each module owns one component and exposes a narrow API; only `valve` touches aya.

pub mod chandler;
pub mod config;
pub mod control;
pub mod daemon;
pub mod db;
pub mod fetch;
pub mod http;
pub mod lightning;
pub mod merchant;
pub mod neighbour;
pub mod ops;
pub mod portal;
pub mod protocol;
pub mod reload;
pub mod shaping;
pub mod store;
pub mod supervisor;
pub mod sys;
pub mod tiers;
pub mod types;
pub mod units;
pub mod upstream;
pub mod valve;
pub mod wallet;
