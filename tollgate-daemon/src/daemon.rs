//! `tollgate run`: wires the components together and runs them until a shutdown signal.
//!
//! ```text
//!  config ─> valve (attach, reuse pins) ─> wallet (recover sagas) ─> store
//!        ─> chandler.reconcile()   kernel ⇄ database: no free access, no lost allotment
//!        ─> merchant.reconcile()   grants redeemed before a crash are applied
//!        ─> lightning settle_open  invoices paid while we were down are minted and granted
//!        ─> portal redirect (sysctl + nft table, when dataplane.portal_redirect is on)
//!  (before the valve: fq root qdisc on the LAN when `shaping` sets a rate; removed at exit)
//!        ─> tasks: chandler (exhaustion events), payouts, lightning quotes, mint probe,
//!           upstream buyer (reseller mode),
//!           HTTP (LAN; + portal port), admin HTTP (loopback, + /metrics),
//!           control socket (<state_dir>/control.sock, 0600: the operator API)
//!  SIGHUP ─> config.json re-read: shaping and tier rates applied live (reload.rs)
//!  SIGINT/SIGTERM ─> tasks stop in reverse order, the nft table is removed; the data plane
//!                    stays pinned and enforcing
//! ```

use std::{net::IpAddr, path::PathBuf, sync::Arc};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    chandler::Chandler,
    config::{Config, Overrides},
    http::{self, AppState},
    merchant::{Merchant, Redeemer},
    neighbour::KernelNeighbours,
    ops::{self, GatewayInfo, OpsState},
    portal,
    store::Store,
    supervisor::{Policy, Supervisor},
    upstream::Upstream,
    valve::{Gates, Valve, ValveConfig},
    wallet::Wallet,
};

/// Loads `config.json` + `identities.json`, creating a working default set when the directory
/// has none, and applies the overrides.
pub fn load_config(dir: &std::path::Path, o: &Overrides) -> Result<Config> {
    if !dir.join(crate::config::CONFIG_FILE).exists() {
        Config::write_default(dir)?;
        tracing::warn!(
            dir = %dir.display(),
            "no configuration found: wrote a default config.json and identities.json (fresh merchant key, mode 0600)"
        );
    }
    Ok(Config::load_with(dir, o)?)
}

/// The valve's configuration derived from the daemon's.
pub fn valve_config(cfg: &Config, pin_base: Option<&PathBuf>) -> Result<ValveConfig> {
    let iface = cfg
        .dataplane
        .lan_interface
        .clone()
        .context("no LAN interface: set lan_interface in config.json or pass --lan-iface")?;
    let (v4, mut v6) = crate::sys::iface_addrs(&iface)?;
    v6.truncate(2); // the data plane's config holds two gateway IPv6 addresses
    let mut v = ValveConfig::new(&iface);
    if let Some(p) = pin_base {
        v.pin_base = p.clone();
    }
    v.mode = cfg.dataplane.mode;
    v.gateway_v4 = v4.or(match cfg.http.listen.ip() {
        IpAddr::V4(a) if !a.is_unspecified() => Some(a),
        _ => None,
    });
    v.gateway_v6 = v6;
    let mut ports = vec![cfg.http.listen.port()];
    if cfg.http.portal_port != cfg.http.listen.port() {
        ports.push(cfg.http.portal_port);
    }
    v.tcp_ports = ports;
    // XDP cannot mark packets: config validation leaves the mark unset in that mode.
    v.portal_mark = cfg.dataplane.portal_mark;
    v.max_clients = Some(cfg.dataplane.max_clients);
    v.dns_budget = Some(cfg.dataplane.dns_budget);
    v.default_rates = cfg.shaping.rates();
    v.garden = cfg.dataplane.garden_allow.clone();
    Ok(v)
}

/// Runs the daemon until SIGINT/SIGTERM, with the control socket at `control_socket`
/// (default `<state_dir>/control.sock`). `overrides` (what `cfg` was loaded with) apply to a
/// `SIGHUP` reload too.
pub async fn run(
    cfg: Config,
    overrides: Overrides,
    pin_base: Option<PathBuf>,
    control_socket: Option<PathBuf>,
) -> Result<()> {
    // Before anything is attached: an exposed admin API without a token is a config error.
    cfg.http_limits
        .check_admin_listen(cfg.http.admin_listen)
        .map_err(anyhow::Error::msg)?;
    let control_path =
        control_socket.unwrap_or_else(|| crate::control::default_socket(&cfg.store.state_dir));
    std::fs::create_dir_all(&cfg.store.state_dir)
        .with_context(|| format!("state directory {}", cfg.store.state_dir.display()))?;
    let mut vcfg = valve_config(&cfg, pin_base.as_ref())?;
    // Rate limits: fq on the LAN for EDT (or policing where the kernel has no fq), before
    // the first packet is shaped.
    let tiers = crate::tiers::Tiers::new(cfg.shaping.rates(), &cfg.tiers);
    let shaping_lan = if cfg.shaping.enabled() || tiers.any_rates() {
        let lan = crate::shaping::Lan::prepare(&vcfg.iface, cfg.shaping.replace_qdisc)
            .context("preparing the LAN interface for rate limits")?;
        vcfg.edt_down = lan.mode() == crate::shaping::DownMode::Edt;
        tracing::info!(
            down_kbit = cfg.shaping.down_kbit,
            up_kbit = cfg.shaping.up_kbit,
            download = ?lan.mode(),
            "per-client rate limits on"
        );
        Some(lan)
    } else {
        None
    };
    // The kernel marks (and lets through) unpaid TCP/80 only while the nft redirect exists:
    // otherwise those packets would be forwarded to the WAN. So: attach without the mark,
    // install the redirect, then set the mark; the reverse at shutdown.
    let unmarked = ValveConfig {
        portal_mark: None,
        ..vcfg.clone()
    };
    let valve = Arc::new(Valve::attach(&unmarked).context("attaching the data plane")?);
    let events = valve.events()?;
    let redirect = match cfg.dataplane.portal_mark {
        Some(mark) => {
            let r = portal::Redirect::install(&vcfg.iface, mark, cfg.dataplane.portal_port)
                .context("installing the captive-portal redirect")?;
            valve
                .configure(&vcfg)
                .context("enabling the portal mark in the data plane")?;
            Some(r)
        }
        None => {
            // A stale table from a run with the redirect on would send HTTP to a closed port.
            if let Err(e) = portal::remove_stale(&vcfg.iface) {
                tracing::debug!(error = %e, "no stale portal redirect removed");
            }
            None
        }
    };
    let wallet = Wallet::open(&cfg.store.state_dir, cfg.wallet_settings())
        .await
        .context("opening the wallet")?;
    let store = Arc::new(Store::open(&cfg.store.db_path())?.with_retention(cfg.store.retention));
    let gates: Arc<dyn Gates> = valve.clone();
    let chandler =
        Arc::new(Chandler::new(cfg.chandler.clone(), gates, store.clone()).with_tiers(tiers));
    let report = chandler
        .reconcile()
        .context("reconciling sessions with the kernel")?;
    tracing::info!(?report, "sessions reconciled with the data plane");
    let redeemer: Arc<dyn Redeemer> = Arc::new(wallet.clone());
    let merchant = Merchant::new(
        cfg.merchant.clone(),
        redeemer,
        chandler.clone(),
        store.clone(),
    );
    merchant
        .reconcile()
        .await
        .context("applying interrupted grants")?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let cancel = CancellationToken::new();
    // Every long-running task is named and supervised: restarted with back-off when it ends
    // or panics, shown in `status` and `/metrics`; a critical one that cannot run stops the
    // daemon with a non-zero exit (systemd/procd restart it).
    let tasks = Supervisor::new(cancel.clone());
    {
        // The kernel's event channel cannot be re-opened: the reader is one-shot.
        let c = chandler.clone();
        let stop = stop_rx.clone();
        tasks.spawn_once("chandler", async move {
            c.run(events, stop).await;
            Ok(())
        });
    }
    {
        let (w, c) = (wallet.clone(), cancel.clone());
        tasks.spawn("payouts", Policy::best_effort(), move || {
            let (w, c) = (w.clone(), c.clone());
            async move { w.spawn_payouts(c).await.map_err(|e| e.to_string()) }
        });
    }
    let neighbours = Arc::new(KernelNeighbours::new(
        cfg.neighbour.device_leases_file.clone(),
    ));
    // Lightning checkout: quotes paid while we were down are granted now, then polled.
    let checkout = Arc::new(crate::lightning::Checkout::new(
        wallet.clone(),
        merchant.clone(),
        store.clone(),
    ));
    let granted = checkout.settle_open().await;
    if granted > 0 {
        tracing::info!(granted, "lightning quotes paid while down were granted");
    }
    {
        let (ck, c) = (checkout.clone(), cancel.clone());
        tasks.spawn("lightning", Policy::best_effort(), move || {
            let (ck, c) = (ck.clone(), c.clone());
            async move {
                ck.run(c).await;
                Ok(())
            }
        });
    }
    let mut state =
        AppState::new(&cfg.http, merchant, chandler.clone(), neighbours).with_lightning(checkout);
    {
        let (w, r, c) = (
            wallet.clone(),
            state.mints_reachable.clone(),
            cancel.clone(),
        );
        tasks.spawn("mint-watch", Policy::best_effort(), move || {
            let (w, r, c) = (w.clone(), r.clone(), c.clone());
            async move {
                watch_mints(w, r, c).await;
                Ok(())
            }
        });
    }
    // Reseller mode: our own uplink is a paid TollGate; buy and renew access there.
    if cfg.upstream.reseller_mode {
        let up = Upstream::new(
            cfg.upstream.settings.clone(),
            cfg.dataplane.wan_interface.clone(),
            wallet.clone(),
            &cfg.store.state_dir,
        )
        .context("opening the upstream buyer")?;
        if let Some(wan) = &cfg.dataplane.wan_interface {
            // Our own count of the upstream traffic (advisory: the buyer runs without it).
            // Like the LAN data plane it stays attached at shutdown; it passes every frame,
            // so that is harmless, and its counters survive a restart.
            match Valve::attach_meter(wan, &vcfg.pin_base) {
                Ok(m) => up.set_meter(Arc::new(m)),
                Err(e) => tracing::warn!(iface = %wan, error = %e, "no WAN meter"),
            }
        }
        state = state.with_upstream(up.clone());
        let c = cancel.clone();
        tasks.spawn("upstream", Policy::critical(), move || {
            let (up, c) = (up.clone(), c.clone());
            async move {
                up.run(c).await;
                Ok(())
            }
        });
    }
    // SIGHUP (and `tollgate reload`): shaping and tier rates applied live (`reload.rs`). The
    // handler is installed before we say we are serving, so an early SIGHUP never kills us.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("SIGHUP handler")?;
    let reloader = Arc::new(crate::reload::Reloader::new(
        &cfg.dir,
        overrides,
        vcfg.clone(),
        valve.clone(),
        chandler.clone(),
    ));
    {
        let (r, c) = (reloader.clone(), cancel.clone());
        tasks.spawn_once("reload", async move {
            r.run(hup, c).await;
            Ok(())
        });
    }
    let rates = crate::ops::rates::RateMeter::new();
    {
        let (m, v, stop) = (rates.clone(), valve.clone(), cancel.clone());
        tasks.spawn("rates", Policy::best_effort(), move || {
            let (m, v, stop) = (m.clone(), v.clone(), stop.clone());
            async move {
                m.run(v, stop).await;
                Ok(())
            }
        });
    }
    let ops = OpsState {
        app: state.clone(),
        wallet: wallet.clone(),
        valve: valve.clone(),
        gateway: GatewayInfo {
            lan_iface: vcfg.iface.clone(),
            lan_ipv4: vcfg.gateway_v4,
            listen: cfg.http.listen.to_string(),
            admin_listen: cfg.http.admin_listen.to_string(),
            control_socket: control_path.display().to_string(),
            metric: cfg.merchant.metric.as_str().to_string(),
            step_size: cfg.merchant.step_size,
        },
        probe_timeout: std::time::Duration::from_secs(3),
        arp_path: PathBuf::from("/proc/net/arp"),
        state_dir: cfg.store.state_dir.clone(),
        tasks: tasks.clone(),
        reload: Some(reloader),
        rates,
    };
    let control = crate::control::bind(&control_path)?;
    let lan = http::bind_lan(cfg.http.listen, cfg.http.lan_interface.as_deref())
        .with_context(|| format!("listening on {}", cfg.http.listen))?;
    // The redirect targets the portal port; serve the same router there when it differs.
    let portal_lan = if cfg.http.portal_port != cfg.http.listen.port() {
        let addr = std::net::SocketAddr::new(cfg.http.listen.ip(), cfg.http.portal_port);
        Some(
            http::bind_lan(addr, cfg.http.lan_interface.as_deref())
                .with_context(|| format!("portal listener on {addr}"))?,
        )
    } else {
        None
    };
    let admin = http::bind_lan(cfg.http.admin_listen, None)
        .with_context(|| format!("admin listener on {}", cfg.http.admin_listen))?;
    tracing::info!(listen = %cfg.http.listen, admin = %cfg.http.admin_listen, control = %control_path.display(), "tollgate is serving");
    // The servers own their listening sockets: one-shot, critical. The LAN API and the portal
    // port count against the same caps; the admin its own.
    let served = |r: std::io::Result<()>| r.map_err(|e| e.to_string());
    let lan_caps = http::Caps::new(&cfg.http_limits);
    {
        let (app, caps, stop) = (
            http::router(state.clone()),
            lan_caps.clone(),
            cancel.clone().cancelled_owned(),
        );
        tasks.spawn_once("api", async move {
            served(http::serve(lan, app, caps, stop).await)
        });
    }
    if let Some(l) = portal_lan {
        let (app, caps, stop) = (
            http::router(state.clone()),
            lan_caps.clone(),
            cancel.clone().cancelled_owned(),
        );
        tasks.spawn_once("portal", async move {
            served(http::serve(l, app, caps, stop).await)
        });
    }
    {
        let (app, caps, stop) = (
            ops::admin_tcp_router(ops.clone(), cfg.http_limits.admin_token.clone()),
            http::Caps::new(&cfg.http_limits),
            cancel.clone().cancelled_owned(),
        );
        tasks.spawn_once("admin", async move {
            served(http::serve(admin, app, caps, stop).await)
        });
    }
    {
        let stop = cancel.clone().cancelled_owned();
        let app = ops::control_router(ops);
        tasks.spawn_once("control", async move {
            served(axum::serve(control, app).with_graceful_shutdown(stop).await)
        });
    }

    let fatal = tokio::select! {
        _ = wait_for_signal() => None,
        why = tasks.fatal() => Some(why),
    };
    match &fatal {
        None => tracing::info!("shutting down: the data plane stays attached and enforcing"),
        Some(why) => {
            tracing::error!(reason = %why, "a critical task cannot run; shutting down (the data plane stays attached and enforcing)")
        }
    }
    cancel.cancel();
    if stop_tx.send(true).is_err() {
        tracing::debug!("no listener for the stop signal left");
    }
    tasks.join().await;
    if let Err(e) = std::fs::remove_file(&control_path) {
        tracing::warn!(path = %control_path.display(), error = %e, "removing the control socket");
    }
    if let Some(r) = redirect {
        if let Err(e) = valve.configure(&unmarked) {
            tracing::warn!(error = %e, "clearing the portal mark in the data plane");
        }
        match tokio::task::spawn_blocking(move || r.remove()).await {
            Ok(Ok(())) => tracing::info!("captive-portal redirect removed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "removing the portal redirect"),
            Err(e) => tracing::warn!(error = %e, "removing the portal redirect"),
        }
    }
    if let Some(lan) = shaping_lan {
        match tokio::task::spawn_blocking(move || lan.remove()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "removing the fq root qdisc"),
            Err(e) => tracing::warn!(error = %e, "removing the fq root qdisc"),
        }
    }
    chandler.snapshot_all().ok();
    match fatal {
        Some(why) => anyhow::bail!("stopped because {why}"),
        None => Ok(()),
    }
}

/// Probes the accepted mints every 30 s (at once at start) and records whether any answers:
/// `GET /` warns `no-reachable-mints` while none does.
async fn watch_mints(
    wallet: Wallet,
    reachable: Arc<std::sync::atomic::AtomicBool>,
    cancel: CancellationToken,
) {
    loop {
        let probes = tokio::select! {
            _ = cancel.cancelled() => return,
            p = wallet.probe_mints(std::time::Duration::from_secs(5)) => p,
        };
        let any = probes.is_empty() || probes.iter().any(|p| p.reachable);
        let was = reachable.swap(any, std::sync::atomic::Ordering::Relaxed);
        if was != any {
            tracing::warn!(reachable = any, "accepted mints reachable: {any}");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--listen` moves the portal port with it (it used to stay at the file's 2121), but an
    /// explicit `dataplane.portal_port` stays.
    #[test]
    fn listen_override_moves_the_derived_portal_port() {
        let dir = tempfile::tempdir().expect("tempdir");
        load_config(dir.path(), &Overrides::default()).expect("write the default config");
        let o = Overrides {
            listen: Some("0.0.0.0:8080".parse().expect("addr")),
            ..Overrides::default()
        };
        let cfg = load_config(dir.path(), &o).expect("load");
        assert_eq!(cfg.http.listen.port(), 8080);
        assert_eq!(cfg.http.portal_port, 8080);
        assert_eq!(cfg.dataplane.portal_port, 8080);

        let path = dir.path().join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        v["dataplane"]["portal_port"] = serde_json::json!(80);
        std::fs::write(&path, v.to_string()).expect("write");
        let cfg = load_config(dir.path(), &o).expect("load");
        assert_eq!((cfg.http.portal_port, cfg.dataplane.portal_port), (80, 80));
    }
}
