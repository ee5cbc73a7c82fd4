//! The operator API: what `tollgate status|clients|wallet|gate` ask the daemon, and the
//! Prometheus `/metrics` page. [`format`] renders the answers for humans, [`metrics`] writes
//! the exposition text.
//!
//! ```text
//! control socket (0600) ── control_router = http::admin_router + admin_verbs_router (grant,
//!                          close) + /ops/* + /metrics
//! admin TCP (loopback, or any address with admin_token ─> Bearer required)
//!                       ── http::admin_router + GET /ops/status + /metrics  (read-only: nothing
//!                          that moves money or access)
//!
//! GET  /ops/status               gateway, data plane, mints (probed), balances, warnings
//! GET  /ops/clients              sessions + kernel counters + IPv4 from the ARP table +
//!                                current rates ([`rates`], sampled every ≥ 2 s)
//! GET  /ops/wallet/balance       per mint: balance, reserved, available
//! GET  /ops/wallet/payouts       every payout attempt
//! POST /ops/wallet/receive       {"token": …}              → receipt (manual funding)
//! POST /ops/wallet/send          {"mint": …, "amount": n}  → a token (bearer money!)
//! POST /ops/wallet/rebalance     {"to": …, "amount": n, "from": …?} → the rebalance record
//! POST /ops/gate/{mac}/open|extend|close  {"bytes": n} | {"seconds": n}
//!                                recorded in the session log as admin-open/-extend/-close
//! GET  /metrics                  Prometheus text format 0.0.4
//! ```
//! `tollgate maps` does not come here: it reads the pinned maps itself ([`maps_report`]), so
//! it works while the daemon is down.

pub mod format;
pub mod metrics;
pub mod rates;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use axum::{
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::{Deserialize, Serialize};

use crate::{
    chandler::{ChandlerError, SessionView},
    http::{self, AppState},
    neighbour,
    protocol::Metric,
    valve::{ConfigView, GateState, Gates, IndexShape, MacAddr, Valve, ValveError},
    wallet::{Wallet, WalletError},
};

// ------------------------------------------------------------------ answers

/// The gateway's identity as configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayInfo {
    pub lan_iface: String,
    pub lan_ipv4: Option<Ipv4Addr>,
    /// Customer API address.
    pub listen: String,
    pub admin_listen: String,
    pub control_socket: String,
    /// `bytes` or `milliseconds`.
    pub metric: String,
    pub step_size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneInfo {
    pub iface: String,
    /// `tc` or `xdp` (ingress; egress is always TC).
    pub mode: String,
    pub pin_dir: String,
    /// Pinned links, e.g. `tc_ingress`, `tc_egress`.
    pub attach_points: Vec<String>,
    pub policy_entries: u32,
    pub usage_entries: u32,
    pub capacity: u32,
    /// Closed clients' entries evicted since the daemon started.
    #[serde(default)]
    pub evictions: crate::valve::Evictions,
}

/// One accepted mint: reachability, price and our funds there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MintStatus {
    pub mint: String,
    pub reachable: bool,
    pub error: Option<String>,
    pub unit: String,
    pub price_per_step: u64,
    pub balance: u64,
    pub reserved: u64,
    pub available: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCounts {
    pub active: u64,
    pub closed: u64,
}

/// `tollgate status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub gateway: GatewayInfo,
    pub dataplane: DataplaneInfo,
    pub mints: Vec<MintStatus>,
    pub clients: ClientCounts,
    /// The upstream session this gateway buys from (`null` unless in reseller mode).
    pub upstream: Option<serde_json::Value>,
    /// The supervised background tasks (see `supervisor`).
    #[serde(default)]
    pub tasks: Vec<crate::supervisor::TaskStatus>,
    pub warnings: Vec<String>,
    /// The state directory's databases and their size on disk (+ WAL), bytes.
    #[serde(default)]
    pub databases: Vec<(String, u64)>,
}

/// Size on disk of each SQLite database in `dir` (file + `-wal`), by name.
pub fn database_sizes(dir: &std::path::Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, u64)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let db = name.strip_suffix(".sqlite")?.to_string();
            let wal = std::fs::metadata(dir.join(format!("{name}-wal"))).map_or(0, |m| m.len());
            Some((db, e.metadata().ok()?.len() + wal))
        })
        .collect();
    out.sort();
    out
}

/// One device, as `tollgate clients` shows it. Amounts are in the session's metric units;
/// the byte and packet counters are the kernel's (cumulative for the MAC).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRow {
    pub mac: MacAddr,
    pub ip: Option<IpAddr>,
    /// `active`, or why the session ended (`quota`, `expiry`, `admin-close`, …).
    pub state: String,
    pub metric: String,
    pub allotment: u64,
    pub used: u64,
    pub remaining: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub packets_up: u64,
    pub packets_down: u64,
    pub started_unix: u64,
    /// Time sessions: when the kernel shuts the gate (unix ms).
    pub expires_unix_ms: Option<u64>,
    /// Rate limits in force in the data plane, kbit/s (0 = unlimited).
    #[serde(default)]
    pub down_kbit: u64,
    #[serde(default)]
    pub up_kbit: u64,
    /// The speed tier bought (`default` = the standard prices).
    #[serde(default)]
    pub tier: String,
    /// The rate over the last sampling interval ([`rates`]), bits/s of L3 bytes; `None`
    /// until the client was sampled twice.
    #[serde(default)]
    pub now: Option<rates::CurrentRate>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceRow {
    pub mint: String,
    pub unit: String,
    pub balance: u64,
    pub reserved: u64,
    pub available: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayoutRow {
    pub id: i64,
    pub mint: String,
    pub identity: String,
    pub lightning_address: String,
    pub amount: u64,
    pub fee: u64,
    pub outcome: String,
    pub message: Option<String>,
    pub created_at: u64,
}

impl From<crate::wallet::MintBalance> for BalanceRow {
    fn from(b: crate::wallet::MintBalance) -> Self {
        BalanceRow {
            mint: b.mint,
            unit: b.unit,
            balance: b.balance,
            reserved: b.reserved,
            available: b.available,
        }
    }
}

impl From<crate::wallet::PayoutRecord> for PayoutRow {
    fn from(p: crate::wallet::PayoutRecord) -> Self {
        PayoutRow {
            id: p.id,
            mint: p.mint,
            identity: p.identity,
            lightning_address: p.lightning_address,
            amount: p.amount,
            fee: p.fee,
            outcome: p.outcome,
            message: p.message,
            created_at: p.created_at,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveRequest {
    pub token: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveAnswer {
    pub mint: String,
    pub unit: String,
    pub gross: u64,
    pub net: u64,
    pub replayed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    pub mint: String,
    pub amount: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendAnswer {
    pub token: String,
    /// Pass to the wallet's reclaim if the token is never claimed.
    pub op_id: String,
    pub mint: String,
    pub amount: u64,
    pub value: u64,
    pub receiver_fee: u64,
}

/// Move `amount` to mint `to` over Lightning, from `from` or the richest other mint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalanceRequest {
    pub to: String,
    pub amount: u64,
    #[serde(default)]
    pub from: Option<String>,
}

/// A rebalance as recorded (`state`: done, minting = finished at the next start, failed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalanceAnswer {
    pub id: String,
    pub source: String,
    pub target: String,
    pub amount: u64,
    pub fee: u64,
    pub state: String,
}

impl From<crate::wallet::RebalanceRecord> for RebalanceAnswer {
    fn from(r: crate::wallet::RebalanceRecord) -> Self {
        RebalanceAnswer {
            id: r.id,
            source: r.source,
            target: r.target,
            amount: r.amount,
            fee: r.fee,
            state: r.state,
        }
    }
}

/// Exactly one of the two, matching the gateway's metric.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateRequest {
    pub bytes: Option<u64>,
    pub seconds: Option<u64>,
    /// New download rate limit in kbit/s (0 = unlimited; absent = unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_kbit: Option<u64>,
    /// New upload rate limit in kbit/s (0 = unlimited; absent = unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_kbit: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictRow {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Occupancy {
    pub policy: u32,
    pub usage: u32,
    pub capacity: u32,
    /// The policy index's health.
    #[serde(default)]
    pub index: IndexShape,
}

/// `tollgate maps`: the pinned maps, decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapsReport {
    pub pin_dir: String,
    pub attach_points: Vec<String>,
    pub config: ConfigView,
    pub occupancy: Occupancy,
    pub gates: Vec<GateState>,
    pub verdicts: BTreeMap<String, VerdictRow>,
    /// CLOCK_BOOTTIME now, to read the gates' deadlines against.
    pub now_boot_ns: u64,
}

/// Reads every pinned map (works with or without a running daemon).
pub fn maps_report(valve: &Valve) -> Result<MapsReport, ValveError> {
    let (policy, usage) = valve.occupancy();
    let mut gates = valve.gates()?;
    gates.sort_by_key(|g| g.mac);
    Ok(MapsReport {
        pin_dir: valve.pin_dir().display().to_string(),
        attach_points: valve.attach_points(),
        config: valve.config_view()?,
        occupancy: Occupancy {
            policy,
            usage,
            capacity: valve.capacity(),
            index: valve.index_shape(),
        },
        gates,
        verdicts: valve
            .verdicts()?
            .0
            .into_iter()
            .map(|(v, packets, bytes)| (v.name().to_string(), VerdictRow { packets, bytes }))
            .collect(),
        now_boot_ns: valve.now_boot_ns(),
    })
}

// ------------------------------------------------------------------ errors

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("wallet: {0}")]
    Wallet(#[from] WalletError),
    #[error("sessions: {0}")]
    Chandler(#[from] ChandlerError),
    #[error("data plane: {0}")]
    Valve(#[from] ValveError),
}

impl OpsError {
    pub fn status(&self) -> StatusCode {
        match self {
            OpsError::BadRequest(_) => StatusCode::BAD_REQUEST,
            OpsError::NotFound(_) => StatusCode::NOT_FOUND,
            OpsError::Conflict(_) => StatusCode::CONFLICT,
            OpsError::Wallet(w) => match w {
                WalletError::InvalidToken { .. }
                | WalletError::MintNotAccepted { .. }
                | WalletError::WrongUnit { .. }
                | WalletError::Locked
                | WalletError::TokenSpent
                | WalletError::InsufficientFunds { .. }
                | WalletError::InvalidRequest { .. }
                | WalletError::FeeBudget { .. } => StatusCode::BAD_REQUEST,
                WalletError::TokenPending
                | WalletError::MintUnavailable { .. }
                | WalletError::RateLimited { .. } => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            OpsError::Chandler(ChandlerError::NoSession { .. }) => StatusCode::NOT_FOUND,
            OpsError::Valve(ValveError::Full { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            OpsError::Chandler(_) | OpsError::Valve(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for OpsError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "operator request failed");
        }
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

// ------------------------------------------------------------------ state and routes

/// What the operator API reads (cheap to clone).
#[derive(Clone)]
pub struct OpsState {
    pub app: AppState,
    pub wallet: Wallet,
    pub valve: Arc<Valve>,
    pub gateway: GatewayInfo,
    /// Per-mint bound of the `/v1/info` probe in `status`.
    pub probe_timeout: Duration,
    /// Where the MAC → IPv4 table comes from (`/proc/net/arp`).
    pub arp_path: PathBuf,
    /// The state directory (its databases' sizes are in `status`).
    pub state_dir: PathBuf,
    /// The daemon's background tasks.
    pub tasks: Arc<crate::supervisor::Supervisor>,
    /// Re-reads config.json (`tollgate reload`); `None`: reloading is not available.
    pub reload: Option<Arc<crate::reload::Reloader>>,
    /// Each client's current rate, sampled by its own task.
    pub rates: Arc<rates::RateMeter>,
}

/// Everything, for the control socket (its file mode is the access control).
pub fn control_router(st: OpsState) -> Router {
    http::admin_router(st.app.clone())
        .merge(http::admin_verbs_router(st.app.clone()))
        .merge(
            Router::new()
                .route("/ops/status", get(status))
                .route("/ops/clients", get(clients))
                .route("/ops/wallet/balance", get(balance))
                .route("/ops/wallet/payouts", get(payouts))
                .route("/ops/wallet/receive", post(receive))
                .route("/ops/wallet/send", post(send))
                .route("/ops/wallet/rebalance", post(rebalance))
                .route("/ops/gate/{mac}/{action}", post(gate))
                .route("/ops/reload", post(reload))
                .route("/metrics", get(metrics_page))
                .with_state(st),
        )
}

/// `tollgate reload`: as `SIGHUP`, with the outcome as the answer (a config that does not load
/// is a 400 with the error; the running configuration stays).
async fn reload(State(st): State<OpsState>) -> Result<Json<crate::reload::ReloadReport>, OpsError> {
    let r = st
        .reload
        .clone()
        .ok_or_else(|| OpsError::NotFound("this daemon cannot reload its configuration".into()))?;
    match tokio::task::spawn_blocking(move || r.reload_logged()).await {
        Ok(Ok(report)) => Ok(Json(report)),
        Ok(Err(e)) => Err(OpsError::BadRequest(format!(
            "config reload refused, the running configuration is kept: {e}"
        ))),
        Err(e) => Err(OpsError::BadRequest(format!("config reload task: {e}"))),
    }
}

/// The admin TCP address: read-only (the admin API's GETs, `/ops/status`, `/metrics` for a
/// scraper); with a `token`, every request must carry `Authorization: Bearer <token>`.
pub fn admin_tcp_router(st: OpsState, token: Option<String>) -> Router {
    let app = http::admin_router(st.app.clone()).merge(
        Router::new()
            .route("/ops/status", get(status))
            .route("/metrics", get(metrics_page))
            .with_state(st),
    );
    match token {
        Some(t) => app.layer(axum::middleware::from_fn(move |req, next| {
            bearer_only(t.clone(), req, next)
        })),
        None => app,
    }
}

/// 401 unless the request carries the admin token (compared in constant time).
async fn bearer_only(
    token: String,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let same = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "admin token required\n",
        )
            .into_response()
    }
}

fn metric_name(m: Metric) -> String {
    m.as_str().to_string()
}

async fn status(State(st): State<OpsState>) -> Result<Json<StatusReport>, OpsError> {
    let (probes, balances) = tokio::join!(
        st.wallet.probe_mints(st.probe_timeout),
        st.wallet.balances()
    );
    let mut warnings = st.wallet.warnings().await;
    if let Ok(v) = st.valve.verdicts() {
        let n = v.packets(crate::valve::Verdict::DropSpoofed);
        if n > 0 {
            warnings.push(format!(
                "{n} packets from paid MACs with another source address dropped (MAC cloning \
                 or address spoofing; see the log)"
            ));
        }
    }
    let balances = balances.unwrap_or_else(|e| {
        warnings.push(format!("wallet balances unavailable: {e}"));
        Vec::new()
    });
    let upstream = st.app.upstream.as_ref().map(|u| {
        let s = u.status();
        warnings.extend(s.warnings.iter().map(|w| format!("upstream: {w}")));
        if let Some(r) = &s.last_refusal {
            warnings.push(format!("upstream: not buying: {r}"));
        }
        serde_json::to_value(&s).unwrap_or_default()
    });
    let tasks = st.tasks.status();
    for t in tasks.iter().filter(|t| t.state != "running") {
        warnings.push(format!(
            "task {} is {} ({} restarts; last exit: {})",
            t.name,
            t.state,
            t.restarts,
            t.last_exit.as_deref().unwrap_or("-")
        ));
    }
    let cfg = st.app.merchant.config();
    let mints = probes
        .into_iter()
        .map(|p| {
            let b = balances.iter().find(|b| b.mint == p.mint);
            let offer = cfg.offer(&p.mint);
            if let Some(e) = &p.error {
                warnings.push(format!("mint {} unreachable: {e}", p.mint));
            }
            MintStatus {
                unit: offer.map_or_else(|| "sat".into(), |o| o.unit.clone()),
                price_per_step: offer.map_or(0, |o| o.price_per_step),
                balance: b.map_or(0, |b| b.balance),
                reserved: b.map_or(0, |b| b.reserved),
                available: b.map_or(0, |b| b.available),
                reachable: p.reachable,
                error: p.error,
                mint: p.mint,
            }
        })
        .collect();
    warnings.extend(st.valve.tcx_warnings());
    let (policy, usage) = st.valve.occupancy();
    let sessions = st.app.chandler.clients()?;
    let active = sessions.iter().filter(|s| s.active).count() as u64;
    Ok(Json(StatusReport {
        version: env!("CARGO_PKG_VERSION").to_string(),
        gateway: st.gateway.clone(),
        dataplane: DataplaneInfo {
            iface: st.valve.iface().to_string(),
            mode: format!("{:?}", st.valve.mode()).to_lowercase(),
            pin_dir: st.valve.pin_dir().display().to_string(),
            attach_points: st.valve.attach_points(),
            policy_entries: policy,
            usage_entries: usage,
            capacity: st.valve.capacity(),
            evictions: st.valve.evictions(),
        },
        mints,
        clients: ClientCounts {
            active,
            closed: sessions.len() as u64 - active,
        },
        upstream,
        tasks,
        warnings,
        databases: database_sizes(&st.state_dir),
    }))
}

fn client_row(
    s: &SessionView,
    gate: Option<&GateState>,
    ip: Option<IpAddr>,
    now: Option<rates::CurrentRate>,
) -> ClientRow {
    let usage = gate.map(|g| g.usage).unwrap_or_default();
    ClientRow {
        mac: s.mac,
        ip,
        state: if s.active {
            "active".into()
        } else {
            s.close_reason
                .map_or_else(|| "closed".into(), |a| a.as_str().into())
        },
        metric: metric_name(s.metric),
        allotment: s.allotment,
        used: s.used,
        remaining: s.remaining,
        bytes_up: usage.bytes_up,
        bytes_down: usage.bytes_down,
        packets_up: usage.packets_up,
        packets_down: usage.packets_down,
        started_unix: s.start_unix,
        expires_unix_ms: s.end_unix_ms.filter(|_| s.metric == Metric::Milliseconds),
        down_kbit: gate.map_or(0, |g| g.rates.down_kbit),
        up_kbit: gate.map_or(0, |g| g.rates.up_kbit),
        tier: s
            .tier
            .clone()
            .unwrap_or_else(|| crate::tiers::DEFAULT_TIER.into()),
        now,
    }
}

fn arp(st: &OpsState) -> HashMap<MacAddr, IpAddr> {
    std::fs::read_to_string(&st.arp_path)
        .map(|t| neighbour::arp_table(&t))
        .unwrap_or_default()
}

fn gates_by_mac(st: &OpsState) -> Result<HashMap<MacAddr, GateState>, OpsError> {
    Ok(st.valve.gates()?.into_iter().map(|g| (g.mac, g)).collect())
}

async fn clients(State(st): State<OpsState>) -> Result<Json<Vec<ClientRow>>, OpsError> {
    let gates = gates_by_mac(&st)?;
    let arp = arp(&st);
    let mut rows: Vec<ClientRow> = st
        .app
        .chandler
        .clients()?
        .iter()
        .map(|s| {
            let now = st.rates.current(s.mac);
            client_row(s, gates.get(&s.mac), arp.get(&s.mac).copied(), now)
        })
        .collect();
    rows.sort_by_key(|r| r.mac);
    Ok(Json(rows))
}

async fn balance(State(st): State<OpsState>) -> Result<Json<Vec<BalanceRow>>, OpsError> {
    Ok(Json(
        st.wallet
            .balances()
            .await?
            .into_iter()
            .map(BalanceRow::from)
            .collect(),
    ))
}

async fn payouts(State(st): State<OpsState>) -> Result<Json<Vec<PayoutRow>>, OpsError> {
    Ok(Json(
        st.wallet
            .payouts()
            .await?
            .into_iter()
            .map(PayoutRow::from)
            .collect(),
    ))
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, OpsError> {
    serde_json::from_slice(body).map_err(|e| OpsError::BadRequest(format!("bad request body: {e}")))
}

async fn receive(
    State(st): State<OpsState>,
    body: axum::body::Bytes,
) -> Result<Json<ReceiveAnswer>, OpsError> {
    let req: ReceiveRequest = json_body(&body)?;
    let r = st.wallet.receive(req.token.trim()).await?;
    tracing::info!(mint = %r.mint, net = r.net, replayed = r.replayed, "operator funded the wallet");
    Ok(Json(ReceiveAnswer {
        mint: r.mint,
        unit: r.unit,
        gross: r.gross,
        net: r.net,
        replayed: r.replayed,
    }))
}

async fn send(
    State(st): State<OpsState>,
    body: axum::body::Bytes,
) -> Result<Json<SendAnswer>, OpsError> {
    let req: SendRequest = json_body(&body)?;
    if req.amount == 0 {
        return Err(OpsError::BadRequest("amount must be at least 1".into()));
    }
    let t = st
        .wallet
        .create_payment_token(&req.mint, req.amount, None)
        .await?;
    tracing::info!(mint = %t.mint, amount = t.amount, value = t.value, op_id = %t.op_id, "operator created a token");
    Ok(Json(SendAnswer {
        token: t.token,
        op_id: t.op_id,
        mint: t.mint,
        amount: t.amount,
        value: t.value,
        receiver_fee: t.receiver_fee,
    }))
}

async fn rebalance(
    State(st): State<OpsState>,
    body: axum::body::Bytes,
) -> Result<Json<RebalanceAnswer>, OpsError> {
    let req: RebalanceRequest = json_body(&body)?;
    let r = st
        .wallet
        .rebalance(&req.to, req.amount, req.from.as_deref())
        .await?;
    tracing::info!(source = %r.source, target = %r.target, amount = r.amount, fee = r.fee,
        state = %r.state, id = %r.id, "operator rebalanced");
    Ok(Json(r.into()))
}

/// The amount in the session's metric units for an admin request.
pub fn admin_amount(metric: Metric, req: GateRequest) -> Result<u64, OpsError> {
    match (metric, req.bytes, req.seconds) {
        (_, Some(_), Some(_)) => Err(OpsError::BadRequest(
            "give --bytes or --seconds, not both".into(),
        )),
        (Metric::Bytes, Some(b), None) if b > 0 => Ok(b),
        (Metric::Milliseconds, None, Some(s)) if s > 0 => s
            .checked_mul(1000)
            .ok_or_else(|| OpsError::BadRequest(format!("{s} seconds is too long"))),
        (_, Some(0), _) | (_, _, Some(0)) => {
            Err(OpsError::BadRequest("the amount must be at least 1".into()))
        }
        (Metric::Bytes, _, _) => Err(OpsError::BadRequest(
            "this gateway sells bytes: give --bytes N".into(),
        )),
        (Metric::Milliseconds, _, _) => Err(OpsError::BadRequest(
            "this gateway sells time: give --seconds N".into(),
        )),
    }
}

async fn gate(
    State(st): State<OpsState>,
    Path((mac, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Response, OpsError> {
    let mac: MacAddr = mac
        .parse()
        .map_err(|e: crate::valve::ParseMacError| OpsError::BadRequest(e.to_string()))?;
    let chandler = &st.app.chandler;
    let active = chandler.usage(mac)?.is_some_and(|s| s.active);
    let req: GateRequest = if body.is_empty() {
        GateRequest::default()
    } else {
        json_body(&body)?
    };
    match action.as_str() {
        "open" | "extend" => {
            if action == "open" && active {
                return Err(OpsError::Conflict(format!(
                    "{mac} already has an active session: use `gate extend`"
                )));
            }
            if action == "extend" && !active {
                return Err(OpsError::NotFound(format!(
                    "no active session for {mac}: use `gate open`"
                )));
            }
            let amount = admin_amount(chandler.metric(), req)?;
            for r in [req.down_kbit, req.up_kbit].into_iter().flatten() {
                if r > crate::valve::Rates::MAX_KBIT {
                    return Err(OpsError::BadRequest(format!(
                        "{r} kbit/s is above the largest rate ({})",
                        crate::valve::Rates::MAX_KBIT
                    )));
                }
            }
            // The rates go through the chandler with the grant: the session row stores them,
            // so a restart or reboot reopens the gate at these rates.
            let rates = crate::chandler::RateRequest {
                down_kbit: req.down_kbit,
                up_kbit: req.up_kbit,
            };
            let s = chandler.admin_add_with_rates(mac, amount, rates)?;
            tracing::info!(%mac, action = %action, amount, "administrative grant");
            let gates = gates_by_mac(&st)?;
            let ip = arp(&st).get(&mac).copied();
            Ok(Json(client_row(&s, gates.get(&mac), ip, st.rates.current(mac))).into_response())
        }
        "close" => {
            if !active {
                return Err(OpsError::NotFound(format!("no active session for {mac}")));
            }
            chandler.close(mac, crate::store::Action::AdminClose)?;
            let s = chandler
                .usage(mac)?
                .ok_or(ChandlerError::NoSession { mac })?;
            let gates = gates_by_mac(&st)?;
            let ip = arp(&st).get(&mac).copied();
            Ok(Json(client_row(&s, gates.get(&mac), ip, st.rates.current(mac))).into_response())
        }
        other => Err(OpsError::NotFound(format!(
            "unknown gate action {other:?} (open, extend, close)"
        ))),
    }
}

async fn metrics_page(State(st): State<OpsState>) -> Result<Response, OpsError> {
    let snap = metrics::collect(&st).await?;
    Ok((
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(&snap),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_amounts_follow_the_metric() {
        let r = |b: Option<u64>, s: Option<u64>| GateRequest {
            bytes: b,
            seconds: s,
            ..Default::default()
        };
        assert_eq!(admin_amount(Metric::Bytes, r(Some(5), None)).unwrap(), 5);
        assert_eq!(
            admin_amount(Metric::Milliseconds, r(None, Some(60))).unwrap(),
            60_000
        );
        for (m, req) in [
            (Metric::Bytes, r(None, Some(5))),
            (Metric::Bytes, r(None, None)),
            (Metric::Bytes, r(Some(0), None)),
            (Metric::Bytes, r(Some(1), Some(1))),
            (Metric::Milliseconds, r(Some(5), None)),
            (Metric::Milliseconds, r(None, Some(u64::MAX))),
        ] {
            let e = admin_amount(m, req).expect_err("refused");
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{e}");
        }
    }
}
