//! A real `tollgate run` in a lab's gateway namespace and a small HTTP client to talk to it from
//! another namespace: the fixtures of the end-to-end tests.
//!
//! ```text
//!  Daemon::start(lab, config, state, pins) ── spawns `tollgate --netns <gw> run …` and waits for
//!                                            the API port to answer from the client namespace
//!  http(&lab.client, "POST", "/", Some((content-type, body))) ── (status, body)
//!  ns_runtime / in_ns ── async work (the test mint) whose sockets live in a namespace
//! ```

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    netns::{enter, Lab3, Netns, GW_LAN_IP, LAN_IFACE},
    pins::PinBase,
    tollgate_bin,
};

/// A tokio runtime whose worker threads live in `ns` (sockets they open live there too).
pub fn ns_runtime(ns: &Netns) -> Arc<tokio::runtime::Runtime> {
    let path = PathBuf::from(format!("/run/netns/{}", ns.name));
    Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || enter(&path))
            .build()
            .expect("runtime"),
    )
}

/// Runs a future to completion on a thread inside `ns`, with `rt`'s workers also inside `ns`.
pub fn in_ns<T, F>(
    ns: &Netns,
    rt: &Arc<tokio::runtime::Runtime>,
    f: impl FnOnce() -> F + Send + 'static,
) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + 'static,
{
    let rt = rt.clone();
    ns.run(move || rt.block_on(f()))
}

/// Minimal HTTP/1.1 client run from the client namespace: (status, body).
pub fn http(ns: &Netns, method: &str, path: &str, body: Option<(&str, &str)>) -> (u16, String) {
    http_to(ns, SocketAddr::from((GW_LAN_IP, 2121)), method, path, body)
}

/// [`http`] to any address reachable from `ns` (another gateway, an admin API).
pub fn http_to(
    ns: &Netns,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
) -> (u16, String) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    match body {
        Some((ct, b)) => req.push_str(&format!(
            "Content-Type: {ct}\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => req.push_str("\r\n"),
    }
    match crate::web::exchange(ns, addr, req, Duration::from_secs(60)) {
        Ok(r) => (r.status, r.body),
        Err(e) if e.starts_with("connect ") => panic!("{method} {path}: {e}"),
        // Closed or reset without a whole answer: status 0 (what the hostile tests count).
        Err(_) => (0, String::new()),
    }
}

pub fn json_body(body: &str) -> serde_json::Value {
    let start = body.find('{').expect("json in body");
    let end = body.rfind('}').expect("json end");
    serde_json::from_str(&body[start..=end]).expect("valid json")
}

pub fn tag<'a>(ev: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    ev["tags"]
        .as_array()?
        .iter()
        .find(|t| t[0] == name)
        .and_then(|t| t[1].as_str())
}

pub struct Daemon {
    pub child: Child,
}

/// Where and how [`Daemon::start_with`] runs a gateway.
pub struct DaemonSpec<'a> {
    /// The gateway's namespace.
    pub gateway: &'a Netns,
    /// A namespace on the LAN side, from which the API must answer before `start_with` returns.
    pub lan_peer: &'a Netns,
    pub lan_iface: &'a str,
    pub wan_iface: Option<&'a str>,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub config_dir: &'a Path,
    pub state_dir: &'a Path,
    pub pins: &'a PinBase,
}

impl Daemon {
    pub fn start(lab: &Lab3, config_dir: &Path, state_dir: &Path, pins: &PinBase) -> Daemon {
        Self::start_with(&DaemonSpec {
            gateway: &lab.gateway,
            lan_peer: &lab.client,
            lan_iface: LAN_IFACE,
            wan_iface: None,
            listen: SocketAddr::from((GW_LAN_IP, 2121)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 2122)),
            config_dir,
            state_dir,
            pins,
        })
    }

    /// Starts `tollgate run` as `spec` says and waits until its API answers from the LAN peer.
    pub fn start_with(spec: &DaemonSpec<'_>) -> Daemon {
        let (config_dir, state_dir, pins) = (spec.config_dir, spec.state_dir, spec.pins);
        std::fs::create_dir_all(state_dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state_dir.join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(tollgate_bin());
        cmd.args([
            "--netns",
            &spec.gateway.name,
            "run",
            "--lan-iface",
            spec.lan_iface,
        ])
        .args([
            "--listen",
            &spec.listen.to_string(),
            "--admin-listen",
            &spec.admin_listen.to_string(),
        ]);
        if let Some(w) = spec.wan_iface {
            cmd.args(["--wan-iface", w]);
        }
        let child = cmd
            .arg("--config-dir")
            .arg(config_dir)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--pin-base")
            .arg(pins.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tollgate run");
        let d = Daemon { child };
        let start = Instant::now();
        loop {
            let listen = spec.listen;
            let up = spec.lan_peer.run(move || {
                TcpStream::connect_timeout(&listen, Duration::from_millis(300)).is_ok()
            });
            if up {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "daemon did not come up: {}",
                std::fs::read_to_string(state_dir.join("daemon.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        d
    }

    pub fn stop(&mut self) {
        // SIGTERM: a graceful stop; the data plane stays pinned.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// SIGKILL: the daemon dies mid-whatever, as on a power cut of the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The merchant key every lab gateway signs with (tests only).
pub const MERCHANT_KEY: &str = "5c2b0c3d4e5f60718293a4b5c6d7e8f90112233445566778899aabbccddeeff0";

/// Writes `config.json` + `identities.json` selling `metric` in steps of `step`, one
/// `(mint url, price per step)` per accepted mint, minimum 10 steps, payouts effectively off.
pub fn write_config(dir: &Path, metric: &str, step: u64, mints: &[(&str, u64)]) {
    let mints: Vec<serde_json::Value> = mints
        .iter()
        .map(|(url, price)| {
            serde_json::json!({
                "url": url, "price_per_step": price, "price_unit": "sat",
                "purchase_min_steps": 10, "min_balance": 64, "min_payout_amount": 1000000,
                "payout_interval_seconds": 3600, "balance_tolerance_percent": 10
            })
        })
        .collect();
    let config = serde_json::json!({
        "config_version": "v0.0.8", "log_level": "info",
        "metric": metric, "step_size": step,
        "accepted_mints": mints,
        "profit_share": [{"identity": "owner", "factor": 1.0}],
        "reseller_mode": false
    });
    write_config_value(dir, &config);
}

/// Writes `config` as `config.json` with the lab's `identities.json` (merchant key, owner).
pub fn write_config_value(dir: &Path, config: &serde_json::Value) {
    write_config_keyed(dir, config, MERCHANT_KEY);
}

/// [`write_config_value`] with another merchant key (chained gateways need distinct keys).
pub fn write_config_keyed(dir: &Path, config: &serde_json::Value, key: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let identities = serde_json::json!({
        "owned_identities": [{"name": "merchant", "privatekey": key}],
        "public_identities": [{"name": "owner", "lightning_address": "owner@example.com"}]
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("identities.json"), identities.to_string()).unwrap();
}

/// Runs `tollgate <args>` (stdin piped from `input`): (exit code, stdout, stderr).
pub fn tg(args: &[&str], input: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(tollgate_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tollgate");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        if let Some(i) = input {
            stdin.write_all(i.as_bytes()).expect("write stdin");
        }
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tg` that must succeed, its stdout parsed as JSON.
pub fn tg_json(args: &[&str], input: Option<&str>) -> serde_json::Value {
    let (code, out, err) = tg(args, input);
    assert_eq!(code, 0, "tollgate {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// One gateway lab: three namespaces (client ─ gateway ─ upstream), a pin base, a config and a
/// state directory, and one real mint serving in the gateway namespace. The daemon is started
/// (and restarted) by the test, with the config it writes.
///
/// ```text
/// let g = GatewayLab::new("cli");         // namespaces, pins, dirs, the mint
/// g.write_config("bytes", STEP);          // the mint at 1 sat per step
/// let mut daemon = g.start();             // `tollgate run` in the gateway namespace
/// let token = g.token(64);                // a real token from the mint
/// ```
/// Fields drop in declaration order: the mint and its runtime go first, the namespaces last.
pub struct GatewayLab {
    pub mint: Arc<crate::mint::TestMint>,
    pub rt: Arc<tokio::runtime::Runtime>,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub tmp: tempfile::TempDir,
    pub pins: PinBase,
    pub lab: Lab3,
}

impl GatewayLab {
    /// Namespaces and pins named after `name` (made unique per process), a temporary config
    /// and state directory, and a fee-free mint in the gateway namespace.
    pub fn new(name: &str) -> GatewayLab {
        let lab = Lab3::new(name);
        let pins = PinBase::new(name);
        let tmp = tempfile::tempdir().expect("tempdir");
        let (config_dir, state_dir) = (tmp.path().join("etc"), tmp.path().join("state"));
        let rt = ns_runtime(&lab.gateway);
        let mint = Arc::new(in_ns(&lab.gateway, &rt, || crate::mint::TestMint::start(0)));
        GatewayLab {
            mint,
            rt,
            config_dir,
            state_dir,
            tmp,
            pins,
            lab,
        }
    }

    /// [`write_config`] selling `metric` in steps of `step`, the lab's mint at 1 sat per step.
    pub fn write_config(&self, metric: &str, step: u64) {
        write_config(&self.config_dir, metric, step, &[(&self.mint.url(), 1)]);
    }

    /// `tollgate run` on the lab's LAN with the config written, as [`Daemon::start`].
    pub fn start(&self) -> Daemon {
        Daemon::start(&self.lab, &self.config_dir, &self.state_dir, &self.pins)
    }

    /// [`GatewayLab::start`] with the admin API on `admin_listen`.
    pub fn start_with_admin(&self, admin_listen: SocketAddr) -> Daemon {
        Daemon::start_with(&DaemonSpec {
            gateway: &self.lab.gateway,
            lan_peer: &self.lab.client,
            lan_iface: LAN_IFACE,
            wan_iface: None,
            listen: SocketAddr::from((GW_LAN_IP, 2121)),
            admin_listen,
            config_dir: &self.config_dir,
            state_dir: &self.state_dir,
            pins: &self.pins,
        })
    }

    /// A fresh token worth `amount` from the lab's mint.
    pub fn token(&self, amount: u64) -> String {
        let m = self.mint.clone();
        in_ns(&self.lab.gateway, &self.rt, move || async move {
            m.mint_token(amount).await
        })
    }

    /// Runs an async job against the lab's mint inside the gateway namespace.
    pub fn with_mint<T, F>(
        &self,
        f: impl FnOnce(Arc<crate::mint::TestMint>) -> F + Send + 'static,
    ) -> T
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + 'static,
    {
        let m = self.mint.clone();
        in_ns(&self.lab.gateway, &self.rt, move || f(m))
    }
}
