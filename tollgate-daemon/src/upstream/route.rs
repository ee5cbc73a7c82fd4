//! The WAN side's default gateway, from the kernel over a raw `NETLINK_ROUTE` socket.
//!
//! ```text
//! default_gateway(wan)  RTM_GETROUTE dump ─> main-table IPv4 routes with dst_len 0 on `wan`
//!                       ─> lowest metric ─> RTA_GATEWAY
//! RouteWatch::changed() waits for RTMGRP_LINK | IPV4_IFADDR | IPV4_ROUTE multicast messages
//! ```
//! The watcher only says "something changed"; the caller re-reads the table (and re-checks
//! periodically anyway, in case a message was lost to a full socket buffer).

use std::io;
use std::net::Ipv4Addr;

use tokio::io::unix::AsyncFd;

use crate::sys::netlink::{if_index, RouteSocket};

const NLMSG_HDRLEN: usize = 16;
const RTMSG_LEN: usize = 12;
const RT_TABLE_MAIN: u8 = 254;

/// A default route found in a dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultRoute {
    pub gateway: Ipv4Addr,
    pub oif: u32,
    pub metric: u32,
}

/// Parses the RTM_NEWROUTE messages of one dump buffer; `done` is set at NLMSG_DONE.
pub fn parse_routes(buf: &[u8], out: &mut Vec<DefaultRoute>) -> io::Result<bool> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad netlink length",
            ));
        }
        let msg = &buf[off + NLMSG_HDRLEN..off + len];
        off += (len + 3) & !3;
        match ty as i32 {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => {
                let errno = msg
                    .get(..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                    .unwrap_or(0);
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                return Ok(true);
            }
            t if t == libc::RTM_NEWROUTE as i32 => {}
            _ => continue,
        }
        if msg.len() < RTMSG_LEN {
            continue;
        }
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        let (family, dst_len, table, rtype) = (msg[0], msg[1], msg[4], msg[7]);
        if family as i32 != libc::AF_INET || dst_len != 0 || rtype != libc::RTN_UNICAST {
            continue;
        }
        let mut gw = None;
        let mut oif = 0;
        let mut metric = 0;
        let mut tbl = table as u32;
        let mut a = RTMSG_LEN;
        while a + 4 <= msg.len() {
            let alen = u16::from_ne_bytes(msg[a..a + 2].try_into().unwrap()) as usize;
            let aty = u16::from_ne_bytes(msg[a + 2..a + 4].try_into().unwrap());
            if alen < 4 || a + alen > msg.len() {
                break;
            }
            let v = &msg[a + 4..a + alen];
            match aty {
                libc::RTA_GATEWAY if v.len() == 4 => {
                    gw = Some(Ipv4Addr::new(v[0], v[1], v[2], v[3]))
                }
                libc::RTA_OIF if v.len() == 4 => oif = u32::from_ne_bytes(v.try_into().unwrap()),
                libc::RTA_PRIORITY if v.len() == 4 => {
                    metric = u32::from_ne_bytes(v.try_into().unwrap())
                }
                libc::RTA_TABLE if v.len() == 4 => tbl = u32::from_ne_bytes(v.try_into().unwrap()),
                _ => {}
            }
            a += (alen + 3) & !3;
        }
        if tbl != RT_TABLE_MAIN as u32 {
            continue;
        }
        if let Some(gateway) = gw {
            out.push(DefaultRoute {
                gateway,
                oif,
                metric,
            });
        }
    }
    Ok(false)
}

/// The IPv4 default gateway, via `wan` when given (lowest metric wins).
pub fn default_gateway(wan: Option<&str>) -> io::Result<Option<Ipv4Addr>> {
    let want = match wan {
        Some(name) => match if_index(name) {
            Some(i) => Some(i),
            None => return Ok(None), // the interface is not there (yet)
        },
        None => None,
    };
    let sock = RouteSocket::open(0, false)?;
    // nlmsghdr + rtgenmsg(family) padded to 4.
    let mut req = [0u8; NLMSG_HDRLEN + 4];
    let total = req.len() as u32;
    req[0..4].copy_from_slice(&total.to_ne_bytes());
    req[4..6].copy_from_slice(&libc::RTM_GETROUTE.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[NLMSG_HDRLEN] = libc::AF_INET as u8;
    sock.send(&req)?;
    let mut routes = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    for _ in 0..10_000 {
        let n = sock.recv(&mut buf)?;
        if parse_routes(&buf[..n], &mut routes)? {
            break;
        }
    }
    Ok(routes
        .into_iter()
        .filter(|r| want.is_none_or(|w| r.oif == w))
        .min_by_key(|r| r.metric)
        .map(|r| r.gateway))
}

/// Wakes when links, IPv4 addresses or IPv4 routes change.
pub struct RouteWatch {
    fd: AsyncFd<RouteSocket>,
}

impl RouteWatch {
    pub fn new() -> io::Result<RouteWatch> {
        let groups =
            (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV4_ROUTE) as u32;
        let fd = RouteSocket::open(groups, true)?.into_async()?;
        Ok(RouteWatch { fd })
    }

    /// Waits for the next change notification and drains what is queued.
    pub async fn changed(&self) -> io::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let mut guard = self.fd.readable().await?;
            let mut got = false;
            loop {
                let e = match self.fd.get_ref().recv(&mut buf) {
                    Ok(_) => {
                        got = true;
                        continue;
                    }
                    Err(e) => e,
                };
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    // ENOBUFS: messages were lost; the caller re-reads the table anyway.
                    _ if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        got = true;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            guard.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_msg(gw: [u8; 4], oif: u32, metric: u32, dst_len: u8) -> Vec<u8> {
        let mut m = vec![
            libc::AF_INET as u8,
            dst_len,
            0,
            0,
            RT_TABLE_MAIN,
            3,
            0,
            libc::RTN_UNICAST,
            0,
            0,
            0,
            0,
        ];
        for (ty, v) in [
            (libc::RTA_GATEWAY, gw.to_vec()),
            (libc::RTA_OIF, oif.to_ne_bytes().to_vec()),
            (libc::RTA_PRIORITY, metric.to_ne_bytes().to_vec()),
        ] {
            m.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
            m.extend_from_slice(&ty.to_ne_bytes());
            m.extend_from_slice(&v);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&((NLMSG_HDRLEN + m.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&libc::RTM_NEWROUTE.to_ne_bytes());
        out.extend_from_slice(&[0u8; 10]);
        out.extend_from_slice(&m);
        out
    }

    #[test]
    fn parses_default_routes_and_skips_others() {
        let mut buf = route_msg([10, 78, 0, 2], 3, 100, 0);
        buf.extend(route_msg([10, 1, 0, 1], 4, 0, 24)); // not a default route
        let mut out = Vec::new();
        assert!(!parse_routes(&buf, &mut out).unwrap());
        assert_eq!(
            out,
            vec![DefaultRoute {
                gateway: Ipv4Addr::new(10, 78, 0, 2),
                oif: 3,
                metric: 100
            }]
        );
    }

    #[test]
    fn hostile_lengths_are_errors_not_panics() {
        let mut buf = route_msg([10, 78, 0, 2], 3, 100, 0);
        buf[0..4].copy_from_slice(&9999u32.to_ne_bytes());
        assert!(parse_routes(&buf, &mut Vec::new()).is_err());
        let mut buf = route_msg([10, 78, 0, 2], 3, 100, 0);
        buf[NLMSG_HDRLEN + RTMSG_LEN..NLMSG_HDRLEN + RTMSG_LEN + 2]
            .copy_from_slice(&2000u16.to_ne_bytes());
        let mut out = Vec::new();
        parse_routes(&buf, &mut out).unwrap();
        assert!(out.is_empty());
        for n in 0..buf.len() {
            // Truncated buffers: an error or nothing, never a panic.
            parse_routes(&buf[..n], &mut Vec::new()).ok();
        }
    }

    #[test]
    fn reads_the_host_table_without_error() {
        // Whatever this machine's table holds, the dump must parse.
        default_gateway(None).expect("route dump");
        assert_eq!(default_gateway(Some("no-such-if0")).unwrap(), None);
    }
}
