//! `cargo xtask bench api`: the customer API of a real `tollgate run` under load, next to
//! baselines measured in the same invocation on the same namespace lab.
//!
//! ```text
//!  client ns: load generator ──keep-alive HTTP/1.1──> gateway ns: tollgate run :2121
//!                                 (baseline: static axum on :2121 while the daemon is stopped)
//!                                                               TestMint 127.0.0.1 (fee 0)
//!  1. GET /  for D seconds at each connection count: req/s, p50, p99
//!     (baseline: a minimal axum server answering the same bytes)
//!  2. POST / with pre-minted tokens (minted before the clock starts): payments/s, p50, p99
//!     (baseline: a bare cdk wallet receiving the same kind of token from the same mint)
//!  3. the daemon's share of a payment = latency − `redeem` from its Server-Timing header
//!  4. POST / (one at a time, p50/p95/max) while 2 000 idle connections are held: none (the
//!     reference), from one device, spread over 63 devices (the caps: 32 per address, 512 in
//!     all; what is over them is refused with a 503)
//!  5. the daemon's RSS (VmRSS, VmHWM) before and after 10 000 sessions opened and closed
//!     through the control socket
//! ```
//!
//! Prints a Markdown report and writes it to `BENCHMARKS.md` (section "API").
//! Options: `--duration S` (5), `--connections 1,16,64`, `--payments N` (200 per level),
//! `--pay-concurrency 1,16`, `--idle-payments N` (100 per idle row), `--sessions N` (10 000). `serve-static ADDR FILE` is the baseline server (internal).

use std::{
    collections::VecDeque,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tollgate::config::HttpLimits;
use tollgate_tests::{
    bench::{bare_cdk_wallet, machine, timing, write_section, Conn, Latencies},
    gateway::{http, in_ns, ns_runtime, write_config_value, Daemon, GatewayLab},
    netns::{Lab3, GW_LAN_IP},
};

const TOKEN_SAT: u64 = 16;
/// Idle connections held during the "payments while idle connections are held" rows, the
/// payments in each of those rows, and how long a row may take (the caps may refuse the
/// customer until the idle connections time out).
const IDLE_CONNECTIONS: usize = 2_000;
const IDLE_ROW_DEADLINE: Duration = Duration::from_secs(60);
/// Every payment comes from the one client IP: the per-IP limiter (default 30/min) must not
/// be what we measure.
const POST_RATE_PER_MINUTE: u32 = 6_000_000;

struct Opts {
    duration: Duration,
    connections: Vec<usize>,
    payments: usize,
    pay_concurrency: Vec<usize>,
    /// Payments per row with idle connections held; sessions before the memory row.
    idle_payments: usize,
    sessions: u32,
}

fn list(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse()
                .context("a comma-separated list of numbers")
        })
        .collect()
}

fn opts() -> Result<Opts> {
    let mut o = Opts {
        duration: Duration::from_secs(5),
        connections: vec![1, 16, 64],
        payments: 200,
        pay_concurrency: vec![1, 16],
        idle_payments: 100,
        sessions: 10_000,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().context("missing value");
        match a.as_str() {
            "--duration" => o.duration = Duration::from_secs_f64(val()?.parse()?),
            "--connections" => o.connections = list(val()?)?,
            "--payments" => o.payments = val()?.parse()?,
            "--pay-concurrency" => o.pay_concurrency = list(val()?)?,
            "--idle-payments" => o.idle_payments = val()?.parse()?,
            "--sessions" => o.sessions = val()?.parse()?,
            other => bail!("unknown option {other:?}"),
        }
    }
    Ok(o)
}

/// The baseline: axum answering a fixed body on `/`, nothing else (no middleware).
fn serve_static(addr: &str, file: &str) -> Result<()> {
    let body: &'static [u8] = Vec::leak(std::fs::read(file)?);
    let addr: SocketAddr = addr.parse()?;
    tokio::runtime::Runtime::new()?.block_on(async move {
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    body,
                )
            }),
        );
        let l = tokio::net::TcpListener::bind(addr).await?;
        axum::serve(l, app).await?;
        Ok(())
    })
}

/// Kills the child on drop (the baseline server).
struct Reaped(Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One timed run.
#[derive(Default)]
struct Run {
    ok: usize,
    errors: usize,
    elapsed: Duration,
    latency: Latencies,
    /// Per successful payment: (client latency ms, redeem ms, server total ms).
    timings: Vec<(f64, f64, f64)>,
}

impl Run {
    /// Merges the workers' runs; the elapsed time is the whole row's.
    async fn gather(set: &mut tokio::task::JoinSet<Run>, start: Instant) -> anyhow::Result<Run> {
        let mut total = Run::default();
        while let Some(r) = set.join_next().await {
            let r = r?;
            total.ok += r.ok;
            total.errors += r.errors;
            total.latency.extend(r.latency);
            total.timings.extend(r.timings);
        }
        total.elapsed = start.elapsed();
        Ok(total)
    }

    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

fn first_error(slot: &Mutex<Option<String>>, msg: String) {
    let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
    if s.is_none() {
        eprintln!("[bench] first error: {msg}");
        *s = Some(msg);
    }
}

/// `n` connections to `api` from `ips` (round robin) that send nothing. Connections the
/// daemon refuses (503, closed) are kept too: `still_open` tells them apart.
async fn hold_idle(api: SocketAddr, ips: &[Ipv4Addr], n: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
            break;
        };
        if sock
            .bind(SocketAddr::from((ips[i % ips.len()], 0)))
            .is_err()
        {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(2), sock.connect(api)).await {
            Ok(Ok(s)) => out.push(s),
            _ => break,
        }
    }
    out
}

/// One "payments while idle connections are held" row.
struct IdleRow {
    devices: usize,
    /// Idle connections the client side opened, and how many the daemon held open before and
    /// after the payments (the rest it refused with a 503 or closed).
    opened: usize,
    held_before: usize,
    held_after: usize,
    /// Connections of the customer refused (503 or closed) before its payments went through.
    refused: usize,
    run: Run,
}

/// How many of `conns` the daemon has neither answered nor closed.
async fn still_open(conns: &[tokio::net::TcpStream]) -> usize {
    let mut n = 0;
    for c in conns {
        let mut b = [0u8; 1];
        if matches!(c.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            n += 1;
        }
    }
    n
}

/// VmRSS and VmHWM (peak) of `pid`, KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("{name} of {pid}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Payments through a server whose caps may refuse us: each token is posted until it is
/// answered (a 503 from a full server, or a connection it closed, is retried after
/// RETRY_AFTER: the token never reached the wallet) or `deadline` passes. A payment's latency
/// includes its waits. Returns the run and the refusals met.
async fn pay_through_refusals(
    addr: SocketAddr,
    tokens: Vec<String>,
    deadline: Duration,
) -> (Run, usize) {
    const RETRY_AFTER: Duration = Duration::from_millis(100);
    let start = Instant::now();
    let (mut r, mut refused) = (Run::default(), 0);
    let mut conn: Option<Conn> = None;
    'tokens: for tok in tokens {
        let req = format!(
            "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\n\
             Content-Length: {}\r\n\r\n{tok}",
            tok.len()
        );
        let t = Instant::now();
        loop {
            if start.elapsed() > deadline {
                r.errors += 1;
                continue 'tokens;
            }
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match Conn::connect(addr).await {
                    Ok(c) => conn.insert(c),
                    Err(_) => {
                        refused += 1;
                        tokio::time::sleep(RETRY_AFTER).await;
                        continue;
                    }
                },
            };
            match c.request(req.as_bytes()).await {
                Ok(rep) if rep.status == 200 => {
                    r.latency.push(t.elapsed());
                    r.ok += 1;
                    break;
                }
                Ok(rep) if rep.status == 503 => {
                    refused += 1;
                    conn = None;
                    tokio::time::sleep(RETRY_AFTER).await;
                }
                Ok(rep) => {
                    r.errors += 1;
                    eprintln!(
                        "[bench] POST / status {}: {}",
                        rep.status,
                        String::from_utf8_lossy(&rep.body)
                    );
                    break;
                }
                Err(_) => {
                    refused += 1;
                    conn = None;
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
    }
    r.elapsed = start.elapsed();
    (r, refused)
}

/// Bytes of the files under `dir`, in KiB.
fn dir_kib(dir: &std::path::Path) -> u64 {
    fn bytes(dir: &std::path::Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => bytes(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    bytes(dir) / 1024
}

/// `conns` keep-alive connections sending `GET /` back to back for `duration`.
async fn get_load(addr: SocketAddr, conns: usize, duration: Duration) -> Result<Run> {
    let req: &'static [u8] = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n")
        .leak()
        .as_bytes();
    let err = Arc::new(Mutex::new(None));
    let mut set = tokio::task::JoinSet::new();
    let mut clients = Vec::new();
    for _ in 0..conns {
        clients.push(Conn::connect(addr).await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    for mut c in clients {
        let err = err.clone();
        set.spawn(async move {
            let mut r = Run::default();
            while Instant::now() < deadline {
                let t = Instant::now();
                match c.request(req).await {
                    Ok(rep) if rep.status == 200 => {
                        r.latency.push(t.elapsed());
                        r.ok += 1;
                    }
                    Ok(rep) => {
                        r.errors += 1;
                        first_error(&err, format!("GET / status {}", rep.status));
                    }
                    Err(e) => {
                        r.errors += 1;
                        first_error(&err, format!("GET /: {e:#}"));
                        c = match Conn::connect(addr).await {
                            Ok(c) => c,
                            Err(_) => break,
                        };
                    }
                }
            }
            r
        });
    }
    Run::gather(&mut set, start).await
}

/// `conc` connections each POSTing tokens from the shared queue until it is empty.
async fn post_load(addr: SocketAddr, conc: usize, tokens: Vec<String>) -> Result<Run> {
    let queue = Arc::new(Mutex::new(VecDeque::from(tokens)));
    let err = Arc::new(Mutex::new(None));
    let mut clients = Vec::new();
    for _ in 0..conc {
        clients.push(Conn::connect(addr).await?);
    }
    let mut set = tokio::task::JoinSet::new();
    let start = Instant::now();
    for mut c in clients {
        let (queue, err) = (queue.clone(), err.clone());
        set.spawn(async move {
            let mut r = Run::default();
            loop {
                let Some(tok) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else {
                    break;
                };
                let req = format!(
                    "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\n\
                     Content-Length: {}\r\n\r\n{tok}",
                    tok.len()
                );
                let t = Instant::now();
                match c.request(req.as_bytes()).await {
                    Ok(rep) if rep.status == 200 => {
                        let lat = t.elapsed();
                        r.latency.push(lat);
                        r.ok += 1;
                        let st = rep.server_timing.unwrap_or_default();
                        match (timing(&st, "redeem"), timing(&st, "total")) {
                            (Some(redeem), Some(total)) => {
                                r.timings.push((lat.as_secs_f64() * 1000.0, redeem, total))
                            }
                            _ => first_error(&err, format!("no Server-Timing redeem: {st:?}")),
                        }
                    }
                    Ok(rep) => {
                        r.errors += 1;
                        first_error(
                            &err,
                            format!(
                                "POST / status {}: {}",
                                rep.status,
                                String::from_utf8_lossy(&rep.body)
                            ),
                        );
                    }
                    Err(e) => {
                        r.errors += 1;
                        first_error(&err, format!("POST /: {e:#}"));
                        c = match Conn::connect(addr).await {
                            Ok(c) => c,
                            Err(_) => break,
                        };
                    }
                }
            }
            r
        });
    }
    Run::gather(&mut set, start).await
}

/// The same tokens received by a bare cdk wallet (SQLite file, like the daemon's) with
/// `conc` receives in flight: the swap alone.
async fn cdk_receive_load(
    mint_url: String,
    dir: PathBuf,
    conc: usize,
    tokens: Vec<String>,
) -> Result<Run> {
    let wallet = bare_cdk_wallet(&mint_url, &dir.join("bare-cdk.sqlite")).await?;
    // Keysets and mint info are fetched above, outside the timed part: the daemon's are warm.
    let queue = Arc::new(Mutex::new(VecDeque::from(tokens)));
    let err = Arc::new(Mutex::new(None));
    let mut set = tokio::task::JoinSet::new();
    let start = Instant::now();
    for _ in 0..conc {
        let (queue, err, w) = (queue.clone(), err.clone(), wallet.clone());
        set.spawn(async move {
            let mut r = Run::default();
            loop {
                let Some(tok) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else {
                    break;
                };
                let t = Instant::now();
                match w
                    .receive(&tok, cdk::wallet::ReceiveOptions::default())
                    .await
                {
                    Ok(_) => {
                        r.latency.push(t.elapsed());
                        r.ok += 1;
                    }
                    Err(e) => {
                        r.errors += 1;
                        first_error(&err, format!("cdk receive: {e}"));
                    }
                }
            }
            r
        });
    }
    Run::gather(&mut set, start).await
}

fn wait_listening(lab: &Lab3, addr: SocketAddr) -> Result<()> {
    let start = Instant::now();
    while !lab.client.run(move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
    }) {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("{addr} did not come up");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn lat_of(v: &[f64]) -> Latencies {
    Latencies(
        v.iter()
            .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0))
            .collect(),
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve-static") {
        return serve_static(&args[2], &args[3]);
    }
    let o = opts()?;
    let m = machine();
    // The test suite's gateway lab: namespaces, pins, temporary directories, a fee-free mint.
    let g = GatewayLab::new("bapi");
    let (lab, pins, tmp) = (&g.lab, &g.pins, &g.tmp);
    let (config_dir, state_dir) = (g.config_dir.clone(), g.state_dir.clone());
    let (grt, mint) = (g.rt.clone(), g.mint.clone());
    let offer = serde_json::json!({
        "url": mint.url(), "price_per_step": 1, "price_unit": "sat",
        "purchase_min_steps": 10, "min_balance": 64, "min_payout_amount": 1_000_000_000u64,
        "payout_interval_seconds": 86_400, "balance_tolerance_percent": 10
    });
    let config = serde_json::json!({
        "config_version": "v0.0.8", "log_level": "info",
        "metric": "bytes", "step_size": 1000,
        "accepted_mints": [offer],
        "profit_share": [{"identity": "owner", "factor": 1.0}],
        "reseller_mode": false,
        "post_rate_per_minute": POST_RATE_PER_MINUTE,
    });
    write_config_value(&config_dir, &config);
    let mut daemon = Daemon::start(lab, &config_dir, &state_dir, pins);
    eprintln!(
        "[bench] daemon {} up; mint {}",
        tollgate_tests::tollgate_bin().display(),
        mint.url()
    );
    let (st, ad) = http(&lab.client, "GET", "/", None);
    if st != 200 {
        bail!("GET / answered {st}");
    }
    let api = SocketAddr::from((GW_LAN_IP, 2121));
    let crt = ns_runtime(&lab.client);
    let mut get_rows = Vec::new();
    let get_sweep = |name: &'static str, rows: &mut Vec<(&'static str, usize, Run)>| {
        for &c in &o.connections {
            let d = o.duration;
            let r = in_ns(&lab.client, &crt, move || get_load(api, c, d))?;
            eprintln!(
                "[bench] {name} c={c}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
                r.rate(),
                r.latency.p(50.0),
                r.latency.p(99.0),
                r.errors
            );
            rows.push((name, c, r));
        }
        anyhow::Ok(())
    };

    // 1a. The baseline takes the daemon's place on 10.77.0.1:2121 while the daemon is stopped
    // (its data plane stays attached): the same port through the same walled-garden path,
    // answering the daemon's own advertisement bytes.
    daemon.stop();
    let ad_file = tmp.path().join("ad.json");
    std::fs::write(&ad_file, ad.as_bytes())?;
    let baseline = Reaped(
        lab.gateway
            .command(std::env::current_exe()?.to_str().context("exe path")?)
            .arg("serve-static")
            .arg(api.to_string())
            .arg(&ad_file)
            .stdout(Stdio::null())
            .spawn()
            .context("baseline server")?,
    );
    wait_listening(lab, api)?;
    get_sweep("baseline: static axum, same body", &mut get_rows)?;
    drop(baseline);

    // 1b. The daemon again, same state and pins.
    let daemon = Daemon::start(lab, &config_dir, &state_dir, pins);
    get_sweep("tollgate `GET /`", &mut get_rows)?;
    get_rows.rotate_left(o.connections.len()); // tollgate rows first

    // 2. POST /: tokens first, outside the timed part.
    let per_level = o.payments;
    let levels = o.pay_concurrency.len();
    // Two rows per level, three rows around idle connections, one warm-up.
    let n_tokens = per_level * levels * 2 + o.idle_payments * 3 + 1;
    eprintln!("[bench] minting {n_tokens} tokens of {TOKEN_SAT} sat");
    let mut tokens = {
        let mint = mint.clone();
        in_ns(&lab.gateway, &grt, move || async move {
            mint.mint_tokens(TOKEN_SAT, n_tokens).await
        })
    };
    // One untimed payment: the daemon's wallet fetches keysets on first use (the bare
    // wallet below fetches them before its clock starts too).
    let warm = tokens.pop().context("warm-up token")?;
    let (st, body) = http(&lab.client, "POST", "/", Some(("text/plain", &warm)));
    if st != 200 {
        bail!("warm-up payment answered {st}: {body}");
    }
    let brt = ns_runtime(&lab.gateway); // the bare wallet's own runtime, not the mint's
    let mut pay_rows = Vec::new();
    for &c in &o.pay_concurrency {
        let batch: Vec<String> = tokens.drain(..per_level).collect();
        let before = mint.handler_time();
        let r = in_ns(&lab.client, &crt, move || post_load(api, c, batch))?;
        let after = mint.handler_time();
        let mint_ms = (after.1 - before.1).as_secs_f64() * 1000.0 / r.ok.max(1) as f64;
        let mint_reqs = (after.0 - before.0) as f64 / r.ok.max(1) as f64;
        eprintln!(
            "[bench] tollgate POST / c={c}: {:.1} payments/s, p50 {:.1} ms, p99 {:.1} ms, {} errors",
            r.rate(),
            r.latency.p(50.0),
            r.latency.p(99.0),
            r.errors
        );
        let batch: Vec<String> = tokens.drain(..per_level).collect();
        let (url, dir) = (mint.url(), tmp.path().to_path_buf());
        let before_b = mint.handler_time();
        let b = in_ns(&lab.gateway, &brt, move || {
            cdk_receive_load(url, dir, c, batch)
        })?;
        let after_b = mint.handler_time();
        let mint_ms_b = (after_b.1 - before_b.1).as_secs_f64() * 1000.0 / b.ok.max(1) as f64;
        let mint_reqs_b = (after_b.0 - before_b.0) as f64 / b.ok.max(1) as f64;
        eprintln!(
            "[bench] bare cdk receive c={c}: {:.1} receives/s, p50 {:.1} ms, p99 {:.1} ms, {} errors",
            b.rate(),
            b.latency.p(50.0),
            b.latency.p(99.0),
            b.errors
        );
        pay_rows.push((c, r, b, (mint_ms, mint_reqs), (mint_ms_b, mint_reqs_b)));
    }
    // 4. Payments while idle connections are held: IDLE_CONNECTIONS opened (nothing sent)
    // from the attacking devices' addresses (extra addresses in the client namespace), then
    // payments one at a time from the customer's address; first with none held (the
    // reference, same conditions), then from one device, then spread over 63.
    tollgate_tests::raise_nofile(IDLE_CONNECTIONS as u64 + 1_024);
    let mut idle_rows = Vec::new();
    let extra: Vec<Ipv4Addr> = (100..163).map(|i| Ipv4Addr::new(10, 77, 0, i)).collect();
    for ip in &extra {
        lab.client
            .ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    }
    for devices in [0usize, 1, extra.len()] {
        let ips = extra[..devices.max(1)].to_vec();
        let n_idle = if devices == 0 { 0 } else { IDLE_CONNECTIONS };
        let batch: Vec<String> = tokens.drain(..o.idle_payments).collect();
        let row = in_ns(&lab.client, &crt, move || async move {
            let idle = hold_idle(api, &ips, n_idle).await;
            // Let the daemon accept (or refuse) every one of them first.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let held_before = still_open(&idle).await;
            let (r, refused) = pay_through_refusals(api, batch, IDLE_ROW_DEADLINE).await;
            let held_after = still_open(&idle).await;
            let opened = idle.len();
            drop(idle);
            IdleRow {
                devices,
                opened,
                held_before,
                held_after,
                refused,
                run: r,
            }
        });
        eprintln!(
            "[bench] POST / with {} idle from {devices} device(s) ({} held, {} after): \
             p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms, {} refusals, {} errors",
            row.opened,
            row.held_before,
            row.held_after,
            row.run.latency.p(50.0),
            row.run.latency.p(95.0),
            row.run.latency.p(100.0),
            row.refused,
            row.run.errors
        );
        idle_rows.push(row);
        // The closed idle connections leave the daemon's caps before the next row.
        std::thread::sleep(Duration::from_secs(1));
    }

    // 5. Memory after `--sessions` sessions, each opened (a grant of 1 MB) and closed through the
    // control socket: the operator's path through the chandler, the store and the valve.
    let sessions = o.sessions;
    let pid = daemon.child.id();
    let control = tollgate::control::ControlClient::new(
        state_dir.join(tollgate::control::SOCKET_NAME),
        Duration::from_secs(30),
    );
    let (rss_before, _) = memory_kib(pid)?;
    let t = Instant::now();
    in_ns(&lab.gateway, &grt, move || async move {
        for i in 0..sessions {
            let mac = format!(
                "02:bb:{:02x}:{:02x}:{:02x}:01",
                i >> 16,
                (i >> 8) & 0xff,
                i & 0xff
            );
            for target in [
                format!("/clients/{mac}/grant?amount=1000000"),
                format!("/clients/{mac}/close"),
            ] {
                let a = control.request("POST", &target, None).await?;
                if !(200..300).contains(&a.status) {
                    bail!(
                        "control {target}: {} {}",
                        a.status,
                        String::from_utf8_lossy(&a.body)
                    );
                }
            }
        }
        anyhow::Ok(())
    })?;
    let sessions_secs = t.elapsed().as_secs_f64();
    let (rss_after, hwm_after) = memory_kib(pid)?;
    let state_kib = dir_kib(&state_dir);
    eprintln!(
        "[bench] RSS {rss_before} KiB -> {rss_after} KiB (peak {hwm_after} KiB) after {sessions} \
         sessions in {sessions_secs:.0} s"
    );

    drop(daemon);
    let fsync = tollgate_tests::bench::fsync_probe(&state_dir, 100)?;

    // Report.
    let mut out = String::new();
    writeln!(out, "## API\n")?;
    writeln!(out, "{}\n", m.describe("cargo xtask bench api"))?;
    writeln!(
        out,
        "Setup: `tollgate run` ({} build) in the gateway namespace of a three-namespace lab \
         (real TC data plane, SQLite state, log level info), a cdk test mint (fee 0, fake \
         Lightning) on the gateway's loopback, and the load generator \
         (`tests/src/bin/bench-api.rs`, keep-alive HTTP/1.1) in the client namespace, all \
         on the same {} cores. The bench config raises `post_rate_per_minute` to {POST_RATE_PER_MINUTE} \
         (default 30 per client IP) because every payment comes from the one client IP; \
         `GET /` has no rate limit. The baseline for `GET /` is a minimal axum server \
         answering the daemon's advertisement bytes on 10.77.0.1:2121 while the daemon is \
         stopped (its data plane stays attached, so requests take the same kernel path).\n",
        if tollgate_tests::tollgate_bin().to_string_lossy().contains("/release/") {
            "release"
        } else {
            "**not a release**"
        },
        m.cores
    )?;
    writeln!(
        out,
        "### `GET /` (signed advertisement), {} s per row\n",
        o.duration.as_secs_f64()
    )?;
    writeln!(
        out,
        "| server | connections | req/s | p50 ms | p99 ms | errors |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|")?;
    for (name, c, r) in &get_rows {
        writeln!(
            out,
            "| {name} | {c} | {:.0} | {:.2} | {:.2} | {} |",
            r.rate(),
            r.latency.p(50.0),
            r.latency.p(99.0),
            r.errors
        )?;
    }
    let best_get = get_rows
        .iter()
        .filter(|r| r.0.starts_with("tollgate"))
        .map(|r| r.2.rate())
        .fold(0.0, f64::max);
    writeln!(
        out,
        "\nTarget `GET /` ≥ 20 000 req/s: best {best_get:.0} req/s — {}.\n",
        if best_get >= 20_000.0 {
            "met"
        } else {
            "not met in this run"
        }
    )?;
    writeln!(
        out,
        "### `POST /` (one {TOKEN_SAT}-sat token per payment, {per_level} payments per row, \
         tokens minted before the clock starts)\n"
    )?;
    writeln!(
        out,
        "| path | in flight | payments/s | p50 ms | p99 ms | errors | mint handler ms / payment (requests) |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|")?;
    for (c, r, b, mt, mtb) in &pay_rows {
        writeln!(
            out,
            "| tollgate `POST /` | {c} | {:.1} | {:.1} | {:.1} | {} | {:.1} ({:.1}) |",
            r.rate(),
            r.latency.p(50.0),
            r.latency.p(99.0),
            r.errors,
            mt.0,
            mt.1
        )?;
        writeln!(
            out,
            "| baseline: bare cdk wallet receive | {c} | {:.1} | {:.1} | {:.1} | {} | {:.1} ({:.1}) |",
            b.rate(),
            b.latency.p(50.0),
            b.latency.p(99.0),
            b.errors,
            mtb.0,
            mtb.1
        )?;
    }
    writeln!(
        out,
        "\n### The daemon's own share of a payment\n\n`redeem` is the wallet's receive as the \
         daemon timed it (its `Server-Timing` header: NUT-07 check + swap at the mint + wallet \
         bookkeeping); the daemon's share is everything else: HTTP, MAC lookup, grant rows, the \
         kernel map update, the signed kind-1022 answer.\n"
    )?;
    writeln!(
        out,
        "| in flight | redeem p50 / p99 ms | latency − redeem p50 / p99 ms | server total − redeem p50 / p99 ms |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|")?;
    let mut verdicts = Vec::new();
    for (c, r, ..) in &pay_rows {
        let redeem = lat_of(&r.timings.iter().map(|t| t.1).collect::<Vec<_>>());
        let client = lat_of(&r.timings.iter().map(|t| t.0 - t.1).collect::<Vec<_>>());
        let server = lat_of(&r.timings.iter().map(|t| t.2 - t.1).collect::<Vec<_>>());
        let p99 = client.p(99.0);
        verdicts.push(format!(
            "{c} in flight: p99 {p99:.2} ms — {}",
            if p99 <= 5.0 { "met" } else { "not met" }
        ));
        writeln!(
            out,
            "| {c} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} |",
            redeem.p(50.0),
            redeem.p(99.0),
            client.p(50.0),
            client.p(99.0),
            server.p(50.0),
            server.p(99.0)
        )?;
    }
    writeln!(
        out,
        "\nFor scale: one `fsync` on the state directory's filesystem took p50 {:.2} / p99 {:.2} ms \
         in this run; a payment makes one durable (fully synced) commit of the daemon's own, the \
         grant row before the redeem, besides the wallet's.",
        fsync.p(50.0),
        fsync.p(99.0)
    )?;
    writeln!(
        out,
        "\nTarget daemon overhead ≤ 5 ms p99 (latency − redeem): {}. With many payments in \
         flight on 2 cores, latency − redeem also holds the time a request waits for a CPU that \
         the mint, the load generator and the other payments are using.\n",
        verdicts.join("; ")
    )?;
    let limits = HttpLimits::default();
    writeln!(
        out,
        "### `POST /` while {IDLE_CONNECTIONS} idle connections are held\n\n\
         {IDLE_CONNECTIONS} TCP connections to :2121 that send nothing, opened from one \
         attacking device or spread over {} (extra addresses in the client namespace); one \
         second later, {} payments one at a time from the customer's own address. \
         The daemon's default caps: {} connections per client address, {} in all (the LAN API \
         and the portal port together); a connection over a cap is answered 503 and closed at \
         once, and one that sends no request head within {} s is closed. \"held\" counts the \
         idle connections the daemon still kept open before and after the payments. A refused \
         payment connection is retried every 100 ms (the token never reached the wallet), so \
         a payment's latency includes its waits; the row gives up after {} s.\n",
        extra.len(),
        o.idle_payments,
        limits.max_connections_per_ip,
        limits.max_connections,
        limits.header_read_timeout.as_secs(),
        IDLE_ROW_DEADLINE.as_secs()
    )?;
    writeln!(
        out,
        "| idle connections | held before / after | customer's connections refused | \
         payments | p50 ms | p95 ms | max ms | not paid |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for row in &idle_rows {
        let from = match row.devices {
            0 => "none (reference)".to_string(),
            1 => format!("{} from 1 device", row.opened),
            d => format!("{} from {d} devices", row.opened),
        };
        writeln!(
            out,
            "| {from} | {} / {} | {} | {} | {:.1} | {:.1} | {:.1} | {} |",
            row.held_before,
            row.held_after,
            row.refused,
            row.run.ok,
            row.run.latency.p(50.0),
            row.run.latency.p(95.0),
            row.run.latency.p(100.0),
            row.run.errors
        )?;
    }
    writeln!(
        out,
        "\n### Memory after {sessions} sessions\n\n{sessions} sessions, each opened (a grant \
         of 1 MB) and closed through the control socket one after the other \
         ({sessions_secs:.0} s; the operator's path through the chandler, the session store \
         and the kernel maps, not the wallet), after all the payments above. VmRSS and VmHWM \
         from `/proc/<pid>/status` of `tollgate run`.\n\n\
         | daemon RSS before | RSS after {sessions} sessions | peak RSS (VmHWM) | state \
         directory after |\n\
         |---:|---:|---:|---:|\n\
         | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB |\n",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        hwm_after as f64 / 1024.0,
        state_kib as f64 / 1024.0
    )?;
    print!("{out}");
    let path = write_section("## API", &out)?;
    eprintln!("[bench] wrote {path}");
    Ok(())
}
