//! A mint that accepts connections and never answers, configured beside a working one (issue
//! 11): the stalled mint's calls hold only themselves, never the working mint's customers or
//! wallet operations, and they end by the wallet's call timeout.
//!
//! 1. Lab: client ── lan0 ── gateway; a real mint and a "stalled mint" (a TCP listener that
//!    accepts, reads, and never writes a byte) on the gateway's loopback, both accepted.
//! 2. A customer pays with a token that names the stalled mint (real proofs, re-labelled):
//!    the daemon's redemption connects to the stalled mint and waits.
//! 3. While that call is still open, a second customer pays with a working-mint token: it
//!    gets its kind-1022 session, and the operator's `tollgate wallet send` (the per-mint lock
//!    and a reservation-sized spend at the working mint) and `wallet balance` complete.
//! 4. The stalled payment is answered with a notice (no session, no allotment).
//!
//! That the stalled call itself ends is `wallet::transport`'s unit test (the per-call
//! deadline; the timed-out call's connection is dropped, never reused).
//!
//! `cargo test -p tollgate-tests --test stalled_mint`

use std::{
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    str::FromStr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tollgate_tests::{
    gateway::{http, in_ns, json_body, tag, GatewayLab},
    tollgate_bin,
};

/// A listener that accepts every connection, reads what it is sent, and never answers.
/// Remembers, per connection in accept order, whether the peer has closed it yet.
struct StalledMint {
    addr: SocketAddr,
    /// One entry per accepted connection: still open?
    open: Arc<Mutex<Vec<bool>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StalledMint {
    /// Binds on 127.0.0.1 of the calling thread's namespace (call it inside `ns.run`).
    fn bind() -> TcpListener {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind stalled mint");
        l.set_nonblocking(true).expect("nonblocking");
        l
    }

    fn start(listener: TcpListener) -> StalledMint {
        let addr = listener.local_addr().expect("addr");
        let open = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, s) = (open.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held: Vec<(usize, TcpStream)> = Vec::new();
            while !s.load(Ordering::SeqCst) {
                while let Ok((conn, _)) = listener.accept() {
                    conn.set_nonblocking(true).expect("nonblocking");
                    let mut o = o.lock().expect("lock");
                    held.push((o.len(), conn));
                    o.push(true);
                }
                held.retain_mut(|(id, conn)| {
                    let mut buf = [0u8; 4096];
                    let gone = match conn.read(&mut buf) {
                        Ok(0) => true,
                        Ok(_) => false,
                        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                    };
                    if gone {
                        o.lock().expect("lock")[*id] = false;
                    }
                    !gone
                });
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        StalledMint {
            addr,
            open,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.open.lock().expect("lock").len()
    }

    /// Connections accepted at or after position `from` that the peer still holds open.
    fn open_since(&self, from: usize) -> usize {
        let o = self.open.lock().expect("lock");
        o.iter().skip(from).filter(|open| **open).count()
    }

    /// Waits until `f()` holds or `limit` passes; whether it held.
    fn wait(&self, limit: Duration, f: impl Fn(&Self) -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if f(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        f(self)
    }
}

impl Drop for StalledMint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The same proofs re-labelled as coming from `mint_url` (a v4 token names its mint).
fn relabel(token: &str, mint_url: &str) -> String {
    let mut v4 = cdk::nuts::TokenV4::from_str(token).expect("a v4 token from the test mint");
    v4.mint_url = cdk::mint_url::MintUrl::from_str(mint_url).expect("mint url");
    v4.to_string()
}

/// `tollgate <args>` (the operator's CLI over the control socket): (exit code, stdout, stderr).
fn tg(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(tollgate_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tollgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_stalled_mint_holds_neither_the_working_mints_customers_nor_its_wallet() {
    let g = GatewayLab::new("stl");
    let GatewayLab {
        lab,
        config_dir,
        state_dir,
        rt,
        mint,
        ..
    } = &g;
    let stalled = StalledMint::start(lab.gateway.run(StalledMint::bind));
    let offer = |url: &str| {
        serde_json::json!({"url": url, "price_per_step": 1, "price_unit": "sat",
            "purchase_min_steps": 10, "min_balance": 0, "min_payout_amount": 1000000,
            "payout_interval_seconds": 3600, "balance_tolerance_percent": 10})
    };
    tollgate_tests::gateway::write_config_value(
        config_dir,
        &serde_json::json!({
            "config_version": "v0.0.8", "metric": "bytes", "step_size": 1000,
            "accepted_mints": [offer(&mint.url()), offer(&stalled.url())],
            "profit_share": [{"identity": "owner", "factor": 1.0}],
            "reseller_mode": false
        }),
    );
    let daemon = g.start();
    let sock = state_dir.join("control.sock");
    let sock = sock.to_str().expect("utf-8 path");
    let (good, fake) = {
        let m = mint.clone();
        in_ns(&lab.gateway, rt, move || async move {
            (m.mint_token(100).await, m.mint_token(100).await)
        })
    };
    let fake = relabel(&fake, &stalled.url());
    let before = stalled.accepted();

    std::thread::scope(|scope| {
        // 2. The stalled-mint payment, left waiting in the background.
        let stuck = scope.spawn(|| http(&lab.client, "POST", "/", Some(("text/plain", &fake))));
        assert!(
            stalled.wait(Duration::from_secs(20), |s| s.accepted() > before),
            "the daemon never contacted the stalled mint"
        );

        // 3. The working mint's customer and operator, while that call is open.
        let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &good)));
        assert_eq!(st, 200, "payment at the working mint: {body}");
        let session = json_body(&body);
        assert_eq!(session["kind"], 1022, "{body}");
        assert_eq!(tag(&session, "allotment"), Some("100000"));
        let (code, sent, err) = tg(&[
            "wallet",
            "send",
            "--mint",
            &mint.url(),
            "--amount",
            "20",
            "--control-socket",
            sock,
        ]);
        assert_eq!(code, 0, "wallet send at the working mint: {err}");
        assert!(sent.trim().starts_with("cashu"), "{sent}");
        let (code, balance, err) = tg(&["wallet", "balance", "--json", "--control-socket", sock]);
        assert_eq!(code, 0, "wallet balance: {err}");
        assert!(
            !stuck.is_finished(),
            "the stalled payment was still waiting"
        );
        assert!(
            stalled.open_since(before) > 0,
            "all of the above happened while the stalled mint held the daemon's call"
        );
        let balance: serde_json::Value = serde_json::from_str(&balance).expect("balance json");
        let working = balance
            .as_array()
            .expect("one row per mint")
            .iter()
            .find(|r| {
                r["mint"]
                    .as_str()
                    .is_some_and(|m| mint.url().starts_with(m))
            })
            .unwrap_or_else(|| panic!("no row for the working mint: {balance}"));
        assert_eq!(working["balance"], 80, "100 received, 20 sent: {balance}");

        // 4. The stalled payment: a notice, nothing granted for it.
        let (_, body) = stuck.join().expect("stalled payment thread");
        let notice = json_body(&body);
        assert_eq!(
            notice["kind"], 21023,
            "the stalled payment is a notice: {body}"
        );
        let (_, usage) = http(&lab.client, "GET", "/usage", None);
        assert!(
            usage.trim().ends_with("/100000"),
            "only the working payment was granted: {usage}"
        );
    });
    // The wallet's per-call deadline lets go of the stalled mint by itself.
    drop(daemon);
}
