//! The `tollgate` command line.

use std::{net::Ipv4Addr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tollgate::control::{exit, ControlClient, ControlError};
use tollgate::ops::{
    self, format, BalanceRow, ClientRow, GateRequest, PayoutRow, RebalanceAnswer, RebalanceRequest,
    ReceiveAnswer, ReceiveRequest, SendAnswer, SendRequest, StatusReport,
};
use tollgate::valve::{self, Allowance, DataPlaneMode, Gates, MacAddr, Prefix, Valve, ValveConfig};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  error (the message says what went wrong)
  2  bad command line
  3  the daemon is not running (nothing answers on its control socket)
  4  not found (e.g. no session for that MAC)

Operator commands (status, clients, wallet balance|payouts|receive|send, gate) talk to the
daemon over its control socket, <state dir>/control.sock (mode 0600). `maps`, `wallet backup`
and `wallet restore` work without the daemon.";

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Sell network access for Cashu ecash",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    /// Run inside this network namespace (/run/netns/<name>), keeping the host's bpffs, so
    /// several gateways can run side by side on one machine.
    #[arg(long, global = true)]
    netns: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway daemon (merchant, chandler, wallet, HTTP API on the LAN).
    Run {
        #[command(flatten)]
        o: RunOpts,
    },
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// The kernel data plane alone: attach, inspect and drive gates without the daemon.
    #[command(subcommand)]
    Dataplane(DataplaneCmd),
    /// Gateway, data plane, mints (probed), balances, upstream and warnings.
    Status {
        #[command(flatten)]
        c: CtlOpts,
    },
    /// Every device with a session: IP, state, allotment, usage, what is left, expiry.
    Clients {
        #[command(flatten)]
        c: CtlOpts,
    },
    /// The pinned BPF maps decoded: config, garden, gates, counters, verdicts. Reads the pins
    /// directly: works while the daemon is stopped.
    Maps {
        #[arg(long, default_value = "/sys/fs/bpf/tollgate")]
        pin_base: PathBuf,
        /// JSON with exact numbers.
        #[arg(long)]
        json: bool,
    },
    /// The merchant wallet.
    #[command(subcommand)]
    Wallet(WalletCmd),
    /// Administrative gate changes, recorded as admin-open / admin-extend / admin-close.
    #[command(subcommand)]
    Gate(GateCmd),
}

/// How the operator commands reach the daemon.
#[derive(Args, Clone)]
struct CtlOpts {
    /// The daemon's control socket [default: <state dir>/control.sock].
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// State directory [default: store.state_dir of config.json, else /var/lib/tollgate].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long, default_value = "/etc/tollgate")]
    config_dir: PathBuf,
    /// JSON with exact numbers instead of the 80-column text.
    #[arg(long)]
    json: bool,
}

/// Where the state lives: the flag, else config.json's, else the default.
fn state_dir_of(state_dir: &Option<PathBuf>, config_dir: &std::path::Path) -> PathBuf {
    if let Some(s) = state_dir {
        return s.clone();
    }
    tollgate::config::Config::load(config_dir)
        .map(|c| c.store.state_dir)
        .unwrap_or_else(|_| PathBuf::from("/var/lib/tollgate"))
}

impl CtlOpts {
    fn client(&self) -> ControlClient {
        let path = self.control_socket.clone().unwrap_or_else(|| {
            tollgate::control::default_socket(&state_dir_of(&self.state_dir, &self.config_dir))
        });
        ControlClient::new(path, Duration::from_secs(90))
    }
}

#[derive(Subcommand)]
enum WalletCmd {
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
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long, default_value = "/etc/tollgate")]
        config_dir: PathBuf,
        /// Print even when stdout is not a terminal.
        #[arg(long)]
        force: bool,
    },
    /// Recreate the wallet from its words in an EMPTY state directory and restore its funds
    /// from every accepted mint (NUT-09/13). Words come from stdin unless --mnemonic.
    /// Run it before the first `tollgate run` on that directory.
    Restore {
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long, default_value = "/etc/tollgate")]
        config_dir: PathBuf,
        /// The words (visible to other users in the process list: prefer stdin).
        #[arg(long)]
        mnemonic: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
struct GateAmount {
    /// Bytes to grant (gateways selling bytes).
    #[arg(long, conflicts_with = "seconds")]
    bytes: Option<u64>,
    /// Seconds to grant (gateways selling time).
    #[arg(long)]
    seconds: Option<u64>,
}

#[derive(Subcommand)]
enum GateCmd {
    /// Open a session for a device that has none.
    Open {
        #[command(flatten)]
        c: CtlOpts,
        mac: MacAddr,
        #[command(flatten)]
        a: GateAmount,
    },
    /// Add to a device's active session without interrupting it.
    Extend {
        #[command(flatten)]
        c: CtlOpts,
        mac: MacAddr,
        #[command(flatten)]
        a: GateAmount,
    },
    /// End a device's session now.
    Close {
        #[command(flatten)]
        c: CtlOpts,
        mac: MacAddr,
    },
}

#[derive(Args, Clone)]
struct RunOpts {
    /// Directory with config.json and identities.json (created with defaults when empty).
    #[arg(long, default_value = "/etc/tollgate")]
    config_dir: PathBuf,
    /// State directory (wallet, sessions); overrides config.json.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// LAN interface; overrides config.json.
    #[arg(long)]
    lan_iface: Option<String>,
    /// WAN interface; overrides config.json.
    #[arg(long)]
    wan_iface: Option<String>,
    /// HTTP API address (addr:port); overrides config.json.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Admin API address (addr:port); overrides config.json.
    #[arg(long)]
    admin_listen: Option<std::net::SocketAddr>,
    /// Pin base directory for the data plane (default /sys/fs/bpf/tollgate).
    #[arg(long)]
    pin_base: Option<PathBuf>,
    /// Control socket for the operator commands [default: <state dir>/control.sock].
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

impl RunOpts {
    fn overrides(&self) -> tollgate::daemon::Overrides {
        tollgate::daemon::Overrides {
            state_dir: self.state_dir.clone(),
            lan_iface: self.lan_iface.clone(),
            wan_iface: self.wan_iface.clone(),
            listen: self.listen,
            admin_listen: self.admin_listen,
        }
    }
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate config.json and identities.json without starting anything.
    Check {
        #[arg(long, default_value = "/etc/tollgate")]
        config_dir: PathBuf,
    },
}

#[derive(Args, Clone)]
struct DpOpts {
    /// LAN interface the clients are on.
    #[arg(long, default_value = "br-lan")]
    iface: String,
    /// Pin base directory (pins go to <base>/v<schema>/).
    #[arg(long, default_value = "/sys/fs/bpf/tollgate")]
    pin_base: PathBuf,
    /// tc (default) or xdp for the ingress verdict.
    #[arg(long, default_value = "tc", value_parser = parse_mode)]
    mode: DataPlaneMode,
    /// The gateway's LAN IPv4 address.
    #[arg(long)]
    gateway_v4: Option<Ipv4Addr>,
    /// The gateway's LAN IPv6 addresses (at most two).
    #[arg(long)]
    gateway_v6: Vec<std::net::Ipv6Addr>,
    /// TCP ports on the gateway open to unpaid clients.
    #[arg(long = "tcp-port", default_values_t = vec![2121u16])]
    tcp_ports: Vec<u16>,
    /// Destinations open to unpaid clients (CIDR; repeatable).
    #[arg(long = "allow")]
    garden: Vec<String>,
    /// skb mark for the captive-portal redirect of unpaid TCP/80.
    #[arg(long)]
    portal_mark: Option<u32>,
}

fn parse_mode(s: &str) -> Result<DataPlaneMode, String> {
    match s {
        "tc" => Ok(DataPlaneMode::Tc),
        "xdp" => Ok(DataPlaneMode::Xdp),
        _ => Err(format!("unknown data plane mode {s:?} (tc or xdp)")),
    }
}

impl DpOpts {
    fn config(&self) -> Result<ValveConfig> {
        let mut c = ValveConfig::new(&self.iface);
        c.pin_base = self.pin_base.clone();
        c.mode = self.mode;
        c.gateway_v4 = self.gateway_v4;
        c.gateway_v6 = self.gateway_v6.clone();
        c.tcp_ports = self.tcp_ports.clone();
        c.garden = self
            .garden
            .iter()
            .map(|s| s.parse::<Prefix>())
            .collect::<Result<_, _>>()?;
        c.portal_mark = self.portal_mark;
        Ok(c)
    }
}

#[derive(Subcommand)]
enum DataplaneCmd {
    /// Attach to the interface (re-using pins) and stay up printing exhaustion events.
    /// Killing this process leaves the data plane enforcing.
    Attach {
        #[command(flatten)]
        dp: DpOpts,
    },
    /// Open a gate: `--bytes` and/or `--seconds` from now.
    Open {
        #[arg(long, default_value = "/sys/fs/bpf/tollgate")]
        pin_base: PathBuf,
        mac: MacAddr,
        #[arg(long)]
        bytes: Option<u64>,
        #[arg(long)]
        seconds: Option<u64>,
        /// Bind the client to this IPv4 source address (anti-spoofing).
        #[arg(long)]
        bind: Option<Ipv4Addr>,
    },
    /// Extend an open gate without a gap.
    Extend {
        #[arg(long, default_value = "/sys/fs/bpf/tollgate")]
        pin_base: PathBuf,
        mac: MacAddr,
        #[arg(long, default_value_t = 0)]
        bytes: u64,
        #[arg(long, default_value_t = 0)]
        seconds: u64,
    },
    /// Close a gate (counters are kept).
    Close {
        #[arg(long, default_value = "/sys/fs/bpf/tollgate")]
        pin_base: PathBuf,
        mac: MacAddr,
    },
    /// Print gates, counters and verdicts as JSON.
    Show {
        #[arg(long, default_value = "/sys/fs/bpf/tollgate")]
        pin_base: PathBuf,
    },
    /// Remove every pin (links detach, maps are freed).
    Detach {
        #[arg(long, default_value = "/sys/fs/bpf/tollgate")]
        pin_base: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    if let Some(ns) = &cli.netns {
        // Before the runtime exists, so every thread is created inside the namespace.
        if let Err(e) = enter_netns(ns) {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = e
                .chain()
                .find_map(|c| c.downcast_ref::<ControlError>())
                .map_or(exit::ERROR, ControlError::exit_code);
            ExitCode::from(code)
        }
    }
}

fn enter_netns(name: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let path = PathBuf::from("/run/netns").join(name);
    let f = std::fs::File::open(&path)
        .with_context(|| format!("network namespace {}", path.display()))?;
    // SAFETY: setns with a valid namespace fd; only the calling (main) thread exists yet.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Dataplane(c) => dataplane(c).await,
        Cmd::Run { o } => {
            let cfg = tollgate::daemon::load_config(&o.config_dir, &o.overrides())?;
            tollgate::daemon::run(cfg, o.pin_base.clone(), o.control_socket.clone()).await
        }
        Cmd::Status { c } => {
            let r: StatusReport = c.client().get_json("/ops/status").await?;
            print_out(c.json, &r, format::status)
        }
        Cmd::Clients { c } => {
            let r: Vec<ClientRow> = c.client().get_json("/ops/clients").await?;
            print_out(c.json, &r, |r| format::clients(r))
        }
        Cmd::Maps { pin_base, json } => {
            let valve = Valve::open_pinned(&pin_base)?;
            let r = ops::maps_report(&valve)?;
            print_out(json, &r, format::maps)
        }
        Cmd::Wallet(w) => wallet(w).await,
        Cmd::Gate(g) => gate(g).await,
        Cmd::Config(ConfigCmd::Check { config_dir }) => {
            let cfg = tollgate::config::Config::load(&config_dir)?;
            println!(
                "{}: ok ({} accepted mint(s), metric {:?})",
                config_dir.display(),
                cfg.merchant.mints.len(),
                cfg.merchant.metric
            );
            Ok(())
        }
    }
}

/// JSON (pretty, exact numbers) or the human text.
fn print_out<T: serde::Serialize>(json: bool, v: &T, human: impl Fn(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print!("{}", human(v));
    }
    Ok(())
}

fn read_stdin(what: &str) -> Result<String> {
    use std::io::Read;
    let mut s = String::new();
    std::io::stdin()
        .take(1 << 20)
        .read_to_string(&mut s)
        .with_context(|| format!("reading {what} from stdin"))?;
    let s = s.trim().to_string();
    if s.is_empty() {
        bail!("no {what} on stdin");
    }
    Ok(s)
}

async fn wallet(cmd: WalletCmd) -> Result<()> {
    match cmd {
        WalletCmd::Balance { c } => {
            let r: Vec<BalanceRow> = c.client().get_json("/ops/wallet/balance").await?;
            print_out(c.json, &r, |r| format::balances(r))
        }
        WalletCmd::Payouts { c } => {
            let r: Vec<PayoutRow> = c.client().get_json("/ops/wallet/payouts").await?;
            print_out(c.json, &r, |r| format::payouts(r))
        }
        WalletCmd::Receive { c, token } => {
            let token = match token.as_deref() {
                None | Some("-") => read_stdin("the token")?,
                Some(t) => t.trim().to_string(),
            };
            let r: ReceiveAnswer = c
                .client()
                .post_json("/ops/wallet/receive", &ReceiveRequest { token })
                .await?;
            print_out(c.json, &r, |r| {
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
            })
        }
        WalletCmd::Send { c, mint, amount } => {
            if amount == 0 {
                bail!("--amount must be at least 1");
            }
            let r: SendAnswer = c
                .client()
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
                .client()
                .post_json(
                    "/ops/wallet/rebalance",
                    &RebalanceRequest { to, amount, from },
                )
                .await?;
            print_out(c.json, &r, |r| {
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
            })
        }
        WalletCmd::Backup {
            state_dir,
            config_dir,
            force,
        } => {
            let dir = state_dir_of(&state_dir, &config_dir);
            let path = dir.join("seed");
            let words = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the wallet seed {}", path.display()))?;
            // SAFETY: isatty on the stdout fd has no preconditions.
            let tty = unsafe { libc::isatty(libc::STDOUT_FILENO) } == 1;
            if !tty && !force {
                bail!(
                    "refusing to print the wallet seed to a pipe or file (it would stay there); \
                     run it on a terminal, or pass --force"
                );
            }
            println!("{}", words.trim());
            Ok(())
        }
        WalletCmd::Restore {
            state_dir,
            config_dir,
            mnemonic,
            json,
        } => {
            let cfg = tollgate::config::Config::load(&config_dir)?;
            let dir = state_dir.unwrap_or_else(|| cfg.store.state_dir.clone());
            if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
                bail!(
                    "{} is not empty: restore only into an empty state directory (a running \
                     or previous wallet there would be overwritten)",
                    dir.display()
                );
            }
            let words = match mnemonic {
                Some(m) => m,
                None => read_stdin("the mnemonic")?,
            };
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

async fn gate(cmd: GateCmd) -> Result<()> {
    let (c, mac, action, a) = match cmd {
        GateCmd::Open { c, mac, a } => (c, mac, "open", Some(a)),
        GateCmd::Extend { c, mac, a } => (c, mac, "extend", Some(a)),
        GateCmd::Close { c, mac } => (c, mac, "close", None),
    };
    let req = a.map_or(GateRequest::default(), |a| GateRequest {
        bytes: a.bytes,
        seconds: a.seconds,
    });
    if action != "close" && req.bytes.is_none() && req.seconds.is_none() {
        bail!("give --bytes N or --seconds N");
    }
    let r: ClientRow = c
        .client()
        .post_json(&format!("/ops/gate/{mac}/{action}"), &req)
        .await?;
    print_out(c.json, &r, |r| format::clients(std::slice::from_ref(r)))
}

async fn dataplane(cmd: DataplaneCmd) -> Result<()> {
    match cmd {
        DataplaneCmd::Attach { dp } => {
            let valve = Valve::attach(&dp.config()?).context("attaching the data plane")?;
            let mut events = valve.events()?;
            println!("attached {} ({:?})", valve.iface(), valve.mode());
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Some(ev) => println!(
                            "exhausted {} {:?} generation={} up={} down={}",
                            ev.mac, ev.reason, ev.generation, ev.usage.bytes_up, ev.usage.bytes_down
                        ),
                        None => return Ok(()),
                    },
                    _ = tokio::signal::ctrl_c() => {
                        println!("detaching the process; the data plane stays pinned and enforcing");
                        return Ok(());
                    }
                }
            }
        }
        DataplaneCmd::Open {
            pin_base,
            mac,
            bytes,
            seconds,
            bind,
        } => {
            let valve = Valve::open_pinned(&pin_base)?;
            let until =
                seconds.map(|s| valve.now_boot_ns() + Duration::from_secs(s).as_nanos() as u64);
            let st = valve.open(
                mac,
                Allowance {
                    bytes,
                    until_boot_ns: until,
                    bind_ipv4: bind,
                    ..Default::default()
                },
            )?;
            println!("{}", serde_json::to_string(&st)?);
            Ok(())
        }
        DataplaneCmd::Extend {
            pin_base,
            mac,
            bytes,
            seconds,
        } => {
            let valve = Valve::open_pinned(&pin_base)?;
            let st = valve.extend(mac, bytes, seconds * 1_000_000_000)?;
            println!("{}", serde_json::to_string(&st)?);
            Ok(())
        }
        DataplaneCmd::Close { pin_base, mac } => {
            let valve = Valve::open_pinned(&pin_base)?;
            valve.close(mac)?;
            Ok(())
        }
        DataplaneCmd::Show { pin_base } => {
            let valve = Valve::open_pinned(&pin_base)?;
            let verdicts: serde_json::Map<String, serde_json::Value> = valve
                .verdicts()?
                .0
                .into_iter()
                .map(|(v, p, b)| {
                    (
                        v.name().to_string(),
                        serde_json::json!({"packets": p, "bytes": b}),
                    )
                })
                .collect();
            let out = serde_json::json!({
                "pin_dir": valve.pin_dir(),
                "gates": valve.gates()?,
                "verdicts": verdicts,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        DataplaneCmd::Detach { pin_base } => {
            Valve::remove_pins(&pin_base).with_context(|| {
                format!(
                    "removing pins under {}",
                    valve::pin_dir(&pin_base).display()
                )
            })?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command lines the packaging files run (systemd's ExecStart*, procd's command),
    /// with shell variables expanded the way the init script sets them.
    fn packaged_command_lines() -> Vec<String> {
        let unit = include_str!("../dist/tollgate.service");
        let init = include_str!("../dist/tollgate.init");
        let mut lines: Vec<String> = unit
            .lines()
            .filter_map(|l| {
                l.strip_prefix("ExecStart=")
                    .or(l.strip_prefix("ExecStartPre="))
            })
            .map(str::to_string)
            .collect();
        let vars = [
            ("\"$PROG\"", "/usr/bin/tollgate"),
            ("\"$CONFIG_DIR\"", "/etc/tollgate"),
            ("\"$STATE_DIR\"", "/etc/tollgate/state"),
        ];
        for l in init.lines().map(str::trim) {
            let cmd = l
                .strip_prefix("procd_set_param command ")
                .or_else(|| l.strip_suffix(" || return 1"));
            if let Some(c) = cmd {
                let mut c = c.to_string();
                for (k, v) in vars {
                    c = c.replace(k, v);
                }
                lines.push(c);
            }
        }
        lines
    }

    #[test]
    fn packaging_files_run_commands_this_binary_accepts() {
        let lines = packaged_command_lines();
        assert_eq!(
            lines.len(),
            4,
            "two systemd and two procd command lines: {lines:?}"
        );
        for line in lines {
            let argv: Vec<&str> = line.split_whitespace().collect();
            assert!(argv[0].ends_with("/tollgate"), "{line}");
            if let Err(e) = Cli::try_parse_from(&argv) {
                panic!("`{line}` does not parse: {e}");
            }
        }
    }
}
