//! The chandler owns sessions: what each device has bought, what it used, and the kernel gate
//! that enforces it (through the [`Gates`] seam only).
//!
//! ```text
//! merchant ──add(mac, amount, grant)──> chandler ──open/extend──> Gates (kernel enforces)
//!                                          │  then ONE sqlite tx: session + grant applied + log
//! kernel ──Exhaustion{mac, generation}──> run() ──> session closed (quota / expiry), recorded
//! start ──reconcile()──> DB is the truth for allotments, kernel counters for usage
//! ```
//! Kernel entries: `check` only asks whether there is room (nothing is created before the
//! money is taken); `open` at grant time creates the entry; a closed gate's entry is evicted
//! by `run()`'s sweep after `closed_retention` (sooner, oldest first, when the map is near
//! full). An open gate is never evicted.
//!
//! States of a session row: active ──exhausted / admin-close / reconcile──> closed; a payment
//! for a closed session starts a new one. Top-ups add to what remains and never interrupt
//! traffic: time `new_end = max(now, old_end) + added`, bytes `remaining + added` (`extend`
//! while the gate is open, `open` with the sum otherwise). Both are set from the database's
//! numbers (the byte limit to `baseline + allotment - used_before`, the deadline replaced), so
//! a grant retried after a failed commit is never credited twice in the kernel.
//!
//! Rates and tiers: the session row stores its tier, the price factor it was bought at and
//! its own rates (a tier's, or the operator's `--down-kbit`; none = the default tier's).
//! Every open, top-up and reconciliation puts the gate at those rates, so a restart or a
//! reboot changes nothing a customer paid for. A paid grant is priced under the guard
//! (`add_paid`): at the dearer of the requested and the active tier; an upgrade converts what
//! remains at the price ratio (`tiers::convert`) and raises the rate in the same step.
//!
//! Why the kernel op comes before the DB commit: if we crash in between, the kernel has more
//! than the DB says and the grant is still `redeemed`; `reconcile()` first trims the kernel to
//! the DB, then the merchant re-applies the grant. The other order could lose paid allotment.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::{
    config::ChandlerConfig,
    protocol::Metric,
    store::{
        Action, AppliedGrant, LogEntry, RateSource, SessionRates, SessionRow, Store, StoreError,
    },
    tiers::{Tier, Tiers},
    valve::{
        Allowance, ExhaustReason, Exhaustion, GateState, Gates, MacAddr, Rates, ValveError,
        MAX_BOUND_V6,
    },
};

const NS_PER_MS: u64 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ChandlerError {
    #[error("data plane: {source}")]
    Valve {
        #[from]
        source: ValveError,
    },
    #[error("session store: {source}")]
    Store {
        #[from]
        source: StoreError,
    },
    #[error("allotment overflow for {mac}")]
    Overflow { mac: MacAddr },
    #[error("no active session for {mac}")]
    NoSession { mac: MacAddr },
    /// At the session's active (dearer) tier the payment buys too little.
    #[error("{steps} steps at the active tier {tier:?} is below the minimum purchase")]
    BelowMinimum { steps: u64, tier: String },
}

/// A grant to mark applied in the same transaction as the session change.
pub struct GrantCommit<'a> {
    pub token_id: &'a str,
    /// Steps bought (replaced by the steps priced under the guard for a tiered purchase).
    pub steps: u64,
    /// Builds the answer (the signed kind-1022 JSON) from the device's new total allotment
    /// and the name of the session's tier.
    pub answer: &'a (dyn Fn(u64, &str) -> String + Sync),
}

/// What a customer's payment buys at a price factor: `Some((steps, metric units))`, or
/// `None` below the minimum purchase (see `tiers::steps`).
pub type PriceAt<'a> = &'a (dyn Fn(u64) -> Option<(u64, u64)> + Sync);

/// How much a change adds.
enum Amount<'a> {
    /// Metric units (operator grants, tests).
    Fixed(u64),
    /// A paid purchase at a tier, priced under the guard against the active tier.
    Priced { tier: &'a str, price: PriceAt<'a> },
}

/// Rates an operator asks for (`None` = leave that direction as it is).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateRequest {
    pub down_kbit: Option<u64>,
    pub up_kbit: Option<u64>,
}

impl RateRequest {
    pub fn is_empty(&self) -> bool {
        self.down_kbit.is_none() && self.up_kbit.is_none()
    }
}

/// A session as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionView {
    pub mac: MacAddr,
    pub metric: Metric,
    pub active: bool,
    pub allotment: u64,
    pub used: u64,
    pub remaining: u64,
    pub start_unix: u64,
    pub end_unix_ms: Option<u64>,
    pub close_reason: Option<Action>,
    /// The tier bought (`None` = default).
    pub tier: Option<String>,
}

/// What `reconcile()` changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub reopened: Vec<MacAddr>,
    /// Open gates whose rates differed from the session's and were set back.
    pub rates_restored: Vec<MacAddr>,
    pub closed_without_session: Vec<MacAddr>,
    pub expired: Vec<MacAddr>,
}

/// Pure top-up arithmetic for time: `max(now, old_end) + added` (saturating).
pub fn topup_end(now: u64, old_end: Option<u64>, added: u64) -> u64 {
    old_end.unwrap_or(now).max(now).saturating_add(added)
}

/// Pure top-up arithmetic for bytes: what remains plus what was added.
pub fn topup_bytes(allotment: u64, used: u64, added: u64) -> u64 {
    allotment.saturating_sub(used).saturating_add(added)
}

pub struct Chandler {
    cfg: ChandlerConfig,
    gates: Arc<dyn Gates>,
    store: Arc<Store>,
    /// Serialises session changes (kernel op + DB commit are one step per device).
    lock: Mutex<()>,
    boot_id: String,
    /// Boot ns of the last history prune (None: not yet this run).
    last_prune: Mutex<Option<u64>>,
    /// The tiers sold (`None`: not configured, as in unit tests: everything is the default
    /// tier and default-tier rates are left to the valve).
    tiers: std::sync::RwLock<Option<Tiers>>,
}

/// History is pruned at most this often (boot ns).
const PRUNE_EVERY_NS: u64 = 3_600 * 1_000_000_000;

fn read_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Chandler {
    pub fn new(cfg: ChandlerConfig, gates: Arc<dyn Gates>, store: Arc<Store>) -> Self {
        Chandler {
            cfg,
            gates,
            store,
            lock: Mutex::new(()),
            boot_id: read_boot_id(),
            last_prune: Mutex::new(None),
            tiers: std::sync::RwLock::new(None),
        }
    }

    /// Sells `tiers` (the default tier's rates are the valve's default rates).
    pub fn with_tiers(self, tiers: Tiers) -> Self {
        *self.tiers.write().unwrap_or_else(|p| p.into_inner()) = Some(tiers);
        self
    }

    /// A config reload: sells `tiers` from now on and moves open sessions to the new rates —
    /// default-tier sessions to the new default, tier sessions to their tier's new rates
    /// (stored with the session). Rates the operator set, and those of a tier no longer
    /// configured (what was bought), stay. Returns how many gates changed rate.
    pub fn set_tiers(&self, tiers: Tiers) -> Result<usize, ChandlerError> {
        let _g = self.guard();
        *self.tiers.write().unwrap_or_else(|p| p.into_inner()) = Some(tiers.clone());
        let mut changed = 0;
        for mut row in self.store.active_sessions()? {
            let want = match row.rates {
                Some(SessionRates {
                    source: RateSource::Admin | RateSource::Kernel,
                    ..
                }) => continue,
                Some(SessionRates {
                    source: RateSource::Tier,
                    rates,
                }) => match tiers
                    .get(row.tier.as_deref())
                    .filter(|t| !t.is_default() && t.rates != rates)
                {
                    Some(t) => {
                        row.rates = Some(SessionRates {
                            rates: t.rates,
                            source: RateSource::Tier,
                        });
                        let log = LogEntry {
                            mac: row.mac,
                            action: Action::Reconcile,
                            amount: 0,
                            detail: format!("config reload: tier {} rates", t.name),
                        };
                        self.store.commit_session(&row, None, &log)?;
                        t.rates
                    }
                    None => rates,
                },
                None => tiers.default_tier().rates,
            };
            if let Some(g) = self
                .gates
                .gate(row.mac)?
                .filter(|g| g.open && g.rates != want)
            {
                self.gates.set_rate(g.mac, want)?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// The tiers sold (only the default when none are configured).
    pub fn tiers(&self) -> Tiers {
        self.tiers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }

    pub fn metric(&self) -> Metric {
        self.cfg.metric
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pre-flight before taking money: can the data plane open a gate for `mac` now?
    pub fn check(&self, mac: MacAddr) -> Result<(), ChandlerError> {
        Ok(self.gates.check(mac)?)
    }

    /// The end of a time session in boot ns. From another boot (the boot clock restarted) it
    /// is now + what remained at the last snapshot: never the wall clock, which a router sets
    /// by NTP only after we start (a jump either way would shorten or lengthen sessions). The
    /// time the gateway was down is not charged; at most one snapshot interval is given back.
    fn end_boot(&self, row: &SessionRow, now_boot: u64) -> Option<u64> {
        if row.boot_id == self.boot_id {
            if let Some(e) = row.end_boot_ns {
                return Some(e);
            }
        }
        row.end_boot_ns.or(row.end_unix_ms)?;
        let left_ms = row.allotment.saturating_sub(row.used_snapshot);
        Some(now_boot.saturating_add(left_ms.saturating_mul(NS_PER_MS)))
    }

    /// Used so far, metric units.
    fn used(&self, row: &SessionRow, gate: Option<&GateState>, now_boot: u64) -> u64 {
        let used = match row.metric {
            Metric::Bytes => match gate {
                Some(g) if g.usage.bytes() >= row.baseline => row
                    .used_before
                    .saturating_add(g.usage.bytes() - row.baseline),
                // Counters reset (reboot) or gate unknown: the last snapshot is what we know.
                _ => row.used_snapshot,
            },
            Metric::Milliseconds => {
                let end = self.end_boot(row, now_boot).unwrap_or(now_boot);
                let left_ms = end.saturating_sub(now_boot) / NS_PER_MS;
                row.allotment.saturating_sub(left_ms)
            }
        };
        used.max(row.used_snapshot).min(row.allotment)
    }

    fn view(&self, row: &SessionRow, gate: Option<&GateState>, now_boot: u64) -> SessionView {
        let used = if row.active {
            self.used(row, gate, now_boot)
        } else {
            row.used_snapshot.min(row.allotment)
        };
        SessionView {
            mac: row.mac,
            metric: row.metric,
            active: row.active,
            allotment: row.allotment,
            used,
            remaining: row.allotment - used,
            start_unix: row.started_unix,
            end_unix_ms: row.end_unix_ms,
            close_reason: row.close_reason,
            tier: row.tier.clone(),
        }
    }

    /// Adds `amount` (metric units) to the device's session, opening one if needed.
    /// `grant` is marked applied atomically with the session change.
    pub fn add(
        &self,
        mac: MacAddr,
        amount: u64,
        grant: Option<GrantCommit<'_>>,
        action: Action,
    ) -> Result<SessionView, ChandlerError> {
        self.change(
            mac,
            Amount::Fixed(amount),
            RateRequest::default(),
            grant,
            action,
        )
    }

    /// A paid grant at tier `tier` (unknown — removed from the config since it was bought —
    /// counts as the default tier). Priced under the guard, against the session's active
    /// tier (`tiers::effective`): a dearer tier converts what remains (`tiers::convert`) and
    /// raises the rate without a gap; a cheaper one is priced at the active tier.
    pub fn add_paid(
        &self,
        mac: MacAddr,
        tier: &str,
        price: PriceAt<'_>,
        grant: GrantCommit<'_>,
    ) -> Result<SessionView, ChandlerError> {
        self.change(
            mac,
            Amount::Priced { tier, price },
            RateRequest::default(),
            Some(grant),
            Action::Grant,
        )
    }

    /// The tier a payment for `mac` at `requested` would be priced at now (the pre-flight of
    /// the merchant's minimum check; `add_paid` decides again under the guard).
    pub fn pricing_tier(&self, mac: MacAddr, requested: &Tier) -> Result<Tier, ChandlerError> {
        let active = self
            .store
            .session(mac)?
            .filter(|r| r.active)
            .map(|r| active_tier(&r));
        Ok(crate::tiers::effective(requested, active.as_ref()).clone())
    }

    fn change(
        &self,
        mac: MacAddr,
        amount: Amount<'_>,
        rates_req: RateRequest,
        grant: Option<GrantCommit<'_>>,
        action: Action,
    ) -> Result<SessionView, ChandlerError> {
        let _g = self.guard();
        let tiers = self.tiers();
        let now_boot = self.gates.now_boot_ns();
        let gate = self.gates.gate(mac)?;
        let current = self.store.session(mac)?.filter(|r| r.active);
        // A top-up that replaces the policy keeps the live session's binding (a new session
        // is bound by its payment, never by an older session's address).
        let keep_bind = match current {
            Some(_) => self.stored_binding(mac)?,
            None => Vec::new(),
        };
        let mut row = match &current {
            Some(r) => r.clone(),
            None => SessionRow {
                mac,
                metric: self.cfg.metric,
                allotment: 0,
                used_before: 0,
                baseline: gate.map_or(0, |g| g.usage.bytes()),
                used_snapshot: 0,
                generation: 0,
                end_unix_ms: None,
                end_boot_ns: None,
                boot_id: self.boot_id.clone(),
                started_unix: crate::sys::clock::unix_secs(),
                active: true,
                close_reason: None,
                tier: None,
                price_factor: 1,
                rates: None,
            },
        };
        let used = if current.is_some() {
            self.used(&row, gate.as_ref(), now_boot)
        } else {
            0
        };
        // Tiers: the price, and on an upgrade what remains converted at the price ratio.
        let mut steps = None;
        let mut upgrade = false;
        let amount = match amount {
            Amount::Fixed(a) => a,
            Amount::Priced { tier, price } => {
                let requested = tier_of(&tiers, Some(tier));
                let active = current.as_ref().map(active_tier);
                let eff = crate::tiers::effective(requested, active.as_ref());
                let (n, a) = price(eff.factor).ok_or_else(|| ChandlerError::BelowMinimum {
                    steps: 0,
                    tier: eff.name.clone(),
                })?;
                steps = Some(n);
                match active {
                    Some(ref act) if eff.factor > act.factor => {
                        // What remains was bought at the active tier's price: at the dearer
                        // one it is worth fewer units (100 cheap steps + 1 fast step must
                        // not become 101 fast steps).
                        let remaining = row.allotment.saturating_sub(used);
                        let kept = crate::tiers::convert(remaining, act.factor, eff.factor);
                        tracing::info!(%mac, from = %act.name, to = %eff.name, remaining, kept,
                            "tier upgrade: remaining allotment converted at the price ratio");
                        row.allotment = used.saturating_add(kept);
                        upgrade = true;
                        set_tier(&mut row, eff);
                    }
                    Some(_) => {}
                    None => set_tier(&mut row, eff),
                }
                a
            }
        };
        let want_rates = SessionRates::own(row.rates);
        let new_allotment = row
            .allotment
            .checked_add(amount)
            .ok_or(ChandlerError::Overflow { mac })?;
        let state = match self.cfg.metric {
            Metric::Bytes => {
                // An upgrade lowers the byte limit (the conversion): only an open sets it.
                let gate_live = current.is_some()
                    && !upgrade
                    && gate.is_some_and(|g| g.open && g.remaining_bytes.is_some_and(|r| r > 0));
                let st = if let Some(g) = gate.filter(|_| gate_live) {
                    // The kernel's limit is set from the database's numbers, not moved by
                    // `amount` from wherever it is: after a failed commit the kernel already
                    // has this grant, and the retry must not credit it twice (issue 10).
                    let kernel_limit = g
                        .usage
                        .bytes()
                        .saturating_add(g.remaining_bytes.unwrap_or(0));
                    let target = row
                        .baseline
                        .saturating_add(new_allotment.saturating_sub(row.used_before));
                    self.gates
                        .extend(mac, target.saturating_sub(kernel_limit), 0)?
                } else {
                    let allowance = topup_bytes(row.allotment, used, amount);
                    let st = self.gates.open(
                        mac,
                        Allowance {
                            bytes: Some(allowance),
                            bind_ipv4: first_v4(&keep_bind),
                            rates: want_rates,
                            ..Allowance::default()
                        },
                    )?;
                    self.restore_v6_binding(mac, &keep_bind)?;
                    // New counting epoch: usage so far is fixed, counters count from here.
                    row.used_before = used;
                    row.baseline = st.usage.bytes();
                    st
                };
                row.used_snapshot = used;
                st
            }
            Metric::Milliseconds => {
                let add_ns = amount
                    .checked_mul(NS_PER_MS)
                    .ok_or(ChandlerError::Overflow { mac })?;
                let old_end = if upgrade {
                    // The converted remainder counts from now.
                    let kept_ms = row.allotment.saturating_sub(used);
                    Some(now_boot.saturating_add(kept_ms.saturating_mul(NS_PER_MS)))
                } else if current.is_some() {
                    self.end_boot(&row, now_boot)
                } else {
                    None
                };
                // Absolute, from the database's deadline: the kernel's (maybe already
                // extended by a grant whose commit failed) is replaced, never added to.
                // Replacing the policy is one map update: no gap for a live session.
                let want_end = topup_end(now_boot, old_end, add_ns);
                let st = self.gates.open(
                    mac,
                    Allowance {
                        until_boot_ns: Some(want_end),
                        bind_ipv4: first_v4(&keep_bind),
                        rates: want_rates,
                        ..Allowance::default()
                    },
                )?;
                self.restore_v6_binding(mac, &keep_bind)?;
                let end = st.until_boot_ns.unwrap_or(want_end);
                row.end_boot_ns = Some(end);
                row.end_unix_ms =
                    Some(crate::sys::clock::unix_ms() + end.saturating_sub(now_boot) / NS_PER_MS);
                row.boot_id = self.boot_id.clone();
                row.used_snapshot = used;
                st
            }
        };
        // The session's rates in the kernel: a gate kept open keeps its own (an extend does
        // not touch them), so set them when they differ; an operator's request is merged
        // with what is in force and stored as the operator's.
        let mut state = state;
        let want = if rates_req.is_empty() {
            want_rates
        } else {
            Some(Rates {
                down_kbit: rates_req.down_kbit.unwrap_or(state.rates.down_kbit),
                up_kbit: rates_req.up_kbit.unwrap_or(state.rates.up_kbit),
            })
        };
        if let Some(r) = want.filter(|r| *r != state.rates) {
            state = self.gates.set_rate(mac, r)?;
            tracing::info!(%mac, down_kbit = r.down_kbit, up_kbit = r.up_kbit, "rate limits set");
        }
        if !rates_req.is_empty() {
            row.rates = want.map(|rates| SessionRates {
                rates,
                source: RateSource::Admin,
            });
        }
        row.allotment = new_allotment;
        row.generation = state.generation;
        row.active = true;
        row.close_reason = None;
        let tier_name = row
            .tier
            .clone()
            .unwrap_or_else(|| crate::tiers::DEFAULT_TIER.into());
        let answer = grant
            .as_ref()
            .map(|g| (g.answer)(new_allotment, &tier_name));
        let applied = grant
            .as_ref()
            .zip(answer.as_deref())
            .map(|(g, a)| AppliedGrant {
                token_id: g.token_id,
                steps: steps.unwrap_or(g.steps),
                allotment: amount,
                answer: a,
            });
        let detail = grant
            .as_ref()
            .map_or(String::new(), |g| g.token_id.to_string());
        self.store.commit_session(
            &row,
            applied,
            &LogEntry {
                mac,
                action,
                amount,
                detail,
            },
        )?;
        Ok(self.view(&row, Some(&state), now_boot))
    }

    /// Admin grant (recorded as `admin-open` / `admin-extend`).
    pub fn admin_add(&self, mac: MacAddr, amount: u64) -> Result<SessionView, ChandlerError> {
        self.admin_add_with_rates(mac, amount, RateRequest::default())
    }

    /// Admin grant that also sets the session's rates (`tollgate gate … --down-kbit`): the
    /// kernel and the session row change under one guard, so a restart or a reboot reopens
    /// the gate at these rates.
    pub fn admin_add_with_rates(
        &self,
        mac: MacAddr,
        amount: u64,
        rates: RateRequest,
    ) -> Result<SessionView, ChandlerError> {
        let active = self.store.session(mac)?.is_some_and(|r| r.active);
        let action = if active {
            Action::AdminExtend
        } else {
            Action::AdminOpen
        };
        self.change(mac, Amount::Fixed(amount), rates, None, action)
    }

    /// Closes the gate and the session (recorded with `action`, e.g. `admin-close`).
    pub fn close(&self, mac: MacAddr, action: Action) -> Result<(), ChandlerError> {
        let _g = self.guard();
        let row = self.store.session(mac)?.filter(|r| r.active);
        self.gates.close(mac)?;
        if let Some(mut row) = row {
            let now_boot = self.gates.now_boot_ns();
            let gate = self.gates.gate(mac)?;
            row.used_snapshot = self.used(&row, gate.as_ref(), now_boot);
            self.close_row(row, action)?;
        }
        Ok(())
    }

    /// Every session end goes through here, so every end is logged with its reason
    /// (`quota`, `expiry`, `admin-close`, …).
    fn close_row(&self, mut row: SessionRow, reason: Action) -> Result<(), ChandlerError> {
        tracing::info!(
            mac = %row.mac,
            reason = reason.as_str(),
            used = row.used_snapshot,
            allotment = row.allotment,
            metric = row.metric.as_str(),
            "session closed"
        );
        row.active = false;
        row.close_reason = Some(reason);
        let log = LogEntry {
            mac: row.mac,
            action: reason,
            amount: row.used_snapshot,
            detail: String::new(),
        };
        self.store.commit_session(&row, None, &log)?;
        Ok(())
    }

    /// The kernel shut a gate. Stale events (an older generation than the last top-up) are
    /// ignored: the top-up already superseded them.
    pub fn on_exhaustion(&self, ex: Exhaustion) -> Result<(), ChandlerError> {
        let _g = self.guard();
        let Some(mut row) = self.store.session(ex.mac)?.filter(|r| r.active) else {
            return Ok(());
        };
        if ex.generation < row.generation {
            tracing::debug!(mac = %ex.mac, generation = ex.generation, "stale exhaustion ignored");
            return Ok(());
        }
        let reason = match ex.reason {
            ExhaustReason::Expired => Action::Expiry,
            _ => Action::Quota,
        };
        let gate = GateState {
            mac: ex.mac,
            open: false,
            remaining_bytes: Some(0),
            until_boot_ns: None,
            bound_ipv4: None,
            generation: ex.generation,
            usage: ex.usage,
            rates: Default::default(),
        };
        row.used_snapshot = match row.metric {
            Metric::Bytes if reason == Action::Quota => row.allotment,
            _ => self.used(&row, Some(&gate), ex.at_boot_ns),
        };
        // The kernel already drops what does not fit; closing makes the gate say so too (a
        // few bytes short of the quota would otherwise still pass small packets like ACKs
        // while the session reads as closed). Same generation check as above: under the guard,
        // no top-up can slip in between.
        self.gates.close(ex.mac)?;
        self.close_row(row, reason)
    }

    /// The device's current (or last) session.
    pub fn usage(&self, mac: MacAddr) -> Result<Option<SessionView>, ChandlerError> {
        let Some(row) = self.store.session(mac)? else {
            return Ok(None);
        };
        let gate = self.gates.gate(mac)?;
        Ok(Some(self.view(
            &row,
            gate.as_ref(),
            self.gates.now_boot_ns(),
        )))
    }

    /// All devices with a session row.
    pub fn clients(&self) -> Result<Vec<SessionView>, ChandlerError> {
        let gates: HashMap<MacAddr, GateState> = self
            .gates
            .gates()?
            .into_iter()
            .map(|g| (g.mac, g))
            .collect();
        let now = self.gates.now_boot_ns();
        Ok(self
            .store
            .sessions()?
            .iter()
            .map(|r| self.view(r, gates.get(&r.mac), now))
            .collect())
    }

    /// Persists usage of every active session (one transaction; closed rows are not loaded);
    /// closes sessions the kernel already ended (a safety net for lost exhaustion events);
    /// once an hour prunes history older than the retention.
    ///
    /// The listing (a walk of every client) runs before the guard, so a payment does not wait
    /// for it. Under the guard every row is read fresh, and its gate from the listing is used
    /// only when it is still the one the row knows (same generation: every open and top-up
    /// makes a new one; a gate evicted and created again starts above the old ones) and does
    /// not end the session; otherwise the gate is read again. So a grant that lands between
    /// the listing and the guard is never judged by the gate as it was before.
    pub fn snapshot_all(&self) -> Result<(), ChandlerError> {
        let listed: HashMap<MacAddr, GateState> = self
            .gates
            .gates()?
            .into_iter()
            .map(|g| (g.mac, g))
            .collect();
        let _g = self.guard();
        let now = self.gates.now_boot_ns();
        let mut usages = Vec::new();
        let mut ended = Vec::new();
        for mut row in self.store.active_sessions()? {
            let mut gate = listed
                .get(&row.mac)
                .copied()
                .filter(|g| g.generation == row.generation);
            let mut used = self.used(&row, gate.as_ref(), now);
            if gate.is_none() || used >= row.allotment {
                gate = self.gates.gate(row.mac)?;
                used = self.used(&row, gate.as_ref(), now);
            }
            usages.push((row.mac, used, row.allotment));
            if used >= row.allotment {
                row.used_snapshot = used;
                ended.push(row);
            }
        }
        self.store.snapshot_usages(&usages)?;
        for row in ended {
            let reason = if row.metric == Metric::Bytes {
                Action::Quota
            } else {
                Action::Expiry
            };
            self.gates.close(row.mac)?;
            self.close_row(row, reason)?;
        }
        let due = {
            let mut last = self.last_prune.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| now.saturating_sub(t) >= PRUNE_EVERY_NS);
            if due {
                *last = Some(now);
            }
            due
        };
        if due {
            let r = self.store.prune()?;
            if r != crate::store::PruneReport::default() {
                tracing::info!(?r, "pruned history older than the retention");
            }
        }
        Ok(())
    }

    /// Start-up: make the kernel match the DB. No free access, no lost allotment, used stays used.
    pub fn reconcile(&self) -> Result<ReconcileReport, ChandlerError> {
        let _g = self.guard();
        let mut report = ReconcileReport::default();
        let mut gates: HashMap<MacAddr, GateState> = self
            .gates
            .gates()?
            .into_iter()
            .map(|g| (g.mac, g))
            .collect();
        let now = self.gates.now_boot_ns();
        for mut row in self.store.active_sessions()? {
            let gate = gates.remove(&row.mac);
            let mac = row.mac;
            if row.rates.is_some_and(|r| r.source == RateSource::Kernel) {
                // A session from before rates were stored: the open gate's rates (maybe the
                // operator's) become the session's; with the gate gone, the default tier's.
                row.rates = gate.filter(|g| g.open).map(|g| SessionRates {
                    rates: g.rates,
                    source: RateSource::Admin,
                });
            }
            match row.metric {
                Metric::Bytes => {
                    if gate.is_none_or(|g| g.usage.bytes() < row.baseline) {
                        // Counters were reset: usage so far is the snapshot; count anew.
                        row.used_before = row.used_snapshot;
                        row.baseline = gate.map_or(0, |g| g.usage.bytes());
                    }
                    let used = self.used(&row, gate.as_ref(), now);
                    let remaining = row.allotment - used;
                    row.used_snapshot = used;
                    if remaining == 0 {
                        self.gates.close(mac)?;
                        report.expired.push(mac);
                        self.close_row(row, Action::Quota)?;
                        continue;
                    }
                    if gate.is_none_or(|g| !g.open || g.remaining_bytes != Some(remaining)) {
                        let st = self.reopen_bound(
                            mac,
                            Allowance {
                                bytes: Some(remaining),
                                rates: SessionRates::own(row.rates),
                                ..Allowance::default()
                            },
                        )?;
                        row.used_before = used;
                        row.baseline = st.usage.bytes();
                        row.generation = st.generation;
                        report.reopened.push(mac);
                    } else if self.restore_rates(&row, gate.as_ref())? {
                        report.rates_restored.push(mac);
                    }
                }
                Metric::Milliseconds => {
                    let end = self.end_boot(&row, now).unwrap_or(now);
                    row.used_snapshot = self.used(&row, gate.as_ref(), now);
                    if end <= now {
                        self.gates.close(mac)?;
                        report.expired.push(mac);
                        self.close_row(row, Action::Expiry)?;
                        continue;
                    }
                    if gate.is_none_or(|g| !g.open || g.until_boot_ns != Some(end)) {
                        let st = self.reopen_bound(
                            mac,
                            Allowance {
                                until_boot_ns: Some(end),
                                rates: SessionRates::own(row.rates),
                                ..Allowance::default()
                            },
                        )?;
                        row.generation = st.generation;
                        report.reopened.push(mac);
                    } else if self.restore_rates(&row, gate.as_ref())? {
                        report.rates_restored.push(mac);
                    }
                    row.end_boot_ns = Some(end);
                    row.boot_id = self.boot_id.clone();
                }
            }
            let log = LogEntry {
                mac,
                action: Action::Reconcile,
                amount: row.allotment - row.used_snapshot.min(row.allotment),
                detail: String::new(),
            };
            self.store.commit_session(&row, None, &log)?;
        }
        for (mac, g) in gates {
            if g.open {
                self.gates.close(mac)?;
                report.closed_without_session.push(mac);
            }
        }
        Ok(report)
    }

    /// Binds the device's open gate to the addresses it paid from: `addrs` is the payment's
    /// source first, then what the neighbour tables show for the MAC. A second device cloning
    /// the MAC from another address gets nothing (the kernel drops its upload as
    /// `drop_spoofed`). At most one IPv4 and [`MAX_BOUND_V6`] IPv6 addresses are kept, in
    /// that order; link-local, multicast, loopback and unspecified addresses are left out (a
    /// link-local source reaches only the gateway itself). A family with nothing bound is
    /// not restricted. Returns what was bound.
    pub fn bind(
        &self,
        mac: MacAddr,
        addrs: &[std::net::IpAddr],
    ) -> Result<Vec<std::net::IpAddr>, ChandlerError> {
        if !self.cfg.bind_payer {
            return Ok(Vec::new());
        }
        let chosen = bind_set(addrs);
        let _g = self.guard();
        let open = self.gates.gate(mac)?.is_some_and(|g| g.open);
        if !open {
            return Ok(Vec::new());
        }
        // Durable first: a restart that loses the kernel's maps rebinds from the store.
        self.store.set_binding(mac, &chosen)?;
        self.gates.bind(mac, &chosen)?;
        tracing::info!(%mac, addresses = ?chosen, "gate bound to the addresses the payment came from");
        Ok(chosen)
    }

    /// The addresses a reopened gate is bound to again (none when binding is off).
    fn stored_binding(&self, mac: MacAddr) -> Result<Vec<std::net::IpAddr>, ChandlerError> {
        if !self.cfg.bind_payer {
            return Ok(Vec::new());
        }
        Ok(self.store.binding(mac)?)
    }

    /// Start-up: an open gate kept by the kernel runs at the session's rates (its own, or the
    /// default tier's as configured now). Returns whether they had to be set.
    fn restore_rates(
        &self,
        row: &SessionRow,
        gate: Option<&GateState>,
    ) -> Result<bool, ChandlerError> {
        let want = match row.rates {
            Some(r) => Some(r.rates),
            None => self
                .tiers
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|t| t.default_tier().rates),
        };
        match (want, gate) {
            (Some(w), Some(g)) if g.open && g.rates != w => {
                self.gates.set_rate(row.mac, w)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Start-up reconciliation's open of a stored session: `allowance` plus the binding stored
    /// with it.
    fn reopen_bound(&self, mac: MacAddr, allowance: Allowance) -> Result<GateState, ChandlerError> {
        let bound = self.stored_binding(mac)?;
        let st = self.gates.open(
            mac,
            Allowance {
                bind_ipv4: first_v4(&bound),
                ..allowance
            },
        )?;
        self.restore_v6_binding(mac, &bound)?;
        Ok(st)
    }

    /// After an open (which replaces the policy and binds IPv4 only, from the allowance):
    /// the IPv6 part of a stored binding back in place.
    fn restore_v6_binding(
        &self,
        mac: MacAddr,
        bound: &[std::net::IpAddr],
    ) -> Result<(), ChandlerError> {
        if bound.iter().any(|a| a.is_ipv6()) {
            self.gates.bind(mac, bound)?;
        }
        Ok(())
    }

    /// Evicts kernel entries of closed gates (see [`Gates::sweep`]). Under the guard, so no
    /// grant is between reading a gate and opening it while its entry goes.
    pub fn sweep(&self) -> Result<crate::valve::SweepReport, ChandlerError> {
        let _g = self.guard();
        Ok(self.gates.sweep(self.cfg.closed_retention)?)
    }

    /// Background task: consumes exhaustion events, snapshots usage and sweeps closed kernel
    /// entries until `shutdown` flips.
    pub async fn run(
        self: Arc<Self>,
        mut exhaustion: mpsc::Receiver<Exhaustion>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(
            self.cfg
                .usage_snapshot_interval
                .max(Duration::from_millis(100)),
        );
        // Often enough that an entry outlives its retention by at most a quarter of it.
        let mut spoofed = self.gates.spoofed_drops().unwrap_or(0);
        let mut sweep = tokio::time::interval(
            (self.cfg.closed_retention / 4)
                .clamp(Duration::from_millis(250), Duration::from_secs(30)),
        );
        loop {
            tokio::select! {
                ev = exhaustion.recv() => match ev {
                    Some(ev) => {
                        // Kernel maps + SQLite (maybe an fsync): off the async workers.
                        let c = self.clone();
                        match tokio::task::spawn_blocking(move || c.on_exhaustion(ev)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                tracing::error!(mac = %ev.mac, error = %e, "recording exhaustion")
                            }
                            Err(e) => tracing::error!(error = %e, "exhaustion task"),
                        }
                    }
                    None => {
                        // The valve stopped; keep snapshotting until shutdown (a closed
                        // channel means shutdown too).
                        if shutdown.changed().await.is_err() {
                            tracing::debug!("shutdown sender gone");
                        }
                        break;
                    }
                },
                _ = tick.tick() => {
                    let c = self.clone();
                    match tokio::task::spawn_blocking(move || c.snapshot_all()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "usage snapshot"),
                        Err(e) => tracing::warn!(error = %e, "usage snapshot task"),
                    }
                    // MAC cloning shows as drops of a bound MAC's packets from elsewhere.
                    if let Ok(now) = self.gates.spoofed_drops() {
                        if now > spoofed {
                            tracing::warn!(
                                packets = now - spoofed,
                                total = now,
                                "packets from a paid MAC with another source address dropped \
                                 (a cloned MAC or a spoofed address)"
                            );
                        }
                        spoofed = now;
                    }
                }
                _ = sweep.tick() => {
                    // A walk of the whole table (≈ 1 s at 1 000 000 clients): off the runtime's
                    // threads, like the snapshot.
                    let c = self.clone();
                    match tokio::task::spawn_blocking(move || c.sweep()).await {
                        Ok(Ok(r)) if r.evicted > 0 => tracing::info!(
                            evicted = r.evicted,
                            occupied = r.occupied,
                            capacity = r.capacity,
                            "closed client entries evicted"
                        ),
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "sweeping closed client entries"),
                        Err(e) => tracing::warn!(error = %e, "sweep task"),
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        if let Err(e) = self.snapshot_all() {
            tracing::warn!(error = %e, "final usage snapshot");
        }
        // Shutdown ends no session: the kernel keeps enforcing what was paid for. Say so
        // per session, so the log shows what happened to each one.
        if let Ok(rows) = self.store.active_sessions() {
            for r in &rows {
                tracing::info!(
                    mac = %r.mac,
                    reason = "shutdown",
                    used = r.used_snapshot,
                    allotment = r.allotment,
                    "daemon stopping: session stays open, enforced by the kernel"
                );
            }
        }
    }
}

/// A session's tier as it was bought: its name and the price factor paid (rates are the
/// row's own).
fn active_tier(row: &SessionRow) -> Tier {
    Tier {
        name: row
            .tier
            .clone()
            .unwrap_or_else(|| crate::tiers::DEFAULT_TIER.into()),
        rates: SessionRates::own(row.rates).unwrap_or_default(),
        factor: row.price_factor.max(1),
    }
}

/// The tier named `name` (`None`, or one no longer configured: the default).
fn tier_of<'a>(tiers: &'a Tiers, name: Option<&str>) -> &'a Tier {
    tiers.get(name).unwrap_or_else(|| tiers.default_tier())
}

/// A session's tier and rates from now on: those of `tier` (the default tier: `None`, its
/// rates follow the configuration).
fn set_tier(row: &mut SessionRow, tier: &Tier) {
    row.price_factor = tier.factor;
    if tier.is_default() {
        row.tier = None;
        row.rates = None;
    } else {
        row.tier = Some(tier.name.clone());
        row.rates = Some(SessionRates {
            rates: tier.rates,
            source: RateSource::Tier,
        });
    }
}

/// What [`Chandler::bind`] keeps of `addrs`: at most one IPv4 and [`MAX_BOUND_V6`] IPv6
/// addresses, first come first kept, IPv4-mapped IPv6 as IPv4, without link-local,
/// multicast, loopback, unspecified and duplicate addresses.
fn bind_set(addrs: &[std::net::IpAddr]) -> Vec<std::net::IpAddr> {
    use std::net::IpAddr;
    let mut out: Vec<IpAddr> = Vec::new();
    for a in addrs.iter().map(|a| crate::neighbour::unmap(*a)) {
        let keep = match a {
            IpAddr::V4(v4) => {
                let special = v4.is_link_local()
                    || v4.is_multicast()
                    || v4.is_loopback()
                    || v4.is_unspecified();
                !special && !out.iter().any(|o| o.is_ipv4())
            }
            IpAddr::V6(v6) => {
                let special = v6.is_unicast_link_local()
                    || v6.is_multicast()
                    || v6.is_loopback()
                    || v6.is_unspecified();
                !special && out.iter().filter(|o| o.is_ipv6()).count() < MAX_BOUND_V6
            }
        };
        if keep && !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// The IPv4 address of a binding (what an open's allowance binds atomically).
fn first_v4(bound: &[std::net::IpAddr]) -> Option<std::net::Ipv4Addr> {
    bound.iter().find_map(|a| match a {
        std::net::IpAddr::V4(v4) => Some(*v4),
        std::net::IpAddr::V6(_) => None,
    })
}

/// An in-memory [`Gates`] for unit tests (the real valve is tested against the kernel).
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use crate::valve::ClientUsage;

    #[derive(Default)]
    pub struct FakeGates {
        pub inner: Mutex<FakeInner>,
    }

    #[derive(Default)]
    pub struct FakeInner {
        pub now: u64,
        pub gates: HashMap<MacAddr, GateState>,
        pub full: bool,
        /// `check` passes but `open` fails (the map filled between pre-flight and open).
        pub fail_open: bool,
        pub opens: u32,
        pub extends: u32,
        /// IPv6 addresses bound per MAC (GateState shows only the IPv4 one).
        pub bound_v6: HashMap<MacAddr, Vec<std::net::Ipv6Addr>>,
        /// The valve's default rates (a gate opened without its own).
        pub default_rates: Rates,
        pub set_rates: u32,
        /// Runs once, after the next listing was taken and before it is returned (what
        /// happens between a listing and its use).
        pub after_listing: Option<Box<dyn FnOnce() + Send>>,
    }

    impl FakeGates {
        pub fn new() -> Self {
            let f = FakeGates::default();
            f.inner.lock().expect("lock").now = 1_000_000_000_000;
            f
        }
        pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeInner> {
            self.inner.lock().expect("fake gates lock")
        }
        /// Simulates traffic: counters up, remaining down.
        pub fn traffic(&self, mac: MacAddr, bytes: u64) {
            let mut i = self.lock();
            let g = i.gates.entry(mac).or_insert(GateState {
                mac,
                open: false,
                remaining_bytes: None,
                until_boot_ns: None,
                bound_ipv4: None,
                generation: 0,
                usage: ClientUsage::default(),
                rates: Default::default(),
            });
            g.usage.bytes_down += bytes;
            if let Some(r) = g.remaining_bytes.as_mut() {
                *r = r.saturating_sub(bytes);
                if *r == 0 {
                    g.open = false;
                }
            }
        }
        pub fn advance_ms(&self, ms: u64) {
            self.lock().now += ms * NS_PER_MS;
        }
    }

    impl Gates for FakeGates {
        fn check(&self, mac: MacAddr) -> Result<(), ValveError> {
            if self.lock().full {
                return Err(ValveError::Full { mac, capacity: 0 });
            }
            Ok(())
        }
        fn open(&self, mac: MacAddr, a: Allowance) -> Result<GateState, ValveError> {
            let mut i = self.lock();
            if i.full || i.fail_open {
                return Err(ValveError::Full { mac, capacity: 0 });
            }
            i.opens += 1;
            // Like the kernel's: an open replaces the policy, IPv6 binding included.
            i.bound_v6.remove(&mac);
            let prev = i.gates.get(&mac).copied();
            // Like the valve's: a top-up of an open gate keeps its rate.
            let rates = match (a.rates, prev) {
                (Some(r), _) => r,
                (None, Some(p)) if p.open => p.rates,
                (None, _) => i.default_rates,
            };
            let g = GateState {
                mac,
                open: true,
                remaining_bytes: a.bytes,
                until_boot_ns: a.until_boot_ns,
                bound_ipv4: a.bind_ipv4,
                generation: prev.map_or(1, |p| p.generation + 1),
                usage: prev.map(|p| p.usage).unwrap_or_default(),
                rates,
            };
            i.gates.insert(mac, g);
            Ok(g)
        }
        fn extend(
            &self,
            mac: MacAddr,
            add_bytes: u64,
            add_ns: u64,
        ) -> Result<GateState, ValveError> {
            let mut i = self.lock();
            i.extends += 1;
            let now = i.now;
            let g = i
                .gates
                .get_mut(&mac)
                .ok_or(ValveError::Other("no gate".into()))?;
            g.remaining_bytes = g.remaining_bytes.map(|r| r + add_bytes);
            if g.until_boot_ns.is_some() || add_ns > 0 {
                g.until_boot_ns = Some(topup_end(now, g.until_boot_ns, add_ns));
            }
            g.generation += 1;
            g.open = true;
            Ok(*g)
        }
        fn close(&self, mac: MacAddr) -> Result<(), ValveError> {
            if let Some(g) = self.lock().gates.get_mut(&mac) {
                g.open = false;
            }
            Ok(())
        }
        fn set_rate(&self, mac: MacAddr, rates: Rates) -> Result<GateState, ValveError> {
            let mut i = self.lock();
            i.set_rates += 1;
            let g = i
                .gates
                .get_mut(&mac)
                .filter(|g| g.open)
                .ok_or(ValveError::Other(format!("gate of {mac} is not open")))?;
            g.rates = rates;
            Ok(*g)
        }
        fn bind_ipv4(
            &self,
            mac: MacAddr,
            ip: Option<std::net::Ipv4Addr>,
        ) -> Result<(), ValveError> {
            if let Some(g) = self.lock().gates.get_mut(&mac) {
                g.bound_ipv4 = ip;
            }
            Ok(())
        }
        fn bind(&self, mac: MacAddr, addrs: &[std::net::IpAddr]) -> Result<(), ValveError> {
            let mut i = self.lock();
            let Some(g) = i.gates.get_mut(&mac) else {
                return Err(ValveError::Other(format!("no gate for {mac} to bind")));
            };
            g.bound_ipv4 = addrs.iter().find_map(|a| match a {
                std::net::IpAddr::V4(v4) => Some(*v4),
                std::net::IpAddr::V6(_) => None,
            });
            let v6 = addrs
                .iter()
                .filter_map(|a| match a {
                    std::net::IpAddr::V6(v6) => Some(*v6),
                    std::net::IpAddr::V4(_) => None,
                })
                .collect();
            i.bound_v6.insert(mac, v6);
            Ok(())
        }
        fn spoofed_drops(&self) -> Result<u64, ValveError> {
            Ok(0)
        }
        fn sweep(&self, _retention: Duration) -> Result<crate::valve::SweepReport, ValveError> {
            let mut i = self.lock();
            let before = i.gates.len();
            i.gates.retain(|_, g| g.open);
            Ok(crate::valve::SweepReport {
                evicted: (before - i.gates.len()) as u32,
                occupied: i.gates.len() as u32,
                capacity: u32::MAX,
            })
        }
        fn gate(&self, mac: MacAddr) -> Result<Option<GateState>, ValveError> {
            Ok(self.lock().gates.get(&mac).copied())
        }
        fn gates(&self) -> Result<Vec<GateState>, ValveError> {
            let listed = self.lock().gates.values().copied().collect();
            let hook = self.lock().after_listing.take();
            if let Some(hook) = hook {
                hook();
            }
            Ok(listed)
        }
        fn now_boot_ns(&self) -> u64 {
            self.lock().now
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fake::FakeGates, *};

    fn mac() -> MacAddr {
        "02:00:00:00:00:01".parse().expect("mac")
    }

    fn chandler(metric: Metric) -> (Arc<FakeGates>, Arc<Store>, Chandler) {
        let gates = Arc::new(FakeGates::new());
        let store = Arc::new(Store::open_in_memory().expect("db"));
        let c = Chandler::new(
            ChandlerConfig {
                metric,
                usage_snapshot_interval: Duration::from_secs(1),
                closed_retention: Duration::from_secs(60),
                bind_payer: true,
            },
            gates.clone(),
            store.clone(),
        );
        (gates, store, c)
    }

    #[test]
    fn topup_arithmetic() {
        assert_eq!(topup_end(100, None, 10), 110);
        assert_eq!(
            topup_end(100, Some(50), 10),
            110,
            "expired end counts from now"
        );
        assert_eq!(topup_end(100, Some(150), 10), 160, "adds to what remains");
        assert_eq!(topup_end(u64::MAX, Some(1), 10), u64::MAX);
        assert_eq!(topup_bytes(1000, 400, 500), 1100);
        assert_eq!(
            topup_bytes(1000, 1200, 500),
            500,
            "overuse never goes negative"
        );
    }

    #[test]
    fn bytes_topup_keeps_usage() {
        let (gates, _store, c) = chandler(Metric::Bytes);
        let v = c.add(mac(), 1000, None, Action::Grant).expect("open");
        assert_eq!((v.allotment, v.used, v.remaining), (1000, 0, 1000));
        gates.traffic(mac(), 400);
        let v = c.usage(mac()).expect("usage").expect("session");
        assert_eq!((v.used, v.remaining), (400, 600));
        // Top-up while open: extend, no interruption, used stays used.
        let v = c.add(mac(), 500, None, Action::Grant).expect("extend");
        assert_eq!((v.allotment, v.used, v.remaining), (1500, 400, 1100));
        assert_eq!(gates.lock().extends, 1);
        assert_eq!(gates.lock().gates[&mac()].remaining_bytes, Some(1100));
    }

    #[test]
    fn bytes_exhaustion_then_new_session() {
        let (gates, _store, c) = chandler(Metric::Bytes);
        c.add(mac(), 100, None, Action::Grant).expect("open");
        gates.traffic(mac(), 100);
        let g = gates.lock().gates[&mac()];
        c.on_exhaustion(Exhaustion {
            mac: mac(),
            reason: ExhaustReason::Quota,
            generation: g.generation,
            usage: g.usage,
            at_boot_ns: 0,
        })
        .expect("exhaustion");
        let v = c.usage(mac()).expect("usage").expect("row");
        assert!(!v.active);
        assert_eq!(v.close_reason, Some(Action::Quota));
        let v = c.add(mac(), 300, None, Action::Grant).expect("new session");
        assert_eq!((v.allotment, v.used, v.remaining), (300, 0, 300));
        assert_eq!(gates.lock().gates[&mac()].remaining_bytes, Some(300));
    }

    #[test]
    fn stale_exhaustion_is_ignored() {
        let (gates, _store, c) = chandler(Metric::Bytes);
        c.add(mac(), 100, None, Action::Grant).expect("open");
        let g1 = gates.lock().gates[&mac()].generation;
        c.add(mac(), 100, None, Action::Grant).expect("extend");
        c.on_exhaustion(Exhaustion {
            mac: mac(),
            reason: ExhaustReason::Quota,
            generation: g1,
            usage: Default::default(),
            at_boot_ns: 0,
        })
        .expect("stale");
        assert!(c.usage(mac()).expect("usage").expect("row").active);
    }

    #[test]
    fn time_topup_adds_to_remaining() {
        let (gates, _store, c) = chandler(Metric::Milliseconds);
        let start = gates.now_boot_ns();
        c.add(mac(), 60_000, None, Action::Grant).expect("open");
        assert_eq!(
            gates.lock().gates[&mac()].until_boot_ns,
            Some(start + 60_000 * NS_PER_MS)
        );
        gates.advance_ms(20_000);
        let v = c.usage(mac()).expect("usage").expect("row");
        assert_eq!((v.used, v.remaining), (20_000, 40_000));
        let v = c.add(mac(), 30_000, None, Action::Grant).expect("extend");
        assert_eq!((v.allotment, v.used, v.remaining), (90_000, 20_000, 70_000));
        assert_eq!(
            gates.lock().gates[&mac()].until_boot_ns,
            Some(start + 90_000 * NS_PER_MS)
        );
    }

    /// A gate reopened at start-up (the kernel lost its maps: a reboot) is bound again to
    /// the addresses the device paid from (IPv4 and IPv6); a top-up that replaces the policy
    /// keeps them; a later payment from IPv6 only forgets the IPv4 binding; with binding off
    /// nothing is bound.
    #[test]
    fn reconcile_and_top_ups_rebind_a_reopened_gate() {
        let ip = |s: &str| -> std::net::IpAddr { s.parse().expect("ip") };
        let v6 = |s: &[&str]| -> Vec<std::net::Ipv6Addr> {
            s.iter().map(|a| a.parse().expect("v6")).collect()
        };
        for metric in [Metric::Bytes, Metric::Milliseconds] {
            let (gates, store, c) = chandler(metric);
            c.add(mac(), 100_000, None, Action::Grant).expect("open");
            let bound = c
                .bind(
                    mac(),
                    &[
                        ip("::ffff:10.0.0.7"),
                        ip("fe80::1"),
                        ip("fd00::7"),
                        ip("10.0.0.8"),
                        ip("fd00::7"),
                        ip("2001:db8::1"),
                        ip("2001:db8::2"),
                        ip("2001:db8::3"),
                        ip("2001:db8::4"),
                    ],
                )
                .expect("bind");
            assert_eq!(
                bound,
                vec![
                    ip("10.0.0.7"),
                    ip("fd00::7"),
                    ip("2001:db8::1"),
                    ip("2001:db8::2"),
                    ip("2001:db8::3")
                ],
                "one IPv4, at most MAX_BOUND_V6 IPv6, no link-local, no duplicate"
            );
            let check = |what: &str| {
                let i = gates.lock();
                assert_eq!(
                    i.gates[&mac()].bound_ipv4,
                    Some("10.0.0.7".parse().expect("ip")),
                    "{metric:?}: {what}"
                );
                assert_eq!(
                    i.bound_v6.get(&mac()).cloned().unwrap_or_default(),
                    v6(&["fd00::7", "2001:db8::1", "2001:db8::2", "2001:db8::3"]),
                    "{metric:?}: {what}"
                );
            };
            check("bound");
            gates.lock().gates.remove(&mac());
            gates.lock().bound_v6.remove(&mac());
            let r = c.reconcile().expect("reconcile");
            assert_eq!(r.reopened, vec![mac()], "{metric:?}");
            check("the reopened gate is bound again");
            // A top-up that replaces the policy (time sessions always do) keeps the binding.
            c.add(mac(), 1_000, None, Action::Grant).expect("top-up");
            check("a top-up keeps the binding");

            c.bind(mac(), &[ip("fd00::9")]).expect("bind v6 only");
            assert_eq!(store.binding(mac()).expect("binding"), vec![ip("fd00::9")]);
            gates.lock().gates.remove(&mac());
            c.reconcile().expect("reconcile");
            assert_eq!(gates.lock().gates[&mac()].bound_ipv4, None, "{metric:?}");
            assert_eq!(
                gates.lock().bound_v6[&mac()],
                v6(&["fd00::9"]),
                "{metric:?}"
            );
        }
        let (gates, store, c) = chandler(Metric::Bytes);
        store
            .set_binding(mac(), &[ip("10.0.0.7"), ip("fd00::7")])
            .expect("stale binding");
        let c = Chandler::new(
            ChandlerConfig {
                bind_payer: false,
                ..c.cfg.clone()
            },
            gates.clone(),
            store.clone(),
        );
        c.add(mac(), 100_000, None, Action::Grant).expect("open");
        gates.lock().gates.remove(&mac());
        c.reconcile().expect("reconcile");
        assert_eq!(gates.lock().gates[&mac()].bound_ipv4, None, "binding off");
        assert!(!gates.lock().bound_v6.contains_key(&mac()), "binding off");
    }

    /// A payment lands while the usage snapshot lists the gates: it is not held up by the
    /// listing, and the snapshot does not judge the new session by the gate as listed. The
    /// hard case: the device's old session ended, its entry went and came back with zeroed
    /// counters, and the listed gate would charge the new session the old one's 990 bytes
    /// (and, were the new allotment below that, close it).
    #[test]
    fn a_grant_during_the_snapshots_listing_is_neither_blocked_nor_closed() {
        use std::sync::mpsc;
        let (gates, store, c) = chandler(Metric::Bytes);
        c.add(mac(), 1000, None, Action::Grant).expect("open");
        gates.traffic(mac(), 990);
        let (listed_tx, listed_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        gates.lock().after_listing = Some(Box::new(move || {
            listed_tx.send(()).expect("listed");
            // Bounded, so the test fails rather than hangs if the grant cannot get in.
            go_rx.recv_timeout(Duration::from_secs(10)).ok();
        }));
        std::thread::scope(|sc| {
            let snap = sc.spawn(|| c.snapshot_all());
            listed_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the snapshot listed");
            let (done_tx, done_rx) = mpsc::channel();
            let (c, gates) = (&c, &gates);
            let grant = sc.spawn(move || {
                c.close(mac(), Action::AdminClose).expect("close");
                // Evicted and created again: the same MAC, counters from zero.
                gates.lock().gates.get_mut(&mac()).expect("gate").usage = Default::default();
                let v = c
                    .add(mac(), 2000, None, Action::Grant)
                    .expect("new session");
                done_tx.send(()).ok();
                v
            });
            let in_time = done_rx.recv_timeout(Duration::from_secs(5)).is_ok();
            go_tx.send(()).ok();
            snap.join().expect("snapshot thread").expect("snapshot");
            let v = grant.join().expect("grant thread");
            assert!(in_time, "the grant waited for the snapshot's listing");
            assert_eq!((v.allotment, v.used), (2000, 0));
        });
        let row = store.session(mac()).expect("row").expect("a session");
        assert!(
            row.active,
            "the new session was closed by a stale gate: {row:?}"
        );
        assert_eq!(
            (row.allotment, row.used_snapshot),
            (2000, 0),
            "the old session's bytes charged to the new one"
        );
        assert!(gates.lock().gates[&mac()].open);
    }

    #[test]
    fn reconcile_no_free_access_no_lost_allotment() {
        let (gates, store, c) = chandler(Metric::Bytes);
        let stranger: MacAddr = "02:00:00:00:00:99".parse().expect("mac");
        c.add(mac(), 1000, None, Action::Grant).expect("open");
        gates.traffic(mac(), 300);
        c.snapshot_all().expect("snapshot");
        // Kernel open for a MAC without a session: free access, must close.
        gates.open(stranger, Allowance::default()).expect("open");
        // Kernel lost our gate (reboot): counters gone.
        gates.lock().gates.remove(&mac());
        let r = c.reconcile().expect("reconcile");
        assert_eq!(r.closed_without_session, vec![stranger]);
        assert_eq!(r.reopened, vec![mac()]);
        assert!(!gates.lock().gates[&stranger].open);
        assert_eq!(
            gates.lock().gates[&mac()].remaining_bytes,
            Some(700),
            "used stays used"
        );
        // A second reconcile is a no-op.
        let r = c.reconcile().expect("again");
        assert!(r.reopened.is_empty() && r.closed_without_session.is_empty());
        // A kernel that gives more than the DB says gets trimmed.
        gates
            .lock()
            .gates
            .get_mut(&mac())
            .expect("gate")
            .remaining_bytes = Some(5000);
        let r = c.reconcile().expect("trim");
        assert_eq!(r.reopened, vec![mac()]);
        assert_eq!(gates.lock().gates[&mac()].remaining_bytes, Some(700));
        // DB says closed but the kernel is open: close.
        c.close(mac(), Action::AdminClose).expect("close");
        gates.lock().gates.get_mut(&mac()).expect("gate").open = true;
        c.reconcile().expect("close stray");
        assert!(!gates.lock().gates[&mac()].open);
        assert_eq!(
            store.log(mac(), 1).expect("log")[0].action,
            Action::AdminClose
        );
    }

    /// Rewrites the stored row as a previous boot left it (boot id, deadlines as written then).
    fn from_previous_boot(store: &Store, end_unix_ms: Option<u64>) {
        let mut row = store.session(mac()).expect("get").expect("row");
        row.boot_id = "previous-boot".into();
        row.end_boot_ns = Some(u64::MAX / 2);
        if end_unix_ms.is_some() {
            row.end_unix_ms = end_unix_ms;
        }
        let log = LogEntry {
            mac: mac(),
            action: Action::Reconcile,
            amount: 0,
            detail: String::new(),
        };
        store.commit_session(&row, None, &log).expect("commit");
    }

    /// Reboot: the boot clock restarts, kernel state is gone, the boot id changes.
    fn reboot(gates: &FakeGates) {
        let mut g = gates.lock();
        g.gates.clear();
        g.now = 5_000_000_000;
    }

    #[test]
    fn time_session_survives_reboot() {
        let (gates, store, c) = chandler(Metric::Milliseconds);
        c.add(mac(), 60_000, None, Action::Grant).expect("open");
        gates.advance_ms(20_000);
        c.snapshot_all().expect("snapshot");
        reboot(&gates);
        from_previous_boot(&store, None);
        let r = c.reconcile().expect("reconcile");
        assert_eq!(r.reopened, vec![mac()]);
        let end = gates.lock().gates[&mac()].until_boot_ns.expect("deadline");
        assert_eq!(
            (end - 5_000_000_000) / NS_PER_MS,
            40_000,
            "what remained at the last snapshot"
        );
        // Used up before the reboot: closed, not reopened.
        c.snapshot_all().expect("snapshot");
        let mut row = store.session(mac()).expect("get").expect("row");
        row.used_snapshot = row.allotment;
        store
            .commit_session(
                &row,
                None,
                &LogEntry {
                    mac: mac(),
                    action: Action::Reconcile,
                    amount: 0,
                    detail: String::new(),
                },
            )
            .expect("commit");
        from_previous_boot(&store, None);
        let r = c.reconcile().expect("reconcile");
        assert_eq!(r.expired, vec![mac()]);
        assert!(!gates.lock().gates[&mac()].open);
    }

    /// Issue 11: the wall clock at start (no NTP yet on a router) differs wildly from the one
    /// the deadline was written with — years behind, or years ahead. Neither shortens nor
    /// lengthens the session: 40 s remained at the last snapshot, 40 s it gets.
    #[test]
    fn a_wall_clock_jump_at_start_neither_shortens_nor_lengthens_sessions() {
        for (what, written_end_unix_ms) in [
            // Written by a clock far ahead of today's (today's looks like the distant past).
            (
                "clock behind at start",
                crate::sys::clock::unix_ms() + 10 * 365 * 86_400_000,
            ),
            // Written by a clock far behind today's (1970: an unset RTC then, NTP now).
            ("clock ahead at start", 1),
        ] {
            let (gates, store, c) = chandler(Metric::Milliseconds);
            c.add(mac(), 60_000, None, Action::Grant).expect("open");
            gates.advance_ms(20_000);
            c.snapshot_all().expect("snapshot");
            reboot(&gates);
            from_previous_boot(&store, Some(written_end_unix_ms));
            c.reconcile().expect("reconcile");
            let g = gates.lock().gates[&mac()];
            assert!(g.open, "{what}: session still open");
            let left_ms = (g.until_boot_ns.expect("deadline") - 5_000_000_000) / NS_PER_MS;
            assert_eq!(left_ms, 40_000, "{what}");
        }
    }

    /// Issue 10 item 6: the kernel is changed before the database commit. When the commit
    /// fails and the grant is applied again, the kernel must end where the database does —
    /// not with the grant credited twice.
    #[test]
    fn a_grant_retried_after_a_failed_commit_is_credited_once() {
        for metric in [Metric::Milliseconds, Metric::Bytes] {
            let (gates, store, c) = chandler(metric);
            c.add(mac(), 60_000, None, Action::Grant).expect("open");
            gates.traffic(mac(), 10_000);
            gates.advance_ms(10_000);
            store.execute_batch_for_test(
                "CREATE TRIGGER fail_commit BEFORE UPDATE ON sessions
                 BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
            );
            c.add(mac(), 30_000, None, Action::Grant)
                .expect_err("the commit fails");
            store.execute_batch_for_test("DROP TRIGGER fail_commit;");
            let v = c.add(mac(), 30_000, None, Action::Grant).expect("retried");
            assert_eq!(v.allotment, 90_000, "{metric:?}");
            let g = gates.lock().gates[&mac()];
            let row = store.session(mac()).expect("get").expect("row");
            match metric {
                Metric::Milliseconds => {
                    let start = 1_000_000_000_000;
                    assert_eq!(g.until_boot_ns, row.end_boot_ns, "kernel = database");
                    assert_eq!(g.until_boot_ns, Some(start + 90_000 * NS_PER_MS));
                }
                Metric::Bytes => {
                    assert_eq!(
                        g.remaining_bytes,
                        Some(90_000 - 10_000),
                        "kernel = database"
                    );
                }
            }
        }
    }

    /// The retention soak (issue 11), in-process: the store on a real file with an injected
    /// wall clock, the chandler with the fake gates. 10 000 sessions are opened, used and
    /// closed while 24 h of 60 s snapshot ticks run over ~50 live sessions; the database
    /// stays under a fixed size (before: a history row per session per tick, ≈ 72 000 rows);
    /// 31 days later the closed history is pruned and active sessions are untouched.
    #[test]
    fn soak_10000_sessions_and_24h_of_ticks_stay_bounded() {
        use std::sync::atomic::{AtomicU64, Ordering};
        // A real file; in RAM when the machine has /dev/shm (the test measures rows and pages,
        // not the disk).
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("tempdir");
        let unix = Arc::new(AtomicU64::new(1_800_000_000));
        let clock = unix.clone();
        let store = Arc::new(
            Store::open(&dir.path().join("tollgate.sqlite"))
                .expect("db")
                .with_clock(Arc::new(move || clock.load(Ordering::Relaxed))),
        );
        let gates = Arc::new(FakeGates::new());
        let c = Chandler::new(
            ChandlerConfig {
                metric: Metric::Bytes,
                usage_snapshot_interval: Duration::from_secs(TICK_S),
                closed_retention: Duration::from_secs(60),
                bind_payer: true,
            },
            gates.clone(),
            store.clone(),
        );
        let mac_of = |n: u32| {
            let b = n.to_be_bytes();
            MacAddr([0x02, 0x00, b[0], b[1], b[2], b[3]])
        };
        const TICK_S: u64 = 60; // a router's snapshot interval; 10 s only multiplies the work
        const TICKS: u32 = (24 * 3_600 / TICK_S) as u32;
        const SESSIONS: u32 = 10_000;
        const LIVE: u32 = 50;
        let (mut opened, mut closed) = (0u32, 0u32);
        for tick in 0..TICKS {
            // Open sessions at the rate that reaches 10 000 in 24 h; close the oldest
            // beyond LIVE (half by quota, half by the operator).
            while opened < (tick + 1) * SESSIONS / TICKS {
                c.add(mac_of(opened), 1_000_000, None, Action::Grant)
                    .expect("open");
                opened += 1;
            }
            while opened - closed > LIVE {
                let m = mac_of(closed);
                if closed % 2 == 0 {
                    // Used up: this tick's snapshot closes it (quota).
                    gates.traffic(m, 1_000_000);
                } else {
                    c.close(m, Action::AdminClose).expect("close");
                }
                closed += 1;
            }
            for n in closed..opened {
                gates.traffic(mac_of(n), 10);
            }
            gates.advance_ms(TICK_S * 1_000);
            unix.fetch_add(TICK_S, Ordering::Relaxed);
            c.snapshot_all().expect("tick");
        }
        assert_eq!(opened, SESSIONS);
        let size = store.size_bytes().expect("size");
        let [sessions, log, snapshots, grants] = store.row_counts().expect("counts");
        eprintln!("after 24 h: {size} bytes; rows: {sessions} sessions, {log} log, {snapshots} snapshots, {grants} grants");
        // ≤ 1 history row per device per hour it was live, not 1 per tick.
        assert!(
            snapshots <= u64::from(SESSIONS) + u64::from(LIVE) * 25,
            "{snapshots}"
        );
        assert!(size < 6 * 1024 * 1024, "database {size} bytes after 24 h");
        // 31 days later: everything closed is history past the retention.
        unix.fetch_add(31 * 86_400, Ordering::Relaxed);
        gates.advance_ms(31 * 86_400_000);
        *c.last_prune.lock().expect("lock") = None;
        for n in closed..opened {
            gates.traffic(mac_of(n), 1);
        }
        c.snapshot_all().expect("prune tick");
        let [sessions, log, snapshots, _] = store.row_counts().expect("counts");
        assert_eq!(sessions, u64::from(LIVE), "only the live sessions remain");
        assert_eq!(log, 0, "log lines older than 30 days are gone");
        assert_eq!(
            snapshots,
            u64::from(LIVE),
            "one fresh history row per live session"
        );
        assert!(store.active_sessions().expect("active").len() == LIVE as usize);
        let after = store.size_bytes().expect("size");
        eprintln!("after pruning: {after} bytes");
        assert!(after < size, "pruning frees pages ({after} vs {size})");
    }

    /// Issue 15 item 1: rates set by the operator and rates of a tier are stored with the
    /// session; a reboot (kernel state gone) reopens each gate at its own rates, and a
    /// restart that finds the gate open at other rates sets them back. A default-tier
    /// session follows the configured default.
    #[test]
    fn stored_rates_survive_restart_and_reboot() {
        for metric in [Metric::Bytes, Metric::Milliseconds] {
            let (gates, store, c) = chandler(metric);
            let default = Rates {
                down_kbit: 3_000,
                up_kbit: 1_000,
            };
            let fast = Rates {
                down_kbit: 20_000,
                up_kbit: 5_000,
            };
            let c =
                Chandler::new(c.cfg.clone(), gates.clone(), store.clone()).with_tiers(Tiers::new(
                    default,
                    &[crate::tiers::TierSettings {
                        name: "fast".into(),
                        down_kbit: fast.down_kbit,
                        up_kbit: fast.up_kbit,
                        price_factor: 3,
                    }],
                ));
            gates.lock().default_rates = default;
            let (admin, tiered, plain): (MacAddr, MacAddr, MacAddr) = (
                "02:00:00:00:00:0a".parse().expect("mac"),
                "02:00:00:00:00:0b".parse().expect("mac"),
                "02:00:00:00:00:0c".parse().expect("mac"),
            );
            let cli = RateRequest {
                down_kbit: Some(8_000),
                up_kbit: None,
            };
            c.admin_add_with_rates(admin, 60_000, cli).expect("admin");
            let want_admin = Rates {
                down_kbit: 8_000,
                up_kbit: 1_000,
            };
            let price = |factor: u64| Some((1, 60_000 / factor));
            let answer = |_: u64, _: &str| String::new();
            c.add_paid(
                tiered,
                "fast",
                &price,
                GrantCommit {
                    token_id: "t",
                    steps: 0,
                    answer: &answer,
                },
            )
            .expect("fast");
            c.add(plain, 60_000, None, Action::Grant).expect("default");
            let rates_of = |m: MacAddr| gates.lock().gates[&m].rates;
            assert_eq!(rates_of(admin), want_admin, "{metric:?}");
            assert_eq!(rates_of(tiered), fast, "{metric:?}");
            assert_eq!(rates_of(plain), default, "{metric:?}");
            // Restart: the gates are open but at other rates (as the old code left them).
            for m in [admin, tiered, plain] {
                gates.lock().gates.get_mut(&m).expect("gate").rates = Rates::UNLIMITED;
            }
            let r = c.reconcile().expect("reconcile");
            assert_eq!(r.rates_restored.len(), 3, "{metric:?}: {r:?}");
            assert_eq!(rates_of(admin), want_admin, "{metric:?}");
            assert_eq!(rates_of(tiered), fast, "{metric:?}");
            assert_eq!(rates_of(plain), default, "{metric:?}");
            // Reboot: kernel state gone; the valve's default is what a bare open gets.
            reboot(&gates);
            for m in [admin, tiered, plain] {
                let mut row = store.session(m).expect("get").expect("row");
                row.boot_id = "previous-boot".into();
                store
                    .commit_session(
                        &row,
                        None,
                        &LogEntry {
                            mac: m,
                            action: Action::Reconcile,
                            amount: 0,
                            detail: String::new(),
                        },
                    )
                    .expect("commit");
            }
            let r = c.reconcile().expect("reconcile");
            assert_eq!(r.reopened.len(), 3, "{metric:?}: {r:?}");
            assert_eq!(
                rates_of(admin),
                want_admin,
                "{metric:?}: reopened at the CLI rate"
            );
            assert_eq!(
                rates_of(tiered),
                fast,
                "{metric:?}: reopened at the tier's rate"
            );
            assert_eq!(rates_of(plain), default, "{metric:?}");
            let views = c.clients().expect("clients");
            let tier_of = |m: MacAddr| views.iter().find(|v| v.mac == m).expect("v").tier.clone();
            assert_eq!(tier_of(tiered).as_deref(), Some("fast"));
            assert_eq!(tier_of(admin), None);
            // A top-up keeps the operator's rate.
            c.add(admin, 1_000, None, Action::Grant).expect("top-up");
            assert_eq!(rates_of(admin), want_admin, "{metric:?}");
        }
    }

    /// A session from before rates were stored (`Kernel`: the database was migrated) keeps
    /// the rate its open gate has at the next start, and it is stored from then on.
    #[test]
    fn a_migrated_session_adopts_its_gates_rates() {
        let (gates, store, c) = chandler(Metric::Bytes);
        let c = Chandler::new(c.cfg.clone(), gates.clone(), store.clone())
            .with_tiers(Tiers::new(Rates::UNLIMITED, &[]));
        c.add(mac(), 100_000, None, Action::Grant).expect("open");
        let set = Rates {
            down_kbit: 8_000,
            up_kbit: 2_000,
        };
        gates
            .set_rate(mac(), set)
            .expect("the operator's rate, kernel only");
        let mut row = store.session(mac()).expect("get").expect("row");
        row.rates = Some(SessionRates {
            rates: Rates::UNLIMITED,
            source: RateSource::Kernel,
        });
        let log = LogEntry {
            mac: mac(),
            action: Action::Reconcile,
            amount: 0,
            detail: String::new(),
        };
        store.commit_session(&row, None, &log).expect("commit");
        c.reconcile().expect("reconcile");
        assert_eq!(
            gates.lock().gates[&mac()].rates,
            set,
            "not reset to the default"
        );
        let row = store.session(mac()).expect("get").expect("row");
        assert_eq!(SessionRates::own(row.rates), Some(set), "stored now");
        gates.lock().gates.clear();
        c.reconcile().expect("reboot");
        assert_eq!(gates.lock().gates[&mac()].rates, set, "and after a reboot");
    }

    /// What remains is converted at the price factor it was bought at, not at what the config
    /// says of its tier after a reload (a price raise must not shrink what was paid for).
    #[test]
    fn conversion_uses_the_factor_paid_not_the_reloaded_one() {
        let (gates, store, c) = chandler(Metric::Bytes);
        let tier = |name: &str, factor| crate::tiers::TierSettings {
            name: name.into(),
            down_kbit: 0,
            up_kbit: 0,
            price_factor: factor,
        };
        let c = Chandler::new(c.cfg.clone(), gates.clone(), store.clone())
            .with_tiers(Tiers::new(Rates::UNLIMITED, &[tier("fast", 3)]));
        let answer = |_: u64, _: &str| String::new();
        let grant = |id| GrantCommit {
            token_id: id,
            steps: 0,
            answer: &answer,
        };
        // 60 sat at fast (3 sat/step, 1000 bytes/step): 20 steps.
        let p60 = |f: u64| Some((60 / f, 60 / f * 1_000));
        c.add_paid(mac(), "fast", &p60, grant("a")).expect("fast");
        c.set_tiers(Tiers::new(
            Rates::UNLIMITED,
            &[tier("fast", 5), tier("ultra", 6)],
        ))
        .expect("reload");
        // 6 sat at ultra: 1 step; the 20000 fast bytes are worth 20000 × 3 / 6 = 10000.
        let p6 = |f: u64| Some((6 / f, 6 / f * 1_000));
        let v = c.add_paid(mac(), "ultra", &p6, grant("b")).expect("ultra");
        assert_eq!(v.allotment, 11_000, "converted at 3:6, not 5:6");
        let row = store.session(mac()).expect("get").expect("row");
        assert_eq!((row.tier.as_deref(), row.price_factor), (Some("ultra"), 6));
    }

    /// A time session upgraded mid-way: what remains is converted at the price ratio and
    /// counts from now; the new steps are added on top.
    #[test]
    fn a_time_upgrade_converts_what_remains() {
        let (gates, store, c) = chandler(Metric::Milliseconds);
        let c = Chandler::new(c.cfg.clone(), gates.clone(), store).with_tiers(Tiers::new(
            Rates::UNLIMITED,
            &[crate::tiers::TierSettings {
                name: "fast".into(),
                down_kbit: 1,
                up_kbit: 1,
                price_factor: 4,
            }],
        ));
        let answer = |_: u64, _: &str| String::new();
        let grant = |id| GrantCommit {
            token_id: id,
            steps: 0,
            answer: &answer,
        };
        // 100 s bought at the default tier (10 steps of 10 s for 10 sat).
        let price10 = |factor: u64| Some((10 / factor, 10 / factor * 10_000));
        c.add_paid(mac(), "default", &price10, grant("a"))
            .expect("default");
        gates.advance_ms(20_000);
        // 8 sat at "fast" (4 sat/step): 2 steps = 20 s; the 80 s left are worth 20 s.
        let price8 = |factor: u64| Some((8 / factor, 8 / factor * 10_000));
        let v = c
            .add_paid(mac(), "fast", &price8, grant("b"))
            .expect("fast");
        assert_eq!(v.remaining, 40_000, "80 s / 4 + 20 s");
        assert_eq!(v.allotment, 60_000, "20 s used + 40 s");
        let now = gates.now_boot_ns();
        assert_eq!(
            gates.lock().gates[&mac()].until_boot_ns,
            Some(now + 40_000 * NS_PER_MS)
        );
        assert_eq!(gates.lock().gates[&mac()].rates.down_kbit, 1);
    }

    #[test]
    fn admin_actions_are_recorded() {
        let (_gates, store, c) = chandler(Metric::Bytes);
        c.admin_add(mac(), 10).expect("open");
        c.admin_add(mac(), 10).expect("extend");
        let actions: Vec<Action> = store
            .log(mac(), 10)
            .expect("log")
            .into_iter()
            .map(|l| l.action)
            .collect();
        assert_eq!(actions, vec![Action::AdminExtend, Action::AdminOpen]);
        assert_eq!(c.clients().expect("clients").len(), 1);
    }
}
