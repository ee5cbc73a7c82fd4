use std::net::{Ipv4Addr, Ipv6Addr};

use super::SysError;

/// The addresses configured on `iface`: its first IPv4 address and every IPv6 one, in the
/// kernel's order.
pub fn iface_addrs(iface: &str) -> Result<(Option<Ipv4Addr>, Vec<Ipv6Addr>), SysError> {
    let mut v4 = None;
    let mut v6 = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(SysError::last("getifaddrs"));
    }
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: p is a valid node of the list returned by getifaddrs.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if name.to_bytes() != iface.as_bytes() {
            continue;
        }
        // SAFETY: the family tells which sockaddr variant ifa_addr points to.
        unsafe {
            match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    v4.get_or_insert(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)));
                }
                libc::AF_INET6 => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    v6.push(Ipv6Addr::from(sa.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
    }
    // SAFETY: ifap came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    Ok((v4, v6))
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_has_127_0_0_1_and_a_missing_interface_has_nothing() {
        let (v4, _) = super::iface_addrs("lo").unwrap();
        assert_eq!(v4, Some(std::net::Ipv4Addr::LOCALHOST));
        let (v4, v6) = super::iface_addrs("tg-no-such-if").unwrap();
        assert!(v4.is_none() && v6.is_empty());
    }
}
