//! Plain HTTP on port 80 for the captive-portal tests: a tiny "internet" web server in the
//! upstream namespace and a one-shot client that talks to any address from any namespace.
//!
//! ```text
//!  serve_web(&lab.upstream)           10.78.0.2:80  /generate_204 ─> 204, else 200 "upstream …"
//!  get(&lab.client, addr, host, path) ─> Reply { status, headers, body }   (no redirects followed)
//! ```

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use crate::netns::{Netns, UPSTREAM_IP};

/// Every answer of [`serve_web`] carries this header, so a test can tell the real server from
/// the gateway's portal.
pub const UPSTREAM_HEADER: &str = "x-served-by";
pub const UPSTREAM_NAME: &str = "upstream-web";

/// Starts the upstream web server on `UPSTREAM_IP:80` in `ns`; returns once it listens.
pub fn serve_web(ns: &Netns) {
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let l = TcpListener::bind((UPSTREAM_IP, 80)).expect("bind web server");
        tx.send(()).unwrap();
        for s in l.incoming().flatten() {
            std::thread::spawn(move || answer(s));
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("web server up");
}

fn answer(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    let (status, body) = if path.starts_with("/generate_204") {
        ("204 No Content", String::new())
    } else {
        ("200 OK", format!("upstream page {path}\n"))
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\n{UPSTREAM_HEADER}: {UPSTREAM_NAME}\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes());
}

/// An HTTP answer: status, headers (names lower-case) and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn from_upstream(&self) -> bool {
        self.header(UPSTREAM_HEADER) == Some(UPSTREAM_NAME)
    }
}

/// `GET path` with `Host: host` to `addr` from inside `ns` (one connection, no redirects
/// followed); `Err` when the connection cannot be made or nothing comes back.
pub fn get(ns: &Netns, addr: SocketAddr, host: &str, path: &str) -> Result<Reply, String> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tollgate-test\r\nConnection: close\r\n\r\n"
    );
    exchange(ns, addr, req, Duration::from_secs(10))
}

/// The tests' one HTTP/1.1 exchange: sends `req` (a whole request, `Connection: close`) to
/// `addr` from inside `ns` and reads the answer until the server closes (or `read_timeout`).
/// The body is returned as sent (a chunked body keeps its chunk lines: good enough to search).
pub fn exchange(
    ns: &Netns,
    addr: SocketAddr,
    req: String,
    read_timeout: Duration,
) -> Result<Reply, String> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(read_timeout))
            .map_err(|e| e.to_string())?;
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        // Reset after the answer (the server closed first) still leaves the answer in `raw`.
        if let Err(e) = s.read_to_end(&mut raw) {
            if raw.is_empty() {
                return Err(format!("reading from {addr}: {e}"));
            }
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no HTTP answer from {addr}: {text:?}"))?;
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad status line from {addr}: {head:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok(Reply {
            status,
            headers,
            body: body.to_string(),
        })
    })
}
