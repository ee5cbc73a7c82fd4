//! Who is asking: the MAC of a client from its source IP.
//!
//! ```text
//! peer addr ──(X-Forwarded-For only if the peer is loopback)──> client IP
//!   IPv4: /proc/net/arp (complete entries) ─┐
//!   IPv6: `ip -j -6 neigh show <ip>`       ─┼─> MacAddr, else DHCP leases file, else error
//! ```
//! The MAC is what the gate is keyed on, so it must come from the kernel (or the DHCP server),
//! never from anything the client writes. [`Neighbours`] is the seam HTTP tests replace.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use crate::valve::MacAddr;

#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    #[error("no neighbour entry for {ip}")]
    NotFound { ip: IpAddr },
    #[error("reading neighbour table: {message}")]
    Io { message: String },
}

/// Maps a client IP to its MAC, and a MAC to the addresses it uses.
pub trait Neighbours: Send + Sync + 'static {
    fn mac_of(&self, ip: IpAddr) -> Result<MacAddr, NeighbourError>;
    /// Every address the neighbour tables show for `mac` (IPv4 and IPv6, usable entries
    /// only); empty when the tables cannot be read.
    fn addresses_of(&self, _mac: MacAddr) -> Vec<IpAddr> {
        Vec::new()
    }
}

/// The real lookup: kernel neighbour table, then the optional DHCP leases file.
#[derive(Clone, Debug)]
pub struct KernelNeighbours {
    pub arp_path: PathBuf,
    pub leases_file: Option<PathBuf>,
}

impl KernelNeighbours {
    pub fn new(leases_file: Option<PathBuf>) -> Self {
        KernelNeighbours {
            arp_path: PathBuf::from("/proc/net/arp"),
            leases_file,
        }
    }
}

impl Neighbours for KernelNeighbours {
    fn mac_of(&self, ip: IpAddr) -> Result<MacAddr, NeighbourError> {
        let ip = unmap(ip);
        let found = match ip {
            IpAddr::V4(_) => std::fs::read_to_string(&self.arp_path)
                .ok()
                .and_then(|t| parse_proc_net_arp(&t, ip)),
            IpAddr::V6(_) => std::process::Command::new("ip")
                .args(["-j", "-6", "neigh", "show", &ip.to_string()])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| parse_ip_neigh_json(&String::from_utf8_lossy(&o.stdout), ip)),
        };
        if let Some(mac) = found {
            return Ok(mac);
        }
        if let Some(path) = &self.leases_file {
            if let Ok(text) = std::fs::read_to_string(path) {
                if let Some(mac) = parse_dnsmasq_leases(&text, ip) {
                    return Ok(mac);
                }
            }
        }
        Err(NeighbourError::NotFound { ip })
    }

    fn addresses_of(&self, mac: MacAddr) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = std::fs::read_to_string(&self.arp_path)
            .map(|t| {
                arp_entries(&t)
                    .filter(|(_, m)| *m == mac)
                    .map(|(ip, _)| ip)
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(o) = std::process::Command::new("ip")
            .args(["-j", "-6", "neigh", "show"])
            .output()
        {
            if o.status.success() {
                out.extend(
                    ip_neigh_entries(&String::from_utf8_lossy(&o.stdout))
                        .into_iter()
                        .filter(|(_, m)| *m == mac)
                        .map(|(ip, _)| ip),
                );
            }
        }
        out
    }
}

/// A fixed mapping (tests, and setups where the MAC is known out of band).
#[derive(Clone, Debug, Default)]
pub struct StaticNeighbours(pub HashMap<IpAddr, MacAddr>);

impl Neighbours for StaticNeighbours {
    fn mac_of(&self, ip: IpAddr) -> Result<MacAddr, NeighbourError> {
        self.0
            .get(&unmap(ip))
            .copied()
            .ok_or(NeighbourError::NotFound { ip })
    }

    fn addresses_of(&self, mac: MacAddr) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self
            .0
            .iter()
            .filter(|(_, m)| **m == mac)
            .map(|(ip, _)| *ip)
            .collect();
        out.sort();
        out
    }
}

/// `::ffff:a.b.c.d` (a dual-stack socket's view of IPv4) as plain IPv4.
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client's IP: the peer, or the first `X-Forwarded-For` hop when the peer is loopback
/// (a local reverse proxy); anyone else could claim any address with that header.
pub fn client_ip(peer: SocketAddr, forwarded_for: Option<&str>) -> IpAddr {
    let peer_ip = unmap(peer.ip());
    if peer_ip.is_loopback() {
        if let Some(ip) = forwarded_for
            .and_then(|h| h.split(',').next())
            .and_then(|s| s.trim().parse::<IpAddr>().ok())
        {
            return unmap(ip);
        }
    }
    peer_ip
}

fn usable(mac: MacAddr) -> bool {
    mac.0 != [0; 6] && mac.0 != [0xff; 6]
}

/// `/proc/net/arp`: `IP  HWtype  Flags  HWaddr  Mask  Device`; only complete (0x2) entries.
fn arp_entries(text: &str) -> impl Iterator<Item = (IpAddr, MacAddr)> + '_ {
    text.lines().skip(1).filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            return None;
        }
        let ip: IpAddr = f[0].parse().ok()?;
        let flags = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).ok()?;
        let mac: MacAddr = f[3].parse().ok()?;
        (flags & 0x2 != 0 && usable(mac)).then_some((ip, mac))
    })
}

/// The MAC of `ip` in `/proc/net/arp` (complete entries only).
pub fn parse_proc_net_arp(text: &str, ip: IpAddr) -> Option<MacAddr> {
    arp_entries(text)
        .find(|(i, _)| *i == ip)
        .map(|(_, mac)| mac)
}

/// Every complete entry of `/proc/net/arp`, MAC → IPv4 (the operator's client list).
pub fn arp_table(text: &str) -> HashMap<MacAddr, IpAddr> {
    arp_entries(text).map(|(ip, mac)| (mac, ip)).collect()
}

/// `ip -j neigh show` output: `[{"dst":…,"lladdr":…,"state":["REACHABLE"]},…]`.
pub fn parse_ip_neigh_json(text: &str, ip: IpAddr) -> Option<MacAddr> {
    ip_neigh_entries(text)
        .into_iter()
        .find(|(i, _)| *i == ip)
        .map(|(_, mac)| mac)
}

/// The usable entries of `ip -j neigh show` output (not FAILED/INCOMPLETE, a real MAC).
fn ip_neigh_entries(text: &str) -> Vec<(IpAddr, MacAddr)> {
    let Ok(serde_json::Value::Array(v)) = serde_json::from_str(text.trim()) else {
        return Vec::new();
    };
    v.iter()
        .filter_map(|e| {
            let ip: IpAddr = e.get("dst")?.as_str()?.parse().ok()?;
            let bad = e.get("state").and_then(|s| s.as_array()).is_some_and(|s| {
                s.iter()
                    .any(|x| matches!(x.as_str(), Some("FAILED" | "INCOMPLETE")))
            });
            let mac: MacAddr = e.get("lladdr")?.as_str()?.parse().ok()?;
            (!bad && usable(mac)).then_some((ip, mac))
        })
        .collect()
}

/// dnsmasq leases: `<expiry> <mac> <ip> <hostname> <client-id>` per line.
pub fn parse_dnsmasq_leases(text: &str, ip: IpAddr) -> Option<MacAddr> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[2].parse::<IpAddr>().ok()? != ip {
            return None;
        }
        let mac: MacAddr = f[1].parse().ok()?;
        usable(mac).then_some(mac)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARP: &str =
        "IP address       HW type     Flags       HW address            Mask     Device
192.0.2.1        0x1         0x2         02:fc:00:00:00:05     *        eth0
10.0.0.7         0x1         0x0         00:00:00:00:00:00     *        br-lan
10.0.0.8         0x1         0x2         AA:BB:CC:DD:EE:08     *        br-lan
garbage line
";

    /// A MAC's addresses: its complete ARP entries (none from incomplete ones), and from
    /// `ip neigh` JSON only usable entries of that MAC.
    #[test]
    fn addresses_of_a_mac() {
        let dir = tempfile::tempdir().expect("tmp");
        let arp = dir.path().join("arp");
        std::fs::write(&arp, ARP).expect("write");
        let n = KernelNeighbours {
            arp_path: arp,
            leases_file: None,
        };
        let mac: MacAddr = "aa:bb:cc:dd:ee:08".parse().expect("mac");
        // The host's own IPv6 table has no entry with this MAC.
        assert_eq!(
            n.addresses_of(mac),
            vec!["10.0.0.8".parse::<IpAddr>().expect("ip")]
        );
        assert!(n
            .addresses_of("00:00:00:00:00:00".parse().expect("mac"))
            .is_empty());
        let json = r#"[{"dst":"fd00::8","lladdr":"aa:bb:cc:dd:ee:08","state":["STALE"]},
            {"dst":"fd00::9","lladdr":"aa:bb:cc:dd:ee:08","state":["FAILED"]},
            {"dst":"fd00::a","lladdr":"aa:bb:cc:dd:ee:09","state":["REACHABLE"]},
            {"dst":"fd00::b","state":["INCOMPLETE"]}]"#;
        let mine: Vec<IpAddr> = ip_neigh_entries(json)
            .into_iter()
            .filter(|(_, m)| *m == mac)
            .map(|(ip, _)| ip)
            .collect();
        assert_eq!(mine, vec!["fd00::8".parse::<IpAddr>().expect("ip")]);
        assert!(ip_neigh_entries("not json").is_empty());
    }

    #[test]
    fn proc_net_arp() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            parse_proc_net_arp(ARP, ip("192.0.2.1")),
            Some("02:fc:00:00:00:05".parse().expect("mac"))
        );
        assert_eq!(
            parse_proc_net_arp(ARP, ip("10.0.0.8")),
            Some("aa:bb:cc:dd:ee:08".parse().expect("mac"))
        );
        assert_eq!(
            parse_proc_net_arp(ARP, ip("10.0.0.7")),
            None,
            "incomplete entry"
        );
        assert_eq!(parse_proc_net_arp(ARP, ip("10.0.0.9")), None);
        assert_eq!(parse_proc_net_arp("", ip("10.0.0.9")), None);
    }

    #[test]
    fn arp_table_maps_complete_entries_only() {
        let t = arp_table(ARP);
        let mac = |s: &str| s.parse::<MacAddr>().expect("mac");
        assert_eq!(
            t.get(&mac("aa:bb:cc:dd:ee:08")),
            Some(&"10.0.0.8".parse::<IpAddr>().expect("ip"))
        );
        assert!(t.values().all(|ip| ip.to_string() != "10.0.0.7"), "{t:?}");
        assert!(arp_table("").is_empty());
        assert!(arp_table("header\n\u{0}\u{1} 0x2 zz").is_empty());
    }

    #[test]
    fn ip_neigh_json() {
        let text = r#"[{"dst":"192.0.2.1","dev":"eth0","lladdr":"02:fc:00:00:00:05","state":["STALE"]},
            {"dst":"fd00::1","dev":"eth0","state":["FAILED"]},
            {"dst":"fd00::2","dev":"eth0","lladdr":"02:00:00:00:00:02","state":["INCOMPLETE"]},
            {"dst":"fd00::3","dev":"eth0","lladdr":"02:00:00:00:00:03","state":["REACHABLE"]}]"#;
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(parse_ip_neigh_json(text, ip("192.0.2.1")).is_some());
        assert_eq!(parse_ip_neigh_json(text, ip("fd00::1")), None);
        assert_eq!(parse_ip_neigh_json(text, ip("fd00::2")), None);
        assert_eq!(
            parse_ip_neigh_json(text, ip("fd00::3")),
            Some("02:00:00:00:00:03".parse().expect("mac"))
        );
        assert_eq!(parse_ip_neigh_json("not json", ip("fd00::3")), None);
        assert_eq!(parse_ip_neigh_json("{}", ip("fd00::3")), None);
    }

    #[test]
    fn leases() {
        let text = "1700000000 aa:bb:cc:00:00:01 10.0.0.50 phone 01:aa:bb:cc:00:00:01\nbroken\n";
        let ip: IpAddr = "10.0.0.50".parse().expect("ip");
        assert_eq!(
            parse_dnsmasq_leases(text, ip),
            Some("aa:bb:cc:00:00:01".parse().expect("mac"))
        );
        assert_eq!(
            parse_dnsmasq_leases(text, "10.0.0.51".parse().expect("ip")),
            None
        );
    }

    #[test]
    fn forwarded_for_only_from_loopback() {
        let lo: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let lan: SocketAddr = "10.0.0.5:5000".parse().expect("addr");
        let mapped: SocketAddr = "[::ffff:10.0.0.5]:5000".parse().expect("addr");
        assert_eq!(
            client_ip(lo, Some("10.0.0.9, 1.2.3.4")),
            "10.0.0.9".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            client_ip(lo, Some("nonsense")),
            "127.0.0.1".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            client_ip(lan, Some("10.0.0.9")),
            "10.0.0.5".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            client_ip(mapped, None),
            "10.0.0.5".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn kernel_lookup_reads_files() {
        let dir = std::env::temp_dir().join(format!("tollgate-neigh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("arp"), ARP).expect("arp");
        std::fs::write(dir.join("leases"), "0 aa:bb:cc:00:00:09 10.0.0.9 x *\n").expect("leases");
        let k = KernelNeighbours {
            arp_path: dir.join("arp"),
            leases_file: Some(dir.join("leases")),
        };
        assert!(k.mac_of("10.0.0.8".parse().expect("ip")).is_ok());
        assert!(
            k.mac_of("10.0.0.9".parse().expect("ip")).is_ok(),
            "from leases"
        );
        assert!(matches!(
            k.mac_of("10.0.0.10".parse().expect("ip")),
            Err(NeighbourError::NotFound { .. })
        ));
        std::fs::remove_dir_all(&dir).ok();
    }
}
