//! Units of the configuration files: durations. A leaf module (it imports nothing of ours), so
//! every component's settings can use it without an import cycle.
//!
//! | type        | JSON                                     | used for                          |
//! |-------------|------------------------------------------|-----------------------------------|
//! | [`Dur`]     | integer nanoseconds, or `"10s"`, `"500ms"` | our additions, the reference's ns |
//! | [`Seconds`] | integer seconds, or a duration string    | `payout_interval_seconds`         |
//!
//! [`parse_duration`] is the one parser of duration strings (also for the unit-named fields of
//! `upstream_session_manager`, whose integers are in their field's unit).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// A duration given as integer nanoseconds (the reference's files) or a string like "10s".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Nanos(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Nanos(n) => Ok(Dur(Duration::from_nanos(n))),
            Raw::Text(s) => parse_duration(&s)
                .map(Dur)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

/// Parses "500ms", "10s", "1m30s", "2h", "250us", "7ns" (a bare number is nanoseconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_nanos(n));
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration {s:?} (expected e.g. \"10s\", \"500ms\")"
            ));
        }
        let n: u128 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid number in duration {s:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let nanos_per: u128 = match &rest[..unit_len] {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            u => {
                return Err(format!(
                    "unknown unit {u:?} in duration {s:?} (use ns, us, ms, s, m, h, d)"
                ))
            }
        };
        total = total.saturating_add(n.saturating_mul(nanos_per));
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_nanos(
        u64::try_from(total).unwrap_or(u64::MAX),
    ))
}

pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}ns", d.as_nanos())
    }
}

/// Whole seconds as an integer (the reference's `…_seconds` fields), or a duration string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Whole(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected whole seconds (e.g. 60) or a duration like \"1m\"")
        })? {
            Raw::Whole(n) => Ok(Seconds(Duration::from_secs(n))),
            Raw::Text(s) => parse_duration(&s)
                .map(Seconds)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Seconds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit_and_reject_junk() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1500"), Ok(Duration::from_nanos(1500)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn seconds_take_integers_as_seconds_and_strings_as_durations() {
        let s: Seconds = serde_json::from_str("60").unwrap();
        assert_eq!(s.0, Duration::from_secs(60));
        let s: Seconds = serde_json::from_str("\"90s\"").unwrap();
        assert_eq!(s.0, Duration::from_secs(90));
        for bad in ["-1", "1.5", "true", "\"ten\"", "[]"] {
            assert!(serde_json::from_str::<Seconds>(bad).is_err(), "{bad}");
        }
        let d: Dur = serde_json::from_str("1500").unwrap();
        assert_eq!(d.0, Duration::from_nanos(1500));
        assert_eq!(
            serde_json::to_string(&Dur(Duration::from_millis(5))).unwrap(),
            "\"5ms\""
        );
    }
}
