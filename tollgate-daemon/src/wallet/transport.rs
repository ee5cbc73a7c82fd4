//! cdk's HTTP transport with a deadline on every mint call (cdk 0.18.3 sets none: a mint that
//! accepts the connection and never answers would hold the caller — and the per-mint lock it
//! may hold — forever), and no call queued behind another one.
//!
//! ```text
//! cdk Wallet ─> HttpClient<Bounded> ─> Bounded: take an idle client (or a new one)
//!     ─> timeout(call_timeout, Async::…) ─> the mint
//!          answered ─> client back to the idle list (≤ MAX_IDLE, its connection kept alive)
//!          error / elapsed ─> client dropped with its connection; HttpError::Timeout
//! ```
//! Why a list of clients: cdk's client (bitreq) keeps one connection per host and sends the
//! requests on it one after the other, so with one client per mint every call to that mint
//! waited behind the slowest one in flight — a payout's melt held there by Lightning held
//! every customer's swap and every upstream purchase at the same mint — and a timed-out call
//! left its stalled connection in the pool for the next caller.
//!
//! A timed-out call is what a dropped connection already was: cdk's saga for the operation
//! stays in its write-ahead log and is settled by `recover_incomplete_sagas` (at start) and
//! `finalize_pending_melts` (every payout round); our own receipts are checked against the mint
//! the same way. No money is decided by the timeout itself.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use cdk::nuts::AuthToken;
use cdk_http_client::{Async, HttpError, RawResponse, Transport};
use serde::{de::DeserializeOwned, Serialize};
use url::Url;

/// How long one mint call may take by default.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle clients (each with at most one kept-alive connection) kept per mint.
const MAX_IDLE: usize = 4;

/// [`Async`] (cdk's default transport) with a deadline per request and a client (so a
/// connection) of its own for each call in flight.
#[derive(Debug, Clone)]
pub struct Bounded {
    idle: Arc<StdMutex<Vec<Async>>>,
    /// What [`Transport::with_proxy`] asked for, applied to every new client.
    proxy: Option<(Url, Option<String>, bool)>,
    timeout: Duration,
}

impl Bounded {
    pub fn new(timeout: Duration) -> Self {
        Bounded {
            idle: Arc::default(),
            proxy: None,
            timeout,
        }
    }

    fn checkout(&self) -> Result<Async, HttpError> {
        if let Some(client) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(client);
        }
        let mut client = Async::default();
        if let Some((proxy, matcher, invalid_certs)) = &self.proxy {
            client.with_proxy(proxy.clone(), matcher.as_deref(), *invalid_certs)?;
        }
        Ok(client)
    }

    async fn bounded<T, F, Fut>(&self, call: F) -> Result<T, HttpError>
    where
        F: FnOnce(Async) -> Fut + Send,
        Fut: std::future::Future<Output = Result<T, HttpError>> + Send,
    {
        let client = self.checkout()?;
        match tokio::time::timeout(self.timeout, call(client.clone())).await {
            Ok(Ok(answer)) => {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < MAX_IDLE {
                    idle.push(client);
                }
                Ok(answer)
            }
            // The connection may be broken or still busy: never hand it to the next call.
            Ok(Err(e)) => Err(e),
            Err(_) => Err(HttpError::Timeout),
        }
    }
}

#[async_trait]
impl Transport for Bounded {
    fn with_proxy(
        &mut self,
        proxy: Url,
        host_matcher: Option<&str>,
        accept_invalid_certs: bool,
    ) -> Result<(), HttpError> {
        // Fail now, not at the first call, if the proxy is unusable.
        Async::default().with_proxy(proxy.clone(), host_matcher, accept_invalid_certs)?;
        self.proxy = Some((
            proxy,
            host_matcher.map(str::to_string),
            accept_invalid_certs,
        ));
        self.idle = Arc::default();
        Ok(())
    }

    async fn http_get<R>(&self, url: Url, auth: Option<AuthToken>) -> Result<R, HttpError>
    where
        R: DeserializeOwned,
    {
        self.bounded(|c| async move { c.http_get(url, auth).await })
            .await
    }

    async fn http_get_raw(
        &self,
        url: Url,
        auth: Option<AuthToken>,
    ) -> Result<RawResponse, HttpError> {
        self.bounded(|c| async move { c.http_get_raw(url, auth).await })
            .await
    }

    async fn http_post<P, R>(
        &self,
        url: Url,
        auth_token: Option<AuthToken>,
        payload: &P,
    ) -> Result<R, HttpError>
    where
        P: Serialize + Send + Sync,
        R: DeserializeOwned,
    {
        self.bounded(|c| async move { c.http_post(url, auth_token, payload).await })
            .await
    }

    async fn http_post_form_raw<P>(
        &self,
        url: Url,
        auth_token: Option<AuthToken>,
        payload: &P,
    ) -> Result<RawResponse, HttpError>
    where
        P: Serialize + Send + Sync,
    {
        self.bounded(|c| async move { c.http_post_form_raw(url, auth_token, payload).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use cdk::{
        mint_url::MintUrl,
        wallet::{BaseHttpClient as HttpClient, MintConnector},
    };

    use super::*;

    /// Issue 11: a "mint" that accepts the connection and never answers. Every call through
    /// the bounded transport fails with a timeout instead of hanging (the outer 20 s bound
    /// is the failure being tested, not a measurement).
    #[tokio::test]
    async fn a_mint_that_never_answers_times_out() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                conns.push(s); // accepted, never read, never answered
            }
        });
        let url = MintUrl::from_str(&format!("http://{addr}")).expect("url");
        let client =
            HttpClient::with_transport(url, Bounded::new(Duration::from_millis(300)), None);
        let r = tokio::time::timeout(Duration::from_secs(20), client.get_mint_info())
            .await
            .expect("the call must not hang");
        assert!(r.is_err(), "a silent mint is an error");
        held.abort();
    }

    /// Issue 11: a call the mint holds (a melt waiting on Lightning) does not hold the next
    /// call to the same mint. The server never answers `/slow` and answers everything else
    /// at once; with one shared connection (bitreq serialises requests on it) the second
    /// call waited behind the first until its deadline.
    #[tokio::test]
    async fn a_held_call_does_not_queue_the_next_one() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (seen_slow, mut slow_rx) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let seen_slow = seen_slow.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        if buf[..n].starts_with(b"GET /slow") {
                            let _ = seen_slow.send(());
                            // Held: read on (and discard), never answer.
                            continue;
                        }
                        let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let t = Bounded::new(Duration::from_secs(30));
        let base = format!("http://{addr}");
        let url = |path: &str| Url::parse(&format!("{base}{path}")).expect("url");
        // Warm the connection first, so the old shared-connection code would reuse it.
        t.http_get_raw(url("/warm"), None)
            .await
            .expect("warm-up call");
        let slow = {
            let (t, u) = (t.clone(), url("/slow"));
            tokio::spawn(async move { t.http_get_raw(u, None).await })
        };
        tokio::time::timeout(Duration::from_secs(10), slow_rx.recv())
            .await
            .expect("the held call reached the server");
        let fast =
            tokio::time::timeout(Duration::from_secs(10), t.http_get_raw(url("/fast"), None))
                .await
                .expect("the second call waited behind the held one");
        assert!(fast.is_ok(), "{:?}", fast.err());
        assert!(!slow.is_finished(), "the first call is still held");
        slow.abort();
        server.abort();
    }
}
