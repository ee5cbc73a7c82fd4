//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN` tests and benchmarks.
//!
//! Checksums are left zero: the data plane never looks at them.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// An L4 payload to put inside an IP packet.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp { sport: u16, dport: u16 },
    Udp { sport: u16, dport: u16 },
    Icmpv6 { ty: u8 },
    Raw { proto: u8 },
}

impl L4 {
    fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Icmpv6 { .. } => 58,
            L4::Raw { proto } => *proto,
        }
    }

    fn header(&self, payload: usize) -> Vec<u8> {
        let mut h = Vec::new();
        match self {
            L4::Tcp { sport, dport } => {
                h.extend(sport.to_be_bytes());
                h.extend(dport.to_be_bytes());
                h.extend([0u8; 8]);
                h.extend([0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
            }
            L4::Udp { sport, dport } => {
                h.extend(sport.to_be_bytes());
                h.extend(dport.to_be_bytes());
                h.extend(((8 + payload) as u16).to_be_bytes());
                h.extend([0, 0]);
            }
            L4::Icmpv6 { ty } => h.extend([*ty, 0, 0, 0, 0, 0, 0, 0]),
            L4::Raw { .. } => {}
        }
        h
    }
}

/// Frame builder: Ethernet, optional VLAN tags, then IPv4/IPv6/ARP.
#[derive(Clone, Debug)]
pub struct Frame {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub vlans: Vec<u16>,
}

impl Frame {
    pub fn new(src: [u8; 6], dst: [u8; 6]) -> Self {
        Self {
            dst,
            src,
            vlans: Vec::new(),
        }
    }

    pub fn vlan(mut self, id: u16) -> Self {
        self.vlans.push(id);
        self
    }

    fn eth(&self, ethertype: u16) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(self.dst);
        f.extend(self.src);
        for (i, v) in self.vlans.iter().enumerate() {
            // Outer tag of a stack is 802.1ad, inner ones 802.1Q.
            let tpid: u16 = if i == 0 && self.vlans.len() > 1 {
                0x88a8
            } else {
                0x8100
            };
            f.extend(tpid.to_be_bytes());
            f.extend(v.to_be_bytes());
        }
        f.extend(ethertype.to_be_bytes());
        f
    }

    /// IPv4 packet with `payload` bytes after the L4 header.
    pub fn ipv4(&self, src: Ipv4Addr, dst: Ipv4Addr, l4: L4, payload: usize) -> Vec<u8> {
        self.ipv4_frag(src, dst, l4, payload, 0)
    }

    /// IPv4 with a fragment offset (in 8-byte units; non-zero = not the first fragment).
    pub fn ipv4_frag(
        &self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        l4: L4,
        payload: usize,
        frag_off: u16,
    ) -> Vec<u8> {
        let l4h = if frag_off == 0 {
            l4.header(payload)
        } else {
            Vec::new()
        };
        let total = 20 + l4h.len() + payload;
        let mut f = self.eth(ETH_P_IP);
        f.extend([0x45, 0]);
        f.extend((total as u16).to_be_bytes());
        f.extend([0, 1]);
        f.extend(frag_off.to_be_bytes());
        f.extend([64, l4.proto(), 0, 0]);
        f.extend(src.octets());
        f.extend(dst.octets());
        f.extend(l4h);
        f.extend(std::iter::repeat_n(0xabu8, payload));
        f
    }

    /// IPv6 packet, optionally behind extension headers (each `(type, 8-byte units - 1)`).
    pub fn ipv6(
        &self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        ext: &[u8],
        l4: L4,
        payload: usize,
    ) -> Vec<u8> {
        self.ipv6_hops(src, dst, ext, l4, payload, 64)
    }

    /// [`Frame::ipv6`] with the given hop limit (neighbour discovery needs 255).
    pub fn ipv6_hops(
        &self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        ext: &[u8],
        l4: L4,
        payload: usize,
        hops: u8,
    ) -> Vec<u8> {
        let l4h = l4.header(payload);
        let mut exts = Vec::new();
        for (i, ty) in ext.iter().enumerate() {
            let next = ext.get(i + 1).copied().unwrap_or(l4.proto());
            match ty {
                44 => exts.extend([next, 0, 0, 0, 0, 0, 0, 1]), // first fragment, M=1
                _ => exts.extend([next, 0, 1, 4, 0, 0, 0, 0]),  // 8 bytes: PadN option
            }
        }
        let plen = exts.len() + l4h.len() + payload;
        let first = ext.first().copied().unwrap_or(l4.proto());
        let mut f = self.eth(ETH_P_IPV6);
        f.extend([0x60, 0, 0, 0]);
        f.extend((plen as u16).to_be_bytes());
        f.extend([first, hops]);
        f.extend(src.octets());
        f.extend(dst.octets());
        f.extend(exts);
        f.extend(l4h);
        f.extend(std::iter::repeat_n(0xcdu8, payload));
        f
    }

    /// IPv6 non-first fragment of `proto`.
    pub fn ipv6_later_fragment(&self, src: Ipv6Addr, dst: Ipv6Addr, proto: u8) -> Vec<u8> {
        let mut f = self.eth(ETH_P_IPV6);
        f.extend([0x60, 0, 0, 0]);
        f.extend(72u16.to_be_bytes());
        f.extend([44, 64]);
        f.extend(src.octets());
        f.extend(dst.octets());
        f.extend([proto, 0, 0x05, 0x00, 0, 0, 0, 1]); // offset 160 bytes
        f.extend([0u8; 64]);
        f
    }

    /// ARP request "who has `target`? tell `sender_ip` at `sender_mac`" in a frame from `self.src`
    /// (the sender MAC inside may differ from the frame's: that is how a neighbour entry is
    /// poisoned with a group address).
    pub fn arp_request(
        &self,
        sender_mac: [u8; 6],
        sender_ip: Ipv4Addr,
        target: Ipv4Addr,
    ) -> Vec<u8> {
        let mut f = self.eth(ETH_P_ARP);
        f.extend([0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend(sender_mac);
        f.extend(sender_ip.octets());
        f.extend([0; 6]);
        f.extend(target.octets());
        f
    }

    pub fn arp(&self) -> Vec<u8> {
        let mut f = self.eth(ETH_P_ARP);
        f.extend([0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend(self.src);
        f.extend([10, 0, 0, 2]);
        f.extend([0; 6]);
        f.extend([10, 0, 0, 1]);
        f
    }
}

/// L3 length of a frame built by [`Frame`] (what the data plane meters).
pub fn l3_len(frame: &[u8], vlans: usize) -> u64 {
    (frame.len() - 14 - 4 * vlans) as u64
}

/// `frame` padded with zeros to the Ethernet minimum of 60 bytes (what a NIC adds to short
/// frames; not part of the IP packet).
pub fn padded(mut frame: Vec<u8>) -> Vec<u8> {
    if frame.len() < 60 {
        frame.resize(60, 0);
    }
    frame
}

/// Sends `frame` out of `dev` (in the calling thread's namespace) as a **non-linear** skb:
/// an `AF_PACKET` socket with `PACKET_VNET_HDR` and a zero `hdr_len` puts only the Ethernet
/// header in the linear area and the rest in page fragments, when the frame is at least a
/// page long (so `dev` needs an MTU above 4096). The receiving side's TC programs then see
/// every IP/L4 header outside the linear area, as after GRO.
pub fn send_nonlinear(dev: &str, frame: &[u8]) -> std::io::Result<()> {
    send_nonlinear_n(dev, frame, 1)
}

/// [`send_nonlinear`] `n` times through one socket (a benchmark's burst).
pub fn send_nonlinear_n(dev: &str, frame: &[u8], n: usize) -> std::io::Result<()> {
    use std::io::Error;
    const PACKET_VNET_HDR: libc::c_int = 15;
    let name = std::ffi::CString::new(dev).map_err(Error::other)?;
    // SAFETY: plain syscalls on a socket this function owns; every buffer outlives its call.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        if ifindex == 0 {
            return Err(Error::last_os_error());
        }
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as libc::c_int,
        );
        if fd < 0 {
            return Err(Error::last_os_error());
        }
        let close = |e: Error| {
            libc::close(fd);
            Err(e)
        };
        let one: libc::c_int = 1;
        if libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            PACKET_VNET_HDR,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
        {
            return close(Error::last_os_error());
        }
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        if libc::bind(
            fd,
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ) != 0
        {
            return close(Error::last_os_error());
        }
        // struct virtio_net_hdr, all zero: no checksum offload, no GSO, hdr_len 0.
        let mut buf = vec![0u8; 10];
        buf.extend_from_slice(frame);
        for _ in 0..n {
            if libc::send(fd, buf.as_ptr() as *const libc::c_void, buf.len(), 0) < 0 {
                return close(Error::last_os_error());
            }
        }
        libc::close(fd);
    }
    Ok(())
}
