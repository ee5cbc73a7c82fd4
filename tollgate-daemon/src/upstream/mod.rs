//! The chandler as a customer: in reseller mode our own internet connection is a paid
//! TollGate, and this component buys (and renews) access upstream with the merchant's wallet.
//!
//! ```text
//!  netlink (link/addr/route) ─┐
//!  periodic re-check ─────────┴─> default gateway on WAN ─GET :2121/─> kind 10021 (verified)
//!      ─> policy: trust list, price budget, cheapest option at a mint we hold funds in
//!      ─> GET /usage: a session with remaining > offset? ── yes ─> wait (resume, no payment)
//!                                                       └─ no ──> purchase
//!  purchase: reserve ─> create_payment_token ─> row 'pending' ─POST /─> kind 1022 signed by
//!            the advertised key? ── yes ─> 'accepted', hold a reservation for the renewal
//!                                └─ no ──> reclaim ─> 'reclaimed' (or 'taken'), back off
//! ```
//! Every purchase goes through a wallet reservation and, between purchases, a standing
//! reservation holds the next renewal's amount, so a payout tick can never spend it. The hold
//! is extended on every loop turn, also while the upstream does not answer; it is released
//! when we give the upstream up (no default gateway, or a gateway with another key).
//!
//! Spending limits bound what a hostile upstream (anything answering as the WAN default
//! gateway under `trust_all`) can take: no purchase above `max_sat_per_purchase`, no more than
//! `max_sat_per_hour` in any hour (counted from `upstream.sqlite`, so a restart does not reset
//! it), and after a purchase the upstream kept without a session showing (`-1/-1` before any
//! live session, or the token swapped without a valid answer) we do not pay that gateway
//! again for `no_session_backoff`: an alert in the log and in `warnings` instead.
//! Refusals (untrusted, over budget, funds low, bad advertisement) are logged with the reason
//! and kept in [`UpstreamStatus`]. Payments are persisted ([`db`]); a payment a crash left
//! `pending` is settled at start by trying to reclaim it: the mint tells whether the upstream
//! already swapped it.
//!
//! With a WAN meter ([`Upstream::set_meter`]) each `/usage` poll also compares the upstream's
//! count with our own data plane's ([`meter`]): [`UpstreamStatus::meter`], and a warning in the
//! log and in `warnings` when they disagree by more than max(10 %, 64 KiB).

pub mod client;
pub mod db;
pub mod meter;
pub mod policy;
pub mod route;
pub mod settings;
pub mod shortfall;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::neighbour::{KernelNeighbours, Neighbours};
use crate::protocol::Metric;
use crate::valve::{MacAddr, WanMeter};
use crate::wallet::{Reservation, Wallet, WalletError};
use client::SignedAd;
use db::{Db, PaymentRow, SessionRow};
pub use policy::{Choice, Refusal};
pub use settings::{TrustDefault, UpstreamSettings};

/// The window of `max_sat_per_hour`.
const HOUR: Duration = Duration::from_secs(3600);

/// The upstream buyer's errors.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("`{field}`: {problem} (fix: {fix})")]
    Config {
        field: String,
        problem: String,
        fix: String,
    },
    #[error("refusing gateway {addr}: {reason}")]
    BadGateway { addr: IpAddr, reason: String },
    #[error("http {addr}{path}: {reason}")]
    Http {
        addr: SocketAddr,
        path: String,
        reason: String,
    },
    #[error("bad advertisement: {reason}")]
    BadAdvertisement { reason: String },
    #[error("upstream store: {source}")]
    Storage {
        #[source]
        source: rusqlite::Error,
    },
    #[error("route lookup: {source}")]
    Route {
        #[source]
        source: std::io::Error,
    },
    #[error("wallet: {source}")]
    Wallet {
        #[from]
        source: WalletError,
    },
}

/// Our own count of the traffic through the upstream compared with its `/usage` (see
/// [`meter`] for what each side counts).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MeterStatus {
    /// The upstream gateway's MAC, the key of our WAN meter.
    pub upstream_mac: String,
    /// L3 bytes we exchanged with the upstream since the comparison started.
    pub ours: u64,
    /// Our cumulative counters (since the meter was first attached): sent to the upstream,
    /// received from it.
    pub sent: u64,
    pub received: u64,
    /// The upstream's `used` since the comparison started (`None` unless it meters bytes).
    pub theirs: Option<u64>,
    /// `ours − theirs`.
    pub difference: Option<i64>,
    /// `|ours − theirs| / max(ours, theirs)`.
    pub disagreement: f64,
    /// The difference above which the meters disagree: max(10 %, 64 KiB).
    pub threshold: u64,
    /// The difference is above `threshold`.
    pub large: bool,
    pub warning: Option<String>,
}

/// What the upstream buyer is doing, for the admin API and logs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UpstreamStatus {
    pub wan_interface: Option<String>,
    pub gateway: Option<IpAddr>,
    pub pubkey: Option<String>,
    pub metric: Option<Metric>,
    pub step_size: Option<u64>,
    /// The option we buy (canonical mint URL) and its price.
    pub mint: Option<String>,
    pub price_per_step: Option<u64>,
    /// The upstream session as its `/usage` last said.
    pub allotment: Option<u64>,
    pub used: Option<u64>,
    /// Amounts in sat over this state directory's lifetime.
    pub paid: u64,
    pub reclaimed: u64,
    pub purchases: u64,
    /// The last reason we did not pay (`None` once a purchase succeeds).
    pub last_refusal: Option<String>,
    /// The last failure talking to the upstream or the wallet.
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    /// Reserved for the next renewal.
    pub held: u64,
    /// Spending limits in force for the upstream's metric (sat), and what the last hour cost.
    pub purchase_limit: Option<u64>,
    pub hourly_limit: Option<u64>,
    pub spent_last_hour: u64,
    pub warnings: Vec<String>,
    /// `None` while WAN metering is not running.
    pub meter: Option<MeterStatus>,
}

/// The discovered upstream.
struct Current {
    gateway: Ipv4Addr,
    signed: SignedAd,
    probed: Instant,
}

/// A purchase the upstream kept without a session showing up yet.
struct Unconfirmed {
    pubkey: String,
    at: Instant,
    amount: u64,
    what: &'static str,
    /// What the purchase bought (`steps × step_size`, in its metric; 0 when the token was
    /// taken without a session answer) and our WAN meter's total when it was made: a session
    /// we used up ourselves between two polls is not "kept without a session".
    bought: u64,
    metric: Metric,
    meter_at: Option<u64>,
}

/// Loop state that lives only in the task.
struct Run {
    current: Option<Current>,
    failures: u32,
    next_attempt: Instant,
    hold: Option<Reservation>,
    unconfirmed: Option<Unconfirmed>,
    /// The operator alert while we refuse to pay after an unconfirmed purchase.
    alert: Option<String>,
    /// The MAC the WAN meter watches and where the comparison (re)started.
    metered: Option<(Ipv4Addr, MacAddr, Option<meter::Reference>)>,
}

/// The upstream buyer. Create with [`Upstream::new`], drive with [`Upstream::run`].
pub struct Upstream {
    settings: UpstreamSettings,
    wan: Option<String>,
    wallet: Wallet,
    db: Db,
    status: Mutex<UpstreamStatus>,
    meter: OnceLock<Arc<dyn WanMeter>>,
}

impl Upstream {
    /// Opens `state_dir/upstream.sqlite`.
    pub fn new(
        settings: UpstreamSettings,
        wan_interface: Option<String>,
        wallet: Wallet,
        state_dir: &Path,
    ) -> Result<Arc<Upstream>, UpstreamError> {
        let db = Db::open(&state_dir.join("upstream.sqlite"))?;
        let status = UpstreamStatus {
            wan_interface: wan_interface.clone(),
            paid: db.total("accepted")?,
            reclaimed: db.total("reclaimed")?,
            ..Default::default()
        };
        Ok(Arc::new(Upstream {
            settings,
            wan: wan_interface,
            wallet,
            db,
            status: Mutex::new(status),
            meter: OnceLock::new(),
        }))
    }

    /// Compares the upstream's `/usage` with our own count on the WAN (once, before `run`).
    pub fn set_meter(&self, meter: Arc<dyn WanMeter>) {
        if self.meter.set(meter).is_err() {
            tracing::warn!("the WAN meter was set already; keeping the first");
        }
    }

    /// A snapshot of what the buyer is doing.
    pub fn status(&self) -> UpstreamStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every payment made upstream, oldest first.
    pub fn payments(&self) -> Result<Vec<PaymentRow>, UpstreamError> {
        self.db.payments(None)
    }

    fn with_status(&self, f: impl FnOnce(&mut UpstreamStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn refuse(&self, reason: String) {
        let changed = self.status().last_refusal.as_deref() != Some(reason.as_str());
        if changed {
            tracing::warn!(%reason, "not paying the upstream");
        }
        self.with_status(|s| s.last_refusal = Some(reason));
    }

    fn error(&self, run: &mut Run, e: String) {
        run.failures = run.failures.saturating_add(1);
        let shift = run.failures.min(16) - 1;
        let wait = (self.settings.poll_interval * (1u32 << shift)).min(self.settings.max_backoff);
        run.next_attempt = Instant::now() + wait;
        tracing::warn!(error = %e, failures = run.failures, retry_in = ?wait, "upstream purchase failed");
        let failures = run.failures;
        self.with_status(|s| {
            s.last_error = Some(e);
            s.consecutive_failures = failures;
        });
    }

    /// Settles payments a previous run left `pending`: reclaim what the upstream never
    /// swapped; what it did swap is recorded as taken.
    pub async fn recover(&self) -> Result<(), UpstreamError> {
        for p in self.db.payments(Some("pending"))? {
            self.settle_unanswered(&p.op_id, "left pending by a previous run")
                .await;
        }
        Ok(())
    }

    /// A token whose payment got no valid session: take it back if we still can. True when
    /// the upstream had already swapped it (the money is gone).
    async fn settle_unanswered(&self, op_id: &str, why: &str) -> bool {
        match self.wallet.reclaim(op_id).await {
            Ok(n) => {
                tracing::info!(op_id, amount = n, reason = why, "upstream token reclaimed");
                logged(
                    "recording the reclaim",
                    self.db.set_state(op_id, "reclaimed", why),
                );
                if let Ok(r) = self.db.total("reclaimed") {
                    self.with_status(|s| s.reclaimed = r);
                }
            }
            Err(WalletError::TokenSpent) => {
                tracing::warn!(
                    op_id,
                    reason = why,
                    "the upstream swapped the token without a valid session answer"
                );
                logged(
                    "recording the token as taken",
                    self.db
                        .set_state(op_id, "taken", &format!("{why}; swapped by the upstream")),
                );
                return true;
            }
            Err(e) => {
                // Stays pending: retried at the next start (and by the next purchase attempt).
                tracing::error!(op_id, error = %e, "reclaiming the upstream token failed; will retry");
                logged(
                    "recording the failed reclaim",
                    self.db
                        .set_state(op_id, "pending", &format!("{why}; reclaim failed: {e}")),
                );
            }
        }
        false
    }

    /// Extends the standing renewal hold (every loop turn, whether or not the upstream
    /// answers: an unreachable upstream is not a reason to let payouts spend it).
    fn keep_hold(&self, run: &mut Run) {
        if let Some(h) = &run.hold {
            if !self
                .wallet
                .extend(h, self.settings.hold_ttl)
                .unwrap_or(false)
            {
                run.hold = None;
                self.with_status(|s| s.held = 0);
            }
        }
    }

    /// Keeps extending `hold` every third of its lifetime; never returns. Raced against a
    /// loop turn, whose probe or purchase may hang for `probe_timeout` × `probe_tries` or
    /// `purchase_timeout` — longer than a short `hold_ttl`. A hold released or consumed
    /// meanwhile just fails to extend.
    async fn keep_hold_during(&self, hold: Option<Reservation>) {
        let Some(h) = hold else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(self.settings.hold_ttl / 3).await;
            logged(
                "extending the renewal hold",
                self.wallet.extend(&h, self.settings.hold_ttl),
            );
        }
    }

    /// We give the upstream up: its hold goes back to the wallet.
    fn give_up_hold(&self, run: &mut Run, why: &str) {
        if let Some(h) = run.hold.take() {
            tracing::info!(amount = h.amount, mint = %h.mint, reason = why, "releasing the upstream renewal hold");
            logged("releasing the renewal hold", self.wallet.release(&h));
            self.with_status(|s| s.held = 0);
        }
    }

    /// Runs until `shutdown`. Never returns early: every failure is logged and retried.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if let Err(e) = self.recover().await {
            tracing::error!(error = %e, "settling interrupted upstream payments");
        }
        let watch = match route::RouteWatch::new() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "no netlink route watch; re-checking periodically only");
                None
            }
        };
        let mut run = Run {
            current: None,
            failures: 0,
            next_attempt: Instant::now(),
            hold: None,
            unconfirmed: None,
            alert: None,
            metered: None,
        };
        loop {
            let hold = run.hold.clone();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.discover(&mut run) => {}
                _ = self.keep_hold_during(hold) => {}
            }
            self.keep_hold(&mut run);
            if run.current.is_some() {
                // Not raced against shutdown: a purchase in flight is finished and recorded.
                let hold = run.hold.clone();
                tokio::select! {
                    _ = self.step(&mut run) => {}
                    _ = self.keep_hold_during(hold) => {}
                }
            }
            let mut warnings = self.wallet.warnings().await;
            warnings.extend(run.alert.clone());
            let spent = self.db.spent_within(HOUR).unwrap_or(0);
            self.with_status(|s| {
                s.spent_last_hour = spent;
                warnings.extend(s.meter.as_ref().and_then(|m| m.warning.clone()));
                s.warnings = warnings;
            });
            let wait = tokio::time::sleep(self.settings.poll_interval);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wait => {}
                Ok(()) = async { match &watch { Some(w) => w.changed().await, None => std::future::pending().await } } => {
                    tracing::debug!("network change: re-checking the upstream");
                    if let Some(c) = &mut run.current {
                        // Force a re-probe: the gateway (or its address) may have moved.
                        c.probed = Instant::now() - self.settings.recheck_interval;
                    }
                }
            }
        }
        if let Some(h) = run.hold.take() {
            logged("releasing the renewal hold", self.wallet.release(&h));
        }
    }

    /// Finds the default gateway and (re)probes its advertisement when it changed or is stale.
    async fn discover(&self, run: &mut Run) {
        let gw = match route::default_gateway(self.wan.as_deref()) {
            Ok(Some(g)) => g,
            Ok(None) => {
                run.current = None;
                self.give_up_hold(run, "no default gateway");
                self.with_status(|s| s.gateway = None);
                self.refuse(format!(
                    "no IPv4 default gateway{}",
                    self.wan
                        .as_deref()
                        .map(|w| format!(" on {w}"))
                        .unwrap_or_default()
                ));
                return;
            }
            Err(e) => {
                self.refuse(UpstreamError::Route { source: e }.to_string());
                return;
            }
        };
        let fresh = run.current.as_ref().is_some_and(|c| {
            c.gateway == gw && c.probed.elapsed() < self.settings.recheck_interval
        });
        if fresh {
            return;
        }
        self.with_status(|s| s.gateway = Some(IpAddr::V4(gw)));
        match self.probe(IpAddr::V4(gw)).await {
            Ok(signed) => {
                let changed = run
                    .current
                    .as_ref()
                    .is_none_or(|c| c.gateway != gw || c.signed != signed);
                if run
                    .current
                    .as_ref()
                    .is_some_and(|c| c.signed.pubkey != signed.pubkey)
                {
                    self.give_up_hold(run, "the gateway's key changed");
                }
                if changed {
                    tracing::info!(gateway = %gw, pubkey = %signed.pubkey, metric = %signed.ad.metric,
                        step_size = signed.ad.step_size, options = signed.ad.prices.len(),
                        "upstream TollGate discovered");
                }
                let metric = signed.ad.metric;
                self.with_status(|s| {
                    s.pubkey = Some(signed.pubkey.clone());
                    s.metric = Some(metric);
                    s.step_size = Some(signed.ad.step_size);
                    s.purchase_limit = Some(self.settings.purchase_limit(metric));
                    s.hourly_limit = Some(self.settings.hourly_limit(metric));
                });
                run.current = Some(Current {
                    gateway: gw,
                    signed,
                    probed: Instant::now(),
                });
            }
            Err(e) => {
                run.current = None;
                self.with_status(|s| {
                    s.pubkey = None;
                });
                self.refuse(e.to_string());
            }
        }
    }

    /// `GET http://<gw>:2121/` with timeout and retries; verifies the advertisement.
    pub async fn probe(&self, gw: IpAddr) -> Result<SignedAd, UpstreamError> {
        client::check_gateway_addr(gw)?;
        let addr = SocketAddr::new(gw, client::PORT);
        let mut last = None;
        for attempt in 0..self.settings.probe_tries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            match client::request(addr, "GET", "/", None, self.settings.probe_timeout).await {
                Ok(a) if a.status == 200 => return client::parse_advertisement(&a.body),
                Ok(a) => {
                    last = Some(UpstreamError::Http {
                        addr,
                        path: "/".into(),
                        reason: format!("status {}", a.status),
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one try"))
    }

    fn offset(&self, metric: Metric) -> u64 {
        match metric {
            Metric::Bytes => self.settings.bytes_renewal_offset,
            Metric::Milliseconds => self.settings.ms_renewal_offset,
        }
    }

    /// One poll of the upstream session; buys when there is none or it is nearly used up.
    async fn step(&self, run: &mut Run) {
        let Some(cur) = &run.current else { return };
        let (gw, signed) = (cur.gateway, cur.signed.clone());
        let addr = SocketAddr::from((gw, client::PORT));
        let usage = match client::request(addr, "GET", "/usage", None, self.settings.probe_timeout)
            .await
            .and_then(|a| {
                client::parse_usage(&a.body).map_err(|reason| UpstreamError::Http {
                    addr,
                    path: "/usage".into(),
                    reason,
                })
            }) {
            Ok(u) => u,
            Err(e) => {
                self.with_status(|s| s.last_error = Some(e.to_string()));
                return;
            }
        };
        let (used, allotment) = usage.unwrap_or((0, 0));
        let remaining = allotment.saturating_sub(used);
        self.with_status(|s| {
            s.used = usage.map(|u| u.0);
            s.allotment = usage.map(|u| u.1);
        });
        self.update_meter(run, gw, signed.ad.metric, usage.map(|u| u.0));
        if usage.is_some() {
            logged(
                "recording the upstream session",
                self.db.put_session(&SessionRow {
                    pubkey: signed.pubkey.clone(),
                    gateway: gw.to_string(),
                    metric: signed.ad.metric.to_string(),
                    used,
                    allotment,
                    updated_ms: Db::now_ms(),
                }),
            );
        }
        if usage.is_some() {
            // A live session: whatever we bought showed up.
            if run.unconfirmed.take().is_some() && run.alert.take().is_some() {
                tracing::info!(gateway = %gw, "the upstream shows a session again");
            }
        }
        if usage.is_some() && remaining > self.offset(signed.ad.metric) {
            return; // a live session (perhaps from before a restart): nothing to pay
        }
        if Instant::now() < run.next_attempt {
            return;
        }
        if usage.is_none() && self.used_up(run) {
            tracing::info!(gateway = %gw, "the upstream session we bought was used up between two polls");
            run.unconfirmed = None;
            run.alert = None;
        }
        if let Some(u) = run
            .unconfirmed
            .as_ref()
            .filter(|u| u.pubkey == signed.pubkey)
        {
            if u.at.elapsed() < self.settings.no_session_backoff {
                let alert = format!(
                    "upstream {gw} ({}) kept our payment of {} sat without a session ({}); not \
                     paying it again for {:?} (no_session_backoff)",
                    signed.pubkey, u.amount, u.what, self.settings.no_session_backoff
                );
                if run.alert.as_deref() != Some(alert.as_str()) {
                    tracing::error!(%alert, "possible hostile upstream");
                }
                self.refuse(alert.clone());
                run.alert = Some(alert);
                return;
            }
            run.unconfirmed = None;
            run.alert = None;
        }
        // Retry the reclaim of anything a failed attempt left pending before spending more.
        for p in self.db.payments(Some("pending")).unwrap_or_default() {
            self.settle_unanswered(&p.op_id, "retrying reclaim").await;
        }
        let choice = match self.choose(&signed, remaining, &mut run.hold).await {
            Ok(c) => c,
            Err(e) => {
                self.refuse(e);
                run.next_attempt = Instant::now()
                    + self
                        .settings
                        .recheck_interval
                        .min(self.settings.max_backoff);
                return;
            }
        };
        self.wallet
            .set_minimum_purchase(&choice.mint, choice.amount);
        self.with_status(|s| {
            s.mint = Some(choice.mint.clone());
            s.price_per_step = Some(choice.price_per_step);
        });
        match self.purchase(gw, &signed, &choice, run).await {
            Ok(allot) => {
                run.unconfirmed = Some(Unconfirmed {
                    pubkey: signed.pubkey.clone(),
                    at: Instant::now(),
                    amount: choice.amount,
                    what: "no session on /usage after the purchase",
                    bought: choice.steps.saturating_mul(choice.step_size),
                    metric: choice.metric,
                    meter_at: self.meter_total(run),
                });
                if usage.is_none() {
                    // A new session starts now at zero: compare from here.
                    self.restart_meter(run, Some(0));
                }
                run.failures = 0;
                run.next_attempt = Instant::now();
                tracing::info!(gateway = %gw, mint = %choice.mint, amount = choice.amount,
                    steps = choice.steps, allotment = allot, "bought upstream access");
                let paid = self.db.total("accepted").unwrap_or(0);
                self.with_status(|s| {
                    s.allotment = Some(allot);
                    s.last_refusal = None;
                    s.last_error = None;
                    s.consecutive_failures = 0;
                    s.purchases += 1;
                    s.paid = paid;
                });
                // Hold the next renewal's amount so payouts cannot spend it meanwhile.
                if run.hold.is_none() {
                    if let Ok(r) = self
                        .wallet
                        .reserve(&choice.mint, choice.amount, self.settings.hold_ttl)
                        .await
                    {
                        self.with_status(|s| s.held = r.amount);
                        run.hold = Some(r);
                    }
                }
            }
            Err((e, taken)) => {
                if taken {
                    run.unconfirmed = Some(Unconfirmed {
                        pubkey: signed.pubkey.clone(),
                        at: Instant::now(),
                        amount: choice.amount,
                        what: "the token was swapped without a valid session answer",
                        bought: 0,
                        metric: choice.metric,
                        meter_at: None,
                    });
                }
                self.error(run, e)
            }
        }
    }

    /// Our WAN meter's count next to the upstream's `used` (see [`meter`]).
    /// Our WAN meter's byte count with the upstream we meter (None without a meter).
    fn meter_total(&self, run: &Run) -> Option<u64> {
        let m = self.meter.get()?;
        let (_, mac, _) = run.metered.as_ref()?;
        m.read(*mac).ok().map(|u| u.unwrap_or_default().bytes())
    }

    /// Whether the unconfirmed purchase was used up by us (time elapsed, or our own meter
    /// counted at least what we bought since): then no session on `/usage` is expected.
    fn used_up(&self, run: &Run) -> bool {
        let Some(u) = &run.unconfirmed else {
            return false;
        };
        if u.bought == 0 {
            return false;
        }
        match u.metric {
            Metric::Milliseconds => u.at.elapsed().as_millis() >= u128::from(u.bought),
            Metric::Bytes => match (u.meter_at, self.meter_total(run)) {
                (Some(then), Some(now)) => now.saturating_sub(then) >= u.bought,
                _ => false,
            },
        }
    }

    fn update_meter(&self, run: &mut Run, gw: Ipv4Addr, metric: Metric, used: Option<u64>) {
        let Some(m) = self.meter.get() else { return };
        // The poll just talked to the gateway, so the kernel has its neighbour entry.
        let mac = match KernelNeighbours::new(None).mac_of(IpAddr::V4(gw)) {
            Ok(mac) => mac,
            Err(e) => {
                tracing::debug!(gateway = %gw, error = %e, "upstream MAC unknown; not metering");
                return;
            }
        };
        if run.metered.as_ref().map(|(g, m, _)| (*g, *m)) != Some((gw, mac)) {
            if let Err(e) = m.watch(mac, gw) {
                tracing::warn!(gateway = %gw, %mac, error = %e, "WAN meter: cannot watch the upstream");
                return;
            }
            tracing::info!(gateway = %gw, %mac, "WAN meter counting the upstream's traffic");
            run.metered = Some((gw, mac, None));
            self.with_status(|s| s.meter = None);
        }
        let ours = match m.read(mac) {
            Ok(u) => u.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "WAN meter: reading the counters");
                return;
            }
        };
        let total = ours.bytes();
        let Some((_, _, reference)) = &mut run.metered else {
            return;
        };
        let theirs = used.filter(|_| metric == Metric::Bytes);
        match (*reference, theirs) {
            (None, Some(t)) => {
                *reference = Some(meter::Reference {
                    ours: total,
                    theirs: t,
                })
            }
            // The upstream's count went down: a new session we did not start ourselves.
            (Some(r), Some(t)) if t < r.theirs => {
                *reference = Some(meter::Reference {
                    ours: total,
                    theirs: t,
                })
            }
            _ => {}
        }
        let reference = reference.unwrap_or(meter::Reference {
            ours: total,
            theirs: 0,
        });
        let status = meter::compare(mac, ours.bytes_up, ours.bytes_down, reference, theirs);
        let was_large = self.status().meter.is_some_and(|m| m.large);
        if status.large && !was_large {
            tracing::warn!(ours = status.ours, theirs = ?status.theirs, difference = ?status.difference,
                "the upstream's usage and our WAN meter disagree: {}",
                status.warning.as_deref().unwrap_or_default());
        } else if !status.large && was_large {
            tracing::info!(ours = status.ours, theirs = ?status.theirs, "the upstream's usage and our WAN meter agree again");
        }
        self.with_status(|s| s.meter = Some(status));
    }

    /// Restarts the comparison at our current count and the upstream's `theirs`.
    fn restart_meter(&self, run: &mut Run, theirs: Option<u64>) {
        let (Some(m), Some((_, mac, reference))) = (self.meter.get(), &mut run.metered) else {
            return;
        };
        if let Ok(u) = m.read(*mac) {
            *reference = theirs.map(|t| meter::Reference {
                ours: u.unwrap_or_default().bytes(),
                theirs: t,
            });
        }
    }

    /// [`policy::choose`]; when the cheapest mint is short, first try to cover the shortfall
    /// from another mint ([`shortfall`]) — the moved amount then becomes our hold there.
    async fn choose(
        &self,
        signed: &SignedAd,
        remaining: u64,
        hold: &mut Option<Reservation>,
    ) -> Result<Choice, String> {
        let spent = self
            .db
            .spent_within(HOUR)
            .map_err(|e| format!("counting the last hour's payments: {e}"))?;
        let funds = self.funds(hold.as_ref()).await?;
        let refusal = match policy::choose(signed, &self.settings, &funds, remaining, spent) {
            Err(r @ Refusal::FundsLow { .. }) => r,
            other => return other.map_err(|r| r.to_string()),
        };
        let ours = hold
            .as_ref()
            .filter(|h| matches!(&refusal, Refusal::FundsLow { mint, .. } if *mint == h.mint));
        let Some(held) = shortfall::cover(&self.wallet, &refusal, ours).await else {
            return Err(refusal.to_string());
        };
        if let Some(old) = hold.replace(held.clone()) {
            if old.id != held.id {
                logged("releasing the replaced hold", self.wallet.release(&old));
            }
        }
        self.with_status(|s| s.held = held.amount);
        let funds = self.funds(hold.as_ref()).await?;
        policy::choose(signed, &self.settings, &funds, remaining, spent).map_err(|r| r.to_string())
    }

    /// Available funds per accepted mint, our own standing hold counted as ours.
    async fn funds(&self, hold: Option<&Reservation>) -> Result<BTreeMap<String, u64>, String> {
        let mut funds = BTreeMap::new();
        for b in self
            .wallet
            .balances()
            .await
            .map_err(|e| format!("wallet: {e}"))?
        {
            // Our own standing hold is ours to spend on this purchase.
            let own = hold.filter(|h| h.mint == b.mint).map_or(0, |h| h.amount);
            funds.insert(b.mint, b.available + own);
        }
        Ok(funds)
    }

    /// Reserve, make the token, record it, pay, verify; on any failure reclaim. Returns the
    /// allotment the upstream's session answer states; on failure the reason and whether the
    /// upstream kept the token.
    async fn purchase(
        &self,
        gw: Ipv4Addr,
        signed: &SignedAd,
        choice: &Choice,
        run: &mut Run,
    ) -> Result<u64, (String, bool)> {
        let reservation = match run.hold.take() {
            Some(h) if h.mint == choice.mint && h.amount >= choice.amount => h,
            other => {
                if let Some(h) = other {
                    logged("releasing the renewal hold", self.wallet.release(&h));
                }
                self.with_status(|s| s.held = 0);
                self.wallet
                    .reserve(&choice.mint, choice.amount, self.wallet.reservation_ttl())
                    .await
                    .map_err(|e| {
                        (
                            format!("reserving {} sat at {}: {e}", choice.amount, choice.mint),
                            false,
                        )
                    })?
            }
        };
        let held = reservation.clone();
        self.with_status(|s| s.held = 0);
        let token = match self
            .wallet
            .create_payment_token(&choice.mint, choice.amount, Some(reservation))
            .await
        {
            Ok(t) => t,
            Err(e) => {
                logged("releasing the hold", self.wallet.release(&held));
                return Err((format!("creating the token: {e}"), false));
            }
        };
        let row = PaymentRow {
            op_id: token.op_id.clone(),
            pubkey: signed.pubkey.clone(),
            gateway: gw.to_string(),
            mint: choice.mint.clone(),
            amount: choice.amount,
            steps: choice.steps,
            state: "pending".into(),
            detail: String::new(),
        };
        if let Err(e) = self.db.put_pending(&row) {
            // Without a record we must not let the token leave: take it back now.
            let taken = self
                .settle_unanswered(&token.op_id, "could not record the payment")
                .await;
            return Err((e.to_string(), taken));
        }
        let addr = SocketAddr::from((gw, client::PORT));
        let answer = client::request(
            addr,
            "POST",
            "/",
            Some(&token.token),
            self.settings.purchase_timeout,
        )
        .await;
        let failure = match answer {
            Ok(a) if a.status == 200 => {
                match client::parse_session(&a.body, &signed.pubkey, signed.ad.metric) {
                    Ok(session) => {
                        logged(
                            "recording the accepted payment",
                            self.db.set_state(&token.op_id, "accepted", ""),
                        );
                        return Ok(session.allotment);
                    }
                    Err(e) => format!("invalid session answer: {e}"),
                }
            }
            Ok(a) => format!(
                "upstream refused the payment (status {}): {}",
                a.status,
                notice_text(&a.body)
            ),
            Err(e) => e.to_string(),
        };
        let taken = self.settle_unanswered(&token.op_id, &failure).await;
        Err((failure, taken))
    }
}

/// The message and code of a kind-21023 notice, for the log (raw text otherwise, truncated).
fn notice_text(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body.trim()) {
        let code = v["tags"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t[0] == "code"))
            .and_then(|t| t[1].as_str())
            .unwrap_or("");
        return format!("{code}: {}", v["content"].as_str().unwrap_or(""));
    }
    body.chars().take(200).collect()
}

/// Logs a bookkeeping step that failed where the caller has nothing better to do: the money
/// is already where it belongs, and the row or hold is re-derived at the next start (a hold's
/// TTL lets it lapse by itself).
fn logged<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "{what} failed");
    }
}
