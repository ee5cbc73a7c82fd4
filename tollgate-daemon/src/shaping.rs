//! Per-client rate limits: the `shaping` settings and the LAN interface's root qdisc.
//!
//! ```text
//!  config.json "shaping": {down_kbit, up_kbit, replace_qdisc}
//!    └─ ShapingSettings::validate ── rates() ──> ValveConfig::default_rates (every paid gate)
//!  start, when any rate is set:  Lan::prepare(iface, replace_qdisc)
//!    root qdisc = kernel default (handle 0:) or ours (fq 7467:) ─> `tc qdisc replace … fq`
//!    root qdisc = someone's fq ─────────────────────────────────> used as is, left at exit
//!    root qdisc = another (tbf, htb, cake …) ── replace_qdisc ──> replaced (warned)
//!                                            └─ otherwise ──────> error: refuse to shape
//!    kernel without sch_fq ─────────────────────────────────────> no qdisc; downloads policed
//!  the valve gets `edt_down` = fq is in place (EDT departure times) or not (token bucket)
//!  clean shutdown: Lan::remove() deletes the fq we installed (the default comes back)
//! ```
//! The qdisc is managed with `tc` (iproute2), like `neighbour` uses `ip`: the daemon runs in
//! the LAN's namespace, so the command does too.

use std::{path::Path, process::Command};

use serde::{Deserialize, Serialize};

use crate::{config::ConfigError, valve::Rates};

/// `shaping` in config.json: default rates for every paid client (0 or absent = unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapingSettings {
    /// Download (towards the client) in kbit/s of L3 traffic.
    #[serde(default)]
    pub down_kbit: u64,
    /// Upload (from the client) in kbit/s of L3 traffic.
    #[serde(default)]
    pub up_kbit: u64,
    /// Replace another root qdisc on the LAN interface with `fq` (default: refuse to start).
    #[serde(default)]
    pub replace_qdisc: bool,
}

impl ShapingSettings {
    /// The default rates of a paid client.
    pub fn rates(&self) -> Rates {
        Rates {
            down_kbit: self.down_kbit,
            up_kbit: self.up_kbit,
        }
    }

    /// Any rate set: the LAN interface needs its qdisc.
    pub fn enabled(&self) -> bool {
        !self.rates().is_unlimited()
    }

    /// Refuses rates the kernel cannot hold (`path` is config.json, for the message).
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        for (field, v) in [("down_kbit", self.down_kbit), ("up_kbit", self.up_kbit)] {
            if v > Rates::MAX_KBIT {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    field: format!("shaping.{field}"),
                    problem: format!("{v} kbit/s is above the largest rate the data plane holds"),
                    fix: format!("use at most {} (or 0 for unlimited)", Rates::MAX_KBIT),
                });
            }
        }
        Ok(())
    }
}

/// Errors of the qdisc management.
#[derive(Debug, thiserror::Error)]
pub enum ShapingError {
    #[error("`tc` (iproute2) not found in PATH: install iproute2 to shape downloads")]
    TcMissing(#[source] std::io::Error),
    #[error(
        "{iface} has the root qdisc {kind} {handle}, not one tollgate installed: refusing to \
         replace it with fq for rate limits (set \"shaping\": {{\"replace_qdisc\": true}} to \
         allow it, or remove it)"
    )]
    ForeignQdisc {
        iface: String,
        kind: String,
        handle: String,
    },
    #[error("tc {args}: {stderr}")]
    Tc { args: String, stderr: String },
    #[error("reading the qdiscs of {iface}: {problem}")]
    Show { iface: String, problem: String },
}

/// The handle of the `fq` tollgate installs ("tg"), so a later start recognises its own.
pub const FQ_HANDLE: &str = "7467:";

/// How shaped downloads are held to their rate on this LAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownMode {
    /// EDT departure times honoured by `fq`.
    Edt,
    /// Token-bucket policing in the data plane (no `fq` in this kernel).
    Police,
}

/// The LAN interface's root qdisc as tollgate left it.
#[derive(Debug)]
pub struct Lan {
    iface: String,
    mode: DownMode,
    /// We installed (or found our own) fq: remove it at shutdown.
    owned: bool,
}

/// The root qdisc of an interface (kind and handle, as `tc -j` prints them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootQdisc {
    pub kind: String,
    pub handle: String,
}

impl RootQdisc {
    /// One the kernel attached by itself (noqueue, pfifo_fast, mq, fq_codel … with handle 0:).
    pub fn is_default(&self) -> bool {
        self.handle == "0:"
    }

    fn is_ours(&self) -> bool {
        self.kind == "fq" && self.handle == FQ_HANDLE
    }
}

fn tc(args: &[&str]) -> Result<String, ShapingError> {
    let out = Command::new("tc")
        .args(args)
        .output()
        .map_err(ShapingError::TcMissing)?;
    if !out.status.success() {
        return Err(ShapingError::Tc {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The root qdisc of `iface` (`None`: none, e.g. the interface is down).
pub fn root_qdisc(iface: &str) -> Result<Option<RootQdisc>, ShapingError> {
    let text = tc(&["-j", "qdisc", "show", "dev", iface, "root"])?;
    parse_root(&text).map_err(|problem| ShapingError::Show {
        iface: iface.to_string(),
        problem,
    })
}

fn parse_root(text: &str) -> Result<Option<RootQdisc>, String> {
    let v: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| e.to_string())?;
    let list = v.as_array().ok_or("not a JSON list")?;
    Ok(list
        .iter()
        .find(|q| q.get("root").and_then(|r| r.as_bool()) == Some(true))
        .map(|q| RootQdisc {
            kind: q["kind"].as_str().unwrap_or("").to_string(),
            handle: q["handle"].as_str().unwrap_or("").to_string(),
        }))
}

impl Lan {
    /// Makes `iface` ready for shaping (see the module doc).
    pub fn prepare(iface: &str, replace: bool) -> Result<Lan, ShapingError> {
        let root = root_qdisc(iface)?;
        let lan = |mode, owned| Lan {
            iface: iface.to_string(),
            mode,
            owned,
        };
        match &root {
            Some(r) if r.is_ours() => {
                tracing::info!(
                    iface,
                    "fq root qdisc (ours) in place: downloads shaped with EDT"
                );
                return Ok(lan(DownMode::Edt, true));
            }
            Some(r) if r.kind == "fq" => {
                tracing::info!(
                    iface,
                    handle = %r.handle,
                    "the operator's fq root qdisc honours EDT: using it, it stays at exit"
                );
                return Ok(lan(DownMode::Edt, false));
            }
            Some(r) if !r.is_default() && !replace => {
                return Err(ShapingError::ForeignQdisc {
                    iface: iface.to_string(),
                    kind: r.kind.clone(),
                    handle: r.handle.clone(),
                });
            }
            _ => {}
        }
        match tc(&[
            "qdisc", "replace", "dev", iface, "root", "handle", FQ_HANDLE, "fq",
        ]) {
            Ok(_) => {
                match root.filter(|r| !r.is_default()) {
                    Some(r) => tracing::warn!(
                        iface,
                        replaced = %format!("{} {}", r.kind, r.handle),
                        "replaced the root qdisc with fq for rate limits (shaping.replace_qdisc)"
                    ),
                    None => tracing::info!(
                        iface,
                        "installed fq as the root qdisc: downloads shaped with EDT"
                    ),
                }
                Ok(lan(DownMode::Edt, true))
            }
            Err(ShapingError::Tc { stderr, .. }) if stderr.contains("kind is unknown") => {
                tracing::warn!(
                    iface,
                    "this kernel has no fq qdisc (CONFIG_NET_SCH_FQ): shaped downloads are \
                     policed in the data plane instead (token bucket; TCP adapts)"
                );
                Ok(lan(DownMode::Police, false))
            }
            Err(e) => Err(e),
        }
    }

    pub fn mode(&self) -> DownMode {
        self.mode
    }

    /// Removes the fq tollgate installed, if it is still the root (the kernel's default
    /// comes back). Someone else's qdisc is never touched.
    pub fn remove(self) -> Result<(), ShapingError> {
        if !self.owned {
            return Ok(());
        }
        if root_qdisc(&self.iface)?.is_some_and(|r| r.is_ours()) {
            tc(&["qdisc", "del", "dev", &self.iface, "root"])?;
            tracing::info!(iface = %self.iface, "removed the fq root qdisc");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_qdisc_is_parsed_from_tc_json() {
        let r =
            parse_root(r#"[{"kind":"noqueue","handle":"0:","root":true,"refcnt":2,"options":{}}]"#)
                .unwrap()
                .unwrap();
        assert!(r.is_default() && !r.is_ours());
        let r = parse_root(
            r#"[{"kind":"tbf","handle":"8001:","root":true},{"kind":"pfifo","handle":"10:","parent":"8001:1"}]"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.kind.as_str(), r.handle.as_str()), ("tbf", "8001:"));
        assert!(!r.is_default());
        let r = parse_root(r#"[{"kind":"fq","handle":"7467:","root":true}]"#)
            .unwrap()
            .unwrap();
        assert!(r.is_ours());
        assert_eq!(parse_root("[]").unwrap(), None);
        assert!(parse_root("garbage").is_err());
    }

    #[test]
    fn settings_default_to_unlimited_and_refuse_too_fast() {
        let s: ShapingSettings = serde_json::from_str("{}").unwrap();
        assert!(!s.enabled());
        assert_eq!(s, ShapingSettings::default());
        let s: ShapingSettings = serde_json::from_str(r#"{"down_kbit":5000}"#).unwrap();
        assert!(s.enabled());
        assert_eq!(
            s.rates(),
            Rates {
                down_kbit: 5000,
                up_kbit: 0
            }
        );
        s.validate(Path::new("c.json")).unwrap();
        let s = ShapingSettings {
            up_kbit: Rates::MAX_KBIT + 1,
            ..Default::default()
        };
        let e = s.validate(Path::new("c.json")).unwrap_err();
        assert_eq!(e.field(), Some("shaping.up_kbit"));
        assert!(serde_json::from_str::<ShapingSettings>(r#"{"down":1}"#).is_err());
    }
}
