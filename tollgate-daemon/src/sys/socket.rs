use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// The `SO_MARK` of a socket (the captive portal's nft redirect marks the connections it sends
/// us).
pub fn socket_mark(s: &impl AsFd) -> io::Result<u32> {
    let mut mark: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: valid fd borrowed from `s`; `mark` is a u32 buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw mut mark).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(mark)
}

/// Pins a socket to one interface (`SO_BINDTODEVICE`): packets from any other are not for it.
pub fn bind_to_device(s: &impl AsFd, iface: &str) -> io::Result<()> {
    let name = super::cstring("interface name", iface)?;
    let bytes = name.as_bytes_with_nul();
    // SAFETY: valid fd borrowed from `s`; the option value is a NUL-terminated buffer of `len` bytes.
    let rc = unsafe {
        libc::setsockopt(
            s.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            bytes.as_ptr().cast(),
            bytes.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
