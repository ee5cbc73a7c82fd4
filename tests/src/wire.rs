//! What actually crosses a link, measured from the far side: an `AF_PACKET` counter that sums
//! the IP length of every frame matching a filter, a raw Ethernet sender, and foreign TCX
//! programs (two raw BPF instructions, loaded and attached with the bpf syscall, no aya) to
//! put next to the gate.
//!
//! ```text
//!  Capture::start(ns, dev, filter) ── thread in ns: AF_PACKET/ETH_P_ALL bound to dev,
//!       every frame: filter(ip header, outgoing?) ── sum of IP total lengths, packet count
//!  Capture::stop() ── totals (panics if the socket dropped frames: the count must be exact)
//! ```

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use crate::netns::Netns;

/// An IP packet seen on the wire, as the capture filter gets it.
pub struct Seen<'a> {
    /// The IP header and what follows (truncated to the capture's snap length).
    pub ip: &'a [u8],
    /// Sent by this host (`PACKET_OUTGOING`), else received.
    pub outgoing: bool,
    /// Frame's destination MAC was a group address.
    pub group: bool,
}

impl Seen<'_> {
    pub fn is_v4(&self) -> bool {
        self.ip.first().is_some_and(|b| b >> 4 == 4)
    }
    /// IPv4 source as 4 bytes / IPv6 source as 16 (empty if truncated).
    pub fn src(&self) -> &[u8] {
        if self.is_v4() {
            self.ip.get(12..16).unwrap_or(&[])
        } else {
            self.ip.get(8..24).unwrap_or(&[])
        }
    }
    pub fn dst(&self) -> &[u8] {
        if self.is_v4() {
            self.ip.get(16..20).unwrap_or(&[])
        } else {
            self.ip.get(24..40).unwrap_or(&[])
        }
    }
    /// IP length from the header (IPv6: 40 + payload length).
    pub fn len(&self) -> u64 {
        let be = |i: usize| {
            self.ip
                .get(i..i + 2)
                .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]) as u64)
        };
        if self.is_v4() {
            be(2)
        } else {
            40 + be(4)
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Totals of a capture.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    pub bytes: u64,
    pub packets: u64,
}

type Filter = Box<dyn Fn(&Seen<'_>) -> bool + Send>;

/// A running counter (see the module doc).
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Counted>>,
}

const ETH_P_ALL: u16 = 0x0003;

impl Capture {
    /// Starts counting on `dev` inside `ns`; returns once the socket is bound.
    pub fn start(
        ns: &Netns,
        dev: &str,
        filter: impl Fn(&Seen<'_>) -> bool + Send + 'static,
    ) -> Capture {
        let filter: Filter = Box::new(filter);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let dev = dev.to_string();
        let st = stop.clone();
        let thread = ns.spawn(move || {
            let fd = packet_socket(&dev, true);
            tx.send(()).unwrap();
            let mut total = Counted::default();
            let mut buf = [0u8; 256];
            loop {
                // SAFETY: sockaddr_ll out-parameter and a buffer of the given size.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut sl = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_TRUNC,
                        (&raw mut sll).cast(),
                        &mut sl,
                    )
                };
                if n < 0 {
                    if st.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                }
                let n = (n as usize).min(buf.len());
                if n < 14 {
                    continue;
                }
                let f = &buf[..n];
                let mut off = 12;
                let mut et = u16::from_be_bytes([f[12], f[13]]);
                while (et == 0x8100 || et == 0x88a8) && off + 6 <= n {
                    off += 4;
                    et = u16::from_be_bytes([f[off], f[off + 1]]);
                }
                if et != 0x0800 && et != 0x86dd {
                    continue;
                }
                let seen = Seen {
                    ip: &f[off + 2..],
                    outgoing: sll.sll_pkttype == libc::PACKET_OUTGOING,
                    group: f[0] & 1 == 1,
                };
                if filter(&seen) {
                    total.bytes += seen.len();
                    total.packets += 1;
                }
            }
            // Every frame must have been seen: a dropped one would make the count a guess.
            let mut stats = [0u32; 2];
            let mut sl = std::mem::size_of_val(&stats) as libc::socklen_t;
            // SAFETY: PACKET_STATISTICS fills two u32 (packets, drops).
            unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_STATISTICS,
                    stats.as_mut_ptr().cast(),
                    &mut sl,
                )
            };
            assert_eq!(
                stats[1], 0,
                "the capture socket dropped {} frames",
                stats[1]
            );
            total
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("capture socket up");
        Capture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops (within the 100 ms receive timeout) and returns the totals.
    pub fn stop(mut self) -> Counted {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("capture thread panicked")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An `AF_PACKET` raw socket bound to `dev` in the calling thread's namespace.
fn packet_socket(dev: &str, receive: bool) -> OwnedFd {
    let proto = if receive { ETH_P_ALL.to_be() } else { 0 };
    // SAFETY: plain socket(2).
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
    assert!(
        raw >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex != 0, "no interface {dev}");
    // SAFETY: zeroed sockaddr_ll with family, protocol and ifindex set.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
    if receive {
        let big: libc::c_int = 256 << 20;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: int and timeval options of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const big).cast(),
                4,
            );
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
    }
    fd
}

/// Sends whole Ethernet frames on `dev` (from the calling thread's namespace).
pub struct RawSender(OwnedFd);

impl RawSender {
    pub fn new(dev: &str) -> Self {
        Self(packet_socket(dev, false))
    }
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Which TCX hook a foreign program goes to.
#[derive(Clone, Copy, Debug)]
pub enum TcxHook {
    Ingress,
    Egress,
}

/// Where in the chain.
#[derive(Clone, Copy, Debug)]
pub enum TcxPlace {
    First,
    Last,
}

/// A foreign TCX program that returns `ret` for every packet (TC_ACT_OK = 0, ends the chain
/// with a pass; TC_ACT_SHOT = 2), attached to `dev` in the calling thread's namespace. It
/// stays attached while the value lives.
pub struct ForeignTcx {
    _prog: OwnedFd,
    _link: OwnedFd,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_F_BEFORE: u32 = 1 << 3;
const BPF_F_AFTER: u32 = 1 << 4;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> Result<OwnedFd, std::io::Error> {
    // SAFETY: the bpf syscall reads a zero-padded bpf_attr of the given size.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

impl ForeignTcx {
    pub fn attach(dev: &str, hook: TcxHook, place: TcxPlace, ret: i32) -> ForeignTcx {
        // r0 = ret; exit
        let mut insns = [0u8; 16];
        insns[0] = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K, dst r0
        insns[4..8].copy_from_slice(&ret.to_le_bytes());
        insns[8] = 0x95; // BPF_JMP | BPF_EXIT
        let license = b"GPL\0";
        let mut a = [0u8; 128];
        a[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_le_bytes());
        a[4..8].copy_from_slice(&2u32.to_le_bytes());
        a[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_le_bytes());
        a[16..24].copy_from_slice(&(license.as_ptr() as u64).to_le_bytes());
        a[48..56].copy_from_slice(b"foreign\0");
        let prog = bpf(BPF_PROG_LOAD, &mut a).expect("BPF_PROG_LOAD of a 2-instruction classifier");
        let name = std::ffi::CString::new(dev).unwrap();
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex != 0, "no interface {dev}");
        let mut l = [0u8; 128];
        l[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_le_bytes());
        l[4..8].copy_from_slice(&ifindex.to_le_bytes());
        let at = match hook {
            TcxHook::Ingress => BPF_TCX_INGRESS,
            TcxHook::Egress => BPF_TCX_EGRESS,
        };
        l[8..12].copy_from_slice(&at.to_le_bytes());
        let flags = match place {
            TcxPlace::First => BPF_F_BEFORE,
            TcxPlace::Last => BPF_F_AFTER,
        };
        l[12..16].copy_from_slice(&flags.to_le_bytes());
        let link = bpf(BPF_LINK_CREATE, &mut l).expect("BPF_LINK_CREATE tcx");
        ForeignTcx {
            _prog: prog,
            _link: link,
        }
    }
}
