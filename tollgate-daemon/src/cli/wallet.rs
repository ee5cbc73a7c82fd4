//! `tollgate wallet …`: balance, payouts, receive, send and rebalance go through the daemon;
//! backup and restore work on the state directory without it.

use std::io::IsTerminal;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use tollgate::config::Config;
use tollgate::ops::{
    format, BalanceRow, PayoutRow, RebalanceAnswer, RebalanceRequest, ReceiveAnswer,
    ReceiveRequest, SendAnswer, SendRequest,
};

use super::{print_out, read_stdin, CtlOpts, Dirs};

#[derive(Subcommand)]
pub enum WalletCmd {
    /// Balance, reserved and available per accepted mint.
    Balance {
        #[command(flatten)]
        c: CtlOpts,
    },
    /// Every profit payout attempt.
    Payouts {
        #[command(flatten)]
        c: CtlOpts,
    },
    /// Fund the wallet with a Cashu token (read from stdin when omitted or `-`).
    Receive {
        #[command(flatten)]
        c: CtlOpts,
        token: Option<String>,
    },
    /// Create a token worth AMOUNT (what the receiver nets after its swap fee) and print it.
    /// The token is bearer money: whoever holds it can spend it.
    Send {
        #[command(flatten)]
        c: CtlOpts,
        #[arg(long)]
        mint: String,
        #[arg(long)]
        amount: u64,
    },
    /// Move AMOUNT sat to the accepted mint --to over Lightning, from --from or else from the
    /// accepted mint with the most available. Fees (Lightning + input fees) are capped by
    /// rebalance.fee_budget_percent; a kill midway is finished or undone at the next start.
    Rebalance {
        #[command(flatten)]
        c: CtlOpts,
        #[arg(long)]
        to: String,
        #[arg(long)]
        amount: u64,
        #[arg(long)]
        from: Option<String>,
    },
    /// Print the wallet's BIP-39 words (read from the state directory; no daemon needed).
    /// Refuses when stdout is not a terminal (a pipe or a log file would keep the seed)
    /// unless --force.
    Backup {
        #[command(flatten)]
        dirs: Dirs,
        /// Print even when stdout is not a terminal.
        #[arg(long)]
        force: bool,
    },
    /// Recreate the wallet from its words in an EMPTY state directory and restore its funds
    /// from every accepted mint (NUT-09/13). Words come from stdin unless --mnemonic.
    /// Run it before the first `tollgate run` on that directory.
    Restore {
        #[command(flatten)]
        dirs: Dirs,
        /// The words (visible to other users in the process list: prefer stdin).
        #[arg(long)]
        mnemonic: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: WalletCmd) -> Result<()> {
    match cmd {
        WalletCmd::Balance { c } => {
            let r: Vec<BalanceRow> = c.client()?.get_json("/ops/wallet/balance").await?;
            print_out(c.json, &r, |r| format::balances(r))
        }
        WalletCmd::Payouts { c } => {
            let r: Vec<PayoutRow> = c.client()?.get_json("/ops/wallet/payouts").await?;
            print_out(c.json, &r, |r| format::payouts(r))
        }
        WalletCmd::Receive { c, token } => {
            let token = match token.as_deref() {
                None | Some("-") => read_stdin("the token")?,
                Some(t) => t.trim().to_string(),
            };
            let r: ReceiveAnswer = c
                .client()?
                .post_json("/ops/wallet/receive", &ReceiveRequest { token })
                .await?;
            print_out(c.json, &r, format::received)
        }
        WalletCmd::Send { c, mint, amount } => {
            if amount == 0 {
                bail!("--amount must be at least 1");
            }
            let r: SendAnswer = c
                .client()?
                .post_json("/ops/wallet/send", &SendRequest { mint, amount })
                .await?;
            if c.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                // The token alone on stdout (pipe it on); the details to stderr.
                eprintln!(
                    "token worth {} (receiver nets {} after a fee of {}) from {}; op id {}",
                    r.value, r.amount, r.receiver_fee, r.mint, r.op_id
                );
                println!("{}", r.token);
            }
            Ok(())
        }
        WalletCmd::Rebalance {
            c,
            to,
            amount,
            from,
        } => {
            if amount == 0 {
                bail!("--amount must be at least 1");
            }
            let r: RebalanceAnswer = c
                .client()?
                .post_json(
                    "/ops/wallet/rebalance",
                    &RebalanceRequest { to, amount, from },
                )
                .await?;
            print_out(c.json, &r, format::rebalanced)
        }
        WalletCmd::Backup { dirs, force } => {
            if !std::io::stdout().is_terminal() && !force {
                bail!(
                    "refusing to print the wallet seed to a pipe or file (it would stay there); \
                     run it on a terminal, or pass --force"
                );
            }
            let path = dirs.state_dir()?.join("seed");
            let words = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the wallet seed {}", path.display()))?;
            println!("{}", words.trim());
            Ok(())
        }
        WalletCmd::Restore {
            dirs,
            mnemonic,
            json,
        } => {
            let cfg = Config::load(dirs.config_dir())?;
            let dir = match dirs.state_dir {
                Some(ref d) => d.clone(),
                None => cfg.store.state_dir.clone(),
            };
            let words = match mnemonic {
                Some(m) => m,
                None => read_stdin("the mnemonic")?,
            };
            if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
                bail!(
                    "{} is not empty: restore only into an empty state directory (a running \
                     or previous wallet there would be overwritten)",
                    dir.display()
                );
            }
            let restored =
                tollgate::wallet::Wallet::restore(&dir, &words, cfg.wallet_settings()).await;
            let w = match restored {
                Ok(w) => w,
                Err(e) => {
                    // It was empty: leave it empty, so the restore can simply be retried.
                    if let Ok(entries) = std::fs::read_dir(&dir) {
                        for e in entries.flatten() {
                            let _ = std::fs::remove_file(e.path());
                        }
                    }
                    return Err(e).context("restoring the wallet");
                }
            };
            let rows: Vec<BalanceRow> = w
                .balances()
                .await?
                .into_iter()
                .map(BalanceRow::from)
                .collect();
            print_out(json, &rows, |r| format::balances(r))
        }
    }
}
