//! The crash harness from the test side: run `wallet-harness` (src/bin/wallet-harness.rs) on
//! a state directory, SIGKILL it at a named wallet hook point, while a request is held at the
//! mint ([`crate::mint::Gate`]) or after a delay, then audit the wallet's database proof by
//! proof against the mint (NUT-07): the mint is the judge of where the money is.
//! Used by `tests/wallet_crash.rs` and `tests/wallet_rebalance.rs`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cdk::cdk_database::WalletDatabase;
use cdk::nuts::{CheckStateRequest, State, Token};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tollgate::wallet::{MintSettings, ProfitShare, WalletSettings};

use crate::mint::{GateMode, TestMint};

/// How a harness run ends.
#[derive(Debug, Clone)]
pub enum Kill {
    /// Runs to completion.
    Never,
    /// SIGKILLs itself at this wallet hook point.
    At(&'static str),
    /// Killed while the mint holds its next request to this path.
    Gate(&'static str, GateMode),
    /// Killed this long after it reported the wallet open.
    After(Duration),
}

pub struct Run {
    pub lines: Vec<String>,
    pub killed: bool,
    /// Time from `OPENED` to exit.
    pub op_time: Duration,
    pub stderr: String,
}

impl Run {
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix).map(str::trim))
    }
}

/// Settings the harness uses too (see src/bin/wallet-harness.rs): every mint accepted,
/// payouts from 1 sat, loopback LNURL, a 10 % rebalance fee budget.
pub fn settings(mints: &[&TestMint], owner: Option<&str>) -> WalletSettings {
    let urls: Vec<String> = mints.iter().map(|m| m.url()).collect();
    settings_for(&urls, owner)
}

/// [`settings`] by mint URL (what the harness process gets on its command line).
pub fn settings_for(urls: &[String], owner: Option<&str>) -> WalletSettings {
    let mints = urls
        .iter()
        .map(|url| {
            let mut m = MintSettings::new(url.clone());
            m.min_payout_amount = 1;
            m
        })
        .collect();
    let mut s = WalletSettings::new(mints);
    s.allow_loopback_lnurl = true;
    s.rebalance_fee_budget_percent = HARNESS_REBALANCE_FEE_PERCENT;
    if let Some(addr) = owner {
        s.profit_share = vec![ProfitShare {
            identity: "owner".to_string(),
            factor: 1.0,
            lightning_address: addr.to_string(),
        }];
    }
    s
}

/// The rebalance fee budget the harness runs with.
pub const HARNESS_REBALANCE_FEE_PERCENT: u64 = 10;

/// Run `wallet-harness` (path `harness`: pass `env!("CARGO_BIN_EXE_wallet-harness")`) on
/// `dir` with every mint in `mints` accepted (the first is the one `open`, `send` and
/// `payout` use; a [`Kill::Gate`] is armed at it), and kill it as `kill` says.
pub async fn run_harness(
    harness: &str,
    dir: &Path,
    mints: &[&TestMint],
    owner: Option<&str>,
    op: &[&str],
    stdin: Option<&str>,
    kill: &Kill,
) -> Run {
    let mint = mints[0];
    let mut cmd = tokio::process::Command::new(harness);
    cmd.arg("--state").arg(dir);
    for m in mints {
        cmd.arg("--mint").arg(m.url());
    }
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    if let Some(o) = owner {
        cmd.arg("--owner").arg(o);
    }
    if let Kill::At(point) = kill {
        cmd.arg("--kill-at").arg(point);
    }
    cmd.args(op);
    let seen = mint.gate().held_count();
    if let Kill::Gate(path, mode) = kill {
        mint.gate().arm(path, *mode);
    }
    let mut child = cmd.spawn().expect("spawn wallet-harness");
    if let Some(input) = stdin {
        let mut w = child.stdin.take().expect("stdin");
        w.write_all(input.as_bytes()).await.expect("write stdin");
        drop(w);
    }
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut err = child.stderr.take().expect("stderr");
    let stderr_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut err, &mut s).await;
        s
    });
    let mut lines = Vec::new();
    let mut opened = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let kill_now = tokio::select! {
            line = out.next_line() => match line.expect("read harness stdout") {
                Some(l) => {
                    if l.starts_with("OPENED") {
                        opened = Some(Instant::now());
                    }
                    lines.push(l);
                    false
                }
                None => break,
            },
            true = async {
                match (kill, opened) {
                    (Kill::After(d), Some(t)) => {
                        tokio::time::sleep_until(tokio::time::Instant::from_std(t + *d)).await;
                        true
                    }
                    (Kill::Gate(..), _) => mint.gate().wait_held(seen, Duration::from_secs(60)).await,
                    _ => std::future::pending().await,
                }
            } => true,
            _ = tokio::time::sleep_until(deadline) => panic!("harness hung: {lines:?}"),
        };
        if kill_now {
            let _ = child.start_kill();
            // Whatever it managed to print before dying.
            while let Ok(Some(l)) = out.next_line().await {
                lines.push(l);
            }
            break;
        }
    }
    let status = child.wait().await.expect("wait harness");
    if let Kill::Gate(..) = kill {
        // The operation may have finished without touching that endpoint.
        mint.gate().disarm();
        if mint.gate().held_count() > seen {
            let done = mint.gate().finished_count();
            mint.gate().release();
            assert!(
                mint.gate()
                    .wait_finished(done, Duration::from_secs(30))
                    .await,
                "gate never finished"
            );
        }
    }
    use std::os::unix::process::ExitStatusExt;
    Run {
        killed: status.signal() == Some(libc::SIGKILL),
        op_time: opened.map(|t| t.elapsed()).unwrap_or_default(),
        lines,
        stderr: stderr_task.await.unwrap_or_default(),
    }
}

/// What the wallet's database holds, checked proof by proof with the mint (NUT-07).
#[derive(Debug, Default)]
pub struct Audit {
    /// Locally unspent and unspent at the mint.
    pub unspent: u64,
    /// Locally unspent but spent or pending at the mint: value the wallet counts but has not.
    pub phantom: u64,
    /// Locally reserved / pending / pending-spent.
    pub stuck: u64,
}

pub async fn audit(dir: &Path, mint: &TestMint) -> Audit {
    let db = cdk_sqlite::WalletSqliteDatabase::new(dir.join("wallet.sqlite"))
        .await
        .expect("open wallet db");
    // Only this mint's proofs: another mint would call a Y it never saw "unspent".
    let url: cdk::mint_url::MintUrl = mint.url().parse().expect("mint url");
    let proofs = db
        .get_proofs(Some(url), None, None, None)
        .await
        .expect("proofs");
    let mut a = Audit::default();
    let unspent: Vec<_> = proofs
        .iter()
        .filter(|p| p.state == State::Unspent)
        .collect();
    for p in &proofs {
        if matches!(
            p.state,
            State::Reserved | State::Pending | State::PendingSpent
        ) {
            a.stuck += u64::from(p.proof.amount);
        }
    }
    if !unspent.is_empty() {
        let states = mint_states(mint, unspent.iter().map(|p| p.y).collect()).await;
        for (p, s) in unspent.iter().zip(states) {
            if s == State::Unspent {
                a.unspent += u64::from(p.proof.amount);
            } else {
                a.phantom += u64::from(p.proof.amount);
            }
        }
    }
    a
}

pub async fn mint_states(mint: &TestMint, ys: Vec<cdk::nuts::PublicKey>) -> Vec<State> {
    let w = mint.new_wallet().await;
    let resp = w
        .mint_connector()
        .post_check_state(CheckStateRequest { ys: ys.clone() })
        .await
        .expect("checkstate");
    // The mint answers in request order; match by Y to be sure.
    ys.iter()
        .map(|y| {
            resp.states
                .iter()
                .find(|s| s.y == *y)
                .map(|s| s.state)
                .expect("state for every Y")
        })
        .collect()
}

pub async fn token_spent(mint: &TestMint, token: &str) -> bool {
    let t: Token = token.parse().expect("token");
    let ys = t
        .token_secrets()
        .iter()
        .map(|s| cdk::dhke::hash_to_curve(s.as_bytes()).expect("y"))
        .collect();
    let states = mint_states(mint, ys).await;
    assert!(
        states.iter().all(|s| *s == states[0]),
        "token half spent: {states:?}"
    );
    states[0] == State::Spent
}

pub async fn assert_clean(dir: &Path, mint: &TestMint, balance: u64, ctx: &str) {
    let a = audit(dir, mint).await;
    assert_eq!(a.phantom, 0, "{ctx}: wallet counts spent proofs: {a:?}");
    assert_eq!(a.stuck, 0, "{ctx}: proofs stuck reserved/pending: {a:?}");
    assert_eq!(a.unspent, balance, "{ctx}: balance vs proofs: {a:?}");
}

/// After a kill the mint may hold the dead client's swap or melt half-done: hyper cancels
/// the handler when the client's connection closes, and cdk's mint only resolves such sagas
/// in its start-up recovery. Model "the mint restarts too": give in-flight work a moment,
/// then run that recovery. (Nothing of ours is in flight: the harness is dead and the gate
/// has finished.)
pub async fn settle_mint(mint: &TestMint) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    mint.inner()
        .recover_from_incomplete_sagas()
        .await
        .expect("mint swap recovery");
    mint.inner()
        .recover_from_incomplete_melt_sagas()
        .await
        .expect("mint melt recovery");
}

/// How many cdk sagas the wallet in `dir` has open; each one is printed (state and data), so a
/// failing "sagas left" says which.
pub async fn incomplete_sagas(dir: &Path) -> usize {
    let db = cdk_sqlite::WalletSqliteDatabase::new(dir.join("wallet.sqlite"))
        .await
        .expect("open wallet db");
    let sagas = db.get_incomplete_sagas().await.expect("sagas");
    for s in &sagas {
        eprintln!("incomplete saga {} {:?} {:?}", s.id, s.state, s.data);
    }
    sagas.len()
}

/// How many of cdk's incomplete sagas in `dir` are anything but a swap in `SwapRequested` (the
/// one residue cdk is known to leave after a payout round that followed a kill: see
/// `wallet_crash.rs`, `payout_survives_kill_anywhere`).
pub async fn sagas_other_than_requested_swaps(dir: &Path) -> usize {
    use cdk::wallet::types::{SwapSagaState, WalletSagaState};
    let db = cdk_sqlite::WalletSqliteDatabase::new(dir.join("wallet.sqlite"))
        .await
        .expect("open wallet db");
    let sagas = db.get_incomplete_sagas().await.expect("sagas");
    sagas
        .iter()
        .filter(|s| !matches!(s.state, WalletSagaState::Swap(SwapSagaState::SwapRequested)))
        .count()
}

/// Put `amount` (a power of two) into the wallet in `dir` as ONE proof of its own, whatever
/// split the wallet's own receive would choose: with one big proof every send of a smaller
/// amount needs a swap. A cdk wallet on the same database and seed does the receive, so the
/// proof is the wallet's own (derived, restorable). Call with the wallet closed.
pub async fn fund_as_one_proof(dir: &Path, mint: &TestMint, amount: u64) {
    assert!(amount.is_power_of_two(), "one proof holds a power of two");
    let words = std::fs::read_to_string(dir.join("seed")).expect("wallet seed");
    let seed = bip39::Mnemonic::parse(words.trim())
        .expect("mnemonic")
        .to_seed_normalized("");
    let db = cdk_sqlite::WalletSqliteDatabase::new(dir.join("wallet.sqlite"))
        .await
        .expect("open wallet db");
    let w = cdk::wallet::WalletBuilder::new()
        .mint_url(mint.url().parse().expect("mint url"))
        .unit(cdk::nuts::CurrencyUnit::Sat)
        .localstore(std::sync::Arc::new(db))
        .seed(seed)
        .without_rate_limiting()
        .build()
        .expect("build wallet");
    let opts = cdk::wallet::ReceiveOptions {
        amount_split_target: cdk::amount::SplitTarget::Values(vec![cdk::Amount::from(amount)]),
        ..Default::default()
    };
    let got: u64 = w
        .receive(&mint.mint_token(amount).await, opts)
        .await
        .expect("receive as one proof")
        .into();
    assert_eq!(got, amount, "fund_as_one_proof needs a fee-free mint");
}

/// Seeded xorshift: random kill delays, reproducible from the printed seed.
struct Rng(u64);
impl Rng {
    /// `seed` unless `TOLLGATE_CRASH_SEED` is set; the seed in use is printed.
    fn seeded(seed: u64) -> Rng {
        let seed = std::env::var("TOLLGATE_CRASH_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(seed | 1);
        eprintln!("crash test seed {seed} (TOLLGATE_CRASH_SEED to replay)");
        Rng(seed)
    }
    fn new() -> Rng {
        let seed = std::env::var("TOLLGATE_CRASH_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    | 1
            });
        eprintln!("crash test seed {seed} (TOLLGATE_CRASH_SEED to replay)");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

pub fn iters() -> usize {
    std::env::var("TOLLGATE_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

/// `n` kills after random delays over about the time `clean` took, from a fixed `seed` (CI
/// runs the same delays every time; `TOLLGATE_CRASH_SEED` overrides it).
pub fn random_kills(seed: u64, n: usize, clean: Duration) -> Vec<Kill> {
    let mut rng = Rng::seeded(seed);
    let span = (clean.as_micros() as u64 * 12 / 10).max(1000);
    (0..n)
        .map(|_| Kill::After(Duration::from_micros(rng.below(span))))
        .collect()
}

/// Kills for one operation: each named point, each gate, then random delays over about the
/// time a clean run took (so most land inside the mint round trip).
pub fn kills(
    points: &[&'static str],
    gates: &[(&'static str, GateMode)],
    clean: Duration,
) -> Vec<Kill> {
    let mut rng = Rng::new();
    let mut v: Vec<Kill> = points.iter().map(|p| Kill::At(p)).collect();
    v.extend(gates.iter().map(|(p, m)| Kill::Gate(p, *m)));
    let span = (clean.as_micros() as u64 * 12 / 10).max(1000);
    for _ in 0..iters() {
        v.push(Kill::After(Duration::from_micros(rng.below(span))));
    }
    v
}
