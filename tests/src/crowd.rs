//! Many devices from one namespace: a crowd of macvlans on the client's `eth0`, each with its
//! own MAC and IPv4 address, posting to the gateway's API over real TCP (see adversary.md).
//!
//! ```text
//!  Crowd::new(lab, n)  ── n macvlans mv<i> on the client's eth0 (bridge mode), MAC
//!                          02:a2:<pid>:<i>, IPv4 10.77.<1 + i/200>.<10 + i%200>/16;
//!                          the gateway routes 10.77.0.0/16 to lan0
//!  crowd.post(bodies)  ── POST / from device i with body i (threads, SO_BINDTODEVICE so each
//!                          request leaves from its own MAC) ─> the HTTP statuses
//! ```
//! Neighbour entries are added as permanent on both sides: the kernel's garbage-collection
//! threshold (`gc_thresh3`, 1024 by default) is one for the whole machine, and a few thousand
//! dynamic entries would make other tests running at the same time fail to resolve addresses.
//! The daemon still finds each MAC where it always does, in the gateway's neighbour table.

use std::{io::Write, net::Ipv4Addr, process::Stdio};

use crate::netns::{Lab3, LAN_IFACE};

/// One device of the crowd.
#[derive(Clone, Debug)]
pub struct Device {
    pub dev: String,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
}

impl Device {
    pub fn mac_text(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

pub struct Crowd {
    pub devices: Vec<Device>,
    client: String,
}

/// Posts each `(dev, ip, body)` line's body to 10.77.0.1:2121 from that device; prints one
/// status per line (0 = no answer).
const POSTER: &str = r#"
import socket, sys, concurrent.futures
SO_BINDTODEVICE = 25
jobs = [l.rstrip("\n").split(" ", 2) for l in sys.stdin if l.strip()]
def post(job):
    dev, ip, body = job
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, dev.encode())
        s.settimeout(30)
        s.bind((ip, 0))
        s.connect(("10.77.0.1", 2121))
        b = body.encode()
        s.sendall(b"POST / HTTP/1.1\r\nHost: 10.77.0.1:2121\r\nConnection: close\r\n"
                  b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(b) + b)
        r = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            r += c
        s.close()
        return int(r.split(b" ", 2)[1])
    except Exception as e:
        sys.stderr.write("%s %s: %s\n" % (dev, ip, e))
        return 0
with concurrent.futures.ThreadPoolExecutor(max_workers=8) as ex:
    for st in ex.map(post, jobs):
        print(st)
"#;

impl Crowd {
    /// `n` devices (at most 50 000) on the client's `eth0`.
    pub fn new(lab: &Lab3, n: usize) -> Crowd {
        assert!(n <= 50_000, "a crowd of at most 50 000");
        let pid = std::process::id();
        let gw_mac = lab.gateway.mac(LAN_IFACE);
        let gw_mac = gw_mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        // Each device answers ARP only for its own address, from its own MAC.
        lab.client.sysctl("net.ipv4.conf.all.arp_ignore", "1");
        lab.client.sysctl("net.ipv4.conf.all.arp_announce", "2");
        lab.gateway
            .ip(&["route", "add", "10.77.0.0/16", "dev", LAN_IFACE]);
        let mut devices = Vec::with_capacity(n);
        let mut cli = String::new();
        let mut gw = String::new();
        for i in 0..n {
            let mac = [
                0x02,
                0xa2,
                (pid >> 8) as u8,
                pid as u8,
                (i >> 8) as u8,
                i as u8,
            ];
            let d = Device {
                dev: format!("mv{i}"),
                mac,
                ip: Ipv4Addr::new(10, 77, 1 + (i / 200) as u8, 10 + (i % 200) as u8),
            };
            let m = d.mac_text();
            cli.push_str(&format!(
                "link add {dev} link eth0 address {m} type macvlan mode bridge\n\
                 addr add {ip}/16 dev {dev}\n\
                 link set {dev} up\n\
                 neigh replace 10.77.0.1 lladdr {gw_mac} dev {dev} nud permanent\n",
                dev = d.dev,
                ip = d.ip
            ));
            gw.push_str(&format!(
                "neigh replace {} lladdr {m} dev {LAN_IFACE} nud permanent\n",
                d.ip
            ));
            devices.push(d);
        }
        ip_batch(&lab.client.name, &cli);
        ip_batch(&lab.gateway.name, &gw);
        Crowd {
            devices,
            client: lab.client.name.clone(),
        }
    }

    /// POSTs `bodies[i]` (one line) from device `first + i`; the HTTP statuses in order.
    pub fn post(&self, first: usize, bodies: &[String]) -> Vec<u16> {
        assert!(first + bodies.len() <= self.devices.len());
        let mut input = String::new();
        for (d, b) in self.devices[first..].iter().zip(bodies) {
            assert!(!b.contains('\n'), "one line per body");
            input.push_str(&format!("{} {} {b}\n", d.dev, d.ip));
        }
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.client, "python3", "-c", POSTER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 poster");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("jobs");
        let out = child.wait_with_output().expect("poster");
        assert!(out.status.success(), "poster failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().parse().expect("status"))
            .collect()
    }
}

fn ip_batch(ns: &str, script: &str) {
    let mut child = std::process::Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("ip -batch");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("ip batch script");
    assert!(child.wait().expect("ip").success(), "ip -batch in {ns}");
}
