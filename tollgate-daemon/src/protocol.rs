//! The TollGate wire protocol: the signed Nostr events and the payment bodies.
//!
//! ```text
//! GET  /  ──> Advertisement (kind 10021: metric, step_size, tips, one price_per_step per mint)
//! POST /  ──> parse_payment(body) ──> Payment { token, customer? }
//!              ├─ ok   ──> Session (kind 1022: p?, device-identifier, allotment, metric)
//!              └─ fail ──> Notice  (kind 21023: p?, level, code; content = message)
//! ```
//! Our extension (issue 15, speed tiers): `tier` tags after the standard ones in 10021 (one
//! per tier and mint, [`TierOption`]) and 1022, and `["tier", name]` in a 21000 payment.
//! Everything here is a plain function over bytes and events so it can be tested without a
//! network. Events are NIP-01 (sha256 id) + BIP-340 signatures via the `nostr` crate.
//!
//! The MAC a kind-21000 event claims is deliberately not exposed: the HTTP layer takes the
//! customer's MAC from the neighbour table only.

use std::{fmt, str::FromStr};

use nostr::{Event, EventBuilder, JsonUtil, Keys, Kind, PublicKey, Tag, Timestamp};
use serde::{Deserialize, Serialize};

use crate::valve::MacAddr;

/// Kind of the gateway's advertisement (TIP-01).
pub const KIND_ADVERTISEMENT: u16 = 10021;
/// Kind of the session answer to a successful payment.
pub const KIND_SESSION: u16 = 1022;
/// Kind of the payment event the shipped captive portal still sends.
pub const KIND_PAYMENT: u16 = 21000;
/// Kind of the notice answered on failure.
pub const KIND_NOTICE: u16 = 21023;
/// Largest POST body we look at (the HTTP layer answers 413 above it).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// TIPs this gateway implements, advertised in the `tips` tag.
pub const TIPS: [&str; 2] = ["1", "2"];

/// Errors of the protocol layer: every malformed input maps to one of these, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("body too large: {size} bytes (limit {max})")]
    TooLarge { size: usize, max: usize },
    #[error("empty body: expected a cashu token or a kind-21000 event")]
    Empty,
    #[error("body is not valid utf-8")]
    NotUtf8,
    #[error("invalid token: {reason}")]
    InvalidToken { reason: String },
    #[error("invalid event: {reason}")]
    InvalidEvent { reason: String },
    #[error("wrong event kind {found} (expected {expected})")]
    WrongKind { expected: u16, found: u16 },
    #[error("event lacks the `{tag}` tag")]
    MissingTag { tag: &'static str },
    #[error("malformed `{tag}` tag: {reason}")]
    BadTag { tag: &'static str, reason: String },
    #[error("event id or signature does not verify")]
    BadSignature,
    #[error("event is addressed to another gateway ({to})")]
    NotForUs { to: String },
    #[error("signing event: {source}")]
    Sign {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What the gateway sells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Bytes,
    Milliseconds,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Bytes => "bytes",
            Metric::Milliseconds => "milliseconds",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bytes" => Ok(Metric::Bytes),
            "milliseconds" => Ok(Metric::Milliseconds),
            other => Err(format!("unknown metric {other:?}")),
        }
    }
}

/// One `price_per_step` tag: `["price_per_step","cashu",price,unit,mint_url,min_steps]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceOption {
    pub price_per_step: u64,
    pub unit: String,
    pub mint_url: String,
    pub min_steps: u64,
}

/// The kind-10021 advertisement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advertisement {
    pub metric: Metric,
    pub step_size: u64,
    pub tips: Vec<String>,
    pub prices: Vec<PriceOption>,
}

impl Advertisement {
    pub fn tags(&self) -> Vec<Vec<String>> {
        let mut tags = vec![
            vec!["metric".into(), self.metric.to_string()],
            vec!["step_size".into(), self.step_size.to_string()],
        ];
        let mut tips = vec!["tips".to_string()];
        tips.extend(self.tips.iter().cloned());
        tags.push(tips);
        // The optional tag the shipped portal reads: the smallest purchase any option allows
        // (never 0: a purchase is at least one step), no maximum ("0").
        if let Some(min) = self.prices.iter().map(|p| p.min_steps.max(1)).min() {
            tags.push(vec![
                "step_purchase_limits".into(),
                min.to_string(),
                "0".into(),
            ]);
        }
        for p in &self.prices {
            tags.push(vec![
                "price_per_step".into(),
                "cashu".into(),
                p.price_per_step.to_string(),
                p.unit.clone(),
                p.mint_url.clone(),
                p.min_steps.to_string(),
            ]);
        }
        tags
    }

    pub fn to_event(&self, keys: &Keys, created_at: u64) -> Result<Event, ProtocolError> {
        sign(keys, KIND_ADVERTISEMENT, "", self.tags(), created_at)
    }

    /// [`Advertisement::to_event`] with our extension tags after the standard ones (which
    /// stay exactly as they are; clients ignore tags they do not know).
    pub fn to_event_with(
        &self,
        keys: &Keys,
        created_at: u64,
        tiers: &[TierOption],
    ) -> Result<Event, ProtocolError> {
        let mut tags = self.tags();
        tags.extend(tiers.iter().map(TierOption::tag));
        sign(keys, KIND_ADVERTISEMENT, "", tags, created_at)
    }

    /// Parses and verifies an advertisement (an upstream's, or ours in tests).
    pub fn from_event(event: &Event) -> Result<Self, ProtocolError> {
        verified(event, KIND_ADVERTISEMENT)?;
        let metric = metric_tag(event)?;
        let step_size = parse_u64_tag(event, "step_size")?;
        let tips = find_tag(event, "tips")
            .map(|t| t[1..].to_vec())
            .unwrap_or_default();
        // TIP-02: one tag per bearer asset; a tag we cannot use (another asset type, or
        // malformed) is skipped like the reference does, the others still sell.
        let prices: Vec<PriceOption> = tags_named(event, "price_per_step")
            .filter_map(price_option)
            .collect();
        if prices.is_empty() {
            return Err(ProtocolError::MissingTag {
                tag: "price_per_step",
            });
        }
        Ok(Advertisement {
            metric,
            step_size,
            tips,
            prices,
        })
    }
}

/// Our extension tag of kind 10021 (not in TIP-01/02), one per tier and mint:
/// `["tier", name, down_kbit, up_kbit, "cashu", price_per_step, unit, mint_url, min_steps]`.
/// Rates in kbit/s, 0 = unlimited; the price and what follows read like `price_per_step`'s.
/// Pay at a tier by adding `["tier", name]` to a kind-21000 event or `?tier=name` to the POST.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierOption {
    pub name: String,
    pub down_kbit: u64,
    pub up_kbit: u64,
    pub price: PriceOption,
}

impl TierOption {
    pub fn tag(&self) -> Vec<String> {
        vec![
            "tier".into(),
            self.name.clone(),
            self.down_kbit.to_string(),
            self.up_kbit.to_string(),
            "cashu".into(),
            self.price.price_per_step.to_string(),
            self.price.unit.clone(),
            self.price.mint_url.clone(),
            self.price.min_steps.to_string(),
        ]
    }
}

/// The tier options of an advertisement (malformed ones skipped, like `price_per_step`).
pub fn tier_options(event: &Event) -> Vec<TierOption> {
    tags_named(event, "tier")
        .filter_map(|t| {
            if t.len() < 8 {
                return None;
            }
            Some(TierOption {
                name: t[1].clone(),
                down_kbit: t[2].parse().ok()?,
                up_kbit: t[3].parse().ok()?,
                price: price_option(&t[3..])?,
            })
        })
        .collect()
}

/// One `price_per_step` tag, or `None` when it is not a usable cashu price.
fn price_option(t: &[String]) -> Option<PriceOption> {
    if t.len() < 5 || t[1] != "cashu" {
        return None;
    }
    Some(PriceOption {
        price_per_step: t[2].parse().ok()?,
        unit: t[3].clone(),
        mint_url: t[4].clone(),
        min_steps: match t.get(5) {
            Some(v) => v.parse().ok()?,
            None => 0,
        },
    })
}

/// The kind-1022 session answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// The customer's pubkey, only when a kind-21000 event told us (never the MAC).
    pub customer: Option<PublicKey>,
    pub mac: MacAddr,
    /// Total allotment of this device, in metric units.
    pub allotment: u64,
    pub metric: Metric,
}

impl Session {
    pub fn tags(&self) -> Vec<Vec<String>> {
        let mut tags = Vec::new();
        if let Some(p) = self.customer {
            tags.push(vec!["p".into(), p.to_hex()]);
        }
        tags.push(vec![
            "device-identifier".into(),
            "mac".into(),
            self.mac.to_string(),
        ]);
        tags.push(vec!["allotment".into(), self.allotment.to_string()]);
        tags.push(vec!["metric".into(), self.metric.to_string()]);
        tags
    }

    pub fn to_event(&self, keys: &Keys, created_at: u64) -> Result<Event, ProtocolError> {
        sign(keys, KIND_SESSION, "", self.tags(), created_at)
    }

    /// [`Session::to_event`] with our `["tier", name]` extension tag after the standard ones
    /// (`None`: the default tier, no tag).
    pub fn to_event_with_tier(
        &self,
        keys: &Keys,
        created_at: u64,
        tier: Option<&str>,
    ) -> Result<Event, ProtocolError> {
        let mut tags = self.tags();
        if let Some(t) = tier {
            tags.push(vec!["tier".into(), t.to_string()]);
        }
        sign(keys, KIND_SESSION, "", tags, created_at)
    }

    pub fn from_event(event: &Event) -> Result<Self, ProtocolError> {
        verified(event, KIND_SESSION)?;
        let customer = customer_tag(event)?;
        let mac = device_mac(event)?.ok_or(ProtocolError::MissingTag {
            tag: "device-identifier",
        })?;
        let allotment = parse_u64_tag(event, "allotment")?;
        let metric = metric_tag(event)?;
        Ok(Session {
            customer,
            mac,
            allotment,
            metric,
        })
    }
}

/// Severity of a notice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Error,
    Warning,
    Info,
    Debug,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warning => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

/// Notice codes (the spec's and those the reference emits that clients know).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NoticeCode {
    SessionError,
    UpstreamNotConnected,
    MintNotAccepted,
    TokenSpent,
    InvalidToken,
    LockedToken,
    InvalidEvent,
    InvalidRequest,
    MacLookupFailed,
    ProcessingTimeout,
    MintRateLimited,
    ProcessingFailed,
    InternalError,
    ServiceUnavailable,
    NoReachableMints,
}

impl NoticeCode {
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeCode::SessionError => "session-error",
            NoticeCode::UpstreamNotConnected => "upstream-error-not-connected",
            NoticeCode::MintNotAccepted => "payment-error-mint-not-accepted",
            NoticeCode::TokenSpent => "payment-error-token-spent",
            NoticeCode::InvalidToken => "payment-error-invalid-token",
            NoticeCode::LockedToken => "payment-error-locked-token",
            NoticeCode::InvalidEvent => "invalid-event",
            NoticeCode::InvalidRequest => "invalid-request",
            NoticeCode::MacLookupFailed => "mac-address-lookup-failed",
            NoticeCode::ProcessingTimeout => "payment-processing-timeout",
            NoticeCode::MintRateLimited => "mint-rate-limited",
            NoticeCode::ProcessingFailed => "payment-processing-failed",
            NoticeCode::InternalError => "internal-error",
            NoticeCode::ServiceUnavailable => "service-unavailable",
            NoticeCode::NoReachableMints => "no-reachable-mints",
        }
    }
}

impl fmt::Display for NoticeCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind-21023 notice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub customer: Option<PublicKey>,
    pub level: Level,
    pub code: NoticeCode,
    pub message: String,
}

impl Notice {
    pub fn error(code: NoticeCode, message: impl Into<String>) -> Self {
        Notice {
            customer: None,
            level: Level::Error,
            code,
            message: message.into(),
        }
    }

    pub fn tags(&self) -> Vec<Vec<String>> {
        let mut tags = Vec::new();
        if let Some(p) = self.customer {
            tags.push(vec!["p".into(), p.to_hex()]);
        }
        tags.push(vec!["level".into(), self.level.as_str().into()]);
        tags.push(vec!["code".into(), self.code.as_str().into()]);
        tags
    }

    pub fn to_event(&self, keys: &Keys, created_at: u64) -> Result<Event, ProtocolError> {
        sign(keys, KIND_NOTICE, &self.message, self.tags(), created_at)
    }
}

/// A parsed `POST /` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    /// The bare `cashuA…`/`cashuB…` token (trimmed, `cashu:` prefix removed, decodable).
    pub token: String,
    /// The signer of a kind-21000 event (a throwaway customer key), if the body was one.
    pub customer: Option<PublicKey>,
    /// The tier asked for (our extension: a 21000 `["tier", name]` tag or `POST /?tier=`),
    /// as sent: the merchant checks it (`tiers::Tiers::choose`) before anything is redeemed.
    pub tier: Option<String>,
}

/// Parses a payment body in any of the encodings real clients send.
///
/// `gateway` is our pubkey: a kind-21000 event whose `p` tag names another key is refused
/// (it was meant for another gateway and replaying it here is not the payer's intent).
pub fn parse_payment(
    content_type: Option<&str>,
    body: &[u8],
    gateway: Option<&PublicKey>,
) -> Result<Payment, ProtocolError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(ProtocolError::TooLarge {
            size: body.len(),
            max: MAX_BODY_BYTES,
        });
    }
    let text = std::str::from_utf8(body).map_err(|_| ProtocolError::NotUtf8)?;
    let mut text = text.trim().to_string();
    let is_form = content_type
        .map(|c| {
            c.to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        })
        .unwrap_or(false);
    // `curl -d <token>` labels the raw token as a form; only decode when it looks like one,
    // because a raw token never contains '='-separated fields named like ours.
    if is_form || looks_like_form(&text) {
        if let Some(v) = form_field(&text) {
            text = v.trim().to_string();
        }
    }
    if text.is_empty() {
        return Err(ProtocolError::Empty);
    }
    if text.starts_with('{') {
        return parse_payment_event(&text, gateway);
    }
    Ok(Payment {
        token: normalize_token(&text)?,
        customer: None,
        tier: None,
    })
}

fn looks_like_form(text: &str) -> bool {
    ["token=", "payment=", "event="]
        .iter()
        .any(|k| text.starts_with(k) || text.contains(&format!("&{k}")))
}

fn form_field(text: &str) -> Option<String> {
    url::form_urlencoded::parse(text.as_bytes())
        .find(|(k, _)| k == "token" || k == "payment" || k == "event")
        .map(|(_, v)| v.into_owned())
}

/// Trims, strips a `cashu:` URI prefix and checks that the token decodes (v3 or v4).
pub fn normalize_token(raw: &str) -> Result<String, ProtocolError> {
    let mut t = raw.trim();
    // `get`, not `[..6]`: byte 6 of a hostile body may fall inside a multi-byte character.
    if let Some(rest) = t
        .get(..6)
        .filter(|p| p.eq_ignore_ascii_case("cashu:"))
        .and_then(|_| t.get(6..))
    {
        t = rest.trim_start_matches('/').trim();
    }
    if !(t.starts_with("cashuA") || t.starts_with("cashuB")) {
        let shown: String = t.chars().take(12).collect();
        return Err(ProtocolError::InvalidToken {
            reason: format!("expected a cashuA… or cashuB… token, got {shown:?}"),
        });
    }
    cdk::nuts::Token::from_str(t).map_err(|e| ProtocolError::InvalidToken {
        reason: e.to_string(),
    })?;
    Ok(t.to_string())
}

fn parse_payment_event(json: &str, gateway: Option<&PublicKey>) -> Result<Payment, ProtocolError> {
    let event = Event::from_json(json).map_err(|e| ProtocolError::InvalidEvent {
        reason: e.to_string(),
    })?;
    verified(&event, KIND_PAYMENT)?;
    if let (Some(ours), Some(to)) = (gateway, find_tag(&event, "p").and_then(|t| t.get(1))) {
        if !to.eq_ignore_ascii_case(&ours.to_hex()) {
            return Err(ProtocolError::NotForUs { to: to.clone() });
        }
    }
    let token =
        tag_value(&event, "payment")?.ok_or(ProtocolError::MissingTag { tag: "payment" })?;
    let mut tiers = tags_named(&event, "tier");
    let tier = match (tiers.next(), tiers.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => {
            return Err(ProtocolError::BadTag {
                tag: "tier",
                reason: "repeated: name one tier".into(),
            })
        }
        (Some(t), None) => Some(t.get(1).cloned().ok_or(ProtocolError::BadTag {
            tag: "tier",
            reason: "no value".into(),
        })?),
    };
    Ok(Payment {
        token: normalize_token(&token)?,
        customer: Some(event.pubkey),
        tier,
    })
}

/// Builds a kind-21000 payment event (what the captive portal and our upstream buyer send).
pub fn payment_event(
    keys: &Keys,
    gateway: &PublicKey,
    mac: MacAddr,
    token: &str,
    created_at: u64,
) -> Result<Event, ProtocolError> {
    payment_event_tagged(keys, gateway, mac, token, created_at, Vec::new())
}

/// [`payment_event`] with `extra` tags after the standard ones (e.g. `["tier","fast"]`).
pub fn payment_event_tagged(
    keys: &Keys,
    gateway: &PublicKey,
    mac: MacAddr,
    token: &str,
    created_at: u64,
    extra: Vec<Vec<String>>,
) -> Result<Event, ProtocolError> {
    let mut tags = vec![
        vec!["p".into(), gateway.to_hex()],
        vec!["device-identifier".into(), "mac".into(), mac.to_string()],
        vec!["payment".into(), token.to_string()],
    ];
    tags.extend(extra);
    sign(keys, KIND_PAYMENT, "", tags, created_at)
}

fn sign(
    keys: &Keys,
    kind: u16,
    content: &str,
    tags: Vec<Vec<String>>,
    created_at: u64,
) -> Result<Event, ProtocolError> {
    let tags = tags
        .into_iter()
        .map(|t| Tag::parse(t).map_err(|e| ProtocolError::Sign { source: e.into() }))
        .collect::<Result<Vec<_>, _>>()?;
    EventBuilder::new(Kind::from_u16(kind), content)
        .tags(tags)
        .custom_created_at(Timestamp::from(created_at))
        .sign_with_keys(keys)
        .map_err(|e| ProtocolError::Sign { source: e.into() })
}

fn verified(event: &Event, kind: u16) -> Result<(), ProtocolError> {
    if event.kind.as_u16() != kind {
        return Err(ProtocolError::WrongKind {
            expected: kind,
            found: event.kind.as_u16(),
        });
    }
    event.verify().map_err(|_| ProtocolError::BadSignature)
}

fn tags_named<'a>(event: &'a Event, name: &'a str) -> impl Iterator<Item = &'a [String]> + 'a {
    event
        .tags
        .iter()
        .map(|t| t.as_slice())
        .filter(move |t| t.first().map(String::as_str) == Some(name))
}

fn find_tag<'a>(event: &'a Event, name: &'a str) -> Option<&'a [String]> {
    tags_named(event, name).next()
}

fn tag_value(event: &Event, name: &'static str) -> Result<Option<String>, ProtocolError> {
    match find_tag(event, name) {
        None => Ok(None),
        Some(t) => t.get(1).cloned().map(Some).ok_or(ProtocolError::BadTag {
            tag: name,
            reason: "no value".into(),
        }),
    }
}

fn parse_u64_tag(event: &Event, name: &'static str) -> Result<u64, ProtocolError> {
    tag_value(event, name)?
        .ok_or(ProtocolError::MissingTag { tag: name })?
        .parse()
        .map_err(|_| ProtocolError::BadTag {
            tag: name,
            reason: "not an unsigned integer".into(),
        })
}

fn metric_tag(event: &Event) -> Result<Metric, ProtocolError> {
    tag_value(event, "metric")?
        .ok_or(ProtocolError::MissingTag { tag: "metric" })?
        .parse()
        .map_err(|reason| ProtocolError::BadTag {
            tag: "metric",
            reason,
        })
}

/// The `p` tag of a kind 1022: the spec's customer pubkey, or the customer's MAC, which every
/// reference release puts there (a known deviation we accept; the MAC is not a customer key).
fn customer_tag(event: &Event) -> Result<Option<PublicKey>, ProtocolError> {
    match tag_value(event, "p")? {
        None => Ok(None),
        Some(v) if v.parse::<MacAddr>().is_ok() => Ok(None),
        Some(v) => PublicKey::from_hex(&v)
            .map(Some)
            .map_err(|e| ProtocolError::BadTag {
                tag: "p",
                reason: e.to_string(),
            }),
    }
}

fn device_mac(event: &Event) -> Result<Option<MacAddr>, ProtocolError> {
    match find_tag(event, "device-identifier") {
        None => Ok(None),
        Some(t) if t.len() >= 3 && t[1] == "mac" => {
            t[2].parse()
                .map(Some)
                .map_err(|e: crate::valve::ParseMacError| ProtocolError::BadTag {
                    tag: "device-identifier",
                    reason: e.to_string(),
                })
        }
        Some(_) => Err(ProtocolError::BadTag {
            tag: "device-identifier",
            reason: "expected [\"device-identifier\",\"mac\",<mac>]".into(),
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use secp256k1::{schnorr, Message, XOnlyPublicKey, SECP256K1};
    use sha2::{Digest, Sha256};

    /// A real v4 token (cashu 0.18.3's NUT-00 test vector).
    pub const TOKEN_B: &str = "cashuBpGFtd2h0dHBzOi8vODMzMy5zcGFjZTozMzM4YXVjc2F0YWRqVGhhbmsgeW91LmF0gaJhaUgAmh8pMlPkHmFwgqRhYQJhc3hANDA3OTE1YmMyMTJiZTYxYTc3ZTNlNmQyYWViNGM3Mjc5ODBiZGE1MWNkMDZhNmFmYzI5ZTI4NjE3NjhhNzgzN2FjWCECvJCXmX2Br7LMc0a15DRak0a9KlBut5WFmKcvDPhRY-phZPakYWEIYXN4QGZlMTUxMDkzMTRlNjFkNzc1NmIwZjhlZTBmMjNhNjI0YWNhYTNmNGUwNDJmNjE0MzNjNzI4YzcwNTdiOTMxYmVhY1ghAp6OUFC4kKfWwJaNsWvB1dX6BA6h3ihPbsadYSmfZxBZYWT2";
    /// A real v3 token (cashu 0.18.3's NUT-00 test vector).
    pub const TOKEN_A: &str = "cashuAeyJ0b2tlbiI6W3sibWludCI6Imh0dHBzOi8vODMzMy5zcGFjZTozMzM4IiwicHJvb2ZzIjpbeyJhbW91bnQiOjIsImlkIjoiMDA5YTFmMjkzMjUzZTQxZSIsInNlY3JldCI6IjQwNzkxNWJjMjEyYmU2MWE3N2UzZTZkMmFlYjRjNzI3OTgwYmRhNTFjZDA2YTZhZmMyOWUyODYxNzY4YTc4MzciLCJDIjoiMDJiYzkwOTc5OTdkODFhZmIyY2M3MzQ2YjVlNDM0NWE5MzQ2YmQyYTUwNmViNzk1ODU5OGE3MmYwY2Y4NTE2M2VhIn0seyJhbW91bnQiOjgsImlkIjoiMDA5YTFmMjkzMjUzZTQxZSIsInNlY3JldCI6ImZlMTUxMDkzMTRlNjFkNzc1NmIwZjhlZTBmMjNhNjI0YWNhYTNmNGUwNDJmNjE0MzNjNzI4YzcwNTdiOTMxYmUiLCJDIjoiMDI5ZThlNTA1MGI4OTBhN2Q2YzA5NjhkYjE2YmMxZDVkNWZhMDQwZWExZGUyODRmNmVjNjlkNjEyOTlmNjcxMDU5In1dfV0sInVuaXQiOiJzYXQiLCJtZW1vIjoiVGhhbmsgeW91LiJ9";

    /// Recomputes the NIP-01 id and checks the BIP-340 signature without the nostr crate.
    pub fn independently_verify(json: &str) {
        let v: serde_json::Value = serde_json::from_str(json).expect("event json");
        let ser = serde_json::to_string(&serde_json::json!([
            0,
            v["pubkey"],
            v["created_at"],
            v["kind"],
            v["tags"],
            v["content"]
        ]))
        .expect("serialize");
        let id: [u8; 32] = Sha256::digest(ser.as_bytes()).into();
        assert_eq!(hex::encode(id), v["id"].as_str().expect("id"), "NIP-01 id");
        let sig = schnorr::Signature::from_slice(
            &hex::decode(v["sig"].as_str().expect("sig")).expect("sig hex"),
        )
        .expect("sig");
        let pk = XOnlyPublicKey::from_slice(
            &hex::decode(v["pubkey"].as_str().expect("pubkey")).expect("pk hex"),
        )
        .expect("pk");
        SECP256K1
            .verify_schnorr(&sig, &Message::from_digest(id), &pk)
            .expect("BIP-340 signature");
    }

    fn tags_of(json: &str) -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(json).expect("json")["tags"].clone()
    }

    fn ad() -> Advertisement {
        Advertisement {
            metric: Metric::Bytes,
            step_size: 22020096,
            tips: TIPS.iter().map(|s| s.to_string()).collect(),
            prices: vec![PriceOption {
                price_per_step: 1,
                unit: "sat".into(),
                mint_url: "https://mint.example".into(),
                min_steps: 0,
            }],
        }
    }

    #[test]
    fn advertisement_tags_verify_and_round_trip() {
        let keys = Keys::generate();
        let ev = ad().to_event(&keys, 1_700_000_000).expect("sign");
        let json = ev.as_json();
        independently_verify(&json);
        assert_eq!(
            tags_of(&json),
            serde_json::json!([
                ["metric", "bytes"],
                ["step_size", "22020096"],
                ["tips", "1", "2"],
                ["step_purchase_limits", "1", "0"],
                [
                    "price_per_step",
                    "cashu",
                    "1",
                    "sat",
                    "https://mint.example",
                    "0"
                ]
            ])
        );
        assert_eq!(ev.created_at.as_secs(), 1_700_000_000);
        let back = Advertisement::from_event(&Event::from_json(&json).expect("parse")).expect("ad");
        assert_eq!(back, ad());
    }

    #[test]
    fn session_tags_with_and_without_customer() {
        let keys = Keys::generate();
        let customer = Keys::generate().public_key();
        let mac: MacAddr = "aa:bb:cc:dd:ee:ff".parse().expect("mac");
        let s = Session {
            customer: None,
            mac,
            allotment: 42,
            metric: Metric::Milliseconds,
        };
        let json = s.to_event(&keys, 1).expect("sign").as_json();
        independently_verify(&json);
        assert_eq!(
            tags_of(&json),
            serde_json::json!([
                ["device-identifier", "mac", "aa:bb:cc:dd:ee:ff"],
                ["allotment", "42"],
                ["metric", "milliseconds"]
            ])
        );
        let s2 = Session {
            customer: Some(customer),
            ..s.clone()
        };
        let ev = s2.to_event(&keys, 1).expect("sign");
        independently_verify(&ev.as_json());
        assert_eq!(tags_of(&ev.as_json())[0][1], customer.to_hex());
        assert_eq!(Session::from_event(&ev).expect("parse"), s2);
    }

    /// Issue 12 item 1 / 8: every reference release puts the customer's MAC in `p` and adds
    /// `start-time`; a hex pubkey in `p` (the spec) still parses as the customer.
    #[test]
    fn session_from_the_reference_with_mac_in_p_and_start_time() {
        let keys = Keys::generate();
        let tags = vec![
            vec!["p".into(), "AA:BB:CC:DD:EE:FF".into()],
            vec![
                "device-identifier".into(),
                "mac".into(),
                "aa:bb:cc:dd:ee:ff".into(),
            ],
            vec!["allotment".into(), "131100000".into()],
            vec!["metric".into(), "bytes".into()],
            vec!["start-time".into(), "1700000000".into()],
        ];
        let ev = sign(&keys, KIND_SESSION, "", tags, 0).expect("sign");
        let s = Session::from_event(&ev).expect("the reference's kind 1022");
        assert_eq!(s.customer, None, "a MAC is not a customer key");
        assert_eq!(s.allotment, 131_100_000);
        // Garbage in `p` (neither a MAC nor a key) is still refused.
        let bad = sign(
            &keys,
            KIND_SESSION,
            "",
            vec![
                vec!["p".into(), "not-a-key".into()],
                vec![
                    "device-identifier".into(),
                    "mac".into(),
                    "aa:bb:cc:dd:ee:ff".into(),
                ],
                vec!["allotment".into(), "1".into()],
                vec!["metric".into(), "bytes".into()],
            ],
            0,
        )
        .expect("sign");
        assert!(Session::from_event(&bad).is_err());
    }

    /// Issue 12 item 7: a `price_per_step` tag for another bearer asset (TIP-02) or a malformed
    /// one is skipped; the usable tags still sell. Only no usable tag at all is fatal.
    #[test]
    fn unknown_asset_or_malformed_price_tag_is_skipped() {
        let keys = Keys::generate();
        let mut tags = vec![
            vec!["metric".into(), "bytes".into()],
            vec!["step_size".into(), "1000".into()],
            vec![
                "price_per_step".into(),
                "lightning".into(),
                "5".into(),
                "sat".into(),
                "".into(),
                "1".into(),
            ],
            vec!["price_per_step".into(), "cashu".into(), "x".into()],
            vec![
                "price_per_step".into(),
                "cashu".into(),
                "2".into(),
                "sat".into(),
                "https://mint.example".into(),
                "1".into(),
            ],
        ];
        let ev = sign(&keys, KIND_ADVERTISEMENT, "", tags.clone(), 0).expect("sign");
        let ad = Advertisement::from_event(&ev).expect("the usable tag sells");
        assert_eq!(ad.prices.len(), 1);
        assert_eq!(ad.prices[0].price_per_step, 2);
        tags.pop();
        let ev = sign(&keys, KIND_ADVERTISEMENT, "", tags, 0).expect("sign");
        assert!(matches!(
            Advertisement::from_event(&ev),
            Err(ProtocolError::MissingTag { .. })
        ));
    }

    #[test]
    fn notice_tags_and_content() {
        let keys = Keys::generate();
        let n = Notice::error(NoticeCode::TokenSpent, "already spent");
        let json = n.to_event(&keys, 5).expect("sign").as_json();
        independently_verify(&json);
        assert_eq!(
            tags_of(&json),
            serde_json::json!([["level", "error"], ["code", "payment-error-token-spent"]])
        );
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(v["content"], "already spent");
        assert_eq!(v["kind"], 21023);
    }

    #[test]
    fn raw_tokens_in_every_content_type() {
        for ct in [
            None,
            Some("text/plain"),
            Some("text/plain; charset=utf-8"),
            Some("application/json"),
            Some("application/x-www-form-urlencoded"),
        ] {
            for tok in [TOKEN_A, TOKEN_B] {
                for body in [
                    tok.to_string(),
                    format!("  {tok}\n"),
                    format!("cashu:{tok}"),
                ] {
                    let p = parse_payment(ct, body.as_bytes(), None).expect("token body");
                    assert_eq!(p.token, tok);
                    assert_eq!(p.customer, None);
                }
            }
        }
        let form = format!(
            "token={}",
            url::form_urlencoded::byte_serialize(TOKEN_A.as_bytes()).collect::<String>()
        );
        let p = parse_payment(
            Some("application/x-www-form-urlencoded"),
            form.as_bytes(),
            None,
        )
        .expect("form");
        assert_eq!(p.token, TOKEN_A);
    }

    #[test]
    fn payment_event_is_verified_and_yields_customer() {
        let gw = Keys::generate();
        let customer = Keys::generate();
        let mac: MacAddr = "02:00:00:00:00:01".parse().expect("mac");
        let ev = payment_event(
            &customer,
            &gw.public_key(),
            mac,
            TOKEN_B,
            crate::sys::clock::unix_secs(),
        )
        .expect("sign");
        let json = ev.as_json();
        independently_verify(&json);
        let p = parse_payment(
            Some("application/json"),
            json.as_bytes(),
            Some(&gw.public_key()),
        )
        .expect("event");
        assert_eq!(p.token, TOKEN_B);
        assert_eq!(p.customer, Some(customer.public_key()));

        // Addressed to another gateway.
        let other = Keys::generate().public_key();
        assert!(matches!(
            parse_payment(None, json.as_bytes(), Some(&other)),
            Err(ProtocolError::NotForUs { .. })
        ));
        // Tampered: the token swapped after signing.
        let tampered = json.replace(TOKEN_B, TOKEN_A);
        assert!(matches!(
            parse_payment(None, tampered.as_bytes(), None),
            Err(ProtocolError::BadSignature)
        ));
    }

    /// Regression (issue 11): byte 6 inside a multi-byte character panicked in `t[..6]`.
    #[test]
    fn non_ascii_prefix_is_an_error_not_a_panic() {
        for body in [
            "cashuéB",
            "ééé",
            "12345é",
            "cashu:é",
            "€€",
            "cashu\u{1F600}",
        ] {
            assert!(
                normalize_token(body).is_err(),
                "{body:?} is not a token and must not panic"
            );
            assert!(parse_payment(Some("text/plain"), body.as_bytes(), None).is_err());
        }
        // The URI prefix still works, in any case.
        assert!(normalize_token(&format!("CASHU:{TOKEN_B}")).is_ok());
    }

    #[test]
    fn malformed_corpus_errors_cleanly() {
        let keys = Keys::generate();
        let gw = keys.public_key();
        let wrong_kind = Notice::error(NoticeCode::InternalError, "x")
            .to_event(&keys, 1)
            .expect("sign")
            .as_json();
        let no_payment = sign(
            &keys,
            KIND_PAYMENT,
            "",
            vec![vec!["p".into(), gw.to_hex()]],
            1,
        )
        .expect("sign")
        .as_json();
        let bad_token_in_event = sign(
            &keys,
            KIND_PAYMENT,
            "",
            vec![vec!["payment".into(), "cashuBnope".into()]],
            1,
        )
        .expect("sign")
        .as_json();
        let huge = vec![b'a'; MAX_BODY_BYTES + 1];
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", b"".to_vec()),
            ("blank", b"  \n".to_vec()),
            ("not utf8", vec![0xff, 0xfe, 0x00]),
            ("garbage", b"hello".to_vec()),
            ("truncated v4", TOKEN_B.as_bytes()[..40].to_vec()),
            ("truncated v3", TOKEN_A.as_bytes()[..60].to_vec()),
            ("bad base64", b"cashuB!!!!****".to_vec()),
            ("bad cbor", b"cashuBAAAAAAAA".to_vec()),
            ("bad json in v3", b"cashuAeyJub3QiOg".to_vec()),
            ("huge", huge),
            ("json garbage", b"{\"kind\":".to_vec()),
            ("json not event", b"{\"a\":1}".to_vec()),
            ("wrong kind", wrong_kind.into_bytes()),
            ("missing payment tag", no_payment.into_bytes()),
            ("bad token in event", bad_token_in_event.into_bytes()),
            ("form without token", b"foo=bar".to_vec()),
        ];
        for (name, body) in cases {
            let r = std::panic::catch_unwind(|| {
                parse_payment(Some("application/x-www-form-urlencoded"), &body, Some(&gw))
            });
            let r = r.unwrap_or_else(|_| panic!("{name}: panicked"));
            let err = r.expect_err(name);
            assert!(!err.to_string().is_empty(), "{name}");
        }
        // A notice is not a payment and says so.
        let ev = Notice::error(NoticeCode::InternalError, "x")
            .to_event(&keys, 1)
            .expect("sign");
        assert!(matches!(
            Session::from_event(&ev),
            Err(ProtocolError::WrongKind {
                expected: 1022,
                found: 21023
            })
        ));
    }
}
