//! The `tollgate` command line.

use std::{net::Ipv4Addr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tollgate::valve::{self, Allowance, DataPlaneMode, Gates, MacAddr, Prefix, Valve, ValveConfig};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Sell network access for Cashu ecash"
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
}

impl RunOpts {
    fn overrides(&self) -> tollgate::daemon::Overrides {
        tollgate::daemon::Overrides {
            state_dir: self.state_dir.clone(),
            lan_iface: self.lan_iface.clone(),
            wan_iface: self.wan_iface.clone(),
            listen: self.listen,
            admin_listen: self.admin_listen,
            pin_base: self.pin_base.clone(),
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
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
            tollgate::daemon::run(cfg, o.pin_base.clone()).await
        }
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
