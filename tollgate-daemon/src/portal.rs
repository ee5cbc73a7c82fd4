//! The captive portal: the kernel redirect of unpaid plain HTTP, what the portal listener
//! answers on a redirected connection, and the embedded portal page.
//!
//! ```text
//!  unpaid client ── TCP/80 SYN ──> tc ingress (eBPF): skb mark = portal_mark
//!      ──> nft `inet tollgate_<lan>` prerouting: iif lan, mark, dport 80 ─> redirect :portal_port
//!          forward: iif lan, mark ─> drop (NAT only rewrites a connection's first packet, so a
//!          connection opened while paid would otherwise still be forwarded after the gate shut)
//!      ──> accept(): tcp_fwmark_accept=1 ─> the socket inherits the mark
//!            http: SO_MARK == portal_mark ─> [`answer`] (302 to /portal, probes included)
//!            replies carry the mark ─> tc egress lets source-port-80 answers through
//!  paid client: no mark ─> no redirect ─> the real server (its probes succeed)
//! ```
//! [`Redirect::install`] sets the sysctl and (re)places the nft table at start;
//! [`Redirect::remove`] deletes the table at shutdown. The sysctl stays set: it only makes
//! accepted sockets inherit the mark of their SYN, which is 0 for everything but the portal.

use std::{
    io::Write,
    process::{Command, Stdio},
};

/// Errors of the redirect plumbing.
#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    #[error(
        "`nft` (nftables) not found in PATH: install nftables or set dataplane.portal_redirect \
         to false"
    )]
    NftMissing,
    #[error("running nft: {0}")]
    NftSpawn(#[source] std::io::Error),
    #[error("nft refused the portal ruleset ({status}): {stderr}")]
    Nft { status: String, stderr: String },
    #[error(
        "setting {path}: {source} (the portal redirect needs it; are we root in this namespace?)"
    )]
    Sysctl {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "interface name {0:?} cannot be used in an nftables rule (letters, digits, . _ - only)"
    )]
    BadInterface(String),
    #[error("portal mark must be non-zero")]
    ZeroMark,
}

const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

/// The nftables table of the redirect on `iface` (one per LAN interface, so two gateways on one
/// machine never share one). Interface names outside `[A-Za-z0-9._-]` are refused: the name is
/// also quoted into the rule.
pub fn table_name(iface: &str) -> Result<String, PortalError> {
    let ok = !iface.is_empty()
        && iface.len() <= 15
        && iface
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !ok {
        return Err(PortalError::BadInterface(iface.into()));
    }
    Ok(format!("tollgate_{}", iface.replace(['.', '-'], "_")))
}

/// The `nft -f` script that atomically replaces the table with the redirect rule. (Declaring
/// the table first makes the delete succeed when there is no stale one.)
pub fn ruleset(iface: &str, mark: u32, port: u16) -> Result<String, PortalError> {
    if mark == 0 {
        return Err(PortalError::ZeroMark);
    }
    let t = table_name(iface)?;
    Ok(format!(
        "table inet {t} {{\n}}\n\
         delete table inet {t}\n\
         table inet {t} {{\n\
         \tchain portal_redirect {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tiifname \"{iface}\" meta mark {mark:#010x} tcp dport 80 redirect to :{port}\n\
         \t}}\n\
         \tchain portal_forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{iface}\" meta mark {mark:#010x} drop\n\
         \t}}\n\
         }}\n"
    ))
}

/// The `nft -f` script that removes the table whether or not it exists.
pub fn removal(iface: &str) -> Result<String, PortalError> {
    let t = table_name(iface)?;
    Ok(format!("table inet {t} {{\n}}\ndelete table inet {t}\n"))
}

fn nft(script: &str) -> Result<(), PortalError> {
    run_nft("nft", script)
}

fn run_nft(program: &str, script: &str) -> Result<(), PortalError> {
    let mut child = Command::new(program)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                PortalError::NftMissing
            } else {
                PortalError::NftSpawn(e)
            }
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // An nft that exits early closes the pipe: its exit status says why.
        if let Err(e) = stdin.write_all(script.as_bytes()) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(PortalError::NftSpawn(e));
            }
        }
    }
    let out = child.wait_with_output().map_err(PortalError::NftSpawn)?;
    if !out.status.success() {
        return Err(PortalError::Nft {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Deletes a table left by an earlier run (when the redirect is now switched off).
pub fn remove_stale(iface: &str) -> Result<(), PortalError> {
    nft(&removal(iface)?)
}

/// The installed redirect; [`Redirect::remove`] (or drop) deletes the nft table.
#[derive(Debug)]
pub struct Redirect {
    iface: String,
    removed: bool,
}

impl Redirect {
    /// Sets `net.ipv4.tcp_fwmark_accept=1` in our network namespace and (re)installs the
    /// table redirecting `iface`'s marked TCP/80 to `port`. Blocking (spawns `nft`).
    pub fn install(iface: &str, mark: u32, port: u16) -> Result<Redirect, PortalError> {
        let script = ruleset(iface, mark, port)?;
        std::fs::write(FWMARK_ACCEPT, "1").map_err(|source| PortalError::Sysctl {
            path: FWMARK_ACCEPT,
            source,
        })?;
        nft(&script)?;
        tracing::info!(iface, mark = format_args!("{mark:#x}"), port, table = %table_name(iface)?,
            "captive-portal redirect installed");
        Ok(Redirect {
            iface: iface.into(),
            removed: false,
        })
    }

    /// Deletes the table (unpaid TCP/80 is then no longer answered by the portal).
    pub fn remove(mut self) -> Result<(), PortalError> {
        self.removed = true;
        nft(&removal(&self.iface)?)
    }
}

impl Drop for Redirect {
    fn drop(&mut self) {
        // Error paths of the daemon: best effort, the next start replaces a stale table anyway.
        if !self.removed {
            if let Err(e) = removal(&self.iface).and_then(|s| nft(&s)) {
                tracing::warn!(error = %e, "removing the portal redirect");
            }
        }
    }
}

// ------------------------------------------------------------------ redirected requests

/// A well-known connectivity check, by the path its OS fetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Android / ChromeOS / Chrome: `/generate_204`, `/gen_204` expect an empty 204.
    Google204,
    /// Apple: `/hotspot-detect.html`, `/library/test/success.html` expect a "Success" page.
    AppleSuccess,
    /// Windows: `/connecttest.txt`.
    MsConnectTest,
    /// Windows (older): `/ncsi.txt`.
    MsNcsi,
    /// Firefox: `/success.txt`.
    FirefoxSuccess,
    /// Firefox (newer): `/canonical.html`.
    FirefoxCanonical,
    /// Windows' "open the portal" URL (`/redirect`): always the portal.
    MsRedirect,
}

/// The probe a path belongs to (query ignored, case-insensitive as the probes' servers are).
pub fn probe(path: &str) -> Option<Probe> {
    let p = path
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    Some(match p.as_str() {
        "/generate_204" | "/gen_204" => Probe::Google204,
        "/hotspot-detect.html" | "/library/test/success.html" => Probe::AppleSuccess,
        "/connecttest.txt" => Probe::MsConnectTest,
        "/ncsi.txt" => Probe::MsNcsi,
        "/success.txt" => Probe::FirefoxSuccess,
        "/canonical.html" => Probe::FirefoxCanonical,
        "/redirect" => Probe::MsRedirect,
        _ => return None,
    })
}

impl Probe {
    /// What the real probe server answers when the network is open: (status, content type, body).
    pub fn success(self) -> Option<(u16, &'static str, &'static str)> {
        Some(match self {
            Probe::Google204 => (204, "text/plain", ""),
            Probe::AppleSuccess => (
                200,
                "text/html",
                "<HTML><HEAD><TITLE>Success</TITLE></HEAD><BODY>Success</BODY></HTML>",
            ),
            Probe::MsConnectTest => (200, "text/plain", "Microsoft Connect Test"),
            Probe::MsNcsi => (200, "text/plain", "Microsoft NCSI"),
            Probe::FirefoxSuccess => (200, "text/plain", "success\n"),
            Probe::FirefoxCanonical => (
                200,
                "text/html",
                "<meta http-equiv=\"refresh\" content=\"0;url=https://support.mozilla.org/kb/captive-portal\"/>",
            ),
            Probe::MsRedirect => return None,
        })
    }
}

/// The answer to a request that arrived through the redirect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Go to the portal page: 302 for GET/HEAD (what every captive-portal detector follows),
    /// 303 for anything else (so the browser fetches the portal with GET).
    Portal { status: u16 },
    /// A paid client's probe on a connection redirected before it paid (keep-alive): the open
    /// network's answer, so the OS stops showing the portal.
    ProbeSuccess(Probe),
    /// A paid client's other request on such a stale connection: 307 to the same URL with
    /// `Connection: close`; the browser reconnects, unmarked, to the real server.
    Retry { location: String },
}

/// Decides the answer on a redirected connection (`paid`: the client has an active session).
pub fn answer(method: &str, host: Option<&str>, path_and_query: &str, paid: bool) -> Answer {
    let portal = Answer::Portal {
        status: if method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD") {
            302
        } else {
            303
        },
    };
    if !paid {
        return portal;
    }
    match probe(path_and_query) {
        Some(p) => p.success().map_or(portal, |_| Answer::ProbeSuccess(p)),
        None => match host.filter(|h| sane_host(h)) {
            Some(h) if path_and_query.starts_with('/') => Answer::Retry {
                location: format!("http://{h}{path_and_query}"),
            },
            _ => portal,
        },
    }
}

/// A Host header we are willing to reflect into a URL (no userinfo, paths or spaces).
pub fn sane_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() < 256
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
}

/// The portal URL on the gateway address the redirected connection actually reached.
pub fn portal_url(local: std::net::SocketAddr) -> String {
    match local {
        std::net::SocketAddr::V4(a) => format!("http://{a}/portal"),
        // Without the zone (`%eth0`), which has no place in a URL.
        std::net::SocketAddr::V6(a) => format!("http://[{}]:{}/portal", a.ip(), a.port()),
    }
}

// ------------------------------------------------------------------ the page

/// `GET /portal`: no inline script or style, so the CSP can forbid both.
pub const PAGE_HTML: &str = include_str!("portal/page.html");
/// `GET /portal/app.js`
pub const PAGE_JS: &str = include_str!("portal/app.js");
/// `GET /portal/style.css`
pub const PAGE_CSS: &str = include_str!("portal/style.css");
/// Only our own scripts, styles and API; nothing framed, nothing external.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_text() {
        let r = ruleset("lan0", 0x7467, 2121).expect("ruleset");
        assert_eq!(
            r,
            "table inet tollgate_lan0 {\n}\ndelete table inet tollgate_lan0\n\
             table inet tollgate_lan0 {\n\tchain portal_redirect {\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tiifname \"lan0\" meta mark 0x00007467 tcp dport 80 redirect to :2121\n\t}\n\
             \tchain portal_forward {\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"lan0\" meta mark 0x00007467 drop\n\t}\n}\n"
        );
        assert_eq!(
            removal("br-lan.10").expect("removal"),
            "table inet tollgate_br_lan_10 {\n}\ndelete table inet tollgate_br_lan_10\n"
        );
    }

    #[test]
    fn hostile_interface_names_and_marks_are_refused() {
        for bad in [
            "",
            "lan0\" accept; #",
            "lan0\ndelete table inet filter",
            "a b",
            "x{y}",
            "sixteen_chars_xx",
            "lan0;",
            "ü",
        ] {
            assert!(
                matches!(ruleset(bad, 1, 80), Err(PortalError::BadInterface(_))),
                "{bad:?}"
            );
            assert!(removal(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(ruleset("lan0", 0, 80), Err(PortalError::ZeroMark)));
    }

    #[test]
    fn nft_missing_or_refusing_is_a_clear_error() {
        let e = run_nft("/nonexistent/nft", "").unwrap_err();
        assert!(matches!(e, PortalError::NftMissing), "{e}");
        assert!(e.to_string().contains("install nftables"), "{e}");
        // `false` stands in for an nft that rejects the script.
        let e = run_nft("false", "table inet x {}").unwrap_err();
        assert!(matches!(e, PortalError::Nft { .. }), "{e}");
    }

    #[test]
    fn probes_are_recognised() {
        for (p, want) in [
            ("/generate_204", Probe::Google204),
            ("/gen_204?x=1", Probe::Google204),
            ("/hotspot-detect.html", Probe::AppleSuccess),
            ("/library/test/success.html", Probe::AppleSuccess),
            ("/connecttest.txt", Probe::MsConnectTest),
            ("/ncsi.txt", Probe::MsNcsi),
            ("/success.txt", Probe::FirefoxSuccess),
            ("/canonical.html", Probe::FirefoxCanonical),
            ("/redirect", Probe::MsRedirect),
            ("/Generate_204", Probe::Google204),
        ] {
            assert_eq!(probe(p), Some(want), "{p}");
        }
        for p in ["/", "/generate_2044", "/x/generate_204", "", "/portal"] {
            assert_eq!(probe(p), None, "{p}");
        }
    }

    #[test]
    fn unpaid_clients_always_go_to_the_portal() {
        for path in [
            "/",
            "/generate_204",
            "/gen_204",
            "/hotspot-detect.html",
            "/library/test/success.html",
            "/connecttest.txt",
            "/ncsi.txt",
            "/success.txt",
            "/canonical.html",
            "/redirect",
            "/some/page?q=1",
            "*",
        ] {
            assert_eq!(
                answer("GET", Some("example.com"), path, false),
                Answer::Portal { status: 302 },
                "{path}"
            );
            assert_eq!(
                answer("HEAD", None, path, false),
                Answer::Portal { status: 302 }
            );
            assert_eq!(
                answer("POST", Some("example.com"), path, false),
                Answer::Portal { status: 303 }
            );
        }
    }

    #[test]
    fn paid_clients_on_a_stale_redirected_connection() {
        assert_eq!(
            answer(
                "GET",
                Some("connectivitycheck.gstatic.com"),
                "/generate_204",
                true
            ),
            Answer::ProbeSuccess(Probe::Google204)
        );
        assert_eq!(Probe::Google204.success().map(|s| s.0), Some(204));
        assert_eq!(
            answer(
                "GET",
                Some("captive.apple.com"),
                "/hotspot-detect.html",
                true
            ),
            Answer::ProbeSuccess(Probe::AppleSuccess)
        );
        assert_eq!(
            answer("GET", Some("www.msftconnecttest.com"), "/redirect", true),
            Answer::Portal { status: 302 }
        );
        assert_eq!(
            answer("GET", Some("example.com:8080"), "/a?b=c", true),
            Answer::Retry {
                location: "http://example.com:8080/a?b=c".into()
            }
        );
        // A Host we would not reflect, or an odd request target: the portal instead.
        for host in [
            None,
            Some(""),
            Some("evil.com/x"),
            Some("a@b"),
            Some("a b"),
            Some("x\r\nSet-Cookie: a=b"),
        ] {
            assert_eq!(
                answer("GET", host, "/a", true),
                Answer::Portal { status: 302 },
                "{host:?}"
            );
        }
        assert_eq!(
            answer("GET", Some("example.com"), "http://x/", true),
            Answer::Portal { status: 302 }
        );
    }

    #[test]
    fn portal_url_uses_the_reached_address() {
        assert_eq!(
            portal_url("10.77.0.1:2121".parse().expect("addr")),
            "http://10.77.0.1:2121/portal"
        );
        let mut v6: std::net::SocketAddrV6 = "[fe80::1]:2121".parse().expect("addr");
        v6.set_scope_id(3);
        assert_eq!(portal_url(v6.into()), "http://[fe80::1]:2121/portal");
    }
}
