//! Network-namespace labs: real veth pairs, real routing, real sockets.
//!
//! Every namespace gets a unique name (`tg<tag><pid>x<n>`) and is deleted on drop — with its
//! veth ends, so a failing test leaves nothing behind.

use std::{
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace created with `ip netns add`, deleted on drop.
pub struct Netns {
    pub name: String,
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// `ip <args>` that must succeed.
pub fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("tg{tag}{}x{n}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> <args>`
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs a shell snippet inside the namespace; must succeed.
    pub fn sh(&self, script: &str) -> String {
        let out = run(self.command("sh").args(["-c", script]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.sh(&format!("sysctl -qw {key}={value}"));
    }

    /// Runs `f` on a thread that has joined this namespace (sockets it opens live here).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = PathBuf::from(format!("/run/netns/{}", self.name));
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    }

    /// Like [`Netns::run`] but returns the join handle (for servers).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = PathBuf::from(format!("/run/netns/{}", self.name));
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// The MAC address of `dev` in this namespace.
    pub fn mac(&self, dev: &str) -> [u8; 6] {
        let s = self.sh(&format!("cat /sys/class/net/{dev}/address"));
        let mut out = [0u8; 6];
        for (i, p) in s.trim().split(':').enumerate() {
            out[i] = u8::from_str_radix(p, 16).expect("mac");
        }
        out
    }
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &std::path::Path) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// client ── lan ── gateway ── wan ── upstream, with the gateway routing between them.
///
/// Addresses: client 10.77.0.2, gateway LAN 10.77.0.1 (dev `lan0`), gateway WAN 10.78.0.1,
/// upstream 10.78.0.2. Each lab's namespaces are private, so the fixed addresses never
/// collide between tests.
pub struct Lab3 {
    pub client: Netns,
    pub gateway: Netns,
    pub upstream: Netns,
}

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub const GW_LAN_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const GW_WAN_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
pub const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
pub const LAN_IFACE: &str = "lan0";

impl Lab3 {
    pub fn new(tag: &str) -> Self {
        let client = Netns::new(&format!("{tag}c"));
        let gateway = Netns::new(&format!("{tag}g"));
        let upstream = Netns::new(&format!("{tag}u"));
        link_client(&client, &gateway, LAN_IFACE);
        client.ip(&["addr", "add", "10.77.0.2/24", "dev", "eth0"]);
        client.ip(&["link", "set", "eth0", "up"]);
        client.ip(&["route", "add", "default", "via", "10.77.0.1"]);
        gateway.ip(&["addr", "add", "10.77.0.1/24", "dev", LAN_IFACE]);
        gateway.ip(&["link", "set", LAN_IFACE, "up"]);
        link_upstream(&gateway, &upstream);
        Lab3 {
            client,
            gateway,
            upstream,
        }
    }

    pub fn client_mac(&self) -> [u8; 6] {
        self.client.mac("eth0")
    }
}

/// A client's `eth0` ── the gateway's `port` (a veth pair, the peer moved into the gateway).
fn link_client(client: &Netns, gateway: &Netns, port: &str) {
    client.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        &gateway.name,
    ]);
}

/// The WAN side every lab shares: gateway `wan0` 10.78.0.1 ── upstream `eth0` 10.78.0.2, the
/// gateway forwarding, the upstream routing the LAN 10.77.0.0/24 back through it.
fn link_upstream(gateway: &Netns, upstream: &Netns) {
    gateway.ip(&[
        "link",
        "add",
        "wan0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &upstream.name,
    ]);
    gateway.ip(&["addr", "add", "10.78.0.1/24", "dev", "wan0"]);
    gateway.ip(&["link", "set", "wan0", "up"]);
    gateway.sysctl("net.ipv4.ip_forward", "1");
    upstream.ip(&["addr", "add", "10.78.0.2/24", "dev", "eth0"]);
    upstream.ip(&["link", "set", "eth0", "up"]);
    upstream.ip(&["route", "add", "10.77.0.0/24", "via", "10.78.0.1"]);
}

/// Port of the upstream bulk server started by [`serve_bulk`].
pub const BULK_PORT: u16 = 5002;

/// Upstream bulk server in `ns` on `UPSTREAM_IP:BULK_PORT`: each connection sends the number of
/// bytes it wants (u64, big-endian) and gets exactly that many zeros. Returns once it listens.
pub fn serve_bulk(ns: &Netns) {
    serve_bulk_at(ns, UPSTREAM_IP);
}

/// [`serve_bulk`] on `ip:BULK_PORT` (labs with other addresses).
pub fn serve_bulk_at(ns: &Netns, ip: Ipv4Addr) {
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let l = TcpListener::bind((ip, BULK_PORT)).expect("bind bulk server");
        tx.send(()).unwrap();
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                // The client asks for exactly N bytes (u64, big-endian) and gets no more, so
                // nothing beyond what it reads is ever in flight to be metered behind its back.
                let mut s = s;
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut want = [0u8; 8];
                if s.read_exact(&mut want).is_err() {
                    return;
                }
                let mut left = u64::from_be_bytes(want);
                let buf = [0u8; 65536];
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
                // Wait for the client's close so the last bytes are not reset away.
                let _ = s.read(&mut want);
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("bulk server up");
}

/// Downloads from the bulk server from inside `ns` until `limit` bytes or `idle` without data;
/// returns the payload bytes received (0 if the connection cannot be made).
pub fn download(ns: &Netns, limit: u64, idle: Duration) -> u64 {
    download_from(ns, UPSTREAM_IP, limit, idle)
}

/// [`download`] from the bulk server at `ip`.
pub fn download_from(ns: &Netns, ip: Ipv4Addr, limit: u64, idle: Duration) -> u64 {
    ns.run(move || {
        let addr = SocketAddr::from((ip, BULK_PORT));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(1500)) else {
            return 0;
        };
        s.set_read_timeout(Some(idle)).unwrap();
        if s.write_all(&limit.to_be_bytes()).is_err() {
            return 0;
        }
        let mut got = 0u64;
        let mut b = vec![0u8; 65536];
        while got < limit {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
        }
        got
    })
}

/// Name of the LAN bridge in a [`LabLan`] gateway (where the data plane attaches).
pub const BR_LAN: &str = "br-lan";

/// Several clients on one bridged LAN: client *i* ── veth ── `br-lan` in the gateway ── wan ──
/// upstream, as on a router whose Wi-Fi and Ethernet ports share `br-lan`.
///
/// Addresses: client *i* 10.77.0.(10+i), gateway `br-lan` 10.77.0.1, WAN and upstream as in
/// [`Lab3`]. The namespaces (and every veth with them) go on drop.
pub struct LabLan {
    pub clients: Vec<Netns>,
    pub gateway: Netns,
    pub upstream: Netns,
}

impl LabLan {
    pub fn new(tag: &str, n: usize) -> Self {
        let gateway = Netns::new(&format!("{tag}g"));
        let upstream = Netns::new(&format!("{tag}u"));
        gateway.ip(&["link", "add", BR_LAN, "type", "bridge"]);
        gateway.ip(&["addr", "add", "10.77.0.1/24", "dev", BR_LAN]);
        gateway.ip(&["link", "set", BR_LAN, "up"]);
        let mut clients = Vec::new();
        for i in 0..n {
            let c = Netns::new(&format!("{tag}c"));
            let port = format!("lan{i}");
            link_client(&c, &gateway, &port);
            c.ip(&[
                "addr",
                "add",
                &format!("{}/24", Self::client_ip(i)),
                "dev",
                "eth0",
            ]);
            c.ip(&["link", "set", "eth0", "up"]);
            c.ip(&["route", "add", "default", "via", "10.77.0.1"]);
            gateway.ip(&["link", "set", &port, "master", BR_LAN]);
            gateway.ip(&["link", "set", &port, "up"]);
            clients.push(c);
        }
        link_upstream(&gateway, &upstream);
        LabLan {
            clients,
            gateway,
            upstream,
        }
    }

    pub fn client_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, 10 + i as u8)
    }

    pub fn client_mac(&self, i: usize) -> [u8; 6] {
        self.clients[i].mac("eth0")
    }
}
