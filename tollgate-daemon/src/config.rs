//! Configuration: `config.json` + `identities.json` in the reference daemon's shape, plus our
//! additions (all optional, with defaults).
//!
//! ```text
//! load(dir) ─> RawConfig / RawIdentities (serde, lenient shape)
//!           ─> validate ─> Config { merchant, http, chandler, dataplane, neighbour, store,
//!                                   payout, upstream, identities }   (one section per component)
//! ```
//! Every validation error names the file, the field and the fix. Mint URLs are canonicalised
//! here once (scheme and host lower-case, no trailing slash) and compared only in that form.

use std::{
    collections::HashSet,
    fs,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use nostr::{Keys, SecretKey};
use serde::{Deserialize, Serialize};

use crate::protocol::Metric;
use crate::types::canonical_mint_url;
use crate::units::{Dur, Seconds};
use crate::valve::{DataPlaneMode, Prefix};

pub const CONFIG_FILE: &str = "config.json";
/// Where the operator commands look for config.json unless told otherwise.
pub const CONFIG_DIR: &str = "/etc/tollgate";
/// `store.state_dir` when config.json does not set it.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tollgate";
pub const IDENTITIES_FILE: &str = "identities.json";
/// skb mark for the captive-portal redirect unless `dataplane.portal_mark` says otherwise
/// ("tg"; pick another if your firewall already uses it).
pub const DEFAULT_PORTAL_MARK: u32 = 0x7467;
/// Per-client map capacity unless `dataplane.max_clients` says otherwise: devices at once
/// (paid, or closed within the retention), enough for a large venue; see README for the
/// memory it costs.
pub const DEFAULT_MAX_CLIENTS: u32 = 32_768;
/// Upper bound for `dataplane.max_clients` (the maps are preallocated kernel memory).
pub const MAX_MAX_CLIENTS: u32 = 1 << 20;
/// How long a closed gate's kernel entry stays unless `dataplane.closed_retention` says
/// otherwise.
pub const DEFAULT_CLOSED_RETENTION: Duration = Duration::from_secs(300);

/// Errors of loading and validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid json for this file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: `{field}`: {problem} (fix: {fix})")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
        fix: String,
    },
}

impl ConfigError {
    /// The offending field of an `Invalid` error (for tests and messages).
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Checks `user@domain.tld` (LNURL-pay's Lightning address).
pub fn valid_lightning_address(s: &str) -> bool {
    let Some((user, domain)) = s.split_once('@') else {
        return false;
    };
    !user.is_empty()
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
}

// ---------------------------------------------------------------- overrides

/// Command-line values that take the place of config.json's (`tollgate run --listen …`).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
    pub lan_iface: Option<String>,
    pub wan_iface: Option<String>,
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
}

impl Overrides {
    fn apply(&self, raw: &mut RawConfig) {
        if let Some(s) = &self.state_dir {
            raw.state_dir = Some(s.clone());
        }
        if let Some(l) = &self.lan_iface {
            raw.lan_interface = Some(l.clone());
        }
        if let Some(w) = &self.wan_iface {
            raw.wan_interface = Some(w.clone());
        }
        if let Some(l) = self.listen {
            raw.listen = Some(l.to_string());
        }
        if let Some(a) = self.admin_listen {
            raw.admin_listen = Some(a.to_string());
        }
    }
}

// ---------------------------------------------------------------- raw file shapes

#[derive(Debug, Deserialize, Serialize)]
struct RawConfig {
    #[serde(default)]
    config_version: Option<String>,
    #[serde(default)]
    log_level: Option<String>,
    metric: String,
    step_size: u64,
    accepted_mints: Vec<RawMint>,
    #[serde(default)]
    profit_share: Vec<RawShare>,
    #[serde(default)]
    reseller_mode: bool,
    #[serde(default)]
    upstream_session_manager: Option<serde_json::Value>,
    // Our additions.
    #[serde(default)]
    lan_interface: Option<String>,
    #[serde(default)]
    wan_interface: Option<String>,
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    admin_listen: Option<String>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    dataplane: Option<RawDataplane>,
    #[serde(default)]
    device_leases_file: Option<PathBuf>,
    #[serde(default)]
    payment_timeout: Option<Dur>,
    #[serde(default)]
    usage_snapshot_interval: Option<Dur>,
    #[serde(default)]
    post_rate_per_minute: Option<u32>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_limits: Option<RawHttpLimits>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_token: Option<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    retention: Option<Dur>,
    #[serde(default)]
    rebalance: Option<RawRebalance>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    shaping: Option<crate::shaping::ShapingSettings>,
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tiers: Option<Vec<crate::tiers::TierSettings>>,
}

/// `http_limits` in config.json: every field optional (the defaults are [`HttpLimits::default`]).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawHttpLimits {
    #[serde(default)]
    header_read_timeout: Option<Dur>,
    #[serde(default)]
    body_read_timeout: Option<Dur>,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    max_connections_per_ip: Option<usize>,
}

/// `"rebalance": {"auto": true, "fee_budget_percent": 2}` (ours).
#[derive(Debug, Deserialize, Serialize)]
struct RawRebalance {
    #[serde(default)]
    auto: Option<bool>,
    #[serde(default)]
    fee_budget_percent: Option<u64>,
}

#[derive(Debug, Deserialize, Serialize)]
struct RawMint {
    url: String,
    price_per_step: u64,
    #[serde(default = "default_unit")]
    price_unit: String,
    #[serde(default)]
    purchase_min_steps: u64,
    #[serde(default)]
    min_balance: u64,
    #[serde(default)]
    min_payout_amount: u64,
    /// Seconds as an integer in the reference; a duration string ("60s") is accepted too.
    #[serde(default)]
    payout_interval_seconds: Option<Seconds>,
    #[serde(default)]
    balance_tolerance_percent: u64,
}

fn default_unit() -> String {
    "sat".into()
}

#[derive(Debug, Deserialize, Serialize)]
struct RawShare {
    identity: String,
    factor: f64,
}

#[derive(Debug, Deserialize, Serialize)]
struct RawDataplane {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    garden_allow: Vec<String>,
    #[serde(default)]
    portal_port: Option<u16>,
    /// Captive-portal redirect of unpaid plain HTTP (default: on in tc mode, off in xdp mode).
    #[serde(default)]
    portal_redirect: Option<bool>,
    /// skb mark the data plane sets on unpaid TCP/80 (default [`DEFAULT_PORTAL_MARK`]).
    #[serde(default)]
    portal_mark: Option<u32>,
    /// Capacity of the per-client maps (default [`DEFAULT_MAX_CLIENTS`]).
    #[serde(default)]
    max_clients: Option<u32>,
    /// How long a closed gate's kernel entry is kept (default [`DEFAULT_CLOSED_RETENTION`]).
    #[serde(default)]
    closed_retention: Option<Dur>,
    /// Bind a paid gate to the IPv4 address the payment came from (default true).
    #[serde(default)]
    bind_payer: Option<bool>,
    /// DNS budget of unpaid clients (kernel token bucket); defaults in `tollgate-common`.
    #[serde(default)]
    dns_budget: Option<RawDnsBudget>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawDnsBudget {
    #[serde(default)]
    rate_bytes_per_second: Option<u32>,
    #[serde(default)]
    burst_bytes: Option<u32>,
    #[serde(default)]
    max_udp_query_bytes: Option<u16>,
}

#[derive(Debug, Deserialize, Serialize)]
struct RawIdentities {
    #[serde(default)]
    owned_identities: Vec<RawOwned>,
    #[serde(default)]
    public_identities: Vec<RawPublic>,
}

#[derive(Debug, Deserialize, Serialize)]
struct RawOwned {
    name: String,
    privatekey: String,
}

#[derive(Debug, Deserialize, Serialize)]
struct RawPublic {
    name: String,
    #[serde(default)]
    lightning_address: Option<String>,
    #[serde(default)]
    pubkey: Option<String>,
}

// ---------------------------------------------------------------- validated sections

/// One accepted mint and its price.
#[derive(Clone, Debug, PartialEq)]
pub struct MintOffer {
    /// Canonical URL (see [`canonical_mint_url`]).
    pub url: String,
    pub price_per_step: u64,
    pub unit: String,
    pub purchase_min_steps: u64,
    pub min_balance: u64,
    pub min_payout_amount: u64,
    pub payout_interval: Duration,
    pub balance_tolerance_percent: u64,
}

/// What the merchant sells and for how much.
#[derive(Clone, Debug)]
pub struct MerchantConfig {
    pub metric: Metric,
    pub step_size: u64,
    pub mints: Vec<MintOffer>,
    /// How long a POST waits for the mint before answering `payment-processing-timeout`
    /// (the redemption itself continues and is applied).
    pub payment_timeout: Duration,
    /// The gateway's Nostr key (signs 10021/1022/21023).
    pub keys: Keys,
}

impl MerchantConfig {
    /// The offer for a canonical mint URL.
    pub fn offer(&self, canonical_url: &str) -> Option<&MintOffer> {
        self.mints.iter().find(|m| m.url == canonical_url)
    }
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The API is served on this interface only (never the WAN side).
    pub lan_interface: Option<String>,
    pub post_rate_per_minute: u32,
    pub portal_port: u16,
    /// Connections accepted with this skb mark came through the captive-portal redirect
    /// (None: redirect off).
    pub portal_mark: Option<u32>,
}

/// How every TCP listener (LAN API, portal port, admin) is served: `http_limits` and
/// `admin_token` in config.json.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// A request head (and the wait for the next one on a keep-alive connection) must arrive
    /// within this: slowloris and idle connections are closed.
    pub header_read_timeout: Duration,
    /// A request body must arrive within this of its head.
    pub body_read_timeout: Duration,
    /// Connections open at once per listener group (LAN + portal port share one).
    pub max_connections: usize,
    /// Connections open at once from one client address.
    pub max_connections_per_ip: usize,
    /// Bearer token the admin TCP API requires (mandatory for a non-loopback `admin_listen`).
    pub admin_token: Option<String>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(15),
            max_connections: 512,
            max_connections_per_ip: 32,
            admin_token: None,
        }
    }
}

impl HttpLimits {
    /// Refuses an admin API reachable from other hosts without a token.
    pub fn check_admin_listen(&self, admin_listen: SocketAddr) -> Result<(), String> {
        if admin_listen.ip().is_loopback() || self.admin_token.is_some() {
            Ok(())
        } else {
            Err(format!(
                "admin_listen {admin_listen} is not a loopback address and no admin_token is set: \
                 set admin_token (clients then send `Authorization: Bearer <token>`) or listen on 127.0.0.1"
            ))
        }
    }
}

#[derive(Clone, Debug)]
pub struct ChandlerConfig {
    pub metric: Metric,
    pub usage_snapshot_interval: Duration,
    /// A closed gate's kernel entry is evicted this long after it closed.
    pub closed_retention: Duration,
    /// Bind a paid gate to the payer's IPv4 address (`dataplane.bind_payer`, default true).
    /// Off for a device that routes other hosts' traffic without NAT (a downstream router).
    pub bind_payer: bool,
}

#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    pub mode: DataPlaneMode,
    pub lan_interface: Option<String>,
    pub wan_interface: Option<String>,
    /// Walled garden: destinations reachable without paying.
    pub garden_allow: Vec<Prefix>,
    pub portal_port: u16,
    /// Mark unpaid TCP/80 with this and redirect it to `portal_port` (None: redirect off).
    pub portal_mark: Option<u32>,
    /// Capacity of the per-client maps (POLICY, USAGE), applied at load time.
    pub max_clients: u32,
    /// DNS budget of unpaid clients, enforced in the kernel.
    pub dns_budget: crate::valve::DnsBudget,
}

#[derive(Clone, Debug, Default)]
pub struct NeighbourConfig {
    pub device_leases_file: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub state_dir: PathBuf,
    /// Closed sessions, logs, usage history and finished grants are kept this long.
    pub retention: Duration,
}

impl StoreConfig {
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("tollgate.sqlite")
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ProfitShare {
    pub identity: String,
    pub lightning_address: String,
    pub factor: f64,
}

#[derive(Clone, Debug)]
pub struct PayoutConfig {
    pub shares: Vec<ProfitShare>,
}

/// The reference's `upstream_session_manager` section: verbatim, and validated for the
/// upstream buyer.
#[derive(Clone, Debug, Default)]
pub struct UpstreamConfig {
    pub reseller_mode: bool,
    pub raw: Option<serde_json::Value>,
    pub settings: crate::upstream::UpstreamSettings,
}

/// Moving funds between accepted mints (`rebalance` in config.json): whether the upstream
/// buyer may do it by itself, and the fee budget of every rebalance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebalanceConfig {
    pub auto: bool,
    /// Lightning + input fees at most this percent of the amount, plus 1 sat.
    pub fee_budget_percent: u64,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub dir: PathBuf,
    pub log_level: String,
    pub merchant: MerchantConfig,
    pub http: HttpConfig,
    pub http_limits: HttpLimits,
    pub chandler: ChandlerConfig,
    pub dataplane: DataplaneConfig,
    pub neighbour: NeighbourConfig,
    pub store: StoreConfig,
    pub payout: PayoutConfig,
    pub upstream: UpstreamConfig,
    pub rebalance: RebalanceConfig,
    pub shaping: crate::shaping::ShapingSettings,
    /// Speed tiers sold besides the default (`tiers.rs`).
    pub tiers: Vec<crate::tiers::TierSettings>,
}

/// `http_limits` + `admin_token`: zero limits and an empty token are refused.
fn http_limits(c: &Ctx<'_>, raw: &RawConfig) -> Result<HttpLimits, ConfigError> {
    let d = HttpLimits::default();
    let r = raw.http_limits.as_ref();
    let limits = HttpLimits {
        header_read_timeout: r
            .and_then(|r| r.header_read_timeout)
            .map_or(d.header_read_timeout, |x| x.0),
        body_read_timeout: r
            .and_then(|r| r.body_read_timeout)
            .map_or(d.body_read_timeout, |x| x.0),
        max_connections: r
            .and_then(|r| r.max_connections)
            .unwrap_or(d.max_connections),
        max_connections_per_ip: r
            .and_then(|r| r.max_connections_per_ip)
            .unwrap_or(d.max_connections_per_ip),
        admin_token: raw.admin_token.clone(),
    };
    for (field, zero) in [
        ("header_read_timeout", limits.header_read_timeout.is_zero()),
        ("body_read_timeout", limits.body_read_timeout.is_zero()),
        ("max_connections", limits.max_connections == 0),
        ("max_connections_per_ip", limits.max_connections_per_ip == 0),
    ] {
        if zero {
            return Err(c.err(
                format!("http_limits.{field}"),
                "must be greater than 0",
                "omit it for the default",
            ));
        }
    }
    if limits.admin_token.as_deref().is_some_and(|t| t.len() < 16) {
        return Err(c.err(
            "admin_token",
            "too short to be a secret",
            "use at least 16 random characters (e.g. `openssl rand -hex 16`)",
        ));
    }
    Ok(limits)
}

struct Ctx<'a> {
    path: &'a Path,
}

impl Ctx<'_> {
    fn err(
        &self,
        field: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            field: field.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

impl Config {
    /// Loads and validates `config.json` and `identities.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Config, ConfigError> {
        let cpath = dir.join(CONFIG_FILE);
        let ipath = dir.join(IDENTITIES_FILE);
        let ctext = read(&cpath)?;
        let itext = read(&ipath)?;
        Self::from_strs(dir, &ctext, &itext)
    }

    /// [`Config::load`] with command-line values in place of the file's: they are applied to
    /// the raw layer before validation, so whatever is derived from them follows (the portal
    /// port from `--listen`, both components' LAN interface from `--lan-iface`) and they are
    /// checked like the file's own values.
    pub fn load_with(dir: &Path, o: &Overrides) -> Result<Config, ConfigError> {
        let ctext = read(&dir.join(CONFIG_FILE))?;
        let itext = read(&dir.join(IDENTITIES_FILE))?;
        Self::from_strs_with(dir, &ctext, &itext, o)
    }

    /// The state directory the files in `dir` name: [`DEFAULT_STATE_DIR`] when there is no
    /// config.json, an error when there is one and it does not load (a typo must not send the
    /// operator's commands to another directory).
    pub fn state_dir_in(dir: &Path) -> Result<PathBuf, ConfigError> {
        if !dir.join(CONFIG_FILE).exists() {
            return Ok(PathBuf::from(DEFAULT_STATE_DIR));
        }
        Ok(Self::load(dir)?.store.state_dir)
    }

    /// Validates the two files' contents (`dir` is used for error messages and defaults).
    pub fn from_strs(
        dir: &Path,
        config_json: &str,
        identities_json: &str,
    ) -> Result<Config, ConfigError> {
        Self::from_strs_with(dir, config_json, identities_json, &Overrides::default())
    }

    /// [`Config::from_strs`] with the overrides applied to the raw layer first.
    pub fn from_strs_with(
        dir: &Path,
        config_json: &str,
        identities_json: &str,
        o: &Overrides,
    ) -> Result<Config, ConfigError> {
        let cpath = dir.join(CONFIG_FILE);
        let ipath = dir.join(IDENTITIES_FILE);
        let mut raw: RawConfig =
            serde_json::from_str(config_json).map_err(|source| ConfigError::Parse {
                path: cpath.clone(),
                source,
            })?;
        o.apply(&mut raw);
        let ids: RawIdentities =
            serde_json::from_str(identities_json).map_err(|source| ConfigError::Parse {
                path: ipath.clone(),
                source,
            })?;
        let c = Ctx { path: &cpath };
        let i = Ctx { path: &ipath };

        let metric: Metric = raw
            .metric
            .parse()
            .map_err(|p: String| c.err("metric", p, "use \"bytes\" or \"milliseconds\""))?;
        if raw.step_size == 0 {
            return Err(c.err(
                "step_size",
                "must be greater than 0",
                "set the units of the metric sold per step, e.g. 22020096",
            ));
        }
        if raw.accepted_mints.is_empty() {
            return Err(c.err(
                "accepted_mints",
                "no mint accepted",
                "add at least one {\"url\":…,\"price_per_step\":…}",
            ));
        }
        let mut mints: Vec<MintOffer> = Vec::new();
        for (n, m) in raw.accepted_mints.iter().enumerate() {
            let f = |name: &str| format!("accepted_mints[{n}].{name}");
            let url = canonical_mint_url(&m.url).map_err(|p| {
                c.err(
                    f("url"),
                    p,
                    "use the mint's https URL, e.g. https://mint.example",
                )
            })?;
            if mints.iter().any(|o| o.url == url) {
                return Err(c.err(
                    f("url"),
                    format!("{url} is listed twice"),
                    "list each mint once",
                ));
            }
            if m.price_per_step == 0 {
                return Err(c.err(
                    f("price_per_step"),
                    "must be greater than 0",
                    "set the price of one step in price_unit",
                ));
            }
            if m.price_unit.trim().is_empty() {
                return Err(c.err(f("price_unit"), "empty unit", "use \"sat\""));
            }
            let payout_interval = m
                .payout_interval_seconds
                .map_or(Duration::from_secs(60), |d| d.0);
            mints.push(MintOffer {
                url,
                price_per_step: m.price_per_step,
                unit: m.price_unit.trim().to_string(),
                purchase_min_steps: m.purchase_min_steps,
                min_balance: m.min_balance,
                min_payout_amount: m.min_payout_amount,
                payout_interval,
                balance_tolerance_percent: m.balance_tolerance_percent,
            });
        }
        // One unit, one price: the advertisement is ambiguous otherwise.
        for a in &mints {
            if let Some(b) = mints
                .iter()
                .find(|b| b.unit == a.unit && b.price_per_step != a.price_per_step)
            {
                return Err(c.err(
                    "accepted_mints",
                    format!("{} and {} price unit {} differently", a.url, b.url, a.unit),
                    "use the same price_per_step for every mint of one unit",
                ));
            }
        }

        // identities.json
        let merchant = ids
            .owned_identities
            .iter()
            .find(|o| o.name == "merchant")
            .ok_or_else(|| {
                i.err(
                    "owned_identities",
                    "no identity named \"merchant\"",
                    "add {\"name\":\"merchant\",\"privatekey\":\"<64 hex chars>\"}",
                )
            })?;
        let hex_ok = merchant.privatekey.len() == 64
            && merchant.privatekey.chars().all(|c| c.is_ascii_hexdigit());
        let secret = if hex_ok {
            SecretKey::from_hex(&merchant.privatekey).ok()
        } else {
            None
        };
        let keys = Keys::new(secret.ok_or_else(|| {
            i.err(
                "owned_identities[merchant].privatekey",
                "not a valid 32-byte hex secp256k1 secret key",
                "generate one with `openssl rand -hex 32`",
            )
        })?);
        let mut names = HashSet::new();
        for (n, p) in ids.public_identities.iter().enumerate() {
            if !names.insert(p.name.as_str()) {
                return Err(i.err(
                    format!("public_identities[{n}].name"),
                    format!("{:?} listed twice", p.name),
                    "give each identity a unique name",
                ));
            }
            if let Some(la) = &p.lightning_address {
                if !valid_lightning_address(la) {
                    return Err(i.err(
                        format!("public_identities[{n}].lightning_address"),
                        format!("{la:?} is not a Lightning address"),
                        "use user@domain.tld",
                    ));
                }
            }
        }

        // profit_share
        let mut shares = Vec::new();
        let mut sum = 0.0;
        for (n, s) in raw.profit_share.iter().enumerate() {
            if !(0.0..=1.0).contains(&s.factor) || s.factor.is_nan() {
                return Err(c.err(
                    format!("profit_share[{n}].factor"),
                    format!("{} is outside [0, 1]", s.factor),
                    "use a fraction between 0 and 1",
                ));
            }
            let who = ids
                .public_identities
                .iter()
                .find(|p| p.name == s.identity)
                .ok_or_else(|| {
                    c.err(
                        format!("profit_share[{n}].identity"),
                        format!("unknown identity {:?}", s.identity),
                        format!("add it to public_identities in {IDENTITIES_FILE}"),
                    )
                })?;
            let la = who.lightning_address.clone().ok_or_else(|| {
                i.err(
                    format!("public_identities[{}].lightning_address", s.identity),
                    "missing, but the identity receives a profit share",
                    "add \"lightning_address\":\"user@domain.tld\"",
                )
            })?;
            sum += s.factor;
            shares.push(ProfitShare {
                identity: s.identity.clone(),
                lightning_address: la,
                factor: s.factor,
            });
        }
        if !shares.is_empty() && (sum - 1.0).abs() > 1e-6 {
            return Err(c.err(
                "profit_share",
                format!("factors sum to {sum}, not 1"),
                "make the factors add up to 1",
            ));
        }

        let listen = parse_addr(&c, "listen", raw.listen.as_deref(), "0.0.0.0:2121")?;
        let admin_listen = parse_addr(
            &c,
            "admin_listen",
            raw.admin_listen.as_deref(),
            "127.0.0.1:2122",
        )?;
        let dp = raw.dataplane.as_ref();
        let mode = match dp.and_then(|d| d.mode.as_deref()) {
            None | Some("tc") => DataPlaneMode::Tc,
            Some("xdp") => DataPlaneMode::Xdp,
            Some(other) => {
                return Err(c.err(
                    "dataplane.mode",
                    format!("unknown mode {other:?}"),
                    "use \"tc\" or \"xdp\"",
                ))
            }
        };
        let mut garden_allow = Vec::new();
        for (n, cidr) in dp
            .map(|d| d.garden_allow.as_slice())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            garden_allow.push(cidr.parse::<Prefix>().map_err(|p| {
                c.err(
                    format!("dataplane.garden_allow[{n}]"),
                    p.to_string(),
                    "use a CIDR like 192.0.2.0/24",
                )
            })?);
        }
        let portal_port = dp.and_then(|d| d.portal_port).unwrap_or(listen.port());
        let portal_mark = match (mode, dp.and_then(|d| d.portal_redirect)) {
            (DataPlaneMode::Xdp, Some(true)) => {
                return Err(c.err(
                    "dataplane.portal_redirect",
                    "the captive-portal redirect needs packet marks, which XDP cannot set",
                    "use dataplane.mode \"tc\" or set portal_redirect to false",
                ))
            }
            (DataPlaneMode::Xdp, None) | (_, Some(false)) => None,
            (DataPlaneMode::Tc, _) => {
                let m = dp
                    .and_then(|d| d.portal_mark)
                    .unwrap_or(DEFAULT_PORTAL_MARK);
                if m == 0 {
                    return Err(c.err(
                        "dataplane.portal_mark",
                        "must be non-zero (0 means \"no mark\" to the kernel)",
                        format!("omit it for the default ({DEFAULT_PORTAL_MARK:#x})"),
                    ));
                }
                Some(m)
            }
        };
        let max_clients = dp
            .and_then(|d| d.max_clients)
            .unwrap_or(DEFAULT_MAX_CLIENTS);
        if !(1..=MAX_MAX_CLIENTS).contains(&max_clients) {
            return Err(c.err(
                "dataplane.max_clients",
                format!("{max_clients} is out of range"),
                format!("use 1..={MAX_MAX_CLIENTS} (default {DEFAULT_MAX_CLIENTS})"),
            ));
        }
        let closed_retention = dp
            .and_then(|d| d.closed_retention)
            .map_or(DEFAULT_CLOSED_RETENTION, |d| d.0);
        let dns_budget = {
            let d = crate::valve::DnsBudget::default();
            let r = dp.and_then(|d| d.dns_budget.as_ref());
            let b = crate::valve::DnsBudget {
                rate: r.and_then(|r| r.rate_bytes_per_second).unwrap_or(d.rate),
                burst: r.and_then(|r| r.burst_bytes).unwrap_or(d.burst),
                max_udp_payload: r
                    .and_then(|r| r.max_udp_query_bytes)
                    .unwrap_or(d.max_udp_payload),
            };
            if b.rate == 0 || (b.burst as u64) < b.max_udp_payload as u64 + 48 {
                return Err(c.err(
                    "dataplane.dns_budget",
                    "rate_bytes_per_second must be > 0 and burst_bytes must hold one largest \
                     query (max_udp_query_bytes + 48)",
                    "omit it for the defaults (4096 B/s, 32768 B burst, 512 B queries)",
                ));
            }
            b
        };
        let post_rate_per_minute = raw.post_rate_per_minute.unwrap_or(30);
        if post_rate_per_minute == 0 {
            return Err(c.err(
                "post_rate_per_minute",
                "must be greater than 0",
                "omit it for the default (30)",
            ));
        }
        let payment_timeout = raw.payment_timeout.map_or(Duration::from_secs(20), |d| d.0);
        if payment_timeout.is_zero() {
            return Err(c.err(
                "payment_timeout",
                "must be greater than 0",
                "use e.g. \"20s\"",
            ));
        }

        let rebalance = RebalanceConfig {
            auto: raw.rebalance.as_ref().and_then(|r| r.auto).unwrap_or(true),
            fee_budget_percent: raw
                .rebalance
                .as_ref()
                .and_then(|r| r.fee_budget_percent)
                .unwrap_or(2),
        };
        if rebalance.fee_budget_percent > 50 {
            return Err(c.err(
                "rebalance.fee_budget_percent",
                "must be at most 50",
                "omit it for the default (2)",
            ));
        }

        let upstream_settings =
            crate::upstream::UpstreamSettings::parse(raw.upstream_session_manager.as_ref())
                .map_err(|e| match e {
                    crate::upstream::UpstreamError::Config {
                        field,
                        problem,
                        fix,
                    } => c.err(field, problem, fix),
                    other => c.err("upstream_session_manager", other.to_string(), "see README"),
                })?;

        let http_limits = http_limits(&c, &raw)?;
        let retention = raw
            .retention
            .map_or(crate::store::DEFAULT_RETENTION, |d| d.0);
        if retention < Duration::from_secs(86_400) {
            return Err(c.err(
                "retention",
                "must be at least a day (history answers customers' questions)",
                "omit it for the default (30d)",
            ));
        }

        Ok(Config {
            dir: dir.to_path_buf(),
            log_level: raw.log_level.clone().unwrap_or_else(|| "info".into()),
            merchant: MerchantConfig {
                metric,
                step_size: raw.step_size,
                mints,
                payment_timeout,
                keys,
            },
            http: HttpConfig {
                listen,
                admin_listen,
                lan_interface: raw.lan_interface.clone(),
                post_rate_per_minute,
                portal_port,
                portal_mark,
            },
            http_limits,
            chandler: ChandlerConfig {
                metric,
                usage_snapshot_interval: raw
                    .usage_snapshot_interval
                    .map_or(Duration::from_secs(10), |d| d.0),
                closed_retention,
                bind_payer: dp.and_then(|d| d.bind_payer).unwrap_or(true),
            },
            dataplane: DataplaneConfig {
                mode,
                lan_interface: raw.lan_interface.clone(),
                wan_interface: raw.wan_interface.clone(),
                garden_allow,
                portal_port,
                portal_mark,
                max_clients,
                dns_budget,
            },
            neighbour: NeighbourConfig {
                device_leases_file: raw.device_leases_file.clone(),
            },
            store: StoreConfig {
                state_dir: raw
                    .state_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
                retention,
            },
            payout: PayoutConfig { shares },
            upstream: UpstreamConfig {
                reseller_mode: raw.reseller_mode,
                raw: raw.upstream_session_manager.clone(),
                settings: upstream_settings,
            },
            rebalance,
            shaping: {
                let s = raw.shaping.unwrap_or_default();
                s.validate(&cpath)?;
                s
            },
            tiers: {
                let t = raw.tiers.clone().unwrap_or_default();
                crate::tiers::validate(&t, &cpath)?;
                t
            },
        })
    }

    /// Writes a working default configuration (fresh merchant key; files mode 0600) into `dir`
    /// and loads it. Existing files are left alone.
    pub fn write_default(dir: &Path) -> Result<Config, ConfigError> {
        fs::create_dir_all(dir).map_err(|source| ConfigError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let key = Keys::generate().secret_key().to_secret_hex();
        let config = serde_json::json!({
            "config_version": "v0.0.8",
            "log_level": "info",
            "metric": "bytes",
            "step_size": 22020096u64,
            "accepted_mints": [{
                "url": "https://mint.minibits.cash/Bitcoin",
                "price_per_step": 1, "price_unit": "sat", "purchase_min_steps": 0,
                "min_balance": 64, "min_payout_amount": 128,
                "payout_interval_seconds": 60, "balance_tolerance_percent": 10
            }],
            "profit_share": [{"identity": "owner", "factor": 1.0}],
            "reseller_mode": false,
            "listen": "0.0.0.0:2121",
            "admin_listen": "127.0.0.1:2122",
            "state_dir": "/var/lib/tollgate",
            "dataplane": {"mode": "tc", "garden_allow": []}
        });
        let identities = serde_json::json!({
            "owned_identities": [{"name": "merchant", "privatekey": key}],
            "public_identities": [{"name": "owner", "lightning_address": "tollgate@minibits.cash"}]
        });
        for (name, value) in [(CONFIG_FILE, config), (IDENTITIES_FILE, identities)] {
            let path = dir.join(name);
            if path.exists() {
                continue;
            }
            write_private(
                &path,
                &serde_json::to_string_pretty(&value).unwrap_or_default(),
            )?;
        }
        Config::load(dir)
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates the file with mode 0600 from the start (the merchant key must never be world-readable).
fn write_private(path: &Path, text: &str) -> Result<(), ConfigError> {
    use std::os::unix::fs::OpenOptionsExt;
    let werr = |source| ConfigError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(werr)?;
    f.write_all(text.as_bytes()).map_err(werr)?;
    f.sync_all().map_err(werr)
}

fn parse_addr(
    c: &Ctx<'_>,
    field: &str,
    v: Option<&str>,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    v.unwrap_or(default).parse().map_err(|_| {
        c.err(
            field,
            format!("{:?} is not an ip:port address", v.unwrap_or_default()),
            format!("use e.g. {default:?}"),
        )
    })
}

impl Config {
    /// The wallet's section: accepted mints and the profit share.
    pub fn wallet_settings(&self) -> crate::wallet::WalletSettings {
        let mints = self
            .merchant
            .mints
            .iter()
            .map(|m| crate::wallet::MintSettings {
                url: m.url.clone(),
                unit: m.unit.clone(),
                min_balance: m.min_balance,
                min_payout_amount: m.min_payout_amount,
                payout_interval_seconds: m.payout_interval.as_secs().max(1),
                balance_tolerance_percent: m.balance_tolerance_percent,
            })
            .collect();
        let mut s = crate::wallet::WalletSettings::new(mints);
        s.profit_share = self
            .payout
            .shares
            .iter()
            .map(|p| crate::wallet::ProfitShare {
                identity: p.identity.clone(),
                factor: p.factor,
                lightning_address: p.lightning_address.clone(),
            })
            .collect();
        s.rebalance_fee_budget_percent = self.rebalance.fee_budget_percent;
        s.auto_rebalance = self.rebalance.auto;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const EXAMPLE: &str = r#"{"config_version":"v0.0.8","log_level":"info","metric":"bytes","step_size":22020096,
 "accepted_mints":[{"url":"https://mint.example","price_per_step":1,"price_unit":"sat",
   "purchase_min_steps":0,"min_balance":64,"min_payout_amount":128,
   "payout_interval_seconds":60,"balance_tolerance_percent":10}],
 "profit_share":[{"identity":"owner","factor":0.79},{"identity":"dev","factor":0.21}],
 "reseller_mode":false,
 "upstream_session_manager":{"max_price_per_millisecond":0.0028,"max_price_per_byte":0.0000373,
   "trust":{"default_policy":"trust_all","allowlist":[],"blocklist":[]},
   "sessions":{"preferred_session_increments_milliseconds":60000,"preferred_session_increments_bytes":131100000,
     "millisecond_renewal_offset":10000,"bytes_renewal_offset":131100000}}}"#;
    pub const IDS: &str = r#"{"owned_identities":[{"name":"merchant","privatekey":"0000000000000000000000000000000000000000000000000000000000000003"}],
"public_identities":[{"name":"owner","lightning_address":"owner@example.com"},{"name":"dev","lightning_address":"dev@example.org"}]}"#;

    fn load(config: &str, ids: &str) -> Result<Config, ConfigError> {
        Config::from_strs(Path::new("/etc/tollgate"), config, ids)
    }

    fn patched(f: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).expect("example");
        f(&mut v);
        v.to_string()
    }

    fn field_of(config: &str, ids: &str) -> (String, String) {
        let e = load(config, ids).expect_err("must be rejected");
        let msg = e.to_string();
        (e.field().unwrap_or_default().to_string(), msg)
    }

    /// `tiers` in config.json: absent = none; a valid list loads; a bad one is refused with
    /// its field; an unknown key inside a tier is refused (a typo must not sell at factor 0).
    #[test]
    fn tiers_load_and_bad_ones_are_refused() {
        assert!(load(EXAMPLE, IDS).expect("example").tiers.is_empty());
        let ok = patched(|v| {
            v["tiers"] = serde_json::json!([
                {"name": "fast", "down_kbit": 20000, "up_kbit": 5000, "price_factor": 3}
            ])
        });
        let c = load(&ok, IDS).expect("tiers");
        assert_eq!(c.tiers[0].price_factor, 3);
        let bad =
            patched(|v| v["tiers"] = serde_json::json!([{"name": "fast", "price_factor": 1}]));
        assert_eq!(field_of(&bad, IDS).0, "tiers[0].price_factor");
        let typo =
            patched(|v| v["tiers"] = serde_json::json!([{"name": "fast", "price_factr": 3}]));
        assert!(
            load(&typo, IDS).is_err(),
            "unknown/missing tier fields refused"
        );
    }

    #[test]
    fn reference_example_loads_with_defaults() {
        let c = load(EXAMPLE, IDS).expect("example config");
        assert_eq!(c.merchant.metric, Metric::Bytes);
        assert_eq!(c.merchant.step_size, 22020096);
        assert_eq!(c.merchant.mints[0].url, "https://mint.example");
        assert_eq!(c.merchant.mints[0].payout_interval, Duration::from_secs(60));
        assert_eq!(c.payout.shares.len(), 2);
        assert_eq!(c.http.listen, "0.0.0.0:2121".parse().expect("addr"));
        assert_eq!(c.http.admin_listen, "127.0.0.1:2122".parse().expect("addr"));
        assert_eq!(
            c.store.db_path(),
            PathBuf::from("/var/lib/tollgate/tollgate.sqlite")
        );
        assert_eq!(c.dataplane.mode, DataPlaneMode::Tc);
        assert!(c.upstream.raw.is_some());
    }

    #[test]
    fn portal_redirect_switch_and_mark() {
        let c = load(&patched(|_| {}), IDS).expect("config");
        assert_eq!(
            c.dataplane.portal_mark,
            Some(DEFAULT_PORTAL_MARK),
            "on by default"
        );
        assert_eq!(c.http.portal_mark, c.dataplane.portal_mark);
        let c = load(
            &patched(|v| v["dataplane"] = serde_json::json!({"portal_redirect": false})),
            IDS,
        )
        .expect("config");
        assert_eq!(c.dataplane.portal_mark, None);
        assert_eq!(c.http.portal_mark, None);
        let c = load(
            &patched(|v| v["dataplane"] = serde_json::json!({"portal_mark": 0x100})),
            IDS,
        )
        .expect("config");
        assert_eq!(c.http.portal_mark, Some(0x100));
        for (bad, field) in [
            (
                serde_json::json!({"portal_mark": 0}),
                "dataplane.portal_mark",
            ),
            (
                serde_json::json!({"mode": "xdp", "portal_redirect": true}),
                "dataplane.portal_redirect",
            ),
        ] {
            let e = load(&patched(|v| v["dataplane"] = bad.clone()), IDS).unwrap_err();
            assert_eq!(e.field(), Some(field), "{e}");
        }
        for hostile in [
            serde_json::json!({"portal_mark": -1}),
            serde_json::json!({"portal_mark": 4294967296u64}),
            serde_json::json!({"portal_redirect": "yes"}),
        ] {
            assert!(
                load(&patched(|v| v["dataplane"] = hostile.clone()), IDS).is_err(),
                "{hostile}"
            );
        }
    }

    #[test]
    fn additions_parse() {
        let text = patched(|v| {
            v["lan_interface"] = "br-lan".into();
            v["listen"] = "10.0.0.1:2121".into();
            v["dataplane"] = serde_json::json!({"mode":"xdp","garden_allow":["192.0.2.0/24","2001:db8::/32"],"portal_port":80});
            v["payment_timeout"] = "500ms".into();
            v["usage_snapshot_interval"] = 2_000_000_000u64.into();
            v["device_leases_file"] = "/tmp/dhcp.leases".into();
        });
        let c = load(&text, IDS).expect("config");
        assert_eq!(c.dataplane.mode, DataPlaneMode::Xdp);
        assert_eq!(c.dataplane.garden_allow.len(), 2);
        assert_eq!(c.http.portal_port, 80);
        assert_eq!(c.dataplane.portal_mark, None, "xdp: no redirect by default");
        assert_eq!(c.merchant.payment_timeout, Duration::from_millis(500));
        assert_eq!(c.chandler.usage_snapshot_interval, Duration::from_secs(2));
        assert_eq!(
            c.neighbour.device_leases_file,
            Some(PathBuf::from("/tmp/dhcp.leases"))
        );
    }

    #[test]
    fn http_limits_admin_token_and_retention() {
        let c = load(&patched(|_| {}), IDS).expect("defaults");
        assert_eq!(c.http_limits, HttpLimits::default());
        assert_eq!(c.store.retention, crate::store::DEFAULT_RETENTION);
        let c = load(
            &patched(|v| {
                v["http_limits"] = serde_json::json!({"header_read_timeout": "3s",
                    "max_connections": 64, "max_connections_per_ip": 4});
                v["admin_token"] = "0123456789abcdef0123".into();
                v["retention"] = "7d".into();
            }),
            IDS,
        )
        .expect("config");
        assert_eq!(c.http_limits.header_read_timeout, Duration::from_secs(3));
        assert_eq!(c.http_limits.body_read_timeout, Duration::from_secs(15));
        assert_eq!(
            (
                c.http_limits.max_connections,
                c.http_limits.max_connections_per_ip
            ),
            (64, 4)
        );
        assert_eq!(c.store.retention, Duration::from_secs(7 * 86_400));
        // Exposed admin: fine with the token, refused without.
        let exposed: SocketAddr = "192.168.1.1:2122".parse().expect("addr");
        assert!(c.http_limits.check_admin_listen(exposed).is_ok());
        let err = HttpLimits::default()
            .check_admin_listen(exposed)
            .expect_err("no token");
        assert!(err.contains("admin_token"), "{err}");
        assert!(HttpLimits::default()
            .check_admin_listen("127.0.0.1:2122".parse().expect("addr"))
            .is_ok());
        for (field, bad) in [
            (
                "http_limits.max_connections",
                serde_json::json!({"max_connections": 0}),
            ),
            (
                "http_limits.header_read_timeout",
                serde_json::json!({"header_read_timeout": "0s"}),
            ),
        ] {
            let e = load(&patched(|v| v["http_limits"] = bad.clone()), IDS).expect_err(field);
            assert_eq!(e.field(), Some(field));
        }
        let e = load(&patched(|v| v["admin_token"] = "short".into()), IDS).expect_err("short");
        assert_eq!(e.field(), Some("admin_token"));
        let e = load(&patched(|v| v["retention"] = "1h".into()), IDS).expect_err("too short");
        assert_eq!(e.field(), Some("retention"));
    }

    #[test]
    fn mint_urls_are_canonical() {
        assert_eq!(
            canonical_mint_url("HTTPS://Mint.Example/").as_deref(),
            Ok("https://mint.example")
        );
        assert_eq!(
            canonical_mint_url("https://mint.example/Bitcoin/").as_deref(),
            Ok("https://mint.example/Bitcoin")
        );
        assert_eq!(
            canonical_mint_url("http://127.0.0.1:3338").as_deref(),
            Ok("http://127.0.0.1:3338")
        );
        for bad in [
            "mint.example",
            "ftp://mint.example",
            "https://",
            "https://m.example/?a=1",
        ] {
            assert!(canonical_mint_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_validation_error_names_field_and_fix() {
        let cases: Vec<(String, String, &str)> = vec![
            (
                patched(|v| v["metric"] = "packets".into()),
                IDS.into(),
                "metric",
            ),
            (
                patched(|v| v["step_size"] = 0.into()),
                IDS.into(),
                "step_size",
            ),
            (
                patched(|v| v["accepted_mints"][0]["price_per_step"] = 0.into()),
                IDS.into(),
                "accepted_mints[0].price_per_step",
            ),
            (
                patched(|v| v["accepted_mints"][0]["url"] = "not a url".into()),
                IDS.into(),
                "accepted_mints[0].url",
            ),
            (
                patched(|v| v["accepted_mints"] = serde_json::json!([])),
                IDS.into(),
                "accepted_mints",
            ),
            (
                patched(|v| v["profit_share"][0]["factor"] = 1.5.into()),
                IDS.into(),
                "profit_share[0].factor",
            ),
            (
                patched(|v| v["profit_share"][0]["factor"] = (-0.1).into()),
                IDS.into(),
                "profit_share[0].factor",
            ),
            (
                patched(|v| v["profit_share"][0]["factor"] = 0.5.into()),
                IDS.into(),
                "profit_share",
            ),
            (
                patched(|v| v["profit_share"][0]["identity"] = "nobody".into()),
                IDS.into(),
                "profit_share[0].identity",
            ),
            (
                patched(|v| v["dataplane"] = serde_json::json!({"mode":"iptables"})),
                IDS.into(),
                "dataplane.mode",
            ),
            (
                patched(|v| v["dataplane"] = serde_json::json!({"garden_allow":["10.0.0.0/99"]})),
                IDS.into(),
                "dataplane.garden_allow[0]",
            ),
            (
                patched(|v| v["upstream_session_manager"]["max_price_per_byte"] = (-1).into()),
                IDS.into(),
                "upstream_session_manager.max_price_per_byte",
            ),
            (
                patched(|v| v["listen"] = "nowhere".into()),
                IDS.into(),
                "listen",
            ),
            (
                EXAMPLE.into(),
                IDS.replace("owner@example.com", "not-an-address"),
                "public_identities[0].lightning_address",
            ),
            (
                EXAMPLE.into(),
                IDS.replace("\"merchant\"", "\"someone\""),
                "owned_identities",
            ),
            (
                EXAMPLE.into(),
                IDS.replace(
                    "0000000000000000000000000000000000000000000000000000000000000003",
                    "zz",
                ),
                "owned_identities[merchant].privatekey",
            ),
            (
                EXAMPLE.into(),
                IDS.replace(
                    "0000000000000000000000000000000000000000000000000000000000000003",
                    "0000000000000000000000000000000000000000000000000000000000000000",
                ),
                "owned_identities[merchant].privatekey",
            ),
        ];
        for (config, ids, field) in cases {
            let (got, msg) = field_of(&config, &ids);
            assert_eq!(got, field, "{msg}");
            assert!(msg.contains("fix:"), "{msg}");
            assert!(msg.contains(".json"), "{msg}");
        }
        // Within tolerance is fine.
        let ok = patched(|v| {
            v["profit_share"][0]["factor"] = 0.7900005.into();
        });
        load(&ok, IDS).expect("sum within 1e-6");
        // Unparsable JSON names the file.
        let e = load("{", IDS).expect_err("bad json");
        assert!(e.to_string().contains("config.json"));
    }

    #[test]
    fn rebalance_section_defaults_and_bounds() {
        let c = load(EXAMPLE, IDS).expect("example config");
        let d = RebalanceConfig {
            auto: true,
            fee_budget_percent: 2,
        };
        assert_eq!(c.rebalance, d);
        let w = c.wallet_settings();
        assert!(w.auto_rebalance);
        assert_eq!(w.rebalance_fee_budget_percent, 2);
        let text = patched(|v| {
            v["rebalance"] = serde_json::json!({"auto": false, "fee_budget_percent": 5})
        });
        let w = load(&text, IDS).expect("config").wallet_settings();
        assert_eq!(
            (w.auto_rebalance, w.rebalance_fee_budget_percent),
            (false, 5)
        );
        let text = patched(|v| v["rebalance"] = serde_json::json!({"fee_budget_percent": 51}));
        assert_eq!(field_of(&text, IDS).0, "rebalance.fee_budget_percent");
    }

    #[test]
    fn duplicate_mint_after_canonicalisation_is_rejected() {
        let text = patched(|v| {
            let m = v["accepted_mints"][0].clone();
            let mut m2 = m.clone();
            m2["url"] = "HTTPS://MINT.EXAMPLE/".into();
            v["accepted_mints"] = serde_json::json!([m, m2]);
        });
        assert_eq!(field_of(&text, IDS).0, "accepted_mints[1].url");
    }

    #[test]
    fn write_default_creates_private_working_config() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tollgate-cfg-{}", std::process::id()));
        fs::remove_dir_all(&dir).ok();
        let c = Config::write_default(&dir).expect("default config");
        assert_eq!(c.merchant.metric, Metric::Bytes);
        for f in [CONFIG_FILE, IDENTITIES_FILE] {
            let mode = fs::metadata(dir.join(f))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        // A second call keeps the key.
        let again = Config::write_default(&dir).expect("reload");
        assert_eq!(
            again.merchant.keys.public_key(),
            c.merchant.keys.public_key()
        );
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn dns_budget_defaults_overrides_and_refusals() {
        let c = load(&patched(|_| {}), IDS).expect("config");
        assert_eq!(c.dataplane.dns_budget, crate::valve::DnsBudget::default());
        assert_eq!(
            (c.dataplane.dns_budget.rate, c.dataplane.dns_budget.burst),
            (4096, 32768)
        );
        let c = load(
            &patched(|v| {
                v["dataplane"] = serde_json::json!({"dns_budget": {"rate_bytes_per_second": 1000,
                    "burst_bytes": 8000, "max_udp_query_bytes": 300}})
            }),
            IDS,
        )
        .expect("config");
        assert_eq!(
            c.dataplane.dns_budget,
            crate::valve::DnsBudget {
                rate: 1000,
                burst: 8000,
                max_udp_payload: 300
            }
        );
        for bad in [
            serde_json::json!({"rate_bytes_per_second": 0}),
            serde_json::json!({"burst_bytes": 100}),
        ] {
            let (field, _) = field_of(
                &patched(|v| v["dataplane"] = serde_json::json!({"dns_budget": bad})),
                IDS,
            );
            assert_eq!(field, "dataplane.dns_budget");
        }
        assert!(load(
            &patched(|v| v["dataplane"] = serde_json::json!({"dns_budget": {"rate": 1}})),
            IDS
        )
        .is_err());
    }
}
