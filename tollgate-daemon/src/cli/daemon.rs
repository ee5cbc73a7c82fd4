//! `tollgate run` and `tollgate config check`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use tollgate::config::{Config, CONFIG_DIR};

#[derive(Args, Clone)]
pub struct RunOpts {
    /// Directory with config.json and identities.json (created with defaults when empty).
    #[arg(long, default_value = CONFIG_DIR)]
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

pub async fn run(o: RunOpts) -> Result<()> {
    let overrides = tollgate::config::Overrides {
        state_dir: o.state_dir,
        lan_iface: o.lan_iface,
        wan_iface: o.wan_iface,
        listen: o.listen,
        admin_listen: o.admin_listen,
    };
    let cfg = tollgate::daemon::load_config(&o.config_dir, &overrides)?;
    tollgate::daemon::run(cfg, overrides, o.pin_base, o.control_socket).await
}

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Validate config.json and identities.json without starting anything.
    Check {
        #[arg(long, default_value = CONFIG_DIR)]
        config_dir: PathBuf,
    },
}

pub fn config(cmd: ConfigCmd) -> Result<()> {
    match cmd {
        ConfigCmd::Check { config_dir } => {
            let cfg = Config::load(&config_dir)?;
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
