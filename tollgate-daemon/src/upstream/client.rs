//! The few HTTP/1.1 requests we make to an upstream gateway (`GET /`, `POST /`, `GET /usage`)
//! through the shared client ([`crate::fetch`]), with a timeout on the whole exchange and a
//! cap on the answer. Redirects are not followed (an upstream cannot point us elsewhere), and
//! an answer larger than [`MAX_ANSWER`] is refused.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::UpstreamError;
use crate::fetch;
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

pub use crate::fetch::Answer;

/// One request to `addr` through the shared client ([`crate::fetch`]): the whole exchange
/// (connect, send, read) is bounded by `timeout`, the body by [`MAX_ANSWER`], and a redirect
/// is an error.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Answer, UpstreamError> {
    let url = format!("http://{addr}{path}");
    let limits = fetch::Limits {
        timeout,
        max_body: MAX_ANSWER,
    };
    let answer = match (method, body) {
        ("POST", Some(b)) => fetch::post(&url, b, limits).await,
        ("GET", None) => fetch::get(&url, limits).await,
        _ => {
            return Err(UpstreamError::Http {
                addr,
                path: path.to_string(),
                reason: format!("unsupported request {method}"),
            })
        }
    };
    answer.map_err(|e| UpstreamError::Http {
        addr,
        path: path.to_string(),
        reason: e.to_string(),
    })
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
