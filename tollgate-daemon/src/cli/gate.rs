//! `tollgate gate open|extend|close`: administrative gate changes through the daemon (recorded
//! as admin-open / admin-extend / admin-close).

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use tollgate::ops::{format, ClientRow, GateRequest};
use tollgate::valve::MacAddr;

use super::{print_out, CtlOpts};

#[derive(Args, Clone)]
pub struct GateAmount {
    /// Bytes to grant (gateways selling bytes).
    #[arg(long, conflicts_with = "seconds")]
    bytes: Option<u64>,
    /// Seconds to grant (gateways selling time).
    #[arg(long)]
    seconds: Option<u64>,
    /// Download rate limit in kbit/s for this device (0 = unlimited; default: unchanged, or
    /// `shaping.down_kbit` for a new session).
    #[arg(long)]
    down_kbit: Option<u64>,
    /// Upload rate limit in kbit/s (0 = unlimited; default as for `--down-kbit`).
    #[arg(long)]
    up_kbit: Option<u64>,
}

#[derive(Subcommand)]
pub enum GateCmd {
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

pub async fn run(cmd: GateCmd) -> Result<()> {
    let (c, mac, action, a) = match cmd {
        GateCmd::Open { c, mac, a } => (c, mac, "open", Some(a)),
        GateCmd::Extend { c, mac, a } => (c, mac, "extend", Some(a)),
        GateCmd::Close { c, mac } => (c, mac, "close", None),
    };
    let req = a.map_or(GateRequest::default(), |a| GateRequest {
        bytes: a.bytes,
        seconds: a.seconds,
        down_kbit: a.down_kbit,
        up_kbit: a.up_kbit,
    });
    if action != "close" && req.bytes.is_none() && req.seconds.is_none() {
        bail!("give --bytes N or --seconds N");
    }
    let r: ClientRow = c
        .client()?
        .post_json(&format!("/ops/gate/{mac}/{action}"), &req)
        .await?;
    print_out(c.json, &r, |r| format::clients(std::slice::from_ref(r)))
}
