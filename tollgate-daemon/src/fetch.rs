//! The one outgoing HTTP/1.1 client for peers we do not trust: upstream gateways (`GET /`,
//! `GET /usage`, `POST /`) and LNURL servers. Built on `bitreq` (maintained, already in the
//! tree as cdk's HTTP backend; async, rustls) instead of hand-written parsers, with:
//!
//! ```text
//! request ─> url check (http/https only) ─> bitreq: max_redirects 0, header cap, body cap
//!         ─> whole exchange under one tokio timeout ─> 3xx = error (never followed)
//!         ─> body must be UTF-8 ─> Answer { status, body }
//! ```
//! Callers keep their own address checks (SSRF guards) before calling: this client never
//! contacts a host the caller did not name, because redirects are refused, not followed.

use std::time::Duration;

/// What one exchange may cost us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The whole exchange: connect, send, headers and body (a slow drip ends here).
    pub timeout: Duration,
    /// Largest body accepted (chunked or not); larger answers are refused.
    pub max_body: usize,
}

/// Headers larger than this are refused (our peers send a handful).
const MAX_HEADERS: usize = 16 * 1024;

/// One answer: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("bad url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("redirect refused ({detail}): redirects are not followed")]
    Redirect { detail: String },
    #[error("answer larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("no answer within {timeout:?}")]
    Timeout { timeout: Duration },
    #[error("body is not UTF-8")]
    NotUtf8,
    #[error("{source}")]
    Transport {
        #[source]
        source: bitreq::Error,
    },
}

/// `GET url`.
pub async fn get(url: &str, limits: Limits) -> Result<Answer, FetchError> {
    exchange(bitreq::get(check_url(url)?), limits).await
}

/// `POST url` with a `text/plain` body.
pub async fn post(url: &str, body: &str, limits: Limits) -> Result<Answer, FetchError> {
    let req = bitreq::post(check_url(url)?)
        .with_header("Content-Type", "text/plain")
        .with_body(body.as_bytes().to_vec());
    exchange(req, limits).await
}

fn check_url(url: &str) -> Result<&str, FetchError> {
    let parsed = url::Url::parse(url).map_err(|e| FetchError::Url {
        url: url.to_string(),
        reason: e.to_string(),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(FetchError::Url {
            url: url.to_string(),
            reason: format!("scheme {} not allowed", parsed.scheme()),
        });
    }
    Ok(url)
}

async fn exchange(req: bitreq::Request, limits: Limits) -> Result<Answer, FetchError> {
    let secs = limits.timeout.as_secs().max(1);
    let req = req
        .with_header("User-Agent", "tollgate")
        .with_max_redirects(0)
        .with_max_headers_size(MAX_HEADERS)
        .with_max_status_line_length(1024)
        .with_max_body_size(limits.max_body)
        .with_timeout(secs);
    let resp = tokio::time::timeout(limits.timeout, req.send_async())
        .await
        .map_err(|_| FetchError::Timeout {
            timeout: limits.timeout,
        })?
        .map_err(|source| match source {
            bitreq::Error::BodyOverflow => FetchError::TooLarge {
                limit: limits.max_body,
            },
            bitreq::Error::TooManyRedirections => FetchError::Redirect {
                detail: "3xx with a Location".into(),
            },
            source => FetchError::Transport { source },
        })?;
    let status = u16::try_from(resp.status_code).unwrap_or(0);
    if (300..400).contains(&status) {
        return Err(FetchError::Redirect {
            detail: format!(
                "status {status} to {:?}",
                resp.headers.get("location").cloned().unwrap_or_default()
            ),
        });
    }
    if resp.as_bytes().len() > limits.max_body {
        return Err(FetchError::TooLarge {
            limit: limits.max_body,
        });
    }
    let body = String::from_utf8(resp.into_bytes()).map_err(|_| FetchError::NotUtf8)?;
    Ok(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot raw TCP server on loopback answering `raw` (optionally dripping it).
    async fn serve(raw: Vec<u8>, drip: Option<Duration>) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let raw = raw.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    if s.read(&mut buf).await.is_err() {
                        return;
                    }
                    match drip {
                        None => {
                            s.write_all(&raw).await.ok();
                        }
                        Some(d) => {
                            for b in raw {
                                if s.write_all(&[b]).await.is_err() {
                                    return;
                                }
                                tokio::time::sleep(d).await;
                            }
                        }
                    }
                });
            }
        });
        format!("http://{addr}/")
    }

    fn limits() -> Limits {
        Limits {
            timeout: Duration::from_secs(3),
            max_body: 64 * 1024,
        }
    }

    #[tokio::test]
    async fn plain_and_chunked_answers() {
        let url = serve(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc".to_vec(),
            None,
        )
        .await;
        let a = get(&url, limits()).await.expect("plain");
        assert_eq!((a.status, a.body.as_str()), (200, "abc"));
        let url = serve(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                .to_vec(),
            None,
        )
        .await;
        assert_eq!(get(&url, limits()).await.expect("chunked").body, "abcde");
        let a = post(&url, "token", limits()).await.expect("post");
        assert_eq!(a.body, "abcde");
    }

    /// The old hand-written parser added the chunk size to an index unchecked:
    /// `ffffffffffffffff` overflowed and the slice panicked, killing the buyer task.
    #[tokio::test]
    async fn hostile_chunk_sizes_are_errors_not_panics() {
        for size in [
            "ffffffffffffffff",
            "fffffffffffffffffffff",
            "7fffffffffffffff",
            "-1",
        ] {
            let raw = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nabc\r\n0\r\n\r\n"
            );
            let url = serve(raw.into_bytes(), None).await;
            let r = get(&url, limits()).await;
            assert!(r.is_err(), "{size}: {r:?}");
        }
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused_chunked_or_not() {
        let big = "x".repeat(100 * 1024);
        let raw = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{big}",
            big.len()
        );
        let url = serve(raw.into_bytes(), None).await;
        assert!(matches!(
            get(&url, limits()).await,
            Err(FetchError::TooLarge { .. })
        ));
        let mut raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..100 {
            raw.extend_from_slice(format!("400\r\n{}\r\n", "y".repeat(1024)).as_bytes());
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        let url = serve(raw, None).await;
        assert!(matches!(
            get(&url, limits()).await,
            Err(FetchError::TooLarge { .. })
        ));
        // Endless headers.
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..5000 {
            raw.extend_from_slice(format!("X-{i}: {}\r\n", "h".repeat(20)).as_bytes());
        }
        let url = serve(raw, None).await;
        assert!(get(&url, limits()).await.is_err());
    }

    #[tokio::test]
    async fn redirects_are_refused_not_followed() {
        // The target would answer 200 if we followed.
        let target = serve(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            None,
        )
        .await;
        for status in [301, 302, 303, 307, 308] {
            let raw = format!(
                "HTTP/1.1 {status} Moved\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n"
            );
            let url = serve(raw.into_bytes(), None).await;
            let r = get(&url, limits()).await;
            assert!(
                matches!(r, Err(FetchError::Redirect { .. })),
                "{status}: {r:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_slow_drip_ends_at_the_timeout() {
        let raw = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n{}",
            "z".repeat(400)
        );
        let url = serve(raw.into_bytes(), Some(Duration::from_millis(20))).await;
        let l = Limits {
            timeout: Duration::from_millis(500),
            ..limits()
        };
        assert!(matches!(
            get(&url, l).await,
            Err(FetchError::Timeout { .. })
        ));
    }

    #[tokio::test]
    async fn garbage_and_bad_urls() {
        for raw in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\n\r\n\xff\xfe",
        ] {
            let url = serve(raw.to_vec(), None).await;
            assert!(get(&url, limits()).await.is_err());
        }
        assert!(matches!(
            get("file:///etc/passwd", limits()).await,
            Err(FetchError::Url { .. })
        ));
        assert!(get("not a url", limits()).await.is_err());
    }
}
