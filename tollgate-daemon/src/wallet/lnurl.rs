//! A minimal LNURL-pay client (LUD-06 + LUD-16) for payouts.
//!
//! ```text
//! user@domain ──GET https://domain/.well-known/lnurlp/user──> {callback, minSendable, maxSendable}
//!             ──GET callback?amount=<msat>─────────────────> {pr: bolt11}
//!             ──check bolt11 amount == requested──────────> invoice to melt
//! ```
//! cdk's own helper insists on https, a public host and a same-host callback, which rules out
//! loopback test servers and some real providers, so we do it ourselves. Plain http is allowed
//! only for loopback hosts and only when `allow_loopback` is set (tests); callback hosts that
//! are private, link-local or otherwise non-global are refused (SSRF through a hostile
//! LNURL server). Resolved addresses are checked before the request; a DNS answer that
//! changes between our check and the HTTP client's own lookup is not covered. Requests go
//! through the shared client ([`crate::fetch`]): redirects are refused (each hop would need
//! the same check), bodies are capped at 64 KiB, every exchange times out after 15 s.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use cdk::Bolt11Invoice;
use serde::Deserialize;

use super::WalletError;

const TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PayParams {
    callback: String,
    min_sendable: u64,
    max_sendable: u64,
    tag: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CallbackAnswer {
    pr: Option<String>,
    status: Option<String>,
    reason: Option<String>,
}

fn err(address: &str, message: impl Into<String>) -> WalletError {
    WalletError::Lnurl {
        address: address.to_string(),
        message: message.into(),
    }
}

/// Split `user@domain` and build the LUD-16 well-known URL.
pub(crate) fn well_known_url(address: &str, allow_loopback: bool) -> Result<url::Url, WalletError> {
    let (user, domain) = address
        .trim()
        .split_once('@')
        .ok_or_else(|| err(address, "not a lightning address"))?;
    let valid_user = !user.is_empty()
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c));
    if !valid_user || domain.is_empty() || domain.contains(['/', '?', '#', '@']) {
        return Err(err(address, "not a lightning address"));
    }
    let host = domain.rsplit_once(':').map(|(h, _)| h).unwrap_or(domain);
    let scheme = if allow_loopback && is_loopback_host(host) {
        "http"
    } else {
        "https"
    };
    url::Url::parse(&format!(
        "{scheme}://{domain}/.well-known/lnurlp/{}",
        user.to_lowercase()
    ))
    .map_err(|e| err(address, e.to_string()))
}

fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || IpAddr::from_str(host).is_ok_and(|ip| ip.is_loopback())
}

/// True for addresses an LNURL server must never make us call.
pub(crate) fn is_forbidden_ip(ip: IpAddr, allow_loopback: bool) -> bool {
    if ip.is_loopback() {
        return !allow_loopback;
    }
    match ip {
        IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                // 100.64.0.0/10, carrier-grade NAT: often the gateway's own upstream side.
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link local
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_forbidden_ip(IpAddr::V4(v4), allow_loopback))
        }
    }
}

/// Refuse URLs whose scheme or host we must not call.
async fn check_target(
    address: &str,
    url: &url::Url,
    allow_loopback: bool,
) -> Result<(), WalletError> {
    let host = url
        .host_str()
        .ok_or_else(|| err(address, "url without host"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_loopback && is_loopback_host(host) => {}
        other => return Err(err(address, format!("scheme {other} not allowed"))),
    }
    let port = url.port_or_known_default().unwrap_or(443);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<IpAddr> = match IpAddr::from_str(bare) {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| err(address, format!("resolve {host}: {e}")))?
            .map(|a| a.ip())
            .collect(),
    };
    if addrs.is_empty() {
        return Err(err(address, format!("{host} did not resolve")));
    }
    if let Some(ip) = addrs
        .iter()
        .find(|ip| is_forbidden_ip(**ip, allow_loopback))
    {
        return Err(err(address, format!("refusing non-public address {ip}")));
    }
    Ok(())
}

/// The largest LNURL answer we read (pay parameters and an invoice are well under 4 KiB).
const MAX_ANSWER: usize = 64 * 1024;

/// `GET url` through the shared client: no redirects (a redirect would bypass
/// [`check_target`], which vets only the host we name), a body cap, one timeout.
async fn get_json<T: serde::de::DeserializeOwned>(
    address: &str,
    url: &url::Url,
) -> Result<T, WalletError> {
    let limits = crate::fetch::Limits {
        timeout: TIMEOUT,
        max_body: MAX_ANSWER,
    };
    let a = crate::fetch::get(url.as_str(), limits)
        .await
        .map_err(|e| err(address, format!("fetch {url}: {e}")))?;
    if a.status != 200 {
        return Err(err(address, format!("fetch {url}: status {}", a.status)));
    }
    serde_json::from_str(&a.body).map_err(|e| err(address, format!("fetch {url}: {e}")))
}

/// Resolve `address` to a bolt11 invoice for exactly `amount_msat`.
pub(crate) async fn invoice_for(
    address: &str,
    amount_msat: u64,
    allow_loopback: bool,
) -> Result<String, WalletError> {
    let well_known = well_known_url(address, allow_loopback)?;
    check_target(address, &well_known, allow_loopback).await?;
    let params: PayParams = get_json(address, &well_known).await?;
    if params.tag.as_deref().is_some_and(|t| t != "payRequest") {
        return Err(err(address, "not a payRequest"));
    }
    if amount_msat < params.min_sendable || amount_msat > params.max_sendable {
        return Err(err(
            address,
            format!(
                "amount {amount_msat} msat outside [{}, {}]",
                params.min_sendable, params.max_sendable
            ),
        ));
    }
    let mut callback = url::Url::parse(&params.callback)
        .map_err(|e| err(address, format!("bad callback: {e}")))?;
    check_target(address, &callback, allow_loopback).await?;
    callback
        .query_pairs_mut()
        .append_pair("amount", &amount_msat.to_string());
    let answer: CallbackAnswer = get_json(address, &callback).await?;
    if answer.status.as_deref() == Some("ERROR") {
        return Err(err(
            address,
            format!("callback error: {}", answer.reason.unwrap_or_default()),
        ));
    }
    let pr = answer
        .pr
        .ok_or_else(|| err(address, "callback answer without invoice"))?;
    let invoice = Bolt11Invoice::from_str(pr.trim())
        .map_err(|e| err(address, format!("bad invoice: {e}")))?;
    // A hostile or buggy server could hand out an invoice for more than we asked for.
    if invoice.amount_milli_satoshis() != Some(amount_msat) {
        return Err(err(
            address,
            format!(
                "invoice amount {:?} msat, asked for {amount_msat}",
                invoice.amount_milli_satoshis()
            ),
        ));
    }
    Ok(pr.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_urls() {
        assert_eq!(
            well_known_url("Alice@example.com", false)
                .expect("ok")
                .as_str(),
            "https://example.com/.well-known/lnurlp/alice"
        );
        assert_eq!(
            well_known_url("bob@127.0.0.1:8080", true)
                .expect("ok")
                .as_str(),
            "http://127.0.0.1:8080/.well-known/lnurlp/bob"
        );
        // Without the loopback switch, even loopback gets https.
        assert!(well_known_url("bob@127.0.0.1:8080", false)
            .expect("ok")
            .as_str()
            .starts_with("https://"));
        for bad in ["", "nobody", "@x.com", "a@", "a@b.com/evil", "a b@c.com"] {
            assert!(well_known_url(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn forbidden_ips() {
        for ip in [
            "10.0.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "172.16.0.1",
            "100.64.1.1",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
            "0.0.0.0",
        ] {
            assert!(is_forbidden_ip(ip.parse().expect("ip"), true), "{ip}");
        }
        assert!(is_forbidden_ip("127.0.0.1".parse().expect("ip"), false));
        assert!(!is_forbidden_ip("127.0.0.1".parse().expect("ip"), true));
        assert!(!is_forbidden_ip("1.1.1.1".parse().expect("ip"), false));
    }

    #[tokio::test]
    async fn refuses_private_callback_and_plain_http() {
        let url = url::Url::parse("https://10.1.2.3/cb").expect("url");
        assert!(check_target("a@b", &url, true).await.is_err());
        let url = url::Url::parse("http://example.com/cb").expect("url");
        assert!(check_target("a@b", &url, true).await.is_err());
        let url = url::Url::parse("http://127.0.0.1:9/cb").expect("url");
        assert!(check_target("a@b", &url, false).await.is_err());
        assert!(check_target("a@b", &url, true).await.is_ok());
    }
}
