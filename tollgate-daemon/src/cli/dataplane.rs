//! `tollgate dataplane …`: the kernel data plane alone, through its pins, without the daemon.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tollgate::ops;
use tollgate::valve::{
    self, Allowance, DataPlaneMode, Gates, MacAddr, Prefix, Valve, ValveConfig, DEFAULT_PIN_BASE,
};

#[derive(Args, Clone)]
pub struct DpOpts {
    /// LAN interface the clients are on.
    #[arg(long, default_value = "br-lan")]
    iface: String,
    /// Pin base directory (pins go to <base>/v<schema>/).
    #[arg(long, default_value = DEFAULT_PIN_BASE)]
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
    garden: Vec<Prefix>,
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
    fn config(self) -> ValveConfig {
        let mut c = ValveConfig::new(self.iface);
        c.pin_base = self.pin_base;
        c.mode = self.mode;
        c.gateway_v4 = self.gateway_v4;
        c.gateway_v6 = self.gateway_v6;
        c.tcp_ports = self.tcp_ports;
        c.garden = self.garden;
        c.portal_mark = self.portal_mark;
        c
    }
}

/// The pin base of the commands that only open the pins.
#[derive(Args, Clone)]
pub struct Pins {
    #[arg(long, default_value = DEFAULT_PIN_BASE)]
    pin_base: PathBuf,
}

impl Pins {
    fn open(&self) -> Result<Valve> {
        Ok(Valve::open_pinned(&self.pin_base)?)
    }
}

#[derive(Subcommand)]
pub enum DataplaneCmd {
    /// Attach to the interface (re-using pins) and stay up printing exhaustion events.
    /// Killing this process leaves the data plane enforcing.
    Attach {
        #[command(flatten)]
        dp: DpOpts,
    },
    /// Open a gate: `--bytes` and/or `--seconds` from now.
    Open {
        #[command(flatten)]
        p: Pins,
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
        #[command(flatten)]
        p: Pins,
        mac: MacAddr,
        #[arg(long, default_value_t = 0)]
        bytes: u64,
        #[arg(long, default_value_t = 0)]
        seconds: u64,
    },
    /// Close a gate (counters are kept).
    Close {
        #[command(flatten)]
        p: Pins,
        mac: MacAddr,
    },
    /// Print the pinned maps as JSON (the same report as `tollgate maps --json`).
    Show {
        #[command(flatten)]
        p: Pins,
    },
    /// Remove every pin (links detach, maps are freed).
    Detach {
        #[command(flatten)]
        p: Pins,
    },
}

pub async fn run(cmd: DataplaneCmd) -> Result<()> {
    match cmd {
        DataplaneCmd::Attach { dp } => {
            let valve = Valve::attach(&dp.config()).context("attaching the data plane")?;
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
            p,
            mac,
            bytes,
            seconds,
            bind,
        } => {
            let valve = p.open()?;
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
            p,
            mac,
            bytes,
            seconds,
        } => {
            let st = p
                .open()?
                .extend(mac, bytes, seconds.saturating_mul(1_000_000_000))?;
            println!("{}", serde_json::to_string(&st)?);
            Ok(())
        }
        DataplaneCmd::Close { p, mac } => {
            p.open()?.close(mac)?;
            Ok(())
        }
        DataplaneCmd::Show { p } => {
            let r = ops::maps_report(&p.open()?)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
        DataplaneCmd::Detach { p } => {
            Valve::remove_pins(&p.pin_base).with_context(|| {
                format!(
                    "removing pins under {}",
                    valve::pin_dir(&p.pin_base).display()
                )
            })?;
            Ok(())
        }
    }
}
