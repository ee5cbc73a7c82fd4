//! Human output of the operator commands: plain text that fits 80 columns (long fields such
//! as mint URLs are shortened with `…`; `--json` gives the exact values).

use super::{
    BalanceRow, ClientRow, MapsReport, PayoutRow, RebalanceAnswer, ReceiveAnswer, StatusReport,
};

pub const WIDTH: usize = 80;

/// `s` cut to `n` characters, the last one `…` when cut.
pub fn fit(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut o: String = s.chars().take(n.saturating_sub(1)).collect();
    o.push('…');
    o
}

/// Left-aligned cell of exactly `n` columns.
fn cell(s: &str, n: usize) -> String {
    let s = fit(s, n);
    let pad = n - s.chars().count();
    format!("{s}{}", " ".repeat(pad))
}

/// Right-aligned cell of exactly `n` columns.
fn rcell(s: &str, n: usize) -> String {
    let s = fit(s, n);
    let pad = n - s.chars().count();
    format!("{}{s}", " ".repeat(pad))
}

/// Bytes in at most 6 characters: `999B`, `12.3k`, `1.5M`, `2.0G`, `3.4T` (SI units).
pub fn bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 5] = [
        (1_000_000_000_000_000, "P"),
        (1_000_000_000_000, "T"),
        (1_000_000_000, "G"),
        (1_000_000, "M"),
        (1_000, "k"),
    ];
    for (div, u) in UNITS {
        if n >= div {
            let v = n as f64 / div as f64;
            return if v >= 100.0 {
                format!("{v:.0}{u}")
            } else {
                format!("{v:.1}{u}")
            };
        }
    }
    format!("{n}B")
}

/// A rate: `4.8 Mbit/s` (the SI prefixes of [`bytes`]).
fn bits(bps: u64) -> String {
    let b = bytes(bps);
    match b.strip_suffix('B') {
        Some(n) => format!("{n} bit/s"),
        None => format!("{} {}bit/s", &b[..b.len() - 1], &b[b.len() - 1..]),
    }
}

/// Milliseconds in at most 6 characters: `45s`, `12m05s`, `3h07m`, `12d03h`.
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d >= 100_000 {
        format!("{}y", d / 365)
    } else if d >= 100 {
        format!("{d}d")
    } else if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{sec:02}s")
    } else {
        format!("{sec}s")
    }
}

/// An amount in the metric's units, compact.
fn amount(metric: &str, v: u64) -> String {
    if metric == "milliseconds" {
        duration_ms(v)
    } else {
        bytes(v)
    }
}

/// `HH:MMZ` (UTC) of a unix-ms instant, `-` for none.
fn clock(ms: Option<u64>) -> String {
    match ms {
        Some(ms) => {
            let s = ms / 1000 % 86_400;
            format!("{:02}:{:02}Z", s / 3600, s / 60 % 60)
        }
        None => "-".into(),
    }
}

/// `YYYY-MM-DD HH:MM` (UTC) of a unix-seconds instant.
fn date(unix: u64) -> String {
    // Civil from days (Howard Hinnant's algorithm).
    let days = (unix / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let s = unix % 86_400;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", s / 3600, s / 60 % 60)
}

fn line(out: &mut String, s: impl AsRef<str>) {
    out.push_str(&fit(s.as_ref(), WIDTH));
    out.push('\n');
}

/// `tollgate status`
pub fn status(r: &StatusReport) -> String {
    let mut o = String::new();
    let g = &r.gateway;
    line(&mut o, format!("tollgate {}", r.version));
    line(
        &mut o,
        format!(
            "gateway    {} {}  api {}  admin {}",
            g.lan_iface,
            g.lan_ipv4.map_or("-".into(), |a| a.to_string()),
            g.listen,
            g.admin_listen
        ),
    );
    line(
        &mut o,
        format!(
            "selling    {} per step of {}",
            g.metric,
            amount(&g.metric, g.step_size)
        ),
    );
    let d = &r.dataplane;
    line(
        &mut o,
        format!(
            "data plane {} on {}  attached: {}",
            d.mode,
            d.iface,
            if d.attach_points.is_empty() {
                "NOTHING".to_string()
            } else {
                d.attach_points.join(", ")
            }
        ),
    );
    line(
        &mut o,
        format!(
            "           {} gates, {} counters of {}  pins {}",
            d.policy_entries, d.usage_entries, d.capacity, d.pin_dir
        ),
    );
    line(
        &mut o,
        format!(
            "           evicted {} retention, {} room",
            d.evictions.retention, d.evictions.pressure
        ),
    );
    line(
        &mut o,
        format!(
            "clients    {} active, {} closed",
            r.clients.active, r.clients.closed
        ),
    );
    if !r.databases.is_empty() {
        let dbs: Vec<String> = r
            .databases
            .iter()
            .map(|(name, bytes)| format!("{name} {}", self::bytes(*bytes)))
            .collect();
        line(&mut o, format!("databases  {}", dbs.join(", ")));
    }
    line(
        &mut o,
        format!(
            "upstream   {}",
            match &r.upstream {
                None => "none".to_string(),
                Some(v) => upstream_line(v),
            }
        ),
    );
    if let Some(m) = r
        .upstream
        .as_ref()
        .map(|v| &v["meter"])
        .filter(|m| !m.is_null())
    {
        line(&mut o, format!("           {}", meter_line(m)));
    }
    line(&mut o, "");
    line(
        &mut o,
        format!(
            "{} {} {} {} {}",
            cell("MINT", 38),
            cell("UP", 4),
            rcell("BALANCE", 11),
            rcell("RESERVED", 10),
            rcell("PRICE", 11)
        ),
    );
    for m in &r.mints {
        line(
            &mut o,
            format!(
                "{} {} {} {} {}",
                cell(&m.mint, 38),
                cell(if m.reachable { "yes" } else { "NO" }, 4),
                rcell(&m.balance.to_string(), 11),
                rcell(&m.reserved.to_string(), 10),
                rcell(&format!("{}/{}", m.price_per_step, m.unit), 11)
            ),
        );
    }
    if !r.warnings.is_empty() {
        line(&mut o, "");
        for w in &r.warnings {
            line(&mut o, format!("warning: {w}"));
        }
    }
    o
}

/// `tollgate clients`
pub fn clients(rows: &[ClientRow]) -> String {
    let mut o = String::new();
    let head = format!(
        "{} {} {} {} {} {} {}",
        cell("MAC", 17),
        cell("IP", 15),
        cell("STATE", 6),
        rcell("ALLOT", 6),
        rcell("UP/DOWN", 13),
        rcell("LEFT", 6),
        rcell("EXPIRES", 7),
    );
    line(&mut o, head);
    for r in rows {
        let state = match r.state.as_str() {
            "admin-close" => "admin",
            s => s,
        };
        line(
            &mut o,
            format!(
                "{} {} {} {} {} {} {}",
                cell(&r.mac.to_string(), 17),
                cell(&r.ip.map_or("-".into(), |i| i.to_string()), 15),
                cell(state, 6),
                rcell(&amount(&r.metric, r.allotment), 6),
                rcell(
                    &format!("{}/{}", bytes(r.bytes_up), bytes(r.bytes_down)),
                    13
                ),
                rcell(&amount(&r.metric, r.remaining), 6),
                rcell(&clock(r.expires_unix_ms), 7),
            ),
        );
        if !r.tier.is_empty() && r.tier != crate::tiers::DEFAULT_TIER {
            line(&mut o, format!("  tier {}", r.tier));
        }
        let now = r.now.filter(|n| n.up_bps != 0 || n.down_bps != 0);
        if r.down_kbit != 0 || r.up_kbit != 0 || now.is_some() {
            let k = |v: u64| {
                if v == 0 {
                    "unlimited".to_string()
                } else {
                    format!("{v} kbit/s")
                }
            };
            let mut l = String::from(" ");
            if let Some(n) = now {
                l.push_str(&format!(
                    " now down {}, up {};",
                    bits(n.down_bps),
                    bits(n.up_bps)
                ));
            }
            if r.down_kbit != 0 || r.up_kbit != 0 {
                l.push_str(&format!(
                    " rate limit down {}, up {}",
                    k(r.down_kbit),
                    k(r.up_kbit)
                ));
            }
            line(&mut o, l.trim_end_matches(';'));
        }
    }
    if rows.is_empty() {
        line(&mut o, "(no clients)");
    }
    o
}

/// `tollgate maps`
pub fn maps(m: &MapsReport) -> String {
    let mut o = String::new();
    line(&mut o, format!("pins       {}", m.pin_dir));
    line(
        &mut o,
        format!(
            "attached   {}",
            if m.attach_points.is_empty() {
                "nothing (no pinned links)".to_string()
            } else {
                m.attach_points.join(", ")
            }
        ),
    );
    let c = &m.config;
    line(
        &mut o,
        format!(
            "config     {}  gateway {}  tcp ports {}",
            if c.configured {
                "written"
            } else {
                "NOT WRITTEN"
            },
            c.gateway_v4.map_or("-".into(), |a| a.to_string()),
            c.tcp_ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    );
    for a in &c.gateway_v6 {
        line(&mut o, format!("           gateway {a}"));
    }
    if c.portal_redirect {
        line(
            &mut o,
            format!("           portal redirect mark {}", c.portal_mark),
        );
    }
    line(
        &mut o,
        format!(
            "garden     {}",
            if c.garden.is_empty() {
                "-".to_string()
            } else {
                c.garden.join(" ")
            }
        ),
    );
    line(
        &mut o,
        format!(
            "occupancy  policy {} / usage {} of {}; index: longest walk {} of {}, {} deleted \
             entries in runs",
            m.occupancy.policy,
            m.occupancy.usage,
            m.occupancy.capacity,
            m.occupancy.index.longest_walk,
            m.occupancy.index.max_walk,
            m.occupancy.index.tombstones
        ),
    );
    line(&mut o, "");
    line(
        &mut o,
        format!(
            "{} {} {} {} {} {} {}",
            cell("MAC", 17),
            cell("OPEN", 4),
            rcell("LEFT", 8),
            rcell("DEADLINE", 8),
            rcell("UP", 8),
            rcell("DOWN", 8),
            rcell("GEN", 6),
        ),
    );
    for g in &m.gates {
        let deadline = g.until_boot_ns.map_or("-".to_string(), |d| {
            if d <= m.now_boot_ns {
                "passed".into()
            } else {
                duration_ms((d - m.now_boot_ns) / 1_000_000)
            }
        });
        line(
            &mut o,
            format!(
                "{} {} {} {} {} {} {}",
                cell(&g.mac.to_string(), 17),
                cell(if g.open { "yes" } else { "no" }, 4),
                rcell(&g.remaining_bytes.map_or("-".into(), bytes), 8),
                rcell(&deadline, 8),
                rcell(&bytes(g.usage.bytes_up), 8),
                rcell(&bytes(g.usage.bytes_down), 8),
                rcell(&g.generation.to_string(), 6),
            ),
        );
    }
    line(&mut o, "");
    line(
        &mut o,
        format!(
            "{} {} {}",
            cell("VERDICT", 20),
            rcell("PACKETS", 16),
            rcell("BYTES", 20)
        ),
    );
    for (v, c) in &m.verdicts {
        line(
            &mut o,
            format!(
                "{} {} {}",
                cell(v, 20),
                rcell(&c.packets.to_string(), 16),
                rcell(&c.bytes.to_string(), 20)
            ),
        );
    }
    o
}

/// `tollgate wallet balance`
/// `tollgate wallet receive`.
pub fn received(r: &ReceiveAnswer) -> String {
    if r.replayed {
        format!("already received ({} {} from {})\n", r.net, r.unit, r.mint)
    } else {
        format!(
            "received {} {} from {} (token {} − fee {})\n",
            r.net,
            r.unit,
            r.mint,
            r.gross,
            r.gross - r.net
        )
    }
}

/// `tollgate wallet rebalance`.
pub fn rebalanced(r: &RebalanceAnswer) -> String {
    match r.state.as_str() {
        "done" => format!(
            "moved {} sat from {} to {} (fee {}); rebalance {}\n",
            r.amount, r.source, r.target, r.fee, r.id
        ),
        other => format!(
            "rebalance {} of {} sat from {} to {} is {other}; the daemon finishes it at its next start\n",
            r.id, r.amount, r.source, r.target
        ),
    }
}

pub fn balances(rows: &[BalanceRow]) -> String {
    let mut o = String::new();
    line(
        &mut o,
        format!(
            "{} {} {} {}",
            cell("MINT", 40),
            rcell("BALANCE", 12),
            rcell("RESERVED", 12),
            rcell("AVAILABLE", 12)
        ),
    );
    for b in rows {
        line(
            &mut o,
            format!(
                "{} {} {} {}",
                cell(&b.mint, 40),
                rcell(&format!("{} {}", b.balance, b.unit), 12),
                rcell(&b.reserved.to_string(), 12),
                rcell(&b.available.to_string(), 12)
            ),
        );
    }
    o
}

/// `tollgate wallet payouts`
pub fn payouts(rows: &[PayoutRow]) -> String {
    let mut o = String::new();
    line(
        &mut o,
        format!(
            "{} {} {} {} {} {}",
            rcell("ID", 5),
            cell("WHEN (UTC)", 16),
            cell("OUTCOME", 7),
            rcell("AMOUNT", 9),
            rcell("FEE", 5),
            cell("TO", 32)
        ),
    );
    for p in rows {
        line(
            &mut o,
            format!(
                "{} {} {} {} {} {}",
                rcell(&p.id.to_string(), 5),
                cell(&date(p.created_at), 16),
                cell(&p.outcome, 7),
                rcell(&p.amount.to_string(), 9),
                rcell(&p.fee.to_string(), 5),
                cell(&p.lightning_address, 32)
            ),
        );
    }
    if rows.is_empty() {
        line(&mut o, "(no payouts yet)");
    }
    o
}

/// Our WAN meter against the upstream's `/usage`.
fn meter_line(m: &serde_json::Value) -> String {
    let ours = m["ours"].as_u64().unwrap_or(0);
    match m["theirs"].as_u64() {
        Some(theirs) => format!(
            "meter: ours {ours} B, theirs {theirs} B{}",
            if m["large"].as_bool() == Some(true) {
                " — DISAGREE"
            } else {
                ""
            }
        ),
        None => format!("meter: ours {ours} B (upstream sells time)"),
    }
}

/// One line for the upstream session: where, how much of the allotment is used, what was paid.
fn upstream_line(v: &serde_json::Value) -> String {
    let gw = v["gateway"].as_str().unwrap_or("not found");
    let usage = match (v["used"].as_u64(), v["allotment"].as_u64()) {
        (Some(u), Some(a)) => format!("{u}/{a}"),
        _ => "no session".into(),
    };
    format!(
        "{gw}, {usage}, paid {} sat in {} purchases",
        v["paid"].as_u64().unwrap_or(0),
        v["purchases"].as_u64().unwrap_or(0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ops::{ClientCounts, DataplaneInfo, GatewayInfo, MintStatus, Occupancy, VerdictRow},
        valve::{ClientUsage, ConfigView, GateState},
    };

    fn assert_fits(text: &str) {
        for l in text.lines() {
            assert!(
                l.chars().count() <= WIDTH,
                "{} columns: {l:?}",
                l.chars().count()
            );
        }
    }

    const LONG: &str =
        "https://a-very-long-mint-hostname.example.com:3338/with/a/long/path/segment";

    #[test]
    fn compact_units() {
        assert_eq!(bytes(0), "0B");
        assert_eq!(bytes(999), "999B");
        assert_eq!(bytes(1_500), "1.5k");
        assert_eq!(bytes(200_000), "200k");
        assert_eq!(bytes(123_456_789_012), "123G");
        assert!(bytes(u64::MAX).chars().count() <= 6, "{}", bytes(u64::MAX));
        assert_eq!(duration_ms(45_000), "45s");
        assert_eq!(duration_ms(725_000), "12m05s");
        assert_eq!(duration_ms(3 * 3_600_000 + 7 * 60_000), "3h07m");
        assert_eq!(duration_ms(200 * 86_400_000), "200d");
        assert!(
            duration_ms(u64::MAX).chars().count() <= 11,
            "{}",
            duration_ms(u64::MAX)
        );
        assert_eq!(date(0), "1970-01-01 00:00");
        assert_eq!(date(1_700_000_000), "2023-11-14 22:13");
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("abc", 4), "abc");
    }

    #[test]
    fn status_fits_80_columns_even_with_long_urls_and_warnings() {
        let r = StatusReport {
            version: "0.1.0".into(),
            gateway: GatewayInfo {
                lan_iface: "br-lan-with-a-long-name".into(),
                lan_ipv4: Some("10.77.0.1".parse().unwrap()),
                listen: "10.77.0.1:2121".into(),
                admin_listen: "127.0.0.1:2122".into(),
                control_socket: "/var/lib/tollgate/control.sock".into(),
                metric: "bytes".into(),
                step_size: 1000,
            },
            dataplane: DataplaneInfo {
                iface: "lan0".into(),
                mode: "tc".into(),
                pin_dir: "/sys/fs/bpf/tollgate-some-very-long-test-prefix-1234567890/v1".into(),
                attach_points: vec!["tc_egress".into(), "tc_ingress".into()],
                policy_entries: 131_072,
                usage_entries: 131_072,
                capacity: 131_072,
                evictions: crate::valve::Evictions {
                    retention: u64::MAX,
                    pressure: u64::MAX,
                },
            },
            mints: vec![MintStatus {
                mint: LONG.into(),
                reachable: false,
                error: Some("timeout".into()),
                unit: "sat".into(),
                price_per_step: 1_000_000,
                balance: u64::MAX,
                reserved: u64::MAX,
                available: 0,
            }],
            clients: ClientCounts {
                active: 3,
                closed: 4,
            },
            upstream: None,
            tasks: Vec::new(),
            warnings: vec![format!(
                "mint {LONG} unreachable: a long error message {LONG}"
            )],
            databases: vec![("tollgate".into(), 4_562_944), ("wallet".into(), 81_920)],
        };
        let t = status(&r);
        assert_fits(&t);
        assert!(t.contains("tc_egress, tc_ingress"), "{t}");
        assert!(t.contains("databases  tollgate 4.6M, wallet 81.9k"), "{t}");
        assert!(t.contains("3 active, 4 closed"), "{t}");
        assert!(t.contains("upstream   none"), "{t}");
        assert!(t.contains(" NO "), "{t}");
    }

    #[test]
    fn client_and_wallet_tables_fit_80_columns() {
        let row = ClientRow {
            mac: "aa:bb:cc:dd:ee:ff".parse().unwrap(),
            ip: Some("255.255.255.255".parse().unwrap()),
            state: "admin-close".into(),
            metric: "bytes".into(),
            allotment: u64::MAX,
            used: 1,
            remaining: u64::MAX - 1,
            bytes_up: u64::MAX,
            bytes_down: u64::MAX,
            packets_up: 1,
            packets_down: 2,
            started_unix: 0,
            expires_unix_ms: Some(1_700_000_000_000),
            down_kbit: 0,
            up_kbit: 0,
            tier: "x".repeat(32),
            now: None,
        };
        let mut timed = row.clone();
        timed.metric = "milliseconds".into();
        timed.down_kbit = u64::MAX;
        timed.now = Some(super::super::rates::CurrentRate {
            up_bps: u64::MAX,
            down_bps: 4_830_000,
        });
        timed.ip = Some("fd00:1234:5678:9abc:def0:1234:5678:9abc".parse().unwrap());
        let t = clients(&[row, timed]);
        assert_fits(&t);
        assert!(t.contains("aa:bb:cc:dd:ee:ff"), "{t}");
        assert!(t.contains("22:13Z"), "{t}");
        assert!(t.contains("now down 4.8 Mbit/s"), "{t}");
        assert_fits(&clients(&[]));
        let b = balances(&[BalanceRow {
            mint: LONG.into(),
            unit: "sat".into(),
            balance: u64::MAX,
            reserved: u64::MAX,
            available: u64::MAX,
        }]);
        assert_fits(&b);
        let p = payouts(&[PayoutRow {
            id: i64::MAX,
            mint: LONG.into(),
            identity: "owner".into(),
            lightning_address: format!("someone-with-a-long-name@{LONG}"),
            amount: u64::MAX,
            fee: u64::MAX,
            outcome: "pending".into(),
            message: None,
            created_at: 1_700_000_000,
        }]);
        assert_fits(&p);
        assert!(p.contains("2023-11-14 22:13"), "{p}");
    }

    #[test]
    fn maps_fit_80_columns() {
        let m = MapsReport {
            pin_dir: format!("/sys/fs/bpf/{LONG}"),
            attach_points: vec!["tc_egress".into(), "xdp_ingress".into()],
            config: ConfigView {
                configured: true,
                portal_redirect: true,
                portal_mark: u32::MAX,
                gateway_v4: Some("10.77.0.1".parse().unwrap()),
                gateway_v6: vec!["fe80::1234:5678:9abc:def0".parse().unwrap()],
                tcp_ports: vec![2121, 80, 65535, 443],
                garden: (0..20).map(|i| format!("192.0.{i}.0/24")).collect(),
                dns_budget: None,
            },
            occupancy: Occupancy {
                policy: 1,
                usage: 2,
                capacity: 131_072,
                index: Default::default(),
            },
            gates: vec![GateState {
                mac: "aa:bb:cc:dd:ee:ff".parse().unwrap(),
                open: true,
                remaining_bytes: Some(u64::MAX),
                until_boot_ns: Some(u64::MAX),
                bound_ipv4: None,
                generation: u32::MAX,
                usage: ClientUsage {
                    bytes_up: u64::MAX,
                    bytes_down: 5,
                    packets_up: 1,
                    packets_down: 1,
                    last_seen_ns: 0,
                },
                rates: Default::default(),
            }],
            verdicts: [(
                "drop_unpaid".to_string(),
                VerdictRow {
                    packets: u64::MAX,
                    bytes: u64::MAX,
                },
            )]
            .into_iter()
            .collect(),
            now_boot_ns: 1,
        };
        let t = maps(&m);
        assert_fits(&t);
        assert!(
            t.contains(&u64::MAX.to_string()),
            "exact verdict counts: {t}"
        );
    }

    #[test]
    fn upstream_and_meter_lines() {
        let v = serde_json::json!({
            "gateway": "10.78.0.1", "used": 1200, "allotment": 200000, "paid": 200,
            "purchases": 1,
            "meter": {"ours": 1234, "theirs": 1200, "large": false}
        });
        assert_eq!(
            upstream_line(&v),
            "10.78.0.1, 1200/200000, paid 200 sat in 1 purchases"
        );
        assert_eq!(meter_line(&v["meter"]), "meter: ours 1234 B, theirs 1200 B");
        let big = serde_json::json!({"ours": 9, "theirs": 900000, "large": true});
        assert!(meter_line(&big).ends_with("DISAGREE"));
        let time = serde_json::json!({"ours": 9, "theirs": null});
        assert!(meter_line(&time).contains("sells time"));
    }
}
