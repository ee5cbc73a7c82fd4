//! cdk's HTTP transport with a deadline on every mint call (cdk 0.18.3 sets none: a mint that
//! accepts the connection and never answers would hold the caller — and the per-mint lock it
//! may hold — forever).
//!
//! ```text
//! cdk Wallet ─> HttpClient<Bounded> ─> Bounded: timeout(call_timeout, Async::…) ─> the mint
//!                                               elapsed ─> HttpError::Timeout
//! ```
//! A timed-out call is what a dropped connection already was: cdk's saga for the operation
//! stays in its write-ahead log and is settled by `recover_incomplete_sagas` (at start) and
//! `finalize_pending_melts` (every payout round); our own receipts are checked against the mint
//! the same way. No money is decided by the timeout itself.

use std::time::Duration;

use async_trait::async_trait;
use cdk::nuts::AuthToken;
use cdk_http_client::{Async, HttpError, RawResponse, Transport};
use serde::{de::DeserializeOwned, Serialize};
use url::Url;

/// How long one mint call may take by default.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// [`Async`] (cdk's default transport) with a deadline per request.
#[derive(Debug, Clone)]
pub struct Bounded {
    inner: Async,
    timeout: Duration,
}

impl Bounded {
    pub fn new(timeout: Duration) -> Self {
        Bounded {
            inner: Async::default(),
            timeout,
        }
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, HttpError>> + Send,
    ) -> Result<T, HttpError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or(Err(HttpError::Timeout))
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
        self.inner
            .with_proxy(proxy, host_matcher, accept_invalid_certs)
    }

    async fn http_get<R>(&self, url: Url, auth: Option<AuthToken>) -> Result<R, HttpError>
    where
        R: DeserializeOwned,
    {
        self.bounded(self.inner.http_get(url, auth)).await
    }

    async fn http_get_raw(
        &self,
        url: Url,
        auth: Option<AuthToken>,
    ) -> Result<RawResponse, HttpError> {
        self.bounded(self.inner.http_get_raw(url, auth)).await
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
        self.bounded(self.inner.http_post(url, auth_token, payload))
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
        self.bounded(self.inner.http_post_form_raw(url, auth_token, payload))
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
}
