//! The command tree (clap) and its dispatch: one file per command family.
//!
//! ```text
//! main ─> Cli::parse ─> run(cmd)
//!          run/config check ─> daemon.rs   (the daemon itself; config validation)
//!          status/clients/wallet …/gate …  ─> control socket (ControlClient) ─> ops/format
//!          maps, dataplane …               ─> the pinned maps directly (works without the daemon)
//!          wallet backup|restore           ─> the state directory directly
//! ```
//! Nothing here does a component's work: a command parses its flags, calls the component (or
//! the daemon's control socket) and prints the answer, as text or `--json`.

mod daemon;
mod dataplane;
mod gate;
mod wallet;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tollgate::config::{Config, CONFIG_DIR};
use tollgate::control::ControlClient;
use tollgate::ops::{self, format, ClientRow, StatusReport};
use tollgate::valve::{Valve, DEFAULT_PIN_BASE};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  error (the message says what went wrong)
  2  bad command line
  3  the daemon is not running (nothing answers on its control socket)
  4  not found (e.g. no session for that MAC)

Operator commands (status, clients, wallet balance|payouts|receive|send, gate, reload) talk to the
daemon over its control socket, <state dir>/control.sock (mode 0600). `maps`, `wallet backup`
and `wallet restore` work without the daemon.";

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Sell network access for Cashu ecash",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true)]
    pub log_json: bool,
    /// Run inside this network namespace (/run/netns/<name>), keeping the host's bpffs, so
    /// several gateways can run side by side on one machine.
    #[arg(long, global = true)]
    pub netns: Option<String>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the gateway daemon (merchant, chandler, wallet, HTTP API on the LAN).
    Run {
        #[command(flatten)]
        o: daemon::RunOpts,
    },
    /// Configuration tools.
    #[command(subcommand)]
    Config(daemon::ConfigCmd),
    /// The kernel data plane alone: attach, inspect and drive gates without the daemon.
    #[command(subcommand)]
    Dataplane(dataplane::DataplaneCmd),
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
        #[arg(long, default_value = DEFAULT_PIN_BASE)]
        pin_base: PathBuf,
        /// JSON with exact numbers.
        #[arg(long)]
        json: bool,
    },
    /// The merchant wallet.
    #[command(subcommand)]
    Wallet(wallet::WalletCmd),
    /// Administrative gate changes, recorded as admin-open / admin-extend / admin-close.
    #[command(subcommand)]
    Gate(gate::GateCmd),
    /// Re-read config.json (as SIGHUP): shaping and tier rates apply at once, to open
    /// sessions too; other changed settings are listed as needing a restart.
    Reload {
        #[command(flatten)]
        c: CtlOpts,
    },
}

pub async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Run { o } => daemon::run(o).await,
        Cmd::Config(c) => daemon::config(c),
        Cmd::Dataplane(c) => dataplane::run(c).await,
        Cmd::Status { c } => {
            let r: StatusReport = c.client()?.get_json("/ops/status").await?;
            print_out(c.json, &r, format::status)
        }
        Cmd::Clients { c } => {
            let r: Vec<ClientRow> = c.client()?.get_json("/ops/clients").await?;
            print_out(c.json, &r, |r| format::clients(r))
        }
        Cmd::Maps { pin_base, json } => {
            let valve = Valve::open_pinned(&pin_base)?;
            let r = ops::maps_report(&valve)?;
            print_out(json, &r, format::maps)
        }
        Cmd::Wallet(w) => wallet::run(w).await,
        Cmd::Gate(g) => gate::run(g).await,
        Cmd::Reload { c } => {
            let r: tollgate::reload::ReloadReport =
                c.client()?.post_json("/ops/reload", &()).await?;
            print_out(c.json, &r, |r| {
                let mut o = format!("reloaded: {} gate(s) changed rate\n", r.gates);
                if !r.needs_restart.is_empty() {
                    o.push_str(&format!(
                        "needs a restart to apply: {}\n",
                        r.needs_restart.join(", ")
                    ));
                }
                o
            })
        }
    }
}

/// How the operator commands reach the daemon.
#[derive(Args, Clone)]
pub struct CtlOpts {
    /// The daemon's control socket [default: <state dir>/control.sock].
    #[arg(long)]
    control_socket: Option<PathBuf>,
    #[command(flatten)]
    dirs: Dirs,
    /// JSON with exact numbers instead of the 80-column text.
    #[arg(long)]
    pub json: bool,
}

impl CtlOpts {
    fn client(&self) -> Result<ControlClient> {
        let path = match &self.control_socket {
            Some(p) => p.clone(),
            None => tollgate::control::default_socket(&self.dirs.state_dir()?),
        };
        Ok(ControlClient::new(path, Duration::from_secs(90)))
    }
}

/// Where the configuration and the state live.
#[derive(Args, Clone)]
pub struct Dirs {
    /// State directory [default: store.state_dir of config.json, else /var/lib/tollgate].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long, default_value = CONFIG_DIR)]
    config_dir: PathBuf,
}

impl Dirs {
    /// The flag, else config.json's, else the default. A config.json that does not load is an
    /// error, not a silent fall back to the default directory.
    fn state_dir(&self) -> Result<PathBuf> {
        match &self.state_dir {
            Some(s) => Ok(s.clone()),
            None => Ok(Config::state_dir_in(&self.config_dir)?),
        }
    }

    fn config_dir(&self) -> &Path {
        &self.config_dir
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

/// One secret or token from stdin (at most 1 MiB), trimmed; empty is an error.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The command lines the packaging files run (systemd's ExecStart*, procd's command),
    /// with shell variables expanded the way the init script sets them.
    fn packaged_command_lines() -> Vec<String> {
        let unit = include_str!("../../dist/tollgate.service");
        let init = include_str!("../../dist/tollgate.init");
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

    /// A config.json that does not load must not send the operator's commands to the default
    /// state directory (the old code fell back to /var/lib/tollgate silently).
    #[test]
    fn a_broken_config_is_an_error_not_the_default_state_dir() {
        let dir = std::env::temp_dir().join(format!("tg-cli-dirs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dirs = |d: &Path| Dirs {
            state_dir: None,
            config_dir: d.to_path_buf(),
        };
        // No config.json: the documented default.
        assert_eq!(
            dirs(&dir).state_dir().unwrap(),
            PathBuf::from(tollgate::config::DEFAULT_STATE_DIR)
        );
        std::fs::write(dir.join("config.json"), "{ not json").unwrap();
        std::fs::write(dir.join("identities.json"), "{}").unwrap();
        let err = dirs(&dir).state_dir().unwrap_err();
        assert!(format!("{err:#}").contains("config.json"), "{err:#}");
        // The flag wins without reading anything.
        let d = Dirs {
            state_dir: Some("/x".into()),
            config_dir: dir.clone(),
        };
        assert_eq!(d.state_dir().unwrap(), PathBuf::from("/x"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
