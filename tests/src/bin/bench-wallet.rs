//! `cargo xtask bench wallet`: the gateway wallet's `receive` against a real cdk mint on
//! loopback (fee 0 and 100 ppk), next to a bare cdk wallet receiving the same kind of token.
//!
//! ```text
//!  mint runtime (2 threads): TestMint, its handlers timed server-side (TestMint::handler_time)
//!  wallet runtime (2 threads): tollgate::wallet::Wallet::receive | cdk::Wallet::receive
//!  1. one at a time: latency, mint requests per receive, mint handler time per receive;
//!     the wallet's own share = latency − mint handler time (includes the HTTP client and
//!     loopback transport, so it is an upper bound on the wallet's own work)
//!  2. N in flight: receives/s
//! ```
//!
//!  3. as the wallet fills: `--fill N` receives (2 000) into fresh wallets, the two arms
//!     interleaved one receive each, p50 latency per window — cdk's default split loads
//!     every unspent proof on each receive, ours does not
//!
//! Tokens are minted before the clock starts; each wallet gets one untimed warm-up receive
//! (keysets, mint info). Prints a Markdown report and writes it to `BENCHMARKS.md` (section
//! "Wallet"). Options: `--receives N` (100 per row), `--concurrency 1,8`, `--fill N`.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tollgate::wallet::{MintSettings, Wallet, WalletSettings};
use tollgate_tests::{
    bench::{bare_cdk_wallet, machine, write_section, Latencies},
    mint::TestMint,
};

const TOKEN_SAT: u64 = 100;

#[derive(Clone)]
enum Receiver {
    Gateway(Wallet),
    Bare(Box<cdk::Wallet>),
}

impl Receiver {
    fn name(&self) -> &'static str {
        match self {
            Receiver::Gateway(_) => "tollgate wallet",
            Receiver::Bare(_) => "bare cdk wallet",
        }
    }

    async fn receive(&self, token: &str) -> Result<u64> {
        Ok(match self {
            Receiver::Gateway(w) => w.receive(token).await?.net,
            Receiver::Bare(w) => w
                .receive(token, cdk::wallet::ReceiveOptions::default())
                .await?
                .into(),
        })
    }
}

#[derive(Default)]
struct Row {
    ok: usize,
    errors: usize,
    elapsed: Duration,
    latency: Latencies,
    /// Sequential runs only: per receive (mint handler time, mint requests).
    mint: Vec<(Duration, u64)>,
    net: u64,
}

/// Receives `tokens` with `conc` in flight; per-receive mint accounting when `conc == 1`.
async fn run(r: Receiver, mint: Arc<TestMint>, conc: usize, tokens: Vec<String>) -> Result<Row> {
    let queue = Arc::new(Mutex::new(VecDeque::from(tokens)));
    let err: Arc<Mutex<Option<String>>> = Arc::default();
    let mut set = tokio::task::JoinSet::new();
    let start = Instant::now();
    for _ in 0..conc {
        let (queue, err, r, mint) = (queue.clone(), err.clone(), r.clone(), mint.clone());
        set.spawn(async move {
            let mut row = Row::default();
            loop {
                let Some(tok) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else {
                    break;
                };
                let before = mint.handler_time();
                let t = Instant::now();
                match r.receive(&tok).await {
                    Ok(net) => {
                        row.latency.push(t.elapsed());
                        let after = mint.handler_time();
                        row.mint.push((after.1 - before.1, after.0 - before.0));
                        row.ok += 1;
                        row.net += net;
                    }
                    Err(e) => {
                        row.errors += 1;
                        let mut s = err.lock().unwrap_or_else(|p| p.into_inner());
                        if s.is_none() {
                            eprintln!("[bench] first error ({}): {e:#}", r.name());
                            *s = Some(e.to_string());
                        }
                    }
                }
            }
            row
        });
    }
    let mut total = Row::default();
    while let Some(row) = set.join_next().await {
        let row = row?;
        total.ok += row.ok;
        total.errors += row.errors;
        total.net += row.net;
        total.latency.extend(row.latency);
        total.mint.extend(row.mint);
    }
    total.elapsed = start.elapsed();
    if conc > 1 {
        total.mint.clear(); // overlapping receives: per-receive attribution is meaningless
    }
    Ok(total)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// One arm pair on a fresh mint: the mint, its tokens (`n` of `sat`, minted before the clock
/// starts; two are spent on warm-ups), the wallets' directory and the two warmed-up wallets.
struct Setup {
    mint: Arc<TestMint>,
    tokens: Vec<String>,
    _dir: tempfile::TempDir,
    gw: Receiver,
    bare: Receiver,
}

fn setup(
    mrt: &tokio::runtime::Runtime,
    wrt: &tokio::runtime::Runtime,
    fee: u64,
    sat: u64,
    n: usize,
) -> Result<Setup> {
    let mint = Arc::new(mrt.block_on(TestMint::start(fee)));
    eprintln!("[bench] fee {fee} ppk: minting {n} tokens of {sat} sat");
    let mut tokens = {
        let mint = mint.clone();
        mrt.block_on(async move { mint.mint_tokens(sat, n).await })
    };
    let dir = tempfile::tempdir()?;
    let url = mint.url();
    std::fs::create_dir_all(dir.path().join("gateway"))?;
    let (gw, bare) = wrt.block_on(async {
        let gw = Wallet::open(
            &dir.path().join("gateway"),
            WalletSettings::new(vec![MintSettings::new(url.clone())]),
        )
        .await?;
        let bare = bare_cdk_wallet(&url, &dir.path().join("bare.sqlite")).await?;
        anyhow::Ok((Receiver::Gateway(gw), Receiver::Bare(Box::new(bare))))
    })?;
    for r in [&gw, &bare] {
        let tok = tokens.pop().context("warm-up token")?;
        wrt.block_on(r.receive(&tok))
            .with_context(|| format!("warm-up receive ({})", r.name()))?;
    }
    Ok(Setup {
        mint,
        tokens,
        _dir: dir,
        gw,
        bare,
    })
}

const FILL_SAT: u64 = 16;

/// Section 3: `fill` receives into fresh wallets, interleaved, latencies per window of
/// `fill / 8` receives: (receives so far, tollgate window, bare window).
fn fill_run(
    mrt: &tokio::runtime::Runtime,
    wrt: &tokio::runtime::Runtime,
    fill: usize,
) -> Result<Vec<(usize, Latencies, Latencies)>> {
    // Every field bound: the mint and the wallets' directory must outlive the loop.
    let Setup {
        mint: _mint,
        mut tokens,
        _dir,
        gw,
        bare,
    } = setup(mrt, wrt, 0, FILL_SAT, 2 * fill + 2)?;
    let window = (fill / 8).max(1);
    let mut rows = Vec::new();
    let (mut a, mut b) = (Latencies::default(), Latencies::default());
    for i in 0..fill {
        for (r, lat) in [(&gw, &mut a), (&bare, &mut b)] {
            let tok = tokens.pop().context("fill token")?;
            let t = Instant::now();
            wrt.block_on(r.receive(&tok))
                .with_context(|| format!("fill receive {i} ({})", r.name()))?;
            lat.0.push(t.elapsed());
        }
        if (i + 1) % window == 0 || i + 1 == fill {
            eprintln!(
                "[bench] fill {}: tollgate p50 {:.1} ms, bare cdk p50 {:.1} ms",
                i + 1,
                a.p(50.0),
                b.p(50.0)
            );
            rows.push((i + 1, std::mem::take(&mut a), std::mem::take(&mut b)));
        }
    }
    Ok(rows)
}

fn main() -> Result<()> {
    let mut receives = 100usize;
    let mut levels = vec![1usize, 8];
    let mut fill = 2000usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().context("missing value")?;
        match a.as_str() {
            "--receives" => receives = v.parse()?,
            "--fill" => fill = v.parse()?,
            "--concurrency" => {
                levels = v
                    .split(',')
                    .map(|x| x.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            other => bail!("unknown option {other:?}"),
        }
    }
    let m = machine();
    let mrt = runtime()?; // the mint's own threads
    let wrt = runtime()?; // the wallets' threads
    let mut rows = Vec::new();
    for fee in [0u64, 100] {
        let Setup {
            mint,
            mut tokens,
            _dir,
            gw,
            bare,
        } = setup(&mrt, &wrt, fee, TOKEN_SAT, receives * levels.len() * 2 + 2)?;
        for &c in &levels {
            for r in [&gw, &bare] {
                let batch: Vec<String> = tokens.drain(..receives).collect();
                let row = wrt.block_on(run(r.clone(), mint.clone(), c, batch))?;
                eprintln!(
                    "[bench] fee {fee} {} c={c}: {:.1}/s p50 {:.1} ms p99 {:.1} ms, {} errors",
                    r.name(),
                    row.ok as f64 / row.elapsed.as_secs_f64(),
                    row.latency.p(50.0),
                    row.latency.p(99.0),
                    row.errors
                );
                rows.push((fee, r.name(), c, row));
            }
        }
        drop(gw);
        drop(bare);
        drop(mint);
    }

    let fill_rows = fill_run(&mrt, &wrt, fill)?;

    let mut out = String::new();
    writeln!(out, "## Wallet\n")?;
    writeln!(out, "{}\n", m.describe("cargo xtask bench wallet"))?;
    writeln!(
        out,
        "Setup (`tests/src/bin/bench-wallet.rs`, {} build): a cdk test mint (fake Lightning) \
         on 127.0.0.1 with its own 2-thread runtime, the wallets on another 2-thread runtime in \
         the same process, {TOKEN_SAT}-sat tokens minted before the clock starts, one untimed \
         warm-up receive per wallet. \"tollgate wallet\" is `tollgate::wallet::Wallet::receive` \
         (SQLite ledger + write-ahead receipt + NUT-07 check + cdk receive on SQLite); \"bare \
         cdk wallet\" is `cdk::Wallet::receive` on a SQLite file. The mint's handlers are timed \
         server-side.\n",
        if cfg!(debug_assertions) {
            "**debug**"
        } else {
            "release"
        }
    )?;
    writeln!(
        out,
        "### Receives per second ({receives} receives per row)\n"
    )?;
    writeln!(
        out,
        "| mint fee (ppk) | wallet | in flight | receives/s | p50 ms | p99 ms | errors |"
    )?;
    writeln!(out, "|---:|---|---:|---:|---:|---:|---:|")?;
    for (fee, name, c, row) in &rows {
        writeln!(
            out,
            "| {fee} | {name} | {c} | {:.1} | {:.1} | {:.1} | {} |",
            row.ok as f64 / row.elapsed.as_secs_f64(),
            row.latency.p(50.0),
            row.latency.p(99.0),
            row.errors
        )?;
    }
    writeln!(
        out,
        "\n### Where a receive's time goes (one at a time)\n\n\"wallet share\" = receive \
         latency − time the mint's handlers spent on that receive's requests; it includes the \
         HTTP client and loopback transport, so it is an upper bound on the wallet's own work.\n"
    )?;
    writeln!(
        out,
        "| mint fee (ppk) | wallet | mint requests / receive | mint handler p50 / p99 ms | wallet share p50 / p99 ms | credited net / gross |"
    )?;
    writeln!(out, "|---:|---|---:|---:|---:|---:|")?;
    for (fee, name, _, row) in rows.iter().filter(|r| !r.3.mint.is_empty()) {
        let handler = Latencies(row.mint.iter().map(|m| m.0).collect());
        let share = Latencies(
            row.latency
                .0
                .iter()
                .zip(&row.mint)
                .map(|(l, m)| l.saturating_sub(m.0))
                .collect(),
        );
        let reqs = row.mint.iter().map(|m| m.1).sum::<u64>() as f64 / row.mint.len() as f64;
        writeln!(
            out,
            "| {fee} | {name} | {reqs:.1} | {:.2} / {:.2} | {:.2} / {:.2} | {} / {} |",
            handler.p(50.0),
            handler.p(99.0),
            share.p(50.0),
            share.p(99.0),
            row.net,
            row.ok as u64 * TOKEN_SAT
        )?;
    }
    writeln!(
        out,
        "\n### As the wallet fills ({fill} receives of {FILL_SAT} sat, fee 0, one at a time, \
         the arms interleaved)\n\nA gateway that runs for months holds thousands of proofs. cdk's \
         default receive (`SplitTarget::None`) loads and parses every unspent proof to refill a \
         stock of denominations; the gateway wallet asks for the plain power-of-two split \
         instead.\n"
    )?;
    writeln!(
        out,
        "| receives so far | tollgate wallet p50 / p99 ms | bare cdk wallet (default split) p50 / p99 ms |"
    )?;
    writeln!(out, "|---:|---:|---:|")?;
    for (upto, gw, bare) in &fill_rows {
        writeln!(
            out,
            "| {upto} | {:.1} / {:.1} | {:.1} / {:.1} |",
            gw.p(50.0),
            gw.p(99.0),
            bare.p(50.0),
            bare.p(99.0)
        )?;
    }
    writeln!(out)?;
    print!("{out}");
    let path = write_section("## Wallet", &out)?;
    eprintln!("[bench] wrote {path}");
    Ok(())
}
