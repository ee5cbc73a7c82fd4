//! A raw `NETLINK_ROUTE` socket: open (bound to multicast groups), send, receive. The messages
//! themselves are built and parsed by the caller (`upstream/route.rs`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// An open `NETLINK_ROUTE` socket.
pub struct RouteSocket {
    fd: OwnedFd,
}

impl RouteSocket {
    /// Opens and binds the socket to the multicast `groups` (0: requests only).
    pub fn open(groups: u32, nonblocking: bool) -> io::Result<RouteSocket> {
        let mut ty = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
        if nonblocking {
            ty |= libc::SOCK_NONBLOCK;
        }
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, ty, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain old data; zeroed is its valid "any" value.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = groups;
        // SAFETY: binding a valid netlink socket to a properly sized sockaddr_nl.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RouteSocket { fd })
    }

    /// Registers the socket with the tokio reactor (for a non-blocking watcher).
    pub fn into_async(self) -> io::Result<tokio::io::unix::AsyncFd<RouteSocket>> {
        // SAFETY: a RouteSocket owns its descriptor, keeps it open until it is dropped (which
        // the AsyncFd does last) and always returns that same descriptor from as_raw_fd.
        unsafe { tokio::io::unix::AsyncFd::register(self) }.map_err(|e| e.into_parts().1)
    }

    /// Sends one request to the kernel.
    pub fn send(&self, req: &[u8]) -> io::Result<()> {
        // SAFETY: sending a valid buffer within its length on our socket.
        if unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram into `buf`; `WouldBlock` when non-blocking and nothing is queued.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: receiving into a buffer we own, within its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsFd for RouteSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for RouteSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// The index of interface `name`, or None when there is none.
pub fn if_index(name: &str) -> Option<u32> {
    let c = super::cstring("interface name", name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}
