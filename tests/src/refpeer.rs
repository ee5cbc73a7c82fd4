//! Peers shaped like the TollGate reference implementation (OpenTollGate's Go daemon and its
//! laptop client `tollgate-clientd`), written from their observable behaviour, so our daemon
//! is tested against the ecosystem's quirks and not only against itself.
//!
//! ```text
//! RefUpstream::start(ns, ip, mint wallet, customer MAC)   a reference seller on ip:2121
//!   any GET path   ─> kind 10021, created_at 0, step_purchase_limits, an extra price tag
//!                     for another asset type, then the cashu one
//!   any POST path  ─> raw token (or kind 21000) ─> receive at the mint ─> kind 1022 with the
//!                     customer's MAC in `p` and ["start-time", …], application/json
//!   GET /usage     ─> 200 text/plain "used/allotment" (used set by the test), "-1/-1"
//! RefCustomer { ns, mac }   the laptop client: POST /?mac=<mac> raw token as text/plain,
//!                           requires 200 + a JSON kind 1022; reads /usage
//! ```

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use nostr::{EventBuilder, JsonUtil, Keys, Kind, Tag, Timestamp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    gateway::{http_to, in_ns, ns_runtime},
    netns::Netns,
};

/// What the reference seller sells: bytes, `step` per step, 1 sat per step.
pub struct RefUpstream {
    pub keys: Keys,
    /// Allotment sold so far (bytes).
    pub allotment: Arc<AtomicU64>,
    /// What `/usage` reports as used (the test moves it to trigger renewals).
    pub used: Arc<AtomicU64>,
    /// POSTs answered with a kind 1022.
    pub sales: Arc<AtomicU64>,
    _rt: Arc<tokio::runtime::Runtime>,
}

fn sign(keys: &Keys, kind: u16, tags: Vec<Vec<String>>, created_at: u64) -> String {
    let tags: Vec<Tag> = tags
        .into_iter()
        .map(|t| Tag::parse(t).expect("tag"))
        .collect();
    EventBuilder::new(Kind::from_u16(kind), "")
        .tags(tags)
        .custom_created_at(Timestamp::from(created_at))
        .sign_with_keys(keys)
        .expect("sign")
        .as_json()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

impl RefUpstream {
    /// Serves on `ip:2121` in `ns`; tokens are received into `wallet` (a wallet at `mint_url`).
    /// `customer_mac` is what the reference would find in its ARP table for the buyer.
    pub fn start(
        ns: &Netns,
        ip: Ipv4Addr,
        mint_url: &str,
        wallet: cdk::wallet::Wallet,
        step: u64,
        customer_mac: &str,
    ) -> RefUpstream {
        let keys = Keys::generate();
        let rt = ns_runtime(ns);
        let up = RefUpstream {
            keys: keys.clone(),
            allotment: Arc::default(),
            used: Arc::default(),
            sales: Arc::default(),
            _rt: rt.clone(),
        };
        // The reference leaves created_at at 0 and writes min steps as it likes.
        let ad = sign(
            &keys,
            10021,
            vec![
                s(&["metric", "bytes"]),
                s(&["step_size", &step.to_string()]),
                s(&["step_purchase_limits", "1", "0"]),
                s(&["tips", "1", "2", "3"]),
                s(&["price_per_step", "lightning", "5", "sat", "", "1"]),
                s(&["price_per_step", "cashu", "1", "sat", mint_url, "1"]),
            ],
            0,
        );
        let (allot, used, sales) = (up.allotment.clone(), up.used.clone(), up.sales.clone());
        let mac = customer_mac.to_string();
        let wallet = Arc::new(wallet);
        let listener = in_ns(ns, &rt, move || async move {
            tokio::net::TcpListener::bind((ip, 2121))
                .await
                .expect("bind reference upstream")
        });
        rt.spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    continue;
                };
                let (ad, allot, used, sales, mac, wallet, keys) = (
                    ad.clone(),
                    allot.clone(),
                    used.clone(),
                    sales.clone(),
                    mac.clone(),
                    wallet.clone(),
                    keys.clone(),
                );
                tokio::spawn(async move {
                    let Some((method, path, body)) = read_request(&mut sock).await else {
                        return;
                    };
                    let (status, ct, answer) = if method == "POST" {
                        // Any POST path is a payment: raw token or a kind-21000 event.
                        let token = payment_token(&body);
                        match wallet
                            .receive(&token, cdk::wallet::ReceiveOptions::default())
                            .await
                        {
                            Ok(amount) => {
                                let added = u64::from(amount) * step;
                                let total = allot.fetch_add(added, Ordering::SeqCst) + added;
                                sales.fetch_add(1, Ordering::SeqCst);
                                let now = tollgate::sys::clock::unix_secs();
                                let ev = sign(
                                    &keys,
                                    1022,
                                    vec![
                                        s(&["p", &mac]),
                                        s(&["device-identifier", "mac", &mac]),
                                        s(&["allotment", &total.to_string()]),
                                        s(&["metric", "bytes"]),
                                        s(&["start-time", &now.to_string()]),
                                    ],
                                    now,
                                );
                                (200, "application/json", ev)
                            }
                            Err(e) => (400, "application/json", format!("{{\"error\":\"{e}\"}}")),
                        }
                    } else if path.starts_with("/usage") {
                        let a = allot.load(Ordering::SeqCst);
                        let text = if a == 0 {
                            "-1/-1".to_string()
                        } else {
                            format!("{}/{a}", used.load(Ordering::SeqCst).min(a))
                        };
                        (200, "text/plain", text)
                    } else {
                        // Any other GET path answers the advertisement.
                        (200, "application/json", ad)
                    };
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: {ct}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        answer.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(answer.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        up
    }

    pub fn pubkey(&self) -> String {
        self.keys.public_key().to_hex()
    }
}

fn payment_token(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        if v["kind"] == 21000 {
            if let Some(t) = v["tags"]
                .as_array()
                .and_then(|t| t.iter().find(|t| t[0] == "payment"))
                .and_then(|t| t[1].as_str())
            {
                return t.to_string();
            }
        }
    }
    body.trim().to_string()
}

async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<(String, String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 1 << 20 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let mut first = lines.next()?.split_whitespace();
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
    Some((method, path, body))
}

/// The reference's laptop client (`tollgate-clientd`) as our daemon's customer.
pub struct RefCustomer<'a> {
    pub ns: &'a Netns,
    pub gateway: SocketAddr,
    /// Its own MAC, which it puts in the query (and which we must not trust).
    pub mac: String,
}

impl RefCustomer<'_> {
    /// `POST /?mac=<mac>` with the raw token as text/plain; the client requires a 200 JSON
    /// kind 1022 and returns its allotment tag.
    pub fn pay(&self, token: &str) -> u64 {
        let (st, body) = http_to(
            self.ns,
            self.gateway,
            "POST",
            &format!("/?mac={}", self.mac),
            Some(("text/plain", token)),
        );
        assert_eq!(st, 200, "the laptop client needs 200: {body}");
        let v: serde_json::Value = serde_json::from_str(body.trim()).expect("a JSON body");
        assert_eq!(v["kind"], 1022, "the laptop client needs a kind 1022: {v}");
        v["tags"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t[0] == "allotment"))
            .and_then(|t| t[1].as_str())
            .and_then(|a| a.parse().ok())
            .expect("allotment tag")
    }

    /// `/usage` as the client reads it: `None` for `-1/-1`. Any status but 200 is a failure
    /// for the client (it stops), so it is one here.
    pub fn usage(&self) -> Option<(u64, u64)> {
        let (st, body) = http_to(self.ns, self.gateway, "GET", "/usage", None);
        assert_eq!(st, 200, "/usage must answer 200 (HTTP-03): {body}");
        let (u, a) = body.trim().split_once('/').expect("used/allotment");
        if u == "-1" {
            return None;
        }
        Some((u.parse().expect("used"), a.parse().expect("allotment")))
    }
}
