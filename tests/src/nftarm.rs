//! The two nftables designs other captive portals gate with, as throughput-benchmark arms beside
//! tollgate's TC programs (`cargo xtask bench dataplane`, issue 13).
//!
//! ```text
//!  NftArm::load(ns, design, dev, macs, client, cap)
//!     writes `nft -f` input to a temp file ──> `nft -f` in the namespace, the table dormant
//!     (time cap and address-space cap: a load that does not fit is a result, not a hang)
//!  arm.enable() / arm.disable()   table flag `dormant` off / on: the hooks come and go in one
//!                                 transaction, the elements and rules stay loaded
//!  drop                           `nft delete table` (the namespace's end removes it too)
//! ```
//! Both designs hook where tollgate does: `netdev` ingress (upload, `ether saddr`) and egress
//! (download, `ether daddr`) of the LAN interface, ARP accepted, everything else dropped.
//! - [`Design::Set`] (uspot: its fw4 ipset `match src_mac`, elements with counters for
//!   accounting): one `ether_addr` set with a counter per element, looked up by hash.
//! - [`Design::Rules`] (openNDS: one rule per authenticated client): one
//!   `ether saddr X counter accept` rule per MAC, walked in order. The client's rule is last,
//!   as the newest client's rule is when rules are appended.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::netns::Netns;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Elements per `add element` statement: one transaction either way (one `nft -f`), but the
/// parser handles many short statements better than one 1 000 000-element list.
const ELEMENTS_PER_STATEMENT: usize = 10_000;
/// Address space `nft` may use while loading (it builds every rule in memory first).
const NFT_MAX_ADDRESS_SPACE: u64 = 12 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Design {
    /// uspot: a MAC set with a counter per element.
    Set,
    /// openNDS: one rule (with a counter) per MAC, in order.
    Rules,
}

impl Design {
    pub fn name(self) -> &'static str {
        match self {
            Design::Set => "nft set (uspot)",
            Design::Rules => "nft per-MAC rules (openNDS)",
        }
    }
}

/// Why a table did not load.
#[derive(Debug, thiserror::Error)]
pub enum NftArmError {
    #[error("writing the nft input: {0}")]
    Write(#[source] std::io::Error),
    #[error("running nft: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft -f did not finish within {0:?} (killed)")]
    TimedOut(Duration),
    #[error("nft -f failed after {secs:.1} s ({status}): {stderr}")]
    Failed {
        secs: f64,
        status: String,
        stderr: String,
    },
    #[error("nft {args}: {stderr}")]
    Toggle { args: String, stderr: String },
}

/// A loaded (dormant until [`NftArm::enable`]) table in a namespace.
pub struct NftArm {
    ns: String,
    table: String,
    pub design: Design,
    /// Wall time of the `nft -f` that loaded it, and nft's peak RSS (KiB) meanwhile.
    pub load: Duration,
    pub nft_peak_kib: u64,
    pub entries: usize,
}

fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The `nft -f` input for `design` over `macs` then `client` (last).
fn write_input(
    file: &mut impl std::io::Write,
    table: &str,
    design: Design,
    dev: &str,
    macs: &mut dyn Iterator<Item = [u8; 6]>,
    client: [u8; 6],
    entries: usize,
) -> std::io::Result<()> {
    let hook = |f: &mut dyn std::io::Write, chain: &str, hook: &str| {
        writeln!(f, " chain {chain} {{")?;
        writeln!(
            f,
            "  type filter hook {hook} device \"{dev}\" priority 0; policy drop;"
        )?;
        writeln!(f, "  ether type arp accept")
    };
    writeln!(file, "table netdev {table} {{")?;
    writeln!(file, " flags dormant")?;
    match design {
        Design::Set => {
            writeln!(
                file,
                " set paid {{\n  type ether_addr\n  counter\n  size {}\n }}",
                entries.max(1)
            )?;
            hook(file, "up", "ingress")?;
            writeln!(file, "  ether saddr @paid accept\n }}")?;
            hook(file, "down", "egress")?;
            writeln!(file, "  ether daddr @paid accept\n }}\n}}")?;
            let mut all = macs.chain(std::iter::once(client));
            let mut batch = Vec::with_capacity(ELEMENTS_PER_STATEMENT);
            loop {
                batch.clear();
                batch.extend(
                    all.by_ref()
                        .take(ELEMENTS_PER_STATEMENT)
                        .map(|m| mac_text(&m)),
                );
                if batch.is_empty() {
                    break;
                }
                writeln!(
                    file,
                    "add element netdev {table} paid {{ {} }}",
                    batch.join(", ")
                )?;
            }
        }
        Design::Rules => {
            // Both chains walk the same list: collect it once.
            let all: Vec<String> = macs
                .chain(std::iter::once(client))
                .map(|m| mac_text(&m))
                .collect();
            for (chain, h, field) in [("up", "ingress", "saddr"), ("down", "egress", "daddr")] {
                hook(file, chain, h)?;
                for m in &all {
                    writeln!(file, "  ether {field} {m} counter accept")?;
                }
                writeln!(file, " }}")?;
            }
            writeln!(file, "}}")?;
        }
    }
    Ok(())
}

impl NftArm {
    /// Loads `design` for `macs` and `client` (the one that sends traffic; last) in `ns` on
    /// `dev`, dormant. `cap` bounds the load's wall time.
    pub fn load(
        ns: &Netns,
        design: Design,
        dev: &str,
        macs: &mut dyn Iterator<Item = [u8; 6]>,
        client: [u8; 6],
        entries: usize,
        cap: Duration,
    ) -> Result<NftArm, NftArmError> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = match design {
            Design::Set => "set",
            Design::Rules => "rules",
        };
        let table = format!("tgb_{tag}_{}_{n}", std::process::id());
        let dir = tempfile::tempdir().map_err(NftArmError::Write)?;
        let path: PathBuf = dir.path().join(format!("{table}.nft"));
        {
            let f = std::fs::File::create(&path).map_err(NftArmError::Write)?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            write_input(&mut w, &table, design, dev, macs, client, entries)
                .and_then(|()| w.flush())
                .map_err(NftArmError::Write)?;
        }
        let mut cmd = ns.command("nft");
        cmd.arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: setrlimit is async-signal-safe; it only lowers the child's own limit.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                let r = libc::rlimit {
                    rlim_cur: NFT_MAX_ADDRESS_SPACE,
                    rlim_max: NFT_MAX_ADDRESS_SPACE,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(NftArmError::Spawn)?;
        let mut arm = NftArm {
            ns: ns.name.clone(),
            table,
            design,
            load: Duration::ZERO,
            nft_peak_kib: 0,
            entries,
        };
        // `ip netns exec` execs nft in place: the child's rusage is nft's.
        let pid = child.id() as libc::pid_t;
        loop {
            let mut status = 0;
            // SAFETY: an all-zero rusage is valid; wait4 on our own child.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
            if r == pid {
                let secs = start.elapsed();
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut stderr);
                }
                let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
                if !ok {
                    // The table may exist half-loaded? No: one transaction. Drop cleans up anyway.
                    drop(arm);
                    return Err(NftArmError::Failed {
                        secs: secs.as_secs_f64(),
                        status: if libc::WIFSIGNALED(status) {
                            format!("signal {}", libc::WTERMSIG(status))
                        } else {
                            format!("exit {}", libc::WEXITSTATUS(status))
                        },
                        stderr: stderr.lines().take(3).collect::<Vec<_>>().join(" / "),
                    });
                }
                arm.load = secs;
                arm.nft_peak_kib = ru.ru_maxrss as u64;
                return Ok(arm);
            }
            if r < 0 {
                return Err(NftArmError::Spawn(std::io::Error::last_os_error()));
            }
            if start.elapsed() > cap {
                let _ = child.kill();
                // SAFETY: reaping our own killed child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                drop(arm);
                return Err(NftArmError::TimedOut(cap));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn nft(&self, args: &str) -> Result<String, NftArmError> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", args])
            .output()
            .map_err(NftArmError::Spawn)?;
        if !out.status.success() {
            return Err(NftArmError::Toggle {
                args: args.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Hooks the chains in (the table wakes up).
    pub fn enable(&self) -> Result<(), NftArmError> {
        self.nft(&format!("add table netdev {}", self.table))
            .map(|_| ())
    }

    /// Unhooks the chains; elements, rules and counters stay.
    pub fn disable(&self) -> Result<(), NftArmError> {
        self.nft(&format!(
            "add table netdev {} {{ flags dormant; }}",
            self.table
        ))
        .map(|_| ())
    }

    /// Bytes counted for `mac` (the set's element counter; both directions), or None for the
    /// rules design (reading one rule's counter means listing the whole chain).
    pub fn counted_bytes(&self, mac: [u8; 6]) -> Option<u64> {
        if self.design != Design::Set {
            return None;
        }
        let out = self
            .nft(&format!(
                "get element netdev {} paid {{ {} }}",
                self.table,
                mac_text(&mac)
            ))
            .ok()?;
        let i = out.find("bytes ")?;
        out[i + 6..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    }
}

impl Drop for NftArm {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "nft",
                &format!("delete table netdev {}", self.table),
            ])
            .output();
    }
}
