//! Speed tiers and rates that survive a restart (issue 15), through the real daemon, a real
//! test mint and the real data plane: the kernel's rates are read back with
//! `tollgate clients --json` (the valve's gate state).
//!
//! The lab sells bytes, 1024 per step, 1 sat per default step (at least 10 steps), the
//! default rates 3000/1000 kbit/s; tier "fast" costs 3 sat per step at 20000/5000 kbit/s.

use nostr::{JsonUtil, Keys};
use serde_json::Value;
use tollgate::valve::MacAddr;
use tollgate_tests::gateway::{
    http, json_body, tag, tg, tg_json, write_config_value, GatewayLab, MERCHANT_KEY,
};

const STEP: u64 = 1024;
const DEFAULT: (u64, u64) = (3_000, 1_000);
const FAST: (u64, u64) = (20_000, 5_000);

fn write_tier_config(g: &GatewayLab) {
    g.write_config("bytes", STEP);
    let path = g.config_dir.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c["shaping"] = serde_json::json!({"down_kbit": DEFAULT.0, "up_kbit": DEFAULT.1});
    c["tiers"] = serde_json::json!([
        {"name": "fast", "down_kbit": FAST.0, "up_kbit": FAST.1, "price_factor": 3}
    ]);
    write_config_value(&g.config_dir, &c);
}

fn sock(g: &GatewayLab) -> String {
    g.state_dir
        .join("control.sock")
        .to_str()
        .expect("utf-8")
        .into()
}

/// The client row of `mac` from `tollgate clients --json`.
fn client(g: &GatewayLab, mac: &str) -> Value {
    let rows = tg_json(&["clients", "--json", "--control-socket", &sock(g)], None);
    rows.as_array()
        .expect("rows")
        .iter()
        .find(|r| r["mac"] == mac)
        .unwrap_or_else(|| panic!("no row for {mac}: {rows}"))
        .clone()
}

fn rates(row: &Value) -> (u64, u64) {
    (
        row["down_kbit"].as_u64().expect("down"),
        row["up_kbit"].as_u64().expect("up"),
    )
}

fn log(g: &GatewayLab) -> String {
    std::fs::read_to_string(g.state_dir.join("daemon.log")).unwrap_or_default()
}

/// POST a body from the lab's client: (status, parsed event).
fn post(g: &GatewayLab, path: &str, ct: &str, body: &str) -> (u16, Value) {
    let (st, b) = http(&g.lab.client, "POST", path, Some((ct, body)));
    (st, json_body(&b))
}

/// A signed kind-21000 payment for the lab's gateway with `extra` tags.
fn event(g: &GatewayLab, token: &str, extra: Vec<Vec<String>>) -> String {
    let gw = Keys::parse(MERCHANT_KEY).expect("key").public_key();
    tollgate::protocol::payment_event_tagged(
        &Keys::generate(),
        &gw,
        MacAddr(g.lab.client_mac()),
        token,
        tollgate::sys::clock::unix_secs(),
        extra,
    )
    .expect("event")
    .as_json()
}

fn code(ev: &Value) -> &str {
    tag(ev, "code").unwrap_or_default()
}

/// Item 1: a session at a tier's rates (paid `POST /?tier=fast`) and one at a CLI-set rate
/// (`gate open … --down-kbit 8000`) keep their rates over
/// 1. a restart (the pins kept: the kernel still has the gates), and
/// 2. a reboot (daemon stopped, pins removed: reconciliation reopens both from the store).
///
/// Old code: the reboot reopened both at the default 3000/1000 (the rates lived only in the
/// kernel), and there was no tier to pay at.
#[test]
fn tier_and_cli_rates_survive_restart_and_reboot() {
    let g = GatewayLab::new("tgr");
    write_tier_config(&g);
    let mut d = g.start();
    let payer = MacAddr(g.lab.client_mac()).to_string();
    let (st, ev) = post(&g, "/?tier=fast", "text/plain", &g.token(30));
    assert_eq!(st, 200, "paid at fast: {ev}; log: {}", log(&g));
    assert_eq!(tag(&ev, "tier"), Some("fast"), "{ev}");
    let admin = "02:00:00:00:7a:01";
    let r = tg_json(
        &[
            "gate",
            "open",
            admin,
            "--bytes",
            "1000000",
            "--down-kbit",
            "8000",
            "--json",
            "--control-socket",
            &sock(&g),
        ],
        None,
    );
    assert_eq!(rates(&r), (8_000, DEFAULT.1));
    let check = |when: &str| {
        let p = client(&g, &payer);
        assert_eq!(rates(&p), FAST, "{when}: the fast payer: {p}");
        assert_eq!(p["tier"], "fast", "{when}: {p}");
        assert_eq!(p["state"], "active", "{when}: {p}");
        let a = client(&g, admin);
        assert_eq!(rates(&a), (8_000, DEFAULT.1), "{when}: the CLI rate: {a}");
        assert_eq!(a["tier"], "default", "{when}: {a}");
    };
    check("before");
    let (code, text, _) = tg(&["clients", "--control-socket", &sock(&g)], None);
    assert_eq!(code, 0);
    assert!(
        text.contains("tier fast"),
        "the table shows the tier: {text}"
    );
    d.stop();
    let mut d = g.start();
    check("after a restart");
    d.stop();
    g.pins.wipe();
    let mut d = g.start();
    check("after a reboot");
    d.stop();
}

/// Item 2, paying at tiers with real tokens:
/// 1. 20 sat at the default tier: 20 steps at the default rate;
/// 2. hostile tier choices — unknown, 10 000 characters, not UTF-8, repeated tags, a tag
///    without a value — are each refused with 400 and a clear message, and the token used
///    for all of them is still spendable: it pays afterwards;
/// 3. 30 sat as a kind-21000 event with `["tier","fast"]`: 10 fast steps, the remaining
///    default allotment converted at 1:3 (floor), the rate raised to the tier's;
/// 4. 9 sat with no tier while "fast" is active: priced at fast, 3 steps, rate kept.
///
/// Old code: `?tier=` and the tier tag were ignored (every payment bought default steps at the
/// default rate), so step 2 answered 200 and step 3 found the default rate.
#[test]
fn paying_at_tiers_converts_and_refuses_hostile_choices() {
    let g = GatewayLab::new("tgp");
    write_tier_config(&g);
    let mut d = g.start();
    let mac = MacAddr(g.lab.client_mac()).to_string();
    let (st, ev) = post(&g, "/", "text/plain", &g.token(20));
    assert_eq!(st, 200, "{ev}");
    assert_eq!(tag(&ev, "tier"), None, "default: no tier tag");
    assert_eq!(tag(&ev, "allotment"), Some("20480"));
    assert_eq!(rates(&client(&g, &mac)), DEFAULT);

    let token = g.token(30);
    let huge = "f".repeat(10_000);
    let hostile: Vec<(&str, String, String, &str)> = vec![
        (
            "unknown tier",
            "/?tier=slow".into(),
            token.clone(),
            "unknown tier \"slow\"",
        ),
        (
            "10 000 characters",
            format!("/?tier={huge}"),
            token.clone(),
            "at most 32",
        ),
        (
            "huge number",
            "/?tier=99999999999999999999999999".into(),
            token.clone(),
            "unknown tier",
        ),
        (
            "not UTF-8",
            "/?tier=%FF%FE".into(),
            token.clone(),
            "not valid utf-8",
        ),
        (
            "two query values",
            "/?tier=fast&tier=default".into(),
            token.clone(),
            "more than once",
        ),
        (
            "repeated tags",
            "/".into(),
            event(
                &g,
                &token,
                vec![
                    vec!["tier".into(), "fast".into()],
                    vec!["tier".into(), "fast".into()],
                ],
            ),
            "repeated",
        ),
        (
            "a 10 000-character tag",
            "/".into(),
            event(&g, &token, vec![vec!["tier".into(), huge.clone()]]),
            "at most 32",
        ),
        (
            "a tag without a value",
            "/".into(),
            event(&g, &token, vec![vec!["tier".into()]]),
            "no value",
        ),
        (
            "tag and query disagree",
            "/?tier=default".into(),
            event(&g, &token, vec![vec!["tier".into(), "fast".into()]]),
            "more than once",
        ),
    ];
    for (what, path, body, says) in &hostile {
        let ct = if body.starts_with('{') {
            "application/json"
        } else {
            "text/plain"
        };
        let (st, ev) = post(&g, path, ct, body);
        assert_eq!(st, 400, "{what}: {ev}");
        let content = ev["content"].as_str().unwrap_or_default();
        assert!(content.contains(says), "{what}: {content}");
        assert!(content.len() < 300, "{what}: the value is not echoed back");
        assert!(
            ["invalid-request", "invalid-event"].contains(&code(&ev)),
            "{what}: {ev}"
        );
    }
    let before = client(&g, &mac);
    let (allot, used) = (
        before["allotment"].as_u64().unwrap(),
        before["used"].as_u64().unwrap(),
    );
    assert_eq!(allot, 20 * STEP, "the refused payments bought nothing");
    // The token survived every refusal: it pays now, at fast, as a 21000 event.
    let (st, ev) = post(
        &g,
        "/",
        "application/json",
        &event(&g, &token, vec![vec!["tier".into(), "fast".into()]]),
    );
    assert_eq!(st, 200, "the token is still spendable: {ev}");
    assert_eq!(tag(&ev, "tier"), Some("fast"));
    let after = client(&g, &mac);
    let used_now = after["used"].as_u64().unwrap();
    assert_eq!(
        used_now, used,
        "nothing moved meanwhile (the arithmetic is exact)"
    );
    let converted = (allot - used) / 3;
    assert_eq!(
        after["allotment"].as_u64().unwrap(),
        used + converted + 10 * STEP,
        "remaining default bytes converted at 1:3, plus 10 fast steps: {after}"
    );
    assert_eq!(rates(&after), FAST, "rate raised");
    assert_eq!(after["tier"], "fast");
    // A cheap top-up while fast is active: 9 sat = 3 fast steps, not 9 default ones.
    let (st, ev) = post(&g, "/", "text/plain", &g.token(9 + 1));
    assert_eq!(
        st, 400,
        "10 sat = 3 fast steps is below the minimum of 10: {ev}"
    );
    assert!(
        ev["content"]
            .as_str()
            .unwrap_or_default()
            .contains("still yours"),
        "refused before redeeming: {ev}"
    );
    let (st, ev) = post(&g, "/?tier=default", "text/plain", &g.token(33));
    assert_eq!(st, 200, "{ev}");
    let last = client(&g, &mac);
    assert_eq!(
        last["allotment"].as_u64().unwrap(),
        after["allotment"].as_u64().unwrap() + 11 * STEP,
        "33 sat at the active fast tier = 11 steps: {last}"
    );
    assert_eq!(rates(&last), FAST, "still fast");
    d.stop();
}

fn wait_log(g: &GatewayLab, needle: &str, count: usize) {
    let t0 = std::time::Instant::now();
    while log(g).matches(needle).count() < count {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(15),
            "no {needle:?} (#{count}) in the log: {}",
            log(g)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Item 3: `SIGHUP` re-reads config.json.
/// 1. Sessions: the fast payer (tier), a device at the operator's 8000 kbit/s, a device at
///    the default rate; the config's default becomes 4000/1500 and "fast" 30000/6000, and
///    `step_size` changes too.
/// 2. After SIGHUP: the tier session runs at the tier's new rates, the default one at the
///    new default, the operator's rate stays; the advertisement shows the new tier rates;
///    the log says `step_size` needs a restart (and it is not applied: the price is unchanged).
/// 3. A broken config (a tier as cheap as the default) is refused with the field named, the
///    rates stay, the daemon keeps serving; `tollgate reload` says so on the command line, and
///    with the config fixed answers what changed.
///
/// Old code: SIGHUP's default action ended the daemon.
#[test]
fn sighup_applies_shaping_and_tier_rates_live() {
    let g = GatewayLab::new("tgh");
    write_tier_config(&g);
    let mut d = g.start();
    let payer = MacAddr(g.lab.client_mac()).to_string();
    let (st, ev) = post(&g, "/?tier=fast", "text/plain", &g.token(30));
    assert_eq!(st, 200, "{ev}");
    let (admin, plain) = ("02:00:00:00:7b:01", "02:00:00:00:7b:02");
    for (mac, extra) in [(admin, vec!["--down-kbit", "8000"]), (plain, vec![])] {
        let mut args = vec!["gate", "open", mac, "--bytes", "100000"];
        args.extend(extra);
        let s = sock(&g);
        args.extend(["--json", "--control-socket", &s]);
        tg_json(&args, None);
    }
    let path = g.config_dir.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c["shaping"] = serde_json::json!({"down_kbit": 4000, "up_kbit": 1500});
    c["tiers"][0]["down_kbit"] = 30_000.into();
    c["tiers"][0]["up_kbit"] = 6_000.into();
    c["step_size"] = (STEP * 2).into();
    write_config_value(&g.config_dir, &c);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    wait_log(&g, "config reloaded", 1);
    assert_eq!(
        rates(&client(&g, &payer)),
        (30_000, 6_000),
        "the tier's new rates"
    );
    assert_eq!(
        rates(&client(&g, admin)),
        (8_000, DEFAULT.1),
        "the operator's stay"
    );
    assert_eq!(rates(&client(&g, plain)), (4_000, 1_500), "the new default");
    let l = log(&g);
    assert!(
        l.contains("need a restart") && l.contains("step_size"),
        "the log names what needs a restart: {l}"
    );
    let (st, body) = http(&g.lab.client, "GET", "/", None);
    assert_eq!(st, 200);
    let ad = json_body(&body);
    assert_eq!(tag(&ad, "step_size"), Some("1024"), "not applied live");
    let tier = ad["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t[0] == "tier")
        .expect("tier tag")
        .clone();
    assert_eq!(
        (tier[2].as_str(), tier[3].as_str()),
        (Some("30000"), Some("6000"))
    );
    // A broken config is refused; the running one stays.
    c["tiers"][0]["price_factor"] = 1.into();
    c["shaping"] = serde_json::json!({"down_kbit": 1, "up_kbit": 1});
    write_config_value(&g.config_dir, &c);
    // SAFETY: as above.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGHUP) };
    wait_log(&g, "config reload refused", 1);
    assert!(log(&g).contains("tiers[0].price_factor"), "{}", log(&g));
    assert_eq!(rates(&client(&g, plain)), (4_000, 1_500), "kept");
    assert_eq!(rates(&client(&g, &payer)), (30_000, 6_000), "kept");
    let (st, _) = http(&g.lab.client, "GET", "/", None);
    assert_eq!(st, 200, "still serving");
    // `tollgate reload` answers with the outcome: the refusal, then (config fixed) the report.
    let (code, _, err) = tg(&["reload", "--control-socket", &sock(&g)], None);
    assert_ne!(code, 0, "a broken config is refused");
    assert!(err.contains("tiers[0].price_factor"), "{err}");
    c["tiers"][0]["price_factor"] = 3.into();
    c["shaping"] = serde_json::json!({"down_kbit": 5000, "up_kbit": 1500});
    write_config_value(&g.config_dir, &c);
    let r = tg_json(&["reload", "--json", "--control-socket", &sock(&g)], None);
    assert_eq!(r["gates"], 1, "the default-tier gate: {r}");
    assert_eq!(r["needs_restart"], serde_json::json!(["step_size"]), "{r}");
    assert_eq!(rates(&client(&g, plain)), (5_000, 1_500));
    d.stop();
}
