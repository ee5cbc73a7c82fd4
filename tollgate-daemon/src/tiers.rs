//! Speed tiers: a faster rate sold at a higher price per step, and the arithmetic that keeps
//! tiers from being gamed.
//!
//! ```text
//!  config.json "tiers": [{"name","down_kbit","up_kbit","price_factor"}]
//!    └─ validate ──> Tiers { default (accepted_mints prices × 1, `shaping` rates), extras }
//!  payment names a tier (21000 ["tier",name] | POST /?tier=name | none = default)
//!    └─ parse_choice (hostile input: length, charset) ── Tiers::get ── unknown: refused
//!       before the token is redeemed
//!  chandler.add under its guard:
//!    priced at   effective(requested, active) = the dearer of the two
//!    steps       = floor(net / (price_per_step × factor))
//!    upgrade     remaining allotment × active factor / new factor (floor), rate raised
//!    same/lower  added at the active tier's price; rate unchanged
//! ```
//! The price of a tier is the mint's `price_per_step` times an integer factor: one number per
//! tier keeps the rule "one price per unit across mints" of the standard tags, and integer
//! arithmetic converts allotments exactly (never rounded in the customer's favour by more
//! than one unit of the metric).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{config::ConfigError, valve::Rates};

/// Name of the tier of the standard `price_per_step` tags (`accepted_mints` × 1, `shaping`).
pub const DEFAULT_TIER: &str = "default";
/// At most this many tiers besides the default (each is one tag per mint in every `GET /`).
pub const MAX_TIERS: usize = 8;
/// Longest tier name.
pub const MAX_NAME_LEN: usize = 32;
/// Largest price factor (a typo like 30000 is refused rather than advertised).
pub const MAX_FACTOR: u64 = 1_000;

/// One entry of `tiers` in config.json.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSettings {
    pub name: String,
    /// Download rate in kbit/s (0 = unlimited).
    #[serde(default)]
    pub down_kbit: u64,
    /// Upload rate in kbit/s (0 = unlimited).
    #[serde(default)]
    pub up_kbit: u64,
    /// Price per step = the mint's `price_per_step` × this (an integer ≥ 2).
    pub price_factor: u64,
}

/// A tier as the merchant and the chandler use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tier {
    pub name: String,
    pub rates: Rates,
    pub factor: u64,
}

impl Tier {
    pub fn is_default(&self) -> bool {
        self.name == DEFAULT_TIER
    }
}

/// The default tier and the configured ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tiers {
    default: Tier,
    extra: Vec<Tier>,
}

impl Default for Tiers {
    fn default() -> Self {
        Tiers::new(Rates::UNLIMITED, &[])
    }
}

impl Tiers {
    /// `settings` must have passed [`validate`].
    pub fn new(default_rates: Rates, settings: &[TierSettings]) -> Tiers {
        Tiers {
            default: Tier {
                name: DEFAULT_TIER.into(),
                rates: default_rates,
                factor: 1,
            },
            extra: settings
                .iter()
                .map(|s| Tier {
                    name: s.name.clone(),
                    rates: Rates {
                        down_kbit: s.down_kbit,
                        up_kbit: s.up_kbit,
                    },
                    factor: s.price_factor,
                })
                .collect(),
        }
    }

    pub fn default_tier(&self) -> &Tier {
        &self.default
    }

    /// The configured tiers (without the default), in config order.
    pub fn extra(&self) -> &[Tier] {
        &self.extra
    }

    /// The tier named `name` (`None` or "default" = the default tier).
    pub fn get(&self, name: Option<&str>) -> Option<&Tier> {
        match name {
            None | Some(DEFAULT_TIER) => Some(&self.default),
            Some(n) => self.extra.iter().find(|t| t.name == n),
        }
    }

    /// Any tier (the default included) limits a rate: the LAN needs its qdisc.
    pub fn any_rates(&self) -> bool {
        std::iter::once(&self.default)
            .chain(&self.extra)
            .any(|t| !t.rates.is_unlimited())
    }
}

/// Why a customer's tier choice was refused (the message is shown to the customer).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TierError {
    #[error("tier name is {len} bytes long; tier names are at most {MAX_NAME_LEN}")]
    TooLong { len: usize },
    #[error("tier name is empty")]
    Empty,
    #[error("tier name is not valid utf-8")]
    NotUtf8,
    #[error("tier name {shown:?} has characters outside a-z, 0-9, '-' and '_'")]
    BadChars { shown: String },
    #[error("unknown tier {name:?}: this gateway sells {offered}")]
    Unknown { name: String, offered: String },
    #[error("the tier is named more than once")]
    Repeated,
}

fn valid_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
}

/// Checks a tier name from a customer (hostile input): length first, then the charset. The
/// name is echoed only when it is short and printable.
pub fn parse_choice(raw: &str) -> Result<String, TierError> {
    if raw.len() > MAX_NAME_LEN {
        return Err(TierError::TooLong { len: raw.len() });
    }
    if raw.is_empty() {
        return Err(TierError::Empty);
    }
    if !raw.chars().all(valid_char) {
        return Err(TierError::BadChars {
            shown: raw.chars().filter(|c| !c.is_control()).collect(),
        });
    }
    Ok(raw.to_string())
}

/// The tier a raw-token POST names in its query (`POST /?tier=fast`; `None` when absent).
/// Percent-decoded bytes that are not UTF-8, or `tier` given twice, are refused.
pub fn choice_from_query(query: Option<&str>) -> Result<Option<String>, TierError> {
    let mut found = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if k != "tier" {
            continue;
        }
        if found.is_some() {
            return Err(TierError::Repeated);
        }
        // The decoder replaces bytes that are not UTF-8 with U+FFFD (never in a tier name).
        if v.contains('\u{FFFD}') {
            return Err(TierError::NotUtf8);
        }
        found = Some(v.into_owned());
    }
    Ok(found)
}

impl Tiers {
    /// The tier a customer named (`None` = default), or why not.
    pub fn choose(&self, name: Option<&str>) -> Result<&Tier, TierError> {
        let name = name.map(parse_choice).transpose()?;
        self.get(name.as_deref()).ok_or_else(|| TierError::Unknown {
            name: name.unwrap_or_default(),
            offered: std::iter::once(DEFAULT_TIER)
                .chain(self.extra.iter().map(|t| t.name.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// Validates `tiers` of config.json (`path` for the message): at most [`MAX_TIERS`], unique
/// names of `[a-z0-9_-]{1,32}` other than "default", a price factor in 2..=[`MAX_FACTOR`]
/// (dearer than the default tier), rates the kernel can hold.
pub fn validate(settings: &[TierSettings], path: &Path) -> Result<(), ConfigError> {
    let err = |field: String, problem: String, fix: &str| ConfigError::Invalid {
        path: path.to_path_buf(),
        field,
        problem,
        fix: fix.into(),
    };
    if settings.len() > MAX_TIERS {
        return Err(err(
            "tiers".into(),
            format!("{} tiers; at most {MAX_TIERS}", settings.len()),
            "sell fewer tiers (each is advertised per mint)",
        ));
    }
    for (n, t) in settings.iter().enumerate() {
        let f = |name: &str| format!("tiers[{n}].{name}");
        if let Err(e) = parse_choice(&t.name) {
            return Err(err(f("name"), e.to_string(), "use e.g. \"fast\""));
        }
        if t.name == DEFAULT_TIER {
            return Err(err(
                f("name"),
                "\"default\" is the tier of accepted_mints and shaping".into(),
                "choose another name",
            ));
        }
        if settings[..n].iter().any(|o| o.name == t.name) {
            return Err(err(
                f("name"),
                format!("tier {:?} is defined twice", t.name),
                "give each tier a unique name",
            ));
        }
        if !(2..=MAX_FACTOR).contains(&t.price_factor) {
            return Err(err(
                f("price_factor"),
                format!(
                    "{} is not dearer than the default tier (factor 1) or above {MAX_FACTOR}",
                    t.price_factor
                ),
                "use an integer from 2 to 1000 (price per step = the mint's price × factor)",
            ));
        }
        for (field, v) in [("down_kbit", t.down_kbit), ("up_kbit", t.up_kbit)] {
            if v > Rates::MAX_KBIT {
                return Err(err(
                    f(field),
                    format!("{v} kbit/s is above the largest rate the data plane holds"),
                    "use at most 34359738 (or 0 for unlimited)",
                ));
            }
        }
    }
    Ok(())
}

/// The tier a payment is priced at: the requested one, or the session's active one when that
/// is dearer (a cheap top-up never turns fast steps into cheap ones, and never makes cheap
/// steps fast).
pub fn effective<'a>(requested: &'a Tier, active: Option<&'a Tier>) -> &'a Tier {
    match active {
        Some(a) if a.factor > requested.factor => a,
        _ => requested,
    }
}

/// What `remaining` (metric units bought at factor `from`) is worth at factor `to`: floor of
/// `remaining × from / to` (exact in u128; never more value than was paid).
pub fn convert(remaining: u64, from: u64, to: u64) -> u64 {
    if from == to || to == 0 {
        return remaining;
    }
    (u128::from(remaining) * u128::from(from) / u128::from(to)).min(u128::from(u64::MAX)) as u64
}

/// Steps `net` buys at `price_per_step` × `factor` (floor; a zero price counts as 1).
pub fn steps(net: u64, price_per_step: u64, factor: u64) -> u64 {
    net / price_per_step.max(1).saturating_mul(factor.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, factor: u64) -> TierSettings {
        TierSettings {
            name: name.into(),
            down_kbit: 20_000,
            up_kbit: 5_000,
            price_factor: factor,
        }
    }

    fn field(s: &[TierSettings]) -> String {
        validate(s, Path::new("/etc/tollgate/config.json"))
            .expect_err("refused")
            .field()
            .expect("field")
            .to_string()
    }

    #[test]
    fn config_validation_refuses_each_bad_tier_by_field() {
        validate(&[t("fast", 3), t("ultra_2", 10)], Path::new("c")).expect("valid");
        assert_eq!(field(&[t("fast", 3), t("fast", 4)]), "tiers[1].name");
        assert_eq!(field(&[t("default", 3)]), "tiers[0].name");
        assert_eq!(field(&[t("Fast", 3)]), "tiers[0].name");
        assert_eq!(field(&[t("fa st", 3)]), "tiers[0].name");
        assert_eq!(field(&[t("", 3)]), "tiers[0].name");
        assert_eq!(field(&[t(&"x".repeat(33), 3)]), "tiers[0].name");
        assert_eq!(field(&[t("fast", 1)]), "tiers[0].price_factor");
        assert_eq!(field(&[t("fast", 0)]), "tiers[0].price_factor");
        assert_eq!(field(&[t("fast", MAX_FACTOR + 1)]), "tiers[0].price_factor");
        let mut fast = t("fast", 2);
        fast.up_kbit = Rates::MAX_KBIT + 1;
        assert_eq!(field(&[fast]), "tiers[0].up_kbit");
        let many: Vec<_> = (0..=MAX_TIERS).map(|n| t(&format!("t{n}"), 2)).collect();
        assert_eq!(field(&many), "tiers");
        let e = validate(&[t("fast", 1)], Path::new("/c.json")).expect_err("refused");
        let msg = e.to_string();
        assert!(msg.contains("/c.json") && msg.contains("fix:"), "{msg}");
    }

    #[test]
    fn hostile_choices_get_clear_errors() {
        let tiers = Tiers::new(Rates::UNLIMITED, &[t("fast", 3)]);
        assert_eq!(tiers.choose(None).expect("default").name, "default");
        assert_eq!(tiers.choose(Some("default")).expect("default").factor, 1);
        assert_eq!(tiers.choose(Some("fast")).expect("fast").factor, 3);
        let huge = "f".repeat(10_000);
        assert_eq!(
            tiers.choose(Some(&huge)),
            Err(TierError::TooLong { len: 10_000 })
        );
        assert!(matches!(
            tiers.choose(Some("fast\u{0}\u{7}")),
            Err(TierError::BadChars { .. })
        ));
        let e = tiers.choose(Some("slow")).expect_err("unknown");
        assert_eq!(
            e.to_string(),
            "unknown tier \"slow\": this gateway sells default, fast"
        );
        assert_eq!(tiers.choose(Some("")), Err(TierError::Empty));
    }

    #[test]
    fn query_choices() {
        assert_eq!(choice_from_query(None), Ok(None));
        assert_eq!(choice_from_query(Some("mac=x")), Ok(None));
        assert_eq!(
            choice_from_query(Some("mac=x&tier=fast")),
            Ok(Some("fast".into()))
        );
        assert_eq!(
            choice_from_query(Some("tier=fast&tier=fast")),
            Err(TierError::Repeated)
        );
        assert_eq!(
            choice_from_query(Some("tier=%FF%FEfast")),
            Err(TierError::NotUtf8)
        );
    }

    #[test]
    fn pricing_and_conversion_conserve_value() {
        // 100 cheap steps then 1 fast step must not become 101 fast steps.
        let step = 1_000;
        let remaining = 100 * step;
        assert_eq!(convert(remaining, 1, 3), 33_333);
        assert_eq!(convert(remaining, 3, 3), remaining);
        assert_eq!(convert(u64::MAX, 1000, 1), u64::MAX, "saturates");
        assert_eq!(convert(7, 2, 3), 4);
        assert_eq!(steps(10, 1, 3), 3);
        assert_eq!(steps(10, 0, 3), 3, "a zero price counts as 1");
        assert_eq!(steps(10, u64::MAX, 3), 0, "no overflow");
        let def = Tier {
            name: DEFAULT_TIER.into(),
            rates: Rates::UNLIMITED,
            factor: 1,
        };
        let fast = Tier {
            name: "fast".into(),
            rates: Rates::UNLIMITED,
            factor: 3,
        };
        assert_eq!(effective(&def, Some(&fast)).name, "fast");
        assert_eq!(effective(&fast, Some(&def)).name, "fast");
        assert_eq!(effective(&def, None).name, "default");
    }
}
