//! A hostile upstream (`tollgate_tests::hostile`) in B's place: A, a real reseller daemon
//! with a real wallet and mint, must lose at most one purchase's worth and keep serving.
//!
//! 1. The upstream advertises a tiny price with `min_steps` of nearly our whole balance:
//!    refused by `max_sat_per_purchase` (before: paid in one purchase).
//! 2. It takes one fair purchase (swaps the token, answers a valid session) and then says
//!    `-1/-1` on `/usage`, mixed with a malformed chunk size, a 1 MiB body and a slow drip:
//!    A pays once and alerts (before: paid again on every poll until the wallet was empty;
//!    the chunk size panicked the buyer task, which was never restarted).
//! 3. A's wallet lost exactly what the upstream took; A's API and buyer still run.

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tollgate::wallet::{MintSettings, Wallet, WalletSettings};
use tollgate_tests::{
    chain::{Chain, A_LAN_IP, B_LAN_IP, INTERNET_IP},
    gateway::{http_to, in_ns, json_body, ns_runtime, write_config_keyed, Daemon, DaemonSpec},
    hostile::{HostileUpstream, Mode},
    mint::TestMint,
    pins::PinBase,
};

const A_KEY: &str = "5c2b0c3d4e5f60718293a4b5c6d7e8f90112233445566778899aabbccddeeff0";
const STEP: u64 = 1_000;
const FUNDS: u64 = 2_000;

fn say(msg: impl AsRef<str>) {
    println!("[hostile] {}", msg.as_ref());
}

fn admin(chain: &Chain, path: &str) -> Value {
    let (st, body) = http_to(
        &chain.a,
        SocketAddr::from(([127, 0, 0, 1], 2122)),
        "GET",
        path,
        None,
    );
    assert_eq!(st, 200, "{path}: {body}");
    json_body(&body)
}

fn wait(what: &str, secs: u64, log: &Path, mut pred: impl FnMut() -> bool) {
    let start = Instant::now();
    while !pred() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}\nA's log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Client → A (a real reseller daemon, wallet funded with `FUNDS` at a real mint in the
/// internet namespace) → the hostile upstream in B's place. Fields drop in reverse order:
/// the daemon stops before its namespaces go.
struct Lab {
    a: Daemon,
    hostile: HostileUpstream,
    _mint: Arc<TestMint>,
    rt_i: Arc<tokio::runtime::Runtime>,
    _rt_b: Arc<tokio::runtime::Runtime>,
    _pins: PinBase,
    state: std::path::PathBuf,
    settings: WalletSettings,
    log: std::path::PathBuf,
    _tmp: tempfile::TempDir,
    chain: Chain,
}

impl Lab {
    /// `tag` names the namespaces and pins; `upstream` is merged into A's
    /// `upstream_session_manager`; the hostile upstream starts in `mode` asking `min_steps`.
    fn start(tag: &str, upstream: Value, min_steps: u64, mode: Mode) -> Lab {
        let tag = format!("{tag}{}", std::process::id() % 10_000);
        let chain = Chain::new(&tag);
        let rt_i = ns_runtime(&chain.internet);
        let mint = Arc::new(in_ns(&chain.internet, &rt_i, || {
            TestMint::start_on(0, INTERNET_IP.into())
        }));
        let tmp = tempfile::tempdir().unwrap();
        let (etc, state) = (tmp.path().join("a-etc"), tmp.path().join("a-state"));
        let settings = WalletSettings::new(vec![MintSettings::new(mint.url())]);

        // Fund A's wallet before A starts.
        let token = {
            let m = mint.clone();
            in_ns(&chain.internet, &rt_i, move || async move {
                m.mint_token(FUNDS).await
            })
        };
        {
            let (st, s) = (state.clone(), settings.clone());
            in_ns(&chain.internet, &rt_i, move || async move {
                let w = Wallet::open(&st, s).await.expect("open wallet");
                w.receive(&token).await.expect("fund wallet");
            });
        }

        // The hostile upstream at B's address, in B's namespace.
        let rt_b = ns_runtime(&chain.b);
        let a_mac = chain
            .a
            .mac("wan0")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let hostile = {
            let (m, url) = (mint.clone(), mint.url());
            in_ns(&chain.b, &rt_b, move || async move {
                let w = m.new_wallet().await;
                HostileUpstream::start(SocketAddr::from((B_LAN_IP, 2121)), &url, STEP, &a_mac, w)
                    .await
            })
        };
        hostile.set_min_steps(min_steps);
        hostile.set_mode(mode);

        let mut usm = json!({
            "max_price_per_byte": 0.01, "max_price_per_millisecond": 0.01,
            "trust": {"default_policy": "trust_all", "allowlist": [], "blocklist": []},
            "sessions": {"preferred_session_increments_bytes": 200_000, "bytes_renewal_offset": 20_000,
                         "preferred_session_increments_milliseconds": 60000, "millisecond_renewal_offset": 10000},
            "max_sat_per_purchase": 300,
            "poll_interval": "100ms", "probe_timeout": "2s", "probe_tries": 1,
            "recheck_interval": "1s", "max_backoff": "500ms"
        });
        for (k, v) in upstream.as_object().expect("upstream overrides") {
            usm[k] = v.clone();
        }
        let cfg = json!({
            "config_version": "v0.0.8", "metric": "bytes", "step_size": STEP,
            "accepted_mints": [{"url": mint.url(), "price_per_step": 1, "price_unit": "sat",
                "purchase_min_steps": 1, "min_balance": 0, "min_payout_amount": 1000000,
                "payout_interval_seconds": 3600, "balance_tolerance_percent": 10}],
            "profit_share": [{"identity": "owner", "factor": 1.0}],
            "reseller_mode": true,
            "upstream_session_manager": usm,
        });
        write_config_keyed(&etc, &cfg, A_KEY);
        let pins = PinBase::new(&tag);
        let a = Daemon::start_with(&DaemonSpec {
            gateway: &chain.a,
            lan_peer: &chain.client,
            lan_iface: "lan0",
            wan_iface: Some("wan0"),
            listen: SocketAddr::from((A_LAN_IP, 2121)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 2122)),
            config_dir: &etc,
            state_dir: &state,
            pins: &pins,
        });
        let log = state.join("daemon.log");
        Lab {
            a,
            hostile,
            _mint: mint,
            rt_i,
            _rt_b: rt_b,
            _pins: pins,
            state,
            settings,
            log,
            _tmp: tmp,
            chain,
        }
    }

    /// Stops A and returns its wallet's balance.
    fn stop_and_balance(&mut self) -> u64 {
        self.a.stop();
        let (st, s) = (self.state.clone(), self.settings.clone());
        in_ns(&self.chain.internet, &self.rt_i, move || async move {
            let w = Wallet::open(&st, s).await.expect("open wallet");
            w.balances().await.expect("balances")[0].balance
        })
    }
}

#[test]
fn a_hostile_upstream_takes_at_most_one_purchase() {
    // 1500 sat in one purchase: affordable, over the limit.
    let mut lab = Lab::start("ho", json!({}), 1_500, Mode::NoSession);
    let (chain, hostile, log) = (&lab.chain, &lab.hostile, lab.log.clone());

    // 1. The greedy minimum is refused and said so.
    wait("the refusal", 30, &log, || {
        admin(chain, "/upstream")["status"]["last_refusal"]
            .as_str()
            .is_some_and(|r| r.contains("max_sat_per_purchase"))
    });
    std::thread::sleep(Duration::from_secs(2));
    let s = admin(chain, "/upstream")["status"].clone();
    say(format!("greedy option: {}", s["last_refusal"]));
    assert!(
        hostile.taken().is_empty(),
        "paid the greedy option: {:?}",
        hostile.taken()
    );
    assert_eq!(s["purchase_limit"], 300, "{s}");

    // 2. A fair option, then no session and garbage after the purchase.
    hostile.set_min_steps(0);
    hostile.set_mode(Mode::Malformed);
    wait("the one purchase", 30, &log, || hostile.taken().len() == 1);
    let polls = hostile.usage_requests();
    wait("more /usage polls", 30, &log, || {
        hostile.usage_requests() >= polls + 12
    });
    let s = admin(chain, "/upstream")["status"].clone();
    say(format!(
        "after {} /usage polls: {s}",
        hostile.usage_requests()
    ));
    assert_eq!(
        hostile.taken(),
        vec![200],
        "one purchase of 200 steps, no more"
    );
    assert_eq!(s["purchases"], 1, "{s}");
    let warnings = s["warnings"].to_string();
    assert!(warnings.contains("without a session"), "{warnings}");

    // 3. A keeps serving: its buyer task runs and its API answers.
    let status = admin(chain, "/upstream");
    assert_eq!(status["reseller_mode"], true);
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!log_text.contains("panicked"), "{log_text}");
    let balance = lab.stop_and_balance();
    say(format!(
        "A's balance {balance} of {FUNDS}; the upstream took {:?}",
        lab.hostile.taken()
    ));
    assert_eq!(balance, FUNDS - 200, "A lost exactly the one purchase");
}

/// Issue 10 (5): the renewal hold must outlive an upstream that stops answering.
/// 1. One purchase of 200 (then `-1/-1`): A holds the next renewal's 200 (`hold_ttl` 2 s).
/// 2. The upstream goes silent: every probe and `/usage` poll hangs for `probe_timeout` × 2
///    = 8 s, four times the hold's lifetime. Over two such turns the hold stays (before: it
///    was extended only between loop turns, so it lapsed inside the first hanging probe and
///    the next payout tick could spend it; `held` fell to 0).
/// 3. A lost exactly the one purchase.
#[test]
fn the_renewal_hold_outlives_a_silent_upstream() {
    let mut lab = Lab::start(
        "hh",
        json!({"hold_ttl": "2s", "probe_timeout": "4s", "probe_tries": 2}),
        0,
        Mode::NoSession,
    );
    let (chain, hostile, log) = (&lab.chain, &lab.hostile, lab.log.clone());
    wait("the purchase and its hold", 60, &log, || {
        hostile.taken().len() == 1 && admin(chain, "/upstream")["status"]["held"] == 200
    });
    hostile.set_mode(Mode::Silent);
    let hanging = hostile.usage_requests();
    // Two loop turns that each hang for 8 s: a probe or poll reaches the silent upstream
    // (counted before it hangs), then the next one.
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(17));
    let s = admin(chain, "/upstream")["status"].clone();
    say(format!(
        "after {:?} of silence ({} /usage polls before): {s}",
        t.elapsed(),
        hanging
    ));
    assert_eq!(
        s["held"], 200,
        "the hold lapsed while the upstream was away: {s}"
    );
    assert_eq!(hostile.taken(), vec![200], "paid once");
    let balance = lab.stop_and_balance();
    assert_eq!(balance, FUNDS - 200, "A lost exactly the one purchase");
}
