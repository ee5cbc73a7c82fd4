//! The fuzz targets: each one feeds bytes to ONE parser the daemon really uses on input it
//! does not control, and checks what a successful parse promises (not only "no panic").
//!
//! ```text
//! token            ──> protocol::normalize_token + wallet::decode_token   (POST / token, CLI receive)
//! payment_body     ──> protocol::parse_payment (content type from byte 0) (POST / body)
//! nostr_event      ──> protocol::parse_payment on a kind-21000 event      (raw JSON, or tags we sign)
//! config           ──> config::Config::from_strs                          (config.json \0 identities.json)
//! upstream_answer  ──> upstream::client::{parse_advertisement, parse_session, parse_usage}
//!                      and upstream::client::request over loopback        (raw HTTP answer bytes)
//! ```
//! The same functions run twice: under libFuzzer (`cargo xtask fuzz`, nightly, ASan) and,
//! on stable, over the checked-in `fuzz/corpus/<target>/` plus deterministic mutations of it
//! (`tests/tests/fuzz_corpus.rs`, the CI smoke pass). A signature stops random bytes from
//! reaching the tag parsers behind it, so the event targets also sign fuzzed tags with a fixed
//! key: the fuzzer then reaches every tag parser an honest-but-hostile signer can.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use nostr::{EventBuilder, JsonUtil, Keys, Kind, PublicKey, Tag, Timestamp};
use tollgate::config::Config;
use tollgate::protocol::{self, Metric};
use tollgate::types::canonical_mint_url;
use tollgate::upstream::client;
use tollgate::wallet;

/// One fuzz target: any bytes in, a panic on a crash or a broken promise.
pub type Target = fn(&[u8]);

/// Every target by name (what `cargo xtask fuzz` runs and the corpus replay walks).
pub const TARGETS: &[(&str, Target)] = &[
    ("token", token),
    ("payment_body", payment_body),
    ("nostr_event", nostr_event),
    ("config", config),
    ("upstream_answer", upstream_answer),
];

/// A cashu token as pasted by a customer (or `tollgate wallet receive`).
pub fn token(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = protocol::normalize_token(s) {
        assert!(t.starts_with("cashuA") || t.starts_with("cashuB"), "{t:?}");
        let again = protocol::normalize_token(&t).expect("a normalized token normalizes again");
        assert_eq!(again, t, "normalize_token is idempotent");
    }
    if let Ok((info, parsed)) = wallet::decode_token(s, |_| Some("sat")) {
        assert_eq!(info.token_id.len(), 64, "token id is a sha256");
        assert_eq!(info.unit, "sat");
        // The same proofs give the same id and value whatever the encoding.
        let (again, _) = wallet::decode_token(&parsed.to_string(), |_| Some("sat"))
            .expect("a decoded token re-encodes to a token that decodes");
        assert_eq!(again.token_id, info.token_id);
        assert_eq!(again.amount, info.amount);
        assert_eq!(again.mint, info.mint);
    }
}

/// A `POST /` body; byte 0 picks the Content-Type header the client sent.
pub fn payment_body(data: &[u8]) {
    let Some((&ct, body)) = data.split_first() else {
        return;
    };
    let ct = [
        None,
        Some("application/x-www-form-urlencoded"),
        Some("application/json"),
        Some("text/plain"),
        Some("APPLICATION/X-WWW-FORM-URLENCODED; charset=utf-8"),
    ][usize::from(ct) % 5];
    check_payment(ct, body, None);
}

/// A kind-21000 payment event. Byte 0 even: the rest is the event JSON as sent. Odd: the rest
/// is `{"content":…,"tags":[[…]]}` (or a bare tag array) that we sign as the customer, so the
/// tag parsing behind the signature check is reached too.
pub fn nostr_event(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        check_payment(Some("application/json"), rest, None);
        return;
    }
    let Some(json) = sign_fuzzed(rest, protocol::KIND_PAYMENT, customer()) else {
        return;
    };
    check_payment(
        Some("application/json"),
        json.as_bytes(),
        Some(customer().public_key()),
    );
}

/// `config.json`, a NUL byte, `identities.json` (without a NUL: a valid identities file).
pub fn config(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (cfg, ids) = s.split_once('\0').unwrap_or((s, IDENTITIES));
    let Ok(c) = Config::from_strs(std::path::Path::new("/fuzz"), cfg, ids) else {
        return;
    };
    assert!(c.merchant.step_size > 0);
    assert!(!c.merchant.mints.is_empty());
    for m in &c.merchant.mints {
        assert!(m.price_per_step > 0, "{m:?}");
        assert_eq!(
            canonical_mint_url(&m.url).as_deref(),
            Ok(m.url.as_str()),
            "a mint URL is stored canonical"
        );
    }
}

/// What an upstream gateway answers. Byte 0 mod 3: 0 = the body of `GET /`, `POST /` or
/// `/usage` as received; 1 = tags we sign as the upstream (kind 10021 and 1022); 2 = the raw
/// bytes of a whole HTTP answer, served on loopback to the real upstream client.
pub fn upstream_answer(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(body) = std::str::from_utf8(rest) {
                check_answer_body(body);
            }
        }
        1 => {
            for kind in [protocol::KIND_ADVERTISEMENT, protocol::KIND_SESSION] {
                if let Some(json) = sign_fuzzed(rest, kind, upstream()) {
                    check_answer_body(&json);
                }
            }
        }
        _ => {
            if let Some(body) = fetch_from_loopback(rest) {
                check_answer_body(&body);
            }
        }
    }
}

/// The merchant's identities file used when a config input has no NUL.
const IDENTITIES: &str = r#"{"owned_identities":[{"name":"merchant","privatekey":"5c2b0c3d4e5f60718293a4b5c6d7e8f90112233445566778899aabbccddeeff0"}],"public_identities":[{"name":"owner","lightning_address":"owner@example.com"}]}"#;

fn keys(cell: &'static OnceLock<Keys>, hex: &str) -> &'static Keys {
    cell.get_or_init(|| Keys::parse(hex).expect("fixed key"))
}

fn gateway() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    keys(
        &K,
        "5c2b0c3d4e5f60718293a4b5c6d7e8f90112233445566778899aabbccddeeff0",
    )
}

fn customer() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    keys(
        &K,
        "0101010101010101010101010101010101010101010101010101010101010101",
    )
}

fn upstream() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    keys(
        &K,
        "0202020202020202020202020202020202020202020202020202020202020202",
    )
}

/// Runs the payment parser the way `POST /` does and checks what an `Ok` promises.
fn check_payment(ct: Option<&str>, body: &[u8], signer: Option<PublicKey>) {
    let ours = gateway().public_key();
    let Ok(p) = protocol::parse_payment(ct, body, Some(&ours)) else {
        return;
    };
    assert_eq!(
        protocol::normalize_token(&p.token).ok().as_deref(),
        Some(p.token.as_str()),
        "the token of a parsed payment is already normalized"
    );
    if let Some(signer) = signer {
        assert_eq!(
            p.customer,
            Some(signer),
            "the customer is the event's signer"
        );
    }
}

/// Every parser of an upstream's answer body; each `Ok` checked against what it promises.
fn check_answer_body(body: &str) {
    if let Ok(ad) = client::parse_advertisement(body) {
        assert!(ad.ad.step_size > 0);
        assert!(!ad.ad.prices.is_empty());
        assert_eq!(ad.pubkey.len(), 64);
    }
    let signer = upstream().public_key().to_hex();
    for metric in [Metric::Bytes, Metric::Milliseconds] {
        if let Ok(s) = client::parse_session(body, &signer, metric) {
            assert_eq!(s.metric, metric);
        }
    }
    if let Ok(Some((used, allotment))) = client::parse_usage(body) {
        let again = client::parse_usage(&format!("{used}/{allotment}"));
        assert_eq!(again, Ok(Some((used, allotment))));
    }
}

/// `{"content": "...", "tags": [[...]]}` or a bare `[[...]]`, signed with `keys` as `kind`.
fn sign_fuzzed(data: &[u8], kind: u16, keys: &Keys) -> Option<String> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Input {
        Full {
            #[serde(default)]
            content: String,
            tags: Vec<Vec<String>>,
        },
        Tags(Vec<Vec<String>>),
    }
    let (content, tags) = match serde_json::from_slice::<Input>(data).ok()? {
        Input::Full { content, tags } => (content, tags),
        Input::Tags(tags) => (String::new(), tags),
    };
    let tags = tags
        .into_iter()
        .map(Tag::parse)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let ev = EventBuilder::new(Kind::from_u16(kind), content)
        .tags(tags)
        .custom_created_at(Timestamp::from(1_700_000_000))
        .sign_with_keys(keys)
        .ok()?;
    Some(ev.as_json())
}

/// Serves `raw` as the whole answer to one request on loopback and fetches it with the
/// upstream client; the answer's body when the client accepted it.
fn fetch_from_loopback(raw: &[u8]) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr: SocketAddr = listener.local_addr().expect("local addr");
        let raw = raw.to_vec();
        let server = tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&raw).await;
                let _ = s.shutdown().await;
            }
        });
        // The server closes after writing, so the client always gets EOF: a timeout here
        // would be a hang in the client's parser, and libFuzzer reports it as one.
        let answer = client::request(addr, "GET", "/", None, Duration::from_secs(5)).await;
        server.abort();
        let answer = answer.ok()?;
        assert!(answer.body.len() <= client::MAX_ANSWER, "body over the cap");
        assert!(
            !(300..400).contains(&answer.status),
            "a redirect is an error, never an answer"
        );
        Some(answer.body)
    })
}
