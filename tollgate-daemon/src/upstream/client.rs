//! The few HTTP/1.1 requests we make to an upstream gateway (`GET /`, `POST /`, `GET /usage`),
//! over a plain TCP connection with a timeout on the whole exchange and a cap on the answer.
//!
//! A hand-rolled client because the target is never a general web server: one host we
//! discovered ourselves, port 2121, small answers. Redirects are not followed (an upstream
//! cannot point us elsewhere), and an answer larger than [`MAX_ANSWER`] is refused unread.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::UpstreamError;
use crate::protocol::{Advertisement, Metric, Session};

/// The largest answer we read from an upstream (events are a few KiB).
pub const MAX_ANSWER: usize = 64 * 1024;

/// The TollGate port.
pub const PORT: u16 = 2121;

/// Refuses addresses that are never a neighbouring gateway (SSRF through a spoofed route or
/// a hostile DHCP server pointing us at ourselves).
pub fn check_gateway_addr(ip: IpAddr) -> Result<(), UpstreamError> {
    let why = match ip {
        IpAddr::V4(a) if a.is_loopback() => Some("loopback"),
        IpAddr::V4(a) if a.is_link_local() => Some("link-local"),
        IpAddr::V4(a) if a.is_multicast() => Some("multicast"),
        IpAddr::V4(a) if a.is_unspecified() => Some("unspecified"),
        IpAddr::V4(a) if a.is_broadcast() => Some("broadcast"),
        IpAddr::V6(a) if a.is_loopback() => Some("loopback"),
        IpAddr::V6(a) if a.is_multicast() => Some("multicast"),
        IpAddr::V6(a) if a.is_unspecified() => Some("unspecified"),
        IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80 => Some("link-local"),
        _ => None,
    };
    match why {
        Some(kind) => Err(UpstreamError::BadGateway {
            addr: ip,
            reason: format!("{kind} address"),
        }),
        None => Ok(()),
    }
}

/// One answer: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// Parses a raw HTTP/1.1 answer (Content-Length, chunked, or read-to-close).
pub fn parse_answer(raw: &[u8]) -> Result<Answer, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty answer")?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 answer: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            return Err(format!("bad header line {l:?}"));
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "content-length" {
            length = Some(v.parse::<usize>().map_err(|_| "bad content-length")?);
        } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        if rest.len() < n {
            return Err(format!("body cut short ({} of {n} bytes)", rest.len()));
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    let body = String::from_utf8(body).map_err(|_| "body is not UTF-8")?;
    Ok(Answer { status, body })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk header")?;
        let size_txt = std::str::from_utf8(&b[..eol]).map_err(|_| "bad chunk size")?;
        let size = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        // A hostile size (usize::MAX) must not overflow into a panic.
        if size.checked_add(2).is_none_or(|n| b.len() < n) {
            return Err("chunk cut short".into());
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// One request to `addr`; the whole exchange (connect, send, read) is bounded by `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Answer, UpstreamError> {
    let fail = |reason: String| UpstreamError::Http {
        addr,
        path: path.to_string(),
        reason,
    };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| fail(format!("connect: {e}")))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: tollgate\r\n"
        );
        match body {
            Some(b) => req.push_str(&format!(
                "Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )),
            None => req.push_str("\r\n"),
        }
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| fail(format!("send: {e}")))?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = s
                .read(&mut buf)
                .await
                .map_err(|e| fail(format!("read: {e}")))?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if raw.len() > MAX_ANSWER + 4096 {
                return Err(fail(format!("answer larger than {MAX_ANSWER} bytes")));
            }
        }
        let answer = parse_answer(&raw).map_err(fail)?;
        if answer.body.len() > MAX_ANSWER {
            return Err(fail(format!("answer larger than {MAX_ANSWER} bytes")));
        }
        Ok(answer)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| fail(format!("no answer within {timeout:?}")))?
}

/// A verified advertisement and who signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedAd {
    pub pubkey: String,
    pub ad: Advertisement,
}

/// Parses and verifies (kind, id, signature) a kind-10021 answer.
pub fn parse_advertisement(body: &str) -> Result<SignedAd, UpstreamError> {
    use nostr::JsonUtil;
    let ev = nostr::Event::from_json(body.trim()).map_err(|e| UpstreamError::BadAdvertisement {
        reason: format!("not a nostr event: {e}"),
    })?;
    let ad = Advertisement::from_event(&ev).map_err(|e| UpstreamError::BadAdvertisement {
        reason: e.to_string(),
    })?;
    if ad.step_size == 0 {
        return Err(UpstreamError::BadAdvertisement {
            reason: "step_size 0".into(),
        });
    }
    Ok(SignedAd {
        pubkey: ev.pubkey.to_hex(),
        ad,
    })
}

/// Parses and verifies a kind-1022 answer; it must be signed by `pubkey` and sell `metric`.
pub fn parse_session(body: &str, pubkey: &str, metric: Metric) -> Result<Session, String> {
    use nostr::JsonUtil;
    let ev = nostr::Event::from_json(body.trim()).map_err(|e| format!("not a nostr event: {e}"))?;
    let s = Session::from_event(&ev).map_err(|e| e.to_string())?;
    if ev.pubkey.to_hex() != pubkey {
        return Err(format!(
            "session signed by {} instead of the advertised {pubkey}",
            ev.pubkey.to_hex()
        ));
    }
    if s.metric != metric {
        return Err(format!(
            "session in {} but the advertisement sells {metric}",
            s.metric
        ));
    }
    Ok(s)
}

/// Parses `/usage`: `Some((used, allotment))`, or `None` for `-1/-1` (no session).
pub fn parse_usage(body: &str) -> Result<Option<(u64, u64)>, String> {
    let t = body.trim();
    let (u, a) = t
        .split_once('/')
        .ok_or_else(|| format!("bad usage {t:?}"))?;
    let (u, a) = (u.trim(), a.trim());
    if u == "-1" && a == "-1" {
        return Ok(None);
    }
    let used: u64 = u.parse().map_err(|_| format!("bad usage {t:?}"))?;
    let allotment: u64 = a.parse().map_err(|_| format!("bad usage {t:?}"))?;
    Ok(Some((used, allotment)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PriceOption;
    use nostr::{JsonUtil, Keys};

    fn ad() -> Advertisement {
        Advertisement {
            metric: Metric::Bytes,
            step_size: 1000,
            tips: vec!["1".into()],
            prices: vec![PriceOption {
                price_per_step: 1,
                unit: "sat".into(),
                mint_url: "http://127.0.0.1:1".into(),
                min_steps: 0,
            }],
        }
    }

    #[test]
    fn refuses_non_gateway_addresses() {
        for bad in [
            "127.0.0.1",
            "169.254.1.1",
            "224.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(check_gateway_addr(bad.parse().unwrap()).is_err(), "{bad}");
        }
        for good in ["10.78.0.1", "192.168.1.1", "2001:db8::1"] {
            assert!(check_gateway_addr(good.parse().unwrap()).is_ok(), "{good}");
        }
    }

    #[test]
    fn answers_parse_and_malformed_are_refused() {
        let a = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "abc"));
        let a = parse_answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(a.body, "abcde");
        let a = parse_answer(b"HTTP/1.0 400 Bad\r\n\r\nplain").unwrap();
        assert_eq!((a.status, a.body.as_str()), (400, "plain"));
        for bad in [
            &b""[..],
            b"garbage",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 999 x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n\xff\xfe",
            // Regression (issue 11): a chunk size of usize::MAX overflowed `size + 2`.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab\r\n",
        ] {
            assert!(
                parse_answer(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn advertisement_must_be_signed_and_well_formed() {
        let keys = Keys::generate();
        let good = ad().to_event(&keys, 1_700_000_000).unwrap().as_json();
        let s = parse_advertisement(&good).expect("good ad");
        assert_eq!(s.pubkey, keys.public_key().to_hex());
        // Tampered content (price changed after signing): id/signature no longer match.
        let tampered = good.replace(
            "\"price_per_step\",\"cashu\",\"1\"",
            "\"price_per_step\",\"cashu\",\"0\"",
        );
        assert_ne!(tampered, good);
        assert!(parse_advertisement(&tampered).is_err());
        // Another kind, garbage, oversized-looking junk.
        let sess = Session {
            customer: None,
            mac: "aa:bb:cc:dd:ee:ff".parse().unwrap(),
            allotment: 1,
            metric: Metric::Bytes,
        }
        .to_event(&keys, 1)
        .unwrap()
        .as_json();
        assert!(parse_advertisement(&sess).is_err());
        assert!(parse_advertisement("{}").is_err());
        assert!(parse_advertisement(&"[".repeat(10_000)).is_err());
    }

    #[test]
    fn session_must_come_from_the_advertised_key() {
        let (b, other) = (Keys::generate(), Keys::generate());
        let s = Session {
            customer: None,
            mac: "aa:bb:cc:dd:ee:ff".parse().unwrap(),
            allotment: 5000,
            metric: Metric::Bytes,
        };
        let json = s.to_event(&b, 1).unwrap().as_json();
        let pk = b.public_key().to_hex();
        assert_eq!(
            parse_session(&json, &pk, Metric::Bytes).unwrap().allotment,
            5000
        );
        assert!(parse_session(&json, &pk, Metric::Milliseconds).is_err());
        let forged = s.to_event(&other, 1).unwrap().as_json();
        assert!(parse_session(&forged, &pk, Metric::Bytes)
            .unwrap_err()
            .contains("instead of"));
        assert!(parse_session("not json", &pk, Metric::Bytes).is_err());
    }

    #[test]
    fn usage_parses() {
        assert_eq!(parse_usage("-1/-1\n"), Ok(None));
        assert_eq!(parse_usage(" 10/200 "), Ok(Some((10, 200))));
        for bad in ["", "10", "a/b", "-5/10", "10/-1", "1/2/3"] {
            assert!(parse_usage(bad).is_err(), "{bad}");
        }
    }
}
