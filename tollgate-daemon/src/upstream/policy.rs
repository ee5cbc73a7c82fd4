//! Which of an upstream's price options we buy, if any: trust list, price budget, then the
//! cheapest option at a mint where we hold enough unreserved funds. Plain functions.

use std::collections::BTreeMap;

use super::client::SignedAd;
use super::settings::UpstreamSettings;
use crate::protocol::Metric;
use crate::types::canonical_mint_url;

/// Why we do not pay an upstream (kept in the status and logged).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("untrusted upstream: {reason}")]
    Untrusted { reason: String },
    #[error("every option is over budget: cheapest {price_per_unit} sat per {metric} unit, budget {budget}")]
    OverBudget {
        metric: Metric,
        price_per_unit: f64,
        budget: f64,
    },
    #[error("no price option at a mint we hold funds in (upstream accepts: {mints})")]
    NoCommonMint { mints: String },
    #[error("funds too low: {needed} sat needed at {mint}, {available} available")]
    FundsLow {
        mint: String,
        needed: u64,
        available: u64,
    },
    #[error("purchase size overflows ({steps} steps × {price} sat)")]
    Overflow { steps: u64, price: u64 },
    /// The cheapest purchase an option allows (its `min_steps`, our increment) costs more
    /// than `max_sat_per_purchase`.
    #[error("every option costs more than the per-purchase limit: cheapest {amount} sat ({steps} steps at {mint}), limit {limit} sat (max_sat_per_purchase)")]
    OverPurchaseLimit {
        mint: String,
        steps: u64,
        amount: u64,
        limit: u64,
    },
    #[error("hourly spending limit reached: {spent} sat paid in the last hour, {amount} sat more would exceed {limit} sat (max_sat_per_hour)")]
    OverHourlyLimit { spent: u64, amount: u64, limit: u64 },
}

/// What to buy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// Canonical mint URL (ours); `ad_mint` is the upstream's spelling, kept for the log.
    pub mint: String,
    pub ad_mint: String,
    pub price_per_step: u64,
    pub steps: u64,
    /// `steps × price_per_step`: what the upstream must net.
    pub amount: u64,
    pub metric: Metric,
    pub step_size: u64,
}

impl Choice {
    /// Allotment this purchase adds, in metric units.
    pub fn units(&self) -> u64 {
        self.steps.saturating_mul(self.step_size)
    }
}

/// Steps to buy: the preferred increment rounded up, enough to lift the remaining allotment
/// above the renewal offset in one purchase (so we never buy twice in a row), at least the
/// option's minimum and at least one.
pub fn steps_for(
    s: &UpstreamSettings,
    metric: Metric,
    step_size: u64,
    remaining: u64,
    min_steps: u64,
) -> u64 {
    let (want, offset) = match metric {
        Metric::Bytes => (s.preferred_increment_bytes, s.bytes_renewal_offset),
        Metric::Milliseconds => (s.preferred_increment_ms, s.ms_renewal_offset),
    };
    let preferred = want.div_ceil(step_size);
    let lift = (offset.saturating_add(1))
        .saturating_sub(remaining)
        .div_ceil(step_size);
    preferred.max(lift).max(min_steps).max(1)
}

/// Decides. `funds` maps our accepted mints (canonical URL) to their available balance;
/// `remaining` is what is left of the current upstream allotment (0 without a session);
/// `spent_last_hour` is what we paid upstream (accepted, taken or unsettled) in the last hour.
/// Spending limits come before funds: an option over `purchase_limit` is never bought, however
/// rich we are.
pub fn choose(
    signed: &SignedAd,
    s: &UpstreamSettings,
    funds: &BTreeMap<String, u64>,
    remaining: u64,
    spent_last_hour: u64,
) -> Result<Choice, Refusal> {
    s.trusts(&signed.pubkey)
        .map_err(|reason| Refusal::Untrusted { reason })?;
    let ad = &signed.ad;
    let budget = match ad.metric {
        Metric::Bytes => s.max_price_per_byte,
        Metric::Milliseconds => s.max_price_per_millisecond,
    };
    let mut candidates = Vec::new();
    let mut cheapest_over: Option<f64> = None;
    let mut foreign = Vec::new();
    for o in &ad.prices {
        let Ok(mint) = canonical_mint_url(&o.mint_url) else {
            foreign.push(o.mint_url.clone());
            continue;
        };
        if o.unit != "sat" || !funds.contains_key(&mint) {
            foreign.push(format!("{mint} ({})", o.unit));
            continue;
        }
        let per_unit = o.price_per_step as f64 / ad.step_size as f64;
        if per_unit > budget {
            cheapest_over = Some(cheapest_over.map_or(per_unit, |c| c.min(per_unit)));
            continue;
        }
        candidates.push((o, mint));
    }
    if candidates.is_empty() {
        return Err(match cheapest_over {
            Some(p) => Refusal::OverBudget {
                metric: ad.metric,
                price_per_unit: p,
                budget,
            },
            None => Refusal::NoCommonMint {
                mints: foreign.join(", "),
            },
        });
    }
    // Cheapest first; among equal prices the smaller purchase, then the mint URL for a stable
    // choice.
    let mut priced = Vec::new();
    for (o, mint) in candidates {
        let steps = steps_for(s, ad.metric, ad.step_size, remaining, o.min_steps);
        let amount = steps
            .checked_mul(o.price_per_step)
            .ok_or(Refusal::Overflow {
                steps,
                price: o.price_per_step,
            })?;
        priced.push((o, mint, steps, amount));
    }
    priced.sort_by(|a, b| (a.0.price_per_step, a.3, &a.1).cmp(&(b.0.price_per_step, b.3, &b.1)));
    let limit = s.purchase_limit(ad.metric);
    let over = priced
        .iter()
        .filter(|p| p.3 > limit)
        .min_by_key(|p| p.3)
        .map(|(_, mint, steps, amount)| Refusal::OverPurchaseLimit {
            mint: mint.clone(),
            steps: *steps,
            amount: *amount,
            limit,
        });
    priced.retain(|p| p.3 <= limit);
    if priced.is_empty() {
        return Err(over.expect("every candidate was over the limit"));
    }
    let hourly = s.hourly_limit(ad.metric);
    let smallest = priced.iter().map(|p| p.3).min().unwrap_or(0);
    if spent_last_hour.saturating_add(smallest) > hourly {
        return Err(Refusal::OverHourlyLimit {
            spent: spent_last_hour,
            amount: smallest,
            limit: hourly,
        });
    }
    priced.retain(|p| spent_last_hour.saturating_add(p.3) <= hourly);
    let mut short = None;
    for (o, mint, steps, amount) in priced {
        let available = funds.get(&mint).copied().unwrap_or(0);
        if available >= amount {
            return Ok(Choice {
                mint,
                ad_mint: o.mint_url.clone(),
                price_per_step: o.price_per_step,
                steps,
                amount,
                metric: ad.metric,
                step_size: ad.step_size,
            });
        }
        short.get_or_insert(Refusal::FundsLow {
            mint,
            needed: amount,
            available,
        });
    }
    Err(short.expect("at least one candidate"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Advertisement, PriceOption};

    const PK: &str = "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798";

    fn opt(price: u64, mint: &str, min: u64) -> PriceOption {
        PriceOption {
            price_per_step: price,
            unit: "sat".into(),
            mint_url: mint.into(),
            min_steps: min,
        }
    }

    fn signed(prices: Vec<PriceOption>) -> SignedAd {
        SignedAd {
            pubkey: PK.into(),
            ad: Advertisement {
                metric: Metric::Bytes,
                step_size: 1000,
                tips: vec![],
                prices,
            },
        }
    }

    fn settings() -> UpstreamSettings {
        UpstreamSettings {
            max_price_per_byte: 0.01,
            preferred_increment_bytes: 10_000,
            bytes_renewal_offset: 2_000,
            ..Default::default()
        }
    }

    fn funds(v: &[(&str, u64)]) -> BTreeMap<String, u64> {
        v.iter().map(|(m, a)| (m.to_string(), *a)).collect()
    }

    #[test]
    fn picks_the_cheapest_affordable_not_the_first() {
        let ad = signed(vec![
            opt(5, "https://a.example", 0),
            opt(2, "https://B.example/", 0),
            opt(3, "https://c.example", 0),
        ]);
        let c = choose(
            &ad,
            &settings(),
            &funds(&[
                ("https://a.example", 1000),
                ("https://b.example", 1000),
                ("https://c.example", 1000),
            ]),
            0,
            0,
        )
        .unwrap();
        assert_eq!(
            (c.mint.as_str(), c.price_per_step, c.steps, c.amount),
            ("https://b.example", 2, 10, 20)
        );
        // The cheapest mint lacks funds: the next cheapest that is affordable.
        let c = choose(
            &ad,
            &settings(),
            &funds(&[
                ("https://a.example", 1000),
                ("https://b.example", 5),
                ("https://c.example", 1000),
            ]),
            0,
            0,
        )
        .unwrap();
        assert_eq!(c.mint, "https://c.example");
    }

    #[test]
    fn budget_trust_mints_and_funds_refuse() {
        let s = settings();
        let f = funds(&[("https://a.example", 1000)]);
        let over = signed(vec![opt(11, "https://a.example", 0)]); // 0.011 sat/byte
        assert!(matches!(
            choose(&over, &s, &f, 0, 0),
            Err(Refusal::OverBudget { .. })
        ));
        let foreign = signed(vec![opt(1, "https://z.example", 0)]);
        assert!(matches!(
            choose(&foreign, &s, &f, 0, 0),
            Err(Refusal::NoCommonMint { .. })
        ));
        let msat = signed(vec![PriceOption {
            unit: "msat".into(),
            ..opt(1, "https://a.example", 0)
        }]);
        assert!(matches!(
            choose(&msat, &s, &f, 0, 0),
            Err(Refusal::NoCommonMint { .. })
        ));
        let min = signed(vec![opt(1, "https://a.example", 5000)]);
        let mut generous = s.clone();
        generous.max_sat_per_purchase = Some(10_000);
        assert!(matches!(
            choose(&min, &generous, &f, 0, 0),
            Err(Refusal::FundsLow {
                needed: 5000,
                available: 1000,
                ..
            })
        ));
        let mut blocked = s.clone();
        blocked.blocklist.insert(PK.into());
        assert!(matches!(
            choose(
                &signed(vec![opt(1, "https://a.example", 0)]),
                &blocked,
                &f,
                0,
                0
            ),
            Err(Refusal::Untrusted { .. })
        ));
        let huge = signed(vec![opt(u64::MAX / 2, "https://a.example", 3)]);
        let mut rich = s.clone();
        rich.max_price_per_byte = f64::MAX;
        assert!(matches!(
            choose(&huge, &rich, &f, 0, 0),
            Err(Refusal::Overflow { .. })
        ));
    }

    #[test]
    fn hostile_min_steps_is_refused_by_the_purchase_limit() {
        // A tiny price (well within budget) with min_steps equal to our whole balance: the
        // old buyer paid all of it in one purchase.
        let s = settings(); // limit: 2 × 10 000 bytes × 0.01 = 200 sat
        assert_eq!(s.purchase_limit(Metric::Bytes), 200);
        let f = funds(&[("https://a.example", 1_000_000)]);
        let greedy = signed(vec![opt(1, "https://a.example", 1_000_000)]);
        let r = choose(&greedy, &s, &f, 0, 0).expect_err("over the limit");
        assert!(
            matches!(
                r,
                Refusal::OverPurchaseLimit {
                    amount: 1_000_000,
                    limit: 200,
                    ..
                }
            ),
            "{r:?}"
        );
        assert!(r.to_string().contains("max_sat_per_purchase"), "{r}");
        // A greedy option next to a fair one: the fair one is bought even if the greedy one
        // is cheaper per step.
        let mixed = signed(vec![
            opt(1, "https://a.example", 1_000_000),
            opt(2, "https://b.example", 0),
        ]);
        let f2 = funds(&[("https://a.example", 1_000_000), ("https://b.example", 500)]);
        let c = choose(&mixed, &s, &f2, 0, 0).expect("fair option");
        assert_eq!((c.mint.as_str(), c.amount), ("https://b.example", 20));
    }

    #[test]
    fn hourly_limit_counts_what_was_spent() {
        let mut s = settings();
        s.max_sat_per_hour = Some(50);
        let f = funds(&[("https://a.example", 1000)]);
        let ad = signed(vec![opt(2, "https://a.example", 0)]); // 20 sat a purchase
        assert_eq!(
            choose(&ad, &s, &f, 0, 30).expect("30 + 20 <= 50").amount,
            20
        );
        assert!(matches!(
            choose(&ad, &s, &f, 0, 31),
            Err(Refusal::OverHourlyLimit {
                spent: 31,
                amount: 20,
                limit: 50
            })
        ));
    }

    #[test]
    fn steps_cover_increment_offset_and_minimum() {
        let s = settings();
        assert_eq!(steps_for(&s, Metric::Bytes, 1000, 0, 0), 10);
        assert_eq!(steps_for(&s, Metric::Bytes, 3000, 0, 0), 4); // rounded up
        assert_eq!(steps_for(&s, Metric::Bytes, 1000, 0, 25), 25);
        // Offset larger than the increment: one purchase lifts remaining above it.
        let mut big = s.clone();
        big.bytes_renewal_offset = 50_000;
        assert_eq!(steps_for(&big, Metric::Bytes, 1000, 1_000, 0), 50);
        assert_eq!(steps_for(&s, Metric::Bytes, u64::MAX, 0, 0), 1);
    }
}
