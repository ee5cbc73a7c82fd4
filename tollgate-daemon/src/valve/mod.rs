//! The valve: the only code that touches BPF maps (and the only importer of aya).
//!
//! ```text
//!  Valve::attach(cfg)
//!    mount bpffs if missing ── load the embedded object with every map pinned at
//!    <pin_base>/v<SCHEMA>/<MAP> (reused when present, so counts survive restarts)
//!    ── write CONFIG + GARDEN ── attach TC ingress/egress (or XDP ingress + TC egress):
//!       a pinned link is *updated in place* (bpf_link_update: no gap, same chain position),
//!       else attached FIRST in the TCX chain and pinned; `tcx_positions` reports programs
//!       another party put before ours
//!  open / extend / close  ──> POLICY[mac]   (the policy table, `table.rs`: a fresh record
//!                                            published through the index; limits are absolute
//!                                            on the kernel's counters; `slot` = the client's
//!                                            index in the USAGE array)
//!  open of a new client   a slot from the free list (FIFO, ≥ 10 ms after its eviction)
//!                         ── zeroed ── then POLICY[mac]
//!  check(mac)             capacity only: never creates an entry (money is not taken yet)
//!  sweep(retention)       closed entries ──(closed ≥ retention, or idle longest first
//!                         when the map is near full)──> deleted from POLICY, slot freed;
//!                         an open gate (a paid, active client) is never evicted
//!  gate / gates / verdicts <── the table's mirror and records, USAGE[slot] through a shared
//!                             mapping (no syscall per client), VERDICTS
//!  events()               <── EVENTS ring buffer (pinned: events emitted while the daemon was
//!                             down are still there at the next start)
//!  set_rate(mac, rates)   ──> POLICY[mac] rates only (limits, generation, counts untouched:
//!                             a tier raised mid-transfer takes effect on the next packet)
//! ```
//! Rates (kbit/s in the API, bytes/s in the kernel, 0 = unlimited) travel with the policy:
//! `open` takes them from the allowance, else keeps an open gate's, else the configured
//! default; `extend` keeps them. The shaping state (EDT clock, upload bucket) is the kernel's.
//!
//! Dropping a `Valve` leaves everything attached and enforcing (fail closed, counts kept);
//! [`Valve::remove_pins`] tears a data plane down. A load over an earlier schema's pins
//! (`v4`: a policy hash map; `v3`: no rates; `v2`: two hash maps) carries every client and
//! its counts into the new layout.
//!
//! The kernel keeps no clock on the metered path: "last seen" is when the valve saw a
//! client's counters move (at a `gate`, `gates` or `sweep`), which orders evictions.
//!
//! ```text
//!  Valve::attach_meter(wan, pin_base)   a second instance, pins at <pin_base>/wan/v<SCHEMA>/,
//!    CONFIG = CONFIGURED | METER_ONLY   every frame passes; only watched MACs are counted
//!  WanMeter::watch(upstream mac, ip)    POLICY[mac] present (its limits are ignored) +
//!                                       the upstream's own address (not counted, not billed)
//!  WanMeter::read(mac)               <── USAGE[mac] from our side: sent / received
//! ```

mod table;
mod types;

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, VecDeque},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, IterableMap, MapData, MapError, PerCpuArray, RingBuf,
    },
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    sys::SyscallError,
    Ebpf, EbpfLoader,
};
use table::{Counters, NoRoom, PolicyTable};
pub use tollgate_common::MAX_BOUND_V6;
use tollgate_common::{
    config_flags, maps, policy_flags, programs, GateConfig, GateEvent, MacKey, Policy, Usage,
    VerdictCount, GARDEN_TCP_PORTS, MAX_CLIENTS, SCHEMA_VERSION, UNLIMITED,
};
pub use types::*;

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tollgate.bpf.o"));

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
    /// The data-plane configuration is invalid.
    #[error("data plane configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Other(String),
}

/// The valve's error for a client the policy table has no room for. A full window is
/// reported as `Full` too (the payment must not be taken), with the reason logged.
fn no_room(mac: MacAddr, capacity: u32, why: NoRoom) -> ValveError {
    if why == NoRoom::Window {
        tracing::warn!(
            %mac,
            "policy index: every entry within reach of this client's home is taken \
             (improbable below the table's 1/4 load; restart with a larger max_clients)"
        );
    }
    ValveError::Full { mac, capacity }
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> ValveError {
    move |e| ValveError::Map {
        map,
        message: e.to_string(),
    }
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
    /// Changes an open gate's rate limits without touching its limits, deadline or counts
    /// (one map update: no gap). The default serves gates without rate limits.
    fn set_rate(&self, mac: MacAddr, rates: Rates) -> Result<GateState, ValveError> {
        let _ = rates;
        Err(ValveError::Other(format!(
            "cannot change the rate of {mac}: rate limits are not supported here"
        )))
    }
    /// Shuts the gate (counters are kept until a [`Gates::sweep`] evicts the entry).
    fn close(&self, mac: MacAddr) -> Result<(), ValveError>;
    /// Evicts closed entries: those closed for at least `retention`, and, when the map is
    /// near full, those idle longest. Never an open gate.
    fn sweep(&self, retention: Duration) -> Result<SweepReport, ValveError>;
    /// Binds an open gate to the IPv4 source address `ip` (upload from the MAC with any other
    /// IPv4 source is dropped as `drop_spoofed`); `None` unbinds. Kept by `extend`.
    fn bind_ipv4(&self, mac: MacAddr, ip: Option<Ipv4Addr>) -> Result<(), ValveError>;
    /// Binds an open gate to the source addresses `addrs` (at most one IPv4 and
    /// [`MAX_BOUND_V6`] IPv6): uploads of the family with an address bound are dropped as
    /// `drop_spoofed` from any other source (an IPv6 link-local source may still reach the
    /// gateway itself); a family without one is not restricted; `&[]` unbinds. Kept by
    /// `extend`. The default serves gates that bind IPv4 only.
    fn bind(&self, mac: MacAddr, addrs: &[IpAddr]) -> Result<(), ValveError> {
        let mut v4 = None;
        for a in addrs {
            match a {
                IpAddr::V4(a) if v4.is_none() => v4 = Some(*a),
                _ => {
                    return Err(ValveError::Config(format!(
                        "cannot bind {mac} to {addrs:?}: one IPv4 address only here"
                    )))
                }
            }
        }
        self.bind_ipv4(mac, v4)
    }
    /// Packets the kernel dropped because a bound MAC sent from another address (cumulative).
    fn spoofed_drops(&self) -> Result<u64, ValveError>;
    /// One client's gate and counters; `None` if the kernel has never heard of it.
    fn gate(&self, mac: MacAddr) -> Result<Option<GateState>, ValveError>;
    /// All clients with a gate or counters.
    fn gates(&self) -> Result<Vec<GateState>, ValveError>;
    /// `CLOCK_BOOTTIME` ns, the clock deadlines are expressed in.
    fn now_boot_ns(&self) -> u64 {
        crate::sys::clock::boot_ns()
    }
}

/// Where the ingress verdict runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPlaneMode {
    /// TC ingress + TC egress (the right choice on veth and other software devices).
    #[default]
    Tc,
    /// XDP ingress (native where the driver supports it) + TC egress.
    Xdp,
}

/// A walled-garden destination prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::str::FromStr for Prefix {
    type Err = ValveError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || ValveError::Config(format!("invalid prefix {s:?} (expected e.g. 192.0.2.0/24)"));
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.trim().parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if len > max {
            return Err(bad());
        }
        Ok(Prefix { addr, len })
    }
}

impl Prefix {
    /// LPM key: IPv4 mapped into IPv6 (`::ffff:0:0/96`).
    fn key(&self) -> Key<[u8; 16]> {
        match self.addr {
            IpAddr::V4(a) => Key::new(96 + self.len as u32, a.to_ipv6_mapped().octets()),
            IpAddr::V6(a) => Key::new(self.len as u32, a.octets()),
        }
    }
}

/// Where the pins go unless configured otherwise (`<base>/v<SCHEMA_VERSION>/`).
pub const DEFAULT_PIN_BASE: &str = "/sys/fs/bpf/tollgate";

/// What the valve needs to know to attach and configure the data plane.
#[derive(Clone, Debug)]
pub struct ValveConfig {
    /// LAN interface the clients are on.
    pub iface: String,
    pub mode: DataPlaneMode,
    /// Pins go to `<pin_base>/v<SCHEMA_VERSION>/`; default [`DEFAULT_PIN_BASE`].
    pub pin_base: PathBuf,
    /// The gateway's own LAN addresses (answers from them are never billed; DNS/portal on them
    /// are reachable before paying).
    pub gateway_v4: Option<Ipv4Addr>,
    pub gateway_v6: Vec<Ipv6Addr>,
    /// TCP ports on the gateway reachable before paying (portal, payment API).
    pub tcp_ports: Vec<u16>,
    /// Destinations reachable before paying (e.g. the accepted mints).
    pub garden: Vec<Prefix>,
    /// Mark for captive-portal redirects of unpaid TCP/80 (None = no redirect).
    pub portal_mark: Option<u32>,
    /// Meter only: nothing is gated, watched MACs are counted (see
    /// `tollgate_common::config_flags::METER_ONLY`). `gateway_v4`/`gateway_v6` then name the
    /// peer's own addresses, whose traffic is not counted.
    pub meter_only: bool,
    /// Capacity of POLICY and USAGE, set at load time. Pinned maps of another size are
    /// recreated at this size with their entries carried over (refused if they do not fit).
    /// `None`: the pinned maps' size, or [`MAX_CLIENTS`] when nothing is pinned.
    pub max_clients: Option<u32>,
    /// DNS budget of unpaid MACs (None = unlimited DNS to the gateway).
    pub dns_budget: Option<DnsBudget>,
    /// Rate limits of a gate opened without its own ([`Allowance::rates`] = `None`).
    pub default_rates: Rates,
    /// Shaped downloads get an EDT departure time for `fq` (set only once `fq` is the LAN
    /// interface's root qdisc); without it they are policed (token bucket).
    pub edt_down: bool,
}

impl ValveConfig {
    pub fn new(iface: impl Into<String>) -> Self {
        Self {
            iface: iface.into(),
            mode: DataPlaneMode::Tc,
            pin_base: PathBuf::from(DEFAULT_PIN_BASE),
            gateway_v4: None,
            gateway_v6: Vec::new(),
            tcp_ports: vec![2121],
            garden: Vec::new(),
            portal_mark: None,
            meter_only: false,
            max_clients: None,
            dns_budget: Some(DnsBudget::default()),
            default_rates: Rates::UNLIMITED,
            edt_down: false,
        }
    }

    /// The WAN meter's configuration: meter-only, pins under `<pin_base>/wan`, maps sized for
    /// [`METER_CLIENTS`] peers (it counts one at a time; sized like the LAN it would lock
    /// ≈ 40 MiB of kernel memory for that).
    pub fn meter(iface: impl Into<String>, pin_base: &Path) -> Self {
        let mut c = Self::new(iface);
        c.pin_base = meter_pin_base(pin_base);
        c.tcp_ports = Vec::new();
        c.meter_only = true;
        c.dns_budget = None;
        c.max_clients = Some(METER_CLIENTS);
        c
    }

    pub fn pin_dir(&self) -> PathBuf {
        pin_dir(&self.pin_base)
    }

    fn gate_config(&self) -> Result<GateConfig, ValveError> {
        if self.tcp_ports.len() > GARDEN_TCP_PORTS {
            return Err(ValveError::Config(format!(
                "at most {GARDEN_TCP_PORTS} garden TCP ports, got {}",
                self.tcp_ports.len()
            )));
        }
        if self.gateway_v6.len() > 2 {
            return Err(ValveError::Config(
                "at most 2 gateway IPv6 addresses".into(),
            ));
        }
        let mut c = GateConfig::EMPTY;
        c.flags = config_flags::CONFIGURED;
        if self.meter_only {
            if self.portal_mark.is_some() {
                return Err(ValveError::Config(
                    "a meter-only data plane redirects nothing (no portal mark)".into(),
                ));
            }
            c.flags |= config_flags::METER_ONLY;
        }
        if let Some(m) = self.portal_mark {
            if m == 0 {
                return Err(ValveError::Config("portal mark must be non-zero".into()));
            }
            c.flags |= config_flags::PORTAL_REDIRECT;
            c.portal_mark = m;
        }
        if let Some(b) = self.dns_budget.filter(|_| !self.meter_only) {
            if b.rate == 0 || (b.burst as u64) < b.max_udp_payload as u64 + 48 {
                return Err(ValveError::Config(format!(
                    "dns budget: the rate must be > 0 and the burst must hold one largest \
                     query ({} bytes)",
                    b.max_udp_payload as u64 + 48
                )));
            }
            c.flags |= config_flags::DNS_BUDGET;
            c.dns_rate = b.rate;
            c.dns_burst = b.burst;
            c.dns_max_udp = b.max_udp_payload;
        }
        if self.edt_down && !self.meter_only {
            c.flags |= config_flags::EDT_DOWN;
        }
        c.gateway_v4 = self.gateway_v4.map_or([0; 4], |a| a.octets());
        for (i, p) in self.tcp_ports.iter().enumerate() {
            c.tcp_ports[i] = *p;
        }
        for (i, a) in self.gateway_v6.iter().enumerate() {
            c.gateway_v6[i] = a.octets();
        }
        Ok(c)
    }
}

/// `<base>/v<SCHEMA_VERSION>`
pub fn pin_dir(base: &Path) -> PathBuf {
    base.join(format!("v{SCHEMA_VERSION}"))
}

/// Index positions a listing ([`Gates::gates`]) or a sweep reads per hold of the valve's lock
/// (≈ 4 000 clients at the index's 1/4 load).
const LIST_PART: u32 = 16_384;

/// Upstream MACs the WAN meter keeps counts for: the watched one and the most recently seen
/// others (a new one evicts the least recently active unwatched entry when the maps are full).
pub const METER_CLIENTS: u32 = 64;

/// `<base>/wan`: the WAN meter's own pin base, so it never shares maps or links with the LAN
/// data plane pinned at `<base>/v<SCHEMA_VERSION>`.
pub fn meter_pin_base(base: &Path) -> PathBuf {
    base.join("wan")
}

/// Our own count of the traffic exchanged with one peer on the WAN (reseller mode: the
/// upstream gateway), next to the upstream's own accounting.
pub trait WanMeter: Send + Sync + 'static {
    /// Counts traffic from and to `mac` from now on (counters already there are kept) and
    /// leaves traffic to/from `peer` itself uncounted, as the upstream does not bill it.
    /// Any previously watched MAC stops being counted.
    fn watch(&self, mac: MacAddr, peer: Ipv4Addr) -> Result<(), ValveError>;
    /// Cumulative L3 bytes from our side: `bytes_up` = sent to `mac`, `bytes_down` =
    /// received from it (`None` before anything was counted).
    fn read(&self, mac: MacAddr) -> Result<Option<ClientUsage>, ValveError>;
}

/// Which program a `test_run` drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    TcIngress,
    TcEgress,
    XdpIngress,
    /// A TC program that only passes: the benchmark's floor for TC.
    EmptyTc,
    /// An XDP program that only passes: the benchmark's floor for XDP.
    EmptyXdp,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::TcIngress => programs::TC_INGRESS,
            Hook::TcEgress => programs::TC_EGRESS,
            Hook::XdpIngress => programs::XDP_INGRESS,
            Hook::EmptyTc => programs::EMPTY_TC,
            Hook::EmptyXdp => programs::EMPTY_XDP,
        }
    }
}

/// Outcome of one `BPF_PROG_TEST_RUN`.
#[derive(Clone, Copy, Debug)]
pub struct TestRunOutcome {
    /// The program's return value (TCX_NEXT = -1 as u32, TC_ACT_SHOT = 2; XDP_DROP = 1,
    /// XDP_PASS = 2).
    pub ret: u32,
    /// Average time per run as measured by the kernel.
    pub duration: Duration,
}

impl TestRunOutcome {
    pub fn passed(&self, hook: Hook) -> bool {
        match hook {
            // TCX_NEXT (-1, what the programs return: pass and let later programs run) or
            // TC_ACT_OK (0).
            Hook::TcIngress | Hook::TcEgress | Hook::EmptyTc => {
                self.ret == u32::MAX || self.ret == 0
            }
            Hook::XdpIngress | Hook::EmptyXdp => self.ret == 2,
        }
    }
}

struct Maps {
    policy: PolicyTable,
    usage: Array<MapData, Usage>,
    /// USAGE as shared memory, for reads (no syscall per client).
    counters: Counters,
    config: Array<MapData, GateConfig>,
    garden: LpmTrie<MapData, [u8; 16], u8>,
    verdicts: PerCpuArray<MapData, VerdictCount>,
    slots: Slots,
    /// [`ValveConfig::default_rates`], as last configured.
    default_rates: Rates,
}

/// Bookkeeping of the per-client slots, kept with the maps (under the same lock).
#[derive(Default)]
struct Slots {
    /// max_entries of POLICY and USAGE.
    capacity: u32,
    /// When each closed entry was first seen closed (by `close` or a sweep).
    closed_since: StdHashMap<MacKey, Instant>,
    /// Highest generation an evicted entry had: a recreated gate starts above it, so an
    /// exhaustion event of the evicted one still waiting in the ring buffer never matches.
    gen_floor: u32,
    evictions: Evictions,
    /// USAGE slots given back by evictions (with when), reused oldest first and never within
    /// [`SLOT_QUARANTINE`] of their eviction: a CPU that looked the evicted client up just
    /// before its deletion has finished with the slot by then, so it never charges a packet to
    /// the slot's next client.
    free: VecDeque<(u32, Instant)>,
    /// Slots from here to `capacity` were never handed out by this valve.
    next_fresh: u32,
    /// Per client: (packets + dropped bytes, CLOCK_MONOTONIC ns when that sum last moved).
    seen: StdHashMap<MacKey, (u64, u64)>,
}

impl Slots {
    /// Rebuilds the free list from the slots POLICY uses (at load).
    fn from_policies(capacity: u32, used: impl Iterator<Item = u32>) -> Slots {
        let mut taken = vec![false; capacity as usize];
        let mut top = 0u32;
        for s in used {
            if let Some(t) = taken.get_mut(s as usize) {
                *t = true;
                top = top.max(s + 1);
            }
        }
        Slots {
            capacity,
            free: (0..top)
                .filter(|s| !taken[*s as usize])
                .map(|s| (s, rested()))
                .collect(),
            next_fresh: top,
            ..Default::default()
        }
    }

    fn take(&mut self) -> Option<u32> {
        if let Some((s, freed)) = self.free.pop_front() {
            // Only when the map is full and a slot was freed just now (eviction to make room).
            if let Some(wait) = SLOT_QUARANTINE.checked_sub(freed.elapsed()) {
                std::thread::sleep(wait);
            }
            return Some(s);
        }
        (self.next_fresh < self.capacity).then(|| {
            self.next_fresh += 1;
            self.next_fresh - 1
        })
    }

    /// Slots handed out and not given back.
    fn in_use(&self) -> u32 {
        self.next_fresh - self.free.len() as u32
    }
}

/// How long a freed USAGE slot rests before it is handed out again: far longer than any
/// program run (microseconds), which is all the kernel's use of a deleted entry can last.
const SLOT_QUARANTINE: Duration = Duration::from_millis(10);

/// A free time for a slot that has rested already (never used, or never really taken).
fn rested() -> Instant {
    let now = Instant::now();
    now.checked_sub(SLOT_QUARANTINE).unwrap_or(now)
}

/// Unpins a link the new attach superseded; a pin that is not there is fine.
fn remove_stale_pin(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "removing a superseded link pin")
        }
    }
}

/// Who loads the maps: the daemon (or `Valve::load`) owns the policy table and repairs what
/// it finds inconsistent; a tool next to a running daemon (`Valve::open_pinned`) never
/// repairs, since a table that looks inconsistent to it may only be mid-update by the owner.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    Daemon,
    Tool,
}

/// The data plane of one LAN interface.
pub struct Valve {
    ebpf: Mutex<Ebpf>,
    maps: parking_lot::Mutex<Maps>,
    events: Mutex<Option<RingBuf<MapData>>>,
    pin_dir: PathBuf,
    iface: String,
    mode: DataPlaneMode,
    attached: bool,
    /// max_entries of POLICY and USAGE as loaded.
    capacity: u32,
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Mounts bpffs on `/sys/fs/bpf` when it is missing (a fresh machine has none).
fn ensure_bpffs(base: &Path) -> Result<(), ValveError> {
    let root = Path::new("/sys/fs/bpf");
    if !base.starts_with(root) {
        return Ok(());
    }
    if crate::sys::fs_magic(root).is_ok_and(|m| m == BPF_FS_MAGIC) {
        return Ok(());
    }
    std::fs::create_dir_all(root).map_err(|e| ValveError::Other(format!("mkdir {root:?}: {e}")))?;
    crate::sys::mount("bpf", root).map_err(|e| ValveError::Other(format!("{e}: {}", e.source)))?;
    tracing::info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}

impl Valve {
    /// Loads the programs and the (pinned) maps and writes the configuration, without
    /// attaching to any interface: what `BPF_PROG_TEST_RUN` tests and benchmarks use.
    pub fn load(cfg: &ValveConfig) -> Result<Valve, ValveError> {
        let valve = Self::load_inner(cfg, Owner::Daemon)?;
        valve.configure(cfg)?;
        Ok(valve)
    }

    /// Opens an existing data plane from its pins without touching its configuration (for
    /// tools that inspect gates next to a running daemon, or drive the gates of a data plane
    /// no daemon writes to: the policy table has one writer at a time). It never repairs
    /// the table.
    pub fn open_pinned(pin_base: &Path) -> Result<Valve, ValveError> {
        let mut cfg = ValveConfig::new("");
        cfg.pin_base = pin_base.to_path_buf();
        if !cfg.pin_dir().join(maps::POLICY).exists() {
            return Err(ValveError::Other(format!(
                "no data plane pinned under {} (is `tollgate run` or `tollgate dataplane attach` running?)",
                cfg.pin_dir().display()
            )));
        }
        Self::load_inner(&cfg, Owner::Tool)
    }

    fn load_inner(cfg: &ValveConfig, owner: Owner) -> Result<Valve, ValveError> {
        ensure_bpffs(&cfg.pin_base)?;
        let dir = cfg.pin_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| ValveError::Other(format!("create pin dir {}: {e}", dir.display())))?;
        let attach_err = |m: String| ValveError::Attach {
            iface: cfg.iface.clone(),
            message: m,
        };
        let names = [
            maps::POLICY,
            maps::INDEX,
            maps::USAGE,
            maps::CONFIG,
            maps::GARDEN,
            maps::VERDICTS,
            maps::EVENTS,
            maps::DNS,
        ];
        let capacity = match cfg.max_clients {
            Some(0) => return Err(ValveError::Config("max_clients must be at least 1".into())),
            Some(n) => n,
            // A tool never resizes the daemon's maps.
            None => pinned_capacity(&dir.join(maps::USAGE))?.unwrap_or(MAX_CLIENTS),
        };
        let mut carried = resize_pinned(&dir, capacity)?;
        let mut upgraded_from = None;
        if carried.is_none() && !dir.join(maps::POLICY).exists() {
            carried = upgrade_from_v4(&cfg.pin_base, capacity)?;
            upgraded_from = carried.is_some().then_some("v4");
            if carried.is_none() {
                carried = upgrade_from_v3(&cfg.pin_base, capacity)?;
                upgraded_from = carried.is_some().then_some("v3");
            }
            if carried.is_none() {
                carried = upgrade_from_v2(&cfg.pin_base, capacity)?;
                upgraded_from = carried.is_some().then_some("v2");
            }
        }
        let mut loader = EbpfLoader::new();
        for n in names {
            loader.map_pin_path(n, dir.join(n));
        }
        let (words, records) = (
            PolicyTable::index_words(capacity),
            PolicyTable::records_for(capacity),
        );
        loader.map_max_entries(maps::INDEX, words);
        loader.map_max_entries(maps::POLICY, records);
        loader.map_max_entries(maps::USAGE, capacity);
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| attach_err(format!("loading the eBPF object: {e}")))?;
        for p in [
            programs::TC_INGRESS,
            programs::TC_EGRESS,
            programs::EMPTY_TC,
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(p)
                .ok_or_else(|| attach_err(format!("program {p} missing from the object")))?
                .try_into()
                .map_err(|e| attach_err(format!("{p}: {e}")))?;
            prog.load()
                .map_err(|e| attach_err(format!("verifier rejected {p}: {e:?}")))?;
        }
        for p in [programs::XDP_INGRESS, programs::EMPTY_XDP] {
            let xdp: &mut Xdp = ebpf
                .program_mut(p)
                .ok_or_else(|| attach_err(format!("program {p} missing from the object")))?
                .try_into()
                .map_err(|e| attach_err(format!("{p}: {e}")))?;
            xdp.load()
                .map_err(|e| attach_err(format!("verifier rejected {p}: {e:?}")))?;
        }

        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(ValveError::Map {
                map: name,
                message: "missing from the object".into(),
            })
        };
        let index_map: Array<MapData, u64> =
            Array::try_from(take(maps::INDEX)?).map_err(map_err(maps::INDEX))?;
        let records_map: Array<MapData, Policy> =
            Array::try_from(take(maps::POLICY)?).map_err(map_err(maps::POLICY))?;
        let policy = PolicyTable::open(
            index_map.map().fd().as_fd(),
            words,
            records_map.map().fd().as_fd(),
            records,
            owner == Owner::Daemon,
        )
        .map_err(|e| ValveError::Map {
            map: maps::INDEX,
            message: format!("mapping the policy table: {e}"),
        })?;
        let usage: Array<MapData, Usage> =
            Array::try_from(take(maps::USAGE)?).map_err(map_err(maps::USAGE))?;
        let counters =
            Counters::open(usage.map().fd().as_fd(), capacity).map_err(|e| ValveError::Map {
                map: maps::USAGE,
                message: format!("mapping the counters: {e}"),
            })?;
        let mut maps = Maps {
            policy,
            usage,
            counters,
            config: Array::try_from(take(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?,
            garden: LpmTrie::try_from(take(maps::GARDEN)?).map_err(map_err(maps::GARDEN))?,
            verdicts: PerCpuArray::try_from(take(maps::VERDICTS)?)
                .map_err(map_err(maps::VERDICTS))?,
            slots: Slots::default(),
            default_rates: Rates::UNLIMITED,
        };
        let used: Vec<u32> = maps.policy.iter().map(|(_, p)| p.slot).collect();
        maps.slots = Slots::from_policies(capacity, used.iter().copied());
        if let Some(entries) = carried {
            // The maps were recreated (another size or schema): put every client back, its
            // counts in a fresh slot, before the links switch to the new programs.
            let n = entries.len();
            for (k, mut p, u) in entries {
                let slot = maps.slots.take().ok_or_else(|| {
                    ValveError::Config(format!("more than max_clients = {capacity} clients"))
                })?;
                maps.usage.set(slot, u, 0).map_err(map_err(maps::USAGE))?;
                p.slot = slot;
                maps.policy
                    .insert(&k, p)
                    .map_err(|e| no_room(MacAddr(k.addr), capacity, e))?;
            }
            tracing::info!(
                clients = n,
                capacity,
                "per-client maps recreated; entries and counts carried over"
            );
            if let Some(v) = upgraded_from {
                // Carried over for good: unpin them so no later load imports them again
                // (the old links keep the maps alive, and enforcing, until they detach).
                let old = cfg.pin_base.join(v);
                unpin_all(&[
                    &old.join(maps::POLICY),
                    &old.join(maps::INDEX),
                    &old.join(maps::USAGE),
                ])?;
            }
        }
        let events = RingBuf::try_from(take(maps::EVENTS)?).map_err(map_err(maps::EVENTS))?;
        let valve = Valve {
            ebpf: Mutex::new(ebpf),
            maps: parking_lot::Mutex::new(maps),
            events: Mutex::new(Some(events)),
            pin_dir: dir,
            iface: cfg.iface.clone(),
            mode: cfg.mode,
            attached: false,
            capacity,
        };
        Ok(valve)
    }

    /// Loads, configures and attaches to `cfg.iface`, reusing pinned maps and links.
    pub fn attach(cfg: &ValveConfig) -> Result<Valve, ValveError> {
        let mut valve = Self::load(cfg)?;
        valve.attach_programs()?;
        valve.attached = true;
        tracing::info!(
            iface = %cfg.iface,
            mode = ?cfg.mode,
            pins = %valve.pin_dir.display(),
            "data plane attached"
        );
        Ok(valve)
    }

    /// Attaches the meter-only instance to the WAN interface `iface`, pins under
    /// `<pin_base>/wan` (see [`WanMeter`]). Like the LAN instance it stays attached when the
    /// valve is dropped: it passes every frame, so that is harmless, and its counts survive
    /// a daemon restart.
    pub fn attach_meter(iface: &str, pin_base: &Path) -> Result<Valve, ValveError> {
        Self::attach(&ValveConfig::meter(iface, pin_base))
    }

    fn attach_programs(&mut self) -> Result<(), ValveError> {
        let iface = self.iface.clone();
        let err = |m: String| ValveError::Attach {
            iface: iface.clone(),
            message: m,
        };
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let ingress_tc = self.pin_dir.join("link_tc_ingress");
        let ingress_xdp = self.pin_dir.join("link_xdp_ingress");
        let egress = self.pin_dir.join("link_tc_egress");
        let mut tc = vec![(programs::TC_EGRESS, TcAttachType::Egress, egress)];
        if self.mode == DataPlaneMode::Tc {
            tc.push((
                programs::TC_INGRESS,
                TcAttachType::Ingress,
                ingress_tc.clone(),
            ));
        }
        for (name, at, pin) in tc {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .expect("loaded above")
                .try_into()
                .map_err(|e| err(format!("{e}")))?;
            match pinned_link(&pin).map_err(|e| err(format!("{}: {e}", pin.display())))? {
                Some(old) => {
                    // Atomic program replacement in the pinned link: no window without a gate.
                    let link = SchedClassifierLink::try_from(old)
                        .map_err(|e| err(format!("pinned link {}: {e}", pin.display())))?;
                    prog.attach_to_link(link)
                        .map_err(|e| err(format!("updating {}: {e}", pin.display())))?;
                }
                None => {
                    // First in the TCX chain: a program before ours could pass a frame
                    // (TC_ACT_OK ends the chain) around the gate.
                    let id = prog
                        .attach_with_options(
                            &self.iface,
                            at,
                            TcAttachOptions::TcxOrder(LinkOrder::first()),
                        )
                        .map_err(|e| err(format!("attach {name}: {e}")))?;
                    let link = prog
                        .take_link(id)
                        .map_err(|e| err(format!("take link {name}: {e}")))?;
                    let fd: FdLink = link
                        .try_into()
                        .map_err(|e: LinkError| err(format!("{name} link: {e}")))?;
                    fd.pin(&pin)
                        .map_err(|e| err(format!("pin {}: {e}", pin.display())))?;
                }
            }
        }
        self.detach_older_schemas();
        if self.mode == DataPlaneMode::Xdp {
            let prog: &mut Xdp = ebpf
                .program_mut(programs::XDP_INGRESS)
                .expect("loaded above")
                .try_into()
                .map_err(|e| err(format!("{e}")))?;
            match pinned_link(&ingress_xdp).map_err(|e| err(format!("{e}")))? {
                Some(old) => {
                    let link = XdpLink::try_from(old).map_err(|e| err(format!("{e}")))?;
                    prog.attach_to_link(link)
                        .map_err(|e| err(format!("updating xdp link: {e}")))?;
                }
                None => {
                    let id = prog
                        .attach(&self.iface, XdpMode::Default)
                        .map_err(|e| err(format!("attach xdp: {e}")))?;
                    let link = prog.take_link(id).map_err(|e| err(format!("{e}")))?;
                    let fd: FdLink = link
                        .try_into()
                        .map_err(|e: LinkError| err(format!("xdp link: {e}")))?;
                    fd.pin(&ingress_xdp)
                        .map_err(|e| err(format!("pin xdp link: {e}")))?;
                }
            }
            // Switching from TC to XDP: the new ingress is in place, now drop the old one
            // (absent when there was none: nothing to drop).
            remove_stale_pin(&ingress_tc);
        } else {
            remove_stale_pin(&ingress_xdp);
        }
        Ok(())
    }

    /// After an upgrade that bumped the schema, the previous version's links would still be
    /// attached next to ours (after them, since ours go first) and would drop every client
    /// opened only in the new maps: remove their pins so they detach. Their maps stay pinned
    /// (`<pin_base>/v<N>/TG_*`) for inspection; `rm -r` them when done.
    fn detach_older_schemas(&self) {
        let Some(base) = self.pin_dir.parent() else {
            return;
        };
        let current = format!("v{SCHEMA_VERSION}");
        for dir in std::fs::read_dir(base).into_iter().flatten().flatten() {
            let name = dir.file_name().to_string_lossy().into_owned();
            let versioned = name.len() > 1
                && name.starts_with('v')
                && name[1..].bytes().all(|b| b.is_ascii_digit());
            if !versioned || name == current {
                continue;
            }
            for link in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if link.file_name().to_string_lossy().starts_with("link_") {
                    match std::fs::remove_file(link.path()) {
                        Ok(()) => tracing::warn!(
                            link = %link.path().display(),
                            "detached a data plane pinned by an older schema"
                        ),
                        Err(e) => tracing::error!(
                            link = %link.path().display(),
                            "cannot detach an older schema's link: {e}"
                        ),
                    }
                }
            }
        }
    }

    /// (Re)writes CONFIG and makes GARDEN equal to the configured prefixes.
    pub fn configure(&self, cfg: &ValveConfig) -> Result<(), ValveError> {
        let gc = cfg.gate_config()?;
        let mut m = self.maps();
        let wanted: BTreeMap<(u32, [u8; 16]), ()> = cfg
            .garden
            .iter()
            .map(|p| {
                let k = p.key();
                ((k.prefix_len(), k.data()), ())
            })
            .collect();
        let existing: Vec<Key<[u8; 16]>> = m.garden.keys().filter_map(|k| k.ok()).collect();
        for k in existing {
            if !wanted.contains_key(&(k.prefix_len(), k.data())) {
                m.garden.remove(&k).map_err(map_err(maps::GARDEN))?;
            }
        }
        for (plen, addr) in wanted.keys() {
            m.garden
                .insert(&Key::new(*plen, *addr), 1, 0)
                .map_err(map_err(maps::GARDEN))?;
        }
        m.config.set(0, gc, 0).map_err(map_err(maps::CONFIG))?;
        m.default_rates = cfg.default_rates;
        Ok(())
    }

    fn maps(&self) -> parking_lot::MutexGuard<'_, Maps> {
        self.maps.lock()
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub fn mode(&self) -> DataPlaneMode {
        self.mode
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn is_attached(&self) -> bool {
        self.attached
    }

    /// Packet/byte counts by verdict, summed over CPUs.
    pub fn verdicts(&self) -> Result<VerdictCounts, ValveError> {
        let m = self.maps();
        let mut out = Vec::new();
        for v in Verdict::ALL {
            let per_cpu = m
                .verdicts
                .get(&(v as u32), 0)
                .map_err(map_err(maps::VERDICTS))?;
            let (p, b) = per_cpu
                .iter()
                .fold((0u64, 0u64), |(p, b), c| (p + c.packets, b + c.bytes));
            out.push((v, p, b));
        }
        Ok(VerdictCounts(out))
    }

    /// Entries in the policy map (walks every key) and USAGE slots in use (occupancy, for
    /// metrics).
    pub fn occupancy(&self) -> (u32, u32) {
        let m = self.maps();
        (m.policy.len() as u32, m.slots.in_use())
    }

    /// The policy index's entry where a lookup of `mac` starts (an offset into the table):
    /// which clients share a window, for diagnostics and the collision tests.
    pub fn index_home(&self, mac: MacAddr) -> u32 {
        self.maps().policy.home_offset(&MacKey::new(mac.0))
    }

    /// How healthy the policy index is: the longest walk a present client needs (entries
    /// from its home to its own; the kernel gives up after `index::MAX_PROBE`) and the
    /// deleted entries still inside runs.
    pub fn index_shape(&self) -> IndexShape {
        let (longest_walk, tombstones) = self.maps().policy.shape();
        IndexShape {
            longest_walk,
            tombstones,
            max_walk: tollgate_common::index::MAX_PROBE,
        }
    }

    /// CONFIG and GARDEN as the kernel has them.
    pub fn config_view(&self) -> Result<ConfigView, ValveError> {
        let m = self.maps();
        let c = m.config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        let mut garden: Vec<String> = m
            .garden
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| {
                let a = Ipv6Addr::from(k.data());
                match a.to_ipv4_mapped() {
                    Some(v4) if k.prefix_len() >= 96 => format!("{v4}/{}", k.prefix_len() - 96),
                    _ => format!("{a}/{}", k.prefix_len()),
                }
            })
            .collect();
        garden.sort();
        Ok(ConfigView {
            configured: c.flags & config_flags::CONFIGURED != 0,
            portal_redirect: c.flags & config_flags::PORTAL_REDIRECT != 0,
            portal_mark: c.portal_mark,
            gateway_v4: (c.gateway_v4 != [0; 4]).then(|| Ipv4Addr::from(c.gateway_v4)),
            gateway_v6: c
                .gateway_v6
                .iter()
                .filter(|a| **a != [0; 16])
                .map(|a| Ipv6Addr::from(*a))
                .collect(),
            tcp_ports: c.tcp_ports.iter().copied().filter(|p| *p != 0).collect(),
            garden,
            dns_budget: (c.flags & config_flags::DNS_BUDGET != 0).then_some(DnsBudget {
                rate: c.dns_rate,
                burst: c.dns_burst,
                max_udp_payload: c.dns_max_udp,
            }),
        })
    }

    /// The pinned program links (`link_tc_ingress`, `link_tc_egress`, `link_xdp_ingress`):
    /// where the data plane is attached. They outlive the process that made them.
    pub fn attach_points(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(&self.pin_dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with("link_"))
            .map(|n| n.trim_start_matches("link_").to_string())
            .collect();
        out.sort();
        out
    }

    /// Our place in the interface's TCX chains (TC mode: ingress and egress; XDP mode:
    /// egress). Programs before ours see every frame first and can pass it around the gate.
    pub fn tcx_positions(&self) -> Result<Vec<TcxPosition>, ValveError> {
        let err = |m: String| ValveError::Attach {
            iface: self.iface.clone(),
            message: m,
        };
        let ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let mut hooks = vec![("egress", programs::TC_EGRESS, TcAttachType::Egress)];
        if self.mode == DataPlaneMode::Tc {
            hooks.insert(0, ("ingress", programs::TC_INGRESS, TcAttachType::Ingress));
        }
        let mut out = Vec::new();
        for (hook, name, at) in hooks {
            let ours = ebpf
                .program(name)
                .ok_or_else(|| err(format!("program {name} missing")))?
                .info()
                .map_err(|e| err(format!("{name} info: {e}")))?
                .id();
            let (_, chain) = SchedClassifier::query_tcx(&self.iface, at)
                .map_err(|e| err(format!("query tcx {hook}: {e}")))?;
            let pos = chain.iter().position(|p| p.id() == ours);
            let before = chain[..pos.unwrap_or(0)]
                .iter()
                .map(|p| format!("{} ({})", p.id(), p.name_as_str().unwrap_or("?")))
                .collect();
            out.push(TcxPosition {
                hook,
                before,
                after: pos.map_or(0, |i| chain.len() - i - 1),
                attached: pos.is_some(),
            });
        }
        Ok(out)
    }

    /// Operator warnings about the TCX chains: foreign programs before ours (they can pass
    /// frames around the gate) or ours missing. Empty when not attached here.
    pub fn tcx_warnings(&self) -> Vec<String> {
        if !self.attached {
            return Vec::new();
        }
        match self.tcx_positions() {
            Ok(ps) => ps
                .into_iter()
                .filter_map(|p| {
                    if !p.attached {
                        Some(format!(
                            "data plane: our tcx {} program is not attached to {}",
                            p.hook, self.iface
                        ))
                    } else if !p.before.is_empty() {
                        Some(format!(
                            "data plane: foreign tcx {} programs run before the gate on {} and \
                             can bypass it: {}",
                            p.hook,
                            self.iface,
                            p.before.join(", ")
                        ))
                    } else {
                        None
                    }
                })
                .collect(),
            Err(e) => vec![format!("data plane: tcx chain unreadable: {e}")],
        }
    }

    /// Capacity of the per-client maps.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Entries evicted since this valve was loaded.
    pub fn evictions(&self) -> Evictions {
        self.maps().slots.evictions
    }

    /// Exhaustion events from the kernel. Can be taken once; the stream ends when the
    /// receiver is dropped.
    pub fn events(&self) -> Result<tokio::sync::mpsc::Receiver<Exhaustion>, ValveError> {
        let ring = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| ValveError::Other("the event stream was already taken".into()))?;
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until the task ends,
        // so the registered fd is never closed or reused while registered.
        let mut afd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
        }
        .map_err(|e| ValveError::Other(format!("ring buffer fd: {e}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                let mut guard = match afd.readable_mut().await {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::error!("exhaustion ring buffer: {e}");
                        return;
                    }
                };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Some(ev) = parse_event(&item) {
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                }
                guard.clear_ready();
            }
        });
        Ok(rx)
    }

    /// Runs one program on a crafted frame with `BPF_PROG_TEST_RUN` (maps are the live ones).
    pub fn test_run(
        &self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, ValveError> {
        self.test_run_ctx(hook, frame, repeat, None).map(|(o, _)| o)
    }

    /// [`Valve::test_run`] of a TC program with the skb's `tstamp` set to `tstamp` (CLOCK_MONOTONIC
    /// ns, 0 = none) going in, and the `tstamp` the program left: how the EDT departure time
    /// is observed.
    pub fn test_run_tstamp(
        &self,
        hook: Hook,
        frame: &[u8],
        tstamp: u64,
    ) -> Result<(TestRunOutcome, u64), ValveError> {
        if matches!(hook, Hook::XdpIngress | Hook::EmptyXdp) {
            return Err(ValveError::Other("an XDP frame has no tstamp".into()));
        }
        let (o, t) = self.test_run_ctx(hook, frame, 1, Some((tstamp, 0)))?;
        Ok((o, t.unwrap_or(0)))
    }

    /// [`Valve::test_run_tstamp`] of a GSO aggregate of `gso_segs` segments (the context's
    /// `gso_segs`), tstamp 0 going in.
    pub fn test_run_gso(
        &self,
        hook: Hook,
        frame: &[u8],
        gso_segs: u32,
    ) -> Result<(TestRunOutcome, u64), ValveError> {
        if matches!(hook, Hook::XdpIngress | Hook::EmptyXdp) {
            return Err(ValveError::Other("an XDP frame has no gso_segs".into()));
        }
        let (o, t) = self.test_run_ctx(hook, frame, 1, Some((0, gso_segs)))?;
        Ok((o, t.unwrap_or(0)))
    }

    fn test_run_ctx(
        &self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
        skb: Option<(u64, u32)>,
    ) -> Result<(TestRunOutcome, Option<u64>), ValveError> {
        // `struct __sk_buff` (uapi, 192 bytes): `tstamp` at 152, `gso_segs` at 164.
        const SKB_SIZE: usize = 192;
        const TSTAMP_OFF: usize = 152;
        const GSO_SEGS_OFF: usize = 164;
        let mut ctx_in = [0u8; SKB_SIZE];
        let mut ctx_out = [0u8; SKB_SIZE];
        if let Some((t, segs)) = skb {
            ctx_in[TSTAMP_OFF..TSTAMP_OFF + 8].copy_from_slice(&t.to_ne_bytes());
            ctx_in[GSO_SEGS_OFF..GSO_SEGS_OFF + 4].copy_from_slice(&segs.to_ne_bytes());
        }
        let ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let prog = ebpf
            .program(hook.program())
            .ok_or_else(|| ValveError::Other("program missing".into()))?;
        let mut out = vec![0u8; frame.len() + 256];
        let with_ctx = skb.is_some();
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: with_ctx.then_some(&ctx_in[..]),
            ctx_out: with_ctx.then_some(&mut ctx_out[..]),
            repeat: repeat.max(1),
            ..Default::default()
        };
        let r = match hook {
            Hook::XdpIngress | Hook::EmptyXdp => {
                let p: &Xdp = prog
                    .try_into()
                    .map_err(|e| ValveError::Other(format!("{e}")))?;
                p.test_run(opts)
            }
            _ => {
                let p: &SchedClassifier = prog
                    .try_into()
                    .map_err(|e| ValveError::Other(format!("{e}")))?;
                p.test_run(opts)
            }
        }
        .map_err(|e| ValveError::Other(format!("BPF_PROG_TEST_RUN: {e:?}")))?;
        let t = with_ctx
            .then(|| u64::from_ne_bytes(ctx_out[TSTAMP_OFF..TSTAMP_OFF + 8].try_into().unwrap()));
        Ok((
            TestRunOutcome {
                ret: r.return_value,
                duration: r.duration,
            },
            t,
        ))
    }

    /// Turns on the kernel's per-program run-time statistics (`BPF_ENABLE_STATS`) for as
    /// long as the returned descriptor lives (benchmarks; it costs two clock reads a run).
    pub fn enable_run_stats() -> Result<std::os::fd::OwnedFd, ValveError> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map_err(|e| ValveError::Other(format!("BPF_ENABLE_STATS: {e}")))
    }

    /// Cumulative (run time ns, run count) of the gate's program at `hook`, as the kernel
    /// counts them while run statistics are on.
    pub fn run_stats(&self, hook: Hook) -> Result<(u64, u64), ValveError> {
        let ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let info = ebpf
            .program(hook.program())
            .ok_or_else(|| ValveError::Other("program missing".into()))?
            .info()
            .map_err(|e| ValveError::Other(format!("program info: {e}")))?;
        Ok((info.run_time().as_nanos() as u64, info.run_count()))
    }

    /// Removes every pin of the data plane under `pin_base`, its WAN meter's included (links
    /// detach once the last reference is gone, i.e. when no process holds them).
    pub fn remove_pins(pin_base: &Path) -> io::Result<()> {
        let meter = meter_pin_base(pin_base);
        if meter.exists() {
            Self::remove_pins(&meter)?;
        }
        let dir = pin_dir(pin_base);
        match std::fs::read_dir(&dir) {
            Ok(rd) => {
                for e in rd.flatten() {
                    std::fs::remove_file(e.path())?;
                }
                std::fs::remove_dir(&dir)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // The base too, if we made it and it is now empty (not empty, or not ours: kept).
        std::fs::remove_dir(pin_base).ok();
        Ok(())
    }

    fn read_slot(m: &Maps, slot: u32) -> Result<Usage, ValveError> {
        m.counters.read(slot).ok_or(ValveError::Map {
            map: maps::USAGE,
            message: format!("slot {slot} out of range"),
        })
    }

    /// The counters of `key`'s slot (`None` without a POLICY entry).
    fn read_usage(m: &Maps, key: &MacKey) -> Result<Option<Usage>, ValveError> {
        match m.policy.get(key) {
            Some(p) => Self::read_slot(m, p.slot).map(Some),
            None => Ok(None),
        }
    }

    /// The policy `old` read for a client with its counters, or, for a client the kernel does
    /// not know yet, a closed one in a fresh, zeroed slot (the caller writes it; `Full` when
    /// no slot is free).
    fn entry(
        m: &mut Maps,
        mac: MacAddr,
        old: Option<Policy>,
    ) -> Result<(Policy, Usage), ValveError> {
        if let Some(p) = old {
            return Ok((p, Self::read_slot(m, p.slot)?));
        }
        let Some(slot) = m.slots.take() else {
            return Err(ValveError::Full {
                mac,
                capacity: m.slots.capacity,
            });
        };
        // No POLICY entry points here: the kernel no longer writes this slot.
        if let Err(e) = m.usage.set(slot, Usage::default(), 0) {
            m.slots.free.push_front((slot, rested()));
            return Err(map_err(maps::USAGE)(e));
        }
        let mut p = Policy::CLOSED;
        p.slot = slot;
        Ok((p, Usage::default()))
    }

    /// When `key`'s counters last moved, as far as the valve has seen (0 = never).
    fn last_seen(m: &mut Maps, key: &MacKey, u: &Usage) -> u64 {
        let sum = u
            .packets_up
            .wrapping_add(u.packets_down)
            .wrapping_add(u.bytes_dropped);
        match m.slots.seen.get(key) {
            Some(&(s, at)) if s == sum => at,
            _ => {
                let at = if sum == 0 {
                    0
                } else {
                    crate::sys::clock::monotonic_ns()
                };
                m.slots.seen.insert(*key, (sum, at));
                at
            }
        }
    }

    fn write_policy(m: &mut Maps, mac: MacAddr, key: &MacKey, p: Policy) -> Result<(), ValveError> {
        let capacity = m.slots.capacity;
        m.policy
            .insert(key, p)
            .map_err(|e| no_room(mac, capacity, e))
    }

    /// Calls `visit` for every client, in parts of [`LIST_PART`] index positions, each under
    /// its own hold of the lock: a caller waits for one part, not for the whole table
    /// (`bench-dataplane`'s cold table measures that wait). See [`PolicyTable::scan`] for
    /// what a client deleted and created again between two parts may look like.
    fn walk_in_parts(
        &self,
        mut visit: impl FnMut(&mut Maps, MacKey, Policy) -> Result<(), ValveError>,
    ) -> Result<(), ValveError> {
        let positions = self.maps().policy.positions();
        for from in (0..positions).step_by(LIST_PART as usize) {
            let mut m = self.maps();
            let part: Vec<(MacKey, Policy)> = m.policy.scan(from, from + LIST_PART).collect();
            for (k, p) in part {
                visit(&mut m, k, p)?;
            }
            // To a waiting caller, if any: a plain unlock lets this loop take the lock back
            // before the woken waiter runs, and the wait is the whole walk again.
            parking_lot::MutexGuard::unlock_fair(m);
        }
        Ok(())
    }

    /// Room for a new client `mac` in full maps: evicts the closed entry idle longest (among
    /// those with none of the `spare` flags); `Full` when there is none.
    fn make_room(m: &mut Maps, mac: MacAddr, spare: u32) -> Result<(), ValveError> {
        if (m.policy.len() as u32) < m.slots.capacity {
            return Ok(());
        }
        match Self::oldest_closed(m, spare)? {
            Some(victim) => Self::evict(m, &victim, EvictReason::Pressure),
            None => Err(ValveError::Full {
                mac,
                capacity: m.slots.capacity,
            }),
        }
    }

    /// The closed entry idle longest (by when its counters last moved), if any, among those
    /// with none of the `spare` flags. Walks the map: only called when it is full.
    fn oldest_closed(m: &mut Maps, spare: u32) -> Result<Option<MacKey>, ValveError> {
        let closed: Vec<(MacKey, Policy)> = m
            .policy
            .iter()
            .filter(|(_, p)| p.flags & (policy_flags::ALLOWED | spare) == 0)
            .collect();
        let mut best: Option<(u64, MacKey)> = None;
        for (k, p) in closed {
            let u = Self::read_slot(m, p.slot)?;
            let seen = Self::last_seen(m, &k, &u);
            if best.is_none_or(|(s, _)| seen < s) {
                best = Some((seen, k));
            }
        }
        Ok(best.map(|(_, k)| k))
    }

    /// Deletes a closed client's entry and frees its slot (never an open gate: checked here,
    /// under the lock).
    fn evict(m: &mut Maps, key: &MacKey, why: EvictReason) -> Result<(), ValveError> {
        let Some(p) = m.policy.get(key) else {
            return Ok(());
        };
        if p.flags & policy_flags::ALLOWED != 0 {
            return Ok(());
        }
        let u = Self::read_slot(m, p.slot)?;
        let top = p.generation.max(u.notified_generation);
        m.slots.gen_floor = m.slots.gen_floor.max(top);
        m.policy.remove(key);
        m.slots.free.push_back((p.slot, Instant::now()));
        m.slots.seen.remove(key);
        m.slots.closed_since.remove(key);
        match why {
            EvictReason::Retention => m.slots.evictions.retention += 1,
            EvictReason::Pressure => m.slots.evictions.pressure += 1,
        }
        tracing::debug!(mac = %MacAddr(key.addr), reason = ?why, "client entry evicted");
        Ok(())
    }

    fn state(mac: MacAddr, p: Option<Policy>, u: Option<Usage>, last_seen_ns: u64) -> GateState {
        let u = u.unwrap_or_default();
        let usage = ClientUsage {
            bytes_up: u.bytes_up,
            bytes_down: u.bytes_down,
            packets_up: u.packets_up,
            packets_down: u.packets_down,
            last_seen_ns,
        };
        let p = p.unwrap_or(Policy::CLOSED);
        let open = p.flags & policy_flags::ALLOWED != 0;
        let rem = |limit: u64, used: u64| (limit != UNLIMITED).then(|| limit.saturating_sub(used));
        let remaining_bytes = [
            rem(p.limit_total, usage.bytes()),
            rem(p.limit_up, u.bytes_up),
            rem(p.limit_down, u.bytes_down),
        ]
        .into_iter()
        .flatten()
        .min();
        GateState {
            mac,
            open,
            remaining_bytes: if open { remaining_bytes } else { Some(0) },
            until_boot_ns: (p.expires_at_ns != 0).then_some(p.expires_at_ns),
            bound_ipv4: (p.flags & policy_flags::BIND_IPV4 != 0)
                .then(|| Ipv4Addr::from(p.bound_ipv4)),
            generation: p.generation,
            usage,
            rates: Rates {
                down_kbit: p.rate_down as u64 / 125,
                up_kbit: p.rate_up as u64 / 125,
            },
        }
    }

    /// Writes `r` into a policy (bytes per second; the kernel sizes the buckets from them).
    fn apply_rates(p: &mut Policy, r: Rates) {
        p.rate_down = Rates::bytes_per_s(r.down_kbit);
        p.rate_up = Rates::bytes_per_s(r.up_kbit);
    }

    /// A generation never used for this client: above both the old policy's and the one
    /// the kernel last notified, so the next exhaustion is reported again.
    fn next_generation(old: Option<&Policy>, u: &Usage) -> u32 {
        Self::next_generation_above(old, u, 0)
    }

    /// [`Self::next_generation`], and above `floor` (the highest generation ever evicted).
    fn next_generation_above(old: Option<&Policy>, u: &Usage, floor: u32) -> u32 {
        let base = old
            .map_or(0, |p| p.generation)
            .max(u.notified_generation)
            .max(floor);
        match base.wrapping_add(1) {
            0 => 1,
            g => g,
        }
    }
}

/// max_entries of the map pinned at `path`, `None` if nothing is pinned there.
fn pinned_capacity(path: &Path) -> Result<Option<u32>, ValveError> {
    if !path.exists() {
        return Ok(None);
    }
    let md = MapData::from_pin(path).map_err(map_err(maps::POLICY))?;
    let info = md.info().map_err(map_err(maps::POLICY))?;
    Ok(Some(info.max_entries()))
}

/// Clients taken out of maps that are being recreated: key, policy (its slot is reassigned)
/// and counters.
type Carried = Vec<(MacKey, Policy, Usage)>;

fn open_hash<K: aya::Pod, V: aya::Pod>(
    path: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, ValveError> {
    HashMap::try_from(aya::maps::Map::HashMap(
        MapData::from_pin(path).map_err(map_err(name))?,
    ))
    .map_err(map_err(name))
}

fn unpin_all(paths: &[&Path]) -> Result<(), ValveError> {
    for p in paths {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ValveError::Other(format!("unpin {}: {e}", p.display()))),
        }
    }
    Ok(())
}

fn too_many(dir: &Path, have: usize, want: u32) -> ValveError {
    ValveError::Config(format!(
        "the pinned per-client maps in {} hold {have} clients, more than max_clients = {want}: \
         raise dataplane.max_clients (or let closed entries be evicted first)",
        dir.display()
    ))
}

/// Every client of the per-client maps pinned in `dir` (gates of type `P` in POLICY, their
/// counters in the USAGE slot array), refused when there are more than `want`.
fn read_slotted<P: aya::Pod>(
    dir: &Path,
    want: u32,
    slot_of: impl Fn(&P) -> u32,
) -> Result<Vec<(MacKey, P, Usage)>, ValveError> {
    let (pp, up) = (dir.join(maps::POLICY), dir.join(maps::USAGE));
    let policy: HashMap<MapData, MacKey, P> = open_hash(&pp, maps::POLICY)?;
    let usage: Option<Array<MapData, Usage>> = if up.exists() {
        Some(
            Array::try_from(aya::maps::Map::Array(
                MapData::from_pin(&up).map_err(map_err(maps::USAGE))?,
            ))
            .map_err(map_err(maps::USAGE))?,
        )
    } else {
        None
    };
    let policies: Vec<(MacKey, P)> = policy.iter().filter_map(|kv| kv.ok()).collect();
    if policies.len() > want as usize {
        return Err(too_many(dir, policies.len(), want));
    }
    Ok(policies
        .into_iter()
        .map(|(k, p)| {
            let u = usage
                .as_ref()
                .and_then(|a| a.get(&slot_of(&p), 0).ok())
                .unwrap_or_default();
            (k, p, u)
        })
        .collect())
}

/// Pinned per-client maps of another size than `want`: read every entry, unpin the old maps
/// (the loader then creates them at `want`) and hand the entries back to be re-inserted.
/// Refused when they do not fit. The old maps stay alive (and enforcing) until the pinned
/// links switch programs, so a packet or two counted in between is not carried over.
fn resize_pinned(dir: &Path, want: u32) -> Result<Option<Carried>, ValveError> {
    let (pp, ip, up) = (
        dir.join(maps::POLICY),
        dir.join(maps::INDEX),
        dir.join(maps::USAGE),
    );
    let Some(have) = pinned_capacity(&up)? else {
        return Ok(None);
    };
    if have == want {
        return Ok(None);
    }
    let carried = read_table(dir, want)?;
    unpin_all(&[&pp, &ip, &up])?;
    tracing::info!(
        from = have,
        to = want,
        clients = carried.len(),
        "resizing the per-client maps"
    );
    Ok(Some(carried))
}

/// Every client of this schema's per-client maps pinned in `dir` (the policy table and the
/// counters), refused when there are more than `want`.
fn read_table(dir: &Path, want: u32) -> Result<Carried, ValveError> {
    let pinned = |name: &'static str| {
        let md = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
        let n = md.info().map_err(map_err(name))?.max_entries();
        Ok::<_, ValveError>((md, n))
    };
    let ((index_md, words), (records_md, records), (usage_md, slots)) = (
        pinned(maps::INDEX)?,
        pinned(maps::POLICY)?,
        pinned(maps::USAGE)?,
    );
    // Read only: these maps are being replaced, nothing is repaired in them.
    let table = PolicyTable::open(
        index_md.fd().as_fd(),
        words,
        records_md.fd().as_fd(),
        records,
        false,
    )
    .map_err(|e| ValveError::Map {
        map: maps::INDEX,
        message: format!("reading the pinned policy table: {e}"),
    })?;
    let counters = Counters::open(usage_md.fd().as_fd(), slots).map_err(|e| ValveError::Map {
        map: maps::USAGE,
        message: format!("reading the pinned counters: {e}"),
    })?;
    if table.len() > want as usize {
        return Err(too_many(dir, table.len(), want));
    }
    Ok(table
        .iter()
        .map(|(k, p)| (k, p, counters.read(p.slot).unwrap_or_default()))
        .collect())
}

/// Schema 4's gate (`<pin_base>/v4/TG_POLICY`, a hash map by MAC): today's `Policy` with the
/// token bucket sizes where the MAC is now (its counters, `Usage`, are today's).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct PolicyV4 {
    flags: u32,
    generation: u32,
    limit_total: u64,
    limit_up: u64,
    limit_down: u64,
    expires_at_ns: u64,
    bound_ipv4: [u8; 4],
    slot: u32,
    rate_down: u32,
    rate_up: u32,
    burst_up: u32,
    burst_down: u32,
    bound_ipv6: [[u8; 16]; MAX_BOUND_V6],
}

// SAFETY: `#[repr(C)]`, integer/byte-array fields only, no implicit padding (128 bytes).
unsafe impl aya::Pod for PolicyV4 {}

/// A first load of this schema next to schema 4's pins (the release before): carry every
/// client, its binding, its rates and its counts (the shaping state too) over. Schema 4's
/// client maps are unpinned once their entries are in the new table; its links are
/// detached on attach.
fn upgrade_from_v4(pin_base: &Path, want: u32) -> Result<Option<Carried>, ValveError> {
    carry_over(
        pin_base,
        "v4",
        want,
        |o: &PolicyV4| o.slot,
        |k, o, u| {
            let p = Policy {
                flags: o.flags,
                generation: o.generation,
                limit_total: o.limit_total,
                limit_up: o.limit_up,
                limit_down: o.limit_down,
                expires_at_ns: o.expires_at_ns,
                bound_ipv4: o.bound_ipv4,
                slot: o.slot,
                rate_down: o.rate_down,
                rate_up: o.rate_up,
                mac: k.word(),
                bound_ipv6: o.bound_ipv6,
            };
            (p, u)
        },
    )
}

/// The clients of an older schema whose gates are a hash map of `P` by MAC and whose
/// counters are today's USAGE array (`<pin_base>/<version>/`), each turned into today's
/// policy and counters by `convert`; `None` when that schema left no pins.
fn carry_over<P: aya::Pod>(
    pin_base: &Path,
    version: &str,
    want: u32,
    slot_of: impl Fn(&P) -> u32,
    convert: impl Fn(MacKey, P, Usage) -> (Policy, Usage),
) -> Result<Option<Carried>, ValveError> {
    let old = pin_base.join(version);
    if !old.join(maps::POLICY).exists() {
        return Ok(None);
    }
    let carried: Carried = read_slotted(&old, want, slot_of)?
        .into_iter()
        .map(|(k, o, u)| {
            let (p, u) = convert(k, o, u);
            (k, p, u)
        })
        .collect();
    tracing::info!(
        clients = carried.len(),
        from = %old.display(),
        "schema upgrade: carrying the clients and their counts over"
    );
    Ok(Some(carried))
}

/// Schema 3's gate (`<pin_base>/v3/TG_POLICY`): today's `Policy` without the rates (its
/// counters, `Usage`, are today's: the shaping state took padding that was always zero).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct PolicyV3 {
    flags: u32,
    generation: u32,
    limit_total: u64,
    limit_up: u64,
    limit_down: u64,
    expires_at_ns: u64,
    bound_ipv4: [u8; 4],
    slot: u32,
    bound_ipv6: [[u8; 16]; MAX_BOUND_V6],
}

// SAFETY: `#[repr(C)]`, integer/byte-array fields only, no implicit padding (112 bytes).
unsafe impl aya::Pod for PolicyV3 {}

/// A first load of this schema next to schema 3's pins (the release before): carry every
/// client, its binding and its counts over (without rate limits, which schema 3 did not
/// have). Schema 3's client maps are unpinned once their entries are in the new maps; its
/// links are detached on attach.
fn upgrade_from_v3(pin_base: &Path, want: u32) -> Result<Option<Carried>, ValveError> {
    carry_over(
        pin_base,
        "v3",
        want,
        |o: &PolicyV3| o.slot,
        |k, o, u| {
            let p = Policy {
                flags: o.flags,
                generation: o.generation,
                limit_total: o.limit_total,
                limit_up: o.limit_up,
                limit_down: o.limit_down,
                expires_at_ns: o.expires_at_ns,
                bound_ipv4: o.bound_ipv4,
                slot: o.slot,
                mac: k.word(),
                bound_ipv6: o.bound_ipv6,
                ..Policy::CLOSED
            };
            // Only the counters: whatever the padding held is no shaping state.
            let u = Usage {
                bytes_up: u.bytes_up,
                packets_up: u.packets_up,
                bytes_dropped: u.bytes_dropped,
                notified_generation: u.notified_generation,
                bytes_down: u.bytes_down,
                packets_down: u.packets_down,
                ..Default::default()
            };
            (p, u)
        },
    )
}

/// Schema 2's gate (`<pin_base>/v2/TG_POLICY`): today's `Policy` without `slot` and the
/// IPv6 binding.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct PolicyV2 {
    flags: u32,
    generation: u32,
    limit_total: u64,
    limit_up: u64,
    limit_down: u64,
    expires_at_ns: u64,
    bound_ipv4: [u8; 4],
    _pad: [u8; 4],
}

// SAFETY: `#[repr(C)]`, integer fields only, the padding is an explicit field.
unsafe impl aya::Pod for PolicyV2 {}

/// Schema 2's counters (`<pin_base>/v2/TG_USAGE`, a hash map by MAC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct UsageV2 {
    bytes_up: u64,
    bytes_down: u64,
    packets_up: u64,
    packets_down: u64,
    last_seen_mono_ns: u64,
    notified_generation: u32,
    _pad: u32,
    bytes_dropped: u64,
}

// SAFETY: `#[repr(C)]`, integer fields only, the padding is an explicit field.
unsafe impl aya::Pod for UsageV2 {}

/// A first load of this schema next to schema 2's pins (the release before): carry every
/// client and its counts over. Schema 2's client maps are unpinned once their entries are in the new maps;
/// its links are detached on attach.
fn upgrade_from_v2(pin_base: &Path, want: u32) -> Result<Option<Carried>, ValveError> {
    let old = pin_base.join("v2");
    let (pp, up) = (old.join(maps::POLICY), old.join(maps::USAGE));
    if !pp.exists() {
        return Ok(None);
    }
    let policy: HashMap<MapData, MacKey, PolicyV2> = open_hash(&pp, maps::POLICY)?;
    let usage: Option<HashMap<MapData, MacKey, UsageV2>> = if up.exists() {
        Some(open_hash(&up, maps::USAGE)?)
    } else {
        None
    };
    let policies: Vec<(MacKey, PolicyV2)> = policy.iter().filter_map(|kv| kv.ok()).collect();
    if policies.len() > want as usize {
        return Err(too_many(&old, policies.len(), want));
    }
    let carried: Carried = policies
        .into_iter()
        .map(|(k, o)| {
            let p = Policy {
                flags: o.flags & (policy_flags::ALLOWED | policy_flags::BIND_IPV4),
                generation: o.generation,
                limit_total: o.limit_total,
                limit_up: o.limit_up,
                limit_down: o.limit_down,
                expires_at_ns: o.expires_at_ns,
                bound_ipv4: o.bound_ipv4,
                ..Policy::CLOSED
            };
            let o = usage
                .as_ref()
                .and_then(|m| m.get(&k, 0).ok())
                .unwrap_or_default();
            let u = Usage {
                bytes_up: o.bytes_up,
                bytes_down: o.bytes_down,
                packets_up: o.packets_up,
                packets_down: o.packets_down,
                notified_generation: o.notified_generation,
                bytes_dropped: o.bytes_dropped,
                ..Default::default()
            };
            (k, p, u)
        })
        .collect();
    tracing::info!(
        clients = carried.len(),
        from = %old.display(),
        "schema upgrade: carrying the clients and their counts over"
    );
    Ok(Some(carried))
}

/// Opens a pinned link, `None` if there is none.
fn pinned_link(path: &Path) -> Result<Option<FdLink>, LinkError> {
    match PinnedLink::from_pin(path) {
        Ok(l) => Ok(Some(FdLink::from(l))),
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn parse_event(bytes: &[u8]) -> Option<Exhaustion> {
    if bytes.len() < std::mem::size_of::<GateEvent>() {
        return None;
    }
    // SAFETY: length checked; GateEvent is plain old data; unaligned read.
    let ev: GateEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    Some(Exhaustion {
        mac: MacAddr(ev.mac),
        reason: ExhaustReason::from_u8(ev.reason)?,
        generation: ev.generation,
        usage: ClientUsage {
            bytes_up: ev.bytes_up,
            bytes_down: ev.bytes_down,
            packets_up: ev.packets_up,
            packets_down: 0,
            last_seen_ns: 0,
        },
        at_boot_ns: ev.at_ns,
    })
}

impl WanMeter for Valve {
    fn watch(&self, mac: MacAddr, peer: Ipv4Addr) -> Result<(), ValveError> {
        let mut m = self.maps();
        let c = m.config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        if c.flags & config_flags::METER_ONLY == 0 {
            // A policy entry here would be a gate; never hand the LAN instance a meter's job.
            return Err(ValveError::Config(
                "watch needs a meter-only data plane (Valve::attach_meter)".into(),
            ));
        }
        let key = MacKey::new(mac.0);
        let old = m.policy.get(&key);
        if old.is_none() {
            // Full of upstreams seen before: forget the least recently active one that is not
            // being counted (the watched one keeps its counts until the new one is in).
            Self::make_room(&mut m, mac, policy_flags::METERED)?;
        }
        let (mut p, _) = Self::entry(&mut m, mac, old)?;
        p.flags = policy_flags::METERED;
        Self::write_policy(&mut m, mac, &key, p)?;
        // The others stop being counted; their entries (and counts) stay.
        let others: Vec<(MacKey, Policy)> = m
            .policy
            .iter()
            .filter(|(k, p)| *k != key && p.flags & policy_flags::METERED != 0)
            .collect();
        for (k, mut p) in others {
            p.flags &= !policy_flags::METERED;
            if let Err(e) = m.policy.insert(&k, p) {
                tracing::warn!(mac = %MacAddr(k.addr), error = ?e, "clearing another client's metered flag");
            }
        }
        let mut c = c;
        c.gateway_v4 = peer.octets();
        m.config.set(0, c, 0).map_err(map_err(maps::CONFIG))?;
        Ok(())
    }

    fn read(&self, mac: MacAddr) -> Result<Option<ClientUsage>, ValveError> {
        let m = self.maps();
        // The kernel counts ingress (from the MAC) as "up": turn it into our point of view.
        Ok(
            Self::read_usage(&m, &MacKey::new(mac.0))?.map(|u| ClientUsage {
                bytes_up: u.bytes_down,
                bytes_down: u.bytes_up,
                packets_up: u.packets_down,
                packets_down: u.packets_up,
                last_seen_ns: 0,
            }),
        )
    }
}

impl Gates for Valve {
    fn check(&self, mac: MacAddr) -> Result<(), ValveError> {
        // Capacity only: nothing is created before the money is taken (a failed or hostile
        // payment leaves no entry). The entry is made by `open`, at grant time.
        let mut m = self.maps();
        let key = MacKey::new(mac.0);
        if let Err(e) = m.policy.room_for(&key) {
            // A full window (or no record): no eviction of another client makes room there.
            return Err(no_room(mac, m.slots.capacity, e));
        }
        if m.policy.contains(&key) || (m.policy.len() as u32) < m.slots.capacity {
            return Ok(());
        }
        // Full: `open` makes room by evicting a closed entry, if there is one.
        match Self::oldest_closed(&mut m, 0)? {
            Some(_) => Ok(()),
            None => Err(ValveError::Full {
                mac,
                capacity: m.slots.capacity,
            }),
        }
    }

    fn open(&self, mac: MacAddr, a: Allowance) -> Result<GateState, ValveError> {
        let mut m = self.maps();
        let key = MacKey::new(mac.0);
        let old = m.policy.get(&key);
        if old.is_none() {
            Self::make_room(&mut m, mac, 0)?;
        }
        let (cur, u) = Self::entry(&mut m, mac, old)?;
        let used = u.bytes_up.saturating_add(u.bytes_down);
        let mut flags = policy_flags::ALLOWED;
        if a.bind_ipv4.is_some() {
            flags |= policy_flags::BIND_IPV4;
        }
        let p = Policy {
            flags,
            generation: Self::next_generation_above(old.as_ref(), &u, m.slots.gen_floor),
            limit_total: a.bytes.map_or(UNLIMITED, |b| used.saturating_add(b)),
            limit_up: a
                .bytes_up
                .map_or(UNLIMITED, |b| u.bytes_up.saturating_add(b)),
            limit_down: a
                .bytes_down
                .map_or(UNLIMITED, |b| u.bytes_down.saturating_add(b)),
            expires_at_ns: a.until_boot_ns.unwrap_or(0),
            bound_ipv4: a.bind_ipv4.map_or([0; 4], |ip| ip.octets()),
            slot: cur.slot,
            bound_ipv6: [[0; 16]; MAX_BOUND_V6],
            ..Policy::CLOSED
        };
        let mut p = p;
        match (a.rates, old) {
            (Some(r), _) => Self::apply_rates(&mut p, r),
            // A top-up of an open gate keeps its rate (and its upload bucket).
            (None, Some(o)) if o.flags & policy_flags::ALLOWED != 0 => {
                p.rate_down = o.rate_down;
                p.rate_up = o.rate_up;
            }
            (None, _) => Self::apply_rates(&mut p, m.default_rates),
        }
        if let Err(e) = Self::write_policy(&mut m, mac, &key, p) {
            if old.is_none() {
                m.slots.free.push_front((cur.slot, rested()));
            }
            return Err(e);
        }
        m.slots.closed_since.remove(&key);
        let seen = Self::last_seen(&mut m, &key, &u);
        Ok(Self::state(mac, Some(p), Some(u), seen))
    }

    fn extend(&self, mac: MacAddr, add_bytes: u64, add_ns: u64) -> Result<GateState, ValveError> {
        let mut m = self.maps();
        let key = MacKey::new(mac.0);
        let Some(old) = m
            .policy
            .get(&key)
            .filter(|p| p.flags & policy_flags::ALLOWED != 0)
        else {
            return Err(ValveError::Other(format!("gate of {mac} is not open")));
        };
        let u = Self::read_slot(&m, old.slot)?;
        let used = u.bytes_up.saturating_add(u.bytes_down);
        let mut p = old;
        p.generation = Self::next_generation(Some(&old), &u);
        // remaining + added on every finite limit (total and each direction): what was used
        // stays used, an overshoot is absorbed, and a gate with directional limits reopens.
        let raise = |limit: u64, used: u64| {
            if limit == UNLIMITED {
                UNLIMITED
            } else {
                limit.max(used).saturating_add(add_bytes)
            }
        };
        p.limit_total = raise(p.limit_total, used);
        p.limit_up = raise(p.limit_up, u.bytes_up);
        p.limit_down = raise(p.limit_down, u.bytes_down);
        if add_ns > 0 {
            let now = crate::sys::clock::boot_ns();
            let base = if p.expires_at_ns == 0 {
                now
            } else {
                p.expires_at_ns.max(now)
            };
            p.expires_at_ns = base.saturating_add(add_ns);
        }
        Self::write_policy(&mut m, mac, &key, p)?;
        let seen = Self::last_seen(&mut m, &key, &u);
        Ok(Self::state(mac, Some(p), Some(u), seen))
    }

    fn set_rate(&self, mac: MacAddr, rates: Rates) -> Result<GateState, ValveError> {
        let mut m = self.maps();
        let key = MacKey::new(mac.0);
        let Some(mut p) = m
            .policy
            .get(&key)
            .filter(|p| p.flags & policy_flags::ALLOWED != 0)
        else {
            return Err(ValveError::Other(format!("gate of {mac} is not open")));
        };
        Self::apply_rates(&mut p, rates);
        Self::write_policy(&mut m, mac, &key, p)?;
        let u = Self::read_slot(&m, p.slot)?;
        let seen = Self::last_seen(&mut m, &key, &u);
        Ok(Self::state(mac, Some(p), Some(u), seen))
    }

    fn close(&self, mac: MacAddr) -> Result<(), ValveError> {
        let mut m = self.maps();
        let key = MacKey::new(mac.0);
        if let Some(mut p) = m.policy.get(&key) {
            // Keep the entry (and its generation) so a later open gets a fresh generation;
            // `sweep` deletes it after the retention.
            p.flags = 0;
            Self::write_policy(&mut m, mac, &key, p)?;
            m.slots.closed_since.entry(key).or_insert_with(Instant::now);
        }
        Ok(())
    }

    fn spoofed_drops(&self) -> Result<u64, ValveError> {
        Ok(self.verdicts()?.packets(Verdict::DropSpoofed))
    }

    fn bind_ipv4(&self, mac: MacAddr, ip: Option<Ipv4Addr>) -> Result<(), ValveError> {
        let mut m = self.maps();
        let key = MacKey::new(mac.0);
        let Some(mut p) = m.policy.get(&key) else {
            return Err(ValveError::Other(format!("no gate for {mac} to bind")));
        };
        match ip {
            Some(ip) => {
                p.flags |= policy_flags::BIND_IPV4;
                p.bound_ipv4 = ip.octets();
            }
            None => {
                p.flags &= !policy_flags::BIND_IPV4;
                p.bound_ipv4 = [0; 4];
            }
        }
        Self::write_policy(&mut m, mac, &key, p)
    }

    fn bind(&self, mac: MacAddr, addrs: &[IpAddr]) -> Result<(), ValveError> {
        let mut v4 = None;
        let mut v6 = Vec::new();
        for a in addrs {
            match a {
                IpAddr::V4(a) if v4.is_none() => v4 = Some(*a),
                IpAddr::V6(a) if v6.len() < MAX_BOUND_V6 && !a.is_unspecified() => v6.push(*a),
                _ => {
                    return Err(ValveError::Config(format!(
                        "cannot bind {mac} to {addrs:?}: at most one IPv4 and {MAX_BOUND_V6} \
                         IPv6 addresses"
                    )))
                }
            }
        }
        let mut m = self.maps();
        let key = MacKey::new(mac.0);
        let Some(mut p) = m.policy.get(&key) else {
            return Err(ValveError::Other(format!("no gate for {mac} to bind")));
        };
        p.flags &= !(policy_flags::BIND_IPV4 | policy_flags::BIND_IPV6);
        p.bound_ipv4 = v4.map_or([0; 4], |a| a.octets());
        if v4.is_some() {
            p.flags |= policy_flags::BIND_IPV4;
        }
        p.bound_ipv6 = [[0; 16]; MAX_BOUND_V6];
        for (slot, a) in p.bound_ipv6.iter_mut().zip(&v6) {
            *slot = a.octets();
        }
        if !v6.is_empty() {
            p.flags |= policy_flags::BIND_IPV6;
        }
        // One write: the kernel sees the old binding or the new one, never a mix.
        Self::write_policy(&mut m, mac, &key, p)
    }

    fn sweep(&self, retention: Duration) -> Result<SweepReport, ValveError> {
        // In parts, like `gates`: a payment waits for one part of the table, not all of it.
        // Every path that deletes an entry (`evict`) or reopens one (`open`) drops its
        // bookkeeping itself, so what a part sees is all there is to keep in step.
        let now = Instant::now();
        let mut evicted = 0u32;
        self.walk_in_parts(|m, k, p| {
            if let Ok(u) = Self::read_slot(m, p.slot) {
                Self::last_seen(m, &k, &u);
            }
            if p.flags & policy_flags::ALLOWED != 0 {
                m.slots.closed_since.remove(&k);
                return Ok(());
            }
            let since = *m.slots.closed_since.entry(k).or_insert(now);
            if now.duration_since(since) >= retention {
                Self::evict(m, &k, EvictReason::Retention)?;
                evicted += 1;
            }
            Ok(())
        })?;
        let mut m = self.maps();
        // Near full: make headroom (1/16 of the map) from the closed entries idle longest, so
        // a burst of new payers never waits for the retention.
        let high = m.slots.capacity - m.slots.capacity / 16;
        if m.policy.len() as u32 > high {
            let mut idle: Vec<(u64, MacKey)> = m
                .slots
                .closed_since
                .keys()
                .map(|k| (m.slots.seen.get(k).map_or(0, |s| s.1), *k))
                .collect();
            idle.sort();
            for (_, k) in idle {
                if m.policy.len() as u32 <= high {
                    break;
                }
                Self::evict(&mut m, &k, EvictReason::Pressure)?;
                evicted += 1;
            }
        }
        Ok(SweepReport {
            evicted,
            occupied: m.policy.len() as u32,
            capacity: m.slots.capacity,
        })
    }

    fn gate(&self, mac: MacAddr) -> Result<Option<GateState>, ValveError> {
        let mut m = self.maps();
        let key = MacKey::new(mac.0);
        let Some(p) = m.policy.get(&key) else {
            return Ok(None);
        };
        let u = Self::read_slot(&m, p.slot)?;
        let seen = Self::last_seen(&mut m, &key, &u);
        Ok(Some(Self::state(mac, Some(p), Some(u), seen)))
    }

    fn gates(&self) -> Result<Vec<GateState>, ValveError> {
        // Under the lock (in parts) only the memory reads and the last-seen bookkeeping; the
        // sort and the states are built after.
        let mut rows = Vec::with_capacity(self.maps().policy.len());
        self.walk_in_parts(|m, k, p| {
            let u = Self::read_slot(m, p.slot)?;
            let seen = Self::last_seen(m, &k, &u);
            rows.push((k, p, u, seen));
            Ok(())
        })?;
        rows.sort_unstable_by_key(|r| r.0);
        // Deleted and inserted again between two parts: listed once.
        rows.dedup_by_key(|r| r.0);
        Ok(rows
            .into_iter()
            .map(|(k, p, u, seen)| Self::state(MacAddr(k.addr), Some(p), Some(u), seen))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_map_into_v6() {
        let p: Prefix = "192.0.2.0/24".parse().unwrap();
        let k = p.key();
        assert_eq!(k.prefix_len(), 120);
        assert_eq!(&k.data()[10..], &[0xff, 0xff, 192, 0, 2, 0]);
        let h: Prefix = "2001:db8::1".parse().unwrap();
        assert_eq!(h.len, 128);
        for bad in ["192.0.2.0/33", "nope", "2001:db8::/129", "1.2.3.4/x"] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
    }

    #[test]
    fn gate_config_limits() {
        let mut c = ValveConfig::new("lan0");
        c.tcp_ports = vec![1, 2, 3, 4, 5];
        assert!(c.gate_config().is_err());
        c.tcp_ports = vec![2121, 80];
        c.portal_mark = Some(0);
        assert!(c.gate_config().is_err());
        c.portal_mark = Some(0x7467);
        let g = c.gate_config().unwrap();
        assert_eq!(g.tcp_ports, [2121, 80, 0, 0]);
        assert_ne!(g.flags & config_flags::PORTAL_REDIRECT, 0);
    }

    #[test]
    fn dns_budget_in_the_gate_config() {
        let mut c = ValveConfig::new("lan0");
        let g = c.gate_config().unwrap();
        assert_ne!(g.flags & config_flags::DNS_BUDGET, 0, "on by default");
        assert_eq!((g.dns_rate, g.dns_burst, g.dns_max_udp), (4096, 32768, 512));
        c.dns_budget = None;
        assert_eq!(c.gate_config().unwrap().flags & config_flags::DNS_BUDGET, 0);
        c.dns_budget = Some(DnsBudget {
            rate: 1,
            burst: 100,
            max_udp_payload: 512,
        });
        assert!(c.gate_config().is_err(), "a burst below one query");
        let m = ValveConfig::meter("wan0", Path::new("/sys/fs/bpf/x"));
        assert_eq!(m.gate_config().unwrap().flags & config_flags::DNS_BUDGET, 0);
    }

    #[test]
    fn remaining_is_min_of_limits_and_closed_is_zero() {
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let u = Usage {
            bytes_up: 100,
            bytes_down: 300,
            ..Default::default()
        };
        let mut p = Policy::CLOSED;
        p.flags = policy_flags::ALLOWED;
        p.limit_total = 1000;
        p.limit_up = 150;
        p.limit_down = UNLIMITED;
        let s = Valve::state(mac, Some(p), Some(u), 0);
        assert_eq!(s.remaining_bytes, Some(50));
        p.flags = 0;
        assert_eq!(
            Valve::state(mac, Some(p), Some(u), 0).remaining_bytes,
            Some(0)
        );
    }

    #[test]
    fn generations_skip_zero_and_the_notified_one() {
        let u = Usage {
            notified_generation: 7,
            ..Default::default()
        };
        assert_eq!(Valve::next_generation(None, &u), 8);
        let mut p = Policy::CLOSED;
        p.generation = u32::MAX;
        assert_eq!(Valve::next_generation(Some(&p), &Usage::default()), 1);
    }
}
