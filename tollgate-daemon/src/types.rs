//! Values with one canonical form, shared by every component that compares them.
//!
//! A mint URL is compared only after [`canonical_mint_url`]: config validation, the wallet's
//! per-mint state, token redemption, Lightning checkout and the upstream buyer all key by it, so
//! `https://Mint.Example/` in config.json and `https://mint.example` in a token are one mint.

/// Canonical mint URL: scheme and host lower-case, no trailing slash, no query or fragment.
pub fn canonical_mint_url(raw: &str) -> Result<String, String> {
    let url = url::Url::parse(raw.trim()).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(format!("{raw:?}: scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{raw:?}: no host"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(format!(
            "{raw:?}: no query, fragment or credentials allowed"
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::canonical_mint_url;

    /// cdk's own `MintUrl` formatting leaves a canonical URL as it is, so the wallet's cdk
    /// state (keyed by `MintUrl`) and our maps (keyed by this form) name a mint alike.
    #[test]
    fn canonical_urls_are_fixed_points_of_cdks_mint_url() {
        use std::str::FromStr;
        for raw in [
            "HTTPS://Mint.Example/",
            "https://mint.example/Bitcoin/",
            "http://127.0.0.1:3338",
            "https://mint.example:443/",
        ] {
            let c = canonical_mint_url(raw).expect(raw);
            let cdk = cdk::mint_url::MintUrl::from_str(&c).expect("cdk parses it");
            assert_eq!(cdk.to_string(), c, "{raw}");
        }
    }
}
