//! Crash-test harness: opens the real wallet on a state dir against a mint on loopback (hosted
//! by the test process, so killing this process leaves the mint running) and performs one
//! operation, printing progress markers the test waits for:
//!
//! ```text
//! wallet-harness --state DIR --mint URL [--mint URL2 …] [--owner ADDR] [--kill-at POINT] <op> [arg]
//!   op: open | receive (token on stdin) | send <amount> | payout | rebalance <to> <amount> [from]
//! stdout: OPENED <balance> · AT <point> (every wallet test-hook point) ·
//!         RECEIVED <net> <replayed> · TOKEN <op_id> <value> <token> · PAYOUT <outcomes> ·
//!         REBALANCED <state> <amount> <fee> · DONE
//! ```
//! The first `--mint` is the one `open`, `send` and `payout` use; settings are
//! `tollgate_tests::crash::settings_for`, the same the test reopens the wallet with.
//! `--kill-at POINT` SIGKILLs the process the moment the wallet reaches that hook point
//! (`receive:pending`, `send:confirmed`, `melt:recorded`, …): no destructor, no flush, no
//! SQLite close — the same as a power cut as far as the process is concerned.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use tollgate::wallet::{TestHook, Wallet};
use tollgate_tests::crash::settings_for;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // Unbuffered as far as the test is concerned: it kills us right after reading a line.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut state = None;
    let mut mints = Vec::new();
    let mut owner = None;
    let mut kill_at: Option<String> = None;
    let mut rest = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--state" => state = args.next().map(PathBuf::from),
            "--mint" => mints.extend(args.next()),
            "--owner" => owner = args.next(),
            "--kill-at" => kill_at = args.next(),
            _ => rest.push(a),
        }
    }
    let state = state.context("--state")?;
    let mint = mints.first().context("--mint")?.clone();
    let mut settings = settings_for(&mints, owner.as_deref());
    settings.test_hook = TestHook::new(move |point| {
        say(&format!("AT {point}"));
        if kill_at.as_deref() == Some(point) {
            // SAFETY: plain syscalls on our own pid.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    });

    let wallet = Wallet::open(&state, settings).await?;
    let balance = wallet.available_balance(&mint).await?;
    say(&format!("OPENED {balance}"));
    match rest.first().map(String::as_str) {
        Some("open") => {}
        Some("receive") => {
            let mut token = String::new();
            std::io::stdin().read_to_string(&mut token)?;
            let r = wallet.receive(&token).await?;
            say(&format!("RECEIVED {} {}", r.net, r.replayed));
        }
        Some("send") => {
            let amount: u64 = rest.get(1).context("send <amount>")?.parse()?;
            let t = wallet.create_payment_token(&mint, amount, None).await?;
            say(&format!("TOKEN {} {} {}", t.op_id, t.value, t.token));
        }
        Some("payout") => {
            let records = wallet.payout_once(&mint).await?;
            let outcomes: Vec<String> = records
                .iter()
                .map(|r| format!("{}:{}+{}", r.outcome, r.amount, r.fee))
                .collect();
            say(&format!("PAYOUT {}", outcomes.join(",")));
        }
        Some("rebalance") => {
            let to = rest.get(1).context("rebalance <to> <amount> [from]")?;
            let amount: u64 = rest.get(2).context("rebalance <to> <amount>")?.parse()?;
            let r = wallet
                .rebalance(to, amount, rest.get(3).map(String::as_str))
                .await?;
            say(&format!("REBALANCED {} {} {}", r.state, r.amount, r.fee));
        }
        other => bail!("unknown operation {other:?}"),
    }
    say("DONE");
    Ok(())
}
