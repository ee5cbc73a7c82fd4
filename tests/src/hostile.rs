//! A hostile upstream TollGate: a raw HTTP/1.1 server (so it can break the protocol on purpose)
//! that signs a real advertisement, takes the tokens it is paid with (swaps them at the mint,
//! so the money is really gone) and answers with a valid signed session, but then plays
//! [`Mode`] on `/usage`.
//!
//! ```text
//!  GET /       signed kind 10021, one option at `mint` (price 1/step, `min_steps` settable)
//!  POST /      token swapped at the mint ─> valid kind 1022 for `customer_mac`
//!  GET /usage  by Mode: "-1/-1", a malformed chunk size, an oversized body, a slow drip
//!  Mode::Silent: nothing answered at all
//! ```
//! Run it on a runtime whose threads live in the upstream namespace
//! ([`crate::gateway::ns_runtime`]); it stops when dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nostr::{JsonUtil, Keys};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::protocol::{Advertisement, Metric, PriceOption, Session};

/// What `/usage` answers; every mode answers `-1/-1` in between, so a buyer that trusts it
/// would pay again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// `-1/-1` only.
    NoSession = 0,
    /// Cycle through: `-1/-1`, chunk size `ffffffffffffffff`, a 1 MiB body, a slow drip.
    Malformed = 1,
    /// Unreachable in the worst way: every request is read and never answered (probes and
    /// `/usage` polls hang until the buyer's timeout).
    Silent = 2,
}

struct Shared {
    keys: Keys,
    mint: String,
    step_size: u64,
    min_steps: AtomicU64,
    mode: AtomicU8,
    customer_mac: String,
    wallet: cdk::wallet::Wallet,
    /// Amounts of the tokens it swapped (one per POST that paid).
    taken: Mutex<Vec<u64>>,
    usage_requests: AtomicU64,
}

/// The server. Dropping it stops it.
pub struct HostileUpstream {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl HostileUpstream {
    /// Listens on `addr`; sells `step_size` bytes per step at 1 sat at `mint`, swapping what
    /// it is paid into `wallet`; sessions name `customer_mac`.
    pub async fn start(
        addr: SocketAddr,
        mint: &str,
        step_size: u64,
        customer_mac: &str,
        wallet: cdk::wallet::Wallet,
    ) -> HostileUpstream {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind hostile upstream");
        let shared = Arc::new(Shared {
            keys: Keys::generate(),
            mint: mint.to_string(),
            step_size,
            min_steps: AtomicU64::new(0),
            mode: AtomicU8::new(Mode::NoSession as u8),
            customer_mac: customer_mac.to_string(),
            wallet,
            taken: Mutex::new(Vec::new()),
            usage_requests: AtomicU64::new(0),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(c, &s).await;
                });
            }
        });
        HostileUpstream { shared, task }
    }

    pub fn set_min_steps(&self, n: u64) {
        self.shared.min_steps.store(n, Ordering::SeqCst);
    }

    pub fn set_mode(&self, m: Mode) {
        self.shared.mode.store(m as u8, Ordering::SeqCst);
    }

    /// What it took: one amount per swapped token.
    pub fn taken(&self) -> Vec<u64> {
        self.shared.taken.lock().expect("taken").clone()
    }

    pub fn usage_requests(&self) -> u64 {
        self.shared.usage_requests.load(Ordering::SeqCst)
    }

    pub fn pubkey(&self) -> String {
        self.shared.keys.public_key().to_hex()
    }
}

impl Drop for HostileUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn answer(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn serve(mut c: tokio::net::TcpStream, s: &Shared) -> std::io::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        let n = c.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
        if let Some(p) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if req.len() > 64 * 1024 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&req[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while req.len() < head_end + length {
        let n = c.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    if s.mode.load(Ordering::SeqCst) == Mode::Silent as u8 {
        // Hold the connection until the client gives up.
        while c.read(&mut buf).await? > 0 {}
        return Ok(());
    }
    let body = String::from_utf8_lossy(&req[head_end..]).to_string();
    let line = head.lines().next().unwrap_or("").to_string();
    let out = if line.starts_with("GET / ") {
        let ad = Advertisement {
            metric: Metric::Bytes,
            step_size: s.step_size,
            tips: vec!["1".into(), "2".into()],
            prices: vec![PriceOption {
                price_per_step: 1,
                unit: "sat".into(),
                mint_url: s.mint.clone(),
                min_steps: s.min_steps.load(Ordering::SeqCst),
            }],
        };
        answer(
            "200 OK",
            &ad.to_event(&s.keys, now()).expect("sign ad").as_json(),
        )
    } else if line.starts_with("POST / ") {
        match s
            .wallet
            .receive(body.trim(), cdk::wallet::ReceiveOptions::default())
            .await
        {
            Ok(amount) => {
                let amount: u64 = amount.into();
                s.taken.lock().expect("taken").push(amount);
                let session = Session {
                    customer: None,
                    mac: s.customer_mac.parse().expect("mac"),
                    allotment: amount * s.step_size,
                    metric: Metric::Bytes,
                };
                answer(
                    "200 OK",
                    &session
                        .to_event(&s.keys, now())
                        .expect("sign session")
                        .as_json(),
                )
            }
            Err(e) => answer("402 Payment Required", &e.to_string()),
        }
    } else if line.starts_with("GET /usage") {
        let n = s.usage_requests.fetch_add(1, Ordering::SeqCst);
        let mode = s.mode.load(Ordering::SeqCst);
        match (mode, n % 4) {
            (1, 1) => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n-1/-1\r\n0\r\n\r\n".to_vec(),
            (1, 2) => answer("200 OK", &format!("-1/-1{}", " ".repeat(1024 * 1024))),
            (1, 3) => {
                let raw = answer("200 OK", "-1/-1");
                for b in raw {
                    c.write_all(&[b]).await?;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                return Ok(());
            }
            _ => answer("200 OK", "-1/-1"),
        }
    } else {
        answer("404 Not Found", "")
    };
    c.write_all(&out).await?;
    c.shutdown().await
}
