//! `GET /metrics`: Prometheus text exposition format 0.0.4, written by hand.
//!
//! ```text
//! collect(ops state) ── Snapshot (plain numbers) ── render() ── "# HELP …\n# TYPE …\nname{l="v"} 1\n"
//! ```
//! [`parse`] reads the format back, strictly (the tests use it on our own output and on a
//! page scraped from a running daemon).

use std::collections::BTreeMap;

use super::{BalanceRow, OpsError, OpsState};
use crate::{merchant::PaymentCount, valve::Gates};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every number the page shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Sessions by state (`active`, `closed`).
    pub clients: BTreeMap<String, u64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub packets_up: u64,
    pub packets_down: u64,
    /// verdict name → (packets, bytes)
    pub verdicts: Vec<(String, u64, u64)>,
    pub payments: Vec<PaymentCount>,
    pub wallet: Vec<BalanceRow>,
    /// outcome → (count, sats paid)
    pub payouts: BTreeMap<String, (u64, u64)>,
    /// Upstream purchases by outcome (empty when not in reseller mode).
    pub upstream_purchases: BTreeMap<String, u64>,
    /// The WAN meter's comparison: (our bytes, the upstream's bytes) since it started.
    pub upstream_meter: Option<(u64, Option<u64>)>,
    /// Supervised tasks: (name, running?, restarts).
    pub tasks: Vec<(String, bool, u64)>,
    pub policy_entries: u64,
    pub usage_entries: u64,
    pub map_capacity: u64,
    /// The policy index's health.
    pub index: crate::valve::IndexShape,
    /// Client entries evicted since start, by reason.
    pub evictions: crate::valve::Evictions,
    /// Current rates (sampled by [`super::rates`]).
    pub rates: super::rates::RateSummary,
}

/// Reads everything once. A wallet that cannot answer leaves its families empty rather than
/// failing the whole scrape.
pub async fn collect(st: &OpsState) -> Result<Snapshot, OpsError> {
    let mut s = Snapshot::default();
    s.clients.insert("active".into(), 0);
    s.clients.insert("closed".into(), 0);
    for c in st.app.chandler.clients()? {
        *s.clients
            .entry(if c.active { "active" } else { "closed" }.into())
            .or_default() += 1;
    }
    for g in st.valve.gates()? {
        s.bytes_up += g.usage.bytes_up;
        s.bytes_down += g.usage.bytes_down;
        s.packets_up += g.usage.packets_up;
        s.packets_down += g.usage.packets_down;
    }
    s.verdicts = st
        .valve
        .verdicts()?
        .0
        .into_iter()
        .map(|(v, p, b)| (v.name().to_string(), p, b))
        .collect();
    s.payments = st.app.merchant.payment_counts();
    match st.wallet.balances().await {
        Ok(b) => s.wallet = b.into_iter().map(BalanceRow::from).collect(),
        Err(e) => tracing::warn!(error = %e, "metrics: wallet balances"),
    }
    match st.wallet.payouts().await {
        Ok(p) => {
            for r in p {
                let e = s.payouts.entry(r.outcome).or_default();
                e.0 += 1;
                e.1 += r.amount;
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: payouts"),
    }
    if let Some(up) = &st.app.upstream {
        let status = up.status();
        s.upstream_purchases
            .insert("accepted".into(), status.purchases);
        s.upstream_meter = status.meter.as_ref().map(|m| (m.ours, m.theirs));
    }
    s.tasks = st
        .tasks
        .status()
        .into_iter()
        .map(|t| (t.name, t.state == "running", t.restarts.into()))
        .collect();
    let (policy, usage) = st.valve.occupancy();
    s.policy_entries = policy.into();
    s.usage_entries = usage.into();
    s.map_capacity = st.valve.capacity().into();
    s.index = st.valve.index_shape();
    s.evictions = st.valve.evictions();
    s.rates = st.rates.summary();
    Ok(s)
}

/// Label values: backslash, double quote and newline are escaped.
fn escape_label(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

struct Page(String);

impl Page {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.0
            .push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                self.0.push_str(&format!("{k}=\"{}\"", escape_label(v)));
            }
            self.0.push('}');
        }
        self.0.push_str(&format!(" {value}\n"));
    }
}

/// The exposition text.
pub fn render(s: &Snapshot) -> String {
    let mut p = Page(String::new());
    p.family(
        "tollgate_clients",
        "gauge",
        "Devices with a session row, by state.",
    );
    for (state, n) in &s.clients {
        p.sample("tollgate_clients", &[("state", state)], *n);
    }
    p.family(
        "tollgate_client_bytes_total",
        "counter",
        "Bytes metered by the kernel for clients (L3), by direction.",
    );
    p.sample(
        "tollgate_client_bytes_total",
        &[("direction", "up")],
        s.bytes_up,
    );
    p.sample(
        "tollgate_client_bytes_total",
        &[("direction", "down")],
        s.bytes_down,
    );
    p.family(
        "tollgate_client_packets_total",
        "counter",
        "Packets metered by the kernel for clients, by direction.",
    );
    p.sample(
        "tollgate_client_packets_total",
        &[("direction", "up")],
        s.packets_up,
    );
    p.sample(
        "tollgate_client_packets_total",
        &[("direction", "down")],
        s.packets_down,
    );
    p.family(
        "tollgate_verdict_packets_total",
        "counter",
        "Data plane decisions, packets by verdict.",
    );
    for (v, packets, _) in &s.verdicts {
        p.sample(
            "tollgate_verdict_packets_total",
            &[("verdict", v)],
            *packets,
        );
    }
    p.family(
        "tollgate_verdict_bytes_total",
        "counter",
        "Data plane decisions, bytes by verdict.",
    );
    for (v, _, bytes) in &s.verdicts {
        p.sample("tollgate_verdict_bytes_total", &[("verdict", v)], *bytes);
    }
    p.family(
        "tollgate_payments_total",
        "counter",
        "Customer payments since start, by mint and outcome (accepted, replayed or notice code).",
    );
    for c in &s.payments {
        p.sample(
            "tollgate_payments_total",
            &[("mint", &c.mint), ("outcome", &c.outcome)],
            c.count,
        );
    }
    p.family(
        "tollgate_payments_received_sats_total",
        "counter",
        "Sats credited by accepted payments since start (after the mint's fee), by mint.",
    );
    let mut received: BTreeMap<&str, u64> = BTreeMap::new();
    for c in &s.payments {
        *received.entry(&c.mint).or_default() += c.sats;
    }
    for (mint, sats) in received {
        p.sample(
            "tollgate_payments_received_sats_total",
            &[("mint", mint)],
            sats,
        );
    }
    p.family(
        "tollgate_wallet_balance_sats",
        "gauge",
        "Unspent balance of the wallet, by mint.",
    );
    for b in &s.wallet {
        p.sample(
            "tollgate_wallet_balance_sats",
            &[("mint", &b.mint), ("unit", &b.unit)],
            b.balance,
        );
    }
    p.family(
        "tollgate_wallet_reserved_sats",
        "gauge",
        "Balance reserved for payments about to be made, by mint.",
    );
    for b in &s.wallet {
        p.sample(
            "tollgate_wallet_reserved_sats",
            &[("mint", &b.mint), ("unit", &b.unit)],
            b.reserved,
        );
    }
    p.family(
        "tollgate_payouts_total",
        "counter",
        "Profit payout attempts, by outcome.",
    );
    for (outcome, (n, _)) in &s.payouts {
        p.sample("tollgate_payouts_total", &[("outcome", outcome)], *n);
    }
    p.family(
        "tollgate_payouts_sats_total",
        "counter",
        "Sats in profit payout attempts, by outcome.",
    );
    for (outcome, (_, sats)) in &s.payouts {
        p.sample(
            "tollgate_payouts_sats_total",
            &[("outcome", outcome)],
            *sats,
        );
    }
    p.family(
        "tollgate_upstream_purchases_total",
        "counter",
        "Access bought from the upstream gateway, by outcome.",
    );
    if s.upstream_purchases.is_empty() {
        p.sample("tollgate_upstream_purchases_total", &[], 0);
    }
    for (outcome, n) in &s.upstream_purchases {
        p.sample(
            "tollgate_upstream_purchases_total",
            &[("outcome", outcome)],
            *n,
        );
    }
    if let Some((ours, theirs)) = s.upstream_meter {
        p.family(
            "tollgate_upstream_meter_bytes",
            "gauge",
            "L3 bytes exchanged with the upstream since the comparison started, by who counted.",
        );
        p.sample("tollgate_upstream_meter_bytes", &[("side", "ours")], ours);
        if let Some(t) = theirs {
            p.sample("tollgate_upstream_meter_bytes", &[("side", "theirs")], t);
        }
    }
    if !s.tasks.is_empty() {
        p.family(
            "tollgate_task_up",
            "gauge",
            "1 while a supervised background task runs, 0 while it restarts or has failed.",
        );
        for (name, up, _) in &s.tasks {
            p.sample("tollgate_task_up", &[("task", name)], u64::from(*up));
        }
        p.family(
            "tollgate_task_restarts_total",
            "counter",
            "Restarts of a supervised background task since the daemon started.",
        );
        for (name, _, restarts) in &s.tasks {
            p.sample("tollgate_task_restarts_total", &[("task", name)], *restarts);
        }
    }
    p.family(
        "tollgate_map_entries",
        "gauge",
        "Entries in the per-client BPF maps.",
    );
    p.sample(
        "tollgate_map_entries",
        &[("map", "policy")],
        s.policy_entries,
    );
    p.sample("tollgate_map_entries", &[("map", "usage")], s.usage_entries);
    p.family(
        "tollgate_map_capacity",
        "gauge",
        "Capacity of each per-client BPF map.",
    );
    p.sample("tollgate_map_capacity", &[], s.map_capacity);
    p.family(
        "tollgate_index_longest_walk",
        "gauge",
        "Longest walk a present client needs in the kernel's policy index, in entries (the \
         kernel gives up after tollgate_index_max_walk).",
    );
    p.sample(
        "tollgate_index_longest_walk",
        &[],
        s.index.longest_walk.into(),
    );
    p.family(
        "tollgate_index_max_walk",
        "gauge",
        "Longest walk the kernel makes in the policy index.",
    );
    p.sample("tollgate_index_max_walk", &[], s.index.max_walk.into());
    p.family(
        "tollgate_index_tombstones",
        "gauge",
        "Deleted entries still inside runs of the policy index (walks pass them, inserts reuse \
         them).",
    );
    p.sample("tollgate_index_tombstones", &[], s.index.tombstones.into());
    p.family(
        "tollgate_map_evictions_total",
        "counter",
        "Closed clients' entries evicted since start: retention passed, or room made when near full.",
    );
    p.sample(
        "tollgate_map_evictions_total",
        &[("reason", "retention")],
        s.evictions.retention,
    );
    p.sample(
        "tollgate_map_evictions_total",
        &[("reason", "pressure")],
        s.evictions.pressure,
    );
    rate_families(&mut p, &s.rates);
    p.0
}

/// Current rates: the sum, how many clients are held at their cap, and the fastest few by
/// name (one series per client would grow the page with the client count).
fn rate_families(p: &mut Page, r: &super::rates::RateSummary) {
    p.family(
        "tollgate_client_rate_bits_per_second",
        "gauge",
        "Clients' current rate summed (L3 bits/s over the last sampling interval), by direction.",
    );
    p.sample(
        "tollgate_client_rate_bits_per_second",
        &[("direction", "up")],
        r.total.up_bps,
    );
    p.sample(
        "tollgate_client_rate_bits_per_second",
        &[("direction", "down")],
        r.total.down_bps,
    );
    p.family(
        "tollgate_clients_at_rate_limit",
        "gauge",
        "Clients whose current rate is at least 80 % of their rate limit, by direction.",
    );
    p.sample(
        "tollgate_clients_at_rate_limit",
        &[("direction", "up")],
        r.at_cap.0,
    );
    p.sample(
        "tollgate_clients_at_rate_limit",
        &[("direction", "down")],
        r.at_cap.1,
    );
    p.family(
        "tollgate_client_top_rate_bits_per_second",
        "gauge",
        "The fastest clients' current rates (at most 10 clients), by MAC and direction.",
    );
    for (mac, c) in &r.top {
        let mac = mac.to_string();
        p.sample(
            "tollgate_client_top_rate_bits_per_second",
            &[("mac", &mac), ("direction", "up")],
            c.up_bps,
        );
        p.sample(
            "tollgate_client_top_rate_bits_per_second",
            &[("mac", &mac), ("direction", "down")],
            c.down_bps,
        );
    }
    p.family(
        "tollgate_client_rate_window_seconds",
        "gauge",
        "Length of the interval the current rates are measured over (0 before two samples).",
    );
    p.0.push_str(&format!(
        "tollgate_client_rate_window_seconds {}\n",
        r.window_ms as f64 / 1e3
    ));
}

/// One parsed sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// Parses the text exposition format strictly: every line is a HELP, a TYPE or a sample;
/// every sample belongs to a family declared by a TYPE line before it; counters end in
/// `_total`; no family is declared twice. Returns the samples.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let err = |m: &str| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), Some(_)) if is_metric_name(name) => {}
                (Some("TYPE"), Some(name), Some(kind)) if is_metric_name(name) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(err("unknown type"));
                    }
                    if kind == "counter" && !name.ends_with("_total") {
                        return Err(err("counter without _total"));
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(err("family declared twice"));
                    }
                }
                _ => return Err(err("bad comment line")),
            }
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => return Err(err("no value")),
        };
        if !is_metric_name(name) {
            return Err(err("bad metric name"));
        }
        if !types.contains_key(name) {
            return Err(err("sample before its TYPE line"));
        }
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            let end;
            loop {
                // label name
                let start = chars.peek().map(|(i, _)| *i).ok_or_else(|| err("eof"))?;
                if r[start..].starts_with('}') {
                    end = start + 1;
                    break;
                }
                let eq = r[start..].find('=').ok_or_else(|| err("label without ="))? + start;
                let lname = &r[start..eq];
                if !is_label_name(lname) {
                    return Err(err("bad label name"));
                }
                while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(err("label value not quoted"));
                }
                let mut val = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => val.push('\\'),
                            Some((_, '"')) => val.push('"'),
                            Some((_, 'n')) => val.push('\n'),
                            _ => return Err(err("bad escape")),
                        },
                        Some((_, '"')) => break,
                        Some((_, '\n')) | None => return Err(err("unterminated label value")),
                        Some((_, c)) => val.push(c),
                    }
                }
                if labels.insert(lname.to_string(), val).is_some() {
                    return Err(err("duplicate label"));
                }
                match chars.next() {
                    Some((_, ',')) => continue,
                    Some((i, '}')) => {
                        end = i + 1;
                        break;
                    }
                    _ => return Err(err("expected , or }")),
                }
            }
            rest = &r[end..];
        }
        let value = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before the value"))?;
        let mut v = value.split(' ');
        let num = v.next().unwrap_or_default();
        let value: f64 = match num {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            n => n.parse().map_err(|_| err("bad value"))?,
        };
        if let Some(ts) = v.next() {
            ts.parse::<i64>().map_err(|_| err("bad timestamp"))?;
        }
        if v.next().is_some() {
            return Err(err("trailing fields"));
        }
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// The value of the sample `name` whose labels include all of `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let mut s = Snapshot {
            rates: super::super::rates::RateSummary {
                total: super::super::rates::CurrentRate {
                    up_bps: 1_500,
                    down_bps: 4_000_000,
                },
                at_cap: (0, 1),
                top: vec![(
                    "aa:bb:cc:dd:ee:ff".parse().unwrap(),
                    super::super::rates::CurrentRate {
                        up_bps: 1_500,
                        down_bps: 3_999_000,
                    },
                )],
                window_ms: 2_500,
            },
            bytes_up: 1_000,
            bytes_down: 123_456_789_012,
            packets_up: 10,
            packets_down: 20,
            verdicts: vec![("pass_paid".into(), 7, 700), ("drop_unpaid".into(), 3, 180)],
            payments: vec![
                PaymentCount {
                    mint: "http://127.0.0.1:3338".into(),
                    outcome: "accepted".into(),
                    count: 2,
                    sats: 250,
                },
                PaymentCount {
                    mint: "http://127.0.0.1:3338".into(),
                    outcome: "payment-error-token-spent".into(),
                    count: 1,
                    sats: 0,
                },
                PaymentCount {
                    mint: "weird\"mint\\with\nnewline".into(),
                    outcome: "accepted".into(),
                    count: 1,
                    sats: 5,
                },
            ],
            wallet: vec![BalanceRow {
                mint: "http://127.0.0.1:3338".into(),
                unit: "sat".into(),
                balance: 250,
                reserved: 10,
                available: 240,
            }],
            policy_entries: 3,
            usage_entries: 4,
            map_capacity: 131_072,
            index: crate::valve::IndexShape {
                longest_walk: 3,
                tombstones: 2,
                max_walk: 32,
            },
            ..Snapshot::default()
        };
        s.clients.insert("active".into(), 1);
        s.clients.insert("closed".into(), 2);
        s.payouts.insert("paid".into(), (2, 900));
        s
    }

    #[test]
    fn every_line_follows_the_exposition_grammar_and_values_are_exact() {
        let text = render(&snapshot());
        let samples = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let v = |n: &str, l: &[(&str, &str)]| value(&samples, n, l);
        assert_eq!(v("tollgate_clients", &[("state", "active")]), Some(1.0));
        assert_eq!(v("tollgate_index_longest_walk", &[]), Some(3.0));
        assert_eq!(v("tollgate_index_tombstones", &[]), Some(2.0));
        assert_eq!(v("tollgate_index_max_walk", &[]), Some(32.0));
        assert_eq!(v("tollgate_clients", &[("state", "closed")]), Some(2.0));
        assert_eq!(
            v("tollgate_client_bytes_total", &[("direction", "down")]),
            Some(123_456_789_012.0)
        );
        assert!(text.contains("tollgate_client_bytes_total{direction=\"down\"} 123456789012\n"));
        assert_eq!(
            v(
                "tollgate_verdict_bytes_total",
                &[("verdict", "drop_unpaid")]
            ),
            Some(180.0)
        );
        assert_eq!(
            v(
                "tollgate_payments_total",
                &[("mint", "http://127.0.0.1:3338"), ("outcome", "accepted")]
            ),
            Some(2.0)
        );
        assert_eq!(
            v(
                "tollgate_payments_received_sats_total",
                &[("mint", "http://127.0.0.1:3338")]
            ),
            Some(250.0)
        );
        // Escaping round-trips.
        assert_eq!(
            v(
                "tollgate_payments_received_sats_total",
                &[("mint", "weird\"mint\\with\nnewline")]
            ),
            Some(5.0)
        );
        assert_eq!(
            v(
                "tollgate_wallet_reserved_sats",
                &[("mint", "http://127.0.0.1:3338")]
            ),
            Some(10.0)
        );
        assert_eq!(
            v("tollgate_payouts_sats_total", &[("outcome", "paid")]),
            Some(900.0)
        );
        assert_eq!(v("tollgate_upstream_purchases_total", &[]), Some(0.0));
        assert_eq!(
            v("tollgate_upstream_meter_bytes", &[("side", "ours")]),
            None,
            "no meter, no samples"
        );
        assert_eq!(v("tollgate_map_entries", &[("map", "usage")]), Some(4.0));
        assert_eq!(
            v("tollgate_map_evictions_total", &[("reason", "pressure")]),
            Some(0.0)
        );
        assert_eq!(
            v(
                "tollgate_client_top_rate_bits_per_second",
                &[("mac", "aa:bb:cc:dd:ee:ff"), ("direction", "down")]
            ),
            Some(3_999_000.0)
        );
        assert_eq!(
            v("tollgate_clients_at_rate_limit", &[("direction", "down")]),
            Some(1.0)
        );
        assert_eq!(v("tollgate_client_rate_window_seconds", &[]), Some(2.5));
        // Every family has HELP and TYPE, every sample line is a declared family.
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(helps, types);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn the_upstream_meter_is_exported_by_side() {
        let s = Snapshot {
            upstream_meter: Some((58_079, Some(58_000))),
            ..Snapshot::default()
        };
        let samples = parse(&render(&s)).expect("parses");
        let v = |side: &str| value(&samples, "tollgate_upstream_meter_bytes", &[("side", side)]);
        assert_eq!(v("ours"), Some(58_079.0));
        assert_eq!(v("theirs"), Some(58_000.0));
    }

    #[test]
    fn an_empty_gateway_still_renders_every_family() {
        let text = render(&Snapshot::default());
        let samples = parse(&text).expect("parses");
        assert_eq!(
            value(&samples, "tollgate_upstream_purchases_total", &[]),
            Some(0.0)
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("# TYPE ")).count(),
            22
        );
    }

    #[test]
    fn the_parser_rejects_what_prometheus_would() {
        for bad in [
            "x 1",                                          // no TYPE
            "# TYPE x_total counter\nx_total{a=\"1\" 1",    // unterminated
            "# TYPE x_total counter\nx_total{a=1} 1",       // unquoted
            "# TYPE x_total counter\nx_total{1a=\"1\"} 1",  // bad label name
            "# TYPE x_total counter\nx_total{a=\"\\q\"} 1", // bad escape
            "# TYPE x_total counter\nx_total one",          // bad value
            "# TYPE x counter\nx 1",                        // counter w/o _total
            "# TYPE x gauge\n# TYPE x gauge\nx 1",          // declared twice
            "# TYPE x gauge\nx{a=\"1\",a=\"2\"} 1",         // duplicate label
            "# TYPE x gauge\nx 1 2 3",                      // trailing
            "# TYPE x wibble\nx 1",                         // unknown type
            "# TYPE 9x gauge\n9x 1",                        // bad name
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(parse("# TYPE x gauge\nx{a=\"1\",b=\"2\"} 1.5 1700000000\n").is_ok());
    }
}
