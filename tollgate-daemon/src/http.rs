//! The customer-facing HTTP API on port 2121 (LAN side only) and the local admin API.
//!
//! ```text
//! GET  /         signed kind 10021 advertisement
//! POST /         token | kind-21000 event (text/*, json, form, none; ≤ 1 MiB)
//!                  peer IP ─> neighbour table ─> MAC ─> merchant.purchase ─> 200 kind 1022
//!                  any failure ─> ApiError ─> kind 21023 notice (400 / 429 / 500 / 503)
//!                  success carries `Server-Timing: redeem;dur=<ms>, total;dur=<ms>`
//! GET  /whoami   text/plain  mac=aa:bb:…           GET /usage   used/allotment | -1/-1
//! GET  /balance  JSON session summary             GET /captive RFC 8908 captive API
//! POST /ln-invoice {"amount","mint_url"}  GET /ln-invoice?quote=  (lightning.rs; reference
//!                shape: {"status":1,…} | {"status":0,"error"})   GET /ln-invoice/qr.svg?quote=
//! GET  /portal   the portal page (+ /portal/app.js, /portal/style.css; strict CSP)
//!
//! any request on a connection that came through the captive-portal redirect (its socket
//! carries `portal_mark`) ─> portal::answer: 302/303 to /portal, never the routes above
//! ```
//! The MAC always comes from the source address (X-Forwarded-For only from loopback), never
//! from the body. CORS answers only local origins (no wildcard). [`router`] takes the state so
//! tests drive it with `oneshot` and `MockConnectInfo`; [`bind_lan`] keeps it off the WAN.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::{
        rejection::BytesRejection, ConnectInfo, DefaultBodyLimit, Path, Query, RawQuery, State,
    },
    http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use nostr::Keys;
use serde::Deserialize;

use crate::{
    chandler::{Chandler, SessionView},
    config::HttpConfig,
    merchant::{Merchant, MerchantError, RedeemError},
    neighbour::{client_ip, Neighbours},
    portal::{self, Answer},
    protocol::{self, Metric, Notice, NoticeCode, ProtocolError},
    valve::MacAddr,
};

/// Everything the handlers need (cheap to clone: Arcs).
#[derive(Clone)]
pub struct AppState {
    pub merchant: Merchant,
    pub chandler: Arc<Chandler>,
    pub neighbours: Arc<dyn Neighbours>,
    pub limiter: Arc<RateLimiter>,
    pub portal_port: u16,
    /// The upstream buyer, in reseller mode (`GET /upstream` on the admin API).
    pub upstream: Option<Arc<crate::upstream::Upstream>>,
    /// Connections accepted with this mark came through the portal redirect.
    pub portal_mark: Option<u32>,
    /// The Lightning checkout (`/ln-invoice`), when the daemon runs with a wallet.
    pub lightning: Option<Arc<crate::lightning::Checkout>>,
    /// False while no accepted mint answers (the daemon probes them): `GET /` then answers the
    /// reference's kind-21023 `no-reachable-mints` warning instead of selling what we cannot
    /// redeem.
    pub mints_reachable: Arc<std::sync::atomic::AtomicBool>,
}

impl AppState {
    pub fn new(
        cfg: &HttpConfig,
        merchant: Merchant,
        chandler: Arc<Chandler>,
        neighbours: Arc<dyn Neighbours>,
    ) -> Self {
        AppState {
            merchant,
            chandler,
            neighbours,
            limiter: Arc::new(RateLimiter::new(cfg.post_rate_per_minute)),
            portal_port: cfg.portal_port,
            upstream: None,
            portal_mark: cfg.portal_mark,
            lightning: None,
            mints_reachable: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }

    /// Adds the Lightning checkout (`/ln-invoice`).
    pub fn with_lightning(mut self, checkout: Arc<crate::lightning::Checkout>) -> Self {
        self.lightning = Some(checkout);
        self
    }

    /// Adds the upstream buyer (reseller mode).
    pub fn with_upstream(mut self, upstream: Arc<crate::upstream::Upstream>) -> Self {
        self.upstream = Some(upstream);
        self
    }

    fn err(&self, status: StatusCode, code: NoticeCode, message: impl Into<String>) -> ApiError {
        ApiError(Box::new(ApiErrorBody {
            status,
            notice: Notice::error(code, message),
            retry_after: None,
            prebuilt: None,
            keys: self.merchant.keys().clone(),
        }))
    }
}

/// The one error type of the API: renders a signed kind-21023 notice. (Boxed: it is returned
/// on every path and is large.)
#[derive(Debug)]
pub struct ApiError(Box<ApiErrorBody>);

impl std::ops::Deref for ApiError {
    type Target = ApiErrorBody;
    fn deref(&self) -> &ApiErrorBody {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut ApiErrorBody {
        &mut self.0
    }
}

#[derive(Debug)]
pub struct ApiErrorBody {
    pub status: StatusCode,
    pub notice: Notice,
    pub retry_after: Option<u64>,
    /// An already signed notice to return verbatim (the stored answer of a rejected grant).
    pub prebuilt: Option<String>,
    keys: Keys,
}

impl ApiError {
    fn with_customer(mut self, customer: Option<nostr::PublicKey>) -> Self {
        self.notice.customer = customer;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let this = *self.0;
        let body = match this.prebuilt {
            Some(b) if !b.is_empty() => b,
            _ => match this
                .notice
                .to_event(&this.keys, crate::sys::clock::unix_secs())
            {
                Ok(ev) => nostr::JsonUtil::as_json(&ev),
                Err(e) => {
                    tracing::error!(error = %e, "signing notice");
                    return (StatusCode::INTERNAL_SERVER_ERROR, "internal-error").into_response();
                }
            },
        };
        let mut resp = (
            this.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Some(s) = this.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s.max(1)));
        }
        resp
    }
}

/// HTTP status for a notice code.
pub fn status_for(code: NoticeCode) -> StatusCode {
    match code {
        NoticeCode::MintRateLimited => StatusCode::TOO_MANY_REQUESTS,
        NoticeCode::InternalError | NoticeCode::ProcessingFailed => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        NoticeCode::ServiceUnavailable
        | NoticeCode::NoReachableMints
        | NoticeCode::ProcessingTimeout
        | NoticeCode::UpstreamNotConnected => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn merchant_error(st: &AppState, e: MerchantError) -> ApiError {
    let code = e.code();
    if matches!(code, NoticeCode::InternalError) {
        tracing::error!(error = %e, "payment failed on our side");
    } else {
        tracing::info!(error = %e, code = %code, "payment refused");
    }
    let mut api = st.err(status_for(code), code, e.to_string());
    match e {
        MerchantError::BelowMinimum { notice_json, .. } => api.prebuilt = Some(notice_json),
        MerchantError::Redeem {
            source: RedeemError::RateLimited { retry_after_secs },
        } => api.retry_after = Some(retry_after_secs),
        MerchantError::Timeout { .. } => api.retry_after = Some(2),
        // Not our fault and not final: the mint is settling another spend of these proofs.
        MerchantError::Redeem {
            source: RedeemError::TokenPending,
        } => {
            api.status = StatusCode::SERVICE_UNAVAILABLE;
            api.retry_after = Some(5);
        }
        _ => {}
    }
    api
}

fn protocol_error(st: &AppState, e: ProtocolError) -> ApiError {
    let (status, code) = match &e {
        ProtocolError::TooLarge { .. } => {
            (StatusCode::PAYLOAD_TOO_LARGE, NoticeCode::InvalidRequest)
        }
        ProtocolError::Empty | ProtocolError::NotUtf8 => {
            (StatusCode::BAD_REQUEST, NoticeCode::InvalidRequest)
        }
        ProtocolError::InvalidToken { .. } => (StatusCode::BAD_REQUEST, NoticeCode::InvalidToken),
        ProtocolError::Sign { .. } => {
            (StatusCode::INTERNAL_SERVER_ERROR, NoticeCode::InternalError)
        }
        _ => (StatusCode::BAD_REQUEST, NoticeCode::InvalidEvent),
    };
    st.err(status, code, e.to_string())
}

/// Per-IP token bucket for `POST /`: a burst of half a minute's budget (at least 10), then
/// `per_minute`.
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        RateLimiter {
            per_sec: f64::from(per_minute.max(1)) / 60.0,
            burst: f64::from((per_minute / 2).max(10)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(seconds to wait)` when `ip` is over its budget.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 10_000 {
            // Full buckets carry no state worth keeping.
            let (rate, burst) = (self.per_sec, self.burst);
            map.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = map.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_sec).ceil() as u64)
        }
    }
}

/// The customer API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(advertisement).post(pay))
        .route("/whoami", get(whoami))
        .route("/usage", get(usage))
        .route("/balance", get(balance))
        .route("/captive", get(captive))
        .route(
            "/ln-invoice",
            get(ln_invoice_status).post(ln_invoice_create),
        )
        .route("/ln-invoice/qr.svg", get(ln_invoice_qr))
        .route("/portal", get(portal_page))
        .route("/portal/app.js", get(portal_js))
        .route("/portal/style.css", get(portal_css))
        // Layers wrap only routes: an explicit fallback lets the portal gate see every path.
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(DefaultBodyLimit::max(protocol::MAX_BODY_BYTES))
        .layer(middleware::from_fn(cors))
        .layer(middleware::from_fn_with_state(state.clone(), portal_gate))
        .with_state(state)
}

/// The read-only admin API (served on `admin_listen` and on the control socket).
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/clients", get(admin_clients))
        .route("/clients/{mac}", get(admin_client))
        .route("/upstream", get(admin_upstream))
        .with_state(state)
}

/// The admin verbs that give or take access: served only on the control socket (mode 0600),
/// never on TCP, where any local user or a forwarded port could reach them.
pub fn admin_verbs_router(state: AppState) -> Router {
    Router::new()
        .route("/clients/{mac}/grant", post(admin_grant))
        .route("/clients/{mac}/close", post(admin_close))
        .with_state(state)
}

/// The upstream buyer's status; `{"reseller_mode":false}` when it is not running.
async fn admin_upstream(State(st): State<AppState>) -> Response {
    match &st.upstream {
        Some(u) => axum::Json(serde_json::json!({"reseller_mode": true, "status": u.status()}))
            .into_response(),
        None => axum::Json(serde_json::json!({"reseller_mode": false})).into_response(),
    }
}

async fn advertisement(State(st): State<AppState>) -> Result<Response, ApiError> {
    if !st
        .mints_reachable
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        let mut e = st.err(
            status_for(NoticeCode::NoReachableMints),
            NoticeCode::NoReachableMints,
            "none of the accepted mints can be reached right now; try again shortly",
        );
        e.notice.level = protocol::Level::Warning;
        e.retry_after = Some(30);
        return Err(e);
    }
    let json = st
        .merchant
        .advertisement()
        .map_err(|e| merchant_error(&st, e))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}

/// The client address a reverse proxy on loopback names: `X-Real-IP` first, then the first
/// `X-Forwarded-For` entry (the reference's order). `client_ip` trusts it only from loopback.
fn forwarded(headers: &HeaderMap) -> Option<&str> {
    ["x-real-ip", "x-forwarded-for"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
}

async fn mac_of(st: &AppState, peer: SocketAddr, headers: &HeaderMap) -> Result<MacAddr, ApiError> {
    let ip = client_ip(peer, forwarded(headers));
    let n = st.neighbours.clone();
    // The kernel lookup may spawn `ip` (IPv6): keep it off the async workers.
    let r = tokio::task::spawn_blocking(move || n.mac_of(ip))
        .await
        .map_err(|e| {
            st.err(
                StatusCode::INTERNAL_SERVER_ERROR,
                NoticeCode::InternalError,
                e.to_string(),
            )
        })?;
    r.map_err(|e| {
        st.err(
            StatusCode::BAD_REQUEST,
            NoticeCode::MacLookupFailed,
            e.to_string(),
        )
    })
}

fn acceptable_content_type(ct: Option<&str>) -> bool {
    let Some(ct) = ct else { return true };
    let ct = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    ct.is_empty()
        || ct.starts_with("text/")
        || ct == "application/json"
        || ct == "application/x-www-form-urlencoded"
        || ct == "application/nostr+json"
}

async fn pay(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let ip = client_ip(peer, forwarded(&headers));
    if let Err(wait) = st.limiter.check(ip) {
        let mut e = st.err(
            StatusCode::TOO_MANY_REQUESTS,
            NoticeCode::ServiceUnavailable,
            format!("too many payment attempts from {ip}; retry in {wait}s"),
        );
        e.retry_after = Some(wait);
        return Err(e);
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if !acceptable_content_type(ct) {
        return Err(st.err(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            NoticeCode::InvalidRequest,
            format!(
                "unsupported content type {:?}: send the token as text/plain",
                ct.unwrap_or_default()
            ),
        ));
    }
    let body = body.map_err(|r| {
        let status = r.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("body larger than {} bytes", protocol::MAX_BODY_BYTES)
        } else {
            r.body_text()
        };
        st.err(status, NoticeCode::InvalidRequest, msg)
    })?;
    let mac = mac_of(&st, peer, &headers).await?;
    let mut payment = protocol::parse_payment(ct, &body, Some(&st.merchant.keys().public_key()))
        .map_err(|e| protocol_error(&st, e))?;
    // Our tier extension: `POST /?tier=fast` (a raw token has nowhere else to say it); a
    // 21000 event may carry `["tier", name]` instead. Checked before anything is redeemed.
    let tier_err = |e: crate::tiers::TierError| {
        st.err(
            StatusCode::BAD_REQUEST,
            NoticeCode::InvalidRequest,
            format!("{e}; the token was not redeemed and is still yours"),
        )
        .with_customer(payment.customer)
    };
    match (
        payment.tier.as_deref(),
        crate::tiers::choice_from_query(query.as_deref()).map_err(tier_err)?,
    ) {
        (Some(a), Some(b)) if a != b => return Err(tier_err(crate::tiers::TierError::Repeated)),
        (None, Some(b)) => payment.tier = Some(b),
        _ => {}
    }
    let customer = payment.customer;
    match st.merchant.purchase(mac, payment).await {
        Ok(p) => {
            // Bind the gate to where the money came from, and to the device's other
            // addresses the neighbour tables show (a MAC clone elsewhere gets nothing). The
            // lookup may spawn `ip` and the binding is a database write: off the workers.
            if !p.replayed {
                let (n, chandler) = (st.neighbours.clone(), st.chandler.clone());
                let bound = tokio::task::spawn_blocking(move || {
                    let mut addrs = vec![ip];
                    addrs.extend(n.addresses_of(mac));
                    chandler.bind(mac, &addrs)
                })
                .await;
                match bound {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(%mac, %ip, error = %e, "binding the gate to the payer's addresses")
                    }
                    Err(e) => tracing::warn!(%mac, error = %e, "binding task failed"),
                }
            }
            let timing = server_timing(p.redeem, started.elapsed());
            let mut resp =
                ([(header::CONTENT_TYPE, "application/json")], p.session_json).into_response();
            if let Ok(v) = HeaderValue::from_str(&timing) {
                resp.headers_mut()
                    .insert(header::HeaderName::from_static("server-timing"), v);
            }
            Ok(resp)
        }
        Err(e) => Err(merchant_error(&st, e).with_customer(customer)),
    }
}

/// A `Server-Timing` value (W3C): `redeem` is the wallet's swap at the mint (absent on a
/// replay), `total` the whole handler. Their difference is the gateway's own cost of a
/// payment, which `cargo xtask bench api` reports; milliseconds with microsecond precision.
pub fn server_timing(redeem: Option<Duration>, total: Duration) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    match redeem {
        Some(r) => format!("redeem;dur={:.3}, total;dur={:.3}", ms(r), ms(total)),
        None => format!("total;dur={:.3}", ms(total)),
    }
}

async fn whoami(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // HTTP-02/03 clients poll these and give up on an error status: an unknown device is
    // answered 200 with "no session" (the lookup failure is logged, not a client error).
    let text = match mac_of(&st, peer, &headers).await {
        Ok(mac) => format!("mac={mac}"),
        Err(e) => {
            tracing::debug!(%peer, error = %e.notice.message, "whoami without a MAC");
            "mac=unknown".to_string()
        }
    };
    Ok(([(header::CONTENT_TYPE, "text/plain")], text).into_response())
}

/// The device's active session. SQLite runs on the blocking pool: the store's mutex may be
/// held across a full fsync, which must not stall an async worker serving other clients.
async fn session_of(st: &AppState, mac: MacAddr) -> Result<Option<SessionView>, ApiError> {
    let chandler = st.chandler.clone();
    let internal = |e: String| {
        st.err(
            StatusCode::INTERNAL_SERVER_ERROR,
            NoticeCode::InternalError,
            e,
        )
    };
    tokio::task::spawn_blocking(move || chandler.usage(mac))
        .await
        .map_err(|e| internal(e.to_string()))?
        .map(|s| s.filter(|s| s.active))
        .map_err(|e| internal(e.to_string()))
}

async fn usage(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Ok(mac) = mac_of(&st, peer, &headers).await else {
        return Ok(([(header::CONTENT_TYPE, "text/plain")], "-1/-1").into_response());
    };
    let text = match session_of(&st, mac).await? {
        Some(s) => format!("{}/{}", s.used, s.allotment),
        None => "-1/-1".to_string(),
    };
    Ok(([(header::CONTENT_TYPE, "text/plain")], text).into_response())
}

async fn balance(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let metric = st.chandler.metric();
    let mac = match mac_of(&st, peer, &headers).await {
        Ok(mac) => mac,
        Err(e) => {
            tracing::debug!(%peer, error = %e.notice.message, "balance without a MAC");
            return Ok(Json(serde_json::json!({
                "status": 1,
                "session_active": false,
                "metric": metric.as_str(),
                "usage": 0,
                "allotment": 0,
                "remaining": 0,
            }))
            .into_response());
        }
    };
    let s = session_of(&st, mac).await?;
    let v = serde_json::json!({
        // The reference's field: 1 = this answer is valid (0 only with `error`, never here).
        "status": 1,
        "session_active": s.is_some(),
        "metric": metric.as_str(),
        "usage": s.as_ref().map_or(0, |s| s.used),
        "allotment": s.as_ref().map_or(0, |s| s.allotment),
        "remaining": s.as_ref().map_or(0, |s| s.remaining),
        "start_time": s.as_ref().map_or(0, |s| s.start_unix),
    });
    Ok(Json(v).into_response())
}

async fn captive(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    // Without a MAC we still answer (captive: true): this API must never fail for a client.
    let s = match mac_of(&st, peer, &headers).await {
        Ok(mac) => session_of(&st, mac).await.ok().flatten(),
        Err(_) => None,
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| portal::sane_host(h))
        .map(|h| {
            h.rsplit_once(':')
                .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(']'))
                .map_or(h, |(n, _)| n)
                .to_string()
        })
        .unwrap_or_else(|| "192.168.1.1".into());
    let portal = format!("http://{host}:{}/portal", st.portal_port);
    let mut v = serde_json::json!({
        "captive": s.is_none(),
        "user-portal-url": portal,
        "venue-info-url": portal,
        "can-extend-session": true,
    });
    if let Some(s) = &s {
        match s.metric {
            Metric::Milliseconds => v["seconds-remaining"] = (s.remaining / 1000).into(),
            Metric::Bytes => v["bytes-remaining"] = s.remaining.into(),
        }
    }
    (
        [
            (header::CONTENT_TYPE, "application/captive+json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        v.to_string(),
    )
        .into_response()
}

// ------------------------------------------------------------------ Lightning checkout

/// The reference's `/ln-invoice` body: `{"amount": N, "mint_url": "…"}` (`mint` also read).
#[derive(Deserialize)]
struct LnInvoiceRequest {
    amount: u64,
    #[serde(default)]
    mint_url: Option<String>,
    #[serde(default)]
    mint: Option<String>,
}

#[derive(Deserialize)]
struct LnQuoteQuery {
    #[serde(default)]
    quote: Option<String>,
}

/// The reference's failure shape: `{"status":0,"error":"…"}` (the portal shows `error`).
fn ln_error(status: u16, error: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let v = serde_json::json!({"status": 0, "error": error.into()});
    (status, Json(v)).into_response()
}

fn ln_view(v: &crate::lightning::QuoteView, with_invoice: bool) -> Response {
    let mut j = serde_json::json!({
        "status": 1,
        "quote": v.quote,
        "mint_url": v.mint_url,
        "amount": v.amount,
        "state": v.state,
        "access_granted": v.access_granted,
        "metric": v.metric.as_str(),
    });
    if with_invoice {
        j["invoice"] = v.invoice.clone().into();
        j["expiry"] = v.expiry.into();
    }
    if v.access_granted {
        j["allotment"] = v.allotment.into();
    }
    ([(header::CACHE_CONTROL, "no-store")], Json(j)).into_response()
}

async fn ln_invoice_create(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(ln) = st.lightning.clone() else {
        return ln_error(404, "lightning checkout is not enabled on this gateway");
    };
    let ip = client_ip(peer, forwarded(&headers));
    if let Err(wait) = st.limiter.check(ip) {
        let mut r = ln_error(429, format!("too many requests; retry in {wait}s"));
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait.max(1)));
        return r;
    }
    let Ok(body) = body else {
        return ln_error(400, "invalid request body");
    };
    let Ok(req) = serde_json::from_slice::<LnInvoiceRequest>(&body) else {
        return ln_error(
            400,
            "invalid request body: expected {\"amount\",\"mint_url\"}",
        );
    };
    let mint = req
        .mint_url
        .or(req.mint)
        .map(|m| m.trim().to_string())
        .unwrap_or_default();
    if req.amount == 0 || mint.is_empty() {
        return ln_error(400, "amount and mint_url are required");
    }
    let mac = match mac_of(&st, peer, &headers).await {
        Ok(m) => m,
        Err(_) => return ln_error(400, "failed to resolve device MAC address"),
    };
    match ln.create(mac, &mint, req.amount).await {
        Ok(v) => ln_view(&v, true),
        Err(e) => {
            tracing::info!(%mac, error = %e, "lightning invoice refused");
            ln_error(e.status(), e.to_string())
        }
    }
}

async fn ln_invoice_status(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<LnQuoteQuery>,
) -> Response {
    let Some(ln) = st.lightning.clone() else {
        return ln_error(404, "lightning checkout is not enabled on this gateway");
    };
    let quote = q.quote.unwrap_or_default();
    let quote = quote.trim();
    if quote.is_empty() || quote.len() > 256 {
        return ln_error(400, "quote is required");
    }
    let mac = match mac_of(&st, peer, &headers).await {
        Ok(m) => m,
        Err(_) => return ln_error(400, "failed to resolve device MAC address"),
    };
    match ln.status(mac, quote).await {
        Ok(v) => ln_view(&v, false),
        Err(e) => {
            tracing::debug!(%mac, error = %e, "lightning status");
            ln_error(e.status(), e.to_string())
        }
    }
}

/// The QR code of the device's own invoice, as SVG (the portal's `<img>`).
async fn ln_invoice_qr(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<LnQuoteQuery>,
) -> Response {
    let Some(ln) = st.lightning.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Ok(mac) = mac_of(&st, peer, &headers).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let quote = q.quote.unwrap_or_default();
    match ln
        .invoice_of(mac, quote.trim())
        .and_then(|i| crate::lightning::invoice_qr_svg(&i))
    {
        Ok(svg) => (
            [
                (header::CONTENT_TYPE, "image/svg+xml"),
                (header::CACHE_CONTROL, "no-store"),
                (header::CONTENT_SECURITY_POLICY, portal::CSP),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            svg,
        )
            .into_response(),
        Err(e) => StatusCode::from_u16(e.status())
            .unwrap_or(StatusCode::NOT_FOUND)
            .into_response(),
    }
}

// ------------------------------------------------------------------ captive portal

/// The connection a request arrived on: what `ConnectInfo<SocketAddr>` is for the handlers,
/// plus the address it reached and its skb mark (the portal redirect's sign).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// `SO_MARK` of the accepted socket: with `tcp_fwmark_accept` the mark of its SYN.
    pub mark: u32,
}

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for Peer
{
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Peer::of(s.io(), *s.remote_addr())
    }
}

impl Peer {
    /// The peer of an accepted connection from `remote`.
    pub fn of(s: &tokio::net::TcpStream, remote: SocketAddr) -> Peer {
        Peer {
            remote,
            local: s.local_addr().unwrap_or(remote),
            mark: crate::sys::socket_mark(s).unwrap_or(0),
        }
    }
}

/// Outermost layer: gives handlers `ConnectInfo<SocketAddr>` and answers every request on a
/// redirected connection itself (the routes are for clients that talk to us on purpose).
async fn portal_gate(
    State(st): State<AppState>,
    mut req: Request<axum::body::Body>,
    next: Next,
) -> Response {
    let ext = req.extensions();
    let peer = ext.get::<ConnectInfo<Peer>>().map(|c| c.0).or_else(|| {
        ext.get::<axum::extract::connect_info::MockConnectInfo<Peer>>()
            .map(|m| m.0)
    });
    let Some(peer) = peer else {
        return next.run(req).await;
    };
    req.extensions_mut().insert(ConnectInfo(peer.remote));
    let redirected = st.portal_mark.is_some_and(|m| m == peer.mark);
    if !redirected {
        return next.run(req).await;
    }
    // Unpaid is the rule here (the kernel marks only unpaid clients); a client that paid
    // since this keep-alive connection was redirected is sent back to the real server.
    let paid = match mac_of(&st, peer.remote, &HeaderMap::new()).await {
        Ok(mac) => session_of(&st, mac).await.ok().flatten().is_some(),
        Err(_) => false,
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let answer = portal::answer(req.method().as_str(), host, target, paid);
    tracing::debug!(peer = %peer.remote, %target, paid, ?answer, "redirected request");
    portal_response(answer, &portal::portal_url(peer.local))
}

fn portal_response(answer: Answer, portal_url: &str) -> Response {
    let no_store = (header::CACHE_CONTROL, "no-store");
    match answer {
        Answer::Portal { status } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FOUND);
            // The URL is an IP literal and a port: nothing to escape.
            let body = format!(
                "<!doctype html><title>Sign in</title><a href=\"{portal_url}\">Sign in to the network</a>\n"
            );
            (
                status,
                [
                    (header::LOCATION, portal_url),
                    (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                    no_store,
                ],
                body,
            )
                .into_response()
        }
        Answer::ProbeSuccess(p) => {
            let (status, ct, body) = p.success().unwrap_or((204, "text/plain", ""));
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::NO_CONTENT);
            (status, [(header::CONTENT_TYPE, ct), no_store], body).into_response()
        }
        Answer::Retry { location } => (
            StatusCode::TEMPORARY_REDIRECT,
            [
                (header::LOCATION, location.as_str()),
                (header::CONNECTION, "close"),
                no_store,
            ],
        )
            .into_response(),
    }
}

fn portal_asset(ct: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, ct),
            (header::CONTENT_SECURITY_POLICY, portal::CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn portal_page() -> Response {
    portal_asset("text/html; charset=utf-8", portal::PAGE_HTML)
}

async fn portal_js() -> Response {
    portal_asset("text/javascript; charset=utf-8", portal::PAGE_JS)
}

async fn portal_css() -> Response {
    portal_asset("text/css; charset=utf-8", portal::PAGE_CSS)
}

/// Is this `Origin` a page served from the local network (the gateway's own portal)?
pub fn is_local_origin(origin: &str) -> bool {
    let Ok(url) = url::Url::parse(origin) else {
        return false;
    };
    if url.scheme() != "http" && url.scheme() != "https" {
        return false;
    }
    match url.host() {
        Some(url::Host::Ipv4(ip)) => {
            ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || (ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64)
        }
        Some(url::Host::Ipv6(ip)) => {
            ip.is_loopback()
                || (ip.segments()[0] & 0xfe00) == 0xfc00
                || (ip.segments()[0] & 0xffc0) == 0xfe80
        }
        Some(url::Host::Domain(d)) => {
            let d = d.to_ascii_lowercase();
            d == "localhost"
                || !d.contains('.')
                || [".lan", ".local", ".home.arpa", ".internal"]
                    .iter()
                    .any(|s| d.ends_with(s))
        }
        None => false,
    }
}

/// Is `origin` a page from the host this request is addressed to (another port of the same
/// router, e.g. the shipped portal on :80 calling :2121)? The browser sets `Origin` and the
/// request reached us under `host`, so the page's server is us or our own host name.
pub fn same_host(origin: &str, host: Option<&str>) -> bool {
    let (Ok(o), Some(h)) = (url::Url::parse(origin), host) else {
        return false;
    };
    let Ok(h) = url::Url::parse(&format!("http://{h}")) else {
        return false;
    };
    matches!(o.scheme(), "http" | "https")
        && o.host_str().is_some()
        && o.host_str().map(str::to_ascii_lowercase) == h.host_str().map(str::to_ascii_lowercase)
}

/// CORS for local origins only; a foreign origin's preflight or POST is refused.
async fn cors(req: Request<axum::body::Body>, next: Next) -> Response {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Some(origin) = origin else {
        return next.run(req).await;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    let local = is_local_origin(&origin) || same_host(&origin, host);
    if !local && (req.method() == Method::OPTIONS || req.method() == Method::POST) {
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let mut resp = if req.method() == Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    if local {
        if let Ok(v) = HeaderValue::from_str(&origin) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("content-type"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
    }
    resp
}

// ------------------------------------------------------------------ admin

fn parse_mac_param(st: &AppState, mac: &str) -> Result<MacAddr, ApiError> {
    mac.parse().map_err(|e: crate::valve::ParseMacError| {
        st.err(
            StatusCode::BAD_REQUEST,
            NoticeCode::InvalidRequest,
            e.to_string(),
        )
    })
}

fn chandler_err(st: &AppState, e: crate::chandler::ChandlerError) -> ApiError {
    st.err(
        StatusCode::INTERNAL_SERVER_ERROR,
        NoticeCode::InternalError,
        e.to_string(),
    )
}

async fn admin_clients(State(st): State<AppState>) -> Result<Response, ApiError> {
    let c = st.chandler.clients().map_err(|e| chandler_err(&st, e))?;
    Ok(Json(c).into_response())
}

async fn admin_client(
    State(st): State<AppState>,
    Path(mac): Path<String>,
) -> Result<Response, ApiError> {
    let mac = parse_mac_param(&st, &mac)?;
    let s = st.chandler.usage(mac).map_err(|e| chandler_err(&st, e))?;
    Ok(Json(s).into_response())
}

#[derive(Deserialize)]
struct GrantQuery {
    amount: u64,
}

async fn admin_grant(
    State(st): State<AppState>,
    Path(mac): Path<String>,
    Query(q): Query<GrantQuery>,
) -> Result<Response, ApiError> {
    let mac = parse_mac_param(&st, &mac)?;
    let s = st
        .chandler
        .admin_add(mac, q.amount)
        .map_err(|e| chandler_err(&st, e))?;
    Ok(Json(s).into_response())
}

async fn admin_close(
    State(st): State<AppState>,
    Path(mac): Path<String>,
) -> Result<Response, ApiError> {
    let mac = parse_mac_param(&st, &mac)?;
    st.chandler
        .close(mac, crate::store::Action::AdminClose)
        .map_err(|e| chandler_err(&st, e))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ------------------------------------------------------------------ serving

/// Binds `addr` and, when `iface` is given, pins the socket to that interface
/// (`SO_BINDTODEVICE`), so the API is unreachable from the WAN side even on 0.0.0.0.
pub fn bind_lan(addr: SocketAddr, iface: Option<&str>) -> std::io::Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    if let Some(iface) = iface {
        crate::sys::bind_to_device(&l, iface)?;
    }
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

pub use listener::{serve, Caps};

mod listener;
#[cfg(test)]
mod tests;
