//! A chained lab for reseller tests: a gateway whose own uplink is another paid TollGate.
//!
//! ```text
//!  client ─eth0 10.77.0.2── lan0 10.77.0.1 [A, reseller] wan0 10.78.0.2 ─┐
//!                                                                        │
//!           internet 10.79.0.2 ── wan0 10.79.0.1 [B, seller] lan0 10.78.0.1
//! ```
//! A's default route points at B (10.78.0.1), B routes the client subnet back via A, and the
//! "internet" namespace holds the servers and the mint (10.79.0.2), which B walls-gardens so A
//! can reach it before paying. No NAT: B meters A's WAN MAC, A meters the client's MAC.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use crate::netns::Netns;

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub const A_LAN_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const A_WAN_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
pub const B_LAN_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
pub const B_WAN_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);
pub const INTERNET_IP: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 2);

/// client → A → B → internet, each in its own namespace (deleted on drop).
pub struct Chain {
    pub client: Netns,
    pub a: Netns,
    pub b: Netns,
    pub internet: Netns,
}

fn veth(left: &Netns, lname: &str, right: &Netns, rname: &str) {
    left.ip(&[
        "link",
        "add",
        lname,
        "type",
        "veth",
        "peer",
        "name",
        rname,
        "netns",
        &right.name,
    ]);
}

impl Chain {
    pub fn new(tag: &str) -> Chain {
        let client = Netns::new(&format!("{tag}c"));
        let a = Netns::new(&format!("{tag}a"));
        let b = Netns::new(&format!("{tag}b"));
        let internet = Netns::new(&format!("{tag}i"));
        veth(&client, "eth0", &a, "lan0");
        veth(&a, "wan0", &b, "lan0");
        veth(&b, "wan0", &internet, "eth0");
        client.ip(&["addr", "add", "10.77.0.2/24", "dev", "eth0"]);
        client.ip(&["link", "set", "eth0", "up"]);
        client.ip(&["route", "add", "default", "via", "10.77.0.1"]);
        a.ip(&["addr", "add", "10.77.0.1/24", "dev", "lan0"]);
        a.ip(&["addr", "add", "10.78.0.2/24", "dev", "wan0"]);
        a.ip(&["link", "set", "lan0", "up"]);
        a.ip(&["link", "set", "wan0", "up"]);
        a.ip(&["route", "add", "default", "via", "10.78.0.1", "dev", "wan0"]);
        a.sysctl("net.ipv4.ip_forward", "1");
        b.ip(&["addr", "add", "10.78.0.1/24", "dev", "lan0"]);
        b.ip(&["addr", "add", "10.79.0.1/24", "dev", "wan0"]);
        b.ip(&["link", "set", "lan0", "up"]);
        b.ip(&["link", "set", "wan0", "up"]);
        b.ip(&["route", "add", "10.77.0.0/24", "via", "10.78.0.2"]);
        b.sysctl("net.ipv4.ip_forward", "1");
        internet.ip(&["addr", "add", "10.79.0.2/24", "dev", "eth0"]);
        internet.ip(&["link", "set", "eth0", "up"]);
        internet.ip(&["route", "add", "10.77.0.0/16", "via", "10.79.0.1"]);
        internet.ip(&["route", "add", "10.78.0.0/24", "via", "10.79.0.1"]);
        Chain {
            client,
            a,
            b,
            internet,
        }
    }
}

/// Downloads `limit` bytes from the bulk server at `server` (see [`crate::netns::serve_bulk_at`])
/// reading at most `rate` bytes per second with a small receive buffer, so little is in
/// flight beyond what was read. Returns the bytes received before `idle` without data.
pub fn download_paced(
    ns: &Netns,
    server: SocketAddr,
    limit: u64,
    rate: u64,
    idle: Duration,
) -> u64 {
    ns.run(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&server, Duration::from_millis(1500)) else {
            return 0;
        };
        // A small receive buffer keeps the in-flight window (bytes metered but unread) small.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
        let size: libc::c_int = 32 * 1024;
        // SAFETY: setting an int socket option on a socket we own.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        s.set_read_timeout(Some(idle)).unwrap();
        if s.write_all(&limit.to_be_bytes()).is_err() {
            return 0;
        }
        let start = Instant::now();
        let mut got = 0u64;
        let mut b = vec![0u8; 8192];
        while got < limit {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
            let due = Duration::from_secs_f64(got as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        got
    })
}
