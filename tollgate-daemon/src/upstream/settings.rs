//! The typed `upstream_session_manager` section.
//!
//! The reference's shape is accepted as is. Fields whose name carries a unit
//! (`…_milliseconds`, `millisecond_renewal_offset`) take an integer in that unit — the
//! reference's own example (`60000` = one minute) would otherwise mean 60 µs — or a duration
//! string such as `"60s"`. Our additions (`poll_interval`, `probe_timeout`, …) follow the rest
//! of config.json: integer nanoseconds or a duration string.

use std::{collections::BTreeSet, time::Duration};

use serde_json::Value;

use super::UpstreamError;
use crate::protocol::Metric;
use crate::units::parse_duration;

/// Who we are willing to pay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrustDefault {
    /// Anyone not blocklisted.
    TrustAll,
    /// Only allowlisted pubkeys.
    TrustNone,
}

/// The validated section.
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamSettings {
    /// Budget in price units (sat) per byte; options above it are refused.
    pub max_price_per_byte: f64,
    /// Budget in price units (sat) per millisecond.
    pub max_price_per_millisecond: f64,
    pub default_policy: TrustDefault,
    /// Lower-case hex x-only pubkeys.
    pub allowlist: BTreeSet<String>,
    pub blocklist: BTreeSet<String>,
    /// How much to buy at once.
    pub preferred_increment_bytes: u64,
    pub preferred_increment_ms: u64,
    /// Renew when the remaining allotment is at or below this.
    pub bytes_renewal_offset: u64,
    pub ms_renewal_offset: u64,
    /// How often the upstream's `/usage` is polled (the reference: every second).
    pub poll_interval: Duration,
    /// Timeout of one probe / payment request, and how many probe tries.
    pub probe_timeout: Duration,
    pub probe_tries: u32,
    /// How long to wait for the answer to a payment: the reference's seller allows 30 s for
    /// its mint swap, so a shorter wait reclaims tokens the upstream is still redeeming.
    pub purchase_timeout: Duration,
    /// Periodic re-check of the default gateway and advertisement, besides netlink events.
    pub recheck_interval: Duration,
    /// Longest wait between failed purchase attempts (doubling from `poll_interval`).
    pub max_backoff: Duration,
    /// Most we pay in one purchase (sat); `None` = derived, see [`Self::purchase_limit`].
    pub max_sat_per_purchase: Option<u64>,
    /// Most we pay in any hour (sat); `None` = derived, see [`Self::hourly_limit`].
    pub max_sat_per_hour: Option<u64>,
    /// After a purchase the upstream kept without a session showing up (`-1/-1` on `/usage`
    /// before any live session, or a token swapped without a valid answer), how long we do
    /// not pay that gateway again.
    pub no_session_backoff: Duration,
    /// Lifetime of the standing renewal hold between extensions. It is extended all the time
    /// (also during a probe or purchase that hangs), so this only bounds how long a hold
    /// outlives a daemon that died without releasing it.
    pub hold_ttl: Duration,
}

impl Default for UpstreamSettings {
    /// The reference's example values.
    fn default() -> Self {
        UpstreamSettings {
            max_price_per_byte: 0.0000373,
            max_price_per_millisecond: 0.0028,
            default_policy: TrustDefault::TrustAll,
            allowlist: BTreeSet::new(),
            blocklist: BTreeSet::new(),
            preferred_increment_bytes: 131_100_000,
            preferred_increment_ms: 60_000,
            bytes_renewal_offset: 131_100_000,
            ms_renewal_offset: 10_000,
            poll_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(10),
            probe_tries: 3,
            purchase_timeout: Duration::from_secs(30),
            recheck_interval: Duration::from_secs(30),
            max_backoff: Duration::from_secs(60),
            max_sat_per_purchase: None,
            max_sat_per_hour: None,
            no_session_backoff: Duration::from_secs(3600),
            hold_ttl: Duration::from_secs(600),
        }
    }
}

fn bad(field: &str, problem: impl Into<String>, fix: &str) -> UpstreamError {
    UpstreamError::Config {
        field: format!("upstream_session_manager.{field}"),
        problem: problem.into(),
        fix: fix.to_string(),
    }
}

fn price(v: &Value, field: &str) -> Result<Option<f64>, UpstreamError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let p = n.as_f64().unwrap_or(f64::NAN);
            if !p.is_finite() || p <= 0.0 {
                return Err(bad(
                    field,
                    format!("{n} is not a positive price"),
                    "give the most you pay per unit in sat, e.g. 0.0000373",
                ));
            }
            Ok(Some(p))
        }
        Some(other) => Err(bad(
            field,
            format!("{other} is not a number"),
            "give the most you pay per unit in sat, e.g. 0.0000373",
        )),
    }
}

/// A non-negative integer in the field's unit, or (`as_ms`) a duration string.
fn amount(v: &Value, field: &str, as_ms: bool) -> Result<Option<u64>, UpstreamError> {
    let fix = if as_ms {
        "give whole milliseconds (e.g. 60000) or a duration like \"60s\""
    } else {
        "give a whole number of bytes, e.g. 131100000"
    };
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(field, format!("{n} is not a non-negative integer"), fix)),
        Some(Value::String(s)) if as_ms => parse_duration(s)
            .map(|d| Some(d.as_millis().min(u64::MAX as u128) as u64))
            .map_err(|p| bad(field, p, fix)),
        Some(other) => Err(bad(field, format!("{other} is not an integer"), fix)),
    }
}

/// Integer nanoseconds or a duration string (our additions).
fn duration(v: &Value, field: &str) -> Result<Option<Duration>, UpstreamError> {
    let fix = "give a duration like \"1s\" or integer nanoseconds";
    let d = match v.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => Duration::from_nanos(
            n.as_u64()
                .ok_or_else(|| bad(field, format!("{n} is not a non-negative integer"), fix))?,
        ),
        Some(Value::String(s)) => parse_duration(s).map_err(|p| bad(field, p, fix))?,
        Some(other) => return Err(bad(field, format!("{other} is not a duration"), fix)),
    };
    if d.is_zero() {
        return Err(bad(field, "must be greater than 0", fix));
    }
    Ok(Some(d))
}

fn pubkeys(v: Option<&Value>, field: &str) -> Result<BTreeSet<String>, UpstreamError> {
    let fix = "list gateway pubkeys as 64 hex characters (x-only, as in the advertisement)";
    let mut out = BTreeSet::new();
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let f = format!("{field}[{i}]");
                let s = item
                    .as_str()
                    .ok_or_else(|| bad(&f, format!("{item} is not a string"), fix))?;
                let s = s.trim().to_ascii_lowercase();
                if nostr::PublicKey::from_hex(&s).is_err() {
                    return Err(bad(&f, format!("{s:?} is not a valid pubkey"), fix));
                }
                out.insert(s);
            }
        }
        Some(other) => return Err(bad(field, format!("{other} is not a list"), fix)),
    }
    Ok(out)
}

impl UpstreamSettings {
    /// Validates the reference's `upstream_session_manager` object (absent = defaults).
    pub fn parse(raw: Option<&Value>) -> Result<UpstreamSettings, UpstreamError> {
        let mut s = UpstreamSettings::default();
        let Some(v) = raw else { return Ok(s) };
        if v.is_null() {
            return Ok(s);
        }
        if !v.is_object() {
            return Err(bad(
                "",
                "not an object",
                "see the README's upstream_session_manager example",
            ));
        }
        if let Some(p) = price(v, "max_price_per_byte")? {
            s.max_price_per_byte = p;
        }
        if let Some(p) = price(v, "max_price_per_millisecond")? {
            s.max_price_per_millisecond = p;
        }
        if let Some(t) = v.get("trust").filter(|t| !t.is_null()) {
            if !t.is_object() {
                return Err(bad(
                    "trust",
                    "not an object",
                    "use {\"default_policy\":\"trust_all\",\"allowlist\":[],\"blocklist\":[]}",
                ));
            }
            s.default_policy = match t.get("default_policy") {
                None | Some(Value::Null) => TrustDefault::TrustAll,
                Some(Value::String(p)) if p == "trust_all" => TrustDefault::TrustAll,
                Some(Value::String(p)) if p == "trust_none" => TrustDefault::TrustNone,
                Some(other) => {
                    return Err(bad(
                        "trust.default_policy",
                        format!("unknown policy {other}"),
                        "use \"trust_all\" or \"trust_none\"",
                    ))
                }
            };
            s.allowlist = pubkeys(t.get("allowlist"), "trust.allowlist")?;
            s.blocklist = pubkeys(t.get("blocklist"), "trust.blocklist")?;
            if let Some(both) = s.allowlist.intersection(&s.blocklist).next() {
                return Err(bad(
                    "trust.blocklist",
                    format!("{both} is on both the allowlist and the blocklist"),
                    "keep each pubkey on one list",
                ));
            }
        }
        if let Some(ses) = v.get("sessions").filter(|t| !t.is_null()) {
            if !ses.is_object() {
                return Err(bad(
                    "sessions",
                    "not an object",
                    "see the README's upstream_session_manager example",
                ));
            }
            let f = |n: &str| format!("sessions.{n}");
            let sub = |n: &str, ms: bool| -> Result<Option<u64>, UpstreamError> {
                amount(ses, n, ms).map_err(|e| match e {
                    UpstreamError::Config { problem, fix, .. } => UpstreamError::Config {
                        field: format!("upstream_session_manager.{}", f(n)),
                        problem,
                        fix,
                    },
                    other => other,
                })
            };
            if let Some(x) = sub("preferred_session_increments_bytes", false)? {
                s.preferred_increment_bytes = x;
            }
            if let Some(x) = sub("preferred_session_increments_milliseconds", true)? {
                s.preferred_increment_ms = x;
            }
            if let Some(x) = sub("bytes_renewal_offset", false)? {
                s.bytes_renewal_offset = x;
            }
            if let Some(x) = sub("millisecond_renewal_offset", true)? {
                s.ms_renewal_offset = x;
            }
            if s.preferred_increment_bytes == 0 {
                return Err(bad(
                    "sessions.preferred_session_increments_bytes",
                    "must be greater than 0",
                    "give how many bytes to buy at once, e.g. 131100000",
                ));
            }
            if s.preferred_increment_ms == 0 {
                return Err(bad(
                    "sessions.preferred_session_increments_milliseconds",
                    "must be greater than 0",
                    "give how long to buy at once, e.g. 60000",
                ));
            }
        }
        if let Some(d) = duration(v, "poll_interval")? {
            s.poll_interval = d;
        }
        if let Some(d) = duration(v, "probe_timeout")? {
            s.probe_timeout = d;
        }
        if let Some(d) = duration(v, "purchase_timeout")? {
            s.purchase_timeout = d;
        }
        if let Some(d) = duration(v, "recheck_interval")? {
            s.recheck_interval = d;
        }
        if let Some(d) = duration(v, "max_backoff")? {
            s.max_backoff = d;
        }
        if let Some(d) = duration(v, "no_session_backoff")? {
            s.no_session_backoff = d;
        }
        if let Some(d) = duration(v, "hold_ttl")? {
            if d < Duration::from_millis(100) {
                return Err(bad(
                    "hold_ttl",
                    format!("{d:?} is too short to keep a hold alive"),
                    "give a duration of at least \"100ms\"; the default is \"10m\"",
                ));
            }
            s.hold_ttl = d;
        }
        for (field, slot) in [
            ("max_sat_per_purchase", &mut s.max_sat_per_purchase),
            ("max_sat_per_hour", &mut s.max_sat_per_hour),
        ] {
            match v.get(field) {
                None | Some(Value::Null) => {}
                Some(n) => match n.as_u64() {
                    Some(x) if x > 0 => *slot = Some(x),
                    _ => {
                        return Err(bad(
                            field,
                            format!("{n} is not a positive whole number of sat"),
                            "omit it for the default derived from the increment and budget",
                        ))
                    }
                },
            }
        }
        match v.get("probe_tries") {
            None | Some(Value::Null) => {}
            Some(n) => match n.as_u64() {
                Some(t @ 1..=10) => s.probe_tries = t as u32,
                _ => {
                    return Err(bad(
                        "probe_tries",
                        format!("{n} is not between 1 and 10"),
                        "omit it for the default (3)",
                    ))
                }
            },
        }
        Ok(s)
    }

    /// The most one purchase may cost (sat): `max_sat_per_purchase`, or by default twice
    /// what the larger of the preferred increment and one renewal lift (`offset + 1`) costs
    /// at the budget price (room for step rounding), at least 1.
    pub fn purchase_limit(&self, metric: Metric) -> u64 {
        if let Some(x) = self.max_sat_per_purchase {
            return x;
        }
        let (units, budget) = self.per_metric(metric);
        (units as f64 * budget * 2.0)
            .ceil()
            .clamp(1.0, u64::MAX as f64) as u64
    }

    /// The most we pay in any rolling hour (sat): `max_sat_per_hour`, or by default an hour
    /// of time at the budget price plus one purchase (milliseconds), or 30 purchases (bytes:
    /// 30 × 131 MB ≈ 9 Mbit/s sustained with the reference's increment).
    pub fn hourly_limit(&self, metric: Metric) -> u64 {
        if let Some(x) = self.max_sat_per_hour {
            return x;
        }
        let one = self.purchase_limit(metric);
        match metric {
            Metric::Milliseconds => {
                let hour = (3_600_000.0 * self.max_price_per_millisecond).ceil();
                (hour.clamp(0.0, u64::MAX as f64) as u64).saturating_add(one)
            }
            Metric::Bytes => one.saturating_mul(30),
        }
    }

    /// (units one purchase buys at most by the increment/offset rule, budget per unit).
    fn per_metric(&self, metric: Metric) -> (u64, f64) {
        match metric {
            Metric::Bytes => (
                self.preferred_increment_bytes
                    .max(self.bytes_renewal_offset.saturating_add(1)),
                self.max_price_per_byte,
            ),
            Metric::Milliseconds => (
                self.preferred_increment_ms
                    .max(self.ms_renewal_offset.saturating_add(1)),
                self.max_price_per_millisecond,
            ),
        }
    }

    /// May we pay this gateway? `Err` says why not.
    pub fn trusts(&self, pubkey_hex: &str) -> Result<(), String> {
        let k = pubkey_hex.to_ascii_lowercase();
        if self.blocklist.contains(&k) {
            return Err(format!("gateway {k} is on the blocklist"));
        }
        match self.default_policy {
            TrustDefault::TrustAll => Ok(()),
            TrustDefault::TrustNone if self.allowlist.contains(&k) => Ok(()),
            TrustDefault::TrustNone => Err(format!(
                "gateway {k} is not on the allowlist (default_policy trust_none)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798";

    fn reference() -> Value {
        json!({"max_price_per_millisecond":0.0028,"max_price_per_byte":0.0000373,
          "trust":{"default_policy":"trust_all","allowlist":[],"blocklist":[]},
          "sessions":{"preferred_session_increments_milliseconds":60000,
            "preferred_session_increments_bytes":131100000,
            "millisecond_renewal_offset":10000,"bytes_renewal_offset":131100000}})
    }

    fn field_of(v: Value) -> String {
        match UpstreamSettings::parse(Some(&v)).expect_err("must be rejected") {
            UpstreamError::Config {
                field,
                problem,
                fix,
            } => {
                assert!(!problem.is_empty() && !fix.is_empty());
                field
            }
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn reference_shape_and_absent_section() {
        let s = UpstreamSettings::parse(Some(&reference())).expect("reference");
        assert_eq!(s.preferred_increment_ms, 60_000);
        assert_eq!(s.bytes_renewal_offset, 131_100_000);
        assert_eq!(s.default_policy, TrustDefault::TrustAll);
        assert_eq!(UpstreamSettings::parse(None).expect("none"), s);
    }

    #[test]
    fn strings_and_our_additions() {
        let mut v = reference();
        v["sessions"]["preferred_session_increments_milliseconds"] = json!("2m");
        v["sessions"]["millisecond_renewal_offset"] = json!("10s");
        v["poll_interval"] = json!("250ms");
        v["probe_timeout"] = json!(2_000_000_000u64);
        v["trust"] = json!({"default_policy":"trust_none","allowlist":[KEY.to_uppercase()]});
        let s = UpstreamSettings::parse(Some(&v)).expect("parse");
        assert_eq!(s.preferred_increment_ms, 120_000);
        assert_eq!(s.ms_renewal_offset, 10_000);
        assert_eq!(s.poll_interval, Duration::from_millis(250));
        assert_eq!(s.probe_timeout, Duration::from_secs(2));
        assert_eq!(
            UpstreamSettings::default().purchase_timeout,
            Duration::from_secs(30),
            "the reference's seller takes up to 30 s for its mint swap"
        );
        v["purchase_timeout"] = json!("45s");
        let s2 = UpstreamSettings::parse(Some(&v)).expect("parse");
        assert_eq!(s2.purchase_timeout, Duration::from_secs(45));
        assert!(s.trusts(KEY).is_ok());
        assert!(s.trusts(&"1".repeat(64)).is_err());
    }

    #[test]
    fn spending_limits_default_from_increment_and_budget() {
        let s = UpstreamSettings::parse(Some(&reference())).expect("reference");
        // 131 100 001 bytes × 0.0000373 sat × 2 = 9780.06, rounded up.
        assert_eq!(s.purchase_limit(Metric::Bytes), 9781);
        assert_eq!(s.hourly_limit(Metric::Bytes), 9781 * 30);
        // 60 000 ms × 0.0028 × 2 = 336; an hour at 0.0028/ms = 10 080, plus one purchase.
        assert_eq!(s.purchase_limit(Metric::Milliseconds), 336);
        assert_eq!(s.hourly_limit(Metric::Milliseconds), 10_080 + 336);
        let mut v = reference();
        v["max_sat_per_purchase"] = json!(50);
        v["max_sat_per_hour"] = json!(120);
        v["no_session_backoff"] = json!("10m");
        let s = UpstreamSettings::parse(Some(&v)).expect("limits");
        assert_eq!(s.purchase_limit(Metric::Bytes), 50);
        assert_eq!(s.hourly_limit(Metric::Milliseconds), 120);
        assert_eq!(s.no_session_backoff, Duration::from_secs(600));
        assert_eq!(s.hold_ttl, Duration::from_secs(600), "default hold");
        v["hold_ttl"] = json!("2s");
        let s = UpstreamSettings::parse(Some(&v)).expect("hold_ttl");
        assert_eq!(s.hold_ttl, Duration::from_secs(2));
        for bad in [json!(0), json!("1ms"), json!("soon")] {
            let mut v = reference();
            v["hold_ttl"] = bad;
            assert_eq!(field_of(v), "upstream_session_manager.hold_ttl");
        }
        for bad in [json!(0), json!(-3), json!("lots"), json!(1.5)] {
            let mut v = reference();
            v["max_sat_per_hour"] = bad;
            assert_eq!(field_of(v), "upstream_session_manager.max_sat_per_hour");
        }
    }

    #[test]
    fn blocklist_wins_over_trust_all() {
        let mut v = reference();
        v["trust"]["blocklist"] = json!([KEY]);
        let s = UpstreamSettings::parse(Some(&v)).expect("parse");
        assert!(s.trusts(KEY).unwrap_err().contains("blocklist"));
    }

    #[test]
    fn bad_values_name_the_field() {
        type Patch = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Patch, &str)> = vec![
            (
                Box::new(|v| v["max_price_per_byte"] = json!(-1)),
                "upstream_session_manager.max_price_per_byte",
            ),
            (
                Box::new(|v| v["max_price_per_byte"] = json!(0)),
                "upstream_session_manager.max_price_per_byte",
            ),
            (
                Box::new(|v| v["max_price_per_millisecond"] = json!("cheap")),
                "upstream_session_manager.max_price_per_millisecond",
            ),
            (
                Box::new(|v| v["trust"]["default_policy"] = json!("trust_some")),
                "upstream_session_manager.trust.default_policy",
            ),
            (
                Box::new(|v| v["trust"]["allowlist"] = json!(["npub1xyz"])),
                "upstream_session_manager.trust.allowlist[0]",
            ),
            (
                Box::new(|v| v["trust"]["blocklist"] = json!("abc")),
                "upstream_session_manager.trust.blocklist",
            ),
            (
                Box::new(|v| {
                    v["trust"]["allowlist"] = json!([KEY]);
                    v["trust"]["blocklist"] = json!([KEY]);
                }),
                "upstream_session_manager.trust.blocklist",
            ),
            (
                Box::new(|v| v["sessions"]["preferred_session_increments_bytes"] = json!(0)),
                "upstream_session_manager.sessions.preferred_session_increments_bytes",
            ),
            (
                Box::new(|v| v["sessions"]["preferred_session_increments_bytes"] = json!(-5)),
                "upstream_session_manager.sessions.preferred_session_increments_bytes",
            ),
            (
                Box::new(|v| v["sessions"]["bytes_renewal_offset"] = json!("1MB")),
                "upstream_session_manager.sessions.bytes_renewal_offset",
            ),
            (
                Box::new(|v| v["sessions"]["millisecond_renewal_offset"] = json!("10 parsecs")),
                "upstream_session_manager.sessions.millisecond_renewal_offset",
            ),
            (
                Box::new(|v| v["sessions"] = json!([])),
                "upstream_session_manager.sessions",
            ),
            (
                Box::new(|v| v["poll_interval"] = json!("0s")),
                "upstream_session_manager.poll_interval",
            ),
            (
                Box::new(|v| v["probe_tries"] = json!(0)),
                "upstream_session_manager.probe_tries",
            ),
            (Box::new(|v| *v = json!("yes")), "upstream_session_manager."),
        ];
        for (patch, field) in cases {
            let mut v = reference();
            patch(&mut v);
            assert_eq!(field_of(v.clone()), field, "{v}");
        }
    }
}
