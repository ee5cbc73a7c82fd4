//! `SIGHUP`: re-read config.json and apply what can change while running.
//!
//! ```text
//!  SIGHUP | `tollgate reload` (control socket) ─> Config::load_with(dir, the run's overrides)
//!              ├─ error ─> logged, refused: the running config stays
//!              └─ ok ─> valve default rates = shaping        (gates opened from now on)
//!                       chandler.set_tiers(tiers)             (open sessions: default-tier ones
//!                                                              to the new default, tier ones
//!                                                              to their tier's new rates; the
//!                                                              operator's rates stay)
//!                       anything else changed in config.json / identities.json
//!                         ─> logged as "needs a restart" (not applied)
//! ```
//! Tier names and prices apply to payments from the reload on (the advertisement follows at
//! once). The LAN's qdisc is prepared at start only: rates turned on by a reload where none were
//! at start are enforced with policed downloads until a restart installs `fq`.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde_json::Value;

use crate::{
    chandler::{Chandler, ChandlerError},
    config::{Config, ConfigError, Overrides, CONFIG_FILE, IDENTITIES_FILE},
    tiers::Tiers,
    valve::{Valve, ValveConfig, ValveError},
};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{source}")]
    Config {
        #[from]
        source: ConfigError,
    },
    #[error("data plane: {source}")]
    Valve {
        #[from]
        source: ValveError,
    },
    #[error("sessions: {source}")]
    Chandler {
        #[from]
        source: ChandlerError,
    },
}

/// What a reload did (also the answer of `tollgate reload`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReloadReport {
    /// Open gates whose rate changed.
    pub gates: usize,
    /// Settings that changed but apply only after a restart (top-level keys of config.json,
    /// `shaping.replace_qdisc`, `identities.json`).
    pub needs_restart: Vec<String>,
}

/// The files as the running configuration was loaded from them.
struct Running {
    config: Value,
    identities: String,
}

pub struct Reloader {
    dir: PathBuf,
    overrides: Overrides,
    running: Mutex<Running>,
    vcfg: Mutex<ValveConfig>,
    valve: Arc<Valve>,
    chandler: Arc<Chandler>,
}

fn read_files(dir: &Path) -> Running {
    let text = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    Running {
        config: serde_json::from_str(&text(CONFIG_FILE)).unwrap_or(Value::Null),
        identities: text(IDENTITIES_FILE),
    }
}

/// Top-level keys of config.json that differ (the live ones — `tiers` and `shaping`'s rates —
/// left out).
fn restart_keys(old: &Running, new: &Running) -> Vec<String> {
    let empty = serde_json::Map::new();
    let (a, b) = (
        old.config.as_object().unwrap_or(&empty),
        new.config.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| *k != "tiers" && *k != "shaping" && a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    let replace = |c: &Value| c["shaping"]["replace_qdisc"].clone();
    if replace(&old.config) != replace(&new.config) {
        keys.push("shaping.replace_qdisc".into());
    }
    if old.identities != new.identities {
        keys.push(IDENTITIES_FILE.into());
    }
    keys
}

impl Reloader {
    /// `vcfg` is the valve's running configuration (a reload changes its default rates only).
    pub fn new(
        dir: &Path,
        overrides: Overrides,
        vcfg: ValveConfig,
        valve: Arc<Valve>,
        chandler: Arc<Chandler>,
    ) -> Reloader {
        Reloader {
            dir: dir.to_path_buf(),
            overrides,
            running: Mutex::new(read_files(dir)),
            vcfg: Mutex::new(vcfg),
            valve,
            chandler,
        }
    }

    /// Re-reads the files and applies the live settings (see the module doc). A config that
    /// does not load changes nothing.
    pub fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let cfg = Config::load_with(&self.dir, &self.overrides)?;
        let files = read_files(&self.dir);
        let mut vcfg = self.vcfg.lock().unwrap_or_else(|p| p.into_inner());
        if vcfg.default_rates != cfg.shaping.rates() {
            let mut next = vcfg.clone();
            next.default_rates = cfg.shaping.rates();
            self.valve.configure(&next)?;
            *vcfg = next;
        }
        let gates = self
            .chandler
            .set_tiers(Tiers::new(cfg.shaping.rates(), &cfg.tiers))?;
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let needs_restart = restart_keys(&running, &files);
        // What is live now is compared against next time; the rest still against the start.
        if let (Some(r), Some(n)) = (running.config.as_object_mut(), files.config.as_object()) {
            for k in ["tiers", "shaping"] {
                match n.get(k) {
                    Some(v) => r.insert(k.into(), v.clone()),
                    None => r.remove(k),
                };
            }
        }
        Ok(ReloadReport {
            gates,
            needs_restart,
        })
    }

    /// [`Reloader::reload`] with its outcome logged (`SIGHUP` and `tollgate reload` alike).
    pub fn reload_logged(&self) -> Result<ReloadReport, ReloadError> {
        let r = self.reload();
        match &r {
            Ok(r) => {
                tracing::info!(
                    gates = r.gates,
                    "config reloaded: shaping and tier rates applied"
                );
                if !r.needs_restart.is_empty() {
                    tracing::warn!(
                        settings = %r.needs_restart.join(", "),
                        "config reload: these changed settings need a restart to apply"
                    );
                }
            }
            Err(e) => tracing::error!(
                error = %e,
                "config reload refused: the running configuration is kept"
            ),
        }
        r
    }

    /// Reloads on every `SIGHUP` until `cancel`; each outcome is logged.
    pub async fn run(
        self: Arc<Self>,
        mut hup: tokio::signal::unix::Signal,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            let me = self.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || me.reload_logged()).await {
                tracing::error!(error = %e, "config reload task");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_settings_that_are_not_live_need_a_restart() {
        let r = |c: Value, i: &str| Running {
            config: c,
            identities: i.into(),
        };
        let old = r(
            serde_json::json!({"step_size": 1, "shaping": {"down_kbit": 1}, "tiers": []}),
            "a",
        );
        let live = r(
            serde_json::json!({"step_size": 1, "shaping": {"down_kbit": 9}, "tiers": [{}]}),
            "a",
        );
        assert!(restart_keys(&old, &live).is_empty());
        let other = r(
            serde_json::json!({"step_size": 2, "listen": "x",
                "shaping": {"down_kbit": 1, "replace_qdisc": true}}),
            "b",
        );
        assert_eq!(
            restart_keys(&old, &other),
            vec![
                "listen".to_string(),
                "step_size".into(),
                "shaping.replace_qdisc".into(),
                "identities.json".into()
            ]
        );
    }
}
